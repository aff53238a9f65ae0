//! Kubernetes discovery against a real API server emulator (kmock, from PyPI, driven
//! by `kubectl apply`), with a subscribing client (`tandem endpoints --watch`) and a
//! proxy carrying real traffic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tandem::client::Connection;
use tandem::process::{Options, Spawned, spawn_with};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(180);
const CHANGE: Duration = Duration::from_secs(15);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run tests/k8s-emulator/setup.sh (scripts/test.sh does)",
        python.display()
    );
    python
}

/// An emulated API server and the kubeconfig that reaches it.
struct Cluster {
    dir: TestDir,
    kubeconfig: PathBuf,
    api: Spawned,
}

impl Cluster {
    async fn start(test: &str) -> Self {
        let dir = TestDir::new(test);
        let kubeconfig = dir.path("kubeconfig");
        let api = Self::spawn(&kubeconfig, 0, None).await;
        Self {
            dir,
            kubeconfig,
            api,
        }
    }

    async fn spawn(kubeconfig: &Path, port: u16, preload: Option<&Path>) -> Spawned {
        let script = repo().join("tests/k8s-emulator/emulator.py");
        let mut args = vec![
            script.display().to_string(),
            "--port".into(),
            port.to_string(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            // Versions from the wall clock: a restarted emulator answers 410 to old ones.
            "--rv-start".into(),
            "time".into(),
            "--log-level".into(),
            "WARNING".into(),
        ];
        if let Some(preload) = preload {
            args.extend(["--preload".into(), preload.display().to_string()]);
        }
        spawn_with("k8s-emulator", &python(), &args, &Options::default(), START)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn port(&self) -> u16 {
        self.api.addr("api").port()
    }

    /// `kubectl apply` of these objects (one file each, in order).
    async fn apply(&self, objects: &[Value]) {
        let dir = self.dir.path(&format!("apply-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, object) in objects.iter().enumerate() {
            std::fs::write(
                dir.join(format!("{i:03}.json")),
                serde_json::to_vec(object).unwrap(),
            )
            .unwrap();
        }
        self.kubectl(&["apply", "-f", &dir.display().to_string()])
            .await;
    }

    async fn kubectl(&self, args: &[&str]) {
        let output = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path("kube-cache"))
            .args(args)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), output)
            .await
            .expect("kubectl finishes")
            .expect("kubectl runs (it is on the machine image)");
        assert!(
            output.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A control plane watching this cluster.
    async fn control_plane(&self) -> Spawned {
        let kubeconfig = self.kubeconfig.display().to_string();
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
}

fn list(objects: &[Value]) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": objects})
}

fn node(name: &str, region: Option<&str>, zone: &str) -> Value {
    let mut labels = json!({"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name});
    if let Some(region) = region {
        labels["topology.kubernetes.io/region"] = json!(region);
    }
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
}

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
        }
    })
}

fn pod(name: &str, node: &str, ip: &str, weight: Option<u32>) -> Value {
    let mut annotations = json!({});
    if let Some(w) = weight {
        annotations["tandem.io/weight"] = json!(w.to_string());
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}, "annotations": annotations},
        "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "web", "image": "web"}]},
        "status": {"podIP": ip}
    })
}

/// One endpoint as the EndpointSlice controller writes it.
struct Ep<'a> {
    ip: &'a str,
    pod: &'a str,
    node: &'a str,
    zone: &'a str,
    ready: bool,
    serving: bool,
    terminating: bool,
}

fn ep<'a>(ip: &'a str, pod: &'a str, node: &'a str, zone: &'a str) -> Ep<'a> {
    Ep {
        ip,
        pod,
        node,
        zone,
        ready: true,
        serving: true,
        terminating: false,
    }
}

fn slice(name: &str, port: u16, endpoints: &[Ep<'_>]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|e| {
            json!({
                "addresses": [e.ip],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": e.node, "zone": e.zone,
                "targetRef": {"kind": "Pod", "name": e.pod, "namespace": "default"}
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": "web",
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            }
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    })
}

