//! Communication ports: the minifilter's control channel to user mode, with the user-mode side tests (and, later, a
//! transport for shuntctl) use to connect and send messages, and the raw user buffers `MessageNotify` receives.
//!
//! Kernel side, as exports: `FltCreateCommunicationPort`, `FltCloseCommunicationPort`, `FltCloseClientPort`,
//! `FltBuildDefaultSecurityDescriptor`, `FltFreeSecurityDescriptor`, and `MmCopyMemory`, the documented routine that
//! reads user memory safely. User side, as model calls: [`connect`] is `FilterConnectCommunicationPort`,
//! [`ClientConnection::send`] is `FilterSendMessage`, [`ClientConnection::disconnect`] (or dropping the connection)
//! is closing the port handle.
//!
//! # User buffers
//!
//! `MessageNotify`'s `InputBuffer` and `OutputBuffer` "are raw, unlocked user-mode addresses" that "must only be
//! accessed from within a try/except block"
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_message_notify>). Rust has
//! no SEH, so Shunt copies them through a small C routine that does the whole copy inside `__try/__except`; on the
//! host the driver calls the model's equivalents instead: [`copy_from_user`] and [`copy_to_user`] (the C routine's
//! semantics: the copy, or `STATUS_ACCESS_VIOLATION` when the address faults), or the `MmCopyMemory` export for
//! reads. A [`UserBuffer`] is ordinary memory, a buffer whose address faults, or one another user thread rewrites
//! after the driver's first read. What the model can and cannot see on the host:
//!
//! - It sees every access made through its copy routines: reads of the same bytes twice in one message
//!   ([`Rule::UserBufferDoubleFetch`]), copies made outside the client's process (posted to a worker) or after the
//!   message returned ([`Rule::UserBufferUnsafeAccess`]).
//! - It sees direct *writes*: after the callback it compares each buffer with what the copy routines wrote.
//! - It cannot see a direct *read*. A faulting buffer is real memory filled with [`FAULT_FILL`] (dereferencing it
//!   cannot crash the host, and cannot be caught: the model does not map no-access pages), so a direct read returns
//!   poison; and a callback that succeeds on a faulting input buffer it never asked a copy routine to read is
//!   reported, since on Windows a direct read there would have bugchecked. A direct read of ordinary memory passes
//!   unnoticed, as a direct read that happens not to fault does on Windows.
//!
//! # A transport
//!
//! [`connect`] and [`ClientConnection::send_bytes`] take and return plain bytes, so a host process serving the port
//! over a Unix socket needs no other API: it loads the driver, accepts a socket, maps the peer's credentials to a
//! [`Process`] (`process::create` with an administrator token for uid 0), calls [`connect`] with the port name and
//! context bytes from the first frame, answers each later frame (input bytes and an output capacity) with the
//! status or the bytes [`ClientConnection::send_bytes`] returns, and calls [`ClientConnection::disconnect`] when the
//! socket closes.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::OBJECT_ATTRIBUTES,
        Storage::FileSystem::Minifilters::{
            FLT_PORT_CONNECT, PFLT_CONNECT_NOTIFY, PFLT_DISCONNECT_NOTIFY, PFLT_FILTER, PFLT_MESSAGE_NOTIFY, PFLT_PORT,
        },
        System::SystemServices::{MM_COPY_ADDRESS, MM_COPY_MEMORY_PHYSICAL, MM_COPY_MEMORY_VIRTUAL},
    },
    Win32::{
        Foundation::{
            NTSTATUS, OBJ_CASE_INSENSITIVE, OBJ_KERNEL_HANDLE, STATUS_ACCESS_DENIED, STATUS_ACCESS_VIOLATION,
            STATUS_CONNECTION_COUNT_LIMIT, STATUS_FLT_DELETING_OBJECT, STATUS_INSUFFICIENT_RESOURCES,
            STATUS_INVALID_PARAMETER, STATUS_NOT_SUPPORTED, STATUS_OBJECT_NAME_COLLISION, STATUS_OBJECT_NAME_NOT_FOUND,
            STATUS_PARTIAL_COPY, STATUS_PORT_DISCONNECTED, STATUS_SUCCESS, UNICODE_STRING,
        },
        Security::PSECURITY_DESCRIPTOR,
        Storage::FileSystem::STANDARD_RIGHTS_ALL,
    },
};

use super::registration::filters;
use crate::{
    guard::guarded,
    kernel::{
        irql,
        pool::{self, ExAllocatePool2, ExFreePoolWithTag},
        process::{self, Process, SYSTEM_SID, Token},
        thread,
    },
    verifier::{self, Rule},
};

const CREATE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcreatecommunicationport";
const CLOSE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltclosecommunicationport";
const CLOSE_CLIENT_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcloseclientport";
const BUILD_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltbuilddefaultsecuritydescriptor";
const FREE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltfreesecuritydescriptor";
const MMCOPYMEMORY_DOCS: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-mmcopymemory";

/// `FLT_PORT_ALL_ACCESS` (fltkernel.h): `FLT_PORT_CONNECT | STANDARD_RIGHTS_ALL`. windows-sys does not declare it.
pub const FLT_PORT_ALL_ACCESS: u32 = FLT_PORT_CONNECT | STANDARD_RIGHTS_ALL;

/// The byte a faulting user buffer is filled with, so a direct read sees poison instead of the message.
pub const FAULT_FILL: u8 = 0xF7;

