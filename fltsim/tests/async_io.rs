//! Asynchronous filter-initiated I/O: a filter opens a backing file from its pre-create, below its own instance,
//! and reads or writes it with `FltReadFileEx` / `FltWriteFileEx` and a completion callback. The call returns
//! `STATUS_PENDING`; the callback runs later on a system worker at an IRQL no higher than DISPATCH_LEVEL, with the
//! data in the buffer and the status and count in the callback data's `IoStatus`. A filter that waits for its
//! callbacks before it unregisters breaks no rule; one that unloads with I/O in flight is reported.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicIsize, AtomicPtr, AtomicU8, AtomicUsize, Ordering},
        mpsc::{self, Receiver, Sender},
    },
    thread::ThreadId,
    time::Duration,
};

use fltsim::{
    Rule,
    fltmgr::fileio::{hold_async_completions, outstanding_async_io},
    io::{self, VolumeSpec, iomgr},
    scenario,
    testfilters::build::{END, Table, open_file, operation, register_and_start, registration, unregister},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::{
        Foundation::{DRIVER_OBJECT, FILE_OBJECT, KEVENT},
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_NO_CALLBACK,
            FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltClose, FltReadFileEx, FltWriteFileEx,
        },
        System::SystemServices::{
            ExAllocatePool2, ExFreePoolWithTag, Executive, IO_FORCE_ACCESS_CHECK, KeGetCurrentIrql, KeInitializeEvent,
            KeSetEvent, KeWaitForSingleObject, ObfDereferenceObject,
        },
    },
    Win32::{
        Foundation::{
            HANDLE, NTSTATUS, OBJ_KERNEL_HANDLE, STATUS_END_OF_FILE, STATUS_PENDING, STATUS_SUCCESS, UNICODE_STRING,
        },
        System::Kernel::NotificationEvent,
    },
};

/// `POOL_FLAG_NON_PAGED`: the callback may run at DISPATCH_LEVEL, so what it touches is nonpaged.
const NON_PAGED: u64 = 0x40;
const TAG: u32 = u32::from_le_bytes(*b"AsIo");
const LENGTH: u32 = 64;
/// What the out-pointer for the byte count holds before the call; an asynchronous call must leave it alone.
const UNTOUCHED: u32 = 0xDEAD_BEEF;
const WRITTEN: &[u8] = b"async!";
const IRP_MJ_READ: u8 = 3;
const IRP_MJ_WRITE: u8 = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Reads the backing file asynchronously; the unload waits for the callback.
    Read,
    /// Reads past the end of the backing file asynchronously.
    ReadPastEnd,
    /// Writes the backing file asynchronously; the unload waits for the callback.
    Write,
    /// Reads asynchronously and unregisters without waiting for the callback.
    UnloadWithoutWaiting,
}

