//! Sidecar injection in the real cluster: `deploy/` as the API server validates and
//! stores it, and the webhook called by the API server itself.
//!
//! The control plane runs on this host (`--source kubernetes`) with exactly the rights
//! `deploy/` gives it (its ClusterRole, with the webhook configuration's name made the
//! test's, and its Role, in the test's namespace), through a token the API server
//! minted. Its webhook configuration is `deploy/`'s own, pointed at
//! `https://127.0.0.1:PORT/mutate` (a Service cannot be reached: there is no
//! kube-proxy), named and selecting for the test's namespace only; its `caBundle` is
//! left empty for the control plane to fill. Tests that label namespaces for
//! injection or install `deploy/` run one at a time ([`CLUSTER_WIDE`]): the webhook
//! configuration of `deploy/` matches every enabled namespace, and the unmeshed-pod
//! count covers all of them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tandem::process::{Options, Spawned, spawn_with};

use crate::cluster::{CLUSTER_STEP, Cluster, Namespace, cluster, name};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(400);
pub const PROXY_IMAGE: &str = "tandem-proxy:e2e";
pub const INIT_IMAGE: &str = "tandem-init:e2e";

/// Held by every test that labels a namespace for injection or installs `deploy/`.
pub static CLUSTER_WIDE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The objects of a manifest file, as kubectl reads it (client-side, no cluster).
async fn objects_of(cluster: &Cluster, file: &str) -> Vec<Value> {
    let path = repo().join(file).display().to_string();
    let said = cluster
        .kubectl_ok(
            &["create", "--dry-run=client", "-o", "json", "-f", &path],
            None,
        )
        .await;
    serde_json::Deserializer::from_str(&said.stdout)
        .into_iter::<Value>()
        .map(|o| o.expect("kubectl prints JSON"))
        .collect()
}

/// Gives ServiceAccount `tandem-control-plane` of `ns` exactly `deploy/`'s rights (its
/// ClusterRole, named `config` and with the webhook configuration's name made
/// `config` too, and its Role, in `ns`, which is the control plane's namespace here)
/// and writes a kubeconfig with a token the API server minted for it.
pub async fn control_plane_kubeconfig(ns: &Namespace, config: &str) -> PathBuf {
    let cluster = ns.cluster();
    // deploy/'s rules: its ClusterRole (for this test's configuration name) and
    // its Role (in this namespace, which is the control plane's here).
    let rbac = objects_of(cluster, "deploy/control-plane/rbac.yaml").await;
    let of = |kind: &str| {
        rbac.iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("deploy/control-plane/rbac.yaml has a {kind}"))["rules"]
            .clone()
    };
    let mut cluster_rules = of("ClusterRole");
    for rule in cluster_rules.as_array_mut().unwrap() {
        if rule["resourceNames"] == json!(["tandem-injector"]) {
            rule["resourceNames"] = json!([config]);
        }
    }
    let sa =
        json!([{"kind": "ServiceAccount", "name": "tandem-control-plane", "namespace": ns.name()}]);
    cluster
        .apply(&[
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "tandem-control-plane", "namespace": ns.name()}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": config}, "rules": cluster_rules}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": config},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": config},
                   "subjects": sa}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": "tandem-control-plane", "namespace": ns.name()},
                   "rules": of("Role")}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "tandem-control-plane", "namespace": ns.name()},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tandem-control-plane"},
                   "subjects": sa}),
        ])
        .await;
    ns.account_kubeconfig("tandem-control-plane", &format!("injector-{}", ns.name()))
        .await
}

/// A metric of an admin endpoint: the sum of its series whose labels include
/// `labels` (`None`: no such series, or no answer).
pub async fn metric(admin: std::net::SocketAddr, name: &str, labels: &str) -> Option<f64> {
    samples(&metrics_page(admin).await?, name, labels)
}

