//! The file source: services and their endpoints from a YAML file that is watched
//! for edits. A malformed edit is rejected with its line and reason, and the last
//! good version keeps being served.
//!
//! ```yaml
//! services:
//!   - name: web
//!     namespace: default            # default: default
//!     port: 80
//!     cluster_ip: 10.96.0.10        # optional: proxies may also ask for 10.96.0.10:80
//!     callers: {zone-a: 40, zone-b: 40, zone-c: 20}   # or `counted`: from the proxies that watch it
//!     endpoints:
//!       - {address: "127.0.0.1:9001", weight: 1, region: region-1, zone: zone-a, health: healthy}
//! nodes:                            # optional: where proxies run (their --node)
//!   - {name: node-a, region: region-1, zone: zone-a}
//! ```

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use serde_saphyr::Spanned;
use tokio::sync::mpsc;

use crate::index::{NodeMap, ServiceIndex};
use crate::metrics::{KindLabel, Metrics, ResultLabel};
use crate::model::{
    Endpoint, Health, HealthCheck, Locality, Policy, Protocol, ServiceKey, ServiceSpec,
    is_dns_label,
};

/// A rejected file: where and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{message}", location(*line, *column))]
pub struct FileError {
    pub line: Option<u32>,
    pub column: Option<u32>,
    pub message: String,
}

fn location(line: Option<u32>, column: Option<u32>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        (Some(l), None) => format!("line {l}: "),
        _ => String::new(),
    }
}

impl FileError {
    fn at(line: u32, message: impl Into<String>) -> Self {
        Self {
            line: Some(line),
            column: None,
            message: message.into(),
        }
    }
}

/// The parsed content of a file: what the index should hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileContent {
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
    pub nodes: NodeMap,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    #[serde(default)]
    services: Vec<Spanned<ServiceEntry>>,
    #[serde(default)]
    nodes: Vec<Spanned<NodeEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    port: u16,
    #[serde(default)]
    cluster_ip: Option<IpAddr>,
    /// Protocol hint for every endpoint that does not name its own.
    #[serde(default)]
    protocol: Option<ProtocolName>,
    #[serde(default)]
    callers: CallersEntry,
    /// Time allowed from request to response headers, e.g. `2s`.
    #[serde(default, deserialize_with = "optional_duration")]
    timeout: Option<Duration>,
    #[serde(default)]
    health_check: Option<HealthCheckEntry>,
    #[serde(default)]
    endpoints: Vec<Spanned<EndpointEntry>>,
}

/// `callers:` is either each zone's share, or `counted` (from the proxies that watch
/// the service, by their nodes' zones).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum CallersEntry {
    Shares(BTreeMap<String, f64>),
    Keyword(String),
}

