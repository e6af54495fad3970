//! The I/O manager: what tests (and later shuntctl's model transport) call to open, read, write and close files as
//! a program would. Each call becomes an operation that runs through the filters of the file's volume
//! ([`crate::fltmgr::dispatch`]) and then the model file system ([`super::fs`]).
//!
//! Paths are Win32-style with a drive letter (`C:\dir\file`). Every successful create gets a real `FILE_OBJECT`
//! (windows-sys's layout) whose `FileName` holds the path within the volume, `Flags` has `FO_SYNCHRONOUS_IO` for
//! synchronous opens, `FsContext` identifies the stream and `SectionObjectPointer` points to the one
//! `SECTION_OBJECT_POINTERS` that every file object of the stream shares.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::{ACCESS_STATE, FILE_OBJECT, IO_SECURITY_CONTEXT, SECTION_OBJECT_POINTERS},
        Storage::FileSystem::{
            FILE_OPEN_BY_FILE_ID, FILE_SYNCHRONOUS_IO_ALERT, FILE_SYNCHRONOUS_IO_NONALERT, FileLinkInformation,
            FileRenameInformation,
        },
        System::SystemServices::{
            FO_FILE_OPEN_CANCELLED, FO_SYNCHRONOUS_IO, IO_REPARSE, IRP_MJ_CLEANUP, IRP_MJ_CLOSE, IRP_MJ_FLUSH_BUFFERS,
            IRP_MJ_LOCK_CONTROL, IRP_MJ_QUERY_INFORMATION, IRP_MJ_READ, IRP_MJ_SET_INFORMATION, IRP_MJ_WRITE,
            IRP_MN_LOCK, IRP_MN_UNLOCK_SINGLE, IRP_NOCACHE, IRP_PAGING_IO, SL_CASE_SENSITIVE, SL_OPEN_TARGET_DIRECTORY,
        },
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_ACCESS_DENIED, STATUS_CANCELLED, STATUS_FILE_LOCK_CONFLICT, STATUS_FLT_DISALLOW_FAST_IO,
            STATUS_FLT_DISALLOW_FSFILTER_IO, STATUS_INVALID_PARAMETER, STATUS_MOUNT_POINT_NOT_RESOLVED,
            STATUS_NOT_SAME_DEVICE, STATUS_OBJECT_PATH_NOT_FOUND, STATUS_REPARSE, STATUS_REPARSE_POINT_NOT_RESOLVED,
            STATUS_SUCCESS, UNICODE_STRING,
        },
        Storage::FileSystem::{
            FILE_APPEND_DATA, FILE_READ_DATA, FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_WRITE_DATA, SYNCHRONIZE,
        },
    },
};

use super::{
    Volume,
    fs::{self, CreateParams, OpenId, StreamId},
    volumes,
};
use windows_sys::Wdk::Storage::FileSystem::{
    FileNetworkOpenInformation,
    Minifilters::{IRP_MJ_NETWORK_QUERY_OPEN, IRP_MJ_QUERY_OPEN},
};

use crate::fltmgr::{
    dispatch::{IRP_MJ_CREATE, Origin, Request, dispatch},
    userbuf,
};

/// Who touches a read's buffer when the model file system fills it (as [`userbuf::buffer_for`] reports it).
const FS_READ: &str = "IRP_MJ_READ (file system)";
/// Who touches a write's buffer when the model file system takes its data.
const FS_WRITE: &str = "IRP_MJ_WRITE (file system)";

/// What a program asks for when it opens a file (`NtCreateFile`'s parameters).
#[derive(Clone, Copy, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one flag per create option or mode the model honours, as in NtCreateFile"
)]
pub struct OpenParams {
    /// The access mask.
    pub desired_access: u32,
    /// `FILE_SHARE_*`.
    pub share_access: u32,
    /// `FILE_SUPERSEDE` … `FILE_OVERWRITE_IF`.
    pub disposition: u32,
    /// Create options.
    pub options: u32,
    /// Attributes of a new file.
    pub file_attributes: u32,
    /// Ask for case-sensitive name comparison (`SL_CASE_SENSITIVE`).
    pub case_sensitive: bool,
    /// A kernel-mode request (`RequestorMode == KernelMode`) rather than a user-mode one.
    pub kernel_mode: bool,
    /// For a kernel-mode request: check access anyway (`IO_FORCE_ACCESS_CHECK`). User-mode requests are always
    /// checked.
    pub force_access_check: bool,
    /// Open the directory that would hold the named file (`SL_OPEN_TARGET_DIRECTORY`), as the I/O manager does
    /// before a rename or link to a full name.
    pub open_target_directory: bool,
}

impl Default for OpenParams {
    /// Open an existing file for synchronous reading, sharing read and write, from user mode.
    fn default() -> Self {
        Self {
            desired_access: FILE_READ_DATA,
            share_access: FILE_SHARE_READ | FILE_SHARE_WRITE,
            disposition: windows_sys::Wdk::Storage::FileSystem::FILE_OPEN,
            options: FILE_SYNCHRONOUS_IO_NONALERT,
            file_attributes: 0,
            case_sensitive: false,
            kernel_mode: false,
            force_access_check: false,
            open_target_directory: false,
        }
    }
}

/// Whose access the file system checks for a create: the thread's effective token for user-mode requests and for
/// kernel-mode requests that force the check; nobody's for other kernel-mode requests, which skip the check.
fn access_identity(params: &OpenParams) -> Result<Option<fs::AccessIdentity>, NTSTATUS> {
    if params.kernel_mode && !params.force_access_check {
        return Ok(None);
    }
    // A thread impersonating at identification level cannot have access checked as its client.
    crate::kernel::security::access_check_level()?;
    let token = crate::kernel::process::effective_token();
    Ok(Some(if token.user == crate::kernel::process::SYSTEM_SID {
        fs::AccessIdentity::system()
    } else {
        fs::AccessIdentity { user: token.user, admin: token.admin }
    }))
}

/// The kernel objects behind one file object, at stable addresses.
struct FileObjectBox {
    object: FILE_OBJECT,
    name: Vec<u16>,
}

/// Per-stream state every file object of the stream shares.
struct Stream {
    section: Box<SECTION_OBJECT_POINTERS>,
    /// Stands for the file system's FCB; filters compare `FsContext` pointers to identify a stream.
    fcb: Box<u64>,
}

struct OpenFile {
    file_object: Box<FileObjectBox>,
    volume: Volume,
    open: OpenId,
    kernel_mode: bool,
    origin: Origin,
    /// References to the file object: one for the handle until it is closed, one per `ObReferenceObject` (and
    /// the one `FltCreateFileEx2` hands back). `IRP_MJ_CLOSE` is sent when the last goes.
    references: u32,
    /// Whether the handle is still open (`IRP_MJ_CLEANUP` not yet sent).
    handle_open: bool,
    /// The stream it opened.
    stream: StreamId,
    /// The create's final status (`STATUS_OPLOCK_BREAK_IN_PROGRESS` is a success that matters).
    create_status: NTSTATUS,
}

// SAFETY: the raw pointers inside FILE_OBJECT refer to model-owned boxes that live as long as the open file.
unsafe impl Send for OpenFile {}
// SAFETY: as above, for the per-stream boxes.
unsafe impl Send for Stream {}

#[derive(Default)]
struct Table {
    next: u64,
    files: BTreeMap<u64, OpenFile>,
    streams: BTreeMap<StreamId, Stream>,
    /// The file system's byte-range locks, per stream.
    locks: BTreeMap<StreamId, super::locks::LockTable>,
}

static TABLE: Mutex<Option<Table>> = Mutex::new(None);

fn table() -> MutexGuard<'static, Option<Table>> {
    TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn with_table<T>(f: impl FnOnce(&mut Table) -> T) -> T {
    f(table().get_or_insert_with(Table::default))
}

/// An open handle. Close it with [`close`]; a handle dropped without closing stays open, as a leaked handle
/// would.
#[derive(Debug, PartialEq, Eq)]
pub struct Handle(u64);

impl Handle {
    /// The model's number for this open.
    #[must_use]
    pub(crate) fn id(&self) -> u64 {
        self.0
    }

    /// The open with the model's number `id`.
    #[must_use]
    pub(crate) fn from_id(id: u64) -> Self {
        Self(id)
    }