/// A control plane serving the webhook for one namespace, as `deploy/` runs it.
pub struct Injector {
    pub cp: Spawned,
    pub port: u16,
    /// Where the control plane serves discovery (and injected proxies dial).
    pub discovery: String,
    /// Where it serves proxies' certificates (and injected proxies ask).
    pub identity: String,
    /// The MutatingWebhookConfiguration (and ClusterRole) of this test.
    pub config: String,
    /// More control-plane flags, for restarts too.
    flags: Vec<String>,
    namespace: String,
    kubeconfig: PathBuf,
    cluster: &'static Cluster,
}

impl Injector {
    /// Labels `ns` for injection, gives the control plane `deploy/`'s rights, starts it
    /// and installs the webhook configuration; returns once the API server's calls
    /// inject (a server-side dry run of a pod comes back injected).
    pub async fn start(ns: &Namespace) -> Injector {
        Self::start_with(ns, None).await
    }

    /// As [`Injector::start`]; with `discovery`, the control plane also serves
    /// discovery there, and injected proxies are told to dial it (pods the node agent
    /// runs reach the host at their gateway; there is no cluster DNS).
    pub async fn start_with(ns: &Namespace, discovery: Option<Ipv4Addr>) -> Injector {
        Self::start_with_flags(ns, discovery, &[]).await
    }

    /// As [`Injector::start_with`], with more control-plane flags (kept for restarts).
    pub async fn start_with_flags(
        ns: &Namespace,
        discovery: Option<Ipv4Addr>,
        flags: &[&str],
    ) -> Injector {
        let cluster = ns.cluster();
        let config = format!("tandem-injector-{}", ns.name());
        ns.kubectl(&["label", "namespace", ns.name(), "tandem.io/inject=enabled"])
            .await;

        let kubeconfig = control_plane_kubeconfig(ns, &config).await;

        // Ports from the OS (held together, so they differ), released for the control
        // plane to bind: injected pods must be told them before it starts.
        let (discovery, identity) = match discovery {
            Some(ip) => {
                let probes = [(); 2]
                    .map(|()| std::net::TcpListener::bind((ip, 0)).expect("a port on the gateway"));
                let [d, i] = probes.map(|p| p.local_addr().unwrap().to_string());
                (d, i)
            }
            None => ("127.0.0.1:0".to_string(), "127.0.0.1:0".to_string()),
        };
        let mut injector = Injector {
            cp: start_control_plane(
                &kubeconfig,
                ns.name(),
                &config,
                "127.0.0.1:0",
                &discovery,
                &identity,
                flags,
            )
            .await,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            discovery,
            identity,
            port: 0,
            config: config.clone(),
            namespace: ns.name().to_string(),
            kubeconfig,
            cluster,
        };
        injector.port = injector.cp.addr("webhook").port();

        // deploy/'s webhook configuration, for this test: its URL, name and namespace.
        let mut webhook = objects_of(cluster, "deploy/control-plane/webhook.yaml")
            .await
            .into_iter()
            .find(|o| o["kind"] == "MutatingWebhookConfiguration")
            .expect("deploy/control-plane/webhook.yaml has the configuration");
        webhook["metadata"] = json!({"name": config});
        webhook["webhooks"][0]["clientConfig"] =
            json!({"url": format!("https://127.0.0.1:{}/mutate", injector.port)});
        webhook["webhooks"][0]["namespaceSelector"] = json!({"matchLabels": {
            "kubernetes.io/metadata.name": ns.name(), "tandem.io/inject": "enabled"}});
        cluster.apply(&[webhook]).await;

        // The control plane fills the caBundle in; then the API server calls it.
        let bundle = injector.ca_bundle().await;
        let secret = injector.secret().await;
        assert_eq!(secret["type"], "kubernetes.io/tls");
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(
                secret["data"][key].is_string(),
                "the Secret has {key}: {secret}"
            );
        }
        assert_eq!(
            secret["data"]["ca.crt"].as_str(),
            Some(bundle.as_str()),
            "the caBundle is the Secret's CA"
        );
        eventually(
            CLUSTER_STEP,
            "the API server to call the webhook",
            || async {
                let pod = pod_object("probe", json!({}), json!({}));
                let said = cluster
                    .run_kubectl(
                        &[
                            "-n",
                            ns.name(),
                            "create",
                            "--dry-run=server",
                            "-o",
                            "json",
                            "-f",
                            "-",
                        ],
                        Some(pod.to_string().as_bytes()),
                    )
                    .await;
                let stored: Value = serde_json::from_str(&said.stdout).ok()?;
                is_injected(&stored).then_some(())
            },
        )
        .await;
        injector
    }

    /// The configuration's caBundle (base64), once the control plane has set it.
    pub async fn ca_bundle(&self) -> String {
        let cluster = self.cluster;
        let config = self.config.clone();
        eventually(
            CLUSTER_STEP,
            "the control plane to set the caBundle",
            || {
                let config = config.clone();
                async move {
                    let said = cluster
                        .run_kubectl(
                            &["get", "mutatingwebhookconfiguration", &config, "-o", "json"],
                            None,
                        )
                        .await;
                    let object: Value = serde_json::from_str(&said.stdout).ok()?;
                    object["webhooks"][0]["clientConfig"]["caBundle"]
                        .as_str()
                        .filter(|b| !b.is_empty())
                        .map(str::to_string)
                }
            },
        )
        .await
    }

    /// The webhook's Secret (JSON, data base64).
    pub async fn secret(&self) -> Value {
        let said = self
            .cluster
            .kubectl_ok(
                &[
                    "-n",
                    &self.namespace,
                    "get",
                    "secret",
                    "tandem-webhook-tls",
                    "-o",
                    "json",
                ],
                None,
            )
            .await;
        serde_json::from_str(&said.stdout).expect("a Secret")
    }

    /// A metric of the control plane's admin endpoint (the sum of its series).
    pub async fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        metric(self.cp.addr("admin"), name, labels).await
    }

    /// Stops the control plane (the webhook goes with it).
    pub async fn stop(&mut self) {
        self.cp.kill().await;
    }

    /// Starts it again, on the same webhook port.
    pub async fn restart(&mut self) {
        let listen = format!("127.0.0.1:{}", self.port);
        self.cp = start_control_plane(
            &self.kubeconfig,
            &self.namespace,
            &self.config,
            &listen,
            &self.discovery,
            &self.identity,
            &self.flags.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .await;
        assert_eq!(self.cp.addr("webhook").port(), self.port);
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        delete_cluster_scoped(
            self.cluster,
            &[
                "mutatingwebhookconfiguration",
                "clusterrolebinding",
                "clusterrole",
            ],
            &self.config,
        );
    }
}

