//! The mutation: a pod (or a pod template: `metadata` and `spec`) in, a JSON patch
//! (RFC 6902) or the reason it is left alone out. Pure: the webhook and `tandem
//! inject` call the same function, so a file injected offline gives the very pod
//! the webhook would have made.
//!
//! Rules, in order:
//! 1. `tandem.io/inject: disabled` (annotation or label) on the pod: left alone.
//! 2. a pod that already has the init container or the proxy: left alone (injecting
//!    twice changes nothing).
//! 3. enabled when its namespace is labelled `tandem.io/inject: enabled` or the pod
//!    says `enabled` (annotation or label); any other value of `tandem.io/inject` is
//!    an invalid annotation.
//! 4. `hostNetwork` pods are left alone: their rules would capture the node's traffic.
//! 5. an invalid override annotation: left alone (unmeshed), with a warning naming it.
//! 6. otherwise: `tandem-init` and the `tandem-proxy` native sidecar in front of the
//!    pod's own init containers (so those already go through the proxy), the
//!    `tandem-xtables` volume, the proxy's identity (a projected ServiceAccount token
//!    for audience `tandem`, the trust roots ConfigMap, and where to ask for its
//!    certificate), and `tandem.io/injected`.

use std::fmt;

use json_patch::Patch;
use serde_json::{Map, Value, json};

use super::config::{InjectConfig, Resources};
use super::overrides::{self, Invalid, Overrides};
use super::{
    IDENTITY_TOKEN_DIR, IDENTITY_TOKEN_SECONDS, IDENTITY_TOKEN_VOLUME, INIT_CONTAINER, INJECT,
    INJECTED, PROXY_CONTAINER, TRUST_ROOTS_DIR, TRUST_ROOTS_VOLUME, VERSION, XTABLES_VOLUME,
};
use crate::identity::TRUST_ROOTS;
use crate::identity::review::AUDIENCE;

/// What the mutation knows besides the pod.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The pod's namespace is labelled `tandem.io/inject: enabled`.
    pub namespace_enabled: bool,
    /// The namespace's `tandem.io/inbound-policy` annotation (a pod's own wins).
    pub namespace_inbound_policy: Option<&'a str>,
    pub config: &'a InjectConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Apply this to the pod (or template).
    Inject(Patch),
    /// Leave the pod as it is.
    Skip(Skipped),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// `tandem.io/inject: disabled` on the pod (its annotation or its label).
    OptedOut,
    /// Neither its namespace nor the pod asks for injection.
    NotEnabled,
    /// It has Tandem's containers already.
    AlreadyInjected,
    /// `hostNetwork: true`.
    HostNetwork,
    /// An annotation that cannot be used: the pod stays unmeshed, and is told why.
    Invalid(Invalid),
    /// Not a pod: no `spec.containers` list.
    NotAPod(String),
}

impl Skipped {
    /// A pod that asked to be meshed and is not, for a reason it should be told.
    pub fn warning(&self) -> Option<String> {
        match self {
            Skipped::Invalid(invalid) => Some(format!("tandem: not meshed: {invalid}")),
            _ => None,
        }
    }
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skipped::OptedOut => write!(f, "opted out ({INJECT}: disabled)"),
            Skipped::NotEnabled => write!(f, "injection is not enabled for it"),
            Skipped::AlreadyInjected => write!(f, "already injected"),
            Skipped::HostNetwork => write!(f, "hostNetwork pods are not meshed"),
            Skipped::Invalid(invalid) => write!(f, "invalid annotation {invalid}"),
            Skipped::NotAPod(why) => write!(f, "not a pod: {why}"),
        }
    }
}

fn string_at<'a>(object: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(object, |v, key| v.get(key))
}

/// `tandem.io/inject` of the pod: the annotation, else the label.
fn inject_value(pod: &Value) -> Option<&Value> {
    string_at(pod, &["metadata", "annotations", INJECT])
        .or_else(|| string_at(pod, &["metadata", "labels", INJECT]))
}

