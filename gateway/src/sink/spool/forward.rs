//! One forwarder per spool partition: find out what Kafka already has, then send what follows,
//! in order, to the same partition of the topic, keeping at most
//! `log.spool.max_in_flight_events` unacknowledged; write a checkpoint now and then and let
//! the spool delete what lies below it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use sluice_log::{PartitionReader, Record};

use super::metrics::{ErrorLabels, StreamLabel};
use super::{Spool, SpoolStream, write_durably};
use crate::sink::kafka::headers;

/// The header naming where a forwarded record came from:
/// `<spool id>:<spool partition>:<spool offset>`.
pub const SPOOL_HEADER: &str = "sluice-spool";

/// How long a recovery waits for the topic's metadata (and its creation).
const LOOKUP_WAIT: Duration = Duration::from_secs(3);
/// Events read from the spool per step.
const READ_STEP: usize = 1000;
/// Longest pause between attempts after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a scan of Kafka may take before it is retried.
const SCAN_DEADLINE: Duration = Duration::from_secs(60);
/// How long a scan past the high watermark waits for more records before it ends.
const SCAN_QUIET: Duration = Duration::from_secs(1);
/// How long a stopping forwarder waits for what it has in flight.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// A partition's checkpoint: every spool offset below `next` is in Kafka, and every record of
/// this spool partition at or after `next` that Kafka may have is, in each Kafka partition the
/// forwarder writes to, at the listed offset or later.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Checkpoint {
    pub(super) next: u64,
    pub(super) kafka: BTreeMap<i32, i64>,
}

pub(super) fn checkpoint_path(spool: &Spool, stream: &str, p: u32) -> PathBuf {
    spool
        .inner
        .forward_dir
        .join(stream)
        .join(format!("{p}.checkpoint"))
}

/// `next=N kafka=P:O,P:O`.
pub(super) fn read_checkpoint(path: &Path) -> Option<Checkpoint> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut next = None;
    let mut kafka = BTreeMap::new();
    for part in text.split_whitespace() {
        match part.split_once('=') {
            Some(("next", v)) => next = v.parse().ok(),
            Some(("kafka", v)) => {
                for pair in v.split(',').filter(|p| !p.is_empty()) {
                    let (kp, ko) = pair.split_once(':')?;
                    kafka.insert(kp.parse().ok()?, ko.parse().ok()?);
                }
            }
            _ => {}
        }
    }
    Some(Checkpoint { next: next?, kafka })
}

fn write_checkpoint(path: &Path, c: &Checkpoint) -> std::io::Result<()> {
    let kafka: Vec<String> = c.kafka.iter().map(|(p, o)| format!("{p}:{o}")).collect();
    write_durably(
        path,
        format!("next={} kafka={}\n", c.next, kafka.join(",")).as_bytes(),
    )
}

/// How a forwarding session ended.
enum Ended {
    Stopped,
    /// Kafka refused, or the producer failed; recover and go on.
    Failed(String, Option<RDKafkaErrorCode>),
}

