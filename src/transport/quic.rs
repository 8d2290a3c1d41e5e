//! QUIC between sidecars: the server endpoint the inbound listener accepts on, and the client
//! pool that keeps one HTTP/3 connection per peer endpoint, shared by all requests to it,
//! re-established when it drops and closed when no request has used it for the idle timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};

use crate::config::Quic as QuicConfig;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::identity::{IdentityError, IdentityRx, Material, PeerId};
use crate::telemetry::{Direction, Telemetry};
use crate::transport::slots::{self, InFlight, Pooled, Slots, Usage};

pub const ALPN_H3: &[u8] = b"h3";
/// Application close code sent when a sidecar stops (H3_NO_ERROR).
pub const CLOSE_SHUTDOWN: u32 = 0x100;
/// Closes a pooled connection nobody used for the idle timeout (H3_NO_ERROR as well).
const CLOSE_IDLE: u32 = 0x100;
/// A peer whose identity we refuse (H3_GENERAL_PROTOCOL_ERROR is wrong here; use a private
/// code from the reserved range so logs on the far side can tell why).
pub const CLOSE_IDENTITY: u32 = 0x51c0;

/// Largest header section we accept or send on HTTP/3.
pub const MAX_FIELD_SECTION: u64 = 64 * 1024;

fn transport_config(cfg: &QuicConfig, server: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Liveness: keep-alives while a connection is pooled, and a peer silent for this long
    // is dead (so a vanished peer is noticed within seconds, not at the next request).
    t.keep_alive_interval(Some(cfg.keep_alive_interval));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(cfg.dead_peer_timeout)
            .unwrap_or(quinn::VarInt::from_u32(30_000).into()),
    ));
    // Bounded buffering: a slow reader can hold at most this much per stream and connection.
    t.stream_receive_window(quinn::VarInt::from_u32(1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.send_window(16 * 1024 * 1024);
    if server {
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(cfg.max_concurrent_streams));
    } else {
        t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    }
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
    match cfg.congestion {
        crate::config::Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        crate::config::Congestion::Newreno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
        crate::config::Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
    };
    t
}

