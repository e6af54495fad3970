//! Query and set information (`IRP_MJ_QUERY_INFORMATION`, `IRP_MJ_SET_INFORMATION`): the classes the model
//! answers, laid out as windows-sys's structures, and what the file system does for each.
//!
//! Queried: `FileBasicInformation`, `FileStandardInformation`, `FileInternalInformation`, `FilePositionInformation`,
//! `FileNetworkOpenInformation`, `FileStatInformation` (also the class of `IRP_MJ_QUERY_OPEN`). Set: `FileBasicInformation`, `FilePositionInformation`, `FileEndOfFileInformation`,
//! `FileDispositionInformation`, `FileRenameInformation`, `FileLinkInformation`. Other classes answer
//! `STATUS_INVALID_INFO_CLASS` (NTFS answers many more; the model says so rather than inventing data). A buffer
//! shorter than the class's structure answers `STATUS_INFO_LENGTH_MISMATCH`, as `NtQueryInformationFile` does
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-ntqueryinformationfile>).
#![expect(non_upper_case_globals, reason = "windows-sys spells the information classes as the C enumeration does")]

use windows_sys::{
    Wdk::{
        Foundation::FILE_OBJECT,
        Storage::FileSystem::{
            FILE_BASIC_INFORMATION, FILE_INFORMATION_CLASS, FILE_INTERNAL_INFORMATION, FILE_NETWORK_OPEN_INFORMATION,
            FILE_POSITION_INFORMATION, FILE_RENAME_INFORMATION, FILE_STANDARD_INFORMATION, FILE_STAT_INFORMATION,
            FileBasicInformation, FileDispositionInformation, FileEndOfFileInformation, FileInternalInformation,
            FileLinkInformation, FileNetworkOpenInformation, FilePositionInformation, FileRenameInformation,
            FileStandardInformation, FileStatInformation,
        },
        System::SystemServices::FILE_END_OF_FILE_INFORMATION,
    },
    Win32::Foundation::{
        NTSTATUS, STATUS_INFO_LENGTH_MISMATCH, STATUS_INVALID_INFO_CLASS, STATUS_INVALID_PARAMETER,
        STATUS_NOT_SAME_DEVICE,
    },
};

use super::{Volume, fs};

/// The bytes of a plain C structure, for an information buffer.
fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
    // SAFETY: `value` is a live, initialised plain C structure of `size_of::<T>()` bytes; its padding is read as
    // bytes, as a kernel copying the structure into a caller's buffer would.
    unsafe { std::slice::from_raw_parts(std::ptr::from_ref(value).cast::<u8>(), size_of::<T>()) }.to_vec()
}

