//! A decoded header block made into a request, a response or trailers, with the
//! checks RFC 9113 §8 asks of a receiver: a message that fails them is malformed
//! (a stream error), never handed on.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, StatusCode, Uri, Version, request, response};

use super::hpack::{DecodeError, Decoder, Field};

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `name` only describes one connection (hop-by-hop, RFC 9110 §7.6.1) and
/// must not be forwarded: the connection-specific fields RFC 9113 §8.2.2 names,
/// which HTTP/2 forbids (`te` but as `trailers`: see [`is_connection_specific`]).
#[inline]
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Whether a field may not appear in an HTTP/2 message (RFC 9113 §8.2.2): a
/// hop-by-hop header, `te` only as `trailers`. A message received with one is
/// malformed; one sent has them dropped.
#[inline]
pub fn is_connection_specific(name: &HeaderName, value: &HeaderValue) -> bool {
    is_hop_by_hop(name) && !(name == header::TE && value == "trailers")
}

/// The fields of one header block, sorted into pseudo-headers and the rest.
#[derive(Default)]
pub struct Block {
    method: Option<Bytes>,
    scheme: Option<Bytes>,
    authority: Option<Bytes>,
    path: Option<Bytes>,
    status: Option<Bytes>,
    pub headers: HeaderMap,
    /// Why the message is malformed, if it is.
    malformed: Option<&'static str>,
    /// Its size as SETTINGS_MAX_HEADER_LIST_SIZE counts it.
    pub size: usize,
}

impl Block {
    /// Decodes `block`; fields beyond `max_size` are decoded (to keep the table in
    /// step) but not kept.
    pub fn decode(
        decoder: &mut Decoder,
        block: &Bytes,
        max_size: usize,
    ) -> Result<Block, DecodeError> {
        let mut this = Block::default();
        decoder.decode(block, |field, size| {
            this.size += size;
            if this.size <= max_size {
                this.add(field);
            }
        })?;
        Ok(this)
    }

    pub fn too_large(&self, max_size: usize) -> bool {
        self.size > max_size
    }

    fn add(&mut self, field: Field) {
        let (slot, value) = match field {
            Field::Header(name, value) => {
                if is_connection_specific(&name, &value) {
                    self.malformed = Some("a connection-specific header");
                }
                self.headers.append(name, value);
                return;
            }
            Field::Method(v) => (&mut self.method, v),
            Field::Scheme(v) => (&mut self.scheme, v),
            Field::Authority(v) => (&mut self.authority, v),
            Field::Path(v) => (&mut self.path, v),
            Field::Status(v) => (&mut self.status, v),
            Field::Protocol => {
                self.malformed =
                    Some("the :protocol pseudo-header (extended CONNECT is not offered)");
                return;
            }
            Field::UnknownPseudo => {
                self.malformed = Some("an unknown pseudo-header");
                return;
            }
            Field::Invalid | Field::InvalidValue(_) => {
                self.malformed = Some("an invalid header name or value");
                return;
            }
        };
        if slot.is_some() {
            self.malformed = Some("a repeated pseudo-header");
        }
        *slot = Some(value);
        if !self.headers.is_empty() {
            self.malformed = Some("a pseudo-header after a regular header");
        }
    }

    fn has_pseudo(&self) -> bool {
        self.method.is_some()
            || self.scheme.is_some()
            || self.authority.is_some()
            || self.path.is_some()
            || self.status.is_some()
    }

    pub fn into_request(self) -> Result<request::Parts, &'static str> {
        if let Some(why) = self.malformed {
            return Err(why);
        }
        if self.status.is_some() {
            return Err(":status in a request");
        }
        let method = self.method.ok_or("no :method")?;
        let method = Method::from_bytes(&method).map_err(|_| "an invalid :method")?;
        let mut uri = http::uri::Parts::default();
        if let Some(authority) = self.authority {
            uri.authority =
                Some(Authority::from_maybe_shared(authority).map_err(|_| "an invalid :authority")?);
        }
        if method == Method::CONNECT {
            if self.scheme.is_some() || self.path.is_some() || uri.authority.is_none() {
                return Err("CONNECT without :authority alone");
            }
        } else {
            let scheme = self.scheme.ok_or("no :scheme")?;
            let path = self.path.filter(|p| !p.is_empty()).ok_or("no :path")?;
            uri.scheme = Some(Scheme::try_from(&scheme[..]).map_err(|_| "an invalid :scheme")?);
            uri.path_and_query =
                Some(PathAndQuery::from_maybe_shared(path).map_err(|_| "an invalid :path")?);
            if uri.authority.is_none() {
                // A URI with a scheme needs an authority; HTTP/2 allows leaving it to Host.
                uri.scheme = None;
            }
        }
        let uri = Uri::from_parts(uri).map_err(|_| "an invalid request target")?;
        let (mut parts, ()) = http::Request::new(()).into_parts();
        parts.method = method;
        parts.uri = uri;
        parts.version = Version::HTTP_2;
        parts.headers = self.headers;
        Ok(parts)
    }

    pub fn into_response(self) -> Result<response::Parts, &'static str> {
        if let Some(why) = self.malformed {
            return Err(why);
        }
        if self.method.is_some()
            || self.scheme.is_some()
            || self.authority.is_some()
            || self.path.is_some()
        {
            return Err("a request pseudo-header in a response");
        }
        let status = self.status.ok_or("no :status")?;
        let status = StatusCode::from_bytes(&status).map_err(|_| "an invalid :status")?;
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.version = Version::HTTP_2;
        parts.headers = self.headers;
        Ok(parts)
    }

    pub fn into_trailers(self) -> Result<HeaderMap, &'static str> {
        if let Some(why) = self.malformed {
            return Err(why);
        }
        if self.has_pseudo() {
            return Err("a pseudo-header in trailers");
        }
        Ok(self.headers)
    }
}

/// The body length a message announces, which its DATA frames must add up to
/// (RFC 9113 §8.1.1). `Err` if the header does not parse.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, &'static str> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let parse = |v: &http::HeaderValue| {
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let length = parse(first).ok_or("an invalid content-length")?;
    if values.any(|v| parse(v) != Some(length)) {
        return Err("conflicting content-length values");
    }
    Ok(Some(length))
}
