//! Sidecar injection: the one mutation that both the admission webhook
//! ([`webhook`]) and `tandem inject` ([`manifests`]) apply to a pod or a pod template.
//!
//! - [`mutate`]: given a pod (or a template) as JSON, decide whether it is meshed and
//!   return the JSON patch that adds the `tandem-init` init container (the interception
//!   rules, the only container with NET_ADMIN/NET_RAW) and the proxy as a native
//!   sidecar, in front of the pod's own init containers.
//! - [`overrides`]: the per-pod annotations, validated (a bad one leaves the pod
//!   unmeshed with a warning that names it; never a half-patched pod).
//! - [`manifests`]: the mutation over YAML streams, offline.
//! - [`webhook`], [`tls`], [`unmeshed`]: the control plane's admission webhook, its
//!   serving certificate (one Secret shared by every replica) and `caBundle`, and the
//!   count of pods that should be meshed and are not.

pub mod config;
pub mod manifests;
pub mod mutate;
pub mod overrides;
pub mod quantity;
pub mod tls;
pub mod unmeshed;
pub mod webhook;

pub use config::{InjectArgs, InjectConfig};
pub use mutate::{Context, Outcome, Skipped, inject};

/// The annotation or label that opts a namespace or a pod in (`enabled`) or out
/// (`disabled`).
pub const INJECT: &str = "tandem.io/inject";
/// Set on injected pods: the Tandem version that injected them.
pub const INJECTED: &str = "tandem.io/injected";
pub const SKIP_INBOUND_PORTS: &str = "tandem.io/skip-inbound-ports";
pub const SKIP_OUTBOUND_PORTS: &str = "tandem.io/skip-outbound-ports";
pub const SKIP_OUTBOUND_CIDRS: &str = "tandem.io/skip-outbound-cidrs";
pub const PROXY_LOG_LEVEL: &str = "tandem.io/proxy-log-level";
pub const PROXY_CPU_REQUEST: &str = "tandem.io/proxy-cpu-request";
pub const PROXY_MEMORY_REQUEST: &str = "tandem.io/proxy-memory-request";
pub const PROXY_CPU_LIMIT: &str = "tandem.io/proxy-cpu-limit";
pub const PROXY_MEMORY_LIMIT: &str = "tandem.io/proxy-memory-limit";
/// On a pod or its namespace: `mtls-only` (plaintext from unmeshed clients refused)
/// or `permissive` (the default).
pub const INBOUND_POLICY: &str = "tandem.io/inbound-policy";
/// The share of requests without a trace context the pod's proxy starts a trace for.
pub const TRACE_SAMPLE_RATIO: &str = "tandem.io/trace-sample-ratio";

/// The containers and the volume the mutation adds.
pub const INIT_CONTAINER: &str = "tandem-init";
pub const PROXY_CONTAINER: &str = "tandem-proxy";
pub const XTABLES_VOLUME: &str = "tandem-xtables";
/// The proxy's ServiceAccount token for the identity endpoint (audience `tandem`)…
pub const IDENTITY_TOKEN_VOLUME: &str = "tandem-identity-token";
pub const IDENTITY_TOKEN_DIR: &str = "/var/run/secrets/tandem.io/identity";
/// …its lifetime (the kubelet renews it at 80%; Kubernetes' own default)…
pub const IDENTITY_TOKEN_SECONDS: u32 = 3600;
/// …and the trust roots (the ConfigMap the control plane copies into the namespace).
pub const TRUST_ROOTS_VOLUME: &str = "tandem-trust-roots";
pub const TRUST_ROOTS_DIR: &str = "/var/run/tandem/trust-roots";

/// What `tandem.io/injected` says.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
