//! The mutating admission webhook: AdmissionReview v1 over HTTPS at `/mutate`.
//!
//! Every answer is one of: the JSON patch of [`super::mutate`] (`patchType:
//! JSONPatch`), allowed without a patch (not a pod to mesh), allowed without a patch
//! and with a warning the API server hands to the client (an invalid annotation, an
//! object that cannot be read as a Pod), or, for a body that is not an
//! AdmissionReview at all (so there is no `uid` to answer), `400` with a message.
//! Never a half-patched pod: the patch is made whole, or not at all.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::mutate::{self, Context, Outcome, Skipped};
use super::tls::CertStore;
use super::{INBOUND_POLICY, INJECT, InjectConfig};
use crate::identity::Copies;
use crate::metrics::{Metrics, ResultLabel};

/// The largest AdmissionReview read (a Pod is at most ~1.5 MiB in etcd).
const MAX_BODY: usize = 8 << 20;
/// A TLS handshake, and then each request head, must arrive within this.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a review came out, as counted in `tandem_control_plane_webhook_calls_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Result {
    Injected,
    Skipped,
    Unmeshed,
    Error,
}

impl Result {
    pub fn label(self) -> &'static str {
        match self {
            Result::Injected => "injected",
            Result::Skipped => "skipped",
            Result::Unmeshed => "unmeshed",
            Result::Error => "error",
        }
    }
}

/// What the mutation needs to know of a pod's namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceFacts {
    /// Labelled `tandem.io/inject: enabled`.
    pub enabled: bool,
    /// Its `tandem.io/inbound-policy` annotation.
    pub inbound_policy: Option<String>,
}

/// The namespaces of the pods under review.
pub trait Namespaces: Send + Sync {
    fn facts(&self, namespace: &str) -> impl std::future::Future<Output = NamespaceFacts> + Send;

    /// Called once a pod of `namespace` is to be injected, before the answer.
    fn injecting(&self, namespace: &str) -> impl std::future::Future<Output = ()> + Send {
        let _ = namespace;
        std::future::ready(())
    }
}

/// Reads the namespace from the API server. If it cannot, it assumes `enabled`: the
/// API server called the webhook because the namespace matched its selector. With
/// identity on, makes sure an injected pod's namespace has the trust roots.
pub struct ApiNamespaces {
    pub client: Client,
    pub copies: Option<Arc<Copies>>,
}

impl Namespaces for ApiNamespaces {
    async fn facts(&self, namespace: &str) -> NamespaceFacts {
        match Api::<Namespace>::all(self.client.clone())
            .get(namespace)
            .await
        {
            Ok(ns) => NamespaceFacts {
                enabled: ns
                    .metadata
                    .labels
                    .and_then(|l| l.get(INJECT).cloned())
                    .is_some_and(|v| v == "enabled"),
                inbound_policy: ns
                    .metadata
                    .annotations
                    .and_then(|a| a.get(INBOUND_POLICY).cloned()),
            },
            Err(e) => {
                tracing::warn!(
                    namespace,
                    "cannot read the namespace's labels ({e}); taking it as enabled, since the webhook was called for it"
                );
                NamespaceFacts {
                    enabled: true,
                    inbound_policy: None,
                }
            }
        }
    }

    async fn injecting(&self, namespace: &str) {
        if let Some(copies) = &self.copies {
            copies.ensure(namespace).await;
        }
    }
}

/// The answer to one POST: status and JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Value,
    pub result: Result,
}

fn bad_request(message: String) -> Answer {
    Answer {
        status: StatusCode::BAD_REQUEST,
        body: json!({"error": message}),
        result: Result::Error,
    }
}

