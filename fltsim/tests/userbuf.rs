//! User buffers that mean nothing outside their process, and `FltLockUserBuffer`: a filter above the file system
//! posts a user's read or write to a system worker (as Shunt does at APC_LEVEL). Posted with the raw user address,
//! the file system (or `FltReadFileEx`) touches it in the System process: reported. Locked first, the MDL carries
//! the data in any process.

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicI32, AtomicU8, AtomicUsize, Ordering},
    },
};

use fltsim::{
    Rule,
    fltmgr::userbuf::{self, MDL_PAGES_LOCKED, MDL_TAG},
    io::{self, VolumeSpec, iomgr},
    kernel::{
        irql,
        pool::{self, FailurePlan},
        process, thread,
    },
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::{
        Foundation::MDL,
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_IO_PARAMETER_BLOCK, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS,
            FLT_PREOP_COMPLETE, FLT_PREOP_PENDING, FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION,
            FLT_RELATED_OBJECTS, FLTFL_CALLBACK_DATA_DIRTY, FltAllocateDeferredIoWorkItem,
            FltCompletePendedPreOperation, FltFreeDeferredIoWorkItem, FltLockUserBuffer, FltQueueDeferredIoWorkItem,
            FltReadFileEx, PFLT_DEFERRED_IO_WORKITEM, PFLT_INSTANCE,
        },
        System::SystemServices::{DelayedWorkQueue, IRP_MN_MDL},
    },
    Win32::Foundation::{
        NTSTATUS, STATUS_ACCESS_VIOLATION, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER,
        STATUS_NOT_IMPLEMENTED, STATUS_SUCCESS,
    },
    Win32::Storage::FileSystem::{FILE_READ_DATA, FILE_WRITE_DATA, SYNCHRONIZE},
};

/// What the filter does with each read and write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Let it pass.
    Pass,
    /// Post it to a worker that passes it down: the file system runs in the System process.
    PostRaw,
    /// Lock the buffer, then post it as `PostRaw` does.
    PostLocked,
    /// Post it to a worker that serves it with `FltReadFileEx` into the raw user buffer and completes it.
    ServeRaw,
    /// Lock the buffer and post it to a worker that serves it with `FltReadFileEx` into the MDL.
    ServeLocked,
    /// Serve it in the pre-operation callback, in the requestor's thread, into the raw user buffer.
    ServeInline,
    /// Post it to a worker that serves it with `FltReadFileEx` and an MDL the model did not build.
    ServeForeignMdl,
    /// Call `FltLockUserBuffer` at DISPATCH_LEVEL, then pass.
    LockAtDispatch,
    /// Call `FltLockUserBuffer` on an `IRP_MN_MDL` read, then pass.
    LockMdlMinor,
    /// Lock twice; complete the operation with the lock's status if it fails.
    LockTwice,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static LOCK_STATUS: AtomicI32 = AtomicI32::new(0);
static SECOND_LOCK_STATUS: AtomicI32 = AtomicI32::new(0);
static READ_STATUS: AtomicI32 = AtomicI32::new(0);
static INSTANCE: AtomicUsize = AtomicUsize::new(0);
/// What the filter saw after locking.
static LOCKED: Mutex<Option<Locked>> = Mutex::new(None);

#[derive(Clone, Copy, Debug)]
struct Locked {
    mdl: usize,
    dirty: bool,
    byte_count: u32,
    flags: i16,
    process: usize,
    start: usize,
}

