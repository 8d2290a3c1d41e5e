//! The TCP transport: TLS 1.3 (same mutual TLS and identities as QUIC) carrying HTTP/2 (ALPN
//! `h2`). The inbound side accepts on the same port number as QUIC; the client pool keeps one
//! multiplexed HTTP/2 connection per peer endpoint, re-established when it drops and closed
//! when idle, like the QUIC pool.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;

use crate::body::ProxyBody;
use crate::config::Quic as QuicConfig;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::identity::{IdentityRx, PeerId};
use crate::telemetry::{Direction, Telemetry};
use crate::transport::quic::failure_reason;
use crate::transport::slots::{self, InFlight, Pooled, Slots, Usage};

pub const ALPN_H2: &[u8] = b"h2";

/// A pooled HTTP/2 connection.
#[derive(Clone)]
pub struct H2Conn {
    pub send: hyper::client::conn::http2::SendRequest<ProxyBody>,
    closed: Arc<AtomicBool>,
    /// Why the connection ended, when it did (a TLS alert from a peer that refused us…).
    pub close_reason: Arc<Mutex<Option<String>>>,
    usage: Arc<Usage>,
    /// Set once any response arrived on this connection.
    answered: Arc<AtomicBool>,
}

impl Pooled for H2Conn {
    fn is_alive(&self) -> bool {
        !self.closed.load(Ordering::Acquire) && !self.send.is_closed()
    }

    /// HTTP/2 closes a connection when its last sender is gone: dropping is closing.
    fn usage(&self) -> &Arc<Usage> {
        &self.usage
    }
}

impl H2Conn {
    pub fn is_alive(&self) -> bool {
        Pooled::is_alive(self)
    }

    pub fn mark_answered(&self) {
        self.answered.store(true, Ordering::Relaxed);
    }

    /// True while no response has ever arrived on this connection.
    pub fn never_answered(&self) -> bool {
        !self.answered.load(Ordering::Relaxed)
    }

    /// Counts a request in flight until dropped (keeps idle reaping away).
    pub fn in_flight(&self) -> InFlight {
        self.usage.start()
    }

    /// Waits (briefly) for the connection to end and returns why, if it did. Only called on an
    /// error path: a TLS refusal arrives just after the request failed, and the sender can
    /// report "closed" before the connection task has recorded the reason.
    pub async fn ended(&self) -> Option<String> {
        for _ in 0..30 {
            if let Some(r) = self.close_reason.lock().expect("not poisoned").clone() {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.close_reason.lock().expect("not poisoned").clone()
    }
}

/// HTTP/2-over-TLS connections to peer sidecars, one per (address, identity).
pub struct TcpPool {
    identity: IdentityRx,
    idle_timeout: Duration,
    keep_alive: Duration,
    dead_peer: Duration,
    slots: Arc<Slots<H2Conn>>,
    opened: AtomicU64,
    tel: Arc<Telemetry>,
}

impl TcpPool {
    pub fn new(identity: IdentityRx, cfg: &QuicConfig, tel: Arc<Telemetry>) -> Arc<Self> {
        Arc::new(Self {
            identity,
            idle_timeout: cfg.idle_timeout,
            keep_alive: cfg.keep_alive_interval,
            dead_peer: cfg.dead_peer_timeout,
            slots: Arc::default(),
            opened: AtomicU64::new(0),
            tel,
        })
    }

    pub fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    pub fn connections_active(&self) -> usize {
        self.slots.active()
    }

    pub fn peek(&self, addr: SocketAddr, expected: &PeerId) -> Option<(bool, usize)> {
        let c = self.slots.current(addr, expected)?;
        Some((c.is_alive(), c.usage.in_flight()))
    }

    /// The live connection to `addr` proving `expected`, or a new one (one handshake at a time).
    pub async fn get(
        &self,
        addr: SocketAddr,
        expected: &PeerId,
        connect_timeout: Duration,
    ) -> Result<H2Conn, ProxyError> {
        self.slots
            .get(addr, expected, || async {
                match tokio::time::timeout(connect_timeout, self.connect(addr, expected)).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.tel.handshake_failed(Direction::Outbound, "timeout");
                        Err(ProxyError::new(
                            ErrorKind::ConnectFailed,
                            Side::Peer,
                            format!(
                                "no TLS handshake with peer {addr} (TCP) within {}",
                                humantime::format_duration(connect_timeout)
                            ),
                        )
                        .never_sent())
                    }
                }
            })
            .await
    }

    /// Forgets the connection to an endpoint if it has ended.
    pub async fn evict(&self, addr: SocketAddr, expected: &PeerId) {
        self.slots.evict(addr, expected, |c| !c.is_alive()).await;
    }

    async fn connect(&self, addr: SocketAddr, expected: &PeerId) -> Result<H2Conn, ProxyError> {
        let failed =
            |m: String| ProxyError::new(ErrorKind::ConnectFailed, Side::Peer, m).never_sent();
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| failed(format!("cannot connect to peer {addr} (TCP): {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mismatch = Arc::new(Mutex::new(None));
        let material = self.identity.borrow().clone();
        let tls = material
            .client_config(expected.clone(), mismatch.clone(), vec![ALPN_H2.to_vec()])
            .map_err(|e| failed(format!("cannot build TLS config: {e}")))?;
        let name = ServerName::try_from(expected.trust_domain().to_string())
            .map_err(|e| failed(format!("bad trust domain for SNI: {e}")))?;
        let stream = match tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
        {
            Ok(s) => s,
            Err(e) => {
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
                return Err(failed(format!(
                    "TLS handshake with peer {addr} failed: {e}"
                )));
            }
        };
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .keep_alive_interval(self.keep_alive)
            .keep_alive_timeout(self.dead_peer)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .max_header_list_size(crate::transport::quic::MAX_FIELD_SECTION as u32);
        let (send, conn) = builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(format!("HTTP/2 setup with peer {addr} failed: {e}")))?;
        let closed = Arc::new(AtomicBool::new(false));
        let close_reason = Arc::new(Mutex::new(None));
        let open = self.tel.connection_opened(Direction::Outbound, "tcp");
        {
            let (closed, reason) = (closed.clone(), close_reason.clone());
            tokio::spawn(async move {
                let r = conn.await;
                let text = match &r {
                    Ok(()) => "closed".to_string(),
                    Err(e) => crate::error::source_chain(e),
                };
                tracing::debug!(peer = %addr, reason = %text, "HTTP/2 connection closed");
                *reason.lock().expect("not poisoned") = Some(text);
                closed.store(true, Ordering::Release);
                drop(open);
            });
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(H2Conn {
            send,
            closed,
            close_reason,
            usage: Arc::default(),
            answered: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Drops connections that carried no request for the idle timeout (HTTP/2 closes a
    /// connection when its last sender is gone); runs until cancelled.
    pub async fn reap_idle(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        slots::reap_idle(self.slots.clone(), self.idle_timeout, shutdown).await;
    }

    /// Forgets every connection (each closes once its requests are done).
    pub fn close(&self) {
        self.slots.clear();
    }
}

/// The TLS server config for the TCP listener (ALPN h2), from the current identity.
pub fn server_tls(
    material: &crate::identity::Material,
) -> Result<Arc<rustls::ServerConfig>, crate::identity::IdentityError> {
    Ok(Arc::new(material.server_config(vec![ALPN_H2.to_vec()])?))
}

/// Whether an ended connection's reason is a TLS refusal of our handshake.
pub fn is_refusal(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    r.contains("alert") || r.contains("certificate")
}
