//! HTTP/1.1 message heads, parsed in place (httparse) and forwarded as they arrived
//! when they carry nothing hop-by-hop; rebuilt without those headers otherwise.
//!
//! Forwarding the bytes that were parsed, rather than re-serialising a header map,
//! is both the cheap path and the safe one: the backend reads exactly what the proxy
//! validated. So a head is only forwarded if it can be read one way only: lines end
//! in CRLF (a bare LF, which httparse accepts, is refused: a server that splits lines
//! on CRLF alone would see other headers, or another request), and an HTTP/1.1
//! request has exactly one valid Host (RFC 9112 §3.2). Anything this path does not
//! handle itself (upgrades, CONNECT, `Expect`, chunked or large request bodies,
//! HTTP/1.0, absolute-form targets, other malformed heads) is reported as [`Handoff`]
//! before anything was sent, and the connection continues in hyper, which handles
//! (or rejects) all of it.

use std::mem::MaybeUninit;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use crate::shared::is_idempotent;
use crate::trace::context::{Found, TRACEPARENT};

/// Header lines read per message on this path; a request with more goes to hyper.
pub(super) const MAX_HEADERS: usize = 64;
/// Response heads may carry more (cookies, CSP, tracing).
const MAX_RESPONSE_HEADERS: usize = 128;
/// Names listed in one message's `Connection` headers that this path removes itself.
const MAX_CONNECTION_TOKENS: usize = 8;

/// Why a request is left to hyper (for debug logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handoff(pub &'static str);

/// Why a request head is not forwarded from this path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// hyper takes the connection from this request on.
    Handoff(Handoff),
    /// The head is malformed: the client gets 400, saying why.
    Invalid(&'static str),
}

impl From<Handoff> for Refusal {
    fn from(handoff: Handoff) -> Self {
        Refusal::Handoff(handoff)
    }
}

/// Whether the line whose content ends at `end` in `buf` ends in CRLF, after optional
/// trailing whitespace: httparse also accepts a bare LF, which a server that splits
/// lines on CRLF alone would read as part of the line. One look per line, in bytes
/// httparse just read (a scan of the whole head for LFs cost ten times more).
#[inline]
fn ends_in_crlf(buf: &[u8], mut end: usize) -> bool {
    while let Some(b' ' | b'\t') = buf.get(end) {
        end += 1;
    }
    buf.get(end) == Some(&b'\r')
}

/// Whether the head of `len` bytes at the start of `buf` ends with CRLF CRLF.
#[inline]
fn ends_head_in_crlf(buf: &[u8], len: usize) -> bool {
    len >= 2 && buf[len - 2] == b'\r'
}

/// Bytes a Host value may hold (RFC 9112 §3.2, RFC 3986 §3.2.2): a name or address
/// and an optional port; nothing that would make it another authority to another
/// parser (spaces, `/`, `?`, `#`, `@`, controls).
static HOST_BYTES: [bool; 256] = {
    let mut ok = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        ok[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
            );
        b += 1;
    }
    ok
};

/// Whether `host` is a valid Host value (see [`HOST_BYTES`]). Empty is valid.
#[inline]
pub fn valid_host(host: &[u8]) -> bool {
    // Without an early exit: a host is short, and a branch per byte costs more.
    host.iter().fold(true, |ok, b| ok & HOST_BYTES[*b as usize])
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of the head, final CRLF included.
    pub len: usize,
    /// `HEAD`: the response has no body whatever its headers say.
    pub is_head: bool,
    /// Sending it twice has the effect of sending it once ([`is_idempotent`]).
    pub idempotent: bool,
    /// Where the `Host` value is in the buffer.
    pub host: Option<(usize, usize)>,
    pub content_length: usize,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
    /// Carries hop-by-hop headers: forward it through [`rewrite_request`].
    pub rewrite: bool,
    /// Carries a trace context (`traceparent`, B3): looked at when tracing is on.
    pub trace_context: bool,
    /// Says `te: trailers`: the client takes a chunked response's trailers.
    pub te_trailers: bool,
}

impl RequestHead {
    /// The Host value's bytes (checked by [`valid_host`]: ASCII only).
    pub fn host<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        let (start, end) = self.host?;
        Some(&buf[start..end])
    }
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the server closes the connection.
    UntilClose,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub framing: Framing,
    /// The server will not take another request on this connection.
    pub close: bool,
    /// Must be rebuilt through [`rewrite_response`] before it reaches the client
    /// (hop-by-hop headers, an HTTP/1.0 status line, Content-Length beside chunked).
    pub rewrite: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid response head from the backend: {0}")]
