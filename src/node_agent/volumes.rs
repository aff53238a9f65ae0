//! The volumes of a pod the agent runs, materialised under the pod's state dir
//! (`<state>/pods/<ns>/<pod>/volumes/<name>`) and bind-mounted by each container's
//! process inside its own mount namespace: emptyDir, configMap, secret, downwardAPI,
//! hostPath, and projected (serviceAccountToken from the TokenRequest API, bound to the
//! pod and refreshed at 80% of its lifetime; configMap, secret, downwardAPI sources).
//! ConfigMap and Secret contents are read once, when the pod starts.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccountTokenProjection, Volume,
};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use super::runner::AbortOnDrop;

/// Why a volume could not be made: `Retry` (an object is missing, the API failed:
/// the kubelet keeps trying too) or `Fatal` (the agent cannot do it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeError {
    Retry(String),
    Fatal(String),
}

impl std::fmt::Display for VolumeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Retry(m) | Self::Fatal(m) => f.write_str(m),
        }
    }
}

/// What `fieldRef`s read: the pod and where it runs.
#[derive(Debug, Clone)]
pub struct PodFacts {
    pub pod: Pod,
    pub pod_ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub node: String,
}

impl PodFacts {
    /// The value of a `fieldRef.fieldPath`.
    pub fn field(&self, path: &str) -> Result<String, String> {
        let meta = &self.pod.metadata;
        let spec = self.pod.spec.as_ref();
        let map_key = |prefix: &str| {
            path.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix("['").or_else(|| r.strip_prefix("[\"")))
                .and_then(|r| r.strip_suffix("']").or_else(|| r.strip_suffix("\"]")))
                .map(str::to_string)
        };
        Ok(match path {
            "metadata.name" => meta.name.clone().unwrap_or_default(),
            "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
            "metadata.uid" => meta.uid.clone().unwrap_or_default(),
            "spec.nodeName" => self.node.clone(),
            "spec.serviceAccountName" => spec
                .and_then(|s| s.service_account_name.clone())
                .unwrap_or_else(|| "default".into()),
            "status.podIP" | "status.podIPs" => self.pod_ip.to_string(),
            "status.hostIP" | "status.hostIPs" => self.host_ip.to_string(),
            "metadata.labels" | "metadata.annotations" => {
                let map = if path == "metadata.labels" {
                    &meta.labels
                } else {
                    &meta.annotations
                };
                map.iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={v:?}\n"))
                    .collect()
            }
            _ => {
                if let Some(k) = map_key("metadata.labels") {
                    meta.labels
                        .as_ref()
                        .and_then(|l| l.get(&k))
                        .cloned()
                        .unwrap_or_default()
                } else if let Some(k) = map_key("metadata.annotations") {
                    meta.annotations
                        .as_ref()
                        .and_then(|l| l.get(&k))
                        .cloned()
                        .unwrap_or_default()
                } else {
                    return Err(format!(
                        "fieldRef {path:?} is not supported by the node agent (metadata.name, metadata.namespace, metadata.uid, metadata.labels['k'], metadata.annotations['k'], spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP are)"
                    ));
                }
            }
        })
    }
}

/// The materialised volumes of one pod; token refreshers stop when it is dropped.
#[derive(Debug, Default)]
pub struct Volumes {
    pub dirs: HashMap<String, PathBuf>,
    _refreshers: Vec<AbortOnDrop>,
}

/// A relative path inside a volume, refusing `..` and absolute paths.
fn inside(base: &Path, rel: &str) -> Result<PathBuf, String> {
    let p = Path::new(rel);
    if rel.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("path {rel:?} must be relative, without '..'"));
    }
    Ok(base.join(p))
}

