//! OpenTelemetry traces of the requests the proxy carries.
//!
//! On the outbound side every attempt is a client span (a retry is a span of its own,
//! with its attempt number); on the inbound side the request is one server span. Each
//! span's context goes on to the next hop in `traceparent`, so a request through two
//! proxies is one trace: the caller's span → the client proxy's attempt → the server
//! proxy's inbound span → whatever the app does next.
//!
//! Sampling is parent-based: a request whose caller sent a sampled context is traced,
//! one whose caller sent an unsampled context is not (and goes on untouched), and one
//! with no context starts a trace with probability `--trace-sample-ratio`. At ratio 0
//! an untraced request costs a look at its header names and nothing else.
//!
//! Spans end when the response head is relayed (or the proxy answers itself); the
//! body is not waited for. They are exported over OTLP/gRPC by [`export`].

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;

use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span, SpanExporter};
use tandem_balancer::Mode;

use crate::destination::{Backend, BackendSet};
use crate::metrics::ProxyErrorKind;

pub mod context;
pub mod export;

pub use context::{Found, TRACEPARENT, TRACEPARENT_LEN};
pub use export::SpanCounts;

/// What `--trace-*` and the pod's identity say.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The OTLP/gRPC collector, `host:port` or a URL.
    pub collector: String,
    /// The share of requests without a caller's context that start a trace.
    pub sample_ratio: f64,
    /// `service.name` of the spans: the workload this proxy sits beside.
    pub service_name: String,
    pub namespace: String,
    pub pod: String,
    pub node: String,
}

/// Makes spans; cheap to share (the SDK's tracer is an `Arc` inside).
#[derive(Debug)]
pub struct Tracer {
    sdk: SdkTracer,
    /// Keeps the pipeline alive; spans made after it is dropped go nowhere.
    _provider: SdkTracerProvider,
    roots: bool,
}

impl Tracer {
    /// Starts the export to `settings.collector` (in the current runtime) and returns
    /// the tracer. The collector is dialled lazily: one that is down is not an error
    /// here, only spans dropped and counted later.
    pub fn start(settings: &Settings, counts: SpanCounts) -> Result<Arc<Self>, String> {
        if !(0.0..=1.0).contains(&settings.sample_ratio) {
            return Err(format!(
                "--trace-sample-ratio must be between 0 and 1, not {}",
                settings.sample_ratio
            ));
        }
        let endpoint = if settings.collector.contains("://") {
            settings.collector.clone()
        } else {
            format!("http://{}", settings.collector)
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(std::time::Duration::from_secs(3))
            .build()
            .map_err(|e| format!("--trace-collector {}: {e}", settings.collector))?;
        let resource = resource(settings);
        exporter.set_resource(&resource);
        let queue = export::SpanQueue::new(counts);
        tokio::spawn(queue.clone().export(exporter));
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_span_processor(export::Enqueue(queue))
            .with_resource(resource)
            .build();
        Ok(Arc::new(Self {
            sdk: provider.tracer("tandem-proxy"),
            _provider: provider,
            roots: settings.sample_ratio > 0.0,
        }))
    }

    /// Whether a request with no trace context header may still be traced (it is
    /// looked at only if it may).
    #[inline]
    pub fn starts_traces(&self) -> bool {
        self.roots
    }

    /// The trace of one request, if it is traced: its caller's context was sampled,
    /// or it had none and sampling starts one. `None` costs nothing further, and the
    /// request goes on with its headers as they came.
    pub fn request(
        &self,
        found: &Found<'_>,
        request: &RequestInfo<'_>,
    ) -> Option<Box<RequestTrace>> {
        let parent = found.parent();
        match &parent {
            Some(parent) if !parent.is_sampled() => return None,
            None if !self.roots => return None,
            _ => {}
        }
        let parent = match parent {
            Some(remote) => Context::new().with_remote_span_context(remote),
            None => Context::new(),
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", request.method.to_string()),
            KeyValue::new("url.path", request.path.to_string()),
            KeyValue::new("server.address", request.authority.to_string()),
            KeyValue::new("network.protocol.name", "http"),
            KeyValue::new("network.protocol.version", request.version),
        ];
        let server = match &request.inbound {
            None => None,
            Some(inbound) => {
                if let Some(peer) = inbound.peer {
                    attributes.push(KeyValue::new("client.address", peer.ip().to_string()));
                    attributes.push(KeyValue::new("client.port", i64::from(peer.port())));
                }
                if let Some(id) = inbound.client_id {
                    attributes.push(KeyValue::new("tandem.client.identity", id.to_string()));
                }
                let span = self
                    .sdk
                    .span_builder(format!("inbound {}", request.method))
                    .with_kind(SpanKind::Server)
                    .with_attributes(attributes.clone())
                    .start_with_context(&self.sdk, &parent);
                Some(span)
            }
        };
        Some(Box::new(RequestTrace {
            sdk: self.sdk.clone(),
            parent,
            name: format!("outbound {} {}", request.method, request.destination),
            attributes,
            server,
            attempt: None,
            attempts: 0,
            flags: Vec::new(),
        }))
    }
}

fn resource(settings: &Settings) -> Resource {
    let mut attributes = vec![KeyValue::new(
        "service.namespace",
        settings.namespace.clone(),
    )];
    for (key, value) in [
        ("k8s.namespace.name", &settings.namespace),
        ("k8s.pod.name", &settings.pod),
        ("k8s.node.name", &settings.node),
    ] {
        if !value.is_empty() {
            attributes.push(KeyValue::new(key, value.clone()));
        }
    }
    Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .with_attributes(attributes)
        .build()
}

/// What a span says of the request it belongs to.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// Host or `:authority`, as the client wrote it.
    pub authority: &'a str,
    /// The destination it was routed to.
    pub destination: &'a str,
    /// `1.1` or `2`.
    pub version: &'static str,
    /// For a request on the inbound listener: the server span's own facts.
    pub inbound: Option<InboundInfo<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct InboundInfo<'a> {
    pub peer: Option<SocketAddr>,
    /// The client proxy's mesh identity, over mutual TLS.
    pub client_id: Option<&'a str>,
}

