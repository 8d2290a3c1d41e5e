//! The peer-facing listener: accepts mutual-TLS QUIC connections from other sidecars, checks
//! each caller's identity against the local service's policy, and hands the request to the
//! local app over pooled HTTP/1.1 keep-alive connections.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{content_length, BodyError, Counted, H3Body, ProxyBody};
use crate::config::Config;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::headers::{
    service_of_authority, strip_hop_by_hop, strip_quicar, DEADLINE, PEER_IDENTITY,
};
use crate::identity::{peer_of, PeerId};
use crate::policy::authorize;
use crate::telemetry::{Direction, Telemetry};
use crate::transport::quic::{failure_reason, CLOSE_IDENTITY, MAX_FIELD_SECTION};

type ServerStream<S> = h3::server::RequestStream<S, Bytes>;

struct LocalRoute {
    name: String,
    address: SocketAddr,
    allow: Option<Vec<String>>,
}

/// Everything the inbound path needs, shared by all peer connections.
pub struct Inbound {
    tel: Arc<Telemetry>,
    locals: HashMap<String, LocalRoute>,
    trust_domain: String,
    app: Client<HttpConnector, ProxyBody>,
}

impl Inbound {
    pub fn new(config: &Config, tel: Arc<Telemetry>) -> Self {
        let locals = config
            .local
            .iter()
            .map(|l| {
                let route = LocalRoute {
                    name: l.name.clone(),
                    address: l.address,
                    allow: l.allow.clone(),
                };
                (l.name.to_ascii_lowercase(), route)
            })
            .collect();
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.inbound.connect_timeout));
        connector.set_nodelay(true);
        let app = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Self {
            tel,
            locals,
            trust_domain: config.node.trust_domain.clone(),
            app,
        }
    }
}

/// Accepts QUIC connections until `shutdown`; then each connection sends GOAWAY and lets its
/// in-flight requests finish (the caller bounds how long).
pub async fn serve(
    endpoint: quinn::Endpoint,
    state: Arc<Inbound>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(connection(incoming, state, shutdown));
    }
    // Refuse new handshakes while the accepted connections drain.
    endpoint.set_server_config(None);
}

async fn connection(incoming: quinn::Incoming, state: Arc<Inbound>, shutdown: CancellationToken) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // No certificate, another CA, an expired one: rustls says which in the reason.
            state
                .tel
                .handshake_failed(Direction::Inbound, failure_reason(&e.to_string()));
            tracing::warn!(%remote, reason = %e, "inbound handshake refused");
            return;
        }
    };
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
    let peer = match peer_of(certs.as_deref().map(Vec::as_slice)) {
        Ok(p) if p.trust_domain() == state.trust_domain => p,
        Ok(p) => {
            state
                .tel
                .handshake_failed(Direction::Inbound, "foreign-trust-domain");
            tracing::warn!(%remote, identity = %p, "inbound peer refused: foreign trust domain");
            conn.close(
                quinn::VarInt::from_u32(CLOSE_IDENTITY),
                b"foreign trust domain",
            );
            return;
        }
        Err(e) => {
            state
                .tel
                .handshake_failed(Direction::Inbound, "no-identity");
            tracing::warn!(%remote, reason = %e, "inbound peer refused: no usable identity");
            conn.close(
                quinn::VarInt::from_u32(CLOSE_IDENTITY),
                b"no SPIFFE identity",
            );
            return;
        }
    };
    tracing::debug!(%remote, identity = %peer, "inbound QUIC connection");
    let _open = state.tel.connection_opened(Direction::Inbound, "quic");
    let quic = conn.clone();
    let mut h3 = match h3::server::builder()
        .max_field_section_size(MAX_FIELD_SECTION)
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
    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !draining => {
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
                    let state = state.clone();
                    let peer = peer.clone();
                    requests.spawn(async move {
                        match resolver.resolve_request().await {
                            Ok((req, stream)) => request(req, stream, &state, &peer).await,
                            Err(e) => tracing::debug!(%remote, error = %e, "bad request stream"),
                        }
                    });
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "peer connection ended");
                    break;
                }
            },
        }
    }
    requests.close();
    requests.wait().await;
    if draining {
        // Dropping `h3` closes the connection at once, and a close discards stream data the
        // peer has not acknowledged yet: the last responses would be lost. Give the peer a few
        // round trips to take them (or to close first itself).
        let grace = (quic.rtt() * 4 + Duration::from_millis(50)).min(Duration::from_secs(1));
        let _ = tokio::time::timeout(grace, quic.closed()).await;
    }
}

