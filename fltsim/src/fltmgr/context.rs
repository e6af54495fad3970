//! Contexts: `FltAllocateContext`, reference counting (`FltReferenceContext`, `FltReleaseContext`), attaching to
//! stream handles and streams (`FltSetStreamHandleContext`, `FltGetStreamHandleContext`, `FltSetStreamContext`,
//! `FltGetStreamContext`), files (`FltSetFileContext`, `FltGetFileContext`, `FltSupportsFileContexts`), instances
//! (`FltSetInstanceContext`, `FltGetInstanceContext`) and volumes (`FltSetVolumeContext`, `FltGetVolumeContext`),
//! `FltDeleteContext`, and the cleanup callback when the last reference goes.
//!
//! What holds an attached context: a stream handle context goes when its file object closes, a stream context when
//! the stream's last file object closes, a file context (per instance per file ID, so every link and stream of the
//! file shares it) when the last file object of the file closes — of the streams file context routines were called
//! on, a simplification a filter can only tell apart by opening a named stream it never asks about and closing the
//! stream it set the context through first — an instance context when the instance is torn down (after its
//! InstanceTeardownComplete callback; also when InstanceSetup fails), and a volume context — one per filter per
//! volume — when the filter unregisters (the teardown of its last instance on the volume, or at the latest when its
//! driver has unloaded; volumes are never dismounted in the model).
//!
//! As Filter Verifier does (<https://learn.microsoft.com/windows-hardware/drivers/devtest/file-system-filter-verification>,
//! bugcheck 0xF5), the model reports a context released more often than referenced or used after it was freed
//! ([`Rule::ContextMisuse`]) and contexts still alive when their filter unloads ([`Rule::ContextLeak`]). The cleanup
//! callback runs at APC_LEVEL, the highest IRQL its docs allow, so a cleanup that calls a PASSIVE-only routine such
//! as `FltClose` is reported (stricter than a Windows run, which may call it lower, and said so).

use std::{
    alloc::{Layout, alloc, dealloc},
    collections::{BTreeMap, BTreeSet},
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::{
        Foundation::{FILE_OBJECT, POOL_TYPE},
        Storage::FileSystem::Minifilters::{
            FLT_FILE_CONTEXT, FLT_INSTANCE_CONTEXT, FLT_SECTION_CONTEXT, FLT_SET_CONTEXT_KEEP_IF_EXISTS,
            FLT_SET_CONTEXT_OPERATION, FLT_SET_CONTEXT_REPLACE_IF_EXISTS, FLT_STREAM_CONTEXT, FLT_STREAMHANDLE_CONTEXT,
            FLT_TRANSACTION_CONTEXT, FLT_VOLUME_CONTEXT, FLTFL_INSTANCE_TEARDOWN_FILTER_UNLOAD,
            FLTFL_INSTANCE_TEARDOWN_MANDATORY_FILTER_UNLOAD, PFLT_CONTEXT, PFLT_CONTEXT_CLEANUP_CALLBACK, PFLT_FILTER,
            PFLT_INSTANCE, PFLT_VOLUME,
        },
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND, STATUS_FLT_CONTEXT_ALREADY_DEFINED,
            STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND, STATUS_NOT_SUPPORTED,
            STATUS_SUCCESS,
        },
        Storage::InstallableFileSystems::{FLT_FSTYPE_NTFS, FLT_FSTYPE_REFS},
    },
};

use super::{instance::instances, registration::filters};
use crate::{
    guard::guarded,
    io::volumes,
    kernel::{irql, thread},
    verifier::{self, Rule},
};

const CONTEXT_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatecontext";
const SET_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetstreamhandlecontext";
const INSTANCE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetinstancecontext";
const VOLUME_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetvolumecontext";
const FILE_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetfilecontext";

/// The context types `fltkernel.h` defines; `FltAllocateContext` with any other is reported.
const CONTEXT_TYPES: [u32; 7] = [
    FLT_VOLUME_CONTEXT,
    FLT_INSTANCE_CONTEXT,
    FLT_FILE_CONTEXT,
    FLT_STREAM_CONTEXT,
    FLT_STREAMHANDLE_CONTEXT,
    FLT_TRANSACTION_CONTEXT,
    FLT_SECTION_CONTEXT,
];

/// `FLT_VARIABLE_SIZED_CONTEXTS`: a registration whose contexts may have any size.
pub const VARIABLE_SIZED: usize = usize::MAX;

/// The byte a new context is filled with: contexts are not zeroed, and code that assumes they are fails visibly.
pub const UNINITIALIZED_FILL: u8 = 0xC5;

