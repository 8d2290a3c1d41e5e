//! `quicar bench`: the TCP-vs-QUIC comparison. It builds an emulated link between two network
//! namespaces, runs a sidecar pair and a backend across it, and drives the same load through
//! QUIC, through TCP and straight to the backend, interleaved (A B C A B C …), for a matrix of
//! loss, delay and workload. Results: a Markdown table, JSON, and an SVG chart.

pub mod link;
pub mod load;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::body::{full, ProxyBody};
use crate::config::Congestion;
use crate::facts::Transport;
use link::{Link, LinkParams, LinkReport, ADDR_A, ADDR_B};
use load::{LoadResult, LoadSpec, Mode};

/// What `quicar bench` runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Two scenarios, short runs, one round: a smoke test (`cargo bench`).
    pub quick: bool,
    /// Both sidecars, the backend and the load generator on loopback, with no link emulation:
    /// the transports' own overhead, and no root needed.
    pub loopback: bool,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    pub out: PathBuf,
    /// The quicar binary to run inside the namespaces.
    pub exe: PathBuf,
    pub congestion: Congestion,
    /// Open-loop rate of the small-request workload.
    pub rate: f64,
    pub rate_limit_bps: Option<u64>,
    /// Connections the open-loop workload keeps to its target.
    pub connections: usize,
    /// Response size of the small-request workload.
    pub small_size: usize,
    /// Concurrency and response size of the concurrent workload.
    pub concurrent: usize,
    pub concurrent_size: usize,
    /// Request body size (0 = GET).
    pub request_size: usize,
    /// The emulated link's MTU, bytes (TUN devices and routes on both ends).
    pub mtu: u16,
    /// How long the backend takes before answering.
    pub service_time: Duration,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub enum Workload {
    /// Many small requests (256 B responses) at a fixed rate, open loop.
    Small,
    /// `--concurrent` requests in flight (32) for `--concurrent-size` responses (16 KiB), closed
    /// loop: one multiplexed connection between sidecars.
    Concurrent,
}

