//! The HTTP/1 response head parser (`tandem_proxy::http1::head::parse_response`),
//! the rewrite the proxy sends to HTTP/1 clients (`rewrite_response`) and the header
//! map made for HTTP/2 clients (`parse_response_parts`). The bytes come from a backend.
//!
//! Checks, beyond "no panic":
//! - an accepted head lies within the buffer; what follows it changes nothing, and
//!   every strict prefix of it is "incomplete"; waiting for a head by its empty line
//!   (`response_head_end`) finds the same end;
//! - a response to HEAD, a 1xx, 204 or 304 has no body;
//! - the rewritten head is CRLF-only, and the same parser reads it as the same
//!   response: same length, status and body framing (a client that frames the body
//!   differently from the proxy desynchronises the connection), nothing left to
//!   rewrite, and `connection: close` when the proxy closes the client connection;
//! - `parse_response_parts` never hands on hop-by-hop or framing headers.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tandem_proxy::http1::head::{
    Framing, parse_response, parse_response_parts, response_head_end, rewrite_response,
};

fuzz_target!(|buf: &[u8]| {
    for request_is_head in [false, true] {
        check(buf, request_is_head);
    }
});

fn check(buf: &[u8], request_is_head: bool) {
    let Ok(Some(head)) = parse_response(buf, request_is_head) else {
        return;
    };
    assert!(head.len <= buf.len(), "head longer than the buffer");
    let raw = &buf[..head.len];
    assert_eq!(parse_response(raw, request_is_head), Ok(Some(head.clone())));
    // Waiting for a head by its empty line finds the end httparse finds.
    assert_eq!(
        response_head_end(buf),
        Some(head.len),
        "where the head ends"
    );
    let prefixes: Box<dyn Iterator<Item = usize>> = if head.len <= 1024 {
        Box::new(0..head.len)
    } else {
        Box::new(
            (0..head.len)
                .step_by(head.len / 256)
                .chain(head.len - 8..head.len),
        )
    };
    for p in prefixes {
        assert_eq!(
            parse_response(&buf[..p], request_is_head),
            Ok(None),
            "prefix of {p} bytes judged before the head is complete"
        );
    }
    if request_is_head || (100..200).contains(&head.status) || matches!(head.status, 204 | 304) {
        assert_eq!(head.framing, Framing::Empty);
    }

    for close_client in [false, true] {
        let mut out = Vec::new();
        rewrite_response(raw, close_client, &mut out);
        assert!(crlf_only(&out), "rewritten head with a bare LF");
        assert!(out.starts_with(b"HTTP/1.1 "));
        assert!(out.ends_with(b"\r\n\r\n"));
        if close_client {
            // Read back without the line the proxy adds (which may be one header
            // beyond what the proxy itself reads from a backend; a client takes it).
            const CLOSE: &[u8] = b"connection: close\r\n\r\n";
            assert!(out.ends_with(CLOSE), "no connection: close");
            out.truncate(out.len() - CLOSE.len());
            out.extend_from_slice(b"\r\n");
        }
        match parse_response(&out, request_is_head) {
            Ok(Some(again)) => {
                assert_eq!(again.len, out.len());
                assert_eq!(again.status, head.status);
                assert_eq!(
                    again.framing,
                    head.framing,
                    "the client would frame the body differently: {:?} -> {:?}",
                    String::from_utf8_lossy(raw),
                    String::from_utf8_lossy(&out)
                );
                assert!(!again.rewrite, "left to rewrite after the rewrite");
            }
            other => panic!(
                "the rewritten head of an accepted response is not accepted ({other:?}): {:?} -> {:?}",
                String::from_utf8_lossy(raw),
                String::from_utf8_lossy(&out)
            ),
        }
    }

    let bytes = Bytes::copy_from_slice(raw);
    if let Ok((_, status, headers)) = parse_response_parts(&bytes, request_is_head) {
        assert_eq!(status.as_u16(), head.status);
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!headers.contains_key(name), "{name} handed on");
        }
    }
}

/// Whether every LF in `head` ends a CRLF.
fn crlf_only(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .all(|(i, b)| *b != b'\n' || (i > 0 && head[i - 1] == b'\r'))
}
