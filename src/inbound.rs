//! The inbound request path, whatever the wire: a peer's request is routed once by its
//! `:authority` to a local service, the caller's identity is checked against that service's
//! policy, and the request goes to the local app (`local_app`). Both servers
//! (`transport::quic`, `transport::tcp`) call `admit` for each new connection and
//! `settle_and_handle` for each request.

mod local_app;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Request, Response};
use http_body_util::BodyExt;

use crate::body::{Counted, ProxyBody};
use crate::config::Config;
use crate::error::{ErrorKind, ProxyError, Side};
use crate::facts::Transport;
use crate::headers::{deadline_of, service_of_authority, strip_hop_by_hop};
use crate::identity::{IdentityError, PeerId};
use crate::interim::Interim;
use crate::policy::authorize;
use crate::resilience::Limit;
use crate::telemetry::{Direction, HandshakeFailure, Telemetry};
use local_app::{CallerSide, Local, LocalApp};

/// Everything the inbound path needs, shared by all peer connections.
pub(crate) struct Inbound {
    tel: Arc<Telemetry>,
    /// By service name; Fx-hashed (names come from our config, lookups from callers).
    locals: rustc_hash::FxHashMap<String, Local>,
    trust_domain: String,
    app: LocalApp,
    /// Open connections per peer identity, and the cap.
    peers: Arc<Mutex<HashMap<PeerId, usize>>>,
    max_per_peer: usize,
    /// Time a peer has to send a request's head on an HTTP/3 stream.
    pub(crate) header_read_timeout: std::time::Duration,
    /// Time a peer may take no byte of a response before its stream is reset.
    pub(crate) response_stall_timeout: std::time::Duration,
    /// Requests in flight from all peers.
    requests: Arc<Limit>,
    max_requests: usize,
}

/// A peer connection counted against its identity's cap until dropped.
pub(crate) struct PeerSlot {
    peers: Arc<Mutex<HashMap<PeerId, usize>>>,
    peer: PeerId,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.peers.lock().expect("not poisoned");
        if let Some(n) = peers.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

impl Inbound {
    pub(crate) fn new(config: &Config, tel: Arc<Telemetry>) -> Self {
        let locals = config
            .local
            .iter()
            .map(|l| {
                let tel = tel.service(Direction::Inbound, &l.name);
                (l.name.to_ascii_lowercase(), Local::new(l, tel))
            })
            .collect();
        Self {
            tel,
            locals,
            trust_domain: config.node.trust_domain.clone(),
            app: LocalApp::new(config.inbound.connect_timeout),
            peers: Arc::default(),
            max_per_peer: config.inbound.max_connections_per_peer,
            header_read_timeout: config.inbound.header_read_timeout,
            response_stall_timeout: config.inbound.response_stall_timeout,
            requests: Limit::new(config.inbound.max_requests),
            max_requests: config.inbound.max_requests,
        }
    }

    pub(crate) fn telemetry(&self) -> &Arc<Telemetry> {
        &self.tel
    }

    /// Closes connections to the local apps that have been idle too long (once a second).
    pub(crate) fn reap_idle(&self) {
        self.locals.values().for_each(Local::reap_idle);
    }

    /// Whether a peer that finished its handshake may send requests: it must prove a SPIFFE
    /// identity of our trust domain and stay under its connection cap. The slot is held for
    /// the connection's life. On refusal, the reason to close with.
    pub(crate) fn admit(
        &self,
        remote: SocketAddr,
        identity: Result<PeerId, IdentityError>,
    ) -> Result<(PeerId, PeerSlot), &'static str> {
        match identity {
            Ok(p) if p.trust_domain() == self.trust_domain => {
                let mut peers = self.peers.lock().expect("not poisoned");
                let n = peers.entry(p.clone()).or_default();
                if *n >= self.max_per_peer {
                    self.tel
                        .handshake_failed(Direction::Inbound, HandshakeFailure::TooManyConnections);
                    tracing::warn!(%remote, identity = %p, max = self.max_per_peer, "inbound peer refused: too many connections from this identity");
                    return Err("too many connections from this identity");
                }
                *n += 1;
                let slot = PeerSlot {
                    peers: self.peers.clone(),
                    peer: p.clone(),
                };
                Ok((p, slot))
            }
            Ok(p) => {
                self.tel
                    .handshake_failed(Direction::Inbound, HandshakeFailure::ForeignTrustDomain);
                tracing::warn!(%remote, identity = %p, "inbound peer refused: foreign trust domain");
                Err("foreign trust domain")
            }
            Err(e) => {
                self.tel
                    .handshake_failed(Direction::Inbound, HandshakeFailure::NoIdentity);
                tracing::warn!(%remote, reason = %e, "inbound peer refused: no usable identity");
                Err("no SPIFFE identity")
            }
        }
    }

