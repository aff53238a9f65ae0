//! One manager task per destination: it owns everything about the destination's
//! endpoints that changes over time and rebuilds the immutable [`BackendSet`] the
//! request path reads whenever any of it changes.
//!
//! - the endpoints themselves, from discovery (or the static list);
//! - passive outlier detection: the request path counts consecutive failures per
//!   endpoint and reports the one that reaches the threshold; the manager ejects the
//!   endpoint for `base × times ejected` (capped), never more than the configured
//!   share of the set but always at least one endpoint (Envoy's rules and defaults);
//! - optional active HTTP health checks, from the service's policy;
//! - slow start: while an endpoint that just became healthy ramps up, the set is
//!   rebuilt every second with its growing weight.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tandem_balancer::{BalancerConfig, Health};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::destination::{
    Backend, BackendSet, Destination, EndpointState, LocalHealth, Placement, Resolution,
};
use crate::endpoint::EndpointMeta;
use crate::policy::HealthCheck;
use crate::pool::UpstreamSettings;
use crate::view::{ProxyLocality, ServiceView};

/// Passive outlier detection, with Envoy's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: f64,
}

impl OutlierConfig {
    /// How many of `total` endpoints may be ejected at once: the configured share,
    /// rounded down, but always at least one.
    pub fn max_ejected(&self, total: usize) -> usize {
        ((total as f64 * self.max_ejection_percent / 100.0).floor() as usize).max(1)
    }

    /// How long an endpoint's `times`-th ejection in a row lasts: the base time that
    /// many times, up to the maximum (never below the base).
    pub fn ejection_time(&self, times: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(times)
            .min(self.max_ejection_time.max(self.base_ejection_time))
    }
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10.0,
        }
    }
}

/// What every manager of this proxy shares.
pub struct ManagerSettings {
    pub upstream: Arc<UpstreamSettings>,
    pub balancer: BalancerConfig,
    pub outlier: OutlierConfig,
    pub locality: Arc<ProxyLocality>,
}

/// The span of a destination's tasks (its discovery watch and its manager), so that
/// their log lines name it. A root span: the request that happened to create the
/// destination is not what its tasks are about.
pub fn span(destination: &Destination) -> tracing::Span {
    tracing::info_span!(parent: None, "destination", destination = %destination.name())
}

/// A destination whose endpoints never change (`--backends`, the app behind the
/// inbound listener), with its manager running for the process's life (health,
/// outlier detection and pools work as for any other).
pub fn spawn_fixed(
    name: &str,
    endpoints: Vec<EndpointMeta>,
    settings: Arc<ManagerSettings>,
) -> Arc<Destination> {
    use tracing::Instrument;
    let view = ServiceView {
        service: name.into(),
        endpoints: endpoints.into_iter().map(|e| (e.address, e)).collect(),
        ..Default::default()
    };
    let destination = Destination::new(name, Resolution::Pending);
    let (views, views_rx) = watch::channel(Some(view));
    let manager = Manager::new(destination.clone(), settings);
    let span = span(&destination);
    tokio::spawn(
        async move {
            // Holding the sender keeps the manager running.
            let _views = views;
            manager.run(views_rx).await;
        }
        .instrument(span),
    );
    destination
}

/// How often the set is rebuilt while an endpoint ramps up (slow start).
const RAMP_STEP: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Checks {
    failures: u32,
    successes: u32,
    /// Out of rotation because active checks failed.
    failed: bool,
    next: Option<Instant>,
    running: bool,
}

struct Tracked {
    state: Arc<EndpointState>,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    last_ejection_end: Option<Instant>,
    /// When it last became healthy (None: healthy since before we knew it, no ramp).
    healthy_since: Option<Instant>,
    was_healthy: bool,
    checks: Checks,
}

pub struct Manager {
    destination: Arc<Destination>,
    settings: Arc<ManagerSettings>,
    endpoints: HashMap<SocketAddr, Tracked>,
    view: Option<ServiceView>,
    reports_tx: mpsc::UnboundedSender<SocketAddr>,
    reports_rx: mpsc::UnboundedReceiver<SocketAddr>,
    checks: JoinSet<(SocketAddr, bool)>,
    seed: u64,
}

impl Manager {
    pub fn new(destination: Arc<Destination>, settings: Arc<ManagerSettings>) -> Self {
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        Self {
            destination,
            settings,
            endpoints: HashMap::new(),
            view: None,
            reports_tx,
            reports_rx,
            checks: JoinSet::new(),
            seed: fastrand::u64(..),
        }
    }

