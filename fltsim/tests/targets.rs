//! Opens the I/O manager makes that filters must expect: the target directory of a rename or link to a full name
//! (`SL_OPEN_TARGET_DIRECTORY`, handed to the set as `ParentOfTarget`), and opens by file ID, whose file object
//! names the ID's bytes.

use std::{ffi::c_void, sync::Mutex};

use fltsim::{
    io::{self, VolumeSpec, info, iomgr},
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_reports,
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::{
            FILE_OPEN_BY_FILE_ID, FileInternalInformation, FileRenameInformation,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_POSTOP_CALLBACK_STATUS,
                FLT_POSTOP_FINISHED_PROCESSING, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_NO_CALLBACK,
                FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
            },
        },
        System::SystemServices::SL_OPEN_TARGET_DIRECTORY,
    },
    Win32::{
        Foundation::STATUS_NOT_SAME_DEVICE,
        Storage::FileSystem::{DELETE, FILE_READ_DATA, FILE_SHARE_DELETE, FILE_SHARE_READ, FILE_SHARE_WRITE},
        System::WindowsProgramming::{FILE_DOES_NOT_EXIST, FILE_EXISTS},
    },
};

/// What the filter saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    /// A pre-create: the file object's name as UTF-16 units, whether `SL_OPEN_TARGET_DIRECTORY` is set, whether
    /// `FILE_OPEN_BY_FILE_ID` is.
    Create { name: Vec<u16>, target_directory: bool, by_id: bool },
    /// A post-create of a target-directory open: its `IoStatus.Information`.
    TargetOpened(usize),
    /// A pre-set of a rename: whether `ParentOfTarget` was set.
    Rename { parent_of_target: bool },
}

static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

fn record(seen: Seen) {
    SEEN.lock().expect("seen").push(seen);
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let iopb = unsafe { (*data).Iopb };
    // SAFETY: and its parameter block.
    let iopb = unsafe { &*iopb };
    // SAFETY: the create's file object.
    let name = unsafe { (*iopb.TargetFileObject).FileName };
    // SAFETY: a model file object's name holds Length bytes.
    let units = unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) }.to_vec();
    let target_directory = u32::from(iopb.OperationFlags) & SL_OPEN_TARGET_DIRECTORY != 0;
    // SAFETY: the union holds the Create parameters for IRP_MJ_CREATE.
    let options = unsafe { iopb.Parameters.Create.Options };
    record(Seen::Create { name: units, target_directory, by_id: options & FILE_OPEN_BY_FILE_ID != 0 });
    if target_directory { FLT_PREOP_SUCCESS_WITH_CALLBACK } else { FLT_PREOP_SUCCESS_NO_CALLBACK }
}

unsafe extern "system" fn post_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let data = unsafe { &*data };
    record(Seen::TargetOpened(data.IoStatus.Information));
    FLT_POSTOP_FINISHED_PROCESSING
}

unsafe extern "system" fn pre_set_information(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let iopb = unsafe { (*data).Iopb };
    // SAFETY: and its parameter block.
    let iopb = unsafe { &*iopb };
    // SAFETY: the union holds the SetFileInformation parameters for IRP_MJ_SET_INFORMATION.
    let set = unsafe { iopb.Parameters.SetFileInformation };
    if set.FileInformationClass == FileRenameInformation {
        record(Seen::Rename { parent_of_target: !set.ParentOfTarget.is_null() });
    }
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 3]> = Table([
    operation(0, Some(pre_create), Some(post_create)),
    operation(6, Some(pre_set_information), None),
    operation(END, None, None),
]);
static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

fn units(text: &str) -> Vec<u16> {
    text.encode_utf16().collect()
}