fn mode() -> Mode {
    const ALL: [Mode; 10] = [
        Mode::Pass,
        Mode::PostRaw,
        Mode::PostLocked,
        Mode::ServeRaw,
        Mode::ServeLocked,
        Mode::ServeInline,
        Mode::ServeForeignMdl,
        Mode::LockAtDispatch,
        Mode::LockMdlMinor,
        Mode::LockTwice,
    ];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

/// The operation's callback data, which the filter may change while it holds the operation.
fn data_mut<'a>(data: *const FLT_CALLBACK_DATA) -> &'a mut FLT_CALLBACK_DATA {
    // SAFETY: callback data the model handed to this filter, alive while the filter holds the operation.
    unsafe { &mut *data.cast_mut() }
}

/// The operation's parameter block.
fn iopb_of<'a>(data: *const FLT_CALLBACK_DATA) -> &'a mut FLT_IO_PARAMETER_BLOCK {
    let iopb = data_mut(data).Iopb.cast_mut();
    // SAFETY: the parameter block lives as long as its callback data.
    unsafe { &mut *iopb }
}

/// The parameters a read or write carries: (buffer, length, MDL, byte offset).
fn buffer_of(data: *const FLT_CALLBACK_DATA) -> (*mut c_void, u32, *mut MDL, i64) {
    // SAFETY: reads and writes share the layout of Length, Key, ByteOffset, buffer and MdlAddress.
    let read = unsafe { iopb_of(data).Parameters.Read };
    (read.ReadBuffer, read.Length, read.MdlAddress, read.ByteOffset)
}

fn set_status(data: *const FLT_CALLBACK_DATA, status: NTSTATUS, information: usize) {
    let data = data_mut(data);
    data.IoStatus.Anonymous.Status = status;
    data.IoStatus.Information = information;
}

fn instance() -> PFLT_INSTANCE {
    INSTANCE.load(Ordering::SeqCst).cast_signed()
}

fn lock(data: *mut FLT_CALLBACK_DATA) -> NTSTATUS {
    // SAFETY: the operation's callback data.
    let status = unsafe { FltLockUserBuffer(data) };
    LOCK_STATUS.store(status, Ordering::SeqCst);
    if status >= 0 {
        let (_, _, mdl, _) = buffer_of(data);
        // SAFETY: FltLockUserBuffer stored the MDL it built, which lives as long as the callback data.
        let m = unsafe { &*mdl };
        *LOCKED.lock().expect("lock") = Some(Locked {
            mdl: mdl as usize,
            dirty: data_mut(data).Flags & FLTFL_CALLBACK_DATA_DIRTY != 0,
            byte_count: m.ByteCount,
            flags: m.MdlFlags,
            process: m.Process as usize,
            start: m.StartVa as usize + m.ByteOffset as usize,
        });
    }
    status
}

/// Reads the operation's range with `FltReadFileEx` into `buffer` or `mdl` (exactly one is used) and records the
/// status; returns it and the count.
fn read_backing(data: *const FLT_CALLBACK_DATA, buffer: *mut c_void, mdl: *mut MDL) -> (NTSTATUS, u32) {
    let (_, length, _, offset) = buffer_of(data);
    let file_object = iopb_of(data).TargetFileObject;
    let mut read = 0u32;
    // SAFETY: an attached instance, the operation's open file object, and exactly one of buffer and MDL.
    let status = unsafe {
        FltReadFileEx(
            instance(),
            file_object,
            &raw const offset,
            length,
            buffer,
            0,
            &raw mut read,
            None,
            std::ptr::null(),
            std::ptr::null(),
            mdl,
        )
    };
    READ_STATUS.store(status, Ordering::SeqCst);
    (status, read)
}

/// Serves a pended read from the worker with `FltReadFileEx`, into the MDL or the raw buffer, and completes it.
fn serve(data: *const FLT_CALLBACK_DATA, mdl: *mut MDL) {
    let target = if mdl.is_null() { buffer_of(data).0 } else { std::ptr::null_mut() };
    let (status, read) = read_backing(data, target, mdl);
    set_status(data, status, read as usize);
    // SAFETY: the pended operation's callback data, which the filter completes once.
    unsafe { FltCompletePendedPreOperation(data.cast_mut(), FLT_PREOP_COMPLETE, std::ptr::null()) };
}

unsafe extern "system" fn worker(item: PFLT_DEFERRED_IO_WORKITEM, data: *const FLT_CALLBACK_DATA, _ctx: *const c_void) {
    match mode() {
        Mode::ServeRaw => serve(data, std::ptr::null_mut()),
        Mode::ServeLocked => serve(data, buffer_of(data).2),
        Mode::ServeForeignMdl => {
            // An MDL the driver built by hand over the right memory: the model knows only the ones it built.
            let (buffer, length, _, _) = buffer_of(data);
            let mut foreign = MDL { StartVa: buffer, ByteCount: length, ..MDL::default() };
            serve(data, &raw mut foreign);
        }
        // SAFETY: the pended operation's callback data.
        _ => unsafe { FltCompletePendedPreOperation(data, FLT_PREOP_SUCCESS_NO_CALLBACK, std::ptr::null()) },
    }
    // SAFETY: the item this routine was queued with.
    unsafe { FltFreeDeferredIoWorkItem(item) };
}

fn post(data: *mut FLT_CALLBACK_DATA) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: no preconditions.
    let item = unsafe { FltAllocateDeferredIoWorkItem() };
    // SAFETY: an allocated item and the operation's own callback data.
    let status = unsafe { FltQueueDeferredIoWorkItem(item, data, Some(worker), DelayedWorkQueue, std::ptr::null()) };
    assert_eq!(status, STATUS_SUCCESS, "posting is allowed here");
    FLT_PREOP_PENDING
}

