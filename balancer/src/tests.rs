use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn ep(
    weight: u32,
    health: Health,
    region: &'static str,
    zone: &'static str,
) -> EndpointView<'static> {
    EndpointView {
        weight,
        health,
        ejected: false,
        region,
        zone,
        healthy_for: None,
    }
}

fn healthy(region: &'static str, zone: &'static str) -> EndpointView<'static> {
    ep(1, Health::Healthy, region, zone)
}

fn origin<'a>(callers: Option<&'a BTreeMap<String, f64>>) -> Origin<'a> {
    Origin {
        region: "r1",
        zone: "a",
        callers,
    }
}

/// Picks `n` times and counts per endpoint.
fn counts(b: &Balancer, total: usize, n: usize) -> Vec<usize> {
    let mut c = vec![0; total];
    for _ in 0..n {
        c[b.pick().unwrap()] += 1;
    }
    c
}

fn share_of(c: &[usize], set: &[usize]) -> f64 {
    let n: usize = c.iter().sum();
    set.iter().map(|i| c[*i]).sum::<usize>() as f64 / n as f64
}

#[test]
fn empty_and_unusable_sets_are_typed_errors() {
    assert_eq!(Balancer::new(&[], 0).pick(), Err(PickError::NoEndpoints));
    let draining = [
        ep(1, Health::Draining, "", ""),
        ep(1, Health::Draining, "", ""),
    ];
    assert_eq!(
        Balancer::new(&draining, 0).pick(),
        Err(PickError::NoHealthyEndpoints { total: 2 }),
        "draining endpoints get no new requests, not even in panic"
    );
}

#[test]
fn only_healthy_endpoints_are_picked_and_they_alternate() {
    let set = [
        ep(1, Health::Healthy, "", ""),
        ep(5, Health::Draining, "", ""),
        ep(1, Health::Healthy, "", ""),
        ep(1, Health::Healthy, "", ""),
    ];
    let b = Balancer::new(&set, 42);
    let picks: Vec<usize> = (0..12).map(|_| b.pick().unwrap()).collect();
    assert!(picks.iter().all(|i| *i != 1), "{picks:?}");
    assert!(picks.windows(2).all(|w| w[0] != w[1]), "{picks:?}");
    assert_eq!(b.mode(), Mode::Flat);
    let shares = b.expected_shares();
    assert!((shares[0] - 1.0 / 3.0).abs() < 1e-9 && shares[1] == 0.0);
}

#[test]
fn weights_split_exactly() {
    let set = [
        ep(3, Health::Healthy, "", ""),
        ep(1, Health::Healthy, "", ""),
    ];
    assert_eq!(counts(&Balancer::new(&set, 7), 2, 400), vec![300, 100]);
}

#[test]
fn local_zone_keeps_everything_until_71_percent_healthy() {
    // Zone a: 4 endpoints; the region's zone b and another region: 4 each.
    let mut set: Vec<EndpointView<'static>> = Vec::new();
    set.extend((0..4).map(|_| healthy("r1", "a")));
    set.extend((0..4).map(|_| healthy("r1", "b")));
    set.extend((0..4).map(|_| healthy("r2", "c")));
    let local = [0, 1, 2, 3];
    let config = BalancerConfig::default();
    for (down, expected_local) in [(0, 1.0), (1, 1.0), (2, 0.7), (3, 0.35), (4, 0.0)] {
        let mut s = set.clone();
        for e in s.iter_mut().take(down) {
            e.ejected = true;
        }
        let b = Balancer::build(&s, &origin(None), &config, 1);
        assert_eq!(b.mode(), Mode::Tiers);
        let c = counts(&b, s.len(), 2000);
        let got = share_of(&c, &local);
        assert!(
            (got - expected_local).abs() < 0.001,
            "{down} down: local {got}"
        );
        if down == 4 {
            // All of zone a down: the same region first.
            assert!((share_of(&c, &[4, 5, 6, 7]) - 1.0).abs() < 1e-9);
        }
    }
}

