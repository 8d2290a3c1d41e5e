//! Test fixtures: a PKI made at test time, an upstream app that records what it receives,
//! sidecars built from TOML on port 0, and a plain HTTP/1.1 client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use quicar::app::Bound;
use quicar::config::Config;
pub use quicar::facts::Transport;
use quicar::pki::Ca;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub type Body = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Kills the child by PID when the test ends, whatever happened.
pub struct Reaper(pub std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUICAR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A CA and certificates written to a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("quicar.local").unwrap();
        ca.write(dir.path()).unwrap();
        Self { dir, ca }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Issues `name` (file stem and SPIFFE path) and returns the TOML `[identity]` table.
    pub fn identity(&self, name: &str) -> String {
        self.ca
            .issue(name)
            .unwrap()
            .write(self.path(), name)
            .unwrap();
        format!(
            "[identity]\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\nca = \"ca.crt\"\nreload_interval = \"100ms\"\n"
        )
    }

    /// The identity files of `name` (issued already), loaded: for hand-written peers.
    pub fn material(&self, name: &str) -> quicar::identity::Material {
        quicar::identity::Material::load(&quicar::config::IdentityFiles {
            cert: self.path().join(format!("{name}.crt")),
            key: self.path().join(format!("{name}.key")),
            ca: self.path().join("ca.crt"),
            reload_interval: Duration::from_secs(60),
        })
        .unwrap()
    }
}

/// TLS 1.3 with the `web` identity (issued by the pair's PKI) and `alpn`, trusting the CA: what
/// a hand-driven caller of a sidecar's inbound presents.
fn caller_tls(pki: &Pki, alpn: &[u8]) -> rustls::ClientConfig {
    if !pki.path().join("web.crt").exists() {
        pki.identity("web");
    }
    let material = pki.material("web");
    let mut tls = rustls::ClientConfig::builder_with_provider(quicar::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(material.roots.clone())
        .with_client_auth_cert(material.chain.clone(), material.key.clone_key())
        .unwrap();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls
}

/// A hand-driven HTTP/3 caller with the `web` identity, connected to a sidecar's inbound: it
/// sends whatever a peer sidecar (or a hostile one) could. The endpoint is returned with the
/// connection, which lives as long as it does.
pub async fn h3_caller(pki: &Pki, inbound: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
    h3_caller_with(pki, inbound, quinn::EndpointConfig::default()).await
}

/// `h3_caller` from an endpoint of the given config (what it tells the sidecar it accepts).
pub async fn h3_caller_with(
    pki: &Pki,
    inbound: SocketAddr,
    config: quinn::EndpointConfig,
) -> (quinn::Endpoint, quinn::Connection) {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(caller_tls(pki, b"h3")).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let runtime = Arc::new(quinn::TokioRuntime);
    let mut endpoint = quinn::Endpoint::new(config, None, socket, runtime).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let conn = endpoint.connect(inbound, "hello").unwrap().await.unwrap();
    (endpoint, conn)
}

/// An HTTP/3 client on `h3_caller`'s connection, driven by a spawned task (abort it when
/// done); the endpoint lives as long as it is held.
pub async fn h3_client(
    pki: &Pki,
    inbound: SocketAddr,
) -> (
    quinn::Endpoint,
    h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let (endpoint, conn) = h3_caller(pki, inbound).await;
    let (send, driving) = h3_over(conn).await;
    (endpoint, send, driving)
}

/// An HTTP/3 client on `conn`, driven by a spawned task (abort it when done).
pub async fn h3_over(
    conn: quinn::Connection,
) -> (
    h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .unwrap();
    let driving = tokio::spawn(async move {
        std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    (send, driving)
}

/// A TLS connection to a sidecar's TCP inbound listener as the `web` identity, ALPN `h2`.
pub async fn h2_tls(pki: &Pki, inbound: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(inbound).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(caller_tls(pki, b"h2")))
        .connect("hello".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

/// The same over the TCP transport: HTTP/2 over TLS, its connection driven by a spawned task.
pub async fn h2_caller(pki: &Pki, inbound: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tls = h2_tls(pki, inbound).await;
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

/// Builds a sidecar from TOML text (paths relative to the PKI dir).
pub async fn sidecar(pki: &Pki, toml: &str) -> Bound {
    let config =
        Config::parse(toml, "<test>", pki.path()).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    quicar::app::build(config).await.unwrap()
}

/// What the upstream app saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

/// An HTTP/1.1 app on loopback. Paths:
/// `/echo` streams the body back (sized if the request was sized, else chunked);
/// `/bytes/N` answers N pattern bytes sized, `/chunked/N` the same chunked;
/// `/status/N` answers status N with no body; `/headers` answers with hop-by-hop and repeated
/// headers; `/slow/MS` answers after MS milliseconds; `/sink` counts the body without keeping
/// it; `/stream/N` generates N bytes as it sends them; anything else answers "ok".
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// While set, `/c/...` answers 503 (an origin in trouble).
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    /// Every request waits this long before being answered (a slow endpoint).
    pub delay_ms: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
}

impl Upstream {
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = CancellationToken::new();
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s2, stop2, f2, d2) = (
            seen.clone(),
            stop.clone(),
            failing.clone(),
            delay_ms.clone(),
        );
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => r.unwrap().0,
                };
                let seen = s2.clone();
                let failing = f2.clone();
                let delay = d2.clone();
                let stop3 = stop2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let seen = seen.clone();
                        let failing = failing.load(std::sync::atomic::Ordering::Relaxed);
                        let delay = delay.load(std::sync::atomic::Ordering::Relaxed);
                        async move {
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            Ok::<_, Infallible>(upstream(req, seen, failing).await)
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop3.cancelled() => {}
                    }
                });
            }
        });
        Self {
            addr,
            seen,
            failing,
            delay_ms,
            stop,
        }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Requests whose path starts with `prefix`.
    pub fn count_of(&self, prefix: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.path.starts_with(prefix))
            .count()
    }

    pub fn all(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("upstream saw a request")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Deterministic, position-dependent bytes, so a reordered or shifted body is caught.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| ((i * 7 + i / 251) % 256) as u8).collect()
}

