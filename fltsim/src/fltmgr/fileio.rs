//! Filter-initiated file I/O: `FltCreateFileEx2`, `FltClose`, `FltReadFileEx`, `FltWriteFileEx` and the object
//! references of the file objects they hand out (`ObfReferenceObject`, `ObfDereferenceObject`).
//!
//! The create and every read and write on its file object enter the volume's stack *below* the given instance, so
//! only lower filters and the file system see them; with a NULL instance the create enters at the top. I/O that
//! reaches the initiating filter's own instance is reported ([`Rule::ReentrantIo`], in
//! [`super::dispatch`]). Handles and file objects a driver opened and did not release are reported when it
//! unloads (`report_leaks`).
//!
//! With a `CallbackRoutine`, `FltReadFileEx` and `FltWriteFileEx` are asynchronous. The model sends the request
//! down the stack in the caller's context, as Filter Manager does, and always pends it: the call returns
//! `STATUS_PENDING` and the completion (the data copied into the caller's buffer for a read, the callback data's
//! `IoStatus`, the callback) runs later on a system worker thread, at a seeded IRQL among PASSIVE_LEVEL,
//! APC_LEVEL and DISPATCH_LEVEL as post-operation callbacks are
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_completed_async_io_callback>).
//! A filter that unloads with such I/O outstanding is reported ([`Rule::AsyncIoOutstandingAtUnload`]);
//! [`hold_async_completions`] lets a test keep completions back to make that case deterministic.

use std::{
    collections::BTreeMap,
    ffi::c_void,
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::{FILE_OBJECT, MDL, OBJECT_ATTRIBUTES},
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLTFL_IO_OPERATION_DO_NOT_UPDATE_BYTE_OFFSET, FLTFL_IO_OPERATION_NON_CACHED,
            PFLT_COMPLETED_ASYNC_IO_CALLBACK, PFLT_CONTEXT, PFLT_FILTER, PFLT_INSTANCE,
        },
        System::SystemServices::{IO_DRIVER_CREATE_CONTEXT, IO_FORCE_ACCESS_CHECK},
    },
    Win32::{
        Foundation::{
            HANDLE, NTSTATUS, OBJ_KERNEL_HANDLE, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
            STATUS_OBJECT_PATH_NOT_FOUND, STATUS_PENDING, STATUS_SUCCESS, UNICODE_STRING,
        },
        System::IO::IO_STATUS_BLOCK,
    },
};

use super::{
    dispatch::{Origin, Request, random_post_irql},
    instance::filter_and_volume,
    registration::filters,
};
use crate::{
    guard::guarded,
    io::{Volume, iomgr, volumes},
    kernel::{irql, thread, work},
    verifier::{self, Rule},
};

const FLTCREATEFILEEX2: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcreatefileex2";
const FLTCLOSE: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltclose";
const FLTREADFILEEX: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltreadfileex";
const FLTWRITEFILEEX: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltwritefileex";
const OBDEREFERENCEOBJECT: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-obdereferenceobject";

/// `FILE_WRITE_TO_END_OF_FILE` as a 64-bit byte offset (LowPart 0xFFFFFFFF, HighPart -1).
const WRITE_TO_END_OF_FILE: i64 = -1;

struct KernelHandles {
    next: usize,
    /// Handle value → (model open, the filter that opened it).
    handles: BTreeMap<usize, (u64, PFLT_FILTER)>,
}

static HANDLES: Mutex<Option<KernelHandles>> = Mutex::new(None);

fn handles() -> MutexGuard<'static, Option<KernelHandles>> {
    HANDLES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Registers `handle` as a new kernel handle opened by `filter` and returns its value.
pub(crate) fn new_kernel_handle(handle: &iomgr::Handle, filter: PFLT_FILTER) -> usize {
    with_handles(|h| {
        h.next = h.next.saturating_add(4);
        let value = 0xFFFF_8000_0000_0000_usize | h.next;
        h.handles.insert(value, (handle.id(), filter));
        value
    })
}

/// The open behind a kernel handle value.
pub(crate) fn kernel_handle(value: usize) -> Option<iomgr::Handle> {
    with_handles(|h| h.handles.get(&value).map(|(id, _)| iomgr::Handle::from_id(*id)))
}

