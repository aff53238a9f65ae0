//! The TLS proxies speak to each other: TLS 1.3, a certificate on both sides from
//! the mesh's issuer, and an ALPN saying what the connection carries, so the server
//! proxy knows at once how to serve it (and tells mesh TLS from an app's own TLS,
//! which it leaves alone):
//!
//! - [`ALPN_H2`]: HTTP/2. Every HTTP request between proxies goes this way, whatever
//!   the app spoke: many requests over one connection. The version to speak to the
//!   app at the far end travels in [`APP_PROTOCOL`].
//! - [`ALPN_HTTP1`]: HTTP/1.1, for an upgrade (WebSocket) on a connection of its own.
//! - [`ALPN_OPAQUE`]: the app's bytes as they are (opaque TCP).
//!
//! The certificate comes from the proxy's [`Identity`] at each handshake, so a
//! renewed one is used from the next connection on without rebuilding anything.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::Identity;
use super::verify::{PeerClient, PeerServer};
use crate::counted::Counted;
use crate::metrics::{MeshHandshakeLabel, OutboundLabel, ProxyMetrics};

pub const ALPN_H2: &[u8] = b"tandem.io/h2";
pub const ALPN_HTTP1: &[u8] = b"tandem.io/http1";
pub const ALPN_OPAQUE: &[u8] = b"tandem.io/opaque";

/// Set by the client proxy on requests it carries over mesh HTTP/2: the version the
/// app at the far end speaks (`http1` or `http2`). Removed by the server proxy.
pub const APP_PROTOCOL: http::HeaderName = http::HeaderName::from_static("tandem-app-protocol");
/// For the app: the identity of the proxy a request came from, over mesh TLS only.
/// Removed from every other request, so an app can trust it.
pub const CLIENT_ID: http::HeaderName = http::HeaderName::from_static("x-tandem-client-id");

/// Whether `alpn` is one of the mesh's.
pub fn is_mesh_alpn(alpn: &[u8]) -> bool {
    [ALPN_H2, ALPN_HTTP1, ALPN_OPAQUE].contains(&alpn)
}

/// The certificate to present: the identity's current one.
#[derive(Debug)]
struct CurrentCert(Arc<Identity>);

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified().map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified().map(|c| c.key.clone())
    }
}

/// ring, made once (making a provider allocates; a client config is made per endpoint).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::LazyLock<Arc<rustls::crypto::CryptoProvider>> =
        std::sync::LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));
    PROVIDER.clone()
}

/// Mesh TLS for one proxy: the server side (one config) and client configs made
/// per peer identity.
#[derive(Debug)]
pub struct MeshTls {
    pub identity: Arc<Identity>,
    server: Arc<ServerConfig>,
    /// Client handshakes that succeeded and failed (resolved once, no label lookup).
    client_ok: Counter,
    client_failed: Counter,
    /// Mesh connections made, by the server's identity.
    outbound: Family<OutboundLabel, Counter>,
}

impl MeshTls {
    pub fn new(
        identity: Arc<Identity>,
        metrics: &ProxyMetrics,
    ) -> Result<Arc<Self>, rustls::Error> {
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(PeerClient {
                identity: identity.clone(),
            }))
            .with_cert_resolver(Arc::new(CurrentCert(identity.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_OPAQUE.to_vec()];
        let counter = |result| {
            metrics
                .mesh_handshakes
                .get_or_create(&MeshHandshakeLabel {
                    side: "client",
                    result,
                })
                .clone()
        };
        Ok(Arc::new(Self {
            identity,
            server: Arc::new(server),
            client_ok: counter("ok"),
            client_failed: counter("error"),
            outbound: metrics.outbound_mtls_connections.clone(),
        }))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.server.clone())
    }

    /// What it takes to dial the proxy of an endpoint whose identity is `expected`.
    pub fn client(&self, expected: &str) -> Result<MeshClient, rustls::Error> {
        let base = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerServer {
                identity: self.identity.clone(),
                expected: expected.to_string(),
            }))
            .with_client_cert_resolver(Arc::new(CurrentCert(self.identity.clone())));
        let with = |alpn: &[u8]| {
            let mut config = base.clone();
            config.alpn_protocols = vec![alpn.to_vec()];
            Arc::new(config)
        };
        let connections = self
            .outbound
            .get_or_create(&OutboundLabel {
                server_id: expected.to_string(),
            })
            .clone();
        Ok(MeshClient {
            connections,
            ok: self.client_ok.clone(),
            failed: self.client_failed.clone(),
            expected: expected.into(),
            h2: with(ALPN_H2),
            http1: with(ALPN_HTTP1),
            opaque: with(ALPN_OPAQUE),
        })
    }
}

/// What a connection to one endpoint's proxy carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    Http2,
    Http1,
    Opaque,
}

/// Dials one peer proxy (an endpoint with an identity) over mesh TLS. The configs
/// are the endpoint's for its life, so TLS sessions resume across its connections.
pub struct MeshClient {
    pub expected: Box<str>,
    /// Connections to peers with this identity (handshakes that succeeded).
    connections: Counter,
    ok: Counter,
    failed: Counter,
    h2: Arc<ClientConfig>,
    http1: Arc<ClientConfig>,
    opaque: Arc<ClientConfig>,
}

