//! The one body type the proxy sends in both directions, as an enum rather than a
//! boxed trait object so the hot path allocates nothing for it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tandem_h2::RecvStream;

use crate::http1::client::ResponseBody;
use crate::upstream::Lease;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
fn causes(error: &(dyn std::error::Error + 'static)) -> String {
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
            ProxyBody::Http1(body) => Pin::new(&mut **body).poll_frame(cx),
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
