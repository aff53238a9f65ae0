//! The proxy's listeners: accept connections, terminate TLS when configured, tell
//! HTTP/1.1 from HTTP/2 (prior-knowledge h2c on plain connections, ALPN under TLS)
//! and serve each with its own path ([`crate::http1`], [`crate::http2`]); both hand
//! every request to the [`Forwarder`].
//!
//! A listener has a [`Role`]: explicit (clients address the proxy, which routes by
//! `Host`/`:authority`), outbound (the app's connections, redirected by the pod's nat
//! rules: routed by where they were going, HTTP balanced per request, anything else
//! per connection, and what the control plane does not know forwarded as it is), or
//! inbound (connections for the app: to its port on the pod's loopback).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use hyper::server::conn::http1;
use tandem_common::Shutdown;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;
use tracing::field::display;

use crate::connections::{ConnControl, Connections, Phase, Tracked};
use crate::destination::{BackendSet, Destination, Resolution};
use crate::detect::{self, Sniffed};
use crate::forward::error::http1_answer;
use crate::forward::{Forwarder, Router};
use crate::http1 as own_http1;
use crate::inbound::InboundContext;
use crate::metrics::{InterceptedLabel, ListenerLabel, ProxyMetrics, ResultLabel};
use crate::original_dst::original_destination;
use crate::rewind::Rewind;
use crate::tcp;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Room a client connection's read buffer starts with.
const CLIENT_BUFFER: usize = 8 * 1024;

/// A TLS record starts with content type 22 (handshake) for a ClientHello.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

use crate::detect::H2_PREFACE;

/// What a listener's connections are.
#[derive(Debug, Clone)]
pub enum Role {
    /// Addressed to the proxy: routed by `Host` / `:authority`.
    Explicit,
    /// The app's outgoing connections, redirected here by `tandem-proxy init`'s rules.
    Outbound {
        /// Destination ports known to carry a protocol that is not HTTP (or whose
        /// server speaks first): opaque at once, no waiting for the client.
        opaque_ports: Arc<[u16]>,
        /// How long a client may say nothing before its connection is taken as
        /// opaque (server-speaks-first protocols wait for the server).
        detect_timeout: Duration,
    },
    /// Connections for the app, redirected here: to its port on the loopback
    /// ([`crate::inbound`]).
    Inbound(Arc<InboundContext>),
}

