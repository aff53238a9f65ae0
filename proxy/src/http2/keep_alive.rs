//! PING-based liveness for an HTTP/2 connection: a peer that stops answering PINGs
//! is gone (a dead host, a silently dropped NAT entry), even though TCP has not said so.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::time::{Instant, Sleep};

/// Time between PINGs.
pub const INTERVAL: Duration = Duration::from_secs(30);
/// Time a PING may go unanswered.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct KeepAlive {
    ping_pong: PingPong,
    /// Until the next PING, or, while one is unanswered, until it is given up.
    timer: Pin<Box<Sleep>>,
    awaiting_pong: bool,
    /// Whether the peer answered a PING yet.
    answered: bool,
}

impl KeepAlive {
    pub fn new(ping_pong: PingPong) -> Self {
        Self {
            ping_pong,
            timer: Box::pin(tokio::time::sleep(INTERVAL)),
            awaiting_pong: false,
            answered: false,
        }
    }

    /// As [`new`](Self::new), with a first PING sent at once: the peer sends its
    /// SETTINGS before anything else (RFC 9113 §3.4) and frames are read in order,
    /// so once it is answered ([`answered`](Self::answered)) the peer's limits are known.
    pub fn pinging_now(ping_pong: PingPong) -> Self {
        let mut this = Self::new(ping_pong);
        if this.ping_pong.send_ping(Ping::opaque()).is_ok() {
            this.awaiting_pong = true;
            this.rearm(TIMEOUT);
        }
        this
    }

    pub fn answered(&self) -> bool {
        self.answered
    }

    /// Ready when the peer did not answer a PING in time: the connection is dead.
    /// `wanted` says whether a PING is worth sending now (asked only when one is
    /// due); an idle client connection is left to the idle sweep instead, so PINGs
    /// do not keep it open forever.
    pub fn poll_dead(&mut self, cx: &mut Context<'_>, wanted: impl Fn() -> bool) -> Poll<()> {
        loop {
            if self.awaiting_pong {
                match self.ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.answered = true;
                        self.rearm(INTERVAL);
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Pending => {}
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.awaiting_pong {
                tracing::debug!(timeout = ?TIMEOUT, "HTTP/2 peer did not answer a PING");
                return Poll::Ready(());
            }
            if !wanted() {
                self.rearm(INTERVAL);
                continue;
            }
            if self.ping_pong.send_ping(Ping::opaque()).is_err() {
                return Poll::Ready(());
            }
            self.awaiting_pong = true;
            self.rearm(TIMEOUT);
        }
    }

    fn rearm(&mut self, after: Duration) {
        self.timer.as_mut().reset(Instant::now() + after);
    }
}
