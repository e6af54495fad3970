//! The buffers of reads and writes, and the MDLs `FltLockUserBuffer` builds for them.
//!
//! # User buffers mean nothing outside their process
//!
//! A read or write requested from user mode carries the caller's buffer as a raw user-mode address
//! (`Parameters.Read.ReadBuffer`, `Parameters.Write.WriteBuffer`). That address names memory only in the
//! requesting process's address space: a system worker thread, or any thread attached to another process, that
//! touches it reads or writes whatever that address holds in *its* process, or faults. Non-paging reads and writes
//! reach a file system in a nonarbitrary thread context, the requestor's
//! (<https://learn.microsoft.com/windows-hardware/drivers/ifs/dispatch-routine-irql-and-thread-context>), which is
//! what lets it use that address. A filter that posts a read or write (pends it and continues in a worker, or
//! issues `FltReadFileEx` from one) must therefore first lock the buffer with `FltLockUserBuffer`, which describes
//! the caller's pages with an MDL, locked "in the correct process context" whatever the caller's
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltlockuserbuffer>), and hand
//! that MDL on.
//!
//! The model registers the buffer of each user-mode read and write ([`register`]) for as long as its request is in
//! flight, with the process that issued it. Every access the model makes to a request's buffer goes through
//! [`buffer_for`]: the model file system filling a read or taking a write's data (in whatever thread the request
//! reaches it, which after `FltCompletePendedPreOperation` is the completing thread), `FltReadFileEx` and
//! `FltWriteFileEx`, and filter-built reads and writes. It answers:
//!
//! - an MDL's pages in any process (locked pages, as the file system maps them);
//! - a registered user buffer only in its own process; anywhere else the access is reported
//!   ([`Rule::UserBufferUnsafeAccess`]) and fails with `STATUS_ACCESS_VIOLATION`, touching nothing;
//! - anything else (pool, a filter's own buffer, the model's buffers for kernel-mode requests) as kernel memory.
//!
//! What the model cannot see: driver code that dereferences the raw address itself rather than handing it to a
//! routine. On the host that memory is readable from every thread. A user-mode request issued by a test thread
//! outside [`crate::kernel::process::run_as`] comes from the System process, like every thread the model starts,
//! so its buffer is bound to System: tests of posting run the requestor in a user process.
//!
//! # MDLs
//!
//! `FltLockUserBuffer` allocates the MDL from nonpaged pool (so pool failure injection reaches it), fills
//! windows-sys's `MDL` (`StartVa` the page of the buffer, `ByteOffset` within it, `ByteCount`, `Process` the
//! owner's `PEPROCESS` for a user buffer, `MdlFlags` `MDL_PAGES_LOCKED`; the pages are not mapped, as the docs
//! say), stores it in `MdlAddress`, and frees it when the callback data is freed: when its operation is over, or
//! at `FltFreeCallbackData`. The model only knows the MDLs it built: an MDL from anywhere else handed to
//! `FltReadFileEx`/`FltWriteFileEx` is reported as `unsupported-by-model`. `MmGetSystemAddressForMdlSafe`
//! (a macro over `MmMapLockedPagesSpecifyCache`) is not modelled: Shunt passes the MDL itself to the backing I/O.

use std::{
    ffi::c_void,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::MDL,
        Storage::FileSystem::Minifilters::{FLT_CALLBACK_DATA, FLTFL_CALLBACK_DATA_DIRTY},
        System::SystemServices::{
            IRP_MJ_DEVICE_CONTROL, IRP_MJ_DIRECTORY_CONTROL, IRP_MJ_FILE_SYSTEM_CONTROL,
            IRP_MJ_INTERNAL_DEVICE_CONTROL, IRP_MJ_QUERY_EA, IRP_MJ_QUERY_QUOTA, IRP_MJ_QUERY_SECURITY, IRP_MJ_READ,
            IRP_MJ_SET_EA, IRP_MJ_SET_QUOTA, IRP_MJ_WRITE, IRP_MN_MDL,
        },
    },
    Win32::Foundation::{
        NTSTATUS, STATUS_ACCESS_VIOLATION, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER,
        STATUS_NOT_IMPLEMENTED, STATUS_NOT_SUPPORTED, STATUS_SUCCESS,
    },
};

