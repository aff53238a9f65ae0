//! What the control plane signs with and what proxies trust, read and checked:
//! - [`IssuerMaterial`]: the issuer Secret's `tls.crt` (the issuer's certificate,
//!   optionally followed by its chain), `tls.key` and `ca.crt` (cert-manager's layout);
//! - [`TrustRoots`]: the PEM bundle of the trust roots ConfigMap (several roots while
//!   one rotates);
//! - [`super::authority::Authority`]: the two together, accepted only if a certificate the issuer signs
//!   verifies against the roots the way a proxy verifies it, so a Secret or ConfigMap
//!   edited in the wrong order (a new issuer before its root is trusted) never makes
//!   the mesh's certificates untrusted: the last good pair keeps serving instead.
//! - [`generate`]: a self-signed root and an issuer under it, for a cluster that
//!   brought none.

use std::sync::Arc;
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::keys::key_pair_from_pem;

/// Lifetimes of what [`generate`] makes (days).
pub const ROOT_DAYS: i64 = 3650;
pub const ISSUER_DAYS: i64 = 365;

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// `YYYY-MM-DD HH:MM:SS UTC`, for logs and messages.
pub fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_else(|_| format!("{unix} (Unix time)"))
}

/// 16 random bytes, positive: serials never repeat, even for a renewal with the same
/// key (rcgen's default serial is the key's hash).
pub fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    // Without randomness no certificate is safe to make; the OS always has it on
    // the platforms we run on.
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the OS's random numbers");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a shorter encoding
    rcgen::SerialNumber::from_slice(&bytes)
}

/// The certificates of a PEM text, each checked to be a readable X.509 certificate.
fn certificates(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what} holds no certificate (PEM)"));
    }
    for (i, cert) in certs.iter().enumerate() {
        match X509Certificate::from_der(cert) {
            Ok(([], _)) => {}
            Ok(_) => return Err(format!("{what}: certificate {} has trailing bytes", i + 1)),
            Err(e) => return Err(format!("{what}: certificate {} cannot be read: {e}", i + 1)),
        }
    }
    Ok(certs)
}

/// A certificate's subject, for messages.
fn subject(cert: &X509Certificate<'_>) -> String {
    let s = cert.subject().to_string();
    if s.is_empty() {
        "(empty subject)".into()
    } else {
        s
    }
}

/// The issuer Secret, read: what signs the workloads' certificates.
pub struct IssuerMaterial {
    pub issuer: Issuer<'static, KeyPair>,
    /// `tls.crt`: the issuer's certificate first.
    pub chain: Vec<CertificateDer<'static>>,
    /// `ca.crt`, if the Secret has one.
    pub ca_pem: Option<String>,
    /// When the issuer's certificate ends (Unix seconds).
    pub not_after: i64,
    pub subject: String,
}

impl IssuerMaterial {
    /// Reads `tls.crt`, `tls.key` (and `ca.crt`): the first certificate must be a CA
    /// that may sign certificates, for the key given.
    pub fn parse(tls_crt: &str, tls_key: &str, ca_crt: Option<&str>) -> Result<Self, String> {
        let chain = certificates(tls_crt, "tls.crt")?;
        let (_, cert) = X509Certificate::from_der(&chain[0])
            .map_err(|e| format!("tls.crt cannot be read: {e}"))?;
        let name = subject(&cert);
        let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(format!(
                "tls.crt's first certificate ({name}) is not a CA certificate (basicConstraints CA:TRUE): it cannot sign workload certificates"
            ));
        }
        if let Ok(Some(usage)) = cert.key_usage()
            && !usage.value.key_cert_sign()
        {
            return Err(format!(
                "tls.crt's first certificate ({name}) has a key usage without keyCertSign: it cannot sign certificates"
            ));
        }
        let key = key_pair_from_pem(tls_key).map_err(|e| format!("tls.key: {e}"))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(format!(
                "tls.key is not the key of tls.crt's first certificate ({name})"
            ));
        }
        let not_after = cert.validity().not_after.timestamp();
        let issuer = Issuer::from_ca_cert_der(&chain[0], key).map_err(|e| {
            format!("tls.crt's first certificate ({name}) cannot be used as an issuer: {e}")
        })?;
        if let Some(ca) = ca_crt {
            certificates(ca, "ca.crt")?;
        }
        Ok(Self {
            issuer,
            chain,
            ca_pem: ca_crt.map(str::to_string),
            not_after,
            subject: name,
        })
    }
}

