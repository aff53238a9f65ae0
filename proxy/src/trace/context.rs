//! The trace context a request carries: W3C `traceparent` (what the proxy writes) and
//! B3 (accepted: the single `b3` header and the `x-b3-*` ones), read from header bytes
//! so the own HTTP/1 path and header maps share one parser, and written into a
//! fixed 55-byte buffer: no allocation either way.
//!
//! `tracestate` is never touched: it travels with the request as it came.

use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

/// The header the proxy writes.
pub const TRACEPARENT: &str = "traceparent";
/// Length of a version-00 `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;

/// The trace context headers of one request, as found (values only).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Found<'a> {
    pub traceparent: Option<&'a [u8]>,
    pub b3: Option<&'a [u8]>,
    pub b3_trace_id: Option<&'a [u8]>,
    pub b3_span_id: Option<&'a [u8]>,
    pub b3_sampled: Option<&'a [u8]>,
}

impl<'a> Found<'a> {
    /// Notes `name: value` if it is a trace context header. Dispatches on the
    /// name's length first: most headers are rejected by one comparison.
    #[inline]
    pub fn offer(&mut self, name: &[u8], value: &'a [u8]) {
        let slot = match name.len() {
            11 if name.eq_ignore_ascii_case(b"traceparent") => &mut self.traceparent,
            2 if name.eq_ignore_ascii_case(b"b3") => &mut self.b3,
            12 if name.eq_ignore_ascii_case(b"x-b3-traceid") => &mut self.b3_trace_id,
            11 if name.eq_ignore_ascii_case(b"x-b3-spanid") => &mut self.b3_span_id,
            12 if name.eq_ignore_ascii_case(b"x-b3-sampled") => &mut self.b3_sampled,
            _ => return,
        };
        // The first of a repeated header wins, as most tracers read them.
        slot.get_or_insert(value);
    }

    /// The trace context headers of a header map (one pass over the names).
    pub fn of_headers(headers: &'a http::HeaderMap) -> Self {
        let mut found = Found::default();
        for (name, value) in headers {
            found.offer(name.as_str().as_bytes(), value.as_bytes());
        }
        found
    }

    /// Whether any trace context header was there.
    pub fn any(&self) -> bool {
        self.traceparent.is_some() || self.b3.is_some() || self.b3_trace_id.is_some()
    }

    /// The parent context: `traceparent` if valid, else B3. `None`: none, or invalid
    /// (the request then starts a trace of its own, as W3C says).
    pub fn parent(&self) -> Option<SpanContext> {
        self.traceparent
            .and_then(parse_traceparent)
            .or_else(|| self.b3.and_then(parse_b3_single))
            .or_else(|| parse_b3_multi(self.b3_trace_id?, self.b3_span_id?, self.b3_sampled))
    }
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        // W3C says lowercase; B3 implementations write either.
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `N` bytes from exactly `2N` hex digits.
fn hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *o = hex_nibble(pair[0])? << 4 | hex_nibble(pair[1])?;
    }
    Some(out)
}

fn remote(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> Option<SpanContext> {
    let trace_id = TraceId::from_bytes(trace_id);
    let span_id = SpanId::from_bytes(span_id);
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::NONE,
    ))
}

/// `version-traceid-spanid-flags` (W3C Trace Context level 1). A future version may
/// append fields after the flags (`-...`); version `ff` is invalid.
pub fn parse_traceparent(value: &[u8]) -> Option<SpanContext> {
    let value = value.trim_ascii();
    if value.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = hex::<1>(&value[0..2])?[0];
    if version == 0xff
        || (version == 0 && value.len() != TRACEPARENT_LEN)
        || (value.len() > TRACEPARENT_LEN && value[TRACEPARENT_LEN] != b'-')
        || value[2] != b'-'
        || value[35] != b'-'
        || value[52] != b'-'
    {
        return None;
    }
    let trace_id = hex::<16>(&value[3..35])?;
    let span_id = hex::<8>(&value[36..52])?;
    let flags = hex::<1>(&value[53..55])?[0];
    remote(trace_id, span_id, flags & 1 == 1)
}

