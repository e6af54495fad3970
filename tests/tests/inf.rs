//! Checks `inf/shunt.inf`: the sections and keys a minifilter INF needs, the instance configuration where each
//! Windows build reads it, literals only in `[Strings]`, and agreement with the driver (`shunt::SERVICE_NAME`,
//! `IMAGE_NAME`, `ALTITUDE`) and with the packages `cargo xtask package` writes (their INF and install scripts).
//!
//! The INF is read with fltsim's parser and install model, which choose decorated sections as Windows does.
//! The package checks fail (never skip) when `dist/` is missing.
#![cfg(not(windows))]

use std::fs;

use fltsim::inf::{Inf, RegValue, ServiceInstall};
use shunt_tests::{ARCHES, read_artifact, workspace_root};

/// The INF platform decoration of each architecture, in `shunt_tests::ARCHES` order.
const PLATFORMS: [&str; 2] = ["NTamd64", "NTarm64"];

/// Windows 10 2004 (the oldest build Shunt supports), 11 23H2, the last build before 24H2.
const LEGACY_BUILDS: [u32; 3] = [19041, 22631, 26099];

/// Windows 11 24H2, and a later build.
const PARAMETERS_BUILDS: [u32; 2] = [26100, 27000];

const VIRTUALIZATION_GUID: &str = "{f75a86c0-10d8-4c3a-b233-ed60e4cdfaac}";

fn inf_text() -> String {
    fs::read_to_string(workspace_root().join("inf/shunt.inf")).expect("inf/shunt.inf is readable")
}

fn inf() -> Inf {
    Inf::parse(&inf_text()).unwrap_or_else(|e| panic!("inf/shunt.inf does not parse: {e}"))
}

fn install(inf: &Inf, platform: &str, build: u32) -> ServiceInstall {
    inf.install_service(platform, build).unwrap_or_else(|e| panic!("installing for {platform} on build {build}: {e}"))
}

/// The subkey holding `DefaultInstance`, the instance it names, and that instance's Altitude and Flags.
fn default_instance(install: &ServiceInstall) -> (String, String, String, u32) {
    let defaults: Vec<_> = install.values.iter().filter(|(_, name, _)| name == "DefaultInstance").collect();
    assert_eq!(defaults.len(), 1, "{:?}: exactly one DefaultInstance", install.sections);
    let (instances, _, value) = defaults[0];
    let RegValue::Sz(instance) = value else { panic!("DefaultInstance is a string, not {value:?}") };
    let key = format!(r"{instances}\{instance}");
    let find = |name: &str| install.values.iter().find(|(k, n, _)| *k == key && n == name).map(|(_, _, v)| v.clone());
    let Some(RegValue::Sz(altitude)) = find("Altitude") else {
        panic!("{:?}: DefaultInstance names {instance:?}, but {key} has no Altitude string", install.sections)
    };
    let Some(RegValue::Dword(flags)) = find("Flags") else {
        panic!("{:?}: DefaultInstance names {instance:?}, but {key} has no Flags number", install.sections)
    };
    (instances.clone(), instance.clone(), altitude, flags)
}

/// Removes an INF comment, leaving `;` inside quotes alone.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => return &line[..i],
            _ => {}
        }
    }
    line
}

/// A raw entry of the INF as written: its section, its text without comment, whether it had a comment, its line.
struct RawEntry {
    section: String,
    text: String,
    commented: bool,
    line: usize,
}

fn raw_entries(text: &str) -> Vec<RawEntry> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let content = strip_comment(raw).trim();
        if content.is_empty() {
            continue;
        }
        assert!(!content.ends_with('\\'), "line {}: continuation lines are not expected in shunt.inf", i + 1);
        if let Some(name) = content.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            name.trim().clone_into(&mut section);
            continue;
        }
        entries.push(RawEntry {
            section: section.clone(),
            text: content.to_owned(),
            commented: strip_comment(raw).len() < raw.len(),
            line: i + 1,
        });
    }
    entries
}

