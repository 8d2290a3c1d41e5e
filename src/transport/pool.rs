//! The connection pool both wires share: one slot per (peer address, expected identity)
//! holding at most one connection, a per-connection count of requests in flight, and the idle
//! sweep.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::ProxyError;
use crate::identity::PeerId;

/// Requests in flight on a connection and when it was last used.
#[derive(Debug)]
pub(crate) struct Usage {
    in_flight: AtomicUsize,
    last_used: Mutex<Instant>,
}

impl Default for Usage {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_used: Mutex::new(Instant::now()),
        }
    }
}

impl Usage {
    /// Counts a request until the returned guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// True when nothing is in flight and nothing was for `idle`.
    pub(crate) fn idle_for(&self, idle: Duration) -> bool {
        self.in_flight() == 0 && self.last_used.lock().expect("not poisoned").elapsed() >= idle
    }
}

/// A request in flight on a pooled connection.
pub(crate) struct InFlight(Arc<Usage>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last_used.lock().expect("not poisoned") = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pooled connection.
pub(crate) trait Pooled: Clone + Send + 'static {
    fn is_alive(&self) -> bool;
    fn usage(&self) -> &Arc<Usage>;
    /// Called when the idle sweep drops the connection.
    fn close_idle(&self) {}
}

type Slot<C> = Arc<tokio::sync::Mutex<Option<C>>>;

/// The slots of one pool.
pub(crate) struct Slots<C> {
    map: Mutex<HashMap<(SocketAddr, PeerId), Slot<C>>>,
}

impl<C> Default for Slots<C> {
    fn default() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<C: Pooled> Slots<C> {
    fn slot(&self, addr: SocketAddr, id: &PeerId) -> Slot<C> {
        self.map
            .lock()
            .expect("not poisoned")
            .entry((addr, id.clone()))
            .or_default()
            .clone()
    }

    fn all(&self) -> Vec<((SocketAddr, PeerId), Slot<C>)> {
        self.map
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// The live connection, or a new one from `connect`. Concurrent callers for the same peer
    /// wait for one handshake instead of racing several.
    pub(crate) async fn get<F, Fut>(
        &self,
        addr: SocketAddr,
        id: &PeerId,
        connect: F,
    ) -> Result<C, ProxyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, ProxyError>>,
    {
        let slot = self.slot(addr, id);
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            if c.is_alive() {
                return Ok(c.clone());
            }
        }
        *guard = None;
        let c = connect().await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// The connection in the slot now, without waiting for a handshake in progress.
    pub(crate) fn current(&self, addr: SocketAddr, id: &PeerId) -> Option<C> {
        let slot = self
            .map
            .lock()
            .expect("not poisoned")
            .get(&(addr, id.clone()))
            .cloned()?;
        let g = slot.try_lock().ok()?;
        g.clone()
    }

    /// Every pooled connection with its peer address.
    pub(crate) fn each(&self) -> Vec<(SocketAddr, C)> {
        self.all()
            .into_iter()
            .filter_map(|((addr, _), s)| {
                s.try_lock().ok().and_then(|g| g.clone()).map(|c| (addr, c))
            })
            .collect()
    }

    /// Empties the slot if it still holds a connection `which` picks.
    pub(crate) async fn evict(&self, addr: SocketAddr, id: &PeerId, which: impl Fn(&C) -> bool) {
        let slot = self
            .map
            .lock()
            .expect("not poisoned")
            .get(&(addr, id.clone()))
            .cloned();
        if let Some(slot) = slot {
            let mut g = slot.lock().await;
            if g.as_ref().is_some_and(which) {
                *g = None;
            }
        }
    }

    /// Connections open now (a slot busy connecting counts).
    pub(crate) fn active(&self) -> usize {
        self.all()
            .iter()
            .filter(|(_, s)| {
                s.try_lock()
                    .map(|g| g.as_ref().is_some_and(C::is_alive))
                    .unwrap_or(true)
            })
            .count()
    }

    /// Drops dead connections, and live ones that carried no request for `idle`.
    pub(crate) fn sweep(&self, idle: Duration) {
        for (_, slot) in self.all() {
            let Ok(mut g) = slot.try_lock() else { continue };
            let Some(c) = g.as_ref() else { continue };
            if !c.is_alive() {
                *g = None;
            } else if c.usage().idle_for(idle) {
                c.close_idle();
                *g = None;
            }
        }
    }

    /// Empties every slot.
    pub(crate) fn clear(&self) {
        let slots: Vec<Slot<C>> = self
            .map
            .lock()
            .expect("not poisoned")
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in slots {
            if let Ok(mut g) = s.try_lock() {
                *g = None;
            }
        }
    }
}

/// Runs `sweep` every quarter of the idle timeout until `shutdown`.
pub(crate) async fn reap_idle<C: Pooled>(
    slots: Arc<Slots<C>>,
    idle: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick =
        tokio::time::interval((idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(5)));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => slots.sweep(idle),
        }
    }
}
