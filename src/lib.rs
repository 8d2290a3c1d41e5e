//! quicar: a sidecar proxy. Apps speak HTTP/1.1 to their sidecar on loopback; sidecars carry
//! requests between nodes as HTTP/3 over mutual-TLS QUIC (or HTTP/2 over TLS 1.3 over TCP).
//!
//! The house: each wire owns its protocol code, the request path owns the decisions and knows
//! no protocol, and facts travel as types.
//!
//! - `outbound`: the app-facing HTTP/1.1 listener and `forward` (route once → cache →
//!   attempts with retries), protocol-free.
//! - `inbound`: one protocol-free `handle` (route once → authorize → local app), called by
//!   both servers; the local-app client is its own file.
//! - `transport`: `Clients::send`, the one entry point to the wires; `quic` and `tcp` each
//!   own their server loop, client pool, exchange and error mapping; `fallback` is `auto`.
//! - [`facts`]: `Transport`, `CacheOutcome`, `Upstream`: what the sidecar decides about a
//!   request, carried in extensions and written as `quicar-*` headers only at the edges
//!   (`headers`). Metric labels come only from these enums and `error`'s `ErrorKind`.
//! - [`config`]: the TOML config, parsed and validated.
//! - [`identity`]: SPIFFE IDs (`identity::peer_id`, a leaf), mutual-TLS configs, the file
//!   watcher whose `watch` channel both servers and both client pools read.
//! - [`discovery`]: endpoints from config, a watched file or DNS SRV.
//! - `balance`: P2C over peak-EWMA, weights, priorities, circuit breakers.
//! - `resilience`: retry decisions, back-off and the retry budget.
//! - [`cache`]: the outbound HTTP response cache.
//! - `policy`: which identities may call which local service.
//! - `body`: body types and adapters both hops share.
//! - [`telemetry`]: the recorder and per-request guard; `metrics` (every name and help),
//!   `access_log`, `dashboard`, `trace`.
//! - `admin`: the admin listener (`/metrics`, `/ready`, `/dashboard`…).
//! - `accept`: the accept loop the three TCP listeners share; `rng`: the per-thread fast
//!   random generator (balancer draws, trace ids).
//! - [`app`]: binds everything from a config and runs it until shutdown.
//! - [`pki`]: a dev CA (`quicar certs`).
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
pub(crate) mod h1;
pub(crate) mod headers;
pub mod identity;
pub(crate) mod inbound;
pub(crate) mod interim;
pub(crate) mod outbound;
pub mod pki;
pub(crate) mod policy;
pub(crate) mod resilience;
pub(crate) mod rng;
pub mod telemetry;
pub(crate) mod transport;

/// The unit tests count allocations (`telemetry` checks that histogram samples are released).
#[cfg(test)]
mod test_alloc {
    use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
    use std::alloc::System;

    #[global_allocator]
    pub(crate) static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;
}
