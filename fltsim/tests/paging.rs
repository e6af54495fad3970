//! Paging I/O as a filter sees it: page faults on a mapped view arrive as paging reads at APC_LEVEL with no
//! top-level IRP, the cache manager's faults under a cached read arrive with a top-level IRP set, the mapped page
//! writer's writes arrive with `FSRTL_MOD_WRITE_TOP_LEVEL_IRP`; a filter may refuse a section; and a filter that
//! issues cached I/O from the paging path is reported.

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicU8, Ordering},
    },
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr, mm},
    kernel::thread,
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE,
            FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FLTFL_IO_OPERATION_NON_CACHED,
            FltReadFileEx,
        },
        System::SystemServices::IRP_PAGING_IO,
    },
    Win32::{
        Foundation::STATUS_INSUFFICIENT_RESOURCES,
        Storage::FileSystem::{FILE_READ_DATA, FILE_WRITE_DATA},
    },
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    Observe,
    RefuseSections,
    CachedReadFromPagingPath,
    NonCachedReadFromPagingPath,
}

static MODE: AtomicU8 = AtomicU8::new(0);
/// (major, `IrpFlags`, IRQL, top-level IRP) of every read and write the filter saw.
static SEEN: Mutex<Vec<(u8, u32, u8, usize)>> = Mutex::new(Vec::new());

fn mode() -> Mode {
    [Mode::Observe, Mode::RefuseSections, Mode::CachedReadFromPagingPath, Mode::NonCachedReadFromPagingPath]
        [usize::from(MODE.load(Ordering::SeqCst))]
}

