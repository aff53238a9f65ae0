//! The I/O of one HTTP/2 connection: reads frames into its [`Session`] and writes
//! out what the session's streams produced. Runs in one task; the streams' handles
//! may be anywhere.
//!
//! A caller drives it with [`Connection::poll_read`], takes the requests a client
//! opened with [`Connection::accept`] (server), polls whatever it runs the streams
//! in, then [`Connection::poll_flush`]: what the streams wrote meanwhile leaves in
//! that one flush.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use http::Request;
use tokio::io::{AsyncRead, AsyncWrite};

use super::error::ConnectionError;
use super::frame::{self, Head, Reason};
use super::session::{Accepted, Config, Fatal, Role, Session};
use super::streams::{Client, RecvStream, SendResponse};

/// Room the read buffer is given at a time: a read's worth; a larger frame gets
/// room for itself when its header is seen.
const READ_BUFFER: usize = 8 * 1024;
/// Output waiting for the socket beyond which no more frames are read.
const MAX_BACKLOG: usize = 1024 * 1024;
/// A write buffer grown past this by a burst is let go once written.
const WRITE_BUFFER_KEPT: usize = 64 * 1024;

pub struct Connection<IO> {
    io: IO,
    session: Arc<Session>,
    rbuf: BytesMut,
    /// What is being written: the session's output, swapped out whole.
    wbuf: Vec<u8>,
    written: usize,
    /// A server has yet to see the client's preface.
    preface: bool,
    /// Requests the client opened, not yet taken by [`Connection::accept`].
    accepted: VecDeque<Accepted>,
    /// Reading waits for the output to be written.
    read_paused: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Connection<IO> {
    /// The server end of a connection whose client will send the preface.
    pub fn server(io: IO, config: Config) -> Self {
        Self::new(io, Session::new(Role::Server, config), true)
    }

    /// The client end (prior knowledge): the preface and SETTINGS go out on the
    /// first flush; requests go through the [`Client`].
    pub fn client(io: IO, config: Config) -> (Self, Client) {
        let session = Session::new(Role::Client, config);
        let client = Client::new(session.clone());
        (Self::new(io, session, false), client)
    }

    fn new(io: IO, session: Arc<Session>, preface: bool) -> Self {
        Self {
            io,
            session,
            rbuf: BytesMut::with_capacity(READ_BUFFER),
            wbuf: Vec::new(),
            written: 0,
            preface,
            accepted: VecDeque::new(),
            read_paused: false,
        }
    }

    pub(crate) fn session(&self) -> &Arc<Session> {
        &self.session
    }

    /// Whether the peer's SETTINGS were read: the handshake is done, and (client)
    /// the peer's limit on concurrent streams is known.
    pub fn settings_received(&self) -> bool {
        self.session.lock().got_settings
    }

    /// Begins a graceful close (server): a GOAWAY with the largest stream id and a
    /// PING; the final GOAWAY follows the PING's answer ([`Self::final_go_away`]),
    /// RFC 9113 §6.8. Streams the client opened meanwhile are served.
    pub fn go_away(&self) {
        self.session.lock().go_away();
    }

    /// The final GOAWAY of a graceful close (server), at once if the PING after the
    /// first went unanswered: it names the last stream that will be served.
    pub fn final_go_away(&self) {
        self.session.lock().final_go_away();
    }

    /// Reads and handles what the peer sent, until the socket has no more. Ready
    /// when the connection is over for reading (closed, or failed).
    ///
    /// Call [`poll_flush`](Self::poll_flush) after this (and after polling the
    /// streams): until then, what streams write is left for that flush to send.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        {
            let mut inner = self.session.lock();
            inner.polling = true;
            match &inner.conn_waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => inner.conn_waker = Some(cx.waker().clone()),
            }
            if inner.error.is_some() {
                return Poll::Ready(());
            }
        }
        loop {
            if !self.handle_frames() {
                return Poll::Ready(());
            }
            if self.read_paused {
                // `poll_flush` wakes the task once the output is written.
                return Poll::Pending;
            }
            if self.rbuf.capacity() - self.rbuf.len() < frame::HEADER_LEN {
                self.rbuf.reserve(READ_BUFFER);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    self.session.lock().lost(ConnectionError::Closed);
                    return Poll::Ready(());
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.session.lock().lost(ConnectionError::Io(e));
                    return Poll::Ready(());
                }
            }
        }
    }

    /// Handles every whole frame in the read buffer, under one lock. False once the
    /// connection failed.
    fn handle_frames(&mut self) -> bool {
        if self.rbuf.len() < frame::HEADER_LEN {
            return true;
        }
        let mut inner = self.session.lock();
        if self.preface {
            if self.rbuf.len() < frame::PREFACE.len() {
                return true;
            }
            if &self.rbuf[..frame::PREFACE.len()] != frame::PREFACE {
                inner.fail(Fatal(
                    Reason::PROTOCOL_ERROR,
                    "no HTTP/2 connection preface".into(),
                ));
                return false;
            }
            self.rbuf.advance(frame::PREFACE.len());
            self.preface = false;
        }
        while self.rbuf.len() >= frame::HEADER_LEN && inner.out.len() <= MAX_BACKLOG {
            let head = Head::parse(&self.rbuf[..frame::HEADER_LEN]);
            if head.len > frame::DEFAULT_MAX_FRAME_SIZE as usize {
                inner.fail(Fatal(
                    Reason::FRAME_SIZE_ERROR,
                    format!("a frame of {} bytes", head.len),
                ));
                return false;
            }
            let whole = frame::HEADER_LEN + head.len;
            if self.rbuf.len() < whole {
                self.rbuf.reserve(whole - self.rbuf.len());
                break;
            }
            let mut payload = self.rbuf.split_to(whole);
            payload.advance(frame::HEADER_LEN);
            if let Err(fatal) = inner.on_frame(head, payload.freeze()) {
                inner.fail(fatal);
                return false;
            }
        }
        // A request the client already reset is not started (rapid reset: a flood
        // of them must cost no backend anything), whichever read brought it.
        self.accepted.retain(|accepted| {
            let reset = inner.streams[accepted.key].reset.is_some();
            if reset {
                inner.discard(accepted.key);
            }
            !reset
        });
        while let Some(accepted) = inner.accepted.pop_front() {
            if inner.streams[accepted.key].reset.is_some() {
                inner.discard(accepted.key);
            } else {
                self.accepted.push_back(accepted);
            }
        }
        if inner.out.len() > MAX_BACKLOG {
            // The peer asks for answers (PINGs, SETTINGS, resets) faster than it
            // reads them: read on once they are written.
            self.read_paused = true;
        }
        inner.error.is_none()
    }

    /// Writes out everything the session has for the peer. Ready when all of it is
    /// written (or the connection failed, which the session then knows).
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            while self.written < self.wbuf.len() {
                match Pin::new(&mut self.io).poll_write(cx, &self.wbuf[self.written..]) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                        self.session.lock().lost(ConnectionError::Io(e));
                        return Poll::Ready(());
                    }
                    Poll::Ready(Ok(n)) => self.written += n,
                    Poll::Ready(Err(e)) => {
                        self.session.lock().lost(ConnectionError::Io(e));
                        return Poll::Ready(());
                    }
                }
            }
            self.written = 0;
            self.wbuf.clear();
            if self.wbuf.capacity() > WRITE_BUFFER_KEPT {
                self.wbuf = Vec::new();
            }
            let mut inner = self.session.lock();
            inner.schedule();
            if inner.out.is_empty() {
                inner.polling = false;
                drop(inner);
                if std::mem::take(&mut self.read_paused) {
                    cx.waker().wake_by_ref();
                }
                // TLS keeps records until flushed; a TCP socket has nothing to do.
                return match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(_) => Poll::Ready(()),
                };
            }
            std::mem::swap(&mut inner.out, &mut self.wbuf);
        }
    }

    /// A request the client opened (server), with where its response goes.
    pub fn accept(&mut self) -> Option<(Request<RecvStream>, SendResponse)> {
        let Accepted {
            key,
            head,
            end_stream,
        } = self.accepted.pop_front()?;
        let body = if end_stream {
            RecvStream::empty()
        } else {
            RecvStream::new(self.session.clone(), key)
        };
        let respond = SendResponse::new(self.session.clone(), key);
        Some((Request::from_parts(head, body), respond))
    }

    /// Whether the connection is done: failed or closed, or drained after GOAWAY
    /// (server) or after its client handle went (client).
    pub fn finished(&self) -> bool {
        self.accepted.is_empty() && self.session.lock().finished()
    }
}
