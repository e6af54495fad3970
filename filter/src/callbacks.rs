//! One `extern "system"` trampoline per callback: each converts its raw arguments once, calls the safe logic in
//! [`crate::driver`], and maps the answer back to the raw value Filter Manager expects.

use core::ffi::c_void;

use windows_sys::{
    Wdk::{
        Foundation::DRIVER_OBJECT,
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE, FLT_PREOP_SUCCESS_NO_CALLBACK,
            FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_RELATED_OBJECTS, FLTFL_FILTER_UNLOAD_MANDATORY,
        },
    },
    Win32::{
        Foundation::{NTSTATUS, UNICODE_STRING},
        Storage::InstallableFileSystems::FLT_FILESYSTEM_TYPE,
    },
};

use crate::{
    driver::{self, PreOp, VolumeKind},
    wdk::{DriverObject, NtStatus},
};

/// The driver's entry point, called by the I/O manager at PASSIVE_LEVEL in the System process.
///
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nc-wdm-driver_initialize>.
///
/// # Safety
/// `driver` must be this driver's driver object and `registry_path` its service key name, as the I/O manager
/// passes them; both must stay valid for the call.
#[cfg_attr(windows, unsafe(no_mangle))]
#[must_use]
#[cfg_attr(
    not(windows),
    expect(non_snake_case, reason = "the entry point's name is fixed by the kernel and the linker's /ENTRY")
)]
pub unsafe extern "system" fn DriverEntry(
    driver: *const DRIVER_OBJECT,
    _registry_path: *const UNICODE_STRING,
) -> NTSTATUS {
    // SAFETY: the I/O manager passes this driver's object, valid for the whole call.
    let Some(driver) = (unsafe { DriverObject::from_raw(driver) }) else {
        return NtStatus::INVALID_PARAMETER.raw();
    };
    NtStatus::to_raw(driver::driver_entry(driver))
}

/// `PFLT_FILTER_UNLOAD_CALLBACK`: PASSIVE_LEVEL.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_filter_unload_callback>.
pub(crate) unsafe extern "system" fn filter_unload(flags: u32) -> NTSTATUS {
    NtStatus::to_raw(driver::unload(flags & FLTFL_FILTER_UNLOAD_MANDATORY != 0))
}

/// `PFLT_INSTANCE_SETUP_CALLBACK`: PASSIVE_LEVEL.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_instance_setup_callback>.
pub(crate) unsafe extern "system" fn instance_setup(
    _objects: *const FLT_RELATED_OBJECTS,
    _flags: u32,
    device_type: u32,
    file_system: FLT_FILESYSTEM_TYPE,
) -> NTSTATUS {
    NtStatus::to_raw(driver::instance_setup(VolumeKind { device_type, file_system }))
}

/// `PFLT_INSTANCE_QUERY_TEARDOWN_CALLBACK`: PASSIVE_LEVEL. Without it, instances could not be detached manually.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_instance_query_teardown_callback>.
pub(crate) unsafe extern "system" fn instance_query_teardown(
    _objects: *const FLT_RELATED_OBJECTS,
    _flags: u32,
) -> NTSTATUS {
    NtStatus::to_raw(driver::instance_query_teardown())
}

/// `PFLT_INSTANCE_TEARDOWN_CALLBACK` (start): PASSIVE_LEVEL.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_instance_teardown_callback>.
pub(crate) unsafe extern "system" fn instance_teardown_start(_objects: *const FLT_RELATED_OBJECTS, _reason: u32) {
    driver::instance_teardown_start();
}

/// `PFLT_INSTANCE_TEARDOWN_CALLBACK` (complete): PASSIVE_LEVEL.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_instance_teardown_callback>.
pub(crate) unsafe extern "system" fn instance_teardown_complete(_objects: *const FLT_RELATED_OBJECTS, _reason: u32) {
    driver::instance_teardown_complete();
}

/// Pre-create: PASSIVE_LEVEL in the requestor's thread (or a worker thread, when a filter above posted the create).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_pre_operation_callback>.
pub(crate) unsafe extern "system" fn pre_create(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _completion_context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    preop_status(driver::pre_create())
}

/// The one place a [`PreOp`] decision becomes an `FLT_PREOP_*` value.
const fn preop_status(decision: PreOp) -> FLT_PREOP_CALLBACK_STATUS {
    match decision {
        PreOp::PassThrough => FLT_PREOP_SUCCESS_NO_CALLBACK,
        PreOp::WithPostOperation => FLT_PREOP_SUCCESS_WITH_CALLBACK,
        PreOp::Complete => FLT_PREOP_COMPLETE,
    }
}
