//! The registration boilerplate every small test minifilter needs, in one place: a [`Table`] to keep its tables in
//! statics, [`operation`] and [`registration`] to fill them in, and [`register`], [`register_and_start`] and
//! [`unregister`] for the usual `DriverEntry` and unload bodies.
//!
//! [`registration`] fills in operations and an unload callback and leaves everything else empty. It is a `const fn`,
//! so a filter that needs more (a context registration, an instance-setup callback, a wrong `Size`) extends it with
//! struct-update syntax in its static:
//!
//! ```
//! use std::sync::atomic::AtomicIsize;
//!
//! use fltsim::testfilters::build::{END, Table, operation, register_and_start, registration, unregister};
//! use windows_sys::{
//!     Wdk::{
//!         Foundation::DRIVER_OBJECT,
//!         Storage::FileSystem::Minifilters::{FLT_OPERATION_REGISTRATION, FLT_REGISTRATION, FLT_RELATED_OBJECTS},
//!     },
//!     Win32::{
//!         Foundation::{NTSTATUS, STATUS_SUCCESS, UNICODE_STRING},
//!         Storage::InstallableFileSystems::FLT_FILESYSTEM_TYPE,
//!     },
//! };
//!
//! static FILTER: AtomicIsize = AtomicIsize::new(0);
//!
//! unsafe extern "system" fn setup(
//!     _objects: *const FLT_RELATED_OBJECTS,
//!     _flags: u32,
//!     _device_type: u32,
//!     _file_system: FLT_FILESYSTEM_TYPE,
//! ) -> NTSTATUS {
//!     STATUS_SUCCESS
//! }
//!
//! static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 1]> = Table([operation(END, None, None)]);
//! static REGISTRATION: Table<FLT_REGISTRATION> = Table(FLT_REGISTRATION {
//!     InstanceSetupCallback: Some(setup),
//!     ..registration((&raw const OPERATIONS.0).cast(), Some(unload))
//! });
//!
//! unsafe extern "system" fn driver_entry(driver: *const DRIVER_OBJECT, _path: *const UNICODE_STRING) -> NTSTATUS {
//!     // SAFETY: the loader's driver object.
//!     unsafe { register_and_start(driver, &REGISTRATION, &FILTER) }
//! }
//!
//! unsafe extern "system" fn unload(_flags: u32) -> NTSTATUS {
//!     unregister(&FILTER);
//!     STATUS_SUCCESS
//! }
//! # let _: fltsim::DriverEntryFn = driver_entry;
//! ```

use std::{
    ptr::null_mut,
    sync::atomic::{AtomicIsize, Ordering},
};

use windows_sys::{
    Wdk::{
        Foundation::{DRIVER_OBJECT, FILE_OBJECT, OBJECT_ATTRIBUTES},
        Storage::FileSystem::{
            FILE_OPEN,
            Minifilters::{
                FLT_OPERATION_REGISTRATION, FLT_REGISTRATION, FLT_REGISTRATION_VERSION, IRP_MJ_OPERATION_END,
                PFLT_FILTER, PFLT_FILTER_UNLOAD_CALLBACK, PFLT_INSTANCE, PFLT_POST_OPERATION_CALLBACK,
                PFLT_PRE_OPERATION_CALLBACK,
            },
        },
    },
    Win32::{
        Foundation::{HANDLE, NTSTATUS, UNICODE_STRING},
        Storage::FileSystem::{FILE_READ_DATA, FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_WRITE_DATA},
        System::IO::IO_STATUS_BLOCK,
    },
};

use crate::fltmgr::{
    fileio::FltCreateFileEx2,
    registration::{FltRegisterFilter, FltStartFiltering, FltUnregisterFilter},
};

/// An immutable static table of plain data and function pointers: the operation, context and filter registrations
/// hold raw pointers, so they are not `Sync` and cannot be put in a `static` on their own.
pub struct Table<T>(pub T);

// SAFETY: the tables are immutable statics holding only plain data and function pointers.
unsafe impl<T> Sync for Table<T> {}

/// `IRP_MJ_OPERATION_END` as the registration's byte: the major function that ends an operation table.
pub const END: u8 = {
    assert!(IRP_MJ_OPERATION_END <= 0xFF);
    #[expect(clippy::cast_possible_truncation, reason = "checked by the assert above")]
    let end = IRP_MJ_OPERATION_END as u8;
    end
};

