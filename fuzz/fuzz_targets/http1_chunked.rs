//! The chunked-body tracker (`tandem_proxy::http1::chunked::ChunkedBody`): `advance`
//! (relaying: where does the body end?) and `advance_framing` + `data_left`
//! (decoding: which bytes are data?), fed the body whole and split at
//! fuzzer-chosen points, as reads would deliver it.
//!
//! Input: one byte `n` (cut points: n % 16), then n little-endian u16 cut offsets
//! (taken modulo the body's length + 1), then the body bytes.
//!
//! Checks: no call consumes more than it is given; a call that consumes less has
//! found the end; how the bytes are split changes nothing (same end, same error,
//! same data); decoding consumes exactly what relaying does and its data and
//! framing add up to it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_proxy::http1::chunked::{ChunkError, ChunkedBody};

/// How one way of reading the body ended.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    consumed: usize,
    done: bool,
    error: Option<ChunkError>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let cuts_len = (n as usize % 16) * 2;
    if rest.len() < cuts_len {
        return;
    }
    let (cuts, body) = rest.split_at(cuts_len);
    let mut points: Vec<usize> = cuts
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize % (body.len() + 1))
        .collect();
    points.push(0);
    points.push(body.len());
    points.sort_unstable();
    points.dedup();
    let pieces: Vec<&[u8]> = points.windows(2).map(|w| &body[w[0]..w[1]]).collect();

    let whole = relay(&[body]);
    let split = relay(&pieces);
    assert_eq!(whole, split, "splitting the body changed where it ends");

    let (decoded_whole, data_whole) = decode(&[body]);
    let (decoded_split, data_split) = decode(&pieces);
    assert_eq!(
        decoded_whole, decoded_split,
        "splitting changed the decoding"
    );
    assert_eq!(data_whole, data_split, "splitting changed the data");
    assert_eq!(
        decoded_whole, whole,
        "decoding and relaying disagree on the body"
    );
    if whole.error.is_none() {
        assert!(data_whole.len() <= whole.consumed, "more data than body");
    }
});

/// As the HTTP/1 path relays a body: `advance` over each read.
fn relay(pieces: &[&[u8]]) -> Outcome {
    let mut body = ChunkedBody::new();
    let mut consumed = 0;
    for piece in pieces {
        match body.advance(piece) {
            Ok(n) => {
                assert!(n <= piece.len(), "consumed {n} of {} bytes", piece.len());
                consumed += n;
                if n < piece.len() {
                    assert!(body.is_done(), "stopped early without finding the end");
                    break;
                }
            }
            Err(error) => {
                // What earlier reads consumed is not comparable: an error is an error.
                return Outcome {
                    consumed: 0,
                    done: body.is_done(),
                    error: Some(error),
                };
            }
        }
        if body.is_done() {
            break;
        }
    }
    Outcome {
        consumed,
        done: body.is_done(),
        error: None,
    }
}

/// As `http1::client` decodes a body: framing with `advance_framing`, then the data
/// `data_left` announces, passed to `advance`. Returns the outcome and the data.
fn decode(pieces: &[&[u8]]) -> (Outcome, Vec<u8>) {
    let mut body = ChunkedBody::new();
    let mut consumed = 0;
    let mut data = Vec::new();
    let mut error = None;
    'reads: for piece in pieces {
        let mut buf: &[u8] = piece;
        loop {
            let framing = match body.advance_framing(buf) {
                Ok(n) => n,
                Err(e) => {
                    error = Some(e);
                    break 'reads;
                }
            };
            assert!(framing <= buf.len(), "framing beyond the buffer");
            consumed += framing;
            buf = &buf[framing..];
            if body.is_done() {
                break 'reads;
            }
            let Some(left) = body.data_left() else {
                assert!(buf.is_empty(), "stopped inside framing with bytes left");
                continue 'reads;
            };
            assert!(left > 0, "inside data with none left");
            if buf.is_empty() {
                continue 'reads;
            }
            let take = left.min(buf.len() as u64) as usize;
            match body.advance(&buf[..take]) {
                Ok(n) => assert_eq!(n, take, "data bytes not all consumed"),
                Err(e) => panic!("advancing over announced data failed: {e}"),
            }
            data.extend_from_slice(&buf[..take]);
            consumed += take;
            buf = &buf[take..];
        }
    }
    let done = body.is_done();
    if error.is_some() {
        consumed = 0;
    }
    (
        Outcome {
            consumed,
            done,
            error,
        },
        data,
    )
}