/// Removes a kernel handle, returning its open.
pub(crate) fn remove_kernel_handle(value: usize) -> Option<iomgr::Handle> {
    with_handles(|h| h.handles.remove(&value).map(|(id, _)| iomgr::Handle::from_id(id)))
}

fn with_handles<T>(f: impl FnOnce(&mut KernelHandles) -> T) -> T {
    f(handles().get_or_insert_with(|| KernelHandles { next: 0, handles: BTreeMap::new() }))
}

/// Reads a `UNICODE_STRING` a driver passed.
///
/// # Safety
/// `s` must be NULL or point to a valid `UNICODE_STRING` whose buffer holds `Length` bytes.
unsafe fn read_unicode(s: *const UNICODE_STRING) -> Option<String> {
    // SAFETY: the caller guarantees `s` is NULL or valid.
    let s = unsafe { s.as_ref() }?;
    if s.Buffer.is_null() {
        return None;
    }
    // SAFETY: the buffer holds `Length` bytes, i.e. `Length / 2` UTF-16 units.
    let units = unsafe { std::slice::from_raw_parts(s.Buffer, usize::from(s.Length / 2)) };
    Some(String::from_utf16_lossy(units))
}

/// Resolves a kernel object name (`\??\C:\dir\file`, `\DosDevices\C:\...`, `\Device\HarddiskVolumeN\...`,
/// `\??\Volume{GUID}\...`) to a volume and the path within it.
pub(crate) fn resolve_object_name(name: &str) -> Result<(Volume, String), NTSTATUS> {
    let lower = name.to_ascii_lowercase();
    let rest_after = |prefix_len: usize| name.get(prefix_len..).unwrap_or("");
    for volume in volumes() {
        let device = volume.device_name.to_ascii_lowercase();
        let guid = volume.guid_name.to_ascii_lowercase();
        for prefix in [device, guid] {
            if lower.starts_with(&prefix) && matches!(lower.as_bytes().get(prefix.len()), None | Some(b'\\')) {
                let rest = rest_after(prefix.len());
                return Ok((volume, if rest.is_empty() { "\\".to_owned() } else { rest.to_owned() }));
            }
        }
        if let Some(letter) = volume.spec.drive_letter {
            for dos in ["\\??\\", "\\dosdevices\\", "\\global??\\"] {
                let prefix = format!("{dos}{}:", letter.to_ascii_lowercase());
                if lower.starts_with(&prefix) {
                    let rest = rest_after(prefix.len());
                    return Ok((volume, if rest.is_empty() { "\\".to_owned() } else { rest.to_owned() }));
                }
            }
        }
    }
    Err(STATUS_OBJECT_PATH_NOT_FOUND)
}

/// The context checks of the routines that enter a file system: PASSIVE_LEVEL for all of them; for creates also no
/// top-level IRP and APCs enabled, which the create pages document. Returns whether the IRQL allows the call.
fn check_context(api: &'static str, docs: &'static str, create_rules: bool) -> bool {
    if !thread::require_irql_at_most(api, irql::PASSIVE, docs) {
        return false;
    }
    let state = thread::snapshot();
    if create_rules && state.top_level_irp != 0 {
        verifier::report(
            Rule::TopLevelIrpSet,
            api,
            "called while IoGetTopLevelIrp() is non-NULL: the thread may hold file-system resources, which can \
             deadlock the system",
        );
    }
    if create_rules && (state.all_apcs_disabled() || state.apcs_disabled()) {
        verifier::report(
            Rule::ApcsDisabled,
            api,
            "called with APCs disabled (critical or guarded region, or APC_LEVEL); FltCreateFile's page forbids \
             it, and the model applies it to FltCreateFileEx2 too (stricter than documented for Ex2)",
        );
    }
    true
}

