//! The node agent against the real cluster (tests/e2e/cluster.rs): scheduling over
//! zones, addresses and EndpointSlices, the readiness flip, graceful deletion, and
//! pods run for real in network namespaces.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};
use tandem::client::Connection;

use crate::cluster::*;
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(180);

/// A Service `name` (port 80 → 8080) and a Deployment of `replicas` pods the agent
/// does not run (their status is all there is).
fn web(name: &str, replicas: u32, grace: u32) -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 8080}]},
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {
                        "terminationGracePeriodSeconds": grace,
                        "containers": [{"name": "app", "image": "tandem", "ports": [{"containerPort": 8080}]}],
                    },
                },
            },
        }),
    ]
}

fn endpoints(slices: &[EndpointSlice]) -> Vec<Endpoint> {
    slices.iter().flat_map(|s| s.endpoints.clone()).collect()
}

fn endpoint_for(eps: &[Endpoint], ip: Ipv4Addr) -> Option<&Endpoint> {
    eps.iter().find(|e| e.addresses.contains(&ip.to_string()))
}

fn condition(ep: &Endpoint, which: &str) -> Option<bool> {
    let c = ep.conditions.as_ref()?;
    match which {
        "ready" => c.ready,
        "serving" => c.serving,
        "terminating" => c.terminating,
        _ => None,
    }
}

/// Waits until the Service's slices satisfy `check`.
async fn wait_slices(
    ns: &Namespace,
    service: &str,
    what: &str,
    check: impl Fn(&[Endpoint]) -> bool,
) -> Vec<Endpoint> {
    poll(CLUSTER_STEP, what, || async {
        let eps = endpoints(&ns.endpoint_slices(service).await);
        check(&eps).then_some(eps)
    })
    .await
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    let (net, prefix) = cidr.split_once('/').unwrap();
    let net: Ipv4Addr = net.parse().unwrap();
    let mask = u32::MAX << (32 - prefix.parse::<u32>().unwrap());
    u32::from(ip) & mask == u32::from(net)
}

#[tokio::test]
async fn a_deployment_spreads_over_zones_with_addresses_and_slices() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("spread").await;
        ns.apply(&web("web", 3, 30)).await;
        let pods = ns.wait_deployment("web").await;

        let nodes: Api<Node> = Api::all(ns.client());
        let mut zones = BTreeSet::new();
        let mut ips = BTreeSet::new();
        for pod in &pods {
            let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
            let labels = nodes.get(&node).await.unwrap().metadata.labels.unwrap();
            zones.insert(labels["topology.kubernetes.io/zone"].clone());
            let ip = pod_ip(pod).unwrap();
            assert!(
                in_cidr(ip, cluster.pod_cidr()),
                "{ip} in {}",
                cluster.pod_cidr()
            );
            ips.insert(ip);
            let status = pod.status.as_ref().unwrap();
            assert_eq!(status.phase.as_deref(), Some("Running"));
            assert_eq!(
                status.host_ip.as_deref(),
                Some(cluster.pod_gateway().to_string().as_str())
            );
        }
        assert_eq!(zones.len(), 3, "one pod per zone: {zones:?}");
        assert_eq!(ips.len(), 3, "distinct addresses: {ips:?}");

        let eps = wait_slices(&ns, "web", "3 ready endpoints", |eps| {
            eps.len() == 3 && eps.iter().all(|e| condition(e, "ready") == Some(true))
        })
        .await;
        for pod in &pods {
            let ep = endpoint_for(&eps, pod_ip(pod).unwrap()).expect("an endpoint per pod");
            let node = pod.spec.as_ref().unwrap().node_name.clone();
            assert_eq!(ep.node_name, node);
            let labels = nodes
                .get(node.as_deref().unwrap())
                .await
                .unwrap()
                .metadata
                .labels
                .unwrap();
            assert_eq!(ep.zone.as_ref(), labels.get("topology.kubernetes.io/zone"));
        }
    })
    .await;
}

#[tokio::test]
async fn the_readiness_annotation_shows_in_the_endpoint_slice() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("flip").await;
        ns.apply(&web("web", 2, 30)).await;
        let pods = ns.wait_deployment("web").await;
        let (flipped, other) = (pod_ip(&pods[0]).unwrap(), pod_ip(&pods[1]).unwrap());

        ns.set_ready(&name(&pods[0]), false).await;
        wait_slices(&ns, "web", "the flipped endpoint not ready", |eps| {
            endpoint_for(eps, flipped).and_then(|e| condition(e, "ready")) == Some(false)
                && endpoint_for(eps, other).and_then(|e| condition(e, "ready")) == Some(true)
        })
        .await;
        let pod = ns.pod(&name(&pods[0])).await;
        assert!(!is_ready(&pod));

        ns.set_ready(&name(&pods[0]), true).await;
        wait_slices(&ns, "web", "the endpoint ready again", |eps| {
            endpoint_for(eps, flipped).and_then(|e| condition(e, "ready")) == Some(true)
        })
        .await;
    })
    .await;
}

