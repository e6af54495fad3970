//! `ZwCreateFile`, `ZwReadFile` and `ZwClose`: the naive way for a driver to do file I/O, modelled so that its
//! hazards show (ARCHITECTURE.md, data path point 7):
//! - the create and every read enter the volume's stack at the *top*, so a filter that calls them from its own
//!   callbacks sees its own I/O again ([`crate::Rule::ReentrantIo`]) and may recurse;
//! - they need PASSIVE_LEVEL with special kernel APCs enabled, because synchronous completion is delivered by a
//!   special kernel APC to the waiting thread: in a guarded region (or at APC_LEVEL) that APC never runs and the
//!   thread would wait forever — reported ([`crate::Rule::WaitNeedsDisabledApc`]) and answered with
//!   `STATUS_POSSIBLE_DEADLOCK` instead of hanging;
//! - a kernel-mode open skips the access check unless `OBJ_FORCE_ACCESS_CHECK` is set, so an open made from a
//!   callback for a user's request without it is reported ([`crate::Rule::UncheckedOpenForUser`]).
//!
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwcreatefile>,
//! <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwreadfile>,
//! <https://learn.microsoft.com/windows-hardware/drivers/kernel/types-of-apcs>.)

use std::ffi::c_void;

use windows_sys::{
    Wdk::Foundation::OBJECT_ATTRIBUTES,
    Win32::{
        Foundation::{
            HANDLE, NTSTATUS, OBJ_FORCE_ACCESS_CHECK, STATUS_INVALID_HANDLE, STATUS_INVALID_PARAMETER,
            STATUS_POSSIBLE_DEADLOCK, STATUS_SUCCESS, UNICODE_STRING,
        },
        System::IO::{IO_STATUS_BLOCK, IO_STATUS_BLOCK_0, PIO_APC_ROUTINE},
    },
};

use super::iomgr;
use crate::{
    fltmgr::{
        dispatch::{Origin, current_filter},
        fileio,
    },
    guard::guarded,
    kernel::{irql, thread},
    verifier::{self, Rule},
};

const ZWCREATEFILE: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwcreatefile";
const ZWREADFILE: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwreadfile";
const ZWCLOSE: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwclose";

/// PASSIVE_LEVEL with special kernel APCs deliverable: false (reported) when the call cannot complete.
fn can_complete(api: &'static str, docs: &'static str) -> bool {
    if !thread::require_irql_at_most(api, irql::PASSIVE, docs) {
        return false;
    }
    if thread::snapshot().guarded_regions > 0 {
        verifier::report(
            Rule::WaitNeedsDisabledApc,
            api,
            "called in a guarded region: the synchronous completion is a special kernel APC to this thread, which \
             cannot be delivered, so the thread would wait forever",
        );
        return false;
    }
    true
}

fn write_status(io_status: *mut IO_STATUS_BLOCK, status: NTSTATUS, information: usize) {
    if !io_status.is_null() {
        // SAFETY: the caller passes a valid IO_STATUS_BLOCK.
        unsafe {
            io_status
                .write(IO_STATUS_BLOCK { Anonymous: IO_STATUS_BLOCK_0 { Status: status }, Information: information });
        }
    }
}