impl Workload {
    /// How the report's table and chart name it, with the sizes the run used ("32 concurrent
    /// 16 KiB responses", "32×16KiB").
    fn labels(self, opts: &Options) -> (String, String) {
        match self {
            Self::Small => ("small requests at a fixed rate".into(), "small".into()),
            Self::Concurrent => {
                let size = match opts.concurrent_size {
                    n if n >= 1024 && n % 1024 == 0 => format!("{} KiB", n / 1024),
                    n => format!("{n} B"),
                };
                let n = opts.concurrent;
                (
                    format!("{n} concurrent {size} responses"),
                    format!("{n}×{}", size.replace(' ', "")),
                )
            }
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Scenario {
    pub loss: f64,
    pub delay_ms: u64,
    pub workload: Workload,
    /// The workload as the report's table and its chart name it.
    pub label: String,
    pub short: String,
}

/// Where a benchmark run sends its load: through the sidecar pair over one wire, or straight
/// to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Via(Transport),
    Direct,
}

impl Target {
    const ALL: [Self; 3] = [
        Self::Via(Transport::Quic),
        Self::Via(Transport::Tcp),
        Self::Direct,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Via(t) => t.as_str(),
            Self::Direct => "direct",
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    pub scenario: Scenario,
    #[serde(serialize_with = "target_name")]
    pub target: Target,
    pub round: usize,
    pub result: LoadResult,
    pub link: LinkReport,
}

#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub command: String,
    /// `emulated` (namespaces and the TUN forwarder) or `loopback` (no emulation).
    pub network: &'static str,
    pub quic_congestion: &'static str,
    pub tcp_congestion: String,
    pub link_rate_bps: Option<u64>,
    /// The emulated link's MTU (`None` on loopback).
    pub link_mtu: Option<u16>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub rounds: usize,
    pub runs: Vec<Run>,
}

fn target_name<S: serde::Serializer>(t: &Target, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(t.as_str())
}

/// True when running as root (namespaces and TUN devices need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A child process stopped by PID when dropped ([`Proc::stop`]).
struct Proc(Child);

/// How long a stopped child has to exit on its own (the nodes drain for 1 s).
const STOP_GRACE: Duration = Duration::from_secs(3);

impl Proc {
    /// SIGTERM, so a node drains and exits as a sidecar does (and a build instrumented for
    /// profile-guided optimisation writes its profile, `benches/pgo.sh`), then SIGKILL if it
    /// is still there after `grace` (or if waiting for it failed). Returns how it ended.
    fn stop(&mut self, grace: Duration) -> std::io::Result<std::process::ExitStatus> {
        let pid = i32::try_from(self.0.id()).map(nix::unistd::Pid::from_raw);
        if let (Ok(None), Ok(pid)) = (self.0.try_wait(), pid) {
            if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok() {
                let until = std::time::Instant::now() + grace;
                while std::time::Instant::now() < until {
                    match self.0.try_wait() {
                        Ok(Some(status)) => return Ok(status),
                        Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                        Err(_) => break,
                    }
                }
            }
        }
        let _ = self.0.kill();
        self.0.wait()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop(STOP_GRACE);
    }
}

/// Where the pair runs: across the emulated link (namespaces, root), or all on loopback.
enum Net {
    Emulated(Link),
    Loopback,
}

/// Which end of the pair: A (the caller, its load generator) or B (the service, its backend).
#[derive(Clone, Copy)]
enum End {
    A,
    B,
}

impl Net {
    /// `exe args`, run at `end` (inside its namespace when the link is emulated).
    fn command(&self, end: End, exe: &Path, args: &[String]) -> Command {
        match self {
            Self::Emulated(link) => {
                let ns = match end {
                    End::A => &link.ns_a,
                    End::B => &link.ns_b,
                };
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(exe).args(args);
                c
            }
            Self::Loopback => {
                let mut c = Command::new(exe);
                c.args(args);
                c
            }
        }
    }

    fn set(&self, p: LinkParams) {
        if let Self::Emulated(link) = self {
            link.set(p);
        }
    }

    fn take(&self) -> LinkReport {
        match self {
            Self::Emulated(link) => link.stats.take(),
            Self::Loopback => LinkReport::default(),
        }
    }
}

/// A port free on 127.0.0.1 for both TCP and UDP just now (the sidecar's inbound needs both).
fn free_port() -> Result<u16, String> {
    for _ in 0..100 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = tcp.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port on 127.0.0.1".into())
}

/// Starts `quicar internal node` at one end and waits for its "ready" line.
fn node(net: &Net, end: End, exe: &Path, args: &[String]) -> Result<Proc, String> {
    let ns = match end {
        End::A => "side A",
        End::B => "side B",
    };
    let mut child = net
        .command(end, exe, args)
        .env("QUICAR_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start a node in {ns}: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = BufReader::new(stdout).lines();
    let proc = Proc(child);
    match lines.next() {
        Some(Ok(l)) if l.starts_with("ready") => Ok(proc),
        other => Err(format!("node in {ns} did not start: {other:?}")),
    }
}

async fn load_in(net: &Net, exe: &Path, spec: &LoadSpec) -> Result<LoadResult, String> {
    let json = serde_json::to_string(spec).expect("plain struct");
    // A std child read on a blocking thread (tokio's process driver would run in every
    // sidecar's event loop, at each wake-up, for this one command); killed if dropped.
    let mut proc = Proc(
        net.command(End::A, exe, &["internal".into(), "load".into(), json])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot run the load generator: {e}"))?,
    );
    let mut stdout = proc.0.stdout.take().expect("piped");
    let out = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut out).map(|_| out)
    })
    .await
    .expect("the reader does not panic")
    .map_err(|e| format!("load generator output: {e}"))?;
    // Its output ended, so it has exited or is exiting: a short wait.
    let status = proc.0.wait().map_err(|e| format!("load generator: {e}"))?;
    if !status.success() {
        return Err(format!("load generator failed: {status}"));
    }
    serde_json::from_slice(&out).map_err(|e| format!("load generator output: {e}"))
}

