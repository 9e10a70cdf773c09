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

pub mod cache;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info_span, Instrument};

use crate::fs::tree::{FileRef, FirstBytes};
use crate::fs::FsError;
use crate::retry::Deadline;
use crate::s3::S3Error;
use cache::{BlockKey, CacheStats, Claim, ClaimGuard, DiskCache, MemoryCache, ObjectId};

const MIB: u64 = 1024 * 1024;

/// Bytes a run of adjacent reads must cover before read-ahead of our own
/// starts (see [`Reader::plan`]).
const SEQUENTIAL_RUN: u64 = 16 * MIB;

/// How long a failed fetch is remembered (see the module docs).
const FAILURE_MEMORY: Duration = Duration::from_secs(5);

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
            part_size: 4 * MIB,
            initial_window: MIB,
            max_window: 64 * MIB,
            memory_cache: 48 * MIB,
            max_inflight: 64 * MIB,
            disk: None,
            request_timeout: crate::retry::DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// A cloneable failure of a shared block fetch.
#[derive(Clone, Debug)]
enum FetchError {
    /// The object changed or vanished since the file was opened.
    Stale,
    Denied(String),
    TimedOut,
    Io(String),
    /// The fetch died before it answered (panicked, was dropped).
    Abandoned,
}

impl From<S3Error> for FetchError {
    fn from(e: S3Error) -> Self {
        match e {
            // Gone since it was opened: the version this handle reads is
            // no more.
            S3Error::NotFound | S3Error::Stale => FetchError::Stale,
            e => match FsError::from(e) {
                FsError::PermissionDenied(d) => FetchError::Denied(d),
                FsError::TimedOut => FetchError::TimedOut,
                FsError::Stale | FsError::NotFound => FetchError::Stale,
                other => FetchError::Io(other.to_string()),
            },
        }
    }
}

impl From<FetchError> for FsError {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Stale => FsError::Stale,
            FetchError::Denied(d) => FsError::PermissionDenied(d),
            FetchError::TimedOut => FsError::TimedOut,
            FetchError::Io(m) => FsError::Io(m),
            FetchError::Abandoned => FsError::Io("the block fetch was abandoned".into()),
        }
    }
}

type Pending = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;
/// Where a fetched block is delivered.
type Sender = oneshot::Sender<Result<Bytes, FetchError>>;

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
    pub stats: CacheStats,
}

/// Most first-bytes pieces kept for reads to come (128 KiB each at most).
const HEADS_KEPT: usize = 32;

impl FirstBytes for Reader {
    /// Not with a disk cache: what it holds (a prefetch's, another
    /// node's) must cost no request, and a guess cannot know it is there.
    fn wanted(&self) -> bool {
        self.disk.is_none()
    }

