//! Command-line arguments and start-up: builds the runtime, the routing state, the
//! listeners and the discovery client, and runs until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tandem_balancer::{BalancerConfig, SlowStart};
use tandem_common::logging::LogFormat;
use tandem_common::process_metrics::ProcessCollector;
use tandem_common::{Admin, Readiness, Shutdown, announce};
use tandem_proto::discovery::v1 as pb;
use tokio::net::TcpListener;

use crate::connections::{Connections, Limits};
use crate::destination::Destinations;
use crate::discovery::{DiscoveryClient, ProxyLocality, control_plane_endpoint};
use crate::endpoint::{EndpointMeta, Locality, Protocol};
use crate::forward::{Forwarder, Resilience, Router};
use crate::identity::certify::{self, Certifier};
use crate::identity::{Identity, IdentityArgs, MeshTls, Roots};
use crate::inbound::InboundContext;
use crate::inspect::Inspector;
use crate::manager::{ManagerSettings, OutlierConfig};
use crate::metrics::ProxyMetrics;
use crate::scrape::{TrafficMetrics, Workload};
use crate::server::{Role, Server};
use crate::tls::{TlsError, server_config};
use crate::trace::Tracer;
use crate::upstream::UpstreamSettings;

/// How often idle destinations are looked for, and how long unused ones are kept.
const EVICT_EVERY: Duration = Duration::from_secs(30);
const DESTINATION_IDLE: Duration = Duration::from_secs(600);

fn duration(s: &str) -> Result<Duration, String> {
    tandem_common::duration::parse(s)
}

fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s {
        "auto" => Ok(Protocol::Unspecified),
        "http1" => Ok(Protocol::Http1),
        "http2" => Ok(Protocol::Http2),
        other => Err(format!(
            "unknown protocol {other:?}: use auto, http1 or http2"
        )),
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// tandem-proxy: balances HTTP/1.1, HTTP/2 and gRPC requests across backends; `init`
/// installs the interception rules (the init container's job).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tandem-proxy", version)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: Args,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Install the nat rules that send this pod's TCP through its proxy (IPv4 and IPv6;
    /// needs NET_ADMIN and NET_RAW: the init container's job).
    Init(crate::init::InitArgs),
}

