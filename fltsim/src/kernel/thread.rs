//! Simulated kernel threads: every host thread that calls into the model is a kernel thread with an IRQL,
//! critical- and guarded-region counts and a top-level IRP.
//!
//! A host thread the model has not seen before is adopted as a system thread at PASSIVE_LEVEL, which is what a
//! test's own thread and the loader's thread are. [`run_on_system_thread`] runs a closure on a fresh system thread on a kernel-sized
//! stack.

use std::{cell::RefCell, io, thread};

use super::irql;
use crate::{guard::guarded, verifier};

/// The state of one simulated kernel thread.
#[derive(Clone, Debug)]
pub struct ThreadSnapshot {
    /// The thread's name, for reports.
    pub name: String,
    /// The current IRQL.
    pub irql: u8,
    /// Depth of `KeEnterCriticalRegion` nesting (normal kernel APCs off).
    pub critical_regions: u32,
    /// Depth of `KeEnterGuardedRegion` nesting (all kernel APCs off, at PASSIVE_LEVEL).
    pub guarded_regions: u32,
    /// `IoGetTopLevelIrp()`: 0 when NULL.
    pub top_level_irp: usize,
}

impl ThreadSnapshot {
    /// `KeAreAllApcsDisabled`: inside a guarded region or at APC_LEVEL or above.
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keareallapcsdisabled>.
    #[must_use]
    pub fn all_apcs_disabled(&self) -> bool {
        self.guarded_regions > 0 || self.irql >= irql::APC
    }

    /// `KeAreApcsDisabled`: inside a critical or a guarded region.
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-keareapcsdisabled>.
    #[must_use]
    pub fn apcs_disabled(&self) -> bool {
        self.critical_regions > 0 || self.guarded_regions > 0
    }
}

thread_local! {
    static CURRENT: RefCell<ThreadSnapshot> = RefCell::new(ThreadSnapshot {
        name: thread::current().name().unwrap_or("unnamed").to_owned(),
        irql: irql::PASSIVE,
        critical_regions: 0,
        guarded_regions: 0,
        top_level_irp: 0,
    });
}

/// The current thread's state.
#[must_use]
pub fn snapshot() -> ThreadSnapshot {
    CURRENT.with(|t| t.borrow().clone())
}

/// The current thread's IRQL.
#[must_use]
pub fn current_irql() -> u8 {
    CURRENT.with(|t| t.borrow().irql)
}

/// Runs `f` with the current thread's state replaced by `state`, then restores it: how the model continues an
/// operation "in" another thread, such as the system worker that completed a pended operation (the driver sees
/// that thread's IRQL, regions, top-level IRP and name).
pub fn as_thread<T>(state: ThreadSnapshot, f: impl FnOnce() -> T) -> T {
    let previous = CURRENT.with(|t| t.replace(state));
    let result = f();
    CURRENT.with(|t| *t.borrow_mut() = previous);
    result
}

/// Changes the current thread's state. For the model's own exports and helpers.
pub(crate) fn update<T>(f: impl FnOnce(&mut ThreadSnapshot) -> T) -> T {
    CURRENT.with(|t| f(&mut t.borrow_mut()))
}

/// Runs `f` inside a critical region (normal kernel APCs off), as `KeEnterCriticalRegion` /
/// `KeLeaveCriticalRegion` around it would. For tests that put a driver in that context.
pub fn in_critical_region<T>(f: impl FnOnce() -> T) -> T {
    update(|t| t.critical_regions += 1);
    let result = f();
    update(|t| t.critical_regions = t.critical_regions.saturating_sub(1));
    result
}

/// Runs `f` inside a guarded region (all kernel APCs off, IRQL unchanged), as `KeEnterGuardedRegion` /
/// `KeLeaveGuardedRegion` around it would. For tests that put a driver in that context.
pub fn in_guarded_region<T>(f: impl FnOnce() -> T) -> T {
    update(|t| t.guarded_regions += 1);
    let result = f();
    update(|t| t.guarded_regions = t.guarded_regions.saturating_sub(1));
    result
}

/// Runs `f` with the current thread's top-level IRP set to `value` (an IRP address or an `FSRTL_*_TOP_LEVEL_IRP`
/// value), restoring the previous value afterwards, as a file system, the cache manager or the modified page
/// writer does around the I/O it issues.
///
/// This is the model's own way to set the top-level IRP. The `IoSetTopLevelIrp` export exists only for driver
/// code, and the model reports every call to it ([`verifier::Rule::FilterSetTopLevelIrp`]): Shunt and the test
/// filters are filters, which must not call it.
pub fn with_top_level_irp<T>(value: usize, f: impl FnOnce() -> T) -> T {
    let previous = update(|t| std::mem::replace(&mut t.top_level_irp, value));
    let result = f();
    update(|t| t.top_level_irp = previous);
    result
}

