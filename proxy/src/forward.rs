//! The request flow: check a request, route it by authority, pick a backend, adapt
//! the head to the HTTP version spoken to it, forward, count.
//!
//! Nothing here takes a lock. The common cases (HTTP/1 in and out, HTTP/2 in and
//! out) forward the request head untouched apart from hop-by-hop headers; only a
//! protocol change (HTTP/1 client to HTTP/2 backend or back) rewrites the URI.
//!
//! Split by concern: [`route`] (which destination, which backend set), [`resilience`]
//! (circuit breaking, retries, timeouts, outlier detection's counts) and [`error`]
//! (the proxy's own answers, in HTTP/1, HTTP/2 and gRPC forms). The HTTP/1 path
//! ([`crate::http1`]) and upgrades ([`crate::upgrade`]) run their own flow over the
//! same three.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};

use crate::body::{ProxyBody, RequestBody, RequestSlot};
use crate::connections::ConnControl;
use crate::destination::{BackendSet, Destination};
use crate::http1::head::valid_host;
use crate::identity::mesh::{APP_PROTOCOL, CLIENT_ID};
use crate::metrics::ProxyErrorKind;
use crate::shared::{
    Fault, HttpVersion, KEEP_ALIVE, PROXY_CONNECTION, is_idempotent, te_is_trailers,
};
use crate::trace::{Found, RequestInfo, RequestTrace, TRACEPARENT, Tracer};
use crate::upstream;

pub mod error;
pub mod resilience;
pub mod route;

use error::{client_failed, nothing_to_pick, timed_out, upstream_failed};
use resilience::{Attempts, Replay, record_failure, record_response, retrying};
use route::authority;

pub use error::ProxyError;
pub use resilience::Resilience;
pub use route::{Router, normalize_name};

pub struct Forwarder {
    pub router: Arc<Router>,
    /// How long a request waits for a new destination's first discovery answer.
    pub discovery_timeout: Duration,
    pub resilience: Resilience,
    /// How long a request head may take to arrive (enforced per connection; here to
    /// say so in the answer).
    pub header_read_timeout: Duration,
    /// For the inbound listener: requests for the app in this pod.
    pub inbound: Option<Inbound>,
    /// With `--trace-collector`: spans of the requests that are traced.
    pub tracer: Option<Arc<Tracer>>,
}

/// What an inbound connection tells its requests.
#[derive(Debug, Clone, Default)]
pub struct Inbound {
    /// The client proxy's identity, for connections over mesh TLS: given to the app
    /// in [`CLIENT_ID`]. A request that did not come over mesh TLS has that header
    /// removed, so the app can trust it.
    pub client_id: Option<HeaderValue>,
    /// The client's address (the client proxy's, over mesh TLS), for traces.
    pub peer: Option<std::net::SocketAddr>,
}

impl Inbound {
    /// Sets the app's view of who called; returns the HTTP version the client
    /// proxy said the app speaks, if it said.
    pub(crate) fn prepare(&self, headers: &mut HeaderMap) -> Option<HttpVersion> {
        let hint = headers.remove(APP_PROTOCOL);
        match &self.client_id {
            Some(id) => {
                headers.insert(CLIENT_ID, id.clone());
            }
            None => {
                headers.remove(CLIENT_ID);
            }
        }
        match hint.as_ref().map(HeaderValue::as_bytes) {
            Some(b"http1") => Some(HttpVersion::Http1),
            Some(b"http2") => Some(HttpVersion::Http2),
            _ => None,
        }
    }
}

/// Records in the request's spans, if it is traced, that the proxy answered `error`.
#[inline]
fn answered(trace: &mut Option<Box<RequestTrace>>, error: ProxyError) -> ProxyError {
    if let Some(trace) = trace {
        trace.answered(error.kind, error.status.as_u16(), &error.message);
    }
    error
}

/// [`APP_PROTOCOL`]'s values.
fn app_protocol_value(version: HttpVersion) -> HeaderValue {
    match version {
        HttpVersion::Http1 => HeaderValue::from_static("http1"),
        HttpVersion::Http2 => HeaderValue::from_static("http2"),
    }
}

