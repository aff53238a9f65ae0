//! Kubernetes discovery against a real cluster: kube-apiserver, etcd and
//! kube-controller-manager built from their Go modules, our node agent standing in
//! for kubelets and the scheduler (`cluster.rs`). The control plane runs as
//! `deploy/` installs it: its ServiceAccount, with exactly its ClusterRole's rules,
//! through a token the API server minted. Clients watch with `tandem endpoints`, and
//! proxies carry real requests to pods running `tandem backend` in their network
//! namespaces.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tandem::client::Connection;
use tandem::process::{Options, Spawned, spawn_with};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cluster::{CLUSTER_STEP, Cluster, Namespace, cluster, name, own_cluster};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(300);

/// The ClusterRole `deploy/` gives the control plane, as JSON (`kubectl` reads the
/// YAML, so the test uses exactly the file users apply).
async fn deploy_control_plane_rules(cluster: &Cluster) -> Value {
    let rbac = repo().join("deploy/control-plane/rbac.yaml");
    let printed = cluster
        .kubectl(&[
            "create",
            "--dry-run=client",
            "-o",
            "json",
            "-f",
            &rbac.display().to_string(),
        ])
        .await;
    // One JSON object per document.
    serde_json::Deserializer::from_str(&printed)
        .into_iter::<Value>()
        .map(|object| object.expect("kubectl prints JSON"))
        .find(|o| o["kind"] == "ClusterRole")
        .map(|role| role["rules"].clone())
        .expect("deploy/control-plane/rbac.yaml has a ClusterRole")
}

/// A control plane as `deploy/` runs it: ServiceAccount `tandem-control-plane` in
/// `ns`, bound to a ClusterRole with `rules` (the deployed ones, or fewer), and a
/// kubeconfig holding a token the API server minted for that account.
async fn control_plane_with(ns: &Namespace, rules: Value) -> Spawned {
    let role = format!("tandem-control-plane-{}", ns.name());
    ns.cluster()
        .apply(&[
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": "tandem-control-plane", "namespace": ns.name()}}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": role}, "rules": rules}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": role},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                   "subjects": [{"kind": "ServiceAccount", "name": "tandem-control-plane", "namespace": ns.name()}]}),
        ])
        .await;
    let kubeconfig = ns
        .account_kubeconfig(
            "tandem-control-plane",
            &format!("control-plane-{}", ns.name()),
        )
        .await;
    control_plane_as(&kubeconfig).await
}

/// A control plane reading the cluster with the credentials of `kubeconfig`.
async fn control_plane_as(kubeconfig: &std::path::Path) -> Spawned {
    let kubeconfig = kubeconfig.display().to_string();
    let args = [
        "control-plane",
        "--source",
        "kubernetes",
        "--kubeconfig",
        &kubeconfig,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    let options = Options {
        envs: vec![("RUST_LOG", "info,kube_client=off")],
        capture_stderr: true,
    };
    spawn_with("control-plane", exe(), args, &options, START)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The control plane with exactly the rights `deploy/` gives it, ready (synced).
async fn control_plane(ns: &Namespace) -> Spawned {
    let rules = deploy_control_plane_rules(ns.cluster()).await;
    let cp = control_plane_with(ns, rules).await;
    wait_ready(cp.addr("admin")).await;
    cp
}

fn service(name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
        }
    })
}

/// A Deployment `name` of `replicas` pods (ServiceAccount `name`). `run`: its pods
/// run `tandem backend` (answering with their pod's name) for real; otherwise they
/// only get addresses and readiness from the node agent.
fn deployment(name: &str, replicas: u32, run: bool, annotations: Value) -> Value {
    let mut annotations = annotations;
    let mut container = json!({
        "name": "web", "image": "tandem",
        "ports": [{"name": "http", "containerPort": 8080}]
    });
    if run {
        annotations["agent.tandem.io/run"] = json!("true");
        // Serving on for a moment after SIGTERM, as apps do, while the mesh learns
        // that the pod is terminating.
        container["command"] = json!([
            "tandem",
            "backend",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            "$(POD_NAME)",
            "--quiet",
            "--shutdown-delay",
            "2s"
        ]);
        container["env"] = json!([{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]);
        container["readinessProbe"] =
            json!({"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1});
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": name}, "annotations": annotations},
                "spec": {
                    "serviceAccountName": name,
                    "terminationGracePeriodSeconds": 3,
                    "containers": [container]
                }
            }
        }
    })
}

fn service_account(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}})
}

