//! The outbound response cache: a shared HTTP cache (RFC 9111) per service, bounded by bytes
//! (moka with a weigher). Freshness, Vary matching, revalidation headers and the rules for
//! `Authorization`, `private`, `no-store` and `s-maxage` come from `http-cache-semantics`;
//! `stale-while-revalidate` and `stale-if-error` (RFC 5861), which that crate does not know,
//! are read here. The request path that uses it is in `outbound`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};
use tokio::sync::watch;

use crate::body::{BodyError, ProxyBody};

pub(crate) mod http_date;
pub(crate) mod normalize;

/// Wall-clock time for freshness, with an offset tests can advance instead of sleeping.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicU64,
}

impl Clock {
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves this clock forward (tests: "let 61 seconds pass").
    pub fn advance(&self, by: Duration) {
        self.offset_ms
            .fetch_add(by.as_millis() as u64, Ordering::Relaxed);
    }
}

/// One stored response for one set of varied request headers.
pub struct Variant {
    policy: CachePolicy,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    fresh_until: SystemTime,
    swr: Duration,
    sie: Duration,
}

impl Variant {
    /// A served copy speaks with the stored status (the freshness crate may have judged it as
    /// a 200) and the origin's `Date`, never the crate's rewrite.
    fn restore(&self, parts: &mut http::response::Parts) {
        parts.status = self.status;
        // The stored fields are ours (a 304 may have updated some the crate keeps frozen).
        for name in self.headers.keys() {
            if name == http::header::AGE {
                continue;
            }
            parts.headers.remove(name);
            for v in self.headers.get_all(name) {
                parts.headers.append(name.clone(), v.clone());
            }
        }
        self.restore_date(parts, None);
    }

    fn restore_date(&self, parts: &mut http::response::Parts, newer: Option<&HeaderValue>) {
        match newer.or_else(|| self.headers.get(http::header::DATE)) {
            Some(d) => {
                parts.headers.insert(http::header::DATE, d.clone());
            }
            None => {
                parts.headers.remove(http::header::DATE);
            }
        }
    }

    /// The stored `ETag` and `Last-Modified`, for answering conditional requests.
    pub fn validators(&self) -> (Option<&HeaderValue>, Option<&HeaderValue>) {
        (
            self.headers.get(http::header::ETAG),
            self.headers.get(http::header::LAST_MODIFIED),
        )
    }
}

/// All variants stored for one URI. Replaced whole on change (values in moka are immutable).
#[derive(Clone, Default)]
struct Entry {
    variants: Vec<Arc<Variant>>,
}

/// What the cache can do for a request.
pub enum Lookup {
    /// Serve this: headers (with `age`) and body, no upstream contact.
    Fresh(http::response::Parts, Bytes),
    /// A stored response exists but needs the origin: send `revalidate` (which carries
    /// `If-None-Match`/`If-Modified-Since` where the entry has validators).
    Stale {
        variant: Arc<Variant>,
        revalidate: http::request::Parts,
        /// Inside its `stale-while-revalidate` window: may be served while one refresh runs.
        serve_while_revalidating: bool,
    },
    Miss,
}

/// Counters for telemetry and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub revalidated: AtomicU64,
    pub stale: AtomicU64,
    pub upstream_fetches: AtomicU64,
}

/// A per-service cache.
pub struct Cache {
    store: moka::sync::Cache<String, Entry>,
    max_entry_bytes: usize,
    /// Targeted cache-control fields (RFC 9213), in precedence order.
    targeted: Vec<http::HeaderName>,
    /// How long past freshness a stored response may answer when the peer is unreachable.
    stale_on_connect_failure: Duration,
    clock: Arc<Clock>,
    flights: Arc<Mutex<HashMap<String, watch::Receiver<Landing>>>>,
    refreshing: Mutex<std::collections::HashSet<String>>,
    pub stats: Stats,
}

