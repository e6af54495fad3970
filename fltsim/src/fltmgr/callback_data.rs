//! Filter-built operations: `FltAllocateCallbackData`, `FltPerformSynchronousIo`, `FltPerformAsynchronousIo`,
//! `FltFreeCallbackData`, and the information routines `FltQueryInformationFile` / `FltSetInformationFile`, and `FltFlushBuffers` /
//! `FltFlushBuffers2`.
//!
//! The operation a filter builds enters the stack below its instance, like every other filter-initiated I/O. The
//! model performs reads, writes (including a write at `FILE_WRITE_TO_END_OF_FILE`, which the file system appends
//! atomically — the documented way to append, since `FltWriteFileEx` does not support that offset), and query and
//! set information; other operations are reported as not modelled yet.
//!
//! `FltPerformAsynchronousIo` sends the operation down the stack in the caller's context, as `FltReadFileEx` with a
//! callback does, and always pends it: the call returns `STATUS_PENDING`, and the callback runs later on a system
//! worker at a seeded IRQL no higher than DISPATCH_LEVEL, through the asynchronous completion machinery of
//! [`super::fileio`] (the request holds a file object reference until the callback returns; I/O outstanding when
//! the filter unloads is [`Rule::AsyncIoOutstandingAtUnload`]). Until the callback runs the data is in flight:
//! freeing it or performing it again is reported. A call that fails still calls the callback, before it returns,
//! as the docs say Filter Manager always does.

use std::{
    collections::BTreeMap,
    ffi::c_void,
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::FILE_OBJECT,
        Storage::FileSystem::{
            FILE_INFORMATION_CLASS,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_FLUSH_TYPE_DATA_SYNC_ONLY, FLT_FLUSH_TYPE_FILE_DATA_ONLY,
                FLT_FLUSH_TYPE_FLUSH_AND_PURGE, FLT_FLUSH_TYPE_NO_SYNC, FLTFL_CALLBACK_DATA_IRP_OPERATION,
                PFLT_COMPLETED_ASYNC_IO_CALLBACK, PFLT_CONTEXT, PFLT_FILTER, PFLT_INSTANCE,
            },
        },
        System::SystemServices::{
            IRP_MJ_CREATE, IRP_MJ_QUERY_INFORMATION, IRP_MJ_READ, IRP_MJ_SET_INFORMATION, IRP_MJ_WRITE,
            IRP_MN_FLUSH_AND_PURGE, IRP_MN_FLUSH_DATA_ONLY, IRP_MN_FLUSH_DATA_SYNC_ONLY, IRP_MN_FLUSH_NO_SYNC,
            IRP_NOCACHE, IRP_PAGING_IO,
        },
    },
    Win32::Foundation::{
        NTSTATUS, STATUS_FILE_CLOSED, STATUS_FLT_INVALID_ASYNCHRONOUS_REQUEST, STATUS_INVALID_PARAMETER,
        STATUS_NOT_IMPLEMENTED, STATUS_SUCCESS,
    },
};

use super::{
    dispatch::{Origin, Request, dispatch, servicing_paging_io},
    fileio,
    instance::filter_and_volume,
    userbuf,
};
use crate::{
    guard::guarded,
    io::{fs, info, iomgr},
    kernel::{irql, thread},
    verifier::{self, Rule},
};

const ALLOCATE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatecallbackdata";
const PERFORM_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltperformsynchronousio";
const PERFORM_ASYNC_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltperformasynchronousio";
const QUERY_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltqueryinformationfile";

/// `FILE_WRITE_TO_END_OF_FILE` as a byte offset.
const WRITE_TO_END_OF_FILE: i64 = -1;
/// `FILE_USE_FILE_POINTER_POSITION` as a byte offset.
const USE_FILE_POINTER_POSITION: i64 = -2;

