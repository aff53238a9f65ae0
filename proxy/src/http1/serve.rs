//! One client connection on the HTTP/1 path: read a request, forward it, relay the
//! response, repeat; hand the connection to hyper at the first request this path
//! does not take.
//!
//! The policy is the hyper path's (`forward.rs`): the same routing, circuit breaking,
//! balancer, retries, timeouts and counters, through the same functions.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::exchange::{BodyLeft, MAX_HEAD, MIN_READ, RELAY_CHUNK, read_head, send};
use super::head::{self, Framing, Handoff, Refusal, RequestHead, ResponseHead};
use super::pool::{RawConn, RawPool};
use super::to_http2::{self, BodyOut};
use crate::body::ProxyBody;
use crate::connections::{ConnControl, Phase, Stop};
use crate::destination::{BackendSet, Destination};
use crate::forward::error::{ProxyError, nothing_to_pick, timed_out, upstream_failed};
use crate::forward::resilience::{Attempts, record_failure, record_response, retrying};
use crate::forward::{Forwarder, Router};
use crate::metrics::ProxyErrorKind;
use crate::trace::{InboundInfo, RequestInfo, RequestTrace, Tracer};

/// Request bodies up to this size are read whole before the request goes out (so a
/// failed attempt can be sent again); larger ones go to hyper, which streams them.
pub const MAX_BODY: usize = 16 * 1024;
/// Room a client connection's buffer starts with.
const CLIENT_BUFFER: usize = 8 * 1024;

pub enum Outcome<IO> {
    /// The connection is finished (either side closed it, or the proxy did).
    Closed,
    /// Continue in hyper: `buffered` starts with the request this path did not take.
    Handoff {
        io: IO,
        buffered: Bytes,
        reason: Handoff,
    },
}

/// What the connection does after an exchange.
enum Next {
    KeepAlive,
    Close,
    /// The destination's backends are spoken to in HTTP/2: the request goes through
    /// [`ClientConn::over_http2`] (awaited apart, so the common path's state does not
    /// hold that one's).
    Http2(Arc<Destination>, Instant),
}

/// Serves HTTP/1.1 requests from `io` (with `buf` holding bytes already read) until
/// the connection ends or a request needs hyper.
pub async fn serve<IO>(
    forwarder: &Arc<Forwarder>,
    control: &Arc<ConnControl>,
    mut io: IO,
    mut buf: BytesMut,
) -> Outcome<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = ClientConn {
        forwarder,
        control,
        request_out: Vec::new(),
        response_out: Vec::new(),
        trace: None,
        routed: None,
    };
    loop {
        control.set_phase(if buf.is_empty() {
            Phase::Idle
        } else {
            Phase::Head
        });
        let head = loop {
            if !buf.is_empty() {
                match head::parse_request(&buf, MAX_BODY) {
                    Ok(Some(head)) => break head,
                    Ok(None) if buf.len() < MAX_HEAD => {}
                    Ok(None) => return handoff(io, buf, Handoff("large head")),
                    Err(Refusal::Handoff(reason)) => return handoff(io, buf, reason),
                    Err(Refusal::Invalid(why)) => {
                        let error = ProxyError::new(
                            ProxyErrorKind::BadRequest,
                            StatusCode::BAD_REQUEST,
                            why.to_string(),
                        );
                        refuse(&mut io, &error).await;
                        return Outcome::Closed;
                    }
                }
            }
            match read_more(&mut io, &mut buf, control).await {
                Read::More => {}
                Read::Closed => return Outcome::Closed,
                Read::Stopped(_) => {
                    let limit = forwarder.header_read_timeout;
                    let error = ProxyError::new(
                        ProxyErrorKind::HeaderTimeout,
                        StatusCode::REQUEST_TIMEOUT,
                        format!("the request head did not arrive within {limit:?}"),
                    );
                    refuse(&mut io, &error).await;
                    return Outcome::Closed;
                }
            }
        };
        control.set_phase(Phase::Busy);
        let total = head.len + head.content_length;
        while buf.len() < total {
            if !matches!(read_more(&mut io, &mut buf, control).await, Read::More) {
                return Outcome::Closed;
            }
        }
        let mut next = conn.exchange(&mut io, &buf[..total], &head).await;
        if let Next::Http2(destination, start) = next {
            next = conn
                .over_http2(&mut io, &buf[..total], &head, destination, start)
                .await;
        }
        match next {
            Next::KeepAlive if !head.close && !control.is_draining() => buf.advance(total),
            _ => {
                let _ = io.shutdown().await;
                return Outcome::Closed;
            }
        }
    }
}

