//! The discovery client: asks the control plane who we are (`Hello`) and keeps one
//! `Watch` stream per destination, turning snapshots and deltas into backend sets.
//!
//! If a stream breaks, the destination keeps its last-known backends and the stream is
//! re-opened with jittered exponential backoff; the fresh snapshot then replaces the
//! set. An update that does not make sense (a delta before any snapshot, a malformed
//! address) is rejected whole, the last good set is kept, and the stream is re-opened.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_common::{Backoff, Readiness};
use tandem_proto::discovery::v1 as pb;
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::destination::{Destination, Resolution};
use crate::endpoint::{EndpointMeta, Locality, locality_from_proto};
use crate::manager::{Manager, ManagerSettings};
use crate::metrics::ProxyMetrics;
use crate::policy::Policy;

/// The views this module keeps current, in a module of their own so that the
/// destination managers, which take them, need nothing of the discovery client.
pub use crate::view::{ProxyLocality, ServiceView};

const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Snapshots of very large services exceed tonic's 4 MiB default (10,000 endpoints
/// take about 1.5 MiB; this leaves room for ten times that).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
const BACKOFF_MAX: Duration = Duration::from_secs(3);

pub struct DiscoveryClient {
    client: pb::discovery_client::DiscoveryClient<Channel>,
    identity: pb::ProxyIdentity,
    settings: Arc<ManagerSettings>,
    metrics: Arc<ProxyMetrics>,
}

/// Accepts `host:port` or `http://host:port`.
pub fn control_plane_endpoint(addr: &str) -> Result<Endpoint, String> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri)
        .map(|e| {
            e.connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5))
                .keep_alive_while_idle(true)
        })
        .map_err(|e| format!("--control-plane {addr:?} is not host:port or a URL: {e}"))
}

/// Why one stream ended.
enum StreamEnd {
    /// The control plane does not know the destination (NOT_FOUND, INVALID_ARGUMENT).
    Unknown(String),
    /// The control plane could not be reached or the stream broke.
    Broken(String),
    /// An update was rejected; the stream is re-opened for a fresh snapshot.
    Rejected(String),
    /// The control plane closed the stream (e.g. it is shutting down).
    Closed,
}

impl DiscoveryClient {
    pub fn new(
        endpoint: Endpoint,
        identity: pb::ProxyIdentity,
        settings: Arc<ManagerSettings>,
        metrics: Arc<ProxyMetrics>,
    ) -> Self {
        Self {
            client: pb::discovery_client::DiscoveryClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            identity,
            settings,
            metrics,
        }
    }