    /// Runs until the views' sender is gone.
    pub async fn run(mut self, mut views: watch::Receiver<Option<ServiceView>>) {
        if let Some(view) = views.borrow_and_update().clone() {
            self.apply_view(view, true);
            self.rebuild(Instant::now());
        }
        loop {
            let timer = self.next_timer();
            let rebuild = tokio::select! {
                changed = views.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    match views.borrow_and_update().clone() {
                        Some(view) => {
                            let first = self.view.is_none();
                            self.apply_view(view, first);
                            true
                        }
                        None => false,
                    }
                }
                Some(addr) = self.reports_rx.recv() => self.eject(addr, Instant::now()),
                Some(Ok((addr, ok))) = self.checks.join_next(), if !self.checks.is_empty() => {
                    self.check_done(addr, ok, Instant::now())
                }
                _ = sleep_until(timer), if timer.is_some() => self.on_timer(Instant::now()),
            };
            if rebuild {
                self.rebuild(Instant::now());
            }
        }
    }

    fn apply_view(&mut self, view: ServiceView, first: bool) {
        let now = Instant::now();
        self.endpoints
            .retain(|addr, _| view.endpoints.contains_key(addr));
        for meta in view.endpoints.values() {
            let healthy = meta.health == Health::Healthy;
            // An address whose identity changed is another peer (a new pod): its
            // connections, made for the old identity, must not be reused.
            if self
                .endpoints
                .get(&meta.address)
                .is_some_and(|t| t.state.upstream.identity() != meta.identity)
            {
                self.endpoints.remove(&meta.address);
            }
            let tracked = self
                .endpoints
                .entry(meta.address)
                .or_insert_with(|| Tracked {
                    state: Arc::new(EndpointState::new(
                        meta.address,
                        &meta.identity,
                        &self.settings.upstream,
                        self.settings.outlier.consecutive_failures,
                        self.reports_tx.clone(),
                    )),
                    ejected_until: None,
                    times_ejected: 0,
                    last_ejection_end: None,
                    // Endpoints of the first answer are not new: no ramp for them.
                    healthy_since: None,
                    was_healthy: first && healthy,
                    checks: Checks::default(),
                });
            if healthy && !tracked.was_healthy {
                tracked.healthy_since = Some(now);
            }
            tracked.was_healthy = healthy;
        }
        let checks_on = view.policy.health_check.is_some();
        for tracked in self.endpoints.values_mut() {
            if !checks_on {
                tracked.checks = Checks::default();
            } else if tracked.checks.next.is_none() && !tracked.checks.running {
                // Spread the first checks over one interval.
                let interval = view
                    .policy
                    .health_check
                    .as_ref()
                    .map_or(Duration::ZERO, |h| h.interval);
                tracked.checks.next = Some(now + interval.mul_f64(fastrand::f64()));
            }
        }
        self.view = Some(view);
    }

    fn rebuild(&mut self, now: Instant) {
        let Some(view) = &self.view else { return };
        let window = self.settings.balancer.slow_start.map(|s| s.window);
        let mut backends = Vec::with_capacity(view.endpoints.len());
        let mut local = Vec::with_capacity(view.endpoints.len());
        for meta in view.endpoints.values() {
            let Some(tracked) = self.endpoints.get(&meta.address) else {
                continue;
            };
            let healthy_for = tracked
                .healthy_since
                .map(|since| now.saturating_duration_since(since))
                .filter(|age| window.is_some_and(|w| *age < w));
            local.push(LocalHealth {
                ejected: tracked.ejected_until.is_some() || tracked.checks.failed,
                healthy_for,
            });
            backends.push(Backend {
                meta: meta.clone(),
                state: tracked.state.clone(),
            });
        }
        let placement = Placement {
            proxy_locality: self.settings.locality.current(),
            caller_shares: view.caller_shares.clone(),
            config: self.settings.balancer,
        };
        self.seed = self
            .seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let set = BackendSet::new(
            view.version,
            view.service.clone(),
            backends,
            local,
            placement,
            view.policy.clone(),
            self.seed,
        );
        tracing::debug!(
            version = set.version,
            endpoints = set.backends.len(),
            pickable = set.balancer.pickable(),
            mode = ?set.balancer.mode(),
            "backend set rebuilt"
        );
        self.destination.set(Resolution::Ready(Arc::new(set)));
    }

    /// Ejects `addr` after consecutive failures, if the ejection limit allows.
    fn eject(&mut self, addr: SocketAddr, now: Instant) -> bool {
        let outlier = self.settings.outlier;
        let total = self.endpoints.len();
        let ejected = self
            .endpoints
            .values()
            .filter(|t| t.ejected_until.is_some())
            .count();
        let limit = outlier.max_ejected(total);
        let Some(tracked) = self.endpoints.get_mut(&addr) else {
            return false;
        };
        if tracked.ejected_until.is_some() {
            return false;
        }
        if ejected >= limit {
            tracing::debug!(%addr, limit, "not ejecting: the ejection limit is reached");
            tracked.state.reset_failures();
            return false;
        }
        // A host that stayed in rotation long enough starts over at the base time.
        if let Some(end) = tracked.last_ejection_end
            && now.saturating_duration_since(end)
                >= outlier.base_ejection_time * tracked.times_ejected.max(1)
        {
            tracked.times_ejected = 0;
        }
        tracked.times_ejected += 1;
        let duration = outlier.ejection_time(tracked.times_ejected);
        tracked.ejected_until = Some(now + duration);
        self.destination
            .stats
            .ejections
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            endpoint = %addr,
            failures = outlier.consecutive_failures,
            ejected_for = ?duration,
            "ejecting an endpoint after consecutive failures"
        );
        true
    }

    fn check_done(&mut self, addr: SocketAddr, ok: bool, now: Instant) -> bool {
        let Some(check) = self
            .view
            .as_ref()
            .and_then(|v| v.policy.health_check.clone())
        else {
            return false;
        };
        let Some(tracked) = self.endpoints.get_mut(&addr) else {
            return false;
        };
        let c = &mut tracked.checks;
        c.running = false;
        c.next = Some(now + check.interval);
        let was_failed = c.failed;
        if ok {
            c.successes += 1;
            c.failures = 0;
            if c.failed && c.successes >= check.healthy_threshold {
                c.failed = false;
                tracked.healthy_since = Some(now);
                tracing::info!(endpoint = %addr, "health checks pass again");
            }
        } else {
            c.failures += 1;
            c.successes = 0;
            if !c.failed && c.failures >= check.unhealthy_threshold {
                c.failed = true;
                tracing::warn!(endpoint = %addr, path = %check.path, "health checks fail; out of rotation");
            }
        }
        was_failed != c.failed
    }

    fn next_timer(&self) -> Option<Instant> {
        let window = self.settings.balancer.slow_start.map(|s| s.window);
        self.endpoints
            .values()
            .flat_map(|t| {
                let ramp = match (window, t.healthy_since) {
                    (Some(w), Some(since)) if since.elapsed() < w => {
                        Some(Instant::now() + RAMP_STEP)
                    }
                    _ => None,
                };
                [
                    t.ejected_until,
                    t.checks.next.filter(|_| !t.checks.running),
                    ramp,
                ]
            })
            .flatten()
            .min()
    }

    fn on_timer(&mut self, now: Instant) -> bool {
        let mut rebuild = false;
        let check = self
            .view
            .as_ref()
            .and_then(|v| v.policy.health_check.clone());
        let window = self.settings.balancer.slow_start.map(|s| s.window);
        for (addr, tracked) in &mut self.endpoints {
            if tracked.ejected_until.is_some_and(|until| until <= now) {
                tracked.ejected_until = None;
                tracked.last_ejection_end = Some(now);
                tracked.healthy_since = Some(now);
                tracked.state.reset_failures();
                tracing::info!(endpoint = %addr, "ejection ended; back in rotation");
                rebuild = true;
            }
            if let (Some(w), Some(since)) = (window, tracked.healthy_since)
                && now.saturating_duration_since(since) < w + RAMP_STEP
            {
                rebuild = true;
            }
            if let Some(check) = &check
                && !tracked.checks.running
                && tracked.checks.next.is_some_and(|next| next <= now)
            {
                tracked.checks.running = true;
                tracked.checks.next = None;
                self.checks.spawn(probe(*addr, check.clone()));
            }
        }
        rebuild
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// One active health check: `GET path` on a fresh connection, healthy on any 2xx.
async fn probe(addr: SocketAddr, check: HealthCheck) -> (SocketAddr, bool) {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let request = http::Request::get(check.path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "tandem-health-check")
            .body(Empty::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        Some(response.status().is_success())
    };
    let ok = matches!(
        tokio::time::timeout(check.timeout, attempt).await,
        Ok(Some(true))
    );
    (addr, ok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::EndpointMeta;
    use crate::view::ProxyLocality;

    const BASE: Duration = Duration::from_secs(30);

    fn outlier(max_ejection_percent: f64) -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection_time: BASE,
            max_ejection_time: Duration::from_secs(100),
            max_ejection_percent,
        }
    }

    /// A manager of `n` endpoints, all healthy, with no timer or socket of its own:
    /// the tests hand it the time and the failures' reports.
    fn manager(outlier: OutlierConfig, n: u8) -> (Manager, Vec<SocketAddr>) {
        let settings = Arc::new(ManagerSettings {
            upstream: Arc::new(UpstreamSettings::default()),
            balancer: BalancerConfig::default(),
            outlier,
            locality: Arc::new(ProxyLocality::new(None)),
        });
        let addrs: Vec<SocketAddr> = (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        let view = ServiceView {
            service: "web".into(),
            endpoints: addrs
                .iter()
                .map(|a| (*a, EndpointMeta::static_backend(*a)))
                .collect(),
            ..Default::default()
        };
        let destination = Destination::new("web:80", Resolution::Pending);
        let mut manager = Manager::new(destination, settings);
        manager.apply_view(view, true);
        manager.rebuild(Instant::now());
        (manager, addrs)
    }

    impl Manager {
        /// `n` failed requests to `addr`, as the request path counts them.
        fn fail(&self, addr: SocketAddr, n: u32) {
            for _ in 0..n {
                self.endpoints[&addr].state.failed();
            }
        }

        fn succeed(&self, addr: SocketAddr) {
            self.endpoints[&addr].state.succeeded();
        }

        /// The endpoints the request path reported (each reached the threshold).
        fn reports(&mut self) -> Vec<SocketAddr> {
            std::iter::from_fn(|| self.reports_rx.try_recv().ok()).collect()
        }

        /// Handles the reports as `run` does at `now`; true if any was ejected.
        fn handle_reports(&mut self, now: Instant) -> bool {
            let mut ejected = false;
            for addr in self.reports() {
                ejected |= self.eject(addr, now);
            }
            if ejected {
                self.rebuild(now);
            }
            ejected
        }

        fn ejected_until(&self, addr: SocketAddr) -> Option<Instant> {
            self.endpoints[&addr].ejected_until
        }

        /// Whether the backend set the request path reads has `addr` ejected.
        fn ejected_in_set(&self, addr: SocketAddr) -> bool {
            let Resolution::Ready(set) = &**self.destination.resolution() else {
                panic!("no backend set");
            };
            let i = set
                .backends
                .iter()
                .position(|b| b.meta.address == addr)
                .unwrap();
            set.local[i].ejected
        }

        fn ejections(&self) -> u64 {
            self.destination.stats.ejections.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn consecutive_failures_reaching_the_threshold_eject() {
        let (mut m, addrs) = manager(outlier(100.0), 3);
        let (a, now) = (addrs[0], Instant::now());
        m.fail(a, 4);
        assert!(m.reports().is_empty(), "4 failures are below the threshold");
        m.fail(a, 1);
        assert_eq!(m.reports(), [a], "the 5th is reported");
        m.fail(a, 3);
        assert!(
            m.reports().is_empty(),
            "reported once, not at every failure"
        );

        assert!(m.eject(a, now));
        m.rebuild(now);
        assert_eq!(m.ejected_until(a), Some(now + BASE));
        assert!(m.ejected_in_set(a));
        assert!(!m.ejected_in_set(addrs[1]));
        assert_eq!(m.ejections(), 1);
        // A report about an endpoint already out changes nothing.
        assert!(!m.eject(a, now + Duration::from_secs(1)));
        assert_eq!(m.ejected_until(a), Some(now + BASE));
        assert_eq!(m.ejections(), 1);
    }

    #[test]
    fn a_success_resets_the_count() {
        let (mut m, addrs) = manager(outlier(100.0), 2);
        let a = addrs[0];
        m.fail(a, 4);
        m.succeed(a);
        m.fail(a, 4);
        assert!(
            m.reports().is_empty(),
            "4 + 4 failures with a success between"
        );
        m.fail(a, 1);
        assert_eq!(m.reports(), [a], "5 in a row");
    }

    #[test]
    fn an_ejected_endpoint_comes_back_when_its_time_is_up() {
        let (mut m, addrs) = manager(outlier(100.0), 2);
        let (a, start) = (addrs[0], Instant::now());
        m.fail(a, 5);
        assert!(m.handle_reports(start));
        assert_eq!(
            m.next_timer(),
            Some(start + BASE),
            "the timer is its return"
        );

        assert!(!m.on_timer(start + BASE - Duration::from_millis(1)));
        assert!(m.ejected_until(a).is_some(), "not before its time");

        assert!(m.on_timer(start + BASE), "back: the set is rebuilt");
        m.rebuild(start + BASE);
        assert_eq!(m.ejected_until(a), None);
        assert!(!m.ejected_in_set(a));
        assert_eq!(m.next_timer(), None);
        // It starts counting afresh: failures from before the ejection are gone.
        m.fail(a, 4);
        assert!(m.reports().is_empty());
        m.fail(a, 1);
        assert_eq!(m.reports(), [a]);
    }

    #[test]
    fn ejection_time_grows_with_each_ejection_up_to_the_max() {
        let (mut m, addrs) = manager(outlier(100.0), 2);
        let a = addrs[0];
        let mut now = Instant::now();
        // Ejected again one second after each return: 30 s, 60 s, 90 s, then the max.
        for expected in [30, 60, 90, 100, 100] {
            m.fail(a, 5);
            assert!(m.handle_reports(now));
            let until = m.ejected_until(a).unwrap();
            assert_eq!(until - now, Duration::from_secs(expected));
            assert!(m.on_timer(until));
            now = until + Duration::from_secs(1);
        }
        assert_eq!(m.ejections(), 5);

        // In rotation for base × times ejected (here: 5 × 30 s) since its last
        // return: it starts over at the base time.
        let back = now - Duration::from_secs(1);
        now = back + BASE * 5;
        m.fail(a, 5);
        assert!(m.handle_reports(now));
        assert_eq!(m.ejected_until(a).unwrap() - now, BASE);
    }

    #[test]
    fn never_more_than_the_max_ejection_percent_but_always_one() {
        // 10% of 10: one at a time.
        let (mut m, addrs) = manager(outlier(10.0), 10);
        let now = Instant::now();
        m.fail(addrs[0], 5);
        assert!(m.handle_reports(now));
        m.fail(addrs[1], 5);
        assert!(!m.handle_reports(now), "a second would be 20%");
        assert_eq!(m.ejected_until(addrs[1]), None);
        assert!(!m.ejected_in_set(addrs[1]));
        assert_eq!(m.ejections(), 1);
        // Its count starts over: it is reported again after 5 more failures, and is
        // ejected once the first is back.
        m.fail(addrs[1], 4);
        assert!(m.reports().is_empty());
        assert!(m.on_timer(now + BASE));
        m.fail(addrs[1], 1);
        assert!(m.handle_reports(now + BASE));
        assert!(m.ejected_until(addrs[1]).is_some());

        // 10% of 3 rounds down to none, but one is always allowed.
        let (mut m, addrs) = manager(outlier(10.0), 3);
        for a in &addrs {
            m.fail(*a, 5);
        }
        assert!(m.handle_reports(now));
        let out = addrs.iter().filter(|a| m.ejected_until(**a).is_some());
        assert_eq!(out.count(), 1);

        // 30% of 10: three.
        let (mut m, addrs) = manager(outlier(30.0), 10);
        for a in &addrs {
            m.fail(*a, 5);
        }
        m.handle_reports(now);
        let out = addrs.iter().filter(|a| m.ejected_until(**a).is_some());
        assert_eq!(out.count(), 3);
        assert_eq!(m.ejections(), 3);
    }

    #[test]
    fn the_limit_and_the_times_as_numbers() {
        let o = outlier(10.0);
        assert_eq!(
            [1, 3, 9, 10, 19, 20, 100].map(|n| o.max_ejected(n)),
            [1, 1, 1, 1, 1, 2, 10]
        );
        assert_eq!(outlier(100.0).max_ejected(4), 4);
        assert_eq!(outlier(0.0).max_ejected(4), 1);
        let secs = |times| o.ejection_time(times).as_secs();
        assert_eq!([1, 2, 3, 4, 1000].map(secs), [30, 60, 90, 100, 100]);
        // A maximum below the base: the base.
        let short = OutlierConfig {
            max_ejection_time: Duration::from_secs(10),
            ..o
        };
        assert_eq!(short.ejection_time(3), BASE);
    }
}
