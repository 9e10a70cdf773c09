//! Single flight: the blocks being fetched (one fetch however many
//! readers wait for a block), how a fetch's outcome reaches them, and
//! the memory of fetches that failed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::oneshot;

use super::cache::BlockKey;
use super::pattern::OpenFile;
use super::{lock, Reader};
use crate::fs::FsError;
use crate::retry::Deadline;
use crate::s3::S3Error;

/// How long a failed fetch is remembered (see the module docs).
pub(super) const FAILURE_MEMORY: Duration = Duration::from_secs(5);

/// A cloneable failure of a shared block fetch.
#[derive(Clone, Debug)]
pub(super) enum FetchError {
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

pub(super) type Pending = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

/// Where a fetched block is delivered.
pub(super) type Sender = oneshot::Sender<Result<Bytes, FetchError>>;

impl Reader {
    /// The failure of a recent fetch of any of blocks `b0..=b1`, if any.
    pub(super) fn recent_failure(&self, f: &OpenFile, b0: u64, b1: u64) -> Option<FetchError> {
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

    pub(super) fn remember_failure(
        &self,
        f: &OpenFile,
        blocks: std::ops::RangeInclusive<u64>,
        e: &FetchError,
    ) {
        self.note_failures(blocks.map(|i| self.key(f, i)), e);
    }

    /// Remembers that fetching `keys` failed with `e` (not a fetch that
    /// died: its blocks are simply fetched afresh), in a table kept small.
    pub(super) fn note_failures(&self, keys: impl IntoIterator<Item = BlockKey>, e: &FetchError) {
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
    pub(super) fn known(&self, key: &BlockKey) -> Option<Pending> {
        if let Some(b) = self.mem.get(key) {
            return Some(futures::future::ready(Ok(b)).boxed().shared());
        }
        live(lock(&self.inflight).get(key))
    }

    /// Hands a block (or its failure) to everyone waiting for it.
    pub(super) fn deliver(
        &self,
        key: &BlockKey,
        r: Result<Bytes, FetchError>,
        tx: Sender,
        bought: bool,
    ) {
        match &r {
            Ok(b) => {
                if bought {
                    // On disk too: the first to leave memory, never at the
                    // expense of blocks a reader is about to use.
                    self.mem.insert_consumed(key.clone(), b.clone());
                } else {
                    self.mem.insert(key.clone(), b.clone());
                }
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

/// An in-flight entry that can still answer: one whose fetch died (its
/// task stopped, say a reader's follower when the reader jumped away) may
/// linger a moment before its cleanup removes it, and must not be joined,
/// or the reader that retries after `Abandoned` meets it again.
pub(super) fn live(p: Option<&Pending>) -> Option<Pending> {
    p.filter(|p| !matches!(p.peek(), Some(Err(FetchError::Abandoned))))
        .cloned()
}

/// A block's fetch, waited for until `deadline` (then `TimedOut`).
pub(super) async fn wait_for(block: Pending, deadline: Deadline) -> Result<Bytes, FetchError> {
    deadline
        .run(block)
        .await
        .unwrap_or(Err(FetchError::TimedOut))
}

/// Removes a fetch's blocks from the in-flight table when the fetch ends,
/// whichever way: those it did not answer, and only while the entry is
/// still its own (a later fetch of the same block is left alone).
///
/// It holds its fetches weakly: a block delivered early in a long GET is
/// kept alive by its readers and the memory cache, not by this list until
/// the GET ends (memory beyond the cache's budget, a few MiB per GET).
pub(super) struct Unregister(
    pub(super) Arc<Reader>,
    pub(super) Vec<(BlockKey, WeakPending)>,
);

pub(super) type WeakPending =
    futures::future::WeakShared<BoxFuture<'static, Result<Bytes, FetchError>>>;

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
