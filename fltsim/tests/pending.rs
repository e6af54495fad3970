//! Pended operations and work items: a filter above pends creates and completes them from a system worker (as
//! antivirus and HSM filters do), and the filter below then sees the create in that worker's context, which is the
//! context Shunt must survive. Each misuse is reported; nothing hangs.

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicI32, AtomicU8, Ordering},
    },
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    kernel::{process, thread},
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_PENDING,
            FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_PREOP_SYNCHRONIZE, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
            FltAllocateDeferredIoWorkItem, FltAllocateGenericWorkItem, FltCompletePendedPreOperation,
            FltFreeDeferredIoWorkItem, FltFreeGenericWorkItem, FltQueueDeferredIoWorkItem, FltQueueGenericWorkItem,
            PFLT_DEFERRED_IO_WORKITEM, PFLT_GENERIC_WORKITEM,
        },
        System::SystemServices::{DelayedWorkQueue, PsGetCurrentProcessId},
    },
    Win32::Foundation::{NTSTATUS, STATUS_CANCELLED, STATUS_FLT_NOT_SAFE_TO_POST_OPERATION, STATUS_SUCCESS},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Pend, complete from a deferred-I/O work item, free the item.
    Replay,
    /// Pend and never complete.
    Forget,
    /// Complete twice.
    Twice,
    /// Complete with `FLT_PREOP_SYNCHRONIZE`.
    BadStatus,
    /// Replay, but never free the work item.
    LeakItem,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static QUEUE_STATUS: AtomicI32 = AtomicI32::new(0);
/// What the lower filter saw in pre-create: (process id, thread name, IRQL).
static SEEN_BELOW: Mutex<Vec<(usize, String, u8)>> = Mutex::new(Vec::new());

fn mode() -> Mode {
    const ALL: [Mode; 5] = [Mode::Replay, Mode::Forget, Mode::Twice, Mode::BadStatus, Mode::LeakItem];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

unsafe extern "system" fn replay(item: PFLT_DEFERRED_IO_WORKITEM, data: *const FLT_CALLBACK_DATA, _ctx: *const c_void) {
    let status = if mode() == Mode::BadStatus { FLT_PREOP_SYNCHRONIZE } else { FLT_PREOP_SUCCESS_NO_CALLBACK };
    // SAFETY: the pended operation's data, handed to this routine.
    unsafe { FltCompletePendedPreOperation(data, status, std::ptr::null()) };
    if mode() == Mode::Twice {
        // SAFETY: as above; the model reports the second completion.
        unsafe { FltCompletePendedPreOperation(data, status, std::ptr::null()) };
    }
    if mode() != Mode::LeakItem {
        // SAFETY: the item this routine was queued with.
        unsafe { FltFreeDeferredIoWorkItem(item) };
    }
}

unsafe extern "system" fn upper_pre_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    if mode() == Mode::Forget {
        return FLT_PREOP_PENDING;
    }
    // SAFETY: no preconditions.
    let item = unsafe { FltAllocateDeferredIoWorkItem() };
    // SAFETY: an allocated item and the operation's own callback data.
    let status = unsafe { FltQueueDeferredIoWorkItem(item, data, Some(replay), DelayedWorkQueue, std::ptr::null()) };
    QUEUE_STATUS.store(status, Ordering::SeqCst);
    if status < 0 {
        // SAFETY: the item allocated above, never queued.
        unsafe { FltFreeDeferredIoWorkItem(item) };
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    FLT_PREOP_PENDING
}

unsafe extern "system" fn lower_pre_create(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: no preconditions.
    let pid = unsafe { PsGetCurrentProcessId() } as usize;
    let state = thread::snapshot();
    SEEN_BELOW.lock().expect("lock").push((pid, state.name, state.irql));
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

const fn operations(
    pre: unsafe extern "system" fn(
        *mut FLT_CALLBACK_DATA,
        *const FLT_RELATED_OBJECTS,
        *mut *mut c_void,
    ) -> FLT_PREOP_CALLBACK_STATUS,
) -> [FLT_OPERATION_REGISTRATION; 2] {
    [operation(0, Some(pre), None), operation(END, None, None)]
}

static UPPER_OPS: Table<[FLT_OPERATION_REGISTRATION; 2]> = Table(operations(upper_pre_create));
static LOWER_OPS: Table<[FLT_OPERATION_REGISTRATION; 2]> = Table(operations(lower_pre_create));

static UPPER_REG: Table<FLT_REGISTRATION> = Table(registration((&raw const UPPER_OPS.0).cast(), Some(upper_unload)));
static LOWER_REG: Table<FLT_REGISTRATION> = Table(registration((&raw const LOWER_OPS.0).cast(), Some(lower_unload)));

fltsim::minifilter_entry_points!(UPPER_REG, UPPER, upper_entry, upper_unload);
fltsim::minifilter_entry_points!(LOWER_REG, LOWER, lower_entry, lower_unload);

fn setup(mode: Mode) -> (fltsim::LoadedDriver, fltsim::LoadedDriver) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("pending");
    std::fs::write(root.join("file.txt"), b"data").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("pendupper", "Upper", "320000");
    fltsim::registry::install_minifilter_service("pendlower", "Lower", "135000");
    let lower = fltsim::load("pendlower", lower_entry).expect("lower loads");
    let upper = fltsim::load("pendupper", upper_entry).expect("upper loads");
    (upper, lower)
}

fn open_as_user() -> Result<iomgr::Handle, NTSTATUS> {
    let user = process::create(
        r"\Device\HarddiskVolume1\Apps\legacy.exe",
        process::Token { user: "alice".into(), admin: false },
    );
    process::run_as(&user, || iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()))
}