use crate::{
    guard::guarded,
    kernel::{
        irql,
        pool::{self, ExAllocatePool2, ExFreePoolWithTag},
        process::{self, Process},
        thread,
    },
    verifier::{self, Rule},
};

const FLTLOCKUSERBUFFER: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltlockuserbuffer";
const THREAD_CONTEXT_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ifs/dispatch-routine-irql-and-thread-context";

/// `MDL_PAGES_LOCKED` (wdm.h; windows-sys does not declare the MDL flags).
pub const MDL_PAGES_LOCKED: i16 = 0x0002;
/// The pool tag the model's MDLs carry (`IoAllocateMdl` uses "Mdl ").
pub const MDL_TAG: u32 = u32::from_le_bytes(*b"Mdl ");
const PAGE_SIZE: usize = 4096;

/// The other majors the docs list for `FltLockUserBuffer`; the model issues none of them with a buffer yet.
const OTHER_LOCKABLE: [u32; 9] = [
    IRP_MJ_DEVICE_CONTROL,
    IRP_MJ_DIRECTORY_CONTROL,
    IRP_MJ_FILE_SYSTEM_CONTROL,
    IRP_MJ_INTERNAL_DEVICE_CONTROL,
    IRP_MJ_QUERY_EA,
    IRP_MJ_QUERY_QUOTA,
    IRP_MJ_QUERY_SECURITY,
    IRP_MJ_SET_EA,
    IRP_MJ_SET_QUOTA,
];

struct LiveBuffer {
    id: u64,
    address: usize,
    len: usize,
    owner: Arc<Process>,
}

struct LockedMdl {
    mdl: usize,
    address: usize,
    len: usize,
    data: usize,
}

#[derive(Default)]
struct State {
    next_id: u64,
    buffers: Vec<LiveBuffer>,
    mdls: Vec<LockedMdl>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    let mut guard: MutexGuard<'_, Option<State>> = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    f(guard.get_or_insert_with(State::default))
}

/// A user buffer registered for the time its request is in flight; dropping it ends the registration.
#[derive(Debug)]
pub struct Registration(Option<u64>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(id) = self.0 {
            with_state(|s| s.buffers.retain(|b| b.id != id));
        }
    }
}

/// Registers `len` bytes at `address` as the user buffer of a request the current thread's process issues.
/// Kernel-mode requests and empty buffers register nothing.
#[must_use]
pub fn register(address: *const u8, len: usize, kernel_mode: bool) -> Registration {
    if kernel_mode || len == 0 || address.is_null() {
        return Registration(None);
    }
    let owner = process::current();
    Registration(Some(with_state(|s| {
        s.next_id += 1;
        let id = s.next_id;
        s.buffers.push(LiveBuffer { id, address: address as usize, len, owner });
        id
    })))
}

/// The process whose user buffer holds `address`, while its request is in flight.
#[must_use]
pub fn owner_of(address: *const c_void) -> Option<Arc<Process>> {
    let address = address as usize;
    with_state(|s| {
        s.buffers.iter().find(|b| address >= b.address && address - b.address < b.len).map(|b| Arc::clone(&b.owner))
    })
}

