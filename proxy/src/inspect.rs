//! What the proxy knows, for operators: the `/config` admin route (JSON), read from
//! the live destinations. (Their metrics: [`crate::scrape`].)

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use http::{Method, Request};
use hyper::body::Incoming;
use serde_json::json;
use tandem_common::admin::{AdminResponse, AdminRoutes, json as json_response};

use crate::destination::{Destination, Resolution};
use crate::forward::Router;
use crate::view::ProxyLocality;

/// The live destinations, wherever the router keeps them.
pub struct Inspector {
    pub router: Arc<Router>,
    pub locality: Arc<ProxyLocality>,
    /// This proxy's identity, when it has one.
    pub identity: Option<Arc<crate::identity::Identity>>,
}

impl std::fmt::Debug for Inspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inspector")
    }
}

impl Router {
    pub fn destinations(&self) -> Vec<Arc<Destination>> {
        match self {
            Router::Static(destination) => vec![destination.clone()],
            Router::Discovery { destinations, .. } => destinations.all(),
        }
    }
}

impl Inspector {
    pub fn config(&self) -> serde_json::Value {
        let destinations: Vec<serde_json::Value> = self
            .router
            .destinations()
            .iter()
            .map(|d| {
                let resolution = d.resolution();
                let mut out = json!({ "name": d.name() });
                match &**resolution {
                    Resolution::Pending => out["state"] = "pending".into(),
                    Resolution::Unknown(m) => {
                        out["state"] = "unknown".into();
                        out["reason"] = m.clone().into();
                    }
                    Resolution::Unavailable(m) => {
                        out["state"] = "unavailable".into();
                        out["reason"] = m.clone().into();
                    }
                    Resolution::Ready(set) => {
                        let shares = set.balancer.expected_shares();
                        let weights = set.balancer.effective_weights();
                        out["state"] = "ready".into();
                        out["mode"] = serde_json::to_value(set.balancer.mode()).unwrap_or_default();
                        out["loads"] =
                            serde_json::to_value(set.balancer.loads()).unwrap_or_default();
                        out["service"] = set.service.clone().into();
                        out["version"] = set.version.into();
                        out["pickable"] = set.balancer.pickable().into();
                        out["callers"] =
                            serde_json::to_value(&set.placement.caller_shares).unwrap_or_default();
                        out["policy"] = serde_json::to_value(&set.policy).unwrap_or_default();
                        out["endpoints"] = set
                            .backends
                            .iter()
                            .enumerate()
                            .map(|(i, b)| {
                                let mut e = serde_json::to_value(&b.meta).unwrap_or_default();
                                e["expected_share"] = shares[i].into();
                                // Effective weights are kept in hundredths (slow start).
                                e["effective_weight"] = (weights[i] as f64 / 100.0).into();
                                e["ejected"] = set.local.get(i).is_some_and(|l| l.ejected).into();
                                e["responses"] = b.state.stats.responses.total().into();
                                e["failures"] = b.state.stats.failures.load(Relaxed).into();
                                e["idle_connections"] = b.state.upstream.idle_connections().into();
                                e["http2_connections"] =
                                    b.state.upstream.http2_connections().into();
                                // How requests reach it: mutual TLS to its proxy, or plaintext.
                                e["transport"] = if b.state.upstream.meshed() {
                                    "mtls"
                                } else {
                                    "plaintext"
                                }
                                .into();
                                e
                            })
                            .collect();
                    }
                }
                out
            })
            .collect();
        json!({
            "mode": match &*self.router { Router::Static(_) => "static", Router::Discovery { .. } => "discovery" },
            "locality": self.locality.current(),
            "identity": self.identity.as_ref().map(|i| i.describe()),
            "destinations": destinations,
        })
    }
}

impl AdminRoutes for Inspector {
    fn route(&self, req: &Request<Incoming>) -> Option<AdminResponse> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/config") => Some(json_response(&self.config())),
            _ => None,
        }
    }
}
