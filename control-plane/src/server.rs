//! The gRPC discovery server: `Hello` and one `Watch` stream per destination.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::Stream;
use tandem_proto::discovery::v1 as pb;
use tonic::{Request, Response, Status};

use tandem_common::Shutdown;

use crate::index::{NodeMap, Published, ResolveError, ServiceIndex, Subscription};
use crate::metrics::Metrics;
use crate::model::{Locality, ServiceKey, caller_shares_to_proto, delta_is_empty, diff};

/// How long a subscription made during start-up waits for the source's first sync.
const SYNC_WAIT: Duration = Duration::from_secs(10);

/// Endpoints per snapshot message: small messages keep each stream's encode buffer
/// small (a stream keeps its largest message's buffer), whatever the service's size.
const SNAPSHOT_CHUNK: usize = 64;

pub struct DiscoveryService {
    index: Arc<ServiceIndex>,
    metrics: Arc<Metrics>,
    proxies: Arc<ProxyTracker>,
    shutdown: Shutdown,
}

impl DiscoveryService {
    /// Streams end when `shutdown` triggers: a watch never ends by itself, and proxies
    /// keep their last state and resubscribe (to another replica, or to this one restarted).
    pub fn new(index: Arc<ServiceIndex>, metrics: Arc<Metrics>, shutdown: Shutdown) -> Self {
        Self {
            shutdown,
            proxies: Arc::new(ProxyTracker {
                streams: Mutex::default(),
                metrics: metrics.clone(),
            }),
            index,
            metrics,
        }
    }

