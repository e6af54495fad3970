//! Test-signing: a self-signed code-signing certificate kept in `.certs/` (ignored by git, never committed), and
//! Authenticode signatures made and checked with osslsigncode.
//!
//! A test-signed driver loads only on a machine booted with test signing on (`bcdedit /set testsigning on`); the
//! package's `install.cmd` adds the certificate to the machine's `Root` and `TrustedPublisher` stores. See
//! <https://learn.microsoft.com/windows-hardware/drivers/install/test-signing>.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::{build::display, workspace_root};

/// The subject of the test certificate.
const SUBJECT: &str = "/CN=Shunt Test Signing (not for production)";

/// How long a new certificate is valid, in days.
const VALID_DAYS: &str = "1825";

/// A certificate that expires within this many seconds is replaced before signing (30 days).
const RENEW_BEFORE_SECONDS: &str = "2592000";

/// The file name the certificate's public part has in `.certs/` and in every package.
pub const CERTIFICATE_FILE: &str = "shunt-test.cer";

/// The test-signing certificate and its private key.
#[derive(Debug)]
pub struct TestCertificate {
    /// The private key (PEM, mode 0600).
    key: PathBuf,
    /// The certificate (PEM), for osslsigncode.
    pem: PathBuf,
    /// The certificate (DER): what Windows' `certutil -addstore` takes, shipped as [`CERTIFICATE_FILE`].
    pub der: PathBuf,
    /// The SHA-1 thumbprint in upper-case hex, the id `certutil -delstore` removes it by.
    pub thumbprint: String,
}

