//! HPACK decoding (RFC 7541 §6): a header block into fields, keeping the dynamic
//! table in step with the peer's encoder.

use bytes::Bytes;

use super::huffman;
use super::table::{DynamicTable, Field};

/// Why a header block could not be decoded: the connection's compression state is
/// lost (a COMPRESSION_ERROR for the whole connection, RFC 9113 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("a header block ends in the middle of a field")]
    Truncated,
    #[error("an integer in a header block is too large")]
    IntegerOverflow,
    #[error("a header block refers to table entry {0}, which does not exist")]
    BadIndex(usize),
    #[error("a Huffman-coded string does not decode")]
    Huffman,
    #[error("a dynamic table size update to {0} bytes exceeds the {1} allowed")]
    TableTooLarge(usize, usize),
    #[error("a dynamic table size update after the first field")]
    LateSizeUpdate,
}

pub struct Decoder {
    table: DynamicTable,
    /// The largest table the peer may ask for: our SETTINGS_HEADER_TABLE_SIZE.
    max_allowed: usize,
}

impl Decoder {
    pub fn new(max_size: usize) -> Self {
        Self {
            table: DynamicTable::new(max_size),
            max_allowed: max_size,
        }
    }

    /// Decodes `block`, calling `field` with each field and its size (RFC 7541 §4.1,
    /// which is what SETTINGS_MAX_HEADER_LIST_SIZE counts). Literal strings are
    /// slices of `block`, not copies.
    pub fn decode(
        &mut self,
        block: &Bytes,
        mut field: impl FnMut(Field, usize),
    ) -> Result<(), DecodeError> {
        let mut pos = 0;
        let mut first = true;
        while pos < block.len() {
            let byte = block[pos];
            if byte & 0x80 != 0 {
                // Indexed field (§6.1).
                let index = integer(block, &mut pos, 7)?;
                let (f, _, size) = self.table.get(index).ok_or(DecodeError::BadIndex(index))?;
                field(f.clone(), size);
            } else if byte & 0xc0 == 0x40 {
                // Literal with incremental indexing (§6.2.1).
                let (f, name_len, value_len) = self.literal(block, &mut pos, 6, false)?;
                let size = super::table::entry_size(name_len, value_len);
                // The table keeps its own copy: a slice would keep the whole read
                // buffer it came in alive for as long as the entry lives.
                self.table.insert(f.detached(), name_len, value_len);
                field(f, size);
            } else if byte & 0xe0 == 0x20 {
                // Dynamic table size update (§6.3).
                if !first {
                    return Err(DecodeError::LateSizeUpdate);
                }
                let size = integer(block, &mut pos, 5)?;
                if size > self.max_allowed {
                    return Err(DecodeError::TableTooLarge(size, self.max_allowed));
                }
                self.table.set_max_size(size);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001) (§6.2.2, §6.2.3).
                let sensitive = byte & 0x10 != 0;
                let (f, name_len, value_len) = self.literal(block, &mut pos, 4, sensitive)?;
                field(f, super::table::entry_size(name_len, value_len));
            }
            first = false;
        }
        Ok(())
    }

    /// A literal field: an indexed or literal name, then a literal value.
    fn literal(
        &self,
        block: &Bytes,
        pos: &mut usize,
        prefix: u8,
        sensitive: bool,
    ) -> Result<(Field, usize, usize), DecodeError> {
        let index = integer(block, pos, prefix)?;
        if index == 0 {
            let name = string(block, pos)?;
            let value = string(block, pos)?;
            let (name_len, value_len) = (name.len(), value.len());
            Ok((Field::parse(&name, value, sensitive), name_len, value_len))
        } else {
            let (named, name_len, _) = self.table.get(index).ok_or(DecodeError::BadIndex(index))?;
            let value = string(block, pos)?;
            let value_len = value.len();
            Ok((named.with_value(value, sensitive), name_len, value_len))
        }
    }
}

