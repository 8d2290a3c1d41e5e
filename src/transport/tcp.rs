//! The TCP wire: TLS 1.3 (same mutual TLS and identities as QUIC) carrying HTTP/2 (ALPN `h2`).
//! The inbound server loop accepts on the same port number as QUIC; the client pool keeps one
//! multiplexed HTTP/2 connection per peer endpoint, re-established when it drops and closed
//! when idle, like the QUIC pool; one request exchange; h2 and rustls errors mapped to what
//! the request path needs to know.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::Body as _;
use http_body_util::BodyExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pool::{self, InFlight, Pooled, Slots, Usage};
use super::wire::{
    self, connect_failed, find_rustls, rustls_failure, ConnState, SendError, Upload,
    CONNECTION_WINDOW, MAX_FIELD_SECTION, STREAM_WINDOW, TLS_ACCEPT_TIMEOUT,
};
use crate::accept::Listener;
use crate::body::{held, unless_stalled, H2Body, ProxyBody};
use crate::config::Quic as QuicConfig;
use crate::discovery::Endpoint;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::facts::Transport;
use crate::headers::strip_hop_by_hop;
use crate::identity::{peer_of, IdentityError, IdentityRx, Material, PeerId};
use crate::inbound::Inbound;
use crate::interim::{self, Interim};
use crate::telemetry::{Direction, HandshakeFailure, Telemetry};

const ALPN_H2: &[u8] = b"h2";

/// The streams the pool plans a new connection for while the peer's SETTINGS have not come,
/// when no earlier connection told its limit: the one stream h2 opens until they come (it
/// holds the others, unsent, so a peer that allows fewer refuses none). A request that finds
/// the connection full by this plan waits for the SETTINGS in the pool and then looks again,
/// by the peer's own limit: held on the connection instead, it went to h2's queue once they
/// came, behind long-lived streams that may never end when the peer allows fewer than came.
const UNHEARD_STREAMS: usize = 1;

/// Streams reset in the last `RESET_STREAM_TIME` that h2 remembers, both sides. Frames the peer
/// sent before it saw a reset still arrive (up to a stream window each); on a remembered stream
/// they are dropped, on a forgotten one h2 answers each with a reset of its own and counts it
/// as the peer's protocol error, and at 1,024 ends the connection with every request on it
/// (GOAWAY `too_many_internal_resets`). h2's default of 10 remembered streams did that after
/// about 2,000 callers hung up mid-download on one connection (test
/// `faults::a_storm_of_callers_hanging_up_…`); 8,192 over 5 s holds 1,600 hang-ups a second
/// per connection, for a few MB while a storm lasts.
const RESET_STREAMS: usize = 8192;
const RESET_STREAM_TIME: Duration = Duration::from_secs(5);

/// The TLS server config for the TCP listener (ALPN h2), from the current identity.
pub(crate) fn server_tls(material: &Material) -> Result<Arc<rustls::ServerConfig>, IdentityError> {
    Ok(Arc::new(material.server_config(vec![ALPN_H2.to_vec()])?))
}

// ---------------------------------------------------------------------------------------------
// Server

/// Accepts TLS + HTTP/2 connections from peers until `shutdown`; then each connection sends
/// GOAWAY and finishes its streams (the caller bounds how long). New handshakes use the
/// latest identity from `identity`.
pub(crate) async fn serve(
    listener: Listener,
    mut identity: IdentityRx,
    inbound: Arc<Inbound>,
    max_streams: u32,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut tls = match server_tls(&identity.borrow_and_update()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the inbound TLS config; TCP inbound is off");
            return;
        }
    };
    let mut watching = true;
    loop {
        let (tcp, remote) = tokio::select! {
            r = identity.changed(), if watching => {
                watching = r.is_ok();
                if watching {
                    match server_tls(&identity.borrow_and_update()) {
                        Ok(c) => tls = c,
                        Err(e) => tracing::warn!(error = %e, "cannot use reloaded identity for inbound TCP"),
                    }
                }
                continue;
            }
            next = listener.accept(&shutdown) => match next {
                Some(x) => x,
                None => break,
            },
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
        tracker.spawn(connection(
            acceptor.accept(tcp),
            remote,
            inbound.clone(),
            max_streams,
            shutdown.clone(),
        ));
    }
}

