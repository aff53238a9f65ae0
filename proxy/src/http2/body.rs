//! A request or response body sent on an HTTP/2 stream, by the client connection
//! ([`serve`](mod@super::serve)) and to backends ([`super::client`]): how a failed body resets
//! its stream, and whose fault that was.

use tandem_h2::pipe::{self, BoxError};
use tandem_h2::{Error, Reason, SendStream};

use crate::body::{ClientBodyError, ProxyBody};

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
