//! One HTTP/2 connection's state, shared by the task that does its I/O
//! ([`crate::connection::Connection`]) and the handles of its streams
//! ([`crate::streams`]), in whatever tasks hold them.
//!
//! Frames are written straight into one output buffer as they are made: a header
//! block is encoded in place, a DATA frame copied in, with no queue of frames
//! between. The I/O task swaps the buffer out and writes it whole, so everything a
//! wake-up produced leaves in one write. Data a flow-control window holds back waits
//! as one chunk per stream, and the I/O task writes it as WINDOW_UPDATEs arrive.
//!
//! One state ([`Inner`], behind one lock), its work split by concern:
//! - [`store`]: the streams (a slab), the id index, the ids this end hands out and
//!   what became of the peer's streams no longer kept;
//! - [`recv`]: every frame the peer sends, and the receive windows given back as
//!   data is read;
//! - [`send`]: what this end sends (headers, data under the send windows, the
//!   scheduler that writes held-back data as windows open);
//! - [`close`]: how a stream ends (resets, its handles dropped) and is forgotten;
//! - here: the state itself, and the connection's own life (GOAWAY, failure).

mod close;
mod recv;
mod send;
mod store;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Waker;
use std::time::Instant;

use http::request;

use crate::error::{ConnectionError, Error};
use crate::frame::{self, Reason};
use crate::hpack::Decoder;

use recv::{Continuation, PeerResets};
use store::Store;
pub use store::Stream;

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The peer connects to this end and opens the streams.
    Server,
    /// This end connects to the peer and opens the streams.
    Client,
}

/// Whole seconds from any fixed start, never going back: what [`Config::clock`]
/// reads.
pub type Clock = fn() -> u32;

/// Seconds since the first call, from the monotonic clock: the default
/// [`Config::clock`].
pub fn monotonic_seconds() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() as u32
}

/// What a connection announces, how much it buffers, and its clock.
#[derive(Debug, Clone)]
pub struct Config {
    /// SETTINGS_MAX_CONCURRENT_STREAMS: streams the peer may open (server only).
    pub max_concurrent_streams: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: what the peer may send on a stream before the
    /// application has taken it.
    pub stream_window: u32,
    /// The same for the whole connection.
    pub connection_window: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list: u32,
    /// Output held for the socket beyond which no more data is taken from streams.
    pub max_send_buffer: usize,
    /// Whole seconds, for the limit on streams a client resets each second (rapid
    /// reset). Read only when a client resets an open stream; a coarse clock the
    /// caller keeps current does (the proxy's), and so does the default,
    /// [`monotonic_seconds`]. A clock that stands still makes the limit one per
    /// connection's lifetime.
    pub clock: Clock,
}

impl Default for Config {
    /// The protocol's windows, 100 concurrent streams (RFC 9113 §6.5.2 asks for no
    /// fewer), 64 KiB of headers (hyper's limit) and of output held, and the
    /// monotonic clock.
    fn default() -> Self {
        Config {
            max_concurrent_streams: 100,
            stream_window: frame::DEFAULT_WINDOW,
            connection_window: frame::DEFAULT_WINDOW,
            max_header_list: 64 * 1024,
            max_send_buffer: 64 * 1024,
            clock: monotonic_seconds,
        }
    }
}

/// The decoder's table: the protocol's default, which needs no SETTINGS.
const HEADER_TABLE_SIZE: usize = 4096;
/// The payload of the PING between a graceful close's two GOAWAYs.
pub const DRAIN_PING: [u8; 8] = *b"draining";

pub struct Session {
    inner: Mutex<Inner>,
}

