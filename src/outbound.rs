//! The app-facing listener: HTTP/1.1 from the local app, routed by Host or absolute URI to a
//! remote service, and forwarded through the transport the service uses. `forward` is the
//! whole request path, in order (route once → cache → attempts), and knows no wire protocol.
//!
//! - `route`: a remote service as the path sees it.
//! - `attempts`: the concurrency limit, the deadline, and attempts with retries.
//! - `caching`: the cache step, given a `Fetch` to reach the service.
//! - `app_conn`: the app's HTTP/1.1 connection (quicar's own server): heads read and checked,
//!   request bodies streamed, interim (1xx) responses written ahead of the final one.

mod app_conn;
mod attempts;
mod caching;
mod route;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, Uri};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::Listener;
use crate::body::{content_length, Counted, ProxyBody};
use crate::cache::{Cache, Clock};
use crate::config::{Config, Outbound as OutboundConfig, TransportKind};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::facts::{CacheOutcome, Transport, Upstream};
use crate::headers::{service_of_authority, strip_hop_by_hop, strip_quicar, write_facts};
use crate::interim::Interim;
use crate::telemetry::{ensure_traceparent, Direction, RequestGuard, Telemetry};
use crate::transport::Clients;
use attempts::AppBody;
use route::Route;

/// Everything the outbound request path needs, shared by all connections.
pub(crate) struct Outbound {
    /// By service name; Fx-hashed (names come from our config, lookups from the app).
    routes: rustc_hash::FxHashMap<String, Arc<Route>>,
    clients: Arc<Clients>,
    transport_header: bool,
    max_header_bytes: usize,
    tel: Arc<Telemetry>,
}

