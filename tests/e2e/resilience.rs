//! Failures a client must not notice (or must be told about clearly): a backend killed
//! under load, a backend answering 503 for everything, most backends failing (panic),
//! draining endpoints, timeouts and overload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tandem::client::Connection;
use tokio::sync::Mutex;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn a_backend_killed_under_load_costs_no_client_request() {
    bounded(LIMIT, async {
        let dir = TestDir::new("killed");
        let mut backends = Vec::new();
        for i in 1..=3 {
            backends.push(backend(&format!("instance-{i}")).await);
        }
        let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr("http")).collect();
        let file = dir.path("services.yaml");
        Services::new()
            .service(Service::new("web", 80).endpoints(addrs.iter().copied()))
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy(
            cp.addr("discovery"),
            &["--outlier-base-ejection-time", "2s"],
        )
        .await;
        let admin = proxy.addr("admin");

        // A steady load of GETs from 3 clients, the last over HTTP/2 (its requests take
        // another path to the same HTTP/1 backends).
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let answered = Arc::new(Mutex::new(Vec::<(Instant, String)>::new()));
        let mut load = Vec::new();
        for client in 0..3 {
            let (stop, failures, answered) = (stop.clone(), failures.clone(), answered.clone());
            let addr = proxy.addr("proxy");
            let connect = move || async move {
                if client == 2 {
                    Connection::http2(addr).await.unwrap()
                } else {
                    Connection::http1(addr).await.unwrap()
                }
            };
            load.push(tokio::spawn(async move {
                let mut conn = connect().await;
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn.get("web", "/").await {
                        Ok(r) if r.status.is_success() => answered
                            .lock()
                            .await
                            .push((Instant::now(), r.instance().unwrap_or("?").to_string())),
                        Ok(r) => failures
                            .lock()
                            .await
                            .push(format!("{} {}", r.status, r.text())),
                        Err(e) => {
                            failures.lock().await.push(format!("{e:#}"));
                            conn = connect().await;
                        }
                    }
                }
            }));
        }
        eventually(Duration::from_secs(10), "load to flow", || {
            let answered = answered.clone();
            async move { (answered.lock().await.len() > 100).then_some(()) }
        })
        .await;

        // SIGKILL instance-1 in the middle of it.
        let victim = addrs[0].to_string();
        backends[0].kill().await;
        eventually(Duration::from_secs(10), "instance-1 to be ejected", || {
            let victim = victim.clone();
            async move { ejected(&config(admin).await, &victim).then_some(()) }
        })
        .await;
        let cfg = config(admin).await;
        let failed = endpoint(&cfg, &victim).unwrap()["failures"]
            .as_u64()
            .unwrap();
        assert!(
            failed <= 5 + 3,
            "ejected after {failed} failures (5, plus what was in flight)"
        );

        // It comes back on the same address; after the ejection it is in rotation again.
        backends[0] = backend_with("instance-1", &["--listen", &victim]).await;
        let back = Instant::now();
        eventually(
            Duration::from_secs(20),
            "instance-1 back in rotation",
            || {
                let answered = answered.clone();
                async move {
                    let a = answered.lock().await;
                    a.iter()
                        .any(|(at, who)| *at > back && who == "instance-1")
                        .then_some(())
                }
            },
        )
        .await;

        stop.store(true, Ordering::Relaxed);
        for task in load {
            task.await.unwrap();
        }
        let failures = failures.lock().await;
        assert!(failures.is_empty(), "clients saw failures: {failures:?}");
        let metrics = admin_get(admin, "/metrics").await;
        assert!(
            metrics.contains(r#"tandem_proxy_ejections_total{direction="outbound",dst_namespace="default",dst_service="web"} 1"#),
            "{metrics}"
        );
    })
    .await
}

