//! Running one pod for real (`agent.tandem.io/run: "true"`): a network namespace with
//! the pod's address, its volumes, then its containers as processes in that namespace.
//!
//! Order, as a kubelet: init containers one after the other (each must exit 0, else the
//! pod fails and nothing more runs); a native sidecar (`restartPolicy: Always`) is
//! started, its startupProbe awaited before the next container, restarted when it exits
//! (backoff 1s doubling to 30s) and stopped last; then all containers. Regular
//! containers are not restarted in this version: one that exits is `terminated` and
//! the pod is not ready (with `restartPolicy: Never`, the pod then succeeds or fails).
//!
//! A container's process is `ip netns exec NS sh -c WRAPPER sh PROGRAM ARGS...`: the
//! wrapper bind-mounts the volumes inside the private mount namespace `ip netns exec`
//! made, then `exec setpriv --pdeathsig KILL [--reuid --regid --clear-groups]` into the
//! program, so the pid the agent holds is the program's, it leads its own process
//! group (signals go to the group), and it dies with the agent even if the agent is
//! killed. Output goes to `<state>/pods/<ns>/<pod>/<container>.log`.
//!
//! Stopping (pod deleted, agent shutting down): SIGTERM to the containers, then to the
//! sidecars once the containers are gone, SIGKILL to all at the deadline; then the
//! namespace, veth, volumes and mount points are removed, and `Stopped` is reported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::Client;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::events::Events;
use super::metrics::Metrics;
use super::mountpoints::{Hold, MountPoints};
use super::netns::{Bridge, PodNet, is_executable, which};
use super::probes::{self, Kind, Verdict};
use super::status::{ContainerRun, RunPhase, RuntimeStatus, State, is_sidecar, now};
use super::volumes::{PodFacts, VolumeError, Volumes};

/// A task aborted when this is dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What every runner shares.
#[derive(Clone)]
pub struct RunnerEnv {
    pub client: Client,
    pub state_dir: PathBuf,
    pub bin_dir: Option<PathBuf>,
    /// The bridge, or why there is none (pods cannot run then).
    pub bridge: Result<Bridge, String>,
    pub mounts: MountPoints,
    pub events: Events,
    pub metrics: std::sync::Arc<Metrics>,
}

/// What a runner tells the agent.
#[derive(Debug)]
pub enum Report {
    Status(String, RuntimeStatus),
    Stopped(String),
}

#[derive(Debug)]
enum Command {
    /// Stop gracefully: SIGTERM now, SIGKILL at the deadline.
    Terminate(Instant),
}

/// The agent's handle on a runner. Dropping it kills the pod's processes at once
/// (and the runner still cleans up and reports `Stopped`).
#[derive(Debug)]
pub struct RunnerHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl RunnerHandle {
    pub fn terminate(&self, deadline: Instant) {
        let _ = self.tx.send(Command::Terminate(deadline));
    }
}

/// Starts running `facts.pod`; reports go to `report`.
pub fn start(
    env: RunnerEnv,
    facts: PodFacts,
    report: mpsc::UnboundedSender<Report>,
) -> RunnerHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let uid = facts.pod.metadata.uid.clone().unwrap_or_default();
        env.metrics.running_pods.inc();
        let mut runner = Runner::new(env, facts, report.clone());
        runner.run(rx).await;
        runner.teardown().await;
        runner.env.metrics.running_pods.dec();
        let _ = report.send(Report::Stopped(uid));
    });
    RunnerHandle { tx }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Slot {
    Init(usize),
    Main(usize),
}

#[derive(Debug)]
enum Internal {
    Exited {
        slot: Slot,
        status: std::io::Result<ExitStatus>,
    },
    Probe {
        slot: Slot,
        pid: u32,
        verdict: Verdict,
    },
    Restart(Slot),
}