fn has_container(spec: &Value, list: &str, name: &str) -> bool {
    spec.get(list).and_then(Value::as_array).is_some_and(|cs| {
        cs.iter()
            .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
    })
}

/// Whether the pod carries Tandem's containers.
pub fn is_injected(pod: &Value) -> bool {
    let Some(spec) = pod.get("spec") else {
        return false;
    };
    [INIT_CONTAINER, PROXY_CONTAINER].iter().any(|name| {
        has_container(spec, "initContainers", name) || has_container(spec, "containers", name)
    })
}

/// Decides, and makes the patch.
pub fn inject(pod: &Value, context: Context<'_>) -> Outcome {
    match decide(pod, context) {
        Ok(overrides) => Outcome::Inject(patch(pod, context.config, &overrides)),
        Err(skipped) => Outcome::Skip(skipped),
    }
}

fn decide(pod: &Value, context: Context<'_>) -> Result<Overrides, Skipped> {
    let Some(spec) = pod.get("spec").filter(|s| s.is_object()) else {
        return Err(Skipped::NotAPod("no spec".into()));
    };
    if !spec.get("containers").is_some_and(Value::is_array) {
        return Err(Skipped::NotAPod("no spec.containers list".into()));
    }
    // Either the annotation or the label may opt the pod out.
    fn says(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str).map(str::trim)
    }
    let annotation = says(string_at(pod, &["metadata", "annotations", INJECT]));
    let label = says(string_at(pod, &["metadata", "labels", INJECT]));
    if annotation == Some("disabled") || label == Some("disabled") {
        return Err(Skipped::OptedOut);
    }
    if is_injected(pod) {
        return Err(Skipped::AlreadyInjected);
    }
    let pod_enabled = match inject_value(pod) {
        None => false,
        Some(Value::String(s)) if s.trim() == "enabled" => true,
        Some(other) => {
            return Err(Skipped::Invalid(Invalid {
                annotation: INJECT,
                value: other
                    .as_str()
                    .map_or_else(|| other.to_string(), str::to_string),
                reason: "use enabled or disabled".into(),
            }));
        }
    };
    if !(context.namespace_enabled || pod_enabled) {
        return Err(Skipped::NotEnabled);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(Skipped::HostNetwork);
    }
    let empty = Map::new();
    let annotations = string_at(pod, &["metadata", "annotations"])
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    overrides::parse(
        annotations,
        context.namespace_inbound_policy,
        context.config,
    )
    .map_err(Skipped::Invalid)
}

/// `/` and `~` escaped for a JSON pointer.
fn pointer_token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn resources(r: &Resources) -> Value {
    let pairs = |cpu: &Option<String>, memory: &Option<String>| -> Map<String, Value> {
        [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_string(), json!(v.as_ref()?))))
            .collect()
    };
    let requests = pairs(&r.cpu_request, &r.memory_request);
    let limits = pairs(&r.cpu_limit, &r.memory_limit);
    let mut out = Map::new();
    if !limits.is_empty() {
        out.insert("limits".into(), Value::Object(limits));
    }
    if !requests.is_empty() {
        out.insert("requests".into(), Value::Object(requests));
    }
    Value::Object(out)
}

fn join<T: ToString>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// The `tandem-init` container: installs the nat rules, then exits.
pub fn init_container(config: &InjectConfig, overrides: &Overrides) -> Value {
    let mut args = vec![
        "init".to_string(),
        "--inbound-port".into(),
        config.inbound_port.to_string(),
        "--outbound-port".into(),
        config.outbound_port.to_string(),
        "--admin-port".into(),
        config.admin_port.to_string(),
        "--proxy-uid".into(),
        config.proxy_uid.to_string(),
    ];
    if !overrides.skip_inbound_ports.is_empty() {
        args.extend([
            "--skip-inbound-ports".into(),
            join(&overrides.skip_inbound_ports),
        ]);
    }
    if !overrides.skip_outbound_ports.is_empty() {
        args.extend([
            "--skip-outbound-ports".into(),
            join(&overrides.skip_outbound_ports),
        ]);
    }
    if !overrides.skip_outbound_cidrs.is_empty() {
        args.extend([
            "--skip-outbound-cidrs".into(),
            join(&overrides.skip_outbound_cidrs),
        ]);
    }
    json!({
        "name": INIT_CONTAINER,
        "image": config.init_image,
        "command": ["tandem-proxy"],
        "args": args,
        "resources": {
            "limits": {"cpu": "100m", "memory": "64Mi"},
            "requests": {"cpu": "10m", "memory": "10Mi"}
        },
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": false,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
        },
        // iptables' lock file, on a read-only root filesystem.
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
        "terminationMessagePolicy": "FallbackToLogsOnError"
    })
}

