//! Failures end in fast, typed sidecar responses: status, `quicar-error` kind, one-line body.

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_is_404() {
    let pair = Pair::start().await;
    let got = get(pair.out(), "nowhere", "/").await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    assert_eq!(got.error_kind(), Some("unknown-service"));
    let body = String::from_utf8_lossy(&got.body);
    assert!(
        body.contains("nowhere") && body.ends_with('\n') && body.lines().count() == 1,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_with_a_reason() {
    let pair = Pair::start().await;
    // No Host and no absolute URI: nothing to route by.
    let mut stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(
        resp.contains("quicar-error: bad-request") && resp.contains("missing Host"),
        "{resp}"
    );
    // Two Host headers are ambiguous.
    let got = send(
        pair.out(),
        Request::get("/")
            .header("host", "hello")
            .header("host", "other")
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert_eq!(got.error_kind(), Some("bad-request"));
    // A Host that cannot be a service name.
    let got = get(pair.out(), "bad!host", "/").await;
    assert_eq!(got.error_kind(), Some("bad-request"));
    // Smuggling shape: two different Content-Lengths. It is refused before routing; the
    // connection is answered 400 and closed, and nothing reaches the app.
    let before = pair.upstream.count();
    let mut stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: hello\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde")
        .await
        .unwrap();
    let mut resp = String::new();
    let _ = stream.read_to_string(&mut resp).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(
        resp.contains("quicar-error: bad-request") && resp.contains("conflicting Content-Length"),
        "{resp}"
    );
    assert_eq!(pair.upstream.count(), before);
    // Bad header bytes.
    let mut stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: hello\r\nBad Header: x\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    let _ = stream.read_to_string(&mut resp).await;
    assert!(
        resp.starts_with("HTTP/1.1 400") && resp.contains("quicar-error: bad-request"),
        "{resp}"
    );
    // A header section over the limit: 431 with its kind and the limit named.
    let mut stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
    let big = format!(
        "GET / HTTP/1.1\r\nHost: hello\r\nConnection: close\r\nx-big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = stream.write_all(big.as_bytes()).await;
    let mut resp = String::new();
    let _ = stream.read_to_string(&mut resp).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");
    assert!(
        resp.contains("quicar-error: headers-too-large") && resp.contains("max_header_bytes"),
        "{resp}"
    );
    // A keep-alive connection that served requests still gets the proxied responses as they are.
    let got = get(pair.out(), "hello", "/status/400").await;
    assert_eq!(got.status, StatusCode::BAD_REQUEST);
    assert!(
        got.error_kind().is_none(),
        "an app's own 400 is not rewritten"
    );
    assert_eq!(pair.upstream.count(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_that_could_be_read_two_ways_is_refused_with_its_reason() {
    let pair = Pair::start().await;
    let before = pair.upstream.count();
    let many_fields = format!(
        "GET / HTTP/1.1\r\nHost: hello\r\n{}\r\n",
        "x-a: 1\r\n".repeat(101)
    );
    let cases: [(&str, &str, &str); 8] = [
        (
            "POST /echo HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "400",
            "read two ways",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "501",
            "only chunked",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "501",
            "only chunked",
        ),
        (
            "POST /echo HTTP/1.0\r\nHost: hello\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "400",
            "HTTP/1.0",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: hello\r\nContent-Length: 5, 6\r\n\r\nhello",
            "400",
            "conflicting Content-Length",
        ),
        (
            "POST /echo HTTP/1.1\r\nHost: hello\r\nContent-Length: +5\r\n\r\nhello",
            "400",
            "invalid Content-Length",
        ),
        (&many_fields, "431", "over 100 header fields"),
        ("GET / HTTP/2.0\r\nHost: hello\r\n\r\n", "400", "not HTTP/1.1"),
    ];
    for (request, status, reason) in cases {
        let answer = raw(pair.out(), request.as_bytes(), false).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request:?}: {answer}"
        );
        assert!(
            answer.contains("quicar-error: ")
                && answer.contains(reason)
                && answer.contains("connection: close"),
            "{request:?}: {answer}"
        );
    }
    assert_eq!(
        pair.upstream.count(),
        before,
        "a refused request reached the app"
    );
    // The same listener still serves.
    assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_head_gets_408_and_an_idle_connection_is_closed() {
    let pair = Pair::with_outbound("header_read_timeout = \"500ms\"").await;
    let (client, upstream) = (&pair.client, &pair.upstream);
    // Half a head: 408 with its kind and the setting named, then the close.
    let mut s = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: hel").await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut resp),
    )
    .await
    .expect("the connection was closed")
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
    assert!(
        resp.contains("quicar-error: timeout") && resp.contains("outbound.header_read_timeout"),
        "{resp}"
    );
    // After a response, a connection that sends nothing more is closed without a word.
    let mut s = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut resp),
    )
    .await
    .expect("the idle connection was closed")
    .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    assert_eq!(resp.matches("HTTP/1.1 ").count(), 1, "{resp}");
    assert_eq!(upstream.count(), 1);
}

/// Sends `GET path` on a kept connection and reads its whole response (its head and body may
/// come in separate reads: by its length), each read within 10 s; panics if the connection
/// closes first.
async fn get_on(s: &mut tokio::net::TcpStream, path: &str) -> String {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: hello\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (mut buf, mut resp) = (vec![0u8; 16384], Vec::new());
    while !whole_response(&resp) {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("no response")
            .unwrap();
        assert!(
            n > 0,
            "{path}: closed after {:?}",
            String::from_utf8_lossy(&resp)
        );
        resp.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&resp).into_owned()
}

/// The head timeout counts from each request, not from the connection's first: one
/// connection that carries a request every 300 ms for 2.4 s under a 1 s timeout serves them
/// all (the connection keeps one timer, moved on only when it fires), then closes when idle.
/// (700 ms of room for a busy machine's late wake-ups.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_timeout_counts_from_each_request_on_a_kept_connection() {
    let pair = Pair::with_outbound("header_read_timeout = \"1s\"").await;
    let mut s = tokio::net::TcpStream::connect(pair.client.outbound)
        .await
        .unwrap();
    let mut buf = vec![0u8; 16384];
    for i in 0..8 {
        let resp = get_on(&mut s, &format!("/{i}")).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "request {i}: {resp}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(pair.upstream.count(), 8);
    // Then nothing more: closed without a word.
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the idle connection was kept")
        .unwrap();
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
}

/// A shutdown closes an app connection kept idle between requests at once (the connection's
/// one wait for the shutdown, made before its first request, still hears it after several),
/// not when its 60 s head timeout or the 60 s drain would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_closes_a_kept_idle_app_connection_at_once() {
    init_tracing();
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let server = sidecar(&pki, &server_toml(&pki, upstream.addr, "127.0.0.1:0", "")).await;
    let toml = client_toml(&pki, &[server.inbound], "")
        .replace("drain_timeout = \"2s\"", "drain_timeout = \"60s\"")
        .replace(
            "[outbound]\nlisten = \"127.0.0.1:0\"",
            "[outbound]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"60s\"",
        );
    let client = sidecar(&pki, &toml).await;
    let mut s = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    let mut buf = vec![0u8; 16384];
    for i in 0..3 {
        let resp = get_on(&mut s, &format!("/{i}")).await;
        assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    }
    tokio::time::timeout(std::time::Duration::from_secs(20), client.shutdown())
        .await
        .expect("the shutdown waited for the idle app connection");
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the idle connection stayed open")
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    server.shutdown().await;
}

/// Whether `bytes` hold a whole HTTP/1.1 response with a `content-length`.
fn whole_response(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .expect("a response with a length");
    bytes.len() >= end + 4 + length
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_that_reads_one_way_is_served_however_it_is_spelled() {
    // What the refusals must not catch: equal lengths given twice or as a list, and `chunked`
    // in any case, are one reading of the body.
    let pair = Pair::start().await;
    for request in [
        "POST /echo HTTP/1.1\r\nHost: hello\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        "POST /echo HTTP/1.1\r\nHost: hello\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello",
        "POST /echo HTTP/1.1\r\nHost: hello\r\nTransfer-Encoding: CHUNKED\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ] {
        let answer = raw(pair.out(), request.as_bytes(), false).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{request:?}: {answer}");
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert!(body.contains("hello"), "{request:?}: {answer}");
        assert!(!answer.contains("quicar-error"), "{request:?}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_outlasts_the_head_timeout_is_not_cut() {
    // `header_read_timeout` bounds the wait for a head, never the request that follows it.
    let pair = Pair::with_outbound("header_read_timeout = \"300ms\"").await;
    let client = &pair.client;
    let got = get(client.outbound, "hello", "/slow/1000").await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(&got.body[..], b"slow");
    assert!(got.error_kind().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_10_clients_get_close_delimited_or_kept_alive_responses() {
    let pair = Pair::start().await;
    // No keep-alive asked, a body of unknown length: no chunked coding (HTTP/1.0 has none),
    // the body ends with the connection.
    let answer = raw(
        pair.out(),
        b"GET /chunked/100 HTTP/1.0\r\nHost: hello\r\n\r\n",
        false,
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(
        head.contains("connection: close") && !head.contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(body, String::from_utf8_lossy(&pattern(100)), "{answer}");
    // Keep-alive asked: both pipelined requests are answered on one connection, in order,
    // and the one without keep-alive ends it.
    let answer = raw(
        pair.out(),
        b"GET /bytes/10 HTTP/1.0\r\nHost: hello\r\nConnection: keep-alive\r\n\r\nGET /bytes/20 HTTP/1.0\r\nHost: hello\r\n\r\n",
        false,
    )
    .await;
    let heads: Vec<&str> = answer.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(heads.len(), 2, "{answer}");
    assert!(
        heads[0].contains("connection: keep-alive") && heads[0].contains("content-length: 10"),
        "{answer}"
    );
    assert!(
        heads[1].contains("connection: close") && heads[1].contains("content-length: 20"),
        "{answer}"
    );
    // The idle timeout is announced on the response after which the connection stays open,
    // not on the one that closes it.
    assert!(heads[0].contains("keep-alive: timeout="), "{answer}");
    assert!(!heads[1].contains("keep-alive"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_hangs_up_cancels_its_request() {
    init_tracing();
    let pki = Pki::new();
    // A far app that reads the request and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let far = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        while s.read(&mut buf).await.unwrap_or(0) > 0 {}
    });
    let server = sidecar(
        &pki,
        &server_toml(&pki, app, "127.0.0.1:0", "timeout = \"60s\""),
    )
    .await;
    let client = sidecar(
        &pki,
        &client_toml(&pki, &[server.inbound], "timeout = \"60s\""),
    )
    .await;
    // The requests to the endpoint the caller's sidecar has in flight.
    let outstanding = || async {
        let got = get(client.admin, "admin", "/endpoints").await;
        let v: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
        v[0]["endpoints"][0]["outstanding"].as_u64().unwrap()
    };
    let wait_for = |want: u64| async move {
        for _ in 0..200 {
            if outstanding().await == want {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        false
    };
    let mut s = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    s.write_all(b"GET /hang HTTP/1.1\r\nHost: hello\r\n\r\n")
        .await
        .unwrap();
    assert!(wait_for(1).await, "the request never went out");
    drop(s);
    // Long before the 60 s deadline, the request is dropped, and its endpoint slot with it.
    assert!(wait_for(0).await, "the request outlived its caller");
    far.abort();
}

crate::over_transports! {
    async fn service_unknown_to_the_peer_is_404_from_the_peer(t) {
        init_tracing();
        let pki = Pki::new();
        let upstream = Upstream::start().await;
        let server = sidecar(&pki, &server_toml(&pki, upstream.addr, "127.0.0.1:0", "")).await;
        // The client knows a service `other` at the server, which does not front it.
        let toml = client_toml(&pki, &[server.inbound], &format!("transport = \"{t}\""))
            + &format!(
                "[[service]]\nname = \"other\"\ntransport = \"{t}\"\nendpoints = [{{ address = \"{}\", identity = \"spiffe://quicar.local/hello\" }}]\n",
                server.inbound
            );
        let client = sidecar(&pki, &toml).await;
        let got = get(client.outbound, "other", "/").await;
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        assert_eq!(got.error_kind(), Some("unknown-service"));
        assert!(String::from_utf8_lossy(&got.body).contains("no local service `other`"));
    }

    async fn local_app_down_is_502_connect_failed(t) {
        init_tracing();
        let pki = Pki::new();
        // A port that was just free: nothing listens there.
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let server = sidecar(&pki, &server_toml(&pki, dead, "127.0.0.1:0", "")).await;
        let client = sidecar(&pki, &client_toml(&pki, &[server.inbound], &format!("transport = \"{t}\""))).await;
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.error_kind(), Some("connect-failed"));
        assert!(String::from_utf8_lossy(&got.body).contains(&dead.to_string()));
    }

    async fn peer_sidecar_down_fails_fast_with_502(t) {
        init_tracing();
        let pki = Pki::new();
        let dead = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = sidecar(&pki, &client_toml(&pki, &[dead], &format!("transport = \"{t}\""))).await;
        let started = std::time::Instant::now();
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.error_kind(), Some("connect-failed"));
        assert!(String::from_utf8_lossy(&got.body).contains(&dead.to_string()));
        // Bounded by the configured connect timeout (500ms), not a hang; logged for the reader.
        eprintln!("peer-down answer after {:?}", started.elapsed());
    }

    async fn slow_app_past_the_service_timeout_is_504(t) {
        let pair = Pair::over_with(t, "timeout = \"300ms\"", "").await;
        let got = get(pair.out(), "hello", "/slow/3000").await;
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(got.error_kind(), Some("timeout"));
    }
}

/// A peer's request whose `Content-Length` is not one valid length is malformed (RFC 9110
/// §8.6, RFC 9114 §4.1.2) and never reaches the app: HTTP/3 gets `400 bad-request` naming the
/// field, HTTP/2 a stream reset (h2's own check). quicar's HTTP/3 side used to take such a
/// length as none and forward the request with a body it framed itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_request_with_an_invalid_content_length_never_reaches_the_app() {
    let pair = Pair::start().await;
    let (pki, inbound) = (&pair.pki, pair.server.inbound);
    let bad: [&[&str]; 4] = [&["1, 2"], &["+1"], &["one"], &["1", "2"]];
    for lengths in bad {
        let mut req = Request::post("https://hello/bad-length");
        for &length in lengths {
            req = req.header("content-length", length);
        }
        let req = req.body(()).unwrap();
        let body = Bytes::from_static(b"x");
        let answer = async {
            // HTTP/3.
            let (_endpoint, mut send, driving) = h3_client(pki, inbound).await;
            let mut stream = send.send_request(req.clone()).await.unwrap();
            // The sidecar may answer before it reads the body.
            let _ = stream.send_data(body.clone()).await;
            let _ = stream.finish().await;
            let resp = stream.recv_response().await.unwrap();
            let mut text = Vec::new();
            while let Some(mut chunk) = stream.recv_data().await.unwrap() {
                use bytes::Buf;
                text.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
            }
            driving.abort();
            // HTTP/2.
            let send = h2_caller(pki, inbound).await;
            let mut send = send.ready().await.unwrap();
            let (h2_resp, mut h2_stream) = send.send_request(req, false).unwrap();
            let _ = h2_stream.send_data(body, true);
            (
                resp,
                String::from_utf8_lossy(&text).into_owned(),
                h2_resp.await,
            )
        };
        let (resp, text, h2) = tokio::time::timeout(std::time::Duration::from_secs(10), answer)
            .await
            .expect("an answer, not a hang");
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{lengths:?}");
        let kind = resp.headers().get("quicar-error").unwrap();
        assert_eq!(kind, "bad-request", "{lengths:?}");
        assert!(text.contains("Content-Length"), "{lengths:?}: {text}");
        let e = h2.expect_err("HTTP/2 refuses it");
        assert_eq!(
            e.reason(),
            Some(h2::Reason::PROTOCOL_ERROR),
            "{lengths:?}: {e}"
        );
    }
    assert_eq!(
        pair.upstream.count(),
        0,
        "a malformed request reached the app"
    );
    // The same connections still serve a well-formed request.
    assert_eq!(get(pair.out(), "hello", "/ok").await.status, StatusCode::OK);
}
