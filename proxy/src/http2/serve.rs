//! One HTTP/2 client connection: its streams, each balanced and forwarded on its own,
//! all driven from the connection's task.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use h2::server::{self, SendResponse};
use h2::{Reason, RecvStream};
use http::{HeaderValue, Request, Response, header};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use super::keep_alive::KeepAlive;
use super::{MAX_HEADER_LIST, pipe};
use crate::body::ProxyBody;
use crate::connections::ConnControl;
use crate::forward::Forwarder;

const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// hyper's server defaults, which clients and benchmarks are used to.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 1024 * 1024;
const MAX_SEND_BUFFER: usize = 400 * 1024;
/// A client that opened the connection must finish the preface and SETTINGS by then.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves HTTP/2 on `io` until the client closes it, it fails, or `control` asks
/// for a close (then: GOAWAY, and the open streams finish).
pub async fn serve<IO>(forwarder: &Arc<Forwarder>, control: &ConnControl, io: IO)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let handshake = server::Builder::new()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(error)) => {
            tracing::debug!(%error, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("HTTP/2 handshake timed out");
            return;
        }
    };
    let mut keep_alive = conn.ping_pong().map(KeepAlive::new);
    let mut streams = FuturesUnordered::new();
    let mut closing = false;
    poll_fn(|cx| {
        if !closing && control.closing(cx) {
            closing = true;
            conn.graceful_shutdown();
        }
        // Drives the connection's I/O, and starts a stream for every new request.
        let over = loop {
            match conn.poll_accept(cx) {
                Poll::Ready(Some(Ok((req, respond)))) => {
                    streams.push(stream(forwarder.clone(), req, respond));
                }
                Poll::Ready(Some(Err(error))) => {
                    tracing::debug!(%error, "HTTP/2 connection error");
                    break true;
                }
                // Closed by the client, or drained after GOAWAY.
                Poll::Ready(None) => break true,
                Poll::Pending => break false,
            }
        };
        if over {
            return Poll::Ready(());
        }
        // Every stream woken makes progress; h2 writes what they queued on the
        // connection's next turn, so one wake-up's responses leave in one write.
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
        if let Some(keep_alive) = &mut keep_alive
            && keep_alive.poll_dead(cx, || conn.has_streams()).is_ready()
        {
            conn.abrupt_shutdown(Reason::NO_ERROR);
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
    respond: SendResponse<Bytes>,
) -> impl Future<Output = ()> {
    UntilReset {
        handling: forwarder.handle(req),
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
        respond: Option<SendResponse<Bytes>>,
    }
}

impl<F: Future<Output = Response<ProxyBody>>> Future for UntilReset<F> {
    type Output = Option<(Response<ProxyBody>, SendResponse<Bytes>)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(response) = this.handling.poll(cx) {
            let respond = this.respond.take().expect("polled after its response");
            return Poll::Ready(Some((response, respond)));
        }
        let respond = this.respond.as_mut().expect("polled after its response");
        match respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Sends the response's head now; the future returned sends its body.
fn send_response(
    response: Response<ProxyBody>,
    mut respond: SendResponse<Bytes>,
) -> impl Future<Output = ()> {
    let (mut head, body) = response.into_parts();
    let end = body.is_end_stream();
    if let ProxyBody::Full(Some(data)) = &body
        && !head.headers.contains_key(header::CONTENT_LENGTH)
    {
        // The proxy's own answers: tell the client their length, as HTTP/1 does.
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(data.len()));
    }
    match respond.send_response(Response::from_parts(head, ()), end) {
        Ok(send) if !end => Either::Left(pipe::send_body(body, send)),
        Ok(_) => Either::Right(std::future::ready(())),
        Err(error) => {
            tracing::debug!(%error, "HTTP/2 response not sent");
            respond.send_reset(Reason::INTERNAL_ERROR);
            Either::Right(std::future::ready(()))
        }
    }
}