    fn offer(&self, file: &FileRef, head: Bytes) {
        let id = Arc::new(ObjectId::of(&file.dataset.bucket, &file.meta));
        let block0 = file.meta.size.min(self.cfg.block_size);
        if head.len() as u64 >= block0 {
            // The whole first block (a small file): a block like any other,
            // fetched from S3 (and counted so).
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            let key = BlockKey {
                object: id,
                index: 0,
            };
            self.mem.insert(key, head.slice(..block0 as usize));
            return;
        }
        let mut heads = lock(&self.heads);
        heads.retain(|(i, _)| *i != id);
        if heads.len() >= HEADS_KEPT {
            heads.pop_front();
        }
        heads.push_back((id, head));
    }
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
    /// Where the current run of adjacent reads started.
    run_start: u64,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
        let disk = match &cfg.disk {
            Some(d) => Some(DiskCache::open(
                d,
                crate::retry::stall_timeout(cfg.request_timeout),
            )?),
            None => None,
        };
        let permits = (cfg.max_inflight / cfg.block_size) as usize;
        Ok(Arc::new(Self {
            mem: MemoryCache::new(cfg.memory_cache),
            disk,
            inflight: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
            budget: Arc::new(Semaphore::new(permits)),
            sequential: Arc::new(AtomicUsize::new(0)),
            heads: Mutex::new(VecDeque::new()),
            stats: CacheStats::default(),
            cfg,
        }))
    }

    pub fn open(&self, file: FileRef) -> OpenFile {
        let id = Arc::new(ObjectId::of(&file.dataset.bucket, &file.meta));
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

    /// Blocks being fetched right now (for stats and tests).
    pub fn fetches_in_flight(&self) -> usize {
        lock(&self.inflight).len()
    }

    /// The largest window one sequential reader may use now: its share of
    /// the memory cache, so that read-ahead a reader has not reached yet is
    /// never evicted to make room (on loopback S3 outruns the reader and
    /// the whole window lands before it is read). On a real network it is
    /// the GETs in flight that make the throughput: the default 48 MiB is
    /// twelve 4 MiB GETs, enough to fill a 500 MiB/s link at 50 MiB/s a
    /// stream.
    fn window_cap(&self) -> u64 {
        let readers = self.sequential.load(Ordering::Relaxed).max(1) as u64;
        (self.cfg.memory_cache / readers)
            .min(self.cfg.max_window)
            .max(self.cfg.block_size)
    }

    fn plan(&self, f: &OpenFile, offset: u64, end: u64) -> Plan {
        let mut p = lock(&f.pattern);
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
        p.reads += 1;
        p.streak = if near { p.streak + 1 } else { 0 };
        if !near {
            p.run_start = offset;
        }
        p.last_end = if near { p.last_end.max(end) } else { end };
        if first {
            p.window = self.cfg.initial_window;
            return Plan::Blocks { ahead: end };
        }
        if p.streak < 2 {
            p.window = self.cfg.initial_window;
            p.ahead_to = 0;
            // A large read (kernel read-ahead of a seek, or of a
            // sequential reader answered out of order) costs about the
            // same block-aligned, and then lands in the cache; a smaller
            // one (an HDF5 chunk, a sqlite page) exactly the bytes asked.
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
        // No read-ahead of our own until the run has read SEQUENTIAL_RUN
        // (the kernel's own read-ahead serves shorter runs: a run of
        // adjacent HDF5 chunks, netCDF-C's 4 MiB format check, which the
        // kernel already stretches to 8 MiB); then a window as large as
        // the run so far, up to its cap, so a run that stops leaves at most
        // as much unread as it read. Read-ahead is topped up as soon as a
        // whole part fits in it again, so it goes out in part-sized GETs
        // (not one block at a time) and the window stays full: on a real
        // network the GETs in flight are what makes the throughput.
        let run = p.last_end - p.run_start;
        p.window = if run < SEQUENTIAL_RUN {
            0
        } else {
            run.min(self.window_cap().max(self.cfg.initial_window))
        };
        if p.window == 0 {
            // A short run of small reads (three adjacent chunks) costs
            // what it reads; a longer one, or large reads, whole blocks.
            return if end - offset >= bs / 2 || p.streak >= 4 {
                Plan::Blocks { ahead: end }
            } else {
                Plan::Exact
            };
        }
        let part = self.cfg.part_size.min(p.window / 2).max(bs);
        tracing::trace!(
            offset,
            end,
            run = p.last_end - p.run_start,
            window = p.window,
            ahead_to = p.ahead_to,
            "sequential read"
        );
        if p.ahead_to + part <= end + p.window {
            p.ahead_to = (end + p.window).min(f.size());
            Plan::Blocks { ahead: p.ahead_to }
        } else {
            Plan::Blocks { ahead: end }
        }
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
            if let Plan::Blocks { ahead } = plan {
                if ahead > end {
                    self.read_ahead(f, b1 + 1, ahead);
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
                Plan::Blocks { ahead: end }
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
                let got = f
                    .file
                    .dataset
                    .store
                    .get_range(&m.key, offset..end, Some(m), fetch_deadline)
                    .await
                    .map_err(FetchError::from);
                got.map_err(|e| {
                    self.remember_failure(f, b0..=b1, &e);
                    e.into()
                })
            }
            Plan::Blocks { ahead } => {
                // A file's first read, small and in one block nobody is
                // fetching: the block is fetched for the reads after it,
                // and the bytes asked come by a GET of their own, so the
                // first byte costs one round trip, not a whole block's
                // transfer too (1 MiB is 20 ms at 50 MiB/s a stream).
                // Not worth a request where the block is little more than
                // the read (a small file).
                // Not with a disk cache: a block there (a remount's,
                // another node's, a prefetch's) must cost no request.
                let quick = first
                    && self.disk.is_none()
                    && b0 == b1
                    && self.block_len(f, b0) >= (end - offset).saturating_mul(4).max(bs / 4)
                    && self.known(&self.key(f, b0)).is_none();
                if quick {
                    let block = self.demand(f, b0, b0, deadline).remove(0);
                    if ahead > end {
                        self.read_ahead(f, b1 + 1, ahead);
                    }
                    return self.first_read(f, block, offset, end, deadline).await;
                }
                let mut waits = self.demand(f, b0, b1, deadline);
                if ahead > end {
                    self.read_ahead(f, b1 + 1, ahead);
                }
                let mut blocks = Vec::with_capacity(waits.len());
                for (i, wait) in waits.iter_mut().enumerate() {
                    let index = b0 + i as u64;
                    let got = match deadline.run(wait.clone()).await {
                        // A fetch that died: once more, afresh.
                        Some(Err(FetchError::Abandoned)) => {
                            let again = self.demand(f, index, index, deadline).remove(0);
                            deadline
                                .run(again)
                                .await
                                .unwrap_or(Err(FetchError::TimedOut))
                        }
                        Some(r) => r,
                        None => Err(FetchError::TimedOut),
                    };
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

    /// The first bytes a lookup fetched of `f`'s version, if any (taken:
    /// only a first read uses them).
    fn take_head(&self, f: &OpenFile) -> Option<Bytes> {
        let mut heads = lock(&self.heads);
        let i = heads.iter().position(|(id, _)| *id == f.id)?;
        heads.remove(i).map(|(_, b)| b)
    }

    /// A file's first read (`offset..end`, within one block): whichever
    /// answers first of `block` (its block's fetch) and a ranged GET of
    /// just those bytes (only without a disk cache: see `read`).
    async fn first_read(
        self: &Arc<Self>,
        f: &OpenFile,
        block: Pending,
        offset: u64,
        end: u64,
        deadline: Deadline,
    ) -> Result<Bytes, FsError> {
        let bs = self.cfg.block_size;
        let b0 = offset / bs;
        let fetch_deadline = deadline.sooner_by(Duration::from_millis(50));
        // On a task of its own: a store that panics fails this GET, not
        // the read (which then waits for the block).
        let (store, meta) = (f.file.dataset.store.clone(), f.file.meta.clone());
        let mut exact = tokio::spawn(async move {
            store
                .get_range(&meta.key, offset..end, Some(&meta), fetch_deadline)
                .await
        });
        let _stop = crate::task::AbortOnDrop(exact.abort_handle());
        let want = end - offset;
        let exact_ok = |r: Result<Result<Bytes, S3Error>, tokio::task::JoinError>| match r {
            Ok(Ok(b)) if b.len() as u64 == want => Some(b),
            _ => None,
        };
        let first = tokio::select! {
            r = wait_for(block, deadline) => match r {
                Ok(b) => return Ok(self.assemble(f, &[b], b0, offset, end)),
                Err(e) => Err(e),
            },
            r = &mut exact => match exact_ok(r) {
                Some(b) => return Ok(b),
                None => Ok(()),
            },
        };
        let r = match first {
            // The block failed: the exact GET may still answer.
            Err(e) => match deadline.run(&mut exact).await.and_then(exact_ok) {
                Some(b) => return Ok(b),
                None => Err(e),
            },
            // The exact GET failed: the block says what went wrong (or
            // still comes).
            Ok(()) => {
                wait_for(
                    self.known(&self.key(f, b0))
                        .unwrap_or_else(|| self.demand(f, b0, b0, deadline).remove(0)),
                    deadline,
                )
                .await
            }
        };
        let r = match r {
            // A fetch that died: once more, afresh (as any read does).
            Err(FetchError::Abandoned) => {
                wait_for(self.demand(f, b0, b0, deadline).remove(0), deadline).await
            }
            other => other,
        };
        match r {
            Ok(b) => Ok(self.assemble(f, &[b], b0, offset, end)),
            Err(e) => {
                self.remember_failure(f, b0..=b0, &e);
                Err(FsError::from(e))
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

    /// Blocks `b0..=b1` from the disk cache, if every one is there (and
    /// read before `deadline`); then they are in memory too.
    async fn read_disk(
        &self,
        f: &OpenFile,
        b0: u64,
        b1: u64,
        deadline: Deadline,
    ) -> Option<Vec<Bytes>> {
        let disk = self.disk.as_ref()?;
        let mut out = Vec::with_capacity((b1 - b0 + 1) as usize);
        for i in b0..=b1 {
            let key = self.key(f, i);
            let b = disk
                .load_block(key.clone(), self.block_len(f, i), deadline)
                .await?;
            self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
            self.mem.insert(key, b.clone());
            out.push(b);
        }
        Some(out)
    }

    /// How long the disk cache may take before a fetch ends by `deadline`:
    /// the stall timeout, and never more than half the time left, so a
    /// stalled cache folder is a miss with time to spare for S3.
    fn disk_deadline(&self, deadline: Deadline) -> Deadline {
        deadline
            .sooner_by(self.cfg.request_timeout / 2)
            .min(Deadline::after(crate::retry::stall_timeout(
                self.cfg.request_timeout,
            )))
    }

    /// The failure of a recent fetch of any of blocks `b0..=b1`, if any.
    fn recent_failure(&self, f: &OpenFile, b0: u64, b1: u64) -> Option<FetchError> {
        let failures = lock(&self.failures);
        if failures.is_empty() {
            return None;
        }
        (b0..=b1).find_map(|i| {
            failures
                .get(&self.key(f, i))
                .filter(|(at, _)| at.elapsed() < FAILURE_MEMORY)
                .map(|(_, e)| e.clone())
        })
    }

    fn remember_failure(
        &self,
        f: &OpenFile,
        blocks: std::ops::RangeInclusive<u64>,
        e: &FetchError,
    ) {
        self.note_failures(blocks.map(|i| self.key(f, i)), e);
    }

    /// Remembers that fetching `keys` failed with `e` (not a fetch that
    /// died: its blocks are simply fetched afresh), in a table kept small.
    fn note_failures(&self, keys: impl IntoIterator<Item = BlockKey>, e: &FetchError) {
        if matches!(e, FetchError::Abandoned) {
            return;
        }
        let mut failures = lock(&self.failures);
        if failures.len() > 4096 {
            failures.retain(|_, (at, _)| at.elapsed() < FAILURE_MEMORY);
        }
        let now = Instant::now();
        for k in keys {
            failures.insert(k, (now, e.clone()));
        }
    }

    /// What block `i` is (cached, or on its way), if anything.
    fn known(&self, key: &BlockKey) -> Option<Pending> {
        if let Some(b) = self.mem.get(key) {
            return Some(futures::future::ready(Ok(b)).boxed().shared());
        }
        lock(&self.inflight).get(key).cloned()
    }

    /// One wait per block of `b0..=b1`, starting fetches (without waiting
    /// for the read-ahead budget) for those neither cached nor on their way.
    fn demand(
        self: &Arc<Self>,
        f: &OpenFile,
        b0: u64,
        b1: u64,
        deadline: Deadline,
    ) -> Vec<Pending> {
        let mut out: Vec<Option<Pending>> =
            (b0..=b1).map(|i| self.known(&self.key(f, i))).collect();
        let mut i = b0;
        while i <= b1 {
            if out[(i - b0) as usize].is_some() {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < b1 && out[(j + 1 - b0) as usize].is_none() {
                j += 1;
            }
            let n = (j - i + 1) as u32;
            // Within budget when there is room; beyond it otherwise: a
            // process is waiting for these bytes.
            let permit = self.budget.clone().try_acquire_many_owned(n).ok();
            // Fetches for a read end a little before the read's own
            // deadline, so the read answers with what happened (and the
            // failure is remembered for the kernel's retry).
            let fetch_deadline = deadline.sooner_by(Duration::from_millis(50));
            for (idx, p) in self.start_fetch(f, i, j, fetch_deadline, permit) {
                out[(idx - b0) as usize] = Some(p);
            }
            i = j + 1;
        }
        out.into_iter()
            .map(|p| {
                p.unwrap_or_else(|| {
                    futures::future::ready(Err(FetchError::Abandoned))
                        .boxed()
                        .shared()
                })
            })
            .collect()
    }

    /// Requests read-ahead up to byte `ahead`, without waiting: runs of
    /// missing blocks become GETs of at most `part_size`, each only if the
    /// read-ahead budget has room. Where it stops short, the next read
    /// tries again from there.
    fn read_ahead(self: &Arc<Self>, f: &OpenFile, from_block: u64, ahead: u64) {
        let bs = self.cfg.block_size;
        let last = ((ahead - 1) / bs).min(f.size().saturating_sub(1) / bs);
        let per_part = self.cfg.part_size / bs;
        let missing = |i: u64| {
            let k = self.key(f, i);
            !self.mem.contains(&k) && !lock(&self.inflight).contains_key(&k)
        };
        let mut i = from_block;
        while i <= last {
            if !missing(i) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < last && j + 1 - i < per_part && missing(j + 1) {
                j += 1;
            }
            let Ok(permit) = self
                .budget
                .clone()
                .try_acquire_many_owned((j - i + 1) as u32)
            else {
                let mut p = lock(&f.pattern);
                p.ahead_to = p.ahead_to.min(i * bs);
                return;
            };
            let deadline = Deadline::after(self.cfg.request_timeout);
            self.start_fetch(f, i, j, deadline, Some(permit));
            i = j + 1;
        }
    }

    /// Registers blocks `i..=j` as in flight (those not already cached or
    /// on their way) and spawns one fetch for them. Returns the wait of
    /// each block it registered.
    fn start_fetch(
        self: &Arc<Self>,
        f: &OpenFile,
        i: u64,
        j: u64,
        deadline: Deadline,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Vec<(u64, Pending)> {
        let mut senders = Vec::new();
        let mut waits = Vec::new();
        {
            let mut inflight = lock(&self.inflight);
            for idx in i..=j {
                let key = self.key(f, idx);
                if let Some(p) = inflight.get(&key) {
                    waits.push((idx, p.clone()));
                    continue;
                }
                if let Some(b) = self.mem.get(&key) {
                    waits.push((idx, futures::future::ready(Ok(b)).boxed().shared()));
                    continue;
                }
                let (tx, rx) = oneshot::channel::<Result<Bytes, FetchError>>();
                let fut: Pending = rx
                    .map(|r| r.unwrap_or(Err(FetchError::Abandoned)))
                    .boxed()
                    .shared();
                inflight.insert(key.clone(), fut.clone());
                waits.push((idx, fut));
                senders.push((key, self.block_len(f, idx), tx));
            }
        }
        if senders.is_empty() {
            return waits;
        }
        // Within the memory budget while on their way (see `MemoryCache`):
        // released as each lands or fails, or by `Unregister`. Out of the
        // in-flight lock (it may free consumed blocks); no delivery can
        // come before the task below exists.
        self.mem
            .reserve_all(senders.iter().map(|(k, len, _)| (k.clone(), *len)));
        let me = self.clone();
        let file = f.file.clone();
        let own: Vec<(BlockKey, WeakPending)> = {
            let registered: std::collections::HashSet<&BlockKey> =
                senders.iter().map(|(k, _, _)| k).collect();
            waits
                .iter()
                .filter_map(|(idx, p)| Some((self.key(f, *idx), p.downgrade()?)))
                .filter(|(k, _)| registered.contains(k))
                .collect()
        };
        let span = info_span!("fetch_blocks", key = %file.meta.key, first = i, last = j);
        // However the task ends (a panic, the runtime shutting down, even
        // dropped before it first runs), the blocks it did not answer are no
        // longer "in flight": the next reader fetches them afresh.
        let cleanup = Unregister(me.clone(), own);
        tokio::spawn(
            async move {
                let _cleanup = cleanup;
                me.fetch(&file, senders, deadline, permit).await;
            }
            .instrument(span),
        );
        waits
    }

    async fn fetch(
        &self,
        file: &FileRef,
        senders: Vec<(BlockKey, u64, Sender)>,
        deadline: Deadline,
        mut permit: Option<OwnedSemaphorePermit>,
    ) {
        let mut senders: Vec<Option<_>> = senders.into_iter().map(Some).collect();
        if let Some(disk) = &self.disk {
            // All of the batch from disk at once, each answered as soon as
            // it is read: a cache shared by another node is as fast as the
            // disk allows, not one block at a time. A cache folder that
            // does not answer in time (a stalled cluster file system) is a
            // miss: S3 is asked instead.
            let disk_deadline = self.disk_deadline(deadline);
            let reads = senders
                .iter()
                .flatten()
                .map(|(key, len, _)| disk.load_block(key.clone(), *len, disk_deadline));
            let found = futures::future::join_all(reads).await;
            for (slot, r) in senders.iter_mut().zip(found) {
                if let Some(b) = r {
                    if let Some((key, _, tx)) = slot.take() {
                        self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                        // A disk hit takes none of the read-ahead budget.
                        if let Some(p) = permit.as_mut() {
                            drop(p.split(1));
                        }
                        self.deliver(&key, Ok(b), tx);
                    }
                }
            }
        }
        let left: Vec<_> = senders.into_iter().flatten().collect();
        // Freed a block at a time as blocks land (see `fetch_run`).
        let budget = Mutex::new(permit);
        let budget = &budget;
        match &self.disk {
            // A folder shared with other processes (other nodes): claim
            // each block first; what another process is fetching is waited
            // for on disk instead of fetched again.
            Some(disk) if self.shared_disk() => {
                let (mine, theirs) = self.claim_blocks(disk, left, deadline).await;
                futures::future::join(
                    self.fetch_runs(file, mine, deadline, budget),
                    self.await_others(file, disk, theirs, deadline, budget),
                )
                .await;
            }
            _ => {
                let mine = left.into_iter().map(|(k, l, t)| (k, l, t, None)).collect();
                self.fetch_runs(file, mine, deadline, budget).await;
            }
        }
    }

    fn shared_disk(&self) -> bool {
        self.cfg.disk.as_ref().is_some_and(|d| d.shared)
    }

    /// Claims `blocks` in the shared folder (on the blocking pool): those
    /// claimed (or unclaimable) are this process's to fetch, the rest
    /// another's.
    async fn claim_blocks(
        &self,
        disk: &Arc<DiskCache>,
        blocks: Vec<(BlockKey, u64, Sender)>,
        deadline: Deadline,
    ) -> (Vec<ToFetch>, Vec<(BlockKey, u64, Sender)>) {
        let until = std::time::SystemTime::now() + deadline.remaining();
        let keys: Vec<(BlockKey, u64)> = blocks.iter().map(|(k, l, _)| (k.clone(), *l)).collect();
        let mut claims = disk.claim_all(keys, until, deadline).await.into_iter();
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for (k, len, tx) in blocks {
            match claims.next() {
                Some(Claim::Theirs { .. }) => theirs.push((k, len, tx)),
                Some(Claim::Mine(g)) => mine.push((k, len, tx, Some(g))),
                Some(Claim::Unavailable) | None => mine.push((k, len, tx, None)),
            }
        }
        (mine, theirs)
    }

    /// Waits for blocks other processes claimed (see
    /// [`DiskCache::await_claimed`]), fetching those that become this
    /// process's to fetch; whatever is left when half the request time is
    /// spent, or when the folder stops answering, is fetched anyway.
    async fn await_others(
        &self,
        file: &FileRef,
        disk: &Arc<DiskCache>,
        pending: Vec<(BlockKey, u64, Sender)>,
        deadline: Deadline,
        budget: &Mutex<Option<OwnedSemaphorePermit>>,
    ) {
        let give_up = deadline.sooner_by(self.cfg.request_timeout / 2);
        disk.await_claimed(
            pending,
            deadline,
            give_up,
            |k, tx, b| {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.deliver(&k, Ok(b), tx);
            },
            |ours| self.fetch_runs(file, ours, deadline, budget),
        )
        .await;
    }

    /// One GET per contiguous run of `blocks` (they may have gaps: blocks
    /// another reader was already fetching are not ours), each piece
    /// handed to the block of its own index.
    async fn fetch_runs(
        &self,
        file: &FileRef,
        blocks: Vec<ToFetch>,
        deadline: Deadline,
        budget: &Mutex<Option<OwnedSemaphorePermit>>,
    ) {
        let mut runs: Vec<Vec<ToFetch>> = Vec::new();
        for s in blocks {
            match runs.last_mut() {
                Some(run)
                    if run
                        .last()
                        .is_some_and(|(k, _, _, _)| k.index + 1 == s.0.index) =>
                {
                    run.push(s)
                }
                _ => runs.push(vec![s]),
            }
        }
        futures::future::join_all(
            runs.into_iter()
                .map(|run| self.fetch_run(file, run, deadline, budget)),
        )
        .await;
    }

    /// One ranged GET for blocks with consecutive indices, each block
    /// handed to its waiters (and its share of the read-ahead budget
    /// freed) as soon as its bytes are in, not when the whole GET ends.
    async fn fetch_run(
        &self,
        file: &FileRef,
        run: Vec<ToFetch>,
        deadline: Deadline,
        budget: &Mutex<Option<OwnedSemaphorePermit>>,
    ) {
        let bs = self.cfg.block_size;
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return;
        };
        let (first_index, last_index) = (first.0.index, last.0.index);
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let start = first_index * bs;
        let end = ((last_index + 1) * bs).min(file.meta.size);
        // The blocks still waiting for their piece, in order.
        let waiting = Mutex::new(run.into_iter());
        let sink = |b: Bytes| {
            let Some((key, len, tx, claim)) = lock(&waiting).next() else {
                return;
            };
            let r = if b.len() as u64 == len {
                self.keep_on_disk(&key, &b, claim);
                Ok(b)
            } else {
                Err(FetchError::Io(format!(
                    "block of {} bytes where {len} were due",
                    b.len()
                )))
            };
            self.deliver(&key, r, tx);
            if let Some(p) = lock(budget).as_mut() {
                drop(p.split(1));
            }
        };
        let fetched = file
            .dataset
            .store
            .get_pieces_each(
                &file.meta.key,
                start..end,
                Some(&file.meta),
                bs,
                deadline,
                &sink,
            )
            .await;
        let rest: Vec<ToFetch> = lock(&waiting).by_ref().collect();
        if rest.is_empty() {
            return;
        }
        let e = match fetched {
            Err(e) => {
                debug!(error = %e, "block fetch failed");
                FetchError::from(e)
            }
            Ok(()) => FetchError::Io("block missing from answer".into()),
        };
        for (key, _, tx, claim) in rest {
            // The claim ends with the fetch: others may try now.
            drop(claim);
            self.deliver(&key, Err(e.clone()), tx);
        }
    }

    /// Writes a fetched block to the disk cache, if there is one, in the
    /// background; its claim (if any) ends as it lands.
    fn keep_on_disk(&self, key: &BlockKey, data: &Bytes, claim: Option<ClaimGuard>) {
        let Some(disk) = &self.disk else {
            return;
        };
        // In the background, through the folder: a stalled cache folder
        // costs blocks not written, never a thread of ours. The claim ends
        // as the block appears (or once it will not): waiters then find it.
        if disk.store_block(key.clone(), data.clone(), claim) {
            self.stats.disk_writes.fetch_add(1, Ordering::Relaxed);
        } else {
            debug!("disk cache not answering or busy; block not written");
        }
    }

    /// Hands a block (or its failure) to everyone waiting for it.
    fn deliver(&self, key: &BlockKey, r: Result<Bytes, FetchError>, tx: Sender) {
        match &r {
            Ok(b) => {
                self.mem.insert(key.clone(), b.clone());
                lock(&self.failures).remove(key);
            }
            Err(e) => {
                self.mem.unreserve(key);
                self.note_failures([key.clone()], e)
            }
        }
        lock(&self.inflight).remove(key);
        let _ = tx.send(r);
    }
}

/// A block's fetch, waited for until `deadline` (then `TimedOut`).
async fn wait_for(block: Pending, deadline: Deadline) -> Result<Bytes, FetchError> {
    deadline
        .run(block)
        .await
        .unwrap_or(Err(FetchError::TimedOut))
}

/// A block this process fetches: its key, length, waiter, and its claim in
/// a shared cache folder (dropped once the block is written).
type ToFetch = (BlockKey, u64, Sender, Option<ClaimGuard>);

/// Removes a fetch's blocks from the in-flight table when the fetch ends,
/// whichever way: those it did not answer, and only while the entry is
/// still its own (a later fetch of the same block is left alone).
///
/// It holds its fetches weakly: a block delivered early in a long GET is
/// kept alive by its readers and the memory cache, not by this list until
/// the GET ends (memory beyond the cache's budget, a few MiB per GET).
struct Unregister(Arc<Reader>, Vec<(BlockKey, WeakPending)>);

type WeakPending = futures::future::WeakShared<BoxFuture<'static, Result<Bytes, FetchError>>>;

impl Drop for Unregister {
    fn drop(&mut self) {
        let mut inflight = lock(&self.0.inflight);
        for (k, mine) in &self.1 {
            // Gone (every strong handle dropped): the table no longer holds
            // it either.
            let Some(mine) = mine.upgrade() else {
                continue;
            };
            if inflight.get(k).is_some_and(|p| p.ptr_eq(&mine)) {
                inflight.remove(k);
                self.0.mem.unreserve(k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tree::Dataset;
    use crate::s3::faulty::{Fault, FaultyStore};
    use crate::s3::memory::MemoryStore;
    use crate::s3::ObjectStore;
    use std::sync::atomic::Ordering::Relaxed;

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
        reader.fetch(&file, senders, soon(), None).await;
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
        // 41 blocks: the run's first 16 MiB as read (a block a GET), the
        // rest in parts of up to 4 MiB: fewer GETs than blocks.
        assert!(gets <= 24, "{gets} GETs");
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
