//! The read path: per-open-file access-pattern tracking, adaptive
//! read-ahead, the block cache and single-flight block fetches.
//!
//! Policy, in the order it is applied to each `read(offset, size)`:
//! 1. blocks already cached (memory, then disk) are served without a request;
//! 2. the first read of a handle fetches the 1 MiB block(s) around it, so a
//!    header or footer read costs one small GET;
//! 3. a read that continues where the last one ended is sequential: the
//!    window ahead of it is twice what the run has read so far, up to a
//!    bound, fetched as several ranged GETs in flight at once, each block
//!    handed to its readers as soon as its bytes are in;
//! 4. any other read (a seek: HDF5 chunks, Parquet columns, sqlite pages)
//!    fetches exactly the bytes asked for (half a block or more: its
//!    blocks) and resets the window, so random access never triggers
//!    read-ahead.
//!
//! Bounds, so that one stalled object never stalls the mount:
//! - every read ends by its deadline; a block fetch ends by the deadline
//!   of the read that started it (read-ahead: the request timeout);
//! - read-ahead in flight, all files together, is bounded by a budget
//!   (`max_inflight`) it never waits for: without room it simply does not
//!   start. Reads that a process waits for never wait for that budget
//!   (their memory is bounded by the kernel's requests in flight), and disk
//!   cache hits never take any of it;
//! - a fetch that failed is remembered for a few seconds, so the kernel's
//!   retry of the same range (read-ahead first, then the page itself) fails
//!   as fast instead of waiting out a second stall;
//! - a fetch that dies (panics, is dropped) leaves nothing behind: its
//!   blocks are fetched afresh by the next reader;
//! - a reader gets the bytes of its fetch from the fetch itself, not from
//!   the memory cache, so memory pressure can evict blocks but never fail
//!   a read.
//!
//! Who owns what, as mountpoint-s3 splits its prefetcher and data cache:
//! - `pattern.rs`: one open file's access pattern and the plan for each read;
//! - `inflight.rs`: single flight (one fetch per block however many wait)
//!   and the memory of failed fetches;
//! - `fetch.rs`: demand reads, read-ahead within its budget, GETs per run of
//!   blocks, the disk cache first and claims in a shared folder;
//! - `first.rs`: a file's first read (a lookup's first bytes, a GET of its
//!   own beside its block's);
//! - [`cache`]: the block cache (memory with its budget, disk, a shared
//!   folder's claims and trimming);
//! - this file: the [`Reader`] that puts them together for each read.

mod buy;
pub mod cache;
mod fetch;
mod first;
mod hints;
mod inflight;
mod pattern;

use inflight::{FetchError, Pending};
pub use pattern::OpenFile;
use pattern::Plan;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::Semaphore;

use crate::fs::FsError;
use crate::retry::Deadline;
use cache::{BlockKey, CacheStats, DiskCache, MemoryCache, ObjectId};

pub(crate) const MIB: u64 = 1024 * 1024;

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
    /// Bytes of read-ahead GETs in flight at once, all files together.
    pub max_inflight: u64,
    /// Disk tier.
    pub disk: Option<DiskConfig>,
    /// Bound of one read-ahead fetch (`--request-timeout`).
    pub request_timeout: Duration,
    /// Where the ranges each version's readers needed first are kept for
    /// the next open (`$XDG_STATE_HOME/provenafs/hints`; see `hints.rs`);
    /// None: not kept.
    pub hints_dir: Option<PathBuf>,
    /// Files kept whole in a private disk cache may be handed to the
    /// kernel (FUSE passthrough, where the kernel and the daemon's
    /// privileges allow it); false: every read comes to the daemon.
    pub passthrough: bool,
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
    /// provenafs chose the folder (the user's default cache,
    /// `$XDG_CACHE_HOME/provenafs`), not the user: nothing was staged there
    /// on purpose, so a guess at a file's first bytes (a request of its
    /// own beside a lookup's LIST) is worth it.
    pub default: bool,
}