/// Variants kept per URI; more distinct Vary values than this evict the oldest.
const MAX_VARIANTS: usize = 8;

impl Cache {
    pub fn new(max_bytes: u64, max_entry_bytes: usize, clock: Arc<Clock>) -> Self {
        let store = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, entry: &Entry| {
                let bytes: usize = key.len()
                    + entry
                        .variants
                        .iter()
                        .map(|v| v.body.len() + 512)
                        .sum::<usize>();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .build();
        Self {
            store,
            max_entry_bytes,
            targeted: vec![http::HeaderName::from_static(TARGETED)],
            stale_on_connect_failure: Duration::ZERO,
            clock,
            flights: Arc::new(Mutex::new(HashMap::new())),
            refreshing: Mutex::new(Default::default()),
            stats: Stats::default(),
        }
    }

    /// Targeted cache-control fields this cache obeys, in precedence order (RFC 9213).
    pub fn with_targeted(mut self, fields: Vec<http::HeaderName>) -> Self {
        self.targeted = fields;
        self
    }

    /// Serve a stored response up to `window` past its freshness when the peer cannot be
    /// reached (a connection failure, not an app status).
    pub fn with_stale_on_connect_failure(mut self, window: Duration) -> Self {
        self.stale_on_connect_failure = window;
        self
    }

    /// May `variant` answer because the peer is unreachable now?
    pub fn usable_when_unreachable(&self, variant: &Variant) -> bool {
        let stale_for = self
            .clock
            .now()
            .duration_since(variant.fresh_until)
            .unwrap_or_default();
        stale_for < self.stale_on_connect_failure
    }

    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// Bytes held now (after pending evictions run).
    pub fn weighted_size(&self) -> u64 {
        self.store.run_pending_tasks();
        self.store.weighted_size()
    }

    /// The cache key: service and path with query. The scheme and port are the same for every
    /// request of a service, and HEAD shares GET's entry.
    pub fn key(service: &str, path_and_query: &str) -> String {
        format!("{service}\u{0}{path_and_query}")
    }

    /// Whether a request can be answered from or stored in the cache at all.
    pub fn applies(req: &http::request::Parts, has_body: bool) -> bool {
        (req.method == Method::GET || req.method == Method::HEAD) && !has_body
    }

    pub fn lookup(&self, key: &str, req: &http::request::Parts) -> Lookup {
        let Some(entry) = self.store.get(key) else {
            return Lookup::Miss;
        };
        let req = &*normalize::request(req);
        let now = self.clock.now();
        for v in &entry.variants {
            match v.policy.before_request(req, now) {
                BeforeRequest::Fresh(mut parts) => {
                    v.restore(&mut parts);
                    return Lookup::Fresh(parts, v.body.clone());
                }
                BeforeRequest::Stale {
                    request,
                    matches: true,
                } => {
                    let stale_for = now.duration_since(v.fresh_until).unwrap_or_default();
                    return Lookup::Stale {
                        variant: v.clone(),
                        revalidate: request,
                        serve_while_revalidating: stale_for < v.swr,
                    };
                }
                BeforeRequest::Stale { .. } => {}
            }
        }
        Lookup::Miss
    }

    /// The stored response as served stale: its headers with a fresh `age`.
    pub fn stale_response(&self, variant: &Variant) -> (http::response::Parts, Bytes) {
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = variant.status;
        parts.headers = variant.headers.clone();
        let age = variant.policy.age(self.clock.now()).as_secs();
        parts
            .headers
            .insert(http::header::AGE, HeaderValue::from(age));
        (parts, variant.body.clone())
    }

    /// May `variant` be served because the origin failed now (`stale-if-error`)?
    pub fn usable_on_error(&self, variant: &Variant) -> bool {
        let stale_for = self
            .clock
            .now()
            .duration_since(variant.fresh_until)
            .unwrap_or_default();
        stale_for < variant.sie
    }

    /// A policy for a response if it may be stored; `None` otherwise.
    pub fn storable(
        &self,
        req: &http::request::Parts,
        resp: &http::response::Parts,
    ) -> Option<CachePolicy> {
        if req.method != Method::GET || resp.extensions.get::<crate::error::ErrorKind>().is_some() {
            return None;
        }
        let (req, resp) = (
            normalize::request(req),
            normalize::response(resp, &self.targeted),
        );
        let now = self.clock.now();
        let policy = CachePolicy::new_options(&*req, &resp, now, CacheOptions::default());
        if !policy.is_storable() {
            return None;
        }
        // Stale at once and nothing to revalidate it with: every later request would go to the
        // origin anyway, so storing it would only cost (an uncacheable API response, typically).
        // It is kept when a stale copy may still answer (stale-if-error, outages).
        let cc = cache_control(resp.headers.get_all(http::header::CACHE_CONTROL));
        let useful = !policy.time_to_live(now).is_zero()
            || resp.headers.contains_key(http::header::ETAG)
            || resp.headers.contains_key(http::header::LAST_MODIFIED)
            || cc.contains_key("stale-if-error")
            || cc.contains_key("stale-while-revalidate")
            || !self.stale_on_connect_failure.is_zero();
        useful.then_some(policy)
    }

    /// Whether a body of this declared size is worth buffering.
    pub fn fits(&self, content_length: Option<u64>) -> bool {
        content_length.is_none_or(|n| n <= self.max_entry_bytes as u64)
    }

    pub fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
    }

