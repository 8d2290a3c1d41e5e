//! Endpoints from a watched file (TOML or JSON by extension), reloaded when it changes. A file
//! that cannot be read or parsed keeps the last good set; in-flight requests are untouched
//! either way (they hold their endpoint already).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::endpoints::{log_change, Endpoint, Endpoints};
use crate::identity::PeerId;

pub struct FileSource {
    pub path: PathBuf,
    pub interval: Duration,
    pub trust_domain: String,
    pub service: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    address: std::net::SocketAddr,
    identity: Option<String>,
    #[serde(default = "one")]
    weight: u32,
    server_name: Option<String>,
}

fn one() -> u32 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    endpoints: Vec<FileEndpoint>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum JsonDoc {
    List(Vec<FileEndpoint>),
    Doc(FileDoc),
}

impl FileSource {
    /// Reads and parses the file. Errors name the file and what is wrong.
    pub fn load(&self) -> Result<Vec<Endpoint>, String> {
        let file = self.path.display();
        let text = std::fs::read_to_string(&self.path).map_err(|e| format!("{file}: {e}"))?;
        let json = self.path.extension().is_some_and(|e| e == "json");
        let list = if json {
            match serde_json::from_str::<JsonDoc>(&text).map_err(|e| format!("{file}: {e}"))? {
                JsonDoc::List(l) => l,
                JsonDoc::Doc(d) => d.endpoints,
            }
        } else {
            toml::from_str::<FileDoc>(&text)
                .map_err(|e| format!("{file}: {}", e.to_string().trim_end()))?
                .endpoints
        };
        parse(list, &self.trust_domain, &self.service).map_err(|e| format!("{file}: {e}"))
    }

    pub async fn watch(self, tx: watch::Sender<Endpoints>, shutdown: CancellationToken) {
        let stamp = |p: &PathBuf| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        };
        let mut last: Option<(SystemTime, u64)> = stamp(&self.path);
        let mut tick = tokio::time::interval(self.interval.max(Duration::from_millis(20)));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = stamp(&self.path);
            if now == last {
                continue;
            }
            last = now;
            match self.load() {
                Ok(eps) => {
                    log_change(&self.service, &tx.borrow(), &eps);
                    tx.send_replace(Arc::new(eps));
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, error = %e, "endpoints file changed but is unusable; keeping the last good set")
                }
            }
        }
    }
}

fn parse(
    list: Vec<FileEndpoint>,
    trust_domain: &str,
    service: &str,
) -> Result<Vec<Endpoint>, String> {
    list.into_iter()
        .enumerate()
        .map(|(i, e)| {
            let identity = match e.identity {
                Some(id) => {
                    PeerId::parse(&id).map_err(|err| format!("endpoints[{i}].identity: {err}"))?
                }
                None => PeerId::for_service(trust_domain, service),
            };
            Ok(Endpoint {
                address: e.address,
                identity,
                weight: e.weight.max(1),
                priority: 0,
                server_name: e.server_name,
            })
        })
        .collect()
}
