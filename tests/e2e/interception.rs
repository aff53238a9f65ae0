//! `tandem-proxy init` in network namespaces the tests make: the rules it installs
//! (either iptables backend, IPv4 and IPv6, the same when run twice), and what they do
//! to real traffic: the app's outgoing TCP reaches the outbound port, the proxy's own
//! does not, inbound TCP reaches the inbound port but for the admin and skipped ports.

use std::net::SocketAddr;
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
    host_veth: String,
    inner_veth: String,
    slot: usize,
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
            host_veth: host_veth.clone(),
            inner_veth: inner_veth.clone(),
            slot,
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

    /// IPv6 on the veth too (`fd78:SLOT::1` on the host side, `::2` inside), and
    /// default routes to the host for both families; returns the two IPv6 addresses.
    fn with_ipv6_and_routes(&self) -> (String, String) {
        let (host6, addr6) = (
            format!("fd78:{:x}::1", self.slot),
            format!("fd78:{:x}::2", self.slot),
        );
        let host = format!("{host6}/64");
        must(
            "ip",
            &["-6", "addr", "add", &host, "dev", &self.host_veth, "nodad"],
        );
        let inner = format!("{addr6}/64");
        self.exec(&[
            "ip",
            "-6",
            "addr",
            "add",
            &inner,
            "dev",
            &self.inner_veth,
            "nodad",
        ]);
        self.exec(&["ip", "route", "add", "default", "via", &self.host_addr]);
        self.exec(&["ip", "-6", "route", "add", "default", "via", &host6]);
        (host6, addr6)
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

    /// `tandem backend` named `name`, listening on `port` inside (IPv4 and IPv6, as
    /// a socket bound to `[::]` does).
    async fn backend(&self, name: &str, port: u16) -> Spawned {
        let exe = exe().display().to_string();
        let listen = format!("[::]:{port}");
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

/// `curl` from inside (as root, so intercepted): the body, or what went wrong.
fn curl_in(ns: &Netns, url: &str) -> Result<String, String> {
    let out = ns
        .command(&["curl", "-sS", "-g", "--max-time", "5", url])
        .output()
        .expect("ip netns exec curl");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test]
async fn the_proxy_routes_redirected_connections_by_their_original_destination() {
    bounded(LIMIT, async {
        let ns = Netns::new("original");
        let (host6, addr6) = ns.with_ipv6_and_routes();

        // Backends on the host, two per family, and a control plane that knows them
        // behind a ClusterIP each.
        let v4 = format!("{}:0", ns.host_addr);
        let v6 = format!("[{host6}]:0");
        let mut backends = Vec::new();
        for (name, listen) in [("v4-a", &v4), ("v4-b", &v4), ("v6-a", &v6), ("v6-b", &v6)] {
            backends.push(backend_with(name, &["--listen", listen]).await);
        }
        let addr = |i: usize| backends[i].addr("http");
        let dir = TestDir::new("original-dst");
        let file = dir.path("services.yaml");
        Services::new()
            .service(
                Service::new("web4", 80)
                    .cluster_ip("10.96.7.7".parse().unwrap())
                    .endpoints([addr(0), addr(1)]),
            )
            .service(
                Service::new("web6", 80)
                    .cluster_ip("fd96::7".parse().unwrap())
                    .endpoints([addr(2), addr(3)]),
            )
            .write(&file);
        let cp = control_plane_on(&file, &format!("{}:0", ns.host_addr)).await;
        let discovery = cp.addr("discovery").to_string();

        // The pod: its app (on the pod's loopback only... and everywhere, as apps
        // listen), the rules, and the proxy as its own UID, as injected.
        let _app = ns.backend("app", 8080).await;
        let out = ns.init(&[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = pod_bin_dir().unwrap_or_else(|e| panic!("{e}"));
        let tandem = bin.join("tandem").display().to_string();
        let args = [
            "netns",
            "exec",
            &ns.name,
            "setpriv",
            "--reuid",
            "2102",
            "--regid",
            "2102",
            "--clear-groups",
            &tandem,
            "proxy",
            "--outbound-listen",
            "0.0.0.0:4140,[::]:4140",
            "--inbound-listen",
            "0.0.0.0:4143,[::]:4143",
            "--admin",
            "0.0.0.0:4191",
            "--control-plane",
            &discovery,
        ];
        let proxy = tandem::process::spawn("proxy", std::path::Path::new("ip"), args, &[], START)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        for (role, port) in [("outbound", 4140), ("inbound", 4143)] {
            let (first, second) = (proxy.addr(role), proxy.addr(&format!("{role}-2")));
            assert!(
                first.is_ipv4() && second.is_ipv6(),
                "{role}: {first} {second}"
            );
            assert!(first.port() == port && second.port() == port);
        }
        wait_ready(SocketAddr::new(ns.addr.parse().unwrap(), 4191)).await;

        // A ClusterIP, IPv4 or IPv6: balanced over the service's endpoints.
        for (url, names) in [
            ("http://10.96.7.7/", ["v4-a", "v4-b"]),
            ("http://[fd96::7]/", ["v6-a", "v6-b"]),
        ] {
            let mut seen: Vec<String> = (0..4).map(|_| curl_in(&ns, url).unwrap()).collect();
            seen.sort();
            assert_eq!(seen, [names[0], names[0], names[1], names[1]], "{url}");
        }
        // An address the control plane does not know: to that address, as it is.
        for i in [0, 2] {
            let url = format!("http://{}/", addr(i));
            assert_eq!(
                curl_in(&ns, &url).unwrap(),
                ["v4-a", "", "v6-a"][i],
                "{url}"
            );
        }
        // Inbound, from outside the pod, either family: the app on the pod's loopback.
        for url in [
            format!("http://{}:8080/", ns.addr),
            format!("http://[{addr6}]:8080/"),
        ] {
            let out = sh("curl", &["-sS", "-g", "--max-time", "5", &url]);
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app", "{url}");
        }
        // A connection straight to the outbound port was redirected nowhere: closed,
        // not forwarded to itself.
        let direct = format!("http://{}:4140/", ns.addr);
        assert!(curl_in(&ns, &direct).is_err());
        let out = sh("curl", &["-sS", "--max-time", "5", &direct]);
        assert!(
            !out.status.success(),
            "from outside, the outbound port forwards nothing"
        );
    })
    .await
}
