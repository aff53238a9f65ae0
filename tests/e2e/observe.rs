//! `deploy/observability/` against the real programs: the dashboards checked against
//! Grafana's schema (the Grafana Foundation SDK's strict decoding, through
//! `dashboard-check`), the Prometheus configuration by `promtool` and the Jaeger one
//! by `jaeger validate`, and every panel query of every dashboard run against a real
//! Prometheus that found the meshed pods of the tests' cluster through its API server
//! (deploy's own scrape configuration) and scraped them while traffic crossed three
//! zones.
//!
//! Prometheus is built from its Go module by `tests/cluster/build-tools.sh prometheus`:
//! Debian's package (2.42+ds) is built without Kubernetes discovery.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::{Cluster, cluster, pod_ip};
use crate::injection::{CLUSTER_WIDE, Injector};
use crate::mesh::{cluster_ip, try_in_pod};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(400);
/// How long the clients' traffic may run.
const LOAD_FOR: Duration = Duration::from_secs(150);
/// What the tests put for Grafana's `$__rate_interval`: four scrapes (1 s apart) and more.
const RATE_INTERVAL: &str = "15s";

fn observability() -> PathBuf {
    repo().join("deploy/observability")
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = observability().join("grafana/dashboards");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("a dashboard file");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), json)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Every query of a dashboard: (panel title, refId, expr).
fn queries(dashboard: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_string();
        for target in panel["targets"].as_array().into_iter().flatten() {
            out.push((
                title.clone(),
                target["refId"].as_str().unwrap_or("?").to_string(),
                target["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

/// Runs a program to its end (bounded); its exit status and output.
fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn the_dashboards_are_grafana_dashboards_and_a_broken_one_is_refused() {
    let check = built_tool("dashcheck", "dashboard-check", "TANDEM_DASHBOARD_CHECK");
    let files: Vec<String> = dashboards()
        .iter()
        .map(|(name, _)| {
            observability()
                .join("grafana/dashboards")
                .join(name)
                .display()
                .to_string()
        })
        .collect();
    assert_eq!(
        files.len(),
        5,
        "overview, service, locality, proxy, control plane: {files:?}"
    );
    let args: Vec<&str> = files.iter().map(String::as_str).collect();
    let (ok, said) = run(&check, &args);
    assert!(ok, "Grafana's schema refuses a dashboard:\n{said}");

    // The validator is not a rubber stamp: a panel with a field Grafana does not
    // know, and a query with a misspelt one, are named.
    let dir = TestDir::new("dashboards");
    let (_, mut broken) = dashboards().remove(0);
    broken["panels"][0]["gridpos"] = json!({"x": 0});
    broken["panels"][0]["targets"][0]["expresion"] = json!("up");
    let file = dir.path("broken.json");
    std::fs::write(&file, broken.to_string()).unwrap();
    let (ok, said) = run(&check, &[file.to_str().unwrap()]);
    assert!(!ok, "{said}");
    assert!(said.contains("unexpected field 'gridpos'"), "{said}");
    assert!(said.contains("unexpected field 'expresion'"), "{said}");

    // What the schema leaves to us: ids unique in a dashboard, every query on the
    // provisioned Prometheus data source, the template variables the panels use.
    for (name, dashboard) in dashboards() {
        let panels = dashboard["panels"].as_array().expect("panels");
        let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
        assert_eq!(ids.len(), panels.len(), "{name}: panel ids are unique");
        let variables: BTreeSet<String> = dashboard["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect();
        for panel in panels {
            let title = &panel["title"];
            assert_eq!(panel["datasource"]["uid"], "prometheus", "{name} / {title}");
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{name} / {title} has queries");
            for target in targets {
                assert_eq!(
                    target["datasource"]["uid"], "prometheus",
                    "{name} / {title}"
                );
                let expr = target["expr"].as_str().unwrap_or("");
                for var in ["namespace", "service"] {
                    if expr.contains(&format!("${var}")) {
                        assert!(
                            variables.contains(var),
                            "{name} / {title} uses ${var}, which it does not define"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn promtool_and_jaeger_accept_the_configurations_and_refuse_broken_ones() {
    let promtool = built_tool("prometheus", "promtool", "TANDEM_PROMTOOL");
    let config = observability().join("prometheus/prometheus.yml");
    let (ok, said) = run(&promtool, &["check", "config", config.to_str().unwrap()]);
    assert!(ok, "promtool check config:\n{said}");
    let dir = TestDir::new("promtool");
    let broken = dir.path("prometheus.yml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&broken, text.replace("action: keep", "action: kept")).unwrap();
    let (ok, said) = run(&promtool, &["check", "config", broken.to_str().unwrap()]);
    assert!(
        !ok && said.contains("kept"),
        "a bad relabel action is refused: {said}"
    );

    let jaeger = built_tool("jaeger", "jaeger", "TANDEM_JAEGER");
    let config = observability().join("jaeger/config.yaml");
    let arg = format!("--config={}", config.display());
    let (ok, said) = run(&jaeger, &["validate", &arg]);
    assert!(ok, "jaeger validate:\n{said}");
}

/// A real Prometheus, stopped (by its PID) when dropped.
struct Prometheus {
    child: tokio::process::Child,
    addr: SocketAddr,
    _dir: TestDir,
}

impl Prometheus {
    /// Prometheus with deploy/'s scrape configuration, pointed at the test cluster's
    /// API server (a kubeconfig instead of the in-cluster account), scraping every
    /// second; the control plane, which runs on this host rather than in a pod, is a
    /// static target of its job, labelled with its `namespace` as discovery would.
    async fn start(
        cluster: &Cluster,
        control_plane_admin: SocketAddr,
        namespace: &str,
    ) -> Prometheus {
        let mut config = yaml(&observability().join("prometheus/prometheus.yml"));
        config["global"]["scrape_interval"] = json!("1s");
        config["global"]["evaluation_interval"] = json!("1s");
        let kubeconfig = cluster.kubeconfig().display().to_string();
        for job in config["scrape_configs"]
            .as_array_mut()
            .expect("scrape_configs")
        {
            if job["job_name"] == "tandem-control-plane" {
                job.as_object_mut().unwrap().remove("kubernetes_sd_configs");
                job.as_object_mut().unwrap().remove("relabel_configs");
                job["static_configs"] = json!([{
                    "targets": [control_plane_admin.to_string()],
                    "labels": {"namespace": namespace},
                }]);
                continue;
            }
            for sd in job["kubernetes_sd_configs"]
                .as_array_mut()
                .expect("kubernetes discovery")
            {
                sd["kubeconfig_file"] = json!(kubeconfig);
            }
        }
        let dir = TestDir::new("prometheus");
        let file = dir.path("prometheus.yml");
        // JSON is YAML.
        std::fs::write(&file, config.to_string()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let child = tokio::process::Command::new(built_tool(
            "prometheus",
            "prometheus",
            "TANDEM_PROMETHEUS",
        ))
        .arg(format!("--config.file={}", file.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path("prometheus.log")).unwrap())
        .stderr(std::fs::File::create(dir.path("prometheus.err")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        eventually(Duration::from_secs(60), "Prometheus ready", || async move {
            let mut conn = tandem::client::Connection::http1(addr).await.ok()?;
            let reply = conn.get("localhost", "/-/ready").await.ok()?;
            reply.status.is_success().then_some(())
        })
        .await;
        prometheus
    }

    /// An instant query: its result vector (`Err`: what Prometheus said was wrong).
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let mut conn = tandem::client::Connection::http1(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let reply = conn
            .get("localhost", &path)
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = serde_json::from_str(&reply.text()).map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

/// A YAML file of deploy/, as a JSON value.
fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `web` in zone-a and zone-b (one pod each), a Service `empty` with no endpoints, and
/// a client in each of the three zones; all meshed.
fn workloads() -> Vec<Value> {
    let run = json!({"agent.tandem.io/run": "true"});
    let web = |zone: &str| {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": format!("web-{zone}")},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web", "zone": zone}},
                "template": {
                    "metadata": {"labels": {"app": "web", "zone": zone}, "annotations": run},
                    "spec": {
                        "serviceAccountName": "web",
                        "terminationGracePeriodSeconds": 2,
                        "nodeSelector": {"topology.kubernetes.io/zone": zone},
                        "containers": [{
                            "name": "app", "image": "tandem",
                            "command": ["tandem", "backend", "--name", format!("web-{zone}"), "--listen", "0.0.0.0:8080", "--quiet"],
                            "ports": [{"containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
                        }]
                    }
                }
            }
        })
    };
    let client = |zone: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("client-{zone}"), "labels": {"app": "client"}, "annotations": run},
            "spec": {
                "serviceAccountName": "client",
                "terminationGracePeriodSeconds": 2,
                "nodeSelector": {"topology.kubernetes.io/zone": zone},
                "containers": [{
                    "name": "app", "image": "tandem",
                    "command": ["tandem", "backend", "--name", "client", "--listen", "127.0.0.1:7000", "--quiet"]
                }]
            }
        })
    };
    let account =
        |sa: &str| json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}});
    let service = |name: &str, app: &str| {
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        })
    };
    vec![
        account("web"),
        account("client"),
        service("web", "web"),
        service("empty", "nothing"),
        web("zone-a"),
        web("zone-b"),
        client("zone-a"),
        client("zone-b"),
        client("zone-c"),
    ]
}

/// A client's traffic for `seconds` (the test stops it sooner): mostly `/` of web, some
/// 5xx and 4xx from it, and some to the Service with no endpoints (the proxy answers
/// those itself). Bounded in time and count.
const LOAD: &str = r#"
import sys, time, urllib.request, urllib.error
web, empty, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end, n = time.time() + seconds, 0
while time.time() < end and n < 20000:
    n += 1
    url = f"http://{web}/"
    if n % 10 == 0: url = f"http://{web}/status/503"
    if n % 15 == 0: url = f"http://{web}/status/404"
    if n % 20 == 0: url = f"http://{empty}/"
    try:
        urllib.request.urlopen(url, timeout=5).read()
    except urllib.error.HTTPError:
        pass
    time.sleep(0.02)
print(n)
"#;

#[tokio::test]
async fn every_dashboard_panel_returns_data_from_prometheus_scraping_the_mesh() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("observe").await;
        let injector = Injector::start_with(&ns, Some(cluster.pod_gateway())).await;
        ns.apply(&workloads()).await;
        ns.wait_ready("app=web", 2).await;
        let mut clients = Vec::new();
        for zone in ["zone-a", "zone-b", "zone-c"] {
            let pod = ns.wait_pod(&format!("client-{zone}"), "ready", crate::cluster::is_ready).await;
            clients.push(pod_ip(&pod).expect("a client's address"));
        }
        let web = cluster_ip(&ns, "web").await.to_string();
        let empty = cluster_ip(&ns, "empty").await.to_string();
        // Each client's proxy may learn of web's endpoints after the pods are Ready.
        for ip in &clients {
            let ip = *ip;
            let url = format!("http://{web}/");
            eventually(Duration::from_secs(30), "web answers each client", || {
                let url = url.clone();
                async move {
                    let (ok, _) = try_in_pod(cluster, ip, &["curl", "-sf", "--max-time", "5", &url]).await;
                    ok.then_some(())
                }
            })
            .await;
        }

        let mut prometheus = Prometheus::start(cluster, injector.cp.addr("admin"), ns.name()).await;
        // Each client's traffic, for as long as the checks below take (at most LOAD_FOR).
        let loads: Vec<_> = clients
            .iter()
            .map(|ip| {
                let seconds = LOAD_FOR.as_secs().to_string();
                let args = ["python3", "-c", LOAD, &web, &empty, &seconds].map(str::to_string);
                let ip = *ip;
                tokio::spawn(async move {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let limit = LOAD_FOR + Duration::from_secs(30);
                    crate::mesh::try_in_pod_for(cluster, ip, &args, limit).await
                })
            })
            .collect();

        // Discovery through the API server found every meshed pod, labelled by
        // deploy/'s relabelling, and scrapes them.
        let ns_name = ns.name().to_string();
        let up = format!(r#"up{{job="tandem-proxy",namespace="{ns_name}"}} == 1"#);
        let prom = &prometheus;
        eventually(Duration::from_secs(60), "5 proxies scraped", || {
            let up = up.clone();
            async move { (prom.query(&up).await.ok()?.len() == 5).then_some(()) }
        })
        .await;
        let webs = prometheus
            .query(&format!(r#"up{{job="tandem-proxy",namespace="{ns_name}",workload="web"}}"#))
            .await
            .unwrap();
        assert_eq!(webs.len(), 2, "web's two pods, named by their app label: {webs:?}");
        assert!(webs.iter().all(|s| s["metric"]["pod"].as_str().is_some_and(|p| p.starts_with("web-"))));

        // Enough traffic in Prometheus for rates over RATE_INTERVAL.
        let traffic = format!(
            r#"sum(increase(tandem_proxy_zone_requests_total{{dst_namespace="{ns_name}",dst_service="web",tier="anywhere"}}[{RATE_INTERVAL}]))"#
        );
        eventually(Duration::from_secs(60), "cross-zone traffic in Prometheus", || {
            let traffic = traffic.clone();
            async move {
                let result = prom.query(&traffic).await.ok()?;
                let value: f64 = result.first()?["value"][1].as_str()?.parse().ok()?;
                (value > 20.0).then_some(())
            }
        })
        .await;

        // Every query of every panel, with the variables a user would pick: the
        // test's namespace; web as the service, all of them on the overview (as it
        // opens), the client workload on the proxy dashboard (web's proxies make no
        // outbound connections). Queries without data are asked again until the
        // deadline: a series shows once scraped twice.
        let mut pending: Vec<(String, String)> = Vec::new();
        for (name, dashboard) in dashboards() {
            let service = match name.as_str() {
                "tandem-overview.json" => ".*",
                "tandem-proxy.json" => "client",
                _ => "web",
            };
            for (panel, ref_id, expr) in queries(&dashboard) {
                let filled = expr
                    .replace("$__rate_interval", RATE_INTERVAL)
                    .replace("$namespace", &ns_name)
                    .replace("$service", service);
                pending.push((format!("{name} / {panel} / {ref_id}"), filled));
            }
        }
        assert!(pending.len() >= 30, "{} queries", pending.len());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut failures = Vec::new();
        while !pending.is_empty() {
            failures.clear();
            let mut still = Vec::new();
            for (what, expr) in pending {
                let failure = match prometheus.query(&expr).await {
                    Ok(result) if !result.is_empty() => continue,
                    Ok(_) => format!("{what}: no data: {expr}"),
                    Err(error) => format!("{what}: {error}: {expr}"),
                };
                failures.push(failure);
                still.push((what, expr));
            }
            pending = still;
            if pending.is_empty() || tokio::time::Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if !failures.is_empty() {
            let web_pods = ns.wait_ready("app=web", 2).await;
            let web_page = admin_get(SocketAddr::from((pod_ip(&web_pods[0]).unwrap(), 4191)), "/metrics").await;
            let scraped = prometheus
                .query("count by (job, workload, pod) (up)")
                .await;
            panic!(
                "panels without data after 60 s:\n{}\n\nscraped: {scraped:?}\nweb's proxy:\n{web_page}",
                failures.join("\n")
            );
        }

        // The cross-zone share is what the balancer expects: zone-c's client has no
        // web in its zone (all its traffic leaves the region), the others keep theirs.
        let expected = prometheus
            .query(&format!(r#"tandem_proxy_expected_cross_zone_share{{namespace="{ns_name}",workload="client",dst_service="web"}}"#))
            .await
            .unwrap();
        let share_of = |pod_zone: &str| {
            expected
                .iter()
                .find(|s| s["metric"]["pod"] == format!("client-{pod_zone}"))
                .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
        };
        assert_eq!(share_of("zone-c"), Some(1.0), "{expected:?}");
        assert_eq!(share_of("zone-a"), Some(0.0), "{expected:?}");

        for load in loads {
            load.abort();
        }
        prometheus.stop().await;
    })
    .await
}