/// The pool tag of the security descriptors `FltBuildDefaultSecurityDescriptor` allocates (paged pool, as the docs
/// say); one never freed is a pool leak at unload.
pub const SECURITY_DESCRIPTOR_TAG: u32 = u32::from_le_bytes(*b"FMsd");

/// The size of a model security descriptor: the self-relative default one with two ACEs is about this large.
const SECURITY_DESCRIPTOR_SIZE: usize = 80;

/// Who may connect to a port, as its security descriptor grants it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grants {
    /// `FltBuildDefaultSecurityDescriptor`'s descriptor: "only users with system or administrator privileges have
    /// access", with the access mask the driver asked for.
    SystemAndAdministrators {
        /// The `DesiredAccess` the descriptor was built with; connecting needs `FLT_PORT_CONNECT`.
        access: u32,
    },
    /// Everyone. A NULL descriptor leaves the port to the object manager's defaults, which the docs do not state and
    /// the model does not know: it assumes the worst, so a test expecting users to be refused fails.
    Everyone,
}

impl Grants {
    fn allow(self, token: &Token) -> bool {
        match self {
            Self::SystemAndAdministrators { access } => {
                access & FLT_PORT_CONNECT != 0 && (token.admin || token.user == SYSTEM_SID)
            }
            Self::Everyone => true,
        }
    }
}

/// A raw user-mode buffer of one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UserBuffer {
    /// Ordinary readable and writable memory holding these bytes (for an output buffer, its contents before the
    /// call).
    Memory(Vec<u8>),
    /// This many bytes at an address that faults (freed or protected by another user thread): the copy routines
    /// answer `STATUS_ACCESS_VIOLATION`, and the memory behind the pointer holds [`FAULT_FILL`].
    Faulting(usize),
    /// Memory another user thread rewrites: it holds `first` until the driver's first read through a copy routine,
    /// and `then` (cut or padded to the length of `first`) from the end of that read on.
    Changing {
        /// The contents until the first read.
        first: Vec<u8>,
        /// The contents after it.
        then: Vec<u8>,
    },
}

impl UserBuffer {
    /// The buffer's length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Self::Memory(bytes) | Self::Changing { first: bytes, .. } => bytes.len(),
            Self::Faulting(len) => *len,
        }
    }

    /// Whether the buffer is empty (the driver then gets a NULL pointer).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn initial(&self) -> Vec<u8> {
        match self {
            Self::Memory(bytes) | Self::Changing { first: bytes, .. } => bytes.clone(),
            Self::Faulting(len) => vec![FAULT_FILL; *len],
        }
    }
}

struct Server {
    handle: PFLT_PORT,
    filter: PFLT_FILTER,
    name: String,
    case_insensitive: bool,
    cookie: usize,
    connect: PFLT_CONNECT_NOTIFY,
    disconnect: PFLT_DISCONNECT_NOTIFY,
    message: PFLT_MESSAGE_NOTIFY,
    max_connections: usize,
    grants: Grants,
    open: bool,
}

struct Client {
    handle: PFLT_PORT,
    server: PFLT_PORT,
    filter: PFLT_FILTER,
    process: Arc<Process>,
    cookie: usize,
    disconnect: PFLT_DISCONNECT_NOTIFY,
    /// The user still holds its handle.
    user_connected: bool,
    /// `DisconnectNotify` was called (or is running).
    notified: bool,
    /// `FltCloseClientPort` was called.
    closed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Memory,
    Faulting,
    Changing,
}

/// A user buffer of a message in flight.
struct Live {
    message: u64,
    address: usize,
    len: usize,
    kind: Kind,
    pid: usize,
    input: bool,
    /// What the memory holds through the model's own writes (copy routines, the other thread's rewrite).
    expected: Vec<u8>,
    /// The contents after the rewrite of a `Changing` buffer, until it happens.
    then: Option<Vec<u8>>,
    read: Vec<bool>,
    attempted: bool,
}

#[derive(Default)]
struct State {
    next_port: usize,
    next_message: u64,
    servers: Vec<Server>,
    clients: Vec<Client>,
    /// Live descriptors from `FltBuildDefaultSecurityDescriptor`: address → access mask.
    descriptors: Vec<(usize, u32)>,
    buffers: Vec<Live>,
    /// Address ranges of user buffers whose message has returned.
    retired: Vec<(usize, usize)>,
}

/// Retired ranges remembered; enough for any scenario, bounded for long ones.
const RETIRED_KEPT: usize = 1024;

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    f(state().get_or_insert_with(State::default))
}

fn new_port_handle(s: &mut State) -> PFLT_PORT {
    s.next_port = s.next_port.wrapping_add(1);
    0x0000_7ff3_3000_0000_usize.wrapping_add(s.next_port.wrapping_mul(0x100)).cast_signed()
}

/// Reads a `UNICODE_STRING` a driver passed.
///
/// # Safety
/// `s` must be NULL or point to a valid `UNICODE_STRING` whose buffer holds `Length` bytes.
unsafe fn read_unicode(s: *const UNICODE_STRING) -> Option<String> {
    // SAFETY: the caller guarantees `s` is NULL or valid.
    let s = unsafe { s.as_ref() }?;
    if s.Buffer.is_null() {
        return None;
    }
    // SAFETY: the buffer holds `Length` bytes, i.e. `Length / 2` UTF-16 units.
    let units = unsafe { std::slice::from_raw_parts(s.Buffer, usize::from(s.Length / 2)) };
    Some(String::from_utf16_lossy(units))
}

