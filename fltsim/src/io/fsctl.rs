//! File-system controls as a program issues them (`NtFsControlFile`): `IRP_MJ_FILE_SYSTEM_CONTROL` /
//! `IRP_MN_USER_FS_REQUEST` through the filters of the file's volume, then the model file system, which answers the
//! oplock FSCTLs ([`super::oplock`]) and `FSCTL_IS_VOLUME_MOUNTED`, and `STATUS_INVALID_DEVICE_REQUEST` for every
//! other code.
//!
//! Filter Manager fills `Parameters.FileSystemControl` by the code's transfer method
//! (<https://learn.microsoft.com/windows-hardware/drivers/ifs/flt-parameters-for-irp-mj-file-system-control>):
//! `METHOD_BUFFERED` (every oplock FSCTL) gets `Buffered.SystemBuffer`, one buffer of the larger of the two lengths
//! holding the input on the way down and the output on the way up; `METHOD_IN_DIRECT` / `METHOD_OUT_DIRECT` get
//! `Direct.InputSystemBuffer` and `Direct.OutputBuffer` (the model builds no MDL: `OutputMdlAddress` is NULL); and
//! `METHOD_NEITHER` gets the caller's `Neither.InputBuffer` and `Neither.OutputBuffer`. The file system reads the
//! lengths and the code as the filters left them, and the data from the buffers the model allocated.
//!
//! A granted oplock request stays pending until the oplock breaks. So every FSCTL runs on a thread of its own that
//! takes on the caller's thread state and process ([`crate::kernel::thread::as_thread`]): pre-operation callbacks see
//! the caller's context; a request that pends is completed, and its post-operation callbacks run, on that thread
//! when the oplock breaks, before the operation that broke it goes on.

use std::{
    sync::{Arc, Condvar, Mutex, PoisonError},
    thread::ThreadId,
    time::Duration,
};

use windows_sys::{
    Wdk::System::SystemServices::{IRP_MJ_FILE_SYSTEM_CONTROL, IRP_MN_USER_FS_REQUEST},
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_BUFFER_TOO_SMALL, STATUS_FILE_CLOSED, STATUS_INTERNAL_ERROR,
            STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
        },
        System::Ioctl::{
            FSCTL_IS_VOLUME_MOUNTED, FSCTL_OPBATCH_ACK_CLOSE_PENDING, FSCTL_OPLOCK_BREAK_ACK_NO_2,
            FSCTL_OPLOCK_BREAK_ACKNOWLEDGE, FSCTL_OPLOCK_BREAK_NOTIFY, FSCTL_REQUEST_BATCH_OPLOCK,
            FSCTL_REQUEST_FILTER_OPLOCK, FSCTL_REQUEST_OPLOCK, FSCTL_REQUEST_OPLOCK_LEVEL_1,
            FSCTL_REQUEST_OPLOCK_LEVEL_2, METHOD_BUFFERED, METHOD_NEITHER, REQUEST_OPLOCK_CURRENT_VERSION,
            REQUEST_OPLOCK_INPUT_BUFFER, REQUEST_OPLOCK_INPUT_FLAG_ACK,
            REQUEST_OPLOCK_INPUT_FLAG_COMPLETE_ACK_ON_CLOSE, REQUEST_OPLOCK_INPUT_FLAG_REQUEST,
            REQUEST_OPLOCK_OUTPUT_BUFFER,
        },
    },
};

use super::{
    fs,
    iomgr::{self, Handle},
    oplock::{self, Ack, Answer, Level, Outcome, Requester},
};
use crate::{
    fltmgr::dispatch::{Request, dispatch},
    guard::guarded,
    kernel::{process, thread},
    verifier::{self, Rule},
};

/// A completed file-system control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsControlResult {
    /// The final status (a success or informational status; failures are `Err`).
    pub status: NTSTATUS,
    /// `IoStatus.Information`: the output's length, or for a legacy oplock break `FILE_OPLOCK_BROKEN_TO_LEVEL_2` /
    /// `FILE_OPLOCK_BROKEN_TO_NONE`.
    pub information: usize,
    /// The output buffer as the caller receives it.
    pub output: Vec<u8>,
}

/// What [`fs_control_async`] came to when it returned.
#[derive(Debug)]
pub enum FsControl {
    /// The request completed at once.
    Completed(FsControlResult),
    /// The request pends (`STATUS_PENDING`): a granted oplock, until it breaks, or a break notification.
    Pending(PendingFsControl),
}

