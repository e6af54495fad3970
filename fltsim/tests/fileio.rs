//! Filter-initiated I/O: a filter opens and reads a backing file from its pre-create, below its own instance, as
//! Shunt's forward rules will. The correct way breaks no rule; each wrong way is reported.

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicU8, Ordering},
    },
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    kernel::thread,
    scenario,
    testfilters::build::{END, Table, open_file, operation, registration},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_NO_CALLBACK,
            FLT_REGISTRATION, FLT_RELATED_OBJECTS, FLTFL_IO_OPERATION_NON_CACHED, FltClose, FltReadFileEx,
            FltWriteFileEx,
        },
        System::SystemServices::{IO_FORCE_ACCESS_CHECK, ObfDereferenceObject},
    },
    Win32::Foundation::OBJ_KERNEL_HANDLE,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Below its own instance, with an access check, kernel handle, closed and dereferenced.
    Correct,
    /// Instance NULL: the create starts at the top of the stack and reaches the filter again.
    FromTheTop,
    /// No `IO_FORCE_ACCESS_CHECK` on behalf of a user-mode request.
    NoAccessCheck,
    /// No `OBJ_KERNEL_HANDLE`.
    UserHandle,
    /// Never closes the handle nor dereferences the file object.
    Leak,
    /// Opens the backing from the top for every create, its own included.
    Recurse,
    /// A non-cached read at an odd offset.
    MisalignedNonCached,
    /// `FltWriteFileEx` at `FILE_WRITE_TO_END_OF_FILE`.
    WriteToEndOfFile,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static READ_BACK: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn mode() -> Mode {
    const ALL: [Mode; 8] = [
        Mode::Correct,
        Mode::FromTheTop,
        Mode::NoAccessCheck,
        Mode::UserHandle,
        Mode::Leak,
        Mode::Recurse,
        Mode::MisalignedNonCached,
        Mode::WriteToEndOfFile,
    ];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

fn name_of(data: &FLT_CALLBACK_DATA) -> String {
    // SAFETY: Filter Manager passes this callback's data.
    unsafe { fltsim::testfilters::build::target_name(data) }
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager passes valid callback data.
    let data = unsafe { &*data };
    // SAFETY: and valid related objects.
    let objects = unsafe { &*objects };
    let name = name_of(data);
    if mode() != Mode::Recurse && !name.eq_ignore_ascii_case("\\source.txt") {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    let attributes = if mode() == Mode::UserHandle { 0 } else { OBJ_KERNEL_HANDLE };
    let instance = if matches!(mode(), Mode::FromTheTop | Mode::Recurse) { 0 } else { objects.Instance };
    let flags = if mode() == Mode::NoAccessCheck { 0 } else { IO_FORCE_ACCESS_CHECK };
    let Ok((handle, file_object)) = open_file(objects.Filter, instance, r"\??\C:\backing.txt", attributes, flags)
    else {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    };
    let mut buffer = [0u8; 64];
    let mut read = 0u32;
    let (offset, io_flags) =
        if mode() == Mode::MisalignedNonCached { (3i64, FLTFL_IO_OPERATION_NON_CACHED) } else { (0, 0) };
    // SAFETY: a file object from FltCreateFileEx2 and a local buffer of the given length.
    let status = unsafe {
        FltReadFileEx(
            objects.Instance,
            file_object,
            &raw const offset,
            64,
            buffer.as_mut_ptr().cast(),
            io_flags,
            &raw mut read,
            None,
            std::ptr::null(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if status >= 0 {
        *READ_BACK.lock().expect("lock") = buffer[..read as usize].to_vec();
    }
    if mode() == Mode::WriteToEndOfFile {
        let end = -1i64;
        let mut written = 0u32;
        // SAFETY: as above.
        unsafe {
            FltWriteFileEx(
                objects.Instance,
                file_object,
                &raw const end,
                3,
                b"end".as_ptr().cast(),
                0,
                &raw mut written,
                None,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
    }
    if mode() != Mode::Leak {
        // SAFETY: the handle and the referenced file object from FltCreateFileEx2, released once each.
        unsafe { FltClose(handle) };
        // SAFETY: as above.
        unsafe { ObfDereferenceObject(file_object.cast()) };
    }
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

fn setup(mode: Mode) -> fltsim::LoadedDriver {
    setup_volume(mode).0
}

fn setup_volume(mode: Mode) -> (fltsim::LoadedDriver, io::Volume) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("fileio");
    std::fs::write(root.join("source.txt"), b"source data").expect("seed");
    std::fs::write(root.join("backing.txt"), b"backing data").expect("seed");
    let volume = io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("fileiotest", "FileIo Instance", "135000");
    (fltsim::load("fileiotest", driver_entry).expect("load"), volume)
}

fn open_source() {
    let handle = iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).expect("the source opens");
    iomgr::close(handle);
}

scenario! {
    fn opening_and_reading_below_the_own_instance_breaks_no_rule() {
        let mut driver = setup(Mode::Correct);
        open_source();
        assert_eq!(*READ_BACK.lock().expect("lock"), b"backing data");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_create_from_the_top_of_the_stack_reaches_the_filter_again() {
        let _driver = setup(Mode::FromTheTop);
        open_source();
        assert_eq!(take_rules(), [Rule::ReentrantIo, Rule::ReentrantIo, Rule::ReentrantIo]);
    }
}

scenario! {
    fn a_kernel_open_for_a_user_without_an_access_check_is_reported() {
        let _driver = setup(Mode::NoAccessCheck);
        open_source();
        assert_eq!(take_rules(), [Rule::UncheckedOpenForUser]);
    }
}

scenario! {
    fn a_handle_without_obj_kernel_handle_is_reported() {
        let _driver = setup(Mode::UserHandle);
        open_source();
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    fn files_left_open_at_unload_are_reported() {
        let mut driver = setup(Mode::Leak);
        open_source();
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::FileLeak]);
    }
}

scenario! {
    fn runaway_recursion_is_reported_and_stopped() {
        let _driver = setup(Mode::Recurse);
        let _ = iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default());
        let rules = take_rules();
        assert!(rules.contains(&Rule::RecursiveIo), "{rules:?}");
        assert!(rules.contains(&Rule::ReentrantIo), "{rules:?}");
    }
}

scenario! {
    fn a_misaligned_non_cached_read_is_rejected() {
        let _driver = setup(Mode::MisalignedNonCached);
        open_source();
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
        assert!(READ_BACK.lock().expect("lock").is_empty());
    }
}

scenario! {
    fn write_to_end_of_file_through_flt_write_file_ex_is_rejected() {
        let _driver = setup(Mode::WriteToEndOfFile);
        open_source();
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    fn a_create_with_a_top_level_irp_set_is_reported() {
        let _driver = setup(Mode::Correct);
        thread::with_top_level_irp(0x1000, open_source);
        assert_eq!(take_rules(), [Rule::TopLevelIrpSet]);
    }
}

scenario! {
    fn a_create_inside_a_guarded_region_is_reported() {
        let _driver = setup(Mode::Correct);
        thread::in_guarded_region(open_source);
        assert_eq!(take_rules(), [Rule::ApcsDisabled]);
    }
}

scenario! {
    /// With `IO_FORCE_ACCESS_CHECK` the backing open is checked as the requesting user, in whose thread the
    /// pre-create runs: a user the backing file's ACL does not admit is refused, so the redirect grants nothing
    /// the user lacks; SYSTEM's own open (no user request) goes through.
    fn the_forced_access_check_is_made_as_the_requesting_user() {
        let (_driver, volume) = setup_volume(Mode::Correct);
        let acl = io::fs::Acl { read: vec!["bob".into()], write: vec!["bob".into()] };
        io::fs::set_acl(&volume, "\\backing.txt", acl).expect("acl");
        let alice = fltsim::kernel::process::create(r"\Device\HarddiskVolume1\app.exe", fltsim::kernel::process::Token {
            user: "alice".into(),
            admin: false,
        });
        fltsim::kernel::process::run_as(&alice, open_source);
        assert!(READ_BACK.lock().expect("lock").is_empty(), "alice may not read the backing file");
        let bob = fltsim::kernel::process::create(r"\Device\HarddiskVolume1\app.exe", fltsim::kernel::process::Token {
            user: "bob".into(),
            admin: false,
        });
        fltsim::kernel::process::run_as(&bob, open_source);
        assert_eq!(*READ_BACK.lock().expect("lock"), b"backing data");
        assert_eq!(take_rules(), []);
    }
}
