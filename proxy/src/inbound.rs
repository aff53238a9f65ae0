//! Connections for the app in this pod, redirected to the inbound listener: to the
//! app's port on the pod's loopback.
//!
//! - Mesh TLS (a ClientHello offering one of the mesh's ALPNs): terminated with this
//!   proxy's certificate, the client proxy's certificate required and checked; its
//!   identity goes on metrics and, for HTTP, to the app in `x-tandem-client-id`.
//!   HTTP arrives as HTTP/2 and reaches the app in the version the client proxy says
//!   it speaks; opaque bytes go to the app as they are.
//! - Anything else is from outside the mesh: HTTP is served with the identity header
//!   removed (so the app can trust it), other bytes (including the app's own TLS) go
//!   to the app as they are. Under `mtls-only` it is refused instead, but from the
//!   node (the kubelet's probes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use http::HeaderValue;
use hyper::server::conn::http1;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connections::{ConnControl, Phase, Tracked};
use crate::destination::Destination;
use crate::detect::{self, Sniffed};
use crate::endpoint::{EndpointMeta, Protocol};
use crate::forward::error::http1_answer;
use crate::forward::{Forwarder, Inbound};
use crate::http1::{Read, read_more};
use crate::identity::mesh::{ALPN_H2, ALPN_HTTP1, ALPN_OPAQUE, is_mesh_alpn};
use crate::identity::{InboundPolicy, MeshTls};
use crate::manager::{ManagerSettings, spawn_fixed};
use crate::metrics::{InboundLabel, MeshHandshakeLabel, ProxyMetrics};
use crate::rewind::Rewind;
use crate::tcp;

/// A ClientHello bigger than this is not one of ours (proxies send small ones).
const MAX_HELLO: usize = 16 * 1024;

/// The inbound listener's settings and its apps' destinations.
pub struct InboundContext {
    pub mesh: Option<Arc<MeshTls>>,
    pub policy: InboundPolicy,
    /// Plaintext from here is served whatever the policy: the node, whose kubelet
    /// probes the app (as Linkerd and Istio let probes through).
    pub node_ip: Option<std::net::IpAddr>,
    /// The proxy's own listening ports: a connection for one of them is closed, not
    /// forwarded to the loopback (it would reach the proxy itself).
    pub own_ports: Vec<u16>,
    /// How long a client may say nothing before it is taken as opaque.
    pub detect_timeout: Duration,
    pub settings: Arc<ManagerSettings>,
    /// The app behind each port, by the protocol spoken to it: pools, health and
    /// counts as for any destination. Few (the app's ports), made on first use;
    /// the lock is taken once per connection, never per request.
    apps: Mutex<HashMap<(SocketAddr, Protocol), Arc<Destination>>>,
}

impl InboundContext {
    pub fn new(
        mesh: Option<Arc<MeshTls>>,
        policy: InboundPolicy,
        node_ip: Option<std::net::IpAddr>,
        own_ports: Vec<u16>,
        detect_timeout: Duration,
        settings: Arc<ManagerSettings>,
    ) -> Self {
        Self {
            mesh,
            policy,
            node_ip,
            own_ports,
            detect_timeout,
            settings,
            apps: Mutex::new(HashMap::new()),
        }
    }

    /// The app destinations made so far (for metrics).
    pub fn apps(&self) -> Vec<Arc<Destination>> {
        let apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.values().cloned().collect()
    }

    fn app(&self, addr: SocketAddr, protocol: Protocol) -> Arc<Destination> {
        let mut apps = self.apps.lock().unwrap_or_else(|e| e.into_inner());
        apps.entry((addr, protocol))
            .or_insert_with(|| {
                let endpoint = EndpointMeta {
                    protocol,
                    ..EndpointMeta::static_backend(addr)
                };
                spawn_fixed(
                    &format!("inbound {addr}"),
                    vec![endpoint],
                    self.settings.clone(),
                )
            })
            .clone()
    }
}

impl std::fmt::Debug for InboundContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundContext")
            .field("mesh", &self.mesh.is_some())
            .field("policy", &self.policy)
            .finish()
    }
}

