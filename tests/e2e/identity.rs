//! Workload identity in the real cluster: the control plane's identity endpoint
//! (`tandem.identity.v1.Identity/Certify`) run as `deploy/` runs it (its rights, its
//! namespace's Secret and ConfigMap), tokens minted by the API server's TokenRequest
//! and checked by its TokenReview, and the endpoint reached over TLS as a proxy
//! reaches it: its certificate checked against the trust roots, for 127.0.0.1.
//!
//! Every test here runs a control plane that copies its trust roots into every
//! namespace labelled for injection: they hold [`CLUSTER_WIDE`], as the injection
//! tests do, so no two control planes copy different roots at once.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};
use tandem::process::Spawned;
use tandem_proto::identity::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::cluster::{CLUSTER_STEP, Cluster, Namespace, cluster};
use crate::injection::{
    CLUSTER_WIDE, control_plane_kubeconfig, delete_cluster_scoped, start_control_plane,
};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(300);
/// The certificates' lifetime in these tests (the control plane's `--identity-lifetime`).
const LIFETIME: u64 = 30;

/// A control plane of `ns` with the identity endpoint on 127.0.0.1 (its certificate
/// for that address), certificates of [`LIFETIME`], and the Secret and ConfigMap read
/// again every second. The ClusterRole it is given goes when this is dropped.
struct Issuer {
    cp: Spawned,
    kubeconfig: std::path::PathBuf,
    namespace: String,
    role: String,
    cluster: &'static Cluster,
}

impl Issuer {
    async fn start(ns: &Namespace) -> Issuer {
        let role = format!("tandem-identity-{}", ns.name());
        let kubeconfig = control_plane_kubeconfig(ns, &role).await;
        let cp = Self::spawn(&kubeconfig, ns.name(), &role).await;
        Issuer {
            cp,
            kubeconfig,
            namespace: ns.name().to_string(),
            role,
            cluster: ns.cluster(),
        }
    }

    async fn spawn(kubeconfig: &Path, namespace: &str, role: &str) -> Spawned {
        let lifetime = format!("{LIFETIME}s");
        start_control_plane(
            kubeconfig,
            namespace,
            role,
            "off",
            "127.0.0.1:0",
            "127.0.0.1:0",
            &[
                "--identity-cert-san",
                "127.0.0.1",
                "--identity-lifetime",
                &lifetime,
                "--identity-refresh",
                "1s",
            ],
        )
        .await
    }

    /// Another replica (or this one again, after [`Issuer::stop`]).
    async fn replica(&self) -> Spawned {
        Self::spawn(&self.kubeconfig, &self.namespace, &self.role).await
    }

    fn endpoint(&self) -> SocketAddr {
        self.cp.addr("identity")
    }

    async fn metric(&self, name: &str, labels: &str) -> f64 {
        crate::injection::metric(self.cp.addr("admin"), name, labels)
            .await
            .unwrap_or_default()
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        delete_cluster_scoped(
            self.cluster,
            &["clusterrolebinding", "clusterrole"],
            &self.role,
        );
    }
}

/// A token the API server mints for ServiceAccount `sa` of `ns`, for `audience`.
async fn token(ns: &Namespace, sa: &str, audience: &str) -> String {
    ns.kubectl(&[
        "create",
        "token",
        sa,
        "--audience",
        audience,
        "--duration",
        "10m",
    ])
    .await
    .trim()
    .to_string()
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token as the API server would have minted it for `sa` an hour ago, with
/// audience `tandem`, that expired half an hour ago: signed with the cluster's own
/// ServiceAccount key (TokenRequest refuses lifetimes under 10 minutes, and a token
/// that really expired is what is wanted).
async fn expired_token(ns: &Namespace, sa: &str) -> String {
    let pki = ns.cluster().dir().join("pki");
    let uid = ns
        .cluster()
        .kubectl_ok(
            &[
                "-n",
                ns.name(),
                "get",
                "serviceaccount",
                sa,
                "-o",
                "jsonpath={.metadata.uid}",
            ],
            None,
        )
        .await
        .stdout;
    // The key id as the API server derives it: SHA-256 of the public key's DER.
    let public = std::fs::read(pki.join("sa.pub")).expect("the cluster's sa.pub");
    let public = rustls::pki_types::SubjectPublicKeyInfoDer::from_pem_slice(&public)
        .expect("sa.pub is a public key in PEM");
    let kid = b64url(ring::digest::digest(&ring::digest::SHA256, &public).as_ref());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = json!({"alg": "RS256", "kid": kid});
    let claims = json!({
        "aud": ["tandem"],
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": format!("system:serviceaccount:{}:{sa}", ns.name()),
        "iat": now - 3600, "nbf": now - 3600, "exp": now - 1800,
        "jti": "tandem-e2e-expired",
        "kubernetes.io": {"namespace": ns.name(), "serviceaccount": {"name": sa, "uid": uid}}
    });
    let signed = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.join("sa.key"))
        .expect("the cluster's sa.key");
    let key = match &key {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => {
            ring::signature::RsaKeyPair::from_pkcs8(k.secret_pkcs8_der())
        }
        rustls::pki_types::PrivateKeyDer::Pkcs1(k) => {
            ring::signature::RsaKeyPair::from_der(k.secret_pkcs1_der())
        }
        _ => panic!("sa.key is not an RSA key"),
    }
    .expect("sa.key is an RSA key ring can use");
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signed.as_bytes(),
        &mut signature,
    )
    .expect("RS256");
    format!("{signed}.{}", b64url(&signature))
}

