//! Closing client connections that went quiet.
//!
//! hyper's header-read timeout re-arms a runtime timer on every request of a
//! keep-alive connection. Instead, the connection's I/O records the coarse time of
//! its last read or write ([`Tracked`]), and a watchdog that wakes every few seconds
//! per connection ([`Managed`]) asks the connection to shut down gracefully once it
//! has moved no byte for the idle timeout: no per-request cost at all.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tandem_common::Shutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock;

/// The coarse time of a connection's last activity.
#[derive(Debug, Default)]
pub struct Activity(AtomicU32);

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self(AtomicU32::new(clock::now())))
    }

    #[inline]
    fn touch(&self) {
        let now = clock::now();
        if self.0.load(Ordering::Relaxed) != now {
            self.0.store(now, Ordering::Relaxed);
        }
    }

    fn idle_for(&self) -> Duration {
        Duration::from_secs(clock::now().saturating_sub(self.0.load(Ordering::Relaxed)) as u64)
    }
}

/// I/O that records its activity.
pub struct Tracked<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T> Tracked<T> {
    pub fn new(io: T, activity: Arc<Activity>) -> Self {
        Self { io, activity }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves one connection until it ends, shutting it down gracefully when the process
/// shuts down or when it moved no byte for `timeout`.
pub struct Managed<C> {
    conn: Pin<Box<C>>,
    activity: Arc<Activity>,
    timeout: Duration,
    check: Pin<Box<tokio::time::Sleep>>,
    shutdown: Pin<Box<dyn Future<Output = ()> + Send>>,
    closing: bool,
}

impl<C> Managed<C> {
    pub fn new(conn: C, activity: Arc<Activity>, timeout: Duration, shutdown: Shutdown) -> Self {
        Self {
            conn: Box::pin(conn),
            activity,
            timeout,
            check: Box::pin(tokio::time::sleep(check_every(timeout))),
            shutdown: Box::pin(async move { shutdown.wait().await }),
            closing: false,
        }
    }
}

/// Checking 4 times per timeout bounds the overshoot to a quarter of it.
fn check_every(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_secs(1))
}

impl<C: GracefulConnection> Future for Managed<C> {
    type Output = Result<(), C::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(result) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(result);
        }
        if this.closing {
            return Poll::Pending;
        }
        let mut close = this.shutdown.as_mut().poll(cx).is_ready();
        while !close && this.check.as_mut().poll(cx).is_ready() {
            if this.activity.idle_for() >= this.timeout {
                tracing::debug!(idle = ?this.timeout, "closing an idle client connection");
                close = true;
            } else {
                let next = tokio::time::Instant::now() + check_every(this.timeout);
                this.check.as_mut().reset(next);
            }
        }
        if close {
            this.closing = true;
            this.conn.as_mut().graceful_shutdown();
            return this.conn.as_mut().poll(cx);
        }
        Poll::Pending
    }
}

/// Open connections, so shutdown can wait for them to finish.
#[derive(Debug, Default)]
pub struct OpenConnections {
    count: std::sync::atomic::AtomicUsize,
    none: tokio::sync::Notify,
}

impl OpenConnections {
    pub fn open(self: &Arc<Self>) -> OpenGuard {
        self.count.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.none.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub struct OpenGuard(Arc<OpenConnections>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none.notify_waiters();
        }
    }
}
