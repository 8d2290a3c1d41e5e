//! The QUIC wire (HTTP/3, ALPN `h3`): the inbound server loop, the client pool that keeps one
//! connection per peer endpoint (shared by all requests to it, re-established when it drops,
//! closed when idle), one request exchange, and the mapping of quinn and h3 errors to what the
//! request path needs to know.

use http_body::Body as _;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::bbr::{PathModel, ResumedBbr};
use super::mtu;
use super::pool::{self, InFlight, Pooled, Slots, Usage};
use super::wire::{
    self, alert_failure, connect_failed, ConnState, SendError, Upload, CONNECTION_WINDOW,
    MAX_FIELD_SECTION, SEND_WINDOW, STREAM_WINDOW,
};
use crate::body::{held, unless_stalled, BodyError, H3Body, ProxyBody};
use crate::config::Quic as QuicConfig;
use crate::discovery::Endpoint;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::facts::Transport;
use crate::headers::strip_hop_by_hop;
use crate::identity::{peer_of, IdentityError, IdentityRx, Material, PeerId};
use crate::inbound::Inbound;
use crate::interim::{self, Interim};
use crate::telemetry::{Direction, HandshakeFailure, Telemetry};

const ALPN_H3: &[u8] = b"h3";
/// Application close code sent when a sidecar stops, and on idle close (H3_NO_ERROR).
pub(crate) const CLOSE_SHUTDOWN: u32 = 0x100;
const CLOSE_IDLE: u32 = 0x100;
/// A peer whose identity we refuse: a private code from the reserved range, so logs on the
/// far side can tell why (H3_GENERAL_PROTOCOL_ERROR would be wrong here).
const CLOSE_IDENTITY: u32 = 0x51c0;

/// The initial RTT of a handshake with a peer whose last connection measured `last`: that
/// RTT, at least `MIN_HANDSHAKE_RTT` (a handshake also waits for the peer's TLS work, which
/// an established connection's RTT does not hold) and at most quinn's default, 333 ms (RFC
/// 9002 §6.2.2: a client MAY take the RTT of a previous connection over the same path).
/// Until an RTT is measured, a lost handshake packet is sent again after three times the
/// initial RTT: a second at 333 ms, a burst of requests held for it after every reconnect.
pub(crate) fn handshake_rtt(last: Option<Duration>) -> Duration {
    const DEFAULT: Duration = Duration::from_millis(333);
    last.map_or(DEFAULT, |rtt| rtt.clamp(MIN_HANDSHAKE_RTT, DEFAULT))
}

/// The least initial RTT taken from a previous connection.
const MIN_HANDSHAKE_RTT: Duration = Duration::from_millis(10);

/// At most this many peer addresses have their last path remembered (a bound for discovery
/// that churns through addresses, or callers through ports; past it the memory starts over).
const REMEMBERED_PATHS: usize = 4096;

/// How long a closed connection's path model (`bbr::PathModel`) starts the next connection to
/// the same peer. Past it the next connection starts from STARTUP, as a first one does.
const PATH_MODEL_AGE: Duration = Duration::from_secs(600);

/// What the last connection with each peer address measured of the path when it closed: its
/// RTT, which the next handshake starts from (`handshake_rtt`), and, under BBR, its path
/// model, which the next connection's controller starts from for `PATH_MODEL_AGE`
/// (`bbr::ResumedBbr`). One per client pool (keyed by the peer's listening address) and one
/// per server endpoint (keyed by the caller's address: a caller sidecar sends from one port).
#[derive(Debug, Default)]
struct Paths(Mutex<rustc_hash::FxHashMap<SocketAddr, Path>>);

#[derive(Debug, Clone, Copy)]
struct Path {
    rtt: Duration,
    model: Option<PathModel>,
}

impl Paths {
    /// Keeps what `conn` measured, as it closes.
    fn remember(&self, addr: SocketAddr, conn: &quinn::Connection) {
        let path = Path {
            rtt: conn.rtt(),
            model: PathModel::of(conn),
        };
        let mut paths = self.0.lock().expect("not poisoned");
        if paths.len() >= REMEMBERED_PATHS && !paths.contains_key(&addr) {
            paths.clear();
        }
        paths.insert(addr, path);
    }

    /// The last connection's path with `addr`, its model dropped once `PATH_MODEL_AGE` old.
    fn recall(&self, addr: SocketAddr) -> Option<Path> {
        let mut path = *self.0.lock().expect("not poisoned").get(&addr)?;
        let measured = path.model.and_then(|m| m.measured());
        if measured.is_none_or(|at| at.elapsed() > PATH_MODEL_AGE) {
            path.model = None;
        }
        Some(path)
    }
}

/// The largest UDP payload quicar takes from a peer: a UDP datagram's own limit (65,535
/// bytes less its header), so that whatever a route allows the peer can send.
const MAX_PAYLOAD: u16 = 65_527;

/// The largest datagram quinn probes for when it knows nothing of the path: an Ethernet
/// MTU's (1,500 − 40 − 8).
const ETHERNET_PAYLOAD: u16 = 1_452;

/// The transport of a connection to `peer`, where it differs from `transport_config`'s, or
/// `None`:
///
/// - quinn's MTU discovery probes up to the route's MTU (`mtu::route_payload`,
///   `discovery_bound`): 9,000-byte frames carry six times the bytes a datagram, and a tunnel
///   with a smaller MTU gets no probes that cannot leave the host. Over loopback (a peer on
///   the same host) the route is the whole path, so datagrams start at that size, 64 KiB on
///   Linux: a 16 KiB response is one datagram instead of twelve. Elsewhere they start at
///   1,200 bytes and quinn keeps the largest probe that arrives; if its black-hole detection
///   later drops to 1,200 (large datagrams lost while small ones pass), it searches again
///   after its cooldown.
/// - Over a path a previous connection measured (`Paths`), the handshake starts from its RTT
///   and, under BBR, the congestion controller from its model.
fn path_transport(
    cfg: &QuicConfig,
    server: bool,
    peer: SocketAddr,
    path: Option<Path>,
) -> Option<quinn::TransportConfig> {
    let payload = discovery_bound(mtu::route_payload(peer));
    if payload.is_none() && path.is_none() {
        return None;
    }
    let mut t = transport_config(cfg, server);
    let mut first = None;
    if let Some(payload) = payload {
        let mut mtud = quinn::MtuDiscoveryConfig::default();
        mtud.upper_bound(payload);
        t.mtu_discovery_config(Some(mtud));
        if is_loopback(peer) {
            t.initial_mtu(payload);
            first = Some(payload).filter(|&p| p > ETHERNET_PAYLOAD);
        }
    }
    let model = path.and_then(|p| p.model);
    if let Some(path) = path {
        t.initial_rtt(handshake_rtt(Some(path.rtt)));
        if let Some(model) = model {
            tracing::debug!(%peer, ?model, "QUIC connection starts from the last one's path model");
        }
    }
    t.congestion_controller_factory(controller(cfg, model, first));
    Some(t)
}

