//! Interim (1xx) responses from the far app reach the calling app as they are sent, ahead of
//! the final response: raw HTTP/1.1 on both ends, so what crosses each socket is checked byte
//! for byte (hyper's client hides 1xx and hyper's server cannot send them).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::support::*;

/// An app that answers `/hints` with a `103 Early Hints` (plus a `100 Continue`, a forged
/// `quicar-error` and a hop-by-hop field that must not pass), then waits for the test to
/// release it before the final `200`; `/flood` sends 1,000 `103`s first. Keep-alive: requests
/// are answered in turn on each connection.
struct App {
    addr: SocketAddr,
    release: Arc<Semaphore>,
}

impl App {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let release = Arc::new(Semaphore::new(0));
        let r = release.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let release = r.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some(head) = read_head(&mut s, &mut buf).await {
                        let path = head.split(' ').nth(1).unwrap_or("").to_string();
                        if path == "/hint-then-die" {
                            // The app crashes after its hint: no final response.
                            let hint = "HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n";
                            let _ = s.write_all(hint.as_bytes()).await;
                            return;
                        }
                        let interim = if path == "/flood" {
                            "HTTP/1.1 103 Early Hints\r\nlink: </x.css>; rel=preload\r\n\r\n"
                                .repeat(1000)
                        } else {
                            "HTTP/1.1 100 Continue\r\n\r\n\
                             HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\
                             quicar-error: denied\r\nconnection: x-secret\r\nx-secret: 1\r\n\r\n"
                                .to_string()
                        };
                        if s.write_all(interim.as_bytes()).await.is_err() {
                            return;
                        }
                        if path != "/flood" {
                            let Ok(permit) = release.acquire().await else {
                                return;
                            };
                            permit.forget();
                        }
                        let fin = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(fin.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { addr, release }
    }
}

/// Reads one message head (through the blank line) from `s`, keeping what follows in `buf`.
async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("a head within 10 s")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads the 2-byte body of the final response.
async fn read_body(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    String::from_utf8(read_bytes(s, buf, 2).await).unwrap()
}

/// Reads the next `len` bytes (a sized body).
async fn read_bytes(s: &mut TcpStream, buf: &mut Vec<u8>, len: usize) -> Vec<u8> {
    while buf.len() < len {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..len).collect()
}

/// The interim heads skipped (counted), then the first other head.
async fn after_hints(s: &mut TcpStream, buf: &mut Vec<u8>) -> (usize, String) {
    let mut hints = 0;
    loop {
        let head = read_head(s, buf).await.expect("a head");
        if !head.starts_with("HTTP/1.1 103 ") {
            return (hints, head);
        }
        hints += 1;
    }
}

/// The connection still serves a request with its hint and its final response.
async fn still_serves_hints(app: &App, s: &mut TcpStream, buf: &mut Vec<u8>) {
    app.release.add_permits(1);
    s.write_all(b"GET /hints HTTP/1.1\r\nhost: hello\r\n\r\n")
        .await
        .unwrap();
    let hint = read_head(s, buf).await.expect("a head");
    assert!(hint.starts_with("HTTP/1.1 103 "), "{hint}");
    let fin = read_head(s, buf).await.expect("a head");
    assert!(fin.starts_with("HTTP/1.1 200 "), "{fin}");
}

/// `GET /hints`: the cleaned `103` arrives while the app holds its final response, then the
/// `200` (no `100 Continue` or junk before it) and its body.
async fn hint_before_final(app: &App, s: &mut TcpStream, buf: &mut Vec<u8>, round: usize) {
    s.write_all(b"GET /hints HTTP/1.1\r\nhost: hello\r\n\r\n")
        .await
        .unwrap();
    let hint = read_head(s, buf).await.expect("a head");
    let lower = hint.to_ascii_lowercase();
    assert!(lower.starts_with("http/1.1 103 "), "round {round}: {hint}");
    assert!(
        lower.contains("\r\nlink: </style.css>; rel=preload\r\n"),
        "{hint}"
    );
    assert!(
        !lower.contains("quicar-"),
        "forged sidecar field passed: {hint}"
    );
    assert!(
        !lower.contains("x-secret") && !lower.contains("connection:"),
        "{hint}"
    );
    app.release.add_permits(1);
    let fin = read_head(s, buf).await.expect("the final head");
    assert!(
        fin.starts_with("HTTP/1.1 200 "),
        "100 Continue or junk passed: {fin}"
    );
    assert_eq!(read_body(s, buf).await, "ok");
}

async fn pair_over(t: &str, app: &App) -> (Pki, quicar::app::Bound, quicar::app::Bound) {
    init_tracing();
    let pki = Pki::new();
    let server = sidecar(&pki, &server_toml(&pki, app.addr, "127.0.0.1:0", "")).await;
    let client = sidecar(
        &pki,
        &client_toml(&pki, &[server.inbound], &format!("transport = \"{t}\"")),
    )
    .await;
    (pki, client, server)
}

crate::over_transports! {
    async fn an_early_hint_reaches_the_caller_before_the_final_response(t) {
        let app = App::start().await;
        let (_pki, client, _server) = pair_over(t, &app).await;
        let mut s = TcpStream::connect(client.outbound).await.unwrap();
        let mut buf = Vec::new();
        // Twice on one keep-alive connection: each request gets its own hint, in place.
        for round in 0..2 {
            hint_before_final(&app, &mut s, &mut buf, round).await;
        }
        // An HTTP/1.0 client gets no 1xx (RFC 9110 §15.2).
        let mut s = TcpStream::connect(client.outbound).await.unwrap();
        let mut buf = Vec::new();
        app.release.add_permits(1);
        s.write_all(b"GET /hints HTTP/1.0\r\nhost: hello\r\n\r\n")
            .await
            .unwrap();
        let first = read_head(&mut s, &mut buf).await.expect("a head");
        assert!(first.starts_with("HTTP/1.0 200 ") || first.starts_with("HTTP/1.1 200 "), "{first}");
    }

    async fn an_early_hint_reaches_the_caller_through_a_cached_service(t) {
        // A service with a cache fetches through the cache's own path (the interim sink rides
        // there in the request head's extensions, elsewhere beside the request): a miss still
        // gets its hint ahead of the final response.
        let app = App::start().await;
        init_tracing();
        let pki = Pki::new();
        let server = sidecar(&pki, &server_toml(&pki, app.addr, "127.0.0.1:0", "")).await;
        let extra = format!("transport = \"{t}\"\ncache = {{ max_bytes = \"1MiB\" }}");
        let client = sidecar(&pki, &client_toml(&pki, &[server.inbound], &extra)).await;
        assert!(client.cache("hello").is_some(), "the service has no cache");
        let mut s = TcpStream::connect(client.outbound).await.unwrap();
        let mut buf = Vec::new();
        for round in 0..2 {
            hint_before_final(&app, &mut s, &mut buf, round).await;
        }
    }

    async fn an_app_that_dies_after_its_hint_leaves_the_caller_a_clean_error(t) {
        let app = App::start().await;
        let (_pki, client, _server) = pair_over(t, &app).await;
        let mut s = TcpStream::connect(client.outbound).await.unwrap();
        let mut buf = Vec::new();
        s.write_all(b"GET /hint-then-die HTTP/1.1\r\nhost: hello\r\n\r\n")
            .await
            .unwrap();
        // The hint (one per attempt, if the sidecar retried) and then a final error response,
        // well-framed: never a hang, never a hint after the final head.
        let (_, fin) = after_hints(&mut s, &mut buf).await;
        assert!(fin.starts_with("HTTP/1.1 502 "), "{fin}");
        assert!(fin.to_ascii_lowercase().contains("quicar-error: "), "{fin}");
        // The caller's connection is still usable for the next request.
        let len: usize = fin
            .to_ascii_lowercase()
            .split("content-length: ")
            .nth(1)
            .and_then(|v| v.split("\r\n").next())
            .and_then(|v| v.trim().parse().ok())
            .expect("a sized error body");
        read_bytes(&mut s, &mut buf, len).await;
        still_serves_hints(&app, &mut s, &mut buf).await;
    }

    async fn a_flood_of_interim_responses_is_cut_to_a_few(t) {
        let app = App::start().await;
        let (_pki, client, _server) = pair_over(t, &app).await;
        let mut s = TcpStream::connect(client.outbound).await.unwrap();
        let mut buf = Vec::new();
        s.write_all(b"GET /flood HTTP/1.1\r\nhost: hello\r\n\r\n")
            .await
            .unwrap();
        let (hints, head) = after_hints(&mut s, &mut buf).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(read_body(&mut s, &mut buf).await, "ok");
        assert!(
            (1..=quicar_interim_limit()).contains(&hints),
            "{hints} interim responses passed of 1,000"
        );
        // The connection is still usable.
        still_serves_hints(&app, &mut s, &mut buf).await;
    }
}

/// The per-request bound (`interim::MAX_PER_REQUEST`), as documented in README.
fn quicar_interim_limit() -> usize {
    16
}
