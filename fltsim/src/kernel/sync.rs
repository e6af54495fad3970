//! Events and push locks: `KeInitializeEvent`, `KeSetEvent`, `KeClearEvent`, `KeWaitForSingleObject`, and Filter
//! Manager's push lock routines, which enter a critical region for as long as the lock is held.
//!
//! The model keeps each object's state beside the driver's storage, keyed by its address, and blocks real host
//! threads on it, so a driver thread can wait for an event a system worker sets. Waits that could never finish are
//! detected from the thread's state, not by a timeout: a wait for an event that only a special kernel APC to the
//! waiting thread would set ([`signal_by_apc`]), while that thread has all APCs disabled, is reported and returns.

use std::{
    collections::HashMap,
    sync::{Condvar, Mutex, MutexGuard, PoisonError},
    thread::ThreadId,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use windows_sys::{
    Wdk::{Foundation::KEVENT, System::SystemServices::KWAIT_REASON},
    Win32::{
        Foundation::{NTSTATUS, STATUS_INVALID_PARAMETER, STATUS_POSSIBLE_DEADLOCK, STATUS_SUCCESS, STATUS_TIMEOUT},
        System::Kernel::{EVENT_TYPE, NotificationEvent, SynchronizationEvent},
    },
};

use super::{irql, thread};
use crate::{
    guard::guarded,
    verifier::{self, Rule},
};

const KEINITIALIZEEVENT: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keinitializeevent";
const KESETEVENT: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-kesetevent";
const KECLEAREVENT: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keclearevent";
const KEWAITFORSINGLEOBJECT: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-kewaitforsingleobject";
const FLTINITIALIZEPUSHLOCK: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltinitializepushlock";
const FLTACQUIREPUSHLOCKEXCLUSIVE: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltacquirepushlockexclusive";
const FLTACQUIREPUSHLOCKSHARED: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltacquirepushlockshared";
const FLTRELEASEPUSHLOCK: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltreleasepushlock";
const FLTDELETEPUSHLOCK: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltdeletepushlock";

/// 100-nanosecond intervals between 1601-01-01 (the kernel's epoch) and 1970-01-01.
const EPOCH_1601_TO_1970: u64 = 116_444_736_000_000_000;

#[derive(Debug)]
struct Event {
    synchronization: bool,
    signaled: bool,
    /// The thread a queued special kernel APC will signal this event in (see [`signal_by_apc`]).
    apc_target: Option<ThreadId>,
}

#[derive(Debug, Default)]
struct PushLock {
    exclusive: Option<ThreadId>,
    shared: Vec<ThreadId>,
}

#[derive(Default)]
struct Objects {
    events: HashMap<usize, Event>,
    push_locks: HashMap<usize, PushLock>,
}

static OBJECTS: Mutex<Option<Objects>> = Mutex::new(None);
/// Signalled whenever an event is set or a push lock released.
static CHANGED: Condvar = Condvar::new();

fn objects() -> MutexGuard<'static, Option<Objects>> {
    OBJECTS.lock().unwrap_or_else(PoisonError::into_inner)
}

fn with_objects<T>(f: impl FnOnce(&mut Objects) -> T) -> T {
    f(objects().get_or_insert_with(Objects::default))
}

fn not_initialized(api: &'static str, what: &str, address: usize) {
    verifier::report(
        Rule::InvalidKernelObject,
        api,
        format!("{address:#x} is not an initialized {what} (initialize it first; it may have been deleted)"),
    );
}

/// Queues, for the current thread, a special kernel APC that will signal `event` when the thread can receive it,
/// as the I/O manager completes synchronous I/O: the completion is copied back and the event set by a special
/// kernel APC run in the thread that issued the request.
///
/// The APC is delivered when that thread waits on the event at PASSIVE_LEVEL outside a guarded region. If it waits
/// with all APCs disabled, the wait can never finish: [`KeWaitForSingleObject`] reports
/// [`Rule::WaitNeedsDisabledApc`]. For the model's I/O paths and for tests.
pub fn signal_by_apc(event: *const KEVENT) {
    let target = std::thread::current().id();
    with_objects(|o| {
        if let Some(e) = o.events.get_mut(&event.addr()) {
            e.apc_target = Some(target);
        }
    });
}

