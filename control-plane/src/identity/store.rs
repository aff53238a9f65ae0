//! The issuer Secret and the trust roots ConfigMap, kept and followed.
//!
//! Both live in the control plane's namespace. Every `--identity-refresh` each replica
//! reads them again:
//! - the Secret (`tandem-identity-issuer`) absent: a self-signed root and an issuer
//!   are made and `create`d; a create that loses the race with another replica (409)
//!   reads the winner's. The log says production clusters should bring their own. A
//!   Secret Tandem made (its annotation says so) has its issuer issued again from the
//!   root it keeps, a month before it ends.
//! - the ConfigMap (`tandem-trust-roots`, key `ca-bundle.crt`) absent: made from the
//!   Secret's `ca.crt`. A root this replica has just made is added to an existing
//!   bundle, so a Secret deleted to start over does not leave an untrusted issuer.
//! - anything changed: the new pair is checked ([`Authority::new`]) and served. An
//!   unusable change is logged with its reason and the last good pair goes on
//!   serving; if only one of the two changed objects is at fault, the other one's
//!   change is taken alone (a root added to the bundle is served even while the
//!   Secret is being fixed).
//!
//! What is served is published on a `watch` channel ([`Current`]): Certify, the
//! serving certificate and the trust roots' copies all follow it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use super::authority::Authority;
use super::material::{self, Generated, IssuerMaterial, TrustRoots, not_after, now, when};
use super::{BUNDLE_KEY, SECRET, TRUST_ROOTS};
use crate::metrics::Metrics;
use crate::objects::create_or_get;

/// What Certify signs with, once there is something usable.
pub type Current = watch::Receiver<Option<Arc<Authority>>>;

/// On Secrets Tandem made: they keep the root's key (`ca.key`) and may be renewed.
const GENERATED: &str = "tandem.io/identity-issuer";
/// A generated issuer is issued again this long before it ends.
const RENEW_BEFORE: i64 = 30 * 86_400;

#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// The control plane's namespace.
    pub namespace: String,
    pub trust_domain: String,
    pub refresh: Duration,
}

/// The Secret's texts (what an authority is made from).
#[derive(Clone, PartialEq, Eq)]
struct SecretTexts {
    tls_crt: Option<String>,
    tls_key: Option<String>,
    ca_crt: Option<String>,
    generated: bool,
}

/// The Secret and the bundle, as last read.
type Pair = (SecretTexts, String);

pub struct Store {
    client: Client,
    settings: StoreSettings,
    tx: watch::Sender<Option<Arc<Authority>>>,
    metrics: Arc<Metrics>,
    /// The last pair served, and what was last said about one that is not usable.
    good: Option<Pair>,
    problem: Option<String>,
    /// A generated issuer is pointed out once per process.
    said_generated: bool,
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

impl SecretTexts {
    fn of(secret: &Secret) -> Self {
        let data = secret.data.clone().unwrap_or_default();
        Self {
            tls_crt: text(&data, "tls.crt"),
            tls_key: text(&data, "tls.key"),
            ca_crt: text(&data, "ca.crt"),
            generated: secret
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.get(GENERATED).is_some_and(|v| v == "generated")),
        }
    }
}

/// The authority of a pair, or why not (naming the object at fault).
fn build(secret: &SecretTexts, bundle: &str, namespace: &str) -> Result<Authority, String> {
    let at = format!("Secret {namespace}/{SECRET}");
    let (Some(crt), Some(key)) = (&secret.tls_crt, &secret.tls_key) else {
        return Err(format!(
            "{at} has no tls.crt or no tls.key (cert-manager's layout: tls.crt, tls.key, ca.crt)"
        ));
    };
    let issuer = IssuerMaterial::parse(crt, key, secret.ca_crt.as_deref())
        .map_err(|e| format!("{at}: {e}"))?;
    let roots = TrustRoots::parse(bundle)
        .map_err(|e| format!("ConfigMap {namespace}/{TRUST_ROOTS} ({BUNDLE_KEY}): {e}"))?;
    Authority::new(issuer, roots).map_err(|e| {
        format!("{at} and ConfigMap {namespace}/{TRUST_ROOTS} do not go together: {e}")
    })
}

impl Store {
    pub fn new(client: Client, settings: StoreSettings, metrics: Arc<Metrics>) -> (Self, Current) {
        let (tx, rx) = watch::channel(None);
        let store = Self {
            client,
            settings,
            tx,
            metrics,
            good: None,
            problem: None,
            said_generated: false,
        };
        (store, rx)
    }

