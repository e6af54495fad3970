//! The errors `shuntctl` reports, each with a message a person can act on and an exit code.

use std::process::ExitCode;

/// A failed `shuntctl` command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The command talks to the driver, which only exists on Windows.
    #[error(
        "`shuntctl {command}` needs Windows: it calls {api} in fltlib.dll, which loads Filter Manager drivers; on this host only the policy commands work"
    )]
    #[cfg_attr(windows, expect(dead_code, reason = "only hosts other than Windows lack fltlib.dll"))]
    NeedsWindows {
        /// The subcommand.
        command: &'static str,
        /// The Windows API it would call.
        api: &'static str,
    },
    /// The caller's token does not hold SeLoadDriverPrivilege.
    #[error("SeLoadDriverPrivilege is not held by this account: run shuntctl from an elevated (Administrator) prompt")]
    #[cfg_attr(not(windows), expect(dead_code, reason = "only the Windows build enables privileges"))]
    NoLoadDriverPrivilege,
    /// A Windows call failed.
    #[error("{operation} failed: {message} (HRESULT {hresult:#010x})")]
    #[cfg_attr(not(windows), expect(dead_code, reason = "only the Windows build calls Windows"))]
    Windows {
        /// What was attempted.
        operation: String,
        /// The HRESULT as an unsigned value.
        hresult: u32,
        /// An explanation of the common cases.
        message: String,
    },
    /// A policy file is malformed or invalid; the message names the rule and field.
    #[error("{file}: {message}")]
    Policy {
        /// The policy file.
        file: String,
        /// What is wrong, e.g. `rule "legacy-config": target: wildcards are not allowed in a target`.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The command line is not usable as given.
    #[error("{message}")]
    Usage {
        /// What to change.
        message: String,
    },
    /// `policy test`: no rule matches the path.
    #[error("no rule matches {path}")]
    NoMatch {
        /// The path tested.
        path: String,
    },
}

impl CliError {
    /// The process exit code for this error: 2 for usage and environment errors, 1 for failures of the driver.
    #[must_use]
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::NeedsWindows { .. }
            | Self::NoLoadDriverPrivilege
            | Self::Policy { .. }
            | Self::Io { .. }
            | Self::Usage { .. } => ExitCode::from(2),
            Self::Windows { .. } | Self::NoMatch { .. } => ExitCode::from(1),
        }
    }
}
