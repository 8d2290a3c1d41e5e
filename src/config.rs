//! The sidecar's configuration: TOML parsed with unknown keys refused, then validated so that
//! every error names the file, the key and what is wrong, before anything binds.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::peer_id::PeerId;

/// A configuration problem, always naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

/// The whole configuration of one sidecar, as in effect (paths resolved, defaults filled).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: Node,
    pub identity: IdentityFiles,
    #[serde(default)]
    pub outbound: Outbound,
    #[serde(default)]
    pub inbound: Inbound,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub quic: Quic,
    #[serde(default)]
    pub access_log: AccessLogConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local: Vec<Local>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service: Vec<Service>,
}

/// `base/rel` with `.` and `dir/..` folded away (lexically: paths are shown and opened as the
/// user would write them, `config/../certs/web.crt` is `certs/web.crt`).
fn join_tidy(base: &Path, rel: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// A name for logs; defaults to the host name-free "quicar".
    #[serde(default = "default_node_name")]
    pub name: String,
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// How long a stopping sidecar lets in-flight requests finish.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Threads that run the sidecar's work (tokio workers). A sidecar shares its machine with
    /// the app it serves; see `DEFAULT_WORKER_THREADS` for why the default is what it is.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
}

/// The default `node.worker_threads` (measured: BENCHMARKS.md, "Worker threads").
pub const DEFAULT_WORKER_THREADS: usize = 1;

fn default_worker_threads() -> usize {
    DEFAULT_WORKER_THREADS
}

impl Default for Node {
    fn default() -> Self {
        Self {
            name: default_node_name(),
            trust_domain: default_trust_domain(),
            drain_timeout: default_drain_timeout(),
            worker_threads: default_worker_threads(),
        }
    }
}

/// PEM files of this sidecar's identity; relative paths are relative to the config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// How often the files are checked for changes (rotation without restart).
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    #[serde(default = "default_outbound_listen")]
    pub listen: SocketAddr,
    /// Largest request header section accepted from the app, in bytes.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Time the app has to send a complete header section on a connection.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A response the app takes no byte of for this long is cut: its connection is closed and
    /// the exchange cancelled, so the far sidecar frees its app (Envoy's `stream_idle_timeout`
    /// covers the same). Only a reader that stopped counts; a slow response does not.
    #[serde(default = "default_response_stall_timeout", with = "humantime_serde")]
    pub response_stall_timeout: Duration,
    /// Add `quicar-transport: quic|tcp` to responses from peers.
    #[serde(default = "yes")]
    pub transport_header: bool,
    /// App connections open at once; a connection over the cap is answered
    /// `503 overloaded` and closed.
    #[serde(default = "default_outbound_connections")]
    pub max_connections: usize,
}

fn default_outbound_connections() -> usize {
    10_000
}

