//! The admission path every protocol's events take into the log, in one place:
//! admit (authorize, once per batch) → size → count → validate → quotas → in-flight budget →
//! resolve the stream → stream budget → append → record. `Gateway::ingest` lists the steps.

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashSet;

use sluice_config::{QuotaPolicy, QuotaScope, QuotasConfig, StreamsConfig};
use sluice_core::metrics::{
    AckLabels, Metrics, ProtocolLabels, ShedLabels, StreamLabels, ThrottleLabels,
};
use sluice_core::{
    Admission, Budget, Event, Ingest, IngestRequest, Principal, Receipt, Rejection, StreamName,
};

use sluice_auth::Swap;

use crate::dedup::{Dedup, Plan, Tickets};
use crate::quota::{Cluster, Quotas, Verdict};
use crate::schema::{
    Invalid, InvalidLabels, SCHEMA_HEADER, SchemaMetrics, Schemas, StreamLabel, StreamSchema,
};
use crate::sink::{Held, Sink};
use crate::traces::{Trace, Traces};
use sluice_core::RECORD_OVERHEAD;

/// What a configuration reload replaces: stream settings and quotas. Requests in flight keep
/// the snapshot they started with.
pub struct Policy {
    streams: StreamsConfig,
    quotas: Quotas,
    max_delay: Duration,
    metrics_principals: HashSet<String>,
    /// Compiled schemas by stream (docs/schemas.md).
    schemas: Arc<Schemas>,
}

impl Policy {
    /// `cluster`: what rules with `cluster = true` share their buckets through (with Redis as
    /// the state store).
    pub fn new(
        streams: &StreamsConfig,
        quotas: &QuotasConfig,
        schemas: Schemas,
        cluster: Option<Arc<Cluster>>,
    ) -> Self {
        Self {
            streams: streams.clone(),
            quotas: Quotas::new(quotas, cluster),
            max_delay: Duration::from_millis(quotas.max_delay_ms),
            metrics_principals: quotas.metrics_principals.iter().cloned().collect(),
            schemas: Arc::new(schemas),
        }
    }
}

/// The gateway's implementation of [`Ingest`] over its sink (the embedded log or Kafka).
pub struct Gateway {
    policy: Swap<Policy>,
    sink: Sink,
    budget: Budget,
    /// Per-stream budgets (`max_in_flight_bytes` of a stream), by stream, with their size.
    stream_budgets: std::sync::Mutex<std::collections::HashMap<String, (u64, Budget)>>,
    metrics: Metrics,
    /// Set when the drain deadline is near: batches still waiting for their ack point are
    /// answered with a retryable error instead of being cut off when the process exits.
    deadline: tokio::sync::watch::Sender<bool>,
    /// Streams each principal created by producing to them, since start (entries only for
    /// principals that created one, so bounded by `streams.max_streams`).
    created_by: std::sync::Mutex<std::collections::HashMap<Arc<str>, usize>>,
    /// The window of recent keys that answers retries (streams with `dedup = true`).
    dedup: Arc<Dedup>,
    /// Rendered records near the end of each stream, shared by its readers.
    read_cache: crate::read::Caches,
    schema_metrics: SchemaMetrics,
    /// What cluster-wide quota rules share (with Redis as the state store).
    cluster: Option<Arc<Cluster>>,
    /// Traces (`[telemetry.traces]` enabled).
    traces: Option<Arc<Traces>>,
}

impl Gateway {
    /// From now on, batches waiting for their ack point are answered with a retryable error
    /// (the drain deadline is near; see `server.shutdown_timeout_ms`).
    pub fn answer_in_flight_now(&self) {
        self.deadline.send_replace(true);
    }

    pub fn new(
        streams: StreamsConfig,
        sink: Sink,
        max_in_flight_bytes: u64,
        quotas: &QuotasConfig,
        metrics: Metrics,
        dedup: Arc<Dedup>,
        schemas: Schemas,
    ) -> Self {
        // Cluster-wide quota rules share their buckets through the state store's Redis.
        let cluster = dedup.redis_store().map(|store| {
            Arc::new(Cluster::new(
                store,
                &quotas.cluster,
                dedup.metrics().clone(),
                crate::quota::ClusterMetrics::default(),
            ))
        });
        Self {
            policy: Swap::new(Policy::new(&streams, quotas, schemas, cluster.clone())),
            cluster,
            schema_metrics: SchemaMetrics::default(),
            sink,
            budget: Budget::new(max_in_flight_bytes),
            stream_budgets: Default::default(),
            metrics,
            deadline: tokio::sync::watch::channel(false).0,
            created_by: Default::default(),
            dedup,
            read_cache: crate::read::Caches::new(),
            traces: None,
        }
    }

