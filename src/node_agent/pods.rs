//! The pod controller: one task that owns everything the agent knows about pods,
//! fed by a watch on all pods and by what its helpers report (bindings, runners,
//! timers). API writes run in tasks of their own, so a slow call holds up nothing;
//! each pod's status goes through one writer task that always writes the latest.
//!
//! - Pending pods (no node, default scheduler, not deleted) are bound to a node
//!   (`scheduler`), with POST pods/NAME/binding (its UID a precondition).
//! - Pods on the agent's nodes get an address and a status (`status`), and, when
//!   annotated `agent.tandem.io/run: "true"`, a runner (`runner`).
//! - A pod with a deletionTimestamp keeps its status for its grace period (capped by
//!   --max-grace; a runner's pod until its processes are gone), then the agent deletes
//!   it with grace period 0 and its UID as precondition, as a kubelet does.
//! - Pods on other nodes are left alone.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::watcher::Event;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::events::Events;
use super::ipam::Ipam;
use super::metrics::{Metrics, ResultLabel};
use super::nodes::NodeSpec;
use super::runner::{self, Report, RunnerEnv, RunnerHandle};
use super::scheduler::{self, Placement};
use super::status::{self, Inputs, RuntimeStatus, Transitions};
use super::volumes::PodFacts;

/// What the controller's helpers tell it.
#[derive(Debug)]
pub enum Note {
    Runner(Report),
    Bound {
        uid: String,
    },
    BindFailed {
        uid: String,
        error: String,
        retry: bool,
    },
    RetryBind {
        uid: String,
    },
    GraceOver {
        uid: String,
    },
    DeleteFailed {
        uid: String,
    },
}

struct Managed {
    pod: Pod,
    node: String,
    ip: Option<Ipv4Addr>,
    start_time: String,
    transitions: Transitions,
    runtime: Option<RuntimeStatus>,
    runner: Option<RunnerHandle>,
    runner_stopped: bool,
    /// Found Succeeded/Failed and not run by this agent: its status is left as it is.
    frozen: bool,
    writer: watch::Sender<Option<Value>>,
    last_status: Option<Value>,
    terminating: bool,
    deleting: bool,
}

pub struct Controller {
    client: Client,
    nodes: Vec<NodeSpec>,
    host_ip: Ipv4Addr,
    ipam: Ipam,
    max_grace: Duration,
    env: RunnerEnv,
    events: Events,
    metrics: Arc<Metrics>,
    notes_tx: mpsc::UnboundedSender<Note>,
    reports_tx: mpsc::UnboundedSender<Report>,
    /// Unbound pods a scheduler should place.
    pending: HashMap<String, Pod>,
    binding: HashSet<String>,
    /// Pods on the agent's nodes (seen or just bound): node and spreading group.
    placed: HashMap<String, (String, String)>,
    pods: HashMap<String, Managed>,
    /// Deleted pods whose runner is still stopping: the address is freed after.
    draining: HashMap<String, Ipv4Addr>,
    /// Pods waiting for a free address.
    starved: HashSet<String>,
    relist: Option<Vec<Pod>>,
    pub synced: bool,
    shutting_down: bool,
}

