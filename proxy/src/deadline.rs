//! How long a request may wait for its response's head.
//!
//! An explicit timeout (`--request-timeout`, a service's `timeout`) may be well under
//! a second, so it is a runtime timer. The default limit, the stream idle timeout,
//! is minutes, and a runtime timer per request would cost about 3.5% of an HTTP/2
//! request's instructions (registering and removing it): instead a waiting request
//! keeps the coarse second it started ([`clock::now`]) and asks its connection's
//! sweeper, which already looks at every connection once a second, to wake it at
//! the next sweep ([`ConnControl::wake_at_next_sweep`]). So the limit holds to the
//! second, and costs a request a clock load and, while it waits, one registration
//! per second.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::clock;
use crate::connections::{ConnControl, SweepTicket};

/// A limit on the wait for a response's head.
pub(crate) struct ResponseLimit<'a> {
    pub(crate) limit: Duration,
    kind: Kind<'a>,
}

#[derive(Clone, Copy)]
enum Kind<'a> {
    /// A runtime timer.
    Precise,
    /// To the second, through the client connection's sweeps. `body`: the request's
    /// body may still be arriving, and the wait goes on while the connection moves
    /// bytes.
    Coarse { conn: &'a ConnControl, body: bool },
    /// No client connection to be woken through (requests made without one).
    Unbounded,
}

/// The wait for a response's head ran out.
#[derive(Debug)]
pub(crate) struct Elapsed;

impl<'a> ResponseLimit<'a> {
    /// An explicit timeout: precise.
    pub(crate) fn precise(limit: Duration) -> Self {
        Self {
            limit,
            kind: Kind::Precise,
        }
    }

    /// The stream idle timeout of a request on `conn` (to the second); `body`: its
    /// body may still be arriving.
    pub(crate) fn stream_idle(limit: Duration, conn: Option<&'a ConnControl>, body: bool) -> Self {
        let kind = match conn {
            Some(conn) => Kind::Coarse { conn, body },
            None => Kind::Unbounded,
        };
        Self { limit, kind }
    }

    /// `work`, bounded by this limit. Inlined, so the (large) future is built where
    /// it is awaited rather than copied there.
    #[inline(always)]
    pub(crate) fn bound<F: Future>(&self, work: F) -> Bounded<'a, F> {
        Bounded {
            work,
            // Boxed: only explicit timeouts have one, and inline it would make every
            // request's future (moved into place per HTTP/2 stream) larger.
            sleep: matches!(self.kind, Kind::Precise)
                .then(|| Box::pin(tokio::time::sleep(self.limit))),
            kind: self.kind,
            limit_secs: self.limit.as_secs().min(u32::MAX as u64) as u32,
            started: clock::now(),
            ticket: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// A future with a deadline.
    pub(crate) struct Bounded<'a, F> {
        #[pin]
        work: F,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        kind: Kind<'a>,
        limit_secs: u32,
        started: u32,
        // Where its waker waits for the next sweep, while it waits.
        ticket: SweepTicket,
    }

    impl<'a, F> PinnedDrop for Bounded<'a, F> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Kind::Coarse { conn, .. } = this.kind {
                conn.stop_waiting(this.ticket);
            }
        }
    }
}

impl<F: Future> Future for Bounded<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            if let Kind::Coarse { conn, .. } = this.kind {
                conn.stop_waiting(this.ticket);
            }
            return Poll::Ready(Ok(output));
        }
        match *this.kind {
            Kind::Unbounded => Poll::Pending,
            Kind::Precise => match this.sleep {
                Some(sleep) => sleep.as_mut().poll(cx).map(|()| Err(Elapsed)),
                None => Poll::Pending,
            },
            Kind::Coarse { conn, body } => {
                // More than the limit's whole seconds since it started (and since
                // the connection last moved a byte, while a body may be arriving).
                let waited = clock::now().saturating_sub(*this.started);
                let quiet = if body { conn.quiet_secs() } else { waited };
                if waited.min(quiet) > *this.limit_secs {
                    return Poll::Ready(Err(Elapsed));
                }
                conn.wake_at_next_sweep(cx.waker(), this.ticket);
                Poll::Pending
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_coarse_wait_registers_once_per_sweep() {
        let conn = ConnControl::for_tests();
        let limit = ResponseLimit::stream_idle(Duration::from_secs(300), Some(&conn), false);
        let mut bounded = std::pin::pin!(limit.bound(std::future::pending::<()>()));
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..3 {
            assert!(bounded.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(
            conn.waiting(),
            1,
            "one registration per sweep, however many polls"
        );
        conn.sweep_wake();
        assert_eq!(count.0.load(Ordering::Relaxed), 1, "woken by the sweep");
        assert!(bounded.as_mut().poll(&mut cx).is_pending());
        assert_eq!(conn.waiting(), 1, "registered again for the next sweep");
    }

    #[test]
    fn a_request_that_ends_takes_its_waker_out() {
        let conn = ConnControl::for_tests();
        let limit = ResponseLimit::stream_idle(Duration::from_secs(300), Some(&conn), false);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        {
            let mut bounded = std::pin::pin!(limit.bound(std::future::pending::<()>()));
            assert!(bounded.as_mut().poll(&mut cx).is_pending());
            assert_eq!(conn.waiting(), 1);
        }
        assert_eq!(
            conn.waiting(),
            0,
            "dropped: no task kept alive by its waker"
        );
        let (done, finish) = tokio::sync::oneshot::channel::<()>();
        let mut bounded = std::pin::pin!(limit.bound(finish));
        assert!(bounded.as_mut().poll(&mut cx).is_pending());
        let _ = done.send(());
        assert!(bounded.as_mut().poll(&mut cx).is_ready());
        assert_eq!(conn.waiting(), 0, "answered: out of the list at once");
    }

    #[test]
    fn without_a_connection_nothing_bounds_the_wait() {
        let limit = ResponseLimit::stream_idle(Duration::ZERO, None, false);
        let mut bounded = std::pin::pin!(limit.bound(std::future::pending::<()>()));
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(bounded.as_mut().poll(&mut cx).is_pending());
    }
}
