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
use crate::injection::{self, InjectArgs, tls::TlsSettings};
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

/// `--webhook-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookListen {
    Off,
    Addr(SocketAddr),
}

impl FromStr for WebhookListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "off" {
            return Ok(Self::Off);
        }
        s.parse()
            .map(Self::Addr)
            .map_err(|_| format!("{s:?}: use ADDRESS:PORT or off"))
    }
}

/// Where the webhook listens unless `--webhook-listen` says.
pub const DEFAULT_WEBHOOK_LISTEN: &str = "0.0.0.0:9443";

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
    /// The sidecar injection webhook (AdmissionReview v1 over HTTPS at /mutate), with
    /// --source kubernetes only: ADDRESS:PORT, or `off`. Default 0.0.0.0:9443; if that
    /// default address is taken, the control plane runs without the webhook and says so.
    #[arg(long, env = "TANDEM_WEBHOOK_LISTEN")]
    pub webhook_listen: Option<WebhookListen>,
    /// The namespace of the webhook's Secret (tandem-webhook-tls) and Service.
    #[arg(long, env = "POD_NAMESPACE", default_value = "tandem-system")]
    pub webhook_namespace: String,
    /// The webhook's Service: its certificate is for SERVICE.NAMESPACE.svc.
    #[arg(long, default_value = "tandem-webhook")]
    pub webhook_service: String,
    /// More names or IP addresses for the webhook's certificate (repeatable).
    #[arg(long = "webhook-cert-san")]
    pub webhook_cert_sans: Vec<String>,
    /// The MutatingWebhookConfiguration whose caBundle the control plane keeps.
    #[arg(long, default_value = "tandem-injector")]
    pub webhook_config_name: String,
    /// How often pods in injection-enabled namespaces are counted for
    /// tandem_control_plane_unmeshed_pods (with --source kubernetes).
    #[arg(long, default_value = "30s", value_parser = tandem_common::duration::parse)]
    pub unmeshed_pods_interval: std::time::Duration,
    #[command(flatten)]
    pub inject: InjectArgs,
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
    #[error("{0}")]
    Config(String),
}

/// Runs the control plane until SIGTERM/SIGINT or `POST /shutdown`.
pub async fn run(args: Args) -> Result<(), Error> {
    tandem_common::logging::init(args.log_format);
    let inject_config = Arc::new(args.inject.validate().map_err(Error::Config)?);
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
    let mut kube_client = None;
    match &args.source {
        SourceArg::File(path) => {
            let source = FileSource::start(path.clone(), index.clone(), metrics.clone())?;
            tokio::spawn(source.watch());
            readiness.set_ready();
        }
        SourceArg::Kubernetes => {
            let client = crate::source::kubernetes::client(args.kubeconfig.as_deref()).await?;
            kube_client = Some(client.clone());
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
    let webhook_addr = match &kube_client {
        Some(client) => {
            start_injection(&args, client.clone(), inject_config, metrics.clone()).await?
        }
        None => {
            if let Some(WebhookListen::Addr(addr)) = args.webhook_listen {
                tracing::warn!(%addr, "--webhook-listen needs --source kubernetes: no webhook");
            }
            None
        }
    };

    let admin = Arc::new(Admin {
        registry,
        readiness,
        routes: None,
        shutdown: shutdown.clone(),
    });
    tokio::spawn(admin.serve(admin_listener));

    tracing::info!(discovery = %grpc_addr, admin = %admin_addr, services = index.service_count(), "control plane ready");
    let mut listening = vec![("discovery", grpc_addr), ("admin", admin_addr)];
    listening.extend(webhook_addr.map(|addr| ("webhook", addr)));
    announce::listening(&listening);

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

/// With --source kubernetes: the count of unmeshed pods, and the webhook (its
/// listener, its certificate and caBundle) unless it is off. Where it listens.
async fn start_injection(
    args: &Args,
    client: kube::Client,
    config: Arc<injection::InjectConfig>,
    metrics: Arc<Metrics>,
) -> Result<Option<SocketAddr>, Error> {
    tokio::spawn(injection::unmeshed::run(
        client.clone(),
        config.clone(),
        metrics.clone(),
        args.unmeshed_pods_interval,
    ));
    let listener = match args.webhook_listen {
        Some(WebhookListen::Off) => return Ok(None),
        Some(WebhookListen::Addr(addr)) => {
            tandem_common::listen::bind("webhook (--webhook-listen)", addr).await?
        }
        None => {
            let addr = DEFAULT_WEBHOOK_LISTEN.parse().expect("a socket address");
            match tandem_common::listen::bind("webhook (--webhook-listen)", addr).await {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(
                        "{e}: running without the injection webhook (--webhook-listen ADDRESS or off says where, or that it is meant)"
                    );
                    return Ok(None);
                }
            }
        }
    };
    let addr = listener.local_addr().ok();
    let certs = Arc::new(injection::tls::CertStore::default());
    let settings = TlsSettings {
        namespace: args.webhook_namespace.clone(),
        service: args.webhook_service.clone(),
        extra_names: args.webhook_cert_sans.clone(),
        config_name: args.webhook_config_name.clone(),
    };
    tokio::spawn(injection::tls::maintain(
        client.clone(),
        settings,
        certs.clone(),
    ));
    tokio::spawn(injection::webhook::serve(
        listener,
        certs,
        config,
        Arc::new(injection::webhook::ApiNamespaces(client)),
        metrics,
    ));
    Ok(addr)
}
