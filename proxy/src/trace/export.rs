//! Finished spans on their way to the collector. A request ending a span only pushes
//! it onto a bounded lock-free queue; one task sends the queue over OTLP (gRPC) in
//! batches. A full queue drops the span, a failed export drops its batch, and both
//! are counted: a slow, broken or absent collector never slows a request.

use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_queue::SegQueue;
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

/// Spans held at most while the collector is slow or away.
const QUEUE: usize = 4096;
/// Spans per export call.
const BATCH: usize = 512;
/// How often a partly filled queue is sent.
const EVERY: Duration = Duration::from_secs(1);
/// How long one export may take before its batch is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// What became of spans, counted once each.
#[derive(Debug, Clone, Default)]
pub struct SpanCounts {
    pub exported: Counter,
    /// Dropped because the queue was full (the collector is slower than the traffic).
    pub queue_full: Counter,
    /// Dropped with a batch the collector did not take (down, refusing, too slow).
    pub export_failed: Counter,
}

/// The queue between requests and the export task: lock-free, bounded by a count,
/// and grown in small blocks as spans come (an array of [`QUEUE`] spans made up front
/// would cost every proxy over a megabyte while idle).
#[derive(Debug)]
pub struct SpanQueue {
    spans: SegQueue<SpanData>,
    queued: AtomicUsize,
    ready: Notify,
    counts: SpanCounts,
}

impl SpanQueue {
    pub fn new(counts: SpanCounts) -> Arc<Self> {
        Arc::new(Self {
            spans: SegQueue::new(),
            queued: AtomicUsize::new(0),
            ready: Notify::new(),
            counts,
        })
    }

    fn push(&self, span: SpanData) {
        let queued = self.queued.fetch_add(1, Ordering::Relaxed);
        if queued >= QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.counts.queue_full.inc();
            return;
        }
        self.spans.push(span);
        if queued + 1 == BATCH {
            self.ready.notify_one();
        }
    }

    fn batch(&self) -> Vec<SpanData> {
        let mut batch = Vec::with_capacity(self.queued.load(Ordering::Relaxed).min(BATCH));
        while batch.len() < BATCH {
            match self.spans.pop() {
                Some(span) => batch.push(span),
                None => break,
            }
        }
        self.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        batch
    }

    /// Sends what is queued, a batch at a time, every [`EVERY`] or as soon as a
    /// batch is full; runs for the life of the proxy.
    pub async fn export(self: Arc<Self>, exporter: impl SpanExporter) {
        loop {
            let _ = tokio::time::timeout(EVERY, self.ready.notified()).await;
            self.send_queued(&exporter).await;
        }
    }

    async fn send_queued(&self, exporter: &impl SpanExporter) {
        loop {
            let batch = self.batch();
            if batch.is_empty() {
                return;
            }
            let n = batch.len() as u64;
            match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
                Ok(Ok(())) => {
                    self.counts.exported.inc_by(n);
                }
                Ok(Err(error)) => {
                    self.counts.export_failed.inc_by(n);
                    tracing::debug!(%error, spans = n, "the trace collector did not take spans");
                    return;
                }
                Err(_) => {
                    self.counts.export_failed.inc_by(n);
                    tracing::debug!(spans = n, "the trace collector did not answer in time");
                    return;
                }
            }
        }
    }
}

/// The SDK's hook: ended spans go to the queue.
#[derive(Debug)]
pub struct Enqueue(pub Arc<SpanQueue>);

impl SpanProcessor for Enqueue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.0.push(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceFlags};
    use opentelemetry_sdk::error::OTelSdkError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn span() -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                opentelemetry::trace::TraceId::from(1u128),
                opentelemetry::trace::SpanId::from(1u64),
                TraceFlags::SAMPLED,
                false,
                Default::default(),
            ),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: "test".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        }
    }

    #[derive(Debug)]
    struct Exporter {
        fail: bool,
        calls: AtomicUsize,
    }

    impl SpanExporter for Exporter {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self.fail {
                Err(OTelSdkError::InternalFailure("down".into()))
            } else {
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn a_full_queue_and_a_failed_export_drop_spans_and_count_them() {
        let counts = SpanCounts::default();
        let queue = SpanQueue::new(counts.clone());
        for _ in 0..QUEUE + 10 {
            queue.push(span());
        }
        assert_eq!(counts.queue_full.get(), 10);
        let down = Exporter {
            fail: true,
            calls: AtomicUsize::new(0),
        };
        queue.send_queued(&down).await;
        assert_eq!(counts.export_failed.get(), BATCH as u64);
        let up = Exporter {
            fail: false,
            calls: AtomicUsize::new(0),
        };
        queue.send_queued(&up).await;
        assert_eq!(counts.exported.get(), (QUEUE - BATCH) as u64);
        assert_eq!(
            up.calls.load(Ordering::Relaxed),
            (QUEUE - BATCH).div_ceil(BATCH)
        );
    }
}