/// The memory `len` bytes of a request's buffer live in, for `api` to read or write: the pages of `mdl` when it is
/// not NULL (any process), otherwise `raw` (a registered user buffer only in its own process). Failures are
/// reported: a user buffer touched from another process (`STATUS_ACCESS_VIOLATION`), an MDL the model did not build
/// (`STATUS_NOT_IMPLEMENTED`), a length beyond the MDL (`STATUS_INVALID_PARAMETER`).
///
/// # Errors
/// The status the access fails with.
pub fn buffer_for(api: &'static str, mdl: *const MDL, raw: *mut c_void, len: usize) -> Result<*mut u8, NTSTATUS> {
    if !mdl.is_null() {
        let Some((address, count)) =
            with_state(|s| s.mdls.iter().find(|m| m.mdl == mdl as usize).map(|m| (m.address, m.len)))
        else {
            verifier::report(
                Rule::UnsupportedByModel,
                api,
                format!("{mdl:?} is not an MDL FltLockUserBuffer built; the model knows no other MDLs"),
            );
            return Err(STATUS_NOT_IMPLEMENTED);
        };
        if len > count {
            verifier::report(
                Rule::InvalidArgument,
                api,
                format!("{len} bytes do not fit the {count} bytes the MDL {mdl:?} describes"),
            );
            return Err(STATUS_INVALID_PARAMETER);
        }
        return Ok(address as *mut u8);
    }
    if len == 0 {
        return Ok(raw.cast());
    }
    if let Some(owner) = owner_of(raw) {
        let here = process::current();
        if owner.id != here.id {
            verifier::report(
                Rule::UserBufferUnsafeAccess,
                api,
                format!(
                    "{raw:?} is the user buffer of a request from process {} but is touched in process {}: a user \
                     address means something only in its own process; lock it with FltLockUserBuffer and pass the \
                     MDL (see {THREAD_CONTEXT_DOCS})",
                    owner.id, here.id
                ),
            );
            return Err(STATUS_ACCESS_VIOLATION);
        }
    }
    Ok(raw.cast())
}

/// Frees the MDLs `FltLockUserBuffer` built for `data`, when the callback data is freed.
pub(crate) fn release(data: *const FLT_CALLBACK_DATA) {
    // Runs whenever any callback data is freed; almost always there is no MDL to free and nothing is allocated.
    let freed: Vec<usize> = with_state(|s| {
        let mut freed = Vec::new();
        s.mdls.retain(|m| {
            let gone = m.data == data as usize;
            if gone {
                freed.push(m.mdl);
            }
            !gone
        });
        freed
    });
    for mdl in freed {
        ExFreePoolWithTag(mdl as *mut c_void, MDL_TAG);
    }
}

/// The MDLs `FltLockUserBuffer` built that are not freed yet.
#[must_use]
pub fn live_mdls() -> usize {
    with_state(|s| s.mdls.len())
}

/// Builds the MDL for `len` bytes at `address`, owned by `owner` (a user buffer) or by no process (kernel memory).
fn build_mdl(address: usize, len: usize, owner: Option<&Arc<Process>>, data: usize) -> Result<*mut MDL, NTSTATUS> {
    let offset = address % PAGE_SIZE;
    let pages = offset.checked_add(len).and_then(|end| end.checked_add(PAGE_SIZE - 1)).map(|end| end / PAGE_SIZE);
    let size = pages.and_then(|p| p.checked_mul(size_of::<usize>())).and_then(|p| p.checked_add(size_of::<MDL>()));
    let (Some(size), Ok(count)) = (size, u32::try_from(len)) else { return Err(STATUS_INSUFFICIENT_RESOURCES) };
    let memory = ExAllocatePool2(pool::flags::NON_PAGED, size, MDL_TAG);
    if memory.is_null() {
        return Err(STATUS_INSUFFICIENT_RESOURCES);
    }
    let mdl = memory.cast::<MDL>();
    let header = MDL {
        Next: std::ptr::null_mut(),
        Size: i16::try_from(size).unwrap_or(i16::MAX),
        MdlFlags: MDL_PAGES_LOCKED,
        Process: owner
            .map_or(std::ptr::null_mut(), |p| std::ptr::without_provenance_mut(p.peprocess().cast_unsigned())),
        MappedSystemVa: std::ptr::null_mut(),
        StartVa: (address - offset) as *mut c_void,
        ByteCount: count,
        ByteOffset: u32::try_from(offset).unwrap_or(0),
    };
    // SAFETY: `memory` is a fresh nonpaged allocation of at least size_of::<MDL>() bytes, 16-byte aligned.
    unsafe { mdl.write(header) };
    with_state(|s| s.mdls.push(LockedMdl { mdl: mdl as usize, address, len, data }));
    Ok(mdl)
}