#[test]
fn envoys_zone_aware_example() {
    // Callers 40/40/20 over zones a/b/c; upstream capacity 25/50/25.
    let callers: BTreeMap<String, f64> = [
        ("a".to_string(), 40.0),
        ("b".to_string(), 40.0),
        ("c".to_string(), 20.0),
    ]
    .into();
    let mut set: Vec<EndpointView<'static>> = Vec::new();
    set.extend((0..2).map(|_| healthy("r1", "a")));
    set.extend((0..4).map(|_| healthy("r1", "b")));
    set.extend((0..2).map(|_| healthy("r1", "c")));
    let b = Balancer::build(&set, &origin(Some(&callers)), &BalancerConfig::default(), 3);
    assert_eq!(b.mode(), Mode::ZoneAware);
    let c = counts(&b, set.len(), 8000);
    assert!((share_of(&c, &[0, 1]) - 0.625).abs() < 0.001, "{c:?}");
    assert!((share_of(&c, &[2, 3, 4, 5]) - 0.25).abs() < 0.001, "{c:?}");
    assert!((share_of(&c, &[6, 7]) - 0.125).abs() < 0.001, "{c:?}");

    // Below 6 healthy endpoints, plain tiers again.
    let few = &set[..5];
    let b = Balancer::build(few, &origin(Some(&callers)), &BalancerConfig::default(), 3);
    assert_eq!(b.mode(), Mode::Tiers);
}

#[test]
fn enough_local_capacity_stays_local() {
    let callers: BTreeMap<String, f64> = [("a".to_string(), 20.0), ("b".to_string(), 80.0)].into();
    let mut set: Vec<EndpointView<'static>> = Vec::new();
    set.extend((0..4).map(|_| healthy("r1", "a")));
    set.extend((0..4).map(|_| healthy("r1", "b")));
    let b = Balancer::build(&set, &origin(Some(&callers)), &BalancerConfig::default(), 3);
    let c = counts(&b, set.len(), 1000);
    assert_eq!(share_of(&c, &[0, 1, 2, 3]), 1.0);
}

#[test]
fn panic_spreads_over_all_but_draining() {
    let set = [
        healthy("r1", "a"),
        ep(1, Health::Unhealthy, "r1", "a"),
        ep(1, Health::Unhealthy, "r1", "b"),
        ep(1, Health::Draining, "r1", "b"),
    ];
    let b = Balancer::build(&set, &origin(None), &BalancerConfig::default(), 0);
    assert_eq!(b.mode(), Mode::Panic);
    let c = counts(&b, 4, 300);
    assert_eq!(c, vec![100, 100, 100, 0]);
}

#[test]
fn slow_start_ramps_from_ten_percent() {
    let ss = SlowStart::new(Duration::from_secs(10));
    assert_eq!(ss.factor(Duration::ZERO), 0.1);
    assert!((ss.factor(Duration::from_secs(5)) - 0.5).abs() < 1e-9);
    assert_eq!(ss.factor(Duration::from_secs(11)), 1.0);
    let mut set = [healthy("", ""), healthy("", "")];
    set[1].healthy_for = Some(Duration::from_secs(1));
    let config = BalancerConfig {
        slow_start: Some(ss),
        ..Default::default()
    };
    let b = Balancer::build(&set, &Origin::default(), &config, 0);
    let c = counts(&b, 2, 1100);
    assert_eq!(c, vec![1000, 100], "the new endpoint starts at 10%");
}

/// An independent statement of the tier formula, for the property tests.
fn expected_tier_loads(set: &[EndpointView<'_>], origin: &Origin<'_>) -> [f64; 3] {
    let mut all = [0usize; 3];
    let mut up = [0usize; 3];
    for e in set {
        let t = if e.region == origin.region && e.zone == origin.zone {
            0
        } else if e.region == origin.region {
            1
        } else {
            2
        };
        all[t] += 1;
        up[t] += usize::from(e.health == Health::Healthy && !e.ejected);
    }
    let health: Vec<f64> = (0..3)
        .map(|t| {
            if all[t] == 0 {
                0.0
            } else {
                (140.0 * up[t] as f64 / all[t] as f64).min(100.0)
            }
        })
        .collect();
    let l = tier_loads(&health);
    [l[0], l[1], l[2]]
}

fn arb_endpoint() -> impl Strategy<Value = EndpointView<'static>> {
    (
        1u32..5,
        prop_oneof![
            6 => Just(Health::Healthy),
            1 => Just(Health::Draining),
            1 => Just(Health::Unhealthy)
        ],
        any::<bool>(),
        prop_oneof![Just(("r1", "a")), Just(("r1", "b")), Just(("r2", "c"))],
    )
        .prop_map(|(weight, health, ejected, (region, zone))| EndpointView {
            weight,
            health,
            ejected: ejected && health == Health::Healthy,
            region,
            zone,
            healthy_for: None,
        })
}

