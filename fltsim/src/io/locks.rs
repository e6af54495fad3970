//! Byte-range locks: the lock package file systems (and filters, through `FltAllocateFileLock`) use.
//!
//! A lock belongs to a file object and a process, with a key. As `LockFileEx` documents
//! (<https://learn.microsoft.com/windows/win32/api/fileapi/nf-fileapi-lockfileex>): an exclusive lock denies other
//! owners reading and writing the range and may not overlap any other lock; a shared lock denies everyone
//! (its owner too) writing the range and may not overlap an exclusive lock. A request that conflicts and asks to
//! fail immediately gets `STATUS_LOCK_NOT_GRANTED`; without `LOCKFILE_FAIL_IMMEDIATELY` it waits until it can be
//! granted. Unlocking a range that is not locked gets `STATUS_RANGE_NOT_LOCKED`.
//!
//! Waiting requests queue in arrival order. A request is checked against the granted locks only (the docs say
//! nothing of a queue; a request that another waiter would block is granted at once if no granted lock is in its
//! way). Each release grants the waiters that no longer conflict, oldest first, each grant counting for the next —
//! as `FsRtlFastUnlockAll` "completes any currently queued lock IRPs that can now be completed"
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-_fsrtl_advanced_fcb_header-fsrtlfastunlockall>).
//!
//! A thread that waits for a lock waits for another thread to unlock or close. When none is left that could — no
//! system worker busy for others, no other [`thread::spawn`]ed thread, and, for a waiter that is one of those, the
//! test's own thread blocked in a lock wait too — the wait would never end: the model reports
//! [`Rule::LockWaitDeadlock`] and cancels the request (`STATUS_CANCELLED`) instead of hanging. Other threads that
//! are themselves waiting for a lock do not count as able to act.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{
        Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread::ThreadId,
    time::Duration,
};

use windows_sys::Win32::Foundation::{NTSTATUS, STATUS_CANCELLED, STATUS_LOCK_NOT_GRANTED, STATUS_RANGE_NOT_LOCKED};

use crate::{
    kernel::{thread, work},
    verifier::{self, Rule},
};

/// Who holds a lock: the file object and the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The file object's address.
    pub file_object: usize,
    /// The process's id.
    pub process: usize,
}

/// One granted lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lock {
    /// Its owner.
    pub owner: Owner,
    /// The key it was taken with.
    pub key: u32,
    /// The first byte.
    pub offset: u64,
    /// How many bytes (0 locks nothing, as on Windows).
    pub length: u64,
    /// Exclusive or shared.
    pub exclusive: bool,
}

impl Lock {
    fn overlaps(&self, offset: u64, length: u64) -> bool {
        length > 0
            && self.length > 0
            && offset < self.offset.saturating_add(self.length)
            && self.offset < offset.saturating_add(length)
    }
}

/// A lock request that waits until it can be granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// The model's number for the request, unique in the process.
    pub id: u64,
    /// The lock it asks for.
    pub lock: Lock,
}

/// What a request that may wait got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The lock is held now.
    Granted,
    /// The request waits, with this [`Waiter::id`].
    Waiting(u64),
}

/// The next [`Waiter::id`].
static NEXT_WAITER: AtomicU64 = AtomicU64::new(1);

/// The locks of one stream (or one filter-owned `FILE_LOCK`), and the requests waiting for them.
#[derive(Clone, Debug, Default)]
pub struct LockTable {
    locks: Vec<Lock>,
    waiting: VecDeque<Waiter>,
}

impl LockTable {
    fn conflicts(&self, lock: &Lock) -> bool {
        self.locks.iter().any(|held| held.overlaps(lock.offset, lock.length) && (lock.exclusive || held.exclusive))
    }

    /// Grants `lock` or refuses it with `STATUS_LOCK_NOT_GRANTED` (a request that fails immediately).
    ///
    /// # Errors
    /// `STATUS_LOCK_NOT_GRANTED` when it conflicts with a granted lock.
    pub fn lock(&mut self, lock: Lock) -> Result<(), NTSTATUS> {
        if self.conflicts(&lock) {
            return Err(STATUS_LOCK_NOT_GRANTED);
        }
        self.locks.push(lock);
        Ok(())
    }

    /// Grants `lock`, or queues it behind the waiters already there when it conflicts with a granted lock (a
    /// request without `FailImmediately`).
    pub fn lock_or_wait(&mut self, lock: Lock) -> Grant {
        if self.conflicts(&lock) {
            let id = NEXT_WAITER.fetch_add(1, Ordering::Relaxed);
            self.waiting.push_back(Waiter { id, lock });
            return Grant::Waiting(id);
        }
        self.locks.push(lock);
        Grant::Granted
    }

