//! Pod status as a kubelet would report it, built from the pod, its address and, for
//! pods the agent runs, what its processes do. Pure: the controller decides when to
//! write it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};

/// `agent.tandem.io/ready: "false"` makes a pod not ready; `"true"` or nothing does not.
pub const READY_ANNOTATION: &str = "agent.tandem.io/ready";
/// `agent.tandem.io/run: "true"`: the agent runs the pod's containers for real.
pub const RUN_ANNOTATION: &str = "agent.tandem.io/run";

/// Now, to the second, as the API writes times.
pub fn now() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|v| v.trim())
}

/// False when a test made the pod not ready with the annotation.
pub fn annotation_allows_ready(pod: &Pod) -> bool {
    !annotation(pod, READY_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

pub fn wants_run(pod: &Pod) -> bool {
    annotation(pod, RUN_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

/// A native sidecar: an init container with `restartPolicy: Always`.
pub fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: String,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: String,
        message: Option<String>,
        started_at: String,
        finished_at: String,
    },
}

impl State {
    pub fn waiting(reason: &str, message: Option<String>) -> Self {
        Self::Waiting {
            reason: reason.to_string(),
            message,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self, Self::Running { .. })
    }

    fn to_json(&self) -> Value {
        match self {
            Self::Waiting { reason, message } => {
                let mut w = json!({"reason": reason});
                if let Some(m) = message {
                    w["message"] = json!(m);
                }
                json!({"waiting": w})
            }
            Self::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            Self::Terminated {
                exit_code,
                signal,
                reason,
                message,
                started_at,
                finished_at,
            } => {
                let mut t = json!({
                    "exitCode": exit_code,
                    "reason": reason,
                    "startedAt": started_at,
                    "finishedAt": finished_at,
                });
                if let Some(s) = signal {
                    t["signal"] = json!(s);
                }
                if let Some(m) = message {
                    t["message"] = json!(m);
                }
                json!({"terminated": t})
            }
        }
    }
}

/// One container of a pod the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRun {
    pub name: String,
    pub state: State,
    pub last_state: Option<State>,
    pub ready: bool,
    pub started: bool,
    pub restart_count: i32,
    pub pid: Option<u32>,
}

impl ContainerRun {
    pub fn new(name: &str, state: State) -> Self {
        Self {
            name: name.to_string(),
            state,
            last_state: None,
            ready: false,
            started: false,
            restart_count: 0,
            pid: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

/// What a pod's processes do, as the runner reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeStatus {
    pub phase: RunPhase,
    /// A pod-level reason and message (why it cannot run, why it failed).
    pub reason: Option<String>,
    pub message: Option<String>,
    pub initialized: bool,
    pub init: Vec<ContainerRun>,
    pub containers: Vec<ContainerRun>,
}

impl RuntimeStatus {
    /// Every container waiting, nothing started.
    pub fn new(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        let init = spec
            .and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
            .map(|c| ContainerRun::new(&c.name, State::waiting("PodInitializing", None)))
            .collect::<Vec<_>>();
        let waiting = if init.is_empty() {
            "ContainerCreating"
        } else {
            "PodInitializing"
        };
        let containers = spec
            .map(|s| &s.containers)
            .into_iter()
            .flatten()
            .map(|c| ContainerRun::new(&c.name, State::waiting(waiting, None)))
            .collect();
        Self {
            phase: RunPhase::Pending,
            reason: None,
            message: None,
            initialized: false,
            init,
            containers,
        }
    }
}

/// Everything a status is made of.
pub struct Inputs<'a> {
    pub pod: &'a Pod,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub start_time: &'a str,
    /// `None`: a pod the agent does not run (its containers are taken as running).
    pub runtime: Option<&'a RuntimeStatus>,
    pub now: &'a str,
}

/// Condition type → (status, lastTransitionTime), kept between writes so a time
/// changes only when its status does.
pub type Transitions = BTreeMap<String, (bool, String)>;

/// The pod's `status` (for a merge patch), updating `transitions`.
pub fn pod_status(inputs: &Inputs<'_>, transitions: &mut Transitions) -> Value {
    let pod = inputs.pod;
    let spec = pod.spec.as_ref();
    let init_specs: Vec<&Container> = spec
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .collect();
    let main_specs: Vec<&Container> = spec.map(|s| &s.containers).into_iter().flatten().collect();
    let allow_ready = annotation_allows_ready(pod);

    let synthesized;
    let runtime = match inputs.runtime {
        Some(r) => r,
        None => {
            synthesized = assumed_running(pod, inputs.start_time);
            &synthesized
        }
    };

    let image_of = |specs: &[&Container], name: &str| {
        specs
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.image.clone())
            .unwrap_or_default()
    };
    let statuses = |runs: &[ContainerRun], specs: &[&Container]| -> Vec<Value> {
        runs.iter()
            .map(|c| {
                let mut s = json!({
                    "name": c.name,
                    "image": image_of(specs, &c.name),
                    "imageID": "",
                    "ready": c.ready && allow_ready,
                    "started": c.started,
                    "restartCount": c.restart_count,
                    "state": c.state.to_json(),
                });
                if let Some(pid) = c.pid {
                    s["containerID"] = json!(format!("tandem://{pid}"));
                }
                if let Some(last) = &c.last_state {
                    s["lastState"] = last.to_json();
                }
                s
            })
            .collect()
    };

    // Ready counts the containers and the native sidecars, as the kubelet does.
    let sidecars = runtime
        .init
        .iter()
        .filter(|c| init_specs.iter().any(|s| s.name == c.name && is_sidecar(s)));
    let unready: Vec<&str> = runtime
        .containers
        .iter()
        .chain(sidecars)
        .filter(|c| !c.ready)
        .map(|c| c.name.as_str())
        .collect();
    let containers_ready = unready.is_empty() && allow_ready && runtime.phase == RunPhase::Running;
    let not_ready_message = if !unready.is_empty() {
        format!("containers with unready status: [{}]", unready.join(" "))
    } else if !allow_ready {
        format!("the pod is annotated {READY_ANNOTATION}: \"false\"")
    } else {
        format!("the pod is {:?}", runtime.phase)
    };
    let uninitialized: Vec<&str> = runtime
        .init
        .iter()
        .filter(|c| !matches!(c.state, State::Terminated { exit_code: 0, .. }) && !c.started)
        .map(|c| c.name.as_str())
        .collect();

    let now = inputs.now;
    let mut condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        let time = match transitions.get(kind) {
            Some((was, time)) if *was == ok => time.clone(),
            _ => now.to_string(),
        };
        transitions.insert(kind.to_string(), (ok, time.clone()));
        let mut c = json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "lastProbeTime": null,
            "lastTransitionTime": time,
        });
        if !ok {
            c["reason"] = json!(reason);
            c["message"] = json!(message);
        }
        c
    };
    let ready_reason = if runtime.phase == RunPhase::Failed || runtime.phase == RunPhase::Succeeded
    {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let conditions = vec![
        condition("PodScheduled", true, "", ""),
        condition(
            "Initialized",
            runtime.initialized,
            "ContainersNotInitialized",
            &format!(
                "containers with incomplete status: [{}]",
                uninitialized.join(" ")
            ),
        ),
        condition(
            "ContainersReady",
            containers_ready,
            ready_reason,
            &not_ready_message,
        ),
        condition("Ready", containers_ready, ready_reason, &not_ready_message),
    ];

    let phase = match runtime.phase {
        RunPhase::Pending => "Pending",
        RunPhase::Running => "Running",
        RunPhase::Succeeded => "Succeeded",
        RunPhase::Failed => "Failed",
    };
    let pod_ip = inputs.pod_ip.to_string();
    let host_ip = inputs.host_ip.to_string();
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip,
        "podIPs": [{"ip": pod_ip}],
        "startTime": inputs.start_time,
        "containerStatuses": statuses(&runtime.containers, &main_specs),
        "reason": runtime.reason,
        "message": runtime.message,
    });
    if !runtime.init.is_empty() {
        status["initContainerStatuses"] = json!(statuses(&runtime.init, &init_specs));
    }
    status
}

