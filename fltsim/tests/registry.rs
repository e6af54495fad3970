//! Reading a service key as a driver does: `ZwOpenKey`, `ZwQueryValueKey` with `KeyValuePartialInformation`,
//! `ZwClose`, against values the INF or a test wrote.

use std::ptr::null_mut;

use fltsim::{
    Rule,
    inf::RegValue,
    kernel::thread,
    registry, scenario,
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Foundation::OBJECT_ATTRIBUTES,
        System::{
            Registry::{KeyValuePartialInformation, ZwOpenKey, ZwQueryValueKey},
            SystemServices::{KEY_VALUE_PARTIAL_INFORMATION, ZwClose},
        },
    },
    Win32::{
        Foundation::{
            HANDLE, NTSTATUS, OBJ_KERNEL_HANDLE, STATUS_BUFFER_OVERFLOW, STATUS_BUFFER_TOO_SMALL,
            STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS, UNICODE_STRING,
        },
        System::Registry::{REG_DWORD, REG_SZ},
    },
};

fn unicode(units: &mut [u16]) -> UNICODE_STRING {
    let bytes = u16::try_from(units.len() * 2).expect("short");
    UNICODE_STRING { Length: bytes, MaximumLength: bytes, Buffer: units.as_mut_ptr() }
}

fn open(path: &str, root: HANDLE) -> (NTSTATUS, HANDLE) {
    let mut units: Vec<u16> = path.encode_utf16().collect();
    let name = unicode(&mut units);
    let attributes = OBJECT_ATTRIBUTES {
        Length: u32::try_from(size_of::<OBJECT_ATTRIBUTES>()).expect("small"),
        RootDirectory: root,
        ObjectName: &raw const name,
        Attributes: OBJ_KERNEL_HANDLE,
        SecurityDescriptor: std::ptr::null(),
        SecurityQualityOfService: std::ptr::null(),
    };
    let mut handle: HANDLE = null_mut();
    // SAFETY: live locals.
    let status = unsafe { ZwOpenKey(&raw mut handle, 0x2_0019, &raw const attributes) };
    (status, handle)
}

/// Queries `name`, returning the status, the length the model asked for, and the buffer.
fn query(handle: HANDLE, name: &str, length: usize) -> (NTSTATUS, u32, Vec<u8>) {
    let mut units: Vec<u16> = name.encode_utf16().collect();
    let name = unicode(&mut units);
    let mut buffer = vec![0u8; length];
    let mut needed = 0u32;
    // SAFETY: a buffer of `length` bytes.
    let status = unsafe {
        ZwQueryValueKey(
            handle,
            &raw const name,
            KeyValuePartialInformation,
            buffer.as_mut_ptr().cast(),
            u32::try_from(length).expect("small"),
            &raw mut needed,
        )
    };
    (status, needed, buffer)
}

fn header(buffer: &[u8]) -> KEY_VALUE_PARTIAL_INFORMATION {
    // SAFETY: the buffer holds at least the header.
    unsafe { std::ptr::read_unaligned(buffer.as_ptr().cast()) }
}

const SERVICE: &str = r"\REGISTRY\MACHINE\SYSTEM\CurrentControlSet\Services\regtest";

scenario! {
    fn a_driver_reads_its_service_key() {
        registry::set_value(&format!(r"{SERVICE}\Parameters"), "PolicyFile", RegValue::Sz(r"\??\C:\shunt\policy.bin".into()));
        registry::set_value(SERVICE, "Start", RegValue::Dword(3));
        let (status, service) = open(r"\Registry\Machine\System\CurrentControlSet\Services\RegTest", null_mut());
        assert_eq!(status, STATUS_SUCCESS, "names compare case-insensitively");
        let (status, parameters) = open("Parameters", service);
        assert_eq!(status, STATUS_SUCCESS, "a name relative to an open key");

        let (status, needed, _) = query(parameters, "PolicyFile", 4);
        assert_eq!(status, STATUS_BUFFER_TOO_SMALL);
        let (status, _, _) = query(parameters, "PolicyFile", 16);
        assert_eq!(status, STATUS_BUFFER_OVERFLOW, "the header fits, the data does not");
        let (status, _, buffer) = query(parameters, "policyfile", usize::try_from(needed).expect("small"));
        assert_eq!(status, STATUS_SUCCESS);
        let info = header(&buffer);
        assert_eq!(info.Type, REG_SZ);
        let data = &buffer[12..12 + usize::try_from(info.DataLength).expect("small")];
        let units: Vec<u16> = data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        assert_eq!(String::from_utf16_lossy(&units), "\\??\\C:\\shunt\\policy.bin\0");

        let (status, _, buffer) = query(service, "Start", 64);
        assert_eq!((status, header(&buffer).Type, header(&buffer).DataLength), (STATUS_SUCCESS, REG_DWORD, 4));
        assert_eq!(&buffer[12..16], &3u32.to_le_bytes());
        assert_eq!(query(service, "Missing", 64).0, STATUS_OBJECT_NAME_NOT_FOUND);
        assert_eq!(open(r"\Registry\Machine\Nowhere", null_mut()).0, STATUS_OBJECT_NAME_NOT_FOUND);

        for handle in [parameters, service] {
            // SAFETY: an open key handle, closed once.
            assert_eq!(unsafe { ZwClose(handle) }, STATUS_SUCCESS);
        }
        assert!(fltsim::registry_api::open_keys().is_empty());
        assert!(take_reports().is_empty());
    }
}

scenario! {
    fn opening_a_key_above_passive_level_is_reported() {
        registry::set_value(SERVICE, "Start", RegValue::Dword(3));
        let (status, _) = thread::at_irql(fltsim::kernel::irql::APC, || open(SERVICE, null_mut()));
        assert_ne!(status, STATUS_SUCCESS);
        assert_eq!(take_rules(), [Rule::IrqlTooHigh]);
    }
}