/// `KeInitializeEvent`: any IRQL; makes the storage at `event` a notification or synchronization event in the
/// given state. Another type, or a NULL pointer, is reported ([`Rule::InvalidKernelObject`]).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keinitializeevent>.
#[unsafe(no_mangle)]
pub extern "system" fn KeInitializeEvent(event: *mut KEVENT, r#type: EVENT_TYPE, state: bool) {
    const API: &str = "KeInitializeEvent";
    guarded(API, (), || {
        if event.is_null() || (r#type != NotificationEvent && r#type != SynchronizationEvent) {
            verifier::report(
                Rule::InvalidKernelObject,
                API,
                format!("Event {:#x} with Type {type} ({KEINITIALIZEEVENT})", event.addr(), type = r#type),
            );
            return;
        }
        let fresh = Event { synchronization: r#type == SynchronizationEvent, signaled: state, apc_target: None };
        with_objects(|o| o.events.insert(event.addr(), fresh));
    });
}

/// `KeSetEvent`: IRQL ≤ DISPATCH_LEVEL, or ≤ APC_LEVEL when `Wait` is TRUE; signals the event and returns its
/// previous state (non-zero when it was signaled). The priority increment is ignored.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-kesetevent>.
#[unsafe(no_mangle)]
pub extern "system" fn KeSetEvent(event: *mut KEVENT, _increment: i32, wait: bool) -> i32 {
    const API: &str = "KeSetEvent";
    guarded(API, 0, || {
        let max = if wait { irql::APC } else { irql::DISPATCH };
        if !thread::require_irql_at_most(API, max, KESETEVENT) {
            return 0;
        }
        let previous = with_objects(|o| {
            o.events.get_mut(&event.addr()).map(|e| {
                let previous = e.signaled;
                e.signaled = true;
                e.apc_target = None;
                previous
            })
        });
        CHANGED.notify_all();
        if let Some(previous) = previous {
            return i32::from(previous);
        }
        not_initialized(API, "event", event.addr());
        0
    })
}

/// `KeClearEvent`: IRQL ≤ DISPATCH_LEVEL; sets the event to not signaled.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keclearevent>.
#[unsafe(no_mangle)]
pub extern "system" fn KeClearEvent(event: *mut KEVENT) {
    const API: &str = "KeClearEvent";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::DISPATCH, KECLEAREVENT) {
            return;
        }
        let found = with_objects(|o| o.events.get_mut(&event.addr()).map(|e| e.signaled = false).is_some());
        if !found {
            not_initialized(API, "event", event.addr());
        }
    });
}

/// How long a wait may last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timeout {
    /// NULL: wait until signaled.
    Infinite,
    /// `*Timeout == 0`: test the state and return.
    Zero,
    /// Until this instant.
    Until(SystemTime),
}

fn timeout(raw: Option<i64>) -> Timeout {
    match raw {
        None => Timeout::Infinite,
        Some(0) => Timeout::Zero,
        // Negative: an interval relative to now, in 100 ns units.
        Some(relative) if relative < 0 => {
            Timeout::Until(SystemTime::now() + Duration::from_nanos(relative.unsigned_abs().saturating_mul(100)))
        }
        // Positive: an absolute system time, in 100 ns units since 1601.
        Some(absolute) => {
            let since_1970 = absolute.unsigned_abs().saturating_sub(EPOCH_1601_TO_1970);
            Timeout::Until(UNIX_EPOCH + Duration::from_nanos(since_1970.saturating_mul(100)))
        }
    }
}

