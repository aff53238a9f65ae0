//! What every pool of connections to a backend endpoint shares: its settings, the
//! lock-free queue idle connections wait in, and the dial that makes a new one.
//!
//! The pools themselves are their transports': hyper's HTTP/1 connections and the
//! one HTTP/2 connection in [`crate::upstream`], the raw HTTP/1 sockets in
//! [`crate::http1::pool`].

use std::net::SocketAddr;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use tokio::net::TcpStream;

use crate::clock;
use crate::shared::Fault;

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Idle HTTP/1 connections older than this are not reused (servers close idle
    /// keep-alive connections; reusing one at that moment fails the request).
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    /// Mutual TLS to endpoints that have an identity (the proxy has one too).
    pub mesh: Option<std::sync::Arc<crate::identity::MeshTls>>,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_endpoint: 512,
            mesh: None,
        }
    }
}

/// An idle pooled connection, with when it went idle: coarse seconds
/// ([`clock::now`]), so no clock is read per request.
struct Idle<C> {
    conn: C,
    since: u32,
}

/// Idle connections of one kind, in a lock-free queue.
pub struct IdlePool<C>(ArrayQueue<Idle<C>>);

impl<C> IdlePool<C> {
    pub fn new(capacity: usize) -> Self {
        Self(ArrayQueue::new(capacity.max(1)))
    }

    /// Pools `conn`; a full pool drops (closes) it instead.
    pub fn put(&self, conn: C) {
        let _ = self.0.push(Idle {
            conn,
            since: clock::now(),
        });
    }

    /// The next connection idle for at most `max_idle` (older ones are closed: the
    /// server may be closing them right now).
    pub fn take(&self, max_idle: Duration) -> Option<C> {
        while let Some(idle) = self.0.pop() {
            let idle_for = Duration::from_secs(clock::now().saturating_sub(idle.since) as u64);
            if idle_for <= max_idle {
                return Some(idle.conn);
            }
        }
        None
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Why a new connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect: {0}")]
    Failed(std::io::Error),
    #[error("connect: timed out after {0:?}")]
    TimedOut(Duration),
}

impl ConnectError {
    /// Whose fault the failure was.
    pub fn fault(&self) -> Fault {
        match self {
            ConnectError::Failed(error) => connect_fault(error),
            ConnectError::TimedOut(_) => Fault::Backend,
        }
    }
}

/// The fault of a failed connect: a shortage of the proxy's own resources, or the backend.
pub fn connect_fault(error: &std::io::Error) -> Fault {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL) => {
            Fault::Proxy
        }
        _ => Fault::Backend,
    }
}

/// A new TCP connection to `addr`, within `settings`' connect timeout, without Nagle.
pub async fn dial(
    addr: SocketAddr,
    settings: &UpstreamSettings,
) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ConnectError::TimedOut(settings.connect_timeout))?
        .map_err(ConnectError::Failed)?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
