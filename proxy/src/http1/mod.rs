//! The proxy's own HTTP/1.1 path: requests in, requests out, without hyper.
//!
//! Most mesh traffic is small HTTP/1.1 requests with small answers over keep-alive
//! connections. For those, this path parses the request head in place, picks a
//! backend, writes the head (as it arrived, unless it carries hop-by-hop headers) to
//! a pooled backend connection, parses the response head the same way and relays the
//! response, all inside the client connection's task: no header maps, no
//! re-serialisation, no channels or tasks between the two connections.
//!
//! [`client`] sends bodiless requests that arrived as header maps (HTTP/2 streams,
//! requests hyper parsed) over the same pooled backend connections ([`pool`]),
//! streaming the response [`body`] as the caller reads it.
//!
//! Requests whose backends are spoken to in HTTP/2 (a meshed endpoint's proxy, an
//! HTTP/2 backend) stay on this path as well ([`to_http2`]): the parsed head becomes a
//! header map for the forwarder, and the response is written back as HTTP/1.1.
//!
//! Anything else continues in hyper, on the same connection, from the first byte of
//! the request that needed it (see [`head::Handoff`]): such a request was not acted
//! on yet, so hyper sees exactly what the client sent.

pub mod body;
pub mod chunked;
pub mod client;
mod exchange;
pub mod head;
pub mod pool;
mod serve;
mod to_http2;

pub use exchange::SendFailure;
pub use pool::RESPONSE_BUFFER;
pub use serve::{MAX_BODY, Outcome, Read, read_more, serve};