fn response(uid: &str, extra: Value) -> Value {
    let mut response = json!({"uid": uid, "allowed": true});
    if let (Some(r), Some(extra)) = (response.as_object_mut(), extra.as_object()) {
        r.extend(extra.clone());
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

/// Who the pod is, for logs: `namespace/name` (or `generateName*`).
fn who(namespace: &str, object: &Value) -> String {
    let meta = &object["metadata"];
    let name = meta["name"]
        .as_str()
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .or_else(|| meta["generateName"].as_str().map(|g| format!("{g}*")))
        .unwrap_or_else(|| "(no name)".into());
    format!("{namespace}/{name}")
}

/// Answers one AdmissionReview.
pub async fn review(body: &[u8], config: &InjectConfig, namespaces: &impl Namespaces) -> Answer {
    let review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return bad_request(format!("malformed AdmissionReview: not JSON: {e}")),
    };
    if review["kind"] != "AdmissionReview" || review["apiVersion"] != "admission.k8s.io/v1" {
        return bad_request(format!(
            "malformed AdmissionReview: expected apiVersion admission.k8s.io/v1, kind AdmissionReview; got {} {}",
            review["apiVersion"], review["kind"]
        ));
    }
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str().filter(|u| !u.is_empty()) else {
        return bad_request("malformed AdmissionReview: no request.uid".into());
    };
    let allowed = |result: Result, extra: Value| Answer {
        status: StatusCode::OK,
        body: response(uid, extra),
        result,
    };
    let is_pod = request["kind"]["kind"] == "Pod"
        && request["kind"]["group"]
            .as_str()
            .unwrap_or_default()
            .is_empty()
        && request["subResource"]
            .as_str()
            .unwrap_or_default()
            .is_empty();
    if !is_pod || request["operation"] != "CREATE" {
        return allowed(Result::Skipped, json!({}));
    }
    let object = &request["object"];
    let namespace = request["namespace"]
        .as_str()
        .or_else(|| object["metadata"]["namespace"].as_str())
        .unwrap_or_default()
        .to_string();
    // Read as a Pod first: an object that is not one is let through untouched.
    if let Err(e) = serde_json::from_value::<Pod>(object.clone()) {
        let warning = format!("tandem: not meshed: the object is not a readable Pod: {e}");
        tracing::warn!(pod = %who(&namespace, object), uid, "{warning}");
        return allowed(Result::Error, json!({"warnings": [warning]}));
    }
    let facts = namespaces.facts(&namespace).await;
    let context = Context {
        namespace_enabled: facts.enabled,
        namespace_inbound_policy: facts.inbound_policy.as_deref(),
        config,
    };
    match mutate::inject(object, context) {
        Outcome::Inject(patch) => {
            // Checked before it is sent: a patch that does not apply is never sent.
            if let Err(e) = mutate::apply(object, &patch) {
                let warning = format!("tandem: not meshed: the patch does not apply: {e}");
                tracing::error!(pod = %who(&namespace, object), uid, "{warning}");
                return allowed(Result::Error, json!({"warnings": [warning]}));
            }
            let bytes = serde_json::to_vec(&patch).expect("a patch serialises");
            namespaces.injecting(&namespace).await;
            tracing::info!(pod = %who(&namespace, object), uid, "injected");
            allowed(
                Result::Injected,
                json!({
                    "patchType": "JSONPatch",
                    "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
                }),
            )
        }
        Outcome::Skip(skipped) => match skipped.warning() {
            Some(warning) => {
                tracing::warn!(pod = %who(&namespace, object), uid, "{warning}");
                allowed(Result::Unmeshed, json!({"warnings": [warning]}))
            }
            None => {
                tracing::debug!(pod = %who(&namespace, object), uid, reason = %skipped, "not injected");
                let result = match skipped {
                    Skipped::NotAPod(_) => Result::Error,
                    _ => Result::Skipped,
                };
                allowed(result, json!({}))
            }
        },
    }
}

/// Serves the webhook on `listener` (TLS with the certificate `certs` holds).
pub async fn serve<N: Namespaces + 'static>(
    listener: TcpListener,
    certs: Arc<CertStore>,
    config: Arc<InjectConfig>,
    namespaces: Arc<N>,
    metrics: Arc<Metrics>,
) {
    // Every result shows, at 0, before the first call.
    for result in [
        Result::Injected,
        Result::Skipped,
        Result::Unmeshed,
        Result::Error,
    ] {
        let _ = metrics.webhook_calls.get_or_create(&ResultLabel {
            result: result.label(),
        });
    }
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_no_client_auth()
    .with_cert_resolver(certs);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("webhook accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let (config, namespaces, metrics) = (config.clone(), namespaces.clone(), metrics.clone());
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "webhook TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper::service::service_fn(move |request| {
                handle(
                    request,
                    config.clone(),
                    namespaces.clone(),
                    metrics.clone(),
                    peer,
                )
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(TLS_HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "webhook connection: {e}");
            }
        });
    }
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a response")
}