    /// Stores a complete response (replacing the variant the request matches, if any).
    pub fn insert(
        &self,
        key: &str,
        req: &http::request::Parts,
        resp: &http::response::Parts,
        policy: CachePolicy,
        body: Bytes,
    ) {
        let now = self.clock.now();
        let status = resp.status;
        let req = &*normalize::request(req);
        let resp = &normalize::response(resp, &self.targeted);
        let res_cc = cache_control(resp.headers.get_all(http::header::CACHE_CONTROL));
        let revalidate_only = res_cc.contains_key("must-revalidate")
            || res_cc.contains_key("proxy-revalidate")
            || res_cc.contains_key("s-maxage")
            || res_cc.contains_key("no-cache");
        let window = |name: &str| {
            if revalidate_only {
                return Duration::ZERO;
            }
            res_cc
                .get(name)
                .and_then(|v| v.as_deref())
                .and_then(|v| v.parse().ok())
                .map_or(Duration::ZERO, Duration::from_secs)
        };
        let variant = Arc::new(Variant {
            fresh_until: now + policy.time_to_live(now),
            swr: window("stale-while-revalidate"),
            sie: window("stale-if-error"),
            policy,
            status,
            headers: stored_headers(&resp.headers),
            body,
        });
        let mut entry = self.store.get(key).unwrap_or_default();
        entry.variants.retain(|v| {
            !matches!(
                v.policy.before_request(req, now),
                BeforeRequest::Fresh(_) | BeforeRequest::Stale { matches: true, .. }
            )
        });
        entry.variants.insert(0, variant);
        entry.variants.truncate(MAX_VARIANTS);
        self.store.insert(key.to_string(), entry);
    }