/// Whether `field` is made only of `%token%`s (DIRIDs such as `%13%` included) and backslashes between them.
fn tokens_only(field: &str) -> bool {
    let mut rest = field;
    let mut tokens = 0;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('\\') {
            rest = after;
        } else if let Some(after) = rest.strip_prefix('%') {
            let Some(end) = after.find('%') else { return false };
            if end == 0 {
                return false;
            }
            tokens += 1;
            rest = &after[end + 1..];
        } else {
            return false;
        }
    }
    tokens > 0
}

fn is_number(field: &str) -> bool {
    field.strip_prefix("0x").map_or_else(
        || !field.is_empty() && field.chars().all(|c| c.is_ascii_digit()),
        |hex| !hex.is_empty() && hex.chars().all(|c| c.is_ascii_hexdigit()),
    )
}

/// The sections an install runs through, for every architecture and build: the `DefaultInstall` variants,
/// their `.Services`, the service sections and their `AddReg` sections.
fn install_sections(inf: &Inf) -> Vec<String> {
    let mut sections = Vec::new();
    for platform in PLATFORMS {
        for build in LEGACY_BUILDS.iter().chain(&PARAMETERS_BUILDS) {
            for section in install(inf, platform, *build).sections {
                for name in section.split(',') {
                    if !sections.iter().any(|s: &String| s.eq_ignore_ascii_case(name)) {
                        sections.push(name.to_owned());
                    }
                }
            }
        }
    }
    sections
}

#[test]
fn inf_is_ascii_and_every_token_is_defined() {
    let text = inf_text();
    assert!(text.is_ascii(), "shunt.inf must be plain ASCII: Windows reads an INF without a BOM in the ANSI code page");
    let inf = inf();
    assert!(inf.unresolved_tokens().is_empty(), "%tokens% missing from [Strings]: {:?}", inf.unresolved_tokens());
    for required in ["Version", "SourceDisksNames", "SourceDisksFiles", "DestinationDirs", "Strings"] {
        assert!(inf.section(required).is_some(), "shunt.inf has a [{required}] section");
    }
}

