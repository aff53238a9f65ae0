//! Mutual TLS between meshed pods, in the tests' cluster: identities from real
//! ServiceAccount tokens (the API server's TokenRequest and TokenReview), proxies
//! that get their certificates from the control plane, and a capture in a client
//! pod showing what leaves it for the others.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cluster::{Cluster, cluster, pod_ip};
use crate::identity::{issuer_secret, openssl_issuer, trust_roots_map};
use crate::injection::{CLUSTER_WIDE, Injector};
use crate::mesh::{cluster_ip, in_pod, series, try_in_pod};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(300);

/// `web` (permissive) and `vault` (`mtls-only`) behind Services, each under a
/// ServiceAccount of its own; a meshed `client` and an `outsider` opted out of the
/// mesh. All in one zone, all run by the node agent.
fn workloads() -> Vec<Value> {
    let zone_a = json!({"topology.kubernetes.io/zone": "zone-a"});
    let pod_name =
        json!([{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]);
    let server = |app: &str, annotations: Value| {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": app},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": app}},
                "template": {
                    "metadata": {"labels": {"app": app}, "annotations": annotations},
                    "spec": {
                        "serviceAccountName": app,
                        "terminationGracePeriodSeconds": 2,
                        "nodeSelector": zone_a,
                        "containers": [{
                            "name": "app", "image": "tandem",
                            "command": ["tandem", "backend", "--name", "$(POD_NAME)",
                                        "--listen", "0.0.0.0:8080", "--tcp-echo", "0.0.0.0:9000"],
                            "env": pod_name,
                            "ports": [{"containerPort": 8080}, {"containerPort": 9000}],
                            "readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
                        }]
                    }
                }
            }
        })
    };
    let service = |app: &str| {
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": app},
            "spec": {"selector": {"app": app}, "ports": [
                {"name": "http", "port": 80, "targetPort": 8080},
                {"name": "echo", "port": 9000, "targetPort": 9000}
            ]}
        })
    };
    let client = |pod: &str, annotations: Value| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "annotations": annotations},
            "spec": {
                "serviceAccountName": "client",
                "terminationGracePeriodSeconds": 2,
                "nodeSelector": zone_a,
                "containers": [{
                    "name": "app", "image": "tandem",
                    "command": ["tandem", "backend", "--name", pod, "--listen", "127.0.0.1:7000"]
                }]
            }
        })
    };
    let account =
        |sa: &str| json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}});
    vec![
        account("web"),
        account("vault"),
        account("client"),
        service("web"),
        service("vault"),
        server("web", json!({"agent.tandem.io/run": "true"})),
        server(
            "vault",
            json!({"agent.tandem.io/run": "true", "tandem.io/inbound-policy": "mtls-only"}),
        ),
        client("client", json!({"agent.tandem.io/run": "true"})),
        client(
            "outsider",
            json!({"agent.tandem.io/run": "true", "tandem.io/inject": "disabled"}),
        ),
    ]
}

/// A page of a pod's proxy admin server (reachable from the host).
async fn admin(pod: Ipv4Addr, path: &str) -> String {
    admin_get(std::net::SocketAddr::from((pod, 4191)), path).await
}