/// `tandem endpoints NAME --watch -o json`: every set it prints, in order.
struct Watch {
    _child: tokio::process::Child,
    lines: Arc<Mutex<Vec<Vec<Value>>>>,
}

impl Watch {
    async fn start(name: &str, control_plane: SocketAddr) -> Self {
        let mut child = tokio::process::Command::new(exe())
            .args([
                "endpoints",
                name,
                "--watch",
                "-o",
                "json",
                "--control-plane",
            ])
            .arg(control_plane.to_string())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Ok(Value::Array(items)) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(items);
                }
            }
        });
        Self {
            _child: child,
            lines,
        }
    }

    fn all(&self) -> Vec<Vec<Value>> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a printed set that satisfies `check`; returns it.
    async fn until(&self, what: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        eventually(CLUSTER_STEP, what, || {
            let last = self.lines.lock().unwrap().last().cloned();
            let found = last.filter(|items| check(items));
            async move { found }
        })
        .await
    }
}

fn healthy(items: &[Value]) -> usize {
    items.iter().filter(|e| e["health"] == "healthy").count()
}

fn addresses(items: &[Value]) -> BTreeSet<String> {
    items
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect()
}

fn find<'a>(items: &'a [Value], ip: &str) -> Option<&'a Value> {
    items
        .iter()
        .find(|e| e["address"].as_str() == Some(&format!("{ip}:8080")))
}

#[tokio::test]
async fn a_deployment_is_followed_through_scaling_and_readiness() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("deployment").await;
        ns.apply(&[
            service_account("web"),
            service("web", json!({})),
            // Marked as injection marks meshed pods: only those get an identity.
            deployment(
                "web",
                3,
                false,
                json!({"tandem.io/weight": "2", "tandem.io/injected": "test"}),
            ),
        ])
        .await;
        let pods = ns.wait_deployment("web").await;
        let cp = control_plane(&ns).await;
        let target = format!("web.{}:80", ns.name());
        let watch = Watch::start(&target, cp.addr("discovery")).await;

        // Every pod, with the zone of its node (one per zone: the agent spreads them),
        // the region from the node's label, the weight from the pod's annotation and
        // the identity of its ServiceAccount (a meshed pod's: unmeshed ones have none).
        let items = watch
            .until("3 healthy endpoints", |i| healthy(i) == 3)
            .await;
        let zones: BTreeSet<&str> = items.iter().map(|e| e["zone"].as_str().unwrap()).collect();
        assert_eq!(zones.len(), 3, "spread over the zones: {items:?}");
        for pod in &pods {
            let ip = crate::cluster::pod_ip(pod).unwrap().to_string();
            let e = find(&items, &ip).unwrap_or_else(|| panic!("{ip} in {items:?}"));
            assert_eq!(e["weight"], 2);
            assert!(
                e["region"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("region-")),
                "{e}"
            );
            assert_eq!(
                e["identity"],
                format!("spiffe://cluster.local/ns/{}/sa/web", ns.name())
            );
        }

        // A readiness flip: unhealthy (sent, not dropped), then healthy again.
        let flipped = name(&pods[0]);
        let flipped_ip = crate::cluster::pod_ip(&pods[0]).unwrap().to_string();
        ns.set_ready(&flipped, false).await;
        watch
            .until("the flipped pod unhealthy", |i| {
                find(i, &flipped_ip).is_some_and(|e| e["health"] == "unhealthy") && i.len() == 3
            })
            .await;
        ns.set_ready(&flipped, true).await;
        watch.until("it back", |i| healthy(i) == 3).await;

        // Scale to 120: the controller splits the slices past 100 endpoints; every
        // endpoint that arrived stays while the others join.
        let seen_before_scale = watch.all().len();
        ns.kubectl(&["scale", "deployment", "web", "--replicas=120"])
            .await;
        watch
            .until("120 healthy endpoints", |i| healthy(i) == 120)
            .await;
        let slices = ns.endpoint_slices("web").await;
        assert!(
            slices.len() >= 2,
            "{} slices for 120 endpoints",
            slices.len()
        );
        let sets = watch.all();
        for pair in sets[seen_before_scale.saturating_sub(1)..].windows(2) {
            let (before, after) = (addresses(&pair[0]), addresses(&pair[1]));
            assert!(
                before.is_subset(&after),
                "endpoints left during a scale-up: {:?}",
                before.difference(&after).collect::<Vec<_>>()
            );
        }

        // Scale to 2: the others drain for their grace period, then go.
        let seen_before_down = watch.all().len();
        ns.kubectl(&["scale", "deployment", "web", "--replicas=2"])
            .await;
        watch
            .until("2 endpoints left", |i| i.len() == 2 && healthy(i) == 2)
            .await;
        let drained = watch.all()[seen_before_down..]
            .iter()
            .any(|set| set.iter().any(|e| e["health"] == "draining"));
        assert!(
            drained,
            "terminating pods were shown draining before they went"
        );
    })
    .await
}

