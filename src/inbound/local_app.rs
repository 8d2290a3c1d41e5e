//! The client to the local apps: pooled HTTP/1.1 keep-alive connections, the caller's deadline
//! enforced (dropping the call closes the app's connection, so it sees the cancellation), and
//! the edge where the peer's identity becomes `quicar-peer-identity` and the app's own
//! `quicar-*` response headers are dropped.
//!
//! The pool is quicar's own, one per local service (one address): idle connections on a stack,
//! taken newest first, given back when a response body has been read to its end. A connection
//! whose response was dropped early is closed, never reused; one the app closed while idle is
//! found closed, or refuses the request's first bytes, and the next connection is tried. The
//! HTTP/1.1 itself is `h1`, spoken by the request's own task.

mod h1;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::{
    after_body, content_length, BodyError, BodyFailure, Expired, Progress, ProxyBody,
};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::headers::strip_quicar_from_response;
use crate::identity::PeerId;
use crate::interim::Interim;
use crate::telemetry::ServiceTel;

/// How long an idle keep-alive connection to a local app is kept.
const IDLE: Duration = Duration::from_secs(30);

pub(crate) struct LocalApp {
    connect_timeout: Duration,
}

/// How long a request waits for a free slot to the app before `503 overloaded`.
const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// A local service as the inbound path sees it.
pub(crate) struct Local {
    pub(crate) name: String,
    pub(crate) address: SocketAddr,
    pub(crate) allow: Option<Vec<String>>,
    /// The app's deadline from the end of the request body: the caller's when it is shorter.
    pub(crate) timeout: Duration,
    /// Requests (so HTTP/1.1 connections) to the app at once.
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) max_concurrent: usize,
    pub(crate) max_request_body: Option<u64>,
    pub(crate) tel: Arc<ServiceTel>,
    /// `Host` for a request that named the service as configured (nearly all): made once.
    host: Option<HeaderValue>,
    /// Idle keep-alive connections to `address`.
    idle: Arc<Idle>,
}

/// Idle connections to one app, oldest first. At most `max_concurrent` are kept (the requests
/// the app gets at once), the oldest going first.
struct Idle {
    conns: Mutex<Vec<(Conn, Instant)>>,
    max: usize,
    /// Signalled when a connection is put back.
    returned: tokio::sync::Notify,
}

/// An idle connection to an app.
type Conn = h1::Wire;

