//! Whose access a filter's backing open checks: a filter opens a backing file with `IO_FORCE_ACCESS_CHECK` from
//! its pre-create, as Shunt's forward rules will. In the requestor's thread the check is made as the requestor;
//! behind a filter that pends creates to a system worker it would be made as SYSTEM, unless the filter impersonates
//! the create's subject security context around the open (`SeCreateClientSecurityFromSubjectContext`,
//! `SeImpersonateClientEx`, then the thread's previous impersonation restored, `SeDeleteClientSecurity`).

use std::{
    ffi::c_void,
    sync::{
        Mutex,
        atomic::{AtomicI32, AtomicU8, Ordering},
    },
};

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    kernel::{
        irql,
        process::{self, Process, Token},
        security::PsGetCurrentThread,
        thread,
    },
    scenario,
    testfilters::{
        build::{END, Table, open_file, operation, registration},
        poster,
    },
    verifier::take_rules,
};
use windows_sys::{
    Wdk::{
        Foundation::SECURITY_SUBJECT_CONTEXT,
        Storage::FileSystem::{
            Minifilters::{
                FLT_CALLBACK_DATA, FLT_OPERATION_REGISTRATION, FLT_PREOP_CALLBACK_STATUS, FLT_PREOP_PENDING,
                FLT_PREOP_SUCCESS_NO_CALLBACK, FLT_REGISTRATION, FLT_RELATED_OBJECTS, FltAllocateDeferredIoWorkItem,
                FltClose, FltCompletePendedPreOperation, FltFreeDeferredIoWorkItem, FltQueueDeferredIoWorkItem,
                PFLT_DEFERRED_IO_WORKITEM, PFLT_FILTER, PFLT_INSTANCE,
            },
            PsDereferenceImpersonationToken, PsImpersonateClient, PsReferenceImpersonationToken, PsRevertToSelf,
            SECURITY_CLIENT_CONTEXT, SeCreateClientSecurityFromSubjectContext, SeDeleteClientSecurity,
            SeImpersonateClientEx,
        },
        System::SystemServices::{DelayedWorkQueue, IO_FORCE_ACCESS_CHECK, ObfDereferenceObject},
    },
    Win32::{
        Foundation::{
            NTSTATUS, OBJ_KERNEL_HANDLE, STATUS_ACCESS_DENIED, STATUS_BAD_IMPERSONATION_LEVEL,
            STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
        },
        Security::{
            SECURITY_IMPERSONATION_LEVEL, SECURITY_QUALITY_OF_SERVICE, SECURITY_STATIC_TRACKING,
            SecurityIdentification, SecurityImpersonation,
        },
    },
};

/// What the opener does in pre-create for `\source.txt`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
enum Mode {
    /// Opens the backing with `IO_FORCE_ACCESS_CHECK` as the thread is.
    Plain,
    /// Impersonates the create's subject context around the open and restores the previous impersonation.
    Impersonate,
    /// Impersonates and never ends it.
    NoRestore,
    /// Impersonates, then `PsRevertToSelf`: wrong when the thread impersonated before.
    PlainRevert,
    /// As `Impersonate`, but never deletes the client security context.
    LeakContext,
    /// As `Impersonate`, with a quality of service at `SecurityIdentification`.
    Identification,
    /// Pends the create and opens from its own deferred work item without impersonating.
    PostedPlain,
    /// Pends the create and opens from its work item without `IO_FORCE_ACCESS_CHECK`.
    PostedUnchecked,
}

static MODE: AtomicU8 = AtomicU8::new(0);
static OPEN_STATUS: AtomicI32 = AtomicI32::new(1);
static CLIENT_STATUS: AtomicI32 = AtomicI32::new(1);
static FILTER_AND_INSTANCE: Mutex<(PFLT_FILTER, PFLT_INSTANCE)> = Mutex::new((0, 0));

fn mode() -> Mode {
    const ALL: [Mode; 8] = [
        Mode::Plain,
        Mode::Impersonate,
        Mode::NoRestore,
        Mode::PlainRevert,
        Mode::LeakContext,
        Mode::Identification,
        Mode::PostedPlain,
        Mode::PostedUnchecked,
    ];
    ALL[usize::from(MODE.load(Ordering::SeqCst))]
}

fn name_of(data: &FLT_CALLBACK_DATA) -> String {
    // SAFETY: Filter Manager passes this callback's data.
    unsafe { fltsim::testfilters::build::target_name(data) }
}

