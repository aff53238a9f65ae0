//! What the proxy knows, for operators: the `/config` admin route (JSON) and the
//! per-destination Prometheus metrics, both read from the live destinations.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::{Method, Request};
use hyper::body::Incoming;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde_json::json;
use tandem_balancer::Health;
use tandem_common::admin::{AdminResponse, AdminRoutes, json as json_response};

use crate::destination::{Destination, Resolution};
use crate::forward::Router;
use crate::metrics::{BackendStats, ProxyErrorKind, encode_latency};
use crate::view::ProxyLocality;

/// The live destinations, wherever the router keeps them.
pub struct Inspector {
    pub router: Arc<Router>,
    pub locality: Arc<ProxyLocality>,
    /// This proxy's identity, when it has one.
    pub identity: Option<Arc<crate::identity::Identity>>,
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inspector")
    }
}

impl Router {
    pub fn destinations(&self) -> Vec<Arc<Destination>> {
        match self {
            Router::Static(destination) => vec![destination.clone()],
            Router::Discovery { destinations, .. } => destinations.all(),
        }
    }
}

fn health_str(h: Health) -> &'static str {
    match h {
        Health::Healthy => "healthy",
        Health::Draining => "draining",
        Health::Unhealthy => "unhealthy",
    }
}

impl Inspector {
    pub fn config(&self) -> serde_json::Value {
        let destinations: Vec<serde_json::Value> = self
            .router
            .destinations()
            .iter()
            .map(|d| {
                let resolution = d.resolution();
                let mut out = json!({ "name": d.name() });
                match &**resolution {
                    Resolution::Pending => out["state"] = "pending".into(),
                    Resolution::Unknown(m) => {
                        out["state"] = "unknown".into();
                        out["reason"] = m.clone().into();
                    }
                    Resolution::Unavailable(m) => {
                        out["state"] = "unavailable".into();
                        out["reason"] = m.clone().into();
                    }
                    Resolution::Ready(set) => {
                        let shares = set.balancer.expected_shares();
                        let weights = set.balancer.effective_weights();
                        out["state"] = "ready".into();
                        out["mode"] = serde_json::to_value(set.balancer.mode()).unwrap_or_default();
                        out["loads"] =
                            serde_json::to_value(set.balancer.loads()).unwrap_or_default();
                        out["service"] = set.service.clone().into();
                        out["version"] = set.version.into();
                        out["pickable"] = set.balancer.pickable().into();
                        out["callers"] =
                            serde_json::to_value(&set.placement.caller_shares).unwrap_or_default();
                        out["policy"] = serde_json::to_value(&set.policy).unwrap_or_default();
                        out["endpoints"] = set
                            .backends
                            .iter()
                            .enumerate()
                            .map(|(i, b)| {
                                let mut e = serde_json::to_value(&b.meta).unwrap_or_default();
                                e["expected_share"] = shares[i].into();
                                // Effective weights are kept in hundredths (slow start).
                                e["effective_weight"] = (weights[i] as f64 / 100.0).into();
                                e["ejected"] = set.local.get(i).is_some_and(|l| l.ejected).into();
                                e["responses"] = b.state.stats.responses.total().into();
                                e["failures"] = b.state.stats.failures.load(Relaxed).into();
                                e["idle_connections"] = b.state.upstream.idle_connections().into();
                                e["http2_connections"] =
                                    b.state.upstream.http2_connections().into();
                                // How requests reach it: mutual TLS to its proxy, or plaintext.
                                e["transport"] = if b.state.upstream.meshed() {
                                    "mtls"
                                } else {
                                    "plaintext"
                                }
                                .into();
                                e
                            })
                            .collect();
                    }
                }
                out
            })
            .collect();
        json!({
            "mode": match &*self.router { Router::Static(_) => "static", Router::Discovery { .. } => "discovery" },
            "locality": self.locality.current(),
            "identity": self.identity.as_ref().map(|i| i.describe()),
            "destinations": destinations,
        })
    }
}

impl AdminRoutes for Inspector {
    fn route(&self, req: &Request<Incoming>) -> Option<AdminResponse> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/config") => Some(json_response(&self.config())),
            _ => None,
        }
    }
}

struct BackendRow<'a> {
    destination: &'a str,
    backend: String,
    stats: &'a BackendStats,
}

impl BackendRow<'_> {
    fn labels(&self) -> [(&'static str, &str); 3] {
        [
            ("direction", "outbound"),
            ("destination", self.destination),
            ("backend", self.backend.as_str()),
        ]
    }
}

