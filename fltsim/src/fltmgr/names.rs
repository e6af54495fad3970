//! Name queries: `FltGetFileNameInformation`, `FltParseFileNameInformation`, `FltReferenceFileNameInformation` and
//! `FltReleaseFileNameInformation`.
//!
//! Names have the layout of <https://learn.microsoft.com/windows-hardware/drivers/ifs/flt-file-name-information>:
//! `Name` is the full name (`\Device\HarddiskVolume1\dir\file.txt:stream`), `Volume` its device part, and after
//! parsing `ParentDir` (`\dir\`), `FinalComponent` (`file.txt:stream`), `Extension` (`txt`) and `Stream`
//! (`:stream`). A normalized name has every short name expanded and the stored case; an opened name is the name
//! as the caller spelled it. The model keeps no name cache, so every query that would need the file system where
//! Filter Manager may not enter it fails as a cache miss would.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::FILE_OBJECT,
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_FILE_NAME_INFORMATION, FLT_FILE_NAME_NORMALIZED, FLT_FILE_NAME_OPENED,
            FLT_FILE_NAME_QUERY_ALWAYS_ALLOW_CACHE_LOOKUP, FLT_FILE_NAME_QUERY_CACHE_ONLY, FLT_FILE_NAME_QUERY_DEFAULT,
            FLT_FILE_NAME_QUERY_FILESYSTEM_ONLY, FLT_FILE_NAME_SHORT, FLTFL_FILE_NAME_PARSED_EXTENSION,
            FLTFL_FILE_NAME_PARSED_FINAL_COMPONENT, FLTFL_FILE_NAME_PARSED_PARENT_DIR, FLTFL_FILE_NAME_PARSED_STREAM,
            PFLT_FILTER, PFLT_INSTANCE,
        },
        System::SystemServices::IRP_PAGING_IO,
    },
    Win32::Foundation::{
        HANDLE, NTSTATUS, STATUS_FLT_INVALID_NAME_REQUEST, STATUS_FLT_NAME_CACHE_MISS, STATUS_INVALID_PARAMETER,
        STATUS_NOT_IMPLEMENTED, STATUS_SUCCESS, UNICODE_STRING,
    },
    core::PCWSTR,
};

use super::instance::instances;
use crate::{
    guard::guarded,
    io::{fs, info, iomgr},
    kernel::{irql, thread},
    verifier::{self, Rule},
};

const FLTGETFILENAMEINFORMATION: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetfilenameinformation";

/// A name information block: the structure drivers see, followed by the buffer its strings point into.
#[repr(C)]
struct Block {
    info: FLT_FILE_NAME_INFORMATION,
    buffer: Vec<u16>,
}

struct Tracked {
    references: u32,
    filter: PFLT_FILTER,
}

static NAMES: Mutex<BTreeMap<usize, Tracked>> = Mutex::new(BTreeMap::new());

fn names() -> MutexGuard<'static, BTreeMap<usize, Tracked>> {
    NAMES.lock().unwrap_or_else(PoisonError::into_inner)
}

fn string(buffer: &mut [u16], start: usize, length: usize) -> UNICODE_STRING {
    let bytes = u16::try_from(length.saturating_mul(2)).unwrap_or(0xFFFE);
    let pointer = buffer.get_mut(start..).map_or(std::ptr::null_mut(), <[u16]>::as_mut_ptr);
    UNICODE_STRING {
        Length: bytes,
        MaximumLength: bytes,
        Buffer: if length == 0 { std::ptr::null_mut() } else { pointer },
    }
}

/// A new name information block for `within` on the volume `device_name`, with one reference, tracked for
/// `filter`'s leak check.
fn issue(device_name: &str, within: &str, format: u32, filter: PFLT_FILTER) -> *mut FLT_FILE_NAME_INFORMATION {
    let full = format!("{device_name}{within}");
    let volume_units = device_name.encode_utf16().count();
    let mut block = Box::new(Block {
        // SAFETY: FLT_FILE_NAME_INFORMATION is a plain C struct for which all-zero is valid.
        info: unsafe { std::mem::zeroed() },
        buffer: full.encode_utf16().collect(),
    });
    let total = block.buffer.len();
    block.info.Size = u16::try_from(size_of::<FLT_FILE_NAME_INFORMATION>()).unwrap_or(u16::MAX);
    block.info.Format = format;
    block.info.Name = string(&mut block.buffer, 0, total);
    block.info.Volume = string(&mut block.buffer, 0, volume_units);
    let pointer = Box::into_raw(block);
    names().insert(pointer as usize, Tracked { references: 1, filter });
    // The block starts with the structure (repr(C), first field).
    pointer.cast()
}

