//! The disk tier of the block cache: one file per block under
//! `DIR/v1/<aa>/`, checked as it is read (see [`DiskCache`]).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tracing::warn;

mod buffers;
mod evict;
mod fd;
mod whole;

pub(super) use fd::{check_private, make_dir};
pub(crate) use fd::{open_dir_at, open_folder, open_untrusted, probe_by_a_file, remove_stale};

use super::shared::{ClaimGuard, EvictLock};
use super::BlockKey;
use crate::folder::{Folder, FolderError};
use crate::retry::Deadline;

pub(super) const MAGIC: &[u8; 8] = b"PVFSBLK1";

/// The file name of a block (64 hex digits: SHA-256 of its bucket, key,
/// ETag and index); it lives in the folder named by its first two digits.
pub fn block_file_name(bucket: &str, key: &str, etag: &str, index: u64) -> String {
    let mut h = Sha256::new();
    for part in [bucket, key, etag] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(index.to_le_bytes());
    hex::encode(h.finalize())
}

/// Blocks on disk under `dir/v1/<aa>/<hash>`, bounded by `limit` bytes.
///
/// Every call into the folder goes through its [`Folder`] (see
/// [`crate::folder`]): off the async workers, bounded by the stall
/// timeout, and not at all while the folder does not answer, so a cache
/// folder on a stalled cluster file system is a miss, never a hang. The
/// blocking methods here (`get`, `put`, `claim`, ...) are what those calls
/// run; callers use the async ones (`load_block`, `store_block`, ...).
///
/// The folder may be shared by many processes on many nodes (a cluster
/// file system): every block is written under a private temporary name and
/// renamed into place, so readers see a whole block or none, and two
/// writers of the same block each install a complete copy. Eviction takes
/// an advisory lock on `dir/v1/.evict.lock` so one process at a time
/// trims the folder; where the file system has no locks it trims anyway
/// (an unlink that loses the race is harmless).
///
/// The folder is input, not trusted (another process, another node, a
/// group member may have written anything there): everything is reached
/// relative to `v1`, opened once, without following symlinks; a block must
/// be a regular file of exactly the expected length with a valid header,
/// and is read with that bound. Anything else (a FIFO, a symlink, a
/// truncated, oversized or garbage file) is a miss, and is removed where
/// that is safe (it is only ever a name in our own folder).
pub struct DiskCache {
    /// `dir/v1`, for messages.
    pub(super) dir: PathBuf,
    /// `dir/v1` itself, opened without following symlinks.
    pub(super) root: OwnedFd,
    /// The 256 shard folders, opened (created) on first use.
    pub(super) shards: Vec<OnceLock<Option<OwnedFd>>>,
    pub(super) limit: u64,
    /// Bytes in the folder as last measured plus what this process wrote since.
    pub(super) used: AtomicU64,
    /// Bytes written since the last full measurement.
    pub(super) since_scan: AtomicU64,
    pub(super) shared: bool,
    /// On a local file system (see [`DiskCache::local`]).
    pub(super) local: bool,
    pub(super) dir_mode: u32,
    pub(super) file_mode: u32,
    /// A trimming pass is running (one at a time per process).
    pub(super) trimming: AtomicBool,
    /// Next shard a sampled pass starts at (shared folders; see
    /// [`DiskCache::trim_if_needed`]).
    pub(super) cursor: AtomicU64,
    /// Folder entries read and stat'ed so far: the metadata cost of size
    /// accounting and eviction, for stats and tests.
    pub meta_ops: AtomicU64,
    /// Every call into the folder goes through it.
    pub(super) folder: Folder,
    /// The folder is the user's default cache (see
    /// [`crate::read::DiskConfig::default`]).
    pub(super) default: bool,
    /// The free space kept on the folder's file system (see
    /// [`DiskCache::room_for`]).
    pub(super) floor: Floor,
    /// Bytes per block of the mount using it (where a block lies in a
    /// whole file; see `disk/whole.rs`).
    pub(super) block_size: AtomicU64,
}

/// The free-space floor of a cache folder's file system: at least 5% of it
/// or 1 GiB, whichever is more, is never filled with blocks.
#[derive(Default)]
pub(super) struct Floor {
    /// Bytes to keep free.
    keep: AtomicU64,
    /// Free bytes, as last asked (`fstatvfs`), and when (ms since the
    /// epoch): asked again at most once a second.
    free: AtomicU64,
    asked_ms: AtomicU64,
    /// Writes are held back until space is freed.
    reached: AtomicBool,
}

