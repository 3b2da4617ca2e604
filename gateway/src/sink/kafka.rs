//! The Kafka sink: one idempotent (acks=all) rdkafka producer shared by the process. Streams map
//! to topics through `log.kafka.topic`; keys pick partitions with Kafka's murmur2 (as the Java
//! client does); delivery reports resolve per-event receipts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use sluice_config::{AckMode, KafkaConfig, StreamSettings};
use sluice_core::{Event, IngestRequest, Receipt, Rejection};
use tokio::sync::watch;

use super::Held;

/// Header names Sluice adds to every record (documented in docs/kafka.md).
pub mod headers {
    /// Media type of the value, as the producer declared it.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The producer's own event id, when it gave one.
    pub const EVENT_ID: &str = "sluice-event-id";
    /// The authenticated principal that produced the event.
    pub const PRINCIPAL: &str = "sluice-principal";
    /// How the principal authenticated: `api_key`, `jwt:<issuer>`, `mtls` or `anonymous`.
    pub const PRINCIPAL_SOURCE: &str = "sluice-principal-source";
    /// `http`, `grpc`, `mqtt` or `websocket`.
    pub const PROTOCOL: &str = "sluice-protocol";
    /// When the gateway received the event: milliseconds since the Unix epoch, in decimal.
    pub const RECEIVED_AT: &str = "sluice-received-at";
}

/// How long a producer is told to wait when Kafka cannot take events.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The librdkafka settings of Sluice's producer: Sluice's own first, then the overrides (which
/// configuration validation has checked for conflicts). Shared with loadtest's direct producer
/// so both measure the same settings.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (key, value) in k.producer_properties() {
        c.set(key, value);
    }
    c
}

/// The topic of `stream` under the template `log.kafka.topic`.
pub fn topic_name(template: &str, stream: &str) -> String {
    template.replace("{stream}", stream)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    /// librdkafka's error name, e.g. `MessageTimedOut`.
    error: String,
    retryable: &'static str,
}

/// The sink's metrics.
#[derive(Clone, Default)]
pub struct KafkaMetrics {
    delivery_errors: Family<ErrorLabels, Counter>,
    queue_events: Gauge,
    reachable: Gauge,
    topics: Gauge,
    /// Round-trip time to each broker (librdkafka statistics), by broker; bounded by the
    /// cluster's size.
    broker_rtt: Family<RttLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RttLabels {
    /// `host:port/node-id`.
    broker: String,
    /// `avg` or `p99` over librdkafka's statistics window.
    quantile: &'static str,
}

/// The producer's librdkafka context: turns its statistics into broker round-trip gauges.
pub struct StatsContext {
    metrics: KafkaMetrics,
}

impl rdkafka::client::ClientContext for StatsContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for broker in statistics.brokers.values() {
            // Bootstrap entries (node id -1) are not brokers of the cluster.
            let (true, Some(rtt)) = (broker.nodeid >= 0, broker.rtt.as_ref()) else {
                continue;
            };
            if rtt.cnt == 0 {
                continue;
            }
            for (quantile, micros) in [("avg", rtt.avg), ("p99", rtt.p99)] {
                self.metrics
                    .broker_rtt
                    .get_or_create(&RttLabels {
                        broker: broker.name.clone(),
                        quantile,
                    })
                    .set(micros as f64 / 1e6);
            }
        }
    }
}

impl KafkaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kafka_delivery_errors",
            "Events Kafka did not take, by librdkafka error and whether the producer was told to retry",
            self.delivery_errors.clone(),
        );
        registry.register(
            "kafka_producer_queue_events",
            "Events in the producer's queue awaiting delivery (sampled each health check)",
            self.queue_events.clone(),
        );
        registry.register(
            "kafka_reachable",
            "1 while the last probe of the brokers answered, 0 otherwise",
            self.reachable.clone(),
        );
        registry.register(
            "kafka_topics",
            "Topics the gateway knows and produces to",
            self.topics.clone(),
        );
        registry.register(
            "kafka_broker_rtt_seconds",
            "Round-trip time to each broker over librdkafka's statistics window (avg, p99)",
            self.broker_rtt.clone(),
        );
    }
}

/// One stream's topic: its name and partition count (refreshed from metadata).
pub struct Topic {
    pub name: String,
    partitions: AtomicU32,
    next_sticky: AtomicU32,
}

impl Topic {
    pub fn partition_count(&self) -> u32 {
        self.partitions.load(Ordering::Relaxed).max(1)
    }

