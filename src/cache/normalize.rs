//! What the freshness rules (`http-cache-semantics`) get wrong, fixed before they see a message
//! (RFC 9111): directive names are case-insensitive; a list or invalid `Age` must not make a
//! stale response fresh; an invalid `Expires` means already stale, and the obsolete date formats
//! are valid; `no-cache="F"` / `private="F"` let the rest of a response be reused without `F`;
//! targeted fields (RFC 9213) replace `Cache-Control` for this cache; any final status with
//! explicit freshness may be stored; list-valued request fields that `Vary` names match
//! whatever their whitespace and order.

use http::header::{HeaderMap, HeaderName, HeaderValue, AGE, CACHE_CONTROL, DATE, EXPIRES};
use http::StatusCode;

use super::http_date;

/// Statuses the freshness crate refuses to store even with explicit freshness.
const UNDERSTOOD: &[u16] = &[
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// Request fields whose value is a list where order and spacing carry no meaning for matching.
const LIST_FIELDS: &[&str] = &[
    "accept",
    "accept-encoding",
    "accept-language",
    "accept-charset",
];

/// `Cache-Control` directives, names lower-cased, values unquoted (commas inside quotes kept).
pub(crate) fn directives<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for v in values.into_iter().filter_map(|v| v.to_str().ok()) {
        let mut rest = v;
        while !rest.is_empty() {
            let (item, tail) = split_item(rest);
            rest = tail;
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            match item.split_once('=') {
                Some((k, val)) => {
                    let val = val.trim();
                    let val = val
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or(val);
                    out.push((k.trim().to_ascii_lowercase(), Some(val.to_string())));
                }
                None => out.push((item.to_ascii_lowercase(), None)),
            }
        }
    }
    out
}

/// The first comma-separated item (a quoted string may hold commas) and what follows it.
fn split_item(s: &str) -> (&str, &str) {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => return (&s[..i], &s[i + 1..]),
            _ => {}
        }
    }
    (s, "")
}

fn format_directives(ds: &[(String, Option<String>)]) -> String {
    ds.iter()
        .map(|(k, v)| match v {
            Some(v)
                if v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') && !v.is_empty() =>
            {
                format!("{k}={v}")
            }
            Some(v) => format!("{k}=\"{v}\""),
            None => k.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a response carries explicit freshness (so any final status may be stored).
fn explicit_freshness(ds: &[(String, Option<String>)], headers: &HeaderMap) -> bool {
    ds.iter().any(|(k, _)| k == "max-age" || k == "s-maxage") || headers.contains_key(EXPIRES)
}

/// The response head as the freshness rules should see it (and as it is stored). `targeted`
/// lists the targeted cache-control fields in precedence order.
pub(crate) fn response(
    parts: &http::response::Parts,
    targeted: &[HeaderName],
) -> http::response::Parts {
    let mut out = http::Response::new(()).into_parts().0;
    out.status = parts.status;
    out.version = parts.version;
    out.headers = parts.headers.clone();
    let h = &mut out.headers;
    // RFC 9213: the first targeted field present (and not empty) is this cache's Cache-Control.
    let mut ds = directives(h.get_all(CACHE_CONTROL));
    for name in targeted {
        let t = directives(h.get_all(name));
        if !t.is_empty() {
            ds = t;
            break;
        }
    }
    // Qualified no-cache / private: the named fields are never stored; the rest may be.
    let mut unstored: Vec<String> = Vec::new();
    ds.retain(|(k, v)| match (k.as_str(), v) {
        ("no-cache" | "private", Some(fields)) => {
            unstored.extend(fields.split(',').map(|f| f.trim().to_ascii_lowercase()));
            false
        }
        _ => true,
    });
    for f in unstored.iter().filter(|f| !f.is_empty()) {
        if let Ok(name) = HeaderName::from_bytes(f.as_bytes()) {
            h.remove(name);
        }
    }
    h.remove(CACHE_CONTROL);
    if !ds.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&format_directives(&ds)) {
            h.insert(CACHE_CONTROL, v);
        }
    }
    // Age: the first member of a list; anything but a non-negative integer is ignored.
    let age = h
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<u64>().ok());
    h.remove(AGE);
    if let Some(age) = age {
        h.insert(AGE, HeaderValue::from(age));
    }
    // Expires: more than one, or an invalid date, means already expired.
    if h.contains_key(EXPIRES) {
        let mut all = h.get_all(EXPIRES).iter();
        let first = all.next().and_then(|v| v.to_str().ok()).map(str::to_string);
        let valid = all
            .next()
            .is_none()
            .then_some(())
            .and(first.as_deref().and_then(http_date::parse));
        let t = valid.unwrap_or(std::time::SystemTime::UNIX_EPOCH);
        h.insert(EXPIRES, imf(t));
    }
    // Date and Last-Modified in any valid format, rewritten as IMF-fixdate; invalid ones go.
    for name in [DATE, http::header::LAST_MODIFIED] {
        let t = h
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .and_then(http_date::parse);
        h.remove(&name);
        if let Some(t) = t {
            h.insert(name, imf(t));
        }
    }
    let final_status = parts.status.as_u16() >= 200
        && parts.status != StatusCode::PARTIAL_CONTENT
        && parts.status != StatusCode::NOT_MODIFIED;
    if final_status && !UNDERSTOOD.contains(&parts.status.as_u16()) && explicit_freshness(&ds, h) {
        // The crate stores only statuses it knows; RFC 9111 §3 allows any final status with
        // explicit freshness. It judges this one as a 200; the real status is stored beside.
        out.status = StatusCode::OK;
    }
    out
}