struct Runner {
    env: RunnerEnv,
    facts: PodFacts,
    uid: String,
    /// namespace/name, for logs.
    key: String,
    pod_dir: PathBuf,
    init_specs: Vec<Container>,
    main_specs: Vec<Container>,
    status: RuntimeStatus,
    sent: Option<RuntimeStatus>,
    report: mpsc::UnboundedSender<Report>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal_rx: mpsc::UnboundedReceiver<Internal>,
    volumes: Option<Volumes>,
    mounted: Vec<Hold>,
    /// Live processes by slot: their pid (the leader of their process group).
    procs: HashMap<Slot, u32>,
    probes: HashMap<(Slot, Kind), AbortOnDrop>,
    restarts: HashMap<Slot, AbortOnDrop>,
    backoff: HashMap<Slot, Duration>,
    next_init: usize,
    /// A regular init container to exit, or a sidecar to pass its startup probe.
    waiting_on: Option<Slot>,
    main_started: bool,
    done: bool,
    stopping: Option<Instant>,
    sidecars_signalled: bool,
    killed: bool,
}

impl Runner {
    fn new(env: RunnerEnv, facts: PodFacts, report: mpsc::UnboundedSender<Report>) -> Self {
        let pod = &facts.pod;
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let (internal_tx, internal_rx) = mpsc::unbounded_channel();
        Self {
            key: format!("{ns}/{name}"),
            pod_dir: env.state_dir.join("pods").join(ns).join(name),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            status: RuntimeStatus::new(pod),
            init_specs: spec.init_containers.unwrap_or_default(),
            main_specs: spec.containers,
            sent: None,
            env,
            facts,
            report,
            internal_tx,
            internal_rx,
            volumes: None,
            mounted: Vec::new(),
            procs: HashMap::new(),
            probes: HashMap::new(),
            restarts: HashMap::new(),
            backoff: HashMap::new(),
            next_init: 0,
            waiting_on: None,
            main_started: false,
            done: false,
            stopping: None,
            sidecars_signalled: false,
            killed: false,
        }
    }

    fn pod(&self) -> &Pod {
        &self.facts.pod
    }

    fn publish(&mut self) {
        if self.sent.as_ref() != Some(&self.status) {
            self.sent = Some(self.status.clone());
            let _ = self
                .report
                .send(Report::Status(self.uid.clone(), self.status.clone()));
        }
    }

    fn warn(&self, reason: &str, message: &str) {
        self.env
            .events
            .warn(self.pod(), Some(&self.facts.node), reason, message);
    }

    /// The pod cannot go on: a status saying why, an event, and nothing more starts.
    fn fail(&mut self, phase: RunPhase, reason: &str, message: String) {
        self.warn(reason, &message);
        self.status.phase = phase;
        self.status.reason = Some(reason.to_string());
        self.status.message = Some(message);
        self.done = true;
        self.waiting_on = None;
        self.restarts.clear();
    }

    async fn run(&mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        self.publish();
        let mut closed = false;
        // Network and volumes; a stop request (or the handle dropped) cancels them.
        let prepared = tokio::select! {
            ready = self.prepare() => Some(ready),
            _ = commands.recv() => None,
        };
        match prepared {
            None => return,
            Some(Err((reason, message))) => {
                self.status.phase = RunPhase::Pending;
                for c in self
                    .status
                    .init
                    .iter_mut()
                    .chain(self.status.containers.iter_mut())
                {
                    c.state = State::waiting(&reason, Some(message.clone()));
                }
                self.fail(RunPhase::Pending, &reason, message);
            }
            Some(Ok(())) => self.advance(),
        }
        self.publish();
        loop {
            let deadline = self.stopping;
            tokio::select! {
                Some(event) = self.internal_rx.recv() => self.on_internal(event).await,
                cmd = commands.recv(), if !closed => match cmd {
                    Some(Command::Terminate(deadline)) => self.stop(deadline).await,
                    None => {
                        // The agent dropped us: the pod is gone; no grace.
                        closed = true;
                        self.stop(Instant::now()).await;
                    }
                },
                _ = sleep_until_opt(deadline), if deadline.is_some() && !self.killed => {
                    self.kill_all().await;
                }
                _ = sleep_until_opt(deadline.map(|d| d + Duration::from_secs(10))), if self.killed => {
                    tracing::warn!(pod = %self.key, pids = ?self.procs, "processes did not exit 10s after SIGKILL; giving up on them");
                    for _ in self.procs.drain() {
                        self.env.metrics.processes.dec();
                    }
                }
            }
            self.publish();
            if self.stopping.is_some() && self.procs.is_empty() {
                return;
            }
        }
    }

