//! Header rules shared by both hops: hop-by-hop removal, `quicar-*` control headers (stripped
//! from what apps send, written from the sidecar's typed facts at the edges), and how a Host or
//! `:authority` names a service.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::error::ErrorKind;
use crate::facts::{CacheOutcome, Transport};

/// Room for the fields a sidecar adds to a head it parsed (trace context, request id, deadline,
/// facts), so that adding them never regrows (and rehashes) the map.
pub(crate) const ADDED_FIELDS: usize = 6;

// Names as `HeaderName` constants: a `&str` name is parsed and validated on every lookup.

/// On every response the sidecar generates itself.
pub(crate) const QUICAR_ERROR: HeaderName = HeaderName::from_static("quicar-error");
/// Set by the inbound sidecar for its app: the caller's SPIFFE ID, from its certificate.
pub(crate) const PEER_IDENTITY: HeaderName = HeaderName::from_static("quicar-peer-identity");

/// To the calling app: how the response cache answered.
pub(crate) const CACHE: HeaderName = HeaderName::from_static("quicar-cache");
/// To the calling app: the transport its request crossed (`quic` or `tcp`).
pub(crate) const TRANSPORT: HeaderName = HeaderName::from_static("quicar-transport");
/// From the outbound to the inbound sidecar: milliseconds left of the caller's deadline. The
/// inbound sidecar gives the local app no longer than that.
pub(crate) const DEADLINE: HeaderName = HeaderName::from_static("quicar-deadline");
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The non-standard names a sidecar puts on most requests it sends to another: received field
/// sections parse them without an allocation each (`h3::intern_field_names`,
/// `h2::intern_field_names`).
pub(crate) static WIRE_NAMES: [HeaderName; 3] = [TRACEPARENT, TRACESTATE, DEADLINE];

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the non-standard ones proxies also drop.
const HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name) || name.as_str().starts_with("proxy-")
}

/// Removes `name` when present. The names are scanned first: comparing a handful of names
/// costs less than hashing one, and the fields removed this way are nearly always absent.
pub(crate) fn remove_if_present(headers: &mut HeaderMap, name: &HeaderName) {
    if headers.keys().any(|k| k == name) {
        headers.remove(name);
    }
}

/// Drops hop-by-hop headers, including every header named in `Connection`.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names, no removals (each `remove` hashes).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // `keep-alive` and `close`, the usual tokens, name nothing that is not dropped below.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let listed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k))
        .cloned()
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

/// Whether any `quicar-*` field is in `headers` (nearly never from an app): one pass over the
/// names, no lookup.
pub(crate) fn has_quicar(headers: &HeaderMap) -> bool {
    headers.keys().any(is_quicar)
}

/// Whether `name` is one of the sidecars' (`quicar-*`).
pub(crate) fn is_quicar(name: &HeaderName) -> bool {
    name.as_str().starts_with("quicar-")
}

/// The caller's remaining budget (`quicar-deadline`, in milliseconds), read where it is: one
/// walk of the fields, which are few, costs less than hashing the name to look it up.
pub(crate) fn deadline_of(headers: &HeaderMap) -> Option<std::time::Duration> {
    let (_, value) = headers.iter().find(|(name, _)| **name == DEADLINE)?;
    let millis = value.to_str().ok()?.parse::<u64>().ok()?;
    Some(std::time::Duration::from_millis(millis))
}

/// Drops every `quicar-*` header, so that no app can forge identity or control headers.
pub(crate) fn strip_quicar(headers: &mut HeaderMap) {
    if !has_quicar(headers) {
        return;
    }
    let ours: Vec<HeaderName> = headers.keys().filter(|k| is_quicar(k)).cloned().collect();
    for name in ours {
        headers.remove(name);
    }
}

/// The error kind a peer sidecar wrote, when it is one of ours (anything else is ignored: a
/// value that is not in the closed set never becomes a label).
pub(crate) fn error_kind(headers: &HeaderMap) -> Option<ErrorKind> {
    headers
        .get(QUICAR_ERROR)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorKind::parse)
}

/// Edge toward a peer sidecar: the response's error kind (if the sidecar made it) as
/// `quicar-error`.
pub(crate) fn write_error_kind(parts: &mut http::response::Parts) {
    if let Some(kind) = parts.extensions.get::<ErrorKind>() {
        parts
            .headers
            .insert(QUICAR_ERROR, HeaderValue::from_static(kind.as_str()));
    }
}

/// Edge toward the calling app: the sidecars' facts about the response as `quicar-error`,
/// `quicar-cache` and `quicar-transport` (`transport`: when enabled, the wire that carried the
/// response). Nothing else `quicar-*` is left: the transport stripped what the peer sent.
pub(crate) fn write_facts(parts: &mut http::response::Parts, transport: Option<Transport>) {
    // Meant for quicar caches only (the cache step has read it).
    remove_if_present(&mut parts.headers, &CACHE_CONTROL_TARGETED_NAME);
    write_error_kind(parts);
    if let Some(how) = parts.extensions.get::<CacheOutcome>() {
        parts
            .headers
            .insert(CACHE, HeaderValue::from_static(how.as_str()));
    }
    if let Some(t) = transport {
        parts
            .headers
            .insert(TRANSPORT, HeaderValue::from_static(t.as_str()));
    }
}

