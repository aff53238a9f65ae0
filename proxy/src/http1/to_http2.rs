//! HTTP/1.1 requests to backends spoken to in HTTP/2 (a meshed endpoint's proxy, whatever
//! its app speaks, or a backend that speaks HTTP/2), kept on this path rather than
//! handed to hyper: the head this path parsed becomes a header map for the
//! forwarder's flow (the one every request from hyper or HTTP/2 takes: retries,
//! timeouts, traces, the mesh), and the response is written back as HTTP/1.1 here.
//!
//! As hyper would: hop-by-hop headers are dropped (by the forwarder), a response
//! whose length is unknown is chunked, one whose body does not keep to its length is
//! cut off by closing the connection, a response to HEAD (or a 204 or 304) has no
//! body whatever it says, trailers reach a client that said `te: trailers` and nobody
//! else. (Unlike hyper, no `date` is added: the app's response has its own.)

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body, Frame};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use super::head::{MAX_HEADERS, RequestHead, parse_length, push_header};
use crate::body::ProxyBody;

/// The request at the start of `request` (its head, then its whole body), as the
/// forwarder takes requests. Header values are slices of `request`, not copies.
/// `Err`: why the head cannot be one (a name or value `http` refuses).
pub fn request(request: Bytes, head: &RequestHead) -> Result<Request<ProxyBody>, &'static str> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    // Parsed once already (parse_request), so this cannot fail.
    if parsed
        .parse_with_uninit_headers(&request[..head.len], &mut headers)
        .is_err()
    {
        return Err("malformed head");
    }
    let method = Method::from_bytes(parsed.method.unwrap_or("GET").as_bytes())
        .map_err(|_| "invalid method")?;
    let Some(path) = parsed.path else {
        return Err("no request target");
    };
    let path = request.slice_ref(path.as_bytes());
    // The Host goes into the URI, where HTTP/2 carries it (`:authority`), rather than
    // into the map for the forwarder to move there.
    let authority = head
        .host(&request)
        .filter(|host| !host.is_empty())
        .and_then(|host| Authority::from_maybe_shared(request.slice_ref(host)).ok());
    let uri = match authority {
        Some(authority) => {
            let mut parts = uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority);
            parts.path_and_query =
                Some(PathAndQuery::from_maybe_shared(path).map_err(|_| "invalid request target")?);
            Uri::from_parts(parts).map_err(|_| "invalid request target")?
        }
        None => Uri::from_maybe_shared(path).map_err(|_| "invalid request target")?,
    };
    let mut map = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        if uri.authority().is_some() && h.name.eq_ignore_ascii_case("host") {
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| "invalid header name")?;
        let value = HeaderValue::from_maybe_shared(request.slice_ref(h.value))
            .map_err(|_| "invalid header value")?;
        map.append(name, value);
    }
    let body = match head.content_length {
        0 => ProxyBody::Empty,
        n => ProxyBody::Full(Some(request.slice(head.len..head.len + n))),
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = map;
    Ok(req)
}

/// How a response's body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyOut {
    /// None at all (HEAD, 1xx, 204, 304, or an empty body).
    None,
    /// As it comes, this many bytes still to come: the head says its length, and the
    /// body must keep to it (a response may come from anywhere, not only over HTTP/2,
    /// which checks it), or the client would read the next response wrong.
    Raw(u64),
    /// In chunks: nothing said its length.
    Chunked,
}