proptest! {
    /// Tier shares follow the formula for any health mix; ejected and unhealthy
    /// endpoints are never picked outside panic; an empty set is an error, not a panic.
    #[test]
    fn tiers_follow_the_formula(set in proptest::collection::vec(arb_endpoint(), 0..24), seed in any::<u64>()) {
        let o = origin(None);
        let b = Balancer::build(&set, &o, &BalancerConfig::default(), seed);
        if set.is_empty() {
            prop_assert_eq!(b.pick(), Err(PickError::NoEndpoints));
            return Ok(());
        }
        let healthy = set.iter().filter(|e| e.health == Health::Healthy && !e.ejected).count();
        if (healthy as f64) < 0.5 * set.len() as f64 {
            prop_assert_eq!(b.mode(), Mode::Panic);
            for _ in 0..50 {
                if let Ok(i) = b.pick() {
                    prop_assert!(set[i].health != Health::Draining);
                }
            }
            return Ok(());
        }
        let expected = expected_tier_loads(&set, &o);
        // Over one period of the group sequence, each tier gets exactly its load (± rounding).
        let period = b.group_sequence.as_ref().map_or(1, |s| s.period());
        prop_assert!(period <= 10_000 + 3, "rounding adds at most one per group");
        let mut per_tier = [0u64; 3];
        for _ in 0..period {
            let i = b.pick().unwrap();
            let e = &set[i];
            prop_assert!(e.health == Health::Healthy && !e.ejected, "picked {:?}", e);
            let t = if e.zone == "a" { 0 } else if e.region == "r1" { 1 } else { 2 };
            per_tier[t] += 1;
        }
        for t in 0..3 {
            let got = per_tier[t] as f64;
            let want = expected[t] * period as f64;
            // ±1 pick, plus half a basis point of rounding per group.
            prop_assert!((got - want).abs() <= 1.0 + period as f64 * 1e-4,
                "tier {}: {} picks, formula says {:.2} of {}", t, got, want, period);
        }
    }

    /// Within one tier: exact weight shares over any window of Σweights picks, and strict
    /// alternation with equal weights.
    #[test]
    fn weights_are_exact_within_a_tier(weights in proptest::collection::vec(1u32..8, 1..20), seed in any::<u64>()) {
        let set: Vec<EndpointView<'static>> = weights.iter().map(|w| ep(*w, Health::Healthy, "", "")).collect();
        let b = Balancer::new(&set, seed);
        let window: u64 = weights.iter().map(|w| *w as u64).sum();
        let divisor = weights.iter().fold(0u64, |g, w| gcd(g, *w as u64));
        let c = counts(&b, set.len(), (window / divisor) as usize);
        for (i, w) in weights.iter().enumerate() {
            prop_assert_eq!(c[i] as u64, *w as u64 / divisor);
        }
        if weights.iter().all(|w| *w == weights[0]) && weights.len() > 1 {
            let picks: Vec<usize> = (0..weights.len() * 2).map(|_| b.pick().unwrap()).collect();
            for pair in picks.windows(2) {
                prop_assert_ne!(pair[0], pair[1]);
            }
        }
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Fuzzing regression (issue 22, fuzz/regressions/discovery): caller shares that are
/// infinite, or whose sum overflows to infinity, made every zone's share NaN, so the
/// region tier had no group and nothing was picked with healthy endpoints (every
/// request a 503). Callers that cannot be counted are treated as unknown.
#[test]
fn fuzz_regression_infinite_caller_shares_still_pick() {
    let mut set: Vec<EndpointView<'_>> = (0..6)
        .map(|i| healthy("r1", if i % 2 == 0 { "a" } else { "b" }))
        .collect();
    set.push(healthy("r2", "c"));
    for callers in [
        BTreeMap::from([("a".to_string(), f64::INFINITY)]),
        BTreeMap::from([("b".to_string(), f64::INFINITY), ("a".to_string(), 1.0)]),
        BTreeMap::from([("a".to_string(), f64::MAX), ("b".to_string(), f64::MAX)]),
        BTreeMap::from([("a".to_string(), f64::NAN), ("b".to_string(), 1.0)]),
    ] {
        let b = Balancer::build(&set, &origin(Some(&callers)), &BalancerConfig::default(), 0);
        assert!(
            b.pick().is_ok(),
            "no pick with callers {callers:?}: {:?}",
            b.loads()
        );
        let sum: f64 = b.expected_shares().iter().sum();
        assert!(
            (sum - 1.0).abs() < 1e-9,
            "shares sum to {sum} with callers {callers:?}"
        );
    }
}
