//! tandem-proxy: the sidecar data plane.
//!
//! - [`server`] accepts connections (TLS, HTTP/1.1, HTTP/2) and hands each request to
//! - [`http1`], the proxy's own HTTP/1.1 path (hyper for the requests it hands over),
//!   or [`http2`], the proxy's own HTTP/2: both route the request to a
//!   [`destination`] ([`forward`]), ask the [`balancer`] for an endpoint and send it
//!   over a pooled connection from [`upstream`].
//! - [`connections`] enforces the limits on client connections (idle, header-read and
//!   stream idle timeouts, the cap) and drains them at shutdown.
//! - [`upgrade`] carries HTTP/1.1 upgrades (WebSocket) as tunnels.
//! - [`discovery`] keeps each destination's backend set current from the control plane:
//!   it assembles [`view`]s, which each destination's [`manager`] turns into backend sets.
//! - [`shared`] is what all the layers of the request path share (the HTTP version
//!   spoken to a backend, idempotent methods, hop-by-hop headers, whose fault a
//!   failure was); [`body`] is the one body type; [`pool`] what every connection pool
//!   shares.
//! - [`identity`]: the proxy's certificate (from the control plane) and the mutual
//!   TLS it speaks with other proxies.
//! - [`inspect`] serves `/config`; [`metrics`] holds counters, which [`scrape`] adds up
//!   per service when Prometheus scrapes;
//!   [`trace`] makes OpenTelemetry spans of requests and exports them over OTLP.

pub mod app;
pub mod body;
pub mod clock;
pub mod connections;
pub mod counted;
pub mod deadline;
pub mod destination;
pub mod detect;
pub mod discovery;
pub mod endpoint;
pub mod forward;
pub mod http1;
pub mod http1_conn;
pub mod http2;
pub mod identity;
pub mod inbound;
pub mod init;
pub mod inspect;
pub mod manager;
pub mod metrics;
pub mod original_dst;
pub mod policy;
pub mod pool;
pub mod rewind;
pub mod scrape;
pub mod server;
pub mod shared;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod upgrade;
pub mod upstream;
pub mod view;

pub use app::{Args, Cli, Command, Error, main, run, run_blocking};
/// The balancer is a crate of its own (`tandem-balancer`, std only); re-exported for
/// code that reaches it through the proxy.
pub use tandem_balancer as balancer;
