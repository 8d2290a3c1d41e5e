//! The client to the local apps: pooled HTTP/1.1 keep-alive connections, the caller's deadline
//! enforced (dropping the call closes the app's connection, so it sees the cancellation), and
//! the edge where the peer's identity becomes `quicar-peer-identity` and the app's own
//! `quicar-*` response headers are dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use crate::body::{
    after_body, content_length, held, BodyError, BodyFailure, Expired, Progress, ProxyBody,
};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::headers::{strip_hop_by_hop, strip_quicar_from_response, PEER_IDENTITY};
use crate::identity::PeerId;
use crate::interim::Interim;

/// How long an idle keep-alive connection to a local app is kept.
const IDLE: Duration = Duration::from_secs(30);

pub(crate) struct LocalApp {
    client: Client<HttpConnector, ProxyBody>,
}

/// How long a request waits for a free slot to the app before `503 overloaded`.
const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// A local service as the inbound path sees it.
pub(crate) struct Local {
    pub(crate) name: String,
    pub(crate) address: SocketAddr,
    /// `address` as a URI authority, made once rather than per request (`None` for an
    /// address no URI can hold, such as an IPv6 one with a zone).
    authority: Option<http::uri::Authority>,
    pub(crate) allow: Option<Vec<String>>,
    /// The app's deadline when the caller sent none, from the end of the request body.
    pub(crate) timeout: Duration,
    /// Requests (so HTTP/1.1 connections) to the app at once.
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) max_concurrent: usize,
    pub(crate) max_request_body: Option<u64>,
}

impl Local {
    pub(crate) fn new(cfg: &crate::config::Local) -> Self {
        Self {
            name: cfg.name.clone(),
            address: cfg.address,
            authority: http::uri::Authority::try_from(cfg.address.to_string()).ok(),
            allow: cfg.allow.clone(),
            timeout: cfg.timeout,
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            max_concurrent: cfg.max_concurrent,
            max_request_body: cfg.max_request_body.map(|b| b.0),
        }
    }
}

impl LocalApp {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Self { client }
    }

    /// Sends an authorized request to `local`: Host is the service name, the caller's identity
    /// rides in `quicar-peer-identity`, and the app gets no longer than `deadline` (or the
    /// local default) after the request body ended. Bodies over the local limit get 413; when
    /// every slot to the app is busy for a second, 503 overloaded.
    pub(crate) async fn call(
        &self,
        local: &Local,
        authority: &str,
        peer: &PeerId,
        deadline: Option<Duration>,
        mut parts: http::request::Parts,
        body: ProxyBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if let (Some(limit), Some(len)) = (local.max_request_body, content_length(&parts.headers)) {
            if len > limit {
                return Err(too_large(local, limit));
            }
        }
        // A free slot is taken without a timer (the common case); only a full one waits.
        let slot = match local.slots.clone().try_acquire_owned() {
            Ok(p) => Ok(Ok(p)),
            Err(_) => tokio::time::timeout(QUEUE_WAIT, local.slots.clone().acquire_owned()).await,
        };
        let Ok(Ok(slot)) = slot else {
            return Err(ProxyError::new(
                ErrorKind::Overloaded,
                Side::LocalApp,
                format!(
                    "local service `{}` already has {} requests in flight (max_concurrent)",
                    local.name, local.max_concurrent
                ),
            ));
        };
        let progress = Progress::new();
        let body = progress.track(body, local.max_request_body);
        parts.headers.insert(
            PEER_IDENTITY,
            HeaderValue::from_str(peer.as_str()).expect("SPIFFE IDs are visible ASCII"),
        );
        // We take response trailers and carry them on (hyper's server sends them only to a
        // client that says so).
        parts
            .headers
            .insert(http::header::TE, HeaderValue::from_static("trailers"));
        parts.headers.insert(
            http::header::HOST,
            HeaderValue::from_str(authority).expect("authority is a valid header value"),
        );
        // The request's own path, parsed once already, under the app's address.
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(http::uri::Scheme::HTTP);
        uri.authority = local.authority.clone();
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).map_err(|e| {
            ProxyError::new(ErrorKind::BadRequest, Side::Peer, format!("bad path: {e}"))
        })?;
        parts.version = http::Version::HTTP_11;
        let interim = parts.extensions.remove::<Interim>();
        let mut req = Request::from_parts(parts, body);
        if let Some(interim) = interim {
            // The app's interim responses (103 Early Hints…) go on toward the caller as they
            // arrive.
            hyper::ext::on_informational(&mut req, move |r| {
                let mut resp = Response::new(());
                *resp.status_mut() = r.status();
                *resp.headers_mut() = r.headers().clone();
                interim.forward(resp);
            });
        }
        let call = std::pin::pin!(self.client.request(req));
        let limit = deadline.unwrap_or(local.timeout);
        // Dropping the call closes the connection to the app: it sees the cancellation.
        let result = after_body(&progress, limit, local.timeout, call)
            .await
            .map_err(|why| {
                let what = match why {
                    Expired::Timeout => "the caller's deadline passed before",
                    Expired::Stalled => "the request body stopped moving before",
                };
                ProxyError::new(
                    ErrorKind::Timeout,
                    Side::LocalApp,
                    format!("{what} local service `{}` answered", local.name),
                )
            })?;
        let mut resp = result.map_err(|e| {
            if let Some(BodyFailure::TooLarge(limit)) = progress.failure() {
                too_large(local, limit)
            } else if e.is_connect() {
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
        // Only the sidecars speak for themselves: an app cannot forge error kinds, cache
        // outcomes or identities toward the caller.
        strip_quicar_from_response(resp.headers_mut());
        // The slot to the app is held until its response body ends.
        Ok(resp.map(|b| {
            held(
                b.map_err(|e| -> BodyError { Box::new(e) }).boxed_unsync(),
                slot,
            )
        }))
    }
}

fn too_large(local: &Local, limit: u64) -> ProxyError {
    ProxyError::new(
        ErrorKind::BodyTooLarge,
        Side::Peer,
        format!(
            "the request body is over {limit} bytes, the limit of local service `{}` (max_request_body)",
            local.name
        ),
    )
}
