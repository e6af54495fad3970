//! Filter-owned byte-range locks: `FltAllocateFileLock`, `FltProcessFileLock`, `FltCheckLockForReadAccess`,
//! `FltCheckLockForWriteAccess`, `FsRtlFastUnlockAll`, `FltFreeFileLock`, over the lock package of
//! [`crate::io::locks`]. A filter that serves a file's data itself (as Shunt's forward rules do) keeps the file's
//! locks in one of these, so its reads and writes honour them. Locks never freed are reported at unload.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    ffi::c_void,
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::{FILE_OBJECT, PEPROCESS},
        Storage::FileSystem::{
            FILE_LOCK,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE, FLT_PREOP_PENDING,
                FLTFL_CALLBACK_DATA_IRP_OPERATION, PFLT_COMPLETE_LOCK_CALLBACK_DATA_ROUTINE,
            },
            PUNLOCK_ROUTINE,
        },
        System::SystemServices::{
            IRP_MJ_LOCK_CONTROL, IRP_MJ_READ, IRP_MJ_WRITE, IRP_MN_LOCK, IRP_MN_UNLOCK_ALL, IRP_MN_UNLOCK_ALL_BY_KEY,
            IRP_MN_UNLOCK_SINGLE,
        },
    },
    Win32::Foundation::{
        NTSTATUS, STATUS_CANCELLED, STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
    },
};

use super::dispatch::requestor;
use crate::{
    guard::guarded,
    io::locks::{Grant, Lock, LockTable, Owner, Waiter},
    kernel::{irql, process, thread},
    verifier::{self, Rule},
};

const DOCS: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltprocessfilelock";
const ALLOCATE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatefilelock";
const UNLOCK_ALL_DOCS: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-_fsrtl_advanced_fcb_header-fsrtlfastunlockall";

/// A lock request `FltProcessFileLock` pended: its callback data and the context it was given.
#[derive(Clone, Copy)]
struct Pended {
    data: usize,
    context: usize,
}

struct FileLock {
    table: LockTable,
    /// The `CompleteLockCallbackDataRoutine` given to `FltAllocateFileLock`.
    complete: PFLT_COMPLETE_LOCK_CALLBACK_DATA_ROUTINE,
    /// The pended requests waiting in `table`, by [`Waiter::id`].
    pended: BTreeMap<u64, Pended>,
}

/// Live filter-owned locks by address; the address is a leaked box the driver holds as its `FILE_LOCK`.
static LOCKS: Mutex<BTreeMap<usize, FileLock>> = Mutex::new(BTreeMap::new());

fn locks() -> MutexGuard<'static, BTreeMap<usize, FileLock>> {
    LOCKS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The callback data of lock requests the lock package pended and has not completed yet → (lock, waiter id). An
/// entry stays until the completion has been handed to Filter Manager, so the requestor's wait knows it waits for
/// a lock (and applies [`Rule::LockWaitDeadlock`], not the rule for pended operations).
static IN_WAIT: Mutex<BTreeMap<usize, (usize, u64)>> = Mutex::new(BTreeMap::new());

fn in_wait() -> MutexGuard<'static, BTreeMap<usize, (usize, u64)>> {
    IN_WAIT.lock().unwrap_or_else(PoisonError::into_inner)
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

/// A pended request the lock package is about to complete: granted (`STATUS_SUCCESS`) or cancelled.
struct Done {
    waiter: Waiter,
    pended: Pended,
    status: NTSTATUS,
    complete: PFLT_COMPLETE_LOCK_CALLBACK_DATA_ROUTINE,
}

/// Takes the pended requests of `waiters` (granted or cancelled with `status`) out of `file_lock`.
fn take_done(file_lock: &mut FileLock, waiters: Vec<Waiter>, status: NTSTATUS) -> Vec<Done> {
    waiters
        .into_iter()
        .filter_map(|waiter| {
            let pended = file_lock.pended.remove(&waiter.id)?;
            Some(Done { waiter, pended, status, complete: file_lock.complete })
        })
        .collect()
}

