//! tandem-control-plane: reads backend sets from a source (a YAML file, later the
//! Kubernetes API), keeps them in the [`index::ServiceIndex`] and streams them to
//! proxies over gRPC (`tandem.discovery.v1`).

pub mod cli;
pub mod identity;
pub mod index;
pub mod injection;
pub mod metrics;
pub mod model;
pub mod objects;
pub mod server;
pub mod source;

pub use cli::{Args, Error, run};
