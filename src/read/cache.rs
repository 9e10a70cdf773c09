//! The block cache: fixed-size blocks keyed by (bucket, key, ETag, index),
//! in a memory LRU with a byte budget and an optional disk tier.
//!
//! Keying by ETag means a block of an old object version can never be
//! served for a new one. Disk blocks carry a header naming what they hold
//! and a CRC32C of the data; any mismatch is a miss, never wrong bytes.
//! Disk blocks are written to a temporary name (in a shared folder, the
//! block's claim file) and renamed into place, so a reader never sees half
//! a block. The cache folder is treated as input:
//! see [`DiskCache`].

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, renameat2, AtFlags, OFlag, RenameFlags, AT_FDCWD as CWD};
use nix::sys::stat::{fchmod, fstat, fstatat, mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

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
}

/// The memory tier: an LRU of blocks within a byte budget. Blocks on
/// their way count too (reserved when their fetch starts, released as each
/// lands): they make room by evicting blocks readers have consumed (see
/// `demote`), never unread ones, so a sequential reader's read-ahead is
/// not evicted to make room for more of itself. Without that, a mount held
/// the whole budget of consumed blocks plus every block in flight:
/// 8 parallel readers peaked at 130 MiB resident for a 48 MiB budget.
pub struct MemoryCache {
    budget: u64,
    inner: Mutex<MemoryInner>,
}

struct MemoryInner {
    lru: LruCache<BlockKey, Bytes>,
    /// Bytes of the blocks in `lru`.
    used: u64,
    /// Blocks in `lru` that a sequential reader consumed, oldest
    /// consumption first. Room for blocks on their way comes from the
    /// oldest: the block consumed last may still be wanted by the
    /// kernel's other requests for it, which arrive out of order.
    consumed: LruCache<BlockKey, ()>,
    /// Blocks being fetched, and their lengths.
    reserved: std::collections::HashMap<BlockKey, u64>,
    reserved_bytes: u64,
}

impl MemoryInner {
    /// Makes room: consumed blocks (oldest consumed first) while
    /// cached plus reserved bytes exceed `budget`; then any block, never
    /// `keep` (a block just landed), while cached bytes alone exceed it.
    /// Returns the blocks evicted, for the caller to free once the lock
    /// is let go.
    fn evict(&mut self, budget: u64, keep: Option<&BlockKey>) -> Vec<Bytes> {
        let mut out = Vec::new();
        while self.used + self.reserved_bytes > budget {
            // (`keep` is never among them: it landed just now.)
            let Some((k, ())) = self.consumed.pop_lru() else {
                break;
            };
            if let Some(b) = self.lru.pop(&k) {
                self.used -= b.len() as u64;
                out.push(b);
            }
        }
        while self.used > budget {
            if keep.is_some() && self.lru.peek_lru().map(|(k, _)| k) == keep {
                break;
            }
            match self.pop() {
                Some(b) => out.push(b),
                None => break,
            }
        }
        out
    }

    fn pop(&mut self) -> Option<Bytes> {
        let (k, b) = self.lru.pop_lru()?;
        self.used -= b.len() as u64;
        self.consumed.pop(&k);
        Some(b)
    }

    fn unreserve(&mut self, k: &BlockKey) {
        if let Some(n) = self.reserved.remove(k) {
            self.reserved_bytes -= n;
        }
    }
}

