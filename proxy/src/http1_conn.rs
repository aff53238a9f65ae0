//! An HTTP/1.1 client connection: the proxy's own HTTP/1 path ([`crate::http1`]) first,
//! then hyper from the first request it hands over (a body it does not stream
//! itself, an upgrade, HTTP/1.0). Every listener serves HTTP/1.1
//! through here.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use futures_util::future::Either;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::connections::{ConnControl, Managed, Phase};
use crate::forward::Forwarder;
use crate::http1::{self as own_http1, Outcome};
use crate::rewind::Rewind;
use crate::upgrade::{self, Tunnel};

/// HTTP/1.1: the proxy's own path, then hyper from the first request it hands over.
/// Inbound requests go to hyper at once: the app's view of them (who called)
/// is set on each, which the own path, forwarding heads as they came, does not do.
pub async fn serve<IO>(
    forwarder: &Arc<Forwarder>,
    io: IO,
    buf: BytesMut,
    control: &Arc<ConnControl>,
    hyper: &http1::Builder,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, buffered) = if forwarder.inbound.is_some() {
        (io, buf.freeze())
    } else {
        match own_http1::serve(forwarder, control, io, buf).await {
            Outcome::Closed => return,
            Outcome::Handoff {
                io,
                buffered,
                reason,
            } => {
                tracing::trace!(reason = reason.0, "continuing the connection in hyper");
                (io, buffered)
            }
        }
    };
    // Boxed: most connections never get here, and their state then stays as small as
    // the own path's.
    Box::pin(serve_in_hyper(forwarder, io, buffered, control, hyper)).await;
}

/// The rest of the connection in hyper, starting with the `buffered` bytes.
async fn serve_in_hyper<IO>(
    forwarder: &Arc<Forwarder>,
    io: IO,
    buffered: Bytes,
    control: &Arc<ConnControl>,
    hyper: &http1::Builder,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Rewind::new(io, buffered));
    let tunnel = Arc::new(Mutex::new(None));
    let conn = hyper
        .serve_connection(io, service(forwarder, control, &tunnel))
        .with_upgrades();
    if let Some(Err(error)) = Managed::new(conn, control.clone()).await {
        tracing::debug!(%error, "connection error");
    }
    // An upgraded connection (WebSocket): hyper handed it over with the `101`.
    let tunnel = tunnel.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(tunnel) = tunnel {
        control.set_phase(Phase::Delegated);
        let closed = std::future::poll_fn(|cx| {
            if control.closing(cx) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        });
        tokio::select! {
            _ = tunnel => {}
            _ = closed => tracing::debug!("closing an upgraded connection at shutdown"),
        }
    }
}

/// Forwards each request hyper parsed; the connection is [`Phase::Delegated`] while
/// one is in flight (its own timers bound it), idle between them. An upgrade that the
/// backend accepted leaves its tunnel in `tunnel`.
fn service(
    forwarder: &Arc<Forwarder>,
    control: &Arc<ConnControl>,
    tunnel: &Arc<Mutex<Option<Tunnel>>>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<crate::body::ProxyBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<crate::body::ProxyBody>, Infallible>>
             + Send
             + 'static,
> + Clone
+ 'static {
    let forwarder = forwarder.clone();
    let control = control.clone();
    let tunnel = tunnel.clone();
    service_fn(move |req| {
        control.set_phase(Phase::Delegated);
        let done = control.clone();
        if upgrade::is_upgrade(&req) {
            let tunnel = tunnel.clone();
            let upgrading = upgrade::forward(forwarder.clone(), req).map(move |(response, t)| {
                *tunnel.lock().unwrap_or_else(|e| e.into_inner()) = t;
                done.set_phase(Phase::Idle);
                Ok::<_, Infallible>(response)
            });
            return Either::Left(upgrading);
        }
        // The connection's sweeps bound the wait for the response (deadline.rs).
        let conn = Some(control.clone());
        Either::Right(forwarder.clone().handle(req, conn).map(move |response| {
            done.set_phase(Phase::Idle);
            Ok::<_, Infallible>(response)
        }))
    })
}