/// Runs a driver callback at PASSIVE_LEVEL in `process`, reporting a callback that returns unbalanced.
fn call_in(process: &Arc<Process>, api: &'static str, f: impl FnOnce() -> NTSTATUS) -> NTSTATUS {
    process::run_as(process, || {
        thread::at_irql(irql::PASSIVE, || {
            let before = thread::snapshot();
            let status = f();
            thread::check_balanced(api, &before);
            status
        })
    })
}

/// `FltCreateCommunicationPort`.
///
/// Rules: PASSIVE_LEVEL; a registered filter (`STATUS_FLT_DELETING_OBJECT` once unregistered); non-NULL
/// `ServerPort` and `ObjectAttributes`; `Length` = `sizeof(OBJECT_ATTRIBUTES)`; `OBJ_KERNEL_HANDLE` in `Attributes`
/// (else `STATUS_INVALID_PARAMETER`, as documented, and reported); a non-empty `ObjectName`; non-NULL connect and
/// disconnect callbacks; `MaxConnections` > 0. A name already in use answers `STATUS_OBJECT_NAME_COLLISION`
/// (not reported). The port captures what its security descriptor grants ([`Grants`]), so the driver may free the
/// descriptor at once; a descriptor the model did not build is `unsupported-by-model` and treated as
/// [`Grants::Everyone`]. Ports still open at unload are reported ([`Rule::PortLeak`]).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcreatecommunicationport>.
///
/// # Safety
/// Called by driver code with the pointers it has; the model reads them as Filter Manager would.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltCreateCommunicationPort(
    filter: PFLT_FILTER,
    server_port: *mut PFLT_PORT,
    object_attributes: *const OBJECT_ATTRIBUTES,
    server_port_cookie: *const c_void,
    connect_notify: PFLT_CONNECT_NOTIFY,
    disconnect_notify: PFLT_DISCONNECT_NOTIFY,
    message_notify: PFLT_MESSAGE_NOTIFY,
    max_connections: i32,
) -> NTSTATUS {
    const API: &str = "FltCreateCommunicationPort";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, CREATE_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        let Some(record) = filters().into_iter().find(|f| f.handle == filter) else {
            verifier::report(Rule::InvalidFilterHandle, API, format!("{filter:#x} is not a registered filter"));
            return STATUS_INVALID_PARAMETER;
        };
        if record.unregistered {
            return STATUS_FLT_DELETING_OBJECT;
        }
        if server_port.is_null() || object_attributes.is_null() {
            return verifier::invalid_argument(API, "ServerPort and ObjectAttributes are required");
        }
        // SAFETY: checked non-NULL; the driver passes its initialized attributes.
        let attributes = unsafe { &*object_attributes };
        if usize::try_from(attributes.Length).ok() != Some(size_of::<OBJECT_ATTRIBUTES>()) {
            return verifier::invalid_argument(
                API,
                format!("ObjectAttributes.Length is {}, not sizeof(OBJECT_ATTRIBUTES)", attributes.Length),
            );
        }
        if attributes.Attributes & OBJ_KERNEL_HANDLE == 0 {
            return verifier::invalid_argument(API, "ObjectAttributes.Attributes must include OBJ_KERNEL_HANDLE");
        }
        // SAFETY: the attributes name a UNICODE_STRING the driver keeps alive for the call.
        let name = unsafe { read_unicode(attributes.ObjectName) }.unwrap_or_default();
        if name.is_empty() {
            return verifier::invalid_argument(API, "ObjectAttributes.ObjectName must name the port");
        }
        if connect_notify.is_none() || disconnect_notify.is_none() {
            return verifier::invalid_argument(API, "ConnectNotifyCallback and DisconnectNotifyCallback are required");
        }
        let Some(max_connections) = usize::try_from(max_connections).ok().filter(|&m| m > 0) else {
            return verifier::invalid_argument(
                API,
                format!("MaxConnections is {max_connections}; it must be greater than zero"),
            );
        };
        let descriptor = attributes.SecurityDescriptor as usize;
        let known = with_state(|s| s.descriptors.iter().find(|(d, _)| *d == descriptor).map(|(_, a)| *a));
        let grants = match (descriptor, known) {
            (0, _) => Grants::Everyone,
            (_, Some(access)) => Grants::SystemAndAdministrators { access },
            (_, None) => {
                verifier::report(
                    Rule::UnsupportedByModel,
                    API,
                    format!(
                        "security descriptor {descriptor:#x} was not built by FltBuildDefaultSecurityDescriptor; \
                         the model cannot read it and treats the port as open to everyone"
                    ),
                );
                Grants::Everyone
            }
        };
        let case_insensitive = attributes.Attributes & OBJ_CASE_INSENSITIVE != 0;
        let handle = with_state(|s| {
            if s.servers.iter().any(|p| p.open && p.name.eq_ignore_ascii_case(&name)) {
                return None;
            }
            let handle = new_port_handle(s);
            s.servers.push(Server {
                handle,
                filter,
                name,
                case_insensitive,
                cookie: server_port_cookie as usize,
                connect: connect_notify,
                disconnect: disconnect_notify,
                message: message_notify,
                max_connections,
                grants,
                open: true,
            });
            Some(handle)
        });
        let Some(handle) = handle else { return STATUS_OBJECT_NAME_COLLISION };
        // SAFETY: checked non-NULL; the driver passes a place for the port.
        unsafe { server_port.write(handle) };
        STATUS_SUCCESS
    })
}