unsafe extern "system" fn pre_io(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: valid callback data from Filter Manager.
    let block = unsafe { (*data).Iopb };
    // SAFETY: and its parameter block.
    let iopb = unsafe { &*block };
    let state = thread::snapshot();
    SEEN.lock().expect("lock").push((iopb.MajorFunction, iopb.IrpFlags, state.irql, state.top_level_irp));
    let paging = iopb.IrpFlags & IRP_PAGING_IO != 0;
    if paging
        && iopb.MajorFunction == 3
        && matches!(mode(), Mode::CachedReadFromPagingPath | Mode::NonCachedReadFromPagingPath)
    {
        // SAFETY: valid related objects.
        let objects = unsafe { &*objects };
        let flags = if mode() == Mode::NonCachedReadFromPagingPath { FLTFL_IO_OPERATION_NON_CACHED } else { 0 };
        let offset = 0i64;
        let mut buffer = [0u8; 512];
        let mut read = 0u32;
        // SAFETY: this filter's instance, the operation's file object, a local buffer. FltReadFileEx is PASSIVE-only,
        // so the model also reports the IRQL; the test looks for the paging-path rule.
        unsafe {
            FltReadFileEx(
                objects.Instance,
                objects.FileObject,
                &raw const offset,
                512,
                buffer.as_mut_ptr().cast(),
                flags,
                &raw mut read,
                None,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
    }
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

unsafe extern "system" fn pre_section(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    if mode() != Mode::RefuseSections {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    // SAFETY: valid callback data from Filter Manager.
    let data = unsafe { &mut *data };
    data.IoStatus.Anonymous.Status = STATUS_INSUFFICIENT_RESOURCES;
    FLT_PREOP_COMPLETE
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 4]> = Table([
    operation(3, Some(pre_io), None),
    operation(4, Some(pre_io), None),
    operation(0xFF, Some(pre_section), None),
    operation(END, None, None),
]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

fn setup(mode: Mode) -> (fltsim::LoadedDriver, std::path::PathBuf) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("paging");
    let contents: Vec<u8> = (0..5000u32).map(|i| u8::try_from(i % 251).expect("small")).collect();
    std::fs::write(root.join("mapped.bin"), &contents).expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("pagingtest", "Paging Instance", "139000");
    (fltsim::load("pagingtest", driver_entry).expect("load"), root)
}

fn open() -> iomgr::Handle {
    let params = iomgr::OpenParams { desired_access: FILE_READ_DATA | FILE_WRITE_DATA, ..Default::default() };
    iomgr::create(r"C:\mapped.bin", &params).expect("open")
}

const PAGING: u32 = IRP_PAGING_IO;

scenario! {
    fn page_faults_on_a_mapped_view_are_paging_reads_at_apc_level() {
        let (_driver, _root) = setup(Mode::Observe);
        let handle = open();
        let section = mm::create_section(&handle).expect("section");
        let mut view = mm::map_view(&section);
        let bytes = view.read(4000, 200).expect("read through the view");
        let expected: Vec<u8> = (4000..4200u32).map(|i| u8::try_from(i % 251).expect("small")).collect();
        assert_eq!(bytes, expected);
        let seen = SEEN.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2, "two pages faulted in: {seen:?}");
        for (major, flags, irql, top_level) in seen {
            assert_eq!(major, 3);
            assert_ne!(flags & PAGING, 0, "IRP_PAGING_IO");
            assert_eq!(irql, 1, "APC_LEVEL");
            assert_eq!(top_level, 0, "a page fault has no top-level IRP");
        }
        assert!(take_reports().is_empty());
    }
}

scenario! {
    fn the_cache_managers_faults_under_a_cached_read_carry_a_top_level_irp() {
        let (_driver, _root) = setup(Mode::Observe);
        mm::set_cache_faults(true);
        let handle = open();
        assert_eq!(iomgr::read(&handle, Some(10), 20).expect("cached read").len(), 20);
        let seen = SEEN.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!((seen[0].1 & PAGING, seen[0].2, seen[0].3), (0, 0, 0), "the user's cached read at PASSIVE_LEVEL");
        assert_ne!(seen[1].1 & PAGING, 0);
        assert_eq!(seen[1].2, 1, "the fault at APC_LEVEL");
        assert_ne!(seen[1].3, 0, "under the file system's top-level IRP");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    fn the_mapped_page_writer_writes_dirty_pages_with_its_top_level_irp() {
        let (_driver, root) = setup(Mode::Observe);
        let handle = open();
        let section = mm::create_section(&handle).expect("section");
        let mut view = mm::map_view(&section);
        view.write(1, b"XYZ").expect("write through the view");
        view.flush().expect("mapped page writer");
        let written = std::fs::read(root.join("mapped.bin")).expect("host");
        assert_eq!(&written[1..4], b"XYZ");
        assert_eq!(written.len(), 5000, "paging writes do not extend the file");
        let writes: Vec<_> = SEEN.lock().expect("lock").iter().filter(|s| s.0 == 4).copied().collect();
        assert_eq!(writes.len(), 1);
        assert_ne!(writes[0].1 & PAGING, 0);
        assert_eq!(writes[0].3, mm::FSRTL_MOD_WRITE_TOP_LEVEL_IRP);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    fn a_filter_can_refuse_a_section() {
        let (_driver, _root) = setup(Mode::RefuseSections);
        let handle = open();
        assert_eq!(mm::create_section(&handle).err(), Some(STATUS_INSUFFICIENT_RESOURCES));
        assert!(take_reports().is_empty());
    }
}

scenario! {
    fn cached_io_from_the_paging_path_is_reported() {
        let (_driver, _root) = setup(Mode::CachedReadFromPagingPath);
        let handle = open();
        let section = mm::create_section(&handle).expect("section");
        let _ = mm::map_view(&section).read(0, 1);
        let rules: Vec<Rule> = take_rules();
        assert!(rules.contains(&Rule::CachedIoFromPagingPath), "{rules:?}");
    }
}

scenario! {
    fn non_cached_io_from_the_paging_path_is_not_a_cache_hazard() {
        let (_driver, _root) = setup(Mode::NonCachedReadFromPagingPath);
        let handle = open();
        let section = mm::create_section(&handle).expect("section");
        let _ = mm::map_view(&section).read(0, 1);
        let rules: Vec<Rule> = take_rules();
        // FltReadFileEx is PASSIVE-only and a fault runs at APC_LEVEL, so the IRQL rule fires; the cache rule does not.
        assert!(!rules.contains(&Rule::CachedIoFromPagingPath), "{rules:?}");
        assert!(rules.contains(&Rule::IrqlTooHigh), "{rules:?}");
    }
}
