//! Bodiless requests that arrived as header maps (HTTP/2 streams, requests hyper
//! parsed) sent to an HTTP/1 backend over the raw connections of the HTTP/1 path.
//!
//! hyper's client runs a task per connection and hands each request and response
//! through channels to it; for a small request and answer that costs more than the
//! exchange itself. Here the head is written and the response read in the request's
//! own task, over the same pooled sockets [`super::serve`] uses. Requests with a body
//! stay on hyper, which streams it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Method, Request, Response, Version, header};
use http_body::{Body, Frame, SizeHint};

use super::chunked::ChunkError;
use super::exchange::{self, BodyLeft, MIN_READ, RELAY_CHUNK, SendFailure};
use super::head::{self, BadResponse, Framing, ResponseHead};
use crate::body::{BoxError, ProxyBody};
use crate::forward::is_idempotent;
use crate::upstream::{RawConn, Upstream, UpstreamError};

/// Room the request head starts with: a typical head fits without growing.
const HEAD_CAPACITY: usize = 512;

/// Whether `req` goes this way: it has no body (nothing to stream), and is not a
/// CONNECT (a tunnel, which hyper handles).
pub fn fits(req: &Request<ProxyBody>) -> bool {
    req.body().is_end_stream()
        && req.method() != Method::CONNECT
        && req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_none_or(|length| length.as_bytes() == b"0")
}

/// Sends `req` (for which [`fits`] holds) and reads the response head; the body
/// follows as the response's body is read. The request is only read (its head is
/// written out at once), so it stays with the caller to be sent again after a
/// failure; [`UpstreamError::written`] says whether the backend may have seen it.
///
/// Not an `async fn`, which would keep its arguments (see [`Upstream::send`]).
pub fn send<'a>(
    upstream: &'a Arc<Upstream>,
    req: &Request<ProxyBody>,
) -> impl Future<Output = Result<Response<ProxyBody>, UpstreamError>> + use<'a> {
    let mut outgoing = Vec::with_capacity(HEAD_CAPACITY);
    write_head(req, &mut outgoing);
    let is_head = req.method() == Method::HEAD;
    let idempotent = is_idempotent(req.method().as_str());
    async move {
        let sent = exchange::send(upstream, &outgoing, is_head, idempotent).await;
        let result = match sent {
            Ok((conn, response)) => respond(upstream, conn, response, is_head).await,
            Err(failure) => Err(failure),
        };
        result.map_err(|failure| match failure {
            SendFailure::Connect(error) => error,
            written => UpstreamError::Http1(Box::new(written)),
        })
    }
}

