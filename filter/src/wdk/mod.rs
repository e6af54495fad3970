//! The thin layer of safe wrappers over the raw windows-sys kernel and Filter Manager functions.
//!
//! Nothing outside this module calls a windows-sys function or dereferences a raw pointer handed over by the
//! kernel. Every wrapper states the IRQL at which it may be called and links the Microsoft docs page of the DDI it
//! wraps; `fltsim`'s export of the same DDI enforces the same rule and cites the same page.

pub mod flt;
pub mod irql;
pub mod pool;
pub mod status;

pub use flt::{DriverObject, Filter};
pub use irql::{Irql, current_irql};
pub use pool::{PoolBox, PoolTag};
pub use status::{NtResult, NtStatus};
