//! The disk tier of the block cache: one file per block under
//! `DIR/v1/<aa>/`, checked as it is read (see [`DiskCache`]).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, AtFlags, OFlag, AT_FDCWD as CWD};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

use super::shared::EvictLock;
use super::BlockKey;

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
    pub(super) dir_mode: u32,
    pub(super) file_mode: u32,
    pub(super) evicting: Mutex<()>,
    /// Next shard a sampled pass starts at (shared folders; see
    /// [`DiskCache::evict_if_needed`]).
    pub(super) cursor: AtomicU64,
    /// Folder entries read and stat'ed so far: the metadata cost of size
    /// accounting and eviction, for stats and tests.
    pub meta_ops: AtomicU64,
}

/// Shards (of 256) a shared folder's size is estimated from at start-up…
pub(super) const START_SHARDS: usize = 8;

/// A claim this close to its deadline is not filled in place (another may
/// take it over meanwhile): its block is written the ordinary way.
pub(super) const PUBLISH_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);
/// …and each eviction pass of a shared folder reads.
pub(super) const PASS_SHARDS: usize = 32;

/// Opens folder `name` in `dir` without following a symlink there.
pub(super) fn open_dir_at<P: ?Sized + nix::NixPath>(
    dir: impl AsFd,
    name: &P,
) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Bytes of the header of block `k`.
pub(super) fn header_len(k: &BlockKey) -> usize {
    8 + 3 * 4 + k.object.bucket.len() + k.object.key.len() + k.object.etag.len() + 8 + 8 + 4
}

