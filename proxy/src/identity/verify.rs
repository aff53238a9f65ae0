//! Checking a peer proxy: its chain ends at one of the mesh's roots (which may
//! change while the proxy runs: read at each handshake), and its certificate names
//! the identity expected of it (a URI SAN). rustls' own verifiers check DNS names and
//! fixed roots, so the mesh has its own, with webpki doing the chain.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use super::Identity;

/// The signature algorithms peers may use: ring's, read once (making the provider
/// allocates).
fn algorithms() -> WebPkiSupportedAlgorithms {
    static ALGORITHMS: std::sync::LazyLock<WebPkiSupportedAlgorithms> =
        std::sync::LazyLock::new(|| {
            rustls::crypto::ring::default_provider().signature_verification_algorithms
        });
    *ALGORITHMS
}

/// The handshake-signature checks both verifiers share: TLS 1.3 only, ring's
/// algorithms.
macro_rules! tls13_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::General("the mesh speaks TLS 1.3 only".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

/// Verifies `end_entity` (with `intermediates`) against the identity's current
/// roots for `usage`; returns the identity it names (its one SPIFFE URI SAN).
pub fn verify_chain<'a>(
    identity: &Identity,
    end_entity: &'a CertificateDer<'a>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<String, Error> {
    let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|e| {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    })?;
    let roots = identity.roots();
    cert.verify_for_usage(
        algorithms().all,
        &roots.anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(webpki_error)?;
    peer_identity(&cert).ok_or_else(|| {
        Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
            NoIdentity,
        ))))
    })
}

/// The SPIFFE identity a certificate names.
fn peer_identity(cert: &webpki::EndEntityCert<'_>) -> Option<String> {
    cert.valid_uri_names()
        .find(|uri| uri.starts_with("spiffe://"))
        .map(str::to_string)
}

/// The identity in a peer's (already verified) leaf certificate.
pub fn identity_of(leaf: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    peer_identity(&cert)
}

#[derive(Debug, thiserror::Error)]
#[error("the certificate names no spiffe:// identity")]
struct NoIdentity;

#[derive(Debug, thiserror::Error)]
#[error("the certificate names {presented:?}, not the expected {expected:?}")]
struct WrongIdentity {
    presented: String,
    expected: String,
}

fn webpki_error(error: webpki::Error) -> Error {
    use webpki::Error as E;
    let e = match error {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    Error::InvalidCertificate(e)
}

/// A client proxy's check of the server proxy it dialled: the chain, then that the
/// certificate names `expected` (the identity discovery gave the endpoint). The
/// server name rustls passes is the endpoint's address, which certificates do not
/// carry: the identity is what is checked.
#[derive(Debug)]
pub struct PeerServer {
    pub identity: Arc<Identity>,
    pub expected: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name())
            .finish()
    }
}

impl ServerCertVerifier for PeerServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let presented = verify_chain(
            &self.identity,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if presented != self.expected {
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongIdentity {
                    presented,
                    expected: self.expected.clone(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    tls13_signatures!();
}

/// A server proxy's check of a client proxy: a chain to the roots with a mesh
/// identity in it; which identity is the caller's to read from the connection.
#[derive(Debug)]
pub struct PeerClient {
    pub identity: Arc<Identity>,
}

impl ClientCertVerifier for PeerClient {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_chain(
            &self.identity,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_signatures!();
}
