//! A filter that remembers the file objects of the files a test names and, on request, reads them through the
//! stack below itself from a chosen context: at PASSIVE_LEVEL, at APC_LEVEL, inside a guarded region, or with a
//! top-level IRP set. It uses `FltAllocateCallbackData` and `FltPerformSynchronousIo`, which the docs allow up to
//! APC_LEVEL, so the filter below sees reads in exactly those contexts.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::{Mutex, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::FILE_OBJECT,
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_FINISHED_PROCESSING,
            FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
            FltAllocateCallbackData, FltFreeCallbackData, FltPerformSynchronousIo, PFLT_INSTANCE,
        },
    },
    Win32::Foundation::{NTSTATUS, STATUS_INVALID_PARAMETER},
};

use super::build::{END, Table, operation, registration};
use crate::{
    LoadError, LoadedDriver,
    io::mm::FSRTL_CACHE_TOP_LEVEL_IRP,
    kernel::{irql, thread},
    registry,
};

/// The service name.
pub const SERVICE: &str = "fltsim-context-reader";

/// Its altitude: in the HSM range, above Shunt's.
pub const ALTITUDE: &str = "185000";

/// Where the read is issued from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    /// PASSIVE_LEVEL, APCs enabled, no top-level IRP.
    Passive,
    /// APC_LEVEL.
    ApcLevel,
    /// A guarded region at PASSIVE_LEVEL (all kernel APCs off).
    GuardedRegion,
    /// PASSIVE_LEVEL with `FSRTL_CACHE_TOP_LEVEL_IRP` as the top-level IRP.
    TopLevelIrp,
}

/// The last opened file object and the instance that saw it.
static LAST: Mutex<Option<(usize, PFLT_INSTANCE)>> = Mutex::new(None);

unsafe extern "system" fn pre_create(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    FLT_PREOP_SUCCESS_WITH_CALLBACK
}

unsafe extern "system" fn post_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let data = unsafe { &*data };
    // SAFETY: a completed create's status.
    let status = unsafe { data.IoStatus.Anonymous.Status };
    // SAFETY: Filter Manager's related objects.
    let objects = unsafe { &*objects };
    if status >= 0 {
        *LAST.lock().unwrap_or_else(PoisonError::into_inner) = Some((objects.FileObject as usize, objects.Instance));
    }
    FLT_POSTOP_FINISHED_PROCESSING
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), Some(post_create)), operation(END, None, None)]);
static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

crate::minifilter_entry_points!(REGISTRATION);

/// Installs and loads the reader.
///
/// # Errors
/// The loader's error.
pub fn load() -> Result<LoadedDriver, LoadError> {
    registry::install_minifilter_service(SERVICE, "Context Reader", ALTITUDE);
    crate::load(SERVICE, driver_entry)
}

/// Reads `length` bytes at `offset` of the file most recently opened (while it is still open), from `context`,
/// through the filters below this one. Returns the status and the bytes read.
#[must_use]
pub fn read(offset: i64, length: u32, context: Context) -> (NTSTATUS, Vec<u8>) {
    let Some((file_object, instance)) = *LAST.lock().unwrap_or_else(PoisonError::into_inner) else {
        return (STATUS_INVALID_PARAMETER, Vec::new());
    };
    let mut buffer = vec![0u8; usize::try_from(length).unwrap_or(0)];
    let issue = move || {
        let mut data: *mut FLT_CALLBACK_DATA = null_mut();
        // SAFETY: this filter's instance, a file object it saw opened, a place for the data.
        let status = unsafe { FltAllocateCallbackData(instance, file_object as *const FILE_OBJECT, &raw mut data) };
        if status < 0 {
            return (status, Vec::new());
        }
        // SAFETY: the data belongs to this filter until it frees it.
        let block = unsafe { (*data).Iopb.cast_mut() };
        // SAFETY: and so does its parameter block.
        let iopb = unsafe { &mut *block };
        iopb.MajorFunction = 3; // IRP_MJ_READ
        iopb.Parameters.Read.Length = length;
        iopb.Parameters.Read.ByteOffset = offset;
        iopb.Parameters.Read.ReadBuffer = buffer.as_mut_ptr().cast();
        // SAFETY: allocated and filled in above.
        unsafe { FltPerformSynchronousIo(data) };
        // SAFETY: the completed data.
        let done = unsafe { &*data };
        // SAFETY: a completed operation's status.
        let status = unsafe { done.IoStatus.Anonymous.Status };
        let read = done.IoStatus.Information;
        // SAFETY: the data allocated above, freed once.
        unsafe { FltFreeCallbackData(data) };
        buffer.truncate(if status >= 0 { read } else { 0 });
        (status, buffer)
    };
    match context {
        Context::Passive => issue(),
        Context::ApcLevel => thread::at_irql(irql::APC, issue),
        Context::GuardedRegion => thread::in_guarded_region(issue),
        Context::TopLevelIrp => thread::with_top_level_irp(FSRTL_CACHE_TOP_LEVEL_IRP, issue),
    }
}