    /// The partition of a keyless request's events: the next one, round robin per request.
    fn sticky_partition(&self) -> u32 {
        self.next_sticky.fetch_add(1, Ordering::Relaxed) % self.partition_count()
    }
}

/// The Kafka sink. Cheap to clone.
#[derive(Clone)]
pub struct KafkaSink {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: KafkaConfig,
    producer: FutureProducer<StatsContext>,
    admin: Option<AdminClient<DefaultClientContext>>,
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    create: tokio::sync::Mutex<()>,
    max_streams: usize,
    reachable: AtomicBool,
    /// Why the brokers are not reachable (or the producer failed fatally), for `/readyz`.
    problem: Mutex<String>,
    metrics: KafkaMetrics,
    stop: watch::Sender<bool>,
}

/// Why the sink cannot take events now.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("librdkafka refused the producer settings: {0}")]
    Config(#[source] KafkaError),
}

fn metadata_error(e: impl std::fmt::Display) -> Rejection {
    Rejection::unavailable(
        RETRY_AFTER,
        format!("Kafka did not answer a metadata request: {e}"),
    )
}

impl KafkaSink {
    /// Creates the producer (it connects in the background; an unreachable cluster does not stop
    /// the gateway from starting) and starts the health probe.
    pub fn new(
        cfg: &KafkaConfig,
        max_streams: usize,
        metrics: KafkaMetrics,
    ) -> Result<Self, KafkaSinkError> {
        let config = client_config(cfg);
        let producer: FutureProducer<StatsContext> = config
            .create_with_context(StatsContext {
                metrics: metrics.clone(),
            })
            .map_err(KafkaSinkError::Config)?;
        let admin = if cfg.create_topics {
            Some(config.create().map_err(KafkaSinkError::Config)?)
        } else {
            None
        };
        let (stop, _) = watch::channel(false);
        let sink = KafkaSink {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                producer,
                admin,
                topics: RwLock::default(),
                create: tokio::sync::Mutex::new(()),
                max_streams,
                reachable: AtomicBool::new(false),
                problem: Mutex::new("no broker has answered yet".into()),
                metrics,
                stop,
            }),
        };
        tokio::spawn(sink.clone().probe());
        Ok(sink)
    }

    /// Whether the brokers answer and the producer can take events; the reason if not.
    pub fn health(&self) -> Result<(), String> {
        if let Some((code, why)) = self.inner.producer.client().fatal_error() {
            return Err(format!(
                "the Kafka producer failed fatally ({code:?}: {why}); restart the gateway"
            ));
        }
        if self.inner.reachable.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(format!(
                "no Kafka broker is reachable: {}",
                self.inner.problem.lock().unwrap()
            ))
        }
    }

    /// Whether `stream`'s topic is known to exist (`None`: not known yet either way).
    pub fn known(&self, stream: &str) -> Option<bool> {
        self.inner
            .topics
            .read()
            .unwrap()
            .contains_key(stream)
            .then_some(true)
    }

    /// Every few moments: ask the brokers for metadata (readiness), sample the producer's
    /// queue, and now and then refresh the partition counts of known topics.
    async fn probe(self) {
        let mut stop = self.inner.stop.subscribe();
        let every = Duration::from_millis(self.inner.cfg.health_check_interval_ms);
        let refresh_every = Duration::from_millis(self.inner.cfg.metadata_refresh_ms);
        let mut last_refresh = tokio::time::Instant::now();
        loop {
            let refresh = last_refresh.elapsed() >= refresh_every;
            if refresh {
                last_refresh = tokio::time::Instant::now();
            }
            let result = self.probe_once(refresh).await;
            let up = result.is_ok();
            if let Err(e) = result {
                *self.inner.problem.lock().unwrap() = e;
            }
            let was = self.inner.reachable.swap(up, Ordering::Relaxed);
            if was != up {
                if up {
                    tracing::info!("Kafka is reachable");
                } else {
                    tracing::warn!(problem = %self.inner.problem.lock().unwrap(), "Kafka is not reachable; producers get 503 until it is");
                }
            }
            let m = &self.inner.metrics;
            m.reachable.set(up as i64);
            m.queue_events
                .set(self.inner.producer.in_flight_count() as i64);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|&s| s) => return,
            }
        }
    }

    /// One metadata round trip: for one known topic (or, with `all`, every known topic),
    /// updating partition counts; for none while no topic is known.
    async fn probe_once(&self, all: bool) -> Result<(), String> {
        let names: Vec<String> = {
            let topics = self.inner.topics.read().unwrap();
            let mut it = topics.values().map(|t| t.name.clone());
            if all {
                it.collect()
            } else {
                it.next().into_iter().collect()
            }
        };
        let timeout = Duration::from_millis(self.inner.cfg.metadata_timeout_ms);
        if names.is_empty() {
            return self.metadata(None, timeout).await.map(|_| ());
        }
        for name in names {
            let counts = self.metadata(Some(name.clone()), timeout).await?;
            if let Some(Ok(n)) = counts.get(&name) {
                self.set_partitions(&name, *n);
            }
        }
        Ok(())
    }

    fn set_partitions(&self, topic: &str, n: u32) {
        let topics = self.inner.topics.read().unwrap();
        for t in topics.values().filter(|t| t.name == topic) {
            let old = t.partitions.swap(n, Ordering::Relaxed);
            if old != n {
                tracing::info!(topic, from = old, to = n, "topic partition count changed");
            }
        }
    }

    /// Partition counts (or the broker's error) of `topic` (or of every topic) from a metadata
    /// request, run off the async threads since librdkafka blocks.
    async fn metadata(
        &self,
        topic: Option<String>,
        timeout: Duration,
    ) -> Result<HashMap<String, Result<u32, RDKafkaErrorCode>>, String> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let md = inner
                .producer
                .client()
                .fetch_metadata(topic.as_deref(), Timeout::After(timeout))
                .map_err(|e| e.to_string())?;
            if md.brokers().is_empty() {
                return Err("the cluster reported no brokers".into());
            }
            Ok(md
                .topics()
                .iter()
                .map(|t| {
                    let r = match t.error() {
                        Some(e) => Err(RDKafkaErrorCode::from(e)),
                        None if t.partitions().is_empty() => {
                            Err(RDKafkaErrorCode::UnknownTopicOrPartition)
                        }
                        None => Ok(t.partitions().len() as u32),
                    };
                    (t.name().to_string(), r)
                })
                .collect())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The topic of `stream`, looked up (and, if allowed, created) on first use. `may_create` is
    /// true when the stream is declared or streams are created on first use.
    pub async fn get_or_create(
        &self,
        stream: &str,
        settings: &StreamSettings,
        may_create: bool,
    ) -> Result<Arc<Topic>, Rejection> {
        self.health()
            .map_err(|why| Rejection::unavailable(RETRY_AFTER, why))?;
        if let Some(t) = self.inner.topics.read().unwrap().get(stream) {
            return Ok(t.clone());
        }
        // One lookup at a time, so a burst of requests for a new stream asks the brokers once.
        let _one = self.inner.create.lock().await;
        if let Some(t) = self.inner.topics.read().unwrap().get(stream) {
            return Ok(t.clone());
        }
        let max = self.inner.max_streams;
        if self.inner.topics.read().unwrap().len() >= max {
            return Err(Rejection::unavailable(
                Duration::from_secs(60),
                format!(
                    "the gateway holds its maximum of {max} streams; no new stream can be used"
                ),
            ));
        }
        let name = topic_name(&self.inner.cfg.topic, stream);
        if name.len() > 249 {
            return Err(Rejection::Malformed {
                message: format!(
                    "the topic of stream `{stream}` under log.kafka.topic would be {} characters; Kafka allows 249",
                    name.len()
                ),
            });
        }
        let timeout = Duration::from_millis(self.inner.cfg.metadata_timeout_ms);
        let found = self
            .metadata(Some(name.clone()), timeout)
            .await
            .map_err(metadata_error)?;
        let partitions = match found.get(&name) {
            Some(Ok(n)) => *n,
            Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) | None => {
                if !(may_create && self.inner.admin.is_some()) {
                    return Err(Rejection::NotFound {
                        stream: stream.to_string(),
                    });
                }
                self.create_topic(&name, settings).await?
            }
            Some(Err(e)) => {
                return Err(Rejection::unavailable(
                    RETRY_AFTER,
                    format!("Kafka cannot serve topic `{name}` now: {e}"),
                ));
            }
        };
        let topic = Arc::new(Topic {
            name,
            partitions: AtomicU32::new(partitions),
            next_sticky: AtomicU32::new(0),
        });
        let mut topics = self.inner.topics.write().unwrap();
        topics.insert(Arc::from(stream), topic.clone());
        self.inner.metrics.topics.set(topics.len() as i64);
        tracing::info!(stream, topic = %topic.name, partitions, "producing to Kafka topic");
        Ok(topic)
    }

    /// Creates `name` with the stream's partitions, retention and `log.kafka.replication_factor`,
    /// then waits until its partitions show in metadata; returns their count.
    async fn create_topic(&self, name: &str, s: &StreamSettings) -> Result<u32, Rejection> {
        let Some(admin) = &self.inner.admin else {
            return Err(Rejection::Internal {
                message: "topic creation is off".into(),
            });
        };
        let timeout = Duration::from_millis(self.inner.cfg.metadata_timeout_ms);
        let retention_ms = if s.retention_ms == 0 {
            "-1".to_string()
        } else {
            s.retention_ms.to_string()
        };
        let retention_bytes = if s.retention_bytes == 0 {
            "-1".to_string()
        } else {
            s.retention_bytes.to_string()
        };
        let topic = NewTopic::new(
            name,
            s.partitions as i32,
            TopicReplication::Fixed(self.inner.cfg.replication_factor as i32),
        )
        .set("retention.ms", &retention_ms)
        .set("retention.bytes", &retention_bytes);
        let opts = AdminOptions::new()
            .request_timeout(Some(timeout))
            .operation_timeout(Some(timeout));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(metadata_error)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Rejection::unavailable(
                        Duration::from_secs(5),
                        format!("Kafka did not create topic `{name}`: {code}"),
                    ));
                }
            }
        }
        tracing::info!(
            topic = name,
            partitions = s.partitions,
            "created Kafka topic"
        );
        // Creation is asynchronous on the brokers: wait until the partitions are visible.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self
                .metadata(Some(name.to_string()), timeout)
                .await
                .map_err(metadata_error)?;
            if let Some(Ok(n)) = found.get(name) {
                return Ok(*n);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Rejection::unavailable(
                    RETRY_AFTER,
                    format!("topic `{name}` was created but its partitions are not visible yet"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Hands every event to the producer and answers per event: at the durable ack point once
    /// Kafka acknowledged it (acks=all), or, for `received`, once it is queued. `held` is
    /// released when the last of them is delivered (or failed).
    pub(crate) async fn append(
        &self,
        topic: &Topic,
        req: &IngestRequest,
        ack: AckMode,
        held: Held,
        queued: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Vec<Receipt> {
        let n = topic.partition_count();
        let sticky = if req.events.iter().any(|e| e.key.is_none()) && n > 1 {
            topic.sticky_partition()
        } else {
            0
        };
        let ts = now_ms();
        let ts_text = ts.to_string();
        let mut receipts = Vec::with_capacity(req.events.len());
        let mut pending = Vec::with_capacity(req.events.len());
        let mut queue_full = false;
        for e in &req.events {
            let partition = match (&e.key, n) {
                (_, 1) => 0,
                (Some(k), _) => sluice_log::partition_for_key(k, n),
                (None, _) => sticky,
            };
            if queue_full {
                // Once the queue is full, later events of the request stay out too, so a retry
                // of the failed ones keeps their order per key.
                receipts.push(Receipt::Failed(queue_full_rejection()));
                continue;
            }
            let record = FutureRecord {
                topic: &topic.name,
                partition: Some(partition as i32),
                payload: Some(&e.value[..]),
                key: e.key.as_deref(),
                timestamp: Some(ts),
                headers: Some(record_headers(req, e, &ts_text)),
            };
            match self.inner.producer.send_result(record) {
                Ok(delivery) => {
                    receipts.push(Receipt::Received { partition });
                    pending.push(Some(delivery));
                    continue;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    queue_full = true;
                    self.count_error(Some(RDKafkaErrorCode::QueueFull), true);
                    receipts.push(Receipt::Failed(queue_full_rejection()));
                }
                Err((e, _)) => {
                    let (rejection, retryable) = classify(&e);
                    self.count_error(code_of(&e), retryable);
                    receipts.push(Receipt::Failed(rejection));
                }
            }
            pending.push(None);
        }
        // Every event is in the producer's queue (or refused): their order is fixed.
        if let Some(q) = queued {
            let _ = q.send(());
        }
        // Nobody waits longer than message_timeout_ms for an answer. librdkafka reports within
        // it, except for requests already on the wire to a broker that vanished: those are
        // answered as retryable (the event may or may not be stored, so a retry is at least
        // once), and the budget stays held until librdkafka settles them.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.inner.cfg.message_timeout_ms);
        match ack {
            AckMode::Durable => {
                let (outcomes, unsettled) = self.deliveries(pending, deadline).await;
                for (r, o) in receipts.iter_mut().zip(outcomes) {
                    if let Some(o) = o {
                        *r = o;
                    }
                }
                self.settle(unsettled, held);
            }
            AckMode::Received => {
                // The budget stays held until Kafka has the events, so a slow cluster still
                // pushes back on producers that do not wait for acks.
                let sink = self.clone();
                tokio::spawn(async move {
                    let (_, unsettled) = sink.deliveries(pending, deadline).await;
                    sink.settle(unsettled, held);
                });
            }
        }
        receipts
    }

    /// Releases `held` once every unsettled delivery has its report.
    fn settle(&self, unsettled: Vec<DeliveryFuture>, held: Held) {
        if unsettled.is_empty() {
            return drop(held);
        }
        tokio::spawn(async move {
            // Already counted (and answered) as unconfirmed.
            let _ = join_all(unsettled).await;
            drop(held);
        });
    }

    /// Awaits the delivery reports until `deadline`: a receipt per handed-over event (None
    /// where nothing was handed over), and the deliveries still unsettled at the deadline.
    async fn deliveries(
        &self,
        mut pending: Vec<Option<DeliveryFuture>>,
        deadline: tokio::time::Instant,
    ) -> (Vec<Option<Receipt>>, Vec<DeliveryFuture>) {
        let results = join_all(pending.iter_mut().map(|d| async move {
            match d {
                None => None,
                Some(d) => Some(tokio::time::timeout_at(deadline, d).await),
            }
        }))
        .await;
        let mut unsettled = Vec::new();
        let receipts = results
            .into_iter()
            .zip(pending)
            .map(|(r, d)| {
                r.map(|r| match r {
                    Ok(Ok(Ok(d))) => Receipt::Appended {
                        partition: d.partition as u32,
                        offset: d.offset as u64,
                    },
                    Ok(Ok(Err((e, _)))) => {
                        let (rejection, retryable) = classify(&e);
                        self.count_error(code_of(&e), retryable);
                        Receipt::Failed(rejection)
                    }
                    Ok(Err(_canceled)) => Receipt::Failed(Rejection::unavailable(
                        RETRY_AFTER,
                        "the Kafka producer shut down before delivering the event",
                    )),
                    Err(_elapsed) => {
                        unsettled.extend(d);
                        self.count_error(None, true);
                        Receipt::Failed(Rejection::unavailable(
                            RETRY_AFTER,
                            "Kafka did not confirm the event within log.kafka.message_timeout_ms; it may or may not be stored",
                        ))
                    }
                })
            })
            .collect();
        (receipts, unsettled)
    }

    fn count_error(&self, code: Option<RDKafkaErrorCode>, retryable: bool) {
        self.inner
            .metrics
            .delivery_errors
            .get_or_create(&ErrorLabels {
                error: code.map_or_else(|| "Unconfirmed".to_string(), |c| format!("{c:?}")),
                retryable: if retryable { "true" } else { "false" },
            })
            .inc();
    }

    /// Delivers what is queued (up to `message_timeout_ms`) and stops the probe.
    pub async fn close(&self) {
        let _ = self.inner.stop.send(true);
        let inner = self.inner.clone();
        let timeout = Duration::from_millis(inner.cfg.message_timeout_ms);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = inner.producer.flush(Timeout::After(timeout)) {
                tracing::warn!(error = %e, "Kafka producer did not deliver everything before shutdown");
            }
        })
        .await;
    }
}

fn queue_full_rejection() -> Rejection {
    Rejection::unavailable(
        RETRY_AFTER,
        "the Kafka producer's queue is full (the cluster is not keeping up); retry later",
    )
}

fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code()
}

