//! Fault injection: a fraction of S3 and API requests fail the way real
//! services fail (5xx, `SlowDown`, connection resets, bodies cut short),
//! plus added latency, stalls and a skewed clock. Settable by flags and at
//! run time through `POST /_sim/faults?s3_rate=F&api_rate=F&latency_ms=N`,
//! `s3_hang=TEXT` (S3 requests whose key, listing prefix or continuation
//! token contains TEXT are accepted and never answered until `s3_hang=`
//! clears it), `api_hang=1|0` (the same for every identity and data store
//! call) and `clock_skew=SECS` (the S3 side's clock runs SECS ahead).
//!
//! Also the real service's less common answers, settable the same way:
//! `fail_list_page=N` (the registry page holding one unparseable record
//! answers 400; 0 clears), `s3_region=R` (the bucket lives in region R:
//! requests signed for another region answer 301 `PermanentRedirect`) and
//! `s3_bare_400=TEXT` (S3 requests whose key, listing prefix or
//! continuation token contains TEXT answer 400 with an empty body, as a
//! misconfigured endpoint or proxy does; empty TEXT clears) and
//! `s3_list_loop=TEXT` (listings whose prefix contains TEXT hand back, as
//! the next page's continuation token, the token they were asked with, or
//! the first page's: an S3-compatible server with a paging bug; empty
//! TEXT clears) and `s3_range_shift=TEXT` (ranged GETs of keys containing
//! TEXT answer the range one byte later, with a `Content-Range` that says
//! so: a caching proxy serving the wrong piece; empty TEXT clears).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use rand::Rng;
use serde_json::json;
use tokio::sync::Notify;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Fault {
    InternalError,
    SlowDown,
    Reset,
    ShortBody,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiFault {
    Status(u16),
    Reset,
}

/// Rates are stored as parts per million.
#[derive(Default)]
pub struct Faults {
    s3_ppm: AtomicU64,
    api_ppm: AtomicU64,
    latency_ms: AtomicU64,
    s3_injected: [AtomicU64; 4],
    api_injected: AtomicU64,
    /// S3 requests whose target contains this hang (empty: none).
    s3_hang: Mutex<String>,
    /// Identity and data store requests hang.
    api_hang: AtomicBool,
    /// Woken whenever a stall setting changes, so hung requests look again.
    hang_changed: Notify,
    /// Requests hanging right now, and ever.
    hanging: AtomicU64,
    hung_total: AtomicU64,
    /// Seconds the S3 side's clock is ahead of the real one (negative: behind).
    clock_skew: AtomicI64,
    /// 1-based page (of 20 records, newest first) whose middle record
    /// cannot be parsed; 0: none.
    fail_list_page: AtomicU64,
    /// Registry pages asking for more records than this answer 504, as
    /// the API gateway does when a page takes past its 29 s limit (0: no
    /// limit).
    list_max_page: AtomicU64,
    /// The region the bucket lives in (empty: any region is accepted).
    s3_region: Mutex<String>,
    /// S3 requests whose target contains this answer a bare 400 (empty: none).
    s3_bare_400: Mutex<String>,
    s3_list_loop: Mutex<String>,
    s3_range_shift: Mutex<String>,
}

/// Counts a request as hanging while it lives.
struct Hanging<'a>(&'a Faults);

impl Drop for Hanging<'_> {
    fn drop(&mut self) {
        self.0.hanging.fetch_sub(1, Ordering::Relaxed);
    }
}

fn ppm(rate: f64) -> u64 {
    (rate.clamp(0.0, 1.0) * 1e6) as u64
}

impl Faults {
    pub fn new(s3_rate: f64, api_rate: f64, latency_ms: u64) -> Self {
        let f = Self::default();
        f.set(Some(s3_rate), Some(api_rate), Some(latency_ms));
        f
    }

