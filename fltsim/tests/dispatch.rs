//! Operation dispatch through a filter: pre- and post-operation callbacks, the I/O manager's requests reaching the
//! model file system, and a check per callback-status rule, each proven to fire on a deliberately wrong filter.

use std::{
    ffi::c_void,
    path::PathBuf,
    sync::atomic::{AtomicU8, AtomicUsize, Ordering},
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    kernel::thread,
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::Storage::FileSystem::Minifilters::{
        FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_FINISHED_PROCESSING,
        FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE, FLT_PREOP_DISALLOW_FASTIO, FLT_PREOP_SUCCESS_NO_CALLBACK,
        FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_PREOP_SYNCHRONIZE, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
    },
    Win32::{
        Foundation::{STATUS_ACCESS_DENIED, STATUS_PENDING},
        Storage::FileSystem::{FILE_READ_DATA, FILE_WRITE_DATA},
    },
};

/// What the test filter's callbacks do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Count creates and reads in pre and post, pass everything down.
    Observe,
    /// Deny creates of files named `denied.txt` with `STATUS_ACCESS_DENIED` (`FLT_PREOP_COMPLETE`).
    DenyByName,
    /// Return 42 from pre-create.
    BogusStatus,
    /// `SUCCESS_WITH_CALLBACK` for reads, which have no post-operation callback.
    WithCallbackNoPost,
    /// A completion context with `SUCCESS_NO_CALLBACK`.
    ContextWithoutCallback,
    /// `FLT_PREOP_COMPLETE` with `STATUS_PENDING`.
    CompletePending,
    /// `FLT_PREOP_SYNCHRONIZE` for a create.
    SynchronizeCreate,
    /// `FLT_PREOP_DISALLOW_FASTIO` for an IRP read.
    FastIoStatusOnIrp,
    /// Return 7 from post-create.
    BogusPostStatus,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static PRE_CREATES: AtomicUsize = AtomicUsize::new(0);
static POST_CREATES: AtomicUsize = AtomicUsize::new(0);
static PRE_READS: AtomicUsize = AtomicUsize::new(0);
static POST_CREATE_IRQL: AtomicU8 = AtomicU8::new(u8::MAX);

fn mode() -> Mode {
    const ALL: [Mode; 9] = [
        Mode::Observe,
        Mode::DenyByName,
        Mode::BogusStatus,
        Mode::WithCallbackNoPost,
        Mode::ContextWithoutCallback,
        Mode::CompletePending,
        Mode::SynchronizeCreate,
        Mode::FastIoStatusOnIrp,
        Mode::BogusPostStatus,
    ];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    PRE_CREATES.fetch_add(1, Ordering::SeqCst);
    // SAFETY: Filter Manager passes valid callback data whose Iopb points to its parameter block.
    let data = unsafe { &mut *data };
    // SAFETY: as above.
    let iopb = unsafe { &*data.Iopb };
    // SAFETY: TargetFileObject is the file object being opened.
    let name = unsafe { &(*iopb.TargetFileObject).FileName };
    // SAFETY: the file object's name buffer holds Length bytes.
    let name =
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) });
    match mode() {
        Mode::DenyByName if name.eq_ignore_ascii_case("\\denied.txt") => {
            data.IoStatus.Anonymous.Status = STATUS_ACCESS_DENIED;
            data.IoStatus.Information = 0;
            FLT_PREOP_COMPLETE
        }
        Mode::BogusStatus => 42,
        Mode::ContextWithoutCallback => {
            // SAFETY: Filter Manager passes a valid place for the context.
            unsafe { *context = 0x1000 as *mut c_void };
            FLT_PREOP_SUCCESS_NO_CALLBACK
        }
        Mode::CompletePending => {
            data.IoStatus.Anonymous.Status = STATUS_PENDING;
            FLT_PREOP_COMPLETE
        }
        Mode::SynchronizeCreate => FLT_PREOP_SYNCHRONIZE,
        _ => FLT_PREOP_SUCCESS_WITH_CALLBACK,
    }
}

unsafe extern "system" fn post_create(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    POST_CREATES.fetch_add(1, Ordering::SeqCst);
    POST_CREATE_IRQL.store(thread::current_irql(), Ordering::SeqCst);
    if mode() == Mode::BogusPostStatus { 7 } else { FLT_POSTOP_FINISHED_PROCESSING }
}

unsafe extern "system" fn pre_read(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    PRE_READS.fetch_add(1, Ordering::SeqCst);
    match mode() {
        Mode::WithCallbackNoPost => FLT_PREOP_SUCCESS_WITH_CALLBACK,
        Mode::FastIoStatusOnIrp => FLT_PREOP_DISALLOW_FASTIO,
        _ => FLT_PREOP_SUCCESS_NO_CALLBACK,
    }
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 3]> = Table([
    operation(0, Some(pre_create), Some(post_create)),
    operation(3, Some(pre_read), None),
    operation(END, None, None),
]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

/// Mounts C: on a fresh host directory holding `hello.txt`, loads the test filter in `mode`.
fn setup(mode: Mode) -> (fltsim::LoadedDriver, PathBuf) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("dispatch");
    std::fs::write(root.join("hello.txt"), b"hello, world").expect("seed file");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("dispatchtest", "Dispatch Instance", "370000");
    let driver = fltsim::load("dispatchtest", driver_entry).expect("load");
    (driver, root)
}