async fn request(
    req: Request<()>,
    stream: ServerStream<h3_quinn::BidiStream<Bytes>>,
    state: &Inbound,
    peer: &PeerId,
) {
    let (mut send, recv) = stream.split();
    let body = H3Body::new(recv, content_length(req.headers())).boxed_unsync();
    let resp = settle_and_handle(req.map(|()| body), state, peer, "quic").await;
    respond(&mut send, resp).await;
}

/// Settles a body of unknown length (an empty one goes to the app as no body), then `handle`.
async fn settle_and_handle(
    req: Request<ProxyBody>,
    state: &Inbound,
    peer: &PeerId,
    transport: &'static str,
) -> Response<ProxyBody> {
    let (parts, body) = req.into_parts();
    match crate::body::settle(body).await {
        Ok(body) => handle(Request::from_parts(parts, body), state, peer, transport).await,
        Err(e) => ProxyError::new(
            ErrorKind::PeerReset,
            Side::Peer,
            format!("request body failed: {e}"),
        )
        .into_response(),
    }
}

/// One request from a peer, whatever the transport: telemetry around `to_app`. The record is
/// written when the returned response's body ends.
pub(crate) async fn handle(
    req: Request<ProxyBody>,
    state: &Inbound,
    peer: &PeerId,
    transport: &'static str,
) -> Response<ProxyBody> {
    let mut guard = state.tel.request(Direction::Inbound);
    {
        let f = &mut guard.facts;
        f.transport = transport;
        f.method = req.method().to_string();
        f.path = req.uri().path().to_string();
        f.authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        f.peer_identity = Some(peer.to_string());
        f.trace_id = req
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::telemetry::trace_id)
            .map(str::to_string);
    }
    if let Some(local) =
        service_of_authority(&guard.facts.authority).and_then(|n| state.locals.get(&n))
    {
        guard.service(&local.name);
    }
    let resp = match to_app(req, state, peer, guard.bytes_in()).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(kind = e.kind.as_str(), error = %e.message, "inbound request failed");
            e.into_response()
        }
    };
    guard.facts.status = resp.status().as_u16();
    guard.facts.error_kind = resp
        .headers()
        .get(crate::headers::QUICAR_ERROR)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes_out = guard.bytes_out();
    resp.map(|b| Counted::new(b, bytes_out).hold(guard).boxed_unsync())
}

/// route → authorize → app. Errors become sidecar responses with their kind.
async fn to_app(
    req: Request<ProxyBody>,
    state: &Inbound,
    peer: &PeerId,
    bytes_in: Arc<std::sync::atomic::AtomicU64>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .ok_or_else(|| {
            ProxyError::new(
                ErrorKind::BadRequest,
                Side::Peer,
                "request without :authority",
            )
        })?;
    let name = service_of_authority(&authority).ok_or_else(|| {
        ProxyError::new(
            ErrorKind::BadRequest,
            Side::Peer,
            format!("`{authority}` is not a service name"),
        )
    })?;
    let local = state.locals.get(&name).ok_or_else(|| {
        ProxyError::new(
            ErrorKind::UnknownService,
            Side::Peer,
            format!("no local service `{name}` behind this sidecar"),
        )
    })?;
    if !authorize(local.allow.as_deref(), &state.trust_domain, peer) {
        tracing::info!(service = %local.name, caller = %peer, "request denied by policy");
        return Err(ProxyError::new(
            ErrorKind::Denied,
            Side::Peer,
            format!("{peer} may not call `{}`", local.name),
        ));
    }
    strip_hop_by_hop(&mut parts.headers);
    // The caller's remaining budget: the app gets no longer than that.
    let deadline = parts
        .headers
        .get(DEADLINE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    // Only this sidecar speaks for the caller: drop anything that claims to.
    strip_quicar(&mut parts.headers);
    parts.headers.insert(
        PEER_IDENTITY,
        HeaderValue::from_str(peer.as_str()).expect("SPIFFE IDs are visible ASCII"),
    );
    parts.headers.insert(
        http::header::HOST,
        HeaderValue::from_str(&authority).expect("authority is a valid header value"),
    );
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(local.address.to_string())
        .path_and_query(path)
        .build()
        .map_err(|e| {
            ProxyError::new(ErrorKind::BadRequest, Side::Peer, format!("bad path: {e}"))
        })?;
    parts.version = http::Version::HTTP_11;
    let req = Request::from_parts(parts, Counted::new(body, bytes_in).boxed_unsync());
    let call = state.app.request(req);
    let result = match deadline {
        // Dropping the call closes the connection to the app: it sees the cancellation.
        Some(left) => tokio::time::timeout(left, call).await.map_err(|_| {
            ProxyError::new(
                ErrorKind::Timeout,
                Side::LocalApp,
                format!(
                    "the caller's deadline passed before local service `{}` answered",
                    local.name
                ),
            )
        })?,
        None => call.await,
    };
    let mut resp = result.map_err(|e| {
        if e.is_connect() {
            ProxyError::new(
                ErrorKind::ConnectFailed,
                Side::LocalApp,
                format!(
                    "cannot connect to local service `{}` at {}",
                    local.name, local.address
                ),
            )
        } else {
            ProxyError::new(
                ErrorKind::PeerReset,
                Side::LocalApp,
                format!(
                    "local service `{}` at {} failed: {}",
                    local.name,
                    local.address,
                    crate::error::source_chain(&e)
                ),
            )
        }
    })?;
    strip_hop_by_hop(resp.headers_mut());
    Ok(resp.map(|b| b.map_err(|e| -> BodyError { Box::new(e) }).boxed_unsync()))
}

/// Sends a response on the HTTP/3 stream: headers, then data as the app produces it (each
/// `send_data` waits for flow control), then trailers. An app body that breaks off resets the
/// stream so the caller sees an error, not a short body.
async fn respond(send: &mut ServerStream<h3_quinn::SendStream<Bytes>>, resp: Response<ProxyBody>) {
    let (parts, mut body) = resp.into_parts();
    if let Err(e) = send.send_response(Response::from_parts(parts, ())).await {
        tracing::debug!(error = %e, "could not send response headers");
        return;
    }
    loop {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "local app response body failed; resetting stream");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => {
                let r = match frame.into_data() {
                    Ok(data) if data.is_empty() => Ok(()),
                    Ok(data) => send.send_data(data).await,
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => send.send_trailers(trailers).await,
                        Err(_) => Ok(()),
                    },
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "caller stopped reading the response");
                    return;
                }
            }
        }
    }
    let _ = send.finish().await;
}

