//! The Kubernetes source: watches Services, EndpointSlices (label
//! `kubernetes.io/service-name`), Nodes (metadata only: their topology labels) and
//! Pods (the weight annotation and service account), and keeps the index current.
//!
//! Each watcher runs in its own task and sends its events to one task that owns the
//! [`ClusterState`]; that task flushes changed service ports to the index, coalescing
//! bursts (a rollout is many events) for at most [`MAX_DELAY`]. A watch restart or a
//! relist (410 Gone, API server restart) re-applies every object: unchanged ones
//! produce no change, so proxies see nothing for endpoints that did not change.

mod health;
mod objects;
pub mod state;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::mpsc;

use tandem_common::Readiness;

use crate::index::ServiceIndex;
use crate::metrics::{KindLabel, Metrics};
use health::{Refusal, SourceHealth};
use objects::Ignored;
use state::ClusterState;

/// A burst of events is flushed once it has been quiet this long…
const QUIET: Duration = Duration::from_millis(10);
/// …or at the latest this long after its first event.
pub const MAX_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("cannot find Kubernetes credentials (KUBECONFIG, ~/.kube/config or in-cluster): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `--kubeconfig`, else `KUBECONFIG` / `~/.kube/config`, else in-cluster.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubernetesError::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Service,
    Slice,
    Node,
    Pod,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Service, Kind::Slice, Kind::Node, Kind::Pod];

    fn label(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Slice => "endpointslice",
            Kind::Node => "node",
            Kind::Pod => "pod",
        }
    }

    /// The resource as RBAC names it (`resource.group`).
    fn resource(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::Slice => "endpointslices.discovery.k8s.io",
            Kind::Node => "nodes",
            Kind::Pod => "pods",
        }
    }
}

/// The 403 behind a watcher error, if that is what it was.
fn forbidden(error: &watcher::Error) -> Option<Refusal> {
    let (verb, status) = match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status)) => ("list", status),
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => ("watch", status),
        watcher::Error::WatchError(status) => ("watch", status),
        _ => return None,
    };
    (status.code == 403).then(|| Refusal::new(verb, status.message.clone()))
}

/// Whether a watcher error is a 410 Gone: the history it would resume from was
/// compacted away, and the watcher lists again.
fn expired(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::WatchError(status) => status.code == 410,
        watcher::Error::WatchStartFailed(kube::Error::Api(status))
        | watcher::Error::WatchFailed(kube::Error::Api(status)) => status.code == 410,
        _ => false,
    }
}

/// Boxed: objects differ a lot in size (a Pod is large), and the channel holds many.
enum Message {
    Service(Box<Event<Service>>),
    Slice(Box<Event<EndpointSlice>>),
    Node(Box<Event<PartialObjectMeta<Node>>>),
    Pod(Box<Event<Pod>>),
    Error(Kind, String),
    Forbidden(Kind, Refusal),
    /// The API server no longer has the history the watch would resume from (410
    /// Gone, after an etcd compaction): the watcher lists again.
    Expired(Kind),
}

impl Message {
    /// A watcher's "listing starts" (sent before any request).
    fn is_start(&self) -> bool {
        match self {
            Message::Service(e) => matches!(**e, Event::Init),
            Message::Slice(e) => matches!(**e, Event::Init),
            Message::Node(e) => matches!(**e, Event::Init),
            Message::Pod(e) => matches!(**e, Event::Init),
            _ => false,
        }
    }
}

/// Keys seen during a relist, per kind: what is not seen again is deleted at its end.
#[derive(Default)]
struct Relist {
    services: Option<HashSet<state::ObjectId>>,
    slices: Option<HashSet<state::ObjectId>>,
    nodes: Option<HashSet<Arc<str>>>,
    pods: Option<HashSet<state::ObjectId>>,
}

