//! Editing the services file while traffic flows: additions reach the proxy within a
//! second, removals stop traffic, no client request fails, bad edits change nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tandem::client::Connection;
use tokio::sync::Mutex;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(90);

/// Who answered each request of a steady load, and every failure.
#[derive(Default)]
struct Observed {
    answers: Vec<(Instant, String)>,
    failures: Vec<String>,
}

/// Starts `clients` connections sending GETs back to back until `stop` is set.
fn steady_load(
    proxy: SocketAddr,
    clients: usize,
    stop: Arc<AtomicBool>,
    observed: Arc<Mutex<Observed>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|_| {
            let stop = stop.clone();
            let observed = observed.clone();
            tokio::spawn(async move {
                let mut conn = Connection::http1(proxy).await.expect("connect");
                // Bounded in count as well as by the stop flag.
                for _ in 0..200_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = conn.get("web", "/").await;
                    let mut o = observed.lock().await;
                    match result {
                        Ok(r) if r.status.is_success() => o
                            .answers
                            .push((Instant::now(), r.instance().unwrap_or("?").to_string())),
                        Ok(r) => o.failures.push(format!("{} {}", r.status, r.text())),
                        Err(e) => o.failures.push(format!("{e:#}")),
                    }
                }
            })
        })
        .collect()
}

#[tokio::test]
async fn edits_reach_the_proxy_within_a_second_without_failing_requests() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("edits", &[1, 1]).await;
        let third = backend("instance-3").await;
        let addr = |i: usize| mesh.backends[i].addr("http");

        let stop = Arc::new(AtomicBool::new(false));
        let observed = Arc::new(Mutex::new(Observed::default()));
        let load = steady_load(mesh.proxy_addr(), 4, stop.clone(), observed.clone());
        eventually(Duration::from_secs(10), "load to flow", || {
            let observed = observed.clone();
            async move { (observed.lock().await.answers.len() > 50).then_some(()) }
        })
        .await;

        // Add instance-3.
        let added_at = Instant::now();
        Services::new()
            .service(Service::new("web", 80).endpoints([addr(0), addr(1), third.addr("http")]))
            .replace(&mesh.file);
        let first_hit = eventually(Duration::from_secs(5), "instance-3 to get traffic", || {
            let observed = observed.clone();
            async move {
                let o = observed.lock().await;
                o.answers
                    .iter()
                    .find(|(at, who)| *at >= added_at && who == "instance-3")
                    .map(|(at, _)| *at)
            }
        })
        .await;
        let delay = first_hit - added_at;
        assert!(
            delay < Duration::from_secs(1),
            "the new endpoint got its first request after {delay:?}"
        );

        // Remove instance-1.
        Services::new()
            .service(Service::new("web", 80).endpoints([addr(1), third.addr("http")]))
            .replace(&mesh.file);
        let admin = mesh.proxy.addr("admin");
        let gone = addr(0).to_string();
        eventually(
            Duration::from_secs(5),
            "the proxy to drop instance-1",
            || {
                let gone = gone.clone();
                async move { (!admin_get(admin, "/config").await.contains(&gone)).then_some(()) }
            },
        )
        .await;
        let removed_at = Instant::now();
        let mut conn = mesh.connect().await;
        let after = instances(&mut conn, "web", 100).await;
        assert!(
            !after.contains(&"instance-1".to_string()),
            "{:?}",
            counts(&after)
        );
        assert_eq!(counts(&after).len(), 2);

        stop.store(true, Ordering::Relaxed);
        for task in load {
            task.await.unwrap();
        }
        let o = observed.lock().await;
        assert!(
            o.failures.is_empty(),
            "requests failed during the edits: {:?}",
            o.failures
        );
        let late = o
            .answers
            .iter()
            .filter(|(at, who)| *at > removed_at + Duration::from_millis(50) && who == "instance-1")
            .count();
        assert_eq!(
            late, 0,
            "instance-1 kept getting requests after its removal"
        );
        assert!(o.answers.len() > 100);
    })
    .await
}