impl Default for Outbound {
    fn default() -> Self {
        Self {
            listen: default_outbound_listen(),
            max_header_bytes: default_max_header_bytes(),
            header_read_timeout: default_header_read_timeout(),
            response_stall_timeout: default_response_stall_timeout(),
            transport_header: true,
            max_connections: default_outbound_connections(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    #[serde(default = "default_inbound_listen")]
    pub listen: SocketAddr,
    /// Time allowed to connect to a local app.
    #[serde(default = "default_local_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Accept QUIC (UDP) from peers.
    #[serde(default = "yes")]
    pub quic: bool,
    /// Accept TLS + HTTP/2 (TCP) from peers, on the same port number.
    #[serde(default = "yes")]
    pub tcp: bool,
    /// Connections one peer identity may hold open at once (over both transports); more are
    /// refused at the handshake.
    #[serde(default = "default_connections_per_peer")]
    pub max_connections_per_peer: usize,
    /// Time a peer has to send a request's head on an HTTP/3 stream; then the stream is reset
    /// (`H3_REQUEST_INCOMPLETE`).
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A response the peer takes no byte of for this long is cut: the stream is reset and the
    /// app's connection closed. Only a reader that stopped counts; a slow response does not.
    #[serde(default = "default_response_stall_timeout", with = "humantime_serde")]
    pub response_stall_timeout: Duration,
    /// Requests from all peers in flight at once in this sidecar; more get `503 overloaded`.
    #[serde(default = "default_inbound_requests")]
    pub max_requests: usize,
}

fn yes() -> bool {
    true
}

impl Default for Inbound {
    fn default() -> Self {
        Self {
            listen: default_inbound_listen(),
            connect_timeout: default_local_connect_timeout(),
            quic: true,
            tcp: true,
            max_connections_per_peer: default_connections_per_peer(),
            header_read_timeout: default_header_read_timeout(),
            response_stall_timeout: default_response_stall_timeout(),
            max_requests: default_inbound_requests(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

/// One structured line per request, written off the request path.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub format: LogFormat,
    /// A file to append to; absent = standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Logfmt,
}

/// QUIC transport tuning shared by the client and server side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quic {
    /// A connection with no request for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Concurrent request streams a peer may open on one connection.
    #[serde(default = "default_max_streams")]
    pub max_concurrent_streams: u32,
    /// Keep-alive pings on open connections, so a dead peer is noticed between requests.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    /// A peer silent for this long is considered gone and its connection dropped (QUIC waits
    /// at least three probe timeouts, so a long-RTT path is never cut short). Requests on a
    /// dropped connection fail at once (and are retried when safe) instead of waiting for the
    /// service timeout.
    #[serde(default = "default_dead_peer", with = "humantime_serde")]
    pub dead_peer_timeout: Duration,
    /// `auto` services: first wait before an endpoint that fell back to TCP tries QUIC again
    /// (doubling up to 60 s).
    #[serde(default = "default_fallback_retry", with = "humantime_serde")]
    pub fallback_retry: Duration,
    /// The QUIC congestion controller (default BBR, our own over quinn's trait: every random
    /// loss shrinks Cubic's window, so on a lossy link Cubic's latency collapses).
    #[serde(default)]
    pub congestion: Congestion,
    /// UDP segmentation offload (GSO): send several datagrams per system call. Turn it off
    /// when a peer reads with 1,500-byte buffers and drops batched packets (a stock Envoy
    /// HTTP/3 listener without `prefer_gro: true`).
    #[serde(default = "yes")]
    pub segmentation_offload: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    Cubic,
    Newreno,
    /// The default: it holds under random loss, where Cubic collapses (BENCHMARKS.md).
    #[default]
    Bbr,
}

impl Congestion {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cubic => "cubic",
            Self::Newreno => "newreno",
            Self::Bbr => "bbr",
        }
    }
}

fn default_fallback_retry() -> Duration {
    Duration::from_secs(5)
}

impl Default for Quic {
    fn default() -> Self {
        Self {
            idle_timeout: default_idle_timeout(),
            max_concurrent_streams: default_max_streams(),
            keep_alive_interval: default_keep_alive(),
            dead_peer_timeout: default_dead_peer(),
            fallback_retry: default_fallback_retry(),
            congestion: Congestion::default(),
            segmentation_offload: true,
        }
    }
}

/// A service this sidecar fronts: requests for `name` arriving from peers go to `address`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Local {
    pub name: String,
    pub address: SocketAddr,
    /// SPIFFE IDs allowed to call; absent means any identity of the trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    /// How long the app gets to answer when the caller sent no deadline (other vendors'
    /// callers), counted from the end of the request body.
    #[serde(default = "default_local_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Requests (so connections) to the app at once; more wait up to a second for one to
    /// finish, then get `503 overloaded`.
    #[serde(default = "default_local_max_concurrent")]
    pub max_concurrent: usize,
    /// Largest request body the app accepts through the sidecar: `413 body-too-large`
    /// beyond it. Absent = no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<ByteSize>,
}

/// A remote service the local app calls through this sidecar.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default)]
    pub transport: TransportKind,
    /// Budget until the response headers arrive, counted from the end of the request body
    /// (an upload that keeps moving is never cut by it; see `body_idle_timeout`).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A request body that sends nothing for this long is cut (`504 timeout`).
    #[serde(default = "default_body_idle_timeout", with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// Largest request body the app may send to this service; larger ones get
    /// `413 body-too-large` (sized: before anything is sent; chunked: when crossed, and the
    /// stream is reset so nothing half-sent passes as whole). Absent = no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<ByteSize>,
    /// Budget for reaching and handshaking with a peer sidecar.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Where endpoints come from when not listed in `endpoints`: a watched file or DNS SRV.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Requests to this service in flight at once; more get `503 overloaded`.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// A response cache for this service in this (calling) sidecar; absent = no caching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
}

/// Exactly one of `file` or `dns`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// A TOML (`endpoints = [{ address, identity, weight }]`) or JSON file, reloaded on change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// An SRV name, e.g. `_hello._udp.mesh.example.`
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// The DNS server to ask (default: the system resolver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<SocketAddr>,
    /// Identity template for DNS endpoints: `{trust_domain}`, `{service}`, `{target}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// File: how often it is checked. DNS: the shortest refresh, whatever the TTL.
    #[serde(default = "default_discovery_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// DNS: the longest refresh, whatever the TTL.
    #[serde(default = "default_discovery_max_interval", with = "humantime_serde")]
    pub max_interval: Duration,
}