/// `sizeof(FLT_REGISTRATION)`, the `Size` that [`registration`] fills in.
pub const REGISTRATION_SIZE: u16 = {
    assert!(size_of::<FLT_REGISTRATION>() <= 0xFFFF);
    #[expect(clippy::cast_possible_truncation, reason = "checked by the assert above")]
    let size = size_of::<FLT_REGISTRATION>() as u16;
    size
};

/// `FLT_REGISTRATION_VERSION` as the registration's `Version`.
const VERSION: u16 = {
    assert!(FLT_REGISTRATION_VERSION <= 0xFFFF);
    #[expect(clippy::cast_possible_truncation, reason = "checked by the assert above")]
    let version = FLT_REGISTRATION_VERSION as u16;
    version
};

/// One operation registration: `major` with `pre` and `post`, and no flags.
#[must_use]
pub const fn operation(
    major: u8,
    pre: PFLT_PRE_OPERATION_CALLBACK,
    post: PFLT_POST_OPERATION_CALLBACK,
) -> FLT_OPERATION_REGISTRATION {
    FLT_OPERATION_REGISTRATION {
        MajorFunction: major,
        Flags: 0,
        PreOperation: pre,
        PostOperation: post,
        Reserved1: null_mut(),
    }
}

/// A registration of the current size and version with `operations` and `unload` and nothing else: no flags, no
/// context registration, no instance or name callbacks. Extend it with struct-update syntax (see the [module
/// docs](self)) for anything more.
#[must_use]
pub const fn registration(
    operations: *const FLT_OPERATION_REGISTRATION,
    unload: PFLT_FILTER_UNLOAD_CALLBACK,
) -> FLT_REGISTRATION {
    FLT_REGISTRATION {
        Size: REGISTRATION_SIZE,
        Version: VERSION,
        Flags: 0,
        ContextRegistration: std::ptr::null(),
        OperationRegistration: operations,
        FilterUnloadCallback: unload,
        InstanceSetupCallback: None,
        InstanceQueryTeardownCallback: None,
        InstanceTeardownStartCallback: None,
        InstanceTeardownCompleteCallback: None,
        GenerateFileNameCallback: None,
        NormalizeNameComponentCallback: None,
        NormalizeContextCleanupCallback: None,
        TransactionNotificationCallback: None,
        NormalizeNameComponentExCallback: None,
        SectionNotificationCallback: None,
    }
}

/// Registers `registration` for `driver` with `FltRegisterFilter` and stores the filter handle in `filter`, for a
/// `DriverEntry` that has more to do before it starts filtering.
///
/// # Errors
/// `FltRegisterFilter`'s failure status; `filter` is left as it was.
///
/// # Safety
/// `driver` is the driver object the loader passed to `DriverEntry`.
pub unsafe fn register(
    driver: *const DRIVER_OBJECT,
    registration: &'static Table<FLT_REGISTRATION>,
    filter: &AtomicIsize,
) -> Result<PFLT_FILTER, NTSTATUS> {
    let mut handle: PFLT_FILTER = 0;
    // SAFETY: the caller's driver object, a static table and a place for the handle.
    let status = unsafe { FltRegisterFilter(driver, &raw const registration.0, &raw mut handle) };
    if status < 0 {
        return Err(status);
    }
    filter.store(handle, Ordering::SeqCst);
    Ok(handle)
}

/// The usual `DriverEntry` body: [`register`], then `FltStartFiltering`. Returns the first failure status, or
/// `FltStartFiltering`'s status.
///
/// # Safety
/// `driver` is the driver object the loader passed to `DriverEntry`.
pub unsafe fn register_and_start(
    driver: *const DRIVER_OBJECT,
    registration: &'static Table<FLT_REGISTRATION>,
    filter: &AtomicIsize,
) -> NTSTATUS {
    // SAFETY: the caller's driver object.
    match unsafe { register(driver, registration, filter) } {
        Ok(handle) => FltStartFiltering(handle),
        Err(status) => status,
    }
}

/// The usual unload body: `FltUnregisterFilter` of the filter stored in `filter`.
pub fn unregister(filter: &AtomicIsize) {
    FltUnregisterFilter(filter.load(Ordering::SeqCst));
}

