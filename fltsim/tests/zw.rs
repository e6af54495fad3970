//! The naive strategy, shown failing: a filter that opens and reads its backing file with `ZwCreateFile` and
//! `ZwReadFile` from its pre-create sees its own I/O again, skips the user's access check, and deadlocks in a
//! guarded region.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::atomic::{AtomicI32, AtomicU32, Ordering},
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    kernel::thread,
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::{
        Foundation::OBJECT_ATTRIBUTES,
        Storage::FileSystem::{
            FILE_OPEN, FILE_SYNCHRONOUS_IO_NONALERT,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS,
                FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
            },
        },
        System::SystemServices::{ZwClose, ZwCreateFile, ZwReadFile},
    },
    Win32::{
        Foundation::{
            HANDLE, OBJ_FORCE_ACCESS_CHECK, OBJ_KERNEL_HANDLE, STATUS_POSSIBLE_DEADLOCK, STATUS_SUCCESS, UNICODE_STRING,
        },
        Storage::FileSystem::{FILE_READ_DATA, FILE_SHARE_READ},
        System::IO::IO_STATUS_BLOCK,
    },
};

static ATTRIBUTES: AtomicU32 = AtomicU32::new(OBJ_KERNEL_HANDLE);
static CREATE_STATUS: AtomicI32 = AtomicI32::new(0);

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let block = unsafe { (*data).Iopb };
    // SAFETY: its parameter block.
    let target = unsafe { (*block).TargetFileObject };
    // SAFETY: the file object being created.
    let name = unsafe { &(*target).FileName };
    // SAFETY: the name holds Length bytes.
    let name =
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) });
    if !name.eq_ignore_ascii_case("\\source.txt") {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    let mut path: Vec<u16> = r"\??\C:\backing.txt".encode_utf16().collect();
    let bytes = u16::try_from(path.len() * 2).expect("short");
    let object_name = UNICODE_STRING { Length: bytes, MaximumLength: bytes, Buffer: path.as_mut_ptr() };
    let attributes = OBJECT_ATTRIBUTES {
        Length: u32::try_from(size_of::<OBJECT_ATTRIBUTES>()).expect("small"),
        RootDirectory: null_mut(),
        ObjectName: &raw const object_name,
        Attributes: ATTRIBUTES.load(Ordering::SeqCst),
        SecurityDescriptor: std::ptr::null(),
        SecurityQualityOfService: std::ptr::null(),
    };
    let mut handle: HANDLE = null_mut();
    // SAFETY: all-zero is a valid IO_STATUS_BLOCK.
    let mut io_status: IO_STATUS_BLOCK = unsafe { std::mem::zeroed() };
    // SAFETY: live locals.
    let status = unsafe {
        ZwCreateFile(
            &raw mut handle,
            FILE_READ_DATA,
            &raw const attributes,
            &raw mut io_status,
            std::ptr::null(),
            0,
            FILE_SHARE_READ,
            FILE_OPEN,
            FILE_SYNCHRONOUS_IO_NONALERT,
            std::ptr::null(),
            0,
        )
    };
    CREATE_STATUS.store(status, Ordering::SeqCst);
    if status >= 0 {
        let mut buffer = [0u8; 16];
        let offset = 0i64;
        // SAFETY: the handle just opened and a local buffer.
        unsafe {
            ZwReadFile(
                handle,
                null_mut(),
                None,
                std::ptr::null(),
                &raw mut io_status,
                buffer.as_mut_ptr().cast(),
                16,
                &raw const offset,
                std::ptr::null(),
            )
        };
        // SAFETY: the handle just opened, closed once.
        unsafe { ZwClose(handle) };
    }
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

fn setup(attributes: u32) -> fltsim::LoadedDriver {
    ATTRIBUTES.store(attributes, Ordering::SeqCst);
    let root = io::fresh_root("zw");
    std::fs::write(root.join("source.txt"), b"source").expect("seed");
    std::fs::write(root.join("backing.txt"), b"backing").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("zwtest", "Zw Instance", "136500");
    fltsim::load("zwtest", driver_entry).expect("load")
}

fn open_source() {
    let handle = iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).expect("open");
    iomgr::close(handle);
}

scenario! {
    fn zw_io_from_a_callback_reenters_the_filter_and_skips_the_users_access_check() {
        let _driver = setup(OBJ_KERNEL_HANDLE);
        open_source();
        assert_eq!(CREATE_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        let rules = take_rules();
        assert_eq!(rules.first(), Some(&Rule::UncheckedOpenForUser), "{rules:?}");
        assert!(rules.contains(&Rule::ReentrantIo), "{rules:?}");
    }
}

scenario! {
    fn forcing_the_access_check_does_not_stop_the_reentry() {
        let _driver = setup(OBJ_KERNEL_HANDLE | OBJ_FORCE_ACCESS_CHECK);
        open_source();
        let rules = take_rules();
        assert!(!rules.contains(&Rule::UncheckedOpenForUser), "{rules:?}");
        assert!(rules.contains(&Rule::ReentrantIo), "{rules:?}");
    }
}

scenario! {
    fn zw_create_in_a_guarded_region_would_wait_forever() {
        let _driver = setup(OBJ_KERNEL_HANDLE | OBJ_FORCE_ACCESS_CHECK);
        thread::in_guarded_region(open_source);
        assert_eq!(CREATE_STATUS.load(Ordering::SeqCst), STATUS_POSSIBLE_DEADLOCK);
        assert_eq!(take_rules(), [Rule::WaitNeedsDisabledApc]);
    }
}