/// A 64-bit B3 trace id is the low half of a 128-bit one.
fn b3_trace_id(digits: &[u8]) -> Option<[u8; 16]> {
    match digits.len() {
        32 => hex::<16>(digits),
        16 => {
            let low = hex::<8>(digits)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

/// `1`, `d` (debug) and `true` mean sampled.
fn b3_sampled(value: &[u8]) -> bool {
    matches!(value.trim_ascii(), b"1" | b"d" | b"true")
}

/// `b3: traceid-spanid[-sampled[-parentspanid]]`. A bare sampling decision (`b3: 0`)
/// carries no ids, so no parent.
pub fn parse_b3_single(value: &[u8]) -> Option<SpanContext> {
    let mut parts = value.trim_ascii().split(|b| *b == b'-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = hex::<8>(parts.next()?)?;
    let sampled = parts.next().is_some_and(b3_sampled);
    remote(trace_id, span_id, sampled)
}

/// `x-b3-traceid`, `x-b3-spanid` and `x-b3-sampled`.
pub fn parse_b3_multi(
    trace_id: &[u8],
    span_id: &[u8],
    sampled: Option<&[u8]>,
) -> Option<SpanContext> {
    let trace_id = b3_trace_id(trace_id.trim_ascii())?;
    let span_id = hex::<8>(span_id.trim_ascii())?;
    remote(trace_id, span_id, sampled.is_some_and(b3_sampled))
}

/// The `traceparent` value for `context` (version 00).
pub fn traceparent(context: &SpanContext) -> [u8; TRACEPARENT_LEN] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; TRACEPARENT_LEN];
    let mut put = |at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            out[at + 2 * i] = DIGITS[(b >> 4) as usize];
            out[at + 2 * i + 1] = DIGITS[(b & 0xf) as usize];
        }
    };
    put(0, &[0]);
    put(3, &context.trace_id().to_bytes());
    put(36, &context.span_id().to_bytes());
    put(53, &[context.trace_flags().to_u8() & 1]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_the_w3c_example() {
        let cx = parse_traceparent(EXAMPLE).unwrap();
        assert_eq!(
            format!("{:032x}", cx.trace_id()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(format!("{:016x}", cx.span_id()), "00f067aa0ba902b7");
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(&traceparent(&cx)[..], EXAMPLE);
    }

    #[test]
    fn refuses_what_w3c_calls_invalid() {
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            b"",
        ] {
            assert!(
                parse_traceparent(bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // A later version may add fields; its first four are read.
        assert!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let cx = parse_b3_single(b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1").unwrap();
        assert!(cx.is_sampled());
        let cx = parse_b3_single(b"64fe8b2a57d3eff7-e457b5a2e4d86bd1-0").unwrap();
        assert!(!cx.is_sampled());
        assert_eq!(
            format!("{:032x}", cx.trace_id()),
            "000000000000000064fe8b2a57d3eff7"
        );
        assert!(
            parse_b3_single(b"0").is_none(),
            "a bare decision has no ids"
        );
        let mut found = Found::default();
        found.offer(b"X-B3-TraceId", b"463ac35c9f6413ad48485a3953bb6124");
        found.offer(b"X-B3-SpanId", b"a2fb4a1d1a96d312");
        found.offer(b"X-B3-Sampled", b"1");
        let cx = found.parent().unwrap();
        assert!(cx.is_sampled());
        assert_eq!(format!("{:016x}", cx.span_id()), "a2fb4a1d1a96d312");
    }

    #[test]
    fn traceparent_wins_over_b3() {
        let mut found = Found::default();
        found.offer(
            b"b3",
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
        );
        found.offer(b"Traceparent", EXAMPLE);
        assert_eq!(&traceparent(&found.parent().unwrap())[..], EXAMPLE);
        assert!(found.any());
        assert!(!Found::default().any());
    }

    proptest! {
        #[test]
        fn what_is_written_reads_back(
            trace in any::<[u8; 16]>(),
            span in any::<[u8; 8]>(),
            sampled in any::<bool>(),
        ) {
            let written = remote(trace, span, sampled);
            prop_assume!(written.is_some());
            let written = written.unwrap();
            let read = parse_traceparent(&traceparent(&written)).unwrap();
            prop_assert_eq!(read.trace_id(), written.trace_id());
            prop_assert_eq!(read.span_id(), written.span_id());
            prop_assert_eq!(read.is_sampled(), sampled);
        }

        #[test]
        fn any_bytes_are_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = parse_traceparent(&bytes);
            let _ = parse_b3_single(&bytes);
        }
    }
}
