//! tandem-proxy: the sidecar data plane.
//!
//! - [`server`] accepts connections (TLS, HTTP/1.1, HTTP/2) and hands each request to
//! - [`forward`], which routes it to a [`destination`], asks the [`balancer`] for an
//!   endpoint and sends it over a pooled connection from [`upstream`].
//! - [`discovery`] keeps each destination's backend set current from the control plane.
//! - [`inspect`] serves `/config` and the per-destination metrics; [`metrics`] holds counters.

pub mod app;
pub mod balancer;
pub mod body;
pub mod clock;
pub mod destination;
pub mod discovery;
pub mod endpoint;
pub mod forward;
pub mod idle;
pub mod inspect;
pub mod manager;
pub mod metrics;
pub mod policy;
pub mod server;
pub mod tls;
pub mod upstream;

pub use app::{Args, Error, run, run_blocking};
