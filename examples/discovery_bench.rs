//! Discovery benchmarks (not tests), against real control-plane processes:
//!
//! - fan-out: N simulated proxies (gRPC clients, each on its own connection, in this
//!   process) subscribe to a service of M endpoints in 3 zones; one endpoint changes;
//!   how long until every proxy has the delta. Also the control plane's RSS, and its
//!   growth per subscriber.
//! - scale: a Kubernetes service of 10,000 endpoints in 100 EndpointSlices (and one of
//!   1,000 in 10, for comparison), on a real API server (a cluster control plane of
//!   the benchmark's own, `scripts/cluster.sh up`): how long the control plane takes
//!   from its start to its first full sync, how long a new proxy waits for its first
//!   snapshot, and how long a one-endpoint change of one slice (an API write) takes
//!   to reach it.
//!
//! Run with `bench/discovery.sh`, which builds in release mode and passes the paths.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tandem::process::{Options, Spawned, spawn_with};
use tandem_proto::discovery::v1 as pb;
use tandem_proxy::discovery::ViewBuilder;
use tokio::sync::mpsc;

const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn client(
    addr: SocketAddr,
) -> anyhow::Result<pb::discovery_client::DiscoveryClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    Ok(pb::discovery_client::DiscoveryClient::new(channel).max_decoding_message_size(256 << 20))
}

/// Reads a (possibly chunked) snapshot; returns how many endpoints it has.
async fn first_view(stream: &mut tonic::Streaming<pb::Update>) -> anyhow::Result<usize> {
    let mut builder = ViewBuilder::default();
    loop {
        let update = stream.message().await?.context("no snapshot")?;
        if let Some(view) = builder.apply(&update).map_err(anyhow::Error::msg)? {
            return Ok(view.endpoints.len());
        }
    }
}

/// Subscribes and reports (subscriber, version, when) for every update after the snapshot.
async fn subscribe(
    addr: SocketAddr,
    id: usize,
    ready: mpsc::Sender<()>,
    updates: mpsc::UnboundedSender<(usize, u64, Instant)>,
) -> anyhow::Result<()> {
    let mut client = client(addr).await?;
    let mut stream = client
        .watch(pb::WatchRequest {
            destination: "web.default:80".into(),
            proxy: None,
        })
        .await?
        .into_inner();
    // Assemble the (chunked) snapshot; afterwards only note when each update arrives:
    // simulated proxies on this machine's 2 cores must not slow the control plane.
    let mut builder = ViewBuilder::default();
    loop {
        let update = stream.message().await?.context("no snapshot")?;
        if builder
            .apply(&update)
            .map_err(anyhow::Error::msg)?
            .is_some()
        {
            break;
        }
    }
    ready.send(()).await.unwrap_or_default();
    while let Some(update) = stream.message().await? {
        updates
            .send((id, update.version, Instant::now()))
            .unwrap_or_default();
    }
    Ok(())
}

