//! Filter-owned byte-range locks: `FltAllocateFileLock`, `FltProcessFileLock`, `FltCheckLockForReadAccess`,
//! `FltCheckLockForWriteAccess`, `FsRtlFastUnlockAll`, `FltFreeFileLock`, over the lock package of
//! [`crate::io::locks`]. A filter that serves a file's data itself (as Shunt's forward rules do) keeps the file's
//! locks in one of these, so its reads and writes honour them. Locks never freed are reported at unload.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::c_void,
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::{FILE_OBJECT, PEPROCESS},
        Storage::FileSystem::{
            FILE_LOCK,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE,
                PFLT_COMPLETE_LOCK_CALLBACK_DATA_ROUTINE,
            },
            PUNLOCK_ROUTINE,
        },
        System::SystemServices::{
            IRP_MJ_LOCK_CONTROL, IRP_MJ_READ, IRP_MJ_WRITE, IRP_MN_LOCK, IRP_MN_UNLOCK_ALL, IRP_MN_UNLOCK_ALL_BY_KEY,
            IRP_MN_UNLOCK_SINGLE,
        },
    },
    Win32::Foundation::{NTSTATUS, STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_PARAMETER, STATUS_SUCCESS},
};

use super::dispatch::requestor;
use crate::{
    guard::guarded,
    io::locks::{Lock, LockTable, Owner},
    kernel::{irql, process, thread},
    verifier::{self, Rule},
};

const DOCS: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltprocessfilelock";

struct FileLock {
    table: LockTable,
}

/// Live filter-owned locks by address; the address is a leaked box the driver holds as its `FILE_LOCK`.
static LOCKS: Mutex<BTreeMap<usize, FileLock>> = Mutex::new(BTreeMap::new());

fn locks() -> MutexGuard<'static, BTreeMap<usize, FileLock>> {
    LOCKS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn check(api: &'static str, lock: *const FILE_LOCK) -> bool {
    if !thread::require_irql_at_most(api, irql::APC, DOCS) {
        return false;
    }
    if locks().contains_key(&(lock as usize)) {
        return true;
    }
    verifier::report(Rule::InvalidArgument, api, format!("{lock:?} is not a file lock from FltAllocateFileLock"));
    false
}

/// `FltAllocateFileLock`: ≤ APC_LEVEL; a new, empty lock owned by the calling filter.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatefilelock>.
#[unsafe(no_mangle)]
pub extern "system" fn FltAllocateFileLock(
    _complete: PFLT_COMPLETE_LOCK_CALLBACK_DATA_ROUTINE,
    _unlock: PUNLOCK_ROUTINE,
) -> *mut FILE_LOCK {
    const API: &str = "FltAllocateFileLock";
    guarded(API, std::ptr::null_mut(), || {
        if !thread::require_irql_at_most(API, irql::APC, DOCS) {
            return std::ptr::null_mut();
        }
        // The driver only ever passes the pointer back; the model keeps the lock's state beside it.
        let token = Box::into_raw(Box::new(0u64)).cast::<FILE_LOCK>();
        locks().insert(token as usize, FileLock { table: LockTable::default() });
        token
    })
}

/// `FltFreeFileLock`: ≤ APC_LEVEL; a lock from `FltAllocateFileLock`, freed once.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltfreefilelock>.
#[unsafe(no_mangle)]
pub extern "system" fn FltFreeFileLock(lock: *const FILE_LOCK) {
    const API: &str = "FltFreeFileLock";
    guarded(API, (), || {
        if check(API, lock) {
            locks().remove(&(lock as usize));
            // SAFETY: the token was leaked from a Box<u64> in FltAllocateFileLock and is freed once.
            drop(unsafe { Box::from_raw(lock.cast_mut().cast::<u64>()) });
        }
    });
}

fn process_id(peprocess: PEPROCESS) -> usize {
    process::from_peprocess(peprocess).map_or_else(|| process::current().id, |p| p.id)
}

