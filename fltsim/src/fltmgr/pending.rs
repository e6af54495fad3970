//! Pended operations and Filter Manager work items: `FLT_PREOP_PENDING` with `FltCompletePendedPreOperation`,
//! deferred-I/O work items (`FltAllocateDeferredIoWorkItem`, `FltQueueDeferredIoWorkItem`,
//! `FltFreeDeferredIoWorkItem`) and generic work items (`FltAllocateGenericWorkItem`, `FltQueueGenericWorkItem`,
//! `FltFreeGenericWorkItem`), all running on the model's system workers ([`crate::kernel::work`]).
//!
//! A pended pre-operation continues when the driver completes it, in the completing thread: the rest of the
//! operation (lower filters, the file system, post-operation callbacks) sees that thread's IRQL, APC state,
//! top-level IRP and process, and `FltCompletePendedPreOperation` returns once it is done, as on Windows. If the
//! operation is never completed — nothing is left on the system workers and no completion came — the model reports
//! it ([`Rule::PendedNeverCompleted`]) and fails the operation with `STATUS_CANCELLED`, instead of hanging: the
//! hazard is found by rule, not by a timeout.
//!
//! Every queued work item holds a rundown reference on its filter, as Filter Manager's work items do: once
//! `FltUnregisterFilter` has begun, queueing fails with `STATUS_FLT_DELETING_OBJECT` ("the minifilter driver is
//! being unloaded"), and `FltUnregisterFilter` does not return before the filter's items, queued or running, have
//! returned. Called from one of the filter's own work items, that wait would wait for itself; the
//! model reports it ([`Rule::UnregisterWaitsForItself`]) and does not wait for the calling item.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    ffi::c_void,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use windows_sys::{
    Wdk::{
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE, FLT_PREOP_SUCCESS_NO_CALLBACK,
            FLT_PREOP_SUCCESS_WITH_CALLBACK, FLTFL_CALLBACK_DATA_IRP_OPERATION, PFLT_DEFERRED_IO_WORKITEM,
            PFLT_DEFERRED_IO_WORKITEM_ROUTINE, PFLT_FILTER, PFLT_GENERIC_WORKITEM, PFLT_GENERIC_WORKITEM_ROUTINE,
        },
        System::SystemServices::{CriticalWorkQueue, DelayedWorkQueue, IRP_PAGING_IO, WORK_QUEUE_TYPE},
    },
    Win32::Foundation::{
        NTSTATUS, STATUS_FLT_DELETING_OBJECT, STATUS_FLT_NOT_SAFE_TO_POST_OPERATION, STATUS_INVALID_PARAMETER,
        STATUS_SUCCESS,
    },
};

use super::instance::instances;
use crate::{
    guard::guarded,
    kernel::{
        irql,
        process::{self, Process},
        thread::{self, ThreadSnapshot},
        work,
    },
    verifier::{self, Rule},
};

const FLTCOMPLETEPENDEDPREOPERATION: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcompletependedpreoperation";
const FLTQUEUEDEFERREDIOWORKITEM: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltqueuedeferredioworkitem";
const FLTQUEUEGENERICWORKITEM: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltqueuegenericworkitem";

/// Where a filter's rundown stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Stage {
    /// Registered: work items may be queued.
    #[default]
    Live,
    /// `FltUnregisterFilter` has begun: new items are refused, queued and running ones are waited for.
    RunningDown,
    /// `FltUnregisterFilter` has finished.
    Gone,
}

/// One filter's work items.
#[derive(Default)]
struct Rundown {
    /// Items queued for the filter that have not returned yet (waiting for a worker or running).
    outstanding: usize,
    stage: Stage,
}

static RUNDOWN: Mutex<BTreeMap<PFLT_FILTER, Rundown>> = Mutex::new(BTreeMap::new());
/// Signalled when one of a filter's work items returns.
static RUNDOWN_CHANGED: Condvar = Condvar::new();

thread_local! {
    /// The filters whose work items this thread is running, innermost last (a worker runs one item at a time;
    /// more only when items run inline on the queueing thread because no worker could start).
    static RUNNING_ITEMS_OF: RefCell<Vec<PFLT_FILTER>> = const { RefCell::new(Vec::new()) };
}

fn rundowns() -> MutexGuard<'static, BTreeMap<PFLT_FILTER, Rundown>> {
    RUNDOWN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes a rundown reference on `filter` for one work item; `false` once its unregistration has begun.
