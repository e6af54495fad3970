//! Communication ports: a filter that serves its port correctly breaks no rule and is reachable by administrators
//! and SYSTEM only; leaked ports and unsafe uses of the raw user buffers are reported.

use std::{
    ffi::c_void,
    ptr::null_mut,
    sync::{
        Mutex,
        atomic::{AtomicIsize, AtomicU8, Ordering},
    },
};

use fltsim::{
    Rule,
    fltmgr::port::{self, FAULT_FILL, FLT_PORT_ALL_ACCESS, Grants, UserBuffer, copy_from_user, copy_to_user},
    kernel::{
        process::{self, Token},
        work,
    },
    scenario,
    testfilters::build::{END, Table, operation, register, registration, unregister},
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Foundation::{DRIVER_OBJECT, OBJECT_ATTRIBUTES},
        Storage::FileSystem::Minifilters::{
            FLT_OPERATION_REGISTRATION, FLT_REGISTRATION, FltBuildDefaultSecurityDescriptor, FltCloseClientPort,
            FltCloseCommunicationPort, FltCreateCommunicationPort, FltFreeSecurityDescriptor, FltStartFiltering,
            PFLT_PORT,
        },
        System::SystemServices::{MM_COPY_ADDRESS, MM_COPY_ADDRESS_0, MM_COPY_MEMORY_VIRTUAL, MmCopyMemory},
    },
    Win32::{
        Foundation::{
            NTSTATUS, OBJ_CASE_INSENSITIVE, OBJ_KERNEL_HANDLE, STATUS_ACCESS_DENIED, STATUS_ACCESS_VIOLATION,
            STATUS_CONNECTION_COUNT_LIMIT, STATUS_INVALID_PARAMETER, STATUS_OBJECT_NAME_NOT_FOUND,
            STATUS_PORT_DISCONNECTED, STATUS_SUCCESS, UNICODE_STRING,
        },
        Security::PSECURITY_DESCRIPTOR,
    },
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    Correct,
    WithoutKernelHandle,
    PortLeftOpen,
    ClientPortNotClosed,
    DirectWrite,
    DirectRead,
    DoubleFetch,
    MmCopyMemory,
    CopyOnWorker,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static FILTER: AtomicIsize = AtomicIsize::new(0);
static SERVER: AtomicIsize = AtomicIsize::new(0);
static CREATE_STATUS: AtomicIsize = AtomicIsize::new(0);
static WORKER_STATUS: AtomicIsize = AtomicIsize::new(0);
/// The client ports of open connections.
static CLIENTS: Mutex<Vec<PFLT_PORT>> = Mutex::new(Vec::new());
/// What each message's reads saw, for the double-fetch test.
static SEEN: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

const PORT_NAME: &str = r"\PortTest";

