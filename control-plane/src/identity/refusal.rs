//! Why a certificate was not issued: a fixed set of reasons (the label of
//! `tandem_control_plane_certificate_refusals_total`), each with its gRPC code, and a
//! message for the caller that says what was wrong. Messages never hold the token.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The API server did not authenticate the token (garbage, expired, revoked, or
    /// its ServiceAccount or pod is gone).
    TokenInvalid,
    /// A token for another audience than `tandem`.
    WrongAudience,
    /// A good token, or a good CSR, for another identity than the one asked for.
    IdentityMismatch,
    /// The CSR cannot be used.
    BadCsr,
    /// The identity asked for is not one this control plane issues.
    BadIdentity,
    /// The TokenReview could not be made.
    ApiUnavailable,
    /// No usable issuer (yet, or any more).
    NoIssuer,
    /// Signing failed.
    Internal,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::TokenInvalid,
        Reason::WrongAudience,
        Reason::IdentityMismatch,
        Reason::BadCsr,
        Reason::BadIdentity,
        Reason::ApiUnavailable,
        Reason::NoIssuer,
        Reason::Internal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::TokenInvalid => "token_invalid",
            Reason::WrongAudience => "wrong_audience",
            Reason::IdentityMismatch => "identity_mismatch",
            Reason::BadCsr => "bad_csr",
            Reason::BadIdentity => "bad_identity",
            Reason::ApiUnavailable => "api_unavailable",
            Reason::NoIssuer => "no_issuer",
            Reason::Internal => "internal",
        }
    }

    pub fn code(self) -> tonic::Code {
        match self {
            Reason::TokenInvalid | Reason::WrongAudience | Reason::IdentityMismatch => {
                tonic::Code::PermissionDenied
            }
            Reason::BadCsr | Reason::BadIdentity => tonic::Code::InvalidArgument,
            Reason::ApiUnavailable | Reason::NoIssuer => tonic::Code::Unavailable,
            Reason::Internal => tonic::Code::Internal,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }

    pub fn status(&self) -> tonic::Status {
        tonic::Status::new(self.reason.code(), self.message.clone())
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.reason.label())
    }
}

/// `text` with every occurrence of `secret` blotted out: for messages built from
/// what the API server said about a token, in case it ever quotes it.
pub fn scrub(text: &str, secret: &str) -> String {
    if secret.len() < 8 {
        return text.to_string();
    }
    text.replace(secret, "[token]")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_labels() {
        let labels: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        assert_eq!(Reason::WrongAudience.code(), tonic::Code::PermissionDenied);
        assert_eq!(Reason::BadCsr.code(), tonic::Code::InvalidArgument);
        let status = Refusal::new(Reason::BadIdentity, "no identity").status();
        assert_eq!(
            (status.code(), status.message()),
            (tonic::Code::InvalidArgument, "no identity")
        );
    }

    #[test]
    fn tokens_are_blotted_out() {
        assert_eq!(
            scrub("bad eyJhbGciOi.x.y here", "eyJhbGciOi.x.y"),
            "bad [token] here"
        );
        assert_eq!(scrub("a", ""), "a");
    }
}