/// The bound of MTU discovery over a route that allows `route` bytes of UDP payload, where it
/// differs from quinn's (`ETHERNET_PAYLOAD`). Below that too: over a tunnel (a 1,420-byte
/// WireGuard MTU, say) probes past the route's MTU fail at the sender (`EMSGSIZE`) and are
/// wasted. `None` under QUIC's minimum of 1,200 bytes, which discovery cannot go below.
fn discovery_bound(route: Option<u16>) -> Option<u16> {
    route.filter(|&p| p >= QUIC_MIN_PAYLOAD && p != ETHERNET_PAYLOAD)
}

/// The smallest datagram QUIC allows a path (RFC 9000 §14), where quinn starts.
const QUIC_MIN_PAYLOAD: u16 = 1_200;

fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

fn transport_config(cfg: &QuicConfig, server: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Liveness: keep-alives while a connection is pooled, and a peer silent for this long
    // is dead (so a vanished peer is noticed within seconds, not at the next request).
    t.keep_alive_interval(Some(cfg.keep_alive_interval));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(cfg.dead_peer_timeout)
            .unwrap_or(quinn::VarInt::from_u32(30_000).into()),
    ));
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(SEND_WINDOW);
    // UDP segmentation offload batches datagrams; a receiver reading with 1,500-byte buffers
    // (Envoy without `prefer_gro`) drops the batches, so it can be turned off.
    t.enable_segmentation_offload(cfg.segmentation_offload);
    let bidi = if server {
        cfg.max_concurrent_streams
    } else {
        0
    };
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(bidi));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(16));
    t.congestion_controller_factory(controller(cfg, None, None));
    t
}

/// The congestion controller of a connection; under BBR, from the model of the path a
/// previous connection measured if there is one (`Paths`). A connection whose datagrams start
/// larger than 1,200 bytes (`first`: over loopback), under Cubic and NewReno, starts from ten
/// of them: their own initial window (14,720 bytes) holds less than one 64 KiB datagram, and
/// a sender whose window holds no datagram sends nothing (BBR's, 240 KB and at least four
/// datagrams once it has a path model, holds three).
fn controller(
    cfg: &QuicConfig,
    model: Option<PathModel>,
    first: Option<u16>,
) -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
    let window = first.map(|payload| 10 * u64::from(payload));
    match (cfg.congestion, model) {
        (crate::config::Congestion::Cubic, _) => {
            let mut c = quinn::congestion::CubicConfig::default();
            if let Some(window) = window {
                c.initial_window(window);
            }
            Arc::new(c)
        }
        (crate::config::Congestion::Newreno, _) => {
            let mut c = quinn::congestion::NewRenoConfig::default();
            if let Some(window) = window {
                c.initial_window(window);
            }
            Arc::new(c)
        }
        (crate::config::Congestion::Bbr, None) => Arc::new(super::bbr::BbrConfig::default()),
        (crate::config::Congestion::Bbr, Some(model)) => Arc::new(ResumedBbr::new(model)),
    }
}

/// Starts a QUIC server with our identity on the bound inbound UDP socket.
pub(crate) fn server_endpoint(
    socket: std::net::UdpSocket,
    material: &Material,
    cfg: &QuicConfig,
) -> Result<quinn::Endpoint, std::io::Error> {
    size_receive_buffer(&socket);
    let server = server_config(material, cfg)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(material.reset_key()));
    endpoint_cfg
        .max_udp_payload_size(MAX_PAYLOAD)
        .expect("within QUIC's bounds");
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

/// The receive buffer asked for on each QUIC socket. The kernel's default (208 KiB on Linux)
/// holds about 90 datagrams: a burst of responses past that is dropped before quinn sees it,
/// and each drop costs a loss-recovery delay. On loopback under 32 concurrent 16 KiB responses
/// the default dropped 16,000 datagrams in 10 s and put a 30 ms tail on 0.1–1 % of requests
/// (BENCHMARKS.md, fifteenth session); TCP's buffers grow by themselves, UDP's do not.
const RECEIVE_BUFFER: usize = 4 << 20;

/// Asks for `RECEIVE_BUFFER` on `socket`; the kernel caps it at `net.core.rmem_max`, and a
/// smaller buffer is logged once, with the setting that raises it.
fn size_receive_buffer(socket: &std::net::UdpSocket) {
    static LOGGED: std::sync::Once = std::sync::Once::new();
    let socket = socket2::SockRef::from(socket);
    let _ = socket.set_recv_buffer_size(RECEIVE_BUFFER);
    // Linux reports twice what it grants (its bookkeeping overhead).
    let got = socket.recv_buffer_size().unwrap_or(0);
    if got < RECEIVE_BUFFER {
        LOGGED.call_once(|| {
            tracing::info!(
                bytes = got,
                wanted = RECEIVE_BUFFER,
                "QUIC socket receive buffer below what bursts need; raise net.core.rmem_max"
            );
        });
    }
}

