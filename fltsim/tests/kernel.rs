//! The kernel model: APC state, the top-level IRP, callback balance, system workers, processes and tokens, events
//! and push locks. Each check fires on deliberately wrong code and stays quiet on correct code. The test's own
//! thread plays driver code calling the exports; the checks about the state a callback returns with use the kernel
//! test filter (`common::kernel_filter`). Every scenario runs in its own process.

mod common;

use std::sync::{Arc, Mutex, mpsc};

use common::kernel_filter::{self, Fault};
use fltsim::{
    Rule,
    kernel::{
        irql,
        process::{self, Token},
        sync::signal_by_apc,
        thread, work,
    },
    scenario,
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Foundation::KEVENT,
        Storage::FileSystem::Minifilters::{
            FltAcquirePushLockExclusive, FltAcquirePushLockShared, FltDeletePushLock, FltInitializePushLock,
            FltReleasePushLock,
        },
        System::SystemServices::{
            Executive, IoGetCurrentProcess, IoGetTopLevelIrp, KeAreAllApcsDisabled, KeAreApcsDisabled, KeClearEvent,
            KeEnterCriticalRegion, KeEnterGuardedRegion, KeGetCurrentIrql, KeInitializeEvent, KeLeaveCriticalRegion,
            KeLeaveGuardedRegion, KeSetEvent, KeWaitForSingleObject, PsGetCurrentProcessId, PsGetProcessId,
        },
    },
    Win32::{
        Foundation::{STATUS_INVALID_PARAMETER, STATUS_POSSIBLE_DEADLOCK, STATUS_SUCCESS, STATUS_TIMEOUT},
        System::Kernel::{NotificationEvent, SynchronizationEvent},
    },
};

/// `FSRTL_CACHE_TOP_LEVEL_IRP` (ntifs.h).
const FSRTL_CACHE_TOP_LEVEL_IRP: usize = 2;

/// `(KeAreApcsDisabled, KeAreAllApcsDisabled)` as the driver sees them.
fn apc_queries() -> (bool, bool) {
    // SAFETY: no arguments.
    let normal = unsafe { KeAreApcsDisabled() };
    // SAFETY: no arguments.
    let all = unsafe { KeAreAllApcsDisabled() };
    (normal, all)
}

/// Waits on `event` with `timeout` (None: NULL, forever).
fn wait(event: &KEVENT, timeout: Option<i64>) -> i32 {
    let timeout_ptr = timeout.as_ref().map_or(std::ptr::null(), std::ptr::from_ref);
    // SAFETY: `event` and `timeout` outlive the call.
    unsafe { KeWaitForSingleObject(std::ptr::from_ref(event).cast(), Executive, 0, false, timeout_ptr) }
}

// ---- APC state ----