fn write_file(path: &Path, data: &[u8], mode: i32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    // Written aside and renamed over: a process reading the file never sees half of it.
    let tmp = path.with_file_name(format!(
        ".tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::write(&tmp, data).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::set_permissions(
        &tmp,
        std::fs::Permissions::from_mode((mode & 0o7777) as u32),
    )
    .map_err(|e| format!("cannot chmod {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes `files` (key → bytes) into `dir`, by `items` if given.
fn write_keys(
    dir: &Path,
    what: &str,
    files: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: i32,
) -> Result<(), VolumeError> {
    let fatal = VolumeError::Fatal;
    match items {
        Some(items) => {
            for item in items {
                let data = files.get(&item.key).ok_or_else(|| {
                    VolumeError::Retry(format!("{what} has no key {:?}", item.key))
                })?;
                let path = inside(dir, &item.path).map_err(fatal)?;
                write_file(&path, data, item.mode.unwrap_or(default_mode)).map_err(fatal)?;
            }
        }
        None => {
            for (key, data) in files {
                let path = inside(dir, key).map_err(fatal)?;
                write_file(&path, data, default_mode).map_err(fatal)?;
            }
        }
    }
    Ok(())
}

fn api_error(what: &str, e: kube::Error) -> VolumeError {
    VolumeError::Retry(format!("{what}: {e}"))
}

async fn config_map_files(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    let what = format!("ConfigMap {ns}/{name}");
    match Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| api_error(&what, e))?
    {
        Some(cm) => {
            let mut files: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            files.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            Ok(Some(files))
        }
        None if optional => Ok(None),
        None => Err(VolumeError::Retry(format!("{what} does not exist (yet)"))),
    }
}

async fn secret_files(
    client: &Client,
    ns: &str,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, VolumeError> {
    let what = format!("Secret {ns}/{name}");
    match Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| api_error(&what, e))?
    {
        Some(secret) => {
            let mut files: BTreeMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            files.extend(
                secret
                    .string_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
            Ok(Some(files))
        }
        None if optional => Ok(None),
        None => Err(VolumeError::Retry(format!("{what} does not exist (yet)"))),
    }
}

fn downward_files(
    facts: &PodFacts,
    dir: &Path,
    items: &[DownwardAPIVolumeFile],
    default_mode: i32,
) -> Result<(), VolumeError> {
    for item in items {
        let field = item.field_ref.as_ref().ok_or_else(|| {
            VolumeError::Fatal(format!(
                "downwardAPI item {:?}: only fieldRef is supported by the node agent",
                item.path
            ))
        })?;
        let value = facts.field(&field.field_path).map_err(VolumeError::Fatal)?;
        let path = inside(dir, &item.path).map_err(VolumeError::Fatal)?;
        write_file(&path, value.as_bytes(), item.mode.unwrap_or(default_mode))
            .map_err(VolumeError::Fatal)?;
    }
    Ok(())
}

/// A token for the pod's service account, bound to the pod: `(token, lifetime)`.
async fn request_token(
    client: &Client,
    facts: &PodFacts,
    projection: &ServiceAccountTokenProjection,
) -> Result<(String, Duration), VolumeError> {
    let meta = &facts.pod.metadata;
    let ns = meta.namespace.as_deref().unwrap_or("default");
    let sa = facts
        .pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let expiration = projection.expiration_seconds.unwrap_or(3600);
    let audiences: Vec<&str> = projection
        .audience
        .as_deref()
        .filter(|a| !a.is_empty())
        .into_iter()
        .collect();
    let request = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": audiences,
            "expirationSeconds": expiration,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta.name,
                "uid": meta.uid,
            },
        },
    });
    let what = format!("a token for ServiceAccount {ns}/{sa}");
    let answer: serde_json::Value =
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns)
            .create_subresource("token", &sa, &PostParams::default(), &request)
            .await
            .map_err(|e| api_error(&what, e))?;
    let token = answer["status"]["token"]
        .as_str()
        .ok_or_else(|| VolumeError::Retry(format!("{what}: the answer has no token")))?
        .to_string();
    let lifetime = answer["status"]["expirationTimestamp"]
        .as_str()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map(|t| {
            let secs = t.as_second() - k8s_openapi::jiff::Timestamp::now().as_second();
            Duration::from_secs(secs.max(1) as u64)
        })
        .unwrap_or(Duration::from_secs(expiration.max(1) as u64));
    Ok((token, lifetime))
}

