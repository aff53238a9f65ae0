//! Bodies stream through the proxy in both directions: an echo server's first reply
//! chunk reaches the client while the client is still sending, over HTTP/1.1 and HTTP/2.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tandem::client::Connection;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(90);

type ChunkBody = StreamBody<ReceiverStream<Result<Frame<Bytes>, Infallible>>>;

/// Sends chunks one at a time and requires each to come back before sending the next.
async fn echo_interactively(
    send: impl AsyncFnOnce(Request<ChunkBody>) -> hyper::Response<hyper::body::Incoming>,
    uri: &str,
) {
    let (tx, rx) = mpsc::channel(1);
    let request = Request::post(uri)
        .header(http::header::HOST, "web")
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"first chunk"))))
        .await
        .unwrap();
    let response = tokio::time::timeout(STEP, send(request))
        .await
        .expect("response headers while the request body is still open");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for chunk in ["first chunk", "second chunk", "third chunk"] {
        if chunk != "first chunk" {
            tx.send(Ok(Frame::data(Bytes::from(chunk)))).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < chunk.len() {
            let frame = tokio::time::timeout(STEP, body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!("{chunk:?} was not echoed while the request was open: the proxy buffers")
                })
                .expect("a frame")
                .expect("no body error");
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
            }
        }
        assert_eq!(got, chunk.as_bytes());
    }
    drop(tx);
    let rest = tokio::time::timeout(STEP, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn bodies_stream_both_ways_over_http1_and_http2() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("streaming", &[1]).await;
        let addr = mesh.proxy_addr();

        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut h1, conn) = http1::handshake::<_, ChunkBody>(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        echo_interactively(
            async |req| h1.send_request(req).await.expect("HTTP/1 exchange"),
            "/echo",
        )
        .await;

        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut h2, conn) =
            http2::handshake::<_, _, ChunkBody>(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        echo_interactively(
            async |req| h2.send_request(req).await.expect("HTTP/2 exchange"),
            "http://web/echo",
        )
        .await;
    })
    .await
}

#[tokio::test]
async fn large_bodies_arrive_intact() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("large-body", &[1, 1]).await;
        let body: Bytes = (0..8 * 1024 * 1024u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        let mut h1 = mesh.connect().await;
        let mut h2 = Connection::http2(mesh.proxy_addr()).await.unwrap();
        for conn in [&mut h1, &mut h2] {
            for _ in 0..2 {
                let reply = conn
                    .send("POST", "web", "/echo", body.clone())
                    .await
                    .unwrap();
                assert_eq!(reply.status, 200);
                assert_eq!(reply.body.len(), body.len());
                assert!(reply.body == body, "echoed body differs");
            }
        }
    })
    .await
}
