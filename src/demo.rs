//! `tandem demo`: the balancing lesson in one command, with no cluster.
//!
//! Starts K small backends (`instance-1`, `instance-2`, … each logging the requests it
//! serves), a control plane reading a generated services file, and a proxy that
//! gets the backends from it; then sends requests through the proxy over one
//! keep-alive connection and prints who answered each, then a summary. Every process
//! it started is stopped when it ends (`--serve` keeps them up until Ctrl-C).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::client::Connection;
use crate::process::{Spawned, spawn};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// How many requests to send through the proxy.
    #[arg(long, default_value_t = 10)]
    pub requests: usize,
    /// How many backend instances to start.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub backends: u16,
    /// Keep everything running and print the proxy's address, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
}

const START_TIMEOUT: Duration = Duration::from_secs(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The demo's service, as clients name it.
const SERVICE: &str = "web";

/// The processes of one demo run; all are killed when this drops.
struct Demo {
    dir: PathBuf,
    backends: Vec<Spawned>,
    control_plane: Option<Spawned>,
    proxy: Option<Spawned>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        // `kill_on_drop` stops the children; the directory only holds the services file.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn services_yaml(backends: &[Spawned]) -> String {
    let mut yaml = String::from(
        "# Written by `tandem demo`: the backends the control plane serves.\nservices:\n  - name: web\n    namespace: default\n    port: 80\n    endpoints:\n",
    );
    for b in backends {
        yaml.push_str(&format!(
            "      - {{address: \"{}\", name: {}, weight: 1, region: local, zone: local-a}}\n",
            b.addr("http"),
            b.name
        ));
    }
    yaml
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(args: DemoArgs, exe: &Path) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut demo = Demo {
        dir: dir.clone(),
        backends: Vec::new(),
        control_plane: None,
        proxy: None,
    };
    // Servers log warnings only, so the demo's own lines stay readable.
    let quiet_logs = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    let env = [("RUST_LOG", quiet_logs.as_str())];

    for i in 1..=args.backends {
        let name = format!("instance-{i}");
        let backend = spawn(
            &name,
            exe,
            [
                "backend",
                "--name",
                name.as_str(),
                "--listen",
                "127.0.0.1:0",
            ],
            &env,
            START_TIMEOUT,
        )
        .await?;
        demo.backends.push(backend);
    }

    let services = dir.join("services.yaml");
    std::fs::write(&services, services_yaml(&demo.backends))?;
    let source = format!("file:{}", services.display());
    let control_plane = spawn(
        "control plane",
        exe,
        [
            "control-plane",
            "--source",
            source.as_str(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        &env,
        START_TIMEOUT,
    )
    .await?;
    let discovery = control_plane.addr("discovery").to_string();
    demo.control_plane = Some(control_plane);

    let proxy = spawn(
        "proxy",
        exe,
        [
            "proxy",
            "--control-plane",
            discovery.as_str(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--threads",
            "1",
            "--default-destination",
            "web.default:80",
        ],
        &env,
        START_TIMEOUT,
    )
    .await?;
    let proxy_addr = proxy.addr("proxy");
    let admin_addr = proxy.addr("admin");
    demo.proxy = Some(proxy);
    crate::client::wait_ready(admin_addr, START_TIMEOUT).await?;

    println!(
        "Tandem demo: {} backends behind one Tandem proxy, fed by a Tandem control plane.\n",
        args.backends
    );
    println!(
        "  control plane  {discovery:<22} source {}",
        services.display()
    );
    for b in &demo.backends {
        println!("  {:<14} {}", b.name, b.addr("http"));
    }
    println!("  proxy          {proxy_addr:<22} admin  http://{admin_addr}/metrics\n");

    if args.serve {
        println!("Serving until Ctrl-C. Try:");
        println!(
            "  curl http://{proxy_addr}/            (run it a few times: the instances alternate)"
        );
        println!("  curl http://{admin_addr}/config      (what the proxy knows)");
        println!(
            "  edit {} to add or drop endpoints; the proxy follows within a second",
            services.display()
        );
        tokio::signal::ctrl_c().await?;
        println!("\nStopping.");
        return Ok(());
    }

    println!(
        "Sending {} requests to http://{SERVICE}/ through the proxy over one keep-alive connection:\n",
        args.requests
    );
    let mut conn = Connection::http1(proxy_addr).await?;
    let mut latencies = Vec::with_capacity(args.requests);
    let mut counts: BTreeMap<String, usize> =
        demo.backends.iter().map(|b| (b.name.clone(), 0)).collect();
    let mut failed = 0;
    let width = args.requests.to_string().len();
    for i in 1..=args.requests {
        let start = Instant::now();
        let reply = tokio::time::timeout(REQUEST_TIMEOUT, conn.get(SERVICE, "/")).await;
        let elapsed = start.elapsed();
        match reply {
            Ok(Ok(reply)) if reply.status.is_success() => {
                let instance = reply.instance().unwrap_or("?").to_string();
                println!(
                    "  request {i:>width$}  →  {instance:<12} {:>10}",
                    ms(elapsed)
                );
                *counts.entry(instance).or_default() += 1;
                latencies.push(elapsed);
            }
            Ok(Ok(reply)) => {
                failed += 1;
                println!(
                    "  request {i:>width$}  →  HTTP {}: {}",
                    reply.status,
                    reply.text().trim()
                );
            }
            Ok(Err(e)) => {
                failed += 1;
                println!("  request {i:>width$}  →  failed: {e:#}");
                conn = Connection::http1(proxy_addr).await?;
            }
            Err(_) => {
                failed += 1;
                println!("  request {i:>width$}  →  no answer within {REQUEST_TIMEOUT:?}");
                conn = Connection::http1(proxy_addr).await?;
            }
        }
    }

    latencies.sort_unstable();
    println!(
        "\nSummary: {} requests, {} answered, {failed} failed",
        args.requests,
        latencies.len()
    );
    for (instance, n) in &counts {
        let share = if args.requests > 0 {
            100.0 * *n as f64 / args.requests as f64
        } else {
            0.0
        };
        println!("  {instance:<12} {n:>6}  ({share:.0}%)");
    }
    println!(
        "  latency      p50 {}   p99 {}   (client-side, through the proxy)",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0))
    );

    for p in [demo.proxy.as_mut(), demo.control_plane.as_mut()]
        .into_iter()
        .flatten()
    {
        p.kill().await;
    }
    for b in &mut demo.backends {
        b.kill().await;
    }
    if failed > 0 {
        bail!("{failed} of {} requests failed", args.requests);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let d: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&d, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&d, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
