//! `cargo xtask package`: test-signed driver packages in `dist/shunt-<arch>/`.
//!
//! Each package holds the test-signed `shunt.sys`, the test certificate's public part, `shunt.inf`,
//! `shuntctl.exe` when it can be built for the architecture, `install.cmd` / `uninstall.cmd` generated from the
//! INF (see [`crate::scripts`]) and a `README.txt`. Packages are written to a temporary directory and renamed into
//! place, so a failed run never leaves a half-written package behind.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{
    build::{self, ARCHES, Arch, display, driver_dir},
    scripts::{self, Service, ShuntctlNote, Target},
    sign::{CERTIFICATE_FILE, TestCertificate},
    workspace_root,
};

/// The Rust target of `shuntctl.exe` for x64: std links with mingw-w64's gcc (`.cargo/config.toml`).
const SHUNTCTL_X64_TARGET: &str = "x86_64-pc-windows-gnu";

/// The Rust target of `shuntctl.exe` for ARM64. No Debian package has an ARM64 Windows C runtime, and the MSVC
/// target needs the Windows SDK's import libraries; `zig` (Python package `ziglang`) ships the mingw-w64 sources
/// and builds the runtime itself, and `cargo-zigbuild` (Python package `cargo-zigbuild`) drives it as the linker.
const SHUNTCTL_ARM64_TARGET: &str = "aarch64-pc-windows-gnullvm";

/// How to get the ARM64 toolchain, for messages.
const ARM64_TOOLCHAIN_HINT: &str = "rustup target add aarch64-pc-windows-gnullvm && pip install ziglang cargo-zigbuild";

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(workspace_root());
    command
}

/// `%PROCESSOR_ARCHITECTURE%` in a native prompt of `arch`.
fn processor_architecture(arch: &Arch) -> Result<&'static str> {
    match arch.inf_platform {
        "NTamd64" => Ok("AMD64"),
        "NTarm64" => Ok("ARM64"),
        other => bail!("no Windows processor architecture known for the INF platform {other}"),
    }
}

/// Whether the ARM64 `shuntctl.exe` toolchain is here; `Err` says what is missing.
fn arm64_toolchain() -> Result<(), String> {
    let succeeds = |command: &mut Command| command.output().is_ok_and(|o| o.status.success());
    let mut libdir = Command::new("rustc");
    libdir.current_dir(workspace_root()).args(["--print", "target-libdir", "--target", SHUNTCTL_ARM64_TARGET]);
    let std_installed = libdir.output().ok().filter(|o| o.status.success()).is_some_and(|o| {
        let dir = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
        fs::read_dir(dir).is_ok_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("libstd-")))
        })
    });
    if !std_installed {
        return Err(format!("the Rust target {SHUNTCTL_ARM64_TARGET} is not installed"));
    }
    if !succeeds(Command::new("cargo-zigbuild").arg("--help")) {
        return Err("cargo-zigbuild is not installed".to_owned());
    }
    if !succeeds(Command::new("zig").arg("version"))
        && !succeeds(Command::new("python3").args(["-m", "ziglang", "version"]))
    {
        return Err("zig is not installed".to_owned());
    }
    Ok(())
}

/// Builds `shuntctl.exe` for `target` in release mode, returning the executable.
fn build_shuntctl(target: &str, zig: bool) -> Result<PathBuf> {
    let mut command = cargo();
    command.arg(if zig { "zigbuild" } else { "build" });
    command.args(["--package", "shuntctl", "--release", "--target", target]);
    build::run(&mut command).with_context(|| format!("building shuntctl.exe for {target}"))?;
    Ok(workspace_root().join("target").join(target).join("release").join("shuntctl.exe"))
}

