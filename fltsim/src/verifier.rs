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
    /// The driver called `KeBugCheckEx`.
    BugCheck,
    /// The model itself failed (a panic inside an export): a bug in fltsim, never in the driver.
    ModelFault,
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
            Self::BugCheck => "bugcheck",
            Self::ModelFault => "model-fault",
        }
    }

    /// The docs page the rule comes from.
    #[must_use]
    pub const fn docs(self) -> &'static str {
        match self {
            Self::IrqlTooHigh => "https://learn.microsoft.com/windows-hardware/drivers/devtest/irql-checking",
            Self::PoolInvalidRequest => {
                "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exallocatepool2"
            }
            Self::PoolDoubleFree | Self::PoolFreeNotAllocated | Self::PoolTagMismatch => {
                "https://learn.microsoft.com/windows-hardware/drivers/debugger/bug-check-0xc2--bad-pool-caller"
            }
            Self::PoolLeak => "https://learn.microsoft.com/windows-hardware/drivers/devtest/pool-tracking",
            Self::RegistrationInvalid => {
                "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/ns-fltkernel-_flt_registration"
            }
            Self::InvalidFilterHandle => {
                "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltunregisterfilter"
            }
            Self::FilterNotUnregistered => {
                "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_filter_unload_callback"
            }
            Self::BugCheck => "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-kebugcheckex",
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

/// The rules broken so far, in order, without removing the reports.
#[must_use]
pub fn broken_rules() -> Vec<Rule> {
    REPORTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().map(|r| r.rule).collect()
}