    /// The file object behind the handle, as drivers see it.
    #[must_use]
    pub fn file_object(&self) -> *const FILE_OBJECT {
        with_table(|t| t.files.get(&self.0).map_or(std::ptr::null(), |f| &raw const f.file_object.object))
    }
}

fn split_drive(path: &str) -> Result<(Volume, String), NTSTATUS> {
    let mut chars = path.chars();
    let (Some(letter), Some(':')) = (chars.next(), chars.next()) else {
        return Err(STATUS_OBJECT_PATH_NOT_FOUND);
    };
    let rest = chars.as_str();
    let volume = volumes()
        .into_iter()
        .find(|v| v.spec.drive_letter.is_some_and(|d| d.eq_ignore_ascii_case(&letter)))
        .ok_or(STATUS_OBJECT_PATH_NOT_FOUND)?;
    let within = if rest.is_empty() { "\\".to_owned() } else { rest.to_owned() };
    Ok((volume, within))
}

fn new_file_object(name: &str, synchronous: bool) -> Box<FileObjectBox> {
    let mut boxed = Box::new(FileObjectBox {
        // SAFETY: FILE_OBJECT is a plain C struct for which all-zero is valid.
        object: unsafe { std::mem::zeroed() },
        name: name.encode_utf16().collect(),
    });
    let bytes = u16::try_from(boxed.name.len().saturating_mul(2)).unwrap_or(0xFFFE);
    boxed.object.Type = 5; // IO_TYPE_FILE
    boxed.object.Size = i16::try_from(size_of::<FILE_OBJECT>()).unwrap_or(i16::MAX);
    boxed.object.FileName = UNICODE_STRING { Length: bytes, MaximumLength: bytes, Buffer: boxed.name.as_mut_ptr() };
    if synchronous {
        boxed.object.Flags |= FO_SYNCHRONOUS_IO;
    }
    boxed
}

/// The file ID an open by ID names: its file object's name is the ID's eight bytes, little-endian.
fn file_id_of(name: &[u16]) -> Result<u64, NTSTATUS> {
    match name {
        &[a, b, c, d] => Ok(u64::from(a) | u64::from(b) << 16 | u64::from(c) << 32 | u64::from(d) << 48),
        _ => Err(STATUS_INVALID_PARAMETER),
    }
}

/// Opens the file with ID `file_id` on the volume of `drive` (`C:`) as a program would (`NtCreateFile` with
/// `FILE_OPEN_BY_FILE_ID`): the file object's name is the ID's eight bytes, which is what filters see in
/// pre-create; after the open, name queries answer the file's name.
///
/// # Errors
/// `STATUS_OBJECT_PATH_NOT_FOUND` for an unknown drive; otherwise the final status of the create.
pub fn create_by_file_id(drive: &str, file_id: u64, params: &OpenParams) -> Result<Handle, NTSTATUS> {
    let (volume, _) = split_drive(drive)?;
    let units = file_id.to_le_bytes().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect::<Vec<_>>();
    // The name travels as a string until the file object is built; IDs whose units are surrogates cannot.
    let name = char::decode_utf16(units).collect::<Result<String, _>>().map_err(|_| STATUS_INVALID_PARAMETER)?;
    let params = OpenParams { options: params.options | FILE_OPEN_BY_FILE_ID, ..*params };
    create_on(&volume, &name, &params, Origin::default(), 1)
}

/// Opens `path` as a program would (`NtCreateFile`), through the filters of its volume.
///
/// # Errors
/// The final status of the create: a filter's or the file system's.
pub fn create(path: &str, params: &OpenParams) -> Result<Handle, NTSTATUS> {
    let (volume, within) = split_drive(path)?;
    create_on(&volume, &within, params, Origin::default(), 1)
}

/// How many times one create may be sent back with `STATUS_REPARSE` before it fails, as the I/O manager limits
/// reparse loops (the exact limit is not documented; 32 is the model's).
pub const MAX_REPARSES: usize = 32;

/// Opens `within` on `volume` from `origin`, starting with `references` references to the file object. A create a
/// filter completes with `STATUS_REPARSE` / `IO_REPARSE` (after `IoReplaceFileObjectName`) is re-issued with the
/// new name from the top of the stack, as the I/O manager re-parses it.
pub(crate) fn create_on(
    volume: &Volume,
    within: &str,
    params: &OpenParams,
    origin: Origin,
    references: u32,
) -> Result<Handle, NTSTATUS> {
    let (mut volume, mut within) = (volume.clone(), within.to_owned());
    for _ in 0..MAX_REPARSES {
        match create_once(&volume, &within, params, origin, references)? {
            Created::Opened(handle) => return Ok(handle),
            Created::Reparse(name) => {
                let (next_volume, next_within) = crate::fltmgr::fileio::resolve_object_name(&name)?;
                if origin.below.is_some() && next_volume.handle != volume.handle {
                    // A targeted create cannot follow a name onto another volume (FltCreateFileEx2's page).
                    return Err(STATUS_MOUNT_POINT_NOT_RESOLVED);
                }
                (volume, within) = (next_volume, next_within);
            }
        }
    }
    Err(STATUS_REPARSE_POINT_NOT_RESOLVED)
}

/// What one pass of a create came to.
enum Created {
    Opened(Handle),
    /// A filter asked for the create to be re-parsed with this name.
    Reparse(String),
}

/// File objects whose create is in progress, which `IoReplaceFileObjectName` may rename.
static CREATING: Mutex<BTreeMap<usize, (usize, Volume)>> = Mutex::new(BTreeMap::new());

/// File objects the file system has opened whose create is still on its way back up (post-create callbacks), with
/// the file system's open.
static OPENED_IN_CREATE: Mutex<BTreeMap<usize, OpenId>> = Mutex::new(BTreeMap::new());

/// File objects whose open a filter cancelled (`FltCancelFileOpen`) while their create was on its way back up.
static CANCELLED: Mutex<BTreeSet<usize>> = Mutex::new(BTreeSet::new());

/// `FltCancelFileOpen`'s effect: the file system sees cleanup and close of the open at once, the file object gets
/// `FO_FILE_OPEN_CANCELLED`, and the create fails for everything above the caller. Errors say why the file object
/// is not one whose successful create is on its way back up.
pub(crate) fn cancel_open(file_object: *const FILE_OBJECT) -> Result<(), String> {
    let address = file_object as usize;
    let Some(open) = OPENED_IN_CREATE.lock().unwrap_or_else(PoisonError::into_inner).remove(&address) else {
        return Err(if CANCELLED.lock().unwrap_or_else(PoisonError::into_inner).contains(&address) {
            format!("the open of {file_object:?} is already cancelled")
        } else {
            format!("{file_object:?} is not a file object the file system has just opened in this create")
        });
    };
    let boxed = CREATING.lock().unwrap_or_else(PoisonError::into_inner).get(&address).map(|(b, _)| *b);
    if let Some(boxed) = boxed {
        // SAFETY: the file object box of a create in progress; its thread waits in this create's post-create
        // callbacks, one of which is calling, so nothing else touches it now.
        let boxed = unsafe { &mut *(boxed as *mut FileObjectBox) };
        boxed.object.Flags |= FO_FILE_OPEN_CANCELLED;
    }
    // A FILE_OPEN_REQUIRING_OPLOCK open that is cancelled no longer holds the stream for its oplock.
    fs::cleanup(open);
    super::oplock::cleanup(open);
    fs::close(open);
    CANCELLED.lock().unwrap_or_else(PoisonError::into_inner).insert(address);
    Ok(())
}

/// What the model knows of a file object, for name queries.
pub(crate) struct FileObjectInfo {
    /// Its volume.
    pub(crate) volume: Volume,
    /// `FileName` as it is now (the name the caller opened, or a filter's replacement).
    pub(crate) file_name: String,
    /// The file system's open, once it exists.
    pub(crate) open: Option<OpenId>,
    /// Whether its handle is still open (no cleanup yet); true during the create.
    pub(crate) handle_open: bool,
    /// Whether its create is in progress (pre-create and the file system have not finished).
    pub(crate) creating: bool,
}

