//! What a hostile client or a hung backend can make the proxy do, seen from outside:
//! a malformed request is the client's fault (400) and never the backend's, heads
//! must arrive in time and parse one way only, client connections are capped,
//! a request waits for a hung backend for a bounded time, upgrades work end to end,
//! and a shutdown answers every request that reached the proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tandem::process::Spawned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Asserts that no backend was charged with a failure or ejected, and that both
/// still take requests in turn.
async fn no_backend_blamed(proxy: &Spawned) {
    let config = config(proxy.addr("admin")).await;
    let endpoints = endpoints(&config);
    assert_eq!(endpoints.len(), 2, "{config:#}");
    for e in &endpoints {
        assert_eq!(e["failures"], 0, "a backend was charged: {e:#}");
        assert_eq!(e["ejected"], false, "a backend was ejected: {e:#}");
    }
    let mut conn = tandem::client::Connection::http1(proxy.addr("proxy"))
        .await
        .unwrap();
    let seen = instances(&mut conn, "web", 6).await;
    assert_alternates(&seen, "after the malformed requests");
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_fault_not_the_backends() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&["--outlier-consecutive-failures", "3"]).await;
        // To a backend that answers only once it has the whole body, so the proxy
        // meets the malformed chunk before any answer.
        let head = b"POST /sink HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n";
        let bodies: [(&str, &[u8]); 5] = [
            ("not hex", b"zz\r\nhello\r\n0\r\n\r\n"),
            ("17 hex digits", b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
            ("negative", b"-5\r\nhello\r\n0\r\n\r\n"),
            ("bare LF", b"5\nhello\n0\n\n"),
            ("shorter than its size", b"5\r\nab"),
        ];
        for round in 0..3 {
            for (what, body) in bodies {
                let mut client = Raw::connect(proxy.addr("proxy")).await;
                client.send(head).await;
                client.send(body).await;
                if what == "shorter than its size" {
                    // The client stops sending in the middle of a chunk.
                    client.stream.shutdown().await.unwrap();
                }
                let r = client.response(false).await;
                assert_eq!(
                    (r.status, r.header("x-tandem-error")),
                    (400, Some("bad_request")),
                    "round {round}, chunk size {what}: {}",
                    r.text()
                );
            }
        }

        // An HTTP/2 client that gives up on its uploads is not the backends' fault either.
        let tcp = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        for _ in 0..10 {
            let mut send = send.clone().ready().await.unwrap();
            let request = http::Request::post("http://web/sink").body(()).unwrap();
            let (response, mut body) = send.send_request(request, false).unwrap();
            body.send_data(Bytes::from_static(b"part of it"), false)
                .unwrap();
            body.send_reset(h2::Reason::CANCEL);
            let _ = response.await;
        }
        no_backend_blamed(&proxy).await;
    })
    .await
}

/// A WebSocket client on `stream` (already connected to the proxy) for `ws://web/ws`.
async fn websocket(stream: TcpStream) -> (tokio_tungstenite::WebSocketStream<TcpStream>, String) {
    let (ws, response) = tokio_tungstenite::client_async("ws://web/ws", stream)
        .await
        .expect("the WebSocket handshake through the proxy");
    assert_eq!(response.status(), 101);
    let instance = response.headers()["x-tandem-instance"]
        .to_str()
        .unwrap()
        .to_string();
    (ws, instance)
}

async fn echoes(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let echo = tokio::time::timeout(STEP, ws.next())
        .await
        .expect("an echo in time")
        .expect("the WebSocket stays open")
        .expect("a valid message");
    assert_eq!(echo, Message::text(text));
}

#[tokio::test]
async fn websockets_work_end_to_end_and_are_balanced_when_opened() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&[]).await;
        let mut opened = Vec::new();
        for i in 0..4 {
            let tcp = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
            let (mut ws, instance) = websocket(tcp).await;
            echoes(&mut ws, &format!("hello {i}")).await;
            opened.push((ws, instance));
        }
        let who: Vec<&String> = opened.iter().map(|(_, i)| i).collect();
        assert_alternates(&who, "WebSockets opened one after another");
        // Every one of them still carries bytes both ways, whatever the others do.
        for (i, (ws, _)) in opened.iter_mut().enumerate().rev() {
            echoes(ws, &"x".repeat(100_000 + i)).await;
        }
        for (mut ws, _) in opened {
            ws.close(None).await.unwrap();
            // The backend's close comes back through the proxy, then the end.
            while let Ok(Some(Ok(_))) = tokio::time::timeout(STEP, ws.next()).await {}
        }

        // An upgrade later in a connection that an earlier request moved off the
        // proxy's fast path works too.
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client
            .send(b"POST /echo HTTP/1.1\r\nHost: web\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
            .await;
        assert_eq!(client.response(false).await.text(), "hi");
        let (mut ws, _) = websocket(client.stream).await;
        echoes(&mut ws, "after a chunked upload").await;
    })
    .await
}