/// When and how often a failed request is tried again.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Tries in all, the first included (1 = no retries).
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Statuses from the peer that an idempotent request is retried on.
    #[serde(default = "default_retry_statuses")]
    pub statuses: Vec<u16>,
    /// Retries may add this fraction of the service's requests (over `budget_window`)…
    #[serde(default = "default_budget_ratio")]
    pub budget_ratio: f64,
    /// …plus this many per second, so a quiet service can still retry.
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
    #[serde(default = "default_budget_window", with = "humantime_serde")]
    pub budget_window: Duration,
    /// First back-off; doubles per retry (full jitter), up to `max_backoff`.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    pub backoff: Duration,
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Request bodies up to this size are kept for a replay; larger ones are never retried
    /// once sent.
    #[serde(default = "default_retry_body")]
    pub max_body: ByteSize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: default_attempts(),
            statuses: default_retry_statuses(),
            budget_ratio: default_budget_ratio(),
            min_per_second: default_min_per_second(),
            budget_window: default_budget_window(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
            max_body: default_retry_body(),
        }
    }
}

/// Per-endpoint circuit breaker and outlier ejection. Only failures of the path to the peer
/// count by default: connect and handshake failures, and the peer sidecar resetting or losing
/// the connection. App statuses, client aborts, malformed request bodies and the caller's own
/// deadline never count unless opted in below.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive path failures that eject an endpoint.
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    /// Response statuses that also count as failures (opt-in, e.g. `[503]` for an app that
    /// sheds load with 503). Empty by default: an app's own errors never eject it.
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// Count 502/503/504 that the far sidecar itself generated (its app unreachable, its
    /// deadline passed), like Envoy's consecutive gateway failures. Off by default.
    #[serde(default)]
    pub gateway_errors: bool,
    /// Panic threshold, in percent of a service's endpoints: when fewer than this share admit
    /// requests, breakers are ignored and every endpoint takes traffic (Envoy's
    /// `healthy_panic_threshold`), so ejection never takes a whole service down. 0 disables
    /// it (then all endpoints can be ejected and requests get `503 circuit-open`).
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u8,
    /// First ejection; doubles for each consecutive ejection, up to `max_ejection`. After it,
    /// one probe request is let through (half-open).
    #[serde(default = "default_ejection", with = "humantime_serde")]
    pub ejection: Duration,
    #[serde(default = "default_max_ejection", with = "humantime_serde")]
    pub max_ejection: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: default_breaker_failures(),
            statuses: Vec::new(),
            gateway_errors: false,
            panic_threshold: default_panic_threshold(),
            ejection: default_ejection(),
            max_ejection: default_max_ejection(),
        }
    }
}