enum Phase {
    Running,
    Pended,
    Done(Result<FsControlResult, NTSTATUS>),
}

struct Shared {
    phase: Mutex<Phase>,
    changed: Condvar,
    /// The oplock package's completion the request pended on, finished once the result is published.
    slot: Mutex<Option<Arc<oplock::Slot>>>,
}

impl Shared {
    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
        self.changed.notify_all();
    }
}

/// A file-system control that pends, such as a granted oplock request. Dropping it leaves the request pending, as
/// a program that never looks at its `OVERLAPPED` leaves the IRP pending.
pub struct PendingFsControl {
    shared: Arc<Shared>,
    /// The thread that issued the request: the one expected to wait for it.
    requester: ThreadId,
}

impl std::fmt::Debug for PendingFsControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingFsControl").field("complete", &self.result().is_some()).finish()
    }
}

impl PendingFsControl {
    /// The request's result once it has completed (its completion processing included), without waiting.
    #[must_use]
    pub fn result(&self) -> Option<Result<FsControlResult, NTSTATUS>> {
        match &*self.shared.phase.lock().unwrap_or_else(PoisonError::into_inner) {
            Phase::Done(result) => Some(result.clone()),
            Phase::Running | Phase::Pended => None,
        }
    }

    /// Waits for the request to complete (for an oplock: to break) and returns its result.
    ///
    /// Nothing but another thread can complete it. When the waiting thread is the one that issued the request and
    /// no system worker and no [`thread::spawn`]ed thread is left, the wait would never end: the model reports
    /// [`Rule::OplockBreakDeadlock`] and returns `None` (the request stays pending).
    #[must_use]
    pub fn wait(&self) -> Option<Result<FsControlResult, NTSTATUS>> {
        let mut phase = self.shared.phase.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Phase::Done(result) = &*phase {
                return Some(result.clone());
            }
            if oplock::nobody_else_can_act(self.requester) {
                drop(phase);
                verifier::report(
                    Rule::OplockBreakDeadlock,
                    "NtFsControlFile",
                    "waits for its own pending file-system control (an oplock to break) with no other thread left \
                     that could complete it: the wait would never end",
                );
                return None;
            }
            // Re-check on every change; the timeout only bounds how long a change of the thread counts goes unseen.
            phase = self
                .shared
                .changed
                .wait_timeout(phase, Duration::from_millis(5))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// `NtFsControlFile` as a program calls it on `handle`, waiting for the request to complete: the FSCTL `code` with
/// `input`, and an output buffer of `output_len` bytes. A request that pends is waited for as
/// [`PendingFsControl::wait`] does; one that can never complete is reported and fails with `STATUS_PENDING`
/// (which is not a failure status, so it comes back as `Err` only through this one path).
///
/// # Errors
/// The request's failure status: a filter's, or the file system's (`STATUS_INVALID_DEVICE_REQUEST` for a code it
/// does not know, `STATUS_OPLOCK_NOT_GRANTED`, `STATUS_INVALID_PARAMETER`, ...).
pub fn fs_control(handle: &Handle, code: u32, input: &[u8], output_len: u32) -> Result<FsControlResult, NTSTATUS> {
    match fs_control_async(handle, code, input, output_len)? {
        FsControl::Completed(result) => Ok(result),
        FsControl::Pending(pending) => pending.wait().unwrap_or(Err(windows_sys::Win32::Foundation::STATUS_PENDING)),
    }
}

/// `NtFsControlFile` on `handle` (an asynchronous one, for oplocks) returning as soon as the request completes or
/// pends, as an overlapped `DeviceIoControl` does: a granted oplock comes back as [`FsControl::Pending`], which
/// completes when the oplock breaks.
///
/// # Errors
/// `STATUS_INVALID_PARAMETER` for a handle that is not open, `STATUS_FILE_CLOSED` after cleanup, or the request's
/// failure status.
pub fn fs_control_async(handle: &Handle, code: u32, input: &[u8], output_len: u32) -> Result<FsControl, NTSTATUS> {
    iomgr::target(handle)?;
    if !iomgr::handle_is_open(handle) {
        return Err(STATUS_FILE_CLOSED);
    }
    let shared =
        Arc::new(Shared { phase: Mutex::new(Phase::Running), changed: Condvar::new(), slot: Mutex::new(None) });
    let requester = std::thread::current().id();
    let state = thread::snapshot();
    let caller = process::current();
    let id = handle.id();
    let input = input.to_vec();
    let worker = Arc::clone(&shared);
    let spawned = std::thread::Builder::new()
        .name(format!("{} (FSCTL {code:#x})", state.name))
        .stack_size(thread::KERNEL_STACK_SIZE)
        .spawn(move || {
            let result = guarded("NtFsControlFile", Err(STATUS_INTERNAL_ERROR), || {
                thread::as_thread(state, || {
                    process::run_as(&caller, || run(&Handle::from_id(id), code, &input, output_len, &worker, requester))
                })
            });
            worker.set(Phase::Done(result));
            // Only now may the operation that completed the request go on: its result is visible.
            if let Some(slot) = worker.slot.lock().unwrap_or_else(PoisonError::into_inner).take() {
                slot.finish();
            }
        });
    if spawned.is_err() {
        return Err(windows_sys::Win32::Foundation::STATUS_INSUFFICIENT_RESOURCES);
    }
    let mut phase = shared.phase.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        match &*phase {
            Phase::Running => phase = shared.changed.wait(phase).unwrap_or_else(PoisonError::into_inner),
            Phase::Pended => break,
            Phase::Done(result) => return result.clone().map(FsControl::Completed),
        }
    }
    drop(phase);
    Ok(FsControl::Pending(PendingFsControl { shared, requester }))
}

/// Builds the request, runs it through the filters and the file system on this (the FSCTL's own) thread.
fn run(
    handle: &Handle,
    code: u32,
    input: &[u8],
    output_len: u32,
    shared: &Shared,
    requester: ThreadId,
) -> Result<FsControlResult, NTSTATUS> {
    let t = iomgr::target(handle)?;
    let input_len = u32::try_from(input.len()).map_err(|_| STATUS_INVALID_PARAMETER)?;
    let method = code & 3;
    // METHOD_BUFFERED: one system buffer for both directions. Others: separate input and output buffers.
    let shared_buffer = method == METHOD_BUFFERED;
    let size = if shared_buffer { input.len().max(output_len as usize) } else { input.len() };
    let mut system = vec![0u8; size];
    system.get_mut(..input.len()).map(|b| b.copy_from_slice(input)).ok_or(STATUS_INVALID_PARAMETER)?;
    let mut output = if shared_buffer { Vec::new() } else { vec![0u8; output_len as usize] };
    let mut request =
        Request::new(u8::try_from(IRP_MJ_FILE_SYSTEM_CONTROL).unwrap_or(u8::MAX), t.file_object, t.kernel_mode);
    {
        let iopb = request.iopb();
        iopb.MinorFunction = u8::try_from(IRP_MN_USER_FS_REQUEST).unwrap_or(0);
        if shared_buffer {
            iopb.Parameters.FileSystemControl.Buffered.OutputBufferLength = output_len;
            iopb.Parameters.FileSystemControl.Buffered.InputBufferLength = input_len;
            iopb.Parameters.FileSystemControl.Buffered.FsControlCode = code;
            iopb.Parameters.FileSystemControl.Buffered.SystemBuffer = system.as_mut_ptr().cast();
        } else if method == METHOD_NEITHER {
            iopb.Parameters.FileSystemControl.Neither.OutputBufferLength = output_len;
            iopb.Parameters.FileSystemControl.Neither.InputBufferLength = input_len;
            iopb.Parameters.FileSystemControl.Neither.FsControlCode = code;
            iopb.Parameters.FileSystemControl.Neither.InputBuffer = system.as_mut_ptr().cast();
            iopb.Parameters.FileSystemControl.Neither.OutputBuffer = output.as_mut_ptr().cast();
        } else {
            iopb.Parameters.FileSystemControl.Direct.OutputBufferLength = output_len;
            iopb.Parameters.FileSystemControl.Direct.InputBufferLength = input_len;
            iopb.Parameters.FileSystemControl.Direct.FsControlCode = code;
            iopb.Parameters.FileSystemControl.Direct.InputSystemBuffer = system.as_mut_ptr().cast();
            iopb.Parameters.FileSystemControl.Direct.OutputBuffer = output.as_mut_ptr().cast();
            iopb.Parameters.FileSystemControl.Direct.OutputMdlAddress = std::ptr::null_mut();
        }
    }
    dispatch(t.volume.handle, &mut request, |request| {
        let minor = u32::from(request.iopb().MinorFunction);
        // SAFETY: the union holds the FileSystemControl parameters for IRP_MJ_FILE_SYSTEM_CONTROL.
        let params = unsafe { request.iopb().Parameters.FileSystemControl };
        // SAFETY: every transfer method's parameters begin with the lengths and the code (the Common view).
        let common = unsafe { params.Common };
        let input_seen = system.get(..(common.InputBufferLength as usize).min(input.len())).unwrap_or(&[]);
        let answer = if minor == IRP_MN_USER_FS_REQUEST {
            let who = Requester {
                open: t.open,
                stream: t.stream,
                synchronous: t.synchronous,
                directory: fs::query_standard(t.open).is_ok_and(|s| s.directory),
                other_opens: fs::other_opens_of_stream(t.open),
                byte_range_locks: iomgr::stream_has_locks(t.stream),
                thread: requester,
            };
            file_system(&who, common.FsControlCode, input_seen, common.OutputBufferLength)
        } else {
            Answer::Done(Outcome { status: STATUS_INVALID_DEVICE_REQUEST, information: 0, output: Vec::new() })
        };
        let outcome = match answer {
            Answer::Done(outcome) => outcome,
            Answer::Pending(slot) => {
                *shared.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&slot));
                shared.set(Phase::Pended);
                slot.wait()
            }
        };
        let room = (common.OutputBufferLength as usize).min(if shared_buffer { system.len() } else { output.len() });
        let n = outcome.output.len().min(room);
        let target = if shared_buffer { &mut system } else { &mut output };
        if let (Some(to), Some(from)) = (target.get_mut(..n), outcome.output.get(..n)) {
            to.copy_from_slice(from);
        }
        request.complete(outcome.status, outcome.information);
    });
    let status = request.status();
    if status < 0 {
        return Err(status);
    }
    let information = request.information();
    let returned = if shared_buffer { system } else { output };
    let length = (output_len as usize).min(returned.len()).min(if information <= output_len as usize {
        information
    } else {
        // A legacy break's Information is a FILE_OPLOCK_BROKEN_TO_* value, not a length.
        0
    });
    let mut returned = returned;
    returned.truncate(length);
    Ok(FsControlResult { status, information, output: returned })
}

