//! Shared helpers for the end-to-end tests: real `tandem` processes on loopback,
//! ports from the OS, polling with deadlines (never sleeping to synchronise).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem::client::Connection;
use tandem::process::{Options, Spawned, spawn_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const START: Duration = Duration::from_secs(30);

pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tandem"))
}

/// The programs pods run (`--bin-dir`): this test build's `tandem`, and `tandem-proxy`
/// as `tandem proxy` (the same code as the proxy binary, and never a stale build of it).
/// In the temporary directory, which every user can reach: the injected proxy runs as
/// its own UID, and the checkout may sit in a directory only root can enter.
pub fn pod_bin_dir() -> Result<PathBuf, String> {
    static DIR: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    DIR.get_or_init(make_pod_bin_dir).clone()
}

fn make_pod_bin_dir() -> Result<PathBuf, String> {
    let pid = std::process::id();
    use std::os::unix::fs::PermissionsExt;
    let tmp = std::env::temp_dir();
    // Left by runs that were killed.
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(old) = name
                .strip_prefix("tandem-pods-")
                .and_then(|p| p.parse::<u32>().ok())
                && old != pid
                && !Path::new(&format!("/proc/{old}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let bin = tmp.join(format!("tandem-pods-{pid}"));
    let fail = |e: std::io::Error| format!("cannot make {}: {e}", bin.display());
    std::fs::create_dir_all(&bin).map_err(fail)?;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    let tandem = bin.join("tandem");
    if !tandem.exists() {
        let _ = std::fs::remove_file(&tandem);
        std::fs::hard_link(exe(), &tandem)
            .or_else(|_| std::fs::copy(exe(), &tandem).map(drop))
            .map_err(fail)?;
    }
    let proxy = bin.join("tandem-proxy");
    let script = format!("#!/bin/sh\nexec '{}' proxy \"$@\"\n", tandem.display());
    std::fs::write(&proxy, script).map_err(fail)?;
    std::fs::set_permissions(&proxy, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    Ok(bin)
}

/// Runs a test body with an overall deadline, so no test can hang CI.
pub async fn bounded<F: Future<Output = ()>>(limit: Duration, body: F) {
    tokio::time::timeout(limit, body)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {limit:?}"));
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
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
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A scratch directory removed when dropped.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tandem-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create test dir");
        Self(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces a file the way editors and ConfigMap updates do: write aside, rename over.
pub fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over file");
}

async fn start(name: &str, args: &[&str], capture: bool) -> Spawned {
    start_logging(name, args, capture, "info").await
}

/// Starts a process with `RUST_LOG` set to `rust_log`.
async fn start_logging(name: &str, args: &[&str], capture: bool, rust_log: &str) -> Spawned {
    let options = Options {
        envs: vec![("RUST_LOG", rust_log)],
        capture_stderr: capture,
    };
    spawn_with(name, exe(), args, &options, START)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

pub async fn backend(name: &str) -> Spawned {
    backend_with(name, &[]).await
}

pub async fn backend_with(name: &str, extra: &[&str]) -> Spawned {
    start_backend(name, extra, false).await
}

/// A backend that logs every request it serves, with the HTTP version it came in.
pub async fn logging_backend(name: &str) -> Spawned {
    start_backend(name, &[], true).await
}

/// A backend in the test itself, below HTTP: it reads each request head, writes
/// `reply` as it is (nothing, to hang up unanswered) and closes the connection.
pub async fn raw_backend(reply: &'static [u8]) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = stream.write_all(reply).await;
            });
        }
    });
    addr
}

async fn start_backend(name: &str, extra: &[&str], logging: bool) -> Spawned {
    let mut args = vec!["backend", "--name", name];
    if !logging {
        args.push("--quiet");
    }
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    start(name, &args, logging).await
}

pub async fn control_plane(file: &Path) -> Spawned {
    control_plane_on(file, "127.0.0.1:0").await
}

pub async fn control_plane_on(file: &Path, listen: &str) -> Spawned {
    let source = format!("file:{}", file.display());
    start(
        "control-plane",
        &[
            "control-plane",
            "--source",
            &source,
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
        ],
        true,
    )
    .await
}