    /// Traces every batch with `traces` (`[telemetry.traces]` enabled).
    pub fn with_traces(mut self, traces: Option<Arc<Traces>>) -> Self {
        self.traces = traces;
        self
    }

    /// The tracer, when `[telemetry.traces]` is enabled.
    pub fn traces(&self) -> Option<&Arc<Traces>> {
        self.traces.as_ref()
    }

    /// What cluster-wide quota rules share, if Redis is the state store.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.cluster.clone()
    }

    /// The schema step's metrics (registered by the app).
    pub fn schema_metrics(&self) -> &SchemaMetrics {
        &self.schema_metrics
    }

    /// The dedup window.
    pub fn dedup(&self) -> &Arc<Dedup> {
        &self.dedup
    }

    /// Forgets the dedup keys that expired, on every stream (the admission path does this for
    /// the streams it touches; this frees idle streams' keys).
    pub fn sweep_dedup(&self) {
        let policy = self.policy.load();
        self.dedup
            .sweep(|name| policy.streams.settings(name).dedup_window_ms);
    }

    /// Whether the principal may create one more stream; `Some(reservation)` when `stream`
    /// would be created by this request and counts against it (released if the creation does
    /// not happen).
    fn reserve_creation(
        &self,
        principal: &Principal,
        stream: &str,
        streams: &sluice_config::StreamsConfig,
    ) -> Result<Option<Arc<str>>, Rejection> {
        let max = streams.max_streams_per_principal;
        // Declared streams exist from startup; with Kafka, a topic this gateway has not used
        // yet may exist already (the broker decides).
        if max == 0
            || streams.declare.contains_key(stream)
            || self.sink.known(stream) != Some(false)
        {
            return Ok(None);
        }
        let mut created = self.created_by.lock().unwrap();
        let n = created.entry(principal.identity().clone()).or_insert(0);
        if *n >= max {
            return Err(Rejection::OverQuota {
                retry_after: Duration::from_secs(60),
                message: format!(
                    "stream `{stream}` does not exist, and principal `{}` has created its maximum of {max} streams (streams.max_streams_per_principal)",
                    principal.name()
                ),
            });
        }
        *n += 1;
        Ok(Some(principal.identity().clone()))
    }

    /// Gives back a creation reserved by a request whose stream was not created after all.
    fn release_creation(&self, principal: &str) {
        let mut created = self.created_by.lock().unwrap();
        if let Some(n) = created.get_mut(principal) {
            *n -= 1;
            if *n == 0 {
                created.remove(principal);
            }
        }
    }

    /// The stream's own budget, if its settings give it one; a changed size (after a reload)
    /// takes effect for new requests.
    fn stream_budget(&self, stream: &str, size: u64) -> Option<Budget> {
        if size == 0 {
            return None;
        }
        let mut m = self.stream_budgets.lock().unwrap();
        match m.get(stream) {
            Some((s, b)) if *s == size => Some(b.clone()),
            _ => {
                let b = Budget::new(size);
                m.insert(stream.to_string(), (size, b.clone()));
                Some(b)
            }
        }
    }

    fn shed(&self, stream: &str, reason: &'static str, events: usize) {
        self.metrics
            .events_shed
            .get_or_create(&ShedLabels {
                stream: self.stream_label(stream),
                reason,
            })
            .inc_by(events as u64);
    }

    /// The `stream` label for events refused before their stream was created: the name if the
    /// stream exists, `other` otherwise, so refused producers cannot mint label series.
    fn stream_label(&self, stream: &str) -> String {
        if self.sink.known(stream) == Some(true) {
            stream.to_string()
        } else {
            "other".to_string()
        }
    }

    /// Replaces stream settings and quotas (quota buckets start full again).
    pub fn reload(&self, policy: Policy) {
        self.policy.store(policy);
    }

    /// The schemas in force (a reload checks new versions against them).
    pub fn schemas(&self) -> Arc<Schemas> {
        self.policy.load().schemas.clone()
    }

    /// Runs the quotas over the request's events: with a `delay` rule, waits (up to
    /// `quotas.max_delay_ms`) for the rest of the batch to fit.
    async fn throttle(
        &self,
        policy: &Policy,
        principal: &Principal,
        stream: &str,
        sizes: &[usize],
    ) -> Verdict {
        let start = tokio::time::Instant::now();
        let mut admitted = 0;
        let mut delayed = false;
        loop {
            let v = policy
                .quotas
                .check(
                    principal.name(),
                    principal.identity(),
                    stream,
                    &sizes[admitted..],
                )
                .await;
            admitted += v.admitted;
            let done = admitted == sizes.len()
                || v.policy != QuotaPolicy::Delay
                || start.elapsed().saturating_add(v.retry_after) > policy.max_delay;
            if done {
                if delayed {
                    self.metrics.requests_delayed.inc();
                }
                return Verdict { admitted, ..v };
            }
            delayed = true;
            tokio::time::sleep(v.retry_after).await;
        }
    }

    /// Bytes admitted and not yet at their ack point.
    pub fn in_flight_bytes(&self) -> usize {
        self.budget.in_use()
    }

    /// The log behind this gateway.
    pub fn sink(&self) -> &Sink {
        &self.sink
    }
}

