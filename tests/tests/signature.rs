//! Checks the packages `cargo xtask package` writes to `dist/shunt-<arch>/`: every file is there, the drivers'
//! Authenticode signatures verify against the packaged test certificate (and only against it), the signed drivers
//! are still valid PE images with a correct checksum, `shuntctl.exe` is built for the package's architecture, and
//! the install scripts install, load, unload and remove the service the driver expects.
//!
//! These tests fail (never skip) when `dist/` is missing: run `cargo xtask package` first.
#![cfg(not(windows))]

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use object::{
    LittleEndian as LE, Object,
    pe::{IMAGE_DIRECTORY_ENTRY_SECURITY, IMAGE_SUBSYSTEM_NATIVE, IMAGE_SUBSYSTEM_WINDOWS_CUI},
    read::pe::{ImageNtHeaders, ImageOptionalHeader, PeFile64},
};
use shunt_tests::{
    ARCHES, Arch, built_driver, checksum_offset, pe_checksum, read_artifact, stored_checksum, workspace_root,
};

const PACKAGE: &str = "cargo xtask package";

/// `WIN_CERT_REVISION_2_0`.
const WIN_CERT_REVISION_2_0: u16 = 0x0200;

/// `WIN_CERT_TYPE_PKCS_SIGNED_DATA`.
const WIN_CERT_TYPE_PKCS_SIGNED_DATA: u16 = 0x0002;

fn package_dir(arch: &Arch) -> PathBuf {
    workspace_root().join("dist").join(format!("shunt-{}", arch.name))
}

fn package_file(arch: &Arch, file: &str) -> Vec<u8> {
    read_artifact(&package_dir(arch).join(file), PACKAGE)
}

fn package_text(arch: &Arch, file: &str) -> String {
    String::from_utf8(package_file(arch, file)).unwrap_or_else(|_| panic!("dist/shunt-{}/{file} is text", arch.name))
}

/// A file in the system's temporary directory, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("shunt-signature-{}-{name}", std::process::id()));
        fs::write(&path, contents).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The DER certificate as PEM, which osslsigncode's `-CAfile` takes.
fn pem(der: &[u8]) -> String {
    let body = base64(der);
    let lines: Vec<&str> = body.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
    format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n"))
}

fn osslsigncode_verify(ca_file: &Path, file: &Path) -> Output {
    Command::new("osslsigncode")
        .args(["verify", "-CAfile"])
        .arg(ca_file)
        .arg("-in")
        .arg(file)
        .output()
        .expect("osslsigncode runs (Debian package osslsigncode; scripts/bootstrap.sh installs it)")
}

fn show(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn packages_hold_every_file() {
    for arch in &ARCHES {
        let dir = package_dir(arch);
        let entries = fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!("{} is missing ({e}); run `{PACKAGE}` first (the README's test command does)", dir.display())
        });
        let files: BTreeSet<String> = entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        let mut expected: BTreeSet<String> =
            ["shunt.sys", "shunt-test.cer", "shunt.inf", "install.cmd", "uninstall.cmd", "README.txt"]
                .map(String::from)
                .into();
        // x64's shuntctl.exe always builds here; ARM64's needs zig (see `ARM64 shuntctl` below).
        if arch.name == "x64" || files.contains("shuntctl.exe") {
            expected.insert("shuntctl.exe".to_owned());
        }
        assert_eq!(files, expected, "the files of {}", dir.display());
    }
}

#[test]
fn signatures_verify_against_the_packaged_test_certificate_only() {
    for arch in &ARCHES {
        let certificate =
            TempFile::new(&format!("{}.pem", arch.name), pem(&package_file(arch, "shunt-test.cer")).as_bytes());
        let driver = package_dir(arch).join("shunt.sys");
        let _ = package_file(arch, "shunt.sys");

        let verified = osslsigncode_verify(&certificate.0, &driver);
        assert!(
            verified.status.success() && show(&verified).contains("Signature verification: ok"),
            "dist/shunt-{}/shunt.sys does not verify against shunt-test.cer:\n{}",
            arch.name,
            show(&verified)
        );
        assert!(show(&verified).contains("SHA256"), "{}: signed with SHA-256", arch.name);

        // Trusting nothing, the same signature must fail: the check above tested the chain, not only the format.
        let nothing = TempFile::new(&format!("{}-empty.pem", arch.name), b"");
        let untrusted = osslsigncode_verify(&nothing.0, &driver);
        assert!(!untrusted.status.success(), "{}: verifies without trusting the test certificate", arch.name);

        // A changed byte in the image must break the signature.
        let mut image = package_file(arch, "shunt.sys");
        let file = PeFile64::parse(&*image).expect("a PE32+ image");
        let text = file.section_table().iter().next().expect("a first section");
        let at = text.pointer_to_raw_data.get(LE) as usize + 16;
        image[at] ^= 0xff;
        let tampered = TempFile::new(&format!("{}-tampered.sys", arch.name), &image);
        let broken = osslsigncode_verify(&certificate.0, &tampered.0);
        assert!(!broken.status.success(), "{}: a modified image still verifies:\n{}", arch.name, show(&broken));
    }
}

