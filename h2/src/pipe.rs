//! Streams a body into an HTTP/2 stream, one frame at a time.
//!
//! A frame is taken from the body only once the stream took the previous one whole
//! (written, or held by the connection until the peer's window opens): the body is
//! never buffered beyond the frame in hand, and a quiet body holds no window other
//! streams need.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::Body;

use super::error::Error;
use super::frame::Reason;
use super::streams::SendStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a stream is told when the body being sent on it failed, by default.
pub const BODY_FAILED: &str = "the body being sent failed";

/// Sends `body` on `send` to its end (data, then trailers or an end-of-stream
/// flag), or until either side fails. A failing body resets the stream with what
/// `on_error` makes of its error: the reason sent, and why (what the stream's other
/// handles are told); [`default_reset`] if nothing more is known.
///
/// The future holds `body` and `send` once, and nothing else (not an `async fn`,
/// which would hold its arguments and what it lends them).
pub fn send_body<B, F>(mut body: B, mut send: SendStream, on_error: F) -> impl Future<Output = ()>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: Fn(&BoxError) -> (Reason, &'static str),
{
    poll_fn(move |cx| {
        if let Err(error) = ready!(poll_pipe(&mut body, &mut send, &on_error, cx)) {
            tracing::debug!(%error, "HTTP/2 body ended early");
        }
        Poll::Ready(())
    })
}

/// How a failed body resets its stream unless the caller knows better: the other
/// side's own reset passes through ([`reset_reason`]), with [`BODY_FAILED`].
pub fn default_reset(error: &BoxError) -> (Reason, &'static str) {
    (reset_reason(&**error), BODY_FAILED)
}

/// The reason to reset with when the body being sent failed: if it failed because
/// its own HTTP/2 stream ended early (a body relayed from another connection), that
/// stream's reason passes through (a client's CANCEL reaches the backend as CANCEL);
/// otherwise INTERNAL_ERROR.
pub fn reset_reason(error: &(dyn std::error::Error + 'static)) -> Reason {
    error
        .downcast_ref::<Error>()
        .and_then(Error::reason)
        .unwrap_or(Reason::INTERNAL_ERROR)
}

fn poll_pipe<B, F>(
    body: &mut B,
    send: &mut SendStream,
    on_error: &F,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    F: Fn(&BoxError) -> (Reason, &'static str),
{
    loop {
        ready!(send.poll_ready(cx))?;
        let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) else {
            // Nothing to send: notice a reset meanwhile, so the body stops being read.
            return match send.poll_reset(cx) {
                Poll::Ready(error) => Poll::Ready(Err(error.into())),
                Poll::Pending => Poll::Pending,
            };
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    send.send_data(data, end)?;
                    if end {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            },
            Some(Err(error)) => {
                let error = error.into();
                let (reason, why) = on_error(&error);
                send.send_reset(reason, why);
                return Poll::Ready(Err(error));
            }
            None => {
                send.send_data(Bytes::new(), true)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}
