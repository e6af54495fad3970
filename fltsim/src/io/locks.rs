//! Byte-range locks: the lock package file systems (and filters, through `FltAllocateFileLock`) use.
//!
//! A lock belongs to a file object and a process, with a key. As `LockFileEx` documents
//! (<https://learn.microsoft.com/windows/win32/api/fileapi/nf-fileapi-lockfileex>): an exclusive lock denies other
//! owners reading and writing the range and may not overlap any other lock; a shared lock denies everyone
//! (its owner too) writing the range and may not overlap an exclusive lock. A request that conflicts and asks to
//! fail immediately gets `STATUS_LOCK_NOT_GRANTED`; one that would wait is not modelled (the model answers the
//! same and reports it). Unlocking a range that is not locked gets `STATUS_RANGE_NOT_LOCKED`.

use windows_sys::Win32::Foundation::{NTSTATUS, STATUS_LOCK_NOT_GRANTED, STATUS_RANGE_NOT_LOCKED};

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

/// The locks of one stream (or one filter-owned `FILE_LOCK`).
#[derive(Clone, Debug, Default)]
pub struct LockTable {
    locks: Vec<Lock>,
}

impl LockTable {
    /// Grants `lock` or refuses it with `STATUS_LOCK_NOT_GRANTED`.
    ///
    /// # Errors
    /// `STATUS_LOCK_NOT_GRANTED` when it conflicts with a granted lock.
    pub fn lock(&mut self, lock: Lock) -> Result<(), NTSTATUS> {
        let conflict =
            self.locks.iter().any(|held| held.overlaps(lock.offset, lock.length) && (lock.exclusive || held.exclusive));
        if conflict {
            return Err(STATUS_LOCK_NOT_GRANTED);
        }
        self.locks.push(lock);
        Ok(())
    }

    /// Releases the lock `owner` holds on exactly this range with this key.
    ///
    /// # Errors
    /// `STATUS_RANGE_NOT_LOCKED` when there is none.
    pub fn unlock(&mut self, owner: Owner, key: u32, offset: u64, length: u64) -> Result<(), NTSTATUS> {
        let found = self
            .locks
            .iter()
            .position(|l| l.owner == owner && l.key == key && l.offset == offset && l.length == length)
            .ok_or(STATUS_RANGE_NOT_LOCKED)?;
        self.locks.remove(found);
        Ok(())
    }

    /// Releases every lock of `owner` (`IRP_MN_UNLOCK_ALL`, cleanup); returns how many.
    pub fn unlock_all(&mut self, owner: Owner) -> usize {
        let before = self.locks.len();
        self.locks.retain(|l| l.owner != owner);
        before - self.locks.len()
    }

    /// Releases every lock of `owner` taken with `key` (`IRP_MN_UNLOCK_ALL_BY_KEY`); returns how many.
    pub fn unlock_all_by_key(&mut self, owner: Owner, key: u32) -> usize {
        let before = self.locks.len();
        self.locks.retain(|l| l.owner != owner || l.key != key);
        before - self.locks.len()
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
        assert_eq!(table.unlock_all(A), 1);
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
        assert_eq!(table.unlock_all_by_key(A, 7), 1);
        assert!(table.can_write(B, 0, 4), "A's key-7 lock is gone");
        assert!(!table.can_write(B, 10, 4), "A's key-9 lock stays");
        assert!(!table.can_write(A, 20, 4), "B's key-7 lock stays");
    }
}