fn default_discovery_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_discovery_max_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_attempts() -> u32 {
    3
}
fn default_retry_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}
fn default_budget_ratio() -> f64 {
    0.2
}
fn default_min_per_second() -> u32 {
    10
}
fn default_budget_window() -> Duration {
    Duration::from_secs(10)
}
fn default_backoff() -> Duration {
    Duration::from_millis(25)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_body() -> ByteSize {
    ByteSize(64 << 10)
}
fn default_breaker_failures() -> u32 {
    5
}
fn default_panic_threshold() -> u8 {
    50
}
fn default_ejection() -> Duration {
    Duration::from_secs(5)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(60)
}
fn default_local_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_local_max_concurrent() -> usize {
    1024
}
fn default_connections_per_peer() -> usize {
    64
}
fn default_inbound_requests() -> usize {
    16_384
}
fn default_body_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_concurrent() -> usize {
    10_000
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Total bytes of stored bodies (and a small per-entry overhead) for this service.
    #[serde(default = "default_cache_bytes")]
    pub max_bytes: ByteSize,
    /// Responses with larger bodies pass through and are not stored.
    #[serde(default = "default_cache_entry_bytes")]
    pub max_entry_bytes: ByteSize,
    /// Targeted cache-control fields (RFC 9213) this cache obeys instead of `Cache-Control`,
    /// first present wins. `Quicar-Cache-Control` is removed before the app sees the response.
    #[serde(default = "default_targeted")]
    pub targeted: Vec<String>,
    /// When the peer cannot be reached (connect failure, every endpoint ejected, none known;
    /// not an app status), a stored response up to this long past its freshness answers.
    /// Absent: only the response's own `stale-if-error` allows that.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "humantime_serde::option"
    )]
    pub serve_stale_on_connect_failure: Option<Duration>,
}

fn default_targeted() -> Vec<String> {
    vec!["quicar-cache-control".into()]
}

/// A size in bytes: an integer, or a string with a unit (`"64MiB"`, `"512KiB"`, `"1GB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Self(n)),
            Raw::S(s) => Self::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (e.g. 1048576, \"512KiB\", \"64MiB\")"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` (use B, KiB, MiB, GiB, KB, MB, GB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| format!("`{s}` is too large"))
    }
}

fn default_cache_bytes() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_cache_entry_bytes() -> ByteSize {
    ByteSize(1 << 20)
}

/// One peer sidecar serving a service, and the identity it must prove.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// Defaults to `spiffe://<trust_domain>/<service>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Relative share of traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// TLS server name (SNI) sent to this endpoint. Default: the trust domain. Set it when the
    /// peer picks its certificate or filter chain by name (an Envoy/Istio listener with
    /// `server_names`). quicar itself checks the SPIFFE ID, never the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// HTTP/3 over QUIC.
    #[default]
    Quic,
    /// HTTP/2 over TLS 1.3 over TCP.
    Tcp,
    /// QUIC, falling back to TCP per endpoint when the QUIC handshake fails or times out
    /// (UDP blocked), and trying QUIC again in the background after a back-off.
    Auto,
}

