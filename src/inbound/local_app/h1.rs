//! HTTP/1.1 to a local app, spoken by the request's own task on a connection it holds: the head
//! goes out, the request body streams while the response head is awaited (and on, while the
//! response body is read, for an app that answers before it has read the whole upload), and
//! the response body is read straight from the socket as the caller asks for it. No
//! connection task, no channel between the request and its connection: each hop between tasks
//! was a wake-up and a handful of allocations per request.
//!
//! What it accepts from the app is what RFC 9112 allows and no more: a response head within
//! `MAX_HEAD` bytes and `MAX_HEADERS` fields, interim (1xx) responses before the final one,
//! and a body framed by `Transfer-Encoding: chunked` (with trailers), `Content-Length`, or the
//! end of the connection. Anything else fails the exchange with a reason, and the connection
//! is never used again.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;

use crate::body::{BodyError, ProxyBody};
use crate::h1::{
    chunk, last_chunk, poll_fill, poll_framed, poll_write_bufs, put_field, put_length, Chunk,
    Framed, FramedError, MAX_HEADERS,
};
use crate::interim::Interim;

/// The largest response head (and interim head, and trailer section) taken from an app: with
/// `MAX_HEADERS` fields' overhead it stays within the field section a peer sidecar takes
/// (`MAX_FIELD_SECTION`, 64 KiB), so an app's head is refused here with a reason, not by the
/// HTTP/3 stack on the way out.
const MAX_HEAD: usize = 48 * 1024;

/// One connection to an app: the socket and what was read past the last message.
pub(crate) struct Wire {
    io: TcpStream,
    read: BytesMut,
}

/// Why an exchange with the app failed.
#[derive(Debug)]
pub(crate) enum WireError {
    /// Reading or writing the socket failed.
    Io(io::Error),
    /// The app closed the connection before its response head was whole.
    Closed,
    /// The app's response broke the protocol.
    Malformed(String),
    /// The request body failed (its error, as the body said).
    Body(BodyError),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Closed => f.write_str("the connection closed before a response"),
            Self::Malformed(why) => write!(f, "malformed response: {why}"),
            Self::Body(e) => write!(f, "the request body failed: {e}"),
        }
    }
}

impl std::error::Error for WireError {}

impl Wire {
    pub(crate) fn new(io: TcpStream) -> Self {
        Self {
            io,
            read: BytesMut::new(),
        }
    }

