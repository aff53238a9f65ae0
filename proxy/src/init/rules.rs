//! The nat rules that send a pod's TCP through its proxy, as `iptables-restore` input.
//!
//! Pure: the rules come from the settings and from what the table already holds (the
//! jumps into our chains are added only if missing), so running `init` twice leaves
//! the same rules. Our chains are declared in the input, which empties them first.
//!
//! ```text
//! PREROUTING -p tcp -> TANDEM_INBOUND:  skipped ports and the admin port RETURN,
//!                                      the rest -> REDIRECT to the inbound port
//! OUTPUT -p tcp     -> TANDEM_OUTPUT:   the proxy's own UID, loopback, skipped ports
//!                                      and CIDRs RETURN, the rest -> REDIRECT to
//!                                      the outbound port
//! ```

use std::net::IpAddr;

/// Our chains, in the order they are declared.
pub const CHAINS: [&str; 4] = [
    "TANDEM_INBOUND",
    "TANDEM_INBOUND_REDIRECT",
    "TANDEM_OUTPUT",
    "TANDEM_OUTPUT_REDIRECT",
];

/// The jumps from the built-in chains into ours.
pub const JUMPS: [(&str, &str); 2] = [
    ("PREROUTING", "-A PREROUTING -p tcp -j TANDEM_INBOUND"),
    ("OUTPUT", "-A OUTPUT -p tcp -j TANDEM_OUTPUT"),
];

/// What to intercept and what to leave alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Where inbound TCP goes (the proxy's inbound listener).
    pub inbound_port: u16,
    /// Where the app's outbound TCP goes (the proxy's outbound listener).
    pub outbound_port: u16,
    /// The proxy's admin port: never redirected (probes reach the proxy itself).
    pub admin_port: u16,
    /// The UID the proxy runs as: its own outbound traffic is never redirected.
    pub proxy_uid: u32,
    pub skip_inbound_ports: Vec<u16>,
    pub skip_outbound_ports: Vec<u16>,
    /// Destinations left alone (only those of the family being written apply).
    pub skip_outbound_cidrs: Vec<Cidr>,
}

/// An address block, `ADDR/BITS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub bits: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((addr, bits)) => (addr, Some(bits)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or a CIDR (10.0.0.0/8, fd00::/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, bits })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }
}

