//! The app's HTTP/1.1 connection as hyper sees it, with two things added that hyper's server
//! cannot do itself.
//!
//! **Parse errors.** hyper answers HTTP/1.1 it cannot parse (bad header bytes, conflicting
//! `Content-Length`, a head over the size limit) itself, with a bare `400`/`431`/`414` and no
//! way to change it. This wrapper recognises that automatic response on its way out and
//! replaces it with quicar's own: the same status, `quicar-error`, and a one-line reason. How it
//! tells: hyper writes it only when no response is in progress, while every response our service
//! produced is counted (`served`) before its head is written. So a response head written when
//! all served heads were already seen, and that has exactly hyper's canned shape (status line,
//! `connection: close`, `content-length: 0`, `date`), is hyper's.
//!
//! **Interim responses** (`103 Early Hints`…), which hyper's server has no API for. The request
//! path hands them to `Shared::interim_for(seq)`, which queues their bytes for request `seq`
//! (the connection's requests are numbered as the service is called, one at a time). They are
//! written (a) when hyper flushes the connection while request `seq`'s final response is still
//! being prepared and every earlier response head has been seen: hyper calls `poll_flush` on the
//! connection only once its own write buffer is empty, and it reads request `seq` only after
//! the previous response was written whole, so nothing else is due on the wire; or (b) just
//! before request `seq`'s final head, when that arrives first. Queued bytes of a request whose
//! final head went out are dropped, never written after it. The request path wakes the
//! connection task when it queues.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};

use http::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ErrorKind;
use crate::interim::Interim;

/// What the request path and the wrapper share on one app connection.
#[derive(Default)]
pub(crate) struct Shared {
    /// Requests handed to our service so far.
    started: AtomicU64,
    /// Responses our service produced so far.
    served: AtomicU64,
    interim: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    /// Interim response heads, as bytes, with the number of their request.
    items: VecDeque<(u64, Vec<u8>)>,
    /// The connection task, woken when an item is queued.
    waker: Option<Waker>,
}

impl Shared {
    /// A request starts; its number on this connection.
    pub(crate) fn start(&self) -> u64 {
        self.started.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Our service produced the current request's response (its head comes next).
    pub(crate) fn served(&self) {
        self.served.fetch_add(1, Ordering::Release);
    }

    /// Where the interim responses of request `seq` go.
    pub(crate) fn interim_for(self: &Arc<Self>, seq: u64) -> Interim {
        let shared = self.clone();
        Interim::new(move |resp| {
            let bytes = head_bytes(&resp);
            let mut q = shared.interim.lock().expect("not poisoned");
            q.items.push_back((seq, bytes));
            if let Some(w) = q.waker.take() {
                w.wake();
            }
        })
    }
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
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

pub(crate) struct AppIo<S> {
    inner: S,
    shared: Arc<Shared>,
    heads_seen: u64,
    /// A replacement being written, and how many bytes of the original it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
    /// Interim bytes being written, and how far.
    out: Vec<u8>,
    out_pos: usize,
    /// A served head was recognised and has not been passed on whole yet (hyper writes the same
    /// bytes again after `Pending`: they are not counted twice).
    head_in_progress: bool,
    max_header_bytes: usize,
}

impl<S> AppIo<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>, max_header_bytes: usize) -> Self {
        Self {
            inner,
            shared,
            heads_seen: 0,
            pending: None,
            out: Vec::new(),
            out_pos: 0,
            head_in_progress: false,
            max_header_bytes,
        }
    }

    /// Moves the queued interim heads of request `seq` into `out` (dropping any of requests
    /// whose final head went out), and notes the task to wake.
    fn take_interim(&mut self, seq: u64, served: u64, waker: &Waker) {
        let mut q = self.shared.interim.lock().expect("not poisoned");
        if !q.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            q.waker = Some(waker.clone());
        }
        q.items.retain(|(s, _)| *s > served || *s == seq);
        while q.items.front().is_some_and(|(s, _)| *s == seq) {
            let (_, bytes) = q.items.pop_front().expect("checked");
            if self.out_pos == self.out.len() {
                self.out.clear();
                self.out_pos = 0;
            }
            self.out.extend_from_slice(&bytes);
        }
    }
}

