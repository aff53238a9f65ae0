//! The balancer: which endpoint gets the next request.
//!
//! Pure, and `std` only: no I/O, no clock reads (ages are passed in), no RNG (the
//! caller passes a seed for the random start), so the proxy and `tandem simulate` run
//! the same code and every rule is tested without sockets. The `serde` feature adds
//! `Serialize` to what `/config` and `tandem simulate` print. A [`Balancer`] is built
//! from endpoint views whenever the set or its health changes, then answers picks from
//! any thread without locks. The rules, with Envoy's semantics and defaults (which
//! operators already know):
//!
//! 1. Tiers against the proxy's locality: same zone, same region, anywhere.
//! 2. A tier's health is `min(100, overprovisioning × healthy%)`; tier 0 takes its
//!    health in percent of the traffic, the next tiers the rest up to their own health,
//!    normalised when the sum is below 100 (Envoy's priority load).
//! 3. With callers' shares per zone and enough healthy endpoints, the zones of the
//!    proxy's region share the region tier by capacity: the local zone keeps
//!    `min(1, upstream_share / caller_share)` and the residual goes to the region's
//!    other zones in proportion to their spare share (Envoy's zone-aware routing).
//! 4. Within a group (a tier, or one zone of the region tier): smooth weighted
//!    round-robin ([`sequence::WeightedSequence`]), from a random offset per proxy, with
//!    optional slow start for endpoints that just became healthy.
//! 5. Only HEALTHY, non-ejected endpoints are picked; below the panic threshold of
//!    healthy endpoints, every endpoint that is not DRAINING is (panic mode).
//!
//! The hierarchy is flattened into groups, each with its share of the traffic. A pick
//! chooses a group by one deterministic weighted sequence and an endpoint by another:
//! two atomic increments, exact shares over every window of picks.

mod locality;
pub mod sequence;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use locality::Locality;
use sequence::WeightedSequence;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Health {
    #[default]
    Healthy,
    Draining,
    Unhealthy,
}

/// Slow start: an endpoint that just became healthy gets
/// `weight × max(min_weight, (age / window)^(1/aggression))` until `window` has passed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlowStart {
    pub window: Duration,
    pub aggression: f64,
    pub min_weight_percent: f64,
}

impl SlowStart {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            aggression: 1.0,
            min_weight_percent: 10.0,
        }
    }

    /// The weight factor for an endpoint healthy for `age`.
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.window || self.window.is_zero() {
            return 1.0;
        }
        let time = age.as_secs_f64() / self.window.as_secs_f64();
        time.powf(1.0 / self.aggression.max(0.01))
            .max(self.min_weight_percent / 100.0)
            .min(1.0)
    }
}

/// Every constant of the balancer, with Envoy's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BalancerConfig {
    /// Envoy's overprovisioning factor (1.4: a tier keeps all its traffic down to ~71% healthy).
    pub overprovisioning: f64,
    /// Below this share of healthy endpoints, balance over all (0.5).
    pub panic_threshold: f64,
    /// Zone-aware routing needs at least this many healthy endpoints (Envoy's min_cluster_size, 6).
    pub min_zone_aware_endpoints: usize,
    /// Off unless configured, as in Envoy.
    pub slow_start: Option<SlowStart>,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        Self {
            overprovisioning: 1.4,
            panic_threshold: 0.5,
            min_zone_aware_endpoints: 6,
            slow_start: None,
        }
    }
}

/// What the balancer needs to know about one endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EndpointView<'a> {
    pub weight: u32,
    pub health: Health,
    /// Ejected by outlier detection or failing active health checks.
    pub ejected: bool,
    pub region: &'a str,
    pub zone: &'a str,
    /// How long it has been healthy, when known (for slow start).
    pub healthy_for: Option<Duration>,
}

impl<'a> EndpointView<'a> {
    pub fn new(weight: u32, health: Health) -> Self {
        Self {
            weight,
            health,
            ejected: false,
            region: "",
            zone: "",
            healthy_for: None,
        }
    }

    fn pickable(&self) -> bool {
        self.health == Health::Healthy && !self.ejected && self.weight > 0
    }
}

/// The proxy's own place, and where its service's callers are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Origin<'a> {
    pub region: &'a str,
    pub zone: &'a str,
    /// Callers per zone (relative weights); empty when unknown.
    pub callers: Option<&'a BTreeMap<String, f64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PickError {
    NoEndpoints,
    NoHealthyEndpoints { total: usize },
}