    /// The pod network and the volumes. Errors: `(reason, message)`.
    async fn prepare(&mut self) -> Result<(), (String, String)> {
        let bridge = match &self.env.bridge {
            Ok(b) => b.clone(),
            Err(why) => {
                return Err((
                    "NetworkUnavailable".into(),
                    format!("the node agent has no pod network, so it cannot run pods: {why}"),
                ));
            }
        };
        if let Err(e) = std::fs::create_dir_all(&self.pod_dir) {
            return Err((
                "CreateContainerError".into(),
                format!("cannot create {}: {e}", self.pod_dir.display()),
            ));
        }
        bridge.add_pod(self.facts.pod_ip).await.map_err(|e| {
            (
                "FailedCreatePodSandBox".to_string(),
                format!("pod network: {e}"),
            )
        })?;
        let mut last = String::new();
        loop {
            match super::volumes::materialise(&self.env.client, &self.facts, &self.pod_dir).await {
                Ok(volumes) => {
                    self.volumes = Some(volumes);
                    return Ok(());
                }
                Err(VolumeError::Fatal(m)) => return Err(("FailedMount".into(), m)),
                Err(VolumeError::Retry(m)) => {
                    if m != last {
                        self.warn("FailedMount", &format!("{m} (retrying)"));
                        for c in self
                            .status
                            .init
                            .iter_mut()
                            .chain(self.status.containers.iter_mut())
                        {
                            c.state = State::waiting("ContainerCreating", Some(m.clone()));
                        }
                        self.publish();
                        last = m;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn spec(&self, slot: Slot) -> &Container {
        match slot {
            Slot::Init(i) => &self.init_specs[i],
            Slot::Main(i) => &self.main_specs[i],
        }
    }

    fn run_status(&mut self, slot: Slot) -> &mut ContainerRun {
        match slot {
            Slot::Init(i) => &mut self.status.init[i],
            Slot::Main(i) => &mut self.status.containers[i],
        }
    }

    fn is_sidecar(&self, slot: Slot) -> bool {
        matches!(slot, Slot::Init(_)) && is_sidecar(self.spec(slot))
    }

    /// Starts what comes next, as far as nothing blocks.
    fn advance(&mut self) {
        while self.waiting_on.is_none() && !self.done && self.stopping.is_none() {
            if self.next_init < self.init_specs.len() {
                let slot = Slot::Init(self.next_init);
                self.next_init += 1;
                if let Err(message) = self.spawn(slot) {
                    let name = self.spec(slot).name.clone();
                    self.run_status(slot).state =
                        State::waiting("CreateContainerError", Some(message.clone()));
                    self.fail(
                        RunPhase::Failed,
                        "InitContainerFailed",
                        format!("init container {name:?} cannot start: {message}"),
                    );
                    self.stop_sidecars_after_failure();
                    return;
                }
                let sidecar = self.is_sidecar(slot);
                if !sidecar || self.spec(slot).startup_probe.is_some() {
                    self.waiting_on = Some(slot);
                }
                continue;
            }
            if !self.main_started {
                self.main_started = true;
                self.status.initialized = true;
                self.status.phase = RunPhase::Running;
                let mut failures = Vec::new();
                for i in 0..self.main_specs.len() {
                    let slot = Slot::Main(i);
                    if let Err(message) = self.spawn(slot) {
                        let name = self.spec(slot).name.clone();
                        self.run_status(slot).state =
                            State::waiting("CreateContainerError", Some(message.clone()));
                        failures.push(format!("container {name:?} cannot start: {message}"));
                    }
                }
                if failures.len() == self.main_specs.len() {
                    // Nothing runs: still pending, as with a kubelet.
                    self.status.phase = RunPhase::Pending;
                }
                if !failures.is_empty() {
                    let message = failures.join("; ");
                    self.warn("Failed", &message);
                    self.status.reason = Some("CreateContainerError".into());
                    self.status.message = Some(message);
                }
                self.check_finished();
            }
            return;
        }
    }

    /// Starts the process of `slot` (and its probes).
    fn spawn(&mut self, slot: Slot) -> Result<(), String> {
        let container = self.spec(slot).clone();
        let log_path = self.pod_dir.join(format!("{}.log", container.name));
        let mut command = self.command(&container)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open its log {}: {e}", log_path.display()))?;
        let log2 = log
            .try_clone()
            .map_err(|e| format!("cannot open its log {}: {e}", log_path.display()))?;
        command.stdout(log).stderr(log2);
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start `ip netns exec`: {e}"))?;
        let pid = child.id().unwrap_or(0);
        self.procs.insert(slot, pid);
        self.env.metrics.processes.inc();
        let tx = self.internal_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(Internal::Exited { slot, status });
        });
        tracing::info!(pod = %self.key, container = %container.name, pid, "container started");
        let startup = container.startup_probe.clone();
        let has_readiness = container.readiness_probe.is_some();
        let regular_init = matches!(slot, Slot::Init(_)) && !self.is_sidecar(slot);
        let run = self.run_status(slot);
        run.state = State::Running { started_at: now() };
        run.pid = Some(pid);
        run.started = startup.is_none() && !regular_init;
        run.ready = startup.is_none() && !has_readiness && !regular_init;
        if regular_init {
            return Ok(());
        }
        match startup {
            Some(probe) => self.probe(slot, pid, Kind::Startup, probe, container),
            None => self.start_readiness(slot, pid),
        }
        Ok(())
    }

    fn start_readiness(&mut self, slot: Slot, pid: u32) {
        let container = self.spec(slot).clone();
        if let Some(probe) = container.readiness_probe.clone() {
            self.probe(slot, pid, Kind::Readiness, probe, container);
        }
    }

    fn probe(
        &mut self,
        slot: Slot,
        pid: u32,
        kind: Kind,
        probe: k8s_openapi::api::core::v1::Probe,
        container: Container,
    ) {
        let (vtx, mut vrx) = mpsc::unbounded_channel();
        let ip = self.facts.pod_ip;
        let tx = self.internal_tx.clone();
        let task = tokio::spawn(async move {
            let forward = async {
                while let Some(verdict) = vrx.recv().await {
                    let _ = tx.send(Internal::Probe { slot, pid, verdict });
                }
            };
            tokio::join!(probes::run(kind, probe, container, ip, vtx), forward);
        });
        self.probes.insert((slot, kind), AbortOnDrop(task));
    }

    /// The process for `container`: program, arguments, environment, mounts, user.
    fn command(&mut self, container: &Container) -> Result<tokio::process::Command, String> {
        let netns = match &self.env.bridge {
            Ok(b) => b.netns_name(self.facts.pod_ip),
            Err(why) => return Err(why.clone()),
        };
        let argv0 = container
            .command
            .as_ref()
            .and_then(|c| c.first())
            .ok_or_else(|| {
                "it has no command: the node agent runs command + args and has no images to take an entrypoint from"
                    .to_string()
            })?;
        let env = self.environment(container)?;
        let expand = |s: &String| expand(s, &env);
        let program = resolve(argv0, self.env.bin_dir.as_deref())?;
        let mut args: Vec<String> = container
            .command
            .iter()
            .flatten()
            .skip(1)
            .map(expand)
            .collect();
        args.extend(container.args.iter().flatten().map(expand));

        let tool = |name: &str| {
            which(name).ok_or_else(|| {
                format!("`{name}` is not on PATH: the node agent needs it to run pods (util-linux / coreutils)")
            })
        };
        let setpriv = tool("setpriv")?;
        let sh = tool("sh")?;
        let mut script = String::from("set -e\n");
        let mut mounts: Vec<(PathBuf, PathBuf, bool)> = Vec::new();
        for m in container.volume_mounts.iter().flatten() {
            let source = self
                .volumes
                .as_ref()
                .and_then(|v| v.dirs.get(&m.name))
                .ok_or_else(|| format!("volume {:?} was not materialised", m.name))?;
            let mut source = source.clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                if Path::new(sub)
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(format!("subPath {sub:?} must be relative, without '..'"));
                }
                source = source.join(sub);
                if !source.exists() {
                    std::fs::create_dir_all(&source)
                        .map_err(|e| format!("cannot create {}: {e}", source.display()))?;
                }
            }
            let target = PathBuf::from(&m.mount_path);
            if !target.is_absolute() {
                return Err(format!("mountPath {:?} must be absolute", m.mount_path));
            }
            mounts.push((source, target, m.read_only == Some(true)));
        }
        // Shallow mounts first, so deeper ones land inside them.
        mounts.sort_by_key(|(_, t, _)| t.components().count());
        let (mkdir, touch, mount) = (tool("mkdir")?, tool("touch")?, tool("mount")?);
        for (source, target, read_only) in &mounts {
            let file = source.is_file();
            let hold = self.env.mounts.acquire(target, file)?;
            self.mounted.push(hold);
            let (s, t) = (
                quote(&source.to_string_lossy()),
                quote(&target.to_string_lossy()),
            );
            if file {
                let parent = target.parent().unwrap_or(Path::new("/"));
                script.push_str(&format!(
                    "{} -p {}\n[ -e {t} ] || {} {t}\n",
                    quote(&mkdir.to_string_lossy()),
                    quote(&parent.to_string_lossy()),
                    quote(&touch.to_string_lossy()),
                ));
            } else {
                script.push_str(&format!("{} -p {t}\n", quote(&mkdir.to_string_lossy())));
            }
            let mount = quote(&mount.to_string_lossy());
            script.push_str(&format!("{mount} --bind {s} {t}\n"));
            if *read_only {
                script.push_str(&format!("{mount} -o remount,bind,ro {t}\n"));
            }
        }
        if let Some(dir) = container.working_dir.as_deref().filter(|d| !d.is_empty()) {
            let d = quote(dir);
            script.push_str(&format!(
                "{} -p {d}\ncd {d}\n",
                quote(&mkdir.to_string_lossy())
            ));
        } else {
            script.push_str("cd /\n");
        }
        script.push_str(&format!(
            "exec {} --pdeathsig KILL",
            quote(&setpriv.to_string_lossy())
        ));
        let (uid, gid) = self.run_as(container);
        if uid.is_some() || gid.is_some() {
            script.push_str(&format!(
                " --reuid={} --regid={} --clear-groups",
                uid.unwrap_or(0),
                gid.unwrap_or(0)
            ));
        }
        script.push_str(" -- \"$@\"\n");

        let mut command = tokio::process::Command::new("ip");
        command
            .args(["netns", "exec", &netns])
            .arg(&sh)
            .args(["-c", &script, "sh"])
            .arg(&program)
            .args(&args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(false);
        let home = if uid.unwrap_or(0) == 0 { "/root" } else { "/" };
        command
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", home)
            .env(
                "HOSTNAME",
                self.pod().metadata.name.as_deref().unwrap_or(""),
            );
        for (k, v) in &env {
            command.env(k, v);
        }
        Ok(command)
    }

    /// `runAsUser`/`runAsGroup` of the container, else of the pod.
    fn run_as(&self, container: &Container) -> (Option<i64>, Option<i64>) {
        let pod_sc = self
            .pod()
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref());
        let sc = container.security_context.as_ref();
        let uid = sc
            .and_then(|s| s.run_as_user)
            .or_else(|| pod_sc.and_then(|s| s.run_as_user));
        let gid = sc
            .and_then(|s| s.run_as_group)
            .or_else(|| pod_sc.and_then(|s| s.run_as_group));
        (uid, gid)
    }

    /// The container's environment: `value` (with `$(VAR)` references) and
    /// `valueFrom.fieldRef`.
    fn environment(&self, container: &Container) -> Result<Vec<(String, String)>, String> {
        if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
            return Err("envFrom is not supported by the node agent (env with value or valueFrom.fieldRef is)".into());
        }
        let mut env: Vec<(String, String)> = Vec::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (_, Some(from)) => match &from.field_ref {
                    Some(field) => self
                        .facts
                        .field(&field.field_path)
                        .map_err(|e| format!("env {}: {e}", var.name))?,
                    None => {
                        return Err(format!(
                            "env {}: only value and valueFrom.fieldRef are supported by the node agent",
                            var.name
                        ));
                    }
                },
                (Some(value), None) => expand(value, &env),
                (None, None) => String::new(),
            };
            env.retain(|(k, _)| k != &var.name);
            env.push((var.name.clone(), value));
        }
        Ok(env)
    }

    async fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::Exited { slot, status } => self.on_exit(slot, status).await,
            Internal::Probe { slot, pid, verdict } => {
                // A verdict about an earlier process of this slot counts no more.
                if self.procs.get(&slot) != Some(&pid) {
                    return;
                }
                self.on_probe(slot, pid, verdict).await;
            }
            Internal::Restart(slot) => {
                self.restarts.remove(&slot);
                if self.stopping.is_some() || self.done || self.procs.contains_key(&slot) {
                    return;
                }
                if let Err(message) = self.spawn(slot) {
                    let name = self.spec(slot).name.clone();
                    self.warn(
                        "BackOff",
                        &format!("sidecar {name:?} cannot restart: {message}"),
                    );
                    self.run_status(slot).state =
                        State::waiting("CreateContainerError", Some(message));
                    self.schedule_restart(slot);
                }
            }
        }
    }

    async fn on_exit(&mut self, slot: Slot, status: std::io::Result<ExitStatus>) {
        use std::os::unix::process::ExitStatusExt;
        if self.procs.remove(&slot).is_none() {
            return;
        }
        self.env.metrics.processes.dec();
        self.probes.retain(|(s, _), _| *s != slot);
        let (exit_code, signal) = match &status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(code), _) => (code, None),
                (None, Some(sig)) => (128 + sig, Some(sig)),
                (None, None) => (-1, None),
            },
            Err(_) => (-1, None),
        };
        let name = self.spec(slot).name.clone();
        tracing::info!(pod = %self.key, container = %name, exit_code, "container exited");
        let run = self.run_status(slot);
        let started_at = match &run.state {
            State::Running { started_at } => started_at.clone(),
            _ => now(),
        };
        run.state = State::Terminated {
            exit_code,
            signal,
            reason: if exit_code == 0 { "Completed" } else { "Error" }.to_string(),
            message: None,
            started_at,
            finished_at: now(),
        };
        run.ready = false;
        run.started = false;

        if self.stopping.is_some() {
            self.signal_sidecars_when_alone().await;
            return;
        }
        match slot {
            Slot::Init(_) if self.is_sidecar(slot) => {
                if !self.done {
                    let run = self.run_status(slot);
                    run.last_state = Some(run.state.clone());
                    self.schedule_restart(slot);
                }
            }
            Slot::Init(_) => {
                if self.waiting_on == Some(slot) {
                    self.waiting_on = None;
                }
                if exit_code == 0 {
                    self.run_status(slot).ready = true;
                    self.advance();
                } else {
                    self.fail(
                        RunPhase::Failed,
                        "InitContainerFailed",
                        format!("init container {name:?} exited with code {exit_code}"),
                    );
                    self.stop_sidecars_after_failure();
                }
            }
            Slot::Main(_) => {
                if exit_code != 0 {
                    self.warn(
                        "ContainerExited",
                        &format!(
                            "container {name:?} exited with code {exit_code} (the node agent does not restart containers)"
                        ),
                    );
                }
                self.check_finished();
            }
        }
    }

    /// All containers ended: with `restartPolicy: Never` the pod succeeds or fails
    /// and its sidecars are stopped.
    fn check_finished(&mut self) {
        let all_ended = !self.main_specs.is_empty()
            && (0..self.main_specs.len()).all(|i| !self.procs.contains_key(&Slot::Main(i)));
        if !all_ended || self.done {
            return;
        }
        let policy = self
            .pod()
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        if policy != "Never" {
            return;
        }
        let failed = self
            .status
            .containers
            .iter()
            .any(|c| !matches!(c.state, State::Terminated { exit_code: 0, .. }));
        self.done = true;
        self.status.phase = if failed {
            RunPhase::Failed
        } else {
            RunPhase::Succeeded
        };
        self.stop_sidecars_after_failure();
    }

    fn stop_sidecars_after_failure(&mut self) {
        let sidecars: Vec<u32> = self
            .procs
            .iter()
            .filter(|(slot, _)| self.is_sidecar(**slot))
            .map(|(_, pid)| *pid)
            .collect();
        tokio::spawn(async move {
            for pid in sidecars {
                signal_group(pid, "TERM").await;
            }
        });
    }

    fn schedule_restart(&mut self, slot: Slot) {
        let delay = self
            .backoff
            .get(&slot)
            .map(|d| (*d * 2).min(Duration::from_secs(30)))
            .unwrap_or(Duration::from_secs(1));
        self.backoff.insert(slot, delay);
        let run = self.run_status(slot);
        run.restart_count += 1;
        let name = self.spec(slot).name.clone();
        self.warn(
            "BackOff",
            &format!("restarting sidecar {name:?} in {delay:?}"),
        );
        let tx = self.internal_tx.clone();
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Internal::Restart(slot));
        });
        self.restarts.insert(slot, AbortOnDrop(task));
    }

    async fn on_probe(&mut self, slot: Slot, pid: u32, verdict: Verdict) {
        match verdict.kind {
            Kind::Startup if verdict.ok => {
                self.probes.remove(&(slot, Kind::Startup));
                let has_readiness = self.spec(slot).readiness_probe.is_some();
                let run = self.run_status(slot);
                run.started = true;
                run.ready = !has_readiness;
                self.backoff.remove(&slot);
                self.start_readiness(slot, pid);
                if self.waiting_on == Some(slot) {
                    self.waiting_on = None;
                    self.advance();
                }
            }
            Kind::Startup => {
                let name = self.spec(slot).name.clone();
                self.warn(
                    "Unhealthy",
                    &format!(
                        "startup probe of {name:?} failed: {}; killing it",
                        verdict.message
                    ),
                );
                signal_group(pid, "KILL").await;
            }
            Kind::Readiness => {
                let run = self.run_status(slot);
                let was_ready = run.ready;
                if run.state.is_running() {
                    run.ready = verdict.ok;
                }
                // Not ready before the first success is expected; losing it is news.
                if !verdict.ok && was_ready {
                    let name = self.spec(slot).name.clone();
                    self.warn(
                        "Unhealthy",
                        &format!("readiness probe of {name:?} failed: {}", verdict.message),
                    );
                }
            }
        }
    }

    /// Graceful stop: SIGTERM to the containers (and a running init container), the
    /// sidecars once those are gone; SIGKILL at `deadline`.
    async fn stop(&mut self, deadline: Instant) {
        let deadline = self.stopping.map_or(deadline, |d| d.min(deadline));
        let first = self.stopping.is_none();
        self.stopping = Some(deadline);
        self.restarts.clear();
        if deadline <= Instant::now() {
            self.kill_all().await;
            return;
        }
        if first {
            let targets: Vec<u32> = self
                .procs
                .iter()
                .filter(|(slot, _)| !self.is_sidecar(**slot))
                .map(|(_, pid)| *pid)
                .collect();
            for pid in targets {
                signal_group(pid, "TERM").await;
            }
            self.signal_sidecars_when_alone().await;
        }
    }

    async fn signal_sidecars_when_alone(&mut self) {
        if self.sidecars_signalled {
            return;
        }
        let others = self.procs.keys().any(|slot| !self.is_sidecar(*slot));
        if others {
            return;
        }
        self.sidecars_signalled = true;
        // In reverse order of their start.
        let mut sidecars: Vec<(Slot, u32)> = self.procs.iter().map(|(s, p)| (*s, *p)).collect();
        sidecars.sort_by_key(|(slot, _)| {
            std::cmp::Reverse(match slot {
                Slot::Init(i) | Slot::Main(i) => *i,
            })
        });
        for (_, pid) in sidecars {
            signal_group(pid, "TERM").await;
        }
    }

    async fn kill_all(&mut self) {
        self.killed = true;
        if self.stopping.is_none() {
            self.stopping = Some(Instant::now());
        }
        let pids: Vec<u32> = self.procs.values().copied().collect();
        for pid in pids {
            signal_group(pid, "KILL").await;
        }
    }

    /// Removes the network, the volumes and the mount points.
    async fn teardown(&mut self) {
        self.probes.clear();
        self.restarts.clear();
        if let Ok(bridge) = &self.env.bridge {
            PodNet {
                netns: bridge.netns_name(self.facts.pod_ip),
                host_veth: bridge.host_veth_name(self.facts.pod_ip),
            }
            .remove()
            .await;
        }
        for hold in self.mounted.drain(..) {
            self.env.mounts.release(hold);
        }
        self.volumes = None;
        let _ = std::fs::remove_dir_all(self.pod_dir.join("volumes"));
        tracing::info!(pod = %self.key, "pod stopped and cleaned up");
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends SIGTERM/SIGKILL to the process group led by `pid` (with `kill`, procps).
pub async fn signal_group(pid: u32, signal: &str) {
    if pid == 0 {
        return;
    }
    let run = tokio::process::Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .status();
    match tokio::time::timeout(Duration::from_secs(5), run).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, pid, "cannot run `kill` (procps) to signal a pod's process")
        }
        Err(_) => tracing::warn!(pid, "`kill` did not finish within 5s"),
    }
}

