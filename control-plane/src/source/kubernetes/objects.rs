//! Kubernetes objects → the plain structs of [`super::state`], tolerating what real
//! clusters contain: missing fields, FQDN slices, unnamed ports, UDP ports, nodes
//! without topology labels. What cannot be used is reported as [`Ignored`] so the
//! caller logs it once, not on every event.

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::PartialObjectMeta;

use super::state::{NodeObj, PodObj, ServiceObj, ServicePort, SliceEndpoint, SliceObj};
use crate::model::{HealthCheck, Policy, Protocol};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const WEIGHT_ANNOTATION: &str = "tandem.io/weight";
/// Set by injection on every pod it gave a proxy (`crate::injection::INJECTED`).
pub const MESHED_ANNOTATION: &str = crate::injection::INJECTED;
pub const TIMEOUT_ANNOTATION: &str = "tandem.io/request-timeout";
pub const HEALTH_PATH_ANNOTATION: &str = "tandem.io/health-check-path";
pub const HEALTH_INTERVAL_ANNOTATION: &str = "tandem.io/health-check-interval";
/// `counted`: zone routing by the callers' shares counted from the subscribed proxies.
pub const CALLERS_ANNOTATION: &str = "tandem.io/callers";
const ZONE_LABELS: [&str; 2] = [
    "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/zone",
];
const REGION_LABELS: [&str; 2] = [
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/region",
];

/// Something about an object that Tandem does not use, with a key to log it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    pub key: String,
    pub reason: String,
}

impl Ignored {
    fn new(key: String, reason: impl Into<String>) -> Self {
        Self {
            key,
            reason: reason.into(),
        }
    }
}

fn arc(s: &Option<String>) -> Arc<str> {
    s.as_deref().unwrap_or_default().into()
}

/// The protocol a Service port declares, by `appProtocol` or (Istio's convention) by
/// its name's prefix: `http`, `http2`/`h2c`/`grpc`, or opaque TCP.
pub fn port_protocol(app_protocol: Option<&str>, name: &str) -> Protocol {
    let declared = app_protocol
        .map(|p| p.strip_prefix("kubernetes.io/").unwrap_or(p))
        .unwrap_or_else(|| name.split('-').next().unwrap_or(name))
        .to_ascii_lowercase();
    match declared.as_str() {
        "http" | "http1" | "grpc-web" | "ws" | "wss" => Protocol::Http1,
        "http2" | "h2c" | "grpc" => Protocol::Http2,
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" => Protocol::Opaque,
        _ => Protocol::Unspecified,
    }
}

pub fn service(svc: &Service, ignored: &mut Vec<Ignored>) -> Option<ServiceObj> {
    let meta = &svc.metadata;
    let namespace = arc(&meta.namespace);
    let name = arc(&meta.name);
    if name.is_empty() {
        return None;
    }
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        ignored.push(Ignored::new(
            format!("externalname:{namespace}/{name}"),
            format!("Service {namespace}/{name} is ExternalName (a DNS alias): not meshed"),
        ));
        return None;
    }
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            ignored.push(Ignored::new(
                format!("udp:{namespace}/{name}/{}", p.port),
                format!(
                    "port {} of Service {namespace}/{name} is {}: only TCP is proxied",
                    p.port,
                    p.protocol.as_deref().unwrap_or_default()
                ),
            ));
            continue;
        }
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        ports.push(ServicePort {
            protocol: port_protocol(p.app_protocol.as_deref(), &port_name),
            name: port_name,
            port,
        });
    }
    let cluster_ips = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .fold(Vec::new(), |mut ips, ip| {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
            ips
        });
    let policy = policy(svc, &namespace, &name, ignored);
    Some(ServiceObj {
        namespace,
        name,
        ports,
        cluster_ips,
        traffic_distribution: spec.traffic_distribution.clone().unwrap_or_default(),
        policy,
    })
}

