//! The current IRQL, read the way the WDK headers read it: inline, never through an import.
//!
//! `KeGetCurrentIrql` is a forced-inline function in the WDK headers, not a call into the kernel
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-kegetcurrentirql>):
//! - on x64 it reads control register CR8, which holds the IRQL;
//! - on ARM64 there is no CR8: the IRQL is the `CurrentIrql` byte of the processor control region (KPCR), which
//!   kernel code reaches through platform register x18 (see `ARM64_KPCR_CURRENT_IRQL` in the ARM64 build).
//!
//! On hosts other than Windows the read is a call to `KeGetCurrentIrql`, which windows-sys declares and `fltsim`
//! exports, answering with the IRQL of the simulated kernel thread.

/// An interrupt request level.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Irql(pub u8);

impl Irql {
    /// `PASSIVE_LEVEL`: threads run here; every kernel API may be called.
    pub const PASSIVE: Self = Self(0);
    /// `APC_LEVEL`: all APCs are masked, so nothing that completes through an APC may be waited for.
    pub const APC: Self = Self(1);
    /// `DISPATCH_LEVEL`: no waiting and no paged memory.
    pub const DISPATCH: Self = Self(2);
}

/// The offset of `CurrentIrql` in the ARM64 KPCR, whose address is in x18 in kernel mode.
///
/// What this rests on (no copy of the ARM64 WDK header could be read here, so the evidence is indirect):
/// - the ARM64 KPCR overlays a 0x38-byte `NT_TIB` with `PVOID TibPad0[2]`, `Spare1`, `Self`, `PcrReserved0`,
///   `LockArray` and `Used_Self` (2×8 + 5×8 = 0x38), and `CurrentIrql` is the byte that follows, as the PDB-derived
///   KPCR layout and the `KPCR` page of the WDK reference (ntddk, ARM64 members) show;
/// - the kernel's own `nt!KeGetCurrentIrql` on ARM64 disassembles to `ldrb w0, [x18, #0x38]; ret`, and
///   `nt!KfRaiseIrql` reads and writes the same byte;
/// - on ARM64 the header declares `KeGetCurrentIrql` as an `NTHALAPI` function rather than an inline, and its export
///   from the kernel is not documented (only the x64 export from Windows 10 on is), so importing it is not an option
///   the issue allows or that we could rely on.
///
/// The read below is therefore the body of the kernel's own function, inlined.
#[cfg(all(windows, target_arch = "aarch64"))]
pub const ARM64_KPCR_CURRENT_IRQL: usize = 0x38;

/// The IRQL of the current processor.
///
/// Callable at any IRQL.
#[must_use]
#[inline]
pub fn current_irql() -> Irql {
    Irql(read_irql())
}

#[cfg(all(windows, target_arch = "x86_64"))]
#[inline]
fn read_irql() -> u8 {
    let cr8: u64;
    // SAFETY: reading CR8 has no side effects and is allowed in ring 0, where this driver runs.
    unsafe {
        core::arch::asm!("mov {}, cr8", out(reg) cr8, options(nomem, nostack, preserves_flags));
    }
    // CAST: CR8 holds the task priority class in its low four bits; the upper bits are reserved zero.
    #[expect(clippy::cast_possible_truncation, reason = "CR8 is at most 15")]
    let irql = cr8 as u8;
    irql
}

#[cfg(all(windows, target_arch = "aarch64"))]
#[inline]
fn read_irql() -> u8 {
    let irql: u8;
    // SAFETY: in kernel mode x18 always holds the address of the current processor's KPCR, which stays mapped;
    // reading one byte of it has no side effects.
    unsafe {
        core::arch::asm!(
            "ldrb {irql:w}, [x18, #{offset}]",
            irql = out(reg) irql,
            offset = const ARM64_KPCR_CURRENT_IRQL,
            options(readonly, nostack, preserves_flags)
        );
    }
    irql
}

#[cfg(not(windows))]
#[inline]
fn read_irql() -> u8 {
    // SAFETY: `KeGetCurrentIrql` takes no arguments; on this host fltsim exports it and answers for the current
    // simulated thread.
    unsafe { windows_sys::Wdk::System::SystemServices::KeGetCurrentIrql() }
}
