//! The proxy's HTTP/2 from the wire: frame headers (`h2/src/frame.rs`: `Head::parse`,
//! `unpadded`) and every frame's payload as the connection handles it
//! (`h2/src/connection.rs` reading into `h2/src/session/`: SETTINGS, HEADERS and
//! CONTINUATION through HPACK and message checks, DATA and flow control, RST_STREAM,
//! PING, GOAWAY, WINDOW_UPDATE, PRIORITY, PUSH_PROMISE), in either role, with an
//! application on top that reads bodies and answers, as `http2::serve` and
//! `http2::client` do. Everything runs in memory, polled with a no-op waker.
//!
//! Input: one mode byte, then the peer's bytes (a server is given the connection
//! preface first unless the mode says otherwise).
//! - bit 0: role: 0 = the proxy serves a client, 1 = the proxy is a backend's client;
//! - bits 1-3: how the bytes are cut into reads (whole, 1, 7, 64, 512, 4096, 9, 16384);
//! - bit 4: server: do not prepend the preface;
//! - bits 5-6: what the application does with each stream (see `Behaviour`);
//! - bit 7: small windows (64 KiB) rather than the server's 1 MiB.
//!
//! Checks, beyond "no panic" and no runaway memory: every frame header seen in the
//! input has its padding inside its payload (`unpadded`), and what the proxy writes
//! is whole frames whose header blocks decode.

#![no_main]

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use libfuzzer_sys::fuzz_target;
use tandem_h2::Reason;
use tandem_h2::fuzzing::{Config, Connection, Decoder, HEADER_LEN, Head, PREFACE, unpadded};
use tandem_h2::streams::{Client, RecvStream, SendResponse, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const READ_SIZES: [usize; 8] = [usize::MAX, 1, 7, 64, 512, 4096, 9, 16_384];
/// Rounds after the input is all read, for the application to finish.
const DRAIN_ROUNDS: usize = 8;
/// Streams the client role opens at most.
const MAX_REQUESTS: usize = 6;

/// The peer: hands out the input one read at a time (Pending between reads, so the
/// application runs between them), then end of stream; keeps what is written.
struct Peer {
    input: Vec<u8>,
    at: usize,
    read_size: usize,
    /// The last read returned data: the next poll is Pending.
    paused: bool,
    output: Rc<RefCell<Vec<u8>>>,
}

impl AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.paused {
            self.paused = false;
            return Poll::Pending;
        }
        let n = (self.input.len() - self.at)
            .min(self.read_size)
            .min(buf.remaining());
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        self.paused = n > 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Half of a large write at a time: writes are partial too.
        let n = if buf.len() > 4096 {
            buf.len() / 2
        } else {
            buf.len()
        };
        self.output.borrow_mut().extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// What the application does with each stream.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Reads the whole body and trailers, then answers with a body larger than a
    /// window, and trailers.
    Echo,
    /// Answers at once without a body and stops reading.
    Quick,
    /// Resets the stream at once.
    Reset,
    /// Answers at once with a body while still reading, then drops everything.
    Stream,
}

fn config(small: bool) -> Config {
    let window = if small { 65_535 } else { 1024 * 1024 };
    Config {
        max_concurrent_streams: if small { 4 } else { 1024 },
        stream_window: window,
        connection_window: window,
        max_header_list: 64 * 1024,
        max_send_buffer: 64 * 1024,
        ..Config::default()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, peer_bytes)) = data.split_first() else {
        return;
    };
    check_frame_heads(peer_bytes);
    let client_role = mode & 1 == 1;
    let read_size = READ_SIZES[(mode >> 1) as usize & 7];
    let behaviour = match (mode >> 5) & 3 {
        0 => Behaviour::Echo,
        1 => Behaviour::Quick,
        2 => Behaviour::Reset,
        _ => Behaviour::Stream,
    };
    let small = mode & 0x80 != 0;
    let mut input = Vec::with_capacity(peer_bytes.len() + PREFACE.len());
    if !client_role && mode & 0x10 == 0 {
        input.extend_from_slice(PREFACE);
    }
    input.extend_from_slice(peer_bytes);
    let output = Rc::new(RefCell::new(Vec::new()));
    let peer = Peer {
        input,
        at: 0,
        read_size,
        paused: false,
        output: output.clone(),
    };
    let mut cx = Context::from_waker(Waker::noop());
    if client_role {
        run_client(peer, config(small), behaviour, &mut cx);
    } else {
        run_server(peer, config(small), behaviour, &mut cx);
    }
    check_output(&output.borrow(), client_role);
});

