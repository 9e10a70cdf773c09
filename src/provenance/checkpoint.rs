//! The manifest file a mount writes beside its log: on unmount, and every
//! [`EVERY`] while it changes, so a daemon killed outright (the OOM killer,
//! `scancel -s KILL`, a node's watchdog) still leaves what its readers had
//! read up to the last checkpoint.

use super::{write_snapshot, Filter, Manifest};
use crate::task::AbortOnDrop;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

/// How often a changed manifest is written while mounted. A checkpoint of
/// a few thousand (version, reader) pairs costs milliseconds; a Slurm job
/// killed without SIGTERM loses at most this much.
pub const EVERY: Duration = Duration::from_secs(30);

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
    /// What the last write held, and the inode it wrote (a file at `path`
    /// with another inode is not ours: an earlier mount's, kept).
    written: Mutex<Option<(super::manifest::Fingerprint, u64)>>,
    /// The final write is made: a checkpoint still queued must not
    /// replace it with an unmarked file.
    finished: std::sync::atomic::AtomicBool,
}

impl ManifestFile {
    /// The manifest file at `path`. Temporary files a killed daemon left
    /// beside it are removed.
    pub fn new(manifest: Arc<Manifest>, path: PathBuf) -> Self {
        remove_stale_temps(&path);
        Self {
            manifest,
            path,
            written: Mutex::new(None),
            finished: Default::default(),
        }
    }

    /// Writes the manifest if it changed since the last write (and holds
    /// anything at all). Returns whether it wrote; an error is logged,
    /// and the next call tries again.
    pub fn write_if_changed(&self) -> bool {
        self.write(false)
    }

    /// The write as the mount ends: always (when anything was read), and
    /// marked with `ended_at`, so a job script waiting for the final file
    /// does not take the last checkpoint for it.
    pub fn finish(&self) {
        if self.write(true) {
            info!(path = %self.path.display(), "read manifest written");
        }
    }

    fn write(&self, last: bool) -> bool {
        use std::os::unix::fs::MetadataExt;
        use std::sync::atomic::Ordering;
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        // Under the lock the final write holds while it writes.
        if self.finished.load(Ordering::Relaxed) {
            return false;
        }
        if last {
            self.finished.store(true, Ordering::Relaxed);
        }
        let now = self.manifest.fingerprint();
        if now.is_empty() || (!last && written.as_ref().map(|w| w.0) == Some(now)) {
            return false;
        }
        let mut snap = self.manifest.snapshot(&Filter::default());
        if last {
            snap.ended_at = Some(chrono::Utc::now());
        }
        let ino = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| m.ino());
        let ours = written.is_some_and(|w| Some(w.1) == ino(&self.path));
        match write_snapshot(&self.path, &snap, ours) {
            Ok(()) => {
                *written = ino(&self.path).map(|i| (now, i));
                true
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot write the read manifest");
                false
            }
        }
    }

    /// Checkpoints every `every` on `rt`'s blocking pool until the handle
    /// is dropped.
    pub fn spawn_checkpoints(
        self: &Arc<Self>,
        every: Duration,
        rt: &tokio::runtime::Handle,
    ) -> AbortOnDrop {
        let me = self.clone();
        let task = rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let me = me.clone();
                if let Ok(true) = tokio::task::spawn_blocking(move || me.write_if_changed()).await {
                    debug!("read manifest checkpointed");
                }
            }
        });
        AbortOnDrop(task.abort_handle())
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
        let f = ManifestFile::new(m.clone(), path.clone());
        assert!(!f.write_if_changed(), "nothing read, nothing written");
        assert!(!path.exists());
        let t = opened(&m, "a");
        assert!(f.write_if_changed());
        assert!(!f.write_if_changed(), "unchanged");
        t.read(5);
        assert!(f.write_if_changed(), "a read changes it");
        assert_eq!(read(&path).datasets[0].files[0].bytes_read, 5);
        opened(&m, "a");
        assert!(f.write_if_changed(), "an open changes it");
        assert_eq!(read(&path).ended_at, None, "a checkpoint");
        opened(&m, "b");
        f.finish();
        let last = read(&path);
        assert_eq!(last.datasets[0].files.len(), 2);
        assert!(last.ended_at.is_some(), "the final write is marked");
        // A checkpoint queued before the end never replaces it.
        opened(&m, "c");
        assert!(!f.write_if_changed());
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
        ManifestFile::new(earlier, path.clone()).finish();
        std::thread::sleep(Duration::from_millis(5));
        let m = Arc::new(Manifest::new("/mnt"));
        opened(&m, "b");
        let f = ManifestFile::new(m, path.clone());
        assert!(f.write_if_changed());
        opened(&f.manifest, "c");
        assert!(f.write_if_changed());
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
        let f = ManifestFile::new(Arc::new(Manifest::new("/mnt")), path);
        opened(&f.manifest, "a");
        f.finish();
        assert!(!left.exists());
        assert!(other.exists(), "another mount's is not ours to remove");
    }
}
