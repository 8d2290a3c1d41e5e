//! The cache step of the outbound path: serve fresh hits, revalidate stale entries (or serve
//! them during `stale-while-revalidate` / on error within `stale-if-error`), collapse
//! concurrent misses into one upstream request, and store responses while they stream.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

use super::{fetch, path_of, Outbound, Route};
use crate::body::{content_length, full, ProxyBody};
use crate::cache::{
    is_conditional, is_error_status, mark, Cache, Flight, FlightGuard, Lookup, TeeBody, Variant,
};
use crate::error::ProxyError;

/// A GET (or HEAD) without a body, for a service with a cache.
pub(super) async fn serve(
    state: &Arc<Outbound>,
    route: &Route,
    cache: &Arc<Cache>,
    req: http::request::Parts,
) -> Result<Response<ProxyBody>, ProxyError> {
    let key = Cache::key(&route.name, path_of(&req.uri));
    let mut followed = false;
    loop {
        match cache.lookup(&key, &req) {
            Lookup::Fresh(parts, body) => {
                cache.stats.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(cached(parts, body, "hit"));
            }
            Lookup::Stale {
                variant,
                revalidate,
                serve_while_revalidating,
            } => {
                if serve_while_revalidating {
                    if cache.start_refresh(&key) {
                        tokio::spawn(refresh(
                            state.clone(),
                            route.name.clone(),
                            cache.clone(),
                            key.clone(),
                            req.clone(),
                            variant.clone(),
                            revalidate,
                        ));
                    }
                    cache.stats.stale.fetch_add(1, Ordering::Relaxed);
                    let (parts, body) = cache.stale_response(&variant);
                    return Ok(cached(parts, body, "stale"));
                }
                return revalidate_now(state, route, cache, key, req, &variant, revalidate).await;
            }
            Lookup::Miss if !followed => match cache.join(&key) {
                Flight::Leader(guard) => {
                    return miss(state, route, cache, key, req, Some(guard)).await
                }
                Flight::Follower(mut rx) => {
                    // Another request is fetching this: wait for it, then look again once.
                    followed = true;
                    let _ = tokio::time::timeout(route.timeout, Flight::wait(&mut rx)).await;
                }
            },
            // The leader's response was not storable (or it failed): fetch for ourselves.
            Lookup::Miss => return miss(state, route, cache, key, req, None).await,
        }
    }
}

async fn miss(
    state: &Outbound,
    route: &Route,
    cache: &Arc<Cache>,
    key: String,
    req: http::request::Parts,
    guard: Option<FlightGuard>,
) -> Result<Response<ProxyBody>, ProxyError> {
    cache.stats.misses.fetch_add(1, Ordering::Relaxed);
    cache.stats.upstream_fetches.fetch_add(1, Ordering::Relaxed);
    // On an error `guard` drops here and followers go upstream themselves.
    let resp = fetch(route, state, Request::from_parts(req.clone(), ()), None).await?;
    Ok(store_while_streaming(cache, key, req, resp, guard, "miss"))
}

async fn revalidate_now(
    state: &Outbound,
    route: &Route,
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
        cached(parts, body, "stale")
    };
    match fetch(route, state, Request::from_parts(revalidate, ()), None).await {
        Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
            let (parts, _) = resp.into_parts();
            match cache.revalidated(&key, variant, &req, &parts) {
                Some((parts, body)) => {
                    cache.stats.revalidated.fetch_add(1, Ordering::Relaxed);
                    Ok(cached(parts, body, "revalidated"))
                }
                // A 304 for the client's own validators: it can use it.
                None if is_conditional(&req) => {
                    Ok(Response::from_parts(parts, crate::body::empty()))
                }
                // A 304 we cannot match to what we hold: ask again without conditions.
                None => miss(state, route, cache, key, req, None).await,
            }
        }
        Ok(resp) if is_error_status(resp.status()) && cache.usable_on_error(variant) => {
            Ok(stale(cache))
        }
        Ok(resp) => {
            cache.stats.misses.fetch_add(1, Ordering::Relaxed);
            Ok(store_while_streaming(cache, key, req, resp, None, "miss"))
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
    state: Arc<Outbound>,
    service: String,
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
    let Some(route) = state.routes.get(&service.to_ascii_lowercase()) else {
        return;
    };
    cache.stats.upstream_fetches.fetch_add(1, Ordering::Relaxed);
    match fetch(route, &state, Request::from_parts(revalidate, ()), None).await {
        Ok(resp) if resp.status() == StatusCode::NOT_MODIFIED => {
            let (parts, _) = resp.into_parts();
            cache.revalidated(&key, &variant, &req, &parts);
        }
        Ok(resp) if !is_error_status(resp.status()) => {
            let resp = store_while_streaming(&cache, key.clone(), req, resp, None, "miss");
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
    how: &'static str,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let policy = cache
        .storable(&req, &parts)
        .filter(|_| cache.fits(content_length(&parts.headers)));
    let stored = parts.clone();
    mark(&mut parts.headers, how);
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

fn cached(mut parts: http::response::Parts, body: Bytes, how: &'static str) -> Response<ProxyBody> {
    mark(&mut parts.headers, how);
    Response::from_parts(parts, full(body))
}