impl Ingest for Gateway {
    fn streams(&self, principal: &Principal) -> Vec<sluice_core::StreamInfo> {
        crate::read::streams(&self.sink, principal)
    }

    async fn read(
        &self,
        principal: &Principal,
        request: sluice_core::ReadRequest,
    ) -> Result<sluice_core::ReadBatch, sluice_core::ReadError> {
        let stream = request.stream.clone();
        let mut batch = crate::read::read(&self.sink, &self.read_cache, principal, request).await?;
        // Read quotas (`on = "consume"` rules) count what is sent: the records that fit go,
        // the rest waits for the reader's next read; none fitting is 429 with Retry-After.
        let policy = self.policy.load();
        if batch.records.is_empty() || !policy.quotas.limits_reads() {
            return Ok(batch);
        }
        let sizes: Vec<usize> = batch.records.iter().map(|r| r.size).collect();
        let v = policy
            .quotas
            .check_on(
                sluice_config::QuotaDirection::Consume,
                principal.name(),
                principal.identity(),
                stream.as_str(),
                &sizes,
            )
            .await;
        if v.admitted == 0 {
            let scope = v.scope.map_or("", |s| s.as_str());
            return Err(sluice_core::ReadError::Rejected(Rejection::OverQuota {
                retry_after: crate::quota::hint(v.retry_after),
                message: format!(
                    "read quota exceeded ({scope} limit {}); retry after the hinted time",
                    v.limit
                ),
            }));
        }
        batch.truncate(v.admitted);
        Ok(batch)
    }

    fn admit(&self, principal: &Principal, stream: &StreamName) -> Result<Admission, Rejection> {
        // Authorize first: an unauthorized producer learns nothing about which streams exist.
        // This is the only authorization of a batch; its admission goes into the request.
        if !principal.may_produce_to(stream.as_str()) {
            return Err(Rejection::Forbidden {
                stream: stream.to_string(),
            });
        }
        // Then existence, so a typo in a stream name is a 404 before any body is read.
        let name = stream.as_str();
        let policy = self.policy.load();
        if !policy.streams.auto_create
            && !policy.streams.declare.contains_key(name)
            && self.sink.known(name) == Some(false)
        {
            return Err(Rejection::NotFound {
                stream: name.to_string(),
            });
        }
        // A principal that has created its share of streams learns so before its body is
        // read (the count itself is taken when the stream is created).
        if let Some(p) = self.reserve_creation(principal, name, &policy.streams)? {
            self.release_creation(&p);
        }
        let admission = Admission::granted(
            principal.clone(),
            stream.clone(),
            policy.streams.settings(name),
        );
        // Only with quotas is there a state to answer with (and a cell to allocate).
        Ok(if policy.quotas.is_empty() {
            admission
        } else {
            admission.with_rate_limits()
        })
    }