/// `FLT_FILE_NAME_OPTIONS` split into its format byte and query method byte, and whether the method is one of the
/// four the docs define.
fn split_name_options(name_options: u32) -> (u32, u32, bool) {
    let method = name_options & 0xFF00;
    let known_method = [
        FLT_FILE_NAME_QUERY_DEFAULT,
        FLT_FILE_NAME_QUERY_CACHE_ONLY,
        FLT_FILE_NAME_QUERY_FILESYSTEM_ONLY,
        FLT_FILE_NAME_QUERY_ALWAYS_ALLOW_CACHE_LOOKUP,
    ]
    .contains(&method);
    (name_options & 0xFF, method, known_method)
}

/// `FltGetFileNameInformation`.
///
/// Rules: ≤ APC_LEVEL; `NameOptions` naming one format (normalized, opened, short) and one query method; no short
/// name in pre-create. Answers `STATUS_FLT_INVALID_NAME_REQUEST` where the docs say the file system cannot be
/// queried: paging I/O (the model has no name cache, so every such query misses), a top-level IRP set, all APCs
/// disabled, or a file object already cleaned up; `STATUS_FLT_NAME_CACHE_MISS` for `QUERY_CACHE_ONLY`. Every block
/// returned must be released; blocks left at unload are reported.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetfilenameinformation>.
///
/// # Safety
/// Called by driver code with the callback data of an operation in progress.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetFileNameInformation(
    callback_data: *const FLT_CALLBACK_DATA,
    name_options: u32,
    file_name_information: *mut *mut FLT_FILE_NAME_INFORMATION,
) -> NTSTATUS {
    const API: &str = "FltGetFileNameInformation";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, FLTGETFILENAMEINFORMATION) {
            return STATUS_INVALID_PARAMETER;
        }
        let (format, method, known_method) = split_name_options(name_options);
        let known_format = [FLT_FILE_NAME_NORMALIZED, FLT_FILE_NAME_OPENED, FLT_FILE_NAME_SHORT].contains(&format);
        if file_name_information.is_null() || !known_method || !known_format {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!(
                    "NameOptions {name_options:#x} must name one format and one query method, with a place for the result"
                ),
            );
            return STATUS_INVALID_PARAMETER;
        }
        // SAFETY: the driver passes the callback data of an operation in progress.
        let Some(data) = (unsafe { callback_data.as_ref() }) else { return STATUS_INVALID_PARAMETER };
        // SAFETY: its parameter block lives as long as the operation.
        let Some(iopb) = (unsafe { data.Iopb.as_ref() }) else { return STATUS_INVALID_PARAMETER };
        let state = thread::snapshot();
        if iopb.IrpFlags & IRP_PAGING_IO != 0 || state.top_level_irp != 0 || state.all_apcs_disabled() {
            return STATUS_FLT_INVALID_NAME_REQUEST;
        }
        if method == FLT_FILE_NAME_QUERY_CACHE_ONLY {
            return STATUS_FLT_NAME_CACHE_MISS;
        }
        let Some(file) = iomgr::describe(iopb.TargetFileObject) else { return STATUS_INVALID_PARAMETER };
        if !file.handle_open {
            return STATUS_FLT_INVALID_NAME_REQUEST;
        }
        if file.creating && format == FLT_FILE_NAME_SHORT {
            verifier::report(Rule::InvalidArgument, API, "FLT_FILE_NAME_SHORT is not available in pre-create");
            return STATUS_INVALID_PARAMETER;
        }
        let within = match (format, file.open) {
            (FLT_FILE_NAME_OPENED, _) => file.file_name.clone(),
            (FLT_FILE_NAME_SHORT, Some(open)) => match fs::short_name(open) {
                Ok(Some(short)) => {
                    let parent = file.file_name.rsplit_once('\\').map_or("", |(p, _)| p);
                    format!("{parent}\\{short}")
                }
                Ok(None) => file.file_name.clone(),
                Err(status) => return status,
            },
            (_, Some(open)) => match fs::normalized_name(open) {
                Ok(name) => name,
                Err(status) => return status,
            },
            (_, None) => {
                let case_sensitive =
                    u32::from(iopb.OperationFlags) & windows_sys::Wdk::System::SystemServices::SL_CASE_SENSITIVE != 0;
                match fs::normalize_path(&file.volume, &file.file_name, case_sensitive) {
                    Ok(name) => name,
                    Err(status) => return status,
                }
            }
        };
        let filter = instances().into_iter().find(|i| i.handle == iopb.TargetInstance).map_or(0, |i| i.filter);
        // SAFETY: checked non-NULL above.
        unsafe { file_name_information.write(issue(&file.volume.device_name, &within, format, filter)) };
        STATUS_SUCCESS
    })
}

