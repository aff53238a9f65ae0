//! Workload identity: the certificates proxies use for mutual TLS, one per pod,
//! naming its ServiceAccount (`spiffe://<trust-domain>/ns/<namespace>/sa/<sa>`).
//!
//! - [`store`]: the issuer Secret and the trust roots ConfigMap of the control plane's
//!   namespace, made if absent, followed as they change (what is served goes out on
//!   a `watch` channel); [`material`] reads and checks them, [`keys`] reads the
//!   issuer's key in any of its PEM forms.
//! - [`service`]: `Certify`: [`name`] (the identity asked for), [`csr`] (the request
//!   and its key), [`review`] (the TokenReview and what it says), [`sign`] (the
//!   leaf); [`refusal`]: why not, as a gRPC status and a metric label.
//! - [`server`]: the endpoint, gRPC over TLS with a certificate the issuer signs.
//! - [`copies`]: the trust roots copied into every meshed namespace, for pods to mount.

pub mod authority;
pub mod copies;
pub mod csr;
pub mod keys;
pub mod material;
pub mod name;
pub mod refusal;
pub mod review;
pub mod server;
pub mod service;
pub mod sign;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tandem_common::Shutdown;
use tokio::net::TcpListener;

use crate::injection::tls::CertStore;
use crate::metrics::{Metrics, ReasonLabel};

/// The issuer Secret (cert-manager's layout: `tls.crt`, `tls.key`, `ca.crt`).
pub const SECRET: &str = "tandem-identity-issuer";
/// The trust roots ConfigMap (in the control plane's namespace, and its copies).
pub const TRUST_ROOTS: &str = "tandem-trust-roots";
/// The trust roots' key in it.
pub const BUNDLE_KEY: &str = "ca-bundle.crt";
/// The identity endpoint's Service (deploy/), its certificate's default name.
pub const SERVICE: &str = "tandem-identity";
/// Where the identity endpoint listens unless `--identity-listen` says.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8087";

#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// The control plane's namespace (the Secret's and the ConfigMap's).
    pub namespace: String,
    pub trust_domain: String,
    /// Workload certificates' lifetime.
    pub lifetime: Duration,
    /// How often the Secret, the ConfigMap and the copies are read again.
    pub refresh: Duration,
    /// The serving certificate's names (DNS names or IP addresses).
    pub server_names: Vec<String>,
}

/// The serving certificate's names: `--identity-server-name` (else
/// `tandem-identity.<namespace>.svc` and its longer and shorter forms), then the
/// `--identity-cert-san` ones.
pub fn server_names(
    server_name: Option<&str>,
    namespace: &str,
    cluster_domain: &str,
    extra: &[String],
) -> Vec<String> {
    let mut names = match server_name {
        Some(name) => vec![name.to_string()],
        None => vec![
            format!("{SERVICE}.{namespace}.svc"),
            format!("{SERVICE}.{namespace}.svc.{cluster_domain}"),
            format!("{SERVICE}.{namespace}"),
        ],
    };
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// What the rest of the control plane holds of identity.
pub struct Identity {
    /// For the webhook: makes sure an injected pod's namespace has the trust roots.
    pub copies: Arc<Copies>,
}

pub use copies::Copies;

/// Starts keeping the issuer and the trust roots (and their copies), and serving
/// Certify on `listener`.
pub fn start(
    client: Client,
    settings: IdentitySettings,
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> Identity {
    // Every reason shows, at 0, before the first refusal.
    for reason in refusal::Reason::ALL {
        let _ = metrics.certificate_refusals.get_or_create(&ReasonLabel {
            reason: reason.label(),
        });
    }
    let (store, current) = store::Store::new(
        client.clone(),
        store::StoreSettings {
            namespace: settings.namespace.clone(),
            trust_domain: settings.trust_domain.clone(),
            refresh: settings.refresh,
        },
        metrics.clone(),
    );
    tokio::spawn(store.run());
    let copies = Arc::new(Copies::new(
        client.clone(),
        settings.namespace.clone(),
        current.clone(),
    ));
    let keeper = copies.clone();
    let refresh = settings.refresh;
    tokio::spawn(async move { keeper.run(refresh).await });
    let certs = Arc::new(CertStore::default());
    tokio::spawn(server::keep_certificate(
        current.clone(),
        settings.server_names.clone(),
        certs.clone(),
    ));
    let service = service::IdentityService::new(
        current,
        review::ApiReviewer(client),
        settings.trust_domain,
        settings.lifetime,
        metrics,
    );
    tokio::spawn(server::serve(
        listener,
        certs,
        service.into_server(),
        shutdown,
    ));
    Identity { copies }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_the_serving_certificate() {
        assert_eq!(
            server_names(
                None,
                "tandem-system",
                "cluster.local",
                &["127.0.0.1".into()]
            ),
            [
                "tandem-identity.tandem-system.svc",
                "tandem-identity.tandem-system.svc.cluster.local",
                "tandem-identity.tandem-system",
                "127.0.0.1"
            ]
        );
        assert_eq!(
            server_names(
                Some("id.example"),
                "ns",
                "cluster.local",
                &["id.example".into()]
            ),
            ["id.example"]
        );
    }
}
