//! The verifier: named rules, and the reports a broken rule produces.
//!
//! Every rule cites the Microsoft docs page it comes from. A report also names the API that was called, and the
//! calling thread's IRQL, APC state and top-level IRP, because most kernel-mode rules are about the context of a
//! call rather than its arguments. Reports are collected for the test to inspect ([`take_reports`]) and printed
//! to standard error as they happen, so a failing scenario shows them in its output.

use std::{fmt, sync::Mutex};

use crate::kernel::{
    irql,
    thread::{self, ThreadSnapshot},
};

/// A rule the model enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// An API was called above the highest IRQL its docs allow.
    IrqlTooHigh,
    /// `ExAllocatePool2` was asked for zero bytes, with a zero or non-printable tag, or with invalid pool flags.
    PoolInvalidRequest,
    /// Pool was freed twice.
    PoolDoubleFree,
    /// A pointer that the pool never returned was freed.
    PoolFreeNotAllocated,
    /// Pool was freed with a tag other than the one it was allocated with.
    PoolTagMismatch,
    /// Pool allocated by a driver was still allocated when the driver unloaded (or failed to load).
    PoolLeak,
    /// `FltRegisterFilter` was given an invalid registration table.
    RegistrationInvalid,
    /// A filter routine was given something that is not a registered filter.
    InvalidFilterHandle,
    /// A filter was still registered after its unload callback returned success, or after `DriverEntry` failed.
    FilterNotUnregistered,
    /// A pre-operation callback returned a value that is not an `FLT_PREOP_CALLBACK_STATUS`.
    InvalidPreOpStatus,
    /// `FLT_PREOP_SUCCESS_WITH_CALLBACK` or `FLT_PREOP_SYNCHRONIZE` for an operation with no post-operation callback.
    PostOpMissing,
    /// A completion context was set with a status other than `SUCCESS_WITH_CALLBACK` or `SYNCHRONIZE`.
    CompletionContextNotAllowed,
    /// `FLT_PREOP_COMPLETE` with `IoStatus.Status` set to `STATUS_PENDING`.
    CompleteWithPending,
    /// `FLT_PREOP_SYNCHRONIZE` for a create, or a fast-I/O-only status for an IRP operation.
    StatusNotAllowedForOperation,
    /// A post-operation callback returned a value that is not allowed.
    InvalidPostOpStatus,
    /// The driver used a Filter Manager feature the model does not implement yet; the operation fails.
    UnsupportedByModel,
    /// Filter-initiated I/O reached the initiating filter's own instance again.
    ReentrantIo,
    /// Operations issued from callbacks nested without end.
    RecursiveIo,
    /// A routine was given an argument its docs forbid.
    InvalidArgument,
    /// A routine that must not run with a top-level IRP set was called with one.
    TopLevelIrpSet,
    /// A routine that must not run with APCs disabled was called in a critical or guarded region or at APC_LEVEL.
    ApcsDisabled,
    /// A kernel-mode open on a user's behalf skipped the access check (no `IO_FORCE_ACCESS_CHECK`).
    UncheckedOpenForUser,
    /// A file handle or file object the driver opened was still open when it unloaded.
    FileLeak,
    /// A filter unregistered (unloaded) while an asynchronous `FltReadFileEx` / `FltWriteFileEx` it issued had not
    /// completed: instance teardown waits for I/O the filter initiated, so the unload hangs.
    AsyncIoOutstandingAtUnload,
    /// A pre-operation returned `FLT_PREOP_PENDING`, or a post-operation `FLT_POSTOP_MORE_PROCESSING_REQUIRED`, and
    /// the operation was never completed.
    PendedNeverCompleted,
    /// A Filter Manager work item was still allocated when the driver unloaded.
    WorkItemLeak,
    /// `FltUnregisterFilter` was called from one of the filter's own work items: it waits for the filter's work
    /// items to return, the calling one included, so the worker would wait for itself (a deadlock).
    UnregisterWaitsForItself,
    /// A context was released more often than referenced, used after it was freed, or dropped to zero while
    /// attached (Filter Verifier's bugcheck 0xF5).
    ContextMisuse,
    /// A context was still alive when its filter unloaded.
    ContextLeak,
    /// Name information was released more often than referenced, or used after its last release.
    NameInfoMisuse,
    /// Name information was never released before its filter unloaded.
    NameInfoLeak,
    /// Callback data from `FltAllocateCallbackData` was never freed before its filter unloaded.
    CallbackDataLeak,
    /// A file lock from `FltAllocateFileLock` was never freed before its driver unloaded.
    FileLockLeak,
    /// A post-create failed a create the file system had completed without `FltCancelFileOpen` (the open is never
    /// closed), or cancelled the open and left a success status; or `FltCancelFileOpen` was called outside a
    /// post-create callback or on a file object it cannot cancel.
    CreateFailureProtocol,
    /// Cached (non-paging, buffered) I/O was issued while servicing paging I/O: the cache manager may need the very
    /// resources the paging I/O holds, a deadlock.
    CachedIoFromPagingPath,
    /// The driver called `KeBugCheckEx`.
    BugCheck,
    /// `KeLeaveCriticalRegion` or `KeLeaveGuardedRegion` without a matching enter.
    RegionLeaveWithoutEnter,
    /// A driver callback (DriverEntry, unload, a work item) returned with another IRQL, critical or guarded region
    /// depth, or top-level IRP than it was called with.
    CallbackStateMismatch,
    /// A filter called `IoSetTopLevelIrp`, which only file systems may call.
    FilterSetTopLevelIrp,
    /// A thread waited for a system worker while at APC_LEVEL or above, in a guarded region, or with a top-level IRP
    /// set: the worker may need what the waiting thread holds (a deadlock hazard on the paging path).
    WaitForWorkerInUnsafeContext,
    /// A thread waited, with the APCs it needs disabled, for an event that only a special kernel APC to that thread
    /// would signal: a deadlock.
    WaitNeedsDisabledApc,
    /// A kernel routine was given an object (event, push lock, process) the model never saw initialised, or one
    /// that was deleted.
    InvalidKernelObject,
    /// A push lock was acquired recursively, released by a thread that does not hold it, or deleted while held.
    PushLockMisuse,
    /// A communication server port was still open when its filter unloaded (`FltCloseCommunicationPort` never
    /// called).
    PortLeak,
    /// A client port was still open when its filter unloaded: the driver did not call `FltCloseClientPort`, normally
    /// from its disconnect callback.
    ClientPortLeak,
    /// A raw user buffer of a port message was accessed other than through a safe copy routine, from another
    /// process, or not at all where a direct access is the only explanation.
    UserBufferUnsafeAccess,
    /// The same bytes of a raw user buffer were read twice during one message: a double fetch, which another user
    /// thread can exploit by changing the buffer between the reads.
    UserBufferDoubleFetch,
    /// A thread waited for an oplock event only it could bring about: an operation waited for the acknowledgement
    /// of an oplock break (or for an oplock requested with `FILE_OPEN_REQUIRING_OPLOCK`) that its own thread owes,
    /// or a thread waited for its own oplock to break, with no other thread left that could act: a deadlock.
    OplockBreakDeadlock,
    /// A byte-range lock request without `FailImmediately` waited for a conflicting lock that no thread left
    /// could release: every thread that could unlock or close was gone or itself waiting for a lock.
    LockWaitDeadlock,
    /// A kernel-mode create with `IO_FORCE_ACCESS_CHECK` made on behalf of a user's request checked access as an
    /// identity other than the requestor's (the thread's effective token, such as SYSTEM in a worker thread).
    AccessCheckWrongIdentity,
    /// A filter callback or a work item routine returned with its thread's impersonation changed: left
    /// impersonating, or ended an impersonation the thread had before.
    ImpersonationNotRestored,
    /// A client security context was never deleted, or an impersonation token reference never released.
    SecurityReferenceLeak,
    /// The model itself failed (a panic inside an export): a bug in fltsim, never in the driver.
    ModelFault,
}