/// The one `quicar-*` field an app may send on a response: its targeted cache directive for
/// quicar caches (RFC 9213). It crosses both sidecars and is removed at the calling app's edge.
pub(crate) const CACHE_CONTROL_TARGETED: &str = "quicar-cache-control";
const CACHE_CONTROL_TARGETED_NAME: HeaderName = HeaderName::from_static(CACHE_CONTROL_TARGETED);

/// Like `strip_quicar`, for responses: keeps the app's targeted cache directive.
pub(crate) fn strip_quicar_from_response(headers: &mut HeaderMap) {
    if !has_quicar(headers) {
        return;
    }
    let ours: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_quicar(k) && k.as_str() != CACHE_CONTROL_TARGETED)
        .cloned()
        .collect();
    for name in ours {
        headers.remove(name);
    }
}

/// The service an authority names: the host without port, lower-cased. `None` when it is not a
/// plausible host name (the caller answers 400).
pub(crate) fn service_of_authority(authority: &str) -> Option<std::borrow::Cow<'_, str>> {
    // One pass over bytes (it runs twice per request on each sidecar): a port is the digits
    // after the last ':'. A host holding ':' or ']' (an IPv6 literal) is not a name, so a
    // colon followed by anything but digits leaves no service.
    let bytes = authority.as_bytes();
    let mut end = match bytes.iter().rposition(|&b| b == b':') {
        Some(colon) if bytes[colon + 1..].iter().all(u8::is_ascii_digit) => colon,
        Some(_) => return None,
        None => bytes.len(),
    };
    while end > 0 && bytes[end - 1] == b'.' {
        end -= 1;
    }
    if end == 0 || end > 253 {
        return None;
    }
    let mut upper = false;
    for &b in &bytes[..end] {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' => {}
            b'A'..=b'Z' => upper = true,
            _ => return None,
        }
    }
    // ASCII only, so `end` is a char boundary. Borrowed when it is lower-case already (nearly
    // always): no allocation per request.
    let host = &authority[..end];
    Some(if upper {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("proxy-foo", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.append("x-kept", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h.get_all("x-kept").iter().count(), 2);
    }

    #[test]
    fn each_hop_by_hop_header_goes_even_without_connection() {
        for name in [
            "te",
            "upgrade",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "transfer-encoding",
            "proxy-x",
        ] {
            let mut h = HeaderMap::new();
            h.insert("x-kept", HeaderValue::from_static("1"));
            h.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name}: {h:?}");
            assert!(h.contains_key("x-kept"));
        }
        // Nor does a name that only begins like one, or is `Trailer` (end-to-end).
        let mut none = HeaderMap::new();
        for name in [
            "x-a",
            "content-type",
            "connections",
            "cookie",
            "keep-alive-x",
            "proxy",
            "tea",
            "trailer",
            "traceparent",
            "upgrade-insecure-requests",
        ] {
            none.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        strip_hop_by_hop(&mut none);
        assert_eq!(none.len(), 10, "{none:?}");
    }

    #[test]
    fn quicar_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "quicar-peer-identity",
            HeaderValue::from_static("spiffe://x/y"),
        );
        h.insert("Quicar-Error", HeaderValue::from_static("denied"));
        h.insert("quicarx", HeaderValue::from_static("kept"));
        strip_quicar(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn authority_to_service() {
        assert_eq!(
            service_of_authority("Orders:8080").as_deref(),
            Some("orders")
        );
        assert_eq!(service_of_authority("orders").as_deref(), Some("orders"));
        assert_eq!(
            service_of_authority("orders.ns.svc.").as_deref(),
            Some("orders.ns.svc")
        );
        assert_eq!(service_of_authority("[::1]:80"), None);
        assert_eq!(service_of_authority("bad host"), None);
        assert_eq!(service_of_authority(""), None);
        // A port is digits after the last colon, and only that; a name holds no colon.
        assert_eq!(service_of_authority("orders:").as_deref(), Some("orders"));
        assert_eq!(
            service_of_authority("orders.:80").as_deref(),
            Some("orders")
        );
        for bad in [
            "a:b:80",
            "orders:80x",
            "orders:-1",
            "[::1]",
            "::",
            ".:80",
            "é:80",
        ] {
            assert_eq!(service_of_authority(bad), None, "{bad}");
        }
        assert_eq!(
            service_of_authority(&"a".repeat(253)).map(|s| s.len()),
            Some(253)
        );
        assert_eq!(service_of_authority(&"a".repeat(254)), None);
        // Upper case is folded without changing what the name is.
        assert_eq!(
            service_of_authority("Orders_V2.NS:1").as_deref(),
            Some("orders_v2.ns")
        );
    }
}
