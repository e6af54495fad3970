//! `cargo xtask ci`: every check CI runs, in the order that fails fastest.

use std::process::Command;

use anyhow::Result;

use crate::{
    build::{ARCHES, run},
    workspace_root,
};

/// The crates that are built for Windows: the kernel crates and shuntctl.
const WINDOWS_CRATES: [&str; 3] = ["shunt-filter", "shunt-protocol", "shuntctl"];

fn cargo(args: &[&str]) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(workspace_root()).args(args);
    command
}

fn step(name: &str) {
    println!("\n=== xtask ci: {name}");
}

/// Runs every check: formatting, clippy for the host and both Windows targets, docs, the drivers and the
/// package, then every test of the workspace (which includes the PE, INF, signature and import-coverage tests
/// that read what the package step built).
///
/// # Errors
/// The first check that failed.
pub fn run_all() -> Result<()> {
    step("cargo fmt --check");
    run(&mut cargo(&["fmt", "--all", "--check"]))?;

    step("clippy (host)");
    run(&mut cargo(&["clippy", "--workspace", "--all-targets", "--locked", "--", "-D", "warnings"]))?;
    for arch in &ARCHES {
        step(&format!("clippy ({})", arch.driver_target));
        let mut args = vec!["clippy", "--locked", "--target", arch.driver_target];
        for krate in WINDOWS_CRATES {
            args.extend(["--package", krate]);
        }
        args.extend(["--", "-D", "warnings"]);
        run(&mut cargo(&args))?;
    }

    step("cargo doc");
    let mut doc = cargo(&["doc", "--workspace", "--no-deps", "--locked"]);
    doc.env("RUSTDOCFLAGS", "-D warnings");
    run(&mut doc)?;

    step("drivers and package");
    crate::package::run()?;

    step("tests");
    run(&mut cargo(&["test", "--workspace", "--locked"]))?;
    Ok(())
}