impl MemoryCache {
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            inner: Mutex::new(MemoryInner {
                lru: LruCache::unbounded(),
                used: 0,
                consumed: LruCache::unbounded(),
                reserved: Default::default(),
                reserved_bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, k: &BlockKey) -> Option<Bytes> {
        // A consumed block stays marked when read again (the kernel's
        // out-of-order requests for it, a page it lost): unmarked, it could
        // never make room again, and the budget would stop holding.
        self.lock().lru.get(k).cloned()
    }

    pub fn contains(&self, k: &BlockKey) -> bool {
        self.lock().lru.contains(k)
    }

    /// Caches a block; its reservation, if it had one, ends.
    pub fn insert(&self, k: BlockKey, v: Bytes) {
        let mut g = self.lock();
        g.unreserve(&k);
        if self.budget == 0 || v.len() as u64 > self.budget {
            return;
        }
        g.used += v.len() as u64;
        if let Some(old) = g.lru.put(k.clone(), v) {
            g.used -= old.len() as u64;
        }
        g.consumed.pop(&k);
        let evicted = g.evict(self.budget, Some(&k));
        drop(g);
        drop(evicted);
    }

    /// Blocks (key, length) being fetched: room is made for them now,
    /// from consumed blocks. Never waits, never refuses. The blocks evicted
    /// are freed after the lock is let go.
    pub fn reserve_all(&self, blocks: impl IntoIterator<Item = (BlockKey, u64)>) {
        if self.budget == 0 {
            return;
        }
        let evicted = {
            let mut g = self.lock();
            for (k, len) in blocks {
                if let std::collections::hash_map::Entry::Vacant(e) = g.reserved.entry(k) {
                    e.insert(len);
                    g.reserved_bytes += len;
                }
            }
            g.evict(self.budget, None)
        };
        drop(evicted);
    }

    /// Block `k`'s fetch ended without caching it (failed, abandoned).
    pub fn unreserve(&self, k: &BlockKey) {
        self.lock().unreserve(k);
    }

    /// Marks a block as next to go: consumed by a sequential reader, it
    /// now lives in the kernel's page cache.
    pub fn demote(&self, k: &BlockKey) {
        let mut g = self.lock();
        if g.lru.demote(k) {
            g.consumed.put(k.clone(), ());
        }
    }

    /// Bytes of cached blocks.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Bytes of blocks being fetched.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved_bytes
    }
}

const MAGIC: &[u8; 8] = b"PVFSBLK1";

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
    dir: PathBuf,
    /// `dir/v1` itself, opened without following symlinks.
    root: OwnedFd,
    /// The 256 shard folders, opened (created) on first use.
    shards: Vec<OnceLock<Option<OwnedFd>>>,
    limit: u64,
    /// Bytes in the folder as last measured plus what this process wrote since.
    used: AtomicU64,
    /// Bytes written since the last full measurement.
    since_scan: AtomicU64,
    shared: bool,
    dir_mode: u32,
    file_mode: u32,
    evicting: Mutex<()>,
    /// Next shard a sampled pass starts at (shared folders; see
    /// [`DiskCache::evict_if_needed`]).
    cursor: AtomicU64,
    /// Folder entries read and stat'ed so far: the metadata cost of size
    /// accounting and eviction, for stats and tests.
    pub meta_ops: AtomicU64,
}

/// Shards (of 256) a shared folder's size is estimated from at start-up…
const START_SHARDS: usize = 8;

/// A claim this close to its deadline is not filled in place (another may
/// take it over meanwhile): its block is written the ordinary way.
const PUBLISH_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);
/// …and each eviction pass of a shared folder reads.
const PASS_SHARDS: usize = 32;

/// Opens folder `name` in `dir` without following a symlink there.
fn open_dir_at<P: ?Sized + nix::NixPath>(dir: impl AsFd, name: &P) -> nix::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// What [`DiskCache::claim`] found.
pub enum Claim {
    /// This process fetches the block; dropping the guard ends the claim
    /// (after the block is written, or the fetch failed).
    Mine(ClaimGuard),
    /// Another live process fetches it, until at most `until`: wait for
    /// the block file.
    Theirs { until: SystemTime },
    /// The folder cannot hold a claim: fetch without one.
    Unavailable,
}

/// An open claim on one block (see [`DiskCache::claim`]).
pub struct ClaimGuard {
    cache: Arc<DiskCache>,
    name: String,
    shard: String,
    /// The first line of the claim file: removed only while it is still
    /// ours (a process that took it over after our deadline owns it now).
    token: String,
    /// The claim's deadline: past it, another may take the claim over.
    until: SystemTime,
    /// Renamed into place as the block itself, or no longer ours to
    /// remove (see [`DiskCache::publish`]).
    published: bool,
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.published {
            return;
        }
        let Ok(dir) = open_dir_at(&self.cache.root, self.shard.as_str()) else {
            return;
        };
        if let Some(ClaimHead::Line(line)) = read_claim_head(&dir, &self.name) {
            if line == self.token {
                let _ = unlinkat(&dir, self.name.as_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
    }
}

/// A claim as its file says.
struct ClaimFile {
    host: String,
    pid: i32,
    until: SystemTime,
}

impl ClaimFile {
    /// Whether its owner may still be fetching: before its deadline, and
    /// (on this host, where we can tell) still running.
    fn live(&self) -> bool {
        if SystemTime::now() >= self.until {
            return false;
        }
        if self.host == host() {
            // ESRCH: no such process. EPERM: someone else's, alive.
            return nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), None)
                != Err(Errno::ESRCH);
        }
        true
    }
}