fn chunked_body(data: Vec<u8>) -> Body {
    let chunks: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> =
        Bytes::from(data)
            .chunks(16 * 1024)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
    StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A request body of `data`, sent with content-length (`sized`) or chunked.
pub fn body(data: Vec<u8>, sized: bool) -> Body {
    if sized {
        full(data)
    } else {
        chunked_body(data)
    }
}

/// `/c/<name>?cc=<cache-control>&etag=<etag>&vary=<header>&delay=<ms>&size=<n>`: a cacheable
/// resource. Answers 304 when `If-None-Match` matches the etag; otherwise a body naming the
/// resource and how many requests it has had (so a cached copy is recognisable).
async fn cacheable(parts: &http::request::Parts, n: usize, failing: bool) -> Response<Body> {
    let q: std::collections::HashMap<String, String> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.replace("%20", " ")
                    .replace("%22", "\"")
                    .replace("%3F", "?"),
            )
        })
        .collect();
    if let Some(ms) = q.get("delay") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    if failing {
        let mut r = Response::new(full("origin down"));
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return r;
    }
    let mut b = Response::builder();
    // `hdr=name:value;;name:value`: any response fields; `status=N`; `loc=/path` (Location).
    for pair in q.get("hdr").map(String::as_str).unwrap_or("").split(";;") {
        if let Some((k, v)) = pair.split_once(':') {
            b = b.header(k, v);
        }
    }
    // `headhdr=name:value`: a field only HEAD responses carry (the origin changed it).
    if parts.method == http::Method::HEAD {
        if let Some((k, v)) = q.get("headhdr").and_then(|h| h.split_once(':')) {
            b = b.header(k, v);
        }
    }
    if let Some(st) = q.get("status") {
        b = b.status(st.parse::<u16>().unwrap());
    }
    if let Some(loc) = q.get("loc") {
        b = b.header("location", loc.as_str());
    }
    if let Some(cc) = q.get("cc") {
        b = b.header("cache-control", cc.as_str());
    }
    if let Some(v) = q.get("vary") {
        b = b.header("vary", v.as_str());
    }
    if let Some(lm) = q.get("lm") {
        // Like Python's http.server: the 304 does not repeat Last-Modified.
        if parts.headers.contains_key("if-modified-since") {
            return b.status(304).body(full(Bytes::new())).unwrap();
        }
        b = b.header("last-modified", lm.as_str());
    }
    if let Some(etag) = q.get("etag") {
        b = b.header("etag", etag.as_str());
        let inm = parts
            .headers
            .get("if-none-match")
            .and_then(|v| v.to_str().ok());
        if inm.is_some_and(|v| v.split(',').any(|t| t.trim() == etag)) {
            // `ce304=`: the 304 carries a Content-Encoding (which must update the stored one).
            if let Some(ce) = q.get("ce304") {
                b = b.header("content-encoding", ce.as_str());
            }
            return b.status(304).body(full(Bytes::new())).unwrap();
        }
    }
    let body = match q.get("size") {
        Some(size) => pattern(size.parse().unwrap()),
        None => {
            let lang = parts
                .headers
                .get("accept-language")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            format!("{} #{n} {lang}", parts.uri.path()).into_bytes()
        }
    };
    b.body(full(body)).unwrap()
}

