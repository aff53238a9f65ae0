//! One client connection on the HTTP/1 path: read a request, forward it, relay the
//! response, repeat; hand the connection to hyper at the first request this path
//! does not take.
//!
//! The policy is the hyper path's (`forward.rs`): the same routing, circuit breaking,
//! balancer, retries, timeouts and counters, through the same functions.

use std::future::Future;
use std::io;
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::exchange::{BodyLeft, MAX_HEAD, MIN_READ, RELAY_CHUNK, read_head, send};
use super::head::{self, Framing, Handoff, RequestHead, ResponseHead};
use crate::connections::ConnControl;
use crate::forward::{
    Attempts, Forwarder, ProxyError, nothing_to_pick, record_failure, record_response, retrying,
    timed_out, upstream_failed,
};
use crate::upstream::{RawConn, Upstream};

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
    Handoff(Handoff),
}

/// Serves HTTP/1.1 requests from `io` (with `buf` holding bytes already read) until
/// the connection ends or a request needs hyper.
pub async fn serve<IO>(
    forwarder: &Forwarder,
    control: &ConnControl,
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
    };
    loop {
        let head = loop {
            if !buf.is_empty() {
                match head::parse_request(&buf, MAX_BODY) {
                    Ok(Some(head)) => break head,
                    Ok(None) if buf.len() < MAX_HEAD => {}
                    Ok(None) => return handoff(io, buf, Handoff("large head")),
                    Err(reason) => return handoff(io, buf, reason),
                }
            }
            if !read_more(&mut io, &mut buf, control).await {
                return Outcome::Closed;
            }
        };
        let total = head.len + head.content_length;
        while buf.len() < total {
            if !read_more(&mut io, &mut buf, control).await {
                return Outcome::Closed;
            }
        }
        match conn.exchange(&mut io, &buf[..total], &head).await {
            Next::KeepAlive if !head.close && !control.is_closing() => buf.advance(total),
            Next::Handoff(reason) => return handoff(io, buf, reason),
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

/// Reads more of the client's bytes into `buf`. False when the client is gone, or the
/// connection was marked for closing (idle, or the proxy shuts down) while waiting.
pub async fn read_more<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    control: &ConnControl,
) -> bool {
    if buf.capacity() - buf.len() < MIN_READ {
        buf.reserve(CLIENT_BUFFER);
    }
    let read = io.read_buf(buf);
    tokio::pin!(read);
    let result = std::future::poll_fn(|cx| {
        if control.closing(cx) {
            return Poll::Ready(None);
        }
        read.as_mut().poll(cx).map(Some)
    })
    .await;
    matches!(result, Some(Ok(n)) if n > 0)
}

struct ClientConn<'a> {
    forwarder: &'a Forwarder,
    control: &'a ConnControl,
    /// Scratch space for rewritten heads, kept for the connection's life.
    request_out: Vec<u8>,
    response_out: Vec<u8>,
}

impl ClientConn<'_> {
    /// Forwards one request (`request`: its head and whole body) and relays the answer.
    async fn exchange<IO>(&mut self, client: &mut IO, request: &[u8], head: &RequestHead) -> Next
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = Instant::now();
        let forwarder = self.forwarder;
        let destination = match forwarder.route(head.host(request)) {
            Ok(destination) => destination,
            Err(error) => return self.answer(client, error, head).await,
        };
        destination.touch(start);
        let (destination, set) = match forwarder.backends(&destination).await {
            Ok(found) => found,
            Err(error) => return self.answer(client, error, head).await,
        };
        if !set.all_http1 {
            return Next::Handoff(Handoff("backends speak HTTP/2"));
        }
        let _admitted = match forwarder.admit(&destination) {
            Ok(admitted) => admitted,
            Err(error) => return self.answer(client, error, head).await,
        };
        // Taken out of `self` for the loop, so answering (which borrows `self`) can
        // happen while `outgoing` borrows it.
        let mut request_out = std::mem::take(&mut self.request_out);
        let outgoing: &[u8] = if head.rewrite {
            request_out.clear();
            head::rewrite_request(request, &mut request_out);
            request_out.extend_from_slice(&request[head.len..]);
            &request_out
        } else {
            request
        };
        let timeout = forwarder.request_timeout(&set);
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
            let upstream = &backend.state.upstream;
            let sending = send(upstream, outgoing, head.is_head, head.idempotent);
            let sent = match timeout {
                None => sending.await,
                Some(limit) => match tokio::time::timeout(limit, sending).await {
                    Ok(sent) => sent,
                    Err(_) => {
                        let error = timed_out(&destination, backend, limit);
                        break self.answer(client, error, head).await;
                    }
                },
            };
            match sent {
                Ok((conn, response)) => {
                    record_response(backend, response.status, start);
                    break self.relay(client, conn, response, head, upstream).await;
                }
                Err(failure) => {
                    record_failure(backend);
                    // The whole request is in hand, so an idempotent one can be sent again.
                    let again = attempts.another(&forwarder.resilience, &set, &destination.stats)
                        && (failure.unsent() || head.idempotent);
                    if !again {
                        let error = upstream_failed(&destination, backend, &failure);
                        break self.answer(client, error, head).await;
                    }
                    let written = !failure.unsent();
                    retrying(&destination, backend, &failure, attempts.count(), written).await;
                }
            }
        };
        self.request_out = request_out;
        next
    }

    /// Relays the response whose head was read on `conn`, then pools `conn` if it can
    /// carry another request.
    async fn relay<IO>(
        &mut self,
        client: &mut IO,
        mut conn: RawConn,
        mut response: ResponseHead,
        request: &RequestHead,
        upstream: &Upstream,
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
            response = match read_head(&mut conn, request.is_head).await {
                Ok(response) => response,
                Err(_) => return Next::Close,
            };
        }
        let close_client =
            request.close || response.framing == Framing::UntilClose || self.control.is_closing();
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
            let n = match conn.stream.read_buf(&mut conn.buf).await {
                Ok(0) if matches!(body, BodyLeft::UntilClose) => break,
                // Cut short: closing the client connection is how HTTP/1 says so.
                Ok(0) | Err(_) => return Next::Close,
                Ok(n) => n,
            };
            let part = match body.consume(&conn.buf) {
                Ok(part) => part,
                Err(error) => {
                    tracing::debug!(%error, "backend sent a malformed body");
                    return Next::Close;
                }
            };
            leftover |= part < n;
            if write_all(client, &conn.buf[..part]).await.is_err() {
                return Next::Close;
            }
        }
        // A server that sent more than its response, or that closes, is not reused.
        if !response.close && !leftover {
            upstream.release_raw(conn);
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
            write_all(client, out).await
        } else {
            // The head and the body bytes after it are contiguous in the buffer.
            write_all(client, &conn.buf[..response.len + body_start.len()]).await
        }
    }

    /// Answers the client with an error the proxy made itself.
    async fn answer<IO: AsyncWrite + Unpin>(
        &mut self,
        client: &mut IO,
        error: ProxyError,
        request: &RequestHead,
    ) -> Next {
        let close = request.close || self.control.is_closing();
        let bytes = error.to_http1(request.is_head, close);
        match write_all(client, &bytes).await {
            Ok(()) if !close => Next::KeepAlive,
            _ => Next::Close,
        }
    }
}

async fn write_all<IO: AsyncWrite + Unpin>(io: &mut IO, bytes: &[u8]) -> io::Result<()> {
    io.write_all(bytes).await?;
    // A no-op on TCP; TLS may hold the record back until flushed.
    io.flush().await
}
