//! A filter that pends every create from user mode and replays it from a system worker (a deferred-I/O work item),
//! as antivirus and HSM filters do. Below it, the create continues in the worker's context: the System process, a
//! worker thread — where an access check the filter below forces would be made as SYSTEM unless it impersonates the
//! requestor.

use std::{
    ffi::c_void,
    sync::atomic::{AtomicUsize, Ordering},
};

use windows_sys::Wdk::{
    Storage::FileSystem::Minifilters::{
        FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_PENDING,
        FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltAllocateDeferredIoWorkItem,
        FltCompletePendedPreOperation, FltFreeDeferredIoWorkItem, FltQueueDeferredIoWorkItem,
        PFLT_DEFERRED_IO_WORKITEM,
    },
    System::SystemServices::DelayedWorkQueue,
};

use super::build::{END, Table, operation, registration};
use crate::{LoadError, LoadedDriver, registry};

/// The service name.
pub const SERVICE: &str = "fltsim-poster";

/// Its altitude: in the antivirus range, far above Shunt's.
pub const ALTITUDE: &str = "328000";

static REPLAYED: AtomicUsize = AtomicUsize::new(0);

/// How many creates it replayed from a worker.
#[must_use]
pub fn replayed() -> usize {
    REPLAYED.load(Ordering::SeqCst)
}

unsafe extern "system" fn replay(
    item: PFLT_DEFERRED_IO_WORKITEM,
    data: *const FLT_CALLBACK_DATA,
    _context: *const c_void,
) {
    REPLAYED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the pended create's data, handed to this routine.
    unsafe { FltCompletePendedPreOperation(data, FLT_PREOP_SUCCESS_NO_CALLBACK, std::ptr::null()) };
    // SAFETY: the item this routine was queued with, freed once.
    unsafe { FltFreeDeferredIoWorkItem(item) };
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    if unsafe { (*data).RequestorMode } == 0 {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    // SAFETY: no preconditions.
    let item = unsafe { FltAllocateDeferredIoWorkItem() };
    // SAFETY: an allocated item and the create's own data.
    let status = unsafe { FltQueueDeferredIoWorkItem(item, data, Some(replay), DelayedWorkQueue, std::ptr::null()) };
    if status < 0 {
        // Posting is refused here (a top-level IRP, say): let the create go on in this thread.
        // SAFETY: the item allocated above, never queued.
        unsafe { FltFreeDeferredIoWorkItem(item) };
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    FLT_PREOP_PENDING
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);
static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

crate::minifilter_entry_points!(REGISTRATION);

/// Installs and loads the poster.
///
/// # Errors
/// The loader's error.
pub fn load() -> Result<LoadedDriver, LoadError> {
    registry::install_minifilter_service(SERVICE, "Poster", ALTITUDE);
    crate::load(SERVICE, driver_entry)
}