fn acquire(filter: PFLT_FILTER) -> bool {
    let mut all = rundowns();
    let rundown = all.entry(filter).or_default();
    if rundown.stage != Stage::Live {
        return false;
    }
    rundown.outstanding += 1;
    true
}

/// Whether `filter` is being unregistered: `FltUnregisterFilter` has begun and not finished.
fn running_down(filter: PFLT_FILTER) -> bool {
    rundowns().get(&filter).is_some_and(|r| r.stage == Stage::RunningDown)
}

/// Releases the rundown reference of one of `filter`'s work items when dropped, even if the routine panicked.
struct ItemReference(PFLT_FILTER);

impl Drop for ItemReference {
    fn drop(&mut self) {
        RUNNING_ITEMS_OF.with_borrow_mut(|running| {
            if let Some(at) = running.iter().rposition(|f| *f == self.0) {
                running.remove(at);
            }
        });
        if let Some(rundown) = rundowns().get_mut(&self.0) {
            rundown.outstanding = rundown.outstanding.saturating_sub(1);
        }
        RUNDOWN_CHANGED.notify_all();
    }
}

/// Queues `routine` on a system worker as one of `filter`'s work items; the caller has [`acquire`]d a reference.
fn queue_for(filter: PFLT_FILTER, routine: impl FnOnce() + Send + 'static) {
    drop(work::queue(move || {
        RUNNING_ITEMS_OF.with_borrow_mut(|running| running.push(filter));
        let _reference = ItemReference(filter);
        routine();
    }));
}

/// `FltUnregisterFilter` begins: `filter`'s work items are refused from now on. `false` when its unregistration
/// had already begun (a second, concurrent `FltUnregisterFilter`).
pub(crate) fn begin_rundown(filter: PFLT_FILTER) -> bool {
    let mut all = rundowns();
    let rundown = all.entry(filter).or_default();
    if rundown.stage != Stage::Live {
        return false;
    }
    rundown.stage = Stage::RunningDown;
    true
}

/// `FltUnregisterFilter` waits for `filter`'s work items, queued and running, to return, blocking until the
/// workers have run them.
///
/// Called from one of those items, the wait would include the caller itself, which cannot return before the wait
/// does: on Windows the worker thread hangs for good and the unload with it. The model decides by the calling
/// thread, not by a timeout: it reports [`Rule::UnregisterWaitsForItself`] and waits only for the other items.
pub(crate) fn run_down(api: &'static str, filter: PFLT_FILTER) {
    let own = RUNNING_ITEMS_OF.with_borrow(|running| running.iter().filter(|f| **f == filter).count());
    if own > 0 {
        verifier::report(
            Rule::UnregisterWaitsForItself,
            api,
            format!(
                "called from a work item of filter {filter:#x}: unregistering waits for the filter's work items to \
                 return, this one included, so the worker thread would wait for itself forever"
            ),
        );
    }
    let mut all = rundowns();
    while all.get(&filter).is_some_and(|r| r.outstanding > own) {
        all = RUNDOWN_CHANGED.wait(all).unwrap_or_else(PoisonError::into_inner);
    }
    if let Some(rundown) = all.get_mut(&filter) {
        rundown.stage = Stage::Gone;
    }
}

/// How the driver completed a pended operation, and in which thread's context.
pub(crate) struct Completion {
    pub(crate) status: FLT_PREOP_CALLBACK_STATUS,
    pub(crate) context: usize,
    pub(crate) thread: ThreadSnapshot,
    pub(crate) process: Arc<Process>,
}

#[derive(Default)]
struct PendedOp {
    /// The filter that pended it.
    filter: PFLT_FILTER,
    completion: Option<Completion>,
    /// Set when the rest of the operation has run, so the completer can return.
    finished: bool,
}

static PENDED: Mutex<BTreeMap<usize, PendedOp>> = Mutex::new(BTreeMap::new());
static PENDED_CHANGED: Condvar = Condvar::new();

fn pended() -> MutexGuard<'static, BTreeMap<usize, PendedOp>> {
    PENDED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records that `filter`'s pre-operation callback is about to run for `data`: a worker it queues may complete the