fn scenarios(opts: &Options) -> Vec<Scenario> {
    let (quick, loopback) = (opts.quick, opts.loopback);
    let mut v = Vec::new();
    let losses: &[f64] = match (loopback, quick) {
        (true, _) => &[0.0],
        (false, true) => &[0.0, 0.02],
        (false, false) => &[0.0, 0.005, 0.02],
    };
    let delays: &[u64] = match (loopback, quick) {
        (true, _) => &[0],
        (false, true) => &[25],
        (false, false) => &[0, 25],
    };
    let workloads: &[Workload] = if quick && !loopback {
        &[Workload::Concurrent]
    } else {
        &[Workload::Small, Workload::Concurrent]
    };
    for &workload in workloads {
        for &delay_ms in delays {
            for &loss in losses {
                let (label, short) = workload.labels(opts);
                v.push(Scenario {
                    loss,
                    delay_ms,
                    workload,
                    label,
                    short,
                });
            }
        }
    }
    v
}

fn write_pki(dir: &Path) -> Result<(), String> {
    let ca = crate::pki::Ca::generate("quicar.local").map_err(|e| e.to_string())?;
    ca.write(dir).map_err(|e| e.to_string())?;
    for n in ["web", "hello"] {
        ca.issue(n)
            .map_err(|e| e.to_string())?
            .write(dir, n)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

const BACKEND_PORT: u16 = 9000;
const SIDECAR_PORT: u16 = 4143;
const OUTBOUND_PORT: u16 = 4140;

/// Runs the whole comparison and writes the report files. Returns the Markdown.
pub async fn run(opts: Options, command: String) -> Result<String, String> {
    if !opts.loopback && !is_root() {
        return Err(
            "quicar bench needs root: it creates two network namespaces and TUN devices \
                    for the link emulation (this kernel has no netem). Run it as root, or run \
                    `quicar bench --loopback` (no link emulation, no root) to compare the \
                    transports' own overhead."
                .into(),
        );
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    write_pki(dir.path())?;
    // Addresses: each end in its namespace on fixed ports, or all on 127.0.0.1 on free ports
    // (each sidecar's unused listener on port 0).
    let (addr_a, addr_b, outbound_port, sidecar_port, backend_port) = if opts.loopback {
        (
            "127.0.0.1",
            "127.0.0.1",
            free_port()?,
            free_port()?,
            free_port()?,
        )
    } else {
        (ADDR_A, ADDR_B, OUTBOUND_PORT, SIDECAR_PORT, BACKEND_PORT)
    };
    let (a_inbound, b_outbound) = if opts.loopback {
        (0, 0)
    } else {
        (SIDECAR_PORT, OUTBOUND_PORT)
    };
    let common = |name: &str, outbound: u16, inbound: String| {
        format!(
            "[node]\nname = \"{name}\"\ndrain_timeout = \"1s\"\n\
             [identity]\ncert = \"{name}.crt\"\nkey = \"{name}.key\"\nca = \"ca.crt\"\n\
             [outbound]\nlisten = \"127.0.0.1:{outbound}\"\ntransport_header = true\n\
             [inbound]\nlisten = \"{inbound}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [quic]\ncongestion = \"{}\"\n",
            opts.congestion.as_str()
        )
    };
    let b = common("hello", b_outbound, format!("{addr_b}:{sidecar_port}"))
        + &format!(
            "[[local]]\nname = \"hello-quic\"\naddress = \"{addr_b}:{backend_port}\"\n\
             [[local]]\nname = \"hello-tcp\"\naddress = \"{addr_b}:{backend_port}\"\n"
        );
    let mut a = common("web", outbound_port, format!("{addr_a}:{a_inbound}"));
    for t in [Transport::Quic, Transport::Tcp].map(Transport::as_str) {
        a += &format!(
            "[[service]]\nname = \"hello-{t}\"\ntransport = \"{t}\"\ntimeout = \"120s\"\nmax_concurrent = 100000\n\
             retry = {{ attempts = 1 }}\n\
             endpoints = [{{ address = \"{addr_b}:{sidecar_port}\", identity = \"spiffe://quicar.local/hello\" }}]\n"
        );
    }
    std::fs::write(dir.path().join("a.toml"), a).map_err(|e| e.to_string())?;
    std::fs::write(dir.path().join("b.toml"), b).map_err(|e| e.to_string())?;

    let net = if opts.loopback {
        Net::Loopback
    } else {
        let tag = format!("{}", std::process::id() % 100_000);
        Net::Emulated(Link::create(&tag, opts.mtu)?)
    };
    let tcp_congestion = net
        .command(
            End::A,
            Path::new("sysctl"),
            &["-n".into(), "net.ipv4.tcp_congestion_control".into()],
        )
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let s = |x: &str| x.to_string();
    let cfg = |f: &str| dir.path().join(f).display().to_string();
    let _b = node(
        &net,
        End::B,
        &opts.exe,
        &[
            s("internal"),
            s("node"),
            s("--config"),
            cfg("b.toml"),
            s("--backend"),
            format!("{addr_b}:{backend_port}"),
        ],
    )?;
    let _a = node(
        &net,
        End::A,
        &opts.exe,
        &[s("internal"), s("node"), s("--config"), cfg("a.toml")],
    )?;

    let mut runs = Vec::new();
    let rounds = opts.rounds.max(1);
    for sc in scenarios(&opts) {
        net.set(LinkParams {
            delay: Duration::from_millis(sc.delay_ms),
            jitter: Duration::ZERO,
            loss: sc.loss,
            rate_bps: opts.rate_limit_bps,
            queue: Duration::from_millis(50),
        });
        for round in 0..rounds {
            for target in Target::ALL {
                let (connect, host): (SocketAddr, String) = match target {
                    Target::Direct => (
                        format!("{addr_b}:{backend_port}").parse().expect("addr"),
                        "backend".into(),
                    ),
                    Target::Via(t) => (
                        format!("127.0.0.1:{outbound_port}").parse().expect("addr"),
                        format!("hello-{}", t.as_str()),
                    ),
                };
                let delay = opts.service_time.as_millis();
                let spec = match sc.workload {
                    Workload::Small => LoadSpec {
                        connect,
                        host,
                        path: format!("/r?size={}&delay={delay}", opts.small_size),
                        mode: Mode::Open,
                        rate: opts.rate,
                        connections: opts.connections,
                        duration: opts.duration,
                        warmup: opts.warmup,
                        request_size: opts.request_size,
                    },
                    Workload::Concurrent => LoadSpec {
                        connect,
                        host,
                        path: format!("/r?size={}&delay={delay}", opts.concurrent_size),
                        mode: Mode::Closed,
                        rate: 0.0,
                        connections: opts.concurrent,
                        duration: opts.duration,
                        warmup: opts.warmup,
                        request_size: opts.request_size,
                    },
                };
                let _ = net.take();
                let result = load_in(&net, &opts.exe, &spec).await?;
                let report = net.take();
                eprintln!(
                    "{:>30} loss {:>4.1}% delay {:>2} ms {:>6} round {}: p50 {:>8.2} ms p99 {:>8.2} ms {:>8.0} rps {} errors",
                    sc.label,
                    sc.loss * 100.0,
                    sc.delay_ms,
                    target,
                    round + 1,
                    result.p50_us as f64 / 1000.0,
                    result.p99_us as f64 / 1000.0,
                    result.rps,
                    result.errors
                );
                runs.push(Run {
                    scenario: sc.clone(),
                    target,
                    round,
                    result,
                    link: report,
                });
            }
        }
    }
    let report = Report {
        command,
        network: if opts.loopback {
            "loopback"
        } else {
            "emulated"
        },
        quic_congestion: opts.congestion.as_str(),
        tcp_congestion,
        link_rate_bps: opts.rate_limit_bps,
        link_mtu: (!opts.loopback).then_some(opts.mtu),
        duration_s: opts.duration.as_secs_f64(),
        warmup_s: opts.warmup.as_secs_f64(),
        rounds,
        runs,
    };
    let md = markdown(&report);
    std::fs::create_dir_all(&opts.out).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::File::create(opts.out.join(name))
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| format!("{}: {e}", opts.out.join(name).display()))
    };
    write("results.md", &md)?;
    write(
        "results.json",
        &serde_json::to_string_pretty(&report).expect("plain struct"),
    )?;
    write("latency.svg", &svg(&report))?;
    Ok(md)
}

/// Mean of a field over a target's rounds in a scenario.
fn mean(runs: &[&Run], f: impl Fn(&LoadResult) -> f64) -> f64 {
    runs.iter().map(|r| f(&r.result)).sum::<f64>() / runs.len().max(1) as f64
}

fn group<'a>(report: &'a Report, sc: &Scenario, target: Target) -> Vec<&'a Run> {
    report
        .runs
        .iter()
        .filter(|r| {
            r.target == target
                && r.scenario.loss == sc.loss
                && r.scenario.delay_ms == sc.delay_ms
                && std::mem::discriminant(&r.scenario.workload)
                    == std::mem::discriminant(&sc.workload)
        })
        .collect()
}