async fn upstream(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    failing: bool,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    if path.starts_with("/c/") {
        let data = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let n = {
            let mut seen = seen.lock().unwrap();
            seen.push(Seen {
                method: parts.method.to_string(),
                path: parts.uri.to_string(),
                headers: parts.headers.clone(),
                body_len: data.len(),
            });
            seen.iter().filter(|s| s.path.starts_with(&path)).count()
        };
        return cacheable(&parts, n, failing).await;
    }
    let sized = parts.headers.contains_key(http::header::CONTENT_LENGTH);
    let record = |len| {
        seen.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            path: parts.uri.to_string(),
            headers: parts.headers.clone(),
            body_len: len,
        })
    };
    if path == "/sink" {
        // Counts the body without keeping it.
        let mut body = body;
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => n += f.data_ref().map_or(0, |d| d.len()),
                Err(_) => break,
            }
        }
        record(n);
        return Response::new(full(n.to_string()));
    }
    if let Some(n) = path.strip_prefix("/stream/") {
        // N bytes generated as they are sent, in 64 KiB chunks, never held whole.
        let total: usize = n.parse().unwrap();
        record(0);
        let chunk = Bytes::from(vec![0x5a; 64 * 1024]);
        let stream = futures_util::stream::unfold(0usize, move |sent| {
            let chunk = chunk.clone();
            async move {
                (sent < total).then(|| {
                    let n = chunk.len().min(total - sent);
                    (Ok(Frame::data(chunk.slice(..n))), sent + n)
                })
            }
        });
        return Response::new(StreamBody::new(stream).boxed_unsync());
    }
    if path == "/trailers" {
        // Answers with the request's `x-req-trailer` trailer in the body, and a trailer of its
        // own (announced in `Trailer`, as HTTP/1.1 wants).
        let collected = body.collect().await.unwrap();
        let got = collected
            .trailers()
            .and_then(|t| t.get("x-req-trailer"))
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| "none".into());
        record(0);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-resp-trailer", http::HeaderValue::from_static("done"));
        let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
            Ok(Frame::data(Bytes::from(format!("trailer {got}")))),
            Ok(Frame::trailers(trailers)),
        ];
        let mut resp =
            Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync());
        resp.headers_mut()
            .insert("trailer", http::HeaderValue::from_static("x-resp-trailer"));
        return resp;
    }
    if path == "/echo" {
        let data = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        record(data.len());
        return Response::new(if sized {
            full(data)
        } else {
            chunked_body(data.to_vec())
        });
    }
    let data = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    record(data.len());
    let mut parts_iter = path.trim_start_matches('/').splitn(2, '/');
    let (head, arg) = (
        parts_iter.next().unwrap_or(""),
        parts_iter.next().unwrap_or(""),
    );
    match head {
        "bytes" => Response::new(full(pattern(arg.parse().unwrap()))),
        "chunked" => Response::new(chunked_body(pattern(arg.parse().unwrap()))),
        "status" => {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::from_u16(arg.parse().unwrap()).unwrap();
            r
        }
        // An app that tries to speak for the sidecars.
        "forge" => Response::builder()
            .header("quicar-error", format!("x-forged-{arg}"))
            .header("quicar-peer-identity", "spiffe://evil.example/admin")
            .header("quicar-cache", "hit")
            .header("quicar-transport", "carrier-pigeon")
            .header("x-app", "kept")
            .body(full("forged"))
            .unwrap(),
        "headers" => Response::builder()
            .header("x-multi", "one")
            .header("x-multi", "two")
            .header("connection", "x-hop-resp")
            .header("x-hop-resp", "must not pass")
            .header("Mixed-Case-Header", "kept")
            .body(full("headers"))
            .unwrap(),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(arg.parse().unwrap())).await;
            Response::new(full("slow"))
        }
        _ => Response::new(full("ok")),
    }
}

