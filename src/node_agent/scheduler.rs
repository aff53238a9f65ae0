//! Where a pending pod goes, as a scheduler would decide it for this small world:
//! nodes that match its `nodeSelector`, then the zone with the fewest pods of the
//! same group (same controller, else same namespace and labels), then the fewest
//! pods in all, then by name; the node in that zone likewise.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

use super::nodes::NodeSpec;

/// Pods that count on a node: `(node, group)` for each.
pub struct Placement<'a> {
    pub node: &'a str,
    pub group: &'a str,
}

/// The pod's spreading group: its controller's UID, else namespace and labels.
pub fn group_of(pod: &Pod) -> String {
    let meta = &pod.metadata;
    if let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    {
        return owner.uid.clone();
    }
    let labels: Vec<String> = meta
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or(""),
        labels.join(",")
    )
}

/// Whether this pod is one for a scheduler (ours) to place.
pub fn wants_scheduling(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let unbound = spec
        .and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty);
    let ours = spec
        .and_then(|s| s.scheduler_name.as_deref())
        .is_none_or(|s| s.is_empty() || s == "default-scheduler");
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    unbound
        && ours
        && pod.metadata.deletion_timestamp.is_none()
        && !matches!(phase, Some("Succeeded" | "Failed"))
}

/// Nodes whose labels satisfy the pod's `nodeSelector`.
pub fn eligible<'n>(pod: &Pod, nodes: &'n [NodeSpec]) -> Vec<&'n NodeSpec> {
    let selector = pod.spec.as_ref().and_then(|s| s.node_selector.as_ref());
    nodes
        .iter()
        .filter(|node| {
            let labels = node.labels();
            selector
                .into_iter()
                .flatten()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .collect()
}

/// The node for a pod of `group`, given where the other pods are.
pub fn choose<'n>(
    candidates: &[&'n NodeSpec],
    group: &str,
    placed: &[Placement<'_>],
) -> Option<&'n NodeSpec> {
    #[derive(Default, Clone, Copy)]
    struct Count {
        same: usize,
        all: usize,
    }
    let mut per_node: BTreeMap<&str, Count> = BTreeMap::new();
    for p in placed {
        let c = per_node.entry(p.node).or_default();
        c.all += 1;
        if p.group == group {
            c.same += 1;
        }
    }
    let mut per_zone: BTreeMap<&str, Count> = BTreeMap::new();
    for node in candidates {
        let n = per_node
            .get(node.name.as_str())
            .copied()
            .unwrap_or_default();
        let z = per_zone.entry(node.zone.as_str()).or_default();
        z.same += n.same;
        z.all += n.all;
    }
    let zone = per_zone
        .iter()
        .min_by_key(|(name, c)| (c.same, c.all, **name))
        .map(|(name, _)| *name)?;
    candidates
        .iter()
        .filter(|n| n.zone == zone)
        .min_by_key(|n| {
            let c = per_node.get(n.name.as_str()).copied().unwrap_or_default();
            (c.same, c.all, n.name.as_str())
        })
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_agent::nodes::NodeList;

    fn nodes() -> Vec<NodeSpec> {
        "a1=r1/za,a2=r1/za,b=r1/zb,c=r2/zc"
            .parse::<NodeList>()
            .unwrap()
            .0
    }

    #[test]
    fn spreads_a_group_over_zones_first() {
        let nodes = nodes();
        let candidates: Vec<&NodeSpec> = nodes.iter().collect();
        let mut placed: Vec<(String, String)> = Vec::new();
        let mut zones = Vec::new();
        for _ in 0..3 {
            let p: Vec<Placement<'_>> = placed
                .iter()
                .map(|(n, g)| Placement { node: n, group: g })
                .collect();
            let node = choose(&candidates, "rs1", &p).unwrap();
            zones.push(node.zone.clone());
            placed.push((node.name.clone(), "rs1".into()));
        }
        zones.sort();
        assert_eq!(zones, ["za", "zb", "zc"]);
    }

    #[test]
    fn other_groups_do_not_crowd_a_group_into_one_zone() {
        let nodes = nodes();
        let candidates: Vec<&NodeSpec> = nodes.iter().collect();
        // Another group fills zb and zc; ours still goes to its emptiest zones.
        let placed = [
            Placement {
                node: "b",
                group: "other",
            },
            Placement {
                node: "c",
                group: "other",
            },
            Placement {
                node: "a1",
                group: "mine",
            },
        ];
        let node = choose(&candidates, "mine", &placed).unwrap();
        assert_eq!(
            node.name, "b",
            "fewest of its group first, then fewest overall, then name"
        );
        let placed = [Placement {
            node: "a1",
            group: "mine",
        }];
        assert_eq!(choose(&candidates, "mine", &placed).unwrap().name, "b");
        // Within a zone: the node with fewer pods.
        let placed = [
            Placement {
                node: "a1",
                group: "x",
            },
            Placement {
                node: "b",
                group: "x",
            },
            Placement {
                node: "c",
                group: "x",
            },
        ];
        assert_eq!(choose(&candidates, "y", &placed).unwrap().name, "a2");
    }

    #[test]
    fn node_selector_limits_the_candidates() {
        let nodes = nodes();
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [], "nodeSelector": {"topology.kubernetes.io/zone": "zc"}}
        }))
        .unwrap();
        let names: Vec<_> = eligible(&pod, &nodes)
            .iter()
            .map(|n| n.name.clone())
            .collect();
        assert_eq!(names, ["c"]);
    }
}
