//! Readiness and startup probes against the pod's address, from the host (as a kubelet
//! probes): `httpGet` (a 2xx or 3xx answer within `timeoutSeconds`) and `tcpSocket`
//! (a connection). `exec` and `grpc` probes are not supported (they count as failing,
//! with a message).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Readiness,
    Startup,
}

/// A probe's verdict changed (readiness), or it settled (startup: passed or gave up).
#[derive(Debug)]
pub struct Verdict {
    pub kind: Kind,
    pub ok: bool,
    pub message: String,
}

#[derive(Debug, Clone)]
enum Action {
    Http {
        port: u16,
        path: String,
        host: Option<String>,
        headers: Vec<(String, String)>,
    },
    Tcp {
        port: u16,
    },
    Unsupported(String),
}

fn port(p: &IntOrString, container: &Container) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("port {n} is out of range")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name.as_str()))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .ok_or_else(|| format!("the container has no port named {name:?}")),
    }
}

fn action(probe: &Probe, container: &Container) -> Action {
    if let Some(http) = &probe.http_get {
        if http
            .scheme
            .as_deref()
            .is_some_and(|s| s.eq_ignore_ascii_case("https"))
        {
            return Action::Unsupported(
                "httpGet with scheme HTTPS is not supported by the node agent".into(),
            );
        }
        return match port(&http.port, container) {
            Ok(port) => Action::Http {
                port,
                path: http
                    .path
                    .clone()
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "/".into()),
                host: http.host.clone().filter(|h| !h.is_empty()),
                headers: http
                    .http_headers
                    .iter()
                    .flatten()
                    .map(|h| (h.name.clone(), h.value.clone()))
                    .collect(),
            },
            Err(e) => Action::Unsupported(e),
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        return match port(&tcp.port, container) {
            Ok(port) => Action::Tcp { port },
            Err(e) => Action::Unsupported(e),
        };
    }
    Action::Unsupported("only httpGet and tcpSocket probes are supported by the node agent".into())
}

async fn attempt(action: &Action, ip: Ipv4Addr, timeout: Duration) -> Result<(), String> {
    match action {
        Action::Unsupported(why) => Err(why.clone()),
        Action::Tcp { port } => {
            let addr = SocketAddr::from((ip, *port));
            match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
                Err(_) => Err(format!("dial tcp {addr}: timeout after {timeout:?}")),
            }
        }
        Action::Http {
            port,
            path,
            host,
            headers,
        } => {
            let target = host
                .as_deref()
                .and_then(|h| h.parse::<Ipv4Addr>().ok())
                .unwrap_or(ip);
            let addr = SocketAddr::from((target, *port));
            let get = async {
                let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let mut head = format!(
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/tandem-node-agent\r\nAccept: */*\r\nConnection: close\r\n"
                );
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                stream
                    .write_all(head.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut buf = Vec::with_capacity(256);
                let mut chunk = [0u8; 256];
                while !buf.contains(&b'\n') && buf.len() < 4096 {
                    let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let line = String::from_utf8_lossy(&buf);
                let code: u16 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| "no HTTP status line in the answer".to_string())?;
                if (200..400).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("HTTP probe failed with statuscode: {code}"))
                }
            };
            match tokio::time::timeout(timeout, get).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("Get \"http://{addr}{path}\": {e}")),
                Err(_) => Err(format!(
                    "Get \"http://{addr}{path}\": timeout after {timeout:?}"
                )),
            }
        }
    }
}

fn secs(v: Option<i32>, default: i32, min: i32) -> Duration {
    Duration::from_secs(v.unwrap_or(default).max(min) as u64)
}

/// Runs a probe until the task is aborted. Readiness: reports each change of verdict
/// (the first one as soon as it is known). Startup: reports once, success or failure
/// after `failureThreshold` attempts.
pub async fn run(
    kind: Kind,
    probe: Probe,
    container: Container,
    ip: Ipv4Addr,
    tx: mpsc::UnboundedSender<Verdict>,
) {
    let action = action(&probe, &container);
    let period = secs(probe.period_seconds, 10, 1);
    let timeout = secs(probe.timeout_seconds, 1, 1);
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
    let delay = secs(probe.initial_delay_seconds, 0, 0);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (mut successes, mut failures) = (0, 0);
    let mut verdict: Option<bool> = None;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = attempt(&action, ip, timeout).await;
        match (&result, kind) {
            (Ok(()), Kind::Startup) => {
                let _ = tx.send(Verdict {
                    kind,
                    ok: true,
                    message: String::new(),
                });
                return;
            }
            (Ok(()), Kind::Readiness) => {
                successes += 1;
                failures = 0;
                if verdict != Some(true) && successes >= success_threshold {
                    verdict = Some(true);
                    let _ = tx.send(Verdict {
                        kind,
                        ok: true,
                        message: String::new(),
                    });
                }
            }
            (Err(e), _) => {
                failures += 1;
                successes = 0;
                let settled = failures >= failure_threshold;
                let report = match kind {
                    Kind::Startup => settled,
                    // Not ready from the start until a success; after one, only once the
                    // failures reach the threshold.
                    Kind::Readiness => verdict.is_none() || (verdict == Some(true) && settled),
                };
                if report {
                    verdict = Some(false);
                    let _ = tx.send(Verdict {
                        kind,
                        ok: false,
                        message: e.clone(),
                    });
                    if kind == Kind::Startup {
                        return;
                    }
                }
            }
        }
    }
}
