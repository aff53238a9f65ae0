//! HPACK's tables (RFC 7541 §2.3): the static table every peer knows, and the
//! decoder's dynamic table of fields the peer chose to index.

use std::collections::VecDeque;
use std::sync::OnceLock;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};

/// A decoded header field, parsed once when it enters a table so that an indexed
/// field (most fields of most messages) costs a clone, not a parse.
#[derive(Debug, Clone)]
pub enum Field {
    Authority(Bytes),
    Method(Bytes),
    Scheme(Bytes),
    Path(Bytes),
    Status(Bytes),
    /// Extended CONNECT's `:protocol` (RFC 8441), which this end does not offer.
    Protocol,
    /// A pseudo-header no RFC defines: the message is malformed.
    UnknownPseudo,
    Header(HeaderName, HeaderValue),
    /// A field whose name is not valid HTTP (upper-case, say): the message is
    /// malformed, but the field still occupies the table.
    Invalid,
    /// A valid name with a value that is not (a newline in it): malformed too, but
    /// the name may be reused with a good value.
    InvalidValue(HeaderName),
}

impl Field {
    /// The same field with another value, as a literal with an indexed name makes it.
    pub fn with_value(&self, value: Bytes, sensitive: bool) -> Field {
        match self {
            Field::Authority(_) => Field::Authority(value),
            Field::Method(_) => Field::Method(value),
            Field::Scheme(_) => Field::Scheme(value),
            Field::Path(_) => Field::Path(value),
            Field::Status(_) => Field::Status(value),
            Field::Protocol => Field::Protocol,
            Field::UnknownPseudo => Field::UnknownPseudo,
            Field::Header(name, _) | Field::InvalidValue(name) => {
                header(name.clone(), value, sensitive)
            }
            Field::Invalid => Field::Invalid,
        }
    }

    /// The same field owning its value, not sharing the buffer it was decoded from.
    pub fn detached(&self) -> Field {
        let copy = |b: &Bytes| Bytes::copy_from_slice(b);
        match self {
            Field::Authority(v) => Field::Authority(copy(v)),
            Field::Method(v) => Field::Method(copy(v)),
            Field::Scheme(v) => Field::Scheme(copy(v)),
            Field::Path(v) => Field::Path(copy(v)),
            Field::Status(v) => Field::Status(copy(v)),
            Field::Header(name, value) => {
                let sensitive = value.is_sensitive();
                header(
                    name.clone(),
                    Bytes::copy_from_slice(value.as_bytes()),
                    sensitive,
                )
            }
            other => other.clone(),
        }
    }

    /// A field from a literal name and value.
    pub fn parse(name: &[u8], value: Bytes, sensitive: bool) -> Field {
        match name {
            b":authority" => Field::Authority(value),
            b":method" => Field::Method(value),
            b":scheme" => Field::Scheme(value),
            b":path" => Field::Path(value),
            b":status" => Field::Status(value),
            b":protocol" => Field::Protocol,
            [b':', ..] => Field::UnknownPseudo,
            // HTTP/2 names are lower-case; `from_lowercase` refuses anything else.
            _ => match HeaderName::from_lowercase(name) {
                Ok(name) => header(name, value, sensitive),
                Err(_) => Field::Invalid,
            },
        }
    }
}

fn header(name: HeaderName, value: Bytes, sensitive: bool) -> Field {
    match HeaderValue::from_maybe_shared(value) {
        Ok(mut value) => {
            value.set_sensitive(sensitive);
            Field::Header(name, value)
        }
        Err(_) => Field::InvalidValue(name),
    }
}

#[cfg(test)]
impl Field {
    /// Name and value as text, for tests; a sensitive value is marked so.
    pub fn describe(&self) -> (String, String) {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            Field::Authority(v) => (":authority".into(), text(v)),
            Field::Method(v) => (":method".into(), text(v)),
            Field::Scheme(v) => (":scheme".into(), text(v)),
            Field::Path(v) => (":path".into(), text(v)),
            Field::Status(v) => (":status".into(), text(v)),
            Field::Header(n, v) if v.is_sensitive() => {
                (n.to_string(), text(v.as_bytes()) + " (sensitive)")
            }
            Field::Header(n, v) => (n.to_string(), text(v.as_bytes())),
            other => (format!("{other:?}"), String::new()),
        }
    }
}

/// A table entry's size (RFC 7541 §4.1).
pub fn entry_size(name_len: usize, value_len: usize) -> usize {
    name_len + value_len + 32
}

/// The static table's names and values, index 1 first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

pub const STATIC_LEN: usize = STATIC.len();

/// Static entry `index` (1-based), parsed.
pub fn static_field(index: usize) -> &'static Field {
    static FIELDS: OnceLock<Vec<Field>> = OnceLock::new();
    let fields = FIELDS.get_or_init(|| {
        STATIC
            .iter()
            .map(|(name, value)| {
                Field::parse(name.as_bytes(), Bytes::from_static(value.as_bytes()), false)
            })
            .collect()
    });
    &fields[index - 1]
}

/// The static index of a header name, for encoding it as an indexed name.
pub fn static_name_index(name: &HeaderName) -> Option<u8> {
    use http::header::*;
    // Standard names compare as enum values, not strings.
    let index = if name == CONTENT_TYPE {
        31
    } else if name == CONTENT_LENGTH {
        28
    } else if name == DATE {
        33
    } else if name == SERVER {
        54
    } else if name == USER_AGENT {
        58
    } else if name == ACCEPT {
        19
    } else if name == ACCEPT_ENCODING {
        16
    } else if name == CACHE_CONTROL {
        24
    } else if name == HOST {
        38
    } else {
        return STATIC
            .iter()
            .position(|(n, _)| !n.starts_with(':') && *n == name.as_str())
            .map(|i| i as u8 + 1);
    };
    Some(index)
}

/// The decoder's dynamic table: newest entry first.
pub struct DynamicTable {
    /// Each field with its name's length (for the size of entries that reuse the
    /// name) and its entry size.
    entries: VecDeque<(Field, usize, usize)>,
    size: usize,
    max_size: usize,
}

impl DynamicTable {
    pub fn new(max_size: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            size: 0,
            max_size,
        }
    }

    /// Entry `index` of the combined index space (static first), if there is one:
    /// the field, the length of its name and its size.
    pub fn get(&self, index: usize) -> Option<(&Field, usize, usize)> {
        match index {
            0 => None,
            1..=STATIC_LEN => {
                let (name, value) = STATIC[index - 1];
                let size = entry_size(name.len(), value.len());
                Some((static_field(index), name.len(), size))
            }
            _ => self
                .entries
                .get(index - STATIC_LEN - 1)
                .map(|(field, name_len, size)| (field, *name_len, *size)),
        }
    }

    pub fn insert(&mut self, field: Field, name_len: usize, value_len: usize) {
        let size = entry_size(name_len, value_len);
        if size > self.max_size {
            // An entry larger than the table empties it and is not added (§4.4).
            self.entries.clear();
            self.size = 0;
            return;
        }
        while self.size + size > self.max_size {
            self.evict();
        }
        self.size += size;
        self.entries.push_front((field, name_len, size));
    }

    pub fn set_max_size(&mut self, max_size: usize) {
        self.max_size = max_size;
        while self.size > self.max_size {
            self.evict();
        }
    }

    fn evict(&mut self) {
        if let Some((_, _, size)) = self.entries.pop_back() {
            self.size -= size;
        }
    }

    #[cfg(test)]
    pub fn size(&self) -> usize {
        self.size
    }
}
