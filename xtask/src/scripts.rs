//! The package's `install.cmd`, `uninstall.cmd` and `README.txt`, generated from what `inf/shunt.inf` installs.
//!
//! The INF is the one source of truth: [`Service::from_inf`] installs it with fltsim's INF model for every
//! architecture and for Windows builds before and from 24H2, and the scripts write exactly the service and
//! registry values those installs write. A test (`tests/tests/inf.rs`) checks the result against the driver's
//! constants, so the INF, the driver and the scripts cannot drift apart.

use std::fmt::Write as _;

use anyhow::{Context, Result, anyhow, bail, ensure};
use fltsim::inf::{Inf, RegValue, ServiceInstall};

use crate::build::ARCHES;

/// A Windows build before 24H2 (Windows 10 2004, the oldest Shunt supports): Filter Manager reads the instances
/// directly under the service key.
pub const LEGACY_BUILD: u32 = 19041;

/// Windows 11 24H2: Filter Manager reads the instances under the service key's `Parameters` subkey.
pub const PARAMETERS_BUILD: u32 = 26100;

/// The service key every registry path is relative to, without the service name.
pub const SERVICES_KEY: &str = r"HKLM\SYSTEM\CurrentControlSet\Services";

/// A registry value the INF writes, relative to the service key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryValue {
    /// The subkey of the service key ("" for the key itself).
    pub subkey: String,
    /// The value name.
    pub name: String,
    /// The data.
    pub value: RegValue,
}

/// The service `inf/shunt.inf` installs, as every one of its install sections agrees it is.
#[derive(Clone, Debug)]
pub struct Service {
    /// The service name (`sc`, `fltmc`).
    pub name: String,
    /// `DisplayName`.
    pub display_name: String,
    /// `Description`.
    pub description: String,
    /// The file name of the driver image (`ServiceBinary` without its directory).
    pub image: String,
    /// `ServiceType`.
    pub kind: u32,
    /// `StartType`.
    pub start: u32,
    /// `ErrorControl`.
    pub error_control: u32,
    /// `LoadOrderGroup`.
    pub group: String,
    /// `Dependencies`.
    pub dependencies: Vec<String>,
    /// The instance `DefaultInstance` names.
    pub default_instance: String,
    /// That instance's `Altitude`.
    pub altitude: String,
    /// That instance's `Flags`.
    pub flags: u32,
    /// Every registry value any of the install sections writes, in INF order, each once: the legacy and the 24H2
    /// locations both.
    pub values: Vec<RegistryValue>,
}

fn dword(install: &ServiceInstall, name: &str) -> Result<u32> {
    match install.service_values.get(name) {
        Some(RegValue::Dword(n)) => Ok(*n),
        other => bail!("the service's {name} is {other:?}, not a number"),
    }
}

fn string_value<'a>(install: &'a ServiceInstall, name: &str) -> Result<&'a str> {
    match install.service_values.get(name) {
        Some(RegValue::Sz(s)) => Ok(s),
        other => bail!("the service's {name} is {other:?}, not a string"),
    }
}

/// The `ServiceInstall` section that `AddService` names in the `DefaultInstall.Services` section chosen for
/// `platform` on `build`.
fn service_section(inf: &Inf, platform: &str, build: u32) -> Option<String> {
    let install = inf.decorated_section("DefaultInstall", platform, build)?;
    let services = inf.section(&format!("{install}.Services"))?;
    services
        .iter()
        .find(|e| e.key.as_deref().is_some_and(|k| k.eq_ignore_ascii_case("AddService")))
        .map(|e| e.value(2).to_owned())
}

