//! Stage-in: `provenafs prefetch` downloads datasets, folders or files into
//! a disk cache folder ahead of a job, so that a mount on that folder
//! (`mount --cache-dir DIR`) reads them without a single S3 GET.
//!
//! The blocks written here are exactly those the mount looks for (see
//! [`crate::read`]): the same [`BlockKey`] (bucket, key, the listing's ETag,
//! block index), the same block size, the same [`DiskCache`] format.
//!
//! How, in order:
//! 1. [`resolve`] turns each `HANDLE[/PATH]` into the objects below it
//!    (LISTs only; no GET), de-duplicated across targets;
//! 2. [`fits`] refuses, before anything is fetched, a set larger than the
//!    cache may hold;
//! 3. [`run`] splits every object into parts of `part_size` bytes and
//!    handles `parts_in_flight` of them at once: a part's blocks already on
//!    disk and valid (header, CRC, length: [`DiskCache::get`]) are skipped
//!    (resumable), the rest is fetched with one ranged GET per contiguous
//!    run of missing blocks, split into blocks on arrival
//!    ([`ObjectStore::get_pieces`]), and written to the cache.
//!
//! Memory is bounded by `parts_in_flight × part_size` (16 × 8 MiB).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tracing::{debug, info_span, Instrument};

use crate::api::DataStoreClient;
use crate::read::cache::{BlockKey, Claim, ClaimGuard, DiskCache, ObjectId};
use crate::read::ReadConfig;
use crate::retry::Deadline;
use crate::s3::{ObjectMeta, ObjectStore, S3Error, StoreFactory};
use crate::wire::split_target;

const MIB: u64 = 1 << 20;

/// The largest file `run` keeps whole: one patient call into the folder
/// writes it (six stall timeouts, a minute by default), which a local
/// disk's 100 MB/s or more does for 4 GiB. A larger one stays as blocks
/// rather than leave a half-written file behind when the command ends.
const KEEP_WHOLE_MOST: u64 = 4 << 30;

/// How `run` fetches.
#[derive(Clone, Debug)]
pub struct PrefetchConfig {
    /// Bytes per cache block: must be the mount's (`ReadConfig::block_size`,
    /// 1 MiB), or the mount finds none of them.
    pub block_size: u64,
    /// Bytes per unit of work (at most one GET per contiguous run of
    /// missing blocks in it); a multiple of `block_size`.
    pub part_size: u64,
    /// Parts handled at once (GETs in flight at most).
    pub parts_in_flight: usize,
    /// Bound of one LIST or one part's GET, retries included.
    pub request_timeout: Duration,
    /// Keep each file that is all in the folder also as one plain file
    /// (see `read/cache/disk/whole.rs`), which a mount's kernel reads by
    /// itself (FUSE passthrough): only where mounts can (root, Linux 6.9
    /// and later; and the folder private, on a local file system, which
    /// `run` checks), as it costs one more write of the file. At most
    /// [`KEEP_WHOLE_MOST`] bytes a file.
    pub keep_whole: bool,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        let read = ReadConfig::default();
        Self {
            block_size: read.block_size,
            part_size: 8 * MIB,
            parts_in_flight: 16,
            request_timeout: read.request_timeout,
            keep_whole: false,
        }
    }
}

/// One object to prefetch.
#[derive(Clone)]
pub struct Item {
    /// The dataset's handle, for messages.
    pub handle: String,
    pub bucket: String,
    /// Its key relative to the dataset's root, for messages.
    pub path: String,
    /// What the listing said: the ETag here is the one the mount keys by.
    pub meta: ObjectMeta,
    pub store: Arc<dyn ObjectStore>,
}

/// The cache identity of one object version, as the mount keys it.
pub fn object_id(bucket: &str, meta: &ObjectMeta) -> ObjectId {
    ObjectId::of(bucket, meta)
}