fn roots_of(pem: &str) -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.expect("PEM")).expect("a usable root");
    }
    roots
}

fn client_tls(
    roots_pem: &str,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots_of(roots_pem))
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    tls
}

/// A client of the identity endpoint as a proxy makes it: TLS, the server's
/// certificate checked against `roots_pem` for 127.0.0.1, ALPN h2.
async fn client(
    addr: SocketAddr,
    roots_pem: &str,
) -> Result<pb::identity_client::IdentityClient<tonic::transport::Channel>, String> {
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_tls(
        roots_pem,
        &[&rustls::version::TLS13],
    )));
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = ServerName::try_from("127.0.0.1").expect("an address");
            let stream = tls.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = tonic::transport::Endpoint::from_static("http://identity.invalid")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(20))
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("cannot connect to the identity endpoint: {e:?}"))?;
    Ok(pb::identity_client::IdentityClient::new(channel))
}

/// The trust roots ConfigMap of `ns` as it is now, if it exists.
async fn trust_roots_object(ns: &Namespace) -> Option<Value> {
    let said = ns
        .cluster()
        .run_kubectl(
            &[
                "-n",
                ns.name(),
                "get",
                "configmap",
                "tandem-trust-roots",
                "-o",
                "json",
            ],
            None,
        )
        .await;
    serde_json::from_str(&said.stdout).ok()
}

/// The ConfigMap's bundle, once the control plane has made it.
async fn trust_roots(ns: &Namespace) -> String {
    eventually(CLUSTER_STEP, "the trust roots ConfigMap", || async {
        let object = trust_roots_object(ns).await?;
        object["data"]["ca-bundle.crt"].as_str().map(str::to_string)
    })
    .await
}

/// A client, once the endpoint serves a certificate the roots vouch for.
async fn connected(
    issuer: &Issuer,
    roots_pem: &str,
) -> pb::identity_client::IdentityClient<tonic::transport::Channel> {
    eventually(CLUSTER_STEP, "the identity endpoint to serve", || async {
        client(issuer.endpoint(), roots_pem).await.ok()
    })
    .await
}

fn identity(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// A CSR for a new P-256 key with these URI SANs.
fn csr(uris: &[&str]) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn request(identity: &str, token: &str, csr: Vec<u8>) -> pb::CertifyRequest {
    pb::CertifyRequest {
        identity: identity.to_string(),
        token: token.to_string(),
        certificate_signing_request: csr,
    }
}

/// Checks an issued certificate as a peer proxy would: the chain (leaf and the
/// response's intermediates) up to a root of the response's own trust roots, for
/// client authentication, now; then that it names exactly `identity`.
fn assert_good(response: &pb::CertifyResponse, identity: &str) {
    let leaf = CertificateDer::from(response.leaf_certificate.clone());
    let intermediates: Vec<CertificateDer<'static>> = response
        .intermediate_certificates
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots_of(&response.trust_roots_pem)),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&leaf, &intermediates, UnixTime::now())
        .expect("the leaf chains to the response's trust roots");
    let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
    let sans = cert.subject_alternative_name().unwrap().expect("SANs");
    assert_eq!(sans.value.general_names, [GeneralName::URI(identity)]);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && eku.server_auth);
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(
        cert.validity().not_after.timestamp(),
        response.valid_until_unix_seconds
    );
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let left = response.valid_until_unix_seconds - now;
    assert!(
        (LIFETIME as i64 - 10..=LIFETIME as i64).contains(&left),
        "{left}s left"
    );
}