fn unique_scenarios(report: &Report) -> Vec<Scenario> {
    let mut out: Vec<Scenario> = Vec::new();
    for r in &report.runs {
        if !out.iter().any(|s| {
            s.loss == r.scenario.loss
                && s.delay_ms == r.scenario.delay_ms
                && std::mem::discriminant(&s.workload)
                    == std::mem::discriminant(&r.scenario.workload)
        }) {
            out.push(r.scenario.clone());
        }
    }
    out
}

/// The Markdown table: one row per scenario and target, latencies in ms (means over rounds).
pub fn markdown(report: &Report) -> String {
    let mut md = format!(
        "Command: `{}`\n\nNetwork: {} · QUIC congestion control: {} (quinn) · TCP congestion control: {} (kernel) · \
         link rate: {}{} · {} s measured after {} s warm-up, {} round(s) interleaved (quic, tcp, direct, …); \
         values are means over rounds.\n\n\
         | workload | loss | one-way delay | target | p50 ms | p90 ms | p99 ms | p99.9 ms | rps | errors | link fwd / lost | link late p99 µs |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        report.command,
        match report.network {
            "loopback" => "loopback (no link emulation: the transports' own cost)",
            _ => "two namespaces across an emulated link",
        },
        report.quic_congestion,
        report.tcp_congestion,
        report.link_rate_bps.map_or("unlimited".into(), |r| format!("{} Mbit/s", r / 1_000_000)),
        report.link_mtu.map_or(String::new(), |m| format!(" · link MTU: {m} bytes")),
        report.duration_s,
        report.warmup_s,
        report.rounds
    );
    for sc in unique_scenarios(report) {
        for target in Target::ALL {
            let g = group(report, &sc, target);
            if g.is_empty() {
                continue;
            }
            let fwd: u64 = g.iter().map(|r| r.link.forwarded).sum();
            let lost: u64 = g
                .iter()
                .map(|r| r.link.dropped_loss + r.link.dropped_queue)
                .sum();
            let late = g.iter().map(|r| r.link.late_p99_us).max().unwrap_or(0);
            md += &format!(
                "| {} | {:.1}% | {} ms | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {} / {} | {} |\n",
                sc.label,
                sc.loss * 100.0,
                sc.delay_ms,
                target,
                mean(&g, |r| r.p50_us as f64) / 1000.0,
                mean(&g, |r| r.p90_us as f64) / 1000.0,
                mean(&g, |r| r.p99_us as f64) / 1000.0,
                mean(&g, |r| r.p999_us as f64) / 1000.0,
                mean(&g, |r| r.rps),
                g.iter().map(|r| r.result.errors).sum::<u64>(),
                fwd,
                lost,
                late
            );
        }
    }
    md
}