/// The forwarder of partition `p`: recovers, forwards until something fails, and again.
pub(super) async fn run(spool: Spool, stream: Arc<SpoolStream>, p: u32) {
    let mut stop = spool.inner.stop.subscribe();
    let mut backoff = Duration::from_millis(100);
    let mut last_problem = String::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let (generation, producer) = spool.producer();
        // Asking Kafka can take a while (metadata, a scan): a stop does not wait for it.
        let recovered = tokio::select! {
            r = recover(&spool, &stream, p) => r,
            _ = stop.wait_for(|&s| s) => return,
        };
        let problem = match recovered {
            Ok(start) => {
                if !last_problem.is_empty() {
                    tracing::info!(stream = %stream.name, partition = p, next = start.next, "spool forwarding resumed");
                    last_problem.clear();
                }
                backoff = Duration::from_millis(100);
                match forward(&spool, &stream, p, start, &producer, &mut stop).await {
                    Ended::Stopped => return,
                    Ended::Failed(why, code) => {
                        spool.count_error(&stream, "delivery");
                        if producer.client().fatal_error().is_some()
                            || code == Some(RDKafkaErrorCode::Fatal)
                        {
                            spool.replace_producer(generation);
                        }
                        format!("forwarding to Kafka failed: {why}")
                    }
                }
            }
            Err((kind, why)) => {
                spool.count_error(&stream, kind);
                why
            }
        };
        if problem != last_problem {
            tracing::warn!(stream = %stream.name, partition = p, problem = %problem, "spool forwarding waits; retrying");
            last_problem = problem;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.wait_for(|&s| s) => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Where a forwarding session starts, as recovery found it.
struct Start {
    /// The first spool offset Kafka does not have.
    next: u64,
    /// Spool offsets past `next` that Kafka has all the same (sent before a failure that
    /// failed an earlier one, into another Kafka partition): not sent again.
    skip: BTreeSet<u64>,
    /// The topic's partition count this session maps to.
    kafka_partitions: u32,
    checkpoint: Checkpoint,
}

/// Finds what Kafka already has of this spool partition: the records carrying its
/// `sluice-spool` header after the checkpoint's Kafka offsets. Writes a checkpoint for the
/// session that follows before it sends anything, so a crash in it scans from here.
async fn recover(
    spool: &Spool,
    stream: &SpoolStream,
    p: u32,
) -> Result<Start, (&'static str, String)> {
    let marks = stream.log.marks(p).expect("partition").borrow().to_owned();
    let path = checkpoint_path(spool, &stream.name, p);
    let old = read_checkpoint(&path);
    let floor = old
        .as_ref()
        .map_or(marks.start, |c| c.next.max(marks.start));
    // Until Kafka answers, the oldest waiting event is the first one after the checkpoint.
    note_oldest(stream, p, floor, marks.end);
    // Bounded, so a Kafka going away does not hold the attempt (and the oldest event's age,
    // noted above at each attempt) for several metadata timeouts.
    let lookup = spool
        .inner
        .kafka
        .get_or_create(&stream.name, &stream.settings, stream.may_create);
    let topic = tokio::time::timeout(LOOKUP_WAIT, lookup)
        .await
        .map_err(|_| {
            (
                "recover",
                format!("Kafka did not answer within {LOOKUP_WAIT:?}"),
            )
        })?
        .map_err(|r| {
            (
                "recover",
                format!("Kafka cannot take the stream's events: {r}"),
            )
        })?;
    let n = topic.partition_count();
    if n != stream.log.partition_count() {
        spool.count_error(stream, "partitions");
        tracing::warn!(
            stream = %stream.name, partition = p, topic = %topic.name, topic_partitions = n,
            spool_partitions = stream.log.partition_count(),
            "the topic's partition count differs from the spool's: keyed events go to the partition of their key, keyless ones spread (docs/kafka.md)"
        );
    }
    let targets: Vec<i32> = if n == stream.log.partition_count() {
        vec![p as i32]
    } else {
        (0..n as i32).collect()
    };
    let config = spool.inner.consumer_config.clone();
    let topic_name = topic.name.clone();
    let prefix = format!("{}:{p}:", stream.id);
    // What the last session may have written: the old checkpoint's partitions from its
    // offsets. No checkpoint: no session ever sent anything (each writes one first).
    let scan_from = old.as_ref().map(|c| c.kafka.clone()).unwrap_or_default();
    let (found, highs) = tokio::task::spawn_blocking(move || {
        let mut found = BTreeSet::new();
        let mut highs = BTreeMap::new();
        for (&kp, &from) in &scan_from {
            if kp < n as i32 {
                highs.insert(
                    kp,
                    scan(&config, &topic_name, kp, from, &prefix, &mut found)?,
                );
            }
        }
        for &kp in &targets {
            if let std::collections::btree_map::Entry::Vacant(e) = highs.entry(kp) {
                e.insert(high_watermark(&config, &topic_name, kp)?);
            }
        }
        Ok::<_, KafkaError>((found, highs))
    })
    .await
    .map_err(|e| ("recover", e.to_string()))?
    .map_err(|e| ("recover", format!("reading what Kafka has: {e}")))?;
    // The first offset from the floor on that Kafka does not have.
    let mut next = floor;
    let mut skip: BTreeSet<u64> = found.into_iter().filter(|&o| o >= floor).collect();
    while skip.remove(&next) {
        next += 1;
    }
    // Lower bounds for the next session's records: the end of each target partition now —
    // unless Kafka has records past `next` (skipped), which a later scan must still see.
    let kafka = if skip.is_empty() {
        highs
    } else {
        let mut k = old.as_ref().map(|c| c.kafka.clone()).unwrap_or_default();
        for (kp, h) in highs {
            k.entry(kp).or_insert(h);
        }
        k
    };
    let c = Checkpoint { next, kafka };
    if old.as_ref() != Some(&c) {
        let (path, c) = (path.clone(), c.clone());
        tokio::task::spawn_blocking(move || write_checkpoint(&path, &c))
            .await
            .map_err(|e| ("recover", e.to_string()))?
            .map_err(|e| ("recover", format!("writing the checkpoint: {e}")))?;
    }
    stream.parts[p as usize]
        .forwarded
        .store(next, Ordering::Relaxed);
    stream.log.release(p, next);
    Ok(Start {
        next,
        skip,
        kafka_partitions: n,
        checkpoint: c,
    })
}

fn high_watermark(config: &rdkafka::ClientConfig, topic: &str, kp: i32) -> Result<i64, KafkaError> {
    let consumer: BaseConsumer = config.create()?;
    Ok(consumer
        .fetch_watermarks(topic, kp, Timeout::After(Duration::from_secs(10)))?
        .1)
}

/// Reads Kafka partition `kp` of `topic` from offset `from` to its end, adding the spool
/// offset of every record whose `sluice-spool` header starts with `prefix` to `found`;
/// returns the end (high watermark) as it was when the scan began.
fn scan(
    config: &rdkafka::ClientConfig,
    topic: &str,
    kp: i32,
    from: i64,
    prefix: &str,
    found: &mut BTreeSet<u64>,
) -> Result<i64, KafkaError> {
    let consumer: BaseConsumer = config.create()?;
    let timeout = Timeout::After(Duration::from_secs(10));
    let (low, high) = consumer.fetch_watermarks(topic, kp, timeout)?;
    let from = from.max(low);
    if from >= high {
        return Ok(high);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, kp, Offset::Offset(from))?;
    consumer.assign(&tpl)?;
    let deadline = std::time::Instant::now() + SCAN_DEADLINE;
    // The end is where the fetch says the partition ends (an EOF event). Some brokers (Tansu
    // 0.6) report a high watermark per batch, short of the batch's last records, so records
    // at or past it are read too, until the fetch reports the end or a moment passes quietly.
    let mut past_high = false;
    let mut quiet_since = std::time::Instant::now();
    while std::time::Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            None if past_high && quiet_since.elapsed() >= SCAN_QUIET => return Ok(high),
            None => continue,
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(high),
            Some(Err(e)) => return Err(e),
            Some(Ok(m)) => {
                quiet_since = std::time::Instant::now();
                if let Some(h) = m.headers() {
                    let offset = h
                        .iter()
                        .filter(|h| h.key == SPOOL_HEADER)
                        .filter_map(|h| std::str::from_utf8(h.value?).ok())
                        .filter_map(|v| v.strip_prefix(prefix)?.parse::<u64>().ok())
                        .next();
                    found.extend(offset);
                }
                if m.offset() + 1 >= high {
                    past_high = true;
                }
            }
        }
    }
    Err(KafkaError::MessageConsumption(
        RDKafkaErrorCode::OperationTimedOut,
    ))
}