/// The owner of an operation: its file object and requesting process.
fn owner_of(data: &FLT_CALLBACK_DATA, file_object: *const FILE_OBJECT) -> Owner {
    let process = requestor(data).map_or_else(|| process::current().id, |p| p.id);
    Owner { file_object: file_object as usize, process }
}

/// `FltProcessFileLock`: ≤ APC_LEVEL; an `IRP_MJ_LOCK_CONTROL` operation, which it completes against the lock:
/// lock, unlock one range, unlock all of the owner's. Locks that would wait are not modelled (they fail with
/// `STATUS_LOCK_NOT_GRANTED`, reported).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltprocessfilelock>.
///
/// # Safety
/// Called by driver code with the callback data of a lock operation in progress.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltProcessFileLock(
    lock: *const FILE_LOCK,
    callback_data: *const FLT_CALLBACK_DATA,
    _context: *const c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    const API: &str = "FltProcessFileLock";
    guarded(API, FLT_PREOP_COMPLETE, || {
        // SAFETY: the driver passes the callback data of an operation in progress.
        let Some(data) = (unsafe { callback_data.cast_mut().as_mut() }) else { return FLT_PREOP_COMPLETE };
        let complete = |data: &mut FLT_CALLBACK_DATA, status: NTSTATUS| {
            data.IoStatus.Anonymous.Status = status;
            data.IoStatus.Information = 0;
            FLT_PREOP_COMPLETE
        };
        if !check(API, lock) {
            return complete(data, STATUS_INVALID_PARAMETER);
        }
        // SAFETY: its parameter block lives as long as the operation.
        let Some(iopb) = (unsafe { data.Iopb.as_ref() }) else { return complete(data, STATUS_INVALID_PARAMETER) };
        if u32::from(iopb.MajorFunction) != IRP_MJ_LOCK_CONTROL {
            verifier::report(Rule::InvalidArgument, API, "the operation is not IRP_MJ_LOCK_CONTROL");
            return complete(data, STATUS_INVALID_DEVICE_REQUEST);
        }
        // SAFETY: the union holds the LockControl parameters for IRP_MJ_LOCK_CONTROL.
        let params = unsafe { iopb.Parameters.LockControl };
        // SAFETY: Length points to the operation's LARGE_INTEGER.
        let length = unsafe { params.Length.as_ref() }.and_then(|l| u64::try_from(*l).ok()).unwrap_or(0);
        let offset = u64::try_from(params.ByteOffset).unwrap_or(0);
        let owner = Owner { file_object: iopb.TargetFileObject as usize, process: process_id(params.ProcessId) };
        let minor = u32::from(iopb.MinorFunction);
        let result = {
            let mut all = locks();
            let Some(file_lock) = all.get_mut(&(lock as usize)) else {
                return complete(data, STATUS_INVALID_PARAMETER);
            };
            match minor {
                IRP_MN_LOCK => {
                    let result = file_lock.table.lock(Lock {
                        owner,
                        key: params.Key,
                        offset,
                        length,
                        exclusive: params.ExclusiveLock,
                    });
                    if result.is_err() && !params.FailImmediately {
                        drop(all);
                        verifier::report(
                            Rule::UnsupportedByModel,
                            API,
                            "a lock request that would wait is not modelled; it fails",
                        );
                        return complete(data, windows_sys::Win32::Foundation::STATUS_LOCK_NOT_GRANTED);
                    }
                    result
                }
                IRP_MN_UNLOCK_SINGLE => file_lock.table.unlock(owner, params.Key, offset, length),
                IRP_MN_UNLOCK_ALL => {
                    file_lock.table.unlock_all(owner);
                    Ok(())
                }
                IRP_MN_UNLOCK_ALL_BY_KEY => {
                    file_lock.table.unlock_all_by_key(owner, params.Key);
                    Ok(())
                }
                _ => Err(STATUS_INVALID_DEVICE_REQUEST),
            }
        };
        complete(data, result.err().unwrap_or(STATUS_SUCCESS))
    })
}

