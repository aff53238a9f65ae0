//! The one body type the proxy sends in both directions, as an enum rather than a
//! boxed trait object so the hot path allocates nothing for it, and the slot a
//! request with such a body waits in until a transport sends it ([`RequestSlot`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tandem_h2::RecvStream;

use crate::http1::body::ResponseBody;
use crate::pool::IdlePool;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request on its way to a backend. The sending futures borrow it rather than
/// own it, so the request is kept once, in the caller's future, however deep the
/// send goes (each owning layer would hold its own copy: rust-lang/rust#62958).
/// A transport that hands the request on (hyper; HTTP/2 for a request with a body)
/// takes it from the slot once a backend may have seen it; the raw HTTP/1 client and
/// HTTP/2 write a bodiless request from the slot and leave it there.
/// [`UpstreamError::written`](crate::upstream::UpstreamError::written) says whether a
/// failed one went out.
pub type RequestSlot = Option<Request<ProxyBody>>;

/// Idle hyper HTTP/1 connections to one endpoint (see [`crate::upstream`]).
pub type HyperPool = IdlePool<SendRequest<ProxyBody>>;

/// A borrowed hyper HTTP/1 connection, returned to its pool when the response body
/// it carries ends ([`ProxyBody::Pooled`]); see [`Lease::release`].
pub struct Lease {
    pool: Arc<HyperPool>,
    sender: SendRequest<ProxyBody>,
}

impl Lease {
    pub fn new(pool: Arc<HyperPool>, sender: SendRequest<ProxyBody>) -> Self {
        Self { pool, sender }
    }

    /// Returns the connection to its pool (the response was read to the end).
    pub fn release(self) {
        if !self.sender.is_closed() {
            self.pool.put(self.sender);
        }
    }
}

pub enum ProxyBody {
    Empty,
    /// A body the proxy made itself (error pages, health checks).
    Full(Option<Bytes>),
    /// A backend's body (hyper's client), streamed through, never buffered.
    Incoming(Incoming),
    /// A client's request body (hyper's server), streamed through: its errors are
    /// the client's ([`ClientBodyError`]).
    Request(Incoming),
    /// An upstream HTTP/1 response body: its connection returns to the pool when the
    /// body has been read to the end (and is closed if the body is abandoned).
    Pooled {
        body: Incoming,
        lease: Option<Lease>,
    },
    /// An upstream HTTP/1 response body read over a raw connection
    /// ([`crate::http1::client`]); boxed, it keeps the enum small.
    Http1(Box<ResponseBody>),
    /// An HTTP/2 stream's body (from a client or a backend), streamed through:
    /// window is given back as each frame is taken, so what it holds is what the
    /// other side has not yet taken.
    Http2 {
        recv: RecvStream,
        /// A client's request: its errors are the client's ([`ClientBodyError`]).
        from_client: bool,
    },
}

/// A client's request body failed (malformed, cut short, reset by the client): the
/// request is the client's fault, whatever became of the attempt to send it.
#[derive(Debug, thiserror::Error)]
#[error("the request body from the client failed: {}", causes(&**.0))]
pub struct ClientBodyError(pub BoxError);

/// `error` and its causes, as one line.
pub(crate) fn causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut next = error.source();
    while let Some(cause) = next {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        next = cause.source();
    }
    line
}

impl ClientBodyError {
    /// Whether `error`, or an error it was caused by, is a [`ClientBodyError`].
    pub fn caused(error: &(dyn std::error::Error + 'static)) -> bool {
        Self::find(error).is_some()
    }

    /// The [`ClientBodyError`] among `error` and its causes.
    pub fn find<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e ClientBodyError> {
        let mut next = Some(error);
        while let Some(error) = next {
            if let Some(found) = error.downcast_ref::<ClientBodyError>() {
                return Some(found);
            }
            next = error.source();
        }
        None
    }
}

/// A request body as a client sent it, to forward.
pub trait RequestBody {
    fn into_request_body(self) -> ProxyBody;
}

impl RequestBody for Incoming {
    fn into_request_body(self) -> ProxyBody {
        ProxyBody::Request(self)
    }
}

impl RequestBody for RecvStream {
    fn into_request_body(self) -> ProxyBody {
        ProxyBody::Http2 {
            recv: self,
            from_client: true,
        }
    }
}

/// Already a proxy body (tests, and requests the proxy makes itself).
impl RequestBody for ProxyBody {
    fn into_request_body(self) -> ProxyBody {
        self
    }
}

impl ProxyBody {
    pub fn text(text: impl Into<Bytes>) -> Self {
        Self::Full(Some(text.into()))
    }
}

/// A backend's HTTP/2 response body.
impl From<RecvStream> for ProxyBody {
    fn from(recv: RecvStream) -> Self {
        Self::Http2 {
            recv,
            from_client: false,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ProxyBody::Incoming(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Request(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| ClientBodyError(e.into()).into()),
            ProxyBody::Pooled { body, lease } => {
                let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
                match &frame {
                    None => release(lease),
                    Some(Ok(_)) if body.is_end_stream() => release(lease),
                    Some(Ok(_)) => {}
                    // A broken body leaves the connection in an unknown state: drop it.
                    Some(Err(_)) => drop(lease.take()),
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            ProxyBody::Http1(body) => Pin::new(&mut **body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Http2 { recv, from_client } => {
                let frame = ready!(Pin::new(recv).poll_frame(cx));
                Poll::Ready(match frame {
                    Some(Err(e)) if *from_client => Some(Err(ClientBodyError(e.into()).into())),
                    frame => frame.map(|f| f.map_err(Into::into)),
                })
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Incoming(body) | ProxyBody::Request(body) => body.is_end_stream(),
            ProxyBody::Pooled { body, .. } => body.is_end_stream(),
            ProxyBody::Http1(body) => body.is_end_stream(),
            ProxyBody::Http2 { recv, .. } => recv.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Incoming(body) | ProxyBody::Request(body) => body.size_hint(),
            ProxyBody::Pooled { body, .. } => body.size_hint(),
            ProxyBody::Http1(body) => body.size_hint(),
            ProxyBody::Http2 { recv, .. } => recv.size_hint(),
        }
    }
}

fn release(lease: &mut Option<Lease>) {
    if let Some(lease) = lease.take() {
        lease.release();
    }
}