/// The issuer (first intermediate) of a response, PEM-comparable DER.
fn issuer_of(response: &pb::CertifyResponse) -> Vec<u8> {
    response.intermediate_certificates[0].clone()
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect()
}

async fn certify(
    client: &mut pb::identity_client::IdentityClient<tonic::transport::Channel>,
    request: pb::CertifyRequest,
) -> Result<pb::CertifyResponse, tonic::Status> {
    client.certify(request).await.map(|r| r.into_inner())
}

fn refused(
    result: Result<pb::CertifyResponse, tonic::Status>,
    code: tonic::Code,
    says: &str,
) -> String {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{:?} should say {says:?}",
        status.message()
    );
    status.message().to_string()
}

#[tokio::test]
async fn certify_with_real_tokens_and_every_refusal_counted() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("identity").await;
        for sa in ["a", "b"] {
            ns.kubectl(&["create", "serviceaccount", sa]).await;
        }
        let issuer = Issuer::start(&ns).await;
        let roots = trust_roots(&ns).await;
        let mut c = connected(&issuer, &roots).await;
        let (id_a, id_b) = (identity(ns.name(), "a"), identity(ns.name(), "b"));

        // A's token, A's identity: a certificate that names exactly it.
        let token_a = token(&ns, "a", "tandem").await;
        let good = certify(&mut c, request(&id_a, &token_a, csr(&[&id_a])))
            .await
            .expect("a certificate for A");
        assert_good(&good, &id_a);
        assert_eq!(pem_certs(&good.trust_roots_pem), pem_certs(&roots));

        // Each refusal, with its reason.
        let token_b = token(&ns, "b", "tandem").await;
        let other_audience = token(&ns, "a", "someone-else").await;
        let expired = expired_token(&ns, "a").await;
        let said = refused(
            certify(&mut c, request(&id_a, &token_b, csr(&[&id_a]))).await,
            tonic::Code::PermissionDenied,
            &format!("the token is ServiceAccount {}/b's", ns.name()),
        );
        assert!(said.contains(&id_a), "{said}");
        refused(
            certify(&mut c, request(&id_a, &other_audience, csr(&[&id_a]))).await,
            tonic::Code::PermissionDenied,
            "audience",
        );
        let said = refused(
            certify(&mut c, request(&id_a, &expired, csr(&[&id_a]))).await,
            tonic::Code::PermissionDenied,
            "the API server did not authenticate the token",
        );
        assert!(said.contains("expired"), "the API server says why: {said}");
        refused(
            certify(&mut c, request(&id_a, "not-a-token", csr(&[&id_a]))).await,
            tonic::Code::PermissionDenied,
            "did not authenticate the token",
        );
        refused(
            certify(
                &mut c,
                request(&id_a, &token_a, b"\x30\x03garbage".to_vec()),
            )
            .await,
            tonic::Code::InvalidArgument,
            "the CSR is not a PKCS#10 request",
        );
        refused(
            certify(&mut c, request(&id_a, &token_a, csr(&[&id_b]))).await,
            tonic::Code::PermissionDenied,
            &format!("the CSR asks for {id_b:?}"),
        );
        refused(
            certify(
                &mut c,
                request("spiffe://elsewhere/ns/x/sa/a", &token_a, csr(&[&id_a])),
            )
            .await,
            tonic::Code::InvalidArgument,
            "trust domain",
        );

        // Counted, by reason.
        let refusals = "tandem_control_plane_certificate_refusals_total";
        for (reason, count) in [
            ("token_invalid", 2.0),
            ("wrong_audience", 1.0),
            ("identity_mismatch", 2.0),
            ("bad_csr", 1.0),
            ("bad_identity", 1.0),
            ("api_unavailable", 0.0),
        ] {
            assert_eq!(
                issuer
                    .metric(refusals, &format!("reason=\"{reason}\""))
                    .await,
                count,
                "{reason}"
            );
        }
        assert_eq!(
            issuer
                .metric("tandem_control_plane_certificates_issued_total", "")
                .await,
            1.0
        );

        // The endpoint, as a client that speaks nonsense finds it: cut off at once
        // (not after the handshake timeout), and serving the next one.
        for nonsense in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5][..],
        ] {
            let mut tcp = tokio::net::TcpStream::connect(issuer.endpoint())
                .await
                .unwrap();
            tcp.write_all(nonsense).await.unwrap();
            let mut buf = vec![0; 4096];
            let closed = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {} // a TLS alert, then the close
                    }
                }
            })
            .await;
            assert!(closed.is_ok(), "the connection is closed");
        }
        // TLS 1.2 is served too, with h2.
        let tls12 = tokio_rustls::TlsConnector::from(Arc::new(client_tls(
            &roots,
            &[&rustls::version::TLS12],
        )));
        let tcp = tokio::net::TcpStream::connect(issuer.endpoint())
            .await
            .unwrap();
        let stream = tls12
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await
            .expect("a TLS 1.2 handshake");
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        // Not for another name.
        let tcp = tokio::net::TcpStream::connect(issuer.endpoint())
            .await
            .unwrap();
        let other = tokio_rustls::TlsConnector::from(Arc::new(client_tls(
            &roots,
            &[&rustls::version::TLS13],
        )))
        .connect(ServerName::try_from("127.0.0.2").unwrap(), tcp)
        .await;
        assert!(
            other.is_err(),
            "the certificate is for 127.0.0.1 (and its service names) only"
        );
        let mut fresh = client(issuer.endpoint(), &roots).await.unwrap();
        let again = certify(&mut fresh, request(&id_a, &token_a, csr(&[&id_a])))
            .await
            .unwrap();
        assert_good(&again, &id_a);
        assert_ne!(again.leaf_certificate, good.leaf_certificate);

        // No token reached the log, whole or in part (its signature).
        let log = issuer.cp.log_text();
        for t in [&token_a, &token_b, &other_audience, &expired] {
            let signature = t.rsplit('.').next().unwrap();
            assert!(!log.contains(signature), "a token in the log");
        }
        assert!(
            log.contains("identity: refused a certificate"),
            "refusals are logged"
        );
    })
    .await
}

