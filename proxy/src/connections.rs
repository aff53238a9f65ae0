//! Open client connections: closing the ones that went quiet, and all of them at
//! shutdown, with no per-request timer or lock.
//!
//! Each connection's I/O records the coarse time of its last read or write
//! ([`Tracked`]). One sweeper task per listener looks at every open connection once a
//! second and marks the idle ones (or all of them, at shutdown) for closing; a marked
//! connection is woken through its own [`AtomicWaker`] and closes at the next request
//! boundary: hyper's connections through a graceful shutdown ([`Managed`]), the
//! HTTP/1 and HTTP/2 paths by themselves ([`ConnControl::closing`]; HTTP/2 with a
//! GOAWAY, letting open streams finish). The registry's lock is taken when
//! a connection opens or closes and once per sweep, never per request.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock;

/// What the sweeper and a connection share.
#[derive(Debug)]
pub struct ConnControl {
    /// Coarse seconds ([`clock::now`]) of the last byte moved.
    last_active: AtomicU32,
    close: AtomicBool,
    waker: AtomicWaker,
}

impl ConnControl {
    fn new() -> Self {
        Self {
            last_active: AtomicU32::new(clock::now()),
            close: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        }
    }

    #[inline]
    fn touch(&self) {
        let now = clock::now();
        if self.last_active.load(Ordering::Relaxed) != now {
            self.last_active.store(now, Ordering::Relaxed);
        }
    }

    fn idle_for(&self) -> Duration {
        let last = self.last_active.load(Ordering::Relaxed);
        Duration::from_secs(clock::now().saturating_sub(last) as u64)
    }

    /// Whether the connection should close at its next request boundary. `cx` is
    /// woken when that changes, so a connection waiting for its client can ask this
    /// before every wait.
    #[inline]
    pub fn closing(&self, cx: &mut Context<'_>) -> bool {
        // Register first: a close that lands between the two is then not missed.
        self.waker.register(cx.waker());
        self.close.load(Ordering::Acquire)
    }

    /// Whether the connection was marked for closing (without registering to hear of it).
    #[inline]
    pub fn is_closing(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }

    fn mark_closing(&self) {
        if !self.close.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }
}

/// The open connections of one listener.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, Arc<ConnControl>>>,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    none_open: tokio::sync::Notify,
}

impl Connections {
    /// Registers a new connection; it is forgotten when the guard drops.
    pub fn open(self: &Arc<Self>) -> ConnGuard {
        let control = Arc::new(ConnControl::new());
        if self.shutting_down.load(Ordering::Acquire) {
            control.mark_closing();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, control.clone());
        ConnGuard {
            connections: self.clone(),
            id,
            control,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnControl>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks connections that moved no byte for `idle_timeout` every second, until
    /// the process stops.
    pub async fn sweep(self: Arc<Self>, idle_timeout: Duration) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            for control in self.lock().values() {
                if control.idle_for() >= idle_timeout {
                    tracing::debug!(idle = ?idle_timeout, "closing an idle client connection");
                    control.mark_closing();
                }
            }
        }
    }

    /// Asks every open connection (and every one opened from now on) to close at its
    /// next request boundary.
    pub fn close_all(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for control in self.lock().values() {
            control.mark_closing();
        }
    }

    /// Resolves once no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.none_open.notified();
            tokio::pin!(notified);
            // Register before checking, so a close between the two is not missed.
            notified.as_mut().enable();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// One open connection; unregisters it when dropped.
pub struct ConnGuard {
    connections: Arc<Connections>,
    id: u64,
    control: Arc<ConnControl>,
}

impl ConnGuard {
    pub fn control(&self) -> &Arc<ConnControl> {
        &self.control
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut open = self.connections.lock();
        open.remove(&self.id);
        if open.is_empty() {
            drop(open);
            self.connections.none_open.notify_waiters();
        }
    }
}

/// I/O that records its activity.
pub struct Tracked<T> {
    io: T,
    control: Arc<ConnControl>,
}

impl<T> Tracked<T> {
    pub fn new(io: T, control: Arc<ConnControl>) -> Self {
        Self { io, control }
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
            self.control.touch();
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
            self.control.touch();
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
            self.control.touch();
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

/// A hyper connection that shuts down gracefully once its [`ConnControl`] is marked.
pub struct Managed<C> {
    conn: Pin<Box<C>>,
    control: Arc<ConnControl>,
    closing: bool,
}

impl<C> Managed<C> {
    pub fn new(conn: C, control: Arc<ConnControl>) -> Self {
        Self {
            conn: Box::pin(conn),
            control,
            closing: false,
        }
    }
}

impl<C: GracefulConnection> Future for Managed<C> {
    type Output = Result<(), C::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.closing && this.control.closing(cx) {
            this.closing = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_all_marks_open_and_later_connections() {
        let connections = Arc::new(Connections::default());
        let first = connections.open();
        assert!(!first.control().is_closing());
        connections.close_all();
        assert!(first.control().is_closing());
        let later = connections.open();
        assert!(later.control().is_closing(), "opened during shutdown");
        assert_eq!(connections.len(), 2);
        drop((first, later));
        tokio::time::timeout(Duration::from_secs(1), connections.all_closed())
            .await
            .expect("all closed");
    }
}