/// operation before the callback has returned `FLT_PREOP_PENDING`, and that completion must not be lost.
pub(crate) fn enter_pre(data: *const FLT_CALLBACK_DATA, filter: PFLT_FILTER) {
    pended().insert(data as usize, PendedOp { filter, ..PendedOp::default() });
}

/// The pre-operation callback for `data` returned something other than `FLT_PREOP_PENDING`: forget it, and report a
/// completion that arrived for an operation that was never pended.
pub(crate) fn leave_pre(data: *const FLT_CALLBACK_DATA) {
    let op = pended().remove(&(data as usize));
    if op.is_some_and(|op| op.completion.is_some()) {
        verifier::report(
            Rule::InvalidArgument,
            "FltCompletePendedPreOperation",
            "completed an operation whose pre-operation callback did not return FLT_PREOP_PENDING",
        );
    }
    PENDED_CHANGED.notify_all();
}

/// Waits for the driver to complete the pended operation `data`. `None` when it never will: nothing is left on
/// the system workers to complete it (reported).
///
/// A lock request that `FltProcessFileLock` pended waits for a lock instead, which any thread may release: its wait
/// ends by [`Rule::LockWaitDeadlock`] when no thread is left that could ([`crate::io::locks`]); the request is then
/// cancelled and this returns `None`.
pub(crate) fn wait(data: *const FLT_CALLBACK_DATA) -> Option<Completion> {
    let key = data as usize;
    let lock_wait = super::filelock::waits_for_lock(data);
    let _blocked = lock_wait.then(crate::io::locks::Blocked::enter);
    let mut all = pended();
    loop {
        if let Some(completion) = all.get_mut(&key).and_then(|op| op.completion.take()) {
            return Some(completion);
        }
        if lock_wait {
            drop(all);
            let mut abandoned = None;
            if crate::io::locks::give_up_if_stuck(|| {
                abandoned = super::filelock::abandon(data);
                abandoned.is_some()
            }) {
                crate::io::locks::report_deadlock("FltProcessFileLock");
                if let Some(abandoned) = abandoned {
                    abandoned.complete();
                }
                pended().remove(&key);
                return None;
            }
            // Not stuck, or granted meanwhile (its completion is on the way).
            all = pended();
            if all.get(&key).is_some_and(|op| op.completion.is_some()) {
                continue;
            }
        } else if work::outstanding() == 0 {
            // No worker can still complete it; the requesting thread would wait forever.
            all.remove(&key);
            drop(all);
            verifier::report(
                Rule::PendedNeverCompleted,
                "FltCompletePendedPreOperation",
                "a pre-operation returned FLT_PREOP_PENDING and nothing completed it: the requesting thread would \
                 wait forever",
            );
            return None;
        }
        // Re-check on every change of the worker queue; the timeout only bounds how long a missed wake-up lasts.
        all = PENDED_CHANGED.wait_timeout(all, Duration::from_millis(5)).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// Whether `data` is a pended operation that waits for its completion (pended, or its pre-operation callback still
/// running, and not completed yet).
pub(crate) fn awaits_completion(data: *const FLT_CALLBACK_DATA) -> bool {
    pended().get(&(data as usize)).is_some_and(|op| op.completion.is_none() && !op.finished)
}

/// Tells the completer of `data` that the rest of the operation has run.
pub(crate) fn finish(data: *const FLT_CALLBACK_DATA) {
    if let Some(op) = pended().get_mut(&(data as usize)) {
        op.finished = true;
    }
    PENDED_CHANGED.notify_all();
}

/// Reports the operations `filter` pended and never completed; called when its driver unloads.
pub(crate) fn report_leaks(filter: PFLT_FILTER, after: &str) {
    let stuck = pended().values().filter(|op| op.filter == filter && op.completion.is_none() && !op.finished).count();
    if stuck > 0 {
        verifier::report(
            Rule::PendedNeverCompleted,
            "FltCompletePendedPreOperation",
            format!("{stuck} pended operations never completed after {after}"),
        );
    }
    let items = with_items(|i| i.iter().filter(|(_, owner)| **owner == filter).count());
    if items > 0 {
        verifier::report(
            Rule::WorkItemLeak,
            "FltFreeDeferredIoWorkItem",
            format!("{items} work items not freed after {after}"),
        );
    }
}

/// `FltCompletePendedPreOperation`.
///
/// Rules: ≤ DISPATCH_LEVEL when completing with `FLT_PREOP_COMPLETE`, otherwise ≤ APC_LEVEL; a status of
/// `SUCCESS_WITH_CALLBACK`, `SUCCESS_NO_CALLBACK` or `COMPLETE` (never `PENDING`, `SYNCHRONIZE` or
/// `DISALLOW_FASTIO`); a context only with `SUCCESS_WITH_CALLBACK`; an operation that is pended and not yet
/// completed. The rest of the operation runs before this returns, in the caller's context.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcompletependedpreoperation>.
#[unsafe(no_mangle)]
pub extern "system" fn FltCompletePendedPreOperation(
    callback_data: *const FLT_CALLBACK_DATA,
    callback_status: FLT_PREOP_CALLBACK_STATUS,
    context: *const c_void,
) {
    const API: &str = "FltCompletePendedPreOperation";
    guarded(API, (), || {
        let max = if callback_status == FLT_PREOP_COMPLETE { irql::DISPATCH } else { irql::APC };
        if !thread::require_irql_at_most(API, max, FLTCOMPLETEPENDEDPREOPERATION) {
            return;
        }
        if !matches!(
            callback_status,
            FLT_PREOP_SUCCESS_WITH_CALLBACK | FLT_PREOP_SUCCESS_NO_CALLBACK | FLT_PREOP_COMPLETE
        ) {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!(
                    "CallbackStatus {callback_status} is not SUCCESS_WITH_CALLBACK, SUCCESS_NO_CALLBACK or COMPLETE"
                ),
            );
            return;
        }
        if !context.is_null() && callback_status != FLT_PREOP_SUCCESS_WITH_CALLBACK {
            verifier::report(
                Rule::CompletionContextNotAllowed,
                API,
                "a context with a status other than FLT_PREOP_SUCCESS_WITH_CALLBACK",
            );
        }
        let key = callback_data as usize;
        {
            let mut all = pended();
            match all.get_mut(&key) {
                Some(op) if op.completion.is_none() && !op.finished => {
                    op.completion = Some(Completion {
                        status: callback_status,
                        context: context as usize,
                        thread: thread::snapshot(),
                        process: process::current(),
                    });
                }
                _ => {
                    drop(all);
                    verifier::report(
                        Rule::InvalidArgument,
                        API,
                        format!("{callback_data:?} is not a pended operation awaiting completion (completed twice?)"),
                    );
                    return;
                }
            }
        }
        PENDED_CHANGED.notify_all();
        // The rest of the operation runs now; return when it is done, as Filter Manager does.
        let mut all = pended();
        while all.get(&key).is_some_and(|op| !op.finished) {
            all = PENDED_CHANGED.wait(all).unwrap_or_else(PoisonError::into_inner);
        }
        all.remove(&key);
    });
}

/// Allocated work items: address → the filter that queued it last (0 until queued).
static ITEMS: Mutex<BTreeMap<usize, PFLT_FILTER>> = Mutex::new(BTreeMap::new());
static NEXT_ITEM: Mutex<usize> = Mutex::new(0);

fn with_items<T>(f: impl FnOnce(&mut BTreeMap<usize, PFLT_FILTER>) -> T) -> T {
    f(&mut ITEMS.lock().unwrap_or_else(PoisonError::into_inner))
}

fn allocate(api: &'static str) -> isize {
    if !thread::require_irql_at_most(api, irql::DISPATCH, FLTQUEUEDEFERREDIOWORKITEM) {
        return 0;
    }
    let address = {
        let mut next = NEXT_ITEM.lock().unwrap_or_else(PoisonError::into_inner);
        *next = next.saturating_add(1);
        0x0000_7ff5_5000_0000_usize.wrapping_add(next.wrapping_mul(0x100))
    };
    with_items(|i| i.insert(address, 0));
    address.cast_signed()
}

fn free(api: &'static str, item: isize) {
    if !thread::require_irql_at_most(api, irql::DISPATCH, FLTQUEUEDEFERREDIOWORKITEM) {
        return;
    }
    if with_items(|i| i.remove(&item.cast_unsigned())).is_none() {
        verifier::report(Rule::InvalidArgument, api, format!("{item:#x} is not an allocated work item (freed twice?)"));
    }
}

fn check_queue_type(api: &'static str, queue_type: WORK_QUEUE_TYPE) -> bool {
    if queue_type == CriticalWorkQueue || queue_type == DelayedWorkQueue {
        return true;
    }
    verifier::report(
        Rule::InvalidArgument,
        api,
        format!("QueueType {queue_type} is not CriticalWorkQueue or DelayedWorkQueue"),
    );
    false
}

/// `FltAllocateDeferredIoWorkItem`: ≤ DISPATCH_LEVEL.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatedeferredioworkitem>.
#[unsafe(no_mangle)]
pub extern "system" fn FltAllocateDeferredIoWorkItem() -> PFLT_DEFERRED_IO_WORKITEM {
    guarded("FltAllocateDeferredIoWorkItem", 0, || allocate("FltAllocateDeferredIoWorkItem"))
}

/// `FltFreeDeferredIoWorkItem`: ≤ DISPATCH_LEVEL; an allocated item, freed once.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltfreedeferredioworkitem>.
#[unsafe(no_mangle)]
pub extern "system" fn FltFreeDeferredIoWorkItem(item: PFLT_DEFERRED_IO_WORKITEM) {
    guarded("FltFreeDeferredIoWorkItem", (), || free("FltFreeDeferredIoWorkItem", item));
}

/// `FltAllocateGenericWorkItem`: ≤ DISPATCH_LEVEL.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocategenericworkitem>.
#[unsafe(no_mangle)]
pub extern "system" fn FltAllocateGenericWorkItem() -> PFLT_GENERIC_WORKITEM {
    guarded("FltAllocateGenericWorkItem", 0, || allocate("FltAllocateGenericWorkItem"))
}

/// `FltFreeGenericWorkItem`: ≤ DISPATCH_LEVEL; an allocated item, freed once.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltfreegenericworkitem>.
#[unsafe(no_mangle)]
pub extern "system" fn FltFreeGenericWorkItem(item: PFLT_GENERIC_WORKITEM) {
    guarded("FltFreeGenericWorkItem", (), || free("FltFreeGenericWorkItem", item));
}

/// The filter whose instance `data` targets, and whether that instance is still attached.
fn target_filter(data: &FLT_CALLBACK_DATA) -> Option<(PFLT_FILTER, bool)> {
    // SAFETY: callback data the model built points to its parameter block for as long as the operation lives.
    let instance = unsafe { data.Iopb.as_ref() }?.TargetInstance;
    instances().into_iter().find(|i| i.handle == instance).map(|i| (i.filter, i.attached))
}

/// The checks both queue routines make first: ≤ DISPATCH_LEVEL (per `docs`), a known queue type, a routine and an
/// allocated item (its address). Reports and returns `None` when one fails; otherwise the routine.
fn check_queue_call<R>(
    api: &'static str,
    docs: &'static str,
    item: usize,
    routine: Option<R>,
    queue_type: WORK_QUEUE_TYPE,
) -> Option<R> {
    if !thread::require_irql_at_most(api, irql::DISPATCH, docs) || !check_queue_type(api, queue_type) {
        return None;
    }
    let Some(routine) = routine else {
        verifier::report(Rule::InvalidArgument, api, "WorkerRoutine is NULL");
        return None;
    };
    if !with_items(|i| i.contains_key(&item)) {
        verifier::report(Rule::InvalidArgument, api, format!("{item:#x} is not an allocated work item"));
        return None;
    }
    Some(routine)
}

/// `FltQueueDeferredIoWorkItem`.
///
/// Rules: ≤ DISPATCH_LEVEL; an allocated item; `CriticalWorkQueue` or `DelayedWorkQueue`. Fails with
/// `STATUS_FLT_NOT_SAFE_TO_POST_OPERATION` for operations that are not IRP-based, for paging I/O and when the
/// thread's top-level IRP is set, and with `STATUS_FLT_DELETING_OBJECT` while the instance is torn down or the
/// filter unregistered (the documented answers, not driver bugs). The routine runs at PASSIVE_LEVEL on a system
/// worker, and `FltUnregisterFilter` waits for it.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltqueuedeferredioworkitem>.
///
/// # Safety
/// Called by driver code: `Data` must be the callback data of an operation in progress.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltQueueDeferredIoWorkItem(
    item: PFLT_DEFERRED_IO_WORKITEM,
    data: *const FLT_CALLBACK_DATA,
    routine: PFLT_DEFERRED_IO_WORKITEM_ROUTINE,
    queue_type: WORK_QUEUE_TYPE,
    context: *const c_void,
) -> NTSTATUS {
    const API: &str = "FltQueueDeferredIoWorkItem";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let Some(routine) =
            check_queue_call(API, FLTQUEUEDEFERREDIOWORKITEM, item.cast_unsigned(), routine, queue_type)
        else {
            return STATUS_INVALID_PARAMETER;
        };
        // SAFETY: the driver passes the callback data of an operation in progress, which the model owns.
        let Some(callback_data) = (unsafe { data.as_ref() }) else {
            verifier::report(Rule::InvalidArgument, API, "Data is NULL");
            return STATUS_INVALID_PARAMETER;
        };
        // SAFETY: as above, for the parameter block.
        let irp_flags = unsafe { callback_data.Iopb.as_ref() }.map_or(0, |iopb| iopb.IrpFlags);
        if callback_data.Flags & FLTFL_CALLBACK_DATA_IRP_OPERATION == 0
            || irp_flags & IRP_PAGING_IO != 0
            || thread::snapshot().top_level_irp != 0
        {
            return STATUS_FLT_NOT_SAFE_TO_POST_OPERATION;
        }
        let Some((filter, attached)) = target_filter(callback_data) else {
            return STATUS_INVALID_PARAMETER;
        };
        if !attached || !acquire(filter) {
            return STATUS_FLT_DELETING_OBJECT;
        }
        with_items(|i| i.insert(item.cast_unsigned(), filter));
        let (data_address, context_address) = (data as usize, context as usize);
        queue_for(filter, move || {
            super::dispatch::servicing(data_address, || {
                // SAFETY: the driver's routine, with the item, the pended operation's data and its context.
                unsafe { routine(item, data_address as *const FLT_CALLBACK_DATA, context_address as *const c_void) };
            });
        });
        STATUS_SUCCESS
    })
}

