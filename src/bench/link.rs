//! Link emulation for the transport benchmark, since this kernel has no `netem`: two network
//! namespaces joined by TUN devices, and a forwarder in between that applies one-way delay,
//! jitter, random loss and an optional rate limit with a bounded queue to every IP packet, TCP
//! and UDP alike. It reports what it forwarded, dropped, and how late it delivered.

use std::collections::VecDeque;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// What the link does to each packet, in each direction.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct LinkParams {
    pub delay: Duration,
    pub jitter: Duration,
    /// Probability in [0, 1].
    pub loss: f64,
    /// Bits per second; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// Most queueing the rate limiter allows before tail drop.
    pub queue: Duration,
}

impl Default for LinkParams {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue: Duration::from_millis(50),
        }
    }
}

/// Counters the forwarder keeps, so a user can trust the link.
#[derive(Default)]
pub struct LinkStats {
    pub forwarded: AtomicU64,
    /// The largest IP packet forwarded, bytes (at most the link's MTU).
    pub largest: AtomicU64,
    pub dropped_loss: AtomicU64,
    pub dropped_queue: AtomicU64,
    /// How late packets left the forwarder after their due time, in microseconds.
    lateness_us: Mutex<Option<Histogram<u64>>>,
}

/// A snapshot of the link's counters for a report.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LinkReport {
    pub forwarded: u64,
    pub largest_packet: u64,
    pub dropped_loss: u64,
    pub dropped_queue: u64,
    pub late_p50_us: u64,
    pub late_p99_us: u64,
}

impl LinkStats {
    fn late(&self, us: u64) {
        let mut h = self.lateness_us.lock().expect("not poisoned");
        let h = h.get_or_insert_with(|| Histogram::new(3).expect("3 significant figures"));
        let _ = h.record(us.max(1));
    }

    /// Reads and resets the counters.
    pub fn take(&self) -> LinkReport {
        let h = self.lateness_us.lock().expect("not poisoned").take();
        LinkReport {
            forwarded: self.forwarded.swap(0, Ordering::Relaxed),
            largest_packet: self.largest.swap(0, Ordering::Relaxed),
            dropped_loss: self.dropped_loss.swap(0, Ordering::Relaxed),
            dropped_queue: self.dropped_queue.swap(0, Ordering::Relaxed),
            late_p50_us: h.as_ref().map_or(0, |h| h.value_at_quantile(0.5)),
            late_p99_us: h.as_ref().map_or(0, |h| h.value_at_quantile(0.99)),
        }
    }
}