/// Describes `file_object`, whether its create is in progress or it is open.
pub(crate) fn describe(file_object: *const FILE_OBJECT) -> Option<FileObjectInfo> {
    let name_of = |object: &FILE_OBJECT| {
        let units = usize::from(object.FileName.Length / 2);
        if object.FileName.Buffer.is_null() {
            return String::new();
        }
        // SAFETY: a model file object's name buffer holds Length bytes.
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(object.FileName.Buffer, units) })
    };
    let creating = CREATING.lock().unwrap_or_else(PoisonError::into_inner).get(&(file_object as usize)).cloned();
    if let Some((_, volume)) = creating {
        // SAFETY: the file object of a create in progress, owned by the create's thread, which is waiting in this
        // create's dispatch while a callback asks.
        let object = unsafe { &*file_object };
        return Some(FileObjectInfo {
            volume,
            file_name: name_of(object),
            open: None,
            handle_open: true,
            creating: true,
        });
    }
    with_table(|t| {
        t.files.values().find(|f| std::ptr::eq(&raw const f.file_object.object, file_object)).map(|f| FileObjectInfo {
            volume: f.volume.clone(),
            file_name: name_of(&f.file_object.object),
            open: Some(f.open),
            handle_open: f.handle_open,
            creating: false,
        })
    })
}

/// Whether `file_object` is open: created by the file system (post-create on) and not yet closed.
#[must_use]
pub fn is_open_file_object(file_object: *const FILE_OBJECT) -> bool {
    OPENED_IN_CREATE.lock().unwrap_or_else(PoisonError::into_inner).contains_key(&(file_object as usize))
        || handle_of(file_object).is_some()
}

/// The file system's open behind an opened `file_object`, in post-create too (file contexts need its file ID).
pub(crate) fn open_of_file_object(file_object: *const FILE_OBJECT) -> Option<(OpenId, Volume)> {
    let in_create =
        OPENED_IN_CREATE.lock().unwrap_or_else(PoisonError::into_inner).get(&(file_object as usize)).copied();
    let file = describe(file_object)?;
    Some((in_create.or(file.open)?, file.volume))
}

