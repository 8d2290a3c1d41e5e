//! Builds a whole sidecar from a validated config: loads the identity, binds the listeners
//! (returning their real addresses, so tests can use port 0), starts the tasks, and stops them
//! in order: stop accepting, drain in-flight requests (bounded), close QUIC with a code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::Listener;
use crate::admin::{self, Admin};
use crate::cache::{Cache, Clock};
use crate::config::Config;
use crate::facts::Transport;
use crate::identity::{self, IdentityError, IdentityRx, Material};
use crate::inbound::Inbound;
use crate::outbound::{self, Outbound};
use crate::telemetry::Telemetry;
use crate::transport::{quic, tcp, Clients};

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
    clients: Arc<Clients>,
    path: Arc<Outbound>,
    clock: Arc<Clock>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    endpoint: Option<quinn::Endpoint>,
    drain_timeout: Duration,
}

/// Binds everything and starts serving. Nothing is bound when this returns an error.
pub async fn build(config: Config) -> Result<Bound, BuildError> {
    // Once per process (later calls are no-ops): field sections from peers parse the names
    // sidecars add without a copy each.
    h3::intern_field_names(&crate::headers::WIRE_NAMES);
    h2::intern_field_names(&crate::headers::WIRE_NAMES);
    let material = Arc::new(Material::load(&config.identity)?);
    tracing::info!(identity = %material.id, node = %config.node.name, "identity loaded");
    let outbound_listener = listen(config.outbound.listen).map_err(|source| BuildError::Bind {
        what: "outbound listener (TCP)",
        addr: config.outbound.listen,
        source,
    })?;
    let (udp, tcp_listener) = bind_inbound(
        config.inbound.listen,
        config.inbound.quic,
        config.inbound.tcp,
    )?;
    let inbound_addr = match (&udp, &tcp_listener) {
        (Some(u), _) => u.local_addr().expect("bound"),
        (None, Some(t)) => t.local_addr().expect("bound"),
        (None, None) => unreachable!("validated: at least one inbound transport"),
    };
    let endpoint = match udp {
        Some(socket) => Some(
            quic::server_endpoint(socket, &material, &config.quic).map_err(|source| {
                BuildError::Bind {
                    what: "inbound listener (UDP)",
                    addr: config.inbound.listen,
                    source,
                }
            })?,
        ),
        None => None,
    };
    let tcp_listener = tcp_listener
        .map(tokio::net::TcpListener::from_std)
        .transpose()
        .map_err(|source| BuildError::Bind {
            what: "inbound listener (TCP)",
            addr: config.inbound.listen,
            source,
        })?;
    let outbound_addr = outbound_listener.local_addr().expect("bound");

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
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let clients = Arc::new(
        Clients::new(
            id_rx.clone(),
            &config,
            tel.clone(),
            &tracker,
            shutdown.clone(),
        )
        .map_err(|source| BuildError::Bind {
            what: "QUIC client socket (UDP)",
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?,
    );
    // Both inbound servers watch the identity: new handshakes use rotated certificates.
    tracker.spawn(identity::watch_files(
        config.identity.clone(),
        id_tx,
        shutdown.clone(),
    ));
    let clock = Arc::new(Clock::default());
    let outbound = Arc::new(Outbound::new(
        &config,
        clients.clone(),
        &clock,
        tel.clone(),
        &tracker,
        &shutdown,
    ));
    tracker.spawn(outbound::serve(
        Listener::new(outbound_listener, "outbound"),
        outbound.clone(),
        config.outbound.clone(),
        shutdown.clone(),
    ));
    let inbound = Arc::new(Inbound::new(&config, tel.clone()));
    if let Some(endpoint) = &endpoint {
        tracker.spawn(quic::serve(
            endpoint.clone(),
            id_rx.clone(),
            config.quic.clone(),
            inbound.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    if let Some(listener) = tcp_listener {
        tracker.spawn(tcp::serve(
            Listener::new(listener, "inbound TCP"),
            id_rx.clone(),
            inbound.clone(),
            config.quic.max_concurrent_streams,
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    // Once a second: QUIC path stats and cache sizes into metrics, the dashboard's series,
    // and idle connections to the local apps closed.
    {
        let (tel, clients, outbound, shutdown) = (
            tel.clone(),
            clients.clone(),
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
                clients.sample();
                outbound.sample_breakers();
                for (service, bytes) in outbound.cache_sizes() {
                    tel.cache_bytes(&service, bytes);
                }
                tel.tick();
                inbound.reap_idle();
            }
        });
    }
    tracker.spawn(admin::serve(
        Listener::new(admin_listener, "admin"),
        Arc::new(Admin {
            telemetry: tel.clone(),
            config: config.clone(),
            outbound: outbound.clone(),
            started: std::time::Instant::now(),
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
        clients,
        path: outbound,
        clock,
        shutdown,
        tracker,
        endpoint,
        drain_timeout: config.node.drain_timeout,
    })
}

/// A TCP listener with the system's largest accept backlog (`net.core.somaxconn`), not the
/// usual 128: a burst of app connections must queue, not be refused.
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(4096);
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Binds the inbound UDP socket and TCP listener on the same port number (the port is the
/// contract: peers reach QUIC and TCP at one address). With port 0 the UDP port is picked
/// first and TCP must get the same; on a clash it tries again.
fn bind_inbound(
    addr: SocketAddr,
    quic: bool,
    tcp: bool,
) -> Result<(Option<std::net::UdpSocket>, Option<std::net::TcpListener>), BuildError> {
    let err = |what, source| BuildError::Bind { what, addr, source };
    let bind_tcp = |a: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(a)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let mut last = None;
    for _ in 0..20 {
        let udp = if quic {
            Some(std::net::UdpSocket::bind(addr).map_err(|e| err("inbound listener (UDP)", e))?)
        } else {
            None
        };
        let port_addr = udp
            .as_ref()
            .map_or(addr, |u| u.local_addr().expect("bound"));
        if !tcp {
            return Ok((udp, None));
        }
        match bind_tcp(port_addr) {
            Ok(l) => return Ok((udp, Some(l))),
            Err(e) if addr.port() == 0 && quic => last = Some(e),
            Err(e) => return Err(err("inbound listener (TCP)", e)),
        }
    }
    Err(err(
        "inbound listener (TCP)",
        last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")),
    ))
}

impl Bound {
    /// Connections to peers opened since start, over `transport`.
    pub fn connections_opened(&self, transport: Transport) -> u64 {
        self.clients.connections_opened(transport)
    }

    /// Connections to peers open now, over `transport`.
    pub fn connections_active(&self, transport: Transport) -> usize {
        self.clients.connections_active(transport)
    }

    /// The response cache of a service, if configured.
    pub fn cache(&self, service: &str) -> Option<Arc<Cache>> {
        self.path.cache(service)
    }

    /// The clock cache freshness is judged by (tests advance it instead of sleeping).
    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
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
        if let Some(endpoint) = &self.endpoint {
            endpoint.close(
                quinn::VarInt::from_u32(quic::CLOSE_SHUTDOWN),
                b"sidecar stopping",
            );
        }
        self.clients.close(Duration::from_millis(500)).await;
        if let Some(endpoint) = &self.endpoint {
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
        }
        tracing::info!("sidecar stopped");
    }
}
