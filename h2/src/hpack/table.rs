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
    // A match on the text: compiled to a dispatch on length and a compare or two, for
    // names the `http` crate knows and for custom ones alike (a scan of the table
    // cost a custom name hundreds of instructions, and most messages carry one).
    let index = match name.as_str() {
        "accept-charset" => 15,
        "accept-encoding" => 16,
        "accept-language" => 17,
        "accept-ranges" => 18,
        "accept" => 19,
        "access-control-allow-origin" => 20,
        "age" => 21,
        "allow" => 22,
        "authorization" => 23,
        "cache-control" => 24,
        "content-disposition" => 25,
        "content-encoding" => 26,
        "content-language" => 27,
        "content-length" => 28,
        "content-location" => 29,
        "content-range" => 30,
        "content-type" => 31,
        "cookie" => 32,
        "date" => 33,
        "etag" => 34,
        "expect" => 35,
        "expires" => 36,
        "from" => 37,
        "host" => 38,
        "if-match" => 39,
        "if-modified-since" => 40,
        "if-none-match" => 41,
        "if-range" => 42,
        "if-unmodified-since" => 43,
        "last-modified" => 44,
        "link" => 45,
        "location" => 46,
        "max-forwards" => 47,
        "proxy-authenticate" => 48,
        "proxy-authorization" => 49,
        "range" => 50,
        "referer" => 51,
        "refresh" => 52,
        "retry-after" => 53,
        "server" => 54,
        "set-cookie" => 55,
        "strict-transport-security" => 56,
        "transfer-encoding" => 57,
        "user-agent" => 58,
        "vary" => 59,
        "via" => 60,
        "www-authenticate" => 61,
        _ => return None,
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

#[cfg(test)]
mod static_names {
    use super::*;

    /// The match names every name of the static table by its first entry, and
    /// nothing else.
    #[test]
    fn every_static_name_has_its_first_index() {
        for (i, (name, _)) in STATIC.iter().enumerate() {
            if name.starts_with(':') {
                continue;
            }
            let first = STATIC.iter().position(|(n, _)| n == name).unwrap() as u8 + 1;
            let header = HeaderName::from_static(name);
            assert_eq!(
                static_name_index(&header),
                Some(first),
                "{name} (entry {})",
                i + 1
            );
        }
        for custom in ["x-tandem-instance", "tandem-app-protocol", "acceptx", "dat"] {
            assert_eq!(
                static_name_index(&HeaderName::from_static(custom)),
                None,
                "{custom}"
            );
        }
    }
}