    /// Reads, makes and follows the two objects, forever.
    pub async fn run(mut self) {
        let mut said: Option<String> = None;
        loop {
            match self.round().await {
                Ok(()) => {
                    if said.take().is_some() {
                        tracing::info!(
                            "identity: the issuer Secret and trust roots can be read again"
                        );
                    }
                }
                Err(e) => {
                    // Once per distinct problem, however many rounds it lasts.
                    if said.as_deref() != Some(e.as_str()) {
                        let serving = if self.tx.borrow().is_some() {
                            "the last good issuer and trust roots keep serving"
                        } else {
                            "no certificate can be issued until this is fixed"
                        };
                        tracing::warn!(
                            "identity: {e}; {serving}; trying again every {:?}",
                            self.settings.refresh
                        );
                        said = Some(e);
                    }
                }
            }
            tokio::time::sleep(self.settings.refresh).await;
        }
    }

    async fn round(&mut self) -> Result<(), String> {
        let (secret, made) = self.secret().await?;
        let bundle = self.bundle(&secret, made).await?;
        let pair = (secret, bundle);
        if self.good.as_ref() == Some(&pair) {
            self.problem = None;
            return Ok(());
        }
        // Changed, or changed earlier and not (all) usable: looked at again each round,
        // since time alone can make it usable (a certificate whose start is a little
        // ahead of this replica's clock), and said again only if the reason changes.
        if let Some(problem) = self.accept(pair)
            && self.problem.as_deref() != Some(problem.as_str())
        {
            tracing::warn!("identity: {problem}");
            self.problem = Some(problem);
        }
        Ok(())
    }

