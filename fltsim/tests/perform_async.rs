//! `FltPerformAsynchronousIo`: a filter builds a read or write with `FltAllocateCallbackData` on a backing file it
//! opened below its own instance, and performs it asynchronously. The call returns `STATUS_PENDING`; the callback
//! runs later on a system worker at an IRQL no higher than DISPATCH_LEVEL, with the filter's own callback data and
//! its final `IoStatus`, and frees the data, as the docs allow. Freeing or performing the data again before the
//! callback, an asynchronous `IRP_MJ_CREATE`, and unloading with the I/O in flight are reported.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU8, Ordering},
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
    testfilters::build::{END, Table, open_file, operation, registration},
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_SUCCESS_NO_CALLBACK,
            FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltAllocateCallbackData, FltClose, FltFreeCallbackData,
            FltPerformAsynchronousIo, FltPerformSynchronousIo,
        },
        System::SystemServices::{
            ExAllocatePool2, ExFreePoolWithTag, IO_FORCE_ACCESS_CHECK, KeGetCurrentIrql, ObfDereferenceObject,
        },
    },
    Win32::Foundation::{
        NTSTATUS, OBJ_KERNEL_HANDLE, STATUS_FLT_INVALID_ASYNCHRONOUS_REQUEST, STATUS_PENDING, STATUS_SUCCESS,
    },
};

/// `POOL_FLAG_NON_PAGED`: the callback may run at DISPATCH_LEVEL, so what it touches is nonpaged.
const NON_PAGED: u64 = 0x40;
const TAG: u32 = u32::from_le_bytes(*b"PAIo");
const LENGTH: u32 = 64;
const WRITTEN: &[u8] = b"async!";
const IRP_MJ_CREATE: u8 = 0;
const IRP_MJ_READ: u8 = 3;
const IRP_MJ_WRITE: u8 = 4;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Reads the backing file asynchronously.
    Read,
    /// Writes the backing file asynchronously.
    Write,
    /// Reads asynchronously, then frees the data and performs it again before the callback.
    Misuse,
    /// Builds an `IRP_MJ_CREATE` and performs it asynchronously.
    Create,
}

fn mode() -> Mode {
    const ALL: [Mode; 4] = [Mode::Read, Mode::Write, Mode::Misuse, Mode::Create];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

/// What the issuing call returned.
#[derive(Clone, Copy, Debug)]
struct Issued {
    status: NTSTATUS,
    thread: ThreadId,
    data: usize,
}

/// What the completion callback saw.
#[derive(Clone, Debug)]
struct Completed {
    status: NTSTATUS,
    information: usize,
    major: u8,
    bytes: Vec<u8>,
    irql: u8,
    thread: ThreadId,
    thread_name: String,
    data: usize,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static ISSUED: Mutex<Option<Issued>> = Mutex::new(None);
static COMPLETED: Mutex<Option<Sender<Completed>>> = Mutex::new(None);

/// The `PFLT_COMPLETED_ASYNC_IO_CALLBACK`: records what it sees, frees the callback data (allowed once the callback
/// runs) and the buffer (its context).
unsafe extern "system" fn completed(data: *const FLT_CALLBACK_DATA, context: *mut c_void) {
    // SAFETY: Filter Manager passes the callback data of the completed I/O.
    let built = unsafe { &*data };
    // SAFETY: the status is set for every completed I/O.
    let status = unsafe { built.IoStatus.Anonymous.Status };
    let information = built.IoStatus.Information;
    // SAFETY: the callback data's parameter block is valid during the callback.
    let major = unsafe { (*built.Iopb).MajorFunction };
    let bytes = if major == IRP_MJ_READ && status == STATUS_SUCCESS {
        let n = information.min(LENGTH as usize);
        // SAFETY: the context is the pool buffer of LENGTH bytes the read filled.
        unsafe { std::slice::from_raw_parts(context.cast::<u8>(), n) }.to_vec()
    } else {
        Vec::new()
    };
    // SAFETY: the data this filter allocated, freed once, after its I/O completed.
    unsafe { FltFreeCallbackData(data.cast_mut()) };
    if !context.is_null() {
        // SAFETY: the pool buffer allocated for this I/O, freed once here.
        unsafe { ExFreePoolWithTag(context, TAG) };
    }
    let completed = Completed {
        status,
        information,
        major,
        bytes,
        // SAFETY: callable at any IRQL.
        irql: unsafe { KeGetCurrentIrql() },
        thread: std::thread::current().id(),
        thread_name: std::thread::current().name().unwrap_or("").to_owned(),
        data: data as usize,
    };
    if let Some(sender) = COMPLETED.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
        let _ = sender.send(completed);
    }
}

fn is_source(data: *const FLT_CALLBACK_DATA) -> bool {
    // SAFETY: Filter Manager passes valid callback data.
    let block = unsafe { (*data).Iopb };
    // SAFETY: and its parameter block is valid.
    let iopb = unsafe { &*block };
    // SAFETY: a create's target file object is valid for the callback.
    let name = unsafe { &(*iopb.TargetFileObject).FileName };
    // SAFETY: the name buffer holds Length bytes.
    let name =
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) });
    name.eq_ignore_ascii_case("\\source.txt")
}

