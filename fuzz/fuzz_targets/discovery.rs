//! The discovery updates a proxy receives (`tandem.discovery.v1` Watch responses):
//! `tandem_proxy::discovery::ViewBuilder::apply` (snapshots, chunked snapshots,
//! deltas, with `EndpointMeta::from_proto`, `Policy::from_proto`), then what the
//! proxy makes of each view it yields: the balancer (`balancer::Balancer::build`,
//! as `destination::BackendSet::new` calls it) and picks from it.
//!
//! Input: one mode byte, then
//! - even: a stream of length-delimited prost-encoded `Update`s (the gRPC stream's
//!   messages), decoded until one does not decode;
//! - odd: updates built with `arbitrary` from the rest, with addresses and zones
//!   mostly drawn from small pools so that snapshots and deltas meet.
//!
//! Checks, beyond "no panic": a view has the version of the update that made it
//! and its endpoints under their own addresses with weights of at least 1; a
//! balancer picks only endpoints that exist, that are not draining and have weight;
//! it picks when some endpoint is healthy; its expected shares are in [0, 1] and sum
//! to 1 when it picks.

#![no_main]

use std::collections::HashMap;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tandem_proto::discovery::v1 as pb;
use tandem_proxy::balancer::{Balancer, BalancerConfig, EndpointView, Health, Origin, SlowStart};
use tandem_proxy::discovery::{ServiceView, ViewBuilder};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let updates = if mode & 1 == 0 {
        decode_stream(rest)
    } else {
        build_updates(rest)
    };
    let mut builder = ViewBuilder::default();
    for (n, update) in updates.iter().enumerate() {
        match builder.apply(update) {
            Ok(Some(view)) => {
                let view = view.clone();
                check_view(&view, update);
                check_balancer(&view, mode, n as u64);
            }
            Ok(None) => {}
            // The stream is re-opened; a fresh builder gets the fresh snapshot.
            Err(_) => builder = ViewBuilder::default(),
        }
    }
});

fn decode_stream(mut bytes: &[u8]) -> Vec<pb::Update> {
    let mut updates = Vec::new();
    while !bytes.is_empty() && updates.len() < 64 {
        match pb::Update::decode_length_delimited(&mut bytes) {
            Ok(update) => updates.push(update),
            Err(_) => break,
        }
    }
    updates
}

fn check_view(view: &ServiceView, update: &pb::Update) {
    assert_eq!(view.version, update.version, "a view with another version");
    for (address, meta) in &view.endpoints {
        assert_eq!(*address, meta.address);
        assert!(meta.weight >= 1, "weight 0 accepted");
    }
}

fn check_balancer(view: &ServiceView, mode: u8, seed: u64) {
    let config = BalancerConfig {
        slow_start: (mode & 2 != 0).then(|| SlowStart::new(std::time::Duration::from_secs(30))),
        ..BalancerConfig::default()
    };
    let endpoints: Vec<EndpointView<'_>> = view
        .endpoints
        .values()
        .enumerate()
        .map(|(i, m)| EndpointView {
            weight: m.weight,
            health: m.health,
            // Some ejected, some ramping up, from the mode byte.
            ejected: mode & 4 != 0 && i % 3 == 0,
            region: &m.locality.region,
            zone: &m.locality.zone,
            healthy_for: (mode & 8 != 0).then(|| std::time::Duration::from_secs(i as u64 % 40)),
        })
        .collect();
    let locality = view.proxy_locality.clone().unwrap_or_default();
    let origin = Origin {
        region: &locality.region,
        zone: &locality.zone,
        callers: Some(&view.caller_shares).filter(|c| !c.is_empty()),
    };
    let balancer = Balancer::build(&endpoints, &origin, &config, seed);
    let any_healthy = endpoints
        .iter()
        .any(|e| e.health == Health::Healthy && e.weight > 0 && !e.ejected);
    let mut picked = false;
    for _ in 0..32 {
        match balancer.pick() {
            Ok(i) => {
                picked = true;
                let e = endpoints
                    .get(i)
                    .expect("picked an endpoint that does not exist");
                assert_ne!(e.health, Health::Draining, "picked a draining endpoint");
                assert!(e.weight > 0);
            }
            Err(_) => assert!(
                !any_healthy,
                "no pick with healthy endpoints ({:?}, loads {:?}, callers {:?})",
                balancer.mode(),
                balancer.loads(),
                view.caller_shares
            ),
        }
    }
    let shares = balancer.expected_shares();
    assert_eq!(shares.len(), endpoints.len());
    for s in &shares {
        assert!(s.is_finite() && (0.0..=1.0 + 1e-9).contains(s), "share {s}");
    }
    if picked {
        let sum: f64 = shares.iter().sum();
        assert!(
            (sum - 1.0).abs() < 1e-6,
            "shares sum to {sum}: {:?}",
            balancer.loads()
        );
    }
    let _ = balancer.effective_weights();
    let _ = balancer.pickable();
}

