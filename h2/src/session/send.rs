//! Sending: header blocks encoded straight into the output, data written as far
//! as the peer's windows and the output's room allow and held back (one chunk per
//! stream) beyond, and the scheduler that writes what was held as windows open.
//! Client streams beyond the peer's SETTINGS_MAX_CONCURRENT_STREAMS wait here,
//! encoded, for a slot.

use bytes::Bytes;
use http::{HeaderMap, Method, Uri, response};

use super::Inner;
use crate::error::Error;
use crate::frame::{self, Reason};
use crate::hpack::encoder;

/// How far [`Inner::write_pending`] got: all of it, or held back by the stream's
/// own window (`false`: a WINDOW_UPDATE for it re-queues it) or by the connection
/// window or a full output (`true`: stays queued).
enum Progress {
    Done,
    Blocked(bool),
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

impl Inner {
    /// Moves held-back data into the output as windows and room allow, fairly
    /// across streams. Called by the I/O task before it takes the output.
    pub fn schedule(&mut self) {
        let mut turns = self.blocked.len();
        while turns > 0 && self.send_window > 0 && self.out.len() < self.config.max_send_buffer {
            turns -= 1;
            let Some((key, serial)) = self.blocked.pop_front() else {
                break;
            };
            match self.streams.live(key, serial) {
                Some(stream) => stream.queued = false,
                None => continue,
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
    pub(super) fn begin_block(&mut self) -> usize {
        begin_block(&mut self.out, &mut self.table_update_due)
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
        if self.streams.ids_exhausted() {
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
        let id = self.streams.assign_id(key);
        frame::finish_headers(&mut self.out, start, id, end, self.peer_max_frame);
        self.active += 1;
        let stream = &mut self.streams[key];
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
    pub(super) fn open_waiting(&mut self) {
        if self.goaway_received.is_some() {
            return;
        }
        while self.active < self.peer_max_streams && self.error.is_none() {
            if self.streams.ids_exhausted() {
                // Stream ids are used up: what waits goes elsewhere.
                for (key, serial) in std::mem::take(&mut self.waiting) {
                    if self.streams.live(key, serial).is_some() {
                        self.streams[key].reset = Some(Error::GoAway(Reason::NO_ERROR));
                        self.end_stream(key);
                    }
                }
                return;
            }
            let Some((key, serial)) = self.waiting.pop_front() else {
                return;
            };
            let Some(stream) = self.streams.live(key, serial) else {
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

    /// A PING of the keep-alive's ([`crate::KeepAlive`]).
    pub fn send_ping(&mut self) {
        frame::put_ping(&mut self.out, false, *b"tandem\0\0");
        self.notify();
    }
}

#[cfg(test)]
mod tests {
    use http::Response;

    use super::super::testing::*;
    use super::super::{Config, Role};
    use super::*;

    fn settings(id: u16, value: u32) -> Vec<u8> {
        let mut payload = id.to_be_bytes().to_vec();
        payload.extend_from_slice(&value.to_be_bytes());
        raw(frame::SETTINGS, 0, 0, &payload)
    }

    fn data(stream: u32, len: usize, end: bool) -> Sent {
        let flags = if end { frame::END_STREAM } else { 0 };
        (frame::DATA, flags, stream, vec![b'r'; len])
    }

    /// A server session with request `id` accepted and answered with a head: the
    /// stream's key.
    fn answered(inner: &mut Inner, id: u32) -> usize {
        feed(inner, raw(frame::HEADERS, WHOLE, id, GET));
        let key = inner.accepted.pop_front().unwrap().key;
        let (head, ()) = Response::new(()).into_parts();
        inner.send_response(key, &head, false).unwrap();
        assert_eq!(
            sent(inner),
            vec![(frame::HEADERS, frame::END_HEADERS, id, OK.to_vec())]
        );
        key
    }

    #[test]
    fn data_beyond_the_stream_window_waits_for_its_window_update() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        feed(
            &mut inner,
            settings(frame::SETTINGS_INITIAL_WINDOW_SIZE, 10),
        );
        sent(&mut inner);
        let key = answered(&mut inner, 1);
        inner
            .send_data(key, Bytes::from(vec![b'r'; 100]), true)
            .unwrap();
        assert_eq!(sent(&mut inner), vec![data(1, 10, false)]);
        assert!(!inner.ready_to_send(key), "the rest is held");
        inner.schedule();
        assert!(sent(&mut inner).is_empty(), "nothing opened the window");
        feed(
            &mut inner,
            raw(frame::WINDOW_UPDATE, 0, 1, &1000u32.to_be_bytes()),
        );
        inner.schedule();
        assert_eq!(sent(&mut inner), vec![data(1, 90, true)]);
        assert!(inner.ready_to_send(key));
        inner.drop_ref(key);
        inner.check();
        assert_eq!(inner.streams.iter().count(), 0, "done both ways, forgotten");
    }

    #[test]
    fn data_beyond_the_connection_window_waits_its_turn() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        // Stream windows large enough; the connection's (65,535) is not.
        feed(
            &mut inner,
            settings(frame::SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20),
        );
        feed(
            &mut inner,
            settings(frame::SETTINGS_MAX_FRAME_SIZE, 1 << 20),
        );
        sent(&mut inner);
        let a = answered(&mut inner, 1);
        let b = answered(&mut inner, 3);
        inner
            .send_data(a, Bytes::from(vec![b'r'; 65_535]), false)
            .unwrap();
        assert_eq!(sent(&mut inner), vec![data(1, 65_535, false)]);
        assert!(inner.ready_to_send(a), "taken whole");
        inner
            .send_data(b, Bytes::from(vec![b'r'; 100]), true)
            .unwrap();
        inner
            .send_data(a, Bytes::from(vec![b'r'; 100]), true)
            .unwrap();
        assert!(
            sent(&mut inner).is_empty(),
            "the connection window is spent"
        );
        // Written in the order held: stream 3 first, then what is left for 1.
        feed(
            &mut inner,
            raw(frame::WINDOW_UPDATE, 0, 0, &150u32.to_be_bytes()),
        );
        inner.schedule();
        assert_eq!(
            sent(&mut inner),
            vec![data(3, 100, true), data(1, 50, false)]
        );
        assert!(inner.ready_to_send(b) && !inner.ready_to_send(a));
        inner.check();
    }

    #[test]
    fn trailers_follow_the_data_held_before_them() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        feed(
            &mut inner,
            settings(frame::SETTINGS_INITIAL_WINDOW_SIZE, 10),
        );
        sent(&mut inner);
        let key = answered(&mut inner, 1);
        inner
            .send_data(key, Bytes::from(vec![b'r'; 20]), false)
            .unwrap();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        inner.send_trailers(key, trailers).unwrap();
        assert_eq!(sent(&mut inner), vec![data(1, 10, false)]);
        feed(
            &mut inner,
            raw(frame::WINDOW_UPDATE, 0, 1, &10u32.to_be_bytes()),
        );
        inner.schedule();
        let frames = sent(&mut inner);
        assert_eq!(frames[0], data(1, 10, false));
        assert_eq!(
            (frames[1].0, frames[1].1),
            (frame::HEADERS, frame::END_HEADERS | frame::END_STREAM)
        );
        assert_eq!(frames.len(), 2);
        inner.check();
    }

    #[test]
    fn requests_beyond_the_peers_stream_limit_wait_encoded() {
        let session = session(Role::Client, config());
        let mut inner = session.lock();
        feed(
            &mut inner,
            settings(frame::SETTINGS_MAX_CONCURRENT_STREAMS, 1),
        );
        sent(&mut inner);
        let uri = Uri::from_static("http://backend/");
        let first = inner
            .send_request(&Method::GET, &uri, &HeaderMap::new(), true)
            .unwrap();
        let second = inner
            .send_request(&Method::GET, &uri, &HeaderMap::new(), true)
            .unwrap();
        let frames = sent(&mut inner);
        assert_eq!(frames.len(), 1);
        assert_eq!((frames[0].0, frames[0].2), (frame::HEADERS, 1));
        assert_eq!(inner.streams[second].id, 0, "not opened yet");
        inner.check();
        // The first stream's response ends it: the second opens, with the same block.
        feed(&mut inner, raw(frame::HEADERS, WHOLE, 1, OK));
        assert_eq!(inner.streams[second].id, 3);
        let again = sent(&mut inner);
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].0, again[0].2), (frame::HEADERS, 3));
        assert_eq!(again[0].3, frames[0].3);
        inner.check();
        inner.drop_reader(first);
        inner.drop_reader(second);
        inner.check();
    }

    #[test]
    fn a_peer_that_shrinks_its_table_hears_ours_is_empty_once() {
        let session = session(Role::Server, Config::default());
        let mut inner = session.lock();
        feed(&mut inner, settings(frame::SETTINGS_HEADER_TABLE_SIZE, 0));
        sent(&mut inner);
        let key = answered_with_update(&mut inner);
        inner.drop_ref(key);
        // The next block says nothing of it.
        answered(&mut inner, 3);
    }

    fn answered_with_update(inner: &mut Inner) -> usize {
        feed(inner, raw(frame::HEADERS, WHOLE, 1, GET));
        let key = inner.accepted.pop_front().unwrap().key;
        let (head, ()) = Response::new(()).into_parts();
        inner.send_response(key, &head, true).unwrap();
        assert_eq!(
            sent(inner),
            vec![(frame::HEADERS, WHOLE, 1, vec![0x20, OK[0]])]
        );
        key
    }
}
