//! `FltRegisterFilter`, `FltStartFiltering` and `FltUnregisterFilter`, with the validation Filter Manager applies
//! to a registration and the records tests inspect.

use std::sync::{Mutex, MutexGuard, PoisonError};

use windows_sys::{
    Wdk::{
        Foundation::{DRIVER_EXTENSION, DRIVER_OBJECT},
        Storage::FileSystem::Minifilters::{
            FLT_CONTEXT_END, FLT_CONTEXT_REGISTRATION, FLT_OPERATION_REGISTRATION, FLT_REGISTRATION,
            FLT_REGISTRATION_VERSION_0200, FLT_REGISTRATION_VERSION_0203, IRP_MJ_OPERATION_END, PFLT_FILTER,
            PFLT_FILTER_UNLOAD_CALLBACK, PFLT_INSTANCE_QUERY_TEARDOWN_CALLBACK, PFLT_INSTANCE_SETUP_CALLBACK,
            PFLT_INSTANCE_TEARDOWN_CALLBACK, PFLT_POST_OPERATION_CALLBACK, PFLT_PRE_OPERATION_CALLBACK,
        },
    },
    Win32::Foundation::{
        NTSTATUS, STATUS_INVALID_PARAMETER, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS, UNICODE_STRING,
    },
};

use crate::{
    guard::guarded,
    inf::RegValue,
    kernel::{irql, thread},
    registry,
    verifier::{self, Rule},
};

const FLTREGISTERFILTER: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltregisterfilter";
const FLTSTARTFILTERING: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltstartfiltering";
const FLTUNREGISTERFILTER: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltunregisterfilter";

/// The highest `IRP_MJ_*` code of the I/O manager (`IRP_MJ_MAXIMUM_FUNCTION`).
const IRP_MJ_MAXIMUM_FUNCTION: u8 = 0x1b;

/// The operation tables the model reads before deciding a terminator is missing. Real tables have a few dozen
/// entries at most.
const MAX_OPERATIONS: usize = 256;

/// The `FLTFL_REGISTRATION_*` flags the docs define.
const KNOWN_REGISTRATION_FLAGS: u32 = 0x1 | 0x2 | 0x4 | 0x8;

/// The `FLTFL_OPERATION_REGISTRATION_*` flags the docs define.
const KNOWN_OPERATION_FLAGS: u32 = 0x1 | 0x2 | 0x4 | 0x8;

/// One entry of a filter's operation table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperationRecord {
    /// The major function code (Filter Manager's negative codes as their `u8` values).
    pub major: u8,
    /// `FLTFL_OPERATION_REGISTRATION_*`.
    pub flags: u32,
    /// Whether a pre-operation callback is registered.
    pub pre: bool,
    /// Whether a post-operation callback is registered.
    pub post: bool,
}

/// An instance the service key defines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceDefinition {
    /// The instance's subkey name.
    pub name: String,
    /// Its altitude, as written.
    pub altitude: String,
    /// Its flags.
    pub flags: u32,
}

/// What the model recorded about one registered filter.
#[derive(Clone, Debug)]
#[expect(clippy::struct_excessive_bools, reason = "one flag per optional callback, as FLT_REGISTRATION has")]
pub struct FilterRecord {
    /// The handle `FltRegisterFilter` returned.
    pub handle: PFLT_FILTER,
    /// The driver object that registered it.
    pub driver_object: usize,
    /// The service name from the driver object's extension.
    pub service: String,
    /// `FLT_REGISTRATION::Version`.
    pub version: u16,
    /// `FLT_REGISTRATION::Flags`.
    pub flags: u32,
    /// The operation table, without its terminator.
    pub operations: Vec<OperationRecord>,
    /// Context types registered.
    pub context_types: Vec<u16>,
    /// Whether each callback is present: unload, instance setup, query teardown, teardown start and complete.
    pub has_unload: bool,
    /// See [`FilterRecord::has_unload`].
    pub has_instance_setup: bool,
    /// See [`FilterRecord::has_unload`].
    pub has_instance_query_teardown: bool,
    /// See [`FilterRecord::has_unload`].
    pub has_instance_teardown_start: bool,
    /// See [`FilterRecord::has_unload`].
    pub has_instance_teardown_complete: bool,
    /// The registry's `DefaultInstance`.
    pub default_instance: Option<String>,
    /// The instances defined under the service key.
    pub instances: Vec<InstanceDefinition>,
    /// Whether `FltStartFiltering` succeeded.
    pub started: bool,
    /// Whether `FltUnregisterFilter` was called.
    pub unregistered: bool,
    pub(crate) callbacks: Callbacks,
    pub(crate) operation_callbacks: Vec<OperationCallbacks>,
    pub(crate) context_registrations: Vec<super::context::ContextType>,
}

