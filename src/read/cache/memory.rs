//! The memory tier of the block cache.

use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;

use super::BlockKey;

/// The memory tier: an LRU of blocks within a byte budget. Blocks on
/// their way count too (reserved when their fetch starts, released as each
/// lands): they make room by evicting blocks readers have consumed (see
/// `demote`), never unread ones, so a sequential reader's read-ahead is
/// not evicted to make room for more of itself. Without that, a mount held
/// the whole budget of consumed blocks plus every block in flight:
/// 8 parallel readers peaked at 130 MiB resident for a 48 MiB budget.
pub struct MemoryCache {
    budget: u64,
    inner: Mutex<MemoryInner>,
}

struct MemoryInner {
    lru: LruCache<BlockKey, Bytes>,
    /// Bytes of the blocks in `lru`.
    used: u64,
    /// Blocks in `lru` that a sequential reader consumed, oldest
    /// consumption first. Room for blocks on their way comes from the
    /// oldest: the block consumed last may still be wanted by the
    /// kernel's other requests for it, which arrive out of order.
    consumed: LruCache<BlockKey, ()>,
    /// Blocks being fetched, and their lengths.
    reserved: std::collections::HashMap<BlockKey, u64>,
    reserved_bytes: u64,
}

impl MemoryInner {
    /// Makes room: consumed blocks (oldest consumed first) while
    /// cached plus reserved bytes exceed `budget`; then any block, never
    /// `keep` (a block just landed), while cached bytes alone exceed it.
    /// Returns the blocks evicted, for the caller to free once the lock
    /// is let go.
    fn evict(&mut self, budget: u64, keep: Option<&BlockKey>) -> Vec<Bytes> {
        let mut out = Vec::new();
        while self.used + self.reserved_bytes > budget {
            // (`keep` is never among them: it landed just now.)
            let Some((k, ())) = self.consumed.pop_lru() else {
                break;
            };
            if let Some(b) = self.lru.pop(&k) {
                self.used -= b.len() as u64;
                out.push(b);
            }
        }
        while self.used > budget {
            if keep.is_some() && self.lru.peek_lru().map(|(k, _)| k) == keep {
                break;
            }
            match self.pop() {
                Some(b) => out.push(b),
                None => break,
            }
        }
        out
    }

    fn pop(&mut self) -> Option<Bytes> {
        let (k, b) = self.lru.pop_lru()?;
        self.used -= b.len() as u64;
        self.consumed.pop(&k);
        Some(b)
    }

    fn unreserve(&mut self, k: &BlockKey) {
        if let Some(n) = self.reserved.remove(k) {
            self.reserved_bytes -= n;
        }
    }
}

