//! Failing a create in post-create: `FltCancelFileOpen` first, then an error status (the protocol of the docs page
//! "Failing an I/O operation in a postoperation callback routine"); and `FltGetVolumeProperties`.

use std::{
    ffi::c_void,
    sync::atomic::{AtomicU8, AtomicU32, Ordering},
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_FINISHED_PROCESSING,
            FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
            FLT_VOLUME_PROPERTIES, FltCancelFileOpen, FltGetVolumeProperties,
        },
        System::SystemServices::{FILE_WORD_ALIGNMENT, FO_FILE_OPEN_CANCELLED},
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_ACCESS_DENIED, STATUS_BUFFER_OVERFLOW, STATUS_BUFFER_TOO_SMALL, STATUS_SUCCESS,
            UNICODE_STRING,
        },
        Storage::FileSystem::{FILE_READ_DATA, FILE_SHARE_NONE},
        System::Ioctl::FILE_DEVICE_DISK_FILE_SYSTEM,
    },
};

/// What the filter does to opens of `deny.txt`.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Cancels the open, then fails the create with `STATUS_ACCESS_DENIED`: the documented protocol.
    CancelThenFail = 0,
    /// Fails the create without cancelling: the file system's open is never closed.
    FailWithoutCancel = 1,
    /// Cancels the open and leaves the success status.
    CancelAndSucceed = 2,
    /// Calls `FltCancelFileOpen` from pre-create.
    CancelInPreCreate = 3,
}

static MODE: AtomicU8 = AtomicU8::new(0);
/// The file object flags the filter saw after cancelling.
static FLAGS_AFTER_CANCEL: AtomicU32 = AtomicU32::new(0);

fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        1 => Mode::FailWithoutCancel,
        2 => Mode::CancelAndSucceed,
        3 => Mode::CancelInPreCreate,
        _ => Mode::CancelThenFail,
    }
}

fn is_deny(data: *const FLT_CALLBACK_DATA) -> bool {
    // SAFETY: Filter Manager's callback data.
    let iopb = unsafe { (*data).Iopb };
    // SAFETY: and its parameter block.
    let file_object = unsafe { (*iopb).TargetFileObject };
    // SAFETY: a model file object whose name holds Length bytes.
    let name = unsafe { &(*file_object).FileName };
    // SAFETY: as above.
    let units = unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) };
    String::from_utf16_lossy(units).ends_with("deny.txt")
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    if mode() == Mode::CancelInPreCreate && is_deny(data) {
        // SAFETY: valid related objects from Filter Manager.
        let objects = unsafe { &*objects };
        // SAFETY: the model reports the call, which is the point.
        unsafe { FltCancelFileOpen(objects.Instance, objects.FileObject) };
    }
    FLT_PREOP_SUCCESS_WITH_CALLBACK
}

unsafe extern "system" fn post_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data, ours to change in post-create.
    let data = unsafe { &mut *data };
    // SAFETY: as above.
    let succeeded = unsafe { data.IoStatus.Anonymous.Status } >= 0;
    if !succeeded || !is_deny(data) {
        return FLT_POSTOP_FINISHED_PROCESSING;
    }
    // SAFETY: valid related objects from Filter Manager.
    let objects = unsafe { &*objects };
    let cancel = matches!(mode(), Mode::CancelThenFail | Mode::CancelAndSucceed);
    if cancel {
        // SAFETY: this filter's instance and the file object the file system just opened, with no handle yet.
        unsafe { FltCancelFileOpen(objects.Instance, objects.FileObject) };
        // SAFETY: the file object stays valid for the rest of the create.
        let flags = unsafe { (*objects.FileObject).Flags };
        FLAGS_AFTER_CANCEL.store(flags, Ordering::SeqCst);
    }
    if matches!(mode(), Mode::CancelThenFail | Mode::FailWithoutCancel) {
        data.IoStatus.Anonymous.Status = STATUS_ACCESS_DENIED;
        data.IoStatus.Information = 0;
    }
    FLT_POSTOP_FINISHED_PROCESSING
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), Some(post_create)), operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

fn mount() -> io::Volume {
    let root = io::fresh_root("cancel");
    std::fs::write(root.join("deny.txt"), b"secret").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root))
}

/// Loads the filter in `mode`, opens `deny.txt`, then opens it again exclusively: the second open succeeds only if
/// the first one's file-system open was closed. Returns the first open's result and the reports.
fn deny_then_reopen(mode: Mode) -> (Result<(), NTSTATUS>, Vec<Rule>) {
    mount();
    MODE.store(mode as u8, Ordering::SeqCst);
    fltsim::registry::install_minifilter_service("canceltest", "Cancel Instance", "135000");
    let mut driver = fltsim::load("canceltest", driver_entry).expect("load");
    let exclusive =
        iomgr::OpenParams { desired_access: FILE_READ_DATA, share_access: FILE_SHARE_NONE, ..Default::default() };
    let first = iomgr::create(r"C:\deny.txt", &exclusive).map(iomgr::close);
    driver.unload(false).expect("unload");
    let again = iomgr::create(r"C:\deny.txt", &exclusive).expect("nothing holds the file any more");
    iomgr::close(again);
    (first, take_rules())
}

