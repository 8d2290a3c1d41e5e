//! Telemetry in one place: metric names and their help, a Prometheus recorder per sidecar,
//! the per-request guard that records metrics and the access log exactly once, the
//! per-second series the dashboard draws, and W3C trace context.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use metrics::{Counter, Gauge, Histogram, Key, Label, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::Serialize;

use crate::config::{AccessLogConfig, LogFormat};

pub const REQUESTS: &str = "quicar_requests_total";
pub const REQUEST_DURATION: &str = "quicar_request_duration_seconds";
pub const REQUEST_BYTES: &str = "quicar_request_bytes_total";
pub const RESPONSE_BYTES: &str = "quicar_response_bytes_total";
pub const IN_FLIGHT: &str = "quicar_requests_in_flight";
pub const CONNECTIONS_OPENED: &str = "quicar_connections_opened_total";
pub const CONNECTIONS_ACTIVE: &str = "quicar_connections_active";
pub const HANDSHAKE_FAILURES: &str = "quicar_handshake_failures_total";
pub const QUIC_RTT: &str = "quicar_quic_rtt_seconds";
pub const QUIC_CWND: &str = "quicar_quic_congestion_window_bytes";
pub const QUIC_LOST: &str = "quicar_quic_lost_packets_total";
pub const QUIC_SENT: &str = "quicar_quic_sent_datagrams_total";
pub const QUIC_RECEIVED: &str = "quicar_quic_received_datagrams_total";
pub const CACHE_REQUESTS: &str = "quicar_cache_requests_total";
pub const CACHE_BYTES: &str = "quicar_cache_stored_bytes";
pub const ACCESS_LOG_DROPPED: &str = "quicar_access_log_dropped_lines_total";
pub const RETRIES: &str = "quicar_retries_total";
pub const BUDGET_EXHAUSTED: &str = "quicar_retry_budget_exhausted_total";
pub const EJECTIONS: &str = "quicar_endpoint_ejections_total";

/// Every metric with its kind, unit and help, for `describe` and for the docs.
pub const METRICS: &[(&str, &str, &str)] = &[
    (
        REQUESTS,
        "counter",
        "Requests finished, by direction, service, transport, status class and error kind.",
    ),
    (
        REQUEST_DURATION,
        "histogram",
        "Time from request head to the end of the response body, in seconds.",
    ),
    (REQUEST_BYTES, "counter", "Request body bytes carried."),
    (RESPONSE_BYTES, "counter", "Response body bytes carried."),
    (IN_FLIGHT, "gauge", "Requests in flight."),
    (
        CONNECTIONS_OPENED,
        "counter",
        "Connections between sidecars opened, by direction and transport.",
    ),
    (
        CONNECTIONS_ACTIVE,
        "gauge",
        "Connections between sidecars open now.",
    ),
    (
        HANDSHAKE_FAILURES,
        "counter",
        "Handshakes refused or failed, by direction and reason.",
    ),
    (
        QUIC_RTT,
        "gauge",
        "Smoothed round-trip time of the QUIC connection to a peer endpoint.",
    ),
    (
        QUIC_CWND,
        "gauge",
        "Congestion window of the QUIC connection to a peer endpoint.",
    ),
    (
        QUIC_LOST,
        "counter",
        "Packets the QUIC connections to a peer endpoint declared lost.",
    ),
    (
        QUIC_SENT,
        "counter",
        "UDP datagrams sent on QUIC connections to a peer endpoint.",
    ),
    (
        QUIC_RECEIVED,
        "counter",
        "UDP datagrams received on QUIC connections to a peer endpoint.",
    ),
    (
        CACHE_REQUESTS,
        "counter",
        "Cacheable requests by result (hit, miss, revalidated, stale).",
    ),
    (
        CACHE_BYTES,
        "gauge",
        "Bytes held by a service's response cache.",
    ),
    (
        ACCESS_LOG_DROPPED,
        "counter",
        "Access log lines dropped because the writer fell behind.",
    ),
];

/// Latency buckets from 100 µs to 10 s: loopback hops are sub-millisecond, WAN ones are not.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static METADATA: metrics::Metadata<'static> =
    metrics::Metadata::new("quicar", metrics::Level::INFO, Some(module_path!()));

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    #[default]
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// One sidecar's telemetry. Each sidecar has its own recorder (not the process-global one),
/// so two sidecars in one process (the demo, the tests) keep separate numbers.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    access: Option<AccessLog>,
    live: Mutex<Live>,
    ready: AtomicBool,
    started: Instant,
}