/// Ports for `-m multiport --dports`: at most 15 per rule.
fn port_lists(ports: &[u16]) -> Vec<String> {
    let mut sorted = ports.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
        .chunks(15)
        .map(|chunk| {
            chunk
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

/// The rules to install, one per line (without the table and COMMIT lines).
pub fn rules(settings: &Settings, family: Family) -> Vec<String> {
    let mut out = Vec::new();
    out.push(format!(
        "-A TANDEM_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        settings.inbound_port
    ));
    let mut skip_in = settings.skip_inbound_ports.clone();
    skip_in.push(settings.admin_port);
    for list in port_lists(&skip_in) {
        out.push(format!(
            "-A TANDEM_INBOUND -p tcp -m multiport --dports {list} -j RETURN"
        ));
    }
    out.push("-A TANDEM_INBOUND -p tcp -j TANDEM_INBOUND_REDIRECT".into());

    out.push(format!(
        "-A TANDEM_OUTPUT_REDIRECT -p tcp -j REDIRECT --to-ports {}",
        settings.outbound_port
    ));
    out.push(format!(
        "-A TANDEM_OUTPUT -m owner --uid-owner {} -j RETURN",
        settings.proxy_uid
    ));
    // The pod's loopback: the app talking to itself, and the proxy's inbound side
    // talking to the app.
    out.push("-A TANDEM_OUTPUT -o lo -j RETURN".into());
    out.push(format!(
        "-A TANDEM_OUTPUT -d {} -j RETURN",
        family.loopback()
    ));
    for list in port_lists(&settings.skip_outbound_ports) {
        out.push(format!(
            "-A TANDEM_OUTPUT -p tcp -m multiport --dports {list} -j RETURN"
        ));
    }
    for cidr in &settings.skip_outbound_cidrs {
        if cidr.addr.is_ipv4() == (family == Family::V4) {
            out.push(format!("-A TANDEM_OUTPUT -d {cidr} -j RETURN"));
        }
    }
    out.push("-A TANDEM_OUTPUT -p tcp -j TANDEM_OUTPUT_REDIRECT".into());
    out
}

/// The `iptables-restore --noflush` input: our chains declared (so emptied), our
/// rules, and the jumps into them unless `saved` (the nat table as `iptables-save`
/// printed it) already has them. Also returns each input line's rule, for errors.
pub fn restore_input(settings: &Settings, family: Family, saved: &str) -> (String, Vec<String>) {
    let mut lines = vec!["*nat".to_string()];
    for chain in CHAINS {
        lines.push(format!(":{chain} - [0:0]"));
    }
    lines.extend(rules(settings, family));
    for (_, jump) in JUMPS {
        if !saved.lines().any(|l| l.trim() == jump) {
            lines.push(jump.to_string());
        }
    }
    lines.push("COMMIT".into());
    let mut input = lines.join("\n");
    input.push('\n');
    (input, lines)
}

/// The rule on the line `iptables-restore` says failed ("Error occurred at line: N",
/// or "line N failed").
pub fn failed_rule<'a>(stderr: &str, lines: &'a [String]) -> Option<&'a str> {
    let after = &stderr[stderr.find("line")? + "line".len()..];
    let digits: String = after
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let n: usize = digits.parse().ok()?;
    lines.get(n.checked_sub(1)?).map(String::as_str)
}

/// Our rules as `iptables-save` shows them (the chains' own lines and the jumps), to
/// print what is installed.
pub fn installed(saved: &str) -> Vec<&str> {
    saved
        .lines()
        .filter(|l| {
            CHAINS.iter().any(|c| {
                l.starts_with(&format!("-A {c} "))
                    || l.starts_with(&format!(":{c} "))
                    || l.ends_with(&format!("-j {c}"))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            inbound_port: 4143,
            outbound_port: 4140,
            admin_port: 4191,
            proxy_uid: 2102,
            skip_inbound_ports: vec![22, 9090],
            skip_outbound_ports: vec![5432],
            skip_outbound_cidrs: vec!["10.96.0.1/32".parse().unwrap(), "fd00::/8".parse().unwrap()],
        }
    }

    #[test]
    fn rules_redirect_all_but_what_is_skipped() {
        let v4 = rules(&settings(), Family::V4);
        let text = v4.join("\n");
        assert!(
            text.contains("-A TANDEM_INBOUND -p tcp -m multiport --dports 22,4191,9090 -j RETURN")
        );
        assert!(text.contains("-A TANDEM_INBOUND_REDIRECT -p tcp -j REDIRECT --to-ports 4143"));
        assert!(text.contains("-A TANDEM_OUTPUT -m owner --uid-owner 2102 -j RETURN"));
        assert!(text.contains("-A TANDEM_OUTPUT -d 127.0.0.0/8 -j RETURN"));
        assert!(text.contains("-A TANDEM_OUTPUT -p tcp -m multiport --dports 5432 -j RETURN"));
        assert!(text.contains("-A TANDEM_OUTPUT -d 10.96.0.1/32 -j RETURN"));
        assert!(!text.contains("fd00"), "IPv6 CIDRs stay out of IPv4 rules");
        assert!(
            v4.last().unwrap().ends_with("-j TANDEM_OUTPUT_REDIRECT"),
            "the catch-all is last"
        );
        let v6 = rules(&settings(), Family::V6).join("\n");
        assert!(v6.contains("-d ::1/128") && v6.contains("-d fd00::/8") && !v6.contains("10.96"));
    }

    #[test]
    fn jumps_are_added_once() {
        let (first, _) = restore_input(
            &settings(),
            Family::V4,
            "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n",
        );
        assert!(first.contains("-A PREROUTING -p tcp -j TANDEM_INBOUND"));
        let saved = "*nat\n-A PREROUTING -p tcp -j TANDEM_INBOUND\n-A OUTPUT -p tcp -j TANDEM_OUTPUT\nCOMMIT\n";
        let (again, _) = restore_input(&settings(), Family::V4, saved);
        assert!(!again.contains("-A PREROUTING"), "already there: {again}");
        assert!(
            again.contains(":TANDEM_OUTPUT - [0:0]"),
            "our chains are emptied and refilled"
        );
    }

    #[test]
    fn a_failure_names_its_rule() {
        let (_, lines) = restore_input(&settings(), Family::V4, "");
        let rule = failed_rule("iptables-restore v1.8.9 (nf_tables): line 9 failed", &lines);
        assert_eq!(rule, Some(lines[8].as_str()));
        let rule = failed_rule(
            "Bad value\nError occurred at line: 10\nTry `iptables-restore -h'",
            &lines,
        );
        assert_eq!(rule, Some(lines[9].as_str()));
        assert_eq!(failed_rule("something else", &lines), None);
    }

    #[test]
    fn cidrs_parse_and_refuse_nonsense() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "10.0.0.1".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("web".parse::<Cidr>().is_err());
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().bits, 8);
    }

    #[test]
    fn many_ports_take_several_rules() {
        let mut s = settings();
        s.skip_outbound_ports = (1000..1020).collect();
        let n = rules(&s, Family::V4)
            .iter()
            .filter(|r| r.starts_with("-A TANDEM_OUTPUT -p tcp -m multiport"))
            .count();
        assert_eq!(n, 2, "multiport takes at most 15 ports");
    }
}
