//! Interim (1xx) responses on their way from the responding app to the calling app, as they
//! arrive: `103 Early Hints` lets the caller start fetching what the final response will need.
//!
//! Whoever can send interim responses on makes an `Interim`: the outbound edge (onto the app's
//! HTTP/1.1 connection, `outbound/app_conn`) puts it in the request's extensions, where each
//! transport client finds it; each transport server (onto the HTTP/3 or HTTP/2 stream toward
//! the calling sidecar) passes it beside the request to the inbound path and the local-app
//! client (`inbound/local_app/h1`), which hands the app's interim responses to it.
//! `100 Continue` stays hop-local (each hop answers `Expect` itself) and `101` is never
//! forwarded (no upgrades); hop-by-hop and `quicar-*` fields are dropped, as on final responses.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::task::AtomicWaker;
use http::{Response, StatusCode};

use crate::headers::{strip_hop_by_hop, strip_quicar};

/// At most this many interim responses of one request are passed on; a peer or app that sends
/// more only wastes its own effort.
pub(crate) const MAX_PER_REQUEST: u32 = 16;

struct Inner<F: ?Sized> {
    passed: AtomicU32,
    sink: F,
}

/// Where the interim responses of one request go next (one allocation per request).
#[derive(Clone)]
pub(crate) struct Interim(Sink);

#[derive(Clone)]
enum Sink {
    /// Straight into the queue a transport server sends from (`channel`).
    Queue(Arc<Queue>),
    Fn(Arc<Inner<dyn Fn(Response<()>) + Send + Sync>>),
}

impl Interim {
    pub(crate) fn new(sink: impl Fn(Response<()>) + Send + Sync + 'static) -> Self {
        Self(Sink::Fn(Arc::new(Inner {
            passed: AtomicU32::new(0),
            sink,
        })))
    }

    /// Passes `resp` on if it is an interim response to forward (and the request is under its
    /// allowance), with hop-by-hop and `quicar-*` fields dropped.
    pub(crate) fn forward(&self, mut resp: Response<()>) {
        if !forwardable(resp.status()) {
            return;
        }
        let passed = match &self.0 {
            Sink::Queue(q) => &q.passed,
            Sink::Fn(inner) => &inner.passed,
        };
        if passed.fetch_add(1, Ordering::Relaxed) >= MAX_PER_REQUEST {
            return;
        }
        strip_hop_by_hop(resp.headers_mut());
        strip_quicar(resp.headers_mut());
        resp.extensions_mut().clear();
        match &self.0 {
            Sink::Queue(q) => q.push(resp),
            Sink::Fn(inner) => (inner.sink)(resp),
        }
    }
}

/// 1xx other than 100 (hop-local) and 101 (no upgrades through the sidecar).
pub(crate) fn forwardable(status: StatusCode) -> bool {
    status.is_informational()
        && status != StatusCode::CONTINUE
        && status != StatusCode::SWITCHING_PROTOCOLS
}

/// The interim responses of one request, between the receiver (which never waits) and the
/// task that sends them on (the transport servers). `Interim` bounds how many arrive.
#[derive(Default)]
pub(crate) struct Queue {
    items: Mutex<VecDeque<Response<()>>>,
    /// The one task that sends them on, woken when one arrives (a `Notify` put each request's
    /// wait in a locked list and took it out again, for responses that seldom come; callgrind
    /// saw no difference in the far sidecar's instructions either way).
    arrived: AtomicWaker,
    passed: AtomicU32,
}

impl Queue {
    /// The next interim response, when one arrives. One task at a time waits (the transport
    /// server's request task).
    pub(crate) async fn recv(&self) -> Response<()> {
        std::future::poll_fn(|cx| {
            if let Some(r) = self.try_recv() {
                return std::task::Poll::Ready(r);
            }
            self.arrived.register(cx.waker());
            // One that arrived between the look and the registration is seen now.
            self.try_recv()
                .map_or(std::task::Poll::Pending, std::task::Poll::Ready)
        })
        .await
    }

    pub(crate) fn try_recv(&self) -> Option<Response<()>> {
        self.items.lock().expect("not poisoned").pop_front()
    }

    fn push(&self, resp: Response<()>) {
        self.items.lock().expect("not poisoned").push_back(resp);
        self.arrived.wake();
    }
}

/// An `Interim` feeding a new `Queue` (one allocation, shared by both).
pub(crate) fn channel() -> (Interim, Arc<Queue>) {
    let queue = Arc::new(Queue::default());
    (Interim(Sink::Queue(queue.clone())), queue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn the_sender_is_woken_by_an_arrival_and_finds_an_earlier_one_at_once() {
        let hint = || Response::builder().status(103).body(()).expect("head");
        let (interim, queue) = channel();
        let q = queue.clone();
        let waiting = tokio::spawn(async move { q.recv().await.status() });
        // The sender waits (the test's runtime runs it here), then one arrives.
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        interim.forward(hint());
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), waiting);
        assert_eq!(woken.await.expect("not woken").unwrap(), 103);
        interim.forward(hint());
        let now = tokio::time::timeout(std::time::Duration::from_secs(5), queue.recv());
        assert_eq!(now.await.expect("not found").status(), 103);
    }

    #[test]
    fn only_forwardable_interim_responses_pass_cleaned_and_bounded() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let interim = Interim::new(move |r| g.lock().unwrap().push(r));
        for status in [100, 101, 200, 404] {
            interim.forward(Response::builder().status(status).body(()).expect("status"));
        }
        assert!(got.lock().unwrap().is_empty());
        let hint = || {
            Response::builder()
                .status(103)
                .header("link", "</a.css>; rel=preload")
                .header("quicar-error", "denied")
                .header("connection", "x-secret")
                .header("x-secret", "1")
                .body(())
                .expect("head")
        };
        interim.forward(hint());
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), 1);
            let h = got[0].headers();
            assert_eq!(h.len(), 1, "{h:?}");
            assert!(h.contains_key("link"));
        }
        for _ in 0..100 {
            interim.forward(hint());
        }
        assert_eq!(got.lock().unwrap().len(), MAX_PER_REQUEST as usize);
    }
}
