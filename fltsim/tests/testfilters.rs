//! The test filters that sit above a filter under test break no rule themselves, and deliver the contexts they
//! promise to the filter below: a create replayed from a system worker, and reads at APC_LEVEL, in a guarded
//! region and with a top-level IRP set.

use std::{ffi::c_void, sync::Mutex};

use fltsim::{
    io::{self, VolumeSpec, iomgr},
    kernel::{process, thread},
    scenario,
    testfilters::{
        build::{END, Table, operation, registration},
        context_reader, poster,
    },
    verifier::take_reports,
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_NO_CALLBACK,
            FLT_REGISTRATION, FLT_RELATED_OBJECTS,
        },
        System::SystemServices::PsGetCurrentProcessId,
    },
    Win32::Foundation::STATUS_SUCCESS,
};

/// What the filter below saw: (major, process id, IRQL, guarded regions, top-level IRP).
type Seen = (u8, usize, u8, u32, usize);
static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

unsafe extern "system" fn observe(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let block = unsafe { (*data).Iopb };
    // SAFETY: and its parameter block.
    let major = unsafe { (*block).MajorFunction };
    // SAFETY: no preconditions.
    let pid = unsafe { PsGetCurrentProcessId() } as usize;
    let state = thread::snapshot();
    SEEN.lock().expect("lock").push((major, pid, state.irql, state.guarded_regions, state.top_level_irp));
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 3]> =
    Table([operation(0, Some(observe), None), operation(3, Some(observe), None), operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

fn setup() {
    let root = io::fresh_root("testfilters");
    std::fs::write(root.join("file.txt"), b"0123456789").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("observer", "Observer", "135100");
}

scenario! {
    fn the_poster_replays_creates_in_a_system_worker() {
        setup();
        let mut below = fltsim::load("observer", driver_entry).expect("observer");
        let mut above = poster::load().expect("poster");
        let app = process::create(r"\Device\HarddiskVolume1\app.exe", process::Token { user: "alice".into(), admin: false });
        let handle = process::run_as(&app, || iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default())).expect("open");
        iomgr::close(handle);
        assert_eq!(poster::replayed(), 1);
        let seen = SEEN.lock().expect("lock").clone();
        assert_eq!(seen[0].1, 4, "the create reached the filter below in the System process, not the app's");
        above.unload(false).expect("unload");
        below.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    fn the_context_reader_reads_at_apc_level_in_a_guarded_region_and_with_a_top_level_irp() {
        setup();
        let mut below = fltsim::load("observer", driver_entry).expect("observer");
        let mut above = context_reader::load().expect("reader");
        let handle = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("open");
        SEEN.lock().expect("lock").clear();
        for context in [
            context_reader::Context::Passive,
            context_reader::Context::ApcLevel,
            context_reader::Context::GuardedRegion,
            context_reader::Context::TopLevelIrp,
        ] {
            let (status, bytes) = context_reader::read(2, 3, context);
            assert_eq!((status, bytes.as_slice()), (STATUS_SUCCESS, &b"234"[..]), "{context:?}");
        }
        let seen: Vec<(u8, u32, usize)> = SEEN.lock().expect("lock").iter().map(|s| (s.2, s.3, s.4)).collect();
        assert_eq!(seen, [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, io::mm::FSRTL_CACHE_TOP_LEVEL_IRP)]);
        iomgr::close(handle);
        above.unload(false).expect("unload");
        below.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}