/// `FltCreateFileEx2`.
///
/// Rules: PASSIVE_LEVEL; not while a top-level IRP is set; not with APCs disabled (documented for FltCreateFile;
/// applied to Ex2 too, stricter, said so); `Instance`, when given, is an attached instance of `Filter` on the
/// volume named; `OBJ_KERNEL_HANDLE` in the object attributes (the docs require it outside the System process;
/// the model requires it always, stricter); a create on behalf of a user-mode request (called from a callback for
/// one) must ask for `IO_FORCE_ACCESS_CHECK`. The create enters below `Instance` (at the top when NULL).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcreatefileex2>.
///
/// # Safety
/// Called by driver code with the pointers it has; the model reads them as Filter Manager would.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltCreateFileEx2(
    filter: PFLT_FILTER,
    instance: PFLT_INSTANCE,
    file_handle: *mut HANDLE,
    file_object: *mut *mut FILE_OBJECT,
    desired_access: u32,
    object_attributes: *const OBJECT_ATTRIBUTES,
    io_status: *mut IO_STATUS_BLOCK,
    _allocation_size: *const i64,
    file_attributes: u32,
    share_access: u32,
    create_disposition: u32,
    create_options: u32,
    _ea_buffer: *const c_void,
    _ea_length: u32,
    flags: u32,
    _driver_context: *const IO_DRIVER_CREATE_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltCreateFileEx2";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !check_context(API, FLTCREATEFILEEX2, true) {
            return STATUS_INVALID_PARAMETER;
        }
        if !filters().iter().any(|f| f.handle == filter && !f.unregistered) {
            return verifier::invalid_argument(API, format!("Filter {filter:#x} is not a registered filter"));
        }
        let instance_volume = if instance == 0 {
            None
        } else {
            match filter_and_volume(instance) {
                Some((owner, volume)) if owner == filter => Some(volume),
                _ => {
                    return verifier::invalid_argument(
                        API,
                        format!("Instance {instance:#x} is not an attached instance of the filter"),
                    );
                }
            }
        };
        if file_handle.is_null() || object_attributes.is_null() {
            return verifier::invalid_argument(API, "FileHandle and ObjectAttributes must not be NULL".to_owned());
        }
        // SAFETY: checked non-NULL; the driver passes initialised object attributes.
        let attributes = unsafe { &*object_attributes };
        if attributes.Attributes & OBJ_KERNEL_HANDLE == 0 {
            verifier::report(
                Rule::InvalidArgument,
                API,
                "ObjectAttributes without OBJ_KERNEL_HANDLE: the handle would be a user handle of the current \
                 process (the model requires the flag always, stricter than documented)",
            );
        }
        if flags & IO_FORCE_ACCESS_CHECK == 0 && super::dispatch::on_behalf_of_user().is_some() {
            verifier::report(
                Rule::UncheckedOpenForUser,
                API,
                "a create issued on behalf of a user-mode request (from its callback, or a work item servicing it) \
                 without IO_FORCE_ACCESS_CHECK: the kernel skips the access check, so the user could reach a file it \
                 may not open",
            );
        }
        if flags & IO_FORCE_ACCESS_CHECK != 0 {
            crate::kernel::security::check_identity_for(API);
        }
        // SAFETY: the object attributes' name is NULL or a valid UNICODE_STRING.
        let Some(name) = (unsafe { read_unicode(attributes.ObjectName) }) else {
            return verifier::invalid_argument(API, "ObjectAttributes has no ObjectName".to_owned());
        };
        let (volume, within) = match resolve_object_name(&name) {
            Ok(found) => found,
            Err(status) => return status,
        };
        if instance_volume.is_some_and(|v| v != volume.handle) {
            return verifier::invalid_argument(API, format!("{name} is not on the volume of Instance {instance:#x}"));
        }
        let params = iomgr::OpenParams {
            desired_access,
            share_access,
            disposition: create_disposition,
            options: create_options,
            file_attributes,
            case_sensitive: false,
            kernel_mode: true,
            force_access_check: flags & IO_FORCE_ACCESS_CHECK != 0,
            open_target_directory: false,
        };
        let origin = Origin { initiator: Some(filter), below: (instance != 0).then_some(instance) };
        let references = if file_object.is_null() { 1 } else { 2 };
        let result = iomgr::create_on(&volume, &within, &params, origin, references);
        let (status, information) = match &result {
            Ok(_) => (STATUS_SUCCESS, 1),
            Err(status) => (*status, 0),
        };
        if let Some(status_block) = (!io_status.is_null()).then_some(io_status) {
            // SAFETY: the driver passes a valid IO_STATUS_BLOCK.
            unsafe {
                status_block.write(IO_STATUS_BLOCK {
                    Anonymous: windows_sys::Win32::System::IO::IO_STATUS_BLOCK_0 { Status: status },
                    Information: information,
                });
            }
        }
        let Ok(handle) = result else { return status };
        let value = new_kernel_handle(&handle, filter);
        // SAFETY: checked non-NULL; the driver passes a place for the handle.
        unsafe { file_handle.write(value as HANDLE) };
        if !file_object.is_null() {
            // SAFETY: the driver passes a place for the referenced file object.
            unsafe { file_object.write(handle.file_object().cast_mut()) };
        }
        STATUS_SUCCESS
    })
}

