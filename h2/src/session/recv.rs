//! Receiving: every frame the peer sends, checked and applied to the session
//! (streams opened, data and headers handed to their readers, the peer's settings,
//! windows and resets), and the receive windows given back as the application
//! reads. A connection error comes back as [`Fatal`], for GOAWAY.

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::store::Past;
use super::{Accepted, DRAIN_PING, Fatal, HEADER_TABLE_SIZE, Inner, Role, fatal};
use crate::error::Error;
use crate::frame::{self, Head, Reason};
use crate::hpack::encoder;
use crate::message::{self, Block};

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
/// Why a stream was reset for depending on itself (RFC 9113 §5.3.1).
const SELF_DEPENDENT: &str = "a stream depending on itself";

/// A header block spread over HEADERS and CONTINUATION frames.
pub struct Continuation {
    stream: u32,
    end_stream: bool,
    /// The HEADERS frame made the stream depend on itself (RFC 9113 §5.3.1).
    self_dependent: bool,
    block: Vec<u8>,
    /// CONTINUATION frames so far.
    frames: u32,
}

/// Resets of open streams by the client in the current second of the session's
/// clock ([`crate::Config::clock`]).
#[derive(Default)]
pub struct PeerResets {
    second: u32,
    count: u32,
}

impl PeerResets {
    /// Counts one at `now`; how many so far this second.
    fn count(&mut self, now: u32) -> u32 {
        if self.second != now {
            self.second = now;
            self.count = 0;
        }
        self.count += 1;
        self.count
    }
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

impl Inner {
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
        match self.streams.key(id) {
            Some(key) => Ok(Some(key)),
            None if self.streams.idle(id) => fatal(
                Reason::PROTOCOL_ERROR,
                format!("{frame} on a stream never opened"),
            ),
            None => Ok(None),
        }
    }

