//! Faults must not become outages: what must NOT trip the breaker (the app's own errors, a
//! client that gives up, a malformed body), what happens to concurrent requests when the peer
//! is gone (dead, killed, draining), and what a hostile app can send (forged sidecar headers).

use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process;
use crate::support::*;

async fn breaker_state(pair: &Pair) -> String {
    let url = format!("http://{}/endpoints", pair.client.admin);
    let v: serde_json::Value = serde_json::from_str(&admin_get(&url).await).unwrap();
    v[0]["endpoints"][0]["breaker"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn admin_get(url: &str) -> String {
    let uri: http::Uri = url.parse().unwrap();
    let addr: std::net::SocketAddr = uri.authority().unwrap().as_str().parse().unwrap();
    let got = send(
        addr,
        http::Request::get(uri.path())
            .header("host", "admin")
            .body(full(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    String::from_utf8_lossy(&got.body).into_owned()
}

/// A far sidecar as its own `quicar run` process (so a test can stop or kill it) and an
/// in-process caller over transport `t` with a 60 s service timeout; one request has crossed.
async fn peer_process(t: &str) -> (Pki, Upstream, process::Sidecar, quicar::app::Bound) {
    peer_process_with(t, "").await
}

/// As `peer_process`, with `extra` in the caller's service.
async fn peer_process_with(
    t: &str,
    extra: &str,
) -> (Pki, Upstream, process::Sidecar, quicar::app::Bound) {
    init_tracing();
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let server = process::run(
        &pki,
        "server",
        &server_toml(&pki, upstream.addr, "127.0.0.1:0", ""),
    );
    let client = sidecar(
        &pki,
        &client_toml(
            &pki,
            &[server.inbound],
            &format!("transport = \"{t}\"\ntimeout = \"60s\"\n{extra}"),
        ),
    )
    .await;
    assert_eq!(
        get(client.outbound, "hello", "/").await.status,
        StatusCode::OK
    );
    (pki, upstream, server, client)
}

crate::over_transports! {
    async fn the_apps_own_errors_never_eject_its_endpoint(t) {
        // The most trigger-happy breaker, panic routing off: any counted failure would eject
        // the only endpoint and turn every later request into `503 circuit-open`.
        let pair = Pair::over_with(
            t,
            "breaker = { failures = 1, ejection = \"30s\", panic_threshold = 0 }",
            "",
        )
        .await;
        for status in [500, 503, 500, 502, 504, 500, 503, 500, 500, 500] {
            let got = get(pair.out(), "hello", &format!("/status/{status}")).await;
            assert_eq!(got.status.as_u16(), status, "{got:?}");
            assert_eq!(got.error_kind(), None, "an app status is not a sidecar error");
        }
        let got = get(pair.out(), "hello", "/").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(breaker_state(&pair).await, "closed");
    }

    async fn a_client_that_gives_up_or_sends_a_bad_body_never_ejects_the_endpoint(t) {
        let pair = Pair::over_with(
            t,
            "breaker = { failures = 1, ejection = \"30s\", panic_threshold = 0 }",
            "",
        )
        .await;
        for _ in 0..6 {
            // A sized upload abandoned after 10 of 1,000,000 bytes.
            raw(
                pair.out(),
                b"POST /sink HTTP/1.1\r\nhost: hello\r\ncontent-length: 1000000\r\n\r\n0123456789",
                true,
            )
            .await;
        }
        // A malformed chunked body is the client's fault: 400, with the reason.
        let answer = raw(
            pair.out(),
            b"POST /sink HTTP/1.1\r\nhost: hello\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            false,
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("quicar-error: bad-request"), "{answer}");
        let got = get(pair.out(), "hello", "/").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(breaker_state(&pair).await, "closed");
    }

    async fn forged_sidecar_headers_from_the_app_never_reach_the_caller_or_the_metrics(t) {
        let pair = Pair::over(t).await;
        for n in 0..50 {
            let got = get(pair.out(), "hello", &format!("/forge/{n}")).await;
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(values(&got.headers, "x-app"), vec!["kept"]);
            for name in ["quicar-error", "quicar-peer-identity", "quicar-cache"] {
                assert!(values(&got.headers, name).is_empty(), "{name} forged: {got:?}");
            }
            assert_eq!(values(&got.headers, "quicar-transport"), vec![t]);
        }
        for admin in [pair.client.admin, pair.server.admin] {
            let metrics = admin_get(&format!("http://{admin}/metrics")).await;
            assert!(!metrics.contains("x-forged"), "{metrics}");
            assert!(!metrics.contains("carrier-pigeon"), "{metrics}");
        }
    }

    async fn concurrent_requests_to_a_dead_endpoint_fail_together_with_connect_failed(t) {
        // Nothing listens on this port (UDP nor TCP): the socket is bound, then closed.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let pki = Pki::new();
        let client = sidecar(
            &pki,
            &client_toml(
                &pki,
                &[dead],
                &format!("transport = \"{t}\"\ntimeout = \"60s\""),
            ),
        )
        .await;
        let out = client.outbound;
        let calls: Vec<_> = (0..100)
            .map(|_| tokio::spawn(async move { get(out, "hello", "/").await }))
            .collect();
        let mut kinds = std::collections::BTreeMap::new();
        for c in calls {
            let got = c.await.unwrap();
            *kinds.entry(got.error_kind().unwrap_or("none").to_string()).or_insert(0) += 1;
        }
        // Not one waits for the service timeout, and none is hidden behind `circuit-open`.
        assert_eq!(kinds.get("connect-failed"), Some(&100), "{kinds:?}");
        if t == "quic" {
            // One handshake is shared by the waiters (single flight), not one each.
            let metrics = admin_get(&format!("http://{}/metrics", client.admin)).await;
            let handshakes: f64 = metrics
                .lines()
                .filter(|l| l.starts_with("quicar_handshake_failures_total{direction=\"outbound\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert!((1.0..=10.0).contains(&handshakes), "{handshakes} handshakes\n{metrics}");
        }
    }

    async fn a_burst_to_a_dead_endpoint_starts_no_more_handshakes_than_the_pools_cap(t) {
        // At four streams a connection, 100 callers are 25 connections' worth: the burst
        // spreads over handshakes side by side, but no more than the pool's 16 a peer, and
        // every caller still fails fast with the kind of its failure.
        let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let pki = Pki::new();
        let service = format!("transport = \"{t}\"\ntimeout = \"60s\"");
        let limit = "\n[quic]\nmax_concurrent_streams = 4\n";
        let client = sidecar(&pki, &(client_toml(&pki, &[dead], &service) + limit)).await;
        let out = client.outbound;
        let calls: Vec<_> = (0..100)
            .map(|_| tokio::spawn(async move { get(out, "hello", "/").await }))
            .collect();
        for c in calls {
            let got = c.await.unwrap();
            assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
        }
        if t == "quic" {
            let metrics = admin_get(&format!("http://{}/metrics", client.admin)).await;
            let handshakes: f64 = metrics
                .lines()
                .filter(|l| l.starts_with("quicar_handshake_failures_total{direction=\"outbound\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert!((2.0..=16.0).contains(&handshakes), "{handshakes} handshakes\n{metrics}");
        }
    }

    async fn a_frozen_peer_fails_requests_after_the_dead_peer_timeout_not_the_service_timeout(t) {
        let (_pki, _upstream, server, client) = peer_process(t).await;
        // SIGSTOP: the process and its sockets stay, nothing answers (a hung host, a partition).
        // Over TCP the kernel still acknowledges what we send, so only the keep-alive tells.
        assert!(server.signal("-STOP"));
        let out = client.outbound;
        let calls: Vec<_> = (0..20)
            .map(|_| tokio::spawn(async move { get(out, "hello", "/").await }))
            .collect();
        let mut got = Vec::new();
        for c in calls {
            got.push(c.await.unwrap());
        }
        server.signal("-CONT");
        for got in got {
            assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
            let kind = got.error_kind().unwrap_or("none");
            // Not `timeout` (the 60 s service timeout): the dead peer is noticed in seconds.
            assert!(kind == "peer-reset" || kind == "connect-failed", "{got:?}");
        }
    }

    async fn a_peer_frozen_mid_response_cuts_100_downloads_and_is_replaced_when_back(t) {
        let (_pki, _upstream, server, client) = peer_process(t).await;
        let out = client.outbound;
        // 100 downloads of a gigabyte each, every one well into its body.
        let downloads: Vec<_> = (0..100)
            .map(|_| tokio::spawn(async move { start_stream(out, 1 << 30, 64 * 1024).await }))
            .collect();
        let mut conns = Vec::new();
        for d in downloads {
            conns.push(d.await.unwrap());
        }
        assert!(server.signal("-STOP"));
        // Nothing cuts a response that is only quiet (a stall counts writes the app does not
        // take, and a slow event stream is no fault), so only the dead peer's detection
        // (`dead_peer_timeout`, 3 s) ends these: without it they wait for the peer for ever.
        let ends: Vec<_> = conns
            .into_iter()
            .map(|mut s| {
                tokio::spawn(async move {
                    let mut tail = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return tail,
                            Ok(n) => {
                                tail.extend_from_slice(&buf[..n]);
                                let keep = tail.len().saturating_sub(16);
                                tail.drain(..keep);
                            }
                        }
                    }
                })
            })
            .collect();
        let cut = tokio::time::timeout(Duration::from_secs(45), futures_util::future::join_all(ends))
            .await
            .expect("downloads from a frozen peer were held, not cut");
        server.signal("-CONT");
        for tail in cut {
            // Chunked (the app's length is unknown): a cut body never has its last chunk.
            assert!(!tail.unwrap().ends_with(b"0\r\n\r\n"), "a cut download looked whole");
        }
        // Back, the peer is reached on a new connection.
        let got = get(out, "hello", "/").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
    }

    async fn a_peer_killed_and_not_restarted_fails_requests_instead_of_holding_them(t) {
        let (_pki, _upstream, mut server, client) = peer_process(t).await;
        server.child.kill().unwrap(); // SIGKILL: no GOAWAY, no CONNECTION_CLOSE, no restart.
        server.child.wait().unwrap();
        let out = client.outbound;
        let calls: Vec<_> = (0..20)
            .map(|_| tokio::spawn(async move { get(out, "hello", "/").await }))
            .collect();
        for c in calls {
            let got = c.await.unwrap();
            assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
            let kind = got.error_kind().unwrap_or("none");
            // Before: the stale QUIC connection held every request until the service timeout.
            assert!(kind == "connect-failed" || kind == "peer-reset", "{got:?}");
        }
    }

    async fn uploads_caught_by_a_killed_peer_fail_as_the_peers_fault_not_the_callers(t) {
        // Twenty uploads trickling (1 KiB every 100 ms for 10 s) when the far sidecar is
        // killed: each fails as the peer's (502), not as a stall (504 timeout) and never as
        // the caller's body sending nothing; the service timeout and body_idle_timeout are
        // 60 s, so a held upload would show as a timeout.
        let (_pki, _upstream, server, client) =
            peer_process_with(t, "retry = { attempts = 1 }").await;
        let out = client.outbound;
        let calls: Vec<_> = (0..20)
            .map(|_| {
                tokio::spawn(async move {
                    post(out, "/sink", trickle(100, 1024, Duration::from_millis(100))).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.signal("-KILL");
        for c in calls {
            let got = c.await.unwrap();
            assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
            let kind = got.error_kind().unwrap_or("none");
            assert!(kind == "connect-failed" || kind == "peer-reset", "{got:?}");
            assert!(!String::from_utf8_lossy(&got.body).contains("sent nothing"), "{got:?}");
        }
    }

    async fn a_hundred_callers_of_a_cached_service_whose_peer_was_killed_get_its_copy_or_fail_fast(t) {
        cached_outage(t, "-KILL").await;
    }

    async fn a_hundred_callers_of_a_cached_service_whose_peer_froze_get_its_copy_or_fail_fast(t) {
        cached_outage(t, "-STOP").await;
    }

}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_peer_allowing_one_stream_gets_no_more_than_the_pools_cap_of_connections() {
    // The calling sidecar expects 1,024 streams a connection, the peer allows one. A burst
    // spreads over new connections as the peer's limit becomes known (those that waited for
    // a handshake and find no stream there go on to another), up to the pool's cap of 16 a
    // peer; past it, requests wait for a stream. Every request is answered. (HTTP/2 learns
    // the limit from the peer's SETTINGS, which come after the handshake: there, the first
    // handshake's waiters stay on its connection.)
    let pair = Pair::over_with("quic", "", "\n[quic]\nmax_concurrent_streams = 1\n").await;
    let out = pair.out();
    let calls: Vec<_> = (0..24)
        .map(|_| tokio::spawn(async move { get(out, "hello", "/slow/1000").await }))
        .collect();
    let answered = tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("requests held");
    for got in answered {
        let got = got.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
    }
    assert_eq!(pair.client.connections_opened(wire("quic")), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_quic_sidecar_refuses_new_handshakes_at_once() {
    let pair = Pair::start().await;
    assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
    // A request in flight keeps the server draining while a new caller arrives.
    let out = pair.out();
    let slow = tokio::spawn(async move { get(out, "hello", "/slow/1500").await });
    while pair.upstream.count_of("/slow") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Pair {
        pki,
        client,
        server,
        upstream,
    } = pair;
    let inbound = server.inbound;
    let stopping = tokio::spawn(server.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A new client has no connection yet: it must handshake with the draining sidecar. Its
    // connect timeout is long, so only a refusal can answer it before the drain ends.
    let toml = client_toml(
        &pki,
        &[inbound],
        "timeout = \"25s\"\nretry = { attempts = 1 }",
    )
    .replace("connect_timeout = \"500ms\"", "connect_timeout = \"20s\"");
    let late = sidecar(&pki, &toml).await;
    let got = get(late.outbound, "hello", "/").await;
    assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
    let text = String::from_utf8_lossy(&got.body);
    assert!(text.contains("refused"), "{text}");
    assert!(!slow.await.unwrap().status.is_server_error());
    stopping.await.unwrap();
    drop((client, upstream));
}

/// A chunked body of `n` chunks of `size` bytes, one every `every`.
fn trickle(n: usize, size: usize, every: Duration) -> Body {
    let stream = futures_util::stream::unfold(0usize, move |i| async move {
        if i >= n {
            return None;
        }
        tokio::time::sleep(every).await;
        Some((
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                bytes::Bytes::from(vec![b'x'; size]),
            )),
            i + 1,
        ))
    });
    http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(stream))
}

crate::over_transports! {
    async fn thousands_of_requests_on_one_connection_keep_it_healthy(t) {
        // More than the 1,024 stream resets h2 lets a library make on a connection before it
        // sends GOAWAY (`too_many_internal_resets`): a sized response ends its stream with its
        // last data frame (HTTP/1.1 on the caller's side stops reading at the last byte), and a
        // request body the far side refused (413) unread is read to its end, not reset.
        let pair = Pair::over_with(t, "", "max_request_body = \"1000\"").await;
        let out = pair.out();
        let workers: Vec<_> = (0..32)
            .map(|_| {
                tokio::spawn(async move {
                    for _ in 0..40 {
                        let got = get(out, "hello", "/bytes/40000").await;
                        assert_eq!(got.status, StatusCode::OK, "{got:?}");
                        assert_eq!(got.body.len(), 40000);
                        let refused = post(out, "/sink", body(pattern(100_000), true)).await;
                        assert_eq!(refused.status, StatusCode::PAYLOAD_TOO_LARGE, "{refused:?}");
                    }
                })
            })
            .collect();
        for w in workers {
            w.await.unwrap();
        }
        assert_eq!(pair.upstream.count(), 1280);
        assert_eq!(pair.client.connections_opened(wire(t)), 1);
    }

    async fn bodies_over_the_service_limit_get_413_and_never_arrive_whole(t) {
        let pair = Pair::over_with(t, "max_request_body = \"1000\"", "").await;
        let got = post(pair.out(), "/sink", body(pattern(1500), true)).await;
        assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE, "{got:?}");
        assert_eq!(got.error_kind(), Some("body-too-large"));
        assert_eq!(pair.upstream.count(), 0, "a sized body over the limit is never sent");
        let got = post(pair.out(), "/sink", body(pattern(1500), false)).await;
        assert_eq!(got.error_kind(), Some("body-too-large"), "{got:?}");
        assert!(
            pair.upstream.seen.lock().unwrap().iter().all(|s| s.body_len < 1500),
            "a chunked body over the limit reached the app whole"
        );
        let got = post(pair.out(), "/sink", body(pattern(1000), false)).await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(&got.body[..], b"1000");
    }

    async fn bodies_over_the_local_limit_get_413_from_the_far_sidecar(t) {
        let pair = Pair::over_with(t, "", "max_request_body = \"1000\"").await;
        for sized in [true, false] {
            let got = post(pair.out(), "/sink", body(pattern(1500), sized)).await;
            assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE, "sized {sized}: {got:?}");
            assert_eq!(got.error_kind(), Some("body-too-large"));
        }
        assert!(pair.upstream.seen.lock().unwrap().iter().all(|s| s.body_len < 1500));
    }

    async fn an_upload_that_keeps_moving_is_not_cut_by_the_response_timeout(t) {
        // 25 KiB over about 2.5 s against a 1 s service timeout, which runs from the end of the
        // request body: the upload is progressing, so it completes.
        let pair = Pair::over_with(t, "timeout = \"1s\"", "").await;
        let got = post(pair.out(), "/sink", trickle(25, 1024, Duration::from_millis(100))).await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(&got.body[..], b"25600");
    }

    async fn an_upload_that_stalls_is_cut(t) {
        let pair = Pair::over_with(t, "body_idle_timeout = \"300ms\"", "").await;
        let stalls = trickle(2, 10, Duration::from_secs(3));
        let got = post(pair.out(), "/sink", stalls).await;
        assert_eq!(got.error_kind(), Some("timeout"), "{got:?}");
        let text = String::from_utf8_lossy(&got.body);
        assert!(text.contains("sent nothing"), "{text}");
    }

    async fn requests_to_the_local_app_are_bounded_then_overloaded(t) {
        // No retries, so the far sidecar's answer is what the app sees.
        let pair = Pair::over_with(t, "retry = { attempts = 1 }", "max_concurrent = 1").await;
        let out = pair.out();
        let slow = tokio::spawn(async move { get(out, "hello", "/slow/2500").await });
        while pair.upstream.count_of("/slow") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got = get(pair.out(), "hello", "/").await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
        assert_eq!(got.error_kind(), Some("overloaded"));
        assert_eq!(slow.await.unwrap().status, StatusCode::OK);
        assert_eq!(get(pair.out(), "hello", "/").await.status, StatusCode::OK);
    }

    async fn requests_from_peers_over_inbound_max_requests_are_overloaded_then_taken_again(t) {
        // The far sidecar takes 2 requests from peers at a time (`inbound.max_requests`), with
        // room for more at its app; no retries, so its answer is what the app sees.
        let (pki, upstream, server) = server_with_inbound("max_requests = 2").await;
        let extra = format!("transport = \"{t}\"\nretry = {{ attempts = 1 }}");
        let client = sidecar(&pki, &client_toml(&pki, &[server.inbound], &extra)).await;
        let out = client.outbound;
        let slow: Vec<_> = (0..2)
            .map(|_| tokio::spawn(async move { get(out, "hello", "/slow/4000").await }))
            .collect();
        while upstream.count_of("/slow") < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..3 {
            let got = get(out, "hello", "/").await;
            assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
            assert_eq!(got.error_kind(), Some("overloaded"));
            let text = String::from_utf8_lossy(&got.body);
            assert!(text.contains("inbound.max_requests"), "{text}");
        }
        assert_eq!(upstream.count_of("/slow"), 2);
        for s in slow {
            assert_eq!(s.await.unwrap().status, StatusCode::OK);
        }
        // Every place came back as its request ended, refused ones included.
        for _ in 0..3 {
            two_at_once_pass(out).await;
        }
    }

    async fn one_identity_cannot_hold_more_than_its_share_of_connections(t) {
        // The server admits one connection per identity; two client sidecars with the same
        // identity ("web") each want one.
        let (pki, _upstream, server) = server_with_inbound("max_connections_per_peer = 1").await;
        let extra = format!("transport = \"{t}\"\nretry = {{ attempts = 1 }}");
        let first = sidecar(&pki, &client_toml(&pki, &[server.inbound], &extra)).await;
        let second = sidecar(&pki, &client_toml(&pki, &[server.inbound], &extra)).await;
        assert_eq!(get(first.outbound, "hello", "/").await.status, StatusCode::OK);
        let got = get(second.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
        assert_eq!(got.error_kind(), Some("connect-failed"));
        assert_eq!(get(first.outbound, "hello", "/").await.status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_http3_header_section_gets_431_with_the_kind() {
    // The calling sidecar lets 300 KB of headers through; the far one refuses 100 KB with its
    // own 431 and kind (h3 alone would answer a bare 431).
    let pair = Pair::with_outbound("max_header_bytes = 300000").await;
    let (client, upstream) = (&pair.client, &pair.upstream);
    let got = send(
        client.outbound,
        http::Request::get("/")
            .header("host", "hello")
            .header("x-big", "b".repeat(100 * 1024))
            .body(full(bytes::Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(
        got.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "{got:?}"
    );
    assert_eq!(got.error_kind(), Some("headers-too-large"));
    assert_eq!(upstream.count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_the_first_endpoints_and_responses_hint_keep_alive() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let eps = dir.path().join("eps.toml");
    std::fs::write(&eps, "endpoints = []\n").unwrap();
    let toml = client_toml(&pki, &[], "").replace(
        "endpoints = []",
        &format!(
            "discovery = {{ file = \"{}\", interval = \"50ms\" }}",
            eps.display()
        ),
    );
    let client = sidecar(&pki, &toml).await;
    let url = format!("http://{}/ready", client.admin);
    assert!(admin_get(&url)
        .await
        .contains("waiting for the first endpoints"));
    let upstream = Upstream::start().await;
    let server = sidecar(&pki, &server_toml(&pki, upstream.addr, "127.0.0.1:0", "")).await;
    std::fs::write(
        &eps,
        format!("endpoints = [{{ address = \"{}\" }}]\n", server.inbound),
    )
    .unwrap();
    let mut ready = String::new();
    for _ in 0..100 {
        ready = admin_get(&url).await;
        if ready == "ready\n" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready, "ready\n");
    let got = get(client.outbound, "hello", "/").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(values(&got.headers, "keep-alive"), vec!["timeout=29"]);
    // The breaker gauge is sampled once a second.
    let metrics_url = format!("http://{}/metrics", client.admin);
    let mut metrics = String::new();
    for _ in 0..40 {
        metrics = admin_get(&metrics_url).await;
        if metrics.contains("quicar_endpoint_breaker_state{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let line = format!(
        "quicar_endpoint_breaker_state{{service=\"hello\",endpoint=\"{}\"}} 0",
        server.inbound
    );
    assert!(metrics.contains(&line), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_connections_over_the_cap_get_a_clean_503() {
    let pair = Pair::with_outbound("max_connections = 2").await;
    let client = &pair.client;
    // Two idle keep-alive connections hold the cap.
    let _a = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    let _b = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = raw(
        client.outbound,
        b"GET / HTTP/1.1\r\nhost: hello\r\n\r\n",
        false,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("quicar-error: overloaded"), "{answer}");
    drop((_a, _b));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        get(client.outbound, "hello", "/").await.status,
        StatusCode::OK
    );
}

/// A sidecar pair over `t` in front of `app` (the test's own far app), with the service's and
/// the local app's timeouts at 60 s, so that nothing a test waits for comes from them.
async fn pair_before(
    pki: &Pki,
    app: std::net::SocketAddr,
    t: &str,
) -> (quicar::app::Bound, quicar::app::Bound) {
    let server = sidecar(
        pki,
        &server_toml(pki, app, "127.0.0.1:0", "timeout = \"60s\""),
    )
    .await;
    let client = sidecar(
        pki,
        &client_toml(
            pki,
            &[server.inbound],
            &format!("transport = \"{t}\"\ntimeout = \"60s\""),
        ),
    )
    .await;
    (server, client)
}

/// Waits (20 s at most) for `count` to reach `want`; the caller asserts what it got.
async fn settle(count: impl Fn() -> usize, want: usize) {
    for _ in 0..400 {
        if count() == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A far app that answers every request with an endless chunked body, written until the far
/// sidecar closes the connection; counts the connections that ended so.
async fn endless_app() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ended_in_app = ended.clone();
    let far = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let ended = ended_in_app.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let _ = s.read(&mut head).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                let chunk = [b"4000\r\n".as_slice(), &[b'x'; 0x4000], b"\r\n"].concat();
                // Until the far sidecar closes the connection.
                while s.write_all(&chunk).await.is_ok() {}
                ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    (app, ended, far)
}

/// Sends `GET /stream/{total}` for `hello` to `out` and reads `bytes` of the response.
async fn start_stream(
    out: std::net::SocketAddr,
    total: usize,
    bytes: usize,
) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
    let req = format!("GET /stream/{total} HTTP/1.1\r\nHost: hello\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    read_some(&mut s, bytes).await;
    s
}

/// Reads at least `bytes` from `s`, asserting it does not end first.
async fn read_some(s: &mut tokio::net::TcpStream, bytes: usize) {
    let (mut got, mut buf) = (0, vec![0u8; 16384]);
    while got < bytes {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the download ended early");
        got += n;
    }
}

/// `n` downloads of 1 GiB through `out` whose callers read 1 KiB and stop.
async fn stopped_downloads(out: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(start_stream(out, 1 << 30, 1024).await);
    }
    held
}

/// Reads 1 MiB more of each held download: the requests that filled the connections are
/// still served.
async fn still_flowing(held: &mut [tokio::net::TcpStream]) {
    for s in held {
        read_some(s, 1 << 20).await;
    }
}

/// Starts `n` stopped downloads through `out` at once, as a burst (where `stopped_downloads`
/// starts them one after another); asserts all started within 30 s.
async fn burst_of_downloads(out: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let starts: Vec<_> = (0..n)
        .map(|_| tokio::spawn(start_stream(out, 1 << 30, 1024)))
        .collect();
    let started = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(starts),
    )
    .await
    .expect("a long-lived request of the burst waited for a stream");
    started.into_iter().map(Result::unwrap).collect()
}

/// Sends `n` requests at once through `out` (`GET {prefix}{i}`) and asserts each is answered
/// 200 within 30 s; `held` says what would have held them.
async fn all_answered(out: std::net::SocketAddr, n: usize, prefix: &str, held: &str) {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let path = format!("{prefix}{i}");
            tokio::spawn(async move { get(out, "hello", &path).await })
        })
        .collect();
    all_ok(calls, held).await;
}

/// Asserts each of `calls` is answered 200 within 30 s; `held` says what would have held them.
async fn all_ok(calls: Vec<tokio::task::JoinHandle<Got>>, held: &str) {
    let answered = tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::future::join_all(calls),
    )
    .await
    .expect(held);
    for got in answered {
        let got = got.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
    }
}

/// Sends `GET /endless` to `out` and reads `bytes` of the response.
async fn start_download(out: std::net::SocketAddr, bytes: usize) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: hello\r\n\r\n")
        .await
        .unwrap();
    read_some(&mut s, bytes).await;
    s
}

/// A far app that answers each request with `reply` (nothing, or a head and a first chunk)
/// and then stays silent, waiting for the far sidecar to close the connection. Counts the
/// requests it got and the connections that closed under it.
struct SilentApp {
    addr: std::net::SocketAddr,
    got: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentApp {
    async fn start(reply: &'static [u8]) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (got, closed) = (
            std::sync::Arc::new(AtomicUsize::new(0)),
            std::sync::Arc::new(AtomicUsize::new(0)),
        );
        let (g, c) = (got.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let (g, c) = (g.clone(), c.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    g.fetch_add(1, SeqCst);
                    let _ = s.write_all(reply).await;
                    // Silent until the far sidecar closes the connection.
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                    c.fetch_add(1, SeqCst);
                });
            }
        });
        Self {
            addr,
            got,
            closed,
            task,
        }
    }

    fn got(&self) -> usize {
        self.got.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A caller uploads an endless chunked body, as fast as it can, to a far app that reads the
/// request head and then nothing (until the test lets it drain). Once the buffers between them
/// fill, the body stops moving through no fault of the caller's: the 504 it gets must not say
/// its body sent nothing, and once answered, the upload must be stopped all the way to the far
/// app. Returns the 504's text.
async fn far_app_stops_reading(t: &str, client_extra: &str, server_extra: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    init_tracing();
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (got, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let drain = Arc::new(tokio::sync::Notify::new());
    let far = {
        let (got, closed, drain) = (got.clone(), closed.clone(), drain.clone());
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = vec![0u8; 65536];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            got.fetch_add(1, SeqCst);
            drain.notified().await;
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            closed.fetch_add(1, SeqCst);
        })
    };
    let server = sidecar(&pki, &server_toml(&pki, app, "127.0.0.1:0", server_extra)).await;
    let client = sidecar(
        &pki,
        &client_toml(
            &pki,
            &[server.inbound],
            &format!("transport = \"{t}\"\ntimeout = \"60s\"\nretry = {{ attempts = 1 }}\n{client_extra}"),
        ),
    )
    .await;
    let s = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let caller = tokio::spawn(async move {
        let head = b"POST /sink HTTP/1.1\r\nHost: hello\r\ntransfer-encoding: chunked\r\n\r\n";
        if wr.write_all(head).await.is_err() {
            return wr;
        }
        let mut chunk = b"4000\r\n".to_vec();
        chunk.extend_from_slice(&[b'x'; 0x4000]);
        chunk.extend_from_slice(b"\r\n");
        while wr.write_all(&chunk).await.is_ok() {}
        wr
    });
    // The answer, then the sidecar's end of the connection (bounded: a hang is a failure).
    let (text, ended) = read_until_closed(&mut rd, Duration::from_secs(20)).await;
    assert!(ended, "no end to the answer within 20 s: {text}");
    assert_eq!(got.load(SeqCst), 1, "the upload reached the far app");
    assert!(text.starts_with("HTTP/1.1 504 "), "{text}");
    assert!(text.contains("quicar-error: timeout"), "{text}");
    assert!(
        !text.contains("sent nothing"),
        "the caller is not to blame: {text}"
    );
    // The caller still has its connection; the far app drains what reached it, and its
    // connection must end.
    drain.notify_one();
    settle(|| closed.load(SeqCst), 1).await;
    assert_eq!(closed.load(SeqCst), 1, "the far app's connection closed");
    drop(rd);
    caller.abort();
    far.abort();
    text
}

/// Callers that hang up on a silent far app: `callers` requests reach it through a pair over
/// `t` (the service timeout is 60 s), each caller reads the response until it has seen
/// `until`, then hangs up. The hang-up must cross both sidecars and close every far-app connection.
async fn hang_ups_reach_a_silent_far_app(t: &str, reply: &'static [u8], until: &[u8]) {
    init_tracing();
    const CALLERS: usize = 10;
    let pki = Pki::new();
    let app = SilentApp::start(reply).await;
    let (_server, client) = pair_before(&pki, app.addr, t).await;
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let mut s = tokio::net::TcpStream::connect(client.outbound)
            .await
            .unwrap();
        s.write_all(b"GET /wait HTTP/1.1\r\nHost: hello\r\n\r\n")
            .await
            .unwrap();
        callers.push(s);
    }
    for s in &mut callers {
        let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
        while !until.is_empty() && !got.windows(until.len()).any(|w| w == until) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the response ended early");
            got.extend_from_slice(&buf[..n]);
        }
    }
    settle(|| app.got(), CALLERS).await;
    assert_eq!(app.got(), CALLERS, "every request reached the far app");
    assert_eq!(
        app.closed(),
        0,
        "no far-app connection closed while its caller waits"
    );
    drop(callers);
    settle(|| app.closed(), CALLERS).await;
    assert_eq!(
        app.closed(),
        CALLERS,
        "far-app connections closed after their callers hung up"
    );
    app.task.abort();
}

crate::over_transports! {
    async fn callers_that_give_up_mid_download_free_the_far_app_at_once(t) {
        // Twenty callers start endless downloads, read a little, and hang up. The far sidecar
        // is then writing into a stream whose reader is gone (its send window full, its
        // write waiting): the peer's stop must end that write and close the far app's
        // connection, long before any timeout (the service's is 60 s).
        init_tracing();
        let pki = Pki::new();
        let (app, ended, far) = endless_app().await;
        let (_server, client) = pair_before(&pki, app, t).await;
        let out = client.outbound;
        // Reads 64 KiB of an endless download, then hangs up.
        let download = move || async move {
            drop(start_download(out, 64 * 1024).await);
        };
        let callers: Vec<_> = (0..20).map(|_| tokio::spawn(download())).collect();
        for c in callers {
            c.await.unwrap();
        }
        let ended_now = || ended.load(std::sync::atomic::Ordering::SeqCst);
        settle(ended_now, 20).await;
        assert_eq!(
            ended_now(),
            20,
            "far app connections closed by the far sidecar"
        );
        // And the pair carries the next download.
        download().await;
        far.abort();
    }

    async fn a_storm_of_callers_hanging_up_leaves_other_requests_on_the_connection_alone(t) {
        // Hundreds of callers hang up mid-download while one download goes on over the same
        // pooled connection. Each hang-up cancels its stream; the peer's frames already on
        // the way for it must not count as protocol errors against the connection (h2 ends
        // a connection after 1,024 of those), which would fail the survivor with it.
        init_tracing();
        let pki = Pki::new();
        let (app, ended, far) = endless_app().await;
        let (_server, client) = pair_before(&pki, app, t).await;
        let out = client.outbound;
        let mut survivor = start_download(out, 16 * 1024).await;
        const BATCHES: usize = 40;
        const CALLERS: usize = 50;
        for _ in 0..BATCHES {
            let callers: Vec<_> = (0..CALLERS)
                .map(|_| tokio::spawn(start_download(out, 16 * 1024)))
                .collect();
            for c in callers {
                drop(c.await.unwrap());
            }
            // The survivor reads on, as a slow reader would.
            let mut buf = vec![0u8; 16384];
            let n = survivor.read(&mut buf).await.unwrap();
            assert!(n > 0, "the surviving download was cut off");
        }
        let mut buf = vec![0u8; 16384];
        let mut got = 0;
        while got < 4 << 20 {
            let n = survivor.read(&mut buf).await.unwrap();
            assert!(n > 0, "the surviving download was cut off");
            got += n;
        }
        settle(|| ended.load(std::sync::atomic::Ordering::SeqCst), BATCHES * CALLERS).await;
        assert_eq!(
            ended.load(std::sync::atomic::Ordering::SeqCst),
            BATCHES * CALLERS,
            "every hung-up download freed its far-app connection, the survivor's alone stays"
        );
        far.abort();
    }

    async fn a_caller_that_hangs_up_before_the_response_head_frees_the_far_app(t) {
        // The far app has the request and has not answered: nothing flows on the stream.
        hang_ups_reach_a_silent_far_app(t, b"", b"").await;
    }

    async fn a_caller_that_hangs_up_on_a_silent_response_frees_the_far_app(t) {
        // A long poll or an event stream: the head and a first event, then silence.
        let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nevent1\r\n";
        hang_ups_reach_a_silent_far_app(t, reply, b"event1").await;
    }

    async fn a_caller_whose_upload_stalls_frees_the_far_app_while_it_stays_connected(t) {
        // Ten callers start chunked uploads, send a first kilobyte and stall, their
        // connections open. The caller's sidecar cuts each after `body_idle_timeout` (504);
        // the upload it was streaming must then be stopped on the wire too, so the far app's
        // connection closes. Nothing else would end it: the stalled body is neither finished
        // nor broken, and the far sidecar's own timeout is 60 s. (Over HTTP/2 the upload's
        // reset is the only word the far sidecar gets; over HTTP/3 it also sees the response
        // stream given up, STOP_SENDING.)
        init_tracing();
        const CALLERS: usize = 10;
        let pki = Pki::new();
        let app = SilentApp::start(b"").await;
        let server = sidecar(
            &pki,
            &server_toml(&pki, app.addr, "127.0.0.1:0", "timeout = \"60s\""),
        )
        .await;
        let client = sidecar(
            &pki,
            &client_toml(
                &pki,
                &[server.inbound],
                &format!(
                    "transport = \"{t}\"\ntimeout = \"60s\"\nbody_idle_timeout = \"300ms\"\nretry = {{ attempts = 1 }}"
                ),
            ),
        )
        .await;
        let mut callers = Vec::new();
        for _ in 0..CALLERS {
            let mut s = tokio::net::TcpStream::connect(client.outbound)
                .await
                .unwrap();
            let mut req =
                b"POST /sink HTTP/1.1\r\nHost: hello\r\ntransfer-encoding: chunked\r\n\r\n400\r\n"
                    .to_vec();
            req.extend_from_slice(&[b'x'; 1024]);
            req.extend_from_slice(b"\r\n");
            s.write_all(&req).await.unwrap();
            callers.push(s);
        }
        settle(|| app.got(), CALLERS).await;
        assert_eq!(app.got(), CALLERS, "every upload reached the far app");
        for s in &mut callers {
            // The answer, then the sidecar's end of the connection (a body left unread ends
            // it); the caller keeps its own end open.
            let (text, ended) = read_until_closed(s, Duration::from_secs(20)).await;
            assert!(ended, "no end to the answer within 20 s: {text}");
            assert!(text.starts_with("HTTP/1.1 504 "), "{text}");
            assert!(text.contains("body_idle_timeout"), "{text}");
        }
        settle(|| app.closed(), CALLERS).await;
        assert_eq!(
            app.closed(),
            CALLERS,
            "every far-app connection closed while its stalled caller stays connected"
        );
        drop(callers);
        app.task.abort();
    }

    async fn a_far_app_that_stops_reading_an_upload_is_named_by_the_calling_sidecar(t) {
        // The caller's sidecar's body_idle_timeout (300 ms) is the first to pass.
        let text = far_app_stops_reading(
            t,
            "body_idle_timeout = \"300ms\"",
            "timeout = \"60s\"",
        )
        .await;
        assert!(
            text.contains("service `hello` took none of the request body for 300ms"),
            "{text}"
        );
    }

    async fn a_far_app_that_stops_reading_an_upload_is_named_by_its_own_sidecar(t) {
        // The far sidecar's local timeout (500 ms), which bounds a body stalled on its way to
        // the app, is the first to pass; the caller's sidecar passes its answer on.
        let text = far_app_stops_reading(t, "", "timeout = \"500ms\"").await;
        assert!(
            text.contains("local service `hello` took none of the request body for 500ms"),
            "{text}"
        );
    }

    async fn a_stalled_body_does_not_hold_the_local_app_connection(t) {
        // The caller's own stall limit is long; the far sidecar's local timeout (which also
        // bounds how long a body may stall on its way to the app) is short.
        let pair = Pair::over_with(t, "retry = { attempts = 1 }", "timeout = \"500ms\"").await;
        let got = post(pair.out(), "/sink", trickle(2, 10, Duration::from_secs(3))).await;
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{got:?}");
        assert_eq!(got.error_kind(), Some("timeout"));
        let text = String::from_utf8_lossy(&got.body);
        assert!(text.contains("stopped moving"), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_closes_its_connections_never_ejects_its_endpoint() {
    use tokio::io::AsyncReadExt;
    // Reads each request and hangs up without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let origin = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let pki = Pki::new();
    let server = sidecar(&pki, &server_toml(&pki, app, "127.0.0.1:0", "")).await;
    let client = sidecar(
        &pki,
        &client_toml(
            &pki,
            &[server.inbound],
            "breaker = { failures = 1, ejection = \"30s\", panic_threshold = 0 }",
        ),
    )
    .await;
    for _ in 0..5 {
        let got = get(client.outbound, "hello", "/").await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
        // The far sidecar says its app failed; never `circuit-open` for everyone.
        assert_eq!(got.error_kind(), Some("peer-reset"), "{got:?}");
    }
    let url = format!("http://{}/endpoints", client.admin);
    let v: serde_json::Value = serde_json::from_str(&admin_get(&url).await).unwrap();
    assert_eq!(v[0]["endpoints"][0]["breaker"], "closed");
    origin.abort();
}

/// The next request head on an app's connection, taken off `buf` (`None` once it closes).
async fn next_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end);
    Some(head)
}

/// An HTTP/1.1 app written by hand, so the test controls its connections: it counts them,
/// answers `/big` with 8 MiB, `/chunked` with `ok` in chunked encoding and anything else with
/// `ok`, and (when told) closes each connection after its response, as an app with a short
/// keep-alive timeout does.
struct RawApp {
    addr: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    close_after_response: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RawApp {
    async fn start() -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::Arc;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let close_after_response = Arc::new(AtomicBool::new(false));
        let (n, close) = (connections.clone(), close_after_response.clone());
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                n.fetch_add(1, Ordering::SeqCst);
                let close = close.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    // One request head at a time (the tests send no bodies).
                    while let Some(head) = next_head(&mut s, &mut buf).await {
                        let (resp, body) = if head.starts_with("GET /chunked ") {
                            let chunked =
                                "transfer-encoding: chunked\r\n\r\n1\r\no\r\n1\r\nk\r\n0\r\n\r\n";
                            (format!("HTTP/1.1 200 OK\r\n{chunked}"), Vec::new())
                        } else {
                            let body = if head.starts_with("GET /big ") {
                                vec![b'x'; 8 << 20]
                            } else {
                                b"ok".to_vec()
                            };
                            let len = body.len();
                            (
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n"),
                                body,
                            )
                        };
                        if s.write_all(resp.as_bytes()).await.is_err()
                            || s.write_all(&body).await.is_err()
                        {
                            return;
                        }
                        if close.load(Ordering::SeqCst) {
                            let _ = s.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            connections,
            close_after_response,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_connections_are_reused_and_a_closed_or_abandoned_one_is_never_used_again() {
    use std::sync::atomic::Ordering;
    let app = RawApp::start().await;
    let pki = Pki::new();
    let server = sidecar(&pki, &server_toml(&pki, app.addr, "127.0.0.1:0", "")).await;
    let client = sidecar(&pki, &client_toml(&pki, &[server.inbound], "")).await;
    let ok = |got: &Got| got.status == StatusCode::OK && &got.body[..] == b"ok";

    // Sequential requests share one keep-alive connection to the app, whether its responses
    // are sized or chunked (a chunked body ends only with its last chunk).
    for path in ["/", "/chunked", "/", "/chunked", "/chunked", "/"] {
        let got = get(client.outbound, "hello", path).await;
        assert!(ok(&got), "{path}: {got:?}");
    }
    assert_eq!(app.connections(), 1, "one connection reused");

    // An app that closes each connection once it has answered (a short keep-alive timeout):
    // every request still succeeds, on a new connection each time.
    app.close_after_response.store(true, Ordering::SeqCst);
    for i in 0..5 {
        let got = get(client.outbound, "hello", &format!("/closing/{i}")).await;
        assert!(
            ok(&got),
            "request {i} after the app closed its connection: {got:?}"
        );
        // Give the close time to arrive, so that the next request meets a closed
        // connection in the pool (not one still open).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(app.connections() >= 5, "{} connections", app.connections());
    app.close_after_response.store(false, Ordering::SeqCst);

    // A caller that abandons a large response mid-body: the app connection is left with
    // unread bytes and must not serve the next request (it would read them as its response).
    for _ in 0..3 {
        let stream = tokio::net::TcpStream::connect(client.outbound)
            .await
            .unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let req = http::Request::get("/big")
            .header("host", "hello")
            .body(full(bytes::Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let first = http_body_util::BodyExt::frame(&mut body).await;
        assert!(first.is_some());
        drop((body, sender));
        conn.abort();
        for _ in 0..5 {
            let got = get(client.outbound, "hello", "/").await;
            assert!(ok(&got), "after an abandoned response: {got:?}");
        }
    }
    app.task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_app_gone_fails_100_concurrent_requests_at_once_with_connect_failed() {
    use std::sync::atomic::Ordering;
    let app = RawApp::start().await;
    let pki = Pki::new();
    let server = sidecar(&pki, &server_toml(&pki, app.addr, "127.0.0.1:0", "")).await;
    let client = sidecar(&pki, &client_toml(&pki, &[server.inbound], "")).await;
    // The pool holds connections the app has since closed; then the app is gone.
    app.close_after_response.store(true, Ordering::SeqCst);
    let warm: Vec<_> = (0..8)
        .map(|_| tokio::spawn(async move { get(client.outbound, "hello", "/").await.status }))
        .collect();
    for w in warm {
        assert_eq!(w.await.unwrap(), StatusCode::OK);
    }
    app.task.abort();
    let _ = app.task.await;
    let tasks: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { get(client.outbound, "hello", "/").await }))
        .collect();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
        assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
        let text = String::from_utf8_lossy(&got.body);
        assert!(text.contains(&app.addr.to_string()), "{text}");
    }
}

/// An app that answers each path with the canned bytes in `replies` (and `ok` to anything
/// else), keeping its connection open after a reply whatever it was.
async fn canned_app(
    replies: &'static [(&'static str, String)],
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // Request heads only: what follows one (an upload) is read as the next.
                while let Some(head) = next_head(&mut s, &mut buf).await {
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let reply = replies.iter().find(|(p, _)| *p == path).map_or_else(
                        || "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string(),
                        |(_, r)| r.clone(),
                    );
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_app_response_is_a_502_with_its_reason_and_its_connection_is_dropped() {
    static REPLIES: std::sync::OnceLock<Vec<(&'static str, String)>> = std::sync::OnceLock::new();
    let replies = REPLIES.get_or_init(|| {
        vec![
            (
                "/both",
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".into(),
            ),
            (
                "/huge-head",
                format!("HTTP/1.1 200 OK\r\nx-big: {}\r\n\r\n", "a".repeat(70 << 10)),
            ),
            (
                "/switch",
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: evil\r\nconnection: upgrade\r\n\r\n".into(),
            ),
            ("/garbage", "SSH-2.0-OpenSSH_9.2\r\n\r\n".into()),
            ("/bad-length", "HTTP/1.1 200 OK\r\ncontent-length: 2x\r\n\r\nok".into()),
            (
                "/two-lengths",
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok!".into(),
            ),
            (
                "/smuggle",
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged".into(),
            ),
            (
                "/hop",
                "HTTP/1.1 200 OK\r\nconnection: x-secret, keep-alive\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\nproxy-foo: 1\r\nx-kept: 1\r\ncontent-length: 2\r\n\r\nok".into(),
            ),
            (
                "/early",
                "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\nbig!".into(),
            ),
            (
                "/bad-chunk",
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n".into(),
            ),
        ]
    });
    let (app, task) = canned_app(replies).await;
    let pki = Pki::new();
    let server = sidecar(&pki, &server_toml(&pki, app, "127.0.0.1:0", "")).await;
    let client = sidecar(&pki, &client_toml(&pki, &[server.inbound], "")).await;
    let ok = |got: &Got| got.status == StatusCode::OK && &got.body[..] == b"ok";
    for (path, reason) in [
        ("/both", "both Transfer-Encoding and Content-Length"),
        ("/huge-head", "response head over"),
        ("/switch", "101"),
        ("/garbage", "response head"),
        ("/bad-length", "invalid Content-Length"),
        ("/two-lengths", "conflicting Content-Length"),
    ] {
        let got = get(client.outbound, "hello", path).await;
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{path}: {got:?}");
        assert_eq!(got.error_kind(), Some("peer-reset"), "{path}: {got:?}");
        let body = String::from_utf8_lossy(&got.body);
        assert!(body.contains(reason), "{path}: {body}");
        // The sidecar goes on serving, on a connection that is not the broken one.
        let got = get(client.outbound, "hello", "/").await;
        assert!(ok(&got), "after {path}: {got:?}");
    }
    // Hop-by-hop fields, and those the app's Connection names, stay on the app's hop.
    let got = get(client.outbound, "hello", "/hop").await;
    assert!(ok(&got), "{got:?}");
    assert_eq!(values(&got.headers, "x-kept"), vec!["1"], "{got:?}");
    for gone in ["x-secret", "proxy-foo"] {
        assert!(!got.headers.contains_key(gone), "{gone} passed: {got:?}");
    }
    assert_ne!(
        values(&got.headers, "keep-alive"),
        vec!["timeout=5"],
        "{got:?}"
    );
    // Bytes past a response are never read as the next response.
    for _ in 0..3 {
        let got = get(client.outbound, "hello", "/smuggle").await;
        assert!(ok(&got), "{got:?}");
        let got = get(client.outbound, "hello", "/").await;
        assert!(ok(&got), "the smuggled response was served: {got:?}");
    }
    // An app that answers an upload before it has read it: its answer reaches the caller while
    // the upload is still coming, and that connection, its request unfinished, is not reused.
    let got = post(
        client.outbound,
        "/early",
        trickle(20, 1024, Duration::from_millis(20)),
    )
    .await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE, "{got:?}");
    assert_eq!(&got.body[..], b"big!");
    let got = get(client.outbound, "hello", "/").await;
    assert!(ok(&got), "after an early answer: {got:?}");
    // A chunked body that breaks after its head: the caller sees an error (a 502 if the reset
    // overtook the head, else the body cut with no last chunk), never a whole response.
    let cut = raw(
        client.outbound,
        b"GET /bad-chunk HTTP/1.1\r\nhost: hello\r\nconnection: close\r\n\r\n",
        false,
    )
    .await;
    if cut.starts_with("HTTP/1.1 502 ") {
        assert!(cut.contains("quicar-error: peer-reset"), "{cut}");
    } else {
        assert!(cut.starts_with("HTTP/1.1 200 "), "{cut}");
        assert!(
            !cut.ends_with("0\r\n\r\n"),
            "a cut body looked whole: {cut:?}"
        );
    }
    let got = get(client.outbound, "hello", "/").await;
    assert!(ok(&got), "after a broken chunked body: {got:?}");
    task.abort();
}

/// A hand-written peer: its address, how many connections it accepted, its accept task.
type HandPeer = (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
);

/// The `hello` identity, for a hand-written peer.
/// A hand-written HTTP/2 peer's listener on loopback, and its TLS (ALPN h2, the `hello`
/// identity).
async fn h2_listener(
    pki: &Pki,
) -> (
    tokio::net::TcpListener,
    tokio_rustls::TlsAcceptor,
    std::net::SocketAddr,
) {
    let tls = hello_material(pki)
        .server_config(vec![b"h2".to_vec()])
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (listener, acceptor, addr)
}

fn hello_material(pki: &Pki) -> quicar::identity::Material {
    pki.identity("hello");
    pki.material("hello")
}

/// With 20 slow requests in flight to a hand-written peer, each of `bad` fails alone
/// (`502 peer-reset`), the slow ones are answered, and the peer saw one connection.
async fn bad_streams_fail_alone(out: std::net::SocketAddr, bad: &[&'static str], peer: &HandPeer) {
    // Warm the connection, then put 20 slow requests in flight beside the bad ones.
    assert_eq!(get(out, "hello", "/warm").await.status, StatusCode::OK);
    let slow: Vec<_> = (0..20)
        .map(|i| tokio::spawn(async move { get(out, "hello", &format!("/slow/{i}")).await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let bad: Vec<_> = bad
        .iter()
        .map(|&path| tokio::spawn(async move { get(out, "hello", path).await }))
        .collect();
    for b in bad {
        let got = b.await.unwrap();
        assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
        assert_eq!(got.error_kind(), Some("peer-reset"), "{got:?}");
    }
    for s in slow {
        let got = s.await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(got.body.as_ref(), b"slow");
    }
    assert_eq!(
        peer.1.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the connection to the peer was never closed"
    );
}

/// A hand-written peer's response head for `path`: 200, and under `/bad-length/` a
/// `Content-Length` that is not one valid length (the body is always the 4 bytes `slow`).
fn answer(path: &str) -> http::Response<()> {
    let lengths: &[&str] = match path.strip_prefix("/bad-length/") {
        Some("list") => &["4, 5"],
        Some("sign") => &["+4"],
        Some("word") => &["four"],
        Some("two") => &["4", "5"],
        _ => &[],
    };
    let mut resp = http::Response::builder().status(200);
    for &length in lengths {
        resp = resp.header("content-length", length);
    }
    resp.body(()).unwrap()
}

/// Every way `answer` makes a response malformed.
const BAD_LENGTHS: [&str; 4] = [
    "/bad-length/list",
    "/bad-length/sign",
    "/bad-length/word",
    "/bad-length/two",
];

/// A request stream as a hand-written HTTP/3 peer holds it.
type H3PeerStream = h3::server::RequestStream<h3_quinn::BidiStream<bytes::Bytes>, bytes::Bytes>;

/// A hand-written HTTP/3 peer with the `hello` identity: each request on each connection it
/// accepts goes to `handle` in a task of its own.
async fn h3_hand_peer<F, Fut>(pki: &Pki, handle: F) -> HandPeer
where
    F: Fn(http::Request<()>, H3PeerStream) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let tls = hello_material(pki)
        .server_config(vec![b"h3".to_vec()])
        .unwrap();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    let task = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let Ok(conn) = incoming.await else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let handle = handle.clone();
            tokio::spawn(async move {
                let Ok(mut h3) =
                    h3::server::Connection::<_, bytes::Bytes>::new(h3_quinn::Connection::new(conn))
                        .await
                else {
                    return;
                };
                while let Ok(Some(resolver)) = h3.accept().await {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Ok((req, stream)) = resolver.resolve_request().await {
                            handle(req, stream).await;
                        }
                    });
                }
            });
        }
    });
    (addr, conns, task)
}

/// A hand-written HTTP/3 peer: `/drop` finishes its stream without a response (what a peer
/// whose handler is dropped sends: quinn finishes a dropped stream), `/reset` resets it,
/// anything else answers 200 `slow` after 300 ms (with `answer`'s head).
async fn h3_peer_that_drops_streams(pki: &Pki) -> HandPeer {
    h3_hand_peer(pki, |req, mut stream| async move {
        match req.uri().path() {
            "/drop" => return drop(stream),
            "/reset" => {
                stream.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stream.send_response(answer(req.uri().path())).await.is_ok()
            && stream
                .send_data(bytes::Bytes::from_static(b"slow"))
                .await
                .is_ok()
        {
            let _ = stream.finish().await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_caller_hangs_up_on_is_stopped_with_h3_request_cancelled() {
    // RFC 9114 §4.1.1: a client cancels with H3_REQUEST_CANCELLED. quicar dropped the stream's
    // receive half, and quinn sent STOP_SENDING with code 0, which HTTP/3 does not define.
    init_tracing();
    let pki = Pki::new();
    let (stops, mut stopped) = tokio::sync::mpsc::unbounded_channel();
    let peer = h3_hand_peer(&pki, move |req, mut stream| {
        let stops = stops.clone();
        async move {
            stream.send_response(http::Response::new(())).await.unwrap();
            if req.uri().path() != "/endless" {
                stream
                    .send_data(bytes::Bytes::from_static(b"ok"))
                    .await
                    .unwrap();
                return stream.finish().await.unwrap();
            }
            let chunk = bytes::Bytes::from(vec![b'x'; 16 * 1024]);
            let e = loop {
                if let Err(e) = stream.send_data(chunk.clone()).await {
                    break e;
                }
            };
            let _ = stops.send(e);
        }
    })
    .await;
    let client = sidecar(&pki, &client_toml(&pki, &[peer.0], "")).await;
    drop(start_download(client.outbound, 64 * 1024).await);
    let e = tokio::time::timeout(Duration::from_secs(10), stopped.recv())
        .await
        .expect("the peer's stream was never stopped")
        .unwrap();
    assert!(
        matches!(e, h3::error::StreamError::RemoteTerminate { code, .. } if code == h3::error::Code::H3_REQUEST_CANCELLED),
        "{e:?}"
    );
    // The connection goes on.
    let got = get(client.outbound, "hello", "/next").await;
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    client.shutdown().await;
    peer.2.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_the_app_leaves_unread_is_stopped_with_h3_no_error_after_its_whole_response() {
    // RFC 9114 §4.1.2: a server that needs no more of a request sends its whole response and
    // stops the request stream with H3_NO_ERROR. quicar drained such an upload (bounded) and
    // then dropped it, and quinn sent STOP_SENDING with code 0, which HTTP/3 does not define.
    init_tracing();
    let pki = Pki::new();
    // An app that answers as soon as it has the head, then holds its connection unread.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let app_task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        next_head(&mut s, &mut buf).await.unwrap();
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
    });
    let server = sidecar(&pki, &server_toml(&pki, app, "127.0.0.1:0", "")).await;
    let (_endpoint, conn) = h3_caller(&pki, server.inbound).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    const DECLARED: usize = 8 << 20;
    // `POST https://hello/`, then a DATA frame of 8 MiB (a four-byte varint length).
    let mut head = crate::hostile::post();
    head.extend_from_slice(&[0x00, 0x80, 0x80, 0x00, 0x00]);
    send.write_all(&head).await.unwrap();
    let upload = async {
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < DECLARED {
            match send.write_all(&chunk).await {
                Ok(()) => sent += chunk.len(),
                Err(quinn::WriteError::Stopped(code)) => return Some(code),
                Err(e) => panic!("after {sent} bytes: {e}"),
            }
        }
        None
    };
    let (stopped, resp) = tokio::time::timeout(Duration::from_secs(20), async {
        tokio::join!(upload, recv.read_to_end(64 * 1024))
    })
    .await
    .expect("the upload was neither stopped nor taken");
    let resp = resp.unwrap();
    assert_eq!(
        crate::hostile::first_field_line(&resp),
        Some(0xd9),
        "a 200: {resp:x?}"
    );
    assert!(
        resp.windows(7).any(|w| w == b"\x00\x05early"),
        "a DATA frame with the whole body: {resp:x?}"
    );
    assert_eq!(stopped, Some(quinn::VarInt::from_u32(0x100)), "H3_NO_ERROR");
    server.shutdown().await;
    app_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_finishes_a_stream_without_a_response_fails_that_request_alone() {
    // h3 used to close the whole connection ("stream finished without receiving response
    // headers", a connection error) and with it every request in flight to that peer; and a
    // stream the peer reset made quicar drop the pooled connection for a new handshake.
    init_tracing();
    let pki = Pki::new();
    let peer = h3_peer_that_drops_streams(&pki).await;
    let client = sidecar(&pki, &client_toml(&pki, &[peer.0], "")).await;
    let bad = ["/drop", "/reset", "/drop", "/reset", "/drop", "/reset"];
    bad_streams_fail_alone(client.outbound, &bad, &peer).await;
    client.shutdown().await;
    peer.2.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_response_with_an_invalid_content_length_is_refused_not_forwarded() {
    // RFC 9114 §4.1.2: malformed, and an intermediary must not forward it. quicar used to take
    // an invalid length as none and hand the response on; h2 refuses one on the TCP wire.
    init_tracing();
    let pki = Pki::new();
    for t in ["quic", "tcp"] {
        let (peer, transport) = if t == "quic" {
            (h3_peer_that_drops_streams(&pki).await, "")
        } else {
            (
                h2_peer_that_resets_streams(&pki, Duration::ZERO).await,
                "transport = \"tcp\"",
            )
        };
        let client = sidecar(&pki, &client_toml(&pki, &[peer.0], transport)).await;
        bad_streams_fail_alone(client.outbound, &BAD_LENGTHS, &peer).await;
        client.shutdown().await;
        peer.2.abort();
    }
}

/// The TCP wire's counterpart of `h3_peer_that_drops_streams`: an HTTP/2-over-TLS peer with the
/// `hello` identity that resets `/reset` (RST_STREAM) and answers anything else 200 `slow`
/// after 300 ms (with `answer`'s head). Each TLS handshake is taken `late`.
async fn h2_peer_that_resets_streams(pki: &Pki, late: Duration) -> HandPeer {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (listener, acceptor, addr) = h2_listener(pki).await;
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                tokio::time::sleep(late).await;
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let Ok(mut h2) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = h2.accept().await {
                    tokio::spawn(async move {
                        if req.uri().path() == "/reset" {
                            return respond.send_reset(h2::Reason::INTERNAL_ERROR);
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        if let Ok(mut body) = respond.send_response(answer(req.uri().path()), false)
                        {
                            let _ = body.send_data(bytes::Bytes::from_static(b"slow"), true);
                        }
                    });
                }
            });
        }
    });
    (addr, conns, task)
}

/// What `mute_h2_peer` does after the TLS handshake.
enum Mute {
    /// Reads what comes, writes nothing.
    Silent,
    /// Closes the connection.
    Closes,
}

/// A peer with the `hello` identity that takes each TLS handshake 300 ms late (so that a
/// whole burst waits for it: on a busy machine its first request could otherwise have the
/// connection alone) and never says a word of HTTP/2.
async fn mute_h2_peer(
    pki: &Pki,
    mute: Mute,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let (listener, acceptor, peer) = h2_listener(pki).await;
    let closes = matches!(mute, Mute::Closes);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if closes {
                    let _ = tls.shutdown().await;
                    return;
                }
                let mut buf = vec![0u8; 16384];
                while matches!(tls.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    (peer, task)
}

/// An HTTP/2 peer (TLS, ALPN h2) that never answers a request: it sends `settings` (a SETTINGS
/// frame's payload, at most 255 bytes), reads the client preface and frames, answers pings,
/// and sends the field blocks of the first `n` HEADERS frames it reads (one connection).
async fn h2_peer_that_reads_header_blocks(
    pki: &Pki,
    n: usize,
    settings: &'static [u8],
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Receiver<Vec<Vec<u8>>>,
    tokio::task::JoinHandle<()>,
) {
    let (listener, acceptor, peer) = h2_listener(pki).await;
    let (found, blocks) = tokio::sync::oneshot::channel::<Vec<Vec<u8>>>();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        // Its SETTINGS, and the ACK of the client's (a sidecar that hears neither gives the
        // connection up).
        let mut frames = vec![0, 0, settings.len() as u8, 0x4, 0, 0, 0, 0, 0];
        frames.extend_from_slice(settings);
        frames.extend_from_slice(&[0, 0, 0, 0x4, 0x1, 0, 0, 0, 0]);
        tls.write_all(&frames).await.unwrap();
        let mut frames = Frames::default();
        let mut got = Vec::new();
        loop {
            let frame = frames.next(&mut tls).await;
            let (kind, _, payload) =
                frame.expect("the connection closed before the HEADERS frames");
            if kind == 0x6 {
                // A live peer answers pings: the first says its SETTINGS are applied.
                tls.write_all(&pong(&payload)).await.unwrap();
            } else if kind == 0x1 {
                got.push(payload);
                if got.len() == n {
                    let _ = found.send(got);
                    // Hold the connection: the requests stay in flight until the test ends.
                    return std::future::pending().await;
                }
            }
        }
    });
    (peer, blocks, task)
}

/// The frames a client sends, after its preface, read one at a time by a hand-written peer.
#[derive(Default)]
struct Frames {
    buf: Vec<u8>,
    at: usize,
}

impl Frames {
    /// The next frame's type, stream id (as on the wire) and payload; `None` once the
    /// connection ends.
    async fn next(
        &mut self,
        io: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Option<(u8, [u8; 4], Vec<u8>)> {
        // The client preface (24 bytes), then frames (9-byte header: length, type, flags,
        // stream).
        let at = self.at.max(24);
        loop {
            if self.buf.len() >= at + 9 {
                let b = &self.buf;
                let len =
                    usize::from(b[at]) << 16 | usize::from(b[at + 1]) << 8 | usize::from(b[at + 2]);
                if b.len() >= at + 9 + len {
                    let stream = [b[at + 5], b[at + 6], b[at + 7], b[at + 8]];
                    let frame = (b[at + 3], stream, b[at + 9..at + 9 + len].to_vec());
                    self.at = at + 9 + len;
                    return Some(frame);
                }
            }
            let mut chunk = [0u8; 4096];
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(read) => self.buf.extend_from_slice(&chunk[..read]),
            }
        }
    }
}

/// The HTTP/2 wire carries field values as raw HPACK literals (our vendored h2; RFC 7541 §5.2
/// lets the encoder choose): a per-request value such as the trace context is not Huffman-coded
/// on one sidecar and decoded on the other. A hand-written peer reads the first HEADERS frame
/// in plain text (after TLS), where the app's trace id and field value must appear as they are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_peer_is_sent_field_values_as_raw_literals() {
    init_tracing();
    let pki = Pki::new();
    let (peer, blocks, task) = h2_peer_that_reads_header_blocks(&pki, 1, &[]).await;
    let toml = client_toml(
        &pki,
        &[peer],
        "transport = \"tcp\"\nretry = { attempts = 1 }",
    );
    let client = sidecar(&pki, &toml).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut app = tokio::net::TcpStream::connect(client.outbound)
        .await
        .unwrap();
    let head = format!(
        "GET /raw HTTP/1.1\r\nHost: hello\r\ntraceparent: 00-{trace_id}-00f067aa0ba902b7-01\r\n\
         x-note: a-value-sent-as-it-is\r\n\r\n"
    );
    app.write_all(head.as_bytes()).await.unwrap();
    let block = tokio::time::timeout(Duration::from_secs(20), blocks)
        .await
        .expect("no HEADERS frame reached the peer")
        .unwrap()
        .remove(0);
    let has = |s: &str| block.windows(s.len()).any(|w| w == s.as_bytes());
    assert!(has(trace_id), "trace id not a raw literal: {block:02x?}");
    assert!(
        has("a-value-sent-as-it-is"),
        "value not a raw literal: {block:02x?}"
    );
    assert!(has("x-note"), "name not a raw literal: {block:02x?}");
    drop(app);
    client.shutdown().await;
    task.abort();
}

/// The field blocks of two requests a sidecar sends on one connection to an h2 peer that sends
/// `settings` (`h2_peer_that_reads_header_blocks`). The requests carry the same host, a field
/// with a name from HPACK's static table, and one with a name of its own, all with the same
/// values, and each a trace context of its own.
async fn two_header_blocks(settings: &'static [u8]) -> Vec<Vec<u8>> {
    init_tracing();
    let pki = Pki::new();
    let (peer, blocks, task) = h2_peer_that_reads_header_blocks(&pki, 2, settings).await;
    let toml = client_toml(
        &pki,
        &[peer],
        "transport = \"tcp\"\nretry = { attempts = 1 }",
    );
    let client = sidecar(&pki, &toml).await;
    // One app connection a request; the second is sent once the first has reached the peer
    // (both stay in flight: the peer never answers), so they share the sidecars' connection.
    let mut apps = Vec::new();
    for i in 0..2 {
        let mut app = tokio::net::TcpStream::connect(client.outbound)
            .await
            .unwrap();
        let head = format!(
            "GET /indexed/{i} HTTP/1.1\r\nHost: hello\r\nuser-agent: an-agent/1.0\r\n\
             x-repeated: the-same-value\r\n\r\n"
        );
        app.write_all(head.as_bytes()).await.unwrap();
        apps.push(app);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let blocks = tokio::time::timeout(Duration::from_secs(20), blocks)
        .await
        .expect("two HEADERS frames did not reach the peer")
        .unwrap();
    drop(apps);
    client.shutdown().await;
    task.abort();
    blocks
}

/// HPACK's dynamic table holds what repeats, not what changes with every request. Two requests
/// on one connection, read by a hand-written peer:
/// - the trace context is a literal never indexed (RFC 7541 §6.2.3: first byte 0x10, then the
///   name as a literal) in both, so the far sidecar never stores it either;
/// - a field sent with the same value twice is put in the table by the first request (0x40,
///   incremental indexing) and is one indexed byte in the second: its value is not resent,
///   nor is the authority's, nor a field's whose name is in the static table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_indexes_fields_that_repeat_and_not_the_trace_context() {
    let blocks = two_header_blocks(&[]).await;
    let has = |block: &[u8], s: &[u8]| block.windows(s.len()).any(|w| w == s);
    let mut unindexed = vec![0x10, 11];
    unindexed.extend_from_slice(b"traceparent");
    let mut inserted = vec![0x40, 10];
    inserted.extend_from_slice(b"x-repeated");
    for (i, block) in blocks.iter().enumerate() {
        assert!(
            has(block, &unindexed),
            "request {i}: the trace context is not a literal never indexed: {block:02x?}"
        );
    }
    assert!(
        has(&blocks[0], &inserted) && has(&blocks[0], b"the-same-value"),
        "the first request does not put the field in the table: {:02x?}",
        blocks[0]
    );
    assert!(
        !has(&blocks[1], b"x-repeated") && !has(&blocks[1], b"the-same-value"),
        "the second request resends the field: {:02x?}",
        blocks[1]
    );
    // A field whose name is in the static table, and the authority, go the same way.
    for value in [&b"an-agent/1.0"[..], b"hello"] {
        assert!(
            has(&blocks[0], value) && !has(&blocks[1], value),
            "{} is not indexed on the second request: {blocks:02x?}",
            String::from_utf8_lossy(value)
        );
    }
}

/// A peer whose SETTINGS allow HPACK no dynamic table (SETTINGS_HEADER_TABLE_SIZE 0, RFC 7541
/// §4.2) is sent no reference into one: once its SETTINGS are in, a block opens with the size
/// update to 0 (0x20) and every field the first request put in the table is a literal again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hpack_sends_only_literals_to_a_peer_that_allows_no_table() {
    let blocks = two_header_blocks(&[0x00, 0x01, 0, 0, 0, 0]).await;
    let has = |block: &[u8], s: &[u8]| block.windows(s.len()).any(|w| w == s);
    let second = &blocks[1];
    assert!(
        blocks.iter().any(|b| b.first() == Some(&0x20)),
        "no dynamic table size update to 0: {blocks:02x?}"
    );
    for value in [
        &b"the-same-value"[..],
        b"an-agent/1.0",
        b"hello",
        b"x-repeated",
    ] {
        assert!(
            has(second, value),
            "{} is not a literal in the second request: {second:02x?}",
            String::from_utf8_lossy(value)
        );
    }
    // An indexed field is one byte with its top bit set; the static table ends at 61.
    let dynamic = second.iter().any(|&b| b >= 0x80 | 62);
    assert!(
        !dynamic,
        "a reference into the dynamic table: {second:02x?}"
    );
}

/// 20 requests at once through `out`, each answered `connect-failed` with `text` in its body
/// within 20 s (`held` says what a longer wait means).
async fn burst_fails_to_connect(out: std::net::SocketAddr, text: &str, held: &str) {
    let calls: Vec<_> = (0..20)
        .map(|i| tokio::spawn(async move { get(out, "hello", &format!("/{i}")).await }))
        .collect();
    let answered = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(calls),
    )
    .await
    .expect(held);
    for got in answered {
        let got = got.unwrap();
        assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
        let body = String::from_utf8_lossy(&got.body);
        assert!(body.contains(text), "{body}");
    }
}

/// An HTTP/2 peer whose SETTINGS name no stream limit allows any number (RFC 9113 §6.5.2, as
/// h2 reads it): a cold burst of 150 slow requests all goes on one connection, not on two as
/// if the plan the pool makes before the SETTINGS were the peer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_peer_that_names_no_stream_limit_takes_a_burst_on_one_connection() {
    use std::sync::atomic::Ordering;
    init_tracing();
    let pki = Pki::new();
    // h2's server sends no SETTINGS_MAX_CONCURRENT_STREAMS unless told to. Its handshakes
    // are taken 300 ms late, so that the whole burst waits for the first (on a busy machine
    // the first request could otherwise have it alone, and the requests after it wait for
    // the SETTINGS in the pool rather than share its handshake).
    let late = Duration::from_millis(300);
    let (peer, conns, task) = h2_peer_that_resets_streams(&pki, late).await;
    let toml = client_toml(
        &pki,
        &[peer],
        "transport = \"tcp\"\nretry = { attempts = 1 }",
    );
    let client = sidecar(&pki, &toml).await;
    all_answered(
        client.outbound,
        150,
        "/unlimited/",
        "a request of the burst waited",
    )
    .await;
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "the peer saw more than one connection"
    );
    assert_eq!(client.connections_opened(Transport::Tcp), 1);
    client.shutdown().await;
    task.abort();
}

/// A peer that takes the TLS handshake and closes the connection without a word of HTTP/2 (a
/// process dying as it starts, a TLS terminator whose backend is gone): a cold burst waiting for
/// its SETTINGS fails together when the connection closes, not at the connect timeout, and says
/// what happened; so does a lone request after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_burst_to_a_tcp_peer_that_closes_before_its_settings_fails_at_once() {
    init_tracing();
    let pki = Pki::new();
    let (peer, closing) = mute_h2_peer(&pki, Mute::Closes).await;
    // A connect timeout far beyond the test's own bound: only the close can end the wait.
    let toml = client_toml(&pki, &[peer], "transport = \"tcp\"\ntimeout = \"120s\"")
        .replace("connect_timeout = \"500ms\"", "connect_timeout = \"60s\"");
    let client = sidecar(&pki, &toml).await;
    let out = client.outbound;
    let held = "the burst waited for the connect timeout after the peer closed";
    burst_fails_to_connect(out, "before its HTTP/2 SETTINGS", held).await;
    let got = tokio::time::timeout(Duration::from_secs(20), get(out, "hello", "/alone"))
        .await
        .expect("the lone request waited after the peer closed");
    assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
    client.shutdown().await;
    closing.abort();
}

/// A relay to `to` that passes the TLS handshake at once and then holds what the peer sends
/// for `hold` (once): the peer's HTTP/2 SETTINGS, its first frame after the handshake, come a
/// round trip of `hold` late, as over a long path. The caller's first encrypted record (its
/// Finished, sent once the peer's whole first flight has come) marks the handshake's end; the
/// returned flag is set when a caller's handshake has passed.
async fn settings_held_back(
    to: std::net::SocketAddr,
    hold: Duration,
    then_close: bool,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let passed = Arc::new(AtomicBool::new(false));
    let any = passed.clone();
    let task = tokio::spawn(async move {
        let mut relays = Vec::new();
        while let Ok((caller, _)) = listener.accept().await {
            let Ok(peer) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (mut caller_rd, mut caller_wr) = caller.into_split();
            let (mut peer_rd, mut peer_wr) = peer.into_split();
            let done = Arc::new(AtomicBool::new(false));
            let (seen, any) = (done.clone(), any.clone());
            relays.push(tokio::spawn(async move {
                // TLS records from the caller: 5-byte headers (type, version, length).
                let (mut buf, mut at) = (vec![0u8; 65536], 0usize);
                let mut head = Vec::new();
                loop {
                    let Ok(n) = caller_rd.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    for &b in &buf[..n] {
                        if at > 0 {
                            at -= 1;
                            continue;
                        }
                        head.push(b);
                        if head.len() == 5 {
                            // 23: application data, encrypted (TLS 1.3 hides the handshake
                            // under it).
                            if head[0] == 23 {
                                seen.store(true, Ordering::Release);
                                any.store(true, Ordering::Release);
                            }
                            at = usize::from(u16::from_be_bytes([head[3], head[4]]));
                            head.clear();
                        }
                    }
                    if peer_wr.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }));
            relays.push(tokio::spawn(async move {
                let (mut buf, mut held) = (vec![0u8; 65536], false);
                loop {
                    let Ok(n) = peer_rd.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    if !held && done.load(Ordering::Acquire) {
                        held = true;
                        tokio::time::sleep(hold).await;
                        if then_close {
                            // The peer gone before its SETTINGS reach the caller.
                            return;
                        }
                    }
                    if caller_wr.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }));
        }
        drop(relays);
    });
    (addr, passed, task)
}

/// A serving sidecar with `setting` in its `[inbound]` section, in front of a new upstream.
async fn server_with_inbound(setting: &str) -> (Pki, Upstream, quicar::app::Bound) {
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let toml = server_toml(&pki, upstream.addr, "127.0.0.1:0", "")
        .replace("[inbound]\n", &format!("[inbound]\n{setting}\n"));
    let server = sidecar(&pki, &toml).await;
    (pki, upstream, server)
}

/// A client sidecar whose first HTTP/2 connection, to a peer allowing 4 streams, runs through
/// `settings_held_back(hold, then_close)`; retries off, a 10 s connect timeout, `service` added
/// to its service. Its lone request (`/lone`) opened the connection, and the handshake has
/// passed the relay.
struct HeldSettings {
    client: quicar::app::Bound,
    server: quicar::app::Bound,
    upstream: Upstream,
    lone: Option<tokio::task::JoinHandle<Got>>,
    relaying: tokio::task::JoinHandle<()>,
}

impl HeldSettings {
    async fn start(hold: Duration, then_close: bool, service: &str) -> Self {
        init_tracing();
        let pki = Pki::new();
        let upstream = Upstream::start().await;
        let limit = "\n[quic]\nmax_concurrent_streams = 4\n";
        let server_toml = server_toml(&pki, upstream.addr, "127.0.0.1:0", "") + limit;
        let server = sidecar(&pki, &server_toml).await;
        let (relay, passed, relaying) = settings_held_back(server.inbound, hold, then_close).await;
        let service = format!("transport = \"tcp\"\nretry = {{ attempts = 1 }}\n{service}");
        // A connect timeout past the hold: requests that meet the connection still opening
        // wait for its SETTINGS within it, and would fail at 500 ms on a slow machine.
        let toml = client_toml(&pki, &[relay], &service)
            .replace("connect_timeout = \"500ms\"", "connect_timeout = \"10s\"");
        let client = sidecar(&pki, &toml).await;
        let out = client.outbound;
        let lone = Some(tokio::spawn(
            async move { get(out, "hello", "/lone").await },
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !passed.load(std::sync::atomic::Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "no handshake through the relay"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Self {
            client,
            server,
            upstream,
            lone,
            relaying,
        }
    }
    async fn stop(self) {
        self.client.shutdown().await;
        self.server.shutdown().await;
        self.relaying.abort();
    }
}

/// A first HTTP/2 connection opened by a lone request, then a burst inside its first round
/// trip, before the peer's SETTINGS: the connection used to send up to 100 streams and a peer
/// that allows 4 refused the rest (REFUSED_STREAM, a 502 with retries off). All but one now
/// wait for the SETTINGS (in the pool; h2 would hold them too), and none is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_in_a_first_tcp_connections_first_round_trip_has_none_refused() {
    // The burst comes once the handshake has passed, inside the 600 ms the SETTINGS are held.
    // (A machine that stalls past them sends it after the SETTINGS, and the test holds
    // without testing much.)
    let mut h = HeldSettings::start(Duration::from_millis(600), false, "").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let out = h.client.outbound;
    all_answered(out, 40, "/first-rtt/", "a request of the burst waited").await;
    assert_eq!(h.lone.take().unwrap().await.unwrap().status, StatusCode::OK);
    h.stop().await;
}

/// Callers that hang up while h2 holds their requests for a first connection's SETTINGS: their
/// requests are dropped where they wait, never sent once the SETTINGS come (the far app would
/// run work nobody waits for, and a POST would happen that its caller saw fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_callers_hang_up_while_h2_holds_them_never_reach_the_far_app() {
    use tokio::io::AsyncWriteExt as _;
    let mut h = HeldSettings::start(Duration::from_millis(1500), false, "").await;
    let out = h.client.outbound;
    // Ten callers send a request each (a GET and a POST in turn) and hang up while the
    // SETTINGS are held.
    let mut callers = Vec::new();
    for i in 0..10 {
        let mut app = tokio::net::TcpStream::connect(out).await.unwrap();
        let head = if i % 2 == 0 {
            format!("GET /gone/{i} HTTP/1.1\r\nHost: hello\r\n\r\n")
        } else {
            format!("POST /gone/{i} HTTP/1.1\r\nHost: hello\r\nContent-Length: 2\r\n\r\nhi")
        };
        app.write_all(head.as_bytes()).await.unwrap();
        callers.push(app);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(callers);
    // The SETTINGS come; the lone request and a later one are answered on the connection.
    let lone = h.lone.take().unwrap().await.unwrap();
    assert_eq!(lone.status, StatusCode::OK, "{lone:?}");
    let after = get(out, "hello", "/after").await;
    assert_eq!(after.status, StatusCode::OK, "{after:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reached: Vec<String> = h
        .upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.path.clone())
        .filter(|p| p.starts_with("/gone"))
        .collect();
    assert!(
        reached.is_empty(),
        "hung-up requests reached the far app: {reached:?}"
    );
    // Nor did the far sidecar see them: h2 opens, then resets, a stream that waited in it for
    // the SETTINGS and was dropped, and the far sidecar counts each stream it was opened (the
    // app above sees one only when the reset loses a race).
    let metrics = admin_get(&format!("http://{}/metrics", h.server.admin)).await;
    let inbound: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("quicar_requests_total{") && l.contains("direction=\"inbound\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        inbound, 2.0,
        "the far sidecar took more than /lone and /after:\n{metrics}"
    );
    h.stop().await;
}

/// The peer lost inside a first connection's first round trip, while h2 holds a burst for its
/// SETTINGS: the lone request and the held burst all fail when the connection closes, each
/// with its kind, none held for its 60 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_tcp_connection_lost_before_its_settings_fails_the_held_burst_at_once() {
    let mut h = HeldSettings::start(Duration::from_millis(600), true, "timeout = \"60s\"").await;
    let out = h.client.outbound;
    let calls: Vec<_> = (0..40)
        .map(|i| tokio::spawn(async move { get(out, "hello", &format!("/held/{i}")).await }))
        .chain(h.lone.take())
        .collect();
    let answered = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("a held request waited past the peer's loss");
    for got in answered {
        let got = got.unwrap();
        assert!(
            matches!(got.error_kind(), Some("connect-failed" | "peer-reset")),
            "{got:?}"
        );
    }
    h.stop().await;
}

/// A cold burst waits for the first HTTP/2 connection's SETTINGS: a peer that takes the TLS
/// handshake and then says nothing (a stuck process, a TLS terminator with nothing behind it)
/// must fail the whole burst together at the connect timeout, not hold it for the request
/// timeout; a lone request fails at the dead-peer timeout, and both say what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_burst_to_a_tcp_peer_that_never_sends_its_settings_fails_at_the_connect_timeout() {
    init_tracing();
    let pki = Pki::new();
    let (peer, silent) = mute_h2_peer(&pki, Mute::Silent).await;
    let toml = client_toml(&pki, &[peer], "transport = \"tcp\"\ntimeout = \"60s\"")
        .replace("connect_timeout = \"500ms\"", "connect_timeout = \"2s\"");
    let client = sidecar(&pki, &toml).await;
    let out = client.outbound;
    burst_fails_to_connect(
        out,
        "HTTP/2 setup",
        "the burst waited past the connect timeout",
    )
    .await;
    // A lone request does not wait for the SETTINGS: it fails when the keep-alive finds the
    // peer dead, and says so (it used to blame our certificate).
    let got = tokio::time::timeout(Duration::from_secs(20), get(out, "hello", "/alone"))
        .await
        .expect("the lone request waited past the dead-peer timeout");
    assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
    let text = String::from_utf8_lossy(&got.body);
    assert!(
        text.contains("stopped answering: nothing arrived"),
        "{text}"
    );
    client.shutdown().await;
    silent.abort();
}

/// A calling sidecar whose `hello` service is `peer` over TCP, with a 60 s timeout and no
/// retries (one request, one attempt).
async fn one_try_tcp_client(pki: &Pki, peer: std::net::SocketAddr) -> quicar::app::Bound {
    let service = "transport = \"tcp\"\ntimeout = \"60s\"\nretry = { attempts = 1 }";
    sidecar(pki, &client_toml(pki, &[peer], service)).await
}

/// A lone request to `hello` over TCP, then, once its connection is open (the first to the
/// peer, opened for it alone), `n` more at once; the lone one is last in the list.
async fn lone_request_then_burst(
    client: &quicar::app::Bound,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Got>> {
    let out = client.outbound;
    let lone = tokio::spawn(async move { get(out, "hello", "/lone").await });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while client.connections_opened(Transport::Tcp) == 0 {
        assert!(std::time::Instant::now() < deadline, "no connection opened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (0..n)
        .map(|i| tokio::spawn(async move { get(out, "hello", &format!("/{i}")).await }))
        .chain([lone])
        .collect()
}

/// A lone request to a peer that takes the TLS handshake and then says nothing, and a burst of
/// `n` while its connection waits for the peer's SETTINGS: every one fails with
/// `connect-failed`, saying the peer stopped answering, when the keep-alive finds it dead
/// (never held for their 60 s timeout), on the one connection.
async fn burst_behind_a_silent_tcp_peer(n: usize) {
    init_tracing();
    let pki = Pki::new();
    let (peer, silent) = mute_h2_peer(&pki, Mute::Silent).await;
    let client = one_try_tcp_client(&pki, peer).await;
    let calls = lone_request_then_burst(&client, n).await;
    let answered = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("a request waited past the dead-peer timeout");
    for got in answered {
        let got = got.unwrap();
        assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
        let text = String::from_utf8_lossy(&got.body);
        assert!(text.contains("stopped answering"), "{text}");
    }
    assert_eq!(client.connections_opened(Transport::Tcp), 1);
    client.shutdown().await;
    silent.abort();
}

/// A burst of 20 behind the lone request: they wait for its connection's SETTINGS in quicar
/// (not in h2) and fail with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_behind_a_lone_request_to_a_tcp_peer_gone_silent_fails_with_it() {
    burst_behind_a_silent_tcp_peer(20).await;
}

/// A burst of 150: they wait in the pool for the connection's SETTINGS and fail with it too, at the same time and with the same kind, rather than open a
/// second connection to the silent peer and wait out another connect timeout (two
/// connections before, 50 requests failed only at the second's connect timeout, and 88 said
/// only that the connection closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_planned_streams_behind_a_silent_tcp_peer_fails_with_its_connection() {
    burst_behind_a_silent_tcp_peer(150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_peer_that_resets_a_stream_fails_that_request_alone() {
    init_tracing();
    let pki = Pki::new();
    let peer = h2_peer_that_resets_streams(&pki, Duration::ZERO).await;
    let client = sidecar(&pki, &client_toml(&pki, &[peer.0], "transport = \"tcp\"")).await;
    bad_streams_fail_alone(client.outbound, &["/reset"; 5], &peer).await;
    client.shutdown().await;
    peer.2.abort();
}

/// A peer that opens an HTTP/3 stream and never finishes its head holds that stream only until
/// `inbound.header_read_timeout`: then the stream is reset and stopped with
/// `H3_REQUEST_INCOMPLETE`, the connection goes on serving, and a sidecar stopping meanwhile
/// does not wait for the stalled stream until its `drain_timeout`. A head that arrives in pieces
/// within the time is served. (quicar used to wait for such a head as long as the connection
/// lived, and a drain waited for it too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_stalled_request_head_is_reset_after_the_header_read_timeout() {
    init_tracing();
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let toml = server_toml(&pki, upstream.addr, "127.0.0.1:0", "")
        .replace("[inbound]\n", "[inbound]\nheader_read_timeout = \"1s\"\n")
        .replace("drain_timeout = \"2s\"", "drain_timeout = \"60s\"");
    let server = sidecar(&pki, &toml).await;
    let (_endpoint, conn) = h3_caller(&pki, server.inbound).await;
    let incomplete = quinn::VarInt::from_u32(0x10d);
    // `GET https://hello/` as a raw HEADERS frame (14 bytes).
    let get = crate::hostile::get();
    let checks = async {
        // Half a head, then nothing.
        let (mut stalled_send, mut stalled_recv) = conn.open_bi().await.unwrap();
        stalled_send.write_all(&get[..4]).await.unwrap();
        // A head in two pieces 100 ms apart, well within the time: served.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&get[..5]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        send.write_all(&get[5..]).await.unwrap();
        send.finish().unwrap();
        let resp = recv.read_to_end(64 * 1024).await.unwrap();
        // A HEADERS frame whose first field line is `:status 200` (static index 25).
        assert_eq!(
            crate::hostile::first_field_line(&resp),
            Some(0xd9),
            "{resp:x?}"
        );
        // The stalled stream: reset and stopped.
        let read = stalled_recv.read_to_end(1024).await;
        assert!(
            matches!(read, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if c == incomplete),
            "{read:?}"
        );
        assert_eq!(stalled_send.stopped().await.unwrap(), Some(incomplete));
        // The connection goes on: another stalled stream, then the sidecar stops.
        let (mut stalled_send, _stalled_recv) = conn.open_bi().await.unwrap();
        stalled_send.write_all(&get[..4]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.shutdown().await;
    };
    tokio::time::timeout(Duration::from_secs(20), checks)
        .await
        .expect("reset within the header read timeout, and a drain that does not wait 60 s");
    assert_eq!(upstream.count(), 1);
}

/// A slow reader's pace: 64 KiB, then a pause of this long (about 4 MB/s, well under what
/// loopback carries, and steady: the sidecar's writes make progress every few reads).
const SLOW_PAUSE: Duration = Duration::from_millis(15);

/// Reads `s` at the slow pace for `secs` seconds, asserting the response never ends under it;
/// returns the bytes read.
async fn read_slowly(s: &mut tokio::net::TcpStream, secs: u64) -> usize {
    let until = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while tokio::time::Instant::now() < until {
        s.read_exact(&mut buf)
            .await
            .unwrap_or_else(|e| panic!("a slow reader's response was cut after {got} bytes: {e}"));
        got += buf.len();
        tokio::time::sleep(SLOW_PAUSE).await;
    }
    got
}

crate::over_transports! {
    // A calling app that stops reading a response (a stuck client) held its connection, the
    // stream and the far app's connection and slot for ever: nothing timed out once the
    // head was out. The calling sidecar now closes it after `outbound.response_stall_timeout`
    // without a byte taken, and the cancellation crosses to the far app. A slow reader that
    // takes a little at a time, for longer than that, is not cut.
    async fn a_calling_app_that_stops_reading_is_cut_after_the_stall_timeout_and_the_far_app_freed(t) {
        init_tracing();
        let pki = Pki::new();
        let (app, ended, far) = endless_app().await;
        let server = sidecar(&pki, &server_toml(&pki, app, "127.0.0.1:0", "timeout = \"60s\"")).await;
        let toml = client_toml(
            &pki,
            &[server.inbound],
            &format!("transport = \"{t}\"\ntimeout = \"60s\""),
        )
        .replace(
            "[outbound]\nlisten = \"127.0.0.1:0\"",
            "[outbound]\nlisten = \"127.0.0.1:0\"\nresponse_stall_timeout = \"1s\"",
        );
        let client = sidecar(&pki, &toml).await;
        let out = client.outbound;
        let ended_now = || ended.load(std::sync::atomic::Ordering::SeqCst);
        let stuck = start_download(out, 64 * 1024).await;
        let mut slow = start_download(out, 64 * 1024).await;
        let got = read_slowly(&mut slow, 4).await;
        assert!(got > 1 << 20, "the slow reader moved {got} bytes");
        // Still reading: only the stuck reader's far connection ended.
        assert_eq!(ended_now(), 1, "the stuck reader's far app connection closed, only it");
        drop((stuck, slow));
        settle(ended_now, 2).await;
        far.abort();
    }

    // The far side of the same: a peer (another vendor's sidecar, or a stuck one) that stops
    // reading a response held the far app's connection and slot for ever. The stream is now
    // reset after `inbound.response_stall_timeout` without a byte taken, and the app's
    // connection closed; a peer that reads slowly for longer than that is not cut.
    async fn a_peer_that_stops_reading_is_cut_after_the_stall_timeout_and_the_app_freed(t) {
        init_tracing();
        let pki = Pki::new();
        let (app, ended, far) = endless_app().await;
        let toml = server_toml(&pki, app, "127.0.0.1:0", "timeout = \"60s\"").replace(
            "[inbound]\n",
            "[inbound]\nresponse_stall_timeout = \"1s\"\n",
        );
        let server = sidecar(&pki, &toml).await;
        let ended_now = || ended.load(std::sync::atomic::Ordering::SeqCst);
        let req = || http::Request::get("https://hello/endless").body(()).unwrap();
        let slow_for = Duration::from_secs(4);
        if t == "quic" {
            let (_endpoint, mut send, driving) = h3_client(&pki, server.inbound).await;
            let mut stuck = send.send_request(req()).await.unwrap();
            stuck.finish().await.unwrap();
            stuck.recv_response().await.unwrap();
            stuck.recv_data().await.unwrap().expect("a first chunk");
            let mut slow = send.send_request(req()).await.unwrap();
            slow.finish().await.unwrap();
            slow.recv_response().await.unwrap();
            let until = tokio::time::Instant::now() + slow_for;
            let mut paced = 0;
            while tokio::time::Instant::now() < until {
                use bytes::Buf;
                let chunk = match slow.recv_data().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => panic!("the slow reader's stream ended"),
                    Err(e) => panic!("the slow reader was cut: {e}"),
                };
                paced += chunk.remaining();
                if paced >= 64 * 1024 {
                    paced = 0;
                    tokio::time::sleep(SLOW_PAUSE).await;
                }
            }
            assert_eq!(ended_now(), 1, "the stuck reader's app connection closed, only it");
            assert_eq!(ended_now(), 1, "the stuck reader's app connection closed, only it");
            // What the stuck stream still had is read, then the reset.
            let mut end = Ok(None);
            for _ in 0..10_000 {
                end = stuck.recv_data().await.map(|c| c.map(|_| ()));
                if !matches!(end, Ok(Some(()))) {
                    break;
                }
            }
            assert!(end.is_err(), "the stuck stream was reset, not finished: {end:?}");
            driving.abort();
        } else {
            let send = h2_caller(&pki, server.inbound).await;
            let mut send = send.ready().await.unwrap();
            let (resp, _) = send.send_request(req(), true).unwrap();
            let mut stuck = resp.await.unwrap().into_body();
            // Read, never released: the window stays shut once it is used. (Its own
            // connection: the data it holds also shuts the connection's window.)
            stuck.data().await.unwrap().unwrap();
            let send = h2_caller(&pki, server.inbound).await;
            let mut send = send.ready().await.unwrap();
            let (resp, _) = send.send_request(req(), true).unwrap();
            let mut slow = resp.await.unwrap().into_body();
            let until = tokio::time::Instant::now() + slow_for;
            let mut paced = 0;
            while tokio::time::Instant::now() < until {
                let chunk = slow.data().await.expect("the slow reader's stream ended");
                let chunk = chunk.unwrap_or_else(|e| panic!("the slow reader was cut: {e}"));
                slow.flow_control().release_capacity(chunk.len()).unwrap();
                paced += chunk.len();
                if paced >= 64 * 1024 {
                    paced = 0;
                    tokio::time::sleep(SLOW_PAUSE).await;
                }
            }
            assert_eq!(ended_now(), 1, "the stuck reader's app connection closed, only it");
            assert_eq!(ended_now(), 1, "the stuck reader's app connection closed, only it");
            let mut end = Ok(());
            while let Some(chunk) = stuck.data().await {
                end = chunk.map(|_| ());
                if end.is_err() {
                    break;
                }
            }
            assert!(end.is_err(), "the stuck stream was reset, not finished");
        }
        far.abort();
    }
}

crate::over_transports! {
    // What must not trip `response_stall_timeout`: a response that is quiet (a long poll, an
    // event stream between events) writes nothing, so nothing stalls. With 1 s on both
    // sidecars, a caller waiting 3 s on a silent event stream keeps it, and the far app's
    // connection is closed only when the caller hangs up.
    async fn a_quiet_event_stream_is_not_cut_by_the_stall_timeout(t) {
        init_tracing();
        let pki = Pki::new();
        let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nevent1\r\n";
        let app = SilentApp::start(reply).await;
        let toml = server_toml(&pki, app.addr, "127.0.0.1:0", "timeout = \"60s\"").replace(
            "[inbound]\n",
            "[inbound]\nresponse_stall_timeout = \"1s\"\n",
        );
        let server = sidecar(&pki, &toml).await;
        let toml = client_toml(
            &pki,
            &[server.inbound],
            &format!("transport = \"{t}\"\ntimeout = \"60s\""),
        )
        .replace(
            "[outbound]\nlisten = \"127.0.0.1:0\"",
            "[outbound]\nlisten = \"127.0.0.1:0\"\nresponse_stall_timeout = \"1s\"",
        );
        let client = sidecar(&pki, &toml).await;
        let mut s = tokio::net::TcpStream::connect(client.outbound).await.unwrap();
        s.write_all(b"GET /events HTTP/1.1\r\nHost: hello\r\n\r\n")
            .await
            .unwrap();
        let (mut got, mut buf) = (Vec::new(), [0u8; 1024]);
        while !got.windows(6).any(|w| w == b"event1") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the response ended early");
            got.extend_from_slice(&buf[..n]);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(app.closed(), 0, "a quiet stream was cut");
        // Still open at the caller too: no end, no reset.
        let still = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
        assert!(still.is_err(), "the caller's response ended: {still:?}");
        drop(s);
        settle(|| app.closed(), 1).await;
        assert_eq!(app.closed(), 1, "the far app freed after the caller hung up");
        app.task.abort();
    }
}

crate::over_transports! {
    async fn readers_that_stop_do_not_hold_the_other_requests_to_their_peer(t) {
        // Flow control credits a connection's window only as readers take their data, so
        // readers that stop hold it. With a connection window of 16 stream windows, 16
        // callers that stopped reading big responses stopped every other request to the
        // peer, both transports, until the stall timeout cut them (5 minutes).
        let pair = Pair::over(t).await;
        let out = pair.out();
        let mut stopped = stopped_downloads(out, 40).await;
        // Time for their windows to fill (40 MiB: well under a second on loopback).
        tokio::time::sleep(Duration::from_secs(3)).await;
        all_answered(out, 20, "/after/", "readers that stopped held the other requests to their peer").await;
        // Nothing cut the stopped ones: each goes on when its reader does.
        for s in &mut stopped {
            read_some(s, 2 << 20).await;
        }
    }

    async fn requests_beyond_a_connections_streams_go_on_another_connection(t) {
        // A request over a connection's stream limit waits for a stream (HTTP/2 and QUIC
        // alike), so long-lived requests that filled it held every later request to the peer.
        let limit = "\n[quic]\nmax_concurrent_streams = 4\n";
        let pair = Pair::over_with(t, limit, limit).await;
        let out = pair.out();
        // Four downloads whose callers stopped reading hold the first connection's streams.
        let mut held = stopped_downloads(out, 4).await;
        all_answered(out, 8, "/more/", "requests beyond one connection's streams waited for them").await;
        // Two more as a rule (four of the eight per handshake); one, if the first four
        // were answered before the last four came.
        let opened = pair.client.connections_opened(wire(t));
        assert!((2..=3).contains(&opened), "{opened} connections");
        still_flowing(&mut held).await;
    }

    async fn callers_that_hang_up_mid_download_give_their_streams_back(t) {
        // A response body holds its connection's count of requests in flight until it ends
        // or is dropped. Callers that hang up mid-download must give their places back, or
        // the connection looks full to the pool and the next requests open another.
        let limit = "\n[quic]\nmax_concurrent_streams = 4\n";
        let pair = Pair::over_with(t, limit, limit).await;
        let out = pair.out();
        for _ in 0..3 {
            // Four downloads fill the connection's streams; their callers hang up.
            drop(stopped_downloads(out, 4).await);
            until_in_flight(pair.client.admin, 0.0).await;
        }
        // The first connection takes four more long-lived requests.
        let mut held = stopped_downloads(out, 4).await;
        assert_eq!(
            pair.client.connections_opened(wire(t)),
            1,
            "a hung-up download kept its place on the connection"
        );
        still_flowing(&mut held).await;
    }

    async fn a_peer_that_allows_fewer_streams_gets_another_connection_past_its_limit(t) {
        // The calling sidecar allows 1024 streams, the peer 4: the peer's limit is the one
        // that makes requests wait (QUIC's transport parameter, HTTP/2's SETTINGS).
        let pair = Pair::over_with(t, "", "\n[quic]\nmax_concurrent_streams = 4\n").await;
        let out = pair.out();
        let mut held = stopped_downloads(out, 4).await;
        all_answered(out, 8, "/more/", "requests beyond the peer's stream limit waited for a stream").await;
        assert!(pair.client.connections_opened(wire(t)) >= 2);
        still_flowing(&mut held).await;
    }

    async fn a_burst_beyond_one_connections_streams_opens_the_connections_it_needs_at_once(t) {
        // When many callers wait for one handshake (a cold start, a peer back from a
        // restart), its connection takes only its stream limit of them: the others would
        // wait there for streams that long-lived requests hold.
        let limit = "\n[quic]\nmax_concurrent_streams = 4\n";
        let pair = Pair::over_with(t, limit, limit).await;
        let out = pair.out();
        let mut held = burst_of_downloads(out, 12).await;
        // Twelve requests, four streams a connection: three connections, not more.
        assert_eq!(pair.client.connections_opened(wire(t)), 3);
        // All three are full: one more request opens a fourth.
        let got = get(out, "hello", "/after").await;
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(pair.client.connections_opened(wire(t)), 4);
        still_flowing(&mut held).await;
    }

    async fn a_first_burst_to_a_peer_that_allows_fewer_streams_is_spread_by_its_limit(t) {
        // The caller has never met the peer, which allows 4 streams to its 1,024: QUIC hears
        // the limit in the handshake, HTTP/2 in the peer's SETTINGS, a round trip later. A
        // burst of long-lived requests on the first connection must not wait there for streams.
        let pair = Pair::over_with(t, "", "\n[quic]\nmax_concurrent_streams = 4\n").await;
        let out = pair.out();
        let mut held = burst_of_downloads(out, 12).await;
        assert_eq!(pair.client.connections_opened(wire(t)), 3);
        still_flowing(&mut held).await;
    }

    async fn a_first_burst_to_a_peer_that_allows_few_streams_has_none_refused(t) {
        // 150 requests at once to a peer never met that allows 4 streams. Sent before the
        // peer's HTTP/2 SETTINGS, those over its limit were refused (REFUSED_STREAM), and their
        // retries, bounded by the budget, failed with 502 (1 run in 2). With no retries at
        // all, every request must be answered.
        let no_retries = "retry = { attempts = 1 }";
        let pair = Pair::over_with(t, no_retries, "\n[quic]\nmax_concurrent_streams = 4\n").await;
        all_answered(pair.out(), 150, "/cold/", "a request of a cold burst waited").await;
        assert_eq!(pair.client.connections_opened(wire(t)), 16, "the most to one peer");
    }

    async fn a_burst_after_a_reconnect_is_spread_by_the_limit_the_peer_last_gave(t) {
        // The peer allows 4 streams, the caller 1,024. HTTP/2 hears the peer's limit in its
        // SETTINGS a round trip after the handshake (QUIC in the handshake), so a burst on a
        // new connection waited there past the peer's limit: after an idle close (or a
        // peer's restart) the pool now plans by the limit the last connection had.
        let idle = "[quic]\nidle_timeout = \"200ms\"";
        let pair = Pair::over_with(t, idle, "\n[quic]\nmax_concurrent_streams = 4\n").await;
        let out = pair.out();
        assert_eq!(get(out, "hello", "/").await.status, StatusCode::OK);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while pair.client.connections_active(wire(t)) > 0 {
            assert!(std::time::Instant::now() < deadline, "the idle connection stayed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut held = burst_of_downloads(out, 12).await;
        // The first connection, then three for the burst.
        assert_eq!(pair.client.connections_opened(wire(t)), 4);
        still_flowing(&mut held).await;
    }

    async fn callers_that_give_up_waiting_for_a_handshake_leave_no_count_behind(t) {
        // Requests that wait for a handshake are counted on the connection-to-be: a caller
        // that hangs up meanwhile must free its place, or the connection looks full when it
        // comes and the next requests open another.
        init_tracing();
        let pki = Pki::new();
        let upstream = Upstream::start().await;
        let limit = "\n[quic]\nmax_concurrent_streams = 4\n";
        let server = process::run(
            &pki,
            "server",
            &(server_toml(&pki, upstream.addr, "127.0.0.1:0", "") + limit),
        );
        // Time for the handshake to outlast the freeze (the tests' default is 500 ms).
        let toml = client_toml(&pki, &[server.inbound], &format!("transport = \"{t}\"\ntimeout = \"60s\""))
            .replace("connect_timeout = \"500ms\"", "connect_timeout = \"20s\"");
        let client = sidecar(&pki, &(toml + limit)).await;
        let out = client.outbound;
        // The peer is frozen: four callers wait for its handshake, then hang up.
        assert!(server.signal("-STOP"));
        let mut callers = Vec::new();
        for _ in 0..4 {
            let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: hello\r\n\r\n").await.unwrap();
            callers.push(s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(callers);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(server.signal("-CONT"));
        // Four long-lived requests then fill the one connection the handshake brings.
        let held = tokio::time::timeout(Duration::from_secs(30), stopped_downloads(out, 4))
            .await
            .expect("the downloads after the hang-ups waited");
        assert_eq!(client.connections_opened(wire(t)), 1);
        drop(held);
    }

    async fn a_peer_killed_while_a_connections_streams_are_full_fails_the_rest_fast(t) {
        // With the first connection full, a new request's handshake fails and it falls back
        // to the full connection: that must end with the dead peer's detection, not the
        // service timeout (60 s here), and the held downloads must end too.
        init_tracing();
        let pki = Pki::new();
        let upstream = Upstream::start().await;
        let limit = "\n[quic]\nmax_concurrent_streams = 4\n";
        let mut server = process::run(
            &pki,
            "server",
            &(server_toml(&pki, upstream.addr, "127.0.0.1:0", "") + limit),
        );
        let service = format!("transport = \"{t}\"\ntimeout = \"60s\"");
        let client = sidecar(&pki, &(client_toml(&pki, &[server.inbound], &service) + limit)).await;
        let out = client.outbound;
        let held = stopped_downloads(out, 4).await;
        server.child.kill().unwrap(); // SIGKILL: no GOAWAY, no CONNECTION_CLOSE.
        server.child.wait().unwrap();
        let calls: Vec<_> = (0..20)
            .map(|i| tokio::spawn(async move { get(out, "hello", &format!("/late/{i}")).await }))
            .collect();
        for c in calls {
            let got = c.await.unwrap();
            assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{got:?}");
            let kind = got.error_kind().unwrap_or("none");
            assert!(kind == "connect-failed" || kind == "peer-reset", "{got:?}");
        }
        for mut s in held {
            let mut buf = vec![0u8; 64 * 1024];
            let ended = tokio::time::timeout(Duration::from_secs(30), async {
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            })
            .await;
            assert!(ended.is_ok(), "a download from the killed peer was held");
        }
    }
}

/// An HTTP/2 peer (allowing 1,000 streams) that takes the TLS handshake at once and sends its
/// SETTINGS only when the returned semaphore has a permit; it records the paths it is asked.
async fn gated_h2_peer(
    pki: &Pki,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<tokio::sync::Semaphore>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::{Arc, Mutex};
    let (listener, acceptor, peer) = h2_listener(pki).await;
    let settings = Arc::new(tokio::sync::Semaphore::new(0));
    let asked = Arc::new(Mutex::new(Vec::new()));
    let (gate, seen) = (settings.clone(), asked.clone());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, gate, seen) = (acceptor.clone(), gate.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // What the caller sends waits in the socket meanwhile; the SETTINGS go out
                // when the handshake starts.
                let Ok(_open) = gate.acquire().await else {
                    return;
                };
                let Ok(mut h2) = h2::server::Builder::new()
                    .max_concurrent_streams(1000)
                    .handshake::<_, bytes::Bytes>(tls)
                    .await
                else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = h2.accept().await {
                    let path = req.uri().path().to_string();
                    let _ = respond.send_response(answer(&path), true);
                    seen.lock().unwrap().push(path);
                }
            });
        }
    });
    (peer, settings, asked, task)
}

/// Waits until the calling sidecar counts `n` outbound requests in flight.
async fn until_in_flight(admin: std::net::SocketAddr, n: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = get(admin, "admin", "/metrics").await;
        let m = String::from_utf8_lossy(&m.body).to_string();
        let in_flight = m
            .lines()
            .find(|l| l.starts_with("quicar_requests_in_flight") && l.contains("outbound"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        if in_flight == Some(n) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "in flight: {in_flight:?}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A lone first request to a TCP peer takes its connection at once, planned for one stream
/// until the peer's SETTINGS come. A burst of 150 more within that round trip waits for them
/// in the pool, then goes on that connection (the peer allows 1,000), instead of opening a connection of its own, which
/// would take longer (a TCP and TLS handshake) than the SETTINGS' one round trip. The peer
/// here sends its SETTINGS only when the test lets it, after the whole burst is in the
/// sidecar. (The burst past the plan used to open a second connection:
/// `tunnel::five_hundred_concurrent_requests_share_one_connection::tcp` failed so on a busy
/// machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_behind_a_lone_first_request_waits_for_the_tcp_peers_settings() {
    init_tracing();
    let pki = Pki::new();
    let (peer, settings, _, task) = gated_h2_peer(&pki).await;
    let client = one_try_tcp_client(&pki, peer).await;
    let calls = lone_request_then_burst(&client, 150).await;
    // The whole burst is in the sidecar's request path (counted in flight) before the peer
    // speaks; a little more time lets each request reach the pool.
    until_in_flight(client.admin, 151.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client.connections_opened(Transport::Tcp),
        1,
        "the burst opened a connection of its own"
    );
    settings.add_permits(1000);
    let answered = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(calls),
    )
    .await
    .expect("the burst was answered");
    for got in answered {
        assert_eq!(got.unwrap().status, StatusCode::OK);
    }
    assert_eq!(client.connections_opened(Transport::Tcp), 1);
    client.shutdown().await;
    task.abort();
}

/// Callers that hang up while their requests wait for a new TCP connection's SETTINGS (in the
/// pool, which plans one stream for it until they come) leave nothing behind: none of their requests reaches the peer once the SETTINGS
/// come (h2 would still open and reset a request it held, hyperium/h2#125, and the far app
/// could act on it), the in-flight count falls back, and the connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_hang_up_during_the_settings_wait_send_nothing_to_the_peer() {
    init_tracing();
    let pki = Pki::new();
    let (peer, settings, asked, task) = gated_h2_peer(&pki).await;
    let client = one_try_tcp_client(&pki, peer).await;
    let out = client.outbound;
    let lone = lone_request_then_burst(&client, 0).await;
    let mut callers = Vec::new();
    for i in 0..149 {
        let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
        let req = format!("GET /gone/{i} HTTP/1.1\r\nHost: hello\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        callers.push(s);
    }
    until_in_flight(client.admin, 150.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(callers);
    until_in_flight(client.admin, 1.0).await;
    settings.add_permits(1000);
    for got in futures_util::future::join_all(lone).await {
        assert_eq!(got.unwrap().status, StatusCode::OK);
    }
    assert_eq!(get(out, "hello", "/after").await.status, StatusCode::OK);
    assert_eq!(*asked.lock().unwrap(), ["/lone", "/after"]);
    assert_eq!(client.connections_opened(Transport::Tcp), 1);
    client.shutdown().await;
    task.abort();
}

/// An outage under load, behind a cache that may answer in one: the peer process gets
/// `signal` (`-KILL`: gone, its ports refuse; `-STOP`: a hung host, whose kernel still
/// completes TCP handshakes), then 100 callers come at once. Half want a response stored
/// before, half one that never was.
async fn cached_outage(t: &str, signal: &str) {
    let cache = "cache = { max_bytes = \"1MiB\", serve_stale_on_connect_failure = \"60s\" }";
    let (_pki, upstream, server, client) = peer_process_with(t, cache).await;
    let out = client.outbound;
    let kept = get(out, "hello", "/c/kept?cc=max-age=1").await;
    assert_eq!(
        (kept.status, kept.how()),
        (StatusCode::OK, "miss"),
        "{kept:?}"
    );
    assert!(server.signal(signal));
    client.clock().advance(Duration::from_secs(10));
    let calls: Vec<_> = (0..100)
        .map(|n| {
            let url = if n % 2 == 0 {
                "/c/kept?cc=max-age=1"
            } else {
                "/c/never?cc=max-age=60"
            };
            tokio::spawn(async move { (url, get(out, "hello", url).await) })
        })
        .collect();
    let mut seen = std::collections::BTreeMap::new();
    for c in calls {
        let (url, got) = c.await.unwrap();
        if got.how() == "stale" {
            assert_eq!(got.body, kept.body, "{got:?}");
        }
        let kind = got.error_kind().unwrap_or("").to_string();
        *seen
            .entry((url, got.status.as_u16(), got.how().to_string(), kind))
            .or_insert(0) += 1;
    }
    // SIGKILL, also for the stopped one.
    drop(server);
    // The stored copy answers every caller that wants it; the others fail at once with the
    // kind of the failure (not `timeout`: the service's is 60 s), none reaching the origin.
    let stale = (
        "/c/kept?cc=max-age=1",
        200,
        "stale".to_string(),
        String::new(),
    );
    assert_eq!(seen.get(&stale), Some(&50), "{seen:?}");
    let failed: usize = seen
        .iter()
        .filter(|((url, status, _, kind), _)| {
            *url == "/c/never?cc=max-age=60"
                && *status == 502
                && (kind == "connect-failed" || kind == "peer-reset")
        })
        .map(|(_, n)| n)
        .sum();
    assert_eq!(failed, 50, "{seen:?}");
    assert_eq!(upstream.count_of("/c/never"), 0);
}

/// A hand-written h2 peer that refuses every stream it is sent (RST_STREAM REFUSED_STREAM:
/// not processed, RFC 9113 §8.7), counting the HEADERS frames it read.
async fn h2_peer_that_refuses_streams(
    pki: &Pki,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let (listener, acceptor, peer) = h2_listener(pki).await;
    let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = refused.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // Empty SETTINGS, and the ACK of the client's.
                let hello = [0, 0, 0, 0x4, 0, 0, 0, 0, 0, 0, 0, 0, 0x4, 0x1, 0, 0, 0, 0];
                if tls.write_all(&hello).await.is_err() {
                    return;
                }
                let mut frames = Frames::default();
                while let Some((kind, stream, _)) = frames.next(&mut tls).await {
                    if kind == 0x1 {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let mut rst = vec![0, 0, 4, 0x3, 0];
                        rst.extend_from_slice(&stream);
                        rst.extend_from_slice(&[0, 0, 0, 0x7]);
                        if tls.write_all(&rst).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (peer, refused, task)
}

/// A request sent again after its peer refused it is sent whole. The TCP wire lends h2 the
/// request's field map for an attempt, rather than copying it (`transport::tcp::Lent`), and
/// must have it back for the retry. Of two endpoints, the one with nearly all the weight is a
/// hand-written h2 peer that refuses every stream; each retry goes to a real sidecar, whose app
/// must see every field the calling app sent, a repeated one with both values in order.
/// Requests go until three were refused first (a request the balancer sent to the sidecar
/// first is checked all the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_peer_refused_is_retried_with_every_field() {
    init_tracing();
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let server = sidecar(&pki, &server_toml(&pki, upstream.addr, "127.0.0.1:0", "")).await;
    let (refuser, refused, task) = h2_peer_that_refuses_streams(&pki).await;
    let toml = client_toml(
        &pki,
        &[refuser],
        "transport = \"tcp\"\nretry = { attempts = 2 }\nbreaker = { failures = 1000 }",
    )
    .replace(
        &format!("{{ address = \"{refuser}\" }}"),
        &format!(
            "{{ address = \"{refuser}\", weight = 1000 }}, {{ address = \"{}\" }}",
            server.inbound
        ),
    );
    let client = sidecar(&pki, &toml).await;
    let count = || refused.load(std::sync::atomic::Ordering::SeqCst);
    let mut sent = 0;
    while count() < 3 && sent < 40 {
        let got = send(
            client.outbound,
            http::Request::get(format!("/retried/{sent}"))
                .header("host", "hello")
                .header("x-probe", format!("probe-{sent}"))
                .header("x-multi", "first")
                .header("x-multi", "second")
                .body(full(bytes::Bytes::new()))
                .unwrap(),
        )
        .await;
        assert_eq!(got.status, StatusCode::OK, "request {sent}: {got:?}");
        let seen = upstream.last();
        assert_eq!(seen.path, format!("/retried/{sent}"));
        assert_eq!(values(&seen.headers, "x-probe"), [format!("probe-{sent}")]);
        assert_eq!(values(&seen.headers, "x-multi"), ["first", "second"]);
        sent += 1;
    }
    assert!(
        count() >= 3,
        "the refusing peer was tried first by {} of {sent} requests",
        count()
    );
    eprintln!("{sent} requests, {} refused first", count());
    client.shutdown().await;
    server.shutdown().await;
    task.abort();
}

/// How a `SlowSettlingPeer` keeps its first connection unsettled.
#[derive(Clone, Copy, PartialEq)]
enum Unsettled {
    /// It withholds its SETTINGS (and its answers to pings, which come after them) until
    /// `gate` is notified, and never answers a request there.
    Gated,
    /// It sends its SETTINGS at once but never answers a ping (RFC 9113 §6.7 says it must),
    /// and answers the first request there with a body that never ends, a byte every 50 ms,
    /// so the connection is alive all along.
    DeafToPings,
}

/// A hand-written h2 peer that allows one stream, and keeps its first connection unsettled
/// as `how` says; on every later connection it sends its SETTINGS at once, answers pings, and
/// answers each request `200` with no body.
struct SlowSettlingPeer {
    addr: std::net::SocketAddr,
    gate: std::sync::Arc<tokio::sync::Notify>,
    /// Requests (HEADERS frames) the first connection was sent.
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SlowSettlingPeer {
    /// Asserts the first connection was sent one request, all that it allows.
    fn held_one(&self) {
        let held = self.held.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(held, 1, "the first connection was sent more than it allows");
    }
}

async fn slow_settling_h2_peer(pki: &Pki, how: Unsettled) -> SlowSettlingPeer {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    let (listener, acceptor, addr) = h2_listener(pki).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let held = Arc::new(AtomicUsize::new(0));
    let (opened, g, h) = (Arc::new(AtomicUsize::new(0)), gate.clone(), held.clone());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let first = opened.fetch_add(1, SeqCst) == 0;
            let (acceptor, gate, held) = (acceptor.clone(), g.clone(), h.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                // SETTINGS_MAX_CONCURRENT_STREAMS = 1, and the ACK of the client's.
                let hello = [
                    0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x3, 0, 0, 0, 1, //
                    0, 0, 0, 0x4, 0x1, 0, 0, 0, 0,
                ];
                let deaf = first && how == Unsettled::DeafToPings;
                let mut open = !first || deaf;
                if open && tls.write_all(&hello).await.is_err() {
                    return;
                }
                let mut frames = Frames::default();
                let mut withheld: Vec<Vec<u8>> = Vec::new();
                let mut endless = None;
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                loop {
                    enum Heard {
                        Frame(Option<(u8, [u8; 4], Vec<u8>)>),
                        Gate,
                        Tick([u8; 4]),
                    }
                    let heard = tokio::select! {
                        f = frames.next(&mut tls) => Heard::Frame(f),
                        () = gate.notified(), if !open => Heard::Gate,
                        _ = tick.tick(), if endless.is_some() => Heard::Tick(endless.unwrap()),
                    };
                    let out = match heard {
                        Heard::Gate => {
                            // The SETTINGS, then the pongs withheld.
                            open = true;
                            let mut out = hello.to_vec();
                            for p in withheld.drain(..) {
                                out.extend_from_slice(&pong(&p));
                            }
                            out
                        }
                        // DATA: one byte of the endless body.
                        Heard::Tick(stream) => frame(0x0, 0, stream, b"x"),
                        Heard::Frame(None) => return,
                        Heard::Frame(Some((0x6, _, _))) if deaf => continue,
                        Heard::Frame(Some((0x6, _, payload))) if open => pong(&payload),
                        Heard::Frame(Some((0x6, _, payload))) => {
                            withheld.push(payload);
                            continue;
                        }
                        Heard::Frame(Some((0x1, stream, _))) if first => {
                            if held.fetch_add(1, SeqCst) > 0 || !deaf {
                                continue;
                            }
                            // HEADERS, END_HEADERS: `:status 200` (static index 8); a body
                            // follows.
                            endless = Some(stream);
                            frame(0x1, 0x4, stream, &[0x88])
                        }
                        // HEADERS, END_STREAM | END_HEADERS: `:status 200`.
                        Heard::Frame(Some((0x1, stream, _))) => frame(0x1, 0x5, stream, &[0x88]),
                        Heard::Frame(Some(_)) => continue,
                    };
                    if tls.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    SlowSettlingPeer {
        addr,
        gate,
        held,
        task,
    }
}

/// An HTTP/2 frame (a payload under 256 bytes).
fn frame(kind: u8, flags: u8, stream: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, payload.len() as u8, kind, flags];
    out.extend_from_slice(&stream);
    out.extend_from_slice(payload);
    out
}

/// The PING frame that answers one whose payload is `payload`.
fn pong(payload: &[u8]) -> Vec<u8> {
    frame(0x6, 0x1, [0; 4], payload)
}

/// HTTP/2 hears a peer's stream limit in its SETTINGS, a round trip after the handshake. A
/// first request opened the connection alone, so nothing waited for them there; three more
/// came before they did. The peer allows one stream, which the first request holds (a
/// long-lived one): the three must go on to other connections once the limit is heard, not
/// queue on this one behind it (they did: the pool planned 100 streams for a connection not
/// yet heard, and handed it out up to that; a burst of 12 downloads to a peer allowing 4 then
/// waited for a stream 1 run in 15 on a busy machine, when the first opened the connection
/// alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_came_before_a_new_peers_settings_are_shared_out_by_its_limit() {
    init_tracing();
    let pki = Pki::new();
    let peer = slow_settling_h2_peer(&pki, Unsettled::Gated).await;
    let client = one_try_tcp_client(&pki, peer.addr).await;
    let out = client.outbound;
    let mut first = tokio::net::TcpStream::connect(out).await.unwrap();
    first
        .write_all(b"GET /held HTTP/1.1\r\nHost: hello\r\n\r\n")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while peer.held.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first request never reached the peer"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let later: Vec<_> = (0..3)
        .map(|i| tokio::spawn(async move { get(out, "hello", &format!("/later/{i}")).await }))
        .collect();
    // Time for them to reach the pool before the SETTINGS (should one come later, it meets
    // the limit heard, and the test proves less, not something false).
    tokio::time::sleep(Duration::from_millis(500)).await;
    peer.gate.notify_one();
    let held = "a request that came before the peer's SETTINGS queued behind the held stream";
    all_ok(later, held).await;
    peer.held_one();
    // The first, and one more for each later request at most (some may find one free).
    let opened = client.connections_opened(Transport::Tcp);
    assert!((2..=4).contains(&opened), "{opened} connections opened");
    drop(first);
    client.shutdown().await;
    peer.task.abort();
}

/// A peer that never answers the ping that would say its SETTINGS are applied, while its
/// connection stays alive (a long response flows on it), holds the requests that came after
/// the first only until the ping has gone unanswered for the dead-peer timeout: they then go
/// by the limit h2 has heard (here one stream, taken by the first), on to another connection.
/// (Waiting in the pool for a pong that never comes, they were held for their own timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_deaf_to_pings_holds_later_requests_no_longer_than_the_dead_peer_timeout() {
    init_tracing();
    let pki = Pki::new();
    let peer = slow_settling_h2_peer(&pki, Unsettled::DeafToPings).await;
    let client = one_try_tcp_client(&pki, peer.addr).await;
    let out = client.outbound;
    let mut first = start_download(out, 1).await;
    let later = get(out, "hello", "/later");
    // The dead-peer timeout is 3 s; the request's own, 60 s.
    let got = tokio::time::timeout(Duration::from_secs(30), later)
        .await
        .expect("a request waited on the deaf peer's connection");
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    peer.held_one();
    read_some(&mut first, 2).await;
    assert_eq!(client.connections_opened(Transport::Tcp), 2);
    drop(first);
    client.shutdown().await;
    peer.task.abort();
}
