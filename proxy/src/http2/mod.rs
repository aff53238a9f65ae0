//! The proxy's HTTP/2, on the `tandem-h2` crate (frames, HPACK, connections and
//! their streams, both roles): what is left here is the proxy's side of it.
//!
//! A client connection's streams all run inside the connection's own task
//! ([`serve`]), each forwarded by the [`Forwarder`](crate::forward::Forwarder), and a
//! request to a backend is opened and awaited from that same task ([`client`]): a
//! stream costs one allocation and no task switches. A task is spawned only to
//! stream a request body upstream, which must go on after the response has begun.
//!
//! - [`serve`]: a client connection, its streams, graceful close and keep-alive.
//! - [`client`]: one multiplexed connection to a backend.
//! - [`send_body`]: a [`ProxyBody`] into a stream, a failed client body reset as
//!   the client's fault.

use tandem_h2::SendStream;
use tandem_h2::pipe::{self, BoxError};

use crate::body::{ClientBodyError, ProxyBody};

pub mod client;
pub mod serve;

pub use serve::serve;
pub use tandem_h2::{Error, Reason, RecvStream};

/// The largest header list accepted from a peer, either side (hyper's default).
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Output a connection holds for its socket before it stops taking data from its
/// streams (headers always go).
const MAX_SEND_BUFFER: usize = 64 * 1024;

/// Why the proxy resets a stream to a backend whose request body failed on the
/// client's side (malformed, cut short, reset): the client's fault, not the backend's.
pub const REQUEST_BODY_FAILED: &str = "the client's request body failed";

/// Whether the proxy reset this stream because the client's request body failed.
pub fn request_body_failed(error: &Error) -> bool {
    matches!(error, Error::LocalReset(_, why) if *why == REQUEST_BODY_FAILED)
}

/// Sends `body` on `send` to its end, or until either side fails.
pub fn send_body(body: ProxyBody, send: SendStream) -> impl Future<Output = ()> {
    pipe::send_body(body, send, body_reset)
}

/// How a failed body resets its stream: a client's request body failing is the
/// client's fault ([`REQUEST_BODY_FAILED`]), and the client's own reset passes
/// through (its CANCEL reaches the backend as CANCEL).
fn body_reset(error: &BoxError) -> (Reason, &'static str) {
    let why = if ClientBodyError::caused(&**error) {
        REQUEST_BODY_FAILED
    } else {
        pipe::BODY_FAILED
    };
    let inner = match error.downcast_ref::<ClientBodyError>() {
        Some(ClientBodyError(inner)) => inner,
        None => error,
    };
    (pipe::reset_reason(&**inner), why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_client_body_resets_as_the_clients_fault() {
        let reset: BoxError = Error::Reset(Reason::CANCEL).into();
        let client: BoxError = ClientBodyError(reset).into();
        assert_eq!(body_reset(&client), (Reason::CANCEL, REQUEST_BODY_FAILED));
        let io: BoxError = std::io::Error::other("cut short").into();
        let client: BoxError = ClientBodyError(io).into();
        assert_eq!(
            body_reset(&client),
            (Reason::INTERNAL_ERROR, REQUEST_BODY_FAILED)
        );
        let backend: BoxError = Error::Reset(Reason::REFUSED_STREAM).into();
        assert_eq!(
            body_reset(&backend),
            (Reason::REFUSED_STREAM, pipe::BODY_FAILED)
        );
        assert!(request_body_failed(&Error::LocalReset(
            Reason::CANCEL,
            REQUEST_BODY_FAILED
        )));
        assert!(!request_body_failed(&Error::LocalReset(
            Reason::CANCEL,
            pipe::BODY_FAILED
        )));
    }
}