/// One context type a filter registered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ContextType {
    pub(crate) kind: u16,
    pub(crate) size: usize,
    pub(crate) cleanup: PFLT_CONTEXT_CLEANUP_CALLBACK,
}

/// Where a context is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    /// A stream handle: (instance, file object).
    StreamHandle(PFLT_INSTANCE, usize),
    /// A stream: (instance, the stream's `FsContext`).
    Stream(PFLT_INSTANCE, usize),
    /// An instance.
    Instance(PFLT_INSTANCE),
    /// A volume, for one filter: (filter, volume).
    Volume(PFLT_FILTER, PFLT_VOLUME),
    /// A file, for one instance: (instance, volume, file ID). Every stream and link of the file shares it.
    File(PFLT_INSTANCE, PFLT_VOLUME, u64),
}

struct Context {
    filter: PFLT_FILTER,
    kind: u16,
    size: usize,
    references: u32,
    attached: Option<Target>,
    cleanup: PFLT_CONTEXT_CLEANUP_CALLBACK,
}

#[derive(Default)]
struct State {
    live: BTreeMap<usize, Context>,
    freed: BTreeSet<usize>,
    attached: BTreeMap<Target, usize>,
    /// Instances whose InstanceSetup callback is running (not yet in the instance list): instance → (filter, volume).
    setting_up: BTreeMap<PFLT_INSTANCE, (PFLT_FILTER, PFLT_VOLUME)>,
    /// Streams (`FsContext`) a file context routine was called on → their file (volume, file ID).
    file_streams: BTreeMap<usize, (PFLT_VOLUME, u64)>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn state() -> MutexGuard<'static, Option<State>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn with_state<T>(f: impl FnOnce(&mut State) -> T) -> T {
    f(state().get_or_insert_with(State::default))
}

fn layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.max(1), 16).ok()
}

/// Checks that `context` is a live context; reports a freed or unknown one.
fn check_live(api: &'static str, context: PFLT_CONTEXT) -> bool {
    let address = context as usize;
    let (live, freed) = with_state(|s| (s.live.contains_key(&address), s.freed.contains(&address)));
    if live {
        return true;
    }
    let what = if freed { "a context that was already freed" } else { "not a context" };
    verifier::report(Rule::ContextMisuse, api, format!("{context:?} is {what}"));
    false
}

/// `FltAllocateContext`.
///
/// Rules: ≤ APC_LEVEL; a context type the filter registered (else `STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND`); a size
/// from 1 to 65535 and, for fixed-size registrations, not above the registered size. The memory is not zeroed and
/// starts with one reference.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatecontext>.
///
/// # Safety
/// Called by driver code: `ReturnedContext` must be a valid place for the context.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltAllocateContext(
    filter: PFLT_FILTER,
    context_type: u16,
    context_size: usize,
    _pool_type: POOL_TYPE,
    returned_context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltAllocateContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, CONTEXT_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        if !CONTEXT_TYPES.contains(&u32::from(context_type)) {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!("ContextType {context_type:#x} is not one of the FLT_*_CONTEXT types"),
            );
            return STATUS_INVALID_PARAMETER;
        }
        if returned_context.is_null() || context_size == 0 || context_size > usize::from(u16::MAX) {
            verifier::report(
                Rule::InvalidArgument,
                API,
                format!("ContextSize {context_size} must be 1..=65535 and ReturnedContext non-NULL"),
            );
            return STATUS_INVALID_PARAMETER;
        }
        let Some(record) = filters().into_iter().find(|f| f.handle == filter && !f.unregistered) else {
            verifier::report(Rule::InvalidFilterHandle, API, format!("{filter:#x} is not a registered filter"));
            return STATUS_INVALID_PARAMETER;
        };
        let Some(registered) = record
            .context_registrations
            .iter()
            .find(|r| r.kind == context_type && (r.size == VARIABLE_SIZED || context_size <= r.size))
            .copied()
        else {
            return STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND;
        };
        let Some(layout) = layout(context_size) else { return STATUS_INVALID_PARAMETER };
        // SAFETY: the layout has a non-zero size.
        let memory = unsafe { alloc(layout) };
        if memory.is_null() {
            return STATUS_INSUFFICIENT_RESOURCES;
        }
        // SAFETY: a fresh allocation of `context_size` bytes.
        unsafe { memory.write_bytes(UNINITIALIZED_FILL, context_size) };
        with_state(|s| {
            s.freed.remove(&(memory as usize));
            s.live.insert(
                memory as usize,
                Context {
                    filter,
                    kind: context_type,
                    size: context_size,
                    references: 1,
                    attached: None,
                    cleanup: registered.cleanup,
                },
            );
        });
        // SAFETY: checked non-NULL; the driver passes a place for the context.
        unsafe { returned_context.write(memory.cast()) };
        STATUS_SUCCESS
    })
}