async fn connection(
    handshake: tokio_rustls::Accept<tokio::net::TcpStream>,
    remote: SocketAddr,
    inbound: Arc<Inbound>,
    max_streams: u32,
    shutdown: CancellationToken,
) {
    let tel = inbound.telemetry();
    let stream = match tokio::time::timeout(TLS_ACCEPT_TIMEOUT, handshake).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let failure = find_rustls(&e).map_or(HandshakeFailure::Other, rustls_failure);
            tel.handshake_failed(Direction::Inbound, failure);
            tracing::warn!(%remote, reason = %e, "inbound TLS handshake refused");
            return;
        }
        Err(_) => {
            tel.handshake_failed(Direction::Inbound, HandshakeFailure::Timeout);
            tracing::warn!(%remote, "inbound TLS handshake timed out");
            return;
        }
    };
    let certs = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
    let Ok((peer, _slot)) = inbound.admit(remote, peer_of(certs.as_deref())) else {
        return;
    };
    tracing::debug!(%remote, identity = %peer, "inbound TCP connection");
    let _open = tel.connection_opened(Direction::Inbound, Transport::Tcp);
    let peer = Arc::new(peer);
    let mut conn = match h2::server::Builder::new()
        .max_concurrent_streams(max_streams)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_FIELD_SECTION as u32)
        .max_concurrent_reset_streams(RESET_STREAMS)
        .reset_stream_duration(RESET_STREAM_TIME)
        .handshake::<_, Bytes>(stream)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "HTTP/2 setup failed");
            return;
        }
    };
    // `accept` also drives the connection: it runs until the connection ends, also while
    // draining (GOAWAY sent, streams already accepted finish).
    let mut draining = false;
    // One wait for the shutdown for the connection's life: made anew in the loop, it was
    // registered with the token and removed again for every request.
    let mut cancelled = std::pin::pin!(shutdown.cancelled());
    loop {
        let next = tokio::select! {
            () = cancelled.as_mut(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
                continue;
            }
            next = conn.accept() => next,
        };
        match next {
            Some(Ok((req, respond))) => {
                // Boxed, so the spawned task stays small (it is copied whole as it is
                // spawned and as it ends), and built in its box.
                let (inbound, peer) = (inbound.clone(), peer.clone());
                tokio::spawn(wire::boxed(|| stream_request(req, respond, inbound, peer)));
            }
            Some(Err(e)) => {
                tracing::debug!(%remote, error = %e, "inbound TCP connection ended");
                return;
            }
            None => return,
        }
    }
}

/// One request stream: the request to the inbound path, its interim responses (103…) onto the
/// stream as they arrive, then the response. A stream the peer resets drops the request (the
/// local app's call is cancelled with it).
async fn stream_request(
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    inbound: Arc<Inbound>,
    peer: Arc<PeerId>,
) {
    let (interim, interims) = interim::channel();
    let req = req.map(|recv| H2Body::new(recv).boxed_unsync());
    // In a block, so the handler's future is gone (and its room free) while the body is sent.
    let resp = {
        let handled = inbound.settle_and_handle(req, &peer, Transport::Tcp, Some(interim));
        let mut handled = std::pin::pin!(handled);
        loop {
            tokio::select! {
                biased;
                resp = &mut handled => break resp,
                _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
                info = interims.recv() => {
                    let _ = respond.send_informational(info);
                }
            }
        }
    };
    while let Some(info) = interims.try_recv() {
        let _ = respond.send_informational(info);
    }
    let (mut parts, body) = resp.into_parts();
    crate::headers::write_error_kind(&mut parts);
    // HTTP/2 forbids connection-specific fields (RFC 9113 §8.2.2).
    strip_hop_by_hop(&mut parts.headers);
    let end = body.is_end_stream();
    match respond.send_response(Response::from_parts(parts, ()), end) {
        Ok(send) if !end => {
            send_h2(send, body, None, Some(inbound.response_stall_timeout)).await;
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "could not send response headers"),
    }
}

// ---------------------------------------------------------------------------------------------
// Client

/// Why a pooled HTTP/2 connection ended.
#[derive(Clone, Debug)]
struct Ended {
    /// The peer refused our TLS handshake (it sent an alert).
    refused: bool,
    /// The keep-alive ended it: nothing arrived from the peer for the dead-peer timeout.
    silent: bool,
    text: String,
}

impl Ended {
    /// `connect-failed` for a connection the peer ended by refusing our handshake.
    fn refusal(&self, addr: SocketAddr) -> ProxyError {
        connect_failed(format!("peer {addr} refused the handshake: {}", self.text))
    }

    /// What a request on a connection our keep-alive ended hears.
    fn silence(&self, addr: SocketAddr) -> String {
        format!("peer {addr} stopped answering: {}", self.text)
    }
}

/// An `Ended`'s text when the connection ended without an error.
const CLEAN_END: &str = "it ended without an error";