/// A client loop through `proxy` to `target`: counts answers per instance and failures.
struct Load {
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<BTreeMap<String, usize>>>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(proxy: SocketAddr, target: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(BTreeMap::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, a, f) = (stop.clone(), answers.clone(), failures.clone());
        let task = tokio::spawn(async move {
            let mut conn = Connection::http1(proxy).await.unwrap();
            while !s.load(Ordering::Relaxed) {
                match conn.get(&target, "/").await {
                    Ok(reply) if reply.status.is_success() => {
                        let who = reply.instance().unwrap_or("?").to_string();
                        *a.lock().unwrap().entry(who).or_default() += 1;
                    }
                    Ok(reply) => {
                        f.lock()
                            .unwrap()
                            .push(format!("{} {}", reply.status, reply.text()))
                    }
                    Err(e) => {
                        f.lock().unwrap().push(format!("{e:#}"));
                        conn = Connection::http1(proxy).await.unwrap();
                    }
                }
            }
        });
        Self {
            stop,
            answers,
            failures,
            task,
        }
    }

    fn answered_by(&self) -> BTreeMap<String, usize> {
        self.answers.lock().unwrap().clone()
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.failures.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_rolling_update_never_fails_a_get() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("rollout").await;
        ns.apply(&[
            service_account("web"),
            service("web", json!({})),
            deployment("web", 3, true, json!({})),
        ])
        .await;
        let old: BTreeSet<String> = ns.wait_deployment("web").await.iter().map(name).collect();
        let cp = control_plane(&ns).await;
        let proxy = proxy(cp.addr("discovery"), &["--namespace", ns.name()]).await;
        let load = Load::start(proxy.addr("proxy"), "web".into());
        eventually(CLUSTER_STEP, "every old pod answering", || {
            let seen: BTreeSet<String> = load.answered_by().into_keys().collect();
            let all = old.is_subset(&seen);
            async move { all.then_some(()) }
        })
        .await;

        // A new template: new pods start (one at a time, none unavailable), the old
        // ones drain and stop.
        ns.kubectl(&[
            "patch",
            "deployment",
            "web",
            "-p",
            r#"{"spec":{"template":{"metadata":{"annotations":{"rollout":"2"}}}}}"#,
        ])
        .await;
        let new: BTreeSet<String> =
            eventually(CLUSTER_STEP * 2, "the rollout to finish", || async {
                let pods = ns.pods("app=web").await;
                let names: BTreeSet<String> = pods
                    .iter()
                    .filter(|p| crate::cluster::is_ready(p))
                    .map(name)
                    .collect();
                (pods.len() == 3 && names.len() == 3 && names.is_disjoint(&old)).then_some(names)
            })
            .await;
        let before = load.answered_by();
        eventually(CLUSTER_STEP, "every new pod answering", || {
            let now = load.answered_by();
            let all = new
                .iter()
                .all(|p| now.get(p).copied().unwrap_or(0) > before.get(p).copied().unwrap_or(0));
            async move { all.then_some(()) }
        })
        .await;
        let failures = load.finish().await;
        assert!(
            failures.is_empty(),
            "GETs failed during the rollout: {failures:?}"
        );
    })
    .await
}

#[tokio::test]
async fn a_missing_permission_is_named_in_the_log_and_in_ready() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("rbac").await;
        // The deployed rules without EndpointSlices.
        let rules: Vec<Value> = deploy_control_plane_rules(cluster)
            .await
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["apiGroups"][0] != "discovery.k8s.io")
            .cloned()
            .collect();
        let cp = control_plane_with(&ns, json!(rules)).await;
        let admin = cp.addr("admin");
        let ready = || async move {
            let mut conn = Connection::http1(admin).await.ok()?;
            conn.get("localhost", "/ready").await.ok()
        };
        let said = eventually(
            CLUSTER_STEP,
            "/ready to name the missing permission",
            || async {
                let reply = ready().await?;
                (!reply.status.is_success() && reply.text().contains("endpointslices"))
                    .then(|| reply.text())
            },
        )
        .await;
        assert!(
            said.contains("missing permission")
                && said.contains("list endpointslices.discovery.k8s.io"),
            "{said}"
        );
        eventually(CLUSTER_STEP, "the log line", || {
            let log = cp.log_text();
            async move { log.contains("missing permission").then_some(()) }
        })
        .await;

        // Granted: the control plane recovers by itself, and says so once.
        cluster
            .apply(&[json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": format!("tandem-control-plane-{}", ns.name())},
                "rules": deploy_control_plane_rules(cluster).await
            })])
            .await;
        eventually(
            CLUSTER_STEP * 2,
            "/ready once the permission is granted",
            || async { ready().await.filter(|r| r.status.is_success()).map(|_| ()) },
        )
        .await;
        let log = cp.log_text();
        assert_eq!(
            log.matches("missing permission").count(),
            1,
            "said once, however many retries: {log}"
        );
        assert!(log.contains("permission granted again"), "{log}");
    })
    .await
}

