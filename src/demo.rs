//! `quicar demo`: a dev CA and two identities in a temp dir, a small demo service, and two
//! sidecars on loopback wired to each other, so a user can curl through a real QUIC hop with
//! no setup.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::{self, Bound};
use crate::body::{full, ProxyBody};
use crate::config::Config;
use crate::pki::Ca;

/// Anything that stops the demo from starting, said as text.
pub type DemoError = Box<dyn std::error::Error + Send + Sync>;

/// The running demo: two sidecars and the demo service.
pub struct Demo {
    pub client_side: Bound,
    pub server_side: Bound,
    pub service: SocketAddr,
    stop_service: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Demo {
    /// Curl lines to paste, against the client side's outbound listener.
    pub fn instructions(&self) -> String {
        let out = self.client_side.outbound;
        format!(
            "quicar demo: app ──HTTP/1.1──▶ sidecar `web` {out} ══QUIC/HTTP3 mTLS══▶ sidecar `hello` {inb} ──HTTP/1.1──▶ demo service {svc}\n\
             \n\
             Try:\n\
             \x20 curl -s -H 'Host: hello' http://{out}/            # the caller identity the service received\n\
             \x20 curl -s -x http://{out} http://hello/whoami       # the same, with the sidecar as an HTTP proxy\n\
             \x20 curl -s -H 'Host: hello' --data-binary 'ping' http://{out}/echo   # body streamed there and back\n\
             \x20 curl -s -H 'Host: hello' -H 'quicar-peer-identity: spiffe://evil/forged' http://{out}/   # forged header is dropped\n\
             \x20 curl -si -H 'Host: hello' http://{out}/cached      # twice: `quicar-cache: miss`, then `hit` with an Age\n\
             \x20 curl -si -H 'Host: vault' http://{out}/         # 403 denied: only spiffe://quicar.local/ops may call vault\n\
             \x20 curl -si -H 'Host: nowhere' http://{out}/       # 404 unknown-service\n\
             \n\
             Dashboard: http://{admin}/dashboard   Metrics: http://{admin}/metrics   (sidecar `web`)\n\
             \n\
             Ctrl-C stops it.\n",
            admin = self.client_side.admin,
            inb = self.server_side.inbound,
            svc = self.service,
        )
    }

    pub async fn shutdown(self) {
        self.client_side.shutdown().await;
        self.server_side.shutdown().await;
        self.stop_service.cancel();
    }
}

/// Starts the demo; the client-side sidecar's outbound listener binds `listen`.
pub async fn start(listen: SocketAddr, admin: SocketAddr) -> Result<Demo, DemoError> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::generate("quicar.local")?;
    ca.write(dir.path())?;
    for name in ["web", "hello"] {
        ca.issue(name)?.write(dir.path(), name)?;
    }
    let stop_service = CancellationToken::new();
    let service = serve_demo_service(stop_service.clone()).await?;

    let server_side = app::build(sidecar_config(
        dir.path(),
        "hello",
        "127.0.0.1:0".parse()?,
        "127.0.0.1:0".parse()?,
        &format!(
            "[[local]]\nname = \"hello\"\naddress = \"{service}\"\n\
             allow = [\"spiffe://quicar.local/web\"]\n\n\
             [[local]]\nname = \"vault\"\naddress = \"{service}\"\n\
             allow = [\"spiffe://quicar.local/ops\"]\n"
        ),
    )?)
    .await?;
    let peer = server_side.inbound;
    let client_side = app::build(sidecar_config(
        dir.path(),
        "web",
        listen,
        admin,
        &format!(
            "[[service]]\nname = \"hello\"\nendpoints = [{{ address = \"{peer}\" }}]\n\
             cache = {{ max_bytes = \"16MiB\" }}\n\n\
             [[service]]\nname = \"vault\"\n\
             endpoints = [{{ address = \"{peer}\", identity = \"spiffe://quicar.local/hello\" }}]\n"
        ),
    )?)
    .await?;
    Ok(Demo {
        client_side,
        server_side,
        service,
        stop_service,
        _dir: dir,
    })
}

fn sidecar_config(
    dir: &Path,
    name: &str,
    outbound: SocketAddr,
    admin: SocketAddr,
    rest: &str,
) -> Result<Config, DemoError> {
    let text = format!(
        "[node]\nname = \"{name}\"\n\n\
         [identity]\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\nca = \"ca.crt\"\n\n\
         [outbound]\nlisten = \"{outbound}\"\n\n\
         [inbound]\nlisten = \"127.0.0.1:0\"\n\n\
         [admin]\nlisten = \"{admin}\"\n\n{rest}"
    );
    Ok(Config::parse(&text, &format!("<demo {name}>"), dir)?)
}

/// The demo app: `/echo` streams the request body back; any other path describes the request,
/// including the caller identity the sidecar vouched for.
async fn serve_demo_service(stop: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req| async {
                    Ok::<_, Infallible>(demo_response(req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn demo_response(req: Request<Incoming>) -> Response<ProxyBody> {
    if req.uri().path() == "/cached" {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut resp = Response::new(full(Bytes::from(format!(
            "generated at unix time {}.{:03}; cacheable for 30 s\n",
            now.as_secs(),
            now.subsec_millis()
        ))));
        resp.headers_mut().insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static("max-age=30"),
        );
        return resp;
    }
    if req.uri().path() == "/echo" {
        let body = req.into_body().map_err(Into::into).boxed_unsync();
        return Response::new(body);
    }
    let caller = req
        .headers()
        .get(crate::headers::PEER_IDENTITY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_string();
    let text = format!(
        "hello from the demo service\nmethod: {}\npath: {}\nhost: {}\ncaller: {caller}\n",
        req.method(),
        req.uri(),
        req.headers()
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    );
    Response::new(full(Bytes::from(text)))
}