/// A pooled HTTP/2 connection.
#[derive(Clone)]
struct H2Conn {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    ended: Arc<Mutex<Option<Ended>>>,
    usage: Arc<Usage>,
    /// Set once any response arrived on this connection.
    answered: Arc<AtomicBool>,
    /// Set once the peer's SETTINGS are known to be applied (at once, when the connection
    /// opened knowing the peer's limit).
    settled: Arc<Settled>,
    addr: SocketAddr,
}

impl Pooled for H2Conn {
    fn is_alive(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
    }

    /// HTTP/2 closes a connection when its last sender is gone: dropping is closing.
    fn usage(&self) -> &Arc<Usage> {
        &self.usage
    }

    /// The peer's `SETTINGS_MAX_CONCURRENT_STREAMS`, as h2 last heard it; until the peer's
    /// SETTINGS came (on a first connection to it), `UNHEARD_STREAMS`: the requests a burst
    /// brings in that round trip wait for them (`settling`), neither refused by a peer that
    /// allows fewer nor opening a connection each, then are shared out by the peer's limit.
    fn stream_limit(&self) -> usize {
        self.limit_heard().unwrap_or(UNHEARD_STREAMS)
    }

    fn limit_heard(&self) -> Option<usize> {
        self.settled
            .is_done()
            .then(|| self.send.current_max_send_streams())
    }

    fn settling(&self) -> Option<futures_util::future::BoxFuture<'static, Result<(), ProxyError>>> {
        if self.settled.is_done() {
            return None;
        }
        let conn = self.clone();
        Some(Box::pin(async move {
            conn.settled().await;
            if conn.settled.is_done() {
                return Ok(());
            }
            let addr = conn.addr;
            let what = format!("HTTP/2 connection to peer {addr} ended before its SETTINGS");
            Err(conn.not_taken(addr, what).await)
        }))
    }
}

/// Whether a connection's peer SETTINGS are known to be applied, and the requests waiting for
/// that (woken also when the connection ends).
struct Settled {
    done: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Settled {
    fn new(done: bool) -> Arc<Self> {
        Arc::new(Self {
            done: AtomicBool::new(done),
            changed: tokio::sync::Notify::new(),
        })
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.done.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }
}

impl H2Conn {
    /// Returns once the peer's SETTINGS are applied, or the connection has ended.
    async fn settled(&self) {
        loop {
            let changed = self.settled.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.settled.is_done() || !self.is_alive() {
                return;
            }
            changed.await;
        }
    }

    /// True while no response has ever arrived on this connection.
    fn never_answered(&self) -> bool {
        !self.answered.load(Ordering::Relaxed)
    }

    /// The kind of a request this connection did not take: on a connection that never
    /// answered, the peer did not take the connection at all (it refused us after the
    /// handshake).
    fn unsent_kind(&self) -> ErrorKind {
        if self.never_answered() {
            ErrorKind::ConnectFailed
        } else {
            ErrorKind::PeerReset
        }
    }

