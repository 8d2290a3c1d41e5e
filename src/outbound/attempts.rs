//! One request to a service: the concurrency limit, then attempts under one deadline (the
//! service's `timeout`). Each attempt lets the balancer pick an endpoint (another one than last
//! time when there is one), sends through `Clients`, feeds the outcome to the endpoint's
//! breaker and latency, and retries when the failure is safe, attempts and budget are left,
//! and the body can be sent again.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;

use super::route::Route;
use crate::balance::Pick;
use crate::body::{
    after_body, held, BodyError, BodyFailure, Counted, Expired, Progress, ProxyBody,
};
use crate::config::BreakerConfig;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::facts::Upstream;
use crate::headers::DEADLINE;
use crate::interim::Interim;
use crate::resilience::{backoff, is_retryable, Failure};
use crate::rng::random;
use crate::telemetry::{self, Telemetry};
use crate::transport::wire::{SendError, Upload};
use crate::transport::Clients;

/// The app's request body, with its bytes counted for telemetry.
pub(crate) type AppBody = Counted<super::app_conn::RequestBody>;

/// The concurrency permit, then attempts (with retries) under the service's deadline, which
/// runs from the end of the request body (a body that stalls for `body_idle_timeout` is cut).
/// `budget` is the deadline's length: the service's `timeout`, or what is left of it for a
/// request that spent some waiting in the cache step for another's fetch.
pub(crate) async fn fetch(
    route: &Route,
    clients: &Clients,
    tel: &Telemetry,
    head: Request<()>,
    body: Option<AppBody>,
    interim: Option<&Interim>,
    budget: Duration,
) -> Result<(Response<ProxyBody>, Upstream), ProxyError> {
    let Some(permit) = route.limit.try_take() else {
        return Err(ProxyError::new(
            ErrorKind::Overloaded,
            Side::Downstream,
            format!(
                "service `{}` already has {} requests in flight (max_concurrent)",
                route.name, route.max_concurrent
            ),
        ));
    };
    let (body, progress) = match body {
        Some(b) if !http_body::Body::is_end_stream(&b) => {
            let progress = Progress::new();
            let b = b.map_err(|e| -> BodyError { Box::new(e) }).boxed_unsync();
            (
                Some(progress.track(b, route.max_request_body)),
                Some(progress),
            )
        }
        // No body to wait for (most requests): the deadline runs from now, untracked.
        _ => (None, None),
    };
    let outgoing = Outgoing {
        head,
        body,
        interim,
    };
    // One reading of the clock for the deadline and the first attempt.
    let began = Instant::now();
    let work = std::pin::pin!(attempts(
        route,
        clients,
        tel,
        outgoing,
        (progress.as_deref(), began, budget),
        permit
    ));
    let done = match &progress {
        Some(p) => after_body(p, budget, route.body_idle_timeout, work).await,
        None => tokio::time::timeout_at((began + budget).into(), work)
            .await
            .map_err(|_| Expired::Timeout),
    };
    match done {
        Ok(r) => r,
        Err(Expired::Timeout) => Err(ProxyError::new(
            ErrorKind::Timeout,
            Side::Peer,
            format!(
                "no response from service `{}` within {}",
                route.name,
                humantime::format_duration(route.timeout)
            ),
        )),
        // Whose stall it is: the app's (its body had nothing to give) or the far side's
        // (nothing asked for more: the far app stopped reading, or no peer took the request).
        Err(Expired::Stalled) if progress.as_ref().is_some_and(|p| p.sender_stalled()) => {
            Err(ProxyError::new(
                ErrorKind::Timeout,
                Side::Downstream,
                format!(
                    "the request body sent nothing for {} (body_idle_timeout)",
                    humantime::format_duration(route.body_idle_timeout)
                ),
            ))
        }
        Err(Expired::Stalled) => Err(ProxyError::new(
            ErrorKind::Timeout,
            Side::Peer,
            format!(
                "service `{}` took none of the request body for {} (body_idle_timeout): its app stopped reading it, or no peer took the request",
                route.name,
                humantime::format_duration(route.body_idle_timeout)
            ),
        )),
    }
}

