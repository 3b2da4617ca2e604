//! The spool (docs/kafka.md "The spool"): with `log.kind = "kafka"`, streams with
//! `ack = "spooled"` are appended to an embedded log in `{data_dir}/spool` and acked once
//! fsynced there; a forwarder per partition sends them on to the same partition of the
//! stream's Kafka topic, in order, with an idempotent producer that never gives up
//! (`message.timeout.ms = 0`, `enable.gapless.guarantee`).
//!
//! What Kafka already has is found without trusting local state: each forwarded record carries
//! the header `sluice-spool: <spool id>:<spool offset>`, and after a restart (or a producer
//! failure) the forwarder reads the partition from its last checkpoint to the end and resumes
//! after the highest offset of its own it finds there. Spool segments are deleted only below a
//! checkpoint, which is written only after Kafka acknowledged everything below it.

mod forward;
pub mod metrics;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use sluice_config::{AckMode, SpoolConfig, StreamSettings};
use sluice_core::{IngestRequest, Receipt, Rejection};
use sluice_log::{Log, LogMetrics, LogOptions, StreamLog, StreamOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Held;
use super::embedded::{self, log_rejection};
use super::kafka::KafkaSink;
pub use metrics::SpoolMetrics;
use metrics::{RefusedLabels, StreamLabel};

/// How long a new spooled stream's first producer waits for Kafka to name the topic's
/// partition count.
const TOPIC_LOOKUP: Duration = Duration::from_secs(1);
/// How long a producer refused at a bound is told to wait.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// The spool. Cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    log: Log,
    /// `{data_dir}/spool/forward`: each stream's spool id and each partition's checkpoint.
    forward_dir: PathBuf,
    kafka: KafkaSink,
    cfg: SpoolConfig,
    /// The forwarders' producer and its generation (replaced after a fatal error).
    producer: Mutex<(u64, Arc<FutureProducer>)>,
    producer_config: ClientConfig,
    /// The configuration of the consumers that find out what Kafka has.
    consumer_config: ClientConfig,
    streams: RwLock<HashMap<Arc<str>, Arc<SpoolStream>>>,
    create: tokio::sync::Mutex<()>,
    metrics: SpoolMetrics,
    /// Bytes of every spooled stream on disk, as of the last refresh (every 250 ms) ...
    total_bytes: AtomicU64,
    /// ... and the bytes appended since, so the bound holds between refreshes too.
    recent_bytes: AtomicU64,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// One spooled stream.
pub struct SpoolStream {
    name: Arc<str>,
    log: Arc<StreamLog>,
    /// Names this spool in the `sluice-spool` header of every record it forwards.
    id: String,
    parts: Vec<Part>,
    /// Settings the topic is created with, and whether it may be.
    settings: StreamSettings,
    may_create: bool,
    /// When the stream's forwarders may send the next event (`log.spool.forward_rate`).
    pace: Mutex<tokio::time::Instant>,
}

/// A partition's forwarding state, shared with the metrics and the bounds.
struct Part {
    /// Every event below this offset is in Kafka.
    forwarded: AtomicU64,
    /// Receive time (ms) of the oldest event not yet in Kafka; `i64::MAX` when none waits.
    oldest_ts: AtomicI64,
}

impl Spool {
    /// Opens the spool in `{data_dir}/spool` (recovering what it holds) and starts a forwarder
    /// for every partition of every stream found there.
    pub async fn open(
        data_dir: &Path,
        cfg: &SpoolConfig,
        kafka: KafkaSink,
        streams: &sluice_config::StreamsConfig,
        log_metrics: LogMetrics,
        metrics: SpoolMetrics,
    ) -> anyhow::Result<Spool> {
        let dir = data_dir.join("spool");
        let opts = LogOptions {
            data_dir: dir.clone(),
            segment_bytes: cfg.segment_bytes,
            segment_ms: 0,
            retention_check_interval: Duration::from_millis(cfg.checkpoint_interval_ms),
            max_streams: streams.max_streams,
            keep_until_released: true,
            ..LogOptions::default()
        };
        let log = Log::open(opts, log_metrics, |_| StreamOptions {
            partitions: 1,
            retention_ms: 0,
            retention_bytes: 0,
        })
        .await
        .with_context(|| format!("opening the spool in {}", dir.display()))?;
        let forward_dir = dir.join("forward");
        fs::create_dir_all(&forward_dir)
            .with_context(|| format!("creating {}", forward_dir.display()))?;
        let producer_config = producer_config(kafka.config());
        let producer: FutureProducer = producer_config
            .create()
            .context("creating the spool's Kafka producer")?;
        metrics.max_bytes.set(cfg.max_bytes as i64);
        let (stop, _) = watch::channel(false);
        let spool = Spool {
            inner: Arc::new(Inner {
                log,
                forward_dir,
                consumer_config: super::kafka::consumer_config(kafka.config(), "sluice-spool"),
                kafka,
                cfg: cfg.clone(),
                producer: Mutex::new((0, Arc::new(producer))),
                producer_config,
                streams: RwLock::default(),
                create: tokio::sync::Mutex::new(()),
                metrics,
                total_bytes: AtomicU64::new(0),
                recent_bytes: AtomicU64::new(0),
                stop,
                tasks: Mutex::default(),
            }),
        };
        // A backlog left by the last run is forwarded whether or not anyone produces.
        for name in spool.inner.log.stream_names() {
            let settings = streams.settings(&name);
            let may_create = streams.auto_create || streams.declare.contains_key(&name);
            let log = spool.inner.log.stream(&name).expect("listed stream");
            spool.install(&name, log, settings, may_create)?;
        }
        let weak = Arc::downgrade(&spool.inner);
        let mut stop = spool.inner.stop.subscribe();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|&s| s) => return,
                }
                match weak.upgrade() {
                    Some(inner) => Spool { inner }.observe(),
                    None => return,
                }
            }
        });
        Ok(spool)
    }

    /// The spooled stream `name`, created (with the topic's partition count if Kafka answers,
    /// the configured count if not) on first use.
    pub(crate) async fn stream(
        &self,
        name: &str,
        settings: &StreamSettings,
        may_create: bool,
    ) -> Result<Arc<SpoolStream>, Rejection> {
        if let Some(s) = self.get(name) {
            return Ok(s);
        }
        let _one = self.inner.create.lock().await;
        if let Some(s) = self.get(name) {
            return Ok(s);
        }
        // Producers of a spooled stream do not wait on Kafka: the topic's partition count is
        // asked for briefly, and a Kafka that does not answer in time (down, or going down
        // before the probe noticed) leaves the configured count.
        let lookup = self.inner.kafka.get_or_create(name, settings, may_create);
        let partitions = match tokio::time::timeout(TOPIC_LOOKUP, lookup).await {
            Ok(Ok(topic)) => topic.partition_count(),
            Ok(Err(r @ (Rejection::NotFound { .. } | Rejection::Malformed { .. }))) => {
                return Err(r);
            }
            // The forwarder checks the count against the topic's later (docs/kafka.md).
            Ok(Err(_)) | Err(_) if may_create => settings.partitions,
            Ok(Err(r)) => return Err(r),
            Err(_) => {
                return Err(Rejection::unavailable(
                    RETRY_AFTER,
                    format!(
                        "Kafka did not say within {TOPIC_LOOKUP:?} whether stream `{name}`'s topic exists"
                    ),
                ));
            }
        };
        let log = self
            .inner
            .log
            .get_or_create(
                name,
                StreamOptions {
                    partitions,
                    retention_ms: 0,
                    retention_bytes: 0,
                },
            )
            .await
            .map_err(log_rejection)?;
        self.install(name, log, *settings, may_create)
            .map_err(|e| Rejection::Internal {
                message: format!("spool of stream `{name}`: {e:#}"),
            })
    }

    fn get(&self, name: &str) -> Option<Arc<SpoolStream>> {
        self.inner.streams.read().unwrap().get(name).cloned()
    }

    /// Registers a stream's spool and starts its forwarders.
    fn install(
        &self,
        name: &str,
        log: Arc<StreamLog>,
        settings: StreamSettings,
        may_create: bool,
    ) -> anyhow::Result<Arc<SpoolStream>> {
        let dir = self.inner.forward_dir.join(name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let id = spool_id(&dir)?;
        let n = log.partition_count();
        let s = Arc::new(SpoolStream {
            name: Arc::from(name),
            // Until its forwarder has asked Kafka, a partition counts as forwarded what its
            // checkpoint says.
            parts: (0..n)
                .map(|p| {
                    let start = log.marks(p).map_or(0, |m| m.borrow().start);
                    let checkpoint = forward::read_checkpoint(&dir.join(format!("{p}.checkpoint")));
                    Part {
                        forwarded: AtomicU64::new(checkpoint.map_or(start, |c| c.next.max(start))),
                        oldest_ts: AtomicI64::new(i64::MAX),
                    }
                })
                .collect(),
            log,
            id,
            settings,
            may_create,
            pace: Mutex::new(tokio::time::Instant::now()),
        });
        self.inner
            .streams
            .write()
            .unwrap()
            .insert(s.name.clone(), s.clone());
        let mut tasks = self.inner.tasks.lock().unwrap();
        for p in 0..n {
            tasks.push(tokio::spawn(forward::run(self.clone(), s.clone(), p)));
        }
        tracing::info!(stream = name, partitions = n, spool = %s.id, "spooling stream");
        Ok(s)
    }

    /// Appends the request's events to the stream's spool and answers each once fsynced there,
    /// unless the spool is at one of its bounds.
    pub(crate) async fn append(
        &self,
        s: &SpoolStream,
        settings: &StreamSettings,
        req: &IngestRequest,
        held: Held,
        queued: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Vec<Receipt> {
        if let Err(r) = self.admit(s, settings, req.events.len()) {
            drop(held);
            if let Some(q) = queued {
                let _ = q.send(());
            }
            return vec![Receipt::Failed(r); req.events.len()];
        }
        let bytes: u64 = req.events.iter().map(|e| e.charge() as u64).sum();
        self.inner.recent_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut receipts = embedded::append(&s.log, req, AckMode::Durable, held, queued).await;
        for r in &mut receipts {
            if let Receipt::Appended { partition, .. } = *r {
                *r = Receipt::Spooled { partition };
            }
        }
        receipts
    }

    /// Whether the stream's spool may take more events: below its bytes, the whole spool's,
    /// and the age of its oldest unforwarded event.
    fn admit(&self, s: &SpoolStream, settings: &StreamSettings, n: usize) -> Result<(), Rejection> {
        let refuse = |reason: &'static str, why: String| {
            self.inner
                .metrics
                .refused
                .get_or_create(&RefusedLabels {
                    stream: s.name.to_string(),
                    reason,
                })
                .inc_by(n as u64);
            Err(Rejection::unavailable(
                RETRY_AFTER,
                format!(
                    "the spool of stream `{}` is full ({why}) while Kafka does not take its events fast enough ({}); retry later",
                    s.name,
                    self.inner
                        .kafka
                        .health()
                        .err()
                        .unwrap_or_else(|| "Kafka answers, the backlog is draining".into())
                ),
            ))
        };
        let bytes = s.bytes();
        if settings.spool_max_bytes > 0 && bytes >= settings.spool_max_bytes {
            return refuse(
                "stream_bytes",
                format!(
                    "{bytes} bytes, the stream's spool_max_bytes is {}",
                    settings.spool_max_bytes
                ),
            );
        }
        let total = self.inner.total_bytes.load(Ordering::Relaxed)
            + self.inner.recent_bytes.load(Ordering::Relaxed);
        if total >= self.inner.cfg.max_bytes {
            return refuse(
                "total_bytes",
                format!(
                    "{total} bytes in all, log.spool.max_bytes is {}",
                    self.inner.cfg.max_bytes
                ),
            );
        }
        if settings.spool_max_age_ms > 0 {
            let age = s.oldest_age_ms();
            if age >= settings.spool_max_age_ms as i64 {
                return refuse(
                    "age",
                    format!(
                        "its oldest unforwarded event is {} s old, spool_max_age_ms is {}",
                        age / 1000,
                        settings.spool_max_age_ms
                    ),
                );
            }
        }
        Ok(())
    }

    /// Refreshes the gauges and the whole spool's size.
    fn observe(&self) {
        let m = &self.inner.metrics;
        let mut total = 0;
        for s in self.inner.streams.read().unwrap().values() {
            let label = StreamLabel {
                stream: s.name.to_string(),
            };
            let bytes = s.bytes();
            total += bytes;
            m.bytes.get_or_create(&label).set(bytes as i64);
            m.events.get_or_create(&label).set(s.waiting() as i64);
            m.oldest_age
                .get_or_create(&label)
                .set(s.oldest_age_ms() as f64 / 1000.0);
        }
        self.inner.total_bytes.store(total, Ordering::Relaxed);
        self.inner.recent_bytes.store(0, Ordering::Relaxed);
        m.total_bytes.set(total as i64);
    }

    /// What `/readyz` adds while the spool holds a backlog: events waiting and why.
    pub fn detail(&self) -> Option<String> {
        let streams = self.inner.streams.read().unwrap();
        let waiting: u64 = streams.values().map(|s| s.waiting()).sum();
        let oldest = streams
            .values()
            .map(|s| s.oldest_age_ms())
            .max()
            .unwrap_or(0);
        let kafka = self.inner.kafka.health().err();
        if waiting == 0 && kafka.is_none() {
            return None;
        }
        Some(format!(
            "spooling: {waiting} events wait for Kafka, the oldest for {} s ({}; {} of {} spool bytes used)",
            oldest / 1000,
            kafka.unwrap_or_else(|| "Kafka answers".into()),
            self.inner.total_bytes.load(Ordering::Relaxed),
            self.inner.cfg.max_bytes
        ))
    }

    /// Whether the spool's own log takes writes.
    pub fn healthy(&self) -> bool {
        self.inner.log.healthy()
    }

    /// Stops the forwarders (each waits a moment for what it has in flight and writes its
    /// checkpoint), then closes the spool's log. What is not forwarded stays for the next start.
    pub async fn close(&self) {
        self.inner.stop.send_replace(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.inner.tasks.lock().unwrap());
        // Each forwarder waits at most a few seconds for its deliveries; this bounds the rest.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for mut t in tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
        self.inner.streams.write().unwrap().clear();
        self.inner.log.close().await;
    }

    /// The forwarders' producer and its generation.
    fn producer(&self) -> (u64, Arc<FutureProducer>) {
        let p = self.inner.producer.lock().unwrap();
        (p.0, p.1.clone())
    }

    /// Replaces the producer of generation `gen` (after a fatal error); a later generation
    /// is left alone, so the forwarders that all saw the error replace it once.
    fn replace_producer(&self, generation: u64) {
        let mut p = self.inner.producer.lock().unwrap();
        if p.0 != generation {
            return;
        }
        match self.inner.producer_config.create() {
            Ok(new) => {
                *p = (generation + 1, Arc::new(new));
                self.inner.metrics.producer_restarts.inc();
                tracing::warn!("replaced the spool's Kafka producer after a fatal error");
            }
            Err(e) => tracing::error!(error = %e, "could not create the spool's Kafka producer"),
        }
    }
}

