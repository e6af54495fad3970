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
    NoLoadDriverPrivilege,
    /// A Windows call failed.
    #[error("{operation} failed: {message} (HRESULT {hresult:#010x})")]
    Windows {
        /// What was attempted.
        operation: String,
        /// The HRESULT as an unsigned value.
        hresult: u32,
        /// An explanation of the common cases.
        message: String,
    },
}

impl CliError {
    /// The process exit code for this error: 2 for usage and environment errors, 1 for failures of the driver.
    #[must_use]
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::NeedsWindows { .. } | Self::NoLoadDriverPrivilege => ExitCode::from(2),
            Self::Windows { .. } => ExitCode::from(1),
        }
    }
}