    /// A 304 for a stale variant: updates the entry and returns the headers to serve and the
    /// stored body; `None` when the 304 cannot be matched to what we hold.
    pub fn revalidated(
        &self,
        key: &str,
        variant: &Variant,
        req: &http::request::Parts,
        resp: &http::response::Parts,
    ) -> Option<(http::response::Parts, Bytes)> {
        let req = &*normalize::request(req);
        let mut resp = normalize::response(resp, &self.targeted);
        if !is_conditional(req) {
            // The conditional request carried only our stored validators, so the 304 speaks of
            // our stored response. RFC 9110 does not oblige a 304 to repeat Last-Modified
            // (Python's http.server omits it), and the freshness crate then refuses to select
            // the stored response; give it back the validators it asked with.
            for name in [http::header::ETAG, http::header::LAST_MODIFIED] {
                if !resp.headers.contains_key(&name) {
                    if let Some(v) = variant.headers.get(&name) {
                        resp.headers.insert(name, v.clone());
                    }
                }
            }
        }
        match variant.policy.after_response(req, &resp, self.clock.now()) {
            AfterResponse::NotModified(policy, mut parts) => {
                // RFC 9111 §3.2: the 304's fields replace the stored ones (Content-Encoding
                // included, which the crate keeps), except Content-Length.
                for (name, value) in &resp.headers {
                    if name != http::header::CONTENT_LENGTH && name != http::header::DATE {
                        parts.headers.insert(name.clone(), value.clone());
                    }
                }
                let mut stored = parts.clone();
                stored.status = variant.status;
                self.insert(key, req, &stored, policy, variant.body.clone());
                parts.status = variant.status;
                variant.restore_date(&mut parts, resp.headers.get(http::header::DATE));
                Some((parts, variant.body.clone()))
            }
            AfterResponse::Modified(..) => None,
        }
    }

    /// A HEAD response for a URI whose GET response is stored: when it carries the same
    /// validators (so it describes the same representation), its fields update the stored
    /// ones (RFC 9111 §4.3.5).
    pub fn update_from_head(
        &self,
        key: &str,
        req: &http::request::Parts,
        resp: &http::response::Parts,
    ) {
        let Some(mut entry) = self.store.get(key) else {
            return;
        };
        let mut as_get = normalize::request(req).into_owned();
        as_get.method = Method::GET;
        let resp = normalize::response(resp, &self.targeted);
        let now = self.clock.now();
        let same = |v: &Variant| {
            let (etag, lm) = v.validators();
            let theirs = (
                resp.headers.get(http::header::ETAG),
                resp.headers.get(http::header::LAST_MODIFIED),
            );
            (etag.is_some() || lm.is_some()) && (etag, lm) == theirs
        };
        let mut changed = false;
        for v in &mut entry.variants {
            let matches = matches!(
                v.policy.before_request(&as_get, now),
                BeforeRequest::Fresh(_) | BeforeRequest::Stale { matches: true, .. }
            );
            if !matches || !same(v) {
                continue;
            }
            let mut headers = v.headers.clone();
            for (name, value) in &resp.headers {
                if name != http::header::CONTENT_LENGTH && name != http::header::DATE {
                    headers.insert(name.clone(), value.clone());
                }
            }
            *v = Arc::new(Variant {
                policy: v.policy.clone(),
                status: v.status,
                headers: stored_headers(&headers),
                body: v.body.clone(),
                fresh_until: v.fresh_until,
                swr: v.swr,
                sie: v.sie,
            });
            changed = true;
        }
        if changed {
            self.store.insert(key.to_string(), entry);
        }
    }

    /// An unsafe method succeeded on this URI: what we stored is no longer trustworthy.
    pub fn invalidate(&self, key: &str) {
        self.store.invalidate(key);
    }

    /// Request collapsing: the first caller for a key leads (fetches upstream); later ones get
    /// a receiver that resolves when the leader is done (stored, or gave up) or went away.
    pub fn join(&self, key: &str) -> Flight {
        let mut flights = self.flights.lock().expect("not poisoned");
        if let Some(rx) = flights.get(key) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(Landing::Abandoned);
        flights.insert(key.to_string(), rx);
        Flight::Leader(FlightGuard {
            tx,
            key: key.to_string(),
            flights: self.flights.clone(),
            landed: None,
        })
    }

    /// Ends a leader's flight with an answer (stored, not storable, or failed): followers wake
    /// and look again, and fetch for themselves what was not stored.
    pub fn land(&self, guard: FlightGuard) {
        self.land_as(guard, Landing::Landed);
    }

