//! HTTP/1.1 pieces both app edges share: quicar's server for the calling app
//! (`outbound/app_conn`) and its client to the local app (`inbound/local_app/h1`). Reading
//! into a buffer, the chunked transfer coding both ways, and the framing fields.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use tokio::io::{AsyncRead, AsyncWrite};

/// The most fields in one head or trailer section (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// A new read buffer's size.
const READ: usize = 16 * 1024;
/// The least room a read is given.
const MIN_READ: usize = 4 * 1024;
/// The longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;

/// The name of a field in an HTTP/1.1 head, as `HeaderName::from_bytes` gives it. An app and
/// its server send the same few names, spelled the same way, on every message, so each thread
/// keeps the names it parsed last in a small table, one per slot chosen by length and first
/// byte, with the bytes they were parsed from: the same bytes again cost one comparison and a
/// clone (a copy for a standard name, a reference count for another) instead of a parse,
/// about 120 instructions for a standard name and an allocation for another. Names longer
/// than `KEPT` bytes are always parsed. A name not there is parsed and takes its slot, so
/// ever-new names (a hostile app's) cost one comparison more each.
pub(crate) fn field_name(raw: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    const SLOTS: usize = 64;
    const KEPT: usize = 31;
    struct Seen {
        len: u8,
        raw: [u8; KEPT],
        name: HeaderName,
    }
    thread_local! {
        static SEEN: std::cell::RefCell<[Option<Seen>; SLOTS]> =
            const { std::cell::RefCell::new([const { None }; SLOTS]) };
    }
    let (Some(&first), true) = (raw.first(), raw.len() <= KEPT) else {
        return HeaderName::from_bytes(raw);
    };
    let slot = (raw.len().wrapping_mul(31) ^ usize::from(first)) % SLOTS;
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        if let Some(kept) = &seen[slot] {
            if &kept.raw[..usize::from(kept.len)] == raw {
                return Ok(kept.name.clone());
            }
        }
        let name = HeaderName::from_bytes(raw)?;
        let mut kept = [0; KEPT];
        kept[..raw.len()].copy_from_slice(raw);
        seen[slot] = Some(Seen {
            len: raw.len() as u8,
            raw: kept,
            name: name.clone(),
        });
        Ok(name)
    })
}

/// Reads once into `buf`: `Ok(true)` when bytes came, `Ok(false)` when the peer closed.
pub(crate) fn poll_fill<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<bool>> {
    // What was read before went on as shared `Bytes`, so growing the buffer means a new one:
    // the rest of the current one is used first, down to `MIN_READ`.
    if buf.capacity() - buf.len() < MIN_READ {
        buf.reserve(READ);
    }
    let n = ready!(tokio_util::io::poll_read_buf(Pin::new(io), cx, buf))?;
    Poll::Ready(Ok(n > 0))
}

/// Where `part`, a slice httparse parsed out of `head`, sits in it (so that a value can share
/// the head's bytes once they are frozen); a part that does not sit in it (an empty one need
/// not) is copied.
pub(crate) type Placed = Result<std::ops::Range<usize>, Bytes>;

pub(crate) fn place(head: &[u8], part: &[u8]) -> Placed {
    match (part.as_ptr() as usize).checked_sub(head.as_ptr() as usize) {
        Some(at) if at + part.len() <= head.len() => Ok(at..at + part.len()),
        _ => Err(Bytes::copy_from_slice(part)),
    }
}

/// The bytes of a placed part, out of the frozen head.
pub(crate) fn placed(head: &Bytes, at: Placed) -> Bytes {
    at.map_or_else(|own| own, |range| head.slice(range))
}

/// `name: value\r\n`.
pub(crate) fn put_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// `data` as one chunk of the chunked coding: size line, data, line end.
pub(crate) fn chunk(data: Bytes) -> [Bytes; 3] {
    [
        Bytes::from(format!("{:x}\r\n", data.len())),
        data,
        Bytes::from_static(b"\r\n"),
    ]
}

