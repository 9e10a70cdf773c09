//! A file's first read: the first bytes a lookup fetched beside its LIST
//! (see [`FirstBytes`]), and a small first read answered by a GET of its
//! own beside its block's, so the first byte costs one round trip.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::cache::{BlockKey, ObjectId};
use super::inflight::{wait_for, FetchError, Pending};
use super::pattern::OpenFile;
use super::{lock, Reader};
use crate::fs::tree::{FileRef, FirstBytes};
use crate::fs::FsError;
use crate::retry::Deadline;
use crate::s3::S3Error;

/// Most first-bytes pieces kept for reads to come (128 KiB each at most).
pub(super) const HEADS_KEPT: usize = 32;

impl FirstBytes for Reader {
    /// Not with a cache folder the user chose: what it holds (a
    /// prefetch's, another node's) must cost no request, and a guess
    /// cannot know it is there. With the user's default cache (nothing
    /// staged there on purpose) or none, a guess is worth its request.
    fn wanted(&self) -> bool {
        self.disk.as_ref().is_none_or(|d| d.is_default())
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

impl Reader {
    /// The first bytes a lookup fetched of `f`'s version, if any (taken:
    /// only a first read uses them).
    pub(super) fn take_head(&self, f: &OpenFile) -> Option<Bytes> {
        let mut heads = lock(&self.heads);
        let i = heads.iter().position(|(id, _)| *id == f.id)?;
        heads.remove(i).map(|(_, b)| b)
    }

    /// A file's first read (`offset..end`, within one block): whichever
    /// answers first of `block` (its block's fetch) and a ranged GET of
    /// just those bytes (only without a disk cache: see `read`).
    pub(super) async fn first_read(
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
}
