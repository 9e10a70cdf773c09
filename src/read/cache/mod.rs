//! The block cache: fixed-size blocks keyed by (bucket, key, ETag, index),
//! in memory ([`memory`]: an LRU with a byte budget) and optionally on
//! disk ([`disk`]: one file per block, checked as it is read), whose
//! folder other mounts and nodes may share ([`shared`]: claims, so a block
//! is fetched once, and trimming by sampling).
//!
//! Keying by ETag means a block of an old object version can never be
//! served for a new one. Disk blocks carry a header naming what they hold
//! and a CRC32C of the data; any mismatch is a miss, never wrong bytes.
//! Disk blocks are written to a temporary name (in a shared folder, the
//! block's claim file) and renamed into place, so a reader never sees half
//! a block. The cache folder is treated as input:
//! see [`DiskCache`].

pub mod disk;
pub mod memory;
pub mod shared;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub use disk::{block_file_name, DiskCache};
pub use memory::MemoryCache;
pub use shared::{Claim, ClaimGuard};

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

impl ObjectId {
    /// The cache identity of one object version in `bucket`: its ETag,
    /// or, for a store that gives none (some S3-compatible ones), its size
    /// and modification time (such a version is never sent to S3). The
    /// mount and `prefetch` both key blocks by it, so they meet.
    pub fn of(bucket: &str, meta: &crate::s3::ObjectMeta) -> ObjectId {
        let etag = match meta.etag.as_str() {
            "" => {
                let t = meta
                    .last_modified
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                format!("~{}-{t}", meta.size)
            }
            e => e.to_string(),
        };
        ObjectId {
            bucket: bucket.to_string(),
            key: meta.key.clone(),
            etag,
        }
    }
}

/// Hit and miss counters, for stats and tests.
#[derive(Default, Debug)]
pub struct CacheStats {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub misses: AtomicU64,
    pub disk_writes: AtomicU64,
    pub disk_evictions: AtomicU64,
    /// Files bought whole (see `read/buy.rs`).
    pub buys: AtomicU64,
    /// GETs ahead of a reader moving forward stopped unfinished when it
    /// jumped away (see `read/pattern.rs`).
    pub follows_stopped: AtomicU64,
    /// Blocks asked for at an open because earlier readers needed them
    /// first (see `read/hints.rs`).
    pub hinted: AtomicU64,
    /// Reads that waited on a fetch started for them: a round trip (to S3,
    /// or to the disk cache) that neither read-ahead nor read hints had
    /// started, the latency a chain of dependent reads pays per link.
    pub waits: AtomicU64,
}

/// Keys and folders for the cache's unit tests.
#[cfg(test)]
pub(crate) mod test_keys {
    use super::*;
    use std::path::Path;

    /// The stall timeout of the tests' cache folders.
    pub const STALL: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn disk(dir: &Path, limit: u64) -> crate::read::DiskConfig {
        crate::read::DiskConfig {
            default: false,
            dir: dir.join("cache"),
            limit,
            shared: false,
            group: false,
        }
    }

    pub fn key(i: u64) -> BlockKey {
        BlockKey {
            object: Arc::new(ObjectId {
                bucket: "b".into(),
                key: "k".into(),
                etag: "e".into(),
            }),
            index: i,
        }
    }

    /// A block whose header is longer than any claim line, as real keys
    /// (`datasets/10378-1-.../file`) make them.
    pub fn long_key(i: u64) -> BlockKey {
        BlockKey {
            object: Arc::new(ObjectId {
                bucket: "rrap-storage".into(),
                key: "datasets/10378-1-1687966/some/folder/data.nc".into(),
                etag: "0123456789abcdef0123456789abcdef".into(),
            }),
            index: i,
        }
    }
}