/// Sets the partition's oldest waiting event from the spool: the one at `from`, if any.
fn note_oldest(stream: &SpoolStream, p: u32, from: u64, end: u64) {
    let part = &stream.parts[p as usize];
    if from >= end {
        part.oldest_ts.store(i64::MAX, Ordering::Relaxed);
        return;
    }
    let ts = stream
        .log
        .partition_dir(p)
        .and_then(|d| PartitionReader::from_offset(d, from).ok())
        .and_then(|mut r| r.next_record().ok().flatten())
        .map_or(i64::MAX, |r| r.timestamp_ms);
    part.oldest_ts.store(ts, Ordering::Relaxed);
}

struct InFlight {
    offset: u64,
    ts: i64,
    /// `None` for a record Kafka has already (recovery found it): done at once.
    delivery: Option<DeliveryFuture>,
}

/// A session's progress, and what its checkpoints say.
struct Progress {
    /// Every spool offset below this is in Kafka.
    done: u64,
    /// The checkpoint being kept: `kafka` moves with deliveries once no skipped record lies
    /// ahead of `done`.
    checkpoint: Checkpoint,
    /// The highest skipped offset: until `done` passes it, the Kafka offsets stay where
    /// recovery put them (a later scan must still find those records).
    skip_until: Option<u64>,
    saved: Checkpoint,
}

