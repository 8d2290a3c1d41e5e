//! The `quicar` command: run a sidecar, run the demo, make dev certificates, check a config.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use quicar::config::Config;
use quicar::pki::Ca;

/// mimalloc instead of glibc's malloc: a request allocates a few hundred small blocks across
/// hyper, h3 and quinn, and glibc's malloc and free were 18 % of a request's instructions
/// (BENCHMARKS.md, "Later in round 2").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "quicar",
    version,
    about = "A sidecar proxy: HTTP/1.1 from the app, HTTP/3 over mutual-TLS QUIC between sidecars."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a sidecar from a config file until SIGINT/SIGTERM.
    Run {
        /// The sidecar's TOML config (relative paths in it are relative to the file).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Two sidecars and a demo service on loopback, with generated certificates.
    Demo {
        /// Where the calling side's outbound listener binds (what the curl lines use).
        #[arg(long, default_value = "127.0.0.1:4140")]
        listen: SocketAddr,
        /// Where the calling side's admin listener (dashboard, metrics) binds.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
    /// Validate a config file (and load the identity and discovery files it names), then
    /// print the effective config.
    Check {
        /// The TOML config to check.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Compare the QUIC and TCP transports (and a direct baseline) over an emulated link:
    /// loss {0, 0.5 %, 2 %} × one-way delay {0, 25 ms} × two workloads, interleaved rounds.
    /// Needs root (network namespaces, TUN devices), except with --loopback. Writes
    /// results.md, results.json and latency.svg to --out.
    Bench {
        /// A short smoke run: 2 scenarios, 1 round unless --rounds says otherwise (what `cargo bench`
        /// runs).
        #[arg(long)]
        quick: bool,
        /// Everything on loopback with no link emulation (no root needed): the transports'
        /// own overhead, small requests and concurrent responses.
        #[arg(long)]
        loopback: bool,
        /// Measured time per run [default: 10s, 2s with --quick].
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
        /// Unmeasured time at the start of each run [default: 2s, 500ms with --quick].
        #[arg(long, value_parser = humantime::parse_duration)]
        warmup: Option<std::time::Duration>,
        /// Rounds per scenario (targets interleaved within each) [default: 2, 1 with --quick].
        #[arg(long)]
        rounds: Option<usize>,
        /// Directory for results.md, results.json and latency.svg.
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// QUIC congestion controller: cubic, newreno or bbr. The default matches this
        /// machine's TCP default (BBR), so the transports are compared, not the controllers.
        #[arg(long, default_value = "bbr")]
        congestion: String,
        /// Open-loop rate of the small-request workload, requests per second.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Link rate limit in Mbit/s (default: unlimited).
        #[arg(long)]
        rate_limit_mbit: Option<u64>,
        /// Connections the open-loop (small requests) workload keeps to its target.
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Response size of the small-request workload, bytes.
        #[arg(long, default_value_t = 256)]
        small_size: usize,
        /// Requests in flight in the concurrent workload.
        #[arg(long, default_value_t = 32)]
        concurrent: usize,
        /// Response size of the concurrent workload, bytes.
        #[arg(long, default_value_t = 16384)]
        concurrent_size: usize,
        /// Request body size, bytes (0 sends GETs; more sends POSTs).
        #[arg(long, default_value_t = 0)]
        request_size: usize,
        /// Backend service time per request.
        #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
        service_time: std::time::Duration,
        /// The emulated link's MTU, bytes (1500: Ethernet; 9000: jumbo frames). QUIC's
        /// datagrams follow it (the route's MTU bounds quinn's MTU discovery), as TCP's
        /// segments do. Not with --loopback, which has no link.
        #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(1280..))]
        mtu: u16,
    },
    /// Internal: pieces `quicar bench` runs inside its network namespaces.
    #[command(hide = true)]
    Internal {
        #[command(subcommand)]
        command: InternalCommand,
    },
    /// Print a shell completion script: `quicar completions bash > /etc/bash_completion.d/quicar`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): `quicar man > /usr/local/share/man/man1/quicar.1`.
    Man,
    /// Exit 0 when a running sidecar's admin listener answers `/live` with 200 (a container
    /// HEALTHCHECK that needs no curl).
    Health {
        /// The sidecar's admin address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
    /// A development CA and workload certificates (not for production).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum InternalCommand {
    /// A sidecar from a config, optionally with the benchmark backend; prints "ready".
    Node {
        /// The sidecar's config.
        #[arg(long)]
        config: PathBuf,
        /// Also serve the benchmark backend here.
        #[arg(long)]
        backend: Option<SocketAddr>,
    },
    /// One load run; the spec and the result are JSON.
    Load {
        /// The load spec, JSON.
        spec: String,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create ca.crt and ca.key in DIR.
    Init {
        /// Where the CA files are written.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The SPIFFE trust domain the CA is named for.
        #[arg(long, default_value = "quicar.local")]
        trust_domain: String,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue SERVICE.crt and SERVICE.key, identity spiffe://<trust-domain>/<SERVICE>.
    Issue {
        /// The service name: the identity's path and the files' base name.
        service: String,
        /// The directory holding the CA; the new files are written there too.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The SPIFFE trust domain of the identity.
        #[arg(long, default_value = "quicar.local")]
        trust_domain: String,
    },
}

/// `GET /live` on the admin listener, bounded to 2 s.
fn health(admin: SocketAddr) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let limit = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&admin, limit)
        .with_context(|| format!("admin listener {admin}"))?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    s.write_all(b"GET /live HTTP/1.1\r\nhost: quicar\r\nconnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{admin}/live answered {}",
        String::from_utf8_lossy(&head)
    );
    println!("live");
    Ok(())
}

/// What `run` would load besides the config itself: the identity files (certificate, key and
/// CA must load and match) and each file-discovery source (it must parse).
fn check_files(path: &std::path::Path, config: &Config) -> anyhow::Result<()> {
    quicar::identity::Material::load(&config.identity)
        .with_context(|| format!("{}: [identity]", path.display()))?;
    for svc in &config.service {
        if let quicar::discovery::Source::File(f) =
            quicar::discovery::Source::from_config(config, svc)
        {
            f.load().map_err(|e| {
                anyhow::anyhow!(
                    "{}: service `{}`: discovery file: {e}",
                    path.display(),
                    svc.name
                )
            })?;
        }
    }
    Ok(())
}

/// Errors are printed as their cause chain, one line each, never as a backtrace (even with
/// `RUST_BACKTRACE=1` set in the shell), and exit with status 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut said = e.to_string();
            eprintln!("error: {said}");
            for cause in e.chain().skip(1) {
                // Many errors already name their cause in their own text.
                let text = cause.to_string();
                if !said.contains(&text) {
                    eprintln!("  caused by: {text}");
                    said = text;
                }
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUICAR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Check { config: path } => {
            let config = Config::load(&path)?;
            check_files(&path, &config)?;
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Certs { command } => certs(command),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "quicar", &mut std::io::stdout());
            Ok(())
        }
        Command::Health { admin } => health(admin),
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Run { config } => {
            let config = Config::load(&config)?;
            sidecar_runtime(&config)?.block_on(async move {
                let bound = quicar::app::build(config).await?;
                stop_signal().await?;
                tracing::info!("stopping: draining in-flight requests");
                bound.shutdown().await;
                Ok(())
            })
        }
        Command::Bench {
            quick,
            loopback,
            duration,
            warmup,
            rounds,
            out,
            congestion,
            rate,
            rate_limit_mbit,
            connections,
            small_size,
            concurrent,
            concurrent_size,
            request_size,
            service_time,
            mtu,
        } => {
            if loopback && mtu != 1500 {
                anyhow::bail!("--mtu sets the emulated link's MTU; --loopback has no link (loopback's MTU is the `lo` device's)");
            }
            let congestion = match congestion.as_str() {
                "cubic" => quicar::config::Congestion::Cubic,
                "newreno" => quicar::config::Congestion::Newreno,
                "bbr" => quicar::config::Congestion::Bbr,
                other => anyhow::bail!("--congestion: `{other}` is not cubic, newreno or bbr"),
            };
            let (duration, warmup) = if quick {
                (
                    duration.unwrap_or(std::time::Duration::from_secs(2)),
                    warmup.unwrap_or(std::time::Duration::from_millis(500)),
                )
            } else {
                (
                    duration.unwrap_or(std::time::Duration::from_secs(10)),
                    warmup.unwrap_or(std::time::Duration::from_secs(2)),
                )
            };
            let rounds = rounds.unwrap_or(if quick { 1 } else { 2 });
            let opts = quicar::bench::Options {
                quick,
                loopback,
                duration,
                warmup,
                rounds,
                out,
                exe: std::env::current_exe()?,
                congestion,
                rate,
                rate_limit_bps: rate_limit_mbit.map(|m| m * 1_000_000),
                connections,
                small_size,
                concurrent,
                concurrent_size,
                request_size,
                service_time,
                mtu,
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            // Ctrl-C drops the run: namespaces are deleted and node processes killed on the way.
            let md = runtime()?
                .block_on(async {
                    tokio::select! {
                        r = quicar::bench::run(opts.clone(), command) => r,
                        _ = stop_signal() => Err("interrupted".to_string()),
                    }
                })
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("{md}");
            println!(
                "written: {0}/results.md {0}/results.json {0}/latency.svg",
                opts.out.display()
            );
            Ok(())
        }
        Command::Internal { command } => match command {
            InternalCommand::Node { config, backend } => {
                let config = Config::load(&config)?;
                sidecar_runtime(&config)?.block_on(async move {
                    if let Some(addr) = backend {
                        quicar::bench::serve_backend(addr).await?;
                    }
                    let bound = quicar::app::build(config).await?;
                    println!("ready {}", bound.outbound);
                    stop_signal().await?;
                    bound.shutdown().await;
                    Ok(())
                })
            }
            InternalCommand::Load { spec } => {
                let spec: quicar::bench::load::LoadSpec = serde_json::from_str(&spec)?;
                let result = runtime()?.block_on(quicar::bench::load::run(spec));
                println!("{}", serde_json::to_string(&result)?);
                Ok(())
            }
        },
        Command::Demo { listen, admin } => runtime()?.block_on(async move {
            let demo = quicar::demo::start(listen, admin)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("demo could not start")?;
            println!("{}", demo.instructions());
            stop_signal().await?;
            demo.shutdown().await;
            Ok(())
        }),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The runtime of a sidecar: `node.worker_threads` workers. One worker is tokio's
/// current-thread scheduler on the main thread: no second thread, no work-stealing queues,
/// no cross-thread wake-ups (BENCHMARKS.md, "Worker threads").
fn sidecar_runtime(config: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match config.node.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n).thread_name("quicar-worker");
            b
        }
    };
    Ok(builder.enable_all().build()?)
}

async fn stop_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init {
            dir,
            trust_domain,
            force,
        } => {
            if dir.join("ca.key").exists() && !force {
                anyhow::bail!(
                    "{}: a CA already exists; pass --force to replace it (every issued certificate then needs reissuing)",
                    dir.join("ca.key").display()
                );
            }
            Ca::generate(&trust_domain)?.write(&dir)?;
            println!(
                "wrote {0}/ca.crt and {0}/ca.key (trust domain {trust_domain})",
                dir.display()
            );
        }
        CertsCommand::Issue {
            service,
            dir,
            trust_domain,
        } => {
            let ca = Ca::read(&dir, &trust_domain)?;
            let (crt, key) = ca.issue(&service)?.write(&dir, &service)?;
            println!(
                "wrote {} and {} (spiffe://{trust_domain}/{service})",
                crt.display(),
                key.display()
            );
        }
    }
    Ok(())
}
