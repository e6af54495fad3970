//! System worker threads: a pool of real host threads at PASSIVE_LEVEL, in the System process, on kernel-sized
//! stacks, that run queued work items in order, as the kernel's system worker threads run `IoQueueWorkItem` and
//! Filter Manager's deferred and generic work items.
//!
//! [`queue`] is the model's internal queue (Filter Manager work items are built on it); [`drain`] waits until the
//! queue is empty and every item has run; [`wait_for`] waits for one item and reports the deadlock hazard of
//! waiting for a worker from a context the worker may depend on.
//!
//! `IoAllocateWorkItem` / `IoQueueWorkItem` / `IoFreeWorkItem` are not exported: windows-sys 0.61.2 declares
//! `PIO_WORKITEM_ROUTINE` as `Option<unsafe extern "system" fn()>`, without the `DeviceObject` and `Context`
//! parameters the routine receives, so a Rust driver cannot use them through windows-sys as declared.

use std::{
    collections::VecDeque,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::Builder,
};

use super::{
    irql,
    thread::{self, KERNEL_STACK_SIZE},
};
use crate::{
    guard::guarded,
    verifier::{self, Rule},
};

/// How many system worker threads the pool runs. Windows runs several per queue; a few are enough for the model
/// and keep a scenario's threads easy to follow.
pub const WORKERS: usize = 4;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// One queued work item; [`wait_for`] waits for it.
#[derive(Clone)]
#[must_use = "a work item is waited for with work::wait_for, or drained with work::drain"]
pub struct WorkItem {
    done: Arc<(Mutex<bool>, Condvar)>,
}

impl WorkItem {
    /// Whether the item has run.
    #[must_use]
    pub fn is_done(&self) -> bool {
        *lock(&self.done.0)
    }

    fn wait(&self) {
        let (done, ready) = &*self.done;
        let mut finished = lock(done);
        while !*finished {
            finished = ready.wait(finished).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

struct Queue {
    jobs: VecDeque<(Job, WorkItem)>,
    /// Items queued and not yet finished (waiting or running).
    outstanding: usize,
    started: bool,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue { jobs: VecDeque::new(), outstanding: 0, started: false });
/// Signalled when a job is queued (workers wait on it) and when one finishes ([`drain`] waits on it).
static CHANGED: Condvar = Condvar::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Queues `f` to run on a system worker thread at PASSIVE_LEVEL in the System process, and returns a handle to
/// wait for it. Workers start on first use.
///
/// A work routine that returns with a region entered, at another IRQL or with a top-level IRP set is reported
/// ([`Rule::CallbackStateMismatch`]), as Windows bugchecks with `APC_INDEX_MISMATCH` when a worker routine returns
/// with APCs still disabled.
pub fn queue(f: impl FnOnce() + Send + 'static) -> WorkItem {
    let item = WorkItem { done: Arc::new((Mutex::new(false), Condvar::new())) };
    let mut q = lock(&QUEUE);
    if !q.started {
        q.started = true;
        for n in 0..WORKERS {
            // A worker that cannot start leaves the others; with none, drain() and wait_for() would block, so
            // fall back to running items on the queueing thread below.
            let spawned =
                Builder::new().name(format!("System: worker {n}")).stack_size(KERNEL_STACK_SIZE).spawn(worker);
            if spawned.is_err() {
                q.started = n > 0;
                break;
            }
        }
    }
    q.outstanding += 1;
    if q.started {
        q.jobs.push_back((Box::new(f), item.clone()));
        drop(q);
        CHANGED.notify_all();
    } else {
        drop(q);
        run(Box::new(f), &item);
    }
    item
}

fn worker() {
    loop {
        let (job, item) = {
            let mut q = lock(&QUEUE);
            loop {
                if let Some(next) = q.jobs.pop_front() {
                    break next;
                }
                q = CHANGED.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        run(job, &item);
    }
}

thread_local! {
    /// How many work items this thread is running (more than one only when an item ran inline).
    static RUNNING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// How many queued work items have not finished, not counting those running on the calling thread: the workers
/// that could still act for a thread that waits.
#[must_use]
pub fn outstanding_elsewhere() -> usize {
    outstanding().saturating_sub(RUNNING.with(std::cell::Cell::get))
}

/// Whether the calling thread is a system worker running a work item (or runs one inline).
#[must_use]
pub(crate) fn on_worker() -> bool {
    RUNNING.with(std::cell::Cell::get) > 0
}

fn run(job: Job, item: &WorkItem) {
    let before = thread::snapshot();
    RUNNING.with(|r| r.set(r.get().saturating_add(1)));
    // A work item runs on a thread of the system's pool: it must leave that thread's impersonation as it found it.
    super::security::keeping_impersonation("system worker routine", || guarded("system worker routine", (), job));
    RUNNING.with(|r| r.set(r.get().saturating_sub(1)));
    thread::check_balanced("system worker routine", &before);
    *lock(&item.done.0) = true;
    item.done.1.notify_all();
    let mut q = lock(&QUEUE);
    q.outstanding = q.outstanding.saturating_sub(1);
    drop(q);
    CHANGED.notify_all();
}

/// How many queued work items have not finished yet (waiting or running).
#[must_use]
pub fn outstanding() -> usize {
    lock(&QUEUE).outstanding
}

/// Waits until every queued work item has run, including items queued by work items. For tests.
pub fn drain() {
    let mut q = lock(&QUEUE);
    while q.outstanding > 0 {
        q = CHANGED.wait(q).unwrap_or_else(PoisonError::into_inner);
    }
}

/// Why [`wait_for`] did not wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsafeWait;

/// Waits for `item` to finish, as a thread that posts work and blocks on its completion does.
///
/// Waiting for a system worker is a deadlock hazard when the waiting thread is at APC_LEVEL or above, in a
/// guarded region, or has a top-level IRP set: those are the paging and cache-manager paths, where the waiting
/// thread may hold the very resources (or the page) the worker needs, and where the posting routines themselves
/// refuse (`FltQueueDeferredIoWorkItem` fails with `STATUS_FLT_NOT_SAFE_TO_POST_OPERATION` for paging I/O or a
/// non-NULL top-level IRP; FLTMGR-CONTRACTS.md: "the thread must not wait synchronously for a worker"). The model
/// decides by the thread's state, not by a timeout: in such a context it reports
/// [`Rule::WaitForWorkerInUnsafeContext`] and returns `Err(UnsafeWait)` at once, whether or not the item happens to
/// be done, so the result is deterministic. Extending the rule to every guarded region and to APC_LEVEL outside the
/// paging path is stricter than documented.
///
/// # Errors
/// [`UnsafeWait`] when the thread's state makes the wait a deadlock hazard (reported).
pub fn wait_for(item: &WorkItem) -> Result<(), UnsafeWait> {
    let now = thread::snapshot();
    let mut why = Vec::new();
    if now.irql >= irql::APC {
        why.push(format!("at {}", irql::name(now.irql)));
    }
    if now.guarded_regions > 0 {
        why.push("in a guarded region".to_owned());
    }
    if now.top_level_irp != 0 {
        why.push(format!("with top-level IRP {:#x}", now.top_level_irp));
    }
    if !why.is_empty() {
        verifier::report(
            Rule::WaitForWorkerInUnsafeContext,
            "wait for a system worker",
            format!("the thread waits for a worker {}; the worker may need what this thread holds", why.join(", ")),
        );
        return Err(UnsafeWait);
    }
    item.wait();
    Ok(())
}