/// Grouped bars of p50 and p99 per scenario and target (log scale), one chart.
pub fn svg(report: &Report) -> String {
    let scs = unique_scenarios(report);
    let targets = Target::ALL;
    let colors = ["#1f77b4", "#d62728", "#7f7f7f"];
    let (w, h, left, top, bottom) = (
        160.0 * scs.len().max(1) as f64 + 80.0,
        420.0,
        60.0,
        40.0,
        110.0,
    );
    let max = report
        .runs
        .iter()
        .map(|r| r.result.p99_us as f64 / 1000.0)
        .fold(1.0f64, f64::max);
    let y = |ms: f64| {
        top + (h - top - bottom)
            * (1.0 - (ms.max(0.01).log10() + 2.0) / (max.log10() + 2.0).max(0.1))
    };
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">p50 (light) and p99 (dark) latency, ms, log scale: QUIC vs TCP vs direct</text>"
    );
    for p in [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        if p > max * 1.5 {
            break;
        }
        let yy = y(p);
        out += &format!(
            "<line x1=\"{left}\" x2=\"{w}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#eee\"/><text x=\"5\" y=\"{:.1}\">{p}</text>",
            yy + 4.0
        );
    }
    for (i, sc) in scs.iter().enumerate() {
        let x0 = left + 160.0 * i as f64 + 10.0;
        for (j, t) in targets.iter().enumerate() {
            let g = group(report, sc, *t);
            if g.is_empty() {
                continue;
            }
            let (p50, p99) = (
                mean(&g, |r| r.p50_us as f64) / 1000.0,
                mean(&g, |r| r.p99_us as f64) / 1000.0,
            );
            let x = x0 + 45.0 * j as f64;
            let base = h - bottom;
            out += &format!(
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"18\" height=\"{:.1}\" fill=\"{}\" opacity=\"0.45\"/>",
                y(p50),
                (base - y(p50)).max(0.0),
                colors[j]
            );
            out += &format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"18\" height=\"{:.1}\" fill=\"{}\"/>",
                x + 20.0,
                y(p99),
                (base - y(p99)).max(0.0),
                colors[j]
            );
        }
        let label = &sc.short;
        out += &format!(
            "<text x=\"{x0:.1}\" y=\"{:.1}\">{label}</text><text x=\"{x0:.1}\" y=\"{:.1}\">loss {:.1}% · {} ms</text>",
            h - bottom + 20.0,
            h - bottom + 35.0,
            sc.loss * 100.0,
            sc.delay_ms
        );
    }
    for (j, t) in targets.iter().enumerate() {
        out += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{t}</text>",
            left + 90.0 * j as f64,
            h - 30.0,
            colors[j],
            left + 90.0 * j as f64 + 16.0,
            h - 20.0
        );
    }
    out + "</svg>\n"
}

