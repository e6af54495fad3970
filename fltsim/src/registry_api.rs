//! The registry routines a driver calls to read its service key: `ZwOpenKey` and `ZwQueryValueKey` (closed with
//! `ZwClose`), over the registry model of [`crate::registry`].
//!
//! Names are full object names (`\Registry\Machine\System\CurrentControlSet\Services\shunt\Parameters`), or
//! relative to an open key given as `RootDirectory`, and compare case-insensitively. `ZwQueryValueKey` answers
//! `KeyValuePartialInformation` (the class drivers read values with): `REG_SZ` data is UTF-16 with its NUL,
//! `REG_DWORD` four little-endian bytes, `REG_MULTI_SZ` NUL-separated strings ending in two NULs. A buffer too
//! small for the header answers `STATUS_BUFFER_TOO_SMALL`, one too small for the data `STATUS_BUFFER_OVERFLOW`,
//! both with the size needed in `ResultLength`, as the docs say.
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwopenkey>,
//! <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwqueryvaluekey>.)

use std::{
    collections::BTreeMap,
    ffi::c_void,
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::OBJECT_ATTRIBUTES,
        System::{
            Registry::{KEY_VALUE_INFORMATION_CLASS, KeyValuePartialInformation},
            SystemServices::KEY_VALUE_PARTIAL_INFORMATION,
        },
    },
    Win32::Foundation::{
        HANDLE, NTSTATUS, STATUS_BUFFER_OVERFLOW, STATUS_BUFFER_TOO_SMALL, STATUS_INVALID_HANDLE,
        STATUS_INVALID_PARAMETER, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS, UNICODE_STRING,
    },
};

use crate::{
    guard::guarded,
    inf::RegValue,
    kernel::{irql, thread},
    registry,
    verifier::{self, Rule},
};

const ZWOPENKEY: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwopenkey";
const ZWQUERYVALUEKEY: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwqueryvaluekey";

struct Keys {
    next: usize,
    open: BTreeMap<usize, String>,
}

static KEYS: Mutex<Keys> = Mutex::new(Keys { next: 0, open: BTreeMap::new() });

fn keys() -> MutexGuard<'static, Keys> {
    KEYS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes a key handle; false when `handle` is not one (`ZwClose` then tries file handles).
pub(crate) fn close_key(handle: usize) -> bool {
    keys().open.remove(&handle).is_some()
}

/// Key handles still open, for leak reports.
#[must_use]
pub fn open_keys() -> Vec<String> {
    keys().open.values().cloned().collect()
}

/// Reads a `UNICODE_STRING` a driver passed.
///
/// # Safety
/// `s` must be NULL or point to a valid `UNICODE_STRING` whose buffer holds `Length` bytes.
unsafe fn text(s: *const UNICODE_STRING) -> Option<String> {
    // SAFETY: the caller guarantees `s` is NULL or valid.
    let s = unsafe { s.as_ref() }?;
    if s.Buffer.is_null() {
        return Some(String::new());
    }
    // SAFETY: the buffer holds `Length` bytes.
    Some(String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(s.Buffer, usize::from(s.Length / 2)) }))
}

/// `ZwOpenKey`: PASSIVE_LEVEL; an existing key by full name or relative to an open key.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwopenkey>.
///
/// # Safety
/// Called by driver code with the pointers it has.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn ZwOpenKey(
    key_handle: *mut HANDLE,
    _desired_access: u32,
    object_attributes: *const OBJECT_ATTRIBUTES,
) -> NTSTATUS {
    const API: &str = "ZwOpenKey";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, ZWOPENKEY) {
            return STATUS_INVALID_PARAMETER;
        }
        // SAFETY: NULL or the driver's object attributes.
        let Some(attributes) = (unsafe { object_attributes.as_ref() }) else { return STATUS_INVALID_PARAMETER };
        if key_handle.is_null() {
            return STATUS_INVALID_PARAMETER;
        }
        // SAFETY: the attributes' name is NULL or a valid UNICODE_STRING.
        let Some(name) = (unsafe { text(attributes.ObjectName) }) else { return STATUS_INVALID_PARAMETER };
        let path = if attributes.RootDirectory.is_null() {
            name
        } else {
            let Some(root) = keys().open.get(&(attributes.RootDirectory as usize)).cloned() else {
                return STATUS_INVALID_HANDLE;
            };
            if name.is_empty() { root } else { format!("{root}\\{name}") }
        };
        if registry::key(&path).is_none() {
            return STATUS_OBJECT_NAME_NOT_FOUND;
        }
        let value = {
            let mut all = keys();
            all.next = all.next.saturating_add(4);
            let value = 0xFFFF_8800_0000_0000_usize | all.next;
            all.open.insert(value, path);
            value
        };
        // SAFETY: checked non-NULL; a place for the handle.
        unsafe { key_handle.write(value as HANDLE) };
        STATUS_SUCCESS
    })
}

