//! `floor`: the least a sidecar pair built on quicar's crates can do per request, to measure
//! how much of quicar's cost is its own and how much the crates' (BENCHMARKS.md, "The
//! floor under the goals").
//!
//! Two processes like a quicar pair, with the same crates, runtime and allocator (tokio's
//! current-thread runtime, quinn, h3 and h3-quinn as quicar patches them, h2, rustls with ring
//! and tokio-rustls, `http`'s types, httparse, mimalloc), doing only what carrying a request
//! needs:
//!
//! - `floor a LISTEN PEER PKI`: HTTP/1.1 from the app on `LISTEN` (httparse; bodyless
//!   requests only), each request sent to `PEER` over one mutual-TLS connection, as HTTP/3 over
//!   QUIC, or as HTTP/2 over TLS on TCP when the Host's name ends in `-tcp` (peerbench's
//!   `hello` and `hello-tcp`, as quicar's pair serves them); the response written back as
//!   HTTP/1.1 with its length.
//! - `floor b LISTEN BACKEND PKI`: HTTP/3 on `LISTEN` (UDP) and HTTP/2 over TLS on `LISTEN`
//!   (TCP), each request sent to `BACKEND` as HTTP/1.1 on a pooled keep-alive connection
//!   (responses with a `Content-Length` only), the response sent back with its body and the
//!   stream's end in one write.
//!
//! `PKI` is peerbench's directory (`a.crt`, `a.key`, `b.crt`, `b.key`, `ca.crt`; B's name is
//! `sidecar-b`). Hop-by-hop fields are dropped; there is no routing, policy, telemetry, timeout,
//! retry, body streaming or error answer: a request this cannot carry ends its connection. It is a
//! measuring stick, not a proxy. Built with `cargo build --release --bench floor` (the
//! executable is `target/release/deps/floor-*`); `benches/callgrind_pair.sh floor …` and
//! peerbench's `run.sh --quicar` run it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, Uri};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Error = Box<dyn std::error::Error + Send + Sync>;

const H3: &[u8] = b"h3";
const H2: &[u8] = b"h2";
const MAX_FIELDS: usize = 64;

fn main() -> Result<(), Error> {
    // `cargo bench` passes `--bench`; anything starting with `--` is not ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [role, listen, other, pki] = args.as_slice() else {
        eprintln!("usage: floor a LISTEN PEER PKI | floor b LISTEN BACKEND PKI");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse()?;
    let other: SocketAddr = other.parse()?;
    let pki = Path::new(pki);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // SIGTERM returns from `main`, so exit handlers run: a build instrumented for a
        // profile writes its counts then (`benches/pgo.sh floor`).
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let serve = async {
            match role.as_str() {
                "a" => side_a(listen, other, pki).await,
                "b" => side_b(listen, other, pki).await,
                _ => Err(format!("role is a or b, not {role}").into()),
            }
        };
        tokio::select! {
            r = serve => r,
            _ = term.recv() => Ok(()),
        }
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    Ok(CertificateDer::pem_file_iter(path)?.collect::<Result<_, _>>()?)
}

fn roots(pki: &Path) -> Result<Arc<rustls::RootCertStore>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&pki.join("ca.crt"))? {
        roots.add(c)?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---- A: HTTP/1.1 in, HTTP/3 or HTTP/2 out ----

type H3Sender = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;
type H2Sender = h2::client::SendRequest<Bytes>;

fn client_tls(pki: &Path, alpn: &[u8]) -> Result<rustls::ClientConfig, Error> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(pki)?)
        .with_client_auth_cert(
            certs(&pki.join("a.crt"))?,
            PrivateKeyDer::from_pem_file(pki.join("a.key"))?,
        )?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