scenario! {
    fn regions_and_irql_drive_the_apc_queries() {
        assert_eq!(apc_queries(), (false, false));
        // SAFETY: balanced enters and leaves, no arguments.
        unsafe { KeEnterCriticalRegion() };
        assert_eq!(apc_queries(), (true, false), "a critical region disables normal kernel APCs only");
        // SAFETY: as above.
        unsafe { KeEnterGuardedRegion() };
        assert_eq!(apc_queries(), (true, true), "a guarded region disables all kernel APCs");
        // SAFETY: as above.
        unsafe { KeEnterGuardedRegion() };
        // SAFETY: as above.
        unsafe { KeLeaveGuardedRegion() };
        assert_eq!(apc_queries(), (true, true), "guarded regions nest");
        // SAFETY: as above.
        unsafe { KeLeaveGuardedRegion() };
        // SAFETY: as above.
        unsafe { KeLeaveCriticalRegion() };
        assert_eq!(apc_queries(), (false, false));
        assert_eq!(thread::at_irql(irql::APC, apc_queries), (false, true), "APC_LEVEL disables all APCs");
        assert_eq!(thread::in_critical_region(apc_queries), (true, false));
        assert_eq!(thread::in_guarded_region(apc_queries), (true, true));
        let state = thread::snapshot();
        assert_eq!((state.critical_regions, state.guarded_regions), (0, 0), "the helpers restore the state");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn leaving_a_region_never_entered_is_reported() {
        // SAFETY: deliberately unbalanced; the model reports it.
        unsafe { KeLeaveCriticalRegion() };
        // SAFETY: as above.
        unsafe { KeLeaveGuardedRegion() };
        let reports = take_reports();
        let got: Vec<_> = reports.iter().map(|r| (r.rule, r.api)).collect();
        assert_eq!(
            got,
            [
                (Rule::RegionLeaveWithoutEnter, "KeLeaveCriticalRegion"),
                (Rule::RegionLeaveWithoutEnter, "KeLeaveGuardedRegion")
            ]
        );
        let state = thread::snapshot();
        assert_eq!((state.critical_regions, state.guarded_regions), (0, 0), "no count went negative");
    }
}

scenario! {
    fn entering_a_guarded_region_at_dispatch_level_is_reported() {
        thread::at_irql(irql::DISPATCH, || {
            // SAFETY: no arguments; the model checks the IRQL.
            unsafe { KeEnterGuardedRegion() };
        });
        let reports = take_reports();
        assert_eq!(reports.len(), 1);
        assert_eq!((reports[0].rule, reports[0].api), (Rule::IrqlTooHigh, "KeEnterGuardedRegion"));
        assert_eq!(thread::snapshot().guarded_regions, 0, "the region was not entered");
        thread::at_irql(irql::APC, || {
            // SAFETY: balanced, at the highest allowed IRQL.
            unsafe { KeEnterGuardedRegion() };
            // SAFETY: as above.
            unsafe { KeLeaveGuardedRegion() };
        });
        assert_eq!(take_rules(), [], "APC_LEVEL is allowed");
    }
}

// ---- Callback balance (the loader checks DriverEntry and unload) ----

fn cycle(fault: Fault) -> Vec<fltsim::Report> {
    let mut driver = kernel_filter::load(fault).expect("the kernel test filter loads");
    driver.unload(false).expect("the kernel test filter unloads");
    take_reports()
}

scenario! {
    fn a_correct_kernel_filter_breaks_no_rule() {
        let reports = cycle(Fault::None);
        assert!(reports.is_empty(), "{reports:#?}");
    }
}

scenario! {
    fn driver_entry_returning_in_a_critical_region_is_reported() {
        let reports = cycle(Fault::EntryReturnsInCriticalRegion);
        assert_eq!(reports.len(), 1, "{reports:#?}");
        assert_eq!((reports[0].rule, reports[0].api), (Rule::CallbackStateMismatch, "DriverEntry"));
        assert!(reports[0].detail.contains("critical regions 1 (was 0)"), "{}", reports[0].detail);
    }
}

scenario! {
    fn an_unload_callback_returning_in_a_guarded_region_is_reported() {
        let reports = cycle(Fault::UnloadReturnsInGuardedRegion);
        assert_eq!(reports.len(), 1, "{reports:#?}");
        assert_eq!((reports[0].rule, reports[0].api), (Rule::CallbackStateMismatch, "FilterUnloadCallback"));
        assert!(reports[0].detail.contains("guarded regions 1 (was 0)"), "{}", reports[0].detail);
    }
}

scenario! {
    fn a_push_lock_held_when_unload_returns_is_reported_as_a_critical_region() {
        let reports = cycle(Fault::UnloadHoldsPushLock);
        assert_eq!(reports.len(), 1, "{reports:#?}");
        assert_eq!(reports[0].rule, Rule::CallbackStateMismatch);
        assert!(reports[0].detail.contains("critical regions 1 (was 0)"), "{}", reports[0].detail);
    }
}

// ---- Top-level IRP ----

scenario! {
    fn io_set_top_level_irp_from_a_filter_is_reported() {
        let reports = cycle(Fault::SetsTopLevelIrp);
        let got: Vec<_> = reports.iter().map(|r| (r.rule, r.api)).collect();
        assert_eq!(
            got,
            [(Rule::FilterSetTopLevelIrp, "IoSetTopLevelIrp"), (Rule::CallbackStateMismatch, "DriverEntry")],
            "the call is reported, and so is DriverEntry returning with the top-level IRP changed"
        );
    }
}

scenario! {
    fn the_model_sets_the_top_level_irp_without_a_report() {
        // SAFETY: no arguments.
        assert!(unsafe { IoGetTopLevelIrp() }.is_null());
        let seen = thread::with_top_level_irp(FSRTL_CACHE_TOP_LEVEL_IRP, || {
            // SAFETY: no arguments.
            unsafe { IoGetTopLevelIrp() }.addr()
        });
        assert_eq!(seen, FSRTL_CACHE_TOP_LEVEL_IRP);
        // SAFETY: no arguments.
        assert!(unsafe { IoGetTopLevelIrp() }.is_null(), "restored");
        assert_eq!(take_rules(), []);
    }
}

// ---- System workers ----

scenario! {
    fn work_items_run_on_system_worker_threads_at_passive_level() {
        let user = process::create(r"\Device\HarddiskVolume3\Windows\notepad.exe", Token {
            user: "S-1-5-21-1-2-3-1001".to_owned(),
            admin: false,
        });
        let seen = Arc::new(Mutex::new(None));
        let record = Arc::clone(&seen);
        // Queued from a user process's thread at APC_LEVEL, the item still runs at PASSIVE_LEVEL in System.
        let item = process::run_as(&user, || {
            thread::at_irql(irql::APC, || {
                work::queue(move || {
                    // SAFETY: no arguments.
                    let level = unsafe { KeGetCurrentIrql() };
                    // SAFETY: no arguments.
                    let pid = unsafe { PsGetCurrentProcessId() }.addr();
                    let name = std::thread::current().name().map(ToOwned::to_owned);
                    *record.lock().unwrap() = Some((level, pid, name));
                })
            })
        });
        assert_eq!(work::wait_for(&item), Ok(()));
        assert!(item.is_done());
        let (level, pid, name) = seen.lock().unwrap().clone().expect("the item ran");
        assert_eq!(level, irql::PASSIVE);
        assert_eq!(pid, process::SYSTEM_PID);
        assert!(name.is_some_and(|n| n.starts_with("System: worker")));
        let items: Vec<_> = (0..16).map(|_| work::queue(|| {})).collect();
        work::drain();
        assert!(items.iter().all(work::WorkItem::is_done));
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn waiting_for_a_worker_from_an_unsafe_context_is_reported_without_blocking() {
        let (release, gate) = mpsc::channel::<()>();
        // The item cannot finish until the test releases it, so a wait that blocked would hang the test.
        let item = work::queue(move || {
            let _ = gate.recv();
        });
        assert!(thread::at_irql(irql::APC, || work::wait_for(&item)).is_err());
        assert!(thread::in_guarded_region(|| work::wait_for(&item)).is_err());
        assert!(thread::with_top_level_irp(FSRTL_CACHE_TOP_LEVEL_IRP, || work::wait_for(&item)).is_err());
        let reports = take_reports();
        assert_eq!(reports.len(), 3, "{reports:#?}");
        assert!(reports.iter().all(|r| r.rule == Rule::WaitForWorkerInUnsafeContext));
        assert!(reports[0].detail.contains("APC_LEVEL"), "{}", reports[0].detail);
        assert!(reports[1].detail.contains("guarded region"), "{}", reports[1].detail);
        assert!(reports[2].detail.contains("top-level IRP 0x2"), "{}", reports[2].detail);
        // A critical region alone is not the hazard: normal kernel APCs off, special ones and the worker unaffected.
        release.send(()).unwrap();
        assert_eq!(thread::in_critical_region(|| work::wait_for(&item)), Ok(()));
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_work_routine_returning_in_a_critical_region_is_reported() {
        let item = work::queue(|| {
            // SAFETY: deliberately unbalanced; the model checks the worker routine's return.
            unsafe { KeEnterCriticalRegion() };
        });
        work::drain();
        assert!(item.is_done());
        let reports = take_reports();
        assert_eq!(reports.len(), 1, "{reports:#?}");
        assert_eq!((reports[0].rule, reports[0].api), (Rule::CallbackStateMismatch, "system worker routine"));
        // The worker thread was put back in order: the next item starts clean.
        let clean = work::queue(|| assert_eq!(apc_queries(), (false, false)));
        work::drain();
        assert!(clean.is_done());
        assert_eq!(take_rules(), []);
    }
}

// ---- Processes and tokens ----

scenario! {
    fn processes_tokens_and_impersonation() {
        // SAFETY: no arguments.
        assert_eq!(unsafe { PsGetCurrentProcessId() }.addr(), process::SYSTEM_PID, "test threads start in System");
        // SAFETY: no arguments.
        let system = unsafe { IoGetCurrentProcess() };
        assert_eq!(process::from_peprocess(system).map(|p| p.id), Some(process::SYSTEM_PID));
        let user_token = Token { user: "S-1-5-21-1-2-3-1001".to_owned(), admin: false };
        let user = process::create(
            r"\Device\HarddiskVolume3\Program Files\Contoso\ContosoSyncService.exe",
            user_token.clone(),
        );
        assert_eq!(user.image_file_name(), "ContosoSyncServ", "15 characters, as EPROCESS.ImageFileName");
        assert_ne!(user.id, process::SYSTEM_PID);
        assert_eq!(user.id % 4, 0);
        process::run_as(&user, || {
            // SAFETY: no arguments.
            assert_eq!(unsafe { PsGetCurrentProcessId() }.addr(), user.id);
            // SAFETY: no arguments.
            let current = unsafe { IoGetCurrentProcess() };
            // SAFETY: a PEPROCESS the model handed out.
            assert_eq!(unsafe { PsGetProcessId(current) }.addr(), user.id);
            assert_eq!(process::effective_token(), user_token);
            process::impersonate(Token::system(), || {
                assert_eq!(process::effective_token(), Token::system());
                assert_eq!(process::current().id, user.id, "impersonation does not change the process");
            });
            assert_eq!(process::effective_token(), user_token, "reverted");
        });
        assert_eq!(process::effective_token(), Token::system());
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn the_id_of_something_that_is_not_a_process_is_reported() {
        // SAFETY: a bogus value; the model checks it.
        let id = unsafe { PsGetProcessId(0x1234) };
        assert!(id.is_null());
        assert_eq!(take_rules(), [Rule::InvalidKernelObject]);
    }
}

// ---- Events ----

scenario! {
    fn events_signal_waiters_across_threads_and_honour_timeouts() {
        let event = Box::new(KEVENT::default());
        let address = std::ptr::from_ref(&*event).addr();
        // SAFETY: `event` is live storage for the whole test.
        unsafe { KeInitializeEvent(std::ptr::from_ref(&*event).cast_mut(), NotificationEvent, false) };
        assert_eq!(wait(&event, Some(0)), STATUS_TIMEOUT, "not signaled yet");
        assert_eq!(wait(&event, Some(-10_000)), STATUS_TIMEOUT, "a 1 ms relative timeout expires");
        let _item = work::queue(move || {
            // SAFETY: the event outlives the wait below, which this call ends.
            unsafe { KeSetEvent(std::ptr::without_provenance_mut(address), 0, false) };
        });
        assert_eq!(wait(&event, None), STATUS_SUCCESS, "a worker's KeSetEvent ends an infinite wait");
        assert_eq!(wait(&event, Some(0)), STATUS_SUCCESS, "a notification event stays signaled");
        // SAFETY: as above.
        unsafe { KeClearEvent(std::ptr::from_ref(&*event).cast_mut()) };
        assert_eq!(wait(&event, Some(0)), STATUS_TIMEOUT, "cleared");
        work::drain();

        let sync = KEVENT::default();
        // SAFETY: `sync` lives on this stack until the end of the test.
        unsafe { KeInitializeEvent(std::ptr::from_ref(&sync).cast_mut(), SynchronizationEvent, true) };
        assert_eq!(thread::at_irql(irql::DISPATCH, || wait(&sync, Some(0))), STATUS_SUCCESS, "a zero wait at DISPATCH_LEVEL");
        assert_eq!(wait(&sync, Some(0)), STATUS_TIMEOUT, "a synchronization event resets when a wait is satisfied");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_wait_with_a_timeout_at_dispatch_level_is_reported() {
        let event = KEVENT::default();
        // SAFETY: `event` lives on this stack until the end of the test.
        unsafe { KeInitializeEvent(std::ptr::from_ref(&event).cast_mut(), NotificationEvent, false) };
        let status = thread::at_irql(irql::DISPATCH, || wait(&event, Some(-10_000)));
        assert_eq!(status, STATUS_TIMEOUT, "the model only tests the state");
        let reports = take_reports();
        assert_eq!(reports.len(), 1);
        assert_eq!((reports[0].rule, reports[0].api), (Rule::IrqlTooHigh, "KeWaitForSingleObject"));
    }
}

scenario! {
    fn a_wait_that_needs_an_apc_the_thread_cannot_receive_is_reported() {
        let event = KEVENT::default();
        let ptr = std::ptr::from_ref(&event);
        // SAFETY: `event` lives on this stack until the end of the test.
        unsafe { KeInitializeEvent(ptr.cast_mut(), NotificationEvent, false) };
        // As synchronous I/O completes: a special kernel APC to this thread will set the event.
        signal_by_apc(ptr);
        assert_eq!(thread::in_guarded_region(|| wait(&event, None)), STATUS_POSSIBLE_DEADLOCK);
        assert_eq!(thread::at_irql(irql::APC, || wait(&event, None)), STATUS_POSSIBLE_DEADLOCK);
        let reports = take_reports();
        assert_eq!(reports.len(), 2, "{reports:#?}");
        assert!(reports.iter().all(|r| r.rule == Rule::WaitNeedsDisabledApc));
        // In a critical region special kernel APCs still run: the APC sets the event and the wait ends.
        assert_eq!(thread::in_critical_region(|| wait(&event, None)), STATUS_SUCCESS);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn waiting_on_an_event_never_initialized_is_reported() {
        let event = KEVENT::default();
        assert_eq!(wait(&event, Some(0)), STATUS_INVALID_PARAMETER);
        assert_eq!(take_rules(), [Rule::InvalidKernelObject]);
    }
}

// ---- Push locks ----

scenario! {
    fn push_locks_hold_a_critical_region_and_share() {
        static LOCK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let lock = LOCK.as_ptr();
        // SAFETY: static storage; every acquisition below is released.
        unsafe { FltInitializePushLock(lock) };
        // SAFETY: as above.
        unsafe { FltAcquirePushLockExclusive(lock) };
        assert_eq!(thread::snapshot().critical_regions, 1);
        assert_eq!(apc_queries(), (true, false));
        // SAFETY: as above.
        unsafe { FltReleasePushLock(lock) };
        assert_eq!(thread::snapshot().critical_regions, 0);
        // SAFETY: as above.
        unsafe { FltAcquirePushLockShared(lock) };
        // Another thread shares the lock while this one holds it shared (it would block if the model got it wrong).
        let address = lock.addr();
        let other = work::queue(move || {
            let lock: *mut usize = std::ptr::without_provenance_mut(address);
            // SAFETY: the static lock, acquired and released.
            unsafe { FltAcquirePushLockShared(lock) };
            // SAFETY: as above.
            unsafe { FltReleasePushLock(lock) };
        });
        assert_eq!(work::wait_for(&other), Ok(()), "a wait in a critical region is safe");
        // SAFETY: as above.
        unsafe { FltReleasePushLock(lock) };
        // SAFETY: not held.
        unsafe { FltDeletePushLock(lock) };
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn push_lock_misuse_is_reported() {
        static LOCK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let lock = LOCK.as_ptr();
        // SAFETY: static storage; the misuse below is what the model checks.
        unsafe { FltAcquirePushLockExclusive(lock) };
        assert_eq!(take_rules(), [Rule::InvalidKernelObject], "not initialized");
        // SAFETY: as above.
        unsafe { FltInitializePushLock(lock) };
        // SAFETY: as above.
        unsafe { FltReleasePushLock(lock) };
        assert_eq!(take_rules(), [Rule::PushLockMisuse], "released without being held");
        // SAFETY: as above.
        unsafe { FltAcquirePushLockExclusive(lock) };
        // SAFETY: as above.
        unsafe { FltAcquirePushLockShared(lock) };
        assert_eq!(take_rules(), [Rule::PushLockMisuse], "acquired recursively (the thread would hang)");
        assert_eq!(thread::snapshot().critical_regions, 1, "the recursive attempt entered no region");
        // SAFETY: as above.
        unsafe { FltDeletePushLock(lock) };
        assert_eq!(take_rules(), [Rule::PushLockMisuse], "deleted while held");
        thread::at_irql(irql::DISPATCH, || {
            // SAFETY: as above.
            unsafe { FltInitializePushLock(lock) };
        });
        assert_eq!(take_rules(), [Rule::IrqlTooHigh]);
    }
}
