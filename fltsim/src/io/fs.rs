//! The model file system: files of a volume stored in the volume's host directory, answering as NTFS does where
//! Shunt depends on it.
//!
//! Names are resolved case-insensitively component by component (NTFS's default), creates follow the NT
//! dispositions and report the `IoStatus.Information` NTFS reports, share access is arbitrated per stream as
//! `IoCheckShareAccess` does, and reads at or past the end of file fail with `STATUS_END_OF_FILE`.
//!
//! Each open is an [`OpenId`]; every open of the same file shares one [`StreamId`], as every file object of a
//! stream shares one set of section object pointers.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::Storage::FileSystem::{
        FILE_CREATE, FILE_DIRECTORY_FILE, FILE_NON_DIRECTORY_FILE, FILE_OPEN, FILE_OPEN_IF, FILE_OVERWRITE,
        FILE_OVERWRITE_IF, FILE_SUPERSEDE,
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_ACCESS_DENIED, STATUS_END_OF_FILE, STATUS_FILE_CLOSED, STATUS_FILE_IS_A_DIRECTORY,
            STATUS_INVALID_PARAMETER, STATUS_NOT_A_DIRECTORY, STATUS_OBJECT_NAME_COLLISION,
            STATUS_OBJECT_NAME_INVALID, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_OBJECT_PATH_NOT_FOUND,
            STATUS_SHARING_VIOLATION, STATUS_UNEXPECTED_IO_ERROR,
        },
        Storage::FileSystem::{
            DELETE, FILE_APPEND_DATA, FILE_EXECUTE, FILE_READ_DATA, FILE_SHARE_DELETE, FILE_SHARE_READ,
            FILE_SHARE_WRITE, FILE_WRITE_DATA,
        },
        System::WindowsProgramming::{FILE_CREATED, FILE_OPENED, FILE_OVERWRITTEN, FILE_SUPERSEDED},
    },
};

use super::Volume;

/// The parameters of a create that reach the file system.
#[derive(Clone, Copy, Debug, Default)]
pub struct CreateParams {
    /// `FILE_SUPERSEDE` … `FILE_OVERWRITE_IF`.
    pub disposition: u32,
    /// `FILE_*` create options (`FILE_DIRECTORY_FILE`, `FILE_NON_DIRECTORY_FILE`, …).
    pub options: u32,
    /// The access mask asked for.
    pub desired_access: u32,
    /// `FILE_SHARE_*`.
    pub share_access: u32,
    /// Attributes for a new file.
    pub file_attributes: u32,
    /// `SL_CASE_SENSITIVE`: compare names case-sensitively.
    pub case_sensitive: bool,
}

/// What a successful create opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// The new open.
    pub open: OpenId,
    /// The stream it opened (shared by every open of that file).
    pub stream: StreamId,
    /// `FILE_OPENED`, `FILE_CREATED`, `FILE_OVERWRITTEN` or `FILE_SUPERSEDED`.
    pub information: usize,
    /// Whether it is a directory.
    pub directory: bool,
}

/// One open of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpenId(pub u64);

/// One stream of one file on one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

#[derive(Clone, Debug)]
struct Open {
    stream: StreamId,
    host: PathBuf,
    name: String,
    access: u32,
    share: u32,
    cleaned_up: bool,
}

#[derive(Default)]
struct State {
    next_open: u64,
    streams: BTreeMap<PathBuf, StreamId>,
    opens: BTreeMap<OpenId, Open>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    f(state().get_or_insert_with(State::default))
}

const READ_RIGHTS: u32 = FILE_READ_DATA | FILE_EXECUTE;
const WRITE_RIGHTS: u32 = FILE_WRITE_DATA | FILE_APPEND_DATA;

/// Splits a path within a volume (`\dir\file`) into components, refusing empty and dot components.
fn components(path: &str) -> Result<Vec<&str>, NTSTATUS> {
    let rest = path.strip_prefix('\\').ok_or(STATUS_OBJECT_NAME_INVALID)?;
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    rest.split('\\')
        .map(|c| if c.is_empty() || c == "." || c == ".." { Err(STATUS_OBJECT_NAME_INVALID) } else { Ok(c) })
        .collect()
}

/// Finds `name` in the host directory `dir`, case-insensitively unless `case_sensitive`.
fn find_entry(dir: &Path, name: &str, case_sensitive: bool) -> Option<PathBuf> {
    let exact = dir.join(name);
    if exact.exists() {
        return Some(exact);
    }
    if case_sensitive {
        return None;
    }
    let upper = name.to_uppercase();
    fs::read_dir(dir).ok()?.filter_map(Result::ok).map(|e| e.path()).find(|p| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.to_uppercase() == upper)
    })
}