/// `shuntctl.exe` for every architecture, or the reason it is not in that package.
fn build_shuntctls() -> Result<Vec<(Option<PathBuf>, ShuntctlNote)>> {
    ARCHES
        .iter()
        .map(|arch| match arch.inf_platform {
            "NTamd64" => Ok((
                Some(build_shuntctl(SHUNTCTL_X64_TARGET, false)?),
                ShuntctlNote::Built { target: SHUNTCTL_X64_TARGET.to_owned() },
            )),
            "NTarm64" => match arm64_toolchain() {
                Ok(()) => Ok((
                    Some(build_shuntctl(SHUNTCTL_ARM64_TARGET, true)?),
                    ShuntctlNote::Built { target: SHUNTCTL_ARM64_TARGET.to_owned() },
                )),
                Err(missing) => {
                    println!(
                        "warning: dist/shunt-{}/ gets no shuntctl.exe: {missing} (to build it: {ARM64_TOOLCHAIN_HINT})",
                        arch.name
                    );
                    let reason = format!(
                        "It was packaged on a machine without an ARM64 Windows toolchain for user-mode Rust \
                         ({missing}). It is built with the Rust target {SHUNTCTL_ARM64_TARGET} and zig as the linker; \
                         to get it, run: {ARM64_TOOLCHAIN_HINT} and then cargo xtask package."
                    );
                    Ok((None, ShuntctlNote::Omitted { reason }))
                }
            },
            other => bail!("no shuntctl.exe target known for the INF platform {other}"),
        })
        .collect()
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to).with_context(|| format!("copying {} to {}", display(from), display(to)))?;
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", display(path)))
}

/// Everything a package is made of, shared by the architectures.
struct Inputs {
    inf: PathBuf,
    service: Service,
    certificate: TestCertificate,
}

/// Writes `dist/shunt-<arch>/`.
fn write_package(inputs: &Inputs, arch: &Arch, shuntctl: Option<&Path>, note: &ShuntctlNote) -> Result<PathBuf> {
    let dist = workspace_root().join("dist");
    let final_dir = dist.join(format!("shunt-{}", arch.name));
    let staging = dist.join(format!(".shunt-{}.partial", arch.name));
    if staging.exists() {
        fs::remove_dir_all(&staging).with_context(|| format!("removing {}", display(&staging)))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", display(&staging)))?;

    let service = &inputs.service;
    let driver = driver_dir(arch).join(&service.image);
    inputs.certificate.sign(&driver, &staging.join(&service.image))?;
    copy(&inputs.certificate.der, &staging.join(CERTIFICATE_FILE))?;
    copy(&inputs.inf, &staging.join("shunt.inf"))?;
    if let Some(exe) = shuntctl {
        copy(exe, &staging.join("shuntctl.exe"))?;
    }
    let target = Target { arch: arch.name, processor_architecture: processor_architecture(arch)? };
    write(&staging.join("install.cmd"), &scripts::install_cmd(service, target, CERTIFICATE_FILE)?)?;
    write(&staging.join("uninstall.cmd"), &scripts::uninstall_cmd(service, &inputs.certificate.thumbprint))?;
    write(&staging.join("README.txt"), &scripts::readme(service, target, CERTIFICATE_FILE, note)?)?;

    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).with_context(|| format!("removing the old {}", display(&final_dir)))?;
    }
    fs::rename(&staging, &final_dir).with_context(|| format!("moving the package to {}", display(&final_dir)))?;
    Ok(final_dir)
}

/// Builds the drivers and `shuntctl.exe`, test-signs the drivers and writes `dist/shunt-<arch>/`.
///
/// # Errors
/// Any step failed: a build, openssl or osslsigncode (missing or failing), an INF the scripts cannot be generated
/// from, or writing `dist/`.
pub fn run() -> Result<()> {
    build::drivers()?;
    let started = Instant::now();
    let inf = workspace_root().join("inf").join("shunt.inf");
    let text = fs::read_to_string(&inf).with_context(|| format!("reading {}", display(&inf)))?;
    let service =
        Service::from_inf(&text).with_context(|| format!("{}: cannot generate the install scripts", display(&inf)))?;
    let certificate = TestCertificate::ensure()?;
    let shuntctls = build_shuntctls()?;
    let inputs = Inputs { inf, service, certificate };
    for (arch, (exe, note)) in ARCHES.iter().zip(&shuntctls) {
        let dir = write_package(&inputs, arch, exe.as_deref(), note)?;
        println!("packaged {}", display(&dir));
    }
    println!(
        "test certificate {} (SHA-1 {}); packaging took {:.1?}",
        display(&inputs.certificate.der),
        inputs.certificate.thumbprint,
        started.elapsed()
    );
    Ok(())
}
