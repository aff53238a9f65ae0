//! The service index: the current backend set of every service port, and the
//! channels that carry its changes to subscribed proxies.
//!
//! Each service has one `watch` channel holding an `Arc<Published>`: the endpoint
//! map (shared, never copied per subscriber) and the delta from the previous
//! version, computed once per change. A subscriber that kept up sends that delta; one
//! that fell behind (the channel only keeps the latest value) diffs the set it last
//! sent against the current one. Sources (file, Kubernetes) call `upsert`/`remove`
//! or `replace_all`; they never talk to subscribers.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tandem_proto::discovery::v1 as pb;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::model::{
    CallerShares, EndpointChanges, EndpointMap, Locality, Policy, ServiceKey, ServiceSpec,
    caller_shares_to_proto, delta_is_empty, diff,
};

/// Node name → locality, as the sources know it.
pub type NodeMap = BTreeMap<String, Locality>;

/// One version of one service's backend set.
#[derive(Debug)]
pub struct Published {
    pub version: u64,
    /// The version `delta` applies to (0 for the first version).
    pub prev_version: u64,
    /// Shares structure with neighbouring versions: cloning it is O(1).
    pub endpoints: EndpointMap,
    pub callers: Arc<CallerShares>,
    pub traffic_distribution: Arc<str>,
    pub policy: Arc<Policy>,
    /// From `prev_version` to `version`.
    pub delta: pb::Delta,
    /// When the change was seen by the source, to measure push latency.
    pub changed_at: Instant,
    /// The service is gone: subscribers end their stream with NOT_FOUND.
    pub deleted: bool,
}

