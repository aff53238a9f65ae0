//! HTTP/2 in both directions, the proxy's own implementation.
//!
//! Written for a proxy rather than taken from the `h2` crate (which hyper uses):
//! h2 queues every frame as a struct and encodes it later, keeps each stream's
//! state in a slab it moves whole, and indexes and Huffman-codes every header it
//! sends, which made it most of the proxy's instructions per HTTP/2 request (the
//! profile is in bench/README.md). Here a frame is written into the connection's
//! output buffer as it is made and a header block is encoded in place, as
//! literals (see [`hpack::encoder`]).
//!
//! A client connection's streams all run inside the connection's own task
//! ([`serve`]), and a request to a backend is opened and awaited from that same
//! task ([`client`]): a stream costs one allocation and no task switches. A task is
//! spawned only to stream a request body upstream, which must go on after the
//! response has begun.
//!
//! - [`frame`]: frames on the wire; [`hpack`]: header compression; [`message`]:
//!   header blocks into requests, responses and trailers, checked.
//! - [`session`]: one connection's state (streams, flow control, the output
//!   buffer), shared by [`connection`] (its I/O) and [`streams`] (handles on its
//!   streams: bodies, responses, the client's requests).
//! - [`serve`]: a client connection, its streams, graceful close and keep-alive.
//! - [`client`]: one multiplexed connection to a backend.
//! - [`pipe`]: a body into a stream, under flow control.

pub mod client;
mod connection;
pub mod error;
mod frame;
mod hpack;
mod keep_alive;
mod message;
pub mod pipe;
pub mod serve;
mod session;
pub mod streams;
#[cfg(test)]
mod tests;

pub use error::Error;
pub use frame::Reason;
pub use serve::serve;
pub use streams::RecvStream;

/// What the fuzz targets (`fuzz/`, issue 22) drive: the connection over any I/O, the
/// frame header and padding, the HPACK decoder and encoder. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::connection::Connection;
    pub use super::frame::{HEADER_LEN, Head, PREFACE, unpadded};
    pub use super::hpack::{DecodeError, Decoder, Field, encoder};
    pub use super::session::Config;
}

/// The largest header list accepted from a peer, either side (hyper's default).
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Output a connection holds for its socket before it stops taking data from its
/// streams (headers always go).
const MAX_SEND_BUFFER: usize = 64 * 1024;
