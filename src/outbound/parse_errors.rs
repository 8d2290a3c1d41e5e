//! hyper answers HTTP/1.1 it cannot parse (bad header bytes, conflicting `Content-Length`, a head
//! over the size limit) itself, with a bare `400`/`431`/`414` and no way to change it. This IO
//! wrapper recognises that automatic response on its way out and replaces it with quicar's own:
//! the same status, `quicar-error`, and a one-line reason.
//!
//! How it tells: hyper writes it only when no response is in progress, while every response our
//! service produced is counted (`served`) before its head is written. So a response head written
//! when all served heads were already seen, and that has exactly hyper's canned shape (status
//! line, `connection: close`, `content-length: 0`, `date`), is hyper's.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ErrorKind;

pub(crate) struct ParseErrors<S> {
    inner: S,
    served: Arc<AtomicU64>,
    heads_seen: u64,
    /// A replacement being written, and how many bytes of the original it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
    max_header_bytes: usize,
}

impl<S> ParseErrors<S> {
    pub(crate) fn new(inner: S, served: Arc<AtomicU64>, max_header_bytes: usize) -> Self {
        Self {
            inner,
            served,
            heads_seen: 0,
            pending: None,
            max_header_bytes,
        }
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

impl<S: AsyncRead + Unpin> AsyncRead for ParseErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ParseErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            let served = this.served.load(Ordering::Acquire);
            if served > this.heads_seen && buf.starts_with(b"HTTP/1.1 ") {
                this.heads_seen += 1;
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
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
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