struct Allocated {
    /// `None` while the operation is in flight (`FltPerformSynchronousIo` or `FltPerformAsynchronousIo`).
    request: Option<Box<Request>>,
    filter: PFLT_FILTER,
    instance: PFLT_INSTANCE,
}

// SAFETY: the request's raw pointers refer to its own boxes and to driver buffers the driver keeps valid.
unsafe impl Send for Allocated {}

static ALLOCATED: Mutex<BTreeMap<usize, Allocated>> = Mutex::new(BTreeMap::new());

fn allocated() -> MutexGuard<'static, BTreeMap<usize, Allocated>> {
    ALLOCATED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `FltAllocateCallbackData`: ≤ APC_LEVEL; an attached instance; an open file object. The data is freed with
/// `FltFreeCallbackData`; data never freed is reported at unload.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatecallbackdata>.
///
/// # Safety
/// Called by driver code: `RetNewCallbackData` must be a valid place for the result.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltAllocateCallbackData(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    ret_new_callback_data: *mut *mut FLT_CALLBACK_DATA,
) -> NTSTATUS {
    const API: &str = "FltAllocateCallbackData";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, ALLOCATE_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        let Some((filter, _)) = filter_and_volume(instance) else {
            verifier::report(Rule::InvalidArgument, API, format!("{instance:#x} is not an attached instance"));
            return STATUS_INVALID_PARAMETER;
        };
        if ret_new_callback_data.is_null() || !iomgr::is_open_file_object(file_object) {
            verifier::report(Rule::InvalidArgument, API, "an open file object and a place for the data are required");
            return STATUS_INVALID_PARAMETER;
        }
        let request = Box::new(
            Request::new(0, file_object.cast_mut(), true)
                .from_origin(Origin { initiator: Some(filter), below: Some(instance) }),
        );
        let data = request.data().cast_mut();
        allocated().insert(data as usize, Allocated { request: Some(request), filter, instance });
        // SAFETY: checked non-NULL; the driver passes a place for the data.
        unsafe { ret_new_callback_data.write(data) };
        STATUS_SUCCESS
    })
}

/// `FltFreeCallbackData`: ≤ DISPATCH_LEVEL; data from `FltAllocateCallbackData`, freed once.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltfreecallbackdata>.
#[unsafe(no_mangle)]
pub extern "system" fn FltFreeCallbackData(callback_data: *const FLT_CALLBACK_DATA) {
    const API: &str = "FltFreeCallbackData";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::DISPATCH, ALLOCATE_DOCS) {
            return;
        }
        let mut all = allocated();
        match all.get(&(callback_data as usize)) {
            None => {
                verifier::report(
                    Rule::InvalidArgument,
                    API,
                    format!("{callback_data:?} is not allocated callback data"),
                );
            }
            Some(slot) if slot.request.is_none() => {
                // Left allocated: the I/O still uses it, and its completion hands it back.
                verifier::report(
                    Rule::InvalidArgument,
                    API,
                    format!(
                        "{callback_data:?} is freed while its I/O is in flight: callback data may be freed or \
                         reused only after the FltPerformAsynchronousIo callback has been called (see {PERFORM_ASYNC_DOCS})"
                    ),
                );
            }
            Some(_) => {
                all.remove(&(callback_data as usize));
            }
        }
    });
}

/// Reads `length` bytes from a driver buffer.
///
/// # Safety
/// `buffer` must hold `length` readable bytes.
unsafe fn driver_bytes(buffer: *const c_void, length: u32) -> Vec<u8> {
    if buffer.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller guarantees the buffer.
    unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), usize::try_from(length).unwrap_or(0)) }.to_vec()
}