fn handoff<IO>(io: IO, buf: BytesMut, reason: Handoff) -> Outcome<IO> {
    Outcome::Handoff {
        io,
        buffered: buf.freeze(),
        reason,
    }
}

/// How long a refused client gets to read the answer before the connection closes.
const LINGER: Duration = Duration::from_secs(1);

/// Answers a request the proxy will not forward and closes the connection: the
/// answer, then a half-close, then whatever the client still sends is read (for
/// [`LINGER`] at most) so the answer is not lost to a reset.
async fn refuse<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO, error: &ProxyError) {
    if write_all(io, &error.to_http1(false, true)).await.is_err() {
        return;
    }
    let _ = io.shutdown().await;
    // On the heap: an array here would be part of every connection's state.
    let mut scratch = vec![0u8; 1024];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(1..) = io.read(&mut scratch).await {}
    })
    .await;
}

/// What waiting for more of the client's bytes came to.
pub enum Read {
    More,
    /// The client is gone, or the connection was marked for closing while no
    /// request was under way.
    Closed,
    /// The connection's limits stopped it (a late head, a quiet request).
    Stopped(Stop),
}

/// Reads more of the client's bytes into `buf`.
pub async fn read_more<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    control: &ConnControl,
) -> Read {
    if buf.capacity() - buf.len() < MIN_READ {
        buf.reserve(CLIENT_BUFFER);
    }
    // A close asked for between requests waits for a request under way: once its
    // first byte is in, it is answered (with `Connection: close`).
    let between_requests = buf.is_empty();
    let read = io.read_buf(buf);
    tokio::pin!(read);
    std::future::poll_fn(|cx| {
        match control.signals(cx) {
            Err(stop) => return Poll::Ready(Read::Stopped(stop)),
            Ok(true) if between_requests => return Poll::Ready(Read::Closed),
            Ok(_) => {}
        }
        read.as_mut().poll(cx).map(|read| match read {
            Ok(1..) => Read::More,
            _ => Read::Closed,
        })
    })
    .await
}

/// Runs `work` unless the connection's limits stop it first. Only a look at a flag
/// per poll, no waker registration: the sweeper wakes the connection's task through
/// the waker [`read_more`] registered, and everything here runs in that one task.
fn unless_stopped<F: Future>(control: &ConnControl, work: F) -> UnlessStopped<'_, F> {
    UnlessStopped { control, work }
}

pin_project_lite::pin_project! {
    struct UnlessStopped<'c, F> {
        control: &'c ConnControl,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for UnlessStopped<'_, F> {
    type Output = Result<F::Output, Stop>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(stop) = this.control.stop_reason() {
            return Poll::Ready(Err(stop));
        }
        this.work.poll(cx).map(Ok)
    }
}

struct ClientConn<'a> {
    forwarder: &'a Arc<Forwarder>,
    control: &'a Arc<ConnControl>,
    /// Scratch space for rewritten heads, kept for the connection's life.
    request_out: Vec<u8>,
    response_out: Vec<u8>,
    /// The spans of the request under way, when it is traced.
    trace: Option<Box<RequestTrace>>,
    /// The last request's Host and the destination it routed to: a connection's
    /// requests mostly name one service, and comparing bytes costs less than
    /// normalising and looking the name up again. Looked up again once the
    /// destination is evicted (unused for a long while elsewhere).
    routed: Option<(Vec<u8>, Arc<Destination>)>,
}

