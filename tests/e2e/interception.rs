//! `tandem-proxy init` in network namespaces the tests make: the rules it installs
//! (either iptables backend, IPv4 and IPv6, the same when run twice), and what they do
//! to real traffic: the app's outgoing TCP reaches the outbound port, the proxy's own
//! does not, inbound TCP reaches the inbound port but for the admin and skipped ports.

use std::process::{Command, Output};
use std::time::Duration;

use tandem::process::Spawned;

use crate::support::*;

const LIMIT: Duration = Duration::from_secs(120);

/// A network namespace of a test's own, removed when dropped, with a veth to the host
/// (`host_addr` on the host side, `addr` inside) and a route to 10.77.0.0/24 over it,
/// where nothing answers.
struct Netns {
    name: String,
    host_addr: String,
    addr: String,
}

fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    let out = sh(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Netns {
    fn new(tag: &str) -> Self {
        let n = std::process::id() % 100_000;
        let name = format!("tdm-{tag}-{n}");
        // /30 per test from the pid and tag, inside 10.78.0.0/16.
        let slot = (n as usize * 7 + tag.len() * 131) % 16_000;
        let base = 4 * slot;
        let (a, b) = (base / 256, base % 256);
        let host_addr = format!("10.78.{a}.{}", b + 1);
        let addr = format!("10.78.{a}.{}", b + 2);
        let host_veth = format!("th{n}{}", &tag[..1]);
        let inner_veth = format!("tn{n}{}", &tag[..1]);
        let _ = sh("ip", &["netns", "del", &name]);
        let _ = sh("ip", &["link", "del", &host_veth]);
        must("ip", &["netns", "add", &name]);
        let ns = Netns {
            name,
            host_addr,
            addr,
        };
        must(
            "ip",
            &[
                "link",
                "add",
                &host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &inner_veth,
            ],
        );
        must("ip", &["link", "set", &inner_veth, "netns", &ns.name]);
        must(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", ns.host_addr),
                "dev",
                &host_veth,
            ],
        );
        must("ip", &["link", "set", &host_veth, "up"]);
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.addr),
            "dev",
            &inner_veth,
        ]);
        ns.exec(&["ip", "link", "set", &inner_veth, "up"]);
        // Addresses on the link where nothing answers: a connection there is only
        // answered if the rules redirect it.
        ns.exec(&["ip", "route", "add", "10.77.0.0/24", "dev", &inner_veth]);
        ns
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).args(args);
        command
    }

    fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        must("ip", &full)
    }

    fn init(&self, extra: &[&str]) -> Output {
        let exe = exe().display().to_string();
        let mut args = vec!["netns", "exec", &self.name, &exe, "proxy", "init"];
        args.extend_from_slice(extra);
        sh("ip", &args)
    }

    /// `curl` from inside, as `uid` if given: the body, or None if nothing answered.
    fn curl(&self, url: &str, uid: Option<u32>) -> Option<String> {
        let uid = uid.map(|u| u.to_string());
        let mut args = vec![];
        if let Some(uid) = &uid {
            args.extend(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        args.extend(["curl", "-s", "--max-time", "2", url]);
        let out = self.command(&args).output().expect("ip netns exec curl");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `tandem backend` named `name`, listening on `port` inside.
    async fn backend(&self, name: &str, port: u16) -> Spawned {
        let exe = exe().display().to_string();
        let listen = format!("0.0.0.0:{port}");
        let args = [
            "netns", "exec", &self.name, &exe, "backend", "--name", name, "--listen", &listen,
            "--quiet",
        ];
        tandem::process::spawn("backend", std::path::Path::new("ip"), args, &[], START)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The veth goes with the namespace.
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// The rules of the nat table, as the `backend`'s own `*-save` prints them.
fn nat(ns: &Netns, backend: &str, v6: bool) -> String {
    let save = format!(
        "{}-{backend}-save",
        if v6 { "ip6tables" } else { "iptables" }
    );
    ns.exec(&[&save, "-t", "nat"])
        .lines()
        .filter(|l| l.starts_with("-A "))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn init_installs_the_same_rules_however_often_it_runs() {
    bounded(LIMIT, async {
        for backend in ["nft", "legacy"] {
            let ns = Netns::new(&format!("r{backend}"));
            let args = [
                "--iptables",
                backend,
                "--skip-inbound-ports",
                "22",
                "--skip-outbound-cidrs",
                "10.96.0.1,fd00::/8",
            ];
            let out = ns.init(&args);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let printed = String::from_utf8_lossy(&out.stdout);
            assert!(
                printed.contains("-A TANDEM_OUTPUT -m owner --uid-owner 2102 -j RETURN"),
                "it prints what it installed: {printed}"
            );
            let (v4, v6) = (nat(&ns, backend, false), nat(&ns, backend, true));
            assert!(v4.contains("-j REDIRECT --to-ports 4140") && v6.contains("-d fd00::/8"));
            let again = ns.init(&args);
            assert!(again.status.success());
            assert_eq!(
                nat(&ns, backend, false),
                v4,
                "{backend}: the same IPv4 rules after a second run"
            );
            assert_eq!(
                nat(&ns, backend, true),
                v6,
                "{backend}: the same IPv6 rules after a second run"
            );
        }
    })
    .await
}

#[tokio::test]
async fn intercepted_traffic_goes_through_the_proxy_ports_and_the_proxy_is_exempt() {
    bounded(LIMIT, async {
        let ns = Netns::new("traffic");
        let _outbound = ns.backend("outbound", 4140).await;
        let _inbound = ns.backend("inbound", 4143).await;
        let _admin = ns.backend("admin", 4191).await;
        let _skipped = ns.backend("skipped", 9000).await;
        let out = ns.init(&[
            "--skip-inbound-ports",
            "9000",
            "--skip-outbound-ports",
            "5432",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The app's outgoing TCP, wherever it was going, reaches the outbound port.
        assert_eq!(
            ns.curl("http://10.77.0.1:80/", None).as_deref(),
            Some("outbound")
        );
        assert_eq!(
            ns.curl("http://10.77.0.9:8080/", Some(1000)).as_deref(),
            Some("outbound")
        );
        // The proxy's own is not redirected (nothing answers there), nor a skipped port.
        assert_eq!(
            ns.curl("http://10.77.0.1:80/", Some(2102)),
            None,
            "no loop for the proxy"
        );
        assert_eq!(
            ns.curl("http://10.77.0.1:5432/", None),
            None,
            "a skipped port"
        );
        // Loopback is left alone.
        assert_eq!(
            ns.curl("http://127.0.0.1:9000/", None).as_deref(),
            Some("skipped")
        );

        // Inbound: from the host to the pod, the inbound port answers, but for the
        // admin port and skipped ports.
        let from_host = |port: u16| {
            let out = sh(
                "curl",
                &[
                    "-s",
                    "--max-time",
                    "2",
                    &format!("http://{}:{port}/", ns.addr),
                ],
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        assert_eq!(from_host(8080), "inbound");
        assert_eq!(from_host(4191), "admin");
        assert_eq!(from_host(9000), "skipped");
    })
    .await
}

#[tokio::test]
async fn init_says_what_was_wrong() {
    bounded(LIMIT, async {
        let ns = Netns::new("errors");
        let out = ns.init(&["--skip-outbound-cidrs", "10.0.0.0/40"]);
        assert!(!out.status.success());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("10.0.0.0/40") && said.contains("prefix length"),
            "{said}"
        );
        // A rule iptables refuses is named, with iptables' reason.
        let out = ns.init(&["--proxy-uid", "4294967295", "--ipv6", "off"]);
        assert!(!out.status.success());
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("rule refused") && said.contains("--uid-owner 4294967295 -j RETURN`"),
            "{said}"
        );
    })
    .await
}
