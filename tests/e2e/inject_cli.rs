//! `tandem inject`: golden files over every workload kind, Lists and documents that
//! pass through; invalid YAML named by document and line; and, in the real cluster,
//! its output applied with kubectl gives the very pod the webhook makes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::cluster::{CLUSTER_STEP, Namespace, cluster, name};
use crate::injection::{CLUSTER_WIDE, INIT_IMAGE, Injector, PROXY_IMAGE};
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(300);

fn golden(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e/golden")
        .join(file)
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `tandem inject` with the tests' images, `stdin` piped in if given.
async fn inject(args: &[&str], stdin: Option<&str>) -> Run {
    let mut child = tokio::process::Command::new(exe())
        .args([
            "inject",
            "--proxy-image",
            PROXY_IMAGE,
            "--init-image",
            INIT_IMAGE,
        ])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("tandem inject starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
    }
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("tandem inject finishes")
        .expect("tandem inject runs");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Compares with a golden file, or rewrites it with TANDEM_UPDATE_GOLDEN=1.
fn assert_golden(file: &str, actual: &str) {
    let path = golden(file);
    if std::env::var_os("TANDEM_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        let line = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the output at line {} (TANDEM_UPDATE_GOLDEN=1 rewrites it):\nexpected: {:?}\nactual:   {:?}",
            path.display(),
            line + 1,
            expected.lines().nth(line),
            actual.lines().nth(line)
        );
    }
}

/// The documents of a stream, as text, cut at `---` lines.
fn documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.split_inclusive('\n') {
        if line.trim_end() == "---" {
            docs.push(String::new());
        } else {
            docs.last_mut().unwrap().push_str(line);
        }
    }
    docs
}