/// The model file system's answer to an FSCTL. Oplock FSCTLs go to the oplock package; `FSCTL_IS_VOLUME_MOUNTED`
/// succeeds (the volume is mounted while a handle to it is open,
/// <https://learn.microsoft.com/windows/win32/api/winioctl/ni-winioctl-fsctl_is_volume_mounted>); every other code
/// is `STATUS_INVALID_DEVICE_REQUEST`, the answer of a file system that does not implement an FSCTL
/// (<https://learn.microsoft.com/windows-hardware/drivers/ifs/irp-mj-file-system-control>).
fn file_system(who: &Requester, code: u32, input: &[u8], output_len: u32) -> Answer {
    match code {
        FSCTL_REQUEST_OPLOCK_LEVEL_1 => oplock::request_legacy(who, Level::Level1),
        FSCTL_REQUEST_OPLOCK_LEVEL_2 => oplock::request_legacy(who, Level::Level2),
        FSCTL_REQUEST_BATCH_OPLOCK => oplock::request_legacy(who, Level::Batch),
        FSCTL_REQUEST_FILTER_OPLOCK => oplock::request_legacy(who, Level::Filter),
        FSCTL_OPLOCK_BREAK_ACKNOWLEDGE => oplock::acknowledge(who, Ack::Acknowledge),
        FSCTL_OPLOCK_BREAK_ACK_NO_2 => oplock::acknowledge(who, Ack::No2),
        FSCTL_OPBATCH_ACK_CLOSE_PENDING => oplock::acknowledge(who, Ack::ClosePending),
        FSCTL_OPLOCK_BREAK_NOTIFY => oplock::break_notify(who),
        FSCTL_REQUEST_OPLOCK => request_oplock(who, input, output_len),
        FSCTL_IS_VOLUME_MOUNTED => Answer::Done(Outcome { status: STATUS_SUCCESS, information: 0, output: Vec::new() }),
        _ => Answer::Done(Outcome { status: STATUS_INVALID_DEVICE_REQUEST, information: 0, output: Vec::new() }),
    }
}

