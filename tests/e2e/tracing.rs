//! Traces in a real Jaeger (v2, built from its Go module by
//! `tests/cluster/build-tools.sh jaeger`; all-in-one with memory storage): meshed pods
//! of the tests' cluster whose injected proxies send spans over OTLP/gRPC, and
//! Jaeger's query API read back as a user's UI would.
//!
//! Jaeger listens for OTLP on the pods' gateway (the host side of their bridge, which
//! the cluster made for the test) and serves its query API on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::{cluster, name, pod_ip};
use crate::injection::{CLUSTER_WIDE, Injector};
use crate::mesh::{cluster_ip, in_pod, series, try_in_pod};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(300);

/// Jaeger all-in-one, stopped (by its PID) when dropped.
struct Jaeger {
    child: tokio::process::Child,
    /// OTLP/gRPC, where proxies send spans.
    otlp: SocketAddr,
    /// The query API (`/api/traces/{id}`).
    query: SocketAddr,
    _dir: TestDir,
}

/// A port the OS had free on `ip` (released for the program about to bind it).
fn free_port(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("a free port on {ip}: {e}"))
        .port()
}

impl Jaeger {
    /// Starts Jaeger with OTLP on `otlp_ip` and everything else on 127.0.0.1, and
    /// waits for its health check.
    async fn start(otlp_ip: IpAddr) -> Jaeger {
        let local = IpAddr::from(Ipv4Addr::LOCALHOST);
        let otlp = SocketAddr::new(otlp_ip, free_port(otlp_ip));
        let [otlp_http, query, query_grpc, health, metrics] = [(); 5].map(|()| {
            // Held until all five are chosen, so they differ.
            std::net::TcpListener::bind((local, 0)).expect("a free port")
        });
        let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
        let (query_port, health_port) = (port(&query), port(&health));
        let config = format!(
            r#"service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces: {{receivers: [otlp], processors: [batch], exporters: [jaeger_storage_exporter]}}
  telemetry:
    metrics: {{level: basic, readers: [{{pull: {{exporter: {{prometheus: {{host: 127.0.0.1, port: {metrics}}}}}}}}}]}}
extensions:
  healthcheckv2: {{use_v2: true, http: {{endpoint: "127.0.0.1:{health}"}}}}
  jaeger_storage: {{backends: {{mem: {{memory: {{max_traces: 100000}}}}}}}}
  jaeger_query:
    storage: {{traces: mem}}
    enable_tracing: false
    http: {{endpoint: "127.0.0.1:{query}"}}
    grpc: {{endpoint: "127.0.0.1:{query_grpc}"}}
receivers:
  otlp: {{protocols: {{grpc: {{endpoint: "{otlp}"}}, http: {{endpoint: "127.0.0.1:{otlp_http}"}}}}}}
processors: {{batch: {{timeout: 100ms}}}}
exporters: {{jaeger_storage_exporter: {{trace_storage: mem}}}}
"#,
            metrics = port(&metrics),
            health = health_port,
            query = query_port,
            query_grpc = port(&query_grpc),
            otlp_http = port(&otlp_http),
        );
        drop((otlp_http, query, query_grpc, health, metrics));
        let dir = TestDir::new("jaeger");
        let config_file = dir.path("jaeger.yaml");
        std::fs::write(&config_file, config).expect("write jaeger.yaml");
        let log = dir.path("jaeger.log");
        let child = tokio::process::Command::new(jaeger())
            .arg(format!("--config={}", config_file.display()))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("jaeger's log"))
            .stderr(std::fs::File::create(dir.path("jaeger.err")).expect("jaeger's log"))
            .kill_on_drop(true)
            .spawn()
            .expect("jaeger starts");
        let health = SocketAddr::from((Ipv4Addr::LOCALHOST, health_port));
        let jaeger = Jaeger {
            child,
            otlp,
            query: SocketAddr::from((Ipv4Addr::LOCALHOST, query_port)),
            _dir: dir,
        };
        eventually(Duration::from_secs(30), "Jaeger healthy", || async move {
            let mut conn = tandem::client::Connection::http1(health).await.ok()?;
            let reply = conn.get("localhost", "/status").await.ok()?;
            reply.status.is_success().then_some(())
        })
        .await;
        jaeger
    }

    /// The trace `id` as Jaeger's query API gives it (`None`: not there, yet).
    async fn trace(&self, id: &str) -> Option<Value> {
        let mut conn = tandem::client::Connection::http1(self.query).await.ok()?;
        let reply = conn
            .get("localhost", &format!("/api/traces/{id}"))
            .await
            .ok()?;
        if !reply.status.is_success() {
            return None;
        }
        let body: Value = serde_json::from_str(&reply.text()).ok()?;
        body["data"].get(0).cloned()
    }

    /// Stops Jaeger (SIGKILL by its PID) and reaps it.
    async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn jaeger() -> PathBuf {
    built_tool("jaeger", "jaeger", "TANDEM_JAEGER")
}