/// Walks the input as frames and checks what `frame.rs` says of each.
fn check_frame_heads(mut bytes: &[u8]) {
    if bytes.starts_with(PREFACE) {
        bytes = &bytes[PREFACE.len()..];
    }
    while bytes.len() >= HEADER_LEN {
        let head = Head::parse(&bytes[..HEADER_LEN]);
        assert!(head.len < 1 << 24 && head.stream < 1 << 31);
        let payload = &bytes[HEADER_LEN..];
        let payload = &payload[..head.len.min(payload.len())];
        if let Some((start, end)) = unpadded(&head, payload) {
            assert!(
                start <= end && end <= payload.len(),
                "padding outside the payload"
            );
        }
        bytes = &bytes[(HEADER_LEN + head.len).min(bytes.len())..];
    }
}

/// An accepted request and the application's state for it.
struct ServerStream {
    body: Option<RecvStream>,
    respond: Option<SendResponse>,
    send: Option<SendStream>,
    /// Response body bytes still to send.
    to_send: usize,
    body_done: bool,
}

fn response_head(trailers_follow: bool) -> http::response::Parts {
    let mut head = Response::new(()).into_parts().0;
    head.headers
        .insert("x-fuzz", HeaderValue::from_static("answer"));
    if trailers_follow {
        head.headers
            .insert("trailer", HeaderValue::from_static("grpc-status"));
    }
    head
}

fn trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from_static("0"));
    t
}

/// Reads what is there of a body; true once it (and its trailers) ended or failed.
fn drain(body: &mut RecvStream, cx: &mut Context<'_>) -> bool {
    loop {
        match body.poll_data(cx) {
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Ready(Some(Err(_))) => return true,
            Poll::Ready(None) => break,
            Poll::Pending => return false,
        }
    }
    !matches!(body.poll_trailers(cx), Poll::Pending)
}

/// Sends what the windows take of the rest of a response body; then trailers.
fn pump(send: &mut Option<SendStream>, to_send: &mut usize, cx: &mut Context<'_>) {
    while let Some(s) = send {
        match s.poll_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => {
                *send = None;
                return;
            }
            Poll::Pending => return,
        }
        if *to_send == 0 {
            let _ = s.send_trailers(trailers());
            *send = None;
            return;
        }
        let n = (*to_send).min(10_000);
        *to_send -= n;
        if s.send_data(Bytes::from(vec![b'x'; n]), false).is_err() {
            *send = None;
        }
    }
}

fn run_server(peer: Peer, config: Config, behaviour: Behaviour, cx: &mut Context<'_>) {
    let mut conn = Connection::server(peer, config);
    let mut streams: Vec<ServerStream> = Vec::new();
    let mut after_end = 0;
    loop {
        let over = conn.poll_read(cx).is_ready();
        while let Some((req, respond)) = conn.accept() {
            let (_, body) = req.into_parts();
            let mut s = ServerStream {
                body: Some(body),
                respond: Some(respond),
                send: None,
                to_send: 70_000,
                body_done: false,
            };
            match behaviour {
                Behaviour::Echo => {}
                Behaviour::Quick => {
                    let respond = s.respond.take().expect("just set");
                    let _ = respond.send_response(&response_head(false), true);
                    s.body = None;
                }
                Behaviour::Reset => {
                    let respond = s.respond.take().expect("just set");
                    respond.send_reset(Reason::CANCEL);
                }
                Behaviour::Stream => {
                    let respond = s.respond.take().expect("just set");
                    s.send = respond
                        .send_response(&response_head(true), false)
                        .ok()
                        .flatten();
                }
            }
            streams.push(s);
        }
        for s in &mut streams {
            if let Some(body) = &mut s.body
                && !s.body_done
            {
                s.body_done = drain(body, cx);
            }
            if s.body_done
                && let Some(respond) = s.respond.take()
            {
                s.send = respond
                    .send_response(&response_head(true), false)
                    .ok()
                    .flatten();
            }
            pump(&mut s.send, &mut s.to_send, cx);
        }
        let _ = conn.poll_flush(cx);
        if over || conn.finished() {
            after_end += 1;
            if after_end > DRAIN_ROUNDS {
                break;
            }
        }
    }
    // The application goes away (the streams' handles drop), then the connection.
    drop(streams);
    let _ = conn.poll_flush(cx);
}

