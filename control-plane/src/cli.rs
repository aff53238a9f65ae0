//! Command-line arguments and the process's main loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tandem_common::logging::LogFormat;
use tandem_common::process_metrics::ProcessCollector;
use tandem_common::{Admin, Readiness, Shutdown, announce};

use crate::index::ServiceIndex;
use crate::metrics::Metrics;
use crate::server::DiscoveryService;
use crate::source::file::{FileError, FileSource};
use crate::source::kubernetes::KubernetesSource;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceArg {
    /// `file:PATH`: a watched YAML file.
    File(PathBuf),
    /// `kubernetes`: watch the cluster's API server.
    Kubernetes,
}

impl FromStr for SourceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
            None if s == "kubernetes" => Ok(Self::Kubernetes),
            _ => Err(format!("unknown source {s:?}: use file:PATH or kubernetes")),
        }
    }
}

/// tandem-control-plane: serves backend sets to Tandem proxies over gRPC.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tandem-control-plane", version)]
pub struct Args {
    /// Where backend sets come from: `file:PATH` (a YAML file, watched for edits) or
    /// `kubernetes` (the API server: --kubeconfig, else KUBECONFIG, else in-cluster).
    #[arg(long, env = "TANDEM_SOURCE")]
    pub source: SourceArg,
    /// With --source kubernetes: the kubeconfig to use.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Address of the gRPC discovery server.
    #[arg(long, default_value = "0.0.0.0:8086", env = "TANDEM_LISTEN")]
    pub listen: SocketAddr,
    /// Address of the admin server (/live, /ready, /metrics).
    #[arg(long, default_value = "0.0.0.0:9990", env = "TANDEM_ADMIN")]
    pub admin: SocketAddr,
    /// The cluster's DNS domain, for names like web.default.svc.cluster.local.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Log format on stderr: plain or json.
    #[arg(long, default_value = "plain", env = "TANDEM_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// After a shutdown signal, how long in-flight calls may finish.
    #[arg(long, default_value = "5s", value_parser = tandem_common::duration::parse)]
    pub shutdown_grace: std::time::Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bind(#[from] tandem_common::listen::BindError),
    #[error("the source file is not usable: {0}")]
    File(#[from] FileError),
    #[error(transparent)]
    Kubernetes(#[from] crate::source::kubernetes::KubernetesError),
    #[error("the discovery server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Runs the control plane until SIGTERM/SIGINT or `POST /shutdown`.
pub async fn run(args: Args) -> Result<(), Error> {
    tandem_common::logging::init(args.log_format);
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();

    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(ProcessCollector));

    let index = Arc::new(ServiceIndex::new(
        args.cluster_domain.clone(),
        metrics.clone(),
    ));
    let readiness = Arc::new(Readiness::not_ready("reading the source"));
    match &args.source {
        SourceArg::File(path) => {
            let source = FileSource::start(path.clone(), index.clone(), metrics.clone())?;
            tokio::spawn(source.watch());
            readiness.set_ready();
        }
        SourceArg::Kubernetes => {
            let client = crate::source::kubernetes::client(args.kubeconfig.as_deref()).await?;
            readiness.set_not_ready("waiting for the first sync with the API server");
            let source =
                KubernetesSource::new(client, index.clone(), metrics.clone(), readiness.clone());
            tokio::spawn(source.run());
            let (index, readiness) = (index.clone(), readiness.clone());
            tokio::spawn(async move {
                while !index
                    .wait_synced(std::time::Duration::from_secs(3600))
                    .await
                {}
                readiness.set_ready();
            });
        }
    }

    // Callers' shares follow the proxies that watch each service, recounted each second.
    let callers = index.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            callers.refresh_callers(std::time::Instant::now());
        }
    });

    let grpc_listener = tandem_common::listen::bind("discovery (--listen)", args.listen).await?;
    let admin_listener = tandem_common::listen::bind("admin (--admin)", args.admin).await?;
    let grpc_addr = grpc_listener.local_addr().unwrap_or(args.listen);
    let admin_addr = admin_listener.local_addr().unwrap_or(args.admin);

    let admin = Arc::new(Admin {
        registry,
        readiness,
        routes: None,
        shutdown: shutdown.clone(),
    });
    tokio::spawn(admin.serve(admin_listener));

    tracing::info!(discovery = %grpc_addr, admin = %admin_addr, services = index.service_count(), "control plane ready");
    announce::listening(&[("discovery", grpc_addr), ("admin", admin_addr)]);

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener);
    let wait = shutdown.clone();
    let serve = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Notice proxies that vanished without closing their connection.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(DiscoveryService::new(index, metrics, shutdown.clone()).into_server())
        .serve_with_incoming_shutdown(incoming, async move { wait.wait().await });
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result?,
        _ = async {
            shutdown.wait().await;
            tokio::time::sleep(args.shutdown_grace).await;
        } => tracing::warn!(grace = ?args.shutdown_grace, "calls still open after the grace period; stopping anyway"),
    }
    tracing::info!("control plane stopped");
    Ok(())
}
