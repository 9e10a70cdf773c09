//! Backoff shared by every network layer.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: attempt 1 waits up to 100 ms,
/// doubling to a cap of 3.2 s, so a whole retry budget stays far below the
/// kernel's FUSE request timeout.
pub fn backoff(attempt: u32) -> Duration {
    let cap_ms = 100u64 << attempt.saturating_sub(1).min(5);
    let ms = rand::thread_rng().gen_range(cap_ms / 2..=cap_ms);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    #[test]
    fn backoff_grows_and_is_capped() {
        for a in 1..20 {
            let d = super::backoff(a);
            assert!(d <= std::time::Duration::from_millis(3200));
        }
        assert!(super::backoff(1) <= std::time::Duration::from_millis(100));
    }
}
