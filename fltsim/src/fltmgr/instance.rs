//! Instances: Filter Manager attaches a started filter to every volume, calling its InstanceSetup callback, and
//! tears the instances down (InstanceTeardownStart, then InstanceTeardownComplete) when the filter unregisters or
//! an instance is detached.
//!
//! Automatic attachment uses the filter's `DefaultInstance` (or its first instance when none is named), unless
//! that instance's `Flags` has bit 0x1 (no automatic attachment). Instances of a volume are ordered by altitude,
//! highest first. Callbacks run on the calling thread at PASSIVE_LEVEL, as the docs give their IRQL
//! (<https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_instance_setup_callback>,
//! <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_instance_teardown_callback>).

use std::sync::{
    Mutex, MutexGuard, PoisonError,
    atomic::{AtomicBool, Ordering},
};

use windows_sys::{
    Wdk::Storage::FileSystem::Minifilters::{
        FLT_RELATED_OBJECTS, FLTFL_INSTANCE_SETUP_AUTOMATIC_ATTACHMENT, FLTFL_INSTANCE_SETUP_NEWLY_MOUNTED_VOLUME,
        FLTFL_INSTANCE_TEARDOWN_FILTER_UNLOAD, FLTFL_INSTANCE_TEARDOWN_MANDATORY_FILTER_UNLOAD,
        FLTFL_INSTANCE_TEARDOWN_MANUAL, PFLT_FILTER, PFLT_INSTANCE, PFLT_VOLUME,
    },
    Win32::Foundation::{NTSTATUS, STATUS_FLT_DO_NOT_DETACH, STATUS_INVALID_PARAMETER},
};

use super::registration::{FilterRecord, filters};
use crate::io::{Volume, volumes};

/// One instance: a filter attached (or offered) to a volume.
#[derive(Clone, Debug)]
pub struct InstanceRecord {
    /// The instance handle (`PFLT_INSTANCE`).
    pub handle: PFLT_INSTANCE,
    /// Its filter.
    pub filter: PFLT_FILTER,
    /// Its volume.
    pub volume: PFLT_VOLUME,
    /// The instance name from the registry.
    pub name: String,
    /// Its altitude.
    pub altitude: String,
    /// What InstanceSetup returned.
    pub setup_status: NTSTATUS,
    /// Whether it is attached now.
    pub attached: bool,
    /// Whether its InstanceSetup callback is running: the instance exists and may issue I/O below itself, but
    /// is not attached yet (see [`usable`]).
    pub setting_up: bool,
    /// The teardown reason (`FLTFL_INSTANCE_TEARDOWN_*`) once torn down.
    pub teardown_reason: Option<u32>,
}

static INSTANCES: Mutex<Vec<InstanceRecord>> = Mutex::new(Vec::new());
static MANDATORY_UNLOAD: AtomicBool = AtomicBool::new(false);

fn records() -> MutexGuard<'static, Vec<InstanceRecord>> {
    INSTANCES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every instance offered so far, attached or not.
#[must_use]
pub fn instances() -> Vec<InstanceRecord> {
    records().clone()
}

/// The attached instances of `volume`, highest altitude first.
#[must_use]
pub fn attached_on(volume: PFLT_VOLUME) -> Vec<InstanceRecord> {
    let mut on: Vec<InstanceRecord> = records().iter().filter(|i| i.volume == volume && i.attached).cloned().collect();
    on.sort_by_key(|i| std::cmp::Reverse(altitude_key(&i.altitude)));
    on
}

/// An instance a filter may issue I/O through: an attached one, or one whose InstanceSetup callback is running.
///
/// Filter Manager creates the instance before it calls InstanceSetup and hands it to the callback in
/// `FltObjects`; the callback may set the instance's context there (the context routines' docs), and I/O it
/// issues below the instance reaches the instances of lower altitude and the file system, as Microsoft's
/// `MetadataManager` minifilter sample relies on when it opens its metadata file from `InstanceSetup`
/// (<https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nc-fltkernel-pflt_instance_setup_callback>).
/// The instance's own callbacks see nothing until it is attached.
#[must_use]
pub fn usable(instance: PFLT_INSTANCE) -> Option<InstanceRecord> {
    records().iter().find(|i| i.handle == instance && (i.attached || i.setting_up)).cloned()
}

/// The filter and volume of a [`usable`] instance.
#[must_use]
pub fn filter_and_volume(instance: PFLT_INSTANCE) -> Option<(PFLT_FILTER, PFLT_VOLUME)> {
    usable(instance).map(|i| (i.filter, i.volume))
}

/// Whether an instance of altitude `a` sits below one of altitude `b`.
pub(crate) fn is_below(a: &str, b: &str) -> bool {
    altitude_key(a) < altitude_key(b)
}

/// Altitudes are decimal strings with an optional fraction; compare them as numbers.
fn altitude_key(altitude: &str) -> (u64, String) {
    let (whole, fraction) = altitude.split_once('.').unwrap_or((altitude, ""));
    (whole.parse().unwrap_or(0), fraction.to_owned())
}

/// Tells teardown whether the unload in progress is mandatory (the loader sets it around the unload callback).
pub(crate) fn set_mandatory_unload(mandatory: bool) {
    MANDATORY_UNLOAD.store(mandatory, Ordering::SeqCst);
}

