//! Values that expire (access tokens, S3 read credentials), renewed in the
//! background before they do.
//!
//! The rules, for both kinds:
//! - a value is renewed when a third of its life is left (at most five
//!   minutes before it expires), by one background task however many
//!   callers ask, while callers go on using the value in hand;
//! - a value is used until shortly before it expires (a twentieth of its
//!   life, at most 30 s), so a renewal that fails or hangs stops nobody
//!   while it lasts;
//! - no lock is held across the network: the renewal runs as its own task
//!   and callers that need it wait for its result only up to their own
//!   [`Deadline`];
//! - a renewal that failed while the value is still usable is tried again
//!   after a backoff (1 s, doubling to 30 s); one that panics or is dropped
//!   never leaves the next caller waiting forever.
//!
//! Times are [`Instant`]s: a lifetime is measured on this machine's
//! monotonic clock from when the value arrived, so a wrong wall clock
//! neither expires values early nor keeps them too long.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{FutureExt, Shared};
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use crate::retry::Deadline;

/// A value and how long it may be used.
#[derive(Clone, Debug)]
pub struct Lease<T> {
    pub value: T,
    /// Renew from here on.
    renew_at: Instant,
    /// Use no longer than this.
    use_until: Instant,
    /// As given (for sharing it with other processes).
    lifetime: Duration,
}

impl<T> Lease<T> {
    /// A value valid for `lifetime` from now.
    pub fn new(value: T, lifetime: Duration) -> Self {
        let now = Instant::now();
        let early = (lifetime / 3).min(Duration::from_secs(300));
        let margin = (lifetime / 20).min(Duration::from_secs(30));
        Self {
            value,
            renew_at: now + lifetime.saturating_sub(early),
            use_until: now + lifetime.saturating_sub(margin),
            lifetime,
        }
    }

    /// The lifetime it was given.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn usable(&self, now: Instant) -> bool {
        now < self.use_until
    }
}

/// Why [`Renewer::get`] has no value to give.
#[derive(Clone, Debug)]
pub enum Wait<E> {
    /// The renewal failed with this error.
    Failed(E),
    /// The caller's deadline passed first (the renewal goes on).
    TimedOut,
}

type Outcome<T, E> = Result<T, E>;
type Flight<T, E> = Shared<Pin<Box<dyn Future<Output = Outcome<T, E>> + Send>>>;
/// Starts one renewal, given its deadline.
pub type Renew<T, E> = Box<
    dyn Fn(Deadline) -> Pin<Box<dyn Future<Output = Result<Lease<T>, E>> + Send>> + Send + Sync,
>;

struct State<T, E> {
    current: Option<Lease<T>>,
    inflight: Option<Flight<T, E>>,
    failures: u32,
    failed_at: Option<Instant>,
}

/// Keeps one value of kind `T` renewed. See the module docs.
pub struct Renewer<T, E> {
    what: &'static str,
    renew: Renew<T, E>,
    /// Bound of one renewal, all its attempts included.
    bound: Duration,
    /// The error a renewal that died (panicked, was dropped) gives.
    lost: fn() -> E,
    state: Mutex<State<T, E>>,
}