/// The callbacks of a registration, kept to call them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Callbacks {
    pub(crate) unload: PFLT_FILTER_UNLOAD_CALLBACK,
    pub(crate) instance_setup: PFLT_INSTANCE_SETUP_CALLBACK,
    pub(crate) instance_query_teardown: PFLT_INSTANCE_QUERY_TEARDOWN_CALLBACK,
    pub(crate) instance_teardown_start: PFLT_INSTANCE_TEARDOWN_CALLBACK,
    pub(crate) instance_teardown_complete: PFLT_INSTANCE_TEARDOWN_CALLBACK,
}

/// The callbacks registered for one operation, kept to call them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OperationCallbacks {
    pub(crate) major: u8,
    pub(crate) pre: PFLT_PRE_OPERATION_CALLBACK,
    pub(crate) post: PFLT_POST_OPERATION_CALLBACK,
}

static FILTERS: Mutex<Vec<FilterRecord>> = Mutex::new(Vec::new());

fn records() -> MutexGuard<'static, Vec<FilterRecord>> {
    FILTERS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every filter registered in this process, unregistered ones included.
#[must_use]
pub fn filters() -> Vec<FilterRecord> {
    records().clone()
}

/// Handles look like kernel pointers but are never dereferenced by anyone but the model.
fn handle_for(index: usize) -> PFLT_FILTER {
    let base: usize = 0x0000_7ff1_1000_0000;
    base.wrapping_add(index.wrapping_mul(0x1000)).cast_signed()
}

/// Reads a `UNICODE_STRING` the kernel (here: the loader) owns.
///
/// # Safety
/// `s` must point to a valid `UNICODE_STRING` whose buffer holds `Length` bytes.
unsafe fn read_unicode(s: *const UNICODE_STRING) -> Option<String> {
    // SAFETY: the caller guarantees `s` is valid.
    let s = unsafe { s.as_ref() }?;
    if s.Buffer.is_null() {
        return None;
    }
    // SAFETY: the buffer holds `Length` bytes, i.e. `Length / 2` UTF-16 units.
    let units = unsafe { std::slice::from_raw_parts(s.Buffer, usize::from(s.Length / 2)) };
    Some(String::from_utf16_lossy(units))
}

fn valid_major(major: u8) -> bool {
    // IRP_MJ_CREATE..=IRP_MJ_PNP, and Filter Manager's pseudo-operations IRP_MJ_VOLUME_DISMOUNT (-20) through
    // IRP_MJ_ACQUIRE_FOR_SECTION_SYNCHRONIZATION (-1), which leave -8..=-12 unused.
    major <= IRP_MJ_MAXIMUM_FUNCTION || (0xEC..=0xFF).contains(&major) && !(0xF4..=0xF8).contains(&major)
}

