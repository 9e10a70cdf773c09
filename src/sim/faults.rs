//! Fault injection: a fraction of S3 and API requests fail the way real
//! services fail (5xx, `SlowDown`, connection resets, bodies cut short),
//! plus added latency. Settable by flags and at run time through
//! `POST /_sim/faults?s3_rate=F&api_rate=F&latency_ms=N`.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::Rng;
use serde_json::json;

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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
