//! A second test minifilter that exercises the kernel model from its own callbacks (DriverEntry and unload), correct
//! by default and wrong on request, for the checks that are about the state a driver callback returns with.

use std::sync::atomic::{AtomicIsize, AtomicU8, AtomicUsize, Ordering};

use fltsim::testfilters::build::{END, Table, operation, register, registration, unregister};
use windows_sys::{
    Wdk::{
        Foundation::{DRIVER_OBJECT, KEVENT},
        Storage::FileSystem::Minifilters::{
            FLT_OPERATION_REGISTRATION, FLT_REGISTRATION, FltAcquirePushLockExclusive, FltAcquirePushLockShared,
            FltDeletePushLock, FltInitializePushLock, FltReleasePushLock, FltStartFiltering,
        },
        System::SystemServices::{
            Executive, IoGetTopLevelIrp, IoSetTopLevelIrp, KeAreAllApcsDisabled, KeAreApcsDisabled,
            KeEnterCriticalRegion, KeEnterGuardedRegion, KeInitializeEvent, KeLeaveCriticalRegion,
            KeLeaveGuardedRegion, KeSetEvent, KeWaitForSingleObject,
        },
    },
    Win32::{
        Foundation::{NTSTATUS, STATUS_SUCCESS, STATUS_UNSUCCESSFUL, UNICODE_STRING},
        System::Kernel::NotificationEvent,
    },
};

/// The kernel test filter's service name.
pub const SERVICE: &str = "fltsimkernel";

/// What the kernel test filter does wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    /// Nothing: regions, a push lock and an event, each used correctly.
    None,
    /// DriverEntry returns inside the critical region it entered.
    EntryReturnsInCriticalRegion,
    /// The unload callback returns inside the guarded region it entered.
    UnloadReturnsInGuardedRegion,
    /// The unload callback returns still holding the push lock (so still in the critical region the lock entered).
    UnloadHoldsPushLock,
    /// DriverEntry calls `IoSetTopLevelIrp`, which only file systems may call.
    SetsTopLevelIrp,
}

const ALL: [Fault; 5] = [
    Fault::None,
    Fault::EntryReturnsInCriticalRegion,
    Fault::UnloadReturnsInGuardedRegion,
    Fault::UnloadHoldsPushLock,
    Fault::SetsTopLevelIrp,
];

static FAULT: AtomicU8 = AtomicU8::new(0);
static FILTER: AtomicIsize = AtomicIsize::new(0);
/// The push lock's storage (an `EX_PUSH_LOCK` is one pointer-sized word).
static PUSH_LOCK: AtomicUsize = AtomicUsize::new(0);

fn fault() -> Fault {
    ALL[usize::from(FAULT.load(Ordering::SeqCst))]
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 1]> = Table([operation(END, None, None)]);

static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));

/// Calls a kernel routine that takes no arguments and only changes or reads the calling thread's state.
fn call<T>(routine: unsafe extern "system" fn() -> T) -> T {
    // SAFETY: the routines passed here take no arguments; the model checks the thread state they depend on.
    unsafe { routine() }
}

/// Calls a push lock routine on the filter's push lock.
fn on_lock(routine: unsafe extern "system" fn(*mut usize)) {
    // SAFETY: `PUSH_LOCK` is static storage for the push lock, initialized in DriverEntry.
    unsafe { routine(PUSH_LOCK.as_ptr()) };
}

/// Uses every kernel routine correctly; returns whether each answered as documented.
fn use_kernel_correctly() -> bool {
    call(KeEnterCriticalRegion);
    let critical = call(KeAreApcsDisabled) && !call(KeAreAllApcsDisabled);
    call(KeEnterGuardedRegion);
    let guarded = call(KeAreApcsDisabled) && call(KeAreAllApcsDisabled);
    call(KeLeaveGuardedRegion);
    call(KeLeaveCriticalRegion);
    let regions_ok = critical && guarded && !call(KeAreApcsDisabled) && call(IoGetTopLevelIrp).is_null();

    on_lock(FltAcquirePushLockShared);
    let held_shared = call(KeAreApcsDisabled);
    on_lock(FltReleasePushLock);
    on_lock(FltAcquirePushLockExclusive);
    let held_exclusive = call(KeAreApcsDisabled);
    on_lock(FltReleasePushLock);
    let lock_ok = held_shared && held_exclusive && !call(KeAreApcsDisabled);

    let mut event = KEVENT::default();
    let zero: i64 = 0;
    // SAFETY: `event` lives on this stack for the whole sequence.
    unsafe { KeInitializeEvent(&raw mut event, NotificationEvent, false) };
    // SAFETY: as above.
    unsafe { KeSetEvent(&raw mut event, 0, false) };
    // SAFETY: as above; `zero` is a valid LARGE_INTEGER.
    let status = unsafe { KeWaitForSingleObject((&raw const event).cast(), Executive, 0, false, &raw const zero) };
    regions_ok && lock_ok && status == STATUS_SUCCESS
}

/// The kernel test filter's DriverEntry.
///
/// # Safety
/// Called by the fltsim loader with a valid driver object.
pub unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, _path: *const UNICODE_STRING) -> NTSTATUS {
    // SAFETY: the loader's driver object.
    let filter = match unsafe { register(driver, &REGISTRATION, &FILTER) } {
        Ok(filter) => filter,
        Err(status) => return status,
    };
    on_lock(FltInitializePushLock);
    let correct = use_kernel_correctly();
    match fault() {
        Fault::EntryReturnsInCriticalRegion => call(KeEnterCriticalRegion),
        // SAFETY: any value is accepted; the model reports the call.
        Fault::SetsTopLevelIrp => unsafe { IoSetTopLevelIrp(std::ptr::without_provenance(0x4)) },
        _ => {}
    }
    // SAFETY: the handle FltRegisterFilter returned.
    unsafe { FltStartFiltering(filter) };
    if correct { STATUS_SUCCESS } else { STATUS_UNSUCCESSFUL }
}

unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
    match fault() {
        Fault::UnloadReturnsInGuardedRegion => call(KeEnterGuardedRegion),
        Fault::UnloadHoldsPushLock => on_lock(FltAcquirePushLockExclusive),
        // SAFETY: the push lock was initialized in DriverEntry and is not held.
        _ => unsafe { FltDeletePushLock(PUSH_LOCK.as_ptr()) },
    }
    unregister(&FILTER);
    STATUS_SUCCESS
}

/// Installs the kernel test filter's service and loads it with `fault`.
///
/// # Errors
/// The loader's error.
pub fn load(fault: Fault) -> Result<fltsim::LoadedDriver, fltsim::LoadError> {
    FAULT.store(fault as u8, Ordering::SeqCst);
    fltsim::registry::install_minifilter_service(SERVICE, "Kernel Test Instance", "385200");
    fltsim::load(SERVICE, driver_entry)
}