impl Progress {
    fn delivered(&mut self, offset: u64, kafka: Option<(i32, i64)>) {
        self.done = offset + 1;
        if let Some((kp, ko)) = kafka
            && self.skip_until.is_none_or(|s| self.done > s)
        {
            let e = self.checkpoint.kafka.entry(kp).or_insert(ko);
            *e = (*e).max(ko);
        }
    }
}

/// Sends the partition's events from `start` on until stopped or something fails.
async fn forward(
    spool: &Spool,
    stream: &SpoolStream,
    p: u32,
    start: Start,
    producer: &FutureProducer,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Ended {
    let cfg = &spool.inner.cfg;
    let part = &stream.parts[p as usize];
    let label = StreamLabel {
        stream: stream.name.to_string(),
    };
    let forwarded = spool.inner.metrics.forwarded.get_or_create(&label).clone();
    let topic = crate::sink::kafka::topic_name(&spool.inner.kafka.config().topic, &stream.name);
    let path = checkpoint_path(spool, &stream.name, p);
    let mut marks = stream.log.marks(p).expect("partition");
    let dir = stream
        .log
        .partition_dir(p)
        .expect("partition")
        .to_path_buf();
    let mut reader = Some(match PartitionReader::from_offset(&dir, start.next) {
        Ok(r) => r,
        Err(e) => return Ended::Failed(format!("reading the spool: {e}"), None),
    });
    // The spool partition goes to the same Kafka partition when the counts agree; otherwise
    // keyed events to their key's partition (Kafka's murmur2), keyless ones spread.
    let n = start.kafka_partitions;
    let same = n == stream.log.partition_count();
    let kafka_partition = |key: Option<&[u8]>| -> i32 {
        match (same, key) {
            (true, _) => p as i32,
            (false, Some(k)) => sluice_log::partition_for_key(k, n) as i32,
            (false, None) => (p % n) as i32,
        }
    };
    let prefix = format!("{}:{p}:", stream.id);
    let max_in_flight = cfg.max_in_flight_events as usize;
    let mut in_flight: VecDeque<InFlight> = VecDeque::with_capacity(max_in_flight.min(65536));
    let mut next_read = start.next;
    let mut skip = start.skip;
    let mut progress = Progress {
        done: start.next,
        skip_until: skip.last().copied(),
        saved: start.checkpoint.clone(),
        checkpoint: start.checkpoint,
    };
    let every = Duration::from_millis(cfg.checkpoint_interval_ms);
    let mut next_checkpoint = tokio::time::Instant::now() + every;
    let mut ready: VecDeque<Record> = VecDeque::new();
    loop {
        // Hand the producer what is durable in the spool, up to the window.
        let end = marks.borrow_and_update().end;
        while in_flight.len() < max_in_flight && (next_read < end || !ready.is_empty()) {
            if ready.is_empty() {
                let want = (max_in_flight - in_flight.len())
                    .min(READ_STEP)
                    .min((end - next_read) as usize);
                let mut r = reader.take().expect("reader");
                let (r, got) = tokio::task::spawn_blocking(move || {
                    let mut got = Vec::with_capacity(want);
                    let mut err = None;
                    while got.len() < want {
                        match r.next_record() {
                            Ok(Some(rec)) if rec.offset < end => got.push(rec),
                            // Written, not fsynced yet: a crash could still take it back, so
                            // it is not forwarded before it is durable.
                            Ok(Some(rec)) => {
                                r.put_back(rec);
                                break;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                err = Some(e);
                                break;
                            }
                        }
                    }
                    (r, err.map_or(Ok(got), Err))
                })
                .await
                .expect("spool read task");
                reader = Some(r);
                match got {
                    Ok(got) if got.is_empty() => break,
                    Ok(got) => ready.extend(got),
                    Err(e) => return Ended::Failed(format!("reading the spool: {e}"), None),
                }
                pace(spool, stream, ready.len()).await;
            }
            let Some(rec) = ready.front() else { break };
            if skip.remove(&rec.offset) {
                let rec = ready.pop_front().expect("front");
                next_read = rec.offset + 1;
                in_flight.push_back(InFlight {
                    offset: rec.offset,
                    ts: rec.timestamp_ms,
                    delivery: None,
                });
                continue;
            }
            let value = format!("{prefix}{}", rec.offset);
            let record = FutureRecord {
                topic: &topic,
                partition: Some(kafka_partition(rec.key.as_deref())),
                payload: Some(&rec.value[..]),
                key: rec.key.as_deref(),
                timestamp: Some(rec.event_time_ms()),
                headers: Some(record_headers(rec, &value)),
            };
            match producer.send_result(record) {
                Ok(delivery) => {
                    let rec = ready.pop_front().expect("front");
                    next_read = rec.offset + 1;
                    in_flight.push_back(InFlight {
                        offset: rec.offset,
                        ts: rec.timestamp_ms,
                        delivery: Some(delivery),
                    });
                }
                // The producer's queue is full: wait for this partition's deliveries below, or,
                // with none in flight (other partitions and streams filled the shared queue),
                // a moment, then try again.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    if in_flight.is_empty() {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                            _ = async { drop(stop.wait_for(|&s| s).await) } => {
                                save(stream, p, &path, &mut progress).await;
                                return Ended::Stopped;
                            }
                        }
                        continue;
                    }
                    break;
                }
                Err((e, _)) => {
                    drain(&mut in_flight).await;
                    save(stream, p, &path, &mut progress).await;
                    return Ended::Failed(e.to_string(), e.rdkafka_error_code());
                }
            }
        }
        // Records Kafka had already are done as soon as they reach the front.
        while in_flight.front().is_some_and(|f| f.delivery.is_none()) {
            let f = in_flight.pop_front().expect("front");
            progress.delivered(f.offset, None);
        }
        part.forwarded.store(progress.done, Ordering::Relaxed);
        part.oldest_ts.store(
            in_flight
                .front()
                .map(|f| f.ts)
                .or(ready.front().map(|r| r.timestamp_ms))
                .unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
        let caught_up = next_read >= marks.borrow().end && ready.is_empty();
        let waiting = !in_flight.is_empty();
        tokio::select! {
            d = async {
                let f = in_flight.front_mut().expect("non-empty");
                f.delivery.as_mut().expect("a delivery at the front").await
            }, if waiting => {
                let mut result = Some(d);
                // Deliveries complete in order per Kafka partition: take every one that is
                // ready at the front.
                while let Some(d) = result.take() {
                    let f = in_flight.pop_front().expect("front");
                    match d {
                        Ok(Ok(d)) => {
                            progress.delivered(f.offset, Some((d.partition, d.offset)));
                            forwarded.inc();
                        }
                        Ok(Err((e, _))) => {
                            drain(&mut in_flight).await;
                            save(stream, p, &path, &mut progress).await;
                            return Ended::Failed(e.to_string(), e.rdkafka_error_code());
                        }
                        Err(_) => {
                            drain(&mut in_flight).await;
                            save(stream, p, &path, &mut progress).await;
                            return Ended::Failed("the producer was dropped".into(), None);
                        }
                    }
                    while in_flight.front().is_some_and(|f| f.delivery.is_none()) {
                        let f = in_flight.pop_front().expect("front");
                        progress.delivered(f.offset, None);
                    }
                    result = in_flight
                        .front_mut()
                        .and_then(|f| f.delivery.as_mut()?.now_or_never());
                }
                part.forwarded.store(progress.done, Ordering::Relaxed);
            }
            _ = marks.changed(), if caught_up && in_flight.len() < max_in_flight => {}
            _ = tokio::time::sleep_until(next_checkpoint) => {}
            _ = async { drop(stop.wait_for(|&s| s).await) } => {
                // Give what is in flight a moment, note what Kafka has, and leave the rest.
                let deadline = tokio::time::Instant::now() + STOP_WAIT;
                while let Some(f) = in_flight.front_mut() {
                    let kafka = match &mut f.delivery {
                        None => None,
                        Some(d) => match tokio::time::timeout_at(deadline, d).await {
                            Ok(Ok(Ok(d))) => {
                                forwarded.inc();
                                Some((d.partition, d.offset))
                            }
                            _ => break,
                        },
                    };
                    let offset = f.offset;
                    in_flight.pop_front();
                    progress.delivered(offset, kafka);
                }
                part.forwarded.store(progress.done, Ordering::Relaxed);
                save(stream, p, &path, &mut progress).await;
                return Ended::Stopped;
            }
        }
        if tokio::time::Instant::now() >= next_checkpoint {
            save(stream, p, &path, &mut progress).await;
            next_checkpoint = tokio::time::Instant::now() + every;
        }
    }
}