/// `FltClose`: PASSIVE_LEVEL; a handle from `FltCreateFile*`, closed once (sends `IRP_MJ_CLEANUP`).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltclose>.
#[unsafe(no_mangle)]
pub extern "system" fn FltClose(file_handle: HANDLE) -> NTSTATUS {
    const API: &str = "FltClose";
    guarded(API, STATUS_INVALID_HANDLE, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, FLTCLOSE) {
            return STATUS_INVALID_HANDLE;
        }
        let Some((id, _)) = with_handles(|h| h.handles.remove(&(file_handle as usize))) else {
            verifier::report(Rule::InvalidArgument, API, format!("{file_handle:?} is not an open kernel file handle"));
            return STATUS_INVALID_HANDLE;
        };
        let _ = iomgr::close_handle(&iomgr::Handle::from_id(id));
        STATUS_SUCCESS
    })
}

fn object_handle(api: &'static str, object: *const c_void) -> Option<iomgr::Handle> {
    let handle = iomgr::handle_of(object.cast());
    if handle.is_none() {
        verifier::report(Rule::InvalidArgument, api, format!("{object:?} is not an object the model handed out"));
    }
    handle
}

/// `ObfReferenceObject` (`ObReferenceObject`): ≤ DISPATCH_LEVEL; adds a reference to a file object.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-obfreferenceobject>.
#[unsafe(no_mangle)]
pub extern "system" fn ObfReferenceObject(object: *const c_void) -> isize {
    const API: &str = "ObfReferenceObject";
    guarded(API, 0, || {
        if thread::require_irql_at_most(API, irql::DISPATCH, OBDEREFERENCEOBJECT)
            && let Some(handle) = object_handle(API, object)
        {
            iomgr::reference(&handle);
        }
        0
    })
}

/// `ObfDereferenceObject` (`ObDereferenceObject`): ≤ DISPATCH_LEVEL; drops a reference, and the last one closes
/// the file object (`IRP_MJ_CLOSE`).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-obdereferenceobject>.
#[unsafe(no_mangle)]
pub extern "system" fn ObfDereferenceObject(object: *const c_void) -> isize {
    const API: &str = "ObfDereferenceObject";
    guarded(API, 0, || {
        if thread::require_irql_at_most(API, irql::DISPATCH, OBDEREFERENCEOBJECT)
            && let Some(handle) = object_handle(API, object)
        {
            iomgr::dereference(&handle);
        }
        0
    })
}

