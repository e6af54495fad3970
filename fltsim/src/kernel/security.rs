//! Tokens, client security contexts and impersonation, as a driver sees them: the subject security context a
//! create carries, `SeCreateClientSecurityFromSubjectContext`, `SeImpersonateClientEx`, `SeDeleteClientSecurity`,
//! `PsImpersonateClient`, `PsRevertToSelf`, `PsReferenceImpersonationToken`, `PsDereferenceImpersonationToken` and
//! `PsGetCurrentThread`.
//!
//! # Tokens
//!
//! A token reaches the driver as an opaque pointer the model hands out: one per (token, primary or impersonation,
//! impersonation level), so the same identity always has the same pointer. Every create's access state carries the
//! requestor's subject security context ([`subject_context`]): the primary token of the requesting thread's process
//! and, when that thread impersonates a client, the impersonation token and its level — what `SeCaptureSubjectContext`
//! captures when the I/O manager builds the create.
//!
//! # Impersonation
//!
//! A thread impersonates at most one client at a time ([`process::impersonation`]): `SeImpersonateClientEx` and
//! `PsImpersonateClient` replace the thread's impersonation, `PsImpersonateClient` with NULL and `PsRevertToSelf`
//! end it. A driver that impersonates in a thread it does not own must leave the thread as it found it: the SMB
//! server's and other servers' threads may already impersonate their own client, so ending "all impersonation" is
//! not restoring it (`PsImpersonateClient`'s remarks: save the previous token with `PsReferenceImpersonationToken` and
//! impersonate it again). A filter callback, or a work item routine, that returns with the thread's impersonation
//! changed is reported ([`Rule::ImpersonationNotRestored`]).
//!
//! # Whose access is checked
//!
//! `IO_FORCE_ACCESS_CHECK` makes a kernel-mode create check access against the *current thread's* security context.
//! When a filter opens a file on behalf of a user's request — from a callback of a user-mode operation, or from a
//! deferred-I/O work item that services one — that context must be the requestor's; a callback that runs in a
//! system worker (a filter above pended the create) would check as SYSTEM. `FltCreateFileEx2` with
//! `IO_FORCE_ACCESS_CHECK` whose thread's effective token is not the requestor's is reported
//! ([`Rule::AccessCheckWrongIdentity`]); the cure is to impersonate the create's subject context around the open.
//!
//! # References
//!
//! Each client security context (until `SeDeleteClientSecurity`) and each impersonation token reference from
//! `PsReferenceImpersonationToken` (until `PsDereferenceImpersonationToken`) is held; what a driver still holds when
//! it unloads is reported ([`Rule::SecurityReferenceLeak`]).

use std::{
    cell::Cell,
    collections::BTreeSet,
    ffi::c_void,
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use windows_sys::{
    Wdk::{
        Foundation::{PETHREAD, SECURITY_SUBJECT_CONTEXT},
        Storage::FileSystem::{Minifilters::FLT_CALLBACK_DATA, SECURITY_CLIENT_CONTEXT},
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_BAD_IMPERSONATION_LEVEL, STATUS_INVALID_PARAMETER, STATUS_NOT_SUPPORTED, STATUS_SUCCESS,
        },
        Security::{
            SECURITY_DYNAMIC_TRACKING, SECURITY_IMPERSONATION_LEVEL, SECURITY_QUALITY_OF_SERVICE, SecurityAnonymous,
            SecurityDelegation, SecurityImpersonation,
        },
    },
};

use super::{
    irql,
    process::{self, Impersonation, Token},
    thread,
};
use crate::{
    guard::guarded,
    verifier::{self, Rule},
};

const DDI: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/";
const CREATE_CLIENT_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-secreateclientsecurityfromsubjectcontext";
const IMPERSONATE_CLIENT_EX_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-seimpersonateclientex";
const DELETE_CLIENT_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-sedeleteclientsecurity";
const PS_IMPERSONATE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-psimpersonateclient";
const REVERT_DOCS: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-psreverttoself";
const REFERENCE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-psreferenceimpersonationtoken";
const DEREFERENCE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-psdereferenceimpersonationtoken";

