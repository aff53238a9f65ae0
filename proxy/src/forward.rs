//! The request path: route by authority, pick a backend, forward, count.
//!
//! Nothing here takes a lock. The common cases (HTTP/1 in and out, HTTP/2 in and
//! out) forward the request head untouched apart from hop-by-hop headers; only a
//! protocol change (HTTP/1 client to HTTP/2 backend or back) rewrites the URI.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use tandem_balancer::PickError;

use crate::body::{ClientBodyError, ProxyBody, RequestBody};
use crate::connections::ConnControl;
use crate::deadline::ResponseLimit;
use crate::destination::{Backend, BackendSet, Destination, Destinations, Resolution};
use crate::http1::head::valid_host;
use crate::metrics::{DestinationStats, ProxyErrorKind};
use crate::upstream::{self, Fault, HttpVersion, RequestSlot, UpstreamError};

/// How requests find their destination.
pub enum Router {
    /// `--backends`: every request goes to one fixed set.
    Static(Arc<Destination>),
    /// `--control-plane`: by the request's authority (`Host` / `:authority`).
    Discovery {
        destinations: Arc<Destinations>,
        /// Where requests for unknown destinations (or without a Host) go, if anywhere.
        default: Option<Box<str>>,
    },
}

pub struct Forwarder {
    pub router: Arc<Router>,
    /// How long a request waits for a new destination's first discovery answer.
    pub discovery_timeout: Duration,
    pub resilience: Resilience,
    /// How long a request head may take to arrive (enforced per connection; here to
    /// say so in the answer).
    pub header_read_timeout: Duration,
}

/// A response the proxy makes itself.
#[derive(Debug)]
pub struct ProxyError {
    pub kind: ProxyErrorKind,
    pub status: StatusCode,
    pub message: String,
}

impl ProxyError {
    pub(crate) fn new(kind: ProxyErrorKind, status: StatusCode, message: String) -> Self {
        Self {
            kind,
            status,
            message,
        }
    }

    /// An error answered for a destination, counted in its metrics by kind.
    fn counted(
        stats: &DestinationStats,
        kind: ProxyErrorKind,
        status: StatusCode,
        message: String,
    ) -> Self {
        stats.error(kind);
        Self::new(kind, status, message)
    }

    /// Text for HTTP clients; for gRPC clients a trailers-only gRPC error, which their
    /// libraries turn into a proper status with this message.
    pub fn into_response(self, grpc: bool) -> Response<ProxyBody> {
        let mut response = if grpc {
            let code = match self.kind {
                ProxyErrorKind::BadRequest => "13",
                ProxyErrorKind::NotSupported => "12", // UNIMPLEMENTED
                _ => "14",                            // UNAVAILABLE: the caller may retry.
            };
            let mut r = Response::new(ProxyBody::Empty);
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from_static(code));
            if let Ok(message) = HeaderValue::from_str(&grpc_message(&self.message)) {
                h.insert("grpc-message", message);
            }
            r
        } else {
            let mut r = Response::new(ProxyBody::text(self.body_text()));
            *r.status_mut() = self.status;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT_PLAIN));
            r
        };
        response.headers_mut().insert(
            HeaderName::from_static("x-tandem-error"),
            HeaderValue::from_static(self.kind.as_str()),
        );
        response
    }

    /// The same answer as [`into_response`](Self::into_response) gives an HTTP client,
    /// as the bytes of an HTTP/1.1 response (for the proxy's own HTTP/1 path).
    pub fn to_http1(&self, is_head: bool, close: bool) -> Vec<u8> {
        let body = self.body_text();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {TEXT_PLAIN}\r\nx-tandem-error: {}\r\ncontent-length: {}\r\n{}\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.kind.as_str(),
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        if !is_head {
            out.push_str(&body);
        }
        out.into_bytes()
    }

    fn body_text(&self) -> String {
        format!("tandem: {}\n", self.message)
    }
}

const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// gRPC messages are percent-encoded outside printable ASCII (and '%' itself).
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[inline]
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
}