/// `IoReplaceFileObjectName`: PASSIVE_LEVEL, on a file object whose create is in progress (a pre-create
/// callback's); replaces `FileName` with `NewFileName` (`FileNameLength` bytes).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-ioreplacefileobjectname>.
///
/// # Safety
/// Called by driver code: `NewFileName` must hold `FileNameLength` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn IoReplaceFileObjectName(
    file_object: *const FILE_OBJECT,
    new_file_name: windows_sys::core::PCWSTR,
    file_name_length: u16,
) -> NTSTATUS {
    const API: &str = "IoReplaceFileObjectName";
    crate::guard::guarded(API, STATUS_INVALID_PARAMETER, || {
        const DOCS: &str =
            "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-ioreplacefileobjectname";
        if !crate::kernel::thread::require_irql_at_most(API, crate::kernel::irql::PASSIVE, DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        let boxed =
            CREATING.lock().unwrap_or_else(PoisonError::into_inner).get(&(file_object as usize)).map(|(b, _)| *b);
        let Some(boxed) = boxed else {
            crate::verifier::report(
                crate::verifier::Rule::InvalidArgument,
                API,
                format!("{file_object:?} is not a file object being created (call it from a pre-create callback)"),
            );
            return STATUS_INVALID_PARAMETER;
        };
        if new_file_name.is_null() || !file_name_length.is_multiple_of(2) {
            crate::verifier::report(crate::verifier::Rule::InvalidArgument, API, "a NULL or odd-length name");
            return STATUS_INVALID_PARAMETER;
        }
        // SAFETY: the driver's name holds `file_name_length` bytes.
        let name = unsafe { std::slice::from_raw_parts(new_file_name, usize::from(file_name_length / 2)) }.to_vec();
        // SAFETY: `boxed` is the file object box of a create in progress on a thread that is inside this create's
        // dispatch (waiting for this callback), so nothing else touches it now.
        let boxed = unsafe { &mut *(boxed as *mut FileObjectBox) };
        boxed.name = name;
        boxed.object.FileName.Buffer = boxed.name.as_mut_ptr();
        boxed.object.FileName.Length = file_name_length;
        boxed.object.FileName.MaximumLength = file_name_length;
        STATUS_SUCCESS
    })
}

/// The file system fills in the file object as it opens it, before post-create callbacks run: the stream's shared
/// section object pointers and its FCB.
fn attach_stream(object: &mut FILE_OBJECT, stream: StreamId) {
    with_table(|t| {
        let stream = t.streams.entry(stream).or_insert_with(|| Stream {
            // SAFETY: SECTION_OBJECT_POINTERS is a plain C struct for which all-zero is valid.
            section: Box::new(unsafe { std::mem::zeroed() }),
            fcb: Box::new(stream.0),
        });
        object.SectionObjectPointer = &raw mut *stream.section;
        object.FsContext = (&raw mut *stream.fcb).cast();
    });
}

/// A filter's post-create may fail a create the file system completed only by cancelling the open first
/// (`FltCancelFileOpen`), then setting an error status: otherwise the file system's open is never closed. A cancelled
/// open left with a success status would hand the caller a closed file. Both are reported; the model then closes
/// what is still open so later operations see a sane file system. Returns the open to keep, if any.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/failing-an-i-o-operation-in-a-postoperation-callback-routine>.
fn check_failed_create(created: Option<fs::Created>, status: NTSTATUS, object_address: usize) -> Option<fs::Created> {
    const API: &str = "PFLT_POST_OPERATION_CALLBACK";
    let cancelled = CANCELLED.lock().unwrap_or_else(PoisonError::into_inner).remove(&object_address);
    if cancelled {
        if status >= 0 && status != STATUS_REPARSE {
            crate::verifier::report(
                crate::verifier::Rule::CreateFailureProtocol,
                API,
                format!("FltCancelFileOpen was called but the create completes with {status:#010x}, a success"),
            );
        }
        return None;
    }
    match created {
        Some(done) if status < 0 => {
            crate::verifier::report(
                crate::verifier::Rule::CreateFailureProtocol,
                API,
                format!(
                    "the file system opened the file but a post-create failed it with {status:#010x} without FltCancelFileOpen; the open is never closed"
                ),
            );
            fs::cleanup(done.open);
            fs::close(done.open);
            None
        }
        other => other,
    }
}

/// The security context of a create: the access state and `IO_SECURITY_CONTEXT` its parameters point at, boxed so
/// they stay put while the create is in flight.
struct CreateSecurity {
    _access_state: Box<ACCESS_STATE>,
    _context: Box<IO_SECURITY_CONTEXT>,
}

/// The `IRP_MJ_CREATE` request for `params` on `object`, as the I/O manager builds it, with the security context it
/// points at (keep it alive until the create completes).
fn create_request(object: &mut FILE_OBJECT, params: &OpenParams, origin: Origin) -> (Request, CreateSecurity) {
    // SAFETY: ACCESS_STATE is a plain C struct for which all-zero is valid.
    let mut access_state: Box<ACCESS_STATE> = Box::new(unsafe { std::mem::zeroed() });
    access_state.OriginalDesiredAccess = params.desired_access;
    access_state.RemainingDesiredAccess = params.desired_access;
    // The requestor's identity, captured as the I/O manager captures it for the create (SeCaptureSubjectContext).
    access_state.SubjectSecurityContext = crate::kernel::security::subject_context();
    let mut context = Box::new(IO_SECURITY_CONTEXT {
        SecurityQos: std::ptr::null_mut(),
        AccessState: &raw mut *access_state,
        DesiredAccess: params.desired_access,
        FullCreateOptions: params.options,
    });
    let mut request = Request::new(IRP_MJ_CREATE, object, params.kernel_mode).from_origin(origin);
    let iopb = request.iopb();
    if params.case_sensitive {
        iopb.OperationFlags |= u8::try_from(SL_CASE_SENSITIVE).unwrap_or(0);
    }
    if params.open_target_directory {
        iopb.OperationFlags |= u8::try_from(SL_OPEN_TARGET_DIRECTORY).unwrap_or(0);
    }
    iopb.Parameters.Create.SecurityContext = &raw mut *context;
    iopb.Parameters.Create.Options = (params.disposition << 24) | (params.options & 0x00FF_FFFF);
    iopb.Parameters.Create.ShareAccess = u16::try_from(params.share_access).unwrap_or(0);
    iopb.Parameters.Create.FileAttributes = u16::try_from(params.file_attributes).unwrap_or(0);
    (request, CreateSecurity { _access_state: access_state, _context: context })
}

fn create_once(
    volume: &Volume,
    within: &str,
    params: &OpenParams,
    origin: Origin,
    references: u32,
) -> Result<Created, NTSTATUS> {
    let volume = volume.clone();
    let within = within.to_owned();
    let synchronous = params.options & (FILE_SYNCHRONOUS_IO_ALERT | FILE_SYNCHRONOUS_IO_NONALERT) != 0;
    let mut file_object = new_file_object(&within, synchronous);
    let (mut request, _security) = create_request(&mut file_object.object, params, origin);
    let mut created = None;
    let mut reparse_to: Option<String> = None;
    let identity = access_identity(params);
    let object_address = &raw const file_object.object as usize;
    let box_address = &raw mut *file_object as usize;
    CREATING.lock().unwrap_or_else(PoisonError::into_inner).insert(object_address, (box_address, volume.clone()));
    dispatch(volume.handle, &mut request, |request| {
        // The file system checks access as the identity captured for the create, and fails when it cannot.
        let identity = match &identity {
            Ok(identity) => identity.clone(),
            Err(status) => return request.complete(*status, 0),
        };
        // The file system reads the parameters as the filters left them.
        let iopb = request.iopb();
        // SAFETY: the union holds the Create parameters for IRP_MJ_CREATE.
        let create = unsafe { iopb.Parameters.Create };
        let fs_params = CreateParams {
            disposition: create.Options >> 24,
            options: create.Options & 0x00FF_FFFF,
            desired_access: params.desired_access,
            share_access: u32::from(create.ShareAccess),
            file_attributes: u32::from(create.FileAttributes),
            case_sensitive: u32::from(iopb.OperationFlags) & SL_CASE_SENSITIVE != 0,
            open_target_directory: u32::from(iopb.OperationFlags) & SL_OPEN_TARGET_DIRECTORY != 0,
            check_access_for: identity,
        };
        // The oplock package sees the create before the open (breaks, acknowledgements, FILE_OPEN_REQUIRING_OPLOCK).
        let oplocks = super::oplock::gate_create(&volume, &within, &fs_params);
        let outcome = if let Err(status) = oplocks {
            Err(status)
        } else if fs_params.options & FILE_OPEN_BY_FILE_ID == 0 {
            fs::create_ex(&volume, &within, &fs_params)
        } else {
            file_id_of(&file_object.name).and_then(|id| fs::create_by_file_id_ex(&volume, id, &fs_params))
        };
        match outcome {
            Ok(fs::CreateOutcome::Opened(done)) => {
                attach_stream(&mut file_object.object, done.stream);
                if fs_params.options & windows_sys::Wdk::Storage::FileSystem::FILE_OPEN_REQUIRING_OPLOCK != 0 {
                    super::oplock::require_oplock(done.stream, done.open);
                }
                let status = if oplocks == Ok(super::oplock::CreateBreak::InProgress) {
                    windows_sys::Win32::Foundation::STATUS_OPLOCK_BREAK_IN_PROGRESS
                } else {
                    STATUS_SUCCESS
                };
                request.complete(status, done.information);
                OPENED_IN_CREATE.lock().unwrap_or_else(PoisonError::into_inner).insert(object_address, done.open);
                created = Some(done);
            }
            Ok(fs::CreateOutcome::Reparse(reparse)) => {
                // The file system's own reparse point (a symbolic link, junction or mount point): the I/O manager
                // re-parses the substituted name.
                reparse_to = Some(format!("{}{}", reparse.volume_name, reparse.path));
                request.complete(STATUS_REPARSE, reparse.tag as usize);
            }
            Err(status) => request.complete(status, 0),
        }
    });
    CREATING.lock().unwrap_or_else(PoisonError::into_inner).remove(&object_address);
    OPENED_IN_CREATE.lock().unwrap_or_else(PoisonError::into_inner).remove(&object_address);
    let status = request.status();
    let created = check_failed_create(created, status, object_address);
    if status == STATUS_REPARSE
        && let Some(name) = reparse_to
    {
        return Ok(Created::Reparse(name));
    }
    if status == STATUS_REPARSE && request.information() == IO_REPARSE as usize {
        if let Some(done) = created {
            // A filter below the one that asked for the reparse opened the file after all; undo it.
            fs::cleanup(done.open);
            fs::close(done.open);
        }
        return Ok(Created::Reparse(String::from_utf16_lossy(&file_object.name)));
    }
    let Some(done) = created.filter(|_| status >= 0) else {
        return Err(if status >= 0 { STATUS_INVALID_PARAMETER } else { status });
    };
    let id = with_table(|t| {
        t.next = t.next.saturating_add(1);
        let id = t.next;
        t.files.insert(
            id,
            OpenFile {
                file_object,
                volume,
                open: done.open,
                kernel_mode: params.kernel_mode,
                origin,
                references,
                handle_open: true,
                stream: done.stream,
                create_status: status,
            },
        );
        id
    });
    Ok(Created::Opened(Handle(id)))
}

fn with_open<T>(handle: &Handle, f: impl FnOnce(&mut OpenFile) -> T) -> Result<T, NTSTATUS> {
    with_table(|t| t.files.get_mut(&handle.0).map(f)).ok_or(STATUS_INVALID_PARAMETER)
}

/// What an operation on a handle needs of its open file.
pub(crate) struct Target {
    pub(crate) file_object: *mut FILE_OBJECT,
    pub(crate) volume: Volume,
    pub(crate) open: OpenId,
    pub(crate) stream: StreamId,
    pub(crate) kernel_mode: bool,
    pub(crate) synchronous: bool,
    current: i64,
    origin: Origin,
}

pub(crate) fn target(handle: &Handle) -> Result<Target, NTSTATUS> {
    with_open(handle, |f| Target {
        file_object: &raw mut f.file_object.object,
        volume: f.volume.clone(),
        open: f.open,
        stream: f.stream,
        kernel_mode: f.kernel_mode,
        synchronous: f.file_object.object.Flags & FO_SYNCHRONOUS_IO != 0,
        current: f.file_object.object.CurrentByteOffset,
        origin: f.origin,
    })
}

/// The handle of the open whose file object is `file_object`.
pub(crate) fn handle_of(file_object: *const FILE_OBJECT) -> Option<Handle> {
    with_table(|t| {
        t.files
            .iter()
            .find(|(_, f)| std::ptr::eq(&raw const f.file_object.object, file_object))
            .map(|(id, _)| Handle(*id))
    })
}

/// Whether the handle of `handle` is still open (no `IRP_MJ_CLEANUP` yet).
pub(crate) fn handle_is_open(handle: &Handle) -> bool {
    with_open(handle, |f| f.handle_open).unwrap_or(false)
}

/// Every open whose create came from `initiator`, for leak checks: (file object, handle still open, references).
pub(crate) fn opened_by(
    initiator: windows_sys::Wdk::Storage::FileSystem::Minifilters::PFLT_FILTER,
) -> Vec<(usize, bool, u32)> {
    with_table(|t| {
        t.files
            .values()
            .filter(|f| f.origin.initiator == Some(initiator))
            .map(|f| (&raw const f.file_object.object as usize, f.handle_open, f.references))
            .collect()
    })
}

fn major(code: u32) -> u8 {
    u8::try_from(code).unwrap_or(u8::MAX)
}

/// Resolves the offset of a read or write: an explicit one, or the file object's current byte offset for a
/// synchronous file object (what the I/O manager puts in the IRP).
fn resolve_offset(t: &Target, offset: Option<u64>) -> Result<u64, NTSTATUS> {
    match offset {
        Some(at) => Ok(at),
        None if t.synchronous => u64::try_from(t.current).map_err(|_| STATUS_INVALID_PARAMETER),
        None => Err(STATUS_INVALID_PARAMETER),
    }
}

fn advance(handle: &Handle, t: &Target, offset: u64, transferred: usize) {
    if !t.synchronous {
        return;
    }
    let end = offset.saturating_add(u64::try_from(transferred).unwrap_or(u64::MAX));
    let _ = with_open(handle, |f| f.file_object.object.CurrentByteOffset = i64::try_from(end).unwrap_or(i64::MAX));
}

/// Reads up to `length` bytes at `offset` (or at the current byte offset of a synchronous file object), through
/// the filters.
///
/// # Errors
/// The final status: `STATUS_END_OF_FILE` at or past the end, a filter's status, ...
pub fn read(handle: &Handle, offset: Option<u64>, length: u32) -> Result<Vec<u8>, NTSTATUS> {
    let t = target(handle)?;
    read_from(handle, offset, length, Origin::default(), t.kernel_mode, true)
}

/// Reads through the filters from `origin`; `update_offset` says whether a synchronous file object's current
/// byte offset moves (`FLTFL_IO_OPERATION_DO_NOT_UPDATE_BYTE_OFFSET` clears it).
pub(crate) fn read_from(
    handle: &Handle,
    offset: Option<u64>,
    length: u32,
    origin: Origin,
    kernel_mode: bool,
    update_offset: bool,
) -> Result<Vec<u8>, NTSTATUS> {
    let t = target(handle)?;
    if !handle_is_open(handle) {
        return Err(windows_sys::Win32::Foundation::STATUS_FILE_CLOSED);
    }
    let at = resolve_offset(&t, offset)?;
    let mut buffer = vec![0u8; usize::try_from(length).unwrap_or(0)];
    // A user-mode request's buffer is a user address, valid only in this (the requesting) process.
    let _user_buffer = userbuf::register(buffer.as_ptr(), buffer.len(), kernel_mode);
    let mut request = Request::new(major(IRP_MJ_READ), t.file_object, kernel_mode).from_origin(origin);
    {
        let iopb = request.iopb();
        iopb.Parameters.Read.Length = length;
        iopb.Parameters.Read.ByteOffset = i64::try_from(at).map_err(|_| STATUS_INVALID_PARAMETER)?;
        iopb.Parameters.Read.ReadBuffer = buffer.as_mut_ptr().cast();
    }
    let own_buffer = (buffer.as_mut_ptr() as usize, buffer.len());
    dispatch(t.volume.handle, &mut request, |request| {
        // SAFETY: the union holds the Read parameters for IRP_MJ_READ.
        let read = unsafe { request.iopb().Parameters.Read };
        let from = u64::try_from(read.ByteOffset).unwrap_or(u64::MAX);
        let paging = request.iopb().IrpFlags & IRP_PAGING_IO != 0;
        let length = u64::from(read.Length);
        if !paging && !fs_lock_allows(handle, t.file_object, from, length, false) {
            request.complete(STATUS_FILE_LOCK_CONFLICT, 0);
            return;
        }
        let cached = request.iopb().IrpFlags & (IRP_NOCACHE | IRP_PAGING_IO) == 0;
        if cached {
            // The file system copies from the cache; the pages it lacks fault in under this read.
            let outer = request.data() as usize;
            super::mm::fault_for_cached_read(handle, from, usize::try_from(read.Length).unwrap_or(0), outer);
        }
        let wanted = usize::try_from(read.Length).unwrap_or(0);
        // The file system fills the buffer the request now carries (a filter may have swapped it or locked it).
        let destination = match userbuf::buffer_for(FS_READ, read.MdlAddress, read.ReadBuffer, wanted) {
            Ok(destination) => destination,
            Err(status) => return request.complete(status, 0),
        };
        match fs::read(t.open, from, wanted) {
            Ok(data) => {
                let mut n = data.len().min(wanted);
                if destination as usize == own_buffer.0 {
                    n = n.min(own_buffer.1);
                }
                // SAFETY: the request's buffer holds `Length` bytes (the I/O manager's own buffer, checked above, or
                // one a filter put there, which must hold `Length` bytes) and `n` is no more.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), destination, n) };
                request.complete(STATUS_SUCCESS, n);
            }
            Err(status) => request.complete(status, 0),
        }
    });
    let status = request.status();
    if status < 0 {
        return Err(status);
    }
    let n = request.information().min(buffer.len());
    buffer.truncate(n);
    if update_offset {
        advance(handle, &t, at, n);
    }
    Ok(buffer)
}

/// Writes `data` at `offset` (or at the current byte offset of a synchronous file object), through the filters.
///
/// # Errors
/// The final status.
pub fn write(handle: &Handle, offset: Option<u64>, data: &[u8]) -> Result<usize, NTSTATUS> {
    let t = target(handle)?;
    write_from(handle, offset, data, Origin::default(), t.kernel_mode, true)
}

/// Writes through the filters from `origin` (see [`read_from`]).
pub(crate) fn write_from(
    handle: &Handle,
    offset: Option<u64>,
    data: &[u8],
    origin: Origin,
    kernel_mode: bool,
    update_offset: bool,
) -> Result<usize, NTSTATUS> {
    let t = target(handle)?;
    if !handle_is_open(handle) {
        return Err(windows_sys::Win32::Foundation::STATUS_FILE_CLOSED);
    }
    let at = resolve_offset(&t, offset)?;
    let mut buffer = data.to_vec();
    let _user_buffer = userbuf::register(buffer.as_ptr(), buffer.len(), kernel_mode);
    let mut request = Request::new(major(IRP_MJ_WRITE), t.file_object, kernel_mode).from_origin(origin);
    {
        let iopb = request.iopb();
        iopb.Parameters.Write.Length = u32::try_from(data.len()).map_err(|_| STATUS_INVALID_PARAMETER)?;
        iopb.Parameters.Write.ByteOffset = i64::try_from(at).map_err(|_| STATUS_INVALID_PARAMETER)?;
        iopb.Parameters.Write.WriteBuffer = buffer.as_mut_ptr().cast();
    }
    let own_buffer = (buffer.as_mut_ptr() as usize, buffer.len());
    dispatch(t.volume.handle, &mut request, |request| {
        // SAFETY: the union holds the Write parameters for IRP_MJ_WRITE.
        let write = unsafe { request.iopb().Parameters.Write };
        let from = u64::try_from(write.ByteOffset).unwrap_or(u64::MAX);
        let paging = request.iopb().IrpFlags & IRP_PAGING_IO != 0;
        if !paging && !fs_lock_allows(handle, t.file_object, from, u64::from(write.Length), true) {
            request.complete(STATUS_FILE_LOCK_CONFLICT, 0);
            return;
        }
        let mut n = usize::try_from(write.Length).unwrap_or(0);
        // The file system takes the data from the buffer the request now carries.
        let source = match userbuf::buffer_for(FS_WRITE, write.MdlAddress, write.WriteBuffer, n) {
            Ok(source) => source,
            Err(status) => return request.complete(status, 0),
        };
        if source as usize == own_buffer.0 {
            n = n.min(own_buffer.1);
        }
        // SAFETY: the request's buffer holds `Length` bytes (see the read above) and `n` is no more.
        let bytes = unsafe { std::slice::from_raw_parts(source.cast_const(), n) };
        match fs::write(t.open, Some(from), bytes) {
            Ok(written) => request.complete(STATUS_SUCCESS, written),
            Err(status) => request.complete(status, 0),
        }
    });
    let status = request.status();
    if status < 0 {
        return Err(status);
    }
    let n = request.information();
    if update_offset {
        advance(handle, &t, at, n);
    }
    Ok(n)
}

/// Closes the handle: `IRP_MJ_CLEANUP` through the filters, then the handle's reference goes, which sends
/// `IRP_MJ_CLOSE` when it was the last.
#[expect(clippy::needless_pass_by_value, reason = "closing consumes the handle so it cannot be used again")]
pub fn close(handle: Handle) {
    let _ = close_handle(&handle);
}

/// `IRP_MJ_CLEANUP` for the handle, then drops the handle's reference. Returns false when the handle was not open.
///
/// [`close`] without giving the handle up: how a program closes a handle that another of its threads is using, as
/// `CloseHandle` from one thread while another waits in a request on it (a lock that waits, [`lock_wait`]).
#[must_use = "false when the handle was not open"]
pub fn close_handle(handle: &Handle) -> bool {
    let Ok(t) = target(handle) else { return false };
    if !handle_is_open(handle) {
        return false;
    }
    let mut request = Request::new(major(IRP_MJ_CLEANUP), t.file_object, t.kernel_mode).from_origin(t.origin);
    dispatch(t.volume.handle, &mut request, |request| {
        // The file system releases the handle's byte-range locks (FsRtlFastUnlockAll) at cleanup, which grants the
        // requests that waited for them, and cancels the lock requests of this file object still waiting: a
        // cleanup cancels and completes the queued IRPs of its file object with STATUS_CANCELLED
        // (https://learn.microsoft.com/windows-hardware/drivers/kernel/irp-mj-cleanup).
        let owner = lock_owner(t.file_object);
        with_table(|table| {
            if let Some(locks) = table.locks.get_mut(&t.stream) {
                for waiter in locks.cancel_where(|w| w.lock.owner.file_object == owner.file_object) {
                    super::locks::resolve(waiter.id, STATUS_CANCELLED);
                }
                grant(locks.unlock_all(owner));
            }
        });
        fs::cleanup(t.open);
        // And the handle's oplocks break to none, releasing whatever waits for their acknowledgement — after the
        // file system has let go of the handle's share access: on Windows the waiting create cannot get at the file
        // before the cleanup that holds it is done.
        super::oplock::cleanup(t.open);
        request.complete(STATUS_SUCCESS, 0);
    });
    let _ = with_open(handle, |f| f.handle_open = false);
    dereference(handle);
    true
}

/// Adds a reference to the file object (`ObReferenceObject`).
pub(crate) fn reference(handle: &Handle) {
    let _ = with_open(handle, |f| f.references = f.references.saturating_add(1));
}

/// Drops a reference to the file object; the last one sends `IRP_MJ_CLOSE` through the filters.
pub(crate) fn dereference(handle: &Handle) {
    let Ok(remaining) = with_open(handle, |f| {
        f.references = f.references.saturating_sub(1);
        f.references
    }) else {
        return;
    };
    if remaining > 0 {
        return;
    }
    let Ok(t) = target(handle) else { return };
    let mut request = Request::new(major(IRP_MJ_CLOSE), t.file_object, t.kernel_mode).from_origin(t.origin);
    dispatch(t.volume.handle, &mut request, |request| {
        fs::close(t.open);
        request.complete(STATUS_SUCCESS, 0);
    });
    // SAFETY: the file object stays in the table until removed below.
    let stream = unsafe { (*t.file_object).FsContext } as usize;
    with_table(|table| table.files.remove(&handle.0));
    crate::fltmgr::context::file_object_closed(t.file_object as usize);
    let stream_still_open =
        with_table(|table| table.files.values().any(|f| f.file_object.object.FsContext as usize == stream));
    if !stream_still_open {
        crate::fltmgr::context::stream_closed(stream);
    }
}

/// Queries information of `class` (a buffer of `length` bytes) through the filters, as `NtQueryInformationFile`.
///
/// # Errors
/// The final status: the class's or the file system's failure, or a filter's.
pub fn query_information(handle: &Handle, class: i32, length: u32) -> Result<Vec<u8>, NTSTATUS> {
    let t = target(handle)?;
    query_from(handle, class, length, Origin::default(), t.kernel_mode)
}

/// How a query by name was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueriedByName {
    /// The information, laid out as the class's structure.
    pub data: Vec<u8>,
    /// Whether the fast path (`IRP_MJ_QUERY_OPEN` or `IRP_MJ_NETWORK_QUERY_OPEN`) answered; otherwise a full
    /// create, query and close did.
    pub fast: bool,
}