/// A token object the model handed out.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TokenObject {
    address: usize,
    token: Token,
    /// A primary token (a process's), otherwise an impersonation token at `level`.
    primary: bool,
    level: SECURITY_IMPERSONATION_LEVEL,
}

/// Something a driver holds until it gives it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// A client security context, by the address of the driver's `SECURITY_CLIENT_CONTEXT`.
    Client(usize),
    /// A reference to an impersonation token object.
    TokenReference(usize),
}

#[derive(Default)]
struct State {
    objects: Vec<TokenObject>,
    next_held: u64,
    held: Vec<(u64, Held, Impersonation)>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    f(state().get_or_insert_with(State::default))
}

/// Where the model's token objects live: a range of fake kernel addresses, 64 bytes apart.
const TOKEN_BASE: usize = 0xFFFF_D000_0000_0000;

fn object_for(token: &Token, primary: bool, level: SECURITY_IMPERSONATION_LEVEL) -> *mut c_void {
    let level = if primary { SecurityImpersonation } else { level };
    let address = with_state(|s| {
        if let Some(found) = s.objects.iter().find(|o| o.token == *token && o.primary == primary && o.level == level) {
            return found.address;
        }
        let address = TOKEN_BASE + s.objects.len() * 64;
        s.objects.push(TokenObject { address, token: token.clone(), primary, level });
        address
    });
    std::ptr::without_provenance_mut(address)
}

fn object_at(address: *const c_void) -> Option<TokenObject> {
    with_state(|s| s.objects.iter().find(|o| o.address == address as usize).cloned())
}

/// The subject security context of the current thread, as the I/O manager captures it for a create: the process's
/// primary token and, if the thread impersonates, its impersonation token and level.
#[must_use]
pub fn subject_context() -> SECURITY_SUBJECT_CONTEXT {
    let primary = object_for(&process::current().token, true, SecurityImpersonation);
    match process::impersonation() {
        Some(i) => SECURITY_SUBJECT_CONTEXT {
            ClientToken: object_for(&i.token, false, i.level),
            ImpersonationLevel: i.level,
            PrimaryToken: primary,
            ProcessAuditId: std::ptr::null_mut(),
        },
        None => SECURITY_SUBJECT_CONTEXT {
            ClientToken: std::ptr::null_mut(),
            ImpersonationLevel: SecurityAnonymous,
            PrimaryToken: primary,
            ProcessAuditId: std::ptr::null_mut(),
        },
    }
}

/// The identity of the requestor of the operation whose callback data is at `data`: for a create, the effective
/// token of the subject security context its access state carries; otherwise the primary token of the requesting
/// process.
#[must_use]
pub fn requestor_token(data: usize) -> Option<Token> {
    let data = data as *const FLT_CALLBACK_DATA;
    // SAFETY: the model's own callback data of an operation in flight.
    let callback_data = unsafe { data.as_ref() }?;
    // SAFETY: as above; its parameter block lives as long as it.
    let iopb = unsafe { callback_data.Iopb.as_ref() }?;
    if iopb.MajorFunction == crate::fltmgr::dispatch::IRP_MJ_CREATE {
        // SAFETY: the union holds the Create parameters for IRP_MJ_CREATE.
        let context = unsafe { iopb.Parameters.Create.SecurityContext };
        // SAFETY: the model's IO_SECURITY_CONTEXT of a create in flight (or NULL).
        let access_state = unsafe { context.as_ref() }?.AccessState;
        // SAFETY: the model's ACCESS_STATE of that create (or NULL).
        let subject = &unsafe { access_state.as_ref() }?.SubjectSecurityContext;
        let effective = if subject.ClientToken.is_null() { subject.PrimaryToken } else { subject.ClientToken };
        return object_at(effective).map(|o| o.token);
    }
    crate::fltmgr::dispatch::requestor(data).map(|p| p.token.clone())
}

