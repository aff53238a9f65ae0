//! Binding listeners with an error that says which listener and which address.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// Connections waiting to be accepted (tokio's and Linux's usual figure).
const BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {what}: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr`; `what` names the listener in the error (e.g. "admin (--admin)").
///
/// An IPv6 address listens for IPv6 only: `0.0.0.0:P` and `[::]:P` can then both be
/// bound, and a connection's addresses are never IPv4-mapped IPv6 ones (which would
/// hide where a redirected IPv4 connection was going).
pub async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    listener(addr).map_err(|source| BindError { what, addr, source })
}

fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}