fn mode() -> Mode {
    const ALL: [Mode; 9] = [
        Mode::Correct,
        Mode::WithoutKernelHandle,
        Mode::PortLeftOpen,
        Mode::ClientPortNotClosed,
        Mode::DirectWrite,
        Mode::DirectRead,
        Mode::DoubleFetch,
        Mode::MmCopyMemory,
        Mode::CopyOnWorker,
    ];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

unsafe extern "system" fn connect_notify(
    client: PFLT_PORT,
    _server_cookie: *const c_void,
    context: *const c_void,
    size: u32,
    cookie: *mut *mut c_void,
) -> NTSTATUS {
    // SAFETY: the connection context is a kernel copy of `size` bytes.
    let context = unsafe { std::slice::from_raw_parts(context.cast::<u8>(), size as usize) };
    if context != b"hello" {
        return STATUS_ACCESS_DENIED;
    }
    let mut clients = CLIENTS.lock().expect("lock");
    clients.push(client);
    // The cookie is the client's index, which the disconnect callback finds it by.
    // SAFETY: Filter Manager passes a place for the cookie.
    unsafe { cookie.write(std::ptr::without_provenance_mut(clients.len())) };
    STATUS_SUCCESS
}

unsafe extern "system" fn disconnect_notify(cookie: *const c_void) {
    if mode() == Mode::ClientPortNotClosed {
        return;
    }
    let mut clients = CLIENTS.lock().expect("lock");
    let slot = &mut clients[cookie.addr() - 1];
    // SAFETY: this filter and the variable holding the connection's client port.
    unsafe { FltCloseClientPort(FILTER.load(Ordering::SeqCst), slot) };
    assert_eq!(*slot, 0, "FltCloseClientPort sets the variable to NULL");
}

/// Replies with the input reversed. The correct way: one safe capture of the input, one safe write of the reply.
unsafe extern "system" fn message_notify(
    _cookie: *const c_void,
    input: *const c_void,
    input_len: u32,
    output: *mut c_void,
    output_len: u32,
    returned: *mut u32,
) -> NTSTATUS {
    let len = input_len as usize;
    let mut captured = vec![0u8; len];
    match mode() {
        Mode::DirectRead => {
            // SAFETY: deliberately wrong: a raw user address read without try/except.
            captured.copy_from_slice(unsafe { std::slice::from_raw_parts(input.cast::<u8>(), len) });
        }
        Mode::MmCopyMemory => {
            let mut copied = 0usize;
            let source = MM_COPY_ADDRESS { Anonymous: MM_COPY_ADDRESS_0 { VirtualAddress: input.cast_mut() } };
            // SAFETY: a kernel buffer of `len` bytes.
            let status = unsafe {
                MmCopyMemory(captured.as_mut_ptr().cast(), source, len, MM_COPY_MEMORY_VIRTUAL, &raw mut copied)
            };
            if status != STATUS_SUCCESS {
                return status;
            }
            assert_eq!(copied, len);
        }
        Mode::CopyOnWorker => {
            // Deliberately wrong: the user address is only valid in the client's process, not on a System worker.
            let (destination, source) = (captured.as_mut_ptr().expose_provenance(), input.expose_provenance());
            let item = work::queue(move || {
                // SAFETY: the kernel buffer outlives the wait below; the model checks the source.
                let status = unsafe {
                    copy_from_user(
                        std::ptr::with_exposed_provenance_mut(destination),
                        std::ptr::with_exposed_provenance(source),
                        len,
                    )
                };
                WORKER_STATUS.store(status as isize, Ordering::SeqCst);
            });
            work::wait_for(&item).expect("a wait at PASSIVE_LEVEL");
            #[allow(clippy::cast_possible_truncation, reason = "an NTSTATUS stored as isize")]
            return WORKER_STATUS.load(Ordering::SeqCst) as NTSTATUS;
        }
        Mode::DoubleFetch => {
            // Deliberately wrong: validate the first byte, then read the whole buffer again.
            let mut first = [0u8; 1];
            // SAFETY: a kernel buffer of one byte.
            let status = unsafe { copy_from_user(first.as_mut_ptr().cast(), input, 1) };
            if status != STATUS_SUCCESS {
                return status;
            }
            // SAFETY: a kernel buffer of `len` bytes.
            let status = unsafe { copy_from_user(captured.as_mut_ptr().cast(), input, len) };
            if status != STATUS_SUCCESS {
                return status;
            }
            SEEN.lock().expect("lock").push(vec![first[0], captured[0]]);
        }
        _ => {
            // SAFETY: a kernel buffer of `len` bytes.
            let status = unsafe { copy_from_user(captured.as_mut_ptr().cast(), input, len) };
            if status != STATUS_SUCCESS {
                return status;
            }
        }
    }
    captured.reverse();
    let reply_len = len.min(output_len as usize);
    if mode() == Mode::DirectWrite {
        // SAFETY: deliberately wrong: a raw user address written without try/except.
        unsafe { std::ptr::copy_nonoverlapping(captured.as_ptr(), output.cast::<u8>(), reply_len) };
    } else {
        // SAFETY: a kernel buffer of at least `reply_len` bytes.
        let status = unsafe { copy_to_user(output, captured.as_ptr().cast(), reply_len) };
        if status != STATUS_SUCCESS {
            return status;
        }
    }
    // SAFETY: Filter Manager passes a place for the length.
    unsafe { returned.write(u32::try_from(reply_len).expect("small")) };
    STATUS_SUCCESS
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 1]> = Table([operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, _path: *const UNICODE_STRING) -> NTSTATUS {
    // SAFETY: the loader's driver object.
    let filter = match unsafe { register(driver, &REGISTRATION, &FILTER) } {
        Ok(filter) => filter,
        Err(status) => return status,
    };
    let mut descriptor: PSECURITY_DESCRIPTOR = null_mut();
    // SAFETY: a place for the descriptor.
    let status = unsafe { FltBuildDefaultSecurityDescriptor(&raw mut descriptor, FLT_PORT_ALL_ACCESS) };
    assert_eq!(status, STATUS_SUCCESS);
    let mut name_units: Vec<u16> = PORT_NAME.encode_utf16().collect();
    let bytes = u16::try_from(name_units.len() * 2).expect("small");
    let name = UNICODE_STRING { Length: bytes, MaximumLength: bytes, Buffer: name_units.as_mut_ptr() };
    let kernel_handle = if mode() == Mode::WithoutKernelHandle { 0 } else { OBJ_KERNEL_HANDLE };
    let attributes = OBJECT_ATTRIBUTES {
        Length: u32::try_from(size_of::<OBJECT_ATTRIBUTES>()).expect("small"),
        RootDirectory: null_mut(),
        ObjectName: &raw const name,
        Attributes: kernel_handle | OBJ_CASE_INSENSITIVE,
        SecurityDescriptor: descriptor.cast_const().cast(),
        SecurityQualityOfService: std::ptr::null(),
    };
    let mut server: PFLT_PORT = 0;
    // SAFETY: initialized attributes, the callbacks above, one connection at a time.
    let status = unsafe {
        FltCreateCommunicationPort(
            filter,
            &raw mut server,
            &raw const attributes,
            null_mut(),
            Some(connect_notify),
            Some(disconnect_notify),
            Some(message_notify),
            1,
        )
    };
    // SAFETY: the descriptor FltBuildDefaultSecurityDescriptor returned; the port keeps its own copy.
    unsafe { FltFreeSecurityDescriptor(descriptor) };
    CREATE_STATUS.store(status as isize, Ordering::SeqCst);
    SERVER.store(server, Ordering::SeqCst);
    // SAFETY: a registered filter.
    unsafe { FltStartFiltering(filter) }
}

unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
    let server = SERVER.load(Ordering::SeqCst);
    if server != 0 && mode() != Mode::PortLeftOpen {
        // SAFETY: the server port this filter created.
        unsafe { FltCloseCommunicationPort(server) };
    }
    unregister(&FILTER);
    STATUS_SUCCESS
}

fn setup(mode: Mode) -> fltsim::LoadedDriver {
    MODE.store(mode as u8, Ordering::SeqCst);
    fltsim::registry::install_minifilter_service("porttest", "Port Instance", "135000");
    fltsim::load("porttest", driver_entry).expect("load")
}

fn admin() -> std::sync::Arc<process::Process> {
    process::create(r"\Device\HarddiskVolume1\shuntctl.exe", Token { user: "S-1-5-21-1-1-1-500".into(), admin: true })
}

scenario! {
    fn a_port_served_correctly_breaks_no_rule_and_admits_only_administrators_and_system() {
        let mut driver = setup(Mode::Correct);
        assert_eq!(CREATE_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS as isize);
        assert_eq!(port::grants(PORT_NAME), Some(Grants::SystemAndAdministrators { access: FLT_PORT_ALL_ACCESS }));

        let user = process::create(r"\Device\HarddiskVolume1\app.exe", Token { user: "S-1-5-21-1-1-1-1001".into(), admin: false });
        assert_eq!(port::connect(PORT_NAME, &user, b"hello").err(), Some(STATUS_ACCESS_DENIED));
        assert_eq!(port::connect(r"\NoSuchPort", &admin(), b"hello").err(), Some(STATUS_OBJECT_NAME_NOT_FOUND));
        assert_eq!(port::connect(PORT_NAME, &admin(), b"wrong").err(), Some(STATUS_ACCESS_DENIED), "ConnectNotify refused");

        let connection = port::connect(r"\PORTTEST", &admin(), b"hello").expect("an administrator connects (OBJ_CASE_INSENSITIVE)");
        assert_eq!(CLIENTS.lock().expect("lock")[0], connection.client_port());
        assert_eq!(
            port::connect(PORT_NAME, &process::system(), b"hello").err(),
            Some(STATUS_CONNECTION_COUNT_LIMIT),
            "MaxConnections is 1"
        );
        assert_eq!(connection.send_bytes(b"abc", 8), Ok(b"cba".to_vec()));
        assert_eq!(
            connection.send(&UserBuffer::Faulting(4), &UserBuffer::Memory(vec![0; 4])),
            Err(STATUS_ACCESS_VIOLATION),
            "the safe copy fails instead of crashing, and the driver returns its status"
        );
        assert_eq!(connection.send(&UserBuffer::Memory(b"xy".to_vec()), &UserBuffer::Faulting(2)), Err(STATUS_ACCESS_VIOLATION));
        connection.disconnect();
        assert_eq!(CLIENTS.lock().expect("lock")[0], 0, "the disconnect callback closed the client port");

        let system = port::connect(PORT_NAME, &process::system(), b"hello").expect("SYSTEM connects once the slot is free");
        assert_eq!(system.send_bytes(b"12", 2), Ok(b"21".to_vec()));
        drop(system);
        driver.unload(false).expect("unload");
        let reports = take_reports();
        assert!(reports.is_empty(), "{reports:#?}");
    }
}

scenario! {
    fn a_port_without_obj_kernel_handle_is_refused_and_reported() {
        let _driver = setup(Mode::WithoutKernelHandle);
        assert_eq!(CREATE_STATUS.load(Ordering::SeqCst), STATUS_INVALID_PARAMETER as isize);
        assert_eq!(port::grants(PORT_NAME), None);
        assert_eq!(take_rules(), [Rule::InvalidArgument]);
    }
}

scenario! {
    fn a_server_port_left_open_at_unload_is_reported() {
        let mut driver = setup(Mode::PortLeftOpen);
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::PortLeak]);
    }
}

