//! A policy file read at instance attach, as Shunt will read its persisted policy: the driver keeps its registry
//! path from `DriverEntry`; its instance-setup callback reads the `PolicyFile` value of its `Parameters` key
//! (`ZwOpenKey`, `ZwQueryValueKey`) and then — in the callback itself, or from a generic work item it queues on the
//! instance, as ARCHITECTURE.md has Shunt do — opens that file below its own instance (`FltCreateFileEx2`), asks
//! its size (`FltQueryInformationFile`), reads it into pool (`FltReadFileEx`) and closes it, at PASSIVE_LEVEL, with
//! no rule broken.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicIsize, AtomicU32, Ordering},
    },
};

use fltsim::{
    inf::RegValue,
    io::{self, VolumeSpec},
    kernel::pool::{self, ExAllocatePool2, ExFreePoolWithTag},
    registry, scenario,
    testfilters::build::{END, Table, open_file, operation, register_and_start, registration, unregister},
    verifier::take_rules,
};
use windows_sys::{
    Wdk::{
        Foundation::{DRIVER_OBJECT, OBJECT_ATTRIBUTES},
        Storage::FileSystem::{
            FILE_STANDARD_INFORMATION, FileStandardInformation,
            Minifilters::{
                FLT_OPERATION_REGISTRATION, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltAllocateGenericWorkItem,
                FltClose, FltFreeGenericWorkItem, FltQueryInformationFile, FltQueueGenericWorkItem, FltReadFileEx,
                PFLT_GENERIC_WORKITEM, PFLT_INSTANCE,
            },
        },
        System::{
            Registry::{KeyValuePartialInformation, ZwOpenKey, ZwQueryValueKey},
            SystemServices::{DelayedWorkQueue, IO_IGNORE_SHARE_ACCESS_CHECK, ObfDereferenceObject, ZwClose},
        },
    },
    Win32::{
        Foundation::{HANDLE, NTSTATUS, OBJ_CASE_INSENSITIVE, OBJ_KERNEL_HANDLE, STATUS_SUCCESS, UNICODE_STRING},
        Storage::InstallableFileSystems::FLT_FILESYSTEM_TYPE,
        System::Registry::REG_SZ,
    },
};

static FILTER: AtomicIsize = AtomicIsize::new(0);
/// The driver's registry path, kept from `DriverEntry` as drivers must (the string is only valid during it).
static REGISTRY_PATH: Mutex<Vec<u16>> = Mutex::new(Vec::new());
/// The policy bytes the instance-setup callback read, and the IRQL it ran at.
static POLICY: Mutex<Option<Vec<u8>>> = Mutex::new(None);
static SETUP_IRQL: AtomicU32 = AtomicU32::new(u32::MAX);
/// Read from a generic work item the setup callback queues, rather than in the callback.
static FROM_WORK_ITEM: AtomicBool = AtomicBool::new(false);
const TAG: u32 = u32::from_le_bytes(*b"PolT");

fn unicode(units: &mut [u16]) -> UNICODE_STRING {
    let bytes = u16::try_from(units.len() * 2).expect("short");
    UNICODE_STRING { Length: bytes, MaximumLength: bytes, Buffer: units.as_mut_ptr() }
}

