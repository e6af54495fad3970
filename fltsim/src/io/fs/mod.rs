//! The model file system: files of a volume stored in the volume's host directory, answering as NTFS does where
//! Shunt depends on it.
//!
//! # What lives where
//!
//! The data of every file's default stream lives in a host file at the path its long name gives under
//! `volume.spec.root`, so tests can inspect it; directories are host directories and hard links are host hard
//! links. Everything the host cannot hold is model state kept per volume (keyed by the host root, so volumes and
//! parallel tests never share it): the namespace with its 8.3 short names, 64-bit file IDs, attributes and times,
//! named data streams (in memory, never on the host: they vanish with the process, like all model metadata),
//! reparse points, ACLs and delete dispositions. Host entries created behind the model's back are adopted the next
//! time their directory is looked at (with new file IDs; two host names of one host inode are two files to the
//! model); entries removed behind its back are forgotten.
//!
//! # Semantics and sources
//!
//! The rules follow [MS-FSA] (the object-store behaviour Windows file systems implement) and the WDK pages on
//! `NtCreateFile`, `IoCheckShareAccess`, file information classes and reparse points; each function names its
//! page. Where the pages leave a case open the model is stricter and says so.
//!
//! Each open is an [`OpenId`]; every open of the same stream shares one [`StreamId`], as every file object of a
//! stream shares one set of section object pointers. Named streams have their own [`StreamId`]s but share the
//! file's ID.
//!
//! [MS-FSA]: https://learn.microsoft.com/openspecs/windows_protocols/ms-fsa/8ada5fbe-db4e-49fd-aef6-20d54b748e40

mod names;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use windows_sys::{
    Wdk::{
        Storage::FileSystem::{
            FILE_CREATE, FILE_DELETE_ON_CLOSE, FILE_DIRECTORY_FILE, FILE_NON_DIRECTORY_FILE, FILE_OPEN, FILE_OPEN_IF,
            FILE_OPEN_REPARSE_POINT, FILE_OVERWRITE, FILE_OVERWRITE_IF, FILE_SUPERSEDE,
        },
        System::SystemServices::FILE_ATTRIBUTE_VALID_SET_FLAGS,
    },
    Win32::{
        Foundation::{
            GENERIC_ALL, GENERIC_EXECUTE, GENERIC_READ, GENERIC_WRITE, NTSTATUS, STATUS_ACCESS_DENIED,
            STATUS_CANNOT_DELETE, STATUS_DELETE_PENDING, STATUS_DIRECTORY_NOT_EMPTY, STATUS_END_OF_FILE,
            STATUS_FILE_CLOSED, STATUS_FILE_DELETED, STATUS_FILE_IS_A_DIRECTORY, STATUS_INVALID_PARAMETER,
            STATUS_NOT_A_DIRECTORY, STATUS_NOT_A_REPARSE_POINT, STATUS_OBJECT_NAME_COLLISION,
            STATUS_OBJECT_NAME_INVALID, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_OBJECT_PATH_NOT_FOUND, STATUS_REPARSE,
            STATUS_SHARING_VIOLATION, STATUS_TOO_MANY_LINKS, STATUS_UNEXPECTED_IO_ERROR,
        },
        Storage::FileSystem::{
            DELETE, FILE_ADD_SUBDIRECTORY, FILE_ALL_ACCESS, FILE_APPEND_DATA, FILE_ATTRIBUTE_ARCHIVE,
            FILE_ATTRIBUTE_DIRECTORY, FILE_ATTRIBUTE_HIDDEN, FILE_ATTRIBUTE_NORMAL, FILE_ATTRIBUTE_READONLY,
            FILE_ATTRIBUTE_REPARSE_POINT, FILE_ATTRIBUTE_SYSTEM, FILE_ATTRIBUTE_TEMPORARY, FILE_DELETE_CHILD,
            FILE_EXECUTE, FILE_GENERIC_EXECUTE, FILE_GENERIC_READ, FILE_GENERIC_WRITE, FILE_READ_ATTRIBUTES,
            FILE_READ_DATA, FILE_READ_EA, FILE_SHARE_DELETE, FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_WRITE_ATTRIBUTES,
            FILE_WRITE_DATA, FILE_WRITE_EA, READ_CONTROL, SYNCHRONIZE, WRITE_DAC, WRITE_OWNER,
        },
        System::WindowsProgramming::{
            FILE_CREATED, FILE_DOES_NOT_EXIST, FILE_EXISTS, FILE_OPENED, FILE_OVERWRITTEN, FILE_SUPERSEDED,
        },
    },
};

use self::names::{ParsedPath, StreamSpec};
use super::Volume;

/// `IO_REPARSE_TAG_MOUNT_POINT` (junctions and volume mount points), from winnt.h.
pub const IO_REPARSE_TAG_MOUNT_POINT: u32 = 0xA000_0003;
/// `IO_REPARSE_TAG_SYMLINK`, from winnt.h.
pub const IO_REPARSE_TAG_SYMLINK: u32 = 0xA000_000C;
/// `MAXIMUM_ALLOWED`: grant whatever the security descriptor allows.
const MAXIMUM_ALLOWED: u32 = 0x0200_0000;
/// `ACCESS_SYSTEM_SECURITY`: the SACL, which needs `SeSecurityPrivilege` (administrators only in the model).
const ACCESS_SYSTEM_SECURITY: u32 = 0x0100_0000;
/// The cluster size allocation sizes are rounded to.
pub const CLUSTER_SIZE: u64 = 4096;
/// NTFS's limit on hard links per file (MS-FSA 2.1.5.15.6).
const MAX_LINKS: usize = 1024;
/// The root directory's file ID on NTFS: MFT record 5, sequence number 5.
pub const ROOT_FILE_ID: u64 = 0x0005_0000_0000_0005;
/// 100-ns intervals between 1601-01-01 and 1970-01-01.
const FILETIME_UNIX_EPOCH: i64 = 116_444_736_000_000_000;

/// The principal that matches every identity with `admin` set.
pub const ADMINISTRATORS: &str = "Administrators";
/// The principal of the local system account.
pub const SYSTEM: &str = "SYSTEM";

/// Who a create checks access for: a user name and whether the token holds the Administrators group.
/// The I/O manager maps a requestor's token to this; `None` in [`CreateParams::check_access_for`] is a kernel-mode
/// create without `IO_FORCE_ACCESS_CHECK`, which skips the check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessIdentity {
    /// The account name (`"alice"`, `"SYSTEM"`), compared case-insensitively.
    pub user: String,
    /// Whether the token contains BUILTIN\Administrators (enabled).
    pub admin: bool,
}

impl AccessIdentity {
    /// The local system account, which is a member of Administrators.
    #[must_use]
    pub fn system() -> Self {
        Self { user: SYSTEM.to_owned(), admin: true }
    }

    /// An ordinary user.
    #[must_use]
    pub fn user(name: &str) -> Self {
        Self { user: name.to_owned(), admin: false }
    }
}

/// A principal in a model ACL: a user name, [`ADMINISTRATORS`] or [`SYSTEM`].
pub type Principal = String;

/// A model DACL: who may read and who may write. A file without one allows everyone everything (a NULL DACL).
///
/// Read covers `FILE_READ_DATA`, `FILE_READ_EA`, `FILE_EXECUTE`, `READ_CONTROL` and `FILE_READ_ATTRIBUTES`; write
/// covers `FILE_WRITE_DATA`, `FILE_APPEND_DATA`, `FILE_WRITE_EA`, `FILE_WRITE_ATTRIBUTES`, `DELETE`, `WRITE_DAC`,
/// `WRITE_OWNER` and `FILE_DELETE_CHILD`; `SYNCHRONIZE` is always granted. As on NTFS, read on the parent directory
/// (`FILE_LIST_DIRECTORY`) also grants `FILE_READ_ATTRIBUTES`, and write on it (`FILE_DELETE_CHILD`) also grants
/// `DELETE` (<https://learn.microsoft.com/windows/win32/fileio/file-security-and-access-rights>). New files inherit
/// their parent's ACL, as inheritable ACEs would make them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    /// Principals granted read access.
    pub read: Vec<Principal>,
    /// Principals granted write access.
    pub write: Vec<Principal>,
}

/// What a reparse point substitutes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReparseTarget {
    /// `IO_REPARSE_TAG_SYMLINK` to a path on the same volume: absolute (`\dir\target`) or relative to the link's
    /// directory (`..\target`). On a file or a directory.
    SymbolicLink(String),
    /// `IO_REPARSE_TAG_MOUNT_POINT` to a directory of the same volume (`\dir\target`). On an empty directory.
    Junction(String),
    /// `IO_REPARSE_TAG_MOUNT_POINT` to the root of another volume, named as the I/O manager should reopen it
    /// (its device name or `\??\Volume{GUID}`). On an empty directory.
    MountPoint(String),
}

impl ReparseTarget {
    fn tag(&self) -> u32 {
        match self {
            Self::SymbolicLink(_) => IO_REPARSE_TAG_SYMLINK,
            Self::Junction(_) | Self::MountPoint(_) => IO_REPARSE_TAG_MOUNT_POINT,
        }
    }
}

/// The parameters of a create that reach the file system.
#[derive(Clone, Debug, Default)]
pub struct CreateParams {
    /// `FILE_SUPERSEDE` … `FILE_OVERWRITE_IF`.
    pub disposition: u32,
    /// `FILE_*` create options (`FILE_DIRECTORY_FILE`, `FILE_NON_DIRECTORY_FILE`, `FILE_DELETE_ON_CLOSE`,
    /// `FILE_OPEN_REPARSE_POINT`, …).
    pub options: u32,
    /// The access mask asked for (generic rights and `MAXIMUM_ALLOWED` are mapped by the model).
    pub desired_access: u32,
    /// `FILE_SHARE_*`.
    pub share_access: u32,
    /// Attributes for a new, overwritten or superseded file.
    pub file_attributes: u32,
    /// `SL_CASE_SENSITIVE`: compare names case-sensitively.
    pub case_sensitive: bool,
    /// `SL_OPEN_TARGET_DIRECTORY`: open the parent of the named file (see [`create_target_directory`]).
    pub open_target_directory: bool,
    /// The identity whose access is checked against the model ACLs; `None` skips the check (a kernel-mode create
    /// without `IO_FORCE_ACCESS_CHECK`).
    pub check_access_for: Option<AccessIdentity>,
}

/// What a successful create opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// The new open.
    pub open: OpenId,
    /// The stream it opened (shared by every open of that stream).
    pub stream: StreamId,
    /// `IoStatus.Information`: `FILE_OPENED`, `FILE_CREATED`, `FILE_OVERWRITTEN` or `FILE_SUPERSEDED`; for
    /// `SL_OPEN_TARGET_DIRECTORY`, `FILE_EXISTS` or `FILE_DOES_NOT_EXIST`.
    pub information: usize,
    /// Whether it is a directory.
    pub directory: bool,
    /// The file's 64-bit file ID (shared by every stream and link of the file).
    pub file_id: u64,
}