/// Deletes objects of these cluster-scoped kinds named `name` (not deleted with a
/// test's namespace), without waiting; for `Drop`s, so it blocks and never panics.
pub fn delete_cluster_scoped(cluster: &Cluster, kinds: &[&str], name: &str) {
    for kind in kinds {
        cluster.kubectl_quietly(&["delete", kind, name, "--ignore-not-found", "--wait=false"]);
    }
}

/// The control plane as `deploy/` runs it, with the credentials of `kubeconfig`, in
/// `namespace` (its Secrets', ConfigMap's and webhook's): the webhook on `webhook`
/// (or `off`), discovery on `discovery`, the identity endpoint on `identity`, then
/// `extra` flags.
pub async fn start_control_plane(
    kubeconfig: &Path,
    namespace: &str,
    config: &str,
    webhook: &str,
    discovery: &str,
    identity: &str,
    extra: &[&str],
) -> Spawned {
    let kubeconfig = kubeconfig.display().to_string();
    let identity_ip = identity
        .rsplit_once(':')
        .map(|(ip, _)| ip)
        .unwrap_or_default();
    let mut args = vec![
        "control-plane",
        "--source",
        "kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--listen",
        discovery,
        "--admin",
        "127.0.0.1:0",
        "--webhook-listen",
        webhook,
        "--webhook-cert-san",
        "127.0.0.1",
        "--webhook-namespace",
        namespace,
        "--webhook-config-name",
        config,
        "--identity-listen",
        identity,
        "--proxy-image",
        PROXY_IMAGE,
        "--init-image",
        INIT_IMAGE,
        "--unmeshed-pods-interval",
        "1s",
    ];
    // Injected proxies that run (the node agent's pods) dial this control plane;
    // otherwise the pods keep deploy/'s addresses, as users get them.
    if !discovery.starts_with("127.") {
        args.extend(["--proxy-control-plane-address", discovery]);
    }
    if !identity.starts_with("127.") {
        // Pods reach it at the gateway's address: its certificate names it, and
        // proxies are told to check that name.
        args.extend([
            "--identity-cert-san",
            identity_ip,
            "--proxy-identity-address",
            identity,
            "--proxy-identity-server-name",
            identity_ip,
        ]);
    }
    args.extend_from_slice(extra);
    let options = Options {
        envs: vec![("RUST_LOG", "info,kube_client=off")],
        capture_stderr: true,
    };
    spawn_with("control-plane", exe(), args, &options, START)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A pod with these annotations and labels.
pub fn pod_object(name: &str, annotations: Value, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]
        }
    })
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|items| {
            items
                .iter()
                .map(|c| c["name"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a stored pod carries Tandem's init container and sidecar.
pub fn is_injected(pod: &Value) -> bool {
    names(&pod["spec"]["initContainers"])
        .starts_with(&["tandem-init".into(), "tandem-proxy".into()])
}

async fn pod_json(ns: &Namespace, pod: &str) -> Value {
    let said = ns
        .cluster()
        .kubectl_ok(&["-n", ns.name(), "get", "pod", pod, "-o", "json"], None)
        .await;
    serde_json::from_str(&said.stdout).expect("a pod")
}

/// Checks every field the injection promises, on a pod the API server stored.
fn assert_injected(pod: &Value) {
    let spec = &pod["spec"];
    let inits = names(&spec["initContainers"]);
    assert_eq!(inits[..2], ["tandem-init", "tandem-proxy"], "{pod}");
    assert!(
        !names(&spec["containers"])
            .iter()
            .any(|n| n.starts_with("tandem"))
    );
    assert_eq!(
        pod["metadata"]["annotations"]["tandem.io/injected"],
        env!("CARGO_PKG_VERSION")
    );

    let init = &spec["initContainers"][0];
    assert_eq!(init["image"], INIT_IMAGE);
    assert_eq!(init["command"], json!(["tandem-proxy"]));
    assert_eq!(init["args"][0], "init");
    assert_eq!(
        init["securityContext"]["capabilities"]["add"],
        json!(["NET_ADMIN", "NET_RAW"])
    );
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert!(names(&spec["volumes"]).contains(&"tandem-xtables".to_string()));

    let proxy = &spec["initContainers"][1];
    assert_eq!(proxy["image"], PROXY_IMAGE);
    assert_eq!(proxy["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(proxy["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["startupProbe"]["httpGet"]["port"], 4191);
    assert_eq!(proxy["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(proxy["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(
        names(&proxy["env"]),
        [
            "TANDEM_POD",
            "TANDEM_NAMESPACE",
            "TANDEM_NODE",
            "TANDEM_SERVICE_ACCOUNT",
            "TANDEM_POD_IP",
            "TANDEM_HOST_IP",
            "RUST_LOG",
            "TANDEM_IDENTITY_ADDRESS",
            "TANDEM_IDENTITY_SERVER_NAME",
            "TANDEM_IDENTITY",
            "TANDEM_INBOUND_POLICY",
            "TANDEM_TRACE_COLLECTOR",
            "TANDEM_TRACE_SAMPLE_RATIO",
            "TANDEM_SERVICE_NAME"
        ]
    );
    // The identity the proxy asks for is its ServiceAccount's, as the kubelet expands it.
    assert_eq!(
        proxy["env"][9]["value"],
        "spiffe://cluster.local/ns/$(TANDEM_NAMESPACE)/sa/$(TANDEM_SERVICE_ACCOUNT)"
    );
    let mounts: Vec<String> = names(&proxy["volumeMounts"]);
    assert!(
        mounts.starts_with(&["tandem-identity-token".into(), "tandem-trust-roots".into()]),
        "{mounts:?}"
    );
    let volumes = spec["volumes"].as_array().unwrap();
    let token = volumes
        .iter()
        .find(|v| v["name"] == "tandem-identity-token")
        .expect("the token volume");
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "tandem"
    );
    let roots = volumes
        .iter()
        .find(|v| v["name"] == "tandem-trust-roots")
        .expect("the trust roots volume");
    assert_eq!(roots["configMap"]["name"], "tandem-trust-roots");
    assert_eq!(roots["configMap"]["optional"], true);
    assert_eq!(
        proxy["env"][2]["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], 2102);
    assert_eq!(proxy["securityContext"]["runAsNonRoot"], true);
    assert_eq!(proxy["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        proxy["securityContext"]["capabilities"],
        json!({"drop": ["ALL"]})
    );
    assert_eq!(proxy["resources"]["requests"]["cpu"], "10m");
    assert_eq!(names(&proxy["ports"]), ["tandem-inbound", "tandem-admin"]);
    // Nothing but the init container may change the network.
    for c in spec["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .chain(spec["containers"].as_array().unwrap())
    {
        assert!(c["securityContext"]["capabilities"]["add"].is_null(), "{c}");
    }
}

#[tokio::test]
async fn deploy_is_accepted_by_the_api_server_applies_idempotently_and_deletes_cleanly() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let deploy = repo().join("deploy").display().to_string();
        // A previous run's leftovers (a cluster that outlived its test run).
        eventually(CLUSTER_STEP * 2, "no tandem-system namespace", || async {
            let said = cluster
                .run_kubectl(&["get", "namespace", "tandem-system", "-o", "name"], None)
                .await;
            (!said.ok && said.stderr.contains("NotFound")).then_some(())
        })
        .await;

        // What kustomize makes, applied server-side: the API server validates every object.
        let built = cluster
            .kubectl_ok(&["kustomize", &deploy], None)
            .await
            .stdout;
        let apply = [
            "apply",
            "--server-side",
            "--field-manager=tandem-e2e",
            "-f",
            "-",
        ];
        let first = cluster
            .kubectl_ok(&apply, Some(built.as_bytes()))
            .await
            .stdout;
        let applied: Vec<&str> = first.lines().collect();
        for object in [
            "namespace/tandem-system",
            "serviceaccount/tandem-control-plane",
            "role.rbac.authorization.k8s.io/tandem-control-plane",
            "clusterrole.rbac.authorization.k8s.io/tandem-control-plane",
            "rolebinding.rbac.authorization.k8s.io/tandem-control-plane",
            "clusterrolebinding.rbac.authorization.k8s.io/tandem-control-plane",
            "service/tandem-control-plane",
            "service/tandem-identity",
            "service/tandem-webhook",
            "deployment.apps/tandem-control-plane",
            "poddisruptionbudget.policy/tandem-control-plane",
            "mutatingwebhookconfiguration.admissionregistration.k8s.io/tandem-injector",
        ] {
            assert!(
                applied.iter().any(|l| l.starts_with(&format!("{object} "))),
                "{object} in {first}"
            );
        }

        // Twice changes nothing: no object is written again, and diff finds nothing.
        let versions = || async {
            let said = cluster
                .kubectl_ok(&["get", "-k", &deploy, "-o", "json"], None)
                .await;
            let list: Value = serde_json::from_str(&said.stdout).expect("a List");
            let mut versions: Vec<(String, String)> = list["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    (
                        format!("{}/{}", o["kind"], o["metadata"]["name"]),
                        o["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    )
                })
                .collect();
            versions.sort();
            versions
        };
        // The Deployment's status moves as its pods come up: settle first.
        ns_wait_ready(
            cluster,
            "tandem-system",
            "app.kubernetes.io/name=tandem-control-plane",
            2,
        )
        .await;
        let before = versions().await;
        assert_eq!(before.len(), 12, "{before:?}");
        cluster.kubectl_ok(&apply, Some(built.as_bytes())).await;
        let diff = cluster
            .run_kubectl(
                &[
                    "diff",
                    "--server-side",
                    "--field-manager=tandem-e2e",
                    "-k",
                    &deploy,
                ],
                None,
            )
            .await;
        assert_eq!(
            diff.code,
            Some(0),
            "kubectl diff after apply: {}{}",
            diff.stdout,
            diff.stderr
        );
        assert!(diff.stdout.is_empty(), "{}", diff.stdout);
        let after = versions().await;
        assert_eq!(before, after, "a second apply changed objects");

        // `kubectl apply -k` as users run it, dry run on the server: every object valid.
        let dry = cluster
            .kubectl_ok(&["apply", "-k", &deploy, "--dry-run=server"], None)
            .await
            .stdout;
        assert_eq!(
            dry.lines()
                .filter(|l| l.ends_with("(server dry run)"))
                .count(),
            12,
            "{dry}"
        );
        let dry = cluster
            .kubectl_ok(
                &[
                    "apply",
                    "--server-side",
                    "--field-manager=tandem-e2e",
                    "-k",
                    &deploy,
                    "--dry-run=server",
                ],
                None,
            )
            .await
            .stdout;
        assert_eq!(
            dry.lines()
                .filter(|l| l.contains("serverside-applied (server dry run)"))
                .count(),
            12,
            "{dry}"
        );

        // What the API server stored is what the design says.
        let get = |args: &'static [&'static str]| async move {
            let said = cluster.kubectl_ok(args, None).await;
            serde_json::from_str::<Value>(&said.stdout).expect("JSON")
        };
        let d = get(&[
            "-n",
            "tandem-system",
            "get",
            "deployment",
            "tandem-control-plane",
            "-o",
            "json",
        ])
        .await;
        assert_eq!(d["spec"]["replicas"], 2);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(
            d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
            true
        );
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/live");
        assert!(
            c["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--source=kubernetes"))
        );
        let w = get(&[
            "get",
            "mutatingwebhookconfiguration",
            "tandem-injector",
            "-o",
            "json",
        ])
        .await;
        let hook = &w["webhooks"][0];
        assert_eq!(hook["failurePolicy"], "Ignore");
        assert_eq!(hook["sideEffects"], "None");
        assert_eq!(hook["reinvocationPolicy"], "Never");
        assert_eq!(hook["timeoutSeconds"], 5);
        assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
        assert_eq!(hook["clientConfig"]["service"]["name"], "tandem-webhook");
        let s = get(&[
            "-n",
            "tandem-system",
            "get",
            "service",
            "tandem-webhook",
            "-o",
            "json",
        ])
        .await;
        assert_eq!(s["spec"]["ports"][0]["port"], 443);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], "webhook");
        // Proxies' certificates: the name injected proxies are given by default.
        let s = get(&[
            "-n",
            "tandem-system",
            "get",
            "service",
            "tandem-identity",
            "-o",
            "json",
        ])
        .await;
        assert_eq!(s["spec"]["ports"][0]["port"], 8087);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], "identity");
        assert!(
            c["args"]
                .as_array()
                .unwrap()
                .contains(&json!("--identity-listen=0.0.0.0:8087"))
        );

        // Deleted, all of it (cluster-scoped objects too).
        cluster
            .kubectl_ok(&["delete", "-k", &deploy, "--wait=false"], None)
            .await;
        for (kind, name) in [
            ("mutatingwebhookconfiguration", "tandem-injector"),
            ("clusterrole", "tandem-control-plane"),
            ("clusterrolebinding", "tandem-control-plane"),
            ("namespace", "tandem-system"),
        ] {
            eventually(
                CLUSTER_STEP * 2,
                &format!("{kind}/{name} to be gone"),
                || async {
                    let said = cluster
                        .run_kubectl(&["get", kind, name, "-o", "name"], None)
                        .await;
                    (!said.ok && said.stderr.contains("NotFound")).then_some(())
                },
            )
            .await;
        }
    })
    .await
}