pub struct Server {
    pub role: Role,
    pub forwarder: Arc<Forwarder>,
    pub tls: Option<TlsAcceptor>,
    pub metrics: Arc<ProxyMetrics>,
    pub shutdown: Shutdown,
    pub grace: Duration,
    /// Every client connection of the proxy, whichever listener took it: one cap on
    /// them all, one sweep (time limits), one drain. Its sweeper is the caller's to run.
    pub connections: Arc<Connections>,
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
        let connections = self.connections.clone();
        let hyper = Arc::new(hyper_http1());
        let mut accept_errors = AcceptErrors::default();
        // Resolved once: no label lookup per connection.
        let listener_label = ListenerLabel {
            listener: self.role.name(),
        };
        let accepted = self
            .metrics
            .connections
            .get_or_create(&listener_label)
            .clone();
        let open = self
            .metrics
            .open_connections
            .get_or_create(&listener_label)
            .clone();
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
            let (accepted, open) = (accepted.clone(), open.clone());
            // One span per connection (not per request): every line logged while
            // serving it names its peer. Debug, as all of the connection's own lines
            // are: at info, it is never built.
            let span = tracing::debug_span!(
                "connection",
                %peer,
                listener = %local,
                role = self.role.name(),
                tls = self.tls.is_some(),
                protocol = tracing::field::Empty,
            );
            tokio::spawn(
                async move {
                    accepted.inc();
                    open.inc();
                    // Boxed: the spawned future stays small, so spawning it copies
                    // a few words rather than the whole connection's state.
                    Box::pin(this.connection(stream, guard.control(), &hyper)).await;
                    open.dec();
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
    }

    async fn connection(
        &self,
        stream: TcpStream,
        control: &Arc<ConnControl>,
        hyper: &http1::Builder,
    ) {
        match &self.role {
            Role::Explicit => {}
            Role::Outbound {
                opaque_ports,
                detect_timeout,
            } => {
                let ports = opaque_ports.clone();
                // Each role's future boxed: a connection's state is as large as its
                // own path needs, not as the largest of them.
                return Box::pin(self.outbound(stream, control, hyper, &ports, *detect_timeout))
                    .await;
            }
            Role::Inbound(context) => {
                let Some(original) = redirected(&stream) else {
                    return;
                };
                let context = context.clone();
                return Box::pin(crate::inbound::serve(
                    &self.forwarder,
                    &self.metrics,
                    &context,
                    stream,
                    original,
                    control,
                    hyper,
                ))
                .await;
            }
        }
        match &self.tls {
            Some(acceptor) => Box::pin(self.tls_connection(acceptor, stream, control, hyper)).await,
            None => self.plain_connection(stream, control, hyper).await,
        }
    }

    /// A connection to an explicit plain-text listener: HTTP/1.1 or h2c.
    async fn plain_connection(
        &self,
        stream: TcpStream,
        control: &Arc<ConnControl>,
        hyper: &http1::Builder,
    ) {
        let mut io = Tracked::new(stream, control.clone());
        let mut buf = BytesMut::with_capacity(CLIENT_BUFFER);
        match detect(&mut io, &mut buf, control).await {
            Detected::Http1 => {
                tracing::Span::current().record("protocol", display("http1"));
                crate::http1_conn::serve(&self.forwarder, io, buf, control, hyper).await
            }
            Detected::Http2 => {
                tracing::Span::current().record("protocol", display("http2"));
                control.set_phase(Phase::Multiplexed);
                let io = Rewind::new(io, buf.freeze());
                // Boxed, so an HTTP/1.1 connection's state does not have its size.
                Box::pin(crate::http2::serve(&self.forwarder, control, io)).await;
            }
            Detected::Closed => {}
        }
    }

    /// A connection to an explicit TLS listener: HTTP/2 or HTTP/1.1 by ALPN.
    async fn tls_connection(
        &self,
        acceptor: &TlsAcceptor,
        stream: TcpStream,
        control: &Arc<ConnControl>,
        hyper: &http1::Builder,
    ) {
        let mut first = [0u8; 1];
        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
            Ok(Ok(1..)) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(Ok(1..)) => {
                // Plain HTTP on the TLS port: say so, as nginx does, instead of a reset.
                self.tls_result("plaintext");
                let mut stream = stream;
                let answer = http1_answer(
                    http::StatusCode::BAD_REQUEST,
                    "tls_required",
                    "this port speaks TLS; a plain-text request was sent to it",
                    false,
                    true,
                );
                let _ = stream.write_all(&answer).await;
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
            crate::http1_conn::serve(&self.forwarder, tls, buf, control, hyper).await;
        }
    }

    /// An outbound connection: where it was going decides (the service the control
    /// plane knows at that address, or the address as it is), and its first bytes how
    /// (HTTP per request, anything else per connection).
    async fn outbound(
        &self,
        stream: TcpStream,
        control: &Arc<ConnControl>,
        hyper: &http1::Builder,
        opaque_ports: &[u16],
        detect_timeout: Duration,
    ) {
        let Some(original) = redirected(&stream) else {
            return;
        };
        let mut io = Tracked::new(stream, control.clone());
        let mut buf = BytesMut::with_capacity(CLIENT_BUFFER);
        let sniffed = if opaque_ports.contains(&original.port()) {
            Sniffed::Opaque
        } else {
            detect::sniff(&mut io, &mut buf, control, detect_timeout).await
        };
        if sniffed == Sniffed::Closed {
            return;
        }
        tracing::Span::current().record("protocol", sniffed.name());
        let known = self.known(original).await;
        self.metrics
            .intercepted
            .get_or_create(&InterceptedLabel {
                protocol: sniffed.name(),
                route: if known.is_some() {
                    "service"
                } else {
                    "passthrough"
                },
            })
            .inc();
        match (sniffed, known) {
            (Sniffed::Http1 | Sniffed::Http2, Some((destination, _))) => {
                // This connection's requests all go to the service it addressed.
                let forwarder = self.forwarder.fixed_to(destination, None);
                if sniffed == Sniffed::Http2 {
                    control.set_phase(Phase::Multiplexed);
                    let io = Rewind::new(io, buf.freeze());
                    crate::http2::serve(&forwarder, control, io).await;
                } else {
                    crate::http1_conn::serve(&forwarder, io, buf, control, hyper).await;
                }
            }
            (_, Some((destination, set))) => {
                control.set_phase(Phase::Delegated);
                let mut io = Rewind::new(io, buf.freeze());
                if let Err(error) = tcp::balanced(&mut io, &destination, &set).await {
                    tracing::debug!(%error, destination = destination.name(), "opaque connection failed");
                }
            }
            (_, None) => {
                control.set_phase(Phase::Delegated);
                let mut io = Rewind::new(io, buf.freeze());
                if let Err(error) = tcp::passthrough(&mut io, original).await {
                    tracing::debug!(%error, "connection to an address the control plane does not know failed");
                }
            }
        }
    }

    /// The service the control plane knows at `address` (a ClusterIP and port), and
    /// its endpoints; `None` for an address it does not know (a pod, anything
    /// outside the mesh), or while it cannot be asked.
    async fn known(&self, address: SocketAddr) -> Option<(Arc<Destination>, Arc<BackendSet>)> {
        let destination = match &*self.forwarder.router {
            Router::Static(destination) => destination.clone(),
            Router::Discovery { destinations, .. } => {
                // The name is the address as text, written on the stack: no
                // allocation for a destination already watched.
                use std::io::Write;
                let mut text = [0u8; 64];
                let mut cursor = std::io::Cursor::new(&mut text[..]);
                write!(cursor, "{address}").ok()?;
                let len = cursor.position() as usize;
                let name = std::str::from_utf8(&text[..len]).ok()?;
                destinations.get_or_create(name).ok()?
            }
        };
        destination.touch();
        let resolution = destination.resolve(self.forwarder.discovery_timeout).await;
        match &*resolution {
            Resolution::Ready(set) => Some((destination.clone(), set.clone())),
            _ => None,
        }
    }

    fn tls_result(&self, result: &'static str) {
        self.metrics
            .tls_handshakes
            .get_or_create(&ResultLabel { result })
            .inc();
    }
}

/// Where a redirected connection was going; `None` (and the connection closed) for
/// one that came here directly: forwarding it to its own address would loop.
fn redirected(stream: &TcpStream) -> Option<SocketAddr> {
    let original = match original_destination(stream) {
        Ok(original) => original,
        Err(error) => {
            tracing::debug!(%error, "no original destination");
            return None;
        }
    };
    if stream.local_addr().is_ok_and(|local| local == original) {
        tracing::debug!(%original, "a connection to the listener itself, not redirected: closed");
        return None;
    }
    Some(original)
}

impl Role {
    /// The listener's name in logs and in the startup announcement.
    pub fn name(&self) -> &'static str {
        match self {
            Role::Explicit => "proxy",
            Role::Outbound { .. } => "outbound",
            Role::Inbound(_) => "inbound",
        }
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
