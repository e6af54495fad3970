//! Pool: `ExAllocatePool2` and `ExFreePoolWithTag` over the host allocator, with tags, accounting, double-free and
//! leak detection, and failure injection.
//!
//! Every allocation is recorded with its tag, size and flags. Memory is zeroed unless `POOL_FLAG_UNINITIALIZED` is
//! given, in which case it is filled with [`UNINITIALIZED_FILL`] so that code relying on zeroed memory fails
//! visibly, as it would with special pool. Failure injection ([`FailurePlan`]) makes chosen allocations return
//! NULL, as low-resources simulation does.
//!
//! Per-site injection mirrors Driver Verifier's *systematic low resources simulation*
//! (<https://learn.microsoft.com/windows-hardware/drivers/devtest/systematic-low-resource-simulation>), which fails
//! an allocation the first time it sees the call stack that made it, so every error path runs once, reproducibly.
//! Here an allocation [`Site`] is the call path that reached `ExAllocatePool2`: the return addresses of the
//! [`SITE_DEPTH`] frames above it. [`record_sites`] and [`sites`] list the sites a scenario reaches,
//! [`FailurePlan::Site`] fails the first allocation from one site, and [`fail_each_site`] runs a scenario once per
//! site with that site failing, including sites that only the error paths reach.

use std::{
    alloc::{Layout, alloc, alloc_zeroed, dealloc},
    collections::{BTreeMap, HashSet},
    ffi::c_void,
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
    ptr::null_mut,
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use super::{irql, thread};
use crate::{
    guard::guarded,
    verifier::{self, Rule},
};

const EXALLOCATEPOOL2: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exallocatepool2";
const EXFREEPOOLWITHTAG: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-exfreepoolwithtag";

/// How many caller frames above `ExAllocatePool2` identify an allocation [`Site`].
///
/// Deep enough that distinct paths through a shared allocation helper (or a global allocator) are distinct sites.
pub const SITE_DEPTH: usize = 12;

/// When `ExAllocatePool2`'s own frame cannot be found in a stack walk (no unwind information, or the function was
/// inlined into its caller), this many innermost frames are skipped instead: as many as the stack walker's and the
/// model's own frames, `ExAllocatePool2`'s included, take in an unoptimised build. An optimised build has fewer of
/// them, so the frames kept then start a little further up the callers: still deterministic, only coarser (paths
/// that differ only in their nearest callers may share a site).
pub const SITE_FALLBACK_SKIP: usize = 10;

/// The most frames a stack walk looks through for `ExAllocatePool2`'s frame before falling back.
const WALK_LIMIT: usize = 64;

/// The most sites [`fail_each_site`] fails, so a scenario whose error paths keep reaching new sites still ends.
pub const FAIL_EACH_SITE_CAP: usize = 1024;

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
///
/// Setting a plan ([`set_failure_plan`]) restarts its count: [`FailurePlan::Nth`] counts from then, and
/// [`FailurePlan::Site`] fails the first allocation from its site after then.
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
    /// The first allocation from this [`Site`] after the plan is set, once; later allocations from it succeed, as
    /// Driver Verifier's systematic low resources simulation does.
    Site(Site),
    /// The first allocation from the n-th distinct site (1-based) reached after the plan is set, once. Sites are
    /// counted in the order they are first reached, which is the same in every run of a deterministic scenario:
    /// this enumerates the sites of a driver that loads once per process, where addresses (and so [`Site`] ids)
    /// differ from process to process. [`sites_reached_by_plan`] says how many distinct sites a run reached.
    NthSite(usize),
}

/// An allocation site: the call path that reached `ExAllocatePool2`, identified by a hash of the return addresses
/// of up to [`SITE_DEPTH`] caller frames above it.
///
/// The identity is the hash alone, which is deterministic within a process (code addresses do not move), not
/// across processes (address-space layout randomisation). The tag and size are those of the first allocation
/// seen from the site since [`record_sites`] started recording, kept to make the site recognisable; they take no
/// part in equality, hashing or ordering.
#[derive(Clone, Copy, Debug)]
pub struct Site {
    id: u64,
    tag: u32,
    size: usize,
}