/// A proxy on the control plane at `discovery`, ready (it has heard from the control plane).
pub async fn proxy(discovery: SocketAddr, extra: &[&str]) -> Spawned {
    proxy_logging(discovery, extra, "info").await
}

/// [`proxy`], logging what `rust_log` (`RUST_LOG`) says.
pub async fn proxy_logging(discovery: SocketAddr, extra: &[&str], rust_log: &str) -> Spawned {
    let discovery = discovery.to_string();
    start_proxy(&["--control-plane", &discovery], extra, rust_log).await
}

/// A proxy with static backends (no control plane).
pub async fn static_proxy(backends: &[SocketAddr], extra: &[&str]) -> Spawned {
    let list = backends
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",");
    start_proxy(&["--backends", &list], extra, "info").await
}

/// Backends `instance-1` and `instance-2`, and a static proxy over them with
/// `proxy_args` (the backends live as long as the returned Vec).
pub async fn two_backends(proxy_args: &[&str]) -> (Vec<Spawned>, Spawned) {
    let a = backend("instance-1").await;
    let b = backend("instance-2").await;
    let proxy = static_proxy(&[a.addr("http"), b.addr("http")], proxy_args).await;
    (vec![a, b], proxy)
}

async fn start_proxy(source: &[&str], extra: &[&str], rust_log: &str) -> Spawned {
    let mut args = vec![
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--threads",
        "1",
    ];
    args.extend_from_slice(source);
    args.extend_from_slice(extra);
    let proxy = start_logging("proxy", &args, true, rust_log).await;
    wait_ready(proxy.addr("admin")).await;
    proxy
}

/// Waits until `process` has exited.
pub async fn wait_exit(process: &mut Spawned, timeout: Duration) {
    let what = format!("{} to exit", process.name);
    eventually(timeout, &what, || {
        let running = process.is_running();
        async move { (!running).then_some(()) }
    })
    .await;
}

pub async fn wait_ready(admin: SocketAddr) {
    tandem::client::wait_ready(admin, START)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

/// GET `path` from an admin port.
pub async fn admin_get(admin: SocketAddr, path: &str) -> String {
    let mut conn = Connection::http1(admin).await.expect("connect admin");
    conn.get("localhost", path)
        .await
        .expect("admin request")
        .text()
}

/// A services file for the control plane's file source, built field by field:
///
/// ```ignore
/// Services::new()
///     .service(
///         Service::new("web", 80)
///             .timeout(Duration::from_millis(300))
///             .endpoint(Endpoint::new(addr).weight(3).zone("zone-a"))
///             .endpoint(Endpoint::new(other).health(Health::Draining)),
///     )
///     .node(Node::new("node-a").region("region-1").zone("zone-a"))
///     .write(&file);
/// ```
///
/// Only what is set is written; the control plane's defaults apply to the rest.
#[derive(Debug, Clone, Default)]
pub struct Services {
    services: Vec<Service>,
    nodes: Vec<Node>,
}

/// One service (port) of a [`Services`] file.
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    port: u16,
    namespace: Option<String>,
    cluster_ip: Option<IpAddr>,
    protocol: Option<Protocol>,
    callers: Option<String>,
    timeout: Option<Duration>,
    health_check: Option<HealthCheck>,
    endpoints: Vec<Endpoint>,
}

/// One endpoint of a [`Service`].
#[derive(Debug, Clone)]
pub struct Endpoint {
    address: String,
    weight: Option<u32>,
    region: Option<String>,
    zone: Option<String>,
    subzone: Option<String>,
    health: Option<Health>,
    protocol: Option<Protocol>,
    identity: Option<String>,
    name: Option<String>,
}

/// A node proxies may run on (their `--node`), with its locality.
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    region: Option<String>,
    zone: Option<String>,
    subzone: Option<String>,
}

/// A service's active health checks.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    path: String,
    interval: Option<Duration>,
    timeout: Option<Duration>,
    unhealthy_threshold: Option<u32>,
    healthy_threshold: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Draining,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Opaque,
}