#[tokio::test]
async fn a_deleted_pod_terminates_for_its_grace_period_then_goes() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("grace").await;
        let grace = 4;
        ns.apply(&web("web", 2, grace)).await;
        let pods = ns.wait_deployment("web").await;
        let victim = name(&pods[0]);
        let ip = pod_ip(&pods[0]).unwrap();

        let deleted = Instant::now();
        ns.delete_pod(&victim, None).await;
        wait_slices(
            &ns,
            "web",
            "the deleted pod's endpoint terminating",
            |eps| {
                endpoint_for(eps, ip).is_some_and(|e| {
                    condition(e, "terminating") == Some(true)
                        && condition(e, "ready") == Some(false)
                        && condition(e, "serving") == Some(true)
                })
            },
        )
        .await;
        assert!(
            deleted.elapsed() < Duration::from_secs(grace.into()),
            "seen terminating within its grace period"
        );
        wait_slices(&ns, "web", "the deleted pod's endpoint gone", |eps| {
            endpoint_for(eps, ip).is_none()
        })
        .await;
        let took = deleted.elapsed();
        assert!(
            took >= Duration::from_millis(grace as u64 * 1000 - 500),
            "gone after {took:?}, before its grace period of {grace}s"
        );
        ns.wait_gone(&victim).await;
        // The Deployment's replacement takes its place.
        ns.wait_deployment("web").await;
    })
    .await;
}

/// A pod the agent runs: an init container that reads a projected token, a
/// ConfigMap, a Secret and an emptyDir as another user, a native sidecar with a
/// startup probe, and `tandem backend` with a readiness probe; and its ConfigMap and
/// Secret.
fn runnable(name: &str) -> Vec<Value> {
    let settings = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
        "data": {"greeting": "hello"},
    });
    let creds = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
        "stringData": {"password": "s3cret"},
    });
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}, "annotations": {"agent.tandem.io/run": "true"}},
        "spec": {
            "terminationGracePeriodSeconds": 10,
            "initContainers": [
                {
                    "name": "token-reader",
                    "image": "busybox",
                    "command": ["sh", "-c", concat!(
                        "id -u; cat /var/run/secrets/tandem/token; echo; ",
                        "echo \"$POD_NAME $POD_IP $NODE_NAME\"; ",
                        "cat /etc/settings/greeting; echo; cat /etc/creds/password; echo; ",
                        "echo scratch > /scratch/f && cat /scratch/f",
                    )],
                    "securityContext": {"runAsUser": 65534, "runAsGroup": 65534},
                    "env": [
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    ],
                    "volumeMounts": [
                        {"name": "token", "mountPath": "/var/run/secrets/tandem", "readOnly": true},
                        {"name": "settings", "mountPath": "/etc/settings"},
                        {"name": "creds", "mountPath": "/etc/creds"},
                        {"name": "scratch", "mountPath": "/scratch"},
                    ],
                },
                {
                    "name": "sidecar",
                    "image": "tandem",
                    "restartPolicy": "Always",
                    "command": ["tandem", "backend", "--listen", "0.0.0.0:9090", "--name", "sidecar"],
                    "startupProbe": {"httpGet": {"path": "/", "port": 9090}, "periodSeconds": 1},
                },
            ],
            "containers": [{
                "name": "app",
                "image": "tandem",
                "command": ["/usr/local/bin/tandem", "backend"],
                "args": ["--listen", "0.0.0.0:8080", "--name", "$(POD_NAME)"],
                "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            }],
            "volumes": [
                {"name": "token", "projected": {"sources": [
                    {"serviceAccountToken": {"audience": "tandem", "expirationSeconds": 600, "path": "token"}},
                ]}},
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "creds", "secret": {"secretName": "creds"}},
                {"name": "scratch", "emptyDir": {}},
            ],
        },
    });
    vec![settings, creds, pod]
}

fn started_at(pod: &Pod, init: bool, container: &str) -> String {
    let status = pod.status.as_ref().unwrap();
    let list = if init {
        status.init_container_statuses.as_ref()
    } else {
        status.container_statuses.as_ref()
    };
    let c = list.unwrap().iter().find(|c| c.name == container).unwrap();
    let state = c.state.as_ref().unwrap();
    match (&state.running, &state.terminated) {
        (Some(r), _) => r.started_at.as_ref().unwrap().0.to_string(),
        (_, Some(t)) => t.finished_at.as_ref().unwrap().0.to_string(),
        _ => panic!("{container} neither running nor terminated: {state:?}"),
    }
}