fn setup() -> fltsim::LoadedDriver {
    let root = io::fresh_root("targets");
    std::fs::create_dir_all(root.join("a")).expect("volume root");
    std::fs::create_dir_all(root.join("b")).expect("directory");
    std::fs::write(root.join("a").join("file.txt"), b"data").expect("seed");
    std::fs::write(root.join("b").join("taken.txt"), b"other").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    let other = root.with_extension("other");
    std::fs::create_dir_all(&other).expect("second volume");
    io::mount(VolumeSpec::ntfs('D', &other));
    fltsim::registry::install_minifilter_service("targettest", "Target Instance", "137000");
    fltsim::load("targettest", driver_entry).expect("load")
}

fn open_for_rename() -> iomgr::Handle {
    let params = iomgr::OpenParams {
        desired_access: FILE_READ_DATA | DELETE,
        share_access: FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
        ..Default::default()
    };
    iomgr::create(r"C:\a\file.txt", &params).expect("open")
}

scenario! {
    /// A rename to a full name opens the target's directory first (filters see `SL_OPEN_TARGET_DIRECTORY` and
    /// learn whether the name exists), and the set carries it as `ParentOfTarget`; a bare name needs no such open;
    /// a target on another volume fails before any IRP.
    fn a_rename_to_a_full_name_opens_its_target_directory_first() {
        let mut driver = setup();
        let handle = open_for_rename();
        SEEN.lock().expect("seen").clear();
        iomgr::set_information(&handle, FileRenameInformation, &info::rename_buffer(r"\??\C:\b\moved.txt", false))
            .expect("rename into b");
        iomgr::set_information(&handle, FileRenameInformation, &info::rename_buffer(r"\??\C:\b\taken.txt", true))
            .expect("rename over an existing file");
        iomgr::set_information(&handle, FileRenameInformation, &info::rename_buffer("again.txt", false))
            .expect("rename in place");
        let across = info::rename_buffer(r"\??\D:\x.txt", false);
        assert_eq!(iomgr::set_information(&handle, FileRenameInformation, &across), Err(STATUS_NOT_SAME_DEVICE));
        iomgr::close(handle);
        driver.unload(false).expect("unload");
        let target = |name: &str| Seen::Create { name: units(name), target_directory: true, by_id: false };
        assert_eq!(
            *SEEN.lock().expect("seen"),
            [
                target(r"\b\moved.txt"),
                Seen::TargetOpened(FILE_DOES_NOT_EXIST as usize),
                Seen::Rename { parent_of_target: true },
                target(r"\b\taken.txt"),
                Seen::TargetOpened(FILE_EXISTS as usize),
                Seen::Rename { parent_of_target: true },
                Seen::Rename { parent_of_target: false },
            ]
        );
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// An open by file ID reaches the filter with the ID's eight bytes as the name and `FILE_OPEN_BY_FILE_ID` set,
    /// and opens the file the ID belongs to.
    fn an_open_by_file_id_names_the_id_and_opens_that_file() {
        let mut driver = setup();
        let handle = iomgr::create(r"C:\a\file.txt", &iomgr::OpenParams::default()).expect("open by name");
        let internal = iomgr::query_information(&handle, FileInternalInformation, 8).expect("file ID");
        let id = u64::from_le_bytes(internal.try_into().expect("eight bytes"));
        iomgr::close(handle);
        SEEN.lock().expect("seen").clear();
        let by_id = iomgr::create_by_file_id("C:", id, &iomgr::OpenParams::default()).expect("open by ID");
        assert_eq!(iomgr::read(&by_id, Some(0), 4).expect("read"), b"data");
        iomgr::close(by_id);
        assert_eq!(iomgr::create_by_file_id("C:", 0x7777, &iomgr::OpenParams::default()).err().map(|s| s < 0), Some(true));
        driver.unload(false).expect("unload");
        let id_units: Vec<u16> = id.to_le_bytes().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let seen = SEEN.lock().expect("seen").clone();
        assert_eq!(seen.first(), Some(&Seen::Create { name: id_units, target_directory: false, by_id: true }));
        assert!(take_reports().is_empty());
    }
}