    pub fn into_server(self) -> pb::discovery_server::DiscoveryServer<Self> {
        pb::discovery_server::DiscoveryServer::new(self)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Update, Status>> + Send>>;

#[tonic::async_trait]
impl pb::discovery_server::Discovery for DiscoveryService {
    async fn hello(
        &self,
        request: Request<pb::HelloRequest>,
    ) -> Result<Response<pb::HelloResponse>, Status> {
        let proxy = request.into_inner().proxy.unwrap_or_default();
        self.index.wait_synced(SYNC_WAIT).await;
        let locality = self.index.node_locality(&proxy.node);
        tracing::debug!(node = %proxy.node, pod = %proxy.pod, ?locality, "hello");
        Ok(Response::new(pb::HelloResponse {
            locality: locality.map(|l| l.to_proto()),
            control_plane_version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let request = request.into_inner();
        let proxy = request.proxy.unwrap_or_default();
        if !self.index.is_synced() && !self.index.wait_synced(SYNC_WAIT).await {
            return Err(Status::unavailable(
                "the control plane has not finished reading its source yet; retry",
            ));
        }
        let subscription = self
            .index
            .subscribe(&request.destination, &proxy.namespace)
            .map_err(|e| match e {
                ResolveError::Malformed(_) => Status::invalid_argument(e.to_string()),
                ResolveError::Unknown(_) => Status::not_found(e.to_string()),
                ResolveError::NotSynced => Status::unavailable(e.to_string()),
            })?;
        tracing::debug!(destination = %request.destination, service = %subscription.canonical, %peer, "watch");
        let proxy_id = if proxy.pod.is_empty() {
            // One proxy = one HTTP/2 connection; its address identifies it.
            peer.rsplit_once(':')
                .map(|(ip, _)| ip.to_string())
                .unwrap_or(peer.clone())
        } else {
            format!("{}/{}", proxy.namespace, proxy.pod)
        };
        let callers = CallerGuard::join(&self.index, &subscription.key, &proxy_id, &proxy.node);
        let state = StreamState {
            _caller: callers,
            _guard: self.proxies.open(proxy_id),
            node: proxy.node,
            subscription,
            sent: None,
            sent_locality: None,
            last_version: 0,
            metrics: self.metrics.clone(),
            done: false,
            chunking: None,
            shutdown: self.shutdown.clone(),
        };
        let stream = futures_util::stream::unfold(state, |mut state| async move {
            let item = state.next_update().await?;
            Some((item, state))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Counts open streams per proxy, for the `connected_proxies` gauge.
struct ProxyTracker {
    streams: Mutex<HashMap<String, usize>>,
    metrics: Arc<Metrics>,
}

impl ProxyTracker {
    fn open(self: &Arc<Self>, proxy: String) -> StreamGuard {
        let mut streams = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        *streams.entry(proxy.clone()).or_default() += 1;
        self.metrics.connected_proxies.set(streams.len() as i64);
        self.metrics.watch_streams.inc();
        StreamGuard {
            tracker: self.clone(),
            proxy,
        }
    }
}

struct StreamGuard {
    tracker: Arc<ProxyTracker>,
    proxy: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = self
            .tracker
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = streams.get_mut(&self.proxy) {
            *count -= 1;
            if *count == 0 {
                streams.remove(&self.proxy);
            }
        }
        self.tracker
            .metrics
            .connected_proxies
            .set(streams.len() as i64);
        self.tracker.metrics.watch_streams.dec();
    }
}

/// Counts the stream's proxy as a caller of its service while the stream is open.
struct CallerGuard {
    index: Arc<ServiceIndex>,
    key: ServiceKey,
    proxy: String,
}

impl CallerGuard {
    fn join(index: &Arc<ServiceIndex>, key: &ServiceKey, proxy: &str, node: &str) -> Self {
        index.caller_joined(key, proxy, node);
        Self {
            index: index.clone(),
            key: key.clone(),
            proxy: proxy.to_string(),
        }
    }
}

impl Drop for CallerGuard {
    fn drop(&mut self) {
        self.index.caller_left(&self.key, &self.proxy);
    }
}

struct StreamState {
    _caller: CallerGuard,
    _guard: StreamGuard,
    node: String,
    subscription: Subscription,
    /// The version this stream last described: the base of its next delta.
    sent: Option<Arc<Published>>,
    sent_locality: Option<Locality>,
    last_version: u64,
    metrics: Arc<Metrics>,
    done: bool,
    /// A snapshot being sent in chunks: its version, and the last address sent.
    chunking: Option<(u64, SocketAddr)>,
    shutdown: Shutdown,
}

impl StreamState {
    fn locality(&self, nodes: &NodeMap) -> Option<Locality> {
        nodes.get(&self.node).cloned()
    }

    /// Versions on one stream always increase, even when a locality change (which has
    /// no service version of its own) comes between two service versions.
    fn wire_version(&mut self, version: u64) -> u64 {
        self.last_version = version.max(self.last_version + 1);
        self.last_version
    }

    fn gone(&mut self) -> Option<Result<pb::Update, Status>> {
        self.done = true;
        Some(Err(Status::not_found(format!(
            "service {} was deleted",
            self.subscription.canonical
        ))))
    }

    async fn next_update(&mut self) -> Option<Result<pb::Update, Status>> {
        if self.chunking.is_some() {
            return Some(Ok(self.next_chunk()));
        }
        if self.done {
            return None;
        }
        loop {
            let Some(sent) = self.sent.clone() else {
                return Some(self.snapshot());
            };
            tokio::select! {
                _ = self.shutdown.wait() => return None,
                changed = self.subscription.service.changed() => {
                    if changed.is_err() {
                        return self.gone();
                    }
                    let current = self.subscription.service.borrow_and_update().clone();
                    if current.deleted {
                        return self.gone();
                    }
                    if current.version == sent.version {
                        continue;
                    }
                    let delta = if current.prev_version == sent.version {
                        current.delta.clone()
                    } else {
                        // This stream missed versions: describe the whole gap at once.
                        let mut delta = diff(&sent.endpoints, &current.endpoints);
                        if sent.callers != current.callers {
                            delta.caller_shares = Some(caller_shares_to_proto(&current.callers));
                        }
                        if sent.traffic_distribution != current.traffic_distribution {
                            delta.traffic_distribution = Some(current.traffic_distribution.to_string());
                        }
                        if sent.policy != current.policy {
                            delta.policy = Some(current.policy.to_proto());
                        }
                        delta
                    };
                    let changed_at = current.changed_at;
                    let service_version = current.version;
                    self.sent = Some(current);
                    if delta_is_empty(&delta) {
                        continue;
                    }
                    let version = self.wire_version(service_version);
                    self.metrics.push_latency.observe(changed_at.elapsed().as_secs_f64());
                    return Some(Ok(pb::Update {
                        version,
                        change: Some(pb::update::Change::Delta(delta)),
                    }));
                }
                changed = self.subscription.nodes.changed() => {
                    if changed.is_err() {
                        // The index lives as long as the server; keep serving the service.
                        std::future::pending::<()>().await;
                    }
                    let nodes = self.subscription.nodes.borrow_and_update().clone();
                    let locality = self.locality(&nodes);
                    if locality == self.sent_locality {
                        continue;
                    }
                    self.sent_locality = locality.clone();
                    let version = self.wire_version(sent.version);
                    return Some(Ok(pb::Update {
                        version,
                        change: Some(pb::update::Change::Delta(pb::Delta {
                            proxy_locality: Some(locality.unwrap_or_default().to_proto()),
                            ..Default::default()
                        })),
                    }));
                }
            }
        }
    }

    fn snapshot(&mut self) -> Result<pb::Update, Status> {
        let current = self.subscription.service.borrow_and_update().clone();
        let nodes = self.subscription.nodes.borrow_and_update().clone();
        if current.deleted {
            self.done = true;
            return Err(Status::not_found(format!(
                "unknown service {}",
                self.subscription.canonical
            )));
        }
        let locality = self.locality(&nodes);
        let version = self.wire_version(current.version);
        let endpoints: Vec<pb::Endpoint> = current
            .endpoints
            .values()
            .take(SNAPSHOT_CHUNK)
            .map(|e| e.to_proto())
            .collect();
        let continued = current.endpoints.len() > SNAPSHOT_CHUNK;
        if continued {
            let last = current.endpoints.keys().nth(SNAPSHOT_CHUNK - 1).copied();
            self.chunking = last.map(|addr| (version, addr));
        }
        let first = pb::Snapshot {
            service: self.subscription.canonical.clone(),
            proxy_locality: locality.as_ref().map(Locality::to_proto),
            caller_shares: current
                .callers
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            endpoints,
            traffic_distribution: current.traffic_distribution.to_string(),
            policy: Some(current.policy.to_proto()),
            continued,
        };
        self.sent_locality = locality;
        self.sent = Some(current);
        Ok(pb::Update {
            version,
            change: Some(pb::update::Change::Snapshot(first)),
        })
    }

    /// The next chunk of the snapshot being sent, made from the version it describes
    /// (the persistent map shares it): one chunk in memory at a time per stream.
    fn next_chunk(&mut self) -> pb::Update {
        let (version, after) = self.chunking.take().expect("called while chunking");
        let endpoints = &self.sent.as_ref().expect("a snapshot was sent").endpoints;
        let mut range = endpoints.range((Bound::Excluded(after), Bound::Unbounded));
        let chunk: Vec<_> = range.by_ref().take(SNAPSHOT_CHUNK).collect();
        let continued = range.next().is_some();
        if continued && let Some((last, _)) = chunk.last() {
            self.chunking = Some((version, **last));
        }
        pb::Update {
            version,
            change: Some(pb::update::Change::Snapshot(pb::Snapshot {
                endpoints: chunk.into_iter().map(|(_, e)| e.to_proto()).collect(),
                continued,
                ..Default::default()
            })),
        }
    }
}
