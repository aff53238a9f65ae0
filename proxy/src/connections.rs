//! Open client connections: the limits on them, with no per-request timer or lock.
//!
//! Each connection's I/O records the coarse time of its last read or write
//! ([`Tracked`]), and the HTTP/1 path says which phase a connection is in
//! ([`Phase`]: waiting between requests, reading a head, forwarding a request). One
//! sweeper task per listener looks at every open connection once a second and
//! enforces, to the second:
//! - the idle timeout: a connection quiet between requests is closed at its next
//!   request boundary (hyper's connections through a graceful shutdown, [`Managed`];
//!   the HTTP/1 and HTTP/2 paths by themselves, [`ConnControl::closing`]; HTTP/2 with
//!   a GOAWAY, letting open streams finish);
//! - the header-read timeout: a request head must arrive whole within it of its first
//!   byte (the HTTP/1 path then answers 408 and closes);
//! - the stream idle timeout: a request that moved no byte for that long is given up
//!   (504 if its response had not begun).
//!
//! At shutdown every connection drains: it answers what arrives with
//! `Connection: close` (HTTP/2: GOAWAY), and one that stays quiet between requests
//! is closed. The number of open connections is capped: at the cap, the connection
//! quiet for the longest is closed to make room, and only when none is quiet is a
//! new one refused. The registry's lock is taken when a connection opens or closes
//! and once per sweep, never per request.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock;
use crate::metrics::ProxyMetrics;

/// During a drain, a connection quiet between requests for this long is closed
/// (coarse seconds: at least one whole second). Closing one at once would race with
/// a request its client is sending at that moment.
const DRAIN_QUIET_SECS: u32 = 2;
/// Connections that have been quiet at least this long (coarse seconds) may be
/// closed to make room for new ones at the cap.
const SHED_QUIET_SECS: u32 = 1;

/// What a connection is doing, as far as its limits care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Between requests, no byte of the next one yet (or a new connection).
    Idle = 0,
    /// Some bytes of a request head are in, not the whole head (HTTP/1 path).
    Head = 1,
    /// Forwarding a request and relaying its response (HTTP/1 path).
    Busy = 2,
    /// A request in flight in hyper, whose forwarding keeps its own time limits.
    Delegated = 3,
    /// HTTP/2: requests come and go on their streams, each with its own limits.
    Multiplexed = 4,
}

/// Why a connection must stop what it is doing now, not at a request boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stop {
    /// Its request head did not arrive whole within the header-read timeout.
    HeaderTimeout = 1,
    /// Its request moved no byte for the stream idle timeout.
    StreamIdle = 2,
}

/// The limits the sweeper enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// A connection quiet between requests for this long is closed.
    pub idle_timeout: Duration,
    /// A request head must arrive whole within this long of its first byte.
    pub header_read_timeout: Duration,
    /// A request that moved no byte for this long is given up.
    pub stream_idle_timeout: Duration,
    /// Open client connections at most (see [`Connections::open`]).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(300),
            header_read_timeout: Duration::from_secs(10),
            stream_idle_timeout: Duration::from_secs(300),
            max_connections: usize::MAX,
        }
    }
}

/// Whether more than `limit` has passed since the coarse second `since`: the coarse
/// clock then moved on by more than its whole seconds (so at least `limit` passed,
/// at most two seconds more).
fn exceeded(since: u32, limit: Duration) -> bool {
    clock::now().saturating_sub(since) as u64 > limit.as_secs()
}

/// What the sweeper and a connection share.
#[derive(Debug)]
pub struct ConnControl {
    /// Coarse seconds ([`clock::now`]) of the last byte moved.
    last_active: AtomicU32,
    phase: AtomicU8,
    /// Coarse seconds when the current [`Phase::Head`] began.
    head_since: AtomicU32,
    /// Close at the next request boundary.
    close: AtomicBool,
    /// The proxy is shutting down: answer with `Connection: close`.
    draining: AtomicBool,
    /// A [`Stop`], or 0.
    stop: AtomicU8,
    waker: AtomicWaker,
    /// Requests waiting on a coarse deadline ([`crate::deadline`]), woken by the
    /// next sweep.
    waiting: Mutex<Waiting>,
}

/// The wakers of requests waiting for the next sweep. A request takes its waker out
/// when it ends (a waker keeps its whole task alive, a stream's future with it).
#[derive(Debug, Default)]
struct Waiting {
    /// Sweeps so far: a place in `wakers` is only valid in the sweep it was taken in.
    sweep: u32,
    wakers: slab::Slab<Waker>,
}

/// Where a request's waker waits for the next sweep: (sweep, place).
pub type SweepTicket = Option<(u32, usize)>;