/// Accepts TLS + HTTP/2 connections from peers on the inbound TCP listener until `shutdown`;
/// then each connection sends GOAWAY and finishes its streams (the caller bounds how long).
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    tls: Arc<std::sync::Mutex<Arc<rustls::ServerConfig>>>,
    state: Arc<Inbound>,
    max_streams: u32,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let (tcp, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "inbound TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.lock().expect("not poisoned").clone());
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tracker.spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    state.tel.handshake_failed(Direction::Inbound, failure_reason(&e.to_string()));
                    tracing::warn!(%remote, reason = %e, "inbound TLS handshake refused");
                    return;
                }
                Err(_) => {
                    state.tel.handshake_failed(Direction::Inbound, "timeout");
                    tracing::warn!(%remote, "inbound TLS handshake timed out");
                    return;
                }
            };
            let certs = stream.get_ref().1.peer_certificates().map(<[_]>::to_vec);
            let peer = match peer_of(certs.as_deref()) {
                Ok(p) if p.trust_domain() == state.trust_domain => p,
                Ok(p) => {
                    state.tel.handshake_failed(Direction::Inbound, "foreign-trust-domain");
                    tracing::warn!(%remote, identity = %p, "inbound peer refused: foreign trust domain");
                    return;
                }
                Err(e) => {
                    state.tel.handshake_failed(Direction::Inbound, "no-identity");
                    tracing::warn!(%remote, reason = %e, "inbound peer refused: no usable identity");
                    return;
                }
            };
            tracing::debug!(%remote, identity = %peer, "inbound TCP connection");
            let _open = state.tel.connection_opened(Direction::Inbound, "tcp");
            let peer = Arc::new(peer);
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (state, peer) = (state.clone(), peer.clone());
                async move {
                    let req = req.map(|b| b.map_err(|e| -> BodyError { Box::new(e) }).boxed_unsync());
                    Ok::<_, std::convert::Infallible>(settle_and_handle(req, &state, &peer, "tcp").await)
                }
            });
            let mut builder = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(max_streams)
                .initial_stream_window_size(1024 * 1024)
                .initial_connection_window_size(16 * 1024 * 1024)
                .max_header_list_size(MAX_FIELD_SECTION as u32);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%remote, error = %e, "inbound TCP connection ended");
                    }
                    return;
                }
                _ = shutdown.cancelled() => {}
            }
            // GOAWAY; streams already accepted finish.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        });
    }
}