/// `FltReferenceContext`: ≤ DISPATCH_LEVEL; a live context.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltreferencecontext>.
#[unsafe(no_mangle)]
pub extern "system" fn FltReferenceContext(context: PFLT_CONTEXT) {
    const API: &str = "FltReferenceContext";
    guarded(API, (), || {
        if thread::require_irql_at_most(API, irql::DISPATCH, CONTEXT_DOCS) && check_live(API, context) {
            with_state(|s| {
                if let Some(c) = s.live.get_mut(&(context as usize)) {
                    c.references = c.references.saturating_add(1);
                }
            });
        }
    });
}

/// Drops one reference; the last one runs the cleanup callback (at APC_LEVEL) and frees the memory.
fn release(api: &'static str, context: PFLT_CONTEXT) {
    let address = context as usize;
    let last = with_state(|s| {
        let c = s.live.get_mut(&address)?;
        c.references = c.references.saturating_sub(1);
        (c.references == 0).then_some((c.attached, c.cleanup, c.kind, c.size))
    });
    let Some((attached, cleanup, context_type, size)) = last else { return };
    if let Some(target) = attached {
        verifier::report(
            Rule::ContextMisuse,
            api,
            format!("the last reference to {context:?} was released while it is still attached to {target:?}"),
        );
        with_state(|s| s.attached.remove(&target));
    }
    if let Some(cleanup) = cleanup {
        thread::at_irql(irql::APC, || {
            // SAFETY: the driver's cleanup callback, with its own context, before the memory is freed.
            unsafe { cleanup(context, context_type) };
        });
    }
    with_state(|s| {
        s.live.remove(&address);
        s.freed.insert(address);
    });
    if let Some(layout) = layout(size) {
        // SAFETY: allocated in FltAllocateContext with this layout, removed from the live set above.
        unsafe { dealloc(context.cast(), layout) };
    }
}

/// `FltReleaseContext`: ≤ DISPATCH_LEVEL; a live context, released no more often than referenced.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltreleasecontext>.
#[unsafe(no_mangle)]
pub extern "system" fn FltReleaseContext(context: PFLT_CONTEXT) {
    const API: &str = "FltReleaseContext";
    guarded(API, (), || {
        if thread::require_irql_at_most(API, irql::DISPATCH, CONTEXT_DOCS) && check_live(API, context) {
            release(API, context);
        }
    });
}

/// `FltDeleteContext`: ≤ APC_LEVEL; detaches a context and drops the reference its attachment held.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltdeletecontext>.
#[unsafe(no_mangle)]
pub extern "system" fn FltDeleteContext(context: PFLT_CONTEXT) {
    const API: &str = "FltDeleteContext";
    guarded(API, (), || {
        if !thread::require_irql_at_most(API, irql::APC, CONTEXT_DOCS) || !check_live(API, context) {
            return;
        }
        let target = with_state(|s| s.live.get_mut(&(context as usize)).and_then(|c| c.attached.take()));
        if let Some(target) = target {
            with_state(|s| s.attached.remove(&target));
            release(API, context);
        }
    });
}

/// The filter and volume of `instance`: an attached instance, or one whose InstanceSetup callback is running.
fn instance_owner(instance: PFLT_INSTANCE) -> Option<(PFLT_FILTER, PFLT_VOLUME)> {
    instances()
        .into_iter()
        .find(|i| i.handle == instance && i.attached)
        .map(|i| (i.filter, i.volume))
        .or_else(|| with_state(|s| s.setting_up.get(&instance).copied()))
}

fn instance_of_filter(instance: PFLT_INSTANCE) -> Option<PFLT_FILTER> {
    instance_owner(instance).map(|(filter, _)| filter)
}

/// One `FltSet*Context` call, its target resolved.
#[derive(Clone, Copy)]
struct SetCall {
    api: &'static str,
    docs: &'static str,
    /// The filter the caller acts for (its instance's); `None` when the context names it (a volume context).
    filter: Option<PFLT_FILTER>,
    target: Target,
    expected_type: u32,
    operation: FLT_SET_CONTEXT_OPERATION,
    new: PFLT_CONTEXT,
    old: *mut PFLT_CONTEXT,
}

