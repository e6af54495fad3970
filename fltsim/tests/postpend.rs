//! Pended post-operations: a filter below pends a post-read (`FLT_POSTOP_MORE_PROCESSING_REQUIRED`), finishes it
//! from a deferred-I/O work item and hands it back with `FltCompletePendedPostOperation`; the filter above gets its
//! post-read only then, in the worker's context, and the caller gets the data the worker left. Each misuse is
//! reported; nothing hangs. `FltDoCompletionProcessingWhenSafe` posts a post-operation from DISPATCH_LEVEL.

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicU8, Ordering},
    },
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr, mm},
    kernel::{irql, thread},
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_rules,
};
use windows_sys::Wdk::{
    Storage::FileSystem::{
        FileStandardInformation,
        Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_FINISHED_PROCESSING,
            FLT_POSTOP_MORE_PROCESSING_REQUIRED, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltAllocateDeferredIoWorkItem,
            FltCompletePendedPostOperation, FltDoCompletionProcessingWhenSafe, FltFreeDeferredIoWorkItem,
            FltQueueDeferredIoWorkItem, PFLT_DEFERRED_IO_WORKITEM,
        },
    },
    System::SystemServices::DelayedWorkQueue,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Pend the post-read, upper-case the data from a deferred-I/O work item, complete it, free the item.
    Replay,
    /// Pend the post-read and never complete it.
    Forget,
    /// Replay, but complete twice.
    Twice,
    /// Queue the completion, but return `FLT_POSTOP_FINISHED_PROCESSING`: the operation is not pended.
    NotPended,
    /// Return `FLT_POSTOP_MORE_PROCESSING_REQUIRED` for section synchronization, which is not IRP-based.
    Section,
    /// Post the post-query-information from DISPATCH_LEVEL with `FltDoCompletionProcessingWhenSafe`.
    WhenSafe,
    /// Call `FltDoCompletionProcessingWhenSafe` for a read, which the docs forbid.
    WhenSafeRead,
}

