//! The response cache through a real sidecar pair, against an upstream that counts requests.
//! Time is the sidecar's cache clock, advanced by the test instead of slept.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};

use crate::support::*;

const CACHE: &str = "cache = { max_bytes = \"1MiB\", max_entry_bytes = \"256KiB\" }";

/// GETs `url` twice and says how the cache answered the second time.
async fn second(pair: &Pair, url: &str) -> String {
    get(pair.out(), "hello", url).await;
    get(pair.out(), "hello", url).await.how().to_string()
}

async fn cached_pair() -> Pair {
    Pair::start_with(CACHE, "").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hit_miss_and_expiry() {
    let pair = cached_pair().await;
    let url = "/c/a?cc=max-age=60";
    let first = get(pair.out(), "hello", url).await;
    assert_eq!((first.status, first.how()), (StatusCode::OK, "miss"));
    let hit = get(pair.out(), "hello", url).await;
    assert_eq!(hit.how(), "hit");
    assert_eq!(hit.body, first.body);
    assert_eq!(pair.upstream.count_of("/c/a"), 1);
    assert_eq!(values(&hit.headers, "cache-control"), vec!["max-age=60"]);

    pair.client.clock().advance(Duration::from_secs(10));
    let aged = get(pair.out(), "hello", url).await;
    assert_eq!(aged.how(), "hit");
    assert_eq!(values(&aged.headers, "age"), vec!["10"]);

    pair.client.clock().advance(Duration::from_secs(51));
    let expired = get(pair.out(), "hello", url).await;
    assert_eq!(expired.how(), "miss");
    assert_eq!(pair.upstream.count_of("/c/a"), 2);
    assert_ne!(expired.body, first.body, "an expired copy was served");
    // HEAD is answered by the origin and does not disturb the entry.
    let head = send(
        pair.out(),
        Request::head(url)
            .header("host", "hello")
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!((head.status, head.how()), (StatusCode::OK, "miss"));
    assert_eq!(pair.upstream.last().method, "HEAD");
    let again = get(pair.out(), "hello", url).await;
    assert_eq!((again.how(), &again.body), ("hit", &expired.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_store_private_and_authorized_responses_are_not_stored() {
    let pair = cached_pair().await;
    for url in [
        "/c/ns?cc=no-store",
        "/c/pv?cc=private,%20max-age=60",
        "/c/none",
    ] {
        for _ in 0..2 {
            assert_eq!(get(pair.out(), "hello", url).await.how(), "miss", "{url}");
        }
    }
    assert_eq!(pair.upstream.count_of("/c/ns"), 2);
    assert_eq!(pair.upstream.count_of("/c/pv"), 2);
    // With Authorization, only a response that says it may be shared is stored.
    let authed = |url: &'static str| {
        Request::get(url)
            .header("host", "hello")
            .header("authorization", "Bearer t")
            .body(full(Bytes::new()))
            .unwrap()
    };
    for _ in 0..2 {
        send(pair.out(), authed("/c/auth?cc=max-age=60")).await;
        send(pair.out(), authed("/c/pub?cc=public,%20max-age=60")).await;
    }
    assert_eq!(pair.upstream.count_of("/c/auth"), 2);
    assert_eq!(pair.upstream.count_of("/c/pub"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_separates_entries() {
    let pair = cached_pair().await;
    let lang = |l: &'static str| {
        Request::get("/c/v?cc=max-age=60&vary=accept-language")
            .header("host", "hello")
            .header("accept-language", l)
            .body(full(Bytes::new()))
            .unwrap()
    };
    let en = send(pair.out(), lang("en")).await;
    let fr = send(pair.out(), lang("fr")).await;
    assert_eq!((en.how(), fr.how()), ("miss", "miss"));
    assert!(String::from_utf8_lossy(&en.body).ends_with(" en"));
    assert!(String::from_utf8_lossy(&fr.body).ends_with(" fr"));
    let en2 = send(pair.out(), lang("en")).await;
    let fr2 = send(pair.out(), lang("fr")).await;
    assert_eq!((en2.how(), &en2.body), ("hit", &en.body));
    assert_eq!((fr2.how(), &fr2.body), ("hit", &fr.body));
    assert_eq!(pair.upstream.count_of("/c/v"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_revalidation_refreshes_without_a_body() {
    let pair = cached_pair().await;
    let url = "/c/e?cc=max-age=5&etag=%22v1%22";
    let first = get(pair.out(), "hello", url).await;
    assert_eq!(first.how(), "miss");
    pair.client.clock().advance(Duration::from_secs(6));
    let reval = get(pair.out(), "hello", url).await;
    assert_eq!((reval.status, reval.how()), (StatusCode::OK, "revalidated"));
    assert_eq!(
        reval.body, first.body,
        "the stored body is served after a 304"
    );
    let conditional = pair.upstream.last();
    assert_eq!(
        values(&conditional.headers, "if-none-match"),
        vec!["\"v1\""]
    );
    assert_eq!(pair.upstream.count_of("/c/e"), 2);
    // The 304 refreshed freshness: the next request is a plain hit.
    let hit = get(pair.out(), "hello", url).await;
    assert_eq!(hit.how(), "hit");
    assert_eq!(pair.upstream.count_of("/c/e"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_never_sees_a_304_meant_for_the_cache() {
    let pair = cached_pair().await;
    let url = "/c/lm?cc=max-age=5&lm=Sat,%2021%20Nov%202026%2010:00:00%20GMT";
    let first = get(pair.out(), "hello", url).await;
    pair.client.clock().advance(Duration::from_secs(6));
    let reval = get(pair.out(), "hello", url).await;
    assert_eq!((reval.status, reval.how()), (StatusCode::OK, "revalidated"));
    assert_eq!(reval.body, first.body);
    assert_eq!(
        values(&pair.upstream.last().headers, "if-modified-since"),
        vec!["Sat, 21 Nov 2026 10:00:00 GMT"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_reach_the_upstream_once() {
    let pair = cached_pair().await;
    let out = pair.out();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn(async move { get(out, "hello", "/c/hot?cc=max-age=60&delay=300").await })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, StatusCode::OK);
        bodies.push(got.body);
    }
    assert_eq!(pair.upstream.count_of("/c/hot"), 1);
    assert!(bodies.iter().all(|b| *b == bodies[0]));
}

/// Waits (10 s at most) until the origin has seen `n` requests starting with `prefix`.
async fn seen_at_origin(pair: &Pair, prefix: &str, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pair.upstream.count_of(prefix) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the origin saw {} of {n} requests for {prefix}",
            pair.upstream.count_of(prefix)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One request for `url`, and once its upstream request has arrived (the `seen`th with
/// `prefix`), `n - 1` more while it runs (the upstream's `delay` in `url` keeps it running).
async fn one_then_many(
    pair: &Pair,
    url: &'static str,
    prefix: &str,
    seen: usize,
    n: usize,
) -> Vec<Got> {
    let out = pair.out();
    let first = tokio::spawn(async move { get(out, "hello", url).await });
    seen_at_origin(pair, prefix, seen).await;
    let rest: Vec<_> = (1..n)
        .map(|_| tokio::spawn(async move { get(out, "hello", url).await }))
        .collect();
    let mut all = vec![first.await.unwrap()];
    for t in rest {
        all.push(t.await.unwrap());
    }
    all
}

/// A hot entry expires with a hundred requests for it at once: one revalidates it and the
/// others wait for that one, as for a miss, rather than each asking the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_requests_for_an_expired_entry_revalidate_once() {
    let pair = cached_pair().await;
    let out = pair.out();
    // The revalidation takes 3 s: the other 99 come while it runs.
    let url = "/c/exp?cc=max-age=5&etag=%22v1%22&delay=3000";
    let first = get(out, "hello", url).await;
    assert_eq!(first.how(), "miss");
    pair.client.clock().advance(Duration::from_secs(6));
    let mut revalidated = 0;
    for got in one_then_many(&pair, url, "/c/exp", 2, 100).await {
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
        assert_eq!(got.body, first.body);
        match got.how() {
            "revalidated" => revalidated += 1,
            "hit" => {}
            other => panic!("answered as {other:?}"),
        }
    }
    assert_eq!(revalidated, 1);
    assert_eq!(pair.upstream.count_of("/c/exp"), 2);
}

/// A hot key's fetch runs out of the service's timeout (the origin would answer in 30 s, the
/// timeout is 2 s) while 20 more requests wait for it: they answer 504 `timeout` with it,
/// within their own timeout, rather than each asking the origin again with a whole timeout of
/// its own (21 requests reached the origin before, and the 20 answered at twice the timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_for_a_fetch_that_times_out_time_out_with_it() {
    let service = format!("{CACHE}\ntimeout = \"2s\"\nretry = {{ attempts = 1 }}");
    let pair = Pair::start_with(&service, "").await;
    let url = "/c/slow?cc=max-age=60&delay=30000";
    for got in one_then_many(&pair, url, "/c/slow", 1, 21).await {
        assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT, "{got:?}");
        assert_eq!(got.error_kind(), Some("timeout"), "{got:?}");
    }
    assert_eq!(pair.upstream.count_of("/c/slow"), 1);
}

/// The caller of a collapsed miss's leader hangs up while its fetch runs: one waiting request
/// takes the lead and fetches again, and the others wait for it, rather than all of them
/// going to the origin at once (21 fetches for 21 callers before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_caller_hangs_up_hands_the_fetch_to_one_follower() {
    use tokio::io::AsyncWriteExt as _;
    let pair = cached_pair().await;
    let out = pair.out();
    let url = "/c/lead?cc=max-age=60&delay=1500";
    let mut leader = tokio::net::TcpStream::connect(out).await.unwrap();
    let head = format!("GET {url} HTTP/1.1\r\nHost: hello\r\n\r\n");
    leader.write_all(head.as_bytes()).await.unwrap();
    seen_at_origin(&pair, "/c/lead", 1).await;
    let followers: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { get(out, "hello", url).await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(leader);
    for f in followers {
        let got = f.await.unwrap();
        assert_eq!(got.status, StatusCode::OK, "{got:?}");
    }
    // The leader's fetch and one more (or only the leader's, on a machine so slow that its
    // response was whole and stored before the hang-up was seen).
    let fetches = pair.upstream.count_of("/c/lead");
    assert!(fetches <= 2, "{fetches} fetches for one key");
    assert_eq!(get(out, "hello", url).await.how(), "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let pair = cached_pair().await;
    let url = "/c/swr?cc=max-age=1,%20stale-while-revalidate=60&delay=200";
    let first = get(pair.out(), "hello", url).await;
    pair.client.clock().advance(Duration::from_secs(5));
    let out = pair.out();
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get(out, "hello", url).await }))
        .collect();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!((got.how(), &got.body), ("stale", &first.body));
    }
    // Exactly one background refresh, which then serves as the new entry.
    let mut refreshed = None;
    for _ in 0..100 {
        let got = get(pair.out(), "hello", url).await;
        if got.how() == "hit" {
            refreshed = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refreshed = refreshed.expect("the background refresh completed");
    assert_ne!(refreshed.body, first.body);
    assert_eq!(pair.upstream.count_of("/c/swr"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_serves_the_stored_copy_when_the_origin_fails() {
    let pair = cached_pair().await;
    let sie = "/c/sie?cc=max-age=1,%20stale-if-error=60";
    let plain = "/c/plain?cc=max-age=1";
    let first = get(pair.out(), "hello", sie).await;
    get(pair.out(), "hello", plain).await;
    pair.upstream
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    pair.client.clock().advance(Duration::from_secs(5));
    let got = get(pair.out(), "hello", sie).await;
    assert_eq!((got.status, got.how()), (StatusCode::OK, "stale"));
    assert_eq!(got.body, first.body);
    // Without stale-if-error the failure reaches the app.
    let got = get(pair.out(), "hello", plain).await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    // Past the window, the failure is passed on too.
    pair.client.clock().advance(Duration::from_secs(120));
    assert_eq!(
        get(pair.out(), "hello", sie).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

/// The origin fails while a hot entry is past its freshness but within `stale-if-error`: one
/// request finds it failing, and the others waiting on it are answered from the stale copy at
/// once, rather than each asking the failing origin again (50 times before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_under_load_asks_the_failing_origin_once() {
    // No retries: the one request's failure is one upstream request.
    let pair = Pair::start_with(&format!("{CACHE}\nretry = {{ attempts = 1 }}"), "").await;
    let out = pair.out();
    // The failing revalidation takes 3 s: the other 49 come while it runs.
    let url = "/c/sie-hot?cc=max-age=1,%20stale-if-error=60&delay=3000";
    let first = get(out, "hello", url).await;
    assert_eq!(first.how(), "miss");
    pair.upstream
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    pair.client.clock().advance(Duration::from_secs(5));
    for got in one_then_many(&pair, url, "/c/sie-hot", 2, 50).await {
        assert_eq!((got.status, got.how()), (StatusCode::OK, "stale"));
        assert_eq!(got.body, first.body);
    }
    assert_eq!(pair.upstream.count_of("/c/sie-hot"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_methods_invalidate_the_uri() {
    let pair = cached_pair().await;
    let url = "/c/inv?cc=max-age=60";
    assert_eq!(second(&pair, url).await, "hit");
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header("host", "hello")
            .body(full("change"))
            .unwrap();
        assert_eq!(send(pair.out(), req).await.status, StatusCode::OK);
        let after = get(pair.out(), "hello", url).await;
        assert_eq!(after.how(), "miss", "after {method}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_bound_holds_and_large_bodies_pass_through() {
    let pair = Pair::start_with(
        "cache = { max_bytes = \"64KiB\", max_entry_bytes = \"16KiB\" }",
        "",
    )
    .await;
    for i in 0..40 {
        let got = get(
            pair.out(),
            "hello",
            &format!("/c/b{i}?cc=max-age=60&size=10000"),
        )
        .await;
        assert!(got.body == pattern(10_000));
    }
    let cache = pair.client.cache("hello").unwrap();
    let held = cache.weighted_size();
    assert!(held <= 64 * 1024, "cache holds {held} bytes");
    assert!(held >= 10_000, "cache holds nothing ({held} bytes)");
    // Over the per-entry limit: streamed through intact, never stored.
    for _ in 0..2 {
        let got = get(pair.out(), "hello", "/c/big?cc=max-age=60&size=100000").await;
        assert_eq!(got.how(), "miss");
        assert!(got.body == pattern(100_000));
    }
    assert_eq!(pair.upstream.count_of("/c/big"), 2);
    // A body under the limit streams to the first caller while it is stored.
    let url = "/c/mid?cc=max-age=60&size=12000";
    let first = get(pair.out(), "hello", url).await;
    let second = get(pair.out(), "hello", url).await;
    assert_eq!((first.how(), second.how()), ("miss", "hit"));
    assert!(second.body == pattern(12_000));
}

async fn get_with(pair: &Pair, url: &str, headers: &[(&str, &str)]) -> Got {
    let mut b = Request::get(url).header("host", "hello");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(pair.out(), b.body(full(Bytes::new())).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_age_list_or_an_invalid_expires_never_makes_a_response_fresh() {
    let pair = cached_pair().await;
    // Age 7200 (the first member of the list) is over max-age: stale at once.
    let url = "/c/age?cc=max-age=3600&hdr=age:7200,%200";
    assert_eq!(second(&pair, url).await, "miss");
    // An invalid Expires (doubled spaces) means already expired.
    let url = "/c/exp?hdr=expires:Thu,%2018%20%20Aug%20%202050%2002:01:18%20GMT";
    assert_eq!(second(&pair, url).await, "miss");
    // The obsolete formats are valid: RFC 850 and asctime dates in the future keep it fresh.
    for (name, date) in [
        ("rfc850", "Thursday,%2018-Aug-50%2002:01:18%20GMT"),
        ("asctime", "Thu%20Aug%2018%2002:01:18%202050"),
    ] {
        let url = format!("/c/{name}?hdr=expires:{date}");
        assert_eq!(second(&pair, &url).await, "hit", "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directive_names_are_case_insensitive() {
    let pair = cached_pair().await;
    let url = "/c/case?cc=MAX-AGE=60";
    assert_eq!(second(&pair, url).await, "hit");
    let url = "/c/nocache?cc=No-CaChE,%20max-age=60";
    assert_eq!(second(&pair, url).await, "miss", "No-CaChE is no-cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_keeps_the_origin_date_and_names_no_transport() {
    let pair = cached_pair().await;
    let date = "Wed, 25 Nov 2026 10:00:00 GMT";
    let url = format!(
        "/c/date?cc=max-age=600&hdr=date:{}",
        date.replace(' ', "%20")
    );
    let miss = get(pair.out(), "hello", &url).await;
    assert_eq!(values(&miss.headers, "quicar-transport"), vec!["quic"]);
    pair.client.clock().advance(Duration::from_secs(5));
    let hit = get(pair.out(), "hello", &url).await;
    assert_eq!(hit.how(), "hit");
    assert_eq!(values(&hit.headers, "date"), vec![date]);
    assert!(
        values(&hit.headers, "quicar-transport").is_empty(),
        "{hit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_requests_get_304_from_a_fresh_entry() {
    let pair = cached_pair().await;
    let lm = "Sat,%2021%20Nov%202026%2010:00:00%20GMT";
    let url = format!("/c/cond?cc=max-age=60&etag=%22v1%22&lm={lm}");
    get(pair.out(), "hello", &url).await;
    for headers in [
        vec![("if-none-match", "\"v1\"")],
        vec![("if-none-match", "W/\"v1\"")],
        vec![("if-none-match", "\"other\", \"v1\"")],
        vec![("if-modified-since", "Sun, 22 Nov 2026 10:00:00 GMT")],
    ] {
        let got = get_with(&pair, &url, &headers).await;
        assert_eq!(got.status, StatusCode::NOT_MODIFIED, "{headers:?}: {got:?}");
        assert_eq!(got.how(), "hit");
        assert!(got.body.is_empty());
        assert_eq!(values(&got.headers, "etag"), vec!["\"v1\""]);
    }
    let got = get_with(&pair, &url, &[("if-none-match", "\"v0\"")]).await;
    assert_eq!((got.status, got.how()), (StatusCode::OK, "hit"));
    assert_eq!(pair.upstream.count_of("/c/cond"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_final_status_with_explicit_freshness_is_stored() {
    let pair = cached_pair().await;
    for status in [299, 400, 404, 500, 503] {
        let url = format!("/c/st{status}?cc=max-age=60&status={status}");
        get(pair.out(), "hello", &url).await;
        let again = get(pair.out(), "hello", &url).await;
        assert_eq!((again.status.as_u16(), again.how()), (status, "hit"));
    }
    // Without explicit freshness a 500 is not stored.
    let url = "/c/plain500?status=500";
    assert_eq!(second(&pair, url).await, "miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qualified_no_cache_and_private_store_all_but_the_named_fields() {
    let pair = cached_pair().await;
    let url = "/c/qual?cc=max-age=60,%20no-cache=%22X-Secret%22,%20private=%22X-Private%22&hdr=x-secret:s;;x-private:p;;x-public:ok";
    let miss = get(pair.out(), "hello", url).await;
    assert_eq!(
        values(&miss.headers, "x-secret"),
        vec!["s"],
        "the origin's answer passes whole"
    );
    let hit = get(pair.out(), "hello", url).await;
    assert_eq!(hit.how(), "hit");
    assert!(
        values(&hit.headers, "x-secret").is_empty() && values(&hit.headers, "x-private").is_empty()
    );
    assert_eq!(values(&hit.headers, "x-public"), vec!["ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_no_store_bypasses_and_only_if_cached_answers_504() {
    let pair = cached_pair().await;
    let url = "/c/ns?cc=max-age=60";
    get(pair.out(), "hello", url).await;
    let got = get_with(&pair, url, &[("cache-control", "No-Store")]).await;
    assert_eq!(got.how(), "", "not served from the cache: {got:?}");
    assert_eq!(pair.upstream.count_of("/c/ns"), 2);
    let got = get_with(
        &pair,
        "/c/never?cc=max-age=60",
        &[("cache-control", "only-if-cached")],
    )
    .await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(pair.upstream.count_of("/c/never"), 0);
    let got = get_with(&pair, url, &[("cache-control", "only-if-cached")]).await;
    assert_eq!((got.status, got.how()), (StatusCode::OK, "hit"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_requests_invalidate_location_and_content_location() {
    let pair = cached_pair().await;
    for path in ["/c/target?cc=max-age=60", "/c/other?cc=max-age=60"] {
        get(pair.out(), "hello", path).await;
        assert_eq!(get(pair.out(), "hello", path).await.how(), "hit");
    }
    let post = Request::post("/c/post?loc=/c/target%3Fcc=max-age=60&hdr=content-location:http://hello/c/other%3Fcc=max-age=60")
        .header("host", "hello")
        .body(full(Bytes::new()))
        .unwrap();
    assert_eq!(send(pair.out(), post).await.status, StatusCode::OK);
    for path in ["/c/target?cc=max-age=60", "/c/other?cc=max-age=60"] {
        assert_eq!(get(pair.out(), "hello", path).await.how(), "miss", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_304_updates_the_stored_content_encoding() {
    let pair = cached_pair().await;
    let url = "/c/ce?cc=max-age=1&etag=%22e%22&ce304=identity";
    get(pair.out(), "hello", url).await;
    pair.client.clock().advance(Duration::from_secs(5));
    let got = get(pair.out(), "hello", url).await;
    assert_eq!(got.how(), "revalidated");
    assert_eq!(values(&got.headers, "content-encoding"), vec!["identity"]);
    let hit = get(pair.out(), "hello", url).await;
    assert_eq!(values(&hit.headers, "content-encoding"), vec!["identity"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vary_matches_list_fields_whatever_their_order_and_spacing() {
    let pair = cached_pair().await;
    let url = "/c/vary?cc=max-age=60&vary=accept-encoding";
    get_with(&pair, url, &[("accept-encoding", "gzip, br")]).await;
    let got = get_with(&pair, url, &[("accept-encoding", "br,gzip")]).await;
    assert_eq!(got.how(), "hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_is_cut_from_a_stored_complete_response() {
    let pair = cached_pair().await;
    let url = "/c/range?cc=max-age=60&size=100";
    let whole = get(pair.out(), "hello", url).await;
    let got = get_with(&pair, url, &[("range", "bytes=10-19")]).await;
    assert_eq!(
        (got.status, got.how()),
        (StatusCode::PARTIAL_CONTENT, "hit")
    );
    assert_eq!(
        values(&got.headers, "content-range"),
        vec!["bytes 10-19/100"]
    );
    assert_eq!(&got.body[..], &whole.body[10..20]);
    let got = get_with(&pair, url, &[("range", "bytes=-5")]).await;
    assert_eq!(&got.body[..], &whole.body[95..]);
    let got = get_with(&pair, url, &[("range", "bytes=500-")]).await;
    assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(pair.upstream.count_of("/c/range"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_cache_control_is_obeyed_by_quicar_and_hidden_from_the_app() {
    // Browsers and CDNs see no-store; the mesh caches for a minute.
    let pair = Pair::start_with(
        "cache = { max_bytes = \"1MiB\", targeted = [\"quicar-cache-control\", \"cdn-cache-control\"] }",
        "",
    )
    .await;
    let url = "/c/targeted?cc=no-store&hdr=quicar-cache-control:max-age=60";
    let miss = get(pair.out(), "hello", url).await;
    assert!(
        values(&miss.headers, "quicar-cache-control").is_empty(),
        "{miss:?}"
    );
    assert_eq!(values(&miss.headers, "cache-control"), vec!["no-store"]);
    let hit = get(pair.out(), "hello", url).await;
    assert_eq!(hit.how(), "hit");
    assert!(values(&hit.headers, "quicar-cache-control").is_empty());
    // The second field in precedence order counts when the first is absent, and passes on.
    let url = "/c/cdn?cc=no-store&hdr=cdn-cache-control:max-age=60";
    get(pair.out(), "hello", url).await;
    let hit = get(pair.out(), "hello", url).await;
    assert_eq!(hit.how(), "hit");
    assert_eq!(
        values(&hit.headers, "cdn-cache-control"),
        vec!["max-age=60"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_answered_from_the_cache_when_opted_in() {
    let pair = Pair::start_with(
        "cache = { max_bytes = \"1MiB\", serve_stale_on_connect_failure = \"30s\" }",
        "",
    )
    .await;
    let url = "/c/outage?cc=max-age=1";
    let first = get(pair.out(), "hello", url).await;
    let Pair {
        client,
        server,
        upstream,
        ..
    } = pair;
    server.shutdown().await;
    client.clock().advance(Duration::from_secs(10));
    let got = get(client.outbound, "hello", url).await;
    assert_eq!(
        (got.status, got.how()),
        (StatusCode::OK, "stale"),
        "{got:?}"
    );
    assert_eq!(got.body, first.body);
    // Past the window, the failure shows.
    client.clock().advance(Duration::from_secs(60));
    let got = get(client.outbound, "hello", url).await;
    assert_eq!(got.error_kind(), Some("connect-failed"), "{got:?}");
    drop(upstream);
}

/// What must not trigger `serve_stale_on_connect_failure`: the far app's own error statuses,
/// which reach every caller as they are, 20 at once included, while the peer is reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_own_errors_never_bring_the_copy_kept_for_an_outage() {
    let pair = Pair::start_with(
        "cache = { max_bytes = \"1MiB\", serve_stale_on_connect_failure = \"30s\" }\nretry = { attempts = 1 }",
        "",
    )
    .await;
    let url = "/c/app-fails?cc=max-age=1";
    assert_eq!(get(pair.out(), "hello", url).await.how(), "miss");
    pair.upstream
        .failing
        .store(true, std::sync::atomic::Ordering::Relaxed);
    pair.client.clock().advance(Duration::from_secs(10));
    let out = pair.out();
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(async move { get(out, "hello", url).await }))
        .collect();
    for c in calls {
        let got = c.await.unwrap();
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{got:?}");
        assert_ne!(got.how(), "stale", "{got:?}");
        assert_eq!(&got.body[..], b"origin down", "{got:?}");
        assert_eq!(
            got.error_kind(),
            None,
            "an app status is not a sidecar error"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_response_updates_the_stored_fields() {
    let pair = cached_pair().await;
    let url = "/c/head?cc=max-age=60&etag=%22h%22&headhdr=content-encoding:identity";
    let miss = get(pair.out(), "hello", url).await;
    assert!(values(&miss.headers, "content-encoding").is_empty());
    // The origin's fields changed (same representation, same ETag); a HEAD brings them.
    let head = send(
        pair.out(),
        Request::head(url)
            .header("host", "hello")
            .body(full(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    let hit = get(pair.out(), "hello", url).await;
    assert_eq!(hit.how(), "hit");
    assert_eq!(values(&hit.headers, "content-encoding"), vec!["identity"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_103_is_never_stored() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An origin that sends 103 Early Hints before every final response.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    let origin = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    let answer = "HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n\
                                  HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let pki = Pki::new();
    let server = sidecar(&pki, &server_toml(&pki, app, "127.0.0.1:0", "")).await;
    let client = sidecar(&pki, &client_toml(&pki, &[server.inbound], CACHE)).await;
    let first = get(client.outbound, "hello", "/hints").await;
    assert_eq!(
        (first.status, first.how(), &first.body[..]),
        (StatusCode::OK, "miss", &b"ok"[..])
    );
    let hit = get(client.outbound, "hello", "/hints").await;
    assert_eq!(
        (hit.status, hit.how(), &hit.body[..]),
        (StatusCode::OK, "hit", &b"ok"[..])
    );
    assert!(
        values(&hit.headers, "link").is_empty(),
        "the 103's fields were stored: {hit:?}"
    );
    origin.abort();
}
