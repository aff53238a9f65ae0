//! Resilience, with Envoy's defaults: circuit breaking (a bounded number of requests
//! in flight per destination, answered 503 at once beyond), retries on another
//! endpoint within a retry budget (a failed request goes again if it was not written,
//! or if it has no body and an idempotent method: its head is copied for that only
//! when the transport takes the request away), timeouts, and what each outcome tells
//! outlier detection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::header::HeaderMap;
use http::{Request, StatusCode, Uri, Version};

use super::error::ProxyError;
use crate::body::ProxyBody;
use crate::connections::ConnControl;
use crate::deadline::ResponseLimit;
use crate::destination::{Backend, BackendSet, Destination};
use crate::metrics::{DestinationStats, ProxyErrorKind};
use crate::shared::Fault;

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
        if in_flight > self.max_pending {
            return Err(ProxyError::counted(
                stats,
                ProxyErrorKind::Overflow,
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "destination {} already has {} requests in flight (limit {}); try again",
                    destination.name(),
                    in_flight - 1,
                    self.max_pending
                ),
            ));
        }
        Ok(admitted)
    }

    /// Time allowed until response headers: the service's own, else `--request-timeout`.
    pub(crate) fn request_timeout(&self, set: &BackendSet) -> Option<Duration> {
        set.policy.request_timeout.or(self.request_timeout)
    }

    /// How long a request may wait for its response's head: the service's timeout,
    /// else `--request-timeout` (both precise), else the stream idle timeout (to the
    /// second, through the client connection `conn`), which waits longer while the
    /// request's body (`body`) may still be arriving.
    pub(crate) fn response_limit<'a>(
        &self,
        set: &BackendSet,
        conn: Option<&'a ConnControl>,
        body: bool,
    ) -> ResponseLimit<'a> {
        match self.request_timeout(set) {
            Some(limit) => ResponseLimit::precise(limit),
            None => ResponseLimit::stream_idle(self.stream_idle_timeout, conn, body),
        }
    }

    /// Takes a retry slot if the budget allows one.
    fn retry_slot<'a>(&self, stats: &'a DestinationStats) -> Option<Counted<'a>> {
        let active = stats.active.load(Ordering::Relaxed) as f64;
        let allowed = (active * self.retry_budget).max(self.retry_min as f64);
        let slot = Counted::enter(&stats.active_retries);
        ((stats.active_retries.load(Ordering::Relaxed) as f64) <= allowed).then_some(slot)
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

/// Up to this long (with full jitter) before resending a request a backend may have seen.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// The head of a bodiless request, to send it again.
pub(crate) struct Replay {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl Replay {
    pub(crate) fn of(req: &Request<ProxyBody>) -> Self {
        Self {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        }
    }

    pub(crate) fn request(&self) -> Request<ProxyBody> {
        let mut req = Request::new(ProxyBody::Empty);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Counts itself in while alive.
pub(crate) struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