/// The default instance one install writes: (its name, its altitude, its flags).
fn find_default_instance(install: &ServiceInstall) -> Result<(String, String, u32)> {
    let mut defaults = install.values.iter().filter(|(_, name, _)| name.eq_ignore_ascii_case("DefaultInstance"));
    let Some((instances, _, RegValue::Sz(instance))) = defaults.next() else {
        bail!("writes no DefaultInstance string value");
    };
    ensure!(defaults.next().is_none(), "writes DefaultInstance more than once");
    let key = format!(r"{instances}\{instance}");
    let find = |name: &str| {
        install
            .values
            .iter()
            .find(|(k, n, _)| k.eq_ignore_ascii_case(&key) && n.eq_ignore_ascii_case(name))
            .map(|(_, _, v)| v)
    };
    let Some(RegValue::Sz(altitude)) = find("Altitude") else {
        bail!("DefaultInstance names {instance:?}, but {key} has no Altitude string value");
    };
    let Some(RegValue::Dword(flags)) = find("Flags") else {
        bail!("DefaultInstance names {instance:?}, but {key} has no Flags number");
    };
    Ok((instance.clone(), altitude.clone(), *flags))
}

/// A string that is put between double quotes in a script: no quote, no `%` (cmd would expand it), no control
/// character, and no trailing backslash (it would escape the closing quote for `reg`).
fn check_quotable(what: &str, value: &str) -> Result<()> {
    ensure!(
        !value.is_empty()
            && !value.contains(['"', '%'])
            && !value.chars().any(char::is_control)
            && !value.ends_with('\\'),
        "{what} {value:?} cannot be written into a .cmd script: it must be non-empty, without quotes, % or \
         control characters, and must not end with a backslash"
    );
    Ok(())
}

/// A word that is used unquoted in a script (the service and image names).
fn check_word(what: &str, value: &str) -> Result<()> {
    ensure!(
        !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)),
        "{what} {value:?} must be ASCII letters, digits, '_', '-' or '.' to be used in a .cmd script"
    );
    Ok(())
}

impl Service {
    /// Reads the service from the INF's text by installing it, with fltsim's model, for every architecture on a
    /// Windows build before 24H2 and on 24H2.
    ///
    /// # Errors
    /// The INF does not parse or install, its install sections disagree about the service, or a value cannot be
    /// written safely into a .cmd script.
    pub fn from_inf(text: &str) -> Result<Self> {
        let inf = Inf::parse(text).map_err(|e| anyhow!("{e}"))?;
        ensure!(
            inf.unresolved_tokens().is_empty(),
            "%tokens% that [Strings] does not define: {:?}",
            inf.unresolved_tokens()
        );
        let mut installs = Vec::new();
        for arch in &ARCHES {
            for build in [LEGACY_BUILD, PARAMETERS_BUILD] {
                let install = inf
                    .install_service(arch.inf_platform, build)
                    .map_err(|e| anyhow!("installing for {} on build {build}: {e}", arch.inf_platform))?;
                let section = service_section(&inf, arch.inf_platform, build)
                    .with_context(|| format!("no AddService for {} on build {build}", arch.inf_platform))?;
                installs.push((format!("{} on build {build}", arch.inf_platform), section, install));
            }
        }
        let (first_name, first_section, first) = installs.first().context("no architectures")?;
        let display_name = inf.value(first_section, "DisplayName").unwrap_or_default().to_owned();
        let description = inf.value(first_section, "Description").unwrap_or_default().to_owned();
        let (default_instance, altitude, flags) =
            find_default_instance(first).with_context(|| format!("the install for {first_name}"))?;
        let mut values: Vec<RegistryValue> = Vec::new();
        for (name, section, install) in &installs {
            ensure!(
                install.name == first.name && install.service_values == first.service_values,
                "the install for {name} creates a different service than the install for {first_name}: every \
                 install section must create the same service"
            );
            ensure!(
                inf.value(section, "DisplayName").unwrap_or_default() == display_name
                    && inf.value(section, "Description").unwrap_or_default() == description,
                "[{section}] has a different DisplayName or Description than [{first_section}]"
            );
            let (instance, instance_altitude, instance_flags) =
                find_default_instance(install).with_context(|| format!("the install for {name}"))?;
            ensure!(
                (&instance, &instance_altitude, instance_flags) == (&default_instance, &altitude, flags),
                "the install for {name} configures a different default instance than the install for {first_name}"
            );
            for (subkey, value_name, value) in &install.values {
                let value = RegistryValue { subkey: subkey.clone(), name: value_name.clone(), value: value.clone() };
                if !values.contains(&value) {
                    values.push(value);
                }
            }
        }
        let image_path = string_value(first, "ImagePath")?;
        let image = image_path.rsplit('\\').next().unwrap_or(image_path).to_owned();
        let dependencies = match first.service_values.get("DependOnService") {
            Some(RegValue::MultiSz(names)) => names.clone(),
            _ => Vec::new(),
        };
        let service = Self {
            name: first.name.clone(),
            display_name,
            description,
            image,
            kind: dword(first, "Type")?,
            start: dword(first, "Start")?,
            error_control: dword(first, "ErrorControl")?,
            group: string_value(first, "Group")?.to_owned(),
            dependencies,
            default_instance,
            altitude,
            flags,
            values,
        };
        service.check_scriptable()?;
        Ok(service)
    }