/// Runs what `cli` asks for: the proxy until it stops, or `init`.
pub fn main(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Some(Command::Init(init)) => crate::init::run_init(&init).map_err(Error::Init),
        None => run_blocking(cli.args),
    }
}

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "tandem-proxy", version)]
#[command(group(clap::ArgGroup::new("backends-source").required(true).args(["control_plane", "backends"])))]
pub struct Args {
    /// Where clients address the proxy, which routes by Host / :authority (default
    /// 127.0.0.1:4140 when no --outbound-listen or --inbound-listen is given).
    #[arg(long, env = "TANDEM_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Injected pods: where the pod's outgoing TCP arrives, redirected by
    /// `tandem-proxy init`; routed by where it was going (SO_ORIGINAL_DST). Several
    /// addresses, comma-separated, e.g. `0.0.0.0:4140,[::]:4140` (an IPv6 one is
    /// skipped, with a warning, where the pod has no IPv6).
    #[arg(long, value_delimiter = ',', env = "TANDEM_OUTBOUND_LISTEN")]
    pub outbound_listen: Vec<SocketAddr>,
    /// Injected pods: where TCP for the app arrives, redirected by `tandem-proxy init`;
    /// forwarded to the app's port on the pod's loopback. Comma-separated, as above.
    #[arg(long, value_delimiter = ',', env = "TANDEM_INBOUND_LISTEN")]
    pub inbound_listen: Vec<SocketAddr>,
    /// Outbound: a client silent this long is taken to speak a server-first protocol
    /// (MySQL, SMTP) and its connection forwarded as opaque TCP.
    #[arg(long, default_value = "300ms", value_parser = duration)]
    pub detect_timeout: Duration,
    /// Outbound: destination ports forwarded as opaque TCP at once, without waiting
    /// for the client's first bytes (SMTP, MySQL, PostgreSQL, Redis, memcached, ...).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "25,587,3306,4444,4567,4568,5432,6379,9300,11211",
        env = "TANDEM_OPAQUE_PORTS"
    )]
    pub opaque_ports: Vec<u16>,
    /// Admin server: /live, /ready, /metrics, /config, POST /shutdown (loopback callers only).
    #[arg(long, default_value = "127.0.0.1:4191", env = "TANDEM_ADMIN")]
    pub admin: SocketAddr,
    /// The control plane's discovery address (host:port); destinations are chosen by Host / :authority.
    #[arg(long, env = "TANDEM_CONTROL_PLANE")]
    pub control_plane: Option<String>,
    /// Static backends, no control plane: HOST:PORT,HOST:PORT (every request goes to them).
    #[arg(long, value_delimiter = ',', conflicts_with = "control_plane")]
    pub backends: Vec<String>,
    /// With --backends: the protocol spoken to them (auto: HTTP/1.1, and HTTP/2 for gRPC).
    #[arg(long, default_value = "auto", value_parser = parse_protocol, requires = "backends")]
    pub backend_protocol: Protocol,
    /// Where requests for destinations the control plane does not know go (e.g. web.default:80).
    #[arg(long, requires = "control_plane")]
    pub default_destination: Option<String>,
    /// Tokio worker threads (1 runs everything on one thread).
    #[arg(long, default_value_t = default_threads(), env = "TANDEM_THREADS")]
    pub threads: usize,
    /// This proxy's locality, REGION/ZONE[/SUBZONE]; overrides what the control plane says.
    #[arg(long, value_parser = Locality::parse, env = "TANDEM_LOCALITY")]
    pub locality: Option<Locality>,
    /// The node this proxy runs on (the control plane derives its locality from it).
    #[arg(long, env = "TANDEM_NODE", default_value = "")]
    pub node: String,
    /// The proxy's namespace: short names like `web:80` resolve in it.
    #[arg(long, env = "TANDEM_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The proxy's pod name (for the control plane's bookkeeping).
    #[arg(long, env = "TANDEM_POD", default_value = "")]
    pub pod: String,
    /// Terminate TLS on the listener with this PEM certificate chain (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Timeout to connect to a backend.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub connect_timeout: Duration,
    /// How long a request waits for a new destination's first discovery answer.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub discovery_timeout: Duration,
    /// A client connection quiet between requests for this long is closed.
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub idle_timeout: Duration,
    /// A request head must arrive whole within this long of its first byte (408 after).
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub header_read_timeout: Duration,
    /// A request that moves no byte for this long is given up: 504 while it waits
    /// for its response's head, the connection closed after (Envoy's stream idle timeout).
    #[arg(long, default_value = "5m", value_parser = duration)]
    pub stream_idle_timeout: Duration,
    /// Open client connections at most; at the cap the quietest one is closed to make
    /// room, and a new one is refused only when none is quiet (default: half the file
    /// descriptor limit, the rest kept for backend connections).
    #[arg(long)]
    pub max_client_connections: Option<usize>,
    /// How long open connections may finish after a shutdown signal.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,
    /// At most this many destinations are tracked at once.
    #[arg(long, default_value_t = 10_000)]
    pub max_destinations: usize,

    /// Balancer: a tier keeps all its traffic while overprovisioning × healthy% >= 100.
    #[arg(long, default_value_t = 1.4, help_heading = "Balancing")]
    pub overprovisioning_factor: f64,
    /// Balancer: below this percentage of healthy endpoints, balance over all of them.
    #[arg(long, default_value_t = 50.0, help_heading = "Balancing")]
    pub panic_threshold: f64,
    /// Balancer: zone-aware routing needs at least this many healthy endpoints.
    #[arg(long, default_value_t = 6, help_heading = "Balancing")]
    pub zone_aware_min_endpoints: usize,
    /// Ramp up endpoints that just became healthy over this window, from 10% (off by default).
    #[arg(long, value_parser = duration, help_heading = "Balancing")]
    pub slow_start_window: Option<Duration>,
    /// Outlier detection: consecutive failures (connect error, reset, 5xx, timeout) that eject.
    #[arg(long, default_value_t = 5, help_heading = "Resilience")]
    pub outlier_consecutive_failures: u32,
    /// Outlier detection: an ejection lasts this long times the number of ejections.
    #[arg(long, default_value = "30s", value_parser = duration, help_heading = "Resilience")]
    pub outlier_base_ejection_time: Duration,
    /// Outlier detection: the longest ejection.
    #[arg(long, default_value = "300s", value_parser = duration, help_heading = "Resilience")]
    pub outlier_max_ejection_time: Duration,
    /// Outlier detection: at most this percentage of a set is ejected (at least one endpoint).
    #[arg(long, default_value_t = 10.0, help_heading = "Resilience")]
    pub outlier_max_ejection_percent: f64,
    /// Retries may add at most this percentage of the requests in flight (at least --retry-min).
    #[arg(long, default_value_t = 20.0, help_heading = "Resilience")]
    pub retry_budget_percent: f64,
    /// Retries always allowed in flight per destination, whatever the budget.
    #[arg(long, default_value_t = 3, help_heading = "Resilience")]
    pub retry_min: usize,
    /// Endpoints tried for one request.
    #[arg(long, default_value_t = 3, help_heading = "Resilience")]
    pub max_attempts: usize,
    /// Time allowed from request to response headers, unless the service sets its own
    /// (default: none; the stream idle timeout still applies).
    #[arg(long, value_parser = duration, help_heading = "Resilience")]
    pub request_timeout: Option<Duration>,
    /// Requests in flight per destination beyond which the proxy answers 503 at once.
    #[arg(long, default_value_t = 10_000, help_heading = "Resilience")]
    pub max_pending_requests: usize,
    /// Log format on stderr: plain or json.
    #[arg(long, default_value = "plain", env = "TANDEM_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Send OpenTelemetry spans of requests over OTLP/gRPC to this collector
    /// (`host:port` or a URL: Jaeger, an OpenTelemetry Collector). Without it, no traces.
    #[arg(long, env = "TANDEM_TRACE_COLLECTOR", help_heading = "Tracing")]
    pub trace_collector: Option<String>,
    /// The share of requests arriving without a trace context that start a trace (0 to
    /// 1). A caller's sampled context is always followed, an unsampled one never.
    #[arg(
        long,
        default_value_t = 0.0,
        env = "TANDEM_TRACE_SAMPLE_RATIO",
        help_heading = "Tracing"
    )]
    pub trace_sample_ratio: f64,
    /// The workload this proxy sits beside: `service.name` of its spans, and the
    /// `dst_service` of its inbound metrics.
    #[arg(long, default_value = "tandem-proxy", env = "TANDEM_SERVICE_NAME")]
    pub service_name: String,
    /// Metrics per endpoint address too (one series per endpoint of every service:
    /// many, on a large cluster).
    #[arg(long)]
    pub metrics_per_endpoint: bool,
    #[command(flatten)]
    pub identity: IdentityArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bind(#[from] tandem_common::listen::BindError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Config(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("init: {0}")]
    Init(crate::init::InitError),
}

