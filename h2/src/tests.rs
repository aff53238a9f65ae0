//! The HTTP/2 implementation against another one (the `h2` crate, which hyper,
//! tonic and most of the Rust ecosystem use) and against raw frames, over in-memory
//! pipes.

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::connection::Connection;
use crate::error::Error;
use crate::frame::{self, Reason};
use crate::session::Config;
use crate::streams::{Client, RecvStream, SendResponse};

const LIMIT: Duration = Duration::from_secs(10);

fn config() -> Config {
    Config {
        max_concurrent_streams: 100,
        stream_window: 65_535,
        connection_window: 65_535,
        max_header_list: 16 * 1024,
        max_send_buffer: 16 * 1024,
        ..Config::default()
    }
}

async fn read_all(body: &mut RecvStream) -> Result<Vec<u8>, Error> {
    let mut all = Vec::new();
    while let Some(chunk) = poll_fn(|cx| body.poll_data(cx)).await {
        all.extend_from_slice(&chunk?);
    }
    Ok(all)
}

/// Our server on `io`: every request gets its body back, with its trailers, and an
/// `x-length` header saying how long it was.
fn echo_server(io: DuplexStream) {
    echo_server_with(io, config());
}

fn echo_server_with(io: DuplexStream, config: Config) {
    tokio::spawn(async move {
        let mut conn = Connection::server(io, config);
        poll_fn(|cx| {
            let over = conn.poll_read(cx).is_ready();
            while let Some((req, respond)) = conn.accept() {
                tokio::spawn(echo(req, respond));
            }
            let _ = conn.poll_flush(cx);
            if over { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
    });
}

async fn echo(req: Request<RecvStream>, respond: SendResponse) {
    let (_, mut body) = req.into_parts();
    let Ok(data) = read_all(&mut body).await else {
        return;
    };
    let trailers = poll_fn(|cx| body.poll_trailers(cx)).await.ok().flatten();
    let mut head = Response::new(()).into_parts().0;
    head.headers
        .insert("x-length", HeaderValue::from(data.len()));
    let Ok(Some(mut send)) = respond.send_response(&head, false) else {
        return;
    };
    for chunk in data.chunks(10_000) {
        if poll_fn(|cx| send.poll_ready(cx)).await.is_err() {
            return;
        }
        let _ = send.send_data(Bytes::copy_from_slice(chunk), false);
    }
    let _ = poll_fn(|cx| send.poll_ready(cx)).await;
    match trailers {
        Some(trailers) => drop(send.send_trailers(trailers)),
        None => drop(send.send_data(Bytes::new(), true)),
    }
}

/// Our client on `io`, its connection driven by a task of its own, once the
/// backend's SETTINGS are in (as `client.rs` waits: its stream limit is known then).
async fn client_on(io: DuplexStream) -> Client {
    let (mut conn, client) = Connection::client(io, config());
    let session = conn.session().clone();
    tokio::spawn(async move {
        poll_fn(|cx| {
            let over = conn.poll_read(cx).is_ready();
            let _ = conn.poll_flush(cx);
            if over || conn.finished() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    });
    while !session.lock().got_settings {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    client
}

/// An h2 backend on `io` that takes one stream at a time and answers each request
/// with the text `answer` makes of it.
fn one_stream_backend<F, A>(io: DuplexStream, answer: F)
where
    F: Fn(Request<h2::RecvStream>) -> A + Copy + Send + 'static,
    A: Future<Output = String> + Send + 'static,
{
    tokio::spawn(async move {
        let mut conn = h2::server::Builder::new()
            .max_concurrent_streams(1)
            .handshake::<_, Bytes>(io)
            .await
            .unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let text = answer(req).await;
                let mut send = respond.send_response(Response::new(()), false).unwrap();
                send.send_data(Bytes::from(text), true).unwrap();
            });
        }
    });
}

async fn h2_client(io: DuplexStream) -> h2::client::SendRequest<Bytes> {
    let (send, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(conn);
    send
}

async fn h2_read(mut body: h2::RecvStream) -> Result<(Vec<u8>, Option<HeaderMap>), h2::Error> {
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    Ok((all, body.trailers().await?))
}

#[tokio::test]
async fn bodies_beyond_every_window_and_trailers_go_both_ways() {
    tokio::time::timeout(LIMIT, async {
        let (ours, theirs) = tokio::io::duplex(8 * 1024);
        echo_server(ours);
        let mut client = h2_client(theirs).await;
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let req = Request::post("http://example/echo").body(()).unwrap();
        let (response, mut send) = client.send_request(req, false).unwrap();
        let sending = body.clone();
        tokio::spawn(async move {
            for chunk in sending.chunks(16_000) {
                send.reserve_capacity(chunk.len());
                while send.capacity() < chunk.len() {
                    poll_fn(|cx| send.poll_capacity(cx)).await.unwrap().unwrap();
                }
                send.send_data(Bytes::copy_from_slice(chunk), false)
                    .unwrap();
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            send.send_trailers(trailers).unwrap();
        });
        let response = response.await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-length"], "300000");
        let (echoed, trailers) = h2_read(response.into_body()).await.unwrap();
        assert!(echoed == body, "the body came back changed");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
        // And the connection goes on.
        client = client.ready().await.unwrap();
        let (response, _) = client
            .send_request(Request::get("http://example/").body(()).unwrap(), true)
            .unwrap();
        assert_eq!(response.await.unwrap().headers()["x-length"], "0");
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_body_shorter_than_its_content_length_is_reset_alone() {
    tokio::time::timeout(LIMIT, async {
        let (ours, theirs) = tokio::io::duplex(8 * 1024);
        echo_server(ours);
        let client = h2_client(theirs).await;
        let req = Request::post("http://example/")
            .header("content-length", "10")
            .body(())
            .unwrap();
        let (response, mut send) = client.clone().send_request(req, false).unwrap();
        send.send_data(Bytes::from_static(b"short"), true).unwrap();
        let error = response.await.expect_err("reset");
        assert_eq!(error.reason(), Some(h2::Reason::PROTOCOL_ERROR));
        let mut client = client.ready().await.unwrap();
        let (response, _) = client
            .send_request(Request::get("http://example/").body(()).unwrap(), true)
            .unwrap();
        assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    })
    .await
    .expect("in time");
}

/// Reads frames from a raw peer until one of `kind` arrives.
async fn frame_of(io: &mut DuplexStream, kind: u8) -> (frame::Head, Vec<u8>) {
    loop {
        let mut head = [0u8; frame::HEADER_LEN];
        io.read_exact(&mut head).await.expect("a frame");
        let head = frame::Head::parse(&head);
        let mut payload = vec![0; head.len];
        io.read_exact(&mut payload).await.expect("its payload");
        if head.kind == kind {
            return (head, payload);
        }
    }
}

#[tokio::test]
async fn protocol_errors_end_the_connection_with_goaway() {
    tokio::time::timeout(LIMIT, async {
        let cases: [(&str, Vec<u8>, Reason); 4] = [
            (
                "DATA on stream 0",
                raw(frame::DATA, 0, 0, b"x"),
                Reason::PROTOCOL_ERROR,
            ),
            (
                "a frame above the size limit",
                raw(frame::PING, 0, 0, &[0; 17_000]),
                Reason::FRAME_SIZE_ERROR,
            ),
            (
                "a header block that does not decode",
                raw(frame::HEADERS, frame::END_HEADERS, 1, &[0xff]),
                Reason::COMPRESSION_ERROR,
            ),
            (
                "a window beyond 2^31-1",
                raw(frame::WINDOW_UPDATE, 0, 0, &0x7fff_ffffu32.to_be_bytes()),
                Reason::FLOW_CONTROL_ERROR,
            ),
        ];
        for (case, bad, reason) in cases {
            let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
            echo_server(ours);
            theirs.write_all(frame::PREFACE).await.unwrap();
            theirs
                .write_all(&raw(frame::SETTINGS, 0, 0, &[]))
                .await
                .unwrap();
            theirs.write_all(&bad).await.unwrap();
            let (_, goaway) = frame_of(&mut theirs, frame::GOAWAY).await;
            let code = u32::from_be_bytes(goaway[4..8].try_into().unwrap());
            assert_eq!(Reason(code), reason, "{case}");
        }
    })
    .await
    .expect("in time");
}

fn raw(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::put_head(&mut out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
    out
}

#[tokio::test]
async fn requests_beyond_a_backends_stream_limit_wait_their_turn() {
    tokio::time::timeout(LIMIT, async {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        // Each request answered with its path, after a while.
        one_stream_backend(theirs, |req| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            req.uri().path().to_string()
        });
        let client = client_on(ours).await;
        let mut responses = Vec::new();
        for i in 0..5 {
            let req = Request::get(format!("http://backend/{i}"))
                .body(())
                .unwrap();
            let (response, body) = client
                .send_request(req.method(), req.uri(), req.headers(), true)
                .unwrap();
            assert!(body.is_none());
            responses.push(response);
        }
        for (i, response) in responses.into_iter().enumerate() {
            let (_, mut body) = response.await.unwrap().into_parts();
            assert_eq!(
                read_all(&mut body).await.unwrap(),
                format!("/{i}").into_bytes()
            );
        }
        drop(client);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_refused_stream_is_reported_as_not_processed() {
    tokio::time::timeout(LIMIT, async {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(theirs).await.unwrap();
            while let Some(Ok((_, mut respond))) = conn.accept().await {
                respond.send_reset(h2::Reason::REFUSED_STREAM);
            }
        });
        let client = client_on(ours).await;
        let req = Request::get("http://backend/").body(()).unwrap();
        let (response, _) = client
            .send_request(req.method(), req.uri(), req.headers(), true)
            .unwrap();
        let Err(error) = response.await else {
            panic!("a refused stream gave a response");
        };
        assert!(error.not_processed(), "{error}");
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn request_bodies_waiting_for_a_stream_slot_are_sent_whole() {
    tokio::time::timeout(LIMIT, async {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        // Each request answered with its body's length.
        one_stream_backend(theirs, |req| async move {
            let (body, _) = h2_read(req.into_body()).await.unwrap();
            body.len().to_string()
        });
        let client = client_on(ours).await;
        let mut responses = Vec::new();
        for i in 1..=3usize {
            let req = Request::post("http://backend/").body(()).unwrap();
            let (response, body) = client
                .send_request(req.method(), req.uri(), req.headers(), false)
                .unwrap();
            let mut send = body.expect("a body to send");
            tokio::spawn(async move {
                for _ in 0..i {
                    poll_fn(|cx| send.poll_ready(cx)).await.unwrap();
                    send.send_data(Bytes::from(vec![b'x'; 1000]), false)
                        .unwrap();
                }
                poll_fn(|cx| send.poll_ready(cx)).await.unwrap();
                send.send_data(Bytes::new(), true).unwrap();
            });
            responses.push(response);
        }
        for (i, response) in responses.into_iter().enumerate() {
            let (_, mut body) = response.await.unwrap().into_parts();
            assert_eq!(
                read_all(&mut body).await.unwrap(),
                ((i + 1) * 1000).to_string().into_bytes()
            );
        }
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_peer_that_shrinks_its_table_is_told_ours_is_empty() {
    tokio::time::timeout(LIMIT, async {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        echo_server(ours);
        theirs.write_all(frame::PREFACE).await.unwrap();
        let mut table_size_zero = vec![0, 1];
        table_size_zero.extend_from_slice(&0u32.to_be_bytes());
        theirs
            .write_all(&raw(frame::SETTINGS, 0, 0, &table_size_zero))
            .await
            .unwrap();
        // GET http://a/, END_STREAM.
        let request = [0x82, 0x86, 0x84, 0x41, 0x01, b'a'];
        let flags = frame::END_HEADERS | frame::END_STREAM;
        theirs
            .write_all(&raw(frame::HEADERS, flags, 1, &request))
            .await
            .unwrap();
        let (head, block) = frame_of(&mut theirs, frame::HEADERS).await;
        assert_eq!(head.stream, 1);
        assert_eq!(
            block[0], 0x20,
            "the block opens with a table size update to 0"
        );
        assert_eq!(block[1], 0x88, ":status 200 follows");
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn a_client_resetting_streams_as_fast_as_it_opens_them_is_sent_away() {
    // Its own resets (RST_STREAM), or ones it makes the proxy send (a WINDOW_UPDATE
    // of 0 is a stream error: "MadeYouReset").
    type Reset = fn(u32) -> Vec<u8>;
    let resets: [(&str, Reset); 2] = [
        ("RST_STREAM", |id| {
            raw(frame::RST_STREAM, 0, id, &Reason::CANCEL.0.to_be_bytes())
        }),
        ("WINDOW_UPDATE of 0", |id| {
            raw(frame::WINDOW_UPDATE, 0, id, &[0; 4])
        }),
    ];
    // A clock that stands still: the whole burst falls in one second, however long
    // it takes (the window's roll-over: `session::recv`'s tests).
    let stopped = Config {
        clock: || 7,
        ..config()
    };
    for (how, reset) in resets {
        tokio::time::timeout(LIMIT, async {
            let (ours, mut theirs) = tokio::io::duplex(1024 * 1024);
            echo_server_with(ours, stopped.clone());
            theirs.write_all(frame::PREFACE).await.unwrap();
            theirs
                .write_all(&raw(frame::SETTINGS, 0, 0, &[]))
                .await
                .unwrap();
            let request = [0x82, 0x86, 0x84, 0x41, 0x01, b'a'];
            let mut burst = Vec::new();
            for i in 0..1100u32 {
                let id = 2 * i + 1;
                burst.extend(raw(frame::HEADERS, frame::END_HEADERS, id, &request));
                burst.extend(reset(id));
            }
            let writer = tokio::spawn(async move {
                let _ = theirs.write_all(&burst).await;
                theirs
            });
            let mut theirs = writer.await.unwrap();
            let (_, goaway) = frame_of(&mut theirs, frame::GOAWAY).await;
            let code = u32::from_be_bytes(goaway[4..8].try_into().unwrap());
            assert_eq!(Reason(code), Reason::ENHANCE_YOUR_CALM, "{how}");
        })
        .await
        .expect("in time");
    }
}

/// `GET http://a/`, as a block that leaves the decoder's table alone.
const GET: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'a'];

/// A raw client of [`echo_server`]: the preface and an empty SETTINGS sent.
async fn raw_client() -> DuplexStream {
    let (ours, mut theirs) = tokio::io::duplex(1024 * 1024);
    echo_server(ours);
    theirs.write_all(frame::PREFACE).await.unwrap();
    theirs
        .write_all(&raw(frame::SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    theirs
}

/// The error code of the next GOAWAY.
async fn goaway_code(io: &mut DuplexStream) -> Reason {
    let (_, goaway) = frame_of(io, frame::GOAWAY).await;
    Reason(u32::from_be_bytes(goaway[4..8].try_into().unwrap()))
}

/// Reads until the response on `stream` has ended (the echo server's ends with an
/// empty DATA frame); panics on GOAWAY.
async fn response_end(io: &mut DuplexStream, stream: u32) {
    loop {
        let mut head = [0u8; frame::HEADER_LEN];
        io.read_exact(&mut head).await.expect("a frame");
        let head = frame::Head::parse(&head);
        let mut payload = vec![0; head.len];
        io.read_exact(&mut payload).await.expect("its payload");
        assert_ne!(head.kind, frame::GOAWAY, "GOAWAY: {payload:?}");
        if head.stream == stream
            && (head.kind == frame::DATA || head.kind == frame::HEADERS)
            && head.has(frame::END_STREAM)
        {
            return;
        }
    }
}

#[tokio::test]
async fn a_new_stream_id_not_above_every_earlier_one_is_a_protocol_error() {
    tokio::time::timeout(LIMIT, async {
        let whole = frame::END_HEADERS | frame::END_STREAM;
        // RFC 9113 §5.1.1: below the last stream opened (done, open, or skipped
        // over), or even.
        let cases: [(&str, &[(u32, u8)]); 5] = [
            ("3 after 5", &[(5, whole), (3, whole)]),
            (
                "5 after 7, still open",
                &[(7, frame::END_HEADERS), (5, whole)],
            ),
            ("1 skipped by 3", &[(3, frame::END_HEADERS), (1, whole)]),
            ("3 after 301", &[(1, whole), (301, whole), (3, whole)]),
            ("an even id", &[(2, whole)]),
        ];
        for (case, streams) in cases {
            let mut io = raw_client().await;
            for &(id, flags) in streams {
                io.write_all(&raw(frame::HEADERS, flags, id, GET))
                    .await
                    .unwrap();
            }
            assert_eq!(goaway_code(&mut io).await, Reason::PROTOCOL_ERROR, "{case}");
        }
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn frames_on_closed_streams_are_answered_as_rfc_9113_says() {
    tokio::time::timeout(LIMIT, async {
        let whole = frame::END_HEADERS | frame::END_STREAM;
        // Stream 1 done both ways: HEADERS or DATA on it is a connection error
        // STREAM_CLOSED (§5.1), whether or not the proxy still keeps it.
        for (case, late) in [
            ("HEADERS", raw(frame::HEADERS, whole, 1, GET)),
            ("DATA", raw(frame::DATA, 0, 1, b"x")),
        ] {
            let mut io = raw_client().await;
            io.write_all(&raw(frame::HEADERS, whole, 1, GET))
                .await
                .unwrap();
            response_end(&mut io, 1).await;
            io.write_all(&late).await.unwrap();
            assert_eq!(goaway_code(&mut io).await, Reason::STREAM_CLOSED, "{case}");
        }

        // WINDOW_UPDATE, RST_STREAM and PRIORITY on a closed stream are fine.
        let mut io = raw_client().await;
        io.write_all(&raw(frame::HEADERS, whole, 1, GET))
            .await
            .unwrap();
        response_end(&mut io, 1).await;
        let mut late = raw(frame::WINDOW_UPDATE, 0, 1, &100u32.to_be_bytes());
        late.extend(raw(
            frame::RST_STREAM,
            0,
            1,
            &Reason::CANCEL.0.to_be_bytes(),
        ));
        late.extend(raw(frame::PRIORITY, 0, 1, &[0, 0, 0, 0, 16]));
        late.extend(raw(frame::HEADERS, whole, 3, GET));
        io.write_all(&late).await.unwrap();
        response_end(&mut io, 3).await;

        // A stream the proxy reset: what the client sent before it knew is
        // ignored, trailers included. Content-length 3 and no body is malformed.
        let mut io = raw_client().await;
        let malformed = [0x82, 0x86, 0x84, 0x01, 0x01, b'a', 0x0f, 0x0d, 0x01, b'3'];
        let mut frames = raw(frame::HEADERS, whole, 1, &malformed);
        frames.extend(raw(frame::DATA, 0, 1, b"abc"));
        frames.extend(raw(
            frame::HEADERS,
            whole,
            1,
            &[0x00, 0x01, b'x', 0x01, b'y'],
        ));
        io.write_all(&frames).await.unwrap();
        let (head, code) = frame_of(&mut io, frame::RST_STREAM).await;
        assert_eq!(
            (head.stream, &code[..]),
            (1, &Reason::PROTOCOL_ERROR.0.to_be_bytes()[..])
        );
        io.write_all(&raw(frame::HEADERS, whole, 3, GET))
            .await
            .unwrap();
        response_end(&mut io, 3).await;

        // DATA on a stream skipped over: closed without ever being opened.
        let mut io = raw_client().await;
        io.write_all(&raw(frame::HEADERS, frame::END_HEADERS, 3, GET))
            .await
            .unwrap();
        io.write_all(&raw(frame::DATA, 0, 1, b"x")).await.unwrap();
        assert_eq!(goaway_code(&mut io).await, Reason::STREAM_CLOSED);
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn continuation_floods_are_cut_off() {
    tokio::time::timeout(LIMIT, async {
        // A block begun, then empty CONTINUATIONs that never end it.
        let mut io = raw_client().await;
        let mut flood = raw(frame::HEADERS, frame::END_STREAM, 1, &GET[..3]);
        for _ in 0..17 {
            flood.extend(raw(frame::CONTINUATION, 0, 1, &[]));
        }
        io.write_all(&flood).await.unwrap();
        assert_eq!(goaway_code(&mut io).await, Reason::ENHANCE_YOUR_CALM);

        // The size limit holds across CONTINUATIONs: 16 of them, full, go beyond
        // 256 KiB before their number is too many.
        let mut io = raw_client().await;
        let full = vec![0x40u8; 16 * 1024];
        let mut big = raw(frame::HEADERS, frame::END_STREAM, 1, &full);
        for _ in 0..16 {
            big.extend(raw(frame::CONTINUATION, 0, 1, &full));
        }
        io.write_all(&big).await.unwrap();
        assert_eq!(goaway_code(&mut io).await, Reason::ENHANCE_YOUR_CALM);

        // Up to 16 CONTINUATIONs, a block is taken.
        let mut io = raw_client().await;
        let mut split = raw(frame::HEADERS, frame::END_STREAM, 1, &GET[..3]);
        for _ in 0..15 {
            split.extend(raw(frame::CONTINUATION, 0, 1, &[]));
        }
        split.extend(raw(frame::CONTINUATION, frame::END_HEADERS, 1, &GET[3..]));
        io.write_all(&split).await.unwrap();
        response_end(&mut io, 1).await;
    })
    .await
    .expect("in time");
}

/// A RST_STREAM's stream and code.
async fn rst_of(io: &mut DuplexStream) -> (u32, Reason) {
    let (head, code) = frame_of(io, frame::RST_STREAM).await;
    (
        head.stream,
        Reason(u32::from_be_bytes(code[..].try_into().unwrap())),
    )
}

#[tokio::test]
async fn frames_after_the_clients_own_reset_are_a_connection_error() {
    tokio::time::timeout(LIMIT, async {
        // RFC 9113 §5.1: anything but PRIORITY after the client's RST_STREAM is
        // STREAM_CLOSED, while the proxy still keeps the stream (one write) or
        // once it let it go (after a PING's round trip).
        let reset = raw(frame::RST_STREAM, 0, 1, &Reason::CANCEL.0.to_be_bytes());
        for (case, late) in [
            ("DATA", raw(frame::DATA, frame::END_STREAM, 1, b"test")),
            (
                "HEADERS",
                raw(
                    frame::HEADERS,
                    frame::END_HEADERS | frame::END_STREAM,
                    1,
                    GET,
                ),
            ),
        ] {
            for separate in [false, true] {
                let mut io = raw_client().await;
                let mut frames = raw(frame::HEADERS, frame::END_HEADERS, 1, GET);
                frames.extend(&reset);
                if separate {
                    frames.extend(raw(frame::PING, 0, 0, &[0; 8]));
                    io.write_all(&frames).await.unwrap();
                    frame_of(&mut io, frame::PING).await;
                    frames = Vec::new();
                }
                frames.extend(&late);
                io.write_all(&frames).await.unwrap();
                let code = goaway_code(&mut io).await;
                assert_eq!(code, Reason::STREAM_CLOSED, "{case}, separate: {separate}");
            }
        }
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn malformed_priorities_are_stream_errors() {
    tokio::time::timeout(LIMIT, async {
        let whole = frame::END_HEADERS | frame::END_STREAM;
        let mut io = raw_client().await;
        // A PRIORITY of 4 bytes on an open stream (§6.3): that stream is reset.
        io.write_all(&raw(frame::HEADERS, frame::END_HEADERS, 1, GET))
            .await
            .unwrap();
        io.write_all(&raw(frame::PRIORITY, 0, 1, &[0x80, 0, 0, 1]))
            .await
            .unwrap();
        assert_eq!(rst_of(&mut io).await, (1, Reason::FRAME_SIZE_ERROR));
        // The connection serves on.
        io.write_all(&raw(frame::HEADERS, whole, 3, GET))
            .await
            .unwrap();
        response_end(&mut io, 3).await;

        // A new stream depending on itself (§5.3.1) is refused; its header block
        // still counts (the table stays in step: the next request decodes).
        let mut block = 5u32.to_be_bytes().to_vec();
        block.push(255);
        block.extend_from_slice(&[0x82, 0x86, 0x84, 0x41, 0x01, b'a']);
        io.write_all(&raw(
            frame::HEADERS,
            whole | frame::PRIORITY_FLAG,
            5,
            &block,
        ))
        .await
        .unwrap();
        assert_eq!(rst_of(&mut io).await, (5, Reason::PROTOCOL_ERROR));
        // PRIORITY depending on itself, on a closed stream: RST_STREAM.
        io.write_all(&raw(frame::PRIORITY, 0, 3, &[0, 0, 0, 3, 16]))
            .await
            .unwrap();
        assert_eq!(rst_of(&mut io).await, (3, Reason::PROTOCOL_ERROR));
        // A well-formed PRIORITY, even on an idle stream, changes nothing.
        let mut frames = raw(frame::PRIORITY, 0, 11, &[0, 0, 0, 1, 16]);
        frames.extend(raw(frame::HEADERS, whole, 7, &[0x82, 0x86, 0x84, 0xbe]));
        io.write_all(&frames).await.unwrap();
        response_end(&mut io, 7).await;
        // On an idle stream RST_STREAM may not be sent (§6.4): the connection goes.
        io.write_all(&raw(frame::PRIORITY, 0, 9, &[0, 0, 0, 9, 16]))
            .await
            .unwrap();
        assert_eq!(goaway_code(&mut io).await, Reason::PROTOCOL_ERROR);
    })
    .await
    .expect("in time");
}

/// Random frames and handle operations against one session, checking after each
/// step that nothing panics and the books balance: whatever a peer sends, the
/// connection fails cleanly or goes on.
mod arbitrary_input {
    use bytes::Bytes;
    use http::{HeaderMap, Method, Uri};
    use proptest::prelude::*;

    use super::super::frame::{self, Head};
    use super::super::hpack::Decoder;
    use super::super::session::{DRAIN_PING, Inner, Role, Session};
    use super::config;

    /// A frame a peer might send: mostly well-formed, on a few stream ids, so that
    /// streams really open, carry data and close.
    #[derive(Debug, Clone)]
    enum Frame {
        Headers {
            stream: u32,
            end: bool,
            block: usize,
        },
        Data {
            stream: u32,
            len: usize,
            end: bool,
            padded: bool,
        },
        Rst {
            stream: u32,
            code: u32,
        },
        WindowUpdate {
            stream: u32,
            increment: u32,
        },
        Settings {
            id: u16,
            value: u32,
        },
        /// A PING, or the answer to a graceful close's.
        Ping {
            ack: bool,
        },
        GoAway {
            last: u32,
        },
        Continuation {
            stream: u32,
            end: bool,
        },
        Raw {
            kind: u8,
            flags: u8,
            stream: u32,
            payload: Vec<u8>,
        },
    }

    /// Header blocks: a request, a response, trailers, and broken ones.
    const BLOCKS: [&[u8]; 6] = [
        &[0x82, 0x86, 0x84, 0x41, 0x01, b'a'],
        &[0x88],
        &[0x40, 0x01, b'x', 0x01, b'y'],
        &[0x82, 0x86, 0x84, 0x41, 0x01, b'a', 0x5c, 0x01, b'3'],
        &[0xff, 0xff],
        &[0x00, 0x01, b'A', 0x00],
    ];

    #[derive(Debug, Clone)]
    enum Op {
        Frame(Frame),
        /// Server: answer accepted request `i` (head, then maybe data).
        Respond {
            i: usize,
            end: bool,
            data: usize,
        },
        DropReader(usize),
        DropSender(usize),
        /// Client: open a request.
        Request {
            end: bool,
        },
        SendData {
            i: usize,
            len: usize,
            end: bool,
        },
        Schedule,
        /// Server: a graceful close's first GOAWAY, or its final one.
        GoAway {
            last: bool,
        },
    }

    fn stream_id() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(2),
            Just(3),
            Just(5),
            Just(7),
            0u32..20
        ]
    }

    fn frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (stream_id(), any::<bool>(), 0..BLOCKS.len())
                .prop_map(|(stream, end, block)| Frame::Headers { stream, end, block }),
            (stream_id(), 0usize..70_000, any::<bool>(), any::<bool>()).prop_map(
                |(stream, len, end, padded)| Frame::Data {
                    stream,
                    len: len % 20_000,
                    end,
                    padded
                }
            ),
            (stream_id(), 0u32..14).prop_map(|(stream, code)| Frame::Rst { stream, code }),
            (
                stream_id(),
                prop_oneof![Just(0u32), 1u32..100_000, Just(0x7fff_ffff)]
            )
                .prop_map(|(stream, increment)| Frame::WindowUpdate { stream, increment }),
            (
                1u16..8,
                prop_oneof![Just(0u32), 1u32..70_000, Just(1 << 24), Just(0x8000_0000)]
            )
                .prop_map(|(id, value)| Frame::Settings { id, value }),
            any::<bool>().prop_map(|ack| Frame::Ping { ack }),
            (0u32..10).prop_map(|last| Frame::GoAway { last }),
            (stream_id(), any::<bool>())
                .prop_map(|(stream, end)| Frame::Continuation { stream, end }),
            (
                0u8..12,
                any::<u8>(),
                stream_id(),
                proptest::collection::vec(any::<u8>(), 0..24)
            )
                .prop_map(|(kind, flags, stream, payload)| Frame::Raw {
                    kind,
                    flags,
                    stream,
                    payload
                }),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => frame().prop_map(Op::Frame),
            1 => (0usize..8, any::<bool>(), 0usize..100_000).prop_map(|(i, end, data)| Op::Respond { i, end, data }),
            1 => (0usize..8).prop_map(Op::DropReader),
            1 => (0usize..8).prop_map(Op::DropSender),
            1 => any::<bool>().prop_map(|end| Op::Request { end }),
            1 => (0usize..8, 0usize..100_000, any::<bool>()).prop_map(|(i, len, end)| Op::SendData { i, len, end }),
            1 => Just(Op::Schedule),
            1 => any::<bool>().prop_map(|last| Op::GoAway { last }),
        ]
    }

    fn encode(frame: &Frame) -> (Head, Bytes) {
        let (kind, flags, stream, payload) = match frame {
            Frame::Headers { stream, end, block } => {
                let flags = frame::END_HEADERS | if *end { frame::END_STREAM } else { 0 };
                (frame::HEADERS, flags, *stream, BLOCKS[*block].to_vec())
            }
            Frame::Data {
                stream,
                len,
                end,
                padded,
            } => {
                let mut payload = vec![b'd'; *len];
                let mut flags = if *end { frame::END_STREAM } else { 0 };
                if *padded {
                    payload.insert(0, 3);
                    payload.extend_from_slice(&[0, 0, 0]);
                    flags |= frame::PADDED;
                }
                (frame::DATA, flags, *stream, payload)
            }
            Frame::Rst { stream, code } => {
                (frame::RST_STREAM, 0, *stream, code.to_be_bytes().to_vec())
            }
            Frame::WindowUpdate { stream, increment } => (
                frame::WINDOW_UPDATE,
                0,
                *stream,
                increment.to_be_bytes().to_vec(),
            ),
            Frame::Settings { id, value } => {
                let mut payload = id.to_be_bytes().to_vec();
                payload.extend_from_slice(&value.to_be_bytes());
                (frame::SETTINGS, 0, 0, payload)
            }
            Frame::Ping { ack: false } => (frame::PING, 0, 0, vec![0; 8]),
            Frame::Ping { ack: true } => (frame::PING, frame::ACK, 0, DRAIN_PING.to_vec()),
            Frame::GoAway { last } => {
                let mut payload = last.to_be_bytes().to_vec();
                payload.extend_from_slice(&0u32.to_be_bytes());
                (frame::GOAWAY, 0, 0, payload)
            }
            Frame::Continuation { stream, end } => {
                let flags = if *end { frame::END_HEADERS } else { 0 };
                (frame::CONTINUATION, flags, *stream, vec![0x88])
            }
            Frame::Raw {
                kind,
                flags,
                stream,
                payload,
            } => (*kind, *flags, *stream, payload.clone()),
        };
        let head = Head {
            len: payload.len(),
            kind,
            flags,
            stream,
        };
        (head, Bytes::from(payload))
    }

    /// The handles a test holds on one stream.
    struct Held {
        key: usize,
        reader: bool,
        sender: bool,
        /// Server: the response head is still to send.
        unanswered: bool,
    }

    fn run(role: Role, ops: Vec<Op>) {
        let session = Session::new(role, config());
        let mut inner = session.lock();
        let mut held: Vec<Held> = Vec::new();
        let settings = Head {
            len: 0,
            kind: frame::SETTINGS,
            flags: 0,
            stream: 0,
        };
        inner
            .on_frame(settings, Bytes::new())
            .ok()
            .expect("empty SETTINGS");
        for op in ops {
            if inner.error.is_some() {
                break;
            }
            step(&mut inner, &mut held, role, op);
            inner.check();
        }
        // Every handle goes; the books must still balance.
        for h in held.drain(..) {
            release(&mut inner, &h);
            inner.check();
        }
        inner.schedule();
        inner.check();
    }

    fn release(inner: &mut Inner, h: &Held) {
        if h.reader {
            inner.drop_reader(h.key);
        }
        if h.sender {
            inner.drop_ref(h.key);
        }
    }

    fn step(inner: &mut Inner, held: &mut Vec<Held>, role: Role, op: Op) {
        match op {
            Op::Frame(f) => {
                let (head, payload) = encode(&f);
                if let Err(fatal) = inner.on_frame(head, payload) {
                    inner.fail(fatal);
                }
                while let Some(a) = inner.accepted.pop_front() {
                    held.push(Held {
                        key: a.key,
                        reader: !a.end_stream,
                        sender: true,
                        unanswered: true,
                    });
                }
            }
            Op::Respond { i, end, data } => {
                let Some(h) = held.get_mut(i) else { return };
                if role != Role::Server || !h.sender || !h.unanswered {
                    return;
                }
                h.unanswered = false;
                let (head, ()) = http::Response::new(()).into_parts();
                if inner.send_response(h.key, &head, end).is_err() || end {
                    h.sender = false;
                    inner.drop_ref(h.key);
                } else if data > 0 {
                    let _ = inner.send_data(h.key, Bytes::from(vec![b'r'; data]), true);
                }
            }
            Op::DropReader(i) => {
                if let Some(h) = held.get_mut(i)
                    && h.reader
                {
                    h.reader = false;
                    inner.drop_reader(h.key);
                }
            }
            Op::DropSender(i) => {
                if let Some(h) = held.get_mut(i)
                    && h.sender
                {
                    h.sender = false;
                    inner.drop_ref(h.key);
                }
            }
            Op::Request { end } => {
                if role != Role::Client {
                    return;
                }
                let uri = Uri::from_static("http://backend/");
                if let Ok(key) = inner.send_request(&Method::POST, &uri, &HeaderMap::new(), end) {
                    held.push(Held {
                        key,
                        reader: true,
                        sender: !end,
                        unanswered: false,
                    });
                }
            }
            Op::SendData { i, len, end } => {
                let Some(h) = held.get_mut(i) else { return };
                if !h.sender || h.unanswered || !inner.ready_to_send(h.key) {
                    return;
                }
                let _ = inner.send_data(h.key, Bytes::from(vec![b's'; len]), end);
            }
            Op::Schedule => inner.schedule(),
            Op::GoAway { last } if role == Role::Server => {
                if last {
                    inner.final_go_away();
                } else {
                    inner.go_away();
                }
            }
            Op::GoAway { .. } => {}
        }
        // Held handles whose streams were forgotten would be a bug: `check` finds
        // those (a handle keeps its stream).
        held.retain(|h| h.reader || h.sender);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_header_block_decodes_or_fails_cleanly(block in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut decoder = Decoder::new(4096);
            let block = Bytes::from(block);
            let _ = decoder.decode(&block, |_, _| {});
            let _ = decoder.decode(&block, |_, _| {});
        }

        #[test]
        fn a_server_session_survives_any_frames(ops in proptest::collection::vec(op(), 0..60)) {
            run(Role::Server, ops);
        }

        #[test]
        fn a_client_session_survives_any_frames(ops in proptest::collection::vec(op(), 0..60)) {
            run(Role::Client, ops);
        }
    }
}