/// An integer with an N-bit prefix (§5.1), from `block[*pos]` on.
fn integer(block: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, DecodeError> {
    let mask = (1u16 << prefix) as usize - 1;
    let first = *block.get(*pos).ok_or(DecodeError::Truncated)? as usize & mask;
    *pos += 1;
    if first < mask {
        return Ok(first);
    }
    let mut value = mask;
    let mut shift = 0;
    loop {
        let byte = *block.get(*pos).ok_or(DecodeError::Truncated)?;
        *pos += 1;
        // Four continuation bytes carry 28 bits: far beyond any size a peer may use.
        if shift > 21 {
            return Err(DecodeError::IntegerOverflow);
        }
        value += ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// A string literal (§5.2): raw bytes are a slice of the block, Huffman ones decoded.
fn string(block: &Bytes, pos: &mut usize) -> Result<Bytes, DecodeError> {
    let huffman = *block.get(*pos).ok_or(DecodeError::Truncated)? & 0x80 != 0;
    let len = integer(block, pos, 7)?;
    let end = pos.checked_add(len).filter(|&end| end <= block.len());
    let end = end.ok_or(DecodeError::Truncated)?;
    let raw = &block[*pos..end];
    let value = if huffman {
        huffman::decode(raw).map_err(|_| DecodeError::Huffman)?
    } else {
        block.slice(*pos..end)
    };
    *pos = end;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(decoder: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        decoder
            .decode(&Bytes::copy_from_slice(block), |f, _| {
                out.push(f.describe())
            })
            .unwrap();
        out
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rfc_7541_c3_requests_without_huffman() {
        let mut d = Decoder::new(4096);
        let first = [
            0x82, 0x86, 0x84, 0x41, 0x0f, 0x77, 0x77, 0x77, 0x2e, 0x65, 0x78, 0x61, 0x6d, 0x70,
            0x6c, 0x65, 0x2e, 0x63, 0x6f, 0x6d,
        ];
        assert_eq!(
            decode_all(&mut d, &first),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.table.size(), 57);
        let second = [
            0x82, 0x86, 0x84, 0xbe, 0x58, 0x08, 0x6e, 0x6f, 0x2d, 0x63, 0x61, 0x63, 0x68, 0x65,
        ];
        assert_eq!(
            decode_all(&mut d, &second),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache")
            ])
        );
        assert_eq!(d.table.size(), 110);
    }

    #[test]
    fn rfc_7541_c4_requests_with_huffman() {
        let mut d = Decoder::new(4096);
        let first = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
            0x90, 0xf4, 0xff,
        ];
        assert_eq!(
            decode_all(&mut d, &first)[3],
            (":authority".into(), "www.example.com".into())
        );
        let second = [
            0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
        ];
        assert_eq!(
            decode_all(&mut d, &second)[4],
            ("cache-control".into(), "no-cache".into())
        );
        let third = [
            0x82, 0x87, 0x85, 0xbf, 0x40, 0x88, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f,
            0x89, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf,
        ];
        assert_eq!(
            decode_all(&mut d, &third),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value")
            ])
        );
    }

    #[test]
    fn rfc_7541_c5_responses_evict_entries() {
        // C.5: a 256-byte table, three responses.
        let mut d = Decoder::new(256);
        let first: Vec<u8> = [
            &[0x48, 0x03][..],
            b"302",
            &[0x58, 0x07],
            b"private",
            &[0x61, 0x1d],
            b"Mon, 21 Oct 2013 20:13:21 GMT",
            &[0x6e, 0x17],
            b"https://www.example.com",
        ]
        .concat();
        assert_eq!(
            decode_all(&mut d, &first)[0],
            (":status".into(), "302".into())
        );
        assert_eq!(d.table.size(), 222);
        let second = [0x48, 0x03, b'3', b'0', b'7', 0xc1, 0xc0, 0xbf];
        assert_eq!(
            decode_all(&mut d, &second),
            pairs(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com")
            ])
        );
        assert_eq!(d.table.size(), 222);
    }

    #[test]
    fn upper_case_names_and_bad_values_are_invalid_fields_not_errors() {
        let mut d = Decoder::new(4096);
        let block: Vec<u8> = [
            &[0x00, 0x03][..],
            b"Foo",
            &[0x01],
            b"x",
            &[0x00, 0x01],
            b"a",
            &[0x02],
            b"\r\n",
        ]
        .concat();
        let got = decode_all(&mut d, &block);
        assert_eq!(got[0].0, "Invalid");
        assert_eq!(got[1].0, "InvalidValue(\"a\")");
    }

    #[test]
    fn broken_blocks_are_errors() {
        let mut d = Decoder::new(4096);
        let mut sink = |_, _| {};
        assert_eq!(
            d.decode(&Bytes::from_static(&[0xff]), &mut sink),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            d.decode(&Bytes::from_static(&[0xbe]), &mut sink),
            Err(DecodeError::BadIndex(62))
        );
        assert_eq!(
            d.decode(&Bytes::from_static(&[0x80]), &mut sink),
            Err(DecodeError::BadIndex(0))
        );
        assert_eq!(
            d.decode(&Bytes::from_static(&[0x3f, 0xe1, 0x1f]), &mut sink),
            Ok(())
        );
        assert_eq!(
            d.decode(&Bytes::from_static(&[0x3f, 0xe2, 0x1f]), &mut sink),
            Err(DecodeError::TableTooLarge(4097, 4096))
        );
        assert_eq!(
            d.decode(&Bytes::from_static(&[0x82, 0x20]), &mut sink),
            Err(DecodeError::LateSizeUpdate)
        );
        assert_eq!(
            d.decode(
                &Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
                &mut sink
            ),
            Err(DecodeError::IntegerOverflow)
        );
    }
}
