//! Pool: `ExAllocatePool2` and `ExFreePoolWithTag` over the host allocator, with tags, accounting, double-free and
//! leak detection, and failure injection.
//!
//! Every allocation is recorded with its tag, size and flags. Memory is zeroed unless `POOL_FLAG_UNINITIALIZED` is
//! given, in which case it is filled with [`UNINITIALIZED_FILL`] so that code relying on zeroed memory fails
//! visibly, as it would with special pool. Failure injection ([`FailurePlan`]) makes chosen allocations return
//! NULL, as low-resources simulation does.

use std::{
    alloc::{Layout, alloc, alloc_zeroed, dealloc},
    collections::{BTreeMap, HashSet},
    ffi::c_void,
    ptr::null_mut,
    sync::{Mutex, MutexGuard, PoisonError},
};

use super::{irql, thread};
use crate::{
    guard::guarded,
    verifier::{self, Rule},
};

const EXALLOCATEPOOL2: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exallocatepool2";
const EXFREEPOOLWITHTAG: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exfreepoolwithtag";

/// `POOL_FLAGS` (wdm.h).
pub mod flags {
    /// Charge quota.
    pub const USE_QUOTA: u64 = 0x1;
    /// Do not zero the allocation.
    pub const UNINITIALIZED: u64 = 0x2;
    /// Session pool.
    pub const SESSION: u64 = 0x4;
    /// Cache-aligned allocation.
    pub const CACHE_ALIGNED: u64 = 0x8;
    /// Raise an exception instead of returning NULL on failure.
    pub const RAISE_ON_FAILURE: u64 = 0x20;
    /// Nonpaged, non-executable pool.
    pub const NON_PAGED: u64 = 0x40;
    /// Nonpaged executable pool.
    pub const NON_PAGED_EXECUTE: u64 = 0x80;
    /// Paged pool.
    pub const PAGED: u64 = 0x100;
    /// Every required flag the docs define; other bits below `REQUIRED_END` are invalid.
    pub const KNOWN_REQUIRED: u64 =
        USE_QUOTA | UNINITIALIZED | SESSION | CACHE_ALIGNED | RAISE_ON_FAILURE | NON_PAGED | NON_PAGED_EXECUTE | PAGED;
    /// The end of the range of required flags; bits above it are optional and ignored when unknown.
    pub const REQUIRED_END: u64 = 0x8000_0000;
}

/// The byte `POOL_FLAG_UNINITIALIZED` allocations are filled with.
pub const UNINITIALIZED_FILL: u8 = 0xBD;

/// Which allocations fail on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailurePlan {
    /// None.
    #[default]
    Never,
    /// The allocation with this 1-based sequence number (counting from when the plan was set).
    Nth(u64),
    /// Every allocation with this tag.
    Tag(u32),
    /// Each allocation with probability 1/`one_in`, from a deterministic generator seeded with `seed`.
    Random {
        /// The generator's seed; the same seed fails the same allocations.
        seed: u64,
        /// One allocation in this many fails, on average.
        one_in: u64,
    },
}

/// One live allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Its address.
    pub address: usize,
    /// The bytes requested.
    pub size: usize,
    /// The pool tag.
    pub tag: u32,
    /// The pool flags.
    pub flags: u64,
}

impl Allocation {
    /// The tag as the debugger shows it.
    #[must_use]
    pub fn tag_name(&self) -> String {
        tag_name(self.tag)
    }
}

/// The tag's four characters in memory order, as `!poolused` shows them.
#[must_use]
pub fn tag_name(tag: u32) -> String {
    tag.to_le_bytes().iter().map(|&b| if (0x20..=0x7e).contains(&b) { char::from(b) } else { '?' }).collect()
}

/// Counters over the life of the process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Successful allocations.
    pub allocations: u64,
    /// Successful frees.
    pub frees: u64,
    /// Allocations failed on purpose by the [`FailurePlan`].
    pub injected_failures: u64,
}

#[derive(Default)]
struct Pool {
    live: BTreeMap<usize, Allocation>,
    freed: HashSet<usize>,
    stats: PoolStats,
    plan: FailurePlan,
    sequence: u64,
    rng: u64,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn pool() -> MutexGuard<'static, Option<Pool>> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn with_pool<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    f(pool().get_or_insert_with(Pool::default))
}

/// Sets which allocations fail from now on, restarting the sequence count.
pub fn set_failure_plan(plan: FailurePlan) {
    with_pool(|p| {
        p.plan = plan;
        p.sequence = 0;
        if let FailurePlan::Random { seed, .. } = plan {
            p.rng = seed;
        }
    });
}

/// The allocations live now, in address order.
#[must_use]
pub fn live() -> Vec<Allocation> {
    with_pool(|p| p.live.values().cloned().collect())
}

/// The counters so far.
#[must_use]
pub fn stats() -> PoolStats {
    with_pool(|p| p.stats)
}

impl Pool {
    fn should_fail(&mut self, tag: u32) -> bool {
        self.sequence += 1;
        match self.plan {
            FailurePlan::Never => false,
            FailurePlan::Nth(n) => self.sequence == n,
            FailurePlan::Tag(t) => t == tag,
            FailurePlan::Random { one_in, .. } => {
                // splitmix64: small, deterministic and good enough to spread failures.
                self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = self.rng;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                one_in != 0 && z.is_multiple_of(one_in)
            }
        }
    }
}

