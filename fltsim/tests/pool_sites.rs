//! Per-site allocation failure (Driver Verifier's systematic low resources simulation): an allocation site is the
//! call path that reached `ExAllocatePool2`, `FailurePlan::Site` fails the first allocation from one site, and
//! `pool::fail_each_site` runs a scenario once per site with that site failing. Pool state is process-global, so
//! every test runs in its own process (`scenario!`).

mod common;

use std::ffi::c_void;

use common::{NON_PAGED, TAG};
use fltsim::{
    kernel::pool::{self, FailurePlan, Site},
    scenario,
    verifier::take_reports,
};
use windows_sys::Wdk::System::SystemServices::{ExAllocatePool2, ExFreePoolWithTag};

/// Allocates `size` bytes of nonpaged pool tagged `TAG`. Shared by every `alloc_*` function below, which are
/// still distinct call paths: the return address into each differs.
fn allocate(size: usize) -> *mut c_void {
    // SAFETY: plain values; the model validates them.
    unsafe { ExAllocatePool2(NON_PAGED, size, TAG) }
}

/// Frees `p` (a live allocation tagged `TAG`), if it is not null.
fn release(p: *mut c_void) {
    if !p.is_null() {
        // SAFETY: `p` is a live allocation tagged `TAG`.
        unsafe { ExFreePoolWithTag(p, TAG) };
    }
}

#[inline(never)]
fn alloc_a() -> *mut c_void {
    allocate(24)
}

#[inline(never)]
fn alloc_b() -> *mut c_void {
    allocate(40)
}

/// `alloc_a` again, through another caller: another call path, so another site.
#[inline(never)]
fn alloc_a_via_other_caller() -> *mut c_void {
    alloc_a()
}

/// The addresses of the live allocations.
fn live_addresses() -> Vec<usize> {
    pool::live().iter().map(|a| a.address).collect()
}

/// The call paths test 1 allocates along.
#[derive(Clone, Copy, Debug)]
enum Path {
    A,
    B,
    AViaOtherCaller,
}

/// Allocates along each path in turn, from one call instruction, and returns what each allocation returned.
///
/// A site is the whole call path up to `pool::SITE_DEPTH` frames, which here reaches into the test's body: the same
/// function called from two lines of the test would be two sites. So the test calls `drive` from one place only.
#[inline(never)]
fn drive(paths: &[Path]) -> Vec<*mut c_void> {
    paths
        .iter()
        .map(|path| match path {
            Path::A => alloc_a(),
            Path::B => alloc_b(),
            Path::AViaOtherCaller => alloc_a_via_other_caller(),
        })
        .collect()
}

/// The phases of test 1: what happens before `drive`, which paths it takes, and which allocations must fail.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Nothing is recorded before recording starts.
    NotRecording,
    /// Records the sites.
    Record,
    /// Recording stopped: nothing more is recorded.
    Stopped,
    /// `FailurePlan::Site` with the site of `B`.
    FailB,
    /// `FailurePlan::Site` with the site of `AViaOtherCaller`.
    FailAViaOtherCaller,
}

scenario! {
    fn distinct_call_paths_are_distinct_sites_and_a_site_plan_fails_only_its_first_allocation() {
        use Path::{A, AViaOtherCaller, B};
        let mut sites: Vec<Site> = Vec::new();
        let mut injected = pool::stats().injected_failures;
        for phase in [Phase::NotRecording, Phase::Record, Phase::Stopped, Phase::FailB, Phase::FailAViaOtherCaller] {
            let (paths, failing): (&[Path], &[bool]) = match phase {
                Phase::NotRecording => (&[A], &[false]),
                Phase::Record => {
                    pool::record_sites(true);
                    // `A` twice along the same path is one site.
                    (&[A, A, B, AViaOtherCaller], &[false; 4])
                }
                Phase::Stopped => {
                    pool::record_sites(false);
                    (&[B], &[false])
                }
                Phase::FailB => {
                    pool::set_failure_plan(FailurePlan::Site(sites[1]));
                    (&[A, B, B, A, AViaOtherCaller], &[false, true, false, false, false])
                }
                Phase::FailAViaOtherCaller => {
                    // Setting a plan re-arms it; another site's plan fails that site only, and only once even
                    // while recording (which keeps the stack walks going after the failure).
                    pool::record_sites(true);
                    pool::set_failure_plan(FailurePlan::Site(sites[2]));
                    (&[A, B, AViaOtherCaller, AViaOtherCaller, A], &[false, false, true, false, false])
                }
            };
            let results = drive(paths);
            let failed: Vec<bool> = results.iter().map(|p| p.is_null()).collect();
            assert_eq!(failed, failing, "{phase:?}");
            results.into_iter().for_each(release);
            let expected = injected + failing.iter().filter(|&&f| f).count() as u64;
            injected = pool::stats().injected_failures;
            assert_eq!(injected, expected, "{phase:?}: injected failures");
            match phase {
                Phase::NotRecording => assert!(pool::sites().is_empty()),
                Phase::Record => {
                    sites = pool::sites();
                    assert_eq!(sites.len(), 3, "{sites:?}");
                    let sizes: Vec<usize> = sites.iter().map(Site::size).collect();
                    assert_eq!(sizes, [24, 40, 24], "first-seen order, each with its first allocation's size");
                    assert!(sites.iter().all(|s| s.tag() == TAG));
                    assert_ne!(sites[0], sites[2], "the same function reached from another caller is another site");
                    let shown = sites[1].to_string();
                    assert!(
                        shown.contains("'FsTf'")
                            && shown.contains("40 bytes")
                            && shown.contains(&format!("{:016x}", sites[1].id())),
                        "{shown}"
                    );
                }
                Phase::Stopped | Phase::FailB => {
                    assert_eq!(pool::sites(), sites, "{phase:?}: stopping keeps the list and adds nothing");
                }
                Phase::FailAViaOtherCaller => {
                    let again = pool::sites();
                    assert_eq!(again, sites, "recorded again: the same sites, in the order first seen");
                    pool::record_sites(false);
                }
            }
        }
        pool::set_failure_plan(FailurePlan::Never);
        assert!(pool::live().is_empty());
        assert!(take_reports().is_empty(), "injected failures break no rule");
    }
}