/// A page of the Windows driver docs, by its path below `windows-hardware/drivers/`.
macro_rules! drivers {
    ($path:literal) => {
        concat!("https://learn.microsoft.com/windows-hardware/drivers/", $path)
    };
}

/// A page of the driver DDI reference, by its path below `windows-hardware/drivers/ddi/`.
macro_rules! ddi {
    ($path:literal) => {
        concat!("https://learn.microsoft.com/windows-hardware/drivers/ddi/", $path)
    };
}

impl Rule {
    /// A short, stable name for the rule.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::IrqlTooHigh => "irql-too-high",
            Self::PoolInvalidRequest => "pool-invalid-request",
            Self::PoolDoubleFree => "pool-double-free",
            Self::PoolFreeNotAllocated => "pool-free-not-allocated",
            Self::PoolTagMismatch => "pool-tag-mismatch",
            Self::PoolLeak => "pool-leak",
            Self::RegistrationInvalid => "registration-invalid",
            Self::InvalidFilterHandle => "invalid-filter-handle",
            Self::FilterNotUnregistered => "filter-not-unregistered",
            Self::InvalidPreOpStatus => "invalid-preop-status",
            Self::PostOpMissing => "postop-missing",
            Self::CompletionContextNotAllowed => "completion-context-not-allowed",
            Self::CompleteWithPending => "complete-with-pending",
            Self::StatusNotAllowedForOperation => "status-not-allowed-for-operation",
            Self::InvalidPostOpStatus => "invalid-postop-status",
            Self::UnsupportedByModel => "unsupported-by-model",
            Self::ReentrantIo => "reentrant-io",
            Self::RecursiveIo => "recursive-io",
            Self::InvalidArgument => "invalid-argument",
            Self::TopLevelIrpSet => "top-level-irp-set",
            Self::ApcsDisabled => "apcs-disabled",
            Self::UncheckedOpenForUser => "unchecked-open-for-user",
            Self::FileLeak => "file-leak",
            Self::AsyncIoOutstandingAtUnload => "async-io-outstanding-at-unload",
            Self::PendedNeverCompleted => "pended-never-completed",
            Self::WorkItemLeak => "work-item-leak",
            Self::UnregisterWaitsForItself => "unregister-waits-for-itself",
            Self::ContextMisuse => "context-misuse",
            Self::ContextLeak => "context-leak",
            Self::NameInfoMisuse => "name-info-misuse",
            Self::NameInfoLeak => "name-info-leak",
            Self::CallbackDataLeak => "callback-data-leak",
            Self::FileLockLeak => "file-lock-leak",
            Self::CreateFailureProtocol => "create-failure-protocol",
            Self::CachedIoFromPagingPath => "cached-io-from-paging-path",
            Self::BugCheck => "bugcheck",
            Self::RegionLeaveWithoutEnter => "region-leave-without-enter",
            Self::CallbackStateMismatch => "callback-state-mismatch",
            Self::FilterSetTopLevelIrp => "filter-set-top-level-irp",
            Self::WaitForWorkerInUnsafeContext => "wait-for-worker-in-unsafe-context",
            Self::WaitNeedsDisabledApc => "wait-needs-disabled-apc",
            Self::InvalidKernelObject => "invalid-kernel-object",
            Self::PushLockMisuse => "push-lock-misuse",
            Self::PortLeak => "port-leak",
            Self::ClientPortLeak => "client-port-leak",
            Self::UserBufferUnsafeAccess => "user-buffer-unsafe-access",
            Self::UserBufferDoubleFetch => "user-buffer-double-fetch",
            Self::OplockBreakDeadlock => "oplock-break-deadlock",
            Self::LockWaitDeadlock => "lock-wait-deadlock",
            Self::AccessCheckWrongIdentity => "access-check-wrong-identity",
            Self::ImpersonationNotRestored => "impersonation-not-restored",
            Self::SecurityReferenceLeak => "security-reference-leak",
            Self::ModelFault => "model-fault",
        }
    }

    /// The docs page the rule comes from.
    #[must_use]
    pub const fn docs(self) -> &'static str {
        match self {
            Self::IrqlTooHigh => drivers!("devtest/irql-checking"),
            Self::PoolInvalidRequest => ddi!("wdm/nf-wdm-exallocatepool2"),
            Self::PoolDoubleFree | Self::PoolFreeNotAllocated | Self::PoolTagMismatch => {
                drivers!("debugger/bug-check-0xc2--bad-pool-caller")
            }
            Self::PoolLeak => drivers!("devtest/pool-tracking"),
            Self::RegistrationInvalid => ddi!("fltkernel/ns-fltkernel-_flt_registration"),
            Self::InvalidFilterHandle | Self::UnregisterWaitsForItself => {
                ddi!("fltkernel/nf-fltkernel-fltunregisterfilter")
            }
            Self::FilterNotUnregistered => ddi!("fltkernel/nc-fltkernel-pflt_filter_unload_callback"),
            Self::InvalidPreOpStatus
            | Self::PostOpMissing
            | Self::CompletionContextNotAllowed
            | Self::CompleteWithPending
            | Self::StatusNotAllowedForOperation => ddi!("fltkernel/nc-fltkernel-pflt_pre_operation_callback"),
            Self::InvalidPostOpStatus => ddi!("fltkernel/nc-fltkernel-pflt_post_operation_callback"),
            Self::UnsupportedByModel => "fltsim/README.md#not-modelled-yet",
            Self::ReentrantIo | Self::TopLevelIrpSet | Self::ApcsDisabled => {
                ddi!("fltkernel/nf-fltkernel-fltcreatefileex2")
            }
            Self::UncheckedOpenForUser | Self::AccessCheckWrongIdentity => ddi!("ntddk/nf-ntddk-iocreatefileex"),
            Self::CachedIoFromPagingPath => drivers!("ifs/constraints-on-dispatch-routines"),
            Self::ContextMisuse => drivers!("debugger/bug-check-0xf5--fltmgr-file-system"),
            Self::FileLeak
            | Self::WorkItemLeak
            | Self::ContextLeak
            | Self::NameInfoMisuse
            | Self::NameInfoLeak
            | Self::CallbackDataLeak
            | Self::FileLockLeak
            | Self::RecursiveIo
            | Self::InvalidArgument => drivers!("devtest/file-system-filter-verification"),
            Self::CreateFailureProtocol => drivers!("ifs/failing-an-i-o-operation-in-a-postoperation-callback-routine"),
            Self::PendedNeverCompleted => drivers!("ifs/pending-an-i-o-operation-in-a-preoperation-callback-routine"),
            Self::AsyncIoOutstandingAtUnload => ddi!("fltkernel/nc-fltkernel-pflt_instance_teardown_callback"),
            Self::BugCheck => ddi!("wdm/nf-wdm-kebugcheckex"),
            Self::RegionLeaveWithoutEnter => drivers!("kernel/critical-regions-and-guarded-regions"),
            Self::CallbackStateMismatch => drivers!("debugger/bug-check-0x1--apc-index-mismatch"),
            Self::FilterSetTopLevelIrp => ddi!("ntifs/nf-ntifs-iosettoplevelirp"),
            Self::WaitForWorkerInUnsafeContext => ddi!("fltkernel/nf-fltkernel-fltqueuedeferredioworkitem"),
            Self::WaitNeedsDisabledApc => drivers!("kernel/types-of-apcs"),
            Self::InvalidKernelObject => ddi!("wdm/nf-wdm-kewaitforsingleobject"),
            Self::PushLockMisuse => ddi!("fltkernel/nf-fltkernel-fltacquirepushlockexclusive"),
            Self::PortLeak => ddi!("fltkernel/nf-fltkernel-fltclosecommunicationport"),
            Self::ClientPortLeak => ddi!("fltkernel/nf-fltkernel-fltcloseclientport"),
            Self::UserBufferUnsafeAccess => ddi!("fltkernel/nc-fltkernel-pflt_message_notify"),
            Self::UserBufferDoubleFetch => ddi!("wdm/nf-wdm-probeforread"),
            Self::OplockBreakDeadlock => drivers!("ifs/breaking-oplocks"),
            Self::LockWaitDeadlock => drivers!("ifs/flt-parameters-for-irp-mj-lock-control"),
            Self::ImpersonationNotRestored => ddi!("ntifs/nf-ntifs-psimpersonateclient"),
            Self::SecurityReferenceLeak => ddi!("ntifs/nf-ntifs-sedeleteclientsecurity"),
            Self::ModelFault => "fltsim/README.md",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One broken rule.
#[derive(Clone, Debug)]
pub struct Report {
    /// The rule that was broken.
    pub rule: Rule,
    /// The API whose call broke it.
    pub api: &'static str,
    /// What exactly was wrong.
    pub detail: String,
    /// The calling thread's state at the time.
    pub thread: ThreadSnapshot,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fltsim verifier: rule {} broken by {}: {}\n  thread {}: IRQL {}, critical regions {}, guarded regions \
             {}, all APCs disabled: {}, top-level IRP: {}\n  see {}",
            self.rule,
            self.api,
            self.detail,
            self.thread.name,
            irql::name(self.thread.irql),
            self.thread.critical_regions,
            self.thread.guarded_regions,
            self.thread.all_apcs_disabled(),
            if self.thread.top_level_irp == 0 {
                "NULL".to_owned()
            } else {
                format!("{:#x}", self.thread.top_level_irp)
            },
            self.rule.docs()
        )
    }
}