    /// Serves the newest usable pair of what was read; says what was not usable.
    fn accept(&mut self, (secret, bundle): Pair) -> Option<String> {
        let ns = self.settings.namespace.clone();
        let mut candidates = vec![(secret.clone(), bundle.clone())];
        if let Some((good_secret, good_bundle)) = &self.good {
            // One of the two changes alone, if both together do not work.
            candidates.push((secret.clone(), good_bundle.clone()));
            candidates.push((good_secret.clone(), bundle.clone()));
            candidates.retain(|c| Some(c) != self.good.as_ref());
            candidates.dedup();
        }
        let mut first_error = None;
        for candidate in candidates {
            match build(&candidate.0, &candidate.1, &ns) {
                Ok(authority) => {
                    let whole = candidate == (secret.clone(), bundle.clone());
                    self.serve(candidate, authority);
                    return first_error.filter(|_| !whole).map(|e| {
                        format!(
                            "{e}; serving what of the change is usable, with the last good rest"
                        )
                    });
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let serving = if self.good.is_some() {
            "the last good issuer and trust roots keep serving"
        } else {
            "no certificate can be issued until this is fixed"
        };
        first_error.map(|e| format!("{e}; {serving}"))
    }

    fn serve(&mut self, pair: Pair, authority: Authority) {
        let issuer_changed = self.good.as_ref().is_none_or(|g| g.0 != pair.0);
        let roots_changed = self.good.as_ref().is_none_or(|g| g.1 != pair.1);
        if issuer_changed || roots_changed {
            tracing::info!(
                issuer = %authority.issuer.subject,
                issuer_until = %when(authority.issuer.not_after),
                roots = %authority.roots.subjects.join("; "),
                "identity: {}",
                match (issuer_changed, roots_changed) {
                    (true, true) => "serving the issuer and trust roots",
                    (true, false) => "serving a new issuer",
                    _ => "serving new trust roots",
                }
            );
        }
        if pair.0.generated && !self.said_generated {
            self.said_generated = true;
            tracing::warn!(
                "identity: the issuer is the self-signed one Tandem made (Secret {}/{SECRET}); production clusters should bring their own issuer, for example from cert-manager, in that Secret (tls.crt, tls.key, ca.crt) and its root in ConfigMap {}/{TRUST_ROOTS}",
                self.settings.namespace,
                self.settings.namespace
            );
        }
        self.metrics
            .issuer_not_after
            .set(authority.issuer.not_after);
        self.good = Some(pair);
        self.tx.send_replace(Some(Arc::new(authority)));
    }

    /// The Secret's texts (made if absent, renewed if ours and due), and whether
    /// this round made it.
    async fn secret(&mut self) -> Result<(SecretTexts, bool), String> {
        let ns = &self.settings.namespace;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let at = format!("Secret {ns}/{SECRET}");
        let read = |e: kube::Error| format!("cannot read {at}: {e}");
        let Some(secret) = api.get_opt(SECRET).await.map_err(read)? else {
            let generated = material::generate(&self.settings.trust_domain)
                .map_err(|e| format!("cannot make a root and issuer: {e}"))?;
            let object = to_secret(ns, &generated, None);
            let (secret, made) = create_or_get(&api, SECRET, &object, &at).await?;
            if made {
                tracing::warn!(
                    secret = %at,
                    "identity: no issuer Secret: made a self-signed root (10 years) and an issuer under it (1 year); production clusters should bring their own issuer, for example from cert-manager (tls.crt, tls.key, ca.crt in this Secret)"
                );
            }
            return Ok((SecretTexts::of(&secret), made));
        };
        let texts = SecretTexts::of(&secret);
        let data = secret.data.clone().unwrap_or_default();
        let due = texts.generated
            && texts
                .tls_crt
                .as_deref()
                .and_then(not_after)
                .is_some_and(|end| end - now() < RENEW_BEFORE);
        let (Some(ca_crt), Some(ca_key), true) = (&texts.ca_crt, text(&data, "ca.key"), due) else {
            return Ok((texts, false));
        };
        if not_after(ca_crt).is_some_and(|end| end - now() < RENEW_BEFORE) {
            // A new root is a rotation the cluster's owner runs (see the README).
            return Err(format!(
                "{at}: the issuer and its root both end soon (root: {}); rotate the root",
                not_after(ca_crt).map(when).unwrap_or_default()
            ));
        }
        let renewed = material::renew_issuer(ca_crt, &ca_key, &self.settings.trust_domain)
            .map_err(|e| format!("{at}: cannot issue the issuer again: {e}"))?;
        let object = to_secret(ns, &renewed, secret.metadata.resource_version.clone());
        match api.replace(SECRET, &PostParams::default(), &object).await {
            Ok(replaced) => {
                tracing::info!(secret = %at, "identity: issued the issuer again, under the same root");
                Ok((SecretTexts::of(&replaced), false))
            }
            // Another replica renewed it meanwhile: the next round reads theirs.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok((texts, false)),
            Err(e) => Err(format!("cannot update {at}: {e}")),
        }
    }

    /// The bundle (the ConfigMap made from the Secret's `ca.crt` if absent).
    async fn bundle(&self, secret: &SecretTexts, made: bool) -> Result<String, String> {
        let ns = &self.settings.namespace;
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let at = format!("ConfigMap {ns}/{TRUST_ROOTS}");
        let read = |e: kube::Error| format!("cannot read {at}: {e}");
        let Some(existing) = api.get_opt(TRUST_ROOTS).await.map_err(read)? else {
            let Some(ca) = &secret.ca_crt else {
                return Err(format!(
                    "{at} is missing and Secret {ns}/{SECRET} has no ca.crt to make it from: create it with the mesh's root certificates (PEM) under {BUNDLE_KEY}"
                ));
            };
            let object = to_config_map(ns, TRUST_ROOTS, ca, None, false);
            let (roots, made) = create_or_get(&api, TRUST_ROOTS, &object, &at).await?;
            if made {
                tracing::info!(config_map = %at, "identity: made the trust roots from the issuer Secret's ca.crt");
            }
            return Ok(bundle_of(&roots));
        };
        let bundle = bundle_of(&existing);
        let Some(ca) = secret.ca_crt.as_deref().filter(|_| made) else {
            return Ok(bundle);
        };
        if TrustRoots::parse(&bundle).is_ok_and(|roots| roots.contains_all(ca)) {
            return Ok(bundle);
        }
        // A root made just now, next to roots already trusted: added, not replacing.
        let joined = format!("{}\n{}", bundle.trim_end(), ca);
        let mut object = existing.clone();
        object
            .data
            .get_or_insert_default()
            .insert(BUNDLE_KEY.to_string(), joined.clone());
        match api
            .replace(TRUST_ROOTS, &PostParams::default(), &object)
            .await
        {
            Ok(_) => {
                tracing::warn!(config_map = %at, "identity: added the root just made to the trust roots");
                Ok(joined)
            }
            Err(e) => Err(format!("cannot add the new root to {at}: {e}")),
        }
    }
}

/// `ca-bundle.crt` of a trust roots ConfigMap ("" if it has none: refused as such).
pub fn bundle_of(config_map: &ConfigMap) -> String {
    config_map
        .data
        .as_ref()
        .and_then(|d| d.get(BUNDLE_KEY))
        .cloned()
        .unwrap_or_default()
}

fn labels() -> serde_json::Value {
    json!({"app.kubernetes.io/name": "tandem-control-plane", "app.kubernetes.io/part-of": "tandem"})
}

fn to_secret(namespace: &str, g: &Generated, resource_version: Option<String>) -> Secret {
    let mut secret: Secret = serde_json::from_value(json!({
        "metadata": {
            "name": SECRET,
            "namespace": namespace,
            "labels": labels(),
            "annotations": {GENERATED: "generated"},
        },
        "type": "kubernetes.io/tls",
    }))
    .expect("a Secret");
    secret.metadata.resource_version = resource_version;
    let data = [
        ("tls.crt", &g.tls_crt),
        ("tls.key", &g.tls_key),
        ("ca.crt", &g.ca_crt),
        ("ca.key", &g.ca_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
    .collect();
    secret.data = Some(data);
    secret
}

/// A trust roots ConfigMap; `copy`: one of the copies Tandem keeps in other
/// namespaces (labelled as managed by it).
pub fn to_config_map(
    namespace: &str,
    name: &str,
    bundle: &str,
    resource_version: Option<String>,
    copy: bool,
) -> ConfigMap {
    let mut labels = labels();
    if copy {
        labels["app.kubernetes.io/managed-by"] = json!(super::copies::MANAGED_BY);
    }
    let mut object: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "data": {BUNDLE_KEY: bundle},
    }))
    .expect("a ConfigMap");
    object.metadata.resource_version = resource_version;
    object
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::material::IssuerMaterial;

    fn texts(g: &Generated) -> SecretTexts {
        SecretTexts::of(&to_secret("ns", g, None))
    }

    #[test]
    fn a_generated_secret_reads_back() {
        let g = material::generate("td").unwrap();
        let t = texts(&g);
        assert!(t.generated);
        assert_eq!(t.tls_crt.as_deref(), Some(g.tls_crt.as_str()));
        let secret = to_secret("ns", &g, None);
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        build(&t, &g.ca_crt, "ns").unwrap();
    }

    #[test]
    fn what_does_not_build_names_the_object() {
        let (a, b) = (
            material::generate("td").unwrap(),
            material::generate("td").unwrap(),
        );
        let mut missing = texts(&a);
        missing.tls_key = None;
        assert!(
            build(&missing, &a.ca_crt, "ns")
                .unwrap_err()
                .starts_with("Secret ns/tandem-identity-issuer has no tls.crt or no tls.key")
        );
        assert!(
            build(&texts(&a), "junk", "ns")
                .unwrap_err()
                .starts_with("ConfigMap ns/tandem-trust-roots (ca-bundle.crt): ")
        );
        let e = build(&texts(&b), &a.ca_crt, "ns").unwrap_err();
        assert!(
            e.contains("do not go together")
                && e.contains("does not verify against the trust roots"),
            "{e}"
        );
        let copy = to_config_map("apps", TRUST_ROOTS, &a.ca_crt, None, true);
        assert_eq!(bundle_of(&copy), a.ca_crt);
        assert_eq!(
            copy.metadata.labels.unwrap()["app.kubernetes.io/managed-by"],
            super::super::copies::MANAGED_BY
        );
    }

    /// A store whose client goes nowhere: `accept` never calls the API.
    fn store() -> (Store, Current) {
        let config = kube::Config::new("https://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let settings = StoreSettings {
            namespace: "ns".into(),
            trust_domain: "td".into(),
            refresh: Duration::from_secs(1),
        };
        Store::new(client, settings, Arc::new(Metrics::default()))
    }

    fn served(current: &Current) -> (String, usize) {
        let a = current.borrow().clone().expect("an authority");
        (a.issuer.subject.clone(), a.roots.certs.len())
    }

    #[tokio::test]
    async fn the_newest_usable_pair_is_served() {
        let (one, two) = (
            material::generate("one").unwrap(),
            material::generate("two").unwrap(),
        );
        let subject = |g: &Generated| {
            IssuerMaterial::parse(&g.tls_crt, &g.tls_key, None)
                .unwrap()
                .subject
        };
        let both = format!("{}{}", one.ca_crt, two.ca_crt);
        let (mut store, current) = store();
        // Nothing usable yet: nothing served, and said why.
        let said = store.accept((texts(&two), one.ca_crt.clone())).unwrap();
        assert!(
            said.contains("do not go together") && said.contains("no certificate can be issued"),
            "{said}"
        );
        assert!(current.borrow().is_none());
        assert_eq!(store.accept((texts(&one), one.ca_crt.clone())), None);
        assert_eq!(served(&current), (subject(&one), 1));
        // A new issuer before its root is trusted: refused, the old one serves.
        let said = store.accept((texts(&two), one.ca_crt.clone())).unwrap();
        assert!(
            said.contains("the last good issuer and trust roots keep serving"),
            "{said}"
        );
        assert_eq!(served(&current), (subject(&one), 1));
        // The rotation, step by step.
        assert_eq!(store.accept((texts(&one), both.clone())), None);
        assert_eq!(served(&current), (subject(&one), 2));
        assert_eq!(store.accept((texts(&two), both.clone())), None);
        assert_eq!(served(&current), (subject(&two), 2));
        assert_eq!(store.accept((texts(&two), two.ca_crt.clone())), None);
        assert_eq!(served(&current), (subject(&two), 1));
        // Both changed, the Secret broken: the bundle's change alone is taken.
        let mut broken = texts(&one);
        broken.tls_key = Some("junk".into());
        let said = store.accept((broken, both.clone())).unwrap();
        assert!(
            said.contains("tls.key") && said.contains("serving what of the change is usable"),
            "{said}"
        );
        assert_eq!(served(&current), (subject(&two), 2));
    }
}
