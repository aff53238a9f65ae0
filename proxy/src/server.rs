//! The proxy listener: accepts connections, terminates TLS when configured, tells
//! HTTP/1.1 from HTTP/2 (prior-knowledge h2c on plain connections, ALPN under TLS)
//! and serves each with its own path ([`crate::http1`], [`crate::http2`]); both hand
//! every request to the [`Forwarder`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tandem_common::Shutdown;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::connections::{ConnControl, Connections, Managed, Tracked};
use crate::forward::Forwarder;
use crate::http1::{self as own_http1, Outcome};
use crate::metrics::{ProxyMetrics, ResultLabel};
use crate::rewind::Rewind;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Room a client connection's read buffer starts with.
const CLIENT_BUFFER: usize = 8 * 1024;

/// A TLS record starts with content type 22 (handshake) for a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const PLAINTEXT_ON_TLS_PORT: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
content-type: text/plain; charset=utf-8\r\n\
x-tandem-error: tls_required\r\n\
connection: close\r\n\
content-length: 63\r\n\
\r\n\
tandem: this port speaks TLS; a plain-text request was sent to it\n";

pub struct Server {
    pub forwarder: Arc<Forwarder>,
    pub tls: Option<TlsAcceptor>,
    pub metrics: Arc<ProxyMetrics>,
    pub shutdown: Shutdown,
    pub grace: Duration,
    /// A client connection that moves no byte for this long is closed.
    pub idle_timeout: Duration,
}

/// hyper's HTTP/1 settings, built once per listener, for the requests the proxy's
/// own HTTP/1 path hands over.
///
/// HTTP/1 has no header-read timer: hyper would re-arm a runtime timer on every
/// request of a keep-alive connection; the idle sweep ([`Connections::sweep`]) covers
/// quiet and stalled clients without any per-request cost. Small messages are
/// written with one `write` rather than a `writev` of head and body (`writev(false)`).
fn hyper_http1() -> http1::Builder {
    let mut http1 = http1::Builder::new();
    http1.writev(false).keep_alive(true);
    http1
}

/// The protocol a plain connection speaks, from its first bytes.
enum Detected {
    Http1,
    Http2,
    Closed,
}

impl Server {
    /// Accepts until shutdown, then lets open connections finish for up to `grace`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let connections = Arc::new(Connections::default());
        let sweeper = tokio::spawn(connections.clone().sweep(self.idle_timeout));
        let hyper = Arc::new(hyper_http1());
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        // Out of fds, typically: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = self.shutdown.wait() => break,
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let hyper = hyper.clone();
            let guard = connections.open();
            tokio::spawn(async move {
                this.metrics.connections.inc();
                this.metrics.open_connections.inc();
                this.connection(stream, guard.control(), &hyper).await;
                this.metrics.open_connections.dec();
                drop(guard);
                tracing::trace!(%peer, "connection closed");
            });
        }
        drop(listener);
        tracing::info!(grace = ?self.grace, "draining open connections");
        connections.close_all();
        if tokio::time::timeout(self.grace, connections.all_closed())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the grace period; closing them");
        }
        sweeper.abort();
    }

    async fn connection(
        &self,
        stream: TcpStream,
        control: &Arc<ConnControl>,
        hyper: &http1::Builder,
    ) {
        let Some(acceptor) = &self.tls else {
            let mut io = Tracked::new(stream, control.clone());
            let mut buf = BytesMut::with_capacity(CLIENT_BUFFER);
            match detect(&mut io, &mut buf, control).await {
                Detected::Http1 => self.http1(io, buf, control, hyper).await,
                Detected::Http2 => {
                    let io = Rewind::new(io, buf.freeze());
                    crate::http2::serve(&self.forwarder, control, io).await;
                }
                Detected::Closed => {}
            }
            return;
        };

        let mut first = [0u8; 1];
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1..)) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(Ok(1..)) => {
                // Plain HTTP on the TLS port: say so, as nginx does, instead of a reset.
                self.tls_result("plaintext");
                let mut stream = stream;
                let _ = stream.write_all(PLAINTEXT_ON_TLS_PORT).await;
                let _ = stream.shutdown().await;
                return;
            }
            _ => {
                self.tls_result("timeout");
                return;
            }
        }
        let tracked = Tracked::new(stream, control.clone());
        let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tracked)).await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                self.tls_result("error");
                tracing::debug!(%error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.tls_result("timeout");
                return;
            }
        };
        self.tls_result("ok");
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            crate::http2::serve(&self.forwarder, control, tls).await;
        } else {
            let buf = BytesMut::with_capacity(CLIENT_BUFFER);
            self.http1(tls, buf, control, hyper).await;
        }
    }

    /// HTTP/1.1: the proxy's own path, then hyper from the first request it hands over.
    async fn http1<IO>(
        &self,
        io: IO,
        buf: BytesMut,
        control: &Arc<ConnControl>,
        hyper: &http1::Builder,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (io, buffered) = match own_http1::serve(&self.forwarder, control, io, buf).await {
            Outcome::Closed => return,
            Outcome::Handoff {
                io,
                buffered,
                reason,
            } => {
                tracing::trace!(reason = reason.0, "continuing the connection in hyper");
                (io, buffered)
            }
        };
        let io = TokioIo::new(Rewind::new(io, buffered));
        let conn = hyper.serve_connection(io, self.service());
        if let Err(error) = Managed::new(conn, control.clone()).await {
            tracing::debug!(%error, "connection error");
        }
    }

    fn service(
        &self,
    ) -> impl hyper::service::Service<
        http::Request<hyper::body::Incoming>,
        Response = http::Response<crate::body::ProxyBody>,
        Error = Infallible,
        Future = impl Future<Output = Result<http::Response<crate::body::ProxyBody>, Infallible>>
                 + Send
                 + 'static,
    > + Clone
    + 'static {
        let forwarder = self.forwarder.clone();
        service_fn(move |req| forwarder.clone().handle(req).map(Ok::<_, Infallible>))
    }

    fn tls_result(&self, result: &'static str) {
        self.metrics
            .tls_handshakes
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

/// Reads until the first bytes tell HTTP/2 with prior knowledge from HTTP/1.
async fn detect<IO: AsyncRead + Unpin>(
    io: &mut IO,
    buf: &mut BytesMut,
    control: &ConnControl,
) -> Detected {
    loop {
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Detected::Http1;
        }
        if n == H2_PREFACE.len() {
            return Detected::Http2;
        }
        if !own_http1::read_more(io, buf, control).await {
            return Detected::Closed;
        }
    }
}
