//! The admission path every protocol's events take into the log, in one place:
//! authorize → validate → (quota, with the quotas issue) → in-flight budget → append → receipts.

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

use crate::quota::{Quotas, Verdict};
use crate::sink::{Held, Sink};
use sluice_core::RECORD_OVERHEAD;

/// What a configuration reload replaces: stream settings and quotas. Requests in flight keep
/// the snapshot they started with.
pub struct Policy {
    streams: StreamsConfig,
    quotas: Quotas,
    max_delay: Duration,
    metrics_principals: HashSet<String>,
}

impl Policy {
    pub fn new(streams: &StreamsConfig, quotas: &QuotasConfig) -> Self {
        Self {
            streams: streams.clone(),
            quotas: Quotas::new(quotas),
            max_delay: Duration::from_millis(quotas.max_delay_ms),
            metrics_principals: quotas.metrics_principals.iter().cloned().collect(),
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
}

impl Gateway {
    /// From now on, batches waiting for their ack point are answered with a retryable error
    /// (the drain deadline is near; see `server.shutdown_timeout_ms`).
    pub fn answer_in_flight_now(&self) {
        let _ = self.deadline.send(true);
    }

    pub fn new(
        streams: StreamsConfig,
        sink: Sink,
        max_in_flight_bytes: u64,
        quotas: &QuotasConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            policy: Swap::new(Policy::new(&streams, quotas)),
            sink,
            budget: Budget::new(max_in_flight_bytes),
            stream_budgets: Default::default(),
            metrics,
            deadline: tokio::sync::watch::channel(false).0,
            created_by: Default::default(),
        }
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
            let v = policy.quotas.check(
                principal.name(),
                principal.identity(),
                stream,
                &sizes[admitted..],
            );
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
    fn admit(&self, principal: &Principal, stream: &StreamName) -> Result<Admission, Rejection> {
        // Authorize first: an unauthorized producer learns nothing about which streams exist.
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
        Ok(Admission {
            settings: policy.streams.settings(name),
        })
    }

    async fn ingest(&self, mut req: IngestRequest) -> Result<Vec<Receipt>, Rejection> {
        let protocol = ProtocolLabels {
            protocol: req.protocol.as_str(),
        };
        self.metrics
            .events_received
            .get_or_create(&protocol)
            .inc_by(req.events.len() as u64);
        let received_bytes: usize = req.events.iter().map(Event::size).sum();
        self.metrics
            .bytes_received
            .get_or_create(&protocol)
            .inc_by(received_bytes as u64);
        let name = req.stream.as_str();
        let policy = self.policy.load();
        let settings = policy.streams.settings(name);
        // Permissions are per stream, so they are checked for every request, not per connection.
        if !req.principal.may_produce_to(name) {
            return Err(Rejection::Forbidden {
                stream: name.to_string(),
            });
        }
        // Validate sizes before charging anything, so oversized input costs nobody else.
        validate(&req, &settings)?;
        // Quotas before the budget: a producer over its quota holds no in-flight bytes. The
        // longest prefix that fits goes on; the rest is answered per event.
        let mut refused = Vec::new();
        let mut refusal = None;
        if !policy.quotas.is_empty() {
            // Byte quotas count what an event costs, framing included (Event::charge).
            let sizes: Vec<usize> = req.events.iter().map(Event::charge).collect();
            let v = self.throttle(&policy, &req.principal, name, &sizes).await;
            if v.admitted < sizes.len() {
                let r = over_quota(&v, name);
                if v.admitted == 0 {
                    self.count_throttled(&policy, &req, &v, sizes.len());
                    return Err(r);
                }
                refused = req.events.split_off(v.admitted);
                refusal = Some((r, v));
            }
        }
        // Sized once more only when quotas split the batch.
        let bytes: usize = if refused.is_empty() {
            received_bytes
        } else {
            req.events.iter().map(Event::size).sum()
        };
        // The in-flight budget bounds memory when the log is slower than the producers: settle
        // what the adapter reserved while receiving to the events' exact size.
        let mut reservation = std::mem::replace(&mut req.reservation, self.budget.empty());
        let charge = bytes + req.events.len() * RECORD_OVERHEAD;
        if let Err(shed) = reservation.resize(charge) {
            self.shed(name, "in_flight_budget", req.events.len());
            return Err(shed);
        }
        // The stream exists (or is created, within streams.max_streams) before anything is kept
        // per stream, so made-up stream names cannot grow the per-stream tables.
        let creation = self.reserve_creation(&req.principal, name, &policy.streams)?;
        let target = match self.sink.target(name, &policy.streams).await {
            Ok(t) => t,
            Err(r) => {
                if let Some(p) = creation {
                    self.release_creation(&p);
                }
                return Err(r);
            }
        };
        // The stream's own budget keeps one slow or hot stream from taking the whole global one.
        let stream_reservation = match self.stream_budget(name, settings.max_in_flight_bytes) {
            Some(b) => match b.try_reserve(charge) {
                Ok(r) => Some(r),
                Err(_) => {
                    self.shed(name, "stream_in_flight_budget", req.events.len());
                    return Err(Rejection::unavailable(
                        sluice_core::budget::RETRY_AFTER,
                        format!(
                            "the log is not keeping up with stream `{name}`: its in-flight budget is exhausted"
                        ),
                    ));
                }
            },
            None => None,
        };
        // Counted once the stream exists, so the refusals carry its name.
        if let Some((_, v)) = &refusal {
            self.count_throttled(&policy, &req, v, refused.len());
        }
        let held = Held {
            global: reservation,
            stream: stream_reservation,
        };
        let queued = req.queued.take();
        let started = std::time::Instant::now();
        self.metrics
            .batch_events
            .get_or_create(&ProtocolLabels {
                protocol: req.protocol.as_str(),
            })
            .observe(req.events.len() as f64);
        let appended = target.append(&req, settings.ack, held, queued);
        let mut deadline = self.deadline.subscribe();
        let mut receipts = tokio::select! {
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
                protocol: req.protocol.as_str(),
                ack: match settings.ack {
                    sluice_config::AckMode::Durable => "durable",
                    sluice_config::AckMode::Received => "received",
                },
            })
            .observe(started.elapsed().as_secs_f64());
        if let Some((r, _)) = refusal {
            receipts.extend(refused.iter().map(|_| Receipt::Failed(r.clone())));
        }
        let labels = StreamLabels {
            stream: name.to_string(),
            protocol: req.protocol.as_str(),
        };
        // Events the log refused, counted by their own rejection code (quota refusals were
        // counted as throttled above).
        let appended = receipts.len() - refused.len();
        let mut failed = 0;
        for r in &receipts[..appended] {
            if let Receipt::Failed(r) = r {
                failed += 1;
                self.metrics.rejected(req.protocol.as_str(), r.code(), 1);
            }
        }
        if failed < req.events.len() {
            self.metrics
                .events_in
                .get_or_create(&labels)
                .inc_by((req.events.len() - failed) as u64);
            self.metrics
                .bytes_in
                .get_or_create(&labels)
                .inc_by(bytes as u64);
            self.metrics.stream_appended(&labels.stream);
        }
        Ok(receipts)
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn budget(&self) -> &Budget {
        &self.budget
    }
}

impl Gateway {
    fn count_throttled(&self, policy: &Policy, req: &IngestRequest, v: &Verdict, n: usize) {
        let name = req.principal.name();
        let principal = if policy.metrics_principals.contains(name) {
            name.to_string()
        } else {
            "other".to_string()
        };
        self.metrics
            .events_throttled
            .get_or_create(&ThrottleLabels {
                stream: self.stream_label(req.stream.as_str()),
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

/// Checks the request against the stream's limits; returns the events' total size.
fn validate(req: &IngestRequest, s: &sluice_config::StreamSettings) -> Result<usize, Rejection> {
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
                req.stream, s.max_events_per_request
            ),
        });
    }
    let mut total = 0;
    for (i, e) in req.events.iter().enumerate() {
        let size = e.size();
        if size as u64 > s.max_event_bytes {
            return Err(Rejection::TooLarge {
                message: format!(
                    "event {i} has {size} bytes; the limit for stream `{}` is {}",
                    req.stream, s.max_event_bytes
                ),
            });
        }
        total += size;
    }
    Ok(total)
}