#[tokio::test]
async fn connect_is_refused_with_a_clear_status() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&[]).await;
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client
            .send(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
            .await;
        let r = client.response(false).await;
        assert_eq!(r.status, 405, "{}", r.text());
        assert_eq!(r.header("x-tandem-error"), Some("not_supported"));
        assert!(r.text().contains("CONNECT"), "{}", r.text());

        let tcp = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let request = http::Request::builder()
            .method("CONNECT")
            .uri("example.com:443")
            .body(())
            .unwrap();
        let (response, _) = send.send_request(request, true).unwrap();
        let response = response.await.expect("an answer to CONNECT over HTTP/2");
        assert_eq!(response.status(), 405);
        no_backend_blamed(&proxy).await;
    })
    .await
}

/// A backend that records every byte it is sent and answers each request head
/// (split on CRLF CRLF only, as a strict server would) with `reply`.
async fn recording_backend(reply: &'static [u8]) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            record.lock().unwrap().extend_from_slice(&chunk[..n]);
                            pending.extend_from_slice(&chunk[..n]);
                        }
                    }
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn bare_lf_heads_are_refused_and_never_reach_a_backend() {
    bounded(LIMIT, async {
        let (addr, seen) =
            recording_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let proxy = static_proxy(&[addr], &[]).await;
        for request in [
            &b"GET / HTTP/1.1\nHost: web\n\n"[..],
            b"GET / HTTP/1.1\r\nHost: web\nContent-Length: 38\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: web\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: web\r\nX-A: 1\n\r\n",
        ] {
            let mut client = Raw::connect(proxy.addr("proxy")).await;
            client.send(request).await;
            let r = client.response(false).await;
            assert_eq!(
                r.status,
                400,
                "{:?}: {}",
                String::from_utf8_lossy(request),
                r.text()
            );
        }
        // Requests on one backend connection arrive in order: once this one is there,
        // anything forwarded before it would be too.
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client.send(b"GET /last HTTP/1.1\r\nHost: web\r\n\r\n").await;
        assert_eq!(client.response(false).await.status, 200);
        let seen = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        assert!(
            seen.starts_with("GET /last HTTP/1.1\r\n") && !seen.contains("smuggled"),
            "the backend saw: {seen:?}"
        );
    })
    .await
}

#[tokio::test]
async fn a_response_head_with_bare_lf_reaches_the_client_with_crlf() {
    bounded(LIMIT, async {
        let addr = raw_backend(b"HTTP/1.1 200 OK\nx-a: 1\ncontent-length: 2\n\nok").await;
        let proxy = static_proxy(&[addr], &[]).await;
        let mut client = Raw::connect(proxy.addr("proxy")).await;
        client.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
        while !client.buf.windows(4).any(|w| w == b"\r\n\r\n") {
            client.fill().await;
        }
        let end = client
            .buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap();
        let head = &client.buf[..end + 4];
        for (i, b) in head.iter().enumerate() {
            assert!(
                *b != b'\n' || (i > 0 && head[i - 1] == b'\r'),
                "a bare LF reached the client: {:?}",
                String::from_utf8_lossy(head)
            );
        }
        assert_eq!(client.response(false).await.text(), "ok");
    })
    .await
}

#[tokio::test]
async fn a_request_head_must_arrive_in_time() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&["--header-read-timeout", "1s"]).await;
        // 50 clients sending one byte of their head every 200 ms.
        let start = Instant::now();
        let mut slow = Vec::new();
        for _ in 0..50 {
            let stream = TcpStream::connect(proxy.addr("proxy")).await.unwrap();
            slow.push(tokio::spawn(async move {
                let mut stream = stream;
                let head = b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
                let mut answer = Vec::new();
                for byte in head {
                    if stream.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    // The next byte in 200 ms, unless the proxy has answered (a
                    // client stops sending once it has its answer).
                    let mut chunk = [0u8; 1024];
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        read = stream.read(&mut chunk) => {
                            answer.extend_from_slice(&chunk[..read.unwrap_or(0)]);
                            break;
                        }
                    }
                }
                let _ = tokio::time::timeout(STEP, stream.read_to_end(&mut answer)).await;
                (Instant::now(), answer)
            }));
        }
        // Meanwhile a normal client is served.
        let mut conn = tandem::client::Connection::http1(proxy.addr("proxy"))
            .await
            .unwrap();
        assert_eq!(conn.get("web", "/").await.unwrap().status, 200);
        for task in slow {
            let (ended, answer) = task.await.unwrap();
            let took = ended - start;
            assert!(
                took < Duration::from_secs(6),
                "a slow head was allowed {took:?} (its bytes alone take 17 s)"
            );
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
        }
        let page = admin_get(proxy.addr("admin"), "/metrics").await;
        assert_eq!(metric(&page, "tandem_proxy_header_read_timeouts_total"), 50.0);
    })
    .await
}

