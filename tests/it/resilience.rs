//! Resilience with real sidecars: endpoints killed and restarted, failing and slow apps,
//! retries within their budget, no duplicated POST, deadlines, breakers, concurrency limits,
//! and endpoints from a watched file.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{Request, StatusCode};
use quicar::app::Bound;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// `n` server sidecars (each fronting its own app) and one client whose `hello` service lists
/// them all; `extra` goes into the client's `[[service]]` table.
struct Cluster {
    pki: Pki,
    client: Bound,
    servers: Vec<Option<Bound>>,
    apps: Vec<Upstream>,
    addrs: Vec<SocketAddr>,
}

impl Cluster {
    /// `n` endpoints, called over transport `t`.
    async fn over(t: &str, n: usize, extra: &str) -> Self {
        Self::start(n, &format!("transport = \"{t}\"\n{extra}")).await
    }

    async fn start(n: usize, extra: &str) -> Self {
        init_tracing();
        let pki = Pki::new();
        let mut apps = Vec::new();
        let mut servers = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..n {
            let app = Upstream::start().await;
            // A port `restart` can bind again (`non_ephemeral_addr`).
            let inbound = non_ephemeral_addr().to_string();
            let s = sidecar(&pki, &server_toml(&pki, app.addr, &inbound, "")).await;
            addrs.push(s.inbound);
            servers.push(Some(s));
            apps.push(app);
        }
        let client = sidecar(&pki, &client_toml(&pki, &addrs, extra)).await;
        Self {
            pki,
            client,
            servers,
            apps,
            addrs,
        }
    }

    fn out(&self) -> SocketAddr {
        self.client.outbound
    }

    async fn kill(&mut self, i: usize) {
        if let Some(s) = self.servers[i].take() {
            s.shutdown().await;
        }
    }

