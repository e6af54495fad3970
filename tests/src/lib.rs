//! Helpers shared by Shunt's scenario and artifact tests: where the workspace and the built artifacts are.

use std::path::{Path, PathBuf};

/// The workspace root.
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from(".."), Path::to_path_buf)
}