/// `FltLockUserBuffer`: ≤ APC_LEVEL; callback data of an operation in flight (or allocated by
/// `FltAllocateCallbackData`); for `IRP_MJ_READ` and `IRP_MJ_WRITE` (not `IRP_MN_MDL`, which answers
/// `STATUS_INVALID_PARAMETER`), builds an MDL for the buffer, stores it in `MdlAddress` and, called from a
/// pre-operation callback, sets `FLTFL_CALLBACK_DATA_DIRTY`; an MDL already there answers `STATUS_SUCCESS`. The
/// caller may run in any process (the docs: the buffer is locked in the right process context). The other majors
/// the docs list carry no buffer in the model yet (`unsupported-by-model`, `STATUS_NOT_SUPPORTED`); majors the docs
/// do not list answer `STATUS_INVALID_PARAMETER`. A pool failure answers `STATUS_INSUFFICIENT_RESOURCES`. A read or
/// write without a buffer has nothing to lock: `STATUS_INVALID_PARAMETER` (the docs leave it open; stricter).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltlockuserbuffer>.
///
/// # Safety
/// Called by driver code with a callback data pointer; the model checks it is one it handed out.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltLockUserBuffer(callback_data: *const FLT_CALLBACK_DATA) -> NTSTATUS {
    const API: &str = "FltLockUserBuffer";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, FLTLOCKUSERBUFFER) {
            return STATUS_INVALID_PARAMETER;
        }
        if !super::dispatch::is_live_callback_data(callback_data) {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!("{callback_data:?} is not the callback data of an operation in flight or allocated"),
            );
            return STATUS_INVALID_PARAMETER;
        }
        let data = callback_data.cast_mut();
        // SAFETY: live callback data points to its parameter block, which lives as long as the data.
        let iopb = unsafe { (*data).Iopb }.cast_mut();
        // SAFETY: as above; the model and the driver's callback do not hold other references to it during this call.
        let iopb = unsafe { &mut *iopb };
        let (address, length, mdl_slot) = match u32::from(iopb.MajorFunction) {
            IRP_MJ_READ | IRP_MJ_WRITE if u32::from(iopb.MinorFunction) & IRP_MN_MDL != 0 => {
                return STATUS_INVALID_PARAMETER;
            }
            IRP_MJ_READ => {
                // SAFETY: the union holds the Read parameters for IRP_MJ_READ.
                let read = unsafe { &mut iopb.Parameters.Read };
                (read.ReadBuffer, read.Length, &raw mut read.MdlAddress)
            }
            IRP_MJ_WRITE => {
                // SAFETY: the union holds the Write parameters for IRP_MJ_WRITE.
                let write = unsafe { &mut iopb.Parameters.Write };
                (write.WriteBuffer, write.Length, &raw mut write.MdlAddress)
            }
            other if OTHER_LOCKABLE.contains(&other) => {
                verifier::report(
                    Rule::UnsupportedByModel,
                    API,
                    format!("major function {other:#04x} carries no buffer in the model yet"),
                );
                return STATUS_NOT_SUPPORTED;
            }
            _ => return STATUS_INVALID_PARAMETER,
        };
        // SAFETY: `mdl_slot` points into the live parameter block (a packed structure: read unaligned).
        if !unsafe { mdl_slot.read_unaligned() }.is_null() {
            return STATUS_SUCCESS;
        }
        let len = usize::try_from(length).unwrap_or(usize::MAX);
        if address.is_null() || len == 0 {
            return STATUS_INVALID_PARAMETER;
        }
        let owner = owner_of(address);
        let mdl = match build_mdl(address as usize, len, owner.as_ref(), data as usize) {
            Ok(mdl) => mdl,
            Err(status) => return status,
        };
        // SAFETY: as above.
        unsafe { mdl_slot.write_unaligned(mdl) };
        let in_pre_operation = super::dispatch::callback_frames().last().is_some_and(|frame| !frame.post);
        if in_pre_operation {
            // SAFETY: live callback data; the driver owns it as much as the model does during its callback.
            unsafe { (*data).Flags |= FLTFL_CALLBACK_DATA_DIRTY };
        }
        STATUS_SUCCESS
    })
}
