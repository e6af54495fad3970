//! What a filter asks Filter Manager about an operation or a volume: `FltGetRequestorProcess`,
//! `FltGetRequestorProcessId` and `FltGetVolumeGuidName`.

use windows_sys::{
    Wdk::{
        Foundation::PEPROCESS,
        Storage::FileSystem::Minifilters::{FLT_CALLBACK_DATA, PFLT_VOLUME},
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_BUFFER_TOO_SMALL, STATUS_FLT_VOLUME_NOT_FOUND, STATUS_INVALID_DEVICE_REQUEST,
            STATUS_INVALID_PARAMETER, STATUS_SUCCESS, UNICODE_STRING,
        },
        System::Ioctl::FILE_DEVICE_DISK_FILE_SYSTEM,
    },
};

use super::dispatch::requestor;
use crate::{
    guard::guarded,
    io::volumes,
    kernel::{irql, thread},
    verifier::{self, Rule},
};

const FLTGETREQUESTORPROCESS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetrequestorprocess";
const FLTGETVOLUMEGUIDNAME: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetvolumeguidname";

fn requestor_of(
    api: &'static str,
    data: *const FLT_CALLBACK_DATA,
) -> Option<std::sync::Arc<crate::kernel::process::Process>> {
    if !thread::require_irql_at_most(api, irql::DISPATCH, FLTGETREQUESTORPROCESS) {
        return None;
    }
    let found = requestor(data);
    if found.is_none() {
        verifier::report(
            Rule::InvalidArgument,
            api,
            format!("{data:?} is not the callback data of an operation in flight"),
        );
    }
    found
}

/// `FltGetRequestorProcess`: ≤ DISPATCH_LEVEL; the process that requested the operation (not necessarily the
/// current one: a filter above may have posted it to a worker).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetrequestorprocess>.
#[unsafe(no_mangle)]
pub extern "system" fn FltGetRequestorProcess(callback_data: *const FLT_CALLBACK_DATA) -> PEPROCESS {
    const API: &str = "FltGetRequestorProcess";
    guarded(API, 0, || requestor_of(API, callback_data).map_or(0, |p| p.peprocess()))
}

/// `FltGetRequestorProcessId`: ≤ DISPATCH_LEVEL; the id of the requesting process.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetrequestorprocessid>.
#[unsafe(no_mangle)]
pub extern "system" fn FltGetRequestorProcessId(callback_data: *const FLT_CALLBACK_DATA) -> u32 {
    const API: &str = "FltGetRequestorProcessId";
    guarded(API, 0, || requestor_of(API, callback_data).map_or(0, |p| u32::try_from(p.id).unwrap_or(0)))
}

/// `FltGetVolumeGuidName`.
///
/// Rules: PASSIVE_LEVEL (stricter than the page, which names no IRQL; it is documented as safe in InstanceSetup);
/// a local volume (`STATUS_INVALID_DEVICE_REQUEST` for network volumes); with `VolumeGuidName` NULL or too small,
/// `STATUS_BUFFER_TOO_SMALL` and the size in `BufferSizeNeeded`. The name has the form `\??\Volume{GUID}`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetvolumeguidname>.
///
/// # Safety
/// Called by driver code: a non-NULL `VolumeGuidName` must describe a writable buffer of `MaximumLength` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetVolumeGuidName(
    volume: PFLT_VOLUME,
    volume_guid_name: *mut UNICODE_STRING,
    buffer_size_needed: *mut u32,
) -> NTSTATUS {
    const API: &str = "FltGetVolumeGuidName";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, FLTGETVOLUMEGUIDNAME) {
            return STATUS_INVALID_PARAMETER;
        }
        let Some(found) = volumes().into_iter().find(|v| v.handle == volume) else {
            return STATUS_FLT_VOLUME_NOT_FOUND;
        };
        if found.spec.device_type != FILE_DEVICE_DISK_FILE_SYSTEM {
            return STATUS_INVALID_DEVICE_REQUEST;
        }
        let name: Vec<u16> = found.guid_name.encode_utf16().collect();
        let bytes = u16::try_from(name.len().saturating_mul(2)).unwrap_or(u16::MAX);
        if !buffer_size_needed.is_null() {
            // SAFETY: the driver passes a place for the size.
            unsafe { buffer_size_needed.write(u32::from(bytes)) };
        }
        // SAFETY: NULL or a valid UNICODE_STRING of the driver's.
        let Some(target) = (unsafe { volume_guid_name.as_mut() }) else {
            if buffer_size_needed.is_null() {
                verifier::report(Rule::InvalidArgument, API, "both VolumeGuidName and BufferSizeNeeded are NULL");
                return STATUS_INVALID_PARAMETER;
            }
            return STATUS_BUFFER_TOO_SMALL;
        };
        if target.Buffer.is_null() || target.MaximumLength < bytes {
            return STATUS_BUFFER_TOO_SMALL;
        }
        // SAFETY: the buffer holds MaximumLength ≥ `bytes` bytes.
        unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), target.Buffer, name.len()) };
        target.Length = bytes;
        STATUS_SUCCESS
    })
}