fn mode() -> Mode {
    const ALL: [Mode; 4] = [Mode::Read, Mode::ReadPastEnd, Mode::Write, Mode::UnloadWithoutWaiting];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

/// What the issuing call returned.
#[derive(Clone, Copy, Debug)]
struct Issued {
    status: NTSTATUS,
    count: u32,
    thread: ThreadId,
    context: usize,
}

/// What the completion callback saw.
#[derive(Clone, Debug)]
struct Completed {
    status: NTSTATUS,
    information: usize,
    major: u8,
    data: Vec<u8>,
    irql: u8,
    thread: ThreadId,
    thread_name: String,
    context: usize,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static FILTER: AtomicIsize = AtomicIsize::new(0);
/// Signalled by the completion callback; the unload of a correct filter waits for it.
static DONE: AtomicPtr<KEVENT> = AtomicPtr::new(null_mut());
/// How many asynchronous I/Os the filter issued.
static ISSUED_COUNT: AtomicUsize = AtomicUsize::new(0);
static ISSUED: Mutex<Option<Issued>> = Mutex::new(None);
static COMPLETED: Mutex<Option<Sender<Completed>>> = Mutex::new(None);

fn name_of(data: &FLT_CALLBACK_DATA) -> String {
    // SAFETY: Filter Manager passes this callback's data.
    unsafe { fltsim::testfilters::build::target_name(data) }
}

/// The `PFLT_COMPLETED_ASYNC_IO_CALLBACK`: records what it sees, frees the buffer (its context) and signals `DONE`.
unsafe extern "system" fn completed(data: *const FLT_CALLBACK_DATA, context: *mut c_void) {
    // SAFETY: Filter Manager passes the callback data of the completed I/O.
    let data = unsafe { &*data };
    // SAFETY: the status is set for every completed I/O.
    let status = unsafe { data.IoStatus.Anonymous.Status };
    let information = data.IoStatus.Information;
    // SAFETY: the callback data's parameter block is valid during the callback.
    let major = unsafe { (*data.Iopb).MajorFunction };
    let buffer = context.cast::<u8>();
    let data = if major == IRP_MJ_READ {
        let n = information.min(LENGTH as usize);
        // SAFETY: the context is the pool buffer of LENGTH bytes the read filled.
        unsafe { std::slice::from_raw_parts(buffer, n) }.to_vec()
    } else {
        Vec::new()
    };
    // SAFETY: the pool buffer allocated for this I/O, freed once here.
    unsafe { ExFreePoolWithTag(context, TAG) };
    let completed = Completed {
        status,
        information,
        major,
        data,
        // SAFETY: callable at any IRQL.
        irql: unsafe { KeGetCurrentIrql() },
        thread: std::thread::current().id(),
        thread_name: std::thread::current().name().unwrap_or("").to_owned(),
        context: context as usize,
    };
    if let Some(sender) = COMPLETED.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
        let _ = sender.send(completed);
    }
    // SAFETY: the event DriverEntry initialised; KeSetEvent is callable at DISPATCH_LEVEL with Wait FALSE.
    unsafe { KeSetEvent(DONE.load(Ordering::SeqCst), 0, false) };
}

/// Opens `\backing.txt` below `objects.Instance`; returns the handle and the referenced file object.
fn open_backing(objects: &FLT_RELATED_OBJECTS) -> Option<(HANDLE, *mut FILE_OBJECT)> {
    open_file(objects.Filter, objects.Instance, r"\??\C:\backing.txt", OBJ_KERNEL_HANDLE, IO_FORCE_ACCESS_CHECK).ok()
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
    if !name_of(data).eq_ignore_ascii_case("\\source.txt") {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    let Some((handle, file_object)) = open_backing(objects) else { return FLT_PREOP_SUCCESS_NO_CALLBACK };
    // SAFETY: plain values; the buffer lives until the completion callback frees it.
    let buffer = unsafe { ExAllocatePool2(NON_PAGED, LENGTH as usize, TAG) };
    if !buffer.is_null() {
        let offset: i64 = if mode() == Mode::ReadPastEnd { 4096 } else { 0 };
        let mut count = UNTOUCHED;
        ISSUED_COUNT.fetch_add(1, Ordering::SeqCst);
        let status = if mode() == Mode::Write {
            // SAFETY: the pool buffer holds LENGTH bytes, more than WRITTEN.
            unsafe { std::ptr::copy_nonoverlapping(WRITTEN.as_ptr(), buffer.cast::<u8>(), WRITTEN.len()) };
            // SAFETY: a file object from FltCreateFileEx2 and a pool buffer that outlives the I/O.
            unsafe {
                FltWriteFileEx(
                    objects.Instance,
                    file_object,
                    &raw const offset,
                    u32::try_from(WRITTEN.len()).expect("short"),
                    buffer,
                    0,
                    &raw mut count,
                    Some(completed),
                    buffer,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            }
        } else {
            // SAFETY: as above.
            unsafe {
                FltReadFileEx(
                    objects.Instance,
                    file_object,
                    &raw const offset,
                    LENGTH,
                    buffer,
                    0,
                    &raw mut count,
                    Some(completed),
                    buffer,
                    std::ptr::null(),
                    std::ptr::null(),
                )
            }
        };
        let issued = Issued { status, count, thread: std::thread::current().id(), context: buffer as usize };
        *ISSUED.lock().unwrap_or_else(PoisonError::into_inner) = Some(issued);
    }
    // The request holds its own reference to the file object: the handle and reference can go at once.
    // SAFETY: the handle and the referenced file object from FltCreateFileEx2, released once each.
    unsafe { FltClose(handle) };
    // SAFETY: as above.
    unsafe { ObfDereferenceObject(file_object.cast()) };
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, _path: *const UNICODE_STRING) -> NTSTATUS {
    let event = Box::into_raw(Box::new(KEVENT::default()));
    // SAFETY: a fresh event that lives for the rest of the process.
    unsafe { KeInitializeEvent(event, NotificationEvent, false) };
    DONE.store(event, Ordering::SeqCst);
    // SAFETY: the loader's driver object.
    unsafe { register_and_start(driver, &REGISTRATION, &FILTER) }
}

unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
    if mode() != Mode::UnloadWithoutWaiting && ISSUED_COUNT.load(Ordering::SeqCst) > 0 {
        // Instance teardown would wait for the I/O the filter issued: wait for its callback first.
        // SAFETY: the event DriverEntry initialised; waiting at PASSIVE_LEVEL without a timeout.
        unsafe {
            KeWaitForSingleObject(
                DONE.load(Ordering::SeqCst).cast_const().cast(),
                Executive,
                0,
                false,
                std::ptr::null(),
            )
        };
    }
    unregister(&FILTER);
    STATUS_SUCCESS
}

/// Mounts `C:` with the source and backing files, loads the filter in `mode`, and returns the driver and the
/// receiver of the callback's observations.
fn setup(mode: Mode) -> (fltsim::LoadedDriver, Receiver<Completed>) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let (sender, receiver) = mpsc::channel();
    *COMPLETED.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    let root = io::fresh_root("async-io");
    std::fs::write(root.join("source.txt"), b"source data").expect("seed");
    std::fs::write(root.join("backing.txt"), b"backing data").expect("seed");
    let _volume = io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("asynciotest", "AsyncIo Instance", "135000");
    (fltsim::load("asynciotest", driver_entry).expect("load"), receiver)
}

/// Opens `C:\source.txt` from user mode, which makes the filter issue its I/O; returns what the call returned.
fn open_source() -> Issued {
    let handle = iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).expect("the source opens");
    iomgr::close(handle);
    ISSUED.lock().unwrap_or_else(PoisonError::into_inner).expect("the filter issued its I/O")
}