fn fail_with(data: *mut FLT_CALLBACK_DATA, status: NTSTATUS) -> FLT_PREOP_CALLBACK_STATUS {
    set_status(data, status, 0);
    FLT_PREOP_COMPLETE
}

unsafe extern "system" fn pre_io(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: the related objects of this operation.
    INSTANCE.store(unsafe { (*objects).Instance }.cast_unsigned(), Ordering::SeqCst);
    match mode() {
        Mode::Pass => FLT_PREOP_SUCCESS_NO_CALLBACK,
        Mode::PostRaw | Mode::ServeRaw | Mode::ServeForeignMdl => post(data),
        Mode::PostLocked | Mode::ServeLocked => {
            let status = lock(data);
            if status < 0 {
                return fail_with(data, status);
            }
            post(data)
        }
        Mode::ServeInline => {
            serve_inline(data);
            FLT_PREOP_COMPLETE
        }
        Mode::LockAtDispatch => {
            // SAFETY: the operation's callback data.
            let status = thread::at_irql(irql::DISPATCH, || unsafe { FltLockUserBuffer(data) });
            LOCK_STATUS.store(status, Ordering::SeqCst);
            FLT_PREOP_SUCCESS_NO_CALLBACK
        }
        Mode::LockMdlMinor => {
            let iopb = iopb_of(data);
            let minor = iopb.MinorFunction;
            iopb.MinorFunction = u8::try_from(IRP_MN_MDL).expect("a minor code");
            // SAFETY: the operation's callback data.
            LOCK_STATUS.store(unsafe { FltLockUserBuffer(data) }, Ordering::SeqCst);
            iopb_of(data).MinorFunction = minor;
            FLT_PREOP_SUCCESS_NO_CALLBACK
        }
        Mode::LockTwice => {
            let status = lock(data);
            if status < 0 {
                return fail_with(data, status);
            }
            // SAFETY: the operation's callback data.
            SECOND_LOCK_STATUS.store(unsafe { FltLockUserBuffer(data) }, Ordering::SeqCst);
            FLT_PREOP_SUCCESS_NO_CALLBACK
        }
    }
}

fn serve_inline(data: *mut FLT_CALLBACK_DATA) {
    let (status, read) = read_backing(data, buffer_of(data).0, std::ptr::null_mut());
    set_status(data, status, read as usize);
}

/// `IRP_MJ_READ` and `IRP_MJ_WRITE`.
const IRP_MJ_READ: u8 = 3;
const IRP_MJ_WRITE: u8 = 4;

static OPS: Table<[FLT_OPERATION_REGISTRATION; 3]> = Table([
    operation(IRP_MJ_READ, Some(pre_io), None),
    operation(IRP_MJ_WRITE, Some(pre_io), None),
    operation(END, None, None),
]);
static REG: Table<FLT_REGISTRATION> = Table(registration((&raw const OPS.0).cast(), Some(unload)));
fltsim::minifilter_entry_points!(REG, FILTER, entry, unload);

const CONTENT: &[u8] = b"the backing data of a posted read";