/// What the file system does for a filter-built operation.
fn perform(
    api: &'static str,
    request: &mut Request,
    open: fs::OpenId,
    volume: &crate::io::Volume,
    file_object: *mut FILE_OBJECT,
) {
    let major = u32::from(request.iopb().MajorFunction);
    // SAFETY: the file object is open (checked at allocation and again by the caller).
    let current = unsafe { file_object.as_ref() }.map_or(0, |f| f.CurrentByteOffset);
    match major {
        IRP_MJ_READ => {
            // SAFETY: the union holds the Read parameters for IRP_MJ_READ.
            let read = unsafe { request.iopb().Parameters.Read };
            let offset = if read.ByteOffset == USE_FILE_POINTER_POSITION { current } else { read.ByteOffset };
            let Ok(offset) = u64::try_from(offset) else { return request.complete(STATUS_INVALID_PARAMETER, 0) };
            let length = usize::try_from(read.Length).unwrap_or(0);
            let destination = match userbuf::buffer_for(api, read.MdlAddress, read.ReadBuffer, length) {
                Ok(destination) => destination,
                Err(status) => return request.complete(status, 0),
            };
            match fs::read(open, offset, length) {
                Ok(data) => {
                    if !destination.is_null() {
                        // SAFETY: the driver's read buffer (or the MDL's pages) holds `Length` bytes and `data` is
                        // no longer.
                        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), destination, data.len()) };
                    }
                    request.complete(STATUS_SUCCESS, data.len());
                }
                Err(status) => request.complete(status, 0),
            }
        }
        IRP_MJ_WRITE => {
            // SAFETY: the union holds the Write parameters for IRP_MJ_WRITE.
            let write = unsafe { request.iopb().Parameters.Write };
            let source = match userbuf::buffer_for(
                api,
                write.MdlAddress,
                write.WriteBuffer,
                usize::try_from(write.Length).unwrap_or(0),
            ) {
                Ok(source) => source,
                Err(status) => return request.complete(status, 0),
            };
            // SAFETY: the driver's write buffer (or the MDL's pages) holds `Length` bytes.
            let data = unsafe { driver_bytes(source.cast_const().cast(), write.Length) };
            let offset = match write.ByteOffset {
                WRITE_TO_END_OF_FILE => None,
                USE_FILE_POINTER_POSITION => u64::try_from(current).ok(),
                other => match u64::try_from(other) {
                    Ok(at) => Some(at),
                    Err(_) => return request.complete(STATUS_INVALID_PARAMETER, 0),
                },
            };
            match fs::write(open, offset, &data) {
                Ok(n) => request.complete(STATUS_SUCCESS, n),
                Err(status) => request.complete(status, 0),
            }
        }
        IRP_MJ_QUERY_INFORMATION => {
            // SAFETY: the union holds the QueryFileInformation parameters.
            let query = unsafe { request.iopb().Parameters.QueryFileInformation };
            match info::query(open, file_object, query.FileInformationClass, usize::try_from(query.Length).unwrap_or(0))
            {
                Ok(bytes) => {
                    // SAFETY: the driver's buffer holds `Length` bytes, and the answer is no longer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(bytes.as_ptr(), query.InfoBuffer.cast::<u8>(), bytes.len());
                    }
                    request.complete(STATUS_SUCCESS, bytes.len());
                }
                Err(status) => request.complete(status, 0),
            }
        }
        IRP_MJ_SET_INFORMATION => {
            // SAFETY: the union holds the SetFileInformation parameters.
            let set = unsafe { request.iopb().Parameters.SetFileInformation };
            // SAFETY: the driver's buffer holds `Length` bytes.
            let bytes = unsafe { driver_bytes(set.InfoBuffer, set.Length) };
            match info::set(open, file_object, volume, set.FileInformationClass, &bytes) {
                Ok(()) => request.complete(STATUS_SUCCESS, 0),
                Err(status) => request.complete(status, 0),
            }
        }
        other => {
            verifier::report(
                Rule::UnsupportedByModel,
                api,
                format!("major function {other:#04x} is not modelled for filter-built operations yet"),
            );
            request.complete(STATUS_NOT_IMPLEMENTED, 0);
        }
    }
}

