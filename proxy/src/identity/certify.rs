//! Getting and renewing the proxy's certificate from the control plane's identity
//! service (`tandem.identity.v1.Identity/Certify`).
//!
//! The key is ECDSA P-256, made here at start and kept in memory only: what leaves
//! the process is a CSR (the public key and the identity asked for) and the pod's
//! ServiceAccount token, which proves the identity. The identity service is reached
//! over TLS, its certificate checked against the mesh's trust roots and the name
//! `--identity-server-name`, so the token goes to no one else.
//!
//! Renewal at 70% of the lifetime, less up to a tenth of that at random (so proxies
//! started together do not renew together). A failed request is retried with
//! backoff while the current certificate keeps serving; failures are logged and
//! counted, never fatal.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SigningKey};
use tandem_common::Readiness;
use tandem_proto::identity::v1 as pb;

use super::{Certified, Identity, Roots};
use crate::metrics::{ProxyMetrics, ResultLabel};

/// The readiness gate the first certificate opens.
pub const READY_GATE: &str = "identity";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    #[error("cannot read the ServiceAccount token {path}: {reason}")]
    Token { path: String, reason: String },
    #[error("cannot make a key or a CSR: {0}")]
    Key(String),
    #[error("cannot reach the identity service at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error("the identity service refused: {0}")]
    Refused(String),
    #[error("the identity service's answer is not usable: {0}")]
    BadAnswer(String),
}

/// Where and how to ask for certificates.
pub struct Certifier {
    pub identity: Arc<Identity>,
    pub address: String,
    pub server_name: ServerName<'static>,
    pub token_file: PathBuf,
    signing_key: Arc<dyn SigningKey>,
    csr: Vec<u8>,
}

