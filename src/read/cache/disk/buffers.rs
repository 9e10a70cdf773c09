//! Buffers for blocks read from the disk cache, used again rather than
//! given back to the system: a fresh 1 MiB buffer costs 256 page faults
//! and the zeroing of its pages as the read fills it, and its free a
//! `madvise` and a TLB flush (jemalloc returns freed pages at once, see
//! `main.rs`). Measured reading 512 MiB of blocks on a fresh mount: about
//! a fifth of the daemon's CPU. A block read from disk lives in the memory
//! cache until evicted; its buffer comes back here when the last `Bytes`
//! of it goes, and the next block read takes it.

use std::sync::Mutex;

use bytes::Bytes;

/// Buffers kept for reuse at most: 8 MiB of resident memory, enough for
/// a sequential reader's blocks streaming through the memory cache.
const KEPT: usize = 8;

static FREE: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer of at least `cap` bytes' capacity: a kept one if one is
/// large enough (and not more than twice as large), else a new one.
pub(super) fn take(cap: usize) -> Vec<u8> {
    let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
    match free
        .iter()
        .position(|b| b.capacity() >= cap && b.capacity() <= 2 * cap.max(4096))
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
    fn a_buffer_comes_back_when_its_last_bytes_go_and_is_used_again() {
        let mut b = take(1 << 20);
        b.extend_from_slice(&[7u8; 1 << 20]);
        let ptr = b.as_ptr();
        let bytes = share(b);
        let part = bytes.slice(10..20);
        drop(bytes);
        // Still held by its slice: not free, and its bytes intact.
        assert_eq!(&part[..], &[7u8; 10]);
        drop(part);
        // Back, and handed out again, empty.
        let again = take(1 << 20);
        assert!(again.is_empty());
        let reused = again.as_ptr() == ptr;
        drop(again);
        // Another test may have taken it in between: only when it was
        // ours again must it be the same memory.
        if reused {
            assert!(FREE.lock().unwrap().len() <= KEPT);
        }
    }
}
