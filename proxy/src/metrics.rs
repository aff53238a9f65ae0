//! Proxy metrics. Per-request numbers live in plain atomics owned by the backend or
//! destination they describe (no label lookup, lock or allocation per request); a
//! [`prometheus_client`] collector walks the live destinations at scrape time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::counted::ByteCounts;

/// Exact status codes are kept for this many distinct codes per backend; rarer codes
/// beyond that are counted by class (`status_code="5xx"`).
const STATUS_SLOTS: usize = 8;

/// Counts of responses by status code, lock-free.
#[derive(Debug, Default)]
pub struct StatusCounts {
    codes: [AtomicU16; STATUS_SLOTS],
    counts: [AtomicU64; STATUS_SLOTS],
    overflow_by_class: [AtomicU64; 6],
}

impl StatusCounts {
    pub fn record(&self, code: u16) {
        for (slot, count) in self.codes.iter().zip(&self.counts) {
            match slot.load(Relaxed) {
                c if c == code => {
                    count.fetch_add(1, Relaxed);
                    return;
                }
                0 => match slot.compare_exchange(0, code, Relaxed, Relaxed) {
                    Ok(_) => {
                        count.fetch_add(1, Relaxed);
                        return;
                    }
                    Err(c) if c == code => {
                        count.fetch_add(1, Relaxed);
                        return;
                    }
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        let class = (code / 100).min(5) as usize;
        self.overflow_by_class[class].fetch_add(1, Relaxed);
    }

    /// `(label, count)` for every status seen.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = self
            .codes
            .iter()
            .zip(&self.counts)
            .filter_map(|(c, n)| {
                let code = c.load(Relaxed);
                (code != 0).then(|| (code.to_string(), n.load(Relaxed)))
            })
            .collect();
        for (class, n) in self.overflow_by_class.iter().enumerate() {
            let n = n.load(Relaxed);
            if n > 0 {
                out.push((format!("{class}xx"), n));
            }
        }
        out
    }

    /// Counts by status class (index: code / 100).
    pub fn by_class(&self) -> [u64; 6] {
        let mut out = [0u64; 6];
        for (code, count) in self.codes.iter().zip(&self.counts) {
            let code = code.load(Relaxed);
            if code != 0 {
                out[usize::from(code / 100).min(5)] += count.load(Relaxed);
            }
        }
        for (class, n) in self.overflow_by_class.iter().enumerate() {
            out[class] += n.load(Relaxed);
        }
        out
    }

    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .chain(&self.overflow_by_class)
            .map(|n| n.load(Relaxed))
            .sum()
    }
}

/// Upper bounds of the latency buckets, in microseconds (0.5 ms … 10 s).
const LATENCY_BOUNDS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// A fixed-bucket latency histogram, lock-free.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let us = elapsed.as_micros().min(u64::MAX as u128) as u64;
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Adds this histogram's counts to `sums` (histograms of several endpoints make
    /// one of their service).
    pub fn add_to(&self, sums: &mut LatencySums) {
        for (sum, n) in sums.buckets.iter_mut().zip(&self.buckets) {
            *sum += n.load(Relaxed);
        }
        sums.sum_us += self.sum_us.load(Relaxed);
    }
}

/// Counts of [`LatencyHistogram`]s added up, for encoding.
#[derive(Debug, Clone, Default)]
pub struct LatencySums {
    buckets: [u64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: u64,
}

impl LatencySums {
    pub fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::MetricEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        let count = self.buckets.iter().sum();
        let buckets: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let bound = LATENCY_BOUNDS_US
                    .get(i)
                    .map_or(f64::INFINITY, |us| *us as f64 / 1e6);
                (bound, *n)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum_us as f64 / 1e6, count, &buckets, None)
    }
}

/// Everything counted per backend endpoint of a destination.
#[derive(Debug, Default)]
pub struct BackendStats {
    pub responses: StatusCounts,
    /// Requests that got no response: connect errors, resets, protocol errors.
    pub failures: AtomicU64,
    /// Time to response headers.
    pub latency: LatencyHistogram,
    /// Bytes over the endpoint's connections (counted by [`crate::counted::Counted`]).
    pub bytes: Arc<ByteCounts>,
}

/// Why the proxy answered a request itself instead of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum ProxyErrorKind {
    UnknownDestination,
    NoEndpoints,
    NoHealthyEndpoints,
    DiscoveryUnavailable,
    UpstreamFailed,
    BadRequest,
    /// Too many requests in flight to the destination (circuit breaking).
    Overflow,
    /// The backend did not answer within the request timeout (or the request moved
    /// no byte for the stream idle timeout).
    Timeout,
    /// The client's request head did not arrive within the header-read timeout.
    HeaderTimeout,
    /// A request the proxy does not carry (CONNECT).
    NotSupported,
}

