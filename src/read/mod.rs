//! The read path: per-open-file access-pattern tracking, adaptive
//! read-ahead, the block cache and single-flight block fetches.
//!
//! Policy, in the order it is applied to each `read(offset, size)`:
//! 1. blocks already cached (memory, then disk) are served without a request;
//! 2. the first read of a handle fetches the 1 MiB block(s) around it, so a
//!    header or footer read costs one small GET;
//! 3. a read that continues where the last one ended is sequential: the
//!    window ahead of it doubles (while the reader keeps consuming) up to a
//!    bound, fetched as several ranged GETs in flight at once;
//! 4. any other read (a seek: HDF5 chunks, Parquet columns, sqlite pages)
//!    fetches exactly the bytes asked for and resets the window, so random
//!    access never triggers large read-ahead.
//!
//! In-flight data is bounded globally by a semaphore (`max_inflight`), the
//! memory cache by its byte budget, and each sequential reader's window by
//! its share of the cache, so a hundred open files cannot exhaust RAM.

pub mod cache;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info_span, warn, Instrument};

use crate::fs::tree::FileRef;
use crate::fs::FsError;
use crate::s3::S3Error;
use cache::{BlockKey, CacheStats, DiskCache, MemoryCache, ObjectId};

const MIB: u64 = 1024 * 1024;

#[derive(Clone, Debug)]
pub struct ReadConfig {
    /// Cache and fetch granularity.
    pub block_size: u64,
    /// Largest single ranged GET of read-ahead.
    pub part_size: u64,
    /// Read-ahead window when a sequential run starts.
    pub initial_window: u64,
    /// Largest read-ahead window of one file.
    pub max_window: u64,
    /// Byte budget of the memory block cache.
    pub memory_cache: u64,
    /// Bytes of GETs in flight at once, all files together.
    pub max_inflight: u64,
    /// Disk tier.
    pub disk: Option<DiskConfig>,
}

/// Where and how blocks are kept on disk.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    pub dir: PathBuf,
    /// Byte budget of the whole folder.
    pub limit: u64,
    /// Other processes (other nodes) use the folder too: re-measure it
    /// rather than trust this process's own count.
    pub shared: bool,
    /// The owner's group may read and evict (folders 2770, files 0640).
    pub group: bool,
}

impl Default for ReadConfig {
    fn default() -> Self {
        Self {
            block_size: MIB,
            part_size: 8 * MIB,
            initial_window: MIB,
            max_window: 64 * MIB,
            memory_cache: 96 * MIB,
            max_inflight: 64 * MIB,
            disk: None,
        }
    }
}

/// A cloneable failure of a shared block fetch.
#[derive(Clone, Debug)]
enum FetchError {
    Stale,
    NotFound,
    Denied(String),
    Io(String),
}

impl From<S3Error> for FetchError {
    fn from(e: S3Error) -> Self {
        match FsError::from(e) {
            FsError::Stale => FetchError::Stale,
            FsError::NotFound => FetchError::NotFound,
            FsError::PermissionDenied(d) => FetchError::Denied(d),
            other => FetchError::Io(other.to_string()),
        }
    }
}

impl From<FetchError> for FsError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Stale => FsError::Stale,
            FetchError::NotFound => FsError::Stale, // gone since it was opened
            FetchError::Denied(d) => FsError::PermissionDenied(d),
            FetchError::Io(m) => FsError::Io(m),
        }
    }
}

type Pending = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

/// Shared by every open file of a mount.
pub struct Reader {
    cfg: ReadConfig,
    mem: MemoryCache,
    disk: Option<Arc<DiskCache>>,
    inflight: Mutex<HashMap<BlockKey, Pending>>,
    budget: Arc<Semaphore>,
    sequential: Arc<AtomicUsize>,
    pub stats: CacheStats,
}