/// Validates the arguments `FltReadFileEx` and `FltWriteFileEx` share; returns the open and the instance's filter.
#[expect(clippy::too_many_arguments, reason = "the arguments of the DDI being checked")]
fn check_io(
    api: &'static str,
    docs: &'static str,
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    byte_offset: *const i64,
    length: u32,
    buffer: *const c_void,
    flags: u32,
    mdl: *const MDL,
) -> Result<(iomgr::Handle, PFLT_FILTER, Option<u64>, *mut u8), NTSTATUS> {
    if super::dispatch::servicing_paging_io()
        && flags
            & (FLTFL_IO_OPERATION_NON_CACHED
                | windows_sys::Wdk::Storage::FileSystem::Minifilters::FLTFL_IO_OPERATION_PAGING)
            == 0
    {
        verifier::report(
            Rule::CachedIoFromPagingPath,
            api,
            "cached I/O issued while this thread services paging I/O: the cache manager may need resources the paging \
             I/O holds (issue it non-cached, FLTFL_IO_OPERATION_NON_CACHED, or not at all)",
        );
    }
    if !check_context(api, docs, false) {
        return Err(STATUS_INVALID_PARAMETER);
    }
    let Some((filter, volume)) = (instance != 0).then(|| filter_and_volume(instance)).flatten() else {
        return Err(verifier::invalid_argument(
            api,
            format!("InitiatingInstance {instance:#x} is not an attached instance"),
        ));
    };
    let Some(handle) = iomgr::handle_of(file_object) else {
        return Err(verifier::invalid_argument(api, format!("{file_object:?} is not an open file object")));
    };
    if buffer.is_null() == mdl.is_null() {
        return Err(verifier::invalid_argument(api, "exactly one of Buffer and Mdl must be given".to_owned()));
    }
    // SAFETY: a non-NULL ByteOffset points to the caller's LARGE_INTEGER.
    let offset = unsafe { byte_offset.as_ref() }.copied();
    if flags & FLTFL_IO_OPERATION_NON_CACHED != 0 {
        let sector = volumes().into_iter().find(|v| v.handle == volume).map_or(512, |v| v.spec.sector_size);
        let sector = u64::from(sector.max(1));
        let misaligned = offset.is_some_and(|o| u64::try_from(o).map_or(true, |o| o % sector != 0))
            || u64::from(length) % sector != 0;
        if misaligned {
            return Err(verifier::invalid_argument(
                api,
                format!(
                    "non-cached I/O at offset {offset:?} of {length} bytes is not a multiple of the {sector}-byte sector"
                ),
            ));
        }
    }
    let offset = match offset {
        None => None,
        Some(o) if o == WRITE_TO_END_OF_FILE => {
            return Err(verifier::invalid_argument(
                api,
                "FILE_WRITE_TO_END_OF_FILE is not supported by FltWriteFileEx".to_owned(),
            ));
        }
        Some(o) => {
            Some(u64::try_from(o).map_err(|_| verifier::invalid_argument(api, format!("ByteOffset {o} is negative")))?)
        }
    };
    // The memory the file system reads into or writes from: the MDL's locked pages in any process, a raw user
    // buffer only in the process that owns it.
    let memory = super::userbuf::buffer_for(api, mdl, buffer.cast_mut(), usize::try_from(length).unwrap_or(0))?;
    Ok((handle, filter, offset, memory))
}

/// `FltReadFileEx` (buffered; synchronous, or asynchronous with a `CallbackRoutine`).
///
/// Rules: PASSIVE_LEVEL, no top-level IRP; an attached `InitiatingInstance` (the read enters below it); an open
/// file object; exactly one of `Buffer` and `Mdl` (an MDL is not modelled yet: reported); for
/// `FLTFL_IO_OPERATION_NON_CACHED` a sector-multiple offset and length. Reading at or past the end of file fails
/// with `STATUS_END_OF_FILE`.
///
/// With a `CallbackRoutine` the read is asynchronous: an argument the checks above reject fails the call at once
/// (no callback); otherwise the call returns `STATUS_PENDING`, `BytesRead` is left alone (the docs say it is
/// ignored), and the callback later receives callback data whose `IoStatus` holds the final status and the byte
/// count, with the data already in `Buffer` (see the [module docs](self)). The docs only say the call returns the
/// file system's status; the model always pends, the case a driver must handle anyway.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltreadfileex>.
///
/// # Safety
/// Called by driver code: `Buffer` must hold `Length` bytes, and for an asynchronous read stay valid until the
/// callback has run.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltReadFileEx(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    byte_offset: *const i64,
    length: u32,
    buffer: *mut c_void,
    flags: u32,
    bytes_read: *mut u32,
    callback: PFLT_COMPLETED_ASYNC_IO_CALLBACK,
    callback_context: *const c_void,
    _key: *const u32,
    mdl: *const MDL,
) -> NTSTATUS {
    const API: &str = "FltReadFileEx";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let (handle, filter, offset, memory) =
            match check_io(API, FLTREADFILEEX, instance, file_object, byte_offset, length, buffer, flags, mdl) {
                Ok(checked) => checked,
                Err(status) => return status,
            };
        let origin = Origin { initiator: Some(filter), below: Some(instance) };
        let update = flags & FLTFL_IO_OPERATION_DO_NOT_UPDATE_BYTE_OFFSET == 0;
        let at = start_offset(file_object, offset);
        let result = iomgr::read_from(&handle, offset, length, origin, true, update);
        let (status, mut data) = match result {
            Ok(data) => (STATUS_SUCCESS, data),
            Err(status) => (status, Vec::new()),
        };
        let n = data.len().min(usize::try_from(length).unwrap_or(0));
        if let Some(callback) = callback {
            // Asynchronous: BytesRead is ignored; the data reaches the buffer when the I/O completes.
            data.truncate(n);
            let mut request = Request::new(IRP_MJ_READ, file_object.cast_mut(), true);
            let iopb = request.iopb();
            iopb.TargetInstance = instance;
            iopb.Parameters.Read.Length = length;
            iopb.Parameters.Read.ByteOffset = at;
            iopb.Parameters.Read.ReadBuffer = buffer;
            iopb.Parameters.Read.MdlAddress = mdl.cast_mut();
            request.complete(status, n);
            let read_back = Some(ReadBack { data, buffer: memory as usize });
            return pend(API, filter, &handle, request, read_back, callback, callback_context);
        }
        // SAFETY: the driver's buffer (or the MDL's pages) holds `length` bytes and `n <= length`.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), memory, n) };
        if !bytes_read.is_null() {
            // SAFETY: the driver passes a place for the count.
            unsafe { bytes_read.write(u32::try_from(n).unwrap_or(u32::MAX)) };
        }
        status
    })
}

