//! What readers were refused, told once in words: every error a FUSE
//! operation answers passes here, is counted, and its cause is logged at
//! warn the first time (and again at most once a minute), so the log of a
//! mount explains each `Permission denied` or `Input/output error` a
//! reader saw without repeating it a thousand times.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tracing::{debug, warn};

use super::FsError;

/// The same cause is logged again after this long.
const REPEAT_AFTER: Duration = Duration::from_secs(60);
/// Distinct causes remembered; more clears the memory (a flood of distinct
/// messages is logged, never stored without bound).
const REMEMBERED: usize = 256;

#[derive(Default)]
pub struct ErrorLog {
    count: AtomicU64,
    last: Mutex<Option<(SystemTime, String)>>,
    logged: Mutex<HashMap<String, (Instant, u64)>>,
}

impl ErrorLog {
    /// Records that operation `op` answered `e`.
    pub fn record(&self, op: &str, e: &FsError) {
        match e {
            // Expected answers: a missing name, a reader that gave up, a
            // file replaced since it was opened (the kernel opens it anew).
            FsError::NotFound | FsError::Interrupted | FsError::Stale => {
                debug!(op, error = %e, "failed");
                return;
            }
            _ => {}
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let cause = e.to_string();
        *lock(&self.last) = Some((SystemTime::now(), format!("{op}: {cause}")));
        let mut logged = lock(&self.logged);
        if logged.len() >= REMEMBERED && !logged.contains_key(&cause) {
            logged.clear();
        }
        let now = Instant::now();
        match logged.get_mut(&cause) {
            Some((at, repeats)) if now.duration_since(*at) < REPEAT_AFTER => {
                *repeats += 1;
                debug!(op, error = %e, "failed");
            }
            Some((at, repeats)) => {
                let n = std::mem::take(repeats);
                *at = now;
                warn!(op, "{cause} (and {n} more times since it was last logged)");
            }
            None => {
                logged.insert(cause.clone(), (now, 0));
                warn!(op, "{cause}");
            }
        }
    }

    /// Errors answered so far (not counting missing names, interrupted and
    /// out-of-date reads).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The last error answered, with the operation, and when.
    pub fn last(&self) -> Option<(SystemTime, String)> {
        lock(&self.last).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_real_errors_and_remembers_the_last() {
        let log = ErrorLog::default();
        log.record("lookup", &FsError::NotFound);
        log.record("read", &FsError::Stale);
        assert_eq!(log.count(), 0);
        assert!(log.last().is_none());
        for _ in 0..3 {
            log.record("read", &FsError::Io("S3 answered 500".into()));
        }
        log.record("open", &FsError::PermissionDenied("no".into()));
        assert_eq!(log.count(), 4);
        assert_eq!(log.last().unwrap().1, "open: permission denied: no");
        // Logged once, the repeats counted.
        assert_eq!(lock(&log.logged)["S3 answered 500"].1, 2);
    }
}
