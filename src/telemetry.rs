//! Telemetry in one place: a Prometheus recorder per sidecar and the per-request guard that
//! records metrics, the dashboard series and the access log exactly once.
//!
//! - `metrics`: every metric's name and help, and the closed label sets.
//! - `access_log`: the access log line and its writer thread.
//! - `dashboard`: the per-second series the dashboard draws.
//! - `trace`: W3C trace context.

mod access_log;
mod dashboard;
mod metrics;
mod trace;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ::metrics::{Counter, Gauge, Histogram, Key, Label, Recorder, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::body::{ByteCount, ByteCounts};
use crate::config::AccessLogConfig;
use crate::error::ErrorKind;
use crate::facts::{CacheOutcome, Transport};
use crate::identity::PeerId;
use access_log::{AccessLine, AccessLog};
pub use dashboard::DashboardData;
use dashboard::Live;
pub use metrics::*;
pub use trace::{ensure_traceparent, new_traceparent, trace_id};

static METADATA: ::metrics::Metadata<'static> =
    ::metrics::Metadata::new("quicar", ::metrics::Level::INFO, Some(module_path!()));

/// One sidecar's telemetry. Each sidecar has its own recorder (not the process-global one),
/// so two sidecars in one process (the demo, the tests) keep separate numbers.
pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    access: Option<AccessLog>,
    live: Mutex<Live>,
    ready: AtomicBool,
    started: Instant,
    started_at: SystemTime,
    /// The records of requests for no configured service ("-"): inbound, outbound.
    unknown: [Arc<ServiceTel>; 2],
}

/// One service's request telemetry, made once when its route (outbound) or local service
/// (inbound) is built, so a request finds its metric handles without hashing its labels or
/// allocating them: registering a handle builds and hashes the labels.
pub struct ServiceTel {
    direction: Direction,
    name: Arc<str>,
    /// Requests in flight for this service (none for "-").
    in_flight: Option<Gauge>,
    /// Handles per (transport, status class, error kind), registered on first use. A handful
    /// per service, so a scan, not a map.
    handles: Mutex<Vec<(HandleKey, Arc<RequestHandles>)>>,
}

/// The labels of one request's metrics beyond direction and service.
type HandleKey = (Option<Transport>, &'static str, Option<ErrorKind>);

/// The handles a finished request updates.
struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
}

/// One second's statistics of a QUIC connection to a peer endpoint (`quic_sample`): the
/// path's state now, and the packets counted since the last sample.
pub struct QuicSample {
    pub rtt: Duration,
    pub cwnd: u64,
    /// The largest UDP payload the connection sends (its MTU discovery's result).
    pub datagram: u16,
    pub lost: u64,
    pub sent: u64,
    pub received: u64,
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
            let name = ::metrics::KeyName::from_const_str(name);
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
            started_at: SystemTime::now(),
            unknown: [Direction::Inbound, Direction::Outbound].map(|d| {
                Arc::new(ServiceTel {
                    direction: d,
                    name: "-".into(),
                    in_flight: None,
                    handles: Mutex::default(),
                })
            }),
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

    /// The request telemetry of a configured service, made once per route or local service.
    pub fn service(&self, direction: Direction, name: &str) -> Arc<ServiceTel> {
        let in_flight = self.gauge(
            IN_FLIGHT,
            &[
                ("direction", direction.as_str().into()),
                ("service", name.to_string()),
            ],
        );
        Arc::new(ServiceTel {
            direction,
            name: name.into(),
            in_flight: Some(in_flight),
            handles: Mutex::default(),
        })
    }

