//! `FltUnregisterFilter` runs the filter down: it does not return while the filter's generic or deferred-I/O work
//! items, queued or running, have not returned, and it refuses new ones with `STATUS_FLT_DELETING_OBJECT`. Called
//! from one of the filter's own work items it would wait for itself; that is reported and does not hang.
//!
//! The work items here block until the filter's InstanceTeardownStart callback runs, so they are certainly still
//! outstanding when `FltUnregisterFilter` begins, and then take a while; the unload callback records what had run
//! when `FltUnregisterFilter` returned. Without the wait it would return before the items finish.

use std::{
    ffi::c_void,
    sync::{
        Condvar, Mutex,
        atomic::{AtomicBool, AtomicI32, AtomicIsize, AtomicUsize, Ordering},
    },
    time::Duration,
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    kernel::work,
    scenario,
    testfilters::build::{END, Table, operation, register_and_start, registration, unregister},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::{
        Foundation::DRIVER_OBJECT,
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_PENDING,
            FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltAllocateDeferredIoWorkItem,
            FltAllocateGenericWorkItem, FltCompletePendedPreOperation, FltFreeDeferredIoWorkItem,
            FltFreeGenericWorkItem, FltQueueDeferredIoWorkItem, FltQueueGenericWorkItem, PFLT_DEFERRED_IO_WORKITEM,
            PFLT_GENERIC_WORKITEM,
        },
        System::SystemServices::DelayedWorkQueue,
    },
    Win32::Foundation::{NTSTATUS, STATUS_FLT_DELETING_OBJECT, STATUS_SUCCESS, UNICODE_STRING},
};

/// More items than system workers, so some wait in the queue while the others run.
const ITEMS: usize = work::WORKERS * 2;

/// How long a released work item keeps going: long enough that an `FltUnregisterFilter` that did not wait would
/// return first. Ordering is asserted by the wait, not by this delay.
const WORK: Duration = Duration::from_millis(20);

static FILTER: AtomicIsize = AtomicIsize::new(0);
/// Whether the pre-create pends creates and completes them from a deferred-I/O work item.
static PEND_CREATES: AtomicBool = AtomicBool::new(false);
/// Work items that have finished their work.
static RAN: AtomicUsize = AtomicUsize::new(0);
/// [`RAN`] as the unload callback saw it right after `FltUnregisterFilter` returned.
static RAN_WHEN_UNREGISTERED: AtomicUsize = AtomicUsize::new(usize::MAX);
/// What queueing another generic item answered from inside a work item during the rundown.
static REQUEUE_STATUS: Mutex<Vec<NTSTATUS>> = Mutex::new(Vec::new());
/// Set if an item refused during the rundown ran anyway.
static REFUSED_ITEM_RAN: AtomicBool = AtomicBool::new(false);
/// What `FltQueueDeferredIoWorkItem` answered in the pre-create.
static DEFERRED_STATUS: AtomicI32 = AtomicI32::new(1);

/// A flag threads wait on: set by InstanceTeardownStart (unregistration has begun), or by the pre-create once it
/// has queued its deferred item.
struct Signal(Mutex<bool>, Condvar);

impl Signal {
    const fn new() -> Self {
        Self(Mutex::new(false), Condvar::new())
    }

    fn set(&self) {
        *self.0.lock().expect("lock") = true;
        self.1.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.0.lock().expect("lock")
    }

    fn wait(&self) {
        let mut set = self.0.lock().expect("lock");
        while !*set {
            set = self.1.wait(set).expect("lock");
        }
    }
}

static TEARDOWN_STARTED: Signal = Signal::new();
static DEFERRED_QUEUED: Signal = Signal::new();

/// Waits for the unregistration to begin, works a while, checks that new items are refused, and counts itself.
fn slow_work() {
    TEARDOWN_STARTED.wait();
    std::thread::sleep(WORK);
    // SAFETY: no preconditions.
    let another = unsafe { FltAllocateGenericWorkItem() };
    let filter = FILTER.load(Ordering::SeqCst);
    // SAFETY: an allocated item and the filter, which is being unregistered.
    let status = unsafe {
        FltQueueGenericWorkItem(another, filter as *const c_void, Some(never_runs), DelayedWorkQueue, std::ptr::null())
    };
    REQUEUE_STATUS.lock().expect("lock").push(status);
    // SAFETY: the item allocated above; it was refused, so never queued.
    unsafe { FltFreeGenericWorkItem(another) };
    RAN.fetch_add(1, Ordering::SeqCst);
}

unsafe extern "system" fn slow_generic(item: PFLT_GENERIC_WORKITEM, _object: *const c_void, _ctx: *const c_void) {
    slow_work();
    // SAFETY: the item this routine was queued with.
    unsafe { FltFreeGenericWorkItem(item) };
}

/// Queued during the rundown, which refuses it: never called.
unsafe extern "system" fn never_runs(_item: PFLT_GENERIC_WORKITEM, _object: *const c_void, _ctx: *const c_void) {
    REFUSED_ITEM_RAN.store(true, Ordering::SeqCst);
}

unsafe extern "system" fn slow_replay(
    item: PFLT_DEFERRED_IO_WORKITEM,
    data: *const FLT_CALLBACK_DATA,
    _ctx: *const c_void,
) {
    slow_work();
    // SAFETY: the pended operation's data, handed to this routine.
    unsafe { FltCompletePendedPreOperation(data, FLT_PREOP_SUCCESS_NO_CALLBACK, std::ptr::null()) };
    // SAFETY: the item this routine was queued with.
    unsafe { FltFreeDeferredIoWorkItem(item) };
}

