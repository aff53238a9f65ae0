//! Streams a body into an HTTP/2 send stream under flow control, one frame at a time.
//!
//! A frame is taken from the body only once the previous one was handed to h2, and
//! h2 takes one only once the peer's window has room (hyper's rule too, see
//! hyperium/hyper#4003: capacity is claimed only with data in hand, so a quiet body
//! never pins connection window other streams need). The body is never buffered
//! beyond the frame in hand. The body's last frame is the exception to the wait: it
//! is handed over at once and h2 sends it when the window has room.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::{Reason, SendStream};
use http_body::Body;

use crate::body::{BoxError, ProxyBody};

/// Sends `body` on `send` to its end (data, then trailers or an end-of-stream
/// flag), or until either side fails; a failing body resets the stream.
pub async fn send_body(mut body: ProxyBody, mut send: SendStream<Bytes>) {
    let mut held = None;
    if let Err(error) = poll_fn(|cx| poll_pipe(&mut body, &mut send, &mut held, cx)).await {
        tracing::debug!(%error, "HTTP/2 body ended early");
    }
}

/// A data frame waiting for send capacity, and whether it ends the stream.
type Held = Option<(Bytes, bool)>;

fn poll_pipe(
    body: &mut ProxyBody,
    send: &mut SendStream<Bytes>,
    held: &mut Held,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>> {
    loop {
        if held.is_some() {
            while send.capacity() == 0 {
                let Poll::Ready(capacity) = send.poll_capacity(cx) else {
                    return pending_unless_reset(send, cx);
                };
                match capacity {
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => break,
                    Some(Err(e)) => return Poll::Ready(Err(e.into())),
                    None => return Poll::Ready(Err("the stream closed while sending".into())),
                }
            }
            let (data, end) = held.take().expect("checked above");
            send.send_data(data, end)?;
            if end {
                return Poll::Ready(Ok(()));
            }
            continue;
        }
        let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) else {
            return pending_unless_reset(send, cx);
        };
        match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let end = body.is_end_stream();
                    if data.is_empty() || end {
                        // An empty frame needs no capacity (and may be the end-of-stream
                        // marker). The last frame goes to h2 at once, which sends it as
                        // the window opens: nothing follows it, so h2 holding it costs no
                        // more than holding it here, and a small response (most of them)
                        // skips the capacity round trip.
                        send.send_data(data, end)?;
                        if end {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    // h2 raises the claim to the frame's length when it is sent.
                    send.reserve_capacity(1);
                    *held = Some((data, end));
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        send.reserve_capacity(0);
                        send.send_trailers(trailers)?;
                        return Poll::Ready(Ok(()));
                    }
                }
            },
            Some(Err(error)) => {
                send.send_reset(reset_reason(&error));
                return Poll::Ready(Err(error));
            }
            None => {
                send.send_data(Bytes::new(), true)?;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Pending, unless the peer reset the stream: then it no longer wants the body, and
/// reading it stops. Asked only when there is nothing to send: sending on a reset
/// stream fails by itself, so the common case (the body's frame already in hand) takes
/// one lock of h2's less.
fn pending_unless_reset(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>> {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => {
            Poll::Ready(Err(format!("the peer reset the stream ({reason})").into()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
        Poll::Pending => Poll::Pending,
    }
}

/// The reason to reset with when the body being sent failed: the other side's own
/// reset passes through (a client's CANCEL reaches the backend as CANCEL).
fn reset_reason(error: &BoxError) -> Reason {
    error
        .downcast_ref::<h2::Error>()
        .and_then(h2::Error::reason)
        .unwrap_or(Reason::INTERNAL_ERROR)
}
