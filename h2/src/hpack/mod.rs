//! HPACK (RFC 7541): header compression for HTTP/2.
//!
//! The decoder is complete (dynamic table, Huffman); the encoder sends literals
//! only, which every decoder must accept (see [`encoder`]).

mod decoder;
pub mod encoder;
mod huffman;
mod table;

pub use decoder::{DecodeError, Decoder};
pub use table::Field;
