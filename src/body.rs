//! Bodies: the boxed body type both listeners speak, and an adapter that exposes the receive
//! half of an HTTP/3 request stream as an `http_body::Body`, read only as fast as the consumer
//! writes (so QUIC flow control carries backpressure end to end).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

pub(crate) fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub(crate) fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The receive side of an HTTP/3 request stream, client or server.
pub(crate) trait RecvHalf: Send + Unpin + 'static {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>>;
    fn poll_trailers(&mut self, cx: &mut Context<'_>)
        -> Poll<Result<Option<HeaderMap>, BodyError>>;
    /// Asks the peer to stop sending (STOP_SENDING with an HTTP/3 error code; dropped
    /// unstopped, quinn would send code 0, which HTTP/3 does not define).
    fn stop(&mut self, code: h3::error::Code);
}

impl RecvHalf for h3::client::RequestStream<h3_quinn::RecvStream, Bytes> {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>> {
        let r = ready!(self.poll_recv_data(cx));
        Poll::Ready(
            r.map(|o| o.map(|mut b| b.copy_to_bytes(b.remaining())))
                .map_err(Into::into),
        )
    }
    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, BodyError>> {
        self.poll_recv_trailers(cx).map_err(Into::into)
    }
    fn stop(&mut self, code: h3::error::Code) {
        self.stop_sending(code);
    }
}