/// Reports [`verifier::Rule::CallbackStateMismatch`] when the current thread's IRQL, critical or guarded region
/// depth, or top-level IRP differ from `before` now that the driver callback `api` has returned, then restores
/// the state of `before` so later checks start clean.
///
/// Windows checks the APC-disable counts when a system call or a worker routine returns and bugchecks with
/// `APC_INDEX_MISMATCH` (0x1) when a driver left a critical or guarded region entered, or left one it never
/// entered; Driver Verifier's `CriticalRegions` and `GuardedRegions` rules require the driver to leave every region
/// before it returns. Comparing the IRQL and the top-level IRP too is stricter than those documents: a callback
/// that returns at another IRQL, or with a top-level IRP it set, breaks its caller the same way.
/// See <https://learn.microsoft.com/windows-hardware/drivers/debugger/bug-check-0x1--apc-index-mismatch>.
pub fn check_balanced(api: &'static str, before: &ThreadSnapshot) {
    let now = snapshot();
    let mut wrong = Vec::new();
    if now.irql != before.irql {
        wrong.push(format!("IRQL {} (was {})", irql::name(now.irql), irql::name(before.irql)));
    }
    if now.critical_regions != before.critical_regions {
        wrong.push(format!("critical regions {} (was {})", now.critical_regions, before.critical_regions));
    }
    if now.guarded_regions != before.guarded_regions {
        wrong.push(format!("guarded regions {} (was {})", now.guarded_regions, before.guarded_regions));
    }
    if now.top_level_irp != before.top_level_irp {
        wrong.push(format!("top-level IRP {:#x} (was {:#x})", now.top_level_irp, before.top_level_irp));
    }
    if wrong.is_empty() {
        return;
    }
    verifier::report(
        verifier::Rule::CallbackStateMismatch,
        api,
        format!("the callback returned with {}", wrong.join(", ")),
    );
    update(|t| {
        t.irql = before.irql;
        t.critical_regions = before.critical_regions;
        t.guarded_regions = before.guarded_regions;
        t.top_level_irp = before.top_level_irp;
    });
}

/// Runs `f` with the current thread raised (or lowered) to `level`, restoring the previous IRQL afterwards, as
/// `KeRaiseIrql`/`KeLowerIrql` would around it. For the model and for tests that put a driver in a given context.
pub fn at_irql<T>(level: u8, f: impl FnOnce() -> T) -> T {
    let previous = CURRENT.with(|t| std::mem::replace(&mut t.borrow_mut().irql, level));
    let result = f();
    CURRENT.with(|t| t.borrow_mut().irql = previous);
    result
}

/// The stack size of a simulated kernel thread.
///
/// Windows kernel stacks are 24 KiB on x64 (12 KiB on x86). Unoptimised Rust needs far more stack than the
/// optimised driver, so debug builds get more room; the check that driver code fits a kernel stack is meaningful
/// in release builds.
pub const KERNEL_STACK_SIZE: usize = if cfg!(debug_assertions) { 256 * 1024 } else { 24 * 1024 };

/// Runs `f` on a new system thread (PASSIVE_LEVEL, no regions, no top-level IRP) with a kernel-sized stack and
/// returns its result.
///
/// # Errors
/// The host could not start the thread.
pub fn run_on_system_thread<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    thread::scope(|scope| {
        let handle =
            thread::Builder::new().name(name.to_owned()).stack_size(KERNEL_STACK_SIZE).spawn_scoped(scope, f)?;
        handle.join().map_err(|_| io::Error::other(format!("system thread {name} panicked")))
    })
}

/// The host threads started with [`spawn`] that have not returned yet.
static SPAWNED: std::sync::Mutex<Vec<thread::ThreadId>> = std::sync::Mutex::new(Vec::new());

/// Removes a [`spawn`]ed thread from [`SPAWNED`] when its closure returns or unwinds.
struct SpawnedGuard(thread::ThreadId);

impl Drop for SpawnedGuard {
    fn drop(&mut self) {
        SPAWNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|id| *id != self.0);
    }
}

/// Starts `f` on a new system thread (PASSIVE_LEVEL, no regions, no top-level IRP) with a kernel-sized stack, and
/// returns at once: how a test runs a second program or driver thread concurrently, for example one that
/// acknowledges an oplock break while the test's own thread waits in a create.
///
/// The model counts these threads while they run: a wait that only another thread could end (an oplock break
/// acknowledgement, [`crate::io::oplock`]) is reported instead of hanging when no such thread, and no system
/// worker, is left. A thread started with `std::thread::spawn` is invisible to that rule.
///
/// # Errors
/// The host could not start the thread.
pub fn spawn<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<thread::JoinHandle<T>> {
    let (started, ready) = std::sync::mpsc::channel();
    let handle = thread::Builder::new().name(name.to_owned()).stack_size(KERNEL_STACK_SIZE).spawn(move || {
        let _guard = SpawnedGuard(thread::current().id());
        ready.recv().unwrap_or_default();
        f()
    })?;
    // Counted before this returns, so a wait that starts right after sees the new thread.
    SPAWNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(handle.thread().id());
    started.send(()).unwrap_or_default();
    Ok(handle)
}

/// How many threads started with [`spawn`] are still running, not counting the calling thread.
#[must_use]
pub fn other_spawned_threads() -> usize {
    let me = thread::current().id();
    SPAWNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().filter(|id| **id != me).count()
}

/// Whether the calling thread is one started with [`spawn`] (and still running, which it is while it asks).
#[must_use]
pub(crate) fn is_spawned() -> bool {
    let me = thread::current().id();
    SPAWNED.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&me)
}

/// `KeGetCurrentIrql`: callable at any IRQL. Windows reads it inline (CR8 on x64, the KPCR through x18 on ARM64);
/// on the host the driver calls this export instead.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-kegetcurrentirql>.
#[unsafe(no_mangle)]
pub extern "system" fn KeGetCurrentIrql() -> u8 {
    guarded("KeGetCurrentIrql", irql::HIGH, current_irql)
}

/// Reports [`verifier::Rule::IrqlTooHigh`] when the current IRQL is above `max` for `api`; returns whether the
/// call may proceed.
pub(crate) fn require_irql_at_most(api: &'static str, max: u8, docs: &'static str) -> bool {
    let current = current_irql();
    if current <= max {
        return true;
    }
    verifier::report(
        verifier::Rule::IrqlTooHigh,
        api,
        format!("called at {} but allowed only at or below {} ({docs})", irql::name(current), irql::name(max)),
    );
    false
}