/// Waits for the completion callback (a channel, not a sleep; the timeout only keeps a broken model from hanging
/// the test run).
fn wait_for_callback(receiver: &Receiver<Completed>) -> Completed {
    receiver.recv_timeout(Duration::from_mins(1)).expect("the completion callback runs")
}

scenario! {
    fn an_asynchronous_read_pends_and_its_callback_gets_the_data_on_a_worker() {
        let (mut driver, receiver) = setup(Mode::Read);
        let issued = open_source();
        assert_eq!(issued.status, STATUS_PENDING);
        assert_eq!(issued.count, UNTOUCHED, "BytesRead is ignored for an asynchronous read");
        let done = wait_for_callback(&receiver);
        assert_eq!(done.status, STATUS_SUCCESS);
        assert_eq!(done.information, b"backing data".len());
        assert_eq!(done.major, IRP_MJ_READ);
        assert_eq!(done.data, b"backing data");
        assert_eq!(done.context, issued.context);
        assert!(done.irql <= 2, "the callback runs at or below DISPATCH_LEVEL, not at {}", done.irql);
        assert_ne!(done.thread, issued.thread, "the callback runs on another thread");
        assert!(done.thread_name.starts_with("System: worker"), "on a system worker, not {}", done.thread_name);
        driver.unload(false).expect("unload");
        assert_eq!(outstanding_async_io(), 0);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn an_asynchronous_read_past_the_end_completes_with_end_of_file() {
        let (mut driver, receiver) = setup(Mode::ReadPastEnd);
        let issued = open_source();
        assert_eq!(issued.status, STATUS_PENDING);
        let done = wait_for_callback(&receiver);
        assert_eq!(done.status, STATUS_END_OF_FILE);
        assert_eq!(done.information, 0);
        assert_eq!(done.data, b"");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn an_asynchronous_write_lands_in_the_file() {
        let (mut driver, receiver) = setup(Mode::Write);
        let issued = open_source();
        assert_eq!(issued.status, STATUS_PENDING);
        assert_eq!(issued.count, UNTOUCHED, "BytesWritten is ignored for an asynchronous write");
        let done = wait_for_callback(&receiver);
        assert_eq!(done.status, STATUS_SUCCESS);
        assert_eq!(done.information, WRITTEN.len());
        assert_eq!(done.major, IRP_MJ_WRITE);
        driver.unload(false).expect("unload");
        let handle = iomgr::create(r"C:\backing.txt", &iomgr::OpenParams::default()).expect("the backing opens");
        let contents = iomgr::read(&handle, Some(0), 64).expect("the backing reads");
        iomgr::close(handle);
        assert_eq!(contents, b"async!g data");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn unloading_with_asynchronous_io_outstanding_is_reported() {
        let hold = hold_async_completions();
        let (mut driver, receiver) = setup(Mode::UnloadWithoutWaiting);
        let issued = open_source();
        assert_eq!(issued.status, STATUS_PENDING);
        assert_eq!(outstanding_async_io(), 1);
        driver.unload(false).expect("unload");
        // The buffer still in flight is still allocated, so it is also pool left at unload.
        assert_eq!(take_rules(), [Rule::AsyncIoOutstandingAtUnload, Rule::PoolLeak]);
        drop(hold);
        let done = wait_for_callback(&receiver);
        assert_eq!(done.status, STATUS_SUCCESS);
        assert_eq!(done.data, b"backing data");
        fltsim::kernel::work::drain();
        assert_eq!(outstanding_async_io(), 0);
        assert_eq!(take_rules(), [], "reported once, not again when it completes");
    }
}
