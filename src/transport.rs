//! Connections between sidecars. `Clients::send` is the one entry point the request path
//! calls, whatever the wire: it picks the wire from the service's transport setting (and, for
//! `auto`, the endpoint's fallback state), and reports which one carried the request.
//!
//! - `quic`: HTTP/3 over QUIC: server loop, client pool, exchange, error mapping.
//! - `tcp`: HTTP/2 over TLS 1.3: the same four.
//! - `fallback`: `auto`: per-endpoint fallback to TCP and the background QUIC probe.
//! - `mtu`: the MTU of the route to a peer, for QUIC's datagram size.
//! - `pool`: the slot map, in-flight counts and idle sweep both client pools use.
//! - `wire`: what both wires share: limits, uploads, failures, handshake reasons.

pub(crate) mod bbr;
pub(crate) mod fallback;
pub(crate) mod mtu;
pub(crate) mod pool;
pub(crate) mod quic;
pub(crate) mod tcp;
pub(crate) mod wire;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ProxyBody;
use crate::config::{Config, TransportKind};
use crate::discovery::Endpoint;
use crate::error::ErrorKind;
use crate::facts::Transport;
use crate::identity::IdentityRx;
use crate::interim::Interim;
use crate::telemetry::Telemetry;
use wire::{ConnState, SendError, Upload};

/// The client side of both wires.
pub(crate) struct Clients {
    quic: Arc<quic::Pool>,
    tcp: Arc<tcp::Pool>,
    fallback: Arc<fallback::Fallback>,
}

impl Clients {
    /// Binds the QUIC client socket and starts both pools' idle sweeps.
    pub(crate) fn new(
        identity: IdentityRx,
        config: &Config,
        tel: Arc<Telemetry>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, std::io::Error> {
        let quic = quic::Pool::new(identity.clone(), &config.quic, tel.clone())?;
        let tcp = tcp::Pool::new(identity, &config.quic, tel);
        tracker.spawn(quic.clone().reap_idle(shutdown.clone()));
        tracker.spawn(tcp.clone().reap_idle(shutdown.clone()));
        let fallback = fallback::Fallback::new(quic.clone(), config.quic.fallback_retry, shutdown);
        Ok(Self {
            quic,
            tcp,
            fallback,
        })
    }

    /// The wire a request to `ep` takes now.
    pub(crate) fn transport_for(&self, kind: TransportKind, ep: &Endpoint) -> Transport {
        match kind {
            TransportKind::Tcp => Transport::Tcp,
            TransportKind::Auto if self.fallback.prefers_tcp(ep) => Transport::Tcp,
            _ => Transport::Quic,
        }
    }

    /// One attempt on one endpoint. `auto` tries QUIC and falls back to TCP for this endpoint
    /// when the QUIC handshake fails or times out (the request was not sent, so the same
    /// attempt continues over TCP). Returns the wire that carried (or last tried) it.
    pub(crate) async fn send(
        &self,
        kind: TransportKind,
        ep: &Endpoint,
        head: &mut Request<()>,
        body: Upload,
        connect_timeout: Duration,
        interim: Option<&Interim>,
    ) -> (Result<Response<ProxyBody>, SendError>, Transport) {
        let transport = self.transport_for(kind, ep);
        if kind != TransportKind::Auto || transport == Transport::Tcp {
            let r = self
                .send_on(transport, ep, head, body, connect_timeout, interim)
                .await;
            return (r, transport);
        }
        let replay = body.replay();
        match self
            .send_on(Transport::Quic, ep, head, body, connect_timeout, interim)
            .await
        {
            Err(e) if e.error.kind == ErrorKind::ConnectFailed && e.error.never_sent => {
                tracing::info!(endpoint = %ep.address, reason = %e.error.message, "QUIC unreachable; falling back to TCP");
                self.fallback.fall_back(ep, connect_timeout);
                let body = replay
                    .or_else(|| e.unsent.map(Upload::Stream))
                    .unwrap_or(Upload::Empty);
                let r = self
                    .send_on(Transport::Tcp, ep, head, body, connect_timeout, interim)
                    .await;
                (r, Transport::Tcp)
            }
            r => (r, Transport::Quic),
        }
    }

    async fn send_on(
        &self,
        transport: Transport,
        ep: &Endpoint,
        head: &mut Request<()>,
        body: Upload,
        connect_timeout: Duration,
        interim: Option<&Interim>,
    ) -> Result<Response<ProxyBody>, SendError> {
        // Boxed: an exchange's future is kilobytes, and every future it is nested in (the
        // attempts, the deadline, the outbound handler) would otherwise carry it and be
        // copied whole each time one of them is moved (BENCHMARKS.md, "Later in round 2").
        match transport {
            Transport::Quic => {
                wire::boxed(|| self.quic.exchange(ep, head, body, connect_timeout, interim)).await
            }
            Transport::Tcp => {
                wire::boxed(|| self.tcp.exchange(ep, head, body, connect_timeout, interim)).await
            }
        }
    }

    /// The state of our connection to `ep` over `transport`, if one was made.
    pub(crate) fn peek(&self, transport: Transport, ep: &Endpoint) -> Option<ConnState> {
        match transport {
            Transport::Quic => self.quic.peek(ep.address, &ep.identity),
            Transport::Tcp => self.tcp.peek(ep.address, &ep.identity),
        }
    }

    /// The initial RTT the next QUIC handshake with `ep` starts from (the RTT its last
    /// connection measured, bounded; quinn's 333 ms before one has closed).
    pub(crate) fn handshake_rtt(&self, ep: &Endpoint) -> Duration {
        quic::handshake_rtt(self.quic.remembered_rtt(ep.address))
    }

    /// The path model the next QUIC connection to `ep` starts its congestion controller from,
    /// if there is one (`quic::Pool::remembered_model`).
    pub(crate) fn path_model(&self, ep: &Endpoint) -> Option<bbr::PathModel> {
        self.quic.remembered_model(ep.address)
    }

    pub(crate) fn connections_opened(&self, transport: Transport) -> u64 {
        match transport {
            Transport::Quic => self.quic.connections_opened(),
            Transport::Tcp => self.tcp.connections_opened(),
        }
    }

    pub(crate) fn connections_active(&self, transport: Transport) -> usize {
        match transport {
            Transport::Quic => self.quic.connections_active(),
            Transport::Tcp => self.tcp.connections_active(),
        }
    }

    /// QUIC path statistics into telemetry (once a second).
    pub(crate) fn sample(&self) {
        self.quic.sample();
    }

    /// Closes every connection: HTTP/2 ones as their requests end, QUIC ones with the
    /// shutdown code, waiting (bounded) for the peers to know.
    pub(crate) async fn close(&self, wait: Duration) {
        self.tcp.close();
        self.quic.close(wait).await;
    }
}
