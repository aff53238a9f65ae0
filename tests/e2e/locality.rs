//! Locality-aware balancing measured through a real proxy: a zone keeps its traffic
//! while it has capacity and spills in proportion when it does not; callers' shares
//! route by capacity across the region's zones; `tandem simulate` predicts both.

use std::time::Duration;

use serde_json::Value;
use tandem::client::Connection;
use tandem::process::Spawned;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(180);

struct Ep {
    backend: Spawned,
    region: &'static str,
    zone: &'static str,
}

/// Backends 2/4/2 over zones a/b/c of one region: capacity 25/50/25%.
const CAPACITY_25_50_25: [(&str, &str, usize); 3] = [
    ("region-1", "zone-a", 2),
    ("region-1", "zone-b", 4),
    ("region-1", "zone-c", 2),
];

async fn zone_backends(plan: &[(&'static str, &'static str, usize)]) -> Vec<Ep> {
    let mut out = Vec::new();
    for (region, zone, n) in plan {
        for i in 1..=*n {
            out.push(Ep {
                backend: backend(&format!("{zone}-{i}")).await,
                region,
                zone,
            });
        }
    }
    out
}

/// Service `web` port 80 over `endpoints`, with their localities.
fn web_service(endpoints: &[Ep]) -> Service {
    Service::new("web", 80).endpoints(endpoints.iter().map(|e| {
        Endpoint::new(e.backend.addr("http"))
            .region(e.region)
            .zone(e.zone)
    }))
}

fn node(name: &str, zone: &str) -> Node {
    Node::new(name).region("region-1").zone(zone)
}

fn web(config: &Value) -> &Value {
    destination(config, "web:80").expect("the web destination")
}

/// `tandem simulate -o json` from a proxy in region-1/zone-a.
async fn simulate(file: &std::path::Path, extra: &[&str]) -> Value {
    let output = tokio::process::Command::new(exe())
        .args(["simulate", "--from", "region-1/zone-a", "-o", "json"])
        .args(extra)
        .arg("--config")
        .arg(file)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("simulate -o json prints JSON")
}

/// Shares of answers per zone (the instance name starts with its zone).
fn zone_shares(seen: &[String]) -> (f64, f64, f64) {
    let n = seen.len() as f64;
    let share = |z: &str| seen.iter().filter(|i| i.starts_with(z)).count() as f64 / n;
    (share("zone-a"), share("zone-b"), share("zone-c"))
}

#[tokio::test]
async fn a_zone_keeps_its_traffic_until_it_runs_short_then_spills_to_its_region() {
    bounded(LIMIT, async {
        let dir = TestDir::new("spillover");
        let mut endpoints = zone_backends(&[
            ("region-1", "zone-a", 4),
            ("region-1", "zone-b", 4),
            ("region-2", "zone-c", 4),
        ])
        .await;
        let file = dir.path("services.yaml");
        Services::new()
            .service(web_service(&endpoints))
            .node(node("node-a", "zone-a"))
            .write(&file);
        let cp = control_plane(&file).await;
        // Its locality comes from the control plane (node-a is in zone-a). Ejections last
        // the whole test, and up to half the set may be ejected.
        let proxy = proxy(
            cp.addr("discovery"),
            &[
                "--node",
                "node-a",
                "--outlier-max-ejection-percent",
                "50",
                "--outlier-base-ejection-time",
                "300s",
            ],
        )
        .await;
        let admin = proxy.addr("admin");
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();

        // min(100, 1.4 × healthy%) of zone-a's 4 endpoints, as 0, 1, 2, 3, 4 are down.
        for (down, expected_local) in [(0usize, 1.0), (1, 1.0), (2, 0.7), (3, 0.35), (4, 0.0)] {
            if down > 0 {
                let victim = &mut endpoints[down - 1];
                let addr = victim.backend.addr("http").to_string();
                victim.backend.kill().await;
                // Requests find it dead (and are retried elsewhere) until it is ejected.
                eventually(
                    Duration::from_secs(30),
                    "the killed backend to be ejected",
                    || {
                        let addr = addr.clone();
                        let proxy = proxy.addr("proxy");
                        async move {
                            let mut c = Connection::http1(proxy).await.ok()?;
                            instances(&mut c, "web", 10).await;
                            ejected(&config(admin).await, &addr).then_some(())
                        }
                    },
                )
                .await;
            }
            let seen = instances(&mut conn, "web", 2000).await;
            let (a, b, c) = zone_shares(&seen);
            assert!(
                (a - expected_local).abs() <= 0.03,
                "{down} of zone-a's 4 down: {:.1}% stayed local, the formula says {:.1}%",
                a * 100.0,
                expected_local * 100.0
            );
            // What leaves the zone goes to the same region first.
            assert!(
                c <= 0.001,
                "{down} down: {:.1}% went to another region",
                c * 100.0
            );
            assert!((a + b - 1.0).abs() < 1e-9);
        }
        let cfg = config(admin).await;
        assert_eq!(web(&cfg)["mode"], "tiers");
    })
    .await
}