impl Certifier {
    /// Makes the key and the CSR (one for the process's life).
    pub fn new(
        identity: Arc<Identity>,
        address: String,
        server_name: &str,
        token_file: PathBuf,
    ) -> Result<Self, CertifyError> {
        let server_name = ServerName::try_from(server_name.to_string()).map_err(|e| {
            CertifyError::Key(format!(
                "--identity-server-name {server_name:?} is not a DNS name or IP address: {e}"
            ))
        })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CertifyError::Key(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing_key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| CertifyError::Key(e.to_string()))?;
        let mut params = CertificateParams::default();
        // The identity is the URI SAN alone; rcgen's default subject would say otherwise.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(identity.name().try_into().map_err(|e| {
                CertifyError::Key(format!("the identity as a URI: {e}"))
            })?)];
        let csr = params
            .serialize_request(&key)
            .map_err(|e| CertifyError::Key(e.to_string()))?
            .der()
            .to_vec();
        Ok(Self {
            identity,
            address,
            server_name,
            token_file,
            signing_key,
            csr,
        })
    }

    fn token(&self) -> Result<String, CertifyError> {
        let err = |reason: String| CertifyError::Token {
            path: self.token_file.display().to_string(),
            reason,
        };
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| err(e.to_string()))?;
        let token = token.trim();
        if token.is_empty() {
            return Err(err("the file is empty".into()));
        }
        Ok(token.to_string())
    }

    /// One request for a certificate; on success it is the identity's.
    pub async fn certify(&self) -> Result<SystemTime, CertifyError> {
        let token = self.token()?;
        let channel = self.connect().await?;
        let mut client = pb::identity_client::IdentityClient::new(channel);
        let request = pb::CertifyRequest {
            identity: self.identity.name().to_string(),
            token,
            certificate_signing_request: self.csr.clone(),
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, client.certify(request))
            .await
            .map_err(|_| CertifyError::Connect {
                address: self.address.clone(),
                reason: format!("no answer within {CALL_TIMEOUT:?}"),
            })?
            .map_err(|status| match status.code() {
                tonic::Code::PermissionDenied | tonic::Code::InvalidArgument => {
                    CertifyError::Refused(status.message().to_string())
                }
                _ => CertifyError::Connect {
                    address: self.address.clone(),
                    reason: format!("{:?}: {}", status.code(), status.message()),
                },
            })?
            .into_inner();
        self.accept(answer)
    }

    /// Checks the answer (a chain to the roots that names us, for our key) and
    /// makes it current; new trust roots in it are taken first.
    fn accept(&self, answer: pb::CertifyResponse) -> Result<SystemTime, CertifyError> {
        let bad = |s: String| CertifyError::BadAnswer(s);
        if !answer.trust_roots_pem.is_empty() {
            match Roots::from_pem(answer.trust_roots_pem.as_bytes()) {
                Ok(roots) => self.identity.set_roots(roots),
                Err(e) => tracing::warn!(
                    "the identity service sent unusable trust roots ({e}); keeping the current ones"
                ),
            }
        }
        let leaf = CertificateDer::from(answer.leaf_certificate);
        let intermediates: Vec<CertificateDer<'static>> = answer
            .intermediate_certificates
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let named = super::verify::verify_chain(
            &self.identity,
            &leaf,
            &intermediates,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
        )
        .map_err(|e| bad(format!("the certificate does not verify: {e}")))?;
        if named != self.identity.name() {
            return Err(bad(format!(
                "the certificate names {named:?}, not {:?}",
                self.identity.name()
            )));
        }
        let mut chain = vec![leaf];
        chain.extend(intermediates);
        let key = CertifiedKey::new(chain, self.signing_key.clone());
        key.keys_match()
            .map_err(|e| bad(format!("the certificate is not for this proxy's key: {e}")))?;
        let valid_until = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(answer.valid_until_unix_seconds).unwrap_or(0));
        if valid_until <= SystemTime::now() {
            return Err(bad("the certificate has already expired".into()));
        }
        self.identity.set_certified(Certified {
            key: Arc::new(key),
            valid_until,
            issued_at: SystemTime::now(),
        });
        Ok(valid_until)
    }

    /// A gRPC channel to the identity service over TLS, checked against the roots.
    async fn connect(&self) -> Result<tonic::transport::Channel, CertifyError> {
        let err = |reason: String| CertifyError::Connect {
            address: self.address.clone(),
            reason,
        };
        let mut store = rustls::RootCertStore::empty();
        for cert in &self.identity.roots().certs {
            store
                .add(cert.clone())
                .map_err(|e| err(format!("a trust root: {e}")))?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let (address, name) = (self.address.clone(), self.server_name.clone());
        let connect = tower::service_fn(move |_uri: http::Uri| {
            let (address, name, connector) = (address.clone(), name.clone(), connector.clone());
            async move {
                let tcp =
                    tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&address))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                let _ = tcp.set_nodelay(true);
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                    .await
                    .map_err(|_| {
                        std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        tonic::transport::Endpoint::from_static("http://identity")
            .connect_with_connector(connect)
            .await
            .map_err(|e| err(crate::body::causes(&e)))
    }
}

/// When to renew a certificate valid for `lifetime` from now: at 70% of it, less up
/// to a tenth of that at random.
pub fn renew_after(lifetime: Duration) -> Duration {
    let at = lifetime.mul_f64(0.7);
    at.saturating_sub(at.mul_f64(fastrand::f64() * 0.1))
}

/// Gets the first certificate (the proxy is not ready until then), then renews it
/// for the process's life.
pub async fn run(certifier: Certifier, readiness: Arc<Readiness>, metrics: Arc<ProxyMetrics>) {
    // Jittered, so proxies that lost the control plane together do not return together.
    let mut backoff = tandem_common::Backoff::new(RETRY_MIN, RETRY_MAX);
    loop {
        match certifier.certify().await {
            Ok(valid_until) => {
                backoff.reset();
                metrics
                    .identity_renewals
                    .get_or_create(&ResultLabel { result: "ok" })
                    .inc();
                let unix = valid_until
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                metrics.identity_expiry.set(unix as i64);
                readiness.set_gate_ready(READY_GATE);
                let lifetime = valid_until
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                let wait = renew_after(lifetime);
                tracing::info!(identity = certifier.identity.name(), valid_for = ?lifetime, renew_in = ?wait, "certificate issued");
                tokio::time::sleep(wait).await;
            }
            Err(error) => {
                metrics
                    .identity_renewals
                    .get_or_create(&ResultLabel { result: "failed" })
                    .inc();
                let current = certifier.identity.certified();
                match &current {
                    None => readiness
                        .set_gate_not_ready(READY_GATE, format!("no certificate yet: {error}")),
                    Some(c) if c.valid_until <= SystemTime::now() => {
                        readiness.set_gate_not_ready(
                            READY_GATE,
                            format!("the certificate expired and cannot be renewed: {error}"),
                        );
                    }
                    Some(_) => {}
                }
                let retry = backoff.next_delay();
                tracing::warn!(%error, retry_in = ?retry, has_certificate = current.is_some(), "cannot get a certificate; retrying");
                tokio::time::sleep(retry).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_comes_at_about_seventy_percent() {
        let lifetime = Duration::from_secs(1000);
        for _ in 0..100 {
            let at = renew_after(lifetime);
            assert!(
                at <= Duration::from_secs(700) && at >= Duration::from_secs(630),
                "{at:?}"
            );
        }
    }
}