/// Reports `FltCreateFileEx2` (`api`) with `IO_FORCE_ACCESS_CHECK` made on behalf of a user's request while the
/// thread's effective token is not the requestor's.
pub(crate) fn check_identity_for(api: &'static str) {
    let Some(data) = crate::fltmgr::dispatch::on_behalf_of_user() else { return };
    let Some(requestor) = requestor_token(data) else { return };
    let effective = process::effective_token();
    if effective != requestor {
        verifier::report(
            Rule::AccessCheckWrongIdentity,
            api,
            format!(
                "IO_FORCE_ACCESS_CHECK on behalf of a request from {} checks the thread's token, which is {}: \
                 impersonate the create's subject security context (SeCreateClientSecurityFromSubjectContext, \
                 SeImpersonateClientEx) around the open",
                requestor.user, effective.user
            ),
        );
    }
}

/// The error an access check made with the current thread's token meets: `STATUS_BAD_IMPERSONATION_LEVEL` when the
/// thread impersonates at a level below `SecurityImpersonation`, at which the token may identify its client but
/// not act as it
/// (<https://learn.microsoft.com/windows/win32/api/winnt/ne-winnt-security_impersonation_level>).
///
/// # Errors
/// `STATUS_BAD_IMPERSONATION_LEVEL`.
pub fn access_check_level() -> Result<(), NTSTATUS> {
    match process::impersonation() {
        Some(i) if i.level < SecurityImpersonation => Err(STATUS_BAD_IMPERSONATION_LEVEL),
        _ => Ok(()),
    }
}

fn hold(held: Held, impersonation: Impersonation) {
    with_state(|s| {
        s.next_held += 1;
        let id = s.next_held;
        s.held.push((id, held, impersonation));
    });
}

/// Releases one hold; false when the driver did not hold it.
fn release(held: Held) -> bool {
    with_state(|s| {
        let Some(index) = s.held.iter().position(|(_, h, _)| *h == held) else { return false };
        s.held.remove(index);
        true
    })
}

/// What drivers hold now (for a loader to tell what a driver took since it loaded).
#[must_use]
pub fn held() -> BTreeSet<u64> {
    with_state(|s| s.held.iter().map(|(id, _, _)| *id).collect())
}

/// Reports what was taken since `before` and is still held after `after`.
pub(crate) fn report_leaks(before: &BTreeSet<u64>, after: &str) {
    let leaks: Vec<(Held, Impersonation)> = with_state(|s| {
        s.held.iter().filter(|(id, _, _)| !before.contains(id)).map(|(_, h, i)| (*h, i.clone())).collect()
    });
    for (held, impersonation) in leaks {
        let (api, what) = match held {
            Held::Client(address) => (
                "SeDeleteClientSecurity",
                format!("the client security context at {address:#x} for {}", impersonation.token.user),
            ),
            Held::TokenReference(address) => (
                "PsDereferenceImpersonationToken",
                format!("a reference to the impersonation token {address:#x} of {}", impersonation.token.user),
            ),
        };
        verifier::report(Rule::SecurityReferenceLeak, api, format!("{what} is still held after {after}"));
    }
}

thread_local! {
    /// This thread's `PETHREAD` value, handed out on first use.
    static THREAD_OBJECT: Cell<usize> = const { Cell::new(0) };
}

/// Where the model's thread objects live: fake kernel addresses, 4 KiB apart.
const THREAD_BASE: usize = 0xFFFF_C000_0000_0000;
static NEXT_THREAD: AtomicUsize = AtomicUsize::new(1);

fn current_thread_object() -> PETHREAD {
    let address = THREAD_OBJECT.with(|t| {
        if t.get() == 0 {
            t.set(THREAD_BASE + NEXT_THREAD.fetch_add(1, Ordering::SeqCst) * 4096);
        }
        t.get()
    });
    address.cast_signed()
}