#[inline(never)]
fn alloc_first() -> *mut c_void {
    allocate(16)
}

#[inline(never)]
fn alloc_second() -> *mut c_void {
    allocate(32)
}

#[inline(never)]
fn alloc_third() -> *mut c_void {
    allocate(48)
}

/// A routine that frees what it allocated on every path, as a driver's error handling should.
#[inline(never)]
fn correct_routine() -> bool {
    let first = alloc_first();
    if first.is_null() {
        return false;
    }
    let second = alloc_second();
    if second.is_null() {
        release(first);
        return false;
    }
    let third = alloc_third();
    let ok = !third.is_null();
    release(third);
    release(second);
    release(first);
    ok
}

/// The same routine with a classic bug: when the second allocation fails, the first leaks.
#[inline(never)]
fn leaky_routine() -> bool {
    let first = alloc_first();
    if first.is_null() {
        return false;
    }
    let second = alloc_second();
    if second.is_null() {
        return false;
    }
    let third = alloc_third();
    let ok = !third.is_null();
    release(third);
    release(second);
    release(first);
    ok
}

scenario! {
    fn failing_each_site_of_a_correct_routine_leaks_nothing() {
        // Something live before the runs, which they must leave alone.
        let kept = allocate(8);
        let before = live_addresses();
        let mut runs = Vec::new();
        let failed = pool::fail_each_site(|site| {
            let ok = correct_routine();
            assert_eq!(ok, site.is_none(), "the routine succeeds exactly when nothing fails ({site:?})");
            assert_eq!(live_addresses(), before, "nothing left live after failing {site:?}");
            assert!(take_reports().is_empty(), "no rule broken when failing {site:?}");
            runs.push(site);
        });
        assert_eq!(failed, 3);
        assert_eq!(runs.len(), 4);
        assert_eq!(runs[0], None, "the first run fails nothing");
        let sizes: Vec<usize> = runs[1..].iter().flatten().map(Site::size).collect();
        assert_eq!(sizes, [16, 32, 48], "each site failed once, in first-seen order");
        assert_eq!(pool::sites().len(), 3);

        // The harness leaves nothing planned behind.
        let after = allocate(8);
        assert!(!after.is_null());
        release(after);
        release(kept);
        assert!(pool::live().is_empty());
    }
}

scenario! {
    fn failing_each_site_exposes_a_leak_on_an_error_path() {
        let before = live_addresses();
        let mut leaks: Vec<(Site, Vec<usize>)> = Vec::new();
        let failed = pool::fail_each_site(|site| {
            leaky_routine();
            let leaked: Vec<_> = pool::live().into_iter().filter(|a| !before.contains(&a.address)).collect();
            if !leaked.is_empty() {
                let site = site.expect("the run that fails nothing leaks nothing");
                leaks.push((site, leaked.iter().map(|a| a.size).collect()));
                // Clean up so that the next run starts from the same state.
                for a in &leaked {
                    release(a.address as *mut c_void);
                }
            }
            assert!(take_reports().is_empty());
        });
        assert_eq!(failed, 3);
        let sites = pool::sites();
        assert_eq!(sites.iter().map(Site::size).collect::<Vec<_>>(), [16, 32, 48]);
        assert_eq!(leaks.len(), 1, "exactly one failure leaks: {leaks:?}");
        let (site, sizes) = &leaks[0];
        assert_eq!(*site, sites[1], "failing the second site leaks");
        assert_eq!(sizes, &[16], "what leaks is the first allocation");
        assert_eq!(live_addresses(), before);
    }
}

scenario! {
    fn sites_first_reached_on_an_error_path_are_failed_too() {
        /// Falls back to a second, smaller allocation (another site) when the first fails.
        #[inline(never)]
        fn with_fallback() {
            let p = alloc_a();
            if p.is_null() {
                release(alloc_b());
            } else {
                release(p);
            }
        }
        let mut runs = Vec::new();
        let failed = pool::fail_each_site(|site| {
            with_fallback();
            runs.push(site.map(|s| s.size()));
        });
        assert_eq!(failed, 2, "the fallback's site, found while failing the first, is failed as well");
        assert_eq!(runs, [None, Some(24), Some(40)]);
        assert!(pool::live().is_empty());
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// `FailurePlan::NthSite` counts distinct sites in the order a run first reaches them: the n-th site's first
    /// allocation fails, once, and `sites_reached_by_plan` says how many sites the run reached (so a parent can
    /// enumerate the sites of a driver run in child processes, where addresses differ).
    fn the_nth_site_plan_fails_the_nth_distinct_site_once() {
        let mut outcomes = Vec::new();
        for n in 1..=4 {
            pool::set_failure_plan(FailurePlan::NthSite(n));
            let before = pool::stats().injected_failures;
            let ok = correct_routine();
            outcomes.push((ok, pool::stats().injected_failures - before, pool::sites_reached_by_plan()));
        }
        pool::set_failure_plan(FailurePlan::Never);
        // Failing site 1 stops the routine at once (1 site reached); site 2 after two; site 3 after three;
        // there is no fourth site, so nothing fails.
        assert_eq!(outcomes, [(false, 1, 1), (false, 1, 2), (false, 1, 3), (true, 0, 3)]);
        assert!(take_reports().is_empty());
    }
}