impl Services {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    pub fn node(mut self, node: Node) -> Self {
        self.nodes.push(node);
        self
    }

    pub fn yaml(&self) -> String {
        let mut y = String::new();
        if self.services.is_empty() {
            y.push_str("services: []\n");
        } else {
            y.push_str("services:\n");
        }
        for s in &self.services {
            s.write_yaml(&mut y);
        }
        if !self.nodes.is_empty() {
            y.push_str("nodes:\n");
        }
        for n in &self.nodes {
            let mut fields = vec![format!("name: {}", quote(&n.name))];
            text_field(&mut fields, "region", &n.region);
            text_field(&mut fields, "zone", &n.zone);
            text_field(&mut fields, "subzone", &n.subzone);
            y.push_str(&format!("  - {{{}}}\n", fields.join(", ")));
        }
        y
    }

    /// Writes the file at `path` (the first version, before anything watches it).
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.yaml()).expect("write the services file");
    }

    /// Replaces the file at `path` as an edit does ([`replace_file`]).
    pub fn replace(&self, path: &Path) {
        replace_file(path, &self.yaml());
    }
}

impl Service {
    pub fn new(name: &str, port: u16) -> Self {
        Self {
            name: name.to_string(),
            port,
            namespace: None,
            cluster_ip: None,
            protocol: None,
            callers: None,
            timeout: None,
            health_check: None,
            endpoints: Vec::new(),
        }
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_string());
        self
    }

    pub fn cluster_ip(mut self, ip: IpAddr) -> Self {
        self.cluster_ip = Some(ip);
        self
    }

    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// Each zone's share of the service's callers.
    pub fn callers(mut self, shares: &[(&str, f64)]) -> Self {
        let shares: Vec<String> = shares
            .iter()
            .map(|(zone, share)| format!("{}: {share}", quote(zone)))
            .collect();
        self.callers = Some(format!("{{{}}}", shares.join(", ")));
        self
    }

    /// Callers counted by the control plane from the proxies that watch the service.
    pub fn counted_callers(mut self) -> Self {
        self.callers = Some("counted".to_string());
        self
    }

    /// The request timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn health_check(mut self, check: HealthCheck) -> Self {
        self.health_check = Some(check);
        self
    }

    pub fn endpoint(mut self, endpoint: impl Into<Endpoint>) -> Self {
        self.endpoints.push(endpoint.into());
        self
    }

    pub fn endpoints<E: Into<Endpoint>>(mut self, endpoints: impl IntoIterator<Item = E>) -> Self {
        self.endpoints.extend(endpoints.into_iter().map(Into::into));
        self
    }

    fn write_yaml(&self, y: &mut String) {
        y.push_str(&format!("  - name: {}\n", quote(&self.name)));
        if let Some(namespace) = &self.namespace {
            y.push_str(&format!("    namespace: {}\n", quote(namespace)));
        }
        y.push_str(&format!("    port: {}\n", self.port));
        if let Some(ip) = self.cluster_ip {
            y.push_str(&format!("    cluster_ip: {}\n", quote(&ip.to_string())));
        }
        if let Some(protocol) = self.protocol {
            y.push_str(&format!("    protocol: {}\n", protocol.as_str()));
        }
        if let Some(callers) = &self.callers {
            y.push_str(&format!("    callers: {callers}\n"));
        }
        if let Some(timeout) = self.timeout {
            y.push_str(&format!("    timeout: {}\n", duration(timeout)));
        }
        if let Some(h) = &self.health_check {
            let mut fields = vec![format!("path: {}", quote(&h.path))];
            if let Some(interval) = h.interval {
                fields.push(format!("interval: {}", duration(interval)));
            }
            if let Some(timeout) = h.timeout {
                fields.push(format!("timeout: {}", duration(timeout)));
            }
            if let Some(n) = h.unhealthy_threshold {
                fields.push(format!("unhealthy_threshold: {n}"));
            }
            if let Some(n) = h.healthy_threshold {
                fields.push(format!("healthy_threshold: {n}"));
            }
            y.push_str(&format!("    health_check: {{{}}}\n", fields.join(", ")));
        }
        if self.endpoints.is_empty() {
            y.push_str("    endpoints: []\n");
            return;
        }
        y.push_str("    endpoints:\n");
        for e in &self.endpoints {
            let mut fields = vec![format!("address: {}", quote(&e.address))];
            if let Some(weight) = e.weight {
                fields.push(format!("weight: {weight}"));
            }
            text_field(&mut fields, "region", &e.region);
            text_field(&mut fields, "zone", &e.zone);
            text_field(&mut fields, "subzone", &e.subzone);
            if let Some(health) = e.health {
                fields.push(format!("health: {}", health.as_str()));
            }
            if let Some(protocol) = e.protocol {
                fields.push(format!("protocol: {}", protocol.as_str()));
            }
            text_field(&mut fields, "identity", &e.identity);
            text_field(&mut fields, "name", &e.name);
            y.push_str(&format!("      - {{{}}}\n", fields.join(", ")));
        }
    }
}