/// A meshed `web` Deployment behind a Service, and a meshed `client` pod; each with
/// an `app` label (the name their spans carry) and a ServiceAccount (their identity).
fn workloads() -> Vec<Value> {
    let zone_a = json!({"topology.kubernetes.io/zone": "zone-a"});
    let account =
        |sa: &str| json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}});
    let run = json!({"agent.tandem.io/run": "true"});
    vec![
        account("web"),
        account("client"),
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}, "annotations": run},
                    "spec": {
                        "serviceAccountName": "web",
                        "terminationGracePeriodSeconds": 2,
                        "nodeSelector": zone_a,
                        "containers": [{
                            "name": "app", "image": "tandem",
                            "command": ["tandem", "backend", "--name", "web", "--listen", "0.0.0.0:8080"],
                            "ports": [{"containerPort": 8080}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
                        }]
                    }
                }
            }
        }),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "client", "labels": {"app": "client"}, "annotations": run},
            "spec": {
                "serviceAccountName": "client",
                "terminationGracePeriodSeconds": 2,
                "nodeSelector": zone_a,
                "containers": [{
                    "name": "app", "image": "tandem",
                    "command": ["tandem", "backend", "--name", "client", "--listen", "127.0.0.1:7000"]
                }]
            }
        }),
    ]
}

/// A span's tag, as Jaeger writes it (`None`: no such tag).
fn tag<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)
        .map(|t| &t["value"])
}

