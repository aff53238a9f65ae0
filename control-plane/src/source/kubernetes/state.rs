//! What the control plane knows of the cluster, and which endpoints change when an
//! object changes. Pure: plain structs in, endpoint changes out; no API calls.
//!
//! The rules are kube-proxy's and istiod's: EndpointSlices are keyed by the
//! `kubernetes.io/service-name` label; a Service port maps to each slice's port of the
//! same name (slices may have different target ports); endpoints are deduplicated by
//! address across slices, so an endpoint moving between slices, or in two slices for a
//! moment, does not flap; conditions map to health (`ready` → HEALTHY,
//! `serving` + `terminating` → DRAINING, otherwise UNHEALTHY, with nil `ready`/`serving`
//! meaning true and nil `terminating` false); the zone comes from the slice (or the
//! node), the region from the node; the weight from the pod's `tandem.io/weight`.
//!
//! Work is proportional to what changed: a slice update touches only that slice's
//! addresses; a node or pod update only the endpoints that reference it (reverse
//! indexes). Only a change of a Service's ports re-derives the whole service.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::identity::name::WorkloadId;
use crate::model::{Endpoint, EndpointChanges, Health, Locality, Policy, Protocol, ServiceKey};

/// `namespace/name`.
pub type ObjectId = (Arc<str>, Arc<str>);

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceObj {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub ports: Vec<ServicePort>,
    pub cluster_ips: Vec<IpAddr>,
    pub traffic_distribution: String,
    /// From the Service's `tandem.io/*` annotations.
    pub policy: Policy,
}