/// How often the free space is asked again, at most.
const FLOOR_RECHECK_MS: u64 = 1000;

/// Trimming passes one trigger may run in a row (each reads a slice of
/// the folder).
const MAX_PASSES: usize = 8;

/// Calls into the cache folder running at once: a cache folder on a
/// stalled cluster file system can park this many threads, never more.
const DISK_SLOTS: usize = 64;

/// Shards (of 256) a shared folder's size is estimated from at start-up…
pub(super) const START_SHARDS: usize = 8;

/// A claim this close to its deadline is not filled in place (another may
/// take it over meanwhile): its block is written the ordinary way.
pub(super) const PUBLISH_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);
/// …and each eviction pass of a shared folder reads.
pub(super) const PASS_SHARDS: usize = 32;

/// Bytes of the header of block `k`.
pub(super) fn header_len(k: &BlockKey) -> usize {
    8 + 3 * 4 + k.object.bucket.len() + k.object.key.len() + k.object.etag.len() + 8 + 8 + 4
}

/// Whether a file system (its `statfs` type, `f_type`) is a local one a
/// read can be handed to the kernel on (see `disk/whole.rs`): the disk
/// file systems Linux mounts from a block device, and tmpfs. Network and
/// cluster file systems (NFS, Lustre, GPFS, CephFS, BeeGFS, SMB, FUSE...)
/// are not: their server may stall any read. Types from `statfs(2)` and
/// the kernel's `magic.h`; unknown types count as not local.
pub(crate) fn local_file_system(f_type: i64) -> bool {
    const LOCAL: [i64; 10] = [
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
        0xF2F5_2010, // f2fs
        0x2FC1_2FC1, // zfs
        0xCA45_1A4E, // bcachefs
        0x5265_4973, // reiserfs
        0x3153_464A, // jfs
        0x8584_58F6, // ramfs
    ];
    LOCAL.contains(&(f_type & 0xFFFF_FFFF))
}

impl DiskCache {
    /// Whether the folder is on a local file system (see
    /// [`local_file_system`]), as `fstatfs` said when it was opened.
    pub fn local(&self) -> bool {
        self.local
    }

