//! The one body type the proxy sends in both directions, as an enum rather than a
//! boxed trait object so the hot path allocates nothing for it.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::Lease;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub enum ProxyBody {
    Empty,
    /// A body the proxy made itself (error pages, health checks).
    Full(Option<Bytes>),
    /// A body streamed through from the other side, never buffered.
    Incoming(Incoming),
    /// An upstream HTTP/1 response body: its connection returns to the pool when the
    /// body has been read to the end (and is closed if the body is abandoned).
    Pooled {
        body: Incoming,
        lease: Option<Lease>,
    },
}

impl ProxyBody {
    pub fn text(text: impl Into<Bytes>) -> Self {
        Self::Full(Some(text.into()))
    }
}

impl From<Incoming> for ProxyBody {
    fn from(body: Incoming) -> Self {
        Self::Incoming(body)
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(data) => data.is_none(),
            ProxyBody::Incoming(body) => body.is_end_stream(),
            ProxyBody::Pooled { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ProxyBody::Incoming(body) => body.size_hint(),
            ProxyBody::Pooled { body, .. } => body.size_hint(),
        }
    }
}

fn release(lease: &mut Option<Lease>) {
    if let Some(lease) = lease.take() {
        lease.release();
    }
}
