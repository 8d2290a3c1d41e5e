use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{Sleep, sleep_until},
};

use super::{AsyncTimer, AsyncUdpSocket, Runtime};

/// A Quinn runtime for Tokio
#[derive(Debug)]
pub struct TokioRuntime;

impl Runtime for TokioRuntime {
    fn new_timer(&self, t: Instant) -> Pin<Box<dyn AsyncTimer>> {
        Box::pin(sleep_until(t.into()))
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(future);
    }

    fn wrap_udp_socket(&self, sock: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let inner = udp::UdpSocketState::new((&sock).into())?;
        sock.set_nonblocking(true)?;
        Ok(Arc::new(UdpSocket {
            inner,
            io: register(sock, Interest::READABLE)?,
            send_blocked: AtomicBool::new(false),
        }))
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

impl AsyncTimer for Sleep {
    fn reset(self: Pin<&mut Self>, t: Instant) {
        Self::reset(self, t.into())
    }
    fn poll(self: Pin<&mut Self>, cx: &mut Context) -> Poll<()> {
        Future::poll(self, cx)
    }
}

/// A UDP socket registered with tokio for reading only.
///
/// tokio's own `UdpSocket` registers for both readiness kinds, and a UDP socket is writable
/// again as soon as each datagram's buffer is freed, so every send produced a writable event:
/// one more `epoll_wait` per send on loopback, and on a real NIC a wake-up at each transmit
/// completion. Here writability is only watched after a send would have blocked, through a
/// duplicate of the socket registered for writing until it is writable again (see
/// `WritablePoller`).
#[derive(Debug)]
struct UdpSocket {
    io: AsyncFd<std::net::UdpSocket>,
    inner: udp::UdpSocketState,
    /// The last send found the socket's buffer full.
    send_blocked: AtomicBool,
}

impl AsyncUdpSocket for UdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn super::UdpPoller>> {
        Box::pin(WritablePoller {
            socket: self,
            watch: None,
        })
    }

    fn try_send(&self, transmit: &udp::Transmit) -> io::Result<()> {
        match self.inner.send(self.io.get_ref().into(), transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.send_blocked.store(true, Ordering::Relaxed);
                Err(e)
            }
            Ok(()) => {
                // Room again (another connection's sends need not wait for a watch).
                if self.send_blocked.load(Ordering::Relaxed) {
                    self.send_blocked.store(false, Ordering::Relaxed);
                }
                Ok(())
            }
            r => r,
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [udp::RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let batch = bufs.len().min(meta.len()).min(udp::BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            // An error other than WouldBlock is retried, as quinn's tokio runtime always did
            // (its endpoint driver would end on an error returned from here).
            let res = guard.try_io(|io| self.inner.recv(io.get_ref().into(), bufs, meta));
            if let Ok(Ok(n)) = res {
                // With edge-triggered epoll, fewer datagrams than asked for means the queue
                // was empty: forget the readiness now instead of learning it from one more
                // `recvmmsg` that fails with EAGAIN (tokio does the same for a short TCP read).
                // A datagram arriving after it raises a new event.
                if cfg!(any(target_os = "linux", target_os = "android")) && n < batch {
                    guard.clear_ready();
                }
                return Poll::Ready(Ok(n));
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.gro_segments()
    }
}

/// Ready at once unless a send found the socket's buffer full; then ready when a duplicate of
/// the socket, registered for writing only for that wait, reports it writable. Registering a
/// descriptor that is already writable reports it at once, so no wake-up is lost.
#[derive(Debug)]
struct WritablePoller {
    socket: Arc<UdpSocket>,
    watch: Option<AsyncFd<std::net::UdpSocket>>,
}

impl super::UdpPoller for WritablePoller {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.socket.send_blocked.load(Ordering::Relaxed) {
            this.watch = None;
            return Poll::Ready(Ok(()));
        }
        if this.watch.is_none() {
            let dup = this.socket.io.get_ref().try_clone()?;
            this.watch = Some(register(dup, Interest::WRITABLE)?);
        }
        let watch = this.watch.as_ref().expect("set above");
        let _ready = ready!(watch.poll_write_ready(cx))?;
        // Writable again: stop watching (the next send that blocks watches anew).
        this.watch = None;
        this.socket.send_blocked.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

/// Registers a socket with tokio's reactor for `interest`.
///
/// `with_interest` is deprecated because an arbitrary `AsRawFd` type may close or swap its
/// descriptor while registered; a `std::net::UdpSocket` owns its descriptor and returns the same
/// one for its whole life, which is what the unsafe `register_with_interest` asks.
#[allow(deprecated)]
fn register(
    sock: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(sock, interest)
}
