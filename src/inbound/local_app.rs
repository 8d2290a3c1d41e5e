//! The client to the local apps: pooled HTTP/1.1 keep-alive connections, the caller's deadline
//! enforced (dropping the call closes the app's connection, so it sees the cancellation), and
//! the edge where the peer's identity becomes `quicar-peer-identity` and the app's own
//! `quicar-*` response headers are dropped.

use std::net::SocketAddr;
use std::time::Duration;

use http::{HeaderValue, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{BodyError, ProxyBody};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::headers::{strip_hop_by_hop, strip_quicar, PEER_IDENTITY};
use crate::identity::PeerId;

/// How long an idle keep-alive connection to a local app is kept.
const IDLE: Duration = Duration::from_secs(30);

pub(crate) struct LocalApp {
    client: Client<HttpConnector, ProxyBody>,
}

/// A local service as the inbound path sees it.
pub(crate) struct Local {
    pub(crate) name: String,
    pub(crate) address: SocketAddr,
    pub(crate) allow: Option<Vec<String>>,
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
    /// rides in `quicar-peer-identity`, and the app gets no longer than `deadline`.
    pub(crate) async fn call(
        &self,
        local: &Local,
        authority: &str,
        peer: &PeerId,
        deadline: Option<Duration>,
        mut parts: http::request::Parts,
        body: ProxyBody,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        parts.headers.insert(
            PEER_IDENTITY,
            HeaderValue::from_str(peer.as_str()).expect("SPIFFE IDs are visible ASCII"),
        );
        parts.headers.insert(
            http::header::HOST,
            HeaderValue::from_str(authority).expect("authority is a valid header value"),
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
        let call = self.client.request(Request::from_parts(parts, body));
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
        // Only the sidecars speak for themselves: an app cannot forge error kinds, cache
        // outcomes or identities toward the caller.
        strip_quicar(resp.headers_mut());
        Ok(resp.map(|b| b.map_err(|e| -> BodyError { Box::new(e) }).boxed_unsync()))
    }
}