pub struct KubernetesSource {
    client: Client,
    /// The domain of the endpoints' identities (`--trust-domain`).
    trust_domain: String,
    index: Arc<ServiceIndex>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

impl KubernetesSource {
    /// `readiness` says what the source lacks: the first sync, or a permission.
    pub fn new(
        client: Client,
        trust_domain: String,
        index: Arc<ServiceIndex>,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
    ) -> Self {
        Self {
            client,
            trust_domain,
            index,
            metrics,
            readiness,
        }
    }

    /// Runs the watchers and keeps the index current until the task is dropped.
    pub async fn run(self) {
        let (tx, rx) = mpsc::channel(1024);
        let c = &self.client;
        let slices = watcher::Config::default().labels(objects::SERVICE_NAME_LABEL);
        spawn_watch(
            watcher(Api::<Service>::all(c.clone()), watcher::Config::default()),
            tx.clone(),
            Kind::Service,
            |e| Message::Service(Box::new(e)),
        );
        spawn_watch(
            watcher(Api::<EndpointSlice>::all(c.clone()), slices),
            tx.clone(),
            Kind::Slice,
            |e| Message::Slice(Box::new(e)),
        );
        spawn_watch(
            // Metadata only: the topology labels are all Tandem needs of a Node.
            watcher(
                Api::<PartialObjectMeta<Node>>::all(c.clone()),
                watcher::Config::default(),
            ),
            tx.clone(),
            Kind::Node,
            |e| Message::Node(Box::new(e)),
        );
        spawn_watch(
            watcher(Api::<Pod>::all(c.clone()), watcher::Config::default()),
            tx,
            Kind::Pod,
            |e| Message::Pod(Box::new(e)),
        );
        let metrics = self.metrics;
        Runner {
            state: ClusterState::new(&self.trust_domain),
            index: self.index,
            metrics: metrics.clone(),
            relist: Relist::default(),
            synced: HashSet::new(),
            warned: HashSet::new(),
            health: SourceHealth::new(self.readiness, metrics.clone()),
            client: self.client,
        }
        .run(rx)
        .await;
    }
}

fn spawn_watch<K, S>(
    stream: S,
    tx: mpsc::Sender<Message>,
    kind: Kind,
    wrap: fn(Event<K>) -> Message,
) where
    S: futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
{
    tokio::spawn(async move {
        // Retries with exponential backoff after errors, which are still reported.
        let mut stream = std::pin::pin!(stream.default_backoff());
        while let Some(item) = stream.next().await {
            let message = match item {
                Ok(event) => wrap(event),
                Err(error) if expired(&error) => Message::Expired(kind),
                Err(error) => match forbidden(&error) {
                    Some(refused) => Message::Forbidden(kind, refused),
                    None => Message::Error(kind, error.to_string()),
                },
            };
            if tx.send(message).await.is_err() {
                return;
            }
        }
    });
}

fn watcher<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl futures_util::Stream<Item = Result<Event<K>, watcher::Error>> + Send
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    watcher::watcher(api, config)
}

struct Runner {
    state: ClusterState,
    index: Arc<ServiceIndex>,
    metrics: Arc<Metrics>,
    relist: Relist,
    synced: HashSet<Kind>,
    /// Keys of things already logged as ignored.
    warned: HashSet<String>,
    health: SourceHealth,
    client: Client,
}

impl Runner {
    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let mut first_pending: Option<Instant> = None;
        let mut last_event = Instant::now();
        let mut probe = tokio::time::interval(health::PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = first_pending.map(|first| (first + MAX_DELAY).min(last_event + QUIET));
            tokio::select! {
                message = rx.recv() => {
                    let Some(message) = message else { return };
                    last_event = Instant::now();
                    let was_synced = self.index.is_synced();
                    self.handle(message);
                    if !was_synced && self.synced.len() == Kind::ALL.len() {
                        // The first full view: publish it at once.
                        self.flush(Instant::now());
                        self.index.mark_synced();
                        self.health.synced = true;
                        tracing::info!(services = self.index.service_count(), "initial sync with the API server done");
                        first_pending = None;
                    } else if self.state.has_pending() && first_pending.is_none() {
                        first_pending = Some(last_event);
                    }
                }
                // A watch back after an outage sends nothing until something changes.
                _ = probe.tick(), if self.health.needs_probe() => {
                    self.health.probe(&self.client).await;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if deadline.is_some() => {
                    if self.index.is_synced() {
                        self.flush(first_pending.take().unwrap_or_else(Instant::now));
                    } else {
                        first_pending = None;
                    }
                }
            }
        }
    }