/// `FltCloseCommunicationPort`: PASSIVE_LEVEL; an open server port, closed once. Existing connections stay; new
/// ones fail with `STATUS_OBJECT_NAME_NOT_FOUND`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltclosecommunicationport>.
#[unsafe(no_mangle)]
pub extern "system" fn FltCloseCommunicationPort(server_port: PFLT_PORT) {
    const API: &str = "FltCloseCommunicationPort";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, CLOSE_DOCS) {
            return;
        }
        let closed = with_state(|s| {
            let port = s.servers.iter_mut().find(|p| p.handle == server_port && p.open)?;
            port.open = false;
            Some(())
        });
        if closed.is_none() {
            verifier::invalid_argument(API, format!("{server_port:#x} is not an open server port"));
        }
    });
}

/// `FltCloseClientPort`: PASSIVE_LEVEL; `ClientPort` points to an open client port of `Filter`, which it closes and
/// sets to NULL. A variable already NULL is left alone (the docs say only that it must not be NULL "on input"; the
/// model is lenient, as drivers commonly call it from both the disconnect callback and unload). After the driver
/// closed it, the user's sends fail with `STATUS_PORT_DISCONNECTED` and its disconnect callback is not called.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcloseclientport>.
///
/// # Safety
/// Called by driver code: `ClientPort` must point to the variable holding the port.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltCloseClientPort(filter: PFLT_FILTER, client_port: *mut PFLT_PORT) {
    const API: &str = "FltCloseClientPort";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, CLOSE_CLIENT_DOCS) {
            return;
        }
        if client_port.is_null() {
            verifier::invalid_argument(API, "ClientPort must not be NULL");
            return;
        }
        // SAFETY: checked non-NULL; the driver passes its variable.
        let port = unsafe { client_port.read() };
        if port == 0 {
            return;
        }
        let outcome = with_state(|s| {
            let client = s.clients.iter_mut().find(|c| c.handle == port && !c.closed)?;
            if client.filter != filter {
                return Some(false);
            }
            client.closed = true;
            Some(true)
        });
        match outcome {
            None => {
                verifier::invalid_argument(API, format!("{port:#x} is not an open client port"));
            }
            Some(false) => {
                verifier::invalid_argument(
                    API,
                    format!("client port {port:#x} belongs to another filter than {filter:#x}"),
                );
            }
            // SAFETY: checked non-NULL; FltCloseClientPort sets the variable to NULL.
            Some(true) => unsafe { client_port.write(0) },
        }
    });
}

/// `FltBuildDefaultSecurityDescriptor`: ≤ APC_LEVEL; a descriptor from paged pool that grants `DesiredAccess` to
/// SYSTEM and administrators only ([`Grants::SystemAndAdministrators`]); `STATUS_INSUFFICIENT_RESOURCES` when the
/// pool allocation fails (failure injection applies: tag [`SECURITY_DESCRIPTOR_TAG`]).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltbuilddefaultsecuritydescriptor>.
///
/// # Safety
/// Called by driver code: `SecurityDescriptor` must be a valid place for the pointer.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltBuildDefaultSecurityDescriptor(
    security_descriptor: *mut PSECURITY_DESCRIPTOR,
    desired_access: u32,
) -> NTSTATUS {
    const API: &str = "FltBuildDefaultSecurityDescriptor";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, BUILD_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        if security_descriptor.is_null() {
            return verifier::invalid_argument(API, "SecurityDescriptor must not be NULL");
        }
        let memory = ExAllocatePool2(pool::flags::PAGED, SECURITY_DESCRIPTOR_SIZE, SECURITY_DESCRIPTOR_TAG);
        if memory.is_null() {
            return STATUS_INSUFFICIENT_RESOURCES;
        }
        with_state(|s| s.descriptors.push((memory as usize, desired_access)));
        // SAFETY: checked non-NULL; the driver passes a place for the descriptor.
        unsafe { security_descriptor.write(memory) };
        STATUS_SUCCESS
    })
}

/// `FltFreeSecurityDescriptor`: ≤ APC_LEVEL; only a descriptor `FltBuildDefaultSecurityDescriptor` returned, freed
/// once (anything else is reported and left alone).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltfreesecuritydescriptor>.
#[unsafe(no_mangle)]
pub extern "system" fn FltFreeSecurityDescriptor(security_descriptor: PSECURITY_DESCRIPTOR) {
    const API: &str = "FltFreeSecurityDescriptor";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, FREE_DOCS) {
            return;
        }
        let address = security_descriptor as usize;
        let known = with_state(|s| {
            let index = s.descriptors.iter().position(|(d, _)| *d == address)?;
            s.descriptors.swap_remove(index);
            Some(())
        });
        if known.is_none() {
            verifier::invalid_argument(
                API,
                format!("{address:#x} is not a descriptor FltBuildDefaultSecurityDescriptor returned"),
            );
            return;
        }
        ExFreePoolWithTag(security_descriptor, SECURITY_DESCRIPTOR_TAG);
    });
}

/// What a copy routine found at an address.
enum Target {
    /// A user buffer of a message in flight, at this index of `State::buffers`, this offset into it.
    User(usize, usize),
    /// Live pool: kernel memory the model may copy directly.
    Pool,
    /// A user buffer whose message has returned.
    Retired,
    /// Memory the model did not hand out.
    Unknown,
}

fn locate(s: &State, address: usize, len: usize) -> Target {
    if let Some((index, live)) =
        s.buffers.iter().enumerate().find(|(_, b)| address >= b.address && address - b.address < b.len)
    {
        return Target::User(index, address - live.address);
    }
    let end = address.saturating_add(len);
    if pool::live().iter().any(|a| address >= a.address && end <= a.address.saturating_add(a.size)) {
        return Target::Pool;
    }
    if s.retired.iter().any(|&(start, n)| address >= start && address - start < n) {
        return Target::Retired;
    }
    Target::Unknown
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    FromUser,
    ToUser,
}

