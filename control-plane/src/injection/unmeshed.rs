//! `tandem_control_plane_unmeshed_pods`: pods in namespaces labelled
//! `tandem.io/inject: enabled` that the mutation would still inject (or that carry
//! an invalid annotation), that is, pods created while the webhook was down
//! (`failurePolicy: Ignore`) or that could not be meshed. Counted by a periodic list
//! of those namespaces' running and pending pods: the discovery watch keeps only what
//! discovery needs of a pod.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::ListParams;
use kube::{Api, Client};

use super::mutate::{self, Context, Outcome, Skipped};
use super::{INBOUND_POLICY, INJECT, InjectConfig};
use crate::metrics::Metrics;

/// Whether this pod, in an enabled namespace (with this `tandem.io/inbound-policy`
/// annotation), should be meshed and is not.
pub fn is_unmeshed(
    pod: &serde_json::Value,
    namespace_inbound_policy: Option<&str>,
    config: &InjectConfig,
) -> bool {
    let context = Context {
        namespace_enabled: true,
        namespace_inbound_policy,
        config,
    };
    matches!(
        mutate::inject(pod, context),
        Outcome::Inject(_) | Outcome::Skip(Skipped::Invalid(_))
    )
}

/// Counts them once.
pub async fn count(client: &Client, config: &InjectConfig) -> Result<i64, kube::Error> {
    let namespaces = Api::<Namespace>::all(client.clone())
        .list_metadata(&ListParams::default().labels(&format!("{INJECT}=enabled")))
        .await?;
    let live = ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed");
    let mut unmeshed = 0;
    for ns in namespaces.items {
        let policy = ns
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(INBOUND_POLICY))
            .cloned();
        let Some(name) = ns.metadata.name else {
            continue;
        };
        let pods = Api::<Pod>::namespaced(client.clone(), &name)
            .list(&live)
            .await?;
        for pod in pods.items {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let value = serde_json::to_value(&pod).unwrap_or_default();
            if is_unmeshed(&value, policy.as_deref(), config) {
                unmeshed += 1;
            }
        }
    }
    Ok(unmeshed)
}

/// Keeps the gauge current, every `every`.
pub async fn run(
    client: Client,
    config: Arc<InjectConfig>,
    metrics: Arc<Metrics>,
    every: Duration,
) {
    let mut said: Option<String> = None;
    loop {
        match count(&client, &config).await {
            Ok(n) => {
                if metrics.unmeshed_pods.get() != n && n > 0 {
                    tracing::info!(
                        pods = n,
                        "pods in injection-enabled namespaces are not meshed (tandem_control_plane_unmeshed_pods)"
                    );
                }
                metrics.unmeshed_pods.set(n);
                said = None;
            }
            Err(e) => {
                let e = e.to_string();
                if said.as_deref() != Some(e.as_str()) {
                    tracing::warn!(
                        "cannot count the unmeshed pods: {e}; trying again every {every:?}"
                    );
                    said = Some(e);
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn what_counts_as_unmeshed() {
        let config = InjectConfig::default();
        let plain = json!({"metadata": {"name": "a"}, "spec": {"containers": [{"name": "a"}]}});
        assert!(is_unmeshed(&plain, None, &config));
        let mut opted_out = plain.clone();
        opted_out["metadata"]["annotations"] = json!({INJECT: "disabled"});
        assert!(!is_unmeshed(&opted_out, None, &config));
        let mut bad = plain.clone();
        bad["metadata"]["annotations"] = json!({"tandem.io/skip-inbound-ports": "x"});
        assert!(is_unmeshed(&bad, None, &config));
        let mut injected = plain.clone();
        injected["spec"]["initContainers"] = json!([{"name": "tandem-proxy"}]);
        assert!(!is_unmeshed(&injected, None, &config));
        let mut host = plain;
        host["spec"]["hostNetwork"] = json!(true);
        assert!(!is_unmeshed(&host, None, &config));
    }
}