    /// Ends a leader's flight as `how`.
    pub fn land_as(&self, mut guard: FlightGuard, how: Landing) {
        guard.landed = Some(how);
        drop(guard);
    }

    /// Claims the one background refresh for a key; `false` if one is already running.
    pub fn start_refresh(&self, key: &str) -> bool {
        self.refreshing
            .lock()
            .expect("not poisoned")
            .insert(key.to_string())
    }

    pub fn end_refresh(&self, key: &str) {
        self.refreshing.lock().expect("not poisoned").remove(key);
    }
}

/// How a leader's flight ended, as its followers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// With an answer: stored (followers find it), or not storable or failed (each fetches
    /// for itself).
    Landed,
    /// The origin failed (`unreachable`: the peer could not be reached at all) and the leader
    /// answered from the stale copy: followers may too, within their own entry's allowance,
    /// rather than each asking the failing origin again.
    Failed { unreachable: bool },
    /// Without one: the leader's caller went away (its fetch or its body was dropped), or its
    /// fetch ran out of a time it had partly spent waiting itself. One follower takes the lead
    /// rather than all of them fetching.
    Abandoned,
    /// Not yet landed: the leader has its response and stores it as its body streams. A
    /// follower whose time ends before the body does fetches for itself (with a timeout of its
    /// own, as the origin answers) rather than answer `timeout`.
    Responded,
    /// The leader's fetch had the service's whole timeout and ran out of it: followers, whose
    /// own time ends at most a little later, answer so too rather than each asking an origin
    /// that just took that long again.
    TimedOut,
}

/// A leader's claim on a key; dropping it (even by panic or cancel) releases followers, as
/// abandoned unless it was `Cache::land`ed.
pub struct FlightGuard {
    tx: watch::Sender<Landing>,
    key: String,
    flights: Arc<Mutex<HashMap<String, watch::Receiver<Landing>>>>,
    landed: Option<Landing>,
}

impl FlightGuard {
    /// The leader's response has begun (see `Landing::Responded`).
    pub fn responded(&self) {
        self.tx.send_replace(Landing::Responded);
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.flights.lock().expect("not poisoned");
        if flights
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()))
        {
            flights.remove(&self.key);
        }
        self.tx
            .send_replace(self.landed.unwrap_or(Landing::Abandoned));
        // The sender drops after this: followers' `changed()` ends.
    }
}

pub enum Flight {
    Leader(FlightGuard),
    Follower(watch::Receiver<Landing>),
}

impl Flight {
    /// Waits until the leader is done, and says how.
    pub async fn wait(rx: &mut watch::Receiver<Landing>) -> Landing {
        while rx.changed().await.is_ok() {}
        *rx.borrow()
    }
}

/// Cache-Control directives as name → optional value.
pub fn cache_control<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> HashMap<String, Option<String>> {
    normalize::directives(values).into_iter().collect()
}

/// What a [`TeeBody`] kept when it ended.
#[derive(Debug)]
pub enum Kept {
    /// The whole body, which fit.
    Whole(Bytes),
    /// Nothing: the body was too large to keep, or it failed.
    Nothing,
    /// Nothing: the body was dropped before its end (the client went away).
    Dropped,
}

/// A response body passed through to the client while a copy is kept, up to a limit; when the
/// body ends cleanly and fit, `done` gets the copy. A body that errors is never stored.
pub struct TeeBody {
    inner: ProxyBody,
    buf: Option<BytesMut>,
    limit: usize,
    /// The declared length: HTTP/1.1 stops reading a sized body at its last byte, so reaching
    /// it counts as the end.
    expected: Option<u64>,
    done: Option<Box<dyn FnOnce(Kept) + Send>>,
}

impl TeeBody {
    pub fn new(inner: ProxyBody, limit: usize, done: impl FnOnce(Kept) + Send + 'static) -> Self {
        let expected = inner.size_hint().exact();
        Self {
            inner,
            buf: Some(BytesMut::new()),
            limit,
            expected,
            done: Some(Box::new(done)),
        }
    }