/// Takes allocated callback data's request out of its slot for an operation, reporting data that is not allocated
/// or is already in flight. Returns the request, its instance and its filter.
fn take_request(
    api: &'static str,
    callback_data: *const FLT_CALLBACK_DATA,
) -> Option<(Box<Request>, PFLT_INSTANCE, PFLT_FILTER)> {
    let mut all = allocated();
    let Some(slot) = all.get_mut(&(callback_data as usize)) else {
        verifier::report(Rule::InvalidArgument, api, format!("{callback_data:?} is not allocated callback data"));
        return None;
    };
    let Some(request) = slot.request.take() else {
        verifier::report(
            Rule::InvalidArgument,
            api,
            format!(
                "{callback_data:?} is already in flight: callback data may be reused only after its I/O has \
                 completed (for FltPerformAsynchronousIo, after its callback has been called; see {PERFORM_ASYNC_DOCS})"
            ),
        );
        return None;
    };
    Some((request, slot.instance, slot.filter))
}

/// Hands a request back to its allocation once its operation is over; the data may since have been freed (only
/// when the driver broke the rules, which was reported), in which case the request is dropped.
fn give_back(key: usize, request: Box<Request>) {
    if let Some(slot) = allocated().get_mut(&key) {
        slot.request = Some(request);
    }
}

/// Reports a cached read or write built while this thread services paging I/O.
fn check_paging_path(api: &'static str, request: &mut Request) {
    let irp_flags = request.iopb().IrpFlags;
    let major = u32::from(request.iopb().MajorFunction);
    let data_io = major == IRP_MJ_READ || major == IRP_MJ_WRITE;
    let uncached = irp_flags & (IRP_NOCACHE | IRP_PAGING_IO) != 0;
    if data_io && !uncached && servicing_paging_io() {
        verifier::report(
            Rule::CachedIoFromPagingPath,
            api,
            "a cached read or write built while this thread services paging I/O (set IRP_NOCACHE)",
        );
    }
}

/// Sends a built operation down the stack below its allocating instance; it is complete (in `IoStatus`) on return.
fn send(api: &'static str, request: &mut Request, instance: PFLT_INSTANCE) {
    let file_object = request.iopb().TargetFileObject;
    match (iomgr::describe(file_object), filter_and_volume(instance)) {
        (Some(file), Some((_, volume))) if file.handle_open => {
            let open = file.open;
            dispatch(volume, request, |request| match open {
                Some(open) => perform(api, request, open, &file.volume, file_object),
                None => request.complete(STATUS_INVALID_PARAMETER, 0),
            });
        }
        _ => request.complete(STATUS_FILE_CLOSED, 0),
    }
}

/// `FltPerformSynchronousIo`: ≤ APC_LEVEL; data from `FltAllocateCallbackData`, not in flight; the operation enters
/// below the allocating instance and completes before the call returns, in `IoStatus`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltperformsynchronousio>.
#[unsafe(no_mangle)]
pub extern "system" fn FltPerformSynchronousIo(callback_data: *mut FLT_CALLBACK_DATA) {
    const API: &str = "FltPerformSynchronousIo";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, PERFORM_DOCS) {
            return;
        }
        let Some((mut request, instance, _)) = take_request(API, callback_data) else { return };
        check_paging_path(API, &mut request);
        send(API, &mut request, instance);
        give_back(callback_data as usize, request);
    });
}

/// A `PFLT_COMPLETED_ASYNC_IO_CALLBACK` that is not NULL.
type AsyncCallback = unsafe extern "system" fn(*const FLT_CALLBACK_DATA, PFLT_CONTEXT);

/// A built operation in flight through `FltPerformAsynchronousIo`, until its completion hands it back.
struct InFlight {
    key: usize,
    request: Box<Request>,
    callback: AsyncCallback,
    context: usize,
}