scenario! {
    /// A correct filter sees creates before and after the file system, post-create at PASSIVE_LEVEL; reads and
    /// writes reach the host file; the synchronous file object's current offset advances.
    fn operations_flow_through_the_filter_to_the_file_system() {
        let (mut driver, root) = setup(Mode::Observe);
        let params = iomgr::OpenParams { desired_access: FILE_READ_DATA | FILE_WRITE_DATA, ..Default::default() };
        let handle = iomgr::create(r"C:\HELLO.TXT", &params).expect("case-insensitive open");
        assert_eq!((PRE_CREATES.load(Ordering::SeqCst), POST_CREATES.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(POST_CREATE_IRQL.load(Ordering::SeqCst), 0, "post-create runs at PASSIVE_LEVEL");
        assert_eq!(iomgr::read(&handle, None, 5).expect("read"), b"hello");
        assert_eq!(iomgr::read(&handle, None, 100).expect("short read at the end"), b", world");
        assert!(iomgr::read(&handle, None, 1).is_err(), "STATUS_END_OF_FILE at the end");
        assert_eq!(PRE_READS.load(Ordering::SeqCst), 3);
        iomgr::write(&handle, Some(0), b"HELLO").expect("write");
        iomgr::close(handle);
        assert_eq!(std::fs::read(root.join("hello.txt")).expect("host file"), b"HELLO, world");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// `FLT_PREOP_COMPLETE` stops the create: the file system never sees it and the caller gets the filter's status.
    fn a_filter_can_complete_a_create_itself() {
        let (_driver, root) = setup(Mode::DenyByName);
        std::fs::write(root.join("denied.txt"), b"secret").expect("seed");
        assert_eq!(iomgr::create(r"C:\denied.txt", &iomgr::OpenParams::default()), Err(STATUS_ACCESS_DENIED));
        assert!(iomgr::create(r"C:\hello.txt", &iomgr::OpenParams::default()).is_ok());
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn an_invalid_preop_status_is_reported() {
        let (_driver, _root) = setup(Mode::BogusStatus);
        let _ = iomgr::create(r"C:\hello.txt", &iomgr::OpenParams::default());
        assert_eq!(take_rules(), [Rule::InvalidPreOpStatus]);
    }
}

scenario! {
    fn success_with_callback_without_a_post_operation_is_reported() {
        let (_driver, _root) = setup(Mode::WithCallbackNoPost);
        let handle = iomgr::create(r"C:\hello.txt", &iomgr::OpenParams::default()).expect("open");
        let _ = iomgr::read(&handle, Some(0), 4);
        assert_eq!(take_rules(), [Rule::PostOpMissing]);
    }
}

scenario! {
    fn a_completion_context_without_a_callback_is_reported() {
        let (_driver, _root) = setup(Mode::ContextWithoutCallback);
        let _ = iomgr::create(r"C:\hello.txt", &iomgr::OpenParams::default());
        assert_eq!(take_rules(), [Rule::CompletionContextNotAllowed]);
    }
}

scenario! {
    fn completing_with_status_pending_is_reported() {
        let (_driver, _root) = setup(Mode::CompletePending);
        let _ = iomgr::create(r"C:\hello.txt", &iomgr::OpenParams::default());
        assert_eq!(take_rules(), [Rule::CompleteWithPending]);
    }
}

scenario! {
    fn synchronizing_a_create_is_reported() {
        let (_driver, _root) = setup(Mode::SynchronizeCreate);
        let _ = iomgr::create(r"C:\hello.txt", &iomgr::OpenParams::default());
        assert_eq!(take_rules(), [Rule::StatusNotAllowedForOperation]);
    }
}

scenario! {
    fn a_fast_io_status_for_an_irp_is_reported() {
        let (_driver, _root) = setup(Mode::FastIoStatusOnIrp);
        let handle = iomgr::create(r"C:\hello.txt", &iomgr::OpenParams::default()).expect("open");
        let _ = iomgr::read(&handle, Some(0), 4);
        assert_eq!(take_rules(), [Rule::StatusNotAllowedForOperation]);
    }
}

scenario! {
    fn an_invalid_postop_status_is_reported() {
        let (_driver, _root) = setup(Mode::BogusPostStatus);
        let _ = iomgr::create(r"C:\hello.txt", &iomgr::OpenParams::default());
        assert_eq!(take_rules(), [Rule::InvalidPostOpStatus]);
    }
}