impl Endpoint {
    /// An endpoint at `address`; any text, so that a test can write a malformed one.
    pub fn new(address: impl std::fmt::Display) -> Self {
        Self {
            address: address.to_string(),
            weight: None,
            region: None,
            zone: None,
            subzone: None,
            health: None,
            protocol: None,
            identity: None,
            name: None,
        }
    }

    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = Some(weight);
        self
    }

    pub fn region(mut self, region: &str) -> Self {
        self.region = Some(region.to_string());
        self
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.to_string());
        self
    }

    pub fn subzone(mut self, subzone: &str) -> Self {
        self.subzone = Some(subzone.to_string());
        self
    }

    pub fn health(mut self, health: Health) -> Self {
        self.health = Some(health);
        self
    }

    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// Its SPIFFE identity.
    pub fn identity(mut self, identity: &str) -> Self {
        self.identity = Some(identity.to_string());
        self
    }

    /// Its name (a pod's, say).
    pub fn name(mut self, name: &str) -> Self {
        self.name = Some(name.to_string());
        self
    }
}

impl From<SocketAddr> for Endpoint {
    fn from(address: SocketAddr) -> Self {
        Self::new(address)
    }
}

impl Node {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            region: None,
            zone: None,
            subzone: None,
        }
    }

    pub fn region(mut self, region: &str) -> Self {
        self.region = Some(region.to_string());
        self
    }

    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.to_string());
        self
    }

    pub fn subzone(mut self, subzone: &str) -> Self {
        self.subzone = Some(subzone.to_string());
        self
    }
}

impl HealthCheck {
    /// `GET path` on each endpoint.
    pub fn new(path: &str) -> Self {
        Self {
            path: path.to_string(),
            interval: None,
            timeout: None,
            unhealthy_threshold: None,
            healthy_threshold: None,
        }
    }

    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn unhealthy_threshold(mut self, n: u32) -> Self {
        self.unhealthy_threshold = Some(n);
        self
    }

    pub fn healthy_threshold(mut self, n: u32) -> Self {
        self.healthy_threshold = Some(n);
        self
    }
}

impl Health {
    fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Draining => "draining",
            Health::Unhealthy => "unhealthy",
        }
    }
}

impl Protocol {
    fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
            Protocol::Opaque => "opaque",
        }
    }
}

/// A YAML double-quoted string (its escapes are JSON's).
fn quote(text: &str) -> String {
    serde_json::to_string(text).expect("a string is JSON")
}

fn text_field(fields: &mut Vec<String>, key: &str, value: &Option<String>) {
    if let Some(value) = value {
        fields.push(format!("{key}: {}", quote(value)));
    }
}

/// A duration as the services file writes it: `2s`, `300ms`.
fn duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_secs_f64() * 1000.0)
    }
}

// ---- /config and /metrics ----

/// The proxy's `/config`, parsed.
pub async fn config(admin: SocketAddr) -> Value {
    serde_json::from_str(&admin_get(admin, "/config").await).expect("/config is JSON")
}