/// Reads until the proxy closes `stream`; true if it did within `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn client_connections_are_capped_and_idle_ones_make_room_first() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&["--max-client-connections", "10"]).await;
        let addr = proxy.addr("proxy");
        // Ten keep-alive connections, each done with one request: all idle.
        let mut idle = Vec::new();
        for _ in 0..10 {
            let mut client = Raw::connect(addr).await;
            client.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
            assert_eq!(client.response(false).await.status, 200);
            idle.push(client);
        }
        // An eleventh is served once they have been quiet a moment (a connection
        // active this very second may be about to send): the oldest idle connection
        // makes room for it.
        let mut late = eventually(STEP, "an eleventh connection to be served", || async {
            let mut late = Raw::try_connect(addr).await?;
            late.stream
                .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
                .await
                .ok()?;
            // Refused: a reset instead of an answer.
            let mut first = [0u8; 4096];
            let n = late.stream.read(&mut first).await.ok().filter(|n| *n > 0)?;
            late.buf.extend_from_slice(&first[..n]);
            Some(late)
        })
        .await;
        assert_eq!(late.response(false).await.status, 200);
        assert!(
            closed_within(&mut idle[0].stream, STEP).await,
            "the oldest idle connection was closed to make room"
        );
        for other in &mut idle[1..] {
            other.send(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await;
            assert_eq!(other.response(false).await.status, 200, "the others stay");
        }

        // Ten connections each waiting for a slow answer: nothing idle to close, so a
        // new one is refused, and counted.
        drop(idle);
        drop(late);
        eventually(STEP, "the proxy to see them closed", || async {
            let page = admin_get(proxy.addr("admin"), "/metrics").await;
            (metric(&page, "tandem_proxy_open_connections") == 0.0).then_some(())
        })
        .await;
        let mut busy = Vec::new();
        for _ in 0..10 {
            let mut client = Raw::connect(addr).await;
            client
                .send(b"GET /delay/3000 HTTP/1.1\r\nHost: web\r\n\r\n")
                .await;
            busy.push(client);
        }
        eventually(STEP, "the ten slow requests in flight", || async {
            let page = admin_get(proxy.addr("admin"), "/metrics").await;
            (metric(&page, "tandem_proxy_requests_in_flight") == 10.0).then_some(())
        })
        .await;
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let _ = refused
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await;
        assert!(
            closed_within(&mut refused, STEP).await,
            "refused at the cap"
        );
        let page = admin_get(proxy.addr("admin"), "/metrics").await;
        assert!(metric(&page, "tandem_proxy_connections_refused_total") >= 1.0);
        assert_eq!(metric(&page, "tandem_proxy_max_client_connections"), 10.0);
        for mut client in busy {
            assert_eq!(
                client.response(false).await.status,
                200,
                "the busy ones finish"
            );
        }
    })
    .await
}

