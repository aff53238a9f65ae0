//! A proxy's certificate signing request, checked before anything is signed: a
//! PKCS#10 request (DER) whose signature verifies with its own key (proof that the
//! caller holds the key: rcgen's `from_der` checks it, through x509-parser's `verify`
//! feature, which rcgen's `ring` feature turns on), an ECDSA P-256 key, and exactly one
//! subject alternative name: the URI of the identity asked for. Only the key is taken
//! from it; everything else in the certificate is the control plane's choice.

use rcgen::{CertificateSigningRequestParams, SanType};
use rustls::pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

use super::sign::RequestedKey;

/// The largest CSR read; a P-256 request is some 300 bytes.
pub const MAX_LEN: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Not a usable request.
    Malformed(String),
    /// A well-formed request for another identity than the one asked for.
    OtherIdentity(String),
}

/// The key to certify, if the request is good for `identity`.
pub fn check(der: &[u8], identity: &str) -> Result<RequestedKey, Problem> {
    let malformed = |why: String| Problem::Malformed(format!("the CSR {why}"));
    if der.is_empty() {
        return Err(malformed("is empty".into()));
    }
    if der.len() > MAX_LEN {
        return Err(malformed(format!("is larger than {MAX_LEN} bytes")));
    }
    let (rest, parsed) = X509CertificationRequest::from_der(der)
        .map_err(|e| malformed(format!("is not a PKCS#10 request (DER): {e}")))?;
    if !rest.is_empty() {
        return Err(malformed(format!("has {} bytes after its end", rest.len())));
    }
    let spki = &parsed.certification_request_info.subject_pki;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    if spki.algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY
        || curve.as_ref() != Some(&OID_EC_P256)
    {
        return Err(malformed(format!(
            "is for a key that is not ECDSA P-256 (algorithm {}{})",
            spki.algorithm.algorithm,
            curve.map(|c| format!(", curve {c}")).unwrap_or_default()
        )));
    }
    let params = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
        .map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                malformed("signature does not verify with its own key".into())
            }
            rcgen::Error::UnsupportedExtension => malformed(
                "requests an extension other than subjectAltName, keyUsage, extendedKeyUsage and basicConstraints".into(),
            ),
            other => malformed(format!("cannot be read: {other}")),
        })?;
    match params.params.subject_alt_names.as_slice() {
        [SanType::URI(uri)] if uri.as_str() == identity => {}
        [SanType::URI(uri)] => {
            return Err(Problem::OtherIdentity(format!(
                "the CSR asks for {:?}, not for the identity of the request ({identity:?})",
                uri.as_str()
            )));
        }
        sans => {
            return Err(malformed(format!(
                "must name exactly one subject alternative name, the URI {identity:?}; it names {}",
                describe(sans)
            )));
        }
    }
    // The point as the SubjectPublicKeyInfo holds it, for P-256 (checked above), not
    // for whatever the request's signature algorithm would suggest.
    Ok(RequestedKey {
        raw: spki.subject_public_key.data.to_vec(),
        algorithm: &rcgen::PKCS_ECDSA_P256_SHA256,
    })
}

fn describe(sans: &[SanType]) -> String {
    if sans.is_empty() {
        return "none".into();
    }
    sans.iter()
        .map(|s| match s {
            SanType::URI(u) => format!("URI {:?}", u.as_str()),
            SanType::DnsName(d) => format!("DNS {:?}", d.as_str()),
            SanType::IpAddress(ip) => format!("IP {ip}"),
            SanType::Rfc822Name(m) => format!("email {:?}", m.as_str()),
            SanType::OtherName(_) => "an otherName".into(),
            _ => "a name of another kind".into(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    pub fn csr(key: &KeyPair, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.serialize_request(key).unwrap().der().to_vec()
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn problem(der: &[u8]) -> Problem {
        check(der, ID).err().expect("refused")
    }

    #[test]
    fn a_good_request() {
        let key = KeyPair::generate().unwrap();
        let got = check(&csr(&key, vec![uri(ID)]), ID).unwrap();
        assert_eq!(got.raw, key.public_key_raw());
    }

    #[test]
    fn a_tampered_request_does_not_verify() {
        let key = KeyPair::generate().unwrap();
        let mut der = csr(&key, vec![uri(ID)]);
        // Flip a byte of the identity inside the signed part: the signature no longer
        // matches, so someone without the key cannot reuse another's request.
        let at = der
            .windows(ID.len())
            .position(|w| w == ID.as_bytes())
            .unwrap();
        der[at + ID.len() - 1] ^= 1;
        let Problem::Malformed(why) = problem(&der) else {
            panic!("malformed")
        };
        assert!(why.contains("signature does not verify"), "{why}");
    }

    #[test]
    fn other_names_and_keys_are_refused_with_a_reason() {
        let key = KeyPair::generate().unwrap();
        assert_eq!(
            problem(&csr(
                &key,
                vec![uri("spiffe://cluster.local/ns/shop/sa/admin")]
            )),
            Problem::OtherIdentity(format!(
                "the CSR asks for \"spiffe://cluster.local/ns/shop/sa/admin\", not for the identity of the request ({ID:?})"
            ))
        );
        for (sans, says) in [
            (vec![], "it names none"),
            (vec![uri(ID), uri(ID)], "exactly one"),
            (
                vec![SanType::DnsName("web.shop".try_into().unwrap())],
                "DNS \"web.shop\"",
            ),
            (
                vec![uri(ID), SanType::IpAddress("10.0.0.1".parse().unwrap())],
                "IP 10.0.0.1",
            ),
        ] {
            let Problem::Malformed(why) = problem(&csr(&key, sans)) else {
                panic!("malformed")
            };
            assert!(why.contains(says), "{why}");
        }
        let p384 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let Problem::Malformed(why) = problem(&csr(&p384, vec![uri(ID)])) else {
            panic!("malformed")
        };
        assert!(why.contains("not ECDSA P-256"), "{why}");
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(
            problem(&csr(&ed, vec![uri(ID)])),
            Problem::Malformed(_)
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let key = KeyPair::generate().unwrap();
        let good = csr(&key, vec![uri(ID)]);
        let mut inputs = vec![
            vec![],
            b"not a csr".to_vec(),
            vec![0x30],
            vec![0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            vec![0u8; MAX_LEN + 1],
            [good.as_slice(), &[0]].concat(),
        ];
        for cut in [1, 10, good.len() / 2, good.len() - 1] {
            inputs.push(good[..cut].to_vec());
        }
        // Every single-byte change of the signed part (the request info, after the
        // outer header): what a forger would change. (Outside it, x509-parser reads the
        // signature algorithm's encoding leniently, which proves nothing either way:
        // the request info and its signature are what is checked.)
        let (_, parsed) = X509CertificationRequest::from_der(&good).unwrap();
        let info_len = parsed.certification_request_info.raw.len();
        let info_start = good
            .windows(info_len)
            .position(|w| w == parsed.certification_request_info.raw)
            .unwrap();
        for i in info_start..info_start + info_len {
            let mut bad = good.clone();
            bad[i] ^= 0x55;
            inputs.push(bad);
        }
        for (n, input) in inputs.iter().enumerate() {
            // Any change to the signed part breaks the signature; any other, the DER.
            assert!(
                check(input, ID).is_err(),
                "accepted changed CSR {n}: {input:02x?}"
            );
        }
    }
}