impl ProxyErrorKind {
    pub const ALL: [ProxyErrorKind; 10] = [
        ProxyErrorKind::UnknownDestination,
        ProxyErrorKind::NoEndpoints,
        ProxyErrorKind::NoHealthyEndpoints,
        ProxyErrorKind::DiscoveryUnavailable,
        ProxyErrorKind::UpstreamFailed,
        ProxyErrorKind::BadRequest,
        ProxyErrorKind::Overflow,
        ProxyErrorKind::Timeout,
        ProxyErrorKind::HeaderTimeout,
        ProxyErrorKind::NotSupported,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyErrorKind::UnknownDestination => "unknown_destination",
            ProxyErrorKind::NoEndpoints => "no_endpoints",
            ProxyErrorKind::NoHealthyEndpoints => "no_healthy_endpoints",
            ProxyErrorKind::DiscoveryUnavailable => "discovery_unavailable",
            ProxyErrorKind::UpstreamFailed => "upstream_failed",
            ProxyErrorKind::BadRequest => "bad_request",
            ProxyErrorKind::Overflow => "overflow",
            ProxyErrorKind::Timeout => "timeout",
            ProxyErrorKind::HeaderTimeout => "header_timeout",
            ProxyErrorKind::NotSupported => "not_supported",
        }
    }
}

/// Per-destination counters.
#[derive(Debug, Default)]
pub struct DestinationStats {
    pub errors: [AtomicU64; ProxyErrorKind::ALL.len()],
    pub discovery_updates: AtomicU64,
    pub ejections: AtomicU64,
    pub retries: AtomicU64,
    /// Requests in flight now (circuit breaking and the retry budget read it).
    pub active: std::sync::atomic::AtomicUsize,
    /// Retries in flight now.
    pub active_retries: std::sync::atomic::AtomicUsize,
    /// The proxy's own answers (the errors above) by status class (index: code / 100).
    pub answered: [AtomicU64; 6],
    /// When discovery last stopped confirming the backend set (Unix seconds; 0: the
    /// stream is up, or the destination never had one).
    pub stale_since: AtomicU64,
}

impl DestinationStats {
    pub fn error(&self, kind: ProxyErrorKind, status: u16) {
        self.errors[kind as usize].fetch_add(1, Relaxed);
        self.answered[usize::from(status / 100).min(5)].fetch_add(1, Relaxed);
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Which listener: `proxy` (addressed to the proxy), `outbound` or `inbound`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: &'static str,
}

/// What became of an intercepted outbound connection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterceptedLabel {
    /// `http1`, `http2` or `opaque`.
    pub protocol: &'static str,
    /// `service` (a destination the control plane knows, balanced) or `passthrough`
    /// (forwarded to the address as it is).
    pub route: &'static str,
}