/// The status of a pod whose containers are not run: all started and running (init
/// containers completed), ready unless the annotation says otherwise.
fn assumed_running(pod: &Pod, start_time: &str) -> RuntimeStatus {
    let spec = pod.spec.as_ref();
    let running = |c: &Container| ContainerRun {
        name: c.name.clone(),
        state: State::Running {
            started_at: start_time.to_string(),
        },
        last_state: None,
        ready: true,
        started: true,
        restart_count: 0,
        pid: None,
    };
    let init = spec
        .and_then(|s| s.init_containers.as_ref())
        .into_iter()
        .flatten()
        .map(|c| {
            if is_sidecar(c) {
                running(c)
            } else {
                ContainerRun {
                    state: State::Terminated {
                        exit_code: 0,
                        signal: None,
                        reason: "Completed".to_string(),
                        message: None,
                        started_at: start_time.to_string(),
                        finished_at: start_time.to_string(),
                    },
                    started: false,
                    ..running(c)
                }
            }
        })
        .collect();
    RuntimeStatus {
        phase: RunPhase::Running,
        reason: None,
        message: None,
        initialized: true,
        init,
        containers: spec
            .map(|s| &s.containers)
            .into_iter()
            .flatten()
            .map(running)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(annotations: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "n", "annotations": annotations},
            "spec": {
                "initContainers": [
                    {"name": "setup", "image": "i"},
                    {"name": "side", "image": "i", "restartPolicy": "Always"},
                ],
                "containers": [{"name": "app", "image": "app:1"}],
            }
        }))
        .unwrap()
    }

    fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap()
    }

    #[test]
    fn a_pod_not_run_is_running_and_ready_unless_annotated() {
        let p = pod(json!({}));
        let mut t = Transitions::new();
        let inputs = Inputs {
            pod: &p,
            pod_ip: Ipv4Addr::new(10, 0, 0, 5),
            host_ip: Ipv4Addr::new(10, 0, 0, 1),
            start_time: "2025-01-01T00:00:00Z",
            runtime: None,
            now: "2025-01-01T00:00:01Z",
        };
        let s = pod_status(&inputs, &mut t);
        assert_eq!(s["phase"], "Running");
        assert_eq!(s["podIP"], "10.0.0.5");
        assert_eq!(condition(&s, "Ready")["status"], "True");
        assert_eq!(s["containerStatuses"][0]["image"], "app:1");
        assert_eq!(
            s["initContainerStatuses"][0]["state"]["terminated"]["reason"],
            "Completed"
        );
        assert!(s["initContainerStatuses"][1]["state"]["running"].is_object());

        let p = pod(json!({READY_ANNOTATION: "false"}));
        let inputs = Inputs {
            pod: &p,
            now: "2025-01-01T00:00:09Z",
            ..inputs
        };
        let s2 = pod_status(&inputs, &mut t);
        let ready = condition(&s2, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["lastTransitionTime"], "2025-01-01T00:00:09Z");
        assert_eq!(
            condition(&s2, "PodScheduled")["lastTransitionTime"],
            "2025-01-01T00:00:01Z",
            "unchanged conditions keep their time"
        );
        assert_eq!(s2["containerStatuses"][0]["ready"], false);
    }

    #[test]
    fn runtime_drives_phase_and_readiness() {
        let p = pod(json!({}));
        let mut runtime = RuntimeStatus::new(&p);
        let mut t = Transitions::new();
        fn inputs<'a>(p: &'a Pod, r: &'a RuntimeStatus) -> Inputs<'a> {
            Inputs {
                pod: p,
                pod_ip: Ipv4Addr::new(10, 0, 0, 5),
                host_ip: Ipv4Addr::new(10, 0, 0, 1),
                start_time: "2025-01-01T00:00:00Z",
                runtime: Some(r),
                now: "2025-01-01T00:00:01Z",
            }
        }
        let s = pod_status(&inputs(&p, &runtime), &mut t);
        assert_eq!(s["phase"], "Pending");
        assert_eq!(condition(&s, "Initialized")["status"], "False");
        runtime.phase = RunPhase::Running;
        runtime.initialized = true;
        for c in runtime.init.iter_mut().chain(runtime.containers.iter_mut()) {
            c.ready = true;
            c.started = true;
            c.state = State::Running {
                started_at: "2025-01-01T00:00:00Z".into(),
            };
        }
        runtime.init[0].ready = false;
        runtime.init[0].started = false;
        runtime.init[0].state = State::Terminated {
            exit_code: 0,
            signal: None,
            reason: "Completed".into(),
            message: None,
            started_at: "2025-01-01T00:00:00Z".into(),
            finished_at: "2025-01-01T00:00:00Z".into(),
        };
        let s = pod_status(&inputs(&p, &runtime), &mut t);
        assert_eq!(condition(&s, "Ready")["status"], "True", "{s:#}");
        runtime.init[1].ready = false;
        let s = pod_status(&inputs(&p, &runtime), &mut t);
        assert_eq!(
            condition(&s, "Ready")["status"],
            "False",
            "a sidecar counts"
        );
        assert!(
            condition(&s, "Ready")["message"]
                .as_str()
                .unwrap()
                .contains("side")
        );
    }
}
