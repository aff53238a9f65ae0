//! What discovery tells the proxy: a service's endpoints and settings as one
//! complete version ([`ServiceView`], which [`crate::discovery`] assembles from a
//! `Watch` stream and the destination's [`crate::manager`] turns into backend sets),
//! and the proxy's own locality ([`ProxyLocality`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwapOption;

use crate::endpoint::{EndpointMeta, Locality};
use crate::policy::Policy;

/// The proxy's own locality: the `--locality` flag if given, else what the control plane says.
#[derive(Default)]
pub struct ProxyLocality {
    pub configured: Option<Locality>,
    discovered: ArcSwapOption<Locality>,
}

impl ProxyLocality {
    pub fn new(configured: Option<Locality>) -> Self {
        Self {
            configured,
            discovered: ArcSwapOption::empty(),
        }
    }

    pub fn current(&self) -> Option<Locality> {
        self.configured
            .clone()
            .or_else(|| self.discovered.load_full().map(|l| (*l).clone()))
    }

    /// What the control plane says (`Hello`, or a service's snapshot).
    pub(crate) fn discovered(&self, locality: Option<Locality>) {
        self.discovered.store(locality.map(Arc::new));
    }
}

/// The proxy's copy of one service, rebuilt from snapshots and deltas.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceView {
    pub version: u64,
    pub service: String,
    pub endpoints: BTreeMap<SocketAddr, EndpointMeta>,
    pub caller_shares: BTreeMap<String, f64>,
    pub proxy_locality: Option<Locality>,
    /// The Service's trafficDistribution (e.g. `PreferClose`), empty when unset.
    pub traffic_distribution: String,
    pub policy: Policy,
}