/// Writes the checkpoint if forwarding moved since the last one, then lets the spool delete
/// the segments below it. A checkpoint that cannot be written only makes a later scan longer.
async fn save(stream: &SpoolStream, p: u32, path: &Path, progress: &mut Progress) {
    progress.checkpoint.next = progress.done;
    if progress.checkpoint == progress.saved {
        return;
    }
    let c = progress.checkpoint.clone();
    let path = path.to_path_buf();
    match tokio::task::spawn_blocking(move || write_checkpoint(&path, &c)).await {
        Ok(Ok(())) => {
            progress.saved = progress.checkpoint.clone();
            stream.log.release(p, progress.done);
        }
        Ok(Err(e)) => {
            tracing::warn!(stream = %stream.name, partition = p, error = %e, "could not write the spool checkpoint")
        }
        Err(_) => {}
    }
}

/// Waits (a bounded time) for every delivery in flight, so none of them lands after the scan
/// that follows a failure.
async fn drain(in_flight: &mut VecDeque<InFlight>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for f in in_flight.drain(..) {
        if let Some(d) = f.delivery {
            let _ = tokio::time::timeout_at(deadline, d).await;
        }
    }
}

/// Waits until the stream may send `n` more events (`log.spool.forward_rate`, shared by the
/// stream's partitions).
async fn pace(spool: &Spool, stream: &SpoolStream, n: usize) {
    let rate = spool.inner.cfg.forward_rate;
    if rate == 0 || n == 0 {
        return;
    }
    let at = {
        let mut next = stream.pace.lock().unwrap();
        let now = tokio::time::Instant::now();
        // Up to 100 ms of unused rate may be caught up, no more.
        let from = (*next).max(now - Duration::from_millis(100).min(now.elapsed()));
        *next = from + Duration::from_secs_f64(n as f64 / rate as f64);
        from
    };
    tokio::time::sleep_until(at).await;
}

