//! Workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! made from a ServiceAccount and read back from what a proxy asks for, strictly: an
//! identity that reads two ways would let one ServiceAccount's token name another.

use std::fmt;

use crate::model::is_dns_label;

/// The longest identity read (SPIFFE IDs are at most 2048 bytes).
pub const MAX_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

/// A trust domain as SPIFFE allows it: lowercase letters, digits, `.`, `-`, `_`.
pub fn check_trust_domain(trust_domain: &str) -> Result<(), String> {
    if trust_domain.is_empty() || trust_domain.len() > 255 {
        return Err("a trust domain is 1 to 255 characters".into());
    }
    if !trust_domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err("a trust domain has only lowercase letters, digits, '.', '-' and '_' (such as cluster.local)".into());
    }
    Ok(())
}

/// A DNS-1123 subdomain: what Kubernetes allows as a ServiceAccount name.
fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl WorkloadId {
    /// The identity of ServiceAccount `namespace/service_account` (checked: the names
    /// come from the API server, but the identity is only as good as its parts).
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, String> {
        if !is_dns_label(namespace) {
            return Err(format!("{namespace:?} is not a namespace name"));
        }
        if !is_subdomain(service_account) {
            return Err(format!("{service_account:?} is not a ServiceAccount name"));
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Reads an identity this control plane issues for: its trust domain, and exactly
    /// `/ns/<namespace>/sa/<service-account>`.
    pub fn parse(identity: &str, trust_domain: &str) -> Result<Self, String> {
        const FORM: &str = "spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount>";
        if identity.is_empty() {
            return Err(format!("no identity: expected {FORM}"));
        }
        if identity.len() > MAX_LEN {
            return Err(format!("the identity is longer than {MAX_LEN} bytes"));
        }
        let Some(rest) = identity.strip_prefix("spiffe://") else {
            return Err(format!("{identity:?} is not of the form {FORM}"));
        };
        let (domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        if domain != trust_domain {
            return Err(format!(
                "{identity:?} is in trust domain {domain:?}; this control plane issues for {trust_domain:?}"
            ));
        }
        let parts: Vec<&str> = path.split('/').collect();
        let [ns_key, namespace, sa_key, service_account] = parts[..] else {
            return Err(format!("{identity:?} is not of the form {FORM}"));
        };
        if ns_key != "ns" || sa_key != "sa" {
            return Err(format!("{identity:?} is not of the form {FORM}"));
        }
        Self::new(trust_domain, namespace, service_account)
            .map_err(|e| format!("{identity:?}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_and_read_back() {
        let id = WorkloadId::new("cluster.local", "shop", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(WorkloadId::parse(&id.to_string(), "cluster.local"), Ok(id));
        let dotted = WorkloadId::parse("spiffe://td/ns/a/sa/b.c-d", "td").unwrap();
        assert_eq!(dotted.service_account, "b.c-d");
    }

    #[test]
    fn anything_else_is_refused_with_a_reason() {
        for (identity, says) in [
            ("", "no identity"),
            ("http://cluster.local/ns/a/sa/b", "not of the form"),
            (
                "spiffe://other.domain/ns/a/sa/b",
                "trust domain \"other.domain\"",
            ),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "not of the form"),
            (
                "spiffe://cluster.local/ns/a/sa/",
                "not a ServiceAccount name",
            ),
            ("spiffe://cluster.local/ns//sa/b", "not a namespace name"),
            ("spiffe://cluster.local/ns/A/sa/b", "not a namespace name"),
            (
                "spiffe://cluster.local/ns/a/sa/b%2F",
                "not a ServiceAccount name",
            ),
            ("spiffe://cluster.local/sa/b/ns/a", "not of the form"),
            ("spiffe://cluster.local", "not of the form"),
            (
                "spiffe://cluster.local/ns/a/sa/-b",
                "not a ServiceAccount name",
            ),
        ] {
            let error = WorkloadId::parse(identity, "cluster.local").unwrap_err();
            assert!(error.contains(says), "{identity:?}: {error}");
        }
        let long = format!("spiffe://cluster.local/ns/a/sa/{}", "b".repeat(MAX_LEN));
        assert!(
            WorkloadId::parse(&long, "cluster.local")
                .unwrap_err()
                .contains("longer")
        );
    }

    #[test]
    fn trust_domains() {
        assert!(check_trust_domain("cluster.local").is_ok());
        assert!(check_trust_domain("prod_1-eu.example").is_ok());
        for bad in ["", "Cluster.local", "a/b", "a b", "ä"] {
            assert!(check_trust_domain(bad).is_err(), "{bad:?}");
        }
    }
}