/// Checks the context and the operation of a set call: a live, unattached context of the caller's filter, of the
/// type the routine sets.
fn check_set(call: &SetCall) -> bool {
    let api = call.api;
    if !thread::require_irql_at_most(api, irql::APC, call.docs) || !check_live(api, call.new) {
        return false;
    }
    let (owner, context_type, attached) = with_state(|s| {
        let c = s.live.get(&(call.new as usize));
        (c.map(|c| c.filter), c.map(|c| u32::from(c.kind)), c.and_then(|c| c.attached))
    });
    if call.filter.is_some_and(|f| owner != Some(f)) || context_type != Some(call.expected_type) || attached.is_some() {
        verifier::report(
            Rule::InvalidArgument,
            api,
            format!(
                "NewContext must be an unattached context of this filter, of type {:#x} (the type {api} sets); it is \
                 of type {context_type:#x?}",
                call.expected_type
            ),
        );
        return false;
    }
    if call.operation != FLT_SET_CONTEXT_KEEP_IF_EXISTS && call.operation != FLT_SET_CONTEXT_REPLACE_IF_EXISTS {
        verifier::report(
            Rule::InvalidArgument,
            api,
            format!("Operation {} is not KEEP_IF_EXISTS or REPLACE_IF_EXISTS", call.operation),
        );
        return false;
    }
    true
}

/// Attaches `call.new` to `call.target`, as the `FltSet*Context` routines do.
fn set_context(call: &SetCall) -> NTSTATUS {
    if !check_set(call) {
        return STATUS_INVALID_PARAMETER;
    }
    let (target, old) = (call.target, call.old);
    let existing = with_state(|s| s.attached.get(&target).copied());
    if let Some(existing) = existing {
        if call.operation == FLT_SET_CONTEXT_KEEP_IF_EXISTS {
            if !old.is_null() {
                with_state(|s| {
                    if let Some(c) = s.live.get_mut(&existing) {
                        c.references = c.references.saturating_add(1);
                    }
                });
                // SAFETY: the driver passes a place for the old context.
                unsafe { old.write(existing as PFLT_CONTEXT) };
            }
            return STATUS_FLT_CONTEXT_ALREADY_DEFINED;
        }
        // Replace: the old context is detached; the caller gets a reference to it if asked, else its attachment
        // reference is dropped.
        with_state(|s| {
            if let Some(c) = s.live.get_mut(&existing) {
                c.attached = None;
            }
        });
        if old.is_null() {
            release(call.api, existing as PFLT_CONTEXT);
        } else {
            // SAFETY: the driver passes a place for the old context; the attachment's reference becomes the caller's.
            unsafe { old.write(existing as PFLT_CONTEXT) };
        }
    }
    with_state(|s| {
        if let Some(c) = s.live.get_mut(&(call.new as usize)) {
            c.attached = Some(target);
            // The attachment holds its own reference; the caller keeps (and must release) its own.
            c.references = c.references.saturating_add(1);
        }
        s.attached.insert(target, call.new as usize);
    });
    STATUS_SUCCESS
}

/// A set call on a file object: an attached instance and an opened file object (not in pre-create).
fn set_file_object_context(call: &SetCall, instance: PFLT_INSTANCE, file_object: *const FILE_OBJECT) -> NTSTATUS {
    let api = call.api;
    let Some(filter) = attached_filter(api, call.docs, instance) else {
        return STATUS_INVALID_PARAMETER;
    };
    if !crate::io::iomgr::is_open_file_object(file_object) {
        verifier::report(
            Rule::InvalidArgument,
            api,
            format!(
                "{file_object:?} is not an opened file object (a create's file object gets contexts in post-create)"
            ),
        );
        return STATUS_INVALID_PARAMETER;
    }
    set_context(&SetCall { filter: Some(filter), ..*call })
}

/// A `FltGet*Context` call on an instance's `target`: [`get_preconditions`], then [`lookup`].
fn get_context(
    api: &'static str,
    docs: &'static str,
    instance: PFLT_INSTANCE,
    target: Target,
    context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    if !get_preconditions(api, docs, instance, context) {
        return STATUS_INVALID_PARAMETER;
    }
    lookup(target, context)
}