    /// Grants the waiters that no longer conflict, oldest first; returns them in that order.
    fn grant_waiters(&mut self) -> Vec<Waiter> {
        let mut granted = Vec::new();
        let mut still = VecDeque::with_capacity(self.waiting.len());
        while let Some(waiter) = self.waiting.pop_front() {
            if self.conflicts(&waiter.lock) {
                still.push_back(waiter);
            } else {
                self.locks.push(waiter.lock);
                granted.push(waiter);
            }
        }
        self.waiting = still;
        granted
    }

    /// Releases the lock `owner` holds on exactly this range with this key; returns the waiters that got their
    /// locks because of it.
    ///
    /// # Errors
    /// `STATUS_RANGE_NOT_LOCKED` when there is none.
    pub fn unlock(&mut self, owner: Owner, key: u32, offset: u64, length: u64) -> Result<Vec<Waiter>, NTSTATUS> {
        let found = self
            .locks
            .iter()
            .position(|l| l.owner == owner && l.key == key && l.offset == offset && l.length == length)
            .ok_or(STATUS_RANGE_NOT_LOCKED)?;
        self.locks.remove(found);
        Ok(self.grant_waiters())
    }

    /// Releases every lock of `owner` (`IRP_MN_UNLOCK_ALL`, cleanup); returns the waiters granted because of it.
    pub fn unlock_all(&mut self, owner: Owner) -> Vec<Waiter> {
        self.locks.retain(|l| l.owner != owner);
        self.grant_waiters()
    }

    /// Releases every lock of `owner` taken with `key` (`IRP_MN_UNLOCK_ALL_BY_KEY`); returns the waiters granted
    /// because of it.
    pub fn unlock_all_by_key(&mut self, owner: Owner, key: u32) -> Vec<Waiter> {
        self.locks.retain(|l| l.owner != owner || l.key != key);
        self.grant_waiters()
    }

    /// Removes the waiting request `id`; `None` when it no longer waits (granted or cancelled already).
    pub fn cancel(&mut self, id: u64) -> Option<Waiter> {
        let at = self.waiting.iter().position(|w| w.id == id)?;
        self.waiting.remove(at)
    }

    /// Removes every waiting request `matches` selects (those of a file object at cleanup); returns them.
    pub fn cancel_where(&mut self, matches: impl Fn(&Waiter) -> bool) -> Vec<Waiter> {
        let mut cancelled = Vec::new();
        self.waiting.retain(|w| {
            let cancel = matches(w);
            if cancel {
                cancelled.push(*w);
            }
            !cancel
        });
        cancelled
    }

    /// Whether `owner` may read the range: no other owner's exclusive lock overlaps it.
    #[must_use]
    pub fn can_read(&self, owner: Owner, offset: u64, length: u64) -> bool {
        !self.locks.iter().any(|l| l.overlaps(offset, length) && l.exclusive && l.owner != owner)
    }

    /// Whether `owner` may write the range: no other owner's lock and no shared lock (its own included) overlaps.
    #[must_use]
    pub fn can_write(&self, owner: Owner, offset: u64, length: u64) -> bool {
        !self.locks.iter().any(|l| l.overlaps(offset, length) && (!l.exclusive || l.owner != owner))
    }

    /// The granted locks.
    #[must_use]
    pub fn locks(&self) -> &[Lock] {
        &self.locks
    }

    /// The waiting requests, oldest first.
    #[must_use]
    pub fn waiting(&self) -> &VecDeque<Waiter> {
        &self.waiting
    }
}

/// What kind of thread waits for a lock, for deciding who is left to end a wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A thread started with [`thread::spawn`].
    Spawned,
    /// A system worker running a work item.
    Worker,
    /// Any other thread: the test's own (the program driving the scenario).
    Driving,
}

fn kind_of_current() -> Kind {
    if thread::is_spawned() {
        Kind::Spawned
    } else if work::on_worker() {
        Kind::Worker
    } else {
        Kind::Driving
    }
}

/// The threads blocked in a lock wait now.
static BLOCKED: Mutex<Vec<(ThreadId, Kind)>> = Mutex::new(Vec::new());

fn blocked() -> MutexGuard<'static, Vec<(ThreadId, Kind)>> {
    BLOCKED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Marks the current thread as blocked in a lock wait while it lives.
pub(crate) struct Blocked(ThreadId);

impl Blocked {
    /// The current thread starts waiting for a lock.
    pub(crate) fn enter() -> Self {
        let me = std::thread::current().id();
        blocked().push((me, kind_of_current()));
        CHANGED.notify_all();
        Self(me)
    }
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let mut all = blocked();
        if let Some(at) = all.iter().position(|(id, _)| *id == self.0) {
            all.remove(at);
        }
        drop(all);
        CHANGED.notify_all();
    }
}

