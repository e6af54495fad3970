//! `FltCancelFileOpen`: a post-create callback closes the open the file system just completed, so that it can fail
//! the create (see [`crate::io::iomgr`] for what happens to the create afterwards).

use windows_sys::Wdk::{
    Foundation::FILE_OBJECT, Storage::FileSystem::Minifilters::PFLT_INSTANCE, System::SystemServices::FO_HANDLE_CREATED,
};

use super::{dispatch::callback_frames, instance::instances};
use crate::{
    fltmgr::dispatch::IRP_MJ_CREATE,
    guard::guarded,
    io::iomgr,
    kernel::{irql, thread},
    verifier::{self, Rule},
};

const DOCS: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcancelfileopen";

/// `FltCancelFileOpen`: PASSIVE_LEVEL; only from the caller's own post-create callback; an instance of the calling
/// filter; a file object the file system has just opened in this create, with no handle yet (`FO_HANDLE_CREATED`
/// clear) and not already cancelled. The file system sees cleanup and close at once; the file object gets
/// `FO_FILE_OPEN_CANCELLED`. Misuse is reported and nothing is cancelled.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltcancelfileopen>.
///
/// # Safety
/// Called by driver code: `FileObject` is NULL or a file object.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltCancelFileOpen(instance: PFLT_INSTANCE, file_object: *const FILE_OBJECT) {
    const API: &str = "FltCancelFileOpen";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::PASSIVE, DOCS) {
            return;
        }
        let frame = callback_frames().last().copied();
        let Some(frame) = frame.filter(|f| f.post && f.major == IRP_MJ_CREATE) else {
            verifier::report(
                Rule::CreateFailureProtocol,
                API,
                "called outside a post-create callback (the docs call any other caller a programming error)",
            );
            return;
        };
        if !instances().iter().any(|i| i.handle == instance && i.filter == frame.filter) {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!("{instance:#x} is not an instance of the calling filter"),
            );
            return;
        }
        // SAFETY: NULL or the driver's file object; only its flags are read.
        let Some(object) = (unsafe { file_object.as_ref() }) else {
            verifier::report(Rule::InvalidArgument, API, "FileObject is NULL");
            return;
        };
        if object.Flags & FO_HANDLE_CREATED != 0 {
            verifier::report(Rule::CreateFailureProtocol, API, "FO_HANDLE_CREATED is set: a handle exists already");
            return;
        }
        if let Err(why) = iomgr::cancel_open(file_object) {
            verifier::report(Rule::CreateFailureProtocol, API, why);
        }
    });
}
