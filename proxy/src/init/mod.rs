//! `tandem-proxy init`: installs the nat rules that send a pod's TCP through its
//! proxy (IPv4 and IPv6), as an init container with NET_ADMIN does before the pod's
//! other containers start. The rules are in [`rules`]; this runs `iptables-save` and
//! `iptables-restore` (the nft or the legacy backend: the one the node already uses,
//! as Istio's and Linkerd's init containers choose) and prints what is installed.

pub mod rules;

use std::io::Write;
use std::process::{Command, Stdio};

use rules::{Cidr, Family, Settings};

/// Flags of `tandem-proxy init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// The proxy's inbound port: TCP arriving for the pod goes there.
    #[arg(long, default_value_t = 4143)]
    pub inbound_port: u16,
    /// The proxy's outbound port: the app's outgoing TCP goes there.
    #[arg(long, default_value_t = 4140)]
    pub outbound_port: u16,
    /// The proxy's admin port (probes): never redirected.
    #[arg(long, default_value_t = 4191)]
    pub admin_port: u16,
    /// The UID the proxy runs as: its own traffic is never redirected (no loops).
    #[arg(long, default_value_t = 2102)]
    pub proxy_uid: u32,
    /// Inbound ports left alone, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// Outbound destinations left alone: CIDRs or addresses, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub skip_outbound_cidrs: Vec<Cidr>,
    /// Which iptables: the one the node uses (auto), nft or legacy.
    #[arg(long, default_value = "auto")]
    pub iptables: Backend,
    /// IPv6 rules too: on, off, or auto (if ip6tables works here).
    #[arg(long, default_value = "auto")]
    pub ipv6: Switch,
    /// Print the rules that would be installed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Auto,
    Nft,
    Legacy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    Auto,
    On,
    Off,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot run {command}: {source} (the init image needs iptables)")]
    Run {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("{family} rule refused by {command}: `{rule}`: {stderr}")]
    Refused {
        family: &'static str,
        command: String,
        rule: String,
        stderr: String,
    },
}

impl InitArgs {
    fn settings(&self) -> Settings {
        Settings {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            admin_port: self.admin_port,
            proxy_uid: self.proxy_uid,
            skip_inbound_ports: self.skip_inbound_ports.clone(),
            skip_outbound_ports: self.skip_outbound_ports.clone(),
            skip_outbound_cidrs: self.skip_outbound_cidrs.clone(),
        }
    }
}

/// The commands of one backend and family.
struct Tools {
    save: String,
    restore: String,
}

impl Tools {
    fn of(backend: Backend, family: Family) -> Self {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let flavour = match backend {
            Backend::Legacy => "-legacy",
            Backend::Nft | Backend::Auto => "-nft",
        };
        Tools {
            save: format!("{base}{flavour}-save"),
            restore: format!("{base}{flavour}-restore"),
        }
    }
}

/// Runs `command args…` with `input` on stdin; its stdout.
fn run(command: &str, args: &[&str], input: Option<&str>) -> Result<String, InitError> {
    let mut child = Command::new(command)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| InitError::Run {
            command: command.to_string(),
            source,
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A failure to write shows as the command's own failure below.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child.wait_with_output().map_err(|source| InitError::Run {
        command: command.to_string(),
        source,
    })?;
    if !output.status.success() {
        return Err(InitError::Failed {
            command: format!("{command} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Rules in a table dump (`-A` lines).
fn rule_count(saved: &str) -> usize {
    saved.lines().filter(|l| l.starts_with("-A ")).count()
}

/// The backend the node uses: the one already holding rules (kube-proxy's, say),
/// else nft (the default of current distributions), else legacy.
fn pick_backend(requested: Backend) -> Backend {
    if requested != Backend::Auto {
        return requested;
    }
    let legacy = run("iptables-legacy-save", &[], None).map(|s| rule_count(&s));
    let nft = run("iptables-nft-save", &[], None).map(|s| rule_count(&s));
    match (nft, legacy) {
        (Ok(n), Ok(l)) if l > n => Backend::Legacy,
        (Ok(_), _) => Backend::Nft,
        (Err(_), Ok(_)) => Backend::Legacy,
        (Err(_), Err(_)) => Backend::Nft,
    }
}

/// Installs the rules of one family; returns them as installed.
fn install(settings: &Settings, tools: &Tools, family: Family) -> Result<Vec<String>, InitError> {
    let saved = run(&tools.save, &["-t", "nat"], None)?;
    let (input, lines) = rules::restore_input(settings, family, &saved);
    if let Err(error) = run(&tools.restore, &["--noflush"], Some(&input)) {
        return Err(match error {
            InitError::Failed { command, stderr } => match rules::failed_rule(&stderr, &lines) {
                Some(rule) => InitError::Refused {
                    family: family.name(),
                    command,
                    rule: rule.to_string(),
                    stderr,
                },
                None => InitError::Failed { command, stderr },
            },
            other => other,
        });
    }
    let now = run(&tools.save, &["-t", "nat"], None)?;
    Ok(rules::installed(&now)
        .into_iter()
        .map(str::to_string)
        .collect())
}

/// `tandem-proxy init`.
pub fn run_init(args: &InitArgs) -> Result<(), InitError> {
    let settings = args.settings();
    let mut families = vec![Family::V4];
    if args.ipv6 != Switch::Off {
        families.push(Family::V6);
    }
    if args.dry_run {
        for family in families {
            println!("# {} (nat)", family.name());
            for rule in rules::rules(&settings, family) {
                println!("{rule}");
            }
            for (_, jump) in rules::JUMPS {
                println!("{jump}");
            }
        }
        return Ok(());
    }
    let backend = pick_backend(args.iptables);
    for family in families {
        let tools = Tools::of(backend, family);
        match install(&settings, &tools, family) {
            Ok(installed) => {
                println!(
                    "# {} nat rules installed ({})",
                    family.name(),
                    tools.restore
                );
                for rule in installed {
                    println!("{rule}");
                }
            }
            // IPv6 off in this kernel: say so, the IPv4 rules stand.
            Err(error) if family == Family::V6 && args.ipv6 == Switch::Auto => {
                eprintln!("tandem-proxy init: no IPv6 rules: {error}");
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}