impl DiskCache {
    /// Opens (creating) the cache folder, 0700 (2770 for a group cache).
    /// The size already used is measured in the background, so a large
    /// cache never delays a mount.
    pub fn open(cfg: &crate::read::DiskConfig) -> std::io::Result<Arc<Self>> {
        let (dir_mode, file_mode) = if cfg.group {
            (0o2770, 0o640)
        } else {
            (0o700, 0o600)
        };
        let root = cfg.dir.join("v1");
        for d in [&cfg.dir, &root] {
            make_dir(d, dir_mode)?;
        }
        check_private(&cfg.dir, cfg.group)?;
        let root_fd = open_dir_at(CWD, root.as_path()).map_err(|e| {
            std::io::Error::other(format!(
                "cannot open the cache folder {} (it must be a folder, not a symlink): {e}",
                root.display()
            ))
        })?;
        let cache = Arc::new(Self {
            dir: root,
            root: root_fd,
            shards: (0..256).map(|_| OnceLock::new()).collect(),
            limit: cfg.limit,
            used: AtomicU64::new(0),
            since_scan: AtomicU64::new(0),
            shared: cfg.shared,
            dir_mode,
            file_mode,
            evicting: Mutex::new(()),
            cursor: AtomicU64::new(rand::random::<u64>() % 256),
            meta_ops: AtomicU64::new(0),
        });
        // Fail now, not at the first block, on a folder we cannot write.
        let probe = format!(".probe-{}-{}", std::process::id(), rand::random::<u64>());
        let fd = openat(
            &cache.root,
            probe.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .map_err(std::io::Error::from)?;
        drop(fd);
        let _ = unlinkat(&cache.root, probe.as_str(), UnlinkatFlags::NoRemoveDir);
        let c = cache.clone();
        std::thread::spawn(move || {
            // A shared folder (a cluster file system, millions of blocks,
            // hundreds of mounts starting at once) is never walked whole:
            // block names are SHA-256 hashes, spread evenly over the 256
            // shards, so a few shards tell the size of the whole.
            let total: u64 = if c.shared {
                let first = c.cursor.fetch_add(START_SHARDS as u64, Ordering::Relaxed) as usize;
                let sample: u64 = c
                    .entries_in((0..START_SHARDS).map(|i| (first + i) % 256))
                    .iter()
                    .map(|e| e.size)
                    .sum();
                sample * 256 / START_SHARDS as u64
            } else {
                c.entries().iter().map(|e| e.size).sum()
            };
            c.used.fetch_add(total, Ordering::Relaxed);
            c.evict_if_needed();
        });
        Ok(cache)
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

    /// The block, if a valid copy of exactly `len` data bytes is on disk.
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
            Err(None) => None,
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
        // Never follows a symlink; never blocks on a FIFO.
        let fd = match openat(
            shard,
            name,
            OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
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
        let mut raw = Vec::with_capacity(want as usize);
        (&file).take(want).read_to_end(&mut raw).map_err(|_| None)?;
        if raw.len() as u64 != want || Self::header(k, &raw[hlen..]) != raw[..hlen] {
            return Err(Some("failed its check"));
        }
        Ok((Bytes::from(raw).slice(hlen..), file, st.st_mtime))
    }

    /// Removes an unusable entry (only a name in our own folder: safe).
    pub(super) fn reject(&self, shard: &OwnedFd, name: &str, why: &str) {
        warn!(path = %self.dir.join(&name[..2]).join(name).display(), why, "disk cache entry ignored and removed");
        let _ = unlinkat(shard, name, UnlinkatFlags::NoRemoveDir);
    }

    /// Counts `n` bytes newly written, evicting if the folder is over.
    pub(super) fn added(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
        self.since_scan.fetch_add(n, Ordering::Relaxed);
        self.evict_if_needed();
    }

    pub fn put(&self, k: &BlockKey, data: &[u8]) -> std::io::Result<()> {
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

    /// Every block file: regular files only, found without following
    /// symlinks (a planted link never makes eviction delete elsewhere).
    pub(super) fn entries(&self) -> Vec<Entry> {
        self.entries_in(0..256)
    }

    /// The block files of `shards`.
    pub(super) fn entries_in(&self, shards: impl Iterator<Item = usize>) -> Vec<Entry> {
        let mut out = Vec::new();
        for idx in shards {
            let sub = format!("{idx:02x}");
            let Ok(dir_fd) = open_dir_at(&self.root, sub.as_str()) else {
                continue;
            };
            let Ok(dup) = dir_fd.try_clone() else {
                continue;
            };
            let Ok(mut dir) = nix::dir::Dir::from_fd(dup) else {
                continue;
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
                    // A claim may hold a whole block's data (its owner
                    // died while filling it): gone sooner than a
                    // temporary file, yet long after any claim's deadline.
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
        }
        out
    }

    /// Evicts least recently used blocks down to 90% of the limit. In a
    /// shared folder other processes add blocks this one never counted, so
    /// it also re-measures after writing a tenth of the limit itself.
    pub(super) fn evict_if_needed(&self) {
        let remeasure = self.shared && self.since_scan.load(Ordering::Relaxed) > self.limit / 10;
        if self.used.load(Ordering::Relaxed) <= self.limit && !remeasure {
            return;
        }
        let Ok(_g) = self.evicting.try_lock() else {
            return;
        };
        let _lock = EvictLock::take(&self.root, &self.dir, self.file_mode);
        self.since_scan.store(0, Ordering::Relaxed);
        if self.shared {
            return self.evict_sampled();
        }
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|e| e.size).sum();
        entries.sort_by_key(|e| e.mtime);
        let target = self.limit / 10 * 9;
        let mut evicted = 0;
        for e in entries {
            if total <= target {
                break;
            }
            let Ok(dir_fd) = open_dir_at(&self.root, format!("{:02x}", e.shard).as_str()) else {
                continue;
            };
            if unlinkat(&dir_fd, e.name.as_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
                total -= e.size;
                evicted += 1;
            }
        }
        self.used.store(total, Ordering::Relaxed);
        if evicted > 0 {
            debug!(evicted, total, "disk cache evicted");
        }
    }
}

pub(super) struct Entry {
    pub(super) shard: usize,
    pub(super) name: String,
    pub(super) size: u64,
    pub(super) mtime: i64,
}

/// Creates `d` (and parents) with `mode`, set explicitly so the umask
/// cannot drop the group bits of a group cache.
pub(super) fn make_dir(d: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    match fs::DirBuilder::new().mode(mode & 0o777).create(d) {
        Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = d.parent() {
                fs::DirBuilder::new().recursive(true).create(parent)?;
            }
            make_dir(d, mode)
        }
        Err(e) => Err(e),
    }
}

/// A private cache that other users can read would leak data they may not
/// be allowed to see: refuse it, as ssh refuses a readable key.
pub(super) fn check_private(dir: &Path, group: bool) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = fs::metadata(dir)?;
    let open_bits = if group { 0o007 } else { 0o077 };
    if md.mode() & open_bits != 0 {
        return Err(std::io::Error::other(format!(
            "cache folder {} is open to {} (mode {:o}); run `chmod {} {}`{}",
            dir.display(),
            if group {
                "other users"
            } else {
                "other users or the group"
            },
            md.mode() & 0o7777,
            if group { "2770" } else { "700" },
            dir.display(),
            if group {
                ""
            } else {
                ", or pass --cache-group to share it with the group"
            }
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::cache::test_keys::{disk, key};
    use crate::read::cache::ObjectId;

    #[test]
    fn disk_blocks_round_trip_and_reject_corruption() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&disk(d.path(), 1 << 20)).unwrap();
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
        let c = DiskCache::open(&disk(d.path(), 1 << 30)).unwrap();
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
        let c = DiskCache::open(&disk(d.path(), 10_000)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        for i in 0..20 {
            c.put(&key(i), &[7u8; 1000]).unwrap();
        }
        let total: u64 = c.entries().iter().map(|e| e.size).sum();
        assert!(total <= 10_000, "{total}");
        assert!(c.get(&key(19), 1000).is_some());
    }
}
