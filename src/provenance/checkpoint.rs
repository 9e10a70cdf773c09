//! The manifest file a mount writes beside its log: on unmount, and every
//! [`EVERY`] while it changes, so a daemon killed outright (the OOM killer,
//! `scancel -s KILL`, a node's watchdog) still leaves what its readers had
//! read up to the last checkpoint.
//!
//! That folder is often an NFS home: every write goes through a
//! [`Folder`] (see [`crate::folder`]), so one that hangs costs checkpoints,
//! never a thread of the mount, and the daemon's exit waits for the final
//! write no longer than the stall timeout. A large manifest is written
//! less often: at most about 1 MiB per [`EVERY`] on average.

use super::{write_snapshot, Filter, Manifest};
use crate::folder::Folder;
use crate::task::AbortOnDrop;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often a changed manifest is written while mounted. A checkpoint of
/// a few thousand (version, reader) pairs costs milliseconds; a Slurm job
/// killed without SIGTERM loses at most this much.
pub const EVERY: Duration = Duration::from_secs(30);

/// Bytes a checkpoint may write per [`EVERY`] on average: a larger
/// manifest waits longer before its next checkpoint.
pub const BYTES_PER_PERIOD: u64 = 1 << 20;

/// Overrides [`EVERY`] (whole seconds, ≥ 1): the tests' knob.
pub const EVERY_ENV: &str = "PROVENAFS_MANIFEST_EVERY_SECS";

/// The checkpoint interval: [`EVERY_ENV`] if it holds a whole number of
/// seconds ≥ 1, else [`EVERY`].
pub fn every() -> Duration {
    std::env::var(EVERY_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&s| s >= 1)
        .map_or(EVERY, Duration::from_secs)
}

/// One mount's manifest file. Writes are serialised, so the final one on
/// unmount cannot be overtaken by a checkpoint still being written.
pub struct ManifestFile {
    manifest: Arc<Manifest>,
    path: PathBuf,
    folder: Folder,
    /// What the last write held, and the inode it wrote (a file at `path`
    /// with another inode is not ours: an earlier mount's, kept).
    written: Mutex<Option<(super::manifest::Fingerprint, u64)>>,
    /// The final write is made: a checkpoint still queued must not
    /// replace it with an unmarked file.
    finished: std::sync::atomic::AtomicBool,
}

impl ManifestFile {
    /// The manifest file at `path`, its writes bounded by `stall` (see
    /// the module docs). Temporary files a killed daemon left beside it
    /// are removed. Errors: something not ours is already at `path` (see
    /// [`super::check_manifest_path`]), or its folder does not answer.
    pub fn new(manifest: Arc<Manifest>, path: PathBuf, stall: Duration) -> Result<Self, String> {
        let dir = path
            .parent()
            .unwrap_or(std::path::Path::new("/"))
            .to_path_buf();
        let folder = Folder::new(
            "read manifest folder",
            &dir,
            "the read manifest is not checkpointed",
            stall,
            2,
        );
        let p = path.clone();
        let held = folder
            .run_blocking("check the read manifest", move || {
                super::check_manifest_path(&p).map_err(std::io::Error::other)?;
                remove_stale_temps(&p);
                // Not holding it (no such folder yet, a read-only one) is
                // no reason not to mount: the writes say why later.
                Ok(hold_the_name(&p).ok().flatten())
            })
            .map_err(|e| match e {
                crate::folder::FolderError::Io(e) => e.to_string(),
                e => format!("the folder of {} is {e}", path.display()),
            })?;
        let empty = manifest.fingerprint();
        Ok(Self {
            manifest,
            path,
            folder,
            written: Mutex::new(held.map(|ino| (empty, ino))),
            finished: Default::default(),
        })
    }

    /// Writes the manifest if it changed since the last write (and holds
    /// anything at all). Returns the bytes written (`None`: nothing); an
    /// error is logged, and the next call tries again. Blocking: a call
    /// into the folder (see [`ManifestFile::spawn_checkpoints`]).
    pub fn write_if_changed(&self) -> Option<u64> {
        self.write(false)
    }

    /// The write as the mount ends: always (when anything was read), and
    /// marked with `ended_at`, so a job script waiting for the final file
    /// does not take the last checkpoint for it. Waits for a folder that
    /// does not answer no longer than the stall timeout.
    pub fn finish(self: &Arc<Self>) {
        let me = self.clone();
        match self
            .folder
            .run_blocking_patient("write the read manifest", move || Ok(me.write(true)))
        {
            Ok(Some(_)) => info!(path = %self.path.display(), "read manifest written"),
            Ok(None) => {}
            Err(e) => warn!(
                path = %self.path.display(),
                "the read manifest was not written: its folder is {e}"
            ),
        }
    }