/// Opens the existing file `path` (an object name such as `\\??\\C:\\backing.txt`) for reading and writing, sharing
/// both, with `FltCreateFileEx2` from `filter` below `instance` (0: from the top of the stack), with `attributes`
/// (`OBJ_KERNEL_HANDLE` or 0) and `flags` (`IO_FORCE_ACCESS_CHECK` or 0). Returns the handle and the referenced
/// file object, which the caller closes (`FltClose`) and dereferences (`ObDereferenceObject`).
///
/// # Errors
/// The status of `FltCreateFileEx2`.
pub fn open_file(
    filter: PFLT_FILTER,
    instance: PFLT_INSTANCE,
    path: &str,
    attributes: u32,
    flags: u32,
) -> Result<(HANDLE, *mut FILE_OBJECT), NTSTATUS> {
    let mut path: Vec<u16> = path.encode_utf16().collect();
    let bytes = u16::try_from(path.len().saturating_mul(2)).unwrap_or(u16::MAX);
    let object_name = UNICODE_STRING { Length: bytes, MaximumLength: bytes, Buffer: path.as_mut_ptr() };
    let attributes = OBJECT_ATTRIBUTES {
        Length: u32::try_from(size_of::<OBJECT_ATTRIBUTES>()).unwrap_or(u32::MAX),
        RootDirectory: null_mut(),
        ObjectName: &raw const object_name,
        Attributes: attributes,
        SecurityDescriptor: std::ptr::null(),
        SecurityQualityOfService: std::ptr::null(),
    };
    let mut handle: HANDLE = null_mut();
    let mut file_object: *mut FILE_OBJECT = null_mut();
    // SAFETY: all-zero is a valid IO_STATUS_BLOCK.
    let mut io_status: IO_STATUS_BLOCK = unsafe { std::mem::zeroed() };
    // SAFETY: every pointer refers to a live local; the filter and instance are the caller's.
    let status = unsafe {
        FltCreateFileEx2(
            filter,
            instance,
            &raw mut handle,
            &raw mut file_object,
            FILE_READ_DATA | FILE_WRITE_DATA,
            &raw const attributes,
            &raw mut io_status,
            std::ptr::null(),
            0,
            FILE_SHARE_READ | FILE_SHARE_WRITE,
            FILE_OPEN,
            0,
            std::ptr::null(),
            0,
            flags,
            std::ptr::null(),
        )
    };
    if status < 0 { Err(status) } else { Ok((handle, file_object)) }
}

/// Defines a test minifilter's entry points over its static registration: a static `AtomicIsize` for the filter
/// handle, a `DriverEntry` that registers and starts the filter ([`register_and_start`]), and an unload callback
/// that unregisters it ([`unregister`]) and returns `STATUS_SUCCESS`. The registration names the unload callback.
///
/// `minifilter_entry_points!(REGISTRATION)` names them `FILTER`, `driver_entry` and `unload`;
/// `minifilter_entry_points!(REGISTRATION, FILTER, driver_entry, unload)` names them explicitly, for a test that
/// loads several filters.
#[macro_export]
macro_rules! minifilter_entry_points {
    ($registration:ident) => {
        $crate::minifilter_entry_points!($registration, FILTER, driver_entry, unload);
    };
    ($registration:ident, $filter:ident, $entry:ident, $unload:ident) => {
        static $filter: ::std::sync::atomic::AtomicIsize = ::std::sync::atomic::AtomicIsize::new(0);

        unsafe extern "system" fn $entry(
            driver: *const ::windows_sys::Wdk::Foundation::DRIVER_OBJECT,
            _path: *const ::windows_sys::Win32::Foundation::UNICODE_STRING,
        ) -> ::windows_sys::Win32::Foundation::NTSTATUS {
            // SAFETY: the loader's driver object and a static registration.
            unsafe { $crate::testfilters::build::register_and_start(driver, &$registration, &$filter) }
        }

        unsafe extern "system" fn $unload(_flags: u32) -> ::windows_sys::Win32::Foundation::NTSTATUS {
            $crate::testfilters::build::unregister(&$filter);
            ::windows_sys::Win32::Foundation::STATUS_SUCCESS
        }
    };
}

/// The `FileName` of the operation's target file object (for a create, the name being opened), as a string.
///
/// # Safety
/// `data` is the callback data Filter Manager passed to the calling callback, whose target file object is valid.
#[must_use]
pub unsafe fn target_name(data: &windows_sys::Wdk::Storage::FileSystem::Minifilters::FLT_CALLBACK_DATA) -> String {
    // SAFETY: the caller passes callback data whose Iopb is valid.
    let iopb = unsafe { &*data.Iopb };
    // SAFETY: its target file object is valid during the callback.
    let name = unsafe { &(*iopb.TargetFileObject).FileName };
    if name.Buffer.is_null() {
        return String::new();
    }
    // SAFETY: the name buffer holds Length bytes.
    String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(name.Buffer, usize::from(name.Length / 2)) })
}
