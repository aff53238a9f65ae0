//! What every layer of the request path shares, and depends on nothing of the
//! proxy's: the HTTP version spoken to a backend, which methods may be sent twice,
//! which headers are hop-by-hop, and whose fault a failed attempt was.
//!
//! The HTTP/1 head parser ([`crate::http1::head`]), the transports
//! ([`crate::upstream`], [`crate::http1`], [`crate::http2`]) and the request flow
//! ([`crate::forward`], [`crate::upgrade`]) all ask these, so they live below all of
//! them.

use http::HeaderName;

/// The HTTP version the proxy speaks to a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    Http1,
    Http2,
}

/// Envoy's idempotent methods: sending them twice has the effect of sending them once.
/// By name, so both request paths (a parsed `http::Method`, raw HTTP/1 bytes) ask it.
pub fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that `http` has no constant for; with
/// `connection`, `transfer-encoding`, `upgrade`, the headers `connection` names and
/// `te` other than `trailers` ([`te_is_trailers`]), they describe one connection and
/// are never forwarded. The list in one place is `tandem_h2::is_hop_by_hop`; the raw
/// HTTP/1 path checks the same names on bytes (`http1::head`).
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// See [`KEEP_ALIVE`].
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether a `te` value is `trailers`, the one `te` forwarded end to end: gRPC needs it.
#[inline]
pub fn te_is_trailers(value: &[u8]) -> bool {
    value.eq_ignore_ascii_case(b"trailers")
}

/// Whose fault a failed attempt was. Only a backend's own failures count against it
/// (outlier detection, failure counters) or make the request go elsewhere: a
/// client's malformed or abandoned request would fail anywhere, and the proxy
/// running out of file descriptors says nothing about the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client's request body was malformed, cut short or reset.
    Client,
    /// The proxy itself could not make the attempt (out of sockets or memory).
    Proxy,
    /// The backend refused, failed or broke the protocol.
    Backend,
}
