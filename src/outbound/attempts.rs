//! One request to a service: the concurrency limit, then attempts under one deadline (the
//! service's `timeout`). Each attempt lets the balancer pick an endpoint (another one than last
//! time when there is one), sends through `Clients`, feeds the outcome to the endpoint's
//! breaker and latency, and retries when the failure is safe, attempts and budget are left,
//! and the body can be sent again.

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::route::Route;
use crate::balance::{random, Pick};
use crate::body::{held, BodyError, Counted, ProxyBody};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::facts::Upstream;
use crate::headers::DEADLINE;
use crate::resilience::{backoff, is_retryable, Failure};
use crate::telemetry::{self, Telemetry};
use crate::transport::wire::Upload;
use crate::transport::Clients;

/// The app's request body, with its bytes counted for telemetry.
pub(crate) type AppBody = Counted<Incoming>;

/// The concurrency permit, then attempts (with retries) under the service's deadline.
pub(crate) async fn fetch(
    route: &Route,
    clients: &Clients,
    tel: &Telemetry,
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
    let work = attempts(route, clients, tel, head, body, deadline, permit);
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

    fn for_attempt(&mut self) -> Upload {
        match self {
            Self::Empty => Upload::Empty,
            Self::Buffered(b, t) => Upload::Bytes(b.clone(), t.clone()),
            Self::Stream(s) => s.take().map_or(Upload::Empty, Upload::Stream),
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

/// Attempts until one succeeds or no retry is allowed.
async fn attempts(
    route: &Route,
    clients: &Clients,
    tel: &Telemetry,
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
        let (result, transport) = clients
            .send(
                route.transport,
                &ep,
                head,
                body.for_attempt(),
                route.connect_timeout,
            )
            .await;
        let failure = match &result {
            Ok(resp) if crate::cache::is_error_status(resp.status()) => {
                Some(Failure::Status(resp.status().as_u16()))
            }
            Ok(_) => None,
            Err(e) if e.error.never_sent => Some(Failure::NeverSent),
            Err(e) => Some(Failure::Error(e.error.kind)),
        };
        // Failures count as slow as they were (a connect timeout is very slow), so the
        // balancer steers away even before the breaker opens.
        st.observe(started.elapsed());
        if st.outcome(failure.is_none(), &route.breaker) {
            tracing::warn!(service = %route.name, endpoint = %ep.address, "endpoint ejected after consecutive failures");
            tel.counter(telemetry::EJECTIONS, &[("service", route.name.clone())])
                .increment(1);
        }
        let result = result.map_err(|e| {
            if let Some(b) = e.unsent {
                body.restore(b);
            }
            e.error
        });
        if let Some(f) = failure {
            let allowed = attempt < route.retry.attempts
                && body.available()
                && is_retryable(&method, f, &route.retry.statuses, body.available());
            if allowed {
                if route.budget.try_retry() {
                    tel.counter(
                        telemetry::RETRIES,
                        &[
                            ("service", route.name.clone()),
                            ("reason", f.reason().into()),
                        ],
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
                tel.counter(
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
            // The endpoint's outstanding count and the service's concurrency permit are held
            // until the response body ends.
            Response::from_parts(parts, held(b, (outstanding, permit)))
        });
    }
}
