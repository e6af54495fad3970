//! Processes and tokens: the System process (pid 4) that system threads belong to, user processes a test creates,
//! the current thread's process, and each thread's impersonation of a client over the process's primary token.
//!
//! Every host thread starts in the System process, as the loader's threads and the system worker threads are;
//! a test runs driver code on behalf of a user process with [`run_as`]. A process is identified to the driver by
//! an opaque `PEPROCESS` value that the model maps back ([`from_peprocess`]).
//!
//! `PsGetCurrentProcess` is a macro for `IoGetCurrentProcess` in wdm.h and is not a symbol windows-sys declares;
//! `PsGetProcessImageFileName` is undocumented and not declared either, so [`Process::image_file_name`] is a model
//! query. Tokens, client security contexts and the impersonation routines drivers call are in
//! [`super::security`]; tests impersonate with [`impersonate`] and read [`effective_token`].

use std::{
    cell::RefCell,
    sync::{Arc, Mutex, PoisonError},
};

use windows_sys::{Wdk::Foundation::PEPROCESS, Win32::Foundation::HANDLE};

use crate::{
    guard::guarded,
    verifier::{self, Rule},
};

/// The System process's id.
pub const SYSTEM_PID: usize = 4;

/// The SID of `LocalSystem`.
pub const SYSTEM_SID: &str = "S-1-5-18";

/// `EPROCESS.ImageFileName` holds this many characters (16 bytes with the terminating NUL).
pub const IMAGE_FILE_NAME_LEN: usize = 15;

/// An access token, reduced to what a filter's decisions depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The user's SID as a string, such as `S-1-5-21-...-1001`, or [`SYSTEM_SID`].
    pub user: String,
    /// Whether the token is an elevated administrator's (`SeTokenIsAdmin`).
    pub admin: bool,
}

impl Token {
    /// `LocalSystem`'s token.
    #[must_use]
    pub fn system() -> Self {
        Self { user: SYSTEM_SID.to_owned(), admin: true }
    }
}

/// A process.
#[derive(Debug, PartialEq, Eq)]
pub struct Process {
    /// The process id (`PsGetProcessId`), a multiple of 4 as on Windows.
    pub id: usize,
    /// The image's full path, such as `\Device\HarddiskVolume3\Windows\System32\notepad.exe`; `System` for the
    /// System process.
    pub image_path: String,
    /// The primary token.
    pub token: Token,
}

impl Process {
    /// The image's file name truncated to 15 characters, as `PsGetProcessImageFileName` returns it from
    /// `EPROCESS.ImageFileName`.
    #[must_use]
    pub fn image_file_name(&self) -> String {
        let name = self.image_path.rsplit(['\\', '/']).next().unwrap_or(&self.image_path);
        name.chars().take(IMAGE_FILE_NAME_LEN).collect()
    }

    /// The opaque `PEPROCESS` value the driver sees for this process.
    #[must_use]
    pub fn peprocess(self: &Arc<Self>) -> PEPROCESS {
        Arc::as_ptr(self).addr().cast_signed()
    }
}

/// Every process ever created; processes are never freed, so a `PEPROCESS` stays valid for the model's life.
static PROCESSES: Mutex<Vec<Arc<Process>>> = Mutex::new(Vec::new());

fn with_processes<T>(f: impl FnOnce(&mut Vec<Arc<Process>>) -> T) -> T {
    let mut all = PROCESSES.lock().unwrap_or_else(PoisonError::into_inner);
    if all.is_empty() {
        all.push(Arc::new(Process { id: SYSTEM_PID, image_path: "System".to_owned(), token: Token::system() }));
    }
    f(&mut all)
}

/// The System process (pid 4).
#[must_use]
pub fn system() -> Arc<Process> {
    with_processes(|all| Arc::clone(&all[0]))
}

/// Creates a user process running `image_path` with `token`, with the next free process id.
#[must_use]
pub fn create(image_path: &str, token: Token) -> Arc<Process> {
    with_processes(|all| {
        let id = all.iter().map(|p| p.id).max().unwrap_or(SYSTEM_PID).max(1000) + 4;
        let process = Arc::new(Process { id, image_path: image_path.to_owned(), token });
        all.push(Arc::clone(&process));
        process
    })
}

/// The process a `PEPROCESS` value stands for, if the model handed it out.
#[must_use]
pub fn from_peprocess(peprocess: PEPROCESS) -> Option<Arc<Process>> {
    with_processes(|all| all.iter().find(|p| p.peprocess() == peprocess).cloned())
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<Process>>> = const { RefCell::new(None) };
    static IMPERSONATION: RefCell<Option<Impersonation>> = const { RefCell::new(None) };
}