    /// An idle connection the app has closed (or written to unasked) cannot take a request.
    /// Costs a system call only when the socket has been readable since it was last read dry.
    pub(crate) fn is_closed(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Writes the request's head (`encode_head`) and what it can of it now, without waiting.
    /// The head is put together in a room the thread keeps (a vector for each request, made
    /// into `Bytes`, cost two allocations), and only a head the socket did not take whole is
    /// copied out (the rest, written before the body). `Err` means the app has closed the
    /// connection: nothing of the request reached it, it can go on another connection.
    pub(crate) fn begin(
        self,
        parts: &http::request::Parts,
        body: &ProxyBody,
        ours: &Added<'_>,
    ) -> Result<Started, Self> {
        thread_local! {
            static ROOM: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let written = ROOM.with_borrow_mut(|head| {
            let framing = encode_head(parts, body, ours, head);
            let sent = match self.io.try_write(head) {
                Ok(n) => Some(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(0),
                Err(_) => None,
            };
            let rest = sent.map(|sent| match head.get(sent..) {
                Some(rest) if !rest.is_empty() => Bytes::copy_from_slice(rest),
                _ => Bytes::new(),
            });
            // The room of an ordinary head is kept, not of the largest ever written.
            if head.capacity() > 16 * 1024 {
                *head = Vec::new();
            }
            rest.map(|rest| (rest, framing))
        });
        match written {
            Some((head, framing)) => Ok(Started {
                wire: self,
                head,
                framing,
            }),
            None => Err(self),
        }
    }
}

/// A request whose head is (partly) on its way: the rest of the head in `head`.
pub(crate) struct Started {
    wire: Wire,
    head: Bytes,
    framing: Framing,
}

/// A request's head in HTTP/1.1 bytes, into `head`, framing chosen from its body: its size
/// (exact, or as the caller declared it, and then held to it) as `Content-Length`, else
/// chunked. The caller's own framing fields are replaced.
fn encode_head(
    parts: &http::request::Parts,
    body: &ProxyBody,
    ours: &Added<'_>,
    head: &mut Vec<u8>,
) -> Framing {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    head.clear();
    head.reserve(160 + parts.headers.len() * 32);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    // Host first (RFC 9112 §3.2), then the caller's fields, then the sidecar's.
    put_field(head, &http::header::HOST, ours.host);
    // The length is read here, from the one `Content-Length` field (two, even equal, are not
    // taken), instead of looked up again in the map.
    let mut lengths = crate::h1::Lengths::default();
    for (name, value) in &parts.headers {
        if name == http::header::CONTENT_LENGTH {
            lengths.add(value);
            continue;
        }
        // Ours, written around them (`TE` is hop-by-hop and stripped before; skipped here too,
        // so that one never goes twice). Only this sidecar speaks for the caller: whatever
        // `quicar-*` the caller sent (its deadline, read before, or a forged identity) is not
        // the app's.
        if name == http::header::TRANSFER_ENCODING
            || name == http::header::HOST
            || name == http::header::TE
            || crate::headers::is_quicar(name)
        {
            continue;
        }
        put_field(head, name, value);
    }
    put_field(head, &crate::headers::PEER_IDENTITY, ours.peer);
    // We take response trailers and carry them on (an app on hyper, for one, sends them only
    // to a client that says so). TE concerns this connection alone, so it is named in
    // `Connection` too (RFC 9110 §10.1.4: a sender of TE must), and a proxy in front of the
    // app drops it instead of passing it on.
    head.extend_from_slice(b"connection: te\r\nte: trailers\r\n");
    let declared = lengths.single();
    let known = if body.is_end_stream() {
        Some(0)
    } else {
        body.size_hint().exact()
    };
    let framing = match known.or(declared) {
        // An empty body the caller did not size goes without a framing field (hyper's rule).
        Some(0) if declared.is_none() => Framing::Sized(0),
        Some(n) => {
            put_length(head, n);
            Framing::Sized(n)
        }
        None => {
            head.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    head.extend_from_slice(b"\r\n");
    framing
}

/// The fields the sidecar writes on every request to its app, beside (never from) the
/// caller's: the caller's fields hold no Host (the authority names the service, and any Host
/// field is skipped), no `TE` (hop-by-hop, stripped) and no `quicar-*` (stripped).
pub(crate) struct Added<'a> {
    /// The local service's name.
    pub(crate) host: &'a http::HeaderValue,
    /// `quicar-peer-identity`: the caller's SPIFFE ID, from its certificate.
    pub(crate) peer: &'a http::HeaderValue,
}

/// How a request body is framed on the wire.
#[derive(Clone, Copy)]
pub(crate) enum Framing {
    Sized(u64),
    Chunked,
}

/// The request side of an exchange: what is still to be written.
enum Out {
    Body(ProxyBody),
    /// A chunk (with its framing) being written, then the body continues.
    Chunk(Vec<Bytes>, ProxyBody),
    /// The last bytes (chunked terminator or trailers), then done.
    Last(Vec<Bytes>),
    Done,
    /// Writing failed or the body broke: the connection is not reusable.
    Broken,
}

/// One request on a connection, from its head being written to its response head.
pub(crate) struct Exchange {
    wire: Wire,
    out: Out,
    /// Bytes a sized request body still owes (`None`: the body is chunked).
    left: Option<u64>,
    /// Why writing stopped, kept to explain a response that then never came.
    write_failed: Option<WireError>,
}

impl Started {
    /// Sends the request body (after the head) while reading the response head; interim
    /// responses go to `interim`. The body keeps streaming inside the response body if the app
    /// answers before it has all of it.
    pub(crate) async fn response(
        self,
        body: ProxyBody,
        head_request: bool,
        interim: Option<Interim>,
    ) -> Result<Response<AppBody>, WireError> {
        let mut ex = Exchange {
            wire: self.wire,
            // The head went whole in `begin` (nearly always): nothing queued before the body.
            out: if self.head.is_empty() {
                Out::Body(body)
            } else {
                Out::Chunk(vec![self.head], body)
            },
            left: match self.framing {
                Framing::Sized(n) => Some(n),
                Framing::Chunked => None,
            },
            write_failed: None,
        };
        let head = std::future::poll_fn(|cx| ex.poll_head(cx, interim.as_ref())).await?;
        let kind = body_kind(head_request, &head)?;
        let reusable = head.keep_alive && !matches!(kind, Framed::Close);
        let Head {
            status, headers, ..
        } = head;
        let mut resp = Response::new(AppBody {
            ex: Some(ex),
            kind,
            reusable,
        });
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        Ok(resp)
    }
}

impl Exchange {
    /// Moves the request along as far as it goes now. A write error stops the writing (the
    /// connection is then not reusable) and is kept: a response may still come. A request body
    /// that breaks ends the exchange (`Err`): the app must not take a part for the whole.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), WireError> {
        self.poll_send_inner(cx);
        match self.write_failed.take() {
            Some(WireError::Io(e)) => {
                self.write_failed = Some(WireError::Io(e));
                Ok(())
            }
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn poll_send_inner(&mut self, cx: &mut Context<'_>) {
        loop {
            match std::mem::replace(&mut self.out, Out::Broken) {
                Out::Done => {
                    self.out = Out::Done;
                    return;
                }
                Out::Broken => return,
                Out::Chunk(mut bufs, body) => {
                    match poll_write_bufs(&mut self.wire.io, &mut bufs, cx) {
                        Poll::Ready(Ok(())) => self.out = Out::Body(body),
                        Poll::Ready(Err(e)) => return self.fail(WireError::Io(e)),
                        Poll::Pending => {
                            self.out = Out::Chunk(bufs, body);
                            return;
                        }
                    }
                }
                Out::Last(mut bufs) => match poll_write_bufs(&mut self.wire.io, &mut bufs, cx) {
                    Poll::Ready(Ok(())) => self.out = Out::Done,
                    Poll::Ready(Err(e)) => return self.fail(WireError::Io(e)),
                    Poll::Pending => {
                        self.out = Out::Last(bufs);
                        return;
                    }
                },
                Out::Body(mut body) => match Pin::new(&mut body).poll_frame(cx) {
                    Poll::Pending => {
                        self.out = Out::Body(body);
                        return;
                    }
                    Poll::Ready(Some(Err(e))) => return self.fail(WireError::Body(e)),
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) => match self.frame_data(data) {
                            Ok(bufs) => self.out = Out::Chunk(bufs, body),
                            Err(e) => return self.fail(e),
                        },
                        Err(frame) => {
                            // Trailers: the end of the body.
                            let trailers = frame.into_trailers().unwrap_or_default();
                            match self.finish(Some(&trailers)) {
                                Ok(bufs) => self.out = Out::Last(bufs),
                                Err(e) => return self.fail(e),
                            }
                        }
                    },
                    Poll::Ready(None) => match self.finish(None) {
                        Ok(bufs) => self.out = Out::Last(bufs),
                        Err(e) => return self.fail(e),
                    },
                },
            }
        }
    }

    fn fail(&mut self, e: WireError) {
        self.out = Out::Broken;
        self.write_failed.get_or_insert(e);
    }

    /// One data frame as it goes on the wire.
    fn frame_data(&mut self, data: Bytes) -> Result<Vec<Bytes>, WireError> {
        if let Some(left) = &mut self.left {
            let n = data.len() as u64;
            if n > *left {
                return Err(WireError::Body(
                    "the request body is longer than its length".into(),
                ));
            }
            *left -= n;
            return Ok(vec![data]);
        }
        if data.is_empty() {
            return Ok(Vec::new());
        }
        Ok(chunk(data).to_vec())
    }

    /// The end of the body: the chunked terminator with any trailers, or a check that a sized
    /// body was whole.
    fn finish(&mut self, trailers: Option<&HeaderMap>) -> Result<Vec<Bytes>, WireError> {
        if let Some(left) = self.left {
            if left > 0 {
                return Err(WireError::Body(
                    format!("the request body ended {left} bytes short of its length").into(),
                ));
            }
            return Ok(Vec::new());
        }
        Ok(vec![last_chunk(trailers)])
    }

    /// Reads until a read gives more bytes (`Ok(true)`) or the app closed (`Ok(false)`).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        poll_fill(&mut self.wire.io, &mut self.wire.read, cx)
    }

    /// The final response head; interim ones on the way go to `interim`.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        interim: Option<&Interim>,
    ) -> Poll<Result<Head, WireError>> {
        self.poll_send(cx)?;
        loop {
            if !self.wire.read.is_empty() {
                if let Some(head) = parse_head(&mut self.wire.read)? {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Poll::Ready(Err(WireError::Malformed(
                            "101 Switching Protocols to a request that asked for no upgrade".into(),
                        )));
                    }
                    if head.status.is_informational() {
                        if let Some(interim) = interim {
                            let mut r = Response::new(());
                            *r.status_mut() = head.status;
                            *r.headers_mut() = head.headers;
                            interim.forward(r);
                        }
                        continue;
                    }
                    return Poll::Ready(Ok(head));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) => {
                    return Poll::Ready(Err(match self.write_failed.take() {
                        Some(e) if !self.wire.read.is_empty() => e,
                        _ if !self.wire.read.is_empty() => WireError::Malformed(
                            "the connection closed inside the response head".into(),
                        ),
                        Some(e) => e,
                        None => WireError::Closed,
                    }))
                }
                Err(e) => {
                    return Poll::Ready(Err(self.write_failed.take().unwrap_or(WireError::Io(e))))
                }
            }
        }
    }
}

