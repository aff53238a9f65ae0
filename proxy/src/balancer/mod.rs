//! The balancer: which endpoint gets the next request.
//!
//! A pure module: no I/O, no clock, no global RNG. A [`Balancer`] is built from a
//! list of endpoint views whenever the set changes (a discovery update) and then
//! answers picks from any thread without locks.
//!
//! Rules (DESIGN.md, "The balancer"): only HEALTHY endpoints are picked; DRAINING ones
//! finish in-flight work and get nothing new; within the healthy set, smooth weighted
//! round-robin ([`sequence::WeightedSequence`]) starting at a per-proxy random offset so
//! a fleet of proxies does not stampede the first backend.

pub mod sequence;

use std::sync::atomic::{AtomicU64, Ordering};

use sequence::WeightedSequence;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    Healthy,
    Draining,
    Unhealthy,
}

/// What the balancer needs to know about one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointView {
    pub weight: u32,
    pub health: Health,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("the destination has no endpoints")]
    NoEndpoints,
    #[error("none of the destination's {total} endpoints is healthy")]
    NoHealthyEndpoints { total: usize },
}

#[derive(Debug)]
pub struct Balancer {
    /// Indices (into the list the balancer was built from) of the pickable endpoints.
    candidates: Box<[u32]>,
    sequence: Option<WeightedSequence>,
    cursor: AtomicU64,
    total: usize,
}

impl Balancer {
    /// `seed` sets the starting offset; pass a random value per proxy.
    pub fn new(endpoints: &[EndpointView], seed: u64) -> Self {
        let candidates: Box<[u32]> = endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.health == Health::Healthy && e.weight > 0)
            .map(|(i, _)| i as u32)
            .collect();
        let weights: Vec<u64> = candidates
            .iter()
            .map(|i| endpoints[*i as usize].weight as u64)
            .collect();
        let sequence = WeightedSequence::new(&weights);
        let start = sequence.as_ref().map_or(0, |s| seed % s.period());
        Self {
            candidates,
            sequence,
            cursor: AtomicU64::new(start),
            total: endpoints.len(),
        }
    }

    /// The index of the endpoint for the next request.
    #[inline]
    pub fn pick(&self) -> Result<usize, PickError> {
        let Some(sequence) = &self.sequence else {
            return Err(if self.total == 0 {
                PickError::NoEndpoints
            } else {
                PickError::NoHealthyEndpoints { total: self.total }
            });
        };
        let k = self.cursor.fetch_add(1, Ordering::Relaxed);
        Ok(self.candidates[sequence.index_at(k)] as usize)
    }

    /// How many endpoints can receive new requests.
    pub fn pickable(&self) -> usize {
        self.candidates.len()
    }

    /// The share of new requests endpoint `index` should receive, in [0, 1].
    pub fn expected_share(&self, endpoints: &[EndpointView], index: usize) -> f64 {
        if !self.candidates.contains(&(index as u32)) {
            return 0.0;
        }
        let total: u64 = self
            .candidates
            .iter()
            .map(|i| endpoints[*i as usize].weight as u64)
            .sum();
        endpoints[index].weight as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(weight: u32, health: Health) -> EndpointView {
        EndpointView { weight, health }
    }

    #[test]
    fn empty_and_unhealthy_sets_are_typed_errors() {
        assert_eq!(Balancer::new(&[], 0).pick(), Err(PickError::NoEndpoints));
        let set = [view(1, Health::Draining), view(1, Health::Unhealthy)];
        assert_eq!(
            Balancer::new(&set, 0).pick(),
            Err(PickError::NoHealthyEndpoints { total: 2 })
        );
    }

    #[test]
    fn only_healthy_endpoints_are_picked() {
        let set = [
            view(1, Health::Healthy),
            view(5, Health::Draining),
            view(1, Health::Unhealthy),
            view(1, Health::Healthy),
        ];
        let b = Balancer::new(&set, 42);
        let picks: Vec<usize> = (0..10).map(|_| b.pick().unwrap()).collect();
        assert!(picks.iter().all(|i| *i == 0 || *i == 3), "{picks:?}");
        assert!(
            picks.windows(2).all(|w| w[0] != w[1]),
            "alternates: {picks:?}"
        );
        assert_eq!(b.expected_share(&set, 0), 0.5);
        assert_eq!(b.expected_share(&set, 1), 0.0);
    }

    #[test]
    fn weights_split_exactly() {
        let set = [view(3, Health::Healthy), view(1, Health::Healthy)];
        let b = Balancer::new(&set, 7);
        let mut counts = [0; 2];
        for _ in 0..400 {
            counts[b.pick().unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100]);
    }

    #[test]
    fn seeds_change_the_starting_endpoint() {
        let set = vec![view(1, Health::Healthy); 10];
        let firsts: std::collections::HashSet<usize> = (0..50u64)
            .map(|seed| {
                Balancer::new(&set, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .pick()
                    .unwrap()
            })
            .collect();
        assert!(firsts.len() > 5, "{firsts:?}");
    }
}