/// One open file handle and what its reads look like so far.
pub struct OpenFile {
    file: FileRef,
    id: Arc<ObjectId>,
    pattern: Mutex<Pattern>,
    sequential: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Pattern {
    reads: u64,
    streak: u32,
    /// How far read-ahead has been requested.
    ahead_to: u64,
    last_end: u64,
    window: u64,
    counted: bool,
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        let p = self.pattern.get_mut().unwrap_or_else(|p| p.into_inner());
        if p.counted {
            self.sequential.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl OpenFile {
    pub fn size(&self) -> u64 {
        self.file.meta.size
    }

    pub fn etag(&self) -> &str {
        &self.file.meta.etag
    }
}

enum Plan {
    /// Fetch the blocks covering the read (and, if `ahead` > end, read-ahead).
    Blocks { ahead: u64 },
    /// Fetch exactly the requested bytes.
    Exact,
}

impl Reader {
    pub fn new(mut cfg: ReadConfig) -> std::io::Result<Arc<Self>> {
        cfg.block_size = cfg.block_size.max(64 * 1024);
        cfg.part_size = cfg.part_size.max(cfg.block_size) / cfg.block_size * cfg.block_size;
        cfg.initial_window = cfg.initial_window.max(cfg.block_size);
        cfg.max_window = cfg.max_window.max(cfg.initial_window);
        // Read-ahead lands in the memory cache before it is read, so the
        // cache must hold at least a couple of parts.
        cfg.memory_cache = cfg.memory_cache.max(2 * cfg.part_size);
        cfg.max_inflight = cfg.max_inflight.max(cfg.part_size);
        let disk = match &cfg.disk {
            Some(d) => Some(DiskCache::open(d)?),
            None => None,
        };
        let permits = (cfg.max_inflight / cfg.block_size) as usize;
        Ok(Arc::new(Self {
            mem: MemoryCache::new(cfg.memory_cache),
            disk,
            inflight: Mutex::new(HashMap::new()),
            budget: Arc::new(Semaphore::new(permits)),
            sequential: Arc::new(AtomicUsize::new(0)),
            stats: CacheStats::default(),
            cfg,
        }))
    }

    pub fn open(&self, file: FileRef) -> OpenFile {
        let id = Arc::new(ObjectId {
            bucket: file.dataset.bucket.clone(),
            key: file.meta.key.clone(),
            etag: file.meta.etag.clone(),
        });
        OpenFile {
            file,
            id,
            pattern: Mutex::new(Pattern::default()),
            sequential: self.sequential.clone(),
        }
    }

    fn key(&self, f: &OpenFile, index: u64) -> BlockKey {
        BlockKey {
            object: f.id.clone(),
            index,
        }
    }

    /// The largest window one sequential reader may use now: its share of
    /// the memory cache, so concurrent readers do not evict each other's
    /// read-ahead before it is read.
    fn window_cap(&self) -> u64 {
        let readers = self.sequential.load(Ordering::Relaxed).max(1) as u64;
        (self.cfg.memory_cache / (2 * readers))
            .min(self.cfg.max_window)
            .max(self.cfg.block_size)
    }

    fn plan(&self, f: &OpenFile, offset: u64, end: u64) -> Plan {
        let mut p = f.pattern.lock().unwrap_or_else(|p| p.into_inner());
        let first = p.reads == 0;
        // It takes two reads in a row that continue the last to count as
        // sequential, so random reads that land near each other by chance
        // trigger nothing.
        let bs = self.cfg.block_size;
        // Large requests are the kernel's read-ahead, issued several at a
        // time and answered by several threads: allow a few MiB of
        // reordering. Small ones must continue almost exactly.
        let size = end - offset;
        let slack = if size >= bs / 2 {
            8 * bs
        } else {
            size.max(4096)
        };
        let near = !first && offset + slack >= p.last_end && offset <= p.last_end + slack;
        let crossed = near && end.div_ceil(bs) > p.last_end.div_ceil(bs);
        p.reads += 1;
        p.streak = if near { p.streak + 1 } else { 0 };
        p.last_end = if near { p.last_end.max(end) } else { end };
        if first {
            p.window = self.cfg.initial_window;
            return Plan::Blocks { ahead: end };
        }
        if p.streak < 2 {
            p.window = self.cfg.initial_window;
            p.ahead_to = 0;
            // A large read (kernel read-ahead of a seek) costs about the
            // same block-aligned, and then lands in the cache.
            return if end - offset >= bs / 2 {
                Plan::Blocks { ahead: end }
            } else {
                Plan::Exact
            };
        }
        if !p.counted {
            p.counted = true;
            self.sequential.fetch_add(1, Ordering::Relaxed);
        }
        // The window doubles each time the reader moves into a new block;
        // read-ahead is topped up only when less than half of it is left,
        // so it goes out in large GETs, not one block at a time.
        if crossed {
            p.window = (p.window * 2).min(self.window_cap());
        }
        if p.ahead_to < end + p.window / 2 {
            p.ahead_to = (end + p.window).min(f.size());
            Plan::Blocks { ahead: p.ahead_to }
        } else {
            Plan::Blocks { ahead: end }
        }
    }

    /// Up to `size` bytes from `offset`; fewer only at end of file.
    pub async fn read(
        self: &Arc<Self>,
        f: &OpenFile,
        offset: u64,
        size: u32,
    ) -> Result<Bytes, FsError> {
        let end = offset.saturating_add(size as u64).min(f.size());
        if offset >= end {
            return Ok(Bytes::new());
        }
        let bs = self.cfg.block_size;
        let (b0, b1) = (offset / bs, (end - 1) / bs);
        let plan = self.plan(f, offset, end);
        // Served from memory whatever the plan, when every block is there.
        let cached: Option<Vec<Bytes>> = (b0..=b1).map(|i| self.mem.get(&self.key(f, i))).collect();
        if let Some(blocks) = cached {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            if let Plan::Blocks { ahead } = plan {
                if ahead > end {
                    self.read_ahead(f, b1 + 1, ahead).await;
                }
            }
            return Ok(self.assemble(f, &blocks, b0, offset, end));
        }
        // Blocks already on their way serve an exact read too.
        let plan = match plan {
            Plan::Exact
                if (b0..=b1).any(|i| self.lock_inflight().contains_key(&self.key(f, i))) =>
            {
                Plan::Blocks { ahead: end }
            }
            other => other,
        };
        match plan {
            Plan::Exact => {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let m = &f.file.meta;
                f.file
                    .dataset
                    .store
                    .get_range(&m.key, offset..end, Some(&m.etag))
                    .await
                    .map_err(FsError::from)
            }
            Plan::Blocks { ahead } => {
                self.ensure(f, b0, b1, true).await;
                if ahead > end {
                    self.read_ahead(f, b1 + 1, ahead).await;
                }
                let mut blocks = Vec::with_capacity((b1 - b0 + 1) as usize);
                for i in b0..=b1 {
                    blocks.push(self.block(f, i).await?);
                }
                Ok(self.assemble(f, &blocks, b0, offset, end))
            }
        }
    }

    fn assemble(&self, f: &OpenFile, blocks: &[Bytes], b0: u64, offset: u64, end: u64) -> Bytes {
        let bs = self.cfg.block_size;
        let start = (offset - b0 * bs) as usize;
        let len = (end - offset) as usize;
        // A block fully read by a sequential reader now sits in the page
        // cache; let it go first.
        if end.is_multiple_of(bs) || end == f.size() {
            self.mem.demote(&self.key(f, (end - 1) / bs));
        }
        if blocks.len() == 1 {
            return blocks[0].slice(start..start + len);
        }
        let mut out = BytesMut::with_capacity(len);
        let mut skip = start;
        for b in blocks {
            let take = &b[skip.min(b.len())..];
            let want = (len - out.len()).min(take.len());
            out.extend_from_slice(&take[..want]);
            skip = 0;
        }
        out.freeze()
    }

    /// A block from memory, an in-flight fetch, or a new fetch.
    async fn block(self: &Arc<Self>, f: &OpenFile, i: u64) -> Result<Bytes, FsError> {
        let key = self.key(f, i);
        for _ in 0..3 {
            if let Some(b) = self.mem.get(&key) {
                return Ok(b);
            }
            let pending = self.lock_inflight().get(&key).cloned();
            if let Some(p) = pending {
                return p.await.map_err(FsError::from);
            }
            // Evicted between fetch and use: fetch it again.
            self.ensure(f, i, i, true).await;
        }
        Err(FsError::Io(
            "block cache thrashing: raise --memory-cache-size".into(),
        ))
    }

    fn lock_inflight(&self) -> std::sync::MutexGuard<'_, HashMap<BlockKey, Pending>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes sure blocks `first..=last` are cached or being fetched. Missing
    /// runs become parts of at most `part_size`, one GET each. Demanded
    /// blocks wait for in-flight budget; read-ahead gives up without it.
    /// Returns the first block it could not request (`last + 1` if none).
    async fn ensure(self: &Arc<Self>, f: &OpenFile, first: u64, last: u64, demand: bool) -> u64 {
        let bs = self.cfg.block_size;
        let last = last.min(f.size().saturating_sub(1) / bs);
        let per_part = self.cfg.part_size / bs;
        let mut i = first;
        while i <= last {
            // Find the next run of blocks neither cached nor in flight.
            let missing = |i: u64| {
                let k = self.key(f, i);
                !self.mem.contains(&k) && !self.lock_inflight().contains_key(&k)
            };
            if !missing(i) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < last && j + 1 - i < per_part && missing(j + 1) {
                j += 1;
            }
            let n = (j - i + 1) as u32;
            let permit = if demand {
                match self.budget.clone().acquire_many_owned(n).await {
                    Ok(p) => p,
                    Err(_) => return i,
                }
            } else {
                match self.budget.clone().try_acquire_many_owned(n) {
                    Ok(p) => p,
                    Err(_) => return i, // no budget for read-ahead now
                }
            };
            self.start_fetch(f, i, j, permit);
            i = j + 1;
        }
        last + 1
    }

    /// Requests read-ahead up to byte `ahead`; when the in-flight budget
    /// stops it short, the next read tries again from there.
    async fn read_ahead(self: &Arc<Self>, f: &OpenFile, from_block: u64, ahead: u64) {
        let bs = self.cfg.block_size;
        let last = (ahead - 1) / bs;
        let stopped = self.ensure(f, from_block, last, false).await;
        if stopped <= last {
            let mut p = f.pattern.lock().unwrap_or_else(|p| p.into_inner());
            p.ahead_to = p.ahead_to.min(stopped * bs);
        }
    }

    /// Registers blocks `i..=j` as in flight and spawns one fetch for them.
    fn start_fetch(self: &Arc<Self>, f: &OpenFile, i: u64, j: u64, permit: OwnedSemaphorePermit) {
        let mut senders = Vec::new();
        {
            let mut inflight = self.lock_inflight();
            for idx in i..=j {
                let key = self.key(f, idx);
                if inflight.contains_key(&key) || self.mem.contains(&key) {
                    continue;
                }
                let (tx, rx) = oneshot::channel::<Result<Bytes, FetchError>>();
                let fut: Pending = rx
                    .map(|r| r.unwrap_or_else(|_| Err(FetchError::Io("fetch abandoned".into()))))
                    .boxed()
                    .shared();
                inflight.insert(key.clone(), fut);
                senders.push((key, tx));
            }
        }
        if senders.is_empty() {
            return;
        }
        let me = self.clone();
        let file = f.file.clone();
        let span = info_span!("fetch_blocks", key = %file.meta.key, first = i, last = j);
        tokio::spawn(
            async move {
                me.fetch(&file, senders).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    async fn fetch(
        &self,
        file: &FileRef,
        senders: Vec<(BlockKey, oneshot::Sender<Result<Bytes, FetchError>>)>,
    ) {
        let mut senders: Vec<Option<_>> = senders.into_iter().map(Some).collect();
        if let Some(disk) = &self.disk {
            // All of the batch from disk at once, each answered as soon as
            // it is read: a cache shared by another node is as fast as the
            // disk allows, not one block at a time.
            let reads = senders.iter().flatten().map(|(key, _)| {
                let (d, k) = (disk.clone(), key.clone());
                tokio::task::spawn_blocking(move || d.get(&k))
            });
            let found = futures::future::join_all(reads).await;
            for (slot, r) in senders.iter_mut().zip(found) {
                if let Ok(Some(b)) = r {
                    if let Some((key, tx)) = slot.take() {
                        self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                        self.mem.insert(key.clone(), b.clone());
                        self.lock_inflight().remove(&key);
                        let _ = tx.send(Ok(b));
                    }
                }
            }
        }
        // What is left may have gaps (blocks another reader was already
        // fetching are not ours to fetch): one GET per contiguous run, each
        // piece handed to the block of its own index.
        let left: Vec<_> = senders.into_iter().flatten().collect();
        let mut runs: Vec<Vec<(BlockKey, Sender)>> = Vec::new();
        for s in left {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|(k, _)| k.index + 1 == s.0.index) => {
                    run.push(s)
                }
                _ => runs.push(vec![s]),
            }
        }
        futures::future::join_all(runs.into_iter().map(|run| self.fetch_run(file, run))).await;
    }

    /// One ranged GET for blocks with consecutive indices.
    async fn fetch_run(&self, file: &FileRef, run: Vec<(BlockKey, Sender)>) {
        let bs = self.cfg.block_size;
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return;
        };
        let (first_index, last_index) = (first.0.index, last.0.index);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let start = first_index * bs;
        let end = ((last_index + 1) * bs).min(file.meta.size);
        let fetched = file
            .dataset
            .store
            .get_pieces(&file.meta.key, start..end, Some(&file.meta.etag), bs)
            .await;
        let mut pieces = match fetched {
            Ok(p) if p.len() as u64 == last_index - first_index + 1 => Ok(p.into_iter()),
            Ok(p) => Err(FetchError::Io(format!(
                "{} pieces for {} blocks",
                p.len(),
                last_index - first_index + 1
            ))),
            Err(e) => {
                debug!(error = %e, "block fetch failed");
                Err(FetchError::from(e))
            }
        };
        for (key, tx) in run {
            let r = match pieces.as_mut().map(|p| p.next()) {
                Ok(Some(b)) => {
                    self.mem.insert(key.clone(), b.clone());
                    if let Some(disk) = &self.disk {
                        let (d, k, data) = (disk.clone(), key.clone(), b.clone());
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = d.put(&k, &data) {
                                warn!(error = %e, "cannot write disk cache block");
                            }
                        });
                        self.stats.disk_writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(b)
                }
                Ok(None) => Err(FetchError::Io("block missing from answer".into())),
                Err(e) => Err(e.clone()),
            };
            self.lock_inflight().remove(&key);
            let _ = tx.send(r);
        }
    }
}

/// Where a fetched block is delivered.
type Sender = oneshot::Sender<Result<Bytes, FetchError>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tree::Dataset;
    use crate::s3::memory::MemoryStore;
    use crate::s3::ObjectStore;
    use std::sync::atomic::Ordering::Relaxed;

    #[tokio::test]
    async fn a_batch_with_gaps_gets_each_block_its_own_bytes() {
        // Blocks 1 and 4 are being fetched by someone else: the batch holds
        // 0, 2, 3, 5 and must not shift 3's bytes into 2 (or 5's into 3).
        let (reader, store, file, data) = setup(6 << 20).await;
        let f = reader.open(file.clone());
        let mut rxs = Vec::new();
        let mut senders = Vec::new();
        for idx in [0u64, 2, 3, 5] {
            let (tx, rx) = oneshot::channel();
            senders.push((reader.key(&f, idx), tx));
            rxs.push((idx, rx));
        }
        reader.fetch(&file, senders).await;
        for (idx, rx) in rxs {
            let got = rx.await.unwrap().unwrap();
            let bs = 1usize << 20;
            let want = &data[idx as usize * bs..(idx as usize + 1) * bs];
            assert!(got == want, "block {idx} has another block's bytes");
        }
        assert_eq!(store.gets.load(Relaxed), 3, "one GET per contiguous run");
    }

    async fn setup(len: usize) -> (Arc<Reader>, Arc<MemoryStore>, FileRef, Vec<u8>) {
        let store = Arc::new(MemoryStore::new());
        let data = crate::demo::pseudo_random(3, len);
        store.put("k", data.clone());
        let meta = store.head("k").await.unwrap();
        let ds = Arc::new(Dataset {
            handle: "1/2".into(),
            bucket: "b".into(),
            prefix: "".into(),
            updated: std::time::UNIX_EPOCH,
            name: None,
            store: store.clone(),
            prepared: Default::default(),
        });
        let reader = Reader::new(ReadConfig::default()).unwrap();
        (reader, store, FileRef { dataset: ds, meta }, data)
    }

    #[tokio::test]
    async fn sequential_reads_grow_a_window_and_return_the_right_bytes() {
        let (r, store, f, data) = setup(40 * MIB as usize + 77).await;
        let h = r.open(f);
        let mut off = 0u64;
        while off < data.len() as u64 {
            let b = r.read(&h, off, 128 * 1024).await.unwrap();
            assert_eq!(&b[..], &data[off as usize..(off as usize + b.len())]);
            off += b.len() as u64;
        }
        let gets = store.gets.load(Relaxed);
        // 41 blocks in parts of up to 8 MiB: far fewer GETs than blocks.
        assert!(gets < 20, "{gets} GETs");
    }

    #[tokio::test]
    async fn random_small_reads_fetch_only_what_is_asked() {
        let (r, store, f, data) = setup(64 * MIB as usize).await;
        let h = r.open(f);
        r.read(&h, 0, 4096).await.unwrap(); // first read: one block
        let before = store.gets.load(Relaxed);
        let mut x = 12345u64;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % (64 * MIB - 4096) / 4096 * 4096;
            let b = r.read(&h, off, 4096).await.unwrap();
            assert_eq!(&b[..], &data[off as usize..off as usize + 4096]);
        }
        let gets = store.gets.load(Relaxed) - before;
        assert!(gets <= 200, "one exact GET per random read at most: {gets}");
    }

    #[tokio::test]
    async fn concurrent_readers_of_a_block_share_one_get() {
        let (r, store, f, _) = setup(4 * MIB as usize).await;
        let handles: Vec<_> = (0..8).map(|_| Arc::new(r.open(f.clone()))).collect();
        let tasks: Vec<_> = handles
            .iter()
            .map(|h| {
                let (r, h) = (r.clone(), h.clone());
                tokio::spawn(async move { r.read(&h, 0, 4096).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(store.gets.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn stale_object_is_an_error_never_mixed_bytes() {
        let (r, store, f, _) = setup(4 * MIB as usize).await;
        let h = r.open(f);
        r.read(&h, 0, 4096).await.unwrap();
        store.put("k", vec![1u8; 4 * MIB as usize]);
        let e = r.read(&h, 3 * MIB, 4096).await.unwrap_err();
        assert!(matches!(e, FsError::Stale), "{e:?}");
    }
}
