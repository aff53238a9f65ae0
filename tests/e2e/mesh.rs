//! The mesh in the tests' cluster, as users get it: a namespace labelled for
//! injection, plain workloads applied with kubectl, and the API server calling our
//! webhook. The node agent runs the injected pods for real: `tandem-proxy init`
//! installs the nat rules in each pod's network namespace, the proxy runs as its own
//! UID beside the app, and unmodified clients (curl, python) inside a pod call
//! Services by their ClusterIP, which only the proxy can make sense of (the cluster
//! has no kube-proxy).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::{Cluster, Namespace, cluster, name, pod_ip};
use crate::injection::{CLUSTER_WIDE, Injector};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(300);
/// One command inside a pod (curl, python) finishes within this.
const IN_POD: Duration = Duration::from_secs(20);

/// Three server pods behind one Service: HTTP on 80 (-> 8080), an opaque echo on
/// 9000, and a server-speaks-first protocol on 2525; and a client pod whose app
/// listens only on its loopback. All run by the node agent, all meshed, all in one
/// zone (across zones, the proxy would keep the client's requests in its own).
fn workloads() -> Vec<Value> {
    let zone_a = json!({"topology.kubernetes.io/zone": "zone-a"});
    let pod_name =
        json!([{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]);
    vec![
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "echo", "port": 9000, "targetPort": 9000},
                {"name": "greet", "port": 2525, "targetPort": 2525}
            ]}
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}, "annotations": {"agent.tandem.io/run": "true"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 2,
                        "nodeSelector": zone_a,
                        "containers": [{
                            "name": "app", "image": "tandem",
                            "command": ["tandem", "backend", "--name", "$(POD_NAME)",
                                        "--listen", "0.0.0.0:8080",
                                        "--tcp-echo", "0.0.0.0:9000",
                                        "--tcp-greet", "0.0.0.0:2525"],
                            "env": pod_name,
                            "ports": [{"containerPort": 8080}, {"containerPort": 9000}, {"containerPort": 2525}],
                            // The kubelet's probe comes in from outside the pod: through
                            // the inbound listener, to the app on the pod's loopback.
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
                        }]
                    }
                }
            }
        }),
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "client", "annotations": {
                "agent.tandem.io/run": "true",
                // The app's own calls to port 8080 go out as they are.
                "tandem.io/skip-outbound-ports": "8080"
            }},
            "spec": {
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

/// Runs `args` in the pod's network namespace, as root (not the proxy's UID: it is
/// intercepted like the app); its stdout, or a panic with what it said.
pub(crate) async fn in_pod(cluster: &Cluster, pod: Ipv4Addr, args: &[&str]) -> String {
    let (ok, said) = try_in_pod(cluster, pod, args).await;
    assert!(ok, "{args:?} in the pod at {pod} failed: {said}");
    said
}

/// As [`in_pod`]: whether it succeeded, and its stdout (then stderr).
pub(crate) async fn try_in_pod(cluster: &Cluster, pod: Ipv4Addr, args: &[&str]) -> (bool, String) {
    try_in_pod_for(cluster, pod, args, IN_POD).await
}

/// As [`try_in_pod`], for a command that may take up to `limit`.
pub(crate) async fn try_in_pod_for(
    cluster: &Cluster,
    pod: Ipv4Addr,
    args: &[&str],
    limit: Duration,
) -> (bool, String) {
    let netns = cluster.netns(pod);
    let run = tokio::process::Command::new("ip")
        .args(["netns", "exec", &netns])
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("{args:?} in {netns} did not finish within {limit:?}"))
        .expect("ip netns exec runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// A small TCP client in python: connects to `addr`, reads a greeting first when
/// `greeting`, sends `send` (if any) and prints every line it gets back.
const TCP_CLIENT: &str = r#"
import socket, sys
host, port, greeting, send = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
s = socket.create_connection((host, port), timeout=10)
f = s.makefile("rb")
if greeting:
    sys.stdout.write(f.readline().decode())
if send:
    s.sendall(send.encode() + b"\n")
    sys.stdout.write(f.readline().decode())
s.close()
"#;

async fn tcp_client(
    cluster: &Cluster,
    pod: Ipv4Addr,
    addr: SocketAddr,
    greeting: bool,
    send: &str,
) -> String {
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let greeting = if greeting { "1" } else { "0" };
    in_pod(
        cluster,
        pod,
        &["python3", "-c", TCP_CLIENT, &host, &port, greeting, send],
    )
    .await
}

/// A proxy's metrics page.
async fn metrics(pod: Ipv4Addr) -> String {
    metrics_page(SocketAddr::from((pod, 4191)))
        .await
        .expect("the proxy's admin port answers from outside the pod")
}

/// The sum of the samples of a series written `name{labels}` on a metrics page.
pub(crate) fn series(page: &str, series: &str) -> f64 {
    let (name, labels) = series
        .strip_suffix('}')
        .and_then(|s| s.split_once('{'))
        .unwrap_or((series, ""));
    samples(page, name, labels).unwrap_or_default()
}

/// Every one of `servers` answered, as often as the others, never twice in a row.
fn assert_balanced(names: &[String], servers: usize) {
    let counts = counts(names);
    assert_eq!(counts.len(), servers, "every server pod answers: {names:?}");
    assert!(
        counts.values().all(|c| *c == names.len() / servers),
        "evenly: {names:?}"
    );
    assert_alternates(names, "the server pods take turns");
}

pub(crate) async fn cluster_ip(ns: &Namespace, service: &str) -> Ipv4Addr {
    let ip = ns
        .kubectl(&[
            "get",
            "service",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .await;
    ip.trim()
        .parse()
        .unwrap_or_else(|_| panic!("a ClusterIP: {ip:?}"))
}

#[tokio::test]
async fn injected_pods_reach_services_through_their_proxy() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("mesh").await;
        let _injector = Injector::start_with(&ns, Some(cluster.pod_gateway())).await;
        ns.apply(&workloads()).await;
        let servers = ns.wait_ready("app=web", 3).await;
        let client = ns
            .wait_pod("client", "ready", crate::cluster::is_ready)
            .await;
        let client_ip = pod_ip(&client).expect("the client pod has an address");
        let web = cluster_ip(&ns, "web").await;
        let server_names: Vec<String> = servers.iter().map(name).collect();

        // The real init container installed the rules in the pod's namespace.
        let rules = in_pod(cluster, client_ip, &["iptables-save", "-t", "nat"]).await;
        assert!(rules.contains("--dports 8080 -j RETURN"), "the skipped port: {rules}");
        assert!(rules.contains("--uid-owner 2102 -j RETURN"), "the proxy's own traffic: {rules}");

        // HTTP/1.1 to the ClusterIP, a new connection each time: the proxy balances
        // over the server pods, who take turns.
        let url = format!("http://{web}/");
        // Discovery is eventually consistent: a pod can be Ready before its endpoint
        // reaches the client's proxy (seen once on a loaded machine). Wait, bounded,
        // until every server pod has answered; then the turns must be exact.
        let warm_up = std::cell::Cell::new(0.0); // connections it made, for the counts below
        eventually(Duration::from_secs(30), "every web pod answering through the client's proxy", || async {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..6 {
                warm_up.set(warm_up.get() + 1.0);
                let body = in_pod(cluster, client_ip, &["curl", "-sS", "--max-time", "10", &url]).await;
                seen.insert(body.trim().to_string());
            }
            (seen.len() == 3).then_some(())
        })
        .await;
        let mut names = Vec::new();
        for _ in 0..9 {
            let body = in_pod(cluster, client_ip, &["curl", "-sS", "--max-time", "10", &url]).await;
            names.push(body.trim().to_string());
        }
        assert_balanced(&names, 3);
        for n in &names {
            assert!(server_names.contains(n), "{n} is a server pod: {server_names:?}");
        }

        // One keep-alive connection (curl), and one HTTP/2 connection with prior
        // knowledge (nghttp): balanced per request, not per connection.
        let urls: Vec<String> = ["a", "b", "c"].iter().map(|p| format!("{url}{p}")).collect();
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        let keep_alive = [&["curl", "-sS", "--max-time", "10"][..], &urls].concat();
        let http2 = [&["nghttp", "--timeout=10"][..], &urls].concat();
        for client in [keep_alive, http2] {
            let said = in_pod(cluster, client_ip, &client).await;
            let names: Vec<String> = said.lines().map(str::to_string).collect();
            assert_eq!(names.len(), 3, "{client:?}: {said}");
            assert_balanced(&names, 3);
        }

        // Opaque TCP: the echo answers, whichever pod the connection went to.
        let echo = SocketAddr::from((web, 9000));
        let said = tcp_client(cluster, client_ip, echo, false, "tandem says hello").await;
        assert_eq!(said, "tandem says hello\n");

        // Server speaks first: the client says nothing until greeted, the proxy gives
        // up waiting for it and connects; connections are balanced.
        let greet = SocketAddr::from((web, 2525));
        let mut greeters = Vec::new();
        for i in 0..3 {
            let said = tcp_client(cluster, client_ip, greet, true, &format!("line {i}")).await;
            let mut lines = said.lines();
            let greeting = lines.next().unwrap_or_default();
            let who = greeting
                .strip_prefix("220 ")
                .and_then(|g| g.strip_suffix(" ready"))
                .unwrap_or_else(|| panic!("a greeting: {said:?}"));
            greeters.push(who.to_string());
            assert_eq!(lines.next(), Some(format!("line {i}").as_str()), "then the echo");
        }
        assert_balanced(&greeters, 3);

        // An address the control plane does not know (a pod's own): forwarded as is.
        let server_ip = pod_ip(&servers[0]).unwrap();
        let said = tcp_client(cluster, client_ip, SocketAddr::from((server_ip, 9000)), false, "direct").await;
        assert_eq!(said, "direct\n");

        let page = metrics(client_ip).await;
        let outbound = series(&page, r#"tandem_proxy_connections_total{listener="outbound"}"#);
        let intercepted = |protocol: &str, route: &str| {
            series(
                &page,
                &format!(r#"tandem_proxy_intercepted_connections_total{{protocol="{protocol}",route="{route}"}}"#),
            )
        };
        let warm_up = warm_up.get();
        assert_eq!(intercepted("http1", "service"), 10.0 + warm_up, "{page}");
        assert_eq!(intercepted("http2", "service"), 1.0, "{page}");
        assert_eq!(intercepted("opaque", "service"), 4.0, "{page}");
        assert_eq!(intercepted("opaque", "passthrough"), 1.0, "{page}");
        // Exactly the app's connections: nothing the proxy sent itself (to the control
        // plane, to the server pods) came back into it.
        assert_eq!(outbound, 16.0 + warm_up, "{page}");

        // A skipped port bypasses the proxy: the server pod answers, and the client's
        // proxy never sees the connection.
        let direct = format!("http://{server_ip}:8080/");
        let body = in_pod(cluster, client_ip, &["curl", "-sS", "--max-time", "10", &direct]).await;
        assert_eq!(body.trim(), name(&servers[0]));
        let page = metrics(client_ip).await;
        assert_eq!(
            series(&page, r#"tandem_proxy_connections_total{listener="outbound"}"#),
            outbound,
            "{page}"
        );

        // Each server pod's proxy took its share in on the inbound listener.
        for pod in &servers {
            let page = metrics(pod_ip(pod).unwrap()).await;
            let inbound = series(&page, r#"tandem_proxy_connections_total{listener="inbound"}"#);
            assert!(inbound > 0.0, "{}: {page}", name(pod));
        }
    })
    .await
}