#[tokio::test]
async fn a_malformed_edit_is_reported_with_its_line_and_changes_nothing() {
    bounded(LIMIT, async {
        let mesh = Mesh::start("malformed", &[1, 1]).await;
        let a = mesh.backends[0].addr("http");
        let b = mesh.backends[1].addr("http");
        // One line has a broken address.
        let broken = Services::new()
            .service(
                Service::new("web", 80)
                    .namespace("default")
                    .endpoint(a)
                    .endpoint(Endpoint::new("127.0.0.1:not-a-port")),
            )
            .yaml();
        let line = 1 + broken
            .lines()
            .position(|l| l.contains("not-a-port"))
            .unwrap();
        let at_line = format!("line {line}");
        replace_file(&mesh.file, &broken);
        eventually(
            Duration::from_secs(5),
            "the control plane to log the rejected edit",
            || async {
                let log = mesh.control_plane.log_text();
                log.lines()
                    .find(|l| {
                        l.contains("rejected an edit")
                            && l.contains(&at_line)
                            && l.contains("invalid socket address")
                    })
                    .map(|_| ())
            },
        )
        .await;
        let cp_metrics = admin_get(mesh.control_plane.addr("admin"), "/metrics").await;
        assert!(
            cp_metrics.contains("tandem_control_plane_source_up 0"),
            "{cp_metrics}"
        );

        // The proxy still balances over the last good set.
        let mut conn = mesh.connect().await;
        let seen = instances(&mut conn, "web", 10).await;
        assert_eq!(counts(&seen).len(), 2, "{seen:?}");

        // Fixing the file resumes updates.
        Services::new()
            .service(Service::new("web", 80).endpoint(b))
            .replace(&mesh.file);
        eventually(Duration::from_secs(5), "the fixed file to apply", || {
            let proxy = mesh.proxy_addr();
            async move {
                let mut c = Connection::http1(proxy).await.ok()?;
                let seen = instances(&mut c, "web", 4).await;
                seen.iter().all(|i| i == "instance-2").then_some(())
            }
        })
        .await;
        let rejected_once = mesh
            .control_plane
            .log_text()
            .lines()
            .filter(|l| l.contains("rejected an edit"))
            .count();
        assert_eq!(rejected_once, 1, "one bad edit is logged once");
    })
    .await
}

#[tokio::test]
async fn a_file_of_100000_endpoints_is_served_whole() {
    bounded(LIMIT, async {
        const N: u32 = 100_000;
        let dir = TestDir::new("100k");
        let file = dir.path("services.yaml");
        let endpoints = (0..N).map(|i| {
            let [_, a, b, c] = i.to_be_bytes();
            SocketAddr::from(([10, a, b, c], 8080))
        });
        Services::new()
            .service(Service::new("web", 80).endpoints(endpoints))
            .write(&file);
        let control_plane = control_plane(&file).await;

        // What a proxy would get, as `tandem endpoints` shows it.
        let output = tokio::process::Command::new(exe())
            .args(["endpoints", "web:80", "--control-plane"])
            .arg(control_plane.addr("discovery").to_string())
            .kill_on_drop(true)
            .output()
            .await
            .expect("run tandem endpoints");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "tandem endpoints failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let first = stdout.lines().next().unwrap_or_default();
        assert!(first.contains(&format!("{N} endpoints")), "{first}");
        // The header line, then one line per endpoint.
        assert_eq!(stdout.lines().count(), N as usize + 2);
        assert!(
            stdout.contains("10.1.134.159:8080"),
            "the last endpoint is listed"
        );
    })
    .await
}

#[tokio::test]
async fn restoring_the_last_good_file_after_a_bad_edit_clears_the_alarm() {
    bounded(LIMIT, async {
        let dir = TestDir::new("restore");
        let file = dir.path("services.yaml");
        let good = Services::new()
            .service(Service::new("web", 80).endpoint(Endpoint::new("127.0.0.1:9001")))
            .yaml();
        std::fs::write(&file, &good).expect("write services");
        let control_plane = control_plane(&file).await;
        let admin = control_plane.addr("admin");
        // The sample's line itself (its HELP line reads "... source_up 1 while ...").
        let source_up = |up: &'static str| {
            let sample = format!("tandem_control_plane_source_up {up}");
            move || {
                let sample = sample.clone();
                async move {
                    let metrics = admin_get(admin, "/metrics").await;
                    metrics.lines().any(|l| l == sample).then_some(())
                }
            }
        };
        eventually(
            Duration::from_secs(5),
            "source_up 1 at start",
            source_up("1"),
        )
        .await;

        // A bad edit raises the alarm...
        replace_file(&file, "services: [\n");
        eventually(
            Duration::from_secs(5),
            "source_up 0 after a bad edit",
            source_up("0"),
        )
        .await;

        // ... and putting back exactly the last good bytes clears it.
        replace_file(&file, &good);
        eventually(
            Duration::from_secs(5),
            "source_up 1 once the last good file is back",
            source_up("1"),
        )
        .await;
        eventually(Duration::from_secs(5), "the log to say so", || async {
            control_plane
                .log_text()
                .lines()
                .any(|l| l.contains("healthy again"))
                .then_some(())
        })
        .await;
    })
    .await
}