async fn ns_wait_ready(cluster: &'static Cluster, namespace: &str, selector: &str, count: usize) {
    let what = format!("{count} ready pods {selector} in {namespace}");
    eventually(CLUSTER_STEP, &what, || async {
        let said = cluster
            .run_kubectl(
                &["-n", namespace, "get", "pods", "-l", selector, "-o", "json"],
                None,
            )
            .await;
        let list: Value = serde_json::from_str(&said.stdout).ok()?;
        let items = list["items"].as_array()?;
        let ready = items.iter().filter(|p| {
            p["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        });
        (ready.count() == count).then_some(())
    })
    .await;
    // The Deployment's status catches up with its pods.
    eventually(CLUSTER_STEP, "the Deployment's status", || async {
        let said = cluster
            .run_kubectl(&["-n", namespace, "get", "deployment", "-o", "json"], None)
            .await;
        let list: Value = serde_json::from_str(&said.stdout).ok()?;
        list["items"]
            .as_array()?
            .iter()
            .all(|d| {
                d["status"]["readyReplicas"] == d["spec"]["replicas"]
                    && d["status"]["observedGeneration"] == d["metadata"]["generation"]
            })
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_api_server_calls_the_webhook_and_pods_get_the_proxy() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("inject").await;
        let mut injector = Injector::start(&ns).await;
        let secret_version = injector.secret().await["metadata"]["resourceVersion"].clone();

        // A plain Deployment, applied as users do: the ReplicaSet controller creates
        // its pods, the API server calls the webhook, and the stored pods are meshed.
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {"initContainers": [{"name": "migrate", "image": "app:1"}],
                             "containers": [{"name": "web", "image": "app:1", "ports": [{"containerPort": 8080}]}]}
                }
            }
        });
        ns.apply(&[deployment]).await;
        let pods = eventually(CLUSTER_STEP, "the Deployment's 2 pods", || async {
            let pods = ns.pods("app=web").await;
            (pods.len() == 2).then_some(pods)
        })
        .await;
        for pod in &pods {
            let stored = pod_json(&ns, &name(pod)).await;
            assert_injected(&stored);
            // The app's own init container runs after the proxy is up.
            assert_eq!(names(&stored["spec"]["initContainers"]), ["tandem-init", "tandem-proxy", "migrate"]);
            assert_eq!(names(&stored["spec"]["containers"]), ["web"]);
        }

        // Opted out, by label (the configuration's objectSelector: not even called) and
        // by annotation (the webhook reads it).
        ns.apply(&[
            pod_object("out-label", json!({}), json!({"tandem.io/inject": "disabled"})),
            pod_object("out-annotation", json!({"tandem.io/inject": "disabled"}), json!({})),
        ])
        .await;
        for pod in ["out-label", "out-annotation"] {
            let stored = pod_json(&ns, pod).await;
            assert!(!is_injected(&stored), "{pod}: {stored}");
            assert!(stored["spec"]["initContainers"].is_null(), "{pod}: {stored}");
        }

        // An annotation that is not a list of ports: admitted unmeshed, and kubectl
        // shows the API server's warning naming the annotation.
        let bad = pod_object("bad-ports", json!({"tandem.io/skip-inbound-ports": "abc"}), json!({}));
        let said = cluster.kubectl_ok(&["-n", ns.name(), "apply", "-f", "-"],
            Some(bad.to_string().as_bytes()),
        )
        .await;
        assert!(
            said.stderr.contains("Warning: tandem: not meshed: tandem.io/skip-inbound-ports: \"abc\""),
            "kubectl's stderr: {}",
            said.stderr
        );
        assert!(!is_injected(&pod_json(&ns, "bad-ports").await));
        assert!(injector.cp.log_text().contains("tandem.io/skip-inbound-ports"));

        // A malformed AdmissionReview, POSTed directly: a clear 400, and the webhook
        // goes on serving.
        let ca = cluster.kubectl_ok(&["-n", ns.name(), "get", "secret", "tandem-webhook-tls", "-o",
              r#"go-template={{index .data "ca.crt" | base64decode}}"#],
            None,
        )
        .await
        .stdout;
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");
        let dir = TestDir::new("webhook-ca");
        let ca_file = dir.path("ca.crt");
        std::fs::write(&ca_file, ca).unwrap();
        let url = format!("https://127.0.0.1:{}/mutate", injector.port);
        for body in ["{not json", r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#] {
            let out = tokio::process::Command::new("curl")
                .args(["-s", "--max-time", "10", "--cacert"])
                .arg(&ca_file)
                .args(["-H", "Content-Type: application/json", "-X", "POST", "--data-binary", body])
                .args(["-w", "\n%{http_code}", &url])
                .output()
                .await
                .expect("curl runs");
            let text = String::from_utf8_lossy(&out.stdout);
            let (body, code) = text.rsplit_once('\n').expect("a status line");
            assert_eq!(code, "400", "{text}");
            assert!(body.contains("malformed AdmissionReview"), "{body}");
        }
        assert!(injector.cp.is_running(), "the control plane survives");
        ns.apply(&[pod_object("after-garbage", json!({}), json!({}))]).await;
        assert_injected(&pod_json(&ns, "after-garbage").await);

        // Calls by result.
        let calls = |result: &'static str| {
            let injector = &injector;
            async move {
                injector
                    .metric("tandem_control_plane_webhook_calls_total", &format!("result=\"{result}\""))
                    .await
                    .unwrap_or_default()
            }
        };
        assert!(calls("injected").await >= 3.0);
        assert!(calls("skipped").await >= 1.0, "the annotation opt-out was a call");
        assert!(calls("unmeshed").await >= 1.0);
        assert!(calls("error").await >= 2.0);
        // The pod with the bad annotation should be meshed and is not.
        eventually(CLUSTER_STEP, "unmeshed_pods to count the bad-ports pod", || async {
            (injector.metric("tandem_control_plane_unmeshed_pods", "").await == Some(1.0)).then_some(())
        })
        .await;

        // The webhook down: the pod is created anyway, unmeshed (failurePolicy Ignore)…
        injector.stop().await;
        ns.apply(&[pod_object("while-down", json!({}), json!({}))]).await;
        assert!(!is_injected(&pod_json(&ns, "while-down").await));
        // …and counted once the control plane is back, which serves the same Secret.
        injector.restart().await;
        eventually(CLUSTER_STEP, "unmeshed_pods to count the pod made while it was down", || async {
            (injector.metric("tandem_control_plane_unmeshed_pods", "").await == Some(2.0)).then_some(())
        })
        .await;
        assert_eq!(
            injector.secret().await["metadata"]["resourceVersion"],
            secret_version,
            "a restart reuses the Secret"
        );
        ns.apply(&[pod_object("back", json!({}), json!({}))]).await;
        assert_injected(&pod_json(&ns, "back").await);
    })
    .await
}

