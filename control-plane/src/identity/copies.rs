//! The trust roots in every meshed namespace: a pod can only mount a ConfigMap of its
//! own namespace, so the served bundle is copied, as ConfigMap `tandem-trust-roots`
//! (key `ca-bundle.crt`, labelled as managed by Tandem), into every namespace labelled
//! `tandem.io/inject=enabled` (as istiod does with `istio-ca-root-cert`), and copies
//! already made (in a namespace whose pods were injected by their own annotation) are
//! kept equal too. Every `--identity-refresh`, and at once when the bundle changes:
//! one list of namespaces, one list of the copies, and writes only where they differ.
//! A ConfigMap of that name that Tandem did not make is left alone (and said once).
//! What is copied is the bundle being served (checked), never a broken edit.

use std::collections::{BTreeMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use super::store::{Current, bundle_of, to_config_map};
use super::{BUNDLE_KEY, TRUST_ROOTS};
use crate::injection::INJECT;

/// `app.kubernetes.io/managed-by` of the copies.
pub const MANAGED_BY: &str = "tandem-control-plane";
/// How long the webhook waits for a copy before answering anyway.
const ENSURE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Copies {
    client: Client,
    /// The control plane's namespace: the source, never a copy.
    source_namespace: String,
    current: Current,
    /// Namespaces where the webhook made sure of a copy of this bundle.
    ensured: Mutex<(String, HashSet<String>)>,
}

fn is_ours(config_map: &ConfigMap) -> bool {
    config_map
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("app.kubernetes.io/managed-by"))
        .is_some_and(|v| v == MANAGED_BY)
}

impl Copies {
    pub fn new(client: Client, source_namespace: String, current: Current) -> Self {
        Self {
            client,
            source_namespace,
            current,
            ensured: Mutex::default(),
        }
    }

    fn bundle(&self) -> Option<String> {
        self.current.borrow().as_ref().map(|a| a.roots.pem.clone())
    }

    /// Keeps the copies, forever.
    pub async fn run(&self, every: Duration) {
        let mut current = self.current.clone();
        let mut said: Option<String> = None;
        let mut foreign_said: HashSet<String> = HashSet::new();
        loop {
            if let Some(bundle) = self.bundle() {
                match self.sync(&bundle, &mut foreign_said).await {
                    Ok(()) => said = None,
                    Err(e) => {
                        if said.as_deref() != Some(e.as_str()) {
                            tracing::warn!(
                                "identity: trust roots copies: {e}; trying again every {every:?}"
                            );
                            said = Some(e);
                        }
                    }
                }
            }
            // The next round, or at once when the bundle changes (if the store is gone,
            // the process is stopping: rounds at the pace of `every` until then).
            if let Ok(Err(_)) = tokio::time::timeout(every, current.changed()).await {
                tokio::time::sleep(every).await;
            }
        }
    }