unsafe extern "system" fn unregister_from_own_item(
    item: PFLT_GENERIC_WORKITEM,
    _object: *const c_void,
    _ctx: *const c_void,
) {
    unregister(&FILTER);
    RAN.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the item this routine was queued with.
    unsafe { FltFreeGenericWorkItem(item) };
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    if !PEND_CREATES.load(Ordering::SeqCst) {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    // SAFETY: no preconditions.
    let item = unsafe { FltAllocateDeferredIoWorkItem() };
    // SAFETY: an allocated item and the operation's own callback data.
    let status =
        unsafe { FltQueueDeferredIoWorkItem(item, data, Some(slow_replay), DelayedWorkQueue, std::ptr::null()) };
    DEFERRED_STATUS.store(status, Ordering::SeqCst);
    DEFERRED_QUEUED.set();
    if status < 0 {
        // SAFETY: the item allocated above, never queued.
        unsafe { FltFreeDeferredIoWorkItem(item) };
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    FLT_PREOP_PENDING
}

unsafe extern "system" fn teardown_start(_objects: *const FLT_RELATED_OBJECTS, _reason: u32) {
    TEARDOWN_STARTED.set();
}

unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
    unregister(&FILTER);
    RAN_WHEN_UNREGISTERED.store(RAN.load(Ordering::SeqCst), Ordering::SeqCst);
    STATUS_SUCCESS
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);
static REGISTRATION: Table<FLT_REGISTRATION> = Table(FLT_REGISTRATION {
    InstanceTeardownStartCallback: Some(teardown_start),
    ..registration((&raw const OPERATIONS.0).cast(), Some(unload))
});

unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, _path: *const UNICODE_STRING) -> NTSTATUS {
    // SAFETY: the loader's driver object.
    unsafe { register_and_start(driver, &REGISTRATION, &FILTER) }
}

fn setup() -> fltsim::LoadedDriver {
    let root = io::fresh_root("rundown");
    std::fs::write(root.join("file.txt"), b"data").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("rundown", "Rundown", "320000");
    fltsim::load("rundown", driver_entry).expect("the filter loads")
}

fn queue_generic(routine: unsafe extern "system" fn(PFLT_GENERIC_WORKITEM, *const c_void, *const c_void)) {
    // SAFETY: no preconditions.
    let item = unsafe { FltAllocateGenericWorkItem() };
    let filter = FILTER.load(Ordering::SeqCst);
    // SAFETY: an allocated item and a registered filter.
    let status = unsafe {
        FltQueueGenericWorkItem(item, filter as *const c_void, Some(routine), DelayedWorkQueue, std::ptr::null())
    };
    assert_eq!(status, STATUS_SUCCESS);
}

scenario! {
    /// Generic work items, running and still queued behind busy workers when the unload begins, have all run when
    /// `FltUnregisterFilter` returns; new items are refused with the documented status meanwhile.
    fn unregistering_waits_for_queued_and_running_generic_work_items() {
        let mut driver = setup();
        for _ in 0..ITEMS {
            queue_generic(slow_generic);
        }
        assert_eq!(RAN.load(Ordering::SeqCst), 0, "the items wait for the unload to begin");
        driver.unload(false).expect("unload");
        assert_eq!(
            RAN_WHEN_UNREGISTERED.load(Ordering::SeqCst),
            ITEMS,
            "FltUnregisterFilter returned before the filter's work items had run"
        );
        assert_eq!(*REQUEUE_STATUS.lock().expect("lock"), vec![STATUS_FLT_DELETING_OBJECT; ITEMS]);
        assert!(driver.filters()[0].unregistered);
        work::drain();
        assert!(!REFUSED_ITEM_RAN.load(Ordering::SeqCst));
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// A create pended to a deferred-I/O work item while the filter unloads: `FltUnregisterFilter` waits for the
    /// item, which completes the create, and the caller's open succeeds.
    fn unregistering_waits_for_a_deferred_io_work_item() {
        let mut driver = setup();
        PEND_CREATES.store(true, Ordering::SeqCst);
        let opener = std::thread::spawn(|| {
            let opened = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default());
            opened.map(iomgr::close).is_ok()
        });
        DEFERRED_QUEUED.wait();
        assert_eq!(DEFERRED_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        driver.unload(false).expect("unload");
        assert_eq!(
            RAN_WHEN_UNREGISTERED.load(Ordering::SeqCst),
            1,
            "FltUnregisterFilter returned before the deferred work item had run"
        );
        assert!(opener.join().expect("the opener"), "the pended create completes and succeeds");
        assert_eq!(*REQUEUE_STATUS.lock().expect("lock"), [STATUS_FLT_DELETING_OBJECT]);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// A filter unregistering itself from its own work item would wait for that item forever. The model reports
    /// it, finishes the unregistration without waiting for the calling item, and does not hang.
    fn unregistering_from_the_filters_own_work_item_is_reported_and_does_not_hang() {
        let mut driver = setup();
        queue_generic(unregister_from_own_item);
        work::drain();
        assert_eq!(RAN.load(Ordering::SeqCst), 1, "the item went on after FltUnregisterFilter");
        assert!(TEARDOWN_STARTED.is_set(), "the instances were torn down");
        assert!(driver.filters()[0].unregistered);
        assert_eq!(take_rules(), [Rule::UnregisterWaitsForItself]);
        // Nothing is left to unload, and nothing leaked.
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// Quiet: an unload with no work items outstanding breaks no rule and returns at once.
    fn unregistering_without_work_items_breaks_no_rule() {
        let mut driver = setup();
        driver.unload(false).expect("unload");
        assert_eq!(RAN_WHEN_UNREGISTERED.load(Ordering::SeqCst), 0);
        assert!(TEARDOWN_STARTED.is_set());
        assert!(driver.filters()[0].unregistered);
        assert_eq!(take_rules(), []);
    }
}
