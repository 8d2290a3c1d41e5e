//! A hostile peer on the HTTP/3 and HTTP/2 wires: a real `quicar run` process takes malformed
//! request streams, bad unidirectional streams (HTTP/3) and random bytes from a peer with a
//! valid identity, and must answer each (a response, a stream reset or a connection close,
//! never a hang), never hand a malformed head to its app, never panic, and go on serving.

use std::time::Duration;

use crate::process;
use crate::support::*;

/// `x` as an HTTP/3 frame: type, length, payload (lengths under 64 here: one byte).
fn frame(ty: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 64);
    let mut out = vec![ty, payload.len() as u8];
    out.extend_from_slice(payload);
    out
}

/// A HEADERS frame holding `fields` after a QPACK prefix with no dynamic table.
fn headers(fields: &[&[u8]]) -> Vec<u8> {
    let mut section = vec![0x00, 0x00];
    for f in fields {
        section.extend_from_slice(f);
    }
    frame(0x01, &section)
}

// QPACK field lines (RFC 9204): static-table indexes, and literals.
const GET: &[u8] = &[0xd1]; // :method GET (17)
const POST: &[u8] = &[0xd4]; // :method POST (20)
const CONNECT: &[u8] = &[0xcf]; // :method CONNECT (15)
const HTTPS: &[u8] = &[0xd7]; // :scheme https (23)
const ROOT: &[u8] = &[0xc1]; // :path / (1)
const HELLO: &[u8] = &[0x50, 5, b'h', b'e', b'l', b'l', b'o']; // :authority hello
const LENGTH_1: &[u8] = &[0x54, 1, b'1']; // content-length: 1
const LENGTH_5: &[u8] = &[0x54, 1, b'5']; // content-length: 5

/// A literal field line with a literal name (RFC 9204 §4.5.6; names and values under 135 and
/// 127 bytes here), not Huffman-coded.
fn literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = if name.len() < 7 {
        vec![0x20 | name.len() as u8]
    } else {
        vec![0x27, (name.len() - 7) as u8]
    };
    out.extend_from_slice(name);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
    out
}

/// A well-formed `GET https://hello/`.
pub(crate) fn get() -> Vec<u8> {
    headers(&[GET, HTTPS, ROOT, HELLO])
}

/// A well-formed `POST https://hello/` head (no length: a body of any size may follow).
pub(crate) fn post() -> Vec<u8> {
    headers(&[POST, HTTPS, ROOT, HELLO])
}

