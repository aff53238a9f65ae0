//! HTTP/1.1 Upgrade (RFC 9110 §7.8), WebSocket first: the request is balanced like
//! any other when it arrives, goes to its backend over a connection of its own (an
//! upgraded connection cannot go back to a pool), and a `101 Switching Protocols`
//! answer turns the client's connection and the backend's into one tunnel that
//! carries bytes both ways until either side closes.
//!
//! hyper does the HTTP on both sides (the HTTP/1 path hands such requests over);
//! this module decides where the request goes and joins the two connections.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;

use crate::body::{ProxyBody, RequestBody};
use crate::forward::Forwarder;
use crate::forward::error::{ProxyError, nothing_to_pick, upstream_failed};
use crate::forward::resilience::{record_failure, record_response};
use crate::shared::{KEEP_ALIVE, PROXY_CONNECTION, te_is_trailers};
use crate::upstream::UpstreamError;

/// The rest of an upgraded exchange: copies bytes between client and backend until
/// either side closes. The client's connection task runs it once hyper has sent
/// the `101` (so the connection stays counted, and is closed at shutdown).
pub type Tunnel = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Whether `req` asks to switch protocols on its connection: HTTP/1.1, an
/// `Upgrade` header, and `upgrade` among its `Connection` options. An upgrade to
/// h2c is not taken (a server may ignore an upgrade): the request is served as
/// HTTP/1.1, and balanced per request, which a tunnel would not be.
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|u| !u.as_bytes().eq_ignore_ascii_case(b"h2c"))
        && connection_lists(req.headers(), "upgrade")
}

fn connection_lists(headers: &HeaderMap, option: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|o| o.trim().eq_ignore_ascii_case(option))
}

/// Keeps only what the upgrade itself needs of the hop-by-hop headers: `Upgrade`,
/// and `Connection: upgrade` (the options a client listed besides are dropped with
/// the headers they name).
fn upgrade_headers(headers: &mut HeaderMap) {
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|o| o.trim().to_ascii_lowercase())
        .filter(|o| !o.is_empty() && o != "upgrade")
        .collect();
    for name in listed {
        headers.remove(name.as_str());
    }
    for name in [&KEEP_ALIVE, &PROXY_CONNECTION, &header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| !te_is_trailers(te.as_bytes()))
    {
        headers.remove(header::TE);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// Forwards an upgrade request: the response for the client, and, when the backend
/// switched protocols, the tunnel to run once that response is sent.
pub async fn forward<B: RequestBody>(
    forwarder: Arc<Forwarder>,
    mut req: Request<B>,
) -> (Response<ProxyBody>, Option<Tunnel>) {
    let start = Instant::now();
    let client_upgrade = hyper::upgrade::on(&mut req);
    let req = req.map(RequestBody::into_request_body);
    match switch(&forwarder, req, start).await {
        Ok((response, Some(backend_upgrade))) => {
            let tunnel: Tunnel = Box::pin(async move {
                let (client, backend) = match tokio::try_join!(client_upgrade, backend_upgrade) {
                    Ok(both) => both,
                    Err(error) => {
                        tracing::debug!(%error, "an upgraded connection did not open");
                        return;
                    }
                };
                let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
                match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                    Ok((up, down)) => tracing::debug!(up, down, "upgraded connection closed"),
                    Err(error) => tracing::debug!(%error, "upgraded connection ended"),
                }
            });
            (response, Some(tunnel))
        }
        Ok((response, None)) => (response, None),
        Err(error) => (error.into_response(false), None),
    }
}

/// Sends the upgrade request to a backend; on `101`, also the backend's side of the
/// upgraded connection.
async fn switch(
    forwarder: &Forwarder,
    mut req: Request<ProxyBody>,
    start: Instant,
) -> Result<(Response<ProxyBody>, Option<hyper::upgrade::OnUpgrade>), ProxyError> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            let host = req.headers().get(header::HOST)?;
            host.to_str().ok().map(str::to_owned)
        });
    let destination = forwarder.route(authority.as_deref().map(str::as_bytes))?;
    destination.touch();
    let (destination, set) = forwarder.backends(&destination).await?;
    let _admitted = forwarder.resilience.admit(&destination)?;
    upgrade_headers(req.headers_mut());
    if let Some(inbound) = &forwarder.inbound {
        // For the app: who called (mesh TLS), and nothing a client claimed.
        inbound.prepare(req.headers_mut());
    }
    if let Some(pq) = req.uri().path_and_query().cloned() {
        // Origin-form towards the backend; Host carries the authority.
        if let Some(authority) = req.uri().authority()
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(header::HOST, host);
        }
        if let Ok(origin) = pq.as_str().parse() {
            *req.uri_mut() = origin;
        }
    }
    // Only a backend that refused the connection is skipped: once the request went
    // out, the backend may have acted on it.
    let mut tried = 0;
    loop {
        let backend = set.pick().map_err(|e| nothing_to_pick(&destination, e))?;
        let upstream = &backend.state.upstream;
        let mut sender = match upstream.dial_upgrade().await {
            Ok(sender) => sender,
            Err(error) => {
                record_failure(backend, error.fault());
                tried += 1;
                if tried < forwarder.resilience.max_attempts && set.balancer.pickable() > 1 {
                    continue;
                }
                return Err(upstream_failed(&destination, backend, &error));
            }
        };
        let mut response = match sender.send_request(req).await {
            Ok(response) => response,
            Err(error) => {
                let error = UpstreamError::Request(error);
                record_failure(backend, error.fault());
                return Err(upstream_failed(&destination, backend, &error));
            }
        };
        record_response(backend, response.status().as_u16(), start);
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Not switched: an ordinary answer (426, 400, a redirect...).
            return Ok((response.map(ProxyBody::Incoming), None));
        }
        let backend_upgrade = hyper::upgrade::on(&mut response);
        let mut response = response.map(|_| ProxyBody::Empty);
        upgrade_headers(response.headers_mut());
        return Ok((response, Some(backend_upgrade)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_an_upgrade_and_keeps_only_its_headers() {
        let mut req = Request::get("/ws")
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "keep-alive, Upgrade, x-private")
            .header("x-private", "1")
            .header("sec-websocket-key", "k")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        upgrade_headers(req.headers_mut());
        let h = req.headers();
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert!(h.contains_key("sec-websocket-key"));
        assert!(!h.contains_key("x-private") && !h.contains_key("keep-alive"));

        let plain = Request::get("/")
            .header(header::UPGRADE, "h2c")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&plain), "Upgrade without Connection: upgrade");
        let h2c = Request::get("/")
            .header(header::UPGRADE, "h2c")
            .header(header::CONNECTION, "Upgrade, HTTP2-Settings")
            .body(())
            .unwrap();
        assert!(!is_upgrade(&h2c), "served as HTTP/1.1 instead");
    }
}
