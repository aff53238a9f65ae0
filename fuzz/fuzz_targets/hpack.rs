//! The HPACK decoder (`h2/src/hpack/decoder.rs`, with its dynamic and
//! static tables and the Huffman decoder): a connection's header blocks, one after
//! another through the same decoder, as a peer's encoder would send them.
//!
//! Input: one byte choosing SETTINGS_HEADER_TABLE_SIZE (the proxy's is 4096), then
//! header blocks, each a length byte L and L bytes (L = 255: the rest of the input).
//!
//! Checks, beyond "no panic" (and no runaway allocation):
//! - every field's size counts at least the 32 bytes of overhead (RFC 7541 §4.1);
//! - a block that failed stops the connection (later blocks are not decoded);
//! - round trip: the valid regular fields of each block, encoded by the proxy's own
//!   encoder (as it forwards them) and decoded by a fresh decoder, come back the
//!   same, less the connection-specific ones the encoder drops.

#![no_main]

use bytes::Bytes;
use http::HeaderMap;
use libfuzzer_sys::fuzz_target;
use tandem_h2::fuzzing::{Decoder, Field, encoder};

const TABLE_SIZES: [usize; 4] = [4096, 0, 256, 65_536];

fuzz_target!(|data: &[u8]| {
    let Some((&config, mut rest)) = data.split_first() else {
        return;
    };
    let mut decoder = Decoder::new(TABLE_SIZES[config as usize % TABLE_SIZES.len()]);
    while let Some((&len, tail)) = rest.split_first() {
        let len = if len == 255 {
            tail.len()
        } else {
            (len as usize).min(tail.len())
        };
        let (block, tail) = tail.split_at(len);
        rest = tail;
        let block = Bytes::copy_from_slice(block);
        let mut headers = HeaderMap::new();
        let result = decoder.decode(&block, |field, size| {
            assert!(size >= 32, "field size {size} below the overhead");
            if let Field::Header(name, value) = field {
                headers.append(name, value);
            }
        });
        if result.is_err() {
            // The connection's compression state is lost: it ends here.
            return;
        }
        round_trip(&headers);
    }
});

fn round_trip(headers: &HeaderMap) {
    let mut block = Vec::new();
    encoder::trailers(&mut block, headers);
    let mut expected = HeaderMap::new();
    for (name, value) in headers {
        if !tandem_h2::is_connection_specific(name, value) {
            expected.append(name.clone(), value.clone());
        }
    }
    let mut again = HeaderMap::new();
    Decoder::new(4096)
        .decode(&Bytes::from(block), |field, _| match field {
            Field::Header(name, value) => {
                again.append(name, value);
            }
            other => panic!("the encoder's block decodes to {other:?}"),
        })
        .expect("the encoder's block does not decode");
    assert_eq!(
        again, expected,
        "header fields changed through encode/decode"
    );
    for (a, b) in again.iter().zip(expected.iter()) {
        assert_eq!(a.1.is_sensitive(), b.1.is_sensitive(), "sensitivity lost");
    }
}