impl Default for CallersEntry {
    fn default() -> Self {
        Self::Shares(BTreeMap::new())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthCheckEntry {
    path: String,
    #[serde(default = "default_check_interval", deserialize_with = "duration")]
    interval: Duration,
    #[serde(default = "default_check_timeout", deserialize_with = "duration")]
    timeout: Duration,
    #[serde(default = "default_threshold")]
    unhealthy_threshold: u32,
    #[serde(default = "default_threshold")]
    healthy_threshold: u32,
}

fn default_check_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_threshold() -> u32 {
    2
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    tandem_common::duration::parse(&text).map_err(serde::de::Error::custom)
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointEntry {
    address: SocketAddr,
    #[serde(default = "default_weight")]
    weight: u32,
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
    #[serde(default)]
    health: HealthName,
    #[serde(default)]
    protocol: Option<ProtocolName>,
    #[serde(default)]
    identity: String,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: String,
    #[serde(default)]
    region: String,
    #[serde(default)]
    zone: String,
    #[serde(default)]
    subzone: String,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum HealthName {
    #[default]
    Healthy,
    Draining,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ProtocolName {
    Http1,
    Http2,
    Opaque,
}

fn default_namespace() -> String {
    "default".to_string()
}

fn default_weight() -> u32 {
    1
}

impl From<HealthName> for Health {
    fn from(h: HealthName) -> Self {
        match h {
            HealthName::Healthy => Health::Healthy,
            HealthName::Draining => Health::Draining,
            HealthName::Unhealthy => Health::Unhealthy,
        }
    }
}

impl From<ProtocolName> for Protocol {
    fn from(p: ProtocolName) -> Self {
        match p {
            ProtocolName::Http1 => Protocol::Http1,
            ProtocolName::Http2 => Protocol::Http2,
            ProtocolName::Opaque => Protocol::Opaque,
        }
    }
}

/// Parses and validates a whole file.
pub fn parse(text: &str) -> Result<FileContent, FileError> {
    let doc: FileDoc = if text.trim().is_empty() {
        FileDoc {
            services: Vec::new(),
            nodes: Vec::new(),
        }
    } else {
        let budget = budget(text.len());
        let mut options = serde_saphyr::Options::default();
        options.budget = Some(budget.clone());
        serde_saphyr::from_str_with_options(text, options).map_err(|e| FileError {
            line: e.location().map(|l| l.line() as u32),
            column: e.location().map(|l| l.column() as u32),
            message: match breach(&e) {
                Some(breach) => budget_message(breach, &budget),
                None => reason(&e.to_string()),
            },
        })?
    };

    let mut content = FileContent::default();
    let mut service_lines: HashMap<ServiceKey, u32> = HashMap::new();
    for spanned in doc.services {
        let line = spanned.referenced.line() as u32;
        let service = spanned.value;
        for (what, value) in [("name", &service.name), ("namespace", &service.namespace)] {
            if !is_dns_label(value) {
                return Err(FileError::at(
                    line,
                    format!(
                        "service {what} {value:?} is not a DNS label (lowercase letters, digits and '-')"
                    ),
                ));
            }
        }
        if service.port == 0 {
            return Err(FileError::at(
                line,
                format!("service {}: port must not be 0", service.name),
            ));
        }
        let key = ServiceKey::new(&service.namespace, &service.name, service.port);
        if let Some(first) = service_lines.insert(key.clone(), line) {
            return Err(FileError::at(
                line,
                format!("service {key} is listed twice (first on line {first})"),
            ));
        }
        let (callers, count_callers) = match service.callers {
            CallersEntry::Shares(shares) => (shares, false),
            CallersEntry::Keyword(k) if k == "counted" => (BTreeMap::new(), true),
            CallersEntry::Keyword(k) => {
                return Err(FileError::at(
                    line,
                    format!(
                        "service {key}: callers must be a map of zone to share or `counted`, got {k:?}"
                    ),
                ));
            }
        };
        for (zone, share) in &callers {
            if !share.is_finite() || *share < 0.0 {
                return Err(FileError::at(
                    line,
                    format!(
                        "service {key}: callers share for {zone:?} must be a number >= 0, got {share}"
                    ),
                ));
            }
        }

        if let Some(check) = &service.health_check
            && (!check.path.starts_with('/')
                || check.unhealthy_threshold == 0
                || check.healthy_threshold == 0)
        {
            return Err(FileError::at(
                line,
                format!(
                    "service {key}: health_check needs a path starting with / and thresholds of at least 1"
                ),
            ));
        }
        let mut spec = ServiceSpec {
            callers,
            cluster_ips: service.cluster_ip.into_iter().collect(),
            policy: Policy {
                request_timeout: service.timeout,
                count_callers,
                health_check: service.health_check.map(|h| HealthCheck {
                    path: h.path,
                    interval: h.interval,
                    timeout: h.timeout,
                    unhealthy_threshold: h.unhealthy_threshold,
                    healthy_threshold: h.healthy_threshold,
                }),
            },
            ..Default::default()
        };
        for spanned in service.endpoints {
            let line = spanned.referenced.line() as u32;
            let e = spanned.value;
            if e.weight == 0 {
                return Err(FileError::at(
                    line,
                    format!(
                        "endpoint {} of {key}: weight must be at least 1 (remove the endpoint or mark it unhealthy instead)",
                        e.address
                    ),
                ));
            }
            if e.address.port() == 0 {
                return Err(FileError::at(
                    line,
                    format!("endpoint {} of {key}: port must not be 0", e.address),
                ));
            }
            let endpoint = Endpoint {
                address: e.address,
                weight: e.weight,
                locality: Locality {
                    region: e.region,
                    zone: e.zone,
                    subzone: e.subzone,
                },
                health: e.health.into(),
                identity: e.identity,
                protocol: e
                    .protocol
                    .or(service.protocol)
                    .map(Into::into)
                    .unwrap_or_default(),
                name: e.name,
            };
            if spec
                .endpoints
                .insert(e.address, Arc::new(endpoint))
                .is_some()
            {
                return Err(FileError::at(
                    line,
                    format!("endpoint {} is listed twice in {key}", e.address),
                ));
            }
        }
        content.services.insert(key, spec);
    }

    for spanned in doc.nodes {
        let line = spanned.referenced.line() as u32;
        let node = spanned.value;
        if node.name.is_empty() {
            return Err(FileError::at(line, "node name must not be empty"));
        }
        let locality = Locality {
            region: node.region,
            zone: node.zone,
            subzone: node.subzone,
        };
        if content.nodes.insert(node.name.clone(), locality).is_some() {
            return Err(FileError::at(
                line,
                format!("node {} is listed twice", node.name),
            ));
        }
    }
    Ok(content)
}

/// The parser's limits (serde-saphyr's budget), scaled to the file.
///
/// Its defaults (250,000 nodes, a million events) guard against a small file that
/// expands into a huge one through aliases, but they also stop a plain file at
/// about 50,000 endpoints (five nodes each). Here the counts a plain file makes
/// grow with its size: a node takes at least half a byte of text and makes at most
/// two events, so no file reaches them by being long, only by repeating anchors
/// (replayed events count), and parsing stays linear in the file's size either way.
fn budget(len: usize) -> serde_saphyr::Budget {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = budget.max_nodes.max(2 * len);
    budget.max_events = budget.max_events.max(4 * len + 1024);
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(len);
    budget
}

/// The parser limit an error reports reaching, if it is one.
fn breach(mut error: &serde_saphyr::Error) -> Option<&serde_saphyr::budget::BudgetBreach> {
    loop {
        match error {
            serde_saphyr::Error::Budget { breach, .. } => return Some(breach),
            serde_saphyr::Error::WithSnippet { error: inner, .. }
            | serde_saphyr::Error::AliasError { error: inner, .. } => error = inner,
            _ => return None,
        }
    }
}

/// Which of the parser's limits the file reached, and how to get past it: instead
/// of serde-saphyr's `budget breached: Nodes { nodes: 250001 }`.
fn budget_message(
    breach: &serde_saphyr::budget::BudgetBreach,
    budget: &serde_saphyr::Budget,
) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    const GROWS: &str = "it grows with the file's size, so only aliases (*name) repeating \
        an anchor reach it: write the repeated parts out instead";
    const WRITE_OUT: &str = "write the repeated values out instead of referring to anchors";
    match breach {
        B::Nodes { .. } => format!(
            "the file expands to more than {} YAML values, the parser's limit (max_nodes); {GROWS}",
            budget.max_nodes
        ),
        B::Events { .. } => format!(
            "the file expands to more than {} YAML events, the parser's limit (max_events); {GROWS}",
            budget.max_events
        ),
        B::ScalarBytes { .. } => format!(
            "the file's values expand to more than {} bytes, the parser's limit (max_total_scalar_bytes); {GROWS}",
            budget.max_total_scalar_bytes
        ),
        B::Aliases { .. } => format!(
            "more than {} aliases (*name), the parser's limit (max_aliases); {WRITE_OUT}",
            budget.max_aliases
        ),
        B::Anchors { .. } => format!(
            "more than {} anchors (&name), the parser's limit (max_anchors); {WRITE_OUT}",
            budget.max_anchors
        ),
        B::AliasAnchorRatio { aliases, anchors } => format!(
            "{aliases} aliases (*name) of {anchors} anchor(s) (&name): the parser allows at most {} \
             aliases per anchor (alias_anchor_ratio_multiplier) once there are {} aliases; {WRITE_OUT}",
            budget.alias_anchor_ratio_multiplier, budget.alias_anchor_min_aliases
        ),
        B::MergeKeys { .. } => format!(
            "more than {} merge keys (<<), the parser's limit (max_merge_keys); {WRITE_OUT}",
            budget.max_merge_keys
        ),
        B::Depth { .. } => format!(
            "the YAML nests deeper than {} levels, the parser's limit (max_depth); a services \
             file needs five",
            budget.max_depth
        ),
        B::Documents { .. } => format!(
            "more than {} YAML documents (---), the parser's limit (max_documents); a services \
             file is one document",
            budget.max_documents
        ),
        other => format!("the file reaches a limit of the YAML parser: {other:?}"),
    }
}

/// serde-saphyr renders `error: line L column C: reason` and a code snippet; we keep
/// the reason only, since the location is carried (and printed) separately.
fn reason(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    match first
        .strip_prefix("line ")
        .and_then(|rest| rest.split_once(": "))
    {
        Some((_, reason)) => reason.to_string(),
        None => first.to_string(),
    }
}

fn read(path: &Path) -> Result<String, FileError> {
    std::fs::read_to_string(path).map_err(|e| FileError {
        line: None,
        column: None,
        message: format!("cannot read {}: {e}", path.display()),
    })
}

/// What a poll compares to notice an edit that the watcher missed.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks: a ConfigMap's `..data` swap changes the target's inode.
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
    })
}

pub struct FileSource {
    path: PathBuf,
    index: Arc<ServiceIndex>,
    metrics: Arc<Metrics>,
    last_good: Option<FileContent>,
    /// The text last parsed, good or not (none after a failed read).
    last_text: Option<String>,
    /// The last edit was rejected (or the file could not be read): the alarm is up.
    failing: bool,
}

impl FileSource {
    /// Loads the file once; a file that cannot be used at start-up is an error (there is
    /// no last good state to fall back to).
    pub fn start(
        path: PathBuf,
        index: Arc<ServiceIndex>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, FileError> {
        let text = read(&path)?;
        let content = parse(&text)?;
        let mut source = Self {
            path,
            index,
            metrics,
            last_good: None,
            last_text: Some(text),
            failing: false,
        };
        source.apply(content);
        source.index.mark_synced();
        Ok(source)
    }

    /// A good file: the index takes it unless it is what the index has (a bad edit
    /// undone, say), and either way the source is healthy.
    fn apply(&mut self, content: FileContent) {
        if self.last_good.as_ref() != Some(&content) {
            let changed_at = Instant::now();
            self.index.set_nodes(content.nodes.clone());
            let changes = self.index.replace_all(content.services.clone(), changed_at);
            tracing::info!(
                file = %self.path.display(),
                services = content.services.len(),
                changed = changes,
                "file loaded"
            );
            self.last_good = Some(content);
        }
        if std::mem::take(&mut self.failing) {
            tracing::info!(file = %self.path.display(), "the file is good again: source healthy again");
        }
        self.metrics.source_up.set(1);
        self.metrics
            .source_reloads
            .get_or_create(&ResultLabel { result: "ok" })
            .inc();
    }

    fn reload(&mut self) {
        let text = match read(&self.path) {
            Ok(text) => text,
            Err(error) => {
                // Whatever comes back next is read afresh, even the bytes last seen.
                self.last_text = None;
                return self.rejected(error);
            }
        };
        // Several events for one save, or a touch: the same bytes need no second look
        // (and a rejected edit is reported once, not once per event).
        if self.last_text.as_deref() == Some(text.as_str()) {
            return;
        }
        let result = parse(&text);
        self.last_text = Some(text);
        match result {
            Ok(content) => self.apply(content),
            Err(error) => self.rejected(error),
        }
    }

    fn rejected(&mut self, error: FileError) {
        self.failing = true;
        self.metrics.source_up.set(0);
        self.metrics
            .source_reloads
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
        self.metrics
            .source_errors
            .get_or_create(&KindLabel { kind: "file" })
            .inc();
        tracing::error!(
            file = %self.path.display(),
            line = error.line,
            reason = %error.message,
            "rejected an edit of the file: {error}; still serving the last good version"
        );
    }

    /// Watches the file and applies every edit until the task is dropped.
    pub async fn watch(mut self) {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let _watcher = self.start_watcher(tx);
        let mut last_stamp = stamp(&self.path);
        // An edit between `start`'s read and the watcher's start raised no event.
        self.reload();
        let mut poll = tokio::time::interval(Duration::from_secs(1));
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = rx.recv() => {
                    if event.is_none() {
                        // The watcher is gone; the poll below still notices edits.
                        std::future::pending::<()>().await;
                    }
                    // An editor's save is several events (truncate, write, rename):
                    // settle briefly and read once.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = poll.tick() => {
                    let now = stamp(&self.path);
                    if now == last_stamp {
                        continue;
                    }
                }
            }
            last_stamp = stamp(&self.path);
            self.reload();
        }
    }