/// One traced request's spans.
#[derive(Debug)]
pub struct RequestTrace {
    sdk: SdkTracer,
    parent: Context,
    /// The outbound attempts' span name.
    name: String,
    /// What every span of the request says of it.
    attributes: Vec<KeyValue>,
    /// Inbound: the request's one span.
    server: Option<Span>,
    /// Outbound: the attempt under way.
    attempt: Option<Span>,
    attempts: u32,
    /// What the attempt under way (or the inbound request) met so far.
    flags: Vec<Flag>,
}

/// Something that went wrong, as the spans say it (`tandem.response.flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Retried,
    /// The backend picked was ejected by outlier detection (picked anyway: panic mode).
    Ejected,
    /// Circuit breaking refused the request.
    Overflow,
    Timeout,
}

impl Flag {
    fn as_str(self) -> &'static str {
        match self {
            Flag::Retried => "retried",
            Flag::Ejected => "ejected",
            Flag::Overflow => "overflow",
            Flag::Timeout => "timeout",
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Flat => "weighted_round_robin",
        Mode::Tiers => "locality_tiers",
        Mode::ZoneAware => "zone_aware",
        Mode::Panic => "panic",
    }
}

impl RequestTrace {
    /// Starts attempt `n` (1 for the first) to `backend` and returns the context to
    /// send with it: the attempt's own span (outbound), or the inbound span.
    pub fn attempt(
        &mut self,
        n: u32,
        backend: &Backend,
        set: &BackendSet,
    ) -> [u8; TRACEPARENT_LEN] {
        self.attempts = n;
        if let Some(server) = &mut self.server {
            server.set_attribute(KeyValue::new("tandem.attempts", i64::from(n)));
            return context::traceparent(server.span_context());
        }
        self.flags.clear();
        if n > 1 {
            self.flags.push(Flag::Retried);
        }
        let ejected = set
            .backends
            .iter()
            .position(|b| std::ptr::eq(b, backend))
            .and_then(|i| set.local.get(i))
            .is_some_and(|l| l.ejected);
        if ejected {
            self.flags.push(Flag::Ejected);
        }
        let meta = &backend.meta;
        let mut attributes = self.attributes.clone();
        attributes.extend([
            KeyValue::new("tandem.attempt", i64::from(n)),
            KeyValue::new("tandem.destination", set.service.clone()),
            KeyValue::new("tandem.backend.address", meta.address.to_string()),
            KeyValue::new("tandem.backend.zone", meta.locality.zone.clone()),
            KeyValue::new("tandem.locality.tier", set.tier_of(backend)),
            KeyValue::new("tandem.balancer.mode", mode_name(set.balancer.mode())),
            KeyValue::new("network.peer.address", meta.address.ip().to_string()),
            KeyValue::new("network.peer.port", i64::from(meta.address.port())),
        ]);
        if n > 1 {
            attributes.push(KeyValue::new("http.request.resend_count", i64::from(n - 1)));
        }
        if !meta.identity.is_empty() {
            attributes.push(KeyValue::new(
                "tandem.backend.identity",
                meta.identity.clone(),
            ));
        }
        let span = self.start_attempt(attributes);
        let traceparent = context::traceparent(span.span_context());
        self.attempt = Some(span);
        traceparent
    }