/// The completion [`fileio`] runs for `FltPerformAsynchronousIo` (on a system worker, at the IRQL chosen at issue):
/// hands the driver's callback data back to its allocation, so that the callback may free or reuse it, then calls
/// the driver's callback with it. `_carrier` is the completion's own callback data, which the driver never sees.
///
/// # Safety
/// `context` is the `InFlight` that `FltPerformAsynchronousIo` boxed for this completion, passed once.
unsafe extern "system" fn complete_built(_carrier: *const FLT_CALLBACK_DATA, context: PFLT_CONTEXT) {
    // SAFETY: the caller passes the boxed `InFlight` once.
    let in_flight = unsafe { Box::from_raw(context.cast::<InFlight>()) };
    let InFlight { key, request, callback, context } = *in_flight;
    let data = request.data();
    give_back(key, request);
    // SAFETY: the driver's callback and context for this I/O; the data stays allocated until the driver frees it.
    unsafe { callback(data, context as *mut c_void) };
}

/// Fails a `FltPerformAsynchronousIo` at once: completes the data with `status`, hands it back, and calls the
/// callback before returning, as the docs say Filter Manager always calls it. Returns `status`.
fn fail_now(
    key: usize,
    mut request: Box<Request>,
    callback: AsyncCallback,
    context: *const c_void,
    status: NTSTATUS,
) -> NTSTATUS {
    request.complete(status, 0);
    let data = request.data();
    give_back(key, request);
    let before = thread::snapshot();
    // SAFETY: the driver's callback and context for this I/O, with its own callback data.
    unsafe { callback(data, context.cast_mut()) };
    thread::check_balanced("PFLT_COMPLETED_ASYNC_IO_CALLBACK", &before);
    status
}

/// Why a built operation cannot be performed asynchronously, reported; `None` when it can.
fn async_refusal(request: &mut Request) -> Option<NTSTATUS> {
    const API: &str = "FltPerformAsynchronousIo";
    let major = u32::from(request.iopb().MajorFunction);
    let paging_allowed =
        matches!(major, IRP_MJ_READ | IRP_MJ_WRITE | IRP_MJ_QUERY_INFORMATION | IRP_MJ_SET_INFORMATION)
            && request.iopb().IrpFlags & IRP_PAGING_IO != 0;
    // PASSIVE_LEVEL, or APC_LEVEL for paging I/O (of the four majors for which IRP_PAGING_IO is valid).
    let max = if paging_allowed { irql::APC } else { irql::PASSIVE };
    if !thread::require_irql_at_most(API, max, PERFORM_ASYNC_DOCS) {
        return Some(STATUS_INVALID_PARAMETER);
    }
    // SAFETY: the request's callback data is its own box, alive while the request is.
    let flags = unsafe { (*request.data()).Flags };
    if flags & FLTFL_CALLBACK_DATA_IRP_OPERATION == 0 {
        verifier::report(
            Rule::InvalidArgument,
            API,
            "minifilters can initiate only IRP-based operations, not fast I/O or file system filter operations",
        );
        return Some(STATUS_INVALID_PARAMETER);
    }
    if major == IRP_MJ_CREATE {
        verifier::report(Rule::InvalidArgument, API, "IRP_MJ_CREATE requests cannot be performed asynchronously");
        return Some(STATUS_FLT_INVALID_ASYNCHRONOUS_REQUEST);
    }
    None
}