/// Backends on 127.0.0.11, .12, … all on one port, as pods of one Deployment would be.
async fn backends(n: usize) -> (u16, Vec<Spawned>) {
    for _ in 0..20 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut started = Vec::new();
        for i in 0..n {
            let listen = format!("127.0.0.{}:{port}", 11 + i);
            let name = format!("instance-{}", i + 1);
            let args = [
                "backend",
                "--name",
                name.as_str(),
                "--listen",
                listen.as_str(),
                "--quiet",
            ];
            match spawn_with(&name, exe(), args, &Options::default(), START).await {
                Ok(b) => started.push(b),
                Err(_) => break,
            }
        }
        if started.len() == n {
            return (port, started);
        }
    }
    panic!("could not find a port free on all of 127.0.0.11..");
}

/// `tandem endpoints NAME --watch -o json`: every array it prints, in order.
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
        eventually(CHANGE, what, || {
            let last = self.lines.lock().unwrap().last().cloned();
            let found = last.filter(|items| check(items));
            async move { found }
        })
        .await
    }
}

fn find<'a>(items: &'a [Value], ip: &str) -> Option<&'a Value> {
    items.iter().find(|e| {
        e["address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{ip}:")))
    })
}

fn addresses(items: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = items
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn discovery_follows_the_cluster() {
    bounded(LIMIT, async {
        let (port, _backends) = backends(3).await;
        let cluster = Cluster::start("k8s-follow").await;
        cluster
            .apply(&[
                node("node-a", Some("region-1"), "zone-a"),
                // No region label yet: given later.
                node("node-b", None, "zone-b"),
                node("node-c", Some("region-2"), "zone-c"),
                service("web", "10.96.0.10"),
                pod("web-1", "node-a", "127.0.0.11", Some(2)),
                pod("web-2", "node-b", "127.0.0.12", None),
                pod("web-3", "node-c", "127.0.0.13", None),
                slice(
                    "web-abc",
                    port,
                    &[
                        ep("127.0.0.11", "web-1", "node-a", "zone-a"),
                        ep("127.0.0.12", "web-2", "node-b", "zone-b"),
                    ],
                ),
            ])
            .await;
        let cp = cluster.control_plane().await;
        let watch = Watch::start("web", cp.addr("discovery")).await;

        // The snapshot: named port mapped to the slice's port, weight from the pod,
        // locality from slice and node.
        let snapshot = watch.until("the first snapshot", |i| i.len() == 2).await;
        let one = find(&snapshot, "127.0.0.11").unwrap();
        assert_eq!(one["address"], format!("127.0.0.11:{port}"));
        assert_eq!(one["weight"], 2);
        assert_eq!(
            (one["region"].as_str(), one["zone"].as_str()),
            (Some("region-1"), Some("zone-a"))
        );
        assert_eq!(one["health"], "healthy");
        assert_eq!(one["identity"], "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(find(&snapshot, "127.0.0.12").unwrap()["region"], "");

        // ClusterIP:port names the same service.
        let by_ip = tokio::process::Command::new(exe())
            .args([
                "endpoints",
                "10.96.0.10:80",
                "-o",
                "json",
                "--control-plane",
            ])
            .arg(cp.addr("discovery").to_string())
            .output()
            .await
            .unwrap();
        let items: Vec<Value> = serde_json::from_slice(&by_ip.stdout).unwrap();
        assert_eq!(items.len(), 2);

        // A proxy on node-a keeps its traffic in zone-a…
        let local = proxy(cp.addr("discovery"), &["--node", "node-a"]).await;
        let mut conn = Connection::http1(local.addr("proxy")).await.unwrap();
        let c = counts(&instances(&mut conn, "web", 10).await);
        assert_eq!(c.get("instance-1"), Some(&10), "{c:?}");
        // …and a proxy with no locality balances 2:1, as the weight annotation says.
        let proxy = proxy(cp.addr("discovery"), &[]).await;
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();
        let c = counts(&instances(&mut conn, "web", 30).await);
        assert_eq!((c["instance-1"], c["instance-2"]), (20, 10), "{c:?}");

        // Scale up.
        cluster
            .apply(&[slice(
                "web-abc",
                port,
                &[
                    ep("127.0.0.11", "web-1", "node-a", "zone-a"),
                    ep("127.0.0.12", "web-2", "node-b", "zone-b"),
                    ep("127.0.0.13", "web-3", "node-c", "zone-c"),
                ],
            )])
            .await;
        let scaled = watch.until("the scale-up", |i| i.len() == 3).await;
        assert_eq!(find(&scaled, "127.0.0.13").unwrap()["region"], "region-2");

        // A node label gives node-b its region.
        cluster
            .apply(&[node("node-b", Some("region-1"), "zone-b")])
            .await;
        watch
            .until("node-b's region", |i| {
                find(i, "127.0.0.12").is_some_and(|e| e["region"] == "region-1")
            })
            .await;

        // A pod goes terminating: DRAINING, sent not dropped, and no new requests.
        let mut terminating = ep("127.0.0.11", "web-1", "node-a", "zone-a");
        terminating.ready = false;
        terminating.terminating = true;
        cluster
            .apply(&[slice(
                "web-abc",
                port,
                &[
                    terminating,
                    ep("127.0.0.12", "web-2", "node-b", "zone-b"),
                    ep("127.0.0.13", "web-3", "node-c", "zone-c"),
                ],
            )])
            .await;
        watch
            .until("web-1 draining", |i| {
                find(i, "127.0.0.11").is_some_and(|e| e["health"] == "draining")
            })
            .await;
        eventually(
            CHANGE,
            "the proxy to stop sending to the draining pod",
            || {
                let proxy = proxy.addr("proxy");
                async move {
                    let mut c = Connection::http1(proxy).await.ok()?;
                    let seen = instances(&mut c, "web", 10).await;
                    (!seen.contains(&"instance-1".to_string())).then_some(())
                }
            },
        )
        .await;

        // The slice is split in two: web-3 moves to web-def. Proxies must not see it leave.
        let before_split = watch.all().len();
        cluster
            .apply(&[slice(
                "web-def",
                port,
                &[ep("127.0.0.13", "web-3", "node-c", "zone-c")],
            )])
            .await;
        cluster
            .apply(&[slice(
                "web-abc",
                port,
                &[ep("127.0.0.12", "web-2", "node-b", "zone-b")],
            )])
            .await;
        // Scale down: web-1 (draining) is gone from web-abc too, so the set is {12, 13}.
        let after = watch
            .until("the split and scale-down", |i| i.len() == 2)
            .await;
        assert_eq!(
            addresses(&after),
            vec![format!("127.0.0.12:{port}"), format!("127.0.0.13:{port}")]
        );
        for printed in &watch.all()[before_split..] {
            assert!(
                find(printed, "127.0.0.13").is_some(),
                "web-3 flapped during the split: {printed:?}"
            );
        }

        // A slice deleted.
        cluster
            .kubectl(&["delete", "endpointslice", "web-def", "-n", "default"])
            .await;
        let remaining = watch.until("web-def's deletion", |i| i.len() == 1).await;
        assert!(find(&remaining, "127.0.0.12").is_some());

        let metrics = admin_get(cp.addr("admin"), "/metrics").await;
        for kind in ["service", "endpointslice", "node", "pod"] {
            assert!(
                metrics.contains(&format!(
                    "tandem_control_plane_watch_events_total{{kind=\"{kind}\"}}"
                )),
                "{metrics}"
            );
        }
        assert!(
            metrics.contains("tandem_control_plane_source_up 1"),
            "{metrics}"
        );
        assert!(
            metrics.contains("tandem_control_plane_push_latency_seconds_count"),
            "{metrics}"
        );
    })
    .await
}

#[tokio::test]
async fn odd_objects_are_tolerated_and_logged_once() {
    bounded(LIMIT, async {
        let cluster = Cluster::start("k8s-odd").await;
        let fqdn = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "ext-fqdn", "namespace": "default", "labels": {"kubernetes.io/service-name": "ext"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["db.example.com"]}],
            "ports": [{"name": "", "port": 5432}]
        });
        let ipv6 = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "v6-x", "namespace": "default", "labels": {"kubernetes.io/service-name": "v6"}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00::1"], "conditions": {}}],
            "ports": [{"port": 8080}]
        });
        let unnamed_port_service = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "v6", "namespace": "default"},
            "spec": {"ports": [{"port": 80, "targetPort": 8080}]}
        });
        let selector_matches_nothing = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "lonely", "namespace": "default"},
            "spec": {"selector": {"app": "nobody"}, "ports": [{"name": "http", "port": 80}]}
        });
        let ext = json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "default"},
            "spec": {"ports": [{"name": "", "port": 5432}]}
        });
        let bare_node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bare"}});
        let bad_weight = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "heavy", "namespace": "default", "annotations": {"tandem.io/weight": "lots"}},
            "spec": {"containers": [{"name": "x", "image": "x"}]}
        });
        cluster
            .apply(&[fqdn.clone(), ipv6, unnamed_port_service, selector_matches_nothing, ext, bare_node, bad_weight])
            .await;
        let cp = cluster.control_plane().await;

        // The IPv6 slice with an unnamed port maps to the unnamed Service port.
        let v6 = Watch::start("v6", cp.addr("discovery")).await;
        let items = v6.until("the IPv6 endpoint", |i| i.len() == 1).await;
        assert_eq!(items[0]["address"], "[fd00::1]:8080");
        assert_eq!(items[0]["health"], "healthy", "nil conditions mean ready");
        // A Service whose selector matches nothing exists, with no endpoints.
        let lonely = Watch::start("lonely", cp.addr("discovery")).await;
        lonely.until("an empty set", |i| i.is_empty()).await;

        // Touch the FQDN slice twice more: the watch keeps going and logs it once.
        for n in 0..2 {
            let mut changed = fqdn.clone();
            changed["metadata"]["labels"]["touch"] = json!(n.to_string());
            cluster.apply(&[changed]).await;
        }
        cluster
            .apply(&[json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "v6-y", "namespace": "default", "labels": {"kubernetes.io/service-name": "v6"}},
                "addressType": "IPv6",
                "endpoints": [{"addresses": ["fd00::2"]}],
                "ports": [{"port": 8080}]
            })])
            .await;
        v6.until("the watch still flowing", |i| i.len() == 2).await;
        let log = cp.log_text();
        assert_eq!(log.matches("FQDN addresses").count(), 1, "{log}");
        assert_eq!(log.matches("Node bare has no topology").count(), 1, "{log}");
        assert_eq!(log.matches("tandem.io/weight=\"lots\"").count(), 1, "{log}");
    })
    .await
}