/// How many threads are blocked in a lock wait now (the file system's or a filter's lock package). For tests
/// that must know a request is waiting before they release what it waits for.
#[must_use]
pub fn waiting_threads() -> usize {
    blocked().len()
}

/// Whether nothing could end the current thread's lock wait, given the threads blocked in lock waits now
/// (`all`): every thread that could unlock or close is itself blocked in a lock wait, or gone. The threads that can
/// act for a waiter are the system workers busy for others and the other [`thread::spawn`]ed threads (as for
/// `oplock-break-deadlock`), and, for a waiter that is a spawned thread or a worker, the test's own thread, unless it
/// is blocked in a lock wait itself. A thread joining the waiter, or started with `std::thread::spawn`, is invisible
/// to the rule.
fn stuck(all: &[(ThreadId, Kind)]) -> bool {
    let me = std::thread::current().id();
    let others = all.iter().filter(|(id, _)| *id != me);
    let count = |kind: Kind| others.clone().filter(|(_, k)| *k == kind).count();
    let spawned_free = thread::other_spawned_threads().saturating_sub(count(Kind::Spawned));
    let workers_free = work::outstanding_elsewhere().saturating_sub(count(Kind::Worker));
    let driving_free = kind_of_current() != Kind::Driving && count(Kind::Driving) == 0;
    spawned_free == 0 && workers_free == 0 && !driving_free
}

/// Ends the current thread's lock wait when nothing could end it ([`stuck`]): calls `cancel`, which takes the
/// request out of its queue (`false` when it was granted meanwhile, so the wait goes on), and on success stops
/// counting this thread as blocked. The decision and the cancellation happen under one lock, so of several
/// threads waiting for each other only the first to decide gives up; the others see it gone and wait for what it
/// releases. Returns whether the wait was given up; the caller reports it ([`report_deadlock`]).
pub(crate) fn give_up_if_stuck(cancel: impl FnOnce() -> bool) -> bool {
    let me = std::thread::current().id();
    let mut all = blocked();
    if !stuck(&all) || !cancel() {
        return false;
    }
    if let Some(at) = all.iter().position(|(id, _)| *id == me) {
        all.remove(at);
    }
    drop(all);
    CHANGED.notify_all();
    true
}

/// The outcomes of waiting requests, by [`Waiter::id`], until their waiters take them.
static OUTCOMES: Mutex<BTreeMap<u64, NTSTATUS>> = Mutex::new(BTreeMap::new());
/// Signalled when an outcome is decided or a thread starts or stops waiting.
static CHANGED: Condvar = Condvar::new();

/// Decides the waiting request `id`: `STATUS_SUCCESS` when granted, `STATUS_CANCELLED` when its handle was
/// cleaned up. Its waiter, blocked in [`wait`], returns the status.
pub(crate) fn resolve(id: u64, status: NTSTATUS) {
    OUTCOMES.lock().unwrap_or_else(PoisonError::into_inner).insert(id, status);
    CHANGED.notify_all();
}

/// Blocks the current thread until the waiting request `id` is decided ([`resolve`]) and returns its status.
///
/// When nothing can end the wait, `cancel(id)` takes the request out of its queue; if it was still there the model
/// reports [`Rule::LockWaitDeadlock`] for `api` and returns `STATUS_CANCELLED`, instead of hanging. The queue
/// arbitrates: a request granted by a thread that has gone since is no longer there to cancel, and its outcome is
/// picked up.
pub(crate) fn wait(id: u64, api: &'static str, cancel: impl Fn(u64) -> bool) -> NTSTATUS {
    let _blocked = Blocked::enter();
    let outcomes = || OUTCOMES.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if let Some(status) = outcomes().remove(&id) {
            return status;
        }
        if give_up_if_stuck(|| cancel(id)) {
            report_deadlock(api);
            return STATUS_CANCELLED;
        }
        let decided = outcomes();
        if !decided.contains_key(&id) {
            // Re-check on every change; the timeout only bounds how long a change of the thread counts goes unseen.
            drop(CHANGED.wait_timeout(decided, Duration::from_millis(5)).unwrap_or_else(PoisonError::into_inner));
        }
    }
}