fn check_access(
    api: &'static str,
    lock: *const FILE_LOCK,
    callback_data: *const FLT_CALLBACK_DATA,
    write: bool,
) -> bool {
    if !check(api, lock) {
        return false;
    }
    // SAFETY: the driver passes the callback data of a read or write in progress.
    let Some(data) = (unsafe { callback_data.as_ref() }) else { return false };
    // SAFETY: its parameter block.
    let Some(iopb) = (unsafe { data.Iopb.as_ref() }) else { return false };
    let (offset, length) = match u32::from(iopb.MajorFunction) {
        IRP_MJ_READ => {
            // SAFETY: the union holds the Read parameters for IRP_MJ_READ.
            let read = unsafe { &iopb.Parameters.Read };
            (read.ByteOffset, read.Length)
        }
        IRP_MJ_WRITE => {
            // SAFETY: the union holds the Write parameters for IRP_MJ_WRITE.
            let write = unsafe { &iopb.Parameters.Write };
            (write.ByteOffset, write.Length)
        }
        _ => {
            verifier::report(Rule::InvalidArgument, api, "the operation is neither a read nor a write");
            return false;
        }
    };
    let owner = owner_of(data, iopb.TargetFileObject);
    let offset = u64::try_from(offset).unwrap_or(0);
    locks().get(&(lock as usize)).is_some_and(|l| {
        if write {
            l.table.can_write(owner, offset, u64::from(length))
        } else {
            l.table.can_read(owner, offset, u64::from(length))
        }
    })
}

/// `FltCheckLockForReadAccess`: ≤ APC_LEVEL; whether the read's range is free of other owners' exclusive locks.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltchecklockforreadaccess>.
#[unsafe(no_mangle)]
pub extern "system" fn FltCheckLockForReadAccess(
    lock: *const FILE_LOCK,
    callback_data: *const FLT_CALLBACK_DATA,
) -> bool {
    guarded("FltCheckLockForReadAccess", false, || {
        check_access("FltCheckLockForReadAccess", lock, callback_data, false)
    })
}

/// `FltCheckLockForWriteAccess`: ≤ APC_LEVEL; whether the write's range is free of other owners' locks and of
/// shared locks.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltchecklockforwriteaccess>.
#[unsafe(no_mangle)]
pub extern "system" fn FltCheckLockForWriteAccess(
    lock: *const FILE_LOCK,
    callback_data: *const FLT_CALLBACK_DATA,
) -> bool {
    guarded("FltCheckLockForWriteAccess", false, || {
        check_access("FltCheckLockForWriteAccess", lock, callback_data, true)
    })
}

/// `FsRtlFastUnlockAll`: ≤ DISPATCH_LEVEL; releases every lock of (file object, process), as at cleanup.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-fsrtlfastunlockall>.
#[unsafe(no_mangle)]
pub extern "system" fn FsRtlFastUnlockAll(
    lock: *const FILE_LOCK,
    file_object: *const FILE_OBJECT,
    process: PEPROCESS,
    _context: *const c_void,
) -> NTSTATUS {
    const API: &str = "FsRtlFastUnlockAll";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        const UNLOCK_DOCS: &str =
            "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-fsrtlfastunlockall";
        if !thread::require_irql_at_most(API, irql::DISPATCH, UNLOCK_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        let owner = Owner { file_object: file_object as usize, process: process_id(process) };
        match locks().get_mut(&(lock as usize)) {
            Some(l) => {
                l.table.unlock_all(owner);
                STATUS_SUCCESS
            }
            None => STATUS_INVALID_PARAMETER,
        }
    })
}

/// The addresses of the live locks; the loader snapshots them when a driver loads.
pub(crate) fn live() -> BTreeSet<usize> {
    locks().keys().copied().collect()
}

/// Reports the file locks allocated since `before` (the driver's load) and never freed; called when the driver
/// unloads. Locks are the driver's, not one filter's: `DriverEntry` may allocate them before any callback runs.
pub(crate) fn report_leaks(before: &BTreeSet<usize>, after: &str) {
    let count = locks().keys().filter(|address| !before.contains(address)).count();
    if count > 0 {
        verifier::report(
            Rule::FileLockLeak,
            "FltFreeFileLock",
            format!("{count} file locks never freed after {after}"),
        );
    }
}
