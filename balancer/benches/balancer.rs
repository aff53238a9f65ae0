//! Balancer cost: a pick with 2, 100 and 10,000 endpoints (flat, tiered by locality,
//! and zone-aware), and rebuilding the balancer after an update of 10,000 endpoints.
//!
//! `cargo bench -p tandem-balancer` (`-- --quick` for a rough figure in seconds)

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tandem_balancer::{Balancer, BalancerConfig, EndpointView, Health, Origin};

const ZONES: [(&str, &str); 3] = [("r1", "a"), ("r1", "b"), ("r2", "c")];

fn endpoints(n: usize, mixed: bool) -> Vec<EndpointView<'static>> {
    (0..n)
        .map(|i| EndpointView {
            weight: if mixed { 1 + (i as u32 * 7) % 10 } else { 1 },
            // One endpoint in 17 unhealthy, and zone a short of capacity when n is large.
            health: if i % 17 == 16 || (i % 3 == 0 && i % 5 == 0) {
                Health::Unhealthy
            } else {
                Health::Healthy
            },
            ejected: false,
            region: ZONES[i % 3].0,
            zone: ZONES[i % 3].1,
            healthy_for: None,
        })
        .collect()
}

fn callers() -> BTreeMap<String, f64> {
    [
        ("a".to_string(), 40.0),
        ("b".to_string(), 40.0),
        ("c".to_string(), 20.0),
    ]
    .into()
}

fn pick(c: &mut Criterion) {
    let callers = callers();
    let config = BalancerConfig::default();
    let modes: [(&str, Origin<'_>); 3] = [
        ("flat", Origin::default()),
        (
            "tiers",
            Origin {
                region: "r1",
                zone: "a",
                callers: None,
            },
        ),
        (
            "zone-aware",
            Origin {
                region: "r1",
                zone: "a",
                callers: Some(&callers),
            },
        ),
    ];
    let mut group = c.benchmark_group("pick");
    for (label, origin) in &modes {
        for n in [2usize, 100, 10_000] {
            for mixed in [false, true] {
                let views = endpoints(n, mixed);
                let balancer = Balancer::build(&views, origin, &config, 12345);
                let name = format!("{label}/{}", if mixed { "mixed" } else { "equal" });
                group.bench_with_input(BenchmarkId::new(name, n), &balancer, |b, balancer| {
                    b.iter(|| black_box(balancer.pick()))
                });
            }
        }
    }
    group.finish();
}

fn rebuild(c: &mut Criterion) {
    let callers = callers();
    let origin = Origin {
        region: "r1",
        zone: "a",
        callers: Some(&callers),
    };
    let config = BalancerConfig::default();
    let mut group = c.benchmark_group("rebuild");
    for mixed in [false, true] {
        let views = endpoints(10_000, mixed);
        let label = if mixed {
            "zone-aware/mixed"
        } else {
            "zone-aware/equal"
        };
        group.bench_with_input(BenchmarkId::new(label, 10_000), &views, |b, views| {
            b.iter(|| black_box(Balancer::build(views, &origin, &config, 7)))
        });
    }
    group.finish();
}

criterion_group!(benches, pick, rebuild);
criterion_main!(benches);