/// The default disk cache: `$XDG_CACHE_HOME/provenafs` (else
/// `~/.cache/provenafs`); None when no home folder is known.
pub fn default_cache_dir() -> Option<PathBuf> {
    Some(directories::BaseDirs::new()?.cache_dir().join("provenafs"))
}

impl Default for ReadConfig {
    fn default() -> Self {
        Self {
            block_size: MIB,
            part_size: 4 * MIB,
            initial_window: MIB,
            max_window: 64 * MIB,
            memory_cache: 48 * MIB,
            max_inflight: 64 * MIB,
            disk: None,
            request_timeout: crate::retry::DEFAULT_REQUEST_TIMEOUT,
            hints_dir: None,
            passthrough: true,
        }
    }
}

/// Shared by every open file of a mount.
pub struct Reader {
    cfg: ReadConfig,
    mem: MemoryCache,
    disk: Option<Arc<DiskCache>>,
    inflight: Mutex<HashMap<BlockKey, Pending>>,
    /// Blocks whose last fetch failed, when and how.
    failures: Mutex<HashMap<BlockKey, (Instant, FetchError)>>,
    /// Read-ahead in flight, in blocks (see the module docs).
    budget: Arc<Semaphore>,
    sequential: Arc<AtomicUsize>,
    /// First bytes of files that lookups fetched beside their LIST, for
    /// each file's first read (see [`FirstBytes`]); the oldest go first.
    heads: Mutex<VecDeque<(Arc<ObjectId>, Bytes)>>,
    /// Each open version's rent and buy (see `buy.rs`).
    versions: buy::Versions,
    /// What the mount has measured of S3's pace.
    pace: buy::Pace,
    /// Ranges earlier readers needed first (see `hints.rs`).
    hints: Option<Arc<hints::Hints>>,
    /// Bought files are kept whole too: the FUSE layer hands them to the
    /// kernel (passthrough; see `fs/passthrough.rs`).
    whole_files: std::sync::atomic::AtomicBool,
    pub stats: CacheStats,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        let stall = crate::retry::stall_timeout(cfg.request_timeout);
        let disk = match &cfg.disk {
            // The user's default cache that cannot be made (no writable
            // home, a service account) is no reason not to mount.
            Some(d) if d.default => match DiskCache::open(d, stall) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(folder = %d.dir.display(), error = %e, "no disk cache: the default cache folder cannot be used");
                    None
                }
            },
            Some(d) => Some(DiskCache::open(d, stall)?),
            None => None,
        };
        if let Some(d) = &disk {
            d.set_block_size(cfg.block_size);
        }
        let permits = (cfg.max_inflight / cfg.block_size) as usize;
        Ok(Arc::new(Self {
            mem: MemoryCache::new(cfg.memory_cache),
            disk,
            inflight: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            budget: Arc::new(Semaphore::new(permits)),
            sequential: Arc::new(AtomicUsize::new(0)),
            heads: Mutex::new(VecDeque::new()),
            versions: Default::default(),
            pace: Default::default(),
            hints: cfg
                .hints_dir
                .as_deref()
                .and_then(|d| hints::Hints::open(d, stall)),
            stats: CacheStats::default(),
            whole_files: Default::default(),
            cfg,
        }))
    }

    fn key(&self, f: &OpenFile, index: u64) -> BlockKey {
        BlockKey {
            object: f.id.clone(),
            index,
        }
    }

    /// Bytes in block `index` of `f` (the last block may be short).
    fn block_len(&self, f: &OpenFile, index: u64) -> u64 {
        let bs = self.cfg.block_size;
        f.size().saturating_sub(index * bs).min(bs)
    }

    /// Disk cache folder entries read for size accounting and eviction.
    pub fn disk_meta_ops(&self) -> u64 {
        self.disk
            .as_ref()
            .map_or(0, |d| d.meta_ops.load(Ordering::Relaxed))
    }

    /// Whether a file kept whole could be read by the kernel: a disk
    /// cache no one else writes, on a local file system (see
    /// `read/cache/disk/whole.rs`), and passthrough not turned off.
    pub fn keeps_whole_files(&self) -> bool {
        self.cfg.passthrough
            && self
                .disk
                .as_ref()
                .is_some_and(|d| d.hands_whole_files_to_the_kernel())
    }

    /// The kernel reads whole files itself: keep bought files whole.
    pub fn enable_whole_files(&self) {
        self.whole_files.store(true, Ordering::Relaxed);
    }

    /// `f`'s version kept whole in the disk cache, open for reading, if it
    /// is there (within the cache folder's stall timeout).
    pub fn whole_file(&self, f: &OpenFile) -> Option<std::os::fd::OwnedFd> {
        let disk = self.disk.as_ref()?;
        if !self.whole_files.load(Ordering::Relaxed) || !disk.folder().answering() {
            return None;
        }
        let (d, id, size) = (disk.clone(), f.id.clone(), f.size());
        disk.folder()
            .run_blocking("open a whole file", move || Ok(d.open_whole(&id, size)))
            .ok()
            .flatten()
    }

    /// Blocks being fetched right now (for stats and tests).
    pub fn fetches_in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// Up to `size` bytes from `offset`; fewer only at end of file. Ends by
    /// `deadline` (then `TimedOut`).
    pub async fn read(
        self: &Arc<Self>,
        f: &OpenFile,
        offset: u64,
        size: u32,
        deadline: Deadline,
    ) -> Result<Bytes, FsError> {
        // A read a block of which is neither cached nor on its way waits a
        // round trip that read-ahead did not cover: the rent of
        // rent-or-buy (see `buy.rs`).
        let bs = self.cfg.block_size;
        let end = offset.saturating_add(size as u64).min(f.size());
        let uncovered = offset < end
            && (offset / bs..=(end - 1) / bs).any(|i| self.known(&self.key(f, i)).is_none());
        let waiting = uncovered.then(|| {
            self.stats.waits.fetch_add(1, Ordering::Relaxed);
            f.version.wait()
        });
        let started = std::time::Instant::now();
        let r = self.read_blocks(f, offset, size, deadline).await;
        drop(waiting);
        tracing::trace!(
            uncovered,
            waited_us = started.elapsed().as_micros() as u64,
            "read answered"
        );
        if let Ok(b) = &r {
            f.version.first.note(offset, end);
            if offset == 0 {
                self.format_prior(f, b);
            }
            if uncovered {
                self.rented(f, offset);
            }
        }
        r
    }

    async fn read_blocks(
        self: &Arc<Self>,
        f: &OpenFile,
        offset: u64,
        size: u32,
        deadline: Deadline,
    ) -> Result<Bytes, FsError> {
        let end = offset.saturating_add(size as u64).min(f.size());
        if offset >= end {
            return Ok(Bytes::new());
        }
        let bs = self.cfg.block_size;
        let (b0, b1) = (offset / bs, (end - 1) / bs);
        let first = lock(&f.pattern).reads == 0;
        let plan = self.plan(f, offset, end);
        if first {
            if let Some(head) = self.take_head(f) {
                if end <= head.len() as u64 {
                    // Its block still comes, for the reads after this one.
                    if !self.mem.contains(&self.key(f, 0)) {
                        let deadline = Deadline::after(self.cfg.request_timeout);
                        drop(self.demand(f, 0, 0, deadline));
                    }
                    self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(head.slice(offset as usize..end as usize));
                }
            }
        }
        // Served from memory whatever the plan, when every block is there.
        let cached: Option<Vec<Bytes>> = (b0..=b1).map(|i| self.mem.get(&self.key(f, i))).collect();
        if let Some(blocks) = cached {
            self.stats.memory_hits.fetch_add(1, Ordering::Relaxed);
            if let Plan::Blocks { ahead, follow } = plan {
                if ahead > end {
                    self.read_ahead(f, b1 + 1, ahead, follow);
                }
            }
            return Ok(self.assemble(f, &blocks, b0, offset, end));
        }
        if let Some(e) = self.recent_failure(f, b0, b1) {
            return Err(e.into());
        }
        // Blocks already on their way serve an exact read too.
        let plan = match plan {
            Plan::Exact
                if (b0..=b1).any(|i| lock(&self.inflight).contains_key(&self.key(f, i))) =>
            {
                Plan::Blocks {
                    ahead: end,
                    follow: false,
                }
            }
            other => other,
        };
        match plan {
            Plan::Exact => {
                // Ends a little before the read must answer, so the read
                // answers with what happened.
                let fetch_deadline = deadline.sooner_by(Duration::from_millis(50));
                // A disk cache (a remount's, another node's) may have it.
                let disk_deadline = self.disk_deadline(fetch_deadline);
                if let Some(blocks) = self.read_disk(f, b0, b1, disk_deadline).await {
                    return Ok(self.assemble(f, &blocks, b0, offset, end));
                }
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                let m = &f.file.meta;
                let asked = Instant::now();
                let got = f
                    .file
                    .dataset
                    .store
                    .get_range(&m.key, offset..end, Some(m), fetch_deadline)
                    .await
                    .map_err(FetchError::from);
                if got.is_ok() && end - offset <= 64 * 1024 {
                    self.pace.record_small(asked.elapsed());
                }
                got.map_err(|e| {
                    self.remember_failure(f, b0..=b1, &e);
                    e.into()
                })
            }
            Plan::Blocks { ahead, follow } => {
                // A file's first read, small and in one block nobody is
                // fetching: the block is fetched for the reads after it,
                // and the bytes asked come by a GET of their own, so the
                // first byte costs one round trip, not a whole block's
                // transfer too (1 MiB is 20 ms at 50 MiB/s a stream).
                // Not worth a request where the block is little more than
                // the read (a small file).
                // With a disk cache the block is looked for there first:
                // one there (a remount's, another node's, a prefetch's)
                // must cost no request.
                let quick = first
                    && b0 == b1
                    && self.block_len(f, b0) >= (end - offset).saturating_mul(4).max(bs / 4)
                    && self.known(&self.key(f, b0)).is_none();
                if quick && self.disk.is_some() {
                    let disk_deadline = self.disk_deadline(deadline);
                    if let Some(blocks) = self.read_disk(f, b0, b0, disk_deadline).await {
                        if ahead > end {
                            self.read_ahead(f, b1 + 1, ahead, follow);
                        }
                        return Ok(self.assemble(f, &blocks, b0, offset, end));
                    }
                }
                if quick {
                    let block = self.demand(f, b0, b0, deadline).remove(0);
                    if ahead > end {
                        self.read_ahead(f, b1 + 1, ahead, follow);
                    }
                    return self.first_read(f, block, offset, end, deadline).await;
                }
                let mut waits = self.demand(f, b0, b1, deadline);
                if ahead > end {
                    self.read_ahead(f, b1 + 1, ahead, follow);
                }
                let mut blocks = Vec::with_capacity(waits.len());
                for (i, wait) in waits.iter_mut().enumerate() {
                    let index = b0 + i as u64;
                    let mut got = deadline
                        .run(wait.clone())
                        .await
                        .unwrap_or(Err(FetchError::TimedOut));
                    // A fetch that died (a follower stopped, a task gone):
                    // afresh, a few times (the one joined may be another
                    // reader's follower, stopped in turn).
                    for _ in 0..3 {
                        if !matches!(got, Err(FetchError::Abandoned)) {
                            break;
                        }
                        let again = self.demand(f, index, index, deadline).remove(0);
                        got = deadline
                            .run(again)
                            .await
                            .unwrap_or(Err(FetchError::TimedOut));
                    }
                    match got {
                        Ok(b) => blocks.push(b),
                        Err(e) => {
                            self.remember_failure(f, index..=index, &e);
                            return Err(e.into());
                        }
                    }
                }
                Ok(self.assemble(f, &blocks, b0, offset, end))
            }
        }
    }

    fn assemble(&self, f: &OpenFile, blocks: &[Bytes], b0: u64, offset: u64, end: u64) -> Bytes {
        let bs = self.cfg.block_size;
        let start = (offset - b0 * bs) as usize;
        let len = (end - offset) as usize;
        // Blocks read to their end now sit in the page cache; let them go
        // first (every one a read passes, so a reader whose reads do not
        // end on block boundaries marks them too).
        let last = if end.is_multiple_of(bs) || end == f.size() {
            Some((end - 1) / bs)
        } else {
            (end / bs).checked_sub(1)
        };
        if let Some(last) = last {
            for i in b0..=last {
                self.mem.demote(&self.key(f, i));
            }
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tree::Dataset;
    use crate::fs::tree::{FileRef, FirstBytes};
    use crate::s3::faulty::{Fault, FaultyStore};
    use crate::s3::memory::MemoryStore;
    use crate::s3::ObjectStore;
    use std::sync::atomic::Ordering::Relaxed;
    use tokio::sync::oneshot;

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    async fn file_of(store: Arc<dyn ObjectStore>, mem: &MemoryStore, key: &str) -> FileRef {
        let meta = mem.head(key, soon()).await.unwrap();
        let ds = Arc::new(Dataset {
            handle: "1/2".into(),
            bucket: "b".into(),
            prefix: "".into(),
            updated: std::time::UNIX_EPOCH,
            name: None,
            release: Default::default(),
            store,
        });
        FileRef { dataset: ds, meta }
    }

    async fn setup(len: usize) -> (Arc<Reader>, Arc<MemoryStore>, FileRef, Vec<u8>) {
        let store = Arc::new(MemoryStore::new());
        let data = crate::demo::pseudo_random(3, len);
        store.put("k", data.clone());
        let file = file_of(store.clone(), &store, "k").await;
        let reader = Reader::new(ReadConfig::default()).unwrap();
        (reader, store, file, data)
    }

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
            senders.push((reader.key(&f, idx), MIB, tx));
            rxs.push((idx, rx));
        }
        reader
            .fetch(&file, senders, soon(), None, fetch::Why::Ahead)
            .await;
        for (idx, rx) in rxs {
            let got = rx.await.unwrap().unwrap();
            let bs = 1usize << 20;
            let want = &data[idx as usize * bs..(idx as usize + 1) * bs];
            assert!(got == want, "block {idx} has another block's bytes");
        }
        assert_eq!(store.gets.load(Relaxed), 3, "one GET per contiguous run");
    }

    #[tokio::test]
    async fn sequential_reads_grow_a_window_and_return_the_right_bytes() {
        let (r, store, f, data) = setup(40 * MIB as usize + 77).await;
        let h = r.open(f);
        let mut off = 0u64;
        while off < data.len() as u64 {
            let b = r.read(&h, off, 128 * 1024, soon()).await.unwrap();
            assert_eq!(&b[..], &data[off as usize..(off as usize + b.len())]);
            off += b.len() as u64;
        }
        let gets = store.gets.load(Relaxed);
        // 41 blocks: the run's first reads as read, then followed (a
        // block a GET, in parallel), past 16 MiB in read-ahead parts of up
        // to 4 MiB: never more GETs than blocks.
        assert!(gets <= 41, "{gets} GETs");
    }

    #[tokio::test]
    async fn random_small_reads_fetch_only_what_is_asked() {
        let (r, store, f, data) = setup(64 * MIB as usize).await;
        let h = r.open(f);
        r.read(&h, 0, 4096, soon()).await.unwrap(); // first read: one block
        let before = store.gets.load(Relaxed);
        let mut x = 12345u64;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (x >> 20) % (64 * MIB - 4096) / 4096 * 4096;
            let b = r.read(&h, off, 4096, soon()).await.unwrap();
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
                tokio::spawn(async move { r.read(&h, 0, 4096, soon()).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // The block's GET, and the first reader's own GET of its 4 KiB
        // (a first read does not wait for a whole block).
        assert!(store.gets.load(Relaxed) <= 2);
    }

    #[tokio::test]
    async fn a_lookups_first_bytes_answer_the_first_read_and_its_block_still_comes() {
        let (r, store, f, data) = setup(4 * MIB as usize).await;
        r.offer(&f, Bytes::copy_from_slice(&data[..128 * 1024]));
        let h = r.open(f.clone());
        let b = r.read(&h, 100, 16 * 1024, soon()).await.unwrap();
        assert_eq!(&b[..], &data[100..100 + 16 * 1024]);
        assert_eq!(store.gets.load(Relaxed), 0, "answered from the first bytes");
        // The block was asked for all the same: the next reads wait for no GET.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.gets.load(Relaxed), 1);
        let b = r.read(&h, 200 * 1024, 4096, soon()).await.unwrap();
        assert_eq!(&b[..], &data[200 * 1024..204 * 1024]);
        assert_eq!(store.gets.load(Relaxed), 1);
        // A second open finds no first bytes (taken) but the block.
        let h2 = r.open(f);
        r.read(&h2, 0, 4096, soon()).await.unwrap();
        assert_eq!(store.gets.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn a_small_files_first_bytes_are_its_block() {
        let (r, store, f, data) = setup(100_000).await;
        r.offer(&f, Bytes::from(data.clone()));
        let h = r.open(f);
        let b = r.read(&h, 0, 128 * 1024, soon()).await.unwrap();
        assert_eq!(&b[..], &data[..]);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(store.gets.load(Relaxed), 0, "no GET at all");
    }

    #[tokio::test]
    async fn a_first_read_beyond_its_first_bytes_reads_as_ever() {
        let (r, _store, f, data) = setup(4 * MIB as usize).await;
        r.offer(&f, Bytes::copy_from_slice(&data[..128 * 1024]));
        let h = r.open(f);
        let off = 100 * 1024;
        let b = r.read(&h, off, 64 * 1024, soon()).await.unwrap();
        assert_eq!(&b[..], &data[off as usize..off as usize + 64 * 1024]);
    }

    #[tokio::test]
    async fn a_changed_or_deleted_object_is_stale_never_mixed_bytes() {
        let (r, store, f, _) = setup(4 * MIB as usize).await;
        let h = r.open(f.clone());
        r.read(&h, 0, 4096, soon()).await.unwrap();
        store.put("k", vec![1u8; 4 * MIB as usize]);
        let e = r.read(&h, 3 * MIB, 4096, soon()).await.unwrap_err();
        assert!(matches!(e, FsError::Stale), "{e:?}");
        // Deleted: an uncached read is ESTALE too, never ENOENT.
        let h2 = r.open(f);
        store.delete("k");
        for off in [2 * MIB, 2 * MIB + 4096 * 9] {
            let e = r.read(&h2, off, 4096, soon()).await.unwrap_err();
            assert!(matches!(e, FsError::Stale), "{e:?}");
        }
    }

    fn faulty(len: usize) -> (Arc<MemoryStore>, Arc<FaultyStore>, Vec<u8>) {
        let mem = Arc::new(MemoryStore::new());
        let data = crate::demo::pseudo_random(5, len);
        for k in ["stuck", "other"] {
            mem.put(k, data.clone());
        }
        let f = Arc::new(FaultyStore::new(mem.clone()));
        (mem, f, data)
    }

    #[tokio::test]
    async fn a_fetch_that_dies_never_leaves_its_block_failing() {
        let (mem, store, data) = faulty(2 * MIB as usize);
        let file = file_of(store.clone(), &mem, "stuck").await;
        let r = Reader::new(ReadConfig::default()).unwrap();
        store.inject("stuck", Fault::Panic);
        let h = r.open(file);
        assert!(r.read(&h, 0, 4096, soon()).await.is_err());
        assert_eq!(r.fetches_in_flight(), 0, "nothing left in flight");
        store.clear();
        // Past the failure memory (a panic is not remembered at all).
        let b = r.read(&h, 0, 4096, soon()).await.unwrap();
        assert_eq!(&b[..], &data[..4096]);
    }

    #[tokio::test]
    async fn a_stalled_object_holds_up_nothing_else_and_fails_fast_twice() {
        let (mem, store, data) = faulty(16 * MIB as usize);
        let cfg = ReadConfig {
            max_inflight: 8 * MIB,
            ..ReadConfig::default()
        };
        let r = Reader::new(cfg).unwrap();
        let stuck = file_of(store.clone(), &mem, "stuck").await;
        let other = file_of(store.clone(), &mem, "other").await;
        store.inject("stuck", Fault::Hang);
        // Eight sequential readers of the stalled object: read-ahead takes
        // the whole budget and never comes back before the bound.
        let readers: Vec<_> = (0..8)
            .map(|i| {
                let (r, h) = (r.clone(), Arc::new(r.open(stuck.clone())));
                tokio::spawn(async move {
                    let d = Deadline::after(Duration::from_secs(2));
                    r.read(&h, i * MIB, 256 * 1024, d).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = Instant::now();
        let h = r.open(other);
        let b = r.read(&h, 5 * MIB, 4096, soon()).await.unwrap();
        assert_eq!(&b[..], &data[5 * MIB as usize..5 * MIB as usize + 4096]);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        for rd in readers {
            let e = rd.await.unwrap().unwrap_err();
            assert!(matches!(e, FsError::TimedOut), "{e:?}");
        }
        // The kernel's retry of the same range fails at once.
        let h = r.open(stuck);
        let t = Instant::now();
        assert!(r.read(&h, 0, 4096, soon()).await.is_err());
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn blocks_on_their_way_take_the_room_of_consumed_ones() {
        // A reader consumed a whole file: its blocks fill the 16 MiB cache.
        let mem = Arc::new(MemoryStore::new());
        let data = crate::demo::pseudo_random(5, 32 * MIB as usize);
        mem.put("read", data.clone());
        mem.put("stalled", data.clone());
        let faulty = Arc::new(FaultyStore::new(mem.clone()));
        let r = Reader::new(ReadConfig {
            memory_cache: 16 * MIB,
            ..ReadConfig::default()
        })
        .unwrap();
        let h = r.open(file_of(faulty.clone(), &mem, "read").await);
        let mut off = 0u64;
        while off < data.len() as u64 {
            off += r.read(&h, off, 1 << 20, soon()).await.unwrap().len() as u64;
        }
        assert_eq!(r.mem.used(), 16 * MIB);
        assert_eq!(r.mem.reserved(), 0, "every block landed");
        // Eight blocks of another file on their way (their GET stalls):
        // consumed blocks make room, so cached plus in flight stay within
        // the budget (before, the budget was the cache's alone and memory
        // was 16 MiB plus whatever was in flight).
        faulty.inject("stalled", Fault::Hang);
        let g = r.open(file_of(faulty.clone(), &mem, "stalled").await);
        let waits = r.demand(&g, 0, 7, Deadline::after(Duration::from_millis(300)));
        assert_eq!(r.mem.reserved(), 8 * MIB);
        assert_eq!(r.mem.used(), 8 * MIB);
        // They fail: their room is given back.
        for w in waits {
            assert!(w.await.is_err());
        }
        assert_eq!(r.mem.reserved(), 0);
        // A fetch whose task dies gives its room back too.
        faulty.clear();
        faulty.inject("stalled", Fault::Panic);
        for w in r.demand(&g, 8, 11, soon()) {
            assert!(w.await.is_err());
        }
        assert_eq!(r.mem.reserved(), 0);
    }

    #[tokio::test]
    async fn memory_pressure_never_fails_a_read() {
        let store = Arc::new(MemoryStore::new());
        let mut want = Vec::new();
        for i in 0..8 {
            let d = crate::demo::pseudo_random(i + 10, 24 * MIB as usize);
            store.put(&format!("f{i}"), d.clone());
            want.push(d);
        }
        // The smallest memory cache there is (two parts): eight readers
        // evict each other's blocks all the time.
        let r = Reader::new(ReadConfig {
            memory_cache: 0,
            ..ReadConfig::default()
        })
        .unwrap();
        let mut tasks = Vec::new();
        for (i, d) in want.into_iter().enumerate() {
            let f = file_of(store.clone(), &store, &format!("f{i}")).await;
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                let h = r.open(f);
                let mut off = 0u64;
                while off < d.len() as u64 {
                    let b = r.read(&h, off, 1 << 20, soon()).await.unwrap();
                    assert!(b[..] == d[off as usize..off as usize + b.len()]);
                    off += b.len() as u64;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}
