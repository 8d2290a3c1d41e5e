//! Retry decisions and the retry budget: which failures may be retried, how long to back off,
//! and how many retries a service may add on top of its requests.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::Method;

use crate::config::RetryConfig;
use crate::error::ErrorKind;

/// How an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Certainly never reached the far app (connect refused, handshake refused, stream refused
    /// before processing, GOAWAY, stateless reset).
    NeverSent,
    /// Failed after the request may have been processed.
    Error(ErrorKind),
    /// The peer answered with this status.
    Status(u16),
}

impl Failure {
    /// The `reason` label of a retry.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::NeverSent => "never-sent",
            Self::Error(_) => "error",
            Self::Status(_) => "status",
        }
    }
}

/// RFC 9110 §9.2.2 idempotent methods.
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Retry only when safe: a request that was never sent always may be; one that may have
/// reached the app only if its method is idempotent, the failure is a connection-level one or
/// a configured status, and its body can be sent again.
pub(crate) fn is_retryable(
    method: &Method,
    failure: Failure,
    statuses: &[u16],
    body_replayable: bool,
) -> bool {
    match failure {
        Failure::NeverSent => true,
        _ if !is_idempotent(method) || !body_replayable => false,
        Failure::Error(kind) => matches!(kind, ErrorKind::PeerReset | ErrorKind::ConnectFailed),
        Failure::Status(s) => statuses.contains(&s),
    }
}

/// Exponential back-off with full jitter: uniform in [0, min(max, base × 2^(retry-1))].
pub(crate) fn backoff(retry: u32, base: Duration, max: Duration, r: f64) -> Duration {
    let cap = base
        .saturating_mul(2u32.saturating_pow(retry.saturating_sub(1).min(20)))
        .min(max);
    cap.mul_f64(r.clamp(0.0, 1.0))
}

/// Finagle/Linkerd-style retry budget over a sliding window of one-second buckets: retries may
/// reach `ratio` × requests in the window plus `min_per_second` × window seconds.
pub(crate) struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    window_secs: u64,
    start: Instant,
    buckets: Mutex<VecDeque<(u64, u64, u64)>>,
}

impl RetryBudget {
    pub(crate) fn new(cfg: &RetryConfig) -> Self {
        Self {
            ratio: cfg.budget_ratio,
            min_per_second: cfg.min_per_second,
            window_secs: cfg.budget_window.as_secs().max(1),
            start: Instant::now(),
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    fn with_bucket<T>(
        &self,
        now: Instant,
        f: impl FnOnce(&mut VecDeque<(u64, u64, u64)>) -> T,
    ) -> T {
        let sec = now.duration_since(self.start).as_secs();
        let mut b = self.buckets.lock().expect("not poisoned");
        while b
            .front()
            .is_some_and(|(s, _, _)| s + self.window_secs <= sec)
        {
            b.pop_front();
        }
        if b.back().is_none_or(|(s, _, _)| *s != sec) {
            b.push_back((sec, 0, 0));
        }
        f(&mut b)
    }

    /// An original request (not a retry), begun at `now`.
    pub(crate) fn request_at(&self, now: Instant) {
        self.with_bucket(now, |b| b.back_mut().expect("pushed").1 += 1);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub(crate) fn try_retry(&self) -> bool {
        self.try_retry_at(Instant::now())
    }

    pub(crate) fn try_retry_at(&self, now: Instant) -> bool {
        let (ratio, floor) = (
            self.ratio,
            f64::from(self.min_per_second) * self.window_secs as f64,
        );
        self.with_bucket(now, |b| {
            let requests: u64 = b.iter().map(|x| x.1).sum();
            let retries: u64 = b.iter().map(|x| x.2).sum();
            let allowed = (ratio * requests as f64 + floor).floor() as u64;
            if retries < allowed {
                b.back_mut().expect("pushed").2 += 1;
                true
            } else {
                false
            }
        })
    }
}

/// Requests in flight under a limit that is never waited for: a request over it is refused at
/// once (`max_concurrent`, `inbound.max_requests`). A count, not a semaphore: tokio's permit
/// takes the semaphore's waiter lock as it is released, waiters or not.
#[derive(Debug)]
pub(crate) struct Limit {
    max: usize,
    used: AtomicUsize,
}

/// One place under a [`Limit`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Taken(Arc<Limit>);

impl Limit {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            used: AtomicUsize::new(0),
        })
    }

    /// A place, unless all `max` are taken.
    pub(crate) fn try_take(self: &Arc<Self>) -> Option<Taken> {
        self.used
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(Taken(self.clone()))
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_refuses_past_its_max_and_takes_again_once_a_place_is_given_back() {
        let limit = Limit::new(2);
        let a = limit.try_take().expect("first place");
        let b = limit.try_take().expect("second place");
        assert!(limit.try_take().is_none(), "a third is refused");
        drop(a);
        let c = limit.try_take().expect("a place given back is taken again");
        assert!(limit.try_take().is_none());
        drop((b, c));
        assert_eq!(limit.used.load(Ordering::Relaxed), 0);
        assert!(
            Limit::new(0).try_take().is_none(),
            "a limit of 0 takes nothing"
        );
    }

    #[test]
    fn only_safe_retries() {
        let st = [502, 503, 504];
        assert!(is_retryable(&Method::POST, Failure::NeverSent, &st, false));
        assert!(!is_retryable(
            &Method::POST,
            Failure::Error(ErrorKind::PeerReset),
            &st,
            true
        ));
        assert!(!is_retryable(
            &Method::POST,
            Failure::Status(503),
            &st,
            true
        ));
        assert!(is_retryable(&Method::GET, Failure::Status(503), &st, true));
        assert!(!is_retryable(&Method::GET, Failure::Status(500), &st, true));
        assert!(is_retryable(
            &Method::PUT,
            Failure::Error(ErrorKind::PeerReset),
            &st,
            true
        ));
        assert!(
            !is_retryable(
                &Method::PUT,
                Failure::Error(ErrorKind::PeerReset),
                &st,
                false
            ),
            "body gone"
        );
        assert!(!is_retryable(
            &Method::GET,
            Failure::Error(ErrorKind::Timeout),
            &st,
            true
        ));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Duration::from_millis(25);
        let m = Duration::from_secs(1);
        assert_eq!(backoff(1, b, m, 1.0), Duration::from_millis(25));
        assert_eq!(backoff(3, b, m, 1.0), Duration::from_millis(100));
        assert_eq!(backoff(30, b, m, 1.0), m);
        assert_eq!(backoff(3, b, m, 0.0), Duration::ZERO);
    }

    #[test]
    fn budget_caps_amplification() {
        let cfg = RetryConfig {
            budget_ratio: 0.2,
            min_per_second: 1,
            budget_window: Duration::from_secs(10),
            ..RetryConfig::default()
        };
        let budget = RetryBudget::new(&cfg);
        let t = Instant::now();
        let mut retries = 0;
        for _ in 0..100 {
            budget.request_at(t);
            while budget.try_retry_at(t) {
                retries += 1;
            }
        }
        // 0.2 × 100 + 1 × 10.
        assert_eq!(retries, 30);
        // The window slides: a minute later the old requests no longer count.
        let later = t + Duration::from_secs(60);
        budget.request_at(later);
        let mut more = 0;
        while budget.try_retry_at(later) {
            more += 1;
        }
        assert_eq!(more, 10);
    }
}
