//! The app-facing listener: HTTP/1.1 from the local app, routed by Host or absolute URI to a
//! remote service, and forwarded as one HTTP/3 request stream on the pooled connection to a
//! peer sidecar. `forward` is the whole request path, in order; `caching` is the cache step.

mod caching;
mod parse_errors;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// The app's request body, with its bytes counted for telemetry.
type AppBody = Counted<Incoming>;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::balance::{random, Balancer, Pick};
use crate::body::{content_length, empty, held, BodyError, Counted, H3Body, ProxyBody};
use crate::cache::{Cache, Clock};
use crate::config::{BreakerConfig, RetryConfig, TransportKind};
use crate::config::{Config, Outbound as OutboundConfig};
use crate::discovery::{Endpoint, Endpoints, Source};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::headers::{service_of_authority, strip_hop_by_hop, strip_quicar, QUICAR_ERROR};
use crate::headers::{DEADLINE, TRANSPORT};
use crate::resilience::{backoff, is_retryable, Failure, RetryBudget};
use crate::telemetry::{self, Direction, Telemetry, Upstream};
use crate::transport::quic::{PeerConn, QuicPool, CLOSE_IDENTITY};
use crate::transport::tcp::TcpPool;
use std::sync::Mutex;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

/// A remote service as the data path sees it.
struct Route {
    name: String,
    cache: Option<Arc<Cache>>,
    timeout: Duration,
    connect_timeout: Duration,
    /// The current endpoint set, from the service's discovery source.
    endpoints: watch::Receiver<Endpoints>,
    balancer: Balancer,
    retry: RetryConfig,
    budget: RetryBudget,
    breaker: BreakerConfig,
    limit: Arc<Semaphore>,
    max_concurrent: usize,
    transport: TransportKind,
}

/// Everything the outbound request path needs, shared by all connections.
pub struct Outbound {
    routes: HashMap<String, Route>,
    pool: Arc<QuicPool>,
    tcp: Arc<TcpPool>,
    auto: Arc<AutoFallback>,
    /// First wait before an `auto` endpoint on TCP tries QUIC again (doubles up to 60 s).
    quic_retry: Duration,
    transport_header: bool,
    max_header_bytes: usize,
    shutdown: CancellationToken,
    tel: Arc<Telemetry>,
}

