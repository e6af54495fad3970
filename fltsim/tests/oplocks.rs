//! File-system controls and the model file system's oplock package: grants and refusals of every request type,
//! the operations that break oplocks, acknowledgements, `FILE_COMPLETE_IF_OPLOCKED`, `FILE_OPEN_REQUIRING_OPLOCK`,
//! filters that see or answer oplock FSCTLs, and the rule that finds a wait for an acknowledgement nobody can send.

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
};

use fltsim::{
    Rule,
    io::{
        self, VolumeSpec,
        fsctl::{REQUEST_OPLOCK_OUTPUT_SIZE, parse_request_oplock_output, request_oplock_input},
        iomgr::{self, FsControl, FsControlResult, Handle, OpenParams, PendingFsControl},
        oplock::{R, RH, RW, RWH},
    },
    kernel::{thread, work},
    minifilter_entry_points, scenario,
    testfilters::build::{END, Table, operation, registration},
    verifier::{take_reports, take_rules},
};
use windows_sys::{
    Wdk::{
        Storage::FileSystem::{
            FILE_COMPLETE_IF_OPLOCKED, FILE_DIRECTORY_FILE, FILE_OPEN_REQUIRING_OPLOCK, FILE_OPLOCK_BROKEN_TO_LEVEL_2,
            FILE_OPLOCK_BROKEN_TO_NONE, FILE_OVERWRITE_IF, FileEndOfFileInformation,
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_COMPLETE,
                FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS,
            },
        },
        System::SystemServices::IRP_MN_USER_FS_REQUEST,
    },
    Win32::{
        Foundation::{
            NTSTATUS, STATUS_BUFFER_TOO_SMALL, STATUS_CANNOT_BREAK_OPLOCK, STATUS_INVALID_DEVICE_REQUEST,
            STATUS_INVALID_OPLOCK_PROTOCOL, STATUS_INVALID_PARAMETER, STATUS_OPLOCK_BREAK_IN_PROGRESS,
            STATUS_OPLOCK_NOT_GRANTED, STATUS_OPLOCK_SWITCHED_TO_NEW_HANDLE, STATUS_SHARING_VIOLATION, STATUS_SUCCESS,
        },
        Storage::FileSystem::{
            FILE_READ_ATTRIBUTES, FILE_READ_DATA, FILE_SHARE_DELETE, FILE_SHARE_READ, FILE_SHARE_WRITE,
            FILE_WRITE_DATA, SYNCHRONIZE,
        },
        System::Ioctl::{
            FSCTL_GET_REPARSE_POINT, FSCTL_IS_VOLUME_MOUNTED, FSCTL_OPBATCH_ACK_CLOSE_PENDING,
            FSCTL_OPLOCK_BREAK_ACK_NO_2, FSCTL_OPLOCK_BREAK_ACKNOWLEDGE, FSCTL_OPLOCK_BREAK_NOTIFY,
            FSCTL_REQUEST_BATCH_OPLOCK, FSCTL_REQUEST_FILTER_OPLOCK, FSCTL_REQUEST_OPLOCK,
            FSCTL_REQUEST_OPLOCK_LEVEL_1, FSCTL_REQUEST_OPLOCK_LEVEL_2, OPLOCK_LEVEL_CACHE_WRITE,
            REQUEST_OPLOCK_INPUT_FLAG_ACK, REQUEST_OPLOCK_INPUT_FLAG_REQUEST, REQUEST_OPLOCK_OUTPUT_FLAG_ACK_REQUIRED,
        },
    },
};

/// Set by the thread that acknowledges a break (or closes the owner's handle) just before it does.
static ACKNOWLEDGED: AtomicBool = AtomicBool::new(false);
static CLOSED: AtomicBool = AtomicBool::new(false);

const ALL_SHARE: u32 = FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE;

fn setup() {
    let root = io::fresh_root("oplocks");
    std::fs::write(root.join("data.txt"), b"0123456789").expect("seed");
    std::fs::create_dir(root.join("dir")).expect("dir");
    io::mount(VolumeSpec::ntfs('C', &root));
}

fn open_with(access: u32, share: u32, options: u32, disposition: u32) -> Result<Handle, NTSTATUS> {
    let params =
        OpenParams { desired_access: access, share_access: share, options, disposition, ..OpenParams::default() };
    iomgr::create(r"C:\data.txt", &params)
}