/// The record's headers: the same as events produced to Kafka directly (docs/kafka.md), then
/// the spool's own.
fn record_headers(r: &Record, spool: &str) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(7 + r.headers.len());
    let add = |h: OwnedHeaders, key: &str, value: &[u8]| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    };
    let own_type = r
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case(headers::CONTENT_TYPE.as_bytes()));
    if !r.content_type.is_empty() && !own_type {
        h = add(h, headers::CONTENT_TYPE, &r.content_type);
    }
    if let Some(id) = &r.id {
        h = add(h, headers::EVENT_ID, id);
    }
    let (name, source) = r.principal_parts();
    h = add(h, headers::PRINCIPAL, name);
    // As the direct path: no source header for a principal without one.
    if let Some(source) = source.filter(|s| !s.is_empty()) {
        h = add(h, headers::PRINCIPAL_SOURCE, source);
    }
    h = add(h, headers::PROTOCOL, &r.protocol);
    h = add(
        h,
        headers::RECEIVED_AT,
        r.timestamp_ms.to_string().as_bytes(),
    );
    for (k, v) in &r.headers {
        h = add(h, &String::from_utf8_lossy(k), v);
    }
    add(h, SPOOL_HEADER, spool.as_bytes())
}

impl Spool {
    fn count_error(&self, stream: &SpoolStream, error: &'static str) {
        self.inner
            .metrics
            .errors
            .get_or_create(&ErrorLabels {
                stream: stream.name.to_string(),
                error,
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_a_torn_one_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.checkpoint");
        assert_eq!(read_checkpoint(&path), None);
        let c = Checkpoint {
            next: 1234,
            kafka: BTreeMap::from([(0, 17), (2, 99)]),
        };
        write_checkpoint(&path, &c).unwrap();
        assert_eq!(read_checkpoint(&path), Some(c));
        let empty = Checkpoint {
            next: 5,
            kafka: BTreeMap::new(),
        };
        write_checkpoint(&path, &empty).unwrap();
        assert_eq!(read_checkpoint(&path), Some(empty));
        std::fs::write(&path, "next=12 kafka=0:").unwrap();
        assert_eq!(read_checkpoint(&path), None);
        std::fs::write(&path, "kafka=0:1").unwrap();
        assert_eq!(read_checkpoint(&path), None);
    }

    #[test]
    fn a_checkpoints_kafka_offsets_wait_until_every_skipped_record_is_behind() {
        let mut p = Progress {
            done: 10,
            checkpoint: Checkpoint {
                next: 10,
                kafka: BTreeMap::from([(0, 100)]),
            },
            skip_until: Some(12),
            saved: Checkpoint::default(),
        };
        // 10 and 11 delivered while 12 (already in Kafka at an offset below 150) lies ahead:
        // a later scan must still start at 100 to find it.
        p.delivered(10, Some((0, 150)));
        p.delivered(11, Some((0, 151)));
        assert_eq!(p.checkpoint.kafka[&0], 100);
        p.delivered(12, None);
        p.delivered(13, Some((0, 152)));
        assert_eq!(p.done, 14);
        assert_eq!(p.checkpoint.kafka[&0], 152);
        // Another partition's first delivery adds it.
        p.delivered(14, Some((1, 7)));
        assert_eq!(p.checkpoint.kafka[&1], 7);
    }
}