/// With `--identity-address`: the proxy's identity, its first certificate asked for
/// (the proxy is not ready until it has it) and renewed from then on, and the mesh
/// TLS made with it.
fn start_identity(
    args: &IdentityArgs,
    readiness: &Arc<Readiness>,
    metrics: &Arc<ProxyMetrics>,
) -> Result<Option<Arc<MeshTls>>, Error> {
    let Some(address) = &args.identity_address else {
        return Ok(None);
    };
    let name = args.identity.clone().ok_or_else(|| {
        Error::Config("--identity-address needs --identity (TANDEM_IDENTITY)".into())
    })?;
    crate::identity::check_identity(&name)
        .map_err(|e| Error::Config(format!("--identity: {e}")))?;
    let roots_file = &args.trust_roots_file;
    let pem = std::fs::read(roots_file).map_err(|e| {
        Error::Config(format!(
            "cannot read the trust roots {} (the ConfigMap tandem-trust-roots, mounted by injection): {e}",
            roots_file.display()
        ))
    })?;
    let roots = Roots::from_pem(&pem)
        .map_err(|e| Error::Config(format!("the trust roots {}: {e}", roots_file.display())))?;
    let identity = Identity::new(name, roots);
    let certifier = Certifier::new(
        identity.clone(),
        address.clone(),
        &args.identity_server_name,
        args.identity_token_file.clone(),
    )
    .map_err(|e| Error::Config(e.to_string()))?;
    readiness.set_gate_not_ready(certify::READY_GATE, "waiting for the first certificate");
    tokio::spawn(certify::run(certifier, readiness.clone(), metrics.clone()));
    let mesh =
        MeshTls::new(identity, metrics).map_err(|e| Error::Config(format!("mesh TLS: {e}")))?;
    Ok(Some(mesh))
}

