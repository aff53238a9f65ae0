//! The webhook's serving certificate, and the `caBundle` that makes the API server
//! trust it, with no manual step.
//!
//! One Secret (`tandem-webhook-tls` in the control plane's namespace, in
//! cert-manager's layout: `tls.crt`, `tls.key`, `ca.crt`, plus our `ca.key`) is
//! served by every replica. The first replica to find it missing makes a CA and a
//! serving certificate for `<service>.<namespace>.svc` (and the names of
//! `--webhook-cert-san`) and `create`s it; a create that loses the race (409) reads
//! the winner's. A serving certificate near its end, or missing a name this replica
//! was asked for, is issued again from the same CA (an `update` that loses its race
//! reads the winner's), so the `caBundle` changes only with the CA. Every
//! [`SYNC_EVERY`] each replica reads the Secret again (serving what it holds) and
//! sets the `caBundle` of every webhook in the MutatingWebhookConfiguration
//! (`--webhook-config-name`) to the CA, if it differs: at start, after a
//! re-install that emptied it, after a rotation. A Secret made by someone else
//! (without our annotations, such as cert-manager's) is served as it is.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::json;

use crate::objects::create_or_get;

/// How often each replica reads the Secret and the webhook configuration again…
pub const SYNC_EVERY: Duration = Duration::from_secs(10);
/// …or, while something is missing or wrong, tries again.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// The Secret's name.
pub const SECRET: &str = "tandem-webhook-tls";
const FIELD_MANAGER: &str = "tandem-control-plane";
/// Annotations on Secrets we made: the names the certificate is for, and the last
/// day of the serving certificate and of the CA (`YYYY-MM-DD`).
const NAMES: &str = "tandem.io/webhook-names";
const NOT_AFTER: &str = "tandem.io/not-after";
const CA_NOT_AFTER: &str = "tandem.io/ca-not-after";
const CA_NAME: &str = "tandem-webhook-ca";
/// Lifetimes, and when to issue again (days).
const LEAF_DAYS: i64 = 365;
const CA_DAYS: i64 = 3650;
const RENEW_BEFORE_DAYS: i64 = 30;

#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Where the Secret lives (the control plane's namespace).
    pub namespace: String,
    /// The webhook's Service: the certificate is for `<service>.<namespace>.svc`.
    pub service: String,
    /// More names or IP addresses for the certificate.
    pub extra_names: Vec<String>,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept.
    pub config_name: String,
}

impl TlsSettings {
    /// The names the serving certificate must carry.
    pub fn names(&self) -> Vec<String> {
        let svc = &self.service;
        let ns = &self.namespace;
        let mut names = vec![
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
            format!("{svc}.{ns}"),
        ];
        for n in &self.extra_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }
}

/// The certificate the webhook serves (none until the Secret is read), swapped in
/// place as it changes: connections already open keep theirs.
#[derive(Debug, Default)]
pub struct CertStore {
    current: ArcSwapOption<CertifiedKey>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }
}

impl CertStore {
    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// The chain served now (leaf first).
    pub fn chain(&self) -> Option<Vec<CertificateDer<'static>>> {
        self.current.load().as_ref().map(|k| k.cert.clone())
    }

    /// Serves this certificate chain and key (PEM).
    pub fn load(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("tls.crt: {e}"))?;
        if chain.is_empty() {
            return Err("tls.crt holds no certificate".into());
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key: {e}"))?;
        self.set(chain, &key).map_err(|e| format!("tls.key: {e}"))
    }

    /// Serves this certificate chain (leaf first) and key.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'_>,
    ) -> Result<(), String> {
        let key = rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| e.to_string())?;
        self.current
            .store(Some(Arc::new(CertifiedKey::new(chain, key))));
        Ok(())
    }
}

/// What the Secret holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    pub ca_key_pem: Option<String>,
    /// Ours: names and last days; `None` for a Secret someone else made.
    pub names: Option<Vec<String>>,
    pub not_after: Option<i64>,
    pub ca_not_after: Option<i64>,
}

/// Days since 1970-01-01.
fn today() -> i64 {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    (secs / 86_400) as i64
}

/// Days since 1970-01-01 as (year, month, day) (H. Hinnant's `civil_from_days`).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y as i32, m as u8, d as u8)
}