#[test]
fn version_section_names_the_virtualization_class() {
    let inf = inf();
    let value = |key: &str| inf.value("Version", key).unwrap_or_else(|| panic!("[Version] has no {key}")).to_owned();
    assert!(value("Signature").eq_ignore_ascii_case("$WINDOWS NT$"), "Signature");
    assert_eq!(value("Class"), "Virtualization", "Class: Shunt redirects files, the Virtualization class's purpose");
    assert!(value("ClassGuid").eq_ignore_ascii_case(VIRTUALIZATION_GUID), "ClassGuid of the Virtualization class");
    assert!(!value("Provider").is_empty() && !value("Provider").contains("Microsoft"), "Provider: not Microsoft");
    assert!(value("CatalogFile").to_ascii_lowercase().ends_with(".cat"), "CatalogFile names a .cat");
    assert_eq!(value("PnpLockdown"), "1", "PnpLockdown = 1: the driver's files are replaced only through the store");

    // DriverVer = mm/dd/yyyy,w.x.y.z, whose version is the workspace's.
    let driver_ver = inf.section("Version").unwrap().iter().find(|e| e.key.as_deref() == Some("DriverVer")).unwrap();
    let (date, version) = (driver_ver.value(0), driver_ver.value(1));
    let parts: Vec<u32> = date.split('/').map(|p| p.parse().expect("DriverVer date is numeric")).collect();
    assert!(
        parts.len() == 3 && (1..=12).contains(&parts[0]) && (1..=31).contains(&parts[1]) && parts[2] >= 2024,
        "DriverVer date {date:?} is mm/dd/yyyy"
    );
    assert_eq!(version.split('.').count(), 4, "DriverVer version {version:?} has four parts");
    assert!(
        version.starts_with(&format!("{}.", env!("CARGO_PKG_VERSION"))),
        "DriverVer version {version} is the workspace version {}",
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn both_install_variants_exist_for_both_architectures() {
    let inf = inf();
    for platform in PLATFORMS {
        for suffix in ["", ".Services", ".10.0...26100", ".10.0...26100.Services"] {
            let name = format!("DefaultInstall.{platform}{suffix}");
            assert!(inf.section(&name).is_some(), "shunt.inf has [{name}]");
        }
        for build in LEGACY_BUILDS {
            assert_eq!(
                inf.decorated_section("DefaultInstall", platform, build).as_deref(),
                Some(format!("DefaultInstall.{platform}").as_str()),
                "build {build} installs the pre-24H2 section"
            );
        }
        for build in PARAMETERS_BUILDS {
            assert_eq!(
                inf.decorated_section("DefaultInstall", platform, build).as_deref(),
                Some(format!("DefaultInstall.{platform}.10.0...26100").as_str()),
                "build {build} installs the 24H2 section"
            );
        }
    }
    assert_eq!(inf.decorated_section("DefaultInstall", "NTx86", 26100), None, "there is no 32-bit driver to install");
    for name in inf.section_names() {
        assert!(
            !name.to_ascii_lowercase().starts_with("defaultuninstall"),
            "[{name}]: DefaultUninstall sections are prohibited for primitive drivers since Windows 10 1903"
        );
    }
}

#[test]
fn every_install_copies_the_driver_into_the_driver_store() {
    let inf = inf();
    for platform in PLATFORMS {
        for build in LEGACY_BUILDS.iter().chain(&PARAMETERS_BUILDS) {
            let section = inf.decorated_section("DefaultInstall", platform, *build).unwrap();
            let copy_files = inf.value(&section, "CopyFiles").unwrap_or_else(|| panic!("[{section}] has CopyFiles"));
            for files in copy_files.split(',').map(str::trim) {
                assert_eq!(
                    inf.value("DestinationDirs", files),
                    Some("13"),
                    "[DestinationDirs] sends {files} to DIRID 13, the driver store, as PnpLockdown and primitive \
                     drivers require"
                );
                let listed = inf.section(files).unwrap_or_else(|| panic!("no [{files}]"));
                assert!(
                    listed.iter().any(|e| e.value(0) == shunt::IMAGE_NAME),
                    "[{files}] copies {}",
                    shunt::IMAGE_NAME
                );
            }
        }
    }
    let sources = inf.section("SourceDisksFiles").unwrap();
    assert!(
        sources.iter().any(|e| e.key.as_deref() == Some(shunt::IMAGE_NAME)),
        "[SourceDisksFiles] lists {}",
        shunt::IMAGE_NAME
    );
}

#[test]
fn service_is_a_file_system_filter_that_depends_on_fltmgr() {
    let inf = inf();
    for platform in PLATFORMS {
        for build in LEGACY_BUILDS.iter().chain(&PARAMETERS_BUILDS) {
            let install = install(&inf, platform, *build);
            let at = format!("{platform} on build {build}");
            let value = |name: &str| install.service_values.get(name).cloned();
            assert_eq!(install.name, shunt::SERVICE_NAME, "{at}: the service name is the driver's");
            assert_eq!(value("Type"), Some(RegValue::Dword(2)), "{at}: ServiceType 2, SERVICE_FILE_SYSTEM_DRIVER");
            assert_eq!(
                value("DependOnService"),
                Some(RegValue::MultiSz(vec!["FltMgr".into()])),
                "{at}: Dependencies = FltMgr, as every minifilter"
            );
            assert_eq!(
                value("Group"),
                Some(RegValue::Sz("FSFilter Virtualization".into())),
                "{at}: LoadOrderGroup of the Virtualization class"
            );
            assert_eq!(value("Start"), Some(RegValue::Dword(3)), "{at}: StartType 3, demand start (fltmc load)");
            assert_eq!(value("ErrorControl"), Some(RegValue::Dword(1)), "{at}: ErrorControl 1, normal");
            assert_eq!(
                value("ImagePath"),
                Some(RegValue::Sz(format!(r"%13%\{}", shunt::IMAGE_NAME))),
                "{at}: ServiceBinary is the driver's image, run from the driver store"
            );
        }
    }
}

#[test]
fn instances_are_written_where_each_build_reads_them() {
    let inf = inf();
    for platform in PLATFORMS {
        for (builds, expected, other) in [
            (&LEGACY_BUILDS[..], "Instances", r"Parameters\Instances"),
            (&PARAMETERS_BUILDS[..], r"Parameters\Instances", "Instances"),
        ] {
            for build in builds {
                let install = install(&inf, platform, *build);
                let at = format!("{platform} on build {build}");
                let (instances, instance, altitude, flags) = default_instance(&install);
                assert_eq!(instances, expected, "{at}: DefaultInstance is under {expected}");
                assert!(
                    install.values.iter().all(|(key, _, _)| !key.starts_with(other)),
                    "{at}: nothing is written under {other}, which this build does not read"
                );
                let number: u32 =
                    altitude.parse().unwrap_or_else(|_| panic!("{at}: altitude {altitude:?} is a number"));
                assert!(
                    (130_000..=139_999).contains(&number),
                    "{at}: altitude {number} is in the FSFilter Virtualization range 130000-139999"
                );
                assert_eq!(altitude, shunt::ALTITUDE, "{at}: the INF's altitude is the driver's");
                assert_eq!(flags, 0, "{at}: instance {instance:?} attaches automatically");
                assert!(
                    install.values.iter().any(|(_, name, v)| name == "SupportedFeatures" && *v == RegValue::Dword(3)),
                    "{at}: SupportedFeatures = 3"
                );
            }
        }
    }
}

#[test]
fn literals_live_in_strings() {
    let text = inf_text();
    let inf = inf();
    let install = install_sections(&inf);
    let is_install = |section: &str| install.iter().any(|s| s.eq_ignore_ascii_case(section));
    let add_reg: Vec<String> = install.iter().filter(|s| s.to_ascii_lowercase().contains("addreg")).cloned().collect();
    assert!(!add_reg.is_empty(), "the installs name AddReg sections");
    let mut checked_add_reg = 0;
    for entry in raw_entries(&text) {
        let at = format!("line {} in [{}]: {}", entry.line, entry.section, entry.text);
        if entry.section.eq_ignore_ascii_case("Strings") {
            continue;
        }
        if entry.section.eq_ignore_ascii_case("Version") {
            // The signature is the one literal the INF syntax itself fixes.
            assert!(!entry.text.contains('"') || entry.text.starts_with("Signature"), "{at}: a quoted literal");
            continue;
        }
        assert!(!entry.text.contains('"'), "{at}: a quoted literal outside [Strings]");
        let (key, value) = entry.text.split_once('=').map_or(("", entry.text.as_str()), |(k, v)| (k.trim(), v.trim()));
        let fields: Vec<&str> = value.split(',').map(str::trim).collect();
        if add_reg.iter().any(|s| s.eq_ignore_ascii_case(&entry.section)) {
            checked_add_reg += 1;
            assert_eq!(fields[0], "HKR", "{at}: writes relative to the service key");
            assert!(fields[1].is_empty() || tokens_only(fields[1]), "{at}: the subkey is made of %tokens%");
            assert!(tokens_only(fields[2]), "{at}: the value name is a %token%");
            assert!(is_number(fields[3]), "{at}: the flags are a number");
            assert!(tokens_only(fields[4]) || is_number(fields[4]), "{at}: the value is a %token% or a number");
            assert!(entry.commented, "{at}: says in a comment what the number means");
        } else if is_install(&entry.section) {
            match key.to_ascii_lowercase().as_str() {
                "servicetype" | "starttype" | "errorcontrol" => {
                    assert!(is_number(value), "{at}: a number");
                    assert!(entry.commented, "{at}: says in a comment what the number means");
                }
                "displayname" | "description" | "servicebinary" | "dependencies" | "loadordergroup" | "optiondesc" => {
                    assert!(fields.iter().all(|f| tokens_only(f)), "{at}: made of %tokens% from [Strings]");
                }
                "addservice" => assert!(tokens_only(fields[0]), "{at}: the service name is a %token%"),
                _ => {}
            }
        }
    }
    assert_eq!(checked_add_reg, 8, "both AddReg sections, four values each, were checked");
}

#[test]
fn inf_agrees_with_the_driver() {
    let inf = inf();
    let strings = inf.strings();
    assert_eq!(
        strings.get("servicename").map(String::as_str),
        Some(shunt::SERVICE_NAME),
        "[Strings] ServiceName is shunt::SERVICE_NAME"
    );
    assert_eq!(
        strings.get("driverfilename").map(String::as_str),
        Some(shunt::IMAGE_NAME),
        "[Strings] DriverFileName is shunt::IMAGE_NAME"
    );
    let install = install(&inf, "NTamd64", 26100);
    assert_eq!(default_instance(&install).2, shunt::ALTITUDE, "the default instance's altitude is shunt::ALTITUDE");
}

// The packages.

fn package_file(arch: &str, file: &str) -> Vec<u8> {
    read_artifact(&workspace_root().join("dist").join(format!("shunt-{arch}")).join(file), "cargo xtask package")
}

fn package_text(arch: &str, file: &str) -> String {
    String::from_utf8(package_file(arch, file)).unwrap_or_else(|_| panic!("dist/shunt-{arch}/{file} is text"))
}

#[test]
fn packaged_inf_is_inf_shunt_inf() {
    for arch in &ARCHES {
        assert!(
            package_file(arch.name, "shunt.inf") == inf_text().as_bytes(),
            "dist/shunt-{}/shunt.inf differs from inf/shunt.inf: run `cargo xtask package` again",
            arch.name
        );
    }
}

/// The `reg add` line install.cmd must have for a value the INF writes.
fn reg_add(subkey: &str, name: &str, value: &RegValue) -> String {
    let mut key = format!(r"HKLM\SYSTEM\CurrentControlSet\Services\{}", shunt::SERVICE_NAME);
    if !subkey.is_empty() {
        key = format!(r"{key}\{subkey}");
    }
    let data = match value {
        RegValue::Sz(s) => format!("/t REG_SZ /d \"{s}\""),
        RegValue::Dword(n) => format!("/t REG_DWORD /d {n}"),
        RegValue::MultiSz(v) => format!("/t REG_MULTI_SZ /d \"{}\"", v.join("\\0")),
    };
    format!("reg add \"{key}\" /v \"{name}\" {data} /f")
}

#[test]
fn install_scripts_do_what_the_inf_does() {
    let inf = inf();
    for (arch, platform) in ARCHES.iter().zip(PLATFORMS) {
        let script = package_text(arch.name, "install.cmd");
        let lines: Vec<&str> = script.lines().collect();
        let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
        let at = format!("dist/shunt-{}/install.cmd", arch.name);
        let sc_create = lines
            .iter()
            .find(|l| l.starts_with(&format!("sc create {} ", shunt::SERVICE_NAME)))
            .unwrap_or_else(|| panic!("{at} creates the service {}", shunt::SERVICE_NAME));
        for argument in [
            "type= filesys".to_owned(),
            "start= demand".to_owned(),
            "error= normal".to_owned(),
            format!(r"binPath= System32\drivers\{}", shunt::IMAGE_NAME),
            "group= \"FSFilter Virtualization\"".to_owned(),
            "depend= FltMgr".to_owned(),
        ] {
            assert!(sc_create.contains(&argument), "{at}: sc create has {argument}: {sc_create}");
        }
        // Both locations, every value: what the pre-24H2 and the 24H2 install sections write.
        for build in [LEGACY_BUILDS[0], PARAMETERS_BUILDS[0]] {
            for (subkey, name, value) in install(&inf, platform, build).values {
                let line = reg_add(&subkey, &name, &value);
                assert!(has(&line), "{at} writes what the INF writes on build {build}: {line}");
            }
        }
        let instance = format!(r"Instances\{}", default_instance(&install(&inf, platform, 26100)).1);
        for key in [instance.clone(), format!(r"Parameters\{instance}")] {
            let altitude = reg_add(&key, "Altitude", &RegValue::Sz(shunt::ALTITUDE.to_owned()));
            assert!(has(&altitude), "{at}: the driver's altitude under {key}");
        }
        assert!(has(&format!("fltmc load {}", shunt::SERVICE_NAME)), "{at} loads the filter");

        let uninstall = package_text(arch.name, "uninstall.cmd");
        for line in [
            format!("fltmc unload {}", shunt::SERVICE_NAME),
            format!("sc delete {}", shunt::SERVICE_NAME),
            format!(
                r#"if exist "%SystemRoot%\System32\drivers\{0}" del /f /q "%SystemRoot%\System32\drivers\{0}""#,
                shunt::IMAGE_NAME
            ),
        ] {
            assert!(uninstall.lines().any(|l| l == line), "dist/shunt-{}/uninstall.cmd: {line}", arch.name);
        }
    }
}