    /// One round over all namespaces.
    async fn sync(&self, bundle: &str, foreign_said: &mut HashSet<String>) -> Result<(), String> {
        let enabled = Api::<Namespace>::all(self.client.clone())
            .list_metadata(&ListParams::default().labels(&format!("{INJECT}=enabled")))
            .await
            .map_err(|e| format!("cannot list the namespaces labelled {INJECT}=enabled: {e}"))?;
        let copies: BTreeMap<String, ConfigMap> = Api::<ConfigMap>::all(self.client.clone())
            .list(&ListParams::default().fields(&format!("metadata.name={TRUST_ROOTS}")))
            .await
            .map_err(|e| format!("cannot list the ConfigMaps {TRUST_ROOTS}: {e}"))?
            .items
            .into_iter()
            .filter_map(|c| Some((c.metadata.namespace.clone()?, c)))
            .collect();
        let mut targets: Vec<String> = enabled
            .items
            .iter()
            .filter(|n| n.metadata.deletion_timestamp.is_none())
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let kept: Vec<String> = copies
            .iter()
            .filter(|(ns, c)| is_ours(c) && !targets.contains(ns))
            .map(|(ns, _)| ns.clone())
            .collect();
        targets.extend(kept);
        let mut failed = Vec::new();
        for ns in targets.iter().filter(|ns| **ns != self.source_namespace) {
            let result = match copies.get(ns) {
                None => self.create(ns, bundle).await,
                Some(existing) if !is_ours(existing) => {
                    if foreign_said.insert(ns.clone()) {
                        tracing::warn!(
                            namespace = %ns,
                            "identity: ConfigMap {ns}/{TRUST_ROOTS} was not made by Tandem: left alone (its pods trust what it says); delete it to have Tandem's copy"
                        );
                    }
                    Ok(())
                }
                Some(existing) if bundle_of(existing) == bundle => Ok(()),
                Some(existing) => self.update(existing, bundle).await,
            };
            if let Err(e) = result {
                failed.push(e);
            }
        }
        match failed.len() {
            0 => Ok(()),
            1 => Err(failed.remove(0)),
            n => Err(format!("{n} copies failed, the first: {}", failed[0])),
        }
    }

    async fn create(&self, namespace: &str, bundle: &str) -> Result<(), String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let object = to_config_map(namespace, TRUST_ROOTS, bundle, None, true);
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => {
                tracing::info!(namespace, "identity: copied the trust roots");
                Ok(())
            }
            // Made meanwhile (another replica, the webhook): the next round compares.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            // A namespace being deleted refuses new objects; it will be gone.
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("terminat") => Ok(()),
            Err(e) => Err(format!(
                "cannot create ConfigMap {namespace}/{TRUST_ROOTS}: {e}"
            )),
        }
    }

    async fn update(&self, existing: &ConfigMap, bundle: &str) -> Result<(), String> {
        let namespace = existing.metadata.namespace.clone().unwrap_or_default();
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &namespace);
        let mut object = existing.clone();
        object
            .data
            .get_or_insert_default()
            .insert(BUNDLE_KEY.to_string(), bundle.to_string());
        match api
            .replace(TRUST_ROOTS, &PostParams::default(), &object)
            .await
        {
            Ok(_) => {
                tracing::info!(namespace, "identity: updated the copy of the trust roots");
                Ok(())
            }
            // Changed meanwhile: the next round.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(format!(
                "cannot update ConfigMap {namespace}/{TRUST_ROOTS}: {e}"
            )),
        }
    }

    /// For the webhook, as it injects a pod: makes sure the pod's namespace has a
    /// copy (a namespace not labelled for injection, whose pod asked for it itself,
    /// has none until this). Bounded in time; a failure is logged, the pod injected
    /// all the same (its trust roots volume is optional, and the next round of
    /// [`Copies::run`] keeps the copy once it exists).
    pub async fn ensure(&self, namespace: &str) {
        if namespace.is_empty() || namespace == self.source_namespace {
            return;
        }
        let Some(bundle) = self.bundle() else {
            return;
        };
        {
            let ensured = self.ensured.lock().unwrap_or_else(|e| e.into_inner());
            if ensured.0 == bundle && ensured.1.contains(namespace) {
                return;
            }
        }
        match tokio::time::timeout(ENSURE_TIMEOUT, self.create(namespace, &bundle)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(
                    namespace,
                    "identity: cannot copy the trust roots for an injected pod: {e}"
                );
                return;
            }
            Err(_) => {
                tracing::warn!(
                    namespace,
                    "identity: copying the trust roots for an injected pod took over {ENSURE_TIMEOUT:?}"
                );
                return;
            }
        }
        let mut ensured = self.ensured.lock().unwrap_or_else(|e| e.into_inner());
        if ensured.0 != bundle {
            *ensured = (bundle, HashSet::new());
        }
        ensured.1.insert(namespace.to_string());
    }
}