/// Builds the runtime `--threads` asks for and runs the proxy on it.
pub fn run_blocking(args: Args) -> Result<(), Error> {
    let runtime = if args.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .thread_name("tandem-proxy")
            .enable_all()
            .build()
    }
    .map_err(Error::Runtime)?;
    runtime.block_on(run(args))
}

async fn resolve_backends(specs: &[String]) -> Result<Vec<SocketAddr>, Error> {
    let mut out = Vec::new();
    for spec in specs.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let mut addrs = tokio::net::lookup_host(spec)
            .await
            .map_err(|e| Error::Config(format!("--backends: cannot resolve {spec:?}: {e}")))?;
        let addr = addrs
            .next()
            .ok_or_else(|| Error::Config(format!("--backends: {spec:?} resolves to no address")))?;
        out.push(addr);
    }
    if out.is_empty() {
        return Err(Error::Config("--backends lists no backend".into()));
    }
    Ok(out)
}

/// Raises the soft file descriptor limit to the hard one (as Go programs and HAProxy
/// do: a proxy holds two sockets per request in flight) and returns it.
fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            tracing::warn!(%error, "cannot raise the file descriptor limit; assuming 1024");
            1024
        }
    }
}

/// Half the file descriptor limit: the other half is for backend connections,
/// discovery and the admin port.
fn default_max_connections(fd_limit: u64) -> usize {
    usize::try_from(fd_limit / 2).unwrap_or(usize::MAX)
}

/// The listeners asked for, bound: a bind failure names the flag.
async fn bind_listeners(
    args: &Args,
    inbound: Arc<InboundContext>,
) -> Result<Vec<(Role, TcpListener, SocketAddr)>, Error> {
    let transparent = !args.outbound_listen.is_empty() || !args.inbound_listen.is_empty();
    let explicit = match args.listen {
        Some(addr) => vec![addr],
        None if !transparent => vec![SocketAddr::from(([127, 0, 0, 1], 4140))],
        None => vec![],
    };
    let outbound = Role::Outbound {
        opaque_ports: args.opaque_ports.clone().into(),
        detect_timeout: args.detect_timeout,
    };
    let mut bound = Vec::with_capacity(4);
    for (what, role, addrs) in [
        ("the proxy (--listen)", Role::Explicit, &explicit),
        (
            "outbound (--outbound-listen)",
            outbound,
            &args.outbound_listen,
        ),
        (
            "inbound (--inbound-listen)",
            Role::Inbound(inbound),
            &args.inbound_listen,
        ),
    ] {
        let mut any = false;
        for (i, addr) in addrs.iter().enumerate() {
            match tandem_common::listen::bind(what, *addr).await {
                Ok(listener) => {
                    let local = listener.local_addr().unwrap_or(*addr);
                    bound.push((role.clone(), listener, local));
                    any = true;
                }
                // A pod without IPv6 (disabled on the node): its IPv4 listener is enough.
                Err(error)
                    if addr.is_ipv6() && no_ipv6(&error.source) && (any || i + 1 < addrs.len()) =>
                {
                    tracing::warn!(%error, "no IPv6 here; listening on the other addresses");
                }
                Err(error) => return Err(error.into()),
            }
        }
        if !addrs.is_empty() && !any {
            return Err(Error::Config(format!("{what}: no address could be bound")));
        }
    }
    Ok(bound)
}