impl fmt::Display for PickError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoEndpoints => f.write_str("the destination has no endpoints"),
            Self::NoHealthyEndpoints { total } => {
                write!(
                    f,
                    "none of the destination's {total} endpoints can take requests"
                )
            }
        }
    }
}

impl std::error::Error for PickError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Mode {
    /// The proxy's locality is unknown: one group of all healthy endpoints.
    Flat,
    /// Zone, region, anywhere tiers with spillover.
    Tiers,
    /// Tiers, with the region's zones shared by capacity against the callers.
    ZoneAware,
    /// Too few healthy endpoints: all endpoints that are not draining.
    Panic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Tier {
    Zone,
    Region,
    Anywhere,
}

/// One leaf of the hierarchy: endpoints sharing a tier (and, zone-aware, a zone).
#[derive(Debug)]
struct Group {
    tier: Tier,
    zone: Option<String>,
    members: Box<[u32]>,
    weights: Box<[u64]>,
    sequence: WeightedSequence,
    cursor: AtomicU64,
    /// Share of all traffic, in [0, 1].
    load: f64,
}

/// Loads reported by `/config` and `tandem simulate`.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct GroupLoad {
    pub tier: Tier,
    pub zone: Option<String>,
    pub load: f64,
    pub endpoints: usize,
}

/// Group loads become integer weights in basis points: precise to 0.01% of traffic,
/// and the group sequence repeats exactly at least every 10,000 picks.
const LOAD_RESOLUTION: f64 = 10_000.0;

#[derive(Debug)]
pub struct Balancer {
    mode: Mode,
    groups: Vec<Group>,
    /// Chooses a group when there is more than one.
    group_sequence: Option<WeightedSequence>,
    /// Indices into `groups` for the sequence's positions (groups with load > 0).
    group_index: Box<[u32]>,
    group_cursor: AtomicU64,
    total: usize,
}