/// Each malformed request stream, and whether its head is well-formed (so the app may see it).
fn bad_request_streams() -> Vec<(&'static str, Vec<u8>, bool)> {
    let cat = |parts: &[Vec<u8>]| parts.concat();
    vec![
        ("an empty stream", vec![], false),
        ("DATA before HEADERS", frame(0x00, b"abc"), false),
        ("HEADERS cut short", vec![0x01, 12, 0, 0, 0xd1], false),
        ("HEADERS with nothing in it", frame(0x01, &[]), false),
        ("a QPACK prefix and no fields", headers(&[]), false),
        (
            "a dynamic-table reference",
            frame(0x01, &[0x02, 0x00, 0x80]),
            false,
        ),
        (
            "a static index past the table",
            headers(&[&[0xff, 0xff, 0xff, 0x7f]]),
            false,
        ),
        (
            "a prefix integer that overflows",
            headers(&[&[
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ]]),
            false,
        ),
        ("no :method", headers(&[HTTPS, ROOT, HELLO]), false),
        ("no :path", headers(&[GET, HTTPS, HELLO]), false),
        (
            "a :path without a slash",
            headers(&[GET, HTTPS, &[0x51, 1, b'x'], HELLO]),
            false,
        ),
        // RFC 9114 §4.2, as h2 refuses them (RFC 9113 §8.2.2).
        (
            "a connection-specific field",
            headers(&[GET, HTTPS, ROOT, HELLO, &literal(b"connection", b"close")]),
            false,
        ),
        (
            "a Keep-Alive field",
            headers(&[
                GET,
                HTTPS,
                ROOT,
                HELLO,
                &literal(b"keep-alive", b"timeout=5"),
            ]),
            false,
        ),
        (
            "a TE other than trailers",
            headers(&[GET, HTTPS, ROOT, HELLO, &literal(b"te", b"gzip")]),
            false,
        ),
        (
            "an uppercase field name",
            headers(&[GET, HTTPS, ROOT, HELLO, &[0x23, b'X', b'-', b'A', 1, b'1']]),
            false,
        ),
        (
            "a space in a field name",
            headers(&[GET, HTTPS, ROOT, HELLO, &[0x23, b'a', b' ', b'b', 1, b'1']]),
            false,
        ),
        (
            "CR LF in a field value",
            headers(&[
                GET,
                HTTPS,
                ROOT,
                HELLO,
                &[
                    0x23, b'x', b'-', b'a', 7, b'a', b'\r', b'\n', b'b', b':', b' ', b'c',
                ],
            ]),
            false,
        ),
        (
            "a Huffman string that does not decode",
            headers(&[GET, HTTPS, ROOT, &[0x50, 0x83, 0xff, 0xff, 0xff]]),
            false,
        ),
        (
            "a pseudo-header after a regular field",
            headers(&[&[0x23, b'x', b'-', b'a', 1, b'1'], GET, HTTPS, ROOT, HELLO]),
            false,
        ),
        (
            "an unknown pseudo-header",
            headers(&[
                GET,
                HTTPS,
                ROOT,
                HELLO,
                &[0x24, b':', b'f', b'o', b'o', 1, b'1'],
            ]),
            false,
        ),
        (
            "two :method fields",
            headers(&[GET, POST, HTTPS, ROOT, HELLO]),
            false,
        ),
        ("CONNECT with nothing else", headers(&[CONNECT]), false),
        (
            "a frame length past 2^62",
            vec![0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            false,
        ),
        (
            "SETTINGS on a request stream",
            cat(&[frame(0x04, &[]), get()]),
            false,
        ),
        ("GOAWAY on a request stream", frame(0x07, &[0]), false),
        ("an HTTP/2 frame type", frame(0x02, &[]), false),
        (
            "two different Content-Lengths",
            headers(&[POST, HTTPS, ROOT, HELLO, LENGTH_1, LENGTH_5]),
            false,
        ),
        (
            "a body past its Content-Length",
            cat(&[
                headers(&[POST, HTTPS, ROOT, HELLO, LENGTH_1]),
                frame(0x00, b"abcde"),
            ]),
            true,
        ),
        (
            "a body short of its Content-Length",
            cat(&[
                headers(&[POST, HTTPS, ROOT, HELLO, LENGTH_5]),
                frame(0x00, b"a"),
            ]),
            true,
        ),
        (
            "DATA after trailers",
            cat(&[
                headers(&[POST, HTTPS, ROOT, HELLO]),
                frame(0x00, b"a"),
                headers(&[&[0x23, b'x', b'-', b'a', 1, b'1']]),
                frame(0x00, b"b"),
            ]),
            true,
        ),
    ]
}

/// Bad unidirectional streams (type byte first).
fn bad_uni_streams() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let settings = [vec![0x00], frame(0x04, &[])].concat();
    vec![
        (
            "two control streams",
            vec![settings.clone(), settings.clone()],
        ),
        (
            "a control stream that does not start with SETTINGS",
            vec![[vec![0x00], frame(0x07, &[0])].concat()],
        ),
        (
            "DATA on the control stream",
            vec![[settings.clone(), frame(0x00, b"abc")].concat()],
        ),
        ("a push stream from a client", vec![vec![0x01, 0x00]]),
        (
            "a QPACK insert into a table of no capacity",
            vec![vec![0x02, 0xc0, 0x01, b'a']],
        ),
        (
            "a QPACK decoder stream with garbage",
            vec![vec![0x03, 0xff, 0xff, 0xff]],
        ),
        ("an unknown stream type", vec![vec![0x21, 0xaa, 0xbb, 0xcc]]),
        ("a control stream closed", vec![vec![0x00]]),
    ]
}

/// What became of one stream: a response head's status byte, a reset, a close, or nothing.
async fn outcome(conn: &quinn::Connection, bytes: &[u8]) -> String {
    let attempt = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        // The sidecar may reset or close before it has read everything; that is an outcome.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        let resp = recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(match first_field_line(&resp) {
            Some(0xd9) => "200".to_string(),
            Some(b) => format!("a response ({b:#x})"),
            None => format!("{} bytes", resp.len()),
        })
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(what)) | Ok(Err(what)) => what,
        Err(_) => "no answer in 10 s".to_string(),
    }
}

