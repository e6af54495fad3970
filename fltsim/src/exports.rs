//! The table of every routine the model exports: which module Windows exports it from, the rule the model
//! enforces, and the docs page both rest on. The import-coverage test checks this table against the symbols the
//! model really exports and against the imports of the built `shunt.sys`; fltsim's README lists the same rows.

/// One exported routine.
#[derive(Clone, Copy, Debug)]
pub struct Export {
    /// The symbol name.
    pub name: &'static str,
    /// The Windows module that exports it.
    pub module: &'static str,
    /// The highest IRQL at which it may be called, as the docs write it.
    pub max_irql: &'static str,
    /// What the model checks.
    pub rules: &'static str,
    /// The Microsoft docs page.
    pub docs: &'static str,
}

#[cfg(test)]
const DDI: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/";

macro_rules! export {
    ($name:literal, $module:literal, $irql:literal, $rules:literal, $page:literal) => {
        Export {
            name: $name,
            module: $module,
            max_irql: $irql,
            rules: $rules,
            docs: concat!("https://learn.microsoft.com/windows-hardware/drivers/ddi/", $page),
        }
        // Keep the prefix in one place: DDI below must match the literal above.
    };
}

/// Every exported routine.
pub const EXPORTS: &[Export] = &[
    export!(
        "KeGetCurrentIrql",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "answers the simulated thread's IRQL (Windows reads it inline)",
        "wdm/nf-wdm-kegetcurrentirql"
    ),
    export!(
        "ExAllocatePool2",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL (APC_LEVEL for paged)",
        "IRQL; non-zero size; non-zero printable tag; one pool type; zeroing; failure injection",
        "wdm/nf-wdm-exallocatepool2"
    ),
    export!(
        "ExFreePoolWithTag",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL (APC_LEVEL for paged)",
        "IRQL; double free; never allocated; tag mismatch",
        "wdm/nf-wdm-exfreepoolwithtag"
    ),
    export!(
        "KeBugCheckEx",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "records the stop code and ends the process",
        "wdm/nf-wdm-kebugcheckex"
    ),
    export!(
        "FltRegisterFilter",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; Size, Version, flags; operation table ends in IRP_MJ_OPERATION_END with valid codes; Instances key where the build reads it",
        "fltkernel/nf-fltkernel-fltregisterfilter"
    ),
    export!(
        "FltStartFiltering",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; a registered filter",
        "fltkernel/nf-fltkernel-fltstartfiltering"
    ),
    export!(
        "FltUnregisterFilter",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; a registered filter, unregistered once; tears the instances down, then blocks until the filter's generic and deferred-I/O work items, queued or running, have returned (new ones get STATUS_FLT_DELETING_OBJECT); called from one of those items it would wait for itself (reported, not waited for)",
        "fltkernel/nf-fltkernel-fltunregisterfilter"
    ),
    export!(
        "KeEnterCriticalRegion",
        "ntoskrnl.exe",
        "APC_LEVEL",
        "IRQL; enters a nestable critical region (normal kernel APCs off)",
        "ntddk/nf-ntddk-keentercriticalregion"
    ),
    export!(
        "KeLeaveCriticalRegion",
        "ntoskrnl.exe",
        "APC_LEVEL",
        "IRQL; leaving without a matching enter is reported",
        "ntddk/nf-ntddk-keleavecriticalregion"
    ),
    export!(
        "KeEnterGuardedRegion",
        "ntoskrnl.exe",
        "APC_LEVEL",
        "IRQL; enters a nestable guarded region (all kernel APCs off)",
        "wdm/nf-wdm-keenterguardedregion"
    ),
    export!(
        "KeLeaveGuardedRegion",
        "ntoskrnl.exe",
        "APC_LEVEL",
        "IRQL; leaving without a matching enter is reported",
        "wdm/nf-wdm-keleaveguardedregion"
    ),
    export!(
        "KeAreApcsDisabled",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL",
        "IRQL; TRUE in a critical or guarded region",
        "ntddk/nf-ntddk-keareapcsdisabled"
    ),
    export!(
        "KeAreAllApcsDisabled",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL",
        "IRQL; TRUE in a guarded region or at APC_LEVEL or above",
        "wdm/nf-wdm-keareallapcsdisabled"
    ),
    export!(
        "IoGetTopLevelIrp",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL",
        "IRQL; the thread's top-level IRP",
        "ntifs/nf-ntifs-iogettoplevelirp"
    ),
    export!(
        "IoSetTopLevelIrp",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL",
        "IRQL; every call is reported: only file systems may call it, and the model hosts filters",
        "ntifs/nf-ntifs-iosettoplevelirp"
    ),
    export!(
        "PsGetCurrentProcessId",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "the id of the current thread's process (System, pid 4, unless a test runs as another)",
        "ntddk/nf-ntddk-psgetcurrentprocessid"
    ),
    export!(
        "IoGetCurrentProcess",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "the current process as an opaque PEPROCESS the model maps back",
        "wdm/nf-wdm-iogetcurrentprocess"
    ),
    export!(
        "PsGetProcessId",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "the process id; a value that is not a PEPROCESS is reported",
        "ntddk/nf-ntddk-psgetprocessid"
    ),
    export!(
        "PsGetCurrentThread",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "the calling thread as an opaque PETHREAD, stable for its life",
        "ntddk/nf-ntddk-psgetcurrentthread"
    ),
    export!(
        "SeCreateClientSecurityFromSubjectContext",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; a subject context the model captured (a create's), a valid quality of service, a place for the context; a client impersonating below SecurityImpersonation (or below delegation for a remote server) answers STATUS_BAD_IMPERSONATION_LEVEL; the context is held until SeDeleteClientSecurity",
        "ntifs/nf-ntifs-secreateclientsecurityfromsubjectcontext"
    ),
    export!(
        "SeImpersonateClientEx",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; a live client context; ServerThread NULL or the caller's (another thread is unsupported-by-model); replaces the thread's impersonation",
        "ntifs/nf-ntifs-seimpersonateclientex"
    ),
    export!(
        "SeDeleteClientSecurity",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; a live client context, deleted once; never deleted is security-reference-leak",
        "ntifs/nf-ntifs-sedeleteclientsecurity"
    ),
    export!(
        "PsImpersonateClient",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; the caller's PETHREAD; NULL ends the impersonation, else a token object the model handed out at a valid level",
        "ntifs/nf-ntifs-psimpersonateclient"
    ),
    export!(
        "PsRevertToSelf",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; ends all of the calling thread's impersonation",
        "ntifs/nf-ntifs-psreverttoself"
    ),
    export!(
        "PsReferenceImpersonationToken",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; the caller's PETHREAD; the impersonation token, referenced until PsDereferenceImpersonationToken, or NULL",
        "ntifs/nf-ntifs-psreferenceimpersonationtoken"
    ),
    export!(
        "PsDereferenceImpersonationToken",
        "ntoskrnl.exe",
        "APC_LEVEL",
        "IRQL below DISPATCH_LEVEL; NULL does nothing; else a reference PsReferenceImpersonationToken returned, released once",
        "ntifs/nf-ntifs-psdereferenceimpersonationtoken"
    ),
    export!(
        "KeInitializeEvent",
        "ntoskrnl.exe",
        "HIGH_LEVEL",
        "a valid event type and a non-NULL pointer",
        "wdm/nf-wdm-keinitializeevent"
    ),
    export!(
        "KeSetEvent",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL (APC_LEVEL when Wait)",
        "IRQL; an initialized event",
        "wdm/nf-wdm-kesetevent"
    ),
    export!("KeClearEvent", "ntoskrnl.exe", "DISPATCH_LEVEL", "IRQL; an initialized event", "wdm/nf-wdm-keclearevent"),
    export!(
        "KeWaitForSingleObject",
        "ntoskrnl.exe",
        "APC_LEVEL (DISPATCH_LEVEL with a zero timeout)",
        "IRQL by timeout; an initialized event; a wait that needs a special kernel APC the thread cannot receive is reported",
        "wdm/nf-wdm-kewaitforsingleobject"
    ),
    export!(
        "FltInitializePushLock",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a non-NULL pointer",
        "fltkernel/nf-fltkernel-fltinitializepushlock"
    ),
    export!(
        "FltAcquirePushLockExclusive",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an initialized lock; not held by this thread; enters a critical region",
        "fltkernel/nf-fltkernel-fltacquirepushlockexclusive"
    ),
    export!(
        "FltAcquirePushLockShared",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an initialized lock; not held by this thread; enters a critical region",
        "fltkernel/nf-fltkernel-fltacquirepushlockshared"
    ),
    export!(
        "FltReleasePushLock",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; held by this thread; leaves the critical region",
        "fltkernel/nf-fltkernel-fltreleasepushlock"
    ),
    export!(
        "FltDeletePushLock",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an initialized lock not held by anyone",
        "fltkernel/nf-fltkernel-fltdeletepushlock"
    ),
    export!(
        "FltCreateFileEx2",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; no top-level IRP; APCs enabled (stricter for Ex2); an attached instance of the filter on the named volume; OBJ_KERNEL_HANDLE (always, stricter); IO_FORCE_ACCESS_CHECK on a user's behalf; enters below the instance; handle and file-object leaks at unload",
        "fltkernel/nf-fltkernel-fltcreatefileex2"
    ),
    export!(
        "FltClose",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; an open kernel file handle, closed once (IRP_MJ_CLEANUP through the lower filters)",
        "fltkernel/nf-fltkernel-fltclose"
    ),
    export!(
        "FltReadFileEx",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; an attached initiating instance (the read enters below it); an open file object; Buffer xor Mdl (an MDL FltLockUserBuffer built, valid in any process; a raw user buffer only in its requestor's process); sector-multiple offset and length for non-cached I/O; END_OF_FILE past the end; with a CallbackRoutine returns STATUS_PENDING and completes on a system worker at a seeded IRQL <= DISPATCH_LEVEL (BytesRead ignored); async I/O outstanding at unload is reported",
        "fltkernel/nf-fltkernel-fltreadfileex"
    ),
    export!(
        "FltWriteFileEx",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "as FltReadFileEx (asynchronous with a CallbackRoutine, BytesWritten ignored), and no FILE_WRITE_TO_END_OF_FILE offset",
        "fltkernel/nf-fltkernel-fltwritefileex"
    ),
    export!(
        "ObfReferenceObject",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL",
        "IRQL; an object the model handed out",
        "wdm/nf-wdm-obfreferenceobject"
    ),
    export!(
        "ObfDereferenceObject",
        "ntoskrnl.exe",
        "DISPATCH_LEVEL",
        "IRQL; an object the model handed out; the last reference sends IRP_MJ_CLOSE",
        "wdm/nf-wdm-obdereferenceobject"
    ),
    export!(
        "FltCompletePendedPreOperation",
        "fltmgr.sys",
        "DISPATCH_LEVEL with COMPLETE, else APC_LEVEL",
        "IRQL by status; SUCCESS_WITH_CALLBACK, SUCCESS_NO_CALLBACK or COMPLETE only; a context only with SUCCESS_WITH_CALLBACK; a pended operation completed once; the rest of the operation runs in the caller's context before it returns; never-completed operations are reported",
        "fltkernel/nf-fltkernel-fltcompletependedpreoperation"
    ),
    export!(
        "FltCompletePendedPostOperation",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; an operation whose post-operation callback returned MORE_PROCESSING_REQUIRED, completed once and not from inside that callback; the callbacks above run in the caller's context before it returns; never-completed post-operations are reported",
        "fltkernel/nf-fltkernel-fltcompletependedpostoperation"
    ),
    export!(
        "FltDoCompletionProcessingWhenSafe",
        "fltmgr.sys",
        "Any",
        "only from a post-operation callback, not DRAINING, IRP-based, not READ/WRITE/FLUSH_BUFFERS; below DISPATCH_LEVEL calls SafePostCallback at once, at DISPATCH_LEVEL posts it to a system worker and answers MORE_PROCESSING_REQUIRED (paging I/O: FALSE)",
        "fltkernel/nf-fltkernel-fltdocompletionprocessingwhensafe"
    ),
    export!(
        "FltAllocateDeferredIoWorkItem",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; items not freed at unload are reported",
        "fltkernel/nf-fltkernel-fltallocatedeferredioworkitem"
    ),
    export!(
        "FltFreeDeferredIoWorkItem",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; an allocated item, freed once",
        "fltkernel/nf-fltkernel-fltfreedeferredioworkitem"
    ),
    export!(
        "FltQueueDeferredIoWorkItem",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; an allocated item; Critical or Delayed queue; STATUS_FLT_NOT_SAFE_TO_POST_OPERATION for non-IRP operations, paging I/O and a set top-level IRP; STATUS_FLT_DELETING_OBJECT for a torn-down instance or once FltUnregisterFilter has begun; runs at PASSIVE_LEVEL on a system worker",
        "fltkernel/nf-fltkernel-fltqueuedeferredioworkitem"
    ),
    export!(
        "FltAllocateGenericWorkItem",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; items not freed at unload are reported",
        "fltkernel/nf-fltkernel-fltallocategenericworkitem"
    ),
    export!(
        "FltFreeGenericWorkItem",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; an allocated item, freed once",
        "fltkernel/nf-fltkernel-fltfreegenericworkitem"
    ),
    export!(
        "FltQueueGenericWorkItem",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; an allocated item; Critical or Delayed queue; a live filter or instance; STATUS_FLT_DELETING_OBJECT once the filter's FltUnregisterFilter has begun; runs at PASSIVE_LEVEL on a system worker",
        "fltkernel/nf-fltkernel-fltqueuegenericworkitem"
    ),
    export!(
        "FltAllocateContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a registered type; size 1..=65535 and within a fixed registration (else STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND); not zeroed; one reference; contexts alive at unload are reported",
        "fltkernel/nf-fltkernel-fltallocatecontext"
    ),
    export!(
        "FltReferenceContext",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; a live context (use after free is reported)",
        "fltkernel/nf-fltkernel-fltreferencecontext"
    ),
    export!(
        "FltReleaseContext",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; a live context; dropping to zero while attached is reported; the last reference runs the cleanup callback at APC_LEVEL",
        "fltkernel/nf-fltkernel-fltreleasecontext"
    ),
    export!(
        "FltDeleteContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a live context; detaches it and drops the attachment's reference",
        "fltkernel/nf-fltkernel-fltdeletecontext"
    ),
    export!(
        "FltSetStreamHandleContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an opened file object (not in pre-create); an unattached context of this filter and type; KEEP_IF_EXISTS answers STATUS_FLT_CONTEXT_ALREADY_DEFINED; detached at close",
        "fltkernel/nf-fltkernel-fltsetstreamhandlecontext"
    ),
    export!(
        "FltGetStreamHandleContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a referenced context or STATUS_NOT_FOUND",
        "fltkernel/nf-fltkernel-fltgetstreamhandlecontext"
    ),
    export!(
        "FltSetStreamContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "as FltSetStreamHandleContext, per stream (shared by every file object of the stream); detached when the stream's last file object closes",
        "fltkernel/nf-fltkernel-fltsetstreamcontext"
    ),
    export!(
        "FltGetStreamContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a referenced context or STATUS_NOT_FOUND",
        "fltkernel/nf-fltkernel-fltgetstreamcontext"
    ),
    export!(
        "FltSetInstanceContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an attached instance (or one in its InstanceSetup); an unattached FLT_INSTANCE_CONTEXT of its filter; a defined operation; KEEP_IF_EXISTS answers STATUS_FLT_CONTEXT_ALREADY_DEFINED with the existing one referenced in OldContext, REPLACE_IF_EXISTS hands back the replaced one; released at instance teardown or a refused InstanceSetup",
        "fltkernel/nf-fltkernel-fltsetinstancecontext"
    ),
    export!(
        "FltGetInstanceContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an attached instance; a referenced context or STATUS_NOT_FOUND",
        "fltkernel/nf-fltkernel-fltgetinstancecontext"
    ),
    export!(
        "FltSetVolumeContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a mounted volume; an unattached FLT_VOLUME_CONTEXT (one per filter per volume, the context's filter); a defined operation; KEEP/REPLACE_IF_EXISTS as FltSetInstanceContext; released when the filter unregisters",
        "fltkernel/nf-fltkernel-fltsetvolumecontext"
    ),
    export!(
        "FltGetVolumeContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a registered filter; a mounted volume; the filter's context referenced, or STATUS_NOT_FOUND",
        "fltkernel/nf-fltkernel-fltgetvolumecontext"
    ),
    export!(
        "FltSetFileContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an attached instance; an opened file object (not in pre-create); an unattached FLT_FILE_CONTEXT of its filter; one per instance per file ID (shared by the file's links and streams); KEEP/REPLACE_IF_EXISTS as FltSetInstanceContext; STATUS_NOT_SUPPORTED off NTFS/ReFS; released when the file's last file object closes or the instance is torn down",
        "fltkernel/nf-fltkernel-fltsetfilecontext"
    ),
    export!(
        "FltGetFileContext",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an attached instance; an opened file object; the file's context referenced, or STATUS_NOT_FOUND; STATUS_NOT_SUPPORTED off NTFS/ReFS",
        "fltkernel/nf-fltkernel-fltgetfilecontext"
    ),
    export!(
        "FltSupportsFileContexts",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; TRUE for an opened file object on NTFS or ReFS, FALSE before the file system opened it or elsewhere",
        "fltkernel/nf-fltkernel-fltsupportsfilecontexts"
    ),
    export!(
        "FltGetRequestorProcess",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; callback data of an operation in flight; the process that issued it, even when a filter above posted it to a worker",
        "fltkernel/nf-fltkernel-fltgetrequestorprocess"
    ),
    export!(
        "FltGetRequestorProcessId",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "as FltGetRequestorProcess, the id",
        "fltkernel/nf-fltkernel-fltgetrequestorprocessid"
    ),
    export!(
        "FltGetVolumeGuidName",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL (stricter: the page names none); a local volume (STATUS_INVALID_DEVICE_REQUEST for network); STATUS_BUFFER_TOO_SMALL with the size needed; \\??\\Volume{GUID}",
        "fltkernel/nf-fltkernel-fltgetvolumeguidname"
    ),
    export!(
        "IoReplaceFileObjectName",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; a file object whose create is in progress; an even length; STATUS_REPARSE with IO_REPARSE then re-issues the create with the new name (32 reparses at most; a targeted create cannot follow it to another volume)",
        "ntifs/nf-ntifs-ioreplacefileobjectname"
    ),
    export!(
        "FltGetFileNameInformation",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; one format and one query method; no short name in pre-create; STATUS_FLT_INVALID_NAME_REQUEST for paging I/O, a set top-level IRP, all APCs disabled or a cleaned-up file object; STATUS_FLT_NAME_CACHE_MISS for cache-only queries; normalized names expand short names; blocks never released are reported",
        "fltkernel/nf-fltkernel-fltgetfilenameinformation"
    ),
    export!(
        "FltParseFileNameInformation",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; live name information; fills ParentDir, FinalComponent, Extension and Stream",
        "fltkernel/nf-fltkernel-fltparsefilenameinformation"
    ),
    export!(
        "FltReferenceFileNameInformation",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; live name information",
        "fltkernel/nf-fltkernel-fltreferencefilenameinformation"
    ),
    export!(
        "FltReleaseFileNameInformation",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; live name information, released no more often than referenced",
        "fltkernel/nf-fltkernel-fltreleasefilenameinformation"
    ),
    export!(
        "FltAllocateCallbackData",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an attached instance; an open file object; data never freed is reported at unload",
        "fltkernel/nf-fltkernel-fltallocatecallbackdata"
    ),
    export!(
        "FltPerformSynchronousIo",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; allocated data; enters below the allocating instance; reads, writes (FILE_WRITE_TO_END_OF_FILE appends atomically), query and set information; other majors are reported as not modelled",
        "fltkernel/nf-fltkernel-fltperformsynchronousio"
    ),
    export!(
        "FltPerformAsynchronousIo",
        "fltmgr.sys",
        "APC_LEVEL",
        "PASSIVE_LEVEL (APC_LEVEL with IRP_PAGING_IO); allocated data not in flight; a CallbackRoutine; IRP-based, not IRP_MJ_CREATE (STATUS_FLT_INVALID_ASYNCHRONOUS_REQUEST); enters below the allocating instance and returns STATUS_PENDING; the callback runs on a system worker at a seeded IRQL <= DISPATCH_LEVEL (on failure, before the call returns); freeing or performing the data before the callback is reported; outstanding at unload is async-io-outstanding-at-unload",
        "fltkernel/nf-fltkernel-fltperformasynchronousio"
    ),
    export!(
        "FltFreeCallbackData",
        "fltmgr.sys",
        "DISPATCH_LEVEL",
        "IRQL; allocated data, freed once",
        "fltkernel/nf-fltkernel-fltfreecallbackdata"
    ),
    export!(
        "FltGetDestinationFileNameInformation",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; an attached instance; an open file object; the normalized or opened format (short: STATUS_FLT_INVALID_NAME_REQUEST) and one query method; STATUS_FLT_INVALID_NAME_REQUEST with a top-level IRP set; a full destination on another volume answers STATUS_NOT_SAME_DEVICE; a RootDirectory handle is reported as not modelled; blocks are released like any name information",
        "fltkernel/nf-fltkernel-fltgetdestinationfilenameinformation"
    ),
    export!(
        "FltFlushBuffers",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; an attached instance (the flush enters below it); an open file object",
        "fltkernel/nf-fltkernel-fltflushbuffers"
    ),
    export!(
        "FltFlushBuffers2",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; as FltFlushBuffers; FlushType 0 or one FLT_FLUSH_TYPE_* value, sent as the IRP_MN_FLUSH_* minor function",
        "fltkernel/nf-fltkernel-fltflushbuffers2"
    ),
    export!(
        "FltCancelFileOpen",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; only from the caller's post-create callback; an instance of the calling filter; a file object the file system just opened, FO_HANDLE_CREATED clear, not already cancelled; the file system sees cleanup and close, the file object gets FO_FILE_OPEN_CANCELLED",
        "fltkernel/nf-fltkernel-fltcancelfileopen"
    ),
    export!(
        "FltGetVolumeProperties",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; LengthReturned required; length zero returns the size needed with STATUS_BUFFER_TOO_SMALL, a non-zero length below sizeof(FLT_VOLUME_PROPERTIES) is reported; the fixed part alone returns STATUS_BUFFER_OVERFLOW; the names follow the fixed part",
        "fltkernel/nf-fltkernel-fltgetvolumeproperties"
    ),
    export!(
        "FltAllocateFileLock",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; the lock is the loading driver's; its `CompleteLockCallbackDataRoutine` is called for every IRP-based lock operation completed against it (a failure removes the lock just granted, and the operation completes with that status); the `UnlockRoutine` is not called; a lock never freed is reported at unload",
        "fltkernel/nf-fltkernel-fltallocatefilelock"
    ),
    export!(
        "FltFreeFileLock",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a lock from FltAllocateFileLock, freed once; requests still waiting complete with STATUS_CANCELLED (the docs say only that uninitializing completes them)",
        "fltkernel/nf-fltkernel-fltfreefilelock"
    ),
    export!(
        "FltProcessFileLock",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a live lock; IRP_MJ_LOCK_CONTROL only; lock, unlock single, unlock all and unlock all by key completed against the lock; a conflicting lock with `FailImmediately` fails with STATUS_LOCK_NOT_GRANTED, without it is pended (`FLT_PREOP_PENDING`, which the filter returns) and granted when the conflicting locks go, oldest waiter first, then completed through Filter Manager as `FltCompletePendedPreOperation` with `FLT_PREOP_COMPLETE` would, in the releasing thread (the completion routine first); a wait nothing can end is `lock-wait-deadlock` (cancelled)",
        "fltkernel/nf-fltkernel-fltprocessfilelock"
    ),
    export!(
        "FltCheckLockForReadAccess",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a live lock; the read's range is free of other owners' exclusive locks",
        "fltkernel/nf-fltkernel-fltchecklockforreadaccess"
    ),
    export!(
        "FltCheckLockForWriteAccess",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; a live lock; the write's range is free of other owners' locks",
        "fltkernel/nf-fltkernel-fltchecklockforwriteaccess"
    ),
    export!(
        "FsRtlFastUnlockAll",
        "ntoskrnl.exe",
        "APC_LEVEL",
        "IRQL (the page's); a live lock; cancels the waiting requests of the file object and process (STATUS_CANCELLED, stricter than documented: a cleanup cancels its file object's queued requests), releases every lock of the file object and process, then grants and completes the waiting requests that can now be granted",
        "ntifs/nf-ntifs-fsrtlfastunlockall"
    ),
    export!(
        "FltQueryInformationFile",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; an attached instance (the query enters below it); an open file object; STATUS_INFO_LENGTH_MISMATCH and STATUS_INVALID_INFO_CLASS as NtQueryInformationFile",
        "fltkernel/nf-fltkernel-fltqueryinformationfile"
    ),
    export!(
        "FltSetInformationFile",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; an attached instance (the set enters below it); an open file object; basic, position, end of file, disposition, rename and link",
        "fltkernel/nf-fltkernel-fltsetinformationfile"
    ),
    export!(
        "FltCreateCommunicationPort",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; a registered filter; ServerPort and ObjectAttributes; Length; OBJ_KERNEL_HANDLE (else STATUS_INVALID_PARAMETER); a name; connect and disconnect callbacks; MaxConnections > 0; STATUS_OBJECT_NAME_COLLISION; captures what the descriptor grants; ports open at unload are reported",
        "fltkernel/nf-fltkernel-fltcreatecommunicationport"
    ),
    export!(
        "FltCloseCommunicationPort",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; an open server port, closed once; existing connections stay",
        "fltkernel/nf-fltkernel-fltclosecommunicationport"
    ),
    export!(
        "FltCloseClientPort",
        "fltmgr.sys",
        "PASSIVE_LEVEL",
        "IRQL; a non-NULL pointer to an open client port of the filter; sets it to NULL; client ports open at unload are reported",
        "fltkernel/nf-fltkernel-fltcloseclientport"
    ),
    export!(
        "FltBuildDefaultSecurityDescriptor",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; paged pool (failure injection applies); grants SYSTEM and administrators only",
        "fltkernel/nf-fltkernel-fltbuilddefaultsecuritydescriptor"
    ),
    export!(
        "FltFreeSecurityDescriptor",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; only a descriptor FltBuildDefaultSecurityDescriptor returned, freed once",
        "fltkernel/nf-fltkernel-fltfreesecuritydescriptor"
    ),
    export!(
        "FltLockUserBuffer",
        "fltmgr.sys",
        "APC_LEVEL",
        "IRQL; live callback data; reads and writes (not IRP_MN_MDL): an MDL from nonpaged pool in MdlAddress, DIRTY when locked in pre-operation, freed with the callback data; an MDL already there is success",
        "fltkernel/nf-fltkernel-fltlockuserbuffer"
    ),
    export!(
        "MmCopyMemory",
        "ntoskrnl.exe",
        "APC_LEVEL",
        "IRQL; exactly one of VIRTUAL and PHYSICAL (physical not modelled); a faulting user buffer answers an error, never a crash; double fetches and copies outside the client's process are reported",
        "ntddk/nf-ntddk-mmcopymemory"
    ),
    export!(
        "ZwCreateFile",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; special kernel APCs deliverable (not in a guarded region: else STATUS_POSSIBLE_DEADLOCK and a report); enters the stack at the top, so a filter's own call re-enters it; OBJ_FORCE_ACCESS_CHECK on a user's behalf",
        "wdm/nf-wdm-zwcreatefile"
    ),
    export!(
        "ZwReadFile",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; special kernel APCs deliverable; enters the stack at the top",
        "wdm/nf-wdm-zwreadfile"
    ),
    export!(
        "ZwClose",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; an open kernel handle, closed once",
        "wdm/nf-wdm-zwclose"
    ),
    export!(
        "ZwOpenKey",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; an existing key by full name or relative to an open key (case-insensitive); closed with ZwClose",
        "wdm/nf-wdm-zwopenkey"
    ),
    export!(
        "ZwQueryValueKey",
        "ntoskrnl.exe",
        "PASSIVE_LEVEL",
        "IRQL; an open key; KeyValuePartialInformation (REG_SZ, REG_DWORD, REG_MULTI_SZ); STATUS_BUFFER_TOO_SMALL / STATUS_BUFFER_OVERFLOW with the size needed",
        "wdm/nf-wdm-zwqueryvaluekey"
    ),
];

/// Imports of a `no_std` driver that are compiler support, not kernel services: the model cannot export these
/// names beside the host's C library, and does not need to (FLTMGR-CONTRACTS.md, "Imports that are not kernel
/// services").
pub const COMPILER_SUPPORT: &[&str] = &["memcpy", "memset", "memmove", "memcmp", "__C_specific_handler"];

/// The docs page of `name`, if the model exports it.
#[must_use]
pub fn docs(name: &str) -> Option<&'static str> {
    EXPORTS.iter().find(|e| e.name == name).map(|e| e.docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_export_cites_a_ddi_page_once() {
        let mut names: Vec<_> = EXPORTS.iter().map(|e| e.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), EXPORTS.len(), "duplicate export rows");
        assert!(EXPORTS.iter().all(|e| e.docs.starts_with(DDI) && e.docs.len() > DDI.len()));
    }
}
