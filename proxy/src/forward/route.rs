//! Routing by authority: which destination a request goes to (its `Host` or
//! `:authority`, lower-cased and given its default port without allocating, else
//! `--default-destination`), and the backend set it is balanced over once discovery
//! has answered.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode, header};

use super::error::ProxyError;
use crate::destination::{BackendSet, Destination, Destinations, Resolution};
use crate::metrics::ProxyErrorKind;

/// How requests find their destination.
pub enum Router {
    /// `--backends`: every request goes to one fixed set.
    Static(Arc<Destination>),
    /// `--control-plane`: by the request's authority (`Host` / `:authority`).
    Discovery {
        destinations: Arc<Destinations>,
        /// Where requests for unknown destinations (or without a Host) go, if anywhere.
        default: Option<Box<str>>,
    },
}

/// The authority the client addressed: `:authority` (HTTP/2, absolute-form) or `Host`.
#[inline]
pub(crate) fn authority<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
        .filter(|a| !a.is_empty())
}

/// Lower-cases `authority` and adds the default port (80) into `buf`, without allocating.
/// Takes bytes: the one UTF-8 check is of the name it makes (HTTP/1 Host values come
/// as bytes, and a fixed destination never needs them as text).
pub fn normalize_name<'b>(authority: &[u8], buf: &'b mut [u8; 256]) -> Option<&'b str> {
    let bytes = authority;
    let has_port = match bytes.first() {
        Some(b'[') => bytes.windows(2).any(|w| w == b"]:"),
        _ => bytes.contains(&b':'),
    };
    let len = bytes.len() + if has_port { 0 } else { 3 };
    if len > buf.len() {
        return None;
    }
    for (dst, src) in buf.iter_mut().zip(bytes) {
        *dst = src.to_ascii_lowercase();
    }
    if !has_port {
        buf[bytes.len()..len].copy_from_slice(b":80");
    }
    std::str::from_utf8(&buf[..len]).ok()
}

impl Router {
    /// The destination of a request that addressed `authority` (its Host / :authority).
    pub(crate) fn route(&self, authority: Option<&[u8]>) -> Result<Arc<Destination>, ProxyError> {
        match self {
            Router::Static(destination) => Ok(destination.clone()),
            Router::Discovery {
                destinations,
                default,
            } => {
                let name = match authority.filter(|a| !a.is_empty()) {
                    Some(authority) => {
                        let mut buf = [0u8; 256];
                        normalize_name(authority, &mut buf)
                            .ok_or_else(|| {
                                ProxyError::new(
                                    ProxyErrorKind::BadRequest,
                                    StatusCode::BAD_REQUEST,
                                    "the request's Host is longer than 250 bytes".into(),
                                )
                            })
                            .and_then(|name| {
                                destinations.get_or_create(name).map_err(|e| {
                                    ProxyError::new(
                                        ProxyErrorKind::DiscoveryUnavailable,
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        e.to_string(),
                                    )
                                })
                            })?
                    }
                    None => match default {
                        Some(default) => destinations.get_or_create(default).map_err(|e| {
                            ProxyError::new(
                                ProxyErrorKind::DiscoveryUnavailable,
                                StatusCode::SERVICE_UNAVAILABLE,
                                e.to_string(),
                            )
                        })?,
                        None => {
                            return Err(ProxyError::new(
                                ProxyErrorKind::BadRequest,
                                StatusCode::BAD_REQUEST,
                                "the request names no destination: Tandem routes by its Host header (HTTP/1) or :authority (HTTP/2)".into(),
                            ));
                        }
                    },
                };
                Ok(name)
            }
        }
    }

    fn default_destination(&self) -> Option<Arc<Destination>> {
        match self {
            Router::Discovery {
                destinations,
                default: Some(default),
            } => destinations.get_or_create(default).ok(),
            _ => None,
        }
    }

    /// The backend set for `destination`, following `--default-destination` for
    /// unknown ones; a new destination's first discovery answer is awaited for up to
    /// `discovery_timeout`.
    pub(crate) async fn backends(
        &self,
        destination: &Arc<Destination>,
        discovery_timeout: Duration,
    ) -> Result<(Arc<Destination>, Arc<BackendSet>), ProxyError> {
        // The common case, without touching the (larger) waiting future.
        if let Resolution::Ready(set) = &**destination.resolution() {
            return Ok((destination.clone(), set.clone()));
        }
        Box::pin(self.resolve_slowly(destination, discovery_timeout)).await
    }

    async fn resolve_slowly(
        &self,
        destination: &Arc<Destination>,
        discovery_timeout: Duration,
    ) -> Result<(Arc<Destination>, Arc<BackendSet>), ProxyError> {
        let mut destination = destination.clone();
        let mut followed_default = false;
        loop {
            let resolution = destination.resolve(discovery_timeout).await;
            let error = match &*resolution {
                Resolution::Ready(set) => return Ok((destination, set.clone())),
                Resolution::Unknown(message) => {
                    if !followed_default
                        && let Some(default) = self.default_destination()
                        && default.name() != destination.name()
                    {
                        followed_default = true;
                        destination = default;
                        continue;
                    }
                    ProxyError::new(
                        ProxyErrorKind::UnknownDestination,
                        StatusCode::NOT_FOUND,
                        format!("unknown destination {}: {message}", destination.name()),
                    )
                }
                Resolution::Unavailable(reason) => ProxyError::new(
                    ProxyErrorKind::DiscoveryUnavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no backends known for {} yet: the control plane is unreachable ({reason})",
                        destination.name()
                    ),
                ),
                Resolution::Pending => ProxyError::new(
                    ProxyErrorKind::DiscoveryUnavailable,
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the control plane did not answer for {} within {:?}",
                        destination.name(),
                        discovery_timeout
                    ),
                ),
            };
            destination.stats.error(error.kind, error.status.as_u16());
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_authorities() {
        let mut buf = [0u8; 256];
        assert_eq!(normalize_name(b"web", &mut buf), Some("web:80"));
        assert_eq!(
            normalize_name(b"Web.Default:8080", &mut buf),
            Some("web.default:8080")
        );
        assert_eq!(
            normalize_name(b"10.0.0.1:80", &mut buf),
            Some("10.0.0.1:80")
        );
        assert_eq!(normalize_name(b"[::1]", &mut buf), Some("[::1]:80"));
        assert_eq!(normalize_name(b"[::1]:81", &mut buf), Some("[::1]:81"));
        assert_eq!(normalize_name("a".repeat(300).as_bytes(), &mut buf), None);
    }
}