/// A body that does not match the length its head gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the response body does not match its content-length ({0})")]
pub struct LengthMismatch(pub &'static str);

/// Writes `response`'s head into `out` as HTTP/1.1, with `connection: close` when
/// `close`, and says how its body follows. The Content-Length is written once, by
/// this function, and only when it says one thing.
pub fn response_head(
    response: &Response<ProxyBody>,
    request_is_head: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> BodyOut {
    let status = response.status();
    let code = status.as_u16();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let no_body = request_is_head || (100..200).contains(&code) || code == 204 || code == 304;
    let mut length: Option<u64> = None;
    let mut unusable_length = false;
    // Hop-by-hop fields are gone already (the forwarder strips them from responses).
    for (name, value) in response.headers() {
        if name == header::CONTENT_LENGTH && !no_body {
            match parse_length(value.as_bytes()) {
                Some(n) if length.is_none_or(|l| l == n) => length = Some(n),
                _ => unusable_length = true,
            }
            continue;
        }
        push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let body = match length {
        _ if no_body => BodyOut::None,
        Some(n) if !unusable_length => {
            out.extend_from_slice(b"content-length: ");
            push_number(out, n, 10);
            out.extend_from_slice(b"\r\n");
            if n == 0 {
                BodyOut::None
            } else {
                BodyOut::Raw(n)
            }
        }
        _ if response.body().is_end_stream() => {
            out.extend_from_slice(b"content-length: 0\r\n");
            BodyOut::None
        }
        _ => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            BodyOut::Chunked
        }
    };
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    body
}

/// `n` in `base` (10 or 16), without a `String` per response.
fn push_number(out: &mut Vec<u8>, mut n: u64, base: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n % base) as usize];
        n /= base;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends a body frame to `out` as `framing` has it; `te_trailers`: the client
/// accepts trailers (else they are dropped, as hyper does). Returns whether it
/// wrote trailers.
pub fn push_frame(
    out: &mut Vec<u8>,
    frame: Frame<Bytes>,
    framing: &mut BodyOut,
    te_trailers: bool,
) -> Result<bool, LengthMismatch> {
    match frame.into_data() {
        Ok(data) if data.is_empty() => {}
        Ok(data) => match framing {
            BodyOut::None => {}
            BodyOut::Raw(left) => {
                let n = data.len() as u64;
                if n > *left {
                    return Err(LengthMismatch("more data than it said"));
                }
                *left -= n;
                out.extend_from_slice(&data);
            }
            BodyOut::Chunked => {
                push_number(out, data.len() as u64, 16);
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
        },
        Err(frame) => {
            if let (Ok(trailers), BodyOut::Chunked, true) =
                (frame.into_trailers(), *framing, te_trailers)
            {
                out.extend_from_slice(b"0\r\n");
                for (name, value) in &trailers {
                    push_header(out, name.as_str().as_bytes(), value.as_bytes());
                }
                out.extend_from_slice(b"\r\n");
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Ends the body in `out`: the last chunk of a chunked one (unless trailers ended it
/// already); a body shorter than its length is an error.
pub fn push_end(
    out: &mut Vec<u8>,
    framing: BodyOut,
    trailers_written: bool,
) -> Result<(), LengthMismatch> {
    match framing {
        BodyOut::Chunked if !trailers_written => out.extend_from_slice(b"0\r\n\r\n"),
        BodyOut::Raw(left) if left > 0 => return Err(LengthMismatch("less data than it said")),
        _ => {}
    }
    Ok(())
}

/// The body's next frame if it is there now, without waiting (and without
/// registering for a wake-up: the caller waits with its own waker when it must).
pub fn frame_now(
    body: &mut ProxyBody,
) -> Poll<Option<Result<Frame<Bytes>, crate::body::BoxError>>> {
    Pin::new(body).poll_frame(&mut Context::from_waker(Waker::noop()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::head::parse_request;

    fn parsed(raw: &str) -> Request<ProxyBody> {
        let head = parse_request(raw.as_bytes(), 16 * 1024).unwrap().unwrap();
        request(Bytes::copy_from_slice(raw.as_bytes()), &head).unwrap()
    }

    #[test]
    fn a_request_head_becomes_a_header_map() {
        let req = parsed(
            "POST /a?b=1 HTTP/1.1\r\nHost: web:80\r\nX-App: one\r\nx-app: two\r\nContent-Length: 3\r\n\r\nabc",
        );
        assert_eq!(req.method(), Method::POST);
        assert_eq!(
            req.uri(),
            "http://web:80/a?b=1",
            "the Host is the authority"
        );
        assert!(!req.headers().contains_key(header::HOST));
        assert_eq!(req.version(), Version::HTTP_11);
        let apps: Vec<_> = req.headers().get_all("x-app").iter().collect();
        assert_eq!(apps, ["one", "two"]);
        assert!(matches!(req.body(), ProxyBody::Full(Some(b)) if b == "abc"));
        let req = parsed("GET / HTTP/1.1\r\nHost: \r\n\r\n");
        assert_eq!(req.uri(), "/", "an empty Host names no authority");
        assert_eq!(req.headers()[header::HOST], "");
    }

    fn head_of(response: Response<ProxyBody>, is_head: bool, close: bool) -> (String, BodyOut) {
        let mut out = Vec::new();
        let body = response_head(&response, is_head, close, &mut out);
        (String::from_utf8(out).unwrap(), body)
    }

    #[test]
    fn a_response_is_framed_as_http11() {
        let response = Response::builder()
            .status(200)
            .header("content-length", "5")
            .header("x-b", "1")
            .body(ProxyBody::text("hello"))
            .unwrap();
        assert_eq!(
            head_of(response, false, false),
            (
                "HTTP/1.1 200 OK\r\nx-b: 1\r\ncontent-length: 5\r\n\r\n".into(),
                BodyOut::Raw(5)
            )
        );
        // Two lengths that disagree say none: the body is chunked instead.
        let response = Response::builder()
            .status(200)
            .header("content-length", "5")
            .header("content-length", "6")
            .body(ProxyBody::text("hello"))
            .unwrap();
        assert_eq!(head_of(response, false, false).1, BodyOut::Chunked);
        let response = Response::builder()
            .status(200)
            .body(ProxyBody::text("hello"))
            .unwrap();
        assert_eq!(
            head_of(response, false, true),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".into(),
                BodyOut::Chunked
            )
        );
        let response = Response::builder()
            .status(200)
            .body(ProxyBody::Empty)
            .unwrap();
        assert_eq!(
            head_of(response, false, false),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into(),
                BodyOut::None
            )
        );
        let response = Response::builder()
            .status(200)
            .header("content-length", "5")
            .body(ProxyBody::Empty)
            .unwrap();
        assert_eq!(head_of(response, true, false).1, BodyOut::None, "HEAD");
        let response = Response::builder()
            .status(304)
            .body(ProxyBody::Empty)
            .unwrap();
        assert_eq!(
            head_of(response, false, false),
            ("HTTP/1.1 304 Not Modified\r\n\r\n".into(), BodyOut::None)
        );
    }

    #[test]
    fn chunks_and_trailers() {
        let mut out = Vec::new();
        let mut chunked = BodyOut::Chunked;
        let data = Frame::data(Bytes::from(vec![b'x'; 26]));
        assert_eq!(push_frame(&mut out, data, &mut chunked, false), Ok(false));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let frame = Frame::trailers(trailers.clone());
        assert_eq!(push_frame(&mut out, frame, &mut chunked, true), Ok(true));
        assert_eq!(push_end(&mut out, chunked, true), Ok(()));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("1a\r\n{}\r\n0\r\ngrpc-status: 0\r\n\r\n", "x".repeat(26))
        );
        let mut out = Vec::new();
        let frame = Frame::trailers(trailers);
        assert_eq!(push_frame(&mut out, frame, &mut chunked, false), Ok(false));
        assert_eq!(push_end(&mut out, chunked, false), Ok(()));
        assert_eq!(
            out, b"0\r\n\r\n",
            "trailers only for a client that said te: trailers"
        );
    }

    #[test]
    fn numbers_in_decimal_and_hex() {
        let mut out = Vec::new();
        push_number(&mut out, 0, 10);
        push_number(&mut out, 18_446_744_073_709_551_615, 10);
        push_number(&mut out, 26, 16);
        assert_eq!(out, b"0184467440737095516151a");
    }

    #[test]
    fn a_body_keeps_to_its_length() {
        let mut out = Vec::new();
        let mut raw = BodyOut::Raw(5);
        let hel = Frame::data(Bytes::from_static(b"hel"));
        assert_eq!(push_frame(&mut out, hel, &mut raw, false), Ok(false));
        assert!(push_end(&mut out, raw, false).is_err(), "2 bytes short");
        let more = Frame::data(Bytes::from_static(b"lo!"));
        assert!(
            push_frame(&mut out, more, &mut raw, false).is_err(),
            "1 byte over"
        );
        let lo = Frame::data(Bytes::from_static(b"lo"));
        assert_eq!(push_frame(&mut out, lo, &mut raw, false), Ok(false));
        assert_eq!(
            (push_end(&mut out, raw, false), &out[..]),
            (Ok(()), &b"hello"[..])
        );
    }
}
