//! The calling app's HTTP/1.1 connection, served by quicar's own code: request heads read and
//! checked here, each request handed to the request path (`outbound::handle`) in this task, its
//! response written back. One task per connection, no channel between the request and its
//! connection (hyper's server had both, and wrote its own bare answers to requests it could
//! not parse, which quicar had to recognise on the wire and replace).
//!
//! - **Refusals** name their reason and kind, like every sidecar-made response: a malformed
//!   head `400 bad-request`, a head over `outbound.max_header_bytes` `431` (`414` while its
//!   request line has not ended), a transfer coding other than `chunked` `501`, a head not
//!   whole within `outbound.header_read_timeout` `408`; then the connection closes. Framing
//!   that could be read two ways (a request smuggling shape) is refused, never guessed:
//!   `Transfer-Encoding` with `Content-Length`, conflicting lengths, `Transfer-Encoding` on
//!   HTTP/1.0 (RFC 9112 §6.1, §6.3).
//! - **The request body** streams from the socket as the request path reads it: the body owns
//!   the read side while it does and gives it back when it ends. `Expect: 100-continue` is
//!   answered when the body is first read. A body not read to its end closes the connection
//!   after the response (nothing of it may be taken for the next request).
//! - **Interim responses** (`103 Early Hints`…) and `100 Continue` are queued by the request
//!   path with the request's number and written by this task while the request runs, never
//!   after its final head.
//! - **The response** gets `Content-Length` when its size is known, else chunked encoding
//!   (close-delimited to HTTP/1.0), trailers only to a client that sent `TE: trailers`, and
//!   `Date` when it has none. What the body has ready is gathered and written with one
//!   vectored write.
//! - **The connection** is kept alive as RFC 9112 §9.3 says, serves pipelined requests in
//!   order, is dropped (and the request with it) when the app hangs up while a request runs
//!   whose body (if any) was read to its end, or while its response waits for body bytes (a
//!   long poll): a request held anywhere on its way (for a peer's first HTTP/2 SETTINGS, a
//!   connection, a retry's pause) is then never sent. It is closed when
//!   idle for `header_read_timeout`, and on shutdown closes when idle or after the response
//!   in progress.

use std::future::{poll_fn, Future as _};
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::header::{CONNECTION, CONTENT_LENGTH, DATE, EXPECT, TE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::Outbound;
use crate::error::{error_response, ErrorKind};
use crate::h1::{
    chunk, last_chunk, poll_fill, poll_framed, put_field, put_length, put_number, write_bufs,
    Chunk, Framed, FramedError, MAX_HEADERS,
};
use crate::interim::Interim;

/// What every app connection of a listener is held to.
#[derive(Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) max_header_bytes: usize,
    pub(crate) header_read_timeout: Duration,
    /// `outbound.response_stall_timeout`.
    pub(crate) response_stall_timeout: Duration,
    /// `Keep-Alive: timeout=…` (seconds) on every response after which the connection stays
    /// open: a second under the idle close, so a client that honours it never reuses a
    /// connection we are closing. Written with the head, not added to the response's fields.
    pub(crate) keep_alive: u64,
}

/// What the response writer gathers before it writes.
const GATHER: usize = 64 * 1024;

/// The read side of the connection and what was read past the last message. A request body
/// owns it while it streams and gives it back when it ends.
struct Reader {
    io: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// Whether the app hung up, seen while the read side waits for the next request:
    /// pipelined requests are kept in the buffer, up to `limit` bytes (beyond it, nothing
    /// more is read until they are served).
    fn poll_hung_up(&mut self, limit: usize, cx: &mut Context<'_>) -> bool {
        while self.buf.len() < limit {
            match poll_fill(&mut self.io, &mut self.buf, cx) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false) | Err(_)) => return true,
                Poll::Pending => break,
            }
        }
        false
    }
}

/// What the connection task shares with the request in progress.
#[derive(Default)]
struct Shared {
    /// Interim response heads (and `100 Continue`) in HTTP/1.1 bytes, each with the number of
    /// its request.
    interim: Mutex<Vec<(u64, Vec<u8>)>>,
    /// Set when `interim` holds something: the connection task looks at the queue without the
    /// lock on each wake-up (it is nearly always empty).
    queued: AtomicBool,
    /// The connection task, woken when an interim head is queued or the read side comes back.
    waker: AtomicWaker,
    /// The read side, given back by a request body that was read to its end.
    returned: Mutex<Option<Reader>>,
}