fn uid_of(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn key_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or(""),
        pod.metadata.name.as_deref().unwrap_or("")
    )
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        nodes: Vec<NodeSpec>,
        ipam: Ipam,
        max_grace: Duration,
        env: RunnerEnv,
        notes_tx: mpsc::UnboundedSender<Note>,
        reports_tx: mpsc::UnboundedSender<Report>,
    ) -> Self {
        Self {
            host_ip: ipam.cidr().gateway(),
            client,
            nodes,
            ipam,
            max_grace,
            events: env.events.clone(),
            metrics: env.metrics.clone(),
            env,
            notes_tx,
            reports_tx,
            pending: HashMap::new(),
            binding: HashSet::new(),
            placed: HashMap::new(),
            pods: HashMap::new(),
            draining: HashMap::new(),
            starved: HashSet::new(),
            relist: None,
            synced: false,
            shutting_down: false,
        }
    }

    fn ours(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n.name == node)
    }

    pub fn on_watch(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.relist = Some(Vec::new()),
            Event::InitApply(pod) => match &mut self.relist {
                Some(list) => list.push(pod),
                None => self.on_pod(pod),
            },
            Event::InitDone => {
                let pods = self.relist.take().unwrap_or_default();
                self.on_relist(pods);
                self.synced = true;
            }
            Event::Apply(pod) => self.on_pod(pod),
            Event::Delete(pod) => self.on_gone(&uid_of(&pod)),
        }
    }

    fn on_relist(&mut self, pods: Vec<Pod>) {
        let seen: HashSet<String> = pods.iter().map(uid_of).collect();
        let known: Vec<String> = self
            .pods
            .keys()
            .chain(self.pending.keys())
            .chain(self.placed.keys())
            .filter(|uid| !seen.contains(*uid) && !self.binding.contains(*uid))
            .cloned()
            .collect();
        for uid in known {
            self.on_gone(&uid);
        }
        if !self.synced {
            // Addresses pods already hold come first, so no new pod is given one.
            for pod in &pods {
                let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
                let ip = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.pod_ip.as_deref())
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok());
                if let (Some(node), Some(ip)) = (node, ip)
                    && self.ours(node)
                {
                    self.ipam.claim(ip, &uid_of(pod));
                }
            }
        }
        for pod in pods {
            self.on_pod(pod);
        }
    }

    fn on_pod(&mut self, pod: Pod) {
        let uid = uid_of(&pod);
        if uid.is_empty() {
            return;
        }
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty());
        match node {
            None => {
                if scheduler::wants_scheduling(&pod) {
                    self.pending.insert(uid.clone(), pod);
                    self.try_bind(&uid);
                } else {
                    self.pending.remove(&uid);
                }
            }
            Some(node) if self.ours(&node) => {
                self.pending.remove(&uid);
                // Finished and terminating pods do not count for spreading (as for
                // the scheduler's topology spread).
                if is_terminal(&pod) || pod.metadata.deletion_timestamp.is_some() {
                    self.placed.remove(&uid);
                } else {
                    self.placed
                        .insert(uid.clone(), (node.clone(), scheduler::group_of(&pod)));
                }
                self.manage(pod, node);
            }
            Some(_) => {
                self.pending.remove(&uid);
                self.placed.remove(&uid);
            }
        }
    }

    fn try_bind(&mut self, uid: &str) {
        if self.binding.contains(uid) || self.shutting_down {
            return;
        }
        let Some(pod) = self.pending.get(uid) else {
            return;
        };
        let candidates = scheduler::eligible(pod, &self.nodes);
        let group = scheduler::group_of(pod);
        let placed: Vec<Placement<'_>> = self
            .placed
            .values()
            .map(|(node, group)| Placement { node, group })
            .collect();
        let Some(node) = scheduler::choose(&candidates, &group, &placed) else {
            let message = format!(
                "0/{} nodes are available: none matches the pod's nodeSelector",
                self.nodes.len()
            );
            self.events.warn(pod, None, "FailedScheduling", &message);
            let (ns, name) = (
                pod.metadata.namespace.clone().unwrap_or_default(),
                pod.metadata.name.clone().unwrap_or_default(),
            );
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            let patch = json!({"status": {"conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": message, "lastProbeTime": null, "lastTransitionTime": status::now(),
            }]}});
            tokio::spawn(async move {
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
            });
            return;
        };
        let node = node.name.clone();
        self.placed.insert(uid.to_string(), (node.clone(), group));
        self.binding.insert(uid.to_string());
        let (ns, name) = (
            pod.metadata.namespace.clone().unwrap_or_default(),
            pod.metadata.name.clone().unwrap_or_default(),
        );
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        });
        let tx = self.notes_tx.clone();
        let uid = uid.to_string();
        tracing::debug!(pod = %format!("{ns}/{name}"), %node, "binding");
        tokio::spawn(async move {
            let result: kube::Result<Value> = api
                .create_subresource("binding", &name, &PostParams::default(), &binding)
                .await;
            let note = match result {
                Ok(_) => Note::Bound { uid },
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Note::BindFailed {
                    uid,
                    error: e.message,
                    retry: false,
                },
                Err(e) => Note::BindFailed {
                    uid,
                    error: e.to_string(),
                    retry: true,
                },
            };
            let _ = tx.send(note);
        });
    }

    pub fn on_note(&mut self, note: Note) {
        match note {
            Note::Runner(Report::Status(uid, runtime)) => {
                if let Some(m) = self.pods.get_mut(&uid) {
                    m.runtime = Some(runtime);
                    self.update_status(&uid);
                }
            }
            Note::Runner(Report::Stopped(uid)) => {
                if let Some(ip) = self.draining.remove(&uid) {
                    self.release(ip, &uid);
                }
                if let Some(m) = self.pods.get_mut(&uid) {
                    m.runner_stopped = true;
                    if m.terminating && !self.shutting_down {
                        self.delete(&uid);
                    }
                }
            }
            Note::Bound { uid } => {
                self.binding.remove(&uid);
                self.metrics
                    .bindings
                    .get_or_create(&ResultLabel { result: "bound" })
                    .inc();
                if let (Some(pod), Some((node, _))) =
                    (self.pending.remove(&uid), self.placed.get(&uid))
                {
                    let message = format!("Successfully assigned {} to {node}", key_of(&pod));
                    self.events.normal(&pod, None, "Scheduled", &message);
                }
            }
            Note::BindFailed { uid, error, retry } => {
                self.binding.remove(&uid);
                self.metrics
                    .bindings
                    .get_or_create(&ResultLabel { result: "error" })
                    .inc();
                // The watch says where the pod is; the assumption is dropped.
                if !self.pods.contains_key(&uid) {
                    self.placed.remove(&uid);
                }
                if let Some(pod) = self.pending.get(&uid) {
                    self.events.warn(
                        pod,
                        None,
                        "FailedScheduling",
                        &format!("binding failed: {error}"),
                    );
                    if retry {
                        self.later(Duration::from_secs(1), Note::RetryBind { uid });
                    } else {
                        self.pending.remove(&uid);
                    }
                }
            }
            Note::RetryBind { uid } => self.try_bind(&uid),
            Note::GraceOver { uid } => self.delete(&uid),
            Note::DeleteFailed { uid } => {
                if let Some(m) = self.pods.get_mut(&uid) {
                    m.deleting = false;
                    self.later(Duration::from_secs(1), Note::GraceOver { uid });
                }
            }
        }
    }

    fn later(&self, delay: Duration, note: Note) {
        let tx = self.notes_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(note);
        });
    }

    fn release(&mut self, ip: Ipv4Addr, uid: &str) {
        self.ipam.release(ip, uid);
        self.metrics.pod_addresses.set(self.ipam.in_use() as i64);
        // Pods that found the range full get another chance.
        for uid in std::mem::take(&mut self.starved) {
            if let Some(m) = self.pods.get(&uid) {
                let (pod, node) = (m.pod.clone(), m.node.clone());
                self.manage(pod, node);
            }
        }
    }

    /// A pod on one of the agent's nodes.
    fn manage(&mut self, pod: Pod, node: String) {
        let uid = uid_of(&pod);
        if !self.pods.contains_key(&uid) {
            let frozen = is_terminal(&pod);
            let start_time = pod
                .status
                .as_ref()
                .and_then(|s| s.start_time.as_ref())
                .map(|t| t.0.to_string())
                .unwrap_or_else(status::now);
            let (writer, rx) = watch::channel(None);
            tokio::spawn(write_status(
                self.client.clone(),
                pod.clone(),
                rx,
                self.metrics.clone(),
            ));
            self.pods.insert(
                uid.clone(),
                Managed {
                    pod: pod.clone(),
                    node: node.clone(),
                    ip: None,
                    start_time,
                    transitions: Transitions::new(),
                    runtime: None,
                    runner: None,
                    runner_stopped: false,
                    frozen,
                    writer,
                    last_status: None,
                    terminating: false,
                    deleting: false,
                },
            );
            self.metrics.pods.set(self.pods.len() as i64);
        }
        let Some(m) = self.pods.get_mut(&uid) else {
            return;
        };
        m.pod = pod;
        if m.ip.is_none() && !m.frozen {
            let held = m
                .pod
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                .filter(|ip| self.ipam.claim(*ip, &uid));
            m.ip = held.or_else(|| self.ipam.allocate(&uid));
            self.metrics.pod_addresses.set(self.ipam.in_use() as i64);
            if m.ip.is_none() {
                self.starved.insert(uid.clone());
                let message = format!(
                    "no free address in the pod CIDR {} ({} in use)",
                    self.ipam.cidr(),
                    self.ipam.in_use()
                );
                self.events
                    .warn(&m.pod, Some(&node), "FailedCreatePodSandBox", &message);
            }
        }
        let m = &self.pods[&uid];
        if m.pod.metadata.deletion_timestamp.is_some() && !m.terminating {
            self.terminate(&uid);
        }
        let m = &self.pods[&uid];
        if status::wants_run(&m.pod)
            && m.runner.is_none()
            && !m.terminating
            && !m.frozen
            && let Some(ip) = m.ip
            && !self.shutting_down
        {
            let facts = PodFacts {
                pod: m.pod.clone(),
                pod_ip: ip,
                host_ip: self.host_ip,
                node: m.node.clone(),
            };
            let handle = runner::start(self.env.clone(), facts, self.reports_tx.clone());
            if let Some(m) = self.pods.get_mut(&uid) {
                m.runner = Some(handle);
            }
        }
        self.update_status(&uid);
    }

    fn update_status(&mut self, uid: &str) {
        let host_ip = self.host_ip;
        let Some(m) = self.pods.get_mut(uid) else {
            return;
        };
        let Some(ip) = m.ip else {
            return;
        };
        if m.frozen {
            return;
        }
        let initial;
        let runtime = if status::wants_run(&m.pod) || m.runner.is_some() {
            match &m.runtime {
                Some(r) => Some(r),
                None => {
                    initial = RuntimeStatus::new(&m.pod);
                    Some(&initial)
                }
            }
        } else {
            None
        };
        let now = status::now();
        let inputs = Inputs {
            pod: &m.pod,
            pod_ip: ip,
            host_ip,
            start_time: &m.start_time,
            runtime,
            now: &now,
        };
        let value = status::pod_status(&inputs, &mut m.transitions);
        if m.last_status.as_ref() != Some(&value) {
            m.last_status = Some(value.clone());
            m.writer.send_replace(Some(value));
        }
    }

    /// The pod has a deletionTimestamp: its grace period starts.
    fn terminate(&mut self, uid: &str) {
        let max_grace = self.max_grace;
        let Some(m) = self.pods.get_mut(uid) else {
            return;
        };
        m.terminating = true;
        let grace = m
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                m.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        let grace = Duration::from_secs(grace).min(max_grace);
        tracing::info!(pod = %key_of(&m.pod), ?grace, "pod terminating");
        match &m.runner {
            Some(runner) if !m.runner_stopped => runner.terminate(Instant::now() + grace),
            Some(_) => self.delete(uid),
            None if m.frozen => self.delete(uid),
            None => self.later(
                grace,
                Note::GraceOver {
                    uid: uid.to_string(),
                },
            ),
        }
    }

    /// Deletes the pod for good (grace period 0, its UID as precondition).
    fn delete(&mut self, uid: &str) {
        let Some(m) = self.pods.get_mut(uid) else {
            return;
        };
        if m.deleting {
            return;
        }
        m.deleting = true;
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            m.pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = m.pod.metadata.name.clone().unwrap_or_default();
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let tx = self.notes_tx.clone();
        let metrics = self.metrics.clone();
        let uid = uid.to_string();
        tokio::spawn(async move {
            let result = match api.delete(&name, &params).await {
                Ok(_) => "deleted",
                // Gone already, or replaced by a pod of the same name.
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => "gone",
                Err(error) => {
                    tracing::warn!(%error, pod = %name, "cannot delete a terminated pod; retrying");
                    let _ = tx.send(Note::DeleteFailed { uid });
                    "error"
                }
            };
            metrics
                .deletions
                .get_or_create(&ResultLabel { result })
                .inc();
        });
    }

    /// The pod is gone from the API.
    fn on_gone(&mut self, uid: &str) {
        self.pending.remove(uid);
        self.placed.remove(uid);
        self.starved.remove(uid);
        if let Some(m) = self.pods.remove(uid) {
            self.metrics.pods.set(self.pods.len() as i64);
            tracing::debug!(pod = %key_of(&m.pod), "pod gone");
            match (m.ip, m.runner) {
                (Some(ip), Some(runner)) if !m.runner_stopped => {
                    // Dropping the handle kills its processes; the address is freed
                    // once its network is gone.
                    drop(runner);
                    self.draining.insert(uid.to_string(), ip);
                }
                (Some(ip), _) => self.release(ip, uid),
                (None, _) => {}
            }
        }
    }

    /// Stops every runner within `grace`; true once all have stopped.
    pub fn begin_shutdown(&mut self, grace: Duration) {
        self.shutting_down = true;
        let deadline = Instant::now() + grace;
        for m in self.pods.values() {
            if let Some(runner) = &m.runner
                && !m.runner_stopped
            {
                runner.terminate(deadline);
            }
        }
    }

    /// Runners that have not reported `Stopped` yet.
    pub fn runners_left(&self) -> usize {
        self.pods
            .values()
            .filter(|m| m.runner.is_some() && !m.runner_stopped)
            .count()
            + self.draining.len()
    }
}