/// The proxy, as a native sidecar: an init container that keeps running, started
/// (and ready, by its startup probe) before the next init container and the app.
pub fn proxy_container(config: &InjectConfig, overrides: &Overrides, service: &str) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": config.admin_port},
            "periodSeconds": period,
            "failureThreshold": failures
        })
    };
    json!({
        "name": PROXY_CONTAINER,
        "image": config.proxy_image,
        "restartPolicy": "Always",
        "command": ["tandem-proxy"],
        "args": [
            "--outbound-listen", format!("0.0.0.0:{0},[::]:{0}", config.outbound_port),
            "--inbound-listen", format!("0.0.0.0:{0},[::]:{0}", config.inbound_port),
            "--admin", format!("0.0.0.0:{}", config.admin_port),
            "--control-plane", config.control_plane_address
        ],
        "env": [
            field("TANDEM_POD", "metadata.name"),
            field("TANDEM_NAMESPACE", "metadata.namespace"),
            field("TANDEM_NODE", "spec.nodeName"),
            field("TANDEM_SERVICE_ACCOUNT", "spec.serviceAccountName"),
            field("TANDEM_POD_IP", "status.podIP"),
            // The kubelet's probes come from the node: served in plaintext even
            // under `mtls-only`.
            field("TANDEM_HOST_IP", "status.hostIP"),
            {"name": "RUST_LOG", "value": overrides.log_level},
            // Where the proxy gets its certificate, and for which identity: the
            // ServiceAccount's, through Kubernetes' $(VAR) expansion of the two
            // variables above.
            {"name": "TANDEM_IDENTITY_ADDRESS", "value": config.identity_address},
            {"name": "TANDEM_IDENTITY_SERVER_NAME", "value": config.identity_server_name},
            {"name": "TANDEM_IDENTITY", "value": format!(
                "spiffe://{}/ns/$(TANDEM_NAMESPACE)/sa/$(TANDEM_SERVICE_ACCOUNT)",
                config.trust_domain
            )},
            {"name": "TANDEM_INBOUND_POLICY", "value": overrides.inbound_policy.as_str()},
            // Traces: where spans go, how many requests start one, and the
            // workload's name in them.
            {"name": "TANDEM_TRACE_COLLECTOR", "value": config.trace_collector},
            {"name": "TANDEM_TRACE_SAMPLE_RATIO", "value": overrides.trace_sample_ratio},
            {"name": "TANDEM_SERVICE_NAME", "value": service}
        ],
        // The proxy's defaults for --identity-token-file and --trust-roots-file.
        "volumeMounts": [
            {"name": IDENTITY_TOKEN_VOLUME, "mountPath": IDENTITY_TOKEN_DIR, "readOnly": true},
            {"name": TRUST_ROOTS_VOLUME, "mountPath": TRUST_ROOTS_DIR, "readOnly": true}
        ],
        "ports": [
            {"name": "tandem-inbound", "containerPort": config.inbound_port, "protocol": "TCP"},
            {"name": "tandem-admin", "containerPort": config.admin_port, "protocol": "TCP"}
        ],
        "startupProbe": probe("/ready", 1, 120),
        "readinessProbe": probe("/ready", 5, 3),
        "livenessProbe": probe("/live", 10, 3),
        "resources": resources(&overrides.resources),
        "securityContext": {
            "runAsUser": config.proxy_uid,
            "runAsGroup": config.proxy_uid,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        },
        "terminationMessagePolicy": "FallbackToLogsOnError"
    })
}