fn server_config(
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

/// The reason label of a connection that failed during its handshake.
fn handshake_failure(e: &quinn::ConnectionError) -> HandshakeFailure {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => u64::from(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code),
        quinn::ConnectionError::TimedOut => return HandshakeFailure::Timeout,
        _ => return HandshakeFailure::Other,
    };
    // CRYPTO_ERROR codes carry the TLS alert: 0x100 + alert (RFC 9001 §4.8).
    if (0x100..0x200).contains(&code) {
        alert_failure((code - 0x100) as u8)
    } else {
        HandshakeFailure::Other
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// Accepts QUIC connections until `shutdown`; then each connection sends GOAWAY and lets its
/// in-flight requests finish (the caller bounds how long). New handshakes use the latest
/// identity from `identity`.
pub(crate) async fn serve(
    endpoint: quinn::Endpoint,
    mut identity: IdentityRx,
    cfg: QuicConfig,
    inbound: Arc<Inbound>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let mut watching = true;
    // The endpoint's own configuration, for a caller whose path is remembered (`accept`).
    let mut current = server_config(&identity.borrow(), &cfg).ok();
    let paths = Arc::new(Paths::default());
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = identity.changed(), if watching => {
                watching = r.is_ok();
                if watching {
                    let material = identity.borrow_and_update().clone();
                    match server_config(&material, &cfg) {
                        Ok(server) => {
                            endpoint.set_server_config(Some(server.clone()));
                            current = Some(server);
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot use reloaded identity for inbound QUIC"),
                    }
                }
                continue;
            }
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let remote = incoming.remote_address();
        let connecting = accept(incoming, current.as_ref(), &cfg, &paths);
        tracker.spawn(connection(
            remote,
            connecting,
            inbound.clone(),
            paths.clone(),
            shutdown.clone(),
        ));
    }
    // Refuse new handshakes while the accepted connections drain (until the endpoint
    // closes): a refusal lets a caller fail over at once, where an ignored handshake would
    // hold it for its whole connect timeout.
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            incoming.refuse();
        }
    });
}

/// Accepts a handshake, with the transport of its caller's remembered path if there is one.
fn accept(
    incoming: quinn::Incoming,
    current: Option<&quinn::ServerConfig>,
    cfg: &QuicConfig,
    paths: &Paths,
) -> Result<quinn::Connecting, quinn::ConnectionError> {
    let remote = incoming.remote_address();
    let resumed = current.and_then(|server| {
        let transport = path_transport(cfg, true, remote, paths.recall(remote))?;
        let mut server = server.clone();
        server.transport_config(Arc::new(transport));
        Some(Arc::new(server))
    });
    match resumed {
        Some(server) => incoming.accept_with(server),
        None => incoming.accept(),
    }
}

async fn connection(
    remote: SocketAddr,
    connecting: Result<quinn::Connecting, quinn::ConnectionError>,
    inbound: Arc<Inbound>,
    paths: Arc<Paths>,
    shutdown: CancellationToken,
) {
    let tel = inbound.telemetry();
    let conn = match connecting {
        Ok(connecting) => connecting.await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            // No certificate, another CA, an expired one: the TLS alert says which.
            tel.handshake_failed(Direction::Inbound, handshake_failure(&e));
            tracing::warn!(%remote, reason = %e, "inbound handshake refused");
            return;
        }
    };
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
    let (peer, _slot) = match inbound.admit(remote, peer_of(certs.as_deref().map(Vec::as_slice))) {
        Ok(p) => p,
        Err(why) => {
            conn.close(quinn::VarInt::from_u32(CLOSE_IDENTITY), why.as_bytes());
            return;
        }
    };
    tracing::debug!(%remote, identity = %peer, "inbound QUIC connection");
    let _open = tel.connection_opened(Direction::Inbound, Transport::Quic);
    let quic = conn.clone();
    // h3 answers a header section over its limit with a bare 431 itself; it gets a margin so
    // that quicar's own check (in `request`) answers with `quicar-error` instead.
    let mut h3 = match h3::server::builder()
        .max_field_section_size(MAX_FIELD_SECTION * 4)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await
    {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "HTTP/3 setup failed");
            return;
        }
    };
    let requests = TaskTracker::new();
    let peer = Arc::new(peer);
    let mut draining = false;
    // One wait for the shutdown for the connection's life: made anew in the loop, it was
    // registered with the token and removed again for every request.
    let mut cancelled = std::pin::pin!(shutdown.cancelled());
    loop {
        tokio::select! {
            () = cancelled.as_mut(), if !draining => {
                draining = true;
                requests.close();
                // GOAWAY: requests already accepted finish; later ones are refused as never
                // processed, so the caller may safely send them elsewhere.
                if let Err(e) = h3.shutdown(0).await {
                    tracing::debug!(%remote, error = %e, "GOAWAY failed");
                    break;
                }
            }
            _ = requests.wait(), if draining => break,
            r = h3.accept() => match r {
                Ok(Some(resolver)) => {
                    let (inbound, peer) = (inbound.clone(), peer.clone());
                    // Boxed: tokio copies a task's future as it spawns it and as it ends (the
                    // stage is the future's size), so the task holds a pointer. One future
                    // for the whole stream, resolving included, so that nothing kilobytes
                    // large is made and then moved into place.
                    requests.spawn(wire::boxed(|| stream_request(resolver, inbound, peer, remote)));
                }
                // The caller sent GOAWAY and its last request here is done.
                Ok(None) => {
                    draining = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "peer connection ended");
                    break;
                }
            },
        }
    }
    requests.close();
    requests.wait().await;
    paths.remember(remote, &quic);
    if draining {
        // Our GOAWAY, or the caller's: dropping `h3` closes the connection at once, and a
        // close discards stream data the peer has not acknowledged yet: the last responses
        // would be lost. Give the peer a few round trips to take them (or to close first
        // itself).
        let grace = (quic.rtt() * 4 + Duration::from_millis(50)).min(Duration::from_secs(1));
        let _ = tokio::time::timeout(grace, quic.closed()).await;
    }
}

type ServerStream<S> = h3::server::RequestStream<S, Bytes>;