impl ClientConn<'_> {
    /// The destination of a request naming `host` (see [`Forwarder::route`]).
    fn route(&mut self, host: Option<&[u8]>) -> Result<Arc<Destination>, ProxyError> {
        if let Router::Static(destination) = &*self.forwarder.router {
            return Ok(destination.clone());
        }
        if let (Some(host), Some((last, destination))) = (host, &self.routed)
            && host == &last[..]
            && !destination.is_evicted()
        {
            return Ok(destination.clone());
        }
        let destination = self.forwarder.route(host)?;
        if let Some(host) = host {
            let mut last = self.routed.take().map(|(last, _)| last).unwrap_or_default();
            last.clear();
            last.extend_from_slice(host);
            self.routed = Some((last, destination.clone()));
        }
        Ok(destination)
    }

    /// Forwards one request (`request`: its head and whole body) and relays the answer.
    async fn exchange<IO>(&mut self, client: &mut IO, request: &[u8], head: &RequestHead) -> Next
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = Instant::now();
        let forwarder = self.forwarder;
        let destination = match self.route(head.host(request)) {
            Ok(destination) => destination,
            Err(error) => return self.answer(client, error, head).await,
        };
        destination.touch();
        let (destination, set) = match forwarder.backends(&destination).await {
            Ok(found) => found,
            Err(error) => return self.answer(client, error, head).await,
        };
        if !set.all_http1 {
            return Next::Http2(destination, start);
        }
        if let Some(tracer) = forwarder.tracer.as_deref()
            && (head.trace_context || tracer.starts_traces())
        {
            self.trace = trace(tracer, forwarder, request, head, &destination);
        }
        let next = self
            .forward(client, (request, head), destination, set, start)
            .await;
        // Whatever became of the request, its spans end with it.
        self.trace = None;
        next
    }

    /// Sends the request to a backend of `destination`, again when an attempt fails
    /// and another is allowed, and relays the answer (or answers itself).
    async fn forward<IO>(
        &mut self,
        client: &mut IO,
        (request, head): (&[u8], &RequestHead),
        destination: Arc<Destination>,
        mut set: Arc<BackendSet>,
        start: Instant,
    ) -> Next
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let forwarder = self.forwarder;
        let _admitted = match forwarder.resilience.admit(&destination) {
            Ok(admitted) => admitted,
            Err(error) => return self.answer(client, error, head).await,
        };
        // Taken out of `self` for the loop, so answering (which borrows `self`) can
        // happen while `outgoing` borrows it.
        let mut request_out = std::mem::take(&mut self.request_out);
        let timeout = forwarder.resilience.request_timeout(&set);
        let mut attempts = Attempts::default();
        let next = loop {
            let backend = match set.pick() {
                Ok(backend) => backend,
                Err(e) => {
                    break self
                        .answer(client, nothing_to_pick(&destination, e), head)
                        .await;
                }
            };
            let traceparent = self
                .trace
                .as_mut()
                .map(|trace| trace.attempt(attempts.count() as u32 + 1, backend, &set));
            let outgoing: &[u8] = if head.rewrite || traceparent.is_some() {
                request_out.clear();
                head::rewrite_request(
                    request,
                    &mut request_out,
                    traceparent.as_ref().map(|t| &t[..]),
                );
                request_out.extend_from_slice(&request[head.len..]);
                &request_out
            } else {
                request
            };
            let pool = backend.state.upstream.raw();
            let sending = send(pool, outgoing, head.is_head, head.idempotent);
            let sent = match timeout {
                None => unless_stopped(self.control, sending).await,
                Some(limit) => {
                    match unless_stopped(self.control, tokio::time::timeout(limit, sending)).await {
                        Ok(Ok(sent)) => Ok(sent),
                        Ok(Err(_)) => {
                            let error = timed_out(&destination, backend, limit);
                            break self.answer(client, error, head).await;
                        }
                        Err(stop) => Err(stop),
                    }
                }
            };
            let sent = match sent {
                Ok(sent) => sent,
                // The request moved no byte for the stream idle timeout.
                Err(_stop) => {
                    let limit = forwarder.resilience.stream_idle_timeout;
                    let error = timed_out(&destination, backend, limit);
                    break self.answer(client, error, head).await;
                }
            };
            match sent {
                Ok((conn, response)) => {
                    record_response(backend, response.status, start);
                    if let Some(trace) = self.trace.as_mut() {
                        trace.response(response.status);
                    }
                    break self.relay(client, conn, response, head, pool).await;
                }
                Err(failure) => {
                    record_failure(backend, failure.fault());
                    if let Some(trace) = self.trace.as_mut() {
                        trace.attempt_failed(&failure, false);
                    }
                    // The whole request is in hand, so an idempotent one can be sent again.
                    let again = attempts.another(&forwarder.resilience, &set, &destination.stats)
                        && (failure.unsent() || head.idempotent);
                    if !again {
                        let error = upstream_failed(&destination, backend, &failure);
                        break self.answer(client, error, head).await;
                    }
                    let written = !failure.unsent();
                    retrying(&destination, backend, &failure, attempts.count(), written).await;
                    set = destination.fresher(set);
                }
            }
        };
        self.request_out = request_out;
        next
    }

    /// Forwards a request whose backends are spoken to in HTTP/2 (meshed endpoints)
    /// as a header map, through the forwarder's flow, and writes the response back
    /// as HTTP/1.1 ([`to_http2`]).
    async fn over_http2<IO>(
        &mut self,
        client: &mut IO,
        request: &[u8],
        head: &RequestHead,
        destination: Arc<Destination>,
        start: Instant,
    ) -> Next
    where
        IO: AsyncWrite + Unpin,
    {
        let req = match to_http2::request(Bytes::copy_from_slice(request), head) {
            Ok(req) => req,
            Err(why) => {
                let error = ProxyError::new(
                    ProxyErrorKind::BadRequest,
                    StatusCode::BAD_REQUEST,
                    why.into(),
                );
                return self.answer(client, error, head).await;
            }
        };
        // The forwarder's flow bounds its own wait for the response.
        self.control.set_phase(Phase::Delegated);
        let forwarding = self.forwarder.clone().forward(
            destination,
            req,
            start,
            false,
            Some(self.control.clone()),
        );
        let response = forwarding.await;
        self.control.set_phase(Phase::Busy);
        let response = match response {
            Ok(response) => response,
            Err(error) => return self.answer(client, error, head).await,
        };
        let close = head.close || self.control.is_draining();
        let mut out = std::mem::take(&mut self.response_out);
        out.clear();
        let framing = to_http2::response_head(&response, head.is_head, close, &mut out);
        let relayed = relay_frames(
            self.control,
            client,
            response.into_body(),
            framing,
            head.te_trailers,
            &mut out,
        )
        .await;
        self.response_out = out;
        match relayed {
            Ok(()) if !close => Next::KeepAlive,
            _ => Next::Close,
        }
    }

    /// Relays the response whose head was read on `conn`, then pools `conn` if it can
    /// carry another request.
    async fn relay<IO>(
        &mut self,
        client: &mut IO,
        mut conn: RawConn,
        mut response: ResponseHead,
        request: &RequestHead,
        pool: &RawPool,
    ) -> Next
    where
        IO: AsyncWrite + Unpin,
    {
        // Informational answers (103 Early Hints, 102) go through; then the final one.
        while (100..200).contains(&response.status) {
            if self
                .write_head(client, &conn, &response, &[], false)
                .await
                .is_err()
            {
                return Next::Close;
            }
            conn.buf.advance(response.len);
            response =
                match unless_stopped(self.control, read_head(&mut conn, request.is_head)).await {
                    Ok(Ok(response)) => response,
                    _ => return Next::Close,
                };
        }
        let close_client =
            request.close || response.framing == Framing::UntilClose || self.control.is_draining();
        let mut body = BodyLeft::new(response.framing);
        let mut leftover = false;
        let first = match body.consume(&conn.buf[response.len..]) {
            Ok(n) => n,
            Err(error) => {
                tracing::debug!(%error, "backend sent a malformed body");
                return Next::Close;
            }
        };
        leftover |= response.len + first < conn.buf.len();
        let body_start = &conn.buf[response.len..response.len + first];
        if self
            .write_head(client, &conn, &response, body_start, close_client)
            .await
            .is_err()
        {
            return Next::Close;
        }
        while !matches!(body, BodyLeft::Done) {
            conn.buf.clear();
            conn.buf.reserve(RELAY_CHUNK);
            let read = unless_stopped(self.control, conn.stream.read_buf(&mut conn.buf)).await;
            let n = match read {
                Ok(Ok(0)) if matches!(body, BodyLeft::UntilClose) => break,
                // Cut short (or quiet for the stream idle timeout): closing the client
                // connection is how HTTP/1 says so.
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Next::Close,
                Ok(Ok(n)) => n,
            };
            let part = match body.consume(&conn.buf) {
                Ok(part) => part,
                Err(error) => {
                    tracing::debug!(%error, "backend sent a malformed body");
                    return Next::Close;
                }
            };
            leftover |= part < n;
            if write_to(self.control, client, &conn.buf[..part])
                .await
                .is_err()
            {
                return Next::Close;
            }
        }
        // A server that sent more than its response, or that closes, is not reused.
        if !response.close && !leftover {
            pool.release(conn);
        }
        if close_client {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Writes a response head (as it came, or rebuilt) and the body bytes that came
    /// with it, in one write when possible.
    async fn write_head<IO: AsyncWrite + Unpin>(
        &mut self,
        client: &mut IO,
        conn: &RawConn,
        response: &ResponseHead,
        body_start: &[u8],
        close_client: bool,
    ) -> io::Result<()> {
        let head = &conn.buf[..response.len];
        if response.rewrite || close_client {
            let out = &mut self.response_out;
            out.clear();
            head::rewrite_response(head, close_client, out);
            out.extend_from_slice(body_start);
            write_to(self.control, client, out).await
        } else {
            // The head and the body bytes after it are contiguous in the buffer.
            write_to(
                self.control,
                client,
                &conn.buf[..response.len + body_start.len()],
            )
            .await
        }
    }

    /// Answers the client with an error the proxy made itself.
    async fn answer<IO: AsyncWrite + Unpin>(
        &mut self,
        client: &mut IO,
        error: ProxyError,
        request: &RequestHead,
    ) -> Next {
        if let Some(trace) = self.trace.as_mut() {
            trace.answered(error.kind, error.status.as_u16(), &error.message);
        }
        let close = request.close || self.control.is_draining();
        let bytes = error.to_http1(request.is_head, close);
        match write_all(client, &bytes).await {
            Ok(()) if !close => Next::KeepAlive,
            _ => Next::Close,
        }
    }
}

/// The trace of a request this path carries, if it is traced (see [`crate::trace`]).
#[cold]
fn trace(
    tracer: &Tracer,
    forwarder: &Forwarder,
    request: &[u8],
    head: &RequestHead,
    destination: &Destination,
) -> Option<Box<RequestTrace>> {
    let authority = head
        .host(request)
        .and_then(|h| std::str::from_utf8(h).ok())
        .unwrap_or("");
    let inbound = forwarder.inbound.as_ref();
    let client_id = inbound
        .and_then(|i| i.client_id.as_ref())
        .and_then(|id| id.to_str().ok());
    let mut trace = None;
    head::trace_parts(request, |method, path, found| {
        let info = RequestInfo {
            method,
            path,
            authority,
            destination: destination.name(),
            version: "1.1",
            inbound: inbound.map(|i| InboundInfo {
                peer: i.peer,
                client_id,
            }),
        };
        trace = tracer.request(found, &info);
    });
    trace
}

/// Writes `out` (a response head) and `body` framed as `framing` says: what is
/// ready at once goes out with the head in one write, and then each batch of frames
/// as it comes. An error (a body cut short, a client gone) closes the connection:
/// that is how HTTP/1 says a response was cut short.
async fn relay_frames<IO: AsyncWrite + Unpin>(
    control: &ConnControl,
    client: &mut IO,
    mut body: ProxyBody,
    mut framing: BodyOut,
    te_trailers: bool,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let mut trailers = false;
    if framing != BodyOut::None {
        loop {
            let frame = match to_http2::frame_now(&mut body) {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    if !out.is_empty() {
                        write_to(control, client, out).await?;
                        out.clear();
                    }
                    let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
                    unless_stopped(control, next)
                        .await
                        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
                }
            };
            match frame {
                None => break,
                Some(Err(error)) => return Err(io::Error::other(error)),
                Some(Ok(frame)) => {
                    trailers |= to_http2::push_frame(out, frame, &mut framing, te_trailers)
                        .map_err(io::Error::other)?;
                    if out.len() >= RELAY_CHUNK {
                        write_to(control, client, out).await?;
                        out.clear();
                    }
                }
            }
        }
        to_http2::push_end(out, framing, trailers).map_err(io::Error::other)?;
    }
    if !out.is_empty() {
        write_to(control, client, out).await?;
    }
    Ok(())
}

/// [`write_all`], unless the connection's limits stop it first (a client that stopped
/// reading, with the stream idle timeout passed).
async fn write_to<IO: AsyncWrite + Unpin>(
    control: &ConnControl,
    io: &mut IO,
    bytes: &[u8],
) -> io::Result<()> {
    match unless_stopped(control, write_all(io, bytes)).await {
        Ok(written) => written,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

async fn write_all<IO: AsyncWrite + Unpin>(io: &mut IO, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    // A no-op on TCP; TLS may hold the record back until flushed.
    io.flush().await
}