/// When to ask for a new token: at 80% of its lifetime, at least every 24 hours.
fn refresh_after(lifetime: Duration) -> Duration {
    (lifetime * 4 / 5).min(Duration::from_secs(24 * 3600))
}

/// Materialises every volume a container of `pod` mounts.
pub async fn materialise(
    client: &Client,
    facts: &PodFacts,
    pod_dir: &Path,
) -> Result<Volumes, VolumeError> {
    let spec = facts.pod.spec.as_ref();
    let ns = facts.pod.metadata.namespace.as_deref().unwrap_or("default");
    let mounted: std::collections::HashSet<&str> = spec
        .into_iter()
        .flat_map(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(s.containers.iter())
        })
        .flat_map(|c| c.volume_mounts.iter().flatten())
        .map(|m| m.name.as_str())
        .collect();
    let base = pod_dir.join("volumes");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base)
        .map_err(|e| VolumeError::Fatal(format!("cannot create {}: {e}", base.display())))?;
    let mut volumes = Volumes::default();
    let all: Vec<&Volume> = spec
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .collect();
    for name in &mounted {
        if !all.iter().any(|v| v.name == *name) {
            return Err(VolumeError::Fatal(format!(
                "a container mounts volume {name:?}, which the pod does not have"
            )));
        }
    }
    for volume in all
        .into_iter()
        .filter(|v| mounted.contains(v.name.as_str()))
    {
        let dir = inside(&base, &volume.name).map_err(VolumeError::Fatal)?;
        let path = materialise_one(client, facts, ns, volume, &dir, &mut volumes)
            .await
            .map_err(|e| match e {
                VolumeError::Retry(m) => {
                    VolumeError::Retry(format!("volume {:?}: {m}", volume.name))
                }
                VolumeError::Fatal(m) => {
                    VolumeError::Fatal(format!("volume {:?}: {m}", volume.name))
                }
            })?;
        volumes.dirs.insert(volume.name.clone(), path);
    }
    Ok(volumes)
}