/// The workload's name in traces (`service.name`): the pod's
/// `app.kubernetes.io/name` or `app` label, as Istio reads them, else its pod's name
/// (through the proxy's `TANDEM_POD`, which Kubernetes expands).
fn service_name(pod: &Value) -> String {
    let labels = &pod["metadata"]["labels"];
    ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|l| labels[l].as_str().filter(|v| !v.is_empty()))
        .map_or_else(|| "$(TANDEM_POD)".to_string(), str::to_string)
}

fn patch(pod: &Value, config: &InjectConfig, overrides: &Overrides) -> Patch {
    let spec = &pod["spec"];
    let init = init_container(config, overrides);
    let proxy = proxy_container(config, overrides, &service_name(pod));
    let mut ops = Vec::new();
    if spec.get("initContainers").is_some_and(Value::is_array) {
        // Inserted at 0 in turn: init, proxy, then the pod's own.
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": proxy}));
        ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": init}));
    } else {
        ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [init, proxy]}));
    }
    // Volumes of those names already there (a pod that lost its containers) stay.
    let present = |name: &str| {
        spec.get("volumes")
            .and_then(Value::as_array)
            .is_some_and(|vs| {
                vs.iter()
                    .any(|v| v.get("name").and_then(Value::as_str) == Some(name))
            })
    };
    let volumes: Vec<Value> = volumes()
        .into_iter()
        .filter(|v| !present(v["name"].as_str().unwrap_or_default()))
        .collect();
    if spec.get("volumes").is_some_and(Value::is_array) {
        for volume in volumes {
            ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume}));
        }
    } else if !volumes.is_empty() {
        ops.push(json!({"op": "add", "path": "/spec/volumes", "value": volumes}));
    }
    match pod.get("metadata").filter(|m| m.is_object()) {
        None => ops.push(json!({"op": "add", "path": "/metadata",
                                "value": {"annotations": {INJECTED: VERSION}}})),
        Some(meta) if !meta.get("annotations").is_some_and(Value::is_object) => {
            ops.push(json!({"op": "add", "path": "/metadata/annotations",
                            "value": {INJECTED: VERSION}}));
        }
        Some(_) => ops.push(json!({"op": "add",
                                   "path": format!("/metadata/annotations/{}", pointer_token(INJECTED)),
                                   "value": VERSION})),
    }
    serde_json::from_value(Value::Array(ops)).expect("the operations are JSON patch operations")
}

/// The volumes the mutation adds: iptables' lock dir for the init container, and the
/// proxy's token (audience `tandem`, for the identity endpoint's TokenReview) and
/// trust roots (optional: the control plane copies the ConfigMap into the namespace,
/// and the kubelet fills the volume in once it exists).
pub fn volumes() -> Vec<Value> {
    vec![
        json!({"name": XTABLES_VOLUME, "emptyDir": {}}),
        json!({"name": IDENTITY_TOKEN_VOLUME, "projected": {"sources": [
            {"serviceAccountToken": {
                "audience": AUDIENCE,
                "expirationSeconds": IDENTITY_TOKEN_SECONDS,
                "path": "token"
            }}
        ]}}),
        // Its one key, ca-bundle.crt, is the file the proxy reads.
        json!({"name": TRUST_ROOTS_VOLUME, "configMap": {"name": TRUST_ROOTS, "optional": true}}),
    ]
}