#[inline]
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/grpc"))
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
            // What frames or routes the message is not the client's to drop by
            // naming it (`Connection: host` would strip the Host the backend needs).
            let kept = ["te", "host", "content-length"]
                .iter()
                .any(|k| name.eq_ignore_ascii_case(k));
            if !kept && !name.is_empty() {
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
        .is_some_and(|te| !te_is_trailers(te.as_bytes()))
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
            if crate::http1::client::fits(req)
                && (req.uri().authority().is_some() || req.headers().contains_key(header::HOST))
            {
                // Written by the raw client, which takes the target's path and its
                // authority (else Host) from where they are (`client::write_head`).
                return;
            }
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
    /// A forwarder like this one whose every request goes to `destination` (an
    /// intercepted connection routes by where it was going, not by `Host`), with what
    /// an inbound connection tells its requests, if it is one.
    pub fn fixed_to(&self, destination: Arc<Destination>, inbound: Option<Inbound>) -> Arc<Self> {
        Arc::new(Forwarder {
            router: Arc::new(Router::Static(destination)),
            discovery_timeout: self.discovery_timeout,
            resilience: self.resilience.clone(),
            header_read_timeout: self.header_read_timeout,
            inbound,
            tracer: self.tracer.clone(),
        })
    }

    /// The destination of a request that addressed `authority` (its Host / :authority).
    #[inline]
    pub(crate) fn route(&self, authority: Option<&[u8]>) -> Result<Arc<Destination>, ProxyError> {
        self.router.route(authority)
    }

    /// The backend set for `destination`, following `--default-destination` for
    /// unknown ones, waiting up to `discovery_timeout` for a new one's first answer.
    #[inline]
    pub(crate) fn backends<'a>(
        &'a self,
        destination: &'a Arc<Destination>,
    ) -> impl Future<Output = Result<(Arc<Destination>, Arc<BackendSet>), ProxyError>> + 'a {
        self.router.backends(destination, self.discovery_timeout)
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
        let forwarding = match check_request(&req)
            .and_then(|()| self.route(authority(&req).map(str::as_bytes)))
        {
            Ok(destination) => {
                destination.touch();
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
    pub(crate) fn forward(
        self: Arc<Self>,
        destination: Arc<Destination>,
        req: Request<ProxyBody>,
        start: Instant,
        grpc: bool,
        conn: Option<Arc<ConnControl>>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + 'static {
        // The one place the request is kept until a backend takes it: the sends borrow it.
        let mut slot: RequestSlot = Some(req);
        // Nothing before the block: this function must stay a bare constructor, or the
        // future is built aside and copied into place (twice, per HTTP/2 stream).
        async move {
            let mut trace = match (&self.tracer, &slot) {
                (Some(tracer), Some(req)) => self.trace(tracer, req, &destination),
                _ => None,
            };
            let (destination, mut set) = self
                .backends(&destination)
                .await
                .map_err(|e| answered(&mut trace, e))?;
            let stats = &destination.stats;
            let _admitted = self
                .resilience
                .admit(&destination)
                .map_err(|e| answered(&mut trace, e))?;
            let req = slot.as_mut().expect("the request, not sent yet");
            strip_hop_by_hop(req.version(), req.headers_mut());
            let app_hint = self
                .inbound
                .as_ref()
                .and_then(|inbound| inbound.prepare(req.headers_mut()));
            // A request with no body and a safe-to-repeat method can be sent again when its
            // backend fails before answering. A copy of its head is made only for a
            // transport that takes the request away (the raw HTTP/1 client leaves it).
            let replayable = self.resilience.max_attempts > 1
                && set.balancer.pickable() > 1
                && http_body::Body::is_end_stream(req.body())
                && is_idempotent(req.method().as_str());
            let mut replay: Option<Replay> = None;
            let body = !http_body::Body::is_end_stream(req.body());
            let limit = self.resilience.response_limit(&set, conn.as_deref(), body);
            let mut attempts = Attempts::default();
            loop {
                let backend = set
                    .pick()
                    .map_err(|e| answered(&mut trace, nothing_to_pick(&destination, e)))?;
                // What the app at the endpoint speaks; to its proxy (mesh TLS), HTTP/2.
                let app_version =
                    app_hint.unwrap_or_else(|| backend.meta.protocol.version_for(grpc));
                let meshed = backend.state.upstream.meshed();
                let version = if meshed {
                    HttpVersion::Http2
                } else {
                    app_version
                };
                let req = slot.as_mut().expect("a request to send");
                adapt(req, version, backend.meta.address);
                if let Some(trace) = trace.as_mut() {
                    let attempt = attempts.count() as u32 + 1;
                    let traceparent = trace.attempt(attempt, backend, &set);
                    if let Ok(value) = HeaderValue::from_bytes(&traceparent) {
                        req.headers_mut().insert(TRACEPARENT, value);
                    }
                }
                if meshed {
                    req.headers_mut()
                        .insert(APP_PROTOCOL, app_protocol_value(app_version));
                } else if attempts.count() > 0 {
                    req.headers_mut().remove(APP_PROTOCOL);
                }
                if replayable && replay.is_none() && upstream::takes_request(version, &slot) {
                    replay = slot.as_ref().map(Replay::of);
                }
                let upstream = &backend.state.upstream;
                // Made inside the bound, not first in a local: a local is one more
                // move of the send future (large, one per HTTP/2 stream).
                let error = match limit.bound(upstream.send(version, &mut slot)).await {
                    Ok(Ok(mut response)) => {
                        record_response(backend, response.status().as_u16(), start);
                        if let Some(trace) = trace.as_mut() {
                            trace.response(response.status().as_u16());
                        }
                        strip_hop_by_hop(response.version(), response.headers_mut());
                        return Ok(response);
                    }
                    Ok(Err(error)) => error,
                    Err(_elapsed) => {
                        return Err(answered(
                            &mut trace,
                            timed_out(&destination, backend, limit.limit),
                        ));
                    }
                };
                let fault = error.fault();
                record_failure(backend, fault);
                if let Some(trace) = trace.as_mut() {
                    trace.attempt_failed(&error, false);
                }
                if fault == Fault::Client {
                    return Err(answered(&mut trace, client_failed(&destination, &error)));
                }
                // Unwritten: safe to send anywhere; written: only if it can be replayed.
                let written = error.written(&slot);
                let again =
                    attempts.another(&self.resilience, &set, stats) && (!written || replayable);
                if !again {
                    return Err(answered(
                        &mut trace,
                        upstream_failed(&destination, backend, &error),
                    ));
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

    /// The trace of `req`, if it is traced (see [`crate::trace`]).
    #[cold]
    fn trace(
        &self,
        tracer: &Tracer,
        req: &Request<ProxyBody>,
        destination: &Destination,
    ) -> Option<Box<RequestTrace>> {
        let found = Found::of_headers(req.headers());
        if !found.any() && !tracer.starts_traces() {
            return None;
        }
        let client_id = self
            .inbound
            .as_ref()
            .and_then(|i| i.client_id.as_ref())
            .and_then(|id| id.to_str().ok());
        let info = RequestInfo {
            method: req.method().as_str(),
            path: req.uri().path(),
            authority: authority(req).unwrap_or(""),
            destination: destination.name(),
            version: if req.version() == Version::HTTP_2 {
                "2"
            } else {
                "1.1"
            },
            inbound: self.inbound.as_ref().map(|i| crate::trace::InboundInfo {
                peer: i.peer,
                client_id,
            }),
        };
        tracer.request(&found, &info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("host, Content-Length"),
        );
        h.insert(header::HOST, HeaderValue::from_static("web"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        strip_hop_by_hop(Version::HTTP_11, &mut h);
        assert!(
            h.contains_key(header::HOST) && h.contains_key(header::CONTENT_LENGTH),
            "Connection cannot strip what routes and frames the message"
        );

        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(Version::HTTP_11, &mut h);
        assert_eq!(h.len(), 1, "end-to-end headers are untouched");
    }

    #[test]
    fn adapts_between_versions() {
        // With a body: sent by hyper's client, which takes the head as it is.
        let mut req = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "web:80")
            .body(ProxyBody::text("x"))
            .unwrap();
        let addr = "10.0.0.1:8080".parse().unwrap();
        adapt(&mut req, HttpVersion::Http2, addr);
        assert_eq!(req.uri().to_string(), "http://web:80/a?b=1");
        assert!(!req.headers().contains_key(header::HOST));
        adapt(&mut req, HttpVersion::Http1, addr);
        assert_eq!(req.uri().to_string(), "/a?b=1");
        assert_eq!(req.headers()[header::HOST], "web:80");
        assert_eq!(req.version(), Version::HTTP_11);

        // Bodiless: written by the raw client from the URI as it is.
        let mut req = Request::builder()
            .uri("http://web:80/a")
            .version(Version::HTTP_2)
            .body(ProxyBody::Empty)
            .unwrap();
        adapt(&mut req, HttpVersion::Http1, addr);
        assert_eq!(req.uri().to_string(), "http://web:80/a");
        assert_eq!(req.version(), Version::HTTP_11);

        // HTTP/1.0 without a Host: the backend's address names it.
        let mut req = Request::builder()
            .uri("/a")
            .version(Version::HTTP_10)
            .body(ProxyBody::Empty)
            .unwrap();
        adapt(&mut req, HttpVersion::Http1, addr);
        assert_eq!(req.headers()[header::HOST], "10.0.0.1:8080");
    }
}

#[cfg(test)]
mod future_size {
    use super::*;
    use crate::destination::Resolution;

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
            inbound: None,
            tracer: None,
        });
        let future = forwarder.handle(Request::new(ProxyBody::Empty), None);
        let size = std::mem::size_of_val(&future);
        assert!(size <= 1_200, "the per-request future grew to {size} bytes");
    }
}
