//! Loading and unloading a driver: the I/O manager's and Filter Manager's part of `fltmc load` / `fltmc unload`.
//!
//! [`load`] builds a driver object whose extension names the service, calls the driver's `DriverEntry` on a
//! system thread at PASSIVE_LEVEL, and checks that a failing `DriverEntry` leaves nothing behind.
//! [`LoadedDriver::unload`] calls the filter's unload callback as `fltmc unload` (non-mandatory) or `sc stop`
//! (mandatory) would, then checks the filter was unregistered and no pool is left.

use std::{
    collections::{BTreeSet, HashSet},
    fmt,
    sync::{Mutex, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::{DRIVER_EXTENSION, DRIVER_OBJECT},
        Storage::FileSystem::Minifilters::FLTFL_FILTER_UNLOAD_MANDATORY,
    },
    Win32::Foundation::{NTSTATUS, UNICODE_STRING},
};

use crate::{
    fltmgr::{FilterRecord, filters},
    kernel::{pool, thread},
    registry,
    verifier::{self, Rule},
};

/// A driver's entry point, as windows-sys spells `DRIVER_INITIALIZE`.
pub type DriverEntryFn = unsafe extern "system" fn(*const DRIVER_OBJECT, *const UNICODE_STRING) -> NTSTATUS;

/// Why a driver could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// This entry point was already loaded in this process. A driver's statics cannot be re-initialised, so each
    /// load needs a fresh process: run the scenario through [`crate::isolate`].
    AlreadyLoadedInProcess,
    /// `DriverEntry` returned a failure status.
    EntryFailed(NTSTATUS),
    /// The host could not start the system thread.
    Thread(std::io::Error),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AlreadyLoadedInProcess => f.write_str(
                "this driver was already loaded in this process; its statics cannot be re-initialised, so run each \
                 load in its own process (fltsim::isolate)",
            ),
            Self::EntryFailed(status) => write!(f, "DriverEntry failed with {:#010x}", status.cast_unsigned()),
            Self::Thread(e) => write!(f, "could not start a system thread: {e}"),
        }
    }
}

impl std::error::Error for LoadError {}

/// Why an unload did not happen.
#[derive(Debug, PartialEq, Eq)]
pub enum UnloadError {
    /// The filter registered no unload callback, so Filter Manager cannot unload it.
    NotUnloadable,
    /// The unload callback refused a non-mandatory unload with this status; the driver stays loaded.
    Refused(NTSTATUS),
}

/// The kernel objects the loader owns for one driver; boxed so their addresses stay put.
struct Objects {
    object: DRIVER_OBJECT,
    extension: DRIVER_EXTENSION,
    service_name: Vec<u16>,
    registry_path_buffer: Vec<u16>,
    registry_path: UNICODE_STRING,
}

// SAFETY: the objects are plain data that the driver reads from the system thread while the loader waits.
unsafe impl Send for Objects {}

/// A loaded driver.
pub struct LoadedDriver {
    service: String,
    objects: Box<Objects>,
    pool_before: BTreeSet<usize>,
    locks_before: BTreeSet<usize>,
    /// The client security contexts and token references held before the driver loaded.
    security_before: BTreeSet<u64>,
    loaded: bool,
}

static LOADED_ENTRIES: Mutex<Option<HashSet<usize>>> = Mutex::new(None);

fn unicode(buffer: &mut [u16]) -> UNICODE_STRING {
    let bytes = u16::try_from(buffer.len().saturating_mul(2)).unwrap_or(0xFFFE);
    UNICODE_STRING { Length: bytes, MaximumLength: bytes, Buffer: buffer.as_mut_ptr() }
}

/// Loads the driver whose service is `service` (already installed in the registry, e.g. by
/// [`registry::install_inf`]) by calling `entry` on a system thread at PASSIVE_LEVEL.
///
/// # Errors
/// [`LoadError`]: the entry point was already loaded in this process, or `DriverEntry` failed (in which case
/// anything it left registered or allocated has been reported).
pub fn load(service: &str, entry: DriverEntryFn) -> Result<LoadedDriver, LoadError> {
    {
        let mut loaded = LOADED_ENTRIES.lock().unwrap_or_else(PoisonError::into_inner);
        if !loaded.get_or_insert_with(HashSet::new).insert(entry as usize) {
            return Err(LoadError::AlreadyLoadedInProcess);
        }
    }
    let mut service_name: Vec<u16> = service.encode_utf16().collect();
    let mut registry_path_buffer: Vec<u16> = registry::service_key(service).encode_utf16().collect();
    let mut objects = Box::new(Objects {
        // SAFETY: DRIVER_OBJECT and DRIVER_EXTENSION are plain C structs for which all-zero is a valid value.
        object: unsafe { std::mem::zeroed() },
        // SAFETY: as above.
        extension: unsafe { std::mem::zeroed() },
        registry_path: unicode(&mut registry_path_buffer),
        service_name: Vec::new(),
        registry_path_buffer: Vec::new(),
    });
    objects.extension.ServiceKeyName = unicode(&mut service_name);
    objects.service_name = service_name;
    objects.registry_path_buffer = registry_path_buffer;
    objects.object.Type = 4; // IO_TYPE_DRIVER
    objects.object.Size = i16::try_from(size_of::<DRIVER_OBJECT>()).unwrap_or(i16::MAX);
    objects.extension.DriverObject = &raw mut objects.object;
    objects.object.DriverExtension = &raw mut objects.extension;
    objects.object.DriverInit = Some(entry);

    let pool_before = pool::live().into_iter().map(|a| a.address).collect();
    let locks_before = crate::fltmgr::filelock::live();
    let security_before = crate::kernel::security::held();
    let object_ptr = &raw const objects.object as usize;
    let path_ptr = &raw const objects.registry_path as usize;
    let status = thread::run_on_system_thread("System: DriverEntry", move || {
        let before = thread::snapshot();
        // SAFETY: the pointers refer to `objects`, which outlives this call; `entry` is the driver's entry point.
        let status = unsafe { entry(object_ptr as *const DRIVER_OBJECT, path_ptr as *const UNICODE_STRING) };
        thread::check_balanced("DriverEntry", &before);
        status
    })
    .map_err(LoadError::Thread)?;
    let mut driver =
        LoadedDriver { service: service.to_owned(), objects, pool_before, locks_before, security_before, loaded: true };
    if status < 0 {
        driver.loaded = false;
        driver.check_nothing_left("DriverEntry");
        return Err(LoadError::EntryFailed(status));
    }
    Ok(driver)
}

