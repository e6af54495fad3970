//! Helpers shared by Shunt's scenario and artifact tests: where the workspace and the built artifacts are, and how
//! to read a PE image.
//!
//! Artifact tests never skip: a missing driver or package fails the test with the command that builds it.

use std::{
    fs,
    path::{Path, PathBuf},
};

/// The workspace root.
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}

/// A Windows architecture Shunt ships a driver for.
#[derive(Clone, Copy, Debug)]
pub struct Arch {
    /// The short name used in paths.
    pub name: &'static str,
    /// `IMAGE_FILE_HEADER::Machine` of its images.
    pub machine: u16,
}

/// Every architecture Shunt ships a driver for.
pub const ARCHES: [Arch; 2] = [
    Arch { name: "x64", machine: object::pe::IMAGE_FILE_MACHINE_AMD64 },
    Arch { name: "arm64", machine: object::pe::IMAGE_FILE_MACHINE_ARM64 },
];

/// Reads a build artifact, failing (never skipping) with the command that produces it when it is missing.
///
/// # Panics
/// When the file cannot be read.
#[must_use]
pub fn read_artifact(path: &Path, produced_by: &str) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| {
        panic!("{} is missing ({e}); run `{produced_by}` first (the README's test command does)", path.display())
    })
}

/// The directory `cargo xtask build-driver` writes the driver of `arch` into.
#[must_use]
pub fn driver_dir(arch: &Arch) -> PathBuf {
    workspace_root().join("target").join("driver").join(arch.name)
}

/// The built (unsigned) `shunt.sys` of `arch`.
#[must_use]
pub fn built_driver(arch: &Arch) -> Vec<u8> {
    read_artifact(&driver_dir(arch).join("shunt.sys"), "cargo xtask build-driver")
}

/// The offset of `OptionalHeader.CheckSum` in a PE image.
///
/// # Panics
/// When the image is too short to hold a PE header.
#[must_use]
pub fn checksum_offset(image: &[u8]) -> usize {
    let pe = u32::from_le_bytes(image[0x3c..0x40].try_into().expect("e_lfanew")) as usize;
    // "PE\0\0", then the 20-byte file header, then CheckSum at offset 64 of the optional header.
    pe + 4 + 20 + 64
}

/// The PE checksum of `image` as the kernel loader and `imagehlp!CheckSumMappedFile` compute it: the 16-bit
/// one's-complement-style sum of the file with the checksum field taken as zero, plus the file length.
///
/// # Panics
/// When the image is too short to hold a PE header.
#[must_use]
pub fn pe_checksum(image: &[u8]) -> u32 {
    let skip = checksum_offset(image);
    let mut sum: u64 = 0;
    for (i, chunk) in image.chunks(2).enumerate() {
        let offset = i * 2;
        if offset == skip || offset == skip + 2 {
            continue;
        }
        let word = u64::from(chunk[0]) | chunk.get(1).map_or(0, |&b| u64::from(b) << 8);
        sum += word;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    u32::try_from(sum + image.len() as u64).expect("checksum fits in 32 bits")
}

/// The checksum stored in the image's optional header.
///
/// # Panics
/// When the image is too short to hold a PE header.
#[must_use]
pub fn stored_checksum(image: &[u8]) -> u32 {
    let at = checksum_offset(image);
    u32::from_le_bytes(image[at..at + 4].try_into().expect("checksum field"))
}

/// Installs Shunt's service into fltsim's registry from `inf/shunt.inf`, as installing the INF on the simulated
/// Windows build would.
///
/// # Panics
/// When the INF cannot be read or installed.
#[cfg(not(windows))]
pub fn install_shunt_inf() {
    let inf = fs::read_to_string(workspace_root().join("inf/shunt.inf")).expect("inf/shunt.inf");
    let service = fltsim::registry::install_inf(&inf, "NTamd64").expect("install inf/shunt.inf");
    assert_eq!(service, shunt::SERVICE_NAME, "the INF installs the driver's service");
}