#[tokio::test]
async fn odd_objects_are_logged_once_and_never_stop_the_watch() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("odd").await;
        let fqdn = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "ext-fqdn", "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["db.example.com"]}],
            "ports": [{"name": "", "port": 5432}]
        });
        ns.apply(&[
            service_account("web"),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lonely"},
                   "spec": {"selector": {"app": "nobody"}, "ports": [{"name": "http", "port": 80}]}}),
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext"},
                   "spec": {"ports": [{"name": "", "port": 5432}]}}),
            fqdn.clone(),
            service("web", json!({})),
            deployment("web", 1, false, json!({"tandem.io/weight": "abc"})),
        ])
        .await;
        ns.wait_deployment("web").await;
        let cp = control_plane(&ns).await;

        // A Service whose selector matches nothing exists, with no endpoints.
        let lonely = Watch::start(&format!("lonely.{}:80", ns.name()), cp.addr("discovery")).await;
        lonely.until("an empty set", |i| i.is_empty()).await;
        // A weight that is not a number: the default, and the watch goes on.
        let web = Watch::start(&format!("web.{}:80", ns.name()), cp.addr("discovery")).await;
        let items = web.until("the pod with weight 1", |i| healthy(i) == 1).await;
        assert_eq!(items[0]["weight"], 1);

        // Touch the FQDN slice and scale up: the watch keeps going, each oddity said once.
        for n in 0..2 {
            let mut changed = fqdn.clone();
            changed["metadata"]["labels"]["touch"] = json!(n.to_string());
            ns.apply(&[changed]).await;
        }
        ns.kubectl(&["scale", "deployment", "web", "--replicas=2"]).await;
        web.until("the watch still flowing", |i| healthy(i) == 2).await;
        let log = cp.log_text();
        assert_eq!(log.matches("FQDN addresses").count(), 1, "{log}");
        // Once per pod that carries it, however often the pod changes.
        for pod in ns.pods("app=web").await {
            let said = format!("Pod {}/{}: tandem.io/weight=\"abc\"", ns.name(), name(&pod));
            assert_eq!(log.matches(&said).count(), 1, "{said} in {log}");
        }
    })
    .await
}

