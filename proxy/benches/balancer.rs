//! Balancer cost: a pick with 2, 100 and 10,000 endpoints (equal and mixed weights),
//! and rebuilding the balancer after a discovery update of 10,000 endpoints.
//!
//! `cargo bench -p tandem-proxy --bench balancer`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tandem_proxy::balancer::{Balancer, EndpointView, Health};

fn endpoints(n: usize, mixed: bool) -> Vec<EndpointView> {
    (0..n)
        .map(|i| EndpointView {
            weight: if mixed { 1 + (i as u32 * 7) % 10 } else { 1 },
            health: if i % 17 == 16 {
                Health::Unhealthy
            } else {
                Health::Healthy
            },
        })
        .collect()
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [2usize, 100, 10_000] {
        for mixed in [false, true] {
            let views = endpoints(n, mixed);
            let balancer = Balancer::new(&views, 12345);
            let label = if mixed {
                "mixed-weights"
            } else {
                "equal-weights"
            };
            group.bench_with_input(BenchmarkId::new(label, n), &balancer, |b, balancer| {
                b.iter(|| black_box(balancer.pick()))
            });
        }
    }
    group.finish();
}

fn rebuild(c: &mut Criterion) {
    let mut group = c.benchmark_group("rebuild");
    for mixed in [false, true] {
        let views = endpoints(10_000, mixed);
        let label = if mixed {
            "mixed-weights"
        } else {
            "equal-weights"
        };
        group.bench_with_input(BenchmarkId::new(label, 10_000), &views, |b, views| {
            b.iter(|| black_box(Balancer::new(views, 7)))
        });
    }
    group.finish();
}

criterion_group!(benches, pick, rebuild);
criterion_main!(benches);