/// The fast path a query by name tries first.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FastQuery {
    /// `IRP_MJ_QUERY_OPEN`, a file-system filter operation, refused with `FLT_PREOP_DISALLOW_FSFILTER_IO` or
    /// `FLT_POSTOP_DISALLOW_FSFILTER_IO`.
    QueryOpen,
    /// `IRP_MJ_NETWORK_QUERY_OPEN`, a fast I/O operation, refused with `FLT_PREOP_DISALLOW_FASTIO` (in pre only).
    NetworkQueryOpen,
}

impl FastQuery {
    fn major(self) -> u8 {
        let code = match self {
            Self::QueryOpen => IRP_MJ_QUERY_OPEN,
            Self::NetworkQueryOpen => IRP_MJ_NETWORK_QUERY_OPEN,
        };
        u8::try_from(code & 0xFF).unwrap_or(u8::MAX)
    }

    /// The status the fast path fails with when a filter refuses it.
    fn refused(self) -> NTSTATUS {
        match self {
            Self::QueryOpen => STATUS_FLT_DISALLOW_FSFILTER_IO,
            Self::NetworkQueryOpen => STATUS_FLT_DISALLOW_FAST_IO,
        }
    }
}

/// `NtQueryInformationByName` (what `GetFileInformationByName` and attribute queries use): first the fast path,
/// `IRP_MJ_QUERY_OPEN` through the filters as a file-system filter operation on a stack file object, which the file
/// system answers by opening, querying and closing in one go; when a filter refuses it
/// (`FLT_PREOP_DISALLOW_FSFILTER_IO` / `FLT_POSTOP_DISALLOW_FSFILTER_IO`) or the name crosses a reparse point, the
/// slow path: a full `IRP_MJ_CREATE` (which filters see, and a redirector may send elsewhere), a query and a close.
/// The model passes no IRP in `Parameters.QueryOpen.Irp` (NULL). `params` are the open's (`FILE_READ_ATTRIBUTES`
/// is what Windows asks for).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/flt-parameters-for-irp-mj-query-open>.
///
/// # Errors
/// The status of the slow path's create or query, or the fast path's failure other than a refusal.
pub fn query_by_name(path: &str, class: i32, params: &OpenParams) -> Result<QueriedByName, NTSTATUS> {
    query_by_name_via(FastQuery::QueryOpen, path, class, params)
}

