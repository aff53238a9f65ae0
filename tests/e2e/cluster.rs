//! A real Kubernetes control plane for the Kubernetes tests, with our node agent
//! standing in for kubelets and the scheduler (see tests/cluster/README.md).
//!
//! One cluster per test process, started by the first test that asks for it and
//! shared by all through a `OnceLock`:
//! - `TANDEM_CLUSTER_DIR` naming a running cluster (`scripts/cluster.sh status`): that
//!   one is used (and left running);
//! - else `scripts/cluster.sh up --dir <target>/e2e-cluster-<pid> --watch-pid <pid>`.
//!
//! Then `tandem node-agent --watch-pid <pid>` with a bridge (`tnd<pid>`) and a pod
//! CIDR (a /22 in 10.128.0.0/9 derived from the pid; `TANDEM_E2E_POD_CIDR` overrides)
//! of its own, so two test runs on one machine do not collide. When the test process
//! exits, the agent and the cluster's watcher notice and take everything down.
//!
//! Tests isolate themselves with [`Cluster::namespace`]: a namespace of their own,
//! deleted (in the background) when dropped.
//!
//! ```ignore
//! let cluster = cluster().await;
//! let ns = cluster.namespace("spread").await;
//! ns.apply(&[service, deployment]).await;
//! let pods = ns.wait_deployment("web").await;       // Ready, with addresses
//! ns.set_ready(&name(&pods[0]), false).await;        // the agent.tandem.io/ready flip
//! let slices = ns.endpoint_slices("web").await;
//! ```

// The API is for every Kubernetes test; not each of them uses all of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace as NamespaceObject, Pod, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::support::{exe, repo};

/// How long a cluster wait (pods ready, a slice changing) may take.
pub const CLUSTER_STEP: Duration = Duration::from_secs(60);
/// How long the agent may take to announce itself.
const AGENT_START: Duration = Duration::from_secs(60);

pub struct Cluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl: PathBuf,
    agent_state: PathBuf,
    agent_log: PathBuf,
    agent_admin: SocketAddr,
    pod_cidr: String,
    gateway: Ipv4Addr,
    bridge: String,
    /// Whether this process started the cluster (else it was there already).
    pub owned: bool,
    /// Cluster (if started here) and agent, until the agent announced itself.
    pub start_time: Duration,
    _agent: Mutex<Child>,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();

/// The shared cluster, started on first use. Panics (the test fails) with the
/// failing component's last log lines if it cannot start.
pub async fn cluster() -> &'static Cluster {
    let started = tokio::task::spawn_blocking(|| CLUSTER.get_or_init(|| start(&Own::Shared)))
        .await
        .expect("the cluster start-up task");
    match started {
        Ok(cluster) => cluster,
        Err(e) => panic!("no test cluster: {e}"),
    }
}

/// A cluster of one test's own, for what would disturb the others (restarting the
/// API server, compacting etcd): its own dir, bridge and pod addresses, and more
/// kube-apiserver flags if asked. Take it down with [`Cluster::stop`] (if the test
/// fails first, the process's exit does).
pub async fn own_cluster(name: &str, apiserver_flags: &str) -> &'static Cluster {
    let own = Own::Named {
        name: name.to_string(),
        apiserver_flags: apiserver_flags.to_string(),
    };
    let started = tokio::task::spawn_blocking(move || start(&own))
        .await
        .expect("the cluster start-up task");
    match started {
        // Tests hold `&'static Cluster`: one per such test, for the process's life.
        Ok(cluster) => Box::leak(Box::new(cluster)),
        Err(e) => panic!("no cluster of the test's own: {e}"),
    }
}

/// Which cluster [`start`] brings up.
enum Own {
    /// The one every test shares (or the running one `TANDEM_CLUSTER_DIR` names).
    Shared,
    /// One test's own.
    Named {
        name: String,
        apiserver_flags: String,
    },
}