/// Every object named by `targets` (`HANDLE`, `HANDLE/FOLDER` or
/// `HANDLE/FILE`, handles as people copy them), in listing order, each
/// once. A PATH that is neither a file nor a folder with files is an
/// error, as is a dataset the user may not see. Costs one registry lookup
/// per dataset and LIST pages; never a GET.
pub async fn resolve(
    api: &DataStoreClient,
    stores: &dyn StoreFactory,
    targets: &[String],
    request_timeout: Duration,
) -> Result<Vec<Item>, String> {
    let deadline = || Deadline::after(request_timeout);
    // One registry lookup and one store (one set of credentials) per dataset.
    let mut datasets: HashMap<String, (String, String, Arc<dyn ObjectStore>)> = HashMap::new();
    let mut seen: HashSet<(String, String)> = HashSet::new();
    let mut items = Vec::new();
    for target in targets {
        let (handle, path) = split_target(target)?;
        if !datasets.contains_key(&handle) {
            let item = api
                .fetch_dataset(&handle, deadline())
                .await
                .map_err(|e| format!("{handle}: {e}"))?;
            let mut root = item.s3.path.trim_start_matches('/').to_string();
            if !root.ends_with('/') {
                root.push('/');
            }
            let store = stores.open(&handle, &item.s3.bucket_name);
            datasets.insert(handle.clone(), (item.s3.bucket_name.clone(), root, store));
        }
        let Some((bucket, root, store)) = datasets.get(&handle) else {
            continue;
        };
        let path = path.trim_end_matches('/');
        let folder = if path.is_empty() {
            root.clone()
        } else {
            format!("{root}{path}/")
        };
        let mut found = list_all(store.as_ref(), &folder, request_timeout).await?;
        if found.is_empty() && !path.is_empty() {
            // Not a folder: the file of that name, if there is one.
            let key = format!("{root}{path}");
            found = list_all(store.as_ref(), &key, request_timeout)
                .await?
                .into_iter()
                .filter(|o| o.key == key)
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "no such file or folder: {handle}/{}",
                    printable(path)
                ));
            }
        }
        for meta in found {
            // Folder markers hold nothing a mount would read.
            if meta.key.ends_with('/') {
                continue;
            }
            if !seen.insert((bucket.clone(), meta.key.clone())) {
                continue;
            }
            items.push(Item {
                handle: handle.clone(),
                bucket: bucket.clone(),
                path: meta
                    .key
                    .strip_prefix(root.as_str())
                    .unwrap_or(&meta.key)
                    .to_string(),
                meta,
                store: store.clone(),
            });
        }
    }
    Ok(items)
}

/// Every object under `prefix` (no delimiter: the whole subtree).
async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
    request_timeout: Duration,
) -> Result<Vec<ObjectMeta>, String> {
    let mut out = Vec::new();
    let mut walk = crate::s3::Pages::new();
    loop {
        let page = store
            .list(
                prefix,
                None,
                walk.token(),
                Some(1000),
                Deadline::after(request_timeout),
            )
            .await
            .map_err(|e| format!("cannot list {}: {e}", printable(prefix)))?;
        let more = walk
            .advance(&page)
            .map_err(|e| format!("cannot list {}: {e}", printable(prefix)))?;
        out.extend(
            page.objects
                .into_iter()
                .filter(|o| o.key.starts_with(prefix)),
        );
        if !more {
            return Ok(out);
        }
    }
}

/// Bytes `items` take in the cache folder: their data plus each block's
/// header (see [`crate::read::cache`]: magic, three lengths, bucket, key,
/// ETag, index, length, CRC).
pub fn disk_bytes(items: &[Item], block_size: u64) -> u64 {
    items
        .iter()
        .map(|i| {
            let id = object_id(&i.bucket, &i.meta);
            let header = 8 + 3 * 4 + id.bucket.len() + id.key.len() + id.etag.len() + 8 + 8 + 4;
            i.meta.size + i.meta.size.div_ceil(block_size.max(1)) * header as u64
        })
        .sum()
}

/// `Err(one line)` when `items` would not fit in a cache of `limit` bytes
/// (the mount's `--cache-size`): the cache would evict the first blocks
/// to make room for the last, and the job would fetch them again.
pub fn fits(items: &[Item], block_size: u64, limit: u64) -> Result<(), String> {
    let need = disk_bytes(items, block_size);
    if need > limit {
        return Err(format!(
            "{} files take {} in the cache, more than --cache-size {}: name fewer files, or raise \
             --cache-size (and give the mount the same)",
            items.len(),
            crate::browse::human_size(need),
            crate::browse::human_size(limit),
        ));
    }
    Ok(())
}