/// The `PolicyFile` value of the driver's `Parameters` key, as UTF-16 without its terminator.
fn policy_file_name() -> Option<Vec<u16>> {
    let mut path = REGISTRY_PATH.lock().expect("lock").clone();
    path.extend(r"\Parameters".encode_utf16());
    let name = unicode(&mut path);
    let attributes = OBJECT_ATTRIBUTES {
        Length: u32::try_from(size_of::<OBJECT_ATTRIBUTES>()).expect("small"),
        RootDirectory: null_mut(),
        ObjectName: &raw const name,
        Attributes: OBJ_KERNEL_HANDLE | OBJ_CASE_INSENSITIVE,
        SecurityDescriptor: std::ptr::null(),
        SecurityQualityOfService: std::ptr::null(),
    };
    let mut key: HANDLE = null_mut();
    // SAFETY: live locals; KEY_READ.
    if unsafe { ZwOpenKey(&raw mut key, 0x2_0019, &raw const attributes) } != STATUS_SUCCESS {
        return None;
    }
    let mut value: Vec<u16> = "PolicyFile".encode_utf16().collect();
    let value = unicode(&mut value);
    let mut buffer = vec![0u8; 1024];
    let mut needed = 0u32;
    // SAFETY: an open key and a buffer of the given length.
    let status = unsafe {
        ZwQueryValueKey(
            key,
            &raw const value,
            KeyValuePartialInformation,
            buffer.as_mut_ptr().cast(),
            u32::try_from(buffer.len()).expect("small"),
            &raw mut needed,
        )
    };
    // SAFETY: the key opened above, closed once.
    unsafe { ZwClose(key) };
    if status != STATUS_SUCCESS {
        return None;
    }
    // KEY_VALUE_PARTIAL_INFORMATION: TitleIndex, Type, DataLength, then the data.
    let field = |at: usize| u32::from_le_bytes(buffer[at..at + 4].try_into().expect("four bytes"));
    if field(4) != REG_SZ {
        return None;
    }
    let data = &buffer[12..12 + usize::try_from(field(8)).expect("small")];
    let units: Vec<u16> =
        data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    Some(units)
}

