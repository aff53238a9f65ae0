//! The admin HTTP endpoint shared by the proxy and the control plane.
//!
//! `/live` (the process runs), `/ready` (it can do its job), `/metrics` (Prometheus
//! text format) and `POST /shutdown` (loopback callers only). A binary adds its own
//! routes (the proxy's `/config`) through [`AdminRoutes`].

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

use crate::Shutdown;

pub type AdminResponse = Response<Full<Bytes>>;

/// Extra routes a binary serves on its admin port.
pub trait AdminRoutes: Send + Sync + 'static {
    /// Answers `req`, or `None` when the path is not one of these routes.
    fn route(&self, req: &Request<Incoming>) -> Option<AdminResponse>;
}

/// Whether the process is ready, and if not, why (the `/ready` body says it). Besides
/// its main condition, named gates (a proxy's first certificate) must all be open.
#[derive(Debug)]
pub struct Readiness {
    not_ready_because: Mutex<Option<String>>,
    gates: Mutex<Vec<(&'static str, String)>>,
}

impl Readiness {
    pub fn not_ready(reason: impl Into<String>) -> Self {
        Self {
            not_ready_because: Mutex::new(Some(reason.into())),
            gates: Mutex::new(Vec::new()),
        }
    }

    pub fn set_ready(&self) {
        *self.lock() = None;
    }

    pub fn set_not_ready(&self, reason: impl Into<String>) {
        *self.lock() = Some(reason.into());
    }

    /// Closes gate `name` (until [`Self::set_gate_ready`]), saying why.
    pub fn set_gate_not_ready(&self, name: &'static str, reason: impl Into<String>) {
        let mut gates = self.gates();
        let reason = reason.into();
        match gates.iter_mut().find(|(n, _)| *n == name) {
            Some(gate) => gate.1 = reason,
            None => gates.push((name, reason)),
        }
    }

    pub fn set_gate_ready(&self, name: &'static str) {
        self.gates().retain(|(n, _)| *n != name);
    }

    /// `None` when ready, otherwise the reason it is not.
    pub fn reason(&self) -> Option<String> {
        self.lock()
            .clone()
            .or_else(|| self.gates().first().map(|(_, reason)| reason.clone()))
    }

    pub fn is_ready(&self) -> bool {
        self.reason().is_none()
    }

    fn gates(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, String)>> {
        self.gates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A poisoned flag is still a valid flag: readiness must never panic the admin server.
        self.not_ready_because
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Admin {
    pub registry: Registry,
    pub readiness: Arc<Readiness>,
    pub routes: Option<Arc<dyn AdminRoutes>>,
    pub shutdown: Shutdown,
}

impl Admin {
    /// Serves admin requests on `listener` until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let shutdown = self.shutdown.clone();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(%error, "admin accept failed");
                        continue;
                    }
                },
                _ = shutdown.wait() => return,
            };
            let admin = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let response = admin.handle(&req, peer);
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn handle(&self, req: &Request<Incoming>, peer: SocketAddr) -> AdminResponse {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET | &Method::HEAD, "/ready") => match self.readiness.reason() {
                None => text(StatusCode::OK, "ready\n"),
                Some(reason) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {reason}\n"),
                ),
            },
            (&Method::GET | &Method::HEAD, "/metrics") => self.metrics(),
            (_, "/shutdown") => self.shutdown_request(req.method(), peer),
            _ => self
                .routes
                .as_ref()
                .and_then(|routes| routes.route(req))
                .unwrap_or_else(|| {
                    text(
                        StatusCode::NOT_FOUND,
                        format!(
                            "no admin route {} {}: try /live, /ready, /metrics\n",
                            req.method(),
                            req.uri().path()
                        ),
                    )
                }),
        }
    }

    fn metrics(&self) -> AdminResponse {
        let mut body = String::with_capacity(16 * 1024);
        match prometheus_client::encoding::prometheus_text::encode(&mut body, &self.registry) {
            Ok(()) => Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")),
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            ),
        }
    }

    fn shutdown_request(&self, method: &Method, peer: SocketAddr) -> AdminResponse {
        if method != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "use POST /shutdown\n");
        }
        if !peer.ip().is_loopback() {
            return text(
                StatusCode::FORBIDDEN,
                "/shutdown is accepted from loopback only\n",
            );
        }
        tracing::info!(%peer, "shutdown requested on the admin port");
        self.shutdown.trigger();
        text(StatusCode::OK, "shutting down\n")
    }
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A JSON response.
pub fn json(value: &serde_json::Value) -> AdminResponse {
    let mut response = Response::new(Full::new(Bytes::from(
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response
}
