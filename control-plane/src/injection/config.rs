//! What the mutation needs to know besides the pod: images, the control plane's
//! address, ports, the proxy's UID and default resources. The same flags configure
//! the webhook (`tandem control-plane`) and `tandem inject`.

/// The proxy image injected pods run, unless `--proxy-image` says otherwise.
pub const DEFAULT_PROXY_IMAGE: &str = concat!(
    "ghcr.io/tandem-mesh/tandem-proxy:",
    env!("CARGO_PKG_VERSION")
);
/// The init image (iptables and `tandem-proxy init`), unless `--init-image` says.
pub const DEFAULT_INIT_IMAGE: &str = concat!(
    "ghcr.io/tandem-mesh/tandem-init:",
    env!("CARGO_PKG_VERSION")
);
/// Where injected proxies find the control plane (`deploy/`'s Service).
pub const DEFAULT_CONTROL_PLANE_ADDRESS: &str =
    "tandem-control-plane.tandem-system.svc.cluster.local:8086";
/// Where injected proxies ask for their certificate (`deploy/`'s Service)…
pub const DEFAULT_IDENTITY_ADDRESS: &str = "tandem-identity.tandem-system.svc.cluster.local:8087";
/// …and the name they verify its certificate for (the control plane's default
/// `--identity-server-name` in namespace tandem-system).
pub const DEFAULT_IDENTITY_SERVER_NAME: &str = "tandem-identity.tandem-system.svc";
/// Where injected proxies send spans (OTLP/gRPC): `deploy/observability/`'s Jaeger.
pub const DEFAULT_TRACE_COLLECTOR: &str = "jaeger.tandem-observability.svc.cluster.local:4317";
/// The mesh's trust domain unless `--trust-domain` says.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The flags shared by the webhook and `tandem inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// The proxy image of injected pods.
    #[arg(long, env = "TANDEM_PROXY_IMAGE", default_value = DEFAULT_PROXY_IMAGE)]
    pub proxy_image: String,
    /// The image of the init container that installs the interception rules.
    #[arg(long, env = "TANDEM_INIT_IMAGE", default_value = DEFAULT_INIT_IMAGE)]
    pub init_image: String,
    /// The control plane address injected proxies dial.
    #[arg(
        long,
        env = "TANDEM_PROXY_CONTROL_PLANE_ADDRESS",
        default_value = DEFAULT_CONTROL_PLANE_ADDRESS
    )]
    pub proxy_control_plane_address: String,
    /// Injected proxies' RUST_LOG (a pod's `tandem.io/proxy-log-level` wins).
    #[arg(long, default_value = "info")]
    pub proxy_log_level: String,
    /// Where injected proxies ask for their certificate: the control plane's identity
    /// endpoint (`--identity-listen`), as HOST:PORT.
    #[arg(
        long,
        env = "TANDEM_PROXY_IDENTITY_ADDRESS",
        default_value = DEFAULT_IDENTITY_ADDRESS
    )]
    pub proxy_identity_address: String,
    /// The name injected proxies verify the identity endpoint's certificate for (a
    /// DNS name or an IP address the control plane's `--identity-server-name` or
    /// `--identity-cert-san` gives it).
    #[arg(
        long,
        env = "TANDEM_PROXY_IDENTITY_SERVER_NAME",
        default_value = DEFAULT_IDENTITY_SERVER_NAME
    )]
    pub proxy_identity_server_name: String,
    /// The mesh's trust domain: workload identities are
    /// spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>.
    #[arg(long, env = "TANDEM_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The OTLP/gRPC collector injected proxies send spans to (HOST:PORT); empty: no
    /// traces.
    #[arg(
        long,
        env = "TANDEM_PROXY_TRACE_COLLECTOR",
        default_value = DEFAULT_TRACE_COLLECTOR
    )]
    pub proxy_trace_collector: String,
    /// The share of requests without a trace context for which injected proxies start
    /// a trace, 0 to 1 (a pod's `tandem.io/trace-sample-ratio` wins). A caller's
    /// sampled context is always followed.
    #[arg(long, env = "TANDEM_PROXY_TRACE_SAMPLE_RATIO", default_value = "0.01")]
    pub proxy_trace_sample_ratio: String,
}

