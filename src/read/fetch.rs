//! Fetching blocks: demand reads (never waiting for the read-ahead
//! budget), read-ahead (only within it), one ranged GET per run of
//! missing blocks, each block handed to its readers as soon as its bytes
//! are in; the disk cache first, and in a shared folder, claims so a
//! block is fetched once across mounts and nodes.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::FutureExt;
use tokio::sync::{oneshot, OwnedSemaphorePermit};
use tokio::task::AbortHandle;
use tracing::{debug, info_span, Instrument};

use super::cache::{BlockKey, Claim, ClaimGuard, DiskCache};
use super::inflight::{FetchError, Pending, Sender, Unregister, WeakPending};
use super::pattern::OpenFile;
use super::{lock, Reader};
use crate::fs::tree::FileRef;
use crate::retry::Deadline;

/// A block this process fetches: its key, length, waiter, and its claim in
/// a shared cache folder (dropped once the block is written).
/// What one fetch carries to each of its GETs: the read-ahead budget it
/// holds (freed a block at a time as blocks land), and whether its blocks
/// are bought (see `buy.rs`).
pub(super) struct Job {
    budget: Mutex<Option<OwnedSemaphorePermit>>,
    bought: bool,
    /// A reader waits (or soon will) for these blocks: a lone block comes
    /// by parallel GETs of its parts where S3's pace says that is sooner
    /// (see [`super::buy::Pace::parts`]).
    urgent: bool,
}

/// Why blocks are fetched: what the fetch may cost and where they go.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Why {
    /// A reader waits for them now.
    Demand,
    /// Read-ahead, a reader followed, an earlier reader's record.
    Ahead,
    /// The rest of a file bought whole (see `buy.rs`): kept on disk.
    Buy,
}

pub(super) type ToFetch = (BlockKey, u64, Sender, Option<ClaimGuard>);

impl Reader {
    /// One wait per block of `b0..=b1`, starting fetches (without waiting
    /// for the read-ahead budget) for those neither cached nor on their way.
    pub(super) fn demand(
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
            for (idx, p) in self.start_fetch(f, i, j, fetch_deadline, permit, Why::Demand) {
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
    /// missing blocks become GETs of at most `part_size` (`follow`: of one
    /// block, each stopped if the reader jumps away, see
    /// [`Reader::plan`]), each only if the read-ahead budget has room.
    /// Where it stops short, the next read tries again from there.
    pub(super) fn read_ahead(
        self: &Arc<Self>,
        f: &OpenFile,
        from_block: u64,
        ahead: u64,
        follow: bool,
    ) {
        let bs = self.cfg.block_size;
        let last = ((ahead - 1) / bs).min(f.size().saturating_sub(1) / bs);
        let per_part = if follow { 1 } else { self.cfg.part_size / bs };
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
                p.follow_to = p.follow_to.min(i * bs);
                return;
            };
            let deadline = Deadline::after(self.cfg.request_timeout);
            let (_, task) = self.spawn_fetch(f, i, j, deadline, Some(permit), Why::Ahead);
            if let (true, Some(task)) = (follow, task) {
                let mut follows = lock(&f.follows);
                if follows.len() >= 64 {
                    follows.retain(|h| !h.is_finished());
                }
                follows.push(task);
            }
            i = j + 1;
        }
    }

    /// Registers blocks `i..=j` as in flight (those not already cached or
    /// on their way) and spawns one fetch for them, for `why` (holding
    /// `permit` of the read-ahead budget, if any). Returns the wait of
    /// each block it registered.
    pub(super) fn start_fetch(
        self: &Arc<Self>,
        f: &OpenFile,
        i: u64,
        j: u64,
        deadline: Deadline,
        permit: Option<OwnedSemaphorePermit>,
        why: Why,
    ) -> Vec<(u64, Pending)> {
        self.spawn_fetch(f, i, j, deadline, permit, why).0
    }