/// `PsGetCurrentThread`: any IRQL; the current thread as an opaque `PETHREAD` (stable for the thread's life).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-psgetcurrentthread>.
#[unsafe(no_mangle)]
pub extern "system" fn PsGetCurrentThread() -> PETHREAD {
    guarded("PsGetCurrentThread", 0, current_thread_object)
}

/// Checks that `thread` names the calling thread: the model cannot act on another thread's security context.
fn this_thread(api: &'static str, thread: PETHREAD) -> bool {
    if thread == current_thread_object() {
        return true;
    }
    verifier::report(
        Rule::UnsupportedByModel,
        api,
        format!(
            "{thread:#x} is not the calling thread's PETHREAD; the model only lets a thread change its own security"
        ),
    );
    false
}

/// `SeCreateClientSecurityFromSubjectContext`: PASSIVE_LEVEL; a subject context the model captured (a create's);
/// a quality of service with a valid impersonation level; a place for the client context. A client that itself
/// impersonates at `SecurityAnonymous` or `SecurityIdentification`, or below `SecurityDelegation` when
/// `ServerIsRemote`, answers `STATUS_BAD_IMPERSONATION_LEVEL`, as the docs list. The client context names the
/// client's effective token at the lower of its own level and the level asked for; it is held until
/// `SeDeleteClientSecurity`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-secreateclientsecurityfromsubjectcontext>.
///
/// # Safety
/// Called by driver code: `SubjectContext` and `ClientSecurityQos` point to initialised structures and
/// `ClientContext` to writable memory for one `SECURITY_CLIENT_CONTEXT`.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn SeCreateClientSecurityFromSubjectContext(
    subject_context: *const SECURITY_SUBJECT_CONTEXT,
    client_security_qos: *const SECURITY_QUALITY_OF_SERVICE,
    server_is_remote: bool,
    client_context: *mut SECURITY_CLIENT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "SeCreateClientSecurityFromSubjectContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, CREATE_CLIENT_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        // SAFETY: the driver passes a subject context (checked non-NULL here).
        let Some(subject) = (unsafe { subject_context.as_ref() }) else {
            return verifier::invalid_argument(API, "SubjectContext is NULL");
        };
        // SAFETY: as above, for the quality of service.
        let Some(qos) = (unsafe { client_security_qos.as_ref() }) else {
            return verifier::invalid_argument(API, "ClientSecurityQos is NULL");
        };
        if client_context.is_null() {
            return verifier::invalid_argument(API, "ClientContext is NULL");
        }
        if !(SecurityAnonymous..=SecurityDelegation).contains(&qos.ImpersonationLevel) {
            return verifier::invalid_argument(
                API,
                format!("ImpersonationLevel {} is not a SECURITY_IMPERSONATION_LEVEL", qos.ImpersonationLevel),
            );
        }
        let impersonating = !subject.ClientToken.is_null();
        let effective = if impersonating { subject.ClientToken } else { subject.PrimaryToken };
        let Some(client) = object_at(effective) else {
            return verifier::invalid_argument(
                API,
                "the subject context holds a token the model did not hand out (use a create's)",
            );
        };
        if impersonating
            && (subject.ImpersonationLevel < SecurityImpersonation
                || (server_is_remote && subject.ImpersonationLevel != SecurityDelegation))
        {
            return STATUS_BAD_IMPERSONATION_LEVEL;
        }
        let level =
            if impersonating { qos.ImpersonationLevel.min(subject.ImpersonationLevel) } else { qos.ImpersonationLevel };
        let token = object_for(&client.token, false, level);
        let context = SECURITY_CLIENT_CONTEXT {
            SecurityQos: *qos,
            ClientToken: token,
            DirectlyAccessClientToken: qos.ContextTrackingMode == u8::from(SECURITY_DYNAMIC_TRACKING)
                && !server_is_remote,
            DirectAccessEffectiveOnly: qos.EffectiveOnly,
            ServerIsRemote: server_is_remote,
            // SAFETY: TOKEN_CONTROL is a plain C struct for which all-zero is valid.
            ClientTokenControl: unsafe { std::mem::zeroed() },
        };
        // SAFETY: checked non-NULL; the driver passes memory for one client context.
        unsafe { client_context.write(context) };
        hold(Held::Client(client_context as usize), Impersonation { token: client.token, level });
        STATUS_SUCCESS
    })
}

