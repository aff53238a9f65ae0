//! tandem-h2: HTTP/2 in both roles, written for a proxy.
//!
//! Written rather than taken from the `h2` crate (which hyper uses): h2 queues every
//! frame as a struct and encodes it later, keeps each stream's state in a slab it
//! moves whole, and indexes and Huffman-codes every header it sends, which made it
//! most of the proxy's instructions per HTTP/2 request (the profile is in
//! bench/README.md). Here a frame is written into the connection's output buffer as
//! it is made and a header block is encoded in place, as literals (see
//! `hpack::encoder`).
//!
//! The crate knows nothing of the proxy: it is generic over the I/O
//! ([`Connection`]) and over the body sent ([`pipe::send_body`] takes any
//! [`http_body::Body`] with [`Bytes`](bytes::Bytes) data); a body received is a
//! [`RecvStream`], itself a [`Body`](http_body::Body). Who drives a connection
//! (a task per connection, streams as futures inside it or tasks of their own) is
//! the caller's choice: [`Connection::poll_read`], [`Connection::accept`] and
//! [`Connection::poll_flush`] are all it takes.
//!
//! - `frame`: frames on the wire; `hpack`: header compression; `message`: header
//!   blocks into requests, responses and trailers, checked.
//! - `session`: one connection's state (streams, flow control, the output buffer),
//!   shared by [`Connection`] (its I/O) and the handles of [`streams`] (bodies,
//!   responses, the client's requests).
//! - [`keep_alive`]: PINGs that find a dead peer; [`pipe`]: a body into a stream,
//!   under flow control.

mod connection;
pub mod error;
mod frame;
mod hpack;
pub mod keep_alive;
mod message;
pub mod pipe;
mod session;
pub mod streams;
#[cfg(test)]
mod tests;

pub use connection::Connection;
pub use error::{ConnectionError, Error};
pub use frame::Reason;
pub use keep_alive::KeepAlive;
pub use message::{is_connection_specific, is_hop_by_hop};
pub use session::{Clock, Config, monotonic_seconds};
pub use streams::{Client, RecvStream, ResponseFuture, SendResponse, SendStream};

/// What the fuzz targets (`fuzz/`, issue 22) drive: the connection over any I/O, the
/// frame header and padding, the HPACK decoder and encoder. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::connection::Connection;
    pub use super::frame::{HEADER_LEN, Head, PREFACE, unpadded};
    pub use super::hpack::{DecodeError, Decoder, Field, encoder};
    pub use super::session::Config;
}