/// A response head as the app sent it, hop-by-hop fields taken out.
struct Head {
    status: StatusCode,
    /// The end-to-end fields: no hop-by-hop ones (RFC 9110 §7.6.1), none named by
    /// `Connection`.
    headers: HeaderMap,
    /// Whether the connection may carry another request after this response.
    keep_alive: bool,
    /// The last `Transfer-Encoding` field, for the framing.
    transfer_encoding: Option<HeaderValue>,
    /// The `Content-Length` fields, read as the fields are parsed (not looked up again).
    lengths: crate::h1::Lengths,
}

/// A whole response head at the front of `read`, taken off it. `None` while incomplete.
/// Hop-by-hop fields are read here (framing, keep-alive) and dropped, so the response leaves
/// with its end-to-end fields only.
fn parse_head(read: &mut BytesMut) -> Result<Option<Head>, WireError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut fields);
    let len = match resp.parse(read) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Complete(_)) => {
            return Err(WireError::Malformed(format!(
                "response head over {MAX_HEAD} bytes"
            )))
        }
        Ok(httparse::Status::Partial) if read.len() > MAX_HEAD => {
            return Err(WireError::Malformed(format!(
                "response head over {MAX_HEAD} bytes"
            )))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(WireError::Malformed(format!("response head: {e}"))),
    };
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| WireError::Malformed("no valid status code".into()))?;
    let keep_alive = resp.version == Some(1);
    let mut named = Vec::with_capacity(resp.headers.len());
    for f in resp.headers.iter() {
        let name = crate::h1::field_name(f.name.as_bytes())
            .map_err(|_| WireError::Malformed(format!("invalid field name {:?}", f.name)))?;
        named.push((name, crate::h1::place(&read[..len], f.value)));
    }
    let bytes = read.split_to(len).freeze();
    let mut head = Head {
        status,
        headers: HeaderMap::with_capacity(named.len() + crate::headers::ADDED_FIELDS),
        keep_alive,
        transfer_encoding: None,
        lengths: crate::h1::Lengths::default(),
    };
    let mut dropped_by_connection = Vec::new();
    for (name, at) in named {
        let value = HeaderValue::from_maybe_shared(crate::h1::placed(&bytes, at))
            .map_err(|_| WireError::Malformed(format!("invalid value of field {name}")))?;
        if !crate::headers::is_hop_by_hop(&name) {
            if name == http::header::CONTENT_LENGTH {
                head.lengths.add(&value);
            }
            head.headers.append(name, value);
        } else if name == http::header::CONNECTION {
            for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.keep_alive = false;
                } else if !token.eq_ignore_ascii_case("keep-alive") {
                    if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                        dropped_by_connection.push(n);
                    }
                }
            }
        } else if name == http::header::TRANSFER_ENCODING {
            head.transfer_encoding = Some(value);
        }
    }
    for name in dropped_by_connection {
        if name == http::header::CONTENT_LENGTH {
            head.lengths = crate::h1::Lengths::default();
        }
        head.headers.remove(name);
    }
    Ok(Some(head))
}

