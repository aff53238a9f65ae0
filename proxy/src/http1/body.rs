//! A response body read from a raw HTTP/1 connection as it arrives: the body of
//! [`crate::body::ProxyBody::Http1`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};

use super::chunked::ChunkError;
use super::exchange::{BodyLeft, MIN_READ, RELAY_CHUNK};
use super::pool::{RawConn, RawPool};

/// A response body read from a raw connection as it arrives, chunked framing
/// removed (the other side frames it itself). The connection goes back to the pool
/// when the body ends, and is closed if the body is abandoned or broken.
pub struct ResponseBody {
    pool: Arc<RawPool>,
    /// `None` once the body ended.
    conn: Option<RawConn>,
    left: BodyLeft,
    close: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("reading the response body: {0}")]
    Read(std::io::Error),
    #[error("the backend closed the connection inside the response body")]
    Truncated,
    #[error(transparent)]
    Chunked(ChunkError),
}

impl ResponseBody {
    /// The body of a response whose head was taken off the front of `conn.buf`:
    /// `left` of it is still to come; `close`: the connection is not reusable after.
    pub(crate) fn new(pool: Arc<RawPool>, conn: RawConn, left: BodyLeft, close: bool) -> Self {
        Self {
            pool,
            conn: Some(conn),
            left,
            close,
        }
    }

    /// The body's data at the front of `conn.buf`, if any; framing is consumed.
    fn take_data(left: &mut BodyLeft, conn: &mut RawConn) -> Result<Option<Bytes>, ChunkError> {
        let buf = &mut conn.buf;
        let n = match left {
            BodyLeft::Chunked(chunked) => {
                let framing = chunked.advance_framing(buf)?;
                buf.advance(framing);
                if chunked.is_done() {
                    *left = BodyLeft::Done;
                    return Ok(None);
                }
                let Some(data_left) = chunked.data_left() else {
                    return Ok(None);
                };
                let take = data_left.min(buf.len() as u64) as usize;
                chunked.advance(&buf[..take])?;
                take
            }
            // Without chunk framing, every byte up to the end is data.
            _ => left.consume(buf)?,
        };
        Ok((n > 0).then(|| buf.split_to(n).freeze()))
    }

    /// Reads more of the body into `conn.buf`: `Ok(false)` at the end of the stream.
    fn poll_fill(conn: &mut RawConn, cx: &mut Context<'_>) -> Poll<std::io::Result<bool>> {
        loop {
            ready!(conn.stream.poll_read_ready(cx))?;
            if conn.buf.capacity() - conn.buf.len() < MIN_READ {
                conn.buf.reserve(RELAY_CHUNK);
            }
            match conn.stream.try_read_buf(&mut conn.buf) {
                Ok(0) => return Poll::Ready(Ok(false)),
                Ok(_) => return Poll::Ready(Ok(true)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let data = match Self::take_data(&mut self.left, conn) {
                Ok(data) => data,
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(BodyError::Chunked(e))));
                }
            };
            if matches!(self.left, BodyLeft::Done) {
                let conn = self.conn.take().expect("checked above");
                self.pool.finish(conn, self.close);
            }
            if let Some(data) = data {
                return Poll::Ready(Some(Ok(data)));
            }
            // Nothing more in the buffer (`take_data` took all it could).
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match ready!(Self::poll_fill(conn, cx)) {
                Ok(true) => {}
                Ok(false) => {
                    self.conn = None;
                    return Poll::Ready(match self.left {
                        // The end of the stream is the end of this body.
                        BodyLeft::UntilClose => None,
                        _ => Some(Err(BodyError::Truncated)),
                    });
                }
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(BodyError::Read(e))));
                }
            }
        }
    }
}

/// Its errors are boxed where it joins the proxy's other bodies
/// ([`crate::body::ProxyBody`]).
impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.get_mut()
            .poll_data(cx)
            .map(|data| data.map(|d| d.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.conn, &self.left) {
            (None, _) => SizeHint::with_exact(0),
            (Some(_), BodyLeft::Length(n)) => SizeHint::with_exact(*n),
            _ => SizeHint::default(),
        }
    }
}