/// The destination named `name` (`web:80`) in a `/config`.
pub fn destination<'a>(config: &'a Value, name: &str) -> Option<&'a Value> {
    config["destinations"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
}

/// Every endpoint of every destination in a `/config`.
pub fn endpoints(config: &Value) -> Vec<Value> {
    config["destinations"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["endpoints"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// The endpoint at `addr`, in whichever destination of a `/config` has it.
pub fn endpoint<'a>(config: &'a Value, addr: &str) -> Option<&'a Value> {
    config["destinations"].as_array()?.iter().find_map(|d| {
        d["endpoints"]
            .as_array()?
            .iter()
            .find(|e| e["address"] == addr)
    })
}

/// Whether a `/config` shows the endpoint at `addr` ejected.
pub fn ejected(config: &Value, addr: &str) -> bool {
    endpoint(config, addr).is_some_and(|e| e["ejected"] == true)
}

/// The repository's root (the tests run from the `tandem` package there).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The sum of every sample of `name` (any labels) in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> f64 {
    samples(page, name, "").unwrap_or_default()
}

/// The sum of the samples of `name` in a Prometheus text page whose labels include
/// every `key="value"` of `labels` (comma-separated; "" for any); `None` if none does.
pub fn samples(page: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    let mut sum = None;
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (series, value) = match rest.strip_prefix('{') {
            Some(labelled) => labelled.rsplit_once("} ").unwrap_or(("", "")),
            None => match rest.strip_prefix(' ') {
                Some(value) => ("", value),
                None => continue, // another metric, whose name starts with `name`
            },
        };
        let has = |pair: &&str| series.split(',').any(|l| l == *pair);
        if wanted.iter().all(has)
            && let Ok(value) = value.trim().parse::<f64>()
        {
            *sum.get_or_insert(0.0) += value;
        }
    }
    sum
}

/// The metrics page of an admin endpoint (`None` if it does not answer).
pub async fn metrics_page(admin: SocketAddr) -> Option<String> {
    let mut conn = Connection::http1(admin).await.ok()?;
    Some(conn.get("localhost", "/metrics").await.ok()?.text())
}

/// Sends `n` sequential GETs over `conn` and returns who answered each (panics on failure).
pub async fn instances(conn: &mut Connection, authority: &str, n: usize) -> Vec<String> {
    let mut seen = Vec::with_capacity(n);
    for i in 0..n {
        let reply = conn
            .get(authority, "/")
            .await
            .expect("request through the proxy");
        assert!(
            reply.status.is_success(),
            "request {i}: {} {}",
            reply.status,
            reply.text()
        );
        seen.push(reply.instance().expect("x-tandem-instance").to_string());
    }
    seen
}

/// Panics if two consecutive answers came from the same instance; `context` says whose.
pub fn assert_alternates<T: PartialEq + std::fmt::Debug>(seen: &[T], context: &str) {
    for pair in seen.windows(2) {
        assert_ne!(
            pair[0], pair[1],
            "consecutive answers from one instance ({context}): {seen:?}"
        );
    }
}

pub fn counts(seen: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for s in seen {
        *counts.entry(s.clone()).or_default() += 1;
    }
    counts
}

/// A mesh for one test: backends, a services file, a control plane and a proxy.
pub struct Mesh {
    pub _dir: TestDir,
    pub file: PathBuf,
    pub backends: Vec<Spawned>,
    pub control_plane: Spawned,
    pub proxy: Spawned,
}

impl Mesh {
    /// `weights[i]` is the weight of backend `instance-{i+1}` in service `web` port 80.
    pub async fn start(test: &str, weights: &[u32]) -> Self {
        let dir = TestDir::new(test);
        let mut backends = Vec::new();
        for i in 0..weights.len() {
            backends.push(backend(&format!("instance-{}", i + 1)).await);
        }
        let endpoints = backends
            .iter()
            .zip(weights)
            .map(|(b, w)| Endpoint::new(b.addr("http")).weight(*w));
        let file = dir.path("services.yaml");
        Services::new()
            .service(Service::new("web", 80).endpoints(endpoints))
            .write(&file);
        let control_plane = control_plane(&file).await;
        let proxy = proxy(control_plane.addr("discovery"), &[]).await;
        Self {
            _dir: dir,
            file,
            backends,
            control_plane,
            proxy,
        }
    }

    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy.addr("proxy")
    }

    pub async fn connect(&self) -> Connection {
        Connection::http1(self.proxy_addr())
            .await
            .expect("connect to the proxy")
    }
}