#[test]
fn signed_drivers_are_valid_pe_images_with_a_valid_checksum() {
    for arch in &ARCHES {
        let name = arch.name;
        let signed = package_file(arch, "shunt.sys");
        let file = PeFile64::parse(&*signed).unwrap_or_else(|e| panic!("{name}: the signed driver is not PE32+: {e}"));
        let nt = file.nt_headers();
        assert_eq!(nt.file_header().machine.get(LE), arch.machine, "{name}: machine");
        assert_eq!(nt.optional_header().subsystem(), IMAGE_SUBSYSTEM_NATIVE, "{name}: a native (kernel) image");

        // osslsigncode rewrites the checksum after appending the signature; the kernel loader checks it.
        let stored = stored_checksum(&signed);
        assert_eq!(nt.optional_header().check_sum(), stored, "{name}: object and the helper read the same field");
        assert_ne!(stored, 0, "{name}: has a checksum");
        assert_eq!(stored, pe_checksum(&signed), "{name}: the stored PE checksum is the file's checksum");

        // The certificate table: the last thing in the file, 8-byte aligned, one PKCS#7 SignedData.
        let security = file.data_directories().get(IMAGE_DIRECTORY_ENTRY_SECURITY).expect("a security directory");
        let (offset, size) = (security.virtual_address.get(LE) as usize, security.size.get(LE) as usize);
        assert!(size > 8, "{name}: has a certificate table");
        assert_eq!(offset % 8, 0, "{name}: the certificate table is 8-byte aligned");
        assert_eq!(offset + size, signed.len(), "{name}: the certificate table ends the file");
        let header = &signed[offset..offset + 8];
        let length = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
        assert!(length <= size && length > 8, "{name}: WIN_CERTIFICATE.dwLength {length} fits the table {size}");
        assert_eq!(u16::from_le_bytes([header[4], header[5]]), WIN_CERT_REVISION_2_0, "{name}: wRevision");
        assert_eq!(
            u16::from_le_bytes([header[6], header[7]]),
            WIN_CERT_TYPE_PKCS_SIGNED_DATA,
            "{name}: wCertificateType"
        );

        // Signing changed nothing but the checksum and the security directory: the package holds the driver that
        // `cargo xtask build-driver` last built.
        let unsigned = built_driver(arch);
        assert!(signed.len() > unsigned.len(), "{name}: the signature was appended");
        // PE32+: CheckSum is at offset 64 of the optional header, the data directories start at offset 112.
        let directory = checksum_offset(&unsigned) - 64 + 112 + 8 * IMAGE_DIRECTORY_ENTRY_SECURITY;
        let changed: Vec<usize> = (0..unsigned.len()).filter(|&i| signed[i] != unsigned[i]).collect();
        let allowed = |i: &usize| {
            (checksum_offset(&unsigned)..checksum_offset(&unsigned) + 4).contains(i)
                || (directory..directory + 8).contains(i)
        };
        assert!(
            changed.iter().all(allowed),
            "{name}: dist/shunt-{name}/shunt.sys is not the signed target/driver/{name}/shunt.sys (bytes {:?} differ); \
             run `{PACKAGE}` again",
            &changed[..changed.len().min(8)]
        );
        assert!(signed[unsigned.len()..offset].iter().all(|&b| b == 0), "{name}: padding before the signature is zero");
    }
}