static REPORTS: Mutex<Vec<Report>> = Mutex::new(Vec::new());

/// Reports an invalid argument to `api` ([`Rule::InvalidArgument`]) and returns the status the call fails with,
/// `STATUS_INVALID_PARAMETER`.
pub(crate) fn invalid_argument(api: &'static str, why: impl Into<String>) -> windows_sys::Win32::Foundation::NTSTATUS {
    report(Rule::InvalidArgument, api, why);
    windows_sys::Win32::Foundation::STATUS_INVALID_PARAMETER
}

/// Records that `api` broke `rule`, with the current thread's state.
pub fn report(rule: Rule, api: &'static str, detail: impl Into<String>) {
    let report = Report { rule, api, detail: detail.into(), thread: thread::snapshot() };
    eprintln!("{report}");
    REPORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(report);
}

/// Removes and returns every report recorded so far.
#[must_use]
pub fn take_reports() -> Vec<Report> {
    std::mem::take(&mut *REPORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// Removes every report recorded so far and returns the rules they broke, in order.
#[must_use]
pub fn take_rules() -> Vec<Rule> {
    take_reports().into_iter().map(|r| r.rule).collect()
}

/// The rules broken so far, in order, without removing the reports.
#[must_use]
pub fn broken_rules() -> Vec<Rule> {
    REPORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(|r| r.rule).collect()
}