impl RecvHalf for h3::server::RequestStream<h3_quinn::RecvStream, Bytes> {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, BodyError>> {
        let r = ready!(self.poll_recv_data(cx));
        Poll::Ready(
            r.map(|o| o.map(|mut b| b.copy_to_bytes(b.remaining())))
                .map_err(Into::into),
        )
    }
    fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, BodyError>> {
        self.poll_recv_trailers(cx).map_err(Into::into)
    }
    fn stop(&mut self, code: h3::error::Code) {
        self.stop_sending(code);
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Data,
    Trailers,
    Done,
}

/// An HTTP/3 message body as an `http_body::Body`. With a `content-length` it reports an exact
/// size (so HTTP/1.1 sends it sized) and refuses a body that is longer or shorter.
pub(crate) struct H3Body<R: RecvHalf> {
    /// `None` only once dropped (handed to the drain task).
    recv: Option<R>,
    state: State,
    remaining: Option<u64>,
    /// Read the stream to its FIN when dropped early (the server side of a request).
    drain: bool,
}

impl<R: RecvHalf> H3Body<R> {
    /// `drain` (the server side of a request): when dropped before its end, keep reading the
    /// stream to its FIN in the background, bounded by `DRAIN_TIME` and `DRAIN_BYTES`.
    /// HTTP/1.1 stops reading a sized body at its last byte, before the HTTP/3 stream's FIN,
    /// and a peer that is asked to stop there may drop the response (Envoy did); read on, the
    /// FIN arrives and nothing is stopped. A body the app left unread past the bounds is
    /// stopped with `H3_NO_ERROR` (RFC 9114 §4.1.2: the response is complete, the rest of the
    /// request is not needed).
    ///
    /// Without `drain` (the client side, a response), a body dropped before its end is a
    /// response the caller gave up: it is stopped at once with `H3_REQUEST_CANCELLED`
    /// (RFC 9114 §4.1.1).
    pub(crate) fn new(recv: R, content_length: Option<u64>, drain: bool) -> Self {
        Self {
            recv: Some(recv),
            state: State::Data,
            remaining: content_length,
            drain,
        }
    }
}

/// How long, and how many bytes, a request stream is read past the point its app stopped.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);
const DRAIN_BYTES: u64 = 1 << 20;

impl<R: RecvHalf> Drop for H3Body<R> {
    fn drop(&mut self) {
        if self.state == State::Done {
            return;
        }
        let Some(mut recv) = self.recv.take() else {
            return;
        };
        if !self.drain {
            return recv.stop(h3::error::Code::H3_REQUEST_CANCELLED);
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return recv.stop(h3::error::Code::H3_NO_ERROR);
        };
        let mut left = DRAIN_BYTES;
        rt.spawn(async move {
            let drained = tokio::time::timeout(DRAIN_TIME, async {
                loop {
                    match std::future::poll_fn(|cx| recv.poll_data(cx)).await {
                        Ok(Some(data)) if (data.len() as u64) < left => left -= data.len() as u64,
                        // Past the bytes a drain reads: the app left the body unread.
                        Ok(Some(_)) => return false,
                        Ok(None) => break,
                        // Reset by the peer: nothing left to stop.
                        Err(_) => return true,
                    }
                }
                let _ = std::future::poll_fn(|cx| recv.poll_trailers(cx)).await;
                true
            })
            .await;
            if drained != Ok(true) {
                tracing::debug!("an unread request body stopped after the drain's bounds");
                recv.stop(h3::error::Code::H3_NO_ERROR);
            }
        });
    }
}

impl<R: RecvHalf> Body for H3Body<R> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            match this.state {
                State::Data => match ready!(this
                    .recv
                    .as_mut()
                    .expect("present until dropped")
                    .poll_data(cx))
                {
                    Ok(Some(data)) => {
                        if let Some(left) = this.remaining.as_mut() {
                            let n = data.len() as u64;
                            if n > *left {
                                this.state = State::Done;
                                return Poll::Ready(Some(Err(
                                    "body longer than its content-length".into(),
                                )));
                            }
                            *left -= n;
                        }
                        if data.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(None) => {
                        if this.remaining.is_some_and(|left| left > 0) {
                            this.state = State::Done;
                            return Poll::Ready(Some(Err(
                                "body shorter than its content-length".into()
                            )));
                        }
                        this.state = State::Trailers;
                    }
                    Err(e) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Trailers => {
                    let r = ready!(this
                        .recv
                        .as_mut()
                        .expect("present until dropped")
                        .poll_trailers(cx));
                    this.state = State::Done;
                    return Poll::Ready(match r {
                        Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
                        Ok(None) => None,
                        Err(e) => Some(Err(e)),
                    });
                }
                State::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// The receive half of an HTTP/2 stream as a body: data as it arrives, each chunk's flow-control
/// window handed back only once the consumer took it (so backpressure reaches the peer), then
/// the trailers. h2 checks the data against `content-length` itself.
///
/// Dropped before the end of the stream, it resets the stream (`CANCEL`) when it holds the
/// stream's send half (`cancel_with`: the response to a body-less request, whose caller gave
/// up). Otherwise (HTTP/1.1 stops at a sized body's last byte, which can come before the frame
/// with END_STREAM) it keeps reading in the background, bounded like `H3Body`'s drain.
pub(crate) struct H2Body {
    /// `None` only once dropped (handed to the drain task).
    recv: Option<h2::RecvStream>,
    data_done: bool,
    /// The stream's send half, to cancel it with when dropped early (a response whose caller
    /// gave up).
    cancel: Option<h2::SendStream<Bytes>>,
}

impl H2Body {
    pub(crate) fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv: Some(recv),
            data_done: false,
            cancel: None,
        }
    }

    /// Dropped before the end of the stream, the body resets it (`CANCEL`) through `send`
    /// instead of draining it: the peer stops at once (and with it the far app's work), and a
    /// reset the caller asks for is not one h2 counts against the connection.
    pub(crate) fn cancel_with(mut self, send: h2::SendStream<Bytes>) -> Self {
        self.cancel = Some(send);
        self
    }
}

impl Drop for H2Body {
    fn drop(&mut self) {
        let (Some(mut recv), Ok(rt)) = (self.recv.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        if recv.is_end_stream() {
            return;
        }
        if let Some(mut send) = self.cancel.take() {
            send.send_reset(h2::Reason::CANCEL);
            return;
        }
        let mut left = DRAIN_BYTES;
        rt.spawn(async move {
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                while let Some(Ok(data)) = recv.data().await {
                    let _ = recv.flow_control().release_capacity(data.len());
                    left = left.saturating_sub(data.len() as u64);
                    if left == 0 {
                        return;
                    }
                }
                let _ = recv.trailers().await;
            })
            .await;
        });
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let recv = this.recv.as_mut().expect("present until dropped");
        if !this.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(e)))),
                None => this.data_done = true,
            }
        }
        match ready!(recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.as_ref().is_none_or(h2::RecvStream::is_end_stream)
    }
}

/// The `content-length` of a header map, when there is exactly one field and it is valid by the
/// rule the HTTP/1.1 edges frame bodies with (`h1::add_length`: digits only, or a list of equal
/// values). `str::parse` also took `+5`, which no edge would frame.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    crate::h1::lengths(headers).single()
}

/// `send` (a write toward a reader: a peer's stream), or `None` once it has waited `stall`
/// without completing: the reader stopped taking bytes. The timer is made only if it waits.
pub(crate) fn unless_stalled<F: Future>(stall: std::time::Duration, send: F) -> UnlessStalled<F> {
    UnlessStalled {
        send,
        stall,
        timer: None,
    }
}

