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
        ] {
            if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("{flag} {value:?}: empty or with spaces"));
            }
        }
        crate::injection::overrides::log_level(&self.proxy_log_level)
            .map_err(|e| format!("--proxy-log-level {:?}: {e}", self.proxy_log_level))?;
        Ok(InjectConfig::from(self))
    }
}