/// The authority the client addressed: `:authority` (HTTP/2, absolute-form) or `Host`.
#[inline]
fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
        .filter(|a| !a.is_empty())
}

/// Refuses what the proxy does not forward: CONNECT (it tunnels to any address; a
/// mesh routes to services), and HTTP/1 requests whose Host does not say one thing
/// (RFC 9112 §3.2: HTTP/1.1 needs exactly one, and a valid one). HTTP/2 requests
/// were checked by the HTTP/2 code.
fn check_request<B>(req: &Request<B>) -> Result<(), ProxyError> {
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::new(
            ProxyErrorKind::NotSupported,
            StatusCode::METHOD_NOT_ALLOWED,
            "Tandem does not tunnel CONNECT requests; send the request to the service itself"
                .into(),
        ));
    }
    if req.version() >= Version::HTTP_2 {
        return Ok(());
    }
    let bad = |why: &str| {
        Err(ProxyError::new(
            ProxyErrorKind::BadRequest,
            StatusCode::BAD_REQUEST,
            why.into(),
        ))
    };
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => bad("the request has two Host headers"),
        (Some(host), None) if !valid_host(host.as_bytes()) => {
            bad("the Host header is not a valid host[:port]")
        }
        (None, _) if req.version() == Version::HTTP_11 && req.uri().authority().is_none() => {
            bad("an HTTP/1.1 request must have a Host header")
        }
        _ => Ok(()),
    }
}

/// Lower-cases `authority` and adds the default port (80) into `buf`, without allocating.
pub fn normalize_name<'b>(authority: &str, buf: &'b mut [u8; 256]) -> Option<&'b str> {
    let bytes = authority.as_bytes();
    let has_port = match bytes.first() {
        Some(b'[') => authority.contains("]:"),
        _ => bytes.contains(&b':'),
    };
    let len = bytes.len() + if has_port { 0 } else { 3 };
    if len > buf.len() {
        return None;
    }
    for (dst, src) in buf.iter_mut().zip(bytes) {
        *dst = src.to_ascii_lowercase();
    }
    if !has_port {
        buf[bytes.len()..len].copy_from_slice(b":80");
    }
    std::str::from_utf8(&buf[..len]).ok()
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): they describe one connection, not the
/// message, and HTTP/2 forbids them. `te: trailers` stays: gRPC needs it end to end.
/// Most messages carry none, so one pass over the names decides whether to look closer,
/// and a message `received_over` HTTP/2 needs none: the HTTP/2 code refuses one with
/// such headers (or `te` other than `trailers`) as malformed before it reaches the proxy.
fn strip_hop_by_hop(received_over: Version, headers: &mut HeaderMap) {
    if received_over == Version::HTTP_2 || !headers.keys().any(tandem_h2::is_hop_by_hop) {
        return;
    }
    if let Some(connection) = headers.remove(header::CONNECTION)
        && let Ok(listed) = connection.to_str()
    {
        for name in listed.split(',').map(str::trim) {
            if !name.eq_ignore_ascii_case("te") && !name.is_empty() {
                headers.remove(name);
            }
        }
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    headers.remove(header::UPGRADE);
    if headers
        .get(header::TE)
        .is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Shapes the request head for the HTTP version spoken to the backend. The authority
/// moves between the URI (HTTP/2 `:authority`) and `Host` (HTTP/1) only when the
/// versions differ, so the common paths do no work here. `backend`: the address
/// an HTTP/1.1 request names as its Host when the client named none (HTTP/1.0).
fn adapt(req: &mut Request<ProxyBody>, to: HttpVersion, backend: std::net::SocketAddr) {
    match to {
        HttpVersion::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            if let Some(authority) = req.uri().authority() {
                // HTTP/1 servers expect origin-form (`/path?query`) and a Host header,
                // the target's authority whatever Host said (RFC 9112 §3.2.2).
                if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                    req.headers_mut().insert(header::HOST, host);
                }
                let origin = req
                    .uri()
                    .path_and_query()
                    .map(|pq| pq.as_str())
                    .unwrap_or("/")
                    .parse::<Uri>()
                    .unwrap_or_else(|_| Uri::from_static("/"));
                *req.uri_mut() = origin;
            } else if !req.headers().contains_key(header::HOST)
                && let Ok(host) = HeaderValue::from_str(&backend.to_string())
            {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        HttpVersion::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            if req.uri().authority().is_none() {
                // HTTP/2 carries the authority in the URI (`:authority`), not in Host.
                let host = req.headers_mut().remove(header::HOST);
                let mut parts = req.uri().clone().into_parts();
                parts.scheme = Some(http::uri::Scheme::HTTP);
                parts.authority = host
                    .as_ref()
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.parse().ok());
                if parts.path_and_query.is_none() {
                    parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
                }
                if let Ok(uri) = Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            } else {
                req.headers_mut().remove(header::HOST);
            }
        }
    }
}

