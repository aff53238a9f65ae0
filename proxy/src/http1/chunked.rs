//! Where a chunked body ends (RFC 9112 §7.1), without decoding it.
//!
//! The HTTP/1 path forwards a chunked body byte for byte: both hops are HTTP/1.1, so
//! re-encoding would only cost copies. It still has to know where the body ends, to
//! reuse the connection and to never forward a byte of the next message. This reads
//! chunk sizes, skips chunk data in one step per buffer, and follows the trailer
//! section to its empty line. It is strict where leniency lets two parsers disagree
//! about the end of a message (request smuggling): bare LF, sizes that overflow, and
//! control characters are errors.

/// Longest chunk-size line (size, extensions) accepted, as a guard against endless lines.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a chunk-size line (no digit seen yet).
    SizeStart,
    /// Reading hex digits of the chunk size.
    Size,
    /// After the size: chunk extensions up to CR.
    Extension,
    /// CR seen at the end of the size line; LF must follow.
    SizeLf,
    /// Inside chunk data.
    Data,
    /// After chunk data: CR, then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    /// Inside a trailer field line, up to CR.
    Trailer,
    /// CR seen at the end of a trailer line.
    TrailerLf,
    /// CR of the final empty line seen; LF ends the body.
    EndLf,
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunked encoding: {0}")]
    Invalid(&'static str),
}

/// Follows a chunked body through the buffers it arrives in.
#[derive(Debug, Clone)]
pub struct ChunkedBody {
    state: State,
    /// Data bytes left in the current chunk (or the size being read).
    remaining: u64,
    /// Bytes in the current size or trailer line, bounded by [`MAX_LINE`].
    line: usize,
}

impl Default for ChunkedBody {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedBody {
    pub fn new() -> Self {
        Self {
            state: State::SizeStart,
            remaining: 0,
            line: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes the body's bytes at the front of `bytes` and returns how many there
    /// were: all of them, or fewer when the body ends inside `bytes` (then
    /// [`is_done`](Self::is_done) is true and the rest belongs to what follows).
    pub fn advance(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        self.step(bytes, false)
    }

    /// Data bytes that follow at once, when inside a chunk's data (for decoding: the
    /// caller takes up to this many as data, then passes them to [`advance`](Self::advance)).
    pub fn data_left(&self) -> Option<u64> {
        (self.state == State::Data).then_some(self.remaining)
    }

    /// Like [`advance`](Self::advance), but stops where chunk data begins, so what
    /// it consumed is framing only (sizes, CRLFs, trailers).
    pub fn advance_framing(&mut self, bytes: &[u8]) -> Result<usize, ChunkError> {
        self.step(bytes, true)
    }

    fn step(&mut self, bytes: &[u8], stop_at_data: bool) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                State::Data if stop_at_data => return Ok(i),
                State::Data => {
                    let take = ((bytes.len() - i) as u64).min(self.remaining) as usize;
                    self.remaining -= take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::SizeStart | State::Size => {
                    if let Some(digit) = hex(b) {
                        if self.remaining > (u64::MAX >> 4) {
                            return Err(ChunkError::Invalid("chunk size overflows"));
                        }
                        self.remaining = (self.remaining << 4) | digit as u64;
                        self.state = State::Size;
                    } else if self.state == State::SizeStart {
                        return Err(ChunkError::Invalid("chunk size is not hexadecimal"));
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = State::Extension;
                    } else {
                        return Err(ChunkError::Invalid("unexpected byte after chunk size"));
                    }
                    self.line_byte()?;
                }
                State::Extension => {
                    if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if is_control(b) {
                        return Err(ChunkError::Invalid("control character in chunk extension"));
                    }
                    self.line_byte()?;
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Invalid("chunk size line not ended by CRLF"));
                    }
                    self.line = 0;
                    if self.remaining == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.state = State::Data;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::Invalid("chunk data not followed by CRLF"));
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Invalid("chunk data not followed by CRLF"));
                    }
                    self.state = State::SizeStart;
                }
                State::TrailerStart => {
                    if b == b'\r' {
                        self.state = State::EndLf;
                    } else if is_control(b) || b == b' ' || b == b'\t' {
                        return Err(ChunkError::Invalid("malformed trailer line"));
                    } else {
                        self.state = State::Trailer;
                        self.line_byte()?;
                    }
                }
                State::Trailer => {
                    if b == b'\r' {
                        self.state = State::TrailerLf;
                    } else if is_control(b) {
                        return Err(ChunkError::Invalid("control character in trailer"));
                    }
                    self.line_byte()?;
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Invalid("trailer line not ended by CRLF"));
                    }
                    self.line = 0;
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Invalid("chunked body not ended by CRLF"));
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
                State::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn line_byte(&mut self) -> Result<(), ChunkError> {
        self.line += 1;
        if self.line > MAX_LINE {
            return Err(ChunkError::Invalid("chunk size or trailer line too long"));
        }
        Ok(())
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Control characters other than horizontal tab (CR and LF included).
fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn whole(body: &[u8]) -> Result<usize, ChunkError> {
        let mut c = ChunkedBody::new();
        let n = c.advance(body)?;
        assert!(c.is_done(), "body not finished");
        Ok(n)
    }

    #[test]
    fn finds_the_end_of_a_body() {
        let body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\n\r\n";
        assert_eq!(whole(body), Ok(body.len()));
        let with_next = b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n";
        assert_eq!(whole(with_next), Ok(13));
    }

    #[test]
    fn follows_trailers() {
        let body = b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-t: 1\r\n\r\nNEXT";
        assert_eq!(whole(body), Ok(body.len() - 4));
    }

    #[test]
    fn rejects_what_parsers_could_disagree_on() {
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhello\n0\r\n\r\n",
            b"x\r\n",
            b"fffffffffffffffff\r\n",
            b"5\r\nhelloXX",
            b"0\r\n\r\r",
            b"0\r\n bad: folded\r\n\r\n",
            b"5 \x01\r\n",
        ] {
            let mut c = ChunkedBody::new();
            assert!(
                c.advance(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn bounds_line_length() {
        let mut line = b"1;".to_vec();
        line.extend(std::iter::repeat_n(b'a', MAX_LINE + 1));
        assert!(ChunkedBody::new().advance(&line).is_err());
    }

    /// Encodes `chunks` (and trailers) the way a server would.
    fn encode(chunks: &[Vec<u8>], trailers: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend(chunk);
            out.extend(b"\r\n");
        }
        out.extend(b"0\r\n");
        for (name, value) in trailers {
            out.extend(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend(b"\r\n");
        out
    }

    proptest! {
        /// However the bytes are split into reads, the end is found exactly where the
        /// encoder put it, and nothing after it is consumed.
        #[test]
        fn any_split_finds_the_same_end(
            chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..6),
            trailers in prop::collection::vec(("[a-z][a-z0-9-]{0,10}", "[ -~]{0,20}"), 0..3),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let body = encode(&chunks, &trailers);
            let mut stream = body.clone();
            stream.extend(b"HTTP/1.1 200 OK\r\n");
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len())).collect();
            points.push(0);
            points.push(stream.len());
            points.sort_unstable();
            points.dedup();
            let mut c = ChunkedBody::new();
            let mut consumed = 0;
            for w in points.windows(2) {
                if c.is_done() {
                    break;
                }
                let n = c.advance(&stream[w[0]..w[1]]).unwrap();
                consumed += n;
                if n < w[1] - w[0] {
                    prop_assert!(c.is_done());
                }
            }
            prop_assert!(c.is_done());
            prop_assert_eq!(consumed, body.len());
        }
    }
}
