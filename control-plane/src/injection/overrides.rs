//! The per-pod annotations that change what is injected, checked before anything is
//! patched: a value that is wrong names its annotation, and the pod stays unmeshed.

use std::fmt;
use std::net::IpAddr;

use serde_json::{Map, Value};

use super::config::{InjectConfig, Resources};
use super::{
    INBOUND_POLICY, PROXY_CPU_LIMIT, PROXY_CPU_REQUEST, PROXY_LOG_LEVEL, PROXY_MEMORY_LIMIT,
    PROXY_MEMORY_REQUEST, SKIP_INBOUND_PORTS, SKIP_OUTBOUND_CIDRS, SKIP_OUTBOUND_PORTS,
    TRACE_SAMPLE_RATIO, quantity,
};

/// What the proxy does with plaintext from unmeshed clients (`tandem.io/inbound-policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundPolicy {
    /// Served (the default: meshing a server does not cut off its unmeshed clients).
    #[default]
    Permissive,
    /// Refused: only mesh TLS comes in.
    MtlsOnly,
}

impl InboundPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            InboundPolicy::Permissive => "permissive",
            InboundPolicy::MtlsOnly => "mtls-only",
        }
    }

    fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "permissive" => Ok(Self::Permissive),
            "mtls-only" => Ok(Self::MtlsOnly),
            _ => Err("use mtls-only or permissive".into()),
        }
    }
}

/// What a pod's annotations ask for, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overrides {
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    /// As written (trimmed), each an address or a CIDR.
    pub skip_outbound_cidrs: Vec<String>,
    pub log_level: String,
    pub resources: Resources,
    /// The pod's annotation, else its namespace's, else permissive.
    pub inbound_policy: InboundPolicy,
    /// `--trace-sample-ratio` of the pod's proxy.
    pub trace_sample_ratio: String,
}

/// An annotation whose value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub annotation: &'static str,
    /// The value as written (JSON for a value that is not a string).
    pub value: String,
    pub reason: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {:?}: {}", self.annotation, self.value, self.reason)
    }
}

impl std::error::Error for Invalid {}

/// Checks a sample ratio: a number from 0 to 1.
pub fn sample_ratio(value: &str) -> Result<(), String> {
    match value.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(()),
        _ => Err("not a number from 0 to 1".into()),
    }
}

/// Checks a RUST_LOG value: printable, no spaces, not empty, not huge.
pub fn log_level(value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 512 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("not a log level (such as info, debug, or info,tandem_proxy=debug)".into());
    }
    Ok(())
}

fn ports(value: &str) -> Result<Vec<u16>, String> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(port) if port > 0 => {
                if !out.contains(&port) {
                    out.push(port);
                }
            }
            _ => {
                return Err(format!(
                    "not a list of ports ({item:?}: use ports 1-65535, comma separated)"
                ));
            }
        }
    }
    Ok(out)
}

fn cidrs(value: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bad = || format!("{item:?} is not an address or a CIDR (10.0.0.0/8, fd00::/8)");
        let (addr, bits) = match item.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (item, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if let Some(bits) = bits {
            bits.parse::<u8>()
                .ok()
                .filter(|b| *b <= max && bits.bytes().all(|c| c.is_ascii_digit()))
                .ok_or_else(bad)?;
        }
        if !out.iter().any(|o| o == item) {
            out.push(item.to_string());
        }
    }
    Ok(out)
}

/// One request and limit pair (cpu or memory), with the annotations that set them.
struct Pair<'a> {
    request: (&'static str, &'a mut Option<String>, bool),
    limit: (&'static str, &'a mut Option<String>, bool),
}

impl Pair<'_> {
    /// A request above its limit would make the API server refuse the pod. A default
    /// gives way to an annotation; two annotations that disagree are an error.
    fn reconcile(self) -> Result<(), Invalid> {
        let (req_name, request, req_set) = self.request;
        let (lim_name, limit, lim_set) = self.limit;
        let (Some(req), Some(lim)) = (request.as_ref(), limit.as_ref()) else {
            return Ok(());
        };
        let (r, l) = (
            quantity::parse(req).unwrap_or(0.0),
            quantity::parse(lim).unwrap_or(f64::MAX),
        );
        if r <= l {
            return Ok(());
        }
        match (req_set, lim_set) {
            (true, true) => Err(Invalid {
                annotation: req_name,
                value: req.clone(),
                reason: format!("more than {lim_name} ({lim})"),
            }),
            (false, _) => {
                *request = limit.clone();
                Ok(())
            }
            (true, false) => {
                *limit = request.clone();
                Ok(())
            }
        }
    }
}

