//! `tandem inject`: the mutation over YAML, offline. A stream is cut into its
//! documents at their `---` lines (which YAML forbids inside a document), so a
//! document that is not a workload (a ConfigMap, a Service, an already injected
//! Deployment, a comment) is written back byte for byte. A workload's pod template
//! (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job,
//! CronJob; also inside a `List`) gets the webhook's own mutation, as if its namespace
//! were enabled, and its document is written anew (keys in their order, comments
//! above it kept).

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Value;

use super::InjectConfig;
use super::mutate::{self, Context, Outcome, Skipped};

/// A YAML document as read: maps keep their order.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a YAML value")
            }
            fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
                Ok(Node::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
                Ok(Node::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Node, E> {
                Ok(Node::UInt(v))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
                Ok(Node::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Node, E> {
                Ok(Node::Str(v.to_string()))
            }
            fn visit_string<E>(self, v: String) -> Result<Node, E> {
                Ok(Node::Str(v))
            }
            fn visit_unit<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_none<E>(self) -> Result<Node, E> {
                Ok(Node::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                Node::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(Node::Seq(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut out: Vec<(String, Node)> = Vec::new();
                while let Some(key) = map.next_key::<Node>()? {
                    let key = match key {
                        Node::Str(s) => s,
                        Node::Bool(b) => b.to_string(),
                        Node::Int(i) => i.to_string(),
                        Node::UInt(u) => u.to_string(),
                        Node::Float(f) => f.to_string(),
                        Node::Null => "null".to_string(),
                        Node::Seq(_) | Node::Map(_) => {
                            return Err(de::Error::custom("a map key must be a scalar"));
                        }
                    };
                    let value = map.next_value()?;
                    if out.iter().any(|(k, _)| *k == key) {
                        return Err(de::Error::custom(format!("duplicate key {key:?}")));
                    }
                    out.push((key, value));
                }
                Ok(Node::Map(out))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Null => s.serialize_unit(),
            Node::Bool(b) => s.serialize_bool(*b),
            Node::Int(i) => s.serialize_i64(*i),
            Node::UInt(u) => s.serialize_u64(*u),
            Node::Float(f) => s.serialize_f64(*f),
            Node::Str(v) => s.serialize_str(v),
            Node::Seq(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Node::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

impl Node {
    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn get_mut(&mut self, key: &str) -> Option<&mut Node> {
        match self {
            Node::Map(entries) => entries.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Int(i) => Value::from(*i),
            Node::UInt(u) => Value::from(*u),
            Node::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Node::Str(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Node::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// From JSON the mutation made: `name`, `image`, `command`, `args` first, as
    /// people write containers, then the rest in alphabetical order.
    fn from_json(value: &Value) -> Node {
        match value {
            Value::Null => Node::Null,
            Value::Bool(b) => Node::Bool(*b),
            Value::Number(n) => n
                .as_i64()
                .map(Node::Int)
                .or_else(|| n.as_u64().map(Node::UInt))
                .unwrap_or_else(|| Node::Float(n.as_f64().unwrap_or_default())),
            Value::String(s) => Node::Str(s.clone()),
            Value::Array(items) => Node::Seq(items.iter().map(Node::from_json).collect()),
            Value::Object(map) => {
                let mut entries: Vec<(String, Node)> = map
                    .iter()
                    .map(|(k, v)| (k.clone(), Node::from_json(v)))
                    .collect();
                const FIRST: [&str; 5] = ["name", "image", "command", "args", "restartPolicy"];
                entries
                    .sort_by_key(|(k, _)| FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()));
                Node::Map(entries)
            }
        }
    }

    /// RFC 6902 `add` at a JSON pointer (the only operation the mutation makes).
    fn add(&mut self, pointer: &str, value: Node) -> Result<(), String> {
        let tokens: Vec<String> = pointer
            .split('/')
            .skip(1)
            .map(|t| t.replace("~1", "/").replace("~0", "~"))
            .collect();
        let Some((last, parents)) = tokens.split_last() else {
            *self = value;
            return Ok(());
        };
        let mut node = self;
        for token in parents {
            node = match node {
                Node::Map(_) => node.get_mut(token),
                Node::Seq(items) => token.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("no {token:?} on the way to {pointer}"))?;
        }
        match node {
            Node::Map(entries) => match entries.iter_mut().find(|(k, _)| k == last) {
                Some((_, v)) => *v = value,
                None => entries.push((last.clone(), value)),
            },
            Node::Seq(items) if last == "-" => items.push(value),
            Node::Seq(items) => {
                let i: usize = last
                    .parse()
                    .map_err(|_| format!("bad index in {pointer}"))?;
                if i > items.len() {
                    return Err(format!("index out of range in {pointer}"));
                }
                items.insert(i, value);
            }
            _ => return Err(format!("{pointer}: not a map or a list")),
        }
        Ok(())
    }
}

/// One YAML document as JSON (maps sorted by key), read as `tandem inject` reads it.
pub fn to_json(text: &str) -> Result<Value, String> {
    serde_saphyr::from_str::<Node>(text)
        .map(|node| node.to_json())
        .map_err(|e| message_of(&e.to_string()))
}

/// A document that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The file (`-` for stdin).
    pub file: String,
    /// The document's position in the stream, from 1.
    pub document: usize,
    /// The line in the file, from 1.
    pub line: usize,
    /// The column, from 1 (0: unknown).
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: document {}, line {}",
            self.file, self.document, self.line
        )?;
        if self.column > 0 {
            write!(f, ", column {}", self.column)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ManifestError {}

/// What happened to one workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// `Deployment/web`.
    pub workload: String,
    /// `None`: injected.
    pub skipped: Option<Skipped>,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.skipped {
            None => write!(f, "{} injected", self.workload),
            Some(Skipped::Invalid(invalid)) => {
                write!(
                    f,
                    "{} not injected: invalid annotation {invalid}",
                    self.workload
                )
            }
            Some(reason) => write!(f, "{} not injected: {reason}", self.workload),
        }
    }
}

/// The path of the pod template in a workload of this kind (`""`: the object is a Pod).
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// Injects one object if it is a workload (or a List of them); whether it changed.
fn inject_object(object: &mut Node, config: &InjectConfig, notes: &mut Vec<Note>) -> bool {
    let kind = object
        .get("kind")
        .and_then(Node::as_str)
        .unwrap_or_default()
        .to_string();
    if kind.ends_with("List")
        && let Some(Node::Seq(items)) = object.get_mut("items")
    {
        let mut changed = false;
        for item in items {
            changed |= inject_object(item, config, notes);
        }
        return changed;
    }
    let Some(path) = template_path(&kind) else {
        return false;
    };
    let name = object
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Node::as_str)
        .unwrap_or("(no name)");
    let workload = format!("{kind}/{name}");
    let mut template = &mut *object;
    for key in path {
        match template.get_mut(key) {
            Some(next) => template = next,
            None => {
                notes.push(Note {
                    workload,
                    skipped: Some(Skipped::NotAPod(format!("no {}", path.join(".")))),
                });
                return false;
            }
        }
    }
    // Offline, the namespace is not known: its annotations play no part.
    let context = Context {
        namespace_enabled: true,
        namespace_inbound_policy: None,
        config,
    };
    match mutate::inject(&template.to_json(), context) {
        Outcome::Inject(patch) => {
            for operation in &patch.0 {
                let json_patch::PatchOperation::Add(add) = operation else {
                    unreachable!("the mutation only adds")
                };
                template
                    .add(&add.path.to_string(), Node::from_json(&add.value))
                    .expect("the mutation's patch fits the template it was made for");
            }
            notes.push(Note {
                workload,
                skipped: None,
            });
            true
        }
        Outcome::Skip(skipped) => {
            notes.push(Note {
                workload,
                skipped: Some(skipped),
            });
            false
        }
    }
}

/// A line that starts or ends a document (`---`, `...`, alone or before a space).
fn marker(line: &str) -> Option<&'static str> {
    ["---", "..."].into_iter().find(|m| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
    })
}

/// Blank, a comment, or a directive: nothing of the document's content.
fn is_trivia(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#') || line.starts_with('%')
}

/// The stream with every workload injected, and what happened to each.
pub fn inject_stream(
    text: &str,
    file: &str,
    config: &InjectConfig,
) -> Result<(String, Vec<Note>), ManifestError> {
    // Segments: each starts at a `---` line (the first may not), with its first line.
    let mut segments: Vec<(usize, String)> = vec![(1, String::new())];
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if marker(line) == Some("---") && segments.last().is_some_and(|(_, s)| !s.is_empty()) {
            segments.push((n + 1, String::new()));
        }
        segments
            .last_mut()
            .expect("one segment at least")
            .1
            .push_str(line);
    }
    let mut out = String::with_capacity(text.len() + 2048);
    let mut notes = Vec::new();
    let mut document = 0;
    for (first_line, segment) in segments {
        let content = segment
            .lines()
            .any(|l| marker(l).is_none() && !is_trivia(l))
            || segment.lines().any(|l| {
                marker(l) == Some("---") && !is_trivia(l[3..].trim_start_matches([' ', '\t']))
            });
        if !content {
            out.push_str(&segment);
            continue;
        }
        document += 1;
        let mut node: Node = serde_saphyr::from_str(&segment).map_err(|e| {
            let location = e.location();
            let relative = location.map(|l| l.line() as usize).unwrap_or(1).max(1);
            ManifestError {
                file: file.to_string(),
                document,
                line: first_line + relative - 1,
                column: location.map(|l| l.column() as usize).unwrap_or(0),
                message: message_of(&e.to_string()),
            }
        })?;
        if !inject_object(&mut node, config, &mut notes) {
            out.push_str(&segment);
            continue;
        }
        // Keep the marker and the comments above the content; write the rest anew.
        for line in segment.split_inclusive('\n') {
            if marker(line) == Some("---") && line[3..].trim().is_empty() || is_trivia(line) {
                out.push_str(line);
            } else {
                break;
            }
        }
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        let yaml = serde_saphyr::to_string(&node).map_err(|e| ManifestError {
            file: file.to_string(),
            document,
            line: first_line,
            column: 0,
            message: format!("cannot write the injected document: {e}"),
        })?;
        out.push_str(&yaml);
        if !yaml.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok((out, notes))
}

/// An error's first line, without the location the caller says its own way (the
/// parser's lines count from the document, the caller's from the file).
fn message_of(message: &str) -> String {
    let mut m = message.lines().next().unwrap_or(message).trim();
    m = m.strip_prefix("error:").unwrap_or(m).trim_start();
    if let Some(rest) = m.strip_prefix("line ")
        && let Some((location, after)) = rest.split_once(": ")
        && location
            .split(" column ")
            .all(|n| n.trim().parse::<u64>().is_ok())
    {
        m = after;
    }
    m.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::injection::VERSION;

    fn config() -> InjectConfig {
        InjectConfig {
            proxy_image: "proxy:test".into(),
            init_image: "init:test".into(),
            ..InjectConfig::default()
        }
    }

    fn run(text: &str) -> (String, Vec<Note>) {
        inject_stream(text, "in.yaml", &config()).unwrap_or_else(|e| panic!("{e}"))
    }

    const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: web:1
        ports:
        - containerPort: 8080
";

    #[test]
    fn other_documents_pass_through_byte_for_byte() {
        let text = "# a comment\n---\napiVersion: v1\nkind: ConfigMap   # trailing\nmetadata: {name: c}\ndata:\n  on: 'yes'\n  port: \"8080\"\n---\n# only a comment\n...\n";
        let (out, notes) = run(text);
        assert_eq!(out, text);
        assert!(notes.is_empty());
    }

    #[test]
    fn a_deployment_is_injected_and_keeps_its_order() {
        let text = format!(
            "# web\n---\n# the app\n{DEPLOYMENT}---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n"
        );
        let (out, notes) = run(&text);
        assert_eq!(
            notes,
            [Note {
                workload: "Deployment/web".into(),
                skipped: None
            }]
        );
        assert!(
            out.starts_with("# web\n---\n# the app\napiVersion: apps/v1\nkind: Deployment\n"),
            "{out}"
        );
        assert!(
            out.ends_with("---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n"),
            "{out}"
        );
        let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&out).unwrap();
        let template = &docs[0]["spec"]["template"];
        let inits: Vec<&str> = template["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(inits, ["tandem-init", "tandem-proxy"]);
        assert_eq!(
            template["metadata"]["annotations"]["tandem.io/injected"],
            VERSION
        );
        // Injecting the output again changes nothing.
        let (again, notes) = run(&out);
        assert_eq!(again, out);
        assert_eq!(notes[0].skipped, Some(Skipped::AlreadyInjected));
    }

    #[test]
    fn every_workload_kind_and_lists() {
        let pod_spec = "{containers: [{name: a, image: a}]}";
        let text = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\nspec: {pod_spec}\n---\n\
             apiVersion: batch/v1\nkind: CronJob\nmetadata: {{name: c}}\nspec:\n  schedule: '* * * * *'\n  jobTemplate:\n    spec:\n      template:\n        spec: {pod_spec}\n---\n\
             apiVersion: v1\nkind: List\nitems:\n- apiVersion: apps/v1\n  kind: StatefulSet\n  metadata: {{name: s}}\n  spec:\n    template:\n      spec: {pod_spec}\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: s}}\n"
        );
        let (out, notes) = run(&text);
        let names: Vec<String> = notes.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            names,
            [
                "Pod/p injected",
                "CronJob/c injected",
                "StatefulSet/s injected"
            ]
        );
        let docs: Vec<Value> = serde_saphyr::from_multiple::<Value>(&out).unwrap();
        assert_eq!(docs[0]["spec"]["initContainers"][1]["name"], "tandem-proxy");
        assert_eq!(
            docs[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][0]["name"],
            "tandem-init"
        );
        assert_eq!(docs[1]["spec"]["schedule"], "* * * * *");
        assert_eq!(
            docs[2]["items"][0]["spec"]["template"]["spec"]["initContainers"][1]["name"],
            "tandem-proxy"
        );
        assert_eq!(docs[2]["items"][1]["kind"], "Service");
    }

    #[test]
    fn strings_that_look_like_numbers_stay_strings() {
        let text = DEPLOYMENT.replace(
            "      labels:\n",
            "      annotations:\n        version: \"1.10\"\n        flag: 'on'\n        octal: '0755'\n      labels:\n",
        );
        let (out, _) = run(&text);
        let doc: Value = serde_saphyr::from_str(&out).unwrap();
        let a = &doc["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(
            (a["version"].clone(), a["flag"].clone(), a["octal"].clone()),
            (Value::from("1.10"), Value::from("on"), Value::from("0755"))
        );
        assert_eq!(
            doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"],
            8080
        );
    }

    #[test]
    fn opted_out_and_invalid_workloads_are_written_as_they_were() {
        let opted = DEPLOYMENT.replace(
            "      labels:\n",
            "      annotations: {tandem.io/inject: disabled}\n      labels:\n",
        );
        let bad = DEPLOYMENT.replace(
            "      labels:\n",
            "      annotations: {tandem.io/skip-inbound-ports: abc}\n      labels:\n",
        );
        let text = format!("{opted}---\n{bad}");
        let (out, notes) = run(&text);
        assert_eq!(out, text);
        assert_eq!(notes[0].skipped, Some(Skipped::OptedOut));
        assert!(
            notes[1]
                .to_string()
                .contains("tandem.io/skip-inbound-ports: \"abc\""),
            "{}",
            notes[1]
        );
    }

    #[test]
    fn invalid_yaml_names_the_document_and_the_line() {
        let text = format!(
            "{DEPLOYMENT}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n"
        );
        let e = inject_stream(&text, "bad.yaml", &config()).unwrap_err();
        assert_eq!(e.file, "bad.yaml");
        assert_eq!(e.document, 2);
        let lines = DEPLOYMENT.lines().count();
        assert!(
            (lines + 4..=lines + 6).contains(&e.line),
            "line {} for a document starting at {}: {e}",
            e.line,
            lines + 1
        );
        assert!(
            e.to_string().starts_with("bad.yaml: document 2, line "),
            "{e}"
        );
        assert!(!e.message.contains("line"), "{e}");
    }
}