impl Forwarder {
    /// The destination of a request that addressed `authority` (its Host / :authority).
    pub(crate) fn route(&self, authority: Option<&str>) -> Result<Arc<Destination>, ProxyError> {
        match &*self.router {
            Router::Static(destination) => Ok(destination.clone()),
            Router::Discovery {
                destinations,
                default,
            } => {
                let name = match authority.filter(|a| !a.is_empty()) {
                    Some(authority) => {
                        let mut buf = [0u8; 256];
                        normalize_name(authority, &mut buf)
                            .ok_or_else(|| {
                                ProxyError::new(
                                    ProxyErrorKind::BadRequest,
                                    StatusCode::BAD_REQUEST,
                                    "the request's Host is longer than 250 bytes".into(),
                                )
                            })
                            .and_then(|name| {
                                destinations.get_or_create(name).map_err(|e| {
                                    ProxyError::new(
                                        ProxyErrorKind::DiscoveryUnavailable,
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        e.to_string(),
                                    )
                                })
                            })?
                    }
                    None => match default {
                        Some(default) => destinations.get_or_create(default).map_err(|e| {
                            ProxyError::new(
                                ProxyErrorKind::DiscoveryUnavailable,
                                StatusCode::SERVICE_UNAVAILABLE,
                                e.to_string(),
                            )
                        })?,
                        None => {
                            return Err(ProxyError::new(
                                ProxyErrorKind::BadRequest,
                                StatusCode::BAD_REQUEST,
                                "the request names no destination: Tandem routes by its Host header (HTTP/1) or :authority (HTTP/2)".into(),
                            ));
                        }
                    },
                };
                Ok(name)
            }
        }
    }

    fn default_destination(&self) -> Option<Arc<Destination>> {
        match &*self.router {
            Router::Discovery {
                destinations,
                default: Some(default),
            } => destinations.get_or_create(default).ok(),
            _ => None,
        }
    }

    /// The backend set for `destination`, following `--default-destination` for unknown ones.
    pub(crate) async fn backends(
        &self,
        destination: &Arc<Destination>,
    ) -> Result<(Arc<Destination>, Arc<BackendSet>), ProxyError> {
        // The common case, without touching the (larger) waiting future.
        if let Resolution::Ready(set) = &**destination.resolution() {
            return Ok((destination.clone(), set.clone()));
        }
        Box::pin(self.resolve_slowly(destination)).await
    }

