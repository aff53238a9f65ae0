//! Who a token belongs to, as the API server says: a TokenReview for audience
//! `tandem` (the audience of the token volume injection adds), then the answer
//! judged: authenticated, for that audience, and a ServiceAccount's.

use std::future::Future;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};

use super::refusal::{Reason, Refusal, scrub};

/// The audience of the proxies' tokens.
pub const AUDIENCE: &str = "tandem";
/// The largest token sent to the API server (projected tokens are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Asks the API server about a token.
pub trait Reviewer: Send + Sync + 'static {
    /// The review's status, or why it could not be made.
    fn review(&self, token: &str)
    -> impl Future<Output = Result<TokenReviewStatus, String>> + Send;
}

/// The real TokenReview API.
pub struct ApiReviewer(pub Client);

impl Reviewer for ApiReviewer {
    async fn review(&self, token: &str) -> Result<TokenReviewStatus, String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        // The error is the API server's or the transport's, neither of which
        // repeats the request body; scrubbed all the same.
        let created = Api::<TokenReview>::all(self.0.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| scrub(&e.to_string(), token))?;
        created
            .status
            .ok_or_else(|| "the API server answered the TokenReview without a status".into())
    }
}

/// The ServiceAccount (namespace, name) a reviewed token belongs to, or why it is
/// refused. `token` only to keep it out of messages.
pub fn judge(status: &TokenReviewStatus, token: &str) -> Result<(String, String), Refusal> {
    if status.authenticated != Some(true) {
        let said = status
            .error
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|e| scrub(e, token));
        // The API server refuses a token of another audience as unauthenticated; its
        // error names the audiences.
        let reason = match &said {
            Some(e) if e.to_ascii_lowercase().contains("audience") => Reason::WrongAudience,
            _ => Reason::TokenInvalid,
        };
        return Err(Refusal::new(
            reason,
            match said {
                Some(e) => format!("the API server did not authenticate the token: {e}"),
                None => "the API server did not authenticate the token".to_string(),
            },
        ));
    }
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == AUDIENCE) {
        return Err(Refusal::new(
            Reason::WrongAudience,
            format!(
                "the token is not for audience {AUDIENCE:?} (the API server says it is for {audiences:?}): mount a projected ServiceAccount token with audience {AUDIENCE:?}"
            ),
        ));
    }
    let username = status
        .user
        .as_ref()
        .and_then(|u| u.username.as_deref())
        .unwrap_or_default();
    let account = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'));
    match account {
        Some((ns, sa)) => Ok((ns.to_string(), sa.to_string())),
        None => Err(Refusal::new(
            Reason::TokenInvalid,
            format!("the token is {username:?}'s, not a ServiceAccount's"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(
        authenticated: bool,
        audiences: &[&str],
        user: &str,
        error: Option<&str>,
    ) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
            user: Some(UserInfo {
                username: Some(user.to_string()),
                ..UserInfo::default()
            }),
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn a_service_accounts_token() {
        let s = status(true, &["tandem"], "system:serviceaccount:shop:web", None);
        assert_eq!(judge(&s, "t0k3n-t0k3n"), Ok(("shop".into(), "web".into())));
    }

    #[test]
    fn refusals() {
        let token = "eyJhbGciOiJSUzI1NiJ9.secret.sig";
        for (s, reason, says) in [
            (
                status(
                    false,
                    &[],
                    "",
                    Some("[invalid bearer token, service account token has expired]"),
                ),
                Reason::TokenInvalid,
                "did not authenticate the token: [invalid bearer token, service account token has expired]",
            ),
            (
                status(
                    false,
                    &[],
                    "",
                    Some(
                        "token audiences [\"other\"] is invalid for the target audiences [\"tandem\"]",
                    ),
                ),
                Reason::WrongAudience,
                "invalid for the target audiences",
            ),
            (
                status(
                    true,
                    &["https://kubernetes.default.svc"],
                    "system:serviceaccount:a:b",
                    None,
                ),
                Reason::WrongAudience,
                "not for audience \"tandem\"",
            ),
            (
                status(true, &["tandem"], "alice", None),
                Reason::TokenInvalid,
                "\"alice\"'s, not a ServiceAccount's",
            ),
            (
                status(true, &["tandem"], "system:serviceaccount:a", None),
                Reason::TokenInvalid,
                "not a ServiceAccount's",
            ),
            (
                status(false, &[], "", Some(&format!("bad token {token}"))),
                Reason::TokenInvalid,
                "bad token [token]",
            ),
            (
                TokenReviewStatus::default(),
                Reason::TokenInvalid,
                "did not authenticate",
            ),
        ] {
            let refusal = judge(&s, token).unwrap_err();
            assert_eq!(refusal.reason, reason, "{refusal}");
            assert!(refusal.message.contains(says), "{refusal}");
            assert!(!refusal.message.contains(token));
        }
    }
}