    fn flush(&mut self, changed_at: Instant) {
        let pending = self.state.take_pending();
        if pending.nodes_changed {
            self.index.set_nodes(self.state.node_localities());
        }
        for key in &pending.removed {
            self.index.remove(key, changed_at);
        }
        for (key, meta) in pending.meta {
            self.index.upsert_meta(
                key,
                meta.cluster_ips,
                Default::default(),
                meta.traffic_distribution,
                meta.policy,
                changed_at,
            );
        }
        for (key, changes) in pending.endpoints {
            self.index.apply_changes(&key, changes, changed_at);
        }
    }

    fn ignored(&mut self, ignored: Vec<Ignored>) {
        for i in ignored {
            if self.warned.insert(i.key) {
                tracing::warn!("{}", i.reason);
            }
        }
    }

    fn handle(&mut self, message: Message) {
        let kind = match &message {
            Message::Service(_) => Kind::Service,
            Message::Slice(_) => Kind::Slice,
            Message::Node(_) => Kind::Node,
            Message::Pod(_) => Kind::Pod,
            Message::Forbidden(..) => {
                let Message::Forbidden(kind, refusal) = message else {
                    unreachable!("matched above")
                };
                self.metrics
                    .source_errors
                    .get_or_create(&KindLabel { kind: "forbidden" })
                    .inc();
                self.health.forbidden(kind, refusal);
                return;
            }
            Message::Expired(kind) => {
                // Not an outage: the relist that follows re-applies every object, and
                // only real differences reach proxies.
                self.metrics
                    .relists
                    .get_or_create(&KindLabel { kind: kind.label() })
                    .inc();
                tracing::info!(
                    kind = kind.label(),
                    "the API server's history was compacted (410 Gone): listing again"
                );
                return;
            }
            Message::Error(kind, error) => {
                self.metrics
                    .source_errors
                    .get_or_create(&KindLabel { kind: "api" })
                    .inc();
                self.health.unreachable(*kind, error);
                return;
            }
        };
        // A watcher says it starts listing before it asks anything: only what came
        // from the API server shows that it answers.
        if !message.is_start() {
            self.health.answered(kind);
        }
        self.metrics
            .watch_events
            .get_or_create(&KindLabel { kind: kind.label() })
            .inc();
        let mut ignored = Vec::new();
        match message {
            Message::Service(event) => self.service_event(*event, &mut ignored),
            Message::Slice(event) => self.slice_event(*event, &mut ignored),
            Message::Node(event) => self.node_event(*event, &mut ignored),
            Message::Pod(event) => self.pod_event(*event, &mut ignored),
            Message::Error(..) | Message::Forbidden(..) | Message::Expired(..) => {}
        }
        self.ignored(ignored);
    }

    fn service_event(&mut self, event: Event<Service>, ignored: &mut Vec<Ignored>) {
        match event {
            Event::Init => self.relist.services = Some(HashSet::new()),
            Event::InitApply(svc) | Event::Apply(svc) => {
                if let Some(obj) = objects::service(&svc, ignored) {
                    if let Some(seen) = &mut self.relist.services {
                        seen.insert((obj.namespace.clone(), obj.name.clone()));
                    }
                    self.state.apply_service(obj);
                }
            }
            Event::Delete(svc) => {
                let (ns, name) = (
                    meta_str(&svc.metadata.namespace),
                    meta_str(&svc.metadata.name),
                );
                self.state.delete_service(&ns, &name);
            }
            Event::InitDone => {
                if let Some(seen) = self.relist.services.take() {
                    for (ns, name) in self.state.service_ids() {
                        if !seen.contains(&(ns.clone(), name.clone())) {
                            self.state.delete_service(&ns, &name);
                        }
                    }
                }
                self.synced.insert(Kind::Service);
            }
        }
    }