/// Calls the lock's `CompleteLockCallbackDataRoutine` for the lock operation `data` that is being completed: Filter
/// Manager calls it "when the lock operation is completed", only for an IRP-based operation and a routine that is
/// not NULL (<https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltprocessfilelock>).
/// Returns its status (`STATUS_SUCCESS` when it was not called).
fn notify(
    complete: PFLT_COMPLETE_LOCK_CALLBACK_DATA_ROUTINE,
    context: usize,
    data: *mut FLT_CALLBACK_DATA,
) -> NTSTATUS {
    let Some(routine) = complete else { return STATUS_SUCCESS };
    // SAFETY: the callback data of a lock operation that is still in progress.
    let irp = unsafe { data.as_ref() }.is_some_and(|d| d.Flags & FLTFL_CALLBACK_DATA_IRP_OPERATION != 0);
    if !irp {
        return STATUS_SUCCESS;
    }
    // SAFETY: the routine the driver registered with FltAllocateFileLock, given the context it passed to
    // FltProcessFileLock and the operation being completed.
    unsafe { routine(context as *const c_void, data) }
}

/// Sets the final status of the lock operation `data`, with no information.
fn set_status(data: *mut FLT_CALLBACK_DATA, status: NTSTATUS) {
    // SAFETY: the callback data of a lock operation that is still in progress.
    if let Some(data) = unsafe { data.as_mut() } {
        data.IoStatus.Anonymous.Status = status;
        data.IoStatus.Information = 0;
    }
}

/// A granted lock whose completion routine failed is removed from the file, as the routine's page says ("If it
/// returns an NTSTATUS value that is not a success code, the file lock is removed from the file",
/// <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_complete_lock_callback_data_routine>);
/// the operation then completes with the routine's status (the docs are silent on the status; our reading). Returns
/// the pended requests that removal granted.
fn withdraw(lock: usize, granted: &Lock) -> Vec<Done> {
    let mut all = locks();
    let Some(file_lock) = all.get_mut(&lock) else { return Vec::new() };
    let waiters =
        file_lock.table.unlock(granted.owner, granted.key, granted.offset, granted.length).unwrap_or_default();
    take_done(file_lock, waiters, STATUS_SUCCESS)
}

/// Completes pended requests of `lock`, oldest first, through Filter Manager: the status goes into the callback
/// data, the `CompleteLockCallbackDataRoutine` is called, and the operation completes as
/// `FltCompletePendedPreOperation` with `FLT_PREOP_COMPLETE` completes it, in the calling thread's context.
fn complete_pended(lock: usize, done: Vec<Done>) {
    let mut todo: VecDeque<Done> = done.into();
    while let Some(done) = todo.pop_front() {
        let data = done.pended.data as *mut FLT_CALLBACK_DATA;
        if !super::pending::awaits_completion(data) {
            in_wait().remove(&done.pended.data);
            verifier::report(
                Rule::InvalidArgument,
                "FltProcessFileLock",
                format!(
                    "FltProcessFileLock pended lock request {data:?} (it returned FLT_PREOP_PENDING) but the \
                     pre-operation callback did not return FLT_PREOP_PENDING with it ({DOCS}); the request is dropped"
                ),
            );
            continue;
        }
        set_status(data, done.status);
        let routine = notify(done.complete, done.pended.context, data);
        if done.status >= 0 && routine < 0 {
            set_status(data, routine);
            todo.extend(withdraw(lock, &done.waiter.lock));
        }
        super::pending::FltCompletePendedPreOperation(data, FLT_PREOP_COMPLETE, std::ptr::null());
        // Only now: until Filter Manager has the completion, the requestor's wait is a lock wait.
        in_wait().remove(&done.pended.data);
    }
}

/// Whether the pended operation `data` is a lock request waiting in a filter-owned lock (or granted and not yet
/// handed to Filter Manager).
pub(crate) fn waits_for_lock(data: *const FLT_CALLBACK_DATA) -> bool {
    in_wait().contains_key(&(data as usize))
}

/// A waiting lock request taken out of its lock's queue because nothing could end its wait.
pub(crate) struct Abandoned(Vec<Done>);

impl Abandoned {
    /// Sets `STATUS_CANCELLED` in its callback data and calls the completion routine; Filter Manager's wait then
    /// fails the operation.
    pub(crate) fn complete(self) {
        for done in self.0 {
            let data = done.pended.data as *mut FLT_CALLBACK_DATA;
            set_status(data, STATUS_CANCELLED);
            let _ = notify(done.complete, done.pended.context, data);
        }
    }
}