/// One copy between a user buffer (or pool) and kernel memory, as a `__try/__except` copy routine would make it.
/// Returns the status and the bytes copied.
///
/// # Safety
/// `kernel` must be valid for `len` bytes in the copy's direction; `user` is checked by the model.
unsafe fn copy(
    api: &'static str,
    direction: Direction,
    kernel: *mut u8,
    user: *mut u8,
    len: usize,
) -> (NTSTATUS, usize) {
    if len == 0 {
        return (STATUS_SUCCESS, 0);
    }
    let pid = process::current().id;
    let mut reports: Vec<(Rule, String)> = Vec::new();
    let outcome = with_state(|s| {
        let (index, offset) = match locate(s, user as usize, len) {
            Target::User(index, offset) => (index, offset),
            Target::Pool => return Some(len),
            Target::Retired => {
                reports.push((
                    Rule::UserBufferUnsafeAccess,
                    format!("{user:?} is a user buffer of a message that has returned"),
                ));
                return None;
            }
            Target::Unknown => {
                reports.push((
                    Rule::UnsupportedByModel,
                    format!("{user:?} is neither a user buffer of a message in flight nor live pool"),
                ));
                return None;
            }
        };
        let live = s.buffers.get_mut(index)?;
        live.attempted = true;
        if live.pid != pid {
            reports.push((
                Rule::UserBufferUnsafeAccess,
                format!(
                    "the user buffer belongs to process {} but the copy runs in process {pid}: the address is only \
                     valid in the client's process",
                    live.pid
                ),
            ));
            return None;
        }
        if live.kind == Kind::Faulting {
            return None;
        }
        let available = len.min(live.len - offset);
        if direction == Direction::FromUser {
            let range = offset..offset + available;
            if live.read.get(range.clone()).is_some_and(|r| r.iter().any(|&b| b)) {
                reports.push((
                    Rule::UserBufferDoubleFetch,
                    format!(
                        "the read of bytes {}..{} of the {} buffer overlaps bytes already read in this message; \
                         capture the buffer once and use only the copy",
                        range.start,
                        range.end,
                        if live.input { "input" } else { "output" }
                    ),
                ));
            }
            if let Some(read) = live.read.get_mut(range) {
                read.fill(true);
            }
        } else {
            // SAFETY: the caller guarantees `kernel` holds `len` ≥ `available` readable bytes.
            let written = unsafe { std::slice::from_raw_parts(kernel.cast_const(), available) };
            if let Some(expected) = live.expected.get_mut(offset..offset + available) {
                expected.copy_from_slice(written);
            }
        }
        Some(available)
    });
    for (rule, detail) in reports {
        verifier::report(rule, api, detail);
    }
    let Some(available) = outcome else { return (STATUS_ACCESS_VIOLATION, 0) };
    match direction {
        // SAFETY: the model checked `user` holds `available` bytes (a live user buffer or pool); the caller
        // guarantees `kernel` does.
        Direction::FromUser => unsafe { std::ptr::copy(user.cast_const(), kernel, available) },
        // SAFETY: as above.
        Direction::ToUser => unsafe { std::ptr::copy(kernel.cast_const(), user, available) },
    }
    if direction == Direction::FromUser {
        rewrite_after_first_read(user);
    }
    (if available < len { STATUS_PARTIAL_COPY } else { STATUS_SUCCESS }, available)
}

/// The other user thread of a [`UserBuffer::Changing`] buffer rewrites it once the driver's first read is done.
fn rewrite_after_first_read(user: *mut u8) {
    let rewrite = with_state(|s| {
        let Target::User(index, offset) = locate(s, user as usize, 1) else { return None };
        let live = s.buffers.get_mut(index)?;
        let then = live.then.take()?;
        live.expected.clone_from(&then);
        Some((offset, then))
    });
    if let Some((offset, then)) = rewrite {
        let start = user.wrapping_sub(offset);
        // SAFETY: `start` is the start of the live user buffer `user` points into, which holds `then.len()` bytes
        // (the rewrite is cut or padded to the buffer's length).
        unsafe { std::ptr::copy_nonoverlapping(then.as_ptr(), start, then.len()) };
    }
}

/// The model's equivalent of Shunt's C routine that reads user memory inside `__try/__except`: copies `length`
/// bytes from the user buffer `source` to the kernel buffer `destination` and returns `STATUS_SUCCESS`, or
/// `STATUS_ACCESS_VIOLATION` (nothing copied) when the address faults, or `STATUS_PARTIAL_COPY` when the range runs
/// past the buffer (the bytes within it copied). ≤ APC_LEVEL, as any access to pageable user memory. Reads of
/// bytes already read in the same message are reported ([`Rule::UserBufferDoubleFetch`]); so are copies outside
/// the client's process or after the message returned ([`Rule::UserBufferUnsafeAccess`]). Live pool is copied as
/// kernel memory.
///
/// # Safety
/// `destination` must be valid for `length` bytes of writes.
pub unsafe fn copy_from_user(destination: *mut c_void, source: *const c_void, length: usize) -> NTSTATUS {
    const API: &str = "copy_from_user";
    guarded(API, STATUS_ACCESS_VIOLATION, || {
        if !thread::require_irql_at_most(API, irql::APC, MMCOPYMEMORY_DOCS) {
            return STATUS_ACCESS_VIOLATION;
        }
        // SAFETY: the caller guarantees `destination`; the model checks `source`.
        unsafe { copy(API, Direction::FromUser, destination.cast(), source.cast_mut().cast(), length) }.0
    })
}

