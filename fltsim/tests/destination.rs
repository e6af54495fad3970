//! `FltGetDestinationFileNameInformation`: the full name a rename or hard link targets, as a filter asks for it in
//! its pre-set-information callback.

use std::{ffi::c_void, ptr::null_mut, sync::Mutex};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, info, iomgr},
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::Storage::FileSystem::{
        FILE_RENAME_INFORMATION, FileLinkInformation, FileRenameInformation,
        Minifilters::{
            FLT_CALLBACK_DATA, FLT_FILE_NAME_INFORMATION, FLT_FILE_NAME_NORMALIZED, FLT_FILE_NAME_OPENED,
            FLT_FILE_NAME_QUERY_DEFAULT, FLT_FILE_NAME_SHORT, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS,
            FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltGetDestinationFileNameInformation,
            FltReleaseFileNameInformation,
        },
    },
    Win32::{
        Foundation::{NTSTATUS, STATUS_FLT_INVALID_NAME_REQUEST, STATUS_NOT_SAME_DEVICE, STATUS_SUCCESS},
        Storage::FileSystem::{DELETE, FILE_READ_DATA, FILE_SHARE_DELETE, FILE_SHARE_READ, FILE_SHARE_WRITE},
    },
};

/// A destination name, or why there is none.
type Name = Result<String, NTSTATUS>;
/// What the filter learnt per rename or link: (normalized, opened, status with the short format, status for a name
/// on another volume).
static SEEN: Mutex<Vec<(Name, Name, NTSTATUS, NTSTATUS)>> = Mutex::new(Vec::new());

fn destination(objects: &FLT_RELATED_OBJECTS, rename: &FILE_RENAME_INFORMATION, options: u32) -> Name {
    // SAFETY: the buffer's name is FileNameLength bytes long.
    let name = unsafe {
        std::slice::from_raw_parts(rename.FileName.as_ptr(), usize::try_from(rename.FileNameLength / 2).unwrap_or(0))
    };
    destination_of(objects, name, options)
}

fn destination_of(objects: &FLT_RELATED_OBJECTS, name: &[u16], options: u32) -> Name {
    let mut info: *mut FLT_FILE_NAME_INFORMATION = null_mut();
    // SAFETY: the operation's instance and file object; the name is the buffer's, FileNameLength bytes long.
    let status = unsafe {
        FltGetDestinationFileNameInformation(
            objects.Instance,
            objects.FileObject,
            null_mut(),
            name.as_ptr(),
            u32::try_from(name.len() * 2).unwrap_or(0),
            options,
            &raw mut info,
        )
    };
    if status != STATUS_SUCCESS {
        return Err(status);
    }
    // SAFETY: a block the model returned, live until released below.
    let name = unsafe { &(*info).Name };
    // SAFETY: the block's name holds Length bytes.
    let units = unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) };
    let text = String::from_utf16_lossy(units);
    // SAFETY: the reference this call returned, released once.
    unsafe { FltReleaseFileNameInformation(info) };
    Ok(text)
}

unsafe extern "system" fn pre_set_information(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let iopb = unsafe { (*data).Iopb };
    // SAFETY: and its parameter block.
    let iopb = unsafe { &*iopb };
    // SAFETY: the union holds the SetFileInformation parameters for IRP_MJ_SET_INFORMATION.
    let set = unsafe { iopb.Parameters.SetFileInformation };
    if set.FileInformationClass != FileRenameInformation && set.FileInformationClass != FileLinkInformation {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    // SAFETY: a rename or link buffer, which starts with FILE_RENAME_INFORMATION's layout.
    let rename = unsafe { &*set.InfoBuffer.cast::<FILE_RENAME_INFORMATION>() };
    // SAFETY: valid related objects from Filter Manager.
    let objects = unsafe { &*objects };
    let normalized = destination(objects, rename, FLT_FILE_NAME_NORMALIZED | FLT_FILE_NAME_QUERY_DEFAULT);
    let opened = destination(objects, rename, FLT_FILE_NAME_OPENED | FLT_FILE_NAME_QUERY_DEFAULT);
    let short = destination(objects, rename, FLT_FILE_NAME_SHORT | FLT_FILE_NAME_QUERY_DEFAULT).err().unwrap_or(0);
    let elsewhere: Vec<u16> = r"\??\D:\x.txt".encode_utf16().collect();
    let across =
        destination_of(objects, &elsewhere, FLT_FILE_NAME_NORMALIZED | FLT_FILE_NAME_QUERY_DEFAULT).err().unwrap_or(0);
    SEEN.lock().expect("seen").push((normalized, opened, short, across));
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(6, Some(pre_set_information), None), operation(END, None, None)]);
static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

scenario! {
    /// A bare name lands in the file's directory, a full name where it says; the normalized form expands the
    /// parent's short name and takes its stored case, the opened form keeps the caller's spelling; the short format
    /// is refused as documented; a destination on another volume fails as the rename does (whose target-directory
    /// open fails before the filter sees the set).
    fn destination_names_follow_the_format_and_the_target() {
        let root = io::fresh_root("destination");
        std::fs::create_dir_all(root.join("LongDirectory")).expect("volume root");
        std::fs::write(root.join("LongDirectory").join("file.txt"), b"data").expect("seed");
        io::mount(VolumeSpec::ntfs('C', &root));
        let other = root.with_extension("other");
        std::fs::create_dir_all(&other).expect("second volume");
        io::mount(VolumeSpec::ntfs('D', &other));
        fltsim::registry::install_minifilter_service("desttest", "Destination Instance", "136000");
        let mut driver = fltsim::load("desttest", driver_entry).expect("load");

        let params = iomgr::OpenParams {
            desired_access: FILE_READ_DATA | DELETE,
            share_access: FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
            ..Default::default()
        };
        let handle = iomgr::create(r"C:\LONGDI~1\file.txt", &params).expect("open by the short directory name");
        iomgr::set_information(&handle, FileRenameInformation, &info::rename_buffer("renamed.txt", false))
            .expect("rename in place");
        iomgr::set_information(&handle, FileLinkInformation, &info::rename_buffer(r"\??\C:\longdirectory\link.txt", false))
            .expect("link by full name");
        let across = iomgr::set_information(&handle, FileRenameInformation, &info::rename_buffer(r"\??\D:\x.txt", false));
        assert_eq!(across, Err(STATUS_NOT_SAME_DEVICE));
        iomgr::close(handle);
        driver.unload(false).expect("unload");

        let seen = SEEN.lock().expect("seen").clone();
        let volume = r"\Device\HarddiskVolume1";
        assert_eq!(
            seen,
            [
                (
                    Ok(format!(r"{volume}\LongDirectory\renamed.txt")),
                    Ok(format!(r"{volume}\LONGDI~1\renamed.txt")),
                    STATUS_FLT_INVALID_NAME_REQUEST,
                    STATUS_NOT_SAME_DEVICE,
                ),
                (
                    Ok(format!(r"{volume}\LongDirectory\link.txt")),
                    Ok(format!(r"{volume}\longdirectory\link.txt")),
                    STATUS_FLT_INVALID_NAME_REQUEST,
                    STATUS_NOT_SAME_DEVICE,
                ),
            ]
        );
        let rules: Vec<Rule> = take_rules();
        assert!(rules.is_empty(), "{rules:?}");
    }
}
