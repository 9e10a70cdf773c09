//! Time bounds and backoff shared by every network layer.
//!
//! Every FUSE operation answers within `--request-timeout`; the network
//! work under it carries a [`Deadline`] so that retries, backoff and
//! per-attempt timeouts all fit inside that one bound, instead of each
//! layer adding its own.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// The default bound of one operation (`--request-timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An attempt shorter than this is not worth starting.
const MIN_ATTEMPT: Duration = Duration::from_millis(200);

/// The moment by which an operation must have answered, retries included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(Instant);

impl Deadline {
    /// `d` from now.
    pub fn after(d: Duration) -> Self {
        Self(Instant::now() + d)
    }

    /// Time left (zero once passed).
    pub fn remaining(self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    pub fn expired(self) -> bool {
        self.remaining().is_zero()
    }

    /// The timeout of one attempt: `cap`, or what is left if that is less.
    pub fn attempt(self, cap: Duration) -> Duration {
        self.remaining().min(cap)
    }

    /// Whether waiting `wait` still leaves room for a useful attempt.
    pub fn allows(self, wait: Duration) -> bool {
        self.remaining() > wait + MIN_ATTEMPT
    }

    /// The nearer of the two.
    pub fn min(self, other: Deadline) -> Deadline {
        std::cmp::min(self, other)
    }

    /// `d` earlier (not before now).
    pub fn sooner_by(self, d: Duration) -> Deadline {
        let now = Instant::now();
        Deadline(self.0.checked_sub(d).filter(|t| *t > now).unwrap_or(now))
    }

    /// Runs `f` until it ends or the deadline passes (`None`).
    pub async fn run<F: Future>(self, f: F) -> Option<F::Output> {
        tokio::time::timeout_at(self.0, f).await.ok()
    }
}

/// How long one network attempt may go without progress (no answer, no
/// body bytes) before it is taken for a stall and retried: a third of the
/// request bound (10 s by default), so a stalled connection leaves time
/// for two more attempts.
pub fn stall_timeout(request_timeout: Duration) -> Duration {
    (request_timeout / 3).max(Duration::from_secs(1))
}

/// Exponential backoff with full jitter: attempt 1 waits up to 100 ms,
/// doubling to a cap of 3.2 s. Callers check [`Deadline::allows`] first.
pub fn backoff(attempt: u32) -> Duration {
    let cap_ms = 100u64 << attempt.saturating_sub(1).min(5);
    let ms = rand::thread_rng().gen_range(cap_ms / 2..=cap_ms);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for a in 1..20 {
            assert!(backoff(a) <= Duration::from_millis(3200));
        }
        assert!(backoff(1) <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_bounds_attempts_and_waits() {
        let d = Deadline::after(Duration::from_secs(30));
        assert_eq!(d.attempt(Duration::from_secs(10)), Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(25)).await;
        assert_eq!(d.attempt(Duration::from_secs(10)), Duration::from_secs(5));
        assert!(d.allows(Duration::from_secs(3)));
        assert!(!d.allows(Duration::from_secs(5)));
        let never = std::future::pending::<()>();
        assert!(d.run(never).await.is_none());
        assert!(d.expired());
        assert_eq!(
            stall_timeout(Duration::from_secs(30)),
            Duration::from_secs(10)
        );
    }
}