    /// Settles a body of unknown length (an empty one goes to the app as no body), then
    /// `handle`. The app's interim responses go to `interim` (passed beside the request, not
    /// in its extensions: a type map per request is three allocations).
    pub(crate) async fn settle_and_handle(
        &self,
        req: Request<ProxyBody>,
        peer: &Arc<PeerId>,
        transport: Transport,
        interim: Option<Interim>,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        match crate::body::settle(body).await {
            // Not boxed here: both transports box the whole per-request task as they spawn
            // it, so a box here was a second allocation per request (BENCHMARKS.md, ninth
            // session).
            Ok(body) => {
                self.handle(Request::from_parts(parts, body), peer, transport, interim)
                    .await
            }
            Err(e) => ProxyError::new(
                ErrorKind::PeerReset,
                Side::Peer,
                format!("request body failed: {e}"),
            )
            .into_response(),
        }
    }

    /// One request from a peer: telemetry around route (once) → authorize → local app. The
    /// record is written when the returned response's body ends.
    pub(crate) async fn handle(
        &self,
        req: Request<ProxyBody>,
        peer: &Arc<PeerId>,
        transport: Transport,
        interim: Option<Interim>,
    ) -> Response<ProxyBody> {
        let mut guard = self.tel.request(Direction::Inbound);
        let Some(permit) = self.requests.try_take() else {
            guard.facts.transport = Some(transport);
            guard.facts.status = 503;
            guard.facts.error_kind = Some(ErrorKind::Overloaded);
            return ProxyError::new(
                ErrorKind::Overloaded,
                Side::LocalApp,
                format!(
                    "this sidecar already has {} requests from peers in flight (inbound.max_requests)",
                    self.max_requests
                ),
            )
            .into_response();
        };
        // A reference count on the decoded field, not a copy.
        let authority = req.uri().authority().cloned();
        let authority = authority.as_ref().map_or("", |a| a.as_str());
        guard.facts.transport = Some(transport);
        if guard.logs() {
            let f = &mut guard.facts;
            f.method = Some(req.method().clone());
            f.path = req.uri().path_and_query().cloned();
            f.authority = authority.to_string();
            f.peer_identity = Some(peer.clone());
            f.traceparent = req.headers().get(crate::headers::TRACEPARENT).cloned();
        }
        let local = service_of_authority(authority).and_then(|n| self.locals.get(n.as_ref()));
        if let Some(local) = local {
            guard.service(&local.tel);
        }
        let (parts, body) = req.into_parts();
        let body = Counted::new(body, guard.bytes_in()).boxed_unsync();
        let resp = match self
            .to_app(
                parts,
                body,
                authority,
                local,
                peer,
                (interim, guard.began()),
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(kind = e.kind.as_str(), error = %e.message, "inbound request failed");
                e.into_response()
            }
        };
        guard.facts.status = resp.status().as_u16();
        guard.facts.error_kind = resp.extensions().get::<ErrorKind>().copied();
        let bytes_out = guard.bytes_out();
        resp.map(|b| {
            Counted::new(b, bytes_out)
                .hold((guard, permit))
                .boxed_unsync()
        })
    }

    /// authorize → app. Errors become sidecar responses with their kind.
    async fn to_app(
        &self,
        mut parts: http::request::Parts,
        body: ProxyBody,
        authority: &str,
        local: Option<&Local>,
        peer: &PeerId,
        (interim, began): (Option<Interim>, std::time::Instant),
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if authority.is_empty() {
            return Err(ProxyError::new(
                ErrorKind::BadRequest,
                Side::Peer,
                "request without :authority",
            ));
        }
        // `local` was looked up by the authority's service name (`handle`): the name is parsed
        // again only to say why there is none.
        let Some(local) = local else {
            let name = service_of_authority(authority).ok_or_else(|| {
                ProxyError::new(
                    ErrorKind::BadRequest,
                    Side::Peer,
                    format!("`{authority}` is not a service name"),
                )
            })?;
            return Err(ProxyError::new(
                ErrorKind::UnknownService,
                Side::Peer,
                format!("no local service `{name}` behind this sidecar"),
            ));
        };
        if !authorize(local.allow.as_deref(), &self.trust_domain, peer) {
            tracing::info!(service = %local.name, caller = %peer, "request denied by policy");
            return Err(ProxyError::new(
                ErrorKind::Denied,
                Side::Peer,
                format!("{peer} may not call `{}`", local.name),
            ));
        }
        strip_hop_by_hop(&mut parts.headers);
        // The caller's remaining budget: the app gets no longer than that.
        let deadline = deadline_of(&parts.headers);
        // Only this sidecar speaks for the caller: the deadline and anything else `quicar-*`
        // the caller sent stay in the map, and are left out when the head is written for the
        // app (`local_app::h1`), where every field is visited anyway (removing them one
        // lookup each cost every request about 400 instructions).
        self.app
            .call(
                local,
                authority,
                peer,
                CallerSide {
                    deadline,
                    interim,
                    began,
                },
                parts,
                body,
            )
            .await
    }
}