#[tokio::test]
async fn callers_shares_route_by_capacity_across_zones() {
    bounded(LIMIT, async {
        let dir = TestDir::new("zone-aware");
        // Upstream capacity 25/50/25 over zones a/b/c of one region; callers 40/40/20.
        let endpoints = zone_backends(&CAPACITY_25_50_25).await;
        let file = dir.path("services.yaml");
        let callers = [("zone-a", 40.0), ("zone-b", 40.0), ("zone-c", 20.0)];
        Services::new()
            .service(web_service(&endpoints).callers(&callers))
            .node(node("node-a", "zone-a"))
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy(cp.addr("discovery"), &["--node", "node-a"]).await;
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();
        let seen = instances(&mut conn, "web", 2000).await;
        let (a, b, c) = zone_shares(&seen);
        assert!(
            (a - 0.625).abs() <= 0.03,
            "local share {:.1}%, Envoy's example says 62.5%",
            a * 100.0
        );
        assert!((b - 0.25).abs() <= 0.03, "zone-b {:.1}%", b * 100.0);
        assert!((c - 0.125).abs() <= 0.03, "zone-c {:.1}%", c * 100.0);
        let cfg = config(proxy.addr("admin")).await;
        assert_eq!(web(&cfg)["mode"], "zone_aware");

        // `tandem simulate` says the same from the same file.
        let sim = simulate(&file, &[]).await;
        let web = &sim["web.default:80"];
        assert!(
            (web["zones"]["zone-a"].as_f64().unwrap() - 0.625).abs() < 1e-9,
            "{sim}"
        );
        assert!(
            (web["cross_zone"].as_f64().unwrap() - 0.375).abs() < 1e-9,
            "{sim}"
        );
        let endpoint_total: f64 = web["endpoints"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((endpoint_total - 1.0).abs() < 1e-9);
    })
    .await
}

#[tokio::test]
async fn simulate_shows_what_losing_half_a_zone_does() {
    bounded(LIMIT, async {
        let dir = TestDir::new("simulate");
        let file = dir.path("services.yaml");
        let at = |address: &str, zone: &str| Endpoint::new(address).region("r1").zone(zone);
        Services::new()
            .service(
                Service::new("web", 80)
                    .endpoint(at("10.0.0.1:80", "a"))
                    .endpoint(at("10.0.0.2:80", "a").health(Health::Unhealthy))
                    .endpoint(at("10.0.1.1:80", "b"))
                    .endpoint(at("10.0.1.2:80", "b")),
            )
            .write(&file);
        let output = tokio::process::Command::new(exe())
            .args(["simulate", "--from", "r1/a", "--config"])
            .arg(&file)
            .output()
            .await
            .unwrap();
        let table = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{table}");
        // Half of zone a is down: 1.4 × 50% = 70% stays, 30% crosses.
        let line = |start: &str| {
            table
                .lines()
                .find(|l| l.trim_start().starts_with(start))
                .unwrap_or_else(|| panic!("no {start:?} line in\n{table}"))
                .to_string()
        };
        assert!(line("zone a ").ends_with("70.0%"), "{table}");
        assert!(line("crosses zones").ends_with("30.0%"), "{table}");

        let bad = dir.path("bad.yaml");
        std::fs::write(&bad, "services:\n  - name: web\n    port: eighty\n").unwrap();
        let output = tokio::process::Command::new(exe())
            .args(["simulate", "--from", "r1/a", "--config"])
            .arg(&bad)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success());
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains("line 3"), "{err}");
    })
    .await
}

#[tokio::test]
async fn the_control_plane_counts_callers_from_the_proxies_that_use_a_service() {
    bounded(LIMIT, async {
        let dir = TestDir::new("counted-callers");
        // Capacity 25/50/25 over zones a/b/c of one region; `callers: counted`.
        let endpoints = zone_backends(&CAPACITY_25_50_25).await;
        let file = dir.path("services.yaml");
        Services::new()
            .service(web_service(&endpoints).counted_callers())
            .node(node("node-a", "zone-a"))
            .node(node("node-b", "zone-b"))
            .write(&file);
        let cp = control_plane(&file).await;
        let discovery = cp.addr("discovery");
        // Two callers in zone-a, one in zone-b.
        let a1 = proxy(discovery, &["--node", "node-a", "--pod", "client-a1"]).await;
        let a2 = proxy(discovery, &["--node", "node-a", "--pod", "client-a2"]).await;
        let b1 = proxy(discovery, &["--node", "node-b", "--pod", "client-b1"]).await;
        for p in [&a2, &b1] {
            let mut c = Connection::http1(p.addr("proxy")).await.unwrap();
            instances(&mut c, "web", 1).await;
        }
        let mut conn = Connection::http1(a1.addr("proxy")).await.unwrap();
        instances(&mut conn, "web", 1).await;
        let admin = a1.addr("admin");
        eventually(
            Duration::from_secs(10),
            "the counted callers to reach the proxy",
            || async move {
                let cfg = config(admin).await;
                let w = web(&cfg);
                (w["callers"]["zone-a"] == 2.0
                    && w["callers"]["zone-b"] == 1.0
                    && w["mode"] == "zone_aware")
                    .then_some(())
            },
        )
        .await;
        // Callers 2/3 in a, 1/3 in b, 0 in c against capacity 1/4, 1/2, 1/4: zone-a keeps
        // 0.25 / 0.667 = 37.5%; the rest goes to spare capacity (b: 1/6, c: 1/4) → 25% / 37.5%.
        let seen = instances(&mut conn, "web", 2000).await;
        let (a, b, c) = zone_shares(&seen);
        assert!((a - 0.375).abs() <= 0.03, "zone-a {:.1}%", a * 100.0);
        assert!((b - 0.25).abs() <= 0.03, "zone-b {:.1}%", b * 100.0);
        assert!((c - 0.375).abs() <= 0.03, "zone-c {:.1}%", c * 100.0);

        // `tandem simulate` predicts it when told the callers the control plane counted.
        let sim = simulate(&file, &["--callers", "zone-a=2,zone-b=1"]).await;
        let zone_a = sim["web.default:80"]["zones"]["zone-a"].as_f64().unwrap();
        assert!((zone_a - 0.375).abs() < 1e-9, "{sim}");
    })
    .await
}
