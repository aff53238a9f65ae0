//! HPACK encoding as a proxy wants it: every field a literal the peer does not add
//! to its dynamic table, names indexed from the static table where they can be, no
//! Huffman coding. Nothing is kept per connection and a field costs a few byte
//! copies; HAProxy encodes the same way. The price is a few dozen bytes more per
//! message than an indexing encoder would send.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri};

use super::table::static_name_index;
use crate::message::is_connection_specific;

/// A request's header block: pseudo-headers from `method` and `uri` (`:authority`
/// from `host` when the URI has none), then `headers` without those HTTP/2 forbids.
pub fn request(out: &mut Vec<u8>, method: &Method, uri: &Uri, headers: &HeaderMap) {
    match *method {
        Method::GET => out.push(0x82),
        Method::POST => out.push(0x83),
        _ => literal(out, Some(2), "", method.as_str().as_bytes(), false),
    }
    let authority = uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| headers.get(header::HOST).map(HeaderValue::as_bytes));
    if *method != Method::CONNECT {
        match uri.scheme_str() {
            Some("https") => out.push(0x87),
            Some("http") | None => out.push(0x86),
            Some(other) => literal(out, Some(6), "", other.as_bytes(), false),
        }
        match uri.path_and_query().map(|p| p.as_str()) {
            Some("/") | None | Some("") => out.push(0x84),
            Some(path) => literal(out, Some(4), "", path.as_bytes(), false),
        }
    }
    if let Some(authority) = authority {
        literal(out, Some(1), "", authority, false);
    }
    fields(out, headers);
}

/// A response's header block.
pub fn response(out: &mut Vec<u8>, status: StatusCode, headers: &HeaderMap) {
    let indexed = match status.as_u16() {
        200 => Some(0x88),
        204 => Some(0x89),
        206 => Some(0x8a),
        304 => Some(0x8b),
        400 => Some(0x8c),
        404 => Some(0x8d),
        500 => Some(0x8e),
        _ => None,
    };
    match indexed {
        Some(byte) => out.push(byte),
        None => literal(out, Some(8), "", status.as_str().as_bytes(), false),
    }
    fields(out, headers);
}

/// A trailers block: the fields alone.
pub fn trailers(out: &mut Vec<u8>, headers: &HeaderMap) {
    fields(out, headers);
}

/// The fields, less those HTTP/2 forbids ([`is_connection_specific`]): sent, they
/// are dropped, not refused: a message from HTTP/1 may carry them, and they mean
/// nothing past this hop.
fn fields(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        if is_connection_specific(name, value) {
            continue;
        }
        literal(
            out,
            static_name_index(name),
            name.as_str(),
            value.as_bytes(),
            value.is_sensitive(),
        );
    }
}

/// A literal field without indexing (or never indexed, if `sensitive`: RFC 7541
/// §6.2.3 asks intermediaries to keep that), its name from the static table when
/// `name_index` is given.
fn literal(out: &mut Vec<u8>, name_index: Option<u8>, name: &str, value: &[u8], sensitive: bool) {
    let flags = if sensitive { 0x10 } else { 0x00 };
    match name_index {
        Some(index) => integer(out, index as usize, 4, flags),
        None => {
            out.push(flags);
            string(out, name.as_bytes());
        }
    }
    string(out, value);
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, s.len(), 7, 0);
    out.extend_from_slice(s);
}

/// An integer with an N-bit prefix (RFC 7541 §5.1), `flags` in the prefix byte's
/// upper bits.
fn integer(out: &mut Vec<u8>, value: usize, prefix: u8, flags: u8) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | mask as u8);
    let mut rest = value - mask;
    while rest >= 0x80 {
        out.push(0x80 | (rest & 0x7f) as u8);
        rest >>= 7;
    }
    out.push(rest as u8);
}

#[cfg(test)]
mod tests {
    use super::super::decoder::Decoder;
    use super::*;
    use bytes::Bytes;

    fn decoded(block: Vec<u8>) -> Vec<String> {
        let mut out = Vec::new();
        Decoder::new(4096)
            .decode(&Bytes::from(block), |f, _| {
                let (name, value) = f.describe();
                out.push(format!("{name}={value}"));
            })
            .unwrap();
        out
    }

    #[test]
    fn a_request_round_trips_without_connection_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert("x-long", HeaderValue::from_str(&"v".repeat(300)).unwrap());
        let mut secret = HeaderValue::from_static("Bearer x");
        secret.set_sensitive(true);
        headers.insert(header::AUTHORIZATION, secret);
        let mut out = Vec::new();
        let uri: Uri = "http://web.default:80/greet.Greeter/SayHello?x=1"
            .parse()
            .unwrap();
        request(&mut out, &Method::PUT, &uri, &headers);
        assert_eq!(
            decoded(out),
            vec![
                ":method=PUT".to_string(),
                ":scheme=http".into(),
                ":path=/greet.Greeter/SayHello?x=1".into(),
                ":authority=web.default:80".into(),
                "content-type=application/grpc".into(),
                "te=trailers".into(),
                format!("x-long={}", "v".repeat(300)),
                "authorization=Bearer x (sensitive)".into(),
            ]
        );
    }

    #[test]
    fn statuses_and_authority_from_host() {
        let mut out = Vec::new();
        response(&mut out, StatusCode::OK, &HeaderMap::new());
        response(
            &mut out,
            StatusCode::from_u16(503).unwrap(),
            &HeaderMap::new(),
        );
        assert_eq!(decoded(out), vec![":status=200", ":status=503"]);
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("web:80"));
        let mut out = Vec::new();
        request(&mut out, &Method::GET, &"/".parse().unwrap(), &headers);
        assert_eq!(
            decoded(out),
            vec![
                ":method=GET",
                ":scheme=http",
                ":path=/",
                ":authority=web:80",
                "host=web:80"
            ]
        );
    }
}
