//! Buffers for blocks read from the disk cache, used again rather than
//! given back to the system: a fresh 1 MiB buffer costs 256 page faults
//! and the zeroing of its pages as the read fills it, and its free a
//! `madvise` and a TLB flush (jemalloc returns freed pages at once, see
//! `main.rs`). Measured reading 512 MiB of blocks on a fresh mount: about
//! a fifth of the daemon's CPU. A block read from disk lives in the memory
//! cache until evicted; its buffer comes back here when the last `Bytes`
//! of it goes, and the next block read takes it. (S3's GET pieces have a
//! pool of their own, `s3/pieces.rs`, of exact sizes: a piece's capacity
//! is where it ends. Both keep only block-sized buffers.)

use std::sync::Mutex;

use bytes::Bytes;

/// Buffers kept for reuse at most: 8 of about a block each (8 MiB of
/// resident memory at the default 1 MiB), enough for a sequential reader's
/// blocks streaming through the memory cache.
const KEPT: usize = 8;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer of at least `cap` bytes' capacity: a kept one if one
/// fits it closely (at most an eighth larger: the memory cache counts a
/// block by its length, so a buffer much larger than its block would be
/// memory it does not see), else a new one.
pub(super) fn take(cap: usize) -> Vec<u8> {
    let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
    match free
        .iter()
        .position(|b| b.capacity() >= cap && b.capacity() <= cap + cap / 8)
    {
        Some(i) => {
            let mut b = free.swap_remove(i);
            b.clear();
            b
        }
        None => Vec::with_capacity(cap),
    }
}

/// `buf` (filled) as `Bytes` whose buffer comes back to [`take`] when the
/// last of them goes.
pub(super) fn share(buf: Vec<u8>) -> Bytes {
    Bytes::from_owner(Kept(buf))
}

struct Kept(Vec<u8>);

impl AsRef<[u8]> for Kept {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        // Only a full block's size (see `block_sized`).
        if !crate::s3::pieces::block_sized(buf.capacity()) {
            return;
        }
        let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < KEPT {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_never_handed_out_while_its_bytes_live_and_comes_back_after() {
        let mut b = take(1 << 20);
        b.extend_from_slice(&[7u8; 1 << 20]);
        let ptr = b.as_ptr();
        let bytes = share(b);
        let part = bytes.slice(10..20);
        drop(bytes);
        // Held by its slice: any buffer handed out now is another one.
        let other = take(1 << 20);
        assert_ne!(other.as_ptr(), ptr);
        assert_eq!(&part[..], &[7u8; 10]);
        drop(part);
        // Back now (unless another test took it in between), empty.
        let again = take(1 << 20);
        assert!(again.is_empty());
        assert!(again.capacity() >= 1 << 20);
        drop((other, again));
        assert!(FREE.lock().unwrap().len() <= KEPT);
    }

    #[test]
    fn only_buffers_of_a_full_blocks_size_are_kept() {
        use crate::s3::pieces::block_sized;
        assert!(block_sized((1 << 20) + 200));
        assert!(block_sized((4 << 20) + 200));
        assert!(!block_sized(300 << 10)); // a file's short last block
        assert!(!block_sized(64 << 20)); // a huge block size
    }
}
