//! Byte-range lock requests that wait (`FailImmediately` FALSE, `LockFileEx` without `LOCKFILE_FAIL_IMMEDIATELY`):
//! the file system's, granted when the conflicting lock is unlocked or its handle closed, cancelled when the waiting
//! handle is closed, granted in arrival order; a filter's own (`FltProcessFileLock` pends the request and completes
//! it later); and the rule that finds a wait nothing can end.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr, locks},
    kernel::thread,
    scenario,
    testfilters::locker,
    verifier::{take_reports, take_rules},
};
use windows_sys::Win32::{
    Foundation::{STATUS_CANCELLED, STATUS_FILE_LOCK_CONFLICT, STATUS_LOCK_NOT_GRANTED, STATUS_SUCCESS},
    Storage::FileSystem::{FILE_READ_DATA, FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_WRITE_DATA},
};

fn setup() {
    let root = io::fresh_root("lock_wait");
    std::fs::write(root.join("data.bin"), b"0123456789abcdef").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
}

fn open() -> iomgr::Handle {
    let params = iomgr::OpenParams {
        desired_access: FILE_READ_DATA | FILE_WRITE_DATA,
        share_access: FILE_SHARE_READ | FILE_SHARE_WRITE,
        ..Default::default()
    };
    iomgr::create(r"C:\data.bin", &params).expect("open")
}

/// Blocks until `n` threads wait for a lock. A safety net, not the rule under test: a request that never starts
/// waiting panics the polling thread after ten seconds, and the rule then ends the other's wait.
fn until_waiting(n: usize) {
    let start = Instant::now();
    while locks::waiting_threads() < n {
        assert!(start.elapsed() < Duration::from_secs(10), "{n} lock requests never started waiting");
        std::thread::sleep(Duration::from_millis(1));
    }
}