/// One file that could not be prefetched, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// `HANDLE/PATH`.
    pub file: String,
    pub error: String,
}

/// What [`run`] did. Bytes are object bytes (block headers not counted).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// Files in the set.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    /// Bytes fetched from S3 now.
    pub fetched_bytes: u64,
    /// Bytes already cached and valid, not fetched.
    pub cached_bytes: u64,
    /// Files whose every block was already cached.
    pub files_already_cached: u64,
    /// Files also kept as one plain file, for the kernel to read (see
    /// [`PrefetchConfig::keep_whole`]).
    pub files_kept_whole: u64,
    /// Wall time of writing them, after the fetching, seconds (not in
    /// `seconds`: that is the fetching's, for `mib_per_s`).
    pub kept_whole_seconds: f64,
    /// Ranged GETs sent (before the store's own retries).
    pub gets: u64,
    /// Wall time of the fetching, seconds.
    pub seconds: f64,
    /// `fetched_bytes` per second, in MiB/s.
    pub mib_per_s: f64,
    /// Files that failed (the rest is in the cache).
    pub failed: Vec<Failure>,
}

impl Summary {
    /// The one line a non-terminal gets: `prefetched N files, X MiB in Ys
    /// (Z MiB/s); K MiB already cached`.
    pub fn line(&self) -> String {
        let mut s = format!(
            "prefetched {} files, {:.1} MiB in {:.1}s ({:.1} MiB/s); {:.1} MiB already cached",
            self.files - self.failed.len() as u64,
            self.fetched_bytes as f64 / MIB as f64,
            self.seconds,
            self.mib_per_s,
            self.cached_bytes as f64 / MIB as f64,
        );
        if self.files_already_cached > 0 {
            s.push_str(&format!(
                " ({} files already cached in full)",
                self.files_already_cached
            ));
        }
        if self.files_kept_whole > 0 {
            s.push_str(&format!(
                "; {} kept whole in {:.1}s more (read by the kernel itself)",
                self.files_kept_whole, self.kept_whole_seconds
            ));
        }
        if let Some(f) = self.failed.first() {
            s.push_str(&format!(
                "; {} files failed, first {}: {}",
                self.failed.len(),
                printable(&f.file),
                f.error
            ));
        }
        s
    }
}

/// Per-file progress, shared by that file's parts.
struct FileState {
    /// Parts not finished yet.
    parts_left: AtomicU64,
    /// Whether any of its blocks had to be fetched.
    fetched: AtomicBool,
}

/// Shared by every part of one run.
struct Shared {
    disk: Arc<DiskCache>,
    cfg: PrefetchConfig,
    progress: indicatif::ProgressBar,
    fetched: AtomicU64,
    cached: AtomicU64,
    gets: AtomicU64,
    files_done: AtomicU64,
    files_cached: AtomicU64,
    files: u64,
    /// First failure of each file, by item index.
    failed: Mutex<HashMap<usize, String>>,
    /// The folder is shared with other processes: claim blocks first.
    shared_folder: bool,
    /// A write to the cache folder failed (full, gone): stop fetching what
    /// could not be kept.
    disk_broken: Mutex<Option<String>>,
}

/// Blocks `first..end` of item `file`.
struct Part {
    file: usize,
    first: u64,
    end: u64,
}