#[tokio::test]
async fn an_api_server_restart_does_not_flap_unchanged_endpoints() {
    bounded(LIMIT, async {
        let (port, _backends) = backends(2).await;
        let mut cluster = Cluster::start("k8s-restart").await;
        let objects = vec![
            node("node-a", Some("region-1"), "zone-a"),
            service("web", "10.96.0.10"),
            pod("web-1", "node-a", "127.0.0.11", None),
            pod("web-2", "node-a", "127.0.0.12", None),
            slice(
                "web-abc",
                port,
                &[
                    ep("127.0.0.11", "web-1", "node-a", "zone-a"),
                    ep("127.0.0.12", "web-2", "node-a", "zone-a"),
                ],
            ),
        ];
        cluster.apply(&objects).await;
        let cp = cluster.control_plane().await;
        let watch = Watch::start("web", cp.addr("discovery")).await;
        watch.until("the snapshot", |i| i.len() == 2).await;
        let proxy = proxy(cp.addr("discovery"), &[]).await;
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();
        assert_eq!(counts(&instances(&mut conn, "web", 4).await).len(), 2);

        // The API server goes away: proxies keep the last state; the control plane says so.
        let api_port = cluster.port();
        cluster.api.kill().await;
        let admin = cp.addr("admin");
        eventually(
            CHANGE,
            "the control plane to report the API server down",
            || async move {
                admin_get(admin, "/metrics")
                    .await
                    .contains("tandem_control_plane_source_up 0")
                    .then_some(())
            },
        )
        .await;
        eventually(CHANGE, "the outage in the control plane's log", || {
            let logged = cp.log_text().contains("cannot watch the API server");
            async move { logged.then_some(()) }
        })
        .await;
        assert_eq!(
            counts(&instances(&mut conn, "web", 10).await).len(),
            2,
            "traffic flows meanwhile"
        );

        // It comes back with its state lost and re-applied: nothing changes for proxies.
        let printed_before = watch.all().len();
        let preload = cluster.dir.path("state.json");
        std::fs::write(&preload, serde_json::to_vec(&list(&objects)).unwrap()).unwrap();
        cluster.api = Cluster::spawn(&cluster.kubeconfig, api_port, Some(&preload)).await;
        eventually(
            Duration::from_secs(60),
            "the control plane to recover",
            || async move {
                admin_get(admin, "/metrics")
                    .await
                    .contains("tandem_control_plane_source_up 1")
                    .then_some(())
            },
        )
        .await;
        eventually(CHANGE, "the recovery in the control plane's log", || {
            let logged = cp.log_text().contains("the API server answers again");
            async move { logged.then_some(()) }
        })
        .await;

        // A real change after the restart flows, and is the first thing proxies see.
        cluster
            .apply(&[pod("web-1", "node-a", "127.0.0.11", Some(3))])
            .await;
        watch
            .until("the weight change", |i| {
                find(i, "127.0.0.11").is_some_and(|e| e["weight"] == 3)
            })
            .await;
        let printed = watch.all();
        assert_eq!(
            printed.len(),
            printed_before + 1,
            "the restart must not send anything for unchanged endpoints: {:?}",
            &printed[printed_before..]
        );
    })
    .await
}

