//! The proxy listener: accepts connections, terminates TLS when configured, tells
//! HTTP/1.1 from HTTP/2 (prior-knowledge h2c on plain connections, ALPN under TLS)
//! and serves each with its own path ([`crate::http1`], [`crate::http2`]); both hand
//! every request to the [`Forwarder`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::future::Either;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tandem_common::Shutdown;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;
use tracing::field::display;

use crate::connections::{ConnControl, Connections, Limits, Managed, Phase, Tracked};
use crate::forward::Forwarder;
use crate::http1::{self as own_http1, Outcome};
use crate::metrics::{ProxyMetrics, ResultLabel};
use crate::rewind::Rewind;
use crate::upgrade::{self, Tunnel};

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
    /// Time limits and the cap on client connections.
    pub limits: Limits,
}

/// hyper's HTTP/1 settings, built once per listener, for the requests the proxy's
/// own HTTP/1 path hands over.
///
/// HTTP/1 has no header-read timer: hyper would re-arm a runtime timer on every
/// request of a keep-alive connection; the sweep ([`Connections::sweep`]) enforces
/// the header-read and idle timeouts without any per-request cost. Small messages
/// are written with one `write` rather than a `writev` of head and body
/// (`writev(false)`).
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
        let connections = Arc::new(Connections::new(self.limits.clone(), self.metrics.clone()));
        let sweeper = tokio::spawn(connections.clone().sweep());
        let hyper = Arc::new(hyper_http1());
        let mut accept_errors = AcceptErrors::default();
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        // Out of file descriptors, typically: free one, and back off
                        // a little instead of spinning.
                        self.metrics.accept_errors.inc();
                        let shed = connections.shed_one();
                        accept_errors.log(&error, shed);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
                _ = self.shutdown.wait() => break,
            };
            let guard = match connections.open() {
                Ok(guard) => guard,
                Err(_at_capacity) => {
                    refuse(stream);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let this = self.clone();
            let hyper = hyper.clone();
            // One span per connection (not per request): every line logged while
            // serving it names its peer. Debug, as all of the connection's own lines
            // are: at info, it is never built.
            let span = tracing::debug_span!(
                "connection",
                %peer,
                listener = %local,
                tls = self.tls.is_some(),
                protocol = tracing::field::Empty,
            );
            tokio::spawn(
                async move {
                    this.metrics.connections.inc();
                    this.metrics.open_connections.inc();
                    this.connection(stream, guard.control(), &hyper).await;
                    this.metrics.open_connections.dec();
                    drop(guard);
                    tracing::trace!("connection closed");
                }
                .instrument(span),
            );
        }
        drop(listener);
        tracing::info!(grace = ?self.grace, "draining open connections");
        connections.close_all();
        if tokio::time::timeout(self.grace, connections.all_closed())
            .await
            .is_err()
        {
            tracing::warn!(
                open = connections.len(),
                "connections still open after the grace period; closing them"
            );
            connections.close_now();
            let _ = tokio::time::timeout(LAST_CLOSE, connections.all_closed()).await;
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
                Detected::Http1 => {
                    tracing::Span::current().record("protocol", display("http1"));
                    self.http1(io, buf, control, hyper).await
                }
                Detected::Http2 => {
                    tracing::Span::current().record("protocol", display("http2"));
                    control.set_phase(Phase::Multiplexed);
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
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let protocol = if h2 { "http2" } else { "http1" };
        tracing::Span::current().record("protocol", display(protocol));
        if h2 {
            control.set_phase(Phase::Multiplexed);
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
        let tunnel = Arc::new(Mutex::new(None));
        let conn = hyper
            .serve_connection(io, self.service(control, &tunnel))
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

    /// Forwards each request hyper parsed; the connection is [`Phase::Delegated`]
    /// while one is in flight (its own timers bound it), idle between them. An
    /// upgrade that the backend accepted leaves its tunnel in `tunnel`.
    fn service(
        &self,
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
        let forwarder = self.forwarder.clone();
        let control = control.clone();
        let tunnel = tunnel.clone();
        service_fn(move |req| {
            control.set_phase(Phase::Delegated);
            let done = control.clone();
            if upgrade::is_upgrade(&req) {
                let tunnel = tunnel.clone();
                let upgrading =
                    upgrade::forward(forwarder.clone(), req).map(move |(response, t)| {
                        *tunnel.lock().unwrap_or_else(|e| e.into_inner()) = t;
                        done.set_phase(Phase::Idle);
                        Ok::<_, Infallible>(response)
                    });
                return Either::Left(upgrading);
            }
            // The body may still be arriving: its bytes on this connection keep
            // the request's stream idle timeout from running out.
            let activity = (!hyper::body::Body::is_end_stream(req.body())).then(|| control.clone());
            Either::Right(
                forwarder
                    .clone()
                    .handle(req, activity)
                    .map(move |response| {
                        done.set_phase(Phase::Idle);
                        Ok::<_, Infallible>(response)
                    }),
            )
        })
    }

    fn tls_result(&self, result: &'static str) {
        self.metrics
            .tls_handshakes
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

/// How long accepting pauses after a failure.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// How long connections get to close after the grace period, once told to.
const LAST_CLOSE: Duration = Duration::from_secs(1);

/// Refuses a connection at the cap: a reset at once (SO_LINGER 0), so the client
/// fails fast instead of waiting for an answer that will not come.
fn refuse(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// accept() failures, logged at most once every few seconds (they come in bursts:
/// every pending connection fails the same way while file descriptors are out).
#[derive(Default)]
struct AcceptErrors {
    last_logged: Option<std::time::Instant>,
    since: u64,
}

impl AcceptErrors {
    const EVERY: Duration = Duration::from_secs(5);

    fn log(&mut self, error: &std::io::Error, shed: bool) {
        self.since += 1;
        if self
            .last_logged
            .is_some_and(|last| last.elapsed() < Self::EVERY)
        {
            return;
        }
        tracing::warn!(
            %error,
            failures = self.since,
            closed_a_quiet_connection = shed,
            "cannot accept client connections (raise the file descriptor limit, or lower --max-client-connections)"
        );
        self.last_logged = Some(std::time::Instant::now());
        self.since = 0;
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
        if !matches!(
            own_http1::read_more(io, buf, control).await,
            own_http1::Read::More
        ) {
            return Detected::Closed;
        }
    }
}