    /// One admitted batch: its steps ([`Gateway::steps`]), traced when tracing is on.
    async fn ingest(&self, req: IngestRequest) -> Result<Vec<Receipt>, Rejection> {
        let Some(traces) = &self.traces else {
            return self.steps(req, None).await;
        };
        let mut trace = None;
        let result = self.steps(req, Some((traces, &mut trace))).await;
        if let Some(t) = trace {
            t.finish(traces, &result);
        }
        result
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn budget(&self) -> &Budget {
        &self.budget
    }
}

/// Where a batch's trace is kept while its steps run (tracing on).
type Tracing<'a> = Option<(&'a Traces, &'a mut Option<Trace>)>;

impl Gateway {
    /// The path of one admitted batch, as named steps in the order they run. Whole-batch
    /// refusals are returned (the adapter counts the request's outcome by the rejection's code);
    /// what happened to each event is counted in [`Gateway::record`].
    async fn steps(
        &self,
        mut req: IngestRequest,
        mut tracing: Tracing<'_>,
    ) -> Result<Vec<Receipt>, Rejection> {
        let started = tracing.as_ref().map(|_| std::time::SystemTime::now());
        let policy = self.policy.load();
        // MQTT marks every QoS 1/2 publish with its packet key; only a stream that deduplicates
        // by it stores it (and pays for its bytes).
        drop_unused_packet_keys(&mut req);
        // Sized once: every later step reads these figures.
        let mut sizes = Sizes::of(&req.events);
        // Counted before anything can refuse the batch: the denominator of every refusal rate.
        self.count_received(&req, &sizes);
        // The stream's limits, as admitted, before anything is charged: oversized input costs
        // nobody else.
        validate(&req, &sizes)?;
        // The batch's trace starts once it is known to be well-formed; its context goes into
        // the records (not counted against `max_event_bytes`).
        if let (Some((traces, slot)), Some(at)) = (tracing.as_mut(), started) {
            **slot = Some(traces.begin(&mut req, at));
        }
        // The stream's schema: an invalid event is answered on its own (refused, or stored in
        // the dead-letter stream) and the others go on; valid ones carry the schema's id.
        let set_aside = self.check_schemas(&policy, &mut req).await;
        if !set_aside.is_empty() {
            if req.events.is_empty() {
                return Ok(sluice_core::merge_at(Vec::new(), set_aside));
            }
            sizes = Sizes::of(&req.events);
        }
        // Retries are answered from the dedup window and go no further: they cost no quota and
        // no budget. What goes on holds a claim on its key until its append is answered.
        let mut plan = self.plan(&mut req).await?;
        if let Some(p) = &plan {
            if p.all_answered() {
                let receipts = p.receipts(Vec::new());
                self.count_duplicates(&req, p);
                return Ok(sluice_core::merge_at(receipts, set_aside));
            }
            sizes = Sizes::of(&req.events);
        }
        let mut tickets = plan.as_mut().map(Plan::take_tickets);
        // Quotas before the budget, so a producer over its quota holds no in-flight bytes; the
        // longest prefix that fits goes on and the rest is answered per event.
        let refused = self.apply_quotas(&policy, &mut req, &sizes).await?;
        if let Some(t) = &mut tickets {
            t.truncate(req.events.len());
        }
        // The in-flight budget bounds memory when the log is slower than the producers.
        let global = self.hold_global(&mut req, &sizes)?;
        // The stream exists (or is created, within the stream limits) before anything is kept
        // per stream, so made-up stream names cannot grow the per-stream tables.
        let target = self.resolve(&policy, &req).await?;
        // The stream's own budget keeps one slow or hot stream from taking the whole global one.
        let stream = self.hold_stream(&req, &sizes)?;
        // Quota refusals are counted once the stream exists, so they carry its name.
        if let Some((_, v, n)) = &refused {
            self.count_throttled(&policy, &req, v, *n);
        }
        // Append; the answer comes at the stream's ack point, or at the drain deadline.
        let held = Held { global, stream };
        let mark = |tracing: &mut Tracing<'_>, f: fn(&mut Trace)| {
            if let Some((_, Some(t))) = tracing {
                f(t);
            }
        };
        mark(&mut tracing, Trace::admitted);
        let (req, mut receipts) = self.append(req, target, held, tickets).await?;
        mark(&mut tracing, Trace::appended);
        if let Some((r, _, n)) = refused {
            receipts.extend(std::iter::repeat_n(Receipt::Failed(r), n));
        }
        self.record(&req, &sizes, &receipts);
        let receipts = match &plan {
            Some(p) => {
                self.count_duplicates(&req, p);
                p.receipts(receipts)
            }
            None => receipts,
        };
        Ok(sluice_core::merge_at(receipts, set_aside))
    }
}

/// A batch's sizes, computed once: what each event is charged (its size plus record framing),
/// and the total of the events' own sizes.
struct Sizes {
    charges: Vec<usize>,
    bytes: usize,
}

impl Sizes {
    fn of(events: &[Event]) -> Self {
        let charges: Vec<usize> = events.iter().map(Event::charge).collect();
        let bytes = charges.iter().sum::<usize>() - charges.len() * RECORD_OVERHEAD;
        Self { charges, bytes }
    }

    /// Event sizes (against `max_event_bytes`).
    fn size(&self, i: usize) -> usize {
        self.charges[i] - RECORD_OVERHEAD
    }

