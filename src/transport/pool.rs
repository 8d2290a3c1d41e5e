//! The connection pool both wires share: one slot per (peer address, expected identity)
//! holding at most one connection, a per-connection count of requests in flight, and the idle
//! sweep.

use rustc_hash::FxHashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

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

/// A handshake in progress, shared by every request waiting for it.
type Connecting<C> = Shared<BoxFuture<'static, Result<C, ProxyError>>>;

/// What one slot holds.
enum State<C> {
    Empty,
    /// A handshake in progress (numbered, so only its own result is stored).
    Connecting(u64, Connecting<C>),
    Ready(C),
}

type Slot<C> = Arc<Mutex<State<C>>>;

/// The slots of one pool.
pub(crate) struct Slots<C> {
    /// Fx-hashed: the keys are endpoints from config or discovery, never client input.
    map: Mutex<FxHashMap<(SocketAddr, PeerId), Slot<C>>>,
    handshakes: AtomicU64,
}

impl<C> Default for Slots<C> {
    fn default() -> Self {
        Self {
            map: Mutex::default(),
            handshakes: AtomicU64::new(0),
        }
    }
}

impl<C: Pooled + Sync> Slots<C> {
    fn slot(&self, addr: SocketAddr, id: &PeerId) -> Slot<C> {
        self.map
            .lock()
            .expect("not poisoned")
            .entry((addr, id.clone()))
            .or_insert_with(|| Arc::new(Mutex::new(State::Empty)))
            .clone()
    }

    fn existing(&self, addr: SocketAddr, id: &PeerId) -> Option<Slot<C>> {
        self.map
            .lock()
            .expect("not poisoned")
            .get(&(addr, id.clone()))
            .cloned()
    }

    fn all(&self) -> Vec<((SocketAddr, PeerId), Slot<C>)> {
        self.map
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// The live connection, or a new one from `connect`. Single flight: concurrent callers
    /// for the same peer share one handshake and all get its result, so when it fails they
    /// fail together (within the connect timeout), not one after another.
    pub(crate) async fn get<F, Fut>(
        &self,
        addr: SocketAddr,
        id: &PeerId,
        connect: F,
    ) -> Result<C, ProxyError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<C, ProxyError>> + Send + 'static,
    {
        let slot = self.slot(addr, id);
        let (n, handshake) = {
            let mut g = slot.lock().expect("not poisoned");
            match &*g {
                State::Ready(c) if c.is_alive() => return Ok(c.clone()),
                State::Connecting(n, f) => (*n, f.clone()),
                _ => {
                    let n = self.handshakes.fetch_add(1, Ordering::Relaxed);
                    let f = connect().boxed().shared();
                    *g = State::Connecting(n, f.clone());
                    (n, f)
                }
            }
        };
        let result = handshake.await;
        let mut g = slot.lock().expect("not poisoned");
        if matches!(&*g, State::Connecting(m, _) if *m == n) {
            *g = match &result {
                Ok(c) => State::Ready(c.clone()),
                Err(_) => State::Empty,
            };
        }
        result
    }

    /// The connection in the slot now, without waiting for a handshake in progress.
    pub(crate) fn current(&self, addr: SocketAddr, id: &PeerId) -> Option<C> {
        match &*self.existing(addr, id)?.lock().expect("not poisoned") {
            State::Ready(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Every pooled connection with its peer address.
    pub(crate) fn each(&self) -> Vec<(SocketAddr, C)> {
        self.all()
            .into_iter()
            .filter_map(|((addr, _), s)| match &*s.lock().expect("not poisoned") {
                State::Ready(c) => Some((addr, c.clone())),
                _ => None,
            })
            .collect()
    }

    /// Empties the slot if it still holds a connection `which` picks.
    pub(crate) fn evict(&self, addr: SocketAddr, id: &PeerId, which: impl Fn(&C) -> bool) {
        if let Some(slot) = self.existing(addr, id) {
            let mut g = slot.lock().expect("not poisoned");
            if matches!(&*g, State::Ready(c) if which(c)) {
                *g = State::Empty;
            }
        }
    }

    /// Connections open now (a slot busy connecting counts).
    pub(crate) fn active(&self) -> usize {
        self.all()
            .iter()
            .filter(|(_, s)| match &*s.lock().expect("not poisoned") {
                State::Ready(c) => c.is_alive(),
                State::Connecting(..) => true,
                State::Empty => false,
            })
            .count()
    }

    /// Drops dead connections, and live ones that carried no request for `idle`.
    pub(crate) fn sweep(&self, idle: Duration) {
        for (_, slot) in self.all() {
            let mut g = slot.lock().expect("not poisoned");
            let State::Ready(c) = &*g else { continue };
            if !c.is_alive() {
                *g = State::Empty;
            } else if c.usage().idle_for(idle) {
                c.close_idle();
                *g = State::Empty;
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
            *s.lock().expect("not poisoned") = State::Empty;
        }
    }
}

/// Runs `sweep` every quarter of the idle timeout until `shutdown`.
pub(crate) async fn reap_idle<C: Pooled + Sync>(
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
