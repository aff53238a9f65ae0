//! Discovery benchmarks (not tests), against real control-plane processes:
//!
//! - fan-out: N simulated proxies (gRPC clients, each on its own connection, in this
//!   process) subscribe to a service of M endpoints in 3 zones; one endpoint changes;
//!   how long until every proxy has the delta. Also the control plane's RSS, and its
//!   growth per subscriber.
//! - scale: a Kubernetes service of 10,000 endpoints in 100 EndpointSlices (and one of
//!   1,000 in 10, for comparison): how long a new proxy waits for its first snapshot,
//!   and how long a one-endpoint change of one slice takes to reach it.
//!
//! Run with `bench/discovery.sh`, which builds in release mode and passes the paths.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
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

fn slice(i: usize, port: u16, ready_first: bool) -> serde_json::Value {
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
        "metadata": {"name": format!("web-{i}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}]
    })
}

/// PATCHes (JSON merge) one slice through the emulator's API.
async fn patch_slice(api: SocketAddr, body: &serde_json::Value, name: &str) -> anyhow::Result<()> {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(api).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = http::Request::patch(format!(
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/{name}"
    ))
    .header(http::header::HOST, api.to_string())
    .header(http::header::CONTENT_TYPE, "application/merge-patch+json")
    .body(Full::new(bytes::Bytes::from(serde_json::to_vec(body)?)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let text = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("PATCH {name}: {status} {}", String::from_utf8_lossy(&text));
    }
    Ok(())
}

async fn scale(tandem: &Path, python: &Path, emulator: &Path, slices: usize) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "tandem-bench-scale-{}-{slices}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let mut objects = vec![json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    })];
    for (n, zone) in ZONES.iter().enumerate() {
        objects.push(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": format!("node-{n}"),
            "labels": {"topology.kubernetes.io/zone": zone, "topology.kubernetes.io/region": "region-1"}}}));
    }
    objects.extend((0..slices).map(|i| slice(i, 8080, true)));
    let preload = dir.join("state.json");
    std::fs::write(&preload, serde_json::to_vec(&objects)?)?;
    let kubeconfig = dir.join("kubeconfig");
    let quiet = Options {
        envs: vec![("RUST_LOG", "warn")],
        capture_stderr: false,
    };
    let args = [
        emulator.display().to_string(),
        "--port".into(),
        "0".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--preload".into(),
        preload.display().to_string(),
        "--log-level".into(),
        "WARNING".into(),
    ];
    let api: Spawned =
        spawn_with("emulator", python, &args, &quiet, Duration::from_secs(120)).await?;
    let kc = kubeconfig.display().to_string();
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
            destination: "web.default:80".into(),
            proxy: None,
        })
        .await?
        .into_inner();
    let count = first_view(&mut stream).await?;
    let first_snapshot = t0.elapsed();

    // One endpoint of one slice goes unready and back, a few times.
    let mut delays = Vec::new();
    let api_addr = api.addr("api");
    for round in 0..10 {
        let patched = slice(7, 8080, round % 2 == 1);
        let body = json!({"endpoints": patched["endpoints"]});
        let t = Instant::now();
        patch_slice(api_addr, &body, "web-7").await?;
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
    let endpoints = slices * 100;
    println!(
        "## Scale: {endpoints} endpoints in {slices} EndpointSlices (Kubernetes source, kmock emulator)"
    );
    println!();
    println!("| measure | value |");
    println!("| --- | ---: |");
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
    drop(api);
    let _ = std::fs::remove_dir_all(&dir);
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
    let [_, tandem, python, emulator] = args.as_slice() else {
        bail!("usage: discovery_bench TANDEM_BINARY PYTHON EMULATOR_PY (run bench/discovery.sh)");
    };
    let (tandem, python, emulator) = (
        PathBuf::from(tandem),
        PathBuf::from(python),
        PathBuf::from(emulator),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let _keep = Arc::new(());
        let subscribers = env_or("SUBSCRIBERS", 1000);
        fanout(&tandem, subscribers, env_or("ENDPOINTS", 1000), 10).await?;
        if std::env::var("FANOUT_ONLY").is_err() {
            scale(&tandem, &python, &emulator, 10).await?;
            scale(&tandem, &python, &emulator, 100).await?;
        }
        Ok(())
    })
}