/// `NtQueryFullAttributesFile` (`FILE_NETWORK_OPEN_INFORMATION` by name): first the fast path,
/// `IRP_MJ_NETWORK_QUERY_OPEN` through the filters as a fast I/O operation (`FLTFL_CALLBACK_DATA_FAST_IO_OPERATION`)
/// on a stack file object, with `Parameters.NetworkQueryOpen.NetworkInformation` pointing at the answer's buffer;
/// when a filter refuses it in pre-operation (`FLT_PREOP_DISALLOW_FASTIO`; a post-operation callback cannot refuse
/// it, the file system has answered) or the name crosses a reparse point, the slow path: a full `IRP_MJ_CREATE`, a
/// `FileNetworkOpenInformation` query and a close. The model passes no create IRP in
/// `Parameters.NetworkQueryOpen.Irp` (NULL). Filters must not reference the stack file object.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/flt-parameters-for-irp-mj-network-query-open>.
///
/// # Errors
/// The status of the slow path's create or query, or the fast path's failure other than a refusal.
pub fn query_full_attributes(path: &str, params: &OpenParams) -> Result<QueriedByName, NTSTATUS> {
    query_by_name_via(FastQuery::NetworkQueryOpen, path, FileNetworkOpenInformation, params)
}

fn query_by_name_via(fast: FastQuery, path: &str, class: i32, params: &OpenParams) -> Result<QueriedByName, NTSTATUS> {
    let (volume, within) = split_drive(path)?;
    let length = u32::try_from(super::info::query_size(class).unwrap_or(0)).unwrap_or(0);
    match query_open_fast(fast, &volume, &within, class, length, params) {
        Ok(data) => return Ok(QueriedByName { data, fast: true }),
        Err(status) if status != fast.refused() && status != STATUS_REPARSE => return Err(status),
        Err(_) => {}
    }
    let handle = create_on(&volume, &within, params, Origin::default(), 1)?;
    let data = query_information(&handle, class, length);
    close(handle);
    Ok(QueriedByName { data: data?, fast: false })
}