    /// Calls `Hello` until it answers, then marks the proxy ready.
    pub async fn hello(self: Arc<Self>, readiness: Arc<Readiness>) {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
        let mut failures = 0u32;
        loop {
            let request = pb::HelloRequest {
                proxy: Some(self.identity.clone()),
            };
            match self.client.clone().hello(request).await {
                Ok(response) => {
                    let response = response.into_inner();
                    let locality = response.locality.as_ref().map(locality_from_proto);
                    tracing::info!(
                        control_plane_version = %response.control_plane_version,
                        locality = ?self.settings.locality.configured.clone().or(locality.clone()),
                        "connected to the control plane"
                    );
                    self.settings.locality.discovered(locality);
                    self.metrics.discovery_connected.set(1);
                    readiness.set_ready();
                    return;
                }
                Err(status) => {
                    failures += 1;
                    let message = status.message().to_string();
                    readiness.set_not_ready(format!(
                        "no answer from the control plane yet ({failures} attempts): {message}"
                    ));
                    if failures == 1 {
                        tracing::warn!(error = %message, "control plane not reachable yet; retrying");
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Starts the tasks of a new destination: its discovery watch, which turns the
    /// stream into validated views, and its manager, which turns views (and what the
    /// proxy learns itself about endpoint health) into backend sets.
    pub fn spawn_watch(self: &Arc<Self>, destination: &Arc<Destination>) {
        let (views, views_rx) = watch::channel(None);
        let manager = Manager::new(destination.clone(), self.settings.clone());
        let evicted = destination.clone();
        let span = crate::manager::span(destination);
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = manager.run(views_rx) => {}
                    _ = evicted.evicted() => {}
                }
            }
            .instrument(span.clone()),
        );
        let this = self.clone();
        let destination = destination.clone();
        tokio::spawn(async move { this.watch(&destination, views).await }.instrument(span));
    }

    /// Ends when the manager is gone (the destination was evicted).
    async fn watch(
        &self,
        destination: &Arc<Destination>,
        views: watch::Sender<Option<ServiceView>>,
    ) {
        let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
        loop {
            let end = tokio::select! {
                end = self.watch_once(destination, &views, &mut backoff) => end,
                _ = views.closed() => return,
            };
            // From now until the next update, what the proxy knows may be out of date.
            let _ = destination.stats.stale_since.compare_exchange(
                0,
                crate::clock::unix_seconds(),
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
            match end {
                StreamEnd::Unknown(message) => {
                    tracing::debug!(reason = %message, "unknown destination");
                    destination.set(Resolution::Unknown(message));
                }
                StreamEnd::Broken(message) => {
                    self.metrics.discovery_stream_errors.inc();
                    match &**destination.resolution() {
                        Resolution::Pending | Resolution::Unavailable(_) => {
                            destination.set(Resolution::Unavailable(message.clone()));
                        }
                        // Keep serving what we know.
                        Resolution::Ready(_) | Resolution::Unknown(_) => {}
                    }
                    tracing::warn!(error = %message, "discovery stream broke; keeping the last-known backends and reconnecting");
                }
                StreamEnd::Rejected(reason) => {
                    self.metrics.discovery_updates_rejected.inc();
                    tracing::error!(%reason, "rejected a discovery update; keeping the last good backends and resubscribing");
                }
                StreamEnd::Closed => {
                    tracing::info!("the control plane closed the discovery stream; resubscribing");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay()) => {}
                _ = views.closed() => return,
            }
        }
    }

    async fn watch_once(
        &self,
        destination: &Arc<Destination>,
        views: &watch::Sender<Option<ServiceView>>,
        backoff: &mut Backoff,
    ) -> StreamEnd {
        let request = pb::WatchRequest {
            destination: destination.name().to_string(),
            proxy: Some(self.identity.clone()),
        };
        let mut stream = match self.client.clone().watch(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return end_of(status),
        };
        let mut builder = ViewBuilder::default();
        loop {
            let update = match stream.message().await {
                Ok(Some(update)) => update,
                Ok(None) => return StreamEnd::Closed,
                Err(status) => return end_of(status),
            };
            let next = match builder.apply(&update) {
                Ok(Some(next)) => next.clone(),
                Ok(None) => continue,
                Err(reason) => return StreamEnd::Rejected(reason),
            };
            backoff.reset();
            let stats = &destination.stats;
            stats
                .discovery_updates
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            stats
                .stale_since
                .store(0, std::sync::atomic::Ordering::Relaxed);
            if next.proxy_locality.is_some() {
                self.settings
                    .locality
                    .discovered(next.proxy_locality.clone());
            }
            views.send_replace(Some(next));
        }
    }
}

fn end_of(status: Status) -> StreamEnd {
    match status.code() {
        Code::NotFound | Code::InvalidArgument => StreamEnd::Unknown(status.message().to_string()),
        _ => {
            let message = if status.message().is_empty() {
                format!("{:?}", status.code())
            } else {
                status.message().to_string()
            };
            StreamEnd::Broken(message)
        }
    }
}

/// Turns a stream's updates into complete views: a snapshot (possibly in chunks, only
/// ever yielded whole), then deltas.
#[derive(Debug, Default)]
pub struct ViewBuilder {
    view: Option<ServiceView>,
    /// A chunked snapshot being assembled.
    partial: Option<ServiceView>,
}

impl ViewBuilder {
    /// Applies one update. Returns the new view, or `None` while a chunked snapshot is
    /// still incomplete. On error nothing changes.
    pub fn apply(&mut self, update: &pb::Update) -> Result<Option<&ServiceView>, String> {
        let chunk = match &update.change {
            Some(pb::update::Change::Snapshot(s)) => Some(s),
            _ => None,
        };
        match (self.partial.take(), chunk) {
            (Some(mut partial), Some(chunk)) => {
                if update.version != partial.version {
                    return Err(format!(
                        "snapshot chunk of version {} inside snapshot {}",
                        update.version, partial.version
                    ));
                }
                for e in &chunk.endpoints {
                    let meta = EndpointMeta::from_proto(e)?;
                    if partial.endpoints.insert(meta.address, meta).is_some() {
                        return Err(format!("snapshot lists endpoint {} twice", e.address));
                    }
                }
                self.finish(partial, chunk.continued)
            }
            (Some(_), None) => Err("a delta arrived inside a chunked snapshot".to_string()),
            (None, Some(first)) => {
                let view = apply(None, update)?;
                self.finish(view, first.continued)
            }
            (None, None) => {
                let view = apply(self.view.as_ref(), update)?;
                self.view = Some(view);
                Ok(self.view.as_ref())
            }
        }
    }

    fn finish(
        &mut self,
        view: ServiceView,
        continued: bool,
    ) -> Result<Option<&ServiceView>, String> {
        if continued {
            self.partial = Some(view);
            Ok(None)
        } else {
            self.view = Some(view);
            Ok(self.view.as_ref())
        }
    }
}

/// Callers' shares by zone: each a finite number, not negative (the balancer
/// divides by their sum).
fn caller_shares(
    shares: &std::collections::HashMap<String, f64>,
) -> Result<BTreeMap<String, f64>, String> {
    shares
        .iter()
        .map(|(zone, share)| {
            if share.is_finite() && *share >= 0.0 {
                Ok((zone.clone(), *share))
            } else {
                Err(format!(
                    "caller share {share} for zone {zone:?} is not a finite number >= 0"
                ))
            }
        })
        .collect()
}

/// Applies one update to `view`, validating all of it first: on error nothing changes.
fn apply(view: Option<&ServiceView>, update: &pb::Update) -> Result<ServiceView, String> {
    match &update.change {
        Some(pb::update::Change::Snapshot(snapshot)) => {
            let mut endpoints = BTreeMap::new();
            for e in &snapshot.endpoints {
                let meta = EndpointMeta::from_proto(e)?;
                if endpoints.insert(meta.address, meta).is_some() {
                    return Err(format!("snapshot lists endpoint {} twice", e.address));
                }
            }
            Ok(ServiceView {
                version: update.version,
                service: snapshot.service.clone(),
                endpoints,
                caller_shares: caller_shares(&snapshot.caller_shares)?,
                proxy_locality: snapshot.proxy_locality.as_ref().map(locality_from_proto),
                traffic_distribution: snapshot.traffic_distribution.clone(),
                policy: snapshot
                    .policy
                    .as_ref()
                    .map(Policy::from_proto)
                    .transpose()?
                    .unwrap_or_default(),
            })
        }
        Some(pb::update::Change::Delta(delta)) => {
            let Some(view) = view else {
                return Err("a delta arrived before any snapshot".to_string());
            };
            if update.version <= view.version {
                return Err(format!(
                    "delta version {} is not newer than {}",
                    update.version, view.version
                ));
            }
            let mut next = view.clone();
            next.version = update.version;
            for removed in &delta.removed {
                let addr: SocketAddr = removed
                    .parse()
                    .map_err(|_| format!("removed address {removed:?} is not ip:port"))?;
                next.endpoints.remove(&addr);
            }
            for e in delta.added.iter().chain(&delta.changed) {
                let meta = EndpointMeta::from_proto(e)?;
                next.endpoints.insert(meta.address, meta);
            }
            if let Some(shares) = &delta.caller_shares {
                next.caller_shares = caller_shares(&shares.by_zone)?;
            }
            if let Some(policy) = &delta.policy {
                next.policy = Policy::from_proto(policy)?;
            }
            if let Some(distribution) = &delta.traffic_distribution {
                next.traffic_distribution = distribution.clone();
            }
            if let Some(locality) = &delta.proxy_locality {
                let locality = locality_from_proto(locality);
                next.proxy_locality = (locality != Locality::default()).then_some(locality);
            }
            Ok(next)
        }
        None => Err("an update with neither snapshot nor delta".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(addr: &str, weight: u32) -> pb::Endpoint {
        pb::Endpoint {
            address: addr.into(),
            weight,
            health: pb::Health::Healthy as i32,
            ..Default::default()
        }
    }

    fn snapshot(version: u64, eps: Vec<pb::Endpoint>) -> pb::Update {
        pb::Update {
            version,
            change: Some(pb::update::Change::Snapshot(pb::Snapshot {
                service: "web.default.svc.cluster.local:80".into(),
                endpoints: eps,
                ..Default::default()
            })),
        }
    }

    fn delta(version: u64, d: pb::Delta) -> pb::Update {
        pb::Update {
            version,
            change: Some(pb::update::Change::Delta(d)),
        }
    }

    #[test]
    fn snapshot_then_deltas() {
        let v1 = apply(
            None,
            &snapshot(10, vec![ep("10.0.0.1:80", 1), ep("10.0.0.2:80", 1)]),
        )
        .unwrap();
        assert_eq!(v1.endpoints.len(), 2);
        let v2 = apply(
            Some(&v1),
            &delta(
                11,
                pb::Delta {
                    added: vec![ep("10.0.0.3:80", 2)],
                    changed: vec![ep("10.0.0.1:80", 5)],
                    removed: vec!["10.0.0.2:80".into()],
                    ..Default::default()
                },
            ),
        )
        .unwrap();
        let weights: Vec<(String, u32)> = v2
            .endpoints
            .values()
            .map(|e| (e.address.to_string(), e.weight))
            .collect();
        assert_eq!(
            weights,
            vec![("10.0.0.1:80".into(), 5), ("10.0.0.3:80".into(), 2)]
        );
    }

    #[test]
    fn caller_shares_must_be_finite_and_not_negative() {
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let mut update = snapshot(1, vec![ep("10.0.0.1:80", 1)]);
            if let Some(pb::update::Change::Snapshot(s)) = &mut update.change {
                s.caller_shares.insert("zone-a".into(), bad);
            }
            let error = apply(None, &update).unwrap_err();
            assert!(error.contains("zone-a"), "{error}");
            let v1 = apply(None, &snapshot(1, vec![ep("10.0.0.1:80", 1)])).unwrap();
            let shares = pb::CallerShares {
                by_zone: [("zone-b".to_string(), bad)].into(),
            };
            let d = pb::Delta {
                caller_shares: Some(shares),
                ..Default::default()
            };
            assert!(apply(Some(&v1), &delta(2, d)).is_err(), "{bad} in a delta");
        }
    }

    #[test]
    fn chunked_snapshots_are_applied_whole() {
        let mut b = ViewBuilder::default();
        let mut first = snapshot(5, vec![ep("10.0.0.1:80", 1)]);
        if let Some(pb::update::Change::Snapshot(s)) = &mut first.change {
            s.continued = true;
        }
        assert!(b.apply(&first).unwrap().is_none(), "not yet");
        let mut second = snapshot(5, vec![ep("10.0.0.2:80", 1)]);
        if let Some(pb::update::Change::Snapshot(s)) = &mut second.change {
            s.service.clear();
        }
        let view = b.apply(&second).unwrap().expect("complete");
        assert_eq!(view.endpoints.len(), 2);
        assert_eq!(
            view.service, "web.default.svc.cluster.local:80",
            "from the first chunk"
        );
        // A delta in the middle of a chunked snapshot is rejected.
        let mut b = ViewBuilder::default();
        b.apply(&first).unwrap();
        assert!(b.apply(&delta(6, pb::Delta::default())).is_err());
    }

    #[test]
    fn bad_updates_change_nothing() {
        assert!(apply(None, &delta(1, pb::Delta::default())).is_err());
        let v1 = apply(None, &snapshot(10, vec![ep("10.0.0.1:80", 1)])).unwrap();
        assert!(
            apply(Some(&v1), &delta(10, pb::Delta::default())).is_err(),
            "stale"
        );
        let bad = delta(
            11,
            pb::Delta {
                added: vec![ep("10.0.0.9:80", 1), ep("not-an-address", 1)],
                ..Default::default()
            },
        );
        assert!(apply(Some(&v1), &bad).is_err());
        assert!(
            apply(
                None,
                &snapshot(1, vec![ep("10.0.0.1:80", 1), ep("10.0.0.1:80", 1)])
            )
            .is_err()
        );
        assert!(
            apply(
                None,
                &pb::Update {
                    version: 1,
                    change: None
                }
            )
            .is_err()
        );
    }
}