/// `FSCTL_REQUEST_OPLOCK`: the input must be a `REQUEST_OPLOCK_INPUT_BUFFER` of the current version and its own
/// length, with exactly one of `REQUEST_OPLOCK_INPUT_FLAG_REQUEST` and `REQUEST_OPLOCK_INPUT_FLAG_ACK` and a valid
/// level (R, RH, RW or RWH; an acknowledgement may also keep none), else `STATUS_INVALID_PARAMETER`. An input or
/// output buffer shorter than its structure is `STATUS_BUFFER_TOO_SMALL` (the model's answer: the pages say only
/// that the structures are required). `REQUEST_OPLOCK_INPUT_FLAG_COMPLETE_ACK_ON_CLOSE` is accepted and has no
/// effect in the model (cleanup always ends a break).
/// See <https://learn.microsoft.com/windows/win32/api/winioctl/ns-winioctl-request_oplock_input_buffer> and
/// <https://learn.microsoft.com/windows/win32/api/winioctl/ni-winioctl-fsctl_request_oplock>.
fn request_oplock(who: &Requester, input: &[u8], output_len: u32) -> Answer {
    let done = |status| Answer::Done(Outcome { status, information: 0, output: Vec::new() });
    if input.len() < size_of::<REQUEST_OPLOCK_INPUT_BUFFER>()
        || (output_len as usize) < size_of::<REQUEST_OPLOCK_OUTPUT_BUFFER>()
    {
        return done(STATUS_BUFFER_TOO_SMALL);
    }
    let word = |at: usize| input.get(at..at + 2).and_then(|b| b.try_into().ok()).map_or(0, u16::from_le_bytes);
    let dword = |at: usize| input.get(at..at + 4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_le_bytes);
    let (version, length, level, flags) = (word(0), word(2), dword(4), dword(8));
    let known = REQUEST_OPLOCK_INPUT_FLAG_REQUEST
        | REQUEST_OPLOCK_INPUT_FLAG_ACK
        | REQUEST_OPLOCK_INPUT_FLAG_COMPLETE_ACK_ON_CLOSE;
    let request = flags & REQUEST_OPLOCK_INPUT_FLAG_REQUEST != 0;
    let ack = flags & REQUEST_OPLOCK_INPUT_FLAG_ACK != 0;
    if u32::from(version) != REQUEST_OPLOCK_CURRENT_VERSION
        || usize::from(length) != size_of::<REQUEST_OPLOCK_INPUT_BUFFER>()
        || flags & !known != 0
        || request == ack
    {
        return done(STATUS_INVALID_PARAMETER);
    }
    if request {
        if !oplock::valid_request_level(level) {
            return done(STATUS_INVALID_PARAMETER);
        }
        return oplock::request_caching(who, level);
    }
    if level != 0 && !oplock::valid_request_level(level) {
        return done(STATUS_INVALID_PARAMETER);
    }
    oplock::acknowledge(who, Ack::Caching(level))
}