/// The model's equivalent of Shunt's C routine that writes user memory inside `__try/__except`: copies `length`
/// bytes from the kernel buffer `source` to the user buffer `destination`, with the statuses of
/// [`copy_from_user`]. The model records what it wrote, so a write that bypasses this routine is found when the
/// callback returns.
///
/// # Safety
/// `source` must be valid for `length` bytes of reads.
pub unsafe fn copy_to_user(destination: *mut c_void, source: *const c_void, length: usize) -> NTSTATUS {
    const API: &str = "copy_to_user";
    guarded(API, STATUS_ACCESS_VIOLATION, || {
        if !thread::require_irql_at_most(API, irql::APC, MMCOPYMEMORY_DOCS) {
            return STATUS_ACCESS_VIOLATION;
        }
        // SAFETY: the caller guarantees `source`; the model checks `destination`.
        unsafe { copy(API, Direction::ToUser, source.cast_mut().cast(), destination.cast(), length) }.0
    })
}

/// `MmCopyMemory`: ≤ APC_LEVEL; exactly one of `MM_COPY_MEMORY_VIRTUAL` and `MM_COPY_MEMORY_PHYSICAL` (physical
/// addresses are not modelled: `unsupported-by-model`, `STATUS_NOT_SUPPORTED`); a place for the count. A virtual
/// source is read as [`copy_from_user`] reads it: a faulting user buffer answers an error status with nothing
/// transferred instead of crashing, as the docs promise.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntddk/nf-ntddk-mmcopymemory>.
///
/// # Safety
/// Called by driver code: `TargetAddress` must be valid for `NumberOfBytes` bytes of writes.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn MmCopyMemory(
    target_address: *const c_void,
    source_address: MM_COPY_ADDRESS,
    number_of_bytes: usize,
    flags: u32,
    number_of_bytes_transferred: *mut usize,
) -> NTSTATUS {
    const API: &str = "MmCopyMemory";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, MMCOPYMEMORY_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        if number_of_bytes_transferred.is_null() || (target_address.is_null() && number_of_bytes > 0) {
            return verifier::invalid_argument(API, "TargetAddress and NumberOfBytesTransferred are required");
        }
        if flags == MM_COPY_MEMORY_PHYSICAL {
            verifier::report(Rule::UnsupportedByModel, API, "physical addresses are not modelled");
            return STATUS_NOT_SUPPORTED;
        }
        if flags != MM_COPY_MEMORY_VIRTUAL {
            return verifier::invalid_argument(
                API,
                format!("Flags {flags:#x}: exactly one of MM_COPY_MEMORY_VIRTUAL and _PHYSICAL"),
            );
        }
        // SAFETY: with MM_COPY_MEMORY_VIRTUAL the union holds a virtual address.
        let source = unsafe { source_address.Anonymous.VirtualAddress };
        // SAFETY: the caller guarantees the target; the model checks the source.
        let (status, copied) =
            unsafe { copy(API, Direction::FromUser, target_address.cast_mut().cast(), source.cast(), number_of_bytes) };
        // SAFETY: checked non-NULL; the driver passes a place for the count.
        unsafe { number_of_bytes_transferred.write(copied) };
        status
    })
}

/// A connection to a port, as the handle `FilterConnectCommunicationPort` returns. Dropping it closes the handle.
#[must_use = "dropping the connection disconnects it"]
pub struct ClientConnection {
    client: PFLT_PORT,
    process: Arc<Process>,
    done: bool,
}

/// `FilterConnectCommunicationPort`: connects `process` to the port named `port_name` (`\ShuntPort`), passing
/// `context` as the connection context.
///
/// The port's descriptor is checked against the process's token (`STATUS_ACCESS_DENIED`), `MaxConnections` against
/// the connections open (`STATUS_CONNECTION_COUNT_LIMIT`); the driver's `ConnectNotify` runs at PASSIVE_LEVEL in the
/// process's context with a kernel copy of `context`, and a failure it returns is the connect's.
///
/// # Errors
/// `STATUS_OBJECT_NAME_NOT_FOUND` (no open port of that name), `STATUS_ACCESS_DENIED`,
/// `STATUS_CONNECTION_COUNT_LIMIT`, `STATUS_INVALID_PARAMETER` (a context over 65535 bytes: its size is a WORD), or
/// the status `ConnectNotify` failed with.
pub fn connect(port_name: &str, process: &Arc<Process>, context: &[u8]) -> Result<ClientConnection, NTSTATUS> {
    let context_len = u32::from(u16::try_from(context.len()).map_err(|_| STATUS_INVALID_PARAMETER)?);
    let found = with_state(|s| {
        let server = s.servers.iter().find(|p| {
            p.open && if p.case_insensitive { p.name.eq_ignore_ascii_case(port_name) } else { p.name == port_name }
        });
        let Some(server) = server else { return Err(STATUS_OBJECT_NAME_NOT_FOUND) };
        if !server.grants.allow(&process.token) {
            return Err(STATUS_ACCESS_DENIED);
        }
        let connections = s.clients.iter().filter(|c| c.server == server.handle && c.user_connected).count();
        if connections >= server.max_connections {
            return Err(STATUS_CONNECTION_COUNT_LIMIT);
        }
        let (server_handle, filter, cookie, connect, disconnect) =
            (server.handle, server.filter, server.cookie, server.connect, server.disconnect);
        let handle = new_port_handle(s);
        s.clients.push(Client {
            handle,
            server: server_handle,
            filter,
            process: Arc::clone(process),
            cookie: 0,
            disconnect,
            user_connected: true,
            notified: false,
            closed: false,
        });
        Ok((handle, cookie, connect))
    });
    let (handle, server_cookie, connect) = found?;
    let Some(connect) = connect else { return Err(STATUS_INVALID_PARAMETER) };
    // Filter Manager hands ConnectNotify a kernel copy of the context, captured from the create's EA buffer.
    let kernel_context = context.to_vec();
    let context_ptr: *const c_void = if context.is_empty() { std::ptr::null() } else { kernel_context.as_ptr().cast() };
    let mut cookie: *mut c_void = null_mut();
    let status = call_in(process, "ConnectNotifyCallback", || {
        // SAFETY: the driver's callback with a new client port, its server cookie and a kernel copy of the context.
        unsafe { connect(handle, server_cookie as *const c_void, context_ptr, context_len, &raw mut cookie) }
    });
    with_state(|s| {
        if status < 0 {
            s.clients.retain(|c| c.handle != handle);
        } else if let Some(client) = s.clients.iter_mut().find(|c| c.handle == handle) {
            client.cookie = cookie as usize;
        }
    });
    if status < 0 {
        return Err(status);
    }
    Ok(ClientConnection { client: handle, process: Arc::clone(process), done: false })
}

