//! Pool memory: fallible, tagged allocations over `ExAllocatePool2`, owned by types whose `Drop` frees them.
//!
//! Every allocation kind has its own [`PoolTag`], so `!poolused` (and fltsim's leak report) names what leaked.
//! On hosts other than Windows these calls land in fltsim, which counts them and can make any one of them fail.

use core::{
    ffi::c_void,
    fmt,
    mem::{align_of, size_of},
    ops::{Deref, DerefMut},
    ptr::{NonNull, null_mut},
    sync::atomic::{AtomicPtr, Ordering},
};

use windows_sys::Wdk::System::SystemServices::{ExAllocatePool2, ExFreePoolWithTag};

use super::{
    irql::{Irql, current_irql},
    status::{NtResult, NtStatus},
};

/// `POOL_FLAGS` values of wdm.h, which windows-sys does not carry (they are `#define`s, not metadata).
pub mod flags {
    /// Do not zero the allocation.
    pub const UNINITIALIZED: u64 = 0x2;
    /// Nonpaged, non-executable pool.
    pub const NON_PAGED: u64 = 0x40;
    /// Paged pool.
    pub const PAGED: u64 = 0x100;
}

/// The alignment `ExAllocatePool2` guarantees on 64-bit Windows (`MEMORY_ALLOCATION_ALIGNMENT`).
pub const POOL_ALIGNMENT: usize = 16;

/// A four-character pool tag, shown by the debugger in memory order.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PoolTag(u32);

impl PoolTag {
    /// Builds a tag from its four characters as the debugger shows them.
    #[must_use]
    pub const fn new(name: [u8; 4]) -> Self {
        Self(u32::from_le_bytes(name))
    }

    /// The tag as `ExAllocatePool2` takes it.
    #[must_use]
    pub const fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Debug for PoolTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = self.0.to_le_bytes();
        f.write_str("PoolTag(\"")?;
        for b in bytes {
            fmt::Write::write_char(f, char::from(b))?;
        }
        f.write_str("\")")
    }
}

/// Tags of the driver's allocation kinds.
pub mod tags {
    use super::PoolTag;

    /// The driver's global state.
    pub const GLOBALS: PoolTag = PoolTag::new(*b"ShGl");
    /// Allocations made through the Rust global allocator (collections of the policy engine).
    pub const HEAP: PoolTag = PoolTag::new(*b"ShHp");
}

/// A `T` in nonpaged pool, freed (after `T` is dropped) when the box is dropped.
pub struct PoolBox<T> {
    ptr: NonNull<T>,
    tag: PoolTag,
}

// SAFETY: a `PoolBox<T>` owns its `T` exclusively, like `Box<T>`; moving it between threads moves the `T`.
unsafe impl<T: Send> Send for PoolBox<T> {}
// SAFETY: shared access to a `PoolBox<T>` only hands out `&T`.
unsafe impl<T: Sync> Sync for PoolBox<T> {}

impl<T> PoolBox<T> {
    const LAYOUT_OK: () = assert!(
        align_of::<T>() <= POOL_ALIGNMENT && size_of::<T>() > 0,
        "PoolBox holds non-zero-sized types whose alignment pool memory guarantees"
    );

    /// Moves `value` into a new nonpaged-pool allocation tagged `tag`.
    ///
    /// IRQL: ≤ DISPATCH_LEVEL (nonpaged pool).
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exallocatepool2>.
    ///
    /// # Errors
    /// `STATUS_INSUFFICIENT_RESOURCES` when the pool cannot satisfy the request, or when called above
    /// DISPATCH_LEVEL, where allocating would be a bugcheck rather than a failure; `value` is dropped.
    pub fn try_new(value: T, tag: PoolTag) -> NtResult<Self> {
        let () = Self::LAYOUT_OK;
        if current_irql() > Irql::DISPATCH {
            return Err(NtStatus::INSUFFICIENT_RESOURCES);
        }
        // SAFETY: `ExAllocatePool2` has no preconditions beyond valid flags; it returns null on failure.
        let raw = unsafe { ExAllocatePool2(flags::NON_PAGED, size_of::<T>(), tag.raw()) };
        let ptr = NonNull::new(raw.cast::<T>()).ok_or(NtStatus::INSUFFICIENT_RESOURCES)?;
        // SAFETY: `ptr` is a fresh allocation of `size_of::<T>()` bytes, aligned to POOL_ALIGNMENT ≥ align_of::<T>().
        unsafe { ptr.as_ptr().write(value) };
        Ok(Self { ptr, tag })
    }
}

