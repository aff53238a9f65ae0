//! One request over a raw backend connection: a pooled one (or a new one) takes the
//! request's bytes, and the response head is read into the connection's buffer.
//! Shared by the HTTP/1 path ([`super::serve`]) and by requests that reach an HTTP/1
//! backend from elsewhere ([`super::client`]).

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::chunked::{ChunkError, ChunkedBody};
use super::head::{self, BadResponse, Framing, ResponseHead};
use super::pool::{RESPONSE_BUFFER, RawConn, RawPool};
use crate::pool::ConnectError;
use crate::shared::Fault;

/// A head longer than this is refused (a request's goes to hyper, which answers 431).
pub const MAX_HEAD: usize = 64 * 1024;
/// A read is started with at least this much room.
pub const MIN_READ: usize = 1024;
/// Response bodies are relayed in reads of up to this much.
pub const RELAY_CHUNK: usize = 16 * 1024;

/// Why an attempt got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendFailure {
    #[error(transparent)]
    Connect(ConnectError),
    #[error("writing the request: {0}")]
    Write(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    #[error("the connection closed before a response")]
    Closed,
    #[error(transparent)]
    BadResponse(BadResponse),
}

impl SendFailure {
    /// Whose fault the failure was: the requests sent this way are whole before they
    /// are sent, so the client's never is.
    pub fn fault(&self) -> Fault {
        match self {
            SendFailure::Connect(error) => error.fault(),
            _ => Fault::Backend,
        }
    }

    /// Nothing reached the backend.
    pub fn unsent(&self) -> bool {
        matches!(self, SendFailure::Connect(_))
    }

    /// What a pooled connection does when the server closed it as the request went out.
    fn stale(&self) -> bool {
        matches!(self, SendFailure::Write(_) | SendFailure::Closed)
    }
}

/// Sends `outgoing` over a pooled (or new) connection of `pool` and reads the response head.
/// `is_head`: the request is a HEAD (its response has no body); `idempotent`: it may
/// be sent again when a pooled connection turns out closed.
/// Not an `async fn`: one would hold [`send_with`]'s future inside its own, and be
/// moved into place in a copy per request.
pub fn send<'a>(
    pool: &'a RawPool,
    outgoing: &'a [u8],
    is_head: bool,
    idempotent: bool,
) -> impl Future<Output = Result<(RawConn, ResponseHead), SendFailure>> + 'a {
    send_with(pool, outgoing, idempotent, move |buf| {
        head::parse_response(buf, is_head)
    })
}

/// [`send`], with `complete` saying when `conn.buf` holds a whole response head
/// (and what the caller wants of it).
pub async fn send_with<T>(
    pool: &RawPool,
    outgoing: &[u8],
    idempotent: bool,
    complete: impl Fn(&[u8]) -> Result<Option<T>, BadResponse>,
) -> Result<(RawConn, T), SendFailure> {
    loop {
        let mut conn = match pool.checkout() {
            Some(conn) => conn,
            // Dialling is rare and its future large: boxed, it does not bloat every request.
            None => Box::pin(pool.dial()).await.map_err(SendFailure::Connect)?,
        };
        let result = match conn.stream.write_all(outgoing).await {
            Ok(()) => read_head_with(&mut conn, &complete).await,
            Err(e) => Err(SendFailure::Write(e)),
        };
        match result {
            Ok(response) => return Ok((conn, response)),
            // A pooled connection the server closed as the request went out: it did not
            // take the request. Sent again on another connection if it is idempotent
            // (as Go's and browsers' clients do: a crash would look the same).
            Err(failure) if conn.reused && failure.stale() && idempotent => {
                tracing::trace!(%failure, "pooled connection was closed; retrying on another");
            }
            Err(failure) => return Err(failure),
        }
    }
}

/// Reads until `conn.buf` starts with a whole response head.
pub fn read_head(
    conn: &mut RawConn,
    request_is_head: bool,
) -> impl Future<Output = Result<ResponseHead, SendFailure>> + '_ {
    read_head_with(conn, move |buf| head::parse_response(buf, request_is_head))
}

/// Reads until `complete` finds a whole response head at the start of `conn.buf`.
pub async fn read_head_with<T>(
    conn: &mut RawConn,
    complete: impl Fn(&[u8]) -> Result<Option<T>, BadResponse>,
) -> Result<T, SendFailure> {
    loop {
        if !conn.buf.is_empty() {
            match complete(&conn.buf) {
                Ok(Some(response)) => return Ok(response),
                Ok(None) if conn.buf.len() < MAX_HEAD => {}
                Ok(None) => return Err(SendFailure::BadResponse(BadResponse("head too large"))),
                Err(bad) => return Err(SendFailure::BadResponse(bad)),
            }
        }
        if conn.buf.capacity() - conn.buf.len() < MIN_READ {
            // Room for a typical head and small body, not a relay chunk: a connection
            // keeps this buffer while pooled, and asking for no more than it had lets
            // `reserve` reuse its allocation once the last response's bytes are gone.
            conn.buf.reserve(RESPONSE_BUFFER);
        }
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) if conn.buf.is_empty() => return Err(SendFailure::Closed),
            Ok(0) => {
                return Err(SendFailure::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed inside the response head",
                )));
            }
            Ok(_) => {}
            Err(e) if conn.buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(SendFailure::Closed);
            }
            Err(e) => return Err(SendFailure::Read(e)),
        }
    }
}

/// What is left of a response body.
pub enum BodyLeft {
    Done,
    Length(u64),
    Chunked(ChunkedBody),
    UntilClose,
}

impl BodyLeft {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => BodyLeft::Done,
            Framing::Length(n) => BodyLeft::Length(n),
            Framing::Chunked => BodyLeft::Chunked(ChunkedBody::new()),
            Framing::UntilClose => BodyLeft::UntilClose,
        }
    }

    /// How many of `bytes` (from their start) belong to the body.
    pub fn consume(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        let n = match self {
            BodyLeft::Done => return Ok(0),
            BodyLeft::UntilClose => return Ok(bytes.len()),
            BodyLeft::Length(left) => {
                let n = (*left).min(bytes.len() as u64);
                *left -= n;
                n as usize
            }
            BodyLeft::Chunked(chunked) => chunked.advance(bytes)?,
        };
        if matches!(self, BodyLeft::Length(0))
            || matches!(self, BodyLeft::Chunked(c) if c.is_done())
        {
            *self = BodyLeft::Done;
        }
        Ok(n)
    }
}
