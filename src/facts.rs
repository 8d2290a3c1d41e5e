//! Facts the sidecar decides about a request, as types. They ride in request and response
//! extensions through the sidecar and become `quicar-*` headers only at the edges (see
//! `headers`); metric labels and dashboard keys come only from these closed sets. The error
//! kind is `error::ErrorKind`, the peer identity `identity::PeerId`.

use std::net::SocketAddr;

use serde::Serialize;

/// The wire between two sidecars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// HTTP/3 over QUIC.
    Quic,
    /// HTTP/2 over TLS 1.3 over TCP.
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

/// How the response cache answered (`quicar-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheOutcome {
    /// Served fresh from the cache.
    Hit,
    /// Fetched from the service (and stored if allowed).
    Miss,
    /// A stale entry the service confirmed with 304.
    Revalidated,
    /// A stale entry served within `stale-while-revalidate` / `stale-if-error`.
    Stale,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Revalidated => "revalidated",
            Self::Stale => "stale",
        }
    }
}

/// Which endpoint answered, after how many attempts, over which wire (a response extension).
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    pub endpoint: SocketAddr,
    pub attempts: u32,
    pub transport: Transport,
}
