//! Command-line arguments and the process's main loop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tandem_common::logging::LogFormat;
use tandem_common::process_metrics::ProcessCollector;
use tandem_common::{Admin, Readiness, Shutdown, announce};

use crate::identity::{self, IdentitySettings};
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

/// `--webhook-listen`, `--identity-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenArg {
    Off,
    Addr(SocketAddr),
}

impl FromStr for ListenArg {
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
    pub webhook_listen: Option<ListenArg>,
    /// The control plane's own namespace: where the webhook's Secret
    /// (tandem-webhook-tls) and Service, the identity issuer's Secret
    /// (tandem-identity-issuer) and the trust roots (ConfigMap tandem-trust-roots) are.
    #[arg(
        long,
        visible_alias = "namespace",
        env = "POD_NAMESPACE",
        default_value = "tandem-system"
    )]
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
    /// The identity endpoint that signs proxies' certificates (gRPC over TLS), with
    /// --source kubernetes only: ADDRESS:PORT, or `off`. Default 0.0.0.0:8087; if that
    /// default address is taken, the control plane runs without it and says so.
    #[arg(long, env = "TANDEM_IDENTITY_LISTEN")]
    pub identity_listen: Option<ListenArg>,
    /// The name on the identity endpoint's certificate that proxies verify
    /// [default: tandem-identity.<namespace>.svc, and its .svc.<cluster-domain> and
    /// <namespace> forms].
    #[arg(long)]
    pub identity_server_name: Option<String>,
    /// More names or IP addresses for the identity endpoint's certificate (repeatable).
    #[arg(long = "identity-cert-san")]
    pub identity_cert_sans: Vec<String>,
    /// How long workload certificates are valid (proxies renew them before).
    #[arg(long, default_value = "24h", value_parser = tandem_common::duration::parse)]
    pub identity_lifetime: std::time::Duration,
    /// How often the issuer Secret and the trust roots ConfigMap are read again: an
    /// issuer change or a root rotation takes effect within it, without a restart.
    #[arg(long, default_value = "10s", value_parser = tandem_common::duration::parse)]
    pub identity_refresh: std::time::Duration,
    #[command(flatten)]
    pub inject: InjectArgs,
}

impl Args {
    /// The identity flags, checked.
    fn identity_settings(&self) -> Result<IdentitySettings, Error> {
        let lifetime = self.identity_lifetime;
        if lifetime < std::time::Duration::from_secs(10)
            || lifetime > std::time::Duration::from_secs(366 * 86_400)
        {
            return Err(Error::Config(format!(
                "--identity-lifetime {lifetime:?}: use 10s to 366 days (such as 24h)"
            )));
        }
        if self.identity_refresh < std::time::Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "--identity-refresh {:?}: at least 100ms",
                self.identity_refresh
            )));
        }
        let names = identity::server_names(
            self.identity_server_name.as_deref(),
            &self.webhook_namespace,
            &self.cluster_domain,
            &self.identity_cert_sans,
        );
        for name in &names {
            rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
                Error::Config(format!(
                    "--identity-server-name/--identity-cert-san {name:?}: not a DNS name or an IP address"
                ))
            })?;
        }
        Ok(IdentitySettings {
            namespace: self.webhook_namespace.clone(),
            trust_domain: self.inject.trust_domain.clone(),
            lifetime,
            refresh: self.identity_refresh,
            server_names: names,
        })
    }
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
    let identity_settings = args.identity_settings()?;
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
            let source = KubernetesSource::new(
                client,
                args.inject.trust_domain.clone(),
                index.clone(),
                metrics.clone(),
                readiness.clone(),
            );
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
    let (webhook_addr, identity_addr) = match &kube_client {
        Some(client) => {
            let (identity, identity_addr) = start_identity(
                &args,
                identity_settings,
                client.clone(),
                metrics.clone(),
                shutdown.clone(),
            )
            .await?;
            let webhook_addr = start_injection(
                &args,
                client.clone(),
                inject_config,
                metrics.clone(),
                identity.map(|i| i.copies),
            )
            .await?;
            (webhook_addr, identity_addr)
        }
        None => {
            if let Some(ListenArg::Addr(addr)) = args.webhook_listen {
                tracing::warn!(%addr, "--webhook-listen needs --source kubernetes: no webhook");
            }
            if let Some(ListenArg::Addr(addr)) = args.identity_listen {
                tracing::warn!(%addr, "--identity-listen needs --source kubernetes: no identity endpoint");
            }
            (None, None)
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
    listening.extend(identity_addr.map(|addr| ("identity", addr)));
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

/// Binds `--NAME-listen`: its address, else `default`, or nothing when `off`. The
/// default address taken is not an error (another control plane on this host, such
/// as in tests): the endpoint is left out, and the log says so.
async fn bind_optional(
    what: &'static str,
    flag: &str,
    listen: Option<ListenArg>,
    default: &str,
) -> Result<Option<tokio::net::TcpListener>, Error> {
    match listen {
        Some(ListenArg::Off) => Ok(None),
        Some(ListenArg::Addr(addr)) => Ok(Some(tandem_common::listen::bind(what, addr).await?)),
        None => {
            let addr = default.parse().expect("a socket address");
            match tandem_common::listen::bind(what, addr).await {
                Ok(listener) => Ok(Some(listener)),
                Err(e) => {
                    tracing::warn!(
                        "{e}: running without it ({flag} ADDRESS or off says where, or that it is meant)"
                    );
                    Ok(None)
                }
            }
        }
    }
}

/// With --source kubernetes, unless --identity-listen is off: the issuer and trust
/// roots kept, their copies, and the identity endpoint. Where it listens.
async fn start_identity(
    args: &Args,
    settings: IdentitySettings,
    client: kube::Client,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Result<(Option<identity::Identity>, Option<SocketAddr>), Error> {
    let Some(listener) = bind_optional(
        "identity (--identity-listen)",
        "--identity-listen",
        args.identity_listen,
        identity::DEFAULT_LISTEN,
    )
    .await?
    else {
        return Ok((None, None));
    };
    let addr = listener.local_addr().ok();
    let identity = identity::start(client, settings, listener, metrics, shutdown);
    Ok((Some(identity), addr))
}

/// With --source kubernetes: the count of unmeshed pods, and the webhook (its
/// listener, its certificate and caBundle) unless it is off. Where it listens.
async fn start_injection(
    args: &Args,
    client: kube::Client,
    config: Arc<injection::InjectConfig>,
    metrics: Arc<Metrics>,
    copies: Option<Arc<identity::Copies>>,
) -> Result<Option<SocketAddr>, Error> {
    tokio::spawn(injection::unmeshed::run(
        client.clone(),
        config.clone(),
        metrics.clone(),
        args.unmeshed_pods_interval,
    ));
    let Some(listener) = bind_optional(
        "webhook (--webhook-listen)",
        "--webhook-listen",
        args.webhook_listen,
        DEFAULT_WEBHOOK_LISTEN,
    )
    .await?
    else {
        return Ok(None);
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
        Arc::new(injection::webhook::ApiNamespaces { client, copies }),
        metrics,
    ));
    Ok(addr)
}
