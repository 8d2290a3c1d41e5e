//! Load balancing: power of two choices over peak-EWMA latency weighted by outstanding
//! requests (the Finagle/Linkerd algorithm), honouring endpoint weights and SRV priorities, and
//! skipping endpoints whose circuit breaker is open.

use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::BreakerConfig;
use crate::discovery::Endpoint;
use crate::identity::PeerId;
use crate::rng::random;

/// Latency assumed for an endpoint we know nothing about yet.
const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// How fast old latency observations fade (peak-EWMA decay).
const DECAY: Duration = Duration::from_secs(10);

/// What one endpoint has shown lately.
pub(crate) struct EndpointState {
    ewma: Mutex<(f64, Instant)>,
    outstanding: AtomicUsize,
    breaker: Mutex<Breaker>,
    /// What the last failure counted by the breaker was, for `circuit-open` and `/endpoints`.
    last_failure: Mutex<Option<String>>,
}

impl Default for EndpointState {
    fn default() -> Self {
        Self {
            ewma: Mutex::new((DEFAULT_RTT.as_secs_f64(), Instant::now())),
            outstanding: AtomicUsize::new(0),
            breaker: Mutex::new(Breaker::default()),
            last_failure: Mutex::new(None),
        }
    }
}

/// Counts a request outstanding on an endpoint while alive.
pub(crate) struct Outstanding(Arc<EndpointState>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::AcqRel);
    }
}

impl EndpointState {
    pub(crate) fn start(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Ordering::AcqRel);
        Outstanding(self.clone())
    }

    /// Peak EWMA: a slower sample takes over at once, faster ones pull the average down
    /// gradually, so a latency spike is reacted to immediately.
    pub(crate) fn observe(&self, latency: Duration, now: Instant) {
        let mut g = self.ewma.lock().expect("not poisoned");
        let rtt = latency.as_secs_f64();
        let elapsed = now.duration_since(g.1).as_secs_f64();
        let w = (-elapsed / DECAY.as_secs_f64()).exp();
        g.0 = if rtt > g.0 {
            rtt
        } else {
            g.0 * w + rtt * (1.0 - w)
        };
        g.1 = now;
    }

    /// Load-weighted cost: latency × (outstanding + 1).
    pub(crate) fn cost(&self) -> f64 {
        let ewma = self.ewma.lock().expect("not poisoned").0;
        ewma * (self.outstanding.load(Ordering::Acquire) as f64 + 1.0)
    }

    pub(crate) fn ewma(&self) -> Duration {
        Duration::from_secs_f64(self.ewma.lock().expect("not poisoned").0)
    }

    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Acquire)
    }

    /// A request the path to this endpoint carried: closes the breaker.
    pub(crate) fn succeeded(&self) {
        self.breaker.lock().expect("not poisoned").success();
    }

    /// A failure of the path to this endpoint. Returns true when this ejected it.
    pub(crate) fn failed(&self, cfg: &BreakerConfig, why: &str) -> bool {
        *self.last_failure.lock().expect("not poisoned") = Some(why.to_string());
        self.breaker
            .lock()
            .expect("not poisoned")
            .failure(Instant::now(), cfg)
    }

    /// The last failure the breaker counted.
    pub(crate) fn last_failure(&self) -> Option<String> {
        self.last_failure.lock().expect("not poisoned").clone()
    }

    pub(crate) fn breaker_state(&self) -> &'static str {
        self.breaker
            .lock()
            .expect("not poisoned")
            .state(Instant::now())
    }
}

/// Per-endpoint consecutive-failure breaker: closed → open (ejected for a growing time) →
/// half-open (one probe) → closed on success, open again on failure.
#[derive(Debug, Default)]
pub(crate) struct Breaker {
    consecutive: u32,
    ejections: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// Whether the breaker lets a request through.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    Yes,
    Probe,
    No,
}

