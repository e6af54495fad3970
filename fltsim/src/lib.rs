//! fltsim: a user-mode model of the NT kernel and Filter Manager that runs a minifilter's real code on any host.
//!
//! The model exports, as `#[no_mangle] extern "system"` functions, the kernel and Filter Manager routines a driver
//! imports. windows-sys declares those routines as plain external symbols on hosts other than Windows, so a driver
//! built for the host links against these exports unchanged. Each export enforces the documented rules of its DDI
//! the way Driver Verifier does: a broken rule becomes a [`verifier::Report`] naming the rule, the API, the
//! thread's IRQL and APC state and the Microsoft docs page, and the export answers as Windows would (or, where
//! Windows would bugcheck, as safely as the model can) instead of panicking across the `extern` boundary.
//!
//! Drivers are loaded through their `DriverEntry` function pointer ([`loader::load`]), so the same model runs
//! Shunt and small test filters, correct or deliberately wrong. A driver's statics cannot be re-initialised in one
//! process, so every scenario that loads a driver runs in its own process ([`isolate`]).
//!
//! Layout: [`kernel`] (threads, IRQL and APC state, pool, processes and tokens, system workers, events and push
//! locks, bugcheck), [`io`] (volumes, the model file system and the I/O manager), [`fltmgr`] (registration,
//! instances, operation dispatch, filter-initiated I/O), [`registry`] and [`inf`] (the service key a driver's INF
//! installs), [`loader`] (DriverEntry and unload), [`verifier`] (rules and reports), [`exports`] (the table of every
//! exported routine with its rule and docs page).

#![forbid(clippy::undocumented_unsafe_blocks, clippy::multiple_unsafe_ops_per_block)]

pub mod exports;
pub mod fltmgr;
pub mod inf;
pub mod io;
pub mod isolate;
pub mod kernel;
pub mod loader;
pub mod registry;
pub mod registry_api;
pub mod testfilters;
pub mod verifier;

mod guard;

pub use loader::{DriverEntryFn, LoadError, LoadedDriver, load};
pub use verifier::{Report, Rule};