/// An asynchronous (overlapped) handle, the kind oplocks are granted on.
fn open_async(access: u32) -> Handle {
    open_with(access, ALL_SHARE, 0, windows_sys::Wdk::Storage::FileSystem::FILE_OPEN).expect("open")
}

fn pending(answer: Result<FsControl, NTSTATUS>) -> PendingFsControl {
    match answer {
        Ok(FsControl::Pending(pending)) => pending,
        other => panic!("expected a pending request, got {other:?}"),
    }
}

fn refused(answer: Result<FsControl, NTSTATUS>) -> NTSTATUS {
    match answer {
        Err(status) => status,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn legacy(handle: &Handle, code: u32) -> Result<FsControl, NTSTATUS> {
    iomgr::fs_control_async(handle, code, &[], 0)
}

fn win7(handle: &Handle, level: u32, flags: u32) -> Result<FsControl, NTSTATUS> {
    iomgr::fs_control_async(
        handle,
        FSCTL_REQUEST_OPLOCK,
        &request_oplock_input(level, flags),
        REQUEST_OPLOCK_OUTPUT_SIZE,
    )
}

fn completed(pending: &PendingFsControl) -> FsControlResult {
    pending.result().expect("completed").expect("a success")
}

/// Waits on a system worker for `oplock` to break, then sends `ack` on `handle` (moved there and back), and
/// reports the break's result and the acknowledgement's answer.
fn acknowledge_from_a_worker(
    handle: Handle,
    oplock: PendingFsControl,
    ack: impl FnOnce(&Handle) -> Result<FsControl, NTSTATUS> + Send + 'static,
) -> mpsc::Receiver<(Handle, FsControlResult, Result<FsControl, NTSTATUS>)> {
    let (send, receive) = mpsc::channel();
    drop(work::queue(move || {
        let broken = oplock.wait().expect("the break comes").expect("a success");
        let answer = ack(&handle);
        send.send((handle, broken, answer)).expect("send");
    }));
    receive
}

scenario! {
    /// Level 1, Batch and Filter need the only handle of the stream, asynchronous; Level 2 tolerates other handles
    /// but not byte-range locks; directories are STATUS_INVALID_PARAMETER.
    fn legacy_requests_are_granted_and_refused_as_documented() {
        setup();
        let sync = open_with(FILE_READ_DATA, ALL_SHARE, windows_sys::Wdk::Storage::FileSystem::FILE_SYNCHRONOUS_IO_NONALERT, 1)
            .expect("sync");
        assert_eq!(refused(legacy(&sync, FSCTL_REQUEST_OPLOCK_LEVEL_1)), STATUS_OPLOCK_NOT_GRANTED, "synchronous");
        let a = open_async(FILE_READ_DATA);
        for code in [FSCTL_REQUEST_OPLOCK_LEVEL_1, FSCTL_REQUEST_BATCH_OPLOCK, FSCTL_REQUEST_FILTER_OPLOCK] {
            assert_eq!(refused(legacy(&a, code)), STATUS_OPLOCK_NOT_GRANTED, "another handle is open ({code:#x})");
        }
        let level2 = pending(legacy(&a, FSCTL_REQUEST_OPLOCK_LEVEL_2));
        assert!(level2.result().is_none(), "a granted oplock stays pending");
        iomgr::close(sync);
        let b = open_async(FILE_READ_DATA | FILE_WRITE_DATA);
        iomgr::lock(&b, 0, 1, 0, true).expect("lock");
        assert_eq!(refused(legacy(&b, FSCTL_REQUEST_OPLOCK_LEVEL_2)), STATUS_OPLOCK_NOT_GRANTED, "byte-range locks");
        let dir_params = OpenParams {
            desired_access: FILE_READ_ATTRIBUTES,
            options: FILE_DIRECTORY_FILE,
            share_access: ALL_SHARE,
            ..OpenParams::default()
        };
        let dir = iomgr::create(r"C:\dir", &dir_params).expect("dir");
        assert_eq!(refused(legacy(&dir, FSCTL_REQUEST_OPLOCK_LEVEL_1)), STATUS_INVALID_PARAMETER, "a directory");
        assert_eq!(refused(win7(&dir, RW, REQUEST_OPLOCK_INPUT_FLAG_REQUEST)), STATUS_INVALID_PARAMETER);
        iomgr::close(b);
        let level2 = level2.wait().expect("the write lock broke it").expect("a success");
        assert_eq!(level2.information, FILE_OPLOCK_BROKEN_TO_NONE as usize);
        iomgr::close(a);
        iomgr::close(dir);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// A Level 1 oplock breaks to Level 2 when another handle opens the stream; the create waits for the
    /// acknowledgement, which turns into the Level 2 oplock's pending request; a write then breaks that to none.
    fn level_1_breaks_to_level_2_and_the_create_waits_for_the_acknowledgement() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let oplock = pending(legacy(&a, FSCTL_REQUEST_OPLOCK_LEVEL_1));
        let back = acknowledge_from_a_worker(a, oplock, |a| {
            ACKNOWLEDGED.store(true, Ordering::SeqCst);
            iomgr::fs_control_async(a, FSCTL_OPLOCK_BREAK_ACKNOWLEDGE, &[], 0)
        });
        let b = open_async(FILE_READ_DATA | FILE_WRITE_DATA);
        assert!(ACKNOWLEDGED.load(Ordering::SeqCst), "the create returned only after the acknowledgement");
        let (a, broken, ack) = back.recv().expect("worker");
        assert_eq!(broken.status, STATUS_SUCCESS);
        assert_eq!(broken.information, FILE_OPLOCK_BROKEN_TO_LEVEL_2 as usize);
        let level2 = pending(ack);
        iomgr::write(&b, Some(0), b"x").expect("write");
        assert_eq!(completed(&level2).information, FILE_OPLOCK_BROKEN_TO_NONE as usize, "a write breaks Level 2");
        assert_eq!(refused(iomgr::fs_control_async(&a, FSCTL_OPLOCK_BREAK_ACKNOWLEDGE, &[], 0)), STATUS_INVALID_OPLOCK_PROTOCOL);
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// An overwrite breaks a Batch oplock to none; FSCTL_OPLOCK_BREAK_ACK_NO_2 relinquishes it and completes at once.
    fn an_overwrite_breaks_batch_to_none_and_ack_no_2_relinquishes_it() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let oplock = pending(legacy(&a, FSCTL_REQUEST_BATCH_OPLOCK));
        let back = acknowledge_from_a_worker(a, oplock, |a| iomgr::fs_control_async(a, FSCTL_OPLOCK_BREAK_ACK_NO_2, &[], 0));
        let b = open_with(FILE_WRITE_DATA, ALL_SHARE, 0, FILE_OVERWRITE_IF).expect("overwrite");
        let (a, broken, ack) = back.recv().expect("worker");
        assert_eq!(broken.information, FILE_OPLOCK_BROKEN_TO_NONE as usize);
        assert!(matches!(ack, Ok(FsControl::Completed(FsControlResult { status: STATUS_SUCCESS, .. }))));
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// FSCTL_OPBATCH_ACK_CLOSE_PENDING on a Batch break: the create keeps waiting until the owner closes its
    /// handle; closing (cleanup) is what lets it in.
    fn close_pending_keeps_the_create_waiting_until_the_handle_is_closed() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let oplock = pending(legacy(&a, FSCTL_REQUEST_BATCH_OPLOCK));
        drop(work::queue(move || {
            oplock.wait().expect("break").expect("success");
            let ack = iomgr::fs_control(&a, FSCTL_OPBATCH_ACK_CLOSE_PENDING, &[], 0).expect("close pending");
            assert_eq!(ack.status, STATUS_SUCCESS);
            CLOSED.store(true, Ordering::SeqCst);
            iomgr::close(a);
        }));
        let b = open_async(FILE_READ_DATA);
        assert!(CLOSED.load(Ordering::SeqCst), "the create waited for the close");
        iomgr::close(b);
        work::drain();
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// A Filter oplock lets readers that share read in; a writer that does not share read breaks it to none and
    /// waits for the acknowledgement.
    fn a_filter_oplock_breaks_only_for_a_writer_that_does_not_share_read() {
        setup();
        let a = open_with(FILE_READ_ATTRIBUTES, ALL_SHARE, 0, 1).expect("attributes-only open");
        let oplock = pending(legacy(&a, FSCTL_REQUEST_FILTER_OPLOCK));
        let reader = open_with(FILE_READ_DATA, FILE_SHARE_READ | FILE_SHARE_WRITE, 0, 1).expect("reader");
        assert!(oplock.result().is_none(), "a reader sharing read leaves the filter oplock alone");
        iomgr::close(reader);
        let back = acknowledge_from_a_worker(a, oplock, |a| iomgr::fs_control_async(a, FSCTL_OPLOCK_BREAK_ACKNOWLEDGE, &[], 0));
        let writer = open_with(FILE_WRITE_DATA, FILE_SHARE_WRITE, 0, 1).expect("writer");
        let (a, broken, ack) = back.recv().expect("worker");
        assert_eq!(broken.information, FILE_OPLOCK_BROKEN_TO_NONE as usize, "filter oplocks never break to Level 2");
        assert!(matches!(ack, Ok(FsControl::Completed(_))));
        iomgr::close(a);
        iomgr::close(writer);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// FILE_COMPLETE_IF_OPLOCKED: the create does not wait and succeeds with STATUS_OPLOCK_BREAK_IN_PROGRESS, while
    /// the break it started is delivered.
    fn complete_if_oplocked_does_not_wait_for_the_acknowledgement() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let oplock = pending(legacy(&a, FSCTL_REQUEST_BATCH_OPLOCK));
        let b = open_with(FILE_READ_DATA, ALL_SHARE, FILE_COMPLETE_IF_OPLOCKED, 1).expect("no wait");
        assert_eq!(iomgr::create_status(&b), Ok(STATUS_OPLOCK_BREAK_IN_PROGRESS));
        assert_eq!(completed(&oplock).information, FILE_OPLOCK_BROKEN_TO_LEVEL_2 as usize);
        let level2 = pending(iomgr::fs_control_async(&a, FSCTL_OPLOCK_BREAK_ACKNOWLEDGE, &[], 0));
        let c = open_async(FILE_READ_DATA);
        assert_eq!(iomgr::create_status(&c), Ok(STATUS_SUCCESS), "after the acknowledgement nothing breaks");
        assert!(level2.result().is_none(), "a plain open does not break Level 2");
        for handle in [a, b, c] {
            iomgr::close(handle);
        }
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// The same thread owns the oplock and opens the file again without FILE_COMPLETE_IF_OPLOCKED: it would wait
    /// for itself forever. Found by rule; the model goes on as if acknowledged.
    fn waiting_for_an_acknowledgement_only_the_waiting_thread_could_send_is_reported() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let oplock = pending(legacy(&a, FSCTL_REQUEST_OPLOCK_LEVEL_1));
        let b = open_async(FILE_READ_DATA);
        assert_eq!(take_rules(), [Rule::OplockBreakDeadlock]);
        assert_eq!(completed(&oplock).information, FILE_OPLOCK_BROKEN_TO_LEVEL_2 as usize);
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// The quiet half: the owner acknowledges from a thread the test started with `thread::spawn`.
    fn an_acknowledgement_from_a_spawned_thread_breaks_no_rule() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let oplock = pending(legacy(&a, FSCTL_REQUEST_OPLOCK_LEVEL_1));
        let owner = thread::spawn("owner", move || {
            oplock.wait().expect("break").expect("success");
            let ack = iomgr::fs_control_async(&a, FSCTL_OPLOCK_BREAK_ACK_NO_2, &[], 0);
            assert!(matches!(ack, Ok(FsControl::Completed(_))));
            a
        })
        .expect("spawn");
        let b = open_async(FILE_READ_DATA);
        let a = owner.join().expect("owner");
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// A thread that waits for its own oplock to break with nothing else running would wait forever (reported,
    /// `None`); with a spawned thread that opens the file, the wait ends with the break.
    fn waiting_for_an_oplock_nothing_can_break_is_reported() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let oplock = pending(legacy(&a, FSCTL_REQUEST_OPLOCK_LEVEL_2));
        assert!(oplock.wait().is_none());
        assert_eq!(take_rules(), [Rule::OplockBreakDeadlock]);
        let writer = thread::spawn("writer", || {
            let b = open_async(FILE_WRITE_DATA);
            iomgr::write(&b, Some(0), b"w").expect("write");
            iomgr::close(b);
        })
        .expect("spawn");
        let broken = oplock.wait().expect("the writer breaks it").expect("success");
        assert_eq!(broken.information, FILE_OPLOCK_BROKEN_TO_NONE as usize);
        writer.join().expect("writer");
        iomgr::close(a);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// Windows 7 requests: RWH breaks to RH for another open (acknowledgement required, REQUEST_OPLOCK_OUTPUT_BUFFER
    /// says so); the acknowledgement keeping RH pends as the new oplock; a write from the other handle breaks RH to
    /// none without waiting; cleanup releases the rest.
    fn read_write_handle_breaks_to_read_handle_and_a_write_breaks_that_without_waiting() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let oplock = pending(win7(&a, RWH, REQUEST_OPLOCK_INPUT_FLAG_REQUEST));
        let back = acknowledge_from_a_worker(a, oplock, |a| win7(a, RH, REQUEST_OPLOCK_INPUT_FLAG_ACK));
        let b = open_async(FILE_READ_DATA | FILE_WRITE_DATA);
        let (a, broken, ack) = back.recv().expect("worker");
        assert_eq!(broken.information, REQUEST_OPLOCK_OUTPUT_SIZE as usize);
        assert_eq!(parse_request_oplock_output(&broken.output), Some((RWH, RH, REQUEST_OPLOCK_OUTPUT_FLAG_ACK_REQUIRED)));
        let rh = pending(ack);
        iomgr::write(&b, Some(0), b"z").expect("the write does not wait for the RH acknowledgement");
        let rh_broken = completed(&rh);
        assert_eq!(parse_request_oplock_output(&rh_broken.output), Some((RH, 0, REQUEST_OPLOCK_OUTPUT_FLAG_ACK_REQUIRED)));
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// RH breaks only when the new open would meet a sharing violation (to R, waiting); the holder closes its
    /// handle, which acknowledges, and the create then succeeds.
    fn read_handle_breaks_on_a_sharing_violation_and_closing_lets_the_create_in() {
        setup();
        let a = open_with(FILE_READ_DATA, FILE_SHARE_READ, 0, 1).expect("reader sharing only read");
        let oplock = pending(win7(&a, RH, REQUEST_OPLOCK_INPUT_FLAG_REQUEST));
        let reader = open_with(FILE_READ_DATA, ALL_SHARE, 0, 1).expect("no conflict");
        assert!(oplock.result().is_none(), "an open without a sharing violation leaves RH alone");
        iomgr::close(reader);
        drop(work::queue(move || {
            let broken = oplock.wait().expect("break").expect("success");
            assert_eq!(parse_request_oplock_output(&broken.output), Some((RH, R, REQUEST_OPLOCK_OUTPUT_FLAG_ACK_REQUIRED)));
            iomgr::close(a);
        }));
        let writer = open_with(FILE_WRITE_DATA, ALL_SHARE, 0, 1).expect("in once the holder closed");
        iomgr::close(writer);
        work::drain();
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// Windows 7 input checking and the grant rules of R, RW and RWH.
    fn windows_7_requests_check_their_buffers_and_grant_rules() {
        setup();
        let a = open_async(FILE_READ_DATA | FILE_WRITE_DATA);
        let mut bad_version = request_oplock_input(R, REQUEST_OPLOCK_INPUT_FLAG_REQUEST);
        bad_version[0] = 2;
        assert_eq!(refused(iomgr::fs_control_async(&a, FSCTL_REQUEST_OPLOCK, &bad_version, REQUEST_OPLOCK_OUTPUT_SIZE)), STATUS_INVALID_PARAMETER);
        let both = REQUEST_OPLOCK_INPUT_FLAG_REQUEST | REQUEST_OPLOCK_INPUT_FLAG_ACK;
        assert_eq!(refused(win7(&a, R, both)), STATUS_INVALID_PARAMETER);
        assert_eq!(refused(win7(&a, OPLOCK_LEVEL_CACHE_WRITE, REQUEST_OPLOCK_INPUT_FLAG_REQUEST)), STATUS_INVALID_PARAMETER);
        let short = iomgr::fs_control_async(&a, FSCTL_REQUEST_OPLOCK, &request_oplock_input(R, REQUEST_OPLOCK_INPUT_FLAG_REQUEST), 4);
        assert_eq!(refused(short), STATUS_BUFFER_TOO_SMALL);
        assert_eq!(refused(win7(&a, R, REQUEST_OPLOCK_INPUT_FLAG_ACK)), STATUS_INVALID_OPLOCK_PROTOCOL, "no break to acknowledge");
        let sync = open_with(FILE_READ_DATA, ALL_SHARE, windows_sys::Wdk::Storage::FileSystem::FILE_SYNCHRONOUS_IO_NONALERT, 1)
            .expect("sync");
        assert_eq!(refused(win7(&sync, R, REQUEST_OPLOCK_INPUT_FLAG_REQUEST)), STATUS_OPLOCK_NOT_GRANTED);
        assert_eq!(refused(win7(&a, RW, REQUEST_OPLOCK_INPUT_FLAG_REQUEST)), STATUS_OPLOCK_NOT_GRANTED, "another open");
        iomgr::close(sync);
        let read = pending(win7(&a, R, REQUEST_OPLOCK_INPUT_FLAG_REQUEST));
        let rw = pending(win7(&a, RW, REQUEST_OPLOCK_INPUT_FLAG_REQUEST));
        assert_eq!(read.result(), Some(Ok(FsControlResult { status: STATUS_OPLOCK_SWITCHED_TO_NEW_HANDLE, information: 0, output: Vec::new() })));
        iomgr::close(a);
        let released = completed(&rw);
        assert_eq!(parse_request_oplock_output(&released.output), Some((RW, 0, 0)), "cleanup breaks to none, no ack");
        let b = open_async(FILE_READ_DATA | FILE_WRITE_DATA);
        iomgr::lock(&b, 0, 1, 0, false).expect("lock");
        assert_eq!(refused(win7(&b, R, REQUEST_OPLOCK_INPUT_FLAG_REQUEST)), STATUS_OPLOCK_NOT_GRANTED, "byte-range locks");
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// Level 2 breaks to none on a write, an end-of-file change and a byte-range lock from any handle, without an
    /// acknowledgement.
    fn writes_size_changes_and_locks_break_level_2() {
        setup();
        let a = open_async(FILE_READ_DATA | FILE_WRITE_DATA);
        let b = open_async(FILE_READ_DATA | FILE_WRITE_DATA);
        let first = pending(legacy(&a, FSCTL_REQUEST_OPLOCK_LEVEL_2));
        iomgr::write(&b, Some(0), b"q").expect("write");
        assert_eq!(completed(&first).information, FILE_OPLOCK_BROKEN_TO_NONE as usize);
        let second = pending(legacy(&a, FSCTL_REQUEST_OPLOCK_LEVEL_2));
        iomgr::set_information(&b, FileEndOfFileInformation, &5i64.to_le_bytes()).expect("set end of file");
        assert_eq!(completed(&second).information, FILE_OPLOCK_BROKEN_TO_NONE as usize);
        let third = pending(win7(&a, R, REQUEST_OPLOCK_INPUT_FLAG_REQUEST));
        iomgr::lock(&b, 0, 1, 0, true).expect("lock");
        assert_eq!(parse_request_oplock_output(&completed(&third).output), Some((R, 0, 0)));
        iomgr::close(a);
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// FILE_OPEN_REQUIRING_OPLOCK fails with STATUS_CANNOT_BREAK_OPLOCK, breaking nothing, where it would break an
    /// oplock; otherwise it opens, and once it requested its oplock other opens go on.
    fn open_requiring_oplock_fails_rather_than_break_one() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let read = pending(win7(&a, R, REQUEST_OPLOCK_INPUT_FLAG_REQUEST));
        let overwrite = open_with(FILE_WRITE_DATA, ALL_SHARE, FILE_OPEN_REQUIRING_OPLOCK, FILE_OVERWRITE_IF);
        assert_eq!(overwrite.err(), Some(STATUS_CANNOT_BREAK_OPLOCK));
        assert!(read.result().is_none(), "the R oplock was not broken");
        let b = open_with(FILE_READ_DATA, ALL_SHARE, FILE_OPEN_REQUIRING_OPLOCK, 1).expect("nothing to break");
        let rh = pending(win7(&b, RH, REQUEST_OPLOCK_INPUT_FLAG_REQUEST));
        let c = open_async(FILE_READ_DATA);
        assert!(rh.result().is_none());
        for handle in [a, b, c] {
            iomgr::close(handle);
        }
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// An open made with FILE_OPEN_REQUIRING_OPLOCK that never requests its oplock blocks every other open; on the
    /// same thread with nothing else running that is a deadlock, reported.
    fn an_open_requiring_an_oplock_that_never_requests_it_is_reported() {
        setup();
        let a = open_with(FILE_READ_DATA, ALL_SHARE, FILE_OPEN_REQUIRING_OPLOCK, 1).expect("open");
        let b = open_async(FILE_READ_DATA);
        assert_eq!(take_rules(), [Rule::OplockBreakDeadlock]);
        iomgr::close(a);
        iomgr::close(b);
    }
}

scenario! {
    /// FSCTL_OPLOCK_BREAK_NOTIFY completes at once without a break in progress, and otherwise when the break ends;
    /// the model file system answers FSCTL_IS_VOLUME_MOUNTED and refuses codes it does not know.
    fn break_notify_and_other_fsctls() {
        setup();
        let a = open_async(FILE_READ_DATA);
        let notify = iomgr::fs_control(&a, FSCTL_OPLOCK_BREAK_NOTIFY, &[], 0).expect("no break in progress");
        assert_eq!(notify.status, STATUS_SUCCESS);
        assert_eq!(iomgr::fs_control(&a, FSCTL_IS_VOLUME_MOUNTED, &[], 0).map(|r| r.status), Ok(STATUS_SUCCESS));
        assert_eq!(iomgr::fs_control(&a, FSCTL_GET_REPARSE_POINT, &[], 64), Err(STATUS_INVALID_DEVICE_REQUEST));
        let oplock = pending(legacy(&a, FSCTL_REQUEST_BATCH_OPLOCK));
        let b = open_with(FILE_READ_DATA, ALL_SHARE, FILE_COMPLETE_IF_OPLOCKED, 1).expect("break started");
        assert!(oplock.result().is_some());
        let waiting = pending(iomgr::fs_control_async(&b, FSCTL_OPLOCK_BREAK_NOTIFY, &[], 0));
        assert!(waiting.result().is_none(), "a break is in progress");
        iomgr::close(a);
        assert_eq!(completed(&waiting).status, STATUS_SUCCESS, "closing the owner ended the break");
        iomgr::close(b);
        assert!(take_reports().is_empty());
    }
}

// A test filter: in mode 0 it records the oplock FSCTL parameters it sees and passes them down; in mode 1 it
// completes every oplock request in its pre-operation callback with STATUS_OPLOCK_NOT_GRANTED, as Shunt does on
// redirected handles.

static MODE: AtomicU32 = AtomicU32::new(0);
/// What the pass-through filter saw of one FSCTL: minor function, code, input and output lengths, input bytes.
type Seen = (u8, u32, u32, u32, Vec<u8>);
static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

unsafe extern "system" fn pre_fsctl(
    data: *mut FLT_CALLBACK_DATA,
    _objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: the operation's callback data and parameter block, valid during the callback.
    let data = unsafe { &mut *data };
    // SAFETY: as above.
    let iopb = unsafe { &*data.Iopb };
    // SAFETY: the union holds the FileSystemControl parameters for IRP_MJ_FILE_SYSTEM_CONTROL.
    let params = unsafe { iopb.Parameters.FileSystemControl };
    // SAFETY: oplock FSCTLs are METHOD_BUFFERED (and every method starts with the same three fields).
    let buffered = unsafe { params.Buffered };
    let oplock_request = matches!(
        buffered.FsControlCode,
        FSCTL_REQUEST_OPLOCK
            | FSCTL_REQUEST_OPLOCK_LEVEL_1
            | FSCTL_REQUEST_OPLOCK_LEVEL_2
            | FSCTL_REQUEST_BATCH_OPLOCK
            | FSCTL_REQUEST_FILTER_OPLOCK
    );
    if MODE.load(Ordering::SeqCst) == 1 && oplock_request {
        data.IoStatus.Anonymous.Status = STATUS_OPLOCK_NOT_GRANTED;
        data.IoStatus.Information = 0;
        return FLT_PREOP_COMPLETE;
    }
    let input = if buffered.SystemBuffer.is_null() {
        Vec::new()
    } else {
        // SAFETY: the system buffer holds at least InputBufferLength bytes of input.
        unsafe { std::slice::from_raw_parts(buffered.SystemBuffer.cast::<u8>(), buffered.InputBufferLength as usize) }
            .to_vec()
    };
    SEEN.lock().expect("seen").push((
        iopb.MinorFunction,
        buffered.FsControlCode,
        buffered.InputBufferLength,
        buffered.OutputBufferLength,
        input,
    ));
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPERATIONS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    // 13: IRP_MJ_FILE_SYSTEM_CONTROL.
    Table([operation(13, Some(pre_fsctl), None), operation(END, None, None)]);
static REGISTRATION: Table<FLT_REGISTRATION> = Table(registration((&raw const OPERATIONS.0).cast(), Some(unload)));
minifilter_entry_points!(REGISTRATION);

fn load_filter(mode: u32) -> fltsim::LoadedDriver {
    MODE.store(mode, Ordering::SeqCst);
    fltsim::registry::install_minifilter_service("fsctltest", "Fsctl Instance", "370000");
    fltsim::load("fsctltest", driver_entry).expect("load")
}

scenario! {
    /// A filter that completes oplock requests in pre-operation: the caller sees STATUS_OPLOCK_NOT_GRANTED and the
    /// file system never granted anything (another open neither breaks nor waits).
    fn a_filter_refusing_oplock_requests_keeps_them_from_the_file_system() {
        setup();
        let mut driver = load_filter(1);
        let a = open_async(FILE_READ_DATA);
        assert_eq!(refused(win7(&a, RWH, REQUEST_OPLOCK_INPUT_FLAG_REQUEST)), STATUS_OPLOCK_NOT_GRANTED);
        assert_eq!(refused(legacy(&a, FSCTL_REQUEST_BATCH_OPLOCK)), STATUS_OPLOCK_NOT_GRANTED);
        let b = open_async(FILE_READ_DATA | SYNCHRONIZE);
        assert_eq!(iomgr::create_status(&b), Ok(STATUS_SUCCESS));
        iomgr::close(a);
        iomgr::close(b);
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty(), "no oplock, so no wait and no deadlock report");
    }
}

scenario! {
    /// A pass-through filter sees IRP_MN_USER_FS_REQUEST with the METHOD_BUFFERED parameters: the code, both
    /// lengths and the input in the system buffer; the file system then grants the oplock.
    fn a_pass_through_filter_sees_the_buffered_fsctl_parameters() {
        setup();
        let mut driver = load_filter(0);
        let a = open_async(FILE_READ_DATA);
        let input = request_oplock_input(RH, REQUEST_OPLOCK_INPUT_FLAG_REQUEST);
        let oplock = pending(win7(&a, RH, REQUEST_OPLOCK_INPUT_FLAG_REQUEST));
        let seen = SEEN.lock().expect("seen").clone();
        assert_eq!(
            seen,
            [(
                u8::try_from(IRP_MN_USER_FS_REQUEST).expect("minor"),
                FSCTL_REQUEST_OPLOCK,
                u32::try_from(input.len()).expect("length"),
                REQUEST_OPLOCK_OUTPUT_SIZE,
                input
            )]
        );
        iomgr::close(a);
        assert_eq!(parse_request_oplock_output(&completed(&oplock).output), Some((RH, 0, 0)));
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// An open asking only for attribute access breaks nothing, and a sharing violation with a Batch owner still
    /// fails after the break was acknowledged.
    fn attribute_opens_break_nothing_and_sharing_violations_still_fail_after_the_break() {
        setup();
        let a = open_with(FILE_READ_DATA, FILE_SHARE_READ, 0, 1).expect("owner sharing only read");
        let oplock = pending(legacy(&a, FSCTL_REQUEST_BATCH_OPLOCK));
        let attributes = open_with(FILE_READ_ATTRIBUTES, ALL_SHARE, 0, 1).expect("attributes");
        assert!(oplock.result().is_none(), "attribute-only opens do not break oplocks");
        let back = acknowledge_from_a_worker(a, oplock, |a| iomgr::fs_control_async(a, FSCTL_OPLOCK_BREAK_ACKNOWLEDGE, &[], 0));
        assert_eq!(open_with(FILE_WRITE_DATA, ALL_SHARE, 0, 1).err(), Some(STATUS_SHARING_VIOLATION));
        let (a, broken, ack) = back.recv().expect("worker");
        assert_eq!(broken.information, FILE_OPLOCK_BROKEN_TO_LEVEL_2 as usize, "broken before the sharing check");
        drop(pending(ack));
        iomgr::close(a);
        iomgr::close(attributes);
        assert!(take_reports().is_empty());
    }
}