    /// Waits (briefly) for the connection to end and returns why, if it did. Only called on an
    /// error path: a TLS refusal arrives just after the request failed, and the sender can
    /// report "closed" before the connection task has recorded the reason.
    async fn ended(&self) -> Option<Ended> {
        for _ in 0..30 {
            if let Some(r) = self.ended.lock().expect("not poisoned").clone() {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.ended.lock().expect("not poisoned").clone()
    }

    /// Why this connection did not take a request: the peer's refusal when that is how the
    /// connection ended, its silence when the keep-alive ended it, else `what` and the end's
    /// reason; never sent (so it may go again elsewhere).
    async fn not_taken(&self, addr: SocketAddr, what: String) -> ProxyError {
        let text = match self.ended().await {
            Some(r) if r.refused => return r.refusal(addr),
            Some(r) if r.silent => r.silence(addr),
            Some(r) => format!("{what}: {}", r.text),
            None => what,
        };
        ProxyError::new(self.unsent_kind(), Side::Peer, text).never_sent()
    }
}

/// HTTP/2-over-TLS connections to peer sidecars, one per (address, identity).
pub(crate) struct Pool {
    identity: IdentityRx,
    idle_timeout: Duration,
    keep_alive: Duration,
    dead_peer: Duration,
    /// The streams a peer is expected to allow (ours, `quic.max_concurrent_streams`) until
    /// its SETTINGS say.
    streams: usize,
    slots: Arc<Slots<H2Conn>>,
    opened: AtomicU64,
    tel: Arc<Telemetry>,
}

impl Pool {
    pub(crate) fn new(identity: IdentityRx, cfg: &QuicConfig, tel: Arc<Telemetry>) -> Arc<Self> {
        Arc::new(Self {
            identity,
            idle_timeout: cfg.idle_timeout,
            keep_alive: cfg.keep_alive_interval,
            dead_peer: cfg.dead_peer_timeout,
            streams: cfg.max_concurrent_streams as usize,
            slots: Arc::default(),
            opened: AtomicU64::new(0),
            tel,
        })
    }

    pub(crate) fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    pub(crate) fn connections_active(&self) -> usize {
        self.slots.active()
    }

    pub(crate) fn peek(&self, addr: SocketAddr, expected: &PeerId) -> Option<ConnState> {
        let c = self.slots.current(addr, expected)?;
        let close_reason = c
            .ended
            .lock()
            .expect("not poisoned")
            .clone()
            .map(|e| e.text);
        Some(ConnState {
            alive: c.is_alive(),
            rtt: None,
            datagram_bytes: None,
            in_flight: c.usage.in_flight(),
            close_reason,
        })
    }

    /// The live connection to `addr` proving `expected`, or a new one (one handshake at a time).
    async fn get(
        self: &Arc<Self>,
        ep: &Endpoint,
        connect_timeout: Duration,
    ) -> Result<(H2Conn, InFlight), ProxyError> {
        let addr = ep.address;
        // What a handshake needs is copied only when one starts, not on every request.
        self.slots
            .get(addr, &ep.identity, self.streams, |usage, known| {
                let (this, id, sni) = (
                    self.clone(),
                    ep.identity.clone(),
                    super::quic::server_name(ep),
                );
                async move {
                    match tokio::time::timeout(
                        connect_timeout,
                        this.connect(addr, &id, &sni, usage, known),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => {
                            this.tel
                                .handshake_failed(Direction::Outbound, HandshakeFailure::Timeout);
                            Err(connect_failed(format!(
                                "no TLS handshake and HTTP/2 setup with peer {addr} (TCP) within {}",
                                humantime::format_duration(connect_timeout)
                            )))
                        }
                    }
                }
            })
            .await
    }

    /// Forgets the connection to an endpoint if it has ended.
    fn evict(&self, addr: SocketAddr, expected: &PeerId) {
        self.slots.evict(addr, expected, |c| !c.is_alive());
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        expected: &PeerId,
        sni: &str,
        usage: Arc<Usage>,
        known: Option<usize>,
    ) -> Result<H2Conn, ProxyError> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| connect_failed(format!("cannot connect to peer {addr} (TCP): {e}")))?;
        let _ = tcp.set_nodelay(true);
        let mismatch = wire::Mismatch::default();
        let material = self.identity.borrow().clone();
        let tls = material
            .client_config(expected.clone(), mismatch.clone(), vec![ALPN_H2.to_vec()])
            .map_err(|e| connect_failed(format!("cannot build TLS config: {e}")))?;
        let name = ServerName::try_from(sni.to_string())
            .map_err(|e| connect_failed(format!("bad server name `{sni}`: {e}")))?;
        let stream = match tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(name, tcp)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let failure = find_rustls(&e).map_or(HandshakeFailure::Other, rustls_failure);
                return Err(wire::handshake_failed(
                    &self.tel,
                    &mismatch,
                    addr,
                    expected,
                    failure,
                    &format_args!("TLS: {e}"),
                ));
            }
        };
        // h2 keeps only the kind and text of an I/O error, so the typed TLS error is recorded
        // on its way up, below h2.
        let tls_error = Arc::new(Mutex::new(None));
        let heard = Arc::new(AtomicBool::new(false));
        let stream = TlsErrors {
            heard: heard.clone(),
            inner: stream,
            seen: tls_error.clone(),
        };
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_FIELD_SECTION as u32)
            .max_concurrent_reset_streams(RESET_STREAMS)
            .reset_stream_duration(RESET_STREAM_TIME)
            .enable_push(false)
            // With no limit known, one stream until the peer's SETTINGS come (h2 holds the
            // others): streams sent past a lower limit of the peer's would be refused.
            .initial_max_send_streams(known.unwrap_or(1))
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| connect_failed(format!("HTTP/2 setup with peer {addr} failed: {e}")))?;
        let pings = conn.ping_pong().expect("taken once");
        let closed = Arc::new(AtomicBool::new(false));
        let ended = Arc::new(Mutex::new(None));
        let open = self
            .tel
            .connection_opened(Direction::Outbound, Transport::Tcp);
        let (keep_alive, dead_peer) = (self.keep_alive, self.dead_peer);
        // The peer's limit is unknown (the first connection to it): a ping at once says when
        // its SETTINGS are applied. A burst waiting for this handshake waits for that too, so
        // it is shared out by the peer's limit; a lone request goes at once.
        let settled = Settled::new(known.is_some());
        let settle = known.is_none().then(|| settled.clone());
        let burst = known.is_none() && usage.in_flight() > 1;
        {
            let (closed, ended, ending) = (closed.clone(), ended.clone(), settled.clone());
            tokio::spawn(async move {
                // The connection runs until it ends, or until the peer stops answering pings
                // (then dropping it closes the socket and fails its streams).
                let pinging = keep_alive_pings(pings, settle, &heard, keep_alive, dead_peer);
                let (r, silent) = tokio::select! {
                    r = &mut conn => (r.map_err(|e| crate::error::source_chain(&e)), false),
                    (why, silent) = pinging => (Err(why), silent),
                };
                drop(conn);
                let end = match r {
                    Ok(()) => Ended {
                        refused: false,
                        silent,
                        text: CLEAN_END.into(),
                    },
                    // A TLS 1.3 server that refuses our certificate says so with an alert
                    // after our handshake finished.
                    Err(text) => Ended {
                        refused: matches!(
                            *tls_error.lock().expect("not poisoned"),
                            Some(rustls::Error::AlertReceived(_))
                        ),
                        silent,
                        text,
                    },
                };
                tracing::debug!(peer = %addr, reason = %end.text, "HTTP/2 connection closed");
                *ended.lock().expect("not poisoned") = Some(end);
                closed.store(true, Ordering::Release);
                // Requests waiting for the SETTINGS find the connection gone.
                ending.changed.notify_waiters();
                drop(open);
            });
        }
        self.opened.fetch_add(1, Ordering::Relaxed);
        let conn = H2Conn {
            send,
            closed,
            ended,
            usage,
            answered: Arc::new(AtomicBool::new(false)),
            settled,
            addr,
        };
        if burst {
            // The pong comes after the peer's SETTINGS (its first frame), so h2 has applied
            // them. The caller's connect timeout bounds the wait. A peer that refused our
            // certificate says so with an alert, which the connection's end records.
            conn.settled().await;
            if !conn.settled.is_done() {
                return Err(match conn.ended().await {
                    Some(r) if r.refused => r.refusal(addr),
                    end => connect_failed(format!(
                        "peer {addr} closed the connection before its HTTP/2 SETTINGS: {}",
                        end.map_or_else(|| "no reason recorded".into(), |e| e.text)
                    )),
                });
            }
        }
        Ok(conn)
    }

    /// Drops connections that carried no request for the idle timeout (HTTP/2 closes a
    /// connection when its last sender is gone); runs until cancelled.
    pub(crate) async fn reap_idle(self: Arc<Self>, shutdown: CancellationToken) {
        pool::reap_idle(self.slots.clone(), self.idle_timeout, shutdown).await;
    }

    /// Forgets every connection (each closes once its requests are done).
    pub(crate) fn close(&self) {
        self.slots.clear();
    }

    /// One request on the pooled connection to `addr`. On failure before sending, the body
    /// comes back.
    pub(crate) async fn exchange(
        self: &Arc<Self>,
        ep: &Endpoint,
        head: &mut Request<()>,
        body: Upload,
        connect_timeout: Duration,
        interim: Option<&Interim>,
    ) -> Result<Response<ProxyBody>, SendError> {
        let (addr, identity) = (ep.address, &ep.identity);
        let method = head.method().clone();
        let (conn, in_flight) = match self.get(ep, connect_timeout).await {
            Ok(c) => c,
            Err(e) => return Err(SendError::new(e, body.unread())),
        };
        // On a first connection whose peer's SETTINGS have not come, h2 opens one stream and
        // holds the others. A request that waits there and is dropped (its caller hung up)
        // is still opened, then reset, when the SETTINGS come (hyperium/h2#125, #875), and the
        // far app may get it. So every request but the connection's first waits instead, where
        // dropping it drops it: in the pool, which plans one stream for such a connection, or
        // here, for one the pool gave past its plan (at its cap of connections to the peer).
        // (No wait once the SETTINGS are known.)
        if !conn.settled.is_done() && conn.usage.in_flight() > 1 {
            conn.settled().await;
        }
        let Ok(mut send) = conn.send.clone().ready().await else {
            self.evict(addr, identity);
            let e = conn
                .not_taken(
                    addr,
                    format!("HTTP/2 connection to peer {addr} closed before the request"),
                )
                .await;
            return Err(SendError::new(e, body.unread()));
        };
        let empty = matches!(body, Upload::Empty);
        // h2 takes the request by value, and holds its fields until the HEADERS frame is
        // written. The caller keeps its head for a retry, so the field map is lent, not
        // copied: taken back when the exchange ends (see `Lent`). The handle `ready` gave back
        // sends it (another clone would take h2's lock twice more).
        let fields = Arc::new(std::mem::take(head.headers_mut()));
        let sent = send.send_request_shared(
            method.clone(),
            head.uri(),
            head.version(),
            fields.clone(),
            empty,
        );
        // Before the first wait, so the map goes home however the exchange ends.
        let _lent = Lent {
            home: head.headers_mut(),
            fields: Some(fields),
        };
        let (response, upload) = match sent {
            Ok(r) => r,
            Err(e) => {
                // Not sent: the connection is going away or gone.
                self.evict(addr, identity);
                let err = conn
                    .not_taken(addr, format!("peer {addr} did not take the request: {e}"))
                    .await;
                return Err(SendError::new(err, body.unread()));
            }
        };
        // A body-less request's send half is kept by the response body, to cancel the stream
        // if the caller gives up on the response (see `H2Body::cancel_with`). A body's upload
        // runs beside the response; giving up on the exchange stops it (resetting the stream,
        // so the far app never takes a truncated body for a whole one). Only an upload has a
        // token to stop it by.
        let (send_half, upload_guard) = if empty {
            (Some(upload), None)
        } else {
            let cancel_upload = CancellationToken::new();
            // A far app that stops reading is the request body's `body_idle_timeout`.
            tokio::spawn(send_h2(
                upload,
                body.into_body(),
                Some(cancel_upload.clone()),
                None,
            ));
            (None, Some(cancel_upload.drop_guard()))
        };
        let resp = match final_response(response, interim).await {
            Ok(r) => r,
            Err(e) => {
                self.evict(addr, identity);
                let text = crate::error::source_chain(&e);
                // The peer reset this stream on a connection that has answered before and lives
                // on: that says nothing of a handshake refusal, so no wait for the connection's
                // end (up to 300 ms) before answering.
                let stream_only =
                    e.is_reset() && e.is_remote() && !conn.never_answered() && conn.is_alive();
                let end = if stream_only {
                    None
                } else {
                    conn.ended().await
                };
                let err = match end {
                    Some(r) if r.refused => r.refusal(addr),
                    // Our keep-alive closed it: the peer went quiet (on a new connection, it
                    // never spoke HTTP/2 at all).
                    Some(r) if r.silent => {
                        ProxyError::new(conn.unsent_kind(), Side::Peer, r.silence(addr))
                    }
                    // RFC 9113 §8.7: REFUSED_STREAM means the peer did not process it.
                    _ if e.reason() == Some(h2::Reason::REFUSED_STREAM) => ProxyError::new(
                        conn.unsent_kind(),
                        Side::Peer,
                        format!("peer {addr} did not take the request: {text}"),
                    )
                    .never_sent(),
                    // TLS 1.3: a server that refuses our certificate sends an alert and closes;
                    // if our request reached it first, the close can come as a reset that
                    // discards the alert. On a connection that never answered, say so.
                    _ if conn.never_answered() => ProxyError::new(
                        ErrorKind::ConnectFailed,
                        Side::Peer,
                        format!(
                            "peer {addr} closed a new connection before answering (its TLS handshake may have refused our certificate): {text}"
                        ),
                    ),
                    _ => ProxyError::new(
                        ErrorKind::PeerReset,
                        Side::Peer,
                        format!("peer {addr} reset the request before responding: {text}"),
                    ),
                };
                return Err(SendError::new(err, None));
            }
        };
        if let Some(guard) = upload_guard {
            guard.disarm();
        }
        conn.answered.store(true, Ordering::Relaxed);
        let (parts, recv) = resp.into_parts();
        Ok(wire::from_peer(parts, &method, move || {
            let body = H2Body::new(recv);
            let body = match send_half {
                Some(send) => body.cancel_with(send),
                None => body,
            };
            held(body, in_flight)
        }))
    }
}

