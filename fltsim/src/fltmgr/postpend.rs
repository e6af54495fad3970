//! Pended post-operations: `FLT_POSTOP_MORE_PROCESSING_REQUIRED` with `FltCompletePendedPostOperation`, and
//! `FltDoCompletionProcessingWhenSafe`, after
//! <https://learn.microsoft.com/windows-hardware/drivers/ifs/pending-an-i-o-operation-in-a-postoperation-callback-routine>.
//!
//! A post-operation callback of an IRP-based operation may post the operation to a work queue and return
//! `FLT_POSTOP_MORE_PROCESSING_REQUIRED`. Completion processing then stops: the post-operation callbacks of the
//! filters above it are not called and the caller, whose thread the model blocks as the I/O manager blocks a
//! synchronous request, does not get the operation back. When the filter calls `FltCompletePendedPostOperation`,
//! completion processing resumes in the completing thread's context (its IRQL, APC state, top-level IRP, name and
//! process, as for `FltCompletePendedPreOperation`), the remaining post-operation callbacks run, and
//! `FltCompletePendedPostOperation` returns once the operation is complete.
//!
//! A pended post-operation nothing will complete — no completion came and nothing is left on the system workers —
//! is reported ([`Rule::PendedNeverCompleted`]) and completion processing resumes with the status the operation
//! had, instead of hanging: the hazard is found by rule, not by a timeout.

use std::{
    collections::BTreeMap,
    ffi::c_void,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::ThreadId,
    time::Duration,
};

use windows_sys::Wdk::{
    Storage::FileSystem::Minifilters::{
        FLT_CALLBACK_DATA, FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_FINISHED_PROCESSING,
        FLT_POSTOP_MORE_PROCESSING_REQUIRED, FLT_RELATED_OBJECTS, FLTFL_CALLBACK_DATA_IRP_OPERATION,
        FLTFL_POST_OPERATION_DRAINING, PFLT_FILTER, PFLT_POST_OPERATION_CALLBACK,
    },
    System::SystemServices::IRP_PAGING_IO,
};

use super::dispatch::{CallbackFrame, callback_frames, in_frame};
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

const FLTCOMPLETEPENDEDPOSTOPERATION: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcompletependedpostoperation";

/// Set by the dispatcher once the rest of a resumed operation has run; the completer waits for it.
#[derive(Default)]
struct Done {
    finished: Mutex<bool>,
    signal: Condvar,
}