    fn finish(&mut self, ok: bool) {
        self.end(if ok { None } else { Some(Kept::Nothing) });
    }

    /// Hands `done` the copy, or `instead` of it.
    fn end(&mut self, instead: Option<Kept>) {
        if let Some(done) = self.done.take() {
            done(match (instead, self.buf.take()) {
                (Some(k), _) => k,
                (None, Some(b)) => Kept::Whole(b.freeze()),
                (None, None) => Kept::Nothing,
            });
        }
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        // Dropped after the declared length arrived: complete. Before: the client went away,
        // nothing is stored and followers are released (one of them to fetch again).
        let complete = self
            .buf
            .as_ref()
            .is_some_and(|b| self.expected == Some(b.len() as u64));
        self.end((!complete).then_some(Kept::Dropped));
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(buf), Some(data)) = (this.buf.as_mut(), frame.data_ref()) {
                    if buf.len() + data.len() > this.limit {
                        // Too large to keep: pass the rest through, release followers now.
                        this.buf = None;
                        this.finish(false);
                    } else {
                        buf.extend_from_slice(data);
                        if this.expected == Some(buf.len() as u64) {
                            this.finish(true);
                        }
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The targeted cache-control field only quicar sidecars obey (RFC 9213); it never reaches
/// the calling app.
pub const TARGETED: &str = crate::headers::CACHE_CONTROL_TARGETED;

/// Headers as stored: without the targeted field meant for this cache alone.
fn stored_headers(h: &HeaderMap) -> HeaderMap {
    let mut h = h.clone();
    h.remove(TARGETED);
    h
}

/// Whether the client's own request is conditional (then a 304 is an answer it can use).
pub fn is_conditional(req: &http::request::Parts) -> bool {
    req.headers.contains_key(http::header::IF_NONE_MATCH)
        || req.headers.contains_key(http::header::IF_MODIFIED_SINCE)
}

/// Statuses that count as the origin failing, for `stale-if-error`.
pub fn is_error_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 500 | 502 | 503 | 504)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::get(format!("https://svc{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn resp(headers: &[(&str, &str)]) -> http::response::Parts {
        let mut b = http::Response::builder().status(200);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn cache() -> Cache {
        Cache::new(1 << 20, 1 << 16, Arc::new(Clock::default()))
    }

    #[test]
    fn freshness_follows_max_age_and_expires() {
        let c = cache();
        let r = req("/a", &[]);
        let rs = resp(&[("cache-control", "max-age=60")]);
        let p = c.storable(&r, &rs).unwrap();
        c.insert("k", &r, &rs, p, Bytes::from_static(b"x"));
        assert!(matches!(c.lookup("k", &r), Lookup::Fresh(..)));
        c.clock().advance(Duration::from_secs(61));
        assert!(matches!(
            c.lookup("k", &r),
            Lookup::Stale {
                serve_while_revalidating: false,
                ..
            }
        ));
    }

    #[test]
    fn shared_cache_rules() {
        let c = cache();
        let r = req("/a", &[]);
        assert!(c
            .storable(&r, &resp(&[("cache-control", "no-store")]))
            .is_none());
        assert!(c
            .storable(&r, &resp(&[("cache-control", "private, max-age=60")]))
            .is_none());
        let auth = req("/a", &[("authorization", "Bearer x")]);
        assert!(c
            .storable(&auth, &resp(&[("cache-control", "max-age=60")]))
            .is_none());
        assert!(c
            .storable(&auth, &resp(&[("cache-control", "public, max-age=60")]))
            .is_some());
        assert!(c
            .storable(&auth, &resp(&[("cache-control", "s-maxage=60")]))
            .is_some());
        // A sidecar-made error carries its kind as an extension (headers come at the edge).
        let mut sidecar_error = resp(&[("cache-control", "max-age=60")]);
        sidecar_error
            .extensions
            .insert(crate::error::ErrorKind::Timeout);
        assert!(c.storable(&r, &sidecar_error).is_none());
    }

    #[test]
    fn stale_windows_and_must_revalidate() {
        let c = cache();
        let r = req("/a", &[]);
        let rs = resp(&[(
            "cache-control",
            "max-age=1, stale-while-revalidate=30, stale-if-error=60",
        )]);
        let p = c.storable(&r, &rs).unwrap();
        c.insert("k", &r, &rs, p, Bytes::new());
        c.clock().advance(Duration::from_secs(10));
        let Lookup::Stale {
            variant,
            serve_while_revalidating,
            ..
        } = c.lookup("k", &r)
        else {
            panic!()
        };
        assert!(serve_while_revalidating);
        assert!(c.usable_on_error(&variant));
        c.clock().advance(Duration::from_secs(40));
        let Lookup::Stale {
            variant,
            serve_while_revalidating,
            ..
        } = c.lookup("k", &r)
        else {
            panic!()
        };
        assert!(!serve_while_revalidating);
        assert!(c.usable_on_error(&variant));

        let rs = resp(&[(
            "cache-control",
            "max-age=1, must-revalidate, stale-if-error=60",
        )]);
        let p = c.storable(&r, &rs).unwrap();
        c.insert("m", &r, &rs, p, Bytes::new());
        c.clock().advance(Duration::from_secs(5));
        let Lookup::Stale { variant, .. } = c.lookup("m", &r) else {
            panic!()
        };
        assert!(
            !c.usable_on_error(&variant),
            "must-revalidate forbids serving stale"
        );
    }

    #[test]
    fn a_304_without_validators_refreshes_an_entry_we_revalidated() {
        let c = cache();
        let r = req("/a", &[]);
        let lm = "Sat, 21 Nov 2026 10:00:00 GMT";
        let rs = resp(&[("last-modified", lm), ("cache-control", "max-age=1")]);
        c.insert(
            "k",
            &r,
            &rs,
            c.storable(&r, &rs).unwrap(),
            Bytes::from_static(b"body"),
        );
        c.clock().advance(Duration::from_secs(5));
        let Lookup::Stale {
            variant,
            revalidate,
            ..
        } = c.lookup("k", &r)
        else {
            panic!()
        };
        assert_eq!(revalidate.headers.get("if-modified-since").unwrap(), lm);
        let mut not_modified = resp(&[("cache-control", "max-age=60")]);
        not_modified.status = StatusCode::NOT_MODIFIED;
        let (parts, body) = c.revalidated("k", &variant, &r, &not_modified).unwrap();
        assert_eq!((parts.status, &body[..]), (StatusCode::OK, &b"body"[..]));
        assert!(matches!(c.lookup("k", &r), Lookup::Fresh(..)));
    }

    #[test]
    fn vary_separates_variants() {
        let c = cache();
        let en = req("/a", &[("accept-language", "en")]);
        let fr = req("/a", &[("accept-language", "fr")]);
        let rs = resp(&[("cache-control", "max-age=60"), ("vary", "accept-language")]);
        c.insert(
            "k",
            &en,
            &rs,
            c.storable(&en, &rs).unwrap(),
            Bytes::from_static(b"en"),
        );
        assert!(matches!(c.lookup("k", &fr), Lookup::Miss));
        c.insert(
            "k",
            &fr,
            &rs,
            c.storable(&fr, &rs).unwrap(),
            Bytes::from_static(b"fr"),
        );
        let Lookup::Fresh(_, body) = c.lookup("k", &en) else {
            panic!()
        };
        assert_eq!(&body[..], b"en");
        let Lookup::Fresh(_, body) = c.lookup("k", &fr) else {
            panic!()
        };
        assert_eq!(&body[..], b"fr");
    }
}