async fn materialise_one(
    client: &Client,
    facts: &PodFacts,
    ns: &str,
    volume: &Volume,
    dir: &Path,
    volumes: &mut Volumes,
) -> Result<PathBuf, VolumeError> {
    use std::os::unix::fs::PermissionsExt;
    let fatal = VolumeError::Fatal;
    let mkdir = |mode: u32| -> Result<(), VolumeError> {
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| VolumeError::Fatal(format!("cannot create {}: {e}", dir.display())))
    };
    if volume.empty_dir.is_some() {
        mkdir(0o777)?;
    } else if let Some(cm) = &volume.config_map {
        mkdir(0o755)?;
        let optional = cm.optional.unwrap_or(false);
        if let Some(files) = config_map_files(client, ns, &cm.name, optional).await? {
            let what = format!("ConfigMap {ns}/{}", cm.name);
            write_keys(
                dir,
                &what,
                &files,
                cm.items.as_ref(),
                cm.default_mode.unwrap_or(0o644),
            )?;
        }
    } else if let Some(secret) = &volume.secret {
        mkdir(0o755)?;
        let name = secret.secret_name.clone().unwrap_or_default();
        let optional = secret.optional.unwrap_or(false);
        if let Some(files) = secret_files(client, ns, &name, optional).await? {
            let what = format!("Secret {ns}/{name}");
            write_keys(
                dir,
                &what,
                &files,
                secret.items.as_ref(),
                secret.default_mode.unwrap_or(0o644),
            )?;
        }
    } else if let Some(downward) = &volume.downward_api {
        mkdir(0o755)?;
        downward_files(
            facts,
            dir,
            downward.items.as_deref().unwrap_or_default(),
            downward.default_mode.unwrap_or(0o644),
        )?;
    } else if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        match host.type_.as_deref().unwrap_or("") {
            "DirectoryOrCreate" => std::fs::create_dir_all(&path)
                .map_err(|e| fatal(format!("cannot create {}: {e}", path.display())))?,
            "FileOrCreate" if !path.exists() => {
                std::fs::File::create(&path)
                    .map_err(|e| fatal(format!("cannot create {}: {e}", path.display())))?;
            }
            "FileOrCreate" => {}
            _ if !path.exists() => {
                return Err(VolumeError::Retry(format!(
                    "hostPath {} does not exist",
                    path.display()
                )));
            }
            _ => {}
        }
        return Ok(path);
    } else if let Some(projected) = &volume.projected {
        mkdir(0o755)?;
        let default_mode = projected.default_mode.unwrap_or(0o644);
        for source in projected.sources.iter().flatten() {
            if let Some(token) = &source.service_account_token {
                let (value, lifetime) = request_token(client, facts, token).await?;
                let path = inside(dir, &token.path).map_err(fatal)?;
                write_file(&path, value.as_bytes(), default_mode).map_err(fatal)?;
                volumes
                    ._refreshers
                    .push(AbortOnDrop(tokio::spawn(refresh_token(
                        client.clone(),
                        facts.clone(),
                        token.clone(),
                        path,
                        default_mode,
                        lifetime,
                    ))));
            } else if let Some(cm) = &source.config_map {
                let optional = cm.optional.unwrap_or(false);
                if let Some(files) = config_map_files(client, ns, &cm.name, optional).await? {
                    let what = format!("ConfigMap {ns}/{}", cm.name);
                    write_keys(dir, &what, &files, cm.items.as_ref(), default_mode)?;
                }
            } else if let Some(secret) = &source.secret {
                let optional = secret.optional.unwrap_or(false);
                if let Some(files) = secret_files(client, ns, &secret.name, optional).await? {
                    let what = format!("Secret {ns}/{}", secret.name);
                    write_keys(dir, &what, &files, secret.items.as_ref(), default_mode)?;
                }
            } else if let Some(downward) = &source.downward_api {
                downward_files(
                    facts,
                    dir,
                    downward.items.as_deref().unwrap_or_default(),
                    default_mode,
                )?;
            } else {
                return Err(fatal(
                    "a projected source other than serviceAccountToken, configMap, secret or downwardAPI"
                        .to_string(),
                ));
            }
        }
    } else {
        return Err(fatal(
            "this volume type is not supported by the node agent (emptyDir, configMap, secret, downwardAPI, hostPath and projected are)"
                .to_string(),
        ));
    }
    Ok(dir.to_path_buf())
}

/// Keeps a projected token fresh: a new one at 80% of the last one's lifetime.
async fn refresh_token(
    client: Client,
    facts: PodFacts,
    projection: ServiceAccountTokenProjection,
    path: PathBuf,
    mode: i32,
    mut lifetime: Duration,
) {
    loop {
        tokio::time::sleep(refresh_after(lifetime)).await;
        loop {
            match request_token(&client, &facts, &projection).await {
                Ok((token, new_lifetime)) => {
                    if let Err(error) = write_file(&path, token.as_bytes(), mode) {
                        tracing::warn!(%error, "cannot write a refreshed token");
                    }
                    lifetime = new_lifetime;
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, path = %path.display(), "cannot refresh a projected token; retrying in 10s");
                    tokio::time::sleep(Duration::from_secs(10)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside() {
        let base = Path::new("/v");
        assert_eq!(inside(base, "a/b").unwrap(), Path::new("/v/a/b"));
        assert!(inside(base, "../x").is_err());
        assert!(inside(base, "/etc/passwd").is_err());
        assert_eq!(
            refresh_after(Duration::from_secs(600)),
            Duration::from_secs(480)
        );
    }
}