impl Balancer {
    /// A balancer with no locality and default settings: weighted round-robin over the healthy.
    pub fn new(endpoints: &[EndpointView<'_>], seed: u64) -> Self {
        Self::build(
            endpoints,
            &Origin::default(),
            &BalancerConfig::default(),
            seed,
        )
    }

    pub fn build(
        endpoints: &[EndpointView<'_>],
        origin: &Origin<'_>,
        config: &BalancerConfig,
        seed: u64,
    ) -> Self {
        let total = endpoints.len();
        let healthy = endpoints.iter().filter(|e| e.pickable()).count();
        let panic = total > 0 && (healthy as f64) < config.panic_threshold * total as f64;
        let mut groups: Vec<(Tier, Option<String>, Vec<u32>, f64)> = Vec::new();
        let mode = if panic {
            let all: Vec<u32> = (0..total as u32)
                .filter(|i| {
                    let e = &endpoints[*i as usize];
                    e.health != Health::Draining && e.weight > 0
                })
                .collect();
            groups.push((Tier::Anywhere, None, all, 1.0));
            Mode::Panic
        } else if origin.zone.is_empty() && origin.region.is_empty() {
            let all: Vec<u32> = (0..total as u32)
                .filter(|i| endpoints[*i as usize].pickable())
                .collect();
            groups.push((Tier::Zone, None, all, 1.0));
            Mode::Flat
        } else {
            tiered_groups(endpoints, origin, config, healthy, &mut groups)
        };

        let slow_start = if panic { None } else { config.slow_start };
        let groups: Vec<Group> = groups
            .into_iter()
            .enumerate()
            .filter_map(|(g, (tier, zone, members, load))| {
                let weights: Vec<u64> = members
                    .iter()
                    .map(|i| effective_weight(&endpoints[*i as usize], slow_start))
                    .collect();
                let sequence = WeightedSequence::new(&weights)?;
                let start = seed.wrapping_add(g as u64 * 0x9E37_79B9) % sequence.period();
                Some(Group {
                    tier,
                    zone,
                    members: members.into_boxed_slice(),
                    weights: weights.into_boxed_slice(),
                    sequence,
                    cursor: AtomicU64::new(start),
                    load,
                })
            })
            .collect();
        let group_index: Box<[u32]> = (0..groups.len() as u32)
            .filter(|g| groups[*g as usize].load > 0.0)
            .collect();
        let group_sequence = if group_index.len() > 1 {
            let weights: Vec<u64> = group_index
                .iter()
                .map(|g| {
                    (groups[*g as usize].load * LOAD_RESOLUTION)
                        .round()
                        .max(1.0) as u64
                })
                .collect();
            WeightedSequence::new(&weights)
        } else {
            None
        };
        let group_start = group_sequence
            .as_ref()
            .map_or(0, |s| (seed >> 17) % s.period());
        Self {
            mode,
            groups,
            group_sequence,
            group_index,
            group_cursor: AtomicU64::new(group_start),
            total,
        }
    }

    /// The index of the endpoint for the next request.
    #[inline]
    pub fn pick(&self) -> Result<usize, PickError> {
        let group = match (&self.group_sequence, self.group_index.first()) {
            (Some(sequence), _) => {
                let k = self.group_cursor.fetch_add(1, Ordering::Relaxed);
                &self.groups[self.group_index[sequence.index_at(k)] as usize]
            }
            (None, Some(only)) => &self.groups[*only as usize],
            (None, None) => {
                return Err(if self.total == 0 {
                    PickError::NoEndpoints
                } else {
                    PickError::NoHealthyEndpoints { total: self.total }
                });
            }
        };
        let k = group.cursor.fetch_add(1, Ordering::Relaxed);
        Ok(group.members[group.sequence.index_at(k)] as usize)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// How many endpoints can receive new requests.
    #[inline]
    pub fn pickable(&self) -> usize {
        self.group_index
            .iter()
            .map(|g| self.groups[*g as usize].members.len())
            .sum()
    }

    /// The share of traffic each group (tier, or zone of the region tier) gets.
    pub fn loads(&self) -> Vec<GroupLoad> {
        self.groups
            .iter()
            .map(|g| GroupLoad {
                tier: g.tier,
                zone: g.zone.clone(),
                load: g.load,
                endpoints: g.members.len(),
            })
            .collect()
    }

    /// The share of new requests each endpoint should get, in [0, 1] (sums to 1).
    pub fn expected_shares(&self) -> Vec<f64> {
        let mut shares = vec![0.0; self.total];
        for g in self.groups.iter().filter(|g| g.load > 0.0) {
            let sum: u64 = g.weights.iter().sum();
            for (member, weight) in g.members.iter().zip(g.weights.iter()) {
                shares[*member as usize] += g.load * *weight as f64 / sum as f64;
            }
        }
        shares
    }

    /// The weight each endpoint is balanced with now (slow start applied), 0 if not picked.
    pub fn effective_weights(&self) -> Vec<u64> {
        let mut weights = vec![0; self.total];
        for g in &self.groups {
            for (member, weight) in g.members.iter().zip(g.weights.iter()) {
                weights[*member as usize] = *weight;
            }
        }
        weights
    }
}

/// Slow start is applied in hundredths of a weight unit, so ramps are smooth.
fn effective_weight(e: &EndpointView<'_>, slow_start: Option<SlowStart>) -> u64 {
    let base = e.weight as u64 * 100;
    match (slow_start, e.healthy_for) {
        (Some(ss), Some(age)) => ((base as f64 * ss.factor(age)).round() as u64).max(1),
        _ => base,
    }
}

/// Envoy's priority load: each tier's health, normalised, spilling over in order.
pub fn tier_loads(health: &[f64]) -> Vec<f64> {
    let total: f64 = health.iter().sum::<f64>().min(100.0);
    if total <= 0.0 {
        return vec![0.0; health.len()];
    }
    let mut remaining = 100.0;
    health
        .iter()
        .map(|h| {
            let load = (h * 100.0 / total).min(remaining);
            remaining -= load;
            load / 100.0
        })
        .collect()
}

fn tiered_groups(
    endpoints: &[EndpointView<'_>],
    origin: &Origin<'_>,
    config: &BalancerConfig,
    healthy: usize,
    groups: &mut Vec<(Tier, Option<String>, Vec<u32>, f64)>,
) -> Mode {
    let tier_of = |e: &EndpointView<'_>| {
        if e.region == origin.region && e.zone == origin.zone {
            Tier::Zone
        } else if e.region == origin.region {
            Tier::Region
        } else {
            Tier::Anywhere
        }
    };
    let zone_aware = origin.callers.is_some_and(|c| c.values().any(|v| *v > 0.0))
        && healthy >= config.min_zone_aware_endpoints;
    // With zone-aware routing, the same-zone and same-region tiers are one region tier.
    let tiers: &[&[Tier]] = if zone_aware {
        &[&[Tier::Zone, Tier::Region], &[Tier::Anywhere]]
    } else {
        &[&[Tier::Zone], &[Tier::Region], &[Tier::Anywhere]]
    };
    let health: Vec<f64> = tiers
        .iter()
        .map(|members| {
            let (all, up) = endpoints
                .iter()
                .filter(|e| members.contains(&tier_of(e)))
                .fold((0usize, 0usize), |(all, up), e| {
                    (all + 1, up + usize::from(e.pickable()))
                });
            if all == 0 {
                0.0
            } else {
                (config.overprovisioning * 100.0 * up as f64 / all as f64).min(100.0)
            }
        })
        .collect();
    let loads = tier_loads(&health);
    for (members, load) in tiers.iter().zip(loads) {
        let picked: Vec<u32> = (0..endpoints.len() as u32)
            .filter(|i| {
                let e = &endpoints[*i as usize];
                e.pickable() && members.contains(&tier_of(e))
            })
            .collect();
        if zone_aware && members.contains(&Tier::Zone) {
            for (zone, share) in zone_shares(endpoints, &picked, origin) {
                let in_zone: Vec<u32> = picked
                    .iter()
                    .copied()
                    .filter(|i| endpoints[*i as usize].zone == zone)
                    .collect();
                let tier = if zone == origin.zone {
                    Tier::Zone
                } else {
                    Tier::Region
                };
                groups.push((tier, Some(zone), in_zone, load * share));
            }
        } else {
            groups.push((members[0], None, picked, load));
        }
    }
    if zone_aware {
        Mode::ZoneAware
    } else {
        Mode::Tiers
    }
}

/// The share of the region tier each of its zones gets (Envoy's zone-aware routing):
/// the local zone keeps `min(1, upstream / callers)`, the residual goes to the other
/// zones in proportion to their spare share `max(0, upstream − callers)`.
fn zone_shares(
    endpoints: &[EndpointView<'_>],
    picked: &[u32],
    origin: &Origin<'_>,
) -> Vec<(String, f64)> {
    let mut capacity: BTreeMap<&str, f64> = BTreeMap::new();
    for i in picked {
        let e = &endpoints[*i as usize];
        *capacity.entry(e.zone).or_default() += e.weight as f64;
    }
    let total_capacity: f64 = capacity.values().sum();
    if total_capacity <= 0.0 {
        return Vec::new();
    }
    let callers = origin.callers.cloned().unwrap_or_default();
    // Callers count over the zones of this region only (ours and those with endpoints).
    let caller_of = |zone: &str| callers.get(zone).copied().unwrap_or(0.0).max(0.0);
    let total_callers: f64 = capacity
        .keys()
        .copied()
        .chain(std::iter::once(origin.zone))
        .collect::<std::collections::BTreeSet<&str>>()
        .into_iter()
        .map(caller_of)
        .sum();
    let upstream = |zone: &str| capacity.get(zone).copied().unwrap_or(0.0) / total_capacity;
    let caller = |zone: &str| {
        // Shares that do not add up to a number (an infinite one, or a sum that
        // overflows) count as unknown callers: NaN shares would route nowhere.
        if total_callers > 0.0 && total_callers.is_finite() {
            caller_of(zone) / total_callers
        } else {
            0.0
        }
    };
    let local_up = upstream(origin.zone);
    let local_callers = caller(origin.zone);
    let local = if local_callers <= 0.0 || local_up >= local_callers {
        if local_up > 0.0 { 1.0 } else { 0.0 }
    } else {
        local_up / local_callers
    };
    let others: Vec<(&str, f64)> = capacity
        .keys()
        .copied()
        .filter(|z| *z != origin.zone)
        .map(|z| (z, (upstream(z) - caller(z)).max(0.0)))
        .collect();
    let spare: f64 = others.iter().map(|(_, s)| s).sum();
    let residual = 1.0 - local;
    let mut shares = Vec::new();
    if local > 0.0 {
        shares.push((origin.zone.to_string(), local));
    }
    for (zone, s) in &others {
        let share = if spare > 0.0 {
            residual * s / spare
        } else {
            // Nobody has spare capacity (callers unknown in these zones): by capacity.
            let other_total: f64 = others.iter().map(|(z, _)| upstream(z)).sum();
            if other_total > 0.0 {
                residual * upstream(zone) / other_total
            } else {
                0.0
            }
        };
        if share > 0.0 {
            shares.push((zone.to_string(), share));
        }
    }
    shares
}

#[cfg(test)]
mod tests;
