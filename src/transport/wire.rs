//! What both wires share: their limits, what one attempt uploads, how an attempt fails, the
//! response head a peer sends as the request path sees it, and handshake failures read from
//! the typed TLS alert or rustls error (never from error text).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::BodyExt;

use crate::body::{empty, full, BodyError, ProxyBody};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::headers;
use crate::identity::PeerId;
use crate::telemetry::{Direction, HandshakeFailure, Telemetry};

/// `make()`'s future, boxed where it is built. `Box::pin(make())` builds the future on the
/// stack and then copies it whole into the box: for a request's task or exchange that is
/// kilobytes copied a request (4.3 KB for the far side's HTTP/2 stream task, 523 instructions
/// of `memcpy`). With the box allocated first, the compiler writes the future's arguments
/// straight into it.
#[inline(always)]
pub(crate) fn boxed<F>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    let room = Box::new_uninit();
    Box::into_pin(Box::write(room, make()))
}

/// Largest header section we accept or send, on HTTP/3 and HTTP/2 alike.
pub(crate) const MAX_FIELD_SECTION: u64 = 64 * 1024;
/// Flow-control windows, both wires: a reader that stops holds at most `STREAM_WINDOW` on its
/// stream and all of them together at most `CONNECTION_WINDOW`, so memory stays bounded
/// whatever the body size. The connection's window is credited only as readers take their
/// data, so readers that stop hold it too: it is `CONNECTION_STREAMS` streams' windows, so
/// that it takes that many callers that stopped reading (or apps that stopped taking an
/// upload) to stop every other request on the connection; at 16 stream windows, 16 did
/// (`faults::readers_that_stop_do_not_hold_the_other_requests_to_their_peer`). 256 MiB is the
/// most a connection can buffer, as in Envoy's default HTTP/2 window.
pub(crate) const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_STREAMS: u32 = 256;
pub(crate) const CONNECTION_WINDOW: u32 = CONNECTION_STREAMS * STREAM_WINDOW;
/// The most a QUIC connection sends without acknowledgment (quinn's `send_window`): a bound on
/// what the sender buffers, which flow control does not need to match.
pub(crate) const SEND_WINDOW: u64 = 16 * 1024 * 1024;
/// How long an inbound TLS-over-TCP handshake may take.
pub(crate) const TLS_ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// What one attempt uploads.
pub(crate) enum Upload {
    Empty,
    /// A body buffered whole (so it can be sent again), with its trailers.
    Bytes(Bytes, Option<HeaderMap>),
    /// A body streamed as the app sends it: one attempt only.
    Stream(ProxyBody),
}

impl Upload {
    /// The streaming body, when an attempt failed before reading any of it.
    pub(crate) fn unread(self) -> Option<ProxyBody> {
        match self {
            Self::Stream(b) => Some(b),
            _ => None,
        }
    }

    /// A second copy for another wire, when the body is held whole.
    pub(crate) fn replay(&self) -> Option<Self> {
        match self {
            Self::Empty => Some(Self::Empty),
            Self::Bytes(b, t) => Some(Self::Bytes(b.clone(), t.clone())),
            Self::Stream(_) => None,
        }
    }

    /// As a request body for hyper (HTTP/2).
    pub(crate) fn into_body(self) -> ProxyBody {
        match self {
            Self::Empty => empty(),
            Self::Bytes(b, None) => full(b),
            Self::Bytes(b, Some(t)) => {
                let frames: Vec<Result<http_body::Frame<Bytes>, BodyError>> = vec![
                    Ok(http_body::Frame::data(b)),
                    Ok(http_body::Frame::trailers(t)),
                ];
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
            }
            Self::Stream(b) => b,
        }
    }
}

/// A failed attempt: why, and the request body when it was never read (a retry can send it).
pub(crate) struct SendError {
    pub(crate) error: ProxyError,
    pub(crate) unsent: Option<ProxyBody>,
}

impl SendError {
    pub(crate) fn new(error: ProxyError, unsent: Option<ProxyBody>) -> Self {
        Self { error, unsent }
    }
}

/// A pooled connection's state, for `/endpoints`.
pub(crate) struct ConnState {
    pub(crate) alive: bool,
    pub(crate) rtt: Option<Duration>,
    /// QUIC: the largest UDP payload the connection sends now (what MTU discovery found).
    pub(crate) datagram_bytes: Option<u16>,
    pub(crate) in_flight: usize,
    pub(crate) close_reason: Option<String>,
}

