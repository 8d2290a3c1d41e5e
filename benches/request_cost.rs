//! `cargo bench --bench request_cost`: what one request costs a sidecar pair, in process, for
//! the QUIC and the TCP transport: CPU time and heap allocations per request.
//!
//! One process holds a load client, the two sidecars (certificates made at start) and the
//! benchmark backend, all on one tokio thread, so the figures are the whole chain's work per
//! request on one core: client → sidecar A → (QUIC | TLS+h2) → sidecar B → backend and back.
//! The same client straight to the backend (`direct`) is measured in the same run; `pair` is
//! the difference, the sidecars' own cost. Allocations are counted by a counting global
//! allocator (all threads). Rounds are interleaved (direct, quic, tcp, direct, …) and the
//! median round is reported. Environment: `REQUEST_COST_REQUESTS` (per round, default 20000),
//! `REQUEST_COST_ROUNDS` (default 5), `REQUEST_COST_CONCURRENCY` (default 8), and
//! `REQUEST_COST_ONLY=quic|tcp` to run one transport alone (for a profiler such as callgrind).

use std::alloc::System;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User and system CPU time of this process so far.
fn cpu_time() -> (Duration, Duration) {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // USER_HZ is 100 on Linux.
    let ticks = |i: usize| Duration::from_millis(f[i].parse::<u64>().expect("ticks") * 10);
    (ticks(11), ticks(12))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

struct Pair {
    client: quicar::app::Bound,
    server: quicar::app::Bound,
    backend: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn pair() -> Pair {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = quicar::pki::Ca::generate("quicar.local").expect("CA");
    ca.write(dir.path()).expect("write CA");
    for name in ["web", "hello"] {
        ca.issue(name)
            .expect("issue")
            .write(dir.path(), name)
            .expect("write identity");
    }
    let backend: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    quicar::bench::serve_backend(backend)
        .await
        .expect("backend");
    let config = |name: &str, rest: &str| {
        let text = format!(
            "[node]\nname = \"{name}\"\n\
             [identity]\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\nca = \"ca.crt\"\n\
             [outbound]\nlisten = \"127.0.0.1:0\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n{rest}"
        );
        quicar::config::Config::parse(&text, name, dir.path()).expect("config")
    };
    let server = quicar::app::build(config(
        "hello",
        &format!(
            "[[local]]\nname = \"hello-quic\"\naddress = \"{backend}\"\n\
             [[local]]\nname = \"hello-tcp\"\naddress = \"{backend}\"\n"
        ),
    ))
    .await
    .expect("server sidecar");
    let peer = server.inbound;
    let client = quicar::app::build(config(
        "web",
        &format!(
            "[[service]]\nname = \"hello-quic\"\ntransport = \"quic\"\n\
             endpoints = [{{ address = \"{peer}\", identity = \"spiffe://quicar.local/hello\" }}]\n\
             [[service]]\nname = \"hello-tcp\"\ntransport = \"tcp\"\n\
             endpoints = [{{ address = \"{peer}\", identity = \"spiffe://quicar.local/hello\" }}]\n"
        ),
    ))
    .await
    .expect("client sidecar");
    Pair {
        client,
        server,
        backend,
        _dir: dir,
    }
}

/// `requests` GETs over `concurrency` keep-alive HTTP/1.1 connections to `addr`.
async fn load(addr: SocketAddr, host: &'static str, requests: usize, concurrency: usize) {
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let n = requests / concurrency + usize::from(i < requests % concurrency);
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            stream.set_nodelay(true).expect("nodelay");
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .expect("handshake");
            tokio::spawn(conn);
            for _ in 0..n {
                send.ready().await.expect("ready");
                let req = Request::get("/r?size=256")
                    .header("host", host)
                    .body(Empty::new())
                    .expect("request");
                let resp = send.send_request(req).await.expect("response");
                assert!(resp.status().is_success(), "{host}: {}", resp.status());
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                assert_eq!(body.len(), 256);
            }
        }));
    }
    for t in tasks {
        t.await.expect("load task");
    }
}

