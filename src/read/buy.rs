//! Rent or buy, per object version.
//!
//! A reader that makes chains of dependent reads (sqlite's index and table
//! pages, HDF5's B-tree nodes) pays a round trip for each: *rent*. Fetching
//! the rest of the file with parallel ranged GETs, as `prefetch` does, is
//! *buying*: it costs what that transfer takes at the pace the mount has
//! measured. The rule is the ski-rental one: the time a version's readers
//! have waited on round trips read-ahead did not cover is added up, and
//! once it reaches the price of the rest of the file, the rest is bought.
//! It is never worse than twice the better choice made in hindsight: a
//! file of a few MiB read by dependent seeks is bought after a few round
//! trips, a 10 GiB file read for one slice never.
//!
//! What a file's format says its readers do counts too: an SQLite
//! database (its first bytes say so) is read by B-tree descents, page by
//! dependent page, with no locality to read ahead on, so the rent its
//! readers are about to pay ([`SQLITE_EXPECTED_TRIPS`] round trips) is
//! counted from its first read. A database of a few hundred MiB is then
//! bought at once, as "download first" would; one of many GiB still only
//! once its readers have paid for it.
//!
//! A buy goes on beside the readers: its parts start from where they read
//! and go outward, and a block they ask for that the buy has not reached
//! is fetched for them at once, as ever. Bought blocks land in the disk
//! cache (and leave memory first); without one, only a file that fits in
//! half the memory cache is bought, so resident memory stays bounded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tracing::{debug, info_span, Instrument};

use super::cache::ObjectId;
use super::fetch::Why;
use super::inflight::wait_for;
use super::pattern::OpenFile;
use super::{lock, Reader, MIB};
use crate::retry::Deadline;

/// Parallel ranged GETs of a buy: enough to fill a link ten streams wide
/// (S3 gives each response 50-100 MiB/s). Measured on the WAN profile
/// (sqlite's indexed query, 96 MiB): 8 GETs of 4 MiB 0.62 s, 16 of
/// 2 MiB 0.58 s, 32 of 1 MiB 0.66 s.
const BUY_STREAMS: u64 = 16;
/// Buys running at once in this process (a series' next files are bought
/// side by side, a few MiB each)...
static BUYS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(8);
/// ...and their parts on their way, all buys together: [`BUY_STREAMS`] x
/// [`BUY_PART`] (32 MiB) of memory at most, and never the whole link
/// taken from readers.
static BUY_PARTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(BUY_STREAMS as usize);

/// Bytes of one GET of a buy: small enough that a block a reader waits for
/// in the middle of one comes soon.
const BUY_PART: u64 = 2 * MIB;

/// The round trips an SQLite query is expected to wait on, counted as rent
/// from a database's first read: an indexed query descends the index's
/// B-tree and then the table's for each row it finds, three or four
/// dependent pages each (the bench's `WHERE station = ?` waits on about
/// 60).
pub(super) const SQLITE_EXPECTED_TRIPS: u32 = 16;

/// The longest round trip [`SQLITE_EXPECTED_TRIPS`] are counted at:
/// with 16 of them, a prior worth at most 1.6 s of rent, a database of
/// about 800 MiB at 500 MiB/s.
const PRIOR_TRIP_MOST: Duration = Duration::from_millis(100);

/// The first 16 bytes of every SQLite 3 database (its file format,
/// section 1.3.1: "The header string").
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// What the mount knows of one object version across its open handles.
pub(super) struct Version {
    /// Time its readers waited on round trips read-ahead did not cover:
    /// wall time during which at least one of them waited (readers waiting
    /// at once, as pyarrow's threads do, pay it once).
    rent_ns: AtomicU64,
    /// The first wait was paid: it is not rent (buying the file would have
    /// waited that round trip too).
    first_paid: std::sync::atomic::AtomicBool,
    /// Rent its readers are expected to pay, by what its format says they
    /// do (see [`Reader::format_prior`]); counted as paid.
    expected_ns: AtomicU64,
    /// Readers waiting now, and since when the first of them has.
    waiting: Mutex<(usize, Option<Instant>)>,
    /// [`RENTING`], [`BUYING`] or [`BOUGHT`].
    state: AtomicU8,
    /// Its readers' first second, for the next open (see `hints.rs`).
    pub(super) first: Arc<super::hints::FirstSecond>,
}

/// A read of a version waiting on a round trip (see [`Version::wait`]).
pub(super) struct Waiting(Arc<Version>);