/// `<target>` (the binaries are in `<target>/<profile>/`).
fn target_dir() -> PathBuf {
    exe()
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo().join("target"))
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn file_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => last_lines(&text, n),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn cluster_sh(args: &[&str]) -> std::io::Result<std::process::Output> {
    std::process::Command::new(repo().join("scripts/cluster.sh"))
        .args(args)
        .stdin(Stdio::null())
        .output()
}

fn running(dir: &Path) -> bool {
    cluster_sh(&["status", "--dir", &dir.display().to_string()]).is_ok_and(|o| o.status.success())
}

fn bin_dir(tool: &str) -> Result<PathBuf, String> {
    let out = std::process::Command::new(repo().join("tests/cluster/build-tools.sh"))
        .args(["--print-bin-dir", tool])
        .output()
        .map_err(|e| format!("cannot run tests/cluster/build-tools.sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "tests/cluster/build-tools.sh --print-bin-dir {tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Removes the directories of earlier runs whose process is gone and whose cluster
/// is down, keeping one's certificates for `dir` (cluster.sh remakes them when they
/// are about to expire; making them is a good part of a cold `up`).
fn remove_stale_dirs(target: &Path, dir: &Path) {
    let Ok(entries) = std::fs::read_dir(target) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("e2e-cluster-")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !pid_alive(pid) && !running(&entry.path()) {
            let pki = entry.path().join("pki");
            if pki.join("ca.crt").exists() && !dir.join("pki").exists() {
                let _ = std::fs::create_dir_all(dir);
                let _ = std::fs::rename(&pki, dir.join("pki"));
            }
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A /22 of 10.128.0.0/9 from the pid, unless `TANDEM_E2E_POD_CIDR` says otherwise.
fn pod_cidr(pid: u32) -> (String, Ipv4Addr) {
    if let Ok(cidr) = std::env::var("TANDEM_E2E_POD_CIDR") {
        let network: Ipv4Addr = cidr
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("TANDEM_E2E_POD_CIDR={cidr:?} is not a CIDR"));
        return (cidr, Ipv4Addr::from(u32::from(network) + 1));
    }
    let b = 128 + (pid / 64) % 120;
    let c = (pid % 64) * 4;
    (
        format!("10.{b}.{c}.0/22"),
        Ipv4Addr::new(10, b as u8, c as u8, 1),
    )
}

/// A /24 of 172.16.0.0/12 for a test's own cluster, from the pid and its number.
fn own_pod_cidr(pid: u32, n: u32) -> (String, Ipv4Addr) {
    let b = 16 + (pid / 256) % 16;
    let c = (pid + n * 97) % 256;
    (
        format!("172.{b}.{c}.0/24"),
        Ipv4Addr::new(172, b as u8, c as u8, 1),
    )
}

fn start(own: &Own) -> Result<Cluster, String> {
    let t0 = Instant::now();
    let pid = std::process::id();
    let target = target_dir();
    let kubectl = bin_dir("kubernetes")?.join("kubectl");
    let existing = match own {
        Own::Shared => std::env::var_os("TANDEM_CLUSTER_DIR")
            .map(PathBuf::from)
            .filter(|d| running(d)),
        Own::Named { .. } => None,
    };
    let (suffix, apiserver_flags) = match own {
        Own::Shared => (String::new(), ""),
        Own::Named {
            name,
            apiserver_flags,
        } => (format!("-{name}"), apiserver_flags.as_str()),
    };
    let (dir, owned) = match existing {
        Some(dir) => {
            eprintln!("cluster: using the running cluster in {}", dir.display());
            (dir, false)
        }
        None => {
            for (tool, binary) in [("kubernetes", "kube-apiserver"), ("etcd", "etcd")] {
                if !bin_dir(tool)?.join(binary).exists() {
                    return Err(format!(
                        "{binary} is not built: run tests/cluster/build-tools.sh kubernetes etcd (scripts/test.sh does; about 11 minutes the first time)"
                    ));
                }
            }
            let dir = target.join(format!("e2e-cluster-{pid}{suffix}"));
            if suffix.is_empty() {
                remove_stale_dirs(&target, &dir);
            }
            let out = std::process::Command::new(repo().join("scripts/cluster.sh"))
                .args(["up", "--dir", &dir.display().to_string()])
                .args(["--watch-pid", &pid.to_string()])
                .env("TANDEM_APISERVER_FLAGS", apiserver_flags)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run scripts/cluster.sh: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "scripts/cluster.sh up failed ({}):\n{}",
                    out.status,
                    last_lines(&String::from_utf8_lossy(&out.stderr), 60)
                ));
            }
            (dir, true)
        }
    };
    let cluster_up = t0.elapsed();
    let kubeconfig = dir.join("admin.kubeconfig");

    let (bridge, (cidr, gateway)) = match own {
        Own::Shared => (format!("tnd{pid}"), pod_cidr(pid)),
        Own::Named { .. } => {
            static OWN: AtomicUsize = AtomicUsize::new(0);
            let n = OWN.fetch_add(1, Ordering::Relaxed) as u32;
            (format!("tno{pid}{n}"), own_pod_cidr(pid, n))
        }
    };
    let agent_state = dir.join(format!("node-agent-{pid}"));
    let agent_log = dir.join(format!("node-agent-{pid}.log"));
    let log = std::fs::File::create(&agent_log)
        .map_err(|e| format!("cannot create {}: {e}", agent_log.display()))?;
    let bin = crate::support::pod_bin_dir()?;
    let mut agent = std::process::Command::new(exe())
        .arg("node-agent")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--state-dir")
        .arg(&agent_state)
        .args(["--bridge", &bridge, "--pod-cidr", &cidr])
        .arg("--bin-dir")
        .arg(bin)
        .args(["--admin", "127.0.0.1:0", "--watch-pid", &pid.to_string()])
        .env("RUST_LOG", "info,kube_client=off")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {} node-agent: {e}", exe().display()))?;
    let stdout = agent.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        // Read on after the announcement, so the agent never blocks on a full pipe.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addrs) = tandem_common::announce::parse_listening(&line)
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addrs);
            }
        }
    });
    let deadline = Instant::now() + AGENT_START;
    let addrs = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(addrs) => break addrs,
            Err(_) => {
                let exited = agent.try_wait().ok().flatten();
                if exited.is_some() || Instant::now() > deadline {
                    let _ = agent.kill();
                    let _ = agent.wait();
                    let why = match exited {
                        Some(status) => format!("exited ({status})"),
                        None => format!("did not announce itself within {AGENT_START:?}"),
                    };
                    return Err(format!(
                        "the node agent {why}; last lines of {}:\n{}",
                        agent_log.display(),
                        file_tail(&agent_log, 30)
                    ));
                }
            }
        }
    };
    let agent_admin = addrs
        .iter()
        .find(|(name, _)| name == "admin")
        .map(|(_, addr)| *addr)
        .ok_or("the node agent announced no admin address")?;
    let start_time = t0.elapsed();
    eprintln!(
        "cluster: ready in {:.1}s ({} {:.1}s, node agent {:.1}s): {}, pods {cidr} on bridge {bridge}, agent log {}",
        start_time.as_secs_f64(),
        if owned {
            "cluster.sh up"
        } else {
            "existing cluster"
        },
        cluster_up.as_secs_f64(),
        (start_time - cluster_up).as_secs_f64(),
        dir.display(),
        agent_log.display(),
    );
    Ok(Cluster {
        dir,
        kubeconfig,
        kubectl,
        agent_state,
        agent_log,
        agent_admin,
        pod_cidr: cidr,
        gateway,
        bridge,
        owned,
        start_time,
        _agent: Mutex::new(agent),
    })
}