scenario! {
    /// The documented protocol: the file system's open is closed, the file object is marked cancelled, the caller
    /// sees the filter's error, and nothing is reported.
    fn a_create_cancelled_then_failed_closes_the_file_systems_open() {
        let (first, rules) = deny_then_reopen(Mode::CancelThenFail);
        assert_eq!(first, Err(STATUS_ACCESS_DENIED));
        assert!(rules.is_empty(), "{rules:?}");
        let flags = FLAGS_AFTER_CANCEL.load(Ordering::SeqCst);
        assert_ne!(flags & FO_FILE_OPEN_CANCELLED, 0, "FltCancelFileOpen marks the file object");
    }
}

scenario! {
    fn failing_a_create_without_cancelling_is_reported() {
        let (first, rules) = deny_then_reopen(Mode::FailWithoutCancel);
        assert_eq!(first, Err(STATUS_ACCESS_DENIED));
        assert_eq!(rules, [Rule::CreateFailureProtocol]);
    }
}

scenario! {
    fn cancelling_and_leaving_success_is_reported() {
        let (first, rules) = deny_then_reopen(Mode::CancelAndSucceed);
        assert!(first.is_err(), "a cancelled open is never handed to the caller");
        assert_eq!(rules, [Rule::CreateFailureProtocol]);
    }
}

scenario! {
    fn cancelling_from_pre_create_is_reported_and_does_nothing() {
        let (first, rules) = deny_then_reopen(Mode::CancelInPreCreate);
        assert_eq!(first, Ok(()), "the open goes on");
        assert_eq!(rules, [Rule::CreateFailureProtocol]);
    }
}

fn properties(volume: &io::Volume, length: usize) -> (NTSTATUS, u32, Vec<u64>) {
    let mut buffer = vec![0u64; length.div_ceil(8)];
    let mut returned = 0u32;
    // SAFETY: an aligned buffer of at least `length` bytes and a place for the length.
    let status = unsafe {
        FltGetVolumeProperties(
            volume.handle,
            buffer.as_mut_ptr().cast(),
            u32::try_from(length).expect("small"),
            &raw mut returned,
        )
    };
    (status, returned, buffer)
}

fn name(string: &UNICODE_STRING) -> String {
    if string.Length == 0 {
        return String::new();
    }
    // SAFETY: the model points the string into the caller's buffer, still alive.
    String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(string.Buffer, usize::from(string.Length / 2)) })
}

scenario! {
    /// Zero length asks for the size; the fixed part alone comes back with a warning; a big enough buffer gets the
    /// names too, pointing into it.
    fn volume_properties_follow_the_length_protocol() {
        let volume = io::mount(VolumeSpec { sector_size: 4096, ..VolumeSpec::ntfs('V', std::env::temp_dir()) });
        let fixed = size_of::<FLT_VOLUME_PROPERTIES>();
        let (status, needed, _) = properties(&volume, 0);
        assert_eq!(status, STATUS_BUFFER_TOO_SMALL);
        let needed = usize::try_from(needed).expect("small");
        assert!(needed > fixed);

        let (status, returned, buffer) = properties(&volume, fixed);
        assert_eq!(status, STATUS_BUFFER_OVERFLOW, "the fixed part fits, the names do not");
        assert_eq!(usize::try_from(returned).expect("small"), fixed);
        // SAFETY: the buffer holds an FLT_VOLUME_PROPERTIES the model wrote.
        let fixed_only = unsafe { &*buffer.as_ptr().cast::<FLT_VOLUME_PROPERTIES>() };
        assert_eq!(fixed_only.SectorSize, 4096);
        assert_eq!(fixed_only.RealDeviceName.Length, 0);

        let (status, returned, buffer) = properties(&volume, needed);
        assert_eq!(status, STATUS_SUCCESS);
        assert_eq!(usize::try_from(returned).expect("small"), needed);
        // SAFETY: as above.
        let full = unsafe { &*buffer.as_ptr().cast::<FLT_VOLUME_PROPERTIES>() };
        assert_eq!(full.DeviceType, FILE_DEVICE_DISK_FILE_SYSTEM);
        assert_eq!(full.AlignmentRequirement, FILE_WORD_ALIGNMENT);
        assert_eq!(name(&full.FileSystemDriverName), r"\FileSystem\Ntfs");
        assert_eq!(name(&full.RealDeviceName), volume.device_name);
        assert!(take_reports().is_empty());

        let (status, _, _) = properties(&volume, fixed - 1);
        assert_eq!(status, STATUS_BUFFER_TOO_SMALL);
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}