impl Shared {
    fn queue(&self, seq: u64, bytes: Vec<u8>) {
        self.interim
            .lock()
            .expect("not poisoned")
            .push((seq, bytes));
        self.queued.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// The read side, from a request body read to its end; the connection task is woken to
    /// watch it for a hang-up while the request runs (the body may end in another task).
    fn give_back(&self, rd: Reader) {
        *self.returned.lock().expect("not poisoned") = Some(rd);
        self.waker.wake();
    }

    /// Appends to `out` what is queued for request `seq` (anything queued for an earlier
    /// request is dropped: its final head went out), and notes the task to wake.
    fn take(&self, seq: u64, waker: &Waker, out: &mut Vec<u8>) {
        // Registered before the flag is read: a head queued after the read wakes the task.
        self.waker.register(waker);
        if !self.queued.swap(false, Ordering::AcqRel) {
            return;
        }
        for (s, bytes) in self.interim.lock().expect("not poisoned").drain(..) {
            if s == seq {
                out.extend_from_slice(&bytes);
            }
        }
    }
}

/// Interim bytes on their way out, and how far.
#[derive(Default)]
struct InterimOut {
    bytes: Vec<u8>,
    written: usize,
}

impl InterimOut {
    /// Writes what is queued for request `seq`.
    fn poll(
        &mut self,
        wr: &mut OwnedWriteHalf,
        shared: &Shared,
        seq: u64,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        if self.written == self.bytes.len() {
            self.bytes.clear();
            self.written = 0;
        }
        shared.take(seq, cx.waker(), &mut self.bytes);
        while self.written < self.bytes.len() {
            let n = ready!(Pin::new(&mut *wr).poll_write(cx, &self.bytes[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// A request head as the app sent it, read and checked.
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// How its body is framed: `None` for no body.
    body: Option<Framed>,
    keep_alive: bool,
    expect_continue: bool,
    /// The app sent `TE: trailers`: it takes trailer fields on a chunked response.
    trailers: bool,
}

/// Why a request was refused before it was routed.
struct Refusal {
    status: StatusCode,
    kind: ErrorKind,
    reason: String,
}

impl Refusal {
    fn bad(reason: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: ErrorKind::BadRequest,
            reason: reason.into(),
        }
    }

    fn too_large(max: usize) -> Self {
        Self {
            status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            kind: ErrorKind::HeadersTooLarge,
            reason: format!(
                "the request header section is over {max} bytes (outbound.max_header_bytes)"
            ),
        }
    }
}

/// What the response writer needs of its request.
#[derive(Clone, Copy)]
struct Asked {
    head: bool,
    version: Version,
    trailers: bool,
}

/// Serves one app connection until the app closes it, it idles out, or `shutdown`.
pub(crate) async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    state: Arc<Outbound>,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let (rd, wr) = stream.into_split();
    let mut wr = Writer {
        io: wr,
        head: Vec::new(),
        out: Vec::new(),
    };
    let shared = Arc::new(Shared::default());
    let mut reader = Some(Reader {
        io: rd,
        buf: BytesMut::new(),
    });
    let mut seq = 0u64;
    let mut interim = InterimOut::default();
    // One timer and one wait for the shutdown for the connection's life, not one each per
    // request: registering and dropping them cost every request a lock and a list or timer
    // wheel insertion and removal.
    let mut head_timer = std::pin::pin!(tokio::time::sleep(settings.header_read_timeout));
    let mut cancelled = std::pin::pin!(shutdown.cancelled());
    // The read side is ours between requests, or given back by the body that ended.
    while let Some(mut rd) = reader.take() {
        let waits = (head_timer.as_mut(), cancelled.as_mut());
        let head = match read_head(&mut rd, &settings, waits).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(refusal) => {
                tracing::debug!(%remote, reason = %refusal.reason, "app request refused");
                let mut resp = error_response(refusal.kind, &refusal.reason);
                *resp.status_mut() = refusal.status;
                let (mut parts, body) = resp.into_parts();
                crate::headers::write_error_kind(&mut parts);
                let asked = Asked {
                    head: false,
                    version: Version::HTTP_11,
                    trailers: false,
                };
                let _ = write_response(
                    &mut wr,
                    parts,
                    body,
                    asked,
                    true,
                    None,
                    (settings.response_stall_timeout, settings.keep_alive),
                )
                .await;
                linger(wr.io, rd).await;
                return;
            }
        };
        seq += 1;
        let asked = Asked {
            head: head.method == Method::HEAD,
            version: head.version,
            trailers: head.trailers,
        };
        let keep_alive = head.keep_alive;
        let body = match head.body {
            None => {
                reader = Some(rd);
                RequestBody::empty()
            }
            Some(kind) => RequestBody {
                reader: Some(rd),
                kind,
                shared: Some(shared.clone()),
                seq,
                continue_wanted: head.expect_continue,
                max_trailers: settings.max_header_bytes,
            },
        };
        let mut req = Request::new(body);
        *req.method_mut() = head.method;
        *req.uri_mut() = head.uri;
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers;
        // RFC 9110 §15.2: no 1xx to an HTTP/1.0 client.
        let hints = (head.version == Version::HTTP_11).then(|| {
            let shared = shared.clone();
            Interim::new(move |resp| shared.queue(seq, head_bytes(&resp)))
        });
        // Pinned in place, in this connection's future (boxed once, when the connection is
        // spawned): a box per request would be an allocation and a copy of its several KB.
        // Built where it is pinned: a `let` first would move its several KB once more.
        let mut work = std::pin::pin!(super::handle(req, state.clone(), hints));
        // The request runs; meanwhile its interim responses go out, and an app that hangs up
        // (seen while the read side is ours: a request without a body, or one whose body was
        // read to its end) cancels it.
        let resp = poll_fn(|cx| {
            if let Poll::Ready(Err(_)) = interim.poll(&mut wr.io, &shared, seq, cx) {
                return Poll::Ready(None);
            }
            if let Poll::Ready(resp) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            // A request body read to its end gave the read side back: a hang-up is seen from
            // then on, as for a request without a body.
            if reader.is_none() {
                reader = shared.returned.lock().expect("not poisoned").take();
            }
            let limit = settings.max_header_bytes;
            if reader.as_mut().is_some_and(|rd| rd.poll_hung_up(limit, cx)) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let Some(resp) = resp else {
            tracing::debug!(%remote, "the app closed its connection during a request");
            return;
        };
        // Interim responses still queued go before the final head, never after it.
        if poll_fn(|cx| interim.poll(&mut wr.io, &shared, seq, cx))
            .await
            .is_err()
        {
            return;
        }
        if reader.is_none() {
            reader = shared.returned.lock().expect("not poisoned").take();
        }
        // A body not read to its end (still held by the request path, or failed) leaves
        // nothing to read the next request from.
        let close = !keep_alive || reader.is_none() || shutdown.is_cancelled();
        let (parts, body) = resp.into_parts();
        let watch = reader.as_mut().map(|rd| (rd, settings.max_header_bytes));
        let times = (settings.response_stall_timeout, settings.keep_alive);
        let written = write_response(&mut wr, parts, body, asked, close, watch, times).await;
        // Not held while the connection waits for its next request.
        wr.let_go_of_a_large_head();
        match written {
            Ok(true) if !close => {}
            Ok(_) => return,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                // The body is dropped: the exchange is cancelled and the far app freed.
                tracing::info!(%remote, error = %e, "closing an app connection that stopped reading its response (outbound.response_stall_timeout)");
                return;
            }
            Err(e) => {
                tracing::debug!(%remote, error = %e, "writing a response to the app failed");
                return;
            }
        }
    }
}

/// Closes after a refusal the way the app can read it: our side first, then what the app
/// still sends is read and dropped for a moment, so the close does not reset the connection
/// (which would discard the refusal unread at the app).
async fn linger(mut wr: OwnedWriteHalf, mut rd: Reader) {
    use tokio::io::AsyncWriteExt as _;
    let _ = wr.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut dropped = 0;
        while dropped < 1 << 20 {
            rd.buf.clear();
            match poll_fn(|cx| poll_fill(&mut rd.io, &mut rd.buf, cx)).await {
                Ok(true) => dropped += rd.buf.len(),
                Ok(false) | Err(_) => return,
            }
        }
    })
    .await;
}

/// The next request head. `Ok(None)` when the app closed the connection, sent nothing within
/// `header_read_timeout`, or the shutdown came while the connection was idle. `waits`: the
/// connection's head timer and its wait for the shutdown.
async fn read_head(
    rd: &mut Reader,
    settings: &Settings,
    waits: (
        Pin<&mut tokio::time::Sleep>,
        Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ),
) -> Result<Option<Head>, Refusal> {
    let (mut timer, mut cancelled) = waits;
    let deadline = tokio::time::Instant::now() + settings.header_read_timeout;
    loop {
        if !rd.buf.is_empty() {
            if let Some(head) = parse_head(&mut rd.buf, settings.max_header_bytes)? {
                return Ok(Some(head));
            }
        }
        let idle = rd.buf.is_empty();
        tokio::select! {
            biased;
            r = poll_fn(|cx| poll_fill(&mut rd.io, &mut rd.buf, cx)) => match r {
                Ok(true) => {}
                Ok(false) | Err(_) => return Ok(None),
            },
            () = cancelled.as_mut(), if idle => return Ok(None),
            () = until(timer.as_mut(), deadline) => {
                if idle {
                    return Ok(None);
                }
                return Err(Refusal {
                    status: StatusCode::REQUEST_TIMEOUT,
                    kind: ErrorKind::Timeout,
                    reason: format!(
                        "the request head was not whole within {} (outbound.header_read_timeout)",
                        humantime::format_duration(settings.header_read_timeout)
                    ),
                });
            }
        }
    }
}

/// Waits on a connection's one timer until `deadline`. The timer may still be set for an
/// earlier deadline (a previous request's): it is moved on when it fires, once per timeout
/// at most, not for every request.
fn until(
    mut timer: Pin<&mut tokio::time::Sleep>,
    deadline: tokio::time::Instant,
) -> impl std::future::Future<Output = ()> + '_ {
    poll_fn(move |cx| loop {
        ready!(timer.as_mut().poll(cx));
        if timer.deadline() >= deadline {
            return Poll::Ready(());
        }
        timer.as_mut().reset(deadline);
    })
}

/// A whole request head at the front of `buf`, taken off it; `None` while incomplete.
fn parse_head(buf: &mut BytesMut, max: usize) -> Result<Option<Head>, Refusal> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) if len <= max => len,
        Ok(httparse::Status::Complete(_)) => return Err(Refusal::too_large(max)),
        Ok(httparse::Status::Partial) if buf.len() > max => {
            // Still inside the request line: it is the target that is too long.
            return Err(if buf.contains(&b'\n') {
                Refusal::too_large(max)
            } else {
                Refusal {
                    status: StatusCode::URI_TOO_LONG,
                    kind: ErrorKind::BadRequest,
                    reason: format!(
                        "the request target is over {max} bytes (outbound.max_header_bytes)"
                    ),
                }
            });
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                kind: ErrorKind::HeadersTooLarge,
                reason: format!("the request has over {MAX_HEADERS} header fields"),
            })
        }
        Err(httparse::Error::Version) => {
            return Err(Refusal::bad(
                "the request is not HTTP/1.1 (nor 1.0): send HTTP/1.1 to the sidecar",
            ))
        }
        Err(e) => {
            return Err(Refusal::bad(format!(
                "the request is not valid HTTP/1.1: {e}"
            )))
        }
    };
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| Refusal::bad("the request method is not a valid token"))?;
    let head_bytes = &buf[..len];
    let place = |part: &[u8]| crate::h1::place(head_bytes, part);
    let path = place(req.path.unwrap_or("").as_bytes());
    let mut named = Vec::with_capacity(req.headers.len());
    for f in req.headers.iter() {
        let name = crate::h1::field_name(f.name.as_bytes())
            .map_err(|_| Refusal::bad(format!("invalid header field name {:?}", f.name)))?;
        named.push((name, place(f.value)));
    }
    let bytes = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(crate::h1::placed(&bytes, path))
        .map_err(|e| Refusal::bad(format!("bad request target: {e}")))?;
    let mut head = Head {
        method,
        uri,
        version,
        headers: HeaderMap::with_capacity(named.len() + crate::headers::ADDED_FIELDS),
        body: None,
        keep_alive: version == Version::HTTP_11,
        expect_continue: false,
        trailers: false,
    };
    let mut length = None;
    let mut chunked = false;
    for (name, at) in named {
        let value = HeaderValue::from_maybe_shared(crate::h1::placed(&bytes, at))
            .map_err(|_| Refusal::bad(format!("invalid value of header field {name}")))?;
        if name == CONTENT_LENGTH {
            crate::h1::add_length(&mut length, &value).map_err(Refusal::bad)?;
        } else if name == TRANSFER_ENCODING {
            if version == Version::HTTP_10 {
                return Err(Refusal::bad("Transfer-Encoding in an HTTP/1.0 request"));
            }
            // Only `chunked`, once: any other coding would reach the far app undone.
            if chunked
                || !value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked")
            {
                return Err(Refusal {
                    status: StatusCode::NOT_IMPLEMENTED,
                    kind: ErrorKind::BadRequest,
                    reason: format!(
                        "transfer coding {:?} is not supported (only chunked)",
                        String::from_utf8_lossy(value.as_bytes())
                    ),
                });
            }
            chunked = true;
        } else if name == CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && !head.keep_alive {
                    head.keep_alive = version == Version::HTTP_10;
                }
            }
        } else if name == EXPECT {
            head.expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
        } else if name == TE {
            head.trailers |= value
                .as_bytes()
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
        }
        head.headers.append(name, value);
    }
    head.body = match (chunked, length) {
        (true, Some(_)) => {
            return Err(Refusal::bad(
                "both Transfer-Encoding and Content-Length: the body could be read two ways",
            ))
        }
        (true, None) => Some(Framed::Chunked(Chunk::Size)),
        // A sized empty body is over already: the read side stays with the connection.
        (false, Some(0) | None) => None,
        (false, Some(n)) => Some(Framed::Sized(n)),
    };
    Ok(Some(head))
}

