//! The traffic metrics a scrape reads: made at scrape time from the atomics each
//! destination and endpoint keep (nothing on the request path but those atomics),
//! added up per service so the series stay bounded however many endpoints,
//! addresses and aliases a service has.
//!
//! Labels: `direction` (`outbound`: what the app called; `inbound`: calls to the
//! app), `dst_namespace` and `dst_service` (the Kubernetes Service; on the inbound
//! side this pod's own workload), and for the zone series the proxy's zone
//! (`src_zone`), the endpoint's (`dst_zone`) and the locality tier between them. Per
//! endpoint series only with `--metrics-per-endpoint`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tandem_balancer::Health;

use crate::destination::{BackendSet, Destination, Resolution};
use crate::forward::Router;
use crate::inbound::InboundContext;
use crate::metrics::{LatencySums, ProxyErrorKind};
use crate::view::ProxyLocality;

/// This proxy's workload: the inbound side's `dst_service` and `dst_namespace`.
#[derive(Debug, Clone)]
pub struct Workload {
    pub service: String,
    pub namespace: String,
}

pub struct TrafficMetrics {
    pub router: Arc<Router>,
    pub inbound: Arc<InboundContext>,
    pub locality: Arc<ProxyLocality>,
    pub workload: Workload,
    /// `--metrics-per-endpoint`: series per endpoint address too.
    pub per_endpoint: bool,
}

impl std::fmt::Debug for TrafficMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TrafficMetrics")
    }
}

/// Which service a series is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Service {
    direction: &'static str,
    namespace: String,
    name: String,
}