/// A backend that accepts connections and reads, but never answers.
async fn hung_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = [0u8; 4096];
                while let Ok(1..) = stream.read(&mut sink).await {}
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_hung_backend_holds_a_request_only_until_the_stream_idle_timeout() {
    bounded(LIMIT, async {
        let proxy = static_proxy(&[hung_backend().await], &["--stream-idle-timeout", "2s"]).await;
        let addr = proxy.addr("proxy");
        let requests: [(&str, &[u8]); 3] = [
            ("the proxy's own HTTP/1 path", b"GET / HTTP/1.1\r\nHost: web\r\n\r\n"),
            (
                "a chunked upload (hyper's path)",
                b"POST / HTTP/1.1\r\nHost: web\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            ),
            ("a bodiless request on hyper's path", b"GET / HTTP/1.0\r\n\r\n"),
        ];
        for (what, request) in requests {
            let start = Instant::now();
            let mut client = Raw::connect(addr).await;
            client.send(request).await;
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(10), client.stream.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer within 10 s"));
            let answer = String::from_utf8_lossy(&buf[..read.unwrap_or(0)]).into_owned();
            assert!(
                answer.starts_with("HTTP/1.1 504 ") || answer.starts_with("HTTP/1.0 504 "),
                "{what}: {answer:?}"
            );
            assert!(start.elapsed() >= Duration::from_secs(1), "{what}: too soon");
        }
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let (response, _) = send
            .send_request(http::Request::get("http://web/").body(()).unwrap(), true)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("HTTP/2: an answer within 10 s")
            .unwrap();
        assert_eq!(response.status(), 504);
    })
    .await
}

#[tokio::test]
async fn host_headers_follow_rfc_9112() {
    bounded(LIMIT, async {
        let (_backends, proxy) = two_backends(&[]).await;
        let addr = proxy.addr("proxy");
        for (what, request) in [
            ("HTTP/1.1 without Host", &b"GET / HTTP/1.1\r\n\r\n"[..]),
            (
                "two Host headers",
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            ),
            (
                "a Host with a space",
                b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            ),
            ("a Host with a path", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
        ] {
            let mut client = Raw::connect(addr).await;
            client.send(request).await;
            let r = client.response(false).await;
            assert_eq!(r.status, 400, "{what}: {}", r.text());
        }
        // HTTP/1.0 may leave Host out; the backend still gets one (HTTP/1.1 needs it).
        let mut client = Raw::connect(addr).await;
        client.send(b"GET /headers HTTP/1.0\r\n\r\n").await;
        let r = client.response(false).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("host: "), "{}", r.text());
        // An absolute-form target wins over Host, and the backend sees its authority.
        let mut client = Raw::connect(addr).await;
        client
            .send(b"GET http://web.example/headers HTTP/1.1\r\nHost: other\r\n\r\n")
            .await;
        let r = client.response(false).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().contains("host: web.example\n"), "{}", r.text());
        assert!(!r.text().contains("other"), "{}", r.text());
    })
    .await
}

/// Keep-alive clients in loops through a proxy that is sent SIGTERM: what each
/// request that reached the proxy got. Returns (answers, answers saying
/// `Connection: close`, requests that got none).
async fn shutdown_under_load() -> (usize, usize, Vec<String>) {
    let (_backends, proxy) = two_backends(&["--shutdown-grace", "10s"]).await;
    let addr = proxy.addr("proxy");
    let answered = Arc::new(AtomicUsize::new(0));
    let closes = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for _ in 0..64 {
        let (answered, closes, lost, stop) =
            (answered.clone(), closes.clone(), lost.clone(), stop.clone());
        loops.push(tokio::spawn(async move {
            // Keep-alive loops that reconnect until the listener is gone.
            while !stop.load(Ordering::Relaxed) {
                let Ok(tcp) = TcpStream::connect(addr).await else {
                    return;
                };
                let io = hyper_util::rt::TokioIo::new(tcp);
                let Ok((mut send, conn)) =
                    hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(io)
                        .await
                else {
                    return;
                };
                tokio::spawn(conn);
                loop {
                    // Not ready: the proxy closed the connection after its last
                    // answer, so this request was never sent.
                    if send.ready().await.is_err() {
                        break;
                    }
                    let req = http::Request::get("/")
                        .header("host", "web")
                        .body(http_body_util::Empty::new())
                        .unwrap();
                    match send.send_request(req).await {
                        Ok(response) => {
                            answered.fetch_add(1, Ordering::Relaxed);
                            if response
                                .headers()
                                .get("connection")
                                .is_some_and(|c| c == "close")
                            {
                                closes.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                        }
                        Err(e) => {
                            lost.lock().unwrap().push(e.to_string());
                            break;
                        }
                    }
                }
            }
        }));
    }
    eventually(STEP, "the loops to get going", || {
        let n = answered.load(Ordering::Relaxed);
        async move { (n > 2000).then_some(()) }
    })
    .await;
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &proxy.pid().to_string()])
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let mut proxy = proxy;
    wait_exit(&mut proxy, Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let lost = lost.lock().unwrap().clone();
    (
        answered.load(Ordering::Relaxed),
        closes.load(Ordering::Relaxed),
        lost,
    )
}

#[tokio::test]
async fn a_shutdown_answers_every_request_that_reached_the_proxy() {
    bounded(LIMIT, async {
        // The race (a request arriving as its connection is closed) is short: a few
        // rounds make it show.
        for round in 0..4 {
            let (answered, closes, lost) = shutdown_under_load().await;
            assert!(
                lost.is_empty(),
                "round {round}: {} requests reached the proxy and got no answer \
                 ({answered} did): {lost:?}",
                lost.len()
            );
            assert!(
                closes >= 1,
                "answers during the drain say Connection: close"
            );
        }
    })
    .await
}
