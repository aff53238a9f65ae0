//! An issuer and the trust roots together: what Certify signs with and hands out,
//! accepted only if a certificate the issuer signs verifies against the roots.

use std::time::Duration;

use rustls::pki_types::UnixTime;

use super::material::{IssuerMaterial, TrustRoots, when};
use super::sign;

/// An issuer and the roots it chains to: what Certify signs with and hands out.
pub struct Authority {
    pub issuer: IssuerMaterial,
    pub roots: TrustRoots,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Authority")
            .field("issuer", &self.issuer.subject)
            .field("issuer_not_after", &when(self.issuer.not_after))
            .field("roots", &self.roots.subjects)
            .finish()
    }
}

impl Authority {
    /// The pair, if what the issuer signs verifies against the roots now: a probe
    /// certificate is signed and checked as a proxy would check a peer's.
    pub fn new(issuer: IssuerMaterial, roots: TrustRoots) -> Result<Self, String> {
        let probe = sign::leaf(
            &issuer,
            issuer.issuer.key(),
            vec![sign::uri("spiffe://tandem.invalid/probe")?],
            sign::Usage::Workload,
            Duration::from_secs(3600),
        )
        .map_err(|e| format!("the issuer cannot sign: {e}"))?;
        let verifier = roots.verifier()?;
        verifier
            .verify_client_cert(&probe.der, &issuer.chain, UnixTime::now())
            .map_err(|e| {
                format!(
                    "a certificate signed by the issuer ({}) does not verify against the trust roots ({}): {e}",
                    issuer.subject,
                    roots.subjects.join("; ")
                )
            })?;
        Ok(Self { issuer, roots })
    }
}