/// Reads a plain C structure from the front of `bytes`, or `STATUS_INFO_LENGTH_MISMATCH` when it is too short.
fn read_struct<T: Copy>(bytes: &[u8]) -> Result<T, NTSTATUS> {
    if bytes.len() < size_of::<T>() {
        return Err(STATUS_INFO_LENGTH_MISMATCH);
    }
    // SAFETY: `bytes` holds at least `size_of::<T>()` bytes; `T` is a plain C structure for which any bytes of
    // the fields it is read for are valid (bool fields are normalised by their readers below).
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// The minimum buffer each queried class needs.
pub(crate) fn query_size(class: FILE_INFORMATION_CLASS) -> Option<usize> {
    Some(match class {
        FileBasicInformation => size_of::<FILE_BASIC_INFORMATION>(),
        FileStandardInformation => size_of::<FILE_STANDARD_INFORMATION>(),
        FileInternalInformation => size_of::<FILE_INTERNAL_INFORMATION>(),
        FilePositionInformation => size_of::<FILE_POSITION_INFORMATION>(),
        FileNetworkOpenInformation => size_of::<FILE_NETWORK_OPEN_INFORMATION>(),
        FileStatInformation => size_of::<FILE_STAT_INFORMATION>(),
        _ => return None,
    })
}

fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// What the file system answers to a query of `class` on `open` (whose file object is `file_object`), in a
/// buffer of `length` bytes.
///
/// # Errors
/// `STATUS_INVALID_INFO_CLASS`, `STATUS_INFO_LENGTH_MISMATCH`, or the file system's failure.
pub(crate) fn query(
    open: fs::OpenId,
    file_object: *const FILE_OBJECT,
    class: FILE_INFORMATION_CLASS,
    length: usize,
) -> Result<Vec<u8>, NTSTATUS> {
    let needed = query_size(class).ok_or(STATUS_INVALID_INFO_CLASS)?;
    if length < needed {
        return Err(STATUS_INFO_LENGTH_MISMATCH);
    }
    match class {
        FileBasicInformation => {
            let b = fs::query_basic(open)?;
            Ok(bytes_of(&FILE_BASIC_INFORMATION {
                CreationTime: b.creation_time,
                LastAccessTime: b.last_access_time,
                LastWriteTime: b.last_write_time,
                ChangeTime: b.change_time,
                FileAttributes: b.file_attributes,
            }))
        }
        FileStandardInformation => {
            let s = fs::query_standard(open)?;
            Ok(bytes_of(&FILE_STANDARD_INFORMATION {
                AllocationSize: signed(s.allocation_size),
                EndOfFile: signed(s.end_of_file),
                NumberOfLinks: s.number_of_links,
                DeletePending: s.delete_pending,
                Directory: s.directory,
            }))
        }
        FileInternalInformation => Ok(bytes_of(&FILE_INTERNAL_INFORMATION { IndexNumber: signed(fs::file_id(open)?) })),
        FilePositionInformation => {
            // SAFETY: the file object of an open the model tracks.
            let current = unsafe { file_object.as_ref() }.map_or(0, |f| f.CurrentByteOffset);
            Ok(bytes_of(&FILE_POSITION_INFORMATION { CurrentByteOffset: current }))
        }
        FileNetworkOpenInformation => {
            let b = fs::query_basic(open)?;
            let s = fs::query_standard(open)?;
            Ok(bytes_of(&FILE_NETWORK_OPEN_INFORMATION {
                CreationTime: b.creation_time,
                LastAccessTime: b.last_access_time,
                LastWriteTime: b.last_write_time,
                ChangeTime: b.change_time,
                AllocationSize: signed(s.allocation_size),
                EndOfFile: signed(s.end_of_file),
                FileAttributes: b.file_attributes,
            }))
        }
        FileStatInformation => {
            let b = fs::query_basic(open)?;
            let s = fs::query_standard(open)?;
            Ok(bytes_of(&FILE_STAT_INFORMATION {
                FileId: signed(fs::file_id(open)?),
                CreationTime: b.creation_time,
                LastAccessTime: b.last_access_time,
                LastWriteTime: b.last_write_time,
                ChangeTime: b.change_time,
                AllocationSize: signed(s.allocation_size),
                EndOfFile: signed(s.end_of_file),
                FileAttributes: b.file_attributes,
                // The model's reparse points are reported by opens, not by this class: 0 for every file it opens.
                ReparseTag: 0,
                NumberOfLinks: s.number_of_links,
                EffectiveAccess: fs::granted_access(open)?,
            }))
        }
        _ => Err(STATUS_INVALID_INFO_CLASS),
    }
}

/// Resolves the target name of a rename or link: a full object name (`\??\C:\dir\new`) on the same volume, or a
/// bare name in the open's directory. Another volume answers `STATUS_NOT_SAME_DEVICE`.
pub(crate) fn target_name(volume: &Volume, current: &str, name: &str) -> Result<String, NTSTATUS> {
    if name.starts_with('\\') {
        let (target_volume, within) = crate::fltmgr::fileio::resolve_object_name(name)?;
        if target_volume.handle != volume.handle {
            return Err(STATUS_NOT_SAME_DEVICE);
        }
        return Ok(within);
    }
    let parent = current.rsplit_once('\\').map_or("", |(p, _)| p);
    Ok(format!("{parent}\\{name}"))
}

/// What the file system does for a set of `class` with `bytes` on `open`.
///
/// # Errors
/// `STATUS_INVALID_INFO_CLASS`, `STATUS_INFO_LENGTH_MISMATCH`, `STATUS_NOT_SAME_DEVICE`, or the file system's
/// failure.
pub(crate) fn set(
    open: fs::OpenId,
    file_object: *mut FILE_OBJECT,
    volume: &Volume,
    class: FILE_INFORMATION_CLASS,
    bytes: &[u8],
) -> Result<(), NTSTATUS> {
    match class {
        FileBasicInformation => {
            let b: FILE_BASIC_INFORMATION = read_struct(bytes)?;
            fs::set_basic(
                open,
                &fs::BasicInformation {
                    creation_time: b.CreationTime,
                    last_access_time: b.LastAccessTime,
                    last_write_time: b.LastWriteTime,
                    change_time: b.ChangeTime,
                    file_attributes: b.FileAttributes,
                },
            )
        }
        FilePositionInformation => {
            let p: FILE_POSITION_INFORMATION = read_struct(bytes)?;
            if p.CurrentByteOffset < 0 {
                return Err(STATUS_INVALID_PARAMETER);
            }
            // SAFETY: the file object of an open the model tracks; the caller's thread owns the operation.
            if let Some(object) = unsafe { file_object.as_mut() } {
                object.CurrentByteOffset = p.CurrentByteOffset;
            }
            Ok(())
        }
        FileEndOfFileInformation => {
            let e: FILE_END_OF_FILE_INFORMATION = read_struct(bytes)?;
            fs::set_end_of_file(open, u64::try_from(e.EndOfFile).map_err(|_| STATUS_INVALID_PARAMETER)?)
        }
        FileDispositionInformation => {
            // FILE_DISPOSITION_INFORMATION is one BOOLEAN.
            let delete = *bytes.first().ok_or(STATUS_INFO_LENGTH_MISMATCH)?;
            fs::set_delete_disposition(open, delete != 0)
        }
        FileRenameInformation | FileLinkInformation => {
            let (replace, name) = link_or_rename_target(bytes)?;
            let current = fs::name(open)?;
            let target = target_name(volume, &current, &name)?;
            if class == FileRenameInformation {
                fs::rename(open, &target, replace)
            } else {
                fs::link(open, &target, replace)
            }
        }
        _ => Err(STATUS_INVALID_INFO_CLASS),
    }
}

/// The `ReplaceIfExists` flag and the target name of a `FILE_RENAME_INFORMATION` / `FILE_LINK_INFORMATION` buffer.
///
/// # Errors
/// `STATUS_INFO_LENGTH_MISMATCH` for a buffer shorter than its header and name; `STATUS_INVALID_PARAMETER` for an
/// odd name length.
pub(crate) fn link_or_rename_target(bytes: &[u8]) -> Result<(bool, String), NTSTATUS> {
    let header = std::mem::offset_of!(FILE_RENAME_INFORMATION, FileName);
    let replace = *bytes.first().ok_or(STATUS_INFO_LENGTH_MISMATCH)? != 0;
    let length_at = std::mem::offset_of!(FILE_RENAME_INFORMATION, FileNameLength);
    let length_bytes: [u8; 4] =
        bytes.get(length_at..length_at + 4).and_then(|b| b.try_into().ok()).ok_or(STATUS_INFO_LENGTH_MISMATCH)?;
    let name_length = usize::try_from(u32::from_le_bytes(length_bytes)).map_err(|_| STATUS_INVALID_PARAMETER)?;
    let name_bytes = bytes.get(header..header + name_length).ok_or(STATUS_INFO_LENGTH_MISMATCH)?;
    if name_length % 2 != 0 {
        return Err(STATUS_INVALID_PARAMETER);
    }
    let units: Vec<u16> = name_bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
    Ok((replace, String::from_utf16_lossy(&units)))
}

/// A `FILE_RENAME_INFORMATION` / `FILE_LINK_INFORMATION` buffer naming `name`.
#[must_use]
pub fn rename_buffer(name: &str, replace_if_exists: bool) -> Vec<u8> {
    let header = std::mem::offset_of!(FILE_RENAME_INFORMATION, FileName);
    let units: Vec<u16> = name.encode_utf16().collect();
    let name_bytes = units.len() * 2;
    let mut buffer = vec![0u8; (header + name_bytes).max(size_of::<FILE_RENAME_INFORMATION>())];
    buffer[0] = u8::from(replace_if_exists);
    let length_at = std::mem::offset_of!(FILE_RENAME_INFORMATION, FileNameLength);
    buffer[length_at..length_at + 4].copy_from_slice(&u32::try_from(name_bytes).unwrap_or(u32::MAX).to_le_bytes());
    for (i, unit) in units.iter().enumerate() {
        buffer[header + i * 2..header + i * 2 + 2].copy_from_slice(&unit.to_le_bytes());
    }
    buffer
}
