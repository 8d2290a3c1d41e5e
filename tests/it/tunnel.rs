//! The tunnel end to end: round trips byte for byte, framing, multiplexing, routing forms,
//! header translation, identity headers, reconnects.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

crate::over_transports! {
    async fn round_trips_byte_for_byte_in_every_size_and_framing(t) {
        let pair = Pair::over(t).await;
        for size in [0usize, 1024, 10 * 1024 * 1024] {
            for sized in [true, false] {
                // Request bodies: POST and PUT echo through both hops and back.
                for method in [Method::POST, Method::PUT] {
                    let data = pattern(size);
                    let mut req = Request::builder()
                        .method(method.clone())
                        .uri("/echo")
                        .header("host", "hello");
                    if sized {
                        req = req.header("content-length", size);
                    }
                    let req = req.body(body(data.clone(), sized)).unwrap();
                    let got = send(pair.out(), req).await;
                    assert_eq!(got.status, StatusCode::OK, "{method} {size} sized={sized}");
                assert_eq!(values(&got.headers, "quicar-transport"), vec![t]);
                    assert_eq!(got.body.len(), size, "{method} {size} sized={sized}");
                    assert!(
                        got.body == data,
                        "{method} {size} sized={sized}: body differs"
                    );
                    let seen = pair.upstream.last();
                    assert_eq!(seen.method, method.as_str());
                    assert_eq!(seen.body_len, size);
                    // Framing survives the HTTP/3 hop: sized stays sized, chunked stays chunked
                    // (an empty chunked body arrives as no body at all).
                    assert_eq!(
                        seen.headers.contains_key("content-length"),
                        sized,
                        "{method} {size} sized={sized}: {:?}",
                        seen.headers
                    );
                    assert_eq!(
                        seen.headers.contains_key("transfer-encoding"),
                        !sized && size > 0,
                        "{method} {size} sized={sized}: {:?}",
                        seen.headers
                    );
                    assert_eq!(got.headers.contains_key("content-length"), sized);
                }
                // Response bodies: GET and HEAD of sized and chunked downloads.
                let path = format!("/{}/{size}", if sized { "bytes" } else { "chunked" });
                let got = get(pair.out(), "hello", &path).await;
                assert_eq!(got.status, StatusCode::OK);
                assert!(got.body == pattern(size), "GET {path}: body differs");
                assert_eq!(
                    got.headers.contains_key("content-length"),
                    sized,
                    "GET {path}"
                );
                let head = send(
                    pair.out(),
                    Request::head(&path)
                        .header("host", "hello")
                        .body(full(Bytes::new()))
                        .unwrap(),
                )
                .await;
                assert_eq!(head.status, StatusCode::OK);
                assert!(head.body.is_empty(), "HEAD {path} carried a body");
                // Whatever length the app declared for HEAD reaches the caller unchanged.
                let direct = send(
                    pair.upstream.addr,
                    Request::head(&path)
                        .header("host", "hello")
                        .body(full(Bytes::new()))
                        .unwrap(),
                )
                .await;
                assert_eq!(
                    values(&head.headers, "content-length"),
                    values(&direct.headers, "content-length"),
                    "HEAD {path}"
                );
                if sized && size > 0 {
                    assert_eq!(
                        values(&head.headers, "content-length"),
                        vec![size.to_string()]
                    );
                }
                assert_eq!(pair.upstream.last().method, "HEAD");
            }
        }
        assert_eq!(pair.client.connections_opened(wire(t)), 1);
    }

    async fn five_hundred_concurrent_requests_share_one_connection(t) {
        let pair = Pair::over(t).await;
        let out = pair.out();
        let tasks: Vec<_> = (0..500)
            .map(|i| {
                tokio::spawn(async move {
                    let data = format!("request {i}").into_bytes();
                    let req = Request::post("/echo")
                        .header("host", "hello")
                        .body(full(data.clone()))
                        .unwrap();
                    let got = send(out, req).await;
                    (got.status, got.body == data)
                })
            })
            .collect();
        for t in tasks {
            let (status, same) = t.await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert!(same);
        }
        assert_eq!(pair.upstream.count(), 500);
        assert_eq!(pair.client.connections_opened(wire(t)), 1);
        assert_eq!(pair.client.connections_active(wire(t)), 1);
    }

    async fn routes_by_host_and_by_absolute_uri(t) {
        let pair = Pair::over(t).await;
        // Origin form; a port in Host is ignored for lookup and the Host reaches the app as sent.
        let got = get(pair.out(), "Hello:8080", "/a?x=1").await;
        assert_eq!(got.status, StatusCode::OK);
        let seen = pair.upstream.last();
        assert_eq!(seen.path, "/a?x=1");
        assert_eq!(values(&seen.headers, "host"), vec!["Hello:8080"]);
        // Absolute form, as an app with http_proxy set sends it.
        let mut stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
        stream
            .write_all(b"GET http://hello/b?y=2 HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        stream.read_to_string(&mut resp).await.unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        let seen = pair.upstream.last();
        assert_eq!(seen.path, "/b?y=2");
        assert_eq!(values(&seen.headers, "host"), vec!["hello"]);
    }

    async fn keep_alive_and_pipelined_requests_answer_in_order(t) {
        let pair = Pair::over(t).await;
        let mut stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
        stream
            .write_all(
                b"GET /bytes/3 HTTP/1.1\r\nHost: hello\r\n\r\n\
                  GET /chunked/5 HTTP/1.1\r\nHost: hello\r\n\r\n\
                  GET /bytes/7 HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let mut resp = Vec::new();
        stream.read_to_end(&mut resp).await.unwrap();
        let text = String::from_utf8_lossy(&resp);
        let starts: Vec<usize> = text
            .match_indices("HTTP/1.1 200 OK")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(starts.len(), 3, "{text}");
        // In order: content-length 3, then chunked, then content-length 7.
        assert!(
            text[starts[0]..starts[1]].contains("content-length: 3"),
            "{text}"
        );
        assert!(
            text[starts[1]..starts[2]].contains("transfer-encoding: chunked"),
            "{text}"
        );
        assert!(text[starts[2]..].contains("content-length: 7"), "{text}");
    }

    async fn a_request_pipelined_behind_a_post_does_not_cancel_it(t) {
        // Once a POST's body is read whole, the connection watches its read side for the app
        // hanging up: the next request arriving there is kept for later, not taken for one.
        let pair = Pair::over(t).await;
        let mut stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
        stream
            .write_all(b"POST /slow/300 HTTP/1.1\r\nHost: hello\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        stream
            .write_all(b"GET /bytes/7 HTTP/1.1\r\nHost: hello\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_end(&mut resp),
        )
        .await
        .expect("not answered")
        .unwrap();
        let text = String::from_utf8_lossy(&resp);
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
        assert!(text.ends_with(&String::from_utf8_lossy(&pattern(7)).to_string()), "{text}");
        assert_eq!(pair.upstream.count_of("/slow"), 1);
    }

    async fn headers_are_preserved_and_hop_by_hop_ones_dropped(t) {
        let pair = Pair::over(t).await;
        let req = Request::get("/headers")
            .header("host", "hello")
            .header("X-Mixed-Case", "Value Kept")
            .header("x-multi", "a")
            .header("x-multi", "b")
            .header("connection", "x-hop-req")
            .header("x-hop-req", "must not pass")
            .header("keep-alive", "timeout=5")
            .header("te", "gzip")
            .header("proxy-authorization", "Basic eDp5")
            .header("upgrade", "websocket")
            // Old clients still send it; over the TCP wire, h2 refuses a message that carries
            // it, so the strip must take it first (the app's header never fails its request).
            .header("proxy-connection", "keep-alive")
            .body(full(Bytes::new()))
            .unwrap();
        let got = send(pair.out(), req).await;
        assert_eq!(got.status, StatusCode::OK);
        let seen = pair.upstream.last();
        assert_eq!(values(&seen.headers, "x-mixed-case"), vec!["Value Kept"]);
        assert_eq!(values(&seen.headers, "x-multi"), vec!["a", "b"]);
        for gone in ["x-hop-req", "keep-alive", "proxy-authorization", "upgrade", "proxy-connection"] {
            assert!(
                !seen.headers.contains_key(gone),
                "{gone} reached the app: {:?}",
                seen.headers
            );
        }
        // The caller's TE is hop-by-hop; the far sidecar's own `TE: trailers` (it takes
        // response trailers and carries them on) is all the app sees, named in `Connection` as
        // RFC 9110 §10.1.4 requires of a sender of TE (the caller's `Connection` is gone).
        assert_eq!(values(&seen.headers, "te"), vec!["trailers"]);
        assert_eq!(values(&seen.headers, "connection"), vec!["te"]);
        // Host names the service, once (the far sidecar writes it from the authority).
        assert_eq!(values(&seen.headers, "host"), vec!["hello"]);
        assert_eq!(values(&got.headers, "x-multi"), vec!["one", "two"]);
        assert_eq!(values(&got.headers, "mixed-case-header"), vec!["kept"]);
        assert!(!got.headers.contains_key("x-hop-resp"), "{:?}", got.headers);
    }

    async fn forged_identity_is_dropped_and_the_real_one_arrives(t) {
        let pair = Pair::over(t).await;
        let req = Request::get("/")
            .header("host", "hello")
            .header("quicar-peer-identity", "spiffe://quicar.local/admin")
            .header("Quicar-Anything", "forged")
            .body(full(Bytes::new()))
            .unwrap();
        let got = send(pair.out(), req).await;
        assert_eq!(got.status, StatusCode::OK);
        let seen = pair.upstream.last();
        assert_eq!(
            values(&seen.headers, "quicar-peer-identity"),
            vec!["spiffe://quicar.local/web"]
        );
        assert!(!seen.headers.contains_key("quicar-anything"));
    }

    async fn bodyless_statuses_pass_without_a_body(t) {
        let pair = Pair::over(t).await;
        for status in [204u16, 304, 404, 500] {
            let got = get(pair.out(), "hello", &format!("/status/{status}")).await;
            assert_eq!(got.status.as_u16(), status);
            assert!(got.body.is_empty());
            assert!(
                got.error_kind().is_none(),
                "an app status is not a sidecar error"
            );
        }
    }

    async fn expect_100_continue_is_answered_and_the_body_arrives(t) {
        let pair = Pair::over(t).await;
        let mut stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: hello\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap();
        let interim = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(interim.starts_with("HTTP/1.1 100 Continue"), "{interim}");
        stream.write_all(b"hello").await.unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).await.unwrap();
        assert!(rest.contains("200 OK") && rest.ends_with("hello"), "{rest}");
    }

    async fn a_restarted_peer_sidecar_is_reconnected_to(t) {
        let pair = Pair::over(t).await;
        assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
        let inbound = pair.server.inbound;
        let Pair {
            pki,
            client,
            server,
            upstream,
        } = pair;
        server.shutdown().await;
        // Same UDP port, as a restarted process on the same node would have. The old socket is
        // released by quinn's driver task just after shutdown returns: retry the bind briefly.
        let toml = server_toml(&pki, upstream.addr, &inbound.to_string(), "");
        let mut server = None;
        for _ in 0..100 {
            let config = quicar::config::Config::parse(&toml, "<test>", pki.path()).unwrap();
            match quicar::app::build(config).await {
                Ok(s) => {
                    server = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
        let server = server.expect("rebound the inbound port");
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::OK, "{:?}", got);
        assert_eq!(client.connections_opened(wire(t)), 2);
        server.shutdown().await;
        client.shutdown().await;
    }

    async fn idle_connections_are_closed_and_reopened_on_demand(t) {
        let pair = Pair::over_with(t, "[quic]\nidle_timeout = \"200ms\"", "").await;
        assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
        assert_eq!(pair.client.connections_active(wire(t)), 1);
        let mut closed = false;
        for _ in 0..200 {
            if pair.client.connections_active(wire(t)) == 0 {
                closed = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(closed, "the idle connection was never closed");
        assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
        assert_eq!(pair.client.connections_opened(wire(t)), 2);
    }

    async fn requests_outlasting_the_idle_timeout_keep_their_connection(t) {
        // What must not trigger the idle reaper: a connection whose requests take longer than
        // the idle timeout (five at once, each 2 s against 200 ms) is not idle.
        let pair = Pair::over_with(t, "[quic]\nidle_timeout = \"200ms\"", "").await;
        let out = pair.out();
        let calls: Vec<_> = (0..5)
            .map(|_| tokio::spawn(async move { get(out, "hello", "/slow/2000").await }))
            .collect();
        while pair.upstream.count_of("/slow") < 5 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // Well past the idle timeout, with the requests still at the app.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert_eq!(pair.client.connections_active(wire(t)), 1, "closed while in use");
        for c in calls {
            assert_eq!(c.await.unwrap().status, StatusCode::OK);
        }
        assert_eq!(pair.client.connections_opened(wire(t)), 1);
    }

    async fn a_stopping_peer_finishes_in_flight_requests_and_refuses_new_ones(t) {
        let pair = Pair::over(t).await;
        assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
        let out = pair.out();
        let slow = tokio::spawn(async move { get(out, "hello", "/slow/1000").await });
        // Let the slow request reach the app before the stop begins.
        for _ in 0..200 {
            if pair
                .upstream
                .seen
                .lock()
                .unwrap()
                .iter()
                .any(|s| s.path == "/slow/1000")
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let Pair {
            client,
            server,
            upstream,
            ..
        } = pair;
        server.shutdown().await;
        let got = slow.await.unwrap();
        assert_eq!(
            got.status,
            StatusCode::OK,
            "in-flight request cut by shutdown: {got:?}"
        );
        assert_eq!(&got.body[..], b"slow");
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY);
        assert_eq!(got.error_kind(), Some("connect-failed"));
        drop(upstream);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tcp_when_udp_is_closed_and_returns_to_quic() {
    init_tracing();
    let pki = Pki::new();
    let app = Upstream::start().await;
    // A peer that does not listen on UDP: to QUIC, its port is closed (as where UDP is blocked).
    let tcp_only = server_toml(&pki, app.addr, "127.0.0.1:0", "").replacen(
        "[inbound]\nlisten = \"127.0.0.1:0\"\n",
        "[inbound]\nlisten = \"127.0.0.1:0\"\nquic = false\n",
        1,
    );
    let server = sidecar(&pki, &tcp_only).await;
    let port = server.inbound;
    let client = sidecar(
        &pki,
        &client_toml(
            &pki,
            &[port],
            "transport = \"auto\"\n[quic]\nfallback_retry = \"200ms\"",
        ),
    )
    .await;
    for _ in 0..3 {
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(values(&got.headers, "quicar-transport"), vec!["tcp"]);
    }
    let eps: serde_json::Value =
        serde_json::from_slice(&get(client.admin, "admin", "/endpoints").await.body).unwrap();
    assert_eq!(eps[0]["transport"], "auto");
    assert_eq!(eps[0]["endpoints"][0]["transport"], "tcp");

    // UDP opens: the same peer restarted with QUIC on. The background retry finds it.
    server.shutdown().await;
    let both = server_toml(&pki, app.addr, &port.to_string(), "");
    let mut restarted = None;
    for _ in 0..100 {
        let config = quicar::config::Config::parse(&both, "<test>", pki.path()).unwrap();
        if let Ok(s) = quicar::app::build(config).await {
            restarted = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _restarted = restarted.expect("rebound the peer with QUIC");
    let mut back = false;
    for _ in 0..200 {
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        if values(&got.headers, "quicar-transport") == vec!["quic"] {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "auto never returned to QUIC");
    assert!(
        client.connections_opened(Transport::Quic) >= 1
            && client.connections_opened(Transport::Tcp) >= 1
    );
}

// Field sections longer than one frame (HTTP/2's default 16 KiB): over TCP the sending sidecar
// splits each into HEADERS and CONTINUATION frames and the receiving one joins them, both ways
// (the vendored h2 keeps a HEADERS frame's field block in a box).
crate::over_transports! {
    async fn a_field_section_longer_than_a_frame_crosses_both_ways(t) {
        let pair = Pair::over(t).await;
        let asked = "abcdefghij".repeat(2_000);
        let answered = "klmnopqrst".repeat(2_000);
        let got = send(
            pair.out(),
            Request::get(format!("/c/long?hdr=x-answered:{answered}"))
                .header("host", "hello")
                .header("x-asked", &asked)
                .body(full(Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "{:?}", got.headers);
        let seen = pair.upstream.last();
        assert_eq!(seen.headers.get("x-asked").map(|v| v.len()), Some(asked.len()));
        assert_eq!(seen.headers["x-asked"], asked.as_str());
        assert_eq!(got.headers.get("x-answered").map(|v| v.len()), Some(answered.len()));
        assert_eq!(got.headers["x-answered"], answered.as_str());
    }
}

crate::over_transports! {
    async fn trailers_pass_both_ways(t) {
        use http_body_util::BodyExt;
        let pair = Pair::over(t).await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-req-trailer", http::HeaderValue::from_static("checksum-1"));
        let frames: Vec<Result<hyper::body::Frame<bytes::Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
            Ok(hyper::body::Frame::data(bytes::Bytes::from_static(b"payload"))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let req = http::Request::post("/trailers")
            .header("host", "hello")
            .header("te", "trailers")
            .header("trailer", "x-req-trailer")
            .body(body)
            .unwrap();
        let stream = tokio::net::TcpStream::connect(pair.out()).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::OK);
        let collected = resp.into_body().collect().await.unwrap();
        let got_trailers = collected.trailers().cloned();
        assert_eq!(&collected.to_bytes()[..], b"trailer checksum-1", "request trailer lost");
        assert_eq!(
            got_trailers.and_then(|t| t.get("x-resp-trailer").cloned()),
            Some(http::HeaderValue::from_static("done")),
            "response trailer lost"
        );
    }
}

/// A third-party HTTP/3 caller that sends GOAWAY (its side is going away) with a request in
/// flight: the request is answered in full, and then the sidecar closes the connection, woken
/// by the end of that last request (our h3 counts the requests in progress instead of hearing
/// of each one's end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_goaway_lets_its_request_in_flight_finish_then_the_connection_closes() {
    goaway_with_requests_in_flight(1).await
}

/// The same with 20 requests in flight: the ends before the last must not close the
/// connection, and every response arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_goaway_lets_20_requests_in_flight_finish_then_the_connection_closes() {
    goaway_with_requests_in_flight(20).await
}

async fn goaway_with_requests_in_flight(n: usize) {
    let pair = Pair::start().await;
    let (_endpoint, conn) = h3_caller(&pair.pki, pair.server.inbound).await;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn.clone()))
        .await
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..n {
        let req = Request::get("https://hello/slow/500").body(()).unwrap();
        let mut stream = send.send_request(req).await.unwrap();
        stream.finish().await.unwrap();
        streams.push(stream);
    }
    // Once the requests are at the app, the caller says it is going away, and keeps driving
    // its connection.
    for _ in 0..500 {
        if pair.upstream.count_of("/slow") == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pair.upstream.count_of("/slow"), n);
    let driving = tokio::spawn(async move {
        let _ = driver.shutdown(0).await;
        std::future::poll_fn(|cx| driver.poll_close(cx)).await
    });
    let answers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let resp = stream.recv_response().await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                let mut body = Vec::new();
                while let Some(mut chunk) = stream.recv_data().await.unwrap() {
                    use bytes::Buf;
                    body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
                }
                body
            })
        })
        .collect();
    for answer in answers {
        assert_eq!(answer.await.unwrap(), b"slow");
    }
    // The sidecar closes the connection once its last request is done (bounded only so that
    // a hang fails the test rather than stalling it; keep-alives hold an idle connection
    // open). `send` is still alive: the close is the sidecar's.
    let closed = tokio::time::timeout(Duration::from_secs(20), conn.closed())
        .await
        .expect("the sidecar kept the connection open after the caller's GOAWAY");
    assert!(
        matches!(closed, quinn::ConnectionError::ApplicationClosed(_)),
        "closed by the sidecar: {closed:?}"
    );
    driving.abort();
    drop(send);
}

/// The HTTP/2 wire's sender (vendored h2, whose check for connection-specific fields is ours:
/// one pass over the names present) refuses each field RFC 9113 §8.2.2 forbids, before it
/// sends anything, and passes `TE: trailers` and ordinary fields to the peer. No sidecar
/// request reaches the check with such a field (the hop-by-hop strip runs first), so it is
/// driven here through h2's client on a real connection to h2's server.
#[tokio::test]
async fn the_h2_wire_refuses_connection_specific_fields_and_passes_te_trailers() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut h2 = h2::server::handshake(tcp).await.unwrap();
        let mut seen = Vec::new();
        while let Some(Ok((req, mut respond))) = h2.accept().await {
            seen.push(req.headers().clone());
            let _ = respond.send_response(http::Response::new(()), true);
        }
        seen
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let driving = tokio::spawn(conn);
    let with = |name: &str, value: &str| {
        Request::get("http://hello/")
            .header("x-before", "1")
            .header(name, value)
            .header("x-after", "1")
            .body(())
            .unwrap()
    };
    for (name, value) in [
        ("connection", "close"),
        ("transfer-encoding", "chunked"),
        ("upgrade", "websocket"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("te", "gzip"),
        ("te", "trailers, gzip"),
    ] {
        send = send.ready().await.unwrap();
        let refused = send.send_request(with(name, value), true);
        let err = refused
            .err()
            .unwrap_or_else(|| panic!("{name}: {value} was sent"));
        assert_eq!(
            err.to_string(),
            "user error: malformed headers",
            "{name}: {value}"
        );
    }
    for (name, value) in [("te", "trailers"), ("x-connection", "close")] {
        send = send.ready().await.unwrap();
        let (resp, _) = send.send_request(with(name, value), true).unwrap();
        assert_eq!(resp.await.unwrap().status(), StatusCode::OK, "{name}");
    }
    drop(send);
    let seen = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server saw the connection end")
        .unwrap();
    driving.abort();
    // Only the two allowed requests reached the peer, each whole.
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0]["te"], "trailers");
    assert_eq!(seen[1]["x-connection"], "close");
    assert!(seen
        .iter()
        .all(|h| h.contains_key("x-before") && h.contains_key("x-after")));
}
