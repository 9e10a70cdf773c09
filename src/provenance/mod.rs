//! Reads become provenance: what a mount's readers read (the read
//! manifest), a Provena model run record made from it, and its
//! registration at the provenance API.
//!
//! - [`who`]: which process (UID, PID, command, Slurm job) opened a file;
//! - [`manifest`]: the daemon's record of object versions read, per
//!   reader, and its snapshots (`provenafs provenance`, the file written
//!   on unmount);
//! - [`model_run`]: a `ModelRunRecord` skeleton from a snapshot;
//! - [`register`]: `POST /model_run/register` and the job it starts.
//!
//! docs/provenance.md says what is recorded, what is not, and the
//! provenance API facts (with their sources) this relies on.

pub mod manifest;
pub mod model_run;
pub mod register;
pub mod who;

pub use manifest::{Filter, Manifest, Opened, Snapshot, Tally};
pub use who::{Who, WhoCache};

/// Where a mount's manifest is written when it ends: beside its log
/// (`<log>.provenance.json` for `<log>.log`), or in the state folder under
/// the mountpoint's name when it logs to the terminal.
pub fn manifest_path(
    log_file: Option<&std::path::Path>,
    mountpoint: &std::path::Path,
) -> Option<std::path::PathBuf> {
    let log = log_file
        .map(std::path::Path::to_path_buf)
        .or_else(|| crate::logfile::default_path(mountpoint))?;
    let stem = log.file_stem()?.to_string_lossy().into_owned();
    Some(log.with_file_name(format!("{stem}.provenance.json")))
}

/// Writes `snap` to `path` (0600: it names the user's processes), through
/// a temporary file, so a reader never sees half of it.
pub fn write_snapshot(path: &std::path::Path, snap: &Snapshot) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name()
            .map_or("provenance".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let text = serde_json::to_vec_pretty(snap).map_err(std::io::Error::other)?;
    f.write_all(&text)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_manifest_goes_beside_the_log() {
        assert_eq!(
            manifest_path(Some(Path::new("/var/log/job/mnt.log")), Path::new("/mnt")),
            Some("/var/log/job/mnt.provenance.json".into())
        );
    }
}