/// Writes a response head and its body. `Ok(true)` when the whole message went out (the
/// connection can carry another); `Ok(false)` when the body failed or broke its length, and
/// the connection must close for the app to see that it was cut.
async fn write_response<B>(
    wr: &mut Writer,
    parts: http::response::Parts,
    mut body: B,
    asked: Asked,
    close: bool,
    mut watch: Option<(&mut Reader, usize)>,
    (stall, keep_alive): (Duration, u64),
) -> io::Result<bool>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let status = parts.status;
    let bodyless = asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    wr.let_go_of_a_large_head();
    let Writer { io: wr, head, out } = wr;
    out.clear();
    head.clear();
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    // The one valid length the response declares (a 204 has none); written with the framing.
    let mut lengths = crate::h1::Lengths::default();
    for (name, value) in &parts.headers {
        if name == CONTENT_LENGTH {
            lengths.add(value);
        } else if name != TRANSFER_ENCODING && name != CONNECTION {
            put_field(head, name, value);
        }
    }
    let length = if status == StatusCode::NO_CONTENT {
        None
    } else {
        lengths.agreed().ok().flatten()
    };
    if !parts.headers.keys().any(|k| k == DATE) {
        put_field(head, &DATE, &date());
    }
    let mut close = close;
    // How the body goes: `Some(n)` bytes, or chunked, or (HTTP/1.0) until the close.
    let mut left = None;
    let mut chunked = false;
    if bodyless {
        // A HEAD's or a 304's length is the one the full response would have.
        if let Some(n) = length {
            put_length(head, n);
        }
    } else {
        match length.or_else(|| body.size_hint().exact()) {
            Some(n) => {
                put_length(head, n);
                left = Some(n);
            }
            None if asked.version == Version::HTTP_11 => {
                head.extend_from_slice(b"transfer-encoding: chunked\r\n");
                chunked = true;
            }
            None => close = true,
        }
    }
    if close {
        head.extend_from_slice(b"connection: close\r\n");
    } else {
        if asked.version == Version::HTTP_10 {
            head.extend_from_slice(b"connection: keep-alive\r\n");
        }
        put_number(head, b"keep-alive: timeout=", keep_alive);
    }
    head.extend_from_slice(b"\r\n");
    // The head goes out from where it was put together, before what `out` gathers (the first
    // write takes both).
    let head: &[u8] = head;
    let mut head_at = 0;
    if bodyless {
        drop(body);
        write_bufs(wr, (head, &mut head_at), out, stall).await?;
        return Ok(true);
    }
    let mut gathered = 0;
    loop {
        // What the body has ready is gathered; the gathering goes out when it waits.
        // While the body has nothing ready, an app that hangs up is watched for (when the read
        // side is ours): a response that does not move would otherwise never learn of it, and
        // hold its stream, the far sidecar and the far app until a timeout.
        let next = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Next::Frame(frame)),
            Poll::Pending if !out.is_empty() || head_at < head.len() => Poll::Ready(Next::Flush),
            Poll::Pending => {
                let hung_up = watch
                    .as_mut()
                    .is_some_and(|(rd, limit)| rd.poll_hung_up(*limit, cx));
                if hung_up {
                    Poll::Ready(Next::HungUp)
                } else {
                    Poll::Pending
                }
            }
        })
        .await;
        let frame = match next {
            Next::Flush => {
                write_bufs(wr, (head, &mut head_at), out, stall).await?;
                gathered = 0;
                continue;
            }
            Next::HungUp => return Err(io::ErrorKind::ConnectionReset.into()),
            Next::Frame(Some(Ok(frame))) => frame,
            Next::Frame(None) => break,
            Next::Frame(Some(Err(e))) => {
                write_bufs(wr, (head, &mut head_at), out, stall).await?;
                tracing::debug!(error = %e, "a response body failed on its way to the app");
                return Ok(false);
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                if data.is_empty() {
                    continue;
                }
                gathered += data.len();
                if let Some(left) = &mut left {
                    let n = data.len() as u64;
                    if n > *left {
                        data.truncate(*left as usize);
                        out.push(data);
                        write_bufs(wr, (head, &mut head_at), out, stall).await?;
                        tracing::debug!("a response body was longer than its length");
                        return Ok(false);
                    }
                    *left -= n;
                    out.push(data);
                } else if chunked {
                    out.extend(chunk(data));
                } else {
                    out.push(data);
                }
                if gathered >= GATHER {
                    write_bufs(wr, (head, &mut head_at), out, stall).await?;
                    gathered = 0;
                }
            }
            Err(frame) => {
                if chunked {
                    let trailers = frame.into_trailers().ok().filter(|_| asked.trailers);
                    out.push(last_chunk(trailers.as_ref()));
                    chunked = false;
                }
                break;
            }
        }
    }
    if chunked {
        out.push(last_chunk(None));
    }
    write_bufs(wr, (head, &mut head_at), out, stall).await?;
    match left {
        Some(n) if n > 0 => {
            tracing::debug!(missing = n, "a response body ended short of its length");
            Ok(false)
        }
        _ => Ok(!close),
    }
}

