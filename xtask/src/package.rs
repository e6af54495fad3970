//! `cargo xtask package`: test-signed driver packages in `dist/`.

use anyhow::Result;

/// Builds and writes `dist/shunt-<arch>/`.
///
/// # Errors
/// Any step failed.
pub fn run() -> Result<()> {
    crate::build::drivers()?;
    Ok(())
}
