//! The cache step of the outbound path: serve fresh hits, revalidate stale entries (or serve
//! them during `stale-while-revalidate` / on error within `stale-if-error`), collapse
//! concurrent misses into one upstream request, and store responses while they stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::header::{CACHE_CONTROL, RANGE};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::watch;

use crate::body::{content_length, full, ProxyBody};
use crate::cache::http_date;
use crate::cache::{
    is_conditional, is_error_status, Cache, Flight, FlightGuard, Kept, Landing, Lookup, TeeBody,
    Variant,
};
use crate::error::{ErrorKind, ProxyError, Side};
use crate::facts::CacheOutcome;

/// How the cache step reaches the service: one request (with the service's retries and
/// deadline) for a bodyless head. Owned, so a background refresh can outlive the request.
pub(crate) type Fetch = Arc<
    dyn Fn(http::request::Parts) -> BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>
        + Send
        + Sync,
>;

/// When a request's time in the cache step ends: its service's timeout from when it came. A
/// request that waited for another's fetch carries it in the head's extensions to its own
/// fetch, which gets only what is left (it used to get the whole timeout again, so a caller
/// behind a leader that timed out waited twice the timeout).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline(tokio::time::Instant);

impl Deadline {
    pub(crate) fn left(self) -> Duration {
        self.0
            .saturating_duration_since(tokio::time::Instant::now())
    }
}

/// The head to fetch with: after a wait for another's fetch, with what is left of the time,
/// or a timeout when none is (a fetch with none would still start, and reach the origin).
fn timed(
    mut head: http::request::Parts,
    deadline: Deadline,
    waited: bool,
    wait: Duration,
) -> Result<http::request::Parts, ProxyError> {
    if waited {
        if deadline.left().is_zero() {
            return Err(out_of_time(wait));
        }
        head.extensions.insert(deadline);
    }
    Ok(head)
}

/// A request whose time ran out while it waited for another's fetch, or whose leader's fetch
/// ran out of the same time.
fn out_of_time(wait: Duration) -> ProxyError {
    ProxyError::new(
        ErrorKind::Timeout,
        Side::Peer,
        format!(
            "no response within {} (the service's timeout): this request waited for another's fetch of the same response, which had none",
            humantime::format_duration(wait)
        ),
    )
}