/// Process-wide counters that are not per destination.
#[derive(Debug, Default)]
pub struct ProxyMetrics {
    pub open_connections: Family<ListenerLabel, Gauge>,
    pub connections: Family<ListenerLabel, Counter>,
    /// Outbound connections by what they spoke and where they went.
    pub intercepted: Family<InterceptedLabel, Counter>,
    pub tls_handshakes: Family<ResultLabel, Counter>,
    /// 1 while at least one discovery stream is up, or in static mode.
    pub discovery_connected: Gauge,
    pub discovery_stream_errors: Counter,
    pub discovery_updates_rejected: Counter,
    /// The cap on open client connections.
    pub max_client_connections: Gauge,
    /// New connections refused at the cap (no quiet connection to close for them).
    pub connections_refused: Counter,
    /// Quiet connections closed to make room for new ones (at the cap, or out of fds).
    pub connections_shed: Counter,
    pub idle_connections_closed: Counter,
    pub header_read_timeouts: Counter,
    /// accept() failures (out of file descriptors, typically).
    pub accept_errors: Counter,
    /// Certificate requests to the identity service, by result (`ok`, `failed`).
    pub identity_renewals: Family<ResultLabel, Counter>,
    /// When the current certificate expires (Unix seconds; 0 before the first).
    pub identity_expiry: Gauge,
    /// Mesh TLS handshakes, by side (`client`, `server`) and result.
    pub mesh_handshakes: Family<MeshHandshakeLabel, Counter>,
    /// Inbound connections by whether they came over mesh TLS, and the client's
    /// identity (bounded: the ServiceAccounts that call this pod).
    pub inbound_connections: Family<InboundLabel, Counter>,
    /// Mesh TLS connections this proxy made, by the server proxy's identity.
    pub outbound_mtls_connections: Family<OutboundLabel, Counter>,
    /// Spans by what became of them (`exported`, or dropped: `queue_full`,
    /// `export_failed`).
    pub trace_spans: Family<ResultLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeshHandshakeLabel {
    pub side: &'static str,
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundLabel {
    /// `mtls`, `plaintext`, or `refused` (plaintext under `mtls-only`).
    pub transport: &'static str,
    /// The client proxy's identity; empty for plaintext.
    pub client_id: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabel {
    /// The server proxy's identity (bounded: the ServiceAccounts this pod calls).
    pub server_id: String,
}

impl ProxyMetrics {
    /// The span counters, taken out of their family once: counting a span then
    /// takes no lock.
    pub fn span_counts(&self) -> crate::trace::SpanCounts {
        let counter = |result| {
            self.trace_spans
                .get_or_create(&ResultLabel { result })
                .clone()
        };
        crate::trace::SpanCounts {
            exported: counter("exported"),
            queue_full: counter("queue_full"),
            export_failed: counter("export_failed"),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tandem_proxy");
        r.register(
            "open_connections",
            "Client connections open now",
            self.open_connections.clone(),
        );
        r.register(
            "connections",
            "Client connections accepted",
            self.connections.clone(),
        );
        r.register(
            "intercepted_connections",
            "Intercepted outbound connections by protocol (http1, http2, opaque) and route (service: balanced; passthrough: to the address as it is)",
            self.intercepted.clone(),
        );
        r.register(
            "tls_handshakes",
            "TLS handshakes by result",
            self.tls_handshakes.clone(),
        );
        r.register(
            "max_client_connections",
            "The cap on open client connections (--max-client-connections)",
            self.max_client_connections.clone(),
        );
        r.register(
            "connections_refused",
            "Client connections refused at the cap, with no quiet connection to close for them",
            self.connections_refused.clone(),
        );
        r.register(
            "connections_shed",
            "Quiet client connections closed to make room for new ones",
            self.connections_shed.clone(),
        );
        r.register(
            "idle_connections_closed",
            "Client connections closed for being quiet between requests (idle timeout, or draining)",
            self.idle_connections_closed.clone(),
        );
        r.register(
            "header_read_timeouts",
            "Client connections closed because a request head did not arrive within --header-read-timeout",
            self.header_read_timeouts.clone(),
        );
        r.register(
            "accept_errors",
            "Failures to accept a client connection (out of file descriptors, typically)",
            self.accept_errors.clone(),
        );
        r.register(
            "identity_renewals",
            "Certificate requests to the identity service by result (the last certificate serves while they fail)",
            self.identity_renewals.clone(),
        );
        r.register(
            "identity_certificate_expiry_timestamp_seconds",
            "When this proxy's certificate expires, in Unix seconds (0: none yet)",
            self.identity_expiry.clone(),
        );
        r.register(
            "mesh_tls_handshakes",
            "Mutual TLS handshakes with other proxies by side (client, server) and result",
            self.mesh_handshakes.clone(),
        );
        r.register(
            "inbound_connections",
            "Inbound connections by transport (mtls, plaintext, refused) and client identity",
            self.inbound_connections.clone(),
        );
        r.register(
            "outbound_mtls_connections",
            "Mutual TLS connections to other proxies, by the server's identity",
            self.outbound_mtls_connections.clone(),
        );
        r.register(
            "trace_spans",
            "Spans by result: exported, or dropped (queue_full: the collector is slower than the traffic; export_failed: it did not take them)",
            self.trace_spans.clone(),
        );
        r.register(
            "discovery_connected",
            "1 when the proxy holds an answer from the control plane (or runs with static backends)",
            self.discovery_connected.clone(),
        );
        r.register(
            "discovery_stream_errors",
            "Discovery streams that broke (the last-known backends keep serving)",
            self.discovery_stream_errors.clone(),
        );
        r.register(
            "discovery_updates_rejected",
            "Malformed discovery updates that were rejected (the last good state was kept)",
            self.discovery_updates_rejected.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_counts_keep_exact_codes_then_classes() {
        let s = StatusCounts::default();
        for code in [200, 200, 503, 201, 202, 203, 204, 205, 206, 207, 404, 500] {
            s.record(code);
        }
        let snap = s.snapshot();
        assert!(snap.contains(&("200".to_string(), 2)));
        assert!(snap.contains(&("503".to_string(), 1)));
        assert!(snap.contains(&("4xx".to_string(), 1)));
        assert!(snap.contains(&("5xx".to_string(), 1)));
        assert_eq!(s.total(), 12);
    }

    #[test]
    fn histogram_counts_per_bucket() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut sums = LatencySums::default();
        h.add_to(&mut sums);
        h.add_to(&mut sums);
        assert_eq!(sums.buckets.iter().sum::<u64>(), 6);
        assert_eq!(sums.sum_us, 2 * 60_003_100);
        assert_eq!(sums.buckets[0], 2);
        assert_eq!(sums.buckets[3], 2);
        assert_eq!(sums.buckets[LATENCY_BOUNDS_US.len()], 2);
    }
}