/// The etcd JSON gateway: POST `path` with `body`, the answer.
async fn etcd(url: &str, path: &str, body: Value) -> Value {
    let out = tokio::process::Command::new("curl")
        .args(["-sf", "--max-time", "10", "-X", "POST", "-d"])
        .arg(body.to_string())
        .arg(format!("{url}{path}"))
        .output()
        .await
        .expect("curl runs");
    assert!(out.status.success(), "etcd {path}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("etcd answers JSON")
}

#[tokio::test]
async fn an_api_server_restart_and_a_compaction_do_not_flap_unchanged_endpoints() {
    bounded(LIMIT, async {
        // A cluster of its own: the others' API server stays up. Without the watch
        // cache, a watch resumed after a compaction meets 410 Gone.
        let cluster = own_cluster("restart", "--watch-cache=false").await;
        let ns = cluster.namespace("restart").await;
        ns.apply(&[
            service_account("web"),
            service("web", json!({})),
            deployment("web", 3, false, json!({})),
        ])
        .await;
        ns.wait_deployment("web").await;
        // As the admin: a restarted API server refuses a ServiceAccount for a moment
        // (403 until its RBAC cache is filled), and a watcher that meets a 403 lists
        // afresh instead of resuming, so no 410 would be seen. The rights of deploy/
        // are proven by the other tests.
        let cp = control_plane_as(cluster.kubeconfig()).await;
        wait_ready(cp.addr("admin")).await;
        let watch = Watch::start(&format!("web.{}:80", ns.name()), cp.addr("discovery")).await;
        watch
            .until("3 healthy endpoints", |i| healthy(i) == 3)
            .await;
        // A change that flows proves the watches past their first list (a watcher
        // that loses its connection while still listing lists again, with no 410).
        ns.kubectl(&["scale", "deployment", "web", "--replicas=4"])
            .await;
        let steady = watch
            .until("4 healthy endpoints", |i| healthy(i) == 4)
            .await;
        let printed = watch.all().len();
        let metrics = cp.addr("admin");

        // The API server goes away: the control plane keeps its state and says so.
        cluster.stop_apiserver().await;
        eventually(CLUSTER_STEP, "source_up 0", || async move {
            let page = admin_get(metrics, "/metrics").await;
            page.lines()
                .any(|l| l == "tandem_control_plane_source_up 0")
                .then_some(())
        })
        .await;
        // Its history is compacted meanwhile (a write, then a compaction up to it).
        let etcd_url = cluster.etcd_url();
        let put = etcd(
            &etcd_url,
            "/v3/kv/put",
            json!({"key": "dGFuZGVt", "value": "eA=="}),
        )
        .await;
        let revision = put["header"]["revision"].as_str().unwrap().to_string();
        etcd(
            &etcd_url,
            "/v3/kv/compaction",
            json!({"revision": revision, "physical": true}),
        )
        .await;

        // It comes back: the watches resume from history that is gone (410), list
        // again, and proxies see nothing, since nothing changed.
        cluster.start_apiserver().await;
        eventually(CLUSTER_STEP, "source_up 1 and a relist", || async move {
            let page = admin_get(metrics, "/metrics").await;
            let up = page
                .lines()
                .any(|l| l == "tandem_control_plane_source_up 1");
            let relisted = page.lines().any(|l| {
                l.starts_with("tandem_control_plane_relists_total{") && !l.ends_with(" 0")
            });
            (up && relisted).then_some(())
        })
        .await;
        // A real change after it flows, and is the first thing proxies see: nothing
        // was printed for the restart and the relist.
        assert_eq!(watch.all().len(), printed, "{:?}", &watch.all()[printed..]);
        ns.kubectl(&["scale", "deployment", "web", "--replicas=5"])
            .await;
        watch
            .until("5 healthy endpoints", |i| healthy(i) == 5)
            .await;
        let sets = watch.all();
        for set in &sets[printed..] {
            assert!(
                addresses(&steady).is_subset(&addresses(set)),
                "an unchanged endpoint left after the restart: {set:?}"
            );
        }
        cluster.stop();
    })
    .await
}

#[tokio::test]
async fn callers_are_counted_from_the_proxies_when_the_service_asks() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("callers").await;
        ns.apply(&[
            service_account("web"),
            service("web", json!({"tandem.io/callers": "counted"})),
            deployment("web", 2, true, json!({})),
        ])
        .await;
        ns.wait_deployment("web").await;
        let cp = control_plane(&ns).await;
        let mut clients = Vec::new();
        for (node, pod) in [
            ("node-a", "client-1"),
            ("node-a", "client-2"),
            ("node-b", "client-3"),
        ] {
            let p = proxy(
                cp.addr("discovery"),
                &["--node", node, "--pod", pod, "--namespace", ns.name()],
            )
            .await;
            let mut conn = Connection::http1(p.addr("proxy")).await.unwrap();
            instances(&mut conn, "web", 1).await;
            clients.push(p);
        }
        let admin = clients[0].addr("admin");
        let callers = move || async move {
            let config: Value = serde_json::from_str(&admin_get(admin, "/config").await).ok()?;
            let web = config["destinations"].as_array()?.first()?.clone();
            Some(web["callers"].clone())
        };
        let zone_of = |node: &str| match node {
            "node-a" => "zone-a",
            "node-b" => "zone-b",
            _ => "zone-c",
        };
        let two_zones = json!({zone_of("node-a"): 2.0, zone_of("node-b"): 1.0});
        eventually(
            CLUSTER_STEP,
            "callers counted per zone of the proxies' nodes",
            || {
                let two_zones = two_zones.clone();
                async move { callers().await.filter(|c| *c == two_zones).map(|_| ()) }
            },
        )
        .await;
        // The caller in zone-b goes away: the count follows.
        clients.pop().unwrap().kill().await;
        let one_zone = json!({zone_of("node-a"): 2.0});
        eventually(
            CLUSTER_STEP,
            "the departed caller to leave the count",
            || {
                let one_zone = one_zone.clone();
                async move { callers().await.filter(|c| *c == one_zone).map(|_| ()) }
            },
        )
        .await;
    })
    .await
}
