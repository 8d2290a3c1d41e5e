//! Service discovery: each service's endpoints reach the data path through one `watch` channel,
//! fed by a static list, a watched file, or DNS SRV records. A source that fails keeps the last
//! good set and says why in the log.

pub mod dns;
pub mod file;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Service};
use crate::identity::PeerId;

/// One peer sidecar serving a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub identity: PeerId,
    /// Relative share of traffic (SRV weight, or the file's `weight`); at least 1.
    pub weight: u32,
    /// Lower is preferred (SRV priority); endpoints of a higher priority are used only when
    /// none of a lower one can take traffic.
    pub priority: u16,
}

pub type Endpoints = Arc<Vec<Endpoint>>;

/// Where a service's endpoints come from.
pub enum Source {
    Fixed(Vec<Endpoint>),
    File(file::FileSource),
    Dns(dns::DnsSource),
}

impl Source {
    pub fn from_config(config: &Config, svc: &Service) -> Self {
        if let Some(d) = &svc.discovery {
            if let Some(path) = &d.file {
                return Self::File(file::FileSource {
                    path: path.clone(),
                    interval: d.interval,
                    trust_domain: config.node.trust_domain.clone(),
                    service: svc.name.clone(),
                });
            }
            if let Some(name) = &d.dns {
                return Self::Dns(dns::DnsSource {
                    name: name.clone(),
                    server: d.server,
                    identity_template: d
                        .identity
                        .clone()
                        .unwrap_or_else(|| "spiffe://{trust_domain}/{service}".into()),
                    trust_domain: config.node.trust_domain.clone(),
                    service: svc.name.clone(),
                    min_refresh: d.interval,
                    max_refresh: d.max_interval,
                });
            }
        }
        Self::Fixed(
            svc.endpoints
                .iter()
                .map(|ep| Endpoint {
                    address: ep.address,
                    identity: config.expected_identity(svc, ep),
                    weight: ep.weight.max(1),
                    priority: 0,
                })
                .collect(),
        )
    }

    /// Starts the source and returns the channel the data path reads.
    pub fn start(
        self,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Endpoints> {
        match self {
            Self::Fixed(eps) => watch::channel(Arc::new(eps)).1,
            Self::File(src) => {
                let (tx, rx) = watch::channel(Arc::new(src.load().unwrap_or_else(|e| {
                    tracing::warn!(file = %src.path.display(), error = %e, "endpoints file unusable at start; no endpoints until it is fixed");
                    Vec::new()
                })));
                tracker.spawn(src.watch(tx, shutdown));
                rx
            }
            Self::Dns(src) => {
                let (tx, rx) = watch::channel(Arc::new(Vec::new()));
                tracker.spawn(src.run(tx, shutdown));
                rx
            }
        }
    }
}

/// Logs a change of endpoint set (what came, what went) once, at info.
pub fn log_change(service: &str, old: &[Endpoint], new: &[Endpoint]) {
    if old == new {
        return;
    }
    let added: Vec<String> = new
        .iter()
        .filter(|e| !old.contains(e))
        .map(|e| e.address.to_string())
        .collect();
    let removed: Vec<String> = old
        .iter()
        .filter(|e| !new.contains(e))
        .map(|e| e.address.to_string())
        .collect();
    tracing::info!(
        service,
        count = new.len(),
        ?added,
        ?removed,
        "endpoints changed"
    );
}
