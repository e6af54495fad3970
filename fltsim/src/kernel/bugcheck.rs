//! `KeBugCheckEx`: the end of the simulated system.

use crate::verifier::{self, Rule};

/// `KeBugCheckEx`: records the bugcheck, prints it and aborts the process, since a bugcheck never returns. Each
/// scenario runs in its own process ([`crate::isolate`]), so the test that caused it fails with this text.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-kebugcheckex>.
#[unsafe(no_mangle)]
pub extern "system" fn KeBugCheckEx(code: u32, p1: usize, p2: usize, p3: usize, p4: usize) {
    verifier::report(
        Rule::BugCheck,
        "KeBugCheckEx",
        format!("*** STOP {code:#010x} ({p1:#x}, {p2:#x}, {p3:#x}, {p4:#x})"),
    );
    std::process::abort();
}