pub struct BadResponse(pub &'static str);

/// `Connection` header tokens of one message.
#[derive(Default)]
struct ConnectionTokens<'b> {
    close: bool,
    keep_alive: bool,
    /// Other names listed: those headers are hop-by-hop too.
    others: [&'b [u8]; MAX_CONNECTION_TOKENS],
    n_others: usize,
    overflow: bool,
}

impl<'b> ConnectionTokens<'b> {
    fn add(&mut self, value: &'b [u8]) {
        for token in value.split(|b| *b == b',').map(trim) {
            if token.is_empty() {
                continue;
            }
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if self.n_others < MAX_CONNECTION_TOKENS {
                self.others[self.n_others] = token;
                self.n_others += 1;
            } else {
                self.overflow = true;
            }
        }
    }

    fn lists(&self, name: &str) -> bool {
        self.others[..self.n_others]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    }
}

/// The Connection tokens of a response head, and whether it has Transfer-Encoding
/// (its body is then chunked, and a Content-Length beside it does not count).
fn response_connection<'b>(headers: &[httparse::Header<'b>]) -> (ConnectionTokens<'b>, bool) {
    let mut tokens = ConnectionTokens::default();
    let mut transfer_encoding = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("connection") {
            tokens.add(h.value);
        }
        transfer_encoding |= h.name.eq_ignore_ascii_case("transfer-encoding");
    }
    (tokens, transfer_encoding)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
/// `te: trailers` is the exception, as gRPC and Envoy have it: it is end to end.
/// So are the headers this path framed and routed the message by, even when
/// `Connection` names them (found by fuzzing, issue 22): the next hop must read the
/// message as the proxy did. A request forwarded without its Content-Length would
/// have its body read as the next request (smuggling); a response without its
/// Content-Length or Transfer-Encoding would be framed otherwise by the client.
fn is_hop_by_hop(name: &str, value: &[u8], tokens: &ConnectionTokens<'_>) -> bool {
    name.eq_ignore_ascii_case("connection")
        || name.eq_ignore_ascii_case("keep-alive")
        || name.eq_ignore_ascii_case("proxy-connection")
        || name.eq_ignore_ascii_case("upgrade")
        || (name.eq_ignore_ascii_case("te") && !trim(value).eq_ignore_ascii_case(b"trailers"))
        || (!name.eq_ignore_ascii_case("te") && !frames_message(name) && tokens.lists(name))
}

/// Headers the message is delimited or routed by.
fn frames_message(name: &str) -> bool {
    name.eq_ignore_ascii_case("content-length")
        || name.eq_ignore_ascii_case("transfer-encoding")
        || name.eq_ignore_ascii_case("host")
}

