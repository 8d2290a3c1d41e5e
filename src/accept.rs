//! The accept loop the three TCP listeners share (outbound, inbound TLS, admin): stop on
//! shutdown, back off on accept errors (EMFILE and friends) instead of spinning, and log those
//! errors at most once a second with a count of the ones not logged.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Pause after a failed accept, so a full fd table does not become a busy loop.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// At most one log line per this long about failed accepts.
const LOG_EVERY: Duration = Duration::from_secs(1);

pub(crate) struct Listener {
    inner: TcpListener,
    what: &'static str,
    last_log: std::sync::Mutex<(Option<Instant>, u64)>,
}

impl Listener {
    pub(crate) fn new(inner: TcpListener, what: &'static str) -> Self {
        Self {
            inner,
            what,
            last_log: std::sync::Mutex::new((None, 0)),
        }
    }

    /// The next connection (with `TCP_NODELAY` set), or `None` once `shutdown` is cancelled.
    pub(crate) async fn accept(
        &self,
        shutdown: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr)> {
        loop {
            let r = tokio::select! {
                _ = shutdown.cancelled() => return None,
                r = self.inner.accept() => r,
            };
            match r {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((stream, remote));
                }
                Err(e) => {
                    self.log(&e);
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(ERROR_PAUSE) => {}
                    }
                }
            }
        }
    }

    fn log(&self, e: &std::io::Error) {
        let mut last = self.last_log.lock().expect("not poisoned");
        let due = last.0.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if due {
            let suppressed = std::mem::take(&mut last.1);
            tracing::warn!(listener = self.what, error = %e, suppressed, "accept failed");
            last.0 = Some(Instant::now());
        } else {
            last.1 += 1;
        }
    }
}