/// One request stream: its head resolved, then served.
///
/// The handler's future is awaited at one point only (`answer_with_interims`, with the
/// handler pinned here): rustc keeps a value that is live across two or more awaits of an
/// async fn in every state of its future, beside whatever any other await holds, and this
/// one was 7.3 KB, copied into the task's box on every request (BENCHMARKS.md, sixteenth
/// session).
async fn stream_request(
    mut resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
    inbound: Arc<Inbound>,
    peer: Arc<PeerId>,
    remote: SocketAddr,
) {
    // A peer that opens a stream and never finishes its head would hold the stream, this task
    // and a drain (which waits for accepted requests) for as long as its connection lives.
    let limit = inbound.header_read_timeout;
    let head = std::future::poll_fn(|cx| resolver.frame_stream.poll_next(cx));
    // Nearly always whole already: the timer is made only if it waits (`unless_stalled`).
    let Some(frame) = unless_stalled(limit, head).await else {
        resolver.abandon();
        return tracing::debug!(%remote, "request head not whole within inbound.header_read_timeout");
    };
    let resolved = match resolver.accept_with_frame(frame) {
        Ok(r) => r.resolve().await,
        Err(e) => Err(e),
    };
    let (req, stream) = match resolved {
        Ok(r) => r,
        Err(e) => return tracing::debug!(%remote, error = %e, "bad request stream"),
    };
    let (mut send, recv) = stream.split();
    let resp = match check_request(&req) {
        Err(e) => e.into_response(),
        Ok(length) => {
            let body = H3Body::new(recv, length, true).boxed_unsync();
            let (interim, interims) = interim::channel();
            let req = req.map(|()| body);
            // In a block, so the handler's future is gone before the response goes out.
            let resp = {
                let handled = inbound.settle_and_handle(req, &peer, Transport::Quic, Some(interim));
                answer_with_interims(std::pin::pin!(handled), &interims, &mut send).await
            };
            let Some(resp) = resp else {
                return tracing::debug!(%remote, "the caller stopped the stream before the response");
            };
            while let Some(info) = interims.try_recv() {
                let _ = send.send_response(info).await;
            }
            resp
        }
    };
    respond(&mut send, resp, inbound.response_stall_timeout).await;
}

/// A request's head as the far app may get it: within the size a field section may have
/// (counted as RFC 9114 §4.2.2 counts it: name + value + 32 per field), and not malformed
/// (RFC 9114 §4.1.2; h2 refuses such a request itself). The declared body length if so.
fn check_request(req: &Request<()>) -> Result<Option<u64>, ProxyError> {
    // One pass over the fields: the section's size, and the length its `Content-Length`
    // fields agree on (not looked up again).
    let (mut size, mut lengths) = (0u64, crate::h1::Lengths::default());
    for (k, v) in req.headers() {
        size += (k.as_str().len() + v.len() + 32) as u64;
        if k == http::header::CONTENT_LENGTH {
            lengths.add(v);
        }
    }
    if size > MAX_FIELD_SECTION {
        return Err(ProxyError::new(
            ErrorKind::HeadersTooLarge,
            Side::Peer,
            format!("the request header section is {size} bytes, over {MAX_FIELD_SECTION}"),
        ));
    }
    lengths
        .agreed()
        .map_err(|why| ProxyError::new(ErrorKind::BadRequest, Side::Peer, why))
}

/// The local app's response, with its interim responses (103…) sent on the stream as they
/// arrive, ahead of it; `None` if the caller stops the stream first (it hung up), which drops
/// the request, and with it the local app's call. A function of its own, with the handler's
/// future pinned by its caller: there it is live across this one await only, so it shares its
/// room with the response's (an async fn keeps a value live across two awaits, as this loop's
/// are, in every state of its future).
async fn answer_with_interims(
    mut handled: Pin<&mut impl std::future::Future<Output = Response<ProxyBody>>>,
    interims: &interim::Queue,
    send: &mut ServerStream<h3_quinn::SendStream<Bytes>>,
) -> Option<Response<ProxyBody>> {
    loop {
        let mut info = std::pin::pin!(interims.recv());
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(resp) = handled.as_mut().poll(cx) {
                return Poll::Ready(Some(Ok(resp)));
            }
            if let Poll::Ready(info) = info.as_mut().poll(cx) {
                return Poll::Ready(Some(Err(info)));
            }
            send.poll_stopped(cx).map(|_| None)
        })
        .await;
        match next? {
            Ok(resp) => return Some(resp),
            Err(info) => {
                // Boxed: rare, and its future would take room in every request's task.
                if let Err(e) = Box::pin(send.send_response(info)).await {
                    tracing::debug!(error = %e, "could not send an interim response");
                }
            }
        }
    }
}

/// Sends a response on the HTTP/3 stream: headers (the sidecar's facts written as headers
/// here, at the edge), then data as the app produces it (each `send_data` waits for flow
/// control), then trailers. An app body that breaks off resets the stream so the caller sees
/// an error, not a short body; so does a caller that takes no byte for `stall` (the stream
/// is reset and the app's body, with its connection, dropped).
async fn respond(
    send: &mut ServerStream<h3_quinn::SendStream<Bytes>>,
    resp: Response<ProxyBody>,
    stall: Duration,
) {
    let (mut parts, mut body) = resp.into_parts();
    crate::headers::write_error_kind(&mut parts);
    let head = send.send_response(Response::from_parts(parts, ()));
    match unless_stalled(stall, head).await {
        Some(Ok(())) => {}
        Some(Err(e)) => return tracing::debug!(error = %e, "could not send response headers"),
        None => return stalled(send, stall),
    }
    loop {
        // The next frame of the app's body; a caller that stops the stream meanwhile (it hung
        // up) drops the body, and with it the app's connection.
        let frame = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending => send.poll_stopped(cx).map(|_| None),
        })
        .await;
        let Some(frame) = frame else {
            return tracing::debug!("the caller stopped the stream during the response");
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "local app response body failed; resetting stream");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => {
                let r = match frame.into_data() {
                    Ok(data) if data.is_empty() => Some(Ok(())),
                    // The body's last bytes (its length is reached) carry the stream's FIN:
                    // one write, not two.
                    Ok(data) if body.is_end_stream() => {
                        match unless_stalled(stall, send.send_data_and_finish(data)).await {
                            Some(Ok(())) => {}
                            Some(Err(e)) => {
                                tracing::debug!(error = %e, "caller stopped reading the response")
                            }
                            None => stalled(send, stall),
                        }
                        return;
                    }
                    Ok(data) => unless_stalled(stall, send.send_data(data)).await,
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => unless_stalled(stall, send.send_trailers(trailers)).await,
                        Err(_) => Some(Ok(())),
                    },
                };
                match r {
                    Some(Ok(())) => {}
                    Some(Err(e)) => {
                        return tracing::debug!(error = %e, "caller stopped reading the response")
                    }
                    None => return stalled(send, stall),
                }
            }
        }
    }
    let _ = send.finish().await;
}

