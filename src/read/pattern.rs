//! The access pattern of one open file and the plan for each of its
//! reads: sequential runs (read-ahead, its window), seeks (exact bytes),
//! and the first read of a handle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::task::AbortHandle;

use super::cache::ObjectId;
use super::{lock, Reader, MIB};
use crate::fs::tree::FileRef;

/// Bytes a run of adjacent reads must cover before read-ahead of our own
/// starts (see [`Reader::plan`]).
pub(super) const SEQUENTIAL_RUN: u64 = 16 * MIB;

/// The longest jump forward that still counts as a reader moving forward
/// (an HDF5 or netCDF chunk row to the next, a GeoTIFF's tiles in order):
/// a few MiB, a few of S3's round trips' worth of transfer.
pub(super) const FOLLOW_GAP: u64 = 4 * MIB;

/// Reads in a row moving forward before the mount follows the reader.
const FOLLOW_AFTER: u32 = 3;

/// Bytes fetched while following a reader never exceed this many times
/// what it asked for in that run.
const FOLLOW_BOUND: u64 = 4;

/// The reads a walk is judged on.
const FOLLOW_RECENT: usize = 6;

/// A walk is followed only if it reads at least 1 in this many of the
/// bytes it passes.
const FOLLOW_DENSITY: u64 = 3;

/// One open file handle and what its reads look like so far.
pub struct OpenFile {
    pub(super) file: FileRef,
    pub(super) id: Arc<ObjectId>,
    /// What every handle of this version shares (its rent, its buy).
    pub(super) version: Arc<super::buy::Version>,
    pub(super) pattern: Mutex<Pattern>,
    pub(super) sequential: Arc<AtomicUsize>,
    /// The GETs following this handle's reader ahead (see
    /// [`Reader::plan`]), stopped when the reader jumps away.
    pub(super) follows: Mutex<Vec<AbortHandle>>,
}

#[derive(Default)]
pub(super) struct Pattern {
    pub(super) reads: u64,
    pub(super) streak: u32,
    /// Where the current run of adjacent reads started.
    pub(super) run_start: u64,
    /// How far read-ahead has been requested.
    pub(super) ahead_to: u64,
    pub(super) last_end: u64,
    pub(super) window: u64,
    pub(super) counted: bool,
    /// The run of reads moving forward by small jumps: where it started,
    /// how many reads, and the last [`FOLLOW_RECENT`] of them (offset,
    /// size): whether to follow is judged on what the reader does now,
    /// not on a sequential start long past (netCDF's first 4 MiB).
    pub(super) fwd_start: u64,
    pub(super) fwd_reads: u32,
    pub(super) fwd_recent: std::collections::VecDeque<(u64, u64)>,
    /// How far ahead of such a reader blocks have been asked for (0: not
    /// following).
    pub(super) follow_to: u64,
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

pub(super) enum Plan {
    /// Fetch the blocks covering the read (and, if `ahead` > end,
    /// read-ahead; `follow`: the reader's next reads, skipping small gaps,
    /// in block-sized GETs that stop when it jumps away).
    Blocks { ahead: u64, follow: bool },
    /// Fetch exactly the requested bytes.
    Exact,
}

impl Reader {
    pub fn open(&self, file: FileRef) -> OpenFile {
        let id = Arc::new(ObjectId::of(&file.dataset.bucket, &file.meta));
        OpenFile {
            version: self.versions.get(&id),
            file,
            id,
            pattern: Mutex::new(Pattern::default()),
            sequential: self.sequential.clone(),
            follows: Mutex::new(Vec::new()),
        }
    }

    /// The largest window one sequential reader may use now: its share of
    /// the memory cache, so that read-ahead a reader has not reached yet is
    /// never evicted to make room (on loopback S3 outruns the reader and
    /// the whole window lands before it is read). On a real network it is
    /// the GETs in flight that make the throughput: the default 48 MiB is
    /// twelve 4 MiB GETs, enough to fill a 500 MiB/s link at 50 MiB/s a
    /// stream.
    pub(super) fn window_cap(&self) -> u64 {
        let readers = self.sequential.load(Ordering::Relaxed).max(1) as u64;
        (self.cfg.memory_cache / readers)
            .min(self.cfg.max_window)
            .max(self.cfg.block_size)
    }