async fn side_a(listen: SocketAddr, peer: SocketAddr, pki: &Path) -> Result<(), Error> {
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(pki, H3)?)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    // Pings keep the one connection from idling out (quinn's 30 s) between benchmark runs.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(std::time::Duration::from_secs(10)));
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(client);
    // B may still be starting (under valgrind, seconds): try for a minute.
    let mut tries = 0;
    let conn = loop {
        match endpoint.connect(peer, "sidecar-b")?.await {
            Ok(conn) => break conn,
            Err(e) if tries < 60 => {
                eprintln!("floor a: no QUIC connection to {peer} yet: {e}");
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let (mut driver, h3) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
    tokio::spawn(async move { std::future::poll_fn(|cx| driver.poll_close(cx)).await });

    let tcp = TcpStream::connect(peer).await?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls(pki, H2)?))
        .connect("sidecar-b".try_into()?, tcp)
        .await?;
    let (h2, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(conn);

    let listener = TcpListener::bind(listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (h3, h2) = (h3.clone(), h2.clone());
        tokio::spawn(async move {
            if let Err(e) = app_connection(stream, h3, h2).await {
                eprintln!("floor a: connection ended: {e}");
            }
        });
    }
}

/// One app connection: a request at a time, until the app closes it.
async fn app_connection(
    mut stream: TcpStream,
    mut h3: H3Sender,
    h2: H2Sender,
) -> Result<(), Error> {
    let mut buf = BytesMut::with_capacity(8192);
    let mut out = Vec::with_capacity(8192);
    loop {
        let Some(req) = read_request(&mut stream, &mut buf).await? else {
            return Ok(());
        };
        let tcp = req.uri().host().is_some_and(|h| h.ends_with("-tcp"));
        let mut body = BytesMut::new();
        let resp = if tcp {
            let (resp, _) = h2.clone().ready().await?.send_request(req, true)?;
            let (resp, mut recv) = resp.await?.into_parts();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk?;
                let _ = recv.flow_control().release_capacity(chunk.len());
                body.put(chunk);
            }
            resp
        } else {
            let mut exchange = h3.send_request_ending(&req, true).await?;
            let resp = exchange.recv_response().await?;
            while let Some(chunk) = exchange.recv_data().await? {
                body.put(chunk);
            }
            resp.into_parts().0
        };
        out.clear();
        write_head(
            &mut out,
            b"HTTP/1.1 ",
            resp.status.as_str(),
            resp.status.canonical_reason().unwrap_or(""),
        );
        for (name, value) in &resp.headers {
            if name != http::header::CONTENT_LENGTH {
                put_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(&body);
        stream.write_all(&out).await?;
    }
}

/// The next bodyless request from the app, as h3 and h2 take it (`https://HOST/path`); `None` when
/// the app closed the connection between requests.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Option<Request<()>>, Error> {
    loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut parsed = httparse::Request::new(&mut fields);
        if let httparse::Status::Complete(len) = parsed.parse(buf)? {
            let mut headers = HeaderMap::with_capacity(parsed.headers.len());
            let mut host = None;
            for f in parsed.headers.iter() {
                let name = HeaderName::from_bytes(f.name.as_bytes())?;
                if (name == http::header::CONTENT_LENGTH && f.value != b"0")
                    || name == http::header::TRANSFER_ENCODING
                {
                    return Err("floor carries bodyless requests only".into());
                } else if name == http::header::HOST {
                    host = Some(f.value);
                } else if !is_hop_by_hop(&name) {
                    headers.append(name, HeaderValue::from_bytes(f.value)?);
                }
            }
            let uri = Uri::builder()
                .scheme("https")
                .authority(host.ok_or("no Host")?)
                .path_and_query(parsed.path.ok_or("no path")?)
                .build()?;
            let mut req = Request::builder()
                .method(parsed.method.ok_or("no method")?)
                .uri(uri)
                .body(())?;
            *req.headers_mut() = headers;
            buf.advance(len);
            return Ok(Some(req));
        }
        if stream.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("closed mid-request".into())
            };
        }
    }
}

// ---- B: HTTP/3 or HTTP/2 in, HTTP/1.1 out ----

type Backends = Arc<Mutex<Vec<(TcpStream, BytesMut)>>>;

fn server_tls(pki: &Path, alpn: &[u8]) -> Result<rustls::ServerConfig, Error> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(pki)?, provider())
            .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&pki.join("b.crt"))?,
            PrivateKeyDer::from_pem_file(pki.join("b.key"))?,
        )?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

async fn side_b(listen: SocketAddr, backend: SocketAddr, pki: &Path) -> Result<(), Error> {
    let mut tls = server_tls(pki, H3)?;
    tls.max_early_data_size = u32::MAX;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let endpoint = quinn::Endpoint::server(config, listen)?;
    let backends: Backends = Arc::default();
    let tcp = TcpListener::bind(listen).await?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(pki, H2)?));
    {
        let backends = backends.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = tcp.accept().await {
                let _ = stream.set_nodelay(true);
                let (acceptor, backends) = (acceptor.clone(), backends.clone());
                tokio::spawn(async move {
                    if let Err(e) = h2_connection(acceptor, stream, backend, backends).await {
                        eprintln!("floor b: TCP connection ended: {e}");
                    }
                });
            }
        });
    }
    while let Some(incoming) = endpoint.accept().await {
        let backends = backends.clone();
        tokio::spawn(async move {
            if let Err(e) = h3_connection(incoming, backend, backends).await {
                eprintln!("floor b: QUIC connection ended: {e}");
            }
        });
    }
    Ok(())
}

