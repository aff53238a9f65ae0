//! Destinations (a service as the application names it, e.g. `web:80`) and their
//! current backend sets.
//!
//! The request path reads a destination's state with one `ArcSwap` load: no lock. A
//! discovery update builds a new immutable [`BackendSet`] (endpoints + balancer) and
//! swaps it in; requests in flight keep the set they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tandem_balancer::{Balancer, BalancerConfig, EndpointView, Origin, PickError};
use tokio::sync::{Notify, mpsc};

use crate::clock;
use crate::endpoint::{EndpointMeta, Locality};
use crate::metrics::{BackendStats, DestinationStats};
use crate::policy::Policy;
use crate::pool::UpstreamSettings;
use crate::shared::HttpVersion;
use crate::upstream::Upstream;

/// The connections, counters and passive health of one endpoint. They outlive
/// backend-set versions, so a discovery update does not drop pooled connections,
/// reset counters or forget failures.
pub struct EndpointState {
    pub upstream: Arc<Upstream>,
    pub stats: Arc<BackendStats>,
    /// Consecutive failures (connect error, reset, 5xx, timeout): the request path only
    /// counts; the destination's manager decides about ejection.
    failures: AtomicU32,
    threshold: u32,
    report: mpsc::UnboundedSender<SocketAddr>,
}

impl EndpointState {
    pub fn new(
        address: SocketAddr,
        identity: &str,
        settings: &Arc<UpstreamSettings>,
        threshold: u32,
        report: mpsc::UnboundedSender<SocketAddr>,
    ) -> Self {
        let stats = Arc::new(BackendStats::default());
        Self {
            upstream: Upstream::new(address, identity, settings.clone(), stats.bytes.clone()),
            stats,
            failures: AtomicU32::new(0),
            threshold: threshold.max(1),
            report,
        }
    }

    #[inline]
    pub fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure for outlier detection; the one that reaches the threshold is
    /// reported (once).
    #[inline]
    pub fn failed(&self) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 == self.threshold {
            let _ = self.report.send(self.upstream.addr());
        }
    }

    /// Starts counting afresh (after an ejection ended).
    pub fn reset_failures(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
}

pub struct Backend {
    pub meta: EndpointMeta,
    pub state: Arc<EndpointState>,
}

/// Per-endpoint health the proxy learned itself (outlier detection, active checks).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LocalHealth {
    pub ejected: bool,
    /// How long the endpoint has been healthy, for slow start (None: long enough).
    pub healthy_for: Option<std::time::Duration>,
}

/// Everything a backend set is balanced by, besides its endpoints.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    pub proxy_locality: Option<Locality>,
    pub caller_shares: std::collections::BTreeMap<String, f64>,
    pub config: BalancerConfig,
}

/// One version of a destination's endpoints, with the balancer built for them.
pub struct BackendSet {
    pub version: u64,
    pub service: String,
    pub backends: Vec<Backend>,
    pub local: Vec<LocalHealth>,
    pub balancer: Balancer,
    pub placement: Placement,
    pub policy: Policy,
    /// Every endpoint is spoken to in HTTP/1.1 (for requests that are not gRPC), so
    /// the proxy's own HTTP/1 path can take the requests.
    pub all_http1: bool,
}

impl BackendSet {
    pub fn new(
        version: u64,
        service: String,
        backends: Vec<Backend>,
        local: Vec<LocalHealth>,
        placement: Placement,
        policy: Policy,
        seed: u64,
    ) -> Self {
        let views = views(&backends, &local);
        let locality = placement.proxy_locality.clone().unwrap_or_default();
        let origin = Origin {
            region: &locality.region,
            zone: &locality.zone,
            callers: Some(&placement.caller_shares).filter(|c| !c.is_empty()),
        };
        let balancer = Balancer::build(&views, &origin, &placement.config, seed);
        let all_http1 = backends.iter().all(|b| {
            b.meta.protocol.version_for(false) == HttpVersion::Http1 && !b.state.upstream.meshed()
        });
        Self {
            all_http1,
            version,
            service,
            backends,
            local,
            balancer,
            placement,
            policy,
        }
    }

    #[inline]
    pub fn pick(&self) -> Result<&Backend, PickError> {
        self.balancer.pick().map(|i| &self.backends[i])
    }

    /// Where `backend` is from the proxy: `zone`, `region`, `anywhere`, or
    /// `unknown` while the proxy's own locality is not known.
    pub fn tier_of(&self, backend: &Backend) -> &'static str {
        let theirs = &backend.meta.locality;
        match &self.placement.proxy_locality {
            None => "unknown",
            Some(ours) if ours.region == theirs.region && ours.zone == theirs.zone => "zone",
            Some(ours) if ours.region == theirs.region => "region",
            Some(_) => "anywhere",
        }
    }
}

fn views<'a>(backends: &'a [Backend], local: &[LocalHealth]) -> Vec<EndpointView<'a>> {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let l = local.get(i).copied().unwrap_or_default();
            EndpointView {
                weight: b.meta.weight,
                health: b.meta.health,
                ejected: l.ejected,
                region: &b.meta.locality.region,
                zone: &b.meta.locality.zone,
                healthy_for: l.healthy_for,
            }
        })
        .collect()
}

