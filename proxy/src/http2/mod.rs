//! HTTP/2 in both directions, with the `h2` crate directly rather than through hyper.
//!
//! hyper's HTTP/2 server spawns a task per stream, and its client hands every request
//! through a channel to a connection task that spawns another task to wait for the
//! response. Here a client connection's streams all run inside the connection's own
//! task ([`serve`]), and a request to a backend is sent and awaited from that same
//! task ([`client`]): a stream costs one allocation and no task switches. A task is
//! spawned only to stream a request body upstream, which must go on after the
//! response has begun.
//!
//! - [`serve`]: a client connection, its streams, graceful close and keep-alive.
//! - [`client`]: one multiplexed connection to a backend.
//! - [`pipe`]: a body into an h2 send stream, under flow control.

pub mod client;
mod keep_alive;
pub mod pipe;
pub mod serve;

pub use serve::serve;

/// The largest header list accepted from a peer, either side (hyper's default).
const MAX_HEADER_LIST: u32 = 64 * 1024;