impl Telemetry {
    pub fn new(access: &AccessLogConfig) -> Result<Arc<Self>, std::io::Error> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION.into()),
                DURATION_BUCKETS,
            )
            .expect("buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        for (name, kind, help) in METRICS {
            let unit = if name.ends_with("_seconds") {
                Some(Unit::Seconds)
            } else if name.ends_with("_bytes") || name.ends_with("_bytes_total") {
                Some(Unit::Bytes)
            } else {
                None
            };
            let name = metrics::KeyName::from_const_str(name);
            match *kind {
                "counter" => recorder.describe_counter(name, unit, (*help).into()),
                "gauge" => recorder.describe_gauge(name, unit, (*help).into()),
                _ => recorder.describe_histogram(name, unit, (*help).into()),
            }
        }
        let access = if access.enabled {
            Some(AccessLog::open(access)?)
        } else {
            None
        };
        Ok(Arc::new(Self {
            recorder,
            handle,
            access,
            live: Mutex::new(Live::default()),
            ready: AtomicBool::new(false),
            started: Instant::now(),
        }))
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, String)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, String)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, labels: &[(&'static str, String)]) -> Histogram {
        self.recorder
            .register_histogram(&key(name, labels), &METADATA)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Starts the record of one request. It is written when the guard drops.
    pub fn request(self: &Arc<Self>, direction: Direction) -> RequestGuard {
        RequestGuard {
            tel: self.clone(),
            start: Instant::now(),
            time: SystemTime::now(),
            facts: Facts {
                direction,
                ..Facts::default()
            },
            bytes_in: Arc::new(AtomicU64::new(0)),
            bytes_out: Arc::new(AtomicU64::new(0)),
            in_flight: None,
        }
    }

    /// A handshake that did not produce a usable connection.
    pub fn handshake_failed(&self, direction: Direction, reason: &'static str) {
        self.counter(
            HANDSHAKE_FAILURES,
            &[
                ("direction", direction.as_str().into()),
                ("reason", reason.into()),
            ],
        )
        .increment(1);
    }

    /// A connection between sidecars opened; the returned guard marks it closed when dropped.
    pub fn connection_opened(
        self: &Arc<Self>,
        direction: Direction,
        transport: &'static str,
    ) -> ConnectionGuard {
        let labels = [
            ("direction", direction.as_str().to_string()),
            ("transport", transport.to_string()),
        ];
        self.counter(CONNECTIONS_OPENED, &labels).increment(1);
        let active = self.gauge(CONNECTIONS_ACTIVE, &labels);
        active.increment(1.0);
        ConnectionGuard(active)
    }

    /// QUIC path statistics of a peer endpoint's connection, sampled once a second.
    pub fn quic_sample(
        &self,
        peer: &str,
        rtt: Duration,
        cwnd: u64,
        lost: u64,
        sent: u64,
        received: u64,
    ) {
        let labels = [("peer", peer.to_string())];
        self.gauge(QUIC_RTT, &labels).set(rtt.as_secs_f64());
        self.gauge(QUIC_CWND, &labels).set(cwnd as f64);
        self.counter(QUIC_LOST, &labels).increment(lost);
        self.counter(QUIC_SENT, &labels).increment(sent);
        self.counter(QUIC_RECEIVED, &labels).increment(received);
        let mut live = self.live.lock().expect("not poisoned");
        let p = live.current_peers.entry(peer.to_string()).or_default();
        p.rtt_ms = rtt.as_secs_f64() * 1000.0;
        p.lost += lost;
        p.sent += sent;
    }

    pub fn cache_bytes(&self, service: &str, bytes: u64) {
        self.gauge(CACHE_BYTES, &[("service", service.to_string())])
            .set(bytes as f64);
    }

    /// Closes the current second of the dashboard series (called once a second).
    pub fn tick(&self) {
        let mut live = self.live.lock().expect("not poisoned");
        let t = self.started.elapsed().as_secs();
        let sec = std::mem::take(&mut live.current);
        let peers = std::mem::take(&mut live.current_peers);
        live.seconds.push_back((t, sec, peers));
        while live.seconds.len() > LIVE_SECONDS {
            live.seconds.pop_front();
        }
    }

    /// The series the dashboard draws, as JSON-ready data.
    pub fn dashboard_data(&self) -> DashboardData {
        let live = self.live.lock().expect("not poisoned");
        let t: Vec<u64> = live.seconds.iter().map(|(t, _, _)| *t).collect();
        let mut data = DashboardData {
            t,
            ..DashboardData::default()
        };
        let n = live.seconds.len();
        for (i, (_, sec, peers)) in live.seconds.iter().enumerate() {
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

fn key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.clone()))
        .collect();
    Key::from_parts(name, labels)
}

/// Marks a connection closed (active gauge down) when dropped.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// What is known about a request by the time it ends. Label values are bounded: `service` is a
/// configured name or "-", never what a client typed.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub direction: Direction,
    pub service: String,
    pub transport: &'static str,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub error_kind: Option<String>,
    pub peer_identity: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub attempts: u32,
    pub cache: Option<String>,
    pub trace_id: Option<String>,
}

