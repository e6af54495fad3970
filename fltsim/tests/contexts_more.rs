//! Instance and volume contexts: a filter that sets them in InstanceSetup finds them in its callbacks and sees them
//! cleaned up when it unloads; `KEEP_IF_EXISTS`/`REPLACE_IF_EXISTS` behave as documented; a wrong context type and
//! a leaked reference are reported.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::atomic::{AtomicIsize, AtomicU8, AtomicUsize, Ordering},
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, info, iomgr},
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::Storage::FileSystem::{
        FileLinkInformation,
        Minifilters::{
            FLT_CALLBACK_DATA, FLT_CONTEXT_END, FLT_CONTEXT_REGISTRATION, FLT_FILE_CONTEXT, FLT_INSTANCE_CONTEXT,
            FLT_OPERATION_REGISTRATION, FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_FINISHED_PROCESSING,
            FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_PREOP_SUCCESS_WITH_CALLBACK,
            FLT_REGISTRATION, FLT_RELATED_OBJECTS, FLT_SET_CONTEXT_KEEP_IF_EXISTS, FLT_SET_CONTEXT_OPERATION,
            FLT_SET_CONTEXT_REPLACE_IF_EXISTS, FLT_STREAM_CONTEXT, FLT_VOLUME_CONTEXT, FltAllocateContext,
            FltGetFileContext, FltGetInstanceContext, FltGetVolumeContext, FltReleaseContext, FltSetFileContext,
            FltSetInstanceContext, FltSetVolumeContext, FltSupportsFileContexts, PFLT_CONTEXT,
        },
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND, STATUS_FLT_CONTEXT_ALREADY_DEFINED,
            STATUS_FLT_DO_NOT_ATTACH, STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND, STATUS_SUCCESS,
        },
        Storage::{
            FileSystem::{FILE_READ_DATA, FILE_WRITE_ATTRIBUTES},
            InstallableFileSystems::FLT_FILESYSTEM_TYPE,
        },
    },
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// InstanceSetup sets both contexts; pre-create finds them.
    SetInSetup,
    /// InstanceSetup sets nothing; the test body sets and gets.
    Nothing,
    /// As `SetInSetup`, and pre-create keeps the instance context it got.
    LeakInPreCreate,
    /// InstanceSetup sets an instance context, then refuses the volume.
    RefuseAfterSetting,
    /// Post-create gets the file's context, setting one when there is none.
    FileContexts,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static INSTANCE: AtomicIsize = AtomicIsize::new(0);
static VOLUME: AtomicIsize = AtomicIsize::new(0);
static INSTANCE_CLEANUPS: AtomicUsize = AtomicUsize::new(0);
static VOLUME_CLEANUPS: AtomicUsize = AtomicUsize::new(0);
static FOUND_IN_CREATE: AtomicUsize = AtomicUsize::new(0);
static FILE_CLEANUPS: AtomicUsize = AtomicUsize::new(0);
static FILE_SETS: AtomicUsize = AtomicUsize::new(0);
static FILE_FOUND: AtomicUsize = AtomicUsize::new(0);
static SUPPORTED_IN_PRE_CREATE: AtomicUsize = AtomicUsize::new(0);
static SUPPORTED_IN_POST_CREATE: AtomicUsize = AtomicUsize::new(0);