// --- structured updates ---------------------------------------------------------------

#[derive(Arbitrary, Debug)]
enum Addr {
    Pool(u8),
    V6(u8),
    Raw(String),
}

impl Addr {
    fn text(&self) -> String {
        match self {
            Addr::Pool(n) => format!("10.0.0.{}:80", n % 8),
            Addr::V6(n) => format!("[fd00::{}]:{}", n % 4, 8080 + (n / 4) as u16 % 2),
            Addr::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Name {
    Pool(u8),
    Raw(String),
}

impl Name {
    fn text(&self) -> String {
        match self {
            Name::Pool(n) => ["", "zone-a", "zone-b", "zone-c", "region-1", "region-2"]
                [*n as usize % 6]
                .to_string(),
            Name::Raw(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Loc {
    region: Name,
    zone: Name,
    subzone: Name,
}

impl Loc {
    fn proto(&self) -> pb::Locality {
        pb::Locality {
            region: self.region.text(),
            zone: self.zone.text(),
            subzone: self.subzone.text(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Ep {
    address: Addr,
    weight: u32,
    locality: Option<Loc>,
    health: i32,
    protocol: i32,
    name: String,
}

impl Ep {
    fn proto(&self) -> pb::Endpoint {
        pb::Endpoint {
            address: self.address.text(),
            weight: self.weight,
            locality: self.locality.as_ref().map(Loc::proto),
            health: self.health,
            identity: String::new(),
            protocol: self.protocol,
            name: self.name.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Pol {
    check: Option<(String, u32, u32, u32, u32)>,
    timeout_ms: u32,
}

impl Pol {
    fn proto(&self) -> pb::Policy {
        pb::Policy {
            health_check: self
                .check
                .as_ref()
                .map(|(path, i, t, u, h)| pb::HealthCheck {
                    path: path.clone(),
                    interval_ms: *i,
                    timeout_ms: *t,
                    unhealthy_threshold: *u,
                    healthy_threshold: *h,
                }),
            request_timeout_ms: self.timeout_ms,
        }
    }
}

fn shares(list: &[(Name, f64)]) -> HashMap<String, f64> {
    list.iter().map(|(z, s)| (z.text(), *s)).collect()
}

#[derive(Arbitrary, Debug)]
enum Change {
    Snapshot {
        service: String,
        proxy_locality: Option<Loc>,
        caller_shares: Vec<(Name, f64)>,
        endpoints: Vec<Ep>,
        traffic_distribution: String,
        policy: Option<Pol>,
        continued: bool,
    },
    Delta {
        added: Vec<Ep>,
        changed: Vec<Ep>,
        removed: Vec<Addr>,
        caller_shares: Option<Vec<(Name, f64)>>,
        proxy_locality: Option<Loc>,
        traffic_distribution: Option<String>,
        policy: Option<Pol>,
    },
}

#[derive(Arbitrary, Debug)]
struct Up {
    /// Small steps, so that versions repeat, go back and move on.
    version: u8,
    change: Option<Change>,
}

fn build_updates(bytes: &[u8]) -> Vec<pb::Update> {
    let mut u = Unstructured::new(bytes);
    let mut updates = Vec::new();
    while !u.is_empty() && updates.len() < 64 {
        let Ok(up) = Up::arbitrary(&mut u) else {
            break;
        };
        updates.push(pb::Update {
            version: up.version as u64,
            change: up.change.map(|c| match c {
                Change::Snapshot {
                    service,
                    proxy_locality,
                    caller_shares,
                    endpoints,
                    traffic_distribution,
                    policy,
                    continued,
                } => pb::update::Change::Snapshot(pb::Snapshot {
                    service,
                    proxy_locality: proxy_locality.as_ref().map(Loc::proto),
                    caller_shares: shares(&caller_shares),
                    endpoints: endpoints.iter().map(Ep::proto).collect(),
                    traffic_distribution,
                    policy: policy.as_ref().map(Pol::proto),
                    continued,
                }),
                Change::Delta {
                    added,
                    changed,
                    removed,
                    caller_shares,
                    proxy_locality,
                    traffic_distribution,
                    policy,
                } => pb::update::Change::Delta(pb::Delta {
                    added: added.iter().map(Ep::proto).collect(),
                    changed: changed.iter().map(Ep::proto).collect(),
                    removed: removed.iter().map(Addr::text).collect(),
                    caller_shares: caller_shares.map(|s| pb::CallerShares {
                        by_zone: shares(&s),
                    }),
                    proxy_locality: proxy_locality.as_ref().map(Loc::proto),
                    traffic_distribution,
                    policy: policy.as_ref().map(Pol::proto),
                }),
            }),
        });
    }
    updates
}