/// Starts a QUIC server with our identity on the bound inbound UDP socket.
pub fn server_endpoint(
    socket: std::net::UdpSocket,
    material: &Material,
    cfg: &QuicConfig,
) -> Result<quinn::Endpoint, std::io::Error> {
    let server = server_config(material, cfg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(material.reset_key()));
    let cid_key = material.cid_key();
    endpoint_cfg.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new(
        endpoint_cfg,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

pub fn server_config(
    material: &Material,
    cfg: &QuicConfig,
) -> Result<quinn::ServerConfig, IdentityError> {
    let tls = material.server_config(vec![ALPN_H3.to_vec()])?;
    let quic = QuicServerConfig::try_from(tls)
        .map_err(|e| IdentityError::Tls(rustls::Error::General(e.to_string())))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
    server.transport_config(Arc::new(transport_config(cfg, true)));
    Ok(server)
}

/// A pooled HTTP/3 connection: the sender requests are opened on, and the QUIC connection.
#[derive(Clone)]
pub struct PeerConn {
    pub send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    pub conn: quinn::Connection,
    usage: Arc<Usage>,
    /// Lost packets, datagrams sent and received at the last telemetry sample.
    sampled: Arc<Mutex<(u64, u64, u64)>>,
}

impl Pooled for PeerConn {
    fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    fn usage(&self) -> &Arc<Usage> {
        &self.usage
    }

    fn close_idle(&self) {
        tracing::debug!(peer = %self.conn.remote_address(), "closing idle QUIC connection");
        self.conn
            .close(quinn::VarInt::from_u32(CLOSE_IDLE), b"idle");
    }
}

impl PeerConn {
    pub fn is_alive(&self) -> bool {
        Pooled::is_alive(self)
    }

    /// Counts a request in flight until dropped (keeps idle reaping away).
    pub fn in_flight(&self) -> InFlight {
        self.usage.start()
    }
}

/// One QUIC client endpoint and the connections it holds, one per (address, identity).
pub struct QuicPool {
    endpoint: quinn::Endpoint,
    identity: IdentityRx,
    transport: Arc<quinn::TransportConfig>,
    idle_timeout: Duration,
    slots: Arc<Slots<PeerConn>>,
    opened: AtomicU64,
    tel: Arc<Telemetry>,
}

/// A pooled connection's state, for `/endpoints`.
pub struct PeerState {
    pub alive: bool,
    pub rtt: Duration,
    pub in_flight: usize,
    pub close_reason: Option<String>,
}

impl QuicPool {
    pub fn new(
        identity: IdentityRx,
        cfg: &QuicConfig,
        tel: Arc<Telemetry>,
    ) -> Result<Arc<Self>, std::io::Error> {
        // Dual-stack where the host has IPv6, IPv4 only where it does not.
        let socket = std::net::UdpSocket::bind(SocketAddr::from(([0u16; 8], 0)))
            .or_else(|_| std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))))?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Arc::new(Self {
            endpoint,
            identity,
            transport: Arc::new(transport_config(cfg, false)),
            idle_timeout: cfg.idle_timeout,
            slots: Arc::default(),
            opened: AtomicU64::new(0),
            tel,
        }))
    }

    /// How many QUIC connections this pool has opened since it started.
    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// Connections currently open.
    pub fn connections_active(&self) -> usize {
        self.slots.active()
    }

    /// The state of the connection to an endpoint, if one was made.
    pub fn peek(&self, addr: SocketAddr, expected: &PeerId) -> Option<PeerState> {
        let c = self.slots.current(addr, expected)?;
        Some(PeerState {
            alive: c.is_alive(),
            rtt: c.conn.rtt(),
            in_flight: c.usage.in_flight(),
            close_reason: c.conn.close_reason().map(|r| r.to_string()),
        })
    }

    /// Feeds each live connection's path statistics to telemetry (as deltas since last time).
    pub fn sample(&self) {
        for (addr, c) in self.slots.each() {
            let stats = c.conn.stats();
            let now = (
                stats.path.lost_packets,
                stats.udp_tx.datagrams,
                stats.udp_rx.datagrams,
            );
            let mut last = c.sampled.lock().expect("not poisoned");
            let delta = |a: u64, b: u64| a.saturating_sub(b);
            // Labelled by the configured endpoint address: bounded, and as the user wrote it.
            self.tel.quic_sample(
                &addr.to_string(),
                stats.path.rtt,
                stats.path.cwnd,
                delta(now.0, last.0),
                delta(now.1, last.1),
                delta(now.2, last.2),
            );
            *last = now;
        }
    }

    /// The live connection to `addr` proving `expected`, or a new one. Concurrent callers for
    /// the same peer wait for one handshake instead of racing several.
    pub async fn get(
        &self,
        addr: SocketAddr,
        expected: &PeerId,
        connect_timeout: Duration,
    ) -> Result<PeerConn, ProxyError> {
        self.slots
            .get(addr, expected, || {
                self.connect(addr, expected, connect_timeout)
            })
            .await
    }

    /// Forgets a connection that failed under a request, so the next request reconnects.
    pub async fn evict(&self, addr: SocketAddr, expected: &PeerId, conn: &PeerConn) {
        let id = conn.conn.stable_id();
        self.slots
            .evict(addr, expected, |c| c.conn.stable_id() == id)
            .await;
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        expected: &PeerId,
        connect_timeout: Duration,
    ) -> Result<PeerConn, ProxyError> {
        let mismatch = Arc::new(Mutex::new(None));
        let material = self.identity.borrow().clone();
        let failed =
            |msg: String| ProxyError::new(ErrorKind::ConnectFailed, Side::Peer, msg).never_sent();
        let tls = material
            .client_config(expected.clone(), mismatch.clone(), vec![ALPN_H3.to_vec()])
            .map_err(|e| failed(format!("cannot build TLS config: {e}")))?;
        let quic = QuicClientConfig::try_from(tls)
            .map_err(|e| failed(format!("cannot build QUIC config: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(self.transport.clone());
        // SNI carries the trust domain only: names are checked by SPIFFE ID, not DNS.
        let connecting = self
            .endpoint
            .connect_with(client, addr, expected.trust_domain())
            .map_err(|e| failed(format!("cannot connect to peer {addr}: {e}")))?;
        let conn = match tokio::time::timeout(connect_timeout, connecting).await {
            Err(_) => {
                self.tel.handshake_failed(Direction::Outbound, "timeout");
                return Err(failed(format!(
                    "no QUIC handshake with peer {addr} within {}",
                    humantime::format_duration(connect_timeout)
                )));
            }
            Ok(Err(e)) => {
                if let Some(presented) = mismatch.lock().expect("not poisoned").take() {
                    self.tel
                        .handshake_failed(Direction::Outbound, "identity-mismatch");
                    tracing::warn!(peer = %addr, expected = %expected, presented = %presented, "peer identity refused");
                    return Err(ProxyError::new(
                        ErrorKind::IdentityMismatch,
                        Side::Peer,
                        format!("peer {addr} presented {presented}, expected {expected}"),
                    )
                    .never_sent());
                }
                self.tel
                    .handshake_failed(Direction::Outbound, failure_reason(&e.to_string()));
                tracing::warn!(peer = %addr, error = %e, "QUIC handshake failed");
                return Err(failed(format!(
                    "QUIC handshake with peer {addr} failed: {e}"
                )));
            }
            Ok(Ok(conn)) => conn,
        };
        let (mut driver, send) = h3::client::builder()
            .max_field_section_size(MAX_FIELD_SECTION)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| failed(format!("HTTP/3 setup with peer {addr} failed: {e}")))?;
        let n = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(peer = %addr, identity = %expected, opened = n, "QUIC connection established");
        let open = self.tel.connection_opened(Direction::Outbound, "quic");
        tokio::spawn(async move {
            let err = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            drop(open);
            tracing::debug!(peer = %addr, reason = %err, "QUIC connection closed");
        });
        Ok(PeerConn {
            send,
            conn,
            usage: Arc::default(),
            sampled: Arc::default(),
        })
    }

    /// Closes connections that carried no request for the idle timeout; runs until cancelled.
    pub async fn reap_idle(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        slots::reap_idle(self.slots.clone(), self.idle_timeout, shutdown).await;
    }

    /// Closes every connection with the shutdown code and waits (bounded) for the peers to know.
    pub async fn close(&self, wait: Duration) {
        self.endpoint
            .close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"sidecar stopping");
        let _ = tokio::time::timeout(wait, self.endpoint.wait_idle()).await;
    }
}

/// A bounded reason label for a failed handshake, from the TLS or QUIC error text.
pub fn failure_reason(error: &str) -> &'static str {
    let e = error.to_ascii_lowercase();
    if e.contains("no certificates") || e.contains("error 116") {
        "no-certificate"
    } else if e.contains("expired") || e.contains("notvalidyet") || e.contains("not valid yet") {
        "expired"
    } else if e.contains("unknownissuer")
        || e.contains("unknown issuer")
        || e.contains("badsignature")
        || e.contains("error 48")
    {
        // A bad signature from a CA with our CA's name is a certificate from another CA.
        "unknown-ca"
    } else if e.contains("certificate") || e.contains("error 42") || e.contains("error 45") {
        "bad-certificate"
    } else if e.contains("timed out") {
        "timeout"
    } else {
        "other"
    }
}