#[test]
fn shuntctl_is_built_for_each_architecture_or_its_absence_is_explained() {
    for arch in &ARCHES {
        let name = arch.name;
        let path = package_dir(arch).join("shuntctl.exe");
        if !path.exists() {
            assert_ne!(name, "x64", "dist/shunt-x64/shuntctl.exe is missing; run `{PACKAGE}`");
            let readme = package_text(arch, "README.txt");
            assert!(
                readme.contains("No shuntctl.exe in this package") && readme.contains("x64 emulation"),
                "dist/shunt-{name}/README.txt explains why shuntctl.exe is missing and what to use instead"
            );
            continue;
        }
        let exe = read_artifact(&path, PACKAGE);
        let file = PeFile64::parse(&*exe).unwrap_or_else(|e| panic!("{name}: shuntctl.exe is not PE32+: {e}"));
        let nt = file.nt_headers();
        assert_eq!(nt.file_header().machine.get(LE), arch.machine, "{name}: shuntctl.exe's machine");
        assert_eq!(nt.optional_header().subsystem(), IMAGE_SUBSYSTEM_WINDOWS_CUI, "{name}: a console program");
        let libraries: Vec<String> = file
            .imports()
            .expect("an import table")
            .iter()
            .map(|i| String::from_utf8_lossy(i.library()).to_ascii_lowercase())
            .collect();
        assert!(libraries.iter().any(|l| l == "fltlib.dll"), "{name}: shuntctl.exe uses fltlib.dll: {libraries:?}");
        assert!(
            !libraries
                .iter()
                .any(|l| l.starts_with("libgcc") || l.starts_with("libwinpthread") || l.starts_with("libunwind")),
            "{name}: shuntctl.exe needs no DLL that Windows lacks: {libraries:?}"
        );
    }
}

/// The certificate's SHA-1 thumbprint, which uninstall.cmd removes it by.
fn thumbprint(der: &[u8]) -> String {
    let certificate = TempFile::new("thumbprint.cer", der);
    let output = Command::new("openssl")
        .args(["x509", "-inform", "DER", "-noout", "-fingerprint", "-sha1", "-in"])
        .arg(&certificate.0)
        .output()
        .expect("openssl runs");
    assert!(output.status.success(), "openssl reads shunt-test.cer: {}", show(&output));
    String::from_utf8_lossy(&output.stdout).trim().split_once('=').expect("a fingerprint").1.replace(':', "")
}

