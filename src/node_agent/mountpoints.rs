//! Mount points on the host. A container's volumes are bind-mounted inside the
//! process's own mount namespace, but the directory (or file) mounted on must exist
//! in the host's filesystem (`/var/run/secrets/kubernetes.io/serviceaccount`, say).
//! The agent creates the missing parts and removes them when no pod needs them.
//!
//! Several agents may run on one host (two test runs), and removing a directory that
//! another agent's process has a mount on would detach that mount. So what agents
//! created is recorded host-wide, in `/run/tandem-node-agent/mountpoints/`: one entry
//! per created path, holding one file per mount that needs it
//! (`hold-<agent pid>-<n>`), changed under a lock directory. A path is removed with
//! its last hold; holds of agents that are gone are collected when an agent starts.
//! Paths that existed before are never removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const REGISTRY: &str = "/run/tandem-node-agent/mountpoints";

#[derive(Debug, Clone)]
pub struct MountPoints {
    root: PathBuf,
    serial: Arc<AtomicU64>,
}

impl Default for MountPoints {
    fn default() -> Self {
        Self::new(PathBuf::from(REGISTRY))
    }
}

/// The paths one mount needs; give it back with [`MountPoints::release`].
#[derive(Debug)]
pub struct Hold {
    parts: Vec<PathBuf>,
    name: String,
}