/// The filter of `instance` for a `FltSet*Context` call that takes an instance: ≤ APC_LEVEL (per `docs`) and an
/// attached instance. Reports and returns `None` when one fails.
fn attached_filter(api: &'static str, docs: &'static str, instance: PFLT_INSTANCE) -> Option<PFLT_FILTER> {
    if !thread::require_irql_at_most(api, irql::APC, docs) {
        return None;
    }
    let filter = instance_of_filter(instance);
    if filter.is_none() {
        verifier::report(Rule::InvalidArgument, api, format!("{instance:#x} is not an attached instance"));
    }
    filter
}

/// The context attached to `target`, referenced for the caller in `*context`, or `STATUS_NOT_FOUND`.
fn lookup(target: Target, context: *mut PFLT_CONTEXT) -> NTSTATUS {
    let found = with_state(|s| {
        let address = s.attached.get(&target).copied()?;
        let c = s.live.get_mut(&address)?;
        c.references = c.references.saturating_add(1);
        Some(address)
    });
    let Some(found) = found else { return STATUS_NOT_FOUND };
    // SAFETY: checked non-NULL; the driver passes a place for the context.
    unsafe { context.write(found as PFLT_CONTEXT) };
    STATUS_SUCCESS
}

fn stream_of(file_object: *const FILE_OBJECT) -> usize {
    // SAFETY: a file object the model handed out (checked by the callers), whose FsContext names its stream.
    unsafe { file_object.as_ref() }.map_or(0, |f| f.FsContext as usize)
}

/// `FltSetStreamHandleContext`: ≤ APC_LEVEL; not in pre-create (the file object is not open yet); a context of
/// type `FLT_STREAMHANDLE_CONTEXT` of this filter; `KEEP_IF_EXISTS` answers `STATUS_FLT_CONTEXT_ALREADY_DEFINED`
/// with the existing one referenced in `OldContext`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetstreamhandlecontext>.
///
/// # Safety
/// Called by driver code with the pointers it has.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltSetStreamHandleContext(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    operation: FLT_SET_CONTEXT_OPERATION,
    new_context: PFLT_CONTEXT,
    old_context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltSetStreamHandleContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let call = SetCall {
            api: API,
            docs: SET_DOCS,
            filter: None,
            target: Target::StreamHandle(instance, file_object as usize),
            expected_type: FLT_STREAMHANDLE_CONTEXT,
            operation,
            new: new_context,
            old: old_context,
        };
        set_file_object_context(&call, instance, file_object)
    })
}

/// `FltGetStreamHandleContext`: ≤ APC_LEVEL; the context referenced for the caller, or `STATUS_NOT_FOUND`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetstreamhandlecontext>.
///
/// # Safety
/// Called by driver code: `Context` must be a valid place for the context.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetStreamHandleContext(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltGetStreamHandleContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        get_context(API, SET_DOCS, instance, Target::StreamHandle(instance, file_object as usize), context)
    })
}

/// `FltSetStreamContext`: as [`FltSetStreamHandleContext`], for the stream every file object of the file shares.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetstreamcontext>.
///
/// # Safety
/// Called by driver code with the pointers it has.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltSetStreamContext(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    operation: FLT_SET_CONTEXT_OPERATION,
    new_context: PFLT_CONTEXT,
    old_context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltSetStreamContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !crate::io::iomgr::is_open_file_object(file_object) {
            verifier::report(Rule::InvalidArgument, API, format!("{file_object:?} is not an opened file object"));
            return STATUS_INVALID_PARAMETER;
        }
        let call = SetCall {
            api: API,
            docs: SET_DOCS,
            filter: None,
            target: Target::Stream(instance, stream_of(file_object)),
            expected_type: FLT_STREAM_CONTEXT,
            operation,
            new: new_context,
            old: old_context,
        };
        set_file_object_context(&call, instance, file_object)
    })
}

/// `FltGetStreamContext`: as [`FltGetStreamHandleContext`], for the stream.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetstreamcontext>.
///
/// # Safety
/// Called by driver code: `Context` must be a valid place for the context.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetStreamContext(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltGetStreamContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !crate::io::iomgr::is_open_file_object(file_object) {
            verifier::report(Rule::InvalidArgument, API, format!("{file_object:?} is not an opened file object"));
            return STATUS_INVALID_PARAMETER;
        }
        get_context(API, SET_DOCS, instance, Target::Stream(instance, stream_of(file_object)), context)
    })
}

