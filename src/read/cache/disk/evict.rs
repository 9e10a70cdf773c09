//! Keeping the disk cache within its bounds: listing its block files
//! (shard by shard, through its [`Folder`](crate::folder::Folder)) and
//! evicting the least recently used, under the folder's eviction lock
//! when other processes share it.

use std::sync::Arc;

use nix::fcntl::AtFlags;
use nix::sys::stat::fstatat;
use nix::unistd::{unlinkat, UnlinkatFlags};
use tracing::debug;

use super::*;

impl DiskCache {
    /// Every block file: regular files only, found without following
    /// symlinks (a planted link never makes eviction delete elsewhere).
    /// `None` when the folder stopped answering on the way.
    pub(in crate::read::cache) fn entries(self: &Arc<Self>) -> Option<Vec<Entry>> {
        self.entries_in(0..256)
    }

    /// The block files of `shards`, one call into the folder per shard
    /// (each bounded by the stall timeout); `None` when one does not
    /// answer.
    pub(in crate::read::cache) fn entries_in(
        self: &Arc<Self>,
        shards: impl Iterator<Item = usize>,
    ) -> Option<Vec<Entry>> {
        let mut out = Vec::new();
        for idx in shards {
            let me = self.clone();
            let found = self
                .folder
                .run_blocking_patient("list a cache shard", move || Ok(me.shard_entries(idx)))
                .ok()?;
            out.extend(found);
        }
        Some(out)
    }

    /// The block files of shard `idx`; files a writer that died left
    /// behind are removed on the way. Blocking: a call into the folder.
    fn shard_entries(&self, idx: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        let sub = format!("{idx:02x}");
        let Ok(dir_fd) = open_dir_at(&self.root, sub.as_str()) else {
            return out;
        };
        let Ok(dup) = dir_fd.try_clone() else {
            return out;
        };
        let Ok(mut dir) = nix::dir::Dir::from_fd(dup) else {
            return out;
        };
        for e in dir.iter().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            self.meta_ops.fetch_add(1, Ordering::Relaxed);
            let Ok(st) = fstatat(&dir_fd, name.as_str(), AtFlags::AT_SYMLINK_NOFOLLOW) else {
                continue;
            };
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                continue;
            }
            let mtime = st.st_mtime;
            if name.starts_with(".tmp-") || name.starts_with(".claim-") {
                // A writer that died mid-block (on any node) left this.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs() as i64);
                // A claim may hold a whole block's data (its owner died
                // while filling it): gone sooner than a temporary file,
                // yet long after any claim's deadline.
                let max_age = if name.starts_with(".claim-") {
                    600
                } else {
                    3600
                };
                if now - mtime > max_age {
                    let _ = unlinkat(&dir_fd, name.as_str(), UnlinkatFlags::NoRemoveDir);
                }
                continue;
            }
            out.push(Entry {
                shard: idx,
                name,
                size: st.st_size.max(0) as u64,
                mtime,
            });
        }
        out
    }

    /// Removes `victims` (oldest first) until `enough` bytes are freed, one
    /// call into the folder per shard; the bytes and blocks freed.
    pub(in crate::read::cache) fn remove_entries(
        self: &Arc<Self>,
        victims: Vec<Entry>,
        enough: u64,
    ) -> (u64, u64) {
        let mut by_shard: std::collections::BTreeMap<usize, Vec<Entry>> = Default::default();
        let mut planned = 0u64;
        for e in victims {
            if planned >= enough {
                break;
            }
            planned += e.size;
            by_shard.entry(e.shard).or_default().push(e);
        }
        let (mut freed, mut removed) = (0u64, 0u64);
        for (shard, entries) in by_shard {
            let me = self.clone();
            let done = self
                .folder
                .run_blocking_patient("trim a cache shard", move || {
                    let dir_fd = open_dir_at(&me.root, format!("{shard:02x}").as_str())?;
                    let mut out = (0u64, 0u64);
                    for e in entries {
                        if unlinkat(&dir_fd, e.name.as_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
                            out.0 += e.size;
                            out.1 += 1;
                        }
                    }
                    Ok(out)
                });
            match done {
                Ok((f, r)) => {
                    freed += f;
                    removed += r;
                }
                Err(FolderError::Io(_)) => {}
                // Not answering: the rest waits for the next pass.
                Err(_) => break,
            }
        }
        (freed, removed)
    }

    /// Starts a trimming pass on a thread of its own if the folder is
    /// over its bound (or, shared, due to be measured again after a tenth
    /// of the bound was written here), unless one is running.
    pub(in crate::read::cache) fn trim_if_needed(self: &Arc<Self>) {
        if !self.trim_due() {
            return;
        }
        if self.trimming.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        let pass = move || {
            // Passes until the folder is within its bound: what was written
            // during a pass (whose own triggers found it running) is
            // trimmed by the next.
            for _ in 0..MAX_PASSES {
                if !me.trim() {
                    break;
                }
            }
            me.trimming.store(false, Ordering::Release);
        };
        if std::thread::Builder::new()
            .name("provenafs-trim".into())
            .spawn(pass)
            .is_err()
        {
            self.trimming.store(false, Ordering::Release);
        }
    }

    /// Whether the folder is over its bound, or (shared) due to be
    /// measured again after a tenth of the bound was written here.
    fn trim_due(&self) -> bool {
        let remeasure = self.shared && self.since_scan.load(Ordering::Relaxed) > self.limit / 10;
        self.used.load(Ordering::Relaxed) > self.limit || remeasure
    }

    /// One trimming pass: least recently used blocks go, down to 90% of
    /// the bound. Returns whether another pass is due (more was written
    /// meanwhile; the folder did not answer is not a reason). One process trims a folder at a time, under its lock;
    /// while another holds it (trimming, or stopped mid-pass: a suspended
    /// job, a debugger, a member of the group) a folder over its bound is
    /// trimmed anyway (a removal that loses a race is harmless), so no
    /// holder can make the folder grow without bound.
    fn trim(self: &Arc<Self>) -> bool {
        let over = self.used.load(Ordering::Relaxed) > self.limit;
        self.since_scan.store(0, Ordering::Relaxed);
        let lock = EvictLock::take(self);
        if lock.is_busy() && !over {
            // Only due to be measured: the holder does that.
            return false;
        }
        if !self.folder.answering() {
            return false;
        }
        if self.shared {
            self.evict_sampled();
            drop(lock);
            return self.trim_due();
        }
        let Some(mut entries) = self.entries() else {
            return false;
        };
        let total: u64 = entries.iter().map(|e| e.size).sum();
        entries.sort_by_key(|e| e.mtime);
        let target = self.limit / 10 * 9;
        let (freed, evicted) = self.remove_entries(entries, total.saturating_sub(target));
        self.used.store(total - freed, Ordering::Relaxed);
        if evicted > 0 {
            debug!(evicted, total, "disk cache evicted");
        }
        drop(lock);
        self.trim_due()
    }
}

/// A block file found in the folder.
pub(crate) struct Entry {
    pub(crate) shard: usize,
    pub(crate) name: String,
    pub(crate) size: u64,
    pub(crate) mtime: i64,
}