/// `FltQueueGenericWorkItem`.
///
/// Rules: ≤ DISPATCH_LEVEL; an allocated item; `CriticalWorkQueue` or `DelayedWorkQueue`; `FltObject` a filter or
/// instance. Fails with `STATUS_FLT_DELETING_OBJECT` once the filter's `FltUnregisterFilter` has begun (the
/// documented answer, not a driver bug). The routine runs at PASSIVE_LEVEL on a system worker, and
/// `FltUnregisterFilter` waits for it.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltqueuegenericworkitem>.
#[unsafe(no_mangle)]
pub extern "system" fn FltQueueGenericWorkItem(
    item: PFLT_GENERIC_WORKITEM,
    flt_object: *const c_void,
    routine: PFLT_GENERIC_WORKITEM_ROUTINE,
    queue_type: WORK_QUEUE_TYPE,
    context: *const c_void,
) -> NTSTATUS {
    const API: &str = "FltQueueGenericWorkItem";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let Some(routine) = check_queue_call(API, FLTQUEUEGENERICWORKITEM, item.cast_unsigned(), routine, queue_type)
        else {
            return STATUS_INVALID_PARAMETER;
        };
        let object = flt_object as isize;
        let filter = super::registration::filters()
            .into_iter()
            .find(|f| f.handle == object && !f.unregistered)
            .map(|f| f.handle)
            // An instance torn down by the filter's unregistration still names a filter being unloaded.
            .or_else(|| {
                instances()
                    .into_iter()
                    .find(|i| i.handle == object && (i.attached || i.setting_up || running_down(i.filter)))
                    .map(|i| i.filter)
            });
        let Some(filter) = filter else {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!("FltObject {object:#x} is not a live filter or instance"),
            );
            return STATUS_INVALID_PARAMETER;
        };
        if !acquire(filter) {
            // "The minifilter driver is being unloaded": the documented answer, not a driver bug.
            return STATUS_FLT_DELETING_OBJECT;
        }
        with_items(|i| i.insert(item.cast_unsigned(), filter));
        let (object_address, context_address) = (flt_object as usize, context as usize);
        queue_for(filter, move || {
            // SAFETY: the driver's routine, with the item, the filter object and its context.
            unsafe { routine(item, object_address as *const c_void, context_address as *const c_void) };
        });
        STATUS_SUCCESS
    })
}

/// The work items currently allocated, for tests.
#[must_use]
pub fn allocated_work_items() -> BTreeSet<usize> {
    with_items(|i| i.keys().copied().collect())
}
