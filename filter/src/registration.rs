//! The registration table handed to `FltRegisterFilter`: which operations Shunt filters and its instance and
//! unload callbacks.

use core::{mem::size_of, ptr::null_mut};

use windows_sys::Wdk::{
    Storage::FileSystem::Minifilters::{
        FLT_OPERATION_REGISTRATION, FLT_REGISTRATION, FLT_REGISTRATION_VERSION, IRP_MJ_OPERATION_END,
    },
    System::SystemServices::IRP_MJ_CREATE,
};

use crate::{callbacks, wdk::flt::Registration};

/// Converts a major function code to the `u8` of `FLT_OPERATION_REGISTRATION`, refusing at compile time any code
/// that does not fit.
const fn major(code: u32) -> u8 {
    assert!(code <= 0xFF, "major function codes fit in a byte");
    // CAST: checked just above.
    #[expect(clippy::cast_possible_truncation, reason = "checked by the assert above")]
    let code = code as u8;
    code
}

/// The operations Shunt registers for, ending in `IRP_MJ_OPERATION_END` as `FltRegisterFilter` requires.
pub struct Operations(pub [FLT_OPERATION_REGISTRATION; 2]);

// SAFETY: the table is immutable and holds only function pointers and null reserved fields.
unsafe impl Sync for Operations {}

/// Shunt's operation table.
pub static OPERATIONS: Operations = Operations([
    FLT_OPERATION_REGISTRATION {
        MajorFunction: major(IRP_MJ_CREATE),
        Flags: 0,
        PreOperation: Some(callbacks::pre_create),
        PostOperation: None,
        Reserved1: null_mut(),
    },
    FLT_OPERATION_REGISTRATION {
        MajorFunction: major(IRP_MJ_OPERATION_END as u32),
        Flags: 0,
        PreOperation: None,
        PostOperation: None,
        Reserved1: null_mut(),
    },
]);

const REGISTRATION_SIZE: u16 = {
    assert!(size_of::<FLT_REGISTRATION>() <= u16::MAX as usize);
    #[expect(clippy::cast_possible_truncation, reason = "checked by the assert above")]
    let size = size_of::<FLT_REGISTRATION>() as u16;
    size
};

const REGISTRATION_VERSION: u16 = {
    assert!(FLT_REGISTRATION_VERSION <= u16::MAX as u32);
    #[expect(clippy::cast_possible_truncation, reason = "checked by the assert above")]
    let version = FLT_REGISTRATION_VERSION as u16;
    version
};

/// Shunt's registration: version 0x0203, no contexts yet, the instance callbacks and the unload callback.
pub static REGISTRATION: Registration = Registration::new(FLT_REGISTRATION {
    Size: REGISTRATION_SIZE,
    Version: REGISTRATION_VERSION,
    Flags: 0,
    ContextRegistration: core::ptr::null(),
    OperationRegistration: (&raw const OPERATIONS.0).cast(),
    FilterUnloadCallback: Some(callbacks::filter_unload),
    InstanceSetupCallback: Some(callbacks::instance_setup),
    InstanceQueryTeardownCallback: Some(callbacks::instance_query_teardown),
    InstanceTeardownStartCallback: Some(callbacks::instance_teardown_start),
    InstanceTeardownCompleteCallback: Some(callbacks::instance_teardown_complete),
    GenerateFileNameCallback: None,
    NormalizeNameComponentCallback: None,
    NormalizeContextCleanupCallback: None,
    TransactionNotificationCallback: None,
    NormalizeNameComponentExCallback: None,
    SectionNotificationCallback: None,
});
