//! Starting Tandem's own processes and learning their ports.
//!
//! Every Tandem server prints one JSON line on stdout once bound (see
//! `tandem_common::announce`); [`spawn`] waits for it, so callers can bind to port 0
//! and still know where to connect. A spawned process is killed when its handle drops.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Spawned {
    pub name: String,
    pub child: Child,
    pub addrs: BTreeMap<String, SocketAddr>,
    /// Everything the process wrote to stderr so far, when it was started with
    /// [`Options::capture_stderr`] (it is still echoed to our stderr).
    pub log: Option<Arc<Mutex<String>>>,
}

/// How to start a process.
#[derive(Debug, Clone, Default)]
pub struct Options<'a> {
    pub envs: Vec<(&'a str, &'a str)>,
    pub capture_stderr: bool,
}

impl Spawned {
    /// The address the process announced under `name` (`proxy`, `admin`, `discovery`, `http`).
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self.addrs.get(name).unwrap_or_else(|| {
            panic!(
                "{} announced no {name:?} address: {:?}",
                self.name, self.addrs
            )
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }

    /// What the process logged so far (empty unless stderr was captured).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Starts `exe args…` and waits (up to `timeout`) for its listening line.
/// Its stderr (logs) goes to ours; `envs` are added to its environment.
pub async fn spawn<I, S>(
    name: &str,
    exe: &Path,
    args: I,
    envs: &[(&str, &str)],
    timeout: Duration,
) -> anyhow::Result<Spawned>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let options = Options {
        envs: envs.to_vec(),
        capture_stderr: false,
    };
    spawn_with(name, exe, args, &options, timeout).await
}

/// [`spawn`] with more [`Options`].
pub async fn spawn_with<I, S>(
    name: &str,
    exe: &Path,
    args: I,
    options: &Options<'_>,
    timeout: Duration,
) -> anyhow::Result<Spawned>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(exe);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if options.capture_stderr {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .kill_on_drop(true);
    for (k, v) in &options.envs {
        command.env(k, v);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {name} ({})", exe.display()))?;
    let log = child.stderr.take().map(|stderr| {
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{line}");
                let mut log = sink.lock().unwrap_or_else(|e| e.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        log
    });
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let mut lines = BufReader::new(stdout).lines();
    let announced = tokio::time::timeout(timeout, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addrs) = tandem_common::announce::parse_listening(&line) {
                return Ok::<_, std::io::Error>(Some(addrs));
            }
        }
        Ok(None)
    })
    .await;
    let addrs = match announced {
        Ok(Ok(Some(addrs))) => addrs.into_iter().collect(),
        Ok(Ok(None)) | Ok(Err(_)) => {
            let status = child.wait().await.ok();
            bail!("{name} exited before it was listening (status: {status:?}); see its log above");
        }
        Err(_) => {
            let _ = child.start_kill();
            bail!("{name} did not announce its ports within {timeout:?}");
        }
    };
    // Keep draining stdout so the child can never block on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(Spawned {
        name: name.to_string(),
        child,
        addrs,
        log,
    })
}