impl ServiceObj {
    fn meta(&self) -> ServiceMeta {
        ServiceMeta {
            cluster_ips: self.cluster_ips.clone(),
            traffic_distribution: self.traffic_distribution.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// What the index knows of a service port besides its endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceMeta {
    pub cluster_ips: Vec<IpAddr>,
    pub traffic_distribution: String,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SliceObj {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub service: Arc<str>,
    /// Port name → port number in this slice.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SliceEndpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<Arc<str>>,
    pub zone: Option<String>,
    /// The pod behind the endpoint (targetRef of kind Pod).
    pub pod: Option<Arc<str>>,
    pub hostname: Option<String>,
}

impl SliceEndpoint {
    fn health(&self) -> Health {
        if self.ready {
            Health::Healthy
        } else if self.serving && self.terminating {
            Health::Draining
        } else {
            Health::Unhealthy
        }
    }
}

fn health_rank(h: Health) -> u8 {
    match h {
        Health::Healthy => 2,
        Health::Draining => 1,
        Health::Unhealthy => 0,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObj {
    pub name: Arc<str>,
    pub region: String,
    pub zone: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodObj {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub weight: u32,
    /// Its ServiceAccount if the pod is meshed (injected): only a pod with our proxy
    /// can answer mutual TLS, so only such a pod's endpoints carry an identity.
    pub meshed_account: Option<String>,
}

/// A slice's claim on one address of one service port.
#[derive(Debug, Clone)]
struct Contribution {
    slice: Arc<str>,
    facts: SliceEndpoint,
}

/// Where a published endpoint's node and pod came from, to undo reverse-index entries.
#[derive(Debug, Clone)]
struct Derived {
    endpoint: Endpoint,
    node: Option<Arc<str>>,
    pod: Option<ObjectId>,
}

#[derive(Debug, Default)]
struct PortState {
    protocol: Protocol,
    contributions: HashMap<SocketAddr, Vec<Contribution>>,
    published: HashMap<SocketAddr, Derived>,
}

/// Changes to hand to the index at the next flush.
#[derive(Debug, Default)]
pub struct Pending {
    /// Service ports created or whose ClusterIPs, traffic distribution or policy changed.
    pub meta: BTreeMap<ServiceKey, ServiceMeta>,
    pub endpoints: BTreeMap<ServiceKey, EndpointChanges>,
    pub removed: Vec<ServiceKey>,
    /// The node → locality map changed.
    pub nodes_changed: bool,
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
            && self.endpoints.is_empty()
            && self.removed.is_empty()
            && !self.nodes_changed
    }
}

#[derive(Debug, Default)]
pub struct ClusterState {
    /// The domain of endpoints' identities (spiffe://DOMAIN/ns/NS/sa/SA).
    trust_domain: String,
    services: HashMap<ObjectId, ServiceObj>,
    /// Slices by the service they belong to, then by slice name.
    slices: HashMap<ObjectId, HashMap<Arc<str>, SliceObj>>,
    nodes: HashMap<Arc<str>, NodeObj>,
    pods: HashMap<ObjectId, PodObj>,
    ports: HashMap<ServiceKey, PortState>,
    by_node: HashMap<Arc<str>, HashSet<(ServiceKey, SocketAddr)>>,
    by_pod: HashMap<ObjectId, HashSet<(ServiceKey, SocketAddr)>>,
    pending: Pending,
}

fn id(ns: &Arc<str>, name: &Arc<str>) -> ObjectId {
    (ns.clone(), name.clone())
}

impl ClusterState {
    pub fn new(trust_domain: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            ..Default::default()
        }
    }

    /// Takes the changes accumulated since the last call.
    pub fn take_pending(&mut self) -> Pending {
        std::mem::take(&mut self.pending)
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Node name → locality, for proxies' own locality.
    pub fn node_localities(&self) -> BTreeMap<String, Locality> {
        self.nodes
            .values()
            .map(|n| {
                (
                    n.name.to_string(),
                    Locality {
                        region: n.region.clone(),
                        zone: n.zone.clone(),
                        subzone: String::new(),
                    },
                )
            })
            .collect()
    }

    pub fn service_ids(&self) -> Vec<ObjectId> {
        self.services.keys().cloned().collect()
    }
    pub fn slice_ids(&self) -> Vec<(ObjectId, Arc<str>)> {
        self.slices
            .iter()
            .flat_map(|(svc, slices)| slices.keys().map(move |s| (svc.clone(), s.clone())))
            .collect()
    }
    pub fn node_names(&self) -> Vec<Arc<str>> {
        self.nodes.keys().cloned().collect()
    }
    pub fn pod_ids(&self) -> Vec<ObjectId> {
        self.pods.keys().cloned().collect()
    }

    // ----- Services ------------------------------------------------------------------

    pub fn apply_service(&mut self, service: ServiceObj) {
        let sid = id(&service.namespace, &service.name);
        let old = self.services.get(&sid).cloned();
        if old.as_ref() == Some(&service) {
            return;
        }
        let old_ports: Vec<ServicePort> = old.as_ref().map(|s| s.ports.clone()).unwrap_or_default();
        let ports_changed = old_ports != service.ports;
        let meta_changed = old.as_ref().is_none_or(|o| {
            o.cluster_ips != service.cluster_ips
                || o.traffic_distribution != service.traffic_distribution
        });
        self.services.insert(sid.clone(), service.clone());
        if ports_changed {
            for port in &old_ports {
                let key = ServiceKey::new(&service.namespace, &service.name, port.port);
                if !service.ports.iter().any(|p| p.port == port.port) {
                    self.remove_port(&key);
                }
            }
            // Ports are few and rarely change: re-derive the service from its slices.
            for port in &service.ports {
                let key = ServiceKey::new(&service.namespace, &service.name, port.port);
                self.remove_port_state(&key);
                self.pending.meta.insert(key.clone(), service.meta());
                let mut state = PortState {
                    protocol: port.protocol,
                    ..Default::default()
                };
                if let Some(slices) = self.slices.get(&sid) {
                    for slice in slices.values() {
                        for (addr, facts) in contributions(slice, &port.name) {
                            state
                                .contributions
                                .entry(addr)
                                .or_default()
                                .push(Contribution {
                                    slice: slice.name.clone(),
                                    facts,
                                });
                        }
                    }
                }
                let addrs: Vec<SocketAddr> = state.contributions.keys().copied().collect();
                self.ports.insert(key.clone(), state);
                for addr in addrs {
                    self.rederive(&key, addr);
                }
            }
        } else if meta_changed {
            for port in &service.ports {
                let key = ServiceKey::new(&service.namespace, &service.name, port.port);
                self.pending.meta.insert(key, service.meta());
            }
        }
    }

    pub fn delete_service(&mut self, namespace: &Arc<str>, name: &Arc<str>) {
        let Some(service) = self.services.remove(&id(namespace, name)) else {
            return;
        };
        for port in &service.ports {
            self.remove_port(&ServiceKey::new(namespace, name, port.port));
        }
    }

    fn remove_port(&mut self, key: &ServiceKey) {
        self.remove_port_state(key);
        self.pending.meta.remove(key);
        self.pending.endpoints.remove(key);
        self.pending.removed.push(key.clone());
    }

    fn remove_port_state(&mut self, key: &ServiceKey) {
        if let Some(state) = self.ports.remove(key) {
            for (addr, derived) in state.published {
                self.unindex(key, addr, &derived);
            }
        }
    }

    // ----- EndpointSlices ------------------------------------------------------------

    pub fn apply_slice(&mut self, slice: SliceObj) {
        let sid = id(&slice.namespace, &slice.service);
        let old = self
            .slices
            .entry(sid.clone())
            .or_default()
            .insert(slice.name.clone(), slice.clone());
        if old.as_ref() == Some(&slice) {
            return;
        }
        self.slice_changed(&sid, old.as_ref(), Some(&slice));
    }

    pub fn delete_slice(&mut self, namespace: &Arc<str>, service: &Arc<str>, name: &Arc<str>) {
        let sid = id(namespace, service);
        let Some(slices) = self.slices.get_mut(&sid) else {
            return;
        };
        let Some(old) = slices.remove(name) else {
            return;
        };
        if slices.is_empty() {
            self.slices.remove(&sid);
        }
        self.slice_changed(&sid, Some(&old), None);
    }

    /// A slice may move to another service (its label changed): find it by name.
    pub fn service_of_slice(&self, namespace: &str, name: &str) -> Option<Arc<str>> {
        self.slices
            .iter()
            .find(|((ns, _), slices)| &**ns == namespace && slices.contains_key(name))
            .map(|((_, svc), _)| svc.clone())
    }

    fn slice_changed(&mut self, sid: &ObjectId, old: Option<&SliceObj>, new: Option<&SliceObj>) {
        let Some(service) = self.services.get(sid) else {
            // Slices of a Service we have not seen yet are kept for when it arrives.
            return;
        };
        let ports = service.ports.clone();
        let slice_name = old
            .or(new)
            .map(|s| s.name.clone())
            .expect("one side exists");
        for port in ports {
            let key = ServiceKey::new(&sid.0, &sid.1, port.port);
            let before: HashMap<SocketAddr, SliceEndpoint> = old
                .map(|s| contributions(s, &port.name).collect())
                .unwrap_or_default();
            let after: HashMap<SocketAddr, SliceEndpoint> = new
                .map(|s| contributions(s, &port.name).collect())
                .unwrap_or_default();
            let Some(state) = self.ports.get_mut(&key) else {
                continue;
            };
            let mut touched = Vec::new();
            for addr in before.keys() {
                if !after.contains_key(addr) {
                    if let Some(list) = state.contributions.get_mut(addr) {
                        list.retain(|c| c.slice != slice_name);
                        if list.is_empty() {
                            state.contributions.remove(addr);
                        }
                    }
                    touched.push(*addr);
                }
            }
            for (addr, facts) in after {
                if before.get(&addr) == Some(&facts) {
                    continue;
                }
                let list = state.contributions.entry(addr).or_default();
                list.retain(|c| c.slice != slice_name);
                list.push(Contribution {
                    slice: slice_name.clone(),
                    facts,
                });
                touched.push(addr);
            }
            for addr in touched {
                self.rederive(&key, addr);
            }
        }
    }

    // ----- Nodes and Pods ----------------------------------------------------------

    pub fn apply_node(&mut self, node: NodeObj) {
        if self.nodes.get(&node.name) == Some(&node) {
            return;
        }
        let name = node.name.clone();
        self.nodes.insert(name.clone(), node);
        self.pending.nodes_changed = true;
        self.rederive_referencing_node(&name);
    }

    pub fn delete_node(&mut self, name: &Arc<str>) {
        if self.nodes.remove(name).is_some() {
            self.pending.nodes_changed = true;
            self.rederive_referencing_node(name);
        }
    }

    pub fn apply_pod(&mut self, pod: PodObj) {
        let pid = id(&pod.namespace, &pod.name);
        if self.pods.get(&pid) == Some(&pod) {
            return;
        }
        self.pods.insert(pid.clone(), pod);
        self.rederive_referencing_pod(&pid);
    }

    pub fn delete_pod(&mut self, namespace: &Arc<str>, name: &Arc<str>) {
        let pid = id(namespace, name);
        if self.pods.remove(&pid).is_some() {
            self.rederive_referencing_pod(&pid);
        }
    }

    fn rederive_referencing_node(&mut self, node: &Arc<str>) {
        let refs = referencing(&self.by_node, node);
        self.rederive_each(refs);
    }

    fn rederive_referencing_pod(&mut self, pod: &ObjectId) {
        let refs = referencing(&self.by_pod, pod);
        self.rederive_each(refs);
    }

    fn rederive_each(&mut self, refs: Vec<(ServiceKey, SocketAddr)>) {
        for (key, addr) in refs {
            self.rederive(&key, addr);
        }
    }

    // ----- Deriving endpoints --------------------------------------------------------

    /// Recomputes one endpoint of one service port from its contributions and records
    /// the change, if any.
    fn rederive(&mut self, key: &ServiceKey, addr: SocketAddr) {
        let Some(state) = self.ports.get(key) else {
            return;
        };
        let best = state.contributions.get(&addr).and_then(|list| {
            list.iter()
                .max_by_key(|c| health_rank(c.facts.health()))
                .map(|c| c.facts.clone())
        });
        let protocol = state.protocol;
        let derived = best.map(|facts| self.derive(key, addr, &facts, protocol));
        let state = self.ports.get_mut(key).expect("checked above");
        let previous = match &derived {
            Some(d) => state.published.insert(addr, d.clone()),
            None => state.published.remove(&addr),
        };
        if let Some(previous) = &previous {
            self.unindex(key, addr, previous);
        }
        let changes = self.pending.endpoints.entry(key.clone()).or_default();
        match derived {
            Some(derived) => {
                if previous.as_ref().map(|p| &p.endpoint) != Some(&derived.endpoint) {
                    changes.removed.retain(|a| *a != addr);
                    changes.upserted.retain(|e| e.address != addr);
                    changes.upserted.push(derived.endpoint.clone());
                }
                self.index(key, addr, &derived);
            }
            None => {
                if previous.is_some() {
                    changes.upserted.retain(|e| e.address != addr);
                    changes.removed.push(addr);
                }
            }
        }
        if self
            .pending
            .endpoints
            .get(key)
            .is_some_and(|c| c.is_empty())
        {
            self.pending.endpoints.remove(key);
        }
    }

    fn derive(
        &self,
        key: &ServiceKey,
        addr: SocketAddr,
        facts: &SliceEndpoint,
        protocol: Protocol,
    ) -> Derived {
        let node = facts.node.as_ref().and_then(|n| self.nodes.get(n));
        let pod_id = facts
            .pod
            .as_ref()
            .map(|p| (key.namespace.clone(), p.clone()));
        let pod = pod_id.as_ref().and_then(|p| self.pods.get(p));
        let zone = facts
            .zone
            .clone()
            .filter(|z| !z.is_empty())
            .or_else(|| node.map(|n| n.zone.clone()))
            .unwrap_or_default();
        let endpoint = Endpoint {
            address: addr,
            weight: pod.map_or(1, |p| p.weight),
            locality: Locality {
                region: node.map(|n| n.region.clone()).unwrap_or_default(),
                zone,
                subzone: String::new(),
            },
            health: facts.health(),
            identity: pod
                .and_then(|p| {
                    let account = p.meshed_account.clone()?;
                    Some(
                        WorkloadId {
                            trust_domain: self.trust_domain.clone(),
                            namespace: p.namespace.to_string(),
                            service_account: account,
                        }
                        .to_string(),
                    )
                })
                .unwrap_or_default(),
            protocol,
            name: facts
                .pod
                .as_deref()
                .or(facts.hostname.as_deref())
                .unwrap_or_default()
                .to_string(),
        };
        Derived {
            endpoint,
            node: facts.node.clone(),
            pod: pod_id,
        }
    }

    fn index(&mut self, key: &ServiceKey, addr: SocketAddr, derived: &Derived) {
        if let Some(node) = &derived.node {
            self.by_node
                .entry(node.clone())
                .or_default()
                .insert((key.clone(), addr));
        }
        if let Some(pod) = &derived.pod {
            self.by_pod
                .entry(pod.clone())
                .or_default()
                .insert((key.clone(), addr));
        }
    }

    fn unindex(&mut self, key: &ServiceKey, addr: SocketAddr, derived: &Derived) {
        let entry = (key.clone(), addr);
        if let Some(node) = &derived.node
            && let Some(set) = self.by_node.get_mut(node)
        {
            set.remove(&entry);
            if set.is_empty() {
                self.by_node.remove(node);
            }
        }
        if let Some(pod) = &derived.pod
            && let Some(set) = self.by_pod.get_mut(pod)
        {
            set.remove(&entry);
            if set.is_empty() {
                self.by_pod.remove(pod);
            }
        }
    }
}

/// The endpoints a reverse index says are shaped by `key` (a node or a pod).
fn referencing<K: std::hash::Hash + Eq>(
    index: &HashMap<K, HashSet<(ServiceKey, SocketAddr)>>,
    key: &K,
) -> Vec<(ServiceKey, SocketAddr)> {
    index.get(key).into_iter().flatten().cloned().collect()
}

/// The addresses a slice offers for the service port named `port_name`.
fn contributions<'a>(
    slice: &'a SliceObj,
    port_name: &'a str,
) -> impl Iterator<Item = (SocketAddr, SliceEndpoint)> + 'a {
    let port = slice
        .ports
        .iter()
        .find(|(name, _)| name == port_name)
        .map(|(_, port)| *port);
    slice.endpoints.iter().filter_map(move |e| {
        let port = port?;
        Some((SocketAddr::new(e.address, port), e.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Arc<str> {
        v.into()
    }

    fn service(ports: &[(&str, u16)]) -> ServiceObj {
        ServiceObj {
            namespace: s("default"),
            name: s("web"),
            ports: ports
                .iter()
                .map(|(name, port)| ServicePort {
                    name: name.to_string(),
                    port: *port,
                    protocol: Protocol::Unspecified,
                })
                .collect(),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            traffic_distribution: String::new(),
            policy: Policy::default(),
        }
    }

    fn ep(ip: &str, node: &str, pod: &str) -> SliceEndpoint {
        SliceEndpoint {
            address: ip.parse().unwrap(),
            ready: true,
            serving: true,
            terminating: false,
            node: Some(s(node)),
            zone: None,
            pod: Some(s(pod)),
            hostname: None,
        }
    }

    fn slice(name: &str, port: u16, endpoints: Vec<SliceEndpoint>) -> SliceObj {
        SliceObj {
            namespace: s("default"),
            name: s(name),
            service: s("web"),
            ports: vec![("http".to_string(), port)],
            endpoints,
        }
    }

    fn key() -> ServiceKey {
        ServiceKey::new("default", "web", 80)
    }

    fn upserted(p: &Pending) -> Vec<String> {
        let mut v: Vec<String> = p
            .endpoints
            .get(&key())
            .map(|c| c.upserted.iter().map(|e| e.address.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn slices_merge_and_map_named_ports() {
        let mut st = ClusterState::new("cluster.local");
        st.apply_slice(slice("web-a", 8080, vec![ep("10.0.0.1", "n1", "p1")]));
        assert!(!st.has_pending(), "no Service yet: kept for later");
        st.apply_service(service(&[("http", 80)]));
        let p = st.take_pending();
        assert!(p.meta.contains_key(&key()));
        assert_eq!(upserted(&p), vec!["10.0.0.1:8080"]);
        // A second slice with a different target port.
        st.apply_slice(slice("web-b", 9090, vec![ep("10.0.0.2", "n2", "p2")]));
        assert_eq!(upserted(&st.take_pending()), vec!["10.0.0.2:9090"]);
    }

    #[test]
    fn an_endpoint_in_two_slices_does_not_flap() {
        let mut st = ClusterState::new("cluster.local");
        st.apply_service(service(&[("http", 80)]));
        st.apply_slice(slice("web-a", 8080, vec![ep("10.0.0.1", "n1", "p1")]));
        st.take_pending();
        // It appears in a second slice, then leaves the first: no change at all.
        st.apply_slice(slice("web-b", 8080, vec![ep("10.0.0.1", "n1", "p1")]));
        st.apply_slice(slice("web-a", 8080, vec![]));
        assert!(!st.has_pending(), "{:?}", st.take_pending());
        // Leaving the last slice removes it.
        st.delete_slice(&s("default"), &s("web"), &s("web-b"));
        let p = st.take_pending();
        assert_eq!(
            p.endpoints[&key()].removed,
            vec!["10.0.0.1:8080".parse().unwrap()]
        );
    }

    #[test]
    fn conditions_map_to_health() {
        let mut st = ClusterState::new("cluster.local");
        st.apply_service(service(&[("http", 80)]));
        let mut terminating = ep("10.0.0.1", "n1", "p1");
        terminating.ready = false;
        terminating.terminating = true;
        let mut unready = ep("10.0.0.2", "n1", "p2");
        unready.ready = false;
        unready.serving = false;
        st.apply_slice(slice(
            "web-a",
            8080,
            vec![terminating, unready, ep("10.0.0.3", "n1", "p3")],
        ));
        let p = st.take_pending();
        let health: BTreeMap<String, Health> = p.endpoints[&key()]
            .upserted
            .iter()
            .map(|e| (e.address.to_string(), e.health))
            .collect();
        assert_eq!(health["10.0.0.1:8080"], Health::Draining);
        assert_eq!(
            health["10.0.0.2:8080"],
            Health::Unhealthy,
            "sent, not dropped"
        );
        assert_eq!(health["10.0.0.3:8080"], Health::Healthy);
    }

    #[test]
    fn nodes_and_pods_fill_in_locality_weight_and_identity() {
        let mut st = ClusterState::new("cluster.local");
        st.apply_service(service(&[("http", 80)]));
        st.apply_slice(slice("web-a", 8080, vec![ep("10.0.0.1", "n1", "p1")]));
        let first = &st.take_pending().endpoints[&key()].upserted[0];
        assert_eq!(first.weight, 1);
        assert_eq!(first.locality.region, "");
        st.apply_node(NodeObj {
            name: s("n1"),
            region: "eu-1".into(),
            zone: "eu-1a".into(),
        });
        st.apply_pod(PodObj {
            namespace: s("default"),
            name: s("p1"),
            weight: 5,
            meshed_account: Some("web".into()),
        });
        let p = st.take_pending();
        assert!(p.nodes_changed);
        let e = p.endpoints[&key()].upserted.last().unwrap();
        assert_eq!(
            (e.locality.region.as_str(), e.locality.zone.as_str()),
            ("eu-1", "eu-1a")
        );
        assert_eq!(e.weight, 5);
        assert_eq!(e.identity, "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(e.name, "p1");
        // Unchanged re-applies (a relist) change nothing.
        st.apply_node(NodeObj {
            name: s("n1"),
            region: "eu-1".into(),
            zone: "eu-1a".into(),
        });
        assert!(!st.has_pending());
    }

    #[test]
    fn service_port_changes_and_deletion() {
        let mut st = ClusterState::new("cluster.local");
        st.apply_service(service(&[("http", 80)]));
        st.apply_slice(slice("web-a", 8080, vec![ep("10.0.0.1", "n1", "p1")]));
        st.take_pending();
        st.apply_service(service(&[("http", 8000)]));
        let p = st.take_pending();
        assert_eq!(p.removed, vec![key()]);
        let new_key = ServiceKey::new("default", "web", 8000);
        assert!(p.meta.contains_key(&new_key));
        assert_eq!(p.endpoints[&new_key].upserted.len(), 1);
        st.delete_service(&s("default"), &s("web"));
        assert_eq!(st.take_pending().removed, vec![new_key]);
    }

    #[test]
    fn a_slice_update_touches_only_its_addresses() {
        let mut st = ClusterState::new("cluster.local");
        st.apply_service(service(&[("http", 80)]));
        for i in 0..100 {
            let endpoints = (0..100)
                .map(|j| ep(&format!("10.{i}.{j}.1"), "n1", &format!("p-{i}-{j}")))
                .collect();
            st.apply_slice(slice(&format!("web-{i}"), 8080, endpoints));
        }
        st.take_pending();
        let mut changed: Vec<SliceEndpoint> = (0..100)
            .map(|j| ep(&format!("10.7.{j}.1"), "n1", &format!("p-7-{j}")))
            .collect();
        changed[3].ready = false;
        st.apply_slice(slice("web-7", 8080, changed));
        let p = st.take_pending();
        assert_eq!(p.endpoints[&key()].upserted.len(), 1);
    }
}
