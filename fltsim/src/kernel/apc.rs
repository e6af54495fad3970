//! APC state and the top-level IRP: critical and guarded regions, `KeAreApcsDisabled` / `KeAreAllApcsDisabled`,
//! `IoGetTopLevelIrp` and `IoSetTopLevelIrp`, over the simulated thread's state ([`super::thread`]).
//!
//! A critical region turns off normal kernel APCs; a guarded region turns off all kernel APCs, special ones
//! included, while the thread stays at PASSIVE_LEVEL. Both nest, and every enter needs its leave before the
//! driver returns (<https://learn.microsoft.com/windows-hardware/drivers/kernel/critical-regions-and-guarded-regions>).

use windows_sys::Wdk::Foundation::IRP;

use super::{irql, thread};
use crate::{
    guard::guarded,
    verifier::{self, Rule},
};

const KEENTERCRITICALREGION: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-keentercriticalregion";
const KELEAVECRITICALREGION: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-keleavecriticalregion";
const KEENTERGUARDEDREGION: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keenterguardedregion";
const KELEAVEGUARDEDREGION: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keleaveguardedregion";
const KEAREAPCSDISABLED: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-keareapcsdisabled";
const KEAREALLAPCSDISABLED: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keareallapcsdisabled";
const IOGETTOPLEVELIRP: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-iogettoplevelirp";
const IOSETTOPLEVELIRP: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-iosettoplevelirp";

/// `KeEnterCriticalRegion`: IRQL ≤ APC_LEVEL; enters a (nestable) critical region, turning off normal kernel APCs.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-keentercriticalregion>.
#[unsafe(no_mangle)]
pub extern "system" fn KeEnterCriticalRegion() {
    const API: &str = "KeEnterCriticalRegion";
    guarded(API, (), || {
        if thread::require_irql_at_most(API, irql::APC, KEENTERCRITICALREGION) {
            thread::update(|t| t.critical_regions += 1);
        }
    });
}

/// `KeLeaveCriticalRegion`: IRQL ≤ APC_LEVEL; leaves the innermost critical region. Leaving one that was never
/// entered is reported ([`Rule::RegionLeaveWithoutEnter`], Driver Verifier's `CriticalRegions` rule; `APC_INDEX_MISMATCH`
/// on Windows) and changes nothing.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-keleavecriticalregion>.
#[unsafe(no_mangle)]
pub extern "system" fn KeLeaveCriticalRegion() {
    const API: &str = "KeLeaveCriticalRegion";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, KELEAVECRITICALREGION) {
            return;
        }
        let left =
            thread::update(|t| t.critical_regions.checked_sub(1).map(|depth| t.critical_regions = depth).is_some());
        if !left {
            verifier::report(
                Rule::RegionLeaveWithoutEnter,
                API,
                "the thread is in no critical region (KeEnterCriticalRegion was not called)",
            );
        }
    });
}

/// `KeEnterGuardedRegion`: IRQL ≤ APC_LEVEL; enters a (nestable) guarded region, turning off all kernel APCs.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keenterguardedregion>.
#[unsafe(no_mangle)]
pub extern "system" fn KeEnterGuardedRegion() {
    const API: &str = "KeEnterGuardedRegion";
    guarded(API, (), || {
        if thread::require_irql_at_most(API, irql::APC, KEENTERGUARDEDREGION) {
            thread::update(|t| t.guarded_regions += 1);
        }
    });
}

/// `KeLeaveGuardedRegion`: IRQL ≤ APC_LEVEL; leaves the innermost guarded region. Leaving one that was never
/// entered is reported ([`Rule::RegionLeaveWithoutEnter`]) and changes nothing.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keleaveguardedregion>.
#[unsafe(no_mangle)]
pub extern "system" fn KeLeaveGuardedRegion() {
    const API: &str = "KeLeaveGuardedRegion";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, KELEAVEGUARDEDREGION) {
            return;
        }
        let left =
            thread::update(|t| t.guarded_regions.checked_sub(1).map(|depth| t.guarded_regions = depth).is_some());
        if !left {
            verifier::report(
                Rule::RegionLeaveWithoutEnter,
                API,
                "the thread is in no guarded region (KeEnterGuardedRegion was not called)",
            );
        }
    });
}

/// `KeAreApcsDisabled`: IRQL ≤ DISPATCH_LEVEL; TRUE inside a critical or a guarded region (normal kernel APCs
/// off). It does not look at the IRQL: at APC_LEVEL outside any region it answers FALSE, as on Windows.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-keareapcsdisabled>.
#[unsafe(no_mangle)]
pub extern "system" fn KeAreApcsDisabled() -> bool {
    const API: &str = "KeAreApcsDisabled";
    guarded(API, true, || {
        thread::require_irql_at_most(API, irql::DISPATCH, KEAREAPCSDISABLED);
        thread::snapshot().apcs_disabled()
    })
}

/// `KeAreAllApcsDisabled`: IRQL ≤ DISPATCH_LEVEL; TRUE inside a guarded region or at APC_LEVEL or above.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-keareallapcsdisabled>.
#[unsafe(no_mangle)]
pub extern "system" fn KeAreAllApcsDisabled() -> bool {
    const API: &str = "KeAreAllApcsDisabled";
    guarded(API, true, || {
        thread::require_irql_at_most(API, irql::DISPATCH, KEAREALLAPCSDISABLED);
        thread::snapshot().all_apcs_disabled()
    })
}

/// `IoGetTopLevelIrp`: IRQL ≤ DISPATCH_LEVEL; the current thread's top-level IRP: NULL, an IRP, or an
/// `FSRTL_*_TOP_LEVEL_IRP` value. The model sets it with [`thread::with_top_level_irp`].
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-iogettoplevelirp>.
#[unsafe(no_mangle)]
pub extern "system" fn IoGetTopLevelIrp() -> *mut IRP {
    const API: &str = "IoGetTopLevelIrp";
    guarded(API, std::ptr::null_mut(), || {
        thread::require_irql_at_most(API, irql::DISPATCH, IOGETTOPLEVELIRP);
        std::ptr::without_provenance_mut(thread::snapshot().top_level_irp)
    })
}

/// `IoSetTopLevelIrp`: IRQL ≤ DISPATCH_LEVEL. "Only file systems can call `IoSetTopLevelIrp`. File system filters
/// and minifilters cannot safely call this routine, because doing so can cause deadlocks."
///
/// Only driver code calls this export: the model sets the top-level IRP through [`thread::with_top_level_irp`],
/// never through the export, and the drivers the model hosts are filters. So every call is reported
/// ([`Rule::FilterSetTopLevelIrp`]). The value is still stored, as Windows would store it, so the damage shows:
/// a callback that returns with it changed is also reported by [`thread::check_balanced`].
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-iosettoplevelirp>.
#[unsafe(no_mangle)]
pub extern "system" fn IoSetTopLevelIrp(irp: *const IRP) {
    const API: &str = "IoSetTopLevelIrp";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::DISPATCH, IOSETTOPLEVELIRP) {
            return;
        }
        verifier::report(
            Rule::FilterSetTopLevelIrp,
            API,
            format!("a filter set the top-level IRP to {:#x}; only file systems may call IoSetTopLevelIrp", irp.addr()),
        );
        thread::update(|t| t.top_level_irp = irp.addr());
    });
}
