//! A filter that serves a file's byte-range locks itself, as a filter that serves a file's data must: it allocates a
//! lock with `FltAllocateFileLock` (with a completion routine that records every operation it completes), processes
//! every `IRP_MJ_LOCK_CONTROL` with `FltProcessFileLock` (returning what it returns, `FLT_PREOP_PENDING` for a request
//! that must wait), refuses reads that cross another owner's lock (`FltCheckLockForReadAccess`), releases a
//! handle's locks at cleanup (`FsRtlFastUnlockAll`) and frees the lock at unload — unless told to leak it.

use std::{
    ffi::c_void,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicI32, AtomicIsize, AtomicUsize, Ordering},
    },
};

use windows_sys::{
    Wdk::{
        Foundation::DRIVER_OBJECT,
        Storage::FileSystem::{
            FILE_LOCK, FsRtlFastUnlockAll,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE,
                FLT_PREOP_PENDING, FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
                FltAllocateFileLock, FltCheckLockForReadAccess, FltFreeFileLock, FltGetRequestorProcess,
                FltProcessFileLock, FltStartFiltering,
            },
        },
        System::SystemServices::IRP_MN_LOCK,
    },
    Win32::Foundation::{NTSTATUS, STATUS_FILE_LOCK_CONFLICT, STATUS_SUCCESS, UNICODE_STRING},
};

use super::build::{END, Table, operation, register, registration, unregister};
use crate::{LoadError, LoadedDriver, registry};

/// The service name.
pub const SERVICE: &str = "fltsim-locker";

/// Its altitude.
pub const ALTITUDE: &str = "134000";

static FILTER: AtomicIsize = AtomicIsize::new(0);
static LOCK: AtomicIsize = AtomicIsize::new(0);
static LEAK: AtomicBool = AtomicBool::new(false);
static FAIL_IMMEDIATELY: Mutex<Vec<bool>> = Mutex::new(Vec::new());
static COMPLETED: Mutex<Vec<NTSTATUS>> = Mutex::new(Vec::new());
static PENDED: AtomicUsize = AtomicUsize::new(0);
/// What the completion routine answers (`STATUS_SUCCESS` unless a test asks for a failure).
static COMPLETION_ANSWER: AtomicI32 = AtomicI32::new(STATUS_SUCCESS);

/// Every lock request's `FailImmediately`, as the filter saw it, in order.
#[must_use]
pub fn fail_immediately_seen() -> Vec<bool> {
    FAIL_IMMEDIATELY.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// The status of every operation the lock's completion routine saw, in order.
#[must_use]
pub fn completed() -> Vec<NTSTATUS> {
    COMPLETED.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// How many lock requests `FltProcessFileLock` pended.
#[must_use]
pub fn pended() -> usize {
    PENDED.load(Ordering::SeqCst)
}

/// Makes the completion routine answer `status` for every operation it sees from now on.
pub fn answer_completions_with(status: NTSTATUS) {
    COMPLETION_ANSWER.store(status, Ordering::SeqCst);
}

/// Makes the unload callback leave the lock allocated (a deliberately wrong filter).
pub fn leak_lock_at_unload() {
    LEAK.store(true, Ordering::SeqCst);
}

fn file_lock() -> *const FILE_LOCK {
    std::ptr::with_exposed_provenance(LOCK.load(Ordering::SeqCst).cast_unsigned())
}

unsafe extern "system" fn complete_lock(_context: *const c_void, data: *const FLT_CALLBACK_DATA) -> NTSTATUS {
    // SAFETY: Filter Manager passes the lock operation being completed.
    let data = unsafe { &*data };
    // SAFETY: every member of the status union is an NTSTATUS-sized integer.
    let status = unsafe { data.IoStatus.Anonymous.Status };
    COMPLETED.lock().unwrap_or_else(PoisonError::into_inner).push(status);
    COMPLETION_ANSWER.load(Ordering::SeqCst)
}

unsafe extern "system" fn pre_lock(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: the lock operation's data.
    let iopb = unsafe { &*data }.Iopb;
    // SAFETY: and its parameter block.
    let iopb = unsafe { &*iopb };
    if u32::from(iopb.MinorFunction) == IRP_MN_LOCK {
        // SAFETY: the union holds the LockControl parameters for IRP_MJ_LOCK_CONTROL.
        let fail_immediately = unsafe { iopb.Parameters.LockControl.FailImmediately };
        FAIL_IMMEDIATELY.lock().unwrap_or_else(PoisonError::into_inner).push(fail_immediately);
    }
    // SAFETY: this filter's lock and the lock operation's data.
    let status = unsafe { FltProcessFileLock(file_lock(), data, std::ptr::null()) };
    if status == FLT_PREOP_PENDING {
        PENDED.fetch_add(1, Ordering::SeqCst);
    }
    // SAFETY: the completion context slot of this call; none is passed.
    unsafe { *context = std::ptr::null_mut() };
    status
}

unsafe extern "system" fn pre_read(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: this filter's lock and the read's data.
    if unsafe { FltCheckLockForReadAccess(file_lock(), data) } {
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
    unsafe { FsRtlFastUnlockAll(file_lock(), file_object, process, std::ptr::null()) };
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

/// `IRP_MJ_LOCK_CONTROL`, `IRP_MJ_READ` and `IRP_MJ_CLEANUP`.
const IRP_MJ_LOCK_CONTROL: u8 = 17;
const IRP_MJ_READ: u8 = 3;
const IRP_MJ_CLEANUP: u8 = 18;

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 4]> = Table([
    operation(IRP_MJ_LOCK_CONTROL, Some(pre_lock), None),
    operation(IRP_MJ_READ, Some(pre_read), None),
    operation(IRP_MJ_CLEANUP, Some(pre_cleanup), None),
    operation(END, None, None),
]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, _path: *const UNICODE_STRING) -> NTSTATUS {
    // SAFETY: the loader's driver object.
    let filter = match unsafe { register(driver, &REGISTRATION, &FILTER) } {
        Ok(filter) => filter,
        Err(status) => return status,
    };
    // SAFETY: no preconditions; the routine lives as long as the driver.
    let lock = unsafe { FltAllocateFileLock(Some(complete_lock), None) };
    LOCK.store(lock.expose_provenance().cast_signed(), Ordering::SeqCst);
    // SAFETY: a registered filter.
    unsafe { FltStartFiltering(filter) }
}

unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
    if !LEAK.load(Ordering::SeqCst) {
        // SAFETY: the lock allocated in DriverEntry, freed once.
        unsafe { FltFreeFileLock(file_lock()) };
    }
    unregister(&FILTER);
    STATUS_SUCCESS
}

/// Installs and loads the locker.
///
/// # Errors
/// The loader's error.
pub fn load() -> Result<LoadedDriver, LoadError> {
    registry::install_minifilter_service(SERVICE, "Locker", ALTITUDE);
    crate::load(SERVICE, driver_entry)
}