/// A create that met a reparse point: the I/O manager reissues it with this name (`STATUS_REPARSE`, with the tag
/// in `IoStatus.Information`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reparse {
    /// `IO_REPARSE_TAG_SYMLINK` or `IO_REPARSE_TAG_MOUNT_POINT`.
    pub tag: u32,
    /// The volume the new name is on: the device name of this volume, or a mount point's target volume name.
    pub volume_name: String,
    /// The substituted path within that volume, with the not-yet-parsed rest of the original name appended.
    pub path: String,
}

/// The outcome of [`create_ex`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The file was opened.
    Opened(Created),
    /// The name crossed a reparse point; reissue the create with the substituted name.
    Reparse(Reparse),
}

/// `FILE_STANDARD_INFORMATION` of an open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StandardInformation {
    /// Bytes allocated: the end of file rounded up to [`CLUSTER_SIZE`].
    pub allocation_size: u64,
    /// The stream's size (0 for directories).
    pub end_of_file: u64,
    /// Links that are not delete-pending.
    pub number_of_links: u32,
    /// Whether the link (or named stream) the open came through is delete-pending.
    pub delete_pending: bool,
    /// Whether the file is a directory.
    pub directory: bool,
}

/// `FILE_BASIC_INFORMATION`: times in 100-ns intervals since 1601 (UTC) and attributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BasicInformation {
    /// When the file was created.
    pub creation_time: i64,
    /// When it was last read or written.
    pub last_access_time: i64,
    /// When its data was last written.
    pub last_write_time: i64,
    /// When its data or metadata last changed.
    pub change_time: i64,
    /// `FILE_ATTRIBUTE_*`; `FILE_ATTRIBUTE_NORMAL` when no other is set.
    pub file_attributes: u32,
}

/// One open of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpenId(pub u64);

/// One stream of one file on one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

/// Open and stream identifiers, unique across every volume.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

#[derive(Clone, Copy, Debug)]
struct Times {
    creation: i64,
    access: i64,
    write: i64,
    change: i64,
}

impl Times {
    fn all(at: i64) -> Self {
        Self { creation: at, access: at, write: at, change: at }
    }
}

#[derive(Debug)]
struct NamedStream {
    id: StreamId,
    data: Vec<u8>,
    delete_pending: bool,
}

#[derive(Debug)]
struct Node {
    directory: bool,
    /// Link IDs; the first gives the host path. Empty only for the root.
    links: Vec<u64>,
    /// Link IDs of a directory's entries.
    children: BTreeSet<u64>,
    /// Stored attributes, without `DIRECTORY` and `REPARSE_POINT` (derived).
    attributes: u32,
    times: Times,
    acl: Option<Acl>,
    reparse: Option<ReparseTarget>,
    stream: StreamId,
    /// Named data streams by name as created.
    streams: BTreeMap<String, NamedStream>,
}

#[derive(Clone, Debug)]
struct Link {
    parent: u64,
    node: u64,
    name: String,
    /// The 8.3 name, when the long name is not already one.
    short: Option<String>,
    delete_pending: bool,
}

/// The model state of one volume.
#[derive(Debug)]
struct Vol {
    host_root: PathBuf,
    device_name: String,
    next_index: u64,
    next_link: u64,
    nodes: BTreeMap<u64, Node>,
    links: BTreeMap<u64, Link>,
}

#[derive(Clone, Debug)]
struct Open {
    root: PathBuf,
    node: u64,
    /// The link it was opened through (`None` for the root directory).
    link: Option<u64>,
    /// The named stream's name as stored, or `None` for the default stream or a directory.
    stream_name: Option<String>,
    stream: StreamId,
    access: u32,
    share: u32,
    cleaned_up: bool,
    delete_on_close: bool,
    /// The last name computed, for an open whose links vanished from the host.
    name: String,
}

