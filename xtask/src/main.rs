//! `cargo xtask`: Shunt's build tasks.
//!
//! - `build-driver`: builds `shunt.sys` for x64 and ARM64 into `target/driver/<arch>/` (with its linker map);
//! - `package`: builds the drivers and `shuntctl.exe`, test-signs the drivers and writes `dist/shunt-<arch>/`;
//! - `ci`: everything CI checks, in order (formatting, lints for the host and both Windows targets, docs, the
//!   drivers and the package, then every test).

mod build;
mod ci;
mod package;
mod scripts;
mod sign;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Shunt's build tasks.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build shunt.sys for x64 and ARM64 into target/driver/{x64,arm64}/.
    BuildDriver,
    /// Build, test-sign and package the driver and shuntctl into dist/shunt-{x64,arm64}/.
    Package,
    /// Run every check CI runs: fmt, clippy (host, x64, ARM64), docs, drivers, package, tests.
    Ci,
}

/// The workspace root (the parent of this crate's directory).
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), std::path::Path::to_path_buf)
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::BuildDriver => build::drivers().map(drop),
        Task::Package => package::run(),
        Task::Ci => ci::run_all(),
    }
}
