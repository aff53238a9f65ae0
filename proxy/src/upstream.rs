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
//! Raw HTTP/1 ([`RawPool`]): sockets the proxy's own HTTP/1 path ([`crate::http1`])
//! speaks over, pooled the same way with their read buffers. Bodiless requests from
//! elsewhere (HTTP/2 clients, hyper) to HTTP/1 backends use them too
//! ([`crate::http1::client`]); hyper's client carries requests with a body.
//! None of the paths takes a lock per request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::counted::{ByteCounts, Counted};
use arc_swap::ArcSwapOption;
use futures_util::FutureExt;
use futures_util::future::Either as FutureEither;
use http::Response;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio_util::either::Either;

use crate::body::{ClientBodyError, HyperPool, Lease, ProxyBody, RequestSlot};
use crate::http1::SendFailure;
use crate::http1::client;
use crate::http1::pool::RawPool;
use crate::http2::body::request_body_failed;
use crate::http2::client::{Http2Connection, Http2Error};
use crate::identity::mesh::{Carries, MeshClient, MeshStream};
use crate::pool::{self, ConnectError, IdlePool};

pub use crate::pool::{UpstreamSettings, connect_fault};
pub use crate::shared::{Fault, HttpVersion};

/// How long a pooled HTTP/1 connection may take to become ready before it is given up.
const READY_WAIT: Duration = Duration::from_millis(250);

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

/// A failure of the raw HTTP/1 client: a connect that failed, or an exchange that
/// went wrong once the request was written.
impl From<SendFailure> for UpstreamError {
    fn from(failure: SendFailure) -> Self {
        match failure {
            SendFailure::Connect(error) => error.into(),
            written => UpstreamError::Http1(Box::new(written)),
        }
    }
}

impl From<ConnectError> for UpstreamError {
    fn from(error: ConnectError) -> Self {
        match error {
            ConnectError::Failed(error) => UpstreamError::Connect(error),
            ConnectError::TimedOut(limit) => UpstreamError::ConnectTimeout(limit),
        }
    }
}

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

/// The connections to one endpoint.
pub struct Upstream {
    addr: SocketAddr,
    /// The endpoint's identity as discovery named it (empty: none).
    identity: Box<str>,
    /// Mutual TLS to the endpoint's proxy, when both sides have an identity: then
    /// every request goes over HTTP/2 (see [`Upstream::meshed`]).
    mesh: Option<MeshClient>,
    settings: Arc<UpstreamSettings>,
    /// Idle hyper HTTP/1 connections, shared with the [`Lease`]s that bring them back.
    idle: Arc<HyperPool>,
    raw: Arc<RawPool>,
    bytes: Arc<ByteCounts>,
    h2: ArcSwapOption<Http2Connection>,
    /// Serialises HTTP/2 dials so a burst of requests opens one connection, not many.
    h2_dial: tokio::sync::Mutex<()>,
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
    /// `bytes`: where the endpoint's connections count what they carry.
    pub fn new(
        addr: SocketAddr,
        identity: &str,
        settings: Arc<UpstreamSettings>,
        bytes: Arc<ByteCounts>,
    ) -> Arc<Self> {
        let mesh = match &settings.mesh {
            Some(mesh) if !identity.is_empty() => match mesh.client(identity) {
                Ok(client) => Some(client),
                Err(error) => {
                    tracing::warn!(%addr, %error, "cannot set up mutual TLS to the endpoint; plaintext");
                    None
                }
            },
            _ => None,
        };
        Arc::new(Self {
            addr,
            identity: identity.into(),
            mesh,
            idle: Arc::new(IdlePool::new(settings.max_idle_per_endpoint)),
            raw: Arc::new(RawPool::new(addr, settings.clone(), bytes.clone())),
            bytes,
            settings,
            h2: ArcSwapOption::empty(),
            h2_dial: tokio::sync::Mutex::new(()),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether requests to this endpoint go to its proxy over mutual TLS, as HTTP/2
    /// whatever the app speaks (the version for the app travels in a header).
    #[inline]
    pub fn meshed(&self) -> bool {
        self.mesh.is_some()
    }

    /// The mesh TLS to the endpoint's proxy, if it has one.
    pub fn mesh(&self) -> Option<&MeshClient> {
        self.mesh.as_ref()
    }

    /// Idle HTTP/1 connections right now.
    pub fn idle_connections(&self) -> usize {
        self.idle.len() + self.raw.idle()
    }

    /// The raw HTTP/1 connections ([`crate::http1`]).
    #[inline]
    pub fn raw(&self) -> &Arc<RawPool> {
        &self.raw
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
                FutureEither::Left(FutureEither::Left(client::send(&self.raw, req)))
            }
            HttpVersion::Http1 => FutureEither::Left(FutureEither::Right(self.send_http1(slot))),
            HttpVersion::Http2 => FutureEither::Right(self.send_http2(slot)),
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
        let lease = Lease::new(self.idle.clone(), sender);
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

    async fn dial(&self) -> Result<Counted, UpstreamError> {
        let tcp = pool::dial(self.addr, &self.settings).await?;
        Ok(Counted::new(tcp, self.bytes.clone()))
    }

    /// A new connection to the endpoint: TCP, or mesh TLS to its proxy (for
    /// `carries`) when it is meshed.
    pub async fn connect(
        &self,
        carries: Carries,
    ) -> Result<Either<Counted, MeshStream>, UpstreamError> {
        let tcp = self.dial().await?;
        match &self.mesh {
            Some(mesh) => mesh
                .handshake(tcp, self.addr, carries)
                .await
                .map(Either::Right)
                .map_err(UpstreamError::Connect),
            None => Ok(Either::Left(tcp)),
        }
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
        let io = TokioIo::new(self.connect(Carries::Http1).await?);
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::Handshake)?;
        let connection = connection.with_upgrades();
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
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
        // Each transport's own type: the plain HTTP/2 path does not pay for a branch
        // per read and write.
        let conn = match self.connect(Carries::Http2).await? {
            Either::Left(tcp) => Http2Connection::handshake(tcp, self.addr).await,
            Either::Right(tls) => Http2Connection::handshake(tls, self.addr).await,
        };
        let conn = Arc::new(conn);
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