scenario! {
    /// The create continues below the pending filter in the system worker's context: the System process, a worker
    /// thread, PASSIVE_LEVEL; the caller's open succeeds.
    fn a_create_pended_and_replayed_continues_in_the_worker_context() {
        let (mut upper, mut lower) = setup(Mode::Replay);
        let handle = open_as_user().expect("the replayed create succeeds");
        assert_eq!(QUEUE_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        let seen = SEEN_BELOW.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1);
        let (pid, name, irql) = &seen[0];
        assert_eq!(*pid, 4, "the lower filter runs in the System process, not the requestor's");
        assert!(name.contains("worker"), "in a system worker thread, not the requestor's: {name}");
        assert_eq!(*irql, 0);
        iomgr::close(handle);
        upper.unload(false).expect("unload");
        lower.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_pended_create_never_completed_is_reported_and_fails() {
        let (_upper, _lower) = setup(Mode::Forget);
        assert_eq!(open_as_user(), Err(STATUS_CANCELLED));
        assert_eq!(take_rules(), [Rule::PendedNeverCompleted]);
    }
}

scenario! {
    fn completing_a_pended_operation_twice_is_reported() {
        let (_upper, _lower) = setup(Mode::Twice);
        assert!(open_as_user().is_ok());
        // The worker's second completion comes after the first has let the create finish.
        fltsim::kernel::work::drain();
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    fn completing_with_a_status_that_cannot_complete_is_reported() {
        let (_upper, _lower) = setup(Mode::BadStatus);
        let _ = open_as_user();
        let rules = take_rules();
        assert_eq!(rules[0], Rule::InvalidArgument, "{rules:?}");
        assert!(rules.contains(&Rule::PendedNeverCompleted), "the bad completion does not complete it: {rules:?}");
    }
}

scenario! {
    fn a_work_item_not_freed_is_reported_at_unload() {
        let (mut upper, _lower) = setup(Mode::LeakItem);
        assert!(open_as_user().is_ok());
        upper.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::WorkItemLeak]);
    }
}

scenario! {
    /// Posting is refused where the docs say so, with the documented status rather than a report.
    fn posting_with_a_top_level_irp_set_is_refused() {
        let (_upper, _lower) = setup(Mode::Replay);
        let _ = thread::with_top_level_irp(0x2000, open_as_user);
        assert_eq!(QUEUE_STATUS.load(Ordering::SeqCst), STATUS_FLT_NOT_SAFE_TO_POST_OPERATION);
        assert_eq!(take_rules(), []);
    }
}

static GENERIC_RAN: Mutex<Option<(usize, u8)>> = Mutex::new(None);

unsafe extern "system" fn generic(item: PFLT_GENERIC_WORKITEM, _object: *const c_void, _ctx: *const c_void) {
    // SAFETY: no preconditions.
    let pid = unsafe { PsGetCurrentProcessId() } as usize;
    *GENERIC_RAN.lock().expect("lock") = Some((pid, thread::current_irql()));
    // SAFETY: the item this routine was queued with.
    unsafe { FltFreeGenericWorkItem(item) };
}

scenario! {
    fn a_generic_work_item_runs_at_passive_level_in_the_system_process() {
        let (_upper, _lower) = setup(Mode::Replay);
        // SAFETY: no preconditions.
        let item = unsafe { FltAllocateGenericWorkItem() };
        let filter = UPPER.load(Ordering::SeqCst);
        // SAFETY: an allocated item and a registered filter.
        let status =
            unsafe { FltQueueGenericWorkItem(item, filter as *const c_void, Some(generic), DelayedWorkQueue, std::ptr::null()) };
        assert_eq!(status, STATUS_SUCCESS);
        fltsim::kernel::work::drain();
        assert_eq!(*GENERIC_RAN.lock().expect("lock"), Some((4, 0)));
        assert_eq!(take_rules(), []);
    }
}
