//! What a filter asks Filter Manager about an operation or a volume: `FltGetRequestorProcess`,
//! `FltGetRequestorProcessId`, `FltGetVolumeGuidName` and `FltGetVolumeProperties`.

use windows_sys::{
    Wdk::{
        Foundation::PEPROCESS,
        Storage::FileSystem::Minifilters::{FLT_CALLBACK_DATA, FLT_VOLUME_PROPERTIES, PFLT_VOLUME},
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_BUFFER_OVERFLOW, STATUS_BUFFER_TOO_SMALL, STATUS_FLT_VOLUME_NOT_FOUND,
            STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_PARAMETER, STATUS_SUCCESS, UNICODE_STRING,
        },
        Storage::InstallableFileSystems::{FLT_FSTYPE_FAT, FLT_FSTYPE_NTFS, FLT_FSTYPE_REFS},
        System::Ioctl::{FILE_DEVICE_DISK_FILE_SYSTEM, FILE_DEVICE_NETWORK_FILE_SYSTEM},
    },
};

use super::dispatch::requestor;
use crate::{
    guard::guarded,
    io::{Volume, volumes},
    kernel::{irql, thread},
    verifier::{self, Rule},
};

const FLTGETREQUESTORPROCESS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetrequestorprocess";
const FLTGETVOLUMEPROPERTIES: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetvolumeproperties";
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

/// `FILE_REMOTE_DEVICE`, the device characteristic of network volumes.
const FILE_REMOTE_DEVICE: u32 = 0x10;

/// The three names `FltGetVolumeProperties` returns after the fixed part, in order: the file system driver, the
/// file system's device (unnamed for local volumes, whose volume device objects have no name) and the volume.
fn property_names(volume: &Volume) -> [Vec<u16>; 3] {
    let driver = match volume.spec.file_system {
        _ if volume.spec.device_type == FILE_DEVICE_NETWORK_FILE_SYSTEM => r"\FileSystem\Mup",
        FLT_FSTYPE_NTFS => r"\FileSystem\Ntfs",
        FLT_FSTYPE_REFS => r"\FileSystem\ReFS",
        FLT_FSTYPE_FAT => r"\FileSystem\fastfat",
        _ => r"\FileSystem\Unknown",
    };
    let device = if volume.spec.device_type == FILE_DEVICE_NETWORK_FILE_SYSTEM { r"\Device\Mup" } else { "" };
    [driver, device, volume.device_name.as_str()].map(|name| name.encode_utf16().collect())
}

/// `FltGetVolumeProperties`: ≤ APC_LEVEL; a non-NULL `LengthReturned`; a `VolumePropertiesLength` of zero (the size
/// needed comes back with `STATUS_BUFFER_TOO_SMALL`) or at least `sizeof(FLT_VOLUME_PROPERTIES)` (smaller non-zero
/// lengths are reported). Room for the fixed part but not the names returns the fixed part and
/// `STATUS_BUFFER_OVERFLOW`, a warning; otherwise the names follow the fixed part and its `UNICODE_STRING`s point at
/// them.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetvolumeproperties>.
///
/// # Safety
/// Called by driver code: a non-zero `VolumePropertiesLength` describes a writable, suitably aligned buffer of that
/// many bytes at `VolumeProperties`; `LengthReturned` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetVolumeProperties(
    volume: PFLT_VOLUME,
    volume_properties: *mut FLT_VOLUME_PROPERTIES,
    volume_properties_length: u32,
    length_returned: *mut u32,
) -> NTSTATUS {
    const API: &str = "FltGetVolumeProperties";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, FLTGETVOLUMEPROPERTIES) {
            return STATUS_INVALID_PARAMETER;
        }
        if length_returned.is_null() {
            verifier::report(Rule::InvalidArgument, API, "LengthReturned is NULL; the docs require it");
            return STATUS_INVALID_PARAMETER;
        }
        let Some(found) = volumes().into_iter().find(|v| v.handle == volume) else {
            verifier::report(Rule::InvalidArgument, API, format!("{volume:#x} is not a volume"));
            return STATUS_INVALID_PARAMETER;
        };
        let names = property_names(&found);
        let fixed = size_of::<FLT_VOLUME_PROPERTIES>();
        let names_bytes: usize = names.iter().map(|n| n.len().saturating_mul(2)).sum();
        let needed = u32::try_from(fixed.saturating_add(names_bytes)).unwrap_or(u32::MAX);
        let length = usize::try_from(volume_properties_length).unwrap_or(usize::MAX);
        if length == 0 {
            // SAFETY: checked non-NULL; the driver's variable.
            unsafe { length_returned.write(needed) };
            return STATUS_BUFFER_TOO_SMALL;
        }
        if length < fixed {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!(
                    "VolumePropertiesLength {length} is non-zero and below sizeof(FLT_VOLUME_PROPERTIES) = {fixed}"
                ),
            );
            // SAFETY: as above.
            unsafe { length_returned.write(needed) };
            return STATUS_BUFFER_TOO_SMALL;
        }
        if volume_properties.is_null() || !volume_properties.is_aligned() {
            verifier::report(
                Rule::InvalidArgument,
                API,
                "VolumeProperties is NULL or misaligned with a non-zero length",
            );
            return STATUS_INVALID_PARAMETER;
        }
        let remote = found.spec.device_type == FILE_DEVICE_NETWORK_FILE_SYSTEM;
        let mut properties = FLT_VOLUME_PROPERTIES {
            DeviceType: found.spec.device_type,
            DeviceCharacteristics: if remote { FILE_REMOTE_DEVICE } else { 0 },
            DeviceObjectFlags: 0,
            AlignmentRequirement: found.spec.alignment_requirement,
            SectorSize: u16::try_from(found.spec.sector_size).unwrap_or(u16::MAX),
            Flags: 0,
            FileSystemDriverName: UNICODE_STRING::default(),
            FileSystemDeviceName: UNICODE_STRING::default(),
            RealDeviceName: UNICODE_STRING::default(),
        };
        let fits = length >= fixed.saturating_add(names_bytes);
        if fits {
            // Units of u16 from the start of the buffer: the fixed part and every name are whole u16s.
            let base = volume_properties.cast::<u16>();
            let mut offset = fixed / 2;
            let targets = [
                &mut properties.FileSystemDriverName,
                &mut properties.FileSystemDeviceName,
                &mut properties.RealDeviceName,
            ];
            for (target, name) in targets.into_iter().zip(&names) {
                let bytes = u16::try_from(name.len().saturating_mul(2)).unwrap_or(u16::MAX);
                // SAFETY: `offset + name.len()` u16s ≤ `fixed + names_bytes` bytes ≤ `length`: inside the buffer.
                let at = unsafe { base.add(offset) };
                // SAFETY: the destination is inside the driver's buffer (above) and does not overlap `name`.
                unsafe { std::ptr::copy_nonoverlapping(name.as_ptr(), at, name.len()) };
                *target = UNICODE_STRING { Length: bytes, MaximumLength: bytes, Buffer: at };
                offset = offset.saturating_add(name.len());
            }
        }
        // SAFETY: the buffer is non-NULL, aligned and holds at least the fixed part (checked above).
        unsafe { volume_properties.write(properties) };
        let returned = if fits { needed } else { u32::try_from(fixed).unwrap_or(u32::MAX) };
        // SAFETY: as above.
        unsafe { length_returned.write(returned) };
        if fits { STATUS_SUCCESS } else { STATUS_BUFFER_OVERFLOW }
    })
}