fn query_open_fast(
    fast: FastQuery,
    volume: &Volume,
    within: &str,
    class: i32,
    length: u32,
    params: &OpenParams,
) -> Result<Vec<u8>, NTSTATUS> {
    let mut file_object = new_file_object(within, true);
    let mut buffer = vec![0u8; usize::try_from(length).unwrap_or(0)];
    let mut length_in_out = length;
    let request = Request::new(fast.major(), &raw mut file_object.object, params.kernel_mode);
    let mut request = match fast {
        FastQuery::QueryOpen => request.fs_filter_operation(),
        FastQuery::NetworkQueryOpen => request.fast_io_operation(),
    };
    {
        let iopb = request.iopb();
        if params.case_sensitive {
            iopb.OperationFlags |= u8::try_from(SL_CASE_SENSITIVE).unwrap_or(0);
        }
        match fast {
            FastQuery::QueryOpen => {
                iopb.Parameters.QueryOpen.FileInformation = buffer.as_mut_ptr().cast();
                iopb.Parameters.QueryOpen.Length = &raw mut length_in_out;
                iopb.Parameters.QueryOpen.FileInformationClass = class;
            }
            FastQuery::NetworkQueryOpen => {
                iopb.Parameters.NetworkQueryOpen.NetworkInformation = buffer.as_mut_ptr().cast();
            }
        }
    }
    let identity = access_identity(params);
    dispatch(volume.handle, &mut request, |request| {
        let identity = match &identity {
            Ok(identity) => identity.clone(),
            Err(status) => return request.complete(*status, 0),
        };
        let fs_params = CreateParams {
            disposition: windows_sys::Wdk::Storage::FileSystem::FILE_OPEN,
            options: params.options & 0x00FF_FFFF,
            desired_access: params.desired_access,
            share_access: params.share_access,
            case_sensitive: params.case_sensitive,
            check_access_for: identity,
            ..CreateParams::default()
        };
        match fs::create_ex(volume, within, &fs_params) {
            Ok(fs::CreateOutcome::Opened(done)) => {
                let answer = super::info::query(done.open, std::ptr::null(), class, buffer.len());
                fs::cleanup(done.open);
                fs::close(done.open);
                match answer {
                    Ok(data) => {
                        let n = data.len().min(buffer.len());
                        buffer[..n].copy_from_slice(&data[..n]);
                        request.complete(STATUS_SUCCESS, 0);
                    }
                    Err(status) => request.complete(status, 0),
                }
            }
            // The fast path does not follow reparse points; the slow path's create does.
            Ok(fs::CreateOutcome::Reparse(_)) => request.complete(STATUS_REPARSE, 0),
            Err(status) => request.complete(status, 0),
        }
    });
    let status = request.status();
    if status < 0 || status == STATUS_REPARSE {
        return Err(status);
    }
    Ok(buffer)
}

/// `FlushFileBuffers` (`NtFlushBuffersFile`): `IRP_MJ_FLUSH_BUFFERS` through the filters. A user-mode handle
/// needs write or append access (`STATUS_ACCESS_DENIED` before any IRP, the I/O manager's check); the file system
/// answers.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-flush-buffers>.
///
/// # Errors
/// `STATUS_ACCESS_DENIED` without write access, or the status of the filters or the file system.
pub fn flush(handle: &Handle) -> Result<(), NTSTATUS> {
    let t = target(handle)?;
    if !t.kernel_mode && fs::granted_access(t.open)? & (FILE_WRITE_DATA | FILE_APPEND_DATA) == 0 {
        return Err(STATUS_ACCESS_DENIED);
    }
    flush_from(handle, 0, Origin::default(), t.kernel_mode)
}

/// Flushes through the filters from `origin`, with `minor` (`IRP_MN_FLUSH_*`, 0 for a full flush) as the flush
/// type.
pub(crate) fn flush_from(handle: &Handle, minor: u8, origin: Origin, kernel_mode: bool) -> Result<(), NTSTATUS> {
    let t = target(handle)?;
    let mut request = Request::new(major(IRP_MJ_FLUSH_BUFFERS), t.file_object, kernel_mode).from_origin(origin);
    request.iopb().MinorFunction = minor;
    dispatch(t.volume.handle, &mut request, |request| match fs::flush(t.open) {
        Ok(()) => request.complete(STATUS_SUCCESS, 0),
        Err(status) => request.complete(status, 0),
    });
    let status = request.status();
    if status < 0 { Err(status) } else { Ok(()) }
}

/// Queries information through the filters from `origin`.
pub(crate) fn query_from(
    handle: &Handle,
    class: i32,
    length: u32,
    origin: Origin,
    kernel_mode: bool,
) -> Result<Vec<u8>, NTSTATUS> {
    let t = target(handle)?;
    let mut buffer = vec![0u8; usize::try_from(length).unwrap_or(0)];
    let mut request = Request::new(major(IRP_MJ_QUERY_INFORMATION), t.file_object, kernel_mode).from_origin(origin);
    {
        let iopb = request.iopb();
        iopb.Parameters.QueryFileInformation.Length = length;
        iopb.Parameters.QueryFileInformation.FileInformationClass = class;
        iopb.Parameters.QueryFileInformation.InfoBuffer = buffer.as_mut_ptr().cast();
    }
    dispatch(t.volume.handle, &mut request, |request| {
        // SAFETY: the union holds the QueryFileInformation parameters for IRP_MJ_QUERY_INFORMATION.
        let query = unsafe { request.iopb().Parameters.QueryFileInformation };
        let length = usize::try_from(query.Length).unwrap_or(0).min(buffer.len());
        match super::info::query(t.open, t.file_object, query.FileInformationClass, length) {
            Ok(data) => {
                let n = data.len().min(buffer.len());
                buffer[..n].copy_from_slice(&data[..n]);
                request.complete(STATUS_SUCCESS, n);
            }
            Err(status) => request.complete(status, 0),
        }
    });
    let status = request.status();
    if status < 0 {
        return Err(status);
    }
    buffer.truncate(request.information().min(buffer.len()));
    Ok(buffer)
}

/// Sets information of `class` from `data` through the filters, as `NtSetInformationFile`.
///
/// # Errors
/// The final status.
pub fn set_information(handle: &Handle, class: i32, data: &[u8]) -> Result<(), NTSTATUS> {
    let t = target(handle)?;
    set_from(handle, class, data, Origin::default(), t.kernel_mode)
}

/// Sets information through the filters from `origin`.
pub(crate) fn set_from(
    handle: &Handle,
    class: i32,
    data: &[u8],
    origin: Origin,
    kernel_mode: bool,
) -> Result<(), NTSTATUS> {
    let t = target(handle)?;
    let parent = open_link_or_rename_target(&t, class, data, origin, kernel_mode)?;
    let mut buffer = data.to_vec();
    let mut request = Request::new(major(IRP_MJ_SET_INFORMATION), t.file_object, kernel_mode).from_origin(origin);
    {
        let iopb = request.iopb();
        iopb.Parameters.SetFileInformation.Length = u32::try_from(data.len()).map_err(|_| STATUS_INVALID_PARAMETER)?;
        iopb.Parameters.SetFileInformation.FileInformationClass = class;
        iopb.Parameters.SetFileInformation.InfoBuffer = buffer.as_mut_ptr().cast();
        if let Some(parent) = &parent {
            iopb.Parameters.SetFileInformation.ParentOfTarget = file_object_and_volume(parent)?.0;
        }
    }
    dispatch(t.volume.handle, &mut request, |request| {
        // SAFETY: the union holds the SetFileInformation parameters for IRP_MJ_SET_INFORMATION.
        let set = unsafe { request.iopb().Parameters.SetFileInformation };
        let length = usize::try_from(set.Length).unwrap_or(0).min(buffer.len());
        super::oplock::before_set_information(t.open, set.FileInformationClass, &buffer[..length]);
        match super::info::set(t.open, t.file_object, &t.volume, set.FileInformationClass, &buffer[..length]) {
            Ok(()) => request.complete(STATUS_SUCCESS, 0),
            Err(status) => request.complete(status, 0),
        }
    });
    if let Some(parent) = parent {
        close(parent);
    }
    let status = request.status();
    if status < 0 { Err(status) } else { Ok(()) }
}

/// Before a rename or link to a full name, the I/O manager opens the directory that will hold the target
/// (`SL_OPEN_TARGET_DIRECTORY`, through the filters, with write access checked for a user-mode caller) and hands
/// it to the file system as `ParentOfTarget`; a target on another volume fails with `STATUS_NOT_SAME_DEVICE`
/// first. A bare name (the same directory) needs no such open.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-create> (`SL_OPEN_TARGET_DIRECTORY`).
fn open_link_or_rename_target(
    t: &Target,
    class: i32,
    data: &[u8],
    origin: Origin,
    kernel_mode: bool,
) -> Result<Option<Handle>, NTSTATUS> {
    if class != FileRenameInformation && class != FileLinkInformation {
        return Ok(None);
    }
    let (_, name) = super::info::link_or_rename_target(data)?;
    if !name.starts_with('\\') {
        return Ok(None);
    }
    let (volume, within) = crate::fltmgr::fileio::resolve_object_name(&name)?;
    if volume.handle != t.volume.handle {
        return Err(STATUS_NOT_SAME_DEVICE);
    }
    let params = OpenParams {
        desired_access: FILE_WRITE_DATA | SYNCHRONIZE,
        share_access: FILE_SHARE_READ | FILE_SHARE_WRITE,
        kernel_mode: true,
        force_access_check: !kernel_mode,
        open_target_directory: true,
        ..OpenParams::default()
    };
    create_on(&volume, &within, &params, origin, 1).map(Some)
}