    fn start_attempt(&self, attributes: Vec<KeyValue>) -> Span {
        self.sdk
            .span_builder(Cow::Owned(self.name.clone()))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.sdk, &self.parent)
    }

    /// The attempt under way failed before a response (`timeout`: it ran out of time).
    pub fn attempt_failed(&mut self, error: &dyn std::fmt::Display, timeout: bool) {
        if let Some(mut span) = self.attempt.take() {
            let kind = if timeout {
                "timeout"
            } else {
                "upstream_failed"
            };
            span.set_attribute(KeyValue::new("error.type", kind));
            if timeout {
                self.flags.push(Flag::Timeout);
            }
            span.set_status(Status::error(error.to_string()));
            end_with(span, &self.flags);
        }
    }

    /// A backend answered with `status`.
    pub fn response(&mut self, status: u16) {
        let status_attr = KeyValue::new("http.response.status_code", i64::from(status));
        if let Some(mut span) = self.attempt.take() {
            span.set_attribute(status_attr.clone());
            if status >= 400 {
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(""));
            }
            end_with(span, &self.flags);
        }
        if let Some(mut span) = self.server.take() {
            span.set_attribute(status_attr);
            if status >= 500 {
                span.set_attribute(KeyValue::new("error.type", status.to_string()));
                span.set_status(Status::error(""));
            }
            end_with(span, &self.flags);
        }
    }

    /// The proxy answered the request itself (no backend, overflow, a last failure).
    pub fn answered(&mut self, kind: ProxyErrorKind, status: u16, message: &str) {
        let flag = match kind {
            ProxyErrorKind::Overflow => Some(Flag::Overflow),
            ProxyErrorKind::Timeout => Some(Flag::Timeout),
            _ => None,
        };
        let mut span = match (self.server.take(), self.attempt.take()) {
            (Some(server), _) => server,
            // Outbound with an attempt still open (a timeout cuts it short).
            (None, Some(attempt)) => attempt,
            // Outbound, refused before any attempt: one span says why.
            (None, None) if self.attempts == 0 => self.start_attempt(self.attributes.clone()),
            (None, None) => return,
        };
        if let Some(flag) = flag {
            self.flags.push(flag);
        }
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        span.set_attribute(KeyValue::new("error.type", kind.as_str()));
        span.set_status(Status::error(message.to_string()));
        end_with(span, &self.flags);
    }
}

/// Ends `span` saying `flags` (`tandem.response.flags`, comma-separated), if any.
fn end_with(mut span: Span, flags: &[Flag]) {
    if !flags.is_empty() {
        let joined: Vec<&str> = flags.iter().map(|f| f.as_str()).collect();
        span.set_attribute(KeyValue::new("tandem.response.flags", joined.join(",")));
    }
    span.end();
}
