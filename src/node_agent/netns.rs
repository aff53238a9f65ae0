//! Pod networks with iproute2: one bridge on the host holding the pod CIDR's first
//! address, and per running pod a network namespace with a veth pair (host end on the
//! bridge, pod end `eth0` with the pod's address and a default route via the bridge).
//!
//! Names: the namespace is `<bridge>-<a>-<b>-<c>-<d>` (the pod's address); the host
//! end of the veth is `t<6 hex of the bridge name's hash>h<hex offset in the CIDR>`,
//! at most 14 characters (IFNAMSIZ is 16 with the NUL). At start the agent removes
//! what a previous agent with the same bridge left behind.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use super::ipam::Cidr;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "the `ip` command (iproute2) is not on PATH: the node agent needs it to build pod networks (apt-get install iproute2)"
    )]
    NoIp,
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("--bridge {0:?}: a Linux interface name is 1-15 characters, no '/', ':' or spaces")]
    BadName(String),
}

/// Finds `name` on PATH (or as given, if it has a '/').
pub fn which(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

pub fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs `ip ARGS`; the error carries its stderr.
async fn ip(args: &[&str]) -> Result<String, NetError> {
    let command = format!("ip {}", args.join(" "));
    let run = tokio::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(Duration::from_secs(20), run).await {
        Err(_) => {
            return Err(NetError::Command {
                command,
                detail: "no answer within 20s".into(),
            });
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Err(NetError::NoIp),
        Ok(Err(e)) => {
            return Err(NetError::Command {
                command,
                detail: e.to_string(),
            });
        }
        Ok(Ok(output)) => output,
    };
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(NetError::Command {
            command,
            detail: format!(
                "{} ({})",
                String::from_utf8_lossy(&output.stderr).trim(),
                output.status
            ),
        })
    }
}

/// The host's bridge for all pods of this agent.
#[derive(Debug, Clone)]
pub struct Bridge {
    pub name: String,
    pub cidr: Cidr,
    /// Prefix of the host ends of this agent's veths.
    tag: String,
}

fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// FNV-1a, for short stable names.
fn hash(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

impl Bridge {
    pub fn new(name: &str, cidr: Cidr) -> Result<Self, NetError> {
        if !valid_ifname(name) {
            return Err(NetError::BadName(name.to_string()));
        }
        Ok(Self {
            name: name.to_string(),
            cidr,
            tag: format!("t{:06x}", hash(name) & 0xff_ffff),
        })
    }

    /// Removes leftovers of an earlier agent with this bridge, then creates the bridge
    /// with the gateway address.
    pub async fn create(&self) -> Result<(), NetError> {
        if which("ip").is_none() {
            return Err(NetError::NoIp);
        }
        self.remove_leftovers().await;
        let gw = format!("{}/{}", self.cidr.gateway(), self.cidr.prefix);
        let steps: [&[&str]; 3] = [
            &["link", "add", &self.name, "type", "bridge"],
            &["addr", "add", &gw, "dev", &self.name],
            &["link", "set", &self.name, "up"],
        ];
        for step in steps {
            if let Err(e) = ip(step).await {
                let _ = ip(&["link", "del", &self.name]).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes the bridge (and whatever of this agent's is still attached).
    pub async fn remove(&self) {
        self.remove_leftovers().await;
    }

    async fn remove_leftovers(&self) {
        if let Ok(list) = ip(&["netns", "list"]).await {
            let prefix = format!("{}-", self.name);
            for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if ns.starts_with(&prefix) {
                    tracing::info!(netns = ns, "removing a pod network namespace left behind");
                    let _ = ip(&["netns", "del", ns]).await;
                }
            }
        }
        if let Ok(list) = ip(&["-o", "link", "show"]).await {
            let prefix = format!("{}h", self.tag);
            for line in list.lines() {
                // "12: name@if11: <...>"
                let Some(name) = line.split(':').nth(1).map(str::trim) else {
                    continue;
                };
                let name = name.split('@').next().unwrap_or(name);
                if name.starts_with(&prefix) {
                    let _ = ip(&["link", "del", name]).await;
                }
            }
        }
        if std::path::Path::new("/sys/class/net")
            .join(&self.name)
            .exists()
        {
            let _ = ip(&["link", "del", &self.name]).await;
        }
    }

    pub fn netns_name(&self, ip: Ipv4Addr) -> String {
        let [a, b, c, d] = ip.octets();
        format!("{}-{a}-{b}-{c}-{d}", self.name)
    }

    pub fn host_veth_name(&self, ip: Ipv4Addr) -> String {
        format!("{}h{:x}", self.tag, self.cidr.offset(ip).unwrap_or(0))
    }

    /// A namespace holding `ip` on `eth0`, linked to the bridge. A failure undoes what
    /// was built.
    pub async fn add_pod(&self, pod_ip: Ipv4Addr) -> Result<PodNet, NetError> {
        let net = PodNet {
            netns: self.netns_name(pod_ip),
            host_veth: self.host_veth_name(pod_ip),
        };
        // A namespace of the same name left by a pod that held this address before.
        net.remove().await;
        let addr = format!("{pod_ip}/{}", self.cidr.prefix);
        let gw = self.cidr.gateway().to_string();
        let ns = net.netns.as_str();
        let host = net.host_veth.as_str();
        let steps: [&[&str]; 7] = [
            &["netns", "add", ns],
            &[
                "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
            &["link", "set", host, "master", &self.name, "up"],
            &["-n", ns, "link", "set", "lo", "up"],
            &["-n", ns, "addr", "add", &addr, "dev", "eth0"],
            &["-n", ns, "link", "set", "eth0", "up"],
            &["-n", ns, "route", "add", "default", "via", &gw],
        ];
        for step in steps {
            if let Err(e) = ip(step).await {
                net.remove().await;
                return Err(e);
            }
        }
        Ok(net)
    }
}

/// One pod's namespace and host veth.
#[derive(Debug, Clone)]
pub struct PodNet {
    pub netns: String,
    pub host_veth: String,
}

impl PodNet {
    /// Deletes the veth and the namespace (missing ones are fine).
    pub async fn remove(&self) {
        if std::path::Path::new("/sys/class/net")
            .join(&self.host_veth)
            .exists()
        {
            let _ = ip(&["link", "del", &self.host_veth]).await;
        }
        if std::path::Path::new("/var/run/netns")
            .join(&self.netns)
            .exists()
            || std::path::Path::new("/run/netns")
                .join(&self.netns)
                .exists()
        {
            let _ = ip(&["netns", "del", &self.netns]).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz() {
        let b = Bridge::new("tandem0", "10.0.0.0/8".parse().unwrap()).unwrap();
        let v = b.host_veth_name(Ipv4Addr::new(10, 255, 255, 254));
        assert!(v.len() <= 15, "{v}");
        assert_eq!(b.netns_name(Ipv4Addr::new(10, 1, 2, 3)), "tandem0-10-1-2-3");
        assert!(Bridge::new("a-very-long-bridge-name", "10.0.0.0/8".parse().unwrap()).is_err());
    }
}
