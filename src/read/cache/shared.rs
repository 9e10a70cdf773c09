//! A cache folder shared by many mounts and nodes: claims, so that a
//! block one process is fetching is waited for by the others instead of
//! fetched again, and trimming by sampling (the folder is never walked
//! whole).

use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, renameat2, AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{fchmod, fstat, fstatat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use bytes::Bytes;
use tracing::{debug, warn};

use super::disk::{open_dir_at, open_untrusted, MAGIC, PASS_SHARDS, PUBLISH_MARGIN};
use super::{BlockKey, DiskCache};
use crate::retry::Deadline;

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
    /// Ends the claim: removes its file while it is still ours, through
    /// the folder (a guard may be dropped on an async worker). A folder
    /// that does not answer keeps the file; the claim then ends by its
    /// deadline, when others take it over.
    fn drop(&mut self) {
        if self.published {
            return;
        }
        let cache = self.cache.clone();
        let (name, shard, token) = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.shard),
            std::mem::take(&mut self.token),
        );
        let _ = self.cache.folder.spawn_cleanup("end a claim", move || {
            let Ok(dir) = open_dir_at(&cache.root, shard.as_str()) else {
                return;
            };
            if let Some(ClaimHead::Line(line)) = read_claim_head(&dir, &name) {
                if line == token {
                    let _ = unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir);
                }
            }
        });
    }
}

/// What one look at a block another process claimed found (see
/// [`DiskCache::await_claimed`]).
enum Polled {
    /// The block is there.
    Here(Bytes),
    /// Still claimed by a live process.
    Theirs,
    /// Ours to fetch now (its claimant is gone, or it is unclaimable).
    Ours(Option<ClaimGuard>),
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
        let now = SystemTime::now();
        // A deadline further ahead than any claim ever sets (a node whose
        // clock is far off, a neighbour's made-up claim) holds nobody up.
        if now >= self.until || self.until > now + MAX_CLAIM_AHEAD {
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

/// The furthest ahead a claim's deadline may be: a claim lasts one
/// request (`--request-timeout`, 30 s by default), and clocks apart by a
/// few minutes are allowed for.
const MAX_CLAIM_AHEAD: Duration = Duration::from_secs(600);

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
    let fd = open_untrusted(dir, name).ok()?;
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

/// How long a claim may stay empty, by this process's clock from when it
/// first saw it so, before it is taken over.
const EMPTY_CLAIM_GRACE: Duration = Duration::from_secs(2);

/// Whether the claim file `name` in `dir` is empty and has been, the same
/// file, for [`EMPTY_CLAIM_GRACE`] since this process first saw it so.
fn empty_for_long(dir: impl AsFd, name: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;
    static SEEN: OnceLock<Mutex<HashMap<(u64, String), Instant>>> = OnceLock::new();
    let Ok(st) = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) else {
        return false;
    };
    if st.st_size != 0 {
        return false;
    }
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    // Forgotten a minute on: bounded however many claims come and go.
    seen.retain(|_, at| at.elapsed() < Duration::from_secs(60));
    let first = *seen
        .entry((st.st_ino, name.to_string()))
        .or_insert_with(Instant::now);
    first.elapsed() >= EMPTY_CLAIM_GRACE
}

/// Whether the file at `name` in `dir` is still the inode `ino`.
fn still(dir: impl AsFd, name: &str, ino: u64) -> bool {
    fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).is_ok_and(|st| st.st_ino == ino)
}

/// This host's name, as claims record it.
pub(super) fn host() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().replace(char::is_whitespace, "_"))
            .unwrap_or_else(|_| "unknown".into())
    })
    .clone()
}

impl DiskCache {
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
                        // Empty: its line is written right after it is
                        // made (and on NFS reaches us at its close, a
                        // moment later), so one empty for longer was left
                        // by a claimant killed in between (a `scancel`):
                        // taken over after EMPTY_CLAIM_GRACE by our own
                        // clock, not after 30 s by the file's.
                        None if empty_for_long(shard, &name) => {}
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

    /// [`DiskCache::claim`] of each of `blocks` (key, data bytes), in one
    /// call into the folder, waited for until `deadline` (and the stall
    /// timeout). A folder that does not answer claims nothing: every answer
    /// is [`Claim::Unavailable`], so callers just fetch. (Claims the call
    /// makes after its caller gave up end at once: nobody holds them.)
    pub async fn claim_all(
        self: &Arc<Self>,
        blocks: Vec<(BlockKey, u64)>,
        until: SystemTime,
        deadline: Deadline,
    ) -> Vec<Claim> {
        let n = blocks.len();
        let disk = self.clone();
        self.folder
            .run("claim blocks", Some(deadline), move || {
                Ok(blocks
                    .iter()
                    .map(|(k, len)| disk.claim(k, *len, until))
                    .collect())
            })
            .await
            .unwrap_or_else(|_| (0..n).map(|_| Claim::Unavailable).collect())
    }

