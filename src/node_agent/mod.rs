//! `tandem node-agent`: stands in for the kubelets and the scheduler of a test cluster
//! (a real API server and controller manager, no kubelet, no scheduler).
//!
//! It registers Nodes (`nodes`), binds pending pods to them spreading over zones
//! (`scheduler`), gives bound pods an address from the pod CIDR (`ipam`) and a status
//! a kubelet would write (`status`), with readiness a test can flip with the
//! `agent.tandem.io/ready` annotation, and finishes deleted pods after their grace
//! period (`pods`). Pods annotated `agent.tandem.io/run: "true"` run for real: a
//! network namespace on a host bridge (`netns`), volumes (`volumes`), and their
//! containers' command + args as processes (`runner`, `probes`).
//!
//! Announces `{"listening":{"admin":ADDR}}` on stdout once its nodes are registered
//! and its pod watch has synced. SIGTERM, SIGINT, `POST /shutdown` or the end of
//! `--watch-pid` stop it: every process it started is stopped (by pid), and the
//! namespaces, veths and the bridge are removed.

pub mod events;
pub mod ipam;
pub mod metrics;
pub mod mountpoints;
pub mod netns;
pub mod nodes;
pub mod pods;
pub mod probes;
pub mod runner;
pub mod scheduler;
pub mod status;
pub mod volumes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use prometheus_client::registry::Registry;
use tandem_common::logging::LogFormat;
use tandem_common::process_metrics::ProcessCollector;
use tandem_common::{Admin, Readiness, Shutdown, announce};
use tokio::sync::mpsc;

use self::events::Events;
use self::ipam::{Cidr, Ipam};
use self::metrics::Metrics;
use self::mountpoints::MountPoints;
use self::netns::Bridge;
use self::nodes::NodeList;
use self::pods::{Controller, Note};
use self::runner::RunnerEnv;

#[derive(Debug, Clone, clap::Args)]
pub struct NodeAgentArgs {
    /// The cluster's kubeconfig (the agent needs to bind pods, write pod and node
    /// status, delete pods, request tokens and record events).
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Where pods' logs and volumes go: <state-dir>/pods/<namespace>/<pod>/.
    #[arg(long)]
    pub state_dir: PathBuf,
    /// The nodes to stand in for: NAME=REGION/ZONE, comma-separated.
    #[arg(long, default_value = nodes::DEFAULT_NODES)]
    pub nodes: NodeList,
    /// Pod addresses; the first one is the bridge's (the pods' gateway and the
    /// nodes' InternalIP).
    #[arg(long, default_value = "10.244.0.0/16")]
    pub pod_cidr: Cidr,
    /// The host bridge for pods the agent runs (created at start, removed at exit;
    /// one per agent).
    #[arg(long, default_value = "tandem0")]
    pub bridge: String,
    /// Where to look for a container's command[0] before PATH.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Address of the admin server (/live, /ready, /metrics, POST /shutdown).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin: SocketAddr,
    /// Exit (cleaning up) once this process is gone.
    #[arg(long)]
    pub watch_pid: Option<u32>,
    /// The longest grace period a deleted pod gets.
    #[arg(long, default_value = "30s", value_parser = tandem_common::duration::parse)]
    pub max_grace: Duration,
    /// Log format on stderr: plain or json.
    #[arg(long, default_value = "plain")]
    pub log_format: LogFormat,
}

/// How long running pods get to stop when the agent itself stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Whether `pid` is a live process (not a zombie).
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "PID (comm) STATE ...": comm may hold spaces and parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