/// Takes the waiting lock request `data` out of its lock's queue, when nothing can end its wait. `None` when it no
/// longer waits (it was granted meanwhile, and its completion is on the way).
pub(crate) fn abandon(data: *const FLT_CALLBACK_DATA) -> Option<Abandoned> {
    let (lock, id) = in_wait().get(&(data as usize)).copied()?;
    let done = {
        let mut all = locks();
        let file_lock = all.get_mut(&lock)?;
        let waiter = file_lock.table.cancel(id)?;
        take_done(file_lock, vec![waiter], STATUS_CANCELLED)
    };
    in_wait().remove(&(data as usize));
    Some(Abandoned(done))
}

/// `FltAllocateFileLock`: ≤ APC_LEVEL; a new, empty lock owned by the calling filter, with the
/// `CompleteLockCallbackDataRoutine` called whenever a lock operation on it completes (the `UnlockRoutine` is not
/// called: not modelled).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatefilelock>.
#[unsafe(no_mangle)]
pub extern "system" fn FltAllocateFileLock(
    complete: PFLT_COMPLETE_LOCK_CALLBACK_DATA_ROUTINE,
    _unlock: PUNLOCK_ROUTINE,
) -> *mut FILE_LOCK {
    const API: &str = "FltAllocateFileLock";
    guarded(API, std::ptr::null_mut(), || {
        if !thread::require_irql_at_most(API, irql::APC, ALLOCATE_DOCS) {
            return std::ptr::null_mut();
        }
        // The driver only ever passes the pointer back; the model keeps the lock's state beside it.
        let token = Box::into_raw(Box::new(0u64)).cast::<FILE_LOCK>();
        locks().insert(token as usize, FileLock { table: LockTable::default(), complete, pended: BTreeMap::new() });
        token
    })
}