/// Polls `check` every 100 ms until it gives `Some`, or panics with `what`.
pub async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a kubectl run said.
pub struct Said {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

fn list_of(objects: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": objects}))
        .expect("objects serialise")
}

impl Cluster {
    /// Takes a test's own cluster down: the node agent, then the cluster's processes
    /// (by their pids, through scripts/cluster.sh).
    pub fn stop(&self) {
        if let Ok(mut agent) = self._agent.lock() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if self.owned {
            let _ = cluster_sh(&["down", "--dir", &self.dir.display().to_string()]);
        }
    }

    /// Kills the API server (as a crash would), or starts it again on the same port.
    pub async fn stop_apiserver(&self) {
        let dir = self.dir.display().to_string();
        let out = tokio::task::spawn_blocking(move || {
            cluster_sh(&["stop", "kube-apiserver", "--dir", &dir])
        })
        .await
        .expect("cluster.sh")
        .expect("cluster.sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub async fn start_apiserver(&self) {
        let dir = self.dir.display().to_string();
        let out = tokio::task::spawn_blocking(move || {
            cluster_sh(&["start", "kube-apiserver", "--dir", &dir])
        })
        .await
        .expect("cluster.sh")
        .expect("cluster.sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// etcd's client URL (its JSON gateway: `/v3/kv/...`).
    pub fn etcd_url(&self) -> String {
        self.env("TANDEM_CLUSTER_ETCD")
    }

    /// A value of the cluster's `cluster.env` (`scripts/cluster.sh`).
    pub fn env(&self, key: &str) -> String {
        let env = std::fs::read_to_string(self.dir.join("cluster.env")).expect("cluster.env");
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('\'').to_string())
            .unwrap_or_else(|| panic!("cluster.env has no {key}"))
    }

    /// The admin kubeconfig (client certificate, system:masters).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The cluster's state dir (logs of etcd, kube-apiserver, kube-controller-manager,
    /// the node agent).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node agent's state dir: `pods/<namespace>/<pod>/<container>.log`.
    pub fn agent_state_dir(&self) -> &Path {
        &self.agent_state
    }

    pub fn agent_log(&self) -> &Path {
        &self.agent_log
    }

    /// The node agent's admin address (/live, /ready, /metrics).
    pub fn agent_admin(&self) -> SocketAddr {
        self.agent_admin
    }

    /// Pod addresses of this run.
    pub fn pod_cidr(&self) -> &str {
        &self.pod_cidr
    }

    /// The host's address on the pod bridge: what pods the agent runs reach the host
    /// at (a server for them must listen on it or on 0.0.0.0, not on 127.0.0.1).
    pub fn pod_gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The network namespace the node agent made for the pod at `ip`.
    pub fn netns(&self, ip: Ipv4Addr) -> String {
        let [a, b, c, d] = ip.octets();
        format!("{}-{a}-{b}-{c}-{d}", self.bridge)
    }

    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// A client as the admin. Make it in the test's own runtime (each test has one).
    pub async fn client(&self) -> Client {
        tandem_control_plane::source::kubernetes::client(Some(&self.kubeconfig))
            .await
            .unwrap_or_else(|e| panic!("a client for the test cluster: {e}"))
    }

    /// `kubectl ARGS` as the admin, with `stdin`, whatever its exit status.
    pub async fn run_kubectl(&self, args: &[&str], stdin: Option<&[u8]>) -> Said {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.kubectl.display()));
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(input).await.expect("write kubectl's stdin");
        }
        let out = tokio::time::timeout(CLUSTER_STEP, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} did not finish within {CLUSTER_STEP:?}"))
            .expect("kubectl runs");
        Said {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `kubectl ARGS` with `stdin`, which must succeed (panics with its output).
    pub async fn kubectl_ok(&self, args: &[&str], stdin: Option<&[u8]>) -> Said {
        let said = self.run_kubectl(args, stdin).await;
        assert!(
            said.ok,
            "kubectl {args:?} failed ({:?}): {}{}",
            said.code, said.stdout, said.stderr
        );
        said
    }

    /// `kubectl ARGS` as the admin: its stdout (panics with its output on failure).
    pub async fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_ok(args, None).await.stdout
    }

