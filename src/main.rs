//! The `quicar` command: run a sidecar, run the demo, make dev certificates, check a config.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use quicar::config::Config;
use quicar::pki::Ca;

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
    /// Validate a config file and print the effective config.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// A development CA and workload certificates (not for production).
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create ca.crt and ca.key in DIR.
    Init {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value = "quicar.local")]
        trust_domain: String,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue SERVICE.crt and SERVICE.key, identity spiffe://<trust-domain>/<SERVICE>.
    Issue {
        service: String,
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        #[arg(long, default_value = "quicar.local")]
        trust_domain: String,
    },
}

fn main() -> anyhow::Result<()> {
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
        Command::Check { config } => {
            let config = Config::load(&config)?;
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Certs { command } => certs(command),
        Command::Run { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(async move {
                let bound = quicar::app::build(config).await?;
                stop_signal().await?;
                tracing::info!("stopping: draining in-flight requests");
                bound.shutdown().await;
                Ok(())
            })
        }
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
