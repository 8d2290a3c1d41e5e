//! What discovery produces: the endpoints of a service (peer address, expected identity,
//! weight, priority), and the one log line a change of that set gets.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::identity::peer_id::PeerId;

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
    /// TLS server name to send (`None`: the trust domain).
    pub server_name: Option<String>,
}

pub type Endpoints = Arc<Vec<Endpoint>>;

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