/// Facts a response carries from deep in the path back to where the guard is.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    pub endpoint: SocketAddr,
    pub attempts: u32,
    pub transport: &'static str,
}

/// Records metrics, the dashboard series and the access log line once, when dropped (after
/// the response body ended, or when the client went away).
pub struct RequestGuard {
    tel: Arc<Telemetry>,
    start: Instant,
    time: SystemTime,
    pub facts: Facts,
    bytes_in: Arc<AtomicU64>,
    bytes_out: Arc<AtomicU64>,
    in_flight: Option<Gauge>,
}

impl RequestGuard {
    /// Counts the request in flight for `service` from now until the guard drops.
    pub fn service(&mut self, service: &str) {
        self.facts.service = service.to_string();
        let g = self.tel.gauge(
            IN_FLIGHT,
            &[
                ("direction", self.facts.direction.as_str().into()),
                ("service", service.to_string()),
            ],
        );
        g.increment(1.0);
        self.in_flight = Some(g);
    }

    pub fn bytes_in(&self) -> Arc<AtomicU64> {
        self.bytes_in.clone()
    }

    pub fn bytes_out(&self) -> Arc<AtomicU64> {
        self.bytes_out.clone()
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(g) = self.in_flight.take() {
            g.decrement(1.0);
        }
        let f = &self.facts;
        let elapsed = self.start.elapsed();
        let service = if f.service.is_empty() {
            "-".to_string()
        } else {
            f.service.clone()
        };
        let transport = if f.transport.is_empty() {
            "-"
        } else {
            f.transport
        };
        let class = match f.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        let kind = f.error_kind.clone().unwrap_or_else(|| "none".into());
        let dir = f.direction.as_str().to_string();
        let base = [
            ("direction", dir.clone()),
            ("service", service.clone()),
            ("transport", transport.to_string()),
        ];
        self.tel
            .counter(
                REQUESTS,
                &[
                    ("direction", dir.clone()),
                    ("service", service.clone()),
                    ("transport", transport.to_string()),
                    ("status_class", class.into()),
                    ("error_kind", kind.clone()),
                ],
            )
            .increment(1);
        self.tel
            .histogram(REQUEST_DURATION, &base)
            .record(elapsed.as_secs_f64());
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let bytes_out = self.bytes_out.load(Ordering::Relaxed);
        self.tel.counter(REQUEST_BYTES, &base).increment(bytes_in);
        self.tel.counter(RESPONSE_BYTES, &base).increment(bytes_out);
        if let (Some(cache), Direction::Outbound) = (&f.cache, f.direction) {
            self.tel
                .counter(
                    CACHE_REQUESTS,
                    &[("service", service.clone()), ("result", cache.clone())],
                )
                .increment(1);
        }
        {
            let mut live = self.tel.live.lock().expect("not poisoned");
            let series = match (f.direction, transport) {
                (Direction::Inbound, t) => format!("inbound {service} · {t}"),
                (Direction::Outbound, "-") => format!("{service} · answered by the sidecar"),
                (Direction::Outbound, t) => format!("{service} · {t}"),
            };
            live.current
                .series
                .entry(series)
                .or_default()
                .record(elapsed);
            if kind != "none" {
                *live.current.errors.entry(kind.clone()).or_default() += 1;
            }
            if let Some(cache) = &f.cache {
                let c = live.current.cache.entry(service.clone()).or_default();
                c.1 += 1;
                if cache == "hit" {
                    c.0 += 1;
                }
            }
        }
        if let Some(log) = &self.tel.access {
            let line = AccessLine {
                time: humantime::format_rfc3339_millis(self.time).to_string(),
                direction: dir,
                service,
                method: f.method.clone(),
                authority: f.authority.clone(),
                path: f.path.clone(),
                status: f.status,
                duration_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
                bytes_in,
                bytes_out,
                transport: transport.to_string(),
                peer_identity: f.peer_identity.clone(),
                endpoint: f.endpoint.map(|e| e.to_string()),
                attempts: f.attempts,
                cache: f.cache.clone(),
                error_kind: f.error_kind.clone(),
                trace_id: f.trace_id.clone(),
            };
            if !log.send(&line) {
                self.tel.counter(ACCESS_LOG_DROPPED, &[]).increment(1);
            }
        }
    }
}