/// The file object and volume behind `handle`.
pub(crate) fn file_object_and_volume(handle: &Handle) -> Result<(*mut FILE_OBJECT, Volume), NTSTATUS> {
    with_open(handle, |f| (&raw mut f.file_object.object, f.volume.clone()))
}

/// The file system's open behind `handle`.
pub(crate) fn open_of(handle: &Handle) -> Result<OpenId, NTSTATUS> {
    with_open(handle, |f| f.open)
}

/// Records that a section exists for the stream of `handle` (its `SECTION_OBJECT_POINTERS.DataSectionObject`).
pub(crate) fn mark_section(handle: &Handle) {
    let _ = with_open(handle, |f| {
        // SAFETY: the section object pointers belong to the stream, which outlives its open files.
        if let Some(section) = unsafe { f.file_object.object.SectionObjectPointer.as_mut() } {
            section.DataSectionObject = (&raw mut f.file_object.object).cast();
        }
    });
}

/// The owner of the byte-range locks an operation on `file_object` takes or is checked against: the file object and
/// the current (requesting) process.
pub(crate) fn lock_owner(file_object: *const FILE_OBJECT) -> super::locks::Owner {
    super::locks::Owner { file_object: file_object as usize, process: crate::kernel::process::current().id }
}

/// Whether the file system's locks on the stream of `handle` let the current process read (or write) the range.
fn fs_lock_allows(handle: &Handle, file_object: *const FILE_OBJECT, offset: u64, length: u64, write: bool) -> bool {
    let owner = lock_owner(file_object);
    let Ok(stream) = with_open(handle, |f| f.stream) else { return true };
    with_table(|t| {
        t.locks
            .get(&stream)
            .is_none_or(|l| if write { l.can_write(owner, offset, length) } else { l.can_read(owner, offset, length) })
    })
}

/// Locks a byte range through the filters (`IRP_MJ_LOCK_CONTROL`, `IRP_MN_LOCK` with `FailImmediately` TRUE), as
/// `LockFileEx` with `LOCKFILE_FAIL_IMMEDIATELY` does.
///
/// # Errors
/// `STATUS_LOCK_NOT_GRANTED` on a conflict, or a filter's status.
pub fn lock(handle: &Handle, offset: u64, length: u64, key: u32, exclusive: bool) -> Result<(), NTSTATUS> {
    lock_control(handle, IRP_MN_LOCK, offset, length, key, exclusive, true)
}

/// Locks a byte range and waits for it (`IRP_MN_LOCK` with `FailImmediately` FALSE), as `LockFileEx` without
/// `LOCKFILE_FAIL_IMMEDIATELY` does on a synchronous handle: "Otherwise, it waits"
/// (<https://learn.microsoft.com/windows/win32/api/fileapi/nf-fileapi-lockfileex>). A request that conflicts with
/// a granted lock blocks the calling thread until the conflicting locks are released (an unlock, an unlock-all, or
/// their handle's cleanup) and it is granted, in arrival order with the other waiters.
///
/// The request and its completion processing run in the calling thread (on Windows the completion of a queued
/// request runs in the thread that released the lock; the model keeps it in the waiter's, as the result reaches the
/// same filters). When nothing could end the wait, [`Rule::LockWaitDeadlock`](crate::Rule::LockWaitDeadlock) is
/// reported and the request is cancelled.
///
/// # Errors
/// `STATUS_CANCELLED` when the handle was cleaned up while the request waited, or nothing could end the wait
/// (reported); a filter's status.
pub fn lock_wait(handle: &Handle, offset: u64, length: u64, key: u32, exclusive: bool) -> Result<(), NTSTATUS> {
    lock_control(handle, IRP_MN_LOCK, offset, length, key, exclusive, false)
}

/// Unlocks a byte range through the filters (`IRP_MN_UNLOCK_SINGLE`), as `UnlockFileEx` does; lock requests
/// waiting for the range may be granted.
///
/// # Errors
/// `STATUS_RANGE_NOT_LOCKED`, or a filter's status.
pub fn unlock(handle: &Handle, offset: u64, length: u64, key: u32) -> Result<(), NTSTATUS> {
    lock_control(handle, IRP_MN_UNLOCK_SINGLE, offset, length, key, false, true)
}

/// How many lock requests wait on the file system's locks of the stream `handle` opened.
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for a handle that is not open.
pub fn waiting_locks(handle: &Handle) -> Result<usize, NTSTATUS> {
    let stream = with_open(handle, |f| f.stream)?;
    Ok(with_table(|t| t.locks.get(&stream).map_or(0, |l| l.waiting().len())))
}

/// Completes the waiting lock requests a release granted.
fn grant(granted: Vec<super::locks::Waiter>) {
    for waiter in granted {
        super::locks::resolve(waiter.id, STATUS_SUCCESS);
    }
}

fn lock_control(
    handle: &Handle,
    minor: u32,
    offset: u64,
    length: u64,
    key: u32,
    exclusive: bool,
    fail_immediately: bool,
) -> Result<(), NTSTATUS> {
    let t = target(handle)?;
    let mut length_value = i64::try_from(length).map_err(|_| STATUS_INVALID_PARAMETER)?;
    let mut request = Request::new(major(IRP_MJ_LOCK_CONTROL), t.file_object, t.kernel_mode);
    {
        let iopb = request.iopb();
        iopb.MinorFunction = u8::try_from(minor).unwrap_or(0);
        iopb.Parameters.LockControl.Length = &raw mut length_value;
        iopb.Parameters.LockControl.Key = key;
        iopb.Parameters.LockControl.ByteOffset = i64::try_from(offset).map_err(|_| STATUS_INVALID_PARAMETER)?;
        iopb.Parameters.LockControl.ProcessId = crate::kernel::process::current().peprocess();
        iopb.Parameters.LockControl.FailImmediately = fail_immediately;
        iopb.Parameters.LockControl.ExclusiveLock = exclusive;
    }
    let stream = t.stream;
    // The request holds a reference to the file object while it is in progress, as an IRP does: the handle may be
    // closed by another thread while the request waits, and the close comes after the request completes.
    reference(handle);
    dispatch(t.volume.handle, &mut request, |request| {
        // Every byte-range lock operation checks the stream's oplocks first.
        super::oplock::before_operation(t.open, super::oplock::Operation::Lock);
        // Whether the request may wait, as the filters left FailImmediately.
        // SAFETY: the union holds the LockControl parameters for IRP_MJ_LOCK_CONTROL.
        let wait = !unsafe { request.iopb().Parameters.LockControl.FailImmediately };
        let owner = lock_owner(t.file_object);
        let lock = super::locks::Lock { owner, key, offset, length, exclusive };
        let result = with_table(|table| {
            let locks = table.locks.entry(stream).or_default();
            if minor != IRP_MN_LOCK {
                return locks.unlock(owner, key, offset, length).map(grant).map(|()| None);
            }
            if wait {
                return Ok(match locks.lock_or_wait(lock) {
                    super::locks::Grant::Granted => None,
                    super::locks::Grant::Waiting(id) => Some(id),
                });
            }
            locks.lock(lock).map(|()| None)
        });
        let status = match result {
            Ok(None) => STATUS_SUCCESS,
            Ok(Some(id)) => super::locks::wait(id, "IRP_MJ_LOCK_CONTROL", |id| {
                with_table(|table| table.locks.get_mut(&stream).and_then(|l| l.cancel(id)).is_some())
            }),
            Err(status) => status,
        };
        request.complete(status, 0);
    });
    dereference(handle);
    let status = request.status();
    if status < 0 { Err(status) } else { Ok(()) }
}

/// The create status of the open behind `handle`: `STATUS_SUCCESS`, or `STATUS_OPLOCK_BREAK_IN_PROGRESS` for a
/// `FILE_COMPLETE_IF_OPLOCKED` create that broke an oplock without waiting for its acknowledgement.
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for a handle that is not open.
pub fn create_status(handle: &Handle) -> Result<NTSTATUS, NTSTATUS> {
    with_open(handle, |f| f.create_status)
}

/// Whether the file system holds byte-range locks on `stream`.
pub(crate) fn stream_has_locks(stream: StreamId) -> bool {
    with_table(|t| t.locks.get(&stream).is_some_and(|l| !l.locks().is_empty()))
}

pub use super::fsctl::{FsControl, FsControlResult, PendingFsControl, fs_control, fs_control_async};