impl Published {
    /// The version after this one: the same set, callers and policy, reached by `delta`.
    /// Callers override what changed with struct update syntax.
    fn next(&self, version: u64, delta: pb::Delta, changed_at: Instant) -> Self {
        Self {
            version,
            prev_version: self.version,
            endpoints: self.endpoints.clone(),
            callers: self.callers.clone(),
            traffic_distribution: self.traffic_distribution.clone(),
            policy: self.policy.clone(),
            delta,
            changed_at,
            deleted: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("destination {0:?} is not a name[:port] or ip:port")]
    Malformed(String),
    #[error("unknown service {0}")]
    Unknown(String),
    #[error("the control plane has not finished its first sync yet")]
    NotSynced,
}

/// A proxy's subscription to one service: a receiver, not a copy of the set.
pub struct Subscription {
    pub key: ServiceKey,
    pub canonical: String,
    pub service: watch::Receiver<Arc<Published>>,
    pub nodes: watch::Receiver<Arc<NodeMap>>,
}

struct Entry {
    tx: watch::Sender<Arc<Published>>,
    spec: ServiceSpec,
}

/// A proxy watching a service: the node it runs on, and how many streams it has open.
struct Watcher {
    node: String,
    streams: usize,
}

/// Proxy id → watcher, for one service.
type Watchers = HashMap<String, Watcher>;

/// The callers' shares to publish for `spec`: the source's own if it has any (a file's
/// `callers:`), else, where the service asks for it, its watchers counted per zone of
/// their node (watchers on unknown nodes count nowhere).
fn callers_of(spec: &ServiceSpec, watchers: Option<&Watchers>, nodes: &NodeMap) -> CallerShares {
    if !spec.callers.is_empty() || !spec.policy.count_callers {
        return spec.callers.clone();
    }
    let mut shares = CallerShares::new();
    for watcher in watchers.into_iter().flat_map(|w| w.values()) {
        if let Some(l) = nodes.get(&watcher.node).filter(|l| !l.zone.is_empty()) {
            *shares.entry(l.zone.clone()).or_default() += 1.0;
        }
    }
    shares
}

#[derive(Default)]
struct State {
    services: HashMap<ServiceKey, Entry>,
    by_cluster_ip: HashMap<SocketAddr, ServiceKey>,
    /// Per service: the proxies watching it.
    watchers: HashMap<ServiceKey, Watchers>,
    /// Services whose callers changed since the last `refresh_callers`.
    callers_dirty: std::collections::HashSet<ServiceKey>,
}

pub struct ServiceIndex {
    cluster_domain: String,
    state: RwLock<State>,
    nodes: watch::Sender<Arc<NodeMap>>,
    synced: watch::Sender<bool>,
    next_version: AtomicU64,
    metrics: Arc<Metrics>,
}

impl ServiceIndex {
    pub fn new(cluster_domain: impl Into<String>, metrics: Arc<Metrics>) -> Self {
        Self {
            cluster_domain: cluster_domain.into(),
            state: RwLock::default(),
            nodes: watch::channel(Arc::new(NodeMap::new())).0,
            synced: watch::channel(false).0,
            // Versions start at the wall clock in microseconds, so that a restarted
            // control plane does not hand out versions a proxy has already seen.
            next_version: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros() as u64)
                    .unwrap_or(1),
            ),
            metrics,
        }
    }

    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    fn version(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The first full view of the source is loaded: subscriptions may be answered.
    pub fn mark_synced(&self) {
        self.synced.send_replace(true);
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits (bounded) for the first sync, so a proxy that connects during start-up
    /// gets its snapshot instead of a false "unknown service".
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.synced.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sets or replaces one service port. Returns true when proxies were told something.
    pub fn upsert(&self, key: ServiceKey, spec: ServiceSpec, changed_at: Instant) -> bool {
        let mut state = self.write();
        let changed = self.upsert_locked(&mut state, key, spec, changed_at);
        self.update_gauges(&state);
        changed
    }

    /// Removes one service port; its subscribers are told it is gone.
    pub fn remove(&self, key: &ServiceKey, changed_at: Instant) -> bool {
        let mut state = self.write();
        let removed = self.remove_locked(&mut state, key, changed_at);
        self.update_gauges(&state);
        removed
    }

    /// Creates a service port with no endpoints, or updates what is known about it
    /// besides its endpoints (ClusterIPs, callers' shares, traffic distribution).
    pub fn upsert_meta(
        &self,
        key: ServiceKey,
        cluster_ips: Vec<IpAddr>,
        callers: CallerShares,
        traffic_distribution: String,
        policy: Policy,
        changed_at: Instant,
    ) -> bool {
        let mut state = self.write();
        let endpoints = state
            .services
            .get(&key)
            .map(|e| e.spec.endpoints.clone())
            .unwrap_or_default();
        let spec = ServiceSpec {
            endpoints,
            callers,
            cluster_ips,
            traffic_distribution,
            policy,
        };
        let changed = self.upsert_locked(&mut state, key, spec, changed_at);
        self.update_gauges(&state);
        changed
    }

    /// Applies endpoint changes to an existing service port in O(changes · log n): the
    /// work is proportional to what changed, not to the size of the service.
    pub fn apply_changes(
        &self,
        key: &ServiceKey,
        changes: EndpointChanges,
        changed_at: Instant,
    ) -> bool {
        let mut state = self.write();
        let Some(entry) = state.services.get_mut(key) else {
            return false;
        };
        let current = entry.tx.borrow().clone();
        let mut endpoints = current.endpoints.clone();
        let mut delta = pb::Delta::default();
        for removed in changes.removed {
            if endpoints.remove(&removed).is_some() {
                delta.removed.push(removed.to_string());
            }
        }
        for endpoint in changes.upserted {
            match endpoints.get(&endpoint.address) {
                Some(old) if **old == endpoint => continue,
                Some(_) => delta.changed.push(endpoint.to_proto()),
                None => delta.added.push(endpoint.to_proto()),
            }
            endpoints.insert(endpoint.address, Arc::new(endpoint));
        }
        if delta_is_empty(&delta) {
            return false;
        }
        tracing::debug!(
            service = %key,
            added = delta.added.len(),
            changed = delta.changed.len(),
            removed = delta.removed.len(),
            "service endpoints changed"
        );
        entry.spec.endpoints = endpoints.clone();
        entry.tx.send_replace(Arc::new(Published {
            endpoints,
            ..current.next(self.version(), delta, changed_at)
        }));
        self.metrics.publishes.inc();
        self.update_gauges(&state);
        true
    }

    /// Replaces the whole index (the file source's reload). Unchanged services are untouched.
    pub fn replace_all(
        &self,
        services: BTreeMap<ServiceKey, ServiceSpec>,
        changed_at: Instant,
    ) -> usize {
        let mut state = self.write();
        let gone: Vec<ServiceKey> = state
            .services
            .keys()
            .filter(|key| !services.contains_key(*key))
            .cloned()
            .collect();
        let mut changes = 0;
        for key in gone {
            changes += usize::from(self.remove_locked(&mut state, &key, changed_at));
        }
        for (key, spec) in services {
            changes += usize::from(self.upsert_locked(&mut state, key, spec, changed_at));
        }
        self.update_gauges(&state);
        changes
    }

    /// Replaces the node → locality map (proxies on changed nodes get a delta).
    pub fn set_nodes(&self, nodes: NodeMap) {
        let changed = self.nodes.send_if_modified(|current| {
            if **current == nodes {
                false
            } else {
                *current = Arc::new(nodes);
                true
            }
        });
        if changed {
            // Callers' zones come from their nodes.
            let mut state = self.write();
            let keys: Vec<ServiceKey> = state.watchers.keys().cloned().collect();
            state.callers_dirty.extend(keys);
        }
    }

    /// A proxy opened a stream on `key`; `proxy` identifies it, `node` is where it runs.
    pub fn caller_joined(&self, key: &ServiceKey, proxy: &str, node: &str) {
        let mut state = self.write();
        let watcher = state
            .watchers
            .entry(key.clone())
            .or_default()
            .entry(proxy.to_string())
            .or_insert_with(|| Watcher {
                node: node.to_string(),
                streams: 0,
            });
        watcher.streams += 1;
        state.callers_dirty.insert(key.clone());
    }

    /// A stream opened by `caller_joined` ended.
    pub fn caller_left(&self, key: &ServiceKey, proxy: &str) {
        let mut state = self.write();
        if let Some(watchers) = state.watchers.get_mut(key) {
            if let Some(watcher) = watchers.get_mut(proxy) {
                watcher.streams -= 1;
                if watcher.streams == 0 {
                    watchers.remove(proxy);
                }
            }
            if watchers.is_empty() {
                state.watchers.remove(key);
            }
        }
        state.callers_dirty.insert(key.clone());
    }

    /// Publishes the recounted callers' shares of the services whose watchers changed.
    /// Called periodically, so a fleet of proxies (re)connecting at once costs one
    /// update per service, not one per proxy.
    pub fn refresh_callers(&self, changed_at: Instant) {
        let mut state = self.write();
        if state.callers_dirty.is_empty() {
            return;
        }
        let nodes = self.nodes.borrow().clone();
        let state = &mut *state;
        for key in state.callers_dirty.drain() {
            let Some(entry) = state.services.get(&key) else {
                continue;
            };
            let callers = callers_of(&entry.spec, state.watchers.get(&key), &nodes);
            let current = entry.tx.borrow().clone();
            if *current.callers == callers {
                continue;
            }
            tracing::debug!(service = %key, ?callers, "callers' shares changed");
            let delta = pb::Delta {
                caller_shares: Some(caller_shares_to_proto(&callers)),
                ..Default::default()
            };
            entry.tx.send_replace(Arc::new(Published {
                callers: Arc::new(callers),
                ..current.next(self.version(), delta, changed_at)
            }));
            self.metrics.publishes.inc();
        }
    }

    pub fn node_locality(&self, node: &str) -> Option<Locality> {
        self.nodes.borrow().get(node).cloned()
    }

    fn upsert_locked(
        &self,
        state: &mut State,
        key: ServiceKey,
        spec: ServiceSpec,
        changed_at: Instant,
    ) -> bool {
        let old_ips = state
            .services
            .get(&key)
            .map(|entry| entry.spec.cluster_ips.clone())
            .unwrap_or_default();
        for ip in old_ips.iter().filter(|ip| !spec.cluster_ips.contains(ip)) {
            state.by_cluster_ip.remove(&SocketAddr::new(*ip, key.port));
        }
        for ip in &spec.cluster_ips {
            state
                .by_cluster_ip
                .insert(SocketAddr::new(*ip, key.port), key.clone());
        }

        let callers = callers_of(&spec, state.watchers.get(&key), &self.nodes.borrow());
        match state.services.get_mut(&key) {
            Some(entry) if entry.spec == spec => false,
            Some(entry) => {
                let current = entry.tx.borrow().clone();
                let mut delta = diff(&current.endpoints, &spec.endpoints);
                if *current.callers != callers {
                    delta.caller_shares = Some(caller_shares_to_proto(&callers));
                }
                if entry.spec.traffic_distribution != spec.traffic_distribution {
                    delta.traffic_distribution = Some(spec.traffic_distribution.clone());
                }
                if entry.spec.policy != spec.policy {
                    delta.policy = Some(spec.policy.to_proto());
                }
                let published = Published {
                    version: self.version(),
                    prev_version: current.version,
                    endpoints: spec.endpoints.clone(),
                    callers: Arc::new(callers),
                    traffic_distribution: spec.traffic_distribution.as_str().into(),
                    policy: Arc::new(spec.policy.clone()),
                    delta,
                    changed_at,
                    deleted: false,
                };
                let endpoint_changes = published.delta.added.len()
                    + published.delta.changed.len()
                    + published.delta.removed.len();
                tracing::info!(
                    service = %key,
                    version = published.version,
                    endpoints = spec.endpoints.len(),
                    endpoint_changes,
                    "service updated"
                );
                entry.spec = spec;
                entry.tx.send_replace(Arc::new(published));
                self.metrics.publishes.inc();
                true
            }
            None => {
                tracing::info!(service = %key, endpoints = spec.endpoints.len(), "service added");
                let published = Published {
                    version: self.version(),
                    prev_version: 0,
                    endpoints: spec.endpoints.clone(),
                    callers: Arc::new(callers),
                    traffic_distribution: spec.traffic_distribution.as_str().into(),
                    policy: Arc::new(spec.policy.clone()),
                    delta: pb::Delta::default(),
                    changed_at,
                    deleted: false,
                };
                let (tx, _) = watch::channel(Arc::new(published));
                state.services.insert(key, Entry { tx, spec });
                self.metrics.publishes.inc();
                true
            }
        }
    }

    fn remove_locked(&self, state: &mut State, key: &ServiceKey, changed_at: Instant) -> bool {
        let Some(entry) = state.services.remove(key) else {
            return false;
        };
        for ip in &entry.spec.cluster_ips {
            let addr = SocketAddr::new(*ip, key.port);
            if state.by_cluster_ip.get(&addr) == Some(key) {
                state.by_cluster_ip.remove(&addr);
            }
        }
        tracing::info!(service = %key, "service removed");
        let current = entry.tx.borrow().clone();
        entry.tx.send_replace(Arc::new(Published {
            endpoints: EndpointMap::new(),
            deleted: true,
            ..current.next(self.version(), pb::Delta::default(), changed_at)
        }));
        self.metrics.publishes.inc();
        true
    }

    fn update_gauges(&self, state: &State) {
        self.metrics.services.set(state.services.len() as i64);
        self.metrics.endpoints.set(
            state
                .services
                .values()
                .map(|e| e.spec.endpoints.len() as i64)
                .sum(),
        );
    }

    /// Resolves a destination as a proxy names it and subscribes to it.
    pub fn subscribe(
        &self,
        destination: &str,
        caller_namespace: &str,
    ) -> Result<Subscription, ResolveError> {
        if !self.is_synced() {
            return Err(ResolveError::NotSynced);
        }
        let target = parse_destination(destination, &self.cluster_domain, caller_namespace)?;
        let state = self.read();
        let key = match target {
            Target::Name(key) => key,
            Target::Addr(addr) => state
                .by_cluster_ip
                .get(&addr)
                .cloned()
                .ok_or_else(|| ResolveError::Unknown(destination.to_string()))?,
        };
        let entry = state
            .services
            .get(&key)
            .ok_or_else(|| ResolveError::Unknown(key.canonical(&self.cluster_domain)))?;
        Ok(Subscription {
            canonical: key.canonical(&self.cluster_domain),
            key,
            service: entry.tx.subscribe(),
            nodes: self.nodes.subscribe(),
        })
    }

    /// The current endpoint count per service, for logs and tests.
    pub fn service_count(&self) -> usize {
        self.read().services.len()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Target {
    Name(ServiceKey),
    Addr(SocketAddr),
}

/// Parses `name[.namespace[.svc[.cluster-domain]]][:port]` or `ip:port`.
/// A missing port means 80, as it does for an HTTP Host header.
fn parse_destination(
    destination: &str,
    cluster_domain: &str,
    caller_namespace: &str,
) -> Result<Target, ResolveError> {
    let malformed = || ResolveError::Malformed(destination.to_string());
    let trimmed = destination.trim();
    if trimmed.is_empty() {
        return Err(malformed());
    }
    if let Ok(addr) = trimmed.parse::<SocketAddr>() {
        return Ok(Target::Addr(addr));
    }
    let (host, port) = match trimmed.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            (host, port.parse::<u16>().map_err(|_| malformed())?)
        }
        Some(_) => return Err(malformed()),
        None => (trimmed, 80),
    };
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(Target::Addr(SocketAddr::new(ip, port)));
    }
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let suffix = format!(".svc.{cluster_domain}");
    let host = host
        .strip_suffix(&suffix)
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(&host);
    let mut labels = host.split('.');
    let name = labels
        .next()
        .filter(|n| !n.is_empty())
        .ok_or_else(malformed)?;
    let caller_namespace = if caller_namespace.is_empty() {
        "default"
    } else {
        caller_namespace
    };
    let namespace = labels.next().unwrap_or(caller_namespace);
    if labels.next().is_some() || namespace.is_empty() {
        // `a.b.c` is not a cluster service name; it is an external host.
        return Err(ResolveError::Unknown(destination.to_string()));
    }
    Ok(Target::Name(ServiceKey::new(namespace, name, port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;

    fn key(ns: &str, name: &str, port: u16) -> Target {
        Target::Name(ServiceKey::new(ns, name, port))
    }

    #[test]
    fn destination_forms() {
        let p = |d| parse_destination(d, "cluster.local", "default");
        assert_eq!(
            p("web.default.svc.cluster.local:80"),
            Ok(key("default", "web", 80))
        );
        assert_eq!(p("web.shop.svc:8080"), Ok(key("shop", "web", 8080)));
        assert_eq!(p("web.shop:80"), Ok(key("shop", "web", 80)));
        assert_eq!(p("web:80"), Ok(key("default", "web", 80)));
        assert_eq!(p("WEB"), Ok(key("default", "web", 80)));
        assert_eq!(
            p("10.96.0.10:80"),
            Ok(Target::Addr("10.96.0.10:80".parse().unwrap()))
        );
        assert_eq!(
            p("[fd00::1]:80"),
            Ok(Target::Addr("[fd00::1]:80".parse().unwrap()))
        );
        assert!(matches!(p("web:http"), Err(ResolveError::Malformed(_))));
        assert!(matches!(
            p("example.com.evil:80"),
            Err(ResolveError::Unknown(_))
        ));
        assert!(matches!(p(""), Err(ResolveError::Malformed(_))));
    }

    fn spec(addrs: &[&str]) -> ServiceSpec {
        ServiceSpec {
            endpoints: addrs
                .iter()
                .map(|a| {
                    let addr: SocketAddr = a.parse().unwrap();
                    (addr, Arc::new(Endpoint::new(addr)))
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Nodes of one region, by name and zone.
    fn nodes(zones: &[(&str, &str)]) -> NodeMap {
        zones
            .iter()
            .map(|(name, zone)| {
                let locality = Locality {
                    region: "r".into(),
                    zone: (*zone).into(),
                    subzone: String::new(),
                };
                (name.to_string(), locality)
            })
            .collect()
    }

    #[tokio::test]
    async fn publishes_deltas_and_deletion() {
        let index = ServiceIndex::new("cluster.local", Arc::new(Metrics::default()));
        let k = ServiceKey::new("default", "web", 80);
        let now = Instant::now();
        assert_eq!(
            index.subscribe("web:80", "default").err(),
            Some(ResolveError::NotSynced)
        );
        index.upsert(k.clone(), spec(&["10.0.0.1:80"]), now);
        index.mark_synced();
        let mut sub = index.subscribe("web:80", "default").unwrap();
        let v1 = sub.service.borrow_and_update().version;

        assert!(
            !index.upsert(k.clone(), spec(&["10.0.0.1:80"]), now),
            "no-op upsert"
        );
        assert!(index.upsert(k.clone(), spec(&["10.0.0.1:80", "10.0.0.2:80"]), now));
        sub.service.changed().await.unwrap();
        let p = sub.service.borrow_and_update().clone();
        assert_eq!(p.prev_version, v1);
        assert!(p.version > v1);
        assert_eq!(p.delta.added.len(), 1);

        // Incremental changes: only real differences are published.
        let mut changes = EndpointChanges::default();
        let mut changed = Endpoint::new("10.0.0.2:80".parse().unwrap());
        changed.weight = 3;
        changes.upserted.push(changed);
        changes
            .upserted
            .push(Endpoint::new("10.0.0.1:80".parse().unwrap()));
        changes.removed.push("10.0.0.9:80".parse().unwrap());
        assert!(index.apply_changes(&k, changes, now));
        sub.service.changed().await.unwrap();
        let p = sub.service.borrow_and_update().clone();
        assert_eq!(p.delta.changed.len(), 1, "{:?}", p.delta);
        assert!(p.delta.added.is_empty() && p.delta.removed.is_empty());
        let unchanged = EndpointChanges {
            upserted: vec![Endpoint::new("10.0.0.1:80".parse().unwrap())],
            removed: vec![],
        };
        assert!(
            !index.apply_changes(&k, unchanged, now),
            "nothing to publish"
        );

        index.remove(&k, now);
        sub.service.changed().await.unwrap();
        assert!(sub.service.borrow().deleted);
        assert!(matches!(
            index.subscribe("web:80", "default"),
            Err(ResolveError::Unknown(_))
        ));
    }

    #[tokio::test]
    async fn callers_are_counted_from_subscribed_proxies_per_zone() {
        let index = ServiceIndex::new("cluster.local", Arc::new(Metrics::default()));
        let k = ServiceKey::new("default", "web", 80);
        let mut counted = spec(&["10.0.0.1:80"]);
        counted.policy.count_callers = true;
        index.upsert(k.clone(), counted.clone(), Instant::now());
        index.set_nodes(nodes(&[("n-a", "zone-a"), ("n-b", "zone-b")]));
        index.mark_synced();
        let mut sub = index.subscribe("web:80", "default").unwrap();
        sub.service.borrow_and_update();
        index.caller_joined(&k, "default/p1", "n-a");
        index.caller_joined(&k, "default/p1", "n-a"); // a second stream of the same proxy
        index.caller_joined(&k, "default/p2", "n-a");
        index.caller_joined(&k, "default/p3", "n-b");
        index.caller_joined(&k, "default/p4", "unknown-node");
        index.refresh_callers(Instant::now());
        sub.service.changed().await.unwrap();
        let p = sub.service.borrow_and_update().clone();
        let shares = &p.delta.caller_shares.as_ref().unwrap().by_zone;
        assert_eq!((shares["zone-a"], shares["zone-b"]), (2.0, 1.0));
        assert_eq!(shares.len(), 2, "proxies on unknown nodes count nowhere");

        // Explicit callers from the source win over counted ones.
        let mut explicit = counted.clone();
        explicit.callers = [("zone-c".to_string(), 1.0)].into();
        index.upsert(k.clone(), explicit, Instant::now());
        sub.service.changed().await.unwrap();
        assert_eq!(
            sub.service
                .borrow_and_update()
                .callers
                .keys()
                .collect::<Vec<_>>(),
            vec!["zone-c"]
        );
        index.caller_left(&k, "default/p3");
        index.refresh_callers(Instant::now());
        assert!(
            !sub.service.has_changed().unwrap(),
            "explicit shares do not move"
        );
    }

    #[tokio::test]
    async fn callers_are_not_counted_unless_the_service_asks() {
        let index = ServiceIndex::new("cluster.local", Arc::new(Metrics::default()));
        let k = ServiceKey::new("default", "web", 80);
        index.upsert(k.clone(), spec(&["10.0.0.1:80"]), Instant::now());
        index.set_nodes(nodes(&[("n-a", "zone-a")]));
        index.mark_synced();
        let mut sub = index.subscribe("web:80", "default").unwrap();
        sub.service.borrow_and_update();
        index.caller_joined(&k, "default/p1", "n-a");
        index.refresh_callers(Instant::now());
        assert!(
            !sub.service.has_changed().unwrap(),
            "a lone caller moves nothing"
        );

        // Opting in publishes the count already made.
        let mut counted = spec(&["10.0.0.1:80"]);
        counted.policy.count_callers = true;
        index.upsert(k.clone(), counted, Instant::now());
        sub.service.changed().await.unwrap();
        assert_eq!(sub.service.borrow_and_update().callers["zone-a"], 1.0);
    }

    #[test]
    fn cluster_ip_resolves_to_service() {
        let index = ServiceIndex::new("cluster.local", Arc::new(Metrics::default()));
        let mut s = spec(&["10.0.0.1:8080"]);
        s.cluster_ips = vec!["10.96.0.10".parse().unwrap()];
        index.upsert(ServiceKey::new("shop", "cart", 80), s, Instant::now());
        index.mark_synced();
        let sub = index.subscribe("10.96.0.10:80", "default").unwrap();
        assert_eq!(sub.canonical, "cart.shop.svc.cluster.local:80");
        assert!(index.subscribe("10.96.0.10:81", "default").is_err());
    }
}