impl Outbound {
    /// Builds the routes and starts each service's discovery source.
    pub(crate) fn new(
        config: &Config,
        clients: Arc<Clients>,
        clock: &Arc<Clock>,
        tel: Arc<Telemetry>,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Self {
        let routes = config
            .service
            .iter()
            .map(|svc| {
                let tel = tel.service(Direction::Outbound, &svc.name);
                let route = Route::new(config, svc, clock, tel, tracker, shutdown.clone());
                (svc.name.to_ascii_lowercase(), Arc::new(route))
            })
            .collect();
        Self {
            routes,
            clients,
            transport_header: config.outbound.transport_header,
            max_header_bytes: config.outbound.max_header_bytes,
            tel,
        }
    }

    /// How the cache step of `route` reaches the service (owned, for background refreshes).
    fn fetch_for(&self, route: &Arc<Route>) -> caching::Fetch {
        let (route, clients, tel) = (route.clone(), self.clients.clone(), self.tel.clone());
        Arc::new(move |mut head: http::request::Parts| {
            let (route, clients, tel) = (route.clone(), clients.clone(), tel.clone());
            let interim = head.extensions.remove::<Interim>();
            // A request that waited for another's fetch has only the rest of its time.
            let budget = head
                .extensions
                .remove::<caching::Deadline>()
                .map_or(route.timeout, |d| d.left());
            Box::pin(async move {
                let head = Request::from_parts(head, ());
                let (mut resp, upstream) =
                    attempts::fetch(&route, &clients, &tel, head, None, interim.as_ref(), budget)
                        .await?;
                // Through the cache step, the facts ride in the response's extensions.
                resp.extensions_mut().insert(upstream);
                Ok(resp)
            })
        })
    }

    /// Services, their endpoints and each endpoint's connection state, for `/endpoints`.
    pub(crate) fn endpoints(&self) -> Vec<ServiceView> {
        let mut out: Vec<ServiceView> = self
            .routes
            .values()
            .map(|r| ServiceView {
                name: r.name.clone(),
                transport: r.transport,
                cache: r.cache.is_some(),
                endpoints: r
                    .endpoints
                    .borrow()
                    .iter()
                    .map(|ep| {
                        let transport = self.clients.transport_for(r.transport, ep);
                        let state = self.clients.peek(transport, ep);
                        let lb = r.balancer.state(ep);
                        EndpointView {
                            address: ep.address,
                            identity: ep.identity.to_string(),
                            weight: ep.weight,
                            priority: ep.priority,
                            breaker: lb.breaker_state(),
                            latency_ewma_ms: lb.ewma().as_secs_f64() * 1000.0,
                            outstanding: lb.outstanding(),
                            transport,
                            connected: state.as_ref().is_some_and(|s| s.alive),
                            rtt_ms: state
                                .as_ref()
                                .and_then(|s| s.rtt)
                                .map(|rtt| rtt.as_secs_f64() * 1000.0),
                            datagram_bytes: state.as_ref().and_then(|s| s.datagram_bytes),
                            in_flight: state.as_ref().map_or(0, |s| s.in_flight),
                            handshake_rtt_ms: (transport == Transport::Quic)
                                .then(|| self.clients.handshake_rtt(ep).as_secs_f64() * 1000.0),
                            path_model: (transport == Transport::Quic)
                                .then(|| self.clients.path_model(ep))
                                .flatten()
                                .map(|m| PathModelView {
                                    bandwidth_mbit_s: m.bandwidth() as f64 * 8.0 / 1e6,
                                    min_rtt_ms: m.min_rtt().as_secs_f64() * 1000.0,
                                    age_s: m
                                        .measured()
                                        .map_or(0.0, |at| at.elapsed().as_secs_f64()),
                                }),
                            last_error: state.and_then(|s| s.close_reason),
                        }
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Each endpoint's breaker state into its gauge (once a second).
    pub(crate) fn sample_breakers(&self) {
        for r in self.routes.values() {
            for ep in r.endpoints.borrow().iter() {
                let state = match r.balancer.state(ep).breaker_state() {
                    "closed" => 0.0,
                    "half-open" => 1.0,
                    _ => 2.0,
                };
                self.tel
                    .gauge(
                        crate::telemetry::BREAKER_STATE,
                        &[
                            ("service", r.name.clone()),
                            ("endpoint", ep.address.to_string()),
                        ],
                    )
                    .set(state);
            }
        }
    }

    /// Whether every service has at least one endpoint (discovery has delivered).
    pub(crate) fn has_endpoints(&self) -> bool {
        self.routes
            .values()
            .all(|r| !r.endpoints.borrow().is_empty())
    }

    /// The response cache of a service, if it has one.
    pub(crate) fn cache(&self, service: &str) -> Option<Arc<Cache>> {
        self.routes
            .get(&service.to_ascii_lowercase())
            .and_then(|r| r.cache.clone())
    }

    /// Cache sizes per service, for the gauges.
    pub(crate) fn cache_sizes(&self) -> Vec<(String, u64)> {
        self.routes
            .values()
            .filter_map(|r| {
                r.cache
                    .as_ref()
                    .map(|c| (r.name.clone(), c.weighted_size()))
            })
            .collect()
    }
}

/// A service as `/endpoints` shows it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct ServiceView {
    name: String,
    transport: TransportKind,
    cache: bool,
    endpoints: Vec<EndpointView>,
}

/// An endpoint as `/endpoints` shows it: health is the state of our connection to it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct EndpointView {
    address: SocketAddr,
    identity: String,
    weight: u32,
    priority: u16,
    /// `closed` (healthy), `open` (ejected) or `half-open` (next request is a probe).
    breaker: &'static str,
    latency_ewma_ms: f64,
    outstanding: usize,
    transport: Transport,
    connected: bool,
    rtt_ms: Option<f64>,
    /// QUIC: the largest UDP payload the live connection sends, as its MTU discovery found
    /// it (64 KiB less headers between sidecars on one host, up to the route's MTU elsewhere).
    datagram_bytes: Option<u16>,
    in_flight: usize,
    /// QUIC: the initial RTT of the next handshake with the endpoint (the RTT its last
    /// connection measured; a lost handshake packet is sent again after three of these).
    handshake_rtt_ms: Option<f64>,
    /// QUIC under BBR: what the next connection's congestion controller starts from, the
    /// bandwidth estimate and minimum RTT a closed connection measured (at most ten minutes
    /// old); `null` when there is none.
    path_model: Option<PathModelView>,
    last_error: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct PathModelView {
    bandwidth_mbit_s: f64,
    min_rtt_ms: f64,
    age_s: f64,
}

/// Accepts app connections until `shutdown`, then lets in-flight exchanges finish.
pub(crate) async fn serve(
    listener: Listener,
    state: Arc<Outbound>,
    cfg: OutboundConfig,
    shutdown: CancellationToken,
) {
    let settings = app_conn::Settings {
        max_header_bytes: cfg.max_header_bytes,
        header_read_timeout: cfg.header_read_timeout,
        response_stall_timeout: cfg.response_stall_timeout,
        keep_alive: cfg.header_read_timeout.as_secs().saturating_sub(1).max(1),
    };
    let connections = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let tracker = TaskTracker::new();
    while let Some((stream, remote)) = listener.accept(&shutdown).await {
        let Ok(open) = connections.clone().try_acquire_owned() else {
            tokio::spawn(refuse(stream, cfg.max_connections));
            continue;
        };
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tracker.spawn(async move {
            app_conn::serve(stream, remote, state, settings, shutdown).await;
            drop(open);
        });
    }
    drop(listener);
    // Idle connections close at once; busy ones after the response in progress.
    tracker.close();
    tracker.wait().await;
}

/// A clean refusal for a connection over `outbound.max_connections`: `503 overloaded` with
/// the reason, then close (rather than a reset, or a backlog that never drains).
async fn refuse(mut stream: tokio::net::TcpStream, max: usize) {
    use tokio::io::AsyncWriteExt;
    let body = format!(
        "quicar: overloaded: this sidecar already has {max} app connections (outbound.max_connections)\n"
    );
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\nquicar-error: overloaded\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        let _ = stream.write_all(head.as_bytes()).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// A response on its way to the app: counted, and holding the request's record until it ends
/// (not boxed again: the app connection writes it as it is).
type AppResponseBody = Counted<ProxyBody, RequestGuard>;

/// Telemetry around `forward`: trace context in, the route looked up once, the sidecar's facts
/// written as headers on the way out (the edge), one record when the response ends.
async fn handle(
    mut req: Request<app_conn::RequestBody>,
    state: Arc<Outbound>,
    interim: Option<Interim>,
) -> Response<AppResponseBody> {
    let mut guard = state.tel.request(Direction::Outbound);
    let traceparent = ensure_traceparent(req.headers_mut());
    let logs = guard.logs();
    if logs {
        let f = &mut guard.facts;
        f.traceparent = Some(traceparent.clone());
        f.method = Some(req.method().clone());
        f.path = req.uri().path_and_query().cloned();
    }
    let target = target(&mut req);
    let route = target
        .as_ref()
        .ok()
        .and_then(|a| service_of_authority(a))
        .and_then(|n| state.routes.get(n.as_ref()));
    if let Some(route) = route {
        guard.service(&route.tel);
    }
    if let (true, Ok(authority)) = (logs, &target) {
        guard.facts.authority = authority.clone();
    }
    let req = req.map(|b| Counted::new(b, guard.bytes_in()));
    let (resp, upstream) = match forward(req, target, route, &state, interim).await {
        Ok(answered) => answered,
        Err(e) => {
            tracing::debug!(kind = e.kind.as_str(), side = ?e.side, error = %e.message, "request failed in the sidecar");
            (e.into_response(), None)
        }
    };
    let (mut parts, body) = resp.into_parts();
    let f = &mut guard.facts;
    f.status = parts.status.as_u16();
    f.error_kind = parts.extensions.get::<ErrorKind>().copied();
    f.cache = parts.extensions.get::<CacheOutcome>().copied();
    if let Some(up) = upstream {
        f.endpoint = Some(up.endpoint);
        f.attempts = up.attempts;
        f.transport = Some(up.transport);
    }
    let transport = upstream
        .map(|up| up.transport)
        .filter(|_| state.transport_header);
    write_facts(&mut parts, transport);
    let bytes_out = guard.bytes_out();
    Response::from_parts(parts, Counted::new(body, bytes_out).hold(guard))
}

/// Where the app wants to go: the absolute URI's authority (forward-proxy form) or Host. The
/// Host field is taken out of the request (the authority goes on as `:authority`): one lookup
/// finds, checks and removes it.
fn target<B>(req: &mut Request<B>) -> Result<String, ProxyError> {
    let bad = |m: &str| ProxyError::new(ErrorKind::BadRequest, Side::Downstream, m);
    if req.method() == Method::CONNECT {
        return Err(bad(
            "CONNECT tunnels are not supported; send plain HTTP requests",
        ));
    }
    if let Some(authority) = req.uri().authority() {
        if req.uri().scheme() != Some(&http::uri::Scheme::HTTP) {
            return Err(bad(
                "absolute-form targets must be http:// (TLS is the sidecar's job)",
            ));
        }
        let authority = authority.as_str().to_string();
        crate::headers::remove_if_present(req.headers_mut(), &http::header::HOST);
        return Ok(authority);
    }
    let http::header::Entry::Occupied(hosts) = req.headers_mut().entry(http::header::HOST) else {
        return Err(bad("missing Host header"));
    };
    let mut values = hosts.iter();
    let host = values.next().expect("an occupied entry has a value");
    if values.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    let host = host
        .to_str()
        .map(str::to_string)
        .map_err(|_| bad("Host header is not visible ASCII"));
    hosts.remove();
    host
}

/// header limit → target → route → cache → attempts; the response streams back as it arrives.
/// `target` and `route` were resolved once by `handle`.
async fn forward(
    req: Request<AppBody>,
    target: Result<String, ProxyError>,
    route: Option<&Arc<Route>>,
    state: &Outbound,
    interim: Option<Interim>,
) -> Result<(Response<ProxyBody>, Option<Upstream>), ProxyError> {
    // hyper's read buffer does not bound a header section reliably; the limit is ours to keep.
    // Counted as HTTP/3 counts a field section (name + value + 32 per field, RFC 9114 §4.2.2),
    // so what passes here is not refused by the peer's HTTP/3 limit later, less clearly.
    // The authority (out of the fields: `target` took Host) counts as `:authority`.
    let authority_bytes = target
        .as_ref()
        .map_or(0, |a| ":authority".len() + a.len() + 32);
    let head_bytes: usize = authority_bytes
        + req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum::<usize>();
    if head_bytes > state.max_header_bytes {
        return Err(ProxyError::new(
            ErrorKind::HeadersTooLarge,
            Side::Downstream,
            format!(
                "the request header section is {head_bytes} bytes, over {} (outbound.max_header_bytes)",
                state.max_header_bytes
            ),
        ));
    }
    let authority = target?;
    // `route` was looked up by the authority's service name (`handle`): the name is parsed
    // again only to say why there is none.
    let Some(route) = route else {
        let name = service_of_authority(&authority).ok_or_else(|| {
            ProxyError::new(
                ErrorKind::BadRequest,
                Side::Downstream,
                format!("`{authority}` is not a service name"),
            )
        })?;
        return Err(ProxyError::new(
            ErrorKind::UnknownService,
            Side::Downstream,
            format!("no service `{name}` is configured on this sidecar"),
        ));
    };
    let (mut parts, body) = req.into_parts();
    // A sized body over the limit is refused before anything is sent. (The length is looked
    // up only for a service with a limit.)
    if let Some(limit) = route.max_request_body {
        if let Some(len) = content_length(&parts.headers).filter(|&len| len > limit) {
            return Err(ProxyError::new(
                ErrorKind::BodyTooLarge,
                Side::Downstream,
                format!(
                    "the request body is {len} bytes, over {limit} for service `{}` (max_request_body)",
                    route.name
                ),
            ));
        }
    }
    strip_hop_by_hop(&mut parts.headers);
    strip_quicar(&mut parts.headers);
    // 100-continue was answered on this hop (hyper sends it when the body is first read).
    crate::headers::remove_if_present(&mut parts.headers, &http::header::EXPECT);
    // The request's own path (parsed once by hyper) under the service's authority.
    let bad_target = |e: &dyn std::fmt::Display| {
        ProxyError::new(
            ErrorKind::BadRequest,
            Side::Downstream,
            format!("bad target: {e}"),
        )
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(http::uri::Scheme::HTTPS);
    uri.authority = Some(
        http::uri::Authority::from_maybe_shared(bytes::Bytes::from(authority))
            .map_err(|e| bad_target(&e))?,
    );
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(uri).map_err(|e| bad_target(&e))?;
    let mut head = parts;

    if let Some(cache) = &route.cache {
        let has_body = !http_body::Body::is_end_stream(&body);
        let key = Cache::key(&route.name, path_of(&head.uri));
        if Cache::applies(&head, has_body) {
            // The cache's fetch takes only the head: the interim sink rides in its extensions
            // (taken out again in `fetch_for`).
            if let Some(interim) = interim {
                head.extensions.insert(interim);
            }
            let resp = caching::serve(cache, key, route.timeout, head, state.fetch_for(route));
            // Through the cache step a fetched response's facts ride in its extensions.
            return resp.await.map(|r| {
                let upstream = r.extensions().get::<Upstream>().copied();
                (r, upstream)
            });
        }
        if !head.method.is_safe() {
            // RFC 9111 §4.4: a successful unsafe request invalidates what we hold for the URI.
            let resp = attempts::fetch(
                route,
                &state.clients,
                &state.tel,
                Request::from_parts(head, ()),
                Some(body),
                interim.as_ref(),
                route.timeout,
            )
            .await;
            if let Ok((r, _)) = &resp {
                if r.status().is_success() || r.status().is_redirection() {
                    cache.invalidate(&key);
                    // …and for the URIs in Location and Content-Location, when they are of
                    // the same service (a path, or an absolute URI naming it).
                    for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
                        if let Some(path) = r
                            .headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| same_service_path(v, &route.name))
                        {
                            cache.invalidate(&Cache::key(&route.name, &path));
                        }
                    }
                }
            }
            return resp.map(|(r, up)| (r, Some(up)));
        }
    }
    attempts::fetch(
        route,
        &state.clients,
        &state.tel,
        Request::from_parts(head, ()),
        Some(body),
        interim.as_ref(),
        route.timeout,
    )
    .await
    .map(|(r, up)| (r, Some(up)))
}

/// The path and query of a `Location`-style reference when it points into `service`.
fn same_service_path(reference: &str, service: &str) -> Option<String> {
    let uri: Uri = reference.parse().ok()?;
    match uri.authority() {
        None if reference.starts_with('/') => Some(path_of(&uri).to_string()),
        Some(a)
            if service_of_authority(a.as_str()).as_deref()
                == Some(&service.to_ascii_lowercase()) =>
        {
            Some(path_of(&uri).to_string())
        }
        _ => None,
    }
}

fn path_of(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

#[cfg(test)]
mod future_sizes {
    /// The size of the future an async fn returns, without calling it.
    fn of3<A, B, C, F>(_: impl FnOnce(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    fn of5<A, B, C, D, E, F>(_: impl FnOnce(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A request's future is moved whole several times (into the app connection's
    /// future, into each enclosing future when it starts), so its size is paid in copies
    /// on every request: 15.6 KB before the exchange was boxed and the deadline took its work
    /// pinned (BENCHMARKS.md, "Later in round 2"). The bounds leave room for compiler changes.
    #[test]
    fn request_futures_stay_small() {
        let outbound = of3(super::handle);
        let inbound = of5(crate::inbound::Inbound::handle);
        eprintln!("outbound request future {outbound} bytes, inbound {inbound} bytes");
        assert!(
            outbound <= 8 * 1024,
            "outbound request future is {outbound} bytes"
        );
        assert!(
            inbound <= 4 * 1024,
            "inbound request future is {inbound} bytes"
        );
    }
}
