//! Connections to one backend endpoint, reused across requests.
//!
//! HTTP/1: a lock-free queue of idle connections. A request takes one (or dials a
//! new one), and the connection goes back when the response body has been read to
//! its end; a connection whose body was abandoned is closed instead.
//! HTTP/2 ([`Http2Connection`]): one shared connection, multiplexing every request;
//! re-dialled when it closes. Requests beyond the backend's limit on concurrent
//! streams wait, encoded, for one to end (as in Linkerd). Opening more connections
//! instead (as Envoy does) cost more CPU per request when it was measured (with h2;
//! bench/README.md): each connection then batches fewer frames per read and write.
//! Raw HTTP/1 ([`RawConn`]): sockets the proxy's own HTTP/1 path ([`crate::http1`])
//! speaks over, pooled the same way with their read buffers. Bodiless requests from
//! elsewhere (HTTP/2 clients, hyper) to HTTP/1 backends use them too
//! ([`crate::http1::client`]); hyper's client carries requests with a body.
//! None of the paths takes a lock per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::BytesMut;
use crossbeam_queue::ArrayQueue;
use futures_util::FutureExt;
use futures_util::future::Either;
use http::{Request, Response};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::{ClientBodyError, ProxyBody};
use crate::clock;
use crate::http1::SendFailure;
use crate::http1::client;
use crate::http2::client::{Http2Connection, Http2Error};
use crate::http2::request_body_failed;

/// How long a pooled HTTP/1 connection may take to become ready before it is given up.
const READY_WAIT: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpVersion {
    Http1,
    Http2,
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Idle HTTP/1 connections older than this are not reused (servers close idle
    /// keep-alive connections; reusing one at that moment fails the request).
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            max_idle_per_endpoint: 512,
        }
    }
}

/// Whether sending the request in `slot` with `version` hands it on, out of the
/// slot: all but bodiless requests to HTTP/2 and the raw HTTP/1 client, which are
/// written from where they are. A caller that wants to resend such a request keeps
/// a copy.
pub fn takes_request(version: HttpVersion, slot: &RequestSlot) -> bool {
    match version {
        HttpVersion::Http1 => !slot.as_ref().is_some_and(client::fits),
        HttpVersion::Http2 => !slot
            .as_ref()
            .is_some_and(|req| http_body::Body::is_end_stream(req.body())),
    }
}

/// Whose fault a failed attempt was. Only a backend's own failures count against it
/// (outlier detection, failure counters) or make the request go elsewhere: a
/// client's malformed or abandoned request would fail anywhere, and the proxy
/// running out of file descriptors says nothing about the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client's request body was malformed, cut short or reset.
    Client,
    /// The proxy itself could not make the attempt (out of sockets or memory).
    Proxy,
    /// The backend refused, failed or broke the protocol.
    Backend,
}

/// The fault of a failed connect: a shortage of the proxy's own resources, or the backend.
pub fn connect_fault(error: &std::io::Error) -> Fault {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL) => {
            Fault::Proxy
        }
        _ => Fault::Backend,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("connect: timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("HTTP/1 handshake: {0}")]
    Handshake(hyper::Error),
    #[error("{0}")]
    Request(hyper::Error),
    #[error("{0}")]
    Http2(Http2Error),
    #[error("{0}")]
    Http1(Box<SendFailure>),
}

/// A request on its way to a backend. The sending futures borrow it rather than
/// own it, so the request is kept once, in the caller's future, however deep the
/// send goes (each owning layer would hold its own copy: rust-lang/rust#62958).
/// A transport that hands the request on (hyper; HTTP/2 for a request with a body)
/// takes it from the slot once a backend may have seen it; the raw HTTP/1 client and
/// HTTP/2 write a bodiless request from the slot and leave it there.
/// [`UpstreamError::written`] says whether a failed one went out.
pub type RequestSlot = Option<Request<ProxyBody>>;