    /// Starts endpoint `i` again on its old port, retrying the bind for up to 20 s: the stopped
    /// sidecar ran in this process, and its sockets go when its last tasks have ended (under
    /// a loaded CI run that once took over 5 s; a real restart is a new process).
    async fn restart(&mut self, i: usize) {
        let toml = server_toml(&self.pki, self.apps[i].addr, &self.addrs[i].to_string(), "");
        let mut last = String::new();
        for _ in 0..400 {
            let config = quicar::config::Config::parse(&toml, "<test>", self.pki.path()).unwrap();
            match quicar::app::build(config).await {
                Ok(s) => {
                    self.servers[i] = Some(s);
                    return;
                }
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("could not rebind endpoint {i}: {last}");
    }

    async fn endpoints(&self) -> serde_json::Value {
        let got = get(self.client.admin, "admin", "/endpoints").await;
        serde_json::from_slice(&got.body).unwrap()
    }

    async fn breaker(&self, i: usize) -> String {
        let v = self.endpoints().await;
        v[0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["address"] == self.addrs[i].to_string())
            .map(|e| e["breaker"].as_str().unwrap().to_string())
            .unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_shorter_than_the_app_is_504_and_the_app_sees_the_cancellation() {
    init_tracing();
    let pki = Pki::new();
    // A raw app: reads the request, never answers, and reports when the sidecar hangs up.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        let got_at = Instant::now();
        // EOF means the sidecar gave up on us.
        let n = s.read(&mut buf).await.unwrap_or(0);
        let _ = tx.send((
            n,
            got_at.elapsed(),
            String::from_utf8_lossy(&head).to_string(),
        ));
        let _ = s.shutdown().await;
    });
    let server = sidecar(&pki, &server_toml(&pki, app, "127.0.0.1:0", "")).await;
    let client = sidecar(
        &pki,
        &client_toml(&pki, &[server.inbound], "timeout = \"400ms\""),
    )
    .await;
    let got = get(client.outbound, "hello", "/hang").await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.error_kind(), Some("timeout"));
    let (n, waited, head) = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("the app saw its connection closed")
        .unwrap();
    assert_eq!(n, 0, "the app's connection was closed, not written to");
    // The deadline travelled with the request, and quicar-* headers never reach the app.
    assert!(
        !head.to_ascii_lowercase().contains("quicar-deadline"),
        "{head}"
    );
    eprintln!("app saw the cancellation {waited:?} after receiving the request");
}

crate::over_transports! {
    async fn a_deadline_the_app_sends_neither_shortens_nor_lengthens_its_request(t) {
        // The app may not speak for its sidecar: its `quicar-deadline` is replaced by what is
        // left of the service's own timeout (2 s here).
        let pair = Pair::over_with(t, "timeout = \"2s\"", "").await;
        for (forged, path, want) in [
            ("1", "/slow/300", StatusCode::OK),
            ("0", "/slow/300", StatusCode::OK),
            ("600000", "/slow/2500", StatusCode::GATEWAY_TIMEOUT),
        ] {
            let req = Request::get(path)
                .header("host", "hello")
                .header("quicar-deadline", forged)
                .body(full(bytes::Bytes::new()))
                .unwrap();
            let got = send(pair.out(), req).await;
            assert_eq!(got.status, want, "forged deadline {forged}: {got:?}");
        }
        // What reached the app carried no deadline field of anyone's.
        for seen in pair.upstream.all() {
            assert!(seen.headers.get("quicar-deadline").is_none(), "{:?}", seen.headers);
        }
    }
}

/// Sends `method path` with `fields` (and a one-byte body for POST) to a sidecar's inbound as
/// a hand-driven peer over transport `t`, on a connection of its own: the status and
/// `quicar-error`, within 10 s (never a hang).
async fn as_peer(
    pki: &Pki,
    inbound: SocketAddr,
    t: &str,
    (method, path): (&str, &str),
    fields: &[(&str, &str)],
) -> (StatusCode, Option<String>) {
    let body = (method == "POST").then_some(bytes::Bytes::from_static(b"x"));
    let mut req = Request::builder()
        .method(method)
        .uri(format!("https://hello{path}"));
    for (name, value) in fields {
        req = req.header(*name, *value);
    }
    if let Some(b) = &body {
        req = req.header("content-length", b.len());
    }
    let req = req.body(()).unwrap();
    let answer = async {
        let head = if t == "quic" {
            let (_endpoint, mut send, driving) = h3_client(pki, inbound).await;
            let mut stream = send.send_request(req).await.unwrap();
            if let Some(b) = body {
                stream.send_data(b).await.unwrap();
            }
            stream.finish().await.unwrap();
            let resp = stream.recv_response().await;
            driving.abort();
            resp.unwrap_or_else(|e| panic!("{method} over {t}: the stream failed: {e}"))
        } else {
            let send = h2_caller(pki, inbound).await;
            let mut send = send.ready().await.unwrap();
            let (resp, mut stream) = send.send_request(req, body.is_none()).unwrap();
            if let Some(b) = body {
                stream.send_data(b, true).unwrap();
            }
            let resp = resp.await;
            resp.unwrap_or_else(|e| panic!("{method} over {t}: the stream failed: {e}"))
                .map(|_| ())
        };
        let kind = head
            .headers()
            .get("quicar-error")
            .map(|v| v.to_str().unwrap().to_string());
        (head.status(), kind)
    };
    tokio::time::timeout(Duration::from_secs(10), answer)
        .await
        .expect("an answer, not a hang")
}

crate::over_transports! {
    // A peer's `quicar-deadline` can only shorten the far app's time, never lengthen it past
    // the `[[local]] timeout`: a caller (another vendor's, or a compromised sidecar) that asks
    // for u64::MAX milliseconds gets the local 300 ms, with and without a request body (both
    // used to get 200 after the app's 3 s: the caller's deadline replaced the local one).
    async fn a_peers_deadline_is_capped_by_the_local_timeout(t) {
        let pair = Pair::start_with("", "timeout = \"300ms\"").await;
        let (pki, inbound) = (&pair.pki, pair.server.inbound);
        let forever = u64::MAX.to_string();
        for method in ["GET", "POST"] {
            let deadline = [("quicar-deadline", forever.as_str())];
            let got = as_peer(pki, inbound, t, (method, "/slow/3000"), &deadline).await;
            assert_eq!(
                got,
                (StatusCode::GATEWAY_TIMEOUT, Some("timeout".to_string())),
                "{method}"
            );
        }
        // A shorter one still applies (the app's 200 ms are within the local 300 but not the
        // caller's 100), and one that is not a number is none.
        let deadline = [("quicar-deadline", "100")];
        let got = as_peer(pki, inbound, t, ("GET", "/slow/200"), &deadline).await;
        assert_eq!(got, (StatusCode::GATEWAY_TIMEOUT, Some("timeout".to_string())));
        let deadline = [("quicar-deadline", "soon")];
        let got = as_peer(pki, inbound, t, ("GET", "/slow/10"), &deadline).await;
        assert_eq!(got, (StatusCode::OK, None));
    }

    // What a peer sends as `quicar-*` is for the sidecar, never the app's: its deadline is
    // read and not passed on, and a forged caller identity (or any other `quicar-*` field) is
    // dropped. The app sees one `quicar-peer-identity`, the one from the caller's certificate,
    // and the peer's own fields beside it.
    async fn a_peers_quicar_fields_never_reach_the_app(t) {
        let pair = Pair::start().await;
        let fields = [
            ("quicar-deadline", "5000"),
            ("quicar-peer-identity", "spiffe://quicar.local/admin"),
            ("quicar-made-up", "x"),
            ("x-kept", "yes"),
        ];
        let got = as_peer(&pair.pki, pair.server.inbound, t, ("GET", "/forged"), &fields).await;
        assert_eq!(got, (StatusCode::OK, None));
        let seen = pair.upstream.last();
        assert_eq!(seen.path, "/forged");
        let ours: Vec<&str> = seen
            .headers
            .keys()
            .map(|k| k.as_str())
            .filter(|k| k.starts_with("quicar-"))
            .collect();
        assert_eq!(ours, ["quicar-peer-identity"], "{:?}", seen.headers);
        assert_eq!(
            values(&seen.headers, "quicar-peer-identity"),
            ["spiffe://quicar.local/web"]
        );
        assert_eq!(values(&seen.headers, "x-kept"), ["yes"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_from_a_watched_file_follow_changes_without_dropping_requests() {
    init_tracing();
    let pki = Pki::new();
    let (app_a, app_b) = (Upstream::start().await, Upstream::start().await);
    let a = sidecar(&pki, &server_toml(&pki, app_a.addr, "127.0.0.1:0", "")).await;
    let b = sidecar(&pki, &server_toml(&pki, app_b.addr, "127.0.0.1:0", "")).await;
    let file = pki.path().join("hello-endpoints.toml");
    let write = |text: String| {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write(format!("endpoints = [{{ address = \"{}\" }}]\n", a.inbound));
    let toml = client_toml(
        &pki,
        &[],
        "discovery = { file = \"hello-endpoints.toml\", interval = \"50ms\" }",
    )
    .replace("endpoints = []\n", "");
    let client = sidecar(&pki, &toml).await;
    assert_eq!(
        get(client.outbound, "hello", "/").await.status,
        StatusCode::OK
    );
    assert_eq!(app_a.count(), 1);

    // A slow request in flight on A while the file moves the service to B.
    let out = client.outbound;
    let slow = tokio::spawn(async move { get(out, "hello", "/slow/800").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    write(format!(
        "endpoints = [{{ address = \"{}\", weight = 2 }}]\n",
        b.inbound
    ));
    let mut moved = false;
    for _ in 0..100 {
        assert_eq!(
            get(client.outbound, "hello", "/").await.status,
            StatusCode::OK
        );
        if app_b.count() > 0 {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "traffic never moved to the new endpoint");
    assert_eq!(
        slow.await.unwrap().status,
        StatusCode::OK,
        "the in-flight request was dropped"
    );

    // A broken file keeps the last good set.
    write("endpoints = [{ address = \"not an address\" }]\n".into());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = app_b.count();
    for _ in 0..5 {
        assert_eq!(
            get(client.outbound, "hello", "/").await.status,
            StatusCode::OK
        );
    }
    assert_eq!(app_b.count(), before + 5);
    // JSON works too.
    let json = pki.path().join("eps.json");
    std::fs::write(&json, format!("[{{\"address\": \"{}\"}}]", a.inbound)).unwrap();
    let src = quicar::discovery::file::FileSource {
        path: json,
        interval: Duration::from_secs(1),
        trust_domain: "quicar.local".into(),
        service: "hello".into(),
    };
    let eps = src.load().unwrap();
    assert_eq!(
        (eps[0].address, eps[0].identity.as_str()),
        (a.inbound, "spiffe://quicar.local/hello")
    );
}

// The resilience mechanisms run over both transports: a killed QUIC endpoint is found by
// connect timeouts, a killed TCP one by refusals.
crate::over_transports! {
    async fn a_killed_endpoint_is_ejected_and_readmitted_while_requests_succeed(t) {
        // One failure ejects: after a failed attempt the balancer already avoids the endpoint (a
        // connect timeout counts as a 500 ms response), so a second failure may never come.
        let mut c = Cluster::over(t, 3, "breaker = { failures = 1, ejection = \"300ms\" }").await;
        for _ in 0..30 {
            assert_eq!(get(c.out(), "hello", "/").await.status, StatusCode::OK);
        }
        c.kill(1).await;
        let killed_at = Instant::now();
        let mut ejected_after = None;
        let out = c.out();
        for _ in 0..30 {
            // Concurrent traffic, as in production: load spreads over every endpoint the balancer
            // still believes in.
            let batch: Vec<_> = (0..6)
                .map(|_| tokio::spawn(async move { get(out, "hello", "/").await }))
                .collect();
            for t in batch {
                let got = t.await.unwrap();
                assert_eq!(
                    got.status,
                    StatusCode::OK,
                    "idempotent requests succeed on the others: {got:?}"
                );
            }
            if ejected_after.is_none() && c.breaker(1).await != "closed" {
                ejected_after = Some(killed_at.elapsed());
            }
        }
        let ejected_after = ejected_after.expect("the killed endpoint was ejected");
        let served_before = c.apps[1].count();
        c.restart(1).await;
        let back_at = Instant::now();
        let mut readmitted_after = None;
        for _ in 0..400 {
            assert_eq!(get(c.out(), "hello", "/").await.status, StatusCode::OK);
            if c.apps[1].count() > served_before && c.breaker(1).await == "closed" {
                readmitted_after = Some(back_at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let readmitted_after = readmitted_after.expect("the restarted endpoint came back");
        eprintln!("ejected {ejected_after:?} after the kill; readmitted {readmitted_after:?} after the restart");
    }

    async fn no_post_is_ever_duplicated(t) {
        let mut c = Cluster::over(t, 2, "breaker = { failures = 1000 }").await;
        // Endpoint 0's app answers 503: a POST that got there may have had effects, so it is
        // never sent again; GETs would be.
        c.apps[0].failing.store(true, Ordering::Relaxed);
        let mut failed = 0;
        // Concurrently, so that outstanding requests spread them over both endpoints (one after
        // another, P2C could keep choosing the endpoint that was faster once).
        let out = c.out();
        let posts: Vec<_> = (0..40)
            .map(|i| {
                tokio::spawn(async move {
                    let req = Request::post(format!("/c/post?id={i}"))
                        .header("host", "hello")
                        .body(full("x"))
                        .unwrap();
                    send(out, req).await
                })
            })
            .collect();
        for p in posts {
            let got = p.await.unwrap();
            if got.status == StatusCode::SERVICE_UNAVAILABLE {
                failed += 1;
            } else {
                assert_eq!(got.status, StatusCode::OK);
            }
        }
        assert!(failed > 0, "the failing endpoint never got a POST");
        // Endpoint 0 down: its POSTs fail before being sent, so they are retried on endpoint 1.
        c.apps[0].failing.store(false, Ordering::Relaxed);
        c.kill(0).await;
        for i in 40..60 {
            let req = Request::post(format!("/c/post?id={i}"))
                .header("host", "hello")
                .body(full("x"))
                .unwrap();
            assert_eq!(
                send(c.out(), req).await.status,
                StatusCode::OK,
                "never-sent POST {i} is retried"
            );
        }
        for i in 0..60 {
            let id = format!("/c/post?id={i}");
            let n: usize = c
                .apps
                .iter()
                .map(|a| {
                    a.seen
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|s| s.path == id)
                        .count()
                })
                .sum();
            assert_eq!(n, 1, "POST {id} reached the apps {n} times");
        }
    }

    async fn retries_stay_within_the_budget_under_total_failure(t) {
        let c = Cluster::over(t, 2, "retry = { attempts = 5, budget_ratio = 0.2, min_per_second = 1, budget_window = \"10s\", backoff = \"1ms\" }\n\
             breaker = { failures = 100000 }",
        )
        .await;
        for app in &c.apps {
            app.failing.store(true, Ordering::Relaxed);
        }
        let requests = 100;
        for i in 0..requests {
            let got = get(c.out(), "hello", &format!("/c/fail?i={i}")).await;
            assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        }
        let attempts: usize = c.apps.iter().map(|a| a.count_of("/c/fail")).sum();
        let retries = attempts - requests;
        // Budget: 0.2 × 100 requests + 1/s × 10 s.
        assert!(retries <= 30, "{retries} retries for {requests} requests");
        assert!(
            retries >= 20,
            "retries were allowed by the budget but not made: {retries}"
        );
        let metrics =
            String::from_utf8_lossy(&get(c.client.admin, "admin", "/metrics").await.body).to_string();
        assert!(
            metrics.contains("quicar_retry_budget_exhausted_total{service=\"hello\"}"),
            "{metrics}"
        );
        eprintln!(
            "retry amplification under total failure: {attempts} attempts for {requests} requests = {:.2}x",
            attempts as f64 / requests as f64
        );
    }

    async fn a_slow_endpoint_loses_traffic_and_equal_ones_share_it(t) {
        let c = Cluster::over(t, 2, "").await;
        // Much slower than a loaded debug build's fast path, so the outcome does not depend on
        // how busy the machine is.
        c.apps[1].delay_ms.store(250, Ordering::Relaxed);
        let out = c.out();
        for _ in 0..25 {
            let batch: Vec<_> = (0..4)
                .map(|_| tokio::spawn(async move { get(out, "hello", "/").await.status }))
                .collect();
            for t in batch {
                assert_eq!(t.await.unwrap(), StatusCode::OK);
            }
        }
        let (fast, slow) = (c.apps[0].count(), c.apps[1].count());
        assert!(
            slow * 4 < fast,
            "slow endpoint still got {slow} of {} requests",
            fast + slow
        );

        let even = Cluster::over(t, 3, "").await;
        let out = even.out();
        for _ in 0..50 {
            let batch: Vec<_> = (0..6)
                .map(|_| tokio::spawn(async move { get(out, "hello", "/").await.status }))
                .collect();
            for t in batch {
                assert_eq!(t.await.unwrap(), StatusCode::OK);
            }
        }
        let counts: Vec<usize> = even.apps.iter().map(Upstream::count).collect();
        for n in &counts {
            assert!(*n >= 45, "uneven spread over equal endpoints: {counts:?}");
        }
    }

    async fn over_the_concurrency_limit_is_503_overloaded(t) {
        let c = Cluster::over(t, 1, "max_concurrent = 2").await;
        let out = c.out();
        let tasks: Vec<_> = (0..6)
            .map(|_| tokio::spawn(async move { get(out, "hello", "/slow/500").await }))
            .collect();
        let mut ok = 0;
        let mut overloaded = 0;
        for t in tasks {
            let got = t.await.unwrap();
            match got.status {
                StatusCode::OK => ok += 1,
                StatusCode::SERVICE_UNAVAILABLE => {
                    assert_eq!(got.error_kind(), Some("overloaded"));
                    overloaded += 1;
                }
                s => panic!("unexpected {s}"),
            }
        }
        assert!((1..=2).contains(&ok), "{ok} ok");
        assert_eq!(ok + overloaded, 6);
        // Every place came back as its request ended, refused ones included.
        for _ in 0..3 {
            two_at_once_pass(out).await;
        }
    }

    async fn all_endpoints_ejected_is_503_circuit_open(t) {
        // Panic routing off: with it (the default) a lone ejected endpoint keeps taking traffic.
        let mut c = Cluster::over(t, 1, "breaker = { failures = 1, ejection = \"30s\", panic_threshold = 0 }",
        )
        .await;
        assert_eq!(get(c.out(), "hello", "/").await.status, StatusCode::OK);
        c.kill(0).await;
        let first = get(c.out(), "hello", "/").await;
        assert!(
            first.error_kind() == Some("connect-failed") || first.error_kind() == Some("circuit-open"),
            "{first:?}"
        );
        let got = get(c.out(), "hello", "/").await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(got.error_kind(), Some("circuit-open"));
        let text = String::from_utf8_lossy(&got.body);
        assert!(text.contains("last failure:"), "the cause is named: {text}");
        assert_eq!(c.breaker(0).await, "open");
    }
}