impl<S: AsyncWrite + Unpin> AppIo<S> {
    /// Writes out what `out` holds.
    fn drain_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// The status of hyper's automatic error response, if `buf` is exactly one.
fn canned_status(buf: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(buf).ok()?;
    let head = text.strip_suffix("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")?
        .get(..3)?
        .parse()
        .ok()?;
    if !matches!(status, 400 | 414 | 431) {
        return None;
    }
    let mut saw_length = false;
    for l in lines {
        let lower = l.to_ascii_lowercase();
        if lower == "content-length: 0" {
            saw_length = true;
        } else if !lower.starts_with("date: ") && lower != "connection: close" {
            return None;
        }
    }
    saw_length.then_some(status)
}

fn replacement(status: u16, max_header_bytes: usize) -> Vec<u8> {
    let (kind, reason) = match status {
        431 => (
            ErrorKind::HeadersTooLarge,
            format!("the request header section is over {max_header_bytes} bytes (outbound.max_header_bytes)"),
        ),
        414 => (ErrorKind::BadRequest, "the request target is too long".to_string()),
        _ => (
            ErrorKind::BadRequest,
            "the request is not valid HTTP/1.1 (bad header bytes, or ambiguous framing such as conflicting Content-Length)"
                .to_string(),
        ),
    };
    let body = format!("quicar: {}: {reason}\n", kind.as_str());
    let phrase = match status {
        431 => "Request Header Fields Too Large",
        414 => "URI Too Long",
        _ => "Bad Request",
    };
    format!(
        "HTTP/1.1 {status} {phrase}\r\n{}: {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        crate::headers::QUICAR_ERROR,
        kind.as_str(),
        body.len()
    )
    .into_bytes()
}

impl<S: AsyncRead + Unpin> AsyncRead for AppIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AppIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        // An interim head being written goes out whole first.
        ready!(this.drain_out(cx))?;
        if this.pending.is_none() && !this.head_in_progress {
            let served = this.shared.served.load(Ordering::Acquire);
            if served > this.heads_seen && buf.starts_with(b"HTTP/1.1 ") {
                this.heads_seen += 1;
                this.head_in_progress = true;
                // (b) interim responses still queued for this request go just before its head.
                this.take_interim(this.heads_seen, served, cx.waker());
                ready!(this.drain_out(cx))?;
            } else if served == this.heads_seen {
                if let Some(status) = canned_status(buf) {
                    this.pending = Some((replacement(status, this.max_header_bytes), 0, buf.len()));
                }
            }
        }
        if let Some((bytes, written, stands_for)) = this.pending.as_mut() {
            while *written < bytes.len() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
            let n = *stands_for;
            this.pending = None;
            return Poll::Ready(Ok(n));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.head_in_progress = false;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // (a) hyper's own buffer is empty: the interim responses of the request being prepared
        // may go now, if every earlier response head was seen (its final head is not yet due).
        let served = this.shared.served.load(Ordering::Acquire);
        let next = this.heads_seen + 1;
        if served < next {
            this.take_interim(next, served, cx.waker());
        } else {
            this.take_interim(0, served, cx.waker());
        }
        ready!(this.drain_out(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_hypers_canned_response() {
        let canned = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 23 Nov 2026 10:00:00 GMT\r\n\r\n";
        assert_eq!(canned_status(canned), Some(400));
        let too_large =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(canned_status(too_large), Some(431));
        let app = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nx-app: 1\r\ndate: x\r\n\r\n";
        assert_eq!(canned_status(app), None);
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert_eq!(canned_status(ok), None);
        let text = String::from_utf8(replacement(431, 65536)).unwrap();
        assert!(
            text.contains("quicar-error: headers-too-large")
                && text.ends_with("(outbound.max_header_bytes)\n"),
            "{text}"
        );
    }
}