#[tokio::test]
async fn replicas_share_one_certificate_and_keep_the_ca_bundle() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("inject-replicas").await;
        let injector = Injector::start(&ns).await;
        let secret = injector.secret().await;

        // A second replica serves the same Secret: nothing is made or issued again.
        let other = start_control_plane(
            &injector.kubeconfig,
            ns.name(),
            &injector.config,
            "127.0.0.1:0",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[],
        )
        .await;
        eventually(CLUSTER_STEP, "the second replica to serve", || async {
            let out = tokio::process::Command::new("curl")
                .args([
                    "-sk",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                ])
                .arg(format!(
                    "https://127.0.0.1:{}/mutate",
                    other.addr("webhook").port()
                ))
                .output()
                .await
                .ok()?;
            (String::from_utf8_lossy(&out.stdout) == "405").then_some(())
        })
        .await;
        assert_eq!(
            injector.secret().await["metadata"]["resourceVersion"],
            secret["metadata"]["resourceVersion"]
        );

        // Someone empties the caBundle (a re-install): it is set again.
        let patch =
            json!([{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}]).to_string();
        cluster
            .kubectl_ok(
                &[
                    "patch",
                    "mutatingwebhookconfiguration",
                    &injector.config,
                    "--type=json",
                    "-p",
                    &patch,
                ],
                None,
            )
            .await;
        let bundle = injector.ca_bundle().await;
        assert_eq!(Some(bundle.as_str()), secret["data"]["ca.crt"].as_str());
    })
    .await
}
