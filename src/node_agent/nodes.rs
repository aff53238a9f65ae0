//! The Nodes the agent stands in for: `--nodes node-a=region-1/zone-a,...`, registered
//! (created or updated) with topology labels, a Ready condition and an InternalIP.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;
use std::str::FromStr;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Three zones in two regions.
pub const DEFAULT_NODES: &str =
    "node-a=region-1/zone-a,node-b=region-1/zone-b,node-c=region-2/zone-c";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub name: String,
    pub region: String,
    pub zone: String,
}

impl NodeSpec {
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (REGION_LABEL.to_string(), self.region.clone()),
            (ZONE_LABEL.to_string(), self.zone.clone()),
            (HOSTNAME_LABEL.to_string(), self.name.clone()),
        ])
    }
}

/// `--nodes`: `NAME=REGION/ZONE`, comma-separated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeList(pub Vec<NodeSpec>);

impl FromStr for NodeList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut nodes = Vec::new();
        let mut names = HashSet::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = || {
                format!("--nodes: {item:?} is not NAME=REGION/ZONE (e.g. node-a=region-1/zone-a)")
            };
            let (name, topology) = item.split_once('=').ok_or_else(bad)?;
            let (region, zone) = topology.split_once('/').ok_or_else(bad)?;
            for (what, value) in [("node name", name), ("region", region), ("zone", zone)] {
                if !is_label_value(value) || value.is_empty() {
                    return Err(format!(
                        "--nodes: {what} {value:?} in {item:?} must be 1-63 characters of a-z, 0-9, '-', '.', '_'"
                    ));
                }
            }
            if name.bytes().any(|b| b.is_ascii_uppercase() || b == b'_') {
                return Err(format!(
                    "--nodes: node name {name:?} must be lower case letters, digits, '-' and '.'"
                ));
            }
            if !names.insert(name.to_string()) {
                return Err(format!("--nodes: node {name:?} is listed twice"));
            }
            nodes.push(NodeSpec {
                name: name.to_string(),
                region: region.to_string(),
                zone: zone.to_string(),
            });
        }
        if nodes.is_empty() {
            return Err("--nodes: at least one node is needed".to_string());
        }
        Ok(Self(nodes))
    }
}

fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && v.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && v.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

/// Taints an API server puts on a new Node until a kubelet reports it ready
/// (TaintNodesByCondition); the node-lifecycle controller that would lift them does
/// not run without kubelets, so the agent lifts them itself.
const CONDITION_TAINTS: &[&str] = &[
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/unreachable",
];

/// Creates or updates one Node: labels, no condition taints, a Ready status.
pub async fn register(client: &Client, node: &NodeSpec, address: Ipv4Addr) -> kube::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let existing = match api.get_opt(&node.name).await? {
        Some(existing) => {
            let patch = json!({"metadata": {"labels": node.labels()}});
            api.patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            existing
        }
        None => {
            let new = Node {
                metadata: kube::api::ObjectMeta {
                    name: Some(node.name.clone()),
                    labels: Some(node.labels()),
                    ..Default::default()
                },
                ..Default::default()
            };
            match api.create(&PostParams::default(), &new).await {
                Ok(created) => created,
                // Created meanwhile (another agent, a retry): update it instead.
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let patch = json!({"metadata": {"labels": node.labels()}});
                    api.patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?
                }
                Err(e) => return Err(e),
            }
        }
    };
    let taints = existing
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let kept: Vec<_> = taints
        .iter()
        .filter(|t| !CONDITION_TAINTS.contains(&t.key.as_str()))
        .cloned()
        .collect();
    if kept.len() != taints.len() {
        let patch = json!({"spec": {"taints": kept}});
        api.patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    let now = super::status::now();
    let resources =
        json!({"cpu": "8", "memory": "32Gi", "pods": "250", "ephemeral-storage": "100Gi"});
    let status = json!({"status": {
        "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "tandem node-agent is posting ready status",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
        }],
        "addresses": [
            {"type": "InternalIP", "address": address.to_string()},
            {"type": "Hostname", "address": node.name},
        ],
        "capacity": resources,
        "allocatable": resources,
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|v| v.trim().to_string())
                .unwrap_or_default(),
            "osImage": "tandem node-agent",
            "containerRuntimeVersion": "tandem-node-agent://0.1",
            "kubeletVersion": "tandem-node-agent", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": go_arch(),
        },
    }});
    api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_default() {
        let nodes: NodeList = DEFAULT_NODES.parse().unwrap();
        assert_eq!(nodes.0.len(), 3);
        assert_eq!(
            nodes.0[2],
            NodeSpec {
                name: "node-c".into(),
                region: "region-2".into(),
                zone: "zone-c".into()
            }
        );
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in [
            "",
            "node-a",
            "node-a=zone",
            "a=r/z,a=r/z2",
            "Node=r/z",
            "n=r/z z",
        ] {
            assert!(bad.parse::<NodeList>().is_err(), "{bad:?} parsed");
        }
    }
}