static MODE: AtomicU8 = AtomicU8::new(0);
/// What happened, in order.
static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn mode() -> Mode {
    const ALL: [Mode; 7] =
        [Mode::Replay, Mode::Forget, Mode::Twice, Mode::NotPended, Mode::Section, Mode::WhenSafe, Mode::WhenSafeRead];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

fn log(event: impl Into<String>) {
    LOG.lock().expect("lock").push(event.into());
}

fn events() -> Vec<String> {
    LOG.lock().expect("lock").clone()
}

/// The read buffer of a read, and how many bytes the read returned.
///
/// # Safety
/// `data` is the callback data of a read in flight (completed by the file system, maybe pended after).
unsafe fn read_buffer(data: *const FLT_CALLBACK_DATA) -> (*mut u8, usize, usize) {
    // SAFETY: the caller's callback data.
    let data = unsafe { &*data };
    // SAFETY: the callback data points to its parameter block.
    let iopb = unsafe { &*data.Iopb };
    // SAFETY: the union holds the Read parameters for IRP_MJ_READ.
    let read = unsafe { iopb.Parameters.Read };
    let length = read.Length as usize;
    (read.ReadBuffer.cast(), length, data.IoStatus.Information.min(length))
}

/// The bytes a read returned, as text.
///
/// # Safety
/// As for [`read_buffer`].
unsafe fn read_data(data: *const FLT_CALLBACK_DATA) -> String {
    // SAFETY: the caller's read.
    let (buffer, _, n) = unsafe { read_buffer(data) };
    // SAFETY: the read buffer holds at least `Length` bytes, `n` of them read.
    let bytes = unsafe { std::slice::from_raw_parts(buffer, n) };
    String::from_utf8_lossy(bytes).into_owned()
}

unsafe extern "system" fn finish_read(
    item: PFLT_DEFERRED_IO_WORKITEM,
    data: *const FLT_CALLBACK_DATA,
    _ctx: *const c_void,
) {
    if mode() == Mode::NotPended {
        // The read may be gone already: only hand its address back, which the model reports.
        // SAFETY: an address the model checks; a real driver would be using freed callback data.
        unsafe { FltCompletePendedPostOperation(data) };
        // SAFETY: the item this routine was queued with.
        unsafe { FltFreeDeferredIoWorkItem(item) };
        return;
    }
    // SAFETY: the pended read's data, whose buffer the requestor keeps while it waits.
    let (buffer, length, _) = unsafe { read_buffer(data) };
    // SAFETY: the read buffer holds `Length` bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buffer, length) };
    bytes.make_ascii_uppercase();
    log(format!("worker completes in {}", thread::snapshot().name));
    // SAFETY: the pended operation's data, handed to this routine.
    unsafe { FltCompletePendedPostOperation(data) };
    log("worker returned");
    if mode() == Mode::Twice {
        // SAFETY: as above; the model reports the second completion.
        unsafe { FltCompletePendedPostOperation(data) };
    }
    // SAFETY: the item this routine was queued with.
    unsafe { FltFreeDeferredIoWorkItem(item) };
}

unsafe extern "system" fn lower_post_read(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    log("lower post-read");
    match mode() {
        Mode::Forget => return FLT_POSTOP_MORE_PROCESSING_REQUIRED,
        Mode::WhenSafeRead => {
            let mut status = FLT_POSTOP_MORE_PROCESSING_REQUIRED;
            // SAFETY: this callback's own data and objects, and a place for the status.
            let posted = unsafe {
                FltDoCompletionProcessingWhenSafe(
                    data,
                    objects,
                    std::ptr::null(),
                    flags,
                    Some(safe_post),
                    &raw mut status,
                )
            };
            assert!(!posted, "refused for a read");
            return FLT_POSTOP_FINISHED_PROCESSING;
        }
        Mode::Replay | Mode::Twice | Mode::NotPended => {}
        Mode::Section | Mode::WhenSafe => return FLT_POSTOP_FINISHED_PROCESSING,
    }
    // SAFETY: no preconditions.
    let item = unsafe { FltAllocateDeferredIoWorkItem() };
    // SAFETY: an allocated item and the operation's own callback data.
    let status =
        unsafe { FltQueueDeferredIoWorkItem(item, data, Some(finish_read), DelayedWorkQueue, std::ptr::null()) };
    if status < 0 {
        // SAFETY: the item allocated above, never queued.
        unsafe { FltFreeDeferredIoWorkItem(item) };
        return FLT_POSTOP_FINISHED_PROCESSING;
    }
    if mode() == Mode::NotPended { FLT_POSTOP_FINISHED_PROCESSING } else { FLT_POSTOP_MORE_PROCESSING_REQUIRED }
}

unsafe extern "system" fn upper_post_read(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    // SAFETY: this callback's data, of a completed read.
    let seen = unsafe { read_data(data) };
    log(format!("upper post-read sees {seen} in {}", thread::snapshot().name));
    FLT_POSTOP_FINISHED_PROCESSING
}

unsafe extern "system" fn lower_post_section(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    if mode() == Mode::Section { FLT_POSTOP_MORE_PROCESSING_REQUIRED } else { FLT_POSTOP_FINISHED_PROCESSING }
}

unsafe extern "system" fn safe_post(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    let state = thread::snapshot();
    log(format!("safe post at {} in {}", irql::name(state.irql), state.name));
    FLT_POSTOP_FINISHED_PROCESSING
}

unsafe extern "system" fn lower_post_query(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    if mode() != Mode::WhenSafe {
        return FLT_POSTOP_FINISHED_PROCESSING;
    }
    let mut status = FLT_POSTOP_FINISHED_PROCESSING;
    // The worker may run the safe callback before this one returns: log first.
    log("lower post-query posts");
    // The post-operation may run at DISPATCH_LEVEL; make sure it does, so the work is posted.
    let posted = thread::at_irql(irql::DISPATCH, || {
        // SAFETY: this callback's own data and objects, and a place for the status.
        unsafe {
            FltDoCompletionProcessingWhenSafe(data, objects, std::ptr::null(), flags, Some(safe_post), &raw mut status)
        }
    });
    assert!(posted, "posted to a worker");
    status
}

unsafe extern "system" fn upper_post_query(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    log(format!("upper post-query in {}", thread::snapshot().name));
    FLT_POSTOP_FINISHED_PROCESSING
}

static UPPER_OPS: Table<[FLT_OPERATION_REGISTRATION; 3]> = Table([
    operation(3, None, Some(upper_post_read)),
    operation(5, None, Some(upper_post_query)),
    operation(END, None, None),
]);
static LOWER_OPS: Table<[FLT_OPERATION_REGISTRATION; 4]> = Table([
    operation(3, None, Some(lower_post_read)),
    operation(5, None, Some(lower_post_query)),
    operation(0xFF, None, Some(lower_post_section)),
    operation(END, None, None),
]);

static UPPER_REG: Table<FLT_REGISTRATION> = Table(registration((&raw const UPPER_OPS.0).cast(), Some(upper_unload)));
static LOWER_REG: Table<FLT_REGISTRATION> = Table(registration((&raw const LOWER_OPS.0).cast(), Some(lower_unload)));

fltsim::minifilter_entry_points!(UPPER_REG, UPPER, upper_entry, upper_unload);
fltsim::minifilter_entry_points!(LOWER_REG, LOWER, lower_entry, lower_unload);

fn setup(mode: Mode) -> (fltsim::LoadedDriver, fltsim::LoadedDriver) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("postpend");
    std::fs::write(root.join("file.txt"), b"data").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("postupper", "Upper", "320000");
    fltsim::registry::install_minifilter_service("postlower", "Lower", "135000");
    let lower = fltsim::load("postlower", lower_entry).expect("lower loads");
    let upper = fltsim::load("postupper", upper_entry).expect("upper loads");
    (upper, lower)
}