/// The create's subject security context, which its access state carries.
fn subject_of(data: &FLT_CALLBACK_DATA) -> *const SECURITY_SUBJECT_CONTEXT {
    // SAFETY: Filter Manager passes callback data whose Iopb is valid.
    let iopb = unsafe { &*data.Iopb };
    // SAFETY: the union holds the Create parameters for IRP_MJ_CREATE.
    let context = unsafe { iopb.Parameters.Create.SecurityContext };
    // SAFETY: a create's security context is valid for its callbacks.
    let access_state = unsafe { (*context).AccessState };
    // SAFETY: and so is its access state.
    unsafe { &raw const (*access_state).SubjectSecurityContext }
}

/// Opens the backing file from the filter and closes it again; records and returns the status.
fn open_backing(flags: u32) -> NTSTATUS {
    let (filter, instance) = *FILTER_AND_INSTANCE.lock().expect("lock");
    let status = match open_file(filter, instance, r"\??\C:\backing.txt", OBJ_KERNEL_HANDLE, flags) {
        Ok((handle, file_object)) => {
            // SAFETY: the handle and file object FltCreateFileEx2 returned.
            unsafe { FltClose(handle) };
            // SAFETY: as above.
            unsafe { ObfDereferenceObject(file_object.cast()) };
            STATUS_SUCCESS
        }
        Err(status) => status,
    };
    OPEN_STATUS.store(status, Ordering::SeqCst);
    status
}

/// The thread's impersonation before the filter changes it, to restore afterwards.
struct Previous {
    token: *mut c_void,
    level: SECURITY_IMPERSONATION_LEVEL,
}

fn save_impersonation() -> Previous {
    let (mut copy, mut effective, mut level) = (false, false, 0);
    // SAFETY: the calling thread and three local out-parameters.
    let token = unsafe {
        PsReferenceImpersonationToken(PsGetCurrentThread(), &raw mut copy, &raw mut effective, &raw mut level)
    };
    Previous { token, level }
}

fn restore_impersonation(previous: &Previous) {
    if previous.token.is_null() {
        // SAFETY: no preconditions beyond PASSIVE_LEVEL.
        unsafe { PsRevertToSelf() };
        return;
    }
    // SAFETY: the calling thread and the token it impersonated before, still referenced.
    let status = unsafe { PsImpersonateClient(PsGetCurrentThread(), previous.token, false, false, previous.level) };
    assert_eq!(status, STATUS_SUCCESS);
    // SAFETY: the reference PsReferenceImpersonationToken took.
    unsafe { PsDereferenceImpersonationToken(previous.token) };
}

/// Opens the backing as the create's requestor: impersonates its subject context around the open.
fn open_as_requestor(subject: *const SECURITY_SUBJECT_CONTEXT, level: SECURITY_IMPERSONATION_LEVEL) {
    let qos = SECURITY_QUALITY_OF_SERVICE {
        Length: u32::try_from(size_of::<SECURITY_QUALITY_OF_SERVICE>()).expect("small"),
        ImpersonationLevel: level,
        ContextTrackingMode: u8::from(SECURITY_STATIC_TRACKING),
        EffectiveOnly: false,
    };
    // SAFETY: all-zero is a valid SECURITY_CLIENT_CONTEXT to be initialised.
    let mut client: SECURITY_CLIENT_CONTEXT = unsafe { std::mem::zeroed() };
    // SAFETY: the create's subject context, a local quality of service and a local client context.
    let status = unsafe { SeCreateClientSecurityFromSubjectContext(subject, &raw const qos, false, &raw mut client) };
    CLIENT_STATUS.store(status, Ordering::SeqCst);
    if status < 0 {
        OPEN_STATUS.store(status, Ordering::SeqCst);
        return;
    }
    let previous = (mode() != Mode::PlainRevert).then(save_impersonation);
    // SAFETY: the client context just initialised; the calling thread.
    assert_eq!(unsafe { SeImpersonateClientEx(&raw const client, 0) }, STATUS_SUCCESS);
    open_backing(IO_FORCE_ACCESS_CHECK);
    match (&previous, mode()) {
        (_, Mode::NoRestore) => {}
        // SAFETY: no preconditions beyond PASSIVE_LEVEL.
        (None, _) => unsafe { PsRevertToSelf() },
        (Some(previous), _) => restore_impersonation(previous),
    }
    if mode() != Mode::LeakContext {
        // SAFETY: the client context initialised above, deleted once.
        unsafe { SeDeleteClientSecurity(&raw mut client) };
    }
}