/// `ZwCreateFile`: PASSIVE_LEVEL, special kernel APCs enabled; the create enters the stack at the top.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwcreatefile>.
///
/// # Safety
/// Called by driver code with the pointers it has.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn ZwCreateFile(
    file_handle: *mut HANDLE,
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
) -> NTSTATUS {
    const API: &str = "ZwCreateFile";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !can_complete(API, ZWCREATEFILE) {
            return STATUS_POSSIBLE_DEADLOCK;
        }
        // SAFETY: NULL or the driver's object attributes.
        let Some(attributes) = (unsafe { object_attributes.as_ref() }) else { return STATUS_INVALID_PARAMETER };
        if file_handle.is_null() {
            return STATUS_INVALID_PARAMETER;
        }
        let force = attributes.Attributes & OBJ_FORCE_ACCESS_CHECK != 0;
        if !force && crate::fltmgr::dispatch::on_behalf_of_user().is_some() {
            verifier::report(
                Rule::UncheckedOpenForUser,
                API,
                "a kernel-mode ZwCreateFile on behalf of a user-mode request without OBJ_FORCE_ACCESS_CHECK: the \
                 access check is skipped",
            );
        }
        if force {
            crate::kernel::security::check_identity_for(API);
        }
        let name = if attributes.ObjectName.is_null() {
            None
        } else {
            // SAFETY: the driver's UNICODE_STRING.
            let s: &UNICODE_STRING = unsafe { &*attributes.ObjectName };
            (!s.Buffer.is_null()).then(|| {
                // SAFETY: the buffer holds Length bytes.
                String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(s.Buffer, usize::from(s.Length / 2)) })
            })
        };
        let Some(name) = name else { return STATUS_INVALID_PARAMETER };
        let (volume, within) = match fileio::resolve_object_name(&name) {
            Ok(found) => found,
            Err(status) => {
                write_status(io_status, status, 0);
                return status;
            }
        };
        let params = iomgr::OpenParams {
            desired_access,
            share_access,
            disposition: create_disposition,
            options: create_options,
            file_attributes,
            case_sensitive: false,
            kernel_mode: true,
            force_access_check: force,
            open_target_directory: false,
        };
        // From the top of the stack, with the calling filter (if any) as the initiator.
        let initiator = current_filter();
        let origin = Origin { initiator, below: None };
        match iomgr::create_on(&volume, &within, &params, origin, 1) {
            Ok(handle) => {
                let value = fileio::new_kernel_handle(&handle, initiator.unwrap_or(0));
                // SAFETY: checked non-NULL; a place for the handle.
                unsafe { file_handle.write(value as HANDLE) };
                write_status(io_status, STATUS_SUCCESS, 1);
                STATUS_SUCCESS
            }
            Err(status) => {
                write_status(io_status, status, 0);
                status
            }
        }
    })
}

/// `ZwReadFile` (synchronous): PASSIVE_LEVEL, special kernel APCs enabled; the read enters the stack at the top.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwreadfile>.
///
/// # Safety
/// Called by driver code: `Buffer` must hold `Length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn ZwReadFile(
    file_handle: HANDLE,
    _event: HANDLE,
    _apc_routine: PIO_APC_ROUTINE,
    _apc_context: *const c_void,
    io_status: *mut IO_STATUS_BLOCK,
    buffer: *mut c_void,
    length: u32,
    byte_offset: *const i64,
    _key: *const u32,
) -> NTSTATUS {
    const API: &str = "ZwReadFile";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !can_complete(API, ZWREADFILE) {
            return STATUS_POSSIBLE_DEADLOCK;
        }
        let Some(handle) = fileio::kernel_handle(file_handle as usize) else { return STATUS_INVALID_HANDLE };
        // SAFETY: NULL or the driver's LARGE_INTEGER.
        let offset = unsafe { byte_offset.as_ref() }.and_then(|o| u64::try_from(*o).ok());
        let origin = Origin { initiator: current_filter(), below: None };
        match iomgr::read_from(&handle, offset, length, origin, true, true) {
            Ok(data) => {
                let n = data.len().min(usize::try_from(length).unwrap_or(0));
                // SAFETY: the driver's buffer holds `length` bytes.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buffer.cast::<u8>(), n) };
                write_status(io_status, STATUS_SUCCESS, n);
                STATUS_SUCCESS
            }
            Err(status) => {
                write_status(io_status, status, 0);
                status
            }
        }
    })
}

/// `ZwClose`: PASSIVE_LEVEL; an open kernel handle (a file or a registry key), closed once.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwclose>.
#[unsafe(no_mangle)]
pub extern "system" fn ZwClose(handle: HANDLE) -> NTSTATUS {
    const API: &str = "ZwClose";
    guarded(API, STATUS_INVALID_HANDLE, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, ZWCLOSE) {
            return STATUS_INVALID_HANDLE;
        }
        if crate::registry_api::close_key(handle as usize) {
            return STATUS_SUCCESS;
        }
        let Some(open) = fileio::remove_kernel_handle(handle as usize) else {
            verifier::report(Rule::InvalidArgument, API, format!("{handle:?} is not an open kernel handle"));
            return STATUS_INVALID_HANDLE;
        };
        let _ = iomgr::close_handle(&open);
        STATUS_SUCCESS
    })
}