/// The trust roots ConfigMap's bundle, read.
#[derive(Debug, Clone)]
pub struct TrustRoots {
    pub pem: String,
    pub certs: Vec<CertificateDer<'static>>,
    pub subjects: Vec<String>,
}

impl TrustRoots {
    pub fn parse(pem: &str) -> Result<Self, String> {
        let certs = certificates(pem, "the trust roots")?;
        let subjects = certs
            .iter()
            .filter_map(|c| X509Certificate::from_der(c).ok().map(|(_, c)| subject(&c)))
            .collect();
        Ok(Self {
            pem: pem.to_string(),
            certs,
            subjects,
        })
    }

    /// Whether every certificate of `other` (PEM) is in this bundle.
    pub fn contains_all(&self, other: &str) -> bool {
        CertificateDer::pem_slice_iter(other.as_bytes())
            .all(|c| c.is_ok_and(|c| self.certs.contains(&c)))
    }

    /// A verifier that checks a client certificate as a proxy does: its chain up to
    /// one of these roots, now, for client authentication.
    pub(crate) fn verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
        let mut store = rustls::RootCertStore::empty();
        for (cert, name) in self.certs.iter().zip(&self.subjects) {
            store
                .add(cert.clone())
                .map_err(|e| format!("the trust root {name} cannot be used: {e}"))?;
        }
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(store),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| format!("the trust roots cannot be used: {e}"))
    }
}

/// A root and an issuer made here, as the Secret stores them (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Generated {
    pub tls_crt: String,
    pub tls_key: String,
    pub ca_crt: String,
    /// The root's key: kept (in the Secret only Tandem makes) to issue the issuer
    /// again before it ends.
    pub ca_key: String,
}

impl std::fmt::Debug for Generated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Generated { .. }")
    }
}

fn ca_params(common_name: String, days: i64, path_len: Option<u8>) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tandem");
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    crate::injection::tls::validity(&mut params, days);
    params
}