/// One access log line.
#[derive(Debug, Serialize)]
pub struct AccessLine {
    pub time: String,
    pub direction: String,
    pub service: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub transport: String,
    pub peer_identity: Option<String>,
    pub endpoint: Option<String>,
    pub attempts: u32,
    pub cache: Option<String>,
    pub error_kind: Option<String>,
    pub trace_id: Option<String>,
}

impl AccessLine {
    /// `key=value` pairs; values with spaces, quotes or `=` are quoted.
    pub fn logfmt(&self) -> String {
        let value = serde_json::to_value(self).expect("plain struct");
        let mut out = String::new();
        if let serde_json::Value::Object(map) = value {
            for (k, v) in map {
                let text = match v {
                    serde_json::Value::Null => continue,
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                if !out.is_empty() {
                    out.push(' ');
                }
                let quote = text.is_empty() || text.contains([' ', '"', '=', '\\']);
                if quote {
                    out.push_str(&format!("{k}={:?}", text));
                } else {
                    out.push_str(&format!("{k}={text}"));
                }
            }
        }
        out
    }
}

/// Lines go to a writer thread through a bounded queue: a slow disk never slows requests; when
/// the queue is full the line is dropped and counted.
struct AccessLog {
    tx: std::sync::mpsc::SyncSender<String>,
    format: LogFormat,
}

impl AccessLog {
    fn open(cfg: &AccessLogConfig) -> Result<Self, std::io::Error> {
        let mut out: Box<dyn Write + Send> = match &cfg.path {
            None => Box::new(std::io::stdout()),
            Some(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(8192);
        std::thread::Builder::new()
            .name("quicar-access-log".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    let _ = out.write_all(line.as_bytes());
                    // Batch what is queued, then flush once.
                    while let Ok(more) = rx.try_recv() {
                        let _ = out.write_all(more.as_bytes());
                    }
                    let _ = out.flush();
                }
            })?;
        Ok(Self {
            tx,
            format: cfg.format,
        })
    }

    fn send(&self, line: &AccessLine) -> bool {
        let mut text = match self.format {
            LogFormat::Json => serde_json::to_string(line).expect("plain struct"),
            LogFormat::Logfmt => line.logfmt(),
        };
        text.push('\n');
        self.tx.try_send(text).is_ok()
    }
}

const LIVE_SECONDS: usize = 300;

#[derive(Default)]
struct Live {
    current: Second,
    current_peers: HashMap<String, PeerSecond>,
    seconds: VecDeque<(u64, Second, HashMap<String, PeerSecond>)>,
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

/// W3C trace context: the trace id of a valid `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

/// A new `traceparent` (version 00, sampled) with random trace and span ids.
pub fn new_traceparent() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 24];
    let rng = ring::rand::SystemRandom::new();
    if rng.fill(&mut bytes).is_err() {
        // Never seen on Linux; a time-derived id still joins the two sidecars' logs.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes[..16].copy_from_slice(&nanos.to_be_bytes());
        bytes[16..].copy_from_slice(&(nanos as u64 | 1).to_le_bytes());
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("00-{}-{}-01", &hex[..32], &hex[32..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_validation() {
        let tp = new_traceparent();
        assert!(trace_id(&tp).is_some(), "{tp}");
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(trace_id(bad).is_none(), "{bad}");
        }
    }

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

    #[test]
    fn logfmt_quotes_what_needs_it() {
        let line = AccessLine {
            time: "t".into(),
            direction: "outbound".into(),
            service: "hello".into(),
            method: "GET".into(),
            authority: "hello".into(),
            path: "/a b".into(),
            status: 200,
            duration_ms: 1.5,
            bytes_in: 0,
            bytes_out: 2,
            transport: "quic".into(),
            peer_identity: None,
            endpoint: None,
            attempts: 1,
            cache: None,
            error_kind: None,
            trace_id: Some("abc".into()),
        };
        let text = line.logfmt();
        assert!(
            text.contains("path=\"/a b\"")
                && text.contains("status=200")
                && !text.contains("endpoint"),
            "{text}"
        );
    }
}