fn value_bytes(value: &RegValue) -> (u32, Vec<u8>) {
    let utf16 = |s: &str| s.encode_utf16().chain(std::iter::once(0)).flat_map(u16::to_le_bytes).collect::<Vec<u8>>();
    match value {
        RegValue::Sz(s) => (windows_sys::Win32::System::Registry::REG_SZ, utf16(s)),
        RegValue::Dword(d) => (windows_sys::Win32::System::Registry::REG_DWORD, d.to_le_bytes().to_vec()),
        RegValue::MultiSz(list) => {
            let mut bytes: Vec<u8> = list.iter().flat_map(|s| utf16(s)).collect();
            bytes.extend_from_slice(&[0, 0]);
            (windows_sys::Win32::System::Registry::REG_MULTI_SZ, bytes)
        }
    }
}

/// `ZwQueryValueKey`: PASSIVE_LEVEL; an open key; `KeyValuePartialInformation`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/wdm/nf-wdm-zwqueryvaluekey>.
///
/// # Safety
/// Called by driver code: `KeyValueInformation` must hold `Length` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn ZwQueryValueKey(
    key_handle: HANDLE,
    value_name: *const UNICODE_STRING,
    class: KEY_VALUE_INFORMATION_CLASS,
    information: *mut c_void,
    length: u32,
    result_length: *mut u32,
) -> NTSTATUS {
    const API: &str = "ZwQueryValueKey";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, ZWQUERYVALUEKEY) {
            return STATUS_INVALID_PARAMETER;
        }
        let Some(path) = keys().open.get(&(key_handle as usize)).cloned() else { return STATUS_INVALID_HANDLE };
        if class != KeyValuePartialInformation {
            verifier::report(
                Rule::UnsupportedByModel,
                API,
                format!("key value information class {class} is not modelled"),
            );
            return STATUS_INVALID_PARAMETER;
        }
        // SAFETY: NULL or the driver's UNICODE_STRING.
        let Some(name) = (unsafe { text(value_name) }) else { return STATUS_INVALID_PARAMETER };
        let Some(value) = registry::value(&path, &name) else { return STATUS_OBJECT_NAME_NOT_FOUND };
        let (kind, data) = value_bytes(&value);
        let header = std::mem::offset_of!(KEY_VALUE_PARTIAL_INFORMATION, Data);
        let needed = header.saturating_add(data.len());
        if !result_length.is_null() {
            // SAFETY: a place for the length.
            unsafe { result_length.write(u32::try_from(needed).unwrap_or(u32::MAX)) };
        }
        let available = usize::try_from(length).unwrap_or(0);
        if information.is_null() || available < header {
            return STATUS_BUFFER_TOO_SMALL;
        }
        let info = KEY_VALUE_PARTIAL_INFORMATION {
            TitleIndex: 0,
            Type: kind,
            DataLength: u32::try_from(data.len()).unwrap_or(u32::MAX),
            Data: [0],
        };
        let out = information.cast::<u8>();
        // SAFETY: the buffer holds at least the header's bytes.
        unsafe { std::ptr::copy_nonoverlapping(std::ptr::from_ref(&info).cast::<u8>(), out, header) };
        let fits = data.len().min(available - header);
        let rest = out.wrapping_add(header);
        // SAFETY: the buffer holds `length` bytes, of which `fits` follow the header.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), rest, fits) };
        if fits < data.len() { STATUS_BUFFER_OVERFLOW } else { STATUS_SUCCESS }
    })
}