fn check_live(api: &'static str, info: *const FLT_FILE_NAME_INFORMATION) -> bool {
    if names().contains_key(&(info as usize)) {
        return true;
    }
    verifier::report(Rule::NameInfoMisuse, api, format!("{info:?} is not live name information (released too often?)"));
    false
}

/// `FltReferenceFileNameInformation`: ≤ APC_LEVEL; live name information.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltreferencefilenameinformation>.
#[unsafe(no_mangle)]
pub extern "system" fn FltReferenceFileNameInformation(info: *const FLT_FILE_NAME_INFORMATION) {
    const API: &str = "FltReferenceFileNameInformation";
    guarded(API, (), || {
        if thread::require_irql_at_most(API, irql::APC, FLTGETFILENAMEINFORMATION)
            && check_live(API, info)
            && let Some(t) = names().get_mut(&(info as usize))
        {
            t.references = t.references.saturating_add(1);
        }
    });
}

/// `FltReleaseFileNameInformation`: ≤ APC_LEVEL; live name information, released no more often than referenced.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltreleasefilenameinformation>.
#[unsafe(no_mangle)]
pub extern "system" fn FltReleaseFileNameInformation(info: *const FLT_FILE_NAME_INFORMATION) {
    const API: &str = "FltReleaseFileNameInformation";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, FLTGETFILENAMEINFORMATION) || !check_live(API, info) {
            return;
        }
        let last = {
            let mut all = names();
            let Some(t) = all.get_mut(&(info as usize)) else { return };
            t.references = t.references.saturating_sub(1);
            let last = t.references == 0;
            if last {
                all.remove(&(info as usize));
            }
            last
        };
        if last {
            // SAFETY: the block was leaked from a Box in FltGetFileNameInformation and its last reference is gone.
            drop(unsafe { Box::from_raw(info.cast_mut().cast::<Block>()) });
        }
    });
}

/// `FltParseFileNameInformation`: ≤ APC_LEVEL; fills `ParentDir`, `FinalComponent`, `Extension` and `Stream`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltparsefilenameinformation>.
#[unsafe(no_mangle)]
pub extern "system" fn FltParseFileNameInformation(info: *mut FLT_FILE_NAME_INFORMATION) -> NTSTATUS {
    const API: &str = "FltParseFileNameInformation";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, FLTGETFILENAMEINFORMATION) || !check_live(API, info) {
            return STATUS_INVALID_PARAMETER;
        }
        // SAFETY: live name information is a Block the model owns; the driver holds a reference.
        let block = unsafe { &mut *info.cast::<Block>() };
        let volume = usize::from(block.info.Volume.Length / 2);
        let units = block.buffer.clone();
        let rest = units.get(volume..).unwrap_or(&[]);
        let backslash = u16::from(b'\\');
        let last_slash = rest.iter().rposition(|&c| c == backslash).unwrap_or(0);
        let final_start = volume.saturating_add(last_slash).saturating_add(1);
        let final_part = units.get(final_start..).unwrap_or(&[]);
        let colon = final_part.iter().position(|&c| c == u16::from(b':'));
        let name_part = colon.map_or(final_part, |c| final_part.get(..c).unwrap_or(&[]));
        let dot = name_part.iter().rposition(|&c| c == u16::from(b'.'));
        block.info.ParentDir = string(&mut block.buffer, volume, last_slash.saturating_add(1));
        block.info.FinalComponent = string(&mut block.buffer, final_start, final_part.len());
        block.info.Stream = match colon {
            Some(c) => string(&mut block.buffer, final_start.saturating_add(c), final_part.len().saturating_sub(c)),
            None => UNICODE_STRING::default(),
        };
        block.info.Extension = match dot {
            Some(d) => string(
                &mut block.buffer,
                final_start.saturating_add(d).saturating_add(1),
                name_part.len().saturating_sub(d).saturating_sub(1),
            ),
            None => UNICODE_STRING::default(),
        };
        block.info.Share = UNICODE_STRING::default();
        let parsed = FLTFL_FILE_NAME_PARSED_FINAL_COMPONENT
            | FLTFL_FILE_NAME_PARSED_EXTENSION
            | FLTFL_FILE_NAME_PARSED_STREAM
            | FLTFL_FILE_NAME_PARSED_PARENT_DIR;
        block.info.NamesParsed = u16::try_from(parsed).unwrap_or(0);
        STATUS_SUCCESS
    })
}