pub(super) fn parse_length(value: &[u8]) -> Option<u64> {
    let value = trim(value);
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // 19 digits never overflow a u64 (its maximum has 20), so no checked arithmetic;
    // a third of what going through `str::parse` costs.
    Some(value.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Offset of `part` inside `buf` (httparse hands out sub-slices of the buffer).
fn offset(buf: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - buf.as_ptr() as usize
}

const BARE_LF: Refusal =
    Refusal::Invalid("a line of the request head ends in a bare LF; HTTP/1.1 lines end in CRLF");

/// Parses a request head at the start of `buf`: `Ok(None)` until it is complete.
pub fn parse_request(buf: &[u8], max_body: usize) -> Result<Option<RequestHead>, Refusal> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Handoff("many headers").into()),
        Err(_) => return Err(Handoff("malformed head").into()),
    };
    if req.version != Some(1) {
        return Err(Handoff("HTTP/1.0").into());
    }
    let method = req.method.unwrap_or_default();
    let Some(path) = req
        .path
        .filter(|p| p.starts_with('/') && method != "CONNECT")
    else {
        return Err(Handoff("not an origin-form target").into());
    };
    // The request line ends after the target, " HTTP/1.1" and CRLF.
    if !ends_in_crlf(buf, offset(buf, path.as_bytes()) + path.len() + 9)
        || !ends_head_in_crlf(buf, len)
    {
        return Err(BARE_LF);
    }
    // httparse skips empty lines before the request line, bare LFs among them
    // (found by fuzzing, issue 22).
    if buf[..offset(buf, method.as_bytes())]
        .chunks(2)
        .any(|line| line != b"\r\n")
    {
        return Err(BARE_LF);
    }
    let mut tokens = ConnectionTokens::default();
    let mut head = RequestHead {
        len,
        is_head: method == "HEAD",
        idempotent: is_idempotent(method),
        host: None,
        content_length: 0,
        close: false,
        rewrite: false,
        trace_context: false,
        te_trailers: false,
    };
    let mut seen_length = false;
    for h in req.headers.iter() {
        let name = h.name;
        if !ends_in_crlf(buf, offset(buf, h.value) + h.value.len()) {
            return Err(BARE_LF);
        }
        match name.len() {
            4 if name.eq_ignore_ascii_case("host") => {
                if head.host.is_some() {
                    return Err(Refusal::Invalid("the request has two Host headers"));
                }
                if !valid_host(h.value) {
                    return Err(Refusal::Invalid(
                        "the Host header is not a valid host[:port]",
                    ));
                }
                let start = offset(buf, h.value);
                head.host = Some((start, start + h.value.len()));
            }
            14 if name.eq_ignore_ascii_case("content-length") => {
                let Some(n) = parse_length(h.value) else {
                    return Err(Handoff("invalid Content-Length").into());
                };
                if seen_length {
                    return Err(Handoff("two Content-Length headers").into());
                }
                seen_length = true;
                if n > max_body as u64 {
                    return Err(Handoff("large body").into());
                }
                head.content_length = n as usize;
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => {
                return Err(Handoff("chunked body").into());
            }
            6 if name.eq_ignore_ascii_case("expect") => return Err(Handoff("Expect").into()),
            7 if name.eq_ignore_ascii_case("upgrade") => return Err(Handoff("Upgrade").into()),
            12 if name.eq_ignore_ascii_case("content-type")
                && h.value.starts_with(b"application/grpc") =>
            {
                return Err(Handoff("gRPC needs HTTP/2").into());
            }
            10 if name.eq_ignore_ascii_case("connection") => {
                tokens.add(h.value);
                head.rewrite = true;
            }
            2 if name.eq_ignore_ascii_case("te") => {
                let trailers = trim(h.value).eq_ignore_ascii_case(b"trailers");
                head.rewrite |= !trailers;
                head.te_trailers |= trailers;
            }
            11 if name.eq_ignore_ascii_case("traceparent") => head.trace_context = true,
            12 if name.eq_ignore_ascii_case("x-b3-traceid") => head.trace_context = true,
            2 if name.eq_ignore_ascii_case("b3") => head.trace_context = true,
            10 if name.eq_ignore_ascii_case("keep-alive") => head.rewrite = true,
            16 if name.eq_ignore_ascii_case("proxy-connection") => head.rewrite = true,
            _ => {}
        }
    }
    if head.host.is_none() {
        return Err(Refusal::Invalid(
            "an HTTP/1.1 request must have a Host header",
        ));
    }
    if tokens.overflow {
        return Err(Handoff("long Connection header").into());
    }
    head.close = tokens.close;
    Ok(Some(head))
}

/// Writes the head at the start of `buf` into `out` without its hop-by-hop headers,
/// and with `traceparent` (replacing the client's) when the request is traced.
pub fn rewrite_request(buf: &[u8], out: &mut Vec<u8>, traceparent: Option<&[u8]>) {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    // Parsed successfully once already (parse_request), so this cannot fail.
    if req.parse_with_uninit_headers(buf, &mut headers).is_err() {
        return;
    }
    out.extend_from_slice(req.method.unwrap_or("GET").as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.path.unwrap_or("/").as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut tokens = ConnectionTokens::default();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            tokens.add(h.value);
        }
    }
    for h in req.headers.iter() {
        let replaced = traceparent.is_some() && h.name.eq_ignore_ascii_case(TRACEPARENT);
        if !is_hop_by_hop(h.name, h.value, &tokens) && !replaced {
            push_header(out, h.name.as_bytes(), h.value);
        }
    }
    if let Some(value) = traceparent {
        push_header(out, TRACEPARENT.as_bytes(), value);
    }
    out.extend_from_slice(b"\r\n");
}

