//! FUSE passthrough (Linux 6.9 and later, a daemon with `CAP_SYS_ADMIN`):
//! a file whose version is kept whole in the disk cache (see
//! `read/cache/disk/whole.rs`) is opened with a backing file, and the
//! kernel reads it directly, at the speed of the disk under it, without a
//! round trip to this daemon per read.
//!
//! The kernel holds each inode in one I/O mode at a time: cached (our
//! reads, its page cache) or passthrough to one backing file. An open in
//! the other mode, or with another backing file, fails with `EIO` in the
//! reader's process (`fs/fuse/iomode.c`). So an inode with a handle open
//! in one mode gets its next handles in that mode, and its passthrough
//! handles share one [`BackingId`].

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, ReplyOpen};

use crate::read::lock;

/// Whether a mount started now by this user could read whole files
/// through the kernel: root (`CAP_SYS_ADMIN` opens backing files) on
/// Linux 6.9 or later. The kernel's own answer comes at a mount's `init`;
/// this is for commands that prepare files for mounts to come
/// (`provenafs prefetch` keeps them whole only where that pays).
pub fn possible() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    nix::unistd::geteuid().is_root() && kernel_at_least(&release, (6, 9))
}

/// `release` (as `uname -r` prints it: `6.18.0-1-amd64`) is `want` or later.
fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut v = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (v.next().flatten(), v.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

/// How each open inode is held by the kernel now.
enum Mode {
    /// Handles open with our reads (and the kernel's page cache).
    Cached(usize),
    /// Handles open through this backing file.
    Through(Arc<BackingId>, usize),
}

/// Which open inodes are read through a backing file.
#[derive(Default)]
pub struct Passthrough {
    /// The kernel granted `FUSE_PASSTHROUGH` at `init`.
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, Mode>>,
    /// Opens answered with a backing file (for the stats line and tests).
    pub opens: AtomicU64,
}

impl Passthrough {
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// A new handle of `ino`: the backing file to answer it with, if it
    /// is to be read through one (`whole` finds it, called only when the
    /// inode has no handle open in cached mode); else it is counted as
    /// cached, and answered as every open is.
    pub fn open(
        &self,
        ino: u64,
        reply: &ReplyOpen,
        whole: impl FnOnce() -> Option<OwnedFd>,
    ) -> Option<Arc<BackingId>> {
        // Joins the inode's mode if it has handles open.
        let join = |inodes: &mut HashMap<u64, Mode>| match inodes.get_mut(&ino) {
            Some(Mode::Through(id, n)) => {
                *n += 1;
                self.opens.fetch_add(1, Ordering::Relaxed);
                Some(Some(id.clone()))
            }
            Some(Mode::Cached(n)) => {
                *n += 1;
                Some(None)
            }
            None => None,
        };
        if let Some(mode) = join(&mut lock(&self.inodes)) {
            return mode;
        }
        // Found outside the lock (a call into the cache folder, bounded by
        // its stall timeout): other opens and releases go on meanwhile.
        let id =
            self.enabled()
                .then(whole)
                .flatten()
                .and_then(|fd| match reply.open_backing(&fd) {
                    Ok(id) => Some(Arc::new(id)),
                    Err(e) => {
                        tracing::debug!(error = %e, "no backing file for passthrough");
                        None
                    }
                });
        let mut inodes = lock(&self.inodes);
        // Another open of the inode got there first: its mode it is (our
        // backing id, if any, is closed as it goes).
        if let Some(mode) = join(&mut inodes) {
            return mode;
        }
        match id {
            Some(id) => {
                inodes.insert(ino, Mode::Through(id.clone(), 1));
                self.opens.fetch_add(1, Ordering::Relaxed);
                Some(id)
            }
            None => {
                inodes.insert(ino, Mode::Cached(1));
                None
            }
        }
    }

    /// A handle of `ino` was released (the last one of a passthrough
    /// inode closes its backing file).
    pub fn release(&self, ino: u64) {
        let mut inodes = lock(&self.inodes);
        let last = match inodes.get_mut(&ino) {
            Some(Mode::Cached(n)) | Some(Mode::Through(_, n)) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if last {
            inodes.remove(&ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_at_least;

    #[test]
    fn kernel_releases_are_compared_by_major_then_minor() {
        assert!(kernel_at_least("6.18.0-1-amd64", (6, 9)));
        assert!(kernel_at_least("6.9.0", (6, 9)));
        assert!(!kernel_at_least("6.8.12-200.fc39.x86_64", (6, 9)));
        assert!(!kernel_at_least("5.14.0-427.el9_4.x86_64", (6, 9)));
        assert!(kernel_at_least("7.0", (6, 9)));
        assert!(!kernel_at_least("", (6, 9)));
    }
}