/// The overrides of a pod with these annotations, in a namespace whose
/// `tandem.io/inbound-policy` annotation is `namespace_inbound_policy`.
pub fn parse(
    annotations: &Map<String, Value>,
    namespace_inbound_policy: Option<&str>,
    config: &InjectConfig,
) -> Result<Overrides, Invalid> {
    let get = |name: &'static str| -> Result<Option<&str>, Invalid> {
        match annotations.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => Err(Invalid {
                annotation: name,
                value: other.to_string(),
                reason: "annotation values are strings".into(),
            }),
        }
    };
    let invalid = |name: &'static str, value: &str| {
        let value = value.to_string();
        move |reason: String| Invalid {
            annotation: name,
            value,
            reason,
        }
    };
    let mut overrides = Overrides {
        skip_inbound_ports: Vec::new(),
        skip_outbound_ports: Vec::new(),
        skip_outbound_cidrs: Vec::new(),
        log_level: config.log_level.clone(),
        resources: config.proxy_resources.clone(),
        inbound_policy: InboundPolicy::default(),
        trace_sample_ratio: config.trace_sample_ratio.clone(),
    };
    if let Some(v) = get(TRACE_SAMPLE_RATIO)? {
        let v = v.trim();
        sample_ratio(v).map_err(invalid(TRACE_SAMPLE_RATIO, v))?;
        overrides.trace_sample_ratio = v.to_string();
    }
    if let Some(v) = get(INBOUND_POLICY)? {
        overrides.inbound_policy = InboundPolicy::parse(v).map_err(invalid(INBOUND_POLICY, v))?;
    } else if let Some(v) = namespace_inbound_policy {
        overrides.inbound_policy = InboundPolicy::parse(v)
            .map_err(|e| format!("on the namespace: {e}"))
            .map_err(invalid(INBOUND_POLICY, v))?;
    }
    if let Some(v) = get(SKIP_INBOUND_PORTS)? {
        overrides.skip_inbound_ports = ports(v).map_err(invalid(SKIP_INBOUND_PORTS, v))?;
    }
    if let Some(v) = get(SKIP_OUTBOUND_PORTS)? {
        overrides.skip_outbound_ports = ports(v).map_err(invalid(SKIP_OUTBOUND_PORTS, v))?;
    }
    if let Some(v) = get(SKIP_OUTBOUND_CIDRS)? {
        overrides.skip_outbound_cidrs = cidrs(v).map_err(invalid(SKIP_OUTBOUND_CIDRS, v))?;
    }
    if let Some(v) = get(PROXY_LOG_LEVEL)? {
        log_level(v).map_err(invalid(PROXY_LOG_LEVEL, v))?;
        overrides.log_level = v.to_string();
    }
    let r = &mut overrides.resources;
    let mut set = [false; 4];
    for (i, (name, slot)) in [
        (PROXY_CPU_REQUEST, &mut r.cpu_request),
        (PROXY_MEMORY_REQUEST, &mut r.memory_request),
        (PROXY_CPU_LIMIT, &mut r.cpu_limit),
        (PROXY_MEMORY_LIMIT, &mut r.memory_limit),
    ]
    .into_iter()
    .enumerate()
    {
        if let Some(v) = get(name)? {
            let v = v.trim();
            quantity::parse(v).map_err(invalid(name, v))?;
            *slot = Some(v.to_string());
            set[i] = true;
        }
    }
    Pair {
        request: (PROXY_CPU_REQUEST, &mut r.cpu_request, set[0]),
        limit: (PROXY_CPU_LIMIT, &mut r.cpu_limit, set[2]),
    }
    .reconcile()?;
    Pair {
        request: (PROXY_MEMORY_REQUEST, &mut r.memory_request, set[1]),
        limit: (PROXY_MEMORY_LIMIT, &mut r.memory_limit, set[3]),
    }
    .reconcile()?;
    Ok(overrides)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn of(annotations: Value) -> Result<Overrides, Invalid> {
        parse(
            annotations.as_object().unwrap(),
            None,
            &InjectConfig::default(),
        )
    }

    #[test]
    fn none_gives_the_defaults() {
        let o = of(json!({})).unwrap();
        assert!(o.skip_inbound_ports.is_empty() && o.skip_outbound_cidrs.is_empty());
        assert_eq!(o.log_level, "info");
        assert_eq!(o.resources, InjectConfig::default().proxy_resources);
    }

    #[test]
    fn the_sample_ratio_of_the_pod_else_the_flag() {
        assert_eq!(of(json!({})).unwrap().trace_sample_ratio, "0.01");
        let o = of(json!({TRACE_SAMPLE_RATIO: " 0.5 "})).unwrap();
        assert_eq!(o.trace_sample_ratio, "0.5");
    }

    #[test]
    fn ports_and_cidrs() {
        let o = of(json!({
            SKIP_INBOUND_PORTS: "22, 9090,22",
            SKIP_OUTBOUND_PORTS: "5432,",
            SKIP_OUTBOUND_CIDRS: "10.96.0.1/32, fd00::/8,169.254.169.254",
        }))
        .unwrap();
        assert_eq!(o.skip_inbound_ports, [22, 9090]);
        assert_eq!(o.skip_outbound_ports, [5432]);
        assert_eq!(
            o.skip_outbound_cidrs,
            ["10.96.0.1/32", "fd00::/8", "169.254.169.254"]
        );
    }

    #[test]
    fn bad_values_name_their_annotation() {
        for (annotation, value) in [
            (SKIP_INBOUND_PORTS, json!("abc")),
            (SKIP_INBOUND_PORTS, json!("0")),
            (SKIP_OUTBOUND_PORTS, json!("80-90")),
            (SKIP_OUTBOUND_PORTS, json!("65536")),
            (SKIP_OUTBOUND_CIDRS, json!("10.0.0.0/33")),
            (SKIP_OUTBOUND_CIDRS, json!("example.com")),
            (PROXY_LOG_LEVEL, json!("")),
            (PROXY_LOG_LEVEL, json!("info debug")),
            (PROXY_CPU_REQUEST, json!("lots")),
            (PROXY_MEMORY_LIMIT, json!("-1Mi")),
            (SKIP_INBOUND_PORTS, json!(8080)),
            (INBOUND_POLICY, json!("strict")),
            (INBOUND_POLICY, json!(true)),
            (TRACE_SAMPLE_RATIO, json!("1.5")),
            (TRACE_SAMPLE_RATIO, json!("all")),
        ] {
            let error = of(json!({ annotation: value })).unwrap_err();
            assert_eq!(error.annotation, annotation, "{error}");
            assert!(error.to_string().starts_with(annotation), "{error}");
        }
        assert_eq!(
            of(json!({SKIP_INBOUND_PORTS: "abc"}))
                .unwrap_err()
                .to_string(),
            "tandem.io/skip-inbound-ports: \"abc\": not a list of ports (\"abc\": use ports 1-65535, comma separated)"
        );
    }

    #[test]
    fn resources_and_their_limits() {
        let o = of(
            json!({PROXY_CPU_REQUEST: "100m", PROXY_CPU_LIMIT: "1", PROXY_MEMORY_REQUEST: "64Mi"}),
        )
        .unwrap();
        assert_eq!(o.resources.cpu_request.as_deref(), Some("100m"));
        assert_eq!(o.resources.cpu_limit.as_deref(), Some("1"));
        assert_eq!(o.resources.memory_request.as_deref(), Some("64Mi"));
        assert_eq!(o.resources.memory_limit.as_deref(), Some("128Mi"));
        // A limit below the default request: the request follows it down.
        let o = of(json!({PROXY_MEMORY_LIMIT: "10Mi"})).unwrap();
        assert_eq!(o.resources.memory_request.as_deref(), Some("10Mi"));
        // A request above the default limit: the limit follows it up.
        let o = of(json!({PROXY_MEMORY_REQUEST: "1Gi"})).unwrap();
        assert_eq!(o.resources.memory_limit.as_deref(), Some("1Gi"));
        // Both set, and at odds.
        let e = of(json!({PROXY_CPU_REQUEST: "2", PROXY_CPU_LIMIT: "500m"})).unwrap_err();
        assert_eq!(e.annotation, PROXY_CPU_REQUEST);
        assert!(e.reason.contains(PROXY_CPU_LIMIT), "{e}");
    }

    #[test]
    fn inbound_policy_of_the_pod_else_its_namespace() {
        let policy = |pod: Value, ns: Option<&str>| {
            parse(pod.as_object().unwrap(), ns, &InjectConfig::default()).map(|o| o.inbound_policy)
        };
        assert_eq!(policy(json!({}), None), Ok(InboundPolicy::Permissive));
        assert_eq!(
            policy(json!({INBOUND_POLICY: "mtls-only"}), None),
            Ok(InboundPolicy::MtlsOnly)
        );
        assert_eq!(
            policy(json!({}), Some("mtls-only")),
            Ok(InboundPolicy::MtlsOnly)
        );
        assert_eq!(
            policy(json!({INBOUND_POLICY: " permissive "}), Some("mtls-only")),
            Ok(InboundPolicy::Permissive),
            "the pod's wins"
        );
        let e = policy(json!({}), Some("strict")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tandem.io/inbound-policy: \"strict\": on the namespace: use mtls-only or permissive"
        );
        let e = policy(json!({INBOUND_POLICY: "strict"}), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tandem.io/inbound-policy: \"strict\": use mtls-only or permissive"
        );
    }
}
