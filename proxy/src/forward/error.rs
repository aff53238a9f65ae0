//! The proxy's own answers: a [`ProxyError`] becomes a text response (HTTP/1 bytes
//! for the raw HTTP/1 path, a header map for hyper and HTTP/2) or, for a gRPC
//! caller, a trailers-only gRPC status; and the errors the request path answers
//! for a destination, counted in its metrics.

use std::time::Duration;

use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use tandem_balancer::PickError;

use crate::body::{ClientBodyError, ProxyBody};
use crate::destination::{Backend, Destination};
use crate::metrics::{DestinationStats, ProxyErrorKind};
use crate::upstream::UpstreamError;

/// A response the proxy makes itself.
#[derive(Debug)]
pub struct ProxyError {
    pub kind: ProxyErrorKind,
    pub status: StatusCode,
    pub message: String,
}

impl ProxyError {
    pub(crate) fn new(kind: ProxyErrorKind, status: StatusCode, message: String) -> Self {
        Self {
            kind,
            status,
            message,
        }
    }

    /// An error answered for a destination, counted in its metrics by kind.
    pub(crate) fn counted(
        stats: &DestinationStats,
        kind: ProxyErrorKind,
        status: StatusCode,
        message: String,
    ) -> Self {
        stats.error(kind, status.as_u16());
        Self::new(kind, status, message)
    }

    /// Text for HTTP clients; for gRPC clients a trailers-only gRPC error, which their
    /// libraries turn into a proper status with this message.
    pub fn into_response(self, grpc: bool) -> Response<ProxyBody> {
        let mut response = if grpc {
            let code = match self.kind {
                ProxyErrorKind::BadRequest => "13",
                ProxyErrorKind::NotSupported => "12", // UNIMPLEMENTED
                _ => "14",                            // UNAVAILABLE: the caller may retry.
            };
            let mut r = Response::new(ProxyBody::Empty);
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static(code));
            if let Ok(message) = HeaderValue::from_str(&grpc_message(&self.message)) {
                h.insert("grpc-message", message);
            }
            r
        } else {
            let mut r = Response::new(ProxyBody::text(self.body_text()));
            *r.status_mut() = self.status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
            r
        };
        response.headers_mut().insert(
            HeaderName::from_static("x-tandem-error"),
            HeaderValue::from_static(self.kind.as_str()),
        );
        response
    }

    /// The same answer as [`into_response`](Self::into_response) gives an HTTP client,
    /// as the bytes of an HTTP/1.1 response (for the proxy's own HTTP/1 path).
    pub fn to_http1(&self, is_head: bool, close: bool) -> Vec<u8> {
        http1_answer(
            self.status,
            self.kind.as_str(),
            &self.message,
            is_head,
            close,
        )
    }

    fn body_text(&self) -> String {
        format!("tandem: {}\n", self.message)
    }
}

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// An answer of the proxy's own as the bytes of an HTTP/1.1 response:
/// `x-tandem-error: <reason>` and the body `tandem: <message>`, its length counted.
pub fn http1_answer(
    status: StatusCode,
    reason: &str,
    message: &str,
    is_head: bool,
    close: bool,
) -> Vec<u8> {
    let body = format!("tandem: {message}\n");
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {TEXT_PLAIN}\r\nx-tandem-error: {reason}\r\ncontent-length: {}\r\n{}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        if close { "connection: close\r\n" } else { "" },
    );
    if !is_head {
        out.push_str(&body);
    }
    out.into_bytes()
}

/// gRPC messages are percent-encoded outside printable ASCII (and '%' itself).
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The answer when the client's own request failed on its way (a malformed or
/// abandoned body): 400, and no backend is blamed or tried again.
pub(crate) fn client_failed(destination: &Destination, error: &UpstreamError) -> ProxyError {
    tracing::debug!(destination = destination.name(), %error, "the client's request failed");
    // hyper reports a failed body as its own error; the cause says what was wrong.
    let message = match ClientBodyError::find(error) {
        Some(cause) => format!("{cause}"),
        None => format!("the request could not be forwarded: {error}"),
    };
    ProxyError::counted(
        &destination.stats,
        ProxyErrorKind::BadRequest,
        StatusCode::BAD_REQUEST,
        message,
    )
}

/// The answer when `backend` failed and no other attempt is made.
pub(crate) fn upstream_failed(
    destination: &Destination,
    backend: &Backend,
    error: &dyn std::fmt::Display,
) -> ProxyError {
    tracing::debug!(destination = destination.name(), backend = %backend.meta.address, %error, "upstream request failed");
    ProxyError::counted(
        &destination.stats,
        ProxyErrorKind::UpstreamFailed,
        StatusCode::BAD_GATEWAY,
        format!(
            "backend {} of {} failed: {error}",
            backend.meta.address,
            destination.name()
        ),
    )
}

/// The answer when `backend` did not answer within the request timeout.
pub(crate) fn timed_out(
    destination: &Destination,
    backend: &Backend,
    limit: Duration,
) -> ProxyError {
    backend.state.failed();
    ProxyError::counted(
        &destination.stats,
        ProxyErrorKind::Timeout,
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "backend {} of {} did not answer within {limit:?}",
            backend.meta.address,
            destination.name()
        ),
    )
}

/// The answer when a destination has no endpoint to pick, counted in its metrics.
pub(crate) fn nothing_to_pick(destination: &Destination, e: PickError) -> ProxyError {
    let (kind, message) = match e {
        PickError::NoEndpoints => (
            ProxyErrorKind::NoEndpoints,
            format!("destination {} has no endpoints", destination.name()),
        ),
        PickError::NoHealthyEndpoints { total } => (
            ProxyErrorKind::NoHealthyEndpoints,
            format!(
                "destination {} has no healthy endpoints ({total} known, none ready)",
                destination.name()
            ),
        ),
    };
    ProxyError::counted(
        &destination.stats,
        kind,
        StatusCode::SERVICE_UNAVAILABLE,
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("no endpoints: 100%"), "no endpoints: 100%25");
        assert_eq!(grpc_message("é"), "%C3%A9");
    }
}