impl Idle {
    /// The newest idle connection that can take a request. Closed and expired ones are
    /// dropped on the way.
    fn take(&self) -> Option<Conn> {
        let mut conns = self.conns.lock().expect("not poisoned");
        while let Some((conn, since)) = conns.pop() {
            if !stale(&conn, since) {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        let mut conns = self.conns.lock().expect("not poisoned");
        if conns.len() >= self.max {
            conns.remove(0);
        }
        conns.push((conn, Instant::now()));
        drop(conns);
        self.returned.notify_one();
    }

    /// Closes connections idle for longer than `IDLE`, and those the app closed.
    fn reap(&self) {
        self.conns
            .lock()
            .expect("not poisoned")
            .retain(|(c, since)| !stale(c, *since));
    }
}

/// A pooled connection never to be used again: the app closed it, or it has been idle too long.
fn stale(conn: &Conn, since: Instant) -> bool {
    conn.is_closed() || since.elapsed() >= IDLE
}

impl Local {
    pub(crate) fn new(cfg: &crate::config::Local, tel: Arc<ServiceTel>) -> Self {
        Self {
            tel,
            name: cfg.name.clone(),
            address: cfg.address,
            allow: cfg.allow.clone(),
            timeout: cfg.timeout,
            slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
            max_concurrent: cfg.max_concurrent,
            max_request_body: cfg.max_request_body.map(|b| b.0),
            host: HeaderValue::from_str(&cfg.name).ok(),
            idle: Arc::new(Idle {
                conns: Mutex::default(),
                max: cfg.max_concurrent,
                returned: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Closes the connections to the app idle for longer than `IDLE`.
    pub(crate) fn reap_idle(&self) {
        self.idle.reap();
    }
}

/// What the calling side brings to a call beside the request: the caller's remaining budget
/// (`quicar-deadline`) and where the app's interim responses go.
pub(crate) struct CallerSide {
    pub(crate) deadline: Option<Duration>,
    pub(crate) interim: Option<Interim>,
    /// When this sidecar took the request: the deadline of a request without a body to wait
    /// for runs from then.
    pub(crate) began: Instant,
}

impl LocalApp {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        Self { connect_timeout }
    }

    /// Starts a connection to the app in its own task. Whoever still waits gets it; if nobody
    /// does (an idle connection came back first, or the caller gave up), it joins the pool.
    fn connect(&self, local: &Local) -> tokio::sync::oneshot::Receiver<Result<Conn, AppError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (address, timeout, idle) = (local.address, self.connect_timeout, local.idle.clone());
        tokio::spawn(async move {
            let made = async {
                let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
                    .await
                    .map_err(|_| AppError::Connect(None))?
                    .map_err(|e| AppError::Connect(Some(e)))?;
                let _ = stream.set_nodelay(true);
                Ok(h1::Wire::new(stream))
            }
            .await;
            if let Err(Ok(conn)) = tx.send(made) {
                idle.put(conn);
            }
        });
        rx
    }

    /// Sends the request on an idle connection, else on a new one, whichever is ready first:
    /// under a burst, connections coming back serve requests while new ones are still being
    /// accepted (a connect can wait for the app's accept queue). An idle connection that
    /// refuses the request's first bytes (the app closed it meanwhile) passes it to the next;
    /// a new connection's failure is final.
    async fn send(
        &self,
        local: &Local,
        (parts, ours): (http::request::Parts, h1::Added<'_>),
        body: ProxyBody,
        interim: Option<Interim>,
    ) -> Result<Response<h1::AppBody>, AppError> {
        let head_request = parts.method == http::Method::HEAD;
        let mut connecting = None;
        let exchange = 'found: loop {
            let returned = local.idle.returned.notified();
            while let Some(conn) = local.idle.take() {
                if let Ok(ex) = conn.begin(&parts, &body, &ours) {
                    break 'found ex;
                }
            }
            let new = connecting.get_or_insert_with(|| self.connect(local));
            tokio::select! {
                biased;
                made = new => {
                    let conn = made.unwrap_or(Err(AppError::Connect(None)))?;
                    break 'found conn.begin(&parts, &body, &ours).map_err(|_| {
                        AppError::Http(h1::WireError::Closed)
                    })?;
                }
                () = returned => {}
            }
        };
        exchange
            .response(body, head_request, interim)
            .await
            .map_err(AppError::Http)
    }

    /// Sends an authorized request to `local`: Host is the service name, the caller's identity
    /// rides in `quicar-peer-identity`, and the app gets no longer than `deadline` (capped by
    /// the local `timeout`, which also applies when the caller sent none) after the request
    /// body ended. Bodies over the local limit get 413; when every slot to the app is busy for
    /// a second, 503 overloaded.
    pub(crate) async fn call(
        &self,
        local: &Local,
        authority: &str,
        peer: &PeerId,
        caller: CallerSide,
        mut parts: http::request::Parts,
        body: ProxyBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let CallerSide {
            deadline,
            interim,
            began,
        } = caller;
        // (The length is looked up only for a service with a limit.)
        if let Some(limit) = local.max_request_body {
            if content_length(&parts.headers).is_some_and(|len| len > limit) {
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
        // A body still to come is tracked (the deadline runs from its end, a stalled one is
        // cut); a request without one (most) needs none of that.
        let progress = (!body.is_end_stream()).then(Progress::new);
        let body = match &progress {
            Some(p) => p.track(body, local.max_request_body),
            None => body,
        };
        // Host, `quicar-peer-identity` and `TE: trailers` are written with the head
        // (`h1::Wire::begin`), not added to the caller's fields.
        let made;
        let host = match &local.host {
            Some(h) if h.as_bytes() == authority.as_bytes() => h,
            _ => {
                made = HeaderValue::from_str(authority).expect("authority is a valid header value");
                &made
            }
        };
        // The request's own path, parsed once already, in origin form (RFC 9112 §3.2.1).
        parts.uri = match std::mem::take(&mut parts.uri).into_parts().path_and_query {
            Some(p) => p.into(),
            None => http::Uri::from_static("/"),
        };
        parts.version = http::Version::HTTP_11;
        // The app's interim responses (103 Early Hints…) go on toward the caller as they arrive.
        let ours = h1::Added {
            host,
            peer: peer.header_ref(),
        };
        let call = std::pin::pin!(self.send(local, (parts, ours), body, interim));
        // The caller's deadline can only shorten the local one: a peer (another vendor's, or a
        // compromised one) cannot hold the app and its slot longer than this sidecar allows.
        let limit = deadline.map_or(local.timeout, |d| d.min(local.timeout));
        // Dropping the call closes the connection to the app: it sees the cancellation.
        let result = match &progress {
            Some(p) => after_body(p, limit, local.timeout, call).await,
            None => tokio::time::timeout_at((began + limit).into(), call)
                .await
                .map_err(|_| Expired::Timeout),
        };
        let result = result.map_err(|why| {
            let name = &local.name;
            let message = match why {
                Expired::Timeout => {
                    format!("the caller's deadline passed before local service `{name}` answered")
                }
                Expired::Stalled if progress.as_ref().is_some_and(|p| p.sender_stalled()) => {
                    format!("the request body stopped moving before local service `{name}` answered")
                }
                Expired::Stalled => format!(
                    "local service `{name}` took none of the request body for {} and did not answer",
                    humantime::format_duration(local.timeout)
                ),
            };
            ProxyError::new(ErrorKind::Timeout, Side::LocalApp, message)
        })?;
        let mut resp = result.map_err(|e| match (progress.and_then(|p| p.failure()), e) {
            (Some(BodyFailure::TooLarge(limit)), _) => too_large(local, limit),
            (_, AppError::Connect(why)) => ProxyError::new(
                ErrorKind::ConnectFailed,
                Side::LocalApp,
                format!(
                    "cannot connect to local service `{}` at {}: {}",
                    local.name,
                    local.address,
                    why.as_ref().map_or_else(
                        || format!(
                            "no connection within {:?} (inbound.connect_timeout)",
                            self.connect_timeout
                        ),
                        ToString::to_string
                    )
                ),
            ),
            (_, AppError::Http(e)) => ProxyError::new(
                ErrorKind::PeerReset,
                Side::LocalApp,
                format!(
                    "local service `{}` at {} failed: {}",
                    local.name,
                    local.address,
                    crate::error::source_chain(&e)
                ),
            ),
        })?;
        // Hop-by-hop fields never got into the response: `h1` drops them as it parses.
        // Only the sidecars speak for themselves: an app cannot forge error kinds, cache
        // outcomes or identities toward the caller.
        strip_quicar_from_response(resp.headers_mut());
        // The slot to the app is held until its response body ends, and the connection goes
        // back to the pool then.
        Ok(resp.map(|body| {
            let mut r = Reuse {
                body,
                idle: local.idle.clone(),
                _slot: slot,
            };
            r.ended_if_done();
            ProxyBody::new(r)
        }))
    }
}

/// Why a request did not get a response from the app.
enum AppError {
    /// No connection within the connect timeout (`None`), or refused.
    Connect(Option<std::io::Error>),
    Http(h1::WireError),
}

/// The app's response body: the connection goes back to the pool when it has been read to its
/// end (dropped early, it is closed and not reused), and the slot is held until then.
struct Reuse {
    body: h1::AppBody,
    idle: Arc<Idle>,
    _slot: OwnedSemaphorePermit,
}

impl Reuse {
    /// Gives the connection back if the exchange is over and it can carry another.
    fn ended_if_done(&mut self) {
        if self.body.is_end_stream() {
            if let Some(conn) = self.body.reusable() {
                self.idle.put(conn);
            }
        }
    }
}

impl Body for Reuse {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Ok(_)))) {
            self.ended_if_done();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
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