/// A request's field map, lent to h2 for one exchange and taken back when the exchange ends,
/// however it ends (a response, a failure, or the exchange dropped by a timeout or a caller
/// gone): the attempt loop sends the same head again on a retry. h2 lets its share go once the
/// HEADERS frame is written, so it comes back without a copy; a frame still queued (the
/// exchange dropped before the connection wrote it) leaves h2 its share, and the map is
/// copied back. Copying the whole head for each send cost about 900 instructions a request.
struct Lent<'a> {
    home: &'a mut HeaderMap,
    fields: Option<Arc<HeaderMap>>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(fields) = self.fields.take() {
            *self.home = Arc::try_unwrap(fields).unwrap_or_else(|shared| (*shared).clone());
        }
    }
}

/// The final response; interim ones (103…) before it go to `interim`, when the caller can take
/// them.
async fn final_response(
    mut response: h2::client::ResponseFuture,
    interim: Option<&Interim>,
) -> Result<Response<h2::RecvStream>, h2::Error> {
    // h2 drops an interim response that `poll` finds first, so `poll` is called only once the
    // next event is not one (or the stream failed).
    std::future::poll_fn(|cx| loop {
        match response.poll_informational(cx) {
            Poll::Ready(Some(Ok(info))) => {
                if let Some(interim) = interim {
                    interim.forward(info);
                }
            }
            Poll::Ready(Some(Err(_)) | None) => return Pin::new(&mut response).poll(cx),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await
}

/// Sends `body` on an HTTP/2 stream: data as the body produces it (each chunk waits until the
/// peer's window has room, so at most one chunk is buffered beyond it), then trailers or the
/// end of the stream. A body that fails resets the stream (`INTERNAL_ERROR`) and `cancel`
/// resets it (`CANCEL`), so the peer never takes a truncated body for a whole one; a peer that
/// resets the stream stops the sending (and drops `body`), and so, with `stall`, does one whose
/// window stays shut that long (it stopped reading). Returns whether the whole body was sent.
async fn send_h2(
    mut send: h2::SendStream<Bytes>,
    mut body: ProxyBody,
    cancel: Option<tokio_util::sync::CancellationToken>,
    stall: Option<Duration>,
) -> bool {
    let cancelled = async {
        match &cancel {
            Some(c) => c.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(cancelled);
    loop {
        let frame = tokio::select! {
            _ = &mut cancelled => {
                send.send_reset(h2::Reason::CANCEL);
                return false;
            }
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return false,
            f = body.frame() => f,
        };
        match frame {
            None => return send.send_data(Bytes::new(), true).is_ok(),
            Some(Err(e)) => {
                tracing::debug!(error = %e, "body failed; resetting the HTTP/2 stream");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return false;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    send.reserve_capacity(1);
                    let capacity = tokio::select! {
                        _ = &mut cancelled => None,
                        c = within(stall, room(&mut send)) => Some(c),
                    };
                    match capacity {
                        Some(Some(true)) => {}
                        Some(Some(false)) => return false,
                        None => {
                            send.send_reset(h2::Reason::CANCEL);
                            return false;
                        }
                        Some(None) => {
                            tracing::info!(
                                "resetting a response stream the caller took no byte of for {} (inbound.response_stall_timeout)",
                                humantime::format_duration(stall.unwrap_or_default())
                            );
                            send.send_reset(h2::Reason::CANCEL);
                            return false;
                        }
                    }
                    // END_STREAM rides on the last data frame when the body knows it is
                    // the last (a sized body): a receiver that stops at the last byte then
                    // never sees a stream still open.
                    let end = body.is_end_stream();
                    if send.send_data(data, end).is_err() {
                        return false;
                    }
                    if end {
                        return true;
                    }
                }
                Err(frame) => {
                    if let Ok(mut trailers) = frame.into_trailers() {
                        strip_hop_by_hop(&mut trailers);
                        return send.send_trailers(trailers).is_ok();
                    }
                }
            },
        }
    }
}

/// Waits until the peer's window has room on `send`; false if the stream failed.
async fn room(send: &mut h2::SendStream<Bytes>) -> bool {
    loop {
        match std::future::poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(_)) => return true,
            _ => return false,
        }
    }
}

/// `wait`, or `None` once it has waited `stall` (when there is one).
async fn within<F: std::future::Future>(stall: Option<Duration>, wait: F) -> Option<F::Output> {
    match stall {
        Some(stall) => unless_stalled(stall, wait).await,
        None => Some(wait.await),
    }
}

/// Pings the peer every `interval`; returns why once one goes unanswered for `dead_peer` (and
/// true), or a ping fails (false). With `settle`, pings at once and, when the pong came, sets
/// it (waking whoever waits); also when the peer, alive, has not answered it for `dead_peer`.
async fn keep_alive_pings(
    mut pings: h2::PingPong,
    settle: Option<Arc<Settled>>,
    heard: &AtomicBool,
    interval: Duration,
    dead_peer: Duration,
) -> (String, bool) {
    let step = interval.min(dead_peer) / 4;
    if let Some(settled) = settle {
        // A ping at once: its pong says the peer's SETTINGS have been applied (they are its
        // first frame). A peer silent from the start is found dead by the same rule.
        let now = tokio::time::Instant::now();
        if let Err(why) = answered(&mut pings, heard, step, dead_peer, now, Some(&settled)).await {
            return why;
        }
        settled.set();
    }
    loop {
        tokio::time::sleep(interval).await;
        // Bytes arriving prove the peer alive; only a quiet connection is pinged.
        if heard.swap(false, Ordering::Relaxed) {
            continue;
        }
        let now = tokio::time::Instant::now();
        let quiet_since = now.checked_sub(interval).unwrap_or(now);
        if let Err(why) = answered(&mut pings, heard, step, dead_peer, quiet_since, None).await {
            return why;
        }
    }
}

/// Pings the peer and waits for the pong. The peer is dead when nothing at all arrives from it
/// for `dead_peer` (counted from `quiet_since`, looked at every `step`): a pong stuck behind
/// retransmissions on a lossy path, while data still flows, is not death (the rule QUIC's idle
/// timeout follows). `Err` says why, and whether the peer went silent.
///
/// `deaf` is set when bytes arrive after the ping has gone unanswered for `dead_peer`: a peer
/// that never answers pings (RFC 9113 §6.7 says it must) but is alive. A silent one is never
/// taken for it: it is found dead instead.
async fn answered(
    pings: &mut h2::PingPong,
    heard: &AtomicBool,
    step: Duration,
    dead_peer: Duration,
    mut quiet_since: tokio::time::Instant,
    deaf: Option<&Settled>,
) -> Result<(), (String, bool)> {
    let sent = tokio::time::Instant::now();
    let ping = pings.ping(h2::Ping::opaque());
    tokio::pin!(ping);
    loop {
        tokio::select! {
            r = &mut ping => return match r {
                Ok(_pong) => {
                    // The pong's own bytes say nothing about the next interval.
                    heard.store(false, Ordering::Relaxed);
                    Ok(())
                }
                Err(e) => Err((format!("keep-alive ping failed: {e}"), false)),
            },
            _ = tokio::time::sleep(step) => {
                if heard.swap(false, Ordering::Relaxed) {
                    quiet_since = tokio::time::Instant::now();
                    if let Some(deaf) = deaf.filter(|_| sent.elapsed() >= dead_peer) {
                        deaf.set();
                    }
                } else if quiet_since.elapsed() >= dead_peer {
                    let why = format!(
                        "nothing arrived from the peer for {}, keep-alive ping unanswered",
                        humantime::format_duration(dead_peer)
                    );
                    return Err((why, true));
                }
            }
        }
    }
}

/// A TLS stream that keeps the last rustls error it reported (as an I/O error) in `seen`, and
/// sets `heard` when bytes arrive (the keep-alive clears it).
struct TlsErrors<S> {
    inner: S,
    seen: Arc<Mutex<Option<rustls::Error>>>,
    heard: Arc<AtomicBool>,
}

impl<S> TlsErrors<S> {
    fn record<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Err(e)) = &r {
            if let Some(tls) = find_rustls(e) {
                *self.seen.lock().expect("not poisoned") = Some(tls.clone());
            }
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TlsErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        self.record(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TlsErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.record(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.record(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.record(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.record(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    /// A request stream's task is boxed as it is spawned, so its future's size is copied on
    /// every request: the handler's future stayed in it while the body was sent (4.9 KB,
    /// BENCHMARKS.md, sixteenth session of round 2).
    #[test]
    fn a_request_streams_future_stays_small() {
        fn of4<A, B, C, D, F>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let served = of4(super::stream_request);
        eprintln!("request stream future {served} bytes");
        assert!(served <= 4608, "request stream future is {served} bytes");
    }

    /// A lent field map comes home whole however the exchange ends: shared no more (h2 wrote
    /// the frame and let go), or still shared (the exchange dropped while h2 held the frame,
    /// which h2 may still send), when it is copied and h2's share is left as it was.
    #[test]
    fn a_lent_field_map_comes_home_whole() {
        use std::sync::Arc;
        let mut map = http::HeaderMap::new();
        map.insert("x-probe", http::HeaderValue::from_static("one"));
        map.append("x-multi", http::HeaderValue::from_static("first"));
        map.append("x-multi", http::HeaderValue::from_static("second"));
        let whole = map.clone();
        for h2_holds in [false, true] {
            let mut home = map.clone();
            let fields = Arc::new(std::mem::take(&mut home));
            let h2s = fields.clone();
            let lent = super::Lent {
                home: &mut home,
                fields: Some(fields),
            };
            let kept = h2_holds.then_some(h2s);
            drop(lent);
            assert_eq!(home, whole, "h2 holds its share: {h2_holds}");
            if let Some(h2s) = kept {
                assert_eq!(*h2s, whole);
            }
        }
    }
}
