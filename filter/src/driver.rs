//! The driver's safe logic: what happens at load and unload and what each callback decides. The trampolines in
//! [`crate::callbacks`] call these functions; nothing here touches a raw pointer.

use windows_sys::Win32::{
    Foundation::STATUS_FLT_DO_NOT_ATTACH,
    Storage::InstallableFileSystems::{
        FLT_FILESYSTEM_TYPE, FLT_FSTYPE_EXFAT, FLT_FSTYPE_FAT, FLT_FSTYPE_NTFS, FLT_FSTYPE_REFS,
    },
    System::Ioctl::FILE_DEVICE_DISK_FILE_SYSTEM,
};

use crate::{
    registration::REGISTRATION,
    wdk::{
        DriverObject, Filter, NtResult, NtStatus, PoolBox,
        pool::{PoolSlot, tags},
    },
};

/// What the driver keeps from `DriverEntry` to unload.
struct Globals {
    /// The registered filter; dropping it unregisters the filter.
    filter: Filter,
}

/// The driver's global state: set by [`driver_entry`], taken by [`unload`].
static GLOBALS: PoolSlot<Globals> = PoolSlot::new(tags::GLOBALS);

/// What a pre-operation callback decided; [`crate::callbacks`] maps it to `FLT_PREOP_*`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PreOp {
    /// Not Shunt's operation: pass it down and skip the post-operation callback.
    PassThrough,
    /// Pass it down and call the post-operation callback.
    WithPostOperation,
    /// Shunt completed the operation itself.
    Complete,
}

/// The kind of volume an instance is offered for.
#[derive(Clone, Copy, Debug)]
pub struct VolumeKind {
    /// `FILE_DEVICE_*` of the volume's device.
    pub device_type: u32,
    /// `FLT_FSTYPE_*` of the file system mounted on it.
    pub file_system: FLT_FILESYSTEM_TYPE,
}

/// Registers the filter, keeps it in the driver's globals and starts filtering.
///
/// IRQL: PASSIVE_LEVEL, from `DriverEntry`.
///
/// # Errors
/// The status of the step that failed; whatever was set up before it is undone.
pub fn driver_entry(driver: DriverObject<'_>) -> NtResult {
    let filter = Filter::register(driver, &REGISTRATION)?;
    // On every error below, the globals (and with them the filter) are dropped, which unregisters the filter.
    let globals = PoolBox::try_new(Globals { filter }, tags::GLOBALS)?;
    // No callback reads the globals yet; the unload callback, the only one that takes them, cannot run before
    // DriverEntry has returned.
    globals.filter.start_filtering()?;
    // DriverEntry runs once per load, so the slot is empty; if it were not, the image was entered twice.
    GLOBALS.set(globals).map_err(|_| NtStatus::INVALID_PARAMETER)
}

/// Unloads the driver: unregisters the filter (which waits for its callbacks and work to drain) and frees the
/// globals.
///
/// IRQL: PASSIVE_LEVEL. A non-mandatory unload could be refused with `STATUS_FLT_DO_NOT_DETACH`; nothing refuses
/// it yet.
///
/// # Errors
/// None yet: the result type leaves room for refusing a non-mandatory unload.
pub fn unload(_mandatory: bool) -> NtResult {
    drop(GLOBALS.take());
    Ok(())
}

/// Whether to attach an instance to a volume: Shunt attaches to disk file systems that can hold the files it
/// redirects (NTFS, ReFS, FAT, exFAT) and declines the rest (network redirectors, named pipes, mailslots, CD file
/// systems).
///
/// IRQL: PASSIVE_LEVEL.
///
/// # Errors
/// `STATUS_FLT_DO_NOT_ATTACH` for volumes Shunt does not serve.
pub fn instance_setup(volume: VolumeKind) -> NtResult {
    let disk = volume.device_type == FILE_DEVICE_DISK_FILE_SYSTEM;
    let supported = matches!(volume.file_system, FLT_FSTYPE_NTFS | FLT_FSTYPE_REFS | FLT_FSTYPE_FAT | FLT_FSTYPE_EXFAT);
    if disk && supported { Ok(()) } else { NtStatus::check(STATUS_FLT_DO_NOT_ATTACH) }
}

/// Whether an instance may be detached on request: yes, while no handle is redirected (there are none yet).
///
/// IRQL: PASSIVE_LEVEL.
///
/// # Errors
/// None yet.
pub fn instance_query_teardown() -> NtResult {
    Ok(())
}

/// Instance teardown begins: nothing is pended yet, so nothing needs completing.
pub fn instance_teardown_start() {}

/// Instance teardown ends: Shunt has opened no files on the volume yet, so none need closing.
pub fn instance_teardown_complete() {}

/// Pre-create: the policy engine is not wired in yet, so every create passes through untouched.
#[must_use]
pub fn pre_create() -> PreOp {
    PreOp::PassThrough
}