/// What a claim file starts with.
enum ClaimHead {
    /// Its first line, `\n` included: "HOST PID DEADLINE_MS TOKEN\n". The
    /// block's data may already follow it (written before its header).
    Line(String),
    /// A block header: its claimant has written the whole block and is
    /// about to rename the file into place (see [`DiskCache::publish`]).
    Block,
}

fn read_claim_head(dir: impl AsFd, name: &str) -> Option<ClaimHead> {
    let fd = openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    claim_head(&fs::File::from(fd))
}

/// The head of an open claim file (its first 512 bytes at most).
fn claim_head(file: &fs::File) -> Option<ClaimHead> {
    let mut head = [0u8; 512];
    let mut got = 0;
    while got < head.len() {
        match file.read_at(&mut head[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let head = &head[..got];
    if head.starts_with(MAGIC) {
        return Some(ClaimHead::Block);
    }
    let end = head.iter().position(|&b| b == b'\n')? + 1;
    Some(ClaimHead::Line(
        std::str::from_utf8(&head[..end]).ok()?.to_string(),
    ))
}

fn read_claim(dir: impl AsFd, name: &str) -> Option<ClaimFile> {
    match read_claim_head(dir, name)? {
        ClaimHead::Line(line) => parse_claim(&line),
        ClaimHead::Block => None,
    }
}

/// A claim's line: "HOST PID DEADLINE_MS TOKEN".
fn parse_claim(text: &str) -> Option<ClaimFile> {
    let mut f = text.split_whitespace();
    let host = f.next()?.to_string();
    let pid = f.next()?.parse().ok()?;
    let until_ms: u64 = f.next()?.parse().ok()?;
    Some(ClaimFile {
        host,
        pid,
        until: UNIX_EPOCH + std::time::Duration::from_millis(until_ms),
    })
}

/// Whether `name` changed in the last 30 s (by this host's clock, against
/// the file system's: a generous bound for clocks apart).
fn recently_modified(dir: impl AsFd, name: &str) -> bool {
    let Ok(st) = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
        return false;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    (now - st.st_mtime).abs() < 30
}

/// Whether the file at `name` in `dir` is still the inode `ino`.
fn still(dir: impl AsFd, name: &str, ino: u64) -> bool {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| st.st_ino == ino)
}

/// This host's name, as claims record it.
fn host() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().replace(char::is_whitespace, "_"))
            .unwrap_or_else(|_| "unknown".into())
    })
    .clone()
}