pub enum Resolution {
    /// Waiting for the control plane's first answer.
    Pending,
    Ready(Arc<BackendSet>),
    /// The control plane does not know this destination (its message).
    Unknown(String),
    /// No answer yet and the control plane cannot be reached (the error).
    Unavailable(String),
}

pub struct Destination {
    name: Box<str>,
    resolution: ArcSwap<Resolution>,
    resolved: Notify,
    evicted: Notify,
    /// Set when it is evicted: a connection that kept it (to skip the lookup) looks
    /// it up again.
    gone: AtomicBool,
    /// The coarse clock's seconds ([`clock::now`]) at the last request: idle ones are
    /// evicted. Coarse because a clock read per request would cost more than the
    /// eviction needs.
    last_used: AtomicU32,
    pub stats: DestinationStats,
}

impl Destination {
    pub fn new(name: &str, resolution: Resolution) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            resolution: ArcSwap::from_pointee(resolution),
            resolved: Notify::new(),
            evicted: Notify::new(),
            gone: AtomicBool::new(false),
            last_used: AtomicU32::new(clock::now()),
            stats: DestinationStats::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Marks the destination used now.
    #[inline]
    pub fn touch(&self) {
        let secs = clock::now();
        if self.last_used.load(Ordering::Relaxed) != secs {
            self.last_used.store(secs, Ordering::Relaxed);
        }
    }

    pub fn resolution(&self) -> arc_swap::Guard<Arc<Resolution>> {
        self.resolution.load()
    }

    /// The backend set to try again with after a failure: the current one (endpoints
    /// may have gone since the request began, a rollout's say), else `set` as it was.
    pub fn fresher(&self, set: Arc<BackendSet>) -> Arc<BackendSet> {
        match &**self.resolution.load() {
            Resolution::Ready(now) if !Arc::ptr_eq(now, &set) => now.clone(),
            _ => set,
        }
    }

    pub fn set(&self, resolution: Resolution) {
        self.resolution.store(Arc::new(resolution));
        self.resolved.notify_waiters();
    }

    /// The current state, waiting up to `timeout` while the first answer is pending.
    pub async fn resolve(&self, timeout: Duration) -> Arc<Resolution> {
        let current = self.resolution.load_full();
        if !matches!(*current, Resolution::Pending) {
            return current;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.resolved.notified();
            tokio::pin!(notified);
            // Register before re-checking, so an answer between the check and the wait is not lost.
            notified.as_mut().enable();
            let current = self.resolution.load_full();
            if !matches!(*current, Resolution::Pending) {
                return current;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.resolution.load_full();
            }
        }
    }

    /// Whether it was evicted from the cache (its watch ends; a new one takes its name).
    #[inline]
    pub fn is_evicted(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    /// Resolves once the destination was evicted from the cache (its watch should end).
    pub async fn evicted(&self) {
        self.evicted.notified().await;
    }
}

/// Starts resolving a destination that was just created.
type OnNew = Box<dyn Fn(&Arc<Destination>) + Send + Sync>;

/// The destinations the proxy has been asked for, created on first use.
pub struct Destinations {
    map: ArcSwap<HashMap<Box<str>, Arc<Destination>>>,
    create: Mutex<()>,
    max: usize,
    on_new: OnNew,
}

#[derive(Debug, thiserror::Error)]
#[error("the proxy already tracks {0} destinations; refusing new ones until idle ones expire")]
pub struct TooManyDestinations(pub usize);

impl Destinations {
    /// `on_new` starts whatever resolves a new destination (a discovery watch).
    pub fn new(max: usize, on_new: impl Fn(&Arc<Destination>) + Send + Sync + 'static) -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            create: Mutex::new(()),
            max,
            on_new: Box::new(on_new),
        }
    }

    #[inline]
    pub fn get(&self, name: &str) -> Option<Arc<Destination>> {
        self.map.load().get(name).cloned()
    }

    pub fn get_or_create(&self, name: &str) -> Result<Arc<Destination>, TooManyDestinations> {
        if let Some(found) = self.get(name) {
            return Ok(found);
        }
        let _creating = self.create.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.map.load_full();
        if let Some(found) = current.get(name) {
            return Ok(found.clone());
        }
        if current.len() >= self.max {
            return Err(TooManyDestinations(self.max));
        }
        let destination = Destination::new(name, Resolution::Pending);
        let mut next = HashMap::clone(&current);
        next.insert(name.into(), destination.clone());
        self.map.store(Arc::new(next));
        (self.on_new)(&destination);
        Ok(destination)
    }

    pub fn all(&self) -> Vec<Arc<Destination>> {
        let mut all: Vec<_> = self.map.load().values().cloned().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Drops destinations unused for `idle`; their discovery watches end.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let _creating = self.create.lock().unwrap_or_else(|e| e.into_inner());
        let now = clock::now();
        let current = self.map.load_full();
        let (keep, evict): (Vec<_>, Vec<_>) = current.iter().partition(|(_, d)| {
            u64::from(now.saturating_sub(d.last_used.load(Ordering::Relaxed))) < idle.as_secs()
        });
        if evict.is_empty() {
            return 0;
        }
        for (name, destination) in &evict {
            tracing::debug!(destination = %name, "evicting idle destination");
            destination.gone.store(true, Ordering::Relaxed);
            destination.evicted.notify_one();
        }
        let next: HashMap<_, _> = keep
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.map.store(Arc::new(next));
        evict.len()
    }
}