    fn write(&self, last: bool) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        use std::sync::atomic::Ordering;
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        // Under the lock the final write holds while it writes.
        if self.finished.load(Ordering::Relaxed) {
            return None;
        }
        if last {
            self.finished.store(true, Ordering::Relaxed);
        }
        let now = self.manifest.fingerprint();
        if now.is_empty() && last {
            // Nothing read: the name held since the start goes, if it is
            // still our empty file.
            if let Some((_, ino)) = *written {
                let md = std::fs::symlink_metadata(&self.path).ok();
                if md.is_some_and(|m| m.ino() == ino && m.len() == 0) {
                    let _ = std::fs::remove_file(&self.path);
                }
            }
            return None;
        }
        if now.is_empty() || (!last && written.as_ref().map(|w| w.0) == Some(now)) {
            return None;
        }
        let mut snap = self.manifest.snapshot(&Filter::default());
        if last {
            snap.ended_at = Some(chrono::Utc::now());
        }
        let ino = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| m.ino());
        let ours = written.is_some_and(|w| Some(w.1) == ino(&self.path));
        match write_snapshot(&self.path, &snap, ours) {
            Ok(n) => {
                *written = ino(&self.path).map(|i| (now, i));
                Some(n)
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot write the read manifest");
                None
            }
        }
    }

    /// Checkpoints every `every` (longer after a large write: at most
    /// about [`BYTES_PER_PERIOD`] per `every` on average), each through
    /// the folder, until the handle is dropped.
    pub fn spawn_checkpoints(
        self: &Arc<Self>,
        every: Duration,
        rt: &tokio::runtime::Handle,
    ) -> AbortOnDrop {
        let me = self.clone();
        let task = rt.spawn(async move {
            let mut wait = every;
            loop {
                tokio::time::sleep(wait).await;
                let m = me.clone();
                let wrote = me
                    .folder
                    .run_patient("checkpoint the read manifest", move || {
                        Ok(m.write_if_changed())
                    })
                    .await;
                wait = every;
                if let Ok(Some(n)) = wrote {
                    debug!(bytes = n, "read manifest checkpointed");
                    wait = every.mul_f64((n as f64 / BYTES_PER_PERIOD as f64).max(1.0));
                }
            }
        });
        AbortOnDrop(task.abort_handle())
    }
}