impl Breaker {
    pub(crate) fn admit(&mut self, now: Instant) -> Admit {
        match self.open_until {
            None => Admit::Yes,
            Some(until) if now < until => Admit::No,
            Some(_) if self.probing => Admit::No,
            Some(_) => Admit::Probe,
        }
    }

    fn claim_probe(&mut self) {
        self.probing = true;
    }

    pub(crate) fn success(&mut self) {
        self.consecutive = 0;
        self.ejections = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// Returns true when this failure ejected the endpoint.
    pub(crate) fn failure(&mut self, now: Instant, cfg: &BreakerConfig) -> bool {
        self.consecutive += 1;
        let probe_failed = self.probing;
        self.probing = false;
        if probe_failed || (self.open_until.is_none() && self.consecutive >= cfg.failures) {
            let factor = 2u32.saturating_pow(self.ejections.min(16));
            let ejection = cfg.ejection.saturating_mul(factor).min(cfg.max_ejection);
            self.ejections += 1;
            self.open_until = Some(now + ejection);
            return true;
        }
        false
    }

    pub(crate) fn state(&self, now: Instant) -> &'static str {
        match self.open_until {
            None => "closed",
            Some(u) if now < u => "open",
            Some(_) => "half-open",
        }
    }
}

/// The outcome of choosing an endpoint.
pub(crate) enum Pick {
    Chosen(Endpoint, Arc<EndpointState>),
    /// The service has no endpoints at all.
    None,
    /// Every endpoint's breaker is open.
    AllOpen,
}

/// Per-service balancer; endpoint state survives discovery updates (keyed by address and
/// identity).
#[derive(Default)]
pub(crate) struct Balancer {
    /// Fx-hashed: the keys are endpoints from config or discovery, never client input.
    states: Mutex<FxHashMap<(SocketAddr, PeerId), Arc<EndpointState>>>,
}

impl Balancer {
    pub(crate) fn state(&self, ep: &Endpoint) -> Arc<EndpointState> {
        self.states
            .lock()
            .expect("not poisoned")
            .entry((ep.address, ep.identity.clone()))
            .or_default()
            .clone()
    }

    /// Chooses an endpoint, preferring ones not in `tried` (the next attempt goes elsewhere
    /// when it can), then the lowest priority with an admitting breaker. When fewer than
    /// `panic_threshold` percent of the endpoints admit requests, breakers are ignored: an
    /// ejection never takes the whole service down (Envoy's panic routing).
    pub(crate) fn pick(
        &self,
        eps: &[Endpoint],
        tried: &[SocketAddr],
        panic_threshold: u8,
        now: Instant,
    ) -> Pick {
        if eps.is_empty() {
            return Pick::None;
        }
        if let [ep] = eps {
            // One endpoint (a sidecar peer, usually): the rule below without its lists. Which
            // endpoints were tried does not matter when there is no other.
            let state = self.state(ep);
            let mut breaker = state.breaker.lock().expect("not poisoned");
            let admit = match breaker.admit(now) {
                Admit::No if in_panic(&[Admit::No], panic_threshold) => Admit::Yes,
                admit => admit,
            };
            match admit {
                Admit::No => return Pick::AllOpen,
                Admit::Probe => breaker.claim_probe(),
                Admit::Yes => {}
            }
            drop(breaker);
            return Pick::Chosen(ep.clone(), state);
        }
        let states: Vec<Arc<EndpointState>> = eps.iter().map(|e| self.state(e)).collect();
        let mut admits: Vec<Admit> = states
            .iter()
            .map(|s| s.breaker.lock().expect("not poisoned").admit(now))
            .collect();
        if in_panic(&admits, panic_threshold) {
            for a in &mut admits {
                if *a == Admit::No {
                    *a = Admit::Yes;
                }
            }
        }
        // The admitting endpoints of the best priority, not yet tried if there are such.
        let admitting = |i: &usize| admits[*i] != Admit::No;
        let fresh = |i: &usize| !tried.contains(&eps[*i].address);
        let any_fresh = (0..eps.len()).any(|i| admitting(&i) && fresh(&i));
        let usable = |i: &usize| admitting(i) && (!any_fresh || fresh(i));
        let Some(best) = (0..eps.len()).filter(usable).map(|i| eps[i].priority).min() else {
            return Pick::AllOpen;
        };
        let candidates: Vec<usize> = (0..eps.len())
            .filter(|i| usable(i) && eps[*i].priority == best)
            .collect();
        // A half-open endpoint is tried with one probe before anything else is decided.
        let i = match candidates.iter().find(|&&i| admits[i] == Admit::Probe) {
            Some(&i) => {
                states[i]
                    .breaker
                    .lock()
                    .expect("not poisoned")
                    .claim_probe();
                i
            }
            None if candidates.len() == 1 => candidates[0],
            None => {
                let costs: Vec<f64> = candidates.iter().map(|&i| states[i].cost()).collect();
                let weights: Vec<u32> = candidates.iter().map(|&i| eps[i].weight).collect();
                candidates[pick_p2c(&costs, &weights, random(), random())]
            }
        };
        Pick::Chosen(eps[i].clone(), states[i].clone())
    }
}