    pub fn set(&self, s3_rate: Option<f64>, api_rate: Option<f64>, latency_ms: Option<u64>) {
        if let Some(r) = s3_rate {
            self.s3_ppm.store(ppm(r), Ordering::Relaxed);
        }
        if let Some(r) = api_rate {
            self.api_ppm.store(ppm(r), Ordering::Relaxed);
        }
        if let Some(l) = latency_ms {
            self.latency_ms.store(l, Ordering::Relaxed);
        }
    }

    pub fn latency(&self) -> u64 {
        self.latency_ms.load(Ordering::Relaxed)
    }

    /// Sets (or, with an empty text, clears) the S3 stall.
    pub fn set_s3_hang(&self, text: &str) {
        *self.s3_hang.lock().unwrap_or_else(|p| p.into_inner()) = text.to_string();
        self.hang_changed.notify_waiters();
    }

    pub fn set_api_hang(&self, on: bool) {
        self.api_hang.store(on, Ordering::Relaxed);
        self.hang_changed.notify_waiters();
    }

    pub fn set_clock_skew(&self, secs: i64) {
        self.clock_skew.store(secs, Ordering::Relaxed);
    }

    pub fn clock_skew(&self) -> i64 {
        self.clock_skew.load(Ordering::Relaxed)
    }

    /// Sets the registry page whose middle record is unparseable (0: none).
    pub fn set_fail_list_page(&self, page: u64) {
        self.fail_list_page.store(page, Ordering::Relaxed);
    }

    pub fn fail_list_page(&self) -> u64 {
        self.fail_list_page.load(Ordering::Relaxed)
    }

    /// Sets the largest registry page answered (0: no limit).
    pub fn set_list_max_page(&self, n: u64) {
        self.list_max_page.store(n, Ordering::Relaxed);
    }

    pub fn list_max_page(&self) -> u64 {
        self.list_max_page.load(Ordering::Relaxed)
    }

    /// Sets the region the bucket lives in.
    pub fn set_s3_region(&self, region: &str) {
        *self.s3_region.lock().unwrap_or_else(|p| p.into_inner()) = region.to_string();
    }