#[tokio::test]
async fn callers_are_counted_from_the_proxies_when_the_service_asks() {
    bounded(LIMIT, async {
        let (port, _backends) = backends(2).await;
        let cluster = Cluster::start("k8s-callers").await;
        let mut web = service("web", "10.96.0.10");
        web["metadata"]["annotations"] = json!({"tandem.io/callers": "counted"});
        cluster
            .apply(&[
                node("node-a", Some("region-1"), "zone-a"),
                node("node-b", Some("region-1"), "zone-b"),
                web,
                pod("web-1", "node-a", "127.0.0.11", None),
                pod("web-2", "node-b", "127.0.0.12", None),
                slice(
                    "web-abc",
                    port,
                    &[
                        ep("127.0.0.11", "web-1", "node-a", "zone-a"),
                        ep("127.0.0.12", "web-2", "node-b", "zone-b"),
                    ],
                ),
            ])
            .await;
        let cp = cluster.control_plane().await;
        let mut clients = Vec::new();
        for (node, pod) in [
            ("node-a", "client-1"),
            ("node-a", "client-2"),
            ("node-b", "client-3"),
        ] {
            let p = proxy(cp.addr("discovery"), &["--node", node, "--pod", pod]).await;
            let mut conn = Connection::http1(p.addr("proxy")).await.unwrap();
            instances(&mut conn, "web", 1).await;
            clients.push(p);
        }
        let admin = clients[0].addr("admin");
        let callers = move || async move {
            let config: Value = serde_json::from_str(&admin_get(admin, "/config").await).ok()?;
            let web = config["destinations"]
                .as_array()?
                .iter()
                .find(|d| d["name"] == "web:80")?;
            Some(web["callers"].clone())
        };
        let two_zones = json!({"zone-a": 2.0, "zone-b": 1.0});
        eventually(
            CHANGE,
            "callers counted per zone of the proxies' nodes",
            || {
                let two_zones = two_zones.clone();
                async move { callers().await.filter(|c| *c == two_zones).map(|_| ()) }
            },
        )
        .await;

        // The caller in zone-b goes away: the count follows.
        clients.pop().unwrap().kill().await;
        let one_zone = json!({"zone-a": 2.0});
        eventually(CHANGE, "the departed caller to leave the count", || {
            let one_zone = one_zone.clone();
            async move { callers().await.filter(|c| *c == one_zone).map(|_| ()) }
        })
        .await;
    })
    .await
}
