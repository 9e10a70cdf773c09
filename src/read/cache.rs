//! The block cache: fixed-size blocks keyed by (bucket, key, ETag, index),
//! in a memory LRU with a byte budget and an optional disk tier.
//!
//! Keying by ETag means a block of an old object version can never be
//! served for a new one. Disk blocks carry a header naming what they hold
//! and a CRC32C of the data; any mismatch is a miss, never wrong bytes.
//! Disk blocks are written to a temporary name and renamed into place, so a
//! reader never sees half a block.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;
use sha2::{Digest, Sha256};
use tracing::{debug, warn};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockKey {
    pub object: Arc<ObjectId>,
    pub index: u64,
}

/// One version of one object.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ObjectId {
    pub bucket: String,
    pub key: String,
    pub etag: String,
}

/// Hit and miss counters, for stats and tests.
#[derive(Default, Debug)]
pub struct CacheStats {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub misses: AtomicU64,
    pub disk_writes: AtomicU64,
    pub disk_evictions: AtomicU64,
}

pub struct MemoryCache {
    budget: u64,
    inner: Mutex<(LruCache<BlockKey, Bytes>, u64)>,
}

impl MemoryCache {
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            inner: Mutex::new((LruCache::unbounded(), 0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (LruCache<BlockKey, Bytes>, u64)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, k: &BlockKey) -> Option<Bytes> {
        self.lock().0.get(k).cloned()
    }

    pub fn contains(&self, k: &BlockKey) -> bool {
        self.lock().0.contains(k)
    }

    pub fn insert(&self, k: BlockKey, v: Bytes) {
        if self.budget == 0 || v.len() as u64 > self.budget {
            return;
        }
        let mut g = self.lock();
        let (lru, used) = &mut *g;
        *used += v.len() as u64;
        if let Some(old) = lru.put(k, v) {
            *used -= old.len() as u64;
        }
        while *used > self.budget {
            match lru.pop_lru() {
                Some((_, b)) => *used -= b.len() as u64,
                None => break,
            }
        }
    }

    /// Marks a block as next to go: consumed by a sequential reader, it
    /// now lives in the kernel's page cache.
    pub fn demote(&self, k: &BlockKey) {
        self.lock().0.demote(k);
    }

    pub fn used(&self) -> u64 {
        self.lock().1
    }
}

const MAGIC: &[u8; 8] = b"PVFSBLK1";

/// Blocks on disk under `dir/v1/<aa>/<hash>`, bounded by `limit` bytes.
///
/// The folder may be shared by many processes on many nodes (a cluster
/// file system): every block is written under a private temporary name and
/// renamed into place, so readers see a whole block or none, and two
/// writers of the same block each install a complete copy. Eviction takes
/// an advisory lock on `dir/v1/.evict.lock` so one process at a time
/// trims the folder; where the file system has no locks it trims anyway
/// (an unlink that loses the race is harmless).
pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    /// Bytes in the folder as last measured plus what this process wrote since.
    used: AtomicU64,
    /// Bytes written since the last full measurement.
    since_scan: AtomicU64,
    shared: bool,
    dir_mode: u32,
    file_mode: u32,
    evicting: Mutex<()>,
}

