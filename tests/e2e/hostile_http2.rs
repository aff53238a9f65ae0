//! Hostile HTTP/2 clients, frame by frame on a raw TCP connection to a real proxy:
//! a stream id that goes back, a stream id a client may not use, a flood of
//! CONTINUATION frames, a header block beyond the limit. Each is answered with
//! GOAWAY and the right error code, and the proxy serves the next client as before.

use std::net::SocketAddr;
use std::time::Duration;

use tandem::client::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(60);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const DATA: u8 = 0x0;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const PROTOCOL_ERROR: u32 = 0x1;
const STREAM_CLOSED: u32 = 0x5;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// `GET http://web/`, as an HPACK block that leaves the decoder's table alone.
const GET: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x03, b'w', b'e', b'b'];

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// A raw h2c client: the preface and an empty SETTINGS sent, frames read one by one.
struct Raw {
    read: tokio::net::tcp::OwnedReadHalf,
    /// Taken by a test that floods the proxy from a task of its own.
    write: Option<OwnedWriteHalf>,
}

impl Raw {
    async fn connect(proxy: SocketAddr) -> Raw {
        let tcp = TcpStream::connect(proxy)
            .await
            .expect("connect to the proxy");
        let _ = tcp.set_nodelay(true);
        let (read, mut write) = tcp.into_split();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        write.write_all(&hello).await.expect("send the preface");
        Raw {
            read,
            write: Some(write),
        }
    }

    fn writer(&mut self) -> &mut OwnedWriteHalf {
        self.write.as_mut().expect("the writing half")
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer().write_all(bytes).await.expect("send frames");
    }

    /// The next frame, or None once the proxy closed the connection. The proxy's
    /// SETTINGS are acknowledged on the way.
    async fn next(&mut self) -> Option<Frame> {
        let next = async {
            let mut head = [0u8; 9];
            self.read.read_exact(&mut head).await.ok()?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0; len];
            self.read.read_exact(&mut payload).await.ok()?;
            Some(Frame {
                kind: head[3],
                flags: head[4],
                stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
                payload,
            })
        };
        let f = tokio::time::timeout(STEP, next)
            .await
            .unwrap_or_else(|_| panic!("the proxy said nothing for {STEP:?}"))?;
        if f.kind == SETTINGS
            && f.flags & ACK == 0
            && let Some(write) = &mut self.write
        {
            // The proxy may have closed already: then there is no one to tell.
            let _ = write.write_all(&frame(SETTINGS, ACK, 0, &[])).await;
        }
        Some(f)
    }

    /// Reads until the response on `stream` has ended.
    async fn response(&mut self, stream: u32) -> u32 {
        let mut status = None;
        loop {
            let f = self
                .next()
                .await
                .expect("a response before the connection closed");
            assert_ne!(
                f.kind,
                GOAWAY,
                "GOAWAY before the response: {:?}",
                goaway(&f)
            );
            if f.stream != stream {
                continue;
            }
            if f.kind == HEADERS && status.is_none() {
                // `:status 200` is static entry 8; anything else, we only need an answer.
                status = Some(if f.payload.contains(&0x88) { 200 } else { 0 });
            }
            if (f.kind == HEADERS || f.kind == DATA) && f.flags & END_STREAM != 0 {
                return status.expect("a response head");
            }
        }
    }

    /// Reads until GOAWAY: its last stream id and error code. Panics if the proxy
    /// closes without one, or says nothing for [`STEP`].
    async fn goaway(&mut self) -> (u32, u32) {
        loop {
            let f = self
                .next()
                .await
                .expect("GOAWAY before the connection closed");
            if f.kind == GOAWAY {
                return goaway(&f);
            }
        }
    }

    /// Reads until the proxy closes the connection.
    async fn closed(&mut self) {
        while self.next().await.is_some() {}
    }
}

fn goaway(f: &Frame) -> (u32, u32) {
    let word = |at: usize| u32::from_be_bytes(f.payload[at..at + 4].try_into().unwrap());
    (word(0) & 0x7fff_ffff, word(4))
}

/// A normal request on a fresh connection, over HTTP/2.
async fn still_serves(proxy: SocketAddr) {
    let mut conn = Connection::http2(proxy).await.expect("h2c connection");
    let reply = conn
        .get("web", "/")
        .await
        .expect("a request after the attack");
    assert!(
        reply.status.is_success(),
        "{} {}",
        reply.status,
        reply.text()
    );
    assert_eq!(reply.instance(), Some("instance-1"));
}

