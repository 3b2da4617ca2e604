//! Traces (`[telemetry.traces]`, docs/operations.md "Traces"): a producer's W3C trace context
//! is taken from the request (HTTP headers, gRPC metadata, WebSocket upgrade headers) or from
//! an event's own `traceparent` header (MQTT 5 user properties, `headers` of JSON events),
//! continued by one `sluice.receive` span per batch with `admission`, `append` and `ack`
//! children, and stored with every event as its `traceparent` record header, so a consumer
//! continues the trace under Sluice's span.
//!
//! Spans are created with the OpenTelemetry SDK (ids, parent-based ratio sampling, limits) and
//! exported over OTLP/gRPC by `opentelemetry-otlp`. The batching between them is ours, on the
//! gateway's runtime: the SDK's batch processor exports from its own thread, where the tonic
//! exporter has no reactor (opentelemetry-rust#2673); ours also counts what it drops.

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sluice_config::TracesConfig;
use sluice_core::{Event, IngestRequest, Receipt, Rejection, TRACEPARENT, TRACESTATE};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// The longest `traceparent` and `tracestate` taken from a producer; longer ones are ignored
/// (W3C: a `tracestate` of up to 512 characters must be propagated).
const MAX_TRACEPARENT: usize = 128;
const MAX_TRACESTATE: usize = 512;
/// Links from one batch's span to the other traces its events carry.
const MAX_LINKS: usize = 32;
/// How long the exporter waits to fill a batch once it has a span.
const GATHER: Duration = Duration::from_millis(200);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpanLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    pub origin: &'static str,
}

/// `sluice_trace_spans_total{result}` and `sluice_trace_contexts_total{origin}`.
#[derive(Clone, Debug, Default)]
pub struct TraceMetrics {
    pub spans: Family<SpanLabels, Counter>,
    pub contexts: Family<OriginLabels, Counter>,
}

impl TraceMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "trace_spans",
            "Sampled spans by result: exported (the OTLP receiver took them), failed (the export was refused or timed out), dropped (telemetry.traces.max_queued_spans were already waiting)",
            self.spans.clone(),
        );
        registry.register(
            "trace_contexts",
            "Batches by where their trace came from: producer (a valid traceparent), started (none; Sluice started the trace), invalid (a traceparent that is not W3C Trace Context; Sluice started the trace)",
            self.contexts.clone(),
        );
    }

    fn span(&self, result: &'static str, n: usize) {
        self.spans
            .get_or_create(&SpanLabels { result })
            .inc_by(n as u64);
    }
}

/// Sluice's tracer: contexts in, spans out.
pub struct Traces {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    propagator: TraceContextPropagator,
    metrics: TraceMetrics,
    exporter: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces").finish_non_exhaustive()
    }
}

/// Hands finished spans to the exporter task through a bounded queue; a full queue drops.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
    metrics: TraceMetrics,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.metrics.span("dropped", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Drops every span (no OTLP endpoint: contexts are propagated, nothing is exported).
#[derive(Debug)]
struct Discard;

impl SpanProcessor for Discard {
    fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &Context) {}
    fn on_end(&self, _: SpanData) {}
    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }
    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Reads a `traceparent` and `tracestate` pair for the propagator.
struct Pair<'a>(&'a str, Option<&'a str>);

impl Extractor for Pair<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.0),
            TRACESTATE => self.1,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