    /// Watches the file's directory, not the file: editors and ConfigMap updates replace
    /// the file by renaming, which a watch on the file itself would lose.
    fn start_watcher(&self, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
        use notify::{RecursiveMode, Watcher};
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let file_name = self.path.file_name().map(|n| n.to_os_string());
        let handler = move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            // Our own reads of the file raise access events; only changes matter.
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let relevant = event.paths.iter().any(|p| {
                let name = p.file_name();
                name == file_name.as_deref() || name.is_some_and(|n| n == "..data")
            });
            if relevant {
                let _ = tx.send(());
            }
        };
        match notify::recommended_watcher(handler)
            .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w))
        {
            Ok(watcher) => Some(watcher),
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "cannot watch the file's directory; polling it every second instead");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - name: web
    namespace: default
    port: 80
    callers: {zone-a: 40, zone-b: 40, zone-c: 20}
    endpoints:
      - {address: "127.0.0.1:9001", weight: 1, region: region-1, zone: zone-a, health: healthy}
      - {address: "127.0.0.1:9002", weight: 3, region: region-1, zone: zone-b, health: draining}
  - name: api
    port: 8080
    cluster_ip: 10.96.0.7
    protocol: http2
    timeout: 2s
    health_check: {path: /healthz, interval: 3s}
    endpoints:
      - address: "[::1]:9003"