/// The client a live client context stands for.
fn client_of(client_context: *const SECURITY_CLIENT_CONTEXT) -> Option<Impersonation> {
    let address = client_context as usize;
    with_state(|s| s.held.iter().find(|(_, h, _)| *h == Held::Client(address)).map(|(_, _, i)| i.clone()))
}

/// `SeImpersonateClientEx`: PASSIVE_LEVEL; a client context `SeCreateClientSecurityFromSubjectContext` initialised
/// and not yet deleted; `ServerThread` NULL (the calling thread) or the calling thread's `PETHREAD` (another thread:
/// `unsupported-by-model`). The thread then impersonates the client at the context's level, replacing any
/// impersonation it had.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-seimpersonateclientex>.
///
/// # Safety
/// Called by driver code with a client context pointer; the model checks it is a live one.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn SeImpersonateClientEx(
    client_context: *const SECURITY_CLIENT_CONTEXT,
    server_thread: PETHREAD,
) -> NTSTATUS {
    const API: &str = "SeImpersonateClientEx";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, IMPERSONATE_CLIENT_EX_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        if server_thread != 0 && !this_thread(API, server_thread) {
            return STATUS_NOT_SUPPORTED;
        }
        let Some(client) = client_of(client_context) else {
            return verifier::invalid_argument(
                API,
                "ClientContext is not a live client security context (created and not deleted)",
            );
        };
        process::set_impersonation(Some(client));
        STATUS_SUCCESS
    })
}

/// `SeDeleteClientSecurity`: PASSIVE_LEVEL; a live client context, deleted once (anything else is reported).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-sedeleteclientsecurity>.
///
/// # Safety
/// Called by driver code with a client context pointer; the model checks it is a live one.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn SeDeleteClientSecurity(client_context: *mut SECURITY_CLIENT_CONTEXT) {
    const API: &str = "SeDeleteClientSecurity";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, DELETE_CLIENT_DOCS) {
            return;
        }
        if !release(Held::Client(client_context as usize)) {
            verifier::invalid_argument(
                API,
                "ClientContext is not a live client security context (created and not deleted)",
            );
        }
    });
}

/// `PsImpersonateClient`: PASSIVE_LEVEL; the calling thread's `PETHREAD`; `Token` NULL (end the impersonation) or
/// a token object the model handed out, which the thread then impersonates at `ImpersonationLevel`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-psimpersonateclient>.
#[unsafe(no_mangle)]
pub extern "system" fn PsImpersonateClient(
    thread_object: PETHREAD,
    token: *const c_void,
    _copy_on_open: bool,
    _effective_only: bool,
    impersonation_level: SECURITY_IMPERSONATION_LEVEL,
) -> NTSTATUS {
    const API: &str = "PsImpersonateClient";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, PS_IMPERSONATE_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        if !this_thread(API, thread_object) {
            return STATUS_NOT_SUPPORTED;
        }
        if token.is_null() {
            process::set_impersonation(None);
            return STATUS_SUCCESS;
        }
        let Some(object) = object_at(token) else {
            return verifier::invalid_argument(API, format!("{token:?} is not a token object"));
        };
        if !(SecurityAnonymous..=SecurityDelegation).contains(&impersonation_level) {
            return verifier::invalid_argument(
                API,
                format!("ImpersonationLevel {impersonation_level} is not a SECURITY_IMPERSONATION_LEVEL"),
            );
        }
        process::set_impersonation(Some(Impersonation { token: object.token, level: impersonation_level }));
        STATUS_SUCCESS
    })
}