scenario! {
    /// A request that conflicts waits until the holder unlocks from another thread, is then granted, and holds the
    /// range against the former holder; nothing is reported (the quiet half of `lock-wait-deadlock`).
    fn a_waiting_lock_is_granted_when_another_thread_unlocks() {
        setup();
        let a = open();
        let b = open();
        iomgr::lock(&a, 0, 4, 0, true).expect("exclusive lock");
        let unlocker = thread::spawn("unlocker", move || {
            until_waiting(1);
            assert_eq!(iomgr::waiting_locks(&a), Ok(1), "b's request waits in the file system");
            iomgr::unlock(&a, 0, 4, 0).expect("unlock");
            a
        })
        .expect("spawn");
        assert_eq!(iomgr::lock_wait(&b, 2, 2, 0, true), Ok(()), "granted after the unlock");
        let a = unlocker.join().expect("unlocker");
        assert_eq!(iomgr::waiting_locks(&a), Ok(0));
        assert_eq!(iomgr::read(&a, Some(2), 1), Err(STATUS_FILE_LOCK_CONFLICT), "b holds the range now");
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// Closing the holder's handle releases its locks at cleanup, which grants the waiting request.
    fn a_waiting_lock_is_granted_when_the_holders_handle_closes() {
        setup();
        let a = open();
        let b = open();
        iomgr::lock(&a, 0, 8, 0, false).expect("shared lock");
        let closer = thread::spawn("closer", move || {
            until_waiting(1);
            iomgr::close(a);
        })
        .expect("spawn");
        assert_eq!(iomgr::lock_wait(&b, 4, 8, 0, true), Ok(()), "an exclusive lock waits for the shared one");
        closer.join().expect("closer");
        assert_eq!(iomgr::lock(&b, 0, 4, 0, true), Ok(()), "a's shared lock went with its handle");
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// A request with FailImmediately is still refused at once, without waiting and without a report, even with no
    /// other thread left.
    fn a_lock_that_fails_immediately_is_still_refused_at_once() {
        setup();
        let a = open();
        let b = open();
        iomgr::lock(&a, 0, 4, 0, true).expect("exclusive lock");
        assert_eq!(iomgr::lock(&b, 3, 1, 0, false), Err(STATUS_LOCK_NOT_GRANTED));
        assert_eq!(iomgr::waiting_locks(&b), Ok(0));
        assert_eq!(locks::waiting_threads(), 0);
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// Two requests waiting for the same range are granted in the order they arrived: the first when the holder
    /// unlocks, the second when the first unlocks.
    fn waiters_are_granted_in_arrival_order() {
        setup();
        let a = open();
        iomgr::lock(&a, 0, 4, 0, true).expect("exclusive lock");
        let order = Arc::new(Mutex::new(Vec::new()));
        let waiter = |name: &'static str, order: Arc<Mutex<Vec<&'static str>>>| {
            move || {
                let handle = open();
                iomgr::lock_wait(&handle, 0, 4, 0, true).expect("granted");
                order.lock().expect("order").push(name);
                iomgr::unlock(&handle, 0, 4, 0).expect("unlock");
                iomgr::close(handle);
            }
        };
        let first = thread::spawn("first", waiter("first", Arc::clone(&order))).expect("spawn");
        until_waiting(1);
        let second = thread::spawn("second", waiter("second", Arc::clone(&order))).expect("spawn");
        until_waiting(2);
        assert_eq!(iomgr::waiting_locks(&a), Ok(2));
        iomgr::unlock(&a, 0, 4, 0).expect("unlock");
        first.join().expect("first");
        second.join().expect("second");
        assert_eq!(*order.lock().expect("order"), ["first", "second"]);
        iomgr::close(a);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// Closing the waiting handle from another thread cancels its request (STATUS_CANCELLED), as a cleanup cancels
    /// its file object's queued requests; the holder keeps its lock.
    fn closing_the_waiting_handle_cancels_its_request() {
        setup();
        let a = open();
        let b = Arc::new(open());
        iomgr::lock(&a, 0, 4, 0, true).expect("exclusive lock");
        let waiting = Arc::clone(&b);
        let waiter = thread::spawn("waiter", move || iomgr::lock_wait(&waiting, 0, 4, 0, true)).expect("spawn");
        until_waiting(1);
        assert!(iomgr::close_handle(&b), "cleanup of the waiting handle");
        assert_eq!(waiter.join().expect("waiter"), Err(STATUS_CANCELLED));
        assert_eq!(iomgr::waiting_locks(&a), Ok(0));
        assert!(iomgr::read(&a, Some(0), 4).is_ok(), "a still holds its lock and reads");
        iomgr::close(a);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// The only thread that could unlock is the one waiting: the wait would never end. Reported by rule, not a
    /// timeout; the request is cancelled and the holder keeps its lock.
    fn a_lock_wait_nothing_can_end_is_reported_and_cancelled() {
        setup();
        let a = open();
        let b = open();
        iomgr::lock(&a, 0, 4, 0, true).expect("exclusive lock");
        assert_eq!(iomgr::lock_wait(&b, 0, 1, 0, false), Err(STATUS_CANCELLED));
        assert_eq!(take_rules(), [Rule::LockWaitDeadlock]);
        assert_eq!(iomgr::waiting_locks(&b), Ok(0), "the request left the queue");
        assert_eq!(iomgr::lock(&b, 0, 1, 0, false), Err(STATUS_LOCK_NOT_GRANTED), "a's lock stays");
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// Two threads each waiting for the other's lock: the rule fires once, for whichever thread finds the cycle
    /// first, and cancels that thread's request; the other goes on waiting and is granted what the first releases.
    fn a_cycle_of_lock_waits_is_reported_once_and_the_other_waiter_goes_on() {
        setup();
        let a = open();
        let b = open();
        iomgr::lock(&a, 0, 4, 0, true).expect("the test's lock");
        let other = thread::spawn("other", || {
            let c = open();
            let d = open();
            iomgr::lock(&c, 10, 4, 0, true).expect("the other thread's lock");
            let waited = iomgr::lock_wait(&d, 0, 4, 0, true);
            // Releases [10, 14) whether or not it gave up.
            iomgr::close(c);
            iomgr::close(d);
            waited
        })
        .expect("spawn");
        until_waiting(1);
        let mine = iomgr::lock_wait(&b, 10, 4, 0, true);
        // Releases [0, 4) whether or not this thread gave up.
        iomgr::close(a);
        let theirs = other.join().expect("other");
        let mut results = [mine, theirs];
        results.sort_unstable();
        assert_eq!(results, [Ok(()), Err(STATUS_CANCELLED)], "exactly one waiter gives up, the other is granted");
        assert_eq!(take_rules(), [Rule::LockWaitDeadlock]);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

fn load_filter() -> fltsim::LoadedDriver {
    locker::load().expect("load")
}

scenario! {
    /// FltProcessFileLock pends a request that must wait (FLT_PREOP_PENDING, which the filter returns); when another
    /// thread unlocks through the filter, the lock package grants it, calls the completion routine and completes it
    /// through Filter Manager, and the requestor's call returns with the grant.
    fn a_filter_pends_a_waiting_lock_and_completes_it_when_the_lock_goes() {
        setup();
        let mut driver = load_filter();
        let a = open();
        let b = open();
        iomgr::lock(&a, 0, 4, 0, true).expect("the filter grants it");
        let unlocker = thread::spawn("unlocker", move || {
            until_waiting(1);
            iomgr::unlock(&a, 0, 4, 0).expect("unlock");
            a
        })
        .expect("spawn");
        assert_eq!(iomgr::lock_wait(&b, 0, 2, 0, true), Ok(()));
        let a = unlocker.join().expect("unlocker");
        assert_eq!(locker::pended(), 1, "only b's request was pended");
        assert_eq!(locker::fail_immediately_seen(), [true, false]);
        assert_eq!(locker::completed(), [STATUS_SUCCESS; 3], "a's lock, the unlock, b's lock");
        assert_eq!(iomgr::read(&a, Some(0), 2), Err(STATUS_FILE_LOCK_CONFLICT), "b holds the range in the filter");
        iomgr::close(b);
        assert_eq!(iomgr::read(&a, Some(0), 2).expect("released at b's cleanup"), b"01");
        iomgr::close(a);
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// The filter's cleanup (FsRtlFastUnlockAll) of the holder's handle grants the pended request.
    fn a_filters_unlock_all_at_cleanup_grants_the_pended_request() {
        setup();
        let mut driver = load_filter();
        let a = open();
        let b = open();
        iomgr::lock(&a, 4, 4, 0, true).expect("the filter grants it");
        let closer = thread::spawn("closer", move || {
            until_waiting(1);
            iomgr::close(a);
        })
        .expect("spawn");
        assert_eq!(iomgr::lock_wait(&b, 0, 6, 0, false), Ok(()));
        closer.join().expect("closer");
        iomgr::close(b);
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// A request the filter pended that nothing can grant is reported and cancelled, not hung: the completion routine
    /// sees STATUS_CANCELLED.
    fn a_filter_lock_wait_nothing_can_end_is_reported_and_cancelled() {
        setup();
        let mut driver = load_filter();
        let a = open();
        let b = open();
        iomgr::lock(&a, 0, 4, 0, true).expect("the filter grants it");
        assert_eq!(iomgr::lock_wait(&b, 0, 4, 0, true), Err(STATUS_CANCELLED));
        assert_eq!(take_rules(), [Rule::LockWaitDeadlock]);
        assert_eq!(locker::completed(), [STATUS_SUCCESS, STATUS_CANCELLED]);
        iomgr::close(a);
        iomgr::close(b);
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// Closing the waiting handle cancels the request the filter pended: its cleanup's FsRtlFastUnlockAll cancels
    /// the file object's waiting requests, and the completion routine sees STATUS_CANCELLED.
    fn closing_the_waiting_handle_cancels_the_request_the_filter_pended() {
        setup();
        let mut driver = load_filter();
        let a = open();
        let b = Arc::new(open());
        iomgr::lock(&a, 0, 4, 0, true).expect("the filter grants it");
        let waiting = Arc::clone(&b);
        let waiter = thread::spawn("waiter", move || iomgr::lock_wait(&waiting, 0, 4, 0, true)).expect("spawn");
        until_waiting(1);
        assert!(iomgr::close_handle(&b), "cleanup of the waiting handle");
        assert_eq!(waiter.join().expect("waiter"), Err(STATUS_CANCELLED));
        assert_eq!(locker::pended(), 1);
        assert_eq!(locker::completed(), [STATUS_SUCCESS, STATUS_CANCELLED], "a's lock, then b's cancelled request");
        assert_eq!(iomgr::read(&a, Some(0), 2).expect("a still reads its range"), b"01");
        iomgr::close(a);
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// A completion routine that fails a lock it is told about undoes the grant (FltAllocateFileLock's docs): the
    /// request fails with the routine's status and another handle may take the range.
    fn a_completion_routine_that_fails_a_lock_undoes_it() {
        setup();
        let mut driver = load_filter();
        let a = open();
        let b = open();
        locker::answer_completions_with(STATUS_LOCK_NOT_GRANTED);
        assert_eq!(iomgr::lock(&a, 0, 4, 0, true), Err(STATUS_LOCK_NOT_GRANTED));
        locker::answer_completions_with(STATUS_SUCCESS);
        iomgr::lock(&b, 0, 4, 0, true).expect("the range is free: a's lock was undone");
        assert_eq!(iomgr::read(&a, Some(0), 2), Err(STATUS_FILE_LOCK_CONFLICT), "b holds it now");
        iomgr::close(b);
        iomgr::close(a);
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}