    pub(super) fn plan(&self, f: &OpenFile, offset: u64, end: u64) -> Plan {
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
        // Forward: at most a few MiB past the end of the reads so far, or
        // back within the run (the kernel sends a reader's read-ahead
        // asynchronously, so reads of one run arrive out of order).
        // Within what is being fetched ahead of it is forward too (a jump
        // into the followed range must not stop the GET it needs).
        let forward = !first
            && offset <= (p.last_end + FOLLOW_GAP).max(p.follow_to)
            && (offset + slack >= p.last_end || (p.fwd_reads > 0 && offset >= p.fwd_start));
        if p.fwd_recent.len() >= FOLLOW_RECENT {
            p.fwd_recent.pop_front();
        }
        // Only small reads are a walk's steps: large ones are the kernel's
        // read-ahead (1 MiB requests, several in flight, planned in any
        // order, so a run shows holes that are filled a moment later) or a
        // reader's large read, both the sequential path's business.
        let step = size < bs / 2;
        if forward {
            p.fwd_reads += 1;
            if step {
                p.fwd_recent.push_back((offset, size));
            }
        } else {
            if p.follow_to > 0 {
                // The reader jumped away: what was fetched ahead of it is
                // not going to be read.
                p.follow_to = 0;
                self.stop_following(f);
            }
            p.fwd_start = offset;
            p.fwd_reads = 1;
            p.fwd_recent.clear();
            if step {
                p.fwd_recent.push_back((offset, size));
            }
        }
        p.reads += 1;
        p.streak = if near { p.streak + 1 } else { 0 };
        if !near {
            p.run_start = offset;
        }
        p.last_end = if near || forward {
            p.last_end.max(end)
        } else {
            end
        };
        if first {
            p.window = self.cfg.initial_window;
            return Plan::Blocks {
                ahead: end,
                follow: false,
            };
        }
        if p.streak < 2 {
            p.window = self.cfg.initial_window;
            p.ahead_to = 0;
            if let Some(plan) = self.follow(&mut p, end, f.size()) {
                return plan;
            }
            // A large read (kernel read-ahead of a seek, or of a
            // sequential reader answered out of order) costs about the
            // same block-aligned, and then lands in the cache; a smaller
            // one (an HDF5 chunk, a sqlite page) exactly the bytes asked.
            return if end - offset >= bs / 2 {
                Plan::Blocks {
                    ahead: end,
                    follow: false,
                }
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
            if let Some(plan) = self.follow(&mut p, end, f.size()) {
                return plan;
            }
            // A short run of small reads (three adjacent chunks) costs
            // what it reads; a longer one, or large reads, whole blocks.
            return if end - offset >= bs / 2 || p.streak >= 4 {
                Plan::Blocks {
                    ahead: end,
                    follow: false,
                }
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
        let ahead = if p.ahead_to + part <= end + p.window {
            p.ahead_to = (end + p.window).min(f.size());
            p.ahead_to
        } else {
            end
        };
        Plan::Blocks {
            ahead,
            follow: false,
        }
    }

    /// The plan for a reader that has moved forward by small jumps
    /// [`FOLLOW_AFTER`] reads in a row (HDF5's chunks row after row, a
    /// netCDF variable's chunks, a GeoTIFF's tiles in order), if it is worth
    /// following (see [`Walk::worth_following`]): the blocks ahead of it, half as far as its recent reads
    /// spanned, never so far that S3 brings more than [`FOLLOW_BOUND`]
    /// times what they asked for; fetched as block-sized GETs in parallel (one
    /// response stream is a tenth of the link: one open-ended GET, as rclone
    /// keeps, reaches the next chunk row later than ten small ones).
    fn follow(&self, p: &mut Pattern, end: u64, size: u64) -> Option<Plan> {
        if p.fwd_reads < FOLLOW_AFTER {
            return None;
        }
        let bs = self.cfg.block_size;
        let w = Walk::of(p.fwd_recent.iter().copied())?;
        if !w.worth_following() {
            return None;
        }
        let (span, asked) = (end.max(w.end).saturating_sub(w.from), w.covered);
        // Half as far ahead as the recent reads spanned: the walk may end
        // (or jump) any time, and blocks round what is fetched up.
        let allowed = (FOLLOW_BOUND * asked).saturating_sub(span);
        let window = allowed.min(span / 2).min(self.window_cap());
        if window < bs / 2 {
            return None;
        }
        let ahead = (end + window).min(size);
        let ahead = if p.follow_to + bs / 2 <= ahead {
            tracing::trace!(end, window, span, asked, walk = ?w, "following a reader");
            p.follow_to = ahead;
            ahead
        } else {
            end
        };
        Some(Plan::Blocks {
            ahead,
            follow: true,
        })
    }

    /// Stops the GETs that followed `f`'s reader and have not finished.
    fn stop_following(&self, f: &OpenFile) {
        let mut stopped = 0u64;
        for h in lock(&f.follows).drain(..) {
            if !h.is_finished() {
                h.abort();
                stopped += 1;
            }
        }
        if stopped > 0 {
            tracing::trace!(stopped, "the reader jumped away: following stopped");
            self.stats
                .follows_stopped
                .fetch_add(stopped, Ordering::Relaxed);
        }
    }
}

/// The shape of a reader's recent reads, merged where they touch or
/// overlap (the kernel sends one run's reads out of order).
#[derive(Debug, PartialEq)]
struct Walk {
    from: u64,
    end: u64,
    /// Bytes the reads cover (each counted once).
    covered: u64,
    /// Jumps between the merged pieces.
    gaps: usize,
    median_gap: u64,
    median_piece: u64,
}

impl Walk {
    /// `None` for no reads. Reads are (offset, length) in bytes; pieces
    /// closer than a page count as one.
    fn of(reads: impl Iterator<Item = (u64, u64)>) -> Option<Walk> {
        let mut r: Vec<(u64, u64)> = reads.map(|(o, l)| (o, o + l)).collect();
        r.sort_unstable();
        let mut pieces: Vec<(u64, u64)> = Vec::with_capacity(r.len());
        for (s, e) in r {
            match pieces.last_mut() {
                Some(last) if s <= last.1 + 4096 => last.1 = last.1.max(e),
                _ => pieces.push((s, e)),
            }
        }
        let (from, end) = (pieces.first()?.0, pieces.last()?.1);
        let mut sizes: Vec<u64> = pieces.iter().map(|p| p.1 - p.0).collect();
        let mut gaps: Vec<u64> = pieces.windows(2).map(|w| w[1].0 - w[0].1).collect();
        let covered = sizes.iter().sum();
        Some(Walk {
            from,
            end,
            covered,
            gaps: gaps.len(),
            median_gap: median(&mut gaps),
            median_piece: median(&mut sizes),
        })
    }

    /// A walk that skips (a reader reading all of a run is sequential,
    /// and the kernel's read-ahead and ours serve it), at least twice, and
    /// whose typical jump passes at most twice what it typically reads (so
    /// the blocks it passes cost at most [`FOLLOW_DENSITY`] times what it
    /// asks). Judged on medians: one large run among the recent reads
    /// (netCDF's 4 MiB format check, the kernel's read-ahead of it answered
    /// out of order) says nothing about the scattered reads after it.
    fn worth_following(&self) -> bool {
        self.gaps >= 2 && self.median_gap <= (FOLLOW_DENSITY - 1) * self.median_piece
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worth(reads: &[(u64, u64)]) -> bool {
        Walk::of(reads.iter().copied()).unwrap().worth_following()
    }

    #[test]
    fn a_chunk_row_with_small_gaps_is_worth_following() {
        let row: Vec<_> = (0..6).map(|i| (i * 300_000, 150_000)).collect();
        assert!(worth(&row));
    }

    #[test]
    fn a_run_read_out_of_order_is_not_a_walk() {
        // The kernel's read-ahead of netCDF's 4 MiB format check.
        let run = [(MIB, MIB), (2 * MIB, MIB), (4 * MIB, MIB), (3 * MIB, MIB)];
        let w = Walk::of(run.iter().copied()).unwrap();
        assert_eq!(w.gaps, 0);
        assert_eq!(w.covered, 4 * MIB);
        assert!(!worth(&run));
    }

    #[test]
    fn scattered_metadata_after_a_large_run_is_not_a_walk() {
        // A large run, then small reads megabytes apart: the run makes
        // the bytes read look dense; the medians do not.
        let reads = [
            (4 * MIB, MIB),
            (5 * MIB, MIB),
            (6 * MIB, MIB),
            (7 * MIB, MIB),
            (9 * MIB, 3_000),
            (9 * MIB + 2_900_000, 3_000),
        ];
        assert!(!worth(&reads));
    }

    #[test]
    fn a_walk_with_one_jump_is_not_followed() {
        assert!(!worth(&[
            (0, 100_000),
            (100_000, 100_000),
            (300_000, 100_000)
        ]));
    }
}
