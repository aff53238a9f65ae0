//! The issuer's private key, in whichever PEM form it was written: PKCS#8 (rcgen,
//! `openssl genpkey`), SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`), the
//! last two being what cert-manager writes by default (`privateKey.encoding: PKCS1`).
//! rcgen with ring reads PKCS#8 only, so the other two are wrapped in a PKCS#8
//! envelope first (RFC 5208: version 0, the algorithm, the key as an OCTET STRING).

use rcgen::KeyPair;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

/// DER of `AlgorithmIdentifier` contents: id-ecPublicKey with each named curve rcgen
/// can sign with, and rsaEncryption (with its NULL parameters).
const EC_P256: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey
    0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, // prime256v1
];
const EC_P384: &[u8] = &[
    0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, // id-ecPublicKey
    0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, // secp384r1
];
const RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, // rsaEncryption
    0x05, 0x00,
];

/// One DER element: tag, definite length, contents.
fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = contents.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// `PrivateKeyInfo` around a key of this algorithm.
fn pkcs8(algorithm: &[u8], key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(tlv(0x30, algorithm));
    body.extend(tlv(0x04, key));
    tlv(0x30, &body)
}

/// The key of a PEM text (the first private key in it).
pub fn key_pair_from_pem(pem: &str) -> Result<KeyPair, String> {
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        format!("no private key in PEM (PKCS#8, SEC1 or PKCS#1) could be read: {e}")
    })?;
    match &key {
        PrivateKeyDer::Pkcs8(_) => KeyPair::try_from(&key).map_err(|e| {
            format!("a PKCS#8 key that cannot sign certificates (ECDSA P-256/P-384, RSA or Ed25519 are supported): {e}")
        }),
        // Nothing in a SEC1 key without its optional parameters says which curve it
        // is on: each supported curve is tried (the wrong one is refused by ring).
        PrivateKeyDer::Sec1(sec1) => [EC_P256, EC_P384]
            .iter()
            .find_map(|curve| {
                KeyPair::try_from(pkcs8(curve, sec1.secret_sec1_der()).as_slice()).ok()
            })
            .ok_or_else(|| {
                "an EC key that is not on P-256 or P-384 (or is missing its public key)".to_string()
            }),
        PrivateKeyDer::Pkcs1(pkcs1) => {
            KeyPair::try_from(pkcs8(RSA, pkcs1.secret_pkcs1_der()).as_slice())
                .map_err(|e| format!("an RSA key that cannot be used: {e}"))
        }
        _ => Err("a private key of a kind that is not supported".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A throwaway P-256 key as `openssl ecparam -genkey -name prime256v1` writes it
    /// (SEC1, with its curve named), made for this test only.
    const SEC1_P256: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEICHdxhjUwTRpSssXaVieFKwX/jxOEJhiC28Gy/LjXq1BoAoGCCqGSM49
AwEHoUQDQgAEMIr6v3E61qkYElqpxcfo3u5VUV/tZ3OLoNnbkXXKrBF+2TLvz5zm
doNsT1cAc+LQFG3JIFlMslMYJv0n6PGZBA==
-----END EC PRIVATE KEY-----
";

    /// (tag, header length, contents length) of the DER element at the start of `der`.
    fn header(der: &[u8]) -> (u8, usize, usize) {
        match der[1] {
            n if n < 0x80 => (der[0], 2, n as usize),
            n => {
                let count = (n & 0x7f) as usize;
                let len = der[2..2 + count]
                    .iter()
                    .fold(0usize, |acc, b| (acc << 8) | *b as usize);
                (der[0], 2 + count, len)
            }
        }
    }

    /// The key inside a PKCS#8 envelope: its last element's contents.
    fn inner_key(pkcs8: &[u8]) -> &[u8] {
        let (_, outer, _) = header(pkcs8);
        let mut rest = &pkcs8[outer..];
        for _ in 0..2 {
            let (_, h, len) = header(rest); // the version, then the algorithm
            rest = &rest[h + len..];
        }
        let (tag, h, len) = header(rest);
        assert_eq!(tag, 0x04, "an OCTET STRING");
        &rest[h..h + len]
    }

    #[test]
    fn lengths_of_every_size() {
        assert_eq!(tlv(0x04, &[1; 3])[..2], [0x04, 3]);
        assert_eq!(tlv(0x04, &[1; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(tlv(0x04, &[1; 1217])[..4], [0x04, 0x82, 0x04, 0xc1]);
    }

    #[test]
    fn pkcs8_as_rcgen_writes_it() {
        let key = KeyPair::generate().unwrap();
        let back = key_pair_from_pem(&key.serialize_pem()).unwrap();
        assert_eq!(back.public_key_raw(), key.public_key_raw());
        assert_eq!(back.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
    }

    #[test]
    fn sec1_with_and_without_its_curve() {
        let key = key_pair_from_pem(SEC1_P256).unwrap();
        assert_eq!(key.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        // ring's PKCS#8 holds a SEC1 key without the curve: take it out, read it alone.
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
        ] {
            let generated = KeyPair::generate_for(alg).unwrap();
            let sec1 = inner_key(generated.serialized_der());
            let pem = format!(
                "-----BEGIN EC PRIVATE KEY-----\n{}\n-----END EC PRIVATE KEY-----\n",
                base64_of(sec1)
            );
            let back = key_pair_from_pem(&pem).unwrap();
            assert_eq!(back.algorithm(), alg);
            assert_eq!(back.public_key_raw(), generated.public_key_raw());
        }
    }

    /// A throwaway RSA key as `openssl genrsa -traditional 2048` writes it (PKCS#1, as
    /// cert-manager does by default), made for this test only.
    const PKCS1_RSA: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEoQIBAAKCAQEApabTuzQAemWWpz1mq5voy8Saz6ufzZC9O21Ai1CC0S4HRrwR
SngnDwOcxuRbOYjxZdAPw33rKRsv0zb4VFNgGEYLaa5l3CBqE1wq7Z+sKKGSJCvg
5gTqPIQYl+cbaDsHnObva+0PWFrIBa85JI9hOmhomk2AEnXsmkk08+d2heSd9tHr
4EFCu4A2oUN/VbgOIGDH+6uLTphrV1UzstumJYS9ZNzPsOGFqi86i1cckhprxqNH
QDRxrfvlnrVWDy4GBNDuqneNRWD1TLnWufQquXspKf9e3N2/Ng7ENmDYVMk6zQEB
B5o3cIzGDGCQYiJjk27AciBlHNvzbBikVtkUUQIDAQABAoH/P7xwuxbHGFD+Jlr5
pg3XBJAhAMaINg/6v2LJ8tCHhPSw2AaEoKKaZKx/Jge3Eewe9Y2Ygx9v2+EaBaqg
4dEyqCRLP95aUtgl+Ez+N2+4Tenc0Q4Q+m/psF8jF09UvEX6J+SzOlN8FALZ81X4
JpkET/TcSoKHRJMa9kI0naPxdpJhpm3mdtbQrqvZOXPXogllZiulH/j+uo0KD4VH
daS4ZaNj9HbxgE5r/ILSIjtniSTykZ3uxWtxLoefmsOleP1vems6c99Flay5EedC
CMNixjSU0LI2CDO1WiOntmKMWa/AOcGqUtJFPDS6qTRYqgrXzWEB+h5H37SoFzYp
jWGZAoGBANTrhNtRBqgGDrZ3AuY8sEawR3Fk4DC4ogMoGcafo1qUtVHlKSOk56dm
h9Diy97JX1itUyhJxb9/EGHZvpmvd52JazY2YmypqUEcGnuGcm+MlqrMh5nvbe2v
ckm4Qv1LTL7NAdPnYr0XbaCACPxf+koIS6sAZGpZWI/ze6HmSYVFAoGBAMcq+xDW
FDFk6PlJ9Q3UeMJoIQVAuNlpqQpUwv1eyqufeOgCBxqXrBlHuhtQCn4QE3vNxl7t
uDZ3w7yZEqwqFDXib5Rm05HGvWbiUyIvjaJjO+9eC9fTrEUKQX7GyLYKLPPIGXMX
J6PI8HUpwNFtARil2YGtLvbivHyw1YeaCAWdAoGAFBFyvz0e1H1lq5sCAfNcZf09
bpmka9MrKgMAkvD+842qnWJtAzgKwYNvb6fAsWnne7MycEyrv8XZJG/igBfCvW1z
VnO/ySAgnMtqT5Q3ev4UQVrvuPmRMeLkccBVSAxt2ln2PyPC8bGgmo0Wy7q8G3g2
sZJi5IcxSrgXQgYzjcUCgYAcjTHOuRHN/uxTCGIj6GijXfAV47BcIoSEIaCOV+9v
6P2ZLOk9y651NU4dqjzG06EnZ1lftG5rCII74CnIGoQpMVvTh2YfCMGQJTPLu8tv
ExC9gNrrxsF0aEL5XJ/bUNwe2nmjgRdCqISoFyM4Ios8sFHdACmyZNCmg2co+FDc
FQKBgQDFHvrhaoZYmGuuZvCLlzLTIxqygafCJTlCQyqNJGDeVl64MHOynmNsDBKm
69xAVFjDdy99EkXolk7EDLe40eNPXcnddbvocW2MJGKR6BNerpIMgLSiBAtwBT9H
RJPqbiXAZ6YpulSzdjRZjQbLbeYNK/kv88ZUd6k7jLS42gU3SA==
-----END RSA PRIVATE KEY-----
";

    #[test]
    fn pkcs1_rsa_signs() {
        let key = key_pair_from_pem(PKCS1_RSA).unwrap();
        assert_eq!(key.algorithm(), &rcgen::PKCS_RSA_SHA256);
        let cert = rcgen::CertificateParams::new(vec!["a.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.der()).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn garbage_is_an_error_that_says_so() {
        for text in [
            "",
            "not a key",
            "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            let error = key_pair_from_pem(text).expect_err("an error");
            assert!(!error.is_empty());
        }
    }

    fn base64_of(der: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(der)
    }
}