/// Whether the first bytes are a ClientHello that offers a mesh ALPN; `None` while
/// the hello is not whole yet.
pub fn offers_mesh(first: &[u8]) -> Option<bool> {
    if first.first() != Some(&0x16) {
        return Some(false);
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = first;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Some(false),
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(
            accepted
                .client_hello()
                .alpn()
                .is_some_and(|mut offered| offered.any(is_mesh_alpn)),
        ),
        Ok(None) if first.len() < MAX_HELLO => None,
        _ => Some(false),
    }
}

fn count(metrics: &ProxyMetrics, transport: &'static str, client_id: &str) {
    metrics
        .inbound_connections
        .get_or_create(&InboundLabel {
            transport,
            client_id: client_id.to_string(),
        })
        .inc();
}

fn handshake_result(metrics: &ProxyMetrics, result: &'static str) {
    metrics
        .mesh_handshakes
        .get_or_create(&MeshHandshakeLabel {
            side: "server",
            result,
        })
        .inc();
}

/// Serves one inbound connection whose original destination was `original`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    forwarder: &Arc<Forwarder>,
    metrics: &ProxyMetrics,
    context: &InboundContext,
    stream: TcpStream,
    original: SocketAddr,
    control: &Arc<ConnControl>,
    hyper: &http1::Builder,
) {
    let loopback: std::net::IpAddr = if original.is_ipv4() {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        std::net::Ipv6Addr::LOCALHOST.into()
    };
    if context.own_ports.contains(&original.port()) {
        tracing::debug!(%original, "a connection for one of the proxy's own ports: closed");
        return;
    }
    let app = SocketAddr::new(loopback, original.port());
    let peer = stream.peer_addr().ok();
    let from_node = context.node_ip.is_some() && peer.map(|peer| peer.ip()) == context.node_ip;
    let mut io = Tracked::new(stream, control.clone());
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let sniffed = detect::sniff(&mut io, &mut buf, control, context.detect_timeout).await;
    if sniffed == Sniffed::Closed {
        return;
    }
    if let Some(mesh) = &context.mesh {
        let mesh_hello = loop {
            match offers_mesh(&buf) {
                Some(offers) => break offers,
                None => match read_more(&mut io, &mut buf, control).await {
                    Read::More => {}
                    _ => return,
                },
            }
        };
        if mesh_hello {
            let io = Rewind::new(io, buf.freeze());
            let addrs = Addrs { app, peer };
            return serve_mesh(forwarder, metrics, context, mesh, io, addrs, control, hyper).await;
        }
    }
    if context.policy == InboundPolicy::MtlsOnly && !from_node {
        count(metrics, "refused", "");
        tracing::info!(%app, protocol = sniffed.name(), "refused a plaintext connection: this pod accepts only mutual TLS");
        if sniffed == Sniffed::Http1 {
            let answer = http1_answer(
                http::StatusCode::FORBIDDEN,
                "mtls_required",
                "this pod accepts only mutual TLS from meshed clients (tandem.io/inbound-policy: mtls-only)",
                false,
                true,
            );
            let _ = io.write_all(&answer).await;
        }
        let _ = io.shutdown().await;
        return;
    }
    count(metrics, "plaintext", "");
    match sniffed {
        Sniffed::Http1 => {
            let forwarder = forwarder.fixed_to(
                context.app(app, Protocol::Unspecified),
                Some(Inbound {
                    client_id: None,
                    peer,
                }),
            );
            crate::http1_conn::serve(&forwarder, io, buf, control, hyper).await;
        }
        Sniffed::Http2 => {
            let forwarder = forwarder.fixed_to(
                context.app(app, Protocol::Http2),
                Some(Inbound {
                    client_id: None,
                    peer,
                }),
            );
            control.set_phase(Phase::Multiplexed);
            crate::http2::serve(&forwarder, control, Rewind::new(io, buf.freeze())).await;
        }
        _ => {
            control.set_phase(Phase::Delegated);
            let mut io = Rewind::new(io, buf.freeze());
            if let Err(error) = tcp::passthrough(&mut io, app).await {
                tracing::debug!(%error, "the app did not take the connection");
            }
        }
    }
}