/// The current thread's process: the System process unless the thread runs in [`run_as`].
#[must_use]
pub fn current() -> Arc<Process> {
    CURRENT.with(|c| c.borrow().clone()).unwrap_or_else(system)
}

/// Runs `f` with the current thread belonging to `process`, as a user thread that calls into the I/O manager
/// does, then restores the previous process.
pub fn run_as<T>(process: &Arc<Process>, f: impl FnOnce() -> T) -> T {
    let previous = CURRENT.with(|c| c.replace(Some(Arc::clone(process))));
    let result = f();
    CURRENT.with(|c| *c.borrow_mut() = previous);
    result
}

/// A thread's impersonation: the token it acts as and the level at which it may use it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Impersonation {
    /// The client's token.
    pub token: Token,
    /// `SECURITY_IMPERSONATION_LEVEL`: below `SecurityImpersonation` the thread may identify the client but not
    /// act as it, and access checks made with it fail with `STATUS_BAD_IMPERSONATION_LEVEL`.
    pub level: i32,
}

/// Runs `f` with the current thread impersonating `token` at `SecurityImpersonation` level (as a server thread
/// such as the SMB server's does for its client), then restores the thread's previous impersonation, if any. A
/// thread impersonates one client at a time: impersonating replaces the previous impersonation, as on Windows.
pub fn impersonate<T>(token: Token, f: impl FnOnce() -> T) -> T {
    impersonate_at(token, windows_sys::Win32::Security::SecurityImpersonation, f)
}

/// [`impersonate`] at `level` (a `SECURITY_IMPERSONATION_LEVEL`), such as `SecurityIdentification`, at which the
/// thread may identify its client but not act as it.
pub fn impersonate_at<T>(token: Token, level: i32, f: impl FnOnce() -> T) -> T {
    let previous = IMPERSONATION.with(|s| s.replace(Some(Impersonation { token, level })));
    let result = f();
    IMPERSONATION.with(|s| *s.borrow_mut() = previous);
    result
}

/// The current thread's impersonation, if it impersonates a client.
#[must_use]
pub fn impersonation() -> Option<Impersonation> {
    IMPERSONATION.with(|s| s.borrow().clone())
}

/// Sets (or with `None`, ends) the current thread's impersonation, as `SeImpersonateClientEx`,
/// `PsImpersonateClient` and `PsRevertToSelf` do.
pub(crate) fn set_impersonation(impersonation: Option<Impersonation>) {
    IMPERSONATION.with(|s| *s.borrow_mut() = impersonation);
}

/// The token access checks use for the current thread: the impersonation token, else the primary token of the
/// current process.
#[must_use]
pub fn effective_token() -> Token {
    impersonation().map_or_else(|| current().token.clone(), |i| i.token)
}

/// `PsGetCurrentProcessId`: any IRQL; the id of the current thread's process.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-psgetcurrentprocessid>.
#[unsafe(no_mangle)]
pub extern "system" fn PsGetCurrentProcessId() -> HANDLE {
    guarded("PsGetCurrentProcessId", std::ptr::null_mut(), || std::ptr::without_provenance_mut(current().id))
}

/// `IoGetCurrentProcess` (which wdm.h's `PsGetCurrentProcess` macro names): any IRQL; the current process as an
/// opaque `PEPROCESS`. The model does not attach threads to other processes, so this is always the thread's own
/// process.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-iogetcurrentprocess>.
#[unsafe(no_mangle)]
pub extern "system" fn IoGetCurrentProcess() -> PEPROCESS {
    guarded("IoGetCurrentProcess", 0, || current().peprocess())
}

/// `PsGetProcessId`: any IRQL; the id of `process`. A value that is not a `PEPROCESS` the model handed out is
/// reported ([`Rule::InvalidKernelObject`]; Windows would read garbage or fault) and answers NULL.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-psgetprocessid>.
#[unsafe(no_mangle)]
pub extern "system" fn PsGetProcessId(process: PEPROCESS) -> HANDLE {
    const API: &str = "PsGetProcessId";
    guarded(API, std::ptr::null_mut(), || {
        if let Some(p) = from_peprocess(process) {
            return std::ptr::without_provenance_mut(p.id);
        }
        verifier::report(Rule::InvalidKernelObject, API, format!("{process:#x} is not a process object"));
        std::ptr::null_mut()
    })
}