    /// `kubectl ARGS` from a `Drop`: blocks, never panics, output ignored (the
    /// deletions a test leaves behind, asked for without waiting).
    pub fn kubectl_quietly(&self, args: &[&str]) {
        let _ = std::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .arg("--request-timeout=10s")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// `kubectl apply` of these objects.
    pub async fn apply(&self, objects: &[Value]) -> String {
        self.kubectl_ok(&["apply", "-f", "-"], Some(&list_of(objects)))
            .await
            .stdout
    }

    /// What a container of a pod the agent runs wrote (stdout and stderr).
    pub fn container_log(&self, namespace: &str, pod: &str, container: &str) -> String {
        let path = self
            .agent_state
            .join("pods")
            .join(namespace)
            .join(pod)
            .join(format!("{container}.log"));
        std::fs::read_to_string(&path).unwrap_or_default()
    }

    /// A fresh namespace `<prefix>-<pid>-<n>` (its `default` ServiceAccount exists),
    /// deleted in the background when dropped.
    pub async fn namespace(&'static self, prefix: &str) -> Namespace {
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let name = format!(
            "{}-{}-{}",
            prefix.trim_matches('-'),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let client = self.client().await;
        let object: NamespaceObject = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"tandem.io/e2e": std::process::id().to_string()}}
        }))
        .expect("a namespace");
        Api::<NamespaceObject>::all(client.clone())
            .create(&PostParams::default(), &object)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        let namespace = Namespace {
            cluster: self,
            name,
            client,
        };
        // Pods are refused until the ServiceAccount controller made `default`.
        let accounts: Api<ServiceAccount> = namespace.api();
        poll(
            CLUSTER_STEP,
            "the namespace's default ServiceAccount",
            || async { accounts.get_opt("default").await.ok().flatten() },
        )
        .await;
        namespace
    }
}