/// Reads and validates the operation table.
///
/// # Safety
/// `table` must be null or point to an array of registrations that the driver keeps alive.
unsafe fn read_operations(
    table: *const FLT_OPERATION_REGISTRATION,
) -> Result<(Vec<OperationRecord>, Vec<OperationCallbacks>), String> {
    if table.is_null() {
        return Ok((Vec::new(), Vec::new()));
    }
    // Find the terminator first, reading no further than a real table could reach.
    let mut entries: Vec<&FLT_OPERATION_REGISTRATION> = Vec::new();
    for index in 0..MAX_OPERATIONS {
        // SAFETY: the table is valid up to its terminator, which has not been reached yet.
        let entry = unsafe { &*table.wrapping_add(index) };
        if u16::from(entry.MajorFunction) == IRP_MJ_OPERATION_END {
            break;
        }
        entries.push(entry);
    }
    if entries.len() == MAX_OPERATIONS {
        return Err(format!("no IRP_MJ_OPERATION_END within {MAX_OPERATIONS} entries"));
    }
    let mut out: Vec<OperationRecord> = Vec::new();
    let mut callbacks = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        if !valid_major(entry.MajorFunction) {
            return Err(format!("entry {index}: {:#04x} is not a major function code", entry.MajorFunction));
        }
        if entry.Flags & !KNOWN_OPERATION_FLAGS != 0 {
            return Err(format!("entry {index}: unknown FLTFL_OPERATION_REGISTRATION flags {:#x}", entry.Flags));
        }
        // Stricter than documented: a second entry for the same operation is almost surely a mistake.
        if out.iter().any(|o| o.major == entry.MajorFunction) {
            return Err(format!("entry {index}: major function {:#04x} registered twice", entry.MajorFunction));
        }
        out.push(OperationRecord {
            major: entry.MajorFunction,
            flags: entry.Flags,
            pre: entry.PreOperation.is_some(),
            post: entry.PostOperation.is_some(),
        });
        callbacks.push(OperationCallbacks {
            major: entry.MajorFunction,
            pre: entry.PreOperation,
            post: entry.PostOperation,
        });
    }
    Ok((out, callbacks))
}

/// Reads the context registration table.
///
/// # Safety
/// `table` must be null or point to an array of registrations that the driver keeps alive.
unsafe fn read_contexts(table: *const FLT_CONTEXT_REGISTRATION) -> Result<Vec<super::context::ContextType>, String> {
    let mut out = Vec::new();
    if table.is_null() {
        return Ok(out);
    }
    for index in 0..MAX_OPERATIONS {
        // SAFETY: the table is valid up to its terminator, which has not been reached yet.
        let entry = unsafe { &*table.wrapping_add(index) };
        if u32::from(entry.ContextType) == FLT_CONTEXT_END {
            return Ok(out);
        }
        out.push(super::context::ContextType {
            kind: entry.ContextType,
            size: entry.Size,
            cleanup: entry.ContextCleanupCallback,
        });
    }
    Err(format!("no FLT_CONTEXT_END within {MAX_OPERATIONS} context registrations"))
}

fn read_instances(service: &str) -> Option<(Option<String>, Vec<InstanceDefinition>)> {
    let key = registry::instances_key(service);
    registry::key(&key)?;
    let default_instance = match registry::value(&key, "DefaultInstance") {
        Some(RegValue::Sz(s)) => Some(s),
        _ => None,
    };
    let instances = registry::subkeys(&key)
        .into_iter()
        .filter_map(|name| {
            let path = format!(r"{key}\{name}");
            let Some(RegValue::Sz(altitude)) = registry::value(&path, "Altitude") else { return None };
            let flags = match registry::value(&path, "Flags") {
                Some(RegValue::Dword(f)) => f,
                _ => 0,
            };
            Some(InstanceDefinition { name, altitude, flags })
        })
        .collect();
    Some((default_instance, instances))
}

