//! HTTP/2 frames (RFC 9113 §4, §6): the 9-byte frame header, the error codes, and
//! writing each frame this end sends straight into a connection's output buffer.

use std::fmt;

pub const HEADER_LEN: usize = 9;
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// SETTINGS_MAX_FRAME_SIZE: its default (what this end accepts) and its ceiling.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 16_384;
pub const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;
/// Flow-control windows: the initial size of every window, and the largest any may grow to.
pub const DEFAULT_WINDOW: u32 = 65_535;
pub const MAX_WINDOW: u32 = (1 << 31) - 1;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_HEADER_TABLE_SIZE: u16 = 0x1;
pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// An HTTP/2 error code, as RST_STREAM and GOAWAY carry it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0x0);
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub const INTERNAL_ERROR: Reason = Reason(0x2);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    pub const CANCEL: Reason = Reason(0x8);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);

    fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x4 => "SETTINGS_TIMEOUT",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xa => "CONNECT_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            0xc => "INADEQUATE_SECURITY",
            0xd => "HTTP_1_1_REQUIRED",
            _ => return None,
        })
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "error code {:#x}", self.0),
        }
    }
}

impl fmt::Debug for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A frame's header.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize,
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & MAX_WINDOW,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

pub fn put_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&head_bytes(len, kind, flags, stream));
}

fn head_bytes(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; HEADER_LEN] {
    let [_, l1, l2, l3] = (len as u32).to_be_bytes();
    let [s1, s2, s3, s4] = stream.to_be_bytes();
    [l1, l2, l3, kind, flags, s1, s2, s3, s4]
}

pub fn put_data(out: &mut Vec<u8>, stream: u32, data: &[u8], end_stream: bool) {
    let flags = if end_stream { END_STREAM } else { 0 };
    put_head(out, data.len(), DATA, flags, stream);
    out.extend_from_slice(data);
}

/// Starts a HEADERS frame whose header block the caller appends next; returns where
/// the frame begins, for [`finish_headers`].
pub fn start_headers(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    start
}

/// Completes the HEADERS frame begun at `start` (its block is everything after the
/// header), splitting a block larger than `max_frame_size` into CONTINUATION frames.
pub fn finish_headers(
    out: &mut Vec<u8>,
    start: usize,
    stream: u32,
    end_stream: bool,
    max_frame_size: usize,
) {
    let block_len = out.len() - start - HEADER_LEN;
    let end = if end_stream { END_STREAM } else { 0 };
    if block_len <= max_frame_size {
        let head = head_bytes(block_len, HEADERS, end | END_HEADERS, stream);
        out[start..start + HEADER_LEN].copy_from_slice(&head);
        return;
    }
    // Rare: a block beyond one frame. Re-lay it out as HEADERS + CONTINUATIONs.
    let block = out.split_off(start + HEADER_LEN);
    out.truncate(start);
    for (i, chunk) in block.chunks(max_frame_size).enumerate() {
        let last = (i + 1) * max_frame_size >= block.len();
        let flags = if last { END_HEADERS } else { 0 };
        if i == 0 {
            put_head(out, chunk.len(), HEADERS, end | flags, stream);
        } else {
            put_head(out, chunk.len(), CONTINUATION, flags, stream);
        }
        out.extend_from_slice(chunk);
    }
}

pub fn put_rst(out: &mut Vec<u8>, stream: u32, reason: Reason) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&reason.0.to_be_bytes());
}

pub fn put_settings(out: &mut Vec<u8>, settings: &[(u16, u32)]) {
    put_head(out, settings.len() * 6, SETTINGS, 0, 0);
    for (id, value) in settings {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
    }
}

pub fn put_settings_ack(out: &mut Vec<u8>) {
    put_head(out, 0, SETTINGS, ACK, 0);
}

pub fn put_ping(out: &mut Vec<u8>, ack: bool, payload: [u8; 8]) {
    put_head(out, 8, PING, if ack { ACK } else { 0 }, 0);
    out.extend_from_slice(&payload);
}

pub fn put_goaway(out: &mut Vec<u8>, last_stream: u32, reason: Reason) {
    put_head(out, 8, GOAWAY, 0, 0);
    out.extend_from_slice(&last_stream.to_be_bytes());
    out.extend_from_slice(&reason.0.to_be_bytes());
}

pub fn put_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

/// A frame's payload without its padding (RFC 9113 §6.1), or None if the padding
/// is longer than the payload.
pub fn unpadded(head: &Head, payload: &[u8]) -> Option<(usize, usize)> {
    if !head.has(PADDED) {
        return Some((0, payload.len()));
    }
    let pad = *payload.first()? as usize;
    let end = payload.len().checked_sub(pad)?;
    (end >= 1).then_some((1, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_header_block_is_split_into_continuations() {
        let mut out = vec![0xaa];
        let start = start_headers(&mut out);
        out.extend(std::iter::repeat_n(7u8, 40));
        finish_headers(&mut out, start, 3, true, 16);
        let mut at = 1;
        let mut frames = Vec::new();
        while at < out.len() {
            let head = Head::parse(&out[at..]);
            frames.push((head.kind, head.flags, head.len, head.stream));
            at += HEADER_LEN + head.len;
        }
        assert_eq!(
            frames,
            vec![
                (HEADERS, END_STREAM, 16, 3),
                (CONTINUATION, 0, 16, 3),
                (CONTINUATION, END_HEADERS, 8, 3)
            ]
        );
    }

    #[test]
    fn padding_is_checked() {
        let head = Head {
            len: 4,
            kind: DATA,
            flags: PADDED,
            stream: 1,
        };
        assert_eq!(unpadded(&head, &[2, b'a', 0, 0]), Some((1, 2)));
        assert_eq!(unpadded(&head, &[4, b'a', 0, 0]), None);
    }
}
