//! Builds a whole sidecar from a validated config: loads the identity, binds the listeners
//! (returning their real addresses, so tests can use port 0), starts the tasks, and stops them
//! in order: stop accepting, drain in-flight requests (bounded), close QUIC with a code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::cache::{Cache, Clock};
use crate::config::Config;
use crate::identity::{self, IdentityError, IdentityRx, Material};
use crate::inbound::{self, Inbound};
use crate::outbound::{self, Outbound};
use crate::telemetry::Telemetry;
use crate::transport::quic::{self, QuicPool};

/// Why a sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("access log {path}: {source}")]
    AccessLog {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A running sidecar.
pub struct Bound {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub telemetry: Arc<Telemetry>,
    pub identity: IdentityRx,
    pool: Arc<QuicPool>,
    path: Arc<Outbound>,
    clock: Arc<Clock>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    endpoint: quinn::Endpoint,
    drain_timeout: Duration,
}

/// Binds everything and starts serving. Nothing is bound when this returns an error.
pub async fn build(config: Config) -> Result<Bound, BuildError> {
    let material = Arc::new(Material::load(&config.identity)?);
    tracing::info!(identity = %material.id, node = %config.node.name, "identity loaded");
    let outbound_listener = tokio::net::TcpListener::bind(config.outbound.listen)
        .await
        .map_err(|source| BuildError::Bind {
            what: "outbound listener (TCP)",
            addr: config.outbound.listen,
            source,
        })?;
    let endpoint = quic::server_endpoint(config.inbound.listen, &material, &config.quic).map_err(
        |source| BuildError::Bind {
            what: "inbound listener (UDP)",
            addr: config.inbound.listen,
            source,
        },
    )?;
    let outbound_addr = outbound_listener.local_addr().expect("bound");
    let inbound_addr = endpoint.local_addr().expect("bound");

    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .map_err(|source| BuildError::Bind {
            what: "admin listener (TCP)",
            addr: config.admin.listen,
            source,
        })?;
    let admin_addr = admin_listener.local_addr().expect("bound");
    let tel = Telemetry::new(&config.access_log).map_err(|source| BuildError::AccessLog {
        path: config
            .access_log
            .path
            .as_ref()
            .map_or("<stdout>".into(), |p| p.display().to_string()),
        source,
    })?;

    let (id_tx, id_rx) = watch::channel(material);
    let pool = QuicPool::new(id_rx.clone(), &config.quic, tel.clone()).map_err(|source| {
        BuildError::Bind {
            what: "QUIC client socket (UDP)",
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        }
    })?;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();

    tracker.spawn(identity::watch_files(
        config.identity.clone(),
        id_tx,
        shutdown.clone(),
    ));
    // New handshakes on the inbound side pick up rotated certificates too.
    {
        let mut rx = id_rx.clone();
        let endpoint = endpoint.clone();
        let quic_cfg = config.quic.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                }
                let material = rx.borrow_and_update().clone();
                match quic::server_config(&material, &quic_cfg) {
                    Ok(server) => endpoint.set_server_config(Some(server)),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot use reloaded identity for inbound")
                    }
                }
            }
        });
    }
    tracker.spawn(pool.clone().reap_idle(shutdown.clone()));
    let clock = Arc::new(Clock::default());
    let outbound = Arc::new(Outbound::new(
        &config,
        pool.clone(),
        clock.clone(),
        tel.clone(),
        &tracker,
        shutdown.clone(),
    ));
    tracker.spawn(outbound::serve(
        outbound_listener,
        outbound.clone(),
        config.outbound.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(inbound::serve(
        endpoint.clone(),
        Arc::new(Inbound::new(&config, tel.clone())),
        shutdown.clone(),
        tracker.clone(),
    ));
    // Once a second: QUIC path stats and cache sizes into metrics, and the dashboard's series.
    {
        let (tel, pool, outbound, shutdown) = (
            tel.clone(),
            pool.clone(),
            outbound.clone(),
            shutdown.clone(),
        );
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                pool.sample();
                for (service, bytes) in outbound.cache_sizes() {
                    tel.cache_bytes(&service, bytes);
                }
                tel.tick();
            }
        });
    }
    tracker.spawn(admin::serve(
        admin_listener,
        Arc::new(Admin {
            telemetry: tel.clone(),
            config: config.clone(),
            outbound: outbound.clone(),
            pool: pool.clone(),
        }),
        shutdown.clone(),
    ));
    tel.set_ready();
    tracing::info!(outbound = %outbound_addr, inbound = %inbound_addr, admin = %admin_addr, "sidecar listening");
    Ok(Bound {
        outbound: outbound_addr,
        inbound: inbound_addr,
        admin: admin_addr,
        telemetry: tel,
        identity: id_rx,
        pool,
        path: outbound,
        clock,
        shutdown,
        tracker,
        endpoint,
        drain_timeout: config.node.drain_timeout,
    })
}

impl Bound {
    /// QUIC connections this sidecar has opened to peers since it started.
    pub fn quic_connections_opened(&self) -> u64 {
        self.pool.connections_opened()
    }

    /// The response cache of a service, if configured.
    pub fn cache(&self, service: &str) -> Option<Arc<Cache>> {
        self.path.cache(service)
    }

    /// The clock cache freshness is judged by (tests advance it instead of sleeping).
    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// QUIC connections to peers open now.
    pub fn quic_connections_active(&self) -> usize {
        self.pool.connections_active()
    }

    /// Graceful stop: no new connections, in-flight requests get `drain_timeout` to finish,
    /// then every QUIC connection is closed with the shutdown code.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timed out; closing remaining requests");
        }
        self.endpoint.close(
            quinn::VarInt::from_u32(quic::CLOSE_SHUTDOWN),
            b"sidecar stopping",
        );
        self.pool.close(Duration::from_millis(500)).await;
        let _ = tokio::time::timeout(Duration::from_millis(500), self.endpoint.wait_idle()).await;
        tracing::info!("sidecar stopped");
    }
}
