//! Handles on one stream of a connection, held by the tasks that read a body, send
//! one, or wait for a response. Each holds a reference the stream is kept for; the
//! last one dropped gives an unfinished stream up (RST_STREAM).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, Uri, response};
use http_body::{Body, Frame, SizeHint};

use super::error::Error;
use super::frame::Reason;
use super::session::{Inner, Session};

fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(waker) if waker.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// A reference on a stream, given back when dropped.
struct StreamRef {
    session: Arc<Session>,
    key: usize,
    /// Held by the stream's reader (a body, a response to come).
    reader: bool,
}

impl StreamRef {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.session.lock()
    }
}

impl Drop for StreamRef {
    fn drop(&mut self) {
        let mut inner = self.session.lock();
        if self.reader {
            inner.drop_reader(self.key);
        } else {
            inner.drop_ref(self.key);
        }
    }
}

/// The body of a request or response received on a stream. Window is given back to
/// the peer as each chunk is taken: what this holds is what the application has
/// not yet taken, never more.
pub struct RecvStream {
    /// None for a message that ended with its headers.
    stream: Option<StreamRef>,
    data_done: bool,
}

impl RecvStream {
    pub(super) fn new(session: Arc<Session>, key: usize) -> Self {
        Self {
            stream: Some(StreamRef {
                session,
                key,
                reader: true,
            }),
            data_done: false,
        }
    }

    pub(super) fn empty() -> Self {
        Self {
            stream: None,
            data_done: true,
        }
    }

    /// The next chunk of data; `None` at the end of the data (trailers may follow).
    pub fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Error>>> {
        let Some(stream) = &self.stream else {
            return Poll::Ready(None);
        };
        if self.data_done {
            return Poll::Ready(None);
        }
        let key = stream.key;
        let mut inner = stream.lock();
        let s = &mut inner.streams[key];
        if let Some(data) = s.data.pop_front() {
            inner.release(key, data.len() as u32);
            return Poll::Ready(Some(Ok(data)));
        }
        if s.recv_closed {
            self.data_done = true;
            return Poll::Ready(None);
        }
        if let Some(error) = inner.stream_error(key) {
            return Poll::Ready(Some(Err(error)));
        }
        register(&mut inner.streams[key].recv_waker, cx);
        Poll::Pending
    }

    /// The trailers, once the data has ended (`None` if there are none).
    pub fn poll_trailers(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<HeaderMap>, Error>> {
        let Some(stream) = &self.stream else {
            return Poll::Ready(Ok(None));
        };
        let key = stream.key;
        let mut inner = stream.lock();
        let s = &mut inner.streams[key];
        if let Some(trailers) = s.trailers.take() {
            return Poll::Ready(Ok(Some(trailers)));
        }
        if s.recv_closed {
            return Poll::Ready(Ok(None));
        }
        if let Some(error) = inner.stream_error(key) {
            return Poll::Ready(Err(error));
        }
        register(&mut inner.streams[key].recv_waker, cx);
        Poll::Pending
    }

    /// Whether nothing more will come: no data, no trailers.
    pub fn is_end_stream(&self) -> bool {
        let Some(stream) = &self.stream else {
            return true;
        };
        let inner = stream.lock();
        let s = &inner.streams[stream.key];
        s.recv_closed && s.data.is_empty() && s.trailers.is_none()
    }
}

/// Data, then trailers. A reset with NO_ERROR ends the body early without failing
/// it (RFC 9113 §8.1: the server answered without needing the rest of the request).
impl Body for RecvStream {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match ready!(this.poll_data(cx)) {
            Some(Ok(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Err(e)) => return Poll::Ready(early_end(e)),
            None => {}
        }
        match ready!(this.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(early_end(e)),
        }
    }

    fn is_end_stream(&self) -> bool {
        RecvStream::is_end_stream(self)
    }

    fn size_hint(&self) -> SizeHint {
        if RecvStream::is_end_stream(self) {
            SizeHint::with_exact(0)
        } else {
            // Its content-length, if any, travels as a header.
            SizeHint::default()
        }
    }
}

fn early_end(e: Error) -> Option<Result<Frame<Bytes>, Error>> {
    match e {
        Error::Reset(Reason::NO_ERROR) => None,
        _ => Some(Err(e)),
    }
}

/// Sends data and trailers on a stream, one chunk at a time.
pub struct SendStream {
    stream: StreamRef,
}

impl SendStream {
    /// Ready once the last chunk was taken whole (written, or as far as the peer's
    /// windows allow: the rest waits in the connection), so the next may come.
    pub fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let key = self.stream.key;
        let mut inner = self.stream.lock();
        if let Some(error) = inner.stream_error(key) {
            return Poll::Ready(Err(error));
        }
        if inner.ready_to_send(key) {
            return Poll::Ready(Ok(()));
        }
        register(&mut inner.streams[key].send_waker, cx);
        Poll::Pending
    }