/// Makes an empty file of ours at `path` if nothing is there, so that no
/// one else can put one there before the first checkpoint (in a sticky
/// folder such as `/tmp`, a file another user made could not be replaced,
/// and would be read as the manifest): its inode, if made.
fn hold_the_name(path: &std::path::Path) -> std::io::Result<Option<u64>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(Some(f.metadata()?.ino())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `write_snapshot`'s temporary files for `path` (see
/// `temp_prefix`): only a daemon killed mid-write leaves one.
fn remove_stale_temps(path: &std::path::Path) {
    let (Some(dir), prefix) = (path.parent(), super::temp_prefix(path)) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provenance::{Opened, Snapshot, Who};

    const STALL: Duration = Duration::from_secs(5);

    fn opened(m: &Manifest, key: &str) -> Arc<crate::provenance::Tally> {
        let what = Opened {
            handle: "10378.1/1",
            name: None,
            key,
            etag: "e1",
            size: 10,
        };
        m.opened(&what, Arc::new(Who::default()))
    }

    fn read(path: &std::path::Path) -> Snapshot {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn writes_only_what_changed_and_replaces_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt.provenance.json");
        let m = Arc::new(Manifest::new("/mnt"));
        let f = Arc::new(ManifestFile::new(m.clone(), path.clone(), STALL).unwrap());
        assert!(
            f.write_if_changed().is_none(),
            "nothing read, nothing written"
        );
        // The name is held from the start (an empty file of ours), so no
        // one else can put a file there before the first checkpoint.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let t = opened(&m, "a");
        assert!(f.write_if_changed().is_some());
        assert!(f.write_if_changed().is_none(), "unchanged");
        t.read(5);
        assert!(f.write_if_changed().is_some(), "a read changes it");
        assert_eq!(read(&path).datasets[0].files[0].bytes_read, 5);
        opened(&m, "a");
        assert!(f.write_if_changed().is_some(), "an open changes it");
        assert_eq!(read(&path).ended_at, None, "a checkpoint");
        opened(&m, "b");
        f.finish();
        let last = read(&path);
        assert_eq!(last.datasets[0].files.len(), 2);
        assert!(last.ended_at.is_some(), "the final write is marked");
        // A checkpoint queued before the end never replaces it.
        opened(&m, "c");
        assert!(f.write_if_changed().is_none());
        assert!(read(&path).ended_at.is_some());
        // Only the one file: its own checkpoints were replaced.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn an_earlier_mounts_manifest_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt.provenance.json");
        let earlier = Arc::new(Manifest::new("/mnt"));
        opened(&earlier, "a");
        Arc::new(ManifestFile::new(earlier, path.clone(), STALL).unwrap()).finish();
        std::thread::sleep(Duration::from_millis(5));
        let m = Arc::new(Manifest::new("/mnt"));
        opened(&m, "b");
        let f = Arc::new(ManifestFile::new(m, path.clone(), STALL).unwrap());
        assert!(f.write_if_changed().is_some());
        opened(&f.manifest, "c");
        assert!(f.write_if_changed().is_some());
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(read(&path).datasets[0].files.len(), 2);
    }

    #[test]
    fn a_killed_writers_temporary_files_go_with_the_next_mount() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt.provenance.json");
        let left = dir
            .path()
            .join(format!("{}x1y2z3", crate::provenance::temp_prefix(&path)));
        let other = dir.path().join(".other.provenance.json.x1y2z3");
        std::fs::write(&left, "{").unwrap();
        std::fs::write(&other, "{").unwrap();
        let f = Arc::new(ManifestFile::new(Arc::new(Manifest::new("/mnt")), path, STALL).unwrap());
        opened(&f.manifest, "a");
        f.finish();
        assert!(!left.exists());
        assert!(other.exists(), "another mount's is not ours to remove");
    }

    #[test]
    fn a_mount_that_read_nothing_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt.provenance.json");
        let f = Arc::new(
            ManifestFile::new(Arc::new(Manifest::new("/mnt")), path.clone(), STALL).unwrap(),
        );
        assert!(path.exists(), "held");
        f.finish();
        assert!(!path.exists());
    }

    #[test]
    fn a_file_of_someone_elses_at_the_manifests_name_fails_the_mount() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt.provenance.json");
        std::os::unix::fs::symlink("/etc/passwd", &path).unwrap();
        let e = ManifestFile::new(Arc::new(Manifest::new("/mnt")), path.clone(), STALL)
            .err()
            .unwrap();
        assert!(e.contains("not a file of yours"), "{e}");
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(ManifestFile::new(Arc::new(Manifest::new("/mnt")), path, STALL).is_err());
    }

    #[test]
    fn many_readers_of_one_version_are_merged_and_the_file_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt.provenance.json");
        let m = Arc::new(Manifest::new("/mnt"));
        let f = Arc::new(ManifestFile::new(m.clone(), path.clone(), STALL).unwrap());
        let what = Opened {
            handle: "10378.1/1",
            name: None,
            key: "datasets/10378-1-1/a.nc",
            etag: "e1",
            size: 10,
        };
        // 200 processes (a DataLoader's workers, epoch after epoch), each
        // opening the file twice.
        for pid in 1..=200u32 {
            for _ in 0..2 {
                let who = Arc::new(Who {
                    uid: 1000,
                    pid,
                    command: Some("python3".into()),
                    job: Some("77".into()),
                    started: pid as u64,
                });
                m.opened(&what, who).read(5);
            }
        }
        let n = f.write_if_changed().unwrap();
        let snap = read(&path);
        let readers = &snap.datasets[0].files[0].readers;
        assert_eq!(
            readers.len(),
            crate::provenance::manifest::READERS_PER_VERSION + 1
        );
        let merged: Vec<_> = readers.iter().filter(|r| r.merged).collect();
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].who.pid, 0);
        assert_eq!(merged[0].who.job.as_deref(), Some("77"));
        let f0 = &snap.datasets[0].files[0];
        assert_eq!((f0.opens, f0.bytes_read), (400, 2000), "nothing lost");
        assert!(n < 4096, "{n} bytes for one file read by 200 processes");
        // --pid never matches a merged reader; --job keeps it.
        let by_job = snap.clone().filtered(&Filter {
            job: Some("77".into()),
            ..Filter::default()
        });
        assert_eq!(by_job.datasets[0].files[0].opens, 400);
    }

    #[test]
    fn the_number_of_entries_is_bounded_whatever_the_job() {
        let m = Manifest::new("/mnt");
        let who = Arc::new(Who {
            uid: 1,
            pid: 7,
            ..Who::default()
        });
        let max = crate::provenance::manifest::MAX_ENTRIES;
        for i in 0..max + 10 {
            let key = format!("k{i}");
            let what = Opened {
                handle: "10378.1/1",
                name: None,
                key: &key,
                etag: "e",
                size: 1,
            };
            m.opened(&what, who.clone());
        }
        let snap = m.snapshot(&Filter::default());
        assert_eq!(snap.datasets[0].files.len(), max);
        assert_eq!(snap.dropped, 10);
    }
}