/// A caller that took no byte of the response for `stall`: its stream is reset (the app's body,
/// and so its connection, are dropped by the caller of this).
fn stalled(send: &mut ServerStream<h3_quinn::SendStream<Bytes>>, stall: Duration) {
    tracing::info!(
        "resetting a response stream the caller took no byte of for {} (inbound.response_stall_timeout)",
        humantime::format_duration(stall)
    );
    send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
}

// ---------------------------------------------------------------------------------------------
// Client

/// A pooled HTTP/3 connection: the sender requests are opened on, and the QUIC connection.
#[derive(Clone)]
struct PeerConn {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    conn: quinn::Connection,
    usage: Arc<Usage>,
    stream_limit: usize,
    /// Lost packets, datagrams sent and received at the last telemetry sample.
    sampled: Arc<Mutex<(u64, u64, u64)>>,
}

impl Pooled for PeerConn {
    fn is_alive(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// The peer's limit on the requests we open at once (`peer_stream_limit`).
    fn stream_limit(&self) -> usize {
        self.stream_limit
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

/// The requests the peer lets us have open at once on `conn`: its
/// `initial_max_streams_bidi` transport parameter (RFC 9000 §18.2), which quinn, like other
/// stacks, keeps as the number open at once by raising MAX_STREAMS as streams end. At least
/// one, so a peer that gives none still gets a connection to refuse on.
fn peer_stream_limit(conn: &quinn::Connection) -> Option<usize> {
    use quinn_proto::coding::Codec;
    const INITIAL_MAX_STREAMS_BIDI: u64 = 0x08;
    let mut raw = Vec::new();
    conn.peer_transport_parameters()?.write(&mut raw);
    let mut r = &raw[..];
    while !r.is_empty() {
        let id = quinn::VarInt::decode(&mut r).ok()?.into_inner();
        let len = usize::try_from(quinn::VarInt::decode(&mut r).ok()?.into_inner()).ok()?;
        let value = r.get(..len)?;
        r = &r[len..];
        if id == INITIAL_MAX_STREAMS_BIDI {
            let n = quinn::VarInt::decode(&mut &value[..]).ok()?.into_inner();
            return Some(usize::try_from(n).unwrap_or(usize::MAX).max(1));
        }
    }
    // Absent, the parameter is zero (RFC 9000 §18.2).
    Some(1)
}

/// One QUIC client endpoint and the connections it holds, one per (address, identity).
pub(crate) struct Pool {
    endpoint: quinn::Endpoint,
    identity: IdentityRx,
    /// The transport to a peer whose route and path are nothing special (`path_transport`).
    transport: Arc<quinn::TransportConfig>,
    cfg: QuicConfig,
    paths: Arc<Paths>,
    idle_timeout: Duration,
    slots: Arc<Slots<PeerConn>>,
    opened: AtomicU64,
    tel: Arc<Telemetry>,
}

impl Pool {
    pub(crate) fn new(
        identity: IdentityRx,
        cfg: &QuicConfig,
        tel: Arc<Telemetry>,
    ) -> Result<Arc<Self>, std::io::Error> {
        // Dual-stack where the host has IPv6, IPv4 only where it does not.
        let socket = std::net::UdpSocket::bind(SocketAddr::from(([0u16; 8], 0)))
            .or_else(|_| std::net::UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))))?;
        size_receive_buffer(&socket);
        let mut endpoint_cfg = quinn::EndpointConfig::default();
        endpoint_cfg
            .max_udp_payload_size(MAX_PAYLOAD)
            .expect("within QUIC's bounds");
        let endpoint =
            quinn::Endpoint::new(endpoint_cfg, None, socket, Arc::new(quinn::TokioRuntime))?;
        Ok(Arc::new(Self {
            endpoint,
            identity,
            transport: Arc::new(transport_config(cfg, false)),
            cfg: cfg.clone(),
            paths: Arc::default(),
            idle_timeout: cfg.idle_timeout,
            slots: Arc::default(),
            opened: AtomicU64::new(0),
            tel,
        }))
    }

    pub(crate) fn connections_opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    pub(crate) fn connections_active(&self) -> usize {
        self.slots.active()
    }

    /// The RTT the last connection to `addr` measured, once it has closed.
    pub(crate) fn remembered_rtt(&self, addr: SocketAddr) -> Option<Duration> {
        self.paths.recall(addr).map(|p| p.rtt)
    }

    /// The path model the next connection to `addr` starts its controller from, if any.
    pub(crate) fn remembered_model(&self, addr: SocketAddr) -> Option<PathModel> {
        self.paths.recall(addr)?.model
    }

    /// The state of the connection to an endpoint, if one was made.
    pub(crate) fn peek(&self, addr: SocketAddr, expected: &PeerId) -> Option<ConnState> {
        let c = self.slots.current(addr, expected)?;
        let alive = c.is_alive();
        Some(ConnState {
            alive,
            rtt: alive.then(|| c.conn.rtt()),
            datagram_bytes: alive.then(|| c.conn.stats().path.current_mtu),
            in_flight: c.usage.in_flight(),
            close_reason: c.conn.close_reason().map(|r| r.to_string()),
        })
    }

