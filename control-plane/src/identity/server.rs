//! The identity endpoint: gRPC over TLS (1.3 and 1.2, ALPN `h2`), with a serving
//! certificate the issuer signs, so proxies verify it against the same trust roots as
//! everything else in the mesh, for the name `--identity-server-name`.
//!
//! tonic here is built without its TLS feature: connections are accepted here, the
//! rustls handshake is done here (each within [`HANDSHAKE_TIMEOUT`], so a client that
//! speaks nonsense, or nothing, holds no task for long), and the TLS streams are
//! handed to tonic's `serve_with_incoming` through [`TlsConn`].
//!
//! The serving certificate is issued again when the issuer changes, and a third of
//! its lifetime before it ends; connections already open keep theirs.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rcgen::KeyPair;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tandem_common::Shutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use tandem_proto::identity::v1::identity_server::IdentityServer;

use super::authority::Authority;
use super::material::{now, when};
use super::review::Reviewer;
use super::service::IdentityService;
use super::sign::{self, Usage};
use super::store::Current;
use crate::injection::tls::CertStore;

/// A TLS handshake must be done within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The serving certificate's lifetime.
pub const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Handshakes under way at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// A TLS connection, as tonic takes it.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The TLS configuration: the certificate `certs` holds (none until the issuer is
/// read: handshakes fail until then).
pub fn tls_config(certs: Arc<CertStore>) -> rustls::ServerConfig {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .expect("ring supports TLS 1.3 and 1.2")
    .with_no_client_auth()
    .with_cert_resolver(certs);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    tls
}

/// Accepts connections and does their handshakes, forever; the TLS streams go to
/// `tx` (tonic's incoming stream).
async fn accept(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<io::Result<TlsConn>>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("identity: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: Some(peer),
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
            drop(permit);
            match handshake {
                Ok(Ok(stream)) => {
                    let _ = tx.send(Ok(TlsConn { stream, info })).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "identity: TLS handshake failed: {e}"),
                Err(_) => {
                    tracing::debug!(%peer, "identity: no TLS handshake within {HANDSHAKE_TIMEOUT:?}")
                }
            }
        });
    }
}

/// Serves `service` on `listener` until `shutdown`.
pub async fn serve<R: Reviewer>(
    listener: TcpListener,
    certs: Arc<CertStore>,
    service: IdentityServer<IdentityService<R>>,
    shutdown: Shutdown,
) {
    let acceptor = TlsAcceptor::from(Arc::new(tls_config(certs)));
    let (tx, rx) = mpsc::channel(64);
    let accepting = tokio::spawn(accept(listener, acceptor, tx));
    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx);
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // A call is a TokenReview and a signature; one that takes longer is stuck.
        .timeout(Duration::from_secs(30))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.wait())
        .await;
    accepting.abort();
    if let Err(e) = result {
        tracing::error!("identity: the server failed: {e}");
    }
}

/// Serves a new certificate for `names` (DNS names or IP addresses) from this
/// issuer; when it ends.
fn issue_serving_certificate(
    authority: &Authority,
    names: &[String],
    certs: &CertStore,
) -> Result<i64, String> {
    let key = KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let sans = rcgen::CertificateParams::new(names.to_vec())
        .map_err(|e| format!("the serving certificate's names: {e}"))?
        .subject_alt_names;
    let leaf = sign::leaf(
        &authority.issuer,
        &key,
        sans,
        Usage::Server,
        SERVING_LIFETIME,
    )?;
    let mut chain = vec![leaf.der];
    chain.extend(authority.issuer.chain.iter().cloned());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    certs.set(chain, &key)?;
    Ok(leaf.not_after)
}

/// Keeps the serving certificate current: issued when the issuer changes and a third
/// of its lifetime before it ends, forever.
pub async fn keep_certificate(mut current: Current, names: Vec<String>, certs: Arc<CertStore>) {
    // The issuer's chain the certificate was signed under, and its end.
    let mut served: Option<(Vec<rustls::pki_types::CertificateDer<'static>>, i64)> = None;
    loop {
        let authority = current.borrow_and_update().clone();
        let mut wait = Duration::from_secs(60);
        if let Some(authority) = authority {
            let renew_at = |not_after: i64| not_after - SERVING_LIFETIME.as_secs() as i64 / 3;
            let due = match &served {
                // New trust roots alone change nothing the certificate says.
                Some((chain, not_after)) => {
                    *chain != authority.issuer.chain || now() >= renew_at(*not_after)
                }
                None => true,
            };
            if due {
                match issue_serving_certificate(&authority, &names, &certs) {
                    Ok(not_after) => {
                        tracing::info!(names = %names.join(","), until = %when(not_after), "identity: serving certificate issued");
                        served = Some((authority.issuer.chain.clone(), not_after));
                    }
                    Err(e) => {
                        tracing::warn!(
                            "identity: cannot issue the serving certificate: {e}; trying again in 10s"
                        );
                        wait = Duration::from_secs(10);
                    }
                }
            }
            if let Some((_, not_after)) = &served {
                let left = (renew_at(*not_after) - now()).max(1) as u64;
                wait = wait.min(Duration::from_secs(left));
            }
        }
        // Woken by a new issuer, or when the certificate is due.
        if let Ok(Err(_)) = tokio::time::timeout(wait, current.changed()).await {
            return; // The store is gone: the process is stopping.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::material::tests::authority;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};

    #[test]
    fn the_serving_certificate_verifies_for_its_names() {
        let (_, authority) = authority();
        let names = vec![
            "tandem-identity.tandem-system.svc".to_string(),
            "127.0.0.1".to_string(),
        ];
        let store = CertStore::default();
        let not_after = issue_serving_certificate(&authority, &names, &store).unwrap();
        assert!(not_after - now() <= SERVING_LIFETIME.as_secs() as i64);
        let chain = store.chain().expect("a certificate is served");
        assert_eq!(chain.len(), 2, "leaf and issuer");
        let mut roots = rustls::RootCertStore::empty();
        for c in &authority.roots.certs {
            roots.add(c.clone()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        for name in &names {
            let name = ServerName::try_from(name.as_str()).unwrap();
            verifier
                .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
                .unwrap();
        }
        let other = ServerName::try_from("elsewhere.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&chain[0], &chain[1..], &other, &[], UnixTime::now())
                .is_err()
        );
    }
}
