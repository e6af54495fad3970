//! Calling the filters of a volume for one operation: pre-operation callbacks from the top of the stack down,
//! the file system, then post-operation callbacks from the bottom up, with the rules of
//! <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_pre_operation_callback> and
//! <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_post_operation_callback>.
//!
//! Post-operation callbacks run at an IRQL chosen at random, from a seed, among those the docs allow
//! (PASSIVE_LEVEL to DISPATCH_LEVEL), except the post-create callback and the post-operation callback of an
//! operation a filter synchronized, which run at PASSIVE_LEVEL in the originating thread
//! (<https://learn.microsoft.com/windows-hardware/drivers/ifs/writing-postoperation-callback-routines>). The seed
//! comes from `FLTSIM_SEED` (default 0) or [`set_seed`], so a failing run can be replayed.
//!
//! A post-operation callback that returns `FLT_POSTOP_MORE_PROCESSING_REQUIRED` halts the callbacks above it until
//! the driver calls `FltCompletePendedPostOperation` ([`super::postpend`]).

use std::{
    cell::RefCell,
    ffi::c_void,
    ptr::null_mut,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use windows_sys::{
    Wdk::{
        Foundation::FILE_OBJECT,
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_IO_PARAMETER_BLOCK, FLT_POSTOP_DISALLOW_FSFILTER_IO, FLT_POSTOP_FINISHED_PROCESSING,
            FLT_POSTOP_MORE_PROCESSING_REQUIRED, FLT_PREOP_COMPLETE, FLT_PREOP_DISALLOW_FASTIO,
            FLT_PREOP_DISALLOW_FSFILTER_IO, FLT_PREOP_PENDING, FLT_PREOP_SUCCESS_NO_CALLBACK,
            FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_PREOP_SYNCHRONIZE, FLT_RELATED_OBJECTS,
            FLTFL_CALLBACK_DATA_FAST_IO_OPERATION, FLTFL_CALLBACK_DATA_IRP_OPERATION, FLTFL_POST_OPERATION_DRAINING,
            IRP_MJ_QUERY_OPEN, PFLT_FILTER, PFLT_INSTANCE, PFLT_POST_OPERATION_CALLBACK, PFLT_VOLUME,
        },
    },
    Win32::Foundation::{NTSTATUS, STATUS_CANCELLED, STATUS_PENDING},
};

use super::{
    instance::{InstanceRecord, attached_on},
    registration::{FilterRecord, filters},
};
use crate::{
    kernel::{irql, process, thread},
    verifier::{self, Rule},
};

/// `IRP_MJ_CREATE`.
pub const IRP_MJ_CREATE: u8 = 0;

/// Where an operation comes from, which decides where it enters the volume's filter stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The filter that issued it, for filter-initiated I/O (`Flt*` routines, or `Zw*` routines called from a
    /// filter's code).
    pub initiator: Option<PFLT_FILTER>,
    /// Enter below this instance (`FltCreateFileEx2`, `FltReadFileEx`, ...): only instances of lower altitude and
    /// the file system see it. `None` enters at the top of the stack.
    pub below: Option<PFLT_INSTANCE>,
}

/// The deepest nesting of operations issued from inside callbacks before the model calls it runaway recursion.
pub const MAX_NESTING: usize = 16;

/// A callback of a filter running on this thread, for the operation it was called for.
#[derive(Clone, Copy, Debug)]
pub struct CallbackFrame {
    /// The filter whose callback runs.
    pub filter: PFLT_FILTER,
    /// The operation's major function.
    pub major: u8,
    /// Whether the operation was requested from user mode (on a user's behalf).
    pub user_request: bool,
    /// Whether this is the post-operation callback (otherwise the pre-operation callback).
    pub post: bool,
    /// The operation's callback data (its address).
    pub data: usize,
}