impl Service {
    fn labels(&self) -> [(&'static str, &str); 3] {
        [
            ("direction", self.direction),
            ("dst_namespace", self.namespace.as_str()),
            ("dst_service", self.name.as_str()),
        ]
    }
}

/// `NAME.NAMESPACE.svc.DOMAIN:PORT` (the control plane's canonical name) as
/// (namespace, name); any other name as it is, without its port, in no namespace.
fn service_of(canonical: &str) -> (String, String) {
    let host = canonical.rsplit_once(':').map_or(canonical, |(h, _)| h);
    let mut parts = host.split('.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(name), Some(namespace), Some("svc")) => (namespace.to_string(), name.to_string()),
        _ => (String::new(), host.to_string()),
    }
}

/// A service's sums over its destinations and endpoints.
#[derive(Debug, Default)]
struct Sums {
    /// Responses as the client saw them, by status class (index: code / 100).
    classes: [u64; 6],
    failures: u64,
    latency: LatencySums,
    errors: [u64; ProxyErrorKind::ALL.len()],
    retries: u64,
    ejections: u64,
    in_flight: u64,
    discovery_updates: u64,
    /// The longest any of its destinations has gone unconfirmed, in seconds.
    staleness: u64,
    /// Endpoints by health (`ejected` taking precedence), of one backend set (the
    /// aliases of a service share the same endpoints).
    endpoints: Option<[u64; 4]>,
    /// What the balancer expects to send out of the proxy's zone.
    expected_cross_zone: Option<f64>,
}

/// Traffic between zones: (service, dst_zone, tier).
type ZoneKey = (Service, String, &'static str);

#[derive(Debug, Default)]
struct ZoneSums {
    requests: u64,
    sent: u64,
    received: u64,
}

const HEALTHS: [&str; 4] = ["healthy", "draining", "unhealthy", "ejected"];

fn health_index(health: Health, ejected: bool) -> usize {
    match (ejected, health) {
        (true, _) => 3,
        (false, Health::Healthy) => 0,
        (false, Health::Draining) => 1,
        (false, Health::Unhealthy) => 2,
    }
}

const CLASSES: [&str; 6] = ["other", "1xx", "2xx", "3xx", "4xx", "5xx"];

struct Snapshot {
    services: BTreeMap<Service, Sums>,
    zones: BTreeMap<ZoneKey, ZoneSums>,
    /// (service, endpoint address, set, index) for the per-endpoint series.
    endpoints: Vec<(Service, Arc<BackendSet>, usize)>,
}

impl TrafficMetrics {
    fn snapshot(&self) -> Snapshot {
        let now = crate::clock::unix_seconds();
        let mut snapshot = Snapshot {
            services: BTreeMap::new(),
            zones: BTreeMap::new(),
            endpoints: Vec::new(),
        };
        let outbound = self
            .router
            .destinations()
            .into_iter()
            .map(|d| ("outbound", d));
        let inbound = self.inbound.apps().into_iter().map(|d| ("inbound", d));
        for (direction, destination) in outbound.chain(inbound) {
            let resolution = destination.resolution();
            let set = match &**resolution {
                Resolution::Ready(set) => Some(set.clone()),
                _ => None,
            };
            let (namespace, name) = match (&set, direction) {
                (_, "inbound") => (
                    self.workload.namespace.clone(),
                    self.workload.service.clone(),
                ),
                (Some(set), _) => service_of(&set.service),
                (None, _) => service_of(destination.name()),
            };
            let service = Service {
                direction,
                namespace,
                name,
            };
            self.add_destination(&mut snapshot, &service, &destination, set.as_deref(), now);
            if self.per_endpoint
                && let Some(set) = set
            {
                for i in 0..set.backends.len() {
                    snapshot.endpoints.push((service.clone(), set.clone(), i));
                }
            }
        }
        snapshot
    }

    fn add_destination(
        &self,
        snapshot: &mut Snapshot,
        service: &Service,
        destination: &Destination,
        set: Option<&BackendSet>,
        now: u64,
    ) {
        let sums = snapshot.services.entry(service.clone()).or_default();
        let stats = &destination.stats;
        for (sum, n) in sums.classes.iter_mut().zip(&stats.answered) {
            *sum += n.load(Relaxed);
        }
        for (sum, n) in sums.errors.iter_mut().zip(&stats.errors) {
            *sum += n.load(Relaxed);
        }
        sums.retries += stats.retries.load(Relaxed);
        sums.ejections += stats.ejections.load(Relaxed);
        sums.in_flight += stats.active.load(Relaxed) as u64;
        sums.discovery_updates += stats.discovery_updates.load(Relaxed);
        let stale_since = stats.stale_since.load(Relaxed);
        if stale_since > 0 {
            sums.staleness = sums.staleness.max(now.saturating_sub(stale_since));
        }
        let Some(set) = set else { return };
        let proxy_zone = set.placement.proxy_locality.as_ref().map(|l| &l.zone);
        let mut endpoints = [0u64; 4];
        // Only with a zone of its own does the proxy send anything "out of" it.
        let shares = match proxy_zone {
            Some(_) => set.balancer.expected_shares(),
            None => Vec::new(),
        };
        let mut cross_zone = 0.0;
        for (i, backend) in set.backends.iter().enumerate() {
            let backend_stats = &backend.state.stats;
            for (sum, n) in sums
                .classes
                .iter_mut()
                .zip(backend_stats.responses.by_class())
            {
                *sum += n;
            }
            sums.failures += backend_stats.failures.load(Relaxed);
            backend_stats.latency.add_to(&mut sums.latency);
            let ejected = set.local.get(i).is_some_and(|l| l.ejected);
            endpoints[health_index(backend.meta.health, ejected)] += 1;
            let zone = &backend.meta.locality.zone;
            if proxy_zone.is_some_and(|z| z != zone) {
                cross_zone += shares.get(i).copied().unwrap_or(0.0);
            }
            if service.direction == "outbound" {
                let key = (service.clone(), zone.clone(), set.tier_of(backend));
                let z = snapshot.zones.entry(key).or_default();
                z.requests +=
                    backend_stats.responses.total() + backend_stats.failures.load(Relaxed);
                z.sent += backend_stats.bytes.sent.load(Relaxed);
                z.received += backend_stats.bytes.received.load(Relaxed);
            }
        }
        // Aliases (web:80, web.shop:80, its ClusterIP) share one backend set: count
        // its endpoints once.
        sums.endpoints.get_or_insert(endpoints);
        if proxy_zone.is_some() && service.direction == "outbound" {
            sums.expected_cross_zone.get_or_insert(cross_zone);
        }
    }
}

/// One counter family per service, from one field of its sums.
fn per_service(
    encoder: &mut DescriptorEncoder<'_>,
    snapshot: &Snapshot,
    (name, help): (&str, &str),
    kind: MetricType,
    read: impl Fn(&Sums) -> u64,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (service, sums) in &snapshot.services {
        let value = read(sums);
        let labels = service.labels();
        match kind {
            MetricType::Gauge => {
                ConstGauge::new(value as i64).encode(family.encode_family(&labels)?)?
            }
            _ => ConstCounter::new(value).encode(family.encode_family(&labels)?)?,
        }
    }
    Ok(())
}

impl Collector for TrafficMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot();
        let src_zone = self
            .locality
            .current()
            .map(|l| l.zone)
            .filter(|z| !z.is_empty())
            .unwrap_or_else(|| "unknown".to_string());

        let mut requests = encoder.encode_descriptor(
            "tandem_proxy_requests",
            "Requests answered, by direction, destination service and status class (the proxy's own answers included)",
            None,
            MetricType::Counter,
        )?;
        for (service, sums) in &snapshot.services {
            for (class, n) in CLASSES.iter().zip(sums.classes) {
                if n > 0 {
                    let [d, ns, s] = service.labels();
                    let labels = [d, ns, s, ("status_class", *class)];
                    ConstCounter::new(n).encode(requests.encode_family(&labels)?)?;
                }
            }
        }
        let mut latency = encoder.encode_descriptor(
            "tandem_proxy_response_latency_seconds",
            "Time from a request to its response headers from an endpoint, by direction and destination service",
            None,
            MetricType::Histogram,
        )?;
        for (service, sums) in &snapshot.services {
            sums.latency
                .encode(&mut latency.encode_family(&service.labels())?)?;
        }
        per_service(
            &mut encoder,
            &snapshot,
            (
                "tandem_proxy_request_failures",
                "Attempts that got no response from an endpoint (connect error, reset)",
            ),
            MetricType::Counter,
            |s| s.failures,
        )?;
        per_service(
            &mut encoder,
            &snapshot,
            (
                "tandem_proxy_retries",
                "Requests sent again to another endpoint after a failure",
            ),
            MetricType::Counter,
            |s| s.retries,
        )?;
        per_service(
            &mut encoder,
            &snapshot,
            (
                "tandem_proxy_ejections",
                "Endpoints ejected by outlier detection",
            ),
            MetricType::Counter,
            |s| s.ejections,
        )?;
        per_service(
            &mut encoder,
            &snapshot,
            (
                "tandem_proxy_overflow",
                "Requests refused at once because the service had too many in flight (circuit breaking)",
            ),
            MetricType::Counter,
            |s| s.errors[ProxyErrorKind::Overflow as usize],
        )?;
        per_service(
            &mut encoder,
            &snapshot,
            (
                "tandem_proxy_requests_in_flight",
                "Requests sent and waiting for a response's headers",
            ),
            MetricType::Gauge,
            |s| s.in_flight,
        )?;
        per_service(
            &mut encoder,
            &snapshot,
            (
                "tandem_proxy_discovery_updates",
                "Discovery updates applied",
            ),
            MetricType::Counter,
            |s| s.discovery_updates,
        )?;
        per_service(
            &mut encoder,
            &snapshot,
            (
                "tandem_proxy_discovery_staleness_seconds",
                "How long the endpoints in use have gone unconfirmed by the control plane (0: the discovery stream is up)",
            ),
            MetricType::Gauge,
            |s| s.staleness,
        )?;

        let mut errors = encoder.encode_descriptor(
            "tandem_proxy_errors",
            "Requests the proxy answered itself, by destination service and reason",
            None,
            MetricType::Counter,
        )?;
        for (service, sums) in &snapshot.services {
            for kind in ProxyErrorKind::ALL {
                let n = sums.errors[kind as usize];
                if n > 0 {
                    let [d, ns, s] = service.labels();
                    let labels = [d, ns, s, ("reason", kind.as_str())];
                    ConstCounter::new(n).encode(errors.encode_family(&labels)?)?;
                }
            }
        }

        let mut endpoints = encoder.encode_descriptor(
            "tandem_proxy_endpoints",
            "Endpoints known, by health (ejected: by this proxy's outlier detection)",
            None,
            MetricType::Gauge,
        )?;
        for (service, sums) in &snapshot.services {
            let Some(counts) = sums.endpoints else {
                continue;
            };
            for (health, n) in HEALTHS.iter().zip(counts) {
                let [d, ns, s] = service.labels();
                let labels = [d, ns, s, ("health", *health)];
                ConstGauge::new(n as i64).encode(endpoints.encode_family(&labels)?)?;
            }
        }

        let mut expected = encoder.encode_descriptor(
            "tandem_proxy_expected_cross_zone_share",
            "The share of requests the balancer expects to send outside the proxy's zone (what `tandem simulate` predicts)",
            None,
            MetricType::Gauge,
        )?;
        for (service, sums) in &snapshot.services {
            if let Some(share) = sums.expected_cross_zone {
                ConstGauge::new(share).encode(expected.encode_family(&service.labels())?)?;
            }
        }

        let zone_labels = |(service, dst_zone, tier): &ZoneKey| {
            [
                ("dst_namespace", service.namespace.clone()),
                ("dst_service", service.name.clone()),
                ("src_zone", src_zone.clone()),
                (
                    "dst_zone",
                    if dst_zone.is_empty() {
                        "unknown".to_string()
                    } else {
                        dst_zone.clone()
                    },
                ),
                ("tier", tier.to_string()),
            ]
        };
        let mut zone_requests = encoder.encode_descriptor(
            "tandem_proxy_zone_requests",
            "Outbound requests by source zone (this proxy's), destination zone (the endpoint's) and locality tier",
            None,
            MetricType::Counter,
        )?;
        for (key, sums) in &snapshot.zones {
            ConstCounter::new(sums.requests)
                .encode(zone_requests.encode_family(&zone_labels(key))?)?;
        }
        let mut zone_bytes = encoder.encode_descriptor(
            "tandem_proxy_zone_bytes",
            "Bytes to and from endpoints (on the wire, TLS included) by source zone, destination zone, locality tier and flow (sent, received)",
            None,
            MetricType::Counter,
        )?;
        for (key, sums) in &snapshot.zones {
            for (flow, n) in [("sent", sums.sent), ("received", sums.received)] {
                let [a, b, c, d, e] = zone_labels(key);
                let labels = [a, b, c, d, e, ("flow", flow.to_string())];
                ConstCounter::new(n).encode(zone_bytes.encode_family(&labels)?)?;
            }
        }

        if self.per_endpoint {
            encode_per_endpoint(&mut encoder, &snapshot)?;
        }
        Ok(())
    }
}