impl UpstreamError {
    /// Whose fault the failure was.
    pub fn fault(&self) -> Fault {
        match self {
            UpstreamError::Connect(error) => connect_fault(error),
            UpstreamError::Request(error) if ClientBodyError::caused(error) => Fault::Client,
            UpstreamError::Http2(Http2Error::Failed(error)) if request_body_failed(error) => {
                Fault::Client
            }
            UpstreamError::Http1(failure) => failure.fault(),
            _ => Fault::Backend,
        }
    }

    /// Whether the backend may have seen the request, given what the send left in
    /// `slot`: taken by a transport, or written by the raw client (which keeps it).
    /// An unwritten request may go to any endpoint; a written one only if it can
    /// safely be sent twice.
    pub fn written(&self, slot: &RequestSlot) -> bool {
        slot.is_none()
            || matches!(
                self,
                UpstreamError::Http1(_) | UpstreamError::Http2(Http2Error::Failed(_))
            )
    }
}

pub(crate) type SendResult = Result<Response<ProxyBody>, UpstreamError>;

/// An idle pooled connection, with when it went idle: coarse seconds
/// ([`clock::now`]), so no clock is read per request.
struct Idle<C> {
    conn: C,
    since: u32,
}

/// Idle connections of one kind, in a lock-free queue.
struct IdlePool<C>(ArrayQueue<Idle<C>>);

impl<C> IdlePool<C> {
    fn new(capacity: usize) -> Self {
        Self(ArrayQueue::new(capacity.max(1)))
    }

    /// Pools `conn`; a full pool drops (closes) it instead.
    fn put(&self, conn: C) {
        let _ = self.0.push(Idle {
            conn,
            since: clock::now(),
        });
    }

