//! `shunt.sys`: a Filter Manager minifilter that redirects the I/O of policy-selected files to backing files.
//!
//! The crate is built two ways from the same source:
//! - for `x86_64-pc-windows-msvc` and `aarch64-pc-windows-msvc` as a kernel driver (`cargo xtask build-driver`),
//!   with the panic handler, the global allocator and the inline IRQL read of [`rt`];
//! - for any other host as an ordinary library whose kernel imports resolve to `fltsim`, the user-mode model of
//!   the NT kernel and Filter Manager, which loads the driver through [`DriverEntry`] and checks every rule it
//!   breaks.
//!
//! Layers, bottom up: [`wdk`] is the only module that calls raw windows-sys functions and turns them into owned,
//! safe types; [`callbacks`] holds one `extern "system"` trampoline per Filter Manager callback; [`driver`] is the
//! safe logic the trampolines call.
#![cfg_attr(not(test), no_std)]
#![forbid(clippy::undocumented_unsafe_blocks, clippy::multiple_unsafe_ops_per_block)]
// Kernel code never panics: a panic is a bugcheck. These lints keep the ways to panic out of the code.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]

extern crate alloc;

// On hosts other than Windows every kernel import of the driver resolves to an export of the model; naming the
// crate here makes sure it is linked into every binary that contains the driver.
#[cfg(not(windows))]
extern crate fltsim;

pub mod callbacks;
pub mod driver;
pub mod registration;
pub mod rt;
pub mod wdk;

pub use callbacks::DriverEntry;

/// The service name under `HKLM\SYSTEM\CurrentControlSet\Services`, which `shunt.inf` installs and
/// `fltmc load` takes.
pub const SERVICE_NAME: &str = "shunt";

/// The file name of the driver image, as `shunt.inf` copies it.
pub const IMAGE_NAME: &str = "shunt.sys";

/// The altitude `shunt.inf` gives the default instance: a placeholder inside the FSFilter Virtualization range
/// (130000–139999). A production build needs an altitude allocated by Microsoft.
pub const ALTITUDE: &str = "135710";