/// Calls the client's `DisconnectNotify` once, unless the driver already closed the port.
fn notify_disconnect(handle: PFLT_PORT) {
    let call = with_state(|s| {
        let client = s.clients.iter_mut().find(|c| c.handle == handle)?;
        if client.notified || client.closed {
            return None;
        }
        client.notified = true;
        Some((client.disconnect, client.cookie, Arc::clone(&client.process)))
    });
    let Some((Some(disconnect), cookie, process)) = call else { return };
    call_in(&process, "DisconnectNotifyCallback", || {
        // SAFETY: the driver's callback with the cookie its ConnectNotify returned.
        unsafe { disconnect(cookie as *const c_void) };
        STATUS_SUCCESS
    });
}

impl ClientConnection {
    /// The client port the driver was given for this connection.
    #[must_use]
    pub fn client_port(&self) -> PFLT_PORT {
        self.client
    }

    /// `FilterSendMessage` with ordinary buffers: `input` and an output buffer of `output_capacity` zero bytes. The
    /// form a transport uses.
    ///
    /// # Errors
    /// As [`ClientConnection::send`].
    pub fn send_bytes(&self, input: &[u8], output_capacity: usize) -> Result<Vec<u8>, NTSTATUS> {
        self.send(&UserBuffer::Memory(input.to_vec()), &UserBuffer::Memory(vec![0; output_capacity]))
    }

    /// `FilterSendMessage`: calls the driver's `MessageNotify` at PASSIVE_LEVEL in the connecting process's context
    /// with raw user buffers (NULL when empty), then checks how the driver used them (module docs) and returns the
    /// `*ReturnOutputBufferLength` bytes of the output buffer. A returned length above the output buffer's is
    /// reported (`invalid-argument`) and cut.
    ///
    /// # Errors
    /// `STATUS_PORT_DISCONNECTED` (disconnected, or the driver closed the client port), `STATUS_INVALID_PARAMETER`
    /// (the port has no message callback: the docs promise "an error" without naming it; or a buffer over 4 GiB),
    /// or the failure `MessageNotify` returned.
    pub fn send(&self, input: &UserBuffer, output: &UserBuffer) -> Result<Vec<u8>, NTSTATUS> {
        let Some((message_notify, cookie)) = with_state(|s| {
            let client = s.clients.iter().find(|c| c.handle == self.client && c.user_connected && !c.closed)?;
            let server = s.servers.iter().find(|p| p.handle == client.server)?;
            Some((server.message, client.cookie))
        }) else {
            return Err(STATUS_PORT_DISCONNECTED);
        };
        let Some(message_notify) = message_notify else { return Err(STATUS_INVALID_PARAMETER) };
        let (Ok(input_len), Ok(output_len)) = (u32::try_from(input.len()), u32::try_from(output.len())) else {
            return Err(STATUS_INVALID_PARAMETER);
        };
        let mut input_memory = input.initial();
        let mut output_memory = output.initial();
        let input_ptr: *mut u8 = if input.is_empty() { null_mut() } else { input_memory.as_mut_ptr() };
        let output_ptr: *mut u8 = if output.is_empty() { null_mut() } else { output_memory.as_mut_ptr() };
        let message = with_state(|s| {
            s.next_message = s.next_message.wrapping_add(1);
            let message = s.next_message;
            for (buffer, ptr, is_input) in [(input, input_ptr, true), (output, output_ptr, false)] {
                if ptr.is_null() {
                    continue;
                }
                let (kind, then) = match buffer {
                    UserBuffer::Memory(_) => (Kind::Memory, None),
                    UserBuffer::Faulting(_) => (Kind::Faulting, None),
                    UserBuffer::Changing { first, then } => {
                        let mut then = then.clone();
                        then.resize(first.len(), 0);
                        (Kind::Changing, Some(then))
                    }
                };
                s.buffers.push(Live {
                    message,
                    address: ptr as usize,
                    len: buffer.len(),
                    kind,
                    pid: self.process.id,
                    input: is_input,
                    expected: buffer.initial(),
                    then,
                    read: vec![false; buffer.len()],
                    attempted: false,
                });
            }
            message
        });
        let mut returned: u32 = 0;
        let status = call_in(&self.process, "MessageNotifyCallback", || {
            // SAFETY: the driver's callback with its port cookie and the raw user buffers of this message.
            unsafe {
                message_notify(
                    cookie as *const c_void,
                    input_ptr.cast_const().cast(),
                    input_len,
                    output_ptr.cast(),
                    output_len,
                    &raw mut returned,
                )
            }
        });
        finish_message(message, status, &[(input_ptr as usize, &input_memory), (output_ptr as usize, &output_memory)]);
        if status < 0 {
            return Err(status);
        }
        let mut returned = usize::try_from(returned).unwrap_or(usize::MAX);
        if returned > output_memory.len() {
            verifier::report(
                Rule::InvalidArgument,
                "MessageNotifyCallback",
                format!("*ReturnOutputBufferLength is {returned} but OutputBufferLength is {}", output_memory.len()),
            );
            returned = output_memory.len();
        }
        output_memory.truncate(returned);
        Ok(output_memory)
    }

