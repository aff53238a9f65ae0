//! Why a stream or connection ended before its time.

use std::fmt;
use std::sync::Arc;

use super::frame::Reason;

#[derive(Debug, Clone)]
pub enum Error {
    /// The peer reset the stream (RST_STREAM).
    Reset(Reason),
    /// This end reset the stream: the peer broke the protocol on it, it was
    /// abandoned, or its handle reset it (with its own reason: see
    /// [`SendStream::send_reset`](crate::SendStream::send_reset)).
    LocalReset(Reason, &'static str),
    /// The peer sent GOAWAY, and this stream was above its last processed stream
    /// (or the connection was going away before the stream opened).
    GoAway(Reason),
    /// The connection failed: a protocol error (this end sent GOAWAY), or I/O.
    Connection(Arc<ConnectionError>),
}

#[derive(Debug)]
pub enum ConnectionError {
    /// The peer broke the protocol; this end sent GOAWAY with this reason.
    Protocol(Reason, String),
    /// The peer closed the connection.
    Closed,
    Io(std::io::Error),
}

impl Error {
    /// The HTTP/2 error code, where there is one.
    pub fn reason(&self) -> Option<Reason> {
        match self {
            Error::Reset(r) | Error::LocalReset(r, _) | Error::GoAway(r) => Some(*r),
            Error::Connection(c) => match **c {
                ConnectionError::Protocol(r, _) => Some(r),
                _ => None,
            },
        }
    }

    /// Whether the peer certainly did not process the request: safe to send it
    /// elsewhere (RFC 9113 §8.7).
    pub fn not_processed(&self) -> bool {
        matches!(
            self,
            Error::Reset(Reason::REFUSED_STREAM) | Error::GoAway(_)
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Reset(r) => write!(f, "stream reset by the peer ({r})"),
            Error::LocalReset(r, why) => write!(f, "stream reset ({r}): {why}"),
            Error::GoAway(r) => write!(
                f,
                "connection going away ({r}); the stream was not processed"
            ),
            Error::Connection(c) => match &**c {
                ConnectionError::Protocol(r, why) => write!(f, "connection error ({r}): {why}"),
                ConnectionError::Closed => f.write_str("connection closed"),
                ConnectionError::Io(e) => write!(f, "connection I/O: {e}"),
            },
        }
    }
}

impl std::error::Error for Error {}
