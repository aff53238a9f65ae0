//! Opaque TCP: bytes copied both ways between a client and one backend until either
//! side closes. Balanced per connection (a stream of bytes cannot be split), over the
//! same endpoints, health and outlier detection as HTTP requests; or to one address
//! as it is, for what the control plane does not know. To an endpoint with an
//! identity, the bytes go to its proxy inside mutual TLS.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::destination::{BackendSet, Destination};
use crate::forward::resilience::record_failure;
use crate::identity::mesh::Carries;
use crate::pool::{self, UpstreamSettings};
use crate::upstream::UpstreamError;

/// Bytes read at a time in each direction of an opaque connection.
const COPY_BUFFER: usize = 32 * 1024;
/// Endpoints tried for one connection when connecting fails.
const ATTEMPTS: usize = 3;

/// Why an opaque connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("no endpoint to connect to: {0}")]
    NoEndpoint(String),
    #[error("{addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: UpstreamError,
    },
}

/// Copies `client`'s bytes to one endpoint of `set` and back. An endpoint that
/// refuses the connection is charged (outlier detection) and the next one tried.
pub async fn balanced<C>(
    client: &mut C,
    destination: &Destination,
    set: &BackendSet,
) -> Result<(u64, u64), TcpError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut last = None;
    for _ in 0..ATTEMPTS.min(set.balancer.pickable().max(1)) {
        let backend = set
            .pick()
            .map_err(|e| TcpError::NoEndpoint(format!("{}: {e}", destination.name())))?;
        let upstream = &backend.state.upstream;
        match upstream.connect(Carries::Opaque).await {
            Ok(mut connection) => {
                backend.state.succeeded();
                return Ok(copy(client, &mut connection).await);
            }
            Err(error) => {
                // Counted against the endpoint only if it was the endpoint's fault.
                record_failure(backend, error.fault());
                tracing::debug!(%error, backend = %backend.meta.address, "opaque connection failed; trying another endpoint");
                last = Some(TcpError::Connect {
                    addr: backend.meta.address,
                    error,
                });
            }
        }
    }
    Err(last.unwrap_or_else(|| TcpError::NoEndpoint(destination.name().to_string())))
}

/// Copies `client`'s bytes to `addr` as it is, and back.
pub async fn passthrough<C>(client: &mut C, addr: SocketAddr) -> Result<(u64, u64), TcpError>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    // What the control plane does not know has no settings of its own: the defaults.
    let mut upstream = pool::dial(addr, &UpstreamSettings::default())
        .await
        .map_err(|error| TcpError::Connect {
            addr,
            error: error.into(),
        })?;
    Ok(copy(client, &mut upstream).await)
}

/// Both ways until both sides are done; bytes up and down.
pub async fn copy<C, U>(client: &mut C, upstream: &mut U) -> (u64, u64)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    // 32 KiB each way rather than tokio's 8: half the system calls per byte or
    // fewer on a stream (HAProxy reads 16 KiB at a time).
    match tokio::io::copy_bidirectional_with_sizes(client, upstream, COPY_BUFFER, COPY_BUFFER).await
    {
        Ok(moved) => moved,
        Err(error) => {
            tracing::debug!(%error, "opaque connection ended");
            (0, 0)
        }
    }
}