    /// The first `n` events' sizes and charges.
    fn prefix(&self, n: usize) -> (usize, usize) {
        let charge: usize = self.charges[..n].iter().sum();
        (charge - n * RECORD_OVERHEAD, charge)
    }
}

type BoxedIngest<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Vec<Receipt>, Rejection>> + Send + 'a>,
>;

/// A quota refusal of a batch's tail: the rejection, the verdict, and how many events.
type Refused = Option<(Rejection, Verdict, usize)>;

impl Gateway {
    fn count_received(&self, req: &IngestRequest, sizes: &Sizes) {
        let protocol = ProtocolLabels {
            protocol: req.protocol.as_str(),
        };
        self.metrics
            .events_received
            .get_or_create(&protocol)
            .inc_by(req.events.len() as u64);
        self.metrics
            .bytes_received
            .get_or_create(&protocol)
            .inc_by(sizes.bytes as u64);
    }

    /// Runs the quotas; a batch refused whole is an error, a refused tail is split off.
    async fn apply_quotas(
        &self,
        policy: &Policy,
        req: &mut IngestRequest,
        sizes: &Sizes,
    ) -> Result<Refused, Rejection> {
        if policy.quotas.is_empty() {
            return Ok(None);
        }
        let name = req.stream().as_str();
        let v = self
            .throttle(policy, req.principal(), name, &sizes.charges)
            .await;
        req.admission.rate_limits().set(v.limits.clone());
        if v.admitted == sizes.charges.len() {
            return Ok(None);
        }
        let r = over_quota(&v, name);
        if v.admitted == 0 {
            self.count_throttled(policy, req, &v, sizes.charges.len());
            return Err(r);
        }
        let n = req.events.len() - v.admitted;
        req.events.truncate(v.admitted);
        Ok(Some((r, v, n)))
    }

    /// Settles what the adapter reserved while receiving to the admitted events' exact charge.
    fn hold_global(
        &self,
        req: &mut IngestRequest,
        sizes: &Sizes,
    ) -> Result<sluice_core::Reservation, Rejection> {
        let (_, charge) = sizes.prefix(req.events.len());
        let mut reservation = std::mem::replace(&mut req.reservation, self.budget.empty());
        if let Err(shed) = reservation.resize(charge) {
            self.shed(req.stream().as_str(), "in_flight_budget", req.events.len());
            return Err(shed);
        }
        Ok(reservation)
    }

    /// The stream's place in the sink, created if it has to be (counted against its principal).
    async fn resolve(
        &self,
        policy: &Policy,
        req: &IngestRequest,
    ) -> Result<crate::sink::Target, Rejection> {
        let name = req.stream().as_str();
        let creation = self.reserve_creation(req.principal(), name, &policy.streams)?;
        self.sink
            .target(name, &policy.streams)
            .await
            .inspect_err(|_| {
                if let Some(p) = &creation {
                    self.release_creation(p);
                }
            })
    }

    fn hold_stream(
        &self,
        req: &IngestRequest,
        sizes: &Sizes,
    ) -> Result<Option<sluice_core::Reservation>, Rejection> {
        let name = req.stream().as_str();
        let Some(budget) = self.stream_budget(name, req.admission.settings().max_in_flight_bytes)
        else {
            return Ok(None);
        };
        let (_, charge) = sizes.prefix(req.events.len());
        match budget.try_reserve(charge) {
            Ok(r) => Ok(Some(r)),
            Err(_) => {
                self.shed(name, "stream_in_flight_budget", req.events.len());
                Err(Rejection::unavailable(
                    sluice_core::budget::RETRY_AFTER,
                    format!(
                        "the log is not keeping up with stream `{name}`: its in-flight budget is exhausted"
                    ),
                ))
            }
        }
    }