fn setup(mode: Mode) -> (fltsim::LoadedDriver, std::sync::Arc<process::Process>) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("userbuf");
    std::fs::write(root.join("file.txt"), CONTENT).expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("poster", "Poster", "320000");
    let driver = fltsim::load("poster", entry).expect("loads");
    let user = process::create(
        r"\Device\HarddiskVolume1\Apps\legacy.exe",
        process::Token { user: "alice".into(), admin: false },
    );
    (driver, user)
}

fn writer() -> iomgr::OpenParams {
    iomgr::OpenParams { desired_access: FILE_READ_DATA | FILE_WRITE_DATA | SYNCHRONIZE, ..iomgr::OpenParams::default() }
}

fn read_as(user: &std::sync::Arc<process::Process>) -> Result<Vec<u8>, NTSTATUS> {
    process::run_as(user, || {
        let handle = iomgr::create(r"C:\file.txt", &iomgr::OpenParams::default()).expect("opens");
        let result = iomgr::read(&handle, Some(0), 64);
        iomgr::close(handle);
        result
    })
}

scenario! {
    /// The file system fills a raw user buffer in the worker's process: the address means nothing there.
    fn a_read_posted_with_its_raw_user_buffer_is_reported() {
        let (_driver, user) = setup(Mode::PostRaw);
        assert_eq!(read_as(&user), Err(STATUS_ACCESS_VIOLATION));
        assert_eq!(take_rules(), [Rule::UserBufferUnsafeAccess]);
    }
}