fn mode() -> Mode {
    const ALL: [Mode; 5] =
        [Mode::SetInSetup, Mode::Nothing, Mode::LeakInPreCreate, Mode::RefuseAfterSetting, Mode::FileContexts];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

fn allocate_status(context_type: u32) -> (NTSTATUS, PFLT_CONTEXT) {
    let mut context: PFLT_CONTEXT = null_mut();
    // SAFETY: this filter and a place for the result.
    let status = unsafe {
        FltAllocateContext(
            FILTER.load(Ordering::SeqCst),
            u16::try_from(context_type).expect("small"),
            16,
            0,
            &raw mut context,
        )
    };
    (status, context)
}

fn allocate(context_type: u32) -> PFLT_CONTEXT {
    let (status, context) = allocate_status(context_type);
    assert_eq!(status, STATUS_SUCCESS);
    context
}

fn release(context: PFLT_CONTEXT) {
    // SAFETY: a reference this test holds.
    unsafe { FltReleaseContext(context) };
}

fn set_instance(operation: FLT_SET_CONTEXT_OPERATION, context: PFLT_CONTEXT, old: *mut PFLT_CONTEXT) -> NTSTATUS {
    // SAFETY: the instance InstanceSetup saw; `old` is NULL or a place for a context.
    unsafe { FltSetInstanceContext(INSTANCE.load(Ordering::SeqCst), operation, context, old) }
}

fn set_volume(operation: FLT_SET_CONTEXT_OPERATION, context: PFLT_CONTEXT, old: *mut PFLT_CONTEXT) -> NTSTATUS {
    // SAFETY: the volume InstanceSetup saw; `old` is NULL or a place for a context.
    unsafe { FltSetVolumeContext(VOLUME.load(Ordering::SeqCst), operation, context, old) }
}

fn get_instance() -> Result<PFLT_CONTEXT, NTSTATUS> {
    let mut context: PFLT_CONTEXT = null_mut();
    // SAFETY: the instance InstanceSetup saw and a place for the context.
    let status = unsafe { FltGetInstanceContext(INSTANCE.load(Ordering::SeqCst), &raw mut context) };
    if status == STATUS_SUCCESS { Ok(context) } else { Err(status) }
}

fn get_volume() -> Result<PFLT_CONTEXT, NTSTATUS> {
    let mut context: PFLT_CONTEXT = null_mut();
    // SAFETY: this filter, the volume InstanceSetup saw and a place for the context.
    let status =
        unsafe { FltGetVolumeContext(FILTER.load(Ordering::SeqCst), VOLUME.load(Ordering::SeqCst), &raw mut context) };
    if status == STATUS_SUCCESS { Ok(context) } else { Err(status) }
}

unsafe extern "system" fn cleanup(_context: PFLT_CONTEXT, context_type: u16) {
    let counter = match u32::from(context_type) {
        FLT_INSTANCE_CONTEXT => &INSTANCE_CLEANUPS,
        FLT_FILE_CONTEXT => &FILE_CLEANUPS,
        _ => &VOLUME_CLEANUPS,
    };
    counter.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "system" fn setup(
    objects: *const FLT_RELATED_OBJECTS,
    _flags: u32,
    _device_type: u32,
    _file_system: FLT_FILESYSTEM_TYPE,
) -> NTSTATUS {
    // SAFETY: valid related objects from Filter Manager.
    let objects = unsafe { &*objects };
    INSTANCE.store(objects.Instance, Ordering::SeqCst);
    VOLUME.store(objects.Volume, Ordering::SeqCst);
    if matches!(mode(), Mode::Nothing | Mode::FileContexts) {
        return STATUS_SUCCESS;
    }
    let context = allocate(FLT_INSTANCE_CONTEXT);
    assert_eq!(set_instance(FLT_SET_CONTEXT_KEEP_IF_EXISTS, context, null_mut()), STATUS_SUCCESS);
    release(context);
    if mode() == Mode::RefuseAfterSetting {
        return STATUS_FLT_DO_NOT_ATTACH;
    }
    let context = allocate(FLT_VOLUME_CONTEXT);
    assert_eq!(set_volume(FLT_SET_CONTEXT_KEEP_IF_EXISTS, context, null_mut()), STATUS_SUCCESS);
    release(context);
    STATUS_SUCCESS
}

unsafe extern "system" fn pre_create(
    _data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    match mode() {
        Mode::Nothing => return FLT_PREOP_SUCCESS_NO_CALLBACK,
        Mode::FileContexts => {
            // SAFETY: valid related objects from Filter Manager.
            let file_object = unsafe { (*objects).FileObject };
            // SAFETY: the file object of a create not yet opened.
            if unsafe { FltSupportsFileContexts(file_object) } {
                SUPPORTED_IN_PRE_CREATE.fetch_add(1, Ordering::SeqCst);
            }
            return FLT_PREOP_SUCCESS_WITH_CALLBACK;
        }
        _ => {}
    }
    if let (Ok(instance), Ok(volume)) = (get_instance(), get_volume()) {
        FOUND_IN_CREATE.fetch_add(1, Ordering::SeqCst);
        if mode() != Mode::LeakInPreCreate {
            release(instance);
        }
        release(volume);
    }
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

unsafe extern "system" fn post_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    // SAFETY: valid callback data from Filter Manager.
    let io_status = unsafe { &(*data).IoStatus };
    // SAFETY: a completed create's status: the union's status member.
    let status = unsafe { io_status.Anonymous.Status };
    // SAFETY: valid related objects from Filter Manager.
    let objects = unsafe { &*objects };
    if mode() != Mode::FileContexts || status < 0 {
        return FLT_POSTOP_FINISHED_PROCESSING;
    }
    // SAFETY: the opened file object of this create.
    if unsafe { FltSupportsFileContexts(objects.FileObject) } {
        SUPPORTED_IN_POST_CREATE.fetch_add(1, Ordering::SeqCst);
    }
    let mut existing: PFLT_CONTEXT = null_mut();
    // SAFETY: this filter's instance, the opened file object and a place for the context.
    let found = unsafe { FltGetFileContext(objects.Instance, objects.FileObject, &raw mut existing) };
    if found == STATUS_SUCCESS {
        FILE_FOUND.fetch_add(1, Ordering::SeqCst);
        release(existing);
        return FLT_POSTOP_FINISHED_PROCESSING;
    }
    assert_eq!(found, STATUS_NOT_FOUND);
    let context = allocate(FLT_FILE_CONTEXT);
    // SAFETY: as above, with a fresh file context of this filter.
    let set = unsafe {
        FltSetFileContext(objects.Instance, objects.FileObject, FLT_SET_CONTEXT_KEEP_IF_EXISTS, context, null_mut())
    };
    assert_eq!(set, STATUS_SUCCESS);
    FILE_SETS.fetch_add(1, Ordering::SeqCst);
    release(context);
    FLT_POSTOP_FINISHED_PROCESSING
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), Some(post_create)), operation(END, None, None)]);

