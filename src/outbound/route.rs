//! A remote service as the outbound request path sees it: its endpoints (the discovery watch
//! channel), balancer and breakers, retry policy and budget, concurrency limit, deadline,
//! transport and cache. Built once from config; looked up once per request.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::Balancer;
use crate::cache::{Cache, Clock};
use crate::config::{BreakerConfig, Config, RetryConfig, Service, TransportKind};
use crate::discovery::{Endpoints, Source};
use crate::resilience::{Limit, RetryBudget};
use crate::telemetry::ServiceTel;

pub(crate) struct Route {
    pub(crate) name: String,
    pub(crate) tel: Arc<ServiceTel>,
    pub(crate) cache: Option<Arc<Cache>>,
    pub(crate) timeout: Duration,
    pub(crate) body_idle_timeout: Duration,
    pub(crate) max_request_body: Option<u64>,
    pub(crate) connect_timeout: Duration,
    /// The current endpoint set, from the service's discovery source.
    pub(crate) endpoints: watch::Receiver<Endpoints>,
    pub(crate) balancer: Balancer,
    pub(crate) retry: RetryConfig,
    pub(crate) budget: RetryBudget,
    pub(crate) breaker: BreakerConfig,
    pub(crate) limit: Arc<Limit>,
    pub(crate) max_concurrent: usize,
    pub(crate) transport: TransportKind,
}

impl Route {
    /// The route of `svc`, with its discovery source started.
    pub(crate) fn new(
        config: &Config,
        svc: &Service,
        clock: &Arc<Clock>,
        tel: Arc<ServiceTel>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let endpoints = Source::from_config(config, svc).start(tracker, shutdown);
        let cache = svc.cache.as_ref().map(|c| {
            let targeted = c
                .targeted
                .iter()
                .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
                .collect();
            Arc::new(
                Cache::new(
                    c.max_bytes.0,
                    usize::try_from(c.max_entry_bytes.0).unwrap_or(usize::MAX),
                    clock.clone(),
                )
                .with_targeted(targeted)
                .with_stale_on_connect_failure(
                    c.serve_stale_on_connect_failure.unwrap_or_default(),
                ),
            )
        });
        Self {
            name: svc.name.clone(),
            tel,
            cache,
            timeout: svc.timeout,
            body_idle_timeout: svc.body_idle_timeout,
            max_request_body: svc.max_request_body.map(|b| b.0),
            connect_timeout: svc.connect_timeout,
            endpoints,
            balancer: Balancer::default(),
            budget: RetryBudget::new(&svc.retry),
            retry: svc.retry.clone(),
            breaker: svc.breaker.clone(),
            limit: Limit::new(svc.max_concurrent),
            max_concurrent: svc.max_concurrent,
            transport: svc.transport,
        }
    }
}