/// What a traced request's spans say of it, and its trace context, read again from
/// the head at the start of `buf` (only for requests tracing looks at).
pub fn trace_parts(buf: &[u8], with: impl FnOnce(&str, &str, &Found<'_>)) {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    if req.parse_with_uninit_headers(buf, &mut headers).is_err() {
        return;
    }
    let mut found = Found::default();
    for h in req.headers.iter() {
        found.offer(h.name.as_bytes(), h.value);
    }
    let path = req.path.unwrap_or("/");
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    with(req.method.unwrap_or("GET"), path, &found);
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Parses a response head at the start of `buf`: `Ok(None)` until it is complete.
/// `request_is_head`: the response to a HEAD request has no body.
pub fn parse_response(
    buf: &[u8],
    request_is_head: bool,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut headers =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    Ok(parse_response_in(buf, request_is_head, &mut headers)?.map(|(head, _)| head))
}

/// [`parse_response`], leaving the parsed header lines in `headers` for a caller
/// that makes more of them.
fn parse_response_in<'h, 'b>(
    buf: &'b [u8],
    request_is_head: bool,
    headers: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<(ResponseHead, httparse::Response<'h, 'b>)>, BadResponse> {
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, headers)
    {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadResponse("too many headers")),
        Err(_) => return Err(BadResponse("malformed head")),
    };
    let status = res.code.unwrap_or(0);
    let http10 = res.version == Some(0);
    let mut tokens = ConnectionTokens::default();
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut transfer_encoding = false;
    // A head with bare LFs is rebuilt with CRLFs: a client must read it one way only.
    // The status line ends after its reason phrase (looked for only when it has none).
    let status_line_crlf = match res.reason.filter(|r| !r.is_empty()) {
        Some(reason) => ends_in_crlf(buf, offset(buf, reason.as_bytes()) + reason.len()),
        None => memchr::memchr(b'\n', buf).is_some_and(|i| i > 0 && buf[i - 1] == b'\r'),
    };
    let mut rewrite = http10 || !status_line_crlf || !ends_head_in_crlf(buf, len);
    for h in res.headers.iter() {
        let name = h.name;
        rewrite |= !ends_in_crlf(buf, offset(buf, h.value) + h.value.len());
        // By length first, as in `parse_request`: most names are compared with nothing.
        match name.len() {
            14 if name.eq_ignore_ascii_case("content-length") => {
                let n = parse_length(h.value).ok_or(BadResponse("invalid Content-Length"))?;
                if length.is_some_and(|l| l != n) {
                    return Err(BadResponse("conflicting Content-Length headers"));
                }
                length = Some(n);
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => {
                transfer_encoding = true;
                // Only the last coding says how the body ends.
                chunked = h
                    .value
                    .rsplit(|b| *b == b',')
                    .next()
                    .is_some_and(|last| trim(last).eq_ignore_ascii_case(b"chunked"));
            }
            10 if name.eq_ignore_ascii_case("connection") => {
                tokens.add(h.value);
                rewrite = true;
            }
            10 if name.eq_ignore_ascii_case("keep-alive") => rewrite = true,
            16 if name.eq_ignore_ascii_case("proxy-connection") => rewrite = true,
            7 if name.eq_ignore_ascii_case("upgrade") => rewrite = true,
            _ => {}
        }
    }
    if tokens.overflow {
        return Err(BadResponse("long Connection header"));
    }
    let no_body = request_is_head || (100..200).contains(&status) || status == 204 || status == 304;
    let framing = if no_body {
        Framing::Empty
    } else if transfer_encoding {
        // Transfer-Encoding wins over Content-Length, which then must not be forwarded.
        rewrite |= length.is_some();
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let close = tokens.close || (http10 && !tokens.keep_alive) || framing == Framing::UntilClose;
    let head = ResponseHead {
        len,
        status,
        framing,
        close,
        rewrite,
    };
    Ok(Some((head, res)))
}

/// Where the response head at the start of `buf` ends (after its empty line, CRLF or
/// bare LF), if it is all there: what waiting for a head needs to know, for a caller
/// that parses it once it is whole ([`parse_response_parts`]).
pub fn response_head_end(buf: &[u8]) -> Option<usize> {
    // Empty lines before the status line are skipped, as httparse does.
    let start = buf.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    memchr::memchr_iter(b'\n', &buf[start..]).find_map(|i| match buf.get(start + i + 1..) {
        Some([b'\n', ..]) => Some(start + i + 2),
        Some([b'\r', b'\n', ..]) => Some(start + i + 3),
        _ => None,
    })
}

/// Writes the response head at the start of `buf` into `out` as HTTP/1.1, without
/// hop-by-hop headers (and without Content-Length beside Transfer-Encoding); with
/// `connection: close` when `close_client` (the proxy closes the client connection).
pub fn rewrite_response(buf: &[u8], close_client: bool, out: &mut Vec<u8>) {
    let mut headers =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    // Parsed successfully once already (parse_response), so this cannot fail.
    if httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut headers)
        .is_err()
    {
        return;
    }
    let status = res.code.unwrap_or(502);
    out.extend_from_slice(b"HTTP/1.1 ");
    // httparse reads exactly three digits.
    out.extend_from_slice(&[
        b'0' + (status / 100 % 10) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(res.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let (tokens, transfer_encoding) = response_connection(res.headers);
    for h in res.headers.iter() {
        let drop = is_hop_by_hop(h.name, h.value, &tokens)
            || (transfer_encoding && h.name.eq_ignore_ascii_case("content-length"));
        if !drop {
            push_header(out, h.name.as_bytes(), h.value);
        }
    }
    if close_client {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The framing ([`parse_response`]'s), status and end-to-end headers of the response
/// head `head` holds whole (see [`response_head_end`]), parsed once, for a response
/// that leaves this path as a header map (to an HTTP/2 client, or through hyper).
/// Values are slices of `head`, not copies. The body is decoded on its way out, so
/// Transfer-Encoding goes too (and Content-Length beside it).
pub fn parse_response_parts(
    head: &Bytes,
    request_is_head: bool,
) -> Result<(ResponseHead, StatusCode, HeaderMap), BadResponse> {
    let mut headers =
        [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let Some((parsed, res)) = parse_response_in(head, request_is_head, &mut headers)? else {
        return Err(BadResponse("malformed head"));
    };
    let status = res
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(BadResponse("invalid status code"))?;
    let (tokens, transfer_encoding) = response_connection(res.headers);
    let mut map = HeaderMap::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        if is_hop_by_hop(h.name, h.value, &tokens)
            || h.name.eq_ignore_ascii_case("transfer-encoding")
            || (transfer_encoding && h.name.eq_ignore_ascii_case("content-length"))
        {
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| BadResponse("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice_ref(h.value))
            .map_err(|_| BadResponse("invalid header value"))?;
        map.append(name, value);
    }
    Ok((parsed, status, map))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX_BODY: usize = 16 * 1024;

    fn request(raw: &str) -> Result<Option<RequestHead>, Refusal> {
        parse_request(raw.as_bytes(), MAX_BODY)
    }

    #[test]
    fn parses_what_load_generators_send() {
        let raw = "GET /a?b HTTP/1.1\r\nHost: web:80\r\n\r\n";
        let head = request(raw).unwrap().unwrap();
        assert_eq!(head.len, raw.len());
        assert_eq!(head.host(raw.as_bytes()), Some(&b"web:80"[..]));
        assert!(head.idempotent && !head.is_head && !head.close && !head.rewrite);
        assert_eq!(request("GET / HTTP/1.1\r\nHost: a"), Ok(None));
    }

    #[test]
    fn reads_bodies_and_connection_options() {
        let head = request(
            "POST /x HTTP/1.1\r\nHost: a\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
        )
        .unwrap()
        .unwrap();
        assert_eq!(head.content_length, 5);
        assert!(head.close && head.rewrite && !head.idempotent);
    }

    #[test]
    fn hands_off_what_it_does_not_handle() {
        for raw in [
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://web/ HTTP/1.1\r\nHost: web\r\n\r\n",
            "CONNECT web:443 HTTP/1.1\r\n\r\n",
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 99999999\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
            "PUT / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "POST /s HTTP/1.1\r\nHost: a\r\ncontent-type: application/grpc\r\n\r\n",
            "GET / HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(
                matches!(request(raw), Err(Refusal::Handoff(_))),
                "{raw:?} should go to hyper"
            );
        }
    }

    #[test]
    fn refuses_heads_that_parse_more_than_one_way() {
        for raw in [
            "GET / HTTP/1.1\nHost: a\n\n",
            "GET / HTTP/1.1\r\nHost: a\nContent-Length: 5\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
        ] {
            assert!(
                matches!(request(raw), Err(Refusal::Invalid(_))),
                "{raw:?} should be refused: {:?}",
                request(raw)
            );
        }
        assert!(request("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").is_ok());
        assert!(
            request("GET / HTTP/1.1\r\nHost: \r\n\r\n").is_ok(),
            "empty Host"
        );
        let r = response("HTTP/1.1 200 OK\nx-a: 1\ncontent-length: 1\n\n", false);
        assert!(r.rewrite, "bare LF in a response head: rebuilt with CRLF");
    }

    #[test]
    fn rewrites_hop_by_hop_headers_away() {
        let raw = "GET / HTTP/1.1\r\nHost: web\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: gzip\r\nX-App: kept\r\n\r\n";
        let head = request(raw).unwrap().unwrap();
        assert!(head.rewrite);
        let mut out = Vec::new();
        rewrite_request(raw.as_bytes(), &mut out, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nHost: web\r\nX-App: kept\r\n\r\n"
        );
        let raw = "GET / HTTP/1.1\r\nHost: a\r\nte: trailers\r\n\r\n";
        assert!(
            !request(raw).unwrap().unwrap().rewrite,
            "te: trailers is end to end"
        );
    }

    fn response(raw: &str, head: bool) -> ResponseHead {
        parse_response(raw.as_bytes(), head).unwrap().unwrap()
    }

    #[test]
    fn frames_responses() {
        let r = response("HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n", false);
        assert_eq!(
            (r.status, r.framing, r.close, r.rewrite),
            (200, Framing::Length(11), false, false)
        );
        let r = response("HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n", true);
        assert_eq!(r.framing, Framing::Empty, "HEAD");
        let r = response("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!(r.framing, Framing::Empty);
        let r = response(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, Framing::Chunked);
        let r = response(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, Framing::Chunked);
        assert!(r.rewrite, "Content-Length beside chunked is dropped");
        let r = response("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((r.framing, r.close), (Framing::UntilClose, true));
        let r = response("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false);
        assert!(r.close && r.rewrite);
        let r = response(
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
            false,
        );
        assert!(r.close && r.rewrite);
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false
            ),
            Err(BadResponse("conflicting Content-Length headers"))
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", false).is_err());
    }

    #[test]
    fn a_response_head_ends_at_its_first_empty_line() {
        for (raw, end) in [
            ("HTTP/1.1 200 OK\r\na: 1\r\n\r\nbody\n\n", Some(25)),
            ("HTTP/1.1 200 OK\na: 1\n\nbody", Some(22)),
            ("\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n", Some(31)),
            ("HTTP/1.1 200 OK\r\na: 1\r\n\r", None),
            ("\r\n\r\n", None),
        ] {
            assert_eq!(response_head_end(raw.as_bytes()), end, "{raw:?}");
            if let Some(end) = end {
                let parsed = parse_response(raw.as_bytes(), false).unwrap().unwrap();
                assert_eq!(parsed.len, end, "as httparse reads it: {raw:?}");
            }
        }
    }

    #[test]
    fn rewrites_responses_as_http11() {
        let raw = "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\ncontent-length: 1\r\n\r\n";
        let mut out = Vec::new();
        rewrite_response(raw.as_bytes(), true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn content_lengths_are_digits_only() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b" 42\t"), Some(42));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"  ",
            b"+1",
            b"-1",
            b"1 2",
            b"0x10",
            b"18446744073709551615",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Fuzzing regression (issue 22, fuzz/regressions/http1_request): an empty line
    /// before the request line, which httparse skips, ending in a bare LF.
    #[test]
    fn fuzz_regression_bare_lf_before_the_request_line() {
        for raw in [
            "\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
            "\r\n\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert_eq!(request(raw), Err(BARE_LF), "{raw:?}");
        }
        let raw = "\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(request(raw).unwrap().unwrap().len, raw.len());
    }

    /// Fuzzing regressions (issue 22, fuzz/regressions/http1_request and
    /// http1_response): a `Connection` header naming a header the message is framed
    /// or routed by must not remove it, or the next hop reads another message.
    #[test]
    fn fuzz_regression_connection_names_a_framing_header() {
        let raw = "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\nhello";
        let head = request(raw).unwrap().unwrap();
        let mut out = Vec::new();
        rewrite_request(raw.as_bytes(), &mut out, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
        );
        assert_eq!(head.content_length, 5);

        let raw = "GET / HTTP/1.1\r\nHost: web\r\nConnection: host\r\n\r\n";
        let mut out = Vec::new();
        rewrite_request(raw.as_bytes(), &mut out, None);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nHost: web\r\n\r\n"
        );

        for (raw, framing) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\n",
                Framing::Length(5),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: transfer-encoding\r\n\r\n",
                Framing::Chunked,
            ),
        ] {
            assert_eq!(response(raw, false).framing, framing);
            let mut out = Vec::new();
            rewrite_response(raw.as_bytes(), false, &mut out);
            let again = parse_response(&out, false).unwrap().unwrap();
            assert_eq!(
                again.framing,
                framing,
                "{:?}",
                String::from_utf8_lossy(&out)
            );
        }
    }
}