#[tokio::test]
async fn a_run_pod_serves_http_on_its_address() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("run").await;
        ns.apply(&runnable("server")).await;
        let pod = ns.wait_pod("server", "Ready", is_ready).await;
        let ip = pod_ip(&pod).unwrap();

        // Through the bridge, from this process, to the pod's own address.
        let mut conn = Connection::http1(SocketAddr::from((ip, 8080)))
            .await
            .expect("connect to the pod");
        let reply = conn.get("server", "/").await.expect("an answer");
        assert!(reply.status.is_success());
        assert_eq!(reply.text(), "server\n", "$(POD_NAME) expanded in args");
        let mut side = Connection::http1(SocketAddr::from((ip, 9090)))
            .await
            .expect("connect to the sidecar");
        assert_eq!(side.get("s", "/").await.unwrap().text(), "sidecar\n");

        // The init container ran first, to completion, before the sidecar and the app.
        let init = pod
            .status
            .as_ref()
            .unwrap()
            .init_container_statuses
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.name == "token-reader")
            .unwrap()
            .clone();
        let done = init
            .state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .expect("terminated");
        assert_eq!(done.exit_code, 0);
        assert!(started_at(&pod, true, "token-reader") <= started_at(&pod, true, "sidecar"));
        assert!(started_at(&pod, true, "sidecar") <= started_at(&pod, false, "app"));

        // It ran as 65534 and read a token the API server accepts, bound to the pod.
        let log = ns.container_log("server", "token-reader");
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.first(), Some(&"65534"), "log: {log}");
        let token = lines.get(1).expect("the token line").to_string();
        let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
        assert_eq!(
            lines.get(2).copied(),
            Some(format!("server {ip} {node}").as_str())
        );
        assert_eq!(
            lines[3..],
            ["hello", "s3cret", "scratch"],
            "configMap, secret and emptyDir volumes"
        );
        let review: TokenReview = serde_json::from_value(json!({
            "spec": {"token": token, "audiences": ["tandem"]}
        }))
        .unwrap();
        let reviewed = Api::<TokenReview>::all(ns.client())
            .create(&PostParams::default(), &review)
            .await
            .expect("a TokenReview");
        let status = reviewed.status.expect("a review status");
        assert_eq!(status.authenticated, Some(true), "{status:?}");
        let user = status.user.unwrap();
        assert_eq!(
            user.username.as_deref(),
            Some(format!("system:serviceaccount:{}:default", ns.name()).as_str())
        );
        assert_eq!(
            user.extra.unwrap()["authentication.kubernetes.io/pod-name"],
            vec!["server".to_string()]
        );

        // Deleted: processes stopped, namespace and veth gone, address unreachable.
        let netns = format!(
            "/var/run/netns/{}-{}",
            cluster.bridge(),
            ip.to_string().replace('.', "-")
        );
        assert!(
            std::path::Path::new(&netns).exists(),
            "{netns} while it runs"
        );
        ns.delete_pod("server", None).await;
        ns.wait_gone("server").await;
        poll(
            CLUSTER_STEP,
            "the pod's network namespace removed",
            || async { (!std::path::Path::new(&netns).exists()).then_some(()) },
        )
        .await;
        let refused = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(SocketAddr::from((ip, 8080))),
        )
        .await;
        assert!(
            !matches!(refused, Ok(Ok(_))),
            "nothing answers on {ip} any more"
        );
    })
    .await;
}

#[tokio::test]
async fn pods_that_cannot_run_say_why() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let ns = cluster.namespace("cannot-run").await;
        let run = json!({"agent.tandem.io/run": "true"});
        ns.apply(&[
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "init-fails", "annotations": run},
                "spec": {
                    "automountServiceAccountToken": false,
                    "initContainers": [{"name": "setup", "image": "busybox", "command": ["sh", "-c", "echo failing; exit 3"]}],
                    "containers": [{"name": "app", "image": "tandem", "command": ["tandem", "backend"]}],
                },
            }),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "no-command", "annotations": run},
                "spec": {
                    "automountServiceAccountToken": false,
                    "containers": [{"name": "app", "image": "nginx"}],
                },
            }),
        ])
        .await;

        let failed = ns
            .wait_pod("init-fails", "Failed", |p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
            })
            .await;
        let status = failed.status.unwrap();
        let init = &status.init_container_statuses.unwrap()[0];
        assert_eq!(
            init.state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code,
            3
        );
        assert!(status.message.unwrap().contains("exited with code 3"));
        assert_eq!(ns.container_log("init-fails", "setup"), "failing\n");
        assert!(
            ns.container_log("init-fails", "app").is_empty(),
            "the app never started"
        );
        let app = &status.container_statuses.unwrap()[0];
        assert!(app.state.as_ref().unwrap().waiting.is_some());

        let stuck = ns
            .wait_pod("no-command", "a status saying why it cannot run", |p| {
                p.status
                    .as_ref()
                    .and_then(|s| s.message.as_deref())
                    .is_some_and(|m| m.contains("no command"))
            })
            .await;
        let waiting = stuck.status.unwrap().container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .waiting
            .unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("CreateContainerError"));
        assert!(!is_ready(&ns.pod("no-command").await));
    })
    .await;
}
