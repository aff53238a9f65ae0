//! One HTTP/2 connection's state, shared by the task that does its I/O
//! ([`super::connection::Connection`]) and the handles of its streams
//! ([`super::streams`]), in whatever tasks hold them.
//!
//! Frames are written straight into one output buffer as they are made: a header
//! block is encoded in place, a DATA frame copied in, with no queue of frames
//! between. The I/O task swaps the buffer out and writes it whole, so everything a
//! wake-up produced leaves in one write. Data a flow-control window holds back waits
//! as one chunk per stream, and the I/O task writes it as WINDOW_UPDATEs arrive.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri, request, response};
use slab::Slab;

use super::error::{ConnectionError, Error};
use super::frame::{self, Head, Reason};
use super::hpack::{Decoder, encoder};
use super::message::{self, Block};

/// Which end of the connection the proxy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Clients connect to the proxy: they open the streams.
    Server,
    /// The proxy connects to a backend and opens the streams.
    Client,
}

/// What the proxy announces and how much it buffers.
#[derive(Debug, Clone)]
pub struct Config {
    /// SETTINGS_MAX_CONCURRENT_STREAMS: streams the peer may open (server only).
    pub max_concurrent_streams: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE: what the peer may send on a stream before the
    /// proxy has passed it on.
    pub stream_window: u32,
    /// The same for the whole connection.
    pub connection_window: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE.
    pub max_header_list: u32,
    /// Output held for the socket beyond which no more data is taken from streams.
    pub max_send_buffer: usize,
}

/// The decoder's table: the protocol's default, which needs no SETTINGS.
const HEADER_TABLE_SIZE: usize = 4096;
/// Open streams a client may reset in one second before it is told to calm down.
const MAX_PEER_RESETS_PER_SECOND: u32 = 1000;
/// Header block bytes buffered across CONTINUATION frames before the peer is told
/// to calm down.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// CONTINUATION frames one header block may take before the peer is told to calm
/// down: enough for the largest block allowed in frames of the default size. More
/// is a flood (empty ones cost the peer nine bytes each and never end the block;
/// CVE-2024-27316 and kin). nghttp2 allows 8.
const MAX_CONTINUATIONS: u32 = 16;
/// The payload of the PING between a graceful close's two GOAWAYs.
pub const DRAIN_PING: [u8; 8] = *b"draining";
/// Why a stream was reset for depending on itself (RFC 9113 §5.3.1).
const SELF_DEPENDENT: &str = "a stream depending on itself";
/// How many of the client's latest stream ids [`Inner::past`] remembers.
const HISTORY: u32 = u128::BITS;

pub struct Session {
    inner: Mutex<Inner>,
}