/// `FltSetInstanceContext`: ≤ APC_LEVEL; an attached instance (or one whose InstanceSetup callback is running);
/// a context of type `FLT_INSTANCE_CONTEXT` of the instance's filter; one context per instance, `KEEP_IF_EXISTS`
/// answering `STATUS_FLT_CONTEXT_ALREADY_DEFINED` with the existing one referenced in `OldContext`. The context is
/// released when the instance is torn down.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetinstancecontext>.
///
/// # Safety
/// Called by driver code: `OldContext` must be NULL or a valid place for a context.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltSetInstanceContext(
    instance: PFLT_INSTANCE,
    operation: FLT_SET_CONTEXT_OPERATION,
    new_context: PFLT_CONTEXT,
    old_context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltSetInstanceContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let Some(filter) = attached_filter(API, INSTANCE_DOCS, instance) else {
            return STATUS_INVALID_PARAMETER;
        };
        set_context(&SetCall {
            api: API,
            docs: INSTANCE_DOCS,
            filter: Some(filter),
            target: Target::Instance(instance),
            expected_type: FLT_INSTANCE_CONTEXT,
            operation,
            new: new_context,
            old: old_context,
        })
    })
}

/// The preconditions of the `FltGet*Context` routines that take an instance: ≤ APC_LEVEL, an attached instance and a
/// place for the context. Reports and returns false when one fails.
fn get_preconditions(
    api: &'static str,
    docs: &'static str,
    instance: PFLT_INSTANCE,
    context: *mut PFLT_CONTEXT,
) -> bool {
    if !thread::require_irql_at_most(api, irql::APC, docs) {
        return false;
    }
    if instance_of_filter(instance).is_none() || context.is_null() {
        verifier::report(Rule::InvalidArgument, api, "an attached instance and a place for the context are required");
        return false;
    }
    true
}

/// `FltGetInstanceContext`: ≤ APC_LEVEL; the instance's context referenced for the caller, or `STATUS_NOT_FOUND`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetinstancecontext>.
///
/// # Safety
/// Called by driver code: `Context` must be a valid place for the context.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetInstanceContext(instance: PFLT_INSTANCE, context: *mut PFLT_CONTEXT) -> NTSTATUS {
    const API: &str = "FltGetInstanceContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        get_context(API, INSTANCE_DOCS, instance, Target::Instance(instance), context)
    })
}

fn is_volume(volume: PFLT_VOLUME) -> bool {
    volumes().iter().any(|v| v.handle == volume)
}

/// `FltSetVolumeContext`: ≤ APC_LEVEL; a mounted volume; a context of type `FLT_VOLUME_CONTEXT` (its filter is the
/// one whose context it becomes: one per filter per volume); `KEEP_IF_EXISTS` answers
/// `STATUS_FLT_CONTEXT_ALREADY_DEFINED` with the existing one referenced in `OldContext`. The context is released
/// when the filter unregisters.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetvolumecontext>.
///
/// # Safety
/// Called by driver code: `OldContext` must be NULL or a valid place for a context.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltSetVolumeContext(
    volume: PFLT_VOLUME,
    operation: FLT_SET_CONTEXT_OPERATION,
    new_context: PFLT_CONTEXT,
    old_context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltSetVolumeContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, VOLUME_DOCS) || !check_live(API, new_context) {
            return STATUS_INVALID_PARAMETER;
        }
        if !is_volume(volume) {
            verifier::report(Rule::InvalidArgument, API, format!("{volume:#x} is not a mounted volume"));
            return STATUS_INVALID_PARAMETER;
        }
        let Some(filter) = with_state(|s| s.live.get(&(new_context as usize)).map(|c| c.filter)) else {
            return STATUS_INVALID_PARAMETER;
        };
        set_context(&SetCall {
            api: API,
            docs: VOLUME_DOCS,
            filter: None,
            target: Target::Volume(filter, volume),
            expected_type: FLT_VOLUME_CONTEXT,
            operation,
            new: new_context,
            old: old_context,
        })
    })
}

/// `FltGetVolumeContext`: ≤ APC_LEVEL; a registered filter and a mounted volume; the filter's context for the
/// volume referenced for the caller, or `STATUS_NOT_FOUND`.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetvolumecontext>.
///
/// # Safety
/// Called by driver code: `Context` must be a valid place for the context.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetVolumeContext(
    filter: PFLT_FILTER,
    volume: PFLT_VOLUME,
    context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltGetVolumeContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !thread::require_irql_at_most(API, irql::APC, VOLUME_DOCS) {
            return STATUS_INVALID_PARAMETER;
        }
        if !filters().iter().any(|f| f.handle == filter && !f.unregistered) {
            verifier::report(Rule::InvalidFilterHandle, API, format!("{filter:#x} is not a registered filter"));
            return STATUS_INVALID_PARAMETER;
        }
        if !is_volume(volume) || context.is_null() {
            verifier::report(Rule::InvalidArgument, API, "a mounted volume and a place for the context are required");
            return STATUS_INVALID_PARAMETER;
        }
        lookup(Target::Volume(filter, volume), context)
    })
}