    /// The schema step, for streams with a schema: removes the invalid events from `req` and
    /// answers each where it stood (a `malformed` refusal, or where the dead-letter stream
    /// stored it). Large batches are checked on the blocking pool.
    async fn check_schemas(
        &self,
        policy: &Policy,
        req: &mut IngestRequest,
    ) -> Vec<(usize, Receipt)> {
        let Some(schema) = policy.schemas.of(req.stream().as_str()).cloned() else {
            return Vec::new();
        };
        // The versions this batch is checked against, held to the end.
        let resolved = match schema.resolve() {
            Ok(r) => Arc::new(r),
            Err(message) => {
                let n = req.events.len();
                req.events.clear();
                let r = Rejection::Unavailable {
                    retry_after: std::time::Duration::from_secs(5),
                    message,
                };
                return (0..n).map(|i| (i, Receipt::Failed(r.clone()))).collect();
            }
        };
        let events = std::mem::take(&mut req.events);
        // As the HTTP adapter parses bodies: inline up to 64 KiB, on the blocking pool beyond.
        let large = events.iter().map(|e| e.value.len()).sum::<usize>() > 64 * 1024;
        let check = {
            let resolved = resolved.clone();
            move || {
                let mut events = events;
                // Encoded values (Avro) share one buffer: about the size of what came in.
                let mut arena = match resolved.content_type() {
                    Some(_) => crate::schema::Arena::with_capacity(
                        events.iter().map(|e| e.value.len() + 8).sum(),
                    ),
                    None => crate::schema::Arena::default(),
                };
                // Checked in place; an invalid event is left as it came.
                let batch_label = resolved.label().clone();
                let mut why = Vec::new();
                let mut labels = Vec::new();
                let mut uniform = true;
                for (i, e) in events.iter_mut().enumerate() {
                    match resolved.admit(e, i, &mut arena) {
                        Ok(label) => {
                            uniform &= label == batch_label;
                            labels.push(label);
                        }
                        Err(w) => why.push((i, w)),
                    }
                }
                arena.finish(&mut events);
                let (mut keep, mut bad) = (Vec::new(), Vec::new());
                if why.is_empty() {
                    keep = events;
                } else {
                    keep.reserve(events.len() - why.len());
                    bad.reserve(why.len());
                    let mut why = why.into_iter().peekable();
                    for (i, e) in events.into_iter().enumerate() {
                        match why.next_if(|(j, _)| *j == i) {
                            Some((_, w)) => bad.push((i, e, w)),
                            None => keep.push(e),
                        }
                    }
                }
                // One header for the whole batch when it passed one version; else each event
                // says which version passed it.
                let label = if uniform {
                    Some(batch_label)
                } else {
                    crate::schema::label_each(&mut keep, labels);
                    None
                };
                (keep, bad, label)
            }
        };
        let (keep, bad, label) = if large {
            tokio::task::spawn_blocking(check)
                .await
                .expect("schema check task")
        } else {
            check()
        };
        req.events = keep;
        if let Some(label) = label
            && !req.events.is_empty()
        {
            req.record_headers
                .push((bytes::Bytes::from_static(SCHEMA_HEADER.as_bytes()), label));
        }
        if bad.is_empty() {
            if let Some(t) = resolved.content_type() {
                req.content_type = bytes::Bytes::from_static(t.as_bytes());
            }
            return Vec::new();
        }
        let stream = req.stream().to_string();
        for (_, _, why) in &bad {
            self.schema_metrics
                .invalid
                .get_or_create(&InvalidLabels {
                    stream: stream.clone(),
                    reason: why.reason.clone(),
                })
                .inc();
        }
        let set_aside = match schema.policy {
            sluice_config::InvalidPolicy::Reject => bad
                .into_iter()
                .map(|(i, _, why)| {
                    (
                        i,
                        Receipt::Failed(Rejection::Malformed {
                            message: format!("event {i}: {why}"),
                        }),
                    )
                })
                .collect(),
            sluice_config::InvalidPolicy::DeadLetter => {
                self.dead_letter(req, &schema, resolved.label(), bad).await
            }
        };
        // What is stored is now the schema's encoding (Avro binary), whatever came in; the
        // dead-letter stream above kept the original type with the original bytes.
        if let Some(t) = resolved.content_type() {
            req.content_type = bytes::Bytes::from_static(t.as_bytes());
        }
        set_aside
    }

