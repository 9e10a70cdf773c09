//! Buffers for the pieces of S3 GET bodies (cache blocks), reused.
//!
//! Every block the mount fetches is one buffer of the block size (1 MiB),
//! allocated as its GET starts and freed when the memory cache lets the
//! block go. Handed back to the allocator, such buffers fragment its heaps
//! (glibc keeps one per thread, and raises its mmap threshold after the
//! first free of a large block): a mount whose live blocks never passed
//! 80 MiB reached 170 MiB resident with 8 readers. Kept here instead, up to
//! [`KEEP`] of them, they are reused already touched (no page faults, no
//! zeroing), so resident memory follows what is live.

use std::sync::Mutex;

use bytes::Bytes;

/// Idle buffers kept for reuse, at most.
const KEEP: usize = 8;

/// Whether a buffer of `capacity` bytes is worth keeping for reuse: about
/// a cache block's size (512 KiB to 4 MiB, and room for a disk block's
/// header). A file's short last piece would otherwise take a place in the
/// pool that no full block ever reuses, and once every place is taken so,
/// no buffer is reused at all; a huge one would hold memory nothing
/// counts. Shared with the disk cache's pool (`read/cache/disk/buffers.rs`).
pub fn block_sized(capacity: usize) -> bool {
    ((512 << 10)..=((4 << 20) + (64 << 10))).contains(&capacity)
}

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A piece being filled: becomes [`Bytes`] with [`Piece::freeze`], and its
/// buffer comes back here when the last `Bytes` of it is dropped.
pub struct Piece(Vec<u8>);

impl Piece {
    /// An empty piece with room for exactly `n` bytes.
    pub fn with_capacity(n: usize) -> Piece {
        let reused = {
            let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
            pool.iter()
                .position(|b| b.capacity() == n)
                .map(|i| pool.swap_remove(i))
        };
        Piece(reused.unwrap_or_else(|| Vec::with_capacity(n)))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes it can still take.
    pub fn room(&self) -> usize {
        self.0.capacity() - self.0.len()
    }

    pub fn extend_from_slice(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b)
    }

    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Piece {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Piece {
    fn drop(&mut self) {
        let mut b = std::mem::take(&mut self.0);
        if !block_sized(b.capacity()) {
            return;
        }
        b.clear();
        let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < KEEP {
            pool.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_piece_is_reused_and_never_shows_old_bytes() {
        // Block-sized: only those are kept (see `block_sized`).
        let mut p = Piece::with_capacity(1 << 20);
        p.extend_from_slice(&[9u8; 1 << 20]);
        let b = p.freeze();
        let addr = b.as_ptr();
        let copy = b.clone();
        drop(b);
        // Still in use through its clone: not reused yet.
        assert_eq!(copy, Bytes::from(vec![9u8; 1 << 20]));
        drop(copy);
        let q = Piece::with_capacity(1 << 20);
        assert!(q.is_empty());
        assert_eq!(q.room(), 1 << 20);
        // Another test may have taken it meanwhile; if it is ours, it is
        // the same memory.
        if q.0.as_ptr() == addr {
            assert_eq!(q.len(), 0);
        }
    }
}