/// `FltWriteFileEx` (buffered; synchronous, or asynchronous with a `CallbackRoutine` as [`FltReadFileEx`] is): the
/// rules of [`FltReadFileEx`], and no `FILE_WRITE_TO_END_OF_FILE` offset, which the docs say it does not support.
/// An asynchronous write returns `STATUS_PENDING`, leaves `BytesWritten` alone, and reports the status and the
/// count written through the callback data's `IoStatus`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltwritefileex>.
///
/// # Safety
/// Called by driver code: `Buffer` must hold `Length` bytes, and for an asynchronous write stay valid until the
/// callback has run.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltWriteFileEx(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    byte_offset: *const i64,
    length: u32,
    buffer: *const c_void,
    flags: u32,
    bytes_written: *mut u32,
    callback: PFLT_COMPLETED_ASYNC_IO_CALLBACK,
    callback_context: *const c_void,
    _key: *const u32,
    mdl: *const MDL,
) -> NTSTATUS {
    const API: &str = "FltWriteFileEx";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let (handle, filter, offset, memory) =
            match check_io(API, FLTWRITEFILEEX, instance, file_object, byte_offset, length, buffer, flags, mdl) {
                Ok(checked) => checked,
                Err(status) => return status,
            };
        // SAFETY: the driver's buffer (or the MDL's pages) holds `length` bytes.
        let data = unsafe { std::slice::from_raw_parts(memory.cast_const(), usize::try_from(length).unwrap_or(0)) };
        let origin = Origin { initiator: Some(filter), below: Some(instance) };
        let update = flags & FLTFL_IO_OPERATION_DO_NOT_UPDATE_BYTE_OFFSET == 0;
        let at = start_offset(file_object, offset);
        let (status, n) = match iomgr::write_from(&handle, offset, data, origin, true, update) {
            Ok(n) => (STATUS_SUCCESS, n),
            Err(status) => (status, 0),
        };
        if let Some(callback) = callback {
            // Asynchronous: BytesWritten is ignored; the status and count reach the callback.
            let mut request = Request::new(IRP_MJ_WRITE, file_object.cast_mut(), true);
            let iopb = request.iopb();
            iopb.TargetInstance = instance;
            iopb.Parameters.Write.Length = length;
            iopb.Parameters.Write.ByteOffset = at;
            iopb.Parameters.Write.WriteBuffer = buffer.cast_mut();
            iopb.Parameters.Write.MdlAddress = mdl.cast_mut();
            request.complete(status, n);
            return pend(API, filter, &handle, request, None, callback, callback_context);
        }
        if !bytes_written.is_null() {
            // SAFETY: the driver passes a place for the count.
            unsafe { bytes_written.write(u32::try_from(n).unwrap_or(u32::MAX)) };
        }
        status
    })
}

/// `IRP_MJ_READ`.
const IRP_MJ_READ: u8 = 3;
/// `IRP_MJ_WRITE`.
const IRP_MJ_WRITE: u8 = 4;
const ASYNC_CALLBACK: &str = "PFLT_COMPLETED_ASYNC_IO_CALLBACK";

/// A `PFLT_COMPLETED_ASYNC_IO_CALLBACK` that is not NULL.
type AsyncCallback = unsafe extern "system" fn(*const FLT_CALLBACK_DATA, PFLT_CONTEXT);

