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
    /// What the last write held; `None` before the first.
    written: Mutex<Option<super::manifest::Fingerprint>>,
}

impl ManifestFile {
    pub fn new(manifest: Arc<Manifest>, path: PathBuf) -> Self {
        Self {
            manifest,
            path,
            written: Mutex::new(None),
        }
    }

    /// Writes the manifest if it changed since the last write (and holds
    /// anything at all). Returns whether it wrote; an error is logged,
    /// and the next call tries again.
    pub fn write_if_changed(&self) -> bool {
        let mut written = self.written.lock().unwrap_or_else(|p| p.into_inner());
        let now = self.manifest.fingerprint();
        if now.is_empty() || written.as_ref() == Some(&now) {
            return false;
        }
        let snap = self.manifest.snapshot(&Filter::default());
        match write_snapshot(&self.path, &snap, written.is_some()) {
            Ok(()) => {
                *written = Some(now);
                true
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "cannot write the read manifest");
                false
            }
        }
    }

    /// The write on unmount: what changed since the last checkpoint.
    pub fn finish(&self) {
        if self.write_if_changed() {
            info!(path = %self.path.display(), "read manifest written");
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
        opened(&m, "b");
        f.finish();
        assert_eq!(read(&path).datasets[0].files.len(), 2);
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
}