    /// Stores invalid events in the dead-letter stream, with their original bytes and why
    /// (docs/schemas.md), as the same principal and protocol: where each went, or why not (a
    /// retryable refusal when the dead-letter stream cannot take them now: nothing is dropped).
    async fn dead_letter(
        &self,
        req: &IngestRequest,
        schema: &StreamSchema,
        label: &bytes::Bytes,
        bad: Vec<(usize, Event, Invalid)>,
    ) -> Vec<(usize, Receipt)> {
        let h = |s: &'static str| bytes::Bytes::from_static(s.as_bytes());
        let source = bytes::Bytes::from(req.stream().to_string());
        let mut at = Vec::with_capacity(bad.len());
        let mut reasons = Vec::with_capacity(bad.len());
        let mut events = Vec::with_capacity(bad.len());
        for (i, mut e, why) in bad {
            let text = why.to_string();
            e.headers.push((
                h("sluice-dead-letter-reason"),
                bytes::Bytes::from(text.clone()),
            ));
            e.headers
                .push((h("sluice-dead-letter-rule"), bytes::Bytes::from(why.reason)));
            e.headers
                .push((h("sluice-dead-letter-path"), bytes::Bytes::from(why.path)));
            e.headers
                .push((h("sluice-dead-letter-source"), source.clone()));
            e.headers.push((h(SCHEMA_HEADER), label.clone()));
            // The dead-letter stream has partitions of its own.
            e.partition = None;
            at.push(i);
            reasons.push(Arc::<str>::from(text));
            events.push(e);
        }
        let n = events.len();
        let stream = match StreamName::parse(&schema.dead_letter) {
            Ok(s) => s,
            Err(r) => {
                return at
                    .into_iter()
                    .map(|i| (i, Receipt::Failed(r.clone())))
                    .collect();
            }
        };
        let policy = self.policy.load();
        let dl = IngestRequest {
            admission: Admission::granted(
                req.principal().clone(),
                stream.clone(),
                policy.streams.settings(stream.as_str()),
            ),
            protocol: req.protocol,
            content_type: req.content_type.clone(),
            record_headers: Vec::new(),
            events,
            reservation: self.budget.empty(),
            queued: None,
            // Continues under the batch's span (its trace context, when tracing is on).
            trace: req.trace.clone(),
        };
        // The dead-letter stream has no schema of its own (check-config refuses one), so this
        // goes through the path above once.
        let receipts = match self.ingest_boxed(dl).await {
            Ok(r) => r,
            Err(r) => vec![Receipt::Failed(r); n],
        };
        let name: Arc<str> = stream.shared();
        let mut stored = 0;
        let out = at
            .into_iter()
            .zip(receipts)
            .zip(reasons)
            .map(|((i, r), reason)| {
                let r = match r.position() {
                    Some((partition, offset)) => {
                        stored += 1;
                        Receipt::DeadLettered {
                            stream: name.clone(),
                            partition,
                            offset,
                            reason,
                        }
                    }
                    None => r,
                };
                (i, r)
            })
            .collect();
        if stored > 0 {
            self.schema_metrics
                .dead_lettered
                .get_or_create(&StreamLabel {
                    stream: req.stream().to_string(),
                })
                .inc_by(stored);
        }
        out
    }