    pub fn s3_region(&self) -> String {
        self.s3_region
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets (or, with an empty text, clears) the bare-400 answer.
    pub fn set_s3_bare_400(&self, text: &str) {
        *self.s3_bare_400.lock().unwrap_or_else(|p| p.into_inner()) = text.to_string();
    }

    /// Sets (or, with an empty text, clears) the looping listing.
    pub fn set_s3_list_loop(&self, text: &str) {
        *self.s3_list_loop.lock().unwrap_or_else(|p| p.into_inner()) = text.to_string();
    }

    /// Whether a listing of `prefix` goes in circles.
    pub fn s3_list_loops(&self, prefix: &str) -> bool {
        let t = self.s3_list_loop.lock().unwrap_or_else(|p| p.into_inner());
        !t.is_empty() && prefix.contains(t.as_str())
    }

    /// Sets (or, with an empty text, clears) the shifted ranges.
    pub fn set_s3_range_shift(&self, text: &str) {
        *self
            .s3_range_shift
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = text.to_string();
    }

    /// Whether a ranged GET of `key` answers a range one byte later.
    pub fn s3_range_shifted(&self, key: &str) -> bool {
        let t = self
            .s3_range_shift
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        !t.is_empty() && key.contains(t.as_str())
    }

    /// Whether an S3 request for `target` answers a bare 400.
    pub fn s3_bare_400(&self, target: &str) -> bool {
        let t = self.s3_bare_400.lock().unwrap_or_else(|p| p.into_inner());
        !t.is_empty() && target.contains(t.as_str())
    }

    fn s3_hangs(&self, target: &str) -> bool {
        let t = self.s3_hang.lock().unwrap_or_else(|p| p.into_inner());
        !t.is_empty() && target.contains(t.as_str())
    }

    /// Returns once the S3 stall no longer matches `target` (at once if it
    /// never did). The caller holds the connection open meanwhile: to the
    /// client the request was accepted and is never answered.
    pub async fn hang_s3(&self, target: &str) {
        self.hang_while(|| self.s3_hangs(target)).await
    }

    /// Like [`hang_s3`](Self::hang_s3), for identity and data store calls.
    pub async fn hang_api(&self) {
        self.hang_while(|| self.api_hang.load(Ordering::Relaxed))
            .await
    }

    async fn hang_while(&self, hangs: impl Fn() -> bool) {
        let mut counted = None;
        loop {
            let changed = self.hang_changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a change in between is seen.
            changed.as_mut().enable();
            if !hangs() {
                return;
            }
            if counted.is_none() {
                self.hanging.fetch_add(1, Ordering::Relaxed);
                self.hung_total.fetch_add(1, Ordering::Relaxed);
                counted = Some(Hanging(self));
            }
            changed.await;
        }
    }

    fn hit(rate_ppm: u64) -> bool {
        rate_ppm > 0 && rand::thread_rng().gen_range(0..1_000_000) < rate_ppm
    }

    /// Whether this S3 request fails, and how (spread evenly over the kinds).
    pub fn pick_s3(&self) -> Option<S3Fault> {
        if !Self::hit(self.s3_ppm.load(Ordering::Relaxed)) {
            return None;
        }
        let i = rand::thread_rng().gen_range(0..4);
        self.s3_injected[i].fetch_add(1, Ordering::Relaxed);
        Some(
            [
                S3Fault::InternalError,
                S3Fault::SlowDown,
                S3Fault::Reset,
                S3Fault::ShortBody,
            ][i],
        )
    }

    pub fn pick_api(&self) -> Option<ApiFault> {
        if !Self::hit(self.api_ppm.load(Ordering::Relaxed)) {
            return None;
        }
        self.api_injected.fetch_add(1, Ordering::Relaxed);
        Some(match rand::thread_rng().gen_range(0..4) {
            0 => ApiFault::Status(500),
            1 => ApiFault::Status(502),
            2 => ApiFault::Status(503),
            _ => ApiFault::Reset,
        })
    }

    pub fn json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "s3_rate": g(&self.s3_ppm) as f64 / 1e6,
            "api_rate": g(&self.api_ppm) as f64 / 1e6,
            "latency_ms": g(&self.latency_ms),
            "s3_injected": {
                "internal_error": g(&self.s3_injected[0]),
                "slow_down": g(&self.s3_injected[1]),
                "reset": g(&self.s3_injected[2]),
                "short_body": g(&self.s3_injected[3]),
            },
            "api_injected": g(&self.api_injected),
            "s3_hang": self.s3_hang.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "api_hang": self.api_hang.load(Ordering::Relaxed),
            "hanging": g(&self.hanging),
            "hung_total": g(&self.hung_total),
            "clock_skew": self.clock_skew(),
            "fail_list_page": self.fail_list_page(),
            "list_max_page": self.list_max_page(),
            "s3_region": self.s3_region(),
            "s3_bare_400": self.s3_bare_400.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "s3_list_loop": self.s3_list_loop.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            "s3_range_shift": self.s3_range_shift.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stall_holds_until_cleared() {
        let f = std::sync::Arc::new(Faults::default());
        f.hang_s3("datasets/x/free").await; // no stall: returns at once
        f.set_s3_hang("stuck");
        let hung = {
            let f = f.clone();
            tokio::spawn(async move { f.hang_s3("datasets/x/stuck.bin").await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!hung.is_finished());
        assert_eq!(f.json()["hanging"], 1);
        f.set_s3_hang("other");
        tokio::time::timeout(std::time::Duration::from_secs(2), hung)
            .await
            .expect("released")
            .unwrap();
        assert_eq!(f.json()["hanging"], 0);
        assert_eq!(f.json()["hung_total"], 1);
    }

    #[test]
    fn rates_are_honoured_roughly() {
        let f = Faults::new(0.1, 0.0, 0);
        let n = (0..20_000).filter(|_| f.pick_s3().is_some()).count();
        assert!((1500..2500).contains(&n), "{n}");
        assert!((0..1000).all(|_| f.pick_api().is_none()));
        f.set(Some(0.0), None, None);
        assert!((0..1000).all(|_| f.pick_s3().is_none()));
    }
}
