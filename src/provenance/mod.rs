//! Reads become provenance: what a mount's readers read (the read
//! manifest), a Provena model run record made from it, and its
//! registration at the provenance API.
//!
//! - [`who`]: which process (UID, PID, command, Slurm job) opened a file;
//! - [`manifest`]: the daemon's record of object versions read, per
//!   reader, and its snapshots (`provenafs provenance`, the file written
//!   on unmount);
//! - [`model_run`]: a `ModelRunRecord` skeleton from a snapshot;
//! - [`register`]: `POST /model_run/register` and the job it starts;
//! - [`checkpoint`]: the manifest file beside the mount's log, written
//!   while mounted and on unmount.
//!
//! docs/provenance.md says what is recorded, what is not, and the
//! provenance API facts (with their sources) this relies on.

pub mod checkpoint;
pub mod manifest;
pub mod model_run;
pub mod register;
pub mod who;

pub use manifest::{Filter, Manifest, Opened, Snapshot, Tally};
pub use who::{Who, WhoCache};

/// Where a mount's manifest is written when it ends: beside its log, its
/// name with `.provenance.json` for `.log` (`job.log` →
/// `job.provenance.json`), or in the state folder under the mountpoint's
/// name when it logs to the terminal.
pub fn manifest_path(
    log_file: Option<&std::path::Path>,
    mountpoint: &std::path::Path,
) -> Option<std::path::PathBuf> {
    // A log that is a device (`--log-file /dev/null`) has no folder of
    // its own for a manifest: the state folder's name then.
    let log = log_file
        .filter(|p| !p.starts_with("/dev"))
        .map(std::path::Path::to_path_buf)
        .or_else(|| crate::logfile::default_path(mountpoint))?;
    let stem = log.file_stem()?.to_string_lossy().into_owned();
    Some(log.with_file_name(format!("{stem}.provenance.json")))
}

/// Writes `snap` to `path` (0600: it names the user's processes), through
/// a temporary file of a name nobody can guess, so a reader never sees
/// half of it. A manifest already there of an earlier mount at the same
/// mountpoint is kept under its mount time:
/// `<name>.provenance.<mounted_at>.json`; one of this same mount (an
/// earlier checkpoint) is replaced.
/// `ours` says the file at `path` is known to be this mount's own earlier
/// write (the same inode it last wrote), so it is replaced without being
/// read.
/// Written compact (one line): `provenafs provenance --from FILE --json`
/// prints it for people. Returns the bytes written.
pub fn write_snapshot(path: &std::path::Path, snap: &Snapshot, ours: bool) -> std::io::Result<u64> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let mut f = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempfile_in(dir)?;
    let text = serde_json::to_vec(snap).map_err(std::io::Error::other)?;
    f.write_all(&text)?;
    f.write_all(b"\n")?;
    f.as_file().sync_all()?;
    // An earlier mount's manifest is read only if it is a file of ours: a
    // file another user put at this name is never taken for one.
    if let Some(old) = (!ours).then(|| read_ours(path)).flatten() {
        if let Some(earlier) = serde_json::from_slice::<Snapshot>(&old)
            .ok()
            .filter(|e| !(e.mounted_at == snap.mounted_at && e.mountpoint == snap.mountpoint))
        {
            let stamp = earlier.mounted_at.format("%Y%m%dT%H%M%SZ");
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(kept) = name.as_deref().and_then(|n| n.strip_suffix(".json")) {
                let _ = std::fs::rename(path, dir.join(format!("{kept}.{stamp}.json")));
            }
        }
    }
    f.persist(path).map_err(|e| e.error)?;
    Ok(text.len() as u64 + 1)
}

/// The content of `path` if it is a regular file of this user's (never
/// following a symlink, never blocking on a FIFO; at most 1 GiB).
fn read_ours(path: &std::path::Path) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let md = f.metadata().ok()?;
    if !md.is_file() || md.uid() != nix::unistd::geteuid().as_raw() {
        return None;
    }
    let mut out = Vec::new();
    f.take(1 << 30).read_to_end(&mut out).ok()?;
    Some(out)
}

/// Refuses a manifest path where a file of someone else's, or anything
/// but a regular file, already is (a name another user could guess in a
/// shared folder such as `/tmp`): a job script reading the manifest there
/// must never read theirs. Errors: one line naming the path.
pub fn check_manifest_path(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(md) if md.is_file() && md.uid() == nix::unistd::geteuid().as_raw() => Ok(()),
        Ok(md) => Err(format!(
            "{} is already there and is not a file of yours (owner uid {}): the read manifest \
             goes beside the log; choose another --log-file",
            path.display(),
            md.uid()
        )),
    }
}

/// The name prefix of [`write_snapshot`]'s temporary files for `path`
/// (`.mnt.provenance.json.` + random): a daemon killed while writing
/// leaves one, which the next mount with that log removes.
pub(crate) fn temp_prefix(path: &std::path::Path) -> String {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    format!(".{}.", name.as_deref().unwrap_or("provenance"))
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
        let beside_dev_null = manifest_path(Some(Path::new("/dev/null")), Path::new("/mnt"));
        assert!(beside_dev_null.is_none_or(|p| !p.starts_with("/dev")));
    }
}