pub async fn run(args: NodeAgentArgs) -> anyhow::Result<()> {
    tandem_common::logging::init(args.log_format);
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    if let Some(pid) = args.watch_pid {
        anyhow::ensure!(alive(pid), "--watch-pid {pid}: no such process");
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if !alive(pid) {
                    tracing::info!(pid, "the watched process is gone: shutting down");
                    shutdown.trigger();
                    return;
                }
            }
        });
    }

    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("cannot create --state-dir {}", args.state_dir.display()))?;
    let state_dir = std::fs::canonicalize(&args.state_dir)?;
    let client = tandem_control_plane::source::kubernetes::client(Some(&args.kubeconfig)).await?;

    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(ProcessCollector));
    let readiness = Arc::new(Readiness::not_ready("registering nodes"));
    let admin_listener = tandem_common::listen::bind("admin (--admin)", args.admin).await?;
    let admin_addr = admin_listener.local_addr().unwrap_or(args.admin);
    let admin = Arc::new(Admin {
        registry,
        readiness: readiness.clone(),
        routes: None,
        shutdown: shutdown.clone(),
    });
    tokio::spawn(admin.serve(admin_listener));

    // The bridge: without it (no iproute2, no privileges) the agent still binds pods
    // and writes their status; pods it should run get a status saying why not.
    let bridge = match Bridge::new(&args.bridge, args.pod_cidr) {
        Ok(bridge) => match bridge.create().await {
            Ok(()) => {
                tracing::info!(bridge = %bridge.name, cidr = %args.pod_cidr, "pod bridge up");
                Ok(bridge)
            }
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    if let Err(why) = &bridge {
        tracing::warn!(%why, "no pod network: pods annotated agent.tandem.io/run cannot run");
    }

    let result = serve(
        &args,
        client,
        bridge.clone(),
        state_dir,
        metrics,
        &readiness,
        admin_addr,
        &shutdown,
    )
    .await;
    if let Ok(bridge) = &bridge {
        bridge.remove().await;
        tracing::info!(bridge = %bridge.name, "pod bridge removed");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    args: &NodeAgentArgs,
    client: kube::Client,
    bridge: Result<Bridge, String>,
    state_dir: PathBuf,
    metrics: Arc<Metrics>,
    readiness: &Readiness,
    admin_addr: SocketAddr,
    shutdown: &Shutdown,
) -> anyhow::Result<()> {
    // Nodes first: pods are bound only to registered nodes.
    let gateway = args.pod_cidr.gateway();
    let mut backoff =
        tandem_common::Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    for node in &args.nodes.0 {
        loop {
            let attempt = nodes::register(&client, node, gateway);
            let result = tokio::select! {
                r = attempt => r,
                _ = shutdown.wait() => return Ok(()),
            };
            match result {
                Ok(()) => break,
                Err(error) => {
                    let why = format!("cannot register node {}: {error}", node.name);
                    tracing::warn!("{why}; retrying");
                    readiness.set_not_ready(why);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.wait() => return Ok(()),
                    }
                }
            }
        }
    }
    let names: Vec<&str> = args.nodes.0.iter().map(|n| n.name.as_str()).collect();
    tracing::info!(nodes = ?names, "nodes registered");
    readiness.set_not_ready("waiting for the first list of pods");

    // Mount points an agent killed before it could clean up left behind.
    let mounts = MountPoints::default();
    mounts.collect_garbage();

    let (notes_tx, mut notes_rx) = mpsc::unbounded_channel::<Note>();
    let (reports_tx, mut reports_rx) = mpsc::unbounded_channel();
    let env = RunnerEnv {
        client: client.clone(),
        state_dir,
        bin_dir: args.bin_dir.clone(),
        bridge,
        mounts: mounts.clone(),
        events: Events::new(client.clone()),
        metrics: metrics.clone(),
    };
    let mut controller = Controller::new(
        client.clone(),
        args.nodes.0.clone(),
        Ipam::new(args.pod_cidr),
        args.max_grace,
        env,
        notes_tx,
        reports_tx,
    );
    let pods = watcher(Api::<Pod>::all(client), watcher::Config::default()).default_backoff();
    tokio::pin!(pods);
    let mut announced = false;
    let mut watch_error: Option<String> = None;
    loop {
        tokio::select! {
            event = pods.next() => match event {
                Some(Ok(event)) => {
                    watch_error = None;
                    controller.on_watch(event);
                }
                Some(Err(error)) => {
                    let error = error.to_string();
                    if watch_error.as_ref() != Some(&error) {
                        tracing::warn!(%error, "pod watch failed; retrying");
                        watch_error = Some(error);
                    }
                }
                None => anyhow::bail!("the pod watch ended"),
            },
            Some(note) = notes_rx.recv() => controller.on_note(note),
            Some(report) = reports_rx.recv() => controller.on_note(Note::Runner(report)),
            _ = shutdown.wait() => break,
        }
        if controller.synced && !announced {
            announced = true;
            readiness.set_ready();
            tracing::info!(admin = %admin_addr, "node agent ready");
            announce::listening(&[("admin", admin_addr)]);
        }
    }

    // Stop what runs, within the grace, then the network goes.
    let grace = SHUTDOWN_GRACE.min(args.max_grace);
    controller.begin_shutdown(grace);
    let give_up = tokio::time::Instant::now() + grace + Duration::from_secs(15);
    while controller.runners_left() > 0 {
        tokio::select! {
            Some(report) = reports_rx.recv() => controller.on_note(Note::Runner(report)),
            _ = tokio::time::sleep_until(give_up) => {
                tracing::warn!(left = controller.runners_left(), "pods still stopping; leaving anyway");
                break;
            }
        }
    }
    mounts.remove_registry_if_empty();
    tracing::info!("node agent stopped");
    Ok(())
}