/// FNV-1a over the path, for entry names of fixed length.
fn hash(path: &Path) -> u64 {
    path.as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// The registry lock, released when dropped.
struct Lock(PathBuf);

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn holds(entry: &Path) -> Vec<String> {
    std::fs::read_dir(entry)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hold-"))
        .collect()
}

fn remove_host_path(path: &Path) {
    let _ = if path.is_dir() {
        std::fs::remove_dir(path)
    } else {
        std::fs::remove_file(path)
    };
}

impl MountPoints {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            serial: Arc::default(),
        }
    }

    fn entry(&self, part: &Path) -> PathBuf {
        self.root.join(format!("{:016x}", hash(part)))
    }

    /// Takes the registry lock: a directory naming its holder; a dead holder's lock
    /// is broken.
    fn lock(&self) -> Result<Lock, String> {
        std::fs::create_dir_all(&self.root)
            .map_err(|e| format!("cannot create {}: {e}", self.root.display()))?;
        let dir = self.root.join(".lock");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    let _ = std::fs::write(dir.join("pid"), std::process::id().to_string());
                    return Ok(Lock(dir));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(dir.join("pid"))
                        .ok()
                        .and_then(|p| p.trim().parse::<u32>().ok());
                    if holder.is_some_and(|pid| !super::alive(pid)) {
                        let _ = std::fs::remove_dir_all(&dir);
                        continue;
                    }
                    if Instant::now() > deadline {
                        return Err(format!(
                            "{} stayed locked for 10s (held by pid {holder:?})",
                            dir.display()
                        ));
                    }
                    // Held for a few file operations at most.
                    std::thread::sleep(Duration::from_millis(2));
                }
                // Another agent removed the empty registry meanwhile.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::create_dir_all(&self.root)
                        .map_err(|e| format!("cannot create {}: {e}", self.root.display()))?;
                    if Instant::now() > deadline {
                        return Err(format!("cannot lock {}: {e}", dir.display()));
                    }
                }
                Err(e) => return Err(format!("cannot lock {}: {e}", dir.display())),
            }
        }
    }

    /// Makes sure `path` exists (a directory, or an empty file if `file`).
    pub fn acquire(&self, path: &Path, file: bool) -> Result<Hold, String> {
        let _lock = self.lock()?;
        let name = format!(
            "hold-{}-{}",
            std::process::id(),
            self.serial.fetch_add(1, Ordering::Relaxed)
        );
        let mut parts: Vec<PathBuf> = path.ancestors().map(Path::to_path_buf).collect();
        parts.reverse();
        let mut hold = Hold {
            parts: Vec::new(),
            name,
        };
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.iter().enumerate() {
            if part.as_os_str().is_empty() || part == Path::new("/") {
                continue;
            }
            let entry = self.entry(part);
            let result = if entry.exists() {
                std::fs::write(entry.join(&hold.name), b"")
            } else if part.symlink_metadata().is_ok() {
                continue;
            } else {
                let made = if i == last && file {
                    std::fs::File::create(part).map(|_| ())
                } else {
                    std::fs::create_dir(part)
                };
                made.and_then(|()| std::fs::create_dir(&entry))
                    .and_then(|()| {
                        std::fs::write(entry.join("path"), part.as_os_str().as_encoded_bytes())
                    })
                    .and_then(|()| std::fs::write(entry.join(&hold.name), b""))
            };
            if let Err(e) = result {
                drop(_lock);
                self.release(hold);
                return Err(format!("cannot create mount point {}: {e}", part.display()));
            }
            hold.parts.push(part.clone());
        }
        Ok(hold)
    }

    /// The mount is gone: paths no other mount needs are removed, deepest first.
    pub fn release(&self, hold: Hold) {
        let Ok(_lock) = self.lock() else {
            return;
        };
        for part in hold.parts.iter().rev() {
            let entry = self.entry(part);
            let _ = std::fs::remove_file(entry.join(&hold.name));
            if holds(&entry).is_empty() {
                remove_host_path(part);
                let _ = std::fs::remove_dir_all(&entry);
            }
        }
    }

    /// Removes the registry if it is empty (the last agent leaves nothing behind).
    pub fn remove_registry_if_empty(&self) {
        if std::fs::remove_dir(&self.root).is_ok()
            && let Some(parent) = self.root.parent()
        {
            let _ = std::fs::remove_dir(parent);
        }
    }

    /// Drops the holds of agents that are gone, and the paths left without holds.
    pub fn collect_garbage(&self) {
        let Ok(_lock) = self.lock() else {
            return;
        };
        let mut orphans: Vec<(PathBuf, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let entry = entry.path();
            if entry.file_name().is_some_and(|n| n == ".lock") {
                continue;
            }
            for hold in holds(&entry) {
                let pid = hold.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
                if pid.is_none_or(|pid| !super::alive(pid)) {
                    let _ = std::fs::remove_file(entry.join(&hold));
                }
            }
            if holds(&entry).is_empty() {
                let path = std::fs::read(entry.join("path"))
                    .ok()
                    .map(|b| PathBuf::from(String::from_utf8_lossy(&b).into_owned()));
                orphans.push((path.unwrap_or_default(), entry));
            }
        }
        orphans.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        for (path, entry) in orphans {
            if !path.as_os_str().is_empty() {
                tracing::info!(path = %path.display(), "removing a mount point left behind");
                remove_host_path(&path);
            }
            let _ = std::fs::remove_dir_all(&entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_paths_go_with_their_last_hold_across_agents() {
        let base = std::env::temp_dir().join(format!("tandem-mp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let root = base.join("host");
        std::fs::create_dir_all(&root).unwrap();
        // Two agents sharing one registry.
        let (one, two) = (
            MountPoints::new(base.join("registry")),
            MountPoints::new(base.join("registry")),
        );
        let a = root.join("x/y/a");
        let b = root.join("x/b");
        let h1 = one.acquire(&a, false).unwrap();
        let h2 = two.acquire(&b, true).unwrap();
        let h3 = two.acquire(&a, false).unwrap();
        assert!(a.is_dir() && b.is_file());
        one.release(h1);
        assert!(a.is_dir(), "the other agent still mounts on it");
        two.release(h3);
        assert!(!root.join("x/y").exists());
        assert!(root.join("x").exists(), "b still needs x");
        two.release(h2);
        assert!(
            !root.join("x").exists(),
            "created by one, last needed by the other"
        );
        assert!(root.exists(), "was there before");

        // An agent that died holding a path: its holds are collected.
        let c = root.join("c/d");
        let hold = one.acquire(&c, false).unwrap();
        let entry = one.entry(&root.join("c"));
        std::fs::rename(entry.join(&hold.name), entry.join("hold-999999999-0")).unwrap();
        let entry = one.entry(&c);
        std::fs::rename(entry.join(&hold.name), entry.join("hold-999999999-0")).unwrap();
        one.collect_garbage();
        assert!(!root.join("c").exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
