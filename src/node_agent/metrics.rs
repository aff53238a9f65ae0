//! The node agent's Prometheus metrics (`tandem_node_agent_*` on its admin port).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub bindings: Family<ResultLabel, Counter>,
    pub status_writes: Family<ResultLabel, Counter>,
    pub deletions: Family<ResultLabel, Counter>,
    /// Pods on the agent's nodes.
    pub pods: Gauge,
    /// Pods whose processes the agent runs.
    pub running_pods: Gauge,
    pub processes: Gauge,
    pub pod_addresses: Gauge,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tandem_node_agent");
        r.register(
            "bindings",
            "Pods bound to a node, by result",
            self.bindings.clone(),
        );
        r.register(
            "status_writes",
            "Pod status writes, by result",
            self.status_writes.clone(),
        );
        r.register(
            "deletions",
            "Pods deleted after their grace period, by result",
            self.deletions.clone(),
        );
        r.register("pods", "Pods on the agent's nodes", self.pods.clone());
        r.register(
            "running_pods",
            "Pods whose containers the agent runs as processes",
            self.running_pods.clone(),
        );
        r.register(
            "processes",
            "Container processes running",
            self.processes.clone(),
        );
        r.register(
            "pod_addresses",
            "Pod addresses in use",
            self.pod_addresses.clone(),
        );
    }
}
