//! Contexts: a filter that keeps a stream handle context from post-create to close breaks no rule; each misuse
//! Filter Verifier catches is reported.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::atomic::{AtomicIsize, AtomicU8, AtomicUsize, Ordering},
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
    Wdk::Storage::FileSystem::Minifilters::{
        FLT_CALLBACK_DATA, FLT_CONTEXT_END, FLT_CONTEXT_REGISTRATION, FLT_OPERATION_REGISTRATION,
        FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_FINISHED_PROCESSING, FLT_PREOP_CALLBACK_STATUS,
        FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
        FLT_SET_CONTEXT_KEEP_IF_EXISTS, FLT_STREAM_CONTEXT, FLT_STREAMHANDLE_CONTEXT, FltAllocateContext, FltClose,
        FltGetStreamHandleContext, FltReferenceContext, FltReleaseContext, FltSetStreamHandleContext, PFLT_CONTEXT,
    },
    Win32::Foundation::{STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND, STATUS_SUCCESS},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    Correct,
    ReleaseTwice,
    UseAfterFree,
    Leak,
    SetInPreCreate,
    CleanupCallsFltClose,
    UnregisteredType,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static CLEANUPS: AtomicUsize = AtomicUsize::new(0);
static CLEANUP_IRQL: AtomicU8 = AtomicU8::new(u8::MAX);
static FOUND_IN_READ: AtomicUsize = AtomicUsize::new(0);
static ALLOCATE_STATUS: AtomicIsize = AtomicIsize::new(0);