fn related(filter: PFLT_FILTER, volume: PFLT_VOLUME, instance: PFLT_INSTANCE) -> FLT_RELATED_OBJECTS {
    FLT_RELATED_OBJECTS {
        Size: u16::try_from(size_of::<FLT_RELATED_OBJECTS>()).unwrap_or(u16::MAX),
        TransactionContext: 0,
        Filter: filter,
        Volume: volume,
        Instance: instance,
        FileObject: std::ptr::null(),
        Transaction: std::ptr::null(),
    }
}

/// Offers `volume` to `filter`'s automatic instance with `flags`, calling its InstanceSetup callback.
fn attach(filter: &FilterRecord, volume: &Volume, flags: u32) {
    let chosen = filter
        .default_instance
        .as_ref()
        .and_then(|name| filter.instances.iter().find(|i| &i.name == name))
        .or_else(|| filter.instances.first());
    let Some(definition) = chosen else { return };
    if definition.flags & 0x1 != 0 {
        return;
    }
    let handle = {
        let mut all = records();
        let base: usize = 0x0000_7ff3_3000_0000;
        let handle = base.wrapping_add((all.len() + 1).wrapping_mul(0x1000)).cast_signed();
        all.push(InstanceRecord {
            handle,
            filter: filter.handle,
            volume: volume.handle,
            name: definition.name.clone(),
            altitude: definition.altitude.clone(),
            setup_status: 0,
            attached: false,
            setting_up: true,
            teardown_reason: None,
        });
        handle
    };
    let status = match filter.callbacks.instance_setup {
        // Without an InstanceSetup callback, Filter Manager always attaches.
        None => 0,
        Some(setup) => {
            let objects = related(filter.handle, volume.handle, handle);
            super::context::instance_setting_up(handle, filter.handle, volume.handle);
            // SAFETY: the driver registered this callback and is loaded; `objects` lives for the call.
            unsafe { setup(&raw const objects, flags, volume.spec.device_type, volume.spec.file_system) }
        }
    };
    if let Some(record) = records().iter_mut().find(|i| i.handle == handle) {
        record.setup_status = status;
        record.attached = status >= 0;
        record.setting_up = false;
    }
    super::context::instance_setup_done(handle, status >= 0);
}

/// `FltStartFiltering`: attaches `filter` to every mounted volume.
pub(crate) fn attach_all_volumes(filter: &FilterRecord) {
    for volume in volumes() {
        attach(filter, &volume, FLTFL_INSTANCE_SETUP_AUTOMATIC_ATTACHMENT);
    }
}

/// A volume was mounted: every started filter is offered it.
pub(crate) fn attach_started_filters(volume: &Volume) {
    for filter in filters().into_iter().filter(|f| f.started && !f.unregistered) {
        attach(&filter, volume, FLTFL_INSTANCE_SETUP_NEWLY_MOUNTED_VOLUME);
    }
}

fn tear_down(filter: &FilterRecord, instance: &InstanceRecord, reason: u32) {
    let objects = related(filter.handle, instance.volume, instance.handle);
    for callback in
        [filter.callbacks.instance_teardown_start, filter.callbacks.instance_teardown_complete].into_iter().flatten()
    {
        // SAFETY: the driver registered this callback and is loaded; `objects` lives for the call.
        unsafe { callback(&raw const objects, reason) };
    }
    if let Some(record) = records().iter_mut().find(|r| r.handle == instance.handle) {
        record.attached = false;
        record.teardown_reason = Some(reason);
    }
    super::context::instance_torn_down(instance.handle);
}

/// `FltUnregisterFilter`: tears down every attached instance of `filter`.
pub(crate) fn tear_down_filter(filter: &FilterRecord) {
    let reason = if MANDATORY_UNLOAD.load(Ordering::SeqCst) {
        FLTFL_INSTANCE_TEARDOWN_MANDATORY_FILTER_UNLOAD
    } else {
        FLTFL_INSTANCE_TEARDOWN_FILTER_UNLOAD
    };
    let attached: Vec<InstanceRecord> =
        records().iter().filter(|i| i.filter == filter.handle && i.attached).cloned().collect();
    for instance in &attached {
        tear_down(filter, instance, reason);
    }
}

/// Detaches `filter`'s instance from `volume` as `fltmc detach` does: InstanceQueryTeardown may refuse.
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` when no such instance is attached; the status InstanceQueryTeardown refused with
/// (`STATUS_FLT_DO_NOT_DETACH` when the filter registered no such callback, which the docs say means the
/// instance cannot be detached manually).
pub fn detach(filter: PFLT_FILTER, volume: PFLT_VOLUME) -> Result<(), NTSTATUS> {
    let record = filters().into_iter().find(|f| f.handle == filter).ok_or(STATUS_INVALID_PARAMETER)?;
    let instance = records()
        .iter()
        .find(|i| i.filter == filter && i.volume == volume && i.attached)
        .cloned()
        .ok_or(STATUS_INVALID_PARAMETER)?;
    let Some(query) = record.callbacks.instance_query_teardown else {
        return Err(STATUS_FLT_DO_NOT_DETACH);
    };
    let objects = related(filter, volume, instance.handle);
    // SAFETY: the driver registered this callback and is loaded; `objects` lives for the call.
    let status = unsafe { query(&raw const objects, 0) };
    if status < 0 {
        return Err(status);
    }
    tear_down(&record, &instance, FLTFL_INSTANCE_TEARDOWN_MANUAL);
    Ok(())
}