/// A GET (or HEAD) without a body, for a service with a cache. `wait` is the service's
/// timeout: a collapsed request waits for the leader and then fetches for itself (when it
/// must) within it, all told.
pub(crate) async fn serve(
    cache: &Arc<Cache>,
    key: String,
    wait: Duration,
    req: http::request::Parts,
    fetch: Fetch,
) -> Result<Response<ProxyBody>, ProxyError> {
    let directives = crate::cache::normalize::directives(req.headers.get_all(CACHE_CONTROL));
    let asks = |d: &str| directives.iter().any(|(k, _)| k == d);
    // RFC 9111 §5.2.1.5: a request's no-store keeps this exchange out of the cache entirely.
    if asks("no-store") {
        return fetch(req).await;
    }
    // §5.2.1.7: only-if-cached is answered from what is stored, or 504.
    let only_if_cached = asks("only-if-cached");
    if let Some(range) = req.headers.get(RANGE).cloned() {
        // A single byte range is cut from a fresh stored 200; anything else goes upstream
        // untouched (and is not stored).
        let mut whole = req.clone();
        whole.headers.remove(RANGE);
        if let Lookup::Fresh(parts, body) = cache.lookup(&key, &whole) {
            if parts.status == StatusCode::OK {
                cache.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(ranged(parts, body, &range, &req));
            }
        }
        if only_if_cached {
            return Err(not_cached());
        }
        return fetch(req).await;
    }
    let mut deadline = Deadline(tokio::time::Instant::now() + wait);
    let mut followed = false;
    // Leaders whose callers went away, after which this request looked again (and may lead).
    let mut abandoned = 0;
    // The leader followed found the origin failing and answered from the stale copy.
    let mut failed = None;
    loop {
        match cache.lookup(&key, &req) {
            Lookup::Fresh(parts, body) => {
                cache.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(answer(parts, body, &req, CacheOutcome::Hit));
            }
            Lookup::Stale { .. } | Lookup::Miss if only_if_cached => return Err(not_cached()),
            Lookup::Stale {
                variant,
                revalidate,
                serve_while_revalidating,
            } => {
                if serve_while_revalidating {
                    if cache.start_refresh(&key) {
                        tokio::spawn(refresh(
                            fetch.clone(),
                            cache.clone(),
                            key.clone(),
                            req.clone(),
                            variant.clone(),
                            revalidate,
                        ));
                    }
                    return Ok(stale(cache, &variant));
                }
                if let Some(unreachable) = failed {
                    if cache.usable_on_error(&variant)
                        || (unreachable && cache.usable_when_unreachable(&variant))
                    {
                        return Ok(stale(cache, &variant));
                    }
                }
                // Collapsed as misses are: an entry that expires under load is revalidated
                // once, not once per request waiting for it.
                let guard = if followed {
                    None
                } else {
                    match cache.join(&key) {
                        Flight::Leader(guard) => Some(guard),
                        Flight::Follower(rx) => {
                            (followed, failed) =
                                follow(rx, &mut deadline, wait, &mut abandoned).await?;
                            continue;
                        }
                    }
                };
                let waited = followed || abandoned > 0;
                let (req, revalidate) = (
                    timed(req, deadline, waited, wait)?,
                    timed(revalidate, deadline, waited, wait)?,
                );
                return revalidate_now(&fetch, cache, key, req, &variant, revalidate, guard).await;
            }
            Lookup::Miss if !followed => match cache.join(&key) {
                Flight::Leader(guard) => {
                    let req = timed(req, deadline, abandoned > 0, wait)?;
                    return miss(&fetch, cache, key, req, Some(guard)).await;
                }
                Flight::Follower(rx) => {
                    (followed, failed) = follow(rx, &mut deadline, wait, &mut abandoned).await?;
                }
            },
            // The leader's response was not storable (or it failed): fetch for ourselves.
            Lookup::Miss => {
                let req = timed(req, deadline, true, wait)?;
                return miss(&fetch, cache, key, req, None).await;
            }
        }
    }
}

/// The stored response, past its freshness, as the answer (counted as stale).
fn stale(cache: &Cache, variant: &Variant) -> Response<ProxyBody> {
    cache.stats.stale.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = cache.stale_response(variant);
    cached(parts, body, CacheOutcome::Stale)
}

/// How many abandoned leaders a collapsed request follows before it fetches for itself.
const MAX_ABANDONED: u32 = 8;

/// Another request is fetching (or revalidating) this key: waits for it (until `deadline`;
/// when the leader's response began by then but its body has not ended, this request fetches
/// for itself with a new `deadline`, as before the deadline was kept).
/// Whether to look again as one that followed (fetching for itself what was not stored), or,
/// after a leader whose caller went away, as one that may lead: the fetch goes to one
/// follower, the first to join again, not to all of them at once. And, when the leader found
/// the origin failing, whether it could not be reached at all. A timeout when the deadline
/// passes meanwhile, or when the leader's fetch ran out of the whole time.
async fn follow(
    mut rx: watch::Receiver<Landing>,
    deadline: &mut Deadline,
    wait: Duration,
    abandoned: &mut u32,
) -> Result<(bool, Option<bool>), ProxyError> {
    let landing = match tokio::time::timeout_at(deadline.0, Flight::wait(&mut rx)).await {
        Ok(landing) => landing,
        // The leader's response began in time, but its body is still on the way: the origin
        // answers, so ask it again for this request, with a whole timeout of its own.
        Err(_) if *rx.borrow() == Landing::Responded => {
            *deadline = Deadline(tokio::time::Instant::now() + wait);
            return Ok((true, None));
        }
        Err(_) => return Err(out_of_time(wait)),
    };
    match landing {
        Landing::Abandoned if *abandoned < MAX_ABANDONED => {
            *abandoned += 1;
            Ok((false, None))
        }
        Landing::Failed { unreachable } => Ok((true, Some(unreachable))),
        Landing::TimedOut => Err(out_of_time(wait)),
        Landing::Landed | Landing::Abandoned | Landing::Responded => Ok((true, None)),
    }
}

/// Ends a leader's flight with an answer, if this request leads one.
fn land(cache: &Cache, guard: Option<FlightGuard>) {
    if let Some(g) = guard {
        cache.land(g);
    }
}

