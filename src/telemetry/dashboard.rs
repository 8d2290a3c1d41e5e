//! The dashboard's series: per-second aggregates (request count, a log-scale latency
//! histogram for p50/p99, errors by kind, cache hits, QUIC RTT/congestion window/loss) kept
//! for 15 minutes in a ring of fixed length (bounded memory), and the JSON the page polls.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::metrics::Direction;
use crate::error::ErrorKind;
use crate::facts::{CacheOutcome, Transport};

/// 15 minutes of per-second history.
const LIVE_SECONDS: usize = 900;

/// What one latency/rate series is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SeriesKey {
    direction: Direction,
    /// Shared with the service's telemetry: a request's key costs no allocation.
    service: Arc<str>,
    transport: Option<Transport>,
}

impl SeriesKey {
    /// The series' name in words, for legends.
    fn label(&self) -> String {
        let over = |t: Transport| match t {
            Transport::Quic => "over QUIC",
            Transport::Tcp => "over TCP",
        };
        match (self.direction, self.transport) {
            (Direction::Outbound, Some(t)) => format!("{} {}", self.service, over(t)),
            (Direction::Outbound, None) if &*self.service == "-" => {
                "requests for unknown services".to_string()
            }
            (Direction::Outbound, None) => {
                format!("{}, answered here (cache or sidecar error)", self.service)
            }
            (Direction::Inbound, Some(t)) => format!("peers → {} {}", self.service, over(t)),
            (Direction::Inbound, None) => format!("peers → {}", self.service),
        }
    }
}

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
        service: &Arc<str>,
        transport: Option<Transport>,
        elapsed: Duration,
        error: Option<ErrorKind>,
        cache: Option<CacheOutcome>,
    ) {
        let key = SeriesKey {
            direction,
            service: service.clone(),
            transport,
        };
        self.current.series.entry(key).or_default().record(elapsed);
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
    pub(super) fn peer(&mut self, peer: &str, rtt: Duration, cwnd: u64, lost: u64, sent: u64) {
        let p = self.current_peers.entry(peer.to_string()).or_default();
        p.rtt_ms = rtt.as_secs_f64() * 1000.0;
        p.cwnd = cwnd;
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

    /// The series the dashboard draws; `start_unix` is when second 0 was.
    pub(super) fn data(&self, start_unix: u64) -> DashboardData {
        let t: Vec<u64> = self.seconds.iter().map(|(t, _, _)| *t).collect();
        let mut data = DashboardData {
            t,
            start_unix,
            ..DashboardData::default()
        };
        let n = self.seconds.len();
        for (i, (_, sec, peers)) in self.seconds.iter().enumerate() {
            for (key, agg) in &sec.series {
                let series = key.label();
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
                // QUIC and TCP side by side, per called service.
                if let (Direction::Outbound, Some(t)) = (key.direction, key.transport) {
                    let c = data
                        .compare
                        .entry(key.service.to_string())
                        .or_default()
                        .entry(t.as_str().to_string())
                        .or_insert_with(|| Compare::new(n));
                    c.rate[i] = agg.count as f64;
                    c.p50_ms[i] = agg.quantile(0.5);
                    c.p99_ms[i] = agg.quantile(0.99);
                    c.requests += agg.count;
                }
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
                data.peers.insert(
                    peer.clone(),
                    PeerNow {
                        rtt_ms: p.rtt_ms,
                        cwnd_bytes: p.cwnd,
                        loss_pct: (p.sent > 0).then(|| 100.0 * p.lost as f64 / p.sent as f64),
                        seconds_ago: (n - 1 - i) as u64,
                    },
                );
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
    /// Fx-hashed: keyed by configured service names (or "-"), never client input.
    series: rustc_hash::FxHashMap<SeriesKey, Agg>,
    errors: HashMap<String, u64>,
    cache: HashMap<String, (u64, u64)>,
}

#[derive(Default, Clone)]
struct PeerSecond {
    rtt_ms: f64,
    cwnd: u64,
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
    /// Seconds since start of each point; `start_unix + t` is its wall-clock time.
    pub t: Vec<u64>,
    pub start_unix: u64,
    /// Requests per second, by series named in words ("hello over QUIC", "peers → hello…").
    pub rate: BTreeMap<String, Vec<f64>>,
    pub p50_ms: BTreeMap<String, Vec<Option<f64>>>,
    pub p99_ms: BTreeMap<String, Vec<Option<f64>>>,
    /// Sidecar-made errors per second, by kind.
    pub errors: BTreeMap<String, Vec<f64>>,
    pub quic_rtt_ms: BTreeMap<String, Vec<Option<f64>>>,
    pub quic_loss_pct: BTreeMap<String, Vec<Option<f64>>>,
    pub cache_hit_ratio: BTreeMap<String, Vec<Option<f64>>>,
    /// Per called service, per transport ("quic", "tcp"): rate and latency side by side.
    pub compare: BTreeMap<String, BTreeMap<String, Compare>>,
    /// The latest path state of each QUIC peer endpoint.
    pub peers: BTreeMap<String, PeerNow>,
}

/// One transport's share of a service's traffic.
#[derive(Debug, Default, Serialize)]
pub struct Compare {
    pub rate: Vec<f64>,
    pub p50_ms: Vec<Option<f64>>,
    pub p99_ms: Vec<Option<f64>>,
    /// Requests over the whole history.
    pub requests: u64,
}

impl Compare {
    fn new(n: usize) -> Self {
        Self {
            rate: vec![0.0; n],
            p50_ms: vec![None; n],
            p99_ms: vec![None; n],
            requests: 0,
        }
    }
}

/// A QUIC peer endpoint's path, as last sampled.
#[derive(Debug, Serialize)]
pub struct PeerNow {
    pub rtt_ms: f64,
    pub cwnd_bytes: u64,
    pub loss_pct: Option<f64>,
    pub seconds_ago: u64,
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
