//! Test filters that sit above the filter under test and put its callbacks in the contexts it must survive: a
//! create pended and replayed from a system worker ([`poster`]), and reads issued at APC_LEVEL, inside a guarded
//! region or with a top-level IRP set ([`context_reader`]). Each loads through the ordinary loader, with its own
//! service and an altitude above Shunt's, so scenarios load it beside Shunt.
//!
//! They are correct filters: they break no rule themselves, which `tests/testfilters.rs` shows.

pub mod context_reader;
pub mod poster;

use std::ptr::null_mut;

use windows_sys::Wdk::Storage::FileSystem::Minifilters::{
    FLT_OPERATION_REGISTRATION, FLT_REGISTRATION, FLT_REGISTRATION_VERSION, IRP_MJ_OPERATION_END,
    PFLT_FILTER_UNLOAD_CALLBACK, PFLT_POST_OPERATION_CALLBACK, PFLT_PRE_OPERATION_CALLBACK,
};

/// An immutable static table of plain data and function pointers.
pub(crate) struct Table<T>(pub(crate) T);

// SAFETY: the tables are immutable statics holding only plain data and function pointers.
unsafe impl<T> Sync for Table<T> {}

/// `IRP_MJ_OPERATION_END` as the registration's byte.
pub(crate) const END: u8 = {
    assert!(IRP_MJ_OPERATION_END <= 0xFF);
    #[expect(clippy::cast_possible_truncation, reason = "checked by the assert above")]
    let end = IRP_MJ_OPERATION_END as u8;
    end
};

/// One operation registration.
pub(crate) const fn operation(
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

/// A registration with `operations` and `unload` and nothing else.
pub(crate) const fn registration(
    operations: *const FLT_OPERATION_REGISTRATION,
    unload: PFLT_FILTER_UNLOAD_CALLBACK,
) -> FLT_REGISTRATION {
    FLT_REGISTRATION {
        Size: {
            assert!(size_of::<FLT_REGISTRATION>() <= 0xFFFF);
            #[expect(clippy::cast_possible_truncation, reason = "checked by the assert above")]
            let size = size_of::<FLT_REGISTRATION>() as u16;
            size
        },
        Version: {
            #[expect(clippy::cast_possible_truncation, reason = "0x0203")]
            let version = FLT_REGISTRATION_VERSION as u16;
            version
        },
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