/// Ends a leader's flight whose fetch failed with `e`. One that ran out of the service's whole
/// timeout tells its followers so; one that had only part of it (it waited first) hands the
/// fetch to one of them; otherwise each fetches for itself.
fn land_error(
    cache: &Cache,
    guard: Option<FlightGuard>,
    e: &ProxyError,
    req: &http::request::Parts,
) {
    let Some(g) = guard else { return };
    if e.kind != ErrorKind::Timeout {
        cache.land(g);
    } else if req.extensions.get::<Deadline>().is_none() {
        cache.land_as(g, Landing::TimedOut);
    }
    // Else dropped unlanded: abandoned.
}

/// Ends a leader's flight that found the origin failing and answered from the stale copy.
fn land_failed(cache: &Cache, guard: Option<FlightGuard>, unreachable: bool) {
    if let Some(g) = guard {
        cache.land_as(g, Landing::Failed { unreachable });
    }
}

async fn miss(
    fetch: &Fetch,
    cache: &Arc<Cache>,
    key: String,
    req: http::request::Parts,
    guard: Option<FlightGuard>,
) -> Result<Response<ProxyBody>, ProxyError> {
    cache.stats.misses.fetch_add(1, Ordering::Relaxed);
    cache.stats.upstream_fetches.fetch_add(1, Ordering::Relaxed);
    // On an error followers go upstream themselves; if this request is dropped while it
    // fetches (its caller went away), `guard` drops unlanded and one follower leads.
    let resp = match fetch(req.clone()).await {
        Ok(r) => r,
        Err(e) => {
            land_error(cache, guard, &e, &req);
            return Err(e);
        }
    };
    if req.method == http::Method::HEAD && resp.status() == StatusCode::OK {
        // RFC 9111 §4.3.5: a HEAD response describing the stored GET response updates it.
        let (parts, body) = resp.into_parts();
        cache.update_from_head(&key, &req, &parts);
        return Ok(store_while_streaming(
            cache,
            key,
            req,
            Response::from_parts(parts, body),
            guard,
            CacheOutcome::Miss,
        ));
    }
    Ok(store_while_streaming(
        cache,
        key,
        req,
        resp,
        guard,
        CacheOutcome::Miss,
    ))
}

async fn revalidate_now(
    fetch: &Fetch,
    cache: &Arc<Cache>,
    key: String,
    req: http::request::Parts,
    variant: &Variant,
    revalidate: http::request::Parts,
    guard: Option<FlightGuard>,
) -> Result<Response<ProxyBody>, ProxyError> {
    cache.stats.upstream_fetches.fetch_add(1, Ordering::Relaxed);
    match fetch(revalidate).await {
        Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
            let (parts, _) = resp.into_parts();
            match cache.revalidated(&key, variant, &req, &parts) {
                Some((parts, body)) => {
                    land(cache, guard);
                    cache.stats.revalidated.fetch_add(1, Ordering::Relaxed);
                    Ok(answer(parts, body, &req, CacheOutcome::Revalidated))
                }
                // A 304 for the client's own validators: it can use it.
                None if is_conditional(&req) => {
                    land(cache, guard);
                    Ok(Response::from_parts(parts, crate::body::empty()))
                }
                // A 304 we cannot match to what we hold: ask again without conditions.
                None => miss(fetch, cache, key, req, guard).await,
            }
        }
        Ok(resp) if is_error_status(resp.status()) && cache.usable_on_error(variant) => {
            land_failed(cache, guard, false);
            Ok(stale(cache, variant))
        }
        Ok(resp) => {
            cache.stats.misses.fetch_add(1, Ordering::Relaxed);
            Ok(store_while_streaming(
                cache,
                key,
                req,
                resp,
                guard,
                CacheOutcome::Miss,
            ))
        }
        Err(e) if cache.usable_on_error(variant) => {
            land_failed(cache, guard, unreachable(e.kind));
            tracing::debug!(error = %e.message, "origin failed; serving stale within stale-if-error");
            Ok(stale(cache, variant))
        }
        // The peer cannot be reached at all (not an app status): keep answering from the
        // cache for `serve_stale_on_connect_failure`.
        Err(e) if unreachable(e.kind) && cache.usable_when_unreachable(variant) => {
            land_failed(cache, guard, true);
            tracing::debug!(error = %e.message, "peer unreachable; serving stale");
            Ok(stale(cache, variant))
        }
        Err(e) => {
            land_error(cache, guard, &e, &req);
            Err(e)
        }
    }
}