    /// Feeds each live connection's path statistics to telemetry (as deltas since last time).
    pub(crate) fn sample(&self) {
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
            let sample = crate::telemetry::QuicSample {
                rtt: stats.path.rtt,
                cwnd: stats.path.cwnd,
                datagram: stats.path.current_mtu,
                lost: delta(now.0, last.0),
                sent: delta(now.1, last.1),
                received: delta(now.2, last.2),
            };
            self.tel.quic_sample(&addr.to_string(), &sample);
            *last = now;
        }
    }

    /// The live connection to `addr` proving `expected`, or a new one. Concurrent callers for
    /// the same peer wait for one handshake instead of racing several.
    async fn get(
        self: &Arc<Self>,
        ep: &Endpoint,
        connect_timeout: Duration,
    ) -> Result<(PeerConn, InFlight), ProxyError> {
        let addr = ep.address;
        // What a handshake needs is copied only when one starts, not on every request.
        self.slots
            .get(addr, &ep.identity, self.stream_limit(), |usage, _| {
                let (this, id, sni) = (self.clone(), ep.identity.clone(), server_name(ep));
                async move { this.connect(addr, &id, &sni, connect_timeout, usage).await }
            })
            .await
    }

    /// The streams a peer's connection is expected to allow until its handshake says: ours
    /// (`quic.max_concurrent_streams`), as between quicar sidecars.
    fn stream_limit(&self) -> usize {
        self.cfg.max_concurrent_streams as usize
    }

    /// Whether a QUIC handshake with the endpoint succeeds now (the `auto` fallback's probe).
    pub(crate) async fn reachable(
        self: &Arc<Self>,
        ep: &Endpoint,
        connect_timeout: Duration,
    ) -> bool {
        self.get(ep, connect_timeout).await.is_ok()
    }

    /// Forgets a connection that failed under a request, so the next request reconnects.
    fn evict(&self, addr: SocketAddr, expected: &PeerId, conn: &PeerConn) {
        let id = conn.conn.stable_id();
        self.slots
            .evict(addr, expected, |c| c.conn.stable_id() == id);
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        expected: &PeerId,
        sni: &str,
        connect_timeout: Duration,
        usage: Arc<Usage>,
    ) -> Result<PeerConn, ProxyError> {
        let mismatch = wire::Mismatch::default();
        let material = self.identity.borrow().clone();
        let tls = material
            .client_config(expected.clone(), mismatch.clone(), vec![ALPN_H3.to_vec()])
            .map_err(|e| connect_failed(format!("cannot build TLS config: {e}")))?;
        let quic = QuicClientConfig::try_from(tls)
            .map_err(|e| connect_failed(format!("cannot build QUIC config: {e}")))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(
            match path_transport(&self.cfg, false, addr, self.paths.recall(addr)) {
                Some(t) => Arc::new(t),
                None => self.transport.clone(),
            },
        );
        // Names are checked by SPIFFE ID, never DNS; SNI is for peers that route by it.
        let connecting = self
            .endpoint
            .connect_with(client, addr, sni)
            .map_err(|e| connect_failed(format!("cannot connect to peer {addr}: {e}")))?;
        let conn = match tokio::time::timeout(connect_timeout, connecting).await {
            Err(_) => {
                self.tel
                    .handshake_failed(Direction::Outbound, HandshakeFailure::Timeout);
                return Err(connect_failed(format!(
                    "no QUIC handshake with peer {addr} within {}",
                    humantime::format_duration(connect_timeout)
                )));
            }
            Ok(Err(quinn::ConnectionError::ConnectionClosed(c)))
                if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
            {
                self.tel
                    .handshake_failed(Direction::Outbound, HandshakeFailure::Refused);
                return Err(connect_failed(format!(
                    "peer {addr} refused the connection (it is draining or not accepting)"
                )));
            }
            Ok(Err(e)) => {
                return Err(wire::handshake_failed(
                    &self.tel,
                    &mismatch,
                    addr,
                    expected,
                    handshake_failure(&e),
                    &format_args!("QUIC: {e}"),
                ));
            }
            Ok(Ok(conn)) => conn,
        };
        // No GREASE frames on request streams: h3 writes one between a request's HEADERS and
        // its FIN, so a bodyless request would not end with its HEADERS.
        let (mut driver, send) = h3::client::builder()
            .max_field_section_size(MAX_FIELD_SECTION)
            .send_grease(false)
            .build::<_, _, Bytes>(h3_quinn::Connection::new(conn.clone()))
            .await
            .map_err(|e| connect_failed(format!("HTTP/3 setup with peer {addr} failed: {e}")))?;
        let n = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::debug!(peer = %addr, identity = %expected, opened = n, "QUIC connection established");
        let open = self
            .tel
            .connection_opened(Direction::Outbound, Transport::Quic);
        let (closing, paths) = (conn.clone(), self.paths.clone());
        tokio::spawn(async move {
            let err = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
            drop(open);
            tracing::debug!(peer = %addr, reason = %err, "QUIC connection closed");
            paths.remember(addr, &closing);
        });
        let stream_limit = peer_stream_limit(&conn).unwrap_or(self.stream_limit());
        Ok(PeerConn {
            send,
            conn,
            usage,
            stream_limit,
            sampled: Arc::default(),
        })
    }

    /// Closes connections that carried no request for the idle timeout; runs until cancelled.
    pub(crate) async fn reap_idle(self: Arc<Self>, shutdown: CancellationToken) {
        pool::reap_idle(self.slots.clone(), self.idle_timeout, shutdown).await;
    }

    /// Closes every connection with the shutdown code and waits (bounded) for the peers to know.
    pub(crate) async fn close(&self, wait: Duration) {
        self.endpoint
            .close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"sidecar stopping");
        let _ = tokio::time::timeout(wait, self.endpoint.wait_idle()).await;
    }

    /// One request on the pooled connection to `addr`. On failure, a request body that was
    /// never read is handed back so a retry can still send it.
    pub(crate) async fn exchange(
        self: &Arc<Self>,
        ep: &Endpoint,
        head: &Request<()>,
        body: Upload,
        connect_timeout: Duration,
        interim: Option<&Interim>,
    ) -> Result<Response<ProxyBody>, SendError> {
        let (addr, identity) = (ep.address, &ep.identity);
        let method = head.method().clone();
        let mut body = Some(body);
        let unsent = |body: &mut Option<Upload>| body.take().and_then(Upload::unread);
        let mut attempt = 0;
        let (mut recv, in_flight, upload_guard, resp) = loop {
            attempt += 1;
            let (conn, in_flight) = match self.get(ep, connect_timeout).await {
                Ok(c) => c,
                Err(e) => return Err(SendError::new(e, unsent(&mut body))),
            };
            // By reference: the head stays with the caller for a reconnect or a retry, never
            // copied. A bodyless request ends with its HEADERS: the frame and the stream's FIN
            // go out in one write, so no packet carries the HEADERS alone (peers such as Envoy
            // take HEADERS without FIN as the start of a body).
            let bodyless = matches!(body, Some(Upload::Empty));
            let stream = match conn.send.clone().send_request_ending(head, bodyless).await {
                Ok(stream) => stream,
                Err(e) => {
                    // The connection was going away (GOAWAY, closed): the stream was never
                    // opened, so the request never reached the peer's app. Reconnect once.
                    self.evict(addr, identity, &conn);
                    if let Verdict::Refused(refused) = verdict(&conn, addr).await {
                        return Err(SendError::new(refused, unsent(&mut body)));
                    }
                    if attempt >= 2 {
                        let e = ProxyError::new(
                            ErrorKind::PeerReset,
                            Side::Peer,
                            format!("peer {addr} refused the request stream: {e}"),
                        )
                        .never_sent();
                        return Err(SendError::new(e, unsent(&mut body)));
                    }
                    tracing::debug!(peer = %addr, error = %e, "connection unusable; reconnecting");
                    continue;
                }
            };
            if bodyless {
                body = None;
            }
            let (send, mut recv) = stream.split();
            // Cancels the upload if we give up on this exchange (timeout, reset) before the
            // response. A bodyless request has nothing to cancel (and allocates no token).
            let upload_guard = body.take().map(|b| {
                let cancel_upload = CancellationToken::new();
                tokio::spawn(upload(send, b, cancel_upload.clone()));
                cancel_upload.drop_guard()
            });
            match final_response(&mut recv, interim).await {
                Ok(resp) => break (recv, in_flight, upload_guard, resp),
                Err(e) => {
                    // One stream's own failure (the peer reset or finished it, sent a bad
                    // head) leaves the connection serving the others: only a connection that
                    // failed is evicted and asked why.
                    let connection_failed =
                        matches!(e, h3::error::StreamError::ConnectionError { .. })
                            || conn.conn.close_reason().is_some();
                    if connection_failed {
                        self.evict(addr, identity, &conn);
                    }
                    let why = stream_failure(connection_failed.then_some(&conn), addr, &e).await;
                    return Err(SendError::new(why, None));
                }
            }
        };
        let (parts, ()) = resp.into_parts();
        // RFC 9114 §4.1.2: a response whose Content-Length is not one valid length is
        // malformed, and an intermediary must not forward it (h2 refuses one the same way).
        let len = match crate::h1::declared_length(&parts.headers) {
            Ok(len) => len,
            Err(why) => {
                recv.stop_sending(h3::error::Code::H3_MESSAGE_ERROR);
                let e = ProxyError::new(
                    ErrorKind::PeerReset,
                    Side::Peer,
                    format!("peer {addr} sent a malformed response: {why}"),
                );
                return Err(SendError::new(e, None));
            }
        };
        if let Some(guard) = upload_guard {
            guard.disarm();
        }
        Ok(wire::from_peer(parts, &method, move || {
            held(H3Body::new(recv, len, false), in_flight)
        }))
    }
}

