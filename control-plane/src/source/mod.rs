//! Where backend sets come from. A source reads its backing store and writes the
//! result into the [`ServiceIndex`](crate::index::ServiceIndex); it never talks to
//! proxies itself.

pub mod file;
pub mod kubernetes;
