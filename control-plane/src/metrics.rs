//! The control plane's Prometheus metrics (`tandem_control_plane_*` on its admin port).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    pub services: Gauge,
    pub endpoints: Gauge,
    pub publishes: Counter,
    pub connected_proxies: Gauge,
    pub watch_streams: Gauge,
    /// Time from a change seen by the source to the update written to a proxy's stream.
    pub push_latency: Histogram,
    pub source_reloads: Family<ResultLabel, Counter>,
    pub watch_events: Family<KindLabel, Counter>,
    pub source_errors: Family<KindLabel, Counter>,
    /// Watches that had to list again (410 Gone), by kind of object.
    pub relists: Family<KindLabel, Counter>,
    /// 1 while the source (file, API server) is reachable and its last read was good.
    pub source_up: Gauge,
    /// Admission reviews answered, by result (injected, skipped, unmeshed, error).
    pub webhook_calls: Family<ResultLabel, Counter>,
    /// Pods in injection-enabled namespaces that should be meshed and are not.
    pub unmeshed_pods: Gauge,
    /// Workload certificates signed by Certify.
    pub certificates_issued: Counter,
    /// Certify calls refused, by reason (identity::refusal::Reason).
    pub certificate_refusals: Family<ReasonLabel, Counter>,
    /// Time to sign a workload certificate (the checks and the TokenReview apart).
    pub certificate_signing: Histogram,
    /// When the issuer being served ends (Unix seconds; 0: none yet).
    pub issuer_not_after: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            services: Gauge::default(),
            endpoints: Gauge::default(),
            publishes: Counter::default(),
            connected_proxies: Gauge::default(),
            watch_streams: Gauge::default(),
            push_latency: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            source_reloads: Family::default(),
            watch_events: Family::default(),
            source_errors: Family::default(),
            relists: Family::default(),
            source_up: Gauge::default(),
            webhook_calls: Family::default(),
            unmeshed_pods: Gauge::default(),
            certificates_issued: Counter::default(),
            certificate_refusals: Family::default(),
            certificate_signing: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
            ]),
            issuer_not_after: Gauge::default(),
        }
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tandem_control_plane");
        r.register(
            "services",
            "Service ports in the index",
            self.services.clone(),
        );
        r.register(
            "endpoints",
            "Endpoints across all service ports",
            self.endpoints.clone(),
        );
        r.register(
            "publishes",
            "Versions published to subscribers",
            self.publishes.clone(),
        );
        r.register(
            "connected_proxies",
            "Proxies with at least one open discovery stream",
            self.connected_proxies.clone(),
        );
        r.register(
            "watch_streams",
            "Open discovery streams",
            self.watch_streams.clone(),
        );
        r.register(
            "push_latency_seconds",
            "Time from a change seen by the source to the update sent to a proxy",
            self.push_latency.clone(),
        );
        r.register(
            "source_reloads",
            "Reloads of the file source by result",
            self.source_reloads.clone(),
        );
        r.register(
            "watch_events",
            "Events received from the source by object kind",
            self.watch_events.clone(),
        );
        r.register(
            "source_errors",
            "Errors reading the source (API server unreachable, malformed file) by kind",
            self.source_errors.clone(),
        );
        r.register(
            "relists",
            "Watches that listed again because the API server no longer had their history (410 Gone)",
            self.relists.clone(),
        );
        r.register(
            "source_up",
            "1 when the source is reachable and its last read was good",
            self.source_up.clone(),
        );
        r.register(
            "webhook_calls",
            "Admission reviews answered by the injection webhook, by result",
            self.webhook_calls.clone(),
        );
        r.register(
            "unmeshed_pods",
            "Pods in injection-enabled namespaces without the proxy (created while the webhook was down, or with an invalid annotation)",
            self.unmeshed_pods.clone(),
        );
        r.register(
            "certificates_issued",
            "Workload certificates issued by the identity service",
            self.certificates_issued.clone(),
        );
        r.register(
            "certificate_refusals",
            "Certificate requests refused by the identity service, by reason (token_invalid, wrong_audience, identity_mismatch, bad_csr, bad_identity, api_unavailable, no_issuer, internal)",
            self.certificate_refusals.clone(),
        );
        r.register(
            "certificate_signing_seconds",
            "Time to sign a workload certificate (its checks and the TokenReview apart)",
            self.certificate_signing.clone(),
        );
        r.register(
            "identity_issuer_expiry_timestamp_seconds",
            "When the identity issuer's certificate ends (Unix time; 0 while there is none)",
            self.issuer_not_after.clone(),
        );
    }
}