/// The TLS server name for an endpoint: its configured one, else the trust domain.
pub(crate) fn server_name(ep: &Endpoint) -> String {
    ep.server_name
        .clone()
        .unwrap_or_else(|| ep.identity.trust_domain().to_string())
}

/// What a stream that failed before its response tells about the request; `failed` is its
/// connection when that failed too.
async fn stream_failure(
    failed: Option<&PeerConn>,
    addr: SocketAddr,
    e: &h3::error::StreamError,
) -> ProxyError {
    // RFC 9114 §4.1.1: H3_REQUEST_REJECTED means the server did not process it (e.g. it
    // arrived after GOAWAY), so it may be sent again.
    if matches!(e, h3::error::StreamError::RemoteTerminate { code, .. } if *code == h3::error::Code::H3_REQUEST_REJECTED)
    {
        return ProxyError::new(
            ErrorKind::PeerReset,
            Side::Peer,
            format!("peer {addr} rejected the request unprocessed"),
        )
        .never_sent();
    }
    let verdict = match failed {
        Some(conn) => verdict(conn, addr).await,
        None => Verdict::Unknown,
    };
    match verdict {
        Verdict::Refused(refused) => refused,
        // A stateless reset: the peer restarted and has no memory of this connection, so the
        // request never reached its app.
        Verdict::Forgotten => ProxyError::new(
            ErrorKind::PeerReset,
            Side::Peer,
            format!("peer {addr} restarted and reset the connection"),
        )
        .never_sent(),
        Verdict::Unknown => ProxyError::new(
            ErrorKind::PeerReset,
            Side::Peer,
            format!("peer {addr} reset the request before responding: {e}"),
        ),
    }
}

/// The final response head; interim ones (103 Early Hints…) before it go to `interim`, when
/// the caller can take them.
async fn final_response(
    recv: &mut h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
    interim: Option<&Interim>,
) -> Result<http::Response<()>, h3::error::StreamError> {
    loop {
        let resp = recv.recv_response().await?;
        if !resp.status().is_informational() || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
        }
        if let Some(interim) = interim {
            interim.forward(resp);
        }
    }
}

/// What a connection that just failed under a request tells about the request.
enum Verdict {
    /// The peer refused our handshake: `connect-failed`, the request never reached it.
    Refused(ProxyError),
    /// The peer answered with a stateless reset: it restarted and never saw the request.
    Forgotten,
    /// Anything else: the request may have reached the peer's app.
    Unknown,
}

/// TLS 1.3 lets the client finish its handshake before the server has judged the client's
/// certificate, so a refused client briefly looks connected and then sees a CRYPTO_ERROR close.
async fn verdict(conn: &PeerConn, addr: SocketAddr) -> Verdict {
    let Ok(reason) = tokio::time::timeout(Duration::from_millis(200), conn.conn.closed()).await
    else {
        return Verdict::Unknown;
    };
    let refused = match &reason {
        quinn::ConnectionError::Reset => return Verdict::Forgotten,
        // CRYPTO_ERROR codes carry the TLS alert: 0x100 + alert.
        quinn::ConnectionError::ConnectionClosed(close) => {
            (0x100..0x200).contains(&u64::from(close.error_code))
        }
        quinn::ConnectionError::ApplicationClosed(close) => {
            close.error_code == quinn::VarInt::from_u32(CLOSE_IDENTITY)
        }
        _ => false,
    };
    if !refused {
        return Verdict::Unknown;
    }
    tracing::warn!(peer = %addr, reason = %reason, "peer refused our handshake");
    Verdict::Refused(connect_failed(format!(
        "peer {addr} refused the handshake: {reason}"
    )))
}

type ClientSend = h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