impl Traces {
    /// Builds the tracer; with an OTLP endpoint, starts the exporter task (on the current
    /// runtime). `instance` names this gateway (`service.instance.id`).
    pub fn new(
        cfg: &TracesConfig,
        instance: Option<String>,
        metrics: TraceMetrics,
    ) -> anyhow::Result<Self> {
        let ratio = Sampler::TraceIdRatioBased(cfg.sampling_ratio);
        let sampler = if cfg.parent_based {
            Sampler::ParentBased(Box::new(ratio))
        } else {
            ratio
        };
        let mut resource = Resource::builder()
            .with_service_name(cfg.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if let Some(i) = instance {
            resource = resource.with_attribute(KeyValue::new("service.instance.id", i));
        }
        let resource = resource.build();
        let builder = SdkTracerProvider::builder()
            .with_sampler(sampler)
            .with_resource(resource.clone());
        let mut exporter_task = None;
        let provider = match &cfg.otlp_endpoint {
            Some(endpoint) => {
                use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
                let timeout = Duration::from_millis(cfg.export_timeout_ms);
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint.clone())
                    .with_timeout(timeout);
                if endpoint.starts_with("https://") {
                    b = b.with_tls_config(
                        opentelemetry_otlp::tonic_types::transport::ClientTlsConfig::new()
                            .with_native_roots(),
                    );
                }
                let mut exporter = b.build().map_err(|e| {
                    anyhow::anyhow!("telemetry.traces.otlp_endpoint `{endpoint}`: {e}")
                })?;
                exporter.set_resource(&resource);
                let (tx, rx) = mpsc::channel(cfg.max_queued_spans);
                let (stop_tx, stop_rx) = oneshot::channel();
                let task = tokio::spawn(export(
                    exporter,
                    rx,
                    stop_rx,
                    cfg.max_export_batch,
                    timeout,
                    metrics.clone(),
                ));
                exporter_task = Some((stop_tx, task));
                builder
                    .with_span_processor(Queue {
                        tx,
                        metrics: metrics.clone(),
                    })
                    .build()
            }
            None => builder.with_span_processor(Discard).build(),
        };
        let tracer = provider.tracer("sluice");
        Ok(Self {
            tracer,
            provider,
            propagator: TraceContextPropagator::new(),
            metrics,
            exporter: Mutex::new(exporter_task),
        })
    }