fn layout_for(size: usize) -> Option<Layout> {
    // 16-byte alignment on 64-bit Windows; requests of a page or more are page-aligned.
    let align = if size >= 4096 { 4096 } else { 16 };
    Layout::from_size_align(size, align).ok()
}

fn validate_request(flags: u64, size: usize, tag: u32) -> Result<(), String> {
    if size == 0 {
        return Err("NumberOfBytes is zero; the docs require a non-zero size".to_owned());
    }
    if tag == 0 {
        return Err("Tag is zero, which the docs call invalid".to_owned());
    }
    if !tag.to_le_bytes().iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(format!("Tag {tag:#010x} has a character outside 0x20..=0x7E"));
    }
    let required = flags & (flags::REQUIRED_END - 1);
    if required & !flags::KNOWN_REQUIRED != 0 {
        return Err(format!("Flags {flags:#x} set required bits the docs do not define"));
    }
    let kinds = [flags::NON_PAGED, flags::NON_PAGED_EXECUTE, flags::PAGED].iter().filter(|&&k| flags & k != 0).count();
    if kinds != 1 {
        return Err(format!(
            "Flags {flags:#x} must name exactly one pool type (NON_PAGED, NON_PAGED_EXECUTE or PAGED)"
        ));
    }
    Ok(())
}

/// `ExAllocatePool2`.
///
/// Rules (docs page below): IRQL ≤ DISPATCH_LEVEL, and ≤ APC_LEVEL for paged pool; a non-zero size; a non-zero tag
/// of printable characters; valid flags naming one pool type. An invalid request returns NULL, as Windows does,
/// and is reported. Memory is zeroed unless `POOL_FLAG_UNINITIALIZED`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exallocatepool2>.
#[unsafe(no_mangle)]
pub extern "system" fn ExAllocatePool2(flags: u64, number_of_bytes: usize, tag: u32) -> *mut c_void {
    const API: &str = "ExAllocatePool2";
    guarded(API, null_mut(), || {
        let max = if flags & flags::PAGED != 0 { irql::APC } else { irql::DISPATCH };
        if !thread::require_irql_at_most(API, max, EXALLOCATEPOOL2) {
            return null_mut();
        }
        if let Err(why) = validate_request(flags, number_of_bytes, tag) {
            verifier::report(Rule::PoolInvalidRequest, API, why);
            return null_mut();
        }
        let Some(layout) = layout_for(number_of_bytes) else {
            return null_mut();
        };
        with_pool(|p| {
            if p.should_fail(tag) {
                p.stats.injected_failures += 1;
                return null_mut();
            }
            let zero = flags & flags::UNINITIALIZED == 0;
            // SAFETY: `layout` has a non-zero size (checked in `validate_request`).
            let ptr = if zero { unsafe { alloc_zeroed(layout) } } else { unsafe { alloc(layout) } };
            if ptr.is_null() {
                return null_mut();
            }
            if !zero {
                // SAFETY: `ptr` is a fresh allocation of `number_of_bytes` bytes.
                unsafe { ptr.write_bytes(UNINITIALIZED_FILL, number_of_bytes) };
            }
            let address = ptr as usize;
            p.freed.remove(&address);
            p.live.insert(address, Allocation { address, size: number_of_bytes, tag, flags });
            p.stats.allocations += 1;
            ptr.cast()
        })
    })
}

/// `ExFreePoolWithTag`.
///
/// Rules: IRQL ≤ DISPATCH_LEVEL (≤ APC_LEVEL for paged pool); the pointer must be a live allocation (a second free,
/// or a pointer the pool never returned, is BAD_POOL_CALLER on Windows); the tag must match the allocation's. A
/// rejected free leaves the memory alone.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exfreepoolwithtag>.
#[unsafe(no_mangle)]
pub extern "system" fn ExFreePoolWithTag(p: *mut c_void, tag: u32) {
    const API: &str = "ExFreePoolWithTag";
    guarded(API, (), || free(API, p, Some(tag)));
}

fn free(api: &'static str, p: *mut c_void, tag: Option<u32>) {
    let address = p as usize;
    let found = with_pool(|pool| match pool.live.get(&address) {
        None if pool.freed.contains(&address) => Err(Rule::PoolDoubleFree),
        None => Err(Rule::PoolFreeNotAllocated),
        Some(a) => Ok(a.clone()),
    });
    let allocation = match found {
        Ok(allocation) => allocation,
        Err(rule) => {
            verifier::report(rule, api, format!("{address:#x} is not a live pool allocation"));
            return;
        }
    };
    let max = if allocation.flags & flags::PAGED != 0 { irql::APC } else { irql::DISPATCH };
    if !thread::require_irql_at_most(api, max, EXFREEPOOLWITHTAG) {
        return;
    }
    if let Some(tag) = tag
        && tag != allocation.tag
    {
        verifier::report(
            Rule::PoolTagMismatch,
            api,
            format!(
                "{address:#x} was allocated with tag '{}' but freed with '{}'",
                allocation.tag_name(),
                tag_name(tag)
            ),
        );
        return;
    }
    let Some(layout) = layout_for(allocation.size) else {
        return;
    };
    with_pool(|pool| {
        pool.live.remove(&address);
        pool.freed.insert(address);
        pool.stats.frees += 1;
    });
    // SAFETY: `p` is a live allocation made by `ExAllocatePool2` with exactly this layout, removed from the live set
    // above so it is freed once.
    unsafe { dealloc(p.cast(), layout) };
}