impl Done {
    fn wait(&self) {
        let mut finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
        while !*finished {
            finished = self.signal.wait(finished).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// How a pended post-operation was completed, and in which thread's context completion processing resumes.
/// Dropping it tells the completer that the rest of the operation has run.
pub(crate) struct Resumption {
    thread: ThreadSnapshot,
    process: Arc<Process>,
    done: Arc<Done>,
}

impl Resumption {
    /// The completing thread's state.
    pub(crate) fn thread(&self) -> ThreadSnapshot {
        self.thread.clone()
    }

    /// The completing thread's process.
    pub(crate) fn process(&self) -> Arc<Process> {
        Arc::clone(&self.process)
    }
}

impl Drop for Resumption {
    fn drop(&mut self) {
        *self.done.finished.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.done.signal.notify_all();
    }
}

/// One post-operation callback that is running or has pended its operation.
struct PendedPost {
    /// The filter whose post-operation callback it is.
    filter: PFLT_FILTER,
    /// The host thread running the callback, while it runs: completing from there would wait for itself.
    running_on: Option<ThreadId>,
    /// `FltDoCompletionProcessingWhenSafe` posted the operation: it is pended whatever the callback returns.
    posted_when_safe: bool,
    completion: Option<Resumption>,
}

static POSTS: Mutex<BTreeMap<usize, PendedPost>> = Mutex::new(BTreeMap::new());
static CHANGED: Condvar = Condvar::new();

fn posts() -> MutexGuard<'static, BTreeMap<usize, PendedPost>> {
    POSTS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Records that `filter`'s post-operation callback is about to run for `data`: a worker it queues may complete the
/// operation before the callback has returned `FLT_POSTOP_MORE_PROCESSING_REQUIRED`, and that completion must not
/// be lost.
pub(crate) fn enter_post(data: *const FLT_CALLBACK_DATA, filter: PFLT_FILTER) {
    let op =
        PendedPost { filter, running_on: Some(std::thread::current().id()), posted_when_safe: false, completion: None };
    posts().insert(data as usize, op);
}

/// The post-operation callback for `data` returned (`more_processing`: with `FLT_POSTOP_MORE_PROCESSING_REQUIRED`).
/// Returns whether the operation is pended and the dispatcher must wait for its completion. An operation that is
/// not pended is forgotten, and a completion that arrived for it is reported.
pub(crate) fn leave_post(data: *const FLT_CALLBACK_DATA, more_processing: bool) -> bool {
    let key = data as usize;
    let mut all = posts();
    let posted = all.get(&key).is_some_and(|op| op.posted_when_safe);
    if more_processing || posted {
        if let Some(op) = all.get_mut(&key) {
            op.running_on = None;
        }
        drop(all);
        if !more_processing {
            verifier::report(
                Rule::InvalidPostOpStatus,
                "PFLT_POST_OPERATION_CALLBACK",
                "FltDoCompletionProcessingWhenSafe posted the operation, but the callback did not return the \
                 FLT_POSTOP_MORE_PROCESSING_REQUIRED it answered; the operation stays pended",
            );
        }
        return true;
    }
    let op = all.remove(&key);
    drop(all);
    // Dropping a completion lets its completer return.
    if op.is_some_and(|op| op.completion.is_some()) {
        verifier::report(
            Rule::InvalidArgument,
            "FltCompletePendedPostOperation",
            "completed an operation whose post-operation callback did not return FLT_POSTOP_MORE_PROCESSING_REQUIRED",
        );
    }
    false
}

/// Waits for the driver to complete the pended post-operation `data`. `None` when it never will: nothing is left
/// on the system workers to complete it (reported). Either way the operation is no longer pended.
pub(crate) fn wait(data: *const FLT_CALLBACK_DATA) -> Option<Resumption> {
    let key = data as usize;
    let mut all = posts();
    loop {
        if let Some(completion) = all.get_mut(&key).and_then(|op| op.completion.take()) {
            all.remove(&key);
            return Some(completion);
        }
        if work::outstanding() == 0 {
            // No worker can still complete it; the requesting thread would wait forever.
            let filter = all.remove(&key).map_or(0, |op| op.filter);
            drop(all);
            verifier::report(
                Rule::PendedNeverCompleted,
                "FltCompletePendedPostOperation",
                format!(
                    "a post-operation callback of filter {filter:#x} returned FLT_POSTOP_MORE_PROCESSING_REQUIRED and \
                     nothing completed it: the requesting thread would wait forever"
                ),
            );
            return None;
        }
        // Re-check on every completion; the timeout bounds how long a change of the worker queue goes unseen.
        all = CHANGED.wait_timeout(all, Duration::from_millis(5)).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// Hands the pended post-operation `data` back to the dispatcher and waits until completion processing is done.
fn resume(api: &'static str, data: *const FLT_CALLBACK_DATA) {
    let done = Arc::new(Done::default());
    {
        let mut all = posts();
        let me = std::thread::current().id();
        match all.get_mut(&(data as usize)) {
            Some(op) if op.running_on == Some(me) => {
                drop(all);
                verifier::report(
                    Rule::InvalidArgument,
                    api,
                    "called from inside the post-operation callback, before it returned \
                     FLT_POSTOP_MORE_PROCESSING_REQUIRED (post the operation to a work queue)",
                );
                return;
            }
            Some(op) if op.completion.is_none() => {
                let process = process::current();
                op.completion = Some(Resumption { thread: thread::snapshot(), process, done: Arc::clone(&done) });
            }
            _ => {
                drop(all);
                verifier::report(
                    Rule::InvalidArgument,
                    api,
                    format!("{data:?} is not a pended post-operation awaiting completion (completed twice?)"),
                );
                return;
            }
        }
    }
    CHANGED.notify_all();
    // Completion processing runs now; return when it is done, as Filter Manager does.
    done.wait();
}

/// `FltCompletePendedPostOperation`.
///
/// Rules: ≤ DISPATCH_LEVEL; `CallbackData` of an operation whose post-operation callback returned
/// `FLT_POSTOP_MORE_PROCESSING_REQUIRED` and that is not completed yet (not from inside that callback, not twice).
/// The remaining post-operation callbacks (those of the filters above) run, in the caller's context, and the
/// operation completes to its requestor before this returns.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcompletependedpostoperation>.
#[unsafe(no_mangle)]
pub extern "system" fn FltCompletePendedPostOperation(callback_data: *const FLT_CALLBACK_DATA) {
    const API: &str = "FltCompletePendedPostOperation";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::DISPATCH, FLTCOMPLETEPENDEDPOSTOPERATION) {
            return;
        }
        if callback_data.is_null() {
            verifier::report(Rule::InvalidArgument, API, "CallbackData is NULL");
            return;
        }
        resume(API, callback_data);
    });
}

/// The related objects, as plain addresses a worker can carry.
#[derive(Clone, Copy)]
struct Objects {
    size: u16,
    filter: isize,
    volume: isize,
    instance: isize,
    file_object: usize,
}

impl Objects {
    fn from(objects: &FLT_RELATED_OBJECTS) -> Self {
        Self {
            size: objects.Size,
            filter: objects.Filter,
            volume: objects.Volume,
            instance: objects.Instance,
            file_object: objects.FileObject as usize,
        }
    }

    fn to_related(self) -> FLT_RELATED_OBJECTS {
        FLT_RELATED_OBJECTS {
            Size: self.size,
            TransactionContext: 0,
            Filter: self.filter,
            Volume: self.volume,
            Instance: self.instance,
            FileObject: self.file_object as *const _,
            Transaction: std::ptr::null(),
        }
    }
}

/// Calls `SafePostCallback` in a post-operation callback frame of the filter of `objects`.
fn call_safe(
    callback: unsafe extern "system" fn(
        *mut FLT_CALLBACK_DATA,
        *const FLT_RELATED_OBJECTS,
        *const c_void,
        u32,
    ) -> FLT_POSTOP_CALLBACK_STATUS,
    data: *mut FLT_CALLBACK_DATA,
    objects: Objects,
    context: *const c_void,
    flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    // SAFETY: the callback data of an operation in flight (its requestor waits for it), which the model owns.
    let (major, user_request) = unsafe { data.as_ref() }.map_or((0, false), |callback_data| {
        // SAFETY: the callback data points to its parameter block while the operation is in flight.
        let major = unsafe { callback_data.Iopb.as_ref() }.map_or(0, |iopb| iopb.MajorFunction);
        (major, callback_data.RequestorMode != 0)
    });
    let frame = CallbackFrame { filter: objects.filter, major, user_request, post: true, data: data as usize };
    let related = objects.to_related();
    // SAFETY: the driver's callback, with the operation's data, its related objects and the driver's context.
    in_frame(frame, || unsafe { callback(data, &raw const related, context, flags) })
}

/// Why `FltDoCompletionProcessingWhenSafe` must not be called for `data` with `flags`, if it must not.
fn when_safe_misuse(data: &FLT_CALLBACK_DATA, flags: u32) -> Option<String> {
    // SAFETY: the dispatcher's callback data points to its parameter block while the operation is in flight.
    let major = unsafe { data.Iopb.as_ref() }.map_or(0, |iopb| iopb.MajorFunction);
    if !callback_frames().last().is_some_and(|frame| frame.post) {
        return Some("called outside a post-operation callback".to_owned());
    }
    if flags & FLTFL_POST_OPERATION_DRAINING != 0 {
        return Some("called with FLTFL_POST_OPERATION_DRAINING set".to_owned());
    }
    if data.Flags & FLTFL_CALLBACK_DATA_IRP_OPERATION == 0 {
        return Some("called for an operation that is not IRP-based".to_owned());
    }
    // IRP_MJ_READ, IRP_MJ_WRITE, IRP_MJ_FLUSH_BUFFERS: a storage driver may complete them, a deadlock.
    if matches!(major, 3 | 4 | 9) {
        return Some(format!(
            "called for major {major:#04x}, which a driver in the storage stack can complete directly (deadlock)"
        ));
    }
    None
}

/// `FltDoCompletionProcessingWhenSafe`.
///
/// Rules: only from a post-operation callback, never with `FLTFL_POST_OPERATION_DRAINING`, only for IRP-based
/// operations and not for `IRP_MJ_READ`, `IRP_MJ_WRITE` or `IRP_MJ_FLUSH_BUFFERS` (each reported, `FALSE`);
/// `SafePostCallback` and `RetPostOperationStatus` required. Below DISPATCH_LEVEL it calls `SafePostCallback` at
/// once and returns its status. At DISPATCH_LEVEL it posts the operation to a system worker, where
/// `SafePostCallback` runs at PASSIVE_LEVEL, and answers `FLT_POSTOP_MORE_PROCESSING_REQUIRED`: completion
/// processing resumes when `SafePostCallback` returns `FLT_POSTOP_FINISHED_PROCESSING`, or when the driver calls
/// `FltCompletePendedPostOperation` after it returned `FLT_POSTOP_MORE_PROCESSING_REQUIRED`. Paging I/O cannot be
/// posted: `FLT_POSTOP_FINISHED_PROCESSING` and `FALSE`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltdocompletionprocessingwhensafe>.
///
/// # Safety
/// Called by driver code: `Data` and `FltObjects` must be those of the post-operation callback that calls it.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltDoCompletionProcessingWhenSafe(
    data: *const FLT_CALLBACK_DATA,
    flt_objects: *const FLT_RELATED_OBJECTS,
    completion_context: *const c_void,
    flags: u32,
    safe_post_callback: PFLT_POST_OPERATION_CALLBACK,
    ret_post_operation_status: *mut FLT_POSTOP_CALLBACK_STATUS,
) -> bool {
    const API: &str = "FltDoCompletionProcessingWhenSafe";
    guarded(API, false, || {
        // SAFETY: the driver passes the callback data of the operation whose post-operation callback runs.
        let Some(callback_data) = (unsafe { data.as_ref() }) else {
            verifier::report(Rule::InvalidArgument, API, "Data is NULL");
            return false;
        };
        // SAFETY: as above, for the related objects the Filter Manager passed to that callback.
        let Some(objects) = (unsafe { flt_objects.as_ref() }).map(Objects::from) else {
            verifier::report(Rule::InvalidArgument, API, "FltObjects is NULL");
            return false;
        };
        let (Some(callback), false) = (safe_post_callback, ret_post_operation_status.is_null()) else {
            verifier::report(Rule::InvalidArgument, API, "SafePostCallback or RetPostOperationStatus is NULL");
            return false;
        };
        if let Some(why) = when_safe_misuse(callback_data, flags) {
            verifier::report(Rule::InvalidArgument, API, why);
            return false;
        }
        let set = |status: FLT_POSTOP_CALLBACK_STATUS| {
            // SAFETY: checked non-NULL above; the driver's variable for the status.
            unsafe { ret_post_operation_status.write(status) };
        };
        if thread::current_irql() < irql::DISPATCH {
            set(call_safe(callback, data.cast_mut(), objects, completion_context, flags));
            return true;
        }
        // SAFETY: as above, for the parameter block.
        let irp_flags = unsafe { callback_data.Iopb.as_ref() }.map_or(0, |iopb| iopb.IrpFlags);
        if irp_flags & IRP_PAGING_IO != 0 {
            set(FLT_POSTOP_FINISHED_PROCESSING);
            return false;
        }
        post_when_safe(data, objects, completion_context, flags, callback);
        set(FLT_POSTOP_MORE_PROCESSING_REQUIRED);
        true
    })
}

/// Posts `callback` for the operation `data` to a system worker, where it runs at PASSIVE_LEVEL; completion
/// processing resumes when it returns `FLT_POSTOP_FINISHED_PROCESSING`.
fn post_when_safe(
    data: *const FLT_CALLBACK_DATA,
    objects: Objects,
    context: *const c_void,
    flags: u32,
    callback: unsafe extern "system" fn(
        *mut FLT_CALLBACK_DATA,
        *const FLT_RELATED_OBJECTS,
        *const c_void,
        u32,
    ) -> FLT_POSTOP_CALLBACK_STATUS,
) {
    const API: &str = "FltDoCompletionProcessingWhenSafe";
    if let Some(op) = posts().get_mut(&(data as usize)) {
        op.posted_when_safe = true;
    }
    let (data_address, context_address) = (data as usize, context as usize);
    drop(work::queue(move || {
        let data = data_address as *mut FLT_CALLBACK_DATA;
        let status = call_safe(callback, data, objects, context_address as *const c_void, flags);
        match status {
            FLT_POSTOP_FINISHED_PROCESSING => resume(API, data),
            FLT_POSTOP_MORE_PROCESSING_REQUIRED => {
                // The driver pended it again; it calls FltCompletePendedPostOperation later.
            }
            other => {
                verifier::report(Rule::InvalidPostOpStatus, API, format!("SafePostCallback returned {other}"));
                resume(API, data);
            }
        }
    }));
}
