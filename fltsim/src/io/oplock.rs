//! The model file system's oplock package: one per stream, shared by every file object of the stream, as the `FsRtl`
//! oplock package NTFS uses keeps one `OPLOCK` per stream.
//!
//! An oplock is requested with an FSCTL on a handle ([`super::fsctl`]); a granted request stays pending until the
//! oplock breaks, which completes it. Operations on the stream through other handles break oplocks as the
//! per-operation tables of "Breaking Oplocks" say, and some wait for the owner's acknowledgement before they go on.
//! The oplock key of a file object is the file object itself (the model's [`OpenId`]): dual oplock keys
//! (`DUAL_OPLOCK_KEY_ECP_CONTEXT`) and `OPLOCK_FSCTRL_FLAG_ALL_KEYS_MATCH` are not modelled.
//!
//! A wait for an acknowledgement that nothing can give is found by rule, not by a timeout: when the waiting thread
//! is the one that asked for the oplock and no system worker ([`crate::kernel::work`]) and no thread started with
//! [`crate::kernel::thread::spawn`] is left to acknowledge, the model reports
//! [`Rule::OplockBreakDeadlock`] and lets the operation go on as if the owner had acknowledged the break.
//!
//! Sources: <https://learn.microsoft.com/windows-hardware/drivers/ifs/granting-oplocks>,
//! <https://learn.microsoft.com/windows-hardware/drivers/ifs/breaking-oplocks>,
//! <https://learn.microsoft.com/windows-hardware/drivers/ifs/acknowledging-oplock-breaks> and the per-operation pages
//! they link; each rule below cites its own.

use std::{
    collections::BTreeMap,
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::ThreadId,
    time::Duration,
};

use windows_sys::{
    Wdk::Storage::FileSystem::{
        FILE_COMPLETE_IF_OPLOCKED, FILE_OPEN_REQUIRING_OPLOCK, FILE_OPLOCK_BROKEN_TO_LEVEL_2,
        FILE_OPLOCK_BROKEN_TO_NONE, FILE_OVERWRITE, FILE_OVERWRITE_IF, FILE_RESERVE_OPFILTER, FILE_SUPERSEDE,
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_CANNOT_BREAK_OPLOCK, STATUS_INVALID_OPLOCK_PROTOCOL, STATUS_INVALID_PARAMETER,
            STATUS_OPLOCK_NOT_GRANTED, STATUS_OPLOCK_SWITCHED_TO_NEW_HANDLE, STATUS_SUCCESS,
        },
        Storage::FileSystem::{
            FILE_EXECUTE, FILE_READ_ATTRIBUTES, FILE_READ_DATA, FILE_READ_EA, FILE_SHARE_READ, FILE_WRITE_ATTRIBUTES,
            READ_CONTROL, SYNCHRONIZE,
        },
        System::Ioctl::{
            OPLOCK_LEVEL_CACHE_HANDLE, OPLOCK_LEVEL_CACHE_READ, OPLOCK_LEVEL_CACHE_WRITE,
            REQUEST_OPLOCK_CURRENT_VERSION, REQUEST_OPLOCK_OUTPUT_BUFFER, REQUEST_OPLOCK_OUTPUT_FLAG_ACK_REQUIRED,
        },
    },
};

use super::fs::{OpenId, StreamId};
use crate::{
    kernel::{thread, work},
    verifier::{self, Rule},
};

const ON_CREATE: &str = "https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-create2";

/// `R`: read caching.
pub const R: u32 = OPLOCK_LEVEL_CACHE_READ;
/// `RH`: read and handle caching.
pub const RH: u32 = OPLOCK_LEVEL_CACHE_READ | OPLOCK_LEVEL_CACHE_HANDLE;
/// `RW`: read and write caching.
pub const RW: u32 = OPLOCK_LEVEL_CACHE_READ | OPLOCK_LEVEL_CACHE_WRITE;
/// `RWH`: read, write and handle caching.
pub const RWH: u32 = OPLOCK_LEVEL_CACHE_READ | OPLOCK_LEVEL_CACHE_WRITE | OPLOCK_LEVEL_CACHE_HANDLE;

/// An oplock's type: a legacy one, or a Windows 7 one given by its caching flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// `FSCTL_REQUEST_OPLOCK_LEVEL_1`: exclusive.
    Level1,
    /// `FSCTL_REQUEST_BATCH_OPLOCK`: exclusive, caches the handle.
    Batch,
    /// `FSCTL_REQUEST_FILTER_OPLOCK`: exclusive, lets readers in.
    Filter,
    /// `FSCTL_REQUEST_OPLOCK_LEVEL_2`: shared read caching.
    Level2,
    /// `FSCTL_REQUEST_OPLOCK` with these `OPLOCK_LEVEL_CACHE_*` flags (R, RH, RW or RWH).
    Caching(u32),
}

impl Level {
    fn legacy(self) -> bool {
        !matches!(self, Self::Caching(_))
    }

    /// Level 1, Batch, Filter, RW and RWH: only one handle may hold them.
    fn exclusive(self) -> bool {
        match self {
            Self::Level1 | Self::Batch | Self::Filter => true,
            Self::Level2 => false,
            Self::Caching(flags) => flags & OPLOCK_LEVEL_CACHE_WRITE != 0,
        }
    }

    /// The caching flags the level stands for (what a Windows 7 break reports as its original level).
    fn flags(self) -> u32 {
        match self {
            Self::Level1 => RW,
            Self::Batch | Self::Filter => RWH,
            Self::Level2 => R,
            Self::Caching(flags) => flags,
        }
    }