/// Fetches what is missing of `items` into `disk` (see the module docs),
/// advancing `progress` by object bytes (cached ones included) and setting
/// its message to the files done. A file that fails does not stop the
/// others; it is named in [`Summary::failed`].
pub async fn run(
    items: &[Item],
    disk: Arc<DiskCache>,
    cfg: PrefetchConfig,
    progress: indicatif::ProgressBar,
) -> Summary {
    let started = Instant::now();
    let bs = cfg.block_size.max(1);
    let part_blocks = (cfg.part_size / bs).max(1);
    let mut parts = Vec::new();
    let mut states = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let blocks = item.meta.size.div_ceil(bs);
        let n = blocks.div_ceil(part_blocks);
        states.push(FileState {
            parts_left: AtomicU64::new(n),
            fetched: AtomicBool::new(false),
        });
        for p in 0..n {
            parts.push(Part {
                file: i,
                first: p * part_blocks,
                end: ((p + 1) * part_blocks).min(blocks),
            });
        }
    }
    let shared = Arc::new(Shared {
        shared_folder: disk.is_shared(),
        disk,
        progress,
        fetched: AtomicU64::new(0),
        cached: AtomicU64::new(0),
        gets: AtomicU64::new(0),
        files_done: AtomicU64::new(0),
        files_cached: AtomicU64::new(0),
        files: items.len() as u64,
        failed: Mutex::new(HashMap::new()),
        disk_broken: Mutex::new(None),
        cfg: PrefetchConfig {
            block_size: bs,
            ..cfg.clone()
        },
    });
    // Empty files have no blocks: nothing to fetch, already done.
    for _ in items.iter().filter(|i| i.meta.size == 0) {
        shared.file_done(true);
    }
    let states = Arc::new(states);
    futures::stream::iter(parts)
        .map(|part| {
            let (shared, states) = (shared.clone(), states.clone());
            let item = &items[part.file];
            async move {
                let r = shared.part(item, &part, &states[part.file]).await;
                if let Err(e) = r {
                    let mut failed = lock(&shared.failed);
                    failed.entry(part.file).or_insert(e);
                }
                let state = &states[part.file];
                if state.parts_left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let whole = !state.fetched.load(Ordering::Acquire)
                        && !lock(&shared.failed).contains_key(&part.file);
                    shared.file_done(whole);
                }
            }
        })
        .buffer_unordered(cfg.parts_in_flight.max(1))
        .collect::<Vec<()>>()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    // Then each file all in the folder also as one plain file, for the
    // kernel to read (after the fetching, which it would slow: one more
    // write of every byte).
    let (mut kept_whole, whole_started) = (0, Instant::now());
    if cfg.keep_whole && shared.disk.hands_whole_files_to_the_kernel() {
        let failed: Vec<usize> = lock(&shared.failed).keys().copied().collect();
        for (i, item) in items.iter().enumerate() {
            if failed.contains(&i) || item.meta.size == 0 || item.meta.size > KEEP_WHOLE_MOST {
                continue;
            }
            let id = Arc::new(object_id(&item.bucket, &item.meta));
            if shared.disk.keep_whole_now(id, item.meta.size, bs).await {
                kept_whole += 1;
            }
        }
    }
    let fetched = shared.fetched.load(Ordering::Relaxed);
    let mut failed: Vec<Failure> = lock(&shared.failed)
        .iter()
        .map(|(i, e)| Failure {
            file: format!("{}/{}", items[*i].handle, items[*i].path),
            error: e.clone(),
        })
        .collect();
    failed.sort_by(|a, b| a.file.cmp(&b.file));
    Summary {
        files: items.len() as u64,
        bytes: items.iter().map(|i| i.meta.size).sum(),
        fetched_bytes: fetched,
        cached_bytes: shared.cached.load(Ordering::Relaxed),
        files_already_cached: shared.files_cached.load(Ordering::Relaxed),
        files_kept_whole: kept_whole,
        kept_whole_seconds: whole_started.elapsed().as_secs_f64(),
        gets: shared.gets.load(Ordering::Relaxed),
        seconds,
        mib_per_s: if seconds > 0.0 {
            fetched as f64 / MIB as f64 / seconds
        } else {
            0.0
        },
        failed,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn file_done(&self, already_cached: bool) {
        let done = self.files_done.fetch_add(1, Ordering::Relaxed) + 1;
        if already_cached {
            self.files_cached.fetch_add(1, Ordering::Relaxed);
        }
        self.progress
            .set_message(format!("{done}/{} files", self.files));
    }

    /// Bytes in block `index` of `item` (the last may be short).
    fn block_len(&self, item: &Item, index: u64) -> u64 {
        let bs = self.cfg.block_size;
        item.meta.size.saturating_sub(index * bs).min(bs)
    }

    /// One part: skip what is cached, fetch and store the rest.
    async fn part(&self, item: &Item, part: &Part, state: &FileState) -> Result<(), String> {
        if let Some(why) = lock(&self.disk_broken).clone() {
            return Err(why);
        }
        let id = Arc::new(object_id(&item.bucket, &item.meta));
        let keys: Vec<(BlockKey, u64)> = (part.first..part.end)
            .map(|index| {
                let key = BlockKey {
                    object: id.clone(),
                    index,
                };
                (key, self.block_len(item, index))
            })
            .collect();
        let deadline = Deadline::after(self.cfg.request_timeout);
        // Which blocks are on disk and valid (read and checked in full: a
        // block that fails its checks is removed, and fetched again).
        let disk = self.disk.clone();
        let probe = keys.clone();
        let present: Vec<bool> = self
            .disk
            .folder()
            .run("check blocks", Some(deadline), move || {
                Ok(probe
                    .iter()
                    .map(|(k, len)| disk.get(k, *len).is_some())
                    .collect())
            })
            .await
            .map_err(|e| format!("cannot read the cache folder: {e}"))?;
        let missing: Vec<(BlockKey, u64)> = keys
            .into_iter()
            .zip(present)
            .filter_map(|((key, len), here)| {
                if here {
                    self.cached(len);
                }
                (!here).then_some((key, len))
            })
            .collect();
        if !missing.is_empty() {
            state.fetched.store(true, Ordering::Release);
        }
        if !self.shared_folder {
            let missing = missing.into_iter().map(|(k, l)| (k, l, None)).collect();
            return self.fetch_runs(item, missing).await;
        }
        // In a shared folder, claim each block as a mount does (see
        // `DiskCache::claim`): one a mount or another prefetch is fetching
        // right now is theirs to write, not fetched twice; it is waited
        // for (and fetched here if its claimant gives up or dies), never
        // counted as cached before it is there. The claims are held until
        // this part's blocks are written.
        let until = std::time::SystemTime::now() + self.cfg.request_timeout;
        let claims = self.disk.claim_all(missing.clone(), until, deadline).await;
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for ((key, len), claim) in missing.into_iter().zip(claims) {
            match claim {
                Claim::Theirs { .. } => theirs.push((key, len, ())),
                Claim::Mine(g) => mine.push((key, len, Some(g))),
                Claim::Unavailable => mine.push((key, len, None)),
            }
        }
        let mut first_error = self.fetch_runs(item, mine).await.err();
        let failed = Mutex::new(None);
        let give_up = deadline.sooner_by(self.cfg.request_timeout / 2);
        self.disk
            .await_claimed(
                theirs,
                deadline,
                give_up,
                |_, (), b| self.cached(b.len() as u64),
                |ours| async {
                    let run = ours.into_iter().map(|(k, l, (), g)| (k, l, g)).collect();
                    if let Err(e) = self.fetch_runs(item, run).await {
                        lock(&failed).get_or_insert(e);
                    }
                },
            )
            .await;
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// `len` bytes found in the cache: counted, not fetched.
    fn cached(&self, len: u64) {
        self.cached.fetch_add(len, Ordering::Relaxed);
        self.progress.inc(len);
    }

    /// One GET per run of consecutive blocks of `blocks`.
    async fn fetch_runs(
        &self,
        item: &Item,
        blocks: Vec<(BlockKey, u64, Option<ClaimGuard>)>,
    ) -> Result<(), String> {
        let mut runs: Vec<Vec<(BlockKey, u64, Option<ClaimGuard>)>> = Vec::new();
        for (key, len, claim) in blocks {
            match runs.last_mut() {
                Some(run) if run.last().is_some_and(|(k, _, _)| k.index + 1 == key.index) => {
                    run.push((key, len, claim))
                }
                _ => runs.push(vec![(key, len, claim)]),
            }
        }
        for run in runs {
            self.fetch_run(item, run).await?;
        }
        Ok(())
    }

    /// One ranged GET for consecutive blocks, each written to the cache.
    async fn fetch_run(
        &self,
        item: &Item,
        run: Vec<(BlockKey, u64, Option<ClaimGuard>)>,
    ) -> Result<(), String> {
        let (Some((first, _, _)), Some((last, _, _))) = (run.first(), run.last()) else {
            return Ok(());
        };
        let bs = self.cfg.block_size;
        let start = first.index * bs;
        let end = ((last.index + 1) * bs).min(item.meta.size);
        let span = info_span!("prefetch_get", handle = %item.handle, key = %item.meta.key, start, len = end - start);
        self.gets.fetch_add(1, Ordering::Relaxed);
        let pieces = item
            .store
            .get_pieces(
                &item.meta.key,
                start..end,
                Some(&item.meta),
                bs,
                Deadline::after(self.cfg.request_timeout),
            )
            .instrument(span)
            .await
            .map_err(|e| match e {
                S3Error::Stale | S3Error::NotFound => {
                    "changed or deleted while prefetching (run again for the new version)"
                        .to_string()
                }
                e => e.to_string(),
            })?;
        if pieces.len() != run.len() {
            return Err(format!(
                "S3 answered {} blocks where {} were due",
                pieces.len(),
                run.len()
            ));
        }
        let mut blocks = Vec::with_capacity(run.len());
        for ((key, len, claim), data) in run.into_iter().zip(pieces) {
            if data.len() as u64 != len {
                return Err(format!(
                    "S3 answered a block of {} bytes where {len} were due",
                    data.len()
                ));
            }
            blocks.push((key, data, claim));
        }
        let n: u64 = blocks.iter().map(|(_, d, _)| d.len() as u64).sum();
        match self.disk.store_blocks(blocks).await {
            Ok(()) => {}
            // The folder is full or gone: what is fetched next could not
            // be kept either.
            Err(crate::folder::FolderError::Io(e)) => {
                let e = format!("cannot write the cache folder: {e}");
                debug!(error = %e, "prefetch stops fetching");
                lock(&self.disk_broken).get_or_insert(e.clone());
                return Err(e);
            }
            // Not answering for now (a metadata server failing over), or
            // busy: this part fails (a rerun fetches only what is
            // missing); the others go on.
            Err(e) => return Err(format!("the cache folder is {e}")),
        }
        self.fetched.fetch_add(n, Ordering::Relaxed);
        self.progress.inc(n);
        Ok(())
    }
}

/// Text safe to print on a terminal: control characters (a key may hold
/// an escape sequence) become `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::tree::{Dataset, FileRef};
    use crate::read::{DiskConfig, Reader};
    use crate::s3::memory::MemoryStore;
    use std::sync::atomic::Ordering::Relaxed;

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(5))
    }

    async fn items(store: &Arc<MemoryStore>, keys: &[&str]) -> Vec<Item> {
        let mut out = Vec::new();
        for k in keys {
            out.push(Item {
                handle: "1/2".into(),
                bucket: "b".into(),
                path: k.to_string(),
                meta: store.head(k, soon()).await.unwrap(),
                store: store.clone(),
            });
        }
        out
    }

    fn disk_cfg(dir: &std::path::Path) -> DiskConfig {
        DiskConfig {
            default: false,
            dir: dir.join("cache"),
            limit: 1 << 30,
            shared: false,
            group: false,
        }
    }

    #[tokio::test]
    async fn blocks_are_the_ones_the_mount_reads_and_a_rerun_fetches_nothing() {
        let store = Arc::new(MemoryStore::new());
        let sizes = [(13 * MIB + 5) as usize, 1, 0, (MIB - 1) as usize];
        let mut data = Vec::new();
        for (i, len) in sizes.iter().enumerate() {
            let d = crate::demo::pseudo_random(i as u64 + 1, *len);
            store.put(&format!("f{i}"), d.clone());
            data.push(d);
        }
        let keys = ["f0", "f1", "f2", "f3"];
        let its = items(&store, &keys).await;
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(&disk_cfg(dir.path()), Duration::from_secs(5)).unwrap();
        let cfg = PrefetchConfig::default();
        let s = run(
            &its,
            disk.clone(),
            cfg.clone(),
            indicatif::ProgressBar::hidden(),
        )
        .await;
        assert!(s.failed.is_empty(), "{:?}", s.failed);
        assert_eq!(s.fetched_bytes, sizes.iter().sum::<usize>() as u64);
        assert_eq!(s.files, 4);
        // 14 blocks of f0 in parts of 8: two GETs; one each for f1, f3.
        assert_eq!(s.gets, 4);
        let gets = store.gets.load(Relaxed);

        // The mount's reader, on the same folder: every byte, no GET.
        let reader = Reader::new(ReadConfig {
            disk: Some(disk_cfg(dir.path())),
            ..ReadConfig::default()
        })
        .unwrap();
        for (k, want) in keys.iter().zip(&data) {
            let ds = Arc::new(Dataset {
                handle: "1/2".into(),
                bucket: "b".into(),
                prefix: "".into(),
                updated: std::time::UNIX_EPOCH,
                name: None,
                release: Default::default(),
                store: store.clone(),
            });
            let meta = store.head(k, soon()).await.unwrap();
            let f = reader.open(FileRef { dataset: ds, meta });
            let mut got = Vec::new();
            while (got.len() as u64) < f.size() {
                let b = reader
                    // The mount's own bound: a read's disk lookups get
                    // half the request timeout before S3 is asked.
                    .read(
                        &f,
                        got.len() as u64,
                        128 * 1024,
                        Deadline::after(Duration::from_secs(60)),
                    )
                    .await
                    .unwrap();
                got.extend_from_slice(&b);
            }
            assert!(got == *want, "{k}: other bytes");
            assert_eq!(
                store.gets.load(Relaxed),
                gets,
                "the mount made a GET for {k}"
            );
        }
        assert_eq!(store.gets.load(Relaxed), gets, "the mount made no GET");

        // Again: everything is cached.
        let s = run(&its, disk.clone(), cfg, indicatif::ProgressBar::hidden()).await;
        assert_eq!((s.fetched_bytes, s.gets), (0, 0));
        assert_eq!(s.cached_bytes, sizes.iter().sum::<usize>() as u64);
        assert_eq!(s.files_already_cached, 4);
        assert!(s.line().contains("already cached"), "{}", s.line());
    }

    #[tokio::test]
    async fn a_damaged_block_is_fetched_again_and_nothing_else() {
        let store = Arc::new(MemoryStore::new());
        store.put("f", crate::demo::pseudo_random(9, (20 * MIB) as usize));
        let its = items(&store, &["f"]).await;
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(&disk_cfg(dir.path()), Duration::from_secs(5)).unwrap();
        run(
            &its,
            disk.clone(),
            PrefetchConfig::default(),
            indicatif::ProgressBar::hidden(),
        )
        .await;
        let key = BlockKey {
            object: Arc::new(object_id("b", &its[0].meta)),
            index: 11,
        };
        let p = disk.path(&key);
        let mut raw = std::fs::read(&p).unwrap();
        let n = raw.len();
        raw[n - 1] ^= 1;
        std::fs::write(&p, raw).unwrap();
        let s = run(
            &its,
            disk.clone(),
            PrefetchConfig::default(),
            indicatif::ProgressBar::hidden(),
        )
        .await;
        assert_eq!((s.gets, s.fetched_bytes), (1, MIB));
        assert_eq!(s.files_already_cached, 0);
        assert!(disk.get(&key, MIB).is_some());
    }

    #[tokio::test]
    async fn too_large_a_set_is_refused_in_one_line() {
        let store = Arc::new(MemoryStore::new());
        store.put("f", vec![0u8; (3 * MIB) as usize]);
        let its = items(&store, &["f"]).await;
        let e = fits(&its, MIB, 3 * MIB).unwrap_err();
        assert!(!e.contains('\n') && e.contains("--cache-size"), "{e}");
        fits(&its, MIB, 4 * MIB).unwrap();
    }

    #[tokio::test]
    async fn an_object_changed_since_listing_fails_that_file_only() {
        let store = Arc::new(MemoryStore::new());
        store.put("a", vec![1u8; (2 * MIB) as usize]);
        store.put("b", vec![2u8; (2 * MIB) as usize]);
        let its = items(&store, &["a", "b"]).await;
        store.put("a", vec![3u8; (2 * MIB) as usize]);
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(&disk_cfg(dir.path()), Duration::from_secs(5)).unwrap();
        let s = run(
            &its,
            disk,
            PrefetchConfig::default(),
            indicatif::ProgressBar::hidden(),
        )
        .await;
        assert_eq!(s.failed.len(), 1);
        assert_eq!(s.failed[0].file, "1/2/a");
        assert!(
            s.failed[0].error.contains("changed"),
            "{}",
            s.failed[0].error
        );
        assert_eq!(s.fetched_bytes, 2 * MIB);
    }
}
