//! The proxy's workload identity and the mutual TLS between proxies.
//!
//! - [`Identity`]: who this proxy is (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), its
//!   current certificate and the trust roots; both swap atomically (renewal, root
//!   rotation) under connections that keep using what they were set up with.
//! - [`certify`]: the key (ECDSA P-256, made in memory, never written) and the
//!   certificate from the control plane's identity service, renewed at 70% of its
//!   lifetime; while renewal fails the old certificate keeps serving.
//! - [`verify`]: a peer's chain against the roots, and its URI SAN.
//! - [`mesh`]: the TLS settings proxies speak to each other with: TLS 1.3 only, a
//!   certificate on both sides, and an ALPN that says what the connection carries.

pub mod certify;
pub mod mesh;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;

pub use certify::CertifyError;
pub use mesh::MeshTls;

/// Where the injected pod's files are (the projected token, the trust roots).
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/tandem.io/identity/token";
pub const DEFAULT_TRUST_ROOTS_FILE: &str = "/var/run/tandem/trust-roots/ca-bundle.crt";
pub const DEFAULT_SERVER_NAME: &str = "tandem-identity.tandem-system.svc";

/// The proxy's identity flags (all set by injection).
#[derive(Debug, Clone, clap::Args)]
pub struct IdentityArgs {
    /// The control plane's identity service (host:port), over TLS. Without it the
    /// proxy has no identity and speaks plaintext to other proxies.
    #[arg(long, env = "TANDEM_IDENTITY_ADDRESS", help_heading = "Identity")]
    pub identity_address: Option<String>,
    /// This proxy's identity: spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICEACCOUNT.
    #[arg(
        long,
        env = "TANDEM_IDENTITY",
        requires = "identity_address",
        help_heading = "Identity"
    )]
    pub identity: Option<String>,
    /// The name (DNS or IP address) the identity service's certificate must carry.
    #[arg(long, env = "TANDEM_IDENTITY_SERVER_NAME", default_value = DEFAULT_SERVER_NAME, help_heading = "Identity")]
    pub identity_server_name: String,
    /// The pod's ServiceAccount token (audience `tandem`), re-read at each renewal.
    #[arg(long, env = "TANDEM_IDENTITY_TOKEN_FILE", default_value = DEFAULT_TOKEN_FILE, help_heading = "Identity")]
    pub identity_token_file: PathBuf,
    /// The mesh's trust roots (PEM), to trust the identity service until it says more.
    #[arg(long, env = "TANDEM_TRUST_ROOTS_FILE", default_value = DEFAULT_TRUST_ROOTS_FILE, help_heading = "Identity")]
    pub trust_roots_file: PathBuf,
    /// Inbound plaintext (from clients outside the mesh): `permissive` serves it,
    /// `mtls-only` refuses it.
    #[arg(long, env = "TANDEM_INBOUND_POLICY", default_value = "permissive", value_parser = InboundPolicy::parse, help_heading = "Identity")]
    pub inbound_policy: InboundPolicy,
    /// The node's address (injected from `status.hostIP`): the kubelet probes the pod
    /// from there, in plaintext, so `mtls-only` still serves it.
    #[arg(long, env = "TANDEM_HOST_IP", help_heading = "Identity")]
    pub node_ip: Option<std::net::IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InboundPolicy {
    Permissive,
    MtlsOnly,
}

impl InboundPolicy {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "permissive" => Ok(Self::Permissive),
            "mtls-only" => Ok(Self::MtlsOnly),
            other => Err(format!(
                "unknown inbound policy {other:?}: use permissive or mtls-only"
            )),
        }
    }
}

/// A SPIFFE identity as the mesh writes it. Checked once, where it enters.
pub fn check_identity(name: &str) -> Result<(), String> {
    let rest = name
        .strip_prefix("spiffe://")
        .ok_or_else(|| format!("identity {name:?} does not start with spiffe://"))?;
    let mut parts = rest.split('/');
    let domain = parts.next().unwrap_or_default();
    let shape: Vec<&str> = parts.collect();
    let ok = !domain.is_empty()
        && shape.len() == 4
        && shape[0] == "ns"
        && shape[2] == "sa"
        && !shape[1].is_empty()
        && !shape[3].is_empty()
        && rest.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "identity {name:?} is not spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICEACCOUNT"
        ))
    }
}

/// The roots a peer's chain must end at, as DER and as webpki's anchors.
pub struct Roots {
    pub certs: Vec<CertificateDer<'static>>,
    pub anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
}

impl Roots {
    /// Every certificate in `pem`; at least one, each usable as a trust anchor.
    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("no PEM certificate".into());
        }
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| format!("a root is not a usable certificate: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { certs, anchors })
    }
}

/// This proxy's certificate, with when it stops being valid.
pub struct Certified {
    pub key: Arc<CertifiedKey>,
    pub valid_until: SystemTime,
    pub issued_at: SystemTime,
}

/// Who this proxy is, its certificate (once it has one) and the trust roots.
pub struct Identity {
    name: String,
    current: ArcSwapOption<Certified>,
    roots: ArcSwap<Roots>,
}

impl Identity {
    pub fn new(name: String, roots: Roots) -> Arc<Self> {
        Arc::new(Self {
            name,
            current: ArcSwapOption::empty(),
            roots: ArcSwap::from_pointee(roots),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn certified(&self) -> Option<Arc<Certified>> {
        self.current.load_full()
    }

    pub fn roots(&self) -> arc_swap::Guard<Arc<Roots>> {
        self.roots.load()
    }

    pub(crate) fn set_certified(&self, certified: Certified) {
        self.current.store(Some(Arc::new(certified)));
    }

    pub(crate) fn set_roots(&self, roots: Roots) {
        self.roots.store(Arc::new(roots));
    }

    /// What `/config` shows.
    pub fn describe(&self) -> serde_json::Value {
        let unix = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or(Duration::ZERO)
                .as_secs()
        };
        let certified = self.certified();
        serde_json::json!({
            "identity": self.name,
            "certificate": certified.as_ref().map(|c| serde_json::json!({
                "issued_at_unix_seconds": unix(c.issued_at),
                "valid_until_unix_seconds": unix(c.valid_until),
                "expires_in_seconds": c.valid_until
                    .duration_since(SystemTime::now())
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            })),
            "trust_roots": self.roots().certs.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_have_one_shape() {
        assert!(check_identity("spiffe://cluster.local/ns/default/sa/web").is_ok());
        for bad in [
            "",
            "spiffe://",
            "https://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://cluster.local/ns/default/serviceaccount/web",
            "spiffe://cluster.local/ns/def ault/sa/web",
        ] {
            assert!(check_identity(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn roots_must_be_pem_certificates() {
        assert!(Roots::from_pem(b"").is_err());
        assert!(Roots::from_pem(b"not pem").is_err());
        let ca = rcgen::CertificateParams::default();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = ca;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = ca.self_signed(&key).unwrap();
        let two = format!("{}{}", cert.pem(), cert.pem());
        assert_eq!(Roots::from_pem(two.as_bytes()).unwrap().certs.len(), 2);
    }
}