/// The series of `--metrics-per-endpoint`.
fn encode_per_endpoint(
    encoder: &mut DescriptorEncoder<'_>,
    snapshot: &Snapshot,
) -> Result<(), std::fmt::Error> {
    let rows: Vec<(&Service, String, &Arc<BackendSet>, usize)> = snapshot
        .endpoints
        .iter()
        .map(|(service, set, i)| (service, set.backends[*i].meta.address.to_string(), set, *i))
        .collect();
    let mut requests = encoder.encode_descriptor(
        "tandem_proxy_endpoint_requests",
        "Responses by endpoint and status code",
        None,
        MetricType::Counter,
    )?;
    for (service, address, set, i) in &rows {
        for (status, n) in set.backends[*i].state.stats.responses.snapshot() {
            let [d, ns, s] = service.labels();
            let labels = [
                d,
                ns,
                s,
                ("endpoint", address.as_str()),
                ("status_code", status.as_str()),
            ];
            ConstCounter::new(n).encode(requests.encode_family(&labels)?)?;
        }
    }
    let mut failures = encoder.encode_descriptor(
        "tandem_proxy_endpoint_failures",
        "Attempts that got no response, by endpoint",
        None,
        MetricType::Counter,
    )?;
    for (service, address, set, i) in &rows {
        let [d, ns, s] = service.labels();
        let labels = [d, ns, s, ("endpoint", address.as_str())];
        ConstCounter::new(set.backends[*i].state.stats.failures.load(Relaxed))
            .encode(failures.encode_family(&labels)?)?;
    }
    let mut latency = encoder.encode_descriptor(
        "tandem_proxy_endpoint_response_latency_seconds",
        "Time to response headers, by endpoint",
        None,
        MetricType::Histogram,
    )?;
    for (service, address, set, i) in &rows {
        let [d, ns, s] = service.labels();
        let labels = [d, ns, s, ("endpoint", address.as_str())];
        let mut sums = LatencySums::default();
        set.backends[*i].state.stats.latency.add_to(&mut sums);
        sums.encode(&mut latency.encode_family(&labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_give_the_service_and_its_namespace() {
        assert_eq!(
            service_of("web.shop.svc.cluster.local:80"),
            ("shop".to_string(), "web".to_string())
        );
        assert_eq!(service_of("static"), (String::new(), "static".to_string()));
        assert_eq!(service_of("web:80"), (String::new(), "web".to_string()));
    }
}