const fn context_registration(context_type: u32) -> FLT_CONTEXT_REGISTRATION {
    #[allow(clippy::cast_possible_truncation, reason = "small constants")]
    FLT_CONTEXT_REGISTRATION {
        ContextType: context_type as u16,
        Flags: 0,
        ContextCleanupCallback: Some(cleanup),
        Size: 16,
        PoolTag: u32::from_le_bytes(*b"IvCx"),
        ContextAllocateCallback: None,
        ContextFreeCallback: None,
        Reserved1: null_mut(),
    }
}

static CONTEXTS: Table<[FLT_CONTEXT_REGISTRATION; 4]> = Table([
    context_registration(FLT_INSTANCE_CONTEXT),
    context_registration(FLT_VOLUME_CONTEXT),
    context_registration(FLT_FILE_CONTEXT),
    context_registration(FLT_CONTEXT_END),
]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(FLT_REGISTRATION {
    ContextRegistration: (&raw const CONTEXTS.0).cast(),
    InstanceSetupCallback: Some(setup),
    ..registration((&raw const OPERATIONS.0).cast(), Some(unload))
});

fltsim::minifilter_entry_points!(REGISTRATION);

fn setup_driver(mode: Mode) -> fltsim::LoadedDriver {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("contexts-more");
    std::fs::write(root.join("file.txt"), b"data").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("contextsmore", "ContextsMore Instance", "140010");
    fltsim::load("contextsmore", driver_entry).expect("load")
}

fn open_close() {
    let handle = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("open");
    iomgr::close(handle);
}

scenario! {
    fn instance_and_volume_contexts_set_in_setup_are_found_and_cleaned_up_at_unload() {
        let mut driver = setup_driver(Mode::SetInSetup);
        open_close();
        open_close();
        assert_eq!(FOUND_IN_CREATE.load(Ordering::SeqCst), 2, "each pre-create found both contexts");
        assert_eq!(INSTANCE_CLEANUPS.load(Ordering::SeqCst), 0, "attached contexts stay while the filter runs");
        assert_eq!(VOLUME_CLEANUPS.load(Ordering::SeqCst), 0);
        driver.unload(false).expect("unload");
        assert_eq!(INSTANCE_CLEANUPS.load(Ordering::SeqCst), 1, "teardown released the instance context once");
        assert_eq!(VOLUME_CLEANUPS.load(Ordering::SeqCst), 1, "unregistering released the volume context once");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn keep_if_exists_hands_back_the_existing_context_and_replace_swaps_it() {
        let mut driver = setup_driver(Mode::Nothing);
        assert_eq!(get_instance(), Err(STATUS_NOT_FOUND));
        assert_eq!(get_volume(), Err(STATUS_NOT_FOUND));
        let first = allocate(FLT_INSTANCE_CONTEXT);
        assert_eq!(set_instance(FLT_SET_CONTEXT_KEEP_IF_EXISTS, first, null_mut()), STATUS_SUCCESS);
        let second = allocate(FLT_INSTANCE_CONTEXT);
        let mut old: PFLT_CONTEXT = null_mut();
        assert_eq!(set_instance(FLT_SET_CONTEXT_KEEP_IF_EXISTS, second, &raw mut old), STATUS_FLT_CONTEXT_ALREADY_DEFINED);
        assert_eq!(old, first, "KEEP_IF_EXISTS hands back the attached context, referenced");
        release(old);
        assert_eq!(set_instance(FLT_SET_CONTEXT_REPLACE_IF_EXISTS, second, &raw mut old), STATUS_SUCCESS);
        assert_eq!(old, first, "REPLACE_IF_EXISTS hands back the replaced context");
        assert_eq!(INSTANCE_CLEANUPS.load(Ordering::SeqCst), 0, "the caller still holds two references to it");
        release(old);
        release(first);
        assert_eq!(INSTANCE_CLEANUPS.load(Ordering::SeqCst), 1, "the replaced context is freed with its last reference");
        assert_eq!(get_instance(), Ok(second));
        release(second);
        release(second);

        let volume_first = allocate(FLT_VOLUME_CONTEXT);
        assert_eq!(set_volume(FLT_SET_CONTEXT_KEEP_IF_EXISTS, volume_first, null_mut()), STATUS_SUCCESS);
        let volume_second = allocate(FLT_VOLUME_CONTEXT);
        assert_eq!(set_volume(FLT_SET_CONTEXT_KEEP_IF_EXISTS, volume_second, null_mut()), STATUS_FLT_CONTEXT_ALREADY_DEFINED);
        assert_eq!(set_volume(FLT_SET_CONTEXT_REPLACE_IF_EXISTS, volume_second, null_mut()), STATUS_SUCCESS);
        release(volume_first);
        assert_eq!(VOLUME_CLEANUPS.load(Ordering::SeqCst), 1, "replaced without OldContext: its attachment reference went");
        release(volume_second);
        assert_eq!(get_volume(), Ok(volume_second));
        release(volume_second);

        driver.unload(false).expect("unload");
        assert_eq!(INSTANCE_CLEANUPS.load(Ordering::SeqCst), 2);
        assert_eq!(VOLUME_CLEANUPS.load(Ordering::SeqCst), 2);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_context_of_the_wrong_or_an_unregistered_type_is_refused() {
        let mut driver = setup_driver(Mode::Nothing);
        let (status, _) = allocate_status(FLT_STREAM_CONTEXT);
        assert_eq!(status, STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND, "a type the filter did not register");
        assert_eq!(take_rules(), []);
        let (status, _) = allocate_status(0x3);
        assert_eq!(status, STATUS_INVALID_PARAMETER, "not a context type at all");
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
        let volume_context = allocate(FLT_VOLUME_CONTEXT);
        assert_eq!(set_instance(FLT_SET_CONTEXT_KEEP_IF_EXISTS, volume_context, null_mut()), STATUS_INVALID_PARAMETER);
        assert_eq!(take_rules(), [Rule::InvalidArgument], "a volume context is not an instance context");
        let instance_context = allocate(FLT_INSTANCE_CONTEXT);
        assert_eq!(set_volume(FLT_SET_CONTEXT_KEEP_IF_EXISTS, instance_context, null_mut()), STATUS_INVALID_PARAMETER);
        assert_eq!(take_rules(), [Rule::InvalidArgument], "an instance context is not a volume context");
        assert_eq!(set_instance(7, instance_context, null_mut()), STATUS_INVALID_PARAMETER);
        assert_eq!(take_rules(), [Rule::InvalidArgument], "an undefined operation");
        release(volume_context);
        release(instance_context);
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_reference_to_an_instance_context_kept_past_unload_is_reported() {
        let mut driver = setup_driver(Mode::LeakInPreCreate);
        open_close();
        driver.unload(false).expect("unload");
        assert_eq!(INSTANCE_CLEANUPS.load(Ordering::SeqCst), 0, "the kept reference keeps it alive");
        assert_eq!(VOLUME_CLEANUPS.load(Ordering::SeqCst), 1);
        assert_eq!(take_rules(), [Rule::ContextLeak]);
    }
}

scenario! {
    fn an_instance_context_set_by_a_refusing_instance_setup_is_released() {
        let mut driver = setup_driver(Mode::RefuseAfterSetting);
        assert_eq!(INSTANCE_CLEANUPS.load(Ordering::SeqCst), 1, "the refused instance's context went at once");
        open_close();
        assert_eq!(FOUND_IN_CREATE.load(Ordering::SeqCst), 0, "no instance, no callbacks");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_file_context_belongs_to_the_file_and_goes_with_its_last_file_object() {
        let mut driver = setup_driver(Mode::FileContexts);
        let first = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("open");
        assert_eq!(FILE_SETS.load(Ordering::SeqCst), 1, "the first open set the file context");
        assert_eq!(SUPPORTED_IN_POST_CREATE.load(Ordering::SeqCst), 1, "NTFS keeps file contexts");
        assert_eq!(SUPPORTED_IN_PRE_CREATE.load(Ordering::SeqCst), 0, "not before the file system opened the file");
        let second = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("second open");
        let link = info::rename_buffer(r"\??\C:\link.txt", false);
        let linker = iomgr::OpenParams { desired_access: FILE_WRITE_ATTRIBUTES | FILE_READ_DATA, ..Default::default() };
        let linking = iomgr::create(r"C:\file.txt", &linker).expect("open to link");
        iomgr::set_information(&linking, FileLinkInformation, &link).expect("hard link");
        assert_eq!(FILE_SETS.load(Ordering::SeqCst), 2, "the link's target directory (C:\\, another file) got its own");
        assert_eq!(FILE_CLEANUPS.load(Ordering::SeqCst), 1, "and lost it when that open closed");
        let by_link = iomgr::create(r"C:\link.txt", &iomgr::OpenParams::default()).expect("open by the link");
        assert_eq!(FILE_SETS.load(Ordering::SeqCst), 2);
        assert_eq!(FILE_FOUND.load(Ordering::SeqCst), 3, "the second open, the linking open and the link found it");
        iomgr::close(first);
        iomgr::close(second);
        iomgr::close(linking);
        assert_eq!(FILE_CLEANUPS.load(Ordering::SeqCst), 1, "the file is still open through its link");
        iomgr::close(by_link);
        assert_eq!(FILE_CLEANUPS.load(Ordering::SeqCst), 2, "the file's last file object took its context along");
        open_close();
        assert_eq!(FILE_SETS.load(Ordering::SeqCst), 3, "a later open of the file starts afresh");
        assert_eq!(FILE_CLEANUPS.load(Ordering::SeqCst), 3);
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_file_context_kept_open_at_unload_is_released_by_instance_teardown() {
        let mut driver = setup_driver(Mode::FileContexts);
        let handle = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("open");
        driver.unload(false).expect("unload");
        assert_eq!(FILE_CLEANUPS.load(Ordering::SeqCst), 1, "the instance's teardown released it");
        iomgr::close(handle);
        assert_eq!(take_rules(), []);
    }
}