/// A peer's response head as the request path sees it: hop-by-hop headers gone, HTTP/1.1, the
/// peer sidecar's `quicar-error` read into an `ErrorKind` extension and every `quicar-*`
/// header dropped (the edge writes ours). `body` makes the body, or none for HEAD, 204 and
/// 304 (then `body`, and what it holds, is dropped).
pub(crate) fn from_peer(
    mut parts: http::response::Parts,
    method: &Method,
    body: impl FnOnce() -> ProxyBody,
) -> Response<ProxyBody> {
    headers::strip_hop_by_hop(&mut parts.headers);
    // The peer sidecar's own fields (its error kind) and any `quicar-*` its app sent: nearly
    // always none, so looked for without a lookup.
    if headers::has_quicar(&parts.headers) {
        if let Some(kind) = headers::error_kind(&parts.headers) {
            parts.extensions.insert(kind);
        }
        headers::strip_quicar_from_response(&mut parts.headers);
    }
    parts.version = http::Version::HTTP_11;
    let bodyless = *method == Method::HEAD
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    Response::from_parts(parts, if bodyless { empty() } else { body() })
}

/// The slot our certificate verifier fills when a peer presents another identity.
pub(crate) type Mismatch = Arc<Mutex<Option<String>>>;

/// A failed client handshake, classified: the identity the verifier refused (recorded in
/// `mismatch`), or the TLS alert. Counts it and logs it once.
pub(crate) fn handshake_failed(
    tel: &Telemetry,
    mismatch: &Mismatch,
    addr: SocketAddr,
    expected: &PeerId,
    failure: HandshakeFailure,
    detail: &dyn std::fmt::Display,
) -> ProxyError {
    if let Some(presented) = mismatch.lock().expect("not poisoned").take() {
        tel.handshake_failed(Direction::Outbound, HandshakeFailure::IdentityMismatch);
        tracing::warn!(peer = %addr, %expected, %presented, "peer identity refused");
        return ProxyError::new(
            ErrorKind::IdentityMismatch,
            Side::Peer,
            format!("peer {addr} presented {presented}, expected {expected}"),
        )
        .never_sent();
    }
    tel.handshake_failed(Direction::Outbound, failure);
    tracing::warn!(peer = %addr, error = %detail, "handshake failed");
    connect_failed(format!("handshake with peer {addr} failed: {detail}"))
}

/// `connect-failed`: the request certainly never left.
pub(crate) fn connect_failed(message: String) -> ProxyError {
    ProxyError::new(ErrorKind::ConnectFailed, Side::Peer, message).never_sent()
}

/// The reason label of a TLS alert (QUIC carries it as CRYPTO_ERROR 0x100 + alert).
pub(crate) fn alert_failure(alert: u8) -> HandshakeFailure {
    use rustls::AlertDescription as A;
    match A::from(alert) {
        A::CertificateRequired => HandshakeFailure::NoCertificate,
        A::CertificateExpired => HandshakeFailure::Expired,
        // A bad signature from a CA with our CA's name is a certificate from another CA.
        A::UnknownCA | A::DecryptError => HandshakeFailure::UnknownCa,
        A::BadCertificate
        | A::UnsupportedCertificate
        | A::CertificateRevoked
        | A::CertificateUnknown
        | A::AccessDenied => HandshakeFailure::BadCertificate,
        _ => HandshakeFailure::Other,
    }
}

/// The reason label of a rustls error (the TCP wire reports these directly).
pub(crate) fn rustls_failure(e: &rustls::Error) -> HandshakeFailure {
    use rustls::{CertificateError as C, Error as E};
    match e {
        E::NoCertificatesPresented => HandshakeFailure::NoCertificate,
        E::InvalidCertificate(C::Expired | C::NotValidYet) => HandshakeFailure::Expired,
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => HandshakeFailure::UnknownCa,
        E::InvalidCertificate(_) => HandshakeFailure::BadCertificate,
        E::AlertReceived(a) => alert_failure(u8::from(*a)),
        _ => HandshakeFailure::Other,
    }
}

/// The rustls error inside an I/O error or a chain of errors, if there is one.
pub(crate) fn find_rustls<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                    return Some(r);
                }
            }
        }
        cur = err.source();
    }
    None
}