    fn check_scriptable(&self) -> Result<()> {
        check_word("the service name", &self.name)?;
        check_word("the driver image name", &self.image)?;
        check_quotable("the display name", &self.display_name)?;
        check_quotable("the description", &self.description)?;
        check_quotable("the load order group", &self.group)?;
        for dependency in &self.dependencies {
            check_word("the dependency", dependency)?;
        }
        for value in &self.values {
            if !value.subkey.is_empty() {
                check_quotable("the registry key", &value.subkey)?;
            }
            check_quotable("the registry value name", &value.name)?;
            match &value.value {
                RegValue::Sz(s) => check_quotable("the registry value", s)?,
                RegValue::MultiSz(items) => {
                    for item in items {
                        check_quotable("the registry value", item)?;
                    }
                }
                RegValue::Dword(_) => {}
            }
        }
        Ok(())
    }

    /// `sc create`'s `type=` for the INF's `ServiceType`.
    fn sc_type(&self) -> Result<&'static str> {
        match self.kind {
            1 => Ok("kernel"),
            2 => Ok("filesys"),
            other => bail!("ServiceType {other} is not a driver (1 or 2)"),
        }
    }

    /// `sc create`'s `start=` for the INF's `StartType`.
    fn sc_start(&self) -> Result<&'static str> {
        ["boot", "system", "auto", "demand", "disabled"]
            .get(usize::try_from(self.start)?)
            .copied()
            .with_context(|| format!("StartType {} is not 0 to 4", self.start))
    }

    /// `sc create`'s `error=` for the INF's `ErrorControl`.
    fn sc_error(&self) -> Result<&'static str> {
        ["ignore", "normal", "severe", "critical"]
            .get(usize::try_from(self.error_control)?)
            .copied()
            .with_context(|| format!("ErrorControl {} is not 0 to 3", self.error_control))
    }

    /// The service's key.
    #[must_use]
    pub fn key(&self) -> String {
        format!(r"{SERVICES_KEY}\{}", self.name)
    }

    /// Where install.cmd copies the driver, relative to `%SystemRoot%` (the service's `ImagePath`).
    #[must_use]
    pub fn image_path(&self) -> String {
        format!(r"System32\drivers\{}", self.image)
    }

    /// The `sc create` command line.
    ///
    /// # Errors
    /// The INF's type, start or error-control value has no `sc` equivalent.
    pub fn sc_create(&self) -> Result<String> {
        let mut line = format!(
            "sc create {} type= {} start= {} error= {} binPath= {} group= \"{}\"",
            self.name,
            self.sc_type()?,
            self.sc_start()?,
            self.sc_error()?,
            self.image_path(),
            self.group
        );
        if !self.dependencies.is_empty() {
            write!(line, " depend= {}", self.dependencies.join("/"))?;
        }
        write!(line, " DisplayName= \"{}\"", self.display_name)?;
        Ok(line)
    }

    /// The `reg add` command that writes `value`.
    #[must_use]
    pub fn reg_add(&self, value: &RegistryValue) -> String {
        let mut key = self.key();
        if !value.subkey.is_empty() {
            key.push('\\');
            key.push_str(&value.subkey);
        }
        let data = match &value.value {
            RegValue::Sz(s) => format!("/t REG_SZ /d \"{s}\""),
            RegValue::Dword(n) => format!("/t REG_DWORD /d {n}"),
            RegValue::MultiSz(items) => format!("/t REG_MULTI_SZ /d \"{}\"", items.join("\\0")),
        };
        format!("reg add \"{key}\" /v \"{}\" {data} /f", value.name)
    }

    /// The distinct subkeys that hold `DefaultInstance` (`Instances` and `Parameters\Instances`).
    #[must_use]
    pub fn instances_keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = Vec::new();
        for value in &self.values {
            if value.name.eq_ignore_ascii_case("DefaultInstance") && !keys.contains(&value.subkey.as_str()) {
                keys.push(&value.subkey);
            }
        }
        keys
    }
}