impl DiskCache {
    /// Opens (creating) the cache folder, 0700 (2770 for a group cache).
    /// The size already used is measured in the background, so a large
    /// cache never delays a mount.
    pub fn open(cfg: &super::DiskConfig) -> std::io::Result<Arc<Self>> {
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
        // Fail now, not at the first block, on a folder we cannot write.
        let probe = root.join(format!(
            ".probe-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        fs::write(&probe, b"")?;
        let _ = fs::remove_file(&probe);
        let cache = Arc::new(Self {
            dir: root,
            limit: cfg.limit,
            used: AtomicU64::new(0),
            since_scan: AtomicU64::new(0),
            shared: cfg.shared,
            dir_mode,
            file_mode,
            evicting: Mutex::new(()),
        });
        let c = cache.clone();
        std::thread::spawn(move || {
            let total: u64 = c.entries().iter().map(|(_, len, _)| len).sum();
            c.used.fetch_add(total, Ordering::Relaxed);
            c.evict_if_needed();
        });
        Ok(cache)
    }

    fn path(&self, k: &BlockKey) -> PathBuf {
        let mut h = Sha256::new();
        for part in [&k.object.bucket, &k.object.key, &k.object.etag] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(k.index.to_le_bytes());
        let name = hex::encode(h.finalize());
        self.dir.join(&name[..2]).join(name)
    }

    fn header(k: &BlockKey, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + k.object.key.len());
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

    /// The block, if a valid copy is on disk.
    pub fn get(&self, k: &BlockKey) -> Option<Bytes> {
        use std::io::Read;
        let p = self.path(k);
        // One open for reading, checking and touching.
        let mut f = fs::File::open(&p).ok()?;
        let md = f.metadata().ok()?;
        let mut raw = Vec::with_capacity(md.len() as usize);
        f.read_to_end(&mut raw).ok()?;
        // Rebuild the header we expect from the data part and compare.
        let key_part =
            8 + 3 * 4 + k.object.bucket.len() + k.object.key.len() + k.object.etag.len() + 8;
        let hlen = key_part + 8 + 4;
        if raw.len() < hlen {
            return None;
        }
        if Self::header(k, &raw[hlen..]) != raw[..hlen] {
            warn!(path = %p.display(), "disk cache block failed its check; ignored");
            let _ = fs::remove_file(&p);
            return None;
        }
        // Touch for LRU: the modification time orders eviction (atime is
        // often off or relaxed on cluster file systems). A minute's
        // precision is plenty, and saves a metadata write per hit.
        let now = std::time::SystemTime::now();
        let stale = md
            .modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_none_or(|age| age.as_secs() >= 60);
        if stale {
            let _ = f.set_modified(now);
        }
        Some(Bytes::from(raw).slice(hlen..))
    }

    pub fn put(&self, k: &BlockKey, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let p = self.path(k);
        let parent = p.parent().unwrap_or(&self.dir);
        if !parent.is_dir() {
            make_dir(parent, self.dir_mode)?;
        }
        let tmp = parent.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut f = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(self.file_mode)
            .open(&tmp)?;
        if self.file_mode & 0o040 != 0 {
            // The umask may have taken the group bit away.
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(fs::Permissions::from_mode(self.file_mode))?;
        }
        let header = Self::header(k, data);
        let written = f.write_all(&header).and_then(|_| f.write_all(data));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        drop(f);
        if let Err(e) = fs::rename(&tmp, &p) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let n = (header.len() + data.len()) as u64;
        self.used.fetch_add(n, Ordering::Relaxed);
        self.since_scan.fetch_add(n, Ordering::Relaxed);
        self.evict_if_needed();
        Ok(())
    }

    /// (path, size, modified) of every block file.
    fn entries(&self) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return out;
        };
        for sub in rd.flatten() {
            let Ok(files) = fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let Ok(md) = f.metadata() else { continue };
                if !md.is_file() {
                    continue;
                }
                let t = md.modified().unwrap_or(std::time::UNIX_EPOCH);
                if f.file_name().as_encoded_bytes().starts_with(b".tmp-") {
                    // A writer that died mid-block (on any node) left this.
                    if t.elapsed().is_ok_and(|age| age.as_secs() > 3600) {
                        let _ = fs::remove_file(f.path());
                    }
                    continue;
                }
                out.push((f.path(), md.len(), t));
            }
        }
        out
    }

    /// Evicts least recently used blocks down to 90% of the limit. In a
    /// shared folder other processes add blocks this one never counted, so
    /// it also re-measures after writing a tenth of the limit itself.
    fn evict_if_needed(&self) {
        let remeasure = self.shared && self.since_scan.load(Ordering::Relaxed) > self.limit / 10;
        if self.used.load(Ordering::Relaxed) <= self.limit && !remeasure {
            return;
        }
        let Ok(_g) = self.evicting.try_lock() else {
            return;
        };
        let _lock = EvictLock::take(&self.dir, self.file_mode);
        self.since_scan.store(0, Ordering::Relaxed);
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|(_, l, _)| l).sum();
        entries.sort_by_key(|(_, _, t)| *t);
        let target = self.limit / 10 * 9;
        let mut evicted = 0;
        for (p, len, _) in entries {
            if total <= target {
                break;
            }
            if fs::remove_file(&p).is_ok() {
                total -= len;
                evicted += 1;
            }
        }
        self.used.store(total, Ordering::Relaxed);
        if evicted > 0 {
            debug!(evicted, total, "disk cache evicted");
        }
    }
}

