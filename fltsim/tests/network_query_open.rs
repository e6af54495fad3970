//! Full-attribute queries by name (`NtQueryFullAttributesFile`): the fast `IRP_MJ_NETWORK_QUERY_OPEN` path, a fast
//! I/O operation that a redirecting filter refuses in pre-operation with `FLT_PREOP_DISALLOW_FASTIO` so that the I/O
//! manager takes the slow path, a full create the filter can see. It cannot be refused in post-operation.

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicI64, AtomicU8, Ordering},
    },
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::Storage::FileSystem::{
        FILE_NETWORK_OPEN_INFORMATION,
        Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_DISALLOW_FSFILTER_IO,
            FLT_POSTOP_FINISHED_PROCESSING, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_DISALLOW_FASTIO,
            FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
            FLTFL_CALLBACK_DATA_FAST_IO_OPERATION, IRP_MJ_NETWORK_QUERY_OPEN,
        },
    },
    Win32::Storage::FileSystem::FILE_READ_ATTRIBUTES,
};

/// 0: let the fast path through; 1: refuse it in pre; 2: refuse it in post (not allowed); 3: look at the answer in
/// post; 4: reference the stack file object in pre (not allowed).
static MODE: AtomicU8 = AtomicU8::new(0);
/// What the filter saw: "network-query-open (fast io)" or "create".
static SEEN: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
/// The `EndOfFile` the post-operation callback read from `NetworkInformation` (-1 until then).
static POST_END_OF_FILE: AtomicI64 = AtomicI64::new(-1);

#[expect(clippy::cast_possible_truncation, reason = "IRP_MJ_NETWORK_QUERY_OPEN is (UCHAR)-19")]
const NETWORK_QUERY_OPEN: u8 = IRP_MJ_NETWORK_QUERY_OPEN as u8;

unsafe extern "system" fn pre_network_query_open(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let data = unsafe { &*data };
    // SAFETY: its parameter block.
    let iopb = unsafe { &*data.Iopb };
    // SAFETY: the NetworkQueryOpen member is the one for this major function.
    let params = unsafe { iopb.Parameters.NetworkQueryOpen };
    let flags = data.Flags;
    let fast_io = flags & FLTFL_CALLBACK_DATA_FAST_IO_OPERATION != 0;
    assert!(params.Irp.is_null(), "the model passes no create IRP");
    assert!(!params.NetworkInformation.is_null());
    SEEN.lock().expect("seen").push(if fast_io { "network-query-open (fast io)" } else { "network-query-open" });
    match MODE.load(Ordering::SeqCst) {
        1 => FLT_PREOP_DISALLOW_FASTIO,
        2 | 3 => FLT_PREOP_SUCCESS_WITH_CALLBACK,
        4 => {
            // SAFETY: the related objects are Filter Manager's; the file object is the stack one, which the model
            // reports rather than references.
            let file_object = unsafe { (*objects).FileObject };
            fltsim::fltmgr::fileio::ObfReferenceObject(file_object.cast());
            FLT_PREOP_SUCCESS_NO_CALLBACK
        }
        _ => FLT_PREOP_SUCCESS_NO_CALLBACK,
    }
}

unsafe extern "system" fn post_network_query_open(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let iopb = unsafe { (*data).Iopb };
    // SAFETY: its parameter block.
    let iopb = unsafe { &*iopb };
    // SAFETY: the NetworkQueryOpen member is the one for this major function.
    let information = unsafe { iopb.Parameters.NetworkQueryOpen.NetworkInformation };
    // SAFETY: the buffer holds the file system's FILE_NETWORK_OPEN_INFORMATION.
    let end_of_file = unsafe { information.read_unaligned() }.EndOfFile;
    POST_END_OF_FILE.store(end_of_file, Ordering::SeqCst);
    if MODE.load(Ordering::SeqCst) == 2 { FLT_POSTOP_DISALLOW_FSFILTER_IO } else { FLT_POSTOP_FINISHED_PROCESSING }
}

unsafe extern "system" fn pre_create(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    SEEN.lock().expect("seen").push("create");
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 3]> = Table([
    operation(0, Some(pre_create), None),
    operation(NETWORK_QUERY_OPEN, Some(pre_network_query_open), Some(post_network_query_open)),
    operation(END, None, None),
]);
static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

/// Queries the full attributes of `C:\dir\file.txt` with the filter in `mode`; returns whether the fast path
/// answered, the file's size as answered, what the filter saw, and the rules broken.
fn query(mode: u8) -> (bool, i64, Vec<&'static str>, Vec<Rule>) {
    let root = io::fresh_root("network-query-open");
    std::fs::create_dir_all(root.join("dir")).expect("volume root");
    std::fs::write(root.join("dir").join("file.txt"), b"seven!!").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    MODE.store(mode, Ordering::SeqCst);
    fltsim::registry::install_minifilter_service("netqueryopen", "Network Query Open Instance", "139000");
    let mut driver = fltsim::load("netqueryopen", driver_entry).expect("load");
    let params = iomgr::OpenParams { desired_access: FILE_READ_ATTRIBUTES, ..Default::default() };
    let answer = iomgr::query_full_attributes(r"C:\dir\file.txt", &params).expect("query full attributes");
    driver.unload(false).expect("unload");
    assert_eq!(answer.data.len(), size_of::<FILE_NETWORK_OPEN_INFORMATION>());
    // SAFETY: the buffer holds a FILE_NETWORK_OPEN_INFORMATION; read unaligned from bytes.
    let info = unsafe { answer.data.as_ptr().cast::<FILE_NETWORK_OPEN_INFORMATION>().read_unaligned() };
    let rules = take_rules();
    (answer.fast, info.EndOfFile, SEEN.lock().expect("seen").clone(), rules)
}

scenario! {
    /// A filter that lets the fast path through sees one fast I/O operation and no create.
    fn the_fast_path_answers_when_filters_allow_it() {
        assert_eq!(query(0), (true, 7, vec!["network-query-open (fast io)"], vec![]));
    }
}

scenario! {
    /// Refused in pre-operation with FLT_PREOP_DISALLOW_FASTIO, the query is answered by a full create the filter
    /// sees.
    fn a_fast_path_refused_in_pre_takes_the_slow_path() {
        assert_eq!(query(1), (false, 7, vec!["network-query-open (fast io)", "create"], vec![]));
    }
}

scenario! {
    /// The post-operation callback sees the file system's answer in NetworkInformation.
    fn the_post_operation_sees_the_answer() {
        assert_eq!(query(3), (true, 7, vec!["network-query-open (fast io)"], vec![]));
        assert_eq!(POST_END_OF_FILE.load(Ordering::SeqCst), 7);
    }
}

scenario! {
    /// A post-operation callback cannot refuse the fast path (the file system has answered): returning
    /// FLT_POSTOP_DISALLOW_FSFILTER_IO is reported and the fast answer stands.
    fn refusing_in_post_is_reported() {
        assert_eq!(query(2), (true, 7, vec!["network-query-open (fast io)"], vec![Rule::InvalidPostOpStatus]));
    }
}

scenario! {
    /// The stack-based file object is not one filters may reference.
    fn referencing_the_stack_file_object_is_reported() {
        assert_eq!(query(4), (true, 7, vec!["network-query-open (fast io)"], vec![Rule::InvalidArgument]));
    }
}