    /// [`Ingest::ingest`] behind a box of a named type, for the dead-letter step's append
    /// (a path that goes through `ingest` again).
    fn ingest_boxed(&self, req: IngestRequest) -> BoxedIngest<'_> {
        Box::pin(Ingest::ingest(self, req))
    }

    /// The dedup step, for streams with `dedup = true`.
    async fn plan(&self, req: &mut IngestRequest) -> Result<Option<Plan>, Rejection> {
        if !req.admission.settings().dedup {
            return Ok(None);
        }
        self.dedup.plan(req).await.map(Some)
    }

    fn count_duplicates(&self, req: &IngestRequest, plan: &Plan) {
        let n = plan.duplicates();
        if n > 0 {
            self.dedup
                .metrics()
                .duplicates
                .get_or_create(&crate::dedup::DuplicateLabels {
                    // A duplicate's original was stored, so its stream exists: a bounded label
                    // (even on a gateway that has not appended to it itself).
                    stream: req.stream().to_string(),
                    protocol: req.protocol.as_str(),
                })
                .inc_by(n as u64);
        }
    }

    /// Appends the batch and waits for its ack point; past the drain deadline, answers with a
    /// retryable error instead of being cut off when the process exits. When the events hold
    /// dedup claims, the append runs on its own task and records their positions even if the
    /// producer goes away meanwhile: an event in the log always answers its retries.
    async fn append(
        &self,
        mut req: IngestRequest,
        target: crate::sink::Target,
        held: Held,
        tickets: Option<Tickets>,
    ) -> Result<(IngestRequest, Vec<Receipt>), Rejection> {
        use futures_util::FutureExt;
        let ack = req.admission.settings().ack;
        let protocol = req.protocol;
        let queued = req.queued.take();
        let started = std::time::Instant::now();
        self.metrics
            .batch_events
            .get_or_create(&ProtocolLabels {
                protocol: protocol.as_str(),
            })
            .observe(req.events.len() as f64);
        let detach = tickets.as_ref().is_some_and(Tickets::any);
        let run = async move {
            let receipts = target.append(&req, ack, held, queued).await;
            if let Some(t) = tickets {
                t.settle(&receipts).await;
            }
            (req, receipts)
        };
        let appended = if detach {
            tokio::spawn(run)
                .map(|r| r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())))
                .left_future()
        } else {
            run.right_future()
        };
        let mut deadline = self.deadline.subscribe();
        let (req, receipts) = tokio::select! {
            r = appended => r,
            _ = deadline.wait_for(|passed| *passed) => {
                return Err(Rejection::unavailable(
                    Duration::from_secs(1),
                    "the gateway is shutting down and these events did not reach their ack point in time; they may or may not be stored: retry",
                ));
            }
        };
        self.metrics
            .ack_seconds
            .get_or_create(&AckLabels {
                protocol: protocol.as_str(),
                ack: ack.as_str(),
            })
            .observe(started.elapsed().as_secs_f64());
        Ok((req, receipts))
    }

    /// Counts what happened to the appended events: those the log refused by their own
    /// rejection code (quota refusals were counted as throttled), the rest as appended.
    fn record(&self, req: &IngestRequest, sizes: &Sizes, receipts: &[Receipt]) {
        let appended = req.events.len();
        let mut failed = 0;
        for r in &receipts[..appended] {
            if let Receipt::Failed(r) = r {
                failed += 1;
                self.metrics.rejected(req.protocol.as_str(), r.code(), 1);
            }
        }
        if failed < appended {
            let labels = StreamLabels {
                stream: req.stream().to_string(),
                protocol: req.protocol.as_str(),
            };
            let (bytes, _) = sizes.prefix(appended);
            self.metrics
                .events_in
                .get_or_create(&labels)
                .inc_by((appended - failed) as u64);
            self.metrics
                .bytes_in
                .get_or_create(&labels)
                .inc_by(bytes as u64);
            self.metrics.stream_appended(&labels.stream);
        }
    }

    fn count_throttled(&self, policy: &Policy, req: &IngestRequest, v: &Verdict, n: usize) {
        let name = req.principal().name();
        let principal = if policy.metrics_principals.contains(name) {
            name.to_string()
        } else {
            "other".to_string()
        };
        self.metrics
            .events_throttled
            .get_or_create(&ThrottleLabels {
                stream: self.stream_label(req.stream().as_str()),
                scope: v.scope.map_or("stream", QuotaScope::as_str),
                principal,
            })
            .inc_by(n as u64);
    }
}

/// The rejection of events a quota refused.
fn over_quota(v: &Verdict, stream: &str) -> Rejection {
    let scope = v.scope.map_or("stream", QuotaScope::as_str);
    if v.retry_after == Duration::MAX {
        return Rejection::TooLarge {
            message: format!(
                "larger than the whole burst of the {scope} quota ({}) on stream `{stream}`; it can never be admitted",
                v.limit
            ),
        };
    }
    let retry_after = crate::quota::hint(v.retry_after);
    Rejection::OverQuota {
        retry_after,
        message: format!(
            "over the {scope} quota of {} on stream `{stream}`; retry after {} ms",
            v.limit,
            retry_after.as_millis()
        ),
    }
}

/// Removes the MQTT packet keys ([`sluice_core::MQTT_PACKET_HEADER`]) the stream does not
/// deduplicate by.
fn drop_unused_packet_keys(req: &mut IngestRequest) {
    let s = req.admission.settings();
    if req.protocol != sluice_core::Protocol::Mqtt || (s.dedup && s.dedup_keys.mqtt_packet) {
        return;
    }
    for e in &mut req.events {
        e.headers
            .retain(|(k, _)| &k[..] != sluice_core::MQTT_PACKET_HEADER.as_bytes());
    }
}

/// Checks the request against the stream's limits, as admitted.
fn validate(req: &IngestRequest, sizes: &Sizes) -> Result<(), Rejection> {
    let s = req.admission.settings();
    let n = req.events.len();
    if n == 0 {
        return Err(Rejection::Malformed {
            message: "the request holds no events".into(),
        });
    }
    if n as u64 > s.max_events_per_request {
        return Err(Rejection::TooLarge {
            message: format!(
                "the request holds {n} events; the limit for stream `{}` is {}",
                req.stream(),
                s.max_events_per_request
            ),
        });
    }
    for i in 0..n {
        let size = sizes.size(i);
        if size as u64 > s.max_event_bytes {
            return Err(Rejection::TooLarge {
                message: format!(
                    "event {i} has {size} bytes; the limit for stream `{}` is {}",
                    req.stream(),
                    s.max_event_bytes
                ),
            });
        }
    }
    Ok(())
}