/// `FltPerformAsynchronousIo`: data from `FltAllocateCallbackData`, not in flight; a `CallbackRoutine`;
/// PASSIVE_LEVEL, or ≤ APC_LEVEL when `IRP_PAGING_IO` is set on a read, write, query or set information; an
/// IRP-based operation other than `IRP_MJ_CREATE` (which fails with `STATUS_FLT_INVALID_ASYNCHRONOUS_REQUEST`).
/// The operation enters below the allocating instance in the caller's context and the call returns
/// `STATUS_PENDING`; later, on a system worker at a seeded IRQL ≤ DISPATCH_LEVEL, the callback gets the data with
/// the final `IoStatus` (see the [module docs](self)). A call that fails has called the callback when it returns.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltperformasynchronousio>.
///
/// # Safety
/// Called by driver code: the buffers the operation's parameters name stay valid until the callback has run.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltPerformAsynchronousIo(
    callback_data: *mut FLT_CALLBACK_DATA,
    callback_routine: PFLT_COMPLETED_ASYNC_IO_CALLBACK,
    callback_context: *const c_void,
) -> NTSTATUS {
    const API: &str = "FltPerformAsynchronousIo";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let Some(callback) = callback_routine else {
            verifier::report(Rule::InvalidArgument, API, "CallbackRoutine is required and cannot be NULL");
            return STATUS_INVALID_PARAMETER;
        };
        let key = callback_data as usize;
        let Some((mut request, instance, filter)) = take_request(API, callback_data) else {
            return STATUS_INVALID_PARAMETER;
        };
        if let Some(status) = async_refusal(&mut request) {
            return fail_now(key, request, callback, callback_context, status);
        }
        let file_object = request.iopb().TargetFileObject;
        let Some(handle) = iomgr::handle_of(file_object) else {
            return fail_now(key, request, callback, callback_context, STATUS_FILE_CLOSED);
        };
        check_paging_path(API, &mut request);
        send(API, &mut request, instance);
        let major = request.iopb().MajorFunction;
        // What the completion machinery completes: a carrier for the status; the driver's data rides in the context.
        let mut carrier = Request::new(major, file_object, true);
        carrier.complete(request.status(), request.information());
        let context = Box::into_raw(Box::new(InFlight { key, request, callback, context: callback_context as usize }));
        fileio::pend(API, filter, &handle, carrier, None, complete_built, context.cast_const().cast())
    })
}

/// Reports callback data `filter` allocated and never freed; called when its driver unloads.
pub(crate) fn report_leaks(filter: PFLT_FILTER, after: &str) {
    let count = allocated().values().filter(|a| a.filter == filter).count();
    if count > 0 {
        verifier::report(
            Rule::CallbackDataLeak,
            "FltFreeCallbackData",
            format!("{count} callback data never freed after {after}"),
        );
    }
}

fn information_target(
    api: &'static str,
    docs: &'static str,
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
) -> Option<(iomgr::Handle, PFLT_FILTER)> {
    if !thread::require_irql_at_most(api, irql::PASSIVE, docs) {
        return None;
    }
    let Some((filter, _)) = filter_and_volume(instance) else {
        verifier::report(Rule::InvalidArgument, api, format!("{instance:#x} is not an attached instance"));
        return None;
    };
    let Some(handle) = iomgr::handle_of(file_object) else {
        verifier::report(Rule::InvalidArgument, api, format!("{file_object:?} is not an open file object"));
        return None;
    };
    Some((handle, filter))
}

/// `FltQueryInformationFile`: PASSIVE_LEVEL; an attached instance (the query enters below it); an open file
/// object; the class's and the file system's answers.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltqueryinformationfile>.
///
/// # Safety
/// Called by driver code: `FileInformation` must hold `Length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltQueryInformationFile(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    file_information: *mut c_void,
    length: u32,
    file_information_class: FILE_INFORMATION_CLASS,
    length_returned: *mut u32,
) -> NTSTATUS {
    const API: &str = "FltQueryInformationFile";
    const DOCS: &str = QUERY_DOCS;
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let Some((handle, filter)) = information_target(API, DOCS, instance, file_object) else {
            return STATUS_INVALID_PARAMETER;
        };
        let origin = Origin { initiator: Some(filter), below: Some(instance) };
        match iomgr::query_from(&handle, file_information_class, length, origin, true) {
            Ok(bytes) => {
                // SAFETY: the driver's buffer holds `Length` bytes, and the answer is no longer.
                unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), file_information.cast::<u8>(), bytes.len()) };
                if !length_returned.is_null() {
                    // SAFETY: the driver passes a place for the length.
                    unsafe { length_returned.write(u32::try_from(bytes.len()).unwrap_or(u32::MAX)) };
                }
                STATUS_SUCCESS
            }
            Err(status) => status,
        }
    })
}

