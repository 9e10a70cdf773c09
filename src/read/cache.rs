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
pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    used: AtomicU64,
    evicting: Mutex<()>,
}

impl DiskCache {
    /// Opens (creating, 0700) the cache folder. The size already used is
    /// measured in the background, so a large cache never delays a mount.
    pub fn open(dir: &Path, limit: u64) -> std::io::Result<Arc<Self>> {
        use std::os::unix::fs::DirBuilderExt;
        let root = dir.join("v1");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)?;
        let cache = Arc::new(Self {
            dir: root,
            limit,
            used: AtomicU64::new(0),
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
        let p = self.path(k);
        let raw = fs::read(&p).ok()?;
        // Rebuild the header we expect from the data part and compare.
        let key_part =
            8 + 3 * 4 + k.object.bucket.len() + k.object.key.len() + k.object.etag.len() + 8;
        let hlen = key_part + 8 + 4;
        if raw.len() < hlen {
            return None;
        }
        let data = &raw[hlen..];
        if Self::header(k, data) != raw[..hlen] {
            warn!(path = %p.display(), "disk cache block failed its check; ignored");
            let _ = fs::remove_file(&p);
            return None;
        }
        // Touch for LRU: the access time orders eviction.
        let _ = fs::File::open(&p).and_then(|f| f.set_modified(std::time::SystemTime::now()));
        Some(Bytes::copy_from_slice(data))
    }

    pub fn put(&self, k: &BlockKey, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let p = self.path(k);
        let parent = p.parent().unwrap_or(&self.dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        let tmp = parent.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let mut f = fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        let header = Self::header(k, data);
        let written = f.write_all(&header).and_then(|_| f.write_all(data));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        drop(f);
        fs::rename(&tmp, &p)?;
        self.used
            .fetch_add((header.len() + data.len()) as u64, Ordering::Relaxed);
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
                if let Ok(md) = f.metadata() {
                    if md.is_file() {
                        let t = md.modified().unwrap_or(std::time::UNIX_EPOCH);
                        out.push((f.path(), md.len(), t));
                    }
                }
            }
        }
        out
    }

    /// Evicts least recently used blocks down to 90% of the limit.
    fn evict_if_needed(&self) {
        if self.used.load(Ordering::Relaxed) <= self.limit {
            return;
        }
        let Ok(_g) = self.evicting.try_lock() else {
            return;
        };
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
        debug!(evicted, total, "disk cache evicted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let c = DiskCache::open(d.path(), 1 << 20).unwrap();
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
        let c = DiskCache::open(d.path(), 10_000).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        for i in 0..20 {
            c.put(&key(i), &[7u8; 1000]).unwrap();
        }
        let total: u64 = c.entries().iter().map(|e| e.1).sum();
        assert!(total <= 10_000, "{total}");
        assert!(c.get(&key(19)).is_some());
    }
}