/// `content-length: n\r\n` (without `fmt`, a tenth of its cost).
pub(crate) fn put_length(out: &mut Vec<u8>, n: u64) {
    put_number(out, b"content-length: ", n);
}

/// A field line whose value ends in a decimal number: `prefix` (the name, `: ` and any text
/// before the number), then `n`.
///
/// The line is put together on the stack and added in one piece: three additions to `out`
/// cost every response a hundred instructions (each checks the room and calls `memcpy`).
#[inline]
pub(crate) fn put_number(out: &mut Vec<u8>, prefix: &[u8], n: u64) {
    // The prefixes are a field name and `: ` (and `timeout=`); 20 digits, CRLF.
    let mut line = [0u8; 64];
    let mut at = line.len() - 2;
    line[at..].copy_from_slice(b"\r\n");
    let mut n = n;
    loop {
        at -= 1;
        line[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    match at.checked_sub(prefix.len()) {
        Some(start) => {
            line[start..at].copy_from_slice(prefix);
            out.extend_from_slice(&line[start..]);
        }
        None => {
            out.extend_from_slice(prefix);
            out.extend_from_slice(&line[at..]);
        }
    }
}

/// The last chunk, with the trailer section if any.
pub(crate) fn last_chunk(trailers: Option<&HeaderMap>) -> Bytes {
    let Some(trailers) = trailers.filter(|t| !t.is_empty()) else {
        return Bytes::from_static(b"0\r\n\r\n");
    };
    let mut last = b"0\r\n".to_vec();
    for (name, value) in trailers {
        put_field(&mut last, name, value);
    }
    last.extend_from_slice(b"\r\n");
    Bytes::from(last)
}

/// The one length all `Content-Length` fields agree on (RFC 9112 §6.3: a list of equal
/// values is that value); `Err` with the reason for an invalid or conflicting one.
pub(crate) fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, String> {
    lengths(headers).agreed()
}

/// The `Content-Length` fields of `headers`. They are walked, not looked up: comparing a
/// message's few names (standard ones compare as an index) costs less than hashing one, and
/// the map holds at most the head limit's fields.
pub(crate) fn lengths(headers: &HeaderMap) -> Lengths {
    let mut lengths = Lengths::default();
    for (_, v) in headers
        .iter()
        .filter(|(k, _)| *k == http::header::CONTENT_LENGTH)
    {
        lengths.add(v);
    }
    lengths
}

/// A message's `Content-Length` fields, taken one at a time as its fields are walked (by a
/// walk that happens anyway, instead of a lookup of its own).
pub(crate) struct Lengths {
    fields: u32,
    /// What the fields so far agree on, or why they do not (the first reason).
    length: Result<Option<u64>, String>,
}

impl Default for Lengths {
    fn default() -> Self {
        Self {
            fields: 0,
            length: Ok(None),
        }
    }
}

impl Lengths {
    pub(crate) fn add(&mut self, value: &HeaderValue) {
        self.fields += 1;
        if let Ok(length) = &mut self.length {
            if let Err(why) = add_length(length, value) {
                self.length = Err(why);
            }
        }
    }

    /// Whether any `Content-Length` field came.
    pub(crate) fn any(&self) -> bool {
        self.fields > 0
    }

    /// The length all the fields agree on (RFC 9112 §6.3), or why they do not.
    pub(crate) fn agreed(&self) -> Result<Option<u64>, String> {
        self.length.clone()
    }

    /// The length, when exactly one field came and it is valid.
    pub(crate) fn single(&self) -> Option<u64> {
        match self.length {
            Ok(length) if self.fields == 1 => length,
            _ => None,
        }
    }
}

/// Takes one `Content-Length` field into `length` (the values seen so far).
pub(crate) fn add_length(length: &mut Option<u64>, value: &HeaderValue) -> Result<(), String> {
    for part in value.as_bytes().split(|&b| b == b',') {
        let part = part.trim_ascii();
        let n: u64 = (!part.is_empty() && part.len() <= 19 && part.iter().all(u8::is_ascii_digit))
            .then(|| part.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
            .ok_or_else(|| format!("invalid Content-Length {:?}", String::from_utf8_lossy(part)))?;
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values".into());
        }
        *length = Some(n);
    }
    Ok(())
}

/// Writes all of `bufs`, or fails with `TimedOut` once no byte has gone out for `stall` (the
/// reader stopped reading; a slow one that takes a little at a time is never cut). The timer
/// is made only when a write waits.
pub(crate) async fn write_bufs<W: AsyncWrite + Unpin>(
    io: &mut W,
    (first, at): (&[u8], &mut usize),
    bufs: &mut Vec<Bytes>,
    stall: std::time::Duration,
) -> io::Result<()> {
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut left = 0;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = poll_write_all(io, (first, at), bufs, cx) {
            return Poll::Ready(r);
        }
        let now: usize = first.len() - *at + bufs.iter().map(Bytes::len).sum::<usize>();
        let timer = match &mut timer {
            Some(t) if now == left => t,
            Some(t) => {
                t.as_mut().reset(tokio::time::Instant::now() + stall);
                t
            }
            None => timer.insert(Box::pin(tokio::time::sleep(stall))),
        };
        left = now;
        ready!(std::future::Future::poll(timer.as_mut(), cx));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the reader took no byte for {}",
                humantime::format_duration(stall)
            ),
        )))
    })
    .await
}

