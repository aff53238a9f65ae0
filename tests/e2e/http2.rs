//! The proxy's HTTP/2 path, with a plain h2 client: what a client notices when it
//! cancels a stream, goes quiet, or is connected while the proxy shuts down, what
//! happens when an HTTP/2 backend restarts, and HTTP/1.1 clients carried over HTTP/2.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(60);

/// An h2c connection to `addr`, and the task driving it (it ends when the connection does).
async fn connect(addr: SocketAddr) -> (SendRequest<Bytes>, JoinHandle<Result<(), h2::Error>>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.expect("h2c handshake");
    (send, tokio::spawn(conn))
}

/// Starts `GET path` on the connection; returns the response future and stream.
fn start_get(
    send: &mut SendRequest<Bytes>,
    path: &str,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
    let req = Request::get(format!("http://web{path}")).body(()).unwrap();
    send.send_request(req, true)
}

/// `GET path`, read to the end: status, the answering instance, and the body.
async fn get(send: &SendRequest<Bytes>, path: &str) -> Result<(StatusCode, String), h2::Error> {
    let mut send = send.clone().ready().await?;
    let (response, _) = start_get(&mut send, path)?;
    let response = response.await?;
    let status = response.status();
    let instance = response
        .headers()
        .get("x-tandem-instance")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    read_body(response.into_body()).await?;
    Ok((status, instance))
}

/// A response body, read to its end, giving the window back as it goes.
async fn read_body(mut body: h2::RecvStream) -> Result<Vec<u8>, h2::Error> {
    let mut read = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        read.extend_from_slice(&chunk);
    }
    Ok(read)
}