/// `PsRevertToSelf`: PASSIVE_LEVEL; ends the calling thread's impersonation (all of it: a thread that impersonated
/// before the driver did no longer does).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-psreverttoself>.
#[unsafe(no_mangle)]
pub extern "system" fn PsRevertToSelf() {
    const API: &str = "PsRevertToSelf";
    guarded(API, (), || {
        if thread::require_irql_at_most(API, irql::PASSIVE, REVERT_DOCS) {
            process::set_impersonation(None);
        }
    });
}

/// `PsReferenceImpersonationToken`: PASSIVE_LEVEL; the calling thread's `PETHREAD`; the thread's impersonation
/// token, referenced (held until `PsDereferenceImpersonationToken`), with its level and flags, or NULL when the
/// thread does not impersonate.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-psreferenceimpersonationtoken>.
///
/// # Safety
/// Called by driver code: the three out-parameters point to writable variables.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn PsReferenceImpersonationToken(
    thread_object: PETHREAD,
    copy_on_open: *mut bool,
    effective_only: *mut bool,
    impersonation_level: *mut SECURITY_IMPERSONATION_LEVEL,
) -> *mut c_void {
    const API: &str = "PsReferenceImpersonationToken";
    guarded(API, std::ptr::null_mut(), || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, REFERENCE_DOCS) || !this_thread(API, thread_object) {
            return std::ptr::null_mut();
        }
        if copy_on_open.is_null() || effective_only.is_null() || impersonation_level.is_null() {
            verifier::invalid_argument(API, "CopyOnOpen, EffectiveOnly and ImpersonationLevel must not be NULL");
            return std::ptr::null_mut();
        }
        let Some(current) = process::impersonation() else { return std::ptr::null_mut() };
        let token = object_for(&current.token, false, current.level);
        // SAFETY: checked non-NULL; the driver passes places for the three answers.
        unsafe {
            copy_on_open.write(false);
        }
        // SAFETY: as above.
        unsafe { effective_only.write(false) };
        // SAFETY: as above.
        unsafe { impersonation_level.write(current.level) };
        hold(Held::TokenReference(token as usize), current);
        token
    })
}

/// `PsDereferenceImpersonationToken`: below DISPATCH_LEVEL; NULL does nothing; otherwise a reference
/// `PsReferenceImpersonationToken` returned, released once.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-psdereferenceimpersonationtoken>.
#[unsafe(no_mangle)]
pub extern "system" fn PsDereferenceImpersonationToken(impersonation_token: *const c_void) {
    const API: &str = "PsDereferenceImpersonationToken";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, DEREFERENCE_DOCS) || impersonation_token.is_null() {
            return;
        }
        if !release(Held::TokenReference(impersonation_token as usize)) {
            verifier::invalid_argument(API, format!("{impersonation_token:?} is not a referenced impersonation token"));
        }
    });
}

/// Runs `f` (a filter callback or a work item routine, `what`) and reports it if it returned with the thread's
/// impersonation changed: it must leave a thread it borrowed as it found it.
pub(crate) fn keeping_impersonation<T>(what: &'static str, f: impl FnOnce() -> T) -> T {
    let before = process::impersonation();
    let result = f();
    let after = process::impersonation();
    if after != before {
        let name = |i: &Option<Impersonation>| i.as_ref().map_or_else(|| "no one".to_owned(), |i| i.token.user.clone());
        verifier::report(
            Rule::ImpersonationNotRestored,
            what,
            format!(
                "returned with the thread impersonating {} instead of {} as when it was called: restore the previous \
                 impersonation (PsReferenceImpersonationToken before, PsImpersonateClient with it after; see {DDI}ntifs/nf-ntifs-psimpersonateclient)",
                name(&after),
                name(&before)
            ),
        );
        // The model puts the thread back, so one mistake is reported once rather than spreading.
        process::set_impersonation(before);
    }
    result
}