    pub fn send_data(&mut self, data: Bytes, end: bool) -> Result<(), Error> {
        self.stream.lock().send_data(self.stream.key, data, end)
    }

    pub fn send_trailers(&mut self, trailers: HeaderMap) -> Result<(), Error> {
        self.stream.lock().send_trailers(self.stream.key, trailers)
    }

    /// Resets the stream; `why` is what its other handles are told.
    pub fn send_reset(&mut self, reason: Reason, why: &'static str) {
        self.stream.lock().reset(self.stream.key, reason, why);
    }

    /// Ready when the stream was reset (or its connection ended).
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
        poll_reset(&self.stream, cx)
    }
}

fn poll_reset(stream: &StreamRef, cx: &mut Context<'_>) -> Poll<Error> {
    let mut inner = stream.lock();
    if let Some(error) = inner.stream_error(stream.key) {
        return Poll::Ready(error);
    }
    register(&mut inner.streams[stream.key].send_waker, cx);
    Poll::Pending
}

/// Where a server sends the response to a request it accepted.
pub struct SendResponse {
    stream: StreamRef,
}

impl SendResponse {
    pub(super) fn new(session: Arc<Session>, key: usize) -> Self {
        Self {
            stream: StreamRef {
                session,
                key,
                reader: false,
            },
        }
    }

    /// Sends the head; the body follows on the [`SendStream`] unless `end`.
    pub fn send_response(
        self,
        head: &response::Parts,
        end: bool,
    ) -> Result<Option<SendStream>, Error> {
        self.stream
            .lock()
            .send_response(self.stream.key, head, end)?;
        Ok((!end).then_some(SendStream {
            stream: self.stream,
        }))
    }

    pub fn send_reset(self, reason: Reason) {
        self.stream
            .lock()
            .reset(self.stream.key, reason, "reset by the proxy");
    }

    /// Ready when the client reset the stream (or the connection ended).
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
        poll_reset(&self.stream, cx)
    }
}

/// The client end of a connection (to a backend, for a proxy): opens streams for
/// requests.
pub struct Client {
    session: Arc<Session>,
}

impl Client {
    pub(super) fn new(session: Arc<Session>) -> Self {
        Self { session }
    }

    /// Whether the connection takes no more requests (it failed, or the backend
    /// is going away).
    pub fn is_closed(&self) -> bool {
        let inner = self.session.lock();
        inner.error.is_some() || inner.going_away()
    }

    /// Opens a stream for a request: sent now, or once the backend's limit on
    /// concurrent streams allows. The body, unless `end`, goes on the [`SendStream`].
    pub fn send_request(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        end: bool,
    ) -> Result<(ResponseFuture, Option<SendStream>), Error> {
        let key = self
            .session
            .lock()
            .send_request(method, uri, headers, end)?;
        let response = ResponseFuture {
            stream: Some(StreamRef {
                session: self.session.clone(),
                key,
                reader: true,
            }),
        };
        let body = (!end).then(|| SendStream {
            stream: StreamRef {
                session: self.session.clone(),
                key,
                reader: false,
            },
        });
        Ok((response, body))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let mut inner = self.session.lock();
        inner.handle_dropped = true;
        inner.notify();
    }
}

/// A response on its way.
pub struct ResponseFuture {
    stream: Option<StreamRef>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<RecvStream>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let stream = self.stream.as_ref().expect("polled after completion");
        let key = stream.key;
        let mut inner = stream.lock();
        let s = &mut inner.streams[key];
        if let Some(head) = s.head.take() {
            let ended = s.recv_closed && s.data.is_empty() && s.trailers.is_none();
            drop(inner);
            let stream = self.stream.take().expect("checked above");
            let body = if ended {
                // Nothing more to read: let the stream go now.
                drop(stream);
                RecvStream::empty()
            } else {
                RecvStream {
                    stream: Some(stream),
                    data_done: false,
                }
            };
            return Poll::Ready(Ok(Response::from_parts(head, body)));
        }
        if let Some(error) = inner.stream_error(key) {
            return Poll::Ready(Err(error));
        }
        register(&mut inner.streams[key].recv_waker, cx);
        Poll::Pending
    }
}