/// Resolves `path` on `volume` to the host path of its parent directory and, if it exists, of the file itself,
/// with the name's last component as the caller spelled it.
fn resolve(volume: &Volume, path: &str, case_sensitive: bool) -> Result<(PathBuf, Option<PathBuf>, String), NTSTATUS> {
    let parts = components(path)?;
    let mut dir = volume.spec.root.clone();
    let Some((last, parents)) = parts.split_last() else {
        return Ok((dir.clone(), Some(dir), String::new()));
    };
    for part in parents {
        let next = find_entry(&dir, part, case_sensitive).ok_or(STATUS_OBJECT_PATH_NOT_FOUND)?;
        if !next.is_dir() {
            return Err(STATUS_OBJECT_PATH_NOT_FOUND);
        }
        dir = next;
    }
    let existing = find_entry(&dir, last, case_sensitive);
    Ok((dir, existing, (*last).to_owned()))
}

fn io_error(_: std::io::Error) -> NTSTATUS {
    STATUS_UNEXPECTED_IO_ERROR
}

/// `IoCheckShareAccess`: whether an open with `access`/`share` may join the opens of `stream`.
fn share_conflict(state: &State, stream: StreamId, access: u32, share: u32) -> bool {
    let wants = |mask: u32| access & mask != 0;
    state.opens.values().filter(|o| o.stream == stream && !o.cleaned_up).any(|o| {
        let has = |mask: u32| o.access & mask != 0;
        (wants(READ_RIGHTS) && o.share & FILE_SHARE_READ == 0)
            || (wants(WRITE_RIGHTS) && o.share & FILE_SHARE_WRITE == 0)
            || (wants(DELETE) && o.share & FILE_SHARE_DELETE == 0)
            || (has(READ_RIGHTS) && share & FILE_SHARE_READ == 0)
            || (has(WRITE_RIGHTS) && share & FILE_SHARE_WRITE == 0)
            || (has(DELETE) && share & FILE_SHARE_DELETE == 0)
    })
}

/// Opens or creates `path` (within `volume`) as NTFS would.
///
/// # Errors
/// The NTSTATUS NTFS returns: `STATUS_OBJECT_NAME_NOT_FOUND`, `STATUS_OBJECT_PATH_NOT_FOUND`,
/// `STATUS_OBJECT_NAME_COLLISION`, `STATUS_FILE_IS_A_DIRECTORY`, `STATUS_NOT_A_DIRECTORY`,
/// `STATUS_SHARING_VIOLATION`, `STATUS_INVALID_PARAMETER` for an unknown disposition.
pub fn create(volume: &Volume, path: &str, params: &CreateParams) -> Result<Created, NTSTATUS> {
    let (dir, existing, last) = resolve(volume, path, params.case_sensitive)?;
    let wants_directory = params.options & FILE_DIRECTORY_FILE != 0;
    let (host, information) = match (existing, params.disposition) {
        (Some(host), FILE_CREATE) => {
            let _ = host;
            return Err(STATUS_OBJECT_NAME_COLLISION);
        }
        (Some(host), FILE_OPEN | FILE_OPEN_IF) => (host, FILE_OPENED),
        (Some(host), FILE_OVERWRITE | FILE_OVERWRITE_IF) => (host, FILE_OVERWRITTEN),
        (Some(host), FILE_SUPERSEDE) => (host, FILE_SUPERSEDED),
        (None, FILE_OPEN | FILE_OVERWRITE) => return Err(STATUS_OBJECT_NAME_NOT_FOUND),
        (None, FILE_CREATE | FILE_OPEN_IF | FILE_OVERWRITE_IF | FILE_SUPERSEDE) => (dir.join(&last), FILE_CREATED),
        _ => return Err(STATUS_INVALID_PARAMETER),
    };
    let exists = information != FILE_CREATED;
    let is_directory = if exists { host.is_dir() } else { wants_directory };
    if exists && is_directory && params.options & FILE_NON_DIRECTORY_FILE != 0 {
        return Err(STATUS_FILE_IS_A_DIRECTORY);
    }
    if exists && !is_directory && wants_directory {
        return Err(STATUS_NOT_A_DIRECTORY);
    }
    if is_directory && information != FILE_OPENED && information != FILE_CREATED {
        return Err(STATUS_INVALID_PARAMETER);
    }
    let stream = with_state(|s| {
        let next = StreamId(u64::try_from(s.streams.len()).unwrap_or(u64::MAX).saturating_add(1));
        *s.streams.entry(host.clone()).or_insert(next)
    });
    if with_state(|s| share_conflict(s, stream, params.desired_access, params.share_access)) {
        return Err(STATUS_SHARING_VIOLATION);
    }
    match information {
        FILE_CREATED if is_directory => fs::create_dir(&host).map_err(io_error)?,
        FILE_CREATED | FILE_OVERWRITTEN | FILE_SUPERSEDED => drop(File::create(&host).map_err(io_error)?),
        _ => {}
    }
    let name = host.strip_prefix(&volume.spec.root).map_or_else(
        |_| path.to_owned(),
        |rel| format!("\\{}", rel.to_string_lossy().replace('/', "\\")),
    );
    let open = with_state(|s| {
        s.next_open = s.next_open.saturating_add(1);
        let id = OpenId(s.next_open);
        s.opens.insert(
            id,
            Open { stream, host, name, access: params.desired_access, share: params.share_access, cleaned_up: false },
        );
        id
    });
    Ok(Created { open, stream, information: information as usize, directory: is_directory })
}

