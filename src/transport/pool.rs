//! The connection pool both wires share: one slot per (peer address, expected identity)
//! holding its connections (one, unless the requests in flight fill the streams a connection
//! allows: then another), the handshakes in progress, a per-connection count of requests in
//! flight, and the idle sweep.

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
    fn start(self: &Arc<Self>) -> InFlight {
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
    /// The most requests the peer lets this connection carry at once (its stream limit).
    fn stream_limit(&self) -> usize;
    /// The stream limit when the peer has said it (what a next connection may plan by);
    /// `None` while it is a plan of ours.
    fn limit_heard(&self) -> Option<usize> {
        Some(self.stream_limit())
    }
    /// Resolves when the peer's limit is heard, or with why the connection ended before it was;
    /// `None` when it is heard already or never will be. A request that finds such a
    /// connection full by our plan waits for it (one round trip) rather than open another (a
    /// handshake of two or three), and fails with it when it ends unheard, as the requests it
    /// carries do (a peer gone silent is not asked again on a new connection for each).
    fn settling(&self) -> Option<BoxFuture<'static, Result<(), ProxyError>>> {
        None
    }
    /// Called when the idle sweep drops the connection.
    fn close_idle(&self) {}
}

/// The most connections a pool holds to one peer (address and identity), handshakes included.
/// They are opened only as requests in flight fill the streams the ones before allow (at
/// quicar's default, 1,024 each); the cap bounds what a peer that allows few streams (or a
/// hostile one that allows one) can make a sidecar open.
pub(crate) const MAX_CONNECTIONS: usize = 16;

/// A handshake in progress, shared by every request waiting for it.
type Connecting<C> = Shared<BoxFuture<'static, Result<C, ProxyError>>>;

/// A handshake in progress: numbered, so only its own result is stored, with the usage its
/// connection will carry (the requests waiting for it are counted there from the start).
struct Handshake<C> {
    n: u64,
    done: Connecting<C>,
    usage: Arc<Usage>,
}

/// What one slot holds: its connections (nearly always one), and the handshakes in progress
/// (one, unless a burst of requests is more than one connection's streams).
struct State<C> {
    ready: Vec<C>,
    connecting: Vec<Handshake<C>>,
    /// The stream limit the last connection to leave the slot had: what a handshake expects
    /// when no live connection says. HTTP/2 hears a peer's limit in its SETTINGS, a round
    /// trip after the handshake, so without it a burst after a reconnect (an idle close, a
    /// peer's restart) all waited on one new connection, past a lower limit of the peer's.
    last_limit: Option<usize>,
}

impl<C> Default for State<C> {
    fn default() -> Self {
        Self {
            ready: Vec::new(),
            connecting: Vec::new(),
            last_limit: None,
        }
    }
}

impl<C: Pooled> State<C> {
    /// Drops the connections `keep` refuses, remembering the stream limit of the last (a
    /// limit of 0, a peer refusing streams for now, is not one to plan by).
    fn retain(&mut self, mut keep: impl FnMut(&C) -> bool) {
        let last_limit = &mut self.last_limit;
        self.ready.retain(|c| {
            let kept = keep(c);
            if !kept {
                *last_limit = c.limit_heard().filter(|&n| n > 0).or(*last_limit);
            }
            kept
        });
    }
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
            .or_default()
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