    /// [`Reader::start_fetch`], and the fetch's task if one was
    /// started (to stop it: its blocks are then fetched afresh by whoever
    /// wants them, see [`Unregister`]).
    fn spawn_fetch(
        self: &Arc<Self>,
        f: &OpenFile,
        i: u64,
        j: u64,
        deadline: Deadline,
        permit: Option<OwnedSemaphorePermit>,
        why: Why,
    ) -> (Vec<(u64, Pending)>, Option<AbortHandle>) {
        let mut senders = Vec::new();
        let mut waits = Vec::new();
        {
            let mut inflight = lock(&self.inflight);
            for idx in i..=j {
                let key = self.key(f, idx);
                if let Some(p) = super::inflight::live(inflight.get(&key)) {
                    waits.push((idx, p));
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
            return (waits, None);
        }
        // Within the memory budget while on their way (see `MemoryCache`):
        // released as each lands or fails, or by `Unregister`. Out of the
        // in-flight lock (it may free consumed blocks); no delivery can
        // come before the task below exists.
        self.mem
            .reserve_all(senders.iter().map(|(k, len, _)| (k.clone(), *len)));
        let me = self.clone();
        let file = f.file.clone();
        // A reader in a sequential run is served by read-ahead: its blocks
        // need no parts of their own (see `Job::urgent`).
        let why = match why {
            Why::Demand if lock(&f.pattern).streak >= 2 => Why::Ahead,
            w => w,
        };
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
        let task = tokio::spawn(
            async move {
                let _cleanup = cleanup;
                me.fetch(&file, senders, deadline, permit, why).await;
            }
            .instrument(span),
        );
        (waits, Some(task.abort_handle()))
    }

    pub(super) async fn fetch(
        &self,
        file: &FileRef,
        senders: Vec<(BlockKey, u64, Sender)>,
        deadline: Deadline,
        mut permit: Option<OwnedSemaphorePermit>,
        why: Why,
    ) {
        let (bought, urgent) = (why == Why::Buy, why == Why::Demand);
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
                        self.deliver(&key, Ok(b), tx, bought);
                    }
                }
            }
        }
        let left: Vec<_> = senders.into_iter().flatten().collect();
        // The budget is freed a block at a time as blocks land (see
        // `fetch_run`).
        let job = Job {
            budget: Mutex::new(permit),
            bought,
            urgent,
        };
        let job = &job;
        match &self.disk {
            // A folder shared with other processes (other nodes): claim
            // each block first; what another process is fetching is waited
            // for on disk instead of fetched again.
            Some(disk) if self.shared_disk() => {
                let (mine, theirs) = self.claim_blocks(disk, left, deadline).await;
                futures::future::join(
                    self.fetch_runs(file, mine, deadline, job),
                    self.await_others(file, disk, theirs, deadline, job),
                )
                .await;
            }
            _ => {
                let mine = left.into_iter().map(|(k, l, t)| (k, l, t, None)).collect();
                self.fetch_runs(file, mine, deadline, job).await;
            }
        }
    }

    pub(super) fn shared_disk(&self) -> bool {
        self.cfg.disk.as_ref().is_some_and(|d| d.shared)
    }

    /// Claims `blocks` in the shared folder (on the blocking pool): those
    /// claimed (or unclaimable) are this process's to fetch, the rest
    /// another's.
    pub(super) async fn claim_blocks(
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
    pub(super) async fn await_others(
        &self,
        file: &FileRef,
        disk: &Arc<DiskCache>,
        pending: Vec<(BlockKey, u64, Sender)>,
        deadline: Deadline,
        job: &Job,
    ) {
        let give_up = deadline.sooner_by(self.cfg.request_timeout / 2);
        disk.await_claimed(
            pending,
            deadline,
            give_up,
            |k, tx, b| {
                self.stats.disk_hits.fetch_add(1, Ordering::Relaxed);
                self.deliver(&k, Ok(b), tx, job.bought);
            },
            |ours| self.fetch_runs(file, ours, deadline, job),
        )
        .await;
    }

    /// One GET per contiguous run of `blocks` (they may have gaps: blocks
    /// another reader was already fetching are not ours), each piece
    /// handed to the block of its own index.
    pub(super) async fn fetch_runs(
        &self,
        file: &FileRef,
        blocks: Vec<ToFetch>,
        deadline: Deadline,
        job: &Job,
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
                .map(|run| self.fetch_run(file, run, deadline, job)),
        )
        .await;
    }

    /// One ranged GET for blocks with consecutive indices, each block
    /// handed to its waiters (and its share of the read-ahead budget
    /// freed) as soon as its bytes are in, not when the whole GET ends.
    pub(super) async fn fetch_run(
        &self,
        file: &FileRef,
        run: Vec<ToFetch>,
        deadline: Deadline,
        job: &Job,
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
        // When the first piece came, and its size: the pace of S3 (see
        // `buy.rs`).
        let asked = std::time::Instant::now();
        let first_piece: Mutex<Option<(std::time::Duration, u64)>> = Mutex::new(None);
        let sink = |b: Bytes| {
            lock(&first_piece).get_or_insert((asked.elapsed(), b.len() as u64));
            self.pace.landed(b.len() as u64);
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
            self.deliver(&key, r, tx, job.bought);
            if let Some(p) = lock(&job.budget).as_mut() {
                drop(p.split(1));
            }
        };
        if job.urgent && self.pace.parts(end - start) > 1 {
            // Blocks a reader waits for, each in parts side by side: one
            // stream's transfer of a block costs as much as a round trip
            // over a long link (1 MiB at 50 MiB/s: 20 ms), of four blocks
            // four round trips.
            let run: Vec<ToFetch> = lock(&waiting).by_ref().collect();
            futures::future::join_all(run.into_iter().map(|(key, len, tx, claim)| {
                let from = key.index * bs;
                async move {
                    let got = self.get_in_parts(file, from..from + len, deadline).await;
                    if got.is_ok() {
                        self.pace.landed(len);
                    }
                    let r = match got {
                        Ok(b) if b.len() as u64 == len => {
                            self.keep_on_disk(&key, &b, claim);
                            Ok(b)
                        }
                        Ok(b) => Err(FetchError::Io(format!(
                            "block of {} bytes where {len} were due",
                            b.len()
                        ))),
                        Err(e) => {
                            debug!(error = %e, "block fetch failed");
                            drop(claim);
                            Err(FetchError::from(e))
                        }
                    };
                    self.deliver(&key, r, tx, job.bought);
                    if let Some(p) = lock(&job.budget).as_mut() {
                        drop(p.split(1));
                    }
                }
            }))
            .await;
            return;
        }
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
        if fetched.is_ok() {
            if let Some((to_first, first)) = *lock(&first_piece) {
                self.pace
                    .record(end - start, first, to_first, asked.elapsed());
            }
        }
        self.fail_rest(&waiting, fetched, job);
    }

    /// `range` of `file` in [`super::buy::Pace::parts`] ranged GETs side by
    /// side, put together.
    async fn get_in_parts(
        &self,
        file: &FileRef,
        range: std::ops::Range<u64>,
        deadline: Deadline,
    ) -> Result<Bytes, crate::s3::S3Error> {
        let (start, end) = (range.start, range.end);
        let parts = self.pace.parts(end - start);
        let step = (end - start).div_ceil(parts).max(1);
        let gets = (0..parts).map(|n| {
            let from = (start + n * step).min(end);
            file.dataset.store.get_range(
                &file.meta.key,
                from..(from + step).min(end),
                Some(&file.meta),
                deadline,
            )
        });
        let pieces = futures::future::try_join_all(gets).await?;
        if let [one] = &pieces[..] {
            return Ok(one.clone());
        }
        let mut whole = bytes::BytesMut::with_capacity((end - start) as usize);
        for p in pieces {
            whole.extend_from_slice(&p);
        }
        Ok(whole.freeze())
    }

    /// Answers the blocks of a GET that it did not bring with why.
    fn fail_rest(
        &self,
        waiting: &Mutex<std::vec::IntoIter<ToFetch>>,
        fetched: Result<(), crate::s3::S3Error>,
        job: &Job,
    ) {
        let rest: Vec<ToFetch> = lock(waiting).by_ref().collect();
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
            self.deliver(&key, Err(e.clone()), tx, job.bought);
        }
    }

    /// Writes a fetched block to the disk cache, if there is one, in the
    /// background; its claim (if any) ends as it lands.
    pub(super) fn keep_on_disk(&self, key: &BlockKey, data: &Bytes, claim: Option<ClaimGuard>) {
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

    /// Blocks `b0..=b1` from the disk cache, if every one is there (and
    /// read before `deadline`); then they are in memory too.
    pub(super) async fn read_disk(
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
    pub(super) fn disk_deadline(&self, deadline: Deadline) -> Deadline {
        deadline
            .sooner_by(self.cfg.request_timeout / 2)
            .min(Deadline::after(crate::retry::stall_timeout(
                self.cfg.request_timeout,
            )))
    }
}