fn open_of(open: OpenId) -> Result<Open, NTSTATUS> {
    with_state(|s| s.opens.get(&open).cloned()).ok_or(STATUS_INVALID_PARAMETER)
}

fn live(open: OpenId) -> Result<Open, NTSTATUS> {
    let o = open_of(open)?;
    if o.cleaned_up { Err(STATUS_FILE_CLOSED) } else { Ok(o) }
}

/// Reads up to `length` bytes at `offset`: a short read at the end of file, `STATUS_END_OF_FILE` at or past it.
///
/// # Errors
/// `STATUS_END_OF_FILE`; `STATUS_ACCESS_DENIED` without read access; `STATUS_FILE_CLOSED` after cleanup.
pub fn read(open: OpenId, offset: u64, length: usize) -> Result<Vec<u8>, NTSTATUS> {
    let o = live(open)?;
    if o.access & READ_RIGHTS == 0 {
        return Err(STATUS_ACCESS_DENIED);
    }
    let mut file = File::open(&o.host).map_err(io_error)?;
    let size = file.metadata().map_err(io_error)?.len();
    if offset >= size {
        return Err(STATUS_END_OF_FILE);
    }
    file.seek(SeekFrom::Start(offset)).map_err(io_error)?;
    let available = usize::try_from(size - offset).unwrap_or(usize::MAX);
    let mut buffer = vec![0; length.min(available)];
    file.read_exact(&mut buffer).map_err(io_error)?;
    Ok(buffer)
}

/// Writes `data` at `offset`, or at the end of file when `offset` is `None` (write-to-end-of-file, atomic in the
/// model because the file system holds its state lock across it).
///
/// # Errors
/// `STATUS_ACCESS_DENIED` without write access; `STATUS_FILE_CLOSED` after cleanup.
pub fn write(open: OpenId, offset: Option<u64>, data: &[u8]) -> Result<usize, NTSTATUS> {
    let o = live(open)?;
    if o.access & WRITE_RIGHTS == 0 {
        return Err(STATUS_ACCESS_DENIED);
    }
    let _serialised = state();
    let mut file = OpenOptions::new().write(true).open(&o.host).map_err(io_error)?;
    match offset {
        Some(at) => file.seek(SeekFrom::Start(at)),
        None => file.seek(SeekFrom::End(0)),
    }
    .map_err(io_error)?;
    file.write_all(data).map_err(io_error)?;
    Ok(data.len())
}

/// The file's size.
///
/// # Errors
/// `STATUS_FILE_CLOSED` after cleanup.
pub fn end_of_file(open: OpenId) -> Result<u64, NTSTATUS> {
    let o = live(open)?;
    fs::metadata(&o.host).map(|m| m.len()).map_err(io_error)
}

/// Sets the file's size.
///
/// # Errors
/// `STATUS_ACCESS_DENIED` without write access; `STATUS_FILE_CLOSED` after cleanup.
pub fn set_end_of_file(open: OpenId, size: u64) -> Result<(), NTSTATUS> {
    let o = live(open)?;
    if o.access & FILE_WRITE_DATA == 0 {
        return Err(STATUS_ACCESS_DENIED);
    }
    OpenOptions::new().write(true).open(&o.host).and_then(|f| f.set_len(size)).map_err(io_error)
}

/// The open's name within its volume, as the file system stores it.
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for an unknown open.
pub fn name(open: OpenId) -> Result<String, NTSTATUS> {
    open_of(open).map(|o| o.name)
}

/// `IRP_MJ_CLEANUP`: the handle is closed; its share access is released.
pub fn cleanup(open: OpenId) {
    with_state(|s| {
        if let Some(o) = s.opens.get_mut(&open) {
            o.cleaned_up = true;
        }
    });
}

/// `IRP_MJ_CLOSE`: the last reference to the file object is gone.
pub fn close(open: OpenId) {
    with_state(|s| s.opens.remove(&open));
}