/// The error for a request body that did not arrive whole: the app's fault, never the path's.
fn body_error(failure: BodyFailure) -> ProxyError {
    match failure {
        BodyFailure::TooLarge(limit) => ProxyError::new(
            ErrorKind::BodyTooLarge,
            Side::Downstream,
            format!("the request body is over {limit} bytes (max_request_body)"),
        ),
        BodyFailure::Broken(why) => ProxyError::new(
            ErrorKind::BadRequest,
            Side::Downstream,
            format!("the request body from the app broke off: {why}"),
        ),
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
    async fn prepare(
        body: Option<ProxyBody>,
        max: u64,
        progress: Option<&Progress>,
    ) -> Result<Self, ProxyError> {
        let Some(body) = body else {
            return Ok(Self::Empty);
        };
        if http_body::Body::is_end_stream(&body) {
            return Ok(Self::Empty);
        }
        match http_body::Body::size_hint(&body).exact() {
            Some(n) if n <= max => {
                let collected = body.collect().await.map_err(|e| {
                    body_error(
                        progress
                            .and_then(Progress::failure)
                            .unwrap_or_else(|| BodyFailure::Broken(e.to_string())),
                    )
                })?;
                let trailers = collected.trailers().cloned();
                Ok(Self::Buffered(collected.to_bytes(), trailers))
            }
            _ => Ok(Self::Stream(Some(body))),
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

/// What an attempt says about the path to its endpoint, for the breaker.
enum PathVerdict {
    Carried,
    Failed(String),
}

/// Only failures of the path count: connect and handshake failures, the peer sidecar
/// resetting or losing the connection, and (opted in) statuses. Errors that are the caller's
/// (`bad-request`: its body broke off) or the deadline's say nothing about the endpoint.
fn path_verdict(
    result: &Result<Response<ProxyBody>, SendError>,
    cfg: &BreakerConfig,
) -> Option<PathVerdict> {
    match result {
        Ok(resp) => {
            let status = resp.status();
            let from_far_sidecar = resp.extensions().get::<ErrorKind>().is_some();
            let gateway = matches!(status.as_u16(), 502..=504);
            if cfg.statuses.contains(&status.as_u16())
                || (cfg.gateway_errors && from_far_sidecar && gateway)
            {
                Some(PathVerdict::Failed(format!("status {status}")))
            } else {
                Some(PathVerdict::Carried)
            }
        }
        Err(e) => match e.error.kind {
            ErrorKind::ConnectFailed | ErrorKind::PeerReset | ErrorKind::IdentityMismatch
                if e.error.side == Side::Peer =>
            {
                Some(PathVerdict::Failed(e.error.message.clone()))
            }
            _ => None,
        },
    }
}

/// The error kind a failed attempt ended in (from the far sidecar's response, or ours).
fn err_kind(result: &Result<Response<ProxyBody>, ProxyError>) -> Option<ErrorKind> {
    match result {
        Ok(resp) => resp.extensions().get::<ErrorKind>().copied(),
        Err(e) => Some(e.kind),
    }
}

/// `quicar-deadline`'s value for `ms`. A request without a body to wait for is sent with its
/// service's whole timeout less a fraction of a millisecond, so the same few values recur:
/// the last one is kept per thread and shared (a reference count), not formatted and
/// allocated for every request.
fn deadline_value(ms: u64) -> http::HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u64, http::HeaderValue)>> =
            const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((at, value)) if *at == ms => value.clone(),
            _ => {
                let value = http::HeaderValue::from(ms);
                *last = Some((ms, value.clone()));
                value
            }
        }
    })
}

/// The request as each attempt sends it: its head, its body, and where the peer's interim
/// responses (`103 Early Hints`…) go. The sink is passed along, not put in the head's
/// extensions: that map costs three allocations a request.
struct Outgoing<'a> {
    head: Request<()>,
    body: Option<ProxyBody>,
    interim: Option<&'a Interim>,
}

