//! End-to-end tests: real `tandem` processes (control plane, proxies, backends) on
//! loopback, driven the way a user would drive them. One test binary, so the
//! workspace links once.

mod balancing;
mod cluster;
mod control_plane_restart;
mod demo;
mod discovery_updates;
mod errors;
mod h2spec;
mod hostile;
mod hostile_http2;
mod http1;
mod http2;
mod identity;
mod inject_cli;
mod injection;
mod interception;
mod kubernetes;
mod locality;
mod mesh;
mod mtls;
mod node_agent;
mod observe;
mod resilience;
mod streaming;
mod support;
mod tls;
mod tracing;