/// Resources as Kubernetes writes them (`10m`, `20Mi`); `None`: not set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub cpu_request: Option<String>,
    pub memory_request: Option<String>,
    pub cpu_limit: Option<String>,
    pub memory_limit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    pub proxy_image: String,
    pub init_image: String,
    pub control_plane_address: String,
    pub log_level: String,
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub admin_port: u16,
    /// The proxy runs as this UID (and GID); its own traffic is never intercepted.
    pub proxy_uid: u32,
    pub proxy_resources: Resources,
    pub identity_address: String,
    pub identity_server_name: String,
    pub trust_domain: String,
    /// Empty: injected proxies send no spans.
    pub trace_collector: String,
    /// As written (checked by [`crate::injection::overrides::sample_ratio`]).
    pub trace_sample_ratio: String,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            init_image: DEFAULT_INIT_IMAGE.to_string(),
            control_plane_address: DEFAULT_CONTROL_PLANE_ADDRESS.to_string(),
            log_level: "info".to_string(),
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            proxy_uid: 2102,
            proxy_resources: Resources {
                cpu_request: Some("10m".to_string()),
                memory_request: Some("20Mi".to_string()),
                cpu_limit: None,
                memory_limit: Some("128Mi".to_string()),
            },
            identity_address: DEFAULT_IDENTITY_ADDRESS.to_string(),
            identity_server_name: DEFAULT_IDENTITY_SERVER_NAME.to_string(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            trace_collector: DEFAULT_TRACE_COLLECTOR.to_string(),
            trace_sample_ratio: "0.01".to_string(),
        }
    }
}

impl From<&InjectArgs> for InjectConfig {
    fn from(args: &InjectArgs) -> Self {
        Self {
            proxy_image: args.proxy_image.clone(),
            init_image: args.init_image.clone(),
            control_plane_address: args.proxy_control_plane_address.clone(),
            log_level: args.proxy_log_level.clone(),
            identity_address: args.proxy_identity_address.clone(),
            identity_server_name: args.proxy_identity_server_name.clone(),
            trust_domain: args.trust_domain.clone(),
            trace_collector: args.proxy_trace_collector.clone(),
            trace_sample_ratio: args.proxy_trace_sample_ratio.trim().to_string(),
            ..Self::default()
        }
    }
}

impl InjectArgs {
    /// Checks what a pod annotation would be checked for too.
    pub fn validate(&self) -> Result<InjectConfig, String> {
        for (flag, value) in [
            ("--proxy-image", &self.proxy_image),
            ("--init-image", &self.init_image),
            (
                "--proxy-control-plane-address",
                &self.proxy_control_plane_address,
            ),
            ("--proxy-identity-address", &self.proxy_identity_address),
        ] {
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("{flag} {value:?}: empty or with spaces"));
            }
        }
        crate::injection::overrides::log_level(&self.proxy_log_level)
            .map_err(|e| format!("--proxy-log-level {:?}: {e}", self.proxy_log_level))?;
        rustls::pki_types::ServerName::try_from(self.proxy_identity_server_name.as_str()).map_err(
            |_| {
                format!(
                    "--proxy-identity-server-name {:?}: not a DNS name or an IP address",
                    self.proxy_identity_server_name
                )
            },
        )?;
        if self
            .proxy_trace_collector
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "--proxy-trace-collector {:?}: with spaces",
                self.proxy_trace_collector
            ));
        }
        crate::injection::overrides::sample_ratio(&self.proxy_trace_sample_ratio).map_err(|e| {
            format!(
                "--proxy-trace-sample-ratio {:?}: {e}",
                self.proxy_trace_sample_ratio
            )
        })?;
        crate::identity::name::check_trust_domain(&self.trust_domain)
            .map_err(|e| format!("--trust-domain {:?}: {e}", self.trust_domain))?;
        Ok(InjectConfig::from(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        inject: InjectArgs,
    }

    fn validate(args: &[&str]) -> Result<InjectConfig, String> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.inject.validate()
    }

    #[test]
    fn identity_defaults_and_flags() {
        let config = validate(&[]).unwrap();
        assert_eq!(config.identity_address, DEFAULT_IDENTITY_ADDRESS);
        assert_eq!(config.identity_server_name, DEFAULT_IDENTITY_SERVER_NAME);
        assert_eq!(config.trust_domain, "cluster.local");
        assert_eq!(config, InjectConfig::default());
        let config = validate(&[
            "--proxy-identity-address",
            "10.0.0.1:8087",
            "--proxy-identity-server-name",
            "10.0.0.1",
            "--trust-domain",
            "prod.example",
        ])
        .unwrap();
        assert_eq!(
            (
                config.identity_address.as_str(),
                config.identity_server_name.as_str(),
                config.trust_domain.as_str()
            ),
            ("10.0.0.1:8087", "10.0.0.1", "prod.example")
        );
        for (args, says) in [
            (&["--trust-domain", "Prod"][..], "--trust-domain \"Prod\""),
            (
                &["--proxy-identity-server-name", "a b"][..],
                "--proxy-identity-server-name",
            ),
            (
                &["--proxy-identity-address", ""][..],
                "--proxy-identity-address",
            ),
        ] {
            let error = validate(args).unwrap_err();
            assert!(error.contains(says), "{error}");
        }
    }
}