    /// The next connection idle for at most `max_idle` (older ones are closed: the
    /// server may be closing them right now).
    fn take(&self, max_idle: Duration) -> Option<C> {
        while let Some(idle) = self.0.pop() {
            let idle_for = Duration::from_secs(clock::now().saturating_sub(idle.since) as u64);
            if idle_for <= max_idle {
                return Some(idle.conn);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A connection to the endpoint that the HTTP/1 path reads and writes itself: the
/// socket and the buffer responses are read into, kept together while pooled.
pub struct RawConn {
    pub stream: TcpStream,
    pub buf: BytesMut,
    /// Taken from the idle pool: the server may have closed it a moment ago.
    pub reused: bool,
}

/// The connections to one endpoint.
pub struct Upstream {
    addr: SocketAddr,
    settings: Arc<UpstreamSettings>,
    idle: IdlePool<http1::SendRequest<ProxyBody>>,
    /// A raw connection is pooled with its read buffer.
    idle_raw: IdlePool<(TcpStream, BytesMut)>,
    h2: ArcSwapOption<Http2Connection>,
    /// Serialises HTTP/2 dials so a burst of requests opens one connection, not many.
    h2_dial: tokio::sync::Mutex<()>,
}

/// A borrowed HTTP/1 connection; see [`Lease::release`].
pub struct Lease {
    upstream: Arc<Upstream>,
    sender: http1::SendRequest<ProxyBody>,
}

impl Lease {
    /// Returns the connection to its pool (the response was read to the end).
    pub fn release(self) {
        if !self.sender.is_closed() {
            self.upstream.idle.put(self.sender);
        }
    }
}

/// An HTTP/1 connection ready for one request.
struct Connection {
    sender: http1::SendRequest<ProxyBody>,
    /// Taken from the idle pool (it may have been closed by the server meanwhile).
    reused: bool,
}

impl Connection {
    /// Hands `req` to the connection now; the future only waits for the response
    /// (so it does not also carry the request: see `Forwarder::handle`).
    /// On a failure before the request was written, hyper hands it back into `slot`.
    fn send<'a>(
        mut self,
        upstream: &'a Arc<Upstream>,
        slot: &'a mut RequestSlot,
    ) -> impl Future<Output = SendResult> + use<'a> {
        let req = slot.take().expect("a request to send");
        let sending = self.sender.try_send_request(req);
        let sender = self.sender;
        // A combinator, not an `async` block, which would hold `sending` twice.
        sending.map(move |result| match result {
            Ok(response) => Ok(upstream.pooled_response(response, sender)),
            Err(mut e) => {
                *slot = e.take_message();
                Err(UpstreamError::Request(e.into_error()))
            }
        })
    }
}

impl Upstream {
    pub fn new(addr: SocketAddr, settings: Arc<UpstreamSettings>) -> Arc<Self> {
        Arc::new(Self {
            addr,
            idle: IdlePool::new(settings.max_idle_per_endpoint),
            idle_raw: IdlePool::new(settings.max_idle_per_endpoint),
            settings,
            h2: ArcSwapOption::empty(),
            h2_dial: tokio::sync::Mutex::new(()),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Idle HTTP/1 connections right now.
    pub fn idle_connections(&self) -> usize {
        self.idle.len() + self.idle_raw.len()
    }

    /// An idle raw connection that still looks open, if there is one.
    pub fn checkout_raw(&self) -> Option<RawConn> {
        while let Some((stream, buf)) = self.idle_raw.take(self.settings.idle_timeout) {
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

    /// A new raw connection.
    pub async fn dial_raw(&self) -> Result<RawConn, UpstreamError> {
        Ok(RawConn {
            stream: self.dial().await?,
            buf: BytesMut::with_capacity(crate::http1::RESPONSE_BUFFER),
            reused: false,
        })
    }

    /// Pools a raw connection whose last response was read to its end.
    pub fn release_raw(&self, conn: RawConn) {
        let mut buf = conn.buf;
        buf.clear();
        self.idle_raw.put((conn.stream, buf));
    }

    /// Sends the request in `slot` over HTTP/1 or HTTP/2. After an error the slot
    /// still holds the request if it was not written, so it can be sent elsewhere.
    ///
    /// Getting a connection and sending on it are two sequential steps, so the
    /// request's future holds one or the other, never both (it is moved per request).
    /// None of these is an `async fn`, which would keep its arguments twice
    /// (rust-lang/rust#62958): an `async move` block captures them once.
    pub fn send<'a>(
        self: &'a Arc<Self>,
        version: HttpVersion,
        slot: &'a mut RequestSlot,
    ) -> impl Future<Output = SendResult> + use<'a> {
        match version {
            HttpVersion::Http1 if !takes_request(version, slot) => {
                let req = slot.as_ref().expect("a request to send");
                Either::Left(Either::Left(client::send(self, req)))
            }
            HttpVersion::Http1 => Either::Left(Either::Right(self.send_http1(slot))),
            HttpVersion::Http2 => Either::Right(self.send_http2(slot)),
        }
    }

    #[allow(clippy::manual_async_fn)]
    fn send_http1<'a>(
        self: &'a Arc<Self>,
        slot: &'a mut RequestSlot,
    ) -> impl Future<Output = SendResult> + use<'a> {
        async move {
            loop {
                let conn = self.connection_http1().await?;
                let reused = conn.reused;
                match conn.send(self, slot).await {
                    Ok(response) => return Ok(response),
                    // A pooled connection the server closed a moment ago fails before the
                    // request is written: try the next one (or a new one).
                    Err(_) if reused && slot.is_some() => {}
                    Err(error) => return Err(error),
                }
            }
        }
    }

    #[allow(clippy::manual_async_fn)]
    fn send_http2<'a>(
        &'a self,
        slot: &'a mut RequestSlot,
    ) -> impl Future<Output = SendResult> + use<'a> {
        async move {
            let mut refused = false;
            loop {
                let (conn, reused) = match self.live_http2() {
                    Some(conn) => (conn, true),
                    // Dialling is rare and its future large: boxed, it does not bloat every request.
                    None => (Box::pin(self.dial_http2()).await?, false),
                };
                match conn.send(slot).await {
                    Ok(response) => return Ok(response),
                    // The connection ended since the last request (GOAWAY, a closed
                    // socket) and took nothing: dial a new one.
                    Err(Http2Error::NotSent(_)) if reused && conn.is_closed() => {}
                    // Refused (REFUSED_STREAM: the backend lowered its stream limit, or
                    // is shedding load) and still in the slot: once more, then it is
                    // the caller's to send elsewhere.
                    Err(Http2Error::NotSent(_)) if !refused && slot.is_some() => refused = true,
                    Err(error) => return Err(UpstreamError::Http2(error)),
                }
            }
        }
    }

    /// An HTTP/1 connection ready for one request: pooled when possible.
    async fn connection_http1(&self) -> Result<Connection, UpstreamError> {
        if let Some(sender) = self.checkout_idle().await {
            return Ok(Connection {
                sender,
                reused: true,
            });
        }
        // Dialling is rare and its future large: boxed, it does not bloat every request.
        let sender = Box::pin(self.dial_http1()).await?;
        Ok(Connection {
            sender,
            reused: false,
        })
    }

    fn pooled_response(
        self: &Arc<Self>,
        response: Response<hyper::body::Incoming>,
        sender: http1::SendRequest<ProxyBody>,
    ) -> Response<ProxyBody> {
        let lease = Lease {
            upstream: self.clone(),
            sender,
        };
        response.map(|body| {
            if http_body::Body::is_end_stream(&body) {
                // Nothing left to read (e.g. 204, Content-Length: 0): reusable now.
                lease.release();
                ProxyBody::Incoming(body)
            } else {
                ProxyBody::Pooled {
                    body,
                    lease: Some(lease),
                }
            }
        })
    }

    async fn checkout_idle(&self) -> Option<http1::SendRequest<ProxyBody>> {
        while let Some(mut sender) = self.idle.take(self.settings.idle_timeout) {
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() {
                return Some(sender);
            }
            // It may still be finishing the previous exchange (a request body the server
            // did not read). Wait briefly, never for a request body that may never end.
            if let Ok(Ok(())) = tokio::time::timeout(READY_WAIT, sender.ready()).await {
                return Some(sender);
            }
        }
        None
    }

    async fn dial(&self) -> Result<TcpStream, UpstreamError> {
        let stream =
            tokio::time::timeout(self.settings.connect_timeout, TcpStream::connect(self.addr))
                .await
                .map_err(|_| UpstreamError::ConnectTimeout(self.settings.connect_timeout))?
                .map_err(UpstreamError::Connect)?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn dial_http1(&self) -> Result<http1::SendRequest<ProxyBody>, UpstreamError> {
        let io = TokioIo::new(self.dial().await?);
        let (sender, connection) = http1::Builder::new()
            // One `write` per small message instead of a `writev` of head and body.
            .writev(false)
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "upstream HTTP/1 connection ended");
            }
        });
        Ok(sender)
    }

    /// A new HTTP/1.1 connection of its own for an upgrade request (it cannot be
    /// pooled: once switched, it carries another protocol).
    pub async fn dial_upgrade(&self) -> Result<http1::SendRequest<ProxyBody>, UpstreamError> {
        let io = TokioIo::new(self.dial().await?);
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = connection.with_upgrades().await {
                tracing::debug!(%addr, %error, "upstream upgrade connection ended");
            }
        });
        Ok(sender)
    }

    async fn dial_http2(&self) -> Result<Arc<Http2Connection>, UpstreamError> {
        let _dialing = self.h2_dial.lock().await;
        // Someone else may have connected while we waited.
        if let Some(conn) = self.live_http2() {
            return Ok(conn);
        }
        let stream = self.dial().await?;
        let conn = Arc::new(Http2Connection::handshake(stream, self.addr).await);
        self.h2.store(Some(conn.clone()));
        Ok(conn)
    }

    /// Live HTTP/2 connections right now (0 or 1).
    pub fn http2_connections(&self) -> usize {
        self.live_http2().map_or(0, |_| 1)
    }

    fn live_http2(&self) -> Option<Arc<Http2Connection>> {
        let guard = self.h2.load();
        let conn = guard.as_ref()?;
        (!conn.is_closed()).then(|| conn.clone())
    }
}
