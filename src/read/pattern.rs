//! The access pattern of one open file and the plan for each of its
//! reads: sequential runs (read-ahead, its window), seeks (exact bytes),
//! and the first read of a handle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::cache::ObjectId;
use super::{lock, Reader, MIB};
use crate::fs::tree::FileRef;

/// Bytes a run of adjacent reads must cover before read-ahead of our own
/// starts (see [`Reader::plan`]).
pub(super) const SEQUENTIAL_RUN: u64 = 16 * MIB;

/// One open file handle and what its reads look like so far.
pub struct OpenFile {
    pub(super) file: FileRef,
    pub(super) id: Arc<ObjectId>,
    /// What every handle of this version shares (its rent, its buy).
    pub(super) version: Arc<super::buy::Version>,
    pub(super) pattern: Mutex<Pattern>,
    pub(super) sequential: Arc<AtomicUsize>,
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
    /// Fetch the blocks covering the read (and, if `ahead` > end, read-ahead).
    Blocks { ahead: u64 },
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
}