/// A `REQUEST_OPLOCK_INPUT_BUFFER` as bytes, for tests and drivers' callers: `flags` is
/// `REQUEST_OPLOCK_INPUT_FLAG_REQUEST` or `_ACK`, `level` the `OPLOCK_LEVEL_CACHE_*` flags.
#[must_use]
pub fn request_oplock_input(level: u32, flags: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(size_of::<REQUEST_OPLOCK_INPUT_BUFFER>());
    bytes.extend_from_slice(&u16::try_from(REQUEST_OPLOCK_CURRENT_VERSION).unwrap_or(1).to_le_bytes());
    bytes.extend_from_slice(&u16::try_from(size_of::<REQUEST_OPLOCK_INPUT_BUFFER>()).unwrap_or(0).to_le_bytes());
    bytes.extend_from_slice(&level.to_le_bytes());
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes
}

/// The size of a `REQUEST_OPLOCK_OUTPUT_BUFFER`, the output length an `FSCTL_REQUEST_OPLOCK` needs.
#[expect(clippy::cast_possible_truncation, reason = "the structure is 24 bytes")]
pub const REQUEST_OPLOCK_OUTPUT_SIZE: u32 = size_of::<REQUEST_OPLOCK_OUTPUT_BUFFER>() as u32;

/// The fields of a `REQUEST_OPLOCK_OUTPUT_BUFFER` in `bytes`: (original level, new level, flags).
#[must_use]
pub fn parse_request_oplock_output(bytes: &[u8]) -> Option<(u32, u32, u32)> {
    let dword = |at: usize| bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    Some((dword(4)?, dword(8)?, dword(12)?))
}