fn read_file() -> Vec<u8> {
    let handle = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("open");
    let data = iomgr::read(&handle, Some(0), 4).expect("read");
    log("caller has the data");
    iomgr::close(handle);
    data
}

fn position(events: &[String], prefix: &str) -> usize {
    events.iter().position(|e| e.starts_with(prefix)).unwrap_or_else(|| panic!("no {prefix:?} in {events:?}"))
}

scenario! {
    /// Completion processing halts at the pending filter: the filter above gets its post-read only after the
    /// worker completed the read, in the worker's context, and sees the worker's data, as does the caller;
    /// `FltCompletePendedPostOperation` returns once the filter above is done.
    fn a_post_read_pended_and_completed_from_a_work_item_resumes_above_it() {
        let (mut upper, mut lower) = setup(Mode::Replay);
        assert_eq!(read_file(), b"DATA", "the caller gets the data the worker left");
        fltsim::kernel::work::drain();
        let events = events();
        let lower_post = position(&events, "lower post-read");
        let worker = position(&events, "worker completes in System: worker");
        let above = position(&events, "upper post-read sees DATA in System: worker");
        let caller = position(&events, "caller has the data");
        let returned = position(&events, "worker returned");
        assert!(lower_post < worker && worker < above && above < caller, "{events:?}");
        assert!(above < returned, "FltCompletePendedPostOperation returns after the filter above: {events:?}");
        upper.unload(false).expect("unload");
        lower.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// Nothing is left to complete the pended read: reported, and completion processing resumes (the filter above
    /// and the caller see the file system's data) instead of hanging.
    fn a_pended_post_operation_never_completed_is_reported() {
        let (_upper, _lower) = setup(Mode::Forget);
        assert_eq!(read_file(), b"data");
        assert_eq!(take_rules(), [Rule::PendedNeverCompleted]);
        let events = events();
        assert!(position(&events, "lower post-read") < position(&events, "upper post-read sees data"), "{events:?}");
    }
}

scenario! {
    fn completing_a_pended_post_operation_twice_is_reported() {
        let (_upper, _lower) = setup(Mode::Twice);
        assert_eq!(read_file(), b"DATA");
        fltsim::kernel::work::drain();
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    fn completing_a_post_operation_that_was_not_pended_is_reported() {
        let (_upper, _lower) = setup(Mode::NotPended);
        let _ = read_file();
        fltsim::kernel::work::drain();
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    /// Section synchronization is a file-system filter callback, not an IRP: it cannot be pended.
    fn more_processing_required_for_an_operation_that_is_not_irp_based_is_reported() {
        let (_upper, _lower) = setup(Mode::Section);
        let handle = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("open");
        assert!(mm::create_section(&handle).is_ok(), "completion processing goes on");
        assert_eq!(take_rules(), [Rule::StatusNotAllowedForOperation]);
        iomgr::close(handle);
    }
}

scenario! {
    /// At DISPATCH_LEVEL the safe callback runs later on a system worker at PASSIVE_LEVEL; the filter above gets
    /// its post-operation only after it.
    fn completion_processing_when_safe_posts_from_dispatch_level() {
        let (mut upper, mut lower) = setup(Mode::WhenSafe);
        let handle = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("open");
        assert!(iomgr::query_information(&handle, FileStandardInformation, 64).is_ok());
        iomgr::close(handle);
        let events = events();
        let posted = position(&events, "lower post-query posts");
        let safe = position(&events, "safe post at PASSIVE_LEVEL in System: worker");
        let above = position(&events, "upper post-query in System: worker");
        assert!(posted < safe && safe < above, "{events:?}");
        upper.unload(false).expect("unload");
        lower.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn completion_processing_when_safe_for_a_read_is_reported() {
        let (_upper, _lower) = setup(Mode::WhenSafeRead);
        assert_eq!(read_file(), b"data");
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
        assert!(!events().iter().any(|e| e.starts_with("safe post")), "the safe callback is not called");
    }
}
