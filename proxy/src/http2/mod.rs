//! The proxy's HTTP/2, on the `tandem-h2` crate (frames, HPACK, connections and
//! their streams, both roles): what is left here is the proxy's side of it.
//!
//! A client connection's streams all run inside the connection's own task
//! ([`serve`]), each forwarded by the [`Forwarder`](crate::forward::Forwarder), and a
//! request to a backend is opened and awaited from that same task ([`client`]): a
//! stream costs one allocation and no task switches. A task is spawned only to
//! stream a request body upstream, which must go on after the response has begun.
//!
//! - [`serve`]: a client connection, its streams, graceful close and keep-alive.
//! - [`client`]: one multiplexed connection to a backend.
//! - [`body`]: a [`ProxyBody`](crate::body::ProxyBody) into a stream, a failed
//!   client body reset as the client's fault.

pub mod body;
pub mod client;
pub mod serve;

pub use body::{REQUEST_BODY_FAILED, request_body_failed, send_body};
pub use serve::serve;
pub use tandem_h2::{Error, Reason, RecvStream};

/// The largest header list accepted from a peer, either side (hyper's default).
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Output a connection holds for its socket before it stops taking data from its
/// streams (headers always go).
const MAX_SEND_BUFFER: usize = 64 * 1024;