/// Where an inbound connection goes (the app's port on loopback) and comes from.
struct Addrs {
    app: SocketAddr,
    peer: Option<SocketAddr>,
}

/// Mesh TLS from another proxy: terminated, then what its ALPN says it carries.
#[allow(clippy::too_many_arguments)]
async fn serve_mesh<IO>(
    forwarder: &Arc<Forwarder>,
    metrics: &ProxyMetrics,
    context: &InboundContext,
    mesh: &MeshTls,
    io: IO,
    Addrs { app, peer }: Addrs,
    control: &Arc<ConnControl>,
    hyper: &http1::Builder,
) where
    IO: tokio::io::AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let accepted = tokio::time::timeout(
        crate::identity::mesh::HANDSHAKE_TIMEOUT,
        mesh.acceptor().accept(io),
    )
    .await;
    let mut tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            handshake_result(metrics, "error");
            tracing::info!(%error, "a mesh TLS handshake failed");
            return;
        }
        Err(_) => {
            handshake_result(metrics, "timeout");
            return;
        }
    };
    handshake_result(metrics, "ok");
    let (_, session) = tls.get_ref();
    let client_id = session
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(crate::identity::verify::identity_of)
        .unwrap_or_default();
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    count(metrics, "mtls", &client_id);
    tracing::Span::current().record("protocol", tracing::field::display("mesh"));
    let header = HeaderValue::from_str(&client_id).ok();
    match alpn.as_deref() {
        Some(ALPN_H2) => {
            // The app's protocol comes with each request; the destination's is the
            // fallback (HTTP/1.1, or HTTP/2 for gRPC), as for HTTP/1.1 clients.
            let forwarder = forwarder.fixed_to(
                context.app(app, Protocol::Unspecified),
                Some(Inbound {
                    client_id: header,
                    peer,
                }),
            );
            control.set_phase(Phase::Multiplexed);
            crate::http2::serve(&forwarder, control, tls).await;
        }
        Some(ALPN_HTTP1) => {
            let forwarder = forwarder.fixed_to(
                context.app(app, Protocol::Unspecified),
                Some(Inbound {
                    client_id: header,
                    peer,
                }),
            );
            let buf = BytesMut::with_capacity(8 * 1024);
            crate::http1_conn::serve(&forwarder, tls, buf, control, hyper).await;
        }
        Some(ALPN_OPAQUE) => {
            control.set_phase(Phase::Delegated);
            if let Err(error) = tcp::passthrough(&mut tls, app).await {
                tracing::debug!(%error, "the app did not take the connection");
            }
        }
        _ => {
            // rustls only completes a handshake with one of the configured ALPNs.
            tracing::debug!("a mesh connection without a mesh ALPN; closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(alpn: &[&[u8]]) -> Vec<u8> {
        // A real ClientHello, from rustls, written into a buffer.
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(config),
            rustls::pki_types::ServerName::try_from("10.0.0.1").unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn mesh_hellos_are_told_from_everything_else() {
        let mesh = hello(&[ALPN_H2]);
        assert_eq!(offers_mesh(&mesh), Some(true));
        assert_eq!(offers_mesh(&mesh[..mesh.len() / 2]), None, "not whole yet");
        assert_eq!(
            offers_mesh(&hello(&[b"h2", b"http/1.1"])),
            Some(false),
            "the app's own TLS"
        );
        assert_eq!(offers_mesh(&hello(&[])), Some(false));
        assert_eq!(offers_mesh(b"GET / HTTP/1.1\r\n"), Some(false));
        assert_eq!(
            offers_mesh(b"\x16\x03\x01\xff\xffgarbage"),
            Some(false),
            "a record longer than TLS allows: not a hello at all"
        );
        assert_eq!(offers_mesh(&[0x16; MAX_HELLO + 10]), Some(false));
    }
}