/// The two namespaces and the forwarder between them. Dropping it removes the namespaces.
pub struct Link {
    pub ns_a: String,
    pub ns_b: String,
    pub params: Arc<Mutex<LinkParams>>,
    pub stats: Arc<LinkStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Address of side A (the caller) and side B (the service) inside their namespaces.
pub const ADDR_A: &str = "198.18.0.1";
pub const ADDR_B: &str = "198.18.1.1";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Link {
    /// Creates namespaces `quicar-a-<tag>` and `quicar-b-<tag>`, a TUN device with `mtu` in
    /// each, and starts forwarding. Needs root (CAP_NET_ADMIN).
    pub fn create(tag: &str, mtu: u16) -> Result<Self, String> {
        let ns_a = format!("quicar-a-{tag}");
        let ns_b = format!("quicar-b-{tag}");
        let (tun_a_name, tun_b_name) = (format!("qa{tag}"), format!("qb{tag}"));
        for ns in [&ns_a, &ns_b] {
            let _ = ip(&["netns", "del", ns]);
            ip(&["netns", "add", ns])?;
        }
        let open = |name: &str| -> Result<tokio_tun::Tun, String> {
            tokio_tun::Tun::builder()
                .name(name)
                .mtu(i32::from(mtu))
                .build()
                .map_err(|e| format!("cannot create TUN device {name}: {e}"))?
                .pop()
                .ok_or_else(|| format!("no queue for TUN device {name}"))
        };
        let tun_a = Arc::new(open(&tun_a_name)?);
        let tun_b = Arc::new(open(&tun_b_name)?);
        // The devices move into the namespaces; our file descriptors stay attached to them.
        for (dev, ns, addr) in [(&tun_a_name, &ns_a, ADDR_A), (&tun_b_name, &ns_b, ADDR_B)] {
            ip(&["link", "set", dev, "netns", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/15"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        let params = Arc::new(Mutex::new(LinkParams::default()));
        let stats = Arc::new(LinkStats::default());
        let tasks = vec![
            tokio::spawn(forward(
                tun_a.clone(),
                tun_b.clone(),
                params.clone(),
                stats.clone(),
                1,
            )),
            tokio::spawn(forward(tun_b, tun_a, params.clone(), stats.clone(), 2)),
        ];
        Ok(Self {
            ns_a,
            ns_b,
            params,
            stats,
            tasks,
        })
    }

    pub fn set(&self, p: LinkParams) {
        *self.params.lock().expect("not poisoned") = p;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = ip(&["netns", "del", &self.ns_a]);
        let _ = ip(&["netns", "del", &self.ns_b]);
    }
}

/// xorshift64*: fast, seeded, good enough to decide losses and jitter.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Packets waiting for their delivery time, in order.
type DueQueue = VecDeque<(Instant, Vec<u8>)>;

/// One direction: read, decide, queue with a due time, write when due (FIFO, so jitter does
/// not reorder packets).
async fn forward(
    from: Arc<tokio_tun::Tun>,
    to: Arc<tokio_tun::Tun>,
    params: Arc<Mutex<LinkParams>>,
    stats: Arc<LinkStats>,
    seed: u64,
) {
    let queue: Arc<Mutex<DueQueue>> = Arc::default();
    let notify = Arc::new(tokio::sync::Notify::new());
    {
        let (queue, notify, stats) = (queue.clone(), notify.clone(), stats.clone());
        tokio::spawn(async move {
            loop {
                let next = queue.lock().expect("not poisoned").front().map(|(t, _)| *t);
                match next {
                    None => notify.notified().await,
                    Some(due) => {
                        // The timer wheel has millisecond ticks: only sleep when the packet
                        // is really early, so a zero-delay link adds no timer latency.
                        if due > Instant::now() {
                            tokio::time::sleep_until(due).await;
                        }
                        let item = queue.lock().expect("not poisoned").pop_front();
                        if let Some((due, pkt)) = item {
                            let late = Instant::now().saturating_duration_since(due);
                            stats.late(late.as_micros() as u64);
                            let _ = to.send(&pkt).await;
                            stats.forwarded.fetch_add(1, Ordering::Relaxed);
                            stats.largest.fetch_max(pkt.len() as u64, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
    }
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ seed);
    let mut buf = vec![0u8; 65536];
    let mut last_departure = Instant::now();
    let mut last_due = Instant::now();
    loop {
        let Ok(n) = from.recv(&mut buf).await else {
            return;
        };
        let p = *params.lock().expect("not poisoned");
        if p.loss > 0.0 && rng.next_f64() < p.loss {
            stats.dropped_loss.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let now = Instant::now();
        let departure = match p.rate_bps {
            Some(rate) => {
                let start = last_departure.max(now);
                if start.duration_since(now) > p.queue {
                    stats.dropped_queue.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let d = start + Duration::from_secs_f64(n as f64 * 8.0 / rate as f64);
                last_departure = d;
                d
            }
            None => now,
        };
        let jitter = p.jitter.mul_f64(rng.next_f64());
        let due = (departure + p.delay + jitter).max(last_due);
        last_due = due;
        queue
            .lock()
            .expect("not poisoned")
            .push_back((due, buf[..n].to_vec()));
        notify.notify_one();
    }
}