/// `KeWaitForSingleObject`, for event objects (the only dispatcher objects the model has).
///
/// Rules (docs page below): IRQL ≤ DISPATCH_LEVEL with a zero timeout; with a NULL or non-zero timeout, IRQL ≤
/// APC_LEVEL (reported as [`Rule::IrqlTooHigh`]; the model then only tests the state, without waiting). An object
/// that is not an initialized event is reported ([`Rule::InvalidKernelObject`]) and answers
/// `STATUS_INVALID_PARAMETER`. A wait for an event that only a special kernel APC to this thread will set
/// ([`signal_by_apc`]) is delivered that APC at PASSIVE_LEVEL outside a guarded region; with all APCs disabled
/// (APC_LEVEL, or a guarded region) it would never finish on Windows: the model reports
/// [`Rule::WaitNeedsDisabledApc`] and answers `STATUS_POSSIBLE_DEADLOCK` (a failure status, unlike `STATUS_TIMEOUT`, so
/// the driver cannot mistake it for success). A satisfied wait on a synchronization event resets it. Wait reason,
/// mode and alertability are accepted as given; the model raises no alerts or user APCs.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-kewaitforsingleobject>.
#[unsafe(no_mangle)]
#[expect(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "the export's signature is the DDI's, as windows-sys declares it; the driver is bound by the DDI's contract that a non-NULL Timeout points to a LARGE_INTEGER"
)]
pub extern "system" fn KeWaitForSingleObject(
    object: *const core::ffi::c_void,
    _wait_reason: KWAIT_REASON,
    _wait_mode: i8,
    _alertable: bool,
    timeout_ptr: *const i64,
) -> NTSTATUS {
    const API: &str = "KeWaitForSingleObject";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let raw = if timeout_ptr.is_null() {
            None
        } else {
            // SAFETY: a non-NULL Timeout points to the caller's LARGE_INTEGER for the duration of the call.
            Some(unsafe { timeout_ptr.read_unaligned() })
        };
        let mut limit = timeout(raw);
        let max = if limit == Timeout::Zero { irql::DISPATCH } else { irql::APC };
        if !thread::require_irql_at_most(API, max, KEWAITFORSINGLEOBJECT) {
            limit = Timeout::Zero;
        }
        let me = std::thread::current().id();
        let state = thread::snapshot();
        let address = object.addr();
        let mut guard = objects();
        loop {
            let o = guard.get_or_insert_with(Objects::default);
            let Some(event) = o.events.get_mut(&address) else {
                drop(guard);
                not_initialized(API, "event (the model's only dispatcher object)", address);
                return STATUS_INVALID_PARAMETER;
            };
            if !event.signaled && event.apc_target == Some(me) {
                if state.all_apcs_disabled() {
                    drop(guard);
                    verifier::report(
                        Rule::WaitNeedsDisabledApc,
                        API,
                        format!(
                            "event {address:#x} is set only by a special kernel APC to this thread, which cannot run \
                             while all APCs are disabled: the wait would never end"
                        ),
                    );
                    return STATUS_POSSIBLE_DEADLOCK;
                }
                // The APC runs now, in this thread, and sets the event.
                event.signaled = true;
                event.apc_target = None;
            }
            if event.signaled {
                if event.synchronization {
                    event.signaled = false;
                }
                return STATUS_SUCCESS;
            }
            guard = match limit {
                Timeout::Zero => return STATUS_TIMEOUT,
                Timeout::Infinite => CHANGED.wait(guard).unwrap_or_else(PoisonError::into_inner),
                Timeout::Until(deadline) => {
                    let Ok(left) = deadline.duration_since(SystemTime::now()) else {
                        return STATUS_TIMEOUT;
                    };
                    CHANGED.wait_timeout(guard, left).unwrap_or_else(PoisonError::into_inner).0
                }
            };
        }
    })
}

/// `FltInitializePushLock`: IRQL ≤ APC_LEVEL; makes the storage at `push_lock` an unowned push lock.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltinitializepushlock>.
#[unsafe(no_mangle)]
pub extern "system" fn FltInitializePushLock(push_lock: *mut usize) {
    const API: &str = "FltInitializePushLock";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, FLTINITIALIZEPUSHLOCK) {
            return;
        }
        if push_lock.is_null() {
            not_initialized(API, "push lock", 0);
            return;
        }
        with_objects(|o| o.push_locks.insert(push_lock.addr(), PushLock::default()));
    });
}

fn acquire(api: &'static str, docs: &'static str, push_lock: *mut usize, exclusive: bool) {
    if !thread::require_irql_at_most(api, irql::APC, docs) {
        return;
    }
    let me = std::thread::current().id();
    let address = push_lock.addr();
    let mut guard = objects();
    let held = {
        let o = guard.get_or_insert_with(Objects::default);
        o.push_locks.get(&address).map(|l| l.exclusive == Some(me) || l.shared.contains(&me))
    };
    match held {
        None => {
            drop(guard);
            not_initialized(api, "push lock", address);
            return;
        }
        Some(true) => {
            drop(guard);
            verifier::report(
                Rule::PushLockMisuse,
                api,
                format!(
                    "push lock {address:#x} is already held by this thread; push locks are not recursive and the thread would hang"
                ),
            );
            return;
        }
        Some(false) => {}
    }
    // The routine disables normal kernel APCs before it acquires, so the thread holds the lock in a critical region.
    thread::update(|t| t.critical_regions += 1);
    loop {
        let o = guard.get_or_insert_with(Objects::default);
        let Some(lock) = o.push_locks.get_mut(&address) else {
            // Deleted while this thread waited: a use after delete, reported by whoever deleted it while held.
            drop(guard);
            thread::update(|t| t.critical_regions = t.critical_regions.saturating_sub(1));
            not_initialized(api, "push lock", address);
            return;
        };
        let free = lock.exclusive.is_none() && (!exclusive || lock.shared.is_empty());
        if free {
            if exclusive {
                lock.exclusive = Some(me);
            } else {
                lock.shared.push(me);
            }
            return;
        }
        guard = CHANGED.wait(guard).unwrap_or_else(PoisonError::into_inner);
    }
}