    /// Opens (creating) the cache folder, 0700 (3770 for a group cache:
    /// setgid, so the group carries over, and sticky, so no member can
    /// rename or remove another's `creds-<uid>/`). Its calls answer within
    /// `stall` or are given up (see [`crate::folder`]); so does opening it:
    /// a folder that does not answer fails here, in one line. The size
    /// already used is measured in the background, so a large cache never
    /// delays a mount.
    ///
    /// Errors: the folder cannot be made or written, is not a folder, is
    /// not ours (a private cache) or is open to others (see
    /// [`check_private`]), or does not answer.
    pub fn open(cfg: &crate::read::DiskConfig, stall: Duration) -> std::io::Result<Arc<Self>> {
        let (dir_mode, file_mode) = if cfg.group {
            (0o3770, 0o640)
        } else {
            (0o700, 0o600)
        };
        let folder = Folder::new(
            if cfg.shared {
                "shared cache folder"
            } else {
                "cache folder"
            },
            &cfg.dir,
            "reads go to S3 and fetched blocks are not kept",
            stall,
            DISK_SLOTS,
        );
        let root = cfg.dir.join("v1");
        let (top, group) = (cfg.dir.clone(), cfg.group);
        let root_fd = folder
            .run_blocking("open the cache folder", move || {
                make_dir(&top, dir_mode)?;
                let top_fd = open_folder(&top).map_err(|e| {
                    std::io::Error::other(format!(
                        "cannot open the cache folder {}: {e}",
                        top.display()
                    ))
                })?;
                check_private(&top, &top_fd, group)?;
                match mkdirat(&top_fd, "v1", Mode::from_bits_truncate(dir_mode & 0o777)) {
                    Ok(()) => {
                        let v1 = open_dir_at(&top_fd, "v1")?;
                        // Set explicitly: the umask may have taken bits.
                        fchmod(&v1, Mode::from_bits_truncate(dir_mode & 0o2777))?;
                    }
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                let v1 = open_dir_at(&top_fd, "v1").map_err(|e| {
                    std::io::Error::other(format!(
                        "cannot open the cache folder {} (it must be a folder, not a symlink): {e}",
                        top.join("v1").display()
                    ))
                })?;
                check_private(&top.join("v1"), &v1, group)?;
                // Fail now, not at the first block, on a folder we cannot
                // write.
                let probe = format!(".probe-{}-{}", std::process::id(), rand::random::<u64>());
                let fd = openat(
                    &v1,
                    probe.as_str(),
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )?;
                drop(fd);
                let _ = unlinkat(&v1, probe.as_str(), UnlinkatFlags::NoRemoveDir);
                remove_stale(&v1, &[".probe-"]);
                Ok(v1)
            })
            .map_err(|e| match e {
                FolderError::Io(e) => e,
                e => std::io::Error::other(format!(
                    "the cache folder {} did not answer within {stall:?} ({e})",
                    cfg.dir.display()
                )),
            })?;
        // Probed, while it does not answer, by what its server must do:
        // making and removing a file.
        if let Ok(probe_fd) = root_fd.try_clone() {
            folder.set_probe(move || probe_by_a_file(&probe_fd));
        }
        let floor = Floor::default();
        if let Ok(s) = nix::sys::statvfs::fstatvfs(&root_fd) {
            let total = s.blocks() * s.fragment_size();
            floor
                .keep
                .store((total / 20).clamp(1 << 30, 50 << 30), Ordering::Relaxed);
            floor
                .free
                .store(s.blocks_available() * s.fragment_size(), Ordering::Relaxed);
        }
        let local = nix::sys::statfs::fstatfs(&root_fd)
            .is_ok_and(|s| local_file_system(s.filesystem_type().0));
        let cache = Arc::new(Self {
            dir: root,
            root: root_fd,
            shards: (0..256).map(|_| OnceLock::new()).collect(),
            limit: cfg.limit,
            used: AtomicU64::new(0),
            since_scan: AtomicU64::new(0),
            shared: cfg.shared,
            local,
            dir_mode: dir_mode & 0o2777,
            file_mode,
            trimming: AtomicBool::new(true),
            cursor: AtomicU64::new(rand::random::<u64>() % 256),
            meta_ops: AtomicU64::new(0),
            folder,
            default: cfg.default,
            floor,
            block_size: AtomicU64::new(1 << 20),
        });
        let c = cache.clone();
        let measure = move || {
            // A shared folder (a cluster file system, millions of blocks,
            // hundreds of mounts starting at once) is never walked whole:
            // block names are SHA-256 hashes, spread evenly over the 256
            // shards, so a few shards tell the size of the whole.
            let total = if c.shared {
                let first = c.cursor.fetch_add(START_SHARDS as u64, Ordering::Relaxed) as usize;
                c.entries_in((0..START_SHARDS).map(|i| (first + i) % 256))
                    .map(|e| e.iter().map(|e| e.size).sum::<u64>() * 256 / START_SHARDS as u64)
            } else {
                c.entries().map(|e| e.iter().map(|e| e.size).sum())
            };
            // A folder that did not answer: measured at the next pass.
            c.used.fetch_add(total.unwrap_or(0), Ordering::Relaxed);
            c.trimming.store(false, Ordering::Release);
            c.trim_if_needed();
        };
        if std::thread::Builder::new()
            .name("provenafs-trim".into())
            .spawn(measure)
            .is_err()
        {
            cache.trimming.store(false, Ordering::Release);
        }
        Ok(cache)
    }

    /// Waits (at most 5 s) until no call into the folder runs and no
    /// trimming pass: what was started in the background is done.
    #[cfg(test)]
    pub(crate) fn settle(&self) {
        let t = std::time::Instant::now();
        while (self.folder.in_flight() > 0 || self.trimming.load(Ordering::Acquire))
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The folder's bound (`--cache-size`), in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Whether the folder is the user's default cache (nothing was staged
    /// there on purpose).
    pub fn is_default(&self) -> bool {
        self.default
    }

    /// Whether `n` more bytes may be written without going below the
    /// free-space floor (see [`Floor`]). Reaching it, and leaving it, is
    /// said once each in the log and shown by `status`, never once per
    /// block. Blocking when the free space is due to be asked again: a
    /// call into the folder.
    /// Whether blocks are being kept: the folder answers and the floor is
    /// not reached (what the last check found; no call into the folder).
    pub fn keeps_blocks(&self) -> bool {
        self.folder.answering() && !self.floor.reached.load(Ordering::Relaxed)
    }

    /// Whether `n` bytes fit above the floor, as last measured, without
    /// saying anything of it (a whole file's size must not flip the
    /// floor's state that blocks set).
    pub(super) fn fits(&self, n: u64) -> bool {
        let f = &self.floor;
        f.free.load(Ordering::Relaxed) >= f.keep.load(Ordering::Relaxed).saturating_add(n)
    }

    pub(super) fn room_for(&self, n: u64) -> bool {
        let f = &self.floor;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        if now.saturating_sub(f.asked_ms.load(Ordering::Relaxed)) >= FLOOR_RECHECK_MS {
            f.asked_ms.store(now, Ordering::Relaxed);
            if let Ok(s) = nix::sys::statvfs::fstatvfs(&self.root) {
                f.free
                    .store(s.blocks_available() * s.fragment_size(), Ordering::Relaxed);
            }
        }
        let (free, keep) = (
            f.free.load(Ordering::Relaxed),
            f.keep.load(Ordering::Relaxed),
        );
        let room = free >= keep.saturating_add(n);
        if room == f.reached.load(Ordering::Relaxed)
            && f.reached.swap(!room, Ordering::Relaxed) == room
        {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            if room {
                tracing::info!(folder = %self.dir.display(), "the cache folder's file system has room again ({:.1} GiB free); blocks are kept again", gib(free));
                self.folder.set_note(None);
            } else {
                let note = format!(
                    "free-space floor reached ({:.1} GiB free, {:.1} GiB kept free): fetched blocks are not kept",
                    gib(free),
                    gib(keep)
                );
                warn!(folder = %self.dir.display(), "{note}");
                self.folder.set_note(Some(note));
            }
        }
        room
    }

    /// The folder's calls (for status and callers' own calls).
    pub fn folder(&self) -> &Folder {
        &self.folder
    }

    pub(super) fn name(k: &BlockKey) -> String {
        block_file_name(&k.object.bucket, &k.object.key, &k.object.etag, k.index)
    }

    /// Whether other processes (other nodes) use the folder too.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Where block `k` lives (for messages and tests).
    pub fn path(&self, k: &BlockKey) -> PathBuf {
        let name = Self::name(k);
        self.dir.join(&name[..2]).join(name)
    }

    /// The shard folder of a block name, opened (and created) once. A
    /// symlink planted there is removed and replaced by a real folder.
    pub(super) fn shard(&self, name: &str) -> Option<&OwnedFd> {
        let idx = usize::from_str_radix(name.get(..2)?, 16).ok()?;
        let sub = &name[..2];
        self.shards[idx]
            .get_or_init(|| {
                for _ in 0..2 {
                    match open_dir_at(&self.root, sub) {
                        Ok(fd) => return Some(fd),
                        Err(Errno::ENOENT) => {
                            let made = mkdirat(&self.root, sub, Mode::from_bits_truncate(self.dir_mode & 0o777));
                            if let Err(e) = made.and_then(|_| open_dir_at(&self.root, sub)).and_then(|fd| {
                                // Set explicitly: the umask may have taken the group bits.
                                fchmod(&fd, Mode::from_bits_truncate(self.dir_mode)).map(|_| fd)
                            }) {
                                if e != Errno::EEXIST {
                                    warn!(folder = %self.dir.join(sub).display(), error = %e, "cannot create a disk cache folder");
                                    return None;
                                }
                            }
                        }
                        Err(Errno::ELOOP | Errno::ENOTDIR) => {
                            warn!(folder = %self.dir.join(sub).display(), "disk cache folder is not a folder (a symlink?); replaced");
                            let _ = unlinkat(&self.root, sub, UnlinkatFlags::NoRemoveDir);
                        }
                        Err(e) => {
                            warn!(folder = %self.dir.join(sub).display(), error = %e, "cannot open a disk cache folder");
                            return None;
                        }
                    }
                }
                open_dir_at(&self.root, sub).ok()
            })
            .as_ref()
    }

    pub(super) fn header(k: &BlockKey, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(header_len(k));
        v.extend_from_slice(MAGIC);
        for part in [&k.object.bucket, &k.object.key, &k.object.etag] {
            v.extend_from_slice(&(part.len() as u32).to_le_bytes());
            v.extend_from_slice(part.as_bytes());
        }
        v.extend_from_slice(&k.index.to_le_bytes());
        v.extend_from_slice(&(data.len() as u64).to_le_bytes());
        v.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        v
    }

    /// The block `k` of `len` data bytes, if a valid copy is on disk and
    /// the folder answers before `deadline` (and its stall timeout).
    pub async fn load_block(
        self: &Arc<Self>,
        k: BlockKey,
        len: u64,
        deadline: Deadline,
    ) -> Option<Bytes> {
        let me = self.clone();
        self.folder
            .run("read a block", Some(deadline), move || Ok(me.get(&k, len)))
            .await
            .ok()
            .flatten()
    }

    /// Writes block `k` in the background (through `claim`, which ends as
    /// the block lands; see [`DiskCache::put_claimed`]). `false` when the
    /// folder is not answering or busy: the block is not kept, and the
    /// claim ends by its deadline.
    pub fn store_block(
        self: &Arc<Self>,
        k: BlockKey,
        data: Bytes,
        claim: Option<ClaimGuard>,
    ) -> bool {
        let me = self.clone();
        let started = self.folder.spawn("write a block", move || {
            if let Err(e) = me.put_claimed(&k, &data, claim) {
                warn!(error = %e, "cannot write disk cache block");
            }
        });
        started.is_ok()
    }

    /// Writes `blocks` (through their claims) and waits for them, until
    /// the stall timeout. Errors: a write failed (the folder is full or
    /// gone), or the folder did not answer.
    pub async fn store_blocks(
        self: &Arc<Self>,
        blocks: Vec<(BlockKey, Bytes, Option<ClaimGuard>)>,
    ) -> Result<(), FolderError> {
        let me = self.clone();
        self.folder
            .run("write blocks", None, move || {
                blocks
                    .into_iter()
                    .try_for_each(|(k, data, claim)| me.put_claimed(&k, &data, claim))
            })
            .await
    }

    /// Which of `blocks` (key, data bytes) look kept already: a regular
    /// file of the right length under the block's name, or the version's
    /// whole file. One `stat` each (no open, no read, not checked: a buy
    /// skips them, and a reader reads and checks them as ever), in one
    /// call into the folder; none while it does not answer.
    pub async fn kept(
        self: &Arc<Self>,
        blocks: Vec<(BlockKey, u64)>,
        deadline: Deadline,
    ) -> Vec<bool> {
        let n = blocks.len();
        let me = self.clone();
        self.folder
            .run("look for kept blocks", Some(deadline), move || {
                let bs = me.block_size.load(Ordering::Relaxed);
                let whole = blocks.first().and_then(|(k, _)| me.whole_size(&k.object));
                Ok(blocks
                    .iter()
                    .map(|(k, len)| {
                        if whole.is_some_and(|s| s >= k.index * bs + len) {
                            return true;
                        }
                        let name = Self::name(k);
                        me.shard(&name).is_some_and(|shard| {
                            nix::sys::stat::fstatat(
                                shard,
                                name.as_str(),
                                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                            )
                            .is_ok_and(|st| {
                                st.st_mode & libc::S_IFMT == libc::S_IFREG
                                    && st.st_size as u64 == header_len(k) as u64 + len
                            })
                        })
                    })
                    .collect())
            })
            .await
            .unwrap_or_else(|_| vec![false; n])
    }

    /// The block, if a valid copy of exactly `len` data bytes is on disk.
    /// Blocking: a call into the folder (see [`DiskCache::load_block`]).
    pub fn get(&self, k: &BlockKey, len: u64) -> Option<Bytes> {
        let name = Self::name(k);
        let shard = self.shard(&name)?;
        match Self::load(shard, &name, k, len) {
            Ok((data, file, mtime)) => {
                // Touch for LRU: the modification time orders eviction
                // (atime is often off or relaxed on cluster file systems).
                // A minute's precision is plenty, and saves a metadata
                // write per hit.
                let now = std::time::SystemTime::now();
                let modified =
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime.max(0) as u64);
                if now
                    .duration_since(modified)
                    .is_ok_and(|age| age.as_secs() >= 60)
                {
                    let _ = file.set_modified(now);
                }
                Some(data)
            }
            Err(Some(why)) => {
                self.reject(shard, &name, why);
                None
            }
            // Not there: the version may be kept whole instead.
            Err(None) => self.whole_block(k, len),
        }
    }

    /// Reads and checks the file `name` in `shard` as block `k` of `len`
    /// data bytes: the data, the open file and its mtime (seconds), or why
    /// the entry is unusable (`None`: missing or unreadable right now, so
    /// it stays).
    pub(super) fn load(
        shard: &OwnedFd,
        name: &str,
        k: &BlockKey,
        len: u64,
    ) -> Result<(Bytes, fs::File, i64), Option<&'static str>> {
        let fd = match open_untrusted(shard, name) {
            Ok(fd) => fd,
            Err(Errno::ELOOP) => return Err(Some("a symlink")),
            // Missing, or not openable right now (out of descriptors, a
            // cluster file system's hiccup): a miss, and the entry stays.
            Err(_) => return Err(None),
        };
        let st = fstat(&fd).map_err(|_| None)?;
        let hlen = header_len(k);
        let want = hlen as u64 + len;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(Some("not a regular file"));
            }
            return Err(None);
        }
        if st.st_size as u64 != want {
            return Err(Some("wrong length"));
        }
        // Read exactly `want` bytes: never more, whatever the file claims
        // (into spare capacity: no zeroing of a buffer about to be filled).
        let file = std::fs::File::from(fd);
        let mut raw = buffers::take(want as usize);
        (&file).take(want).read_to_end(&mut raw).map_err(|_| None)?;
        if raw.len() as u64 != want || Self::header(k, &raw[hlen..]) != raw[..hlen] {
            return Err(Some("failed its check"));
        }
        Ok((buffers::share(raw).slice(hlen..), file, st.st_mtime))
    }

    /// Removes an unusable entry (only a name in our own folder: safe).
    pub(super) fn reject(&self, shard: &OwnedFd, name: &str, why: &str) {
        warn!(path = %self.dir.join(&name[..2]).join(name).display(), why, "disk cache entry ignored and removed");
        let _ = unlinkat(shard, name, UnlinkatFlags::NoRemoveDir);
    }

    /// Counts `n` bytes newly written, trimming if the folder is over.
    pub(super) fn added(self: &Arc<Self>, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
        self.since_scan.fetch_add(n, Ordering::Relaxed);
        self.trim_if_needed();
    }

    /// Writes block `k` under a temporary name and renames it into place.
    /// Blocking: a call into the folder.
    pub fn put(self: &Arc<Self>, k: &BlockKey, data: &[u8]) -> std::io::Result<()> {
        let name = Self::name(k);
        let shard = self
            .shard(&name)
            .ok_or_else(|| std::io::Error::other("no usable cache folder"))?;
        let tmp = format!(".tmp-{}-{}", std::process::id(), rand::random::<u64>());
        let fd = openat(
            shard,
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(self.file_mode),
        )?;
        if self.file_mode & 0o040 != 0 {
            // The umask may have taken the group bit away.
            fchmod(&fd, Mode::from_bits_truncate(self.file_mode))?;
        }
        let mut f = std::fs::File::from(fd);
        let header = Self::header(k, data);
        let written = f.write_all(&header).and_then(|_| f.write_all(data));
        drop(f);
        let installed = written.and_then(|_| {
            renameat(shard, tmp.as_str(), shard, name.as_str()).map_err(std::io::Error::from)
        });
        if let Err(e) = installed {
            let _ = unlinkat(shard, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(e);
        }
        self.added((header.len() + data.len()) as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::cache::test_keys::STALL;
    use crate::read::cache::test_keys::{disk, key};
    use crate::read::cache::ObjectId;

    #[test]
    fn only_local_file_systems_have_reads_handed_to_the_kernel() {
        assert!(local_file_system(0xEF53)); // ext4
        assert!(local_file_system(0x5846_5342)); // xfs
        assert!(local_file_system(0x0102_1994)); // tmpfs
        assert!(!local_file_system(0x6969)); // NFS
        assert!(!local_file_system(0x0BD0_0BD0)); // Lustre
        assert!(!local_file_system(0x4750_4653)); // GPFS
        assert!(!local_file_system(0x6573_5546)); // FUSE
        assert!(!local_file_system(0x1234)); // unknown
    }

    #[tokio::test]
    async fn kept_blocks_are_told_by_name_and_length_without_reading_them() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&disk(d.path(), 1 << 20), STALL).unwrap();
        c.put(&key(1), b"hello").unwrap();
        let deadline = Deadline::after(STALL);
        let kept = c
            .kept(vec![(key(1), 5), (key(2), 5), (key(1), 6)], deadline)
            .await;
        // Block 1 is there; block 2 is not; a block 1 of another length
        // is not this one.
        assert_eq!(kept, vec![true, false, false]);
    }

    #[test]
    fn disk_blocks_round_trip_and_reject_corruption() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&disk(d.path(), 1 << 20), STALL).unwrap();
        c.put(&key(1), b"hello").unwrap();
        assert_eq!(c.get(&key(1), 5).unwrap(), Bytes::from_static(b"hello"));
        assert!(c.get(&key(2), 5).is_none());
        // Another ETag is another object.
        let other = BlockKey {
            object: Arc::new(ObjectId {
                bucket: "b".into(),
                key: "k".into(),
                etag: "f".into(),
            }),
            index: 1,
        };
        assert!(c.get(&other, 5).is_none());
        // Flip a data byte: the block is refused.
        let p = c.path(&key(1));
        let mut raw = fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        fs::write(&p, raw).unwrap();
        assert!(c.get(&key(1), 5).is_none());
        assert!(!p.exists(), "a corrupt block is removed");
        // A block of another length than the object says is invalid too.
        c.put(&key(3), b"hello").unwrap();
        assert!(c.get(&key(3), 6).is_none());
        assert!(c.get(&key(3), 5).is_none(), "and gone");
    }

    #[test]
    fn hostile_entries_never_hang_never_mislead_and_go() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&disk(d.path(), 1 << 30), STALL).unwrap();
        let outside = d.path().join("outside");
        let data = vec![7u8; 4096];
        for i in 1..=6 {
            fs::create_dir_all(c.path(&key(i)).parent().unwrap()).unwrap();
        }
        // A valid block elsewhere, linked into place: never followed.
        c.put(&key(9), &data).unwrap();
        fs::rename(c.path(&key(9)), &outside).unwrap();
        std::os::unix::fs::symlink(&outside, c.path(&key(1))).unwrap();
        // A FIFO: opening it for reading would block forever.
        let fifo = c.path(&key(2));
        let cpath = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
        // Truncated, oversized, garbage, a folder.
        c.put(&key(3), &data).unwrap();
        let raw = fs::read(c.path(&key(3))).unwrap();
        fs::write(c.path(&key(3)), &raw[..raw.len() - 1]).unwrap();
        c.put(&key(4), &data).unwrap();
        let mut big = fs::read(c.path(&key(4))).unwrap();
        big.extend(std::iter::repeat_n(0u8, 1 << 20));
        fs::write(c.path(&key(4)), big).unwrap();
        fs::write(c.path(&key(5)), vec![0u8; raw.len()]).unwrap();
        fs::create_dir(c.path(&key(6))).unwrap();
        let t = std::time::Instant::now();
        for i in 1..=6 {
            assert!(c.get(&key(i), 4096).is_none(), "entry {i}");
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        for i in 1..=5 {
            assert!(
                fs::symlink_metadata(c.path(&key(i))).is_err(),
                "entry {i} removed"
            );
        }
        assert!(outside.exists(), "what a link pointed to is untouched");
        assert!(c.path(&key(6)).is_dir(), "a folder is left alone");
        // A shard folder that is a link to elsewhere is never written
        // through: it is replaced by a real folder.
        let fresh = (100..)
            .map(key)
            .find(|k| {
                let idx = usize::from_str_radix(&DiskCache::name(k)[..2], 16).unwrap();
                c.shards[idx].get().is_none() && !c.path(k).parent().unwrap().exists()
            })
            .unwrap();
        let shard = c.path(&fresh).parent().unwrap().to_path_buf();
        let elsewhere = d.path().join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &shard).unwrap();
        c.put(&fresh, &data).unwrap();
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
        assert!(fs::symlink_metadata(&shard).unwrap().is_dir());
        assert_eq!(c.get(&fresh, 4096).unwrap(), Bytes::from(data));
    }

    #[test]
    fn disk_cache_evicts_to_its_limit() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&disk(d.path(), 10_000), STALL).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        for i in 0..20 {
            c.put(&key(i), &[7u8; 1000]).unwrap();
            c.settle();
        }
        let total: u64 = c.entries().unwrap().iter().map(|e| e.size).sum();
        assert!(total <= 10_000, "{total}");
        assert!(c.get(&key(19), 1000).is_some());
    }
}