/// The request head as cache matching should see it: directive names lower-cased, list-valued
/// fields with their members trimmed and sorted.
pub(crate) fn request(parts: &http::request::Parts) -> std::borrow::Cow<'_, http::request::Parts> {
    // Most requests have nothing to normalise: no copy then (this runs on every cache lookup).
    let h = &parts.headers;
    if !h.contains_key(CACHE_CONTROL) && !LIST_FIELDS.iter().any(|f| h.contains_key(*f)) {
        return std::borrow::Cow::Borrowed(parts);
    }
    let mut out = http::Request::new(()).into_parts().0;
    out.method = parts.method.clone();
    out.uri = parts.uri.clone();
    out.version = parts.version;
    out.headers = parts.headers.clone();
    let ds = directives(parts.headers.get_all(CACHE_CONTROL));
    out.headers.remove(CACHE_CONTROL);
    if !ds.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&format_directives(&ds)) {
            out.headers.insert(CACHE_CONTROL, v);
        }
    }
    for name in LIST_FIELDS {
        let joined: Vec<String> = parts
            .headers
            .get_all(*name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|m| m.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|m| !m.is_empty())
            .collect();
        if joined.is_empty() {
            continue;
        }
        let mut members = joined;
        members.sort();
        if let Ok(v) = HeaderValue::from_str(&members.join(", ")) {
            out.headers.insert(*name, v);
        }
    }
    std::borrow::Cow::Owned(out)
}

pub(crate) fn imf(t: std::time::SystemTime) -> HeaderValue {
    HeaderValue::from_str(&http_date::format(t)).expect("ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut b = http::Response::builder().status(status);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn directive_names_are_case_insensitive_and_quotes_hold_commas() {
        let v = [HeaderValue::from_static(
            "No-CaChE=\"Foo, Bar\", MAX-AGE=60",
        )];
        assert_eq!(
            directives(&v),
            vec![
                ("no-cache".into(), Some("Foo, Bar".into())),
                ("max-age".into(), Some("60".into()))
            ]
        );
    }

    #[test]
    fn age_lists_and_invalid_expires_never_make_a_response_fresher() {
        let r = response(
            &resp(
                200,
                &[
                    ("age", "7200, 0"),
                    ("expires", "Thu, 18  Aug  2050 02:01:18 GMT"),
                ],
            ),
            &[],
        );
        assert_eq!(r.headers["age"], "7200");
        assert_eq!(r.headers["expires"], "Thu, 01 Jan 1970 00:00:00 GMT");
        let r = response(
            &resp(
                200,
                &[
                    ("age", "soon"),
                    ("expires", "Sunday, 06-Nov-94 08:49:37 GMT"),
                ],
            ),
            &[],
        );
        assert!(r.headers.get("age").is_none());
        assert_eq!(r.headers["expires"], "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn qualified_no_cache_and_private_drop_only_the_named_fields() {
        let r = response(
            &resp(
                200,
                &[
                    (
                        "cache-control",
                        "no-cache=\"X-Secret\", private=\"set-cookie\", max-age=60",
                    ),
                    ("x-secret", "1"),
                    ("set-cookie", "a=b"),
                    ("x-kept", "1"),
                ],
            ),
            &[],
        );
        assert_eq!(r.headers["cache-control"], "max-age=60");
        assert!(r.headers.get("x-secret").is_none() && r.headers.get("set-cookie").is_none());
        assert_eq!(r.headers["x-kept"], "1");
    }

    #[test]
    fn targeted_fields_win_in_precedence_order() {
        let targeted = [
            HeaderName::from_static("quicar-cache-control"),
            HeaderName::from_static("cdn-cache-control"),
        ];
        let r = response(
            &resp(
                200,
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=5"),
                    ("quicar-cache-control", "max-age=60"),
                ],
            ),
            &targeted,
        );
        assert_eq!(r.headers["cache-control"], "max-age=60");
        let r = response(
            &resp(
                200,
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=5"),
                ],
            ),
            &targeted,
        );
        assert_eq!(r.headers["cache-control"], "max-age=5");
    }

    #[test]
    fn final_statuses_with_explicit_freshness_are_judged_storable() {
        assert_eq!(
            response(&resp(500, &[("cache-control", "max-age=60")]), &[]).status,
            200
        );
        assert_eq!(
            response(
                &resp(299, &[("expires", "Sun, 06 Nov 2094 08:49:37 GMT")]),
                &[]
            )
            .status,
            200
        );
        assert_eq!(response(&resp(500, &[]), &[]).status, 500);
        assert_eq!(
            response(&resp(206, &[("cache-control", "max-age=60")]), &[]).status,
            206
        );
        assert_eq!(
            response(&resp(304, &[("cache-control", "max-age=60")]), &[]).status,
            304
        );
    }

    #[test]
    fn list_fields_match_whatever_their_order_and_spacing() {
        let a = http::Request::get("/")
            .header("accept-encoding", "gzip,  br")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let b = http::Request::get("/")
            .header("accept-encoding", "br, gzip")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            request(&a).headers["accept-encoding"],
            request(&b).headers["accept-encoding"]
        );
    }
}