    fn request_handles(&self, svc: &ServiceTel, key: HandleKey) -> Arc<RequestHandles> {
        let mut handles = svc.handles.lock().expect("not poisoned");
        if let Some((_, h)) = handles.iter().find(|(k, _)| *k == key) {
            return h.clone();
        }
        let (transport, class, kind) = key;
        let transport = transport.map_or("-", Transport::as_str);
        let dir = svc.direction.as_str();
        let base = [
            ("direction", dir.to_string()),
            ("service", svc.name.to_string()),
            ("transport", transport.to_string()),
        ];
        let h = Arc::new(RequestHandles {
            requests: self.counter(
                REQUESTS,
                &[
                    ("direction", dir.to_string()),
                    ("service", svc.name.to_string()),
                    ("transport", transport.to_string()),
                    ("status_class", class.into()),
                    ("error_kind", kind.map_or("none", ErrorKind::as_str).into()),
                ],
            ),
            duration: self.histogram(REQUEST_DURATION, &base),
            bytes_in: self.counter(REQUEST_BYTES, &base),
            bytes_out: self.counter(RESPONSE_BYTES, &base),
        });
        handles.push((key, h.clone()));
        h
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
            // Only the access log line says when the request began.
            time: self.access.as_ref().map(|_| SystemTime::now()),
            facts: Facts {
                direction,
                ..Facts::default()
            },
            service: match direction {
                Direction::Inbound => self.unknown[0].clone(),
                Direction::Outbound => self.unknown[1].clone(),
            },
            bytes: Arc::default(),
        }
    }

    /// A handshake that did not produce a usable connection.
    pub fn handshake_failed(&self, direction: Direction, reason: HandshakeFailure) {
        self.counter(
            HANDSHAKE_FAILURES,
            &[
                ("direction", direction.as_str().into()),
                ("reason", reason.as_str().into()),
            ],
        )
        .increment(1);
    }

    /// A connection between sidecars opened; the returned guard marks it closed when dropped.
    pub fn connection_opened(
        self: &Arc<Self>,
        direction: Direction,
        transport: Transport,
    ) -> ConnectionGuard {
        let labels = [
            ("direction", direction.as_str().to_string()),
            ("transport", transport.as_str().to_string()),
        ];
        self.counter(CONNECTIONS_OPENED, &labels).increment(1);
        let active = self.gauge(CONNECTIONS_ACTIVE, &labels);
        active.increment(1.0);
        ConnectionGuard(active)
    }

    /// QUIC path statistics of a peer endpoint's connection, sampled once a second.
    pub fn quic_sample(&self, peer: &str, s: &QuicSample) {
        let labels = [("peer", peer.to_string())];
        self.gauge(QUIC_RTT, &labels).set(s.rtt.as_secs_f64());
        self.gauge(QUIC_CWND, &labels).set(s.cwnd as f64);
        self.gauge(QUIC_DATAGRAM, &labels)
            .set(f64::from(s.datagram));
        self.counter(QUIC_LOST, &labels).increment(s.lost);
        self.counter(QUIC_SENT, &labels).increment(s.sent);
        self.counter(QUIC_RECEIVED, &labels).increment(s.received);
        self.live
            .lock()
            .expect("not poisoned")
            .peer(peer, s.rtt, s.cwnd, s.lost, s.sent);
    }

    pub fn cache_bytes(&self, service: &str, bytes: u64) {
        self.gauge(CACHE_BYTES, &[("service", service.to_string())])
            .set(bytes as f64);
    }

    /// Closes the current second of the dashboard series (called once a second).
    pub fn tick(&self) {
        let t = self.started.elapsed().as_secs();
        self.live.lock().expect("not poisoned").tick(t);
        // The exporter keeps every histogram sample in a queue until upkeep folds it into the
        // buckets; it ran only when /metrics was scraped, so a sidecar nobody scraped grew by
        // every request it served.
        self.handle.run_upkeep();
    }

    /// The series the dashboard draws, as JSON-ready data.
    pub fn dashboard_data(&self) -> DashboardData {
        let start_unix = self
            .started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        self.live.lock().expect("not poisoned").data(start_unix)
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
///
/// What only the access log reads (method, authority, path, caller, traceparent) is gathered
/// only when the log is on (`RequestGuard::logs`), kept as the request's own values (cheap to
/// clone) and turned into text only when a line is written.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub direction: Direction,
    pub transport: Option<Transport>,
    pub method: Option<http::Method>,
    pub authority: String,
    pub path: Option<http::uri::PathAndQuery>,
    pub status: u16,
    pub error_kind: Option<ErrorKind>,
    pub peer_identity: Option<Arc<PeerId>>,
    pub endpoint: Option<SocketAddr>,
    pub attempts: u32,
    pub cache: Option<CacheOutcome>,
    /// The request's `traceparent` as it went on (validated, or made by this sidecar).
    pub traceparent: Option<http::HeaderValue>,
}

/// Records metrics, the dashboard series and the access log line once, when dropped (after
/// the response body ended, or when the client went away).
pub struct RequestGuard {
    tel: Arc<Telemetry>,
    start: Instant,
    time: Option<SystemTime>,
    pub facts: Facts,
    /// The service's telemetry ("-" until `service`).
    service: Arc<ServiceTel>,
    /// Data bytes in (the request body) and out (the response body).
    bytes: Arc<ByteCounts>,
}