/// `command[0]`: an absolute path if it exists, else its name in `bin_dir`, else on PATH.
fn resolve(argv0: &str, bin_dir: Option<&Path>) -> Result<PathBuf, String> {
    let path = Path::new(argv0);
    if path.is_absolute() && is_executable(path) {
        return Ok(path.to_path_buf());
    }
    let name = path
        .file_name()
        .ok_or_else(|| format!("command {argv0:?} names no program"))?;
    if let Some(dir) = bin_dir {
        let candidate = dir.join(name);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    which(&name.to_string_lossy()).ok_or_else(|| {
        format!(
            "executable {argv0:?} not found (not an existing absolute path, not in --bin-dir {}, not on PATH)",
            bin_dir.map_or("(none)".into(), |d| d.display().to_string())
        )
    })
}

/// Single-quotes `s` for sh.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Kubernetes' `$(VAR)` expansion: defined variables are replaced, `$$` is a `$`,
/// anything else stays as written.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubernetes() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand("x$(A)y", &env), "x1y");
        assert_eq!(expand("$(B)", &env), "$(B)");
        assert_eq!(expand("$$(A)", &env), "$(A)");
        assert_eq!(expand("cost $5", &env), "cost $5");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn resolves_programs() {
        assert!(resolve("sh", None).is_ok());
        assert!(
            resolve("/no/such/dir/sh", None).is_ok(),
            "falls back to the name"
        );
        let e = resolve("no-such-program-here", Some(Path::new("/nonexistent"))).unwrap_err();
        assert!(e.contains("not found"), "{e}");
    }
}