    /// Waits for `pending` blocks (key, data bytes, the caller's own) that
    /// other processes claimed: looks in the shared folder (backing off
    /// from 5 ms to 50 ms; no inotify, which no cluster file system
    /// carries across nodes) until each block is there (handed to `here`),
    /// or its claim is gone or stale, or it cannot be claimed (handed to
    /// `fetch`, with this process's claim if it got one), or `give_up` has
    /// passed or the folder stops answering (every block left handed to
    /// `fetch`, unclaimed). Never past `give_up` on a dead node's word,
    /// never a hang on a folder that does not answer.
    pub async fn await_claimed<T, Fut>(
        self: &Arc<Self>,
        mut pending: Vec<(BlockKey, u64, T)>,
        deadline: Deadline,
        give_up: Deadline,
        mut here: impl FnMut(BlockKey, T, Bytes),
        mut fetch: impl FnMut(Vec<(BlockKey, u64, T, Option<ClaimGuard>)>) -> Fut,
    ) where
        Fut: std::future::Future<Output = ()>,
    {
        // A block another node is fetching is usually a read-ahead run
        // away: look often at first, and no slower than 50 ms (each look
        // is one failed open per pending block, cheap even on Lustre).
        let mut wait = Duration::from_millis(5);
        while !pending.is_empty() {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(50));
            let looked = if give_up.expired() {
                None
            } else {
                self.poll_claimed(&pending, deadline).await
            };
            let Some(looked) = looked else {
                let rest = pending
                    .into_iter()
                    .map(|(k, l, t)| (k, l, t, None))
                    .collect();
                return fetch(rest).await;
            };
            let (mut ours, mut still) = (Vec::new(), Vec::new());
            for ((k, len, t), p) in pending.into_iter().zip(looked) {
                match p {
                    Polled::Here(b) => here(k, t, b),
                    Polled::Theirs => still.push((k, len, t)),
                    Polled::Ours(g) => ours.push((k, len, t, g)),
                }
            }
            if !ours.is_empty() {
                fetch(ours).await;
            }
            pending = still;
        }
    }

    /// One look at each of `pending` (see [`DiskCache::await_claimed`]),
    /// in one call into the folder; `None` when it does not answer.
    async fn poll_claimed<T>(
        self: &Arc<Self>,
        pending: &[(BlockKey, u64, T)],
        deadline: Deadline,
    ) -> Option<Vec<Polled>> {
        let until = SystemTime::now() + deadline.remaining();
        let asks: Vec<(BlockKey, u64)> = pending.iter().map(|(k, l, _)| (k.clone(), *l)).collect();
        let d = self.clone();
        self.folder
            .run("look for claimed blocks", Some(deadline), move || {
                Ok(asks
                    .iter()
                    .map(|(k, len)| match d.get(k, *len) {
                        Some(b) => Polled::Here(b),
                        None => match d.claim(k, *len, until) {
                            Claim::Theirs { .. } => Polled::Theirs,
                            Claim::Mine(g) => Polled::Ours(Some(g)),
                            Claim::Unavailable => Polled::Ours(None),
                        },
                    })
                    .collect())
            })
            .await
            .ok()
    }

    /// Writes block `k` as [`DiskCache::put`] does, through `claim` when
    /// there is one: the claim file itself is filled (data first, then
    /// the header over the claim's line) and renamed into place, which
    /// ends the claim and shows the block in one step. Falls back to
    /// [`DiskCache::put`] when the claim is no longer ours.
    pub fn put_claimed(
        self: &Arc<Self>,
        k: &BlockKey,
        data: &[u8],
        claim: Option<ClaimGuard>,
    ) -> std::io::Result<()> {
        // Below the free-space floor: not kept (said once, not per block);
        // the claim ends as its guard goes.
        if !self.room_for(data.len() as u64) {
            return Ok(());
        }
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
    fn publish(
        self: &Arc<Self>,
        claim: &mut ClaimGuard,
        k: &BlockKey,
        data: &[u8],
    ) -> std::io::Result<bool> {
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

    /// One eviction pass of a shared folder, over an eighth of it (the
    /// next [`PASS_SHARDS`] shards; each process starts at a random one):
    /// the folder's size is estimated from that slice, and if it is over
    /// the bound, the slice gives up the oldest of its blocks in
    /// proportion (the whole excess, taken from the slice), an
    /// approximate LRU by sampling. Cost: a slice is read once per tenth
    /// of the bound written, so about 2.5 entries read per block written
    /// however big the folder is; no pass ever reads the whole folder.
    pub(super) fn evict_sampled(self: &Arc<Self>) {
        let first = self.cursor.fetch_add(PASS_SHARDS as u64, Ordering::Relaxed) as usize;
        let Some(mut entries) = self.entries_in((0..PASS_SHARDS).map(|i| (first + i) % 256)) else {
            return;
        };
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
        let (freed, evicted) = self.remove_entries(entries, free);
        self.used
            .store(estimate.saturating_sub(freed), Ordering::Relaxed);
        if evicted > 0 {
            debug!(evicted, estimate, "shared disk cache evicted");
        }
    }
}

/// The trimming lock of a cache folder: `flock` on `v1/.evict.lock`,
/// taken without waiting (a holder may be stopped for hours: a suspended
/// job, a debugger), released when dropped.
pub(super) enum EvictLock {
    Held(Arc<DiskCache>, Option<OwnedFd>),
    /// Another process holds it.
    Busy,
    /// The file system has no locks (some Lustre mounts), the lock file
    /// cannot be opened, or the folder does not answer: trimming goes on
    /// unlocked (said once).
    Unavailable,
}

impl EvictLock {
    pub(super) fn take(cache: &Arc<DiskCache>) -> EvictLock {
        let c = cache.clone();
        let taken = cache.folder.run_blocking("take the trim lock", move || {
            use std::os::unix::io::AsRawFd;
            let flags = OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
            // Read-write where we may (NFS emulates flock with fcntl
            // locks, which need a descriptor open for writing); read-only
            // otherwise (a group member of a cache someone else created).
            let mode = Mode::from_bits_truncate(c.file_mode);
            let f = openat(
                &c.root,
                ".evict.lock",
                OFlag::O_RDWR | OFlag::O_CREAT | flags,
                mode,
            )
            .inspect(|f| {
                // The umask may have taken the group bits away.
                let _ = fchmod(f, mode);
            })
            .or_else(|_| {
                openat(
                    &c.root,
                    ".evict.lock",
                    OFlag::O_RDONLY | flags,
                    Mode::empty(),
                )
            })
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot open {}: {e}",
                    c.dir.join(".evict.lock").display()
                ))
            })?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(f));
            }
            match std::io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
                e => Err(e),
            }
        });
        match taken {
            Ok(Some(f)) => EvictLock::Held(cache.clone(), Some(f)),
            Ok(None) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    warn!(
                        lock = %cache.dir.join(".evict.lock").display(),
                        "another process holds the cache folder's trim lock; a folder over its \
                         bound is trimmed anyway (said once)"
                    );
                });
                EvictLock::Busy
            }
            Err(e) => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    warn!(reason = %e, "disk cache: no eviction lock; mounts sharing the folder may trim it at the same time");
                });
                EvictLock::Unavailable
            }
        }
    }

    pub(super) fn is_busy(&self) -> bool {
        matches!(self, EvictLock::Busy)
    }
}