/// The errors of binding an IPv6 address where the kernel has IPv6 turned off.
fn no_ipv6(error: &std::io::Error) -> bool {
    error.raw_os_error() == Some(libc::EAFNOSUPPORT)
        || error.kind() == std::io::ErrorKind::AddrNotAvailable
}

/// Runs the proxy until SIGTERM/SIGINT or `POST /shutdown`.
pub async fn run(args: Args) -> Result<(), Error> {
    tandem_common::logging::init(args.log_format);
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    tokio::spawn(crate::clock::run());

    let metrics = Arc::new(ProxyMetrics::default());
    let fd_limit = raise_fd_limit();
    let max_connections = args
        .max_client_connections
        .unwrap_or_else(|| default_max_connections(fd_limit))
        .max(1);
    let readiness = Arc::new(Readiness::not_ready("waiting for the control plane"));
    let mesh = start_identity(&args.identity, &readiness, &metrics)?;
    let upstream = Arc::new(UpstreamSettings {
        connect_timeout: args.connect_timeout,
        mesh: mesh.clone(),
        ..Default::default()
    });
    let locality = Arc::new(ProxyLocality::new(args.locality.clone()));
    let settings = Arc::new(ManagerSettings {
        upstream: upstream.clone(),
        balancer: BalancerConfig {
            overprovisioning: args.overprovisioning_factor,
            panic_threshold: args.panic_threshold / 100.0,
            min_zone_aware_endpoints: args.zone_aware_min_endpoints,
            slow_start: args.slow_start_window.map(SlowStart::new),
        },
        outlier: OutlierConfig {
            consecutive_failures: args.outlier_consecutive_failures,
            base_ejection_time: args.outlier_base_ejection_time,
            max_ejection_time: args.outlier_max_ejection_time,
            max_ejection_percent: args.outlier_max_ejection_percent,
        },
        locality: locality.clone(),
    });

    let router = match &args.control_plane {
        None => {
            let addrs = resolve_backends(&args.backends).await?;
            let endpoints = addrs
                .iter()
                .map(|addr| EndpointMeta {
                    protocol: args.backend_protocol,
                    ..EndpointMeta::static_backend(*addr)
                })
                .collect();
            let destination = crate::manager::spawn_fixed("static", endpoints, settings.clone());
            metrics.discovery_connected.set(1);
            readiness.set_ready();
            Router::Static(destination)
        }
        Some(addr) => {
            let endpoint = control_plane_endpoint(addr).map_err(Error::Config)?;
            let identity = pb::ProxyIdentity {
                node: args.node.clone(),
                namespace: args.namespace.clone(),
                pod: args.pod.clone(),
            };
            let client = Arc::new(DiscoveryClient::new(
                endpoint,
                identity,
                settings.clone(),
                metrics.clone(),
            ));
            tokio::spawn(client.clone().hello(readiness.clone()));
            let watcher = client.clone();
            let destinations = Arc::new(Destinations::new(args.max_destinations, move |d| {
                watcher.spawn_watch(d)
            }));
            let evict = destinations.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(EVICT_EVERY);
                loop {
                    tick.tick().await;
                    evict.evict_idle(DESTINATION_IDLE);
                }
            });
            Router::Discovery {
                destinations,
                default: args.default_destination.as_deref().map(|d| {
                    let mut buf = [0u8; 256];
                    crate::forward::normalize_name(d.as_bytes(), &mut buf)
                        .unwrap_or(d)
                        .into()
                }),
            }
        }
    };
    let router = Arc::new(router);

    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(server_config(cert, key)?)),
        _ => None,
    };

    let inspector = Arc::new(Inspector {
        router: router.clone(),
        locality: locality.clone(),
        identity: mesh.as_ref().map(|m| m.identity.clone()),
    });

    let inbound = Arc::new(InboundContext::new(
        mesh.clone(),
        args.identity.inbound_policy,
        args.identity.node_ip,
        args.outbound_listen
            .iter()
            .chain(&args.inbound_listen)
            .map(|a| a.port())
            .collect(),
        args.detect_timeout,
        // An ejected app (its destination's only endpoint) is still picked: below
        // the panic threshold, the balancer uses every endpoint not draining.
        settings.clone(),
    ));
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    registry.register_collector(Box::new(TrafficMetrics {
        router: router.clone(),
        inbound: inbound.clone(),
        locality: locality.clone(),
        workload: Workload {
            service: args.service_name.clone(),
            namespace: args.namespace.clone(),
        },
        per_endpoint: args.metrics_per_endpoint,
    }));
    registry.register_collector(Box::new(ProcessCollector));
    let listeners = bind_listeners(&args, inbound).await?;
    let admin_listener = tandem_common::listen::bind("admin (--admin)", args.admin).await?;
    let admin_addr = admin_listener.local_addr().unwrap_or(args.admin);

    let admin = Arc::new(Admin {
        registry,
        readiness,
        routes: Some(inspector),
        shutdown: shutdown.clone(),
    });
    tokio::spawn(admin.serve(admin_listener));

    let tracer = match &args.trace_collector {
        None => None,
        Some(collector) => {
            let settings = crate::trace::Settings {
                collector: collector.clone(),
                sample_ratio: args.trace_sample_ratio,
                service_name: args.service_name.clone(),
                namespace: args.namespace.clone(),
                pod: args.pod.clone(),
                node: args.node.clone(),
            };
            Some(Tracer::start(&settings, metrics.span_counts()).map_err(Error::Config)?)
        }
    };
    let forwarder = Arc::new(Forwarder {
        router: router.clone(),
        discovery_timeout: args.discovery_timeout,
        resilience: Resilience {
            max_attempts: args.max_attempts.max(1),
            retry_budget: args.retry_budget_percent / 100.0,
            retry_min: args.retry_min,
            request_timeout: args.request_timeout,
            max_pending: args.max_pending_requests.max(1),
            stream_idle_timeout: args.stream_idle_timeout,
        },
        header_read_timeout: args.header_read_timeout,
        inbound: None,
        tracer,
    });
    let limits = Limits {
        idle_timeout: args.idle_timeout,
        header_read_timeout: args.header_read_timeout,
        stream_idle_timeout: args.stream_idle_timeout,
        max_connections,
    };
    let connections = Arc::new(Connections::new(limits, metrics.clone()));
    tokio::spawn(connections.clone().sweep());
    let mut announced: Vec<(String, SocketAddr)> = Vec::with_capacity(listeners.len() + 1);
    let mut serving = tokio::task::JoinSet::new();
    for (role, listener, addr) in listeners {
        // Names are keys of the announcement: a role's second address is `outbound-2`.
        let same = announced
            .iter()
            .filter(|(name, _)| name.split('-').next() == Some(role.name()))
            .count();
        let name = match same {
            0 => role.name().to_string(),
            n => format!("{}-{}", role.name(), n + 1),
        };
        announced.push((name, addr));
        // Mesh TLS on the inbound listener comes with identities; --tls-cert is for
        // clients that address the proxy.
        let tls = matches!(role, Role::Explicit)
            .then(|| tls.clone())
            .flatten();
        let server = Arc::new(Server {
            role,
            forwarder: forwarder.clone(),
            tls,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            grace: args.shutdown_grace,
            connections: connections.clone(),
        });
        serving.spawn(server.serve(listener));
    }
    announced.push(("admin".to_string(), admin_addr));
    let announced: Vec<(&str, SocketAddr)> =
        announced.iter().map(|(n, a)| (n.as_str(), *a)).collect();
    tracing::info!(
        listeners = ?announced,
        tls = args.tls_cert.is_some(),
        threads = args.threads,
        mode = if args.control_plane.is_some() { "discovery" } else { "static" },
        "proxy ready"
    );
    announce::listening(&announced);
    serving.join_all().await;
    tracing::info!("proxy stopped");
    Ok(())
}
