//! The `tandem` command: the demo, a small test backend, and the proxy and control
//! plane as subcommands. The modules are a library so the end-to-end tests in
//! `tests/` start and talk to processes exactly as the demo does.

pub mod backend;
pub mod client;
pub mod demo;
pub mod endpoints;
pub mod inject;
pub mod node_agent;
pub mod process;
pub mod simulate;