impl Drop for EvictLock {
    fn drop(&mut self) {
        if let EvictLock::Held(cache, f) = self {
            if let Some(f) = f.take() {
                // Closing releases the lock; through the folder, as every
                // call into it. Refused (the folder does not answer), the
                // descriptor is closed here, on the trimming thread.
                let _ = cache
                    .folder
                    .spawn_cleanup("release the trim lock", move || drop(f));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::cache::disk::header_len;
    use crate::read::cache::test_keys::STALL;
    use crate::read::cache::test_keys::{disk, long_key};
    use std::path::Path;

    fn shared_cache(dir: &Path) -> Arc<DiskCache> {
        DiskCache::open(
            &crate::read::DiskConfig {
                shared: true,
                ..disk(dir, 1 << 30)
            },
            STALL,
        )
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
        c.settle();
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
    fn a_claim_left_empty_by_a_killed_claimant_is_taken_over_in_seconds() {
        // Found by a user: a prefetch killed between making a claim and
        // writing its line cost the next run 15 s (the claim was fresh by
        // its mtime for 30 s, and waiting gives up after half the request
        // timeout).
        let d = tempfile::tempdir().unwrap();
        let c = shared_cache(d.path());
        let k = long_key(6);
        c.get(&k, 1);
        let claim = c
            .path(&k)
            .with_file_name(format!(".claim-{}", DiskCache::name(&k)));
        fs::File::create(&claim).unwrap();
        assert!(matches!(c.claim(&k, 4096, later()), Claim::Theirs { .. }));
        std::thread::sleep(EMPTY_CLAIM_GRACE + std::time::Duration::from_millis(100));
        // Its mtime is still fresh: only our own clock says it is stale.
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
        c.settle();
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