scenario! {
    fn a_client_port_never_closed_is_reported_at_unload() {
        let mut driver = setup(Mode::ClientPortNotClosed);
        let connection = port::connect(PORT_NAME, &admin(), b"hello").expect("connect");
        connection.disconnect();
        assert_eq!(take_rules(), [], "reported at unload, not before");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::ClientPortLeak]);
    }
}

scenario! {
    fn a_connection_open_at_unload_is_disconnected_by_filter_manager() {
        let mut driver = setup(Mode::Correct);
        let connection = port::connect(PORT_NAME, &admin(), b"hello").expect("connect");
        driver.unload(false).expect("unload");
        assert_eq!(CLIENTS.lock().expect("lock")[0], 0, "the disconnect callback ran and closed the client port");
        assert_eq!(connection.send_bytes(b"a", 1), Err(STATUS_PORT_DISCONNECTED));
        drop(connection);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn writing_the_output_buffer_directly_is_reported() {
        let _driver = setup(Mode::DirectWrite);
        let connection = port::connect(PORT_NAME, &admin(), b"hello").expect("connect");
        assert_eq!(connection.send_bytes(b"abc", 3), Ok(b"cba".to_vec()));
        assert_eq!(take_rules(), [Rule::UserBufferUnsafeAccess]);
    }
}

scenario! {
    fn reading_a_faulting_input_buffer_directly_is_reported_and_sees_poison() {
        let _driver = setup(Mode::DirectRead);
        let connection = port::connect(PORT_NAME, &admin(), b"hello").expect("connect");
        assert_eq!(connection.send_bytes(b"abc", 3), Ok(b"cba".to_vec()), "a direct read of ordinary memory works");
        assert_eq!(take_rules(), [], "and cannot be seen on the host");
        let reply = connection.send(&UserBuffer::Faulting(2), &UserBuffer::Memory(vec![0; 2]));
        assert_eq!(reply, Ok(vec![FAULT_FILL; 2]));
        assert_eq!(take_rules(), [Rule::UserBufferUnsafeAccess]);
    }
}

scenario! {
    fn reading_the_input_twice_is_reported_and_sees_the_other_threads_change() {
        let _driver = setup(Mode::DoubleFetch);
        let connection = port::connect(PORT_NAME, &admin(), b"hello").expect("connect");
        let changing = UserBuffer::Changing { first: b"AB".to_vec(), then: b"ZB".to_vec() };
        assert_eq!(connection.send(&changing, &UserBuffer::Memory(vec![0; 2])), Ok(b"BZ".to_vec()));
        assert_eq!(SEEN.lock().expect("lock")[0], b"AZ", "the validated byte and the used byte differ");
        assert_eq!(take_rules(), [Rule::UserBufferDoubleFetch]);
    }
}

scenario! {
    fn mm_copy_memory_reads_user_buffers_safely() {
        let _driver = setup(Mode::MmCopyMemory);
        let connection = port::connect(PORT_NAME, &admin(), b"hello").expect("connect");
        assert_eq!(connection.send_bytes(b"xyz", 3), Ok(b"zyx".to_vec()));
        let changing = UserBuffer::Changing { first: b"AB".to_vec(), then: b"ZZ".to_vec() };
        assert_eq!(connection.send(&changing, &UserBuffer::Memory(vec![0; 2])), Ok(b"BA".to_vec()), "captured once");
        assert_eq!(connection.send(&UserBuffer::Faulting(3), &UserBuffer::Memory(vec![0; 3])), Err(STATUS_ACCESS_VIOLATION));
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_copy_posted_to_a_system_worker_is_reported() {
        let _driver = setup(Mode::CopyOnWorker);
        let connection = port::connect(PORT_NAME, &admin(), b"hello").expect("connect");
        assert_eq!(connection.send_bytes(b"abc", 3), Err(STATUS_ACCESS_VIOLATION), "the address is not the worker's");
        assert_eq!(take_rules(), [Rule::UserBufferUnsafeAccess]);
    }
}
