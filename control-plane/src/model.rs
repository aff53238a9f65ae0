//! The control plane's view of a backend set, independent of where it came from
//! (a YAML file, Kubernetes) and of the wire format.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tandem_proto::discovery::v1 as pb;

/// A DNS-1123 label, what Kubernetes allows as most object names and as a namespace:
/// lowercase letters, digits and '-', starting and ending alphanumeric, 63 at most.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A service port: what a proxy's destination resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: u16,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str, port: u16) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            port,
        }
    }

    /// `name.namespace.svc.<domain>:port`, the name proxies are told they reached.
    pub fn canonical(&self, cluster_domain: &str) -> String {
        format!(
            "{}.{}.svc.{}:{}",
            self.name, self.namespace, cluster_domain, self.port
        )
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}:{}", self.name, self.namespace, self.port)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }

    pub fn to_proto(&self) -> pb::Locality {
        pb::Locality {
            region: self.region.clone(),
            zone: self.zone.clone(),
            subzone: self.subzone.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Health {
    #[default]
    Healthy,
    Draining,
    Unhealthy,
}

impl Health {
    pub fn to_proto(self) -> pb::Health {
        match self {
            Health::Healthy => pb::Health::Healthy,
            Health::Draining => pb::Health::Draining,
            Health::Unhealthy => pb::Health::Unhealthy,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Whatever the client spoke.
    #[default]
    Unspecified,
    Http1,
    Http2,
    Opaque,
}

impl Protocol {
    pub fn to_proto(self) -> pb::Protocol {
        match self {
            Protocol::Unspecified => pb::Protocol::Unspecified,
            Protocol::Http1 => pb::Protocol::Http1,
            Protocol::Http2 => pb::Protocol::Http2,
            Protocol::Opaque => pb::Protocol::Opaque,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub weight: u32,
    pub locality: Locality,
    pub health: Health,
    pub identity: String,
    pub protocol: Protocol,
    pub name: String,
}

impl Endpoint {
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            weight: 1,
            locality: Locality::default(),
            health: Health::Healthy,
            identity: String::new(),
            protocol: Protocol::Unspecified,
            name: String::new(),
        }
    }

    pub fn to_proto(&self) -> pb::Endpoint {
        pb::Endpoint {
            address: self.address.to_string(),
            weight: self.weight,
            locality: Some(self.locality.to_proto()),
            health: self.health.to_proto() as i32,
            identity: self.identity.clone(),
            protocol: self.protocol.to_proto() as i32,
            name: self.name.clone(),
        }
    }
}

/// The endpoints of one service port, ordered by address. A persistent map: a new
/// version shares all unchanged entries with the previous one, so changing k endpoints
/// of a service costs O(k log n), not a copy of the set.
pub type EndpointMap = imbl::OrdMap<SocketAddr, Arc<Endpoint>>;

/// Share of a service's callers per zone (relative weights; not necessarily summing to 1).
pub type CallerShares = BTreeMap<String, f64>;

pub fn caller_shares_to_proto(shares: &CallerShares) -> pb::CallerShares {
    pb::CallerShares {
        by_zone: shares
            .iter()
            .map(|(zone, share)| (zone.clone(), *share))
            .collect(),
    }
}

/// Active HTTP health checks of a service's endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
}

/// How proxies treat a service beyond balancing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub health_check: Option<HealthCheck>,
    pub request_timeout: Option<std::time::Duration>,
    /// Capacity-proportional zone routing with callers' shares counted from the
    /// proxies that watch the service. Opt-in, as zone-aware routing is in Envoy: a
    /// lone caller would otherwise send half its traffic out of a zone that has room.
    pub count_callers: bool,
}

impl Policy {
    pub fn to_proto(&self) -> pb::Policy {
        pb::Policy {
            health_check: self.health_check.as_ref().map(|h| pb::HealthCheck {
                path: h.path.clone(),
                interval_ms: h.interval.as_millis() as u32,
                timeout_ms: h.timeout.as_millis() as u32,
                unhealthy_threshold: h.unhealthy_threshold,
                healthy_threshold: h.healthy_threshold,
            }),
            request_timeout_ms: self.request_timeout.map_or(0, |t| t.as_millis() as u32),
        }
    }
}

/// Everything a source knows about one service port.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceSpec {
    pub endpoints: EndpointMap,
    pub callers: CallerShares,
    /// ClusterIPs under which proxies may also name this service (`10.96.0.10:80`).
    pub cluster_ips: Vec<IpAddr>,
    /// The Service's `spec.trafficDistribution` (e.g. `PreferClose`), empty if unset.
    pub traffic_distribution: String,
    pub policy: Policy,
}

/// Endpoints of one service port that changed (added or different) or left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointChanges {
    pub upserted: Vec<Endpoint>,
    pub removed: Vec<SocketAddr>,
}

impl EndpointChanges {
    pub fn is_empty(&self) -> bool {
        self.upserted.is_empty() && self.removed.is_empty()
    }
}

/// What changed between two endpoint maps, as the wire's `Delta`. Shared subtrees of
/// the two persistent maps are skipped.
pub fn diff(old: &EndpointMap, new: &EndpointMap) -> pb::Delta {
    let mut delta = pb::Delta::default();
    for item in old.diff(new) {
        match item {
            imbl::ordmap::DiffItem::Add(_, ep) => delta.added.push(ep.to_proto()),
            imbl::ordmap::DiffItem::Update { new: (_, ep), .. } => {
                delta.changed.push(ep.to_proto())
            }
            imbl::ordmap::DiffItem::Remove(addr, _) => delta.removed.push(addr.to_string()),
        }
    }
    delta
}

/// True when a delta carries no change at all.
pub fn delta_is_empty(delta: &pb::Delta) -> bool {
    delta.added.is_empty()
        && delta.changed.is_empty()
        && delta.removed.is_empty()
        && delta.caller_shares.is_none()
        && delta.proxy_locality.is_none()
        && delta.traffic_distribution.is_none()
        && delta.policy.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, weight: u32) -> (SocketAddr, Arc<Endpoint>) {
        let address: SocketAddr = addr.parse().unwrap();
        let mut e = Endpoint::new(address);
        e.weight = weight;
        (address, Arc::new(e))
    }

    #[test]
    fn diff_finds_added_changed_removed() {
        let old: EndpointMap = [
            ep("10.0.0.1:80", 1),
            ep("10.0.0.2:80", 1),
            ep("10.0.0.3:80", 1),
        ]
        .into_iter()
        .collect();
        let new: EndpointMap = [
            ep("10.0.0.2:80", 5),
            ep("10.0.0.3:80", 1),
            ep("10.0.0.4:80", 1),
        ]
        .into_iter()
        .collect();
        let d = diff(&old, &new);
        assert_eq!(d.removed, vec!["10.0.0.1:80"]);
        assert_eq!(d.changed.len(), 1);
        assert_eq!(d.changed[0].weight, 5);
        assert_eq!(d.added[0].address, "10.0.0.4:80");
        assert!(delta_is_empty(&diff(&new, &new)));
    }
}