/// The response body's framing (RFC 9112 §6.3).
fn body_kind(head_request: bool, head: &Head) -> Result<Framed, WireError> {
    let status = head.status;
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framed::Done);
    }
    if let Some(te) = &head.transfer_encoding {
        let last_is_chunked = te
            .to_str()
            .ok()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
        // Chunked and a length besides is a request-smuggling shape (RFC 9112 §6.3): refused.
        if head.lengths.any() {
            return Err(WireError::Malformed(
                "both Transfer-Encoding and Content-Length".into(),
            ));
        }
        return Ok(if last_is_chunked {
            Framed::Chunked(Chunk::Size)
        } else {
            Framed::Close
        });
    }
    let length = head.lengths.agreed().map_err(WireError::Malformed)?;
    Ok(match length {
        Some(0) => Framed::Done,
        Some(n) => Framed::Sized(n),
        None => Framed::Close,
    })
}

/// The app's response body, read from the connection as it is asked for; the request body
/// keeps streaming meanwhile if it has not ended. `finish` hands the connection back once both
/// ended cleanly.
pub(crate) struct AppBody {
    /// `None` once the connection went back to the pool.
    ex: Option<Exchange>,
    kind: Framed,
    reusable: bool,
}

impl AppBody {
    /// The connection, if this exchange is over and it can carry another: the response read to
    /// its end, the request written whole, and nothing from the app past the response.
    pub(crate) fn reusable(&mut self) -> Option<Wire> {
        let over = matches!(self.kind, Framed::Done) && self.reusable;
        let ex = self
            .ex
            .take_if(|ex| over && matches!(ex.out, Out::Done) && ex.wire.read.is_empty())?;
        Some(ex.wire)
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(ex) = &mut this.ex else {
            return Poll::Ready(None);
        };
        let r = match ex.poll_send(cx) {
            Ok(()) => this.poll_body(cx),
            Err(e) => Poll::Ready(Some(Err(e))),
        };
        if let Poll::Ready(Some(Err(_))) = &r {
            this.reusable = false;
            this.kind = Framed::Done;
        }
        r.map(|o| o.map(|r| r.map_err(|e| -> BodyError { Box::new(e) })))
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Framed::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.kind {
            Framed::Done => SizeHint::with_exact(0),
            Framed::Sized(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl AppBody {
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        let Some(ex) = &mut self.ex else {
            return Poll::Ready(None);
        };
        let r = ready!(poll_framed(
            &mut self.kind,
            &mut ex.wire.io,
            &mut ex.wire.read,
            MAX_HEAD,
            cx
        ));
        Poll::Ready(match r {
            Ok(frame) => frame.map(Ok),
            Err(FramedError::Io(e)) => Some(Err(WireError::Io(e))),
            Err(FramedError::Broken(why)) => Some(Err(WireError::Malformed(why))),
        })
    }
}