impl MemoryCache {
    pub fn new(budget: u64) -> Self {
        Self {
            budget,
            inner: Mutex::new(MemoryInner {
                lru: LruCache::unbounded(),
                used: 0,
                consumed: LruCache::unbounded(),
                reserved: Default::default(),
                reserved_bytes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, k: &BlockKey) -> Option<Bytes> {
        // A consumed block stays marked when read again (the kernel's
        // out-of-order requests for it, a page it lost): unmarked, it could
        // never make room again, and the budget would stop holding.
        self.lock().lru.get(k).cloned()
    }

    pub fn contains(&self, k: &BlockKey) -> bool {
        self.lock().lru.contains(k)
    }

    /// Caches a block; its reservation, if it had one, ends.
    pub fn insert(&self, k: BlockKey, v: Bytes) {
        let mut g = self.lock();
        g.unreserve(&k);
        if self.budget == 0 || v.len() as u64 > self.budget {
            return;
        }
        g.used += v.len() as u64;
        if let Some(old) = g.lru.put(k.clone(), v) {
            g.used -= old.len() as u64;
        }
        g.consumed.pop(&k);
        let evicted = g.evict(self.budget, Some(&k));
        drop(g);
        drop(evicted);
    }

    /// Caches a block already consumed (kept elsewhere: a bought block on
    /// disk): the first to go when room is needed. Its reservation, if it
    /// had one, ends.
    pub fn insert_consumed(&self, k: BlockKey, v: Bytes) {
        let mut g = self.lock();
        g.unreserve(&k);
        if self.budget == 0 || v.len() as u64 > self.budget {
            return;
        }
        g.used += v.len() as u64;
        if let Some(old) = g.lru.put(k.clone(), v) {
            g.used -= old.len() as u64;
        }
        g.lru.demote(&k);
        g.consumed.put(k, ());
        let evicted = g.evict(self.budget, None);
        drop(g);
        drop(evicted);
    }

    /// Blocks (key, length) being fetched: room is made for them now,
    /// from consumed blocks. Never waits, never refuses. The blocks evicted
    /// are freed after the lock is let go.
    pub fn reserve_all(&self, blocks: impl IntoIterator<Item = (BlockKey, u64)>) {
        if self.budget == 0 {
            return;
        }
        let evicted = {
            let mut g = self.lock();
            for (k, len) in blocks {
                if let std::collections::hash_map::Entry::Vacant(e) = g.reserved.entry(k) {
                    e.insert(len);
                    g.reserved_bytes += len;
                }
            }
            g.evict(self.budget, None)
        };
        drop(evicted);
    }

    /// Block `k`'s fetch ended without caching it (failed, abandoned).
    pub fn unreserve(&self, k: &BlockKey) {
        self.lock().unreserve(k);
    }

    /// Marks a block as next to go: consumed by a sequential reader, it
    /// now lives in the kernel's page cache.
    pub fn demote(&self, k: &BlockKey) {
        let mut g = self.lock();
        if g.lru.demote(k) {
            g.consumed.put(k.clone(), ());
        }
    }

    /// Bytes of cached blocks.
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    /// Bytes of blocks being fetched.
    pub fn reserved(&self) -> u64 {
        self.lock().reserved_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read::cache::test_keys::key;

    #[test]
    fn memory_cache_keeps_to_its_budget() {
        let c = MemoryCache::new(10);
        for i in 0..5 {
            c.insert(key(i), Bytes::from(vec![0u8; 4]));
        }
        assert!(c.used() <= 10);
        assert!(c.get(&key(4)).is_some());
        assert!(c.get(&key(0)).is_none());
    }

    /// A cache of 12 bytes holding blocks 0, 1 and 2 (4 bytes each).
    fn full_cache() -> MemoryCache {
        let c = MemoryCache::new(12);
        for i in 0..3 {
            c.insert(key(i), Bytes::from(vec![0u8; 4]));
        }
        c
    }

    #[test]
    fn blocks_on_their_way_count_against_the_budget() {
        let c = full_cache();
        // Block 1 consumed: it goes first when room is needed.
        c.demote(&key(1));
        c.reserve_all([(key(3), 4)]);
        assert_eq!((c.used(), c.reserved()), (8, 4));
        assert!(c.get(&key(1)).is_none() && c.get(&key(0)).is_some());
        // Reserving twice counts once; landing ends the reservation.
        c.reserve_all([(key(3), 4)]);
        c.insert(key(3), Bytes::from(vec![0u8; 4]));
        assert_eq!((c.used(), c.reserved()), (12, 0));
        // A failed fetch gives its room back.
        c.reserve_all([(key(4), 4)]);
        assert_eq!(c.reserved(), 4);
        c.unreserve(&key(4));
        assert_eq!(c.reserved(), 0);
        // Unread blocks never make room for blocks on their way: a
        // reader's read-ahead is not evicted for more of itself.
        for i in 5..8 {
            c.reserve_all([(key(i), 4)]);
        }
        assert_eq!(c.used(), 12, "nothing consumed to evict");
        // Cached blocks alone stay within the budget; the one that just
        // landed is kept.
        c.insert(key(5), Bytes::from(vec![0u8; 4]));
        assert!(c.get(&key(5)).is_some());
        assert_eq!(c.used(), 12);
    }

    #[test]
    fn the_oldest_consumed_block_makes_room_first() {
        let c = full_cache();
        // Consumed in order 0, 1: the kernel may still ask for 1 (its
        // requests for one block arrive out of order), so 0 goes first.
        c.demote(&key(0));
        c.demote(&key(1));
        c.reserve_all([(key(3), 4)]);
        assert!(c.get(&key(0)).is_none());
        assert!(c.get(&key(1)).is_some() && c.get(&key(2)).is_some());
    }
}
