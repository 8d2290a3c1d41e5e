//! Endpoints from DNS SRV records (how Consul and Kubernetes headless services publish them):
//! priority, weight and port from SRV, addresses from the targets' A/AAAA records, identity
//! from a template. Refreshed when the records' TTL runs out (within bounds); a failed lookup
//! keeps the last good set and retries.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::endpoints::{log_change, Endpoint, Endpoints};
use crate::identity::PeerId;

pub struct DnsSource {
    /// The SRV name, e.g. `_hello._udp.mesh.example.`
    pub name: String,
    /// A DNS server to ask; absent = the system's resolv.conf.
    pub server: Option<SocketAddr>,
    /// `{trust_domain}`, `{service}` and `{target}` (the SRV target without trailing dot).
    pub identity_template: String,
    pub trust_domain: String,
    pub service: String,
    pub min_refresh: Duration,
    pub max_refresh: Duration,
}

/// One SRV answer, reduced to what we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
}

/// SRV answers plus the addresses of their targets → endpoints. Targets without an address
/// are skipped (and logged by the caller); identities come from the template.
pub fn endpoints_from_srv(
    srvs: &[Srv],
    addresses: &dyn Fn(&str) -> Vec<IpAddr>,
    template: &str,
    trust_domain: &str,
    service: &str,
) -> Result<Vec<Endpoint>, String> {
    let mut out = Vec::new();
    for srv in srvs {
        let target = srv.target.trim_end_matches('.');
        let id = template
            .replace("{trust_domain}", trust_domain)
            .replace("{service}", service)
            .replace("{target}", target);
        let identity = PeerId::parse(&id).map_err(|e| format!("identity template gives {e}"))?;
        for ip in addresses(target) {
            out.push(Endpoint {
                address: SocketAddr::new(ip, srv.port),
                identity: identity.clone(),
                // RFC 2782: weight 0 means "very rarely", not never.
                weight: u32::from(srv.weight).max(1),
                priority: srv.priority,
                server_name: None,
            });
        }
    }
    out.sort_by_key(|e| (e.priority, e.address));
    out.dedup_by(|a, b| a.address == b.address && a.identity == b.identity);
    Ok(out)
}

impl DnsSource {
    fn resolver(&self) -> Result<TokioResolver, String> {
        match self.server {
            Some(server) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                let ns = NameServerConfig::new(server.ip(), true, vec![udp, tcp]);
                let mut builder = TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(vec![ns]),
                    TokioRuntimeProvider::default(),
                );
                let opts = builder.options_mut();
                opts.timeout = Duration::from_secs(2);
                opts.attempts = 2;
                // We refresh on TTL ourselves; the resolver's cache would only delay changes.
                opts.cache_size = 0;
                builder.build().map_err(|e| e.to_string())
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| e.to_string())?
                .build()
                .map_err(|e| e.to_string()),
        }
    }

    /// One lookup: SRV, then the targets' addresses. Returns endpoints and how long they live.
    async fn lookup(&self, resolver: &TokioResolver) -> Result<(Vec<Endpoint>, Duration), String> {
        let lookup = resolver
            .srv_lookup(self.name.as_str())
            .await
            .map_err(|e| format!("SRV {}: {e}", self.name))?;
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(std::time::Instant::now());
        let mut srvs = Vec::new();
        let mut glue: Vec<(String, IpAddr)> = Vec::new();
        for r in lookup.answers().iter().chain(lookup.additionals()) {
            match &r.data {
                RData::SRV(s) => srvs.push(Srv {
                    priority: s.priority,
                    weight: s.weight,
                    port: s.port,
                    target: s.target.to_ascii().trim_end_matches('.').to_string(),
                }),
                RData::A(a) => glue.push((
                    r.name.to_ascii().trim_end_matches('.').to_string(),
                    IpAddr::V4(a.0),
                )),
                RData::AAAA(a) => glue.push((
                    r.name.to_ascii().trim_end_matches('.').to_string(),
                    IpAddr::V6(a.0),
                )),
                _ => {}
            }
        }
        let mut addresses: Vec<(String, IpAddr)> = glue;
        for srv in &srvs {
            if addresses
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(&srv.target))
            {
                continue;
            }
            // Literal addresses as targets are not allowed by RFC 2782, but are common.
            if let Ok(ip) = srv.target.parse::<IpAddr>() {
                addresses.push((srv.target.clone(), ip));
                continue;
            }
            match resolver.lookup_ip(format!("{}.", srv.target)).await {
                Ok(ips) => addresses.extend(ips.iter().map(|ip| (srv.target.clone(), ip))),
                Err(e) => {
                    tracing::warn!(target = %srv.target, error = %e, "SRV target has no address; skipped")
                }
            }
        }
        let eps = endpoints_from_srv(
            &srvs,
            &|t: &str| {
                addresses
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(t))
                    .map(|(_, ip)| *ip)
                    .collect()
            },
            &self.identity_template,
            &self.trust_domain,
            &self.service,
        )?;
        Ok((eps, ttl))
    }

    pub async fn run(self, tx: watch::Sender<Endpoints>, shutdown: CancellationToken) {
        let resolver = match self.resolver() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(service = %self.service, error = %e, "cannot build DNS resolver; service has no endpoints");
                return;
            }
        };
        let mut backoff = self.min_refresh;
        loop {
            let wait = match self.lookup(&resolver).await {
                Ok((eps, ttl)) => {
                    backoff = self.min_refresh;
                    log_change(&self.service, &tx.borrow(), &eps);
                    tx.send_if_modified(|cur| {
                        if **cur == eps {
                            false
                        } else {
                            *cur = Arc::new(eps);
                            true
                        }
                    });
                    ttl.clamp(self.min_refresh, self.max_refresh)
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, error = %e, "DNS discovery failed; keeping the last good set");
                    backoff = (backoff * 2).min(self.max_refresh);
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_answers_become_endpoints() {
        let srvs = vec![
            Srv {
                priority: 10,
                weight: 5,
                port: 4143,
                target: "b.mesh.".into(),
            },
            Srv {
                priority: 0,
                weight: 0,
                port: 4143,
                target: "a.mesh".into(),
            },
            Srv {
                priority: 0,
                weight: 1,
                port: 4143,
                target: "gone.mesh".into(),
            },
        ];
        let addrs = |t: &str| match t {
            "a.mesh" => vec!["10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()],
            "b.mesh" => vec!["10.0.0.3".parse().unwrap()],
            _ => vec![],
        };
        let eps = endpoints_from_srv(
            &srvs,
            &addrs,
            "spiffe://{trust_domain}/{service}",
            "td",
            "hello",
        )
        .unwrap();
        assert_eq!(eps.len(), 3);
        assert_eq!(eps[0].address, "10.0.0.1:4143".parse().unwrap());
        assert_eq!((eps[0].priority, eps[0].weight), (0, 1));
        assert_eq!((eps[2].priority, eps[2].weight), (10, 5));
        assert!(eps
            .iter()
            .all(|e| e.identity.as_str() == "spiffe://td/hello"));
        let per_target =
            endpoints_from_srv(&srvs, &addrs, "spiffe://td/{target}", "td", "hello").unwrap();
        assert_eq!(per_target[2].identity.as_str(), "spiffe://td/b.mesh");
        assert!(endpoints_from_srv(&srvs, &addrs, "not-spiffe", "td", "hello").is_err());
    }
}