/// The one background refresh of a `stale-while-revalidate` entry.
async fn refresh(
    fetch: Fetch,
    cache: Arc<Cache>,
    key: String,
    req: http::request::Parts,
    variant: Arc<Variant>,
    revalidate: http::request::Parts,
) {
    struct Done<'a>(&'a Cache, &'a str);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.end_refresh(self.1);
        }
    }
    let _done = Done(&cache, &key);
    cache.stats.upstream_fetches.fetch_add(1, Ordering::Relaxed);
    match fetch(revalidate).await {
        Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
            let (parts, _) = resp.into_parts();
            cache.revalidated(&key, &variant, &req, &parts);
        }
        Ok(resp) if !is_error_status(resp.status()) => {
            let resp =
                store_while_streaming(&cache, key.clone(), req, resp, None, CacheOutcome::Miss);
            // Nobody reads this response: drain it so the copy completes and is stored.
            let _ = resp.into_body().collect().await;
        }
        Ok(_) | Err(_) => {}
    }
}

/// Passes the response on, keeping a copy for the cache when it may be stored and fits.
fn store_while_streaming(
    cache: &Arc<Cache>,
    key: String,
    req: http::request::Parts,
    resp: Response<ProxyBody>,
    guard: Option<FlightGuard>,
    how: CacheOutcome,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let policy = cache
        .storable(&req, &parts)
        .filter(|_| cache.fits(content_length(&parts.headers)));
    let stored = parts.clone();
    parts.extensions.insert(how);
    let Some(policy) = policy else {
        if let Some(g) = guard {
            cache.land(g);
        }
        return Response::from_parts(parts, body);
    };
    if let Some(g) = &guard {
        g.responded();
    }
    let c = cache.clone();
    let tee = TeeBody::new(body, cache.max_entry_bytes(), move |kept| {
        // A body dropped before its end leaves the guard unlanded: abandoned.
        let dropped = matches!(kept, Kept::Dropped);
        if let Kept::Whole(bytes) = kept {
            c.insert(&key, &req, &stored, policy, bytes);
        }
        if let (Some(g), false) = (guard, dropped) {
            c.land(g);
        }
    });
    Response::from_parts(parts, tee.boxed_unsync())
}

fn cached(mut parts: http::response::Parts, body: Bytes, how: CacheOutcome) -> Response<ProxyBody> {
    parts.extensions.insert(how);
    Response::from_parts(parts, full(body))
}

/// Kinds that mean the peer could not be reached (no app status involved).
fn unreachable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::ConnectFailed | ErrorKind::CircuitOpen | ErrorKind::NoEndpoints
    )
}

fn not_cached() -> ProxyError {
    ProxyError::new(
        ErrorKind::Timeout,
        Side::Downstream,
        "only-if-cached, and nothing usable is stored (RFC 9111 §5.2.1.7)",
    )
}

/// A stored response for `req`: a 304 when the request's own validators match what is stored
/// (RFC 9110 §13.1: If-None-Match with weak comparison, else If-Modified-Since), the full
/// response otherwise.
fn answer(
    parts: http::response::Parts,
    body: Bytes,
    req: &http::request::Parts,
    how: CacheOutcome,
) -> Response<ProxyBody> {
    if parts.status == StatusCode::OK && not_modified(&parts.headers, &req.headers) {
        let mut head = http::Response::new(()).into_parts().0;
        head.status = StatusCode::NOT_MODIFIED;
        for name in [
            CACHE_CONTROL,
            http::header::CONTENT_LOCATION,
            http::header::DATE,
            http::header::ETAG,
            http::header::EXPIRES,
            http::header::VARY,
            http::header::AGE,
            http::header::LAST_MODIFIED,
        ] {
            for v in parts.headers.get_all(&name) {
                head.headers.append(name.clone(), v.clone());
            }
        }
        return cached(head, Bytes::new(), how);
    }
    cached(parts, body, how)
}

