//! `cargo xtask ci`: every check CI runs.

use anyhow::Result;

/// Runs every check.
///
/// # Errors
/// The first check that failed.
pub fn run() -> Result<()> {
    crate::package::run()
}