    /// Closes the handle, as `CloseHandle` on the port does: the driver's `DisconnectNotify` runs at PASSIVE_LEVEL in
    /// the connecting process's context (unless the driver closed the client port already), and the driver must
    /// call `FltCloseClientPort` there.
    pub fn disconnect(mut self) {
        self.close();
    }

    fn close(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        with_state(|s| {
            if let Some(client) = s.clients.iter_mut().find(|c| c.handle == self.client) {
                client.user_connected = false;
            }
        });
        notify_disconnect(self.client);
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        self.close();
    }
}

/// Ends a message: forgets its user buffers and reports direct writes, and a success on a faulting input buffer
/// the driver never asked a copy routine to read.
fn finish_message(message: u64, status: NTSTATUS, memories: &[(usize, &Vec<u8>)]) {
    let done: Vec<Live> = with_state(|s| {
        let (done, kept) = std::mem::take(&mut s.buffers).into_iter().partition(|b| b.message == message);
        s.buffers = kept;
        for b in &done {
            s.retired.push((b.address, b.len));
        }
        let excess = s.retired.len().saturating_sub(RETIRED_KEPT);
        s.retired.drain(..excess);
        done
    });
    for live in done {
        let which = if live.input { "input" } else { "output" };
        let Some((_, memory)) = memories.iter().find(|(address, _)| *address == live.address) else { continue };
        let changed: Vec<usize> =
            memory.iter().zip(&live.expected).enumerate().filter(|(_, (m, e))| m != e).map(|(i, _)| i).collect();
        if let (Some(first), Some(last)) = (changed.first(), changed.last()) {
            verifier::report(
                Rule::UserBufferUnsafeAccess,
                "MessageNotifyCallback",
                format!(
                    "bytes {first}..={last} of the {which} buffer were written directly, not through a copy routine \
                     inside try/except"
                ),
            );
        }
        if live.input && live.kind == Kind::Faulting && status >= 0 && !live.attempted {
            verifier::report(
                Rule::UserBufferUnsafeAccess,
                "MessageNotifyCallback",
                "the callback succeeded on a faulting input buffer it never read through a copy routine: a direct \
                 read (a bugcheck on Windows) or an input ignored",
            );
        }
    }
}

/// What the open port named `port_name` grants, for tests that check who can reach a driver's control channel.
#[must_use]
pub fn grants(port_name: &str) -> Option<Grants> {
    with_state(|s| s.servers.iter().find(|p| p.open && p.name.eq_ignore_ascii_case(port_name)).map(|p| p.grants))
}

/// Disconnects the clients of `filter` still connected, calling their `DisconnectNotify` as Filter Manager does
/// "when the minifilter is about to be unloaded", then reports client ports not closed ([`Rule::ClientPortLeak`])
/// and server ports still open ([`Rule::PortLeak`]); called when its driver unloads.
///
/// On Windows the disconnect callbacks run inside `FltUnregisterFilter`; the model runs them here, after the unload
/// callback returned, which a driver that frees its connection state after `FltUnregisterFilter` would notice.
pub(crate) fn report_leaks(filter: PFLT_FILTER, after: &str) {
    let connected: Vec<PFLT_PORT> =
        with_state(|s| s.clients.iter().filter(|c| c.filter == filter && !c.closed).map(|c| c.handle).collect());
    for handle in connected {
        notify_disconnect(handle);
    }
    let (clients, servers) = with_state(|s| {
        let clients: Vec<PFLT_PORT> =
            s.clients.iter().filter(|c| c.filter == filter && !c.closed).map(|c| c.handle).collect();
        let servers: Vec<(PFLT_PORT, String)> =
            s.servers.iter().filter(|p| p.filter == filter && p.open).map(|p| (p.handle, p.name.clone())).collect();
        for client in s.clients.iter_mut().filter(|c| c.filter == filter) {
            client.user_connected = false;
        }
        (clients, servers)
    });
    for handle in clients {
        verifier::report(
            Rule::ClientPortLeak,
            "FltCloseClientPort",
            format!("client port {handle:#x} is still open after {after}; close it in the disconnect callback"),
        );
    }
    for (handle, name) in servers {
        verifier::report(
            Rule::PortLeak,
            "FltCloseCommunicationPort",
            format!("server port {handle:#x} ({name}) is still open after {after}"),
        );
    }
}
