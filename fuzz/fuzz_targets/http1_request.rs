//! The HTTP/1 request head parser of the proxy's own HTTP/1 path
//! (`tandem_proxy::http1::head::parse_request`) and the rewrite of an accepted head
//! (`rewrite_request`), with the body limit the proxy uses (`http1::MAX_BODY`).
//!
//! Beyond "no panic", it checks what the forwarding relies on:
//! - an accepted head lies within the buffer, ends in CRLF CRLF, has CRLF line ends
//!   only, a valid Host inside it and a body within the limit;
//! - the result does not depend on what follows the head, and every strict prefix
//!   of it is "incomplete" (a head that arrives in pieces is judged as a whole);
//! - the rewritten head (hop-by-hop headers removed) is CRLF-only and is read by the
//!   same parser as the same request: same length, same body length, same Host,
//!   nothing left to rewrite. A backend that frames the body differently from the
//!   proxy is request smuggling.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_proxy::http1::MAX_BODY;
use tandem_proxy::http1::head::{parse_request, rewrite_request, valid_host};

fuzz_target!(|buf: &[u8]| {
    let Ok(Some(head)) = parse_request(buf, MAX_BODY) else {
        return;
    };
    assert!(head.len <= buf.len(), "head longer than the buffer");
    let raw = &buf[..head.len];
    assert!(raw.ends_with(b"\r\n\r\n"), "head does not end in CRLF CRLF");
    assert!(crlf_only(raw), "accepted head with a bare LF");
    assert!(head.content_length <= MAX_BODY, "body beyond the limit");
    let (start, end) = head.host.expect("accepted without a Host");
    assert!(start <= end && end <= head.len, "Host outside the head");
    assert!(valid_host(&buf[start..end]));

    // What follows the head changes nothing; no strict prefix is already judged.
    assert_eq!(parse_request(raw, MAX_BODY), Ok(Some(head.clone())));
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
            parse_request(&buf[..p], MAX_BODY),
            Ok(None),
            "prefix of {p} bytes judged before the head is complete"
        );
    }

    let mut out = Vec::new();
    rewrite_request(buf, &mut out, None);
    assert!(crlf_only(&out), "rewritten head with a bare LF");
    assert!(
        out.ends_with(b"\r\n\r\n"),
        "rewritten head not ended by CRLF CRLF"
    );
    match parse_request(&out, MAX_BODY) {
        Ok(Some(again)) => {
            assert_eq!(
                again.len,
                out.len(),
                "rewritten head read with another length"
            );
            assert_eq!(
                again.content_length,
                head.content_length,
                "the backend would read another body length: {:?} -> {:?}",
                String::from_utf8_lossy(raw),
                String::from_utf8_lossy(&out)
            );
            assert_eq!(again.host(&out), head.host(buf), "another Host");
            assert_eq!(again.is_head, head.is_head);
            assert_eq!(again.idempotent, head.idempotent);
            if head.rewrite {
                assert!(!again.rewrite, "hop-by-hop headers left after the rewrite");
            }
        }
        other => panic!(
            "the rewritten head of an accepted request is not accepted ({other:?}): {:?} -> {:?}",
            String::from_utf8_lossy(raw),
            String::from_utf8_lossy(&out)
        ),
    }
});

/// Whether every LF in `head` ends a CRLF.
fn crlf_only(head: &[u8]) -> bool {
    head.iter()
        .enumerate()
        .all(|(i, b)| *b != b'\n' || (i > 0 && head[i - 1] == b'\r'))
}