    /// The producer's span context in a `traceparent` (and `tracestate`) value, if valid.
    fn extract(&self, parent: &[u8], state: Option<&[u8]>) -> Option<SpanContext> {
        if parent.len() > MAX_TRACEPARENT {
            return None;
        }
        let parent = std::str::from_utf8(parent).ok()?;
        let state = state
            .filter(|s| s.len() <= MAX_TRACESTATE)
            .and_then(|s| std::str::from_utf8(s).ok());
        let cx = self.propagator.extract(&Pair(parent, state));
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    /// Starts a batch's trace at `started`: its `sluice.receive` span is a child of the
    /// producer's context (the request's, else its first event's own `traceparent`), or the
    /// root of a new trace. Its context goes into the records: events without a `traceparent`
    /// get Sluice's (one list for the batch when none has its own); an event whose own is in
    /// the same trace has it replaced by Sluice's; an event in another trace keeps its own and
    /// the span links to it. The request's `trace` becomes Sluice's context too, so what the
    /// batch causes (its dead letters) continues under this span.
    pub fn begin(&self, req: &mut IngestRequest, started: SystemTime) -> Trace {
        let from_request = req
            .trace
            .as_ref()
            .map(|t| (t.parent.clone(), t.state.clone()));
        let from_event = || {
            req.events
                .iter()
                .find_map(|e| own(e, TRACEPARENT).map(|p| (p.clone(), own(e, TRACESTATE).cloned())))
        };
        let raw = from_request.or_else(from_event);
        let parent = raw
            .as_ref()
            .and_then(|(p, s)| self.extract(p, s.as_deref()));
        let origin = match (&raw, &parent) {
            (_, Some(_)) => "producer",
            (None, None) => "started",
            (Some(_), None) => "invalid",
        };
        self.metrics
            .contexts
            .get_or_create(&OriginLabels { origin })
            .inc();
        let parent_cx = match parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        // Events with a context of their own: each parsed once. One in the parent's trace gets
        // Sluice's context in its place (below); one in another trace keeps its own, and the
        // span links to it (links are given at the start, so they are found first).
        let parent_trace = parent_cx
            .has_active_span()
            .then(|| parent_cx.span().span_context().trace_id());
        let mut links = Vec::new();
        let mut own_trace: Vec<Option<Option<opentelemetry::trace::TraceId>>> = Vec::new();
        if req.events.iter().any(|e| own(e, TRACEPARENT).is_some()) {
            own_trace = req
                .events
                .iter()
                .map(|e| {
                    let p = own(e, TRACEPARENT)?;
                    let sc = self.extract(p, own(e, TRACESTATE).map(|s| &s[..]));
                    let id = sc.as_ref().map(SpanContext::trace_id);
                    if let Some(sc) = sc
                        && links.len() < MAX_LINKS
                        && Some(sc.trace_id()) != parent_trace
                    {
                        links.push(Link::with_context(sc));
                    }
                    Some(id)
                })
                .collect();
        }
        let mut span = self
            .tracer
            .span_builder("sluice.receive")
            .with_kind(SpanKind::Server)
            .with_start_time(started)
            .with_links(links)
            .start_with_context(&self.tracer, &parent_cx);
        // Attributes only for spans that are kept (an unsampled batch allocates none).
        if span.is_recording() {
            span.set_attributes([
                KeyValue::new("messaging.system", "sluice"),
                KeyValue::new("messaging.operation.type", "send"),
                KeyValue::new("messaging.destination.name", req.stream().to_string()),
                KeyValue::new("messaging.batch.message_count", req.events.len() as i64),
                KeyValue::new("network.protocol.name", req.protocol.as_str()),
                KeyValue::new("sluice.principal", req.principal().name().to_string()),
            ]);
        }
        let sc = span.span_context().clone();
        let value = Bytes::from(format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ));
        let state = sc.trace_state().header();
        let state = (!state.is_empty()).then(|| Bytes::from(state));
        let name = Bytes::from_static(TRACEPARENT.as_bytes());
        let state_name = Bytes::from_static(TRACESTATE.as_bytes());
        if !own_trace.is_empty() {
            for (e, own_id) in req.events.iter_mut().zip(&own_trace) {
                match own_id {
                    // Its own context, in Sluice's trace (the parent's): Sluice's span instead.
                    Some(Some(id)) if *id == sc.trace_id() => {
                        for (k, v) in &mut e.headers {
                            if k.eq_ignore_ascii_case(TRACEPARENT.as_bytes()) {
                                *v = value.clone();
                            }
                        }
                    }
                    // Another trace's, or one that is not W3C: kept as sent.
                    Some(_) => {}
                    None => {
                        e.headers.push((name.clone(), value.clone()));
                        if let Some(s) = &state
                            && own(e, TRACESTATE).is_none()
                        {
                            e.headers.push((state_name.clone(), s.clone()));
                        }
                    }
                }
            }
        } else {
            req.record_headers.push((name, value.clone()));
            if let Some(s) = &state {
                req.record_headers.push((state_name, s.clone()));
            }
        }
        req.trace = Some(sluice_core::TraceHeaders {
            parent: value,
            state,
        });
        Trace {
            recording: span.is_recording(),
            cx: Context::new().with_span(span),
            started,
            admitted: None,
            appended: None,
        }
    }

    /// Exports what is queued and stops the exporter (at drain), within `deadline`.
    pub async fn shutdown(&self, deadline: Duration) {
        let _ = self.provider.shutdown();
        let task = self.exporter.lock().unwrap().take();
        if let Some((stop, task)) = task {
            let _ = stop.send(());
            let _ = tokio::time::timeout(deadline, task).await;
        }
    }
}

/// The value of an event's own header `name` (case-insensitive), if it has one.
fn own<'a>(e: &'a Event, name: &str) -> Option<&'a Bytes> {
    e.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name.as_bytes()))
        .map(|(_, v)| v)
}

/// One batch's trace: its `sluice.receive` span and when its steps ended.
pub struct Trace {
    cx: Context,
    recording: bool,
    started: SystemTime,
    admitted: Option<SystemTime>,
    appended: Option<SystemTime>,
}

impl Trace {
    /// Admission (schemas, dedup, quotas, budgets, the stream) is done; the append starts.
    pub fn admitted(&mut self) {
        if self.recording {
            self.admitted = Some(SystemTime::now());
        }
    }