#[tokio::test]
async fn a_backend_answering_503_is_ejected_and_panic_spreads_load_when_most_fail() {
    bounded(LIMIT, async {
        let dir = TestDir::new("failing");
        let good = backend("good").await;
        let mut bad = Vec::new();
        for i in 1..=3 {
            bad.push(backend_with(&format!("bad-{i}"), &["--status", "503"]).await);
        }
        // One failing backend of four: ejected (10% of 4 rounds down, but one is always allowed).
        let file = dir.path("services.yaml");
        let one_bad = [good.addr("http"), bad[0].addr("http")];
        Services::new()
            .service(Service::new("web", 80).endpoints(one_bad))
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy(cp.addr("discovery"), &["--outlier-max-ejection-percent", "100", "--outlier-base-ejection-time", "300s"]).await;
        let admin = proxy.addr("admin");
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();
        let bad_addr = bad[0].addr("http").to_string();
        let mut seen_503 = 0;
        for _ in 0..20 {
            let r = conn.get("web", "/").await.unwrap();
            seen_503 += usize::from(r.status == 503);
        }
        // 5 consecutive 5xx eject it (a 6th may slip through while the set is rebuilt).
        assert!((5..=6).contains(&seen_503), "{seen_503} answers of 503");
        assert!(ejected(&config(admin).await, &bad_addr));
        let after = instances(&mut conn, "web", 20).await;
        assert!(after.iter().all(|i| i == "good"), "{after:?}");

        // Three failing of four: all ejected, 1 of 4 healthy is below the 50% panic
        // threshold, so load spreads over all four instead of crushing the last one.
        let mostly_bad =
            std::iter::once(good.addr("http")).chain(bad.iter().map(|b| b.addr("http")));
        Services::new()
            .service(Service::new("web", 80).endpoints(mostly_bad))
            .replace(&file);
        eventually(Duration::from_secs(20), "panic mode", || {
            let proxy = proxy.addr("proxy");
            async move {
                let mut c = Connection::http1(proxy).await.ok()?;
                for _ in 0..10 {
                    c.get("web", "/").await.ok()?;
                }
                let cfg = config(admin).await;
                (destination(&cfg, "web:80")?["mode"] == "panic").then_some(())
            }
        })
        .await;
        let mut good_answers = 0;
        for _ in 0..400 {
            let r = conn.get("web", "/").await.unwrap();
            good_answers += usize::from(r.status.is_success());
        }
        assert!(
            (80..=120).contains(&good_answers),
            "in panic the healthy endpoint takes its share (~100 of 400), not everything: {good_answers}"
        );
    })
    .await
}

#[tokio::test]
async fn draining_endpoints_finish_in_flight_requests_and_get_no_new_ones() {
    bounded(LIMIT, async {
        let dir = TestDir::new("draining");
        let a = backend("instance-1").await;
        let b = backend("instance-2").await;
        let file = dir.path("services.yaml");
        Services::new()
            .service(Service::new("web", 80).endpoints([a.addr("http"), b.addr("http")]))
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy(cp.addr("discovery"), &[]).await;
        let addr = proxy.addr("proxy");

        // Requests alternate: after one to X, the next goes to the other one, Y.
        let mut conn = Connection::http1(addr).await.unwrap();
        let first = instances(&mut conn, "web", 1).await.remove(0);
        let (slow_target, slow_addr, other) = if first == "instance-1" {
            ("instance-2", b.addr("http"), a.addr("http"))
        } else {
            ("instance-1", a.addr("http"), b.addr("http"))
        };
        let slow = tokio::spawn(async move {
            let mut c = Connection::http1(addr).await.unwrap();
            c.get("web", "/delay/1500").await.unwrap()
        });
        tokio::time::sleep(Duration::from_millis(200)).await; // the slow request is on its way
        Services::new()
            .service(
                Service::new("web", 80)
                    .endpoint(Endpoint::new(slow_addr).health(Health::Draining))
                    .endpoint(other),
            )
            .replace(&file);
        let admin = proxy.addr("admin");
        eventually(
            Duration::from_secs(5),
            "the endpoint to be draining",
            || {
                let slow_addr = slow_addr.to_string();
                async move {
                    let cfg = config(admin).await;
                    (endpoint(&cfg, &slow_addr)?["health"] == "draining").then_some(())
                }
            },
        )
        .await;
        let new = instances(&mut conn, "web", 10).await;
        assert!(
            new.iter().all(|i| i != slow_target),
            "no new requests to the draining endpoint: {new:?}"
        );
        let reply = slow.await.unwrap();
        assert_eq!(reply.status, 200, "its in-flight request completes");
        assert_eq!(reply.instance(), Some(slow_target));
    })
    .await
}