impl Site {
    /// The hash of the call path that identifies the site.
    #[must_use]
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The tag of the first allocation seen from the site.
    #[must_use]
    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// The size of the first allocation seen from the site.
    #[must_use]
    pub fn size(&self) -> usize {
        self.size
    }
}

impl PartialEq for Site {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Site {}

impl Hash for Site {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl PartialOrd for Site {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Site {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.id.cmp(&other.id)
    }
}

impl fmt::Display for Site {
    /// `site 0123456789abcdef (first 'Tag1', 64 bytes)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "site {:016x} (first '{}', {} bytes)", self.id, tag_name(self.tag), self.size)
    }
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
    /// Whether a [`FailurePlan::Site`] plan has failed its allocation.
    site_failed: bool,
    recording: bool,
    /// The sites seen while recording, in first-seen order, and their ids.
    sites: Vec<Site>,
    site_ids: HashSet<u64>,
    /// The distinct sites reached since the plan was set (for [`FailurePlan::NthSite`]).
    plan_sites: HashSet<u64>,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

/// Whether `ExAllocatePool2` must walk the stack for its site: sites are being recorded, or a site plan waits to
/// fail. Read without the pool lock so that the walk happens before it is taken, and not at all otherwise.
static CAPTURE_SITES: AtomicBool = AtomicBool::new(false);

fn pool() -> MutexGuard<'static, Option<Pool>> {
    POOL.lock().unwrap_or_else(PoisonError::into_inner)
}

fn with_pool<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    f(pool().get_or_insert_with(Pool::default))
}

/// Sets which allocations fail from now on, restarting the sequence count (and re-arming a [`FailurePlan::Site`]).
pub fn set_failure_plan(plan: FailurePlan) {
    with_pool(|p| {
        p.plan = plan;
        p.sequence = 0;
        p.site_failed = false;
        p.plan_sites.clear();
        if let FailurePlan::Random { seed, .. } = plan {
            p.rng = seed;
        }
        p.update_capture();
    });
}

/// Starts (`true`) or stops (`false`) recording the allocation sites `ExAllocatePool2` is called from.
///
/// Starting clears the sites recorded before; stopping keeps them for [`sites`]. Recording walks the stack on every
/// allocation, so leave it off when it is not needed.
pub fn record_sites(on: bool) {
    with_pool(|p| {
        if on {
            p.sites.clear();
            p.site_ids.clear();
        }
        p.recording = on;
        p.update_capture();
    });
}

/// The distinct sites allocated from since recording started ([`record_sites`]), in first-seen order.
#[must_use]
pub fn sites() -> Vec<Site> {
    with_pool(|p| p.sites.clone())
}

/// Runs `scenario` once per allocation site it reaches, with that site's first allocation failing: Driver
/// Verifier's systematic low resources simulation
/// (<https://learn.microsoft.com/windows-hardware/drivers/devtest/systematic-low-resource-simulation>) as a loop.
///
/// The first run passes `None` and fails nothing, while the sites it reaches are recorded. Then, for each recorded
/// site in first-seen order, the plan is set to [`FailurePlan::Site`] (which restarts the sequence count) and the
/// scenario runs again with `Some(site)`. Recording goes on during those runs, so sites first reached on an error
/// path are failed in turn too, up to [`FAIL_EACH_SITE_CAP`] sites. Verifier reports and live allocations are left
/// alone: the scenario checks them itself (with [`live`] and `verifier::take_reports`) and cleans up what it must.
/// The scenario is always called from one place here, so its call path, and with it the sites it reaches, is the
/// same on every run. When the runs end (or the scenario panics), the plan is back to [`FailurePlan::Never`] and
/// recording is off; [`sites`] still lists every site reached.
///
/// Returns how many sites were failed: the number of runs with a [`FailurePlan::Site`]. (A planned failure does not
/// fire in a run that never reaches its site, such as one only another site's error path reaches.)
pub fn fail_each_site(mut scenario: impl FnMut(Option<Site>)) -> usize {
    /// Puts the plan and recording back however the runs end.
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            set_failure_plan(FailurePlan::Never);
            record_sites(false);
        }
    }
    let _reset = Reset;
    set_failure_plan(FailurePlan::Never);
    record_sites(true);
    let mut failing: Option<Site> = None;
    let mut failed = 0;
    loop {
        set_failure_plan(failing.map_or(FailurePlan::Never, FailurePlan::Site));
        scenario(failing);
        if failing.is_some() {
            failed += 1;
        }
        if failed == FAIL_EACH_SITE_CAP {
            break;
        }
        failing = with_pool(|p| p.sites.get(failed).copied());
        if failing.is_none() {
            break;
        }
    }
    failed
}