/// Reports the name information `filter` never released; called when its driver unloads.
pub(crate) fn report_leaks(filter: PFLT_FILTER, after: &str) {
    let count = names().values().filter(|t| t.filter == filter).count();
    if count > 0 {
        verifier::report(
            Rule::NameInfoLeak,
            "FltReleaseFileNameInformation",
            format!("{count} name information blocks never released after {after}"),
        );
    }
}

const FLTGETDESTINATIONFILENAMEINFORMATION: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetdestinationfilenameinformation";

/// `FltGetDestinationFileNameInformation`: ≤ APC_LEVEL; an attached instance; an open file object; `NameOptions`
/// with the normalized or opened format (short: `STATUS_FLT_INVALID_NAME_REQUEST`, as documented) and one query
/// method; a place for the result. With a top-level IRP set the file system cannot be queried
/// (`STATUS_FLT_INVALID_NAME_REQUEST`); `QUERY_CACHE_ONLY` misses (no name cache). The destination is `FileName` in
/// the file's directory, or a full name (`\??\C:\...`) on the file's volume: another volume answers
/// `STATUS_NOT_SAME_DEVICE`, as the rename itself would (the model's choice; the page names
/// `STATUS_MOUNT_POINT_NOT_RESOLVED` for a mount point to another volume). A normalized name expands the parent's short
/// names and uses its stored case; the final component is kept as given. A `RootDirectory` handle is not modelled
/// (reported). The block is released like any name information.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetdestinationfilenameinformation>.
///
/// # Safety
/// Called by driver code: `FileName` holds `FileNameLength` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetDestinationFileNameInformation(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    root_directory: HANDLE,
    file_name: PCWSTR,
    file_name_length: u32,
    name_options: u32,
    ret_file_name_information: *mut *mut FLT_FILE_NAME_INFORMATION,
) -> NTSTATUS {
    const API: &str = "FltGetDestinationFileNameInformation";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, FLTGETDESTINATIONFILENAMEINFORMATION) {
            return STATUS_INVALID_PARAMETER;
        }
        let (format, method, known_method) = split_name_options(name_options);
        if format == FLT_FILE_NAME_SHORT {
            return STATUS_FLT_INVALID_NAME_REQUEST;
        }
        let known_format = [FLT_FILE_NAME_NORMALIZED, FLT_FILE_NAME_OPENED].contains(&format);
        let odd = !file_name_length.is_multiple_of(2) || (file_name.is_null() && file_name_length != 0);
        if ret_file_name_information.is_null() || !known_method || !known_format || odd {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!(
                    "NameOptions {name_options:#x} must name one format (normalized or opened) and one query method, \
                     with an even-length FileName and a place for the result"
                ),
            );
            return STATUS_INVALID_PARAMETER;
        }
        let Some(filter) = instances().into_iter().find(|i| i.handle == instance).map(|i| i.filter) else {
            verifier::report(Rule::InvalidArgument, API, format!("{instance:#x} is not an attached instance"));
            return STATUS_INVALID_PARAMETER;
        };
        let Some(file) = iomgr::describe(file_object) else {
            verifier::report(Rule::InvalidArgument, API, format!("{file_object:?} is not an open file object"));
            return STATUS_INVALID_PARAMETER;
        };
        if !root_directory.is_null() {
            verifier::report(Rule::UnsupportedByModel, API, "a RootDirectory handle is not modelled yet");
            return STATUS_NOT_IMPLEMENTED;
        }
        if thread::snapshot().top_level_irp != 0 {
            return STATUS_FLT_INVALID_NAME_REQUEST;
        }
        if method == FLT_FILE_NAME_QUERY_CACHE_ONLY {
            return STATUS_FLT_NAME_CACHE_MISS;
        }
        let units = usize::try_from(file_name_length / 2).unwrap_or(0);
        let name = if units == 0 {
            String::new()
        } else {
            // SAFETY: the driver's name holds `FileNameLength` bytes (checked even and non-NULL above).
            String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(file_name, units) })
        };
        let within = match info::target_name(&file.volume, &file.file_name, &name) {
            Ok(within) => within,
            Err(status) => return status,
        };
        let within = if format == FLT_FILE_NAME_NORMALIZED {
            let (parent, last) = within.rsplit_once('\\').unwrap_or(("", within.as_str()));
            let parent = if parent.is_empty() {
                String::new()
            } else {
                match fs::normalize_path(&file.volume, parent, false) {
                    Ok(parent) => parent,
                    Err(status) => return status,
                }
            };
            format!("{parent}\\{last}")
        } else {
            within
        };
        // SAFETY: checked non-NULL above.
        unsafe { ret_file_name_information.write(issue(&file.volume.device_name, &within, format, filter)) };
        STATUS_SUCCESS
    })
}
