//! One multiplexed HTTP/2 connection to a backend.
//!
//! A request is handed to h2 and its response awaited from the caller's own task;
//! only the connection's I/O (and its keep-alive PINGs) runs in a task of its own.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;

use bytes::Bytes;
use h2::client::{self, Connection, SendRequest};
use http::{Request, Response};
use http_body::Body;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::keep_alive::{self, KeepAlive};
use super::{MAX_HEADER_LIST, pipe};
use crate::body::ProxyBody;
use crate::upstream::RequestSlot;

/// hyper's client defaults: room for a few large responses in flight at once.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;

pub struct Http2Connection {
    sender: SendRequest<Bytes>,
    /// Set when the connection ended (or failed a request before sending it), so
    /// the next request dials a new one.
    closed: Arc<AtomicBool>,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum Http2Error {
    /// The connection would not take the request: it was not sent.
    #[error("HTTP/2 connection unusable: {0}")]
    NotSent(h2::Error),
    #[error("HTTP/2: {0}")]
    Failed(h2::Error),
}

impl Http2Connection {
    /// Speaks HTTP/2 on `stream` (prior knowledge), and drives it from a new task.
    pub async fn handshake(stream: TcpStream, addr: SocketAddr) -> Result<Self, h2::Error> {
        let (sender, mut conn) = client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .enable_push(false)
            .handshake::<_, Bytes>(stream)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let keep_alive = conn.ping_pong().map(KeepAlive::pinging_now);
        let (settled, settling) = oneshot::channel();
        tokio::spawn(drive(conn, keep_alive, settled, closed.clone(), addr));
        // Until the backend's SETTINGS are read its stream limit is unknown (h2
        // assumes none), and a burst of requests beyond it would be refused
        // (REFUSED_STREAM) rather than wait in h2 for a stream: use the connection
        // once they are in.
        let _ = tokio::time::timeout(keep_alive::TIMEOUT, settling).await;
        Ok(Self { sender, closed })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends the request in `slot`; a request body streams from a task of its own,
    /// since it may go on after the response began (gRPC bidirectional streams).
    ///
    /// On [`Http2Error::NotSent`] the request is left in the slot, to be sent elsewhere.
    #[allow(clippy::manual_async_fn)]
    pub fn send<'a>(
        &'a self,
        slot: &'a mut RequestSlot,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Http2Error>> + use<'a> {
        async move {
            let mut sender = self.sender.clone();
            // A fresh clone never waits here: this only finds a connection that
            // ended, before the request is given away (so it can go elsewhere).
            // A request beyond the backend's stream limit waits inside h2 instead.
            if let Err(error) = poll_fn(|cx| sender.poll_ready(cx)).await {
                self.closed.store(true, Ordering::Release);
                return Err(Http2Error::NotSent(error));
            }
            let (head, body) = slot.take().expect("a request to send").into_parts();
            let end = body.is_end_stream();
            let (response, send) = sender
                .send_request(Request::from_parts(head, ()), end)
                .map_err(Http2Error::Failed)?;
            if !end {
                tokio::spawn(pipe::send_body(body, send));
            }
            match response.await {
                Ok(response) => Ok(response.map(ProxyBody::from)),
                Err(error) => Err(Http2Error::Failed(error)),
            }
        }
    }
}

async fn drive(
    mut conn: Connection<TcpStream, Bytes>,
    mut keep_alive: Option<KeepAlive>,
    settled: oneshot::Sender<()>,
    closed: Arc<AtomicBool>,
    addr: SocketAddr,
) {
    let mut settled = Some(settled);
    poll_fn(|cx| {
        if let Poll::Ready(result) = std::pin::Pin::new(&mut conn).poll(cx) {
            if let Err(error) = result {
                tracing::debug!(%addr, %error, "upstream HTTP/2 connection ended");
            }
            return Poll::Ready(());
        }
        if let Some(keep_alive) = &mut keep_alive
            && keep_alive.poll_dead(cx, || true).is_ready()
        {
            tracing::debug!(%addr, "upstream HTTP/2 connection dead: no PING answer");
            return Poll::Ready(());
        }
        if keep_alive.as_ref().is_none_or(KeepAlive::answered)
            && let Some(settled) = settled.take()
        {
            let _ = settled.send(());
        }
        Poll::Pending
    })
    .await;
    closed.store(true, Ordering::Release);
}
