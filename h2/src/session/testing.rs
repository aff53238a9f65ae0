//! Helpers for the session's unit tests: a session fed raw frames under its lock,
//! and what it wrote, frame by frame.

use std::sync::Arc;

use bytes::Bytes;

use super::{Config, Fatal, Inner, Role, Session};
use crate::frame::{self, Head, Reason};

/// Small windows and buffers, so that limits are reached in a few frames.
pub fn config() -> Config {
    Config {
        max_concurrent_streams: 100,
        stream_window: 65_535,
        connection_window: 65_535,
        max_header_list: 16 * 1024,
        max_send_buffer: 16 * 1024,
        ..Config::default()
    }
}

/// A frame's bytes.
pub fn raw(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::put_head(&mut out, payload.len(), kind, flags, stream);
    out.extend_from_slice(payload);
    out
}

/// `GET http://a/`, as a block that leaves the decoder's table alone.
pub const GET: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
/// `:status 200`.
pub const OK: &[u8] = &[0x88];
pub const WHOLE: u8 = frame::END_HEADERS | frame::END_STREAM;

/// Hands the session one frame (given whole, as bytes).
pub fn try_feed(inner: &mut Inner, bytes: Vec<u8>) -> Result<(), Fatal> {
    let head = Head::parse(&bytes);
    let payload = Bytes::from(bytes).slice(frame::HEADER_LEN..);
    inner.on_frame(head, payload)
}

/// Hands the session one frame, which must not be a connection error.
pub fn feed(inner: &mut Inner, bytes: Vec<u8>) {
    let head = Head::parse(&bytes);
    if let Err(Fatal(reason, why)) = try_feed(inner, bytes) {
        panic!("{head:?}: {reason}: {why}");
    }
}

/// The frame a connection error would send, as [`sent`] lists it.
pub fn fatal_reason(result: Result<(), Fatal>) -> Reason {
    match result {
        Ok(()) => panic!("no connection error"),
        Err(Fatal(reason, _)) => reason,
    }
}

/// A frame as written: kind, flags, stream, payload.
pub type Sent = (u8, u8, u32, Vec<u8>);

/// The frames written since the last call (the client preface skipped).
pub fn sent(inner: &mut Inner) -> Vec<Sent> {
    let out = std::mem::take(&mut inner.out);
    let mut at = if out.starts_with(frame::PREFACE) {
        frame::PREFACE.len()
    } else {
        0
    };
    let mut frames = Vec::new();
    while at < out.len() {
        let head = Head::parse(&out[at..]);
        let payload = out[at + frame::HEADER_LEN..][..head.len].to_vec();
        frames.push((head.kind, head.flags, head.stream, payload));
        at += frame::HEADER_LEN + head.len;
    }
    frames
}

/// A RST_STREAM as [`sent`] lists it.
pub fn rst(stream: u32, reason: Reason) -> Sent {
    (
        frame::RST_STREAM,
        0,
        stream,
        reason.0.to_be_bytes().to_vec(),
    )
}

/// A WINDOW_UPDATE as [`sent`] lists it.
pub fn window_update(stream: u32, increment: u32) -> Sent {
    (
        frame::WINDOW_UPDATE,
        0,
        stream,
        increment.to_be_bytes().to_vec(),
    )
}

/// A session past its SETTINGS exchange (the peer's empty SETTINGS read, what this
/// end wrote so far taken out).
pub fn session(role: Role, config: Config) -> Arc<Session> {
    let session = Session::new(role, config);
    {
        let mut inner = session.lock();
        feed(&mut inner, raw(frame::SETTINGS, 0, 0, &[]));
        sent(&mut inner);
    }
    session
}
