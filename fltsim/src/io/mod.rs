//! The I/O model: volumes rooted in host directories.
//!
//! Each volume has a device name (`\Device\HarddiskVolumeN`), a volume GUID name, a drive letter, a device and
//! file-system type and a sector size. Filter Manager attaches instances of started filters to every mounted
//! volume (see [`crate::fltmgr::instance`]).

pub mod fs;
pub mod fsctl;
pub mod info;
pub mod iomgr;
pub mod locks;
pub mod mm;
pub mod oplock;
pub mod volume;
pub mod zw;

pub use volume::{Volume, VolumeSpec, fresh_root, mount, volumes};