/// Runs a tool, failing with its output when it fails, and returns its standard output.
fn output(command: &mut Command, hint: &str) -> Result<String> {
    let shown = format!("{command:?}");
    let out = command.output().with_context(|| format!("could not start {shown}: {hint}"))?;
    if !out.status.success() {
        bail!(
            "{shown} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn openssl() -> Command {
    Command::new("openssl")
}

const OPENSSL_HINT: &str = "is openssl installed? (Debian package openssl; scripts/bootstrap.sh installs it)";
const OSSLSIGNCODE_HINT: &str =
    "is osslsigncode installed? (Debian package osslsigncode; scripts/bootstrap.sh installs it)";

impl TestCertificate {
    /// The certificate in `.certs/` at the workspace root, made on first use and renewed when it is about to
    /// expire.
    ///
    /// # Errors
    /// openssl is missing or failed, or `.certs/` cannot be written.
    pub fn ensure() -> Result<Self> {
        let dir = workspace_root().join(".certs");
        let certificate = Self {
            key: dir.join("shunt-test.key"),
            pem: dir.join("shunt-test.crt"),
            der: dir.join(CERTIFICATE_FILE),
            thumbprint: String::new(),
        };
        if !certificate.is_usable() {
            certificate.generate(&dir)?;
        }
        // The DER form is derived from the PEM each time, so the two cannot disagree.
        output(
            openssl()
                .arg("x509")
                .arg("-in")
                .arg(&certificate.pem)
                .args(["-outform", "DER", "-out"])
                .arg(&certificate.der),
            OPENSSL_HINT,
        )?;
        let fingerprint = output(
            openssl().arg("x509").arg("-in").arg(&certificate.pem).args(["-noout", "-fingerprint", "-sha1"]),
            OPENSSL_HINT,
        )?;
        let thumbprint = parse_fingerprint(&fingerprint)
            .with_context(|| format!("unexpected `openssl x509 -fingerprint` output: {fingerprint:?}"))?;
        Ok(Self { thumbprint, ..certificate })
    }

    /// Whether the key and certificate exist and the certificate is valid for long enough.
    fn is_usable(&self) -> bool {
        self.key.is_file()
            && self.pem.is_file()
            && openssl()
                .arg("x509")
                .arg("-in")
                .arg(&self.pem)
                .args(["-noout", "-checkend", RENEW_BEFORE_SECONDS])
                .output()
                .is_ok_and(|o| o.status.success())
    }

    /// Makes a new key and self-signed certificate. It is an end-entity code-signing certificate, as the WDK's
    /// test certificates are (`makecert -r`, `New-SelfSignedCertificate -Type CodeSigningCert`): Windows trusts
    /// it as a root once it is in the Root store.
    fn generate(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        restrict(dir, 0o700)?;
        // Written under temporary names first, so an interrupted run never leaves a key beside a certificate
        // it does not belong to.
        let key_tmp = dir.join("shunt-test.key.tmp");
        let pem_tmp = dir.join("shunt-test.crt.tmp");
        output(
            openssl()
                .args([
                    "req", "-x509", "-newkey", "rsa:3072", "-sha256", "-nodes", "-days", VALID_DAYS, "-subj", SUBJECT,
                ])
                .args(["-addext", "basicConstraints=critical,CA:FALSE"])
                .args(["-addext", "keyUsage=critical,digitalSignature"])
                .args(["-addext", "extendedKeyUsage=codeSigning"])
                .arg("-keyout")
                .arg(&key_tmp)
                .arg("-out")
                .arg(&pem_tmp),
            OPENSSL_HINT,
        )?;
        restrict(&key_tmp, 0o600)?;
        fs::rename(&key_tmp, &self.key).with_context(|| format!("moving the key to {}", self.key.display()))?;
        fs::rename(&pem_tmp, &self.pem).with_context(|| format!("moving the certificate to {}", self.pem.display()))?;
        println!("made a new test-signing certificate in {} (never commit it)", display(dir));
        Ok(())
    }

    /// Signs `input` into `output` (Authenticode, SHA-256), then verifies the result.
    ///
    /// # Errors
    /// osslsigncode is missing or failed, or the signature does not verify against this certificate.
    pub fn sign(&self, input: &Path, signed: &Path) -> Result<()> {
        // osslsigncode refuses to overwrite its output.
        if signed.exists() {
            fs::remove_file(signed).with_context(|| format!("removing {}", signed.display()))?;
        }
        output(
            Command::new("osslsigncode")
                .args(["sign", "-h", "sha256", "-n", "Shunt"])
                .arg("-certs")
                .arg(&self.pem)
                .arg("-key")
                .arg(&self.key)
                .arg("-in")
                .arg(input)
                .arg("-out")
                .arg(signed),
            OSSLSIGNCODE_HINT,
        )?;
        self.verify(signed).with_context(|| {
            format!(
                "the signature of {} does not verify; if .certs/ holds a key and certificate that do not belong \
                 together, delete .certs/ and package again",
                display(signed)
            )
        })
    }

    /// Verifies the Authenticode signature of `file`, trusting only this certificate.
    ///
    /// # Errors
    /// The signature is missing, does not match the file, or does not chain to this certificate.
    pub fn verify(&self, file: &Path) -> Result<()> {
        output(
            Command::new("osslsigncode").args(["verify", "-CAfile"]).arg(&self.pem).arg("-in").arg(file),
            OSSLSIGNCODE_HINT,
        )
        .map(drop)
    }
}

/// `sha1 Fingerprint=AB:CD:…` to `ABCD…`.
fn parse_fingerprint(text: &str) -> Option<String> {
    let hex: String = text.trim().split_once('=')?.1.chars().filter(|c| *c != ':').collect();
    (hex.len() == 40 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| hex.to_ascii_uppercase())
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("restricting the permissions of {}", path.display()))
}

#[cfg(not(unix))]
#[expect(clippy::unnecessary_wraps, reason = "the same signature as the Unix version")]
fn restrict(_path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openssl_fingerprints() {
        assert_eq!(
            parse_fingerprint("sha1 Fingerprint=AB:cd:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23\n")
                .as_deref(),
            Some("ABCD0123456789ABCDEF0123456789ABCDEF0123")
        );
        assert_eq!(parse_fingerprint("SHA1 Fingerprint=AB:CD"), None);
        assert_eq!(parse_fingerprint("no fingerprint"), None);
    }
}