/// A request the client role sent and its response, as `http2::client` reads it.
struct ClientStream {
    response: Option<
        Pin<Box<dyn Future<Output = Result<Response<RecvStream>, tandem_h2::Error>>>>,
    >,
    body: Option<RecvStream>,
    send: Option<SendStream>,
    to_send: usize,
}

fn open(client: &Client, n: usize, behaviour: Behaviour) -> Option<ClientStream> {
    let uri: Uri = format!("http://backend:8080/r/{n}?q=1").parse().ok()?;
    let mut headers = HeaderMap::new();
    headers.insert("x-request", HeaderValue::from(n));
    let with_body = n % 2 == 1;
    let method = if with_body { Method::POST } else { Method::GET };
    let (response, send) = client
        .send_request(&method, &uri, &headers, !with_body)
        .ok()?;
    let mut s = ClientStream {
        response: Some(Box::pin(response)),
        body: None,
        send,
        to_send: 70_000,
    };
    if let Behaviour::Reset = behaviour
        && let Some(send) = &mut s.send
    {
        send.send_reset(Reason::CANCEL, "cancelled by the fuzzer");
    }
    Some(s)
}

fn run_client(peer: Peer, config: Config, behaviour: Behaviour, cx: &mut Context<'_>) {
    let (mut conn, client) = Connection::client(peer, config);
    let mut client = Some(client);
    let mut streams: Vec<ClientStream> = Vec::new();
    let mut opened = 0;
    let mut after_end = 0;
    loop {
        let over = conn.poll_read(cx).is_ready();
        if let Some(c) = &client
            && opened < MAX_REQUESTS
            && !c.is_closed()
        {
            if let Some(s) = open(c, opened, behaviour) {
                streams.push(s);
            }
            opened += 1;
        }
        for s in &mut streams {
            if let Some(response) = &mut s.response
                && let Poll::Ready(result) = response.as_mut().poll(cx)
            {
                s.response = None;
                if let Ok(response) = result {
                    match behaviour {
                        Behaviour::Quick => {}
                        _ => s.body = Some(response.into_body()),
                    }
                }
            }
            if let Some(body) = &mut s.body
                && drain(body, cx)
            {
                s.body = None;
            }
            pump(&mut s.send, &mut s.to_send, cx);
        }
        if let Behaviour::Stream = behaviour
            && opened >= MAX_REQUESTS
        {
            // The pool lets the connection go.
            client = None;
        }
        let _ = conn.poll_flush(cx);
        if over || conn.finished() {
            after_end += 1;
            if after_end > DRAIN_ROUNDS {
                break;
            }
        }
    }
    drop(streams);
    drop(client);
    let _ = conn.poll_flush(cx);
}

/// What the proxy wrote: the preface (client), then whole frames; every header
/// block decodes with a fresh HPACK decoder (the encoder never indexes).
fn check_output(mut out: &[u8], client_role: bool) {
    if client_role {
        assert!(out.starts_with(PREFACE), "the client preface is missing");
        out = &out[PREFACE.len()..];
    }
    let mut block: Option<Vec<u8>> = None;
    while !out.is_empty() {
        assert!(out.len() >= HEADER_LEN, "a partial frame header written");
        let head = Head::parse(&out[..HEADER_LEN]);
        assert!(
            out.len() >= HEADER_LEN + head.len,
            "a partial frame written"
        );
        let payload = &out[HEADER_LEN..HEADER_LEN + head.len];
        match head.kind {
            0x1 => {
                assert!(block.is_none(), "HEADERS inside a header block");
                block = Some(payload.to_vec());
            }
            0x9 => block
                .as_mut()
                .expect("CONTINUATION outside a header block")
                .extend_from_slice(payload),
            _ => assert!(block.is_none(), "a frame inside a header block"),
        }
        if matches!(head.kind, 0x1 | 0x9) && head.flags & 0x4 != 0 {
            let b = Bytes::from(block.take().expect("checked above"));
            Decoder::new(4096)
                .decode(&b, |_, _| {})
                .expect("the proxy wrote a header block that does not decode");
        }
        out = &out[HEADER_LEN + head.len..];
    }
}
