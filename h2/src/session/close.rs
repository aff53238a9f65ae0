//! How a stream ends: reset (by either end, or given up by its handles), closed
//! both ways, then forgotten once no handle holds it; what it held of either
//! window goes back.

use super::{Inner, Role};
use crate::error::Error;
use crate::frame::{self, Reason};

impl Inner {
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
                self.streams.mark_reset(id);
            }
        }
        self.end_stream(key);
        self.notify();
    }

    /// A stream ended early: what it held to send is dropped, and so is what it
    /// received of a message that will not complete (a complete one can still be
    /// read); its handles are woken.
    pub(super) fn end_stream(&mut self, key: usize) {
        let stream = &mut self.streams[key];
        stream.pending = None;
        stream.pending_trailers = None;
        stream.waiting_block = None;
        let mut unread = 0;
        if !stream.recv_closed {
            unread = stream.unread();
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
    pub(super) fn closed_if_done(&mut self, key: usize) {
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
    /// stream will: it is written first). CANCEL if this end had more to send,
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
        let unread = self.streams.remove(key).unread();
        if unread > 0 {
            self.release_connection(unread as u32);
        }
    }

    /// The reader of the stream's data went away: what it left, and what still
    /// comes, goes back to the connection's window at once.
    pub fn drop_reader(&mut self, key: usize) {
        let stream = &mut self.streams[key];
        stream.recv_dropped = true;
        let unread = stream.unread();
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
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method, Response, Uri};

    use super::super::testing::*;
    use super::*;

    #[test]
    fn a_server_done_answering_lets_the_rest_of_the_request_go_with_no_error() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        // A request whose body is still coming, answered whole.
        feed(&mut inner, raw(frame::HEADERS, frame::END_HEADERS, 1, GET));
        let key = inner.accepted.pop_front().unwrap().key;
        let (head, ()) = Response::new(()).into_parts();
        inner.send_response(key, &head, true).unwrap();
        sent(&mut inner);
        inner.drop_ref(key);
        assert!(
            sent(&mut inner).is_empty(),
            "the body's reader still holds it"
        );
        inner.drop_reader(key);
        // RFC 9113 §8.1: NO_ERROR, the answer stands.
        assert_eq!(sent(&mut inner), vec![rst(1, Reason::NO_ERROR)]);
        assert_eq!(inner.streams.iter().count(), 0, "forgotten");
        assert_eq!(inner.active, 0);
        inner.check();
    }

    #[test]
    fn what_a_reset_stream_held_unread_goes_back_to_the_connection() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        feed(&mut inner, raw(frame::HEADERS, frame::END_HEADERS, 1, GET));
        let key = inner.accepted.pop_front().unwrap().key;
        feed(&mut inner, raw(frame::DATA, 0, 1, &[b'x'; 40_000]));
        // The client resets it: the 40,000 bytes will never be read.
        let cancel = raw(frame::RST_STREAM, 0, 1, &Reason::CANCEL.0.to_be_bytes());
        feed(&mut inner, cancel);
        assert_eq!(sent(&mut inner), vec![window_update(0, 40_000)]);
        assert!(matches!(
            inner.stream_error(key),
            Some(Error::Reset(Reason::CANCEL))
        ));
        // Kept for its handles, which see the reset, then forgotten.
        inner.drop_reader(key);
        inner.drop_ref(key);
        assert!(sent(&mut inner).is_empty(), "no reset of a reset stream");
        assert_eq!(inner.streams.iter().count(), 0);
        inner.check();
    }

    #[test]
    fn a_client_that_gives_up_the_response_cancels_the_request() {
        let session = session(Role::Client, config());
        let mut inner = session.lock();
        let uri = Uri::from_static("http://backend/");
        let key = inner
            .send_request(&Method::POST, &uri, &HeaderMap::new(), false)
            .unwrap();
        sent(&mut inner);
        inner.drop_reader(key);
        assert_eq!(sent(&mut inner), vec![rst(1, Reason::CANCEL)]);
        assert!(inner.stream_error(key).is_some(), "its sender sees it");
        inner.drop_ref(key);
        assert_eq!(inner.streams.iter().count(), 0);
        inner.check();
    }

    #[test]
    fn held_data_that_ends_a_stream_outlives_its_sender() {
        let session = session(Role::Server, config());
        let mut inner = session.lock();
        // The peer's window is 10: most of the answer is held.
        let mut settings = frame::SETTINGS_INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
        settings.extend_from_slice(&10u32.to_be_bytes());
        feed(&mut inner, raw(frame::SETTINGS, 0, 0, &settings));
        feed(&mut inner, raw(frame::HEADERS, WHOLE, 1, GET));
        let key = inner.accepted.pop_front().unwrap().key;
        let (head, ()) = Response::new(()).into_parts();
        inner.send_response(key, &head, false).unwrap();
        inner
            .send_data(key, bytes::Bytes::from(vec![b'r'; 30]), true)
            .unwrap();
        sent(&mut inner);
        // The sender goes: the stream stays, to finish.
        inner.drop_ref(key);
        inner.check();
        assert_eq!(inner.streams.iter().count(), 1);
        feed(
            &mut inner,
            raw(frame::WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes()),
        );
        inner.schedule();
        let frames = sent(&mut inner);
        assert_eq!(
            frames.last().map(|f| (f.0, f.1)),
            Some((frame::DATA, frame::END_STREAM))
        );
        assert_eq!(
            inner.streams.iter().count(),
            0,
            "written whole, then forgotten"
        );
        inner.check();
    }
}