#[tokio::test]
async fn slow_backends_time_out_and_overload_is_refused_at_once() {
    bounded(LIMIT, async {
        let dir = TestDir::new("timeouts");
        let a = backend("instance-1").await;
        let file = dir.path("services.yaml");
        Services::new()
            .service(
                Service::new("web", 80)
                    .timeout(Duration::from_millis(300))
                    .endpoint(a.addr("http")),
            )
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy(cp.addr("discovery"), &["--max-pending-requests", "2"]).await;
        let addr = proxy.addr("proxy");

        // The service's timeout: 504 naming the destination.
        let mut conn = Connection::http1(addr).await.unwrap();
        let start = Instant::now();
        let r = conn.get("web", "/delay/3000").await.unwrap();
        assert_eq!(r.status, 504, "{}", r.text());
        assert!(
            r.text().contains("web:80") && r.text().contains("300ms"),
            "{}",
            r.text()
        );
        assert_eq!(r.headers["x-tandem-error"], "timeout");
        assert!(start.elapsed() < Duration::from_secs(2));

        // Circuit breaking: two in flight at most; the others are refused at once.
        let mut calls = Vec::new();
        for _ in 0..6 {
            calls.push(tokio::spawn(async move {
                let mut c = Connection::http1(addr).await.unwrap();
                let start = Instant::now();
                let r = c.get("web", "/delay/250").await.unwrap();
                (r, start.elapsed())
            }));
        }
        let mut refused = 0;
        for call in calls {
            let (r, took) = call.await.unwrap();
            if r.status == 503 {
                refused += 1;
                assert_eq!(r.headers["x-tandem-error"], "overflow");
                assert!(
                    took < Duration::from_millis(200),
                    "refused at once, not queued: {took:?}"
                );
            } else {
                assert_eq!(r.status, 200);
            }
        }
        assert!(refused >= 3, "{refused} of 6 refused with a limit of 2");
        let metrics = admin_get(proxy.addr("admin"), "/metrics").await;
        assert!(
            metrics.contains(r#"tandem_proxy_overflow_total{direction="outbound",dst_namespace="default",dst_service="web"}"#),
            "{metrics}"
        );
    })
    .await
}

#[tokio::test]
async fn active_health_checks_take_failing_endpoints_out_without_client_traffic() {
    bounded(LIMIT, async {
        let dir = TestDir::new("active-checks");
        let good = backend("good").await;
        let sick = backend_with("sick", &["--status", "503"]).await;
        let file = dir.path("services.yaml");
        let checks = HealthCheck::new("/healthz")
            .interval(Duration::from_millis(200))
            .timeout(Duration::from_millis(500))
            .unhealthy_threshold(2)
            .healthy_threshold(1);
        Services::new()
            .service(
                Service::new("web", 80)
                    .health_check(checks)
                    .endpoints([good.addr("http"), sick.addr("http")]),
            )
            .write(&file);
        let cp = control_plane(&file).await;
        let proxy = proxy(cp.addr("discovery"), &[]).await;
        // One request makes the proxy watch the service; then only the checks run.
        let mut conn = Connection::http1(proxy.addr("proxy")).await.unwrap();
        conn.get("web", "/").await.unwrap();
        let admin = proxy.addr("admin");
        let sick_addr = sick.addr("http").to_string();
        eventually(
            Duration::from_secs(10),
            "the checks to take the sick endpoint out",
            || {
                let sick_addr = sick_addr.clone();
                async move { ejected(&config(admin).await, &sick_addr).then_some(()) }
            },
        )
        .await;
        let cfg = config(admin).await;
        let responses = endpoint(&cfg, &sick_addr).unwrap()["responses"]
            .as_u64()
            .unwrap();
        assert!(
            responses <= 1,
            "only the first request could have reached it: {responses}"
        );
        let seen = instances(&mut conn, "web", 20).await;
        assert!(seen.iter().all(|i| i == "good"), "{seen:?}");
    })
    .await
}

#[tokio::test]
async fn a_request_a_backend_dropped_goes_elsewhere_only_if_safe_to_repeat() {
    bounded(LIMIT, async {
        let good = backend("instance-1").await;
        // Reads each request head and hangs up: the request reached it, so only one
        // that is safe to send twice may go elsewhere.
        let dropper = raw_backend(b"").await;
        let proxy = static_proxy(&[good.addr("http"), dropper], &[]).await;
        let addr = proxy.addr("proxy");

        // Two POSTs in a row: one is picked for the dropper, and fails as it must.
        let mut h2 = Connection::http2(addr).await.unwrap();
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let reply = h2.send("POST", "web", "/", Bytes::new()).await.unwrap();
            statuses.push(reply.status.as_u16());
        }
        statuses.sort();
        assert_eq!(statuses, [200, 502], "a POST is never sent twice");

        // GETs, over HTTP/2 and HTTP/1 (two paths to the same backends), all answered.
        let mut h1 = Connection::http1(addr).await.unwrap();
        for i in 0..20 {
            let conn = if i % 2 == 0 { &mut h2 } else { &mut h1 };
            let reply = conn.get("web", "/").await.unwrap();
            assert_eq!(
                (reply.status.as_u16(), reply.instance()),
                (200, Some("instance-1")),
                "GET {i}: {}",
                reply.text()
            );
        }
    })
    .await
}
