//! Kubernetes Events about pods (`kubectl describe pod` shows them), as a kubelet or a
//! scheduler writes them: one per distinct (pod, reason, message), written in the
//! background.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

pub const COMPONENT: &str = "tandem-node-agent";

#[derive(Clone)]
pub struct Events {
    client: Client,
    seen: Arc<Mutex<HashSet<(String, String, String)>>>,
}

impl Events {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            seen: Arc::default(),
        }
    }

    pub fn warn(&self, pod: &Pod, host: Option<&str>, reason: &str, message: &str) {
        self.record(pod, host, "Warning", reason, message);
    }

    pub fn normal(&self, pod: &Pod, host: Option<&str>, reason: &str, message: &str) {
        self.record(pod, host, "Normal", reason, message);
    }

    fn record(&self, pod: &Pod, host: Option<&str>, kind: &str, reason: &str, message: &str) {
        let meta = &pod.metadata;
        let uid = meta.uid.clone().unwrap_or_default();
        let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
        let name = meta.name.clone().unwrap_or_default();
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() > 10_000 {
                seen.clear();
            }
            if !seen.insert((uid.clone(), reason.to_string(), message.to_string())) {
                return;
            }
        }
        if kind == "Warning" {
            tracing::warn!(pod = %format!("{ns}/{name}"), reason, message);
        } else {
            tracing::debug!(pod = %format!("{ns}/{name}"), reason, message);
        }
        let now = super::status::now();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let event = json!({
            "metadata": {"name": format!("{name}.{nanos:x}"), "namespace": ns},
            "involvedObject": {
                "apiVersion": "v1", "kind": "Pod",
                "namespace": ns, "name": name, "uid": uid,
            },
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": COMPONENT, "host": host},
            "reportingComponent": COMPONENT,
            "reportingInstance": host.unwrap_or(COMPONENT),
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        let Ok(event) = serde_json::from_value::<Event>(event) else {
            return;
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        tokio::spawn(async move {
            if let Err(error) = api.create(&PostParams::default(), &event).await {
                tracing::debug!(%error, "cannot record an event");
            }
        });
    }
}