/// `FltFreeFileLock`: ≤ APC_LEVEL; a lock from `FltAllocateFileLock`, freed once. Uninitializing a file lock
/// completes its outstanding `IRP_MJ_LOCK_CONTROL` requests
/// (<https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-_fsrtl_advanced_fcb_header-fsrtluninitializefilelock>):
/// requests still waiting complete with `STATUS_CANCELLED` (the docs give no status; the model uses the one a
/// cleanup gives queued requests).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltfreefilelock>.
#[unsafe(no_mangle)]
pub extern "system" fn FltFreeFileLock(lock: *const FILE_LOCK) {
    const API: &str = "FltFreeFileLock";
    guarded(API, (), || {
        if check(API, lock) {
            let done = locks().get_mut(&(lock as usize)).map_or_else(Vec::new, |file_lock| {
                let waiters = file_lock.table.cancel_where(|_| true);
                take_done(file_lock, waiters, STATUS_CANCELLED)
            });
            complete_pended(lock as usize, done);
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

/// What `FltProcessFileLock` does with a lock operation.
enum Outcome {
    /// Complete it now with this status; complete these pended requests the operation granted.
    Now(NTSTATUS, Vec<Done>, Option<Lock>),
    /// The request waits: `FLT_PREOP_PENDING`.
    Pended,
}

/// `FltProcessFileLock`: ≤ APC_LEVEL; an `IRP_MJ_LOCK_CONTROL` operation, which it completes against the lock:
/// lock, unlock one range, unlock all of the owner's, unlock all by key. A lock request that conflicts with a
/// granted lock fails with `STATUS_LOCK_NOT_GRANTED` when `FailImmediately` is set; otherwise it is pended and the
/// call returns `FLT_PREOP_PENDING` ("The lock operation has been pended"), which the pre-operation callback
/// returns. When the conflicting locks go (an unlock here, `FsRtlFastUnlockAll`), the lock package grants it and
/// completes it through Filter Manager, as `FltCompletePendedPreOperation` with `FLT_PREOP_COMPLETE` would, in the
/// releasing thread's context; the driver must not complete it itself. Every completion of an IRP-based operation
/// calls the lock's `CompleteLockCallbackDataRoutine` first; a failure from it removes the lock granted.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltprocessfilelock>.
///
/// # Safety
/// Called by driver code with the callback data of a lock operation in progress.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltProcessFileLock(
    lock: *const FILE_LOCK,
    callback_data: *const FLT_CALLBACK_DATA,
    context: *const c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    const API: &str = "FltProcessFileLock";
    guarded(API, FLT_PREOP_COMPLETE, || {
        let data_ptr = callback_data.cast_mut();
        // SAFETY: the driver passes the callback data of an operation in progress.
        let Some(data) = (unsafe { data_ptr.as_mut() }) else { return FLT_PREOP_COMPLETE };
        let complete = |data: &mut FLT_CALLBACK_DATA, status: NTSTATUS| {
            set_status(data, status);
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
        let (outcome, routine) = {
            let mut all = locks();
            let Some(file_lock) = all.get_mut(&(lock as usize)) else {
                return complete(data, STATUS_INVALID_PARAMETER);
            };
            let released = |file_lock: &mut FileLock, granted: Vec<Waiter>| {
                Outcome::Now(STATUS_SUCCESS, take_done(file_lock, granted, STATUS_SUCCESS), None)
            };
            let outcome = match minor {
                IRP_MN_LOCK => {
                    let request = Lock { owner, key: params.Key, offset, length, exclusive: params.ExclusiveLock };
                    if params.FailImmediately {
                        match file_lock.table.lock(request) {
                            Ok(()) => Outcome::Now(STATUS_SUCCESS, Vec::new(), Some(request)),
                            Err(status) => Outcome::Now(status, Vec::new(), None),
                        }
                    } else {
                        match file_lock.table.lock_or_wait(request) {
                            Grant::Granted => Outcome::Now(STATUS_SUCCESS, Vec::new(), Some(request)),
                            Grant::Waiting(id) => {
                                let pended = Pended { data: data_ptr as usize, context: context as usize };
                                file_lock.pended.insert(id, pended);
                                in_wait().insert(data_ptr as usize, (lock as usize, id));
                                Outcome::Pended
                            }
                        }
                    }
                }
                IRP_MN_UNLOCK_SINGLE => match file_lock.table.unlock(owner, params.Key, offset, length) {
                    Ok(granted) => released(file_lock, granted),
                    Err(status) => Outcome::Now(status, Vec::new(), None),
                },
                IRP_MN_UNLOCK_ALL => {
                    let granted = file_lock.table.unlock_all(owner);
                    released(file_lock, granted)
                }
                IRP_MN_UNLOCK_ALL_BY_KEY => {
                    let granted = file_lock.table.unlock_all_by_key(owner, params.Key);
                    released(file_lock, granted)
                }
                _ => Outcome::Now(STATUS_INVALID_DEVICE_REQUEST, Vec::new(), None),
            };
            (outcome, file_lock.complete)
        };
        let Outcome::Now(status, mut granted, taken) = outcome else { return FLT_PREOP_PENDING };
        complete(data, status);
        let answer = notify(routine, context as usize, data_ptr);
        if answer < 0
            && let Some(taken) = taken
        {
            // The routine failed the lock just granted: it is removed from the file (the routine's page), and the
            // operation completes with the routine's status, as a pended one does.
            granted.extend(withdraw(lock as usize, &taken));
            complete(data, answer);
        }
        complete_pended(lock as usize, granted);
        FLT_PREOP_COMPLETE
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

/// `FsRtlFastUnlockAll`: ≤ APC_LEVEL (the page's IRQL; the model allowed DISPATCH_LEVEL before it completed
/// requests); releases every lock of (file object, process), as at cleanup, and then "completes any currently
/// queued lock IRPs that can now be completed". The requests of that file object and process still waiting are
/// cancelled first (`STATUS_CANCELLED`): the page is silent on them, and a cleanup must cancel its file object's
/// queued requests (<https://learn.microsoft.com/windows-hardware/drivers/kernel/irp-mj-cleanup>), which a filter
/// does through this call (stricter than documented).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-_fsrtl_advanced_fcb_header-fsrtlfastunlockall>.
#[unsafe(no_mangle)]
pub extern "system" fn FsRtlFastUnlockAll(
    lock: *const FILE_LOCK,
    file_object: *const FILE_OBJECT,
    process: PEPROCESS,
    _context: *const c_void,
) -> NTSTATUS {
    const API: &str = "FsRtlFastUnlockAll";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, UNLOCK_ALL_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        let owner = Owner { file_object: file_object as usize, process: process_id(process) };
        let done = match locks().get_mut(&(lock as usize)) {
            Some(file_lock) => {
                let cancelled = file_lock.table.cancel_where(|w| w.lock.owner == owner);
                let mut done = take_done(file_lock, cancelled, STATUS_CANCELLED);
                let granted = file_lock.table.unlock_all(owner);
                done.extend(take_done(file_lock, granted, STATUS_SUCCESS));
                done
            }
            None => return STATUS_INVALID_PARAMETER,
        };
        complete_pended(lock as usize, done);
        STATUS_SUCCESS
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