impl<T, E> Renewer<T, E>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + std::fmt::Display + 'static,
{
    pub fn new(what: &'static str, bound: Duration, lost: fn() -> E, renew: Renew<T, E>) -> Self {
        Self {
            what,
            renew,
            bound,
            lost,
            state: Mutex::new(State {
                current: None,
                inflight: None,
                failures: 0,
                failed_at: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T, E>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A usable value: the one in hand (starting a background renewal if
    /// it is due), else the result of a renewal, waited for until
    /// `deadline`.
    pub async fn get(self: &Arc<Self>, deadline: Deadline) -> Result<T, Wait<E>> {
        let flight = {
            let mut st = self.lock();
            let now = Instant::now();
            if let Some(l) = st.current.as_ref().filter(|l| l.usable(now)) {
                let value = l.value.clone();
                let due = now >= l.renew_at;
                if due && st.inflight.is_none() && Self::may_retry(&st, now) {
                    // Runs in the background; nobody waits for it.
                    drop(self.start(&mut st));
                }
                return Ok(value);
            }
            match &st.inflight {
                Some(f) => f.clone(),
                None => self.start(&mut st),
            }
        };
        match deadline.run(flight).await {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(Wait::Failed(e)),
            None => Err(Wait::TimedOut),
        }
    }

    /// After failures, background renewals wait 1 s, 2 s, ... up to 30 s
    /// between tries, so an API that is down is not hammered.
    fn may_retry(st: &State<T, E>, now: Instant) -> bool {
        match st.failed_at {
            None => true,
            Some(at) => {
                let wait =
                    Duration::from_secs(1 << st.failures.min(5)).min(Duration::from_secs(30));
                now >= at + wait
            }
        }
    }

    /// Forgets the value in hand if `is_it` says it is the one a service
    /// just refused; a value already replaced is kept, so many callers
    /// failing with the same old value cause one renewal, not many.
    pub fn invalidate(&self, is_it: impl Fn(&T) -> bool) {
        let mut st = self.lock();
        if st.current.as_ref().is_some_and(|l| is_it(&l.value)) {
            st.current = None;
        }
    }

    /// Whether a usable value is in hand now (no renewal needed to answer).
    pub fn has_usable(&self) -> bool {
        let now = Instant::now();
        self.lock().current.as_ref().is_some_and(|l| l.usable(now))
    }

    /// The value in hand, usable or not (for checks that need no network).
    pub fn peek(&self) -> Option<T> {
        self.lock().current.as_ref().map(|l| l.value.clone())
    }

    fn start(self: &Arc<Self>, st: &mut State<T, E>) -> Flight<T, E> {
        let me = self.clone();
        let work = (self.renew)(Deadline::after(self.bound));
        let span = tracing::info_span!("renew", what = self.what);
        let task = tokio::spawn(
            async move {
                // Should this task die before it ends, the next caller
                // starts afresh instead of finding a renewal that never ends.
                let guard = Unfinished(&me);
                let r = work.await;
                std::mem::forget(guard);
                me.finish(r)
            }
            .instrument(span),
        );
        let lost = self.lost;
        let flight: Flight<T, E> = (Box::pin(task.map(move |r| match r {
            Ok(outcome) => outcome,
            Err(_) => Err(lost()),
        }))
            as Pin<Box<dyn Future<Output = Outcome<T, E>> + Send>>)
            .shared();
        st.inflight = Some(flight.clone());
        flight
    }

    fn finish(&self, r: Result<Lease<T>, E>) -> Outcome<T, E> {
        let mut st = self.lock();
        st.inflight = None;
        match r {
            Ok(lease) => {
                if st.failures > 0 {
                    debug!(what = self.what, "renewed after {} failures", st.failures);
                }
                st.failures = 0;
                st.failed_at = None;
                let value = lease.value.clone();
                st.current = Some(lease);
                Ok(value)
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                st.failed_at = Some(Instant::now());
                let in_hand = st
                    .current
                    .as_ref()
                    .is_some_and(|l| l.usable(Instant::now()));
                if in_hand {
                    warn!(what = self.what, error = %e, "renewal failed; the current one is used meanwhile");
                }
                Err(e)
            }
        }
    }
}

/// Clears a renewal that never finished (its task panicked or was
/// dropped), so the next caller starts a new one.
struct Unfinished<'a, T, E>(&'a Renewer<T, E>);

impl<T, E> Drop for Unfinished<'_, T, E> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        st.inflight = None;
        st.failures = st.failures.saturating_add(1);
        st.failed_at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A renewer whose renewals count themselves and behave as `mode` says:
    /// 0 succeed (value = call number, lifetime 30 s), 1 fail, 2 hang, 3 panic.
    fn renewer(mode: Arc<AtomicU32>, calls: Arc<AtomicU32>) -> Arc<Renewer<u32, String>> {
        Arc::new(Renewer::new(
            "test",
            Duration::from_secs(10),
            || "lost".to_string(),
            Box::new(move |deadline| {
                let (mode, calls) = (mode.clone(), calls.clone());
                Box::pin(async move {
                    let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
                    match mode.load(Ordering::SeqCst) {
                        0 => Ok(Lease::new(n, Duration::from_secs(30))),
                        1 => Err("refused".to_string()),
                        2 => {
                            deadline.run(std::future::pending::<()>()).await;
                            Err("timed out".to_string())
                        }
                        _ => panic!("renewal died"),
                    }
                })
            }),
        ))
    }

    fn soon() -> Deadline {
        Deadline::after(Duration::from_secs(2))
    }

    #[tokio::test(start_paused = true)]
    async fn renews_ahead_in_the_background_and_keeps_serving_while_it_hangs() {
        let (mode, calls) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let r = renewer(mode.clone(), calls.clone());
        let t0 = Instant::now();
        assert_eq!(r.get(soon()).await.unwrap(), 1);
        // Renewal is due after 20 s (a third of 30 s left); it hangs.
        mode.store(2, Ordering::SeqCst);
        for at in [12u64, 21, 25] {
            tokio::time::sleep_until(t0 + Duration::from_secs(at)).await;
            let t = Instant::now();
            assert_eq!(r.get(soon()).await.unwrap(), 1, "at {at} s");
            assert_eq!(t.elapsed(), Duration::ZERO, "answered at once at {at} s");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2, "one background renewal");
        // Past the end of the value (28.5 s), callers wait for the renewal,
        // each only until its own deadline.
        tokio::time::sleep_until(t0 + Duration::from_secs(29)).await;
        let d = Deadline::after(Duration::from_secs(1));
        assert!(matches!(r.get(d).await, Err(Wait::TimedOut)));
        // The API answers again: the next renewal succeeds.
        mode.store(0, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(r.get(soon()).await.unwrap() >= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_or_dead_renewal_never_blocks_the_next_caller() {
        let (mode, calls) = (Arc::new(AtomicU32::new(1)), Arc::new(AtomicU32::new(0)));
        let r = renewer(mode.clone(), calls.clone());
        assert!(matches!(r.get(soon()).await, Err(Wait::Failed(e)) if e == "refused"));
        mode.store(3, Ordering::SeqCst);
        assert!(matches!(r.get(soon()).await, Err(Wait::Failed(e)) if e == "lost"));
        mode.store(0, Ordering::SeqCst);
        assert_eq!(r.get(soon()).await.unwrap(), 3);
        // Invalidating the value in hand renews once, however many ask.
        r.invalidate(|v| *v == 3);
        let (a, b) = tokio::join!(r.get(soon()), r.get(soon()));
        assert_eq!((a.unwrap(), b.unwrap()), (4, 4));
        r.invalidate(|v| *v == 3); // already replaced: kept
        assert_eq!(r.get(soon()).await.unwrap(), 4);
    }
}