    async fn resolve_slowly(
        &self,
        destination: &Arc<Destination>,
    ) -> Result<(Arc<Destination>, Arc<BackendSet>), ProxyError> {
        let mut destination = destination.clone();
        let mut followed_default = false;
        loop {
            let resolution = destination.resolve(self.discovery_timeout).await;
            let error = match &*resolution {
                Resolution::Ready(set) => return Ok((destination, set.clone())),
                Resolution::Unknown(message) => {
                    if !followed_default
                        && let Some(default) = self.default_destination()
                        && default.name() != destination.name()
                    {
                        followed_default = true;
                        destination = default;
                        continue;
                    }
                    ProxyError::new(
                        ProxyErrorKind::UnknownDestination,
                        StatusCode::NOT_FOUND,
                        format!("unknown destination {}: {message}", destination.name()),
                    )
                }
                Resolution::Unavailable(reason) => ProxyError::new(
                    ProxyErrorKind::DiscoveryUnavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no backends known for {} yet: the control plane is unreachable ({reason})",
                        destination.name()
                    ),
                ),
                Resolution::Pending => ProxyError::new(
                    ProxyErrorKind::DiscoveryUnavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the control plane did not answer for {} within {:?}",
                        destination.name(),
                        self.discovery_timeout
                    ),
                ),
            };
            destination.stats.error(error.kind);
            return Err(error);
        }
    }

    /// Handles one request (one HTTP/2 stream); never fails: errors become responses.
    /// Generic over the body so tests can drive it without a socket. `conn`: the
    /// client connection, whose sweeps bound the wait for a response (see
    /// [`crate::deadline`]).
    ///
    /// Not an `async fn`, nor is `forward`: an async fn keeps its by-value arguments
    /// twice in its state (rust-lang/rust#62958), and this future is moved into place
    /// for every HTTP/2 stream, so every copy of a request saved here is saved there.
    pub fn handle<B>(
        self: Arc<Self>,
        req: Request<B>,
        conn: Option<Arc<ConnControl>>,
    ) -> impl Future<Output = Response<ProxyBody>> + 'static
    where
        B: RequestBody + 'static,
    {
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let client_version = if req.version() == Version::HTTP_2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        // Combinators rather than an `async` block: awaiting a captured future would
        // move it into a second slot of the block's state.
        let forwarding = match check_request(&req).and_then(|()| self.route(authority(&req))) {
            Ok(destination) => {
                destination.touch(start);
                let req = req.map(RequestBody::into_request_body);
                Either::Left(self.forward(destination, req, start, grpc, conn))
            }
            Err(error) => Either::Right(std::future::ready(Err(error))),
        };
        forwarding.map(move |result| {
            let mut response = result.unwrap_or_else(|error| error.into_response(grpc));
            *response.version_mut() = client_version;
            response
        })
    }

    // Not `async fn`: see `handle` (an async fn here would hold the request twice).
    #[allow(clippy::manual_async_fn)]
    fn forward(
        self: Arc<Self>,
        destination: Arc<Destination>,
        req: Request<ProxyBody>,
        start: Instant,
        grpc: bool,
        conn: Option<Arc<ConnControl>>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'static {
        // The one place the request is kept until a backend takes it: the sends borrow it.
        let mut slot: RequestSlot = Some(req);
        async move {
            let (destination, mut set) = self.backends(&destination).await?;
            let stats = &destination.stats;
            let _admitted = self.admit(&destination)?;
            let req = slot.as_mut().expect("the request, not sent yet");
            strip_hop_by_hop(req.version(), req.headers_mut());
            // A request with no body and a safe-to-repeat method can be sent again when its
            // backend fails before answering. A copy of its head is made only for a
            // transport that takes the request away (the raw HTTP/1 client leaves it).
            let replayable = self.resilience.max_attempts > 1
                && set.balancer.pickable() > 1
                && http_body::Body::is_end_stream(req.body())
                && is_idempotent(req.method().as_str());
            let mut replay: Option<Replay> = None;
            let body = !http_body::Body::is_end_stream(req.body());
            let limit = self.response_limit(&set, conn.as_deref(), body);
            let mut attempts = Attempts::default();
            loop {
                let backend = set.pick().map_err(|e| nothing_to_pick(&destination, e))?;
                let version = backend.meta.protocol.version_for(grpc);
                let req = slot.as_mut().expect("a request to send");
                adapt(req, version, backend.meta.address);
                if replayable && replay.is_none() && upstream::takes_request(version, &slot) {
                    replay = slot.as_ref().map(Replay::of);
                }
                let upstream = &backend.state.upstream;
                let sending = upstream.send(version, &mut slot);
                let error = match limit.bound(sending).await {
                    Ok(Ok(mut response)) => {
                        record_response(backend, response.status().as_u16(), start);
                        strip_hop_by_hop(response.version(), response.headers_mut());
                        return Ok(response);
                    }
                    Ok(Err(error)) => error,
                    Err(_elapsed) => return Err(timed_out(&destination, backend, limit.limit)),
                };
                let fault = error.fault();
                record_failure(backend, fault);
                if fault == Fault::Client {
                    return Err(client_failed(&destination, &error));
                }
                // Unwritten: safe to send anywhere; written: only if it can be replayed.
                let written = error.written(&slot);
                let again =
                    attempts.another(&self.resilience, &set, stats) && (!written || replayable);
                if !again {
                    return Err(upstream_failed(&destination, backend, &error));
                }
                if slot.is_none() {
                    // Taken by its transport, so copied before the send.
                    slot = replay.as_ref().map(Replay::request);
                }
                retrying(&destination, backend, &error, attempts.count(), written).await;
                set = destination.fresher(set);
            }
        }
    }

    /// How long a request may wait for its response's head: the service's timeout,
    /// else `--request-timeout` (both precise), else the stream idle timeout (to the
    /// second, through the client connection `conn`), which waits longer while the
    /// request's body (`body`) may still be arriving.
    fn response_limit<'a>(
        &self,
        set: &BackendSet,
        conn: Option<&'a ConnControl>,
        body: bool,
    ) -> ResponseLimit<'a> {
        match self.request_timeout(set) {
            Some(limit) => ResponseLimit::precise(limit),
            None => ResponseLimit::stream_idle(self.resilience.stream_idle_timeout, conn, body),
        }
    }

    /// Circuit breaking: a bounded number of requests in flight per destination, and
    /// an answer at once beyond it, never a queue. The request counts while the
    /// returned guard lives.
    pub(crate) fn admit<'d>(
        &self,
        destination: &'d Destination,
    ) -> Result<Counted<'d>, ProxyError> {
        let stats = &destination.stats;
        let admitted = Counted::enter(&stats.active);
        let in_flight = stats.active.load(Ordering::Relaxed);
        if in_flight > self.resilience.max_pending {
            return Err(ProxyError::counted(
                stats,
                ProxyErrorKind::Overflow,
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "destination {} already has {} requests in flight (limit {}); try again",
                    destination.name(),
                    in_flight - 1,
                    self.resilience.max_pending
                ),
            ));
        }
        Ok(admitted)
    }

    /// Time allowed until response headers: the service's own, else `--request-timeout`.
    pub(crate) fn request_timeout(&self, set: &BackendSet) -> Option<Duration> {
        set.policy
            .request_timeout
            .or(self.resilience.request_timeout)
    }
}

