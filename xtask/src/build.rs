//! Building `shunt.sys` with no WDK: `cargo rustc --crate-type cdylib` for the MSVC targets, linked by rust-lld
//! as a native kernel driver.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::workspace_root;

/// A Windows architecture Shunt ships for.
#[derive(Clone, Copy, Debug)]
pub struct Arch {
    /// The short name used in paths (`x64`, `arm64`).
    pub name: &'static str,
    /// The Rust target triple of the driver.
    pub driver_target: &'static str,
    /// The INF's platform decoration.
    pub inf_platform: &'static str,
}

/// Every architecture Shunt ships for.
pub const ARCHES: [Arch; 2] = [
    Arch { name: "x64", driver_target: "x86_64-pc-windows-msvc", inf_platform: "NTamd64" },
    Arch { name: "arm64", driver_target: "aarch64-pc-windows-msvc", inf_platform: "NTarm64" },
];

/// The link arguments that make the cdylib a kernel driver. They go to this one rustc invocation only (after
/// `--`), never to other crates built for a Windows target.
pub const DRIVER_LINK_ARGS: &[&str] = &[
    // A kernel-mode driver for the NT native subsystem (Windows 10 and later) whose entry point is DriverEntry.
    "/DRIVER",
    "/SUBSYSTEM:NATIVE,10.00",
    "/ENTRY:DriverEntry",
    // No C runtime and no default libraries: every import comes from ntoskrnl.exe, fltmgr.sys or hal.dll
    // through raw-dylib.
    "/NODEFAULTLIB",
    // Writes a valid PE checksum, which the kernel loader checks for drivers.
    "/RELEASE",
    // Relocatable and NX-compatible, as the kernel requires of drivers (HVCI, KASLR).
    "/DYNAMICBASE",
    "/NXCOMPAT",
    "/OPT:REF,ICF",
];

/// Where `build-driver` puts the driver of `arch`.
#[must_use]
pub fn driver_dir(arch: &Arch) -> PathBuf {
    workspace_root().join("target").join("driver").join(arch.name)
}

/// Runs a command, failing with its name when it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    let status = command.status().with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(workspace_root());
    command
}

/// Builds `shunt.sys` (and its `.map` and `.pdb`) for `arch` into [`driver_dir`].
///
/// # Errors
/// The build failed, or produced no image.
pub fn driver(arch: &Arch) -> Result<PathBuf> {
    let out = driver_dir(arch);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let map = out.join("shunt.map");
    let mut command = cargo();
    command.args(["rustc", "--package", "shunt-filter", "--lib", "--crate-type", "cdylib", "--release", "--target"]);
    command.arg(arch.driver_target).arg("--");
    for arg in DRIVER_LINK_ARGS {
        command.arg("-C").arg(format!("link-arg={arg}"));
    }
    command.arg("-C").arg(format!("link-arg=/MAP:{}", map.display()));
    run(&mut command)?;
    let built = workspace_root().join("target").join(arch.driver_target).join("release");
    for (from, to) in [("shunt.dll", "shunt.sys"), ("shunt.pdb", "shunt.pdb")] {
        let source = built.join(from);
        fs::copy(&source, out.join(to)).with_context(|| format!("copying {}", source.display()))?;
    }
    Ok(out.join("shunt.sys"))
}

/// Builds the driver for every architecture.
///
/// # Errors
/// Any build failed.
pub fn drivers() -> Result<Vec<PathBuf>> {
    ARCHES
        .iter()
        .map(|arch| {
            let path = driver(arch)?;
            let size = fs::metadata(&path).map_or(0, |m| m.len());
            println!("built {} ({size} bytes)", display(&path));
            Ok(path)
        })
        .collect()
}

/// A path relative to the workspace root, for messages.
#[must_use]
pub fn display(path: &Path) -> String {
    path.strip_prefix(workspace_root()).unwrap_or(path).display().to_string()
}