/// The spans of a trace, each with its process's service name.
fn spans(trace: &Value) -> Vec<(String, Value)> {
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .map(|spans| {
            spans
                .iter()
                .map(|s| {
                    let process = &processes[s["processID"].as_str().unwrap_or("")];
                    let service = process["serviceName"].as_str().unwrap_or("").to_string();
                    let mut span = s.clone();
                    span["process"] = process.clone();
                    (service, span)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The span of `service`'s proxy in a trace.
fn span_of<'a>(spans: &'a [(String, Value)], service: &str) -> &'a Value {
    &spans
        .iter()
        .find(|(s, _)| s == service)
        .unwrap_or_else(|| panic!("a span of {service}: {spans:?}"))
        .1
}

/// The parent span id a span names (CHILD_OF).
fn parent(span: &Value) -> &str {
    span["references"]
        .as_array()
        .and_then(|refs| refs.iter().find(|r| r["refType"] == "CHILD_OF"))
        .and_then(|r| r["spanID"].as_str())
        .unwrap_or("")
}

/// A process tag of a span (its resource attributes).
fn process_tag<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span["process"]["tags"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key)?["value"]
        .as_str()
}

/// What `/headers` of `tandem backend` says the app received as `traceparent`.
fn traceparent_seen(headers: &str) -> &str {
    headers
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("the app received a traceparent: {headers}"))
        .trim()
}

#[tokio::test]
async fn a_request_through_two_proxies_is_one_trace_in_jaeger() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let gateway = cluster.pod_gateway();
        let mut jaeger = Jaeger::start(IpAddr::from(gateway)).await;
        let ns = cluster.namespace("tracing").await;
        let collector = jaeger.otlp.to_string();
        // Ratio 0: only requests whose caller sent a sampled context are traced.
        let _injector = Injector::start_with_flags(
            &ns,
            Some(gateway),
            &[
                "--proxy-trace-collector",
                &collector,
                "--proxy-trace-sample-ratio",
                "0",
            ],
        )
        .await;
        ns.apply(&workloads()).await;
        let web = ns.wait_ready("app=web", 1).await;
        let client = ns
            .wait_pod("client", "ready", crate::cluster::is_ready)
            .await;
        let client_ip = pod_ip(&client).expect("the client pod's address");
        let web_ip = pod_ip(&web[0]).expect("the web pod's address");
        let url = format!("http://{}/headers", cluster_ip(&ns, "web").await);
        let curl = |traceparent: Option<String>| {
            let url = url.clone();
            async move {
                let mut args = vec![
                    "curl".to_string(),
                    "-sS".into(),
                    "--max-time".into(),
                    "5".into(),
                ];
                if let Some(tp) = traceparent {
                    args.extend(["-H".to_string(), format!("traceparent: {tp}")]);
                }
                args.push(url);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                in_pod(cluster, client_ip, &args).await
            }
        };
        // The client proxy may learn of web's endpoint after the pod is Ready, and
        // web's proxy may not take connections yet: a first try may time out.
        let url_first = url.clone();
        eventually(
            Duration::from_secs(30),
            "web answers through the mesh",
            || {
                let url = url_first.clone();
                async move {
                    let args = ["curl", "-sS", "--max-time", "5", url.as_str()];
                    let (ok, said) = try_in_pod(cluster, client_ip, &args).await;
                    (ok && said.contains("host:")).then_some(())
                }
            },
        )
        .await;

        // Unsampled: the context goes on untouched, and no span is made.
        let unsampled = "11111111111111111111111111111111";
        let sent = format!("00-{unsampled}-2222222222222222-00");
        let said = curl(Some(sent.clone())).await;
        assert_eq!(
            traceparent_seen(&said),
            sent,
            "an unsampled context reaches the app as it was sent"
        );

        // Sampled: one trace, caller → client proxy (attempt) → server proxy → app.
        let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
        let caller_span = "00f067aa0ba902b7";
        let said = curl(Some(format!("00-{trace_id}-{caller_span}-01"))).await;
        let seen = traceparent_seen(&said).to_string();
        let trace = eventually(
            Duration::from_secs(30),
            "both proxies' spans in Jaeger",
            || {
                let jaeger = &jaeger;
                async move { jaeger.trace(trace_id).await.filter(|t| spans(t).len() >= 2) }
            },
        )
        .await;
        let all = spans(&trace);
        assert_eq!(all.len(), 2, "one span per proxy: {all:?}");
        let outbound = span_of(&all, "client");
        let inbound = span_of(&all, "web");

        // Parent-child links: the caller's span, the client proxy's attempt, the
        // server proxy's inbound span, and the app sees the last as its parent.
        assert_eq!(parent(outbound), caller_span, "{outbound}");
        assert_eq!(parent(inbound), outbound["spanID"], "{inbound}");
        assert_eq!(
            seen,
            format!("00-{trace_id}-{}-01", inbound["spanID"].as_str().unwrap())
        );

        let client_id = format!("spiffe://cluster.local/ns/{}/sa/client", ns.name());
        let web_id = format!("spiffe://cluster.local/ns/{}/sa/web", ns.name());
        assert_eq!(
            tag(outbound, "span.kind"),
            Some(&json!("client")),
            "{outbound}"
        );
        assert_eq!(tag(outbound, "http.request.method"), Some(&json!("GET")));
        assert_eq!(
            tag(outbound, "http.response.status_code"),
            Some(&json!(200))
        );
        assert_eq!(tag(outbound, "tandem.attempt"), Some(&json!(1)));
        assert_eq!(
            tag(outbound, "tandem.backend.address"),
            Some(&json!(format!("{web_ip}:8080")))
        );
        assert_eq!(tag(outbound, "tandem.backend.zone"), Some(&json!("zone-a")));
        assert_eq!(
            tag(outbound, "tandem.backend.identity"),
            Some(&json!(web_id))
        );
        assert_eq!(
            tag(outbound, "tandem.locality.tier"),
            Some(&json!("zone")),
            "{outbound}"
        );
        assert!(
            tag(outbound, "tandem.balancer.mode").is_some(),
            "{outbound}"
        );
        assert!(
            tag(outbound, "tandem.response.flags").is_none(),
            "nothing went wrong: {outbound}"
        );
        assert_eq!(
            tag(inbound, "span.kind"),
            Some(&json!("server")),
            "{inbound}"
        );
        assert_eq!(tag(inbound, "http.response.status_code"), Some(&json!(200)));
        assert_eq!(
            tag(inbound, "tandem.client.identity"),
            Some(&json!(client_id))
        );
        assert_eq!(tag(inbound, "url.path"), Some(&json!("/headers")));
        // The resource: the workload, its namespace, pod and node.
        assert_eq!(
            process_tag(outbound, "k8s.pod.name"),
            Some("client"),
            "{outbound}"
        );
        assert_eq!(
            process_tag(inbound, "k8s.pod.name"),
            Some(name(&web[0]).as_str())
        );
        assert_eq!(process_tag(inbound, "k8s.namespace.name"), Some(ns.name()));
        assert!(
            process_tag(inbound, "k8s.node.name").is_some_and(|n| !n.is_empty()),
            "{inbound}"
        );

        // The unsampled request (and the untraced warm-up ones) left no span: each
        // proxy exported exactly its one.
        assert!(
            jaeger.trace(unsampled).await.is_none(),
            "no trace of the unsampled request"
        );
        for ip in [client_ip, web_ip] {
            let page = admin_get(SocketAddr::from((ip, 4191)), "/metrics").await;
            assert_eq!(
                series(
                    &page,
                    r#"tandem_proxy_trace_spans_total{result="exported"}"#
                ),
                1.0,
                "{page}"
            );
        }

        // Jaeger down: requests are served as before; their spans are dropped and counted.
        jaeger.stop().await;
        for i in 0..3 {
            let said = curl(Some(format!("00-{trace_id}-{:016x}-01", i + 1))).await;
            assert!(
                said.contains("host:"),
                "served with the collector down: {said}"
            );
        }
        eventually(
            Duration::from_secs(30),
            "spans counted as dropped",
            || async move {
                let page = admin_get(SocketAddr::from((client_ip, 4191)), "/metrics").await;
                (series(
                    &page,
                    r#"tandem_proxy_trace_spans_total{result="export_failed"}"#,
                ) >= 1.0)
                    .then_some(())
            },
        )
        .await;
    })
    .await
}