    fn slice_event(&mut self, event: Event<EndpointSlice>, ignored: &mut Vec<Ignored>) {
        match event {
            Event::Init => self.relist.slices = Some(HashSet::new()),
            Event::InitApply(slice) | Event::Apply(slice) => {
                let ns = meta_str(&slice.metadata.namespace);
                let name = meta_str(&slice.metadata.name);
                if let Some(seen) = &mut self.relist.slices {
                    seen.insert((ns.clone(), name.clone()));
                }
                let obj = objects::slice(&slice, ignored);
                // A slice whose label moved it to another service, or that became unusable.
                if let Some(previous) = self.state.service_of_slice(&ns, &name)
                    && obj.as_ref().is_none_or(|o| o.service != previous)
                {
                    self.state.delete_slice(&ns, &previous, &name);
                }
                if let Some(obj) = obj {
                    self.state.apply_slice(obj);
                }
            }
            Event::Delete(slice) => {
                let ns = meta_str(&slice.metadata.namespace);
                let name = meta_str(&slice.metadata.name);
                if let Some(service) = self.state.service_of_slice(&ns, &name) {
                    self.state.delete_slice(&ns, &service, &name);
                }
            }
            Event::InitDone => {
                if let Some(seen) = self.relist.slices.take() {
                    for ((ns, service), name) in self.state.slice_ids() {
                        if !seen.contains(&(ns.clone(), name.clone())) {
                            self.state.delete_slice(&ns, &service, &name);
                        }
                    }
                }
                self.synced.insert(Kind::Slice);
            }
        }
    }

    fn node_event(&mut self, event: Event<PartialObjectMeta<Node>>, ignored: &mut Vec<Ignored>) {
        match event {
            Event::Init => self.relist.nodes = Some(HashSet::new()),
            Event::InitApply(node) | Event::Apply(node) => {
                if let Some(obj) = objects::node(&node, ignored) {
                    if let Some(seen) = &mut self.relist.nodes {
                        seen.insert(obj.name.clone());
                    }
                    self.state.apply_node(obj);
                }
            }
            Event::Delete(node) => self.state.delete_node(&meta_str(&node.metadata.name)),
            Event::InitDone => {
                if let Some(seen) = self.relist.nodes.take() {
                    for name in self.state.node_names() {
                        if !seen.contains(&name) {
                            self.state.delete_node(&name);
                        }
                    }
                }
                self.synced.insert(Kind::Node);
            }
        }
    }

    fn pod_event(&mut self, event: Event<Pod>, ignored: &mut Vec<Ignored>) {
        match event {
            Event::Init => self.relist.pods = Some(HashSet::new()),
            Event::InitApply(pod) | Event::Apply(pod) => {
                if let Some(obj) = objects::pod(&pod, ignored) {
                    if let Some(seen) = &mut self.relist.pods {
                        seen.insert((obj.namespace.clone(), obj.name.clone()));
                    }
                    self.state.apply_pod(obj);
                }
            }
            Event::Delete(pod) => {
                self.state.delete_pod(
                    &meta_str(&pod.metadata.namespace),
                    &meta_str(&pod.metadata.name),
                );
            }
            Event::InitDone => {
                if let Some(seen) = self.relist.pods.take() {
                    for (ns, name) in self.state.pod_ids() {
                        if !seen.contains(&(ns.clone(), name.clone())) {
                            self.state.delete_pod(&ns, &name);
                        }
                    }
                }
                self.synced.insert(Kind::Pod);
            }
        }
    }
}

fn meta_str(value: &Option<String>) -> Arc<str> {
    value.as_deref().unwrap_or_default().into()
}
