//! quicar: a sidecar proxy. Apps speak HTTP/1.1 to their sidecar on loopback; sidecars carry
//! requests between nodes as HTTP/3 over mutual-TLS QUIC.
//!
//! - [`config`]: the TOML config, parsed and validated.
//! - [`identity`]: SPIFFE IDs, mutual-TLS configs, certificate rotation.
//! - [`pki`]: a dev CA (`quicar certs`).
//! - [`outbound`]: the app-facing HTTP/1.1 listener and the forwarding path.
//! - [`transport`]: connections to peer sidecars (QUIC).
//! - [`cache`]: the outbound HTTP response cache.
//! - [`inbound`]: the peer-facing listener that hands requests to local apps.
//! - [`discovery`]: endpoints from config, a watched file or DNS SRV.
//! - [`balance`]: P2C over peak-EWMA, weights, priorities, circuit breakers.
//! - [`resilience`]: retry decisions, back-off and the retry budget.
//! - [`policy`]: which identities may call which local service.
//! - [`headers`], [`body`], [`error`]: the message rules both hops share.
//! - [`telemetry`]: metrics, access log, dashboard series, trace context.
//! - [`admin`]: the admin listener (`/metrics`, `/ready`, `/dashboard`…).
//! - [`app`]: binds everything from a config and runs it until shutdown.
//! - [`bench`]: `quicar bench`, the TCP-vs-QUIC comparison over an emulated link.
//! - [`demo`]: two sidecars and a demo service on loopback.

pub(crate) mod accept;
pub(crate) mod admin;
pub mod app;
pub(crate) mod balance;
pub mod bench;
pub(crate) mod body;
pub mod cache;
pub mod config;
pub mod demo;
pub mod discovery;
pub(crate) mod error;
pub mod facts;
pub(crate) mod headers;
pub mod identity;
pub(crate) mod inbound;
pub(crate) mod outbound;
pub mod pki;
pub(crate) mod policy;
pub(crate) mod resilience;
pub mod telemetry;
pub(crate) mod transport;