fn default_node_name() -> String {
    "quicar".into()
}
fn default_trust_domain() -> String {
    "quicar.local".into()
}
fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reload_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_outbound_listen() -> SocketAddr {
    ([127, 0, 0, 1], 4140).into()
}
fn default_inbound_listen() -> SocketAddr {
    ([0, 0, 0, 0], 4143).into()
}
fn default_admin_listen() -> SocketAddr {
    ([127, 0, 0, 1], 9901).into()
}
fn default_max_header_bytes() -> usize {
    64 * 1024
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(30)
}
/// Envoy's `stream_idle_timeout` default.
fn default_response_stall_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_local_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
/// Five minutes: a connection outlives the gaps of periodic traffic (a poll or a job every
/// minute or few), so its next burst does not wait for a handshake, which on a lossy path can
/// lose a datagram and wait three RTTs for it (BENCHMARKS.md, twenty-eighth session). Envoy
/// keeps an idle upstream connection an hour, Linkerd's outbound proxy five seconds; what an
/// idle one costs here is a keep-alive exchange a second and its state.
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_max_streams() -> u32 {
    1024
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(1)
}
fn default_dead_peer() -> Duration {
    Duration::from_secs(3)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Config {
    /// Reads, parses and validates a config file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, &file, base)
    }

    /// Parses config text; `file` names it in errors, `base` anchors relative paths.
    pub fn parse(text: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_string(),
            message: describe_toml_error(&e),
        })?;
        for p in [
            &mut config.identity.cert,
            &mut config.identity.key,
            &mut config.identity.ca,
        ]
        .into_iter()
        .chain(config.access_log.path.as_mut())
        .chain(
            config
                .service
                .iter_mut()
                .filter_map(|s| s.discovery.as_mut().and_then(|d| d.file.as_mut())),
        ) {
            if p.is_relative() {
                *p = join_tidy(base, p);
            }
        }
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                file: file.to_string(),
                key,
                message,
            })?;
        Ok(config)
    }

    /// Checks what serde cannot: names, identities, duplicates. Returns the key and the problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let td = &self.node.trust_domain;
        // SPIFFE's rule (what a certificate's ID is parsed by): lower-case letters, digits,
        // '-', '.', '_'. Every default identity is built from it.
        if PeerId::parse(&format!("spiffe://{td}/x")).is_err() {
            return Err((
                "node.trust_domain".into(),
                format!(
                    "`{td}` is not a trust domain name (lower-case letters, digits, '-', '.', '_')"
                ),
            ));
        }
        if !(1..=1024).contains(&self.node.worker_threads) {
            return Err((
                "node.worker_threads".into(),
                "must be between 1 and 1024".into(),
            ));
        }
        if !self.inbound.quic && !self.inbound.tcp {
            return Err((
                "inbound".into(),
                "at least one of `quic` and `tcp` must be true".into(),
            ));
        }
        if self.quic.max_concurrent_streams == 0 {
            return Err((
                "quic.max_concurrent_streams".into(),
                "must be at least 1".into(),
            ));
        }
        if self.quic.keep_alive_interval >= self.quic.dead_peer_timeout {
            return Err((
                "quic.keep_alive_interval".into(),
                "must be shorter than quic.dead_peer_timeout".into(),
            ));
        }
        if self.outbound.max_header_bytes < 8192 {
            return Err((
                "outbound.max_header_bytes".into(),
                "must be at least 8192".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, local) in self.local.iter().enumerate() {
            let key = format!("local[{i}]");
            check_name(&local.name).map_err(|m| (format!("{key}.name"), m))?;
            if !seen.insert(local.name.to_ascii_lowercase()) {
                return Err((
                    format!("{key}.name"),
                    format!("`{}` is defined twice", local.name),
                ));
            }
            for (j, id) in local.allow.iter().flatten().enumerate() {
                PeerId::parse(id).map_err(|e| (format!("{key}.allow[{j}]"), e.to_string()))?;
            }
            if local.max_concurrent == 0 {
                return Err((format!("{key}.max_concurrent"), "must be at least 1".into()));
            }
            if local.timeout.is_zero() {
                return Err((format!("{key}.timeout"), "must be more than 0".into()));
            }
        }
        for (key, limit) in [
            (
                "outbound.header_read_timeout",
                self.outbound.header_read_timeout,
            ),
            (
                "inbound.header_read_timeout",
                self.inbound.header_read_timeout,
            ),
            (
                "outbound.response_stall_timeout",
                self.outbound.response_stall_timeout,
            ),
            (
                "inbound.response_stall_timeout",
                self.inbound.response_stall_timeout,
            ),
        ] {
            if limit.is_zero() {
                return Err((key.into(), "must be more than 0".into()));
            }
        }
        if self.inbound.max_connections_per_peer == 0 || self.inbound.max_requests == 0 {
            return Err((
                "inbound.max_connections_per_peer / inbound.max_requests".into(),
                "must be at least 1".into(),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, svc) in self.service.iter().enumerate() {
            let key = format!("service[{i}]");
            check_name(&svc.name).map_err(|m| (format!("{key}.name"), m))?;
            if !seen.insert(svc.name.to_ascii_lowercase()) {
                return Err((
                    format!("{key}.name"),
                    format!("`{}` is defined twice", svc.name),
                ));
            }
            match (&svc.discovery, svc.endpoints.is_empty()) {
                (None, true) => {
                    return Err((
                        format!("{key}.endpoints"),
                        "a service needs endpoints or a discovery source".into(),
                    ))
                }
                (Some(_), false) => {
                    return Err((
                        format!("{key}.discovery"),
                        "give either endpoints or discovery, not both".into(),
                    ))
                }
                (Some(d), true) => {
                    if d.file.is_some() == d.dns.is_some() {
                        return Err((
                            format!("{key}.discovery"),
                            "set exactly one of `file` or `dns`".into(),
                        ));
                    }
                    if let Some(t) = &d.identity {
                        let probe = t
                            .replace("{trust_domain}", td)
                            .replace("{service}", &svc.name)
                            .replace("{target}", "target");
                        PeerId::parse(&probe)
                            .map_err(|e| (format!("{key}.discovery.identity"), e.to_string()))?;
                    }
                }
                (None, false) => {}
            }
            if svc.retry.attempts == 0 {
                return Err((format!("{key}.retry.attempts"), "must be at least 1".into()));
            }
            if !(0.0..=10.0).contains(&svc.retry.budget_ratio) {
                return Err((
                    format!("{key}.retry.budget_ratio"),
                    "must be between 0 and 10".into(),
                ));
            }
            if svc.breaker.failures == 0 {
                return Err((
                    format!("{key}.breaker.failures"),
                    "must be at least 1".into(),
                ));
            }
            if svc.breaker.panic_threshold > 100 {
                return Err((
                    format!("{key}.breaker.panic_threshold"),
                    "is a percentage: 0 to 100".into(),
                ));
            }
            if let Some(bad) = svc
                .breaker
                .statuses
                .iter()
                .find(|s| !(100..=599).contains(*s))
            {
                return Err((
                    format!("{key}.breaker.statuses"),
                    format!("{bad} is not an HTTP status"),
                ));
            }
            if svc.max_concurrent == 0 {
                return Err((format!("{key}.max_concurrent"), "must be at least 1".into()));
            }
            for (j, ep) in svc.endpoints.iter().enumerate() {
                if let Some(id) = &ep.identity {
                    PeerId::parse(id)
                        .map_err(|e| (format!("{key}.endpoints[{j}].identity"), e.to_string()))?;
                }
            }
            if svc.timeout.is_zero() {
                return Err((format!("{key}.timeout"), "must be more than 0".into()));
            }
            if let Some(cache) = &svc.cache {
                for (j, name) in cache.targeted.iter().enumerate() {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        return Err((
                            format!("{key}.cache.targeted[{j}]"),
                            format!("`{name}` is not a header field name"),
                        ));
                    }
                }
                if cache.max_entry_bytes.0 > cache.max_bytes.0 {
                    return Err((
                        format!("{key}.cache.max_entry_bytes"),
                        "must not exceed cache.max_bytes".into(),
                    ));
                }
            }
            if svc.connect_timeout.is_zero() {
                return Err((
                    format!("{key}.connect_timeout"),
                    "must be more than 0".into(),
                ));
            }
        }
        Ok(())
    }

    /// The identity an endpoint of `service` must present.
    pub fn expected_identity(&self, service: &Service, endpoint: &Endpoint) -> PeerId {
        match &endpoint.identity {
            Some(id) => PeerId::parse(id).expect("validated"),
            None => PeerId::for_service(&self.node.trust_domain, &service.name),
        }
    }

    /// The effective configuration as TOML, for `quicar check` and `/config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Service names are DNS labels (possibly dotted): they travel as `:authority`.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid service name (letters, digits, '-', '_', '.')"
        ))
    }
}

/// toml's own message names the line, column and key and quotes the offending line.
fn describe_toml_error(e: &toml::de::Error) -> String {
    e.to_string().trim_end().replace("TOML parse error at ", "")
}
