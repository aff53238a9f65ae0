//! `tandem.identity.v1.Identity/Certify`: the checks, in order (the cheap, local ones
//! first, so garbage costs the API server nothing), then the signature.
//!
//! 1. the identity asked for is one this control plane issues (`bad_identity`);
//! 2. there is a usable issuer, not ended (`no_issuer`);
//! 3. the CSR is good and names that identity (`bad_csr`, `identity_mismatch`);
//! 4. the token: a TokenReview (`api_unavailable`), authenticated for audience
//!    `tandem` (`token_invalid`, `wrong_audience`), a ServiceAccount's, and the
//!    identity asked for is that ServiceAccount's (`identity_mismatch`);
//! 5. a leaf for the CSR's key (`internal` if signing fails), the issuer's chain and
//!    the trust roots.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::identity::v1 as pb;
use tonic::{Request, Response, Status};

use super::csr::{self, Problem};
use super::material::{now, when};
use super::name::WorkloadId;
use super::refusal::{Reason, Refusal};
use super::review::{self, MAX_TOKEN_LEN, Reviewer};
use super::sign;
use super::store::Current;
use crate::metrics::{Metrics, ReasonLabel};

/// The most a TokenReview may take before the caller is told to try again.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request read (a token and a CSR are a few KiB).
pub const MAX_REQUEST: usize = 64 * 1024;

pub struct IdentityService<R> {
    current: Current,
    reviewer: R,
    trust_domain: String,
    lifetime: Duration,
    metrics: Arc<Metrics>,
}

impl<R: Reviewer> IdentityService<R> {
    pub fn new(
        current: Current,
        reviewer: R,
        trust_domain: String,
        lifetime: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            current,
            reviewer,
            trust_domain,
            lifetime,
            metrics,
        }
    }

    pub fn into_server(self) -> pb::identity_server::IdentityServer<Self> {
        pb::identity_server::IdentityServer::new(self).max_decoding_message_size(MAX_REQUEST)
    }

    /// The certificate, or why not.
    pub async fn decide(
        &self,
        request: &pb::CertifyRequest,
    ) -> Result<pb::CertifyResponse, Refusal> {
        let requested = WorkloadId::parse(&request.identity, &self.trust_domain)
            .map_err(|e| Refusal::new(Reason::BadIdentity, format!("bad identity: {e}")))?;
        let uri = requested.to_string();
        let Some(authority) = self.current.borrow().clone() else {
            return Err(Refusal::new(
                Reason::NoIssuer,
                "the control plane has no usable issuer yet (its log says why); try again",
            ));
        };
        // The last good issuer may have ended since it was read (nobody renewed it).
        if authority.issuer.not_after <= now() + sign::CLOCK_SKEW {
            return Err(Refusal::new(
                Reason::NoIssuer,
                format!(
                    "the issuer's certificate ({}) ends at {}: the control plane cannot issue until it is renewed",
                    authority.issuer.subject,
                    when(authority.issuer.not_after)
                ),
            ));
        }
        let key = csr::check(&request.certificate_signing_request, &uri).map_err(|p| match p {
            Problem::Malformed(why) => Refusal::new(Reason::BadCsr, why),
            Problem::OtherIdentity(why) => Refusal::new(Reason::IdentityMismatch, why),
        })?;
        let token = request.token.trim();
        if token.is_empty() {
            return Err(Refusal::new(
                Reason::TokenInvalid,
                "no token: send the pod's projected ServiceAccount token (audience \"tandem\")",
            ));
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(Refusal::new(
                Reason::TokenInvalid,
                format!("the token is longer than {MAX_TOKEN_LEN} bytes"),
            ));
        }
        let status = match tokio::time::timeout(REVIEW_TIMEOUT, self.reviewer.review(token)).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                return Err(Refusal::new(
                    Reason::ApiUnavailable,
                    format!("cannot check the token: the TokenReview failed: {e}"),
                ));
            }
            Err(_) => {
                return Err(Refusal::new(
                    Reason::ApiUnavailable,
                    format!(
                        "cannot check the token: the API server did not answer the TokenReview within {REVIEW_TIMEOUT:?}"
                    ),
                ));
            }
        };
        let (namespace, account) = review::judge(&status, token)?;
        let holder = WorkloadId::new(&self.trust_domain, &namespace, &account).map_err(|e| {
            Refusal::new(
                Reason::TokenInvalid,
                format!("the token's ServiceAccount: {e}"),
            )
        })?;
        if holder != requested {
            return Err(Refusal::new(
                Reason::IdentityMismatch,
                format!(
                    "the token is ServiceAccount {namespace}/{account}'s ({holder}), not {uri}'s"
                ),
            ));
        }
        let started = Instant::now();
        let name = sign::uri(&uri).map_err(|e| Refusal::new(Reason::BadIdentity, e))?;
        let leaf = sign::leaf(
            &authority.issuer,
            &key,
            vec![name],
            sign::Usage::Workload,
            self.lifetime,
        )
        .map_err(|e| Refusal::new(Reason::Internal, format!("cannot sign: {e}")))?;
        self.metrics
            .certificate_signing
            .observe(started.elapsed().as_secs_f64());
        Ok(pb::CertifyResponse {
            leaf_certificate: leaf.der.to_vec(),
            intermediate_certificates: authority.issuer.chain.iter().map(|c| c.to_vec()).collect(),
            valid_until_unix_seconds: leaf.not_after,
            trust_roots_pem: authority.roots.pem.clone(),
        })
    }
}