/// Waits until the proxy reports a request waiting for its backend (`some`), or none.
async fn wait_in_flight(admin: SocketAddr, some: bool) {
    let what = if some {
        "a request in flight"
    } else {
        "no request in flight"
    };
    eventually(Duration::from_secs(5), what, || async {
        let metrics = admin_get(admin, "/metrics").await;
        let busy = metric(&metrics, "tandem_proxy_requests_in_flight") > 0.0;
        (busy == some).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_reset_stream_is_cancelled_alone_and_the_connection_serves_on() {
    bounded(LIMIT, async {
        let a = backend("instance-1").await;
        let proxy = static_proxy(&[a.addr("http")], &["--backend-protocol", "http2"]).await;
        let (send, _driver) = connect(proxy.addr("proxy")).await;

        // A slow request, cancelled by the client before its answer.
        let mut slow = send.clone().ready().await.unwrap();
        let (response, mut stream) = start_get(&mut slow, "/delay/30000").unwrap();
        wait_in_flight(proxy.addr("admin"), true).await;
        stream.send_reset(h2::Reason::CANCEL);
        let cancelled = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("the cancelled stream ends at once");
        assert!(cancelled.is_err(), "a reset stream has no response");

        // The same connection answers the next requests.
        for _ in 0..3 {
            let (status, instance) = get(&send, "/").await.expect("served after a reset");
            assert_eq!(status, StatusCode::OK);
            assert_eq!(instance, "instance-1");
        }
        // And the cancelled request is not left in flight upstream.
        wait_in_flight(proxy.addr("admin"), false).await;
    })
    .await
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_goaway() {
    bounded(LIMIT, async {
        let a = backend("instance-1").await;
        let proxy = static_proxy(&[a.addr("http")], &["--idle-timeout", "1s"]).await;
        let (send, driver) = connect(proxy.addr("proxy")).await;
        let (status, _) = get(&send, "/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        // Quiet from here on: the proxy says GOAWAY and closes; the client's
        // connection ends without an error.
        let ended = tokio::time::timeout(Duration::from_secs(10), driver)
            .await
            .expect("the proxy closes an idle HTTP/2 connection");
        ended.unwrap().expect("closed cleanly, with GOAWAY");
        assert!(
            get(&send, "/").await.is_err(),
            "no new streams after GOAWAY"
        );
    })
    .await
}

#[tokio::test]
async fn shutdown_lets_open_streams_finish() {
    bounded(LIMIT, async {
        let a = backend("instance-1").await;
        let mut proxy = static_proxy(&[a.addr("http")], &["--backend-protocol", "http2"]).await;
        let (send, driver) = connect(proxy.addr("proxy")).await;
        let in_flight = {
            let send = send.clone();
            tokio::spawn(async move { get(&send, "/delay/500").await })
        };
        wait_in_flight(proxy.addr("admin"), true).await;

        let mut admin = TcpStream::connect(proxy.addr("admin")).await.unwrap();
        admin
            .write_all(b"POST /shutdown HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        admin.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 2"), "{answer}");

        let (status, instance) = in_flight
            .await
            .unwrap()
            .expect("the open stream finishes during shutdown");
        assert_eq!((status, instance.as_str()), (StatusCode::OK, "instance-1"));
        tokio::time::timeout(Duration::from_secs(10), driver)
            .await
            .expect("the connection is closed after its last stream")
            .unwrap()
            .expect("closed cleanly, with GOAWAY");
        wait_exit(&mut proxy, Duration::from_secs(10)).await;
    })
    .await
}

#[tokio::test]
async fn a_restarted_http2_backend_is_dialled_again() {
    bounded(LIMIT, async {
        let mut a = backend("instance-1").await;
        let addr = a.addr("http");
        let proxy = static_proxy(&[addr], &["--backend-protocol", "http2"]).await;
        let (send, _driver) = connect(proxy.addr("proxy")).await;
        assert_eq!(get(&send, "/").await.unwrap().0, StatusCode::OK);

        // The backend goes away with the proxy's connection to it, and comes back
        // on the same address.
        a.kill().await;
        let (status, _) = get(&send, "/").await.unwrap();
        assert_eq!(
            status,
            StatusCode::BAD_GATEWAY,
            "nothing to answer meanwhile"
        );
        let listen = addr.to_string();
        let _again = backend_with("instance-1", &["--listen", &listen]).await;
        eventually(
            Duration::from_secs(10),
            "requests to reach the restarted backend",
            || {
                let send = send.clone();
                async move {
                    let (status, _) = get(&send, "/").await.ok()?;
                    (status == StatusCode::OK).then_some(())
                }
            },
        )
        .await;
    })
    .await
}

#[tokio::test]
async fn a_burst_beyond_a_backends_stream_limit_waits_instead_of_failing() {
    bounded(LIMIT, async {
        let a = backend_with("instance-1", &["--max-concurrent-streams", "2"]).await;
        let proxy = static_proxy(&[a.addr("http")], &["--backend-protocol", "http2"]).await;
        let (send, _driver) = connect(proxy.addr("proxy")).await;
        // Six requests at once, before the proxy has any connection to the backend,
        // which allows two streams at a time: the proxy learns the limit before it
        // sends (a request past it would be refused), and the rest wait their turn.
        let burst: Vec<_> = (0..6)
            .map(|_| {
                let send = send.clone();
                tokio::spawn(async move { get(&send, "/delay/200").await })
            })
            .collect();
        for request in burst {
            let (status, instance) = request.await.unwrap().expect("answered");
            assert_eq!((status, instance.as_str()), (StatusCode::OK, "instance-1"));
        }
        let config = config(proxy.addr("admin")).await;
        let endpoint = &config["destinations"][0]["endpoints"][0];
        assert_eq!(endpoint["http2_connections"], 1, "{endpoint}");
    })
    .await
}

#[tokio::test]
async fn a_client_with_a_small_window_gets_whole_large_responses() {
    bounded(LIMIT, async {
        // The proxy hands a body's last frame to h2 at once, whatever the client's
        // window: h2 must still send it only as the client opens the window.
        const LEN: usize = 300_000;
        let a = backend("instance-1").await;
        for protocol in ["http1", "http2"] {
            let proxy = static_proxy(&[a.addr("http")], &["--backend-protocol", protocol]).await;
            let tcp = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
            let (send, conn) = h2::client::Builder::new()
                .initial_window_size(1024)
                .initial_connection_window_size(1024)
                .handshake::<_, Bytes>(tcp)
                .await
                .expect("h2c handshake");
            let _driver = tokio::spawn(conn);
            for _ in 0..3 {
                let mut send = send.clone().ready().await.unwrap();
                let (response, _) = start_get(&mut send, &format!("/bytes/{LEN}")).unwrap();
                let response = response.await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let body = read_body(response.into_body()).await.unwrap();
                assert_eq!(
                    body.len(),
                    LEN,
                    "the whole body, over an {protocol} backend"
                );
                assert!(body.iter().all(|&b| b == b'x'));
            }
        }
    })
    .await
}

#[tokio::test]
async fn http1_clients_are_carried_over_http2_to_the_backends() {
    bounded(LIMIT, async {
        // As Linkerd does between proxies: HTTP/1.1 in, multiplexed HTTP/2 out.
        let a = logging_backend("instance-1").await;
        let b = logging_backend("instance-2").await;
        let proxy = static_proxy(
            &[a.addr("http"), b.addr("http")],
            &["--backend-protocol", "http2"],
        )
        .await;
        let mut conn = tandem::client::Connection::http1(proxy.addr("proxy"))
            .await
            .unwrap();
        let seen = instances(&mut conn, "web", 4).await;
        assert_alternates(&seen, "requests over one HTTP/1.1 client connection");

        let upload = Bytes::from(vec![b'u'; 100_000]);
        let echoed = conn
            .send("POST", "web", "/echo", upload.clone())
            .await
            .unwrap();
        assert_eq!(echoed.status, StatusCode::OK);
        assert_eq!(echoed.body, upload, "a request body, whole, both ways");
        // A small body stays on the proxy's own HTTP/1 path, which reads it whole.
        let small = conn
            .send("POST", "web", "/echo", Bytes::from_static(b"small"))
            .await
            .unwrap();
        assert_eq!(
            (small.status, &small.body[..]),
            (StatusCode::OK, &b"small"[..])
        );

        let chunks = conn.get("web", "/chunks/50").await.unwrap();
        assert_eq!(chunks.status, StatusCode::OK);
        assert_eq!(chunks.text().lines().count(), 50);
        assert_eq!(chunks.text().lines().last(), Some("chunk 49"));

        // Both backends saw HTTP/2, and only HTTP/2.
        for backend in [&a, &b] {
            let log = eventually(STEP, "the backend's request log", || async {
                let log = backend.log_text();
                (log.matches("served").count() >= 3).then_some(log)
            })
            .await;
            for line in log.lines().filter(|l| l.contains("served")) {
                assert!(line.ends_with("(HTTP/2.0)"), "not over HTTP/2: {line}");
            }
        }
    })
    .await
}

#[tokio::test]
async fn http2_clients_reach_http1_backends_with_every_response_shape() {
    bounded(LIMIT, async {
        // The common mesh case: gRPC-era clients speak HTTP/2, the apps behind
        // the proxy speak HTTP/1.1. Bodiless requests go over the proxy's own
        // pooled HTTP/1 connections; each stream is still balanced on its own.
        let a = logging_backend("instance-1").await;
        let b = logging_backend("instance-2").await;
        let proxy = static_proxy(
            &[a.addr("http"), b.addr("http")],
            &["--backend-protocol", "http1"],
        )
        .await;
        let (send, _driver) = connect(proxy.addr("proxy")).await;
        let mut seen = Vec::new();
        for _ in 0..6 {
            let (status, instance) = get(&send, "/").await.unwrap();
            assert_eq!(status, StatusCode::OK);
            seen.push(instance);
        }
        assert_alternates(
            &seen,
            "streams of one HTTP/2 connection to HTTP/1.1 backends",
        );

        let one = |req: Request<()>| {
            let send = send.clone();
            async move {
                let mut send = send.ready().await.unwrap();
                let (response, _) = send.send_request(req, true).unwrap();
                let response = response.await.unwrap();
                let (head, body) = response.into_parts();
                (head, read_body(body).await.unwrap())
            }
        };

        // A chunked answer arrives decoded (HTTP/2 frames it itself).
        let (head, body) = one(Request::get("http://web/chunks/50").body(()).unwrap()).await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(!head.headers.contains_key("transfer-encoding"));
        let text = String::from_utf8(body).unwrap();
        assert_eq!(text.lines().count(), 50);
        assert_eq!(text.lines().last(), Some("chunk 49"));

        // A large one streams through whole.
        let (_, body) = one(Request::get("http://web/bytes/1000000").body(()).unwrap()).await;
        assert_eq!(body.len(), 1_000_000);
        assert!(body.iter().all(|&b| b == b'x'));

        // HEAD and 204 have no body, whatever their headers say.
        let (head, body) = one(Request::head("http://web/").body(()).unwrap()).await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(body.is_empty());
        let (head, body) = one(Request::get("http://web/status/204").body(()).unwrap()).await;
        assert_eq!(head.status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());

        // HTTP/2 may split cookies in several fields; HTTP/1.1 gets them in one.
        let req = Request::get("http://web/headers")
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("x-custom", "kept")
            .body(())
            .unwrap();
        let (_, body) = one(req).await;
        let headers = String::from_utf8(body).unwrap();
        assert!(headers.contains("cookie: a=1; b=2\n"), "{headers}");
        assert!(headers.contains("host: web\n"), "{headers}");
        assert!(headers.contains("x-custom: kept\n"), "{headers}");

        // Both backends saw HTTP/1.1, and only HTTP/1.1.
        for backend in [&a, &b] {
            let log = eventually(STEP, "the backend's request log", || async {
                let log = backend.log_text();
                (log.matches("served").count() >= 4).then_some(log)
            })
            .await;
            for line in log.lines().filter(|l| l.contains("served")) {
                assert!(line.ends_with("(HTTP/1.1)"), "not over HTTP/1.1: {line}");
            }
        }
    })
    .await
}