async fn handle<N: Namespaces>(
    request: Request<Incoming>,
    config: Arc<InjectConfig>,
    namespaces: Arc<N>,
    metrics: Arc<Metrics>,
    peer: SocketAddr,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != "/mutate" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            &json!({"error": "the webhook is at /mutate"}),
        ));
    }
    if request.method() != Method::POST {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "POST an AdmissionReview"}),
        ));
    }
    let count = |result: Result| {
        metrics
            .webhook_calls
            .get_or_create(&ResultLabel {
                result: result.label(),
            })
            .inc();
    };
    let body = match Limited::new(request.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            count(Result::Error);
            tracing::warn!(%peer, "webhook: cannot read the request body: {e}");
            return Ok(reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                &json!({"error": format!("cannot read the AdmissionReview: {e} (at most {MAX_BODY} bytes)")}),
            ));
        }
    };
    let answer = review(&body, &config, namespaces.as_ref()).await;
    count(answer.result);
    if answer.status != StatusCode::OK {
        tracing::warn!(%peer, "webhook: {}", answer.body["error"].as_str().unwrap_or_default());
    }
    Ok(reply(answer.status, &answer.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(bool);
    impl Namespaces for Fixed {
        async fn facts(&self, _: &str) -> NamespaceFacts {
            NamespaceFacts {
                enabled: self.0,
                inbound_policy: None,
            }
        }
    }

    fn review_of(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop", "operation": "CREATE",
                "userInfo": {"username": "test"},
                "object": object
            }
        }))
        .unwrap()
    }

    fn pod(annotations: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"generateName": "web-", "annotations": annotations},
               "spec": {"containers": [{"name": "web", "image": "web"}]}})
    }

    async fn answer(body: &[u8], enabled: bool) -> Answer {
        review(body, &InjectConfig::default(), &Fixed(enabled)).await
    }

    #[tokio::test]
    async fn an_enabled_pod_gets_the_patch() {
        let a = answer(&review_of(pod(json!({}))), true).await;
        assert_eq!((a.status, a.result), (StatusCode::OK, Result::Injected));
        let r = &a.body["response"];
        assert_eq!(r["uid"], "u-1");
        assert_eq!(r["allowed"], true);
        assert_eq!(r["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(r["patch"].as_str().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
        let patched = mutate::apply(&pod(json!({})), &patch).unwrap();
        assert_eq!(patched["spec"]["initContainers"][1]["name"], "tandem-proxy");
        assert_eq!(a.body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(a.body["kind"], "AdmissionReview");
    }

    #[tokio::test]
    async fn others_are_allowed_untouched() {
        for (body, enabled, result) in [
            (review_of(pod(json!({}))), false, Result::Skipped),
            (
                review_of(pod(json!({INJECT: "disabled"}))),
                true,
                Result::Skipped,
            ),
        ] {
            let a = answer(&body, enabled).await;
            assert_eq!((a.status, a.result), (StatusCode::OK, result));
            assert!(a.body["response"].get("patch").is_none(), "{}", a.body);
            assert_eq!(a.body["response"]["allowed"], true);
        }
        // Not a pod creation.
        let mut update: Value = serde_json::from_slice(&review_of(pod(json!({})))).unwrap();
        update["request"]["operation"] = json!("UPDATE");
        let a = answer(&serde_json::to_vec(&update).unwrap(), true).await;
        assert_eq!(a.result, Result::Skipped);
        assert!(a.body["response"].get("patch").is_none());
    }

    #[tokio::test]
    async fn a_bad_annotation_is_admitted_unmeshed_with_a_warning() {
        let a = answer(
            &review_of(pod(json!({"tandem.io/skip-inbound-ports": "abc"}))),
            true,
        )
        .await;
        assert_eq!((a.status, a.result), (StatusCode::OK, Result::Unmeshed));
        let r = &a.body["response"];
        assert_eq!(r["allowed"], true);
        assert!(r.get("patch").is_none());
        let warning = r["warnings"][0].as_str().unwrap();
        assert!(
            warning.contains("tandem.io/skip-inbound-ports: \"abc\""),
            "{warning}"
        );
    }

    #[tokio::test]
    async fn an_unreadable_object_is_allowed_with_a_warning() {
        let a = answer(&review_of(json!({"spec": {"containers": "many"}})), true).await;
        assert_eq!((a.status, a.result), (StatusCode::OK, Result::Error));
        assert_eq!(a.body["response"]["uid"], "u-1");
        assert_eq!(a.body["response"]["allowed"], true);
        assert!(a.body["response"].get("patch").is_none());
        assert!(
            a.body["response"]["warnings"][0]
                .as_str()
                .unwrap()
                .contains("not a readable Pod")
        );
    }

    #[tokio::test]
    async fn a_malformed_review_is_a_400_that_says_why() {
        for (body, says) in [
            (b"{not json".to_vec(), "not JSON"),
            (b"[]".to_vec(), "expected apiVersion admission.k8s.io/v1"),
            (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no request.uid"),
            (br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(), "expected"),
        ] {
            let a = answer(&body, true).await;
            assert_eq!((a.status, a.result), (StatusCode::BAD_REQUEST, Result::Error));
            let error = a.body["error"].as_str().unwrap();
            assert!(error.starts_with("malformed AdmissionReview") && error.contains(says), "{error}");
        }
    }
}