/// Streams the app's request body onto the HTTP/3 stream; stops when the peer's flow control
/// says so (send_data waits). A body that fails, or a cancelled exchange, resets the stream
/// rather than finishing it, so the far app never mistakes a truncated body for a whole one.
async fn upload(mut send: ClientSend, body: Upload, cancel: CancellationToken) {
    let mut body = match body {
        Upload::Empty => {
            let _ = send.finish().await;
            return;
        }
        Upload::Bytes(data, trailers) => {
            let sent = tokio::select! {
                _ = cancel.cancelled() => {
                    send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                    return;
                }
                r = send.send_data(data) => r,
            };
            if sent.is_ok() {
                if let Some(mut t) = trailers {
                    strip_hop_by_hop(&mut t);
                    let _ = send.send_trailers(t).await;
                }
                let _ = send.finish().await;
            }
            return;
        }
        Upload::Stream(body) => body,
    };
    let reset = |send: &mut ClientSend| send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    loop {
        let frame = tokio::select! {
            _ = cancel.cancelled() => return reset(&mut send),
            f = body.frame() => f,
        };
        let result: Result<(), BodyError> = match frame {
            None => {
                let _ = send.finish().await;
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "app request body failed; resetting stream");
                return reset(&mut send);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => Ok(()),
                Ok(data) => tokio::select! {
                    _ = cancel.cancelled() => return reset(&mut send),
                    r = send.send_data(data) => r.map_err(Into::into),
                },
                Err(frame) => match frame.into_trailers() {
                    Ok(mut trailers) => {
                        strip_hop_by_hop(&mut trailers);
                        send.send_trailers(trailers).await.map_err(Into::into)
                    }
                    Err(_) => Ok(()),
                },
            },
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "peer stopped reading the request body");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn quic_sockets_get_the_receive_buffer_bursts_need_as_far_as_the_kernel_allows() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        size_receive_buffer(&socket);
        let got = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        // Linux grants up to `rmem_max` and reports twice what it grants.
        let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        let want = max.map_or(RECEIVE_BUFFER, |m| RECEIVE_BUFFER.min(2 * m));
        assert!(
            got >= want,
            "{got} bytes, default {default}, rmem_max {max:?}"
        );
        assert!(got >= default);
    }

    /// A request stream's task is boxed as it is spawned, so its future's size is copied and
    /// touched on every request: 7.3 KB when the handler's future was live across several
    /// awaits of one async fn (BENCHMARKS.md, sixteenth session of round 2).
    #[test]
    fn a_request_streams_future_stays_small() {
        fn of4<A, B, C, D, F>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let served = of4(stream_request);
        eprintln!("request stream future {served} bytes");
        assert!(served <= 6656, "request stream future is {served} bytes");
    }

    #[test]
    fn a_handshake_starts_from_the_last_rtt_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(handshake_rtt(None), ms(333));
        assert_eq!(handshake_rtt(Some(ms(50))), ms(50));
        // Loopback's tens of microseconds would resend the first packet before the peer's
        // TLS work is done; a path slower than quinn's default keeps the default.
        assert_eq!(handshake_rtt(Some(Duration::from_micros(40))), ms(10));
        assert_eq!(handshake_rtt(Some(ms(900))), ms(333));
    }

    #[test]
    fn a_path_model_is_recalled_only_while_fresh() {
        let addr = SocketAddr::from(([198, 18, 0, 1], 443));
        let paths = Paths::default();
        assert!(paths.recall(addr).is_none());
        let remembered = |measured| Path {
            rtt: Duration::from_millis(52),
            model: Some(PathModel::for_tests(
                1_000_000,
                Duration::from_millis(50),
                measured,
            )),
        };
        let fresh = remembered(Instant::now());
        paths.0.lock().unwrap().insert(addr, fresh);
        let path = paths.recall(addr).expect("remembered");
        assert_eq!(
            (path.rtt, path.model),
            (Duration::from_millis(52), fresh.model)
        );
        // Past the age (from when the model was measured) the RTT still starts the handshake;
        // the model no longer starts the controller.
        let old = Instant::now() - PATH_MODEL_AGE - Duration::from_secs(1);
        paths.0.lock().unwrap().insert(addr, remembered(old));
        let path = paths.recall(addr).expect("remembered");
        assert_eq!((path.rtt, path.model), (Duration::from_millis(52), None));
    }

    #[test]
    fn discovery_is_bounded_by_the_route_wherever_quic_allows() {
        // Jumbo frames, IPv4 over Ethernet, a WireGuard tunnel: the route's payload.
        for p in [8_972, 1_472, 1_372, 1_200] {
            assert_eq!(discovery_bound(Some(p)), Some(p));
        }
        // quinn's own bound already; below QUIC's minimum; no route known.
        for route in [Some(ETHERNET_PAYLOAD), Some(1_199), Some(0), None] {
            assert_eq!(discovery_bound(route), None, "{route:?}");
        }
    }

    #[test]
    fn over_loopback_every_controller_starts_with_room_for_several_64_kib_datagrams() {
        // A window that holds no datagram sends nothing: Cubic's handshake over loopback
        // timed out with quinn's 14,720-byte initial window.
        for congestion in [
            crate::config::Congestion::Bbr,
            crate::config::Congestion::Cubic,
            crate::config::Congestion::Newreno,
        ] {
            let cfg = QuicConfig {
                congestion,
                ..QuicConfig::default()
            };
            let window = controller(&cfg, None, Some(MAX_PAYLOAD))
                .build(Instant::now(), MAX_PAYLOAD)
                .window();
            assert!(
                window >= 3 * u64::from(MAX_PAYLOAD),
                "{congestion:?}: {window}"
            );
        }
    }

    #[test]
    fn a_remembered_model_starts_the_controller_only_under_bbr() {
        let model = PathModel::for_tests(10_000_000, Duration::from_millis(50), Instant::now());
        let window = |congestion, model| {
            let cfg = QuicConfig {
                congestion,
                ..QuicConfig::default()
            };
            controller(&cfg, model, None)
                .build(Instant::now(), 1200)
                .window()
        };
        let bbr = crate::config::Congestion::Bbr;
        let initial = window(bbr, None);
        // One bandwidth-delay product: 500 KB, where a new connection starts from quinn's
        // initial window (200 datagrams of 1,200 bytes).
        assert_eq!(window(bbr, Some(model)), 500_000);
        assert_eq!(initial, 240_000);
        let cubic = crate::config::Congestion::Cubic;
        assert_eq!(window(cubic, Some(model)), window(cubic, None));
    }
}
