//! Byte-range locks: the file system's, as programs see them, and a filter's own (`FltAllocateFileLock`), which a
//! filter that serves data itself keeps and checks.

use std::{
    ffi::c_void,
    sync::atomic::{AtomicIsize, AtomicU8, Ordering},
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    kernel::process,
    scenario,
    testfilters::build::{END, Table, operation, register, registration, unregister},
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Foundation::DRIVER_OBJECT,
        Storage::FileSystem::{
            FILE_LOCK, FsRtlFastUnlockAll,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE,
                FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltAllocateFileLock,
                FltCheckLockForReadAccess, FltFreeFileLock, FltGetRequestorProcess, FltProcessFileLock,
                FltStartFiltering,
            },
        },
    },
    Win32::{
        Foundation::{NTSTATUS, STATUS_FILE_LOCK_CONFLICT, STATUS_LOCK_NOT_GRANTED, STATUS_SUCCESS, UNICODE_STRING},
        Storage::FileSystem::{FILE_READ_DATA, FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_WRITE_DATA},
    },
};

fn setup() {
    let root = io::fresh_root("locks");
    std::fs::write(root.join("data.bin"), b"0123456789").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
}

fn open_as(name: &str) -> iomgr::Handle {
    let app = process::create(
        &format!(r"\Device\HarddiskVolume1\{name}.exe"),
        process::Token { user: name.into(), admin: false },
    );
    let params = iomgr::OpenParams {
        desired_access: FILE_READ_DATA | FILE_WRITE_DATA,
        share_access: FILE_SHARE_READ | FILE_SHARE_WRITE,
        ..Default::default()
    };
    process::run_as(&app, || iomgr::create(r"C:\data.bin", &params)).expect("open")
}

scenario! {
    /// Exclusive locks keep other handles out of the range until the owner unlocks or closes; a shared lock keeps
    /// even its owner from writing.
    fn the_file_systems_locks_arbitrate_between_handles() {
        setup();
        let a = open_as("alice");
        let b = open_as("bob");
        iomgr::lock(&a, 0, 4, 0, true).expect("exclusive lock");
        assert_eq!(iomgr::lock(&b, 2, 1, 0, false), Err(STATUS_LOCK_NOT_GRANTED));
        assert_eq!(iomgr::read(&b, Some(0), 4), Err(STATUS_FILE_LOCK_CONFLICT));
        assert_eq!(iomgr::read(&b, Some(4), 2).expect("outside the range"), b"45");
        assert_eq!(iomgr::read(&a, Some(0), 4).expect("the owner reads"), b"0123");
        iomgr::unlock(&a, 0, 4, 0).expect("unlock");
        assert_eq!(iomgr::read(&b, Some(0), 4).expect("unlocked"), b"0123");
        iomgr::lock(&a, 6, 2, 0, false).expect("shared lock");
        assert_eq!(iomgr::write(&a, Some(6), b"xx"), Err(STATUS_FILE_LOCK_CONFLICT));
        iomgr::lock(&a, 0, 1, 0, true).expect("another lock");
        iomgr::close(a);
        assert_eq!(iomgr::write(&b, Some(0), b"Z").expect("cleanup released alice's locks"), 1);
        assert!(take_reports().is_empty());
    }
}

static FILTER: AtomicIsize = AtomicIsize::new(0);
static LOCK: AtomicIsize = AtomicIsize::new(0);
static LEAK: AtomicU8 = AtomicU8::new(0);

unsafe extern "system" fn pre_lock(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: this filter's lock and the lock operation's data.
    unsafe { FltProcessFileLock(LOCK.load(Ordering::SeqCst) as *const FILE_LOCK, data, std::ptr::null()) }
}

unsafe extern "system" fn pre_read(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: this filter's lock and the read's data.
    if unsafe { FltCheckLockForReadAccess(LOCK.load(Ordering::SeqCst) as *const FILE_LOCK, data) } {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    // SAFETY: the read's data, completed here.
    let data = unsafe { &mut *data };
    data.IoStatus.Anonymous.Status = STATUS_FILE_LOCK_CONFLICT;
    FLT_PREOP_COMPLETE
}

unsafe extern "system" fn pre_cleanup(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: the cleanup's data.
    let process = unsafe { FltGetRequestorProcess(data) };
    // SAFETY: and its related objects.
    let file_object = unsafe { (*objects).FileObject };
    // SAFETY: this filter's lock; the closing handle's file object and process.
    unsafe {
        FsRtlFastUnlockAll(LOCK.load(Ordering::SeqCst) as *const FILE_LOCK, file_object, process, std::ptr::null())
    };
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 4]> = Table([
    operation(17, Some(pre_lock), None),
    operation(3, Some(pre_read), None),
    operation(18, Some(pre_cleanup), None),
    operation(END, None, None),
]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, _path: *const UNICODE_STRING) -> NTSTATUS {
    // SAFETY: the loader's driver object.
    let filter = match unsafe { register(driver, &REGISTRATION, &FILTER) } {
        Ok(filter) => filter,
        Err(status) => return status,
    };
    // SAFETY: no preconditions.
    LOCK.store(unsafe { FltAllocateFileLock(None, None) } as isize, Ordering::SeqCst);
    // SAFETY: a registered filter.
    unsafe { FltStartFiltering(filter) }
}

unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
    if LEAK.load(Ordering::SeqCst) == 0 {
        // SAFETY: the lock allocated in DriverEntry, freed once.
        unsafe { FltFreeFileLock(LOCK.load(Ordering::SeqCst) as *const FILE_LOCK) };
    }
    unregister(&FILTER);
    STATUS_SUCCESS
}

scenario! {
    /// A filter that keeps a file's locks itself completes lock requests with FltProcessFileLock, refuses reads
    /// that conflict, and releases a handle's locks at cleanup.
    fn a_filter_keeps_a_files_locks_itself() {
        setup();
        fltsim::registry::install_minifilter_service("locktest", "Lock Instance", "134000");
        let mut driver = fltsim::load("locktest", driver_entry).expect("load");
        let a = open_as("alice");
        let b = open_as("bob");
        iomgr::lock(&a, 0, 4, 0, true).expect("the filter grants it");
        assert_eq!(iomgr::lock(&b, 0, 1, 0, true), Err(STATUS_LOCK_NOT_GRANTED));
        assert_eq!(iomgr::read(&b, Some(0), 2), Err(STATUS_FILE_LOCK_CONFLICT), "the filter refuses the read");
        iomgr::close(a);
        assert_eq!(iomgr::read(&b, Some(0), 2).expect("released at cleanup"), b"01");
        iomgr::close(b);
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    fn a_file_lock_never_freed_is_reported_at_unload() {
        setup();
        LEAK.store(1, Ordering::SeqCst);
        fltsim::registry::install_minifilter_service("locktest", "Lock Instance", "134000");
        let mut driver = fltsim::load("locktest", driver_entry).expect("load");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::FileLockLeak]);
    }
}