/// An issuer (intermediate CA, [`ISSUER_DAYS`]) under this root.
fn issuer_under(
    root: &Issuer<'_, KeyPair>,
    trust_domain: &str,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate()?;
    // Path length 0: the issuer signs leaves only.
    let params = ca_params(
        format!("Tandem identity issuer ({trust_domain})"),
        ISSUER_DAYS,
        Some(0),
    );
    let cert = params.signed_by(&key, root)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A self-signed root ([`ROOT_DAYS`], ECDSA P-256) and an issuer under it.
pub fn generate(trust_domain: &str) -> Result<Generated, rcgen::Error> {
    let root_key = KeyPair::generate()?;
    let root_params = ca_params(format!("Tandem root CA ({trust_domain})"), ROOT_DAYS, None);
    let root_cert = root_params.self_signed(&root_key)?;
    let ca_key = root_key.serialize_pem();
    let root = Issuer::new(root_params, root_key);
    let (tls_crt, tls_key) = issuer_under(&root, trust_domain)?;
    Ok(Generated {
        tls_crt,
        tls_key,
        ca_crt: root_cert.pem(),
        ca_key,
    })
}

/// A new issuer under the same root (the root's certificate and key, PEM).
pub fn renew_issuer(ca_crt: &str, ca_key: &str, trust_domain: &str) -> Result<Generated, String> {
    let key = key_pair_from_pem(ca_key).map_err(|e| format!("ca.key: {e}"))?;
    let root = Issuer::from_ca_cert_pem(ca_crt, key).map_err(|e| format!("ca.crt: {e}"))?;
    let (tls_crt, tls_key) =
        issuer_under(&root, trust_domain).map_err(|e| format!("cannot sign an issuer: {e}"))?;
    Ok(Generated {
        tls_crt,
        tls_key,
        ca_crt: ca_crt.to_string(),
        ca_key: ca_key.to_string(),
    })
}

/// When the first certificate of a PEM text ends (Unix seconds).
pub fn not_after(pem: &str) -> Option<i64> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let (_, cert) = X509Certificate::from_der(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::identity::authority::Authority;

    pub fn authority() -> (Generated, Authority) {
        let g = generate("cluster.local").unwrap();
        let issuer = IssuerMaterial::parse(&g.tls_crt, &g.tls_key, Some(&g.ca_crt)).unwrap();
        let authority = Authority::new(issuer, TrustRoots::parse(&g.ca_crt).unwrap()).unwrap();
        (g, authority)
    }

    #[test]
    fn a_generated_issuer_chains_to_its_root() {
        let (g, authority) = authority();
        assert_eq!(authority.issuer.chain.len(), 1);
        assert!(
            authority
                .issuer
                .subject
                .contains("Tandem identity issuer (cluster.local)")
        );
        let days = (authority.issuer.not_after - now()) / 86_400;
        assert!(
            (ISSUER_DAYS - 1..=ISSUER_DAYS + 1).contains(&days),
            "{days}"
        );
        let root_days = (not_after(&g.ca_crt).unwrap() - now()) / 86_400;
        assert!((ROOT_DAYS - 1..=ROOT_DAYS + 1).contains(&root_days));
        assert!(authority.roots.contains_all(&g.ca_crt));
        // Debug output never holds the key.
        assert!(!format!("{authority:?} {g:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_renewed_issuer_keeps_the_root() {
        let g = generate("td").unwrap();
        let r = renew_issuer(&g.ca_crt, &g.ca_key, "td").unwrap();
        assert_eq!(r.ca_crt, g.ca_crt);
        assert_ne!(r.tls_crt, g.tls_crt);
        let issuer = IssuerMaterial::parse(&r.tls_crt, &r.tls_key, None).unwrap();
        Authority::new(issuer, TrustRoots::parse(&g.ca_crt).unwrap()).unwrap();
    }

    #[test]
    fn an_issuer_of_another_root_is_refused() {
        let (a, b) = (generate("td").unwrap(), generate("td").unwrap());
        let issuer = IssuerMaterial::parse(&b.tls_crt, &b.tls_key, None).unwrap();
        let error = Authority::new(issuer, TrustRoots::parse(&a.ca_crt).unwrap()).unwrap_err();
        assert!(
            error.contains("does not verify against the trust roots"),
            "{error}"
        );
        // Both roots trusted (a rotation under way): accepted.
        let both = format!("{}{}", a.ca_crt, b.ca_crt);
        let issuer = IssuerMaterial::parse(&b.tls_crt, &b.tls_key, None).unwrap();
        let authority = Authority::new(issuer, TrustRoots::parse(&both).unwrap()).unwrap();
        assert_eq!(authority.roots.certs.len(), 2);
    }

    #[test]
    fn unusable_secrets_say_why() {
        let (a, b) = (generate("td").unwrap(), generate("td").unwrap());
        for (crt, key, says) in [
            ("", a.tls_key.as_str(), "tls.crt holds no certificate"),
            (
                "garbage",
                a.tls_key.as_str(),
                "tls.crt holds no certificate",
            ),
            (a.tls_crt.as_str(), "", "tls.key"),
            (
                a.tls_crt.as_str(),
                b.tls_key.as_str(),
                "tls.key is not the key of",
            ),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                a.tls_key.as_str(),
                "certificate 1 cannot be read",
            ),
        ] {
            let error = IssuerMaterial::parse(crt, key, None)
                .err()
                .expect("an error");
            assert!(error.contains(says), "{error}");
            assert!(!error.contains("PRIVATE KEY"), "{error}");
        }
        // A leaf is not an issuer.
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["x.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let error = IssuerMaterial::parse(&leaf.pem(), &key.serialize_pem(), None)
            .err()
            .unwrap();
        assert!(error.contains("not a CA certificate"), "{error}");
        assert!(
            TrustRoots::parse("")
                .unwrap_err()
                .contains("no certificate")
        );
    }

    #[test]
    fn times_read_as_dates() {
        assert_eq!(when(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(when(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
