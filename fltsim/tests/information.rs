//! Query and set information, from a program and from a filter: sizes, rename, delete; a filter's own
//! information calls and built operations (an append at `FILE_WRITE_TO_END_OF_FILE`) on a backing file it opened
//! below itself.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::atomic::{AtomicIsize, AtomicU8, Ordering},
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, info, iomgr},
    scenario,
    testfilters::build::{END, Table, open_file, operation, registration},
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::{
            FILE_STANDARD_INFORMATION, FileDispositionInformation, FileEndOfFileInformation, FileRenameInformation,
            FileStandardInformation,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_FLUSH_TYPE_FILE_DATA_ONLY, FLT_OPERATION_REGISTRATION,
                FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
                FltAllocateCallbackData, FltClose, FltFlushBuffers, FltFlushBuffers2, FltFreeCallbackData,
                FltPerformSynchronousIo, FltQueryInformationFile, FltSetInformationFile,
            },
        },
        System::SystemServices::{FILE_END_OF_FILE_INFORMATION, IO_FORCE_ACCESS_CHECK, ObfDereferenceObject},
    },
    Win32::{
        Foundation::{
            OBJ_KERNEL_HANDLE, STATUS_ACCESS_DENIED, STATUS_INVALID_PARAMETER, STATUS_OBJECT_NAME_NOT_FOUND,
            STATUS_SUCCESS,
        },
        Storage::FileSystem::{
            DELETE, FILE_READ_DATA, FILE_SHARE_DELETE, FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_WRITE_DATA,
        },
    },
};

static LEAK: AtomicU8 = AtomicU8::new(0);
static BACKING_SIZE: AtomicIsize = AtomicIsize::new(-1);

fn standard(bytes: &[u8]) -> FILE_STANDARD_INFORMATION {
    assert!(bytes.len() >= size_of::<FILE_STANDARD_INFORMATION>());
    // SAFETY: the buffer holds a FILE_STANDARD_INFORMATION, as checked above.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: valid callback data from Filter Manager.
    let iopb = unsafe { (*data).Iopb };
    // SAFETY: its parameter block.
    let target = unsafe { (*iopb).TargetFileObject };
    // SAFETY: and the file object being created.
    let name = unsafe { &(*target).FileName };
    // SAFETY: the name holds Length bytes.
    let name =
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) });
    if !name.eq_ignore_ascii_case("\\source.txt") {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    // SAFETY: valid related objects.
    let objects = unsafe { &*objects };
    let (handle, file_object) =
        open_file(objects.Filter, objects.Instance, r"\??\C:\backing.txt", OBJ_KERNEL_HANDLE, IO_FORCE_ACCESS_CHECK)
            .expect("the backing file opens below this filter");

    // Append through a built write at FILE_WRITE_TO_END_OF_FILE.
    let mut built: *mut FLT_CALLBACK_DATA = null_mut();
    // SAFETY: this filter's instance, an open file object, a place for the data.
    assert_eq!(unsafe { FltAllocateCallbackData(objects.Instance, file_object, &raw mut built) }, STATUS_SUCCESS);
    let tail = b"+tail";
    // SAFETY: the data belongs to this filter until freed.
    let block = unsafe { (*built).Iopb.cast_mut() };
    // SAFETY: and so does its parameter block.
    let iopb = unsafe { &mut *block };
    iopb.MajorFunction = 4; // IRP_MJ_WRITE
    iopb.Parameters.Write.Length = 5;
    iopb.Parameters.Write.ByteOffset = -1; // FILE_WRITE_TO_END_OF_FILE
    iopb.Parameters.Write.WriteBuffer = tail.as_ptr().cast_mut().cast();
    // SAFETY: allocated callback data, filled in above.
    unsafe { FltPerformSynchronousIo(built) };
    // SAFETY: the completed data.
    let built_ref = unsafe { &*built };
    // SAFETY: a completed operation's status is the union's status.
    assert_eq!(unsafe { built_ref.IoStatus.Anonymous.Status }, STATUS_SUCCESS);
    if LEAK.load(Ordering::SeqCst) == 0 {
        // SAFETY: the data allocated above, freed once.
        unsafe { FltFreeCallbackData(built) };
    }

    // Its size, below this filter.
    let mut info = [0u8; size_of::<FILE_STANDARD_INFORMATION>()];
    let mut returned = 0u32;
    // SAFETY: a buffer of the class's size.
    let status = unsafe {
        FltQueryInformationFile(
            objects.Instance,
            file_object,
            info.as_mut_ptr().cast(),
            u32::try_from(info.len()).expect("small"),
            FileStandardInformation,
            &raw mut returned,
        )
    };
    assert_eq!(status, STATUS_SUCCESS);
    BACKING_SIZE.store(isize::try_from(standard(&info).EndOfFile).expect("small"), Ordering::SeqCst);

    // Truncate it to 7 bytes.
    let eof = FILE_END_OF_FILE_INFORMATION { EndOfFile: 7 };
    // SAFETY: the structure of the class.
    let status = unsafe {
        FltSetInformationFile(
            objects.Instance,
            file_object,
            (&raw const eof).cast(),
            u32::try_from(size_of::<FILE_END_OF_FILE_INFORMATION>()).expect("small"),
            FileEndOfFileInformation,
        )
    };
    assert_eq!(status, STATUS_SUCCESS);

    // Flush it, fully and data only, below this filter.
    // SAFETY: this filter's instance and an open file object.
    assert_eq!(unsafe { FltFlushBuffers(objects.Instance, file_object) }, STATUS_SUCCESS);
    // SAFETY: as above; no callback data to propagate.
    let status =
        unsafe { FltFlushBuffers2(objects.Instance, file_object, FLT_FLUSH_TYPE_FILE_DATA_ONLY, std::ptr::null()) };
    assert_eq!(status, STATUS_SUCCESS);
    // SAFETY: the handle and the referenced file object, released once each.
    unsafe { FltClose(handle) };
    // SAFETY: as above.
    unsafe { ObfDereferenceObject(file_object.cast()) };
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

fn setup(leak: bool) -> (fltsim::LoadedDriver, std::path::PathBuf) {
    LEAK.store(u8::from(leak), Ordering::SeqCst);
    let root = io::fresh_root("information");
    std::fs::write(root.join("source.txt"), b"source").expect("seed");
    std::fs::write(root.join("backing.txt"), b"backing").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("infotest", "Info Instance", "138000");
    (fltsim::load("infotest", driver_entry).expect("load"), root)
}

scenario! {
    fn a_filter_appends_queries_and_truncates_its_backing_file() {
        let (mut driver, root) = setup(false);
        let handle = iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).expect("open");
        iomgr::close(handle);
        assert_eq!(BACKING_SIZE.load(Ordering::SeqCst), 12, "\"backing\" plus the appended \"+tail\"");
        assert_eq!(std::fs::read(root.join("backing.txt")).expect("host"), b"backing", "then truncated to 7 bytes");
        driver.unload(false).expect("unload");
        let reports = take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
    }
}