impl Outbound {
    /// Builds the routes and starts each service's discovery source.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        pool: Arc<QuicPool>,
        tcp: Arc<TcpPool>,
        clock: Arc<Clock>,
        tel: Arc<Telemetry>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let routes = config
            .service
            .iter()
            .map(|svc| {
                let endpoints = Source::from_config(config, svc).start(tracker, shutdown.clone());
                let cache = svc.cache.as_ref().map(|c| {
                    Arc::new(Cache::new(
                        c.max_bytes.0,
                        usize::try_from(c.max_entry_bytes.0).unwrap_or(usize::MAX),
                        clock.clone(),
                    ))
                });
                let route = Route {
                    name: svc.name.clone(),
                    cache,
                    timeout: svc.timeout,
                    connect_timeout: svc.connect_timeout,
                    endpoints,
                    balancer: Balancer::default(),
                    budget: RetryBudget::new(&svc.retry),
                    retry: svc.retry.clone(),
                    breaker: svc.breaker.clone(),
                    limit: Arc::new(Semaphore::new(svc.max_concurrent)),
                    transport: svc.transport,
                    max_concurrent: svc.max_concurrent,
                };
                (svc.name.to_ascii_lowercase(), route)
            })
            .collect();
        Self {
            routes,
            pool,
            tcp,
            auto: Arc::default(),
            quic_retry: config.quic.fallback_retry,
            transport_header: config.outbound.transport_header,
            max_header_bytes: config.outbound.max_header_bytes,
            shutdown,
            tel,
        }
    }

    /// Services, their endpoints and each endpoint's connection state, for `/endpoints`.
    pub fn endpoints(&self, pool: &QuicPool) -> Vec<ServiceView> {
        let mut out: Vec<ServiceView> = self
            .routes
            .values()
            .map(|r| ServiceView {
                name: r.name.clone(),
                transport: match r.transport {
                    TransportKind::Quic => "quic",
                    TransportKind::Tcp => "tcp",
                    TransportKind::Auto => "auto",
                },
                cache: r.cache.is_some(),
                endpoints: r
                    .endpoints
                    .borrow()
                    .iter()
                    .map(|ep| {
                        let (addr, id) = (&ep.address, &ep.identity);
                        let transport = match r.transport {
                            TransportKind::Tcp => "tcp",
                            TransportKind::Auto if self.auto.prefers_tcp(ep) => "tcp",
                            _ => "quic",
                        };
                        let state = pool.peek(*addr, id);
                        let tcp_state = self.tcp.peek(*addr, id);
                        let lb = r.balancer.state(ep);
                        EndpointView {
                            address: *addr,
                            identity: id.to_string(),
                            weight: ep.weight,
                            priority: ep.priority,
                            breaker: lb.breaker_state(),
                            latency_ewma_ms: lb.ewma().as_secs_f64() * 1000.0,
                            outstanding: lb.outstanding(),
                            transport,
                            connected: if transport == "tcp" {
                                tcp_state.is_some_and(|(alive, _)| alive)
                            } else {
                                state.as_ref().is_some_and(|s| s.alive)
                            },
                            rtt_ms: state
                                .as_ref()
                                .filter(|s| s.alive)
                                .map(|s| s.rtt.as_secs_f64() * 1000.0),
                            in_flight: state.as_ref().map_or(0, |s| s.in_flight),
                            last_error: state.and_then(|s| s.close_reason),
                        }
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The response cache of a service, if it has one.
    pub fn cache(&self, service: &str) -> Option<Arc<Cache>> {
        self.routes
            .get(&service.to_ascii_lowercase())
            .and_then(|r| r.cache.clone())
    }

    /// Cache sizes per service, for the gauges.
    pub fn cache_sizes(&self) -> Vec<(String, u64)> {
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
pub struct ServiceView {
    pub name: String,
    pub transport: &'static str,
    pub cache: bool,
    pub endpoints: Vec<EndpointView>,
}

/// An endpoint as `/endpoints` shows it: health is the state of our connection to it.
#[derive(Debug, serde::Serialize)]
pub struct EndpointView {
    pub address: SocketAddr,
    pub identity: String,
    pub weight: u32,
    pub priority: u16,
    /// `closed` (healthy), `open` (ejected) or `half-open` (next request is a probe).
    pub breaker: &'static str,
    pub latency_ewma_ms: f64,
    pub outstanding: usize,
    pub transport: &'static str,
    pub connected: bool,
    pub rtt_ms: Option<f64>,
    pub in_flight: usize,
    pub last_error: Option<String>,
}

/// Accepts app connections until `shutdown`, then lets in-flight exchanges finish.
pub async fn serve(
    listener: TcpListener,
    state: Arc<Outbound>,
    cfg: OutboundConfig,
    shutdown: CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(true)
        .max_buf_size(cfg.max_header_bytes)
        .header_read_timeout(cfg.header_read_timeout);
    loop {
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        // Responses our service produced on this connection, so that hyper's own answers to
        // unparseable requests can be told apart and given a `quicar-error` (parse_errors).
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = served.clone();
        let svc = hyper::service::service_fn(move |req| {
            let (state, counter) = (state.clone(), counter.clone());
            async move {
                let resp = handle(req, state).await;
                counter.fetch_add(1, std::sync::atomic::Ordering::Release);
                Ok::<_, Infallible>(resp)
            }
        });
        let io = parse_errors::ParseErrors::new(stream, served, cfg.max_header_bytes);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(io), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "app connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Telemetry around `forward`: trace context in, one record out when the response ends.
async fn handle(mut req: Request<Incoming>, state: Arc<Outbound>) -> Response<ProxyBody> {
    let mut guard = state.tel.request(Direction::Outbound);
    let trace = ensure_traceparent(req.headers_mut());
    guard.facts.trace_id = Some(trace);
    guard.facts.method = req.method().to_string();
    guard.facts.path = req.uri().path().to_string();
    if let Ok(authority) = target(&req) {
        if let Some(route) = service_of_authority(&authority).and_then(|n| state.routes.get(&n)) {
            guard.service(&route.name);
        }
        guard.facts.authority = authority;
    }
    let req = req.map(|b| Counted::new(b, guard.bytes_in()));
    let resp = match forward(req, &state).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(kind = e.kind.as_str(), side = ?e.side, error = %e.message, "request failed in the sidecar");
            e.into_response()
        }
    };
    let f = &mut guard.facts;
    f.status = resp.status().as_u16();
    f.error_kind = header_text(resp.headers(), QUICAR_ERROR);
    f.cache = header_text(resp.headers(), crate::cache::CACHE_HEADER);
    if let Some(up) = resp.extensions().get::<Upstream>() {
        f.endpoint = Some(up.endpoint);
        f.attempts = up.attempts;
        f.transport = up.transport;
    }
    let bytes_out = guard.bytes_out();
    resp.map(|b| Counted::new(b, bytes_out).hold(guard).boxed_unsync())
}

fn header_text(headers: &http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Keeps a valid W3C `traceparent` (and its `tracestate`) or starts a trace, so the logs of
/// both sidecars join on the trace id. Returns the trace id.
fn ensure_traceparent(headers: &mut http::HeaderMap) -> String {
    let valid = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(telemetry::trace_id)
        .map(str::to_string);
    if let Some(id) = valid {
        return id;
    }
    // An invalid traceparent restarts the trace; tracestate without it means nothing.
    headers.remove("tracestate");
    let tp = telemetry::new_traceparent();
    let id = telemetry::trace_id(&tp)
        .expect("we made it valid")
        .to_string();
    headers.insert(
        "traceparent",
        http::HeaderValue::from_str(&tp).expect("hex"),
    );
    id
}

/// Where the app wants to go: the absolute URI's authority (forward-proxy form) or Host.
fn target<B>(req: &Request<B>) -> Result<String, ProxyError> {
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
        return Ok(authority.as_str().to_string());
    }
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next().ok_or_else(|| bad("missing Host header"))?;
    if hosts.next().is_some() {
        return Err(bad("more than one Host header"));
    }
    host.to_str()
        .map(str::to_string)
        .map_err(|_| bad("Host header is not visible ASCII"))
}

/// route → endpoint → connection → stream; the response streams back as it arrives.
async fn forward(
    req: Request<AppBody>,
    state: &Arc<Outbound>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // hyper's read buffer does not bound a header section reliably; the limit is ours to keep.
    // Counted as HTTP/3 counts a field section (name + value + 32 per field, RFC 9114 §4.2.2),
    // so what passes here is not refused by the peer's HTTP/3 limit later, less clearly.
    let head_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
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
    let authority = target(&req)?;
    let name = service_of_authority(&authority).ok_or_else(|| {
        ProxyError::new(
            ErrorKind::BadRequest,
            Side::Downstream,
            format!("`{authority}` is not a service name"),
        )
    })?;
    let route = state.routes.get(&name).ok_or_else(|| {
        ProxyError::new(
            ErrorKind::UnknownService,
            Side::Downstream,
            format!("no service `{name}` is configured on this sidecar"),
        )
    })?;
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_quicar(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    // 100-continue was answered on this hop (hyper sends it when the body is first read).
    parts.headers.remove(http::header::EXPECT);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let uri = Uri::builder()
        .scheme("https")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
        .map_err(|e| {
            ProxyError::new(
                ErrorKind::BadRequest,
                Side::Downstream,
                format!("bad target: {e}"),
            )
        })?;
    parts.uri = uri;
    let (head, ()) = Request::from_parts(parts, ()).into_parts();

    if let Some(cache) = &route.cache {
        let has_body = !http_body::Body::is_end_stream(&body);
        if Cache::applies(&head, has_body) {
            return caching::serve(state, route, cache, head).await;
        }
        if !head.method.is_safe() {
            // RFC 9111 §4.4: a successful unsafe request invalidates what we hold for the URI.
            let key = Cache::key(&route.name, path_of(&head.uri));
            let resp = fetch(route, state, Request::from_parts(head, ()), Some(body)).await;
            if resp
                .as_ref()
                .is_ok_and(|r| r.status().is_success() || r.status().is_redirection())
            {
                cache.invalidate(&key);
            }
            return resp;
        }
    }
    fetch(route, state, Request::from_parts(head, ()), Some(body)).await
}

fn path_of(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

/// One request to the service: concurrency limit, then attempts (with retries) under one
/// deadline, the service's `timeout`.
async fn fetch(
    route: &Route,
    state: &Outbound,
    head: Request<()>,
    body: Option<AppBody>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Ok(permit) = route.limit.clone().try_acquire_owned() else {
        return Err(ProxyError::new(
            ErrorKind::Overloaded,
            Side::Downstream,
            format!(
                "service `{}` already has {} requests in flight (max_concurrent)",
                route.name, route.max_concurrent
            ),
        ));
    };
    let deadline = tokio::time::Instant::now() + route.timeout;
    let work = attempts(route, state, head, body, deadline, permit);
    match tokio::time::timeout_at(deadline, work).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::new(
            ErrorKind::Timeout,
            Side::Peer,
            format!(
                "no response from service `{}` within {}",
                route.name,
                humantime::format_duration(route.timeout)
            ),
        )),
    }
}

/// The request body as retries see it: kept whole when small enough to send again.
enum ReqBody {
    Empty,
    Buffered(Bytes, Option<http::HeaderMap>),
    /// Streamed as it arrives; `None` once it has been handed to an attempt.
    Stream(Option<ProxyBody>),
}

impl ReqBody {
    async fn prepare(body: Option<AppBody>, max: u64) -> Result<Self, ProxyError> {
        let Some(body) = body else {
            return Ok(Self::Empty);
        };
        if http_body::Body::is_end_stream(&body) {
            return Ok(Self::Empty);
        }
        match http_body::Body::size_hint(&body).exact() {
            Some(n) if n <= max => {
                let collected = body.collect().await.map_err(|e| {
                    ProxyError::new(
                        ErrorKind::BadRequest,
                        Side::Downstream,
                        format!("request body could not be read: {e}"),
                    )
                })?;
                let trailers = collected.trailers().cloned();
                Ok(Self::Buffered(collected.to_bytes(), trailers))
            }
            _ => Ok(Self::Stream(Some(
                body.map_err(|e| -> BodyError { Box::new(e) })
                    .boxed_unsync(),
            ))),
        }
    }

    fn for_attempt(&mut self) -> UploadBody {
        match self {
            Self::Empty => UploadBody::Empty,
            Self::Buffered(b, t) => UploadBody::Bytes(b.clone(), t.clone()),
            Self::Stream(s) => s.take().map_or(UploadBody::Empty, UploadBody::Stream),
        }
    }

    fn restore(&mut self, body: ProxyBody) {
        if let Self::Stream(s) = self {
            *s = Some(body);
        }
    }

    /// Whether another attempt could send the whole body.
    fn available(&self) -> bool {
        !matches!(self, Self::Stream(None))
    }
}

/// What one attempt uploads.
enum UploadBody {
    Empty,
    Bytes(Bytes, Option<http::HeaderMap>),
    Stream(ProxyBody),
}

impl UploadBody {
    /// The streaming body, when an attempt failed before reading any of it.
    fn unread(self) -> Option<ProxyBody> {
        match self {
            Self::Stream(b) => Some(b),
            _ => None,
        }
    }

    /// As an HTTP/2 request body.
    fn into_proxy_body(self) -> ProxyBody {
        match self {
            Self::Empty => empty(),
            Self::Bytes(b, None) => crate::body::full(b),
            Self::Bytes(b, Some(t)) => {
                let frames: Vec<Result<http_body::Frame<Bytes>, BodyError>> = vec![
                    Ok(http_body::Frame::data(b)),
                    Ok(http_body::Frame::trailers(t)),
                ];
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
            }
            Self::Stream(b) => b,
        }
    }
}

/// Attempts until one succeeds or no retry is allowed: the balancer picks an endpoint (another
/// one than last time when there is one), the outcome feeds its breaker and latency, and a
/// retry needs a safe failure, attempts left, a body to send again, and budget.
async fn attempts(
    route: &Route,
    state: &Outbound,
    head: Request<()>,
    body: Option<AppBody>,
    deadline: tokio::time::Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<Response<ProxyBody>, ProxyError> {
    route.budget.request();
    let method = head.method().clone();
    let mut body = ReqBody::prepare(body, route.retry.max_body.0).await?;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let eps = route.endpoints.borrow().clone();
        let (ep, st) = match route.balancer.pick(&eps, &tried) {
            Pick::Chosen(ep, st) => (ep, st),
            Pick::None => {
                return Err(ProxyError::new(
                    ErrorKind::NoEndpoints,
                    Side::Peer,
                    format!("service `{}` has no endpoints", route.name),
                ))
            }
            Pick::AllOpen => {
                return Err(ProxyError::new(
                    ErrorKind::CircuitOpen,
                    Side::Peer,
                    format!(
                        "every endpoint of service `{}` is ejected after failures",
                        route.name
                    ),
                ))
            }
        };
        tried.push(ep.address);
        let outstanding = st.start();
        let started = Instant::now();
        let mut head = head.clone();
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        head.headers_mut()
            .insert(DEADLINE, http::HeaderValue::from(left.as_millis() as u64));
        let (result, transport) = send_via(route, state, head, &ep, &mut body).await;
        let failure = match &result {
            Ok(resp) if crate::cache::is_error_status(resp.status()) => {
                Some(Failure::Status(resp.status().as_u16()))
            }
            Ok(_) => None,
            Err((e, _)) if e.never_sent => Some(Failure::NeverSent),
            Err((e, _)) => Some(Failure::Error(e.kind)),
        };
        // Failures count as slow as they were (a connect timeout is very slow), so the
        // balancer steers away even before the breaker opens.
        st.observe(started.elapsed());
        if st.outcome(failure.is_none(), &route.breaker) {
            tracing::warn!(service = %route.name, endpoint = %ep.address, "endpoint ejected after consecutive failures");
            state
                .tel
                .counter(telemetry::EJECTIONS, &[("service", route.name.clone())])
                .increment(1);
        }
        let result = match result {
            Err((e, returned)) => {
                if let Some(b) = returned {
                    body.restore(b);
                }
                Err(e)
            }
            Ok(r) => Ok(r),
        };
        if let Some(f) = failure {
            let allowed = attempt < route.retry.attempts
                && body.available()
                && is_retryable(&method, f, &route.retry.statuses, body.available());
            if allowed {
                if route.budget.try_retry() {
                    let reason = match f {
                        Failure::NeverSent => "never-sent",
                        Failure::Error(_) => "error",
                        Failure::Status(_) => "status",
                    };
                    state
                        .tel
                        .counter(
                            telemetry::RETRIES,
                            &[("service", route.name.clone()), ("reason", reason.into())],
                        )
                        .increment(1);
                    let pause = backoff(
                        attempt,
                        route.retry.backoff,
                        route.retry.max_backoff,
                        random(),
                    );
                    tracing::debug!(service = %route.name, endpoint = %ep.address, ?f, ?pause, "retrying");
                    drop(result);
                    tokio::time::sleep(pause).await;
                    continue;
                }
                state
                    .tel
                    .counter(
                        telemetry::BUDGET_EXHAUSTED,
                        &[("service", route.name.clone())],
                    )
                    .increment(1);
            }
        }
        return result.map(|resp| {
            let (mut parts, b) = resp.into_parts();
            parts.extensions.insert(Upstream {
                endpoint: ep.address,
                attempts: attempt,
                transport,
            });
            if state.transport_header {
                parts
                    .headers
                    .insert(TRANSPORT, http::HeaderValue::from_static(transport));
            }
            // The endpoint's outstanding count and the service's concurrency permit are held
            // until the response body ends.
            Response::from_parts(parts, held(b, (outstanding, permit)))
        });
    }
}

/// One attempt over the service's transport; `auto` tries QUIC and falls back to TCP for this
/// endpoint when the QUIC handshake fails or times out (the request was not sent, so the same
/// attempt continues over TCP).
async fn send_via(
    route: &Route,
    state: &Outbound,
    head: Request<()>,
    ep: &Endpoint,
    body: &mut ReqBody,
) -> (
    Result<Response<ProxyBody>, (ProxyError, Option<ProxyBody>)>,
    &'static str,
) {
    match route.transport {
        TransportKind::Quic => (
            exchange(route, state, head, ep, body.for_attempt()).await,
            "quic",
        ),
        TransportKind::Tcp => (
            exchange_tcp(route, state, head, ep, body.for_attempt()).await,
            "tcp",
        ),
        TransportKind::Auto => {
            if state.auto.prefers_tcp(ep) {
                return (
                    exchange_tcp(route, state, head, ep, body.for_attempt()).await,
                    "tcp",
                );
            }
            match exchange(route, state, head.clone(), ep, body.for_attempt()).await {
                Err((e, returned)) if e.kind == ErrorKind::ConnectFailed && e.never_sent => {
                    tracing::info!(endpoint = %ep.address, reason = %e.message, "QUIC unreachable; falling back to TCP");
                    state.auto.fall_back(ep, state, route.connect_timeout);
                    if let Some(b) = returned {
                        body.restore(b);
                    }
                    (
                        exchange_tcp(route, state, head, ep, body.for_attempt()).await,
                        "tcp",
                    )
                }
                r => (r, "quic"),
            }
        }
    }
}

/// One attempt on one endpoint over HTTP/2. On failure before sending, the body comes back.
async fn exchange_tcp(
    route: &Route,
    state: &Outbound,
    head: Request<()>,
    ep: &Endpoint,
    body: UploadBody,
) -> Result<Response<ProxyBody>, (ProxyError, Option<ProxyBody>)> {
    let method = head.method().clone();
    let addr = ep.address;
    let conn = match state
        .tcp
        .get(addr, &ep.identity, route.connect_timeout)
        .await
    {
        Ok(c) => c,
        Err(e) => return Err((e, body.unread())),
    };
    let in_flight = conn.in_flight();
    let mut send = conn.send.clone();
    let refused = |conn: &crate::transport::tcp::H2Conn| {
        let conn = conn.clone();
        async move {
            conn.ended()
                .await
                .filter(|r| crate::transport::tcp::is_refusal(r))
                .map(|r| {
                    ProxyError::new(
                        ErrorKind::ConnectFailed,
                        Side::Peer,
                        format!("peer {addr} refused the handshake: {r}"),
                    )
                    .never_sent()
                })
        }
    };
    if send.ready().await.is_err() {
        state.tcp.evict(addr, &ep.identity).await;
        let kind = if conn.never_answered() {
            ErrorKind::ConnectFailed
        } else {
            ErrorKind::PeerReset
        };
        let e = match refused(&conn).await {
            Some(e) => e,
            None => ProxyError::new(
                kind,
                Side::Peer,
                format!("HTTP/2 connection to peer {addr} closed before the request"),
            )
            .never_sent(),
        };
        return Err((e, body.unread()));
    }
    let req = head.map(|()| body.into_proxy_body());
    let resp = match send.try_send_request(req).await {
        Ok(r) => r,
        Err(mut e) => {
            state.tcp.evict(addr, &ep.identity).await;
            let unsent = e.take_message().map(Request::into_body);
            let text = e.error().to_string();
            let err = match refused(&conn).await {
                Some(r) => r,
                None if unsent.is_some() || is_refused_stream(e.error()) => ProxyError::new(
                    ErrorKind::PeerReset,
                    Side::Peer,
                    format!("peer {addr} did not take the request: {text}"),
                )
                .never_sent(),
                // TLS 1.3: a server that refuses our certificate sends an alert and closes;
                // if our request reached it first, the close can come as a reset that discards
                // the alert. On a connection that never answered anything, say so.
                None if conn.never_answered() => ProxyError::new(
                    ErrorKind::ConnectFailed,
                    Side::Peer,
                    format!(
                        "peer {addr} closed a new connection before answering (its TLS handshake may have refused our certificate): {text}"
                    ),
                ),
                None => ProxyError::new(
                    ErrorKind::PeerReset,
                    Side::Peer,
                    format!("peer {addr} reset the request before responding: {text}"),
                ),
            };
            return Err((err, unsent));
        }
    };
    conn.mark_answered();
    let (parts, incoming) = resp.into_parts();
    Ok(for_the_app(parts, &method, move || {
        held(
            incoming
                .map_err(|e| -> BodyError { Box::new(e) })
                .boxed_unsync(),
            in_flight,
        )
    }))
}

/// A peer's response head as the app gets it (hop-by-hop headers gone, HTTP/1.1), with the body
/// `body` makes, or none for HEAD, 204 and 304 (then `body`, and what it holds, is dropped).
fn for_the_app(
    mut parts: http::response::Parts,
    method: &Method,
    body: impl FnOnce() -> ProxyBody,
) -> Response<ProxyBody> {
    strip_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_11;
    let bodyless = *method == Method::HEAD
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    Response::from_parts(parts, if bodyless { empty() } else { body() })
}

/// HTTP/2 REFUSED_STREAM: the server did not process the stream (RFC 9113 §8.7).
fn is_refused_stream(e: &hyper::Error) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string().to_ascii_lowercase();
        if text.contains("refused stream") || text.contains("refused_stream") {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Per-endpoint memory of `auto` services: which endpoints currently go over TCP, with one
/// background task each trying QUIC again after a growing back-off.
#[derive(Default)]
struct AutoFallback {
    on_tcp: Mutex<HashMap<(SocketAddr, crate::identity::PeerId), ()>>,
}

impl AutoFallback {
    fn prefers_tcp(&self, ep: &Endpoint) -> bool {
        self.on_tcp
            .lock()
            .expect("not poisoned")
            .contains_key(&(ep.address, ep.identity.clone()))
    }

    fn fall_back(&self, ep: &Endpoint, state: &Outbound, connect_timeout: Duration) {
        let key = (ep.address, ep.identity.clone());
        if self
            .on_tcp
            .lock()
            .expect("not poisoned")
            .insert(key.clone(), ())
            .is_some()
        {
            return;
        }
        let (pool, auto, shutdown) = (
            state.pool.clone(),
            state.auto.clone(),
            state.shutdown.clone(),
        );
        let (mut wait, max) = (state.quic_retry, Duration::from_secs(60));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if pool.get(key.0, &key.1, connect_timeout).await.is_ok() {
                    tracing::info!(endpoint = %key.0, "QUIC reachable again; leaving TCP");
                    auto.on_tcp.lock().expect("not poisoned").remove(&key);
                    return;
                }
                wait = (wait * 2).min(max);
            }
        });
    }
}

/// One attempt on one endpoint. On failure, a request body that was never read is handed back
/// so a retry can still send it.
async fn exchange(
    route: &Route,
    state: &Outbound,
    head: Request<()>,
    ep: &Endpoint,
    body: UploadBody,
) -> Result<Response<ProxyBody>, (ProxyError, Option<ProxyBody>)> {
    let method = head.method().clone();
    let (addr, identity) = (&ep.address, &ep.identity);
    let unread = UploadBody::unread;
    let mut body = Some(body);
    let mut attempt = 0;
    let (recv, in_flight, upload_guard, resp) = loop {
        attempt += 1;
        let conn = match state.pool.get(*addr, identity, route.connect_timeout).await {
            Ok(c) => c,
            Err(e) => return Err((e, body.take().and_then(unread))),
        };
        let stream = match conn.send.clone().send_request(head.clone()).await {
            Ok(stream) => stream,
            Err(e) => {
                // The connection was going away (GOAWAY, closed): the stream was never opened,
                // so the request never reached the peer's app. Reconnect once and resend.
                state.pool.evict(*addr, identity, &conn).await;
                if let Verdict::Refused(refused) = verdict(&conn, *addr).await {
                    return Err((refused, body.take().and_then(unread)));
                }
                if attempt >= 2 {
                    let e = ProxyError::new(
                        ErrorKind::PeerReset,
                        Side::Peer,
                        format!("peer {addr} refused the request stream: {e}"),
                    )
                    .never_sent();
                    return Err((e, body.take().and_then(unread)));
                }
                tracing::debug!(peer = %addr, error = %e, "connection unusable; reconnecting");
                continue;
            }
        };
        let in_flight = conn.in_flight();
        let (send, mut recv) = stream.split();
        let cancel_upload = CancellationToken::new();
        tokio::spawn(upload(
            send,
            body.take().unwrap_or(UploadBody::Empty),
            cancel_upload.clone(),
        ));
        // Cancels the upload if we give up on this exchange (timeout, reset) before the response.
        let upload_guard = cancel_upload.drop_guard();
        match final_response(&mut recv).await {
            Ok(resp) => break (recv, in_flight, upload_guard, resp),
            Err(e) => {
                state.pool.evict(*addr, identity, &conn).await;
                // RFC 9114 §4.1.1: H3_REQUEST_REJECTED means the server did not process it
                // (e.g. it arrived after GOAWAY), so it may be sent again.
                let rejected = matches!(
                    &e,
                    h3::error::StreamError::RemoteTerminate { code, .. }
                        if *code == h3::error::Code::H3_REQUEST_REJECTED
                );
                if rejected {
                    let e = ProxyError::new(
                        ErrorKind::PeerReset,
                        Side::Peer,
                        format!("peer {addr} rejected the request unprocessed"),
                    )
                    .never_sent();
                    return Err((e, None));
                }
                let err = match verdict(&conn, *addr).await {
                    Verdict::Refused(refused) => refused,
                    // A stateless reset: the peer restarted and has no memory of this
                    // connection, so the request never reached its app.
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
                };
                return Err((err, None));
            }
        }
    };
    upload_guard.disarm();
    let (parts, ()) = resp.into_parts();
    let len = content_length(&parts.headers);
    Ok(for_the_app(parts, &method, move || {
        H3Body::new(recv, len).hold(in_flight).boxed_unsync()
    }))
}

/// The final response head, skipping interim ones (103 Early Hints…): HTTP/1.1 apps rarely
/// want them and hyper cannot send them.
async fn final_response(
    recv: &mut h3::client::RequestStream<h3_quinn::RecvStream, Bytes>,
) -> Result<http::Response<()>, h3::error::StreamError> {
    loop {
        let resp = recv.recv_response().await?;
        if !resp.status().is_informational() || resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(resp);
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
    Verdict::Refused(
        ProxyError::new(
            ErrorKind::ConnectFailed,
            Side::Peer,
            format!("peer {addr} refused the handshake: {reason}"),
        )
        .never_sent(),
    )
}

/// Streams the app's request body onto the HTTP/3 stream; stops when the peer's flow control
/// says so (send_data waits). A body that fails, or a cancelled exchange, resets the stream
/// rather than finishing it, so the far app never mistakes a truncated body for a whole one.
async fn upload(
    mut send: h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>,
    body: UploadBody,
    cancel: CancellationToken,
) {
    let mut body = match body {
        UploadBody::Empty => {
            let _ = send.finish().await;
            return;
        }
        UploadBody::Bytes(data, trailers) => {
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
        UploadBody::Stream(body) => body,
    };
    let reset = |send: &mut h3::client::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>| {
        send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
    };
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