/// The `tandem.io/*` annotations of a Service.
fn policy(svc: &Service, namespace: &str, name: &str, ignored: &mut Vec<Ignored>) -> Policy {
    let annotations = svc.metadata.annotations.clone().unwrap_or_default();
    let mut duration = |key: &str| {
        let value = annotations.get(key)?;
        match tandem_common::duration::parse(value) {
            Ok(d) => Some(d),
            Err(reason) => {
                ignored.push(Ignored::new(
                    format!("annotation:{namespace}/{name}:{key}:{value}"),
                    format!("Service {namespace}/{name}: {key}: {reason}; ignored"),
                ));
                None
            }
        }
    };
    let request_timeout = duration(TIMEOUT_ANNOTATION);
    let interval = duration(HEALTH_INTERVAL_ANNOTATION);
    let health_check = annotations
        .get(HEALTH_PATH_ANNOTATION)
        .map(|path| HealthCheck {
            path: path.clone(),
            interval: interval.unwrap_or(std::time::Duration::from_secs(5)),
            timeout: std::time::Duration::from_secs(1),
            unhealthy_threshold: 2,
            healthy_threshold: 2,
        });
    let count_callers = match annotations.get(CALLERS_ANNOTATION).map(String::as_str) {
        None => false,
        Some("counted") => true,
        Some(other) => {
            ignored.push(Ignored::new(
                format!("annotation:{namespace}/{name}:{CALLERS_ANNOTATION}:{other}"),
                format!(
                    "Service {namespace}/{name}: {CALLERS_ANNOTATION}: {other:?} is not `counted`; ignored"
                ),
            ));
            false
        }
    };
    Policy {
        health_check,
        request_timeout,
        count_callers,
    }
}

/// The service a slice belongs to (its label), for deletes that carry only metadata.
pub fn slice_service(slice: &EndpointSlice) -> Option<Arc<str>> {
    slice
        .metadata
        .labels
        .as_ref()?
        .get(SERVICE_NAME_LABEL)
        .map(|s| Arc::from(s.as_str()))
}

pub fn slice(slice: &EndpointSlice, ignored: &mut Vec<Ignored>) -> Option<SliceObj> {
    let meta = &slice.metadata;
    let namespace = arc(&meta.namespace);
    let name = arc(&meta.name);
    let service = slice_service(slice)?;
    if slice.address_type == "FQDN" {
        ignored.push(Ignored::new(
            format!("fqdn:{namespace}/{name}"),
            format!(
                "EndpointSlice {namespace}/{name} has FQDN addresses: ignored, as kube-proxy does"
            ),
        ));
        return None;
    }
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .filter_map(|e| {
            let address: IpAddr = e.addresses.first()?.parse().ok()?;
            let conditions = e.conditions.clone().unwrap_or_default();
            let ready = conditions.ready.unwrap_or(true);
            let pod = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.as_deref())
                .map(Arc::from);
            Some(SliceEndpoint {
                address,
                ready,
                serving: conditions.serving.unwrap_or(true),
                terminating: conditions.terminating.unwrap_or(false),
                node: e.node_name.as_deref().map(Arc::from),
                zone: e.zone.clone(),
                pod,
                hostname: e.hostname.clone(),
            })
        })
        .collect();
    Some(SliceObj {
        namespace,
        name,
        service,
        ports,
        endpoints,
    })
}

pub fn node(node: &PartialObjectMeta<Node>, ignored: &mut Vec<Ignored>) -> Option<NodeObj> {
    let name = node.metadata.name.as_deref()?;
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let zone = first(&ZONE_LABELS);
    let region = first(&REGION_LABELS);
    if zone.is_none() || region.is_none() {
        ignored.push(Ignored::new(
            format!("topology:{name}"),
            format!("Node {name} has no topology.kubernetes.io/zone or region label: its endpoints have no locality"),
        ));
    }
    Some(NodeObj {
        name: name.into(),
        region: region.unwrap_or_default(),
        zone: zone.unwrap_or_default(),
    })
}

