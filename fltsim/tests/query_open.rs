//! Queries by name: the fast `IRP_MJ_QUERY_OPEN` path, which a redirecting filter refuses with
//! `FLT_PREOP_DISALLOW_FSFILTER_IO` (or `FLT_POSTOP_DISALLOW_FSFILTER_IO`) so that the I/O manager takes the slow
//! path, a full create the filter can see.

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicU8, Ordering},
    },
};

use fltsim::{
    io::{self, VolumeSpec, iomgr},
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_reports,
};
use windows_sys::{
    Wdk::Storage::FileSystem::{
        FILE_STAT_INFORMATION, FileStatInformation,
        Minifilters::{
            FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_POSTOP_CALLBACK_STATUS, FLT_POSTOP_DISALLOW_FSFILTER_IO,
            FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_DISALLOW_FSFILTER_IO, FLT_PREOP_SUCCESS_NO_CALLBACK,
            FLT_PREOP_SUCCESS_WITH_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
            FLTFL_CALLBACK_DATA_FS_FILTER_OPERATION, IRP_MJ_QUERY_OPEN,
        },
    },
    Win32::Storage::FileSystem::FILE_READ_ATTRIBUTES,
};

/// 0: let the fast path through; 1: refuse it in pre; 2: refuse it in post.
static MODE: AtomicU8 = AtomicU8::new(0);
/// What the filter saw: "query-open (fs filter op)" or "create".
static SEEN: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

#[expect(clippy::cast_possible_truncation, reason = "IRP_MJ_QUERY_OPEN is (UCHAR)-18")]
const QUERY_OPEN: u8 = IRP_MJ_QUERY_OPEN as u8;

unsafe extern "system" fn pre_query_open(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    let flags = unsafe { (*data).Flags };
    let fs_filter = flags & FLTFL_CALLBACK_DATA_FS_FILTER_OPERATION != 0;
    SEEN.lock().expect("seen").push(if fs_filter { "query-open (fs filter op)" } else { "query-open (irp)" });
    match MODE.load(Ordering::SeqCst) {
        1 => FLT_PREOP_DISALLOW_FSFILTER_IO,
        2 => FLT_PREOP_SUCCESS_WITH_CALLBACK,
        _ => FLT_PREOP_SUCCESS_NO_CALLBACK,
    }
}

unsafe extern "system" fn post_query_open(
    _data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *const c_void,
    _flags: u32,
) -> FLT_POSTOP_CALLBACK_STATUS {
    FLT_POSTOP_DISALLOW_FSFILTER_IO
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
    operation(QUERY_OPEN, Some(pre_query_open), Some(post_query_open)),
    operation(END, None, None),
]);
static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

/// Queries `C:\dir\file.txt` by name with the filter in `mode`; returns whether the fast path answered, the file's
/// size as answered, and what the filter saw.
fn query(mode: u8) -> (bool, i64, Vec<&'static str>) {
    let root = io::fresh_root("query-open");
    std::fs::create_dir_all(root.join("dir")).expect("volume root");
    std::fs::write(root.join("dir").join("file.txt"), b"four").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    MODE.store(mode, Ordering::SeqCst);
    fltsim::registry::install_minifilter_service("queryopen", "Query Open Instance", "139000");
    let mut driver = fltsim::load("queryopen", driver_entry).expect("load");
    let params = iomgr::OpenParams { desired_access: FILE_READ_ATTRIBUTES, ..Default::default() };
    let answer = iomgr::query_by_name(r"C:\dir\file.txt", FileStatInformation, &params).expect("query by name");
    driver.unload(false).expect("unload");
    assert_eq!(answer.data.len(), size_of::<FILE_STAT_INFORMATION>());
    // SAFETY: the buffer holds a FILE_STAT_INFORMATION; read unaligned from bytes.
    let stat = unsafe { answer.data.as_ptr().cast::<FILE_STAT_INFORMATION>().read_unaligned() };
    assert!(take_reports().is_empty());
    (answer.fast, stat.EndOfFile, SEEN.lock().expect("seen").clone())
}

scenario! {
    /// A filter that lets the fast path through sees one file-system filter operation and no create.
    fn the_fast_path_answers_when_filters_allow_it() {
        assert_eq!(query(0), (true, 4, vec!["query-open (fs filter op)"]));
    }
}

scenario! {
    /// Refused in pre-query-open, the query is answered by a full create the filter sees.
    fn a_fast_path_refused_in_pre_takes_the_slow_path() {
        assert_eq!(query(1), (false, 4, vec!["query-open (fs filter op)", "create"]));
    }
}

scenario! {
    /// Refused in post-query-open, the fast answer is dropped and the slow path answers.
    fn a_fast_path_refused_in_post_takes_the_slow_path() {
        assert_eq!(query(2), (false, 4, vec!["query-open (fs filter op)", "create"]));
    }
}