thread_local! {
    static FRAMES: RefCell<Vec<CallbackFrame>> = const { RefCell::new(Vec::new()) };
    static NESTING: RefCell<usize> = const { RefCell::new(0) };
    static PAGING: RefCell<usize> = const { RefCell::new(0) };
    static SERVICING: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` as the routine of a deferred-I/O work item servicing the pended operation whose callback data is
/// `data`: work done there is done on that operation's behalf.
pub(crate) fn servicing<T>(data: usize, f: impl FnOnce() -> T) -> T {
    SERVICING.with(|s| s.borrow_mut().push(data));
    let result = f();
    SERVICING.with(|s| s.borrow_mut().pop());
    result
}

/// The user-mode operation on whose behalf this thread works, if any: the operation of the innermost filter
/// callback running here if it was requested from user mode, or else the user-mode operation a deferred-I/O work
/// item running here services. Its callback data's address.
#[must_use]
pub fn on_behalf_of_user() -> Option<usize> {
    if let Some(frame) = FRAMES.with(|f| f.borrow().last().copied()) {
        return frame.user_request.then_some(frame.data);
    }
    let data = SERVICING.with(|s| s.borrow().last().copied())?;
    // SAFETY: a pended operation's callback data stays alive while a work item services it.
    let user = unsafe { (data as *const FLT_CALLBACK_DATA).as_ref() }.is_some_and(|d| d.RequestorMode != 0);
    user.then_some(data)
}

/// Whether this thread is inside the dispatch of a paging I/O operation (its filters' callbacks, the file system):
/// I/O issued from there must not go through the cache ([`Rule::CachedIoFromPagingPath`]).
#[must_use]
pub fn servicing_paging_io() -> bool {
    PAGING.with(|p| *p.borrow() > 0)
}

/// The filter callbacks running on this thread, innermost last.
#[must_use]
pub fn callback_frames() -> Vec<CallbackFrame> {
    FRAMES.with(|f| f.borrow().clone())
}

/// The filter whose callback is running on this thread, if any: the initiator of I/O issued from it.
#[must_use]
pub fn current_filter() -> Option<PFLT_FILTER> {
    FRAMES.with(|f| f.borrow().last().map(|frame| frame.filter))
}

/// Runs `f` as the callback `frame` on this thread.
pub(crate) fn in_frame<T>(frame: CallbackFrame, f: impl FnOnce() -> T) -> T {
    FRAMES.with(|frames| frames.borrow_mut().push(frame));
    let what = if frame.post { "PFLT_POST_OPERATION_CALLBACK" } else { "PFLT_PRE_OPERATION_CALLBACK" };
    // A callback runs in a thread it does not own: it must leave the thread's impersonation as it found it.
    let result = crate::kernel::security::keeping_impersonation(what, f);
    FRAMES.with(|frames| frames.borrow_mut().pop());
    result
}

/// One operation in flight: the callback data and the parameter block it points to, at stable addresses.
pub struct Request {
    iopb: Box<FLT_IO_PARAMETER_BLOCK>,
    data: Box<FLT_CALLBACK_DATA>,
    origin: Origin,
}

/// The process that requested each operation in flight, by callback data address (`FltGetRequestorProcess`).
static REQUESTORS: Mutex<std::collections::BTreeMap<usize, std::sync::Arc<process::Process>>> =
    Mutex::new(std::collections::BTreeMap::new());

/// The process that requested the operation whose callback data is `data`, while it is in flight.
#[must_use]
pub fn requestor(data: *const FLT_CALLBACK_DATA) -> Option<std::sync::Arc<process::Process>> {
    REQUESTORS.lock().unwrap_or_else(PoisonError::into_inner).get(&(data as usize)).cloned()
}

/// Whether `data` is callback data the model handed out that is still alive: an operation in flight, or data
/// `FltAllocateCallbackData` allocated and not yet freed.
#[must_use]
pub fn is_live_callback_data(data: *const FLT_CALLBACK_DATA) -> bool {
    !data.is_null() && REQUESTORS.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&(data as usize))
}

impl Drop for Request {
    fn drop(&mut self) {
        REQUESTORS.lock().unwrap_or_else(PoisonError::into_inner).remove(&(self.data() as usize));
        // Freeing callback data unlocks its buffer and frees the MDL FltLockUserBuffer built.
        super::userbuf::release(self.data());
    }
}

impl Request {
    /// A new IRP-based operation `major` on `file_object`, requested from user mode unless `kernel_mode`.
    #[must_use]
    pub fn new(major: u8, file_object: *mut FILE_OBJECT, kernel_mode: bool) -> Self {
        // SAFETY: FLT_IO_PARAMETER_BLOCK is a plain C struct for which all-zero is valid.
        let mut iopb: Box<FLT_IO_PARAMETER_BLOCK> = Box::new(unsafe { std::mem::zeroed() });
        iopb.MajorFunction = major;
        iopb.TargetFileObject = file_object;
        // SAFETY: as above, for FLT_CALLBACK_DATA.
        let mut data: Box<FLT_CALLBACK_DATA> = Box::new(unsafe { std::mem::zeroed() });
        data.Flags = FLTFL_CALLBACK_DATA_IRP_OPERATION;
        data.Iopb = &raw const *iopb;
        data.RequestorMode = i8::from(!kernel_mode);
        // The requestor is the process of the thread that issues the operation.
        REQUESTORS.lock().unwrap_or_else(PoisonError::into_inner).insert(&raw const *data as usize, process::current());
        Self { iopb, data, origin: Origin::default() }
    }

    /// Issues the operation from `origin` instead of from the top of the stack.
    #[must_use]
    pub fn from_origin(mut self, origin: Origin) -> Self {
        self.origin = origin;
        self
    }

    /// Marks the operation as a file-system filter callback operation (such as section synchronization) rather than
    /// an IRP.
    #[must_use]
    pub fn fs_filter_operation(mut self) -> Self {
        self.data.Flags = windows_sys::Wdk::Storage::FileSystem::Minifilters::FLTFL_CALLBACK_DATA_FS_FILTER_OPERATION;
        self
    }

    /// Marks the operation as a fast I/O operation (such as `IRP_MJ_NETWORK_QUERY_OPEN`) rather than an IRP: a
    /// filter may refuse it with `FLT_PREOP_DISALLOW_FASTIO`, and may not pend it.
    #[must_use]
    pub fn fast_io_operation(mut self) -> Self {
        self.data.Flags = FLTFL_CALLBACK_DATA_FAST_IO_OPERATION;
        self
    }

    /// The callback data, as drivers see it.
    #[must_use]
    pub fn data(&self) -> *const FLT_CALLBACK_DATA {
        &raw const *self.data
    }

    /// The parameter block, to fill in before dispatch and to read the (possibly filter-modified) parameters from.
    pub fn iopb(&mut self) -> &mut FLT_IO_PARAMETER_BLOCK {
        &mut self.iopb
    }

    /// The final status.
    #[must_use]
    pub fn status(&self) -> NTSTATUS {
        // SAFETY: IO_STATUS_BLOCK's union holds the status for every completed operation.
        unsafe { self.data.IoStatus.Anonymous.Status }
    }

    /// The final `IoStatus.Information`.
    #[must_use]
    pub fn information(&self) -> usize {
        self.data.IoStatus.Information
    }

    /// Completes the operation with `status` and `information` (what the file system does).
    pub fn complete(&mut self, status: NTSTATUS, information: usize) {
        self.data.IoStatus.Anonymous.Status = status;
        self.data.IoStatus.Information = information;
    }
}

static SEED: AtomicU64 = AtomicU64::new(u64::MAX);
static RNG: Mutex<u64> = Mutex::new(0);

/// Sets the seed that chooses post-operation IRQLs.
pub fn set_seed(seed: u64) {
    SEED.store(seed, Ordering::SeqCst);
    *RNG.lock().unwrap_or_else(PoisonError::into_inner) = seed;
}

fn next_random() -> u64 {
    if SEED.load(Ordering::SeqCst) == u64::MAX {
        let seed = std::env::var("FLTSIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        set_seed(seed);
    }
    let mut state = RNG.lock().unwrap_or_else(PoisonError::into_inner);
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A seeded IRQL among those a post-operation (or asynchronous I/O completion) callback may run at.
pub(crate) fn random_post_irql() -> u8 {
    match next_random() % 3 {
        0 => irql::PASSIVE,
        1 => irql::APC,
        _ => irql::DISPATCH,
    }
}

fn related(instance: &InstanceRecord, file_object: *const FILE_OBJECT) -> FLT_RELATED_OBJECTS {
    FLT_RELATED_OBJECTS {
        Size: u16::try_from(size_of::<FLT_RELATED_OBJECTS>()).unwrap_or(u16::MAX),
        TransactionContext: 0,
        Filter: instance.filter,
        Volume: instance.volume,
        Instance: instance.handle,
        FileObject: file_object,
        Transaction: std::ptr::null(),
    }
}

struct PendingPost {
    post: PFLT_POST_OPERATION_CALLBACK,
    instance: InstanceRecord,
    context: *mut c_void,
    synchronized: bool,
}

fn status_name(status: i32) -> String {
    match status {
        FLT_PREOP_SUCCESS_WITH_CALLBACK => "FLT_PREOP_SUCCESS_WITH_CALLBACK".into(),
        FLT_PREOP_SUCCESS_NO_CALLBACK => "FLT_PREOP_SUCCESS_NO_CALLBACK".into(),
        FLT_PREOP_PENDING => "FLT_PREOP_PENDING".into(),
        FLT_PREOP_DISALLOW_FASTIO => "FLT_PREOP_DISALLOW_FASTIO".into(),
        FLT_PREOP_COMPLETE => "FLT_PREOP_COMPLETE".into(),
        FLT_PREOP_SYNCHRONIZE => "FLT_PREOP_SYNCHRONIZE".into(),
        FLT_PREOP_DISALLOW_FSFILTER_IO => "FLT_PREOP_DISALLOW_FSFILTER_IO".into(),
        other => format!("{other}"),
    }
}

/// Runs operation `request` on `volume` through every attached instance and `file_system`, which performs the
/// operation (and completes the request) when no filter completed it first.
pub fn dispatch(volume: PFLT_VOLUME, request: &mut Request, file_system: impl FnOnce(&mut Request)) {
    let depth = NESTING.with(|n| {
        let mut n = n.borrow_mut();
        *n = n.saturating_add(1);
        *n
    });
    let paging = request.iopb.IrpFlags & windows_sys::Wdk::System::SystemServices::IRP_PAGING_IO != 0;
    if paging {
        PAGING.with(|p| *p.borrow_mut() += 1);
    }
    if depth > MAX_NESTING {
        verifier::report(
            Rule::RecursiveIo,
            "I/O manager",
            format!("operations issued from callbacks nest {depth} deep: the I/O recurses without end"),
        );
        request.complete(windows_sys::Win32::Foundation::STATUS_STACK_OVERFLOW, 0);
    } else {
        dispatch_stack(volume, request, file_system);
    }
    NESTING.with(|n| *n.borrow_mut() = depth.saturating_sub(1));
    if paging {
        PAGING.with(|p| *p.borrow_mut() -= 1);
    }
}

fn dispatch_stack(volume: PFLT_VOLUME, request: &mut Request, file_system: impl FnOnce(&mut Request)) {
    let mut stack = attached_on(volume);
    if let Some(below) = request.origin.below {
        // Only the instances under the given one see the operation.
        match stack.iter().position(|i| i.handle == below) {
            Some(at) => drop(stack.drain(..=at)),
            // An instance still in its InstanceSetup callback is not in the stack yet: those below its altitude.
            None => match super::instance::usable(below) {
                Some(origin) => stack.retain(|i| super::instance::is_below(&i.altitude, &origin.altitude)),
                None => stack.clear(),
            },
        }
    }
    let filters: Vec<FilterRecord> = filters();
    run_from(request, &stack, &filters, Vec::new(), file_system);
}

/// Calls the pre-operation callbacks of `stack` (highest first), then the file system unless a filter completed
/// the operation, then the post-operation callbacks collected on the way down (`posts`) in reverse. A pended
/// operation continues from the next instance once the driver completes it, in the completing thread's context.
fn run_from(
    request: &mut Request,
    stack: &[InstanceRecord],
    filters: &[FilterRecord],
    mut posts: Vec<PendingPost>,
    file_system: impl FnOnce(&mut Request),
) {
    let major = request.iopb.MajorFunction;
    let file_object = request.iopb.TargetFileObject.cast_const();
    let user_request = request.data.RequestorMode != 0;
    for (index, instance) in stack.iter().enumerate() {
        if request.origin.initiator == Some(instance.filter) {
            verifier::report(
                Rule::ReentrantIo,
                "I/O manager",
                format!(
                    "I/O that filter {:#x} issued reached its own instance {:#x} again (major {major:#04x}): issue it \
                     below the instance (FltCreateFileEx2, FltReadFileEx), not from the top of the stack",
                    instance.filter, instance.handle
                ),
            );
        }
        let Some(filter) = filters.iter().find(|f| f.handle == instance.filter && !f.unregistered) else {
            continue;
        };
        let Some(callbacks) = filter.operation_callbacks.iter().find(|o| o.major == major) else { continue };
        let Some(pre) = callbacks.pre else {
            // A filter that registered only a post-operation callback still has it called.
            if callbacks.post.is_some() {
                let instance = instance.clone();
                posts.push(PendingPost { post: callbacks.post, instance, context: null_mut(), synchronized: false });
            }
            continue;
        };
        request.iopb.TargetInstance = instance.handle;
        let objects = related(instance, file_object);
        let mut context: *mut c_void = null_mut();
        let data = &raw mut *request.data;
        let frame = CallbackFrame { filter: instance.filter, major, user_request, post: false, data: data as usize };
        super::pending::enter_pre(data, instance.filter);
        // SAFETY: the driver registered this callback and is loaded; the data, objects and context outlive the call.
        let status = in_frame(frame, || unsafe { pre(data, &raw const objects, &raw mut context) });
        if status != FLT_PREOP_PENDING {
            super::pending::leave_pre(data);
        }
        if status == FLT_PREOP_PENDING {
            continue_pended(request, stack, index, filters, posts, file_system, callbacks.post, &context);
            return;
        }
        match pre_status(request, status, context, callbacks.post, major) {
            PreDecision::Continue => {}
            PreDecision::Post { synchronized } => {
                let instance = instance.clone();
                posts.push(PendingPost { post: callbacks.post, instance, context, synchronized });
            }
            PreDecision::Completed => {
                finish_posts(request, posts, file_object, user_request);
                return;
            }
        }
    }
    file_system(request);
    finish_posts(request, posts, file_object, user_request);
}

/// Calls the post-operation callbacks collected on the way down (`posts`), from the bottom up.
fn finish_posts(request: &mut Request, posts: Vec<PendingPost>, file_object: *const FILE_OBJECT, user_request: bool) {
    finish_upward(request, posts.into_iter().rev().collect(), file_object, user_request);
}

/// Calls the post-operation callbacks `upward` in order; one that pends the operation
/// (`FLT_POSTOP_MORE_PROCESSING_REQUIRED`) halts the rest until the driver completes it.
fn finish_upward(request: &mut Request, upward: Vec<PendingPost>, file_object: *const FILE_OBJECT, user_request: bool) {
    let mut rest = upward.into_iter();
    while let Some(pending) = rest.next() {
        // The model does not drain post-operations at instance teardown, so it never passes
        // FLTFL_POST_OPERATION_DRAINING; call_post still checks the flag.
        if call_post(request, &pending, file_object, user_request, 0) == PostDecision::Pended {
            continue_pended_post(request, rest.collect(), file_object, user_request);
            return;
        }
    }
}

/// A post-operation callback pended the operation: waits for `FltCompletePendedPostOperation` (the requestor's
/// thread blocks, as for a synchronous request), then calls the callbacks above (`rest`) in the completing thread's
/// context. When nothing will complete it (reported), completion processing resumes with the status the operation
/// had, instead of hanging.
fn continue_pended_post(
    request: &mut Request,
    rest: Vec<PendingPost>,
    file_object: *const FILE_OBJECT,
    user_request: bool,
) {
    let Some(resumption) = super::postpend::wait(request.data()) else {
        finish_upward(request, rest, file_object, user_request);
        return;
    };
    let process = resumption.process();
    thread::as_thread(resumption.thread(), || {
        process::run_as(&process, || finish_upward(request, rest, file_object, user_request));
    });
    // Lets FltCompletePendedPostOperation return.
    drop(resumption);
}

/// The instance at `index` returned `FLT_PREOP_PENDING`: waits for its completion and continues the operation in
/// the completing thread's context, or fails it when nothing will complete it.
#[expect(clippy::too_many_arguments, reason = "the dispatcher's state at the pended instance")]
fn continue_pended(
    request: &mut Request,
    stack: &[InstanceRecord],
    index: usize,
    filters: &[FilterRecord],
    mut posts: Vec<PendingPost>,
    file_system: impl FnOnce(&mut Request),
    post: PFLT_POST_OPERATION_CALLBACK,
    context: &*mut c_void,
) {
    const PRE: &str = "PFLT_PRE_OPERATION_CALLBACK";
    let major = request.iopb.MajorFunction;
    let file_object = request.iopb.TargetFileObject.cast_const();
    let user_request = request.data.RequestorMode != 0;
    let Some(instance) = stack.get(index) else { return };
    if !context.is_null() {
        verifier::report(Rule::CompletionContextNotAllowed, PRE, "a completion context was set with FLT_PREOP_PENDING");
    }
    if request.data.Flags & FLTFL_CALLBACK_DATA_IRP_OPERATION == 0 {
        verifier::report(
            Rule::StatusNotAllowedForOperation,
            PRE,
            format!(
                "FLT_PREOP_PENDING for major {major:#04x}, an operation that is not IRP-based (fast I/O or FS filter)"
            ),
        );
    }
    let data = request.data();
    let Some(completion) = super::pending::wait(data) else {
        request.complete(STATUS_CANCELLED, 0);
        finish_posts(request, posts, file_object, user_request);
        return;
    };
    let rest = stack.get(index.saturating_add(1)..).unwrap_or(&[]);
    let process = std::sync::Arc::clone(&completion.process);
    thread::as_thread(completion.thread, || {
        process::run_as(&process, || {
            let ctx = completion.context as *mut c_void;
            match pre_status(request, completion.status, ctx, post, major) {
                PreDecision::Continue => run_from(request, rest, filters, posts, file_system),
                PreDecision::Post { synchronized } => {
                    posts.push(PendingPost { post, instance: instance.clone(), context: ctx, synchronized });
                    run_from(request, rest, filters, posts, file_system);
                }
                PreDecision::Completed => finish_posts(request, posts, file_object, user_request),
            }
        });
    });
    super::pending::finish(data);
}

/// What the dispatcher does after a pre-operation callback returned.
enum PreDecision {
    /// Go on down the stack.
    Continue,
    /// Go on down, and call the post-operation callback on the way up.
    Post { synchronized: bool },
    /// The operation is complete; stop.
    Completed,
}

/// Checks a pre-operation callback's answer against the rules and decides what happens next.
fn pre_status(
    request: &mut Request,
    status: i32,
    context: *mut c_void,
    post: PFLT_POST_OPERATION_CALLBACK,
    major: u8,
) -> PreDecision {
    const PRE: &str = "PFLT_PRE_OPERATION_CALLBACK";
    let context_allowed = matches!(status, FLT_PREOP_SUCCESS_WITH_CALLBACK | FLT_PREOP_SYNCHRONIZE);
    if !context.is_null() && !context_allowed {
        verifier::report(
            Rule::CompletionContextNotAllowed,
            PRE,
            format!("a completion context was set with {}", status_name(status)),
        );
    }
    match status {
        FLT_PREOP_SUCCESS_WITH_CALLBACK | FLT_PREOP_SYNCHRONIZE => {
            let synchronized = status == FLT_PREOP_SYNCHRONIZE;
            if synchronized && major == IRP_MJ_CREATE {
                verifier::report(
                    Rule::StatusNotAllowedForOperation,
                    PRE,
                    "FLT_PREOP_SYNCHRONIZE for IRP_MJ_CREATE (creates are always synchronized)",
                );
            }
            if post.is_none() {
                verifier::report(
                    Rule::PostOpMissing,
                    PRE,
                    format!("{} for major {major:#04x}, which has no post-operation callback", status_name(status)),
                );
                return PreDecision::Continue;
            }
            PreDecision::Post { synchronized }
        }
        FLT_PREOP_COMPLETE => {
            if request.status() == STATUS_PENDING {
                verifier::report(
                    Rule::CompleteWithPending,
                    PRE,
                    "FLT_PREOP_COMPLETE with IoStatus.Status == STATUS_PENDING",
                );
            }
            PreDecision::Completed
        }
        FLT_PREOP_DISALLOW_FASTIO if request.data.Flags & FLTFL_CALLBACK_DATA_FAST_IO_OPERATION != 0 => {
            // The fast I/O is refused: it goes no further down and fails, and the I/O manager takes the IRP path.
            // See <https://learn.microsoft.com/windows-hardware/drivers/ifs/flt-parameters-for-irp-mj-network-query-open>.
            request.complete(windows_sys::Win32::Foundation::STATUS_FLT_DISALLOW_FAST_IO, 0);
            PreDecision::Completed
        }
        FLT_PREOP_DISALLOW_FASTIO => {
            verifier::report(
                Rule::StatusNotAllowedForOperation,
                PRE,
                format!(
                    "FLT_PREOP_DISALLOW_FASTIO for major {major:#04x}, not a fast I/O operation (it is only for fast I/O)"
                ),
            );
            PreDecision::Continue
        }
        FLT_PREOP_DISALLOW_FSFILTER_IO if u16::from(major) != IRP_MJ_QUERY_OPEN & 0xFF => {
            verifier::report(
                Rule::StatusNotAllowedForOperation,
                PRE,
                format!("FLT_PREOP_DISALLOW_FSFILTER_IO for major {major:#04x} (only IRP_MJ_QUERY_OPEN)"),
            );
            PreDecision::Continue
        }
        FLT_PREOP_DISALLOW_FSFILTER_IO => {
            // The fast query-open is refused: it fails, and the I/O manager takes the slow path (a full create).
            // See <https://learn.microsoft.com/windows-hardware/drivers/ifs/flt-parameters-for-irp-mj-query-open>.
            request.complete(windows_sys::Win32::Foundation::STATUS_FLT_DISALLOW_FSFILTER_IO, 0);
            PreDecision::Completed
        }
        FLT_PREOP_SUCCESS_NO_CALLBACK => PreDecision::Continue,
        other => {
            verifier::report(Rule::InvalidPreOpStatus, PRE, format!("returned {other}, not an FLT_PREOP_* value"));
            PreDecision::Continue
        }
    }
}

/// What the dispatcher does after a post-operation callback returned.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PostDecision {
    /// Go on up the stack.
    Continue,
    /// The callback pended the operation: wait for its completion before going on.
    Pended,
}

fn call_post(
    request: &mut Request,
    pending: &PendingPost,
    file_object: *const FILE_OBJECT,
    user_request: bool,
    flags: u32,
) -> PostDecision {
    const POST: &str = "PFLT_POST_OPERATION_CALLBACK";
    let Some(post) = pending.post else { return PostDecision::Continue };
    let major = request.iopb.MajorFunction;
    let level = if major == IRP_MJ_CREATE || pending.synchronized { irql::PASSIVE } else { random_post_irql() };
    request.iopb.TargetInstance = pending.instance.handle;
    let objects = related(&pending.instance, file_object);
    let data = &raw mut *request.data;
    let frame = CallbackFrame { filter: pending.instance.filter, major, user_request, post: true, data: data as usize };
    super::postpend::enter_post(data, pending.instance.filter);
    let status = in_frame(frame, || {
        thread::at_irql(level, || {
            // SAFETY: the driver registered this callback and is loaded; the data and objects outlive the call.
            unsafe { post(data, &raw const objects, pending.context, flags) }
        })
    });
    let more_processing = status == FLT_POSTOP_MORE_PROCESSING_REQUIRED;
    let irp = request.data.Flags & FLTFL_CALLBACK_DATA_IRP_OPERATION != 0;
    let draining = flags & FLTFL_POST_OPERATION_DRAINING != 0;
    if more_processing && (!irp || draining) {
        let why = if irp { "with FLTFL_POST_OPERATION_DRAINING set" } else { "for an operation that is not IRP-based" };
        verifier::report(
            Rule::StatusNotAllowedForOperation,
            POST,
            format!("FLT_POSTOP_MORE_PROCESSING_REQUIRED {why} (major {major:#04x}); completion processing goes on"),
        );
    }
    let pended = super::postpend::leave_post(data, more_processing && irp && !draining);
    match status {
        FLT_POSTOP_FINISHED_PROCESSING | FLT_POSTOP_MORE_PROCESSING_REQUIRED => {}
        FLT_POSTOP_DISALLOW_FSFILTER_IO if u16::from(major) == IRP_MJ_QUERY_OPEN & 0xFF => {
            request.complete(windows_sys::Win32::Foundation::STATUS_FLT_DISALLOW_FSFILTER_IO, 0);
        }
        FLT_POSTOP_DISALLOW_FSFILTER_IO => verifier::report(
            Rule::InvalidPostOpStatus,
            POST,
            format!(
                "returned FLT_POSTOP_DISALLOW_FSFILTER_IO for major {major:#04x} (only IRP_MJ_QUERY_OPEN; a fast I/O \
                 operation cannot be refused once the file system answered)"
            ),
        ),
        other => verifier::report(Rule::InvalidPostOpStatus, POST, format!("returned {other}")),
    }
    if pended { PostDecision::Pended } else { PostDecision::Continue }
}