/// Fills in the built operation for the mode: a read into `buffer`, or a write of [`WRITTEN`] from it, at offset 0.
fn build(built: *mut FLT_CALLBACK_DATA, buffer: *mut c_void) {
    // SAFETY: the data belongs to this filter until freed.
    let block = unsafe { (*built).Iopb.cast_mut() };
    // SAFETY: and so does its parameter block.
    let iopb = unsafe { &mut *block };
    match mode() {
        Mode::Read | Mode::Misuse => {
            iopb.MajorFunction = IRP_MJ_READ;
            iopb.Parameters.Read.Length = LENGTH;
            iopb.Parameters.Read.ByteOffset = 0;
            iopb.Parameters.Read.ReadBuffer = buffer;
        }
        Mode::Write => {
            // SAFETY: the pool buffer holds LENGTH bytes, more than WRITTEN.
            unsafe { std::ptr::copy_nonoverlapping(WRITTEN.as_ptr(), buffer.cast::<u8>(), WRITTEN.len()) };
            iopb.MajorFunction = IRP_MJ_WRITE;
            iopb.Parameters.Write.Length = u32::try_from(WRITTEN.len()).expect("short");
            iopb.Parameters.Write.ByteOffset = 0;
            iopb.Parameters.Write.WriteBuffer = buffer;
        }
        Mode::Create => iopb.MajorFunction = IRP_MJ_CREATE,
    }
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    if !is_source(data) {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    // SAFETY: valid related objects.
    let objects = unsafe { &*objects };
    let (handle, file_object) =
        open_file(objects.Filter, objects.Instance, r"\??\C:\backing.txt", OBJ_KERNEL_HANDLE, IO_FORCE_ACCESS_CHECK)
            .expect("the backing file opens below this filter");
    let mut built: *mut FLT_CALLBACK_DATA = null_mut();
    // SAFETY: this filter's instance, an open file object, a place for the data.
    assert_eq!(unsafe { FltAllocateCallbackData(objects.Instance, file_object, &raw mut built) }, STATUS_SUCCESS);
    // SAFETY: plain values; the buffer lives until the completion callback frees it.
    let buffer = unsafe { ExAllocatePool2(NON_PAGED, LENGTH as usize, TAG) };
    assert!(!buffer.is_null());
    build(built, buffer);
    // SAFETY: allocated callback data, filled in above, and a pool buffer that outlives the I/O.
    let status = unsafe { FltPerformAsynchronousIo(built, Some(completed), buffer) };
    let issued = Issued { status, thread: std::thread::current().id(), data: built as usize };
    *ISSUED.lock().unwrap_or_else(PoisonError::into_inner) = Some(issued);
    if mode() == Mode::Misuse {
        // Both too early: the I/O is still in flight.
        // SAFETY: the model reports and ignores the free of data in flight.
        unsafe { FltFreeCallbackData(built) };
        // SAFETY: the model reports and refuses data already in flight.
        unsafe { FltPerformSynchronousIo(built) };
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

fltsim::minifilter_entry_points!(REGISTRATION);

/// Mounts `C:` with the source and backing files, loads the filter in `mode`, and returns the driver, the volume
/// root and the receiver of the callback's observations.
fn setup(mode: Mode) -> (fltsim::LoadedDriver, std::path::PathBuf, Receiver<Completed>) {
    MODE.store(mode as u8, Ordering::SeqCst);
    let (sender, receiver) = mpsc::channel();
    *COMPLETED.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    let root = io::fresh_root("perform-async");
    std::fs::write(root.join("source.txt"), b"source data").expect("seed");
    std::fs::write(root.join("backing.txt"), b"backing data").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("performasync", "PerformAsync Instance", "136500");
    (fltsim::load("performasync", driver_entry).expect("load"), root, receiver)
}

/// Opens `C:\source.txt` from user mode, which makes the filter issue its I/O; returns what the call returned.
fn open_source() -> Issued {
    let handle = iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).expect("the source opens");
    iomgr::close(handle);
    ISSUED.lock().unwrap_or_else(PoisonError::into_inner).expect("the filter issued its I/O")
}

/// Waits for the completion callback (a channel, not a sleep; the timeout only keeps a broken model from hanging
/// the test run), then for its worker to finish the completion.
fn wait_for_callback(receiver: &Receiver<Completed>) -> Completed {
    let done = receiver.recv_timeout(Duration::from_mins(1)).expect("the completion callback runs");
    fltsim::kernel::work::drain();
    done
}

scenario! {
    fn an_asynchronous_built_read_pends_and_its_callback_gets_the_data_on_a_worker() {
        let (mut driver, _root, receiver) = setup(Mode::Read);
        let issued = open_source();
        assert_eq!(issued.status, STATUS_PENDING);
        let done = wait_for_callback(&receiver);
        assert_eq!(done.status, STATUS_SUCCESS);
        assert_eq!(done.information, b"backing data".len());
        assert_eq!(done.major, IRP_MJ_READ);
        assert_eq!(done.bytes, b"backing data");
        assert_eq!(done.data, issued.data, "the callback gets the filter's own callback data");
        assert!(done.irql <= 2, "the callback runs at or below DISPATCH_LEVEL, not at {}", done.irql);
        assert_ne!(done.thread, issued.thread, "the callback runs on another thread");
        assert!(done.thread_name.starts_with("System: worker"), "on a system worker, not {}", done.thread_name);
        assert_eq!(outstanding_async_io(), 0);
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [], "freeing the data in the callback is allowed; nothing leaks");
    }
}

scenario! {
    fn an_asynchronous_built_write_lands_in_the_file() {
        let (mut driver, root, receiver) = setup(Mode::Write);
        let issued = open_source();
        assert_eq!(issued.status, STATUS_PENDING);
        let done = wait_for_callback(&receiver);
        assert_eq!(done.status, STATUS_SUCCESS);
        assert_eq!(done.information, WRITTEN.len());
        assert_eq!(done.major, IRP_MJ_WRITE);
        driver.unload(false).expect("unload");
        assert_eq!(std::fs::read(root.join("backing.txt")).expect("host"), b"async!g data");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn freeing_or_performing_the_data_again_before_the_callback_is_reported() {
        let hold = hold_async_completions();
        let (mut driver, _root, receiver) = setup(Mode::Misuse);
        let issued = open_source();
        assert_eq!(issued.status, STATUS_PENDING);
        assert_eq!(outstanding_async_io(), 1);
        let reports = take_reports();
        assert_eq!(reports.iter().map(|r| r.rule).collect::<Vec<_>>(), [Rule::InvalidArgument, Rule::InvalidArgument]);
        assert_eq!(reports[0].api, "FltFreeCallbackData");
        assert_eq!(reports[1].api, "FltPerformSynchronousIo");
        drop(hold);
        let done = wait_for_callback(&receiver);
        assert_eq!(done.status, STATUS_SUCCESS, "the early free did not free data in flight");
        assert_eq!(done.bytes, b"backing data");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [], "the callback's own free is the one that counts");
    }
}

scenario! {
    fn an_asynchronous_create_fails_and_its_callback_runs_before_the_call_returns() {
        let (mut driver, _root, receiver) = setup(Mode::Create);
        let issued = open_source();
        assert_eq!(issued.status, STATUS_FLT_INVALID_ASYNCHRONOUS_REQUEST);
        let done = receiver.try_recv().expect("the callback ran before the call returned");
        assert_eq!(done.status, STATUS_FLT_INVALID_ASYNCHRONOUS_REQUEST);
        assert_eq!(done.thread, issued.thread, "in the caller's context");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    fn unloading_with_a_built_asynchronous_read_outstanding_is_reported() {
        let hold = hold_async_completions();
        let (mut driver, _root, receiver) = setup(Mode::Read);
        assert_eq!(open_source().status, STATUS_PENDING);
        driver.unload(false).expect("unload");
        // The data and the buffer the callback would free are still allocated too.
        let mut reported = take_rules();
        reported.sort_by_key(|r| format!("{r:?}"));
        assert_eq!(reported, [Rule::AsyncIoOutstandingAtUnload, Rule::CallbackDataLeak, Rule::PoolLeak]);
        drop(hold);
        let done = wait_for_callback(&receiver);
        assert_eq!(done.bytes, b"backing data");
        assert_eq!(outstanding_async_io(), 0);
        assert_eq!(take_rules(), [], "reported once, not again when it completes");
    }
}
