//! A filter that sends opens of one name to another with `IoReplaceFileObjectName` and `STATUS_REPARSE` (the
//! mechanics of Shunt's reparse rules), asks who requested the open, and reads its volume's GUID name.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use fltsim::{
    io::{self, VolumeSpec, iomgr},
    kernel::process,
    scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::take_reports,
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::{
            IoReplaceFileObjectName,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE,
                FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltGetRequestorProcessId,
                FltGetVolumeGuidName,
            },
        },
        System::SystemServices::IO_REPARSE,
    },
    Win32::{
        Foundation::{NTSTATUS, STATUS_BUFFER_TOO_SMALL, STATUS_REPARSE, STATUS_SUCCESS, UNICODE_STRING},
        Storage::InstallableFileSystems::FLT_FILESYSTEM_TYPE,
    },
};

static REQUESTOR: AtomicU32 = AtomicU32::new(0);
static GUID_NAME: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "system" fn instance_setup(
    objects: *const FLT_RELATED_OBJECTS,
    _flags: u32,
    _device_type: u32,
    _file_system: FLT_FILESYSTEM_TYPE,
) -> NTSTATUS {
    // SAFETY: valid related objects from Filter Manager.
    let volume = unsafe { (*objects).Volume };
    let mut needed = 0u32;
    // SAFETY: asking for the size only.
    let status = unsafe { FltGetVolumeGuidName(volume, null_mut(), &raw mut needed) };
    assert_eq!(status, STATUS_BUFFER_TOO_SMALL);
    let mut buffer = vec![0u16; usize::try_from(needed / 2).expect("small")];
    let mut name =
        UNICODE_STRING { Length: 0, MaximumLength: u16::try_from(needed).expect("small"), Buffer: buffer.as_mut_ptr() };
    // SAFETY: a buffer of `needed` bytes.
    let status = unsafe { FltGetVolumeGuidName(volume, &raw mut name, null_mut()) };
    assert_eq!(status, STATUS_SUCCESS);
    GUID_NAME.lock().expect("lock").push(String::from_utf16_lossy(&buffer[..usize::from(name.Length / 2)]));
    STATUS_SUCCESS
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager's callback data.
    REQUESTOR.store(unsafe { FltGetRequestorProcessId(data) }, Ordering::SeqCst);
    // SAFETY: as above.
    let data = unsafe { &mut *data };
    // SAFETY: and its parameter block and file object.
    let file_object = unsafe { (*data.Iopb).TargetFileObject };
    // SAFETY: the file object's name holds Length bytes.
    let name = unsafe { &(*file_object).FileName };
    // SAFETY: as above.
    let name =
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) });
    if !name.eq_ignore_ascii_case("\\redirect.txt") {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    let target: Vec<u16> = r"\??\C:\target.txt".encode_utf16().collect();
    // SAFETY: a file object being created and a name of the given length.
    let status = unsafe {
        IoReplaceFileObjectName(file_object, target.as_ptr(), u16::try_from(target.len() * 2).expect("small"))
    };
    assert_eq!(status, STATUS_SUCCESS);
    data.IoStatus.Anonymous.Status = STATUS_REPARSE;
    data.IoStatus.Information = IO_REPARSE as usize;
    FLT_PREOP_COMPLETE
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(FLT_REGISTRATION {
    InstanceSetupCallback: Some(instance_setup),
    ..registration((&raw const OPERATIONS.0).cast(), Some(unload))
});

fltsim::minifilter_entry_points!(REGISTRATION);

scenario! {
    fn a_create_replaced_and_reparsed_opens_the_new_name() {
        let root = io::fresh_root("query");
        std::fs::write(root.join("target.txt"), b"the target").expect("seed");
        let volume = io::mount(VolumeSpec::ntfs('C', &root));
        fltsim::registry::install_minifilter_service("querytest", "Query Instance", "136000");
        let mut driver = fltsim::load("querytest", driver_entry).expect("load");
        assert_eq!(*GUID_NAME.lock().expect("lock"), std::slice::from_ref(&volume.guid_name));
        assert!(volume.guid_name.starts_with(r"\??\Volume{"));

        let app = process::create(r"\Device\HarddiskVolume1\app.exe", process::Token { user: "alice".into(), admin: false });
        let handle = process::run_as(&app, || iomgr::create(r"C:\redirect.txt", &iomgr::OpenParams::default()))
            .expect("the reparsed open succeeds although redirect.txt does not exist");
        assert_eq!(REQUESTOR.load(Ordering::SeqCst), u32::try_from(app.id).expect("small"));
        assert_eq!(iomgr::read(&handle, Some(0), 64).expect("read"), b"the target");
        iomgr::close(handle);
        driver.unload(false).expect("unload");
        let reports = take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
    }
}