impl RequestGuard {
    /// Counts the request in flight for `service` from now until the guard drops.
    pub fn service(&mut self, service: &Arc<ServiceTel>) {
        if let Some(g) = &service.in_flight {
            g.increment(1.0);
        }
        self.service = service.clone();
    }

    pub(crate) fn bytes_in(&self) -> ByteCount {
        ByteCount::up(&self.bytes)
    }

    pub(crate) fn bytes_out(&self) -> ByteCount {
        ByteCount::down(&self.bytes)
    }

    /// Whether an access log line will be written: the facts only it reads (authority, path,
    /// method, caller, trace) are worth gathering only then.
    pub(crate) fn logs(&self) -> bool {
        self.tel.access.is_some()
    }

    /// When the request began (the sidecar took it).
    pub(crate) fn began(&self) -> Instant {
        self.start
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let svc = &self.service;
        if let Some(g) = &svc.in_flight {
            g.decrement(1.0);
        }
        let f = &self.facts;
        let elapsed = self.start.elapsed();
        let class = match f.status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "none",
        };
        let handles = self
            .tel
            .request_handles(svc, (f.transport, class, f.error_kind));
        handles.requests.increment(1);
        handles.duration.record(elapsed.as_secs_f64());
        let bytes_in = self.bytes.up.load(Ordering::Relaxed);
        let bytes_out = self.bytes.down.load(Ordering::Relaxed);
        handles.bytes_in.increment(bytes_in);
        handles.bytes_out.increment(bytes_out);
        if let (Some(cache), Direction::Outbound) = (&f.cache, f.direction) {
            self.tel
                .counter(
                    CACHE_REQUESTS,
                    &[
                        ("service", svc.name.to_string()),
                        ("result", cache.as_str().into()),
                    ],
                )
                .increment(1);
        }
        self.tel.live.lock().expect("not poisoned").request(
            f.direction,
            &svc.name,
            f.transport,
            elapsed,
            f.error_kind,
            f.cache,
        );
        if let Some(log) = &self.tel.access {
            let line = AccessLine {
                time: humantime::format_rfc3339_millis(self.time.unwrap_or_else(SystemTime::now))
                    .to_string(),
                direction: f.direction.as_str().to_string(),
                service: svc.name.to_string(),
                method: f.method.as_ref().map_or("", |m| m.as_str()).to_string(),
                authority: f.authority.clone(),
                path: f.path.as_ref().map_or("", |p| p.path()).to_string(),
                status: f.status,
                duration_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
                bytes_in,
                bytes_out,
                transport: f.transport.map_or("-", Transport::as_str).to_string(),
                peer_identity: f.peer_identity.as_ref().map(|p| p.to_string()),
                endpoint: f.endpoint.map(|e| e.to_string()),
                attempts: f.attempts,
                cache: f.cache.map(|c| c.as_str().to_string()),
                error_kind: f.error_kind.map(|k| k.as_str().to_string()),
                trace_id: f
                    .traceparent
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .and_then(trace_id)
                    .map(str::to_string),
            };
            if !log.send(&line) {
                self.tel.counter(ACCESS_LOG_DROPPED, &[]).increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes allocated and not yet freed, process-wide (the unit tests' counting allocator).
    fn live_bytes() -> i64 {
        let s = crate::test_alloc::GLOBAL.stats();
        s.bytes_allocated as i64 - s.bytes_deallocated as i64
    }

    #[test]
    fn histogram_samples_do_not_pile_up_when_nobody_scrapes() {
        let tel = Telemetry::new(&AccessLogConfig::default()).unwrap();
        let h = tel.histogram(REQUEST_DURATION, &[("direction", "outbound".into())]);
        let before = live_bytes();
        for _ in 0..1_000_000 {
            h.record(0.001);
        }
        let queued = live_bytes() - before;
        // The exporter queues each sample (8 bytes and more) until upkeep…
        assert!(
            queued > 4 << 20,
            "samples are queued until upkeep: {queued} bytes"
        );
        // …which the once-a-second tick runs, with or without a scrape. (The queue's blocks
        // are freed by epoch-based reclamation, a few ticks and samples later.)
        for _ in 0..64 {
            tel.tick();
            h.record(0.001);
        }
        let left = live_bytes() - before;
        assert!(
            left < queued / 4,
            "{left} of {queued} bytes still held after the tick"
        );
    }
}
