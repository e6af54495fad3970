//! Byte-range locks: the file system's, as programs see them, and a filter's own (`FltAllocateFileLock`), which a
//! filter that serves data itself keeps and checks.

use fltsim::{
    Rule,
    io::{self, VolumeSpec, iomgr},
    kernel::process,
    scenario,
    testfilters::locker,
    verifier::{take_reports, take_rules},
};
use windows_sys::Win32::{
    Foundation::{STATUS_FILE_LOCK_CONFLICT, STATUS_LOCK_NOT_GRANTED},
    Storage::FileSystem::{FILE_READ_DATA, FILE_SHARE_READ, FILE_SHARE_WRITE, FILE_WRITE_DATA},
};

fn setup() {
    let root = io::fresh_root("locks");
    std::fs::write(root.join("data.bin"), b"0123456789").expect("seed");
    io::mount(VolumeSpec::ntfs('C', &root));
}

fn open_as(name: &str) -> iomgr::Handle {
    let app = process::create(
        &format!(r"\Device\HarddiskVolume1\{name}.exe"),
        process::Token { user: name.into(), admin: false },
    );
    let params = iomgr::OpenParams {
        desired_access: FILE_READ_DATA | FILE_WRITE_DATA,
        share_access: FILE_SHARE_READ | FILE_SHARE_WRITE,
        ..Default::default()
    };
    process::run_as(&app, || iomgr::create(r"C:\data.bin", &params)).expect("open")
}

scenario! {
    /// Exclusive locks keep other handles out of the range until the owner unlocks or closes; a shared lock keeps
    /// even its owner from writing.
    fn the_file_systems_locks_arbitrate_between_handles() {
        setup();
        let a = open_as("alice");
        let b = open_as("bob");
        iomgr::lock(&a, 0, 4, 0, true).expect("exclusive lock");
        assert_eq!(iomgr::lock(&b, 2, 1, 0, false), Err(STATUS_LOCK_NOT_GRANTED));
        assert_eq!(iomgr::read(&b, Some(0), 4), Err(STATUS_FILE_LOCK_CONFLICT));
        assert_eq!(iomgr::read(&b, Some(4), 2).expect("outside the range"), b"45");
        assert_eq!(iomgr::read(&a, Some(0), 4).expect("the owner reads"), b"0123");
        iomgr::unlock(&a, 0, 4, 0).expect("unlock");
        assert_eq!(iomgr::read(&b, Some(0), 4).expect("unlocked"), b"0123");
        iomgr::lock(&a, 6, 2, 0, false).expect("shared lock");
        assert_eq!(iomgr::write(&a, Some(6), b"xx"), Err(STATUS_FILE_LOCK_CONFLICT));
        iomgr::lock(&a, 0, 1, 0, true).expect("another lock");
        iomgr::close(a);
        assert_eq!(iomgr::write(&b, Some(0), b"Z").expect("cleanup released alice's locks"), 1);
        assert!(take_reports().is_empty());
    }
}

scenario! {
    /// A filter that keeps a file's locks itself completes lock requests with FltProcessFileLock, refuses reads
    /// that conflict, and releases a handle's locks at cleanup.
    fn a_filter_keeps_a_files_locks_itself() {
        setup();
        let mut driver = locker::load().expect("load");
        let a = open_as("alice");
        let b = open_as("bob");
        iomgr::lock(&a, 0, 4, 0, true).expect("the filter grants it");
        assert_eq!(iomgr::lock(&b, 0, 1, 0, true), Err(STATUS_LOCK_NOT_GRANTED));
        assert_eq!(iomgr::read(&b, Some(0), 2), Err(STATUS_FILE_LOCK_CONFLICT), "the filter refuses the read");
        iomgr::close(a);
        assert_eq!(iomgr::read(&b, Some(0), 2).expect("released at cleanup"), b"01");
        iomgr::close(b);
        driver.unload(false).expect("unload");
        assert!(take_reports().is_empty());
    }
}

scenario! {
    fn a_file_lock_never_freed_is_reported_at_unload() {
        setup();
        locker::leak_lock_at_unload();
        let mut driver = locker::load().expect("load");
        driver.unload(false).expect("unload");
        assert_eq!(take_rules(), [Rule::FileLockLeak]);
    }
}