scenario! {
    fn callback_data_never_freed_is_reported_at_unload() {
        let (mut driver, _root) = setup(true);
        let handle = iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).expect("open");
        iomgr::close(handle);
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::CallbackDataLeak]);
    }
}

scenario! {
    /// A program's queries and sets go through the filters to the file system: the size, a rename within the
    /// volume, and delete-on-close through the disposition.
    fn a_program_queries_renames_and_deletes() {
        let (_driver, root) = setup(false);
        let params = iomgr::OpenParams {
            desired_access: FILE_READ_DATA | DELETE,
            share_access: FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE,
            ..Default::default()
        };
        let handle = iomgr::create(r"C:\backing.txt", &params).expect("open");
        let bytes = iomgr::query_information(&handle, FileStandardInformation, 64).expect("standard");
        assert_eq!(standard(&bytes).EndOfFile, 7);
        iomgr::set_information(&handle, FileRenameInformation, &info::rename_buffer(r"\??\C:\renamed.txt", false))
            .expect("rename");
        assert!(root.join("renamed.txt").exists() && !root.join("backing.txt").exists());
        iomgr::set_information(&handle, FileDispositionInformation, &[1]).expect("delete disposition");
        iomgr::close(handle);
        assert!(!root.join("renamed.txt").exists(), "deleted when the last handle closed");
        assert_eq!(iomgr::create(r"C:\renamed.txt", &iomgr::OpenParams::default()), Err(STATUS_OBJECT_NAME_NOT_FOUND));
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// `FlushFileBuffers` needs a handle with write or append access; a flush type outside `FLT_FLUSH_TYPE_*` is
    /// reported.
    fn flushes_need_write_access_and_a_known_type() {
        let (_driver, _root) = setup(false);
        let read_only = iomgr::create(r"C:\backing.txt", &iomgr::OpenParams::default()).expect("open");
        assert_eq!(iomgr::flush(&read_only), Err(STATUS_ACCESS_DENIED));
        let writable = iomgr::OpenParams {
            desired_access: FILE_WRITE_DATA,
            share_access: FILE_SHARE_READ | FILE_SHARE_WRITE,
            ..Default::default()
        };
        let writable = iomgr::create(r"C:\backing.txt", &writable).expect("open for writing");
        iomgr::flush(&writable).expect("flush");
        iomgr::close(read_only);
        iomgr::close(writable);
        assert!(take_reports().is_empty());
        // SAFETY: the model checks the type first and reports it.
        let status = unsafe { FltFlushBuffers2(0, std::ptr::null(), 0x10, std::ptr::null()) };
        assert_eq!(status, STATUS_INVALID_PARAMETER);
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}