/// A response as the app would read it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    /// How the cache answered (`quicar-cache`), or "" for an answer that did not pass one.
    pub fn how(&self) -> &str {
        self.headers
            .get("quicar-cache")
            .map_or("", |v| v.to_str().unwrap())
    }

    pub fn error_kind(&self) -> Option<&str> {
        self.headers
            .get("quicar-error")
            .and_then(|v| v.to_str().ok())
    }
}

/// Sends one request on a fresh HTTP/1.1 connection (the URI may be absolute: proxy form).
pub async fn send(addr: SocketAddr, req: Request<Body>) -> Got {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `POST path` with `Host: hello`.
pub async fn post(out: SocketAddr, path: &str, body: Body) -> Got {
    send(
        out,
        Request::post(path)
            .header("host", "hello")
            .body(body)
            .unwrap(),
    )
    .await
}

/// `GET path` with `Host: host`.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Got {
    send(
        addr,
        Request::get(path)
            .header("host", host)
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await
}

/// Two sidecars: `client` calls service `hello` served by `server` in front of `upstream`.
pub struct Pair {
    pub pki: Pki,
    pub client: Bound,
    pub server: Bound,
    pub upstream: Upstream,
}

impl Pair {
    pub async fn start() -> Self {
        Self::start_with("", "").await
    }

    /// `client_extra` is appended to the `[[service]] hello` table; `server_extra` to
    /// `[[local]] hello`.
    pub async fn start_with(client_extra: &str, server_extra: &str) -> Self {
        init_tracing();
        let pki = Pki::new();
        let upstream = Upstream::start().await;
        let server = sidecar(
            &pki,
            &server_toml(&pki, upstream.addr, "127.0.0.1:0", server_extra),
        )
        .await;
        let client = sidecar(&pki, &client_toml(&pki, &[server.inbound], client_extra)).await;
        Self {
            pki,
            client,
            server,
            upstream,
        }
    }

    /// A pair whose client has `setting` (one or more lines) in its `[outbound]` section.
    pub async fn with_outbound(setting: &str) -> Self {
        init_tracing();
        let pki = Pki::new();
        let upstream = Upstream::start().await;
        let server = sidecar(&pki, &server_toml(&pki, upstream.addr, "127.0.0.1:0", "")).await;
        let toml = client_toml(&pki, &[server.inbound], "").replace(
            "[outbound]\nlisten = \"127.0.0.1:0\"",
            &format!("[outbound]\nlisten = \"127.0.0.1:0\"\n{setting}"),
        );
        let client = sidecar(&pki, &toml).await;
        Self {
            pki,
            client,
            server,
            upstream,
        }
    }

    pub fn out(&self) -> SocketAddr {
        self.client.outbound
    }
}

/// A loopback address whose port is free for TCP and UDP and lies below the kernel's ephemeral
/// range (32768 and up on Linux), so no outgoing connection of another test can take it. For
/// a sidecar that a test stops and binds again on the same port: a port from `:0` is an
/// ephemeral one, and once freed another test's connection may hold it as its local port for
/// longer than the restart waits.
pub fn non_ephemeral_addr() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % 10_000;
    for _ in 0..12_000 {
        let port = 20_000 + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port as u16));
        let tcp = std::net::TcpListener::bind(addr);
        let udp = std::net::UdpSocket::bind(addr);
        if tcp.is_ok() && udp.is_ok() {
            return addr;
        }
    }
    panic!("no free port between 20000 and 32000");
}

