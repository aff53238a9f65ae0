//! What the Kubernetes source lacks, and telling when it no longer does: the API
//! server out of reach, or a permission it refuses (403).
//!
//! A watch that comes back after an outage sends nothing until something changes,
//! so recovery is not left to events: while something is wrong, a cheap request is
//! made every [`PROBE_EVERY`] (the server's version; a one-item list of a refused
//! kind). A 403 right after an API server restart is common (its RBAC cache is not
//! filled yet): a refusal is only reported, in one log line and in `/ready`, once it
//! has lasted [`REFUSAL_GRACE`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::{Api, Client};
use tandem_common::Readiness;

use super::Kind;
use crate::metrics::Metrics;

/// How often what is wrong is checked again.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long a refusal must last to be a missing permission rather than an API
/// server that is starting.
pub const REFUSAL_GRACE: Duration = Duration::from_secs(5);

/// A request the API server refused (403): the verb, its own words, and since when.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub verb: &'static str,
    pub message: String,
    since: Instant,
    reported: bool,
}

impl Refusal {
    pub fn new(verb: &'static str, message: String) -> Self {
        Self {
            verb,
            message,
            since: Instant::now(),
            reported: false,
        }
    }
}

pub struct SourceHealth {
    /// Whether the first full view was published (only then is the source ready).
    pub synced: bool,
    readiness: Arc<Readiness>,
    metrics: Arc<Metrics>,
    api_down: bool,
    refused: BTreeMap<Kind, Refusal>,
}

impl SourceHealth {
    pub fn new(readiness: Arc<Readiness>, metrics: Arc<Metrics>) -> Self {
        Self {
            synced: false,
            readiness,
            metrics,
            api_down: false,
            refused: BTreeMap::new(),
        }
    }

    /// Whether something is wrong that only a probe can tell is over.
    pub fn needs_probe(&self) -> bool {
        self.api_down || !self.refused.is_empty()
    }

    /// A watch failed for want of the API server.
    pub fn unreachable(&mut self, kind: Kind, error: &str) {
        self.metrics.source_up.set(0);
        if !self.api_down {
            self.api_down = true;
            tracing::warn!(kind = kind.label(), %error, "cannot watch the API server; proxies keep the last state; retrying");
        }
    }

    /// A watch was refused (403).
    pub fn forbidden(&mut self, kind: Kind, refusal: Refusal) {
        self.metrics.source_up.set(0);
        let refusal = self.refused.entry(kind).or_insert(refusal);
        if !refusal.reported && refusal.since.elapsed() >= REFUSAL_GRACE {
            refusal.reported = true;
            report(kind, refusal);
        }
        self.say_in_ready();
    }

    /// The API server answered for `kind` (an event, or a probe).
    pub fn answered(&mut self, kind: Kind) {
        if self.api_down {
            self.api_down = false;
            tracing::info!("the API server answers again");
        }
        if let Some(refusal) = self.refused.remove(&kind)
            && refusal.reported
        {
            tracing::info!(resource = kind.resource(), "permission granted again");
        }
        if self.refused.is_empty() {
            self.metrics.source_up.set(1);
        }
        self.say_in_ready();
    }

    /// Checks again what is wrong.
    pub async fn probe(&mut self, client: &Client) {
        if self.api_down
            && let Ok(Ok(_)) = tokio::time::timeout(PROBE_EVERY, client.apiserver_version()).await
        {
            self.api_down = false;
            tracing::info!("the API server answers again");
            if self.refused.is_empty() {
                self.metrics.source_up.set(1);
            }
        }
        let kinds: Vec<Kind> = self.refused.keys().copied().collect();
        for kind in kinds {
            match tokio::time::timeout(PROBE_EVERY, can_list(client, kind)).await {
                Ok(Ok(())) => self.answered(kind),
                Ok(Err(kube::Error::Api(status))) if status.code == 403 => {
                    let refusal = Refusal::new("list", status.message.clone());
                    self.forbidden(kind, refusal);
                }
                _ => {}
            }
        }
    }

    /// `/ready` says which permissions are missing, once reported.
    fn say_in_ready(&self) {
        let missing: Vec<String> = self
            .refused
            .iter()
            .filter(|(_, r)| r.reported)
            .map(|(kind, r)| format!("{} {}", r.verb, kind.resource()))
            .collect();
        if !missing.is_empty() {
            self.readiness.set_not_ready(format!(
                "missing permission: the API server refuses to let the control plane {}",
                missing.join(", ")
            ));
        } else if self
            .readiness
            .reason()
            .is_some_and(|r| r.starts_with("missing permission"))
        {
            if self.synced {
                self.readiness.set_ready();
            } else {
                self.readiness
                    .set_not_ready("waiting for the first sync with the API server");
            }
        }
    }
}

fn report(kind: Kind, refusal: &Refusal) {
    tracing::error!(
        "missing permission: the control plane may not {} {} (403 Forbidden: {}); \
         its ClusterRole needs `list` and `watch` on {} (deploy/control-plane/rbac.yaml)",
        refusal.verb,
        kind.resource(),
        refusal.message,
        kind.resource(),
    );
}

/// A one-item list of `kind`: whether the control plane may read it.
async fn can_list(client: &Client, kind: Kind) -> Result<(), kube::Error> {
    let one = ListParams::default().limit(1);
    let c = client.clone();
    match kind {
        Kind::Service => Api::<Service>::all(c).list_metadata(&one).await.map(drop),
        Kind::Slice => Api::<EndpointSlice>::all(c)
            .list_metadata(&one)
            .await
            .map(drop),
        Kind::Node => Api::<Node>::all(c).list_metadata(&one).await.map(drop),
        Kind::Pod => Api::<Pod>::all(c).list_metadata(&one).await.map(drop),
    }
}