impl Session {
    pub fn new(role: Role, config: Config) -> Arc<Session> {
        let mut inner = Inner {
            role,
            streams: Slab::new(),
            ids: HashMap::default(),
            next_serial: 0,
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
            last_peer_stream: 0,
            peer_opened: 0,
            peer_reset: 0,
            next_stream: 1,
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
            peer_resets: (0, 0),
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

/// Stream ids are unique integers: a multiply is hash enough.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// A header block spread over HEADERS and CONTINUATION frames.
struct Continuation {
    stream: u32,
    end_stream: bool,
    /// The HEADERS frame made the stream depend on itself (RFC 9113 §5.3.1).
    self_dependent: bool,
    block: Vec<u8>,
    /// CONTINUATION frames so far.
    frames: u32,
}

/// What became of a stream id at or below the last one the client opened, once the
/// stream is no longer kept (or was never made).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Past {
    /// Skipped: the client opened a higher id first, which closed this one unused.
    Skipped,
    /// Opened, and closed normally, or by the client.
    Closed,
    /// The proxy reset it (or refused it): what the client sent before it knew is
    /// ignored (RFC 9113 §5.1).
    Reset,
    /// Too far back to tell.
    Unknown,
}

/// A request a client opened, for [`Inner::accept`].
pub struct Accepted {
    pub key: usize,
    pub head: request::Parts,
    pub end_stream: bool,
}

pub struct Stream {
    /// 0 until opened (a client stream waiting for the backend's stream limit).
    pub id: u32,
    /// Tells this stream from a later one in the same slab slot.
    serial: u64,
    /// Handles alive: the stream is forgotten when none are and it is closed.
    refs: u8,
    /// Counted in [`Inner::active`] (open, not yet closed both ways).
    counted: bool,

    // Receiving.
    pub recv_closed: bool,
    /// A response head waiting for its [`super::streams::ResponseFuture`].
    pub head: Option<response::Parts>,
    got_head: bool,
    /// A HEAD request's response announces a length it does not carry.
    head_request: bool,
    pub data: VecDeque<Bytes>,
    pub trailers: Option<HeaderMap>,
    recv_window: i64,
    recv_unreleased: u32,
    /// What content-length said is still to come.
    expected: Option<u64>,
    pub recv_waker: Option<Waker>,
    /// No one reads this stream's data any more: what arrives is given back at once.
    recv_dropped: bool,

    // Sending.
    send_closed: bool,
    send_window: i64,
    /// Data the windows hold back, and whether it ends the stream.
    pending: Option<(Bytes, bool)>,
    pending_trailers: Option<HeaderMap>,
    pub send_waker: Option<Waker>,
    queued: bool,
    /// A client stream's header block, encoded while it waits for a stream slot.
    waiting_block: Option<(Vec<u8>, bool)>,

    /// Why the stream ended early, if it did.
    pub reset: Option<Error>,
}

impl Stream {
    fn wake_recv(&mut self) {
        if let Some(waker) = self.recv_waker.take() {
            waker.wake();
        }
    }

    fn wake_send(&mut self) {
        if let Some(waker) = self.send_waker.take() {
            waker.wake();
        }
    }

    fn closed(&self) -> bool {
        self.reset.is_some() || (self.recv_closed && self.send_closed)
    }
}

/// Starts a HEADERS frame in `out` (see [`frame::start_headers`]), its block opening
/// with a dynamic table size update to 0 if one is due: the encoder never uses the
/// table, but a peer that shrinks it below the default may insist on hearing so
/// (RFC 7541 §4.2; nghttp2 does).
fn begin_block(out: &mut Vec<u8>, update_due: &mut bool) -> usize {
    let start = frame::start_headers(out);
    if std::mem::take(update_due) {
        out.push(0x20);
    }
    start
}

/// The big-endian 32-bit number at `at` in `payload` (which is long enough).
fn be_u32(payload: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([
        payload[at],
        payload[at + 1],
        payload[at + 2],
        payload[at + 3],
    ])
}

/// A connection error: the reason sent in GOAWAY, and what went wrong.
pub struct Fatal(pub Reason, pub String);

fn fatal<T>(reason: Reason, why: impl Into<String>) -> Result<T, Fatal> {
    Err(Fatal(reason, why.into()))
}

pub struct Inner {
    pub role: Role,
    config: Config,
    pub streams: Slab<Stream>,
    ids: HashMap<u32, usize, BuildHasherDefault<IdHasher>>,
    next_serial: u64,

    // Sending.
    pub out: Vec<u8>,
    send_window: i64,
    peer_initial_window: u32,
    peer_max_frame: usize,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS (client role).
    peer_max_streams: u32,
    /// Streams with data the connection window or a full output buffer holds back.
    blocked: VecDeque<(usize, u64)>,

    // Receiving.
    decoder: Decoder,
    recv_window: i64,
    recv_unreleased: u32,
    continuation: Option<Continuation>,
    pub got_settings: bool,

    // Streams.
    last_peer_stream: u32,
    /// Of the client's stream ids below and at `last_peer_stream` (server), bit `i`
    /// for `last_peer_stream - 2i`: those it opened, and those of them the proxy
    /// reset. Shifted only when a stream opens: see [`Inner::past`].
    peer_opened: u128,
    peer_reset: u128,
    next_stream: u32,
    /// Open streams, as the concurrency limits count them.
    pub active: u32,
    pub accepted: VecDeque<Accepted>,
    /// Client streams waiting for a slot under the backend's limit, in order.
    waiting: VecDeque<(usize, u64)>,

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
    /// The peer shrank its decoder's table: the next header block says ours is 0.
    table_update_due: bool,
    /// Streams the peer reset while open, in the current second ([`clock::now`]).
    peer_resets: (u32, u32),
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

    fn new_stream(&mut self, id: u32, refs: u8) -> usize {
        self.next_serial += 1;
        let key = self.streams.insert(Stream {
            id,
            serial: self.next_serial,
            refs,
            counted: false,
            recv_closed: false,
            head: None,
            got_head: false,
            head_request: false,
            data: VecDeque::new(),
            trailers: None,
            recv_window: self.config.stream_window as i64,
            recv_unreleased: 0,
            expected: None,
            recv_waker: None,
            recv_dropped: false,
            send_closed: false,
            send_window: self.peer_initial_window as i64,
            pending: None,
            pending_trailers: None,
            send_waker: None,
            queued: false,
            waiting_block: None,
            reset: None,
        });
        if id != 0 {
            self.ids.insert(id, key);
        }
        key
    }

    /// Why the stream cannot go on, if it cannot.
    pub fn stream_error(&self, key: usize) -> Option<Error> {
        self.streams[key]
            .reset
            .clone()
            .or_else(|| self.error.clone())
    }

    // --- the I/O task's side --------------------------------------------------------

    /// Handles one frame. A connection error comes back to be sent as GOAWAY.
    pub fn on_frame(&mut self, head: Head, payload: Bytes) -> Result<(), Fatal> {
        if let Some(c) = &self.continuation
            && (head.kind != frame::CONTINUATION || head.stream != c.stream)
        {
            return fatal(Reason::PROTOCOL_ERROR, "a frame inside a header block");
        }
        if !self.got_settings && head.kind != frame::SETTINGS {
            return fatal(Reason::PROTOCOL_ERROR, "the first frame is not SETTINGS");
        }
        match head.kind {
            frame::DATA => self.on_data(head, payload),
            frame::HEADERS => self.on_headers(head, payload),
            frame::CONTINUATION => self.on_continuation(head, payload),
            frame::RST_STREAM => self.on_rst(head, &payload),
            frame::SETTINGS => self.on_settings(head, &payload),
            frame::PING => self.on_ping(head, &payload),
            frame::GOAWAY => self.on_goaway(head, &payload),
            frame::WINDOW_UPDATE => self.on_window_update(head, &payload),
            frame::PRIORITY => self.on_priority(head, &payload),
            frame::PUSH_PROMISE => fatal(Reason::PROTOCOL_ERROR, "PUSH_PROMISE (push is disabled)"),
            // Unknown frame types are ignored (RFC 9113 §4.1).
            _ => Ok(()),
        }
    }

    /// The stream a `frame` names: `None` if it was forgotten (frames for it are
    /// ignored), an error if it was never opened.
    fn known_stream(&self, id: u32, frame: &str) -> Result<Option<usize>, Fatal> {
        match self.ids.get(&id) {
            Some(&key) => Ok(Some(key)),
            None if self.idle(id) => fatal(
                Reason::PROTOCOL_ERROR,
                format!("{frame} on a stream never opened"),
            ),
            None => Ok(None),
        }
    }

    /// Whether `id` names a stream that was never opened (frames on it are errors).
    fn idle(&self, id: u32) -> bool {
        let peer_opens = (self.role == Role::Server) == (id % 2 == 1);
        if peer_opens {
            id > self.last_peer_stream
        } else {
            id >= self.next_stream
        }
    }

    /// The client opened stream `id`, above every id before (server).
    fn peer_opens(&mut self, id: u32) {
        let shift = (id - self.last_peer_stream) / 2;
        if shift >= HISTORY {
            (self.peer_opened, self.peer_reset) = (0, 0);
        } else {
            self.peer_opened <<= shift;
            self.peer_reset <<= shift;
        }
        self.peer_opened |= 1;
        self.last_peer_stream = id;
    }

    /// The history bit of the client's stream `id`, if it is recent enough.
    fn history_bit(&self, id: u32) -> Option<u128> {
        let back = self.last_peer_stream.checked_sub(id)? / 2;
        (back < HISTORY).then(|| 1 << back)
    }

    /// The proxy reset (or refused) the client's stream `id` (server).
    fn mark_reset(&mut self, id: u32) {
        if let Some(bit) = self.history_bit(id) {
            self.peer_reset |= bit;
        }
    }

    /// What became of the client's stream `id` (odd, at most `last_peer_stream`),
    /// which is no longer kept (server).
    fn past(&self, id: u32) -> Past {
        match self.history_bit(id) {
            None => Past::Unknown,
            Some(bit) if self.peer_opened & bit == 0 => Past::Skipped,
            Some(bit) if self.peer_reset & bit != 0 => Past::Reset,
            Some(_) => Past::Closed,
        }
    }

    /// Refuses a request the client opened, with RST_STREAM (server).
    fn refuse(&mut self, id: u32, reason: Reason) {
        frame::put_rst(&mut self.out, id, reason);
        self.mark_reset(id);
    }

    fn on_data(&mut self, head: Head, payload: Bytes) -> Result<(), Fatal> {
        if head.stream == 0 {
            return fatal(Reason::PROTOCOL_ERROR, "DATA on stream 0");
        }
        let len = payload.len();
        if len as i64 > self.recv_window {
            return fatal(
                Reason::FLOW_CONTROL_ERROR,
                "DATA beyond the connection window",
            );
        }
        self.recv_window -= len as i64;
        let Some((start, end)) = frame::unpadded(&head, &payload) else {
            return fatal(Reason::PROTOCOL_ERROR, "padding longer than the frame");
        };
        let Some(key) = self.known_stream(head.stream, "DATA")? else {
            // A stream already forgotten (reset, or done): its data still counted
            // against the connection window, which is given back at once.
            self.release_connection(len as u32);
            if self.role == Role::Server
                && matches!(self.past(head.stream), Past::Closed | Past::Skipped)
            {
                return fatal(Reason::STREAM_CLOSED, "DATA on a closed stream");
            }
            return Ok(());
        };
        let end_stream = head.has(frame::END_STREAM);
        let role = self.role;
        let stream = &mut self.streams[key];
        if role == Role::Server && matches!(stream.reset, Some(Error::Reset(_))) {
            // RFC 9113 §5.1: any frame but PRIORITY after the client's own
            // RST_STREAM (as for a stream no longer kept: see `past`).
            return fatal(Reason::STREAM_CLOSED, "DATA after RST_STREAM");
        }
        if stream.reset.is_some() {
            self.release_connection(len as u32);
            return Ok(());
        }
        if role == Role::Server && stream.recv_closed && stream.send_closed {
            // RFC 9113 §5.1: after END_STREAM both ways, a connection error (the
            // same whether or not the stream is still kept). A backend's other
            // streams are spared: its stream alone is reset, below.
            return fatal(Reason::STREAM_CLOSED, "DATA on a closed stream");
        }
        let refused = if stream.recv_closed || (role == Role::Client && !stream.got_head) {
            Some((Reason::STREAM_CLOSED, "DATA where none may come"))
        } else if len as i64 > stream.recv_window {
            Some((Reason::FLOW_CONTROL_ERROR, "DATA beyond the stream window"))
        } else {
            stream.recv_window -= len as i64;
            None
        };
        if let Some((reason, why)) = refused {
            return self.refuse_data(key, len, reason, why);
        }
        if stream.recv_dropped {
            // No one reads it, and the stream stays open for the other direction:
            // the window goes back at once, so the peer is not held up.
            stream.recv_closed = end_stream;
            self.release(key, len as u32);
            if end_stream {
                self.closed_if_done(key);
            }
            return Ok(());
        }
        let data = payload.slice(start..end);
        if let Some(expected) = &mut stream.expected {
            match expected.checked_sub(data.len() as u64) {
                Some(left) => *expected = left,
                None => {
                    let why = "more data than content-length";
                    return self.refuse_data(key, len, Reason::PROTOCOL_ERROR, why);
                }
            }
        }
        if end_stream && stream.expected.is_some_and(|left| left > 0) {
            let why = "less data than content-length";
            return self.refuse_data(key, len, Reason::PROTOCOL_ERROR, why);
        }
        if !data.is_empty() {
            stream.data.push_back(data);
        }
        stream.recv_closed |= end_stream;
        stream.wake_recv();
        let padding = len - (end - start);
        if padding > 0 {
            // Padding is no one's to consume.
            self.release(key, padding as u32);
        }
        if end_stream {
            self.closed_if_done(key);
        }
        Ok(())
    }

    /// DATA the stream may not take: its window goes back to the connection, and
    /// the stream is reset.
    fn refuse_data(
        &mut self,
        key: usize,
        len: usize,
        reason: Reason,
        why: &'static str,
    ) -> Result<(), Fatal> {
        self.release_connection(len as u32);
        self.peer_error(key, reason, why)
    }

    fn on_headers(&mut self, head: Head, payload: Bytes) -> Result<(), Fatal> {
        if head.stream == 0 {
            return fatal(Reason::PROTOCOL_ERROR, "HEADERS on stream 0");
        }
        let Some((mut start, end)) = frame::unpadded(&head, &payload) else {
            return fatal(Reason::PROTOCOL_ERROR, "padding longer than the frame");
        };
        let mut self_dependent = false;
        if head.has(frame::PRIORITY_FLAG) {
            if start + 5 > end {
                return fatal(
                    Reason::FRAME_SIZE_ERROR,
                    "HEADERS too short for its priority",
                );
            }
            self_dependent = be_u32(&payload, start) & frame::MAX_WINDOW == head.stream;
            start += 5;
        }
        let end_stream = head.has(frame::END_STREAM);
        if !head.has(frame::END_HEADERS) {
            self.continuation = Some(Continuation {
                stream: head.stream,
                end_stream,
                self_dependent,
                block: payload[start..end].to_vec(),
                frames: 0,
            });
            return Ok(());
        }
        let block = payload.slice(start..end);
        self.on_header_block(head.stream, end_stream, self_dependent, block)
    }

    fn on_continuation(&mut self, head: Head, payload: Bytes) -> Result<(), Fatal> {
        let Some(mut c) = self.continuation.take() else {
            return fatal(
                Reason::PROTOCOL_ERROR,
                "CONTINUATION without a header block",
            );
        };
        c.frames += 1;
        if c.frames > MAX_CONTINUATIONS {
            return fatal(
                Reason::ENHANCE_YOUR_CALM,
                "a header block in more than 16 CONTINUATION frames",
            );
        }
        if c.block.len() + payload.len() > MAX_HEADER_BLOCK {
            return fatal(Reason::ENHANCE_YOUR_CALM, "a header block beyond 256 KiB");
        }
        c.block.extend_from_slice(&payload);
        if head.has(frame::END_HEADERS) {
            self.on_header_block(c.stream, c.end_stream, c.self_dependent, c.block.into())
        } else {
            self.continuation = Some(c);
            Ok(())
        }
    }

    /// A whole header block: a new request (server), a response (client), or trailers.
    fn on_header_block(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        block: Bytes,
    ) -> Result<(), Fatal> {
        let max = self.config.max_header_list as usize;
        // Decoded whatever becomes of the stream: the table must stay in step.
        let decoded = match Block::decode(&mut self.decoder, &block, max) {
            Ok(decoded) => decoded,
            Err(e) => return fatal(Reason::COMPRESSION_ERROR, e.to_string()),
        };
        let key = self.ids.get(&id).copied();
        if self_dependent && let Some(key) = key {
            return self.peer_error(key, Reason::PROTOCOL_ERROR, SELF_DEPENDENT);
        }
        match (self.role, key) {
            (Role::Server, None) => self.on_request(id, end_stream, self_dependent, decoded),
            (Role::Client, Some(key)) if !self.streams[key].got_head => {
                self.on_response(key, end_stream, decoded);
                Ok(())
            }
            (_, Some(key)) => self.on_trailers(key, end_stream, decoded),
            (Role::Client, None) => {
                if self.idle(id) {
                    return fatal(Reason::PROTOCOL_ERROR, "HEADERS on a stream never opened");
                }
                Ok(())
            }
        }
    }

    fn on_request(
        &mut self,
        id: u32,
        end_stream: bool,
        self_dependent: bool,
        decoded: Block,
    ) -> Result<(), Fatal> {
        if id.is_multiple_of(2) {
            return fatal(
                Reason::PROTOCOL_ERROR,
                "a client opened an even-numbered stream",
            );
        }
        if id <= self.last_peer_stream {
            // Not a new stream: a frame on one no longer kept.
            return match self.past(id) {
                // Trailers the client sent before it heard of the reset.
                Past::Reset => Ok(()),
                Past::Closed => fatal(Reason::STREAM_CLOSED, "HEADERS on a closed stream"),
                // RFC 9113 §5.1.1: a new stream's id must be above every id the
                // client used before.
                Past::Skipped | Past::Unknown => fatal(
                    Reason::PROTOCOL_ERROR,
                    format!("stream {id} opened after stream {}", self.last_peer_stream),
                ),
            };
        }
        self.peer_opens(id);
        if self.goaway_sent {
            // Above the last stream GOAWAY promised to process: the client retries it.
            self.refuse(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if self.active >= self.config.max_concurrent_streams {
            self.refuse(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if self_dependent {
            tracing::debug!(
                stream = id,
                why = SELF_DEPENDENT,
                "malformed HTTP/2 request"
            );
            self.refuse(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        if decoded.too_large(self.config.max_header_list as usize) {
            // RFC 9113 §10.5.1 suggests 431 for a server.
            let start = self.begin_block();
            encoder::response(
                &mut self.out,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                &HeaderMap::new(),
            );
            frame::finish_headers(&mut self.out, start, id, true, self.peer_max_frame);
            if !end_stream {
                self.refuse(id, Reason::NO_ERROR);
            }
            return Ok(());
        }
        let head = match decoded.into_request() {
            Ok(head) => head,
            Err(why) => {
                tracing::debug!(stream = id, why, "malformed HTTP/2 request");
                self.refuse(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        let expected = match message::content_length(&head.headers) {
            Ok(expected) => expected,
            Err(why) => {
                tracing::debug!(stream = id, why, "malformed HTTP/2 request");
                self.refuse(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        if end_stream && expected.is_some_and(|n| n > 0) {
            self.refuse(id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        // Handles: the response's, and the body's unless there is none.
        let refs = if end_stream { 1 } else { 2 };
        let key = self.new_stream(id, refs);
        self.active += 1;
        let stream = &mut self.streams[key];
        stream.counted = true;
        stream.got_head = true;
        stream.recv_closed = end_stream;
        stream.expected = expected;
        self.accepted.push_back(Accepted {
            key,
            head,
            end_stream,
        });
        Ok(())
    }

    fn on_response(&mut self, key: usize, end_stream: bool, decoded: Block) {
        if self.streams[key].reset.is_some() {
            // Given up already; its response went out before the peer knew.
            return;
        }
        let max = self.config.max_header_list as usize;
        if decoded.too_large(max) {
            self.reset(
                key,
                Reason::PROTOCOL_ERROR,
                "response headers beyond the list limit",
            );
            return;
        }
        let head = match decoded.into_response() {
            Ok(head) => head,
            Err(why) => {
                self.reset(key, Reason::PROTOCOL_ERROR, why);
                return;
            }
        };
        if head.status.is_informational() {
            if end_stream || head.status == StatusCode::SWITCHING_PROTOCOLS {
                self.reset(
                    key,
                    Reason::PROTOCOL_ERROR,
                    "an informational response ends the stream",
                );
            }
            // 100 Continue and the like: the final response follows.
            return;
        }
        let expected = match message::content_length(&head.headers) {
            Ok(n) => n,
            Err(why) => {
                self.reset(key, Reason::PROTOCOL_ERROR, why);
                return;
            }
        };
        let stream = &mut self.streams[key];
        let bodiless = stream.head_request
            || head.status == StatusCode::NO_CONTENT
            || head.status == StatusCode::NOT_MODIFIED;
        if !bodiless {
            stream.expected = expected;
        }
        if end_stream && stream.expected.is_some_and(|n| n > 0) {
            self.reset(key, Reason::PROTOCOL_ERROR, "less data than content-length");
            return;
        }
        stream.got_head = true;
        stream.head = Some(head);
        stream.recv_closed = end_stream;
        stream.wake_recv();
        if end_stream {
            self.closed_if_done(key);
        }
    }

    fn on_trailers(&mut self, key: usize, end_stream: bool, decoded: Block) -> Result<(), Fatal> {
        let stream = &self.streams[key];
        if self.role == Role::Server && matches!(stream.reset, Some(Error::Reset(_))) {
            // As for DATA (see `on_data`).
            return fatal(Reason::STREAM_CLOSED, "HEADERS after RST_STREAM");
        }
        if stream.reset.is_some() {
            return Ok(());
        }
        if decoded.too_large(self.config.max_header_list as usize) {
            self.peer_error(
                key,
                Reason::PROTOCOL_ERROR,
                "trailers beyond the list limit",
            )?;
            return Ok(());
        }
        if self.role == Role::Server && stream.recv_closed && stream.send_closed {
            // As for DATA (see `on_data`).
            return fatal(Reason::STREAM_CLOSED, "HEADERS on a closed stream");
        }
        if stream.recv_closed {
            self.peer_error(key, Reason::STREAM_CLOSED, "HEADERS after the message")?;
            return Ok(());
        }
        if !end_stream {
            self.peer_error(key, Reason::PROTOCOL_ERROR, "trailers without END_STREAM")?;
            return Ok(());
        }
        if stream.expected.is_some_and(|n| n > 0) {
            self.peer_error(key, Reason::PROTOCOL_ERROR, "less data than content-length")?;
            return Ok(());
        }
        let trailers = match decoded.into_trailers() {
            Ok(t) => t,
            Err(why) => {
                self.peer_error(key, Reason::PROTOCOL_ERROR, why)?;
                return Ok(());
            }
        };
        let stream = &mut self.streams[key];
        stream.trailers = Some(trailers);
        stream.recv_closed = true;
        stream.wake_recv();
        self.closed_if_done(key);
        Ok(())
    }

    /// PRIORITY: the scheme is deprecated (RFC 9113 §5.3.2) and ignored, but a
    /// malformed frame is still a stream error: the wrong length (§6.3), or a
    /// stream depending on itself (§5.3.1).
    fn on_priority(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if head.stream == 0 {
            return fatal(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0");
        }
        if payload.len() != 5 {
            return self.stream_error_on(
                head.stream,
                Reason::FRAME_SIZE_ERROR,
                "PRIORITY not 5 bytes long",
            );
        }
        if be_u32(payload, 0) & frame::MAX_WINDOW == head.stream {
            return self.stream_error_on(head.stream, Reason::PROTOCOL_ERROR, SELF_DEPENDENT);
        }
        Ok(())
    }

    /// A stream error on stream `id` in whatever state it is (PRIORITY may name
    /// any): a kept stream is reset as usual; one no longer kept gets RST_STREAM
    /// (unless the proxy reset it already); an idle one may not (§6.4), so the
    /// connection goes instead (§5.4.1 allows it).
    fn stream_error_on(&mut self, id: u32, reason: Reason, why: &'static str) -> Result<(), Fatal> {
        if let Some(&key) = self.ids.get(&id) {
            return self.peer_error(key, reason, why);
        }
        if self.idle(id) {
            return fatal(reason, why);
        }
        tracing::debug!(stream = id, %reason, why, "HTTP/2 stream error on a closed stream");
        match self.role {
            Role::Server if self.past(id) == Past::Reset => {}
            Role::Server => self.refuse(id, reason),
            Role::Client => frame::put_rst(&mut self.out, id, reason),
        }
        Ok(())
    }

    fn on_rst(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if head.stream == 0 {
            return fatal(Reason::PROTOCOL_ERROR, "RST_STREAM on stream 0");
        }
        if payload.len() != 4 {
            return fatal(Reason::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes long");
        }
        let reason = Reason(be_u32(payload, 0));
        let Some(key) = self.known_stream(head.stream, "RST_STREAM")? else {
            return Ok(());
        };
        let stream = &mut self.streams[key];
        if stream.reset.is_none() {
            let was_open = !stream.closed();
            stream.reset = Some(Error::Reset(reason));
            self.end_stream(key);
            if was_open && self.role == Role::Server {
                self.count_peer_reset()?;
            }
        }
        Ok(())
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if head.stream != 0 {
            return fatal(Reason::PROTOCOL_ERROR, "SETTINGS on a stream");
        }
        if head.has(frame::ACK) {
            if !payload.is_empty() {
                return fatal(
                    Reason::FRAME_SIZE_ERROR,
                    "a SETTINGS acknowledgement with a payload",
                );
            }
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return fatal(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS not a multiple of 6 bytes",
            );
        }
        for setting in payload.chunks_exact(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = be_u32(setting, 2);
            match id {
                frame::SETTINGS_ENABLE_PUSH if value > 1 => {
                    return fatal(Reason::PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH above 1");
                }
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    if value > frame::MAX_WINDOW {
                        return fatal(
                            Reason::FLOW_CONTROL_ERROR,
                            "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1",
                        );
                    }
                    let delta = value as i64 - self.peer_initial_window as i64;
                    self.peer_initial_window = value;
                    for (key, stream) in self.streams.iter_mut() {
                        stream.send_window += delta;
                        if stream.send_window > frame::MAX_WINDOW as i64 {
                            return fatal(
                                Reason::FLOW_CONTROL_ERROR,
                                "a stream window above 2^31-1",
                            );
                        }
                        if delta > 0 && stream.pending.is_some() && stream.id != 0 && !stream.queued
                        {
                            stream.queued = true;
                            self.blocked.push_back((key, stream.serial));
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME_SIZE..=frame::MAX_MAX_FRAME_SIZE).contains(&value)
                    {
                        return fatal(
                            Reason::PROTOCOL_ERROR,
                            "SETTINGS_MAX_FRAME_SIZE out of range",
                        );
                    }
                    self.peer_max_frame = value as usize;
                }
                frame::SETTINGS_MAX_CONCURRENT_STREAMS => {
                    self.peer_max_streams = value;
                }
                frame::SETTINGS_HEADER_TABLE_SIZE if (value as usize) < HEADER_TABLE_SIZE => {
                    self.table_update_due = true;
                }
                // The list size is advisory; unknown settings are ignored.
                _ => {}
            }
        }
        self.got_settings = true;
        frame::put_settings_ack(&mut self.out);
        self.open_waiting();
        Ok(())
    }

    fn on_ping(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if head.stream != 0 {
            return fatal(Reason::PROTOCOL_ERROR, "PING on a stream");
        }
        let Ok(data) = <[u8; 8]>::try_from(payload) else {
            return fatal(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes long");
        };
        if head.has(frame::ACK) {
            self.pong = true;
            if self.draining && data == DRAIN_PING {
                self.final_go_away();
            }
        } else {
            frame::put_ping(&mut self.out, true, data);
        }
        Ok(())
    }

    fn on_goaway(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if head.stream != 0 {
            return fatal(Reason::PROTOCOL_ERROR, "GOAWAY on a stream");
        }
        if payload.len() < 8 {
            return fatal(Reason::FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes");
        }
        let last = be_u32(payload, 0) & frame::MAX_WINDOW;
        let reason = Reason(be_u32(payload, 4));
        tracing::debug!(last, %reason, "HTTP/2 peer sent GOAWAY");
        self.goaway_received = Some((last, reason));
        if self.role == Role::Client {
            // Streams above `last` were not processed and may go elsewhere; so may
            // those still waiting to open (which now never will).
            self.waiting.clear();
            let unprocessed: Vec<usize> = self
                .streams
                .iter()
                .filter(|(_, s)| (s.id > last || s.id == 0) && s.reset.is_none())
                .map(|(key, _)| key)
                .collect();
            for key in unprocessed {
                // Ending one stream may settle (and forget) others.
                if let Some(stream) = self.streams.get_mut(key) {
                    stream.reset = Some(Error::GoAway(reason));
                    self.end_stream(key);
                }
            }
        }
        Ok(())
    }

    fn on_window_update(&mut self, head: Head, payload: &[u8]) -> Result<(), Fatal> {
        if payload.len() != 4 {
            return fatal(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes long");
        }
        let increment = be_u32(payload, 0) & frame::MAX_WINDOW;
        if head.stream == 0 {
            if increment == 0 {
                return fatal(Reason::PROTOCOL_ERROR, "a WINDOW_UPDATE of 0");
            }
            self.send_window += increment as i64;
            if self.send_window > frame::MAX_WINDOW as i64 {
                return fatal(
                    Reason::FLOW_CONTROL_ERROR,
                    "the connection window above 2^31-1",
                );
            }
            return Ok(());
        }
        let Some(key) = self.known_stream(head.stream, "WINDOW_UPDATE")? else {
            return Ok(());
        };
        if increment == 0 {
            self.peer_error(key, Reason::PROTOCOL_ERROR, "a WINDOW_UPDATE of 0")?;
            return Ok(());
        }
        let stream = &mut self.streams[key];
        stream.send_window += increment as i64;
        if stream.send_window > frame::MAX_WINDOW as i64 {
            self.peer_error(
                key,
                Reason::FLOW_CONTROL_ERROR,
                "a stream window above 2^31-1",
            )?;
            return Ok(());
        }
        if stream.pending.is_some() && !stream.queued && stream.send_window > 0 {
            stream.queued = true;
            self.blocked.push_back((key, stream.serial));
        }
        Ok(())
    }

    /// A stream error the peer caused: the stream is reset, and on a client's
    /// connection counted as a reset of the client's (it costs the proxy the same:
    /// "MadeYouReset", CVE-2025-8671).
    fn peer_error(&mut self, key: usize, reason: Reason, why: &'static str) -> Result<(), Fatal> {
        let was_open = !self.streams[key].closed();
        self.reset(key, reason, why);
        if was_open && self.role == Role::Server {
            self.count_peer_reset()?;
        }
        Ok(())
    }

    /// Counts a client's reset of an open stream: opening streams and resetting them
    /// at once costs the proxy (and its backends) work and the client nothing, so a
    /// client doing it fast is told to go away (CVE-2023-44487, "rapid reset").
    fn count_peer_reset(&mut self) -> Result<(), Fatal> {
        let now = crate::clock::now();
        let (second, count) = &mut self.peer_resets;
        if *second != now {
            *second = now;
            *count = 0;
        }
        *count += 1;
        if *count > MAX_PEER_RESETS_PER_SECOND {
            return fatal(
                Reason::ENHANCE_YOUR_CALM,
                "too many streams reset by the client",
            );
        }
        Ok(())
    }

    /// A connection error of the peer's: GOAWAY, and every stream ends with it.
    pub fn fail(&mut self, Fatal(reason, why): Fatal) {
        if self.error.is_some() {
            return;
        }
        tracing::debug!(%reason, why, "HTTP/2 connection error");
        frame::put_goaway(&mut self.out, self.last_peer_stream, reason);
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

    /// Moves held-back data into the output as windows and room allow, fairly
    /// across streams. Called by the I/O task before it takes the output.
    pub fn schedule(&mut self) {
        let mut turns = self.blocked.len();
        while turns > 0 && self.send_window > 0 && self.out.len() < self.config.max_send_buffer {
            turns -= 1;
            let Some((key, serial)) = self.blocked.pop_front() else {
                break;
            };
            match self.streams.get_mut(key) {
                Some(stream) if stream.serial == serial => stream.queued = false,
                _ => continue,
            }
            match self.write_pending(key) {
                Progress::Done => {
                    self.streams[key].wake_send();
                    self.closed_if_done(key);
                }
                Progress::Blocked(true) => {
                    let stream = &mut self.streams[key];
                    stream.queued = true;
                    self.blocked.push_back((key, stream.serial));
                }
                Progress::Blocked(false) => {}
            }
        }
    }

    /// Writes as much of the stream's held-back data as the windows and the output
    /// allow.
    fn write_pending(&mut self, key: usize) -> Progress {
        let max_frame = self.peer_max_frame;
        let stream = &mut self.streams[key];
        loop {
            let Some((data, end)) = &mut stream.pending else {
                return Progress::Done;
            };
            if data.is_empty() {
                let end = *end;
                stream.pending = None;
                if end {
                    frame::put_data(&mut self.out, stream.id, &[], true);
                    stream.send_closed = true;
                } else if let Some(trailers) = stream.pending_trailers.take() {
                    let start = begin_block(&mut self.out, &mut self.table_update_due);
                    encoder::trailers(&mut self.out, &trailers);
                    frame::finish_headers(&mut self.out, start, stream.id, true, max_frame);
                    stream.send_closed = true;
                }
                return Progress::Done;
            }
            if stream.send_window <= 0 {
                return Progress::Blocked(false);
            }
            if self.send_window <= 0 || self.out.len() >= self.config.max_send_buffer {
                return Progress::Blocked(true);
            }
            let n = data
                .len()
                .min(max_frame)
                .min(stream.send_window as usize)
                .min(self.send_window as usize);
            let chunk = data.split_to(n);
            let last = data.is_empty() && *end && stream.pending_trailers.is_none();
            frame::put_data(&mut self.out, stream.id, &chunk, last);
            stream.send_window -= n as i64;
            self.send_window -= n as i64;
            if last {
                stream.pending = None;
                stream.send_closed = true;
                return Progress::Done;
            }
        }
    }

    /// Starts a HEADERS frame: see [`begin_block`].
    fn begin_block(&mut self) -> usize {
        begin_block(&mut self.out, &mut self.table_update_due)
    }

    // --- the streams' side ------------------------------------------------------------

    /// Gives back `n` bytes of receive window the stream's consumer took (or that
    /// no one will), sending WINDOW_UPDATEs once half a window is due.
    pub fn release(&mut self, key: usize, n: u32) {
        let stream_window = self.config.stream_window;
        let stream = &mut self.streams[key];
        if !stream.recv_closed && stream.reset.is_none() {
            stream.recv_unreleased += n;
            if stream.recv_unreleased >= stream_window / 2 {
                frame::put_window_update(&mut self.out, stream.id, stream.recv_unreleased);
                stream.recv_window += stream.recv_unreleased as i64;
                stream.recv_unreleased = 0;
                self.notify();
            }
        }
        self.release_connection(n);
    }

    fn release_connection(&mut self, n: u32) {
        self.recv_unreleased += n;
        if self.recv_unreleased >= self.config.connection_window / 2 {
            frame::put_window_update(&mut self.out, 0, self.recv_unreleased);
            self.recv_window += self.recv_unreleased as i64;
            self.recv_unreleased = 0;
            self.notify();
        }
    }

    /// Sends a response head (server).
    pub fn send_response(
        &mut self,
        key: usize,
        head: &response::Parts,
        end: bool,
    ) -> Result<(), Error> {
        if let Some(error) = self.stream_error(key) {
            return Err(error);
        }
        let id = self.streams[key].id;
        let start = self.begin_block();
        encoder::response(&mut self.out, head.status, &head.headers);
        frame::finish_headers(&mut self.out, start, id, end, self.peer_max_frame);
        if end {
            self.streams[key].send_closed = true;
            self.closed_if_done(key);
        }
        self.notify();
        Ok(())
    }

    /// Opens a stream for a request (client): now, or once the backend's stream
    /// limit allows. The key comes back for its handles (one for the response, one
    /// for the body unless `end`).
    pub fn send_request(
        &mut self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        end: bool,
    ) -> Result<usize, Error> {
        if let Some(error) = &self.error {
            return Err(error.clone());
        }
        if let Some((_, reason)) = self.goaway_received {
            return Err(Error::GoAway(reason));
        }
        if self.next_stream > frame::MAX_WINDOW {
            // Stream ids are used up: this connection takes no more requests.
            return Err(Error::GoAway(Reason::NO_ERROR));
        }
        let refs = if end { 1 } else { 2 };
        let key = self.new_stream(0, refs);
        let stream = &mut self.streams[key];
        stream.head_request = method == Method::HEAD;
        if self.waiting.is_empty() && self.active < self.peer_max_streams {
            let start = self.begin_block();
            encoder::request(&mut self.out, method, uri, headers);
            self.open(key, start, end);
        } else {
            let mut block = Vec::with_capacity(256);
            encoder::request(&mut block, method, uri, headers);
            stream.waiting_block = Some((block, end));
            self.waiting.push_back((key, stream.serial));
        }
        self.notify();
        Ok(key)
    }

    /// Gives a client stream its id and finishes its HEADERS frame (begun at `start`).
    fn open(&mut self, key: usize, start: usize, end: bool) {
        let id = self.next_stream;
        self.next_stream += 2;
        frame::finish_headers(&mut self.out, start, id, end, self.peer_max_frame);
        self.ids.insert(id, key);
        self.active += 1;
        let stream = &mut self.streams[key];
        stream.id = id;
        stream.counted = true;
        stream.send_closed = end;
        if stream.pending.is_some() && !stream.queued {
            // Data its sender handed over while the stream waited: written like
            // any held data, by `schedule`, which wakes the sender once it is out.
            stream.queued = true;
            self.blocked.push_back((key, stream.serial));
        }
    }

    /// Opens waiting client streams while the backend's limit allows.
    fn open_waiting(&mut self) {
        if self.goaway_received.is_some() {
            return;
        }
        while self.active < self.peer_max_streams && self.error.is_none() {
            if self.next_stream > frame::MAX_WINDOW {
                // Stream ids are used up: what waits goes elsewhere.
                for (key, serial) in std::mem::take(&mut self.waiting) {
                    if self.streams.get(key).is_some_and(|s| s.serial == serial) {
                        self.streams[key].reset = Some(Error::GoAway(Reason::NO_ERROR));
                        self.end_stream(key);
                    }
                }
                return;
            }
            let Some((key, serial)) = self.waiting.pop_front() else {
                return;
            };
            let Some(stream) = self.streams.get_mut(key).filter(|s| s.serial == serial) else {
                continue;
            };
            let Some((block, end)) = stream.waiting_block.take() else {
                continue;
            };
            let start = self.begin_block();
            self.out.extend_from_slice(&block);
            self.open(key, start, end);
        }
    }

    /// Hands data to a stream: written now as far as the windows allow, the rest
    /// held (one chunk: the sender waits for [`Inner::ready_to_send`] before the next).
    pub fn send_data(&mut self, key: usize, data: Bytes, end: bool) -> Result<(), Error> {
        if let Some(error) = self.stream_error(key) {
            return Err(error);
        }
        let stream = &mut self.streams[key];
        if stream.send_closed {
            return Err(Error::LocalReset(
                Reason::STREAM_CLOSED,
                "data after the end of the stream",
            ));
        }
        stream.pending = Some((data, end));
        if stream.id != 0 {
            self.push_pending(key);
        }
        Ok(())
    }

    pub fn send_trailers(&mut self, key: usize, trailers: HeaderMap) -> Result<(), Error> {
        if let Some(error) = self.stream_error(key) {
            return Err(error);
        }
        let stream = &mut self.streams[key];
        if stream.send_closed {
            return Err(Error::LocalReset(
                Reason::STREAM_CLOSED,
                "trailers after the end of the stream",
            ));
        }
        stream.pending_trailers = Some(trailers);
        let data = match stream.pending.take() {
            Some((data, _)) => data,
            None => Bytes::new(),
        };
        stream.pending = Some((data, false));
        if stream.id != 0 {
            self.push_pending(key);
        }
        Ok(())
    }

    fn push_pending(&mut self, key: usize) {
        match self.write_pending(key) {
            Progress::Done => self.closed_if_done(key),
            Progress::Blocked(true) => {
                let stream = &mut self.streams[key];
                if !stream.queued {
                    stream.queued = true;
                    self.blocked.push_back((key, stream.serial));
                }
            }
            Progress::Blocked(false) => {}
        }
        self.notify();
    }

    /// Whether the stream took its last chunk whole (so the next may come).
    pub fn ready_to_send(&self, key: usize) -> bool {
        self.streams[key].pending.is_none()
    }

    /// Resets a stream (a protocol error on it, or its handles gave it up).
    pub fn reset(&mut self, key: usize, reason: Reason, why: &'static str) {
        let stream = &mut self.streams[key];
        if stream.reset.is_some() {
            return;
        }
        tracing::trace!(stream = stream.id, %reason, why, "HTTP/2 stream reset");
        stream.reset = Some(Error::LocalReset(reason, why));
        let id = stream.id;
        if id != 0 {
            frame::put_rst(&mut self.out, id, reason);
            if self.role == Role::Server {
                self.mark_reset(id);
            }
        }
        self.end_stream(key);
        self.notify();
    }

    /// A stream ended early: what it held to send is dropped, and so is what it
    /// received of a message that will not complete (a complete one can still be
    /// read); its handles are woken.
    fn end_stream(&mut self, key: usize) {
        let stream = &mut self.streams[key];
        stream.pending = None;
        stream.pending_trailers = None;
        stream.waiting_block = None;
        let mut unread = 0;
        if !stream.recv_closed {
            unread = stream.data.iter().map(Bytes::len).sum();
            stream.data.clear();
        }
        stream.wake_recv();
        stream.wake_send();
        if unread > 0 {
            self.release_connection(unread as u32);
        }
        self.closed_if_done(key);
    }

    /// Counts a stream out of the open ones once both halves are closed, and
    /// settles it if no handle holds it.
    fn closed_if_done(&mut self, key: usize) {
        let stream = &mut self.streams[key];
        if stream.closed() && stream.counted {
            stream.counted = false;
            self.active -= 1;
            if self.role == Role::Client {
                self.open_waiting();
            }
        }
        if self.streams[key].refs == 0 {
            self.settle(key);
        }
    }

    /// A stream no handle holds: forgotten once closed; given up if it is still
    /// open and nothing it holds will close it (held data with the end of the
    /// stream will: it is written first). CANCEL if the proxy had more to send,
    /// NO_ERROR if only the peer had (RFC 9113 §8.1: a server may answer before
    /// the request ended).
    fn settle(&mut self, key: usize) {
        let stream = &self.streams[key];
        if stream.closed() {
            self.forget(key);
            return;
        }
        let finishing = stream.pending.as_ref().is_some_and(|(_, end)| *end)
            || stream.pending_trailers.is_some();
        if finishing {
            return;
        }
        let reason = if stream.send_closed && self.role == Role::Server {
            Reason::NO_ERROR
        } else {
            Reason::CANCEL
        };
        self.reset(key, reason, "abandoned");
    }

    fn forget(&mut self, key: usize) {
        let stream = self.streams.remove(key);
        if stream.id != 0 {
            self.ids.remove(&stream.id);
        }
        let unread: usize = stream.data.iter().map(Bytes::len).sum();
        if unread > 0 {
            self.release_connection(unread as u32);
        }
    }

    /// The reader of the stream's data went away: what it left, and what still
    /// comes, goes back to the connection's window at once.
    pub fn drop_reader(&mut self, key: usize) {
        let stream = &mut self.streams[key];
        stream.recv_dropped = true;
        let unread: usize = stream.data.iter().map(Bytes::len).sum();
        stream.data.clear();
        stream.trailers = None;
        if unread > 0 {
            self.release(key, unread as u32);
        }
        if self.role == Role::Client && !self.streams[key].recv_closed {
            // The response is no longer wanted: neither is the rest of the request.
            self.reset(key, Reason::CANCEL, "the response was given up");
        }
        self.drop_ref(key);
    }

    /// A request accepted from the client but reset before anyone took it: no
    /// handle will be made for it.
    pub fn discard(&mut self, key: usize) {
        self.streams[key].refs = 0;
        self.settle(key);
    }

    /// A handle was dropped: the last one settles the stream.
    pub fn drop_ref(&mut self, key: usize) {
        let stream = &mut self.streams[key];
        stream.refs -= 1;
        if stream.refs == 0 {
            self.settle(key);
            self.notify();
        }
    }

    // --- the connection's side -------------------------------------------------------

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
            frame::put_goaway(&mut self.out, self.last_peer_stream, Reason::NO_ERROR);
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

    /// Panics if the books do not balance: the open-stream count, the id index
    /// and the queues agree with the streams. For tests.
    #[cfg(test)]
    pub fn check(&self) {
        let counted = self.streams.iter().filter(|(_, s)| s.counted).count();
        assert_eq!(self.active as usize, counted, "active streams miscounted");
        for (&id, &key) in &self.ids {
            assert_eq!(
                self.streams[key].id, id,
                "the id index points at another stream"
            );
        }
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

    /// Whether a client connection takes no more requests: the backend sent GOAWAY,
    /// or the stream ids ran out.
    pub fn going_away(&self) -> bool {
        self.goaway_received.is_some() || self.next_stream > frame::MAX_WINDOW
    }

    pub fn send_ping(&mut self) {
        frame::put_ping(&mut self.out, false, *b"tandem\0\0");
        self.notify();
    }
}

/// How far [`Inner::write_pending`] got: all of it, or held back by the stream's
/// own window (`false`: a WINDOW_UPDATE for it re-queues it) or by the connection
/// window or a full output (`true`: stays queued).
enum Progress {
    Done,
    Blocked(bool),
}