#[derive(Clone, Copy)]
struct Sample {
    cpu_ns: f64,
    /// The kernel's share of `cpu_ns` (sockets, wake-ups).
    sys_ns: f64,
    wall_ns: f64,
    allocs: f64,
    bytes: f64,
}

async fn measure(
    addr: SocketAddr,
    host: &'static str,
    requests: usize,
    concurrency: usize,
) -> Sample {
    // Warm-up: connections open, caches and pools filled.
    load(addr, host, requests / 10 + concurrency, concurrency).await;
    let region = Region::new(GLOBAL);
    let ((user0, sys0), t0) = (cpu_time(), Instant::now());
    load(addr, host, requests, concurrency).await;
    let ((user1, sys1), wall) = (cpu_time(), t0.elapsed());
    let (cpu, sys) = ((user1 + sys1) - (user0 + sys0), sys1 - sys0);
    let stats = region.change();
    let n = requests as f64;
    Sample {
        cpu_ns: cpu.as_nanos() as f64 / n,
        sys_ns: sys.as_nanos() as f64 / n,
        wall_ns: wall.as_nanos() as f64 / n,
        allocs: stats.allocations as f64 / n,
        bytes: stats.bytes_allocated as f64 / n,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    // `cargo nextest run --all-targets` lists each target's tests with `--list`: a benchmark
    // has none, and running it then would take minutes (and outlive a cancelled run).
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let requests = env("REQUEST_COST_REQUESTS", 20_000);
    let rounds = env("REQUEST_COST_ROUNDS", 5).max(1);
    let concurrency = env("REQUEST_COST_CONCURRENCY", 8).max(1);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let p = pair().await;
        let out = p.client.outbound;
        let targets: [(&str, SocketAddr, &'static str); 3] = [
            ("direct", p.backend, "backend"),
            ("quic", out, "hello-quic"),
            ("tcp", out, "hello-tcp"),
        ];
        if let Ok(only) = std::env::var("REQUEST_COST_ONLY") {
            let (_, addr, host) = targets
                .iter()
                .find(|t| t.0 == only)
                .expect("REQUEST_COST_ONLY is direct, quic or tcp");
            let s = measure(*addr, host, requests, concurrency).await;
            println!(
                "{only}: {:.1} µs CPU, {:.0} allocations, {:.0} bytes per request",
                s.cpu_ns / 1000.0,
                s.allocs,
                s.bytes
            );
            return;
        }
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); targets.len()];
        for _ in 0..rounds {
            for (i, (_, addr, host)) in targets.iter().enumerate() {
                samples[i].push(measure(*addr, host, requests, concurrency).await);
            }
        }
        let med = |i: usize, f: fn(&Sample) -> f64| median(samples[i].iter().map(f).collect());
        println!(
            "request_cost: {requests} GETs (256 B responses) per round over {concurrency} keep-alive \
             connections, {rounds} rounds interleaved, medians; one tokio thread holds the client, \
             both sidecars and the backend.\n"
        );
        println!("| target | CPU µs/request | of which kernel | wall µs/request | allocations/request | bytes allocated/request |");
        println!("|---|---|---|---|---|---|");
        for (i, (name, _, _)) in targets.iter().enumerate() {
            println!(
                "| {name} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
                med(i, |s| s.cpu_ns) / 1000.0,
                med(i, |s| s.sys_ns) / 1000.0,
                med(i, |s| s.wall_ns) / 1000.0,
                med(i, |s| s.allocs),
                med(i, |s| s.bytes)
            );
        }
        for (i, name) in [(1, "quic"), (2, "tcp")] {
            println!(
                "| {name} pair (− direct) | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
                (med(i, |s| s.cpu_ns) - med(0, |s| s.cpu_ns)) / 1000.0,
                (med(i, |s| s.sys_ns) - med(0, |s| s.sys_ns)) / 1000.0,
                (med(i, |s| s.wall_ns) - med(0, |s| s.wall_ns)) / 1000.0,
                med(i, |s| s.allocs) - med(0, |s| s.allocs),
                med(i, |s| s.bytes) - med(0, |s| s.bytes)
            );
        }
        p.client.shutdown().await;
        p.server.shutdown().await;
    });
}