async fn h3_connection(
    incoming: quinn::Incoming,
    backend: SocketAddr,
    backends: Backends,
) -> Result<(), Error> {
    let conn = incoming.await?;
    let mut h3 = h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn)).await?;
    while let Some(resolver) = h3.accept().await? {
        let backends = backends.clone();
        // Boxed before it is spawned: the future (h3's request resolution in it) is moved
        // whole several times on its way into a task, a pointer is cheaper to move.
        tokio::spawn(Box::pin(async move {
            let result = async {
                let (req, mut stream) = resolver.resolve_request().await?;
                let (resp, body) = to_backend(&req, backend, &backends).await?;
                stream.send_response(resp).await?;
                stream.send_data_and_finish(body).await?;
                Ok::<_, Error>(())
            };
            if let Err(e) = result.await {
                eprintln!("floor b: request failed: {e}");
            }
        }));
    }
    Ok(())
}

async fn h2_connection(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    backend: SocketAddr,
    backends: Backends,
) -> Result<(), Error> {
    let tls = acceptor.accept(stream).await?;
    let mut h2 = h2::server::handshake(tls).await?;
    while let Some(accepted) = h2.accept().await {
        let (req, mut respond) = accepted?;
        let backends = backends.clone();
        tokio::spawn(Box::pin(async move {
            let result = async {
                let (resp, body) = to_backend(&req, backend, &backends).await?;
                let mut send = respond.send_response(resp, false)?;
                send.send_data(body, true)?;
                Ok::<_, Error>(())
            };
            if let Err(e) = result.await {
                eprintln!("floor b: request failed: {e}");
            }
        }));
    }
    Ok(())
}

/// The backend's answer to `req` on a pooled keep-alive connection: its head and its body.
async fn to_backend<B>(
    req: &Request<B>,
    backend: SocketAddr,
    backends: &Backends,
) -> Result<(Response<()>, Bytes), Error> {
    let pooled = backends.lock().expect("not poisoned").pop();
    let (mut conn, mut buf) = match pooled {
        Some(c) => c,
        None => {
            let c = TcpStream::connect(backend).await?;
            let _ = c.set_nodelay(true);
            (c, BytesMut::with_capacity(8192))
        }
    };
    let mut out = Vec::with_capacity(512);
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    write_head(
        &mut out,
        req.method().as_str().as_bytes(),
        target,
        "HTTP/1.1",
    );
    if let Some(authority) = req.uri().authority() {
        put_field(&mut out, b"host", authority.as_str().as_bytes());
    }
    for (name, value) in req.headers() {
        put_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    conn.write_all(&out).await?;
    let (resp, len) = loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut parsed = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(head) = parsed.parse(&buf)? {
            let mut resp = Response::builder()
                .status(parsed.code.ok_or("no status")?)
                .body(())?;
            let mut len = None;
            let headers = resp.headers_mut();
            headers.reserve(parsed.headers.len());
            for f in parsed.headers.iter() {
                let name = HeaderName::from_bytes(f.name.as_bytes())?;
                if name == http::header::CONTENT_LENGTH {
                    len = Some(std::str::from_utf8(f.value)?.parse::<usize>()?);
                }
                if !is_hop_by_hop(&name) {
                    headers.append(name, HeaderValue::from_bytes(f.value)?);
                }
            }
            buf.advance(head);
            break (
                resp,
                len.ok_or("floor takes responses with a Content-Length only")?,
            );
        }
        if conn.read_buf(&mut buf).await? == 0 {
            return Err("backend closed".into());
        }
    };
    while buf.len() < len {
        if conn.read_buf(&mut buf).await? == 0 {
            return Err("backend closed mid-body".into());
        }
    }
    let body = buf.split_to(len).freeze();
    backends.lock().expect("not poisoned").push((conn, buf));
    Ok((resp, body))
}

// ---- HTTP/1.1 writing ----

fn write_head(out: &mut Vec<u8>, first: &[u8], second: &str, third: &str) {
    out.extend_from_slice(first);
    if !first.ends_with(b" ") {
        out.push(b' ');
    }
    out.extend_from_slice(second.as_bytes());
    out.push(b' ');
    out.extend_from_slice(third.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    use http::header::{CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE};
    [CONNECTION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE].contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}