unsafe extern "system" fn posted(item: PFLT_DEFERRED_IO_WORKITEM, data: *const FLT_CALLBACK_DATA, _ctx: *const c_void) {
    open_backing(if mode() == Mode::PostedUnchecked { 0 } else { IO_FORCE_ACCESS_CHECK });
    // SAFETY: the pended create's data, completed once.
    unsafe { FltCompletePendedPreOperation(data, FLT_PREOP_SUCCESS_NO_CALLBACK, std::ptr::null()) };
    // SAFETY: the item this routine was queued with.
    unsafe { FltFreeDeferredIoWorkItem(item) };
}

unsafe extern "system" fn pre_create(
    data: *mut FLT_CALLBACK_DATA,
    objects: *const FLT_RELATED_OBJECTS,
    _context: *mut *mut c_void,
) -> FLT_PREOP_CALLBACK_STATUS {
    // SAFETY: Filter Manager passes valid callback data.
    let callback_data = unsafe { &*data };
    // SAFETY: and valid related objects.
    let objects = unsafe { &*objects };
    if !name_of(callback_data).eq_ignore_ascii_case("\\source.txt") {
        return FLT_PREOP_SUCCESS_NO_CALLBACK;
    }
    *FILTER_AND_INSTANCE.lock().expect("lock") = (objects.Filter, objects.Instance);
    match mode() {
        Mode::Plain => {
            open_backing(IO_FORCE_ACCESS_CHECK);
        }
        Mode::Identification => open_as_requestor(subject_of(callback_data), SecurityIdentification),
        Mode::Impersonate | Mode::NoRestore | Mode::PlainRevert | Mode::LeakContext => {
            open_as_requestor(subject_of(callback_data), SecurityImpersonation);
        }
        Mode::PostedPlain | Mode::PostedUnchecked => {
            // SAFETY: no preconditions.
            let item = unsafe { FltAllocateDeferredIoWorkItem() };
            // SAFETY: an allocated item and this create's data.
            let status =
                unsafe { FltQueueDeferredIoWorkItem(item, data, Some(posted), DelayedWorkQueue, std::ptr::null()) };
            assert_eq!(status, STATUS_SUCCESS);
            return FLT_PREOP_PENDING;
        }
    }
    FLT_PREOP_SUCCESS_NO_CALLBACK
}

static OPS: Table<[FLT_OPERATION_REGISTRATION; 2]> =
    Table([operation(0, Some(pre_create), None), operation(END, None, None)]);
static REG: Table<FLT_REGISTRATION> = Table(registration((&raw const OPS.0).cast(), Some(unload)));
fltsim::minifilter_entry_points!(REG, FILTER, entry, unload);

/// A volume whose `\backing.txt` only bob and SYSTEM may read, the opener loaded, and the poster above it when `behind_poster`.
fn setup(mode: Mode, behind_poster: bool) -> Vec<fltsim::LoadedDriver> {
    MODE.store(mode as u8, Ordering::SeqCst);
    let root = io::fresh_root("impersonation");
    std::fs::write(root.join("source.txt"), b"source").expect("seed");
    std::fs::write(root.join("backing.txt"), b"backing data").expect("seed");
    let volume = io::mount(VolumeSpec::ntfs('C', &root));
    // As a typical ACL does, it admits SYSTEM too: the hazard is that SYSTEM's check passes for alice.
    let acl = io::fs::Acl {
        read: vec!["bob".into(), io::fs::SYSTEM.into()],
        write: vec!["bob".into(), io::fs::SYSTEM.into()],
    };
    io::fs::set_acl(&volume, "\\backing.txt", acl).expect("acl");
    fltsim::registry::install_minifilter_service("opener", "Opener", "135000");
    let mut drivers = vec![fltsim::load("opener", entry).expect("opener loads")];
    if behind_poster {
        drivers.push(poster::load().expect("poster loads"));
    }
    drivers
}

fn user(name: &str) -> std::sync::Arc<Process> {
    process::create(r"\Device\HarddiskVolume1\Apps\app.exe", Token { user: name.into(), admin: false })
}

/// Opens `\source.txt` as `who` and closes it; returns the create's status.
fn open_source_as(who: &std::sync::Arc<Process>) -> Result<(), NTSTATUS> {
    process::run_as(who, || iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).map(iomgr::close))
}

