//! Leaf certificates signed by the issuer: a workload's (its identity as the only
//! name, a URI SAN, for both ends of mTLS) and the identity server's own (DNS names
//! and addresses, server only). Short-lived and never longer-lived than the issuer.

use std::time::Duration;

use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, PublicKeyData, SanType,
    SignatureAlgorithm,
};
use rustls::pki_types::CertificateDer;

use super::material::{IssuerMaterial, now, random_serial};

/// How far back `notBefore` goes, for peers whose clocks are a little behind.
pub const CLOCK_SKEW: i64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A proxy's: client and server of mesh TLS.
    Workload,
    /// The identity server's.
    Server,
}

/// A signed leaf and its end.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub der: CertificateDer<'static>,
    /// Unix seconds.
    pub not_after: i64,
}

/// A URI SAN.
pub fn uri(uri: &str) -> Result<SanType, String> {
    uri.try_into()
        .map(SanType::URI)
        .map_err(|e| format!("{uri:?} cannot be a URI SAN: {e}"))
}

/// A public key as a CSR gives it (the raw key), for an algorithm checked beforehand.
pub struct RequestedKey {
    pub raw: Vec<u8>,
    pub algorithm: &'static SignatureAlgorithm,
}

impl PublicKeyData for RequestedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

/// Signs a leaf for `key` with these names, valid from a minute ago for `lifetime`
/// (cut at the issuer's own end).
pub fn leaf(
    issuer: &IssuerMaterial,
    key: &impl PublicKeyData,
    names: Vec<SanType>,
    usage: Usage,
    lifetime: Duration,
) -> Result<Leaf, String> {
    let now = now();
    let lifetime = i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX);
    let not_after = now.saturating_add(lifetime).min(issuer.not_after);
    if not_after <= now {
        return Err(format!(
            "the issuer's certificate ({}) ended at {}",
            issuer.subject,
            super::material::when(issuer.not_after)
        ));
    }
    let time = |t: i64| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .map_err(|e| format!("a time out of range: {e}"))
    };
    let mut params = CertificateParams::default();
    // No subject (rcgen's default has one): the names are the SANs, marked critical.
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.not_before = time(now - CLOCK_SKEW)?;
    params.not_after = time(not_after)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match usage {
        Usage::Workload => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
    };
    let cert = params
        .signed_by(key, &issuer.issuer)
        .map_err(|e| format!("cannot sign: {e}"))?;
    Ok(Leaf {
        der: cert.der().clone(),
        not_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::material::tests::authority;
    use rcgen::KeyPair;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    #[test]
    fn a_workload_leaf_says_what_the_design_says() {
        let (_, authority) = authority();
        let key = KeyPair::generate().unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let leaf = leaf(
            &authority.issuer,
            &key,
            vec![uri(id).unwrap()],
            Usage::Workload,
            Duration::from_secs(24 * 3600),
        )
        .unwrap();
        let (_, cert) = X509Certificate::from_der(&leaf.der).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        assert!(sans.critical, "critical: the subject is empty");
        assert_eq!(sans.value.general_names, [GeneralName::URI(id)]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        let v = cert.validity();
        assert_eq!(v.not_after.timestamp(), leaf.not_after);
        assert_eq!(
            v.not_after.timestamp() - v.not_before.timestamp(),
            24 * 3600 + CLOCK_SKEW
        );
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
        // Two leaves for one key: two serials.
        let again = super::leaf(
            &authority.issuer,
            &key,
            vec![uri(id).unwrap()],
            Usage::Workload,
            Duration::from_secs(60),
        )
        .unwrap();
        let (_, again) = X509Certificate::from_der(&again.der).unwrap();
        assert_ne!(again.raw_serial(), cert.raw_serial());
    }

    #[test]
    fn never_past_the_issuer() {
        let (_, authority) = authority();
        let key = KeyPair::generate().unwrap();
        let long = leaf(
            &authority.issuer,
            &key,
            vec![uri("spiffe://td/x").unwrap()],
            Usage::Workload,
            Duration::from_secs(100 * 365 * 86_400),
        )
        .unwrap();
        assert_eq!(long.not_after, authority.issuer.not_after);
    }
}