fn date(days: i64) -> String {
    let (y, m, d) = civil(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD` back to days since 1970-01-01.
fn parse_date(s: &str) -> Option<i64> {
    let mut parts = s.trim().splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let d: i64 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // H. Hinnant's `days_from_civil`.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Valid from yesterday for `days` (whole days: the clocks of the machines that
/// check it may be a little behind).
pub(crate) fn validity(params: &mut CertificateParams, days: i64) {
    let (y, m, d) = civil(today() - 1);
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil(today() + days);
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn leaf(names: &[String], issuer: &Issuer<'_, KeyPair>) -> Result<(String, String), rcgen::Error> {
    let mut params = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].clone());
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Material {
    /// A new CA and a serving certificate for `names`.
    pub fn generate(names: &[String]) -> Result<Self, rcgen::Error> {
        let ca_key = KeyPair::generate()?;
        let mut params = ca_params();
        validity(&mut params, CA_DAYS);
        let ca_cert = params.self_signed(&ca_key)?;
        let ca_key_pem = ca_key.serialize_pem();
        let issuer = Issuer::new(params, ca_key);
        let (cert_pem, key_pem) = leaf(names, &issuer)?;
        Ok(Self {
            cert_pem,
            key_pem,
            ca_pem: ca_cert.pem(),
            ca_key_pem: Some(ca_key_pem),
            names: Some(names.to_vec()),
            not_after: Some(today() + LEAF_DAYS),
            ca_not_after: Some(today() + CA_DAYS),
        })
    }

    /// What must change for these names, today: `None` when nothing.
    fn renewed(&self, wanted: &[String]) -> Result<Option<Self>, rcgen::Error> {
        let Some(names) = &self.names else {
            return Ok(None); // Not ours: served as it is.
        };
        let missing = wanted.iter().any(|n| !names.contains(n));
        let leaf_due = self
            .not_after
            .is_none_or(|d| d - today() < RENEW_BEFORE_DAYS);
        let ca_due = self
            .ca_not_after
            .is_none_or(|d| d - today() < RENEW_BEFORE_DAYS * 4);
        if !(missing || leaf_due || ca_due) {
            return Ok(None);
        }
        // Names only grow: replicas asked for different names converge.
        let mut all = names.clone();
        all.extend(wanted.iter().filter(|n| !names.contains(n)).cloned());
        let ca_key = self
            .ca_key_pem
            .as_deref()
            .and_then(|k| KeyPair::from_pem(k).ok());
        match ca_key {
            Some(ca_key) if !ca_due => {
                let (cert_pem, key_pem) = leaf(&all, &Issuer::new(ca_params(), ca_key))?;
                Ok(Some(Self {
                    cert_pem,
                    key_pem,
                    names: Some(all),
                    not_after: Some(today() + LEAF_DAYS),
                    ..self.clone()
                }))
            }
            _ => Self::generate(&all).map(Some),
        }
    }

    fn from_secret(secret: &Secret) -> Result<Self, String> {
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &str| -> Result<String, String> {
            let bytes = data.get(key).ok_or_else(|| format!("no {key}"))?;
            String::from_utf8(bytes.0.clone()).map_err(|_| format!("{key} is not PEM"))
        };
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        Ok(Self {
            cert_pem: text("tls.crt")?,
            key_pem: text("tls.key")?,
            ca_pem: text("ca.crt")?,
            ca_key_pem: text("ca.key").ok(),
            names: annotations
                .get(NAMES)
                .map(|n| n.split(',').map(str::to_string).collect()),
            not_after: annotations.get(NOT_AFTER).and_then(|d| parse_date(d)),
            ca_not_after: annotations.get(CA_NOT_AFTER).and_then(|d| parse_date(d)),
        })
    }

    fn to_secret(&self, namespace: &str, resource_version: Option<String>) -> Secret {
        let mut data = BTreeMap::new();
        data.insert(
            "tls.crt".to_string(),
            ByteString(self.cert_pem.clone().into_bytes()),
        );
        data.insert(
            "tls.key".to_string(),
            ByteString(self.key_pem.clone().into_bytes()),
        );
        data.insert(
            "ca.crt".to_string(),
            ByteString(self.ca_pem.clone().into_bytes()),
        );
        if let Some(k) = &self.ca_key_pem {
            data.insert("ca.key".to_string(), ByteString(k.clone().into_bytes()));
        }
        let mut annotations = BTreeMap::new();
        if let Some(names) = &self.names {
            annotations.insert(NAMES.to_string(), names.join(","));
        }
        if let Some(d) = self.not_after {
            annotations.insert(NOT_AFTER.to_string(), date(d));
        }
        if let Some(d) = self.ca_not_after {
            annotations.insert(CA_NOT_AFTER.to_string(), date(d));
        }
        let mut secret: Secret = serde_json::from_value(json!({
            "metadata": {
                "name": SECRET,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/name": "tandem-control-plane", "app.kubernetes.io/part-of": "tandem"},
                "annotations": annotations,
            },
            "type": "kubernetes.io/tls",
        }))
        .expect("a Secret");
        secret.metadata.resource_version = resource_version;
        secret.data = Some(data);
        secret
    }
}

/// Reads (or makes) the Secret; renews what is due. Returns what to serve.
pub async fn ensure_secret(client: &Client, settings: &TlsSettings) -> Result<Material, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let names = settings.names();
    let at = format!("Secret {}/{SECRET}", settings.namespace);
    let existing = api
        .get_opt(SECRET)
        .await
        .map_err(|e| format!("cannot read {at}: {e}"))?;
    let Some(secret) = existing else {
        let material =
            Material::generate(&names).map_err(|e| format!("cannot make a certificate: {e}"))?;
        let new = material.to_secret(&settings.namespace, None);
        let (secret, made) = create_or_get(&api, SECRET, &new, &at).await?;
        if made {
            tracing::info!(secret = %at, names = %names.join(","), "made the webhook's certificate");
            return Ok(material);
        }
        // Another replica made it first: serve theirs.
        return Material::from_secret(&secret).map_err(|e| format!("{at}: {e}"));
    };
    let current = match Material::from_secret(&secret) {
        Ok(m) => m,
        // Unusable: replace it, only if it is ours to replace (it carries our names).
        Err(e)
            if secret
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(NAMES)) =>
        {
            tracing::warn!(secret = %at, "replacing an unusable webhook certificate: {e}");
            Material {
                cert_pem: String::new(),
                key_pem: String::new(),
                ca_pem: String::new(),
                ca_key_pem: None,
                names: Some(names.clone()),
                not_after: None,
                ca_not_after: None,
            }
        }
        Err(e) => return Err(format!("{at}: {e}")),
    };
    let renewed = current
        .renewed(&names)
        .map_err(|e| format!("cannot make a certificate: {e}"))?;
    let Some(renewed) = renewed else {
        return Ok(current);
    };
    let update = renewed.to_secret(
        &settings.namespace,
        secret.metadata.resource_version.clone(),
    );
    match api.replace(SECRET, &PostParams::default(), &update).await {
        Ok(_) => {
            tracing::info!(secret = %at, names = %renewed.names.clone().unwrap_or_default().join(","), "issued the webhook's certificate again");
            Ok(renewed)
        }
        // Another replica changed it meanwhile: serve what is there now; the next
        // round looks again.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api
                .get(SECRET)
                .await
                .map_err(|e| format!("cannot read {at}: {e}"))?;
            Material::from_secret(&secret).map_err(|e| format!("{at}: {e}"))
        }
        Err(e) => Err(format!("cannot update {at}: {e}")),
    }
}

/// Sets the `caBundle` of every webhook of the configuration to `ca_pem`, where it
/// differs. `Ok(false)`: there is no such configuration (yet).
pub async fn sync_ca_bundle(client: &Client, name: &str, ca_pem: &str) -> Result<bool, String> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let at = format!("MutatingWebhookConfiguration {name}");
    let Some(config) = api
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read {at}: {e}"))?
    else {
        return Ok(false);
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let mut ops = vec![json!({"op": "test", "path": "/metadata/resourceVersion",
                               "value": config.metadata.resource_version})];
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            != Some(ca_pem.as_bytes())
        {
            ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": encoded}));
        }
    }
    if ops.len() == 1 {
        return Ok(true);
    }
    let patch: json_patch::Patch = serde_json::from_value(json!(ops)).expect("a JSON patch");
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    match api.patch(name, &params, &Patch::Json::<()>(patch)).await {
        Ok(_) => {
            tracing::info!(config = %name, "set the webhook configuration's caBundle");
            Ok(true)
        }
        // Changed since it was read (the `test` failed): the next round.
        Err(kube::Error::Api(status)) if status.code == 409 || status.code == 422 => Ok(true),
        Err(e) => Err(format!("cannot patch the caBundle of {at}: {e}")),
    }
}

/// Keeps the served certificate and the `caBundle` current, forever.
pub async fn maintain(client: Client, settings: TlsSettings, store: Arc<CertStore>) {
    let mut said: Option<String> = None;
    let mut served: Option<Material> = None;
    let mut missing_config_said = false;
    loop {
        let round = async {
            let material = ensure_secret(&client, &settings).await?;
            if served.as_ref() != Some(&material) {
                store
                    .load(material.cert_pem.as_bytes(), material.key_pem.as_bytes())
                    .map_err(|e| format!("Secret {}/{SECRET}: {e}", settings.namespace))?;
                served = Some(material.clone());
            }
            sync_ca_bundle(&client, &settings.config_name, &material.ca_pem).await
        };
        let outcome = round.await;
        let settled = matches!(outcome, Ok(true));
        match outcome {
            Ok(found) => {
                if said.take().is_some() {
                    tracing::info!("the webhook's certificate and caBundle are in order again");
                }
                if !found && !missing_config_said {
                    tracing::info!(config = %settings.config_name, "no MutatingWebhookConfiguration of that name yet: its caBundle is set once it exists");
                }
                missing_config_said = !found;
            }
            Err(e) => {
                // Said once per distinct problem, however many retries.
                if said.as_deref() != Some(e.as_str()) {
                    tracing::warn!("webhook certificate: {e}; trying again every {RETRY_EVERY:?}");
                    said = Some(e);
                }
            }
        }
        tokio::time::sleep(if settled { SYNC_EVERY } else { RETRY_EVERY }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn dates_round_trip() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(date(19_723), "2024-01-01");
        for d in [0, 59, 60, 365, 11_016, 19_723, 20_000, 30_000] {
            assert_eq!(parse_date(&date(d)), Some(d));
        }
        assert_eq!(parse_date("2024-13-01"), None);
        assert_eq!(parse_date("soon"), None);
    }

    #[test]
    fn a_generated_certificate_is_served_and_renewed_from_its_ca() {
        let names = vec!["tandem-webhook.ns.svc".to_string(), "127.0.0.1".to_string()];
        let m = Material::generate(&names).unwrap();
        let store = CertStore::default();
        store
            .load(m.cert_pem.as_bytes(), m.key_pem.as_bytes())
            .unwrap();
        assert!(store.is_loaded());
        // Nothing due.
        assert_eq!(m.renewed(&names).unwrap(), None);
        // A name more: the same CA, a new serving certificate with both.
        let more = vec!["other.example".to_string()];
        let r = m.renewed(&more).unwrap().expect("renewed");
        assert_eq!(r.ca_pem, m.ca_pem);
        assert_ne!(r.cert_pem, m.cert_pem);
        assert_eq!(r.names.as_ref().unwrap().len(), 3);
        // Near its end: renewed.
        let old = Material {
            not_after: Some(today() + 3),
            ..m.clone()
        };
        assert!(old.renewed(&names).unwrap().is_some());
        // Someone else's: left alone.
        let foreign = Material {
            names: None,
            not_after: None,
            ..m.clone()
        };
        assert_eq!(foreign.renewed(&more).unwrap(), None);
        // The Secret round trip.
        let back = Material::from_secret(&m.to_secret("ns", None)).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn the_serving_certificate_chains_to_the_ca() {
        let names = vec!["127.0.0.1".to_string()];
        let m = Material::generate(&names).unwrap();
        let r = m.renewed(&["localhost".to_string()]).unwrap().unwrap();
        for material in [&m, &r] {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(material.ca_pem.as_bytes()) {
                roots.add(ca.unwrap()).unwrap();
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap();
            let leaf = CertificateDer::from_pem_slice(material.cert_pem.as_bytes()).unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &name, &[], rustls::pki_types::UnixTime::now())
                .expect("the CA vouches for the serving certificate");
        }
    }
}
