//! The WAN profile: what real S3 and an API gateway add that loopback has
//! not. Every S3 answer waits `first_byte_ms` before its first byte; each
//! S3 response body is paced to `stream_mib_per_s`, and all of them
//! together to `link_mib_per_s`; every identity and data store call takes
//! `api_latency_ms`. Set by `sim` flags and at run time through
//! `POST /_sim/faults?first_byte_ms=N&stream_mib_per_s=N&link_mib_per_s=N&api_latency_ms=N`
//! (0 turns each off).
//!
//! Pacing is by deadlines, not by sleeping a chunk's duration after it: a
//! body is cut into 64 KiB chunks, each given the time its last byte would
//! arrive on a stream of that rate sharing a link of that rate, and handed
//! out then. Timer lateness never accumulates (the next deadline follows
//! the previous deadline, not the wake-up), so a 64 MiB GET at 50 MiB/s
//! takes 1.28 s within a few milliseconds, at about 800 wake-ups a second.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Frame;
use serde_json::json;
use tokio::time::Instant;

use super::{Body, BoxError};

/// Bytes a paced body hands out at once.
const CHUNK: usize = 64 << 10;

/// The WAN profile's settings, as `sim` flags give them (0: off).
#[derive(Clone, Copy, Debug, Default)]
pub struct WanProfile {
    pub first_byte_ms: u64,
    pub stream_mib_per_s: f64,
    pub link_mib_per_s: f64,
    pub api_latency_ms: u64,
}

/// The WAN profile in force, and the link all paced bodies share.
#[derive(Default)]
pub struct Wan {
    first_byte_ms: AtomicU64,
    /// Bytes per second, as f64 bits (0: unpaced).
    stream_bps: AtomicU64,
    link_bps: AtomicU64,
    api_latency_ms: AtomicU64,
    /// When the link is next free: the end of the last chunk given a slot.
    link_free: Mutex<Option<Instant>>,
}

fn mib_to_bps(mib: f64) -> u64 {
    (mib.max(0.0) * 1048576.0).to_bits()
}