/// `FltSetInformationFile`: PASSIVE_LEVEL; an attached instance (the set enters below it); an open file object.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetinformationfile>.
///
/// # Safety
/// Called by driver code: `FileInformation` must hold `Length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltSetInformationFile(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    file_information: *const c_void,
    length: u32,
    file_information_class: FILE_INFORMATION_CLASS,
) -> NTSTATUS {
    const API: &str = "FltSetInformationFile";
    const DOCS: &str =
        "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetinformationfile";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let Some((handle, filter)) = information_target(API, DOCS, instance, file_object) else {
            return STATUS_INVALID_PARAMETER;
        };
        // SAFETY: the driver's buffer holds `Length` bytes.
        let bytes = unsafe { driver_bytes(file_information, length) };
        let origin = Origin { initiator: Some(filter), below: Some(instance) };
        match iomgr::set_from(&handle, file_information_class, &bytes, origin, true) {
            Ok(()) => STATUS_SUCCESS,
            Err(status) => status,
        }
    })
}

/// `FltFlushBuffers`: PASSIVE_LEVEL; an attached instance (the flush enters below it); an open file object; a full
/// flush (`FltFlushBuffers2` with type 0).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltflushbuffers>.
#[unsafe(no_mangle)]
pub extern "system" fn FltFlushBuffers(instance: PFLT_INSTANCE, file_object: *const FILE_OBJECT) -> NTSTATUS {
    const API: &str = "FltFlushBuffers";
    const DOCS: &str =
        "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltflushbuffers";
    guarded(API, STATUS_INVALID_PARAMETER, || flush(API, DOCS, instance, file_object, 0))
}

/// `FltFlushBuffers2`: as `FltFlushBuffers`, with a flush type that must be 0 or one `FLT_FLUSH_TYPE_*` value
/// (others are reported); it reaches the file system as the `IRP_MN_FLUSH_*` minor function. The optional callback
/// data only propagates IRP extensions, which the model does not have.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltflushbuffers2>.
#[unsafe(no_mangle)]
pub extern "system" fn FltFlushBuffers2(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    flush_type: u32,
    _callback_data: *const FLT_CALLBACK_DATA,
) -> NTSTATUS {
    const API: &str = "FltFlushBuffers2";
    const DOCS: &str =
        "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltflushbuffers2";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let minor = match flush_type {
            0 => 0,
            FLT_FLUSH_TYPE_FLUSH_AND_PURGE => IRP_MN_FLUSH_AND_PURGE,
            FLT_FLUSH_TYPE_FILE_DATA_ONLY => IRP_MN_FLUSH_DATA_ONLY,
            FLT_FLUSH_TYPE_NO_SYNC => IRP_MN_FLUSH_NO_SYNC,
            FLT_FLUSH_TYPE_DATA_SYNC_ONLY => IRP_MN_FLUSH_DATA_SYNC_ONLY,
            other => {
                verifier::report(
                    Rule::InvalidArgument,
                    API,
                    format!("FlushType {other:#x} is not a FLT_FLUSH_TYPE_* value"),
                );
                return STATUS_INVALID_PARAMETER;
            }
        };
        flush(API, DOCS, instance, file_object, u8::try_from(minor).unwrap_or(0))
    })
}

fn flush(
    api: &'static str,
    docs: &'static str,
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    minor: u8,
) -> NTSTATUS {
    let Some((handle, filter)) = information_target(api, docs, instance, file_object) else {
        return STATUS_INVALID_PARAMETER;
    };
    let origin = Origin { initiator: Some(filter), below: Some(instance) };
    iomgr::flush_from(&handle, minor, origin, true).err().unwrap_or(STATUS_SUCCESS)
}