/// Attempts until one succeeds or no retry is allowed.
async fn attempts(
    route: &Route,
    clients: &Clients,
    tel: &Telemetry,
    outgoing: Outgoing<'_>,
    (progress, began, budget): (Option<&Progress>, Instant, Duration),
    permit: crate::resilience::Taken,
) -> Result<(Response<ProxyBody>, Upstream), ProxyError> {
    let Outgoing {
        mut head,
        body,
        interim,
    } = outgoing;
    // Without a tracked body, the body "ended" as the attempts began.
    route.budget.request_at(began);
    let method = head.method().clone();
    let mut body = ReqBody::prepare(body, route.retry.max_body.0, progress).await?;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        // The first attempt starts when the attempts began (one reading of the clock less);
        // a body still streaming began them, and its end starts the deadline below.
        let started = if attempt == 1 && progress.is_none() {
            began
        } else {
            Instant::now()
        };
        let eps = route.endpoints.borrow().clone();
        let (ep, st) = match route.balancer.pick(
            &eps,
            &tried,
            route.breaker.panic_threshold,
            started,
        ) {
            Pick::Chosen(ep, st) => (ep, st),
            Pick::None => {
                return Err(ProxyError::new(
                    ErrorKind::NoEndpoints,
                    Side::Peer,
                    format!("service `{}` has no endpoints", route.name),
                ))
            }
            Pick::AllOpen => {
                let last = eps
                    .iter()
                    .find_map(|e| route.balancer.state(e).last_failure())
                    .unwrap_or_else(|| "unknown".into());
                return Err(ProxyError::new(
                    ErrorKind::CircuitOpen,
                    Side::Peer,
                    format!(
                        "every endpoint of service `{}` is ejected after failures; last failure: {last}",
                        route.name
                    ),
                ));
            }
        };
        let outstanding = st.start();
        // The far app gets what is left of the deadline after the request body ends (all of
        // it while the body is still streaming).
        let ended = progress.map_or(Some(began), Progress::ended_at);
        let left = ended.map_or(budget, |end| {
            (end + budget).saturating_duration_since(started)
        });
        head.headers_mut()
            .insert(DEADLINE, deadline_value(left.as_millis() as u64));
        let (result, transport) = clients
            .send(
                route.transport,
                &ep,
                &mut head,
                body.for_attempt(),
                route.connect_timeout,
                interim,
            )
            .await;
        // The app's own request body broke off (client gone, malformed chunking) or crossed
        // its limit: whatever the peer made of the truncated request (its stream was reset),
        // it is the caller's doing, not the path's.
        let result = match (progress.and_then(Progress::failure), result) {
            (Some(why), Err(_)) => Err(SendError::new(body_error(why), None)),
            (Some(why), Ok(resp)) if resp.extensions().get::<ErrorKind>().is_some() => {
                Err(SendError::new(body_error(why), None))
            }
            (_, r) => r,
        };
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
        let now = Instant::now();
        st.observe(now.saturating_duration_since(started), now);
        match path_verdict(&result, &route.breaker) {
            Some(PathVerdict::Carried) => st.succeeded(),
            Some(PathVerdict::Failed(why)) if st.failed(&route.breaker, &why) => {
                tracing::warn!(service = %route.name, endpoint = %ep.address, last = %why, "endpoint ejected after consecutive failures");
                tel.counter(telemetry::EJECTIONS, &[("service", route.name.clone())])
                    .increment(1);
            }
            Some(PathVerdict::Failed(_)) | None => {}
        }
        let result = result.map_err(|e| {
            if let Some(b) = e.unsent {
                body.restore(b);
            }
            e.error
        });
        if let Some(f) = failure {
            // Endpoints tried and failed, for the next pick (a request that succeeds at once,
            // most, allocates no list).
            tried.push(ep.address);
            // A peer that could not be reached is not tried again by the same request: the
            // next attempt needs another endpoint (100 requests to a dead endpoint fail
            // together after one handshake, not after `attempts` of them).
            let unreachable = matches!(
                f,
                Failure::Error(ErrorKind::ConnectFailed | ErrorKind::IdentityMismatch)
            ) || err_kind(&result).is_some_and(|k| {
                matches!(k, ErrorKind::ConnectFailed | ErrorKind::IdentityMismatch)
            });
            let elsewhere = eps.iter().any(|e| !tried.contains(&e.address));
            let allowed = attempt < route.retry.attempts
                && body.available()
                && (!unreachable || elsewhere)
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
        // Which endpoint answered goes beside the response, not in its extensions: a map
        // made for one entry was three allocations a request.
        let upstream = Upstream {
            endpoint: ep.address,
            attempts: attempt,
            transport,
        };
        return result.map(|resp| {
            // The endpoint's outstanding count and the service's concurrency permit are held
            // until the response body ends.
            (resp.map(|b| held(b, (outstanding, permit))), upstream)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::deadline_value;

    #[test]
    fn a_kept_deadline_value_is_only_reused_for_the_same_milliseconds() {
        assert_eq!(deadline_value(29_999), "29999");
        assert_eq!(deadline_value(29_999), "29999");
        assert_eq!(deadline_value(5), "5");
        assert_eq!(deadline_value(29_999), "29999");
        assert_eq!(deadline_value(0), "0");
    }
}
