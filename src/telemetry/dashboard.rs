//! The dashboard's series: per-second aggregates (request count, a log-scale latency
//! histogram for p50/p99, errors by kind, cache hits, QUIC RTT/loss) kept for a bounded number
//! of seconds, and the JSON the page polls.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use super::metrics::Direction;
use crate::error::ErrorKind;
use crate::facts::{CacheOutcome, Transport};

const LIVE_SECONDS: usize = 300;

#[derive(Default)]
pub(super) struct Live {
    current: Second,
    current_peers: HashMap<String, PeerSecond>,
    seconds: VecDeque<(u64, Second, HashMap<String, PeerSecond>)>,
}

impl Live {
    /// One finished request into the current second.
    pub(super) fn request(
        &mut self,
        direction: Direction,
        service: &str,
        transport: Option<Transport>,
        elapsed: Duration,
        error: Option<ErrorKind>,
        cache: Option<CacheOutcome>,
    ) {
        let series = match (direction, transport) {
            (Direction::Inbound, t) => {
                format!("inbound {service} · {}", t.map_or("-", Transport::as_str))
            }
            (Direction::Outbound, None) => format!("{service} · answered by the sidecar"),
            (Direction::Outbound, Some(t)) => format!("{service} · {}", t.as_str()),
        };
        self.current
            .series
            .entry(series)
            .or_default()
            .record(elapsed);
        if let Some(kind) = error {
            *self
                .current
                .errors
                .entry(kind.as_str().to_string())
                .or_default() += 1;
        }
        if let Some(cache) = cache {
            let c = self.current.cache.entry(service.to_string()).or_default();
            c.1 += 1;
            if cache == CacheOutcome::Hit {
                c.0 += 1;
            }
        }
    }

    /// One QUIC path sample of a peer endpoint.
    pub(super) fn peer(&mut self, peer: &str, rtt: Duration, lost: u64, sent: u64) {
        let p = self.current_peers.entry(peer.to_string()).or_default();
        p.rtt_ms = rtt.as_secs_f64() * 1000.0;
        p.lost += lost;
        p.sent += sent;
    }

    /// Closes the current second (`t` seconds since start).
    pub(super) fn tick(&mut self, t: u64) {
        let sec = std::mem::take(&mut self.current);
        let peers = std::mem::take(&mut self.current_peers);
        self.seconds.push_back((t, sec, peers));
        while self.seconds.len() > LIVE_SECONDS {
            self.seconds.pop_front();
        }
    }

    /// The series the dashboard draws.
    pub(super) fn data(&self) -> DashboardData {
        let t: Vec<u64> = self.seconds.iter().map(|(t, _, _)| *t).collect();
        let mut data = DashboardData {
            t,
            ..DashboardData::default()
        };
        let n = self.seconds.len();
        for (i, (_, sec, peers)) in self.seconds.iter().enumerate() {
            for (series, agg) in &sec.series {
                let rate = data
                    .rate
                    .entry(series.clone())
                    .or_insert_with(|| vec![0.0; n]);
                rate[i] = agg.count as f64;
                let p50 = data
                    .p50_ms
                    .entry(series.clone())
                    .or_insert_with(|| vec![None; n]);
                p50[i] = agg.quantile(0.5);
                let p99 = data
                    .p99_ms
                    .entry(series.clone())
                    .or_insert_with(|| vec![None; n]);
                p99[i] = agg.quantile(0.99);
            }
            for (kind, count) in &sec.errors {
                let e = data
                    .errors
                    .entry(kind.clone())
                    .or_insert_with(|| vec![0.0; n]);
                e[i] = *count as f64;
            }
            for (service, (hits, total)) in &sec.cache {
                let c = data
                    .cache_hit_ratio
                    .entry(service.clone())
                    .or_insert_with(|| vec![None; n]);
                c[i] = (*total > 0).then(|| *hits as f64 / *total as f64);
            }
            for (peer, p) in peers {
                let r = data
                    .quic_rtt_ms
                    .entry(peer.clone())
                    .or_insert_with(|| vec![None; n]);
                r[i] = Some(p.rtt_ms);
                let l = data
                    .quic_loss_pct
                    .entry(peer.clone())
                    .or_insert_with(|| vec![None; n]);
                l[i] = (p.sent > 0).then(|| 100.0 * p.lost as f64 / p.sent as f64);
            }
        }
        data
    }
}

#[derive(Default)]
struct Second {
    series: HashMap<String, Agg>,
    errors: HashMap<String, u64>,
    cache: HashMap<String, (u64, u64)>,
}

#[derive(Default, Clone)]
struct PeerSecond {
    rtt_ms: f64,
    lost: u64,
    sent: u64,
}

/// Request count and a log-scale latency histogram (10 µs × 1.25ⁿ) for quantiles.
#[derive(Default)]
struct Agg {
    count: u64,
    buckets: BTreeMap<u32, u64>,
}

impl Agg {
    fn record(&mut self, d: Duration) {
        self.count += 1;
        let us = d.as_secs_f64() * 1e6;
        let b = if us <= 10.0 {
            0
        } else {
            ((us / 10.0).ln() / 1.25f64.ln()).ceil() as u32
        };
        *self.buckets.entry(b).or_default() += 1;
    }

    /// Upper edge of the bucket holding quantile `q`, in milliseconds.
    fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let want = (q * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, n) in &self.buckets {
            seen += n;
            if seen >= want {
                return Some(10.0 * 1.25f64.powi(*b as i32) / 1000.0);
            }
        }
        None
    }
}

/// The dashboard's JSON: one value per second for each series.
#[derive(Debug, Default, Serialize)]
pub struct DashboardData {
    pub t: Vec<u64>,
    /// Requests per second, by "service · transport" ("inbound …" for the inbound side).
    pub rate: BTreeMap<String, Vec<f64>>,
    pub p50_ms: BTreeMap<String, Vec<Option<f64>>>,
    pub p99_ms: BTreeMap<String, Vec<Option<f64>>>,
    /// Sidecar-made errors per second, by kind.
    pub errors: BTreeMap<String, Vec<f64>>,
    pub quic_rtt_ms: BTreeMap<String, Vec<Option<f64>>>,
    pub quic_loss_pct: BTreeMap<String, Vec<Option<f64>>>,
    pub cache_hit_ratio: BTreeMap<String, Vec<Option<f64>>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_log_buckets() {
        let mut a = Agg::default();
        for ms in 1..=100 {
            a.record(Duration::from_millis(ms));
        }
        let p50 = a.quantile(0.5).unwrap();
        let p99 = a.quantile(0.99).unwrap();
        assert!((50.0..=63.0).contains(&p50), "{p50}");
        assert!((99.0..=125.0).contains(&p99), "{p99}");
    }
}