impl Collector for Inspector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let destinations = self.router.destinations();
        let sets: Vec<(
            Arc<Destination>,
            Option<Arc<crate::destination::BackendSet>>,
        )> = destinations
            .iter()
            .map(|d| {
                let set = match &**d.resolution() {
                    Resolution::Ready(set) => Some(set.clone()),
                    _ => None,
                };
                (d.clone(), set)
            })
            .collect();

        // One row per (destination, backend), with its labels computed once.
        let rows: Vec<BackendRow<'_>> = sets
            .iter()
            .flat_map(|(d, set)| {
                set.iter()
                    .flat_map(|s| &s.backends)
                    .map(move |b| BackendRow {
                        destination: d.name(),
                        backend: b.meta.address.to_string(),
                        stats: &b.state.stats,
                    })
            })
            .collect();

        let mut requests = encoder.encode_descriptor(
            "tandem_proxy_requests",
            "Responses from backends by destination, backend and status code",
            None,
            MetricType::Counter,
        )?;
        for row in &rows {
            for (status, count) in row.stats.responses.snapshot() {
                let [direction, destination, backend] = row.labels();
                let labels = [
                    direction,
                    destination,
                    backend,
                    ("status_code", status.as_str()),
                ];
                ConstCounter::new(count).encode(requests.encode_family(&labels)?)?;
            }
        }

        let mut failures = encoder.encode_descriptor(
            "tandem_proxy_request_failures",
            "Requests that got no response from a backend (connect error, reset)",
            None,
            MetricType::Counter,
        )?;
        for row in &rows {
            ConstCounter::new(row.stats.failures.load(Relaxed))
                .encode(failures.encode_family(&row.labels())?)?;
        }

        let mut latency = encoder.encode_descriptor(
            "tandem_proxy_response_latency_seconds",
            "Time from request to response headers, by destination and backend",
            None,
            MetricType::Histogram,
        )?;
        for row in &rows {
            encode_latency(
                &mut latency.encode_family(&row.labels())?,
                &row.stats.latency,
            )?;
        }

        let mut endpoints = encoder.encode_descriptor(
            "tandem_proxy_endpoints",
            "Endpoints known per destination, by health",
            None,
            MetricType::Gauge,
        )?;
        for (d, set) in &sets {
            let Some(set) = set else { continue };
            for health in [Health::Healthy, Health::Draining, Health::Unhealthy] {
                let n = set
                    .backends
                    .iter()
                    .filter(|b| b.meta.health == health)
                    .count();
                let labels = [("destination", d.name()), ("health", health_str(health))];
                ConstGauge::new(n as i64).encode(endpoints.encode_family(&labels)?)?;
            }
        }

        let mut errors = encoder.encode_descriptor(
            "tandem_proxy_errors",
            "Requests the proxy answered itself, by destination and reason",
            None,
            MetricType::Counter,
        )?;
        for (d, _) in &sets {
            for kind in ProxyErrorKind::ALL {
                let n = d.stats.errors[kind as usize].load(Relaxed);
                if n > 0 {
                    let labels = [("destination", d.name()), ("reason", kind.as_str())];
                    ConstCounter::new(n).encode(errors.encode_family(&labels)?)?;
                }
            }
        }

        for (name, help, read) in [
            (
                "tandem_proxy_ejections",
                "Endpoints ejected by outlier detection, per destination",
                (|d: &Destination| d.stats.ejections.load(Relaxed)) as fn(&Destination) -> u64,
            ),
            (
                "tandem_proxy_retries",
                "Requests sent again to another endpoint after a failure",
                |d: &Destination| d.stats.retries.load(Relaxed),
            ),
            (
                "tandem_proxy_overflow",
                "Requests refused at once because the destination had too many in flight",
                |d: &Destination| d.stats.errors[ProxyErrorKind::Overflow as usize].load(Relaxed),
            ),
            (
                "tandem_proxy_discovery_updates",
                "Discovery updates applied per destination",
                |d: &Destination| d.stats.discovery_updates.load(Relaxed),
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (d, _) in &sets {
                let labels = [("destination", d.name())];
                ConstCounter::new(read(d)).encode(family.encode_family(&labels)?)?;
            }
        }

        let mut in_flight = encoder.encode_descriptor(
            "tandem_proxy_requests_in_flight",
            "Requests sent to a destination and waiting for a response's headers",
            None,
            MetricType::Gauge,
        )?;
        for (d, _) in &sets {
            let labels = [("destination", d.name())];
            ConstGauge::new(d.stats.active.load(Relaxed) as i64)
                .encode(in_flight.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