/// The attempts made for one request, and the retry budget slot its retries hold.
#[derive(Default)]
pub(crate) struct Attempts<'a> {
    count: usize,
    retry_slot: Option<Counted<'a>>,
}

impl<'a> Attempts<'a> {
    /// Whether the attempt that just failed may be followed by another: attempts
    /// left, another endpoint to try, and room in the retry budget.
    pub(crate) fn another(
        &mut self,
        resilience: &Resilience,
        set: &BackendSet,
        stats: &'a DestinationStats,
    ) -> bool {
        self.count += 1;
        self.count < resilience.max_attempts
            && set.balancer.pickable() > 1
            && (self.retry_slot.is_some() || {
                self.retry_slot = resilience.retry_slot(stats);
                self.retry_slot.is_some()
            })
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }
}

/// Counts a backend's response: outlier detection (5xx are failures), status, latency.
#[inline]
pub(crate) fn record_response(backend: &Backend, status: u16, start: Instant) {
    if (500..600).contains(&status) {
        backend.state.failed();
    } else {
        backend.state.succeeded();
    }
    backend.state.stats.latency.observe(start.elapsed());
    backend.state.stats.responses.record(status);
}

/// Counts a request that got no response from `backend`, against it only if the
/// failure was its own.
pub(crate) fn record_failure(backend: &Backend, fault: Fault) {
    if fault == Fault::Backend {
        backend.state.failed();
        backend.state.stats.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// The answer when the client's own request failed on its way (a malformed or
/// abandoned body): 400, and no backend is blamed or tried again.
pub(crate) fn client_failed(destination: &Destination, error: &UpstreamError) -> ProxyError {
    tracing::debug!(destination = destination.name(), %error, "the client's request failed");
    // hyper reports a failed body as its own error; the cause says what was wrong.
    let message = match ClientBodyError::find(error) {
        Some(cause) => format!("{cause}"),
        None => format!("the request could not be forwarded: {error}"),
    };
    ProxyError::counted(
        &destination.stats,
        ProxyErrorKind::BadRequest,
        StatusCode::BAD_REQUEST,
        message,
    )
}

/// The answer when `backend` failed and no other attempt is made.
pub(crate) fn upstream_failed(
    destination: &Destination,
    backend: &Backend,
    error: &dyn std::fmt::Display,
) -> ProxyError {
    tracing::debug!(destination = destination.name(), backend = %backend.meta.address, %error, "upstream request failed");
    ProxyError::counted(
        &destination.stats,
        ProxyErrorKind::UpstreamFailed,
        StatusCode::BAD_GATEWAY,
        format!(
            "backend {} of {} failed: {error}",
            backend.meta.address,
            destination.name()
        ),
    )
}

/// The answer when `backend` did not answer within the request timeout.
pub(crate) fn timed_out(
    destination: &Destination,
    backend: &Backend,
    limit: Duration,
) -> ProxyError {
    backend.state.failed();
    ProxyError::counted(
        &destination.stats,
        ProxyErrorKind::Timeout,
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "backend {} of {} did not answer within {limit:?}",
            backend.meta.address,
            destination.name()
        ),
    )
}

/// Counts a retry, and backs off a little (with jitter) when the failed backend may
/// have seen the request.
pub(crate) async fn retrying(
    destination: &Destination,
    backend: &Backend,
    error: &(dyn std::fmt::Display + Sync),
    attempt: usize,
    written: bool,
) {
    tracing::debug!(destination = destination.name(), backend = %backend.meta.address, %error, attempt, "retrying on another endpoint");
    destination.stats.retries.fetch_add(1, Ordering::Relaxed);
    if written {
        tokio::time::sleep(RETRY_BACKOFF.mul_f64(fastrand::f64())).await;
    }
}

/// The answer when a destination has no endpoint to pick, counted in its metrics.
pub(crate) fn nothing_to_pick(destination: &Destination, e: PickError) -> ProxyError {
    let (kind, message) = match e {
        PickError::NoEndpoints => (
            ProxyErrorKind::NoEndpoints,
            format!("destination {} has no endpoints", destination.name()),
        ),
        PickError::NoHealthyEndpoints { total } => (
            ProxyErrorKind::NoHealthyEndpoints,
            format!(
                "destination {} has no healthy endpoints ({total} known, none ready)",
                destination.name()
            ),
        ),
    };
    ProxyError::counted(
        &destination.stats,
        kind,
        StatusCode::SERVICE_UNAVAILABLE,
        message,
    )
}

/// Up to this long (with full jitter) before resending a request a backend may have seen.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Envoy's idempotent methods: sending them twice has the effect of sending them once.
/// By name, so both request paths (a parsed `http::Method`, raw HTTP/1 bytes) ask it.
pub(crate) fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// The head of a bodiless request, to send it again.
struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    fn of(req: &Request<ProxyBody>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    fn request(&self) -> Request<ProxyBody> {
        let mut req = Request::new(ProxyBody::Empty);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Retries, timeouts and circuit breaking, with Envoy's defaults.
#[derive(Debug, Clone)]
pub struct Resilience {
    /// Endpoints tried for one request.
    pub max_attempts: usize,
    /// Retries in flight may be this share of the requests in flight…
    pub retry_budget: f64,
    /// …or at least this many.
    pub retry_min: usize,
    /// Default time allowed until response headers (a service's policy overrides it).
    pub request_timeout: Option<Duration>,
    /// Requests in flight per destination beyond which the proxy answers 503 at once.
    pub max_pending: usize,
    /// A request that moved no byte for this long is given up (504 while it waits
    /// for its response's head), as Envoy's stream idle timeout.
    pub stream_idle_timeout: Duration,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            retry_budget: 0.2,
            retry_min: 3,
            request_timeout: None,
            max_pending: 10_000,
            stream_idle_timeout: Duration::from_secs(300),
        }
    }
}

impl Resilience {
    /// Takes a retry slot if the budget allows one.
    fn retry_slot<'a>(&self, stats: &'a crate::metrics::DestinationStats) -> Option<Counted<'a>> {
        let active = stats.active.load(Ordering::Relaxed) as f64;
        let allowed = (active * self.retry_budget).max(self.retry_min as f64);
        let slot = Counted::enter(&stats.active_retries);
        ((stats.active_retries.load(Ordering::Relaxed) as f64) <= allowed).then_some(slot)
    }
}