    /// Whether a break of this level needs the owner's acknowledgement: every legacy level but Level 2, and a
    /// Windows 7 level that loses write or handle caching (only R breaks without one).
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/breaking-oplocks>.
    fn break_needs_ack(self) -> bool {
        match self {
            Self::Level2 => false,
            Self::Caching(flags) => flags & (OPLOCK_LEVEL_CACHE_WRITE | OPLOCK_LEVEL_CACHE_HANDLE) != 0,
            _ => true,
        }
    }
}

/// How a pending oplock FSCTL completed: its status, `IoStatus.Information` and output bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The final status.
    pub status: NTSTATUS,
    /// `IoStatus.Information`: for a legacy break, `FILE_OPLOCK_BROKEN_TO_LEVEL_2` or `FILE_OPLOCK_BROKEN_TO_NONE`;
    /// otherwise the length of `output`.
    pub information: usize,
    /// The output buffer's bytes (a `REQUEST_OPLOCK_OUTPUT_BUFFER` for a Windows 7 request).
    pub output: Vec<u8>,
}

/// The completion of one pending oplock FSCTL, which the model's thread for that FSCTL waits for.
#[derive(Default)]
pub struct Slot {
    state: Mutex<SlotState>,
    changed: Condvar,
}

#[derive(Default)]
struct SlotState {
    outcome: Option<Outcome>,
    /// The FSCTL's thread has completed the request and run its post-operation callbacks.
    finished: bool,
}

