//! Contexts: `FltAllocateContext`, reference counting (`FltReferenceContext`, `FltReleaseContext`), attaching to
//! stream handles and streams (`FltSetStreamHandleContext`, `FltGetStreamHandleContext`, `FltSetStreamContext`,
//! `FltGetStreamContext`), `FltDeleteContext`, and the cleanup callback when the last reference goes.
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
            FLT_SET_CONTEXT_KEEP_IF_EXISTS, FLT_SET_CONTEXT_OPERATION, FLT_SET_CONTEXT_REPLACE_IF_EXISTS,
            FLT_STREAM_CONTEXT, FLT_STREAMHANDLE_CONTEXT, PFLT_CONTEXT, PFLT_CONTEXT_CLEANUP_CALLBACK, PFLT_FILTER,
            PFLT_INSTANCE,
        },
    },
    Win32::Foundation::{
        NTSTATUS, STATUS_FLT_CONTEXT_ALLOCATION_NOT_FOUND, STATUS_FLT_CONTEXT_ALREADY_DEFINED,
        STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND, STATUS_SUCCESS,
    },
};

use super::{instance::instances, registration::filters};
use crate::{
    guard::guarded,
    kernel::{irql, thread},
    verifier::{self, Rule},
};

const CONTEXT_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltallocatecontext";
const SET_DOCS: &str =
    "https://learn.microsoft.com/windows-hardware/drivers/ddi/fltkernel/nf-fltkernel-fltsetstreamhandlecontext";

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

fn instance_of_filter(instance: PFLT_INSTANCE) -> Option<PFLT_FILTER> {
    instances().into_iter().find(|i| i.handle == instance && i.attached).map(|i| i.filter)
}

/// Attaches `new` to `target`, as the `FltSet*Context` routines do.
#[expect(clippy::too_many_arguments, reason = "the DDI's arguments and the target they name")]
fn set_context(
    api: &'static str,
    instance: PFLT_INSTANCE,
    target: Target,
    expected_type: u32,
    operation: FLT_SET_CONTEXT_OPERATION,
    new: PFLT_CONTEXT,
    old: *mut PFLT_CONTEXT,
    file_object: *const FILE_OBJECT,
) -> NTSTATUS {
    if !thread::require_irql_at_most(api, irql::APC, SET_DOCS) || !check_live(api, new) {
        return STATUS_INVALID_PARAMETER;
    }
    let Some(filter) = instance_of_filter(instance) else {
        verifier::report(Rule::InvalidArgument, api, format!("{instance:#x} is not an attached instance"));
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
    let (owner, context_type, attached) = with_state(|s| {
        let c = s.live.get(&(new as usize));
        (c.map(|c| c.filter), c.map(|c| u32::from(c.kind)), c.and_then(|c| c.attached))
    });
    if owner != Some(filter) || context_type != Some(expected_type) || attached.is_some() {
        verifier::report(
            Rule::InvalidArgument,
            api,
            "NewContext must be an unattached context of this filter, of the type the routine sets",
        );
        return STATUS_INVALID_PARAMETER;
    }
    if operation != FLT_SET_CONTEXT_KEEP_IF_EXISTS && operation != FLT_SET_CONTEXT_REPLACE_IF_EXISTS {
        verifier::report(
            Rule::InvalidArgument,
            api,
            format!("Operation {operation} is not KEEP_IF_EXISTS or REPLACE_IF_EXISTS"),
        );
        return STATUS_INVALID_PARAMETER;
    }
    let existing = with_state(|s| s.attached.get(&target).copied());
    if let Some(existing) = existing {
        if operation == FLT_SET_CONTEXT_KEEP_IF_EXISTS {
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
            release(api, existing as PFLT_CONTEXT);
        } else {
            // SAFETY: the driver passes a place for the old context; the attachment's reference becomes the caller's.
            unsafe { old.write(existing as PFLT_CONTEXT) };
        }
    }
    with_state(|s| {
        if let Some(c) = s.live.get_mut(&(new as usize)) {
            c.attached = Some(target);
            // The attachment holds its own reference; the caller keeps (and must release) its own.
            c.references = c.references.saturating_add(1);
        }
        s.attached.insert(target, new as usize);
    });
    STATUS_SUCCESS
}

fn get_context(api: &'static str, instance: PFLT_INSTANCE, target: Target, context: *mut PFLT_CONTEXT) -> NTSTATUS {
    if !thread::require_irql_at_most(api, irql::APC, SET_DOCS) {
        return STATUS_INVALID_PARAMETER;
    }
    if instance_of_filter(instance).is_none() || context.is_null() {
        verifier::report(Rule::InvalidArgument, api, "an attached instance and a place for the context are required");
        return STATUS_INVALID_PARAMETER;
    }
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
        let target = Target::StreamHandle(instance, file_object as usize);
        set_context(API, instance, target, FLT_STREAMHANDLE_CONTEXT, operation, new_context, old_context, file_object)
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
        get_context(API, instance, Target::StreamHandle(instance, file_object as usize), context)
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
        let target = Target::Stream(instance, stream_of(file_object));
        set_context(API, instance, target, FLT_STREAM_CONTEXT, operation, new_context, old_context, file_object)
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
        get_context(API, instance, Target::Stream(instance, stream_of(file_object)), context)
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

/// The last file object of a stream was closed: its stream contexts go.
pub(crate) fn stream_closed(stream: usize) {
    detach_where("IRP_MJ_CLOSE", |t| matches!(t, Target::Stream(_, s) if *s == stream));
}

/// The instance was torn down: everything attached through it goes.
pub(crate) fn instance_torn_down(instance: PFLT_INSTANCE) {
    detach_where("InstanceTeardownComplete", |t| match t {
        Target::StreamHandle(i, _) | Target::Stream(i, _) => *i == instance,
    });
}

/// Reports the contexts of `filter` still alive; called when its driver unloads.
pub(crate) fn report_leaks(filter: PFLT_FILTER, after: &str) {
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