impl ConnControl {
    fn new() -> Self {
        Self {
            last_active: AtomicU32::new(clock::now()),
            phase: AtomicU8::new(Phase::Idle as u8),
            head_since: AtomicU32::new(0),
            close: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            stop: AtomicU8::new(0),
            waker: AtomicWaker::new(),
            waiting: Mutex::new(Waiting::default()),
        }
    }

    /// A connection outside any registry.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self::new()
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes `waker` at the next sweep (once a second), unless `ticket` says it is
    /// already waiting for that sweep.
    pub fn wake_at_next_sweep(&self, waker: &Waker, ticket: &mut SweepTicket) {
        let mut waiting = self.lock_waiting();
        if ticket.is_some_and(|(sweep, _)| sweep == waiting.sweep) {
            return;
        }
        let place = waiting.wakers.insert(waker.clone());
        *ticket = Some((waiting.sweep, place));
    }

    /// Takes a request's waker out of the next sweep's list (it ended).
    pub fn stop_waiting(&self, ticket: &mut SweepTicket) {
        if let Some((sweep, place)) = ticket.take() {
            let mut waiting = self.lock_waiting();
            if waiting.sweep == sweep {
                waiting.wakers.try_remove(place);
            }
        }
    }

    /// One sweep: every request waiting on a coarse deadline is woken to look at it.
    pub(crate) fn sweep_wake(&self) {
        let wakers = {
            let mut waiting = self.lock_waiting();
            waiting.sweep = waiting.sweep.wrapping_add(1);
            if waiting.wakers.is_empty() {
                return;
            }
            std::mem::take(&mut waiting.wakers)
        };
        for (_, waker) in wakers {
            waker.wake();
        }
    }