#[tonic::async_trait]
impl<R: Reviewer> pb::identity_server::Identity for IdentityService<R> {
    async fn certify(
        &self,
        request: Request<pb::CertifyRequest>,
    ) -> Result<Response<pb::CertifyResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let request = request.into_inner();
        // The identity is logged only once it reads as one (not what a caller typed),
        // and the token never.
        let identity = WorkloadId::parse(&request.identity, &self.trust_domain)
            .map(|id| id.to_string())
            .unwrap_or_else(|_| "(not an identity)".into());
        match self.decide(&request).await {
            Ok(response) => {
                self.metrics.certificates_issued.inc();
                tracing::info!(
                    %peer,
                    %identity,
                    valid_until = %when(response.valid_until_unix_seconds),
                    "identity: issued a certificate"
                );
                Ok(Response::new(response))
            }
            Err(refusal) => {
                self.metrics
                    .certificate_refusals
                    .get_or_create(&ReasonLabel {
                        reason: refusal.reason.label(),
                    })
                    .inc();
                tracing::warn!(%peer, %identity, reason = refusal.reason.label(), "identity: refused a certificate: {}", refusal.message);
                Err(refusal.status())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::csr::tests::csr;
    use crate::identity::material::tests::authority;
    use k8s_openapi::api::authentication::v1::{TokenReviewStatus, UserInfo};
    use rcgen::{KeyPair, SanType};
    use tokio::sync::watch;

    /// Answers as the API server would for tokens named after their holder:
    /// `good:<ns>:<sa>`, `other-audience`, `unreachable`; anything else is garbage.
    struct Fake;

    impl Reviewer for Fake {
        async fn review(&self, token: &str) -> Result<TokenReviewStatus, String> {
            if token == "unreachable" {
                return Err("connection refused".into());
            }
            if token == "other-audience" {
                return Ok(TokenReviewStatus {
                    authenticated: Some(false),
                    error: Some(
                        "token audiences [\"x\"] is invalid for the target audiences [\"tandem\"]"
                            .into(),
                    ),
                    ..TokenReviewStatus::default()
                });
            }
            let Some(account) = token.strip_prefix("good:") else {
                return Ok(TokenReviewStatus {
                    authenticated: Some(false),
                    error: Some("[invalid bearer token, square/go-jose: compact JWS format must have three parts]".into()),
                    ..TokenReviewStatus::default()
                });
            };
            Ok(TokenReviewStatus {
                authenticated: Some(true),
                audiences: Some(vec!["tandem".into()]),
                user: Some(UserInfo {
                    username: Some(format!("system:serviceaccount:{account}")),
                    ..UserInfo::default()
                }),
                error: None,
            })
        }
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    fn service(with_issuer: bool) -> IdentityService<Fake> {
        let (_, authority) = authority();
        let (_tx, rx) = watch::channel(with_issuer.then(|| Arc::new(authority)));
        IdentityService::new(
            rx,
            Fake,
            "cluster.local".into(),
            Duration::from_secs(30),
            Arc::new(Metrics::default()),
        )
    }

    fn request(identity: &str, token: &str, csr_for: &str) -> pb::CertifyRequest {
        let key = KeyPair::generate().unwrap();
        pb::CertifyRequest {
            identity: identity.into(),
            token: token.into(),
            certificate_signing_request: csr(&key, vec![SanType::URI(csr_for.try_into().unwrap())]),
        }
    }

    #[tokio::test]
    async fn issues_for_the_tokens_own_identity() {
        let s = service(true);
        let r = s.decide(&request(ID, "good:shop:web", ID)).await.unwrap();
        assert!(!r.leaf_certificate.is_empty());
        assert_eq!(r.intermediate_certificates.len(), 1);
        assert!(r.trust_roots_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let left = r.valid_until_unix_seconds - now();
        assert!((28..=30).contains(&left), "{left}");
    }

    #[tokio::test]
    async fn refuses_with_a_reason_and_the_right_code() {
        let s = service(true);
        let other = "spiffe://cluster.local/ns/shop/sa/admin";
        for (req, reason, says) in [
            (
                request(ID, "good:shop:admin", ID),
                Reason::IdentityMismatch,
                "the token is ServiceAccount shop/admin's",
            ),
            (
                request(ID, "other-audience", ID),
                Reason::WrongAudience,
                "target audiences",
            ),
            (
                request(ID, "garbage", ID),
                Reason::TokenInvalid,
                "did not authenticate the token",
            ),
            (request(ID, "", ID), Reason::TokenInvalid, "no token"),
            (
                request(ID, "good:shop:web", other),
                Reason::IdentityMismatch,
                "the CSR asks for",
            ),
            (
                request("spiffe://elsewhere/ns/shop/sa/web", "good:shop:web", ID),
                Reason::BadIdentity,
                "trust domain",
            ),
            (
                request(ID, "unreachable", ID),
                Reason::ApiUnavailable,
                "connection refused",
            ),
            (
                pb::CertifyRequest {
                    certificate_signing_request: b"junk".to_vec(),
                    ..request(ID, "good:shop:web", ID)
                },
                Reason::BadCsr,
                "not a PKCS#10 request",
            ),
        ] {
            let refusal = s.decide(&req).await.unwrap_err();
            assert_eq!(refusal.reason, reason, "{refusal}");
            assert!(refusal.message.contains(says), "{refusal}");
        }
        let none = service(false)
            .decide(&request(ID, "good:shop:web", ID))
            .await
            .unwrap_err();
        assert_eq!(none.reason, Reason::NoIssuer);
        assert_eq!(none.status().code(), tonic::Code::Unavailable);
    }
}
