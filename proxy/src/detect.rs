//! What an intercepted connection speaks, from its first bytes: an HTTP/1 request
//! line, the HTTP/2 preface, or anything else, opaque TCP. A client that says nothing
//! for a while is opaque too: server-speaks-first protocols (SMTP, MySQL) wait for
//! the server's greeting, which only a connection to the server can bring.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncRead;

use crate::connections::ConnControl;
use crate::http1::{Read, read_more};

/// What the client sent first (all of it is kept in the caller's buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    Opaque,
    /// The client went away before saying anything that decides.
    Closed,
}

impl Sniffed {
    /// As metrics and logs name it.
    pub fn name(self) -> &'static str {
        match self {
            Sniffed::Http1 => "http1",
            Sniffed::Http2 => "http2",
            Sniffed::Opaque => "opaque",
            Sniffed::Closed => "closed",
        }
    }
}

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Request lines start with a method and a space: the ones HTTP/1.1 defines.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"HEAD ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// What `first` bytes say, if they say enough.
pub fn classify(first: &[u8]) -> Option<Sniffed> {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Sniffed::Http2);
    }
    let mut could_be_http1 = false;
    for method in METHODS {
        let m = first.len().min(method.len());
        if first[..m] == method[..m] {
            if m == method.len() {
                return Some(Sniffed::Http1);
            }
            could_be_http1 = true;
        }
    }
    (!could_be_http1).then_some(Sniffed::Opaque)
}

/// Reads until the first bytes decide, for at most `silence` while nothing decided.
pub async fn sniff<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    control: &ConnControl,
    silence: Duration,
) -> Sniffed {
    let deadline = tokio::time::Instant::now() + silence;
    loop {
        if !buf.is_empty()
            && let Some(decided) = classify(buf)
        {
            return decided;
        }
        match tokio::time::timeout_at(deadline, read_more(io, buf, control)).await {
            Ok(Read::More) => {}
            Ok(_) => return Sniffed::Closed,
            // Silence, or a beginning that never decided: whatever it is, not HTTP.
            Err(_) => return Sniffed::Opaque,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_decide() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Sniffed::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Sniffed::Http2));
        assert_eq!(classify(b"PRI * HT"), None, "the preface, not whole yet");
        assert_eq!(classify(b"GE"), None, "a method, not whole yet");
        assert_eq!(
            classify(b"\x16\x03\x01"),
            Some(Sniffed::Opaque),
            "TLS the app does itself"
        );
        assert_eq!(classify(b"\x00\x00\x00\x01"), Some(Sniffed::Opaque));
        assert_eq!(classify(b"HELO mail"), Some(Sniffed::Opaque));
        assert_eq!(
            classify(b"GETX"),
            Some(Sniffed::Opaque),
            "no space after the method"
        );
    }
}
