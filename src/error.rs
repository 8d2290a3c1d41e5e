//! The errors a proxied request can end in, each with its status, its `quicar-error` kind and
//! whether the request may be retried, and the one-line response the sidecar sends for it.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::body::{full, ProxyBody};

/// The closed set of `quicar-error` kinds (the contract in DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    BadRequest,
    HeadersTooLarge,
    BodyTooLarge,
    UnknownService,
    Denied,
    NoEndpoints,
    CircuitOpen,
    Overloaded,
    ConnectFailed,
    PeerReset,
    IdentityMismatch,
    Timeout,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::HeadersTooLarge => "headers-too-large",
            Self::BodyTooLarge => "body-too-large",
            Self::UnknownService => "unknown-service",
            Self::Denied => "denied",
            Self::NoEndpoints => "no-endpoints",
            Self::CircuitOpen => "circuit-open",
            Self::Overloaded => "overloaded",
            Self::ConnectFailed => "connect-failed",
            Self::PeerReset => "peer-reset",
            Self::IdentityMismatch => "identity-mismatch",
            Self::Timeout => "timeout",
        }
    }

    /// The kind a `quicar-error` value names, if it names one (a peer sidecar's header).
    pub fn parse(text: &str) -> Option<Self> {
        ALL.iter().copied().find(|k| k.as_str() == text)
    }

    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnknownService => StatusCode::NOT_FOUND,
            Self::Denied => StatusCode::FORBIDDEN,
            Self::NoEndpoints | Self::CircuitOpen | Self::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::ConnectFailed | Self::PeerReset | Self::IdentityMismatch => {
                StatusCode::BAD_GATEWAY
            }
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

const ALL: [ErrorKind; 12] = [
    ErrorKind::BadRequest,
    ErrorKind::HeadersTooLarge,
    ErrorKind::BodyTooLarge,
    ErrorKind::UnknownService,
    ErrorKind::Denied,
    ErrorKind::NoEndpoints,
    ErrorKind::CircuitOpen,
    ErrorKind::Overloaded,
    ErrorKind::ConnectFailed,
    ErrorKind::PeerReset,
    ErrorKind::IdentityMismatch,
    ErrorKind::Timeout,
];

/// Which hop failed: the part of the path the message points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The app talking to its own sidecar.
    Downstream,
    /// The peer sidecar (or the network to it).
    Peer,
    /// The local app behind the inbound listener.
    LocalApp,
}

/// A request that ended in the sidecar rather than with an upstream response.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub(crate) struct ProxyError {
    pub kind: ErrorKind,
    pub side: Side,
    /// True when the request certainly never reached the far app, so sending it again is safe.
    pub never_sent: bool,
    pub message: String,
}

impl ProxyError {
    pub(crate) fn new(kind: ErrorKind, side: Side, message: impl Into<String>) -> Self {
        Self {
            kind,
            side,
            never_sent: false,
            message: message.into(),
        }
    }

    pub(crate) fn never_sent(mut self) -> Self {
        self.never_sent = true;
        self
    }

    /// The response the sidecar itself sends: status, a one-line body, and its kind as an
    /// extension (the edge writes it as `quicar-error`).
    pub(crate) fn into_response(self) -> Response<ProxyBody> {
        error_response(self.kind, &self.message)
    }
}

/// A sidecar-made response for `kind` with a one-line text body; the kind rides as an
/// extension.
pub(crate) fn error_response(kind: ErrorKind, message: &str) -> Response<ProxyBody> {
    let line = format!(
        "quicar: {}: {}\n",
        kind.as_str(),
        message.replace(['\r', '\n'], " ")
    );
    let len = line.len();
    let mut resp = Response::new(full(Bytes::from(line)));
    *resp.status_mut() = kind.status();
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    resp.extensions_mut().insert(kind);
    resp
}

/// An error and its causes on one line (`outer: inner: root`), for logs and error bodies.
pub(crate) fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_nothing_else_parses() {
        for k in ALL {
            assert_eq!(ErrorKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(ErrorKind::parse("Denied"), None);
        assert_eq!(ErrorKind::parse("x-made-up"), None);
    }
}