/// A namespace of one test; deleted (without waiting) when dropped.
pub struct Namespace {
    cluster: &'static Cluster,
    name: String,
    client: Client,
}

/// A pod's name.
pub fn name(pod: &Pod) -> String {
    pod.metadata.name.clone().unwrap_or_default()
}

/// A pod's address, if it has one.
pub fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()
}

/// Whether the pod's Ready condition is True.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

impl Namespace {
    /// A kubeconfig (written to the cluster's directory as `FILE.kubeconfig`) with a
    /// token the API server minted for ServiceAccount `sa` of this namespace.
    pub async fn account_kubeconfig(&self, sa: &str, file: &str) -> PathBuf {
        let token = self
            .kubectl(&["create", "token", sa, "--duration", "2h"])
            .await;
        let cluster = self.cluster();
        let kubeconfig = cluster.dir().join(format!("{file}.kubeconfig"));
        let config = json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "tandem", "cluster": {
                "server": cluster.env("TANDEM_CLUSTER_SERVER"),
                "certificate-authority": cluster.env("TANDEM_CLUSTER_CA")}}],
            "users": [{"name": sa, "user": {"token": token.trim()}}],
            "contexts": [{"name": "tandem", "context": {"cluster": "tandem", "user": sa}}],
            "current-context": "tandem"
        });
        std::fs::write(&kubeconfig, serde_json::to_string(&config).unwrap()).unwrap();
        kubeconfig
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn cluster(&self) -> &'static Cluster {
        self.cluster
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// An API for a namespaced kind in this namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// `kubectl -n NAMESPACE ARGS`.
    pub async fn kubectl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        self.cluster.kubectl(&all).await
    }

    /// `kubectl apply` of these objects in this namespace.
    pub async fn apply(&self, objects: &[Value]) -> String {
        self.cluster
            .kubectl_ok(
                &["-n", &self.name, "apply", "-f", "-"],
                Some(&list_of(objects)),
            )
            .await
            .stdout
    }

    pub async fn pod(&self, name: &str) -> Pod {
        self.api::<Pod>()
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("get pod {}/{name}: {e}", self.name))
    }

    /// Pods matching a label selector (`app=web`; "" for all).
    pub async fn pods(&self, selector: &str) -> Vec<Pod> {
        self.api::<Pod>()
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap_or_else(|e| panic!("list pods {selector:?} in {}: {e}", self.name))
            .items
    }

    /// Waits until exactly `count` pods match `selector`, none terminating, all Ready
    /// with an address; returns them sorted by name.
    pub async fn wait_ready(&self, selector: &str, count: usize) -> Vec<Pod> {
        let what = format!("{count} ready pods {selector:?} in {}", self.name);
        let mut pods = poll(CLUSTER_STEP, &what, || async {
            let pods = self.pods(selector).await;
            let live: Vec<Pod> = pods
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            (live.len() == count && live.iter().all(|p| is_ready(p) && pod_ip(p).is_some()))
                .then_some(live)
        })
        .await;
        pods.sort_by_key(name);
        pods
    }

    /// Waits until the Deployment's replicas are all Ready with addresses.
    pub async fn wait_deployment(&self, deployment: &str) -> Vec<Pod> {
        let d = self
            .api::<Deployment>()
            .get(deployment)
            .await
            .unwrap_or_else(|e| panic!("get deployment {deployment}: {e}"));
        let spec = d.spec.expect("a deployment spec");
        let selector = spec
            .selector
            .match_labels
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        self.wait_ready(&selector, spec.replicas.unwrap_or(1) as usize)
            .await
    }

    /// Waits until `check` holds for the pod.
    pub async fn wait_pod(&self, pod: &str, what: &str, check: impl Fn(&Pod) -> bool) -> Pod {
        let api = self.api::<Pod>();
        let what = format!("pod {}/{pod}: {what}", self.name);
        poll(CLUSTER_STEP, &what, || async {
            api.get_opt(pod).await.ok().flatten().filter(|p| check(p))
        })
        .await
    }

    /// Waits until the pod is gone from the API.
    pub async fn wait_gone(&self, pod: &str) {
        let api = self.api::<Pod>();
        let what = format!("pod {}/{pod} to be gone", self.name);
        poll(CLUSTER_STEP, &what, || async {
            matches!(api.get_opt(pod).await, Ok(None)).then_some(())
        })
        .await
    }

    /// Flips the pod's readiness through the agent's `agent.tandem.io/ready` annotation.
    pub async fn set_ready(&self, pod: &str, ready: bool) {
        let patch = json!({"metadata": {"annotations": {
            "agent.tandem.io/ready": if ready { "true" } else { "false" }
        }}});
        self.api::<Pod>()
            .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("annotate pod {pod}: {e}"));
    }

    /// Deletes a pod (gracefully, with its own grace period unless `grace` says).
    pub async fn delete_pod(&self, pod: &str, grace: Option<u32>) {
        let params = kube::api::DeleteParams {
            grace_period_seconds: grace,
            ..Default::default()
        };
        self.api::<Pod>()
            .delete(pod, &params)
            .await
            .unwrap_or_else(|e| panic!("delete pod {pod}: {e}"));
    }

    /// The EndpointSlices of a Service.
    pub async fn endpoint_slices(&self, service: &str) -> Vec<EndpointSlice> {
        self.api::<EndpointSlice>()
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
            .await
            .unwrap_or_else(|e| panic!("list slices of {service}: {e}"))
            .items
    }

    /// What a container of a pod the agent runs wrote.
    pub fn container_log(&self, pod: &str, container: &str) -> String {
        self.cluster.container_log(&self.name, pod, container)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.cluster.kubectl_quietly(&[
            "delete",
            "namespace",
            &self.name,
            "--wait=false",
            "--ignore-not-found",
        ]);
    }
}
