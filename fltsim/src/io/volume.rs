//! Volumes: what a filter instance attaches to.

use std::{
    path::PathBuf,
    sync::{Mutex, MutexGuard, PoisonError},
};

use windows_sys::{
    Wdk::Storage::FileSystem::Minifilters::PFLT_VOLUME,
    Win32::{
        Storage::InstallableFileSystems::{FLT_FILESYSTEM_TYPE, FLT_FSTYPE_NTFS},
        System::Ioctl::FILE_DEVICE_DISK_FILE_SYSTEM,
    },
};

/// How to mount a volume.
#[derive(Clone, Debug)]
pub struct VolumeSpec {
    /// The drive letter, if it has one.
    pub drive_letter: Option<char>,
    /// `FILE_DEVICE_*` of the volume's device (`FILE_DEVICE_DISK_FILE_SYSTEM` for local disks,
    /// `FILE_DEVICE_NETWORK_FILE_SYSTEM` for redirectors).
    pub device_type: u32,
    /// `FLT_FSTYPE_*` of the file system.
    pub file_system: FLT_FILESYSTEM_TYPE,
    /// Bytes per sector (512 or 4096).
    pub sector_size: u32,
    /// The device's buffer alignment mask (`FILE_*_ALIGNMENT`), as `FltGetVolumeProperties` reports it.
    pub alignment_requirement: u32,
    /// The host directory holding the volume's files.
    pub root: PathBuf,
}

impl VolumeSpec {
    /// An NTFS disk volume with 512-byte sectors rooted at `root`.
    #[must_use]
    pub fn ntfs(drive_letter: char, root: impl Into<PathBuf>) -> Self {
        Self {
            drive_letter: Some(drive_letter),
            device_type: FILE_DEVICE_DISK_FILE_SYSTEM,
            file_system: FLT_FSTYPE_NTFS,
            sector_size: 512,
            alignment_requirement: windows_sys::Wdk::System::SystemServices::FILE_WORD_ALIGNMENT,
            root: root.into(),
        }
    }
}

/// A mounted volume.
#[derive(Clone, Debug)]
pub struct Volume {
    /// The handle Filter Manager routines take (`PFLT_VOLUME`).
    pub handle: PFLT_VOLUME,
    /// `\Device\HarddiskVolumeN`.
    pub device_name: String,
    /// `\??\Volume{GUID}`: stable across boots, unlike the device number.
    pub guid_name: String,
    /// What it was mounted with.
    pub spec: VolumeSpec,
}

static VOLUMES: Mutex<Vec<Volume>> = Mutex::new(Vec::new());

fn all() -> MutexGuard<'static, Vec<Volume>> {
    VOLUMES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Mounts a volume and attaches the instances of every started filter to it, as a newly mounted volume.
#[expect(clippy::must_use_candidate, reason = "mounting is done for its effect; callers often ignore the volume")]
pub fn mount(spec: VolumeSpec) -> Volume {
    let volume = {
        let mut volumes = all();
        let number = volumes.len() + 1;
        let base: usize = 0x0000_7ff2_2000_0000;
        let volume = Volume {
            handle: base.wrapping_add(number.wrapping_mul(0x1000)).cast_signed(),
            device_name: format!(r"\Device\HarddiskVolume{number}"),
            guid_name: format!(r"\??\Volume{{5d1c0f00-0000-4000-8000-{number:012x}}}"),
            spec,
        };
        volumes.push(volume.clone());
        volume
    };
    crate::fltmgr::instance::attach_started_filters(&volume);
    volume
}

/// A fresh, empty host directory to root a test volume in: `fltsim-<name>-<pid>` under the temporary directory,
/// removed first if an earlier run left it behind.
///
/// # Panics
/// When the directory cannot be created: the test cannot run at all.
#[must_use]
pub fn fresh_root(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("fltsim-{name}-{}", std::process::id()));
    // Absent is the usual case; anything else shows up when it is created below.
    drop(std::fs::remove_dir_all(&root));
    std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("cannot create the volume root {}: {e}", root.display()));
    root
}

/// Every mounted volume, in mount order.
#[must_use]
pub fn volumes() -> Vec<Volume> {
    all().clone()
}