/// tcpdump in a pod's network namespace, writing to a file until stopped (by its
/// PID): what leaves the pod for the others.
struct Capture {
    child: tokio::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    /// In the network namespace `netns`, on all its interfaces. Its messages go to a
    /// file beside the capture (a pipe left unread would stop it).
    async fn start(netns: &str, filter: &str, file: &Path) -> Capture {
        let log = file.with_extension("log");
        let child = tokio::process::Command::new("ip")
            // --immediate-mode: packets reach the file as they come, not when a
            // buffer fills (a stop would lose what is still in the buffer).
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "--immediate-mode",
                "-i",
                "any",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(file)
            .arg(filter)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("the capture's log"))
            .kill_on_drop(true)
            .spawn()
            .expect("tcpdump runs (scripts/test.sh installs it)");
        // tcpdump says "listening on" once its capture is open.
        eventually(Duration::from_secs(10), "tcpdump capturing", || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .ok()
                    .filter(|said| said.contains("listening on"))
            }
        })
        .await;
        Capture {
            child,
            file: file.to_path_buf(),
        }
    }

    /// Stops the capture (SIGINT, so it flushes) and returns what it wrote.
    async fn stop(mut self) -> Vec<u8> {
        let pid = self.child.id().expect("tcpdump is running") as i32;
        let _ = tokio::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        std::fs::read(&self.file).expect("the capture file")
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn meshed_pods_speak_mutual_tls_and_apps_learn_who_called() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("mtls").await;
        let _injector = Injector::start_with(&ns, Some(cluster.pod_gateway())).await;
        ns.apply(&workloads()).await;
        let web = ns.wait_ready("app=web", 2).await;
        let vault = ns.wait_ready("app=vault", 2).await;
        let client = ns.wait_pod("client", "ready", crate::cluster::is_ready).await;
        let outsider = ns.wait_pod("outsider", "ready", crate::cluster::is_ready).await;
        let client_ip = pod_ip(&client).expect("the client pod's address");
        let outsider_ip = pod_ip(&outsider).expect("the outsider's address");
        let web_ips: Vec<Ipv4Addr> = web.iter().filter_map(pod_ip).collect();
        let (web_service, vault_service) = (cluster_ip(&ns, "web").await, cluster_ip(&ns, "vault").await);
        let client_id = format!("spiffe://cluster.local/ns/{}/sa/client", ns.name());
        let web_id = format!("spiffe://cluster.local/ns/{}/sa/web", ns.name());

        // Each proxy has its identity, from its own pod's token.
        let config: Value = serde_json::from_str(&admin(client_ip, "/config").await).unwrap();
        assert_eq!(config["identity"]["identity"], client_id.as_str(), "{config}");
        assert!(config["identity"]["certificate"]["expires_in_seconds"].as_u64().unwrap() > 0, "{config}");

        // What leaves the client pod for the web pods (a capture on the pod's side of
        // its link, so the pod's own loopback, app to proxy, is not in it).
        let dir = TestDir::new("mtls-capture");
        let filter = format!("tcp and (host {} or host {})", web_ips[0], web_ips[1]);
        let capture = Capture::start(&cluster.netns(client_ip), &filter, &dir.path("client-web.pcap")).await;

        // The app sees who called, whatever the client claimed.
        let url = format!("http://{web_service}/headers");
        for _ in 0..4 {
            let said = in_pod(cluster, client_ip, &["curl", "-sS", "--max-time", "10",
                "-H", "x-tandem-client-id: spiffe://cluster.local/ns/kube-system/sa/admin", &url]).await;
            let ids: Vec<&str> = said.lines().filter(|l| l.starts_with("x-tandem-client-id:")).collect();
            assert_eq!(ids, [format!("x-tandem-client-id: {client_id}").as_str()], "{said}");
            assert!(!said.contains("tandem-app-protocol"), "the hop's own header stays between proxies: {said}");
        }
        // Opaque TCP goes inside the same TLS.
        let echo = in_pod(cluster, client_ip, &["python3", "-c",
            "import socket,sys; s=socket.create_connection((sys.argv[1], 9000), timeout=10); s.sendall(b'secret bytes\\n'); print(s.makefile().readline().strip())",
            &web_service.to_string()]).await;
        assert_eq!(echo.trim(), "secret bytes");

        let pcap = capture.stop().await;
        assert!(
            pcap.len() > 2_000,
            "the capture holds the connections ({} bytes; filter {filter:?}; tcpdump said: {})",
            pcap.len(),
            std::fs::read_to_string(dir.path("client-web.log")).unwrap_or_default()
        );
        assert!(contains(&pcap, "tandem.io/h2"), "the mesh ALPN in a ClientHello on the wire");
        assert!(contains(&pcap, "tandem.io/opaque"), "the opaque connection went over mesh TLS too");
        for plaintext in ["GET /headers", "x-tandem-client-id", "HTTP/1.1", "secret bytes", "PRI * HTTP/2.0"] {
            assert!(!contains(&pcap, plaintext), "{plaintext:?} crossed the network in clear ({} bytes captured)", pcap.len());
        }

        // The web pods' proxies counted the client by its identity; the client's
        // proxy checked theirs (handshakes by side).
        let mut mtls_in = 0.0;
        for ip in &web_ips {
            let page = admin(*ip, "/metrics").await;
            mtls_in += series(&page, &format!(r#"tandem_proxy_inbound_connections_total{{transport="mtls",client_id="{client_id}"}}"#));
        }
        assert!(mtls_in >= 2.0, "HTTP and opaque connections over mesh TLS, counted by identity");
        let page = admin(client_ip, "/metrics").await;
        assert!(series(&page, r#"tandem_proxy_mesh_tls_handshakes_total{side="client",result="ok"}"#) >= 2.0, "{page}");
        assert!(series(&page, r#"tandem_proxy_identity_renewals_total{result="ok"}"#) >= 1.0, "{page}");
        let config: Value = serde_json::from_str(&admin(client_ip, "/config").await).unwrap();
        let transports: Vec<String> = config["destinations"].as_array().unwrap().iter()
            .flat_map(|d| d["endpoints"].as_array().cloned().unwrap_or_default())
            .map(|e| format!("{} {}", e["identity"].as_str().unwrap_or(""), e["transport"].as_str().unwrap_or("")))
            .collect();
        assert!(transports.contains(&format!("{web_id} mtls")), "per destination, the peer identity: {transports:?}");

        // From outside the mesh: served by the permissive pod, without an identity
        // (the claimed one is removed); refused by the mtls-only pod.
        let direct = format!("http://{}:8080/headers", web_ips[0]);
        let said = in_pod(cluster, outsider_ip, &["curl", "-sS", "--max-time", "10",
            "-H", format!("x-tandem-client-id: {web_id}").as_str(), &direct]).await;
        assert!(said.contains("host:"), "served: {said}");
        assert!(!said.contains("x-tandem-client-id"), "a claimed identity never reaches the app: {said}");
        let vault_ip = pod_ip(&vault[0]).unwrap();
        let refused = in_pod(cluster, outsider_ip, &["curl", "-sS", "--max-time", "10", "-i",
            &format!("http://{vault_ip}:8080/headers")]).await;
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        assert!(refused.contains("mtls_required"), "{refused}");
        let (ok, said) = try_in_pod(cluster, outsider_ip, &["python3", "-c",
            "import socket,sys; s=socket.create_connection((sys.argv[1], 9000), timeout=5); s.sendall(b'x\\n'); d=s.recv(10); sys.exit(0 if d else 3)",
            &vault_ip.to_string()]).await;
        assert!(!ok, "opaque plaintext to an mtls-only pod is closed: {said}");
        let page = admin(vault_ip, "/metrics").await;
        assert!(series(&page, r#"tandem_proxy_inbound_connections_total{transport="refused",client_id=""}"#) >= 1.0, "{page}");
        // A meshed client reaches it.
        let said = in_pod(cluster, client_ip, &["curl", "-sS", "--max-time", "10", &format!("http://{vault_service}/headers")]).await;
        assert!(said.contains(&format!("x-tandem-client-id: {client_id}")), "{said}");

        // A server proxy whose certificate names another identity than the one
        // discovery gave is refused by the client's proxy. Here a hand-written
        // EndpointSlice (anyone allowed to write slices could make one) says that a
        // `web` pod serves at a `vault` pod's address.
        let vault_ip = vault_ip.to_string();
        let web_pod = crate::cluster::name(&web[0]);
        ns.apply(&[
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "impostor"},
                   "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": "impostor-1", "labels": {"kubernetes.io/service-name": "impostor"}},
                   "addressType": "IPv4",
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                   "endpoints": [{"addresses": [vault_ip], "conditions": {"ready": true}, "zone": "zone-a",
                                  "targetRef": {"kind": "Pod", "name": web_pod, "namespace": ns.name()}}]}),
        ]).await;
        let impostor = format!("http://{}/headers", cluster_ip(&ns, "impostor").await);
        let vault_id = format!("spiffe://cluster.local/ns/{}/sa/vault", ns.name());
        // Until the client's proxy has the new Service, the address is not one it
        // knows and the connection goes nowhere (no kube-proxy here).
        let refused = eventually(Duration::from_secs(30), "the client's proxy routing the impostor Service", || async {
            let (_, said) = try_in_pod(cluster, client_ip, &["curl", "-sS", "-i", "--max-time", "10", &impostor]).await;
            said.starts_with("HTTP/1.1 502").then_some(said)
        }).await;
        assert!(
            refused.contains(&format!("names {vault_id:?}, not the expected {web_id:?}")),
            "the answer says whose certificate it was: {refused}"
        );
        let page = admin(client_ip, "/metrics").await;
        assert!(series(&page, r#"tandem_proxy_mesh_tls_handshakes_total{side="client",result="error"}"#) >= 1.0, "{page}");
    })
    .await
}

/// `web` (one pod) and a meshed `client`, as in the test above.
fn small_workloads() -> Vec<Value> {
    workloads()
        .into_iter()
        .filter(|o| {
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            ["web", "client"].contains(&name)
        })
        .map(|mut o| {
            if o["kind"] == "Deployment" {
                o["spec"]["replicas"] = json!(1);
            }
            o
        })
        .collect()
}

/// Requests from the client pod to `url` until `done` says so (checked between
/// requests), every one of which must succeed; how many were made.
async fn requests_until<F, Fut>(
    cluster: &Cluster,
    client: Ipv4Addr,
    url: &str,
    what: &str,
    limit: Duration,
    mut done: F,
) -> usize
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut made = 0;
    loop {
        let (ok, said) = try_in_pod(
            cluster,
            client,
            &["curl", "-sS", "--fail", "--max-time", "5", url],
        )
        .await;
        assert!(ok, "request {made} failed while {what}: {said}");
        made += 1;
        if done().await {
            return made;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not done within {limit:?} ({made} requests)"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn certificates_renew_and_outlive_a_control_plane_outage() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("renew").await;
        // Certificates for 40 s: renewed after about 28.
        let mut injector = Injector::start_with_flags(
            &ns,
            Some(cluster.pod_gateway()),
            &["--identity-lifetime", "40s"],
        )
        .await;
        ns.apply(&small_workloads()).await;
        ns.wait_ready("app=web", 1).await;
        let client = ns
            .wait_pod("client", "ready", crate::cluster::is_ready)
            .await;
        let client_ip = pod_ip(&client).expect("the client pod's address");
        let url = format!("http://{}/", cluster_ip(&ns, "web").await);
        let renewals = |result: &'static str| async move {
            series(
                &admin(client_ip, "/metrics").await,
                &format!(r#"tandem_proxy_identity_renewals_total{{result="{result}"}}"#),
            )
        };
        let expiry = || async move {
            series(
                &admin(client_ip, "/metrics").await,
                "tandem_proxy_identity_certificate_expiry_timestamp_seconds",
            )
        };
        let first_expiry = expiry().await;
        assert!(first_expiry > 0.0, "the proxy has a certificate");

        // A renewal under load: no request fails.
        requests_until(
            cluster,
            client_ip,
            &url,
            "the certificate renews",
            Duration::from_secs(60),
            || async { renewals("ok").await >= 2.0 },
        )
        .await;
        let second_expiry = expiry().await;
        assert!(
            second_expiry > first_expiry,
            "a new certificate: {first_expiry} -> {second_expiry}"
        );

        // The control plane goes away just after the renewal: the proxies keep
        // serving with what they have, and say renewal fails...
        injector.stop().await;
        requests_until(
            cluster,
            client_ip,
            &url,
            "the control plane is down",
            Duration::from_secs(60),
            || async { renewals("failed").await >= 1.0 },
        )
        .await;
        let config: Value = serde_json::from_str(&admin(client_ip, "/config").await).unwrap();
        assert!(
            config["identity"]["certificate"]["expires_in_seconds"]
                .as_u64()
                .unwrap()
                > 0,
            "still valid: {config}"
        );

        // ...and renew when it is back, with no request failing in between.
        injector.restart().await;
        requests_until(
            cluster,
            client_ip,
            &url,
            "the control plane is back",
            Duration::from_secs(40),
            || async { renewals("ok").await >= 3.0 },
        )
        .await;
        assert!(expiry().await > second_expiry);
    })
    .await
}

#[tokio::test]
async fn a_root_rotation_under_traffic_fails_no_request() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("rotate").await;
        let dir = TestDir::new("mtls-rotate");
        let (root1, issuer1, key1) = openssl_issuer(&dir, "one").await;
        let (root2, issuer2, key2) = openssl_issuer(&dir, "two").await;
        // The user's issuer (cert-manager's layout), certificates for 15 s (renewed
        // after about 10), the Secret and ConfigMap read every second.
        ns.apply(&[issuer_secret(&issuer1, &key1, &root1)]).await;
        let _injector = Injector::start_with_flags(
            &ns,
            Some(cluster.pod_gateway()),
            &["--identity-lifetime", "15s", "--identity-refresh", "1s"],
        )
        .await;
        ns.apply(&small_workloads()).await;
        let web = ns.wait_ready("app=web", 1).await;
        let client = ns
            .wait_pod("client", "ready", crate::cluster::is_ready)
            .await;
        let proxies = [
            pod_ip(&client).expect("the client pod's address"),
            pod_ip(&web[0]).expect("the web pod's address"),
        ];
        let client_ip = proxies[0];
        let url = format!("http://{}/", cluster_ip(&ns, "web").await);
        let roots_held = || async move {
            let mut held = Vec::new();
            for ip in proxies {
                let config: Value = serde_json::from_str(&admin(ip, "/config").await).unwrap();
                held.push(config["identity"]["trust_roots"].as_u64().unwrap_or(0));
            }
            held
        };
        let renewed = || async move {
            let mut ok = Vec::new();
            for ip in proxies {
                let page = admin(ip, "/metrics").await;
                ok.push(series(
                    &page,
                    r#"tandem_proxy_identity_renewals_total{result="ok"}"#,
                ));
            }
            ok
        };
        let step = Duration::from_secs(60);

        // 1. The new root beside the old one: every proxy comes to trust both.
        ns.apply(&[trust_roots_map(&format!("{root1}{root2}"))])
            .await;
        requests_until(
            cluster,
            client_ip,
            &url,
            "the new root spreads",
            step,
            || async { roots_held().await == [2, 2] },
        )
        .await;
        // 2. The issuer under the new root: every proxy renews twice (so its
        // certificate is the new issuer's), no request failing.
        let before = renewed().await;
        ns.apply(&[issuer_secret(&issuer2, &key2, &root2)]).await;
        requests_until(
            cluster,
            client_ip,
            &url,
            "certificates from the new issuer",
            step,
            || {
                let before = before.clone();
                async move {
                    let now = renewed().await;
                    now.iter().zip(&before).all(|(n, b)| *n >= b + 2.0)
                }
            },
        )
        .await;
        // 3. The old root goes: trusted by no proxy, and traffic goes on.
        ns.apply(&[trust_roots_map(&root2)]).await;
        requests_until(
            cluster,
            client_ip,
            &url,
            "the old root is dropped",
            step,
            || async { roots_held().await == [1, 1] },
        )
        .await;
        let said = in_pod(
            cluster,
            client_ip,
            &["curl", "-sS", "--fail", "--max-time", "5", &url],
        )
        .await;
        assert!(!said.is_empty());
    })
    .await
}
