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
    // Smuggling shape: both Content-Length and Transfer-Encoding. hyper refuses it before
    // routing; the connection is answered 400 and closed, and nothing reaches the app.
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
        resp.contains("quicar-error: bad-request") && resp.contains("not valid HTTP/1.1"),
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