/// The file behind an opened `file_object`: (volume, file ID), recording its stream; reports a file object that is
/// not open; `STATUS_NOT_SUPPORTED` where the file system keeps no file contexts.
fn file_of(api: &'static str, file_object: *const FILE_OBJECT) -> Result<(PFLT_VOLUME, u64), NTSTATUS> {
    let Some((open, volume)) = crate::io::iomgr::open_of_file_object(file_object) else {
        verifier::report(
            Rule::InvalidArgument,
            api,
            format!(
                "{file_object:?} is not an opened file object (a create's file object gets contexts in post-create)"
            ),
        );
        return Err(STATUS_INVALID_PARAMETER);
    };
    if !supports_file_contexts(volume.spec.file_system) {
        return Err(STATUS_NOT_SUPPORTED);
    }
    let id = crate::io::fs::file_id(open)?;
    let file = (volume.handle, id);
    with_state(|s| s.file_streams.insert(stream_of(file_object), file));
    Ok(file)
}

/// NTFS and ReFS keep per-file contexts (NTFS from Windows Vista); the model's other file systems do not.
fn supports_file_contexts(file_system: i32) -> bool {
    file_system == FLT_FSTYPE_NTFS || file_system == FLT_FSTYPE_REFS
}

/// `FltSetFileContext`: ≤ APC_LEVEL; an attached instance; an opened file object (not in pre-create); a context
/// of type `FLT_FILE_CONTEXT` of the instance's filter; one context per instance per file, shared by every stream
/// and link of the file (it belongs to the file ID); `KEEP_IF_EXISTS`/`REPLACE_IF_EXISTS` as
/// [`FltSetInstanceContext`]; `STATUS_NOT_SUPPORTED` on a file system without file contexts (see
/// [`FltSupportsFileContexts`]). Released when the last file object of the file closes.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetfilecontext>.
///
/// # Safety
/// Called by driver code with the pointers it has.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltSetFileContext(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    operation: FLT_SET_CONTEXT_OPERATION,
    new_context: PFLT_CONTEXT,
    old_context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltSetFileContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        let Some(filter) = attached_filter(API, FILE_DOCS, instance) else {
            return STATUS_INVALID_PARAMETER;
        };
        let (volume, id) = match file_of(API, file_object) {
            Ok(file) => file,
            Err(status) => return status,
        };
        set_context(&SetCall {
            api: API,
            docs: FILE_DOCS,
            filter: Some(filter),
            target: Target::File(instance, volume, id),
            expected_type: FLT_FILE_CONTEXT,
            operation,
            new: new_context,
            old: old_context,
        })
    })
}

/// `FltGetFileContext`: ≤ APC_LEVEL; an attached instance and an opened file object; the instance's context for
/// the file (whichever stream or link the file object opened) referenced for the caller, or `STATUS_NOT_FOUND`;
/// `STATUS_NOT_SUPPORTED` on a file system without file contexts.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltgetfilecontext>.
///
/// # Safety
/// Called by driver code: `Context` must be a valid place for the context.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltGetFileContext(
    instance: PFLT_INSTANCE,
    file_object: *const FILE_OBJECT,
    context: *mut PFLT_CONTEXT,
) -> NTSTATUS {
    const API: &str = "FltGetFileContext";
    guarded(API, STATUS_INVALID_PARAMETER, || {
        if !get_preconditions(API, FILE_DOCS, instance, context) {
            return STATUS_INVALID_PARAMETER;
        }
        match file_of(API, file_object) {
            Ok((volume, id)) => lookup(Target::File(instance, volume, id), context),
            Err(status) => status,
        }
    })
}

/// `FltSupportsFileContexts`: ≤ APC_LEVEL; whether the file system keeps file contexts for the file: TRUE for an
/// opened file object on NTFS or ReFS, FALSE otherwise (a create's file object before its file system opened it
/// has no file yet; paging files are not modelled).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsupportsfilecontexts>.
///
/// # Safety
/// Called by driver code with the file object it has.
#[unsafe(no_mangle)]
pub unsafe extern "system" fn FltSupportsFileContexts(file_object: *const FILE_OBJECT) -> bool {
    const API: &str = "FltSupportsFileContexts";
    guarded(API, false, || {
        if !thread::require_irql_at_most(
            API,
            irql::APC,
            "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsupportsfilecontexts",
        ) {
            return false;
        }
        crate::io::iomgr::open_of_file_object(file_object)
            .is_some_and(|(_, volume)| supports_file_contexts(volume.spec.file_system))
    })
}