/// Whether the request's validators say it already has the stored representation.
fn not_modified(stored: &http::HeaderMap, req: &http::HeaderMap) -> bool {
    let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
    if let Some(inm) = req
        .get(http::header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        let Some(etag) = stored.get(http::header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        return inm.trim() == "*" || inm.split(',').any(|t| weak(t) == weak(etag));
    }
    let since = req
        .get(http::header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(http_date::parse);
    let modified = stored
        .get(http::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(http_date::parse);
    matches!((since, modified), (Some(s), Some(m)) if m <= s)
}

/// A single byte range of a stored complete response as a 206 (416 when it cannot be
/// satisfied). Several ranges, other units or an `If-Range` get the whole response (a server
/// may ignore Range).
fn ranged(
    mut parts: http::response::Parts,
    body: Bytes,
    range: &http::HeaderValue,
    req: &http::request::Parts,
) -> Response<ProxyBody> {
    let len = body.len() as u64;
    let spec = range
        .to_str()
        .ok()
        .and_then(|r| r.trim().strip_prefix("bytes="))
        .filter(|r| !r.contains(','));
    if spec.is_none() || req.headers.contains_key(http::header::IF_RANGE) {
        return cached(parts, body, CacheOutcome::Hit);
    }
    let spec = spec.unwrap_or_default().trim();
    let bounds = match spec.split_once('-') {
        Some(("", n)) => n
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(|n| (len.saturating_sub(n), len.saturating_sub(1))),
        Some((a, "")) => a.parse::<u64>().ok().map(|a| (a, len.saturating_sub(1))),
        Some((a, b)) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(a), Ok(b)) if a <= b => Some((a, b.min(len.saturating_sub(1)))),
            _ => None,
        },
        None => None,
    };
    let headers = &mut parts.headers;
    match bounds {
        Some((a, b)) if a < len && len > 0 => {
            parts.status = StatusCode::PARTIAL_CONTENT;
            headers.insert(
                http::header::CONTENT_RANGE,
                http::HeaderValue::try_from(format!("bytes {a}-{b}/{len}")).expect("digits"),
            );
            headers.insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(b - a + 1),
            );
            cached(
                parts,
                body.slice(a as usize..=b as usize),
                CacheOutcome::Hit,
            )
        }
        _ => {
            parts.status = StatusCode::RANGE_NOT_SATISFIABLE;
            headers.insert(
                http::header::CONTENT_RANGE,
                http::HeaderValue::try_from(format!("bytes */{len}")).expect("digits"),
            );
            headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(0));
            cached(parts, Bytes::new(), CacheOutcome::Hit)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A follower whose leader's response was not storable fetches for itself with what is
    /// left of its time (the service's timeout from when it came), not the whole timeout
    /// again; the leader fetches with the whole.
    #[tokio::test(start_paused = true)]
    async fn a_follower_fetches_with_what_is_left_of_its_time() {
        let (fetch, asked) = origin(Duration::from_secs(1), Duration::ZERO, "no-store");
        let wait = Duration::from_secs(10);
        assert_eq!(lead_and_follow(fetch, wait).await.unwrap(), "x");
        // It came 100 ms after the leader and fetched once the leader's 1 s fetch was done:
        // 900 ms of its time was spent (the clock is paused, so the figures are exact).
        let asked = asked.lock().unwrap();
        assert_eq!(asked.len(), 2);
        assert_eq!(asked[0], None);
        let left = asked[1].expect("the follower's fetch carries its deadline");
        assert_eq!(left, wait - Duration::from_millis(900));
    }

    /// The fetches a test's origin was asked for, each with the time it was given (`None`: the
    /// whole timeout).
    type Asked = Arc<Mutex<Vec<Option<Duration>>>>;

    /// What a scripted origin does with one fetch.
    #[derive(Clone, Copy)]
    enum Step {
        /// Answers: the head after the first duration, the body's end after the second.
        Answer(Duration, Duration),
        /// Fails with this kind after this long.
        Fail(ErrorKind, Duration),
        /// Never answers.
        Hang,
    }

    /// An origin whose first answer takes `head_after` to begin and `body_after` more to end;
    /// later ones are at once. Its `Cache-Control` is `cache_control`.
    fn origin(
        head_after: Duration,
        body_after: Duration,
        cache_control: &'static str,
    ) -> (Fetch, Asked) {
        scripted(vec![Step::Answer(head_after, body_after)], cache_control)
    }

    /// An origin that does `steps` with its fetches in turn, and answers at once after them.
    fn scripted(steps: Vec<Step>, cache_control: &'static str) -> (Fetch, Asked) {
        let asked: Asked = Arc::default();
        let a = asked.clone();
        let fetch: Fetch = Arc::new(move |head: http::request::Parts| {
            let step = {
                let mut a = a.lock().unwrap();
                a.push(head.extensions.get::<Deadline>().map(|d| d.left()));
                let now = Step::Answer(Duration::ZERO, Duration::ZERO);
                steps.get(a.len() - 1).copied().unwrap_or(now)
            };
            Box::pin(async move {
                let (head_after, body_after) = match step {
                    Step::Answer(head, body) => (head, body),
                    Step::Fail(kind, after) => {
                        tokio::time::sleep(after).await;
                        return Err(ProxyError::new(kind, Side::Peer, "scripted"));
                    }
                    Step::Hang => std::future::pending().await,
                };
                tokio::time::sleep(head_after).await;
                let body = futures_util::stream::once(async move {
                    tokio::time::sleep(body_after).await;
                    Ok::<_, crate::body::BodyError>(http_body::Frame::data(Bytes::from_static(
                        b"x",
                    )))
                });
                Ok(Response::builder()
                    .header(CACHE_CONTROL, cache_control)
                    .body(http_body_util::StreamBody::new(body).boxed_unsync())
                    .unwrap())
            })
        });
        (fetch, asked)
    }

    /// A leader and, 100 ms after it, a follower, both with `wait` as their timeout; the
    /// follower's answer (its body read whole).
    async fn lead_and_follow(fetch: Fetch, wait: Duration) -> Result<Bytes, ProxyError> {
        let cache = cache();
        let follower = ask(&cache, &fetch, wait, Duration::from_millis(100), None);
        tokio::join!(ask(&cache, &fetch, wait, Duration::ZERO, None), follower).1
    }

    /// A follower whose time (500 ms) ends while the leader's response has not begun (1 s)
    /// answers `timeout` then, and does not ask the origin itself.
    #[tokio::test(start_paused = true)]
    async fn a_follower_whose_time_ends_before_the_leaders_response_begins_times_out() {
        let (fetch, asked) = origin(Duration::from_secs(1), Duration::ZERO, "max-age=60");
        let got = lead_and_follow(fetch, Duration::from_millis(500)).await;
        assert_eq!(got.unwrap_err().kind, ErrorKind::Timeout);
        assert_eq!(asked.lock().unwrap().len(), 1);
    }

    /// A follower whose time (500 ms) ends while the leader's response, begun at once, is
    /// still streaming (1 s) asks the origin itself, with a whole timeout of its own, rather
    /// than answer `timeout`: its timeout is for a response to begin, as the leader's was.
    #[tokio::test(start_paused = true)]
    async fn a_follower_whose_time_ends_while_the_leaders_body_streams_fetches_for_itself() {
        let (fetch, asked) = origin(Duration::ZERO, Duration::from_secs(1), "max-age=60");
        let wait = Duration::from_millis(500);
        let got = lead_and_follow(fetch, wait).await;
        assert_eq!(got.unwrap(), Bytes::from_static(b"x"));
        let asked = asked.lock().unwrap();
        assert_eq!(asked.len(), 2);
        assert_eq!(asked[0], None);
        // A new deadline from when its own ended (not the old one, which had run out).
        let left = asked[1].expect("the follower's fetch carries its deadline");
        assert_eq!(left, wait);
    }

    /// A request of `wait` timeout for key `k` to `cache`, `after` from now; its answer with
    /// the body read whole. `gone_after`: its caller hangs up then (an error, not an answer).
    async fn ask(
        cache: &Arc<Cache>,
        fetch: &Fetch,
        wait: Duration,
        after: Duration,
        gone_after: Option<Duration>,
    ) -> Result<Bytes, ProxyError> {
        tokio::time::sleep(after).await;
        let head = http::Request::get("http://hello/k")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let asked = async {
            let resp = serve(cache, "k".into(), wait, head, fetch.clone()).await?;
            Ok(resp.into_body().collect().await.unwrap().to_bytes())
        };
        match gone_after {
            None => asked.await,
            Some(gone) => tokio::time::timeout(gone, asked).await.unwrap_or_else(|_| {
                Err(ProxyError::new(
                    ErrorKind::BadRequest,
                    Side::Downstream,
                    "gone",
                ))
            }),
        }
    }

    fn cache() -> Arc<Cache> {
        Arc::new(Cache::new(1 << 20, 1 << 16, Arc::default()))
    }

    /// A request that waited for another's fetch and has no time left answers `timeout`
    /// without a fetch; one that did not wait fetches with the whole timeout (no deadline).
    #[test]
    fn a_request_that_waited_away_its_time_does_not_fetch() {
        let head = || {
            http::Request::get("http://hello/k")
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        let wait = Duration::from_secs(1);
        let past = Deadline(tokio::time::Instant::now() - Duration::from_millis(1));
        let e = timed(head(), past, true, wait).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Timeout);
        assert!(
            e.message.contains("waited for another's fetch"),
            "{}",
            e.message
        );
        let fresh = timed(head(), past, false, wait).unwrap();
        assert!(fresh.extensions.get::<Deadline>().is_none());
        let later = Deadline(tokio::time::Instant::now() + wait);
        let left = timed(head(), later, true, wait)
            .unwrap()
            .extensions
            .get::<Deadline>()
            .unwrap()
            .left();
        assert!(left > Duration::ZERO && left <= wait, "{left:?}");
    }

    /// A leader whose fetch fails other than by timeout (here the peer cannot be reached)
    /// does not fail its followers: the follower asks the origin itself, and is answered.
    #[tokio::test(start_paused = true)]
    async fn a_leader_that_fails_to_connect_leaves_its_follower_to_fetch() {
        let fail = Step::Fail(ErrorKind::ConnectFailed, Duration::from_millis(300));
        let (fetch, asked) = scripted(vec![fail], "max-age=60");
        let (cache, wait) = (cache(), Duration::from_secs(5));
        let (lead, follow) = tokio::join!(
            ask(&cache, &fetch, wait, Duration::ZERO, None),
            ask(&cache, &fetch, wait, Duration::from_millis(100), None),
        );
        assert_eq!(lead.unwrap_err().kind, ErrorKind::ConnectFailed);
        assert_eq!(follow.unwrap(), Bytes::from_static(b"x"));
        let asked = asked.lock().unwrap();
        assert_eq!(asked.len(), 2);
        // The follower came at 100 ms and fetched at 300 ms, with what was left of its time.
        assert_eq!(asked[1], Some(wait - Duration::from_millis(200)));
    }

    /// A leader that waited first (its own leader's caller hung up) and then ran out of its
    /// time does not fail the requests that followed it: they came later and have time left,
    /// so one of them leads a new fetch, and is answered.
    #[tokio::test(start_paused = true)]
    async fn a_leader_that_waited_first_and_timed_out_hands_the_fetch_on() {
        let timeout = Step::Fail(ErrorKind::Timeout, Duration::from_millis(300));
        let (fetch, asked) = scripted(vec![Step::Hang, timeout], "max-age=60");
        let (cache, wait) = (cache(), Duration::from_secs(5));
        let ms = Duration::from_millis;
        let (first, second, third) = tokio::join!(
            // Leads, and its caller hangs up at 100 ms.
            ask(&cache, &fetch, wait, ms(0), Some(ms(100))),
            // Follows; leads after the hang-up, and its fetch times out at about 400 ms.
            ask(&cache, &fetch, wait, ms(50), None),
            // Follows the second, and leads once its fetch has timed out.
            ask(&cache, &fetch, wait, ms(200), None),
        );
        assert_eq!(first.unwrap_err().message, "gone");
        assert_eq!(second.unwrap_err().kind, ErrorKind::Timeout);
        assert_eq!(third.unwrap(), Bytes::from_static(b"x"));
        let asked = asked.lock().unwrap();
        assert_eq!(asked.len(), 3);
        // The first with the whole timeout; the second from 100 ms, having come at 50; the
        // third from 400 ms, having come at 200: each with what was left of its own time.
        assert_eq!(asked[..], [None, Some(wait - ms(50)), Some(wait - ms(200))]);
    }
}
