//! PING-based liveness for an HTTP/2 connection: a peer that stops answering PINGs
//! is gone (a dead host, a silently dropped NAT entry), even though TCP has not said so.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use crate::connection::Connection;
use crate::error::ConnectionError;

/// Time between PINGs.
pub const INTERVAL: Duration = Duration::from_secs(30);
/// Time a PING may go unanswered.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct KeepAlive {
    /// Until the next PING, or, while one is unanswered, until it is given up.
    timer: Pin<Box<Sleep>>,
    awaiting_pong: bool,
}

impl Default for KeepAlive {
    fn default() -> Self {
        Self::new()
    }
}

impl KeepAlive {
    pub fn new() -> Self {
        Self {
            timer: Box::pin(tokio::time::sleep(INTERVAL)),
            awaiting_pong: false,
        }
    }

    /// Ready when the peer did not answer a PING in time: the connection is dead,
    /// and its streams end with [`ConnectionError::Closed`]. `wanted` says whether a
    /// PING is worth sending now (asked only when one is due): an idle server
    /// connection may be left to an idle timeout instead, so PINGs do not keep it
    /// open forever. Polled by the connection's task, which reads the answer: no
    /// wake-up of its own is needed for it.
    pub fn poll_dead<IO>(
        &mut self,
        cx: &mut Context<'_>,
        conn: &Connection<IO>,
        wanted: impl Fn() -> bool,
    ) -> Poll<()>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let session = conn.session();
        loop {
            if self.awaiting_pong && std::mem::take(&mut session.lock().pong) {
                self.awaiting_pong = false;
                self.rearm(INTERVAL);
                continue;
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.awaiting_pong {
                tracing::debug!(timeout = ?TIMEOUT, "HTTP/2 peer did not answer a PING");
                session.lock().lost(ConnectionError::Closed);
                return Poll::Ready(());
            }
            if !wanted() {
                self.rearm(INTERVAL);
                continue;
            }
            session.lock().send_ping();
            self.awaiting_pong = true;
            self.rearm(TIMEOUT);
        }
    }

    fn rearm(&mut self, after: Duration) {
        self.timer.as_mut().reset(Instant::now() + after);
    }
}