/// The issuer Secret's data (base64) and resourceVersion.
async fn secret(ns: &Namespace) -> Option<Value> {
    let said = ns
        .cluster()
        .run_kubectl(
            &[
                "-n",
                ns.name(),
                "get",
                "secret",
                "tandem-identity-issuer",
                "-o",
                "json",
            ],
            None,
        )
        .await;
    serde_json::from_str(&said.stdout).ok()
}

fn data(secret: &Value, key: &str) -> String {
    let b64 = secret["data"][key].as_str().unwrap_or_default();
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn a_missing_issuer_is_made_once_by_one_replica_and_kept_across_restarts() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("identity-made").await;
        ns.kubectl(&["create", "serviceaccount", "web"]).await;
        // Two replicas start together on an empty namespace: one Secret, one root.
        let mut issuer = Issuer::start(&ns).await;
        let mut second = issuer.replica().await;
        let made = eventually(CLUSTER_STEP, "the issuer Secret", || secret(&ns)).await;
        assert_eq!(made["type"], "kubernetes.io/tls");
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(data(&made, key).starts_with("-----BEGIN"), "{key}");
        }
        let roots = trust_roots(&ns).await;
        assert_eq!(pem_certs(&roots), pem_certs(&data(&made, "ca.crt")));
        let id = identity(ns.name(), "web");
        let token = token(&ns, "web", "tandem").await;
        for endpoint in [issuer.endpoint(), second.addr("identity")] {
            let mut c = eventually(CLUSTER_STEP, "a replica to serve", || async {
                client(endpoint, &roots).await.ok()
            })
            .await;
            let r = certify(&mut c, request(&id, &token, csr(&[&id])))
                .await
                .unwrap();
            assert_good(&r, &id);
            assert_eq!(pem_certs(&r.trust_roots_pem), pem_certs(&roots));
            assert_eq!(
                issuer_of(&r),
                pem_certs(&data(&made, "tls.crt"))[0],
                "both replicas sign with the one issuer"
            );
        }
        let logs = format!("{}{}", issuer.cp.log_text(), second.log_text());
        assert!(
            logs.contains("production clusters should bring their own issuer"),
            "the log says to bring an issuer"
        );
        assert!(!logs.contains("BEGIN PRIVATE KEY"), "no key in the log");

        // Both stopped and one started again: the same Secret, untouched.
        second.kill().await;
        issuer.cp.kill().await;
        issuer.cp = issuer.replica().await;
        let roots_after = trust_roots(&ns).await;
        assert_eq!(roots_after, roots);
        let mut c = connected(&issuer, &roots).await;
        let r = certify(&mut c, request(&id, &token, csr(&[&id])))
            .await
            .unwrap();
        assert_good(&r, &id);
        assert_eq!(issuer_of(&r), pem_certs(&data(&made, "tls.crt"))[0]);
        let kept = secret(&ns).await.unwrap();
        assert_eq!(
            kept["metadata"]["resourceVersion"],
            made["metadata"]["resourceVersion"]
        );
    })
    .await
}

