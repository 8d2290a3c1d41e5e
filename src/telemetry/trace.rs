//! W3C trace context: validate a `traceparent`, start one when the app sent none, so the
//! access logs of both sidecars join on the trace id.

/// W3C trace context: the trace id of a valid `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

/// Keeps a valid W3C `traceparent` (and its `tracestate`) or starts a trace, so the logs of
/// both sidecars join on the trace id. Returns the `traceparent` that goes on (borrowed: a
/// copy costs an allocation, and only the access log wants one).
pub fn ensure_traceparent(headers: &mut http::HeaderMap) -> &http::HeaderValue {
    use http::header::Entry;
    // Exactly one, and valid: two `traceparent` fields name no one trace (W3C Trace Context
    // §3.2), and each hop would read a different one.
    fn valid<'a>(mut given: impl Iterator<Item = &'a http::HeaderValue>) -> bool {
        match (given.next(), given.next()) {
            (Some(v), None) => v.to_str().ok().and_then(trace_id).is_some(),
            _ => false,
        }
    }
    let new = || http::HeaderValue::from_bytes(&traceparent_bytes()).expect("hex");
    // A `tracestate` (looked for by name: a scan of a few names costs less than a hash) must
    // go if the trace restarts: tracestate without its traceparent means nothing.
    let tp = if headers.keys().any(|k| k == crate::headers::TRACESTATE) {
        if !valid(headers.get_all(crate::headers::TRACEPARENT).iter()) {
            headers.remove(crate::headers::TRACESTATE);
            // `insert` replaces every value.
            headers.insert(crate::headers::TRACEPARENT, new());
        }
        headers
            .get_mut(crate::headers::TRACEPARENT)
            .expect("kept or just inserted")
    } else {
        // One lookup for a request with no `traceparent` (most) or a valid one.
        match headers.entry(crate::headers::TRACEPARENT) {
            Entry::Occupied(mut given) => {
                if !valid(given.iter()) {
                    given.insert(new());
                }
                given.into_mut()
            }
            Entry::Vacant(none) => none.insert(new()),
        }
    };
    // Unique to its request: the TCP transport's HPACK sends it as a literal never indexed,
    // instead of adding it to both sidecars' tables, where each new one evicts fields that
    // do recur (authority, deadline). Measured with `benches/callgrind_pair.sh`: 2k fewer
    // instructions per request on the calling sidecar. HTTP/3's QPACK (stateless) ignores it.
    tp.set_sensitive(true);
    tp
}

/// A new `traceparent` (version 00, sampled) with random trace and span ids.
pub fn new_traceparent() -> String {
    String::from_utf8_lossy(&traceparent_bytes()).into_owned()
}

/// `new_traceparent`'s 55 bytes, written in place (the request path makes its header value
/// from them without a `String` grown a character at a time).
fn traceparent_bytes() -> [u8; 55] {
    // A byte's two hex digits in one lookup.
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [HEX[i >> 4], HEX[i & 0xf]];
            i += 1;
        }
        t
    };
    let mut out = *b"00-................................-................-01";
    // Trace and span ids need to be unique, not secret: a per-thread generator seeded once
    // from the system RNG (a `getrandom` call per request cost ~4 % of a request).
    let (trace, span) = out.split_at_mut(36);
    for digits in [&mut trace[3..35], &mut span[..16]] {
        for pair in digits.chunks_exact_mut(16) {
            let word = crate::rng::random_u64();
            for (i, hex) in pair.chunks_exact_mut(2).enumerate() {
                hex.copy_from_slice(&PAIRS[usize::from((word >> (i * 8)) as u8)]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_traceparents_are_valid_and_distinct() {
        let a: std::collections::HashSet<String> = (0..1000).map(|_| new_traceparent()).collect();
        assert_eq!(a.len(), 1000);
        for tp in &a {
            assert!(trace_id(tp).is_some(), "{tp}");
            assert_eq!(tp.len(), 55);
        }
    }

    #[test]
    fn traceparent_validation() {
        let tp = new_traceparent();
        assert!(trace_id(&tp).is_some(), "{tp}");
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(trace_id(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn ensure_keeps_a_valid_trace_and_restarts_a_forged_one() {
        use crate::headers::{TRACEPARENT, TRACESTATE};
        use http::{HeaderMap, HeaderValue};
        // None given: one is made, and what is returned is what goes on.
        let mut h = HeaderMap::new();
        let made = ensure_traceparent(&mut h).clone();
        assert!(trace_id(made.to_str().unwrap()).is_some(), "{made:?}");
        assert_eq!(h.get(TRACEPARENT), Some(&made));
        // A valid one stays, with its tracestate.
        let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(given));
        h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
        assert_eq!(ensure_traceparent(&mut h), given);
        assert_eq!(h.get(TRACESTATE).unwrap(), "vendor=1");
        // Made or kept, it is marked never to be indexed by HPACK; tracestate (which recurs)
        // is not.
        assert!(made.is_sensitive() && h.get(TRACEPARENT).unwrap().is_sensitive());
        assert!(!h.get(TRACESTATE).unwrap().is_sensitive());
        // Without a tracestate too (the one-lookup path).
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_static(given));
        assert_eq!(ensure_traceparent(&mut h), given);
        assert!(h.get(TRACEPARENT).unwrap().is_sensitive());
        // A forged one (invalid, or two of them) is replaced, and its tracestate goes with it.
        for (forged, state) in [
            (&["garbage"][..], true),
            (&[given, given][..], true),
            (&["garbage"][..], false),
            (&[given, given][..], false),
        ] {
            let mut h = HeaderMap::new();
            for v in forged {
                h.append(TRACEPARENT, HeaderValue::from_static(v));
            }
            if state {
                h.insert(TRACESTATE, HeaderValue::from_static("vendor=1"));
            }
            let new = ensure_traceparent(&mut h).clone();
            assert!(trace_id(new.to_str().unwrap()).is_some(), "{new:?}");
            assert_ne!(new, given);
            assert!(new.is_sensitive());
            assert_eq!(
                h.get_all(TRACEPARENT).iter().collect::<Vec<_>>(),
                [&new],
                "{h:?}"
            );
            assert!(h.get(TRACESTATE).is_none(), "{h:?}");
        }
    }
}
