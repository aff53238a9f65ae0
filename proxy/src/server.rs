//! The proxy listener: accepts connections, terminates TLS when configured, speaks
//! HTTP/1.1 and HTTP/2 (prior-knowledge h2c on plain connections, ALPN under TLS) and
//! hands every request to the [`Forwarder`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tandem_common::Shutdown;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::forward::Forwarder;
use crate::idle::{Activity, Managed, OpenConnections, Tracked};
use crate::metrics::{ProxyMetrics, ResultLabel};

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// A TLS record starts with content type 22 (handshake) for a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

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

/// Connection settings, built once: plain connections detect the version from the
/// first bytes (`auto`); TLS connections know it from ALPN.
///
/// HTTP/1 has no header-read timer: hyper would re-arm a runtime timer on every
/// request of a keep-alive connection; the idle watchdog ([`Managed`]) covers quiet
/// and stalled clients without any per-request cost. Small messages are written with
/// one `write` rather than a `writev` of head and body (`writev(false)`): cheaper for
/// the kernel on the sizes a proxy mostly sees.
struct Builders {
    auto: auto::Builder<TokioExecutor>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new() -> Self {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1().writev(false).keep_alive(true);
        auto.http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
        let mut http1 = http1::Builder::new();
        http1.writev(false).keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
        Self { auto, http1, http2 }
    }
}

impl Server {
    /// Accepts until shutdown, then lets open connections finish for up to `grace`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let open = Arc::new(OpenConnections::default());
        let builders = Arc::new(Builders::new());
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
            let builders = builders.clone();
            let guard = open.open();
            tokio::spawn(async move {
                this.metrics.connections.inc();
                this.metrics.open_connections.inc();
                this.connection(stream, &builders).await;
                this.metrics.open_connections.dec();
                drop(guard);
                tracing::trace!(%peer, "connection closed");
            });
        }
        drop(listener);
        tracing::info!(grace = ?self.grace, "draining open connections");
        if tokio::time::timeout(self.grace, open.all_closed())
            .await
            .is_err()
        {
            tracing::warn!("connections still open after the grace period; closing them");
        }
    }

    fn managed<C>(&self, conn: C, activity: Arc<Activity>) -> Managed<C> {
        Managed::new(conn, activity, self.idle_timeout, self.shutdown.clone())
    }

    async fn connection(&self, stream: TcpStream, builders: &Builders) {
        let forwarder = self.forwarder.clone();
        let service = service_fn(move |req| forwarder.clone().handle(req).map(Ok::<_, Infallible>));
        let activity = Activity::new();
        let Some(acceptor) = &self.tls else {
            let io = TokioIo::new(Tracked::new(stream, activity.clone()));
            let conn = builders.auto.serve_connection_with_upgrades(io, service);
            if let Err(error) = self.managed(conn, activity).await {
                tracing::debug!(%error, "connection error");
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
        let tracked = Tracked::new(stream, activity.clone());
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
        let io = TokioIo::new(tls);
        let result = if h2 {
            let conn = builders.http2.serve_connection(io, service);
            self.managed(conn, activity)
                .await
                .map_err(|e| e.to_string())
        } else {
            let conn = builders.http1.serve_connection(io, service);
            self.managed(conn, activity)
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(error) = result {
            tracing::debug!(%error, "TLS connection error");
        }
    }

    fn tls_result(&self, result: &'static str) {
        self.metrics
            .tls_handshakes
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}