pub type MeshStream = tokio_rustls::client::TlsStream<Counted>;

impl MeshClient {
    /// TLS over `tcp` (connected to `addr`), for `carries`.
    pub async fn handshake(
        &self,
        tcp: Counted,
        addr: SocketAddr,
        carries: Carries,
    ) -> std::io::Result<MeshStream> {
        let config = match carries {
            Carries::Http2 => &self.h2,
            Carries::Http1 => &self.http1,
            Carries::Opaque => &self.opaque,
        };
        // Certificates name identities, not addresses; the verifier checks the
        // identity. An IP address as the name also keeps SNI out of the hello.
        let name = ServerName::IpAddress(addr.ip().into());
        let result = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
        )
        .await;
        match &result {
            Ok(Ok(_)) => {
                self.ok.inc();
                self.connections.inc()
            }
            _ => self.failed.inc(),
        };
        result
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("mesh TLS handshake with {addr} timed out"),
                )
            })?
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("mesh TLS with {addr} ({}): {}", self.expected, reason(&e)),
                )
            })
    }
}

/// Why a handshake failed, for a person: rustls shows a certificate error of ours
/// (a wrong identity) with its Debug form, so that one is told in its own words.
fn reason(error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {other}")
        }
        _ => error.to_string(),
    }
}

/// How long a mesh handshake may take.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
pub(crate) mod tests {
    use std::time::SystemTime;

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::identity::{Certified, Roots};

    /// A root, and identities it certifies (as the control plane's issuer would).
    pub(crate) struct TestCa {
        pub pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    impl TestCa {
        pub(crate) fn new() -> Self {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Self {
                pem: cert.pem(),
                issuer: Issuer::new(params, key),
            }
        }

        pub(crate) fn identity(&self, name: &str) -> Arc<Identity> {
            let identity =
                Identity::new(name.into(), Roots::from_pem(self.pem.as_bytes()).unwrap());
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::URI(name.try_into().unwrap())];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let signing = rustls::crypto::ring::default_provider()
                .key_provider
                .load_private_key(der)
                .unwrap();
            identity.set_certified(Certified {
                key: Arc::new(CertifiedKey::new(
                    vec![CertificateDer::from(cert.der().to_vec())],
                    signing,
                )),
                valid_until: SystemTime::now() + std::time::Duration::from_secs(3600),
                issued_at: SystemTime::now(),
            });
            identity
        }
    }

    const WEB: &str = "spiffe://cluster.local/ns/default/sa/web";
    const API: &str = "spiffe://cluster.local/ns/default/sa/api";

    /// One mesh connection from `client` to `server` expecting `expected`; the
    /// identity the server saw, or the client's error.
    async fn connect(
        client: Arc<Identity>,
        server: Arc<Identity>,
        expected: &str,
    ) -> Result<String, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = MeshTls::new(server, &ProxyMetrics::default())
            .unwrap()
            .acceptor();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            tls.write_all(&byte).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(crate::identity::verify::identity_of(&peer).unwrap())
        });
        let dialer = MeshTls::new(client, &ProxyMetrics::default())
            .unwrap()
            .client(expected)
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tcp = Counted::new(tcp, Default::default());
        let mut tls = dialer
            .handshake(tcp, addr, Carries::Opaque)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_OPAQUE));
        tls.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        served.await.unwrap()
    }

    #[tokio::test]
    async fn proxies_know_each_other_over_mesh_tls() {
        let ca = TestCa::new();
        let seen = connect(ca.identity(WEB), ca.identity(API), API)
            .await
            .unwrap();
        assert_eq!(seen, WEB, "the server proxy learns the client's identity");
    }

    #[tokio::test]
    async fn a_server_with_another_identity_is_refused() {
        let ca = TestCa::new();
        let error = connect(ca.identity(WEB), ca.identity(WEB), API)
            .await
            .unwrap_err();
        assert!(
            error.contains(&format!("names {WEB:?}, not the expected {API:?}")),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_peer_from_another_root_is_refused_both_ways() {
        let (ours, theirs) = (TestCa::new(), TestCa::new());
        let error = connect(ours.identity(WEB), theirs.identity(API), API)
            .await
            .unwrap_err();
        // Both test roots have the same name, so the chain is tried and fails on
        // the signature; a root of another name fails as an unknown issuer.
        assert!(
            error.contains("BadSignature") || error.contains("UnknownIssuer"),
            "{error}"
        );
        // A client from another mesh: the server refuses its certificate.
        assert!(
            connect(theirs.identity(WEB), ours.identity(API), API)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_new_root_is_trusted_without_rebuilding_anything() {
        let (old, new) = (TestCa::new(), TestCa::new());
        let client = old.identity(WEB);
        let server = new.identity(API);
        assert!(connect(client.clone(), server.clone(), API).await.is_err());
        // Rotation: both roots trusted on both sides.
        let both = format!("{}{}", old.pem, new.pem);
        client.set_roots(Roots::from_pem(both.as_bytes()).unwrap());
        server.set_roots(Roots::from_pem(both.as_bytes()).unwrap());
        assert_eq!(connect(client, server, API).await.unwrap(), WEB);
    }
}