pub fn pod(pod: &Pod, ignored: &mut Vec<Ignored>) -> Option<PodObj> {
    let meta = &pod.metadata;
    let namespace = arc(&meta.namespace);
    let name = arc(&meta.name);
    if name.is_empty() {
        return None;
    }
    let weight = match meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(WEIGHT_ANNOTATION))
    {
        None => 1,
        Some(value) => match value.trim().parse::<u32>() {
            Ok(w) if w >= 1 => w,
            _ => {
                ignored.push(Ignored::new(
                    format!("weight:{namespace}/{name}:{value}"),
                    format!("Pod {namespace}/{name}: {WEIGHT_ANNOTATION}={value:?} is not a whole number >= 1; using 1"),
                ));
                1
            }
        },
    };
    let service_account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_string());
    // Only a pod with our proxy can answer mutual TLS: the identity tells client
    // proxies to speak it, so an unmeshed pod gets none (plaintext to it).
    let meshed = meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MESHED_ANNOTATION));
    Some(PodObj {
        namespace,
        name,
        weight,
        meshed_account: meshed.then_some(service_account),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_from_app_protocol_or_port_name() {
        assert_eq!(
            port_protocol(Some("kubernetes.io/h2c"), "web"),
            Protocol::Http2
        );
        assert_eq!(port_protocol(Some("grpc"), ""), Protocol::Http2);
        assert_eq!(port_protocol(None, "http-web"), Protocol::Http1);
        assert_eq!(port_protocol(None, "grpc-api"), Protocol::Http2);
        assert_eq!(port_protocol(None, "tcp-db"), Protocol::Opaque);
        assert_eq!(port_protocol(None, "web"), Protocol::Unspecified);
    }

    #[test]
    fn slices_tolerate_missing_fields() {
        let json = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-x", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"]},
                {"addresses": []},
                {"addresses": ["not-an-ip"]},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "serving": true, "terminating": true},
                 "targetRef": {"kind": "Pod", "name": "web-2"}, "nodeName": "n1", "zone": "z1"}
            ],
            "ports": [{"port": 8080}]
        });
        let s: EndpointSlice = serde_json::from_value(json).unwrap();
        let mut ignored = Vec::new();
        let obj = slice(&s, &mut ignored).unwrap();
        assert_eq!(obj.ports, vec![(String::new(), 8080)], "unnamed port");
        assert_eq!(obj.endpoints.len(), 2);
        assert!(obj.endpoints[0].ready, "nil ready means true");
        assert!(obj.endpoints[1].terminating && !obj.endpoints[1].ready);
        assert_eq!(obj.endpoints[1].pod.as_deref(), Some("web-2"));

        let fqdn: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "f", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "FQDN", "endpoints": []
        }))
        .unwrap();
        assert!(slice(&fqdn, &mut ignored).is_none());
        assert_eq!(ignored.len(), 1);
    }

    #[test]
    fn bad_weight_annotations_fall_back_to_one() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "default", "annotations": {"tandem.io/weight": "heavy"}},
            "spec": {"containers": []}
        }))
        .unwrap();
        let mut ignored = Vec::new();
        assert_eq!(pod(&p, &mut ignored).unwrap().weight, 1);
        assert_eq!(ignored.len(), 1);
        assert_eq!(
            pod(&p, &mut Vec::new()).unwrap().meshed_account,
            None,
            "not meshed: no identity"
        );
        let mut meshed = p.clone();
        meshed
            .metadata
            .annotations
            .get_or_insert_default()
            .insert(MESHED_ANNOTATION.into(), "0.1.0".into());
        assert_eq!(
            pod(&meshed, &mut Vec::new())
                .unwrap()
                .meshed_account
                .as_deref(),
            Some("default")
        );
    }

    #[test]
    fn service_annotations_set_the_policy() {
        let svc = |annotations: serde_json::Value| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "default", "annotations": annotations},
                "spec": {"ports": [{"port": 80}]}
            }))
            .unwrap()
        };
        let mut ignored = Vec::new();
        let good = svc(serde_json::json!({
            "tandem.io/callers": "counted",
            "tandem.io/request-timeout": "2s",
            "tandem.io/health-check-path": "/healthz",
        }));
        let policy = service(&good, &mut ignored).unwrap().policy;
        assert!(policy.count_callers);
        assert_eq!(
            policy.request_timeout,
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(policy.health_check.unwrap().path, "/healthz");
        assert!(ignored.is_empty());

        let bad = svc(
            serde_json::json!({"tandem.io/callers": "yes", "tandem.io/request-timeout": "soon"}),
        );
        let policy = service(&bad, &mut ignored).unwrap().policy;
        assert_eq!(
            policy,
            Policy::default(),
            "bad values are ignored, not guessed"
        );
        assert_eq!(ignored.len(), 2);
    }
}
