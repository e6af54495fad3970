//! Name queries from pre-create: normalized names expand short names and take the stored case, opened names keep
//! the caller's spelling, parsing splits them; misuse and leaks are reported, and the contexts where Filter
//! Manager cannot ask the file system answer `STATUS_FLT_INVALID_NAME_REQUEST`.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::{
        Mutex,
        atomic::{AtomicI32, AtomicU8, Ordering},
    },
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
        FLT_CALLBACK_DATA, FLT_FILE_NAME_INFORMATION, FLT_FILE_NAME_NORMALIZED, FLT_FILE_NAME_OPENED,
        FLT_FILE_NAME_QUERY_DEFAULT, FLT_FILE_NAME_SHORT, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS,
        FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltGetFileNameInformation,
        FltParseFileNameInformation, FltReleaseFileNameInformation,
    },
    Win32::Foundation::{STATUS_FLT_INVALID_NAME_REQUEST, STATUS_SUCCESS, UNICODE_STRING},
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    Correct,
    Leak,
    ReleaseTwice,
    ShortInPreCreate,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static STATUS: AtomicI32 = AtomicI32::new(0);
/// What one successful query returned: the format, then `Name`, `ParentDir`, `FinalComponent` and `Extension`.
type Seen = (u32, String, String, String, String);

/// Every successful query, in order.
static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

fn mode() -> Mode {
    [Mode::Correct, Mode::Leak, Mode::ReleaseTwice, Mode::ShortInPreCreate][usize::from(MODE.load(Ordering::SeqCst))]
}

fn text(s: &UNICODE_STRING) -> String {
    if s.Buffer.is_null() {
        return String::new();
    }
    // SAFETY: name strings hold Length bytes.
    String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(s.Buffer, usize::from(s.Length / 2)) })
}

fn query(data: *const FLT_CALLBACK_DATA, format: u32) {
    let mut info: *mut FLT_FILE_NAME_INFORMATION = null_mut();
    // SAFETY: this create's callback data and a place for the result.
    let status = unsafe { FltGetFileNameInformation(data, format | FLT_FILE_NAME_QUERY_DEFAULT, &raw mut info) };
    STATUS.store(status, Ordering::SeqCst);
    if status != STATUS_SUCCESS {
        return;
    }
    // SAFETY: live name information.
    assert_eq!(unsafe { FltParseFileNameInformation(info) }, STATUS_SUCCESS);
    // SAFETY: as above.
    let i = unsafe { &*info };
    SEEN.lock().expect("lock").push((
        format,
        text(&i.Name),
        text(&i.ParentDir),
        text(&i.FinalComponent),
        text(&i.Extension),
    ));
    match mode() {
        Mode::Leak => {}
        Mode::ReleaseTwice => {
            // SAFETY: the reference FltGetFileNameInformation returned, then deliberately one more release.
            unsafe { FltReleaseFileNameInformation(info) };
            // SAFETY: as above; the model reports it.
            unsafe { FltReleaseFileNameInformation(info) };
        }
        _ => {
            // SAFETY: the reference FltGetFileNameInformation returned.
            unsafe { FltReleaseFileNameInformation(info) };
        }
    }
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    if mode() == Mode::ShortInPreCreate {
        query(data, FLT_FILE_NAME_SHORT);
    } else {
        query(data, FLT_FILE_NAME_NORMALIZED);
        if mode() == Mode::Correct {
            query(data, FLT_FILE_NAME_OPENED);
        }
    }
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

fltsim::minifilter_entry_points!(REGISTRATION);

fn setup(mode: Mode) -> fltsim::LoadedDriver {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("names");
    std::fs::create_dir_all(root.join("Dir")).expect("volume root");
    std::fs::write(root.join("Dir").join("LongFileName.txt"), b"data").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
    fltsim::registry::install_minifilter_service("namestest", "Names Instance", "137000");
    fltsim::load("namestest", driver_entry).expect("load")
}

scenario! {
    fn normalized_names_expand_short_names_and_opened_names_keep_the_spelling() {
        let mut driver = setup(Mode::Correct);
        let handle = iomgr::create(r"C:\dir\LONGFI~1.TXT", &iomgr::OpenParams::default()).expect("open by short name");
        iomgr::close(handle);
        let seen = SEEN.lock().expect("lock").clone();
        assert_eq!(
            seen,
            [
                (
                    FLT_FILE_NAME_NORMALIZED,
                    r"\Device\HarddiskVolume1\Dir\LongFileName.txt".to_owned(),
                    r"\Dir\".to_owned(),
                    "LongFileName.txt".to_owned(),
                    "txt".to_owned()
                ),
                (
                    FLT_FILE_NAME_OPENED,
                    r"\Device\HarddiskVolume1\dir\LONGFI~1.TXT".to_owned(),
                    r"\dir\".to_owned(),
                    "LONGFI~1.TXT".to_owned(),
                    "TXT".to_owned()
                ),
            ]
        );
        SEEN.lock().expect("lock").clear();
        // A file that does not exist keeps its final component as given.
        let _ = iomgr::create(r"C:\DIR\Missing.Log", &iomgr::OpenParams::default());
        assert_eq!(SEEN.lock().expect("lock")[0].1, r"\Device\HarddiskVolume1\Dir\Missing.Log");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn name_information_never_released_is_reported_at_unload() {
        let mut driver = setup(Mode::Leak);
        let _ = iomgr::create(r"C:\Dir\LongFileName.txt", &iomgr::OpenParams::default());
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::NameInfoLeak]);
    }
}

scenario! {
    fn name_information_released_twice_is_reported() {
        let _driver = setup(Mode::ReleaseTwice);
        let _ = iomgr::create(r"C:\Dir\LongFileName.txt", &iomgr::OpenParams::default());
        assert_eq!(take_rules(), [Rule::NameInfoMisuse]);
    }
}

scenario! {
    fn a_short_name_query_in_pre_create_is_reported() {
        let _driver = setup(Mode::ShortInPreCreate);
        let _ = iomgr::create(r"C:\Dir\LongFileName.txt", &iomgr::OpenParams::default());
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    fn a_name_query_with_a_top_level_irp_set_is_refused() {
        let _driver = setup(Mode::Correct);
        thread::with_top_level_irp(0x3000, || {
            let _ = iomgr::create(r"C:\Dir\LongFileName.txt", &iomgr::OpenParams::default());
        });
        assert_eq!(STATUS.load(Ordering::SeqCst), STATUS_FLT_INVALID_NAME_REQUEST);
        assert_eq!(take_rules(), []);
    }
}