/// The request head in HTTP/1.1: origin-form target, `Host` first, the other
/// headers as they are (HTTP/2 may split `cookie` in several fields: joined again,
/// RFC 9113 §8.2.3). `te` is left out: only `trailers` survives to here, and this
/// path does not forward response trailers.
fn write_head(req: &Request<ProxyBody>, out: &mut Vec<u8>) {
    out.extend_from_slice(req.method().as_str().as_bytes());
    out.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()));
    if let Some(host) = host {
        head::push_header(out, b"host", host);
    }
    let mut cookies_written = false;
    for (name, value) in headers {
        if name == header::HOST || name == header::TE || name == header::CONTENT_LENGTH {
            continue;
        }
        if name == header::COOKIE {
            if !cookies_written {
                write_cookies(headers, out);
                cookies_written = true;
            }
            continue;
        }
        head::push_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // A server may wait for a body of a POST that does not say it has none.
    if matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: 0\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

fn write_cookies(headers: &HeaderMap, out: &mut Vec<u8>) {
    out.extend_from_slice(b"cookie: ");
    for (i, value) in headers.get_all(header::COOKIE).iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b"; ");
        }
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// The response for `response`, whose head starts `conn.buf`. Interim (1xx) heads
/// before it are skipped: nothing here asked for them.
async fn respond(
    upstream: &Arc<Upstream>,
    mut conn: RawConn,
    mut response: ResponseHead,
    is_head: bool,
) -> Result<Response<ProxyBody>, SendFailure> {
    while (100..200).contains(&response.status) {
        if response.status == 101 {
            return Err(SendFailure::BadResponse(BadResponse(
                "switched protocols without being asked to",
            )));
        }
        conn.buf.advance(response.len);
        response = exchange::read_head(&mut conn, is_head).await?;
    }
    let head_bytes = conn.buf.split_to(response.len).freeze();
    let (status, headers) = head::response_parts(&head_bytes).map_err(SendFailure::BadResponse)?;
    let body = match response.framing {
        Framing::Empty => {
            finish(upstream, conn, response.close);
            ProxyBody::Empty
        }
        // The whole body is here already (the common small answer): no streaming.
        Framing::Length(n) if conn.buf.len() as u64 >= n => {
            let data = conn.buf.split_to(n as usize).freeze();
            finish(upstream, conn, response.close);
            ProxyBody::Full(Some(data))
        }
        framing => ProxyBody::Http1(Box::new(ResponseBody {
            upstream: upstream.clone(),
            conn: Some(conn),
            left: BodyLeft::new(framing),
            close: response.close,
        })),
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Pools the connection after a response read to its end, unless the server will
/// close it or sent more than the response (which no request of ours asked for).
fn finish(upstream: &Upstream, conn: RawConn, close: bool) {
    if !close && conn.buf.is_empty() {
        upstream.release_raw(conn);
    }
}

/// A response body read from a raw connection as it arrives, chunked framing
/// removed (the other side frames it itself). The connection goes back to the pool
/// when the body ends, and is closed if the body is abandoned or broken.
pub struct ResponseBody {
    upstream: Arc<Upstream>,
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
                finish(&self.upstream, conn, self.close);
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

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut()
            .poll_data(cx)
            .map(|data| data.map(|d| d.map(Frame::data).map_err(Into::into)))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::UpstreamSettings;
    use http::StatusCode;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend that answers one request with `answer`, then closes if `close`.
    /// Returns its address and the request head it received.
    async fn backend(
        answer: &'static [u8],
        close: bool,
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                stream.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            stream.write_all(answer).await.unwrap();
            if !close {
                // Keep the connection open until the test is done with it.
                let _ = stream.read(&mut [0u8; 1]).await;
            }
            String::from_utf8(head).unwrap()
        });
        (addr, task)
    }

    fn upstream(addr: std::net::SocketAddr) -> Arc<Upstream> {
        Upstream::new(addr, Arc::new(UpstreamSettings::default()))
    }

    fn get(uri: &str) -> Request<ProxyBody> {
        Request::get(uri)
            .header(header::HOST, "web")
            .body(ProxyBody::Empty)
            .unwrap()
    }

    #[tokio::test]
    async fn decodes_chunked_after_an_interim_head_and_pools_the_connection() {
        let (addr, _backend) = backend(
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
              HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: keep-alive\r\nx-a: 1\r\n\r\n\
              5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            false,
        )
        .await;
        let upstream = upstream(addr);
        let response = send(&upstream, &get("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-a"], "1");
        assert!(!response.headers().contains_key(header::TRANSFER_ENCODING));
        assert!(!response.headers().contains_key(header::CONNECTION));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello world");
        assert_eq!(upstream.idle_connections(), 1, "read to its end: pooled");
    }

    #[tokio::test]
    async fn a_body_until_close_ends_with_the_connection() {
        let (addr, _backend) = backend(b"HTTP/1.1 200 OK\r\n\r\nall of it", true).await;
        let upstream = upstream(addr);
        let response = send(&upstream, &get("/")).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"all of it");
        assert_eq!(upstream.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_truncated_body_is_an_error_not_a_short_answer() {
        let (addr, _backend) =
            backend(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", true).await;
        let upstream = upstream(addr);
        let response = send(&upstream, &get("/")).await.unwrap();
        let error = response.into_body().collect().await.expect_err("an error");
        assert!(error.to_string().contains("closed"), "{error}");
        assert_eq!(upstream.idle_connections(), 0);
    }

    #[tokio::test]
    async fn writes_an_http1_head_from_an_http2_request() {
        let (addr, backend) = backend(b"HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let upstream = upstream(addr);
        let req = Request::post("http://web.default:80/p?q=1")
            .version(Version::HTTP_2)
            .header(header::COOKIE, "a=1")
            .header(header::COOKIE, "b=2")
            .header(header::TE, "trailers")
            .body(ProxyBody::Empty)
            .unwrap();
        let response = send(&upstream, &req).await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(upstream.idle_connections(), 1);
        drop(upstream);
        let head = backend.await.unwrap();
        assert_eq!(
            head,
            "POST /p?q=1 HTTP/1.1\r\nhost: web.default:80\r\ncookie: a=1; b=2\r\n\
             content-length: 0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_refused_connection_is_not_written() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let slot = Some(get("/"));
        let Err(error) = send(&upstream(addr), slot.as_ref().unwrap()).await else {
            panic!("no response can come");
        };
        assert!(
            !error.written(&slot),
            "nothing was sent: it may go elsewhere"
        );
    }

    #[tokio::test]
    async fn a_backend_that_hangs_up_after_the_request_has_seen_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the request arrives before the hang-up");
        });
        let slot = Some(get("/"));
        let Err(error) = send(&upstream(addr), slot.as_ref().unwrap()).await else {
            panic!("no response can come");
        };
        backend.await.unwrap();
        assert!(
            error.written(&slot),
            "written: only an idempotent request goes again"
        );
        assert!(
            slot.is_some(),
            "kept, so it can be sent again without a copy"
        );
    }

    #[test]
    fn only_bodiless_requests_fit() {
        assert!(fits(&get("/")));
        let with_body = Request::post("/").body(ProxyBody::text("x")).unwrap();
        assert!(!fits(&with_body));
        let connect = Request::connect("web:443").body(ProxyBody::Empty).unwrap();
        assert!(!fits(&connect));
    }
}