/// Counts itself in while alive.
pub(crate) struct Counted<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Counted<'a> {
    fn enter(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_authorities() {
        let mut buf = [0u8; 256];
        assert_eq!(normalize_name("web", &mut buf), Some("web:80"));
        assert_eq!(
            normalize_name("Web.Default:8080", &mut buf),
            Some("web.default:8080")
        );
        assert_eq!(normalize_name("10.0.0.1:80", &mut buf), Some("10.0.0.1:80"));
        assert_eq!(normalize_name("[::1]", &mut buf), Some("[::1]:80"));
        assert_eq!(normalize_name("[::1]:81", &mut buf), Some("[::1]:81"));
        assert_eq!(normalize_name(&"a".repeat(300), &mut buf), None);
    }

    #[test]
    fn strips_hop_by_hop_but_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(Version::HTTP_11, &mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(h.contains_key("x-app") && h.contains_key(header::TE));

        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-app", HeaderValue::from_static("kept"));
        strip_hop_by_hop(Version::HTTP_11, &mut h);
        assert!(
            !h.contains_key(header::TE),
            "only te: trailers is forwarded"
        );

        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(Version::HTTP_11, &mut h);
        assert_eq!(h.len(), 1, "end-to-end headers are untouched");
    }

    #[test]
    fn adapts_between_versions() {
        let mut req = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "web:80")
            .body(ProxyBody::Empty)
            .unwrap();
        let addr = "10.0.0.1:8080".parse().unwrap();
        adapt(&mut req, HttpVersion::Http2, addr);
        assert_eq!(req.uri().to_string(), "http://web:80/a?b=1");
        assert!(!req.headers().contains_key(header::HOST));
        adapt(&mut req, HttpVersion::Http1, addr);
        assert_eq!(req.uri().to_string(), "/a?b=1");
        assert_eq!(req.headers()[header::HOST], "web:80");
        assert_eq!(req.version(), Version::HTTP_11);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("no endpoints: 100%"), "no endpoints: 100%25");
        assert_eq!(grpc_message("é"), "%C3%A9");
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// The per-request future is moved into place for every HTTP/2 stream: a field
    /// added to it costs every request a copy (see ARCHITECTURE.md).
    #[test]
    fn the_per_request_future_stays_small() {
        let destination = Destination::new("static", Resolution::Pending);
        let forwarder = Arc::new(Forwarder {
            router: Arc::new(Router::Static(destination)),
            discovery_timeout: Duration::from_secs(1),
            resilience: Resilience::default(),
            header_read_timeout: Duration::from_secs(1),
        });
        let future = forwarder.handle(Request::new(ProxyBody::Empty), None);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1_200, "the per-request future grew to {size} bytes");
    }
}