scenario! {
    /// In the requestor's own thread the forced check is the requestor's: bob may, alice may not.
    fn in_the_requestors_thread_the_check_is_made_as_the_requestor() {
        let _drivers = setup(Mode::Plain, false);
        assert_eq!(open_source_as(&user("bob")), Ok(()));
        assert_eq!(OPEN_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        assert_eq!(open_source_as(&user("alice")), Ok(()));
        assert_eq!(OPEN_STATUS.load(Ordering::SeqCst), STATUS_ACCESS_DENIED);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// Behind a filter that replays creates from a system worker, the check would be SYSTEM's: alice would get a
    /// file only bob may read.
    fn behind_a_pending_filter_a_plain_check_is_made_as_system_and_reported() {
        let _drivers = setup(Mode::Plain, true);
        assert_eq!(open_source_as(&user("alice")), Ok(()));
        assert_eq!(poster::replayed(), 1);
        assert_eq!(OPEN_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS, "checked as SYSTEM, which may");
        assert_eq!(take_rules(), [Rule::AccessCheckWrongIdentity]);
    }
}

scenario! {
    /// Impersonating the create's subject context makes the check the requestor's again, in the worker too, and
    /// leaves the worker thread as it was.
    fn impersonating_the_subject_context_checks_as_the_requestor_behind_a_pending_filter() {
        let _drivers = setup(Mode::Impersonate, true);
        assert_eq!(open_source_as(&user("alice")), Ok(()));
        assert_eq!(OPEN_STATUS.load(Ordering::SeqCst), STATUS_ACCESS_DENIED);
        assert_eq!(open_source_as(&user("bob")), Ok(()));
        assert_eq!(OPEN_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        assert_eq!(poster::replayed(), 2);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// A requestor thread that impersonates (a server acting for its client) opens as that client.
    fn a_requestor_that_impersonates_is_checked_as_its_client() {
        let _drivers = setup(Mode::Impersonate, true);
        let server = user("server");
        let opened = process::run_as(&server, || {
            process::impersonate(Token { user: "bob".into(), admin: false }, || {
                iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).map(iomgr::close)
            })
        });
        assert_eq!(opened, Ok(()));
        assert_eq!(OPEN_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS, "checked as bob, the server's client");
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_callback_that_leaves_its_thread_impersonating_is_reported() {
        let _drivers = setup(Mode::NoRestore, false);
        assert_eq!(open_source_as(&user("bob")), Ok(()));
        assert_eq!(take_rules(), [Rule::ImpersonationNotRestored]);
        assert_eq!(process::impersonation(), None, "the model put the thread back");
    }
}

scenario! {
    /// The requestor's thread impersonated its own client before; ending all impersonation is not restoring it.
    fn reverting_a_thread_that_was_impersonating_is_reported() {
        let _drivers = setup(Mode::PlainRevert, false);
        let server = user("server");
        let bob = Token { user: "bob".into(), admin: false };
        let opened = process::run_as(&server, || {
            process::impersonate(bob.clone(), || {
                let opened = iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).map(iomgr::close);
                assert_eq!(process::effective_token(), bob, "still the server's client afterwards");
                opened
            })
        });
        assert_eq!(opened, Ok(()));
        assert_eq!(take_rules(), [Rule::ImpersonationNotRestored]);
    }
}

scenario! {
    /// Reverting is right for a thread that did not impersonate before.
    fn reverting_a_thread_that_was_not_impersonating_is_quiet() {
        let _drivers = setup(Mode::PlainRevert, false);
        assert_eq!(open_source_as(&user("bob")), Ok(()));
        assert_eq!(OPEN_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    fn a_client_security_context_never_deleted_is_reported_at_unload() {
        let mut drivers = setup(Mode::LeakContext, false);
        assert_eq!(open_source_as(&user("bob")), Ok(()));
        drivers.remove(0).unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::SecurityReferenceLeak]);
    }
}

scenario! {
    /// At `SecurityIdentification` the thread may identify bob but not act as him: the open fails.
    fn an_identification_level_impersonation_cannot_open_for_its_client() {
        let _drivers = setup(Mode::Identification, false);
        assert_eq!(open_source_as(&user("bob")), Ok(()));
        assert_eq!(CLIENT_STATUS.load(Ordering::SeqCst), STATUS_SUCCESS);
        assert_eq!(OPEN_STATUS.load(Ordering::SeqCst), STATUS_BAD_IMPERSONATION_LEVEL);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// The docs: a client impersonating at identification level cannot be passed on.
    fn a_client_that_impersonates_at_identification_level_cannot_be_impersonated() {
        let _drivers = setup(Mode::Impersonate, false);
        let server = user("server");
        let opened = process::run_as(&server, || {
            process::impersonate_at(Token { user: "bob".into(), admin: false }, SecurityIdentification, || {
                iomgr::create(r"C:\source.txt", &iomgr::OpenParams::default()).map(iomgr::close)
            })
        });
        assert_eq!(opened, Err(STATUS_BAD_IMPERSONATION_LEVEL), "the requestor's own open checks at its level");
        assert_eq!(CLIENT_STATUS.load(Ordering::SeqCst), STATUS_BAD_IMPERSONATION_LEVEL);
        assert_eq!(take_rules(), []);
    }
}

scenario! {
    /// A work item servicing a user's create opens on its behalf: the check would be SYSTEM's.
    fn an_open_from_a_work_item_servicing_a_users_create_is_checked_for_identity() {
        let _drivers = setup(Mode::PostedPlain, false);
        assert_eq!(open_source_as(&user("alice")), Ok(()));
        assert_eq!(take_rules(), [Rule::AccessCheckWrongIdentity]);
    }
}

scenario! {
    fn an_unchecked_open_from_a_work_item_servicing_a_users_create_is_reported() {
        let _drivers = setup(Mode::PostedUnchecked, false);
        assert_eq!(open_source_as(&user("alice")), Ok(()));
        assert_eq!(take_rules(), [Rule::UncheckedOpenForUser]);
    }
}

scenario! {
    /// A system worker routine that returns impersonating leaves a pool thread acting as a user.
    fn a_work_item_that_returns_impersonating_is_reported() {
        drop(fltsim::kernel::work::queue(|| {
            // SAFETY: the calling thread and a token object the model handed out for this thread's own process.
            let mut context: SECURITY_SUBJECT_CONTEXT = fltsim::kernel::security::subject_context();
            context.ClientToken = context.PrimaryToken;
            context.ImpersonationLevel = SecurityImpersonation;
            let token = context.PrimaryToken;
            // SAFETY: the calling thread and a token object the model handed out.
            let status = unsafe { PsImpersonateClient(PsGetCurrentThread(), token, false, false, SecurityImpersonation) };
            assert_eq!(status, STATUS_SUCCESS);
        }));
        fltsim::kernel::work::drain();
        assert_eq!(take_rules(), [Rule::ImpersonationNotRestored]);
    }
}

scenario! {
    /// Misuse of the routines themselves is reported and refused.
    fn the_security_routines_check_their_arguments() {
        // SAFETY: all-zero is a valid SECURITY_CLIENT_CONTEXT value; the model checks it is not a live one.
        let mut stranger: SECURITY_CLIENT_CONTEXT = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { SeImpersonateClientEx(&raw const stranger, 0) }, STATUS_INVALID_PARAMETER);
        // SAFETY: as above.
        unsafe { SeDeleteClientSecurity(&raw mut stranger) };
        // SAFETY: NULL does nothing, as the docs say; a stranger is reported.
        unsafe { PsDereferenceImpersonationToken(std::ptr::null()) };
        // SAFETY: the model checks the value.
        unsafe { PsDereferenceImpersonationToken(std::ptr::without_provenance(0x1234)) };
        let (mut copy, mut effective, mut level) = (true, true, 0);
        // SAFETY: the calling thread and local out-parameters.
        let none = unsafe {
            PsReferenceImpersonationToken(PsGetCurrentThread(), &raw mut copy, &raw mut effective, &raw mut level)
        };
        assert!(none.is_null(), "a thread that does not impersonate has no impersonation token");
        assert_eq!(
            take_rules(),
            [Rule::InvalidArgument, Rule::InvalidArgument, Rule::InvalidArgument],
            "unknown client context twice, unknown token once"
        );
        let other = std::thread::spawn(|| PsGetCurrentThread()).join().expect("thread");
        assert_ne!(other, PsGetCurrentThread(), "each thread has its own PETHREAD");
        assert_eq!(PsGetCurrentThread(), PsGetCurrentThread(), "stable for the thread's life");
        // SAFETY: another thread's PETHREAD: the model only lets a thread change its own security.
        let status = unsafe { PsImpersonateClient(other, std::ptr::null(), false, false, SecurityImpersonation) };
        assert_ne!(status, STATUS_SUCCESS);
        assert_eq!(take_rules(), [Rule::UnsupportedByModel]);
        thread::at_irql(irql::DISPATCH, || {
            // SAFETY: no preconditions beyond the IRQL, which is the point.
            unsafe { PsRevertToSelf() };
        });
        assert_eq!(take_rules(), [Rule::IrqlTooHigh]);
    }
}