/// Classifies a Kafka failure of one event once: the rejection the producer gets, and whether a
/// retry can help. Everything not known to be final is retryable.
fn classify(e: &KafkaError) -> (Rejection, bool) {
    use RDKafkaErrorCode as C;
    match code_of(e) {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => (
            Rejection::TooLarge {
                message: format!("Kafka refused the event as too large: {e}"),
            },
            false,
        ),
        Some(C::InvalidMessage | C::InvalidRecord | C::InvalidTimestamp) => (
            Rejection::Malformed {
                message: format!("Kafka refused the event: {e}"),
            },
            false,
        ),
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::InvalidTopic
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
            | C::Fatal,
        ) => (
            Rejection::Internal {
                message: format!("Kafka refused the event; an operator must act: {e}"),
            },
            false,
        ),
        _ => (
            Rejection::unavailable(
                RETRY_AFTER,
                format!("Kafka did not take the event; retry: {e}"),
            ),
            true,
        ),
    }
}

/// The record's headers: Sluice's own (documented names), then the event's.
fn record_headers(req: &IngestRequest, e: &Event, received_at: &str) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(4 + e.headers.len() + e.id.is_some() as usize);
    let add = |h: OwnedHeaders, key: &str, value: &[u8]| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    };
    if !req.content_type.is_empty() {
        h = add(h, headers::CONTENT_TYPE, &req.content_type);
    }
    if let Some(id) = &e.id {
        h = add(h, headers::EVENT_ID, id);
    }
    h = add(h, headers::PRINCIPAL, req.principal.name().as_bytes());
    if !req.principal.source().is_empty() {
        h = add(
            h,
            headers::PRINCIPAL_SOURCE,
            req.principal.source().as_bytes(),
        );
    }
    h = add(h, headers::PROTOCOL, req.protocol.as_str().as_bytes());
    h = add(h, headers::RECEIVED_AT, received_at.as_bytes());
    for (k, v) in &e.headers {
        h = add(h, &String::from_utf8_lossy(k), v);
    }
    h
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_config::{KafkaSaslMechanism, KafkaSecurityProtocol, Secret};

    #[test]
    fn client_config_carries_sluices_guarantees_and_the_overrides() {
        let mut k = KafkaConfig {
            bootstrap_servers: "k1:9092,k2:9092".into(),
            linger_ms: 7,
            ..KafkaConfig::default()
        };
        k.overrides
            .insert("socket.keepalive.enable".into(), "true".into());
        let c = client_config(&k);
        for (key, want) in [
            ("bootstrap.servers", "k1:9092,k2:9092"),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.codec", "zstd"),
            ("linger.ms", "7"),
            ("allow.auto.create.topics", "false"),
            ("queue.buffering.max.kbytes", "1048576"),
            ("socket.keepalive.enable", "true"),
        ] {
            assert_eq!(c.get(key), Some(want), "{key}");
        }
    }

    #[test]
    fn every_compression_tls_and_sasl_setting_is_built_into_librdkafka() {
        // librdkafka refuses settings it was built without (e.g. zstd, or TLS without OpenSSL)
        // when the producer is created, so creating one proves the build supports them.
        for compression in ["none", "gzip", "lz4", "snappy", "zstd"] {
            let mut k = KafkaConfig {
                bootstrap_servers: "127.0.0.1:1".into(),
                compression: serde_json::from_value(serde_json::json!(compression)).unwrap(),
                ..KafkaConfig::default()
            };
            k.security.protocol = KafkaSecurityProtocol::SaslSsl;
            k.security.sasl_mechanism = Some(KafkaSaslMechanism::ScramSha512);
            k.security.sasl_username = Some("u".into());
            k.security.sasl_password = Some(Secret("p".into()));
            k.security.ssl_verify_hostname = Some(true);
            let p: Result<FutureProducer, _> = client_config(&k).create();
            assert!(p.is_ok(), "{compression}: {:?}", p.err());
        }
        let mut k = KafkaConfig::default();
        k.overrides.insert("no.such.property".into(), "1".into());
        let err = KafkaSink::new(&k, 10, KafkaMetrics::default())
            .err()
            .expect("unknown property accepted");
        assert!(err.to_string().contains("no.such.property"), "{err}");
    }

    #[test]
    fn topics_follow_the_template() {
        assert_eq!(topic_name("{stream}", "orders"), "orders");
        assert_eq!(topic_name("sluice.{stream}", "orders"), "sluice.orders");
    }

    #[test]
    fn errors_are_classified_once_as_retryable_or_final() {
        use RDKafkaErrorCode as C;
        let e = |c| KafkaError::MessageProduction(c);
        for c in [
            C::MessageTimedOut,
            C::QueueFull,
            C::NotEnoughReplicas,
            C::LeaderNotAvailable,
            C::AllBrokersDown,
        ] {
            let (r, retryable) = classify(&e(c));
            assert!(retryable, "{c:?}");
            assert!(r.retry_after().is_some(), "{c:?}");
        }
        for (c, code) in [
            (C::MessageSizeTooLarge, "too_large"),
            (C::InvalidRecord, "malformed"),
            (C::TopicAuthorizationFailed, "internal"),
        ] {
            let (r, retryable) = classify(&e(c));
            assert!(!retryable, "{c:?}");
            assert_eq!(r.code(), code);
            assert!(r.retry_after().is_none(), "{c:?}");
        }
    }
}