/// `FltRegisterFilter`.
///
/// Rules: IRQL ≤ APC_LEVEL; a registration whose `Size` is `sizeof(FLT_REGISTRATION)`, whose `Version` is a
/// 0x02xx version this Filter Manager knows (0x0200–0x0203), whose flags are defined, and whose operation table
/// holds valid major functions and ends in `IRP_MJ_OPERATION_END` (else `STATUS_INVALID_PARAMETER`, reported);
/// the service's instances key must exist where the simulated build reads it (else
/// `STATUS_OBJECT_NAME_NOT_FOUND`, as on Windows, not a driver bug and so not reported).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltregisterfilter>.
///
/// # Safety
/// Called by driver code with the pointers it has; the model validates what it can and reads the rest as the
/// kernel would.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltRegisterFilter(
    driver: *const DRIVER_OBJECT,
    registration: *const FLT_REGISTRATION,
    ret_filter: *mut PFLT_FILTER,
) -> NTSTATUS {
    const API: &str = "FltRegisterFilter";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, FLTREGISTERFILTER) {
            return STATUS_INVALID_PARAMETER;
        }
        let invalid = |why: String| {
            verifier::report(Rule::RegistrationInvalid, API, why);
            STATUS_INVALID_PARAMETER
        };
        if driver.is_null() || registration.is_null() || ret_filter.is_null() {
            return invalid("Driver, Registration and RetFilter must all be non-NULL".to_owned());
        }
        // SAFETY: checked non-NULL; the driver passes its static registration table.
        let reg = unsafe { &*registration };
        if usize::from(reg.Size) != size_of::<FLT_REGISTRATION>() {
            return invalid(format!(
                "Size is {} but sizeof(FLT_REGISTRATION) is {}",
                reg.Size,
                size_of::<FLT_REGISTRATION>()
            ));
        }
        if !(FLT_REGISTRATION_VERSION_0200..=FLT_REGISTRATION_VERSION_0203).contains(&u32::from(reg.Version)) {
            return invalid(format!("Version {:#06x} is not a known FLT_REGISTRATION_VERSION", reg.Version));
        }
        if reg.Flags & !KNOWN_REGISTRATION_FLAGS != 0 {
            return invalid(format!("unknown FLTFL_REGISTRATION flags {:#x}", reg.Flags));
        }
        // SAFETY: the driver keeps its operation table alive for its lifetime.
        let (operations, operation_callbacks) = match unsafe { read_operations(reg.OperationRegistration) } {
            Ok(ops) => ops,
            Err(why) => return invalid(format!("OperationRegistration: {why}")),
        };
        // SAFETY: as above, for the context table.
        let context_registrations = match unsafe { read_contexts(reg.ContextRegistration) } {
            Ok(types) => types,
            Err(why) => return invalid(format!("ContextRegistration: {why}")),
        };
        // SAFETY: checked non-NULL; the loader built this driver object.
        let extension = unsafe { (*driver).DriverExtension };
        if extension.is_null() {
            return invalid("the driver object has no DriverExtension".to_owned());
        }
        let name = extension.wrapping_byte_add(std::mem::offset_of!(DRIVER_EXTENSION, ServiceKeyName));
        // SAFETY: the extension belongs to the driver object and holds the service name the loader set.
        let Some(service) = (unsafe { read_unicode(name.cast()) }) else {
            return invalid("the driver object has no service key name".to_owned());
        };
        let Some((default_instance, instances)) = read_instances(&service) else {
            // Windows: "The filter service key is not found in the registry" (no Instances key where this build
            // reads it). A configuration error, not a driver bug: answered, not reported.
            return STATUS_OBJECT_NAME_NOT_FOUND;
        };
        let mut all = records();
        let handle = handle_for(all.len());
        all.push(FilterRecord {
            handle,
            driver_object: driver as usize,
            service,
            version: reg.Version,
            flags: reg.Flags,
            operations,
            context_types: context_registrations.iter().map(|c| c.kind).collect(),
            has_unload: reg.FilterUnloadCallback.is_some(),
            has_instance_setup: reg.InstanceSetupCallback.is_some(),
            has_instance_query_teardown: reg.InstanceQueryTeardownCallback.is_some(),
            has_instance_teardown_start: reg.InstanceTeardownStartCallback.is_some(),
            has_instance_teardown_complete: reg.InstanceTeardownCompleteCallback.is_some(),
            default_instance,
            instances,
            started: false,
            unregistered: false,
            callbacks: Callbacks {
                unload: reg.FilterUnloadCallback,
                instance_setup: reg.InstanceSetupCallback,
                instance_query_teardown: reg.InstanceQueryTeardownCallback,
                instance_teardown_start: reg.InstanceTeardownStartCallback,
                instance_teardown_complete: reg.InstanceTeardownCompleteCallback,
            },
            operation_callbacks,
            context_registrations,
        });
        // SAFETY: checked non-NULL; the driver passes a place for the handle.
        unsafe { ret_filter.write(handle) };
        STATUS_SUCCESS
    })
}