thread_local! {
    /// Slots this thread completed, whose FSCTLs it waits to see finished once it has let go of the package's lock.
    static COMPLETED: std::cell::RefCell<Vec<Arc<Slot>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Completes the pending FSCTL of `slot` with `outcome` (the first completion wins). The request's completion
/// processing (post-operation callbacks) runs on its own thread; [`await_completions`] waits for it, as the
/// completing operation on Windows returns only after `IoCompleteRequest` ran the completion routines.
fn complete(slot: &Arc<Slot>, outcome: Outcome) {
    let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
    if state.outcome.is_none() {
        state.outcome = Some(outcome);
        COMPLETED.with_borrow_mut(|c| c.push(Arc::clone(slot)));
    }
    slot.changed.notify_all();
}

/// Waits until the FSCTLs this thread completed have finished their completion processing. Call without holding
/// the package's lock.
fn await_completions() {
    for slot in COMPLETED.with_borrow_mut(std::mem::take) {
        let mut state = slot.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !state.finished {
            state = slot.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Slot {
    /// Blocks until the request completes. Only the model's own thread for the FSCTL waits here; a test waits
    /// through [`super::fsctl::PendingFsControl::wait`], which applies the deadlock rule.
    pub(crate) fn wait(&self) -> Outcome {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(outcome) = state.outcome.clone() {
                return outcome;
            }
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The FSCTL's thread has finished the request (called even when it failed), which lets the completer go on.
    pub(crate) fn finish(&self) {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).finished = true;
        self.changed.notify_all();
    }
}

/// A break in progress, waiting for the owner's acknowledgement.
#[derive(Clone, Copy, Debug)]
struct Breaking {
    /// The level the oplock breaks to (`None`: to none).
    to: Option<Level>,
    /// `FSCTL_OPBATCH_ACK_CLOSE_PENDING` came: waiters keep waiting until the handle is closed.
    close_pending: bool,
}

struct Grant {
    open: OpenId,
    level: Level,
    /// The pending request that holds the oplock; `None` once a break completed it.
    request: Option<Arc<Slot>>,
    breaking: Option<Breaking>,
    /// The thread that asked for the oplock: the one expected to acknowledge its breaks.
    owner: ThreadId,
}

#[derive(Default)]
struct StreamOplocks {
    grants: Vec<Grant>,
    /// `FILE_OPEN_REQUIRING_OPLOCK`: this open must request an oplock before anyone else gets in, and the thread
    /// that opened it.
    required: Option<(OpenId, ThreadId)>,
    /// `FSCTL_OPLOCK_BREAK_NOTIFY` requests waiting for the breaks in progress to end.
    notify: Vec<Arc<Slot>>,
}

impl StreamOplocks {
    fn break_in_progress(&self) -> bool {
        self.grants.iter().any(|g| g.breaking.is_some())
    }
}

static STATE: Mutex<BTreeMap<StreamId, StreamOplocks>> = Mutex::new(BTreeMap::new());
/// Signalled whenever an oplock is acknowledged, released or broken.
static CHANGED: Condvar = Condvar::new();

fn state() -> MutexGuard<'static, BTreeMap<StreamId, StreamOplocks>> {
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a request for an oplock knows about the handle it is made on.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Requester {
    pub(crate) open: OpenId,
    pub(crate) stream: StreamId,
    /// `FO_SYNCHRONOUS_IO`.
    pub(crate) synchronous: bool,
    pub(crate) directory: bool,
    /// Other opens of the stream that still have their handle.
    pub(crate) other_opens: usize,
    /// Whether the stream has byte-range locks now.
    pub(crate) byte_range_locks: bool,
    /// The thread that issued the FSCTL.
    pub(crate) thread: ThreadId,
}

/// The file system's answer to an oplock FSCTL.
pub(crate) enum Answer {
    /// Completed at once.
    Done(Outcome),
    /// Granted (or an acknowledgement that became the new oplock's request): pending until the slot completes.
    Pending(Arc<Slot>),
}

fn done(status: NTSTATUS) -> Answer {
    Answer::Done(Outcome { status, information: 0, output: Vec::new() })
}

/// A `REQUEST_OPLOCK_OUTPUT_BUFFER` describing a break from `original` to `new`, as bytes.
pub(crate) fn output_buffer(original: u32, new: u32, ack_required: bool) -> Vec<u8> {
    let size = size_of::<REQUEST_OPLOCK_OUTPUT_BUFFER>();
    let mut bytes = Vec::with_capacity(size);
    let version = u16::try_from(REQUEST_OPLOCK_CURRENT_VERSION).unwrap_or(1);
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&u16::try_from(size).unwrap_or(u16::MAX).to_le_bytes());
    bytes.extend_from_slice(&original.to_le_bytes());
    bytes.extend_from_slice(&new.to_le_bytes());
    let flags = if ack_required { REQUEST_OPLOCK_OUTPUT_FLAG_ACK_REQUIRED } else { 0 };
    bytes.extend_from_slice(&flags.to_le_bytes());
    // AccessMode and ShareMode: REQUEST_OPLOCK_OUTPUT_FLAG_MODES_PROVIDED is never set.
    bytes.resize(size, 0);
    bytes
}

/// What completing `grant`'s request tells its owner about a break to `to`.
fn break_outcome(level: Level, to: Option<Level>, ack_required: bool) -> Outcome {
    if level.legacy() {
        let information =
            if to == Some(Level::Level2) { FILE_OPLOCK_BROKEN_TO_LEVEL_2 } else { FILE_OPLOCK_BROKEN_TO_NONE };
        return Outcome { status: STATUS_SUCCESS, information: information as usize, output: Vec::new() };
    }
    let output = output_buffer(level.flags(), to.map_or(0, Level::flags), ack_required);
    Outcome { status: STATUS_SUCCESS, information: output.len(), output }
}

/// Starts breaking `grant` to `to`: its pending request completes. A break that needs no acknowledgement takes
/// effect at once (returns true: remove the grant when `to` is none); otherwise the grant stays in force, breaking,
/// until it is acknowledged or its handle is closed.
fn start_break(grant: &mut Grant, to: Option<Level>) -> bool {
    let ack = grant.level.break_needs_ack();
    if let Some(request) = grant.request.take() {
        complete(&request, break_outcome(grant.level, to, ack));
    }
    if ack {
        grant.breaking = Some(Breaking { to, close_pending: false });
        false
    } else {
        match to {
            Some(level) => {
                grant.level = level;
                false
            }
            None => true,
        }
    }
}

/// Completes the `FSCTL_OPLOCK_BREAK_NOTIFY` requests of a stream whose breaks have all ended.
fn settle(stream: &mut StreamOplocks) {
    if !stream.break_in_progress() {
        for slot in stream.notify.drain(..) {
            complete(&slot, Outcome { status: STATUS_SUCCESS, information: 0, output: Vec::new() });
        }
    }
}

/// Handles a legacy oplock request (`FSCTL_REQUEST_OPLOCK_LEVEL_1`, `_LEVEL_2`, `FSCTL_REQUEST_BATCH_OPLOCK`,
/// `FSCTL_REQUEST_FILTER_OPLOCK`) as "Granting Oplocks" states it: a directory is `STATUS_INVALID_PARAMETER`; a
/// synchronous handle, another open of the stream (for the exclusive types), byte-range locks (for Level 2) or an
/// incompatible oplock is `STATUS_OPLOCK_NOT_GRANTED`; an exclusive request on a handle that holds Level 2 oplocks
/// breaks them to none first. Stricter than the page, which does not say: any request while a break is in progress
/// on the stream is refused.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/granting-oplocks>.
pub(crate) fn request_legacy(who: &Requester, level: Level) -> Answer {
    let answer = request_legacy_locked(who, level);
    await_completions();
    answer
}

fn request_legacy_locked(who: &Requester, level: Level) -> Answer {
    if who.directory {
        return done(STATUS_INVALID_PARAMETER);
    }
    if who.synchronous {
        return done(STATUS_OPLOCK_NOT_GRANTED);
    }
    let mut all = state();
    let stream = all.entry(who.stream).or_default();
    if stream.break_in_progress() {
        return done(STATUS_OPLOCK_NOT_GRANTED);
    }
    if level.exclusive() {
        if who.other_opens > 0 || stream.grants.iter().any(|g| g.open != who.open || g.level != Level::Level2) {
            return done(STATUS_OPLOCK_NOT_GRANTED);
        }
        // The handle's own Level 2 oplocks break to none, then the exclusive one is granted.
        for grant in &mut stream.grants {
            start_break(grant, None);
        }
        stream.grants.clear();
    } else {
        let compatible = |g: &Grant| matches!(g.level, Level::Level2 | Level::Caching(R));
        if who.byte_range_locks || !stream.grants.iter().all(compatible) {
            return done(STATUS_OPLOCK_NOT_GRANTED);
        }
    }
    grant(stream, who, level)
}

fn grant(stream: &mut StreamOplocks, who: &Requester, level: Level) -> Answer {
    let slot = Arc::new(Slot::default());
    stream.grants.push(Grant {
        open: who.open,
        level,
        request: Some(Arc::clone(&slot)),
        breaking: None,
        owner: who.thread,
    });
    if stream.required.is_some_and(|(open, _)| open == who.open) {
        stream.required = None;
    }
    CHANGED.notify_all();
    Answer::Pending(slot)
}

/// Handles a Windows 7 request (`FSCTL_REQUEST_OPLOCK` with `REQUEST_OPLOCK_INPUT_FLAG_REQUEST`) for `level` (R,
/// RH, RW or RWH, checked by the caller), as "Granting Oplocks" states it. A directory is `STATUS_INVALID_PARAMETER`
/// for RW and RWH; R and RH on a directory (granted from Windows 8 on, broken by changes to the directory's
/// contents) are not modelled: reported as `unsupported-by-model` and not granted. A synchronous handle is
/// `STATUS_OPLOCK_NOT_GRANTED`; R and RH need a stream without byte-range locks, RW and RWH a stream without other
/// opens. An oplock of the same key (the same handle) that the new one may replace completes with
/// `STATUS_OPLOCK_SWITCHED_TO_NEW_HANDLE`. Stricter than the page, which does not say: any request while a break is
/// in progress on the stream is refused, and an RH request on a handle that holds RH replaces it as for R.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/granting-oplocks> and
/// <https://learn.microsoft.com/windows/win32/api/winioctl/ni-winioctl-fsctl_request_oplock>.
pub(crate) fn request_caching(who: &Requester, level: u32) -> Answer {
    let answer = request_caching_locked(who, level);
    await_completions();
    answer
}

fn request_caching_locked(who: &Requester, level: u32) -> Answer {
    if who.directory {
        if level & OPLOCK_LEVEL_CACHE_WRITE != 0 {
            return done(STATUS_INVALID_PARAMETER);
        }
        verifier::report(
            Rule::UnsupportedByModel,
            "FSCTL_REQUEST_OPLOCK",
            "an R or RH oplock on a directory (Windows 8 and later) is not modelled; not granted",
        );
        return done(STATUS_OPLOCK_NOT_GRANTED);
    }
    if who.synchronous {
        return done(STATUS_OPLOCK_NOT_GRANTED);
    }
    let mut all = state();
    let stream = all.entry(who.stream).or_default();
    if stream.break_in_progress() {
        return done(STATUS_OPLOCK_NOT_GRANTED);
    }
    let same_key = |g: &Grant| g.open == who.open;
    let replaceable: &dyn Fn(&Grant) -> bool = match level {
        R => &|g: &Grant| same_key(g) && g.level == Level::Caching(R),
        RH => &|g: &Grant| same_key(g) && matches!(g.level, Level::Caching(R | RH)),
        RW => &|g: &Grant| same_key(g) && matches!(g.level, Level::Caching(R | RW)),
        _ => &|g: &Grant| same_key(g) && matches!(g.level, Level::Caching(_)),
    };
    let allowed = |g: &Grant| {
        replaceable(g)
            || match level {
                R => matches!(g.level, Level::Level2 | Level::Caching(R | RH)) && !same_key(g),
                RH => g.level == Level::Caching(R) || (g.level == Level::Caching(RH) && !same_key(g)),
                _ => false,
            }
    };
    let shared = level & OPLOCK_LEVEL_CACHE_WRITE == 0;
    if (shared && who.byte_range_locks) || (!shared && who.other_opens > 0) || !stream.grants.iter().all(allowed) {
        return done(STATUS_OPLOCK_NOT_GRANTED);
    }
    stream.grants.retain(|g| {
        if replaceable(g) {
            if let Some(request) = &g.request {
                let switched =
                    Outcome { status: STATUS_OPLOCK_SWITCHED_TO_NEW_HANDLE, information: 0, output: Vec::new() };
                complete(request, switched);
            }
            false
        } else {
            true
        }
    });
    grant(stream, who, Level::Caching(level))
}

/// The acknowledgement FSCTLs a handle may send for its own oplock's break.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ack {
    /// `FSCTL_OPLOCK_BREAK_ACKNOWLEDGE`: accept the level the oplock broke to.
    Acknowledge,
    /// `FSCTL_OPLOCK_BREAK_ACK_NO_2`: break to none instead of Level 2.
    No2,
    /// `FSCTL_OPBATCH_ACK_CLOSE_PENDING`: the handle is about to be closed.
    ClosePending,
    /// `FSCTL_REQUEST_OPLOCK` with `REQUEST_OPLOCK_INPUT_FLAG_ACK`, keeping these caching flags.
    Caching(u32),
}

/// Acknowledges the break of `who`'s oplock. No break awaiting an acknowledgement on that handle (or a legacy
/// acknowledgement of a Windows 7 oplock, or the reverse: stricter than documented) is
/// `STATUS_INVALID_OPLOCK_PROTOCOL`. Accepting a break to Level 2, or a Windows 7 acknowledgement that keeps a
/// level, makes the acknowledgement the new oplock's pending request. `FSCTL_OPBATCH_ACK_CLOSE_PENDING` relinquishes
/// a Level 1 oplock at once; for Batch and Filter, the operations waiting keep waiting until the handle is closed.
/// A Windows 7 acknowledgement may keep only levels the break left (else `STATUS_INVALID_PARAMETER`, the model's
/// choice: the page does not say).
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/acknowledging-oplock-breaks>.
pub(crate) fn acknowledge(who: &Requester, ack: Ack) -> Answer {
    let mut all = state();
    let stream = all.entry(who.stream).or_default();
    let Some(at) = stream.grants.iter().position(|g| g.open == who.open && g.breaking.is_some()) else {
        return done(STATUS_INVALID_OPLOCK_PROTOCOL);
    };
    let Some(grant) = stream.grants.get_mut(at) else { return done(STATUS_INVALID_OPLOCK_PROTOCOL) };
    let Some(breaking) = grant.breaking else { return done(STATUS_INVALID_OPLOCK_PROTOCOL) };
    if grant.level.legacy() == matches!(ack, Ack::Caching(_)) {
        return done(STATUS_INVALID_OPLOCK_PROTOCOL);
    }
    let keep = match ack {
        Ack::Acknowledge => breaking.to,
        Ack::ClosePending if grant.level != Level::Level1 => {
            grant.breaking = Some(Breaking { close_pending: true, ..breaking });
            return done(STATUS_SUCCESS);
        }
        Ack::No2 | Ack::ClosePending | Ack::Caching(0) => None,
        Ack::Caching(flags) => {
            if flags & !breaking.to.map_or(0, Level::flags) != 0 {
                return done(STATUS_INVALID_PARAMETER);
            }
            Some(Level::Caching(flags))
        }
    };
    let answer = if let Some(level) = keep {
        let slot = Arc::new(Slot::default());
        grant.level = level;
        grant.breaking = None;
        grant.request = Some(Arc::clone(&slot));
        Answer::Pending(slot)
    } else {
        stream.grants.remove(at);
        done(STATUS_SUCCESS)
    };
    settle(stream);
    drop(all);
    CHANGED.notify_all();
    await_completions();
    answer
}

/// `FSCTL_OPLOCK_BREAK_NOTIFY`: `STATUS_SUCCESS` at once when no break is in progress on the stream, otherwise
/// pending until every break in progress has ended.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/acknowledging-oplock-breaks>.
pub(crate) fn break_notify(who: &Requester) -> Answer {
    let mut all = state();
    let stream = all.entry(who.stream).or_default();
    if !stream.break_in_progress() {
        return done(STATUS_SUCCESS);
    }
    let slot = Arc::new(Slot::default());
    stream.notify.push(Arc::clone(&slot));
    Answer::Pending(slot)
}

/// `IRP_MJ_CLEANUP` of `open`: its oplocks break to none without an acknowledgement (their pending requests
/// complete), and operations waiting for its acknowledgement go on. Other handles' oplocks are not affected.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-cleanup2>.
pub(crate) fn cleanup(open: OpenId) {
    let mut all = state();
    for stream in all.values_mut() {
        stream.grants.retain_mut(|g| {
            if g.open != open {
                return true;
            }
            if let Some(request) = g.request.take() {
                complete(&request, break_outcome(g.level, None, false));
            }
            false
        });
        if stream.required.is_some_and(|(o, _)| o == open) {
            stream.required = None;
        }
        settle(stream);
    }
    drop(all);
    CHANGED.notify_all();
    await_completions();
}

/// What a create asks for, as the oplock package sees it.
#[derive(Clone, Copy, Debug)]
#[expect(clippy::struct_excessive_bools, reason = "one flag per create option the oplock tables name")]
pub(crate) struct CreateCheck {
    pub(crate) desired_access: u32,
    pub(crate) share_access: u32,
    pub(crate) disposition: u32,
    /// `FILE_RESERVE_OPFILTER`.
    pub(crate) reserve_opfilter: bool,
    /// `FILE_COMPLETE_IF_OPLOCKED`.
    pub(crate) complete_if_oplocked: bool,
    /// `FILE_OPEN_REQUIRING_OPLOCK`.
    pub(crate) requiring_oplock: bool,
    /// Whether the open would meet a sharing violation as things stand.
    pub(crate) sharing_violation: bool,
}

/// How a create fared with the stream's oplocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CreateBreak {
    /// Nothing to wait for (no break, or every break it caused was acknowledged).
    Clear,
    /// `FILE_COMPLETE_IF_OPLOCKED`: a break it must otherwise wait for is in progress; the create goes on and
    /// succeeds with `STATUS_OPLOCK_BREAK_IN_PROGRESS`.
    InProgress,
}

/// The level a create breaks `level` to, whether the create waits for the acknowledgement, or `None` when it does
/// not break it, as the create table of "Breaking Oplocks" states it. Every owner has another oplock key than the
/// new file object, and the caller has left out creates asking only for attribute access.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-create2>.
fn create_breaks(level: Level, check: &CreateCheck) -> Option<(Option<Level>, bool)> {
    let overwrite =
        check.reserve_opfilter || matches!(check.disposition, FILE_SUPERSEDE | FILE_OVERWRITE | FILE_OVERWRITE_IF);
    let readonly = FILE_READ_ATTRIBUTES
        | FILE_WRITE_ATTRIBUTES
        | FILE_READ_DATA
        | FILE_READ_EA
        | FILE_EXECUTE
        | SYNCHRONIZE
        | READ_CONTROL;
    let to_r = |other: Option<Level>| if overwrite { None } else { other };
    match level {
        Level::Level1 | Level::Batch => Some((to_r(Some(Level::Level2)), true)),
        Level::Filter => {
            let writable = check.desired_access & !readonly != 0;
            (writable && check.share_access & FILE_SHARE_READ == 0).then_some((None, true))
        }
        Level::Level2 | Level::Caching(R) => overwrite.then_some((None, false)),
        Level::Caching(RH) => {
            (check.sharing_violation || overwrite).then_some((to_r(Some(Level::Caching(R))), check.sharing_violation))
        }
        Level::Caching(RW) => Some((to_r(Some(Level::Caching(R))), true)),
        Level::Caching(_) => {
            let to = if check.sharing_violation { Level::Caching(RW) } else { Level::Caching(RH) };
            Some((to_r(Some(to)), true))
        }
    }
}

/// A create is about to open an existing stream: breaks the oplocks it must break and waits for the
/// acknowledgements the table requires, unless `FILE_COMPLETE_IF_OPLOCKED` (then [`CreateBreak::InProgress`]).
/// `FILE_OPEN_REQUIRING_OPLOCK` fails with `STATUS_CANNOT_BREAK_OPLOCK`, breaking nothing, when the create would
/// break an oplock or wait for a break in progress. A create asking only for `FILE_READ_ATTRIBUTES`,
/// `FILE_WRITE_ATTRIBUTES` or `SYNCHRONIZE` breaks nothing unless `FILE_RESERVE_OPFILTER`. While an open made with
/// `FILE_OPEN_REQUIRING_OPLOCK` has not requested its oplock, other creates of the stream wait (`NtCreateFile`: they
/// "will be blocked").
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-create2>,
/// <https://learn.microsoft.com/windows-hardware/drivers/ifs/breaking-oplocks> and
/// <https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-ntcreatefile>.
///
/// # Errors
/// `STATUS_CANNOT_BREAK_OPLOCK`.
pub(crate) fn before_create(stream_id: StreamId, check: &CreateCheck) -> Result<CreateBreak, NTSTATUS> {
    const API: &str = "IRP_MJ_CREATE";
    wait_for_required_oplock(stream_id);
    let attributes_only = check.desired_access & !(FILE_READ_ATTRIBUTES | FILE_WRITE_ATTRIBUTES | SYNCHRONIZE) == 0;
    if attributes_only && !check.reserve_opfilter {
        return Ok(CreateBreak::Clear);
    }
    let mut all = state();
    let Some(stream) = all.get_mut(&stream_id) else { return Ok(CreateBreak::Clear) };
    let breaks: Vec<(usize, Option<Level>, bool)> = stream
        .grants
        .iter()
        .enumerate()
        .filter(|(_, g)| g.breaking.is_none())
        .filter_map(|(at, g)| create_breaks(g.level, check).map(|(to, wait)| (at, to, wait)))
        .collect();
    // A break already in progress that this create would break again is waited for too.
    let mut waited: Vec<OpenId> = stream
        .grants
        .iter()
        .filter(|g| g.breaking.is_some() && create_breaks(g.level, check).is_some_and(|(_, wait)| wait))
        .map(|g| g.open)
        .collect();
    if check.requiring_oplock && (!breaks.is_empty() || !waited.is_empty()) {
        return Err(STATUS_CANNOT_BREAK_OPLOCK);
    }
    let mut gone = Vec::new();
    for &(at, to, wait) in &breaks {
        if let Some(grant) = stream.grants.get_mut(at) {
            let open = grant.open;
            if start_break(grant, to) {
                gone.push(at);
            } else if wait && grant.breaking.is_some() {
                waited.push(open);
            }
        }
    }
    for at in gone.into_iter().rev() {
        stream.grants.remove(at);
    }
    settle(stream);
    drop(all);
    CHANGED.notify_all();
    await_completions();
    if waited.is_empty() {
        return Ok(CreateBreak::Clear);
    }
    if check.complete_if_oplocked {
        return Ok(CreateBreak::InProgress);
    }
    wait_for_acknowledgements(API, stream_id, &waited, ON_CREATE);
    Ok(CreateBreak::Clear)
}

/// The file system's oplock step of a create of `path` on `volume` with the parameters the filters left
/// ([`before_create`]); a create of a stream that does not exist yet meets no oplock.
///
/// # Errors
/// `STATUS_CANNOT_BREAK_OPLOCK` for `FILE_OPEN_REQUIRING_OPLOCK`.
pub(crate) fn gate_create(
    volume: &super::Volume,
    path: &str,
    params: &super::fs::CreateParams,
) -> Result<CreateBreak, NTSTATUS> {
    if params.open_target_directory {
        return Ok(CreateBreak::Clear);
    }
    let Some((stream, sharing_violation)) =
        super::fs::peek_stream(volume, path, params.case_sensitive, params.desired_access, params.share_access)
    else {
        return Ok(CreateBreak::Clear);
    };
    let check = CreateCheck {
        desired_access: params.desired_access,
        share_access: params.share_access,
        disposition: params.disposition,
        reserve_opfilter: params.options & FILE_RESERVE_OPFILTER != 0,
        complete_if_oplocked: params.options & FILE_COMPLETE_IF_OPLOCKED != 0,
        requiring_oplock: params.options & FILE_OPEN_REQUIRING_OPLOCK != 0,
        sharing_violation,
    };
    before_create(stream, &check)
}

/// The oplock step of `IRP_MJ_SET_INFORMATION` of `class` with `data` on `open`: renames, and a delete
/// disposition set to TRUE, break handle caching of other keys (a size change breaks through
/// [`super::fs::set_end_of_file`]). A link that supersedes another file's link, and renames of an ancestor
/// directory, are not modelled.
/// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-set-information2>.
pub(crate) fn before_set_information(open: OpenId, class: i32, data: &[u8]) {
    use windows_sys::Wdk::Storage::FileSystem::{FileDispositionInformation, FileRenameInformation};
    if class == FileRenameInformation {
        before_operation(open, Operation::Rename);
    } else if class == FileDispositionInformation && data.first().is_some_and(|b| *b != 0) {
        before_operation(open, Operation::Delete);
    }
}

/// Records that `open` was created with `FILE_OPEN_REQUIRING_OPLOCK`: other creates of the stream wait until it
/// requests an oplock or its handle is closed.
pub(crate) fn require_oplock(stream: StreamId, open: OpenId) {
    state().entry(stream).or_default().required = Some((open, std::thread::current().id()));
}

fn wait_for_required_oplock(stream_id: StreamId) {
    const NTCREATEFILE: &str = "https://learn.microsoft.com/windows-hardware/drivers/ddi/ntifs/nf-ntifs-ntcreatefile";
    let mut all = state();
    loop {
        let Some((open, owner)) = all.get(&stream_id).and_then(|s| s.required) else { return };
        if nobody_else_can_act(owner) {
            if let Some(stream) = all.get_mut(&stream_id) {
                stream.required = None;
            }
            drop(all);
            verifier::report(
                Rule::OplockBreakDeadlock,
                "IRP_MJ_CREATE",
                format!(
                    "the stream was opened with FILE_OPEN_REQUIRING_OPLOCK (open {open:?}) and no oplock was \
                     requested on it: this create would block forever, and only this thread could request it \
                     ({NTCREATEFILE})"
                ),
            );
            return;
        }
        all = CHANGED.wait_timeout(all, Duration::from_millis(5)).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// An operation other than a create on `open`'s stream: which oplocks of other keys it breaks and to what, and
/// which breaks it waits for, per the pages of "Breaking Oplocks".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Operation {
    /// `IRP_MJ_WRITE` (not paging I/O). See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-write2>.
    Write,
    /// `FileEndOfFileInformation` / `FileAllocationInformation`.
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-set-information2>.
    SetSize,
    /// Any `IRP_MJ_LOCK_CONTROL`. See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-lock-control2>.
    Lock,
    /// `FileRenameInformation` / `FileLinkInformation` of the stream's file.
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-set-information2>.
    Rename,
    /// `FileDispositionInformation` with `DeleteFile` TRUE.
    /// See <https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-set-information2>.
    Delete,
}

impl Operation {
    fn docs(self) -> &'static str {
        match self {
            Self::Write => "https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-write2",
            Self::Lock => "https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-lock-control2",
            Self::SetSize | Self::Rename | Self::Delete => {
                "https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-set-information2"
            }
        }
    }

    /// The break of an oplock at `level` held through another key (or any Level 2, which writes, size changes and
    /// locks break whoever holds it): the level it breaks to and whether the operation waits.
    fn breaks(self, level: Level, same_key: bool) -> Option<(Option<Level>, bool)> {
        match self {
            Self::Write | Self::SetSize | Self::Lock => match level {
                Level::Level2 => Some((None, false)),
                _ if same_key => None,
                Level::Filter if self == Self::Lock => None,
                Level::Caching(R | RH) => Some((None, false)),
                _ => Some((None, true)),
            },
            Self::Rename | Self::Delete if same_key => None,
            Self::Rename => match level {
                Level::Batch | Level::Filter => Some((None, true)),
                Level::Caching(RH) => Some((Some(Level::Caching(R)), true)),
                Level::Caching(RWH) => Some((Some(Level::Caching(RW)), true)),
                _ => None,
            },
            Self::Delete => match level {
                Level::Caching(RH) => Some((Some(Level::Caching(R)), true)),
                Level::Caching(RWH) => Some((Some(Level::Caching(RW)), true)),
                _ => None,
            },
        }
    }
}

/// `operation` on `open` is about to reach the stream: breaks what it breaks and waits for the acknowledgements
/// its page requires (a Read-Handle break on a write, a size change or a lock is owed but not waited for).
pub(crate) fn before_operation(open: OpenId, operation: Operation) {
    let Some(stream_id) = super::fs::stream_of(open) else { return };
    let mut all = state();
    let Some(stream) = all.get_mut(&stream_id) else { return };
    let mut waited = Vec::new();
    let mut gone = Vec::new();
    for (at, grant) in stream.grants.iter_mut().enumerate() {
        if grant.breaking.is_some() {
            if grant.open != open && operation.breaks(grant.level, false).is_some_and(|(_, wait)| wait) {
                waited.push(grant.open);
            }
            continue;
        }
        let Some((to, wait)) = operation.breaks(grant.level, grant.open == open) else { continue };
        if start_break(grant, to) {
            gone.push(at);
        } else if wait && grant.breaking.is_some() {
            waited.push(grant.open);
        }
    }
    for at in gone.into_iter().rev() {
        stream.grants.remove(at);
    }
    settle(stream);
    drop(all);
    CHANGED.notify_all();
    await_completions();
    if !waited.is_empty() {
        wait_for_acknowledgements("oplock break", stream_id, &waited, operation.docs());
    }
}

/// Whether a thread waiting for something only `owner` (or a helper thread) can do would wait forever: the waiting
/// thread is `owner` itself, and no system worker and no [`thread::spawn`]ed thread other than it is left.
pub(crate) fn nobody_else_can_act(owner: ThreadId) -> bool {
    owner == std::thread::current().id() && work::outstanding_elsewhere() == 0 && thread::other_spawned_threads() == 0
}

/// Blocks until the breaks of the oplocks `owners` hold on `stream_id` are acknowledged (or their handles closed).
/// When the only thread that could acknowledge is this one, reports [`Rule::OplockBreakDeadlock`] and treats the
/// breaks as acknowledged, instead of hanging.
fn wait_for_acknowledgements(api: &'static str, stream_id: StreamId, owners: &[OpenId], docs: &'static str) {
    let mut all = state();
    loop {
        let pending: Vec<ThreadId> = all.get(&stream_id).map_or_else(Vec::new, |s| {
            s.grants.iter().filter(|g| g.breaking.is_some() && owners.contains(&g.open)).map(|g| g.owner).collect()
        });
        if pending.is_empty() {
            return;
        }
        if pending.iter().all(|owner| nobody_else_can_act(*owner)) {
            if let Some(stream) = all.get_mut(&stream_id) {
                // As if acknowledged to the level the break announced.
                stream.grants.retain_mut(|g| match g.breaking.take() {
                    Some(Breaking { to: Some(level), close_pending: false }) if owners.contains(&g.open) => {
                        g.level = level;
                        true
                    }
                    Some(_) if owners.contains(&g.open) => false,
                    other => {
                        g.breaking = other;
                        true
                    }
                });
                settle(stream);
            }
            drop(all);
            CHANGED.notify_all();
            await_completions();
            verifier::report(
                Rule::OplockBreakDeadlock,
                api,
                format!(
                    "waits for an oplock break acknowledgement that only this thread could send (the oplock's owner) \
                     and no other thread is left to send it: the operation would wait forever ({docs}); the model \
                     goes on as if the break was acknowledged"
                ),
            );
            return;
        }
        all = CHANGED.wait_timeout(all, Duration::from_millis(5)).unwrap_or_else(PoisonError::into_inner).0;
    }
}

/// The oplocks on `stream` now, for tests: each holder's open, level and whether a break of it is in progress.
#[must_use]
pub fn oplocks_of(stream: StreamId) -> Vec<(OpenId, Level, bool)> {
    state()
        .get(&stream)
        .map_or_else(Vec::new, |s| s.grants.iter().map(|g| (g.open, g.level, g.breaking.is_some())).collect())
}

/// Checks a Windows 7 request or acknowledgement level: R, RH, RW or RWH (and nothing else) for a request.
/// See <https://learn.microsoft.com/windows/win32/api/winioctl/ns-winioctl-request_oplock_input_buffer>.
#[must_use]
pub(crate) fn valid_request_level(level: u32) -> bool {
    matches!(level, R | RH | RW | RWH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(disposition: u32, sharing_violation: bool) -> CreateCheck {
        CreateCheck {
            desired_access: FILE_READ_DATA,
            share_access: FILE_SHARE_READ,
            disposition,
            reserve_opfilter: false,
            complete_if_oplocked: false,
            requiring_oplock: false,
            sharing_violation,
        }
    }

    #[test]
    fn the_create_table_breaks_each_level_as_documented() {
        let open = check(windows_sys::Wdk::Storage::FileSystem::FILE_OPEN, false);
        let overwrite = check(FILE_OVERWRITE_IF, false);
        let conflict = check(windows_sys::Wdk::Storage::FileSystem::FILE_OPEN, true);
        assert_eq!(create_breaks(Level::Level1, &open), Some((Some(Level::Level2), true)));
        assert_eq!(create_breaks(Level::Batch, &overwrite), Some((None, true)));
        assert_eq!(create_breaks(Level::Filter, &open), None, "a reader that shares read leaves a filter oplock");
        assert_eq!(create_breaks(Level::Level2, &open), None);
        assert_eq!(create_breaks(Level::Level2, &overwrite), Some((None, false)));
        assert_eq!(create_breaks(Level::Caching(R), &open), None);
        assert_eq!(create_breaks(Level::Caching(RH), &open), None);
        assert_eq!(create_breaks(Level::Caching(RH), &conflict), Some((Some(Level::Caching(R)), true)));
        assert_eq!(create_breaks(Level::Caching(RH), &overwrite), Some((None, false)));
        assert_eq!(create_breaks(Level::Caching(RW), &open), Some((Some(Level::Caching(R)), true)));
        assert_eq!(create_breaks(Level::Caching(RWH), &open), Some((Some(Level::Caching(RH)), true)));
        assert_eq!(create_breaks(Level::Caching(RWH), &conflict), Some((Some(Level::Caching(RW)), true)));
        let writer = CreateCheck {
            desired_access: windows_sys::Win32::Storage::FileSystem::FILE_WRITE_DATA,
            share_access: 0,
            ..open
        };
        assert_eq!(create_breaks(Level::Filter, &writer), Some((None, true)));
    }

    #[test]
    fn acknowledgements_are_owed_for_write_and_handle_caching_only() {
        assert!(Level::Level1.break_needs_ack());
        assert!(Level::Filter.break_needs_ack());
        assert!(!Level::Level2.break_needs_ack());
        assert!(!Level::Caching(R).break_needs_ack());
        assert!(Level::Caching(RH).break_needs_ack());
        assert!(Level::Caching(RW).break_needs_ack());
    }

    #[test]
    fn the_output_buffer_has_the_structures_layout() {
        let bytes = output_buffer(RWH, RH, true);
        assert_eq!(bytes.len(), size_of::<REQUEST_OPLOCK_OUTPUT_BUFFER>());
        assert_eq!(&bytes[0..2], &1u16.to_le_bytes());
        assert_eq!(&bytes[4..8], &RWH.to_le_bytes());
        assert_eq!(&bytes[8..12], &RH.to_le_bytes());
        assert_eq!(&bytes[12..16], &REQUEST_OPLOCK_OUTPUT_FLAG_ACK_REQUIRED.to_le_bytes());
        assert!(!valid_request_level(OPLOCK_LEVEL_CACHE_WRITE));
        assert!(!valid_request_level(OPLOCK_LEVEL_CACHE_HANDLE));
        assert!(valid_request_level(RWH));
    }
}
