//! The proxy's own HTTP/1.1 path, seen from a client speaking raw HTTP/1.1: what it
//! must get right that a well-behaved client library would hide (pipelining, framing,
//! hop-by-hop headers, handing a connection over to hyper mid-way, backends that close
//! pooled connections).

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(60);
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: web\r\n\r\n";

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_balanced_one_by_one() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&[]).await;
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        // Four requests in one write, the last a HEAD.
        let mut batch = GET.repeat(3);
        batch.extend_from_slice(b"HEAD / HTTP/1.1\r\nHost: web\r\n\r\n");
        client.send(&batch).await;
        let mut seen = Vec::new();
        for i in 0..4 {
            let r = client.response(i == 3).await;
            assert_eq!(r.status, 200, "request {i}");
            if i < 3 {
                assert_eq!(r.text().trim(), r.header("x-tandem-instance").unwrap());
            }
            seen.push(r.header("x-tandem-instance").unwrap().to_string());
        }
        assert_alternates(&seen, "requests over one raw connection");
        // The HEAD answer had no body: the connection is still in step.
        client.send(GET).await;
        assert_eq!(client.response(false).await.status, 200);
    })
    .await;
}

#[tokio::test]
async fn one_connection_moves_to_hyper_for_a_chunked_upload_and_keeps_balancing() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&[]).await;
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client.send(GET).await;
        let first = client.response(false).await;
        client
            .send(b"POST /echo HTTP/1.1\r\nHost: web\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            .await;
        let echo = client.response(false).await;
        assert_eq!((echo.status, echo.text().as_str()), (200, "hello world"));
        client.send(GET).await;
        let third = client.response(false).await;
        let who: Vec<&str> = [&first, &echo, &third]
            .iter()
            .map(|r| r.header("x-tandem-instance").unwrap())
            .collect();
        assert_eq!(who[0], who[2], "the same balancer before and after: {who:?}");
        assert_ne!(who[0], who[1], "{who:?}");
        // A large upload also goes to hyper, and arrives whole.
        let body = vec![b'x'; 1 << 20];
        let mut request =
            format!("POST /echo HTTP/1.1\r\nHost: web\r\ncontent-length: {}\r\n\r\n", body.len())
                .into_bytes();
        request.extend_from_slice(&body);
        client.send(&request).await;
        let echo = client.response(false).await;
        assert_eq!(echo.body.len(), body.len());
    })
    .await;
}

#[tokio::test]
async fn hop_by_hop_headers_stop_at_the_proxy() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&[]).await;
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client
            .send(b"GET /headers HTTP/1.1\r\nHost: web\r\nConnection: keep-alive, x-secret\r\nx-secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nx-app: kept\r\n\r\n")
            .await;
        let seen = client.response(false).await.text().to_lowercase();
        assert!(seen.contains("x-app: kept"), "{seen}");
        for gone in ["x-secret", "keep-alive", "proxy-connection", "te:", "connection"] {
            assert!(!seen.contains(gone), "{gone} reached the backend: {seen}");
        }
        // Small bodies with a Content-Length stay on the proxy's own path.
        client
            .send(b"POST /echo HTTP/1.1\r\nHost: web\r\ncontent-length: 4\r\n\r\nping")
            .await;
        assert_eq!(client.response(false).await.text(), "ping");
    })
    .await;
}

#[tokio::test]
async fn responses_are_framed_exactly_whatever_their_shape() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&[]).await;
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        for (path, status) in [
            ("/status/204", 204),
            ("/status/304", 304),
            ("/status/404", 404),
        ] {
            client
                .send(format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes())
                .await;
            assert_eq!(client.response(false).await.status, status, "{path}");
        }
        client
            .send(b"GET /chunks/50 HTTP/1.1\r\nHost: web\r\n\r\n")
            .await;
        let chunked = client.response(false).await;
        let expected: String = (0..50).map(|i| format!("chunk {i}\n")).collect();
        assert_eq!(chunked.text(), expected);
        let n = 3 * 1024 * 1024 + 7;
        client
            .send(format!("GET /bytes/{n} HTTP/1.1\r\nHost: web\r\n\r\n").as_bytes())
            .await;
        let large = client.response(false).await;
        assert_eq!(large.body.len(), n);
        assert!(large.body.iter().all(|b| *b == b'x'));
        // Still in step after all of that.
        client.send(GET).await;
        assert_eq!(client.response(false).await.status, 200);
    })
    .await;
}

#[tokio::test]
async fn connection_close_and_malformed_requests_are_handled_like_a_server_would() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&[]).await;
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client
            .send(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            .await;
        let r = client.response(false).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(
            client.closed().await,
            "the proxy closes after Connection: close"
        );

        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client
            .send(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
            .await;
        assert_eq!(client.response(false).await.status, 400);

        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client.send(GET).await;
        assert_eq!(
            client.response(false).await.status,
            200,
            "the proxy is still up"
        );
    })
    .await;
}

/// A backend that closes every connection right after its response, without saying
/// so: each pooled connection the proxy keeps is dead by the time it is reused.
async fn closing_backend() -> SocketAddr {
    raw_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-tandem-instance: closing\r\n\r\nok")
        .await
}

#[tokio::test]
async fn a_backend_that_closes_its_connections_costs_no_get() {
    bounded(LIMIT, async {
        let addr = closing_backend().await;
        let proxy = static_proxy(&[addr], &[]).await;
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        for i in 0..100 {
            client.send(GET).await;
            let r = client.response(false).await;
            assert_eq!((r.status, r.text().as_str()), (200, "ok"), "request {i}");
        }
    })
    .await;
}