/// The benchmark backend: `/r?size=N&delay=MS` answers N bytes after MS milliseconds.
pub async fn serve_backend(addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let body = Bytes::from(vec![b'x'; 1 << 20]);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            let _ = s.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, std::convert::Infallible>(backend_response(req, &body).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(())
}

async fn backend_response(req: Request<Incoming>, body: &Bytes) -> Response<ProxyBody> {
    let mut size = 0usize;
    let mut delay = 0u64;
    let query = req.uri().query().unwrap_or("").to_string();
    for kv in query.split('&') {
        match kv.split_once('=') {
            Some(("size", v)) => size = v.parse().unwrap_or(0),
            Some(("delay", v)) => delay = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    // Read the request body (a POST workload sends one) before answering.
    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    Response::new(full(body.slice(..size.min(body.len()))))
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn shell(script: &str) -> Proc {
        let child = Command::new("sh")
            .args(["-c", script])
            .spawn()
            .expect("sh runs");
        // Give the shell time to set its trap before it is signalled.
        std::thread::sleep(Duration::from_millis(300));
        Proc(child)
    }

    #[test]
    fn a_stopped_child_exits_on_its_own_when_it_can_and_is_killed_when_it_cannot() {
        // A child that handles SIGTERM (as a node drains) ends with its own exit code, not
        // SIGKILL: an instrumented node writes its profile on the way out.
        let mut p = shell("trap 'exit 7' TERM; while :; do sleep 0.05; done");
        let status = p.stop(Duration::from_secs(10)).expect("stops");
        assert_eq!((status.code(), status.signal()), (Some(7), None));
        // One that ignores it is killed after the grace period.
        let mut p = shell("trap '' TERM; while :; do sleep 0.05; done");
        let status = p.stop(Duration::from_millis(200)).expect("stops");
        assert_eq!(status.signal(), Some(9));
        // One already gone is not signalled again.
        let mut p = shell("exit 3");
        assert_eq!(
            p.stop(Duration::from_secs(1)).expect("stops").code(),
            Some(3)
        );
    }
}
