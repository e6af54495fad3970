//! The table of every routine the model exports: which module Windows exports it from, the rule the model
//! enforces, and the docs page both rest on. The import-coverage test checks this table against the symbols the
//! model really exports and against the imports of the built `shunt.sys`; fltsim's README lists the same rows.

/// One exported routine.
#[derive(Clone, Copy, Debug)]
pub struct Export {
    /// The symbol name.
    pub name: &'static str,
    /// The Windows module that exports it.
    pub module: &'static str,
    /// The highest IRQL at which it may be called, as the docs write it.
    pub max_irql: &'static str,
    /// What the model checks.
    pub rules: &'static str,
    /// The Microsoft docs page.
    pub docs: &'static str,
}

#[cfg(test)]
const DDI: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/";

macro_rules! export {
    ($name:literal, $module:literal, $irql:literal, $rules:literal, $page:literal) => {
        Export {
            name: $name,
            module: $module,
            max_irql: $irql,
            rules: $rules,
            docs: concat!("https://learn.microsoft.com/windows-hardware/drivers/ddi/", $page),
        }
        // Keep the prefix in one place: DDI below must match the literal above.
    };
}

/// Every exported routine.
pub const EXPORTS: &[Export] = &[
    export!(
        "KeGetCurrentIrql",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "answers the simulated thread's IRQL (Windows reads it inline)",
        "wdm/nf-wdm-kegetcurrentirql"
    ),
    export!(
        "ExAllocatePool2",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL (APC_LEVEL for paged)",
        "IRQL; non-zero size; non-zero printable tag; one pool type; zeroing; failure injection",
        "wdm/nf-wdm-exallocatepool2"
    ),
    export!(
        "ExFreePoolWithTag",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL (APC_LEVEL for paged)",
        "IRQL; double free; never allocated; tag mismatch",
        "wdm/nf-wdm-exfreepoolwithtag"
    ),
    export!(
        "KeBugCheckEx",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "records the stop code and ends the process",
        "wdm/nf-wdm-kebugcheckex"
    ),
    export!(
        "FltRegisterFilter",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; Size, Version, flags; operation table ends in IRP_MJ_OPERATION_END with valid codes; Instances key where the build reads it",
        "fltkernel/nf-fltkernel-fltregisterfilter"
    ),
    export!(
        "FltStartFiltering",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; a registered filter",
        "fltkernel/nf-fltkernel-fltstartfiltering"
    ),
    export!(
        "FltUnregisterFilter",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; a registered filter, unregistered once",
        "fltkernel/nf-fltkernel-fltunregisterfilter"
    ),
];

/// Imports of a `no_std` driver that are compiler support, not kernel services: the model cannot export these
/// names beside the host's C library, and does not need to (FLTMGR-CONTRACTS.md, "Imports that are not kernel
/// services").
pub const COMPILER_SUPPORT: &[&str] = &["memcpy", "memset", "memmove", "memcmp", "__C_specific_handler"];

/// The docs page of `name`, if the model exports it.
#[must_use]
pub fn docs(name: &str) -> Option<&'static str> {
    EXPORTS.iter().find(|e| e.name == name).map(|e| e.docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_export_cites_a_ddi_page_once() {
        let mut names: Vec<_> = EXPORTS.iter().map(|e| e.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EXPORTS.len(), "duplicate export rows");
        assert!(EXPORTS.iter().all(|e| e.docs.starts_with(DDI) && e.docs.len() > DDI.len()));
    }
}