/// Creates `d` (and parents) with `mode`, set explicitly so the umask
/// cannot drop the group bits of a group cache.
fn make_dir(d: &Path, mode: u32) -> std::io::Result<()> {
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
fn check_private(dir: &Path, group: bool) -> std::io::Result<()> {
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

/// `flock` on the eviction lock file, released on drop. `None` when the
/// file system has no locks: eviction then proceeds unlocked.
struct EvictLock(Option<fs::File>);

impl EvictLock {
    fn take(dir: &Path, mode: u32) -> EvictLock {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        use std::os::unix::io::AsRawFd;
        let p = dir.join(".evict.lock");
        // Read-write where we may (NFS emulates flock with fcntl locks,
        // which need a descriptor open for writing); read-only otherwise
        // (a group member of a cache someone else created).
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(mode)
            .open(&p)
            .inspect(|f| {
                // The umask may have taken the group bits away.
                let _ = f.set_permissions(fs::Permissions::from_mode(mode));
            })
            .or_else(|_| fs::File::open(&p));
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                Self::unlocked(&format!("cannot open {}: {e}", p.display()));
                return EvictLock(None);
            }
        };
        // SAFETY: flock on an fd we own.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if r != 0 {
            Self::unlocked(&std::io::Error::last_os_error().to_string());
            return EvictLock(None);
        }
        EvictLock(Some(f))
    }

    /// Said once per process: trimming goes on without the lock.
    fn unlocked(why: &str) {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            warn!(reason = why, "disk cache: no eviction lock; mounts sharing the folder may trim it at the same time");
        });
    }
}

impl Drop for EvictLock {
    fn drop(&mut self) {
        if let Some(f) = &self.0 {
            use std::os::unix::io::AsRawFd;
            // SAFETY: as above.
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(dir: &Path, limit: u64) -> crate::read::DiskConfig {
        crate::read::DiskConfig {
            dir: dir.join("cache"),
            limit,
            shared: false,
            group: false,
        }
    }

    fn key(i: u64) -> BlockKey {
        BlockKey {
            object: Arc::new(ObjectId {
                bucket: "b".into(),
                key: "k".into(),
                etag: "e".into(),
            }),
            index: i,
        }
    }

    #[test]
    fn memory_cache_keeps_to_its_budget() {
        let c = MemoryCache::new(10);
        for i in 0..5 {
            c.insert(key(i), Bytes::from(vec![0u8; 4]));
        }
        assert!(c.used() <= 10);
        assert!(c.get(&key(4)).is_some());
        assert!(c.get(&key(0)).is_none());
    }

    #[test]
    fn disk_blocks_round_trip_and_reject_corruption() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&disk(d.path(), 1 << 20)).unwrap();
        c.put(&key(1), b"hello").unwrap();
        assert_eq!(c.get(&key(1)).unwrap(), Bytes::from_static(b"hello"));
        assert!(c.get(&key(2)).is_none());
        // Another ETag is another object.
        let other = BlockKey {
            object: Arc::new(ObjectId {
                bucket: "b".into(),
                key: "k".into(),
                etag: "f".into(),
            }),
            index: 1,
        };
        assert!(c.get(&other).is_none());
        // Flip a data byte: the block is refused.
        let p = c.path(&key(1));
        let mut raw = fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        fs::write(&p, raw).unwrap();
        assert!(c.get(&key(1)).is_none());
    }

    #[test]
    fn disk_cache_evicts_to_its_limit() {
        let d = tempfile::tempdir().unwrap();
        let c = DiskCache::open(&disk(d.path(), 10_000)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        for i in 0..20 {
            c.put(&key(i), &[7u8; 1000]).unwrap();
        }
        let total: u64 = c.entries().iter().map(|e| e.1).sum();
        assert!(total <= 10_000, "{total}");
        assert!(c.get(&key(19)).is_some());
    }
}
