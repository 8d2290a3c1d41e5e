//! The cache step of the outbound path: serve fresh hits, revalidate stale entries (or serve
//! them during `stale-while-revalidate` / on error within `stale-if-error`), collapse
//! concurrent misses into one upstream request, and store responses while they stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{Response, StatusCode};
use http_body_util::BodyExt;

use crate::body::{content_length, full, ProxyBody};
use crate::cache::{
    is_conditional, is_error_status, Cache, Flight, FlightGuard, Lookup, TeeBody, Variant,
};
use crate::error::ProxyError;
use crate::facts::CacheOutcome;

/// How the cache step reaches the service: one request (with the service's retries and
/// deadline) for a bodyless head. Owned, so a background refresh can outlive the request.
pub(crate) type Fetch = Arc<
    dyn Fn(http::request::Parts) -> BoxFuture<'static, Result<Response<ProxyBody>, ProxyError>>
        + Send
        + Sync,
>;

/// A GET (or HEAD) without a body, for a service with a cache. `wait` bounds how long a
/// collapsed request waits for the leader (the service's timeout).
pub(crate) async fn serve(
    cache: &Arc<Cache>,
    key: String,
    wait: Duration,
    req: http::request::Parts,
    fetch: Fetch,
) -> Result<Response<ProxyBody>, ProxyError> {
    let mut followed = false;
    loop {
        match cache.lookup(&key, &req) {
            Lookup::Fresh(parts, body) => {
                cache.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(cached(parts, body, CacheOutcome::Hit));
            }
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
                    cache.stats.stale.fetch_add(1, Ordering::Relaxed);
                    let (parts, body) = cache.stale_response(&variant);
                    return Ok(cached(parts, body, CacheOutcome::Stale));
                }
                return revalidate_now(&fetch, cache, key, req, &variant, revalidate).await;
            }
            Lookup::Miss if !followed => match cache.join(&key) {
                Flight::Leader(guard) => return miss(&fetch, cache, key, req, Some(guard)).await,
                Flight::Follower(mut rx) => {
                    // Another request is fetching this: wait for it, then look again once.
                    followed = true;
                    let _ = tokio::time::timeout(wait, Flight::wait(&mut rx)).await;
                }
            },
            // The leader's response was not storable (or it failed): fetch for ourselves.
            Lookup::Miss => return miss(&fetch, cache, key, req, None).await,
        }
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
    // On an error `guard` drops here and followers go upstream themselves.
    let resp = fetch(req.clone()).await?;
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
) -> Result<Response<ProxyBody>, ProxyError> {
    cache.stats.upstream_fetches.fetch_add(1, Ordering::Relaxed);
    let stale = |cache: &Cache| {
        cache.stats.stale.fetch_add(1, Ordering::Relaxed);
        let (parts, body) = cache.stale_response(variant);
        cached(parts, body, CacheOutcome::Stale)
    };
    match fetch(revalidate).await {
        Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
            let (parts, _) = resp.into_parts();
            match cache.revalidated(&key, variant, &req, &parts) {
                Some((parts, body)) => {
                    cache.stats.revalidated.fetch_add(1, Ordering::Relaxed);
                    Ok(cached(parts, body, CacheOutcome::Revalidated))
                }
                // A 304 for the client's own validators: it can use it.
                None if is_conditional(&req) => {
                    Ok(Response::from_parts(parts, crate::body::empty()))
                }
                // A 304 we cannot match to what we hold: ask again without conditions.
                None => miss(fetch, cache, key, req, None).await,
            }
        }
        Ok(resp) if is_error_status(resp.status()) && cache.usable_on_error(variant) => {
            Ok(stale(cache))
        }
        Ok(resp) => {
            cache.stats.misses.fetch_add(1, Ordering::Relaxed);
            Ok(store_while_streaming(
                cache,
                key,
                req,
                resp,
                None,
                CacheOutcome::Miss,
            ))
        }
        Err(e) if cache.usable_on_error(variant) => {
            tracing::debug!(error = %e.message, "origin failed; serving stale within stale-if-error");
            Ok(stale(cache))
        }
        Err(e) => Err(e),
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
    let c = cache.clone();
    let tee = TeeBody::new(body, cache.max_entry_bytes(), move |copy| {
        if let Some(bytes) = copy {
            c.insert(&key, &req, &stored, policy, bytes);
        }
        if let Some(g) = guard {
            c.land(g);
        }
    });
    Response::from_parts(parts, tee.boxed_unsync())
}

fn cached(mut parts: http::response::Parts, body: Bytes, how: CacheOutcome) -> Response<ProxyBody> {
    parts.extensions.insert(how);
    Response::from_parts(parts, full(body))
}
