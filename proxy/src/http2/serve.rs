//! One HTTP/2 client connection: its streams, each balanced and forwarded on its own,
//! all driven from the connection's task.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use http::{HeaderValue, Request, Response, header};
use http_body::Body;
use tandem_h2::{Config, Connection, KeepAlive, RecvStream, SendResponse};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::body::send_body;
use super::{MAX_HEADER_LIST, MAX_SEND_BUFFER};
use crate::body::ProxyBody;
use crate::connections::ConnControl;
use crate::forward::Forwarder;

fn config() -> Config {
    Config {
        max_concurrent_streams: 1024,
        // hyper's server defaults, which clients and benchmarks are used to.
        stream_window: 1024 * 1024,
        connection_window: 1024 * 1024,
        max_header_list: MAX_HEADER_LIST,
        max_send_buffer: MAX_SEND_BUFFER,
        // The proxy's coarse clock: one atomic load per reset a client makes.
        clock: crate::clock::now,
    }
}

/// A client that opened the connection must finish the preface and SETTINGS by then.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful close waits for the answer to the PING after its first
/// GOAWAY before it sends the final one (the streams opened meanwhile are served).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves HTTP/2 on `io` until the client closes it, it fails, or `control` asks
/// for a close (then: GOAWAY in two phases, as [`Connection::go_away`] says, and
/// the open streams finish).
pub async fn serve<IO>(forwarder: &Arc<Forwarder>, control: &Arc<ConnControl>, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = Connection::server(io, config());
    let handshake = poll_fn(|cx| {
        let over = conn.poll_read(cx).is_ready();
        let _ = conn.poll_flush(cx);
        if over {
            Poll::Ready(false)
        } else if conn.settings_received() {
            Poll::Ready(true)
        } else {
            Poll::Pending
        }
    });
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::debug!("HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("HTTP/2 handshake timed out");
            return;
        }
    }
    let mut keep_alive = KeepAlive::new();
    let mut streams = FuturesUnordered::new();
    let mut closing = false;
    // Until the final GOAWAY, if the PING after the first goes unanswered.
    let mut draining: Option<Pin<Box<Sleep>>> = None;
    poll_fn(|cx| {
        if !closing && control.closing(cx) {
            closing = true;
            conn.go_away();
            draining = Some(Box::pin(tokio::time::sleep(DRAIN_TIMEOUT)));
        }
        // Reads what came, and starts a stream for every new request.
        let over = conn.poll_read(cx).is_ready();
        if let Some(timer) = &mut draining
            && timer.as_mut().poll(cx).is_ready()
        {
            draining = None;
            conn.final_go_away();
        }
        while let Some((req, respond)) = conn.accept() {
            let conn = Some(control.clone());
            streams.push(stream(forwarder.clone(), req, respond, conn));
        }
        // Every stream woken makes progress; what they write leaves in the flush
        // below, so one wake-up's responses leave in one write.
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
        let flushed = conn.poll_flush(cx).is_ready();
        if over || (flushed && streams.is_empty() && conn.finished()) {
            return Poll::Ready(());
        }
        if keep_alive
            .poll_dead(cx, &conn, || !streams.is_empty())
            .is_ready()
        {
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
}

/// One request: forwarded, and its response sent back, unless the client resets
/// the stream first (which drops, and so cancels, the request upstream).
///
/// Two phases chained rather than one `async` block: a block keeps the request it
/// captured for its whole life, beside the forwarding future that owns it too, and
/// keeps the forwarding future's room while the body streams. Chained, the one
/// phase's room is the other's, and this future (moved into place for every
/// stream) is the size of the larger phase alone.
fn stream(
    forwarder: Arc<Forwarder>,
    req: Request<RecvStream>,
    respond: SendResponse,
    conn: Option<Arc<ConnControl>>,
) -> impl Future<Output = ()> {
    UntilReset {
        handling: forwarder.handle(req, conn),
        respond: Some(respond),
    }
    .then(|answered| match answered {
        Some((response, respond)) => Either::Left(send_response(response, respond)),
        None => {
            tracing::trace!("the client reset the stream before its response");
            Either::Right(std::future::ready(()))
        }
    })
}

pin_project_lite::pin_project! {
    /// A request's handling, given up when the client resets the stream.
    struct UntilReset<F> {
        #[pin]
        handling: F,
        // Handed on with the response; `None` only once it was.
        respond: Option<SendResponse>,
    }
}

impl<F: Future<Output = Response<ProxyBody>>> Future for UntilReset<F> {
    type Output = Option<(Response<ProxyBody>, SendResponse)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.handling.poll(cx) {
            let respond = this.respond.take().expect("polled after its response");
            return Poll::Ready(Some((response, respond)));
        }
        let respond = this.respond.as_mut().expect("polled after its response");
        respond.poll_reset(cx).map(|_| None)
    }
}

/// Sends the response's head now; the future returned sends its body.
fn send_response(response: Response<ProxyBody>, respond: SendResponse) -> impl Future<Output = ()> {
    let (mut head, body) = response.into_parts();
    let end = body.is_end_stream();
    if let ProxyBody::Full(Some(data)) = &body
        && !head.headers.contains_key(header::CONTENT_LENGTH)
    {
        // The proxy's own answers: tell the client their length, as HTTP/1 does.
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
    }
    match respond.send_response(&head, end) {
        Ok(Some(send)) => Either::Left(send_body(body, send)),
        Ok(None) => Either::Right(std::future::ready(())),
        Err(error) => {
            tracing::debug!(%error, "HTTP/2 response not sent");
            Either::Right(std::future::ready(()))
        }
    }
}