fn bps(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

impl Wan {
    pub fn new(p: WanProfile) -> Self {
        let w = Self::default();
        w.set(
            Some(p.first_byte_ms),
            Some(p.stream_mib_per_s),
            Some(p.link_mib_per_s),
            Some(p.api_latency_ms),
        );
        w
    }

    /// Changes the settings given (`None` leaves one as it is).
    pub fn set(
        &self,
        first_byte_ms: Option<u64>,
        stream_mib_per_s: Option<f64>,
        link_mib_per_s: Option<f64>,
        api_latency_ms: Option<u64>,
    ) {
        if let Some(v) = first_byte_ms {
            self.first_byte_ms.store(v, Ordering::Relaxed);
        }
        if let Some(v) = stream_mib_per_s {
            self.stream_bps.store(mib_to_bps(v), Ordering::Relaxed);
        }
        if let Some(v) = link_mib_per_s {
            self.link_bps.store(mib_to_bps(v), Ordering::Relaxed);
        }
        if let Some(v) = api_latency_ms {
            self.api_latency_ms.store(v, Ordering::Relaxed);
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "first_byte_ms": self.first_byte_ms.load(Ordering::Relaxed),
            "stream_mib_per_s": bps(&self.stream_bps) / 1048576.0,
            "link_mib_per_s": bps(&self.link_bps) / 1048576.0,
            "api_latency_ms": self.api_latency_ms.load(Ordering::Relaxed),
        })
    }

    /// The wait before an S3 answer's first byte.
    pub async fn first_byte(&self) {
        let ms = self.first_byte_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// The time an identity or data store call takes on top of its work.
    pub async fn api_call(&self) {
        let ms = self.api_latency_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    fn paced(&self) -> bool {
        bps(&self.stream_bps) > 0.0 || bps(&self.link_bps) > 0.0
    }

    /// When a chunk of `n` bytes, sent on a stream free from `stream_free`,
    /// has fully arrived; books its slot on the shared link.
    fn arrival(&self, n: usize, stream_free: Instant) -> Instant {
        let secs = |rate: f64| {
            if rate > 0.0 {
                Duration::from_secs_f64(n as f64 / rate)
            } else {
                Duration::ZERO
            }
        };
        // A stream that kept sending starts its next chunk where the last
        // one ended, not when the timer woke us (timer lateness would add
        // up chunk after chunk); one that sat idle starts now.
        let now = Instant::now();
        let start = if now.saturating_duration_since(stream_free) < Duration::from_millis(5) {
            stream_free
        } else {
            now
        };
        let stream_done = start + secs(bps(&self.stream_bps));
        let link = secs(bps(&self.link_bps));
        if link.is_zero() {
            return stream_done;
        }
        let mut free = self.link_free.lock().unwrap_or_else(|p| p.into_inner());
        let link_start = free.map_or(start, |f| f.max(start));
        let link_done = link_start + link;
        *free = Some(link_done);
        stream_done.max(link_done)
    }

    /// `body`, paced as the profile says (as it is when unpaced).
    pub fn pace(self: &Arc<Self>, body: Body) -> Body {
        if !self.paced() {
            return body;
        }
        struct State {
            body: Body,
            wan: Arc<Wan>,
            pending: VecDeque<Bytes>,
            /// The arrival of the last chunk handed out: the stream is
            /// free from then.
            free: Instant,
        }
        let state = State {
            body,
            wan: self.clone(),
            pending: VecDeque::new(),
            free: Instant::now(),
        };
        let stream = futures::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(chunk) = s.pending.pop_front() {
                    let at = s.wan.arrival(chunk.len(), s.free);
                    tokio::time::sleep_until(at).await;
                    s.free = at;
                    return Some((Ok(Frame::data(chunk)), s));
                }
                match s.body.frame().await? {
                    Ok(frame) => match frame.into_data() {
                        Ok(mut data) => {
                            while data.len() > CHUNK {
                                s.pending.push_back(data.split_to(CHUNK));
                            }
                            if !data.is_empty() {
                                s.pending.push_back(data);
                            }
                        }
                        Err(other) => return Some((Ok(other), s)),
                    },
                    Err(e) => return Some((Err::<Frame<Bytes>, BoxError>(e), s)),
                }
            }
        });
        http_body_util::StreamBody::new(stream).boxed_unsync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(len: usize) -> Body {
        http_body_util::Full::new(Bytes::from(vec![1u8; len]))
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    #[tokio::test]
    async fn a_stream_is_paced_to_its_rate() {
        let wan = Arc::new(Wan::new(WanProfile {
            stream_mib_per_s: 50.0,
            ..WanProfile::default()
        }));
        let t = std::time::Instant::now();
        let got = wan
            .pace(body_of(8 << 20))
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(got.len(), 8 << 20);
        // Never faster than the pace; slower only by what a loaded
        // machine's scheduler adds (the precision check is
        // tests/emulator.rs, over a real connection).
        assert!((0.152..0.5).contains(&secs), "{secs}");
    }

    #[tokio::test]
    async fn streams_share_the_link() {
        let wan = Arc::new(Wan::new(WanProfile {
            stream_mib_per_s: 50.0,
            link_mib_per_s: 100.0,
            ..WanProfile::default()
        }));
        let t = std::time::Instant::now();
        let bodies = (0..4).map(|_| wan.pace(body_of(4 << 20)).collect());
        for b in futures::future::join_all(bodies).await {
            assert_eq!(b.unwrap().to_bytes().len(), 4 << 20);
        }
        // 16 MiB over a 100 MiB/s link: 0.16 s, not 4 MiB at 50 (0.08 s);
        // slower only by a loaded machine's scheduling.
        let secs = t.elapsed().as_secs_f64();
        assert!((0.152..0.5).contains(&secs), "{secs}");
    }
}
