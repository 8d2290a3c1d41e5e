//! Every metric's name, kind and help in one table, and the closed label sets (direction,
//! handshake failure reason) they are labelled with.

use serde::Serialize;

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
pub const QUIC_DATAGRAM: &str = "quicar_quic_datagram_bytes";
pub const QUIC_LOST: &str = "quicar_quic_lost_packets_total";
pub const QUIC_SENT: &str = "quicar_quic_sent_datagrams_total";
pub const QUIC_RECEIVED: &str = "quicar_quic_received_datagrams_total";
pub const CACHE_REQUESTS: &str = "quicar_cache_requests_total";
pub const CACHE_BYTES: &str = "quicar_cache_stored_bytes";
pub const ACCESS_LOG_DROPPED: &str = "quicar_access_log_dropped_lines_total";
pub const RETRIES: &str = "quicar_retries_total";
pub const BUDGET_EXHAUSTED: &str = "quicar_retry_budget_exhausted_total";
pub const EJECTIONS: &str = "quicar_endpoint_ejections_total";
pub const BREAKER_STATE: &str = "quicar_endpoint_breaker_state";

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
        QUIC_DATAGRAM,
        "gauge",
        "Largest UDP payload the QUIC connection to a peer endpoint sends (as its MTU discovery found it).",
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
    (
        RETRIES,
        "counter",
        "Retries sent, by service and reason (never-sent, error, status).",
    ),
    (
        BUDGET_EXHAUSTED,
        "counter",
        "Retries not sent because the service's retry budget was spent.",
    ),
    (
        EJECTIONS,
        "counter",
        "Endpoints ejected by their circuit breaker, by service.",
    ),
    (
        BREAKER_STATE,
        "gauge",
        "Circuit breaker of an endpoint: 0 closed, 1 half-open (next request probes), 2 open (ejected).",
    ),
];

/// Latency buckets from 100 µs to 10 s: loopback hops are sub-millisecond, WAN ones are not.
pub(super) const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

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

/// Why a handshake did not produce a usable connection (a bounded label, read from the TLS
/// alert or the rustls error, never from error text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    NoCertificate,
    Expired,
    UnknownCa,
    BadCertificate,
    IdentityMismatch,
    ForeignTrustDomain,
    NoIdentity,
    Timeout,
    /// The peer refused the connection (draining).
    Refused,
    /// The peer identity already holds `inbound.max_connections_per_peer` connections.
    TooManyConnections,
    Other,
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no-certificate",
            Self::Expired => "expired",
            Self::UnknownCa => "unknown-ca",
            Self::BadCertificate => "bad-certificate",
            Self::IdentityMismatch => "identity-mismatch",
            Self::ForeignTrustDomain => "foreign-trust-domain",
            Self::NoIdentity => "no-identity",
            Self::Timeout => "timeout",
            Self::Refused => "refused",
            Self::TooManyConnections => "too-many-connections",
            Self::Other => "other",
        }
    }
}