/// A root and an issuer under it, made by openssl as cert-manager would store them:
/// an ECDSA root, an RSA issuer whose key is PKCS#1 (cert-manager's default encoding).
/// (root PEM, issuer certificate PEM, issuer key PEM).
pub(crate) async fn openssl_issuer(dir: &TestDir, name: &str) -> (String, String, String) {
    let path = |f: &str| dir.path(&format!("{name}-{f}")).display().to_string();
    let ext = path("issuer.ext");
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    let steps: Vec<Vec<String>> = vec![
        vec![
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
            &path("root.key"),
        ],
        vec![
            "req",
            "-x509",
            "-new",
            "-key",
            &path("root.key"),
            "-subj",
            &format!("/O=Example/CN={name} root"),
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &path("root.crt"),
        ],
        vec![
            "genrsa",
            "-traditional",
            "-out",
            &path("issuer.key"),
            "2048",
        ],
        vec![
            "req",
            "-new",
            "-key",
            &path("issuer.key"),
            "-subj",
            &format!("/O=Example/CN={name} issuer"),
            "-out",
            &path("issuer.csr"),
        ],
        vec![
            "x509",
            "-req",
            "-in",
            &path("issuer.csr"),
            "-CA",
            &path("root.crt"),
            "-CAkey",
            &path("root.key"),
            "-CAcreateserial",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            &ext,
            "-out",
            &path("issuer.crt"),
        ],
    ]
    .into_iter()
    .map(|v| v.into_iter().map(str::to_string).collect())
    .collect();
    for args in steps {
        let out = tokio::process::Command::new("openssl")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let read = |f: &str| std::fs::read_to_string(path(f)).unwrap();
    let key = read("issuer.key");
    assert!(
        key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "PKCS#1, as cert-manager writes it"
    );
    (read("root.crt"), read("issuer.crt"), key)
}

/// The issuer Secret in cert-manager's layout.
pub(crate) fn issuer_secret(tls_crt: &str, tls_key: &str, ca_crt: &str) -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "tandem-identity-issuer",
                     "annotations": {"cert-manager.io/issuer-name": "mesh-ca"}},
        "data": {"tls.crt": b64(tls_crt), "tls.key": b64(tls_key), "ca.crt": b64(ca_crt)}
    })
}

pub(crate) fn trust_roots_map(bundle: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tandem-trust-roots"},
           "data": {"ca-bundle.crt": bundle}})
}