/// Writes all of `bufs` with vectored writes, taking off what went out.
pub(crate) fn poll_write_bufs<W: AsyncWrite + Unpin>(
    io: &mut W,
    bufs: &mut Vec<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    poll_write_all(io, (&[], &mut 0), bufs, cx)
}

/// Writes what is left of `first` (from `at`, which it moves on), then all of `bufs`, with
/// vectored writes, taking off what went out. `first` is a head written in place from the
/// buffer it was put together in (copying it into `Bytes` cost an allocation and a copy).
pub(crate) fn poll_write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    (first, at): (&[u8], &mut usize),
    bufs: &mut Vec<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    bufs.retain(|b| !b.is_empty());
    while *at < first.len() || !bufs.is_empty() {
        let mut slices = [io::IoSlice::new(&[]); 16];
        let mut count = 0;
        if let Some(rest) = first.get(*at..).filter(|r| !r.is_empty()) {
            slices[0] = io::IoSlice::new(rest);
            count = 1;
        }
        for buf in bufs.iter().take(slices.len() - count) {
            slices[count] = io::IoSlice::new(buf);
            count += 1;
        }
        let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let from_first = n.min(first.len() - *at);
        *at += from_first;
        n -= from_first;
        let mut done = 0;
        while n > 0 {
            let buf = &mut bufs[done];
            let k = n.min(buf.len());
            buf.advance(k);
            n -= k;
            if buf.is_empty() {
                done += 1;
            }
        }
        bufs.drain(..done);
    }
    Poll::Ready(Ok(()))
}

/// How a body is framed on the wire, and how far its reader is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Framed {
    /// `left` bytes to go.
    Sized(u64),
    Chunked(Chunk),
    /// Until the peer closes the connection (a response only).
    Close,
    Done,
}

/// Why a framed body could not be read to its end.
#[derive(Debug)]
pub(crate) enum FramedError {
    Io(io::Error),
    /// Malformed, or the connection closed before the end: the reason.
    Broken(String),
}

