//! `transport = "auto"`, per endpoint: which endpoints currently go over TCP because their
//! QUIC handshake failed, with one background task each trying QUIC again after a growing
//! back-off.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::quic;
use crate::discovery::Endpoint;
use crate::identity::PeerId;

/// Longest wait between two QUIC probes of an endpoint on TCP.
const MAX_WAIT: Duration = Duration::from_secs(60);

pub(crate) struct Fallback {
    on_tcp: Mutex<HashSet<(SocketAddr, PeerId)>>,
    quic: Arc<quic::Pool>,
    /// First wait before an endpoint on TCP tries QUIC again (doubles up to `MAX_WAIT`).
    first_wait: Duration,
    shutdown: CancellationToken,
}

impl Fallback {
    pub(crate) fn new(
        quic: Arc<quic::Pool>,
        first_wait: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            on_tcp: Mutex::default(),
            quic,
            first_wait,
            shutdown,
        })
    }

    pub(crate) fn prefers_tcp(&self, ep: &Endpoint) -> bool {
        self.on_tcp
            .lock()
            .expect("not poisoned")
            .contains(&(ep.address, ep.identity.clone()))
    }

    /// Moves `ep` to TCP and starts its QUIC probe (once per endpoint).
    pub(crate) fn fall_back(self: &Arc<Self>, ep: &Endpoint, connect_timeout: Duration) {
        let key = (ep.address, ep.identity.clone());
        if !self
            .on_tcp
            .lock()
            .expect("not poisoned")
            .insert(key.clone())
        {
            return;
        }
        let (this, ep) = (self.clone(), ep.clone());
        tokio::spawn(async move {
            let mut wait = this.first_wait;
            loop {
                tokio::select! {
                    _ = this.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if this.quic.reachable(&ep, connect_timeout).await {
                    tracing::info!(endpoint = %key.0, "QUIC reachable again; leaving TCP");
                    this.on_tcp.lock().expect("not poisoned").remove(&key);
                    return;
                }
                wait = (wait * 2).min(MAX_WAIT);
            }
        });
    }
}