/// The position of the first line starting with `prefix`.
fn position(lines: &[&str], prefix: &str, script: &str) -> usize {
    lines.iter().position(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{script} has no line `{prefix}`"))
}

/// Every `goto :label` of the script has its label, and every label a failure jumps to ends non-zero.
fn check_labels(script: &str, name: &str) {
    let lines: Vec<&str> = script.lines().collect();
    for line in &lines {
        let Some((_, label)) = line.split_once("goto :") else { continue };
        let at = lines
            .iter()
            .position(|l| *l == format!(":{label}"))
            .unwrap_or_else(|| panic!("{name}: `{line}` jumps to a missing label"));
        let fallthrough = ["unloaded", "no_service", "done"];
        if fallthrough.contains(&label) {
            continue;
        }
        let end = lines[at..].iter().find(|l| l.starts_with("exit /b") || l.starts_with("goto :")).unwrap();
        assert_ne!(*end, "exit /b 0", "{name}: the failure :{label} ends with success");
    }
}

#[test]
fn install_cmd_checks_first_then_installs_at_both_instance_locations_and_loads() {
    let service = shunt::SERVICE_NAME;
    for arch in &ARCHES {
        let name = format!("dist/shunt-{}/install.cmd", arch.name);
        let script = package_text(arch, "install.cmd");
        assert!(!script.replace("\r\n", "").contains('\n'), "{name}: CRLF line endings only");
        check_labels(&script, &name);
        let lines: Vec<&str> = script.lines().collect();
        let at = |prefix: &str| position(&lines, prefix, &name);

        let elevated = at("net session >nul 2>&1");
        let test_signing =
            lines.iter().position(|l| l.contains("SystemStartOptions") && l.contains("TESTSIGNING")).unwrap();
        let processor = if arch.name == "x64" { "AMD64" } else { "ARM64" };
        let architecture = at(&format!("if /i not \"%PROCESSOR_ARCHITECTURE%\"==\"{processor}\""));
        let root = at("certutil -addstore -f Root \"shunt-test.cer\"");
        let publisher = at("certutil -addstore -f TrustedPublisher \"shunt-test.cer\"");
        let copy = at(&format!(r#"copy /y "{0}" "%SystemRoot%\System32\drivers\{0}""#, shunt::IMAGE_NAME));
        let create = at(&format!(
            "sc create {service} type= filesys start= demand error= normal binPath= System32\\drivers\\{} \
             group= \"FSFilter Virtualization\" depend= FltMgr",
            shunt::IMAGE_NAME
        ));
        let key = format!(r"HKLM\SYSTEM\CurrentControlSet\Services\{service}");
        let mut registry = Vec::new();
        for instances in ["Instances", r"Parameters\Instances"] {
            registry.push(at(&format!(
                r#"reg add "{key}\{instances}" /v "DefaultInstance" /t REG_SZ /d "Shunt Instance" /f"#
            )));
            registry.push(at(&format!(
                r#"reg add "{key}\{instances}\Shunt Instance" /v "Altitude" /t REG_SZ /d "{}" /f"#,
                shunt::ALTITUDE
            )));
            registry
                .push(at(&format!(r#"reg add "{key}\{instances}\Shunt Instance" /v "Flags" /t REG_DWORD /d 0 /f"#)));
        }
        let load = at(&format!("fltmc load {service}"));

        // Every check comes before the first change to the machine, and loading comes last.
        for check in [elevated, test_signing, architecture] {
            assert!(check < root, "{name}: checks before it changes anything");
        }
        let mut order = vec![root, publisher, copy, create];
        order.extend(&registry);
        order.push(load);
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{name}: trust, copy, create, registry, load, in that order");
        // Each of those steps stops the script when it fails.
        for step in order {
            assert!(lines[step + 1].starts_with("if errorlevel 1 goto :"), "{name}: `{}` is checked", lines[step]);
        }
        assert!(script.contains("bcdedit /set testsigning on"), "{name}: says how to turn test signing on");
    }
}

#[test]
fn uninstall_cmd_unloads_tolerantly_and_removes_service_driver_and_certificate() {
    let service = shunt::SERVICE_NAME;
    for arch in &ARCHES {
        let name = format!("dist/shunt-{}/uninstall.cmd", arch.name);
        let script = package_text(arch, "uninstall.cmd");
        assert!(!script.replace("\r\n", "").contains('\n'), "{name}: CRLF line endings only");
        check_labels(&script, &name);
        let lines: Vec<&str> = script.lines().collect();
        let at = |prefix: &str| position(&lines, prefix, &name);

        let elevated = at("net session >nul 2>&1");
        // Not loaded is fine: the unload is skipped when fltmc does not list the filter.
        let loaded = at(&format!("fltmc filters 2>nul | findstr /i /b /c:\"{service} \" >nul"));
        assert_eq!(lines[loaded + 1], "if errorlevel 1 goto :unloaded", "{name}: skips the unload when not loaded");
        let unload = at(&format!("fltmc unload {service}"));
        let delete = at(&format!("sc delete {service}"));
        let file = at(&format!(r#"if exist "%SystemRoot%\System32\drivers\{}" del /f /q"#, shunt::IMAGE_NAME));
        let thumbprint = thumbprint(&package_file(arch, "shunt-test.cer"));
        let root = at(&format!("certutil -delstore Root {thumbprint}"));
        let publisher = at(&format!("certutil -delstore TrustedPublisher {thumbprint}"));
        let order = [elevated, loaded, unload, delete, file, root, publisher];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{name}: unload, delete the service, the file, the certificate");
        assert!(script.contains("/keepcert"), "{name}: can keep the certificate");
    }
}

#[test]
fn readme_gives_the_steps() {
    let service = shunt::SERVICE_NAME;
    for arch in &ARCHES {
        let readme = package_text(arch, "README.txt");
        for step in [
            "bcdedit /set testsigning on".to_owned(),
            "install.cmd".to_owned(),
            "fltmc filters".to_owned(),
            format!("fltmc instances -f {service}"),
            format!("fltmc unload {service}"),
            "uninstall.cmd".to_owned(),
            "TEST-SIGNED".to_owned(),
        ] {
            assert!(readme.contains(&step), "dist/shunt-{}/README.txt mentions {step}", arch.name);
        }
    }
}

#[test]
fn certificates_and_packages_are_never_committed() {
    let ignore = fs::read_to_string(workspace_root().join(".gitignore")).expect(".gitignore");
    for pattern in ["/.certs/", "/dist/"] {
        assert!(ignore.lines().any(|l| l.trim() == pattern), ".gitignore ignores {pattern}");
    }
}
