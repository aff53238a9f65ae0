//! Where a redirected connection was going: the address iptables' REDIRECT replaced
//! (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST`), read through socket2 (no unsafe here).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;

/// The destination the client asked for before the nat rules sent it to us.
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let original = if stream.local_addr()?.is_ipv4() {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    original.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the original destination is not an IP address",
        )
    })
}