/// What the package says about the architecture it is for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The package's architecture name (`x64`, `arm64`).
    pub arch: &'a str,
    /// `%PROCESSOR_ARCHITECTURE%` of a native prompt on that architecture (`AMD64`, `ARM64`).
    pub processor_architecture: &'a str,
}

/// A .cmd script under construction: lines joined with CRLF, as cmd.exe expects.
#[derive(Default)]
struct Script {
    lines: Vec<String>,
    failures: Vec<(String, Vec<String>)>,
}

impl Script {
    fn line(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    /// `if errorlevel 1 goto :label`: the preceding command's failure ends the script with `message`.
    fn or_fail(&mut self, label: &str, message: &[&str]) {
        self.line(format!("if errorlevel 1 goto :{label}"));
        self.fail_label(label, message);
    }

    /// Defines a failure label (once) printing `message` to standard error.
    fn fail_label(&mut self, label: &str, message: &[&str]) {
        if !self.failures.iter().any(|(l, _)| l == label) {
            self.failures.push((label.to_owned(), message.iter().map(|&m| m.to_owned()).collect()));
        }
    }

    /// The text, each failure label after the main flow with its own non-zero exit code.
    fn finish(mut self, name: &str) -> String {
        let failures = std::mem::take(&mut self.failures);
        for (code, (label, message)) in failures.into_iter().enumerate() {
            self.line("");
            self.line(format!(":{label}"));
            for line in message {
                self.line(format!(">&2 echo {name}: {line}"));
            }
            self.line(format!("exit /b {}", code + 1));
        }
        let mut text = self.lines.join("\r\n");
        text.push_str("\r\n");
        text
    }
}

/// The message for a script run without administrator rights.
const NOT_ELEVATED: [&str; 2] =
    ["this script needs administrator rights.", "Open Command Prompt with Run as administrator and run it again."];

/// `install.cmd`'s checks, which come before it changes anything: elevation, the architecture, test signing, the
/// package's files and no earlier installation.
fn install_checks(s: &mut Script, service: &Service, target: Target<'_>, certificate: &str) {
    let (name, image, arch) = (&service.name, &service.image, target.processor_architecture);
    s.line("rem Administrator rights: net session succeeds only in an elevated prompt.");
    s.line("net session >nul 2>&1");
    s.or_fail("not_elevated", &NOT_ELEVATED);
    s.line("");
    s.line("rem A native prompt of the package's architecture: a 32-bit prompt sees SysWOW64 as System32.");
    s.line("if defined PROCESSOR_ARCHITEW6432 goto :wrong_prompt");
    s.fail_label(
        "wrong_prompt",
        &["this is a 32-bit Command Prompt. Run install.cmd from the 64-bit one, %SystemRoot%\\System32\\cmd.exe."],
    );
    s.line(format!("if /i not \"%PROCESSOR_ARCHITECTURE%\"==\"{arch}\" goto :wrong_architecture"));
    let other = if target.arch == "arm64" { "x64" } else { "arm64" };
    let wrong_arch = format!(
        "this package is for {arch} Windows, but this machine is %PROCESSOR_ARCHITECTURE%. \
         Use the shunt-{other} package."
    );
    s.fail_label("wrong_architecture", &[&wrong_arch]);
    s.line("");
    s.line("rem Test signing in the running system: bcdedit /set testsigning on takes effect after a reboot.");
    s.line(
        "reg query \"HKLM\\SYSTEM\\CurrentControlSet\\Control\" /v SystemStartOptions 2>nul \
         | findstr /i /c:\"TESTSIGNING\" >nul",
    );
    s.line("if errorlevel 1 goto :no_testsigning");
    s.line("");
    s.line("rem The package's files, next to this script.");
    for file in [image.as_str(), certificate] {
        s.line(format!("if not exist \"{file}\" goto :missing_files"));
    }
    let missing = format!("{image} or {certificate} is missing next to install.cmd. Unpack the whole package folder.");
    s.fail_label("missing_files", &[&missing]);
    s.line("");
    s.line("rem An existing service would keep its old configuration: uninstall first.");
    s.line(format!("sc query {name} >nul 2>&1"));
    s.line("if not errorlevel 1 goto :already_installed");
    let installed = format!("the service {name} exists already. Run uninstall.cmd first, then install.cmd again.");
    s.fail_label("already_installed", &[&installed]);
}

/// `install.cmd`'s changes: trust the certificate, copy the driver, create the service, write its registry
/// values, load the filter.
fn install_steps(s: &mut Script, service: &Service, certificate: &str) -> Result<()> {
    let (name, image) = (&service.name, &service.image);
    s.line(format!("echo Trusting the test certificate {certificate}: Root and TrustedPublisher stores..."));
    for store in ["Root", "TrustedPublisher"] {
        s.line(format!("certutil -addstore -f {store} \"{certificate}\""));
        s.or_fail("certificate_failed", &["certutil could not add the test certificate; its error is above."]);
    }
    s.line("");
    s.line(format!("echo Copying {image} to %SystemRoot%\\System32\\drivers..."));
    s.line(format!("copy /y \"{image}\" \"%SystemRoot%\\{}\" >nul", service.image_path()));
    let copy = format!(
        "copying {image} to %SystemRoot%\\System32\\drivers failed. \
         If an older {image} is loaded, run uninstall.cmd first."
    );
    s.or_fail("copy_failed", &[&copy]);
    s.line("");
    s.line(format!("echo Creating the service {name}..."));
    s.line(service.sc_create()?);
    let sc_failed = "sc could not create or describe the service; its error is above. Run uninstall.cmd to clean up.";
    s.or_fail("service_failed", &[sc_failed]);
    s.line(format!("sc description {name} \"{}\" >nul", service.description));
    s.or_fail("service_failed", &[sc_failed]);
    s.line("");
    let keys = service.instances_keys().join(" and ");
    s.line(format!("echo Writing the instance configuration under {keys}..."));
    s.line("rem Windows before 11 24H2 reads the instances under the service key, 24H2 and later under Parameters:");
    s.line("rem both are written, as the INF's two install sections would, since an unread copy is harmless.");
    for value in &service.values {
        s.line(format!("{} >nul", service.reg_add(value)));
        s.or_fail(
            "registry_failed",
            &["reg could not write the service's instance keys; its error is above. Run uninstall.cmd to clean up."],
        );
    }
    s.line("");
    s.line("echo Loading the filter...");
    s.line(format!("fltmc load {name}"));
    s.or_fail(
        "load_failed",
        &[
            "fltmc load failed; its error is above. 0x80070241 means Windows did not accept the signature:",
            "is test signing on, and is Secure Boot off? Details are in the System event log.",
            "Run uninstall.cmd to remove what this script installed.",
        ],
    );
    Ok(())
}

/// `:no_testsigning`: tells a machine that needs only a reboot from one where test signing is off.
fn testsigning_diagnosis(s: &mut Script) {
    s.line(":no_testsigning");
    s.line("rem Set for the next boot only? Then a reboot is all that is missing.");
    s.line("bcdedit /enum {current} 2>nul | findstr /i /r /c:\"^testsigning  *Yes\" >nul");
    s.line("if not errorlevel 1 goto :testsigning_pending");
    s.fail_label(
        "testsigning_off",
        &[
            "test signing is off, so Windows would refuse the test-signed driver.",
            "Turn Secure Boot off in the firmware, run: bcdedit /set testsigning on",
            "then reboot and run install.cmd again.",
        ],
    );
    s.line("goto :testsigning_off");
    s.fail_label(
        "testsigning_pending",
        &["test signing is set for the next boot but not active yet. Reboot, then run install.cmd again."],
    );
}

/// `install.cmd`: installs and loads the driver on a test-signing machine without a catalog, as the INF would.
///
/// # Errors
/// The service cannot be expressed as `sc` arguments.
pub fn install_cmd(service: &Service, target: Target<'_>, certificate: &str) -> Result<String> {
    let (name, image, arch) = (&service.name, &service.image, target.processor_architecture);
    let mut s = Script::default();
    s.line("@echo off");
    s.line(format!(
        "rem install.cmd: installs and loads the test-signed Shunt minifilter ({image}) on {arch} Windows without"
    ));
    s.line("rem a catalog. It does by hand what installing shunt.inf does: it trusts the test certificate, copies");
    s.line("rem the driver, creates the service and writes the instance keys, then loads the filter with fltmc.");
    s.line("rem Generated by cargo xtask package from inf/shunt.inf: do not edit, change the INF and package again.");
    s.line("rem Run it from an elevated Command Prompt on a machine booted with test signing on.");
    s.line("setlocal EnableExtensions DisableDelayedExpansion");
    s.line("cd /d \"%~dp0\"");
    s.line("");
    install_checks(&mut s, service, target, certificate);
    s.line("");
    install_steps(&mut s, service, certificate)?;
    s.line("");
    s.line("echo.");
    s.line(format!("echo Shunt is installed and loaded at altitude {}.", service.altitude));
    s.line(format!("echo Check it with: fltmc filters, and fltmc instances -f {name}"));
    s.line(format!("echo Unload it with: fltmc unload {name}. Remove it with uninstall.cmd."));
    s.line("exit /b 0");
    s.line("");
    testsigning_diagnosis(&mut s);
    Ok(s.finish("install.cmd"))
}

/// `uninstall.cmd`: unloads the filter (not loaded is fine), deletes the service and the driver file, and removes
/// the test certificate from the stores unless `/keepcert` is given.
#[must_use]
pub fn uninstall_cmd(service: &Service, thumbprint: &str) -> String {
    let name = &service.name;
    let image = &service.image;
    let mut s = Script::default();
    s.line("@echo off");
    s.line("rem uninstall.cmd: unloads the Shunt minifilter, deletes its service and driver file and, unless");
    s.line("rem /keepcert is given, removes the package's test certificate from the Root and TrustedPublisher stores.");
    s.line("rem Generated by cargo xtask package from inf/shunt.inf: do not edit, change the INF and package again.");
    s.line("setlocal EnableExtensions DisableDelayedExpansion");
    s.line("cd /d \"%~dp0\"");
    s.line("set \"KEEP_CERT=\"");
    s.line("if /i \"%~1\"==\"/keepcert\" set \"KEEP_CERT=1\"");
    s.line("");
    s.line("net session >nul 2>&1");
    s.or_fail("not_elevated", &NOT_ELEVATED);
    s.line("");
    s.line("rem Unload, if loaded: a filter that is not loaded is what we want anyway.");
    s.line(format!("fltmc filters 2>nul | findstr /i /b /c:\"{name} \" >nul"));
    s.line("if errorlevel 1 goto :unloaded");
    s.line("echo Unloading the filter...");
    s.line(format!("fltmc unload {name}"));
    let refused =
        format!("fltmc unload {name} failed; its error is above. Shunt refuses to unload while files are redirected:");
    let force = format!("close the programs using them, or force a mandatory unload with: sc stop {name}");
    s.or_fail("unload_failed", &[&refused, &force]);
    s.line(":unloaded");
    s.line("");
    s.line(format!("sc query {name} >nul 2>&1"));
    s.line("if errorlevel 1 goto :no_service");
    s.line(format!("echo Deleting the service {name}..."));
    s.line(format!("sc delete {name}"));
    s.or_fail(
        "delete_failed",
        &["sc could not delete the service; its error is above. If it is marked for deletion, reboot."],
    );
    s.line(":no_service");
    s.line("");
    let driver = format!("%SystemRoot%\\{}", service.image_path());
    s.line(format!("if exist \"{driver}\" del /f /q \"{driver}\""));
    s.line(format!("if exist \"{driver}\" goto :file_in_use"));
    let in_use =
        format!("{driver} could not be deleted: the driver may still be loaded. Reboot, then run uninstall.cmd again.");
    s.fail_label("file_in_use", &[&in_use]);
    s.line("");
    s.line("if defined KEEP_CERT goto :done");
    s.line("echo Removing the test certificate from the Root and TrustedPublisher stores...");
    s.line("rem Removed by thumbprint, so no other certificate is touched; one that is not there is fine.");
    for store in ["Root", "TrustedPublisher"] {
        s.line(format!("certutil -delstore {store} {thumbprint} >nul 2>&1"));
    }
    s.line(":done");
    s.line(format!("echo Shunt is uninstalled: {image} and the service {name} are gone."));
    s.line("exit /b 0");
    s.finish("uninstall.cmd")
}

/// How `shuntctl.exe` came to be in a package, or why it is not.
#[derive(Clone, Debug)]
pub enum ShuntctlNote {
    /// Built for the package's architecture with this Rust target.
    Built {
        /// The Rust target triple.
        target: String,
    },
    /// Not built; the text says why and how to get it.
    Omitted {
        /// Why, in a sentence or two.
        reason: String,
    },
}

/// `text` broken into lines of at most `width` columns (longer words stay whole), each starting with `indent`.
fn wrap(text: &str, indent: &str, width: usize) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent.len() + line.len() + 1 + word.len() > width {
            lines.push(format!("{indent}{}", std::mem::take(&mut line)));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        lines.push(format!("{indent}{line}"));
    }
    lines.join("\n")
}