#[derive(Default)]
struct State {
    volumes: BTreeMap<PathBuf, Vol>,
    opens: BTreeMap<OpenId, Open>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f` on the state. Every operation holds the lock throughout, host I/O included, so each is atomic (a
/// write to end of file appends atomically, a rename never interleaves with a lookup).
fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    f(state().get_or_insert_with(State::default))
}

fn io_error(_: std::io::Error) -> NTSTATUS {
    STATUS_UNEXPECTED_IO_ERROR
}

fn now() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_nanos() / 100).unwrap_or(i64::MAX).saturating_add(FILETIME_UNIX_EPOCH)
}

fn filetime(time: std::io::Result<SystemTime>) -> i64 {
    time.ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_nanos() / 100).ok())
        .map_or_else(now, |t| t.saturating_add(FILETIME_UNIX_EPOCH))
}

impl Vol {
    fn new(volume: &Volume) -> Self {
        let root = Node {
            directory: true,
            links: Vec::new(),
            children: BTreeSet::new(),
            attributes: 0,
            times: Times::all(now()),
            acl: None,
            reparse: None,
            stream: StreamId(next_id()),
            streams: BTreeMap::new(),
        };
        Self {
            host_root: volume.spec.root.clone(),
            device_name: volume.device_name.clone(),
            next_index: 64,
            next_link: 1,
            nodes: BTreeMap::from([(ROOT_FILE_ID, root)]),
            links: BTreeMap::new(),
        }
    }

    fn node(&self, id: u64) -> Result<&Node, NTSTATUS> {
        self.nodes.get(&id).ok_or(STATUS_FILE_DELETED)
    }

    fn node_mut(&mut self, id: u64) -> Result<&mut Node, NTSTATUS> {
        self.nodes.get_mut(&id).ok_or(STATUS_FILE_DELETED)
    }

    /// The host path of a node, through its first link.
    fn host_path(&self, node: u64) -> Option<PathBuf> {
        let mut parts = Vec::new();
        let mut current = node;
        while current != ROOT_FILE_ID {
            let link = self.links.get(self.nodes.get(&current)?.links.first()?)?;
            parts.push(link.name.as_str());
            current = link.parent;
            if parts.len() > 4096 {
                return None;
            }
        }
        let mut path = self.host_root.clone();
        path.extend(parts.iter().rev());
        Some(path)
    }

    fn link_host_path(&self, link: u64) -> Option<PathBuf> {
        let link = self.links.get(&link)?;
        Some(self.host_path(link.parent)?.join(&link.name))
    }

    /// The volume-relative path of a node (`\` for the root), by long names.
    fn path(&self, node: u64) -> String {
        match self.nodes.get(&node).and_then(|n| n.links.first()) {
            Some(link) => self.link_path(*link),
            None => "\\".to_owned(),
        }
    }

    fn link_path(&self, link: u64) -> String {
        let Some(l) = self.links.get(&link) else { return String::new() };
        let parent = if l.parent == ROOT_FILE_ID { String::new() } else { self.path(l.parent) };
        format!("{parent}\\{}", l.name)
    }

    fn new_node(&mut self, directory: bool, attributes: u32, times: Times, acl: Option<Acl>) -> u64 {
        let id = (1u64 << 48) | self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        self.nodes.insert(
            id,
            Node {
                directory,
                links: Vec::new(),
                children: BTreeSet::new(),
                attributes,
                times,
                acl,
                reparse: None,
                stream: StreamId(next_id()),
                streams: BTreeMap::new(),
            },
        );
        id
    }

    /// A short name for `name` in `dir` that collides with no entry's long or short name there.
    fn short_for(&self, dir: u64, name: &str, except: Option<u64>) -> Option<String> {
        if names::is_8dot3(name) {
            return None;
        }
        let entries: Vec<&Link> = self
            .nodes
            .get(&dir)
            .map(|d| d.children.iter().filter(|l| Some(**l) != except).filter_map(|l| self.links.get(l)).collect())
            .unwrap_or_default();
        Some(names::generate_short(name, |candidate| {
            entries
                .iter()
                .any(|l| names::same(&l.name, candidate, false) || l.short.as_deref().is_some_and(|s| s == candidate))
        }))
    }

    fn add_link(&mut self, dir: u64, node: u64, name: &str) -> u64 {
        let short = self.short_for(dir, name, None);
        let id = self.next_link;
        self.next_link = self.next_link.saturating_add(1);
        self.links.insert(id, Link { parent: dir, node, name: name.to_owned(), short, delete_pending: false });
        if let Some(d) = self.nodes.get_mut(&dir) {
            d.children.insert(id);
        }
        if let Some(n) = self.nodes.get_mut(&node) {
            n.links.push(id);
        }
        id
    }

    /// Removes a link from the namespace (not from the host); the node goes with its last link.
    fn forget_link(&mut self, link: u64) {
        let Some(l) = self.links.remove(&link) else { return };
        if let Some(d) = self.nodes.get_mut(&l.parent) {
            d.children.remove(&link);
        }
        let orphan = self.nodes.get_mut(&l.node).is_some_and(|n| {
            n.links.retain(|x| *x != link);
            n.links.is_empty()
        });
        if orphan {
            let children: Vec<u64> =
                self.nodes.get(&l.node).map(|n| n.children.iter().copied().collect()).unwrap_or_default();
            for child in children {
                self.forget_link(child);
            }
            self.nodes.remove(&l.node);
        }
    }

    /// Brings a directory's entries in line with its host directory: adopts new host entries (in name order, so
    /// their short names are deterministic) and forgets vanished ones.
    fn sync(&mut self, dir: u64) {
        let Some(host) = self.host_path(dir) else { return };
        let Ok(entries) = fs::read_dir(&host) else { return };
        let mut found: Vec<(String, bool)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| Some((e.file_name().into_string().ok()?, e.file_type().ok()?.is_dir())))
            .filter(|(name, _)| names::check_component(name).is_ok())
            .collect();
        found.sort();
        let present: BTreeSet<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        let children: Vec<u64> = self.nodes.get(&dir).map(|d| d.children.iter().copied().collect()).unwrap_or_default();
        let mut known = BTreeSet::new();
        for link in children {
            match self.links.get(&link) {
                Some(l) if present.contains(l.name.as_str()) => {
                    known.insert(l.name.clone());
                }
                _ => self.forget_link(link),
            }
        }
        let acl = self.nodes.get(&dir).and_then(|d| d.acl.clone());
        for (name, directory) in found {
            if known.contains(&name) {
                continue;
            }
            let meta = fs::metadata(host.join(&name)).ok();
            let write =
                filetime(meta.as_ref().map_or_else(|| Err(std::io::Error::other("gone")), fs::Metadata::modified));
            let times = Times { creation: write, access: write, write, change: write };
            let attributes = if directory { 0 } else { FILE_ATTRIBUTE_ARCHIVE };
            let node = self.new_node(directory, attributes, times, acl.clone());
            self.add_link(dir, node, &name);
        }
    }

    /// Finds `name` among `dir`'s entries: the exact long name first, then (unless case-sensitive) the upcased
    /// long name, then the short name.
    fn lookup(&self, dir: u64, name: &str, case_sensitive: bool) -> Option<u64> {
        let children = &self.nodes.get(&dir)?.children;
        let entries = || children.iter().filter_map(|id| self.links.get(id).map(|l| (*id, l)));
        entries()
            .find(|(_, l)| l.name == name)
            .or_else(|| entries().find(|(_, l)| names::same(&l.name, name, case_sensitive)))
            .or_else(|| {
                entries().find(|(_, l)| l.short.as_deref().is_some_and(|s| names::same(s, name, case_sensitive)))
            })
            .map(|(id, _)| id)
    }

    fn parent_acl(&self, link: Option<u64>) -> Option<&Acl> {
        let parent = self.links.get(&link?)?.parent;
        self.nodes.get(&parent)?.acl.as_ref()
    }

    fn subtree_contains(&self, ancestor: u64, mut node: u64) -> bool {
        for _ in 0..4096 {
            if node == ancestor {
                return true;
            }
            let Some(parent) = self.nodes.get(&node).and_then(|n| n.links.first()).and_then(|l| self.links.get(l))
            else {
                return false;
            };
            node = parent.parent;
        }
        false
    }
}

fn effective_attributes(node: &Node) -> u32 {
    let mut attributes = node.attributes;
    if node.directory {
        attributes |= FILE_ATTRIBUTE_DIRECTORY;
    }
    if node.reparse.is_some() {
        attributes |= FILE_ATTRIBUTE_REPARSE_POINT;
    }
    if attributes == 0 { FILE_ATTRIBUTE_NORMAL } else { attributes }
}

impl State {
    fn vol(&mut self, volume: &Volume) -> &mut Vol {
        self.volumes.entry(volume.spec.root.clone()).or_insert_with(|| Vol::new(volume))
    }

    fn live(&self, open: OpenId) -> Result<&Open, NTSTATUS> {
        let o = self.opens.get(&open).ok_or(STATUS_INVALID_PARAMETER)?;
        if o.cleaned_up { Err(STATUS_FILE_CLOSED) } else { Ok(o) }
    }

    fn live_with_vol(&mut self, open: OpenId) -> Result<(Open, &mut Vol), NTSTATUS> {
        let o = self.live(open)?.clone();
        let vol = self.volumes.get_mut(&o.root).ok_or(STATUS_INVALID_PARAMETER)?;
        Ok((o, vol))
    }

    /// Whether any handle (not yet cleaned up) is open on `node` of the volume at `root`.
    fn node_open(&self, root: &Path, node: u64) -> bool {
        self.opens.values().any(|o| !o.cleaned_up && o.root == root && o.node == node)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Access

const SHARE_RIGHTS: u32 = FILE_READ_DATA | FILE_EXECUTE | FILE_WRITE_DATA | FILE_APPEND_DATA | DELETE;
const READ_RIGHTS: u32 = FILE_READ_DATA | FILE_EXECUTE;
const WRITE_RIGHTS: u32 = FILE_WRITE_DATA | FILE_APPEND_DATA;
const READ_CLASS: u32 = FILE_READ_DATA | FILE_READ_EA | FILE_EXECUTE | READ_CONTROL | FILE_READ_ATTRIBUTES;
const WRITE_CLASS: u32 = FILE_WRITE_DATA
    | FILE_APPEND_DATA
    | FILE_WRITE_EA
    | FILE_WRITE_ATTRIBUTES
    | DELETE
    | WRITE_DAC
    | WRITE_OWNER
    | FILE_DELETE_CHILD;

/// Maps generic rights to file rights as the I/O manager's generic mapping for files does
/// (<https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-ntcreatefile>).
fn map_generic(access: u32) -> u32 {
    let mut mapped = access & !(GENERIC_READ | GENERIC_WRITE | GENERIC_EXECUTE | GENERIC_ALL);
    for (generic, specific) in [
        (GENERIC_READ, FILE_GENERIC_READ),
        (GENERIC_WRITE, FILE_GENERIC_WRITE),
        (GENERIC_EXECUTE, FILE_GENERIC_EXECUTE),
        (GENERIC_ALL, FILE_ALL_ACCESS),
    ] {
        if access & generic != 0 {
            mapped |= specific;
        }
    }
    mapped
}

fn principal_matches(principal: &str, who: &AccessIdentity) -> bool {
    if principal.eq_ignore_ascii_case(ADMINISTRATORS) { who.admin } else { names::same(principal, &who.user, false) }
}

fn acl_grants(acl: Option<&Acl>, who: &AccessIdentity, write: bool) -> bool {
    acl.is_none_or(|acl| {
        let list = if write { &acl.write } else { &acl.read };
        list.iter().any(|p| principal_matches(p, who))
    })
}

/// The rights `who` holds on a file with `acl` in a directory with `parent_acl` (everything when `who` is
/// `None`).
fn available(acl: Option<&Acl>, parent_acl: Option<&Acl>, who: Option<&AccessIdentity>) -> u32 {
    let Some(who) = who else { return FILE_ALL_ACCESS | ACCESS_SYSTEM_SECURITY };
    let mut rights = SYNCHRONIZE;
    if acl_grants(acl, who, false) {
        rights |= READ_CLASS;
    }
    if acl_grants(acl, who, true) {
        rights |= WRITE_CLASS;
    }
    if acl_grants(parent_acl, who, false) {
        rights |= FILE_READ_ATTRIBUTES;
    }
    if acl_grants(parent_acl, who, true) {
        rights |= DELETE;
    }
    if who.admin {
        rights |= ACCESS_SYSTEM_SECURITY;
    }
    rights
}

/// The granted access for `desired` when `available` may be granted: `STATUS_ACCESS_DENIED` when an explicitly
/// asked right is missing; `MAXIMUM_ALLOWED` adds every available right (MS-FSA 2.1.5.1.2.1,
/// <https://learn.microsoft.com/openspecs/windows_protocols/ms-fsa/82b364ce-6d7b-422f-8d88-4db32eea809a>).
fn grant(desired: u32, available: u32) -> Result<u32, NTSTATUS> {
    let mapped = map_generic(desired);
    let explicit = mapped & !MAXIMUM_ALLOWED;
    if explicit & !available != 0 {
        return Err(STATUS_ACCESS_DENIED);
    }
    Ok(if mapped & MAXIMUM_ALLOWED != 0 { explicit | (available & FILE_ALL_ACCESS) } else { explicit })
}

/// `IoCheckShareAccess` as MS-FSA 2.1.5.1.2.2 states it: only opens whose access includes read, execute, write,
/// append or delete take part, on either side, and only opens of the same stream that are not cleaned up
/// (<https://learn.microsoft.com/openspecs/windows_protocols/ms-fsa/8c0e3f4f-0729-49f4-a14d-7f7add593819>,
/// <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-iocheckshareaccess>).
fn share_conflict(opens: &BTreeMap<OpenId, Open>, stream: StreamId, access: u32, share: u32) -> bool {
    if access & SHARE_RIGHTS == 0 {
        return false;
    }
    let wants = |mask: u32| access & mask != 0;
    opens.values().filter(|o| o.stream == stream && !o.cleaned_up && o.access & SHARE_RIGHTS != 0).any(|o| {
        let has = |mask: u32| o.access & mask != 0;
        (wants(READ_RIGHTS) && o.share & FILE_SHARE_READ == 0)
            || (wants(WRITE_RIGHTS) && o.share & FILE_SHARE_WRITE == 0)
            || (wants(DELETE) && o.share & FILE_SHARE_DELETE == 0)
            || (has(READ_RIGHTS) && share & FILE_SHARE_READ == 0)
            || (has(WRITE_RIGHTS) && share & FILE_SHARE_WRITE == 0)
            || (has(DELETE) && share & FILE_SHARE_DELETE == 0)
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Create

/// The parameter checks `IoCreateFile` and the file system make before looking at names
/// (<https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-ntcreatefile>): a known disposition;
/// not both `FILE_DIRECTORY_FILE` and `FILE_NON_DIRECTORY_FILE`; `FILE_DIRECTORY_FILE` only with `FILE_CREATE`,
/// `FILE_OPEN` or `FILE_OPEN_IF`; `FILE_DELETE_ON_CLOSE` only with `DELETE` access.
fn check_params(p: &CreateParams) -> Result<(), NTSTATUS> {
    let directory = p.options & FILE_DIRECTORY_FILE != 0;
    let invalid = p.disposition > FILE_OVERWRITE_IF
        || (directory && p.options & FILE_NON_DIRECTORY_FILE != 0)
        || (directory && !matches!(p.disposition, FILE_CREATE | FILE_OPEN | FILE_OPEN_IF))
        || (p.options & FILE_DELETE_ON_CLOSE != 0 && map_generic(p.desired_access) & (DELETE | MAXIMUM_ALLOWED) == 0);
    if invalid { Err(STATUS_INVALID_PARAMETER) } else { Ok(()) }
}

/// Joins `rel` (a symbolic link's target) to the directory components `base`, resolving `.` and `..` (clamped at
/// the root).
fn resolve_relative(base: &[String], rel: &str) -> String {
    let mut parts: Vec<&str> =
        if rel.starts_with('\\') { Vec::new() } else { base.iter().map(String::as_str).collect() };
    for part in rel.split('\\').filter(|p| !p.is_empty()) {
        match part {
            "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("\\{}", parts.join("\\"))
}

/// The name still to parse after the component at `index`, as the caller spelled it: the components after it
/// (joined with `\`) and the suffix of the last one (stream and trailing backslash).
fn remaining(parsed: &ParsedPath, index: usize) -> (String, String) {
    let rest = parsed.components.get(index.saturating_add(1)..).unwrap_or_default().join("\\");
    let mut suffix = match &parsed.stream {
        StreamSpec::Unnamed => String::new(),
        StreamSpec::DefaultData => "::$DATA".to_owned(),
        StreamSpec::Named(s) => format!(":{s}"),
    };
    if parsed.trailing_backslash {
        suffix.push('\\');
    }
    (rest, suffix)
}

/// The name a create reparses to at a reparse point reached through `parsed.components[..=index]`.
fn reparse_at(vol: &Vol, target: &ReparseTarget, parsed: &ParsedPath, index: usize) -> Reparse {
    let (rest, suffix) = remaining(parsed, index);
    let join = |base: String| {
        let mut path = base;
        if !rest.is_empty() {
            if !path.ends_with('\\') {
                path.push('\\');
            }
            path.push_str(&rest);
        }
        path.push_str(&suffix);
        path
    };
    let (volume_name, path) = match target {
        ReparseTarget::SymbolicLink(to) => {
            (vol.device_name.clone(), join(resolve_relative(parsed.components.get(..index).unwrap_or_default(), to)))
        }
        ReparseTarget::Junction(to) => (vol.device_name.clone(), join(resolve_relative(&[], to))),
        ReparseTarget::MountPoint(volume) => (volume.clone(), join("\\".to_owned())),
    };
    Reparse { tag: target.tag(), volume_name, path }
}

/// Where walking the directories of a path ended.
enum Walked {
    /// The parent directory of the last component.
    Parent(u64),
    /// A reparse point on the way.
    Reparse(Reparse),
}

/// Walks `parsed`'s directory components from the root (MS-FSA 2.1.5.1): a missing or non-directory component is
/// `STATUS_OBJECT_PATH_NOT_FOUND`, a delete-pending one `STATUS_DELETE_PENDING`, and a reparse point reparses
/// (`FILE_OPEN_REPARSE_POINT` applies to the last component only).
fn walk(vol: &mut Vol, parsed: &ParsedPath, case_sensitive: bool) -> Result<Walked, NTSTATUS> {
    let mut dir = ROOT_FILE_ID;
    let directories = parsed.components.len().saturating_sub(1);
    for (index, part) in parsed.components.iter().take(directories).enumerate() {
        vol.sync(dir);
        let link = vol.lookup(dir, part, case_sensitive).ok_or(STATUS_OBJECT_PATH_NOT_FOUND)?;
        let (node, pending) =
            vol.links.get(&link).map(|l| (l.node, l.delete_pending)).ok_or(STATUS_OBJECT_PATH_NOT_FOUND)?;
        if pending {
            return Err(STATUS_DELETE_PENDING);
        }
        let n = vol.node(node)?;
        if let Some(target) = &n.reparse {
            return Ok(Walked::Reparse(reparse_at(vol, target, parsed, index)));
        }
        if !n.directory {
            return Err(STATUS_OBJECT_PATH_NOT_FOUND);
        }
        dir = node;
    }
    vol.sync(dir);
    Ok(Walked::Parent(dir))
}

/// What a create asks of an existing file or stream.
struct Target {
    node: u64,
    link: Option<u64>,
    stream_name: Option<String>,
    information: u32,
}

fn register(
    s: &mut State,
    volume: &Volume,
    target: &Target,
    access: u32,
    p: &CreateParams,
) -> Result<Created, NTSTATUS> {
    let vol = s.volumes.get(&volume.spec.root).ok_or(STATUS_INVALID_PARAMETER)?;
    let node = vol.node(target.node)?;
    let stream = match &target.stream_name {
        Some(name) => node.streams.get(name).map(|st| st.id).ok_or(STATUS_OBJECT_NAME_NOT_FOUND)?,
        None => node.stream,
    };
    let mut name = target.link.map_or_else(|| "\\".to_owned(), |l| vol.link_path(l));
    if let Some(stream_name) = &target.stream_name {
        name = format!("{name}:{stream_name}");
    }
    let directory = node.directory && target.stream_name.is_none();
    let open = OpenId(next_id());
    s.opens.insert(
        open,
        Open {
            root: volume.spec.root.clone(),
            node: target.node,
            link: target.link,
            stream_name: target.stream_name.clone(),
            stream,
            access,
            share: p.share_access,
            cleaned_up: false,
            delete_on_close: p.options & FILE_DELETE_ON_CLOSE != 0,
            name,
        },
    );
    Ok(Created { open, stream, information: target.information as usize, directory, file_id: target.node })
}

/// Opens an existing file, directory or stream: access, read-only and sharing checks (MS-FSA 2.1.5.1.2,
/// <https://learn.microsoft.com/openspecs/windows_protocols/ms-fsa/41f3734a-5bba-4c3b-9d04-7baafc9b7bfe>), then
/// the overwrite or supersede.
fn open_existing(s: &mut State, volume: &Volume, target: &Target, p: &CreateParams) -> Result<Created, NTSTATUS> {
    let who = p.check_access_for.as_ref();
    let vol = s.volumes.get_mut(&volume.spec.root).ok_or(STATUS_INVALID_PARAMETER)?;
    vol.sync(target.node);
    let node = vol.node(target.node)?;
    let data_file = !node.directory || target.stream_name.is_some();
    let readonly = node.attributes & FILE_ATTRIBUTE_READONLY != 0;
    let rights = available(node.acl.as_ref(), vol.parent_acl(target.link), who);
    let mut access = grant(p.desired_access, rights)?;
    let replacing = matches!(target.information, FILE_OVERWRITTEN | FILE_SUPERSEDED);
    if readonly {
        if map_generic(p.desired_access) & MAXIMUM_ALLOWED != 0 {
            access &= !(FILE_WRITE_DATA | FILE_APPEND_DATA | FILE_ADD_SUBDIRECTORY | FILE_DELETE_CHILD);
        }
        if data_file && (access & WRITE_RIGHTS != 0 || replacing) {
            return Err(STATUS_ACCESS_DENIED);
        }
        if p.options & FILE_DELETE_ON_CLOSE != 0 {
            return Err(STATUS_CANNOT_DELETE);
        }
    }
    if target.link.is_none() && p.options & FILE_DELETE_ON_CLOSE != 0 {
        return Err(STATUS_CANNOT_DELETE);
    }
    if replacing {
        // Overwriting needs the rights to write data, EAs and attributes; superseding also needs DELETE.
        let mut implied = FILE_WRITE_DATA | FILE_WRITE_EA | FILE_WRITE_ATTRIBUTES;
        if target.information == FILE_SUPERSEDED {
            implied |= DELETE;
        }
        if implied & !rights != 0 {
            return Err(STATUS_ACCESS_DENIED);
        }
        // CreateFile: overwriting a hidden or system file without asking for those attributes is refused
        // (https://learn.microsoft.com/windows/win32/api/fileapi/nf-fileapi-createfilew, CREATE_ALWAYS).
        let kept = node.attributes & (FILE_ATTRIBUTE_HIDDEN | FILE_ATTRIBUTE_SYSTEM);
        if target.stream_name.is_none() && kept & !p.file_attributes != 0 {
            return Err(STATUS_ACCESS_DENIED);
        }
    }
    if node.directory
        && target.stream_name.is_none()
        && p.options & FILE_DELETE_ON_CLOSE != 0
        && !node.children.is_empty()
    {
        return Err(STATUS_DIRECTORY_NOT_EMPTY);
    }
    let stream = match &target.stream_name {
        Some(name) => node.streams.get(name).map(|st| st.id).ok_or(STATUS_OBJECT_NAME_NOT_FOUND)?,
        None => node.stream,
    };
    if share_conflict(&s.opens, stream, access, p.share_access) {
        return Err(STATUS_SHARING_VIOLATION);
    }
    if replacing {
        let vol = s.volumes.get_mut(&volume.spec.root).ok_or(STATUS_INVALID_PARAMETER)?;
        let host = vol.host_path(target.node);
        let node = vol.node_mut(target.node)?;
        let at = now();
        node.times.write = at;
        node.times.change = at;
        if let Some(name) = &target.stream_name {
            if let Some(st) = node.streams.get_mut(name) {
                st.data.clear();
            }
        } else {
            let requested = p.file_attributes & FILE_ATTRIBUTE_VALID_SET_FLAGS & !FILE_ATTRIBUTE_NORMAL;
            node.attributes = if target.information == FILE_SUPERSEDED {
                requested | FILE_ATTRIBUTE_ARCHIVE
            } else {
                node.attributes | requested | FILE_ATTRIBUTE_ARCHIVE
            };
            let host = host.ok_or(STATUS_FILE_DELETED)?;
            OpenOptions::new().write(true).open(host).and_then(|f| f.set_len(0)).map_err(io_error)?;
        }
    }
    register(s, volume, target, access, p)
}

/// Creates a new file or directory named `name` in `dir` (MS-FSA 2.1.5.1.1): the caller needs write access to the
/// directory; the new file inherits its ACL, gets `FILE_ATTRIBUTE_ARCHIVE` and the access it asked for.
fn create_new(
    s: &mut State,
    volume: &Volume,
    dir: u64,
    name: &str,
    parsed: &ParsedPath,
    p: &CreateParams,
) -> Result<Created, NTSTATUS> {
    let directory = p.options & FILE_DIRECTORY_FILE != 0;
    if parsed.trailing_backslash && !directory {
        return Err(STATUS_OBJECT_NAME_INVALID);
    }
    if directory && parsed.stream != StreamSpec::Unnamed {
        return Err(STATUS_NOT_A_DIRECTORY);
    }
    let vol = s.volumes.get_mut(&volume.spec.root).ok_or(STATUS_INVALID_PARAMETER)?;
    let parent = vol.node(dir)?;
    if let Some(who) = &p.check_access_for
        && !acl_grants(parent.acl.as_ref(), who, true)
    {
        return Err(STATUS_ACCESS_DENIED);
    }
    let access = grant(p.desired_access, FILE_ALL_ACCESS | ACCESS_SYSTEM_SECURITY)?;
    let acl = parent.acl.clone();
    let host = vol.host_path(dir).ok_or(STATUS_OBJECT_PATH_NOT_FOUND)?.join(name);
    if directory {
        fs::create_dir(&host).map_err(io_error)?;
    } else {
        drop(File::create(&host).map_err(io_error)?);
    }
    let requested = p.file_attributes & FILE_ATTRIBUTE_VALID_SET_FLAGS & !FILE_ATTRIBUTE_NORMAL;
    let attributes = if directory { requested & !FILE_ATTRIBUTE_TEMPORARY } else { requested | FILE_ATTRIBUTE_ARCHIVE };
    let node = vol.new_node(directory, attributes, Times::all(now()), acl);
    let link = vol.add_link(dir, node, name);
    let stream_name = match &parsed.stream {
        StreamSpec::Named(stream) => {
            vol.node_mut(node)?.streams.insert(
                stream.clone(),
                NamedStream { id: StreamId(next_id()), data: Vec::new(), delete_pending: false },
            );
            Some(stream.clone())
        }
        _ => None,
    };
    register(s, volume, &Target { node, link: Some(link), stream_name, information: FILE_CREATED }, access, p)
}

/// The disposition's outcome on an existing stream: `FILE_OPENED`, `FILE_OVERWRITTEN` or `FILE_SUPERSEDED`.
fn existing_information(disposition: u32) -> Result<u32, NTSTATUS> {
    match disposition {
        FILE_CREATE => Err(STATUS_OBJECT_NAME_COLLISION),
        FILE_OPEN | FILE_OPEN_IF => Ok(FILE_OPENED),
        FILE_OVERWRITE | FILE_OVERWRITE_IF => Ok(FILE_OVERWRITTEN),
        FILE_SUPERSEDE => Ok(FILE_SUPERSEDED),
        _ => Err(STATUS_INVALID_PARAMETER),
    }
}

/// Opens an existing link of `dir` named by the last component: a named stream of it, the file or the directory.
fn open_link(
    s: &mut State,
    volume: &Volume,
    link: u64,
    parsed: &ParsedPath,
    p: &CreateParams,
) -> Result<CreateOutcome, NTSTATUS> {
    let vol = s.volumes.get_mut(&volume.spec.root).ok_or(STATUS_INVALID_PARAMETER)?;
    let l = vol.links.get(&link).ok_or(STATUS_OBJECT_NAME_NOT_FOUND)?.clone();
    if l.delete_pending {
        return Err(STATUS_DELETE_PENDING);
    }
    let node = vol.node(l.node)?;
    let last = parsed.components.len().saturating_sub(1);
    let reparse = |vol: &Vol, node: &Node| {
        node.reparse
            .as_ref()
            .filter(|_| p.options & FILE_OPEN_REPARSE_POINT == 0)
            .map(|target| CreateOutcome::Reparse(reparse_at(vol, target, parsed, last)))
    };
    let target = match &parsed.stream {
        StreamSpec::Named(stream) => {
            if let Some(outcome) = reparse(vol, node) {
                return Ok(outcome);
            }
            if p.options & FILE_DIRECTORY_FILE != 0 {
                return Err(STATUS_NOT_A_DIRECTORY);
            }
            let existing = node.streams.keys().find(|k| names::same(k, stream, p.case_sensitive)).cloned();
            match existing {
                Some(name) => Target {
                    node: l.node,
                    link: Some(link),
                    stream_name: Some(name),
                    information: existing_information(p.disposition)?,
                },
                None if matches!(p.disposition, FILE_OPEN | FILE_OVERWRITE) => {
                    return Err(STATUS_OBJECT_NAME_NOT_FOUND);
                }
                None => {
                    // Adding a stream writes the file: with an identity, it needs write access to it.
                    if let Some(who) = &p.check_access_for
                        && !acl_grants(node.acl.as_ref(), who, true)
                    {
                        return Err(STATUS_ACCESS_DENIED);
                    }
                    let access = grant(p.desired_access, FILE_ALL_ACCESS | ACCESS_SYSTEM_SECURITY)?;
                    if node.attributes & FILE_ATTRIBUTE_READONLY != 0 {
                        return Err(STATUS_ACCESS_DENIED);
                    }
                    let id = StreamId(next_id());
                    vol.node_mut(l.node)?
                        .streams
                        .insert(stream.clone(), NamedStream { id, data: Vec::new(), delete_pending: false });
                    let target = Target {
                        node: l.node,
                        link: Some(link),
                        stream_name: Some(stream.clone()),
                        information: FILE_CREATED,
                    };
                    return register(s, volume, &target, access, p).map(CreateOutcome::Opened);
                }
            }
        }
        spec => {
            let information = existing_information(p.disposition)?;
            if let Some(outcome) = reparse(vol, node) {
                return Ok(outcome);
            }
            if node.directory {
                // A directory has no default data stream to open, overwrite or supersede (stricter than
                // documented for the overwrite case, where NTFS's exact status is not).
                if *spec == StreamSpec::DefaultData
                    || p.options & FILE_NON_DIRECTORY_FILE != 0
                    || information != FILE_OPENED
                {
                    return Err(STATUS_FILE_IS_A_DIRECTORY);
                }
            } else if p.options & FILE_DIRECTORY_FILE != 0 {
                return Err(STATUS_NOT_A_DIRECTORY);
            } else if parsed.trailing_backslash {
                return Err(STATUS_OBJECT_NAME_INVALID);
            }
            Target { node: l.node, link: Some(link), stream_name: None, information }
        }
    };
    open_existing(s, volume, &target, p).map(CreateOutcome::Opened)
}

fn create_locked(s: &mut State, volume: &Volume, path: &str, p: &CreateParams) -> Result<CreateOutcome, NTSTATUS> {
    check_params(p)?;
    let parsed = names::parse(path)?;
    let vol = s.vol(volume);
    if parsed.components.is_empty() {
        if p.open_target_directory {
            return Err(STATUS_OBJECT_NAME_INVALID);
        }
        // The root directory: it exists, cannot be replaced and has no parent.
        if p.options & FILE_NON_DIRECTORY_FILE != 0 {
            return Err(STATUS_FILE_IS_A_DIRECTORY);
        }
        let information = existing_information(p.disposition)?;
        if information != FILE_OPENED {
            return Err(STATUS_FILE_IS_A_DIRECTORY);
        }
        let target = Target { node: ROOT_FILE_ID, link: None, stream_name: None, information };
        return open_existing(s, volume, &target, p).map(CreateOutcome::Opened);
    }
    let dir = match walk(vol, &parsed, p.case_sensitive)? {
        Walked::Parent(dir) => dir,
        Walked::Reparse(reparse) => return Ok(CreateOutcome::Reparse(reparse)),
    };
    let name = parsed.components.last().map(String::as_str).unwrap_or_default();
    let existing = vol.lookup(dir, name, p.case_sensitive);
    if p.open_target_directory {
        let link = vol.nodes.get(&dir).and_then(|n| n.links.first().copied());
        let information = if existing.is_some() { FILE_EXISTS } else { FILE_DOES_NOT_EXIST };
        let open_dir = CreateParams {
            disposition: FILE_OPEN,
            options: (p.options | FILE_DIRECTORY_FILE) & !(FILE_NON_DIRECTORY_FILE | FILE_DELETE_ON_CLOSE),
            ..p.clone()
        };
        let target = Target { node: dir, link, stream_name: None, information };
        return open_existing(s, volume, &target, &open_dir).map(CreateOutcome::Opened);
    }
    match existing {
        Some(link) => open_link(s, volume, link, &parsed, p),
        None if matches!(p.disposition, FILE_OPEN | FILE_OVERWRITE) => Err(STATUS_OBJECT_NAME_NOT_FOUND),
        None => create_new(s, volume, dir, name, &parsed, p).map(CreateOutcome::Opened),
    }
}

/// Opens or creates `path` (within `volume`) as NTFS would, reporting a reparse point as [`CreateOutcome::Reparse`].
///
/// Dispositions and `IoStatus.Information` follow `NtCreateFile`
/// (<https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-ntcreatefile>) and MS-FSA 2.1.5.1.
/// A trailing backslash names a directory: on an existing file, on a new file without `FILE_DIRECTORY_FILE`, or
/// with a stream name it is `STATUS_OBJECT_NAME_INVALID`. `name::$DATA` is the default stream; `name:stream` and
/// `name:stream:$DATA` a named stream, created (with the file when needed) by `FILE_CREATE`, `FILE_OPEN_IF`,
/// `FILE_OVERWRITE_IF` or `FILE_SUPERSEDE`. Reparse points on the way reparse; on the last component only
/// without `FILE_OPEN_REPARSE_POINT`.
///
/// # Errors
/// The NTSTATUS NTFS returns: `STATUS_OBJECT_NAME_INVALID`, `STATUS_OBJECT_NAME_NOT_FOUND`,
/// `STATUS_OBJECT_PATH_NOT_FOUND`, `STATUS_OBJECT_NAME_COLLISION`, `STATUS_FILE_IS_A_DIRECTORY`,
/// `STATUS_NOT_A_DIRECTORY`, `STATUS_DELETE_PENDING`, `STATUS_ACCESS_DENIED`, `STATUS_CANNOT_DELETE`,
/// `STATUS_DIRECTORY_NOT_EMPTY`, `STATUS_SHARING_VIOLATION`, `STATUS_INVALID_PARAMETER`.
pub fn create_ex(volume: &Volume, path: &str, params: &CreateParams) -> Result<CreateOutcome, NTSTATUS> {
    with_state(|s| create_locked(s, volume, path, params))
}

/// Opens or creates `path` (within `volume`) as NTFS would; a reparse point on the way is `STATUS_REPARSE` (use
/// [`create_ex`] for the substituted name).
///
/// # Errors
/// As [`create_ex`], and `STATUS_REPARSE`.
pub fn create(volume: &Volume, path: &str, params: &CreateParams) -> Result<Created, NTSTATUS> {
    match create_ex(volume, path, params)? {
        CreateOutcome::Opened(created) => Ok(created),
        CreateOutcome::Reparse(_) => Err(STATUS_REPARSE),
    }
}

/// `SL_OPEN_TARGET_DIRECTORY`: opens the directory that holds (or would hold) `path`'s last component, with
/// `FILE_EXISTS` or `FILE_DOES_NOT_EXIST` as `IoStatus.Information`
/// (<https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-create>), for the rename or link that
/// follows.
///
/// # Errors
/// As [`create`]; `STATUS_OBJECT_NAME_INVALID` for the root, which has no parent.
pub fn create_target_directory(volume: &Volume, path: &str, params: &CreateParams) -> Result<(Created, u32), NTSTATUS> {
    let params = CreateParams { open_target_directory: true, ..params.clone() };
    let created = create(volume, path, &params)?;
    let information = u32::try_from(created.information).unwrap_or(FILE_DOES_NOT_EXIST);
    Ok((created, information))
}

/// `FILE_OPEN_BY_FILE_ID`: opens the file with ID `file_id` through its first link, reporting a reparse point as
/// [`CreateOutcome::Reparse`] unless `FILE_OPEN_REPARSE_POINT`. Only `FILE_OPEN` is accepted (stricter than
/// documented); an unknown ID is `STATUS_INVALID_PARAMETER`, as NTFS answers it.
///
/// # Errors
/// `STATUS_INVALID_PARAMETER`, `STATUS_DELETE_PENDING` when every link is delete-pending, and the errors of an
/// open of an existing file.
pub fn create_by_file_id_ex(volume: &Volume, file_id: u64, params: &CreateParams) -> Result<CreateOutcome, NTSTATUS> {
    with_state(|s| {
        check_params(params)?;
        if params.disposition != FILE_OPEN || params.open_target_directory {
            return Err(STATUS_INVALID_PARAMETER);
        }
        let vol = s.vol(volume);
        let node = vol.nodes.get(&file_id).ok_or(STATUS_INVALID_PARAMETER)?;
        let link = node.links.iter().copied().find(|l| vol.links.get(l).is_some_and(|l| !l.delete_pending));
        if !node.links.is_empty() && link.is_none() {
            return Err(STATUS_DELETE_PENDING);
        }
        if let Some(target) = node.reparse.as_ref().filter(|_| params.options & FILE_OPEN_REPARSE_POINT == 0) {
            let path = link.map_or_else(|| "\\".to_owned(), |l| vol.link_path(l));
            let parsed = names::parse(&path)?;
            let last = parsed.components.len().saturating_sub(1);
            return Ok(CreateOutcome::Reparse(reparse_at(vol, target, &parsed, last)));
        }
        if node.directory && params.options & FILE_NON_DIRECTORY_FILE != 0 {
            return Err(STATUS_FILE_IS_A_DIRECTORY);
        }
        if !node.directory && params.options & FILE_DIRECTORY_FILE != 0 {
            return Err(STATUS_NOT_A_DIRECTORY);
        }
        let target = Target { node: file_id, link, stream_name: None, information: FILE_OPENED };
        open_existing(s, volume, &target, params).map(CreateOutcome::Opened)
    })
}

/// [`create_by_file_id_ex`], with a reparse point reported as `STATUS_REPARSE`.
///
/// # Errors
/// As [`create_by_file_id_ex`], and `STATUS_REPARSE`.
pub fn create_by_file_id(volume: &Volume, file_id: u64, params: &CreateParams) -> Result<Created, NTSTATUS> {
    match create_by_file_id_ex(volume, file_id, params)? {
        CreateOutcome::Opened(created) => Ok(created),
        CreateOutcome::Reparse(_) => Err(STATUS_REPARSE),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Data

/// Reads up to `length` bytes at `offset`: a short read at the end of file, `STATUS_END_OF_FILE` at or past it.
///
/// # Errors
/// `STATUS_END_OF_FILE`; `STATUS_ACCESS_DENIED` without read access; `STATUS_INVALID_PARAMETER` on a directory
/// (MS-FSA 2.1.5.2); `STATUS_FILE_CLOSED` after cleanup.
pub fn read(open: OpenId, offset: u64, length: usize) -> Result<Vec<u8>, NTSTATUS> {
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        if o.access & READ_RIGHTS == 0 {
            return Err(STATUS_ACCESS_DENIED);
        }
        let node = vol.node(o.node)?;
        if let Some(name) = &o.stream_name {
            let data = &node.streams.get(name).ok_or(STATUS_FILE_DELETED)?.data;
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            if start >= data.len() {
                return Err(STATUS_END_OF_FILE);
            }
            return Ok(data.iter().skip(start).take(length).copied().collect());
        }
        if node.directory {
            return Err(STATUS_INVALID_PARAMETER);
        }
        let mut file = File::open(vol.host_path(o.node).ok_or(STATUS_FILE_DELETED)?).map_err(io_error)?;
        let size = file.metadata().map_err(io_error)?.len();
        if offset >= size {
            return Err(STATUS_END_OF_FILE);
        }
        file.seek(SeekFrom::Start(offset)).map_err(io_error)?;
        let available = usize::try_from(size - offset).unwrap_or(usize::MAX);
        let mut buffer = vec![0; length.min(available)];
        file.read_exact(&mut buffer).map_err(io_error)?;
        Ok(buffer)
    })
}

fn touch_write(node: &mut Node) {
    let at = now();
    node.times.write = at;
    node.times.change = at;
    if !node.directory {
        node.attributes |= FILE_ATTRIBUTE_ARCHIVE;
    }
}

/// Writes `data` at `offset`, or at the end of file when `offset` is `None` (write-to-end-of-file, atomic because
/// the file system holds its state lock across it). Updates the last-write time and sets the archive attribute.
///
/// # Errors
/// `STATUS_ACCESS_DENIED` without write access; `STATUS_INVALID_PARAMETER` on a directory; `STATUS_FILE_CLOSED`
/// after cleanup.
pub fn write(open: OpenId, offset: Option<u64>, data: &[u8]) -> Result<usize, NTSTATUS> {
    // Paging writes do not check oplocks: the cached write that dirtied the pages did.
    if !crate::fltmgr::dispatch::servicing_paging_io() {
        super::oplock::before_operation(open, super::oplock::Operation::Write);
    }
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        if o.access & WRITE_RIGHTS == 0 {
            return Err(STATUS_ACCESS_DENIED);
        }
        let host = vol.host_path(o.node);
        let node = vol.node_mut(o.node)?;
        if let Some(name) = &o.stream_name {
            let stream = &mut node.streams.get_mut(name).ok_or(STATUS_FILE_DELETED)?.data;
            let at = offset.map_or(stream.len(), |at| usize::try_from(at).unwrap_or(usize::MAX));
            let end = at.checked_add(data.len()).ok_or(STATUS_INVALID_PARAMETER)?;
            if stream.len() < end {
                stream.resize(end, 0);
            }
            stream.get_mut(at..end).ok_or(STATUS_INVALID_PARAMETER)?.copy_from_slice(data);
        } else {
            if node.directory {
                return Err(STATUS_INVALID_PARAMETER);
            }
            let mut file = OpenOptions::new().write(true).open(host.ok_or(STATUS_FILE_DELETED)?).map_err(io_error)?;
            match offset {
                Some(at) => file.seek(SeekFrom::Start(at)),
                None => file.seek(SeekFrom::End(0)),
            }
            .map_err(io_error)?;
            file.write_all(data).map_err(io_error)?;
        }
        touch_write(node);
        Ok(data.len())
    })
}

fn size_of(vol: &Vol, o: &Open) -> Result<u64, NTSTATUS> {
    let node = vol.node(o.node)?;
    match &o.stream_name {
        Some(name) => Ok(node.streams.get(name).map_or(0, |st| st.data.len() as u64)),
        None if node.directory => Ok(0),
        None => fs::metadata(vol.host_path(o.node).ok_or(STATUS_FILE_DELETED)?).map(|m| m.len()).map_err(io_error),
    }
}

/// The stream's size (0 for a directory).
///
/// # Errors
/// `STATUS_FILE_CLOSED` after cleanup.
pub fn end_of_file(open: OpenId) -> Result<u64, NTSTATUS> {
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        size_of(vol, &o)
    })
}

/// Sets the stream's size, zero-filling when it grows.
///
/// # Errors
/// `STATUS_ACCESS_DENIED` without write access; `STATUS_INVALID_PARAMETER` on a directory; `STATUS_FILE_CLOSED`
/// after cleanup.
pub fn set_end_of_file(open: OpenId, size: u64) -> Result<(), NTSTATUS> {
    super::oplock::before_operation(open, super::oplock::Operation::SetSize);
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        if o.access & FILE_WRITE_DATA == 0 {
            return Err(STATUS_ACCESS_DENIED);
        }
        let host = vol.host_path(o.node);
        let node = vol.node_mut(o.node)?;
        if let Some(name) = &o.stream_name {
            let stream = &mut node.streams.get_mut(name).ok_or(STATUS_FILE_DELETED)?.data;
            stream.resize(usize::try_from(size).map_err(|_| STATUS_INVALID_PARAMETER)?, 0);
        } else {
            if node.directory {
                return Err(STATUS_INVALID_PARAMETER);
            }
            OpenOptions::new()
                .write(true)
                .open(host.ok_or(STATUS_FILE_DELETED)?)
                .and_then(|f| f.set_len(size))
                .map_err(io_error)?;
        }
        touch_write(node);
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Names and identity

fn current_name(s: &State, open: OpenId) -> Result<String, NTSTATUS> {
    let o = s.opens.get(&open).ok_or(STATUS_INVALID_PARAMETER)?;
    let Some(vol) = s.volumes.get(&o.root) else { return Ok(o.name.clone()) };
    let mut name = match o.link {
        Some(link) if vol.links.contains_key(&link) => vol.link_path(link),
        Some(_) => return Ok(o.name.clone()),
        None => "\\".to_owned(),
    };
    if let Some(stream) = &o.stream_name {
        name.push(':');
        name.push_str(stream);
    }
    Ok(name)
}

/// The open's name within its volume as the file system stores it now: long names, the link it was opened
/// through (renames included), and `:stream` for a named stream.
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for an unknown open.
pub fn name(open: OpenId) -> Result<String, NTSTATUS> {
    with_state(|s| current_name(s, open))
}

/// The normalized name within the volume, as `FltGetFileNameInformation` with `FLT_FILE_NAME_NORMALIZED` returns
/// it after the volume part: every short name expanded to its long name, the stream suffix without `:$DATA`
/// (<https://learn.microsoft.com/windows-hardware/drivers/ifs/flt-file-name-information>). The model stores long
/// names, so this is [`name`].
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for an unknown open.
pub fn normalized_name(open: OpenId) -> Result<String, NTSTATUS> {
    name(open)
}

/// The normalized form of `path` on `volume` without opening it, as Filter Manager builds a normalized name in
/// pre-create: every existing component replaced by its long name as stored (short names expanded, the stored
/// case), a final component that does not exist kept as given, `::$DATA` dropped and a named stream kept
/// (<https://learn.microsoft.com/windows-hardware/drivers/ifs/flt-file-name-information>). Reparse points on the
/// way are not followed (the name is the one the caller used, through the link).
///
/// # Errors
/// `STATUS_OBJECT_NAME_INVALID` for a malformed path; `STATUS_OBJECT_PATH_NOT_FOUND` when a directory on the way
/// does not exist.
pub fn normalize_path(volume: &Volume, path: &str, case_sensitive: bool) -> Result<String, NTSTATUS> {
    let parsed = names::parse(path)?;
    with_state(|s| {
        let vol = s.vol(volume);
        let mut dir = ROOT_FILE_ID;
        let mut out = String::new();
        let last_index = parsed.components.len().saturating_sub(1);
        for (index, part) in parsed.components.iter().enumerate() {
            vol.sync(dir);
            let found = vol
                .lookup(dir, part, case_sensitive)
                .and_then(|id| vol.links.get(&id))
                .map(|l| (l.name.clone(), l.node));
            out.push('\\');
            match found {
                Some((name, node)) => {
                    out.push_str(&name);
                    if index < last_index {
                        if !vol.node(node).is_ok_and(|n| n.directory) {
                            return Err(STATUS_OBJECT_PATH_NOT_FOUND);
                        }
                        dir = node;
                    }
                }
                None if index == last_index => out.push_str(part),
                None => return Err(STATUS_OBJECT_PATH_NOT_FOUND),
            }
        }
        if out.is_empty() {
            out.push('\\');
        }
        if let StreamSpec::Named(stream) = &parsed.stream {
            out.push(':');
            out.push_str(stream);
        }
        Ok(out)
    })
}

/// The 8.3 short name of the link the open came through, or `None` when its long name is already a legal 8.3
/// name (or it is the root).
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for an unknown open; `STATUS_FILE_DELETED` when the link is gone.
pub fn short_name(open: OpenId) -> Result<Option<String>, NTSTATUS> {
    with_state(|s| {
        let o = s.opens.get(&open).ok_or(STATUS_INVALID_PARAMETER)?;
        let Some(link) = o.link else { return Ok(None) };
        let vol = s.volumes.get(&o.root).ok_or(STATUS_INVALID_PARAMETER)?;
        Ok(vol.links.get(&link).ok_or(STATUS_FILE_DELETED)?.short.clone())
    })
}

/// The file's 64-bit ID (`FILE_INTERNAL_INFORMATION`), stable for the life of the file on its volume, across
/// renames and links.
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for an unknown open.
pub fn file_id(open: OpenId) -> Result<u64, NTSTATUS> {
    with_state(|s| s.opens.get(&open).map(|o| o.node).ok_or(STATUS_INVALID_PARAMETER))
}

// ---------------------------------------------------------------------------------------------------------------
// Links, renames and deletion

/// Resolves a destination name for a rename or link: its parent directory and last component. The I/O manager
/// has already resolved reparse points through `SL_OPEN_TARGET_DIRECTORY`, so one met here is
/// `STATUS_REPARSE` (not followed).
fn destination(vol: &mut Vol, path: &str) -> Result<(u64, String), NTSTATUS> {
    let parsed = names::parse(path)?;
    if parsed.components.is_empty() || parsed.stream != StreamSpec::Unnamed || parsed.trailing_backslash {
        return Err(STATUS_OBJECT_NAME_INVALID);
    }
    match walk(vol, &parsed, false)? {
        Walked::Parent(dir) => Ok((dir, parsed.components.last().cloned().unwrap_or_default())),
        Walked::Reparse(_) => Err(STATUS_REPARSE),
    }
}

/// Removes an existing destination link for `replace_if_exists`: refused when the target is a directory, open, or
/// read-only (<https://learn.microsoft.com/windows-hardware/drivers/ifs/rename-and-hard-link-processing>, MS-FSA
/// 2.1.5.15.11).
fn replace_target(s: &mut State, root: &Path, target: u64) -> Result<(), NTSTATUS> {
    let vol = s.volumes.get(root).ok_or(STATUS_INVALID_PARAMETER)?;
    let node_id = vol.links.get(&target).ok_or(STATUS_OBJECT_NAME_NOT_FOUND)?.node;
    let node = vol.node(node_id)?;
    if node.directory || node.attributes & FILE_ATTRIBUTE_READONLY != 0 || s.node_open(root, node_id) {
        return Err(STATUS_ACCESS_DENIED);
    }
    let host = vol.link_host_path(target).ok_or(STATUS_OBJECT_NAME_NOT_FOUND)?;
    fs::remove_file(host).map_err(io_error)?;
    if let Some(vol) = s.volumes.get_mut(root) {
        vol.forget_link(target);
    }
    Ok(())
}

/// `FileLinkInformation`: adds the hard link `new_path` to the open's file, as a host hard link (MS-FSA 2.1.5.15.6,
/// <https://learn.microsoft.com/openspecs/windows_protocols/ms-fsa/891bb8eb-89f8-46ca-80b7-9f5d4e8b5583>).
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for a named-stream open; `STATUS_FILE_IS_A_DIRECTORY`; `STATUS_ACCESS_DENIED` when the
/// open's link is delete-pending or a replaced target cannot go; `STATUS_TOO_MANY_LINKS` at 1024 links;
/// `STATUS_OBJECT_NAME_COLLISION` without `replace_if_exists`; name errors as for [`create`].
pub fn link(open: OpenId, new_path: &str, replace_if_exists: bool) -> Result<(), NTSTATUS> {
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        if o.stream_name.is_some() {
            return Err(STATUS_INVALID_PARAMETER);
        }
        let node = vol.node(o.node)?;
        if node.directory {
            return Err(STATUS_FILE_IS_A_DIRECTORY);
        }
        if o.link.and_then(|l| vol.links.get(&l)).is_some_and(|l| l.delete_pending) {
            return Err(STATUS_ACCESS_DENIED);
        }
        if node.links.len() >= MAX_LINKS {
            return Err(STATUS_TOO_MANY_LINKS);
        }
        let (dir, name) = destination(vol, new_path)?;
        if let Some(existing) = vol.lookup(dir, &name, false) {
            if !replace_if_exists {
                return Err(STATUS_OBJECT_NAME_COLLISION);
            }
            replace_target(s, &o.root, existing)?;
        }
        let vol = s.volumes.get_mut(&o.root).ok_or(STATUS_INVALID_PARAMETER)?;
        let source = vol.host_path(o.node).ok_or(STATUS_FILE_DELETED)?;
        let dest = vol.host_path(dir).ok_or(STATUS_OBJECT_PATH_NOT_FOUND)?.join(&name);
        fs::hard_link(source, dest).map_err(io_error)?;
        vol.add_link(dir, o.node, &name);
        vol.node_mut(o.node)?.times.change = now();
        Ok(())
    })
}

/// `FileRenameInformation`: moves the open's link to `new_path` on the same volume (MS-FSA 2.1.5.15.11,
/// <https://learn.microsoft.com/openspecs/windows_protocols/ms-fsa/87f86c9b-6c2a-4803-84b7-131a74a434fa>). The file
/// keeps its ID; a new short name is generated for the new name. A rename to the same link (a change of case) is
/// allowed. Renaming a directory while a file below it is open is refused with `STATUS_ACCESS_DENIED`, as
/// `FastFAT` does (stricter than documented for NTFS); moving a directory into itself is `STATUS_INVALID_PARAMETER`. Named
/// streams cannot be renamed in the model (`STATUS_INVALID_PARAMETER`).
///
/// # Errors
/// `STATUS_ACCESS_DENIED` without `DELETE` access or when a replaced target cannot go;
/// `STATUS_OBJECT_NAME_COLLISION` without `replace_if_exists`; name errors as for [`create`].
pub fn rename(open: OpenId, new_path: &str, replace_if_exists: bool) -> Result<(), NTSTATUS> {
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        if o.access & DELETE == 0 {
            return Err(STATUS_ACCESS_DENIED);
        }
        let (Some(link), None) = (o.link, &o.stream_name) else { return Err(STATUS_INVALID_PARAMETER) };
        let (dir, name) = destination(vol, new_path)?;
        let node = vol.node(o.node)?;
        if node.directory && vol.subtree_contains(o.node, dir) {
            return Err(STATUS_INVALID_PARAMETER);
        }
        let directory = node.directory;
        let existing = vol.lookup(dir, &name, false);
        if directory {
            let vol = s.volumes.get(&o.root).ok_or(STATUS_INVALID_PARAMETER)?;
            let busy = s
                .opens
                .values()
                .any(|x| !x.cleaned_up && x.root == o.root && x.node != o.node && vol.subtree_contains(o.node, x.node));
            if busy {
                return Err(STATUS_ACCESS_DENIED);
            }
        }
        if let Some(existing) = existing.filter(|e| *e != link) {
            if !replace_if_exists {
                return Err(STATUS_OBJECT_NAME_COLLISION);
            }
            replace_target(s, &o.root, existing)?;
        }
        let vol = s.volumes.get_mut(&o.root).ok_or(STATUS_INVALID_PARAMETER)?;
        let from = vol.link_host_path(link).ok_or(STATUS_FILE_DELETED)?;
        let to = vol.host_path(dir).ok_or(STATUS_OBJECT_PATH_NOT_FOUND)?.join(&name);
        fs::rename(from, to).map_err(io_error)?;
        let short = vol.short_for(dir, &name, Some(link));
        let old_parent = vol.links.get(&link).map(|l| l.parent);
        if let Some(parent) = old_parent.and_then(|p| vol.nodes.get_mut(&p)) {
            parent.children.remove(&link);
        }
        if let Some(l) = vol.links.get_mut(&link) {
            l.parent = dir;
            l.name = name;
            l.short = short;
        }
        if let Some(d) = vol.nodes.get_mut(&dir) {
            d.children.insert(link);
        }
        vol.node_mut(o.node)?.times.change = now();
        Ok(())
    })
}

/// `FileDispositionInformation`: marks (or unmarks) the open's link — or its named stream — for deletion at the
/// last cleanup (MS-FSA 2.1.5.15.3,
/// <https://learn.microsoft.com/openspecs/windows_protocols/ms-fsa/386d9ec5-e0f6-4853-b175-c05be01419e0>). New
/// opens through a delete-pending link fail with `STATUS_DELETE_PENDING`.
///
/// # Errors
/// `STATUS_ACCESS_DENIED` without `DELETE` access; `STATUS_CANNOT_DELETE` for a read-only file or the root;
/// `STATUS_DIRECTORY_NOT_EMPTY` for a directory with entries.
pub fn set_delete_disposition(open: OpenId, delete: bool) -> Result<(), NTSTATUS> {
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        if o.access & DELETE == 0 {
            return Err(STATUS_ACCESS_DENIED);
        }
        vol.sync(o.node);
        let node = vol.node(o.node)?;
        if delete {
            if node.attributes & FILE_ATTRIBUTE_READONLY != 0 || o.link.is_none() {
                return Err(STATUS_CANNOT_DELETE);
            }
            if o.stream_name.is_none() && node.directory && !node.children.is_empty() {
                return Err(STATUS_DIRECTORY_NOT_EMPTY);
            }
        }
        mark_delete(vol, &o, delete);
        Ok(())
    })
}

fn mark_delete(vol: &mut Vol, o: &Open, delete: bool) {
    match &o.stream_name {
        Some(name) => {
            if let Some(st) = vol.nodes.get_mut(&o.node).and_then(|n| n.streams.get_mut(name)) {
                st.delete_pending = delete;
            }
        }
        None => {
            if let Some(l) = o.link.and_then(|l| vol.links.get_mut(&l)) {
                l.delete_pending = delete;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Information

/// `FileStandardInformation` (<https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/ns-wdm-_file_standard_information>).
///
/// # Errors
/// `STATUS_FILE_CLOSED` after cleanup.
pub fn query_standard(open: OpenId) -> Result<StandardInformation, NTSTATUS> {
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        let end_of_file = size_of(vol, &o)?;
        let node = vol.node(o.node)?;
        let live_links = node.links.iter().filter(|l| vol.links.get(l).is_some_and(|l| !l.delete_pending)).count();
        let delete_pending = match &o.stream_name {
            Some(name) => node.streams.get(name).is_some_and(|st| st.delete_pending),
            None => o.link.and_then(|l| vol.links.get(&l)).is_some_and(|l| l.delete_pending),
        };
        Ok(StandardInformation {
            allocation_size: end_of_file.div_ceil(CLUSTER_SIZE).saturating_mul(CLUSTER_SIZE),
            end_of_file,
            number_of_links: u32::try_from(live_links).unwrap_or(u32::MAX),
            delete_pending,
            directory: node.directory && o.stream_name.is_none(),
        })
    })
}

/// `FileBasicInformation` (<https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/ns-wdm-_file_basic_information>).
///
/// # Errors
/// `STATUS_FILE_CLOSED` after cleanup.
pub fn query_basic(open: OpenId) -> Result<BasicInformation, NTSTATUS> {
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        let node = vol.node(o.node)?;
        Ok(BasicInformation {
            creation_time: node.times.creation,
            last_access_time: node.times.access,
            last_write_time: node.times.write,
            change_time: node.times.change,
            file_attributes: effective_attributes(node),
        })
    })
}

/// Sets `FileBasicInformation` (MS-FSA 2.1.5.15.1): a time of 0 or -1 leaves it unchanged (-1's "stop updating"
/// is not modelled); attributes 0 leave them unchanged, `FILE_ATTRIBUTE_NORMAL` alone clears them;
/// `FILE_ATTRIBUTE_DIRECTORY` on a file and `FILE_ATTRIBUTE_TEMPORARY` on a directory are
/// `STATUS_INVALID_PARAMETER`.
///
/// # Errors
/// `STATUS_ACCESS_DENIED` without `FILE_WRITE_ATTRIBUTES`; `STATUS_INVALID_PARAMETER`; `STATUS_FILE_CLOSED`.
pub fn set_basic(open: OpenId, info: &BasicInformation) -> Result<(), NTSTATUS> {
    with_state(|s| {
        let (o, vol) = s.live_with_vol(open)?;
        if o.access & FILE_WRITE_ATTRIBUTES == 0 {
            return Err(STATUS_ACCESS_DENIED);
        }
        let node = vol.node_mut(o.node)?;
        let attributes = info.file_attributes;
        if (!node.directory && attributes & FILE_ATTRIBUTE_DIRECTORY != 0)
            || (node.directory && attributes & FILE_ATTRIBUTE_TEMPORARY != 0)
        {
            return Err(STATUS_INVALID_PARAMETER);
        }
        let set = |field: &mut i64, value: i64| {
            if value != 0 && value != -1 {
                *field = value;
            }
        };
        set(&mut node.times.creation, info.creation_time);
        set(&mut node.times.access, info.last_access_time);
        set(&mut node.times.write, info.last_write_time);
        set(&mut node.times.change, info.change_time);
        if attributes != 0 {
            node.attributes = attributes & FILE_ATTRIBUTE_VALID_SET_FLAGS & !FILE_ATTRIBUTE_NORMAL;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Model administration: reparse points and ACLs

/// Resolves `path` on `volume` without following a reparse point on its last component.
fn resolve_node(s: &mut State, volume: &Volume, path: &str) -> Result<u64, NTSTATUS> {
    let parsed = names::parse(path)?;
    if parsed.stream != StreamSpec::Unnamed {
        return Err(STATUS_OBJECT_NAME_INVALID);
    }
    let vol = s.vol(volume);
    let Some(name) = parsed.components.last() else { return Ok(ROOT_FILE_ID) };
    match walk(vol, &parsed, false)? {
        Walked::Parent(dir) => {
            let link = vol.lookup(dir, name, false).ok_or(STATUS_OBJECT_NAME_NOT_FOUND)?;
            vol.links.get(&link).map(|l| l.node).ok_or(STATUS_OBJECT_NAME_NOT_FOUND)
        }
        Walked::Reparse(_) => Err(STATUS_REPARSE),
    }
}

/// Makes the existing file or directory at `path` a reparse point (`FSCTL_SET_REPARSE_POINT`, as `mklink` or
/// `mountvol` would; <https://learn.microsoft.com/windows-hardware/drivers/ifs/reparse-points>). Symbolic links
/// may be files or directories; junctions and mount points must be empty directories, and a junction's target
/// must be absolute.
///
/// # Errors
/// `STATUS_OBJECT_NAME_NOT_FOUND`, `STATUS_OBJECT_PATH_NOT_FOUND`, `STATUS_NOT_A_DIRECTORY`,
/// `STATUS_DIRECTORY_NOT_EMPTY`, `STATUS_OBJECT_NAME_INVALID` (a relative junction target), `STATUS_REPARSE` (a
/// reparse point on the way).
pub fn set_reparse_point(volume: &Volume, path: &str, target: ReparseTarget) -> Result<(), NTSTATUS> {
    with_state(|s| {
        let id = resolve_node(s, volume, path)?;
        let vol = s.vol(volume);
        vol.sync(id);
        let node = vol.node_mut(id)?;
        if id == ROOT_FILE_ID {
            return Err(STATUS_ACCESS_DENIED);
        }
        match &target {
            ReparseTarget::SymbolicLink(_) => {}
            ReparseTarget::Junction(to) if !to.starts_with('\\') => return Err(STATUS_OBJECT_NAME_INVALID),
            ReparseTarget::Junction(_) | ReparseTarget::MountPoint(_) => {
                if !node.directory {
                    return Err(STATUS_NOT_A_DIRECTORY);
                }
                if !node.children.is_empty() {
                    return Err(STATUS_DIRECTORY_NOT_EMPTY);
                }
            }
        }
        node.reparse = Some(target);
        node.times.change = now();
        Ok(())
    })
}

/// Removes the reparse point at `path` (`FSCTL_DELETE_REPARSE_POINT`).
///
/// # Errors
/// `STATUS_NOT_A_REPARSE_POINT`, and the resolution errors of [`set_reparse_point`].
pub fn delete_reparse_point(volume: &Volume, path: &str) -> Result<(), NTSTATUS> {
    with_state(|s| {
        let id = resolve_node(s, volume, path)?;
        let node = s.vol(volume).node_mut(id)?;
        node.reparse.take().map(|_| ()).ok_or(STATUS_NOT_A_REPARSE_POINT)
    })
}

/// Sets the model ACL of the file or directory at `path` (see [`Acl`]); files created in a directory afterwards
/// inherit it.
///
/// # Errors
/// The resolution errors of [`set_reparse_point`].
pub fn set_acl(volume: &Volume, path: &str, acl: Acl) -> Result<(), NTSTATUS> {
    with_state(|s| {
        let id = resolve_node(s, volume, path)?;
        s.vol(volume).node_mut(id)?.acl = Some(acl);
        Ok(())
    })
}

/// Removes the model ACL at `path`: everyone may do everything again.
///
/// # Errors
/// The resolution errors of [`set_reparse_point`].
pub fn clear_acl(volume: &Volume, path: &str) -> Result<(), NTSTATUS> {
    with_state(|s| {
        let id = resolve_node(s, volume, path)?;
        s.vol(volume).node_mut(id)?.acl = None;
        Ok(())
    })
}

/// Forgets the model state of `volume` (short names, IDs, streams, ACLs, reparse points); its open handles stop
/// working. For tests that reuse a host root.
pub fn forget_volume(volume: &Volume) {
    with_state(|s| {
        s.volumes.remove(&volume.spec.root);
        s.opens.retain(|_, o| o.root != volume.spec.root);
    });
}

// ---------------------------------------------------------------------------------------------------------------
// Cleanup and close

/// Removes the delete-pending links of `node` (and the file with its last link) once no handle is open on it,
/// and a delete-pending named stream once no handle is open on the stream.
fn process_deletes(s: &mut State, root: &Path, node_id: u64, stream: Option<(String, StreamId)>) {
    let stream_open = |s: &State, id: StreamId| s.opens.values().any(|o| !o.cleaned_up && o.stream == id);
    if let Some((name, id)) = stream
        && !stream_open(s, id)
        && let Some(node) = s.volumes.get_mut(root).and_then(|v| v.nodes.get_mut(&node_id))
        && node.streams.get(&name).is_some_and(|st| st.delete_pending)
    {
        node.streams.remove(&name);
    }
    if s.node_open(root, node_id) {
        return;
    }
    let Some(vol) = s.volumes.get_mut(root) else { return };
    let Some(node) = vol.nodes.get(&node_id) else { return };
    let pending: Vec<u64> =
        node.links.iter().copied().filter(|l| vol.links.get(l).is_some_and(|l| l.delete_pending)).collect();
    let directory = node.directory;
    for link in pending {
        let Some(host) = vol.link_host_path(link) else { continue };
        let removed = if directory { fs::remove_dir(&host) } else { fs::remove_file(&host) };
        if removed.is_ok() {
            vol.forget_link(link);
        } else if let Some(l) = vol.links.get_mut(&link) {
            // A directory that gained entries after being marked stays, as NTFS keeps it.
            l.delete_pending = false;
        }
    }
}

/// `IRP_MJ_FLUSH_BUFFERS`: the model writes file data straight to the host file, so there is nothing cached to
/// write; it answers `STATUS_FILE_CLOSED` after cleanup, as NTFS does. Nothing is synced to the host disk: tests do
/// not survive power loss.
///
/// # Errors
/// `STATUS_FILE_CLOSED` after cleanup; `STATUS_INVALID_PARAMETER` for an unknown open.
pub fn flush(open: OpenId) -> Result<(), NTSTATUS> {
    with_state(|s| s.live(open).map(|_| ()))
}

/// The access granted to `open` (for the I/O manager's handle checks).
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for an unknown open.
pub fn granted_access(open: OpenId) -> Result<u32, NTSTATUS> {
    with_state(|s| s.opens.get(&open).map(|o| o.access).ok_or(STATUS_INVALID_PARAMETER))
}

/// The stream `open` opened.
#[must_use]
pub fn stream_of(open: OpenId) -> Option<StreamId> {
    with_state(|s| s.opens.get(&open).map(|o| o.stream))
}

/// How many other opens of `open`'s stream still have their handle (no cleanup yet): the oplock package's "other
/// opens on the stream".
#[must_use]
pub fn other_opens_of_stream(open: OpenId) -> usize {
    with_state(|s| {
        let Some(stream) = s.opens.get(&open).map(|o| o.stream) else { return 0 };
        s.opens.iter().filter(|(id, o)| **id != open && o.stream == stream && !o.cleaned_up).count()
    })
}

/// The existing stream `path` names on `volume`, looked up without opening it (`None` when it does not exist yet
/// or a reparse point lies on the way), and whether an open of it with `desired_access` and `share_access` would
/// meet a sharing violation: what the oplock package needs to know before a create reaches the stream
/// ([`super::oplock`]).
#[must_use]
pub fn peek_stream(
    volume: &Volume,
    path: &str,
    case_sensitive: bool,
    desired_access: u32,
    share_access: u32,
) -> Option<(StreamId, bool)> {
    with_state(|s| {
        let parsed = names::parse(path).ok()?;
        let vol = s.vol(volume);
        let node = if parsed.components.is_empty() {
            ROOT_FILE_ID
        } else {
            let Ok(Walked::Parent(dir)) = walk(vol, &parsed, case_sensitive) else { return None };
            let link = vol.lookup(dir, parsed.components.last()?, case_sensitive)?;
            vol.links.get(&link)?.node
        };
        let node = vol.nodes.get(&node)?;
        let stream = match &parsed.stream {
            StreamSpec::Named(name) => {
                node.streams.iter().find(|(k, _)| names::same(k, name, case_sensitive)).map(|(_, st)| st.id)?
            }
            _ => node.stream,
        };
        let conflict = share_conflict(&s.opens, stream, map_generic(desired_access), share_access);
        Some((stream, conflict))
    })
}

/// `IRP_MJ_CLEANUP`: the last handle to the file object is closed. Its share access is released; with
/// `FILE_DELETE_ON_CLOSE` its link (or stream) becomes delete-pending; and when no handle is left on the file,
/// its delete-pending links go (the file with its last one).
pub fn cleanup(open: OpenId) {
    with_state(|s| {
        let Some(o) = s.opens.get_mut(&open) else { return };
        if o.cleaned_up {
            return;
        }
        o.cleaned_up = true;
        let o = o.clone();
        if o.delete_on_close
            && let Some(vol) = s.volumes.get_mut(&o.root)
        {
            let deletable = vol.nodes.get(&o.node).is_some_and(|n| {
                n.attributes & FILE_ATTRIBUTE_READONLY == 0
                    && (o.stream_name.is_some() || !n.directory || n.children.is_empty())
            });
            if deletable && o.link.is_some() {
                mark_delete(vol, &o, true);
            }
        }
        let stream = o.stream_name.clone().map(|name| (name, o.stream));
        process_deletes(s, &o.root, o.node, stream);
    });
}

/// `IRP_MJ_CLOSE`: the last reference to the file object is gone.
pub fn close(open: OpenId) {
    with_state(|s| s.opens.remove(&open));
}