impl LoadedDriver {
    /// The service name.
    #[must_use]
    pub fn service(&self) -> &str {
        &self.service
    }

    fn driver_object(&self) -> usize {
        &raw const self.objects.object as usize
    }

    /// The filters this driver registered, unregistered ones included.
    #[must_use]
    pub fn filters(&self) -> Vec<FilterRecord> {
        let me = self.driver_object();
        filters().into_iter().filter(|f| f.driver_object == me).collect()
    }

    /// Unloads the driver as `fltmc unload` (`mandatory == false`) or `sc stop` (`mandatory == true`) would.
    ///
    /// # Errors
    /// [`UnloadError`]: the filter cannot be unloaded, or refused a non-mandatory unload (the driver stays loaded).
    pub fn unload(&mut self, mandatory: bool) -> Result<(), UnloadError> {
        let live: Vec<FilterRecord> = self.filters().into_iter().filter(|f| !f.unregistered).collect();
        for filter in &live {
            let Some(callback) = filter.callbacks.unload else {
                return Err(UnloadError::NotUnloadable);
            };
            let flags = if mandatory { FLTFL_FILTER_UNLOAD_MANDATORY } else { 0 };
            crate::fltmgr::instance::set_mandatory_unload(mandatory);
            let status = thread::run_on_system_thread("System: FilterUnload", move || {
                let before = thread::snapshot();
                // SAFETY: the driver registered this callback and is still loaded.
                let status = unsafe { callback(flags) };
                thread::check_balanced("FilterUnloadCallback", &before);
                status
            })
            .unwrap_or(-1);
            if status < 0 && !mandatory {
                return Err(UnloadError::Refused(status));
            }
        }
        self.loaded = false;
        self.check_nothing_left("the unload callback");
        Ok(())
    }

    /// Reports a filter still registered and pool still allocated after the driver let go of everything.
    fn check_nothing_left(&self, after: &str) {
        // FltUnregisterFilter runs the filter down: work the driver queued finishes before its leftovers are
        // judged.
        crate::kernel::work::drain();
        for filter in self.filters().into_iter().filter(|f| !f.unregistered) {
            verifier::report(
                Rule::FilterNotUnregistered,
                "FltUnregisterFilter",
                format!("filter {:#x} of service {} is still registered after {after}", filter.handle, filter.service),
            );
        }
        for filter in self.filters() {
            crate::fltmgr::fileio::report_leaks(filter.handle, after);
            crate::fltmgr::pending::report_leaks(filter.handle, after);
            crate::fltmgr::context::report_leaks(filter.handle, after);
            crate::fltmgr::names::report_leaks(filter.handle, after);
            crate::fltmgr::port::report_leaks(filter.handle, after);
            crate::fltmgr::callback_data::report_leaks(filter.handle, after);
        }
        crate::fltmgr::filelock::report_leaks(&self.locks_before, after);
        crate::kernel::security::report_leaks(&self.security_before, after);
        for leak in pool::live().into_iter().filter(|a| !self.pool_before.contains(&a.address)) {
            verifier::report(
                Rule::PoolLeak,
                "ExAllocatePool2",
                format!(
                    "{} bytes with tag '{}' at {:#x} still allocated after {after}",
                    leak.size,
                    leak.tag_name(),
                    leak.address
                ),
            );
        }
    }
}

impl Drop for LoadedDriver {
    fn drop(&mut self) {
        // The driver's code may still reference the driver object; a loaded driver is never freed, as in a real
        // kernel where an image that did not unload stays mapped.
        if self.loaded {
            let objects = std::mem::replace(
                &mut self.objects,
                Box::new(Objects {
                    // SAFETY: all-zero is a valid DRIVER_OBJECT / DRIVER_EXTENSION / UNICODE_STRING.
                    object: unsafe { std::mem::zeroed() },
                    // SAFETY: as above.
                    extension: unsafe { std::mem::zeroed() },
                    service_name: Vec::new(),
                    registry_path_buffer: Vec::new(),
                    // SAFETY: as above.
                    registry_path: unsafe { std::mem::zeroed() },
                }),
            );
            Box::leak(objects);
        }
    }
}
