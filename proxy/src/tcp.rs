//! Opaque TCP: bytes copied both ways between a client and one backend until either
//! side closes. Balanced per connection (a stream of bytes cannot be split), over the
//! same endpoints, health and outlier detection as HTTP requests; or to one address
//! as it is, for what the control plane does not know. To an endpoint with an
//! identity, the bytes go to its proxy inside mutual TLS.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use futures_util::future::Either;

use crate::destination::{BackendSet, Destination};
use crate::identity::mesh::Carries;

/// How long a connect to a backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes read at a time in each direction of an opaque connection.
const COPY_BUFFER: usize = 32 * 1024;
/// Endpoints tried for one connection when connecting fails.
const ATTEMPTS: usize = 3;

/// Why an opaque connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("no endpoint to connect to: {0}")]
    NoEndpoint(String),
    #[error("connect to {addr}: {error}")]
    Connect { addr: SocketAddr, error: String },
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, TcpError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(error)) => Err(TcpError::Connect {
            addr,
            error: error.to_string(),
        }),
        Err(_) => Err(TcpError::Connect {
            addr,
            error: format!("timed out after {CONNECT_TIMEOUT:?}"),
        }),
    }
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
        let connected = match (
            connect(backend.meta.address).await,
            backend.state.upstream.mesh(),
        ) {
            // To the endpoint's proxy: the bytes inside mutual TLS.
            (Ok(tcp), Some(mesh)) => mesh
                .handshake(tcp, backend.meta.address, Carries::Opaque)
                .await
                .map(Either::Right)
                .map_err(|error| TcpError::Connect {
                    addr: backend.meta.address,
                    error: error.to_string(),
                }),
            (connected, _) => connected.map(Either::Left),
        };
        match connected {
            Ok(Either::Left(mut upstream)) => {
                backend.state.succeeded();
                return Ok(copy(client, &mut upstream).await);
            }
            Ok(Either::Right(mut upstream)) => {
                backend.state.succeeded();
                return Ok(copy(client, &mut upstream).await);
            }
            Err(error) => {
                // The backend's own failure: it counts for outlier detection.
                backend.state.failed();
                backend
                    .state
                    .stats
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(%error, backend = %backend.meta.address, "opaque connection failed; trying another endpoint");
                last = Some(error);
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
    let mut upstream = connect(addr).await?;
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