/// Reports a lock wait nothing can end, which the caller then cancels.
pub(crate) fn report_deadlock(api: &'static str) {
    verifier::report(
        Rule::LockWaitDeadlock,
        api,
        "a byte-range lock request without FailImmediately waits for a conflicting lock, and no other thread is \
         left that could unlock it or close its handle: the wait would never end; the model cancels the request \
         (STATUS_CANCELLED)",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Owner = Owner { file_object: 1, process: 4 };
    const B: Owner = Owner { file_object: 2, process: 8 };

    fn lock(owner: Owner, offset: u64, length: u64, exclusive: bool) -> Lock {
        Lock { owner, key: 0, offset, length, exclusive }
    }

    #[test]
    fn exclusive_locks_exclude_others_and_shared_locks_exclude_writers() {
        let mut table = LockTable::default();
        table.lock(lock(A, 10, 10, true)).unwrap();
        assert_eq!(table.lock(lock(B, 15, 1, false)), Err(STATUS_LOCK_NOT_GRANTED));
        assert!(table.can_read(A, 12, 2) && table.can_write(A, 12, 2));
        assert!(!table.can_read(B, 12, 2) && !table.can_write(B, 12, 2));
        assert!(table.can_read(B, 20, 5), "the range ends at 19");
        table.lock(lock(B, 30, 5, false)).unwrap();
        table.lock(lock(A, 32, 1, false)).unwrap();
        assert!(!table.can_write(B, 30, 1), "a shared lock denies its own owner writing");
        assert!(table.can_read(A, 30, 5));
        assert_eq!(table.unlock(A, 0, 10, 9), Err(STATUS_RANGE_NOT_LOCKED));
        table.unlock(A, 0, 10, 10).unwrap();
        assert!(table.unlock_all(A).is_empty());
        assert_eq!(table.locks().len(), 1);
    }

    #[test]
    fn zero_length_locks_lock_nothing() {
        let mut table = LockTable::default();
        table.lock(lock(A, 5, 0, true)).unwrap();
        assert!(table.can_write(B, 5, 1));
    }

    #[test]
    fn unlock_all_by_key_releases_only_that_keys_locks_of_that_owner() {
        let mut table = LockTable::default();
        table.lock(Lock { key: 7, ..lock(A, 0, 4, true) }).unwrap();
        table.lock(Lock { key: 9, ..lock(A, 10, 4, true) }).unwrap();
        table.lock(Lock { key: 7, ..lock(B, 20, 4, true) }).unwrap();
        assert!(table.unlock_all_by_key(A, 7).is_empty());
        assert_eq!(table.locks().len(), 2);
        assert!(table.can_write(B, 0, 4), "A's key-7 lock is gone");
        assert!(!table.can_write(B, 10, 4), "A's key-9 lock stays");
        assert!(!table.can_write(A, 20, 4), "B's key-7 lock stays");
    }

    #[test]
    fn waiters_queue_behind_granted_locks_and_are_granted_oldest_first() {
        const C: Owner = Owner { file_object: 3, process: 8 };
        let mut table = LockTable::default();
        assert_eq!(table.lock_or_wait(lock(A, 0, 10, true)), Grant::Granted);
        let Grant::Waiting(b) = table.lock_or_wait(lock(B, 5, 1, true)) else { panic!("B conflicts with A") };
        let Grant::Waiting(c) = table.lock_or_wait(lock(C, 4, 4, true)) else { panic!("C conflicts with A") };
        assert_eq!(table.lock_or_wait(lock(C, 20, 1, true)), Grant::Granted, "only granted locks are in the way");
        assert_eq!(table.waiting().len(), 2);
        let granted = table.unlock(A, 0, 0, 10).unwrap();
        assert_eq!(granted.iter().map(|w| w.id).collect::<Vec<_>>(), [b], "B first; C now conflicts with B");
        assert_eq!(table.unlock_all(B).iter().map(|w| w.id).collect::<Vec<_>>(), [c]);
        assert!(table.waiting().is_empty());
    }

    #[test]
    fn shared_waiters_are_granted_together_and_cancelled_waiters_never() {
        let mut table = LockTable::default();
        table.lock(lock(A, 0, 10, true)).unwrap();
        let Grant::Waiting(b) = table.lock_or_wait(lock(B, 0, 2, false)) else { panic!("waits") };
        let Grant::Waiting(c) = table.lock_or_wait(lock(B, 1, 2, false)) else { panic!("waits") };
        let Grant::Waiting(gone) = table.lock_or_wait(lock(A, 0, 1, true)) else { panic!("waits") };
        assert!(table.cancel(gone).is_some());
        assert!(table.cancel(gone).is_none(), "cancelled once");
        let granted = table.unlock_all(A);
        assert_eq!(granted.iter().map(|w| w.id).collect::<Vec<_>>(), [b, c]);
        assert_eq!(table.cancel_where(|w| w.lock.owner == B).len(), 0, "nothing waits any more");
    }
}