/// The byte offset an I/O starts at: the given one, or the file object's current byte offset.
fn start_offset(file_object: *const FILE_OBJECT, offset: Option<u64>) -> i64 {
    match offset {
        Some(at) => i64::try_from(at).unwrap_or(i64::MAX),
        // SAFETY: `check_io` found `file_object` among the model's open file objects.
        None => unsafe { (*file_object).CurrentByteOffset },
    }
}

/// The data of an asynchronous read, copied into the driver's buffer when the read completes.
/// Visible to the module's siblings because it appears in [`pend`]'s signature.
pub(super) struct ReadBack {
    data: Vec<u8>,
    buffer: usize,
}

/// An asynchronous read or write the file system has done, waiting to be completed to its initiator.
struct AsyncCompletion {
    id: u64,
    api: &'static str,
    filter: PFLT_FILTER,
    /// The file object's open: the request holds a reference on it until the callback has run, as an IRP does.
    handle: iomgr::Handle,
    request: Request,
    read_back: Option<ReadBack>,
    callback: AsyncCallback,
    context: usize,
    irql: u8,
}

// SAFETY: the raw pointers inside are the model's own boxed callback data and the driver's buffer and context,
// which the driver keeps valid until its callback has run; none of them is tied to the issuing thread.
unsafe impl Send for AsyncCompletion {}

/// An asynchronous I/O whose callback has not returned yet.
struct Outstanding {
    filter: PFLT_FILTER,
    file_object: usize,
    api: &'static str,
    /// Already reported as outstanding at unload.
    reported: bool,
}

struct AsyncState {
    next: u64,
    holds: usize,
    parked: Vec<AsyncCompletion>,
    outstanding: BTreeMap<u64, Outstanding>,
}

static ASYNC: Mutex<AsyncState> =
    Mutex::new(AsyncState { next: 0, holds: 0, parked: Vec::new(), outstanding: BTreeMap::new() });

fn async_state() -> MutexGuard<'static, AsyncState> {
    ASYNC.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps the completion of asynchronous `FltReadFileEx` / `FltWriteFileEx` I/O back while it lives; dropping it
/// lets the held completions run on system workers. From [`hold_async_completions`].
#[must_use = "completions are held only while the guard lives"]
pub struct AsyncCompletionHold {
    _private: (),
}

/// Holds back the completion of asynchronous I/O (`FltReadFileEx`, `FltWriteFileEx`, `FltPerformAsynchronousIo`)
/// issued while or before the guard lives and not completed yet, until the returned guard is dropped: the file
/// system has done the I/O, but the data, `IoStatus` and callback do not reach the driver. For tests that need I/O to stay outstanding, such as
/// a filter unloading with I/O in flight.
pub fn hold_async_completions() -> AsyncCompletionHold {
    async_state().holds += 1;
    AsyncCompletionHold { _private: () }
}

impl Drop for AsyncCompletionHold {
    fn drop(&mut self) {
        let parked = {
            let mut state = async_state();
            state.holds = state.holds.saturating_sub(1);
            if state.holds > 0 { Vec::new() } else { std::mem::take(&mut state.parked) }
        };
        for completion in parked {
            drop(work::queue(move || complete_async(completion)));
        }
    }
}

/// How many asynchronous `FltReadFileEx` / `FltWriteFileEx` / `FltPerformAsynchronousIo` I/Os have not finished
/// their callback yet.
#[must_use]
pub fn outstanding_async_io() -> usize {
    async_state().outstanding.len()
}

/// Pends an asynchronous read or write the file system has done (its final status and count are in `request`):
/// its completion runs later on a system worker. Returns `STATUS_PENDING`.
/// Also completes `FltPerformAsynchronousIo` (`super::callback_data`), whose callback hands the built data back.
pub(super) fn pend(
    api: &'static str,
    filter: PFLT_FILTER,
    handle: &iomgr::Handle,
    mut request: Request,
    read_back: Option<ReadBack>,
    callback: AsyncCallback,
    context: *const c_void,
) -> NTSTATUS {
    iomgr::reference(handle);
    // Chosen here, on the issuing thread, so the seed alone decides it whatever the workers' timing.
    let irql = random_post_irql();
    let handle = iomgr::Handle::from_id(handle.id());
    let file_object = request.iopb().TargetFileObject as usize;
    let mut state = async_state();
    state.next = state.next.saturating_add(1);
    let id = state.next;
    state.outstanding.insert(id, Outstanding { filter, file_object, api, reported: false });
    let completion =
        AsyncCompletion { id, api, filter, handle, request, read_back, callback, context: context as usize, irql };
    if state.holds > 0 {
        state.parked.push(completion);
    } else {
        drop(state);
        drop(work::queue(move || complete_async(completion)));
    }
    STATUS_PENDING
}