/// Detaches what was attached to `targets` and drops the attachments' references.
fn detach_where(api: &'static str, matches: impl Fn(&Target) -> bool) {
    let gone: Vec<(Target, usize)> = with_state(|s| {
        let keys: Vec<Target> = s.attached.keys().filter(|t| matches(t)).copied().collect();
        keys.into_iter().filter_map(|t| s.attached.remove(&t).map(|c| (t, c))).collect()
    });
    for (_, address) in gone {
        with_state(|s| {
            if let Some(c) = s.live.get_mut(&address) {
                c.attached = None;
            }
        });
        release(api, address as PFLT_CONTEXT);
    }
}

/// The file object was closed (`IRP_MJ_CLOSE`): its stream handle contexts go.
pub(crate) fn file_object_closed(file_object: usize) {
    detach_where("IRP_MJ_CLOSE", |t| matches!(t, Target::StreamHandle(_, f) if *f == file_object));
}

/// The last file object of a stream was closed: its stream contexts go, and when no other stream of its file a file
/// context routine saw is open, the file's contexts too.
pub(crate) fn stream_closed(stream: usize) {
    detach_where("IRP_MJ_CLOSE", |t| matches!(t, Target::Stream(_, s) if *s == stream));
    let file = with_state(|s| {
        let file = s.file_streams.remove(&stream)?;
        (!s.file_streams.values().any(|f| *f == file)).then_some(file)
    });
    if let Some((volume, id)) = file {
        detach_where("IRP_MJ_CLOSE", |t| matches!(t, Target::File(_, v, i) if *v == volume && *i == id));
    }
}

/// An instance's InstanceSetup callback is about to run: it may set an instance context before the instance is
/// listed.
pub(crate) fn instance_setting_up(instance: PFLT_INSTANCE, filter: PFLT_FILTER, volume: PFLT_VOLUME) {
    with_state(|s| s.setting_up.insert(instance, (filter, volume)));
}

/// An instance's InstanceSetup callback returned: a refused instance's contexts go at once.
pub(crate) fn instance_setup_done(instance: PFLT_INSTANCE, attached: bool) {
    with_state(|s| s.setting_up.remove(&instance));
    if !attached {
        instance_torn_down(instance);
    }
}

/// The instance was torn down (or its InstanceSetup failed): everything attached through it goes, and when its
/// filter is unloading and this was its last instance on the volume, the filter's volume context too.
pub(crate) fn instance_torn_down(instance: PFLT_INSTANCE) {
    with_state(|s| s.setting_up.remove(&instance));
    detach_where("InstanceTeardownComplete", |t| match t {
        Target::StreamHandle(i, _) | Target::Stream(i, _) | Target::Instance(i) | Target::File(i, ..) => *i == instance,
        Target::Volume(..) => false,
    });
    let all = instances();
    let Some(record) = all.iter().find(|i| i.handle == instance) else { return };
    let unloading = matches!(
        record.teardown_reason,
        Some(FLTFL_INSTANCE_TEARDOWN_FILTER_UNLOAD | FLTFL_INSTANCE_TEARDOWN_MANDATORY_FILTER_UNLOAD)
    );
    let last_on_volume = !all.iter().any(|i| i.filter == record.filter && i.volume == record.volume && i.attached);
    if unloading && last_on_volume {
        let (filter, volume) = (record.filter, record.volume);
        detach_where("FltUnregisterFilter", |t| *t == Target::Volume(filter, volume));
    }
}

/// Reports the contexts of `filter` still alive; called when its driver unloads.
pub(crate) fn report_leaks(filter: PFLT_FILTER, after: &str) {
    // FltUnregisterFilter released the filter's volume contexts, of volumes it had no instance on too.
    detach_where("FltUnregisterFilter", |t| matches!(t, Target::Volume(f, _) if *f == filter));
    let alive: Vec<(usize, u16, u32)> = with_state(|s| {
        s.live.iter().filter(|(_, c)| c.filter == filter).map(|(a, c)| (*a, c.kind, c.references)).collect()
    });
    for (address, context_type, references) in alive {
        verifier::report(
            Rule::ContextLeak,
            "FltReleaseContext",
            format!("context {address:#x} of type {context_type:#x} still has {references} references after {after}"),
        );
    }
}