/// Writes a pod's latest desired status, one write at a time; ends when the pod is
/// gone or replaced (another UID), or when the controller drops the sender.
async fn write_status(
    client: Client,
    pod: Pod,
    mut rx: watch::Receiver<Option<Value>>,
    metrics: Arc<Metrics>,
) {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = uid_of(&pod);
    let api: Api<Pod> = Api::namespaced(client, &ns);
    while rx.changed().await.is_ok() {
        loop {
            let Some(status) = rx.borrow_and_update().clone() else {
                break;
            };
            let patch = json!({"metadata": {"uid": uid}, "status": status});
            match api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    metrics
                        .status_writes
                        .get_or_create(&ResultLabel { result: "ok" })
                        .inc();
                    break;
                }
                Err(kube::Error::Api(e))
                    if e.code == 404
                        || e.code == 409
                        || (e.code == 422 && e.message.contains("metadata.uid")) =>
                {
                    tracing::debug!(pod = %format!("{ns}/{name}"), error = %e.message, "pod gone or replaced: no more status writes");
                    return;
                }
                Err(kube::Error::Api(e)) if e.code == 422 => {
                    // Retrying the same status is pointless: wait for the next one.
                    metrics
                        .status_writes
                        .get_or_create(&ResultLabel { result: "invalid" })
                        .inc();
                    tracing::warn!(pod = %format!("{ns}/{name}"), error = %e.message, "the API server refused the pod status");
                    break;
                }
                Err(error) => {
                    metrics
                        .status_writes
                        .get_or_create(&ResultLabel { result: "error" })
                        .inc();
                    tracing::warn!(%error, pod = %format!("{ns}/{name}"), "cannot write the pod status; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        changed = rx.changed() => if changed.is_err() { return },
                    }
                }
            }
        }
    }
}
