//! Pieces every Tandem binary needs and that would otherwise be written twice:
//! the admin HTTP endpoint (`/live`, `/ready`, `/metrics`), logging set-up, the
//! one-line start-up announcement that tools and tests read, signal handling and
//! reconnect backoff.

pub mod admin;
pub mod announce;
pub mod backoff;
pub mod duration;
pub mod listen;
pub mod logging;
pub mod process_metrics;
pub mod shutdown;

pub use admin::{Admin, AdminRoutes, Readiness};
pub use backoff::Backoff;
pub use shutdown::Shutdown;