#[tokio::test]
async fn every_workload_kind_is_injected_and_the_rest_passes_through() {
    bounded(LIMIT, async {
        let input_path = golden("inject-input.yaml");
        let input = std::fs::read_to_string(&input_path).unwrap();
        let run = inject(&[&input_path.display().to_string()], None).await;
        assert!(run.ok, "{}", run.stderr);
        assert_golden("inject-output.yaml", &run.stdout);
        let notes = run
            .stderr
            .replace(&format!("{}: ", input_path.display()), "");
        assert_golden("inject-notes.txt", &notes);

        // What is not a workload to inject comes out byte for byte.
        let (ins, outs) = (documents(&input), documents(&run.stdout));
        assert_eq!(ins.len(), outs.len());
        for (i, o) in ins.iter().zip(&outs) {
            let unchanged = [
                "kind: ConfigMap\n",
                "kind: Service\n",
                "name: outside",
                "name: meshed",
                "# Every kind",
            ];
            if unchanged.iter().any(|u| i.contains(u)) && !i.contains("kind: List") {
                assert_eq!(i, o);
            }
        }
        // Every workload has the proxy, in front of its own init containers.
        let docs: Vec<Value> = outs
            .iter()
            .filter(|d| {
                d.lines()
                    .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
            })
            .map(|d| serde_json::from_str::<Value>(&yaml_to_json(d)).unwrap())
            .collect();
        let template = |doc: &Value| -> Value {
            match doc["kind"].as_str().unwrap() {
                "Pod" => doc.clone(),
                "CronJob" => doc["spec"]["jobTemplate"]["spec"]["template"].clone(),
                _ => doc["spec"]["template"].clone(),
            }
        };
        for doc in &docs {
            let kinds = [
                "Deployment",
                "StatefulSet",
                "DaemonSet",
                "ReplicaSet",
                "Job",
                "CronJob",
                "Pod",
            ];
            let items = if doc["kind"] == "List" {
                doc["items"].as_array().unwrap().clone()
            } else {
                vec![doc.clone()]
            };
            for item in items {
                let name = item["metadata"]["name"].as_str().unwrap_or_default();
                if !kinds.contains(&item["kind"].as_str().unwrap_or_default())
                    || name == "outside"
                    || name == "meshed"
                {
                    continue;
                }
                let t = template(&item);
                let inits: Vec<&str> = t["spec"]["initContainers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c["name"].as_str().unwrap())
                    .collect();
                assert_eq!(inits[..2], ["tandem-init", "tandem-proxy"], "{name}");
                assert_eq!(t["spec"]["initContainers"][1]["image"], PROXY_IMAGE);
            }
        }

        // Stdin gives the same; injecting the output again changes nothing.
        let piped = inject(&["-"], Some(&input)).await;
        assert_eq!(piped.stdout, run.stdout);
        let again = inject(&[], Some(&run.stdout)).await;
        assert!(again.ok, "{}", again.stderr);
        assert_eq!(again.stdout, run.stdout, "inject(inject(x)) == inject(x)");
        assert!(
            again.stderr.lines().all(|l| l.contains(" not injected: ")),
            "{}",
            again.stderr
        );
    })
    .await
}

/// One YAML document as JSON, read by `tandem inject`'s own reader (what kubectl
/// makes of the output is checked against the API server below).
fn yaml_to_json(doc: &str) -> String {
    tandem_control_plane::injection::manifests::to_json(doc)
        .unwrap_or_else(|e| panic!("{e}: {doc}"))
        .to_string()
}

#[tokio::test]
async fn invalid_yaml_names_the_document_and_the_line() {
    bounded(LIMIT, async {
        let dir = TestDir::new("inject-invalid");
        let file = dir.path("bad.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n# two\napiVersion: v1\nkind: Pod\nmetadata: {name: b}\nspec:\n  containers:\n  - name: b\n   image: broken\n",
        )
        .unwrap();
        let run = inject(&[&file.display().to_string()], None).await;
        assert!(!run.ok);
        assert!(run.stdout.is_empty(), "nothing written: {}", run.stdout);
        let said = run.stderr.trim();
        assert!(
            said.starts_with(&format!("error: {}: document 2, line 12", file.display())),
            "{said}"
        );
        // From stdin too, named `-`.
        let text = std::fs::read_to_string(&file).unwrap();
        let run = inject(&[], Some(&text)).await;
        assert!(!run.ok && run.stderr.contains("error: -: document 2, line 12"), "{}", run.stderr);
        // A bad annotation is not an error: the workload is written as it was.
        let run = inject(&[], Some("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  annotations: {tandem.io/skip-outbound-ports: nope}\nspec: {containers: [{name: a, image: a}]}\n")).await;
        assert!(run.ok);
        assert!(!run.stdout.contains("tandem-proxy"));
        assert!(run.stderr.contains("Pod/p not injected: invalid annotation tandem.io/skip-outbound-ports: \"nope\""), "{}", run.stderr);
    })
    .await
}

/// The one pod of Deployment `web`, as stored.
async fn pod_of(ns: &Namespace) -> Value {
    let pods = eventually(CLUSTER_STEP, "the Deployment's pod", || async {
        let pods = ns.pods("app=web").await;
        (pods.len() == 1).then_some(pods)
    })
    .await;
    let said = ns
        .cluster()
        .kubectl_ok(
            &["-n", ns.name(), "get", "pod", &name(&pods[0]), "-o", "json"],
            None,
        )
        .await;
    serde_json::from_str::<Value>(&said.stdout).unwrap()
}

/// A container as stored, without the ServiceAccount token's mount (its volume's name
/// is random per pod).
fn comparable(containers: &Value) -> Value {
    let mut containers = containers.clone();
    for c in containers.as_array_mut().into_iter().flatten() {
        if let Some(mounts) = c.get_mut("volumeMounts").and_then(Value::as_array_mut) {
            mounts.retain(|m| {
                !m["name"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("kube-api-access-")
            });
        }
    }
    containers
}

#[tokio::test]
async fn its_output_applied_with_kubectl_gives_the_pod_the_webhook_makes() {
    bounded(LIMIT, async {
        let cluster = cluster().await;
        let _only = CLUSTER_WIDE.lock().await;
        let meshed = cluster.namespace("inject-webhook").await;
        let plain = cluster.namespace("inject-cli").await;
        let _injector = Injector::start(&meshed).await;

        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"},
                                 "annotations": {"tandem.io/skip-inbound-ports": "9090", "tandem.io/proxy-cpu-limit": "500m"}},
                    "spec": {"initContainers": [{"name": "migrate", "image": "app:1"}],
                             "containers": [{"name": "web", "image": "app:1", "ports": [{"containerPort": 8080}]}]}
                }
            }
        });
        // The raw Deployment where the webhook meshes it; the injected one where nothing does.
        meshed.apply(std::slice::from_ref(&deployment)).await;
        let injected = inject(&[], Some(&deployment.to_string())).await;
        assert!(injected.ok, "{}", injected.stderr);
        cluster.kubectl_ok(&["-n", plain.name(), "apply", "-f", "-"], Some(injected.stdout.as_bytes())).await;

        let (by_webhook, by_cli) = (pod_of(&meshed).await, pod_of(&plain).await);
        for field in ["initContainers", "containers"] {
            assert_eq!(
                comparable(&by_webhook["spec"][field]),
                comparable(&by_cli["spec"][field]),
                "spec.{field} differs"
            );
        }
        let names: Vec<&str> = by_cli["spec"]["initContainers"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["tandem-init", "tandem-proxy", "migrate"]);
        assert_eq!(
            by_webhook["metadata"]["annotations"]["tandem.io/injected"],
            by_cli["metadata"]["annotations"]["tandem.io/injected"]
        );
        let volume = |pod: &Value| pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tandem-xtables").cloned();
        assert_eq!(volume(&by_webhook), volume(&by_cli));
        assert!(volume(&by_cli).is_some());
    })
    .await
}