/// Whether so few endpoints admit requests that breakers should be ignored.
fn in_panic(admits: &[Admit], panic_threshold: u8) -> bool {
    let admitting = admits.iter().filter(|a| **a != Admit::No).count();
    admitting * 100 < admits.len() * usize::from(panic_threshold)
}

/// Power of two choices: draw two candidates by weight (`r1`, `r2` uniform in [0, 1)), keep
/// the one with the lower cost per unit of weight.
pub(crate) fn pick_p2c(costs: &[f64], weights: &[u32], r1: f64, r2: f64) -> usize {
    let n = costs.len();
    if n == 1 {
        return 0;
    }
    let total: f64 = weights.iter().map(|&w| f64::from(w.max(1))).sum();
    let draw = |r: f64, skip: Option<usize>| {
        let total = total - skip.map_or(0.0, |s| f64::from(weights[s].max(1)));
        let mut x = r * total;
        for (i, &weight) in weights.iter().enumerate() {
            if Some(i) == skip {
                continue;
            }
            let w = f64::from(weight.max(1));
            if x < w {
                return i;
            }
            x -= w;
        }
        (0..n).rev().find(|&i| Some(i) != skip).unwrap_or(0)
    };
    let a = draw(r1, None);
    let b = draw(r2, Some(a));
    let score = |i: usize| costs[i] / f64::from(weights[i].max(1));
    if score(b) < score(a) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p2c_prefers_the_cheaper_of_two_and_honours_weights() {
        // Two equal-weight candidates: the cheaper wins whichever is drawn first.
        assert_eq!(pick_p2c(&[5.0, 1.0], &[1, 1], 0.1, 0.9), 1);
        assert_eq!(pick_p2c(&[5.0, 1.0], &[1, 1], 0.9, 0.1), 1);
        // Equal cost, weight 3 vs 1: the heavier endpoint wins more draws.
        let mut heavy = 0;
        for i in 0..1000 {
            let r1 = (i as f64 + 0.5) / 1000.0;
            let r2 = ((i * 7919) % 1000) as f64 / 1000.0;
            if pick_p2c(&[1.0, 1.0], &[3, 1], r1, r2) == 0 {
                heavy += 1;
            }
        }
        assert!(heavy > 700, "{heavy}");
    }

    #[test]
    fn breaker_opens_probes_and_closes() {
        let cfg = BreakerConfig {
            failures: 3,
            ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(4),
            ..BreakerConfig::default()
        };
        let mut b = Breaker::default();
        let t0 = Instant::now();
        assert!(!b.failure(t0, &cfg));
        assert!(!b.failure(t0, &cfg));
        assert!(b.failure(t0, &cfg), "third consecutive failure ejects");
        assert_eq!(b.admit(t0), Admit::No);
        let later = t0 + Duration::from_millis(1100);
        assert_eq!(b.admit(later), Admit::Probe);
        b.claim_probe();
        assert_eq!(b.admit(later), Admit::No, "one probe at a time");
        assert!(
            b.failure(later, &cfg),
            "a failed probe ejects again, for longer"
        );
        assert_eq!(b.admit(later + Duration::from_millis(1500)), Admit::No);
        assert_eq!(b.admit(later + Duration::from_millis(2100)), Admit::Probe);
        b.success();
        assert_eq!(b.admit(later), Admit::Yes);
    }

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            identity: PeerId::for_service("quicar.local", "hello"),
            weight: 1,
            priority: 0,
            server_name: None,
        }
    }

    #[test]
    fn panic_threshold_keeps_an_ejected_service_reachable() {
        let cfg = BreakerConfig {
            failures: 1,
            ..BreakerConfig::default()
        };
        let lb = Balancer::default();
        let one = [ep(1)];
        assert!(lb.state(&one[0]).failed(&cfg, "connect-failed"));
        // The only endpoint is ejected: below any threshold, so traffic still flows to it…
        assert!(matches!(
            lb.pick(&one, &[], 50, Instant::now()),
            Pick::Chosen(..)
        ));
        // …unless panic routing is disabled.
        assert!(matches!(
            lb.pick(&one, &[], 0, Instant::now()),
            Pick::AllOpen
        ));
        // One of four ejected (75 % admit) is above a 50 % threshold: breakers hold and the
        // ejected endpoint gets nothing.
        let four = [ep(1), ep(2), ep(3), ep(4)];
        for _ in 0..200 {
            match lb.pick(&four, &[], 50, Instant::now()) {
                Pick::Chosen(e, _) => assert_ne!(e.address.port(), 1),
                _ => panic!("no pick"),
            }
        }
        // Three of four ejected (25 % admit) is below it: all four take traffic again.
        for p in [2, 3] {
            assert!(lb.state(&four[p - 1]).failed(&cfg, "reset"));
        }
        let mut ports = std::collections::HashSet::new();
        for _ in 0..400 {
            if let Pick::Chosen(e, _) = lb.pick(&four, &[], 50, Instant::now()) {
                ports.insert(e.address.port());
            }
        }
        assert_eq!(ports.len(), 4, "{ports:?}");
    }

    #[test]
    fn one_endpoint_and_several_follow_the_same_breaker_rules() {
        // A half-open endpoint gets exactly one probe, alone (the one-endpoint path) as among
        // others (the general path), and a tried endpoint is used again when it is the only one.
        let cfg = BreakerConfig {
            failures: 1,
            ejection: Duration::ZERO,
            ..BreakerConfig::default()
        };
        for n in [1, 2] {
            let lb = Balancer::default();
            let eps: Vec<Endpoint> = (1..=n).map(ep).collect();
            for e in &eps {
                assert!(lb.state(e).failed(&cfg, "reset"));
            }
            let probes = (0..10)
                .filter(|_| matches!(lb.pick(&eps, &[], 0, Instant::now()), Pick::Chosen(..)))
                .count();
            assert_eq!(
                probes, n as usize,
                "{n} endpoint(s): one probe each while half-open"
            );
            let lb = Balancer::default();
            let tried = [eps[0].address];
            assert!(matches!(
                lb.pick(&eps[..1], &tried, 0, Instant::now()),
                Pick::Chosen(..)
            ));
        }
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let s = EndpointState::default();
        s.observe(Duration::from_millis(100), Instant::now());
        assert!(s.ewma() >= Duration::from_millis(100));
        s.observe(Duration::from_millis(1), Instant::now());
        assert!(
            s.ewma() > Duration::from_millis(50),
            "one fast sample right after does not erase a spike"
        );
    }
}