nodes:
  - {name: node-a, region: region-1, zone: zone-a}
"#;

    #[test]
    fn parses_the_documented_format() {
        let content = parse(GOOD).unwrap();
        let web = &content.services[&ServiceKey::new("default", "web", 80)];
        assert_eq!(web.endpoints.len(), 2);
        let second = &web.endpoints[&"127.0.0.1:9002".parse::<SocketAddr>().unwrap()];
        assert_eq!(second.weight, 3);
        assert_eq!(second.health, Health::Draining);
        assert_eq!(second.locality.zone, "zone-b");
        assert_eq!(web.callers["zone-c"], 20.0);
        let api = &content.services[&ServiceKey::new("default", "api", 8080)];
        let ep = api.endpoints.values().next().unwrap();
        assert_eq!(ep.weight, 1, "weight defaults to 1");
        assert_eq!(ep.health, Health::Healthy, "health defaults to healthy");
        assert_eq!(
            ep.protocol,
            Protocol::Http2,
            "service protocol applies to endpoints"
        );
        assert_eq!(
            api.cluster_ips,
            vec!["10.96.0.7".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(content.nodes["node-a"].zone, "zone-a");
    }

    #[test]
    fn empty_file_is_no_services() {
        assert_eq!(parse("").unwrap(), FileContent::default());
        assert_eq!(parse("services: []").unwrap(), FileContent::default());
    }

    fn error_of(text: &str) -> FileError {
        parse(text).expect_err("must be rejected")
    }

    #[test]
    fn callers_may_be_counted_instead_of_given() {
        let counted = parse("services:\n  - {name: web, port: 80, callers: counted}\n").unwrap();
        let web = &counted.services[&ServiceKey::new("default", "web", 80)];
        assert!(web.policy.count_callers && web.callers.is_empty());
        let e = error_of("services:\n  - name: web\n    port: 80\n    callers: lots\n");
        assert_eq!(e.line, Some(2));
        assert!(e.message.contains("`counted`"), "{e}");
    }

    #[test]
    fn errors_name_the_line_and_reason() {
        let e = error_of(
            "services:\n  - name: web\n    port: 80\n    endpoints:\n      - {address: \"127.0.0.1:abc\"}\n",
        );
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.to_lowercase().contains("address"), "{e}");

        let e = error_of(
            "services:\n  - name: web\n    port: 80\n    endpoints:\n      - {address: \"127.0.0.1:1\", health: sick}\n",
        );
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("sick"), "{e}");

        let e = error_of(
            "services:\n  - name: web\n    port: 80\n    endpoints:\n      - {address: \"127.0.0.1:1\"}\n      - {address: \"127.0.0.1:1\"}\n",
        );
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("twice"), "{e}");

        let e = error_of(
            "services:\n  - name: web\n    port: 80\n    endpoints:\n      - {address: \"127.0.0.1:1\", weight: 0}\n",
        );
        assert_eq!(e.line, Some(5));
        assert!(e.message.contains("weight"));

        let e = error_of("services:\n  - name: Web\n    port: 80\n");
        assert_eq!(e.line, Some(2));

        let e = error_of("services:\n  - name: web\n    prot: 80\n");
        assert!(e.line.is_some(), "{e}");
        assert!(e.message.contains("prot"), "{e}");

        let e = error_of("services:\n  - name: web\n    port: 80\n  - name: web\n    port: 80\n");
        assert_eq!(e.line, Some(4));

        let e = error_of("services:\n  - name: web\n    port: 80\n    timeout: soon\n");
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("soon"), "{e}");

        let e = error_of("services: [\n");
        assert!(e.line.is_some(), "{e}");
    }

    /// A services file with one service of `n` endpoints, one a line.
    fn many_endpoints(n: u32) -> String {
        let mut text = String::from("services:\n  - name: web\n    port: 80\n    endpoints:\n");
        for i in 0..n {
            let [_, a, b, c] = i.to_be_bytes();
            text.push_str(&format!(
                "      - {{address: \"10.{a}.{b}.{c}:8080\", weight: 1, zone: zone-a}}\n"
            ));
        }
        text
    }

    #[test]
    fn a_file_of_100000_endpoints_is_taken() {
        let content = parse(&many_endpoints(100_000)).expect("100,000 endpoints");
        let web = &content.services[&ServiceKey::new("default", "web", 80)];
        assert_eq!(web.endpoints.len(), 100_000);
    }

    #[test]
    fn a_parser_limit_still_reached_is_named_with_the_way_past_it() {
        // One anchor referred to 200 times: the parser refuses that many aliases
        // per anchor, whatever the file's size.
        let mut text = String::from(
            "services:\n  - name: web\n    port: 80\n    endpoints:\n      - &e {address: \"10.0.0.1:80\"}\n",
        );
        for _ in 0..200 {
            text.push_str("      - *e\n");
        }
        let e = error_of(&text);
        assert!(e.line.is_some(), "{e}");
        assert!(!e.message.contains("budget breached"), "{e}");
        assert!(e.message.contains("aliases"), "{e}");
        assert!(e.message.contains("write"), "says what to do: {e}");

        // Nesting beyond the parser's depth limit.
        let deep = format!(
            "services:\n  - name: web\n    port: 80\n    callers: {}{}\n",
            "[".repeat(100),
            "]".repeat(100)
        );
        let e = error_of(&deep);
        assert!(e.message.contains("deeper than 64"), "{e}");
    }

    /// A source on a file in a fresh directory, with its metrics.
    fn source_on(text: &str) -> (FileSource, Arc<Metrics>, PathBuf) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tandem-file-source-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        std::fs::write(&path, text).unwrap();
        let metrics = Arc::new(Metrics::default());
        let index = Arc::new(ServiceIndex::new("cluster.local", metrics.clone()));
        let source = FileSource::start(path.clone(), index, metrics.clone()).unwrap();
        (source, metrics, path)
    }

    #[test]
    fn restoring_the_last_good_bytes_clears_the_alarm() {
        let (mut source, metrics, path) = source_on(GOOD);
        assert_eq!(metrics.source_up.get(), 1);
        std::fs::write(&path, "services: [\n").unwrap();
        source.reload();
        assert_eq!(metrics.source_up.get(), 0, "a bad edit raises the alarm");
        std::fs::write(&path, GOOD).unwrap();
        source.reload();
        assert_eq!(metrics.source_up.get(), 1, "the last good file is back");

        // The same after a file that could not be read at all.
        std::fs::remove_file(&path).unwrap();
        source.reload();
        assert_eq!(
            metrics.source_up.get(),
            0,
            "a missing file raises the alarm"
        );
        std::fs::write(&path, GOOD).unwrap();
        source.reload();
        assert_eq!(metrics.source_up.get(), 1, "the file is back");

        // A bad edit seen twice is still bad.
        std::fs::write(&path, "services: [\n").unwrap();
        source.reload();
        source.reload();
        assert_eq!(metrics.source_up.get(), 0);
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn error_display_starts_with_the_line() {
        let e = FileError::at(7, "bad");
        assert_eq!(e.to_string(), "line 7: bad");
        let e = error_of(
            "services:\n  - name: web\n    port: 80\n    endpoints:\n      - {address: \"127.0.0.1:abc\"}\n",
        );
        assert_eq!(
            e.to_string(),
            "line 5, column 19: invalid socket address syntax"
        );
    }
}
