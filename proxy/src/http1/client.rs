//! Bodiless requests that arrived as header maps (HTTP/2 streams, requests hyper
//! parsed) sent to an HTTP/1 backend over the raw connections of the HTTP/1 path.
//!
//! hyper's client runs a task per connection and hands each request and response
//! through channels to it; for a small request and answer that costs more than the
//! exchange itself. Here the head is written and the response read in the request's
//! own task, over the same pooled sockets [`super::serve`] uses. Requests with a body
//! stay on hyper, which streams it.

use std::sync::Arc;

use http::{HeaderMap, Method, Request, Response, Version, header};
use http_body::Body;

use super::body::ResponseBody;
use super::exchange::{self, BodyLeft, SendFailure};
use super::head::{self, BadResponse, Framing};
use super::pool::{RawConn, RawPool};
use crate::body::ProxyBody;
use crate::shared::is_idempotent;

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
/// failure; [`SendFailure::unsent`] says whether the backend may have seen it. A
/// failure is the caller's error `E` (the upstream's), made where it happens.
///
/// Not an `async fn`, which would keep its arguments (see
/// [`Upstream::send`](crate::upstream::Upstream::send)).
pub fn send<'a, E: From<SendFailure>>(
    pool: &'a Arc<RawPool>,
    req: &Request<ProxyBody>,
) -> impl Future<Output = Result<Response<ProxyBody>, E>> + use<'a, E> {
    let mut outgoing = Vec::with_capacity(HEAD_CAPACITY);
    write_head(req, &mut outgoing);
    let is_head = req.method() == Method::HEAD;
    let idempotent = is_idempotent(req.method().as_str());
    async move {
        // The head is parsed once it is whole, and once: into the response's header map.
        let sent = exchange::send_with(pool, &outgoing, idempotent, head_end).await;
        let result = match sent {
            Ok((conn, head_len)) => respond(pool, conn, head_len, is_head).await,
            Err(failure) => Err(failure),
        };
        result.map_err(E::from)
    }
}

/// The request head in HTTP/1.1: origin-form target, `Host` first (the target's
/// authority whatever Host said, RFC 9112 §3.2.2; Host when it has none), the other
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
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| headers.get(header::HOST).map(|h| h.as_bytes()));
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

/// Where the response head at the start of `buf` ends, once it is all there.
fn head_end(buf: &[u8]) -> Result<Option<usize>, BadResponse> {
    Ok(head::response_head_end(buf))
}

/// The response whose head, `head_len` bytes, starts `conn.buf`. Interim (1xx)
/// heads before it are skipped: nothing here asked for them.
async fn respond(
    pool: &Arc<RawPool>,
    mut conn: RawConn,
    mut head_len: usize,
    is_head: bool,
) -> Result<Response<ProxyBody>, SendFailure> {
    let (response, status, headers) = loop {
        // In a block: an interim head's parts are not kept while the next one is read.
        let switched = {
            let head_bytes = conn.buf.split_to(head_len).freeze();
            match head::parse_response_parts(&head_bytes, is_head) {
                Ok(parts) if !(100..200).contains(&parts.0.status) => break parts,
                Ok(parts) => parts.0.status == 101,
                // An interim head is skipped whatever its headers, as before a map
                // was made of every head.
                Err(bad) => match head::parse_response(&head_bytes, is_head) {
                    Ok(Some(interim)) if (100..200).contains(&interim.status) => {
                        interim.status == 101
                    }
                    _ => return Err(SendFailure::BadResponse(bad)),
                },
            }
        };
        if switched {
            return Err(SendFailure::BadResponse(BadResponse(
                "switched protocols without being asked to",
            )));
        }
        head_len = exchange::read_head_with(&mut conn, head_end).await?;
    };
    let body = match response.framing {
        Framing::Empty => {
            pool.finish(conn, response.close);
            ProxyBody::Empty
        }
        // The whole body is here already (the common small answer): no streaming.
        Framing::Length(n) if conn.buf.len() as u64 >= n => {
            let data = conn.buf.split_to(n as usize).freeze();
            pool.finish(conn, response.close);
            ProxyBody::Full(Some(data))
        }
        framing => ProxyBody::Http1(Box::new(ResponseBody::new(
            pool.clone(),
            conn,
            BodyLeft::new(framing),
            response.close,
        ))),
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.version_mut() = Version::HTTP_11;
    *out.headers_mut() = headers;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::UpstreamSettings;
    use crate::upstream::UpstreamError;
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

    fn pool(addr: std::net::SocketAddr) -> Arc<RawPool> {
        Arc::new(RawPool::new(
            addr,
            Arc::new(UpstreamSettings::default()),
            Default::default(),
        ))
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
        let pool = pool(addr);
        let response = send::<UpstreamError>(&pool, &get("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-a"], "1");
        assert!(!response.headers().contains_key(header::TRANSFER_ENCODING));
        assert!(!response.headers().contains_key(header::CONNECTION));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello world");
        assert_eq!(pool.idle(), 1, "read to its end: pooled");
    }

    #[tokio::test]
    async fn a_body_until_close_ends_with_the_connection() {
        let (addr, _backend) = backend(b"HTTP/1.1 200 OK\r\n\r\nall of it", true).await;
        let pool = pool(addr);
        let response = send::<UpstreamError>(&pool, &get("/")).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"all of it");
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn a_truncated_body_is_an_error_not_a_short_answer() {
        let (addr, _backend) =
            backend(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", true).await;
        let pool = pool(addr);
        let response = send::<UpstreamError>(&pool, &get("/")).await.unwrap();
        let error = response.into_body().collect().await.expect_err("an error");
        assert!(error.to_string().contains("closed"), "{error}");
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn writes_an_http1_head_from_an_http2_request() {
        let (addr, backend) = backend(b"HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let pool = pool(addr);
        let req = Request::post("http://web.default:80/p?q=1")
            .version(Version::HTTP_2)
            .header(header::COOKIE, "a=1")
            .header(header::COOKIE, "b=2")
            .header(header::TE, "trailers")
            .body(ProxyBody::Empty)
            .unwrap();
        let response = send::<UpstreamError>(&pool, &req).await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert_eq!(pool.idle(), 1);
        drop(pool);
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
        let Err(error) = send::<UpstreamError>(&pool(addr), slot.as_ref().unwrap()).await else {
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
        let Err(error) = send::<UpstreamError>(&pool(addr), slot.as_ref().unwrap()).await else {
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
    fn the_head_names_the_targets_authority_in_origin_form() {
        let req = Request::get("http://web:80/a?b=1")
            .header(header::HOST, "elsewhere")
            .header("x-app", "1")
            .body(ProxyBody::Empty)
            .unwrap();
        let mut out = Vec::new();
        write_head(&req, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nhost: web:80\r\nx-app: 1\r\n\r\n"
        );
        let req = Request::get("/a")
            .header(header::HOST, "web")
            .body(ProxyBody::Empty)
            .unwrap();
        let mut out = Vec::new();
        write_head(&req, &mut out);
        assert_eq!(out, b"GET /a HTTP/1.1\r\nhost: web\r\n\r\n");
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