    /// Refuses a request the client opened, with RST_STREAM (server).
    fn refuse(&mut self, id: u32, reason: Reason) {
        frame::put_rst(&mut self.out, id, reason);
        self.streams.mark_reset(id);
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
                && matches!(self.streams.past(head.stream), Past::Closed | Past::Skipped)
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
        let key = self.streams.key(id);
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
                if self.streams.idle(id) {
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
        if id <= self.streams.last_peer_stream() {
            // Not a new stream: a frame on one no longer kept.
            return match self.streams.past(id) {
                // Trailers the client sent before it heard of the reset.
                Past::Reset => Ok(()),
                Past::Closed => fatal(Reason::STREAM_CLOSED, "HEADERS on a closed stream"),
                // RFC 9113 §5.1.1: a new stream's id must be above every id the
                // client used before.
                Past::Skipped | Past::Unknown => fatal(
                    Reason::PROTOCOL_ERROR,
                    format!(
                        "stream {id} opened after stream {}",
                        self.streams.last_peer_stream()
                    ),
                ),
            };
        }
        self.streams.peer_opens(id);
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
    /// (unless this end reset it already); an idle one may not (§6.4), so the
    /// connection goes instead (§5.4.1 allows it).
    fn stream_error_on(&mut self, id: u32, reason: Reason, why: &'static str) -> Result<(), Fatal> {
        if let Some(key) = self.streams.key(id) {
            return self.peer_error(key, reason, why);
        }
        if self.streams.idle(id) {
            return fatal(reason, why);
        }
        tracing::debug!(stream = id, %reason, why, "HTTP/2 stream error on a closed stream");
        match self.role {
            Role::Server if self.streams.past(id) == Past::Reset => {}
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
    /// connection counted as a reset of the client's (it costs this end the same:
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
    /// at once costs this end (and a proxy's backends) work and the client nothing,
    /// so a client doing it fast is told to go away (CVE-2023-44487, "rapid reset").
    fn count_peer_reset(&mut self) -> Result<(), Fatal> {
        let now = (self.config.clock)();
        if self.peer_resets.count(now) > MAX_PEER_RESETS_PER_SECOND {
            return fatal(
                Reason::ENHANCE_YOUR_CALM,
                "too many streams reset by the client",
            );
        }
        Ok(())
    }

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

    pub(super) fn release_connection(&mut self, n: u32) {
        self.recv_unreleased += n;
        if self.recv_unreleased >= self.config.connection_window / 2 {
            frame::put_window_update(&mut self.out, 0, self.recv_unreleased);
            self.recv_window += self.recv_unreleased as i64;
            self.recv_unreleased = 0;
            self.notify();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::super::testing::*;
    use super::super::{Config, Session};
    use super::*;

    /// The clock of [`the_rapid_reset_window_rolls_over_with_the_clock`], which
    /// alone sets it.
    static NOW: AtomicU32 = AtomicU32::new(5);

    fn test_clock() -> u32 {
        NOW.load(Ordering::Relaxed)
    }

    /// Opens stream `id` and resets it (the client's RST_STREAM); a connection
    /// error comes back.
    fn open_and_reset(inner: &mut Inner, id: u32) -> Result<(), Fatal> {
        feed(inner, raw(frame::HEADERS, frame::END_HEADERS, id, GET));
        let reset = raw(frame::RST_STREAM, 0, id, &Reason::CANCEL.0.to_be_bytes());
        let result = try_feed(inner, reset);
        // As the connection does: a request reset before it was taken is dropped.
        while let Some(accepted) = inner.accepted.pop_front() {
            inner.discard(accepted.key);
        }
        result
    }

    #[test]
    fn the_rapid_reset_window_rolls_over_with_the_clock() {
        let config = Config {
            clock: test_clock,
            ..config()
        };
        let session = session(Role::Server, config);
        let mut inner = session.lock();
        let mut id = 1;
        let mut next = || {
            id += 2;
            id - 2
        };
        // A second's worth of resets is allowed...
        for _ in 0..MAX_PEER_RESETS_PER_SECOND {
            assert!(open_and_reset(&mut inner, next()).is_ok());
        }
        // ...and as many again in the next second, once the clock moves on.
        NOW.store(6, Ordering::Relaxed);
        for _ in 0..MAX_PEER_RESETS_PER_SECOND {
            assert!(open_and_reset(&mut inner, next()).is_ok());
        }
        inner.check();
        // One more within that second is too many.
        let result = open_and_reset(&mut inner, next());
        assert_eq!(fatal_reason(result), Reason::ENHANCE_YOUR_CALM);
    }

    #[test]
    fn resets_are_counted_per_second() {
        let mut resets = PeerResets::default();
        assert_eq!(resets.count(0), 1);
        assert_eq!(resets.count(0), 2);
        assert_eq!(resets.count(1), 1, "a new second starts from nothing");
        assert_eq!(resets.count(1), 2);
        assert_eq!(resets.count(0), 1, "any change of second does");
    }

    #[test]
    fn stream_errors_the_client_provokes_count_as_its_resets() {
        // A WINDOW_UPDATE of 0 on an open stream: RST_STREAM from this end
        // ("MadeYouReset", CVE-2025-8671), counted like the client's own.
        let config = Config {
            clock: || 0,
            ..config()
        };
        let session = session(Role::Server, config);
        let mut inner = session.lock();
        let mut result = Ok(());
        for i in 0..=MAX_PEER_RESETS_PER_SECOND {
            let id = 2 * i + 1;
            feed(&mut inner, raw(frame::HEADERS, frame::END_HEADERS, id, GET));
            result = try_feed(&mut inner, raw(frame::WINDOW_UPDATE, 0, id, &[0; 4]));
            while let Some(accepted) = inner.accepted.pop_front() {
                inner.discard(accepted.key);
            }
            if result.is_err() {
                break;
            }
        }
        assert_eq!(fatal_reason(result), Reason::ENHANCE_YOUR_CALM);
    }

    #[test]
    fn the_first_frame_must_be_settings() {
        let session = Session::new(Role::Server, config());
        let mut inner = session.lock();
        let ping = raw(frame::PING, 0, 0, &[0; 8]);
        assert_eq!(
            fatal_reason(try_feed(&mut inner, ping)),
            Reason::PROTOCOL_ERROR
        );
    }

    #[test]
    fn receive_windows_are_given_back_as_data_is_read() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        feed(&mut inner, raw(frame::HEADERS, frame::END_HEADERS, 1, GET));
        let key = inner.accepted.pop_front().unwrap().key;
        feed(&mut inner, raw(frame::DATA, 0, 1, &[b'x'; 20_000]));
        feed(&mut inner, raw(frame::DATA, 0, 1, &[b'x'; 20_000]));
        assert_eq!(inner.streams[key].data.len(), 2);
        // Under half a window read: nothing to say yet.
        inner.release(key, 20_000);
        assert!(sent(&mut inner).is_empty());
        // Half a window: both windows are topped up.
        inner.release(key, 20_000);
        assert_eq!(
            sent(&mut inner),
            vec![window_update(1, 40_000), window_update(0, 40_000)]
        );
        // Padding (and its length byte) is given back at once: no one reads it.
        let mut padded = vec![200];
        padded.extend_from_slice(&[b'y'; 10]);
        padded.extend_from_slice(&[0; 200]);
        feed(&mut inner, raw(frame::DATA, frame::PADDED, 1, &padded));
        assert_eq!(inner.streams[key].recv_unreleased, 201);
        assert_eq!(inner.recv_unreleased, 201);
        inner.check();
    }

    #[test]
    fn data_beyond_a_window_is_refused() {
        let large = Config {
            connection_window: 1024 * 1024,
            ..config()
        };
        let one = session(Role::Server, large);
        let mut inner = one.lock();
        // Beyond the stream's window: the stream is reset, the connection goes on.
        feed(&mut inner, raw(frame::HEADERS, frame::END_HEADERS, 1, GET));
        for _ in 0..3 {
            feed(&mut inner, raw(frame::DATA, 0, 1, &[b'x'; 16_384]));
        }
        feed(&mut inner, raw(frame::DATA, 0, 1, &[b'x'; 16_383]));
        assert!(sent(&mut inner).is_empty());
        feed(&mut inner, raw(frame::DATA, 0, 1, b"x"));
        let frames = sent(&mut inner);
        assert!(
            frames.contains(&rst(1, Reason::FLOW_CONTROL_ERROR)),
            "{frames:?}"
        );
        inner.check();
        // Beyond the connection's: a connection error.
        let other = session(Role::Server, config());
        let mut inner = other.lock();
        for id in [1, 3, 5, 7, 9] {
            feed(&mut inner, raw(frame::HEADERS, frame::END_HEADERS, id, GET));
            if id < 9 {
                feed(&mut inner, raw(frame::DATA, 0, id, &[b'x'; 16_000]));
            }
        }
        let result = try_feed(&mut inner, raw(frame::DATA, 0, 9, &[b'x'; 1_536]));
        assert_eq!(fatal_reason(result), Reason::FLOW_CONTROL_ERROR);
    }

    #[test]
    fn malformed_requests_are_refused_and_the_connection_goes_on() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        // No :path.
        feed(
            &mut inner,
            raw(frame::HEADERS, WHOLE, 1, &[0x82, 0x86, 0x01, 0x01, b'a']),
        );
        // A connection-specific header (connection: close).
        let mut block = GET.to_vec();
        block.extend_from_slice(&[0x00, 0x0a]);
        block.extend_from_slice(b"connection");
        block.extend_from_slice(&[0x05]);
        block.extend_from_slice(b"close");
        feed(&mut inner, raw(frame::HEADERS, WHOLE, 3, &block));
        assert_eq!(
            sent(&mut inner),
            vec![
                rst(1, Reason::PROTOCOL_ERROR),
                rst(3, Reason::PROTOCOL_ERROR)
            ]
        );
        assert!(inner.accepted.is_empty());
        feed(&mut inner, raw(frame::HEADERS, WHOLE, 5, GET));
        assert_eq!(inner.accepted.len(), 1);
        inner.check();
    }
}