pub const STEP: Duration = Duration::from_secs(5);

/// A client connection that writes raw bytes and reads whole responses.
pub struct Raw {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr)
                .await
                .expect("connect to the proxy"),
            buf: Vec::new(),
        }
    }

    /// A connection, if the proxy takes it (it may refuse it at once).
    pub async fn try_connect(addr: SocketAddr) -> Option<Self> {
        let stream = TcpStream::connect(addr).await.ok()?;
        Some(Self {
            stream,
            buf: Vec::new(),
        })
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write a request");
    }

    pub async fn fill(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(STEP, self.stream.read(&mut chunk))
            .await
            .expect("the proxy answers in time")
            .expect("read from the proxy");
        assert!(n > 0, "the proxy closed the connection mid-response");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Reads one response; `head` says whether it answers a HEAD request.
    pub async fn response(&mut self, head: bool) -> RawResponse {
        let (len, status, headers) = loop {
            let mut parsed = [httparse::EMPTY_HEADER; 64];
            let mut res = httparse::Response::new(&mut parsed);
            if let httparse::Status::Complete(len) =
                res.parse(&self.buf).expect("a valid response head")
            {
                let headers = res
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (len, res.code.unwrap(), headers);
            }
            self.fill().await;
        };
        self.buf.drain(..len);
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head || status == 204 || status == 304 || (100..200).contains(&status) {
            return response;
        }
        if response
            .header("transfer-encoding")
            .is_some_and(|te| te.contains("chunked"))
        {
            response.body = self.chunked().await;
        } else {
            let n: usize = response
                .header("content-length")
                .expect("a delimited body")
                .parse()
                .unwrap();
            while self.buf.len() < n {
                self.fill().await;
            }
            response.body = self.buf.drain(..n).collect();
        }
        response
    }

    /// Decodes a chunked body (trailers skipped).
    pub async fn chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill().await;
            };
            let line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("chunk size line {line:?}"));
            self.buf.drain(..line_end + 2);
            if size == 0 {
                // Trailer lines, then the empty line.
                loop {
                    while !self.buf.windows(2).any(|w| w == b"\r\n") {
                        self.fill().await;
                    }
                    let i = self.buf.windows(2).position(|w| w == b"\r\n").unwrap();
                    self.buf.drain(..i + 2);
                    if i == 0 {
                        return body;
                    }
                }
            }
            while self.buf.len() < size + 2 {
                self.fill().await;
            }
            body.extend(self.buf.drain(..size));
            assert_eq!(&self.buf[..2], b"\r\n", "chunk data ends with CRLF");
            self.buf.drain(..2);
        }
    }

    /// True once the proxy closed the connection (with nothing more to read).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(
            tokio::time::timeout(STEP, self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A program `tests/cluster/build-tools.sh TOOL` builds from its pinned Go module:
/// `$env_var` if set, else where that script puts it. Panics (never skips) saying how
/// to build it when it is missing.
pub fn built_tool(tool: &str, binary: &str, env_var: &str) -> PathBuf {
    let how = format!(
        "build it with `tests/cluster/build-tools.sh {tool}` (needs Go >= 1.26; \
         scripts/test.sh does it) or point {env_var} at the binary"
    );
    if let Some(path) = std::env::var_os(env_var) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env_var}={} is not a file: {how}",
            path.display()
        );
        return path;
    }
    let script = repo().join("tests/cluster/build-tools.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(["--print-bin-dir", tool])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} --print-bin-dir {tool} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join(binary);
    assert!(
        path.is_file(),
        "{tool} is not built (no {}): {how}",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_control_plane::model;
    use tandem_control_plane::source::file::parse;

    /// What the builder writes is what the control plane reads, field by field.
    #[test]
    fn the_services_builder_writes_every_field() {
        let yaml = Services::new()
            .service(
                Service::new("web", 8080)
                    .namespace("shop")
                    .cluster_ip("10.96.0.10".parse().unwrap())
                    .protocol(Protocol::Http2)
                    .callers(&[("zone-a", 40.0), ("zone-b", 60.5)])
                    .timeout(Duration::from_millis(1500))
                    .health_check(
                        HealthCheck::new("/healthz")
                            .interval(Duration::from_millis(200))
                            .timeout(Duration::from_secs(2))
                            .unhealthy_threshold(3)
                            .healthy_threshold(1),
                    )
                    .endpoint(
                        Endpoint::new("10.0.0.1:80")
                            .weight(3)
                            .region("region-1")
                            .zone("zone-a")
                            .subzone("rack-1")
                            .health(Health::Draining)
                            .protocol(Protocol::Http1)
                            .identity("spiffe://cluster.local/ns/shop/sa/web")
                            .name("web-1"),
                    )
                    .endpoint(SocketAddr::from(([10, 0, 0, 2], 80)))
                    .endpoint(Endpoint::new("10.0.0.3:80").health(Health::Unhealthy))
                    .endpoint(Endpoint::new("10.0.0.4:80").health(Health::Healthy))
                    .endpoint(Endpoint::new("10.0.0.5:80").protocol(Protocol::Opaque)),
            )
            .service(Service::new("empty", 80).counted_callers())
            .node(
                Node::new("node-a")
                    .region("region-1")
                    .zone("zone-a")
                    .subzone("rack-1"),
            )
            .yaml();
        let content = parse(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));

        let web = &content.services[&model::ServiceKey::new("shop", "web", 8080)];
        assert_eq!(web.cluster_ips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(web.callers["zone-a"], 40.0);
        assert_eq!(web.callers["zone-b"], 60.5);
        assert_eq!(
            web.policy.request_timeout,
            Some(Duration::from_millis(1500))
        );
        assert!(!web.policy.count_callers);
        let check = web.policy.health_check.as_ref().unwrap();
        assert_eq!(check.path, "/healthz");
        assert_eq!(check.interval, Duration::from_millis(200));
        assert_eq!(check.timeout, Duration::from_secs(2));
        assert_eq!((check.unhealthy_threshold, check.healthy_threshold), (3, 1));

        let endpoint = |a: &str| web.endpoints[&a.parse::<SocketAddr>().unwrap()].clone();
        let first = endpoint("10.0.0.1:80");
        assert_eq!(first.weight, 3);
        let locality = &first.locality;
        assert_eq!(
            [&locality.region, &locality.zone, &locality.subzone],
            ["region-1", "zone-a", "rack-1"]
        );
        assert_eq!(first.health, model::Health::Draining);
        assert_eq!(first.protocol, model::Protocol::Http1);
        assert_eq!(first.identity, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(first.name, "web-1");
        // Defaults for what is not set; the service's protocol for each endpoint.
        let second = endpoint("10.0.0.2:80");
        assert_eq!(second.weight, 1);
        assert_eq!(second.health, model::Health::Healthy);
        assert_eq!(second.protocol, model::Protocol::Http2);
        assert_eq!(endpoint("10.0.0.3:80").health, model::Health::Unhealthy);
        assert_eq!(endpoint("10.0.0.4:80").health, model::Health::Healthy);
        assert_eq!(endpoint("10.0.0.5:80").protocol, model::Protocol::Opaque);

        let empty = &content.services[&model::ServiceKey::new("default", "empty", 80)];
        assert!(empty.endpoints.is_empty());
        assert!(empty.policy.count_callers);

        let node = &content.nodes["node-a"];
        assert_eq!(
            [&node.region, &node.zone, &node.subzone],
            ["region-1", "zone-a", "rack-1"]
        );
        assert!(parse(&Services::new().yaml()).unwrap().services.is_empty());
    }
}