scenario! {
    /// Locked in the pre-operation callback, the buffer is an MDL the file system fills from the worker.
    fn a_read_posted_after_locking_its_buffer_gets_its_data() {
        let (mut driver, user) = setup(Mode::PostLocked);
        assert_eq!(read_as(&user).as_deref(), Ok(CONTENT));
        assert_eq!(LOCK_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        let locked = LOCKED.lock().expect("lock").expect("locked");
        assert_ne!(locked.mdl, 0);
        assert!(locked.dirty, "an MDL allocated in pre-operation marks the callback data dirty");
        assert_eq!(locked.byte_count, 64);
        assert_eq!(locked.flags & MDL_PAGES_LOCKED, MDL_PAGES_LOCKED);
        assert_eq!(locked.process, user.peprocess().cast_unsigned(), "the MDL names the requestor's process");
        assert_ne!(locked.start, 0);
        assert_eq!(userbuf::live_mdls(), 0, "the MDL is freed with the callback data");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// A write posted with its raw buffer: the file system takes the data in the wrong process.
    fn a_write_posted_with_its_raw_user_buffer_is_reported() {
        let (_driver, user) = setup(Mode::PostRaw);
        let written = process::run_as(&user, || {
            let handle = iomgr::create(r"C:\file.txt", &writer()).expect("opens");
            let result = iomgr::write(&handle, Some(0), b"XYZ");
            iomgr::close(handle);
            result
        });
        assert_eq!(written, Err(STATUS_ACCESS_VIOLATION));
        assert_eq!(take_rules(), [Rule::UserBufferUnsafeAccess]);
    }
}

scenario! {
    fn a_write_posted_after_locking_its_buffer_reaches_the_file() {
        let (_driver, user) = setup(Mode::PostLocked);
        let root_file = process::run_as(&user, || {
            let handle = iomgr::create(r"C:\file.txt", &writer()).expect("opens");
            let result = iomgr::write(&handle, Some(0), b"XYZ");
            iomgr::close(handle);
            result
        });
        assert_eq!(root_file, Ok(3));
        MODE.store(Mode::Pass as u8, Ordering::SeqCst);
        assert_eq!(read_as(&user).expect("reads")[..5], *b"XYZ b");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// Shunt's pattern done wrong: the worker reads the backing data into the caller's raw buffer.
    fn flt_read_file_ex_into_a_raw_user_buffer_from_a_worker_is_reported() {
        let (_driver, user) = setup(Mode::ServeRaw);
        assert_eq!(read_as(&user), Err(STATUS_ACCESS_VIOLATION));
        assert_eq!(READ_STATUS.load(Ordering::SeqCst), STATUS_ACCESS_VIOLATION);
        assert_eq!(take_rules(), [Rule::UserBufferUnsafeAccess]);
    }
}

scenario! {
    /// Shunt's pattern done right: locked before posting, the MDL itself is passed to FltReadFileEx.
    fn flt_read_file_ex_into_the_locked_mdl_from_a_worker_fills_the_callers_buffer() {
        let (_driver, user) = setup(Mode::ServeLocked);
        assert_eq!(read_as(&user).as_deref(), Ok(CONTENT));
        assert_eq!(READ_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// In the requestor's own thread the raw buffer is fine: no lock, no MDL, no report.
    fn flt_read_file_ex_into_the_raw_buffer_in_the_requestors_thread_is_quiet() {
        let (_driver, user) = setup(Mode::ServeInline);
        assert_eq!(read_as(&user).as_deref(), Ok(CONTENT));
        assert_eq!(READ_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn an_mdl_the_model_did_not_build_is_reported_as_unsupported() {
        let (_driver, user) = setup(Mode::ServeForeignMdl);
        assert_eq!(read_as(&user), Err(STATUS_NOT_IMPLEMENTED));
        assert_eq!(take_rules(), [Rule::UnsupportedByModel]);
    }
}

scenario! {
    fn flt_lock_user_buffer_above_apc_level_is_reported() {
        let (_driver, user) = setup(Mode::LockAtDispatch);
        assert!(read_as(&user).is_ok());
        assert_eq!(LOCK_STATUS.load(Ordering::SeqCst), STATUS_INVALID_PARAMETER);
        assert_eq!(take_rules(), [Rule::IrqlTooHigh]);
    }
}

scenario! {
    /// The docs: IRP_MN_MDL reads and writes cannot be locked (the file system builds that MDL).
    fn flt_lock_user_buffer_refuses_an_mdl_minor_read() {
        let (_driver, user) = setup(Mode::LockMdlMinor);
        assert_eq!(read_as(&user).as_deref(), Ok(CONTENT));
        assert_eq!(LOCK_STATUS.load(Ordering::SeqCst), STATUS_INVALID_PARAMETER);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// Locking again answers success and keeps the same MDL.
    fn locking_twice_keeps_the_first_mdl() {
        let (_driver, user) = setup(Mode::LockTwice);
        assert_eq!(read_as(&user).as_deref(), Ok(CONTENT));
        assert_eq!(SECOND_LOCK_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        assert_eq!(userbuf::live_mdls(), 0);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// The MDL comes from pool: an injected failure answers STATUS_INSUFFICIENT_RESOURCES, which the filter passes on.
    fn a_pool_failure_fails_the_lock() {
        let (_driver, user) = setup(Mode::PostLocked);
        pool::set_failure_plan(FailurePlan::Tag(MDL_TAG));
        assert_eq!(read_as(&user), Err(STATUS_INSUFFICIENT_RESOURCES));
        pool::set_failure_plan(FailurePlan::Never);
        assert_eq!(LOCK_STATUS.load(Ordering::SeqCst), STATUS_INSUFFICIENT_RESOURCES);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// Callback data the model did not hand out (or whose operation is over) is not lockable.
    fn flt_lock_user_buffer_on_data_not_in_flight_is_reported() {
        // SAFETY: all-zero callback data is a valid value to point at; the model checks it is not live.
        let data: FLT_CALLBACK_DATA = unsafe { std::mem::zeroed() };
        // SAFETY: the model checks the pointer before using it.
        let status = unsafe { FltLockUserBuffer(&raw const data) };
        assert_eq!(status, STATUS_INVALID_PARAMETER);
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    /// A kernel-mode request's buffer is kernel memory: a worker may touch it.
    fn a_kernel_mode_read_posted_with_its_buffer_is_quiet() {
        let (_driver, user) = setup(Mode::PostRaw);
        let params = iomgr::OpenParams { kernel_mode: true, ..iomgr::OpenParams::default() };
        let data = process::run_as(&user, || {
            let handle = iomgr::create(r"C:\file.txt", &params).expect("opens");
            let result = iomgr::read(&handle, Some(0), 64);
            iomgr::close(handle);
            result
        });
        assert_eq!(data.as_deref(), Ok(CONTENT));
        assert_eq!(take_rules(), []);
    }
}