/// `FltAcquirePushLockExclusive`: IRQL ≤ APC_LEVEL; enters a critical region and acquires the push lock for
/// exclusive access, blocking while another thread holds it. Acquiring a push lock this thread already holds would
/// hang the thread ("push locks cannot be acquired recursively"): the model reports [`Rule::PushLockMisuse`] and
/// returns without acquiring it.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltacquirepushlockexclusive>.
#[unsafe(no_mangle)]
pub extern "system" fn FltAcquirePushLockExclusive(push_lock: *mut usize) {
    const API: &str = "FltAcquirePushLockExclusive";
    guarded(API, (), || acquire(API, FLTACQUIREPUSHLOCKEXCLUSIVE, push_lock, true));
}

/// `FltAcquirePushLockShared`: IRQL ≤ APC_LEVEL; as [`FltAcquirePushLockExclusive`], for shared access.
/// Recursive shared acquisition is reported too: it can hang behind a waiting exclusive acquirer.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltacquirepushlockshared>.
#[unsafe(no_mangle)]
pub extern "system" fn FltAcquirePushLockShared(push_lock: *mut usize) {
    const API: &str = "FltAcquirePushLockShared";
    guarded(API, (), || acquire(API, FLTACQUIREPUSHLOCKSHARED, push_lock, false));
}

/// `FltReleasePushLock`: IRQL ≤ APC_LEVEL; releases a push lock the current thread holds and leaves the critical
/// region its acquisition entered. A release by a thread that does not hold it is reported
/// ([`Rule::PushLockMisuse`]) and changes nothing.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltreleasepushlock>.
#[unsafe(no_mangle)]
pub extern "system" fn FltReleasePushLock(push_lock: *mut usize) {
    const API: &str = "FltReleasePushLock";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, FLTRELEASEPUSHLOCK) {
            return;
        }
        let me = std::thread::current().id();
        let address = push_lock.addr();
        let released = with_objects(|o| {
            o.push_locks.get_mut(&address).map(|lock| {
                if lock.exclusive == Some(me) {
                    lock.exclusive = None;
                    true
                } else if let Some(at) = lock.shared.iter().position(|&t| t == me) {
                    lock.shared.swap_remove(at);
                    true
                } else {
                    false
                }
            })
        });
        match released {
            None => not_initialized(API, "push lock", address),
            Some(false) => verifier::report(
                Rule::PushLockMisuse,
                API,
                format!("push lock {address:#x} is not held by this thread"),
            ),
            Some(true) => {
                CHANGED.notify_all();
                thread::update(|t| t.critical_regions = t.critical_regions.saturating_sub(1));
            }
        }
    });
}

/// `FltDeletePushLock`: IRQL ≤ APC_LEVEL; deletes the push lock, after which its storage may be freed. Deleting
/// a push lock that some thread still holds is reported ([`Rule::PushLockMisuse`]; stricter than documented: the
/// page does not say, but the holder would later release freed memory) and the lock is deleted anyway.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltdeletepushlock>.
#[unsafe(no_mangle)]
pub extern "system" fn FltDeletePushLock(push_lock: *const usize) {
    const API: &str = "FltDeletePushLock";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, FLTDELETEPUSHLOCK) {
            return;
        }
        let address = push_lock.addr();
        match with_objects(|o| o.push_locks.remove(&address)) {
            None => not_initialized(API, "push lock", address),
            Some(lock) if lock.exclusive.is_some() || !lock.shared.is_empty() => {
                CHANGED.notify_all();
                verifier::report(Rule::PushLockMisuse, API, format!("push lock {address:#x} is deleted while held"));
            }
            Some(_) => {}
        }
    });
}