pub fn server_toml(pki: &Pki, app: SocketAddr, inbound: &str, local_extra: &str) -> String {
    format!(
        "{}\n[outbound]\nlisten = \"127.0.0.1:0\"\n[inbound]\nlisten = \"{inbound}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[node]\ndrain_timeout = \"2s\"\n\
         [[local]]\nname = \"hello\"\naddress = \"{app}\"\n{local_extra}\n",
        pki.identity("hello")
    )
}

pub fn client_toml(pki: &Pki, peers: &[SocketAddr], service_extra: &str) -> String {
    let eps: Vec<String> = peers
        .iter()
        .map(|p| format!("{{ address = \"{p}\" }}"))
        .collect();
    format!(
        "{}\n[outbound]\nlisten = \"127.0.0.1:0\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[node]\ndrain_timeout = \"2s\"\n\
         [[service]]\nname = \"hello\"\nconnect_timeout = \"500ms\"\nendpoints = [{}]\n{service_extra}\n",
        pki.identity("web"),
        eps.join(", ")
    )
}

/// Counts header values by name, for repeated-header checks.
pub fn values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

/// The transport a test's `t` ("quic" or "tcp") names.
pub fn wire(t: &str) -> Transport {
    match t {
        "tcp" => Transport::Tcp,
        _ => Transport::Quic,
    }
}

/// Runs a test body once per transport, as `name::quic` and `name::tcp`; the body sees the
/// transport name as `$t`.
#[macro_export]
macro_rules! over_transports {
    ($( async fn $name:ident($t:ident) $body:block )*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn run($t: &'static str) $body

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn quic() {
                    run("quic").await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn tcp() {
                    run("tcp").await
                }
            }
        )*
    };
}

impl Pair {
    /// A pair whose client calls `hello` over `transport`.
    pub async fn over(transport: &str) -> Self {
        Self::over_with(transport, "", "").await
    }

    pub async fn over_with(transport: &str, client_extra: &str, server_extra: &str) -> Self {
        Self::start_with(
            &format!("transport = \"{transport}\"\n{client_extra}"),
            server_extra,
        )
        .await
    }
}

/// Sends raw bytes to the outbound listener and reads what comes back until the connection
/// closes (or 10 s pass).
pub async fn raw(out: std::net::SocketAddr, bytes: &[u8], close_write: bool) -> String {
    let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, bytes)
        .await
        .unwrap();
    if close_write {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
    }
    read_until_closed(&mut s, Duration::from_secs(10)).await.0
}

/// Reads `s` until its peer closes it (or the read fails), for at most `within`: what came,
/// and whether it ended in time.
pub async fn read_until_closed(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
    within: Duration,
) -> (String, bool) {
    let mut buf = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(s, &mut buf);
    let ended = tokio::time::timeout(within, read).await.is_ok();
    (String::from_utf8_lossy(&buf).into_owned(), ended)
}

/// Two requests at once both pass, within 10 s: the places of a concurrency limit came back.
/// (A place is given back as the sidecar drops its response, which can be a moment after the
/// client has read it, so a leak is told from that moment by trying again.)
pub async fn two_at_once_pass(out: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = tokio::join!(get(out, "hello", "/"), get(out, "hello", "/"));
        if (a.status, b.status) == (StatusCode::OK, StatusCode::OK) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "two at once still refused after 10 s: {} and {}",
            a.status,
            b.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
