//! Service discovery: each service's endpoints reach the data path through one `watch` channel,
//! fed by a static list, a watched file, or DNS SRV records. A source that fails keeps the last
//! good set and says why in the log.

pub mod dns;
mod endpoints;
pub mod file;

pub use endpoints::{log_change, Endpoint, Endpoints};

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Service};

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
                    server_name: ep.server_name.clone(),
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
