//! Names recently found missing: a bounded cache, so made-up names (a
//! shell's completion, `.git` probes, typos) cost one request each per
//! metadata TTL and leave at most [`CAPACITY`] entries behind.
//!
//! Each entry remembers when the request that found the name missing
//! started (a stamp, see [`super::Tree`]), so an older answer still on
//! its way (a listing page fetched before) cannot bring the name back.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use lru::LruCache;

/// Most names remembered; the least recently used go first.
pub const CAPACITY: usize = 16_384;

pub struct NegativeCache {
    ttl: Duration,
    names: LruCache<(u64, Box<str>), (Instant, u64)>,
}

impl NegativeCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            names: LruCache::new(NonZeroUsize::new(CAPACITY).unwrap_or(NonZeroUsize::MIN)),
        }
    }

    fn key(parent: u64, name: &str) -> (u64, Box<str>) {
        (parent, name.into())
    }

    /// `name` in `parent` was found missing by a request started at `stamp`.
    pub fn insert(&mut self, parent: u64, name: &str, stamp: u64) {
        self.names
            .put(Self::key(parent, name), (Instant::now(), stamp));
    }

    /// Whether `name` is known missing (within the TTL).
    pub fn contains(&mut self, parent: u64, name: &str) -> bool {
        let key = Self::key(parent, name);
        match self.names.get(&key) {
            Some((at, _)) if at.elapsed() < self.ttl => true,
            Some(_) => {
                self.names.pop(&key);
                false
            }
            None => false,
        }
    }

    /// Whether a request started after `stamp` found `name` missing: what
    /// a request started at `stamp` says of it is out of date.
    pub fn newer_than(&self, parent: u64, name: &str, stamp: u64) -> bool {
        self.names
            .peek(&Self::key(parent, name))
            .is_some_and(|(_, s)| *s > stamp)
    }

    /// `name` exists after all (a newer request found it).
    pub fn remove(&mut self, parent: u64, name: &str) {
        self.names.pop(&Self::key(parent, name));
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_ordered_by_stamp() {
        let mut n = NegativeCache::new(Duration::from_secs(60));
        for i in 0..(CAPACITY + 100) {
            n.insert(1, &format!("x{i}"), i as u64);
        }
        assert_eq!(n.len(), CAPACITY);
        assert!(!n.contains(1, "x0"), "oldest names go first");
        assert!(n.contains(1, &format!("x{}", CAPACITY + 99)));
        n.insert(2, "gone", 10);
        assert!(n.newer_than(2, "gone", 9));
        assert!(!n.newer_than(2, "gone", 10));
        n.remove(2, "gone");
        assert!(!n.contains(2, "gone"));
    }

    #[test]
    fn entries_expire() {
        let mut n = NegativeCache::new(Duration::ZERO);
        n.insert(1, "a", 1);
        assert!(!n.contains(1, "a"));
        assert_eq!(n.len(), 0);
    }
}