/// Certifies until `check` holds for the response (the control plane reads the
/// Secret and ConfigMap again every second); returns that response.
async fn certify_until(
    client: &mut pb::identity_client::IdentityClient<tonic::transport::Channel>,
    id: &str,
    token: &str,
    what: &str,
    check: impl Fn(&pb::CertifyResponse) -> bool,
) -> pb::CertifyResponse {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = certify(client, request(id, token, csr(&[id])))
            .await
            .expect("a certificate");
        if check(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_users_issuer_is_used_and_a_root_rotation_needs_no_restart() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let ns = cluster.namespace("identity-rotate").await;
        let apps = cluster.namespace("identity-apps").await;
        ns.kubectl(&["create", "serviceaccount", "web"]).await;
        let dir = TestDir::new("identity-rotate");
        let (root1, issuer1, key1) = openssl_issuer(&dir, "one").await;
        let (root2, issuer2, key2) = openssl_issuer(&dir, "two").await;

        // Brought by the user before the control plane starts: used as it is, and the
        // trust roots are made from its ca.crt.
        ns.apply(&[issuer_secret(&issuer1, &key1, &root1)]).await;
        let issuer = Issuer::start(&ns).await;
        let roots = trust_roots(&ns).await;
        assert_eq!(pem_certs(&roots), pem_certs(&root1));
        let id = identity(ns.name(), "web");
        let token = token(&ns, "web", "tandem").await;
        let mut c = connected(&issuer, &roots).await;
        let r = certify(&mut c, request(&id, &token, csr(&[&id])))
            .await
            .unwrap();
        assert_good(&r, &id);
        assert_eq!(
            issuer_of(&r),
            pem_certs(&issuer1)[0],
            "signed by the user's issuer"
        );
        assert!(
            !issuer
                .cp
                .log_text()
                .contains("production clusters should bring"),
            "no advice for a brought issuer"
        );

        // A namespace labelled for injection gets a copy of the roots.
        apps.kubectl(&[
            "label",
            "namespace",
            apps.name(),
            "tandem.io/inject=enabled",
        ])
        .await;
        let copy = |want: String| {
            let apps = &apps;
            async move {
                eventually(CLUSTER_STEP, "the trust roots copy", || async {
                    let object = trust_roots_object(apps).await?;
                    (object["data"]["ca-bundle.crt"].as_str() == Some(want.as_str()))
                        .then_some(object)
                })
                .await
            }
        };
        let copied = copy(roots.clone()).await;
        assert_eq!(
            copied["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "tandem-control-plane"
        );

        // 1. The new root trusted beside the old one: handed out, still the old issuer.
        let both = format!("{root1}{root2}");
        ns.apply(&[trust_roots_map(&both)]).await;
        let r = certify_until(&mut c, &id, &token, "both roots handed out", |r| {
            pem_certs(&r.trust_roots_pem).len() == 2
        })
        .await;
        assert_eq!(issuer_of(&r), pem_certs(&issuer1)[0]);
        assert_good(&r, &id);
        copy(both.clone()).await;

        // An unusable Secret meanwhile: said in the log, and the issuer in use stays.
        ns.apply(&[issuer_secret(&issuer2, &key1, &root2)]).await;
        eventually(
            CLUSTER_STEP,
            "the log to say why the Secret is not used",
            || async {
                issuer
                    .cp
                    .log_text()
                    .contains("tls.key is not the key of tls.crt's first certificate")
                    .then_some(())
            },
        )
        .await;
        let r = certify(&mut c, request(&id, &token, csr(&[&id])))
            .await
            .unwrap();
        assert_eq!(issuer_of(&r), pem_certs(&issuer1)[0]);

        // 2. The issuer under the new root: new certificates come from it.
        ns.apply(&[issuer_secret(&issuer2, &key2, &root2)]).await;
        let r = certify_until(&mut c, &id, &token, "the new issuer", |r| {
            issuer_of(r) == pem_certs(&issuer2)[0]
        })
        .await;
        assert_good(&r, &id);

        // 3. The old root removed: only the new one handed out, and copied.
        ns.apply(&[trust_roots_map(&root2)]).await;
        let r = certify_until(&mut c, &id, &token, "the old root gone", |r| {
            pem_certs(&r.trust_roots_pem) == pem_certs(&root2)
        })
        .await;
        assert_good(&r, &id);
        copy(root2.clone()).await;
        // The endpoint's own certificate follows the issuer: a client trusting only
        // the new root connects.
        let mut fresh = eventually(
            CLUSTER_STEP,
            "the serving certificate from the new issuer",
            || async { client(issuer.endpoint(), &root2).await.ok() },
        )
        .await;
        assert_good(
            &certify(&mut fresh, request(&id, &token, csr(&[&id])))
                .await
                .unwrap(),
            &id,
        );

        // A bundle that would strand the issuer (its root removed) is not served.
        ns.apply(&[trust_roots_map(&root1)]).await;
        eventually(
            CLUSTER_STEP,
            "the log to say why the trust roots are not used",
            || async {
                issuer
                    .cp
                    .log_text()
                    .contains("do not go together")
                    .then_some(())
            },
        )
        .await;
        let r = certify(&mut c, request(&id, &token, csr(&[&id])))
            .await
            .unwrap();
        assert_eq!(pem_certs(&r.trust_roots_pem), pem_certs(&root2));
        assert_good(&r, &id);
    })
    .await
}
