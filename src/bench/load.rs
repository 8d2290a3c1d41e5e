//! The load generator: HTTP/1.1 over a fixed set of keep-alive connections, either open loop
//! at a constant rate (requests scheduled on a clock, latency measured from the scheduled send
//! time, so queueing is not hidden: wrk2 / oha `--latency-correction`) or closed loop (each
//! connection sends its next request when the last one finished). HDR histograms.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Open,
    Closed,
}

/// One load run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoadSpec {
    /// Where to connect (the sidecar's outbound listener or the backend itself).
    pub connect: SocketAddr,
    /// `Host` header (the service name, through a sidecar).
    pub host: String,
    pub path: String,
    pub mode: Mode,
    /// Requests per second (open loop).
    pub rate: f64,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Request body size; 0 sends GETs, more sends POSTs with that many bytes.
    #[serde(default)]
    pub request_size: usize,
}

/// What a run measured; latencies in microseconds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// (quantile, µs) pairs for a CDF.
    pub cdf: Vec<(f64, u64)>,
}

struct Shared {
    hist: Histogram<u64>,
    errors: u64,
    requests: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Option<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}

/// One request on a connection; reconnects when the connection is gone. Returns success.
async fn one(send: &mut Option<Sender>, spec: &LoadSpec, body: &Bytes) -> bool {
    if send.as_ref().is_none_or(|s| s.is_closed()) {
        *send = connect(spec.connect).await;
    }
    let Some(s) = send.as_mut() else { return false };
    if s.ready().await.is_err() {
        *send = None;
        return false;
    }
    let method = if body.is_empty() {
        http::Method::GET
    } else {
        http::Method::POST
    };
    let req = Request::builder()
        .method(method)
        .uri(spec.path.as_str())
        .header(http::header::HOST, spec.host.as_str())
        .body(Full::new(body.clone()))
        .expect("valid request");
    match s.send_request(req).await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            let body_ok = resp.into_body().collect().await.is_ok();
            ok && body_ok
        }
        Err(_) => {
            *send = None;
            false
        }
    }
}

pub async fn run(spec: LoadSpec) -> LoadResult {
    let shared = Arc::new(Mutex::new(Shared {
        hist: Histogram::new_with_bounds(1, 120_000_000, 3).expect("bounds"),
        errors: 0,
        requests: 0,
    }));
    let body = Bytes::from(vec![b'q'; spec.request_size]);
    // Open loop: all connections are up before the clock starts (connecting them is not part
    // of any request's latency); closed loop: each worker connects first, within the warm-up.
    let pool = if spec.mode == Mode::Open {
        let conns: Vec<_> = (0..spec.connections)
            .map(|_| tokio::spawn(connect(spec.connect)))
            .collect();
        let mut v = Vec::new();
        for c in conns {
            v.push(c.await.ok().flatten());
        }
        v
    } else {
        Vec::new()
    };
    let start = Instant::now();
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let record = {
        let shared = shared.clone();
        move |scheduled: Instant, ok: bool| {
            let done = Instant::now();
            if scheduled < measure_from || scheduled >= end {
                return;
            }
            let mut s = shared.lock().expect("not poisoned");
            s.requests += 1;
            if ok {
                let _ = s
                    .hist
                    .record(done.duration_since(scheduled).as_micros().max(1) as u64);
            } else {
                s.errors += 1;
            }
        }
    };
    let spec = Arc::new(spec);
    match spec.mode {
        Mode::Closed => {
            let workers: Vec<_> = (0..spec.connections)
                .map(|_| {
                    let (spec, record, body) = (spec.clone(), record.clone(), body.clone());
                    tokio::spawn(async move {
                        let mut send = connect(spec.connect).await;
                        while Instant::now() < end {
                            let t = Instant::now();
                            let ok = one(&mut send, &spec, &body).await;
                            record(t, ok);
                        }
                    })
                })
                .collect();
            for w in workers {
                let _ = w.await;
            }
        }
        Mode::Open => {
            // Connections wait in a pool; each scheduled request takes one when it is free.
            let (tx, rx) = async_channel(spec.connections);
            for c in pool {
                let _ = tx.send(c).await;
            }
            let interval = Duration::from_secs_f64(1.0 / spec.rate.max(0.001));
            let mut i: u64 = 0;
            let mut tasks = Vec::new();
            loop {
                let scheduled = start + interval.mul_f64(i as f64);
                if scheduled >= end {
                    break;
                }
                tokio::time::sleep_until(scheduled).await;
                let (spec, record, tx, rx, body) = (
                    spec.clone(),
                    record.clone(),
                    tx.clone(),
                    rx.clone(),
                    body.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let Ok(mut send) = rx.recv().await else {
                        return;
                    };
                    let ok = one(&mut send, &spec, &body).await;
                    record(scheduled, ok);
                    let _ = tx.send(send).await;
                }));
                i += 1;
            }
            // Requests still queued at the end count with their full wait, bounded.
            let deadline = end + Duration::from_secs(30);
            for t in tasks {
                let _ = tokio::time::timeout_at(deadline, t).await;
            }
        }
    }
    let s = shared.lock().expect("not poisoned");
    let h = &s.hist;
    let q = |x: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(x)
        }
    };
    LoadResult {
        requests: s.requests,
        errors: s.errors,
        rps: s.requests as f64 / spec.duration.as_secs_f64(),
        p50_us: q(0.5),
        p90_us: q(0.9),
        p99_us: q(0.99),
        p999_us: q(0.999),
        max_us: if h.is_empty() { 0 } else { h.max() },
        cdf: [0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999]
            .iter()
            .map(|&x| (x, q(x)))
            .collect(),
    }
}

/// A tiny multi-producer multi-consumer channel from tokio primitives (a pool of connections).
fn async_channel<T: Send + 'static>(cap: usize) -> (PoolTx<T>, PoolRx<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(cap.max(1));
    (PoolTx(tx), PoolRx(Arc::new(tokio::sync::Mutex::new(rx))))
}

struct PoolTx<T>(tokio::sync::mpsc::Sender<T>);
struct PoolRx<T>(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<T>>>);

impl<T> Clone for PoolTx<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}
impl<T> Clone for PoolRx<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}
impl<T> PoolTx<T> {
    async fn send(&self, v: T) -> Result<(), ()> {
        self.0.send(v).await.map_err(|_| ())
    }
}
impl<T> PoolRx<T> {
    async fn recv(&self) -> Result<T, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}