/// Completes an asynchronous I/O to its initiator, on a system worker: the read data into the driver's buffer,
/// then the callback at the IRQL chosen when it was issued, then the request's file object reference is dropped.
fn complete_async(completion: AsyncCompletion) {
    let AsyncCompletion { id, api, filter, handle, request, read_back, callback, context, irql } = completion;
    let unregistered = filters().iter().any(|f| f.handle == filter && f.unregistered);
    let newly = unregistered
        && async_state().outstanding.get_mut(&id).is_some_and(|o| !std::mem::replace(&mut o.reported, true));
    if newly {
        verifier::report(
            Rule::AsyncIoOutstandingAtUnload,
            "FltUnregisterFilter",
            format!(
                "an asynchronous {api} of filter {filter:#x} completes after the filter unregistered: Filter Manager \
                 does not finish tearing down an instance while I/O its filter initiated is outstanding, so the \
                 unload hangs until it completes (wait for the callbacks, or cancel the I/O, before unregistering)"
            ),
        );
    }
    if let Some(ReadBack { data, buffer }) = read_back {
        // SAFETY: the driver's buffer holds the `Length` bytes it passed, `data` is at most that long, and the driver
        // keeps the buffer valid until its callback has run.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buffer as *mut u8, data.len()) };
    }
    let data = request.data();
    thread::at_irql(irql, || {
        let before = thread::snapshot();
        // SAFETY: the driver passed this callback and context for this I/O; the callback data outlives the call.
        unsafe { callback(data, context as *mut c_void) };
        thread::check_balanced(ASYNC_CALLBACK, &before);
    });
    drop(request);
    iomgr::dereference(&handle);
    async_state().outstanding.remove(&id);
}

/// Reports the asynchronous I/O `filter` issued that has not completed; returns how many are in flight on each
/// file object (their requests hold a reference on it).
fn report_outstanding(filter: PFLT_FILTER, after: &str) -> BTreeMap<usize, u32> {
    let mut in_flight = BTreeMap::new();
    let mut unreported = Vec::new();
    for outstanding in async_state().outstanding.values_mut().filter(|o| o.filter == filter) {
        let count: &mut u32 = in_flight.entry(outstanding.file_object).or_default();
        *count = count.saturating_add(1);
        if !std::mem::replace(&mut outstanding.reported, true) {
            unreported.push(outstanding.api);
        }
    }
    if !unreported.is_empty() {
        verifier::report(
            Rule::AsyncIoOutstandingAtUnload,
            "FltUnregisterFilter",
            format!(
                "{} asynchronous I/O ({}) not completed after {after}: Filter Manager does not finish tearing down an \
                 instance while I/O its filter initiated is outstanding, so the unload hangs until it completes \
                 (wait for the callbacks, or cancel the I/O, before unregistering)",
                unreported.len(),
                unreported.join(", ")
            ),
        );
    }
    in_flight
}

/// Reports every handle and file object `filter` opened and did not release, and its asynchronous I/O still in
/// flight; called when its driver unloads.
pub(crate) fn report_leaks(filter: PFLT_FILTER, after: &str) {
    let in_flight = report_outstanding(filter, after);
    for (object, handle_open, references) in iomgr::opened_by(filter) {
        // The references of requests still in flight are reported above, not as the driver's leak.
        let references = references.saturating_sub(in_flight.get(&object).copied().unwrap_or(0));
        if !handle_open && references == 0 {
            continue;
        }
        let what = if handle_open { "handle still open" } else { "file object still referenced" };
        verifier::report(
            Rule::FileLeak,
            if handle_open { "FltClose" } else { "ObDereferenceObject" },
            format!("file object {object:#x} ({what}, {references} references) after {after}"),
        );
    }
}