impl<T> PoolBox<T> {
    /// Gives up ownership without freeing; [`PoolBox::from_raw`] takes it back.
    fn into_raw(self) -> NonNull<T> {
        let ptr = self.ptr;
        core::mem::forget(self);
        ptr
    }

    /// Takes back ownership of a pointer returned by [`PoolBox::into_raw`].
    ///
    /// # Safety
    /// `ptr` must come from `into_raw` of a box allocated with `tag`, and must not be owned by anything else.
    unsafe fn from_raw(ptr: NonNull<T>, tag: PoolTag) -> Self {
        Self { ptr, tag }
    }
}

/// A global slot that owns at most one `PoolBox<T>`: how the driver keeps its state between `DriverEntry`
/// and unload without a `static mut`.
pub struct PoolSlot<T> {
    ptr: AtomicPtr<T>,
    tag: PoolTag,
}

// SAFETY: the slot hands its `T` between threads (set in DriverEntry, taken at unload) and shares `&T`.
unsafe impl<T: Send + Sync> Sync for PoolSlot<T> {}

impl<T> PoolSlot<T> {
    /// An empty slot for boxes allocated with `tag`.
    #[must_use]
    pub const fn new(tag: PoolTag) -> Self {
        Self { ptr: AtomicPtr::new(null_mut()), tag }
    }

    /// Stores `value`.
    ///
    /// # Errors
    /// Gives `value` back when the slot is occupied or the box was allocated with another tag.
    pub fn set(&self, value: PoolBox<T>) -> Result<(), PoolBox<T>> {
        if value.tag != self.tag {
            return Err(value);
        }
        let raw = value.into_raw();
        match self.ptr.compare_exchange(null_mut(), raw.as_ptr(), Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(()),
            // SAFETY: `raw` came from `into_raw` just above and was not stored.
            Err(_) => Err(unsafe { PoolBox::from_raw(raw, self.tag) }),
        }
    }

    /// Removes and returns the stored box, if any.
    pub fn take(&self) -> Option<PoolBox<T>> {
        let raw = NonNull::new(self.ptr.swap(null_mut(), Ordering::AcqRel))?;
        // SAFETY: only `set` stores pointers here, each from `into_raw` of a box with `self.tag`; the swap gives
        // this call sole ownership.
        Some(unsafe { PoolBox::from_raw(raw, self.tag) })
    }

    /// Whether a box is stored.
    #[must_use]
    pub fn is_set(&self) -> bool {
        !self.ptr.load(Ordering::Acquire).is_null()
    }
}

impl<T> Deref for PoolBox<T> {
    type Target = T;

    fn deref(&self) -> &T {
        // SAFETY: `ptr` points to a live, initialised `T` owned by this box.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T> DerefMut for PoolBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: `ptr` points to a live `T` owned by this box, and `&mut self` makes the access exclusive.
        unsafe { self.ptr.as_mut() }
    }
}

impl<T> Drop for PoolBox<T> {
    fn drop(&mut self) {
        // SAFETY: the `T` is live and owned by this box, and is never touched again.
        unsafe { self.ptr.as_ptr().drop_in_place() };
        free(self.ptr.cast(), self.tag);
    }
}

/// Frees pool allocated with `tag`.
///
/// IRQL: ≤ DISPATCH_LEVEL for nonpaged pool.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exfreepoolwithtag>.
pub(crate) fn free(ptr: NonNull<c_void>, tag: PoolTag) {
    // SAFETY: callers pass a pointer that `ExAllocatePool2` returned with this tag and that is not used again.
    unsafe { ExFreePoolWithTag(ptr.as_ptr(), tag.raw()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_read_in_memory_order() {
        assert_eq!(tags::GLOBALS.raw().to_le_bytes(), *b"ShGl");
        assert_eq!(format!("{:?}", tags::HEAP), "PoolTag(\"ShHp\")");
    }
}