    /// Requests waiting for the next sweep.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.lock_waiting().wakers.len()
    }

    #[inline]
    fn touch(&self) {
        let now = clock::now();
        if self.last_active.load(Ordering::Relaxed) != now {
            self.last_active.store(now, Ordering::Relaxed);
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Idle,
            1 => Phase::Head,
            2 => Phase::Busy,
            3 => Phase::Delegated,
            _ => Phase::Multiplexed,
        }
    }

    /// Says what the connection does now. Entering [`Phase::Head`] starts the
    /// header-read clock; staying in it does not restart it.
    #[inline]
    pub fn set_phase(&self, phase: Phase) {
        // Plain stores (not a swap): only this connection's task writes its phase.
        if phase == Phase::Head {
            if self.phase.load(Ordering::Relaxed) != Phase::Head as u8 {
                self.head_since.store(clock::now(), Ordering::Relaxed);
                self.phase.store(Phase::Head as u8, Ordering::Relaxed);
            }
        } else {
            self.phase.store(phase as u8, Ordering::Relaxed);
        }
    }

    /// Bytes came from the client: between requests, they begin a request head.
    #[inline]
    fn bytes_arrived(&self) {
        if self.phase.load(Ordering::Relaxed) == Phase::Idle as u8 {
            self.set_phase(Phase::Head);
        }
    }

    /// Whether the connection moved no byte for more than `limit`.
    fn quiet_for(&self, limit: Duration) -> bool {
        exceeded(self.last_active.load(Ordering::Relaxed), limit)
    }

    /// Whole seconds since the connection last moved a byte (coarse).
    pub fn quiet_secs(&self) -> u32 {
        clock::now().saturating_sub(self.last_active.load(Ordering::Relaxed))
    }

    /// Whether the connection should close at its next request boundary. `cx` is
    /// woken when that changes (or a [`Stop`] comes), so a connection waiting for
    /// its client can ask this before every wait.
    #[inline]
    pub fn closing(&self, cx: &mut Context<'_>) -> bool {
        // Register first: a close that lands between the two is then not missed.
        self.waker.register(cx.waker());
        self.close.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire) != 0
    }

    /// Whether the connection was marked for closing (without registering to hear of it).
    #[inline]
    pub fn is_closing(&self) -> bool {
        self.close.load(Ordering::Acquire)
    }

    /// Whether the proxy is shutting down (or the connection is closing): answers
    /// should say `Connection: close`.
    #[inline]
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire) || self.close.load(Ordering::Acquire)
    }

    /// Why the connection must stop what it is doing, if it must; `cx` is woken
    /// when that changes.
    #[inline]
    pub fn stopping(&self, cx: &mut Context<'_>) -> Option<Stop> {
        self.waker.register(cx.waker());
        self.stop_reason()
    }

    /// [`stopping`](Self::stopping) and [`closing`](Self::closing) at once (one
    /// waker registration): a stop, or whether to close at the next boundary.
    #[inline]
    pub fn signals(&self, cx: &mut Context<'_>) -> Result<bool, Stop> {
        self.waker.register(cx.waker());
        match self.stop_reason() {
            Some(stop) => Err(stop),
            None => Ok(self.close.load(Ordering::Acquire)),
        }
    }

    /// Why the connection must stop, without registering to hear of it.
    #[inline]
    pub fn stop_reason(&self) -> Option<Stop> {
        match self.stop.load(Ordering::Acquire) {
            1 => Some(Stop::HeaderTimeout),
            2 => Some(Stop::StreamIdle),
            _ => None,
        }
    }

    fn mark_closing(&self) {
        if !self.close.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    fn mark_draining(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    fn mark_stop(&self, stop: Stop) {
        if self
            .stop
            .compare_exchange(0, stop as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// What the sweeper does with this connection now, under `limits`.
    fn sweep(&self, limits: &Limits, shutting_down: bool) -> Option<Swept> {
        match self.phase() {
            Phase::Head
                if exceeded(
                    self.head_since.load(Ordering::Relaxed),
                    limits.header_read_timeout,
                ) =>
            {
                self.mark_stop(Stop::HeaderTimeout);
                Some(Swept::HeaderTimeout)
            }
            Phase::Head => None,
            Phase::Busy if self.quiet_for(limits.stream_idle_timeout) => {
                self.mark_stop(Stop::StreamIdle);
                Some(Swept::StreamIdle)
            }
            Phase::Busy | Phase::Delegated => None,
            Phase::Idle | Phase::Multiplexed => {
                // HTTP/2 says GOAWAY, which no request in flight can miss: at once.
                let drained = shutting_down
                    && (self.phase() == Phase::Multiplexed
                        || self.quiet_secs() >= DRAIN_QUIET_SECS);
                if (drained || self.quiet_for(limits.idle_timeout)) && !self.is_closing() {
                    self.mark_closing();
                    return Some(Swept::Idle);
                }
                None
            }
        }
    }

    /// Whether this connection may be closed to make room for a new one.
    fn sheddable(&self) -> bool {
        matches!(self.phase(), Phase::Idle | Phase::Multiplexed)
            && self.quiet_secs() >= SHED_QUIET_SECS
            && !self.is_closing()
    }
}

/// What one sweep did to a connection (for the counters).
enum Swept {
    Idle,
    HeaderTimeout,
    StreamIdle,
}

/// The connection to close to make room: the one quiet for the longest, the oldest
/// of those (ids grow with age).
fn quietest(open: &HashMap<u64, Arc<ConnControl>>) -> Option<&Arc<ConnControl>> {
    open.iter()
        .filter(|(_, c)| c.sheddable())
        .min_by_key(|(id, c)| (c.last_active.load(Ordering::Relaxed), **id))
        .map(|(_, c)| c)
}

/// A new connection found the cap reached and nothing quiet to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtCapacity;

/// The open connections of one listener.
#[derive(Debug, Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, Arc<ConnControl>>>,
    next_id: AtomicU64,
    shutting_down: AtomicBool,
    none_open: tokio::sync::Notify,
    limits: Limits,
    metrics: Arc<ProxyMetrics>,
    /// Open connections (kept beside the map, so the count needs no lock).
    len: AtomicUsize,
}

impl Connections {
    pub fn new(limits: Limits, metrics: Arc<ProxyMetrics>) -> Self {
        metrics
            .max_client_connections
            .set(limits.max_connections.min(i64::MAX as usize) as i64);
        Self {
            limits,
            metrics,
            ..Default::default()
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Registers a new connection; it is forgotten when the guard drops. At the cap,
    /// the connection quiet for the longest is asked to close to make room; with
    /// none quiet, the new one is refused.
    pub fn open(self: &Arc<Self>) -> Result<ConnGuard, AtCapacity> {
        let control = Arc::new(ConnControl::new());
        if self.shutting_down.load(Ordering::Acquire) {
            control.mark_draining();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut open = self.lock();
            if open.len() >= self.limits.max_connections {
                match quietest(&open) {
                    Some(victim) => {
                        victim.mark_closing();
                        self.metrics.connections_shed.inc();
                    }
                    None => {
                        self.metrics.connections_refused.inc();
                        return Err(AtCapacity);
                    }
                }
            }
            open.insert(id, control.clone());
            self.len.store(open.len(), Ordering::Relaxed);
        }
        Ok(ConnGuard {
            connections: self.clone(),
            id,
            control,
        })
    }

    /// Asks the quietest connection to close, to free its file descriptor (when
    /// accepting failed for want of one). False if none was quiet.
    pub fn shed_one(&self) -> bool {
        if let Some(victim) = quietest(&self.lock()) {
            victim.mark_closing();
            self.metrics.connections_shed.inc();
            return true;
        }
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnControl>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Enforces the limits every second, until the process stops.
    pub async fn sweep(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            self.sweep_once();
        }
    }

    fn sweep_once(&self) {
        let shutting_down = self.shutting_down.load(Ordering::Acquire);
        for control in self.lock().values() {
            control.sweep_wake();
            // A stopped request is counted where it is answered (504, per destination).
            match control.sweep(&self.limits, shutting_down) {
                Some(Swept::Idle) => self.metrics.idle_connections_closed.inc(),
                Some(Swept::HeaderTimeout) => self.metrics.header_read_timeouts.inc(),
                Some(Swept::StreamIdle) | None => 0,
            };
        }
    }

    /// Starts draining every open connection (and every one opened from now on):
    /// answers say `Connection: close` (HTTP/2 connections get GOAWAY at once), and
    /// connections quiet between requests are closed by the sweeps that follow.
    pub fn close_all(&self) {
        self.shutting_down.store(true, Ordering::Release);
        for control in self.lock().values() {
            control.mark_draining();
        }
        self.sweep_once();
    }

    /// Closes every open connection at its next request boundary, however recently
    /// it was active (the end of a shutdown's grace period).
    pub fn close_now(&self) {
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
        self.connections.len.store(open.len(), Ordering::Relaxed);
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
            self.control.bytes_arrived();
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

/// A hyper connection that shuts down gracefully once its [`ConnControl`] is marked
/// for closing, or at once during a drain while it has a request in flight (hyper
/// then answers it with `Connection: close`); it is dropped when its request head
/// does not arrive in time.
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

    /// Whether to start a graceful shutdown now.
    fn should_close(&self, cx: &mut Context<'_>) -> bool {
        !self.closing
            && (self.control.closing(cx)
                || (self.control.is_draining() && self.control.phase() == Phase::Delegated))
    }
}

/// A connection that can be asked to finish its exchange in progress and close.
pub trait Graceful: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, B, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

/// `None` when the connection was dropped for a late request head.
impl<C: Graceful> Future for Managed<C> {
    type Output = Option<C::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.control.stop_reason().is_some() {
            tracing::debug!("closing a connection whose request head was late");
            return Poll::Ready(None);
        }
        loop {
            if this.should_close(cx) {
                this.closing = true;
                this.conn.as_mut().graceful_shutdown();
            }
            let polled = this.conn.as_mut().poll(cx);
            // A request that arrived during this poll, while draining: shut down
            // now, so its answer says `Connection: close`.
            if polled.is_ready() || !this.should_close(cx) {
                return polled.map(Some);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_all_drains_open_and_later_connections() {
        let connections = Arc::new(Connections::default());
        let first = connections.open().unwrap();
        assert!(!first.control().is_draining());
        connections.close_all();
        assert!(first.control().is_draining());
        assert!(
            !first.control().is_closing(),
            "a connection active this second is not closed at once"
        );
        let later = connections.open().unwrap();
        assert!(later.control().is_draining(), "opened during shutdown");
        assert_eq!(connections.len(), 2);
        connections.close_now();
        assert!(first.control().is_closing() && later.control().is_closing());
        drop((first, later));
        tokio::time::timeout(Duration::from_secs(1), connections.all_closed())
            .await
            .expect("all closed");
    }

    #[test]
    fn phases_decide_what_the_limits_do() {
        let limits = Limits {
            idle_timeout: Duration::ZERO,
            header_read_timeout: Duration::ZERO,
            stream_idle_timeout: Duration::ZERO,
            max_connections: 2,
        };
        let c = ConnControl::new();
        // Nothing is exceeded within the second a phase began.
        assert!(c.sweep(&limits, false).is_none());
        c.bytes_arrived();
        assert_eq!(c.phase(), Phase::Head);
        c.set_phase(Phase::Busy);
        c.bytes_arrived();
        assert_eq!(c.phase(), Phase::Busy, "bytes of a body are not a new head");
        c.set_phase(Phase::Delegated);
        assert!(
            c.sweep(&limits, true).is_none(),
            "hyper keeps its own limits"
        );
        assert!(!c.sheddable());
    }

    #[test]
    fn at_the_cap_only_quiet_connections_make_room() {
        let limits = Limits {
            max_connections: 1,
            ..Limits::default()
        };
        let connections = Arc::new(Connections::new(limits, Arc::default()));
        let first = connections.open().unwrap();
        // Active this second: not quiet enough to close for a newcomer.
        assert_eq!(connections.open().err(), Some(AtCapacity));
        assert_eq!(connections.metrics.connections_refused.get(), 1);
        first.control().set_phase(Phase::Busy);
        assert!(!first.control().sheddable());
    }
}
