//! Filter registration: the driver object handed to `DriverEntry` and the filter handle that
//! `FltRegisterFilter` returns, whose `Drop` unregisters the filter.

use core::{marker::PhantomData, ptr::NonNull};

use windows_sys::Wdk::{
    Foundation::DRIVER_OBJECT,
    Storage::FileSystem::Minifilters::{
        FLT_REGISTRATION, FltRegisterFilter, FltStartFiltering, FltUnregisterFilter, PFLT_FILTER,
    },
};

use super::status::{NtResult, NtStatus};

/// The driver object the I/O manager passes to `DriverEntry`, borrowed for the duration of the call.
#[derive(Clone, Copy)]
pub struct DriverObject<'a> {
    raw: NonNull<DRIVER_OBJECT>,
    _lifetime: PhantomData<&'a DRIVER_OBJECT>,
}

impl DriverObject<'_> {
    /// Wraps the driver object pointer `DriverEntry` received.
    ///
    /// # Safety
    /// `raw` must be the driver object the I/O manager passed to `DriverEntry`, valid for the returned lifetime.
    #[must_use]
    pub unsafe fn from_raw(raw: *const DRIVER_OBJECT) -> Option<Self> {
        NonNull::new(raw.cast_mut()).map(|raw| Self { raw, _lifetime: PhantomData })
    }
}

/// A registration table that lives for the whole life of the driver, as `FltRegisterFilter` requires
/// ("the minifilter driver must keep this structure in memory until it is unloaded").
pub struct Registration(FLT_REGISTRATION);

// SAFETY: the table and the arrays it points to are immutable statics; sharing them between threads is sound.
unsafe impl Sync for Registration {}

impl Registration {
    /// Wraps a registration table whose pointers all refer to statics.
    #[must_use]
    pub const fn new(table: FLT_REGISTRATION) -> Self {
        Self(table)
    }

    /// The raw table.
    #[must_use]
    pub const fn table(&self) -> &FLT_REGISTRATION {
        &self.0
    }
}

/// A registered minifilter. Dropping it calls `FltUnregisterFilter`, which waits for the filter's rundown.
pub struct Filter {
    handle: NonNull<core::ffi::c_void>,
}

// SAFETY: a filter handle is an opaque reference to a Filter Manager object that may be used from any thread.
unsafe impl Send for Filter {}
// SAFETY: as above; no method takes `&mut self` state from the handle itself.
unsafe impl Sync for Filter {}

impl Filter {
    /// Registers the filter with Filter Manager.
    ///
    /// IRQL: ≤ APC_LEVEL, called from `DriverEntry`. Fails with `STATUS_OBJECT_NAME_NOT_FOUND` when the service's
    /// `Instances` key is missing from the registry.
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltregisterfilter>.
    ///
    /// # Errors
    /// The status `FltRegisterFilter` returned.
    pub fn register(driver: DriverObject<'_>, registration: &'static Registration) -> NtResult<Self> {
        let mut handle: PFLT_FILTER = 0;
        // SAFETY: `driver` is the live driver object of this driver, `registration` is a static table that outlives
        // the filter, and `handle` is a valid place for the result.
        let status = unsafe { FltRegisterFilter(driver.raw.as_ptr(), registration.table(), &raw mut handle) };
        NtStatus::check(status)?;
        // CAST: PFLT_FILTER is an opaque pointer that windows-sys spells as an integer.
        NonNull::new(handle as *mut core::ffi::c_void).map(|handle| Self { handle }).ok_or(NtStatus::INVALID_PARAMETER)
    }

    /// Starts filtering: from here on Filter Manager calls the registered callbacks.
    ///
    /// IRQL: PASSIVE_LEVEL. The filter must be ready for every callback before this returns.
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltstartfiltering>.
    ///
    /// # Errors
    /// The status `FltStartFiltering` returned; the caller then drops (unregisters) the filter.
    pub fn start_filtering(&self) -> NtResult {
        // SAFETY: `self.handle` is a registered filter.
        NtStatus::check(unsafe { FltStartFiltering(self.raw()) })
    }

    fn raw(&self) -> PFLT_FILTER {
        // CAST: back to windows-sys's integer spelling of the opaque pointer.
        self.handle.as_ptr() as PFLT_FILTER
    }
}

impl Drop for Filter {
    /// Unregisters the filter: IRQL PASSIVE_LEVEL, from the unload callback or a failing `DriverEntry`.
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltunregisterfilter>.
    fn drop(&mut self) {
        // SAFETY: `self.handle` is a registered filter and this is its only unregistration.
        unsafe { FltUnregisterFilter(self.raw()) };
    }
}
