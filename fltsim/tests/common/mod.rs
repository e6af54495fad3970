//! A small test minifilter for fltsim's own tests, correct by default and wrong on request.
//!
//! Every scenario runs in its own process (`fltsim::scenario!`), so one filter image serves every test: the test
//! picks a [`Fault`] before loading it, and the filter commits exactly that fault.
#![allow(dead_code, reason = "each test binary uses a different part of the test filter")]

pub mod kernel_filter;

use std::{
    ffi::c_void,
    sync::atomic::{AtomicIsize, AtomicU8, Ordering},
};

use fltsim::testfilters::build::{END, REGISTRATION_SIZE, Table, operation, register, registration, unregister};
use windows_sys::{
    Wdk::{
        Foundation::DRIVER_OBJECT,
        Storage::FileSystem::Minifilters::{FLT_OPERATION_REGISTRATION, FLT_REGISTRATION, FltStartFiltering},
        System::SystemServices::{ExAllocatePool2, ExFreePoolWithTag},
    },
    Win32::Foundation::{NTSTATUS, STATUS_INSUFFICIENT_RESOURCES, STATUS_SUCCESS, UNICODE_STRING},
};

/// The service name of the test filter.
pub const SERVICE: &str = "fltsimtest";

/// The pool tag the test filter allocates with.
pub const TAG: u32 = u32::from_le_bytes(*b"FsTf");

/// `POOL_FLAG_NON_PAGED`.
pub const NON_PAGED: u64 = 0x40;

/// What the test filter does wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Nothing: a correct filter.
    None,
    /// Frees its pool twice at unload.
    DoubleFree,
    /// Frees a pointer the pool never returned.
    FreeNotAllocated,
    /// Frees its pool with another tag.
    TagMismatch,
    /// Allocates with a zero tag.
    ZeroTag,
    /// Keeps its pool at unload.
    LeakAtUnload,
    /// Returns success from unload without calling `FltUnregisterFilter`.
    UnloadWithoutUnregister,
    /// Fails DriverEntry after registering, without unregistering.
    FailEntryStillRegistered,
    /// Registers a table whose Size is wrong.
    WrongRegistrationSize,
    /// Registers an operation table with no `IRP_MJ_OPERATION_END`.
    NoOperationTerminator,
    /// Starts filtering with a handle that is not a filter.
    StartBogusHandle,
}

static FAULT: AtomicU8 = AtomicU8::new(0);
static FILTER: AtomicIsize = AtomicIsize::new(0);
static POOL: AtomicIsize = AtomicIsize::new(0);

/// Chooses the fault before loading the filter.
pub fn set_fault(fault: Fault) {
    FAULT.store(fault as u8, Ordering::SeqCst);
}

fn fault() -> Fault {
    let all = [
        Fault::None,
        Fault::DoubleFree,
        Fault::FreeNotAllocated,
        Fault::TagMismatch,
        Fault::ZeroTag,
        Fault::LeakAtUnload,
        Fault::UnloadWithoutUnregister,
        Fault::FailEntryStillRegistered,
        Fault::WrongRegistrationSize,
        Fault::NoOperationTerminator,
        Fault::StartBogusHandle,
    ];
    all[usize::from(FAULT.load(Ordering::SeqCst))]
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, None, None), operation(END, None, None)]);
/// 256 `IRP_MJ_CREATE` entries and no terminator.
static UNTERMINATED: Table<[FLT_OPERATION_REGISTRATION; 256]> = Table([operation(0, None, None); 256]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));
static WRONG_SIZE: Table<FLT_REGISTRATION> = Table(FLT_REGISTRATION {
    Size: REGISTRATION_SIZE - 8,
    ..registration((&raw const OPERATIONS.0).cast(), Some(unload))
});
static NO_TERMINATOR: Table<FLT_REGISTRATION> = Table(registration((&raw const UNTERMINATED.0).cast(), Some(unload)));

/// The test filter's DriverEntry.
///
/// # Safety
/// Called by the fltsim loader with a valid driver object.
pub unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, _path: *const UNICODE_STRING) -> NTSTATUS {
    let table = match fault() {
        Fault::WrongRegistrationSize => &WRONG_SIZE,
        Fault::NoOperationTerminator => &NO_TERMINATOR,
        _ => &REGISTRATION,
    };
    // SAFETY: the loader's driver object.
    let filter = match unsafe { register(driver, table, &FILTER) } {
        Ok(filter) => filter,
        Err(status) => return status,
    };
    let tag = if fault() == Fault::ZeroTag { 0 } else { TAG };
    // SAFETY: plain values.
    let pool = unsafe { ExAllocatePool2(NON_PAGED, 64, tag) };
    POOL.store(pool as isize, Ordering::SeqCst);
    if fault() == Fault::FailEntryStillRegistered {
        return STATUS_INSUFFICIENT_RESOURCES;
    }
    let handle = if fault() == Fault::StartBogusHandle { 0x1234 } else { filter };
    // SAFETY: plain value; the model validates the handle.
    unsafe { FltStartFiltering(handle) };
    STATUS_SUCCESS
}

/// Frees `pool` with `tag`; the model checks both, which is what these tests exercise.
fn free(pool: *mut c_void, tag: u32) {
    // SAFETY: any pointer and tag may be passed: the model reports what is wrong instead of freeing.
    unsafe { ExFreePoolWithTag(pool, tag) };
}

unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
    let pool = POOL.load(Ordering::SeqCst) as *mut c_void;
    match fault() {
        Fault::LeakAtUnload | Fault::ZeroTag => {}
        Fault::DoubleFree => {
            free(pool, TAG);
            free(pool, TAG);
        }
        Fault::FreeNotAllocated => {
            free(pool, TAG);
            free(0x5000 as *mut c_void, TAG);
        }
        Fault::TagMismatch => {
            free(pool, u32::from_le_bytes(*b"Oops"));
            free(pool, TAG);
        }
        _ => free(pool, TAG),
    }
    if fault() != Fault::UnloadWithoutUnregister {
        unregister(&FILTER);
    }
    STATUS_SUCCESS
}

/// Installs the test filter's service and loads it with `fault`.
///
/// # Errors
/// The loader's error.
pub fn load(fault: Fault) -> Result<fltsim::LoadedDriver, fltsim::LoadError> {
    set_fault(fault);
    fltsim::registry::install_minifilter_service(SERVICE, "Test Instance", "385100");
    fltsim::load(SERVICE, driver_entry)
}