impl Version {
    /// A read starts waiting on a round trip read-ahead did not cover; its
    /// rent is counted until the returned guard goes.
    pub(super) fn wait(self: &Arc<Self>) -> Waiting {
        let mut w = lock(&self.waiting);
        if w.0 == 0 {
            w.1 = Some(Instant::now());
        }
        w.0 += 1;
        Waiting(self.clone())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let v = &self.0;
        let mut w = lock(&v.waiting);
        w.0 -= 1;
        if w.0 == 0 {
            if let Some(since) = w.1.take() {
                if v.first_paid.swap(true, Ordering::Relaxed) {
                    v.rent_ns
                        .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

const RENTING: u8 = 0;
const BUYING: u8 = 1;
const BOUGHT: u8 = 2;

/// The versions open now (held by their handles: one that no handle holds
/// any more goes, and with it what its readers paid).
/// Beside them, each version's first second of reads (see `hints.rs`),
/// which outlives its handles until that second is over: a reader that
/// closes a file and opens it again at once (xarray does) goes on
/// recording in the same one.
#[derive(Default)]
pub(super) struct Versions(
    Mutex<HashMap<Arc<ObjectId>, Weak<Version>>>,
    Mutex<HashMap<Arc<ObjectId>, Weak<super::hints::FirstSecond>>>,
);

impl Versions {
    /// The state of `id`, shared by every handle open on it.
    pub(super) fn get(&self, id: &Arc<ObjectId>) -> Arc<Version> {
        let mut map = lock(&self.0);
        if let Some(v) = map.get(id).and_then(Weak::upgrade) {
            return v;
        }
        if map.len() > 1024 {
            map.retain(|_, v| v.strong_count() > 0);
        }
        let first = {
            let mut firsts = lock(&self.1);
            match firsts.get(id).and_then(Weak::upgrade) {
                Some(f) => f,
                None => {
                    if firsts.len() > 1024 {
                        firsts.retain(|_, f| f.strong_count() > 0);
                    }
                    let f = Arc::new(super::hints::FirstSecond::default());
                    firsts.insert(id.clone(), Arc::downgrade(&f));
                    f
                }
            }
        };
        let v = Arc::new(Version {
            rent_ns: AtomicU64::new(0),
            first_paid: Default::default(),
            expected_ns: AtomicU64::new(0),
            waiting: Mutex::new((0, None)),
            state: AtomicU8::new(RENTING),
            first,
        });
        map.insert(id.clone(), Arc::downgrade(&v));
        v
    }
}

/// What the mount has measured of S3: the time to a GET's first byte and
/// the pace of one response stream (moving averages), and the most bytes
/// a second all responses together brought (over windows of
/// [`LINK_WINDOW`]). Before anything is measured: 30 ms, 50 MiB/s, and a
/// link of eight streams.
pub(super) struct Pace {
    first_byte_us: AtomicU64,
    stream_bps: AtomicU64,
    /// The fastest the link has been seen to go (0: not yet).
    link_bps: AtomicU64,
    /// The window being counted: its start (ms since `born`) and bytes.
    window_ms: AtomicU64,
    window_bytes: AtomicU64,
    born: Instant,
    /// A first byte has been measured (until then the defaults above are
    /// a guess, and no GET is split on their word).
    measured: std::sync::atomic::AtomicBool,
}

/// The shortest transfer (at one stream's pace) worth splitting into
/// parts: below it the parts' own requests cost more than they save.
const SPLIT_FROM: Duration = Duration::from_millis(4);

/// How long a window of the link's pace is.
const LINK_WINDOW: Duration = Duration::from_millis(200);

impl Default for Pace {
    fn default() -> Self {
        Self {
            first_byte_us: AtomicU64::new(30_000),
            stream_bps: AtomicU64::new(50 * MIB),
            link_bps: AtomicU64::new(0),
            window_ms: AtomicU64::new(0),
            window_bytes: AtomicU64::new(0),
            born: Instant::now(),
            measured: Default::default(),
        }
    }
}

/// Moves `avg` a quarter of the way to `sample`; the first sample
/// (`first`) replaces the default outright.
fn ewma_from(avg: &AtomicU64, sample: u64, first: bool) {
    if first {
        avg.store(sample, Ordering::Relaxed);
    } else {
        ewma(avg, sample);
    }
}

/// Moves `avg` a quarter of the way to `sample`.
fn ewma(avg: &AtomicU64, sample: u64) {
    let old = avg.load(Ordering::Relaxed);
    avg.store(old - old / 4 + sample / 4, Ordering::Relaxed);
}

impl Pace {
    /// A GET of `bytes` answered its first piece of `first` bytes after
    /// `to_first` and ended after `total`.
    pub(super) fn record(&self, bytes: u64, first: u64, to_first: Duration, total: Duration) {
        let streamed = total.saturating_sub(to_first);
        if bytes > first && bytes - first >= MIB && !streamed.is_zero() {
            let bps = ((bytes - first) as f64 / streamed.as_secs_f64()) as u64;
            ewma(&self.stream_bps, bps);
        }
        // The first piece's own transfer is not the wait for it.
        let pace = self.stream_bps.load(Ordering::Relaxed).max(1);
        let transfer = Duration::from_secs_f64(first as f64 / pace as f64);
        ewma_from(
            &self.first_byte_us,
            to_first.saturating_sub(transfer).as_micros() as u64,
            !self.measured.swap(true, Ordering::Relaxed),
        );
    }

    /// `n` bytes of some response landed now: the link's pace.
    pub(super) fn landed(&self, n: u64) {
        let now = self.born.elapsed().as_millis() as u64;
        let start = self.window_ms.load(Ordering::Relaxed);
        let bytes = self.window_bytes.fetch_add(n, Ordering::Relaxed) + n;
        let span = now.saturating_sub(start);
        if span < LINK_WINDOW.as_millis() as u64 {
            return;
        }
        // One caller closes the window; the others go on counting in the
        // next.
        if self
            .window_ms
            .compare_exchange(start, now, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.window_bytes.fetch_sub(bytes, Ordering::Relaxed);
            // A window that spans idle time (more than two windows long),
            // or that carried less than one stream, says the link was idle,
            // not slow.
            let bps = bytes * 1000 / span.max(1);
            let busy = span <= 2 * LINK_WINDOW.as_millis() as u64;
            if busy && bps >= self.stream_bps.load(Ordering::Relaxed) {
                self.link_bps.fetch_max(bps, Ordering::Relaxed);
            }
        }
    }

    /// In how many parts (1 to 4, each at least 128 KiB) a GET of `bytes`
    /// a reader waits for comes soonest: parts side by side until each
    /// part's transfer at one stream's pace is about a quarter of the time
    /// to the first byte, no more (each part is a request, and waits its
    /// own first byte). Over the WAN profile (20 ms, 50 MiB/s a stream) a
    /// 1 MiB block comes in 4 parts, 25 ms instead of 40.
    /// Not before S3's first byte is measured, nor where the whole
    /// transfer is under [`SPLIT_FROM`] (a local or in-memory store).
    pub(super) fn parts(&self, bytes: u64) -> u64 {
        let stream = self.stream_bps.load(Ordering::Relaxed).max(1);
        let transfer_us = bytes.saturating_mul(1_000_000) / stream;
        if !self.measured.load(Ordering::Relaxed) || transfer_us < SPLIT_FROM.as_micros() as u64 {
            return 1;
        }
        let quarter_us = (self.first_byte_us.load(Ordering::Relaxed) / 4).max(1);
        transfer_us
            .div_ceil(quarter_us)
            .clamp(1, 4)
            .min((bytes / (128 << 10)).max(1))
    }

    /// A small GET (its transfer negligible) answered after `took`.
    pub(super) fn record_small(&self, took: Duration) {
        ewma_from(
            &self.first_byte_us,
            took.as_micros() as u64,
            !self.measured.swap(true, Ordering::Relaxed),
        );
    }

    /// S3's time to a first byte: a moving average of what was measured
    /// (a guess of 30 ms before any GET).
    pub(super) fn round_trip(&self) -> Duration {
        Duration::from_micros(self.first_byte_us.load(Ordering::Relaxed))
    }

    /// What fetching `bytes` with the parallel GETs of a buy takes: as
    /// many streams as a buy runs, no faster than the link was seen to go
    /// (eight streams' worth until it has been seen).
    pub(super) fn price(&self, bytes: u64) -> Duration {
        let stream = self.stream_bps.load(Ordering::Relaxed).max(1);
        let link = match self.link_bps.load(Ordering::Relaxed) {
            0 => 8 * stream,
            l => l,
        };
        let bps = (stream * BUY_STREAMS).min(link.max(stream));
        Duration::from_micros(self.first_byte_us.load(Ordering::Relaxed))
            + Duration::from_secs_f64(bytes as f64 / bps as f64)
    }
}

impl Reader {
    /// Whether a file of `size` bytes may be bought: where its blocks can
    /// be kept (the disk cache, with room under its bound; else half the
    /// memory cache).
    /// A disk cache past its free-space floor, or not answering, keeps
    /// nothing: buying would fetch the file only to let it go.
    fn may_buy(&self, size: u64) -> bool {
        match &self.disk {
            Some(d) => size <= d.limit() / 2 && d.keeps_blocks(),
            None => size <= self.cfg.memory_cache / 2,
        }
    }

    /// A read of `f` at byte `at` that waited on a round trip read-ahead
    /// did not cover has ended (its rent counted by its [`Waiting`]):
    /// starts buying the rest of the file once the rent paid reaches the
    /// price (see the module docs).
    pub(super) fn rented(self: &Arc<Self>, f: &OpenFile, at: u64) {
        let v = &f.version;
        let rent = v.rent_ns.load(Ordering::Relaxed) + v.expected_ns.load(Ordering::Relaxed);
        if v.state.load(Ordering::Relaxed) != RENTING {
            return;
        }
        let size = f.size();
        let price = self.pace.price(size);
        if Duration::from_nanos(rent) < price || !self.may_buy(size) {
            return;
        }
        debug!(
            key = %f.file.meta.key,
            size,
            rent = ?Duration::from_nanos(rent),
            ?price,
            "buying the rest of the file"
        );
        self.start_buy(f, at);
    }

    /// `f`'s first bytes (`head`, from byte 0) have been read: if they
    /// say its readers will wait on many dependent round trips (an SQLite
    /// database), that rent counts as paid already, and the rule may buy
    /// the file at once.
    pub(super) fn format_prior(self: &Arc<Self>, f: &OpenFile, head: &[u8]) {
        if !head.starts_with(SQLITE_MAGIC) {
            return;
        }
        // A slow moment (S3 throttling, a congested link) must not make
        // one `.schema` buy gigabytes: a round trip counts for at most
        // PRIOR_TRIP_MOST.
        let trip = self.pace.round_trip().min(PRIOR_TRIP_MOST);
        let expected = trip * SQLITE_EXPECTED_TRIPS;
        if f.version
            .expected_ns
            .fetch_max(expected.as_nanos() as u64, Ordering::Relaxed)
            == 0
        {
            debug!(key = %f.file.meta.key, ?expected, "an SQLite database: its readers' rent expected");
        }
        self.rented(f, 0);
    }

    /// Buys the rest of `f` from byte `at` outward, unless it is bought or
    /// being bought (or cannot be kept: see `may_buy`). Earlier readers'
    /// record (see `hints.rs`) says so for the next open.
    pub(super) fn start_buy(self: &Arc<Self>, f: &OpenFile, at: u64) {
        let v = &f.version;
        if !self.may_buy(f.size()) {
            return;
        }
        if v.state
            .compare_exchange(RENTING, BUYING, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        v.first.bought();
        self.stats.buys.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let file = self.open(f.file.clone());
        let version = v.clone();
        let span = info_span!("buy", key = %f.file.meta.key, size = f.size());
        tokio::spawn(
            async move {
                let _one_of_few = BUYS.acquire().await;
                if !me.buy(&file, at).await {
                    // Parts failed: still renting (a later wait may buy
                    // again, for the blocks still missing).
                    version.state.store(RENTING, Ordering::Release);
                    return;
                }
                version.state.store(BOUGHT, Ordering::Release);
                // For the next opens: the kernel reads it from disk.
                let whole = me.whole_files.load(Ordering::Relaxed);
                if let Some(disk) = me.disk.as_ref().filter(|_| whole) {
                    // A block the folder lacks (a write dropped while it was
                    // busy) from memory; not there either: not kept whole.
                    let (r, id) = (me.clone(), file.id.clone());
                    let fill = move |index: u64, _len: u64| {
                        r.mem.get(&super::cache::BlockKey {
                            object: id.clone(),
                            index,
                        })
                    };
                    disk.keep_whole(file.id.clone(), file.size(), me.cfg.block_size, fill);
                }
            }
            .instrument(span),
        );
    }

    /// The runs (first, last) of blocks `i..=j` of `f` a buy must fetch:
    /// those not kept in the disk cache already (one `stat` each: a block
    /// there is not read back only to be let go, which in a job array's
    /// folder, where the other nodes fetched most of the file, doubled
    /// the reads of every block). The memory cache and fetches on their
    /// way are the fetch's own business.
    async fn not_kept(&self, f: &OpenFile, i: u64, j: u64, deadline: Deadline) -> Vec<(u64, u64)> {
        let Some(disk) = &self.disk else {
            return vec![(i, j)];
        };
        let blocks: Vec<_> = (i..=j)
            .map(|b| (self.key(f, b), self.block_len(f, b)))
            .collect();
        let kept = disk.kept(blocks, self.disk_deadline(deadline)).await;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (b, kept) in (i..=j).zip(kept) {
            if kept {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.1 + 1 == b => run.1 = b,
                _ => runs.push((b, b)),
            }
        }
        runs
    }

    /// Fetches every block of `f` not kept yet, in parts of [`BUY_PART`],
    /// [`BUY_STREAMS`] at a time, starting at the part of byte `at` and
    /// going outward. Whether every part came.
    async fn buy(self: &Arc<Self>, f: &OpenFile, at: u64) -> bool {
        let started = Instant::now();
        let bs = self.cfg.block_size;
        let blocks = f.size().div_ceil(bs);
        let per_part = (BUY_PART / bs).max(1);
        let parts = blocks.div_ceil(per_part);
        let here = (at / bs / per_part).min(parts.saturating_sub(1));
        // Outward from the reader: here, here+1, here-1, here+2, ...
        let mut order = Vec::with_capacity(parts as usize);
        for d in 0..parts {
            if here + d < parts {
                order.push(here + d);
            }
            if d > 0 && d <= here {
                order.push(here - d);
            }
        }
        let to_disk = self.disk.is_some();
        let order = futures::stream::iter(order)
            .map(|p| {
                let (i, j) = (p * per_part, ((p + 1) * per_part).min(blocks) - 1);
                async move {
                    let _part = BUY_PARTS.acquire().await;
                    let deadline = Deadline::after(self.cfg.request_timeout);
                    // Kept on disk: they leave memory first once they land.
                    let why = if to_disk { Why::Buy } else { Why::Ahead };
                    let mut ok = true;
                    for (a, b) in self.not_kept(f, i, j, deadline).await {
                        for (_, w) in self.start_fetch(f, a, b, deadline, None, why) {
                            ok &= wait_for(w, deadline).await.is_ok();
                        }
                    }
                    ok
                }
            })
            .buffer_unordered(BUY_STREAMS as usize)
            .collect::<Vec<bool>>()
            .await;
        let ok = order.iter().all(|&b| b);
        debug!(took = ?started.elapsed(), ok, "bought");
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_only_where_a_streams_transfer_costs_a_round_trip() {
        let p = Pace::default();
        // Nothing measured: the defaults are a guess, no GET is split.
        assert_eq!(p.parts(MIB), 1);
        // The WAN profile: 20 ms to the first byte, 50 MiB/s a stream.
        p.record_small(Duration::from_millis(20));
        assert_eq!(p.parts(MIB), 4);
        // Smaller ranges: parts of about a quarter round trip's transfer,
        // at least 128 KiB each.
        assert_eq!(p.parts(512 * 1024), 2);
        assert_eq!(p.parts(256 * 1024), 1);
        assert_eq!(p.parts(64 * 1024), 1);
        // A fast local store: a block's transfer is under SPLIT_FROM.
        let fast = Pace::default();
        fast.record_small(Duration::from_micros(50));
        fast.record(
            8 * MIB,
            64 * 1024,
            Duration::from_micros(60),
            Duration::from_millis(4),
        );
        assert_eq!(fast.parts(MIB), 1);
    }

    #[test]
    fn the_price_is_a_round_trip_and_the_size_over_the_buys_streams() {
        let p = Pace::default();
        p.record_small(Duration::from_millis(20));
        // 96 MiB over 16 streams of 50 MiB/s, the link not yet seen: 8
        // streams' worth (400 MiB/s): 20 ms + 240 ms.
        let price = p.price(96 * MIB);
        assert!(
            price >= Duration::from_millis(250) && price <= Duration::from_millis(270),
            "{price:?}"
        );
    }

    #[test]
    fn the_first_wait_is_not_rent_and_overlapping_waits_count_once() {
        let v = Arc::new(Version {
            rent_ns: AtomicU64::new(0),
            first_paid: Default::default(),
            expected_ns: AtomicU64::new(0),
            waiting: Mutex::new((0, None)),
            state: AtomicU8::new(RENTING),
            first: Default::default(),
        });
        drop(v.wait());
        assert_eq!(v.rent_ns.load(Ordering::Relaxed), 0, "the first wait");
        let (a, b) = (v.wait(), v.wait());
        std::thread::sleep(Duration::from_millis(20));
        drop(a);
        std::thread::sleep(Duration::from_millis(20));
        drop(b);
        let rent = Duration::from_nanos(v.rent_ns.load(Ordering::Relaxed));
        // One span of 40 ms, not 20 + 40.
        assert!(
            rent >= Duration::from_millis(40) && rent < Duration::from_millis(55),
            "{rent:?}"
        );
    }
}