/// Reads the whole file `name` below `instance` into pool and returns a copy of its bytes.
fn read_policy(instance: PFLT_INSTANCE, name: &[u16]) -> Result<Vec<u8>, NTSTATUS> {
    let name = String::from_utf16_lossy(name);
    let filter = FILTER.load(Ordering::SeqCst);
    let (handle, file_object) = open_file(filter, instance, &name, OBJ_KERNEL_HANDLE, IO_IGNORE_SHARE_ACCESS_CHECK)?;
    // SAFETY: all-zero is a valid FILE_STANDARD_INFORMATION to be filled.
    let mut standard: FILE_STANDARD_INFORMATION = unsafe { std::mem::zeroed() };
    // SAFETY: an open file object and a local of the given size.
    let status = unsafe {
        FltQueryInformationFile(
            instance,
            file_object,
            (&raw mut standard).cast(),
            u32::try_from(size_of::<FILE_STANDARD_INFORMATION>()).expect("small"),
            FileStandardInformation,
            null_mut(),
        )
    };
    let result = if status == STATUS_SUCCESS {
        let size = u32::try_from(standard.EndOfFile).expect("a small policy");
        let buffer = ExAllocatePool2(pool::flags::PAGED, usize::try_from(size).expect("small").max(1), TAG);
        let mut read = 0u32;
        let offset = 0i64;
        // SAFETY: an open file object and a pool buffer of `size` bytes.
        let status = unsafe {
            FltReadFileEx(
                instance,
                file_object,
                &raw const offset,
                size,
                buffer,
                0,
                &raw mut read,
                None,
                std::ptr::null(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        // SAFETY: the pool buffer holds `read` ≤ `size` bytes the read filled.
        let bytes = unsafe { std::slice::from_raw_parts(buffer.cast::<u8>(), read as usize) }.to_vec();
        ExFreePoolWithTag(buffer, TAG);
        if status == STATUS_SUCCESS { Ok(bytes) } else { Err(status) }
    } else {
        Err(status)
    };
    // SAFETY: the handle and file object FltCreateFileEx2 returned, each released once.
    unsafe { FltClose(handle) };
    // SAFETY: as above.
    unsafe { ObfDereferenceObject(file_object.cast()) };
    result
}

/// Reads the policy the registry names, below `instance`, into [`POLICY`].
fn load_policy(instance: PFLT_INSTANCE) {
    if let Some(name) = policy_file_name() {
        // A policy that cannot be read leaves the instance attached with no rules, as a missing policy does.
        *POLICY.lock().expect("lock") = read_policy(instance, &name).ok();
    }
}

unsafe extern "system" fn load_later(item: PFLT_GENERIC_WORKITEM, instance: *const c_void, _context: *const c_void) {
    load_policy(instance as PFLT_INSTANCE);
    // SAFETY: the item this routine was queued with, freed once.
    unsafe { FltFreeGenericWorkItem(item) };
}

unsafe extern "system" fn setup(
    objects: *const FLT_RELATED_OBJECTS,
    _flags: u32,
    _device_type: u32,
    _file_system: FLT_FILESYSTEM_TYPE,
) -> NTSTATUS {
    SETUP_IRQL.store(u32::from(fltsim::kernel::thread::current_irql()), Ordering::SeqCst);
    // SAFETY: Filter Manager passes valid related objects.
    let instance = unsafe { (*objects).Instance };
    if FROM_WORK_ITEM.load(Ordering::SeqCst) {
        // SAFETY: no preconditions.
        let item = unsafe { FltAllocateGenericWorkItem() };
        // SAFETY: an allocated item and this instance as its object.
        let status = unsafe {
            FltQueueGenericWorkItem(
                item,
                instance as *const c_void,
                Some(load_later),
                DelayedWorkQueue,
                std::ptr::null(),
            )
        };
        assert_eq!(status, STATUS_SUCCESS, "an instance in setup may queue work");
    } else {
        load_policy(instance);
    }
    STATUS_SUCCESS
}

static OPS: Table<[FLT_OPERATION_REGISTRATION; 1]> = Table([operation(END, None, None)]);
static REG: Table<FLT_REGISTRATION> = Table(FLT_REGISTRATION {
    InstanceSetupCallback: Some(setup),
    ..registration((&raw const OPS.0).cast(), Some(unload))
});

unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, registry_path: *const UNICODE_STRING) -> NTSTATUS {
    // SAFETY: the loader's registry path, valid during DriverEntry.
    let path = unsafe { &*registry_path };
    // SAFETY: the string's buffer holds Length bytes.
    let units = unsafe { std::slice::from_raw_parts(path.Buffer, usize::from(path.Length / 2)) };
    *REGISTRY_PATH.lock().expect("lock") = units.to_vec();
    // SAFETY: the loader's driver object.
    unsafe { register_and_start(driver, &REG, &FILTER) }
}

unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
    unregister(&FILTER);
    STATUS_SUCCESS
}

const SERVICE: &str = "policytest";
const BLOB: &[u8] = b"SHPL\x01\x00 a persisted policy, opaque to the model";

fn mount_with_policy(write_file: bool) {
    let root = io::fresh_root("policy-file");
    std::fs::create_dir_all(root.join("shunt")).expect("dir");
    if write_file {
        std::fs::write(root.join("shunt").join("policy.bin"), BLOB).expect("seed");
    }
    io::mount(VolumeSpec::ntfs('C', &root));
    registry::install_minifilter_service(SERVICE, "Policy", "135100");
    registry::set_value(
        &format!(r"\REGISTRY\MACHINE\SYSTEM\CurrentControlSet\Services\{SERVICE}\Parameters"),
        "PolicyFile",
        RegValue::Sz(r"\??\C:\shunt\policy.bin".into()),
    );
}

scenario! {
    fn the_instance_setup_callback_reads_the_policy_file_the_registry_names() {
        mount_with_policy(true);
        let mut driver = fltsim::load(SERVICE, driver_entry).expect("loads");
        assert_eq!(POLICY.lock().expect("lock").as_deref(), Some(BLOB));
        assert_eq!(SETUP_IRQL.load(Ordering::SeqCst), 0, "instance setup runs at PASSIVE_LEVEL");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [], "registry, open, query, read and close at attach break no rule; nothing leaks");
    }
}

scenario! {
    /// ARCHITECTURE.md's way: the setup callback queues a generic work item on the instance, which reads the file
    /// through it at PASSIVE_LEVEL on a system worker.
    fn a_generic_work_item_queued_at_setup_reads_the_policy_file_through_the_instance() {
        FROM_WORK_ITEM.store(true, Ordering::SeqCst);
        mount_with_policy(true);
        let mut driver = fltsim::load(SERVICE, driver_entry).expect("loads");
        fltsim::kernel::work::drain();
        assert_eq!(POLICY.lock().expect("lock").as_deref(), Some(BLOB));
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_missing_policy_file_leaves_the_instance_attached_without_a_policy() {
        mount_with_policy(false);
        let mut driver = fltsim::load(SERVICE, driver_entry).expect("loads");
        assert_eq!(SETUP_IRQL.load(Ordering::SeqCst), 0, "the instance was set up");
        assert_eq!(*POLICY.lock().expect("lock"), None);
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), []);
    }
}