fn services_yaml(endpoints: usize, weight_of_first: u32) -> String {
    let mut yaml = String::from(
        "services:\n  - name: web\n    namespace: default\n    port: 80\n    endpoints:\n",
    );
    for i in 0..endpoints {
        let zone = ZONES[i % 3];
        let weight = if i == 0 { weight_of_first } else { 1 };
        yaml.push_str(&format!(
            "      - {{address: \"10.{}.{}.{}:8080\", weight: {weight}, region: region-1, zone: {zone}}}\n",
            i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    yaml
}

async fn fanout(
    tandem: &Path,
    subscribers: usize,
    endpoints: usize,
    changes: usize,
) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tandem-bench-fanout-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("services.yaml");
    std::fs::write(&file, services_yaml(endpoints, 1))?;
    let source = format!("file:{}", file.display());
    let options = Options {
        envs: vec![("RUST_LOG", "warn")],
        capture_stderr: false,
    };
    let cp = spawn_with(
        "control-plane",
        tandem,
        [
            "control-plane",
            "--source",
            &source,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &options,
        Duration::from_secs(30),
    )
    .await?;
    let addr = cp.addr("discovery");
    let rss_before = rss_kib(cp.pid());

    let (ready_tx, mut ready_rx) = mpsc::channel(subscribers);
    let (updates_tx, mut updates_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    for id in 0..subscribers {
        let (ready, updates) = (ready_tx.clone(), updates_tx.clone());
        tokio::spawn(async move {
            // Errors after the benchmark ended (the control plane stopped) are expected.
            if let Err(e) = subscribe(addr, id, ready, updates).await
                && !DONE.load(std::sync::atomic::Ordering::Relaxed)
            {
                eprintln!("subscriber {id}: {e:#}");
            }
        });
        if BATCH.is_some_and(|b| id % b == b - 1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for _ in 0..subscribers {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .context("subscribers did not all get their snapshot within 60 s")?;
    }
    let subscribed_in = started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(cp.pid());

    let mut latencies = Vec::with_capacity(subscribers * changes);
    let mut slowest_per_change = Vec::with_capacity(changes);
    for change in 0..changes {
        let tmp = dir.join("services.yaml.tmp");
        std::fs::write(&tmp, services_yaml(endpoints, 2 + change as u32))?;
        let t0 = Instant::now();
        std::fs::rename(&tmp, &file)?;
        let mut got: BTreeMap<usize, Instant> = BTreeMap::new();
        while got.len() < subscribers {
            let (id, _, at) = tokio::time::timeout(Duration::from_secs(30), updates_rx.recv())
                .await
                .context("not every subscriber got the delta within 30 s")?
                .context("updates closed")?;
            got.entry(id).or_insert(at);
        }
        let mut these: Vec<Duration> = got
            .values()
            .map(|at| at.saturating_duration_since(t0))
            .collect();
        these.sort();
        slowest_per_change.push(*these.last().unwrap());
        latencies.extend(these);
        // Let the file watcher settle between changes.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort();
    slowest_per_change.sort();
    println!(
        "## Fan-out: {subscribers} subscribers, {endpoints} endpoints in 3 zones, {changes} changes of one endpoint"
    );
    println!();
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!(
        "| all {subscribers} snapshots received in | {} |",
        ms(subscribed_in)
    );
    println!(
        "| file edit → delta at a subscriber, p50 | {} |",
        ms(percentile(&latencies, 50.0))
    );
    println!(
        "| file edit → delta at a subscriber, p99 | {} |",
        ms(percentile(&latencies, 99.0))
    );
    println!(
        "| file edit → delta at the last subscriber (worst of {changes}) | {} |",
        ms(*slowest_per_change.last().unwrap())
    );
    println!(
        "| control plane RSS with 0 subscribers | {:.1} MiB |",
        rss_before as f64 / 1024.0
    );
    println!(
        "| control plane RSS with {subscribers} subscribers | {:.1} MiB |",
        rss_after as f64 / 1024.0
    );
    println!(
        "| RSS per subscriber | {:.1} KiB |",
        rss_after.saturating_sub(rss_before) as f64 / subscribers as f64
    );
    println!();
    DONE.store(true, std::sync::atomic::Ordering::Relaxed);
    stop(cp).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Subscribers arrive in batches of this size, 20 ms apart (None: all at once).
static BATCH: Option<usize> = None;

/// A cluster control plane of the benchmark's own (`scripts/cluster.sh up`): etcd,
/// kube-apiserver and kube-controller-manager on loopback, in a temporary directory.
/// Taken down when dropped; if this process dies first, the watcher `up` started for
/// its pid does it.
struct Cluster {
    client: kube::Client,
    down: Down,
}

impl Cluster {
    async fn up(script: &Path) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("tandem-bench-cluster-{}", std::process::id()));
        let t = Instant::now();
        let status = tokio::process::Command::new(script)
            .args(["up", "--dir", &dir.display().to_string()])
            .args(["--watch-pid", &std::process::id().to_string()])
            .stdin(std::process::Stdio::null())
            // Keep stdout for the markdown: its progress goes to stderr.
            .stdout(std::io::stderr())
            .status()
            .await
            .with_context(|| format!("cannot run {}", script.display()))?;
        // From here on, dropping `down` takes down whatever `up` left running.
        let down = Down {
            script: script.to_path_buf(),
            dir,
        };
        if !status.success() {
            bail!("{} up failed ({status})", script.display());
        }
        eprintln!(
            "discovery_bench: cluster up in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let client =
            tandem_control_plane::source::kubernetes::client(Some(&down.kubeconfig())).await?;
        Ok(Self { client, down })
    }
}

/// `scripts/cluster.sh down --dir DIR`, then removes DIR.
struct Down {
    script: PathBuf,
    dir: PathBuf,
}

impl Down {
    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }
}

impl Drop for Down {
    fn drop(&mut self) {
        let _ = std::process::Command::new(&self.script)
            .args(["down", "--dir", &self.dir.display().to_string()])
            .stdin(std::process::Stdio::null())
            .stdout(std::io::stderr())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Who manages the benchmark's slices: not the EndpointSlice controller (which leaves
/// slices with another `managed-by` alone).
const MANAGED_BY: &str = "discovery-bench.tandem.io";

fn slice(namespace: &str, i: usize, ready_first: bool) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = (0..100)
        .map(|j| {
            json!({
                "addresses": [format!("10.{}.{}.{}", i / 200, i % 200, j + 1)],
                "conditions": {"ready": j != 0 || ready_first, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", j % 3),
                "zone": ZONES[j % 3],
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("web-{i}"), "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": "web",
                                "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// The three Nodes the endpoints name, with their zone and region (once per cluster).
async fn create_nodes(client: &kube::Client) -> anyhow::Result<()> {
    let nodes: kube::Api<Node> = kube::Api::all(client.clone());
    for (n, zone) in ZONES.iter().enumerate() {
        let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}"),
            "labels": {"topology.kubernetes.io/zone": zone, "topology.kubernetes.io/region": "region-1"}}});
        nodes
            .create(&PostParams::default(), &serde_json::from_value(node)?)
            .await
            .context("creating a Node")?;
    }
    Ok(())
}

/// Creates the namespace, the Service `web` (no selector: no controller writes its
/// slices) and its `slices` EndpointSlices of 100 endpoints, `PARALLEL` requests at a
/// time; returns how long the slices took. Waits until a list served from the API
/// server's cache (what the control plane's first list gets) has them all.
async fn create_service(
    client: &kube::Client,
    namespace: &str,
    slices: usize,
) -> anyhow::Result<Duration> {
    const PARALLEL: usize = 16;
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}});
    namespaces
        .create(&PostParams::default(), &serde_json::from_value(ns)?)
        .await
        .context("creating the namespace")?;
    let services: kube::Api<Service> = kube::Api::namespaced(client.clone(), namespace);
    let service = json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": namespace},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    });
    services
        .create(&PostParams::default(), &serde_json::from_value(service)?)
        .await
        .context("creating the Service")?;
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(client.clone(), namespace);
    let objects = (0..slices)
        .map(|i| serde_json::from_value::<EndpointSlice>(slice(namespace, i, true)))
        .collect::<Result<Vec<_>, _>>()?;
    let t = Instant::now();
    futures_util::stream::iter(objects)
        .map(|object| {
            let api = api.clone();
            async move { api.create(&PostParams::default(), &object).await }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await
        .context("creating the EndpointSlices")?;
    let created_in = t.elapsed();
    let cached = ListParams::default().match_any();
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.list_metadata(&cached).await?.items.len() < slices {
        if Instant::now() > deadline {
            bail!("the API server's cache did not show all {slices} slices within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(created_in)
}

/// Deletes the namespace and waits until it is gone, so that the next run's control
/// plane does not find its objects.
async fn delete_namespace(client: &kube::Client, namespace: &str) -> anyhow::Result<()> {
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    namespaces
        .delete(namespace, &DeleteParams::default())
        .await
        .context("deleting the namespace")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while namespaces.get_opt(namespace).await?.is_some() {
        if Instant::now() > deadline {
            bail!("namespace {namespace} still there after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn scale(tandem: &Path, cluster: &Cluster, slices: usize) -> anyhow::Result<()> {
    let namespace = format!("discovery-{slices}");
    let created_in = create_service(&cluster.client, &namespace, slices).await?;
    let kc = cluster.down.kubeconfig().display().to_string();
    let quiet = Options {
        envs: vec![("RUST_LOG", "warn")],
        capture_stderr: false,
    };
    let started = Instant::now();
    let cp = spawn_with(
        "control-plane",
        tandem,
        [
            "control-plane",
            "--source",
            "kubernetes",
            "--kubeconfig",
            &kc,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &quiet,
        Duration::from_secs(30),
    )
    .await?;
    tandem::client::wait_ready(cp.addr("admin"), Duration::from_secs(120)).await?;
    let synced_in = started.elapsed();
    let rss = rss_kib(cp.pid());

    let t0 = Instant::now();
    let mut client = client(cp.addr("discovery")).await?;
    let mut stream = client
        .watch(pb::WatchRequest {
            destination: format!("web.{namespace}:80"),
            proxy: None,
        })
        .await?
        .into_inner();
    let count = first_view(&mut stream).await?;
    let first_snapshot = t0.elapsed();
    let endpoints = slices * 100;
    if count != endpoints {
        bail!("the first snapshot has {count} endpoints, not {endpoints}");
    }

    // One endpoint of one slice goes unready and back, a few times.
    let mut delays = Vec::new();
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(cluster.client.clone(), &namespace);
    for round in 0..10 {
        let patched = slice(&namespace, 7, round % 2 == 1);
        let body = json!({"endpoints": patched["endpoints"]});
        let t = Instant::now();
        api.patch("web-7", &PatchParams::default(), &Patch::Merge(&body))
            .await
            .context("patching web-7")?;
        let update = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .context("no delta within 10 s")??
            .context("stream ended")?;
        delays.push(t.elapsed());
        if !matches!(update.change, Some(pb::update::Change::Delta(ref d)) if d.changed.len() == 1)
        {
            bail!(
                "expected a one-endpoint delta, got {:?}",
                update.change.map(|_| "something else")
            );
        }
    }
    delays.sort();
    println!(
        "## Scale: {endpoints} endpoints in {slices} EndpointSlices (Kubernetes source, real API server)"
    );
    println!();
    println!("| measure | value |");
    println!("| --- | ---: |");
    println!(
        "| {slices} EndpointSlices created through the API (16 requests at a time) | {} |",
        ms(created_in)
    );
    println!(
        "| control plane start → first full sync (ready) | {} |",
        ms(synced_in)
    );
    println!(
        "| new subscriber → first snapshot ({count} endpoints) | {} |",
        ms(first_snapshot)
    );
    println!(
        "| one endpoint of one slice changed (API write) → delta at the subscriber, p50 | {} |",
        ms(percentile(&delays, 50.0))
    );
    println!("| same, worst of 10 | {} |", ms(*delays.last().unwrap()));
    println!("| control plane RSS | {:.1} MiB |", rss as f64 / 1024.0);
    println!();
    stop(cp).await;
    delete_namespace(&cluster.client, &namespace).await?;
    Ok(())
}

/// Stops a Tandem server gracefully (`POST /shutdown`), killing it if it lingers.
async fn stop(mut server: Spawned) {
    if let Ok(mut conn) = tandem::client::Connection::http1(server.addr("admin")).await {
        let _ = conn
            .send("POST", "localhost", "/shutdown", bytes::Bytes::new())
            .await;
    }
    if tokio::time::timeout(Duration::from_secs(30), server.child.wait())
        .await
        .is_err()
    {
        server.kill().await;
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, tandem, cluster_sh] = args.as_slice() else {
        bail!("usage: discovery_bench TANDEM_BINARY CLUSTER_SH (run bench/discovery.sh)");
    };
    let (tandem, cluster_sh) = (PathBuf::from(tandem), PathBuf::from(cluster_sh));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let subscribers = env_or("SUBSCRIBERS", 1000);
        fanout(&tandem, subscribers, env_or("ENDPOINTS", 1000), 10).await?;
        if std::env::var("FANOUT_ONLY").is_err() {
            let cluster = Cluster::up(&cluster_sh).await?;
            create_nodes(&cluster.client).await?;
            scale(&tandem, &cluster, 10).await?;
            scale(&tandem, &cluster, 100).await?;
        }
        Ok(())
    })
}