/// The pod with the patch applied (what the API server stores).
pub fn apply(pod: &Value, patch: &Patch) -> Result<Value, json_patch::PatchError> {
    let mut out = pod.clone();
    json_patch::patch(&mut out, patch)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::injection::*;

    fn config() -> InjectConfig {
        InjectConfig {
            proxy_image: "proxy:test".into(),
            init_image: "init:test".into(),
            control_plane_address: "cp.example:8086".into(),
            ..InjectConfig::default()
        }
    }

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "namespace": "shop", "annotations": annotations,
                         "labels": {"app": "web"}, "x-unknown": {"kept": true}},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "app"}],
                "containers": [{"name": "web", "image": "app", "ports": [{"containerPort": 8080}]}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "somethingNew": [1, 2, 3]
            }
        })
    }

    fn run(pod: &Value, namespace_enabled: bool) -> Outcome {
        let config = config();
        inject(
            pod,
            Context {
                namespace_enabled,
                namespace_inbound_policy: None,
                config: &config,
            },
        )
    }

    /// The pod as stored: patched if injected, else as it was.
    fn stored(pod: &Value, namespace_enabled: bool) -> Value {
        match run(pod, namespace_enabled) {
            Outcome::Inject(patch) => apply(pod, &patch).expect("the patch applies"),
            Outcome::Skip(_) => pod.clone(),
        }
    }

    fn skipped(pod: &Value, namespace_enabled: bool) -> Skipped {
        match run(pod, namespace_enabled) {
            Outcome::Skip(s) => s,
            Outcome::Inject(p) => panic!("injected: {p:?}"),
        }
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }

    fn arg_after<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
        let args = container["args"].as_array().unwrap();
        let i = args.iter().position(|a| a == flag)?;
        args[i + 1].as_str()
    }

    #[test]
    fn the_service_name_in_traces_comes_from_the_app_labels() {
        let with = |labels: Value| service_name(&json!({"metadata": {"labels": labels}}));
        assert_eq!(
            with(json!({"app.kubernetes.io/name": "shop", "app": "web"})),
            "shop"
        );
        assert_eq!(with(json!({"app": "web"})), "web");
        assert_eq!(with(json!({"tier": "front"})), "$(TANDEM_POD)");
        assert_eq!(service_name(&json!({})), "$(TANDEM_POD)");
    }

    #[test]
    fn injects_in_front_of_the_pods_own_init_containers() {
        let out = stored(&pod(json!({})), true);
        let spec = &out["spec"];
        assert_eq!(
            names(&spec["initContainers"]),
            ["tandem-init", "tandem-proxy", "migrate"]
        );
        assert_eq!(names(&spec["containers"]), ["web"]);
        assert_eq!(
            names(&spec["volumes"]),
            [
                "data",
                "tandem-xtables",
                "tandem-identity-token",
                "tandem-trust-roots"
            ]
        );
        assert_eq!(out["metadata"]["annotations"][INJECTED], VERSION);
        // Unknown fields survive.
        assert_eq!(spec["somethingNew"], json!([1, 2, 3]));
        assert_eq!(out["metadata"]["x-unknown"]["kept"], true);

        let init = &spec["initContainers"][0];
        assert_eq!(init["image"], "init:test");
        assert_eq!(init["command"], json!(["tandem-proxy"]));
        assert_eq!(
            init["args"],
            json!([
                "init",
                "--inbound-port",
                "4143",
                "--outbound-port",
                "4140",
                "--admin-port",
                "4191",
                "--proxy-uid",
                "2102"
            ])
        );
        let sc = &init["securityContext"];
        assert_eq!(sc["runAsUser"], 0);
        assert_eq!(sc["runAsNonRoot"], false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(
            sc["capabilities"],
            json!({"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]})
        );
        assert_eq!(
            init["volumeMounts"],
            json!([{"name": "tandem-xtables", "mountPath": "/run"}])
        );

        let proxy = &spec["initContainers"][1];
        assert_eq!(proxy["restartPolicy"], "Always");
        assert_eq!(proxy["image"], "proxy:test");
        assert_eq!(
            proxy["args"],
            json!([
                "--outbound-listen",
                "0.0.0.0:4140,[::]:4140",
                "--inbound-listen",
                "0.0.0.0:4143,[::]:4143",
                "--admin",
                "0.0.0.0:4191",
                "--control-plane",
                "cp.example:8086"
            ])
        );
        let env: Vec<(&str, String)> = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let v = e
                    .get("value")
                    .map(|v| v.as_str().unwrap().to_string())
                    .unwrap_or_else(|| {
                        e["valueFrom"]["fieldRef"]["fieldPath"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    });
                (e["name"].as_str().unwrap(), v)
            })
            .collect();
        assert_eq!(
            env,
            [
                ("TANDEM_POD", "metadata.name".to_string()),
                ("TANDEM_NAMESPACE", "metadata.namespace".into()),
                ("TANDEM_NODE", "spec.nodeName".into()),
                ("TANDEM_SERVICE_ACCOUNT", "spec.serviceAccountName".into()),
                ("TANDEM_POD_IP", "status.podIP".into()),
                ("TANDEM_HOST_IP", "status.hostIP".into()),
                ("RUST_LOG", "info".into()),
                (
                    "TANDEM_IDENTITY_ADDRESS",
                    "tandem-identity.tandem-system.svc.cluster.local:8087".into()
                ),
                (
                    "TANDEM_IDENTITY_SERVER_NAME",
                    "tandem-identity.tandem-system.svc".into()
                ),
                (
                    "TANDEM_IDENTITY",
                    "spiffe://cluster.local/ns/$(TANDEM_NAMESPACE)/sa/$(TANDEM_SERVICE_ACCOUNT)"
                        .into()
                ),
                ("TANDEM_INBOUND_POLICY", "permissive".into()),
                (
                    "TANDEM_TRACE_COLLECTOR",
                    "jaeger.tandem-observability.svc.cluster.local:4317".into()
                ),
                ("TANDEM_TRACE_SAMPLE_RATIO", "0.01".into()),
                ("TANDEM_SERVICE_NAME", "web".into()),
            ]
        );
        // The proxy's token (audience tandem) and trust roots, read-only, at the
        // paths the proxy reads by default.
        assert_eq!(
            proxy["volumeMounts"],
            json!([
                {"name": "tandem-identity-token", "mountPath": "/var/run/secrets/tandem.io/identity", "readOnly": true},
                {"name": "tandem-trust-roots", "mountPath": "/var/run/tandem/trust-roots", "readOnly": true}
            ])
        );
        assert_eq!(
            spec["volumes"][2]["projected"]["sources"],
            json!([{"serviceAccountToken": {"audience": "tandem", "expirationSeconds": 3600, "path": "token"}}])
        );
        assert_eq!(
            spec["volumes"][3]["configMap"],
            json!({"name": "tandem-trust-roots", "optional": true})
        );
        // Only the proxy mounts them.
        assert!(init["volumeMounts"].as_array().unwrap().len() == 1);
        assert_eq!(names(&proxy["ports"]), ["tandem-inbound", "tandem-admin"]);
        assert_eq!(
            proxy["startupProbe"]["httpGet"],
            json!({"path": "/ready", "port": 4191})
        );
        assert_eq!(proxy["startupProbe"]["periodSeconds"], 1);
        assert_eq!(proxy["startupProbe"]["failureThreshold"], 120);
        assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
        let sc = &proxy["securityContext"];
        assert_eq!(
            (sc["runAsUser"].clone(), sc["runAsGroup"].clone()),
            (json!(2102), json!(2102))
        );
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
        assert_eq!(sc["seccompProfile"], json!({"type": "RuntimeDefault"}));
        assert!(sc.get("capabilities").unwrap().get("add").is_none());
        assert_eq!(
            proxy["resources"],
            json!({"requests": {"cpu": "10m", "memory": "20Mi"}, "limits": {"memory": "128Mi"}})
        );
    }

    #[test]
    fn only_the_init_container_has_net_admin() {
        let out = stored(&pod(json!({})), true);
        let with_caps: Vec<&str> = out["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(out["spec"]["containers"].as_array().unwrap())
            .filter(|c| !c["securityContext"]["capabilities"]["add"].is_null())
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(with_caps, ["tandem-init"]);
    }

    #[test]
    fn injecting_an_injected_pod_changes_nothing() {
        for p in [
            pod(json!({})),
            pod(json!({SKIP_INBOUND_PORTS: "22", PROXY_LOG_LEVEL: "debug"})),
            json!({"spec": {"containers": [{"name": "a"}]}}),
            json!({"metadata": {}, "spec": {"containers": [], "initContainers": []}}),
        ] {
            let once = stored(&p, true);
            assert_ne!(once, p);
            assert_eq!(stored(&once, true), once);
            assert_eq!(skipped(&once, true), Skipped::AlreadyInjected);
            // Even where injection is not enabled, or with an annotation removed.
            assert_eq!(stored(&once, false), once);
        }
    }

    #[test]
    fn a_pod_without_lists_gets_them() {
        let p = json!({"spec": {"containers": [{"name": "a", "image": "x"}]}});
        let out = stored(&p, true);
        assert_eq!(
            names(&out["spec"]["initContainers"]),
            ["tandem-init", "tandem-proxy"]
        );
        assert_eq!(
            names(&out["spec"]["volumes"]),
            [
                "tandem-xtables",
                "tandem-identity-token",
                "tandem-trust-roots"
            ]
        );
        assert_eq!(out["metadata"]["annotations"], json!({INJECTED: VERSION}));
        // A volume of that name already there is not added twice.
        let p = json!({"metadata": {"annotations": null},
                       "spec": {"containers": [], "volumes": [{"name": "tandem-xtables", "emptyDir": {}}]}});
        let out = stored(&p, true);
        assert_eq!(
            names(&out["spec"]["volumes"]),
            [
                "tandem-xtables",
                "tandem-identity-token",
                "tandem-trust-roots"
            ]
        );
        assert_eq!(out["metadata"]["annotations"], json!({INJECTED: VERSION}));
    }

    #[test]
    fn opt_in_and_opt_out() {
        // Namespace enabled: injected unless the pod says disabled.
        assert!(matches!(run(&pod(json!({})), true), Outcome::Inject(_)));
        assert_eq!(
            skipped(&pod(json!({INJECT: "disabled"})), true),
            Skipped::OptedOut
        );
        let mut labelled = pod(json!({}));
        labelled["metadata"]["labels"][INJECT] = json!("disabled");
        assert_eq!(skipped(&labelled, true), Skipped::OptedOut);
        // Disabled by either wins over enabled by the other.
        let mut both = pod(json!({INJECT: "enabled"}));
        both["metadata"]["labels"][INJECT] = json!("disabled");
        assert_eq!(skipped(&both, true), Skipped::OptedOut);
        // Namespace not enabled: only a pod that asks.
        assert_eq!(skipped(&pod(json!({})), false), Skipped::NotEnabled);
        assert!(matches!(
            run(&pod(json!({INJECT: "enabled"})), false),
            Outcome::Inject(_)
        ));
        let mut labelled = pod(json!({}));
        labelled["metadata"]["labels"][INJECT] = json!("enabled");
        assert!(matches!(run(&labelled, false), Outcome::Inject(_)));
        // Anything else is a mistake to point out.
        match skipped(&pod(json!({INJECT: "yes"})), true) {
            Skipped::Invalid(i) => assert_eq!(i.annotation, INJECT),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn host_network_and_non_pods_are_left_alone() {
        let mut p = pod(json!({}));
        p["spec"]["hostNetwork"] = json!(true);
        assert_eq!(skipped(&p, true), Skipped::HostNetwork);
        assert!(matches!(
            skipped(&json!({"metadata": {}}), true),
            Skipped::NotAPod(_)
        ));
        assert!(matches!(
            skipped(&json!({"spec": {"containers": 3}}), true),
            Skipped::NotAPod(_)
        ));
        assert!(matches!(skipped(&json!("pod"), true), Skipped::NotAPod(_)));
    }

    #[test]
    fn every_annotation() {
        let p = pod(json!({
            SKIP_INBOUND_PORTS: "22,9090",
            SKIP_OUTBOUND_PORTS: "5432",
            SKIP_OUTBOUND_CIDRS: "10.96.0.1/32,fd00::/8",
            PROXY_LOG_LEVEL: "debug,h2=info",
            PROXY_CPU_REQUEST: "50m",
            PROXY_MEMORY_REQUEST: "32Mi",
            PROXY_CPU_LIMIT: "1",
            PROXY_MEMORY_LIMIT: "256Mi",
            INBOUND_POLICY: "mtls-only",
        }));
        let out = stored(&p, true);
        let init = &out["spec"]["initContainers"][0];
        assert_eq!(arg_after(init, "--skip-inbound-ports"), Some("22,9090"));
        assert_eq!(arg_after(init, "--skip-outbound-ports"), Some("5432"));
        assert_eq!(
            arg_after(init, "--skip-outbound-cidrs"),
            Some("10.96.0.1/32,fd00::/8")
        );
        let proxy = &out["spec"]["initContainers"][1];
        let rust_log = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "RUST_LOG")
            .unwrap();
        assert_eq!(rust_log["value"], "debug,h2=info");
        let policy = proxy["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "TANDEM_INBOUND_POLICY")
            .unwrap();
        assert_eq!(policy["value"], "mtls-only");
        assert_eq!(
            proxy["resources"],
            json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}})
        );
        // The pod's own annotations are kept.
        assert_eq!(
            out["metadata"]["annotations"][SKIP_INBOUND_PORTS],
            "22,9090"
        );
    }

    #[test]
    fn bad_annotations_leave_the_pod_unmeshed_with_a_warning() {
        for (annotation, value) in [
            (SKIP_INBOUND_PORTS, "abc"),
            (SKIP_OUTBOUND_PORTS, "1,2,x"),
            (SKIP_OUTBOUND_CIDRS, "10.0.0.0/40"),
            (PROXY_LOG_LEVEL, "a b"),
            (PROXY_CPU_REQUEST, "fast"),
            (PROXY_MEMORY_REQUEST, "1MB"),
            (PROXY_CPU_LIMIT, "-1"),
            (PROXY_MEMORY_LIMIT, ""),
            (INBOUND_POLICY, "strict"),
        ] {
            let p = pod(json!({ annotation: value }));
            let s = skipped(&p, true);
            let warning = s.warning().expect("a warning");
            assert!(
                warning.contains(&format!("{annotation}: {value:?}")),
                "{warning}"
            );
            assert_eq!(stored(&p, true), p, "never half-patched");
        }
    }

    #[test]
    fn the_namespace_inbound_policy_and_the_trust_domain() {
        let config = InjectConfig {
            trust_domain: "prod.example".into(),
            ..config()
        };
        let policy_of = |ns_policy: Option<&str>| {
            let context = Context {
                namespace_enabled: true,
                namespace_inbound_policy: ns_policy,
                config: &config,
            };
            match inject(&pod(json!({})), context) {
                Outcome::Inject(patch) => {
                    let out = apply(&pod(json!({})), &patch).unwrap();
                    let env = out["spec"]["initContainers"][1]["env"].clone();
                    let value = |name: &str| {
                        env.as_array()
                            .unwrap()
                            .iter()
                            .find(|e| e["name"] == name)
                            .unwrap()["value"]
                            .as_str()
                            .unwrap()
                            .to_string()
                    };
                    assert!(value("TANDEM_IDENTITY").starts_with("spiffe://prod.example/ns/"));
                    Ok(value("TANDEM_INBOUND_POLICY"))
                }
                Outcome::Skip(s) => Err(s),
            }
        };
        assert_eq!(policy_of(None), Ok("permissive".into()));
        assert_eq!(policy_of(Some("mtls-only")), Ok("mtls-only".into()));
        let Err(skipped) = policy_of(Some("nope")) else {
            panic!("a bad namespace annotation leaves the pod unmeshed")
        };
        let warning = skipped.warning().unwrap();
        assert!(
            warning.contains("tandem.io/inbound-policy: \"nope\": on the namespace"),
            "{warning}"
        );
    }
}
