//! Loading and unloading the driver through fltlib.dll, as `fltmc` does.

use crate::error::CliError;

/// The service name `shunt.inf` installs.
pub const SERVICE_NAME: &str = "shunt";

/// Loads the minifilter `service`.
///
/// # Errors
/// [`CliError::NeedsWindows`] on other hosts; on Windows, a missing privilege or FilterLoad's HRESULT.
pub fn load(service: &str) -> Result<(), CliError> {
    imp::load(service)
}

/// Unloads the minifilter `service` (a non-mandatory unload, which the driver may refuse).
///
/// # Errors
/// [`CliError::NeedsWindows`] on other hosts; on Windows, a missing privilege or FilterUnload's HRESULT.
pub fn unload(service: &str) -> Result<(), CliError> {
    imp::unload(service)
}

#[cfg(not(windows))]
mod imp {
    use crate::error::CliError;

    pub fn load(_service: &str) -> Result<(), CliError> {
        Err(CliError::NeedsWindows { command: "load", api: "FilterLoad" })
    }

    pub fn unload(_service: &str) -> Result<(), CliError> {
        Err(CliError::NeedsWindows { command: "unload", api: "FilterUnload" })
    }
}

#[cfg(windows)]
mod imp {
    use std::ptr::null;

    use windows_sys::Win32::{
        Foundation::{CloseHandle, ERROR_NOT_ALL_ASSIGNED, GetLastError, HANDLE, LUID},
        Security::{
            AdjustTokenPrivileges, LUID_AND_ATTRIBUTES, LookupPrivilegeValueW, SE_LOAD_DRIVER_NAME,
            SE_PRIVILEGE_ENABLED, TOKEN_ADJUST_PRIVILEGES, TOKEN_PRIVILEGES, TOKEN_QUERY,
        },
        Storage::InstallableFileSystems::{FilterLoad, FilterUnload},
        System::Threading::{GetCurrentProcess, OpenProcessToken},
    };

    use crate::error::CliError;

    fn wide(s: &str) -> Vec<u16> {
        s.encode_utf16().chain(std::iter::once(0)).collect()
    }

    fn last_error(operation: &str) -> CliError {
        // SAFETY: GetLastError only reads the calling thread's last-error value.
        let code = unsafe { GetLastError() };
        // HRESULT_FROM_WIN32.
        let hresult = if code == 0 { 0 } else { (code & 0xFFFF) | 0x8007_0000 };
        CliError::Windows { operation: operation.to_owned(), hresult, message: format!("Win32 error {code}") }
    }

    /// Owns a token handle and closes it.
    struct Token(HANDLE);

    impl Drop for Token {
        fn drop(&mut self) {
            // SAFETY: the handle came from OpenProcessToken and is closed once.
            unsafe { CloseHandle(self.0) };
        }
    }

    /// Enables SeLoadDriverPrivilege in the process token: administrators hold it, disabled by default, and
    /// FilterLoad/FilterUnload need it enabled.
    fn enable_load_driver_privilege() -> Result<(), CliError> {
        let mut raw: HANDLE = std::ptr::null_mut();
        // SAFETY: GetCurrentProcess has no preconditions and returns a pseudo-handle.
        let process = unsafe { GetCurrentProcess() };
        // SAFETY: `process` is the current process's pseudo-handle; `raw` is a valid place for the token handle.
        let opened = unsafe { OpenProcessToken(process, TOKEN_ADJUST_PRIVILEGES | TOKEN_QUERY, &raw mut raw) };
        if opened == 0 {
            return Err(last_error("OpenProcessToken"));
        }
        let token = Token(raw);
        let mut luid = LUID { LowPart: 0, HighPart: 0 };
        // SAFETY: the privilege name is a static NUL-terminated string; `luid` is a valid place for the result.
        if unsafe { LookupPrivilegeValueW(null(), SE_LOAD_DRIVER_NAME, &raw mut luid) } == 0 {
            return Err(last_error("LookupPrivilegeValueW(SeLoadDriverPrivilege)"));
        }
        let privileges = TOKEN_PRIVILEGES {
            PrivilegeCount: 1,
            Privileges: [LUID_AND_ATTRIBUTES { Luid: luid, Attributes: SE_PRIVILEGE_ENABLED }],
        };
        // SAFETY: the token was opened with TOKEN_ADJUST_PRIVILEGES; `privileges` is a valid one-entry array.
        let adjusted = unsafe {
            AdjustTokenPrivileges(token.0, 0, &raw const privileges, 0, std::ptr::null_mut(), std::ptr::null_mut())
        };
        if adjusted == 0 {
            return Err(last_error("AdjustTokenPrivileges"));
        }
        // AdjustTokenPrivileges succeeds without enabling a privilege the token does not hold.
        // SAFETY: reads the thread's last error, set by AdjustTokenPrivileges.
        if unsafe { GetLastError() } == ERROR_NOT_ALL_ASSIGNED {
            return Err(CliError::NoLoadDriverPrivilege);
        }
        Ok(())
    }

    fn explain(hresult: u32) -> String {
        match hresult {
            0x8007_0002 => "the service is not installed (run install.cmd first)".to_owned(),
            0x8007_0005 => "access denied: run from an elevated prompt".to_owned(),
            0x8007_0420 => "the driver is already loaded".to_owned(),
            0x801F_0013 => "the driver is not loaded".to_owned(),
            0x8007_0241 => "Windows could not verify the driver's signature (is test signing on?)".to_owned(),
            0x801F_0010 => "the driver refused to unload (files are still redirected)".to_owned(),
            _ => "see the Windows event log (System) for the driver's status".to_owned(),
        }
    }

    fn check(operation: &str, hresult: i32) -> Result<(), CliError> {
        if hresult >= 0 {
            return Ok(());
        }
        let hresult = hresult.cast_unsigned();
        Err(CliError::Windows { operation: operation.to_owned(), hresult, message: explain(hresult) })
    }

    pub fn load(service: &str) -> Result<(), CliError> {
        enable_load_driver_privilege()?;
        let name = wide(service);
        // SAFETY: `name` is a NUL-terminated UTF-16 string that outlives the call.
        check(&format!("FilterLoad({service})"), unsafe { FilterLoad(name.as_ptr()) })
    }

    pub fn unload(service: &str) -> Result<(), CliError> {
        enable_load_driver_privilege()?;
        let name = wide(service);
        // SAFETY: `name` is a NUL-terminated UTF-16 string that outlives the call.
        check(&format!("FilterUnload({service})"), unsafe { FilterUnload(name.as_ptr()) })
    }
}
