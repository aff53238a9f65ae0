//! TLS termination: certificates from rcgen, HTTP/2 and HTTP/1.1 chosen by ALPN,
//! TLS 1.2 and 1.3, and a plain-text client on the TLS port.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use tandem::client::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(90);

struct Certs {
    _dir: TestDir,
    cert: String,
    key: String,
    der: CertificateDer<'static>,
}

fn certs() -> Certs {
    let dir = TestDir::new("tls");
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "web".to_string()])
            .expect("generate a certificate");
    let cert = dir.path("cert.pem");
    let key = dir.path("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    Certs {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        der: certified.cert.der().clone(),
        _dir: dir,
    }
}

fn connector(
    der: &CertificateDer<'static>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn terminates_tls_with_alpn_and_survives_plaintext_clients() {
    bounded(LIMIT, async {
        let certs = certs();
        let a = backend("instance-1").await;
        let b = backend("instance-2").await;
        let proxy = static_proxy(
            &[a.addr("http"), b.addr("http")],
            &["--tls-cert", &certs.cert, "--tls-key", &certs.key],
        )
        .await;
        let addr = proxy.addr("proxy");
        let name = ServerName::try_from("localhost").unwrap();

        // h2 by ALPN, TLS 1.3: balanced per request over the one TLS connection.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector(
            &certs.der,
            &[b"h2", b"http/1.1"],
            &[&rustls::version::TLS13],
        )
        .connect(name.clone(), tcp)
        .await
        .expect("TLS 1.3 handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let mut h2 = Connection::http2_over(tls).await.unwrap();
        let seen = instances(&mut h2, "web", 6).await;
        assert_alternates(&seen, "h2 requests over TLS");

        // http/1.1 by ALPN, TLS 1.2.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector(&certs.der, &[b"http/1.1"], &[&rustls::version::TLS12])
            .connect(name.clone(), tcp)
            .await
            .expect("TLS 1.2 handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        let mut h1 = Connection::http1_over(tls).await.unwrap();
        assert_eq!(counts(&instances(&mut h1, "web", 4).await).len(), 2);

        // A plain-text HTTP client gets a clear 400, not a hang or a reset.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), plain.read_to_string(&mut answer))
            .await
            .expect("the proxy answers and closes")
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(answer.contains("TLS"), "{answer}");

        // Garbage and an abandoned handshake do not hurt the listener either.
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage
            .write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0])
            .await
            .unwrap();
        drop(garbage);
        let untrusting = {
            let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
            connector(other.cert.der(), &[b"h2"], &[&rustls::version::TLS13])
        };
        let tcp = TcpStream::connect(addr).await.unwrap();
        assert!(
            untrusting.connect(name.clone(), tcp).await.is_err(),
            "wrong CA must fail"
        );

        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = connector(&certs.der, &[b"h2"], &[&rustls::version::TLS13])
            .connect(name, tcp)
            .await
            .expect("the proxy still accepts TLS");
        let mut h2 = Connection::http2_over(tls).await.unwrap();
        instances(&mut h2, "web", 2).await;

        let metrics = admin_get(proxy.addr("admin"), "/metrics").await;
        assert!(
            metrics.contains("tandem_proxy_tls_handshakes_total{result=\"ok\"} 3"),
            "{metrics}"
        );
        assert!(
            metrics.contains("tandem_proxy_tls_handshakes_total{result=\"plaintext\"} 1"),
            "{metrics}"
        );
    })
    .await
}

#[tokio::test]
async fn unusable_certificates_are_a_clear_start_up_error() {
    bounded(LIMIT, async {
        let dir = TestDir::new("bad-tls");
        let cert = dir.path("cert.pem");
        let key = dir.path("key.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "not a key").unwrap();
        let output = tokio::process::Command::new(exe())
            .args([
                "proxy",
                "--backends",
                "127.0.0.1:1",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(30), output)
            .await
            .unwrap()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("TLS certificate") && stderr.contains("cert.pem"),
            "{stderr}"
        );
    })
    .await
}
