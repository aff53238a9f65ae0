//! One multiplexed HTTP/2 connection to a backend (plain, or mesh TLS to its proxy).
//!
//! A request is opened and its response awaited from the caller's own task; only
//! the connection's I/O (and its keep-alive PINGs) runs in a task of its own.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::task::Poll;

use http::Response;
use http_body::Body;
use tandem_h2::keep_alive::{self, KeepAlive};
use tandem_h2::{Client, Config, Connection, Error};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::body::send_body;
use super::{MAX_HEADER_LIST, MAX_SEND_BUFFER};
use crate::body::{ProxyBody, RequestSlot};

fn config() -> Config {
    Config {
        // Not used by a client: the backend opens no streams.
        max_concurrent_streams: 0,
        // Room for a few large responses in flight at once (hyper's client defaults).
        stream_window: 2 * 1024 * 1024,
        connection_window: 5 * 1024 * 1024,
        max_header_list: MAX_HEADER_LIST,
        max_send_buffer: MAX_SEND_BUFFER,
        // Read only when the peer resets streams, which a client does not count.
        clock: crate::clock::now,
    }
}

pub struct Http2Connection {
    client: Client,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum Http2Error {
    /// The backend did not process the request (the connection would not take it,
    /// it refused the stream, or it went away first): it is left in its slot, to
    /// be sent elsewhere.
    #[error("HTTP/2 request not processed: {0}")]
    NotSent(Error),
    #[error("HTTP/2: {0}")]
    Failed(Error),
}

impl Http2Connection {
    /// Speaks HTTP/2 on `stream` (prior knowledge), and drives it from a new task.
    pub async fn handshake<IO>(stream: IO, addr: SocketAddr) -> Self
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (conn, client) = Connection::client(stream, config());
        let (settled, settling) = oneshot::channel();
        tokio::spawn(drive(conn, settled, addr));
        // Until the backend's SETTINGS are read its stream limit is unknown, and a
        // burst of requests beyond it would be refused (REFUSED_STREAM) rather than
        // wait for a stream: use the connection once they are in.
        let _ = tokio::time::timeout(keep_alive::TIMEOUT, settling).await;
        Self { client }
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Sends the request in `slot`; a request body streams from a task of its own,
    /// since it may go on after the response began (gRPC bidirectional streams).
    ///
    /// A bodiless request stays in the slot (it is encoded from there); one with a
    /// body is taken. On [`Http2Error::NotSent`] it is still there, to go elsewhere.
    #[allow(clippy::manual_async_fn)]
    pub fn send<'a>(
        &'a self,
        slot: &'a mut RequestSlot,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Http2Error>> + use<'a> {
        async move {
            let req = slot.as_ref().expect("a request to send");
            let end = req.body().is_end_stream();
            let (response, body) = self
                .client
                .send_request(req.method(), req.uri(), req.headers(), end)
                .map_err(Http2Error::NotSent)?;
            if let Some(send) = body {
                let (_, body) = slot.take().expect("checked above").into_parts();
                tokio::spawn(send_body(body, send));
            }
            match response.await {
                Ok(response) => Ok(response.map(ProxyBody::from)),
                Err(error) if error.not_processed() && slot.is_some() => {
                    Err(Http2Error::NotSent(error))
                }
                Err(error) => Err(Http2Error::Failed(error)),
            }
        }
    }
}

async fn drive<IO: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Connection<IO>,
    settled: oneshot::Sender<()>,
    addr: SocketAddr,
) {
    let mut keep_alive = KeepAlive::new();
    let mut settled = Some(settled);
    poll_fn(|cx| {
        let over = conn.poll_read(cx).is_ready();
        let flushed = conn.poll_flush(cx).is_ready();
        if over {
            tracing::debug!(%addr, "upstream HTTP/2 connection ended");
            return Poll::Ready(());
        }
        if settled.is_some() && conn.settings_received() {
            let _ = settled.take().map(|s| s.send(()));
        }
        if flushed && conn.finished() {
            return Poll::Ready(());
        }
        if keep_alive.poll_dead(cx, &conn, || true).is_ready() {
            // Its streams, and the pool, see it closed.
            tracing::debug!(%addr, "upstream HTTP/2 connection dead: no PING answer");
            return Poll::Ready(());
        }
        Poll::Pending
    })
    .await;
}