fn mode() -> Mode {
    const ALL: [Mode; 7] = [
        Mode::Correct,
        Mode::ReleaseTwice,
        Mode::UseAfterFree,
        Mode::Leak,
        Mode::SetInPreCreate,
        Mode::CleanupCallsFltClose,
        Mode::UnregisteredType,
    ];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

fn allocate(context_type: u32) -> PFLT_CONTEXT {
    let mut context: PFLT_CONTEXT = null_mut();
    // SAFETY: this filter, a registered type, a place for the result.
    let status = unsafe {
        FltAllocateContext(
            FILTER.load(Ordering::SeqCst),
            u16::try_from(context_type).expect("small"),
            32,
            0,
            &raw mut context,
        )
    };
    ALLOCATE_STATUS.store(status as isize, Ordering::SeqCst);
    context
}

unsafe extern "system" fn cleanup(_context: PFLT_CONTEXT, _context_type: u16) {
    CLEANUPS.fetch_add(1, Ordering::SeqCst);
    CLEANUP_IRQL.store(thread::current_irql(), Ordering::SeqCst);
    if mode() == Mode::CleanupCallsFltClose {
        // SAFETY: any handle may be passed: the model checks the IRQL first, which is the point.
        unsafe { FltClose(null_mut()) };
    }
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    if mode() == Mode::SetInPreCreate {
        let context = allocate(FLT_STREAMHANDLE_CONTEXT);
        // SAFETY: valid related objects from Filter Manager.
        let instance = unsafe { (*objects).Instance };
        // SAFETY: valid callback data from Filter Manager.
        let iopb = unsafe { (*data).Iopb };
        // SAFETY: and its parameter block.
        let file_object = unsafe { (*iopb).TargetFileObject };
        // SAFETY: the model reports the call, which is the point.
        unsafe {
            FltSetStreamHandleContext(instance, file_object, FLT_SET_CONTEXT_KEEP_IF_EXISTS, context, null_mut())
        };
        // SAFETY: the reference FltAllocateContext returned.
        unsafe { FltReleaseContext(context) };
    }
    FLT_PREOP_SUCCESS_WITH_CALLBACK
}

unsafe extern "system" fn post_create(
    _data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    // SAFETY: valid related objects from Filter Manager.
    let objects = unsafe { &*objects };
    match mode() {
        Mode::Correct | Mode::ReleaseTwice | Mode::CleanupCallsFltClose => {
            let context = allocate(FLT_STREAMHANDLE_CONTEXT);
            // SAFETY: an opened file object in post-create and a fresh context of this filter.
            let status = unsafe {
                FltSetStreamHandleContext(
                    objects.Instance,
                    objects.FileObject,
                    FLT_SET_CONTEXT_KEEP_IF_EXISTS,
                    context,
                    null_mut(),
                )
            };
            assert_eq!(status, STATUS_SUCCESS);
            // SAFETY: the reference FltAllocateContext returned; the attachment keeps its own.
            unsafe { FltReleaseContext(context) };
            if mode() == Mode::ReleaseTwice {
                // SAFETY: deliberately one release too many.
                unsafe { FltReleaseContext(context) };
            }
        }
        Mode::UseAfterFree => {
            let context = allocate(FLT_STREAMHANDLE_CONTEXT);
            // SAFETY: the only reference: this frees it.
            unsafe { FltReleaseContext(context) };
            // SAFETY: deliberately a freed context.
            unsafe { FltReferenceContext(context) };
        }
        Mode::Leak => drop(allocate(FLT_STREAMHANDLE_CONTEXT)),
        Mode::UnregisteredType => drop(allocate(FLT_STREAM_CONTEXT)),
        Mode::SetInPreCreate => {}
    }
    FLT_POSTOP_FINISHED_PROCESSING
}

unsafe extern "system" fn pre_read(
    _data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: valid related objects from Filter Manager.
    let objects = unsafe { &*objects };
    let mut context: PFLT_CONTEXT = null_mut();
    // SAFETY: this filter's instance and the read's file object.
    if unsafe { FltGetStreamHandleContext(objects.Instance, objects.FileObject, &raw mut context) } == STATUS_SUCCESS {
        FOUND_IN_READ.fetch_add(1, Ordering::SeqCst);
        // SAFETY: the reference FltGetStreamHandleContext added.
        unsafe { FltReleaseContext(context) };
    }
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 3]> = Table([
    operation(0, Some(pre_create), Some(post_create)),
    operation(3, Some(pre_read), None),
    operation(END, None, None),
]);

#[allow(clippy::cast_possible_truncation, reason = "small constants")]
static CONTEXTS: Table<[FLT_CONTEXT_REGISTRATION; 2]> = Table([
    FLT_CONTEXT_REGISTRATION {
        ContextType: FLT_STREAMHANDLE_CONTEXT as u16,
        Flags: 0,
        ContextCleanupCallback: Some(cleanup),
        Size: 64,
        PoolTag: u32::from_le_bytes(*b"FsCx"),
        ContextAllocateCallback: None,
        ContextFreeCallback: None,
        Reserved1: null_mut(),
    },
    FLT_CONTEXT_REGISTRATION {
        ContextType: FLT_CONTEXT_END as u16,
        Flags: 0,
        ContextCleanupCallback: None,
        Size: 0,
        PoolTag: 0,
        ContextAllocateCallback: None,
        ContextFreeCallback: None,
        Reserved1: null_mut(),
    },
]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(FLT_REGISTRATION {
    ContextRegistration: (&raw const CONTEXTS.0).cast(),
    ..registration((&raw const OPERATIONS.0).cast(), Some(unload))
});

fltsim::minifilter_entry_points!(REGISTRATION);

fn setup(mode: Mode) -> fltsim::LoadedDriver {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("context");
    std::fs::write(root.join("file.txt"), b"data").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("contexttest", "Context Instance", "140000");
    fltsim::load("contexttest", driver_entry).expect("load")
}

fn open_read_close() {
    let handle = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("open");
    let _ = iomgr::read(&handle, Some(0), 4);
    iomgr::close(handle);
}

scenario! {
    fn a_stream_handle_context_lives_from_post_create_to_close() {
        let mut driver = setup(Mode::Correct);
        open_read_close();
        assert_eq!(FOUND_IN_READ.load(Ordering::SeqCst), 1, "the read found the context");
        assert_eq!(CLEANUPS.load(Ordering::SeqCst), 1, "closing the file object cleaned it up once");
        assert_eq!(CLEANUP_IRQL.load(Ordering::SeqCst), 1, "cleanup runs at APC_LEVEL");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn releasing_a_context_too_often_is_reported() {
        let _driver = setup(Mode::ReleaseTwice);
        open_read_close();
        assert_eq!(take_rules()[0], Rule::ContextMisuse);
    }
}

scenario! {
    fn using_a_freed_context_is_reported() {
        let _driver = setup(Mode::UseAfterFree);
        open_read_close();
        assert_eq!(take_rules(), [Rule::ContextMisuse]);
    }
}

scenario! {
    fn a_context_alive_at_unload_is_reported() {
        let mut driver = setup(Mode::Leak);
        open_read_close();
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::ContextLeak]);
    }
}

scenario! {
    fn setting_a_stream_handle_context_in_pre_create_is_reported() {
        let _driver = setup(Mode::SetInPreCreate);
        open_read_close();
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    fn a_passive_only_call_from_a_context_cleanup_is_reported() {
        let _driver = setup(Mode::CleanupCallsFltClose);
        open_read_close();
        assert_eq!(take_rules(), [Rule::IrqlTooHigh]);
    }
}

scenario! {
    fn allocating_an_unregistered_context_type_fails() {
        let _driver = setup(Mode::UnregisteredType);
        open_read_close();
        assert_eq!(ALLOCATE_STATUS.load(Ordering::SeqCst), STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND as isize);
        assert_eq!(take_rules(), []);
    }
}