/// Bytes of the header of block `k`.
fn header_len(k: &BlockKey) -> usize {
    8 + 3 * 4 + k.object.bucket.len() + k.object.key.len() + k.object.etag.len() + 8 + 8 + 4
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

    fn name(k: &BlockKey) -> String {
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
    fn shard(&self, name: &str) -> Option<&OwnedFd> {
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

    fn header(k: &BlockKey, data: &[u8]) -> Vec<u8> {
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
    fn load(
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
    fn reject(&self, shard: &OwnedFd, name: &str, why: &str) {
        warn!(path = %self.dir.join(&name[..2]).join(name).display(), why, "disk cache entry ignored and removed");
        let _ = unlinkat(shard, name, UnlinkatFlags::NoRemoveDir);
    }

    /// Claims the fetching of block `k` (`len` data bytes) for this process
    /// until `until`, so that other processes sharing the folder (other
    /// mounts, other nodes) wait for the block instead of fetching it too.
    ///
    /// The claim is a file beside the block, created exclusively (what NFS,
    /// Lustre and GPFS all honour; no `flock` across nodes), whose first
    /// line holds this host's name, PID, the deadline and a random token.
    /// A claim whose deadline has passed, or whose owner on this host is
    /// gone, is taken over. The claim file later becomes the block itself
    /// ([`DiskCache::publish`]): one file created per block, none deleted,
    /// which matters on file systems where creating files after many
    /// deletions is slow (ext4 without a journal skips inodes freed in the
    /// last minutes). Returns [`Claim::Unavailable`] when the folder cannot
    /// hold a claim: the caller then simply fetches.
    pub fn claim(self: &Arc<Self>, k: &BlockKey, len: u64, until: SystemTime) -> Claim {
        let block = Self::name(k);
        let Some(shard) = self.shard(&block) else {
            return Claim::Unavailable;
        };
        let name = format!(".claim-{block}");
        let until_ms = until
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let me = format!(
            "{} {} {until_ms} {:x}\n",
            host(),
            std::process::id(),
            rand::random::<u64>()
        );
        for _ in 0..2 {
            match openat(
                shard,
                name.as_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(self.file_mode),
            ) {
                Ok(fd) => {
                    let mut f = std::fs::File::from(fd);
                    if f.write_all(me.as_bytes()).is_err() {
                        let _ = unlinkat(shard, name.as_str(), UnlinkatFlags::NoRemoveDir);
                        return Claim::Unavailable;
                    }
                    return Claim::Mine(ClaimGuard {
                        cache: self.clone(),
                        name,
                        shard: block[..2].to_string(),
                        token: me,
                        until,
                        published: false,
                    });
                }
                Err(Errno::EEXIST) => {
                    match read_claim_head(shard, &name) {
                        Some(ClaimHead::Line(line)) => {
                            if let Some(c) = parse_claim(&line) {
                                if c.live() {
                                    return Claim::Theirs { until: c.until };
                                }
                            }
                        }
                        Some(ClaimHead::Block) if Self::adopt(shard, &name, &block, k, len) => {
                            return Claim::Theirs {
                                until: SystemTime::now(),
                            };
                        }
                        // Being written: a claim's line not there yet, or
                        // (on NFS, whose writes reach other nodes in any
                        // order until closed) a block's header before its
                        // data. Give it a moment, not a takeover.
                        _ if recently_modified(shard, &name) => {
                            return Claim::Theirs {
                                until: SystemTime::now() + std::time::Duration::from_secs(1),
                            };
                        }
                        _ => {}
                    }
                    // Its owner died or missed its deadline (or it is not
                    // a claim at all): take it over.
                    debug!(block = %block, "taking over a stale claim");
                    let _ = unlinkat(shard, name.as_str(), UnlinkatFlags::NoRemoveDir);
                }
                Err(_) => return Claim::Unavailable,
            }
        }
        // Lost a race with another taker: it holds the claim now.
        match read_claim(shard, &name) {
            Some(c) if c.live() => Claim::Theirs { until: c.until },
            _ => Claim::Unavailable,
        }
    }

    /// [`DiskCache::claim`] of each of `blocks` (key, data bytes), on the
    /// blocking pool (claims are file system calls, on a cluster file
    /// system possibly slow ones). A pool that failed the task claims
    /// nothing: every answer [`Claim::Unavailable`], so callers just fetch.
    pub async fn claim_all(
        self: &Arc<Self>,
        blocks: Vec<(BlockKey, u64)>,
        until: SystemTime,
    ) -> Vec<Claim> {
        let n = blocks.len();
        let disk = self.clone();
        tokio::task::spawn_blocking(move || {
            blocks
                .iter()
                .map(|(k, len)| disk.claim(k, *len, until))
                .collect()
        })
        .await
        .unwrap_or_else(|_| (0..n).map(|_| Claim::Unavailable).collect())
    }

    /// Writes block `k` as [`DiskCache::put`] does, through `claim` when
    /// there is one: the claim file itself is filled (data first, then
    /// the header over the claim's line) and renamed into place, which
    /// ends the claim and shows the block in one step. Falls back to
    /// [`DiskCache::put`] when the claim is no longer ours.
    pub fn put_claimed(
        &self,
        k: &BlockKey,
        data: &[u8],
        claim: Option<ClaimGuard>,
    ) -> std::io::Result<()> {
        match claim {
            Some(mut claim) => match self.publish(&mut claim, k, data) {
                Ok(true) => Ok(()),
                Ok(false) => self.put(k, data),
                Err(e) => Err(e),
            },
            None => self.put(k, data),
        }
    }

    /// `Ok(false)`: not done, the claim is not (or no longer) ours.
    fn publish(&self, claim: &mut ClaimGuard, k: &BlockKey, data: &[u8]) -> std::io::Result<bool> {
        let block = Self::name(k);
        let Some(shard) = self.shard(&block) else {
            return Ok(false);
        };
        let header = Self::header(k, data);
        // The header must cover the whole claim line, so that the file is
        // never a claim and a block at once; and the claim must not be
        // about to expire, or another may take it over while we write.
        if claim.token.len() > header.len()
            || claim.name != format!(".claim-{block}")
            || SystemTime::now() + PUBLISH_MARGIN >= claim.until
        {
            return Ok(false);
        }
        let Ok(fd) = openat(
            shard,
            claim.name.as_str(),
            OFlag::O_RDWR | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) else {
            return Ok(false);
        };
        let file = fs::File::from(fd);
        match claim_head(&file) {
            Some(ClaimHead::Line(line)) if line == claim.token => {}
            _ => return Ok(false),
        }
        let ino = fstat(&file)?.st_ino;
        if self.file_mode & 0o040 != 0 {
            // The umask may have taken the group bit away.
            fchmod(&file, Mode::from_bits_truncate(self.file_mode))?;
        }
        // Data first, header last: until the header lands the file is
        // still a claim to anyone who reads it. Closed before the rename,
        // so an NFS client has sent every byte before the name appears.
        // A failed write leaves the claim to its guard, which removes it
        // while it is still ours.
        file.write_all_at(data, header.len() as u64)?;
        file.write_all_at(&header, 0)?;
        drop(file);
        // From here the name is not the guard's to remove: the file is
        // either the block, or someone else's.
        claim.published = true;
        // Taken over while we wrote (our file unlinked, a new claim in its
        // place): the ordinary way, leaving their claim alone.
        if !still(shard, &claim.name, ino) {
            return Ok(false);
        }
        match renameat(shard, claim.name.as_str(), shard, block.as_str()) {
            Ok(()) => {
                self.added((header.len() + data.len()) as u64);
                Ok(true)
            }
            // Another process found it finished and put it in place first
            // (see `adopt`), or took it over: done if the block is there.
            Err(_) => Ok(Self::load(shard, &block, k, data.len() as u64).is_ok()),
        }
    }

    /// Puts a finished block left under its claim's name (its writer died
    /// between its last write and its rename, or is about to rename it)
    /// into place: `true` if the block is in place now. Never replaces a
    /// block already there.
    fn adopt(shard: &OwnedFd, claim: &str, block: &str, k: &BlockKey, len: u64) -> bool {
        let Ok((_, file, _)) = Self::load(shard, claim, k, len) else {
            return false;
        };
        let Ok(ino) = fstat(&file).map(|st| st.st_ino) else {
            return false;
        };
        drop(file);
        if !still(shard, claim, ino) {
            return false;
        }
        match renameat2(shard, claim, shard, block, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => true,
            // Already in place: this copy is a spare.
            Err(Errno::EEXIST) => {
                if still(shard, claim, ino) {
                    let _ = unlinkat(shard, claim, UnlinkatFlags::NoRemoveDir);
                }
                true
            }
            // A file system without RENAME_NOREPLACE (NFS).
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EOPNOTSUPP) => {
                renameat(shard, claim, shard, block).is_ok()
            }
            Err(_) => false,
        }
    }

    /// Counts `n` bytes newly written, evicting if the folder is over.
    fn added(&self, n: u64) {
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
    fn entries(&self) -> Vec<Entry> {
        self.entries_in(0..256)
    }

    /// The block files of `shards`.
    fn entries_in(&self, shards: impl Iterator<Item = usize>) -> Vec<Entry> {
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
    fn evict_if_needed(&self) {
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

/// One block file found by [`DiskCache::entries`].
impl DiskCache {
    /// One eviction pass of a shared folder, over an eighth of it (the
    /// next [`PASS_SHARDS`] shards; each process starts at a random one):
    /// the folder's size is estimated from that slice, and if it is over
    /// the bound, the slice gives up the oldest of its blocks in
    /// proportion (the whole excess, taken from the slice), an
    /// approximate LRU by sampling. Cost: a slice is read once per tenth
    /// of the bound written, so about 2.5 entries read per block written
    /// however big the folder is; no pass ever reads the whole folder.
    fn evict_sampled(&self) {
        let first = self.cursor.fetch_add(PASS_SHARDS as u64, Ordering::Relaxed) as usize;
        let mut entries = self.entries_in((0..PASS_SHARDS).map(|i| (first + i) % 256));
        let slice: u64 = entries.iter().map(|e| e.size).sum();
        let estimate = slice * 256 / PASS_SHARDS as u64;
        let target = self.limit / 10 * 9;
        if estimate <= self.limit {
            self.used.store(estimate, Ordering::Relaxed);
            return;
        }
        // The excess of the whole, freed from this slice (at most all of it).
        let free = (estimate - target).min(slice);
        entries.sort_by_key(|e| e.mtime);
        let (mut freed, mut evicted) = (0u64, 0u64);
        for e in entries {
            if freed >= free {
                break;
            }
            let Ok(dir_fd) = open_dir_at(&self.root, format!("{:02x}", e.shard).as_str()) else {
                continue;
            };
            if unlinkat(&dir_fd, e.name.as_str(), UnlinkatFlags::NoRemoveDir).is_ok() {
                freed += e.size;
                evicted += 1;
            }
        }
        self.used
            .store(estimate.saturating_sub(freed), Ordering::Relaxed);
        if evicted > 0 {
            debug!(evicted, estimate, "shared disk cache evicted");
        }
    }
}

struct Entry {
    shard: usize,
    name: String,
    size: u64,
    mtime: i64,
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
struct EvictLock(Option<OwnedFd>);

impl EvictLock {
    fn take(root: &OwnedFd, dir: &Path, mode: u32) -> EvictLock {
        use std::os::unix::io::AsRawFd;
        let flags = OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
        // Read-write where we may (NFS emulates flock with fcntl locks,
        // which need a descriptor open for writing); read-only otherwise
        // (a group member of a cache someone else created).
        let f = openat(
            root,
            ".evict.lock",
            OFlag::O_RDWR | OFlag::O_CREAT | flags,
            Mode::from_bits_truncate(mode),
        )
        .inspect(|f| {
            // The umask may have taken the group bits away.
            let _ = fchmod(f, Mode::from_bits_truncate(mode));
        })
        .or_else(|_| openat(root, ".evict.lock", OFlag::O_RDONLY | flags, Mode::empty()));
        let f = match f {
            Ok(f) => f,
            Err(e) => {
                Self::unlocked(&format!(
                    "cannot open {}: {e}",
                    dir.join(".evict.lock").display()
                ));
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

    /// A cache of 12 bytes holding blocks 0, 1 and 2 (4 bytes each).
    fn full_cache() -> MemoryCache {
        let c = MemoryCache::new(12);
        for i in 0..3 {
            c.insert(key(i), Bytes::from(vec![0u8; 4]));
        }
        c
    }

    #[test]
    fn blocks_on_their_way_count_against_the_budget() {
        let c = full_cache();
        // Block 1 consumed: it goes first when room is needed.
        c.demote(&key(1));
        c.reserve_all([(key(3), 4)]);
        assert_eq!((c.used(), c.reserved()), (8, 4));
        assert!(c.get(&key(1)).is_none() && c.get(&key(0)).is_some());
        // Reserving twice counts once; landing ends the reservation.
        c.reserve_all([(key(3), 4)]);
        c.insert(key(3), Bytes::from(vec![0u8; 4]));
        assert_eq!((c.used(), c.reserved()), (12, 0));
        // A failed fetch gives its room back.
        c.reserve_all([(key(4), 4)]);
        assert_eq!(c.reserved(), 4);
        c.unreserve(&key(4));
        assert_eq!(c.reserved(), 0);
        // Unread blocks never make room for blocks on their way: a
        // reader's read-ahead is not evicted for more of itself.
        for i in 5..8 {
            c.reserve_all([(key(i), 4)]);
        }
        assert_eq!(c.used(), 12, "nothing consumed to evict");
        // Cached blocks alone stay within the budget; the one that just
        // landed is kept.
        c.insert(key(5), Bytes::from(vec![0u8; 4]));
        assert!(c.get(&key(5)).is_some());
        assert_eq!(c.used(), 12);
    }

    #[test]
    fn the_oldest_consumed_block_makes_room_first() {
        let c = full_cache();
        // Consumed in order 0, 1: the kernel may still ask for 1 (its
        // requests for one block arrive out of order), so 0 goes first.
        c.demote(&key(0));
        c.demote(&key(1));
        c.reserve_all([(key(3), 4)]);
        assert!(c.get(&key(0)).is_none());
        assert!(c.get(&key(1)).is_some() && c.get(&key(2)).is_some());
    }

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

    /// A block whose header is longer than any claim line, as real keys
    /// (`datasets/10378-1-.../file`) make them.
    fn long_key(i: u64) -> BlockKey {
        BlockKey {
            object: Arc::new(ObjectId {
                bucket: "rrap-storage".into(),
                key: "datasets/10378-1-1687966/some/folder/data.nc".into(),
                etag: "0123456789abcdef0123456789abcdef".into(),
            }),
            index: i,
        }
    }

    fn shared_cache(dir: &Path) -> Arc<DiskCache> {
        DiskCache::open(&crate::read::DiskConfig {
            shared: true,
            ..disk(dir, 1 << 30)
        })
        .unwrap()
    }

    fn claim_files(c: &DiskCache, k: &BlockKey) -> Vec<String> {
        fs::read_dir(c.path(k).parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".claim-") || n.starts_with(".tmp-"))
            .collect()
    }

    fn later() -> SystemTime {
        SystemTime::now() + std::time::Duration::from_secs(30)
    }

    #[test]
    fn a_claim_becomes_its_block_in_one_rename() {
        let d = tempfile::tempdir().unwrap();
        let c = shared_cache(d.path());
        let k = long_key(0);
        let data = vec![5u8; 4096];
        let Claim::Mine(g) = c.claim(&k, 4096, later()) else {
            panic!("a fresh block is ours to claim");
        };
        let ino = fs::metadata(c.path(&k).with_file_name(&g.name)).unwrap();
        c.put_claimed(&k, &data, Some(g)).unwrap();
        assert_eq!(c.get(&k, 4096).unwrap(), Bytes::from(data));
        // The claim file itself is the block now: nothing left, nothing
        // deleted.
        assert!(claim_files(&c, &k).is_empty());
        let block = fs::metadata(c.path(&k)).unwrap();
        assert_eq!(
            std::os::unix::fs::MetadataExt::ino(&block),
            std::os::unix::fs::MetadataExt::ino(&ino)
        );
    }

    #[test]
    fn a_claim_being_filled_is_still_a_claim() {
        let d = tempfile::tempdir().unwrap();
        let c = shared_cache(d.path());
        let k = long_key(1);
        let Claim::Mine(g) = c.claim(&k, 4096, later()) else {
            panic!("ours");
        };
        // Data written after the claim line, header not yet: another
        // process still sees a live claim and waits.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(c.path(&k).with_file_name(&g.name))
            .unwrap();
        f.write_all_at(&[9u8; 4096], header_len(&k) as u64).unwrap();
        assert!(matches!(c.claim(&k, 4096, later()), Claim::Theirs { .. }));
        // Dropped unpublished (the fetch failed): the claim goes.
        drop(g);
        assert!(claim_files(&c, &k).is_empty());
    }

    #[test]
    fn a_whole_block_left_under_its_claim_name_is_put_in_place() {
        let d = tempfile::tempdir().unwrap();
        let c = shared_cache(d.path());
        let k = long_key(2);
        let data = vec![3u8; 4096];
        // Its writer died between the header and the rename.
        c.put(&k, &data).unwrap();
        let claim = c
            .path(&k)
            .with_file_name(format!(".claim-{}", DiskCache::name(&k)));
        fs::rename(c.path(&k), &claim).unwrap();
        assert!(matches!(c.claim(&k, 4096, later()), Claim::Theirs { .. }));
        assert_eq!(c.get(&k, 4096).unwrap(), Bytes::from(data));
        assert!(claim_files(&c, &k).is_empty());
        // A damaged one is a stale claim: taken over, never served.
        let k = long_key(3);
        c.put(&k, &[1u8; 4096]).unwrap();
        let claim = c
            .path(&k)
            .with_file_name(format!(".claim-{}", DiskCache::name(&k)));
        fs::rename(c.path(&k), &claim).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&claim).unwrap();
        f.write_all_at(b"x", 200).unwrap();
        // Just written: maybe a block whose data has not all reached this
        // node yet (NFS). A moment's wait, not a takeover.
        assert!(matches!(c.claim(&k, 4096, later()), Claim::Theirs { .. }));
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(120))
            .unwrap();
        assert!(matches!(c.claim(&k, 4096, later()), Claim::Mine(_)));
        assert!(c.get(&k, 4096).is_none());
    }

    #[test]
    fn an_empty_claim_is_waited_on_briefly_then_taken_over() {
        let d = tempfile::tempdir().unwrap();
        let c = shared_cache(d.path());
        let k = long_key(5);
        c.get(&k, 1); // creates the shard folder
        let claim = c
            .path(&k)
            .with_file_name(format!(".claim-{}", DiskCache::name(&k)));
        // Created, its line not written yet.
        let f = fs::File::create(&claim).unwrap();
        assert!(matches!(c.claim(&k, 4096, later()), Claim::Theirs { .. }));
        f.set_modified(SystemTime::now() - std::time::Duration::from_secs(120))
            .unwrap();
        assert!(matches!(c.claim(&k, 4096, later()), Claim::Mine(_)));
    }

    #[test]
    fn a_claim_near_its_deadline_is_written_the_ordinary_way() {
        let d = tempfile::tempdir().unwrap();
        let c = shared_cache(d.path());
        let k = long_key(6);
        let soon = SystemTime::now() + std::time::Duration::from_millis(500);
        let Claim::Mine(g) = c.claim(&k, 4096, soon) else {
            panic!("ours");
        };
        let claim_ino = std::os::unix::fs::MetadataExt::ino(
            &fs::metadata(c.path(&k).with_file_name(&g.name)).unwrap(),
        );
        c.put_claimed(&k, &[4u8; 4096], Some(g)).unwrap();
        assert_eq!(c.get(&k, 4096).unwrap(), Bytes::from(vec![4u8; 4096]));
        let block_ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(c.path(&k)).unwrap());
        assert_ne!(block_ino, claim_ino);
        assert!(claim_files(&c, &k).is_empty());
    }

    #[test]
    fn a_block_put_in_place_by_another_still_counts_as_published() {
        let d = tempfile::tempdir().unwrap();
        let c = shared_cache(d.path());
        let k = long_key(7);
        let data = vec![8u8; 4096];
        let Claim::Mine(g) = c.claim(&k, 4096, later()) else {
            panic!("ours");
        };
        // The block lands by another way first (another node's fallback
        // write): the owner's rename then replaces it with the same bytes.
        c.put(&k, &data).unwrap();
        c.put_claimed(&k, &data, Some(g)).unwrap();
        assert_eq!(c.get(&k, 4096).unwrap(), Bytes::from(data));
        assert!(claim_files(&c, &k).is_empty());
    }

    #[test]
    fn a_claim_taken_over_is_never_published_by_its_first_owner() {
        let d = tempfile::tempdir().unwrap();
        let c = shared_cache(d.path());
        let k = long_key(4);
        let past = SystemTime::now() - std::time::Duration::from_secs(1);
        let Claim::Mine(first) = c.claim(&k, 4096, past) else {
            panic!("ours");
        };
        // Past its deadline: another takes it over.
        let Claim::Mine(second) = c.claim(&k, 4096, later()) else {
            panic!("a stale claim is taken over");
        };
        let second_name = c.path(&k).with_file_name(&second.name);
        let second_line = fs::read_to_string(&second_name).unwrap();
        // The first owner's block still lands (its bytes are right), by
        // the ordinary path: the second claim stays the second's.
        c.put_claimed(&k, &[7u8; 4096], Some(first)).unwrap();
        assert_eq!(c.get(&k, 4096).unwrap(), Bytes::from(vec![7u8; 4096]));
        assert_eq!(fs::read_to_string(&second_name).unwrap(), second_line);
        c.put_claimed(&k, &[7u8; 4096], Some(second)).unwrap();
        assert_eq!(c.get(&k, 4096).unwrap(), Bytes::from(vec![7u8; 4096]));
        assert!(claim_files(&c, &k).is_empty());
    }
}