/// The first field line's first byte of a response's HEADERS frame (`0xd9` is `:status 200`).
pub(crate) fn first_field_line(resp: &[u8]) -> Option<u8> {
    if resp.first() != Some(&0x01) {
        return None;
    }
    let len_bytes = 1usize << (resp.get(1)? >> 6);
    // Type, length, then the two-byte QPACK prefix.
    resp.get(1 + len_bytes + 2).copied()
}

/// A xorshift generator from `seed`, so a failure found by random input can be replayed.
fn seeded(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// Random streams from a fixed seed, so a failure can be replayed: a third raw bytes, a third
/// a HEADERS frame of random field lines (for the QPACK and field parsers), a third a
/// well-formed GET with one byte of its field section changed.
fn garbage(seed: u64, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut next = seeded(seed);
    (0..n)
        .map(|i| {
            let bytes = match i % 3 {
                0 => (0..next() % 200).map(|_| next() as u8).collect(),
                1 => {
                    let lines: Vec<u8> = (0..next() % 60).map(|_| next() as u8).collect();
                    headers(&[&lines])
                }
                _ => {
                    let mut head = get();
                    let at = 4 + (next() as usize) % (head.len() - 4);
                    head[at] = next() as u8;
                    head
                }
            };
            (format!("random stream {i} (seed {seed:#x})"), bytes)
        })
        .collect()
}

/// The end of a hostile run: the process is still up, no task of it panicked (its stderr),
/// and nothing was recorded in `failures`.
fn still_serving_without_panics(mut server: process::Sidecar, failures: &[String]) {
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the sidecar exited"
    );
    let panics = server.panics.lock().unwrap().clone();
    assert!(panics.is_empty(), "{panics:#?}");
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_http3_peer_gets_answers_and_the_sidecar_goes_on_serving() {
    init_tracing();
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let server = process::run(
        &pki,
        "server",
        &server_toml(&pki, upstream.addr, "127.0.0.1:0", ""),
    );
    let mut failures = Vec::new();

    // A well-formed request, and one behind a frame of an unknown (reserved) type, which
    // RFC 9114 §9 says to ignore: both served.
    for (name, bytes) in [
        ("a well-formed GET", get()),
        (
            "an unknown frame type before HEADERS",
            [frame(0x21, &[0xaa, 0xbb]), get()].concat(),
        ),
    ] {
        let (_endpoint, conn) = h3_caller(&pki, server.inbound).await;
        let got = outcome(&conn, &bytes).await;
        if got != "200" {
            failures.push(format!("{name}: {got}, not 200"));
        }
    }
    let served = upstream.count();
    assert_eq!(served, 2, "{failures:?}");

    // A peer's own `TE: trailers` (allowed) never reaches the app beside the sidecar's: the app
    // sees it once, named once in `Connection`.
    let forged = headers(&[GET, HTTPS, ROOT, HELLO, &literal(b"te", b"trailers")]);
    let (_endpoint, conn) = h3_caller(&pki, server.inbound).await;
    assert_eq!(outcome(&conn, &forged).await, "200", "{failures:?}");
    let seen = upstream.last();
    assert_eq!(values(&seen.headers, "te"), vec!["trailers"]);
    assert_eq!(values(&seen.headers, "connection"), vec!["te"]);

    // Malformed request streams, each on its own connection (some are connection errors).
    for (name, bytes, well_formed_head) in bad_request_streams() {
        let (_endpoint, conn) = h3_caller(&pki, server.inbound).await;
        let before = upstream.count();
        let got = outcome(&conn, &bytes).await;
        if got == "200" || got.starts_with("no answer") {
            failures.push(format!("{name}: {got}"));
        }
        if !well_formed_head && upstream.count() > before {
            failures.push(format!("{name}: reached the app"));
        }
    }

    // Bad unidirectional streams: the connection then serves or closes, never hangs.
    for (name, streams) in bad_uni_streams() {
        let (_endpoint, conn) = h3_caller(&pki, server.inbound).await;
        for bytes in streams {
            if let Ok(mut uni) = conn.open_uni().await {
                let _ = uni.write_all(&bytes).await;
                let _ = uni.finish();
            }
        }
        let got = outcome(&conn, &get()).await;
        if got.starts_with("no answer") {
            failures.push(format!("{name}: {got}"));
        }
    }

    // Random bytes, many streams on one connection (a new one when a stream closes it).
    let (mut _endpoint, mut conn) = h3_caller(&pki, server.inbound).await;
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for (name, bytes) in garbage(0x9e37_79b9_7f4a_7c15, 150) {
        if conn.close_reason().is_some() {
            (_endpoint, conn) = h3_caller(&pki, server.inbound).await;
        }
        let got = outcome(&conn, &bytes).await;
        *seen.entry(got.clone()).or_default() += 1;
        if got.starts_with("no answer") {
            failures.push(format!("{name} {bytes:x?}: {got}"));
        }
    }

    eprintln!("random streams' outcomes: {seen:#?}");

    // Still alive, no task panicked, and a new connection is served.
    let (_endpoint, conn) = h3_caller(&pki, server.inbound).await;
    assert_eq!(outcome(&conn, &get()).await, "200", "{failures:?}");
    still_serving_without_panics(server, &failures);
}

/// An HTTP/2 frame: length, type, flags, stream.
fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[ty, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

// HPACK field representations (RFC 7541): static-table indexes, and literals not indexed.
const H2_GET: &[u8] = &[0x82]; // :method GET (2)
const H2_POST: &[u8] = &[0x83]; // :method POST (3)
const H2_ROOT: &[u8] = &[0x84]; // :path / (4)
const H2_HTTPS: &[u8] = &[0x87]; // :scheme https (7)
const H2_HELLO: &[u8] = &[0x01, 5, b'h', b'e', b'l', b'l', b'o']; // :authority hello
const H2_LENGTH_1: &[u8] = &[0x0f, 0x0d, 1, b'1']; // content-length: 1 (index 28)

/// A literal field with a new name, not indexed.
fn h2_field(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00, name.len() as u8];
    out.extend_from_slice(name);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
    out
}

/// HEADERS on `stream` holding `fields` whole (END_HEADERS), and END_STREAM when `end`.
fn h2_headers(stream: u32, end: bool, fields: &[&[u8]]) -> Vec<u8> {
    h2_frame(0x01, 0x04 | u8::from(end), stream, &fields.concat())
}

/// Each malformed request (RFC 9113 §8.1.1, §8.2, §8.3) as the frames after the preface, on
/// stream 1, and whether its head is well-formed (so the app may see it).
fn h2_bad_requests() -> Vec<(&'static str, Vec<u8>, bool)> {
    let upper = h2_field(b"X-A", b"1");
    // A name the decoder takes from its interned set when spelled in lowercase
    // (`h2::intern_field_names`): another spelling is parsed, and refused, as any other.
    let upper_interned = h2_field(b"Traceparent", b"1");
    let connection = h2_field(b"connection", b"close");
    let te = h2_field(b"te", b"gzip");
    let crlf = h2_field(b"x-a", b"a\r\nb: c");
    let unknown = h2_field(b":foo", b"1");
    let regular = h2_field(b"x-a", b"1");
    let other = [0x01, 7, b'n', b'o', b'-', b's', b'u', b'c', b'h'];
    // `GET https://hello/` with one more field line.
    let get_with =
        |field: &[u8]| h2_headers(1, true, &[H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO, field]);
    vec![
        (
            "no :path",
            h2_headers(1, true, &[H2_GET, H2_HTTPS, H2_HELLO]),
            false,
        ),
        (
            "no :method",
            h2_headers(1, true, &[H2_HTTPS, H2_ROOT, H2_HELLO]),
            false,
        ),
        (
            "two :method fields",
            h2_headers(1, true, &[H2_GET, H2_POST, H2_HTTPS, H2_ROOT, H2_HELLO]),
            false,
        ),
        (
            "a pseudo-header after a regular field",
            h2_headers(1, true, &[&regular, H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO]),
            false,
        ),
        ("an unknown pseudo-header", get_with(&unknown), false),
        ("an uppercase field name", get_with(&upper), false),
        (
            "an uppercase spelling of an interned name",
            get_with(&upper_interned),
            false,
        ),
        ("a connection-specific field", get_with(&connection), false),
        ("TE other than trailers", get_with(&te), false),
        ("CR LF in a field value", get_with(&crlf), false),
        (
            "an authority that names no service here",
            h2_headers(1, true, &[H2_GET, H2_HTTPS, H2_ROOT, &other]),
            false,
        ),
        (
            "a static index past the table",
            get_with(&[0xff, 0x7f]),
            false,
        ),
        (
            "a body past its Content-Length",
            [
                h2_headers(
                    1,
                    false,
                    &[H2_POST, H2_HTTPS, H2_ROOT, H2_HELLO, H2_LENGTH_1],
                ),
                h2_frame(0x00, 0x01, 1, b"abcde"),
            ]
            .concat(),
            true,
        ),
        (
            "a body short of its Content-Length",
            [
                h2_headers(
                    1,
                    false,
                    &[H2_POST, H2_HTTPS, H2_ROOT, H2_HELLO, H2_LENGTH_1],
                ),
                h2_frame(0x00, 0x01, 1, b""),
            ]
            .concat(),
            true,
        ),
        (
            "HEADERS on stream 0",
            h2_headers(0, true, &[H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO]),
            false,
        ),
        (
            "HEADERS on an even (server) stream",
            h2_headers(2, true, &[H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO]),
            false,
        ),
        (
            "DATA on an idle stream",
            h2_frame(0x00, 0x01, 1, b"abc"),
            false,
        ),
        (
            "a CONTINUATION with no HEADERS before it",
            h2_frame(0x09, 0x04, 1, H2_GET),
            false,
        ),
        (
            "CONTINUATION frames past the field-section limit (64 KiB)",
            {
                let filler: Vec<u8> = (0..100)
                    .flat_map(|i| h2_field(format!("x-f{i}").as_bytes(), &[b'a'; 120]))
                    .collect();
                let mut frames = h2_frame(
                    0x01,
                    0x01,
                    1,
                    &[H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO].concat(),
                );
                for last in [false; 10].into_iter().chain([true]) {
                    frames.extend(h2_frame(0x09, if last { 0x04 } else { 0 }, 1, &filler));
                }
                frames
            },
            false,
        ),
        (
            "a frame longer than the largest frame size",
            h2_frame(0x00, 0x00, 1, &vec![0u8; 20_000]),
            false,
        ),
    ]
}

/// What became of a request on a new HTTP/2 connection: the status of its response, a stream
/// reset, a GOAWAY, a close, or nothing within 10 s.
async fn h2_outcome(pki: &Pki, inbound: std::net::SocketAddr, frames: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut tls = h2_tls(pki, inbound).await;
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(h2_frame(0x04, 0, 0, &[]));
        out.extend_from_slice(frames);
        // The sidecar may close before it has read everything; that is an outcome.
        let _ = tls.write_all(&out).await;
        let mut buf = Vec::new();
        loop {
            // Whole frames first.
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                let (ty, flags, stream) = (
                    buf[3],
                    buf[4],
                    u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff,
                );
                let payload = buf[9..9 + len].to_vec();
                buf.drain(..9 + len);
                match ty {
                    // The server's SETTINGS, acknowledged.
                    0x04 if flags & 1 == 0 => {
                        let _ = tls.write_all(&h2_frame(0x04, 0x01, 0, &[])).await;
                    }
                    // A response head: `:status` as the first field (indexed 200 is 0x88).
                    0x01 if stream != 0 => {
                        return match payload.first() {
                            Some(0x88) => "200".to_string(),
                            Some(b) => format!("a response ({b:#x})"),
                            None => "an empty head".to_string(),
                        }
                    }
                    0x03 => return format!("a reset ({:x?})", payload),
                    0x07 => return "a GOAWAY".to_string(),
                    _ => {}
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return "a close".to_string(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .unwrap_or_else(|_| "no answer in 10 s".to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_http2_peer_gets_answers_and_the_sidecar_goes_on_serving() {
    init_tracing();
    let pki = Pki::new();
    let upstream = Upstream::start().await;
    let server = process::run(
        &pki,
        "server",
        &server_toml(&pki, upstream.addr, "127.0.0.1:0", ""),
    );
    let inbound = server.inbound;
    let get = h2_headers(1, true, &[H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO]);
    assert_eq!(h2_outcome(&pki, inbound, &get).await, "200");
    assert_eq!(upstream.count(), 1);
    // Another stack's Huffman-coded literal decodes (only what quicar sends is raw): RFC 7541
    // C.4.1's "www.example.com".
    let mut huffman = vec![0x00, 6];
    huffman.extend_from_slice(b"x-huff");
    huffman.push(0x80 | 12);
    huffman.extend_from_slice(&[
        0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
    ]);
    let coded = h2_headers(1, true, &[H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO, &huffman]);
    assert_eq!(h2_outcome(&pki, inbound, &coded).await, "200");
    assert_eq!(
        values(&upstream.last().headers, "x-huff"),
        vec!["www.example.com"]
    );
    // A peer's own Host (another than its :authority) and TE never reach the app beside the
    // sidecar's: the app sees the service's name once, and `TE: trailers` once.
    let forged = [h2_field(b"host", b"admin"), h2_field(b"te", b"trailers")];
    let with_host = h2_headers(
        1,
        true,
        &[H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO, &forged[0], &forged[1]],
    );
    assert_eq!(h2_outcome(&pki, inbound, &with_host).await, "200");
    let seen = upstream.last();
    assert_eq!(values(&seen.headers, "host"), vec!["hello"]);
    assert_eq!(values(&seen.headers, "te"), vec!["trailers"]);
    assert_eq!(values(&seen.headers, "connection"), vec!["te"]);
    // A head split across HEADERS and CONTINUATION frames is joined and served.
    let split = [
        h2_frame(0x01, 0x01, 1, &[H2_GET, H2_HTTPS].concat()),
        h2_frame(0x09, 0x04, 1, &[H2_ROOT, H2_HELLO].concat()),
    ]
    .concat();
    assert_eq!(h2_outcome(&pki, inbound, &split).await, "200");
    let mut failures = Vec::new();

    for (name, frames, well_formed_head) in h2_bad_requests() {
        let before = upstream.count();
        let got = h2_outcome(&pki, inbound, &frames).await;
        eprintln!("{name}: {got}");
        if got == "200" || got.starts_with("no answer") {
            failures.push(format!("{name}: {got}"));
        }
        if !well_formed_head && upstream.count() > before {
            failures.push(format!("{name}: reached the app"));
        }
    }

    // Random field sections (for HPACK and the field checks), and well-formed heads with one
    // byte changed, from a fixed seed, each on its own connection.
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    let mut next = seeded(0x2545_f491_4f6c_dd1d);
    for i in 0..60 {
        let section: Vec<u8> = if i % 2 == 0 {
            (0..next() % 60).map(|_| next() as u8).collect()
        } else {
            let mut head = [H2_GET, H2_HTTPS, H2_ROOT, H2_HELLO].concat();
            let at = (next() as usize) % head.len();
            head[at] = next() as u8;
            head
        };
        let got = h2_outcome(&pki, inbound, &h2_frame(0x01, 0x05, 1, &section)).await;
        *seen.entry(got.clone()).or_default() += 1;
        if got.starts_with("no answer") {
            failures.push(format!("random head {i} {section:x?}: {got}"));
        }
    }
    eprintln!("random heads' outcomes: {seen:#?}");

    // Still alive, no task panicked, and a new connection is served.
    assert_eq!(h2_outcome(&pki, inbound, &get).await, "200", "{failures:?}");
    still_serving_without_panics(server, &failures);
}

/// Between sidecars on one host QUIC starts at 64 KiB datagrams (the route's MTU). A caller
/// that accepts less (another vendor's HTTP/3 stack says so in its `max_udp_payload_size`, as
/// small as QUIC's 1,200 bytes) must get none larger: a datagram over its limit would be cut
/// or dropped by its receiver, and the download would stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_takes_only_small_datagrams_gets_its_download_within_them() {
    const BYTES: usize = 4 << 20;
    let pair = Pair::start().await;
    for limit in [1200u16, 1350] {
        let mut config = quinn::EndpointConfig::default();
        config.max_udp_payload_size(limit).unwrap();
        let (_endpoint, conn) = h3_caller_with(&pair.pki, pair.server.inbound, config).await;
        let (mut send, driving) = h3_over(conn.clone()).await;
        let download = async {
            let req = http::Request::get(format!("https://hello/stream/{BYTES}"))
                .body(())
                .unwrap();
            let mut stream = send.send_request(req).await.unwrap();
            stream.finish().await.unwrap();
            assert_eq!(
                stream.recv_response().await.unwrap().status(),
                http::StatusCode::OK
            );
            let mut got = 0;
            while let Some(chunk) = stream.recv_data().await.unwrap() {
                got += bytes::Buf::remaining(&chunk);
            }
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(30), download)
            .await
            .expect("the download stalled");
        assert_eq!(got, BYTES, "at {limit} bytes");
        let rx = conn.stats().udp_rx;
        assert!(rx.bytes >= BYTES as u64, "{rx:?}");
        assert!(
            rx.bytes <= rx.datagrams * u64::from(limit),
            "datagrams over the caller's {limit} bytes: {rx:?}"
        );
        driving.abort();
    }
}