impl SpoolStream {
    fn bytes(&self) -> u64 {
        (0..self.log.partition_count())
            .filter_map(|p| self.log.marks(p))
            .map(|m| m.borrow().bytes)
            .sum()
    }

    /// Events acked to producers and not yet acknowledged by Kafka.
    fn waiting(&self) -> u64 {
        self.parts
            .iter()
            .enumerate()
            .filter_map(|(p, part)| {
                let end = self.log.marks(p as u32)?.borrow().end;
                Some(end.saturating_sub(part.forwarded.load(Ordering::Relaxed)))
            })
            .sum()
    }

    fn oldest_age_ms(&self) -> i64 {
        let oldest = self
            .parts
            .iter()
            .map(|p| p.oldest_ts.load(Ordering::Relaxed))
            .min()
            .unwrap_or(i64::MAX);
        if oldest == i64::MAX {
            0
        } else {
            (super::kafka::now_ms() - oldest).max(0)
        }
    }
}

/// The forwarders' producer: the sink's settings, and what the spool needs whatever the
/// overrides say — idempotence and acks=all (no duplicates or reordering from retries), no
/// delivery timeout (an event acked to its producer is never given up on), and a fatal error
/// instead of a gap (a failed batch never lets a later one through).
fn producer_config(k: &sluice_config::KafkaConfig) -> ClientConfig {
    let mut c = super::kafka::client_config(k);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "0")
        .set("enable.gapless.guarantee", "true")
        .set("statistics.interval.ms", "0");
    c
}

/// The stream's spool id, made once (random, 128 bits) and kept in its forward directory.
fn spool_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("id");
    if let Ok(id) = fs::read_to_string(&path) {
        let id = id.trim();
        if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(id.to_string());
        }
    }
    let mut raw = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| anyhow::anyhow!("no randomness for the spool id"))?;
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    write_durably(&path, id.as_bytes())?;
    Ok(id)
}

/// Writes `bytes` to `path` through a fsynced temporary file and a rename.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}