    /// The append reached the stream's ack point.
    pub fn appended(&mut self) {
        if self.recording {
            self.appended = Some(SystemTime::now());
        }
    }

    /// Ends the batch's spans with its outcome: `admission` until admission ended (or the
    /// refusal), `append` from there to the ack point, `ack` from there to the answer.
    pub fn finish(self, tracer: &Traces, result: &Result<Vec<Receipt>, Rejection>) {
        let span = self.cx.span();
        if !self.recording {
            span.end();
            return;
        }
        let now = SystemTime::now();
        let child = |name: &'static str, from: SystemTime, to: SystemTime, err: Option<&str>| {
            let mut s = tracer
                .tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(from)
                .start_with_context(&tracer.tracer, &self.cx);
            if let Some(e) = err {
                s.set_status(Status::error(e.to_string()));
            }
            s.end_with_timestamp(to);
        };
        let refusal = result.as_ref().err().map(|r| r.to_string());
        match (self.admitted, self.appended) {
            (None, _) => child("admission", self.started, now, refusal.as_deref()),
            (Some(a), None) => {
                child("admission", self.started, a, None);
                child("append", a, now, refusal.as_deref());
            }
            (Some(a), Some(b)) => {
                child("admission", self.started, a, None);
                child("append", a, b, None);
                child("ack", b, now, None);
            }
        }
        match result {
            Ok(receipts) => {
                let failed = receipts
                    .iter()
                    .filter(|r| matches!(r, Receipt::Failed(_)))
                    .count();
                let duplicates = receipts
                    .iter()
                    .filter(|r| matches!(r, Receipt::Duplicate { .. }))
                    .count();
                span.set_attribute(KeyValue::new("sluice.events.failed", failed as i64));
                span.set_attribute(KeyValue::new("sluice.events.duplicate", duplicates as i64));
                span.set_attribute(KeyValue::new(
                    "sluice.outcome",
                    if failed == 0 { "ok" } else { "partial" },
                ));
            }
            Err(r) => {
                span.set_attribute(KeyValue::new("sluice.outcome", r.code()));
                span.set_status(Status::error(r.to_string()));
            }
        }
        span.end_with_timestamp(now);
    }
}

/// Exports queued spans in batches of up to `max_batch`, each within `timeout`; at `stop`,
/// exports what is queued and ends.
async fn export(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: oneshot::Receiver<()>,
    max_batch: usize,
    timeout: Duration,
    metrics: TraceMetrics,
) {
    let mut failing = false;
    let mut send = async |batch: Vec<SpanData>| {
        let n = batch.len();
        match tokio::time::timeout(timeout, exporter.export(batch)).await {
            Ok(Ok(())) => {
                metrics.span("exported", n);
                if failing {
                    tracing::info!("spans are exported again");
                    failing = false;
                }
            }
            outcome => {
                metrics.span("failed", n);
                let why = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {} ms", timeout.as_millis()),
                };
                if !failing {
                    tracing::warn!(spans = n, error = %why, "could not export spans to the OTLP endpoint; they are counted in sluice_trace_spans_total{{result=\"failed\"}}");
                    failing = true;
                } else {
                    tracing::debug!(spans = n, error = %why, "span export failed");
                }
            }
        }
    };
    loop {
        let first = tokio::select! {
            _ = &mut stop => break,
            s = rx.recv() => match s {
                Some(s) => s,
                None => break,
            },
        };
        let mut batch = Vec::with_capacity(max_batch);
        batch.push(first);
        let until = tokio::time::Instant::now() + GATHER;
        while batch.len() < max_batch {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                _ => break,
            }
        }
        send(batch).await;
    }
    // Draining: what is queued now goes out, in batches.
    let mut batch = Vec::with_capacity(max_batch);
    while let Ok(s) = rx.try_recv() {
        batch.push(s);
        if batch.len() == max_batch {
            send(std::mem::take(&mut batch)).await;
        }
    }
    if !batch.is_empty() {
        send(batch).await;
    }
}