    /// A live connection with a stream to spare, or a new one from `connect`. Single flight:
    /// concurrent callers for the same peer share one handshake and all get its result, so
    /// when it fails they fail together (within the connect timeout), not one after another.
    ///
    /// A connection whose requests in flight fill its stream limit takes no more: the next
    /// request opens another (HTTP/2 and QUIC make a request over the limit wait for a stream,
    /// and long-lived ones, event streams, long polls, would hold every later request to the
    /// peer until they end). Should that handshake fail, the full connection is used. A
    /// handshake, likewise, takes at most a connection's worth of waiting requests (the limit
    /// of the peer's live connections, else the one its last connection had, else `streams`,
    /// the limit expected): a burst beyond that, as when a peer comes back to many callers,
    /// starts another handshake beside it, and the requests a new connection turns out to
    /// have no streams for go on to another.
    /// At most `MAX_CONNECTIONS` per peer: past that, a request waits for a stream on the
    /// least busy one. `connect` gets the usage its connection must carry, where the
    /// requests that waited for it are already counted, and the peer's stream limit when a
    /// live or earlier connection told it (`None` for a peer this pool has not met).
    pub(crate) async fn get<F, Fut>(
        &self,
        addr: SocketAddr,
        id: &PeerId,
        streams: usize,
        connect: F,
    ) -> Result<(C, InFlight), ProxyError>
    where
        F: Fn(Arc<Usage>, Option<usize>) -> Fut,
        Fut: Future<Output = Result<C, ProxyError>> + Send + 'static,
    {
        let slot = self.slot(addr, id);
        let mut round = 0;
        loop {
            round += 1;
            let step = 'step: {
                let mut g = slot.lock().expect("not poisoned");
                let (mut live, mut limit, mut settling) = (0, None, None);
                for c in g.ready.iter().filter(|c| c.is_alive()) {
                    // Counted as it is picked (under the slot's lock), so a burst spreads at
                    // once.
                    if has_room(c) {
                        return Ok((c.clone(), c.usage().start()));
                    }
                    (live, limit) = (live + 1, c.limit_heard().or(limit));
                    settling = settling.or_else(|| c.settling());
                }
                let known = limit.or(g.last_limit);
                let limit = known.unwrap_or(streams);
                let spare = g
                    .connecting
                    .iter()
                    .position(|h| h.usage.in_flight() < limit);
                // Full only by our plan for a peer not yet heard (a lone first request's
                // connection, then a burst within the round trip its SETTINGS take): wait for
                // them, then look again. The peer's limit may well take the burst.
                if let (None, Some(settled)) = (spare, settling) {
                    break 'step Err(settled);
                }
                let join = match spare {
                    Some(i) => Some(i),
                    None if live + g.connecting.len() >= MAX_CONNECTIONS => {
                        // At the cap: the least busy connection or handshake, where the
                        // request waits for a stream.
                        let c = g
                            .ready
                            .iter()
                            .filter(|c| c.is_alive())
                            .min_by_key(|c| c.usage().in_flight());
                        let h = (0..g.connecting.len())
                            .min_by_key(|i| g.connecting[*i].usage.in_flight());
                        match (c, h) {
                            (Some(c), Some(i))
                                if c.usage().in_flight() <= g.connecting[i].usage.in_flight() =>
                            {
                                return Ok((c.clone(), c.usage().start()));
                            }
                            (Some(c), None) => return Ok((c.clone(), c.usage().start())),
                            (_, h) => h,
                        }
                    }
                    None => None,
                };
                Ok(match join {
                    Some(i) => {
                        let h = &g.connecting[i];
                        (h.n, h.done.clone(), h.usage.start())
                    }
                    None => {
                        let n = self.handshakes.fetch_add(1, Ordering::Relaxed);
                        let usage = Arc::new(Usage::default());
                        let counted = usage.start();
                        let done = connect(usage.clone(), known).boxed().shared();
                        g.connecting.push(Handshake {
                            n,
                            done: done.clone(),
                            usage,
                        });
                        (n, done, counted)
                    }
                })
            };
            let (n, handshake, counted) = match step {
                Ok(go) => go,
                Err(settled) => {
                    settled.await?;
                    continue;
                }
            };
            let result = handshake.await;
            let mut g = slot.lock().expect("not poisoned");
            if let Some(i) = g.connecting.iter().position(|h| h.n == n) {
                g.connecting.swap_remove(i);
                g.retain(Pooled::is_alive);
                if let Ok(c) = &result {
                    g.ready.push(c.clone());
                }
            }
            match result {
                Ok(c) => {
                    debug_assert!(Arc::ptr_eq(c.usage(), &counted.0), "connect kept the usage");
                    // More waited for it than the peer allows (its limit was not yet known):
                    // the ones over go on to another, while there may be another.
                    let count = g.ready.len() + g.connecting.len();
                    if c.usage().in_flight() > c.stream_limit()
                        && count < MAX_CONNECTIONS
                        && round < MAX_CONNECTIONS
                    {
                        drop(counted); // before the slot's lock, so the next one sees it
                        drop(g);
                        continue;
                    }
                    return Ok((c, counted));
                }
                Err(e) => {
                    drop(counted);
                    let c = g.ready.iter().find(|c| c.is_alive()).cloned().ok_or(e)?;
                    let counted = c.usage().start();
                    return Ok((c, counted));
                }
            }
        }
    }

    /// A connection in the slot now (a live one if there is one), without waiting for a
    /// handshake in progress.
    pub(crate) fn current(&self, addr: SocketAddr, id: &PeerId) -> Option<C> {
        let slot = self.existing(addr, id)?;
        let g = slot.lock().expect("not poisoned");
        g.ready
            .iter()
            .find(|c| c.is_alive())
            .or(g.ready.first())
            .cloned()
    }

    /// Every pooled connection with its peer address.
    pub(crate) fn each(&self) -> Vec<(SocketAddr, C)> {
        self.all()
            .into_iter()
            .flat_map(|((addr, _), s)| {
                let g = s.lock().expect("not poisoned");
                g.ready
                    .iter()
                    .map(|c| (addr, c.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Drops from the slot the connections `which` picks.
    pub(crate) fn evict(&self, addr: SocketAddr, id: &PeerId, which: impl Fn(&C) -> bool) {
        if let Some(slot) = self.existing(addr, id) {
            slot.lock().expect("not poisoned").retain(|c| !which(c));
        }
    }

    /// Connections open now (each handshake in progress counts one more).
    pub(crate) fn active(&self) -> usize {
        self.all()
            .iter()
            .map(|(_, s)| {
                let g = s.lock().expect("not poisoned");
                g.ready.iter().filter(|c| c.is_alive()).count() + g.connecting.len()
            })
            .sum()
    }

    /// Drops dead connections, and live ones that carried no request for `idle`.
    pub(crate) fn sweep(&self, idle: Duration) {
        for (_, slot) in self.all() {
            slot.lock().expect("not poisoned").retain(|c| {
                if !c.is_alive() {
                    return false;
                }
                if c.usage().idle_for(idle) {
                    c.close_idle();
                    return false;
                }
                true
            });
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
            *s.lock().expect("not poisoned") = State::default();
        }
    }
}

/// Whether a connection can carry another request without waiting for a stream.
fn has_room<C: Pooled>(c: &C) -> bool {
    c.usage().in_flight() < c.stream_limit()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Conn {
        limit: usize,
        usage: Arc<Usage>,
        /// False: the limit is the pool's plan, not yet the peer's word (HTTP/2 before the
        /// peer's SETTINGS).
        heard: bool,
    }

    impl Pooled for Conn {
        fn is_alive(&self) -> bool {
            true
        }
        fn usage(&self) -> &Arc<Usage> {
            &self.usage
        }
        fn stream_limit(&self) -> usize {
            self.limit
        }
        fn limit_heard(&self) -> Option<usize> {
            self.heard.then_some(self.limit)
        }
    }

    fn conn(limit: usize) -> Conn {
        Conn {
            limit,
            usage: Arc::default(),
            heard: true,
        }
    }

    #[test]
    fn the_limit_remembered_is_the_last_leavers_unless_it_allowed_no_streams() {
        let mut s = State::default();
        s.ready.push(conn(4));
        s.retain(|_| true);
        assert_eq!(
            s.last_limit, None,
            "a connection that stays is not remembered"
        );
        s.retain(|_| false);
        assert_eq!(s.last_limit, Some(4));
        // A peer that allowed no streams when its connection left (draining, or hostile)
        // says nothing to plan the next one by.
        s.ready.push(conn(0));
        s.retain(|_| false);
        assert_eq!(s.last_limit, Some(4));
        s.ready.extend([conn(8), conn(2)]);
        s.retain(|c| c.limit == 8);
        assert_eq!(s.last_limit, Some(2));
        // Nor does one that left before the peer said its limit: 100 was only our plan.
        s.ready.push(Conn {
            heard: false,
            ..conn(100)
        });
        s.retain(|c| c.limit == 8);
        assert_eq!(s.last_limit, Some(2));
    }

    #[tokio::test]
    async fn a_full_connection_that_has_not_heard_the_peers_limit_gives_none_to_the_next() {
        let slots = Slots::<Conn>::default();
        let addr = "127.0.0.1:1".parse().unwrap();
        let id = PeerId::parse("spiffe://quicar.local/peer").unwrap();
        // A first connection, planned for 2 before the peer's SETTINGS, with 2 in flight.
        let first = Conn {
            heard: false,
            ..conn(2)
        };
        let held: Vec<_> = (0..2).map(|_| first.usage().start()).collect();
        slots.slot(addr, &id).lock().unwrap().ready.push(first);
        // The next request opens another, which must not plan by the first one's 2.
        let (c, _counted) = slots
            .get(addr, &id, 1024, |usage, known| {
                assert_eq!(known, None, "planned by a limit the peer never said");
                async move {
                    Ok(Conn {
                        limit: 1024,
                        usage,
                        heard: true,
                    })
                }
            })
            .await
            .unwrap();
        assert_eq!(c.limit, 1024);
        drop(held);
    }

    #[tokio::test]
    async fn a_burst_joins_handshakes_by_the_remembered_limit() {
        let slots = Slots::<Conn>::default();
        let addr = "127.0.0.1:1".parse().unwrap();
        let id = PeerId::parse("spiffe://quicar.local/peer").unwrap();
        slots.slot(addr, &id).lock().unwrap().last_limit = Some(2);
        // Five callers at once and no connection: the handshakes take two waiters each (the
        // limit the last connection had), not the 1,024 expected of a peer never met. The new
        // connections say 1,024 themselves, as HTTP/2's do until the peer's SETTINGS come.
        let (gate, opened) = (
            Arc::new(tokio::sync::Semaphore::new(0)),
            AtomicUsize::new(0),
        );
        let callers = (0..5).map(|_| {
            slots.get(addr, &id, 1024, |usage, known| {
                assert_eq!(known, Some(2));
                opened.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                async move {
                    let _open = gate.acquire().await;
                    Ok(Conn {
                        limit: 1024,
                        usage,
                        heard: true,
                    })
                }
            })
        });
        let release = async {
            tokio::task::yield_now().await;
            gate.add_permits(5);
        };
        let (got, ()) =
            futures_util::future::join(futures_util::future::join_all(callers), release).await;
        assert!(got.iter().all(Result::is_ok));
        assert_eq!(opened.load(Ordering::SeqCst), 3);
    }
}
