//! What one EndpointSlice update costs the control plane, for services of 1,000 and
//! 10,000 endpoints (slices of 100): the work should follow the slice, not the service.
//!
//! `cargo bench -p tandem-control-plane --bench slices`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use tandem_control_plane::index::ServiceIndex;
use tandem_control_plane::metrics::Metrics;
use tandem_control_plane::model::Protocol;
use tandem_control_plane::source::kubernetes::state::{
    ClusterState, ServiceObj, ServicePort, SliceEndpoint, SliceObj,
};

fn slice(i: usize, ready_flip: bool) -> SliceObj {
    SliceObj {
        namespace: "default".into(),
        name: format!("web-{i}").into(),
        service: "web".into(),
        ports: vec![("http".into(), 8080)],
        endpoints: (0..100)
            .map(|j| SliceEndpoint {
                address: format!("10.{}.{}.{}", i / 256, i % 256, j + 1)
                    .parse()
                    .unwrap(),
                ready: !(ready_flip && j == 0),
                serving: true,
                terminating: false,
                node: Some(format!("node-{}", j % 30).into()),
                zone: Some(format!("zone-{}", j % 3)),
                pod: Some(format!("web-{i}-{j}").into()),
                hostname: None,
            })
            .collect(),
    }
}

fn cluster(slices: usize) -> (ClusterState, Arc<ServiceIndex>) {
    let index = Arc::new(ServiceIndex::new(
        "cluster.local",
        Arc::new(Metrics::default()),
    ));
    let mut state = ClusterState::new("cluster.local");
    state.apply_service(ServiceObj {
        namespace: "default".into(),
        name: "web".into(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Unspecified,
        }],
        cluster_ips: vec![],
        traffic_distribution: String::new(),
        policy: Default::default(),
    });
    for i in 0..slices {
        state.apply_slice(slice(i, false));
    }
    let pending = state.take_pending();
    for (key, meta) in pending.meta {
        index.upsert_meta(
            key,
            meta.cluster_ips,
            Default::default(),
            meta.traffic_distribution,
            meta.policy,
            Instant::now(),
        );
    }
    for (key, changes) in pending.endpoints {
        index.apply_changes(&key, changes, Instant::now());
    }
    index.mark_synced();
    (state, index)
}

/// One slice update, through to a published version in the index.
fn slice_update(c: &mut Criterion) {
    let mut group = c.benchmark_group("slice-update");
    for endpoints in [1_000usize, 10_000] {
        let (mut state, index) = cluster(endpoints / 100);
        let mut flip = false;
        group.bench_function(BenchmarkId::new("one-endpoint-changed", endpoints), |b| {
            b.iter(|| {
                flip = !flip;
                state.apply_slice(slice(7, flip));
                for (key, changes) in state.take_pending().endpoints {
                    black_box(index.apply_changes(&key, changes, Instant::now()));
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, slice_update);
criterion_main!(benches);