/// The next frame of a body framed by `kind`, from `buf` and then `io`: `Ok(None)` at its end
/// (`kind` is `Done` from the moment the end is known: after a sized body's last byte, or a
/// chunked body's last chunk or trailers). Trailer sections are held to `max_trailers` bytes.
pub(crate) fn poll_framed<R: AsyncRead + Unpin>(
    kind: &mut Framed,
    io: &mut R,
    buf: &mut BytesMut,
    max_trailers: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Frame<Bytes>>, FramedError>> {
    loop {
        match kind {
            Framed::Done => return Poll::Ready(Ok(None)),
            Framed::Sized(left) => {
                if !buf.is_empty() {
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    let data = buf.split_to(n).freeze();
                    if *left == 0 {
                        *kind = Framed::Done;
                    }
                    return Poll::Ready(Ok(Some(Frame::data(data))));
                }
                let left = *left;
                if !ready!(poll_fill(io, buf, cx)).map_err(FramedError::Io)? {
                    return Poll::Ready(Err(FramedError::Broken(format!(
                        "the connection closed {left} bytes before the end of the body"
                    ))));
                }
            }
            Framed::Close => {
                if !buf.is_empty() {
                    return Poll::Ready(Ok(Some(Frame::data(buf.split().freeze()))));
                }
                if !ready!(poll_fill(io, buf, cx)).map_err(FramedError::Io)? {
                    *kind = Framed::Done;
                    return Poll::Ready(Ok(None));
                }
            }
            Framed::Chunked(state) => {
                match step_chunked(state, buf, max_trailers).map_err(FramedError::Broken)? {
                    Step::Frame(f) => {
                        if f.is_trailers() {
                            *kind = Framed::Done;
                        }
                        return Poll::Ready(Ok(Some(f)));
                    }
                    Step::Again => continue,
                    Step::End => {
                        *kind = Framed::Done;
                        return Poll::Ready(Ok(None));
                    }
                    Step::More => {}
                }
                if !ready!(poll_fill(io, buf, cx)).map_err(FramedError::Io)? {
                    return Poll::Ready(Err(FramedError::Broken(
                        "the connection closed inside a chunked body".into(),
                    )));
                }
            }
        }
    }
}

/// Where a chunked body's reader is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What the chunked reader made of the bytes it had.
enum Step {
    Frame(Frame<Bytes>),
    /// Moved to another state: look again.
    Again,
    /// The body ended without trailers.
    End,
    /// Needs more bytes.
    More,
}

/// One step of reading a chunked body from `read`; `Err` with the reason when it is malformed.
/// A trailer section is held to `max_trailers` bytes.
fn step_chunked(
    state: &mut Chunk,
    read: &mut BytesMut,
    max_trailers: usize,
) -> Result<Step, String> {
    match *state {
        Chunk::Size => {
            let Some(eol) = read.iter().position(|&b| b == b'\n') else {
                return if read.len() > MAX_CHUNK_LINE {
                    Err("chunk size line too long".into())
                } else {
                    Ok(Step::More)
                };
            };
            let line = read.split_to(eol + 1);
            let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
            let rest = &line[digits..];
            let rest_ok = rest.ends_with(b"\r\n")
                && matches!(rest.first(), Some(b';' | b' ' | b'\t' | b'\r'));
            if digits == 0 || digits > 15 || !rest_ok {
                return Err("invalid chunk size line".into());
            }
            let size = u64::from_str_radix(
                std::str::from_utf8(&line[..digits]).expect("hex digits are ASCII"),
                16,
            )
            .expect("at most 15 hex digits fit");
            *state = if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            };
            Ok(Step::Again)
        }
        Chunk::Data(left) => {
            if read.is_empty() {
                return Ok(Step::More);
            }
            let n = left.min(read.len() as u64) as usize;
            let data = read.split_to(n).freeze();
            *state = match left - n as u64 {
                0 => Chunk::DataEnd,
                rest => Chunk::Data(rest),
            };
            Ok(Step::Frame(Frame::data(data)))
        }
        Chunk::DataEnd => {
            if read.len() < 2 {
                return Ok(Step::More);
            }
            if &read[..2] != b"\r\n" {
                return Err("chunk data longer than its size".into());
            }
            read.advance(2);
            *state = Chunk::Size;
            Ok(Step::Again)
        }
        Chunk::Trailers => {
            if read.starts_with(b"\r\n") {
                read.advance(2);
                return Ok(Step::End);
            }
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let (len, trailers) = match httparse::parse_headers(read, &mut fields) {
                Ok(httparse::Status::Complete((len, fields))) => {
                    let mut map = HeaderMap::with_capacity(fields.len());
                    for f in fields {
                        let name = HeaderName::from_bytes(f.name.as_bytes())
                            .map_err(|_| format!("invalid trailer name {:?}", f.name))?;
                        let value = HeaderValue::from_bytes(f.value)
                            .map_err(|_| format!("invalid value of trailer {name}"))?;
                        map.append(name, value);
                    }
                    (len, map)
                }
                Ok(httparse::Status::Partial) if read.len() > max_trailers => {
                    return Err(format!("trailer section over {max_trailers} bytes"))
                }
                Ok(httparse::Status::Partial) => return Ok(Step::More),
                Err(e) => return Err(format!("trailers: {e}")),
            };
            read.advance(len);
            Ok(Step::Frame(Frame::trailers(trailers)))
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn field_names_met_before_are_the_names_parsed() {
        for raw in [
            &b"Content-Type"[..],
            b"content-type",
            b"CONTENT-TYPE",
            b"X-Custom-Field",
            b"x-custom-field",
            b"traceparent",
        ] {
            for _ in 0..3 {
                assert_eq!(
                    super::field_name(raw).unwrap(),
                    HeaderName::from_bytes(raw).unwrap()
                );
            }
        }
        // Same length and first byte as a name met before (one slot), then that name again.
        assert_eq!(super::field_name(b"content-tYpe").unwrap(), "content-type");
        assert_eq!(super::field_name(b"content-xype").unwrap(), "content-xype");
        assert_eq!(super::field_name(b"Content-Type").unwrap(), "content-type");
        // What `from_bytes` refuses is refused, whatever is kept in the slot.
        assert!(super::field_name(b"content typ").is_err());
        assert!(super::field_name(b"content:type").is_err());
        assert!(super::field_name(b"").is_err());
        assert!(super::field_name(b"content-typ\xe9").is_err());
        // Longer than what is kept: parsed each time.
        let long = b"X-A-Field-Name-Longer-Than-Thirty-One-Bytes";
        for _ in 0..2 {
            assert_eq!(
                super::field_name(long).unwrap(),
                HeaderName::from_bytes(long).unwrap()
            );
        }
    }

    use super::*;

    #[test]
    fn a_content_length_is_digits_only_by_one_rule_everywhere() {
        use http::{header::CONTENT_LENGTH, HeaderMap, HeaderValue};
        let one = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_LENGTH, HeaderValue::from_static(v));
            (
                crate::body::content_length(&h),
                declared_length(&h).ok().flatten(),
            )
        };
        for (v, want) in [
            ("7", Some(7)),
            (" 7 ", Some(7)),
            ("5, 5", Some(5)),
            ("18446744073709551615", None),
            ("9999999999999999999", Some(9_999_999_999_999_999_999)),
            ("+5", None),
            ("-1", None),
            ("0x10", None),
            ("5, 6", None),
            ("", None),
        ] {
            assert_eq!(one(v), (want, want), "{v:?}");
        }
        // Two fields: the framing rule reads the list; the helper declines to guess.
        let mut h = HeaderMap::new();
        h.append(CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.append(CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert_eq!(crate::body::content_length(&h), None);
        assert_eq!(declared_length(&h), Ok(Some(3)));
    }

    #[test]
    fn lengths_are_written_in_decimal() {
        for n in [0, 7, 10, 1234567890, u64::MAX] {
            let mut out = Vec::new();
            put_length(&mut out, n);
            assert_eq!(out, format!("content-length: {n}\r\n").into_bytes());
        }
    }

    #[test]
    fn a_part_outside_the_head_is_copied_not_sliced() {
        let head = b"GET / HTTP/1.1\r\nx: \r\n";
        assert_eq!(place(head, &head[4..5]), Ok(4..5));
        assert_eq!(place(head, &head[19..19]), Ok(19..19));
        let elsewhere = b"x";
        assert_eq!(place(head, elsewhere), Err(Bytes::from_static(b"x")));
        let frozen = Bytes::from_static(head);
        assert_eq!(placed(&frozen, Ok(4..5)), "/");
        assert_eq!(placed(&frozen, Err(Bytes::from_static(b"own"))), "own");
    }
}