impl Session {
    pub fn new(role: Role, config: Config) -> Arc<Session> {
        let mut inner = Inner {
            role,
            streams: Store::new(role),
            out: Vec::with_capacity(4 * 1024),
            send_window: frame::DEFAULT_WINDOW as i64,
            peer_initial_window: frame::DEFAULT_WINDOW,
            peer_max_frame: frame::DEFAULT_MAX_FRAME_SIZE as usize,
            peer_max_streams: u32::MAX,
            blocked: VecDeque::new(),
            decoder: Decoder::new(HEADER_TABLE_SIZE),
            recv_window: config.connection_window as i64,
            recv_unreleased: 0,
            continuation: None,
            got_settings: false,
            active: 0,
            accepted: VecDeque::new(),
            waiting: VecDeque::new(),
            conn_waker: None,
            polling: false,
            draining: false,
            goaway_sent: false,
            goaway_received: None,
            error: None,
            handle_dropped: false,
            pong: false,
            table_update_due: false,
            peer_resets: PeerResets::default(),
            config,
        };
        if role == Role::Client {
            inner.out.extend_from_slice(frame::PREFACE);
        }
        let mut settings = vec![
            (
                frame::SETTINGS_INITIAL_WINDOW_SIZE,
                inner.config.stream_window,
            ),
            (
                frame::SETTINGS_MAX_HEADER_LIST_SIZE,
                inner.config.max_header_list,
            ),
        ];
        match role {
            Role::Server => settings.push((
                frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                inner.config.max_concurrent_streams,
            )),
            Role::Client => settings.push((frame::SETTINGS_ENABLE_PUSH, 0)),
        }
        frame::put_settings(&mut inner.out, &settings);
        let extra = inner
            .config
            .connection_window
            .saturating_sub(frame::DEFAULT_WINDOW);
        if extra > 0 {
            frame::put_window_update(&mut inner.out, 0, extra);
        }
        Arc::new(Session {
            inner: Mutex::new(inner),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while the lock was held leaves nothing half-done that matters
        // more than the connection it already broke.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A request a client opened, for [`crate::Connection::accept`].
pub struct Accepted {
    pub key: usize,
    pub head: request::Parts,
    pub end_stream: bool,
}

/// A connection error: the reason sent in GOAWAY, and what went wrong.
pub struct Fatal(pub Reason, pub String);

fn fatal<T>(reason: Reason, why: impl Into<String>) -> Result<T, Fatal> {
    Err(Fatal(reason, why.into()))
}

pub struct Inner {
    pub role: Role,
    config: Config,
    pub streams: Store,

    // Sending.
    pub out: Vec<u8>,
    send_window: i64,
    peer_initial_window: u32,
    peer_max_frame: usize,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS (client role).
    peer_max_streams: u32,
    /// Streams with data the connection window or a full output buffer holds back.
    blocked: VecDeque<(usize, u64)>,
    /// The peer shrank its decoder's table: the next header block says ours is 0.
    table_update_due: bool,
    /// Client streams waiting for a slot under the backend's limit, in order.
    waiting: VecDeque<(usize, u64)>,

    // Receiving.
    decoder: Decoder,
    recv_window: i64,
    recv_unreleased: u32,
    continuation: Option<Continuation>,
    pub got_settings: bool,
    /// Streams the peer reset while open, in the current second.
    peer_resets: PeerResets,

    // Streams.
    /// Open streams, as the concurrency limits count them.
    pub active: u32,
    pub accepted: VecDeque<Accepted>,

    // Lifecycle.
    pub conn_waker: Option<Waker>,
    /// The I/O task is between reading and flushing: what is written now goes out
    /// with its flush, no wake-up needed.
    pub polling: bool,
    /// The first of the two GOAWAYs of a graceful close was sent ([`Inner::go_away`]).
    draining: bool,
    /// The final GOAWAY was sent: no more streams are accepted.
    pub goaway_sent: bool,
    goaway_received: Option<(u32, Reason)>,
    /// The connection failed or closed: every stream sees this.
    pub error: Option<Error>,
    /// The client handle is gone: close once the streams are done.
    pub handle_dropped: bool,
    /// A PING of ours was answered since this was last cleared.
    pub pong: bool,
}

impl Inner {
    /// Wakes the I/O task to write what was just added, unless it is about to.
    pub fn notify(&mut self) {
        if !self.polling
            && let Some(waker) = &self.conn_waker
        {
            waker.wake_by_ref();
        }
    }

    /// A new stream with `refs` handles (id 0: a client stream not yet opened).
    fn new_stream(&mut self, id: u32, refs: u8) -> usize {
        self.streams.insert(Stream::new(
            id,
            refs,
            self.config.stream_window,
            self.peer_initial_window,
        ))
    }

    /// Why the stream cannot go on, if it cannot.
    pub fn stream_error(&self, key: usize) -> Option<Error> {
        self.streams[key]
            .reset
            .clone()
            .or_else(|| self.error.clone())
    }

    // --- the connection's life ---------------------------------------------------------

    /// Begins a graceful close (server), in two phases as RFC 9113 §6.8 advises
    /// (and nginx and Envoy do): a GOAWAY with the largest stream id, so the client
    /// opens no more streams, and a PING. Streams the client opened before it heard
    /// are served; the final GOAWAY ([`Inner::final_go_away`]) follows the PING's
    /// answer, which comes after them, or the caller's timeout.
    pub fn go_away(&mut self) {
        if !self.draining && !self.goaway_sent && self.error.is_none() {
            self.draining = true;
            frame::put_goaway(&mut self.out, frame::MAX_WINDOW, Reason::NO_ERROR);
            frame::put_ping(&mut self.out, false, DRAIN_PING);
            self.notify();
        }
    }

    /// The final GOAWAY (server): it names the last stream that will be served;
    /// streams above it are refused, and the connection closes when those below
    /// are done.
    pub fn final_go_away(&mut self) {
        if !self.goaway_sent && self.error.is_none() {
            self.goaway_sent = true;
            let last = self.streams.last_peer_stream();
            frame::put_goaway(&mut self.out, last, Reason::NO_ERROR);
            self.notify();
        }
    }

    /// Whether the connection has nothing left to do and may close.
    pub fn finished(&self) -> bool {
        if self.error.is_some() {
            return true;
        }
        let idle = self.active == 0 && self.accepted.is_empty() && self.waiting.is_empty();
        match self.role {
            Role::Server => self.goaway_sent && idle,
            Role::Client => (self.goaway_received.is_some() || self.handle_dropped) && idle,
        }
    }

    /// Whether a client connection takes no more requests: the backend sent GOAWAY,
    /// or the stream ids ran out.
    pub fn going_away(&self) -> bool {
        self.goaway_received.is_some() || self.streams.ids_exhausted()
    }

    /// A connection error of the peer's: GOAWAY, and every stream ends with it.
    pub fn fail(&mut self, Fatal(reason, why): Fatal) {
        if self.error.is_some() {
            return;
        }
        tracing::debug!(%reason, why, "HTTP/2 connection error");
        frame::put_goaway(&mut self.out, self.streams.last_peer_stream(), reason);
        self.end_all(Error::Connection(Arc::new(ConnectionError::Protocol(
            reason, why,
        ))));
    }

    /// The connection is gone (closed, or I/O failed).
    pub fn lost(&mut self, error: ConnectionError) {
        if self.error.is_none() {
            self.end_all(Error::Connection(Arc::new(error)));
        }
    }

    fn end_all(&mut self, error: Error) {
        self.error = Some(error);
        for (_, stream) in self.streams.iter_mut() {
            if stream.id == 0 && stream.reset.is_none() {
                // Never sent: the backend did not see it.
                stream.reset = Some(Error::GoAway(Reason::NO_ERROR));
            }
            stream.wake_recv();
            stream.wake_send();
        }
        self.waiting.clear();
        self.blocked.clear();
    }

    /// Panics if the books do not balance: the open-stream count, the id index
    /// and the queues agree with the streams. For tests.
    #[cfg(test)]
    pub fn check(&self) {
        self.streams.check();
        let counted = self.streams.iter().filter(|(_, s)| s.counted).count();
        assert_eq!(self.active as usize, counted, "active streams miscounted");
        for (key, stream) in self.streams.iter() {
            assert!(
                stream.refs > 0 || (!stream.closed() && stream.pending.is_some()),
                "stream {key} is kept with no handle and nothing left to send"
            );
            if stream.counted {
                assert!(!stream.closed(), "a closed stream still counted open");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use http::Response;

    use super::testing::*;
    use super::*;

    fn goaway(last: u32, reason: Reason) -> Sent {
        let mut payload = last.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason.0.to_be_bytes());
        (frame::GOAWAY, 0, 0, payload)
    }

    #[test]
    fn the_default_clock_counts_seconds() {
        let clock = Config::default().clock;
        let before = clock();
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(clock() > before, "the default clock stood still");
    }

    /// A graceful close, frame by frame (RFC 9113 §6.8): GOAWAY with the largest id
    /// and a PING; streams opened before the PING's answer are served; then the
    /// final GOAWAY names the last of them, and later streams are refused.
    #[test]
    fn a_graceful_close_goes_away_in_two_phases() {
        let ack = |payload: &[u8; 8]| raw(frame::PING, frame::ACK, 0, payload);
        for answered in [true, false] {
            let session = session(Role::Server, config());
            let mut inner = session.lock();
            feed(&mut inner, raw(frame::HEADERS, WHOLE, 1, GET));
            sent(&mut inner);

            inner.go_away();
            assert_eq!(
                sent(&mut inner),
                vec![
                    goaway(frame::MAX_WINDOW, Reason::NO_ERROR),
                    (frame::PING, 0, 0, DRAIN_PING.to_vec())
                ]
            );
            inner.go_away();
            assert!(sent(&mut inner).is_empty(), "the close begins once");
            // A stream the client opened before it heard: served.
            feed(&mut inner, raw(frame::HEADERS, WHOLE, 3, GET));
            assert!(sent(&mut inner).is_empty(), "stream 3 is not refused");
            // Another PING's answer (keep-alive's) is not the one awaited.
            feed(&mut inner, ack(b"tandem\0\0"));
            assert!(sent(&mut inner).is_empty());
            if answered {
                feed(&mut inner, ack(&DRAIN_PING));
            } else {
                // No answer in time: the caller's timeout.
                inner.final_go_away();
            }
            assert_eq!(sent(&mut inner), vec![goaway(3, Reason::NO_ERROR)]);
            // A late answer, or a second timeout, sends nothing more.
            feed(&mut inner, ack(&DRAIN_PING));
            inner.final_go_away();
            assert!(sent(&mut inner).is_empty());
            // Beyond the final GOAWAY: refused, to be retried elsewhere.
            feed(&mut inner, raw(frame::HEADERS, WHOLE, 5, GET));
            assert_eq!(sent(&mut inner), vec![rst(5, Reason::REFUSED_STREAM)]);

            // The two streams served, the connection is done.
            let keys: Vec<usize> = inner.accepted.drain(..).map(|a| a.key).collect();
            assert_eq!(keys.len(), 2);
            let (head, ()) = Response::new(()).into_parts();
            for key in keys {
                assert!(!inner.finished());
                inner.send_response(key, &head, true).unwrap();
                inner.drop_ref(key);
            }
            assert!(inner.finished());
            inner.check();
        }
    }

    #[test]
    fn a_connection_error_ends_every_stream() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        feed(&mut inner, raw(frame::HEADERS, frame::END_HEADERS, 1, GET));
        feed(&mut inner, raw(frame::HEADERS, frame::END_HEADERS, 3, GET));
        let reason = fatal_reason(try_feed(&mut inner, raw(frame::DATA, 0, 0, b"x")));
        assert_eq!(reason, Reason::PROTOCOL_ERROR);
        inner.fail(Fatal(reason, "DATA on stream 0".into()));
        assert_eq!(sent(&mut inner), vec![goaway(3, Reason::PROTOCOL_ERROR)]);
        assert!(inner.finished());
        let keys: Vec<usize> = inner.accepted.drain(..).map(|a| a.key).collect();
        for key in keys {
            assert!(matches!(
                inner.stream_error(key),
                Some(Error::Connection(_))
            ));
        }
        // A second failure sends nothing more.
        inner.fail(Fatal(Reason::INTERNAL_ERROR, "again".into()));
        assert!(sent(&mut inner).is_empty());
    }
}
