//! `tandem demo`, run exactly as a user runs it.

use std::time::Duration;

use tandem::client::Connection;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(120);

/// Runs the demo and returns the instance that answered each request, in order.
async fn run_demo(args: &[&str]) -> (Vec<String>, String) {
    let output = tokio::process::Command::new(exe())
        .arg("demo")
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("the demo finishes")
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "demo failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answered = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("request"))
        .map(|l| {
            l.split('→')
                .nth(1)
                .expect("request line")
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    (answered, stdout)
}

/// No process of this demo is left: its control plane carried the demo's directory.
fn demo_processes_left(pid: u32) -> usize {
    let marker = format!("tandem-demo-{pid}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(&marker))
        .count()
}

#[tokio::test]
async fn demo_shows_requests_alternating() {
    bounded(LIMIT, async {
        let (answered, stdout) = run_demo(&["--requests", "8"]).await;
        assert_eq!(answered.len(), 8, "{stdout}");
        assert_alternates(&answered, &format!("the demo's requests:\n{stdout}"));
        assert!(
            stdout.contains("Summary: 8 requests, 8 answered, 0 failed"),
            "{stdout}"
        );
        assert!(stdout.contains("instance-1        4  (50%)"), "{stdout}");
        assert!(stdout.contains("p50") && stdout.contains("p99"), "{stdout}");
    })
    .await
}

#[tokio::test]
async fn demo_with_three_backends_rotates() {
    bounded(LIMIT, async {
        let (answered, stdout) = run_demo(&["--backends", "3", "--requests", "9"]).await;
        assert_eq!(answered.len(), 9);
        for window in answered.windows(3) {
            let mut w = window.to_vec();
            w.sort();
            w.dedup();
            assert_eq!(
                w.len(),
                3,
                "every 3 consecutive requests reach 3 instances:\n{stdout}"
            );
        }
    })
    .await
}

#[tokio::test]
async fn demo_serve_keeps_running_until_interrupted_then_stops_everything() {
    bounded(LIMIT, async {
        let mut child = tokio::process::Command::new(exe())
            .args(["demo", "--serve"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let proxy: std::net::SocketAddr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.trim().strip_prefix("curl http://")
                    && let Some(addr) = rest.split('/').next().and_then(|a| a.parse().ok())
                {
                    return addr;
                }
            }
            panic!("the demo never printed the proxy address");
        })
        .await
        .unwrap();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        // What a browser or curl sends: Host is the proxy's own address.
        let mut conn = Connection::http1(proxy).await.unwrap();
        let seen = instances(&mut conn, &proxy.to_string(), 4).await;
        assert_eq!(counts(&seen).len(), 2, "{seen:?}");
        assert!(demo_processes_left(pid) > 0);

        let status = tokio::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(15), child.wait())
            .await
            .expect("the demo stops on Ctrl-C")
            .unwrap();
        assert!(exit.success(), "{exit:?}");
        eventually(
            Duration::from_secs(10),
            "the demo's processes to be gone",
            || async { (demo_processes_left(pid) == 0).then_some(()) },
        )
        .await;
    })
    .await
}