/// The allocations live now, in address order.
#[must_use]
pub fn live() -> Vec<Allocation> {
    with_pool(|p| p.live.values().cloned().collect())
}

/// How many distinct allocation sites were reached since the [`FailurePlan`] was set, while a
/// [`FailurePlan::NthSite`] plan was in force.
#[must_use]
pub fn sites_reached_by_plan() -> usize {
    with_pool(|p| p.plan_sites.len())
}

/// The counters so far.
#[must_use]
pub fn stats() -> PoolStats {
    with_pool(|p| p.stats)
}

impl Pool {
    fn update_capture(&self) {
        // An NthSite plan keeps counting sites after its failure, for `sites_reached_by_plan`.
        let waiting = (matches!(self.plan, FailurePlan::Site(_)) && !self.site_failed)
            || matches!(self.plan, FailurePlan::NthSite(_));
        CAPTURE_SITES.store(self.recording || waiting, Ordering::SeqCst);
    }

    fn record(&mut self, path: Option<u64>, tag: u32, size: usize) {
        if let Some(id) = path
            && self.recording
            && self.site_ids.insert(id)
        {
            self.sites.push(Site { id, tag, size });
        }
    }

    fn should_fail(&mut self, tag: u32, site: Option<u64>) -> bool {
        self.sequence += 1;
        match self.plan {
            FailurePlan::Never => false,
            FailurePlan::Site(s) => {
                let fail = !self.site_failed && site == Some(s.id);
                if fail {
                    self.site_failed = true;
                    self.update_capture();
                }
                fail
            }
            FailurePlan::NthSite(n) => {
                let new = site.is_some_and(|id| self.plan_sites.insert(id));
                let fail = !self.site_failed && new && self.plan_sites.len() == n;
                if fail {
                    self.site_failed = true;
                }
                fail
            }
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

/// The site of the `ExAllocatePool2` call this runs in, or `None` when no one needs it (see [`CAPTURE_SITES`]).
///
/// Walks the stack with the `backtrace` crate, which neither allocates pool nor calls into the model, without
/// symbolising. The frames kept are those after `ExAllocatePool2`'s own (found by its start address), or, when
/// that frame is not found, those after the first [`SITE_FALLBACK_SKIP`]. Must run before the pool lock is taken.
#[inline(never)]
fn current_site() -> Option<u64> {
    if !CAPTURE_SITES.load(Ordering::SeqCst) {
        return None;
    }
    let entry = ExAllocatePool2 as *const () as usize;
    let mut frames = [0usize; WALK_LIMIT];
    let mut walked = 0;
    let mut after_entry: Option<usize> = None;
    backtrace::trace(|frame| {
        if let Some(slot) = frames.get_mut(walked) {
            *slot = frame.ip() as usize;
            walked += 1;
        }
        if after_entry.is_none() && frame.symbol_address() as usize == entry {
            after_entry = Some(walked);
        }
        walked < WALK_LIMIT && after_entry.is_none_or(|start| walked < start + SITE_DEPTH)
    });
    let start = after_entry.unwrap_or(SITE_FALLBACK_SKIP).min(walked);
    let end = (start + SITE_DEPTH).min(walked);
    let mut hasher = DefaultHasher::new();
    frames.get(start..end).unwrap_or_default().hash(&mut hasher);
    Some(hasher.finish())
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
/// and is reported. Memory is zeroed unless `POOL_FLAG_UNINITIALIZED`. A valid request is recorded by its
/// [`Site`] while [`record_sites`] is on, and fails when the [`FailurePlan`] says so.
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
        // Before the pool lock: the walk takes the `backtrace` crate's own lock and must not hold ours meanwhile.
        let site = current_site();
        with_pool(|p| {
            p.record(site, tag, number_of_bytes);
            if p.should_fail(tag, site) {
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