/// `README.txt` of a package.
///
/// # Errors
/// The service cannot be expressed as `sc` arguments.
pub fn readme(service: &Service, target: Target<'_>, certificate: &str, shuntctl: &ShuntctlNote) -> Result<String> {
    let name = &service.name;
    let image = &service.image;
    let arch = target.arch;
    let keys = service.instances_keys().iter().map(|k| format!(r"{}\{k}", service.key())).collect::<Vec<_>>();
    let mut text = format!(
        "Shunt {version} for {arch} Windows ({processor}) - TEST-SIGNED, NOT FOR PRODUCTION
=====================================================================

Shunt is a file-system minifilter that redirects the I/O of selected files to backing files.
This package is signed with a self-signed test certificate: Windows loads it only with test signing on.
Everything here was cross-built and signed on Linux by cargo xtask package; none of it was run there.

Files
",
        version = env!("CARGO_PKG_VERSION"),
        processor = target.processor_architecture,
    );
    let mut files = vec![
        (image.clone(), "the driver, test-signed (Authenticode, SHA-256)".to_owned()),
        (certificate.to_owned(), "the test certificate's public part (DER)".to_owned()),
        ("shunt.inf".to_owned(), "the INF, for a catalog-signed driver-store install".to_owned()),
        ("install.cmd".to_owned(), "installs and loads the driver without a catalog".to_owned()),
        ("uninstall.cmd".to_owned(), "unloads and removes it".to_owned()),
    ];
    if let ShuntctlNote::Built { target } = shuntctl {
        files.push(("shuntctl.exe".to_owned(), format!("the control tool (Rust target {target})")));
    }
    for (file, what) in files {
        let _ = writeln!(text, "  {file:<18} {what}");
    }
    if let ShuntctlNote::Omitted { .. } = shuntctl {
        let _ = writeln!(text, "  (no shuntctl.exe: see the end of this file)");
    }
    let _ = write!(
        text,
        "
1. Turn test signing on (once; Secure Boot must be off in the firmware), from an elevated prompt:
       bcdedit /set testsigning on
   and reboot. The desktop then shows \"Test Mode\".

2. From an elevated Command Prompt in this folder:
       install.cmd
   It checks for administrator rights, test signing and the architecture, trusts {certificate}
   (certutil -addstore Root and TrustedPublisher), copies {image} to %SystemRoot%\\System32\\drivers,
   creates the service {name} (type= {kind}, group \"{group}\", depends on {dependencies}), writes
   DefaultInstance = \"{instance}\" with Altitude {altitude} and Flags {flags} under both
       {keys}
   (Windows before 11 24H2 reads the first, 24H2 and later the second) and runs: fltmc load {name}

3. Check it:
       fltmc filters
       fltmc instances -f {name}

4. Unload it (refused while files are redirected; sc stop {name} forces it):
       fltmc unload {name}
   and load it again with: fltmc load {name}

5. Remove it, with the test certificate (add /keepcert to keep the certificate trusted):
       uninstall.cmd

A catalog-signed install through the driver store (pnputil /add-driver shunt.inf /install) needs
a shunt.cat made by inf2cat and signed; this package has none. docs/windows-install.md in the
Shunt source tree explains what such an install adds.
",
        kind = service.sc_type()?,
        dependencies = service.dependencies.join(", "),
        group = service.group,
        instance = service.default_instance,
        altitude = service.altitude,
        flags = service.flags,
        keys = keys.join("\n       "),
    );
    if let ShuntctlNote::Omitted { reason } = shuntctl {
        let _ = write!(
            text,
            "
No shuntctl.exe in this package
{reason}
  The x64 shuntctl.exe from the shunt-x64 package runs on Windows 11 on ARM64 under x64 emulation
  and controls this ARM64 driver the same way; fltmc load/unload {name} needs no shuntctl at all.
",
            reason = wrap(reason, "  ", 100)
        );
    }
    Ok(text.replace('\n', "\r\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> Service {
        let inf = std::fs::read_to_string(crate::workspace_root().join("inf/shunt.inf")).unwrap();
        Service::from_inf(&inf).unwrap()
    }

    const X64: Target<'static> = Target { arch: "x64", processor_architecture: "AMD64" };

    #[test]
    fn reads_the_service_from_the_inf() {
        let service = service();
        assert_eq!(service.name, "shunt");
        assert_eq!(service.image, "shunt.sys");
        assert_eq!(service.group, "FSFilter Virtualization");
        assert_eq!(service.dependencies, ["FltMgr"]);
        assert_eq!(service.instances_keys(), ["Instances", r"Parameters\Instances"]);
        assert_eq!(
            service.sc_create().unwrap(),
            "sc create shunt type= filesys start= demand error= normal binPath= System32\\drivers\\shunt.sys \
             group= \"FSFilter Virtualization\" depend= FltMgr DisplayName= \"shunt\""
        );
    }

    #[test]
    fn scripts_use_crlf_and_echo_nothing_cmd_would_interpret() {
        let service = service();
        for script in [install_cmd(&service, X64, "shunt-test.cer").unwrap(), uninstall_cmd(&service, "AB01")] {
            assert!(script.ends_with("\r\n"));
            assert!(!script.replace("\r\n", "").contains('\n'), "a bare LF");
            for line in script.lines() {
                let echoed = line.strip_prefix(">&2 echo ").or_else(|| line.strip_prefix("echo "));
                if let Some(text) = echoed {
                    assert!(!text.contains(['&', '|', '<', '>', '^']), "cmd would interpret {text:?}");
                    assert!(
                        text.replace("%SystemRoot%", "").replace("%PROCESSOR_ARCHITECTURE%", "").matches('%').count()
                            == 0
                    );
                }
            }
        }
    }

    #[test]
    fn every_failure_exits_non_zero() {
        let script = install_cmd(&service(), X64, "shunt-test.cer").unwrap();
        let gotos: Vec<&str> = script.lines().filter_map(|l| l.split_once("goto :").map(|(_, label)| label)).collect();
        for label in gotos {
            let at = script.find(&format!("\r\n:{label}\r\n")).unwrap_or_else(|| panic!("no label {label}"));
            let exit = script[at..].lines().find(|l| l.starts_with("exit /b") || l.starts_with("goto :")).unwrap();
            assert_ne!(exit, "exit /b 0", "{label} exits with success");
        }
    }

    #[test]
    fn wraps_long_text() {
        assert_eq!(wrap("aaa bbb ccc", "  ", 9), "  aaa bbb\n  ccc");
        assert_eq!(wrap("averyveryverylongword x", "  ", 9), "  averyveryverylongword\n  x");
    }

    #[test]
    fn rejects_values_cmd_would_expand() {
        assert!(check_quotable("x", "100%").is_err());
        assert!(check_quotable("x", "a\"b").is_err());
        assert!(check_quotable("x", r"trailing\").is_err());
        assert!(check_quotable("x", "Shunt Instance").is_ok());
        assert!(check_word("x", "shunt svc").is_err());
    }
}
