//! Streams a body into an HTTP/2 stream, one frame at a time.
//!
//! A frame is taken from the body only once the stream took the previous one whole
//! (written, or held by the connection until the peer's window opens): the body is
//! never buffered beyond the frame in hand, and a quiet body holds no window other
//! streams need.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::Body;

use super::error::{Error, REQUEST_BODY_FAILED};
use super::frame::Reason;
use super::streams::SendStream;
use crate::body::{BoxError, ClientBodyError, ProxyBody};

/// Sends `body` on `send` to its end (data, then trailers or an end-of-stream
/// flag), or until either side fails; a failing body resets the stream.
pub async fn send_body(mut body: ProxyBody, mut send: SendStream) {
    if let Err(error) = poll_fn(|cx| poll_pipe(&mut body, &mut send, cx)).await {
        tracing::debug!(%error, "HTTP/2 body ended early");
    }
}

fn poll_pipe(
    body: &mut ProxyBody,
    send: &mut SendStream,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>> {
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
                let why = if ClientBodyError::caused(&*error) {
                    REQUEST_BODY_FAILED
                } else {
                    "the body being sent failed"
                };
                send.send_reset(reset_reason(&error), why);
                return Poll::Ready(Err(error));
            }
            None => {
                send.send_data(bytes::Bytes::new(), true)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// The reason to reset with when the body being sent failed: the other side's own
/// reset passes through (a client's CANCEL reaches the backend as CANCEL).
fn reset_reason(error: &BoxError) -> Reason {
    let error = match error.downcast_ref::<ClientBodyError>() {
        Some(ClientBodyError(inner)) => inner,
        None => error,
    };
    error
        .downcast_ref::<Error>()
        .and_then(Error::reason)
        .unwrap_or(Reason::INTERNAL_ERROR)
}