fn with_live_filter<T>(api: &'static str, handle: PFLT_FILTER, f: impl FnOnce(&mut FilterRecord) -> T) -> Option<T> {
    let mut all = records();
    if let Some(record) = all.iter_mut().find(|r| r.handle == handle && !r.unregistered) {
        return Some(f(record));
    }
    drop(all);
    verifier::report(Rule::InvalidFilterHandle, api, format!("{handle:#x} is not a registered filter"));
    None
}

/// `FltStartFiltering`: IRQL PASSIVE_LEVEL, on a registered filter.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltstartfiltering>.
#[unsafe(no_mangle)]
pub extern "system" fn FltStartFiltering(filter: PFLT_FILTER) -> NTSTATUS {
    const API: &str = "FltStartFiltering";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, FLTSTARTFILTERING) {
            return STATUS_INVALID_PARAMETER;
        }
        let Some(record) = with_live_filter(API, filter, |r| {
            r.started = true;
            r.clone()
        }) else {
            return STATUS_INVALID_PARAMETER;
        };
        // Attaching calls the driver's InstanceSetup, so no model lock is held here.
        super::instance::attach_all_volumes(&record);
        STATUS_SUCCESS
    })
}

/// `FltUnregisterFilter`: IRQL PASSIVE_LEVEL, once per registered filter; waits for the filter's rundown.
///
/// From the moment it is called, the filter's work items are refused (`STATUS_FLT_DELETING_OBJECT`). It tears the
/// instances down (InstanceTeardownStart, then InstanceTeardownComplete), then blocks until every generic and
/// deferred-I/O work item the filter queued, waiting or running, has returned, and only then is the filter gone.
/// Windows waits for an item queued on an instance inside that instance's teardown; the model waits for all of
/// them after the teardown callbacks, a simplification a driver cannot tell apart unless an InstanceTeardownComplete
/// callback depends on its items having run. A second call while the first is still running down is reported
/// ([`Rule::InvalidFilterHandle`]) and returns at once; a call from one of the filter's own work items would wait
/// for itself and is reported ([`Rule::UnregisterWaitsForItself`]; the model does not wait for that item).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltunregisterfilter>.
#[unsafe(no_mangle)]
pub extern "system" fn FltUnregisterFilter(filter: PFLT_FILTER) {
    const API: &str = "FltUnregisterFilter";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, FLTUNREGISTERFILTER) {
            return;
        }
        let Some(record) = with_live_filter(API, filter, |r| r.clone()) else {
            return;
        };
        if !super::pending::begin_rundown(filter) {
            verifier::report(
                Rule::InvalidFilterHandle,
                API,
                format!("{filter:#x} is already being unregistered by another FltUnregisterFilter"),
            );
            return;
        }
        // Instances are torn down (calling the driver's teardown callbacks) before the filter is gone.
        super::instance::tear_down_filter(&record);
        // The filter's work items, queued or running, return before FltUnregisterFilter does.
        super::pending::run_down(API, filter);
        with_live_filter(API, filter, |r| {
            r.unregistered = true;
            r.started = false;
        });
    });
}