#[tokio::test]
async fn a_stream_id_below_an_earlier_one_is_a_protocol_error() {
    bounded(LIMIT, async {
        let backend = backend("instance-1").await;
        let proxy = static_proxy(&[backend.addr("http")], &[]).await;
        let addr = proxy.addr("proxy");

        // Stream 5 is served and done; then the client opens 3.
        let mut raw = Raw::connect(addr).await;
        raw.send(&frame(HEADERS, END_HEADERS | END_STREAM, 5, GET))
            .await;
        assert_eq!(raw.response(5).await, 200);
        raw.send(&frame(HEADERS, END_HEADERS | END_STREAM, 3, GET))
            .await;
        assert_eq!(
            raw.goaway().await,
            (5, PROTOCOL_ERROR),
            "stream 3 opened after stream 5"
        );
        raw.closed().await;

        // The same while stream 7 is still open (its body not sent yet).
        let mut raw = Raw::connect(addr).await;
        raw.send(&frame(HEADERS, END_HEADERS, 7, GET)).await;
        raw.send(&frame(HEADERS, END_HEADERS | END_STREAM, 5, GET))
            .await;
        assert_eq!(
            raw.goaway().await,
            (7, PROTOCOL_ERROR),
            "stream 5 opened after stream 7"
        );
        raw.closed().await;

        // HEADERS again on a stream that is over: not a new stream, but a frame on
        // a closed one (RFC 9113 §5.1).
        let mut raw = Raw::connect(addr).await;
        raw.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, GET))
            .await;
        assert_eq!(raw.response(1).await, 200);
        raw.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, GET))
            .await;
        assert_eq!(
            raw.goaway().await,
            (1, STREAM_CLOSED),
            "HEADERS on closed stream 1"
        );
        raw.closed().await;

        // An even stream id: the client's are odd.
        let mut raw = Raw::connect(addr).await;
        raw.send(&frame(HEADERS, END_HEADERS | END_STREAM, 2, GET))
            .await;
        assert_eq!(raw.goaway().await, (0, PROTOCOL_ERROR), "stream 2");
        raw.closed().await;

        still_serves(addr).await;
    })
    .await
}

#[tokio::test]
async fn a_flood_of_empty_continuation_frames_is_cut_off() {
    bounded(LIMIT, async {
        let backend = backend("instance-1").await;
        let proxy = static_proxy(&[backend.addr("http")], &[]).await;
        let addr = proxy.addr("proxy");

        // A header block begun, then empty CONTINUATIONs that never end it: 2
        // million of them, as fast as the proxy takes them.
        let mut raw = Raw::connect(addr).await;
        raw.send(&frame(HEADERS, END_STREAM, 1, &GET[..4])).await;
        const FLOOD: usize = 2_000_000;
        let batch: Vec<u8> = (0..1000)
            .flat_map(|_| frame(CONTINUATION, 0, 1, &[]))
            .collect();
        let mut write = raw.write.take().unwrap();
        let flood = tokio::spawn(async move {
            let mut sent = 0;
            while sent < FLOOD {
                if write.write_all(&batch).await.is_err() {
                    break;
                }
                sent += 1000;
            }
            // Kept open: dropped, it would end the connection for the proxy.
            (sent, write)
        });
        let (last, code) = raw.goaway().await;
        assert_eq!((last, code), (0, ENHANCE_YOUR_CALM), "GOAWAY for the flood");
        raw.closed().await;
        let (sent, _write) = tokio::time::timeout(STEP, flood)
            .await
            .expect("the flood stops once the proxy closed")
            .unwrap();
        assert!(
            sent < FLOOD,
            "the proxy took all {FLOOD} CONTINUATION frames"
        );

        // A few CONTINUATIONs are enough: the proxy does not wait for the
        // flood to grow (what the kernel buffers would hide it).
        let mut raw = Raw::connect(addr).await;
        let mut few = frame(HEADERS, END_STREAM, 1, &GET[..4]);
        for _ in 0..100 {
            few.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        raw.send(&few).await;
        assert_eq!(raw.goaway().await, (0, ENHANCE_YOUR_CALM), "100 frames");
        raw.closed().await;

        // A block that needs a few CONTINUATIONs is taken.
        let mut raw = Raw::connect(addr).await;
        let mut split = frame(HEADERS, END_STREAM, 1, &GET[..2]);
        split.extend(frame(CONTINUATION, 0, 1, &GET[2..4]));
        split.extend(frame(CONTINUATION, 0, 1, &[]));
        split.extend(frame(CONTINUATION, END_HEADERS, 1, &GET[4..]));
        raw.send(&split).await;
        assert_eq!(raw.response(1).await, 200);

        still_serves(addr).await;
    })
    .await
}

#[tokio::test]
async fn a_header_block_beyond_the_limit_across_continuations_is_refused() {
    bounded(LIMIT, async {
        let backend = backend("instance-1").await;
        let proxy = static_proxy(&[backend.addr("http")], &[]).await;
        let addr = proxy.addr("proxy");

        // Full 16 KiB CONTINUATIONs: the block grows until the proxy stops it, long
        // before the 64 × 16 KiB sent (its limit is a few hundred KiB).
        let mut raw = Raw::connect(addr).await;
        raw.send(&frame(HEADERS, END_STREAM, 1, GET)).await;
        let mut write = raw.write.take().unwrap();
        let block = frame(CONTINUATION, 0, 1, &[0x40; 16 * 1024]);
        let sender = tokio::spawn(async move {
            for _ in 0..64 {
                if write.write_all(&block).await.is_err() {
                    break;
                }
            }
            write
        });
        assert_eq!(raw.goaway().await, (0, ENHANCE_YOUR_CALM));
        raw.closed().await;
        tokio::time::timeout(STEP, sender)
            .await
            .expect("the sender stops once the proxy closed")
            .unwrap();

        still_serves(addr).await;
    })
    .await
}