/// The write side of an app connection, with the buffers each response is written from (kept
/// for the connection's life: made anew, they cost every response three allocations more).
struct Writer {
    io: OwnedWriteHalf,
    /// Each response head is put together and written from here.
    head: Vec<u8>,
    /// What goes out in the next vectored write.
    out: Vec<Bytes>,
}

impl Writer {
    /// A connection keeps the room of an ordinary head, not of the largest it ever wrote.
    fn let_go_of_a_large_head(&mut self) {
        if self.head.capacity() > 16 * 1024 {
            self.head = Vec::new();
        }
    }
}

/// What the response writer does next.
enum Next<F> {
    /// Writes what it gathered: the body has nothing more ready.
    Flush,
    /// Stops: the app hung up.
    HungUp,
    Frame(Option<F>),
}

/// `Date` for responses without one, made once a second per thread.
fn date() -> HeaderValue {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, HeaderValue)> =
            const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            *d = (secs, crate::cache::normalize::imf(now));
        }
        d.1.clone()
    })
}

/// An interim response head in HTTP/1.1 form.
fn head_bytes(resp: &Response<()>) -> Vec<u8> {
    let status = resp.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    )
    .into_bytes();
    for (name, value) in resp.headers() {
        put_field(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Why reading a request body failed.
#[derive(Debug)]
pub(crate) struct ReadError(String);

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ReadError {}

/// A request body, read from the app's connection as the request path asks for it.
pub(crate) struct RequestBody {
    /// The read side, while the body streams.
    reader: Option<Reader>,
    kind: Framed,
    /// Where the read side goes back to, and `100 Continue` is queued.
    shared: Option<Arc<Shared>>,
    seq: u64,
    continue_wanted: bool,
    max_trailers: usize,
}

impl RequestBody {
    fn empty() -> Self {
        Self {
            reader: None,
            kind: Framed::Done,
            shared: None,
            seq: 0,
            continue_wanted: false,
            max_trailers: 0,
        }
    }

    /// The body ended whole: the read side goes back to the connection.
    fn ended(&mut self) {
        self.kind = Framed::Done;
        if let (Some(rd), Some(shared)) = (self.reader.take(), &self.shared) {
            shared.give_back(rd);
        }
    }

    fn fail(&mut self, why: String) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        self.kind = Framed::Done;
        self.reader = None;
        Poll::Ready(Some(Err(ReadError(why))))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        let this = self.get_mut();
        if this.continue_wanted {
            this.continue_wanted = false;
            if let Some(shared) = &this.shared {
                shared.queue(this.seq, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec());
            }
        }
        let Some(rd) = this.reader.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(poll_framed(
            &mut this.kind,
            &mut rd.io,
            &mut rd.buf,
            this.max_trailers,
            cx
        )) {
            Ok(frame) => {
                if matches!(this.kind, Framed::Done) {
                    this.ended();
                }
                Poll::Ready(frame.map(Ok))
            }
            Err(FramedError::Io(e)) => this.fail(e.to_string()),
            Err(FramedError::Broken(why)) => this.fail(format!("the request body: {why}")),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.kind, Framed::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.kind {
            Framed::Done => SizeHint::with_exact(0),
            Framed::Sized(n) => SizeHint::with_exact(n),
            Framed::Chunked(_) | Framed::Close => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_arriving_in_pieces_is_parsed_once_whole_and_what_follows_is_kept() {
        let whole = b"POST /a?b HTTP/1.1\r\nHost: hello\r\nContent-Length: 3\r\nX-Empty:\r\nConnection: close\r\n\r\nabcGET";
        let mut buf = BytesMut::new();
        for (i, &b) in whole.iter().enumerate() {
            buf.extend_from_slice(&[b]);
            let head_end = whole.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let got = parse_head(&mut buf, 1024).ok().expect("valid so far");
            if i + 1 < head_end {
                assert!(got.is_none(), "parsed at {i}");
                continue;
            }
            let head = got.expect("whole");
            assert_eq!(head.method, Method::POST);
            assert_eq!(head.uri, "/a?b");
            assert!(!head.keep_alive);
            assert!(matches!(head.body, Some(Framed::Sized(3))));
            assert_eq!(head.headers.len(), 4);
            assert_eq!(head.headers["x-empty"], "");
            assert!(buf.is_empty());
            break;
        }
        // Whole at once: the body and the next request's first bytes stay in the buffer.
        let mut buf = BytesMut::from(&whole[..]);
        assert!(parse_head(&mut buf, 1024).ok().flatten().is_some());
        assert_eq!(&buf[..], b"abcGET");
        // Over the limit: 431 once the request line has ended, 414 while it has not.
        let mut buf = BytesMut::from(&whole[..]);
        let refusal = parse_head(&mut buf, 16).err().expect("over");
        assert_eq!(refusal.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let mut buf = BytesMut::from(&b"GET /aaaaaaaaaaaaaaaaaaaaaaaaa"[..]);
        let refusal = parse_head(&mut buf, 16).err().expect("over");
        assert_eq!(refusal.status, StatusCode::URI_TOO_LONG);
    }

    /// One connection's writer reuses its head buffer and its write list: heads of different
    /// sizes in turn (the buffer grows, is cleared, is let go past 16 KiB) go out whole and
    /// alone, with nothing of an earlier head left in a later one.
    #[tokio::test]
    async fn responses_in_turn_on_one_connection_are_written_whole_from_the_reused_buffer() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap());
        let (app, (ours, _)) = tokio::try_join!(app, listener.accept()).unwrap();
        let mut wr = Writer {
            io: ours.into_split().1,
            head: Vec::new(),
            out: Vec::new(),
        };
        let asked = || Asked {
            head: false,
            version: Version::HTTP_11,
            trailers: false,
        };
        let mut expected = Vec::new();
        for (i, fields) in [40usize, 1, 200, 0, 1500, 3].into_iter().enumerate() {
            let mut resp = Response::new(crate::body::full(Bytes::from(format!("body {i}"))));
            for f in 0..fields {
                resp.headers_mut().append(
                    http::HeaderName::from_bytes(format!("x-f{f}").as_bytes()).unwrap(),
                    HeaderValue::from_str(&format!("{i}-{f}")).unwrap(),
                );
            }
            resp.headers_mut().insert(
                DATE,
                HeaderValue::from_static("Sun, 06 Dec 2026 16:00:00 GMT"),
            );
            let (parts, body) = resp.into_parts();
            let times = (Duration::from_secs(5), 60);
            let kept = write_response(&mut wr, parts, body, asked(), false, None, times)
                .await
                .unwrap();
            assert!(kept, "response {i}");
            assert!(wr.out.is_empty(), "response {i}");
            expected.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            for f in 0..fields {
                expected.extend_from_slice(format!("x-f{f}: {i}-{f}\r\n").as_bytes());
            }
            expected.extend_from_slice(b"date: Sun, 06 Dec 2026 16:00:00 GMT\r\n");
            expected.extend_from_slice(b"content-length: 6\r\nkeep-alive: timeout=60\r\n\r\n");
            expected.extend_from_slice(format!("body {i}").as_bytes());
        }
        // 1,500 fields make a head of about 20 KiB: its room is let go by the next response.
        assert!(wr.head.capacity() <= 16 * 1024);
        drop(wr);
        let mut got = Vec::new();
        let mut app = app;
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected)
        );
    }

    /// A body that has nothing until the test sends it.
    struct Waiting(tokio::sync::mpsc::Receiver<Bytes>);

    impl http_body::Body for Waiting {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|data| data.map(|d| Ok(http_body::Frame::data(d))))
        }
    }

    /// The head goes out as soon as it is written, before a body that waits: the head is
    /// written from its own buffer, not gathered with the body, so a response whose body
    /// comes later (an event stream, a slow app) is not held back until its first bytes.
    #[tokio::test]
    async fn a_head_goes_out_before_a_body_that_waits() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap());
        let (mut app, (ours, _)) = tokio::try_join!(app, listener.accept()).unwrap();
        let mut wr = Writer {
            io: ours.into_split().1,
            head: Vec::new(),
            out: Vec::new(),
        };
        let (send, waiting) = tokio::sync::mpsc::channel(1);
        let asked = Asked {
            head: false,
            version: Version::HTTP_11,
            trailers: false,
        };
        let (parts, body) = Response::new(Waiting(waiting)).into_parts();
        let writing = tokio::spawn(async move {
            let times = (Duration::from_secs(5), 60);
            write_response(&mut wr, parts, body, asked, false, None, times).await
        });
        let mut got = Vec::new();
        let head = tokio::time::timeout(Duration::from_secs(20), async {
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let mut chunk = [0u8; 1024];
                let n = app.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed before the head");
                got.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        assert!(head.is_ok(), "no head while the body waits: {got:?}");
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        send.send(Bytes::from_static(b"late")).await.unwrap();
        drop(send);
        assert!(writing.await.unwrap().unwrap());
        let mut rest = vec![0u8; 64];
        let n = app.read(&mut rest).await.unwrap();
        let mut all = got;
        all.extend_from_slice(&rest[..n]);
        while !all.ends_with(b"0\r\n\r\n") {
            let n = app.read(&mut rest).await.unwrap();
            assert!(n > 0, "closed before the last chunk");
            all.extend_from_slice(&rest[..n]);
        }
        assert!(String::from_utf8_lossy(&all).ends_with("\r\n\r\n4\r\nlate\r\n0\r\n\r\n"));
    }
}