pin_project_lite::pin_project! {
    /// See `unless_stalled`. Written by hand: an `async fn` keeps its argument and the pinned
    /// copy of it both, which doubled the size of every response future it wrapped.
    pub(crate) struct UnlessStalled<F> {
        #[pin]
        send: F,
        stall: std::time::Duration,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<F: Future> Future for UnlessStalled<F> {
    type Output = Option<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.send.poll(cx) {
            return Poll::Ready(Some(out));
        }
        let stall = *this.stall;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        timer.as_mut().poll(cx).map(|()| None)
    }
}

/// The data bytes of a request's two bodies, counted as they pass: one allocation for both.
#[derive(Debug, Default)]
pub(crate) struct ByteCounts {
    pub(crate) up: std::sync::atomic::AtomicU64,
    pub(crate) down: std::sync::atomic::AtomicU64,
}

/// One of the two counts of a `ByteCounts`.
pub(crate) struct ByteCount {
    counts: std::sync::Arc<ByteCounts>,
    down: bool,
}

impl ByteCount {
    pub(crate) fn up(counts: &std::sync::Arc<ByteCounts>) -> Self {
        Self {
            counts: counts.clone(),
            down: false,
        }
    }

    pub(crate) fn down(counts: &std::sync::Arc<ByteCounts>) -> Self {
        Self {
            counts: counts.clone(),
            down: true,
        }
    }

    fn add(&self, n: usize) {
        let c = if self.down {
            &self.counts.down
        } else {
            &self.counts.up
        };
        c.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A body that counts the data bytes passing through it, and can keep a guard alive until it
/// is dropped (the request's telemetry record is written then).
pub(crate) struct Counted<B, G = ()> {
    inner: B,
    /// `None` for a body that only holds its guard (`held`).
    count: Option<ByteCount>,
    /// Kept alive as long as the body (held inline, not boxed).
    _hold: G,
}

impl<B> Counted<B> {
    pub(crate) fn new(inner: B, count: ByteCount) -> Self {
        Self {
            inner,
            count: Some(count),
            _hold: (),
        }
    }

    pub(crate) fn hold<G: Send + 'static>(self, guard: G) -> Counted<B, G> {
        Counted {
            inner: self.inner,
            count: self.count,
            _hold: guard,
        }
    }
}

impl<B, G: Unpin> Body for Counted<B, G>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(count)) = (&r, &self.count) {
            if let Some(d) = frame.data_ref() {
                count.add(d.len());
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// For a body of unknown length, reads its first frame before the request goes on, so that an
/// empty body is known to be empty (HTTP/1.1 then sends no body instead of an empty chunked
/// one). Sized and finished bodies pass as they are.
pub(crate) async fn settle(mut body: ProxyBody) -> Result<ProxyBody, BodyError> {
    if body.is_end_stream() || body.size_hint().exact().is_some() {
        return Ok(body);
    }
    loop {
        match body.frame().await {
            None => return Ok(empty()),
            Some(first) => {
                let first = first?;
                if first.data_ref().is_some_and(|d| d.is_empty()) {
                    continue;
                }
                return Ok(Prefixed {
                    first: Some(first),
                    rest: body,
                }
                .boxed_unsync());
            }
        }
    }
}

struct Prefixed {
    first: Option<Frame<Bytes>>,
    rest: ProxyBody,
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if let Some(f) = self.first.take() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// Keeps `guard` alive until `body` is done or dropped (counts nothing; one allocation).
pub(crate) fn held<B>(body: B, guard: impl Send + Unpin + 'static) -> ProxyBody
where
    B: Body<Data = Bytes, Error = BodyError> + Send + Unpin + 'static,
{
    Counted {
        inner: body,
        count: None,
        _hold: guard,
    }
    .boxed_unsync()
}

/// Where a request body is as it streams: still coming, finished (and when), or failed (and
/// why); and when it last moved. The request path starts its deadline when the body ends and
/// cuts a body that stops moving.
pub(crate) struct Progress {
    state: tokio::sync::watch::Sender<BodyState>,
    last_moved: std::sync::Mutex<std::time::Instant>,
    ended: std::sync::Mutex<Option<std::time::Instant>>,
    failure: std::sync::Mutex<Option<BodyFailure>>,
    /// Whether the body was last asked for data and had none: a stall then is its sender's.
    /// Otherwise nobody is asking (the receiver stopped taking it, or the request has not
    /// reached a receiver yet).
    waiting: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyState {
    Streaming,
    Ended,
}

/// Why a request body did not arrive whole.
#[derive(Debug, Clone)]
pub(crate) enum BodyFailure {
    /// It crossed its limit (bytes).
    TooLarge(u64),
    /// It broke off or was malformed.
    Broken(String),
}

impl Progress {
    pub(crate) fn new() -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            state: tokio::sync::watch::Sender::new(BodyState::Streaming),
            last_moved: std::sync::Mutex::new(std::time::Instant::now()),
            ended: std::sync::Mutex::new(None),
            failure: std::sync::Mutex::new(None),
            waiting: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Whether a body that stopped moving is waiting on its sender (it was asked for data and
    /// had none), rather than on its receiver (which stopped asking).
    pub(crate) fn sender_stalled(&self) -> bool {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn end(&self) {
        self.ended
            .lock()
            .expect("not poisoned")
            .get_or_insert_with(std::time::Instant::now);
        self.state.send_replace(BodyState::Ended);
    }

    fn moved(&self) {
        *self.last_moved.lock().expect("not poisoned") = std::time::Instant::now();
    }

    fn fail(&self, why: BodyFailure) {
        self.failure
            .lock()
            .expect("not poisoned")
            .get_or_insert(why);
        self.end();
    }

    /// When the body ended (fully sent, or failed), if it has.
    pub(crate) fn ended_at(&self) -> Option<std::time::Instant> {
        *self.ended.lock().expect("not poisoned")
    }

    pub(crate) fn failure(&self) -> Option<BodyFailure> {
        self.failure.lock().expect("not poisoned").clone()
    }

    /// Wraps `body` so its progress is recorded here, failing it once it passes `limit` bytes.
    pub(crate) fn track(
        self: &std::sync::Arc<Self>,
        body: ProxyBody,
        limit: Option<u64>,
    ) -> ProxyBody {
        if body.is_end_stream() {
            self.end();
        }
        Tracked {
            inner: body,
            progress: self.clone(),
            seen: 0,
            limit,
        }
        .boxed_unsync()
    }
}

/// How `after_body` gave up.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Expired {
    /// `timeout` passed after the body ended.
    Timeout,
    /// The body sent nothing for `idle`.
    Stalled,
}

/// Runs `work` with `timeout` counted from the end of the request body, and gives up if the
/// body stops moving for `idle` before it ends: an upload that keeps moving is never cut by
/// the response timeout, and one that stalls is not held forever.
/// `work` is pinned by the caller: an async fn's argument is stored in its future beside the
/// local it is moved to, and a request's attempts future is kilobytes, copied on every move.
pub(crate) async fn after_body<F: std::future::Future>(
    progress: &Progress,
    timeout: std::time::Duration,
    idle: std::time::Duration,
    mut work: Pin<&mut F>,
) -> Result<F::Output, Expired> {
    let mut state = progress.state.subscribe();
    loop {
        if let Some(end) = progress.ended_at() {
            return tokio::time::timeout_at((end + timeout).into(), work)
                .await
                .map_err(|_| Expired::Timeout);
        }
        let stall = *progress.last_moved.lock().expect("not poisoned") + idle;
        tokio::select! {
            r = work.as_mut() => return Ok(r),
            _ = state.changed() => {}
            _ = tokio::time::sleep_until(stall.into()) => {
                let last = *progress.last_moved.lock().expect("not poisoned");
                if progress.ended_at().is_none() && last.elapsed() >= idle {
                    return Err(Expired::Stalled);
                }
            }
        }
    }
}

struct Tracked {
    inner: ProxyBody,
    progress: std::sync::Arc<Progress>,
    seen: u64,
    limit: Option<u64>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let Poll::Ready(r) = Pin::new(&mut self.inner).poll_frame(cx) else {
            self.progress
                .waiting
                .store(true, std::sync::atomic::Ordering::Relaxed);
            return Poll::Pending;
        };
        self.progress
            .waiting
            .store(false, std::sync::atomic::Ordering::Relaxed);
        match &r {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    self.seen += d.len() as u64;
                    if let Some(limit) = self.limit.filter(|l| self.seen > *l) {
                        self.progress.fail(BodyFailure::TooLarge(limit));
                        return Poll::Ready(Some(Err(format!(
                            "request body over its limit of {limit} bytes"
                        )
                        .into())));
                    }
                }
                self.progress.moved();
                if self.inner.is_end_stream() {
                    self.progress.end();
                }
            }
            Some(Err(e)) => self.progress.fail(BodyFailure::Broken(e.to_string())),
            None => self.progress.end(),
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
