//! `NtStatus`: the driver's error type, which only ever holds a failure code.

use core::fmt;

use windows_sys::Win32::Foundation::{
    NTSTATUS, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
};

/// A failing NTSTATUS (one for which `NT_SUCCESS` is false).
///
/// Success and informational codes never appear here, so `Result<T, NtStatus>` cannot carry a success code on its
/// error side by accident.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[must_use]
pub struct NtStatus(NTSTATUS);

/// The result of a kernel operation that fails with an NTSTATUS.
pub type NtResult<T = ()> = Result<T, NtStatus>;

impl NtStatus {
    /// `STATUS_INSUFFICIENT_RESOURCES`: a pool allocation failed.
    pub const INSUFFICIENT_RESOURCES: Self = Self(STATUS_INSUFFICIENT_RESOURCES);
    /// `STATUS_INVALID_PARAMETER`.
    pub const INVALID_PARAMETER: Self = Self(STATUS_INVALID_PARAMETER);

    /// Turns a raw NTSTATUS into a `Result`: `Ok(())` when `NT_SUCCESS(raw)`, the failure otherwise.
    ///
    /// # Errors
    /// The failure code, when `raw` is negative.
    pub const fn check(raw: NTSTATUS) -> NtResult {
        if raw >= 0 { Ok(()) } else { Err(Self(raw)) }
    }

    /// The failure code as a raw NTSTATUS.
    #[must_use]
    pub const fn raw(self) -> NTSTATUS {
        self.0
    }

    /// The raw NTSTATUS a callback returns for `result`: `STATUS_SUCCESS` or the failure code.
    #[must_use]
    pub const fn to_raw(result: NtResult) -> NTSTATUS {
        match result {
            Ok(()) => STATUS_SUCCESS,
            Err(status) => status.0,
        }
    }
}

impl fmt::Debug for NtStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // NTSTATUS values are read in hexadecimal everywhere (ntstatus.h, WinDbg's !error).
        write!(f, "NtStatus({:#010x})", self.0.cast_unsigned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_codes_are_ok_and_failures_keep_their_value() {
        assert_eq!(NtStatus::check(STATUS_SUCCESS), Ok(()));
        // STATUS_PENDING and other informational codes count as success, as NT_SUCCESS says.
        assert_eq!(NtStatus::check(0x0000_0103), Ok(()));
        let err = NtStatus::check(STATUS_INSUFFICIENT_RESOURCES).unwrap_err();
        assert_eq!(err.raw(), STATUS_INSUFFICIENT_RESOURCES);
        assert_eq!(NtStatus::to_raw(Err(err)), STATUS_INSUFFICIENT_RESOURCES);
        assert_eq!(format!("{err:?}"), "NtStatus(0xc000009a)");
    }
}
