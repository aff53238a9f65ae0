//! The raw HTTP/1 connections to one endpoint: sockets the HTTP/1 path
//! ([`super::serve`]) and bodiless requests from elsewhere ([`super::client`]) write
//! and read themselves, pooled with their read buffers.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;

use crate::counted::{ByteCounts, Counted};
use crate::pool::{self, ConnectError, IdlePool, UpstreamSettings};

/// Room a backend connection's read buffer has for a response head (and the small
/// body that usually comes with it).
pub const RESPONSE_BUFFER: usize = 8 * 1024;

/// A connection to the endpoint that the HTTP/1 path reads and writes itself: the
/// socket and the buffer responses are read into, kept together while pooled.
pub struct RawConn {
    pub stream: Counted,
    pub buf: BytesMut,
    /// Taken from the idle pool: the server may have closed it a moment ago.
    pub reused: bool,
}

/// The idle raw connections to one endpoint, and how to make new ones.
pub struct RawPool {
    addr: SocketAddr,
    settings: Arc<UpstreamSettings>,
    /// A raw connection is pooled with its read buffer.
    idle: IdlePool<(Counted, BytesMut)>,
    bytes: Arc<ByteCounts>,
}

impl RawPool {
    pub fn new(addr: SocketAddr, settings: Arc<UpstreamSettings>, bytes: Arc<ByteCounts>) -> Self {
        Self {
            addr,
            bytes,
            idle: IdlePool::new(settings.max_idle_per_endpoint),
            settings,
        }
    }

    /// Idle connections right now.
    pub fn idle(&self) -> usize {
        self.idle.len()
    }

    /// An idle connection that still looks open, if there is one.
    pub fn checkout(&self) -> Option<RawConn> {
        while let Some((stream, buf)) = self.idle.take(self.settings.idle_timeout) {
            // Costs no syscall while the socket has not become readable: an idle
            // connection only does when the server closed it (or misbehaved).
            let mut probe = [0u8; 1];
            if let Err(e) = stream.try_read(&mut probe)
                && e.kind() == std::io::ErrorKind::WouldBlock
            {
                return Some(RawConn {
                    stream,
                    buf,
                    reused: true,
                });
            }
        }
        None
    }

    /// A new connection.
    pub async fn dial(&self) -> Result<RawConn, ConnectError> {
        Ok(RawConn {
            stream: Counted::new(
                pool::dial(self.addr, &self.settings).await?,
                self.bytes.clone(),
            ),
            buf: BytesMut::with_capacity(RESPONSE_BUFFER),
            reused: false,
        })
    }

    /// Pools a connection whose last response was read to its end.
    pub fn release(&self, conn: RawConn) {
        let mut buf = conn.buf;
        buf.clear();
        self.idle.put((conn.stream, buf));
    }

    /// Pools the connection after a response read to its end, unless the server will
    /// close it or sent more than the response (which no request of ours asked for).
    pub fn finish(&self, conn: RawConn, close: bool) {
        if !close && conn.buf.is_empty() {
            self.release(conn);
        }
    }
}
