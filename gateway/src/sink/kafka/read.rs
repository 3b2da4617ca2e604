//! The read side over Kafka (docs/consume.md): an rdkafka consumer assigned to the chosen
//! partitions at the cursor's offsets — no consumer group is joined and nothing is committed,
//! so a cursor is the whole state of a reader and any gateway can continue any cursor. What a
//! read may see ends at each partition's high watermark: records every in-sync replica has
//! (the producer's `acks=all`), so a reader never sees an event a broker failure could take
//! back. Records are rendered in the embedded log's shape.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{Offset, TopicPartitionList};
use sluice_core::{RawRecord, ReadBatch, ReadError, ReadFrom, ReadRecord, ReadRequest, Rejection};

use super::*;
use crate::logcmd::render;

/// One poll's wait, so a cancelled read notices within it.
const POLL: Duration = Duration::from_millis(100);
/// Metadata and watermark requests.
const META_TIMEOUT: Duration = Duration::from_secs(5);

/// The settings of a consumer that reads partitions it is assigned (never joining `group`):
/// the producer's connection and security settings, nothing of its own.
pub(crate) fn consumer_config(cfg: &KafkaConfig, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in cfg.producer_properties() {
        let keep = k == "bootstrap.servers"
            || k == "client.id"
            || k.starts_with("security.")
            || k.starts_with("sasl.")
            || k.starts_with("ssl.");
        if keep {
            config.set(k, v);
        }
    }
    config
        // Needed by librdkafka for a consumer; never joined (assign, not subscribe).
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // The end of a partition is what the fetch says it is (an EOF event), not a
        // separately listed watermark.
        .set("enable.partition.eof", "true")
        // A position outside the log is an error to report, never silently moved.
        .set("auto.offset.reset", "error")
        .set("allow.auto.create.topics", "false")
        .set("fetch.wait.max.ms", "100")
        // A reader holds little: what one read returns, not a deep prefetch per partition.
        .set("queued.max.messages.kbytes", "1024");
    config
}

/// Consumers for reads, reused.
pub struct Readers {
    config: ClientConfig,
    topic: String,
    /// Consumers left where their read ended, to continue exactly there.
    idle: Mutex<VecDeque<Parked>>,
}

/// A consumer whose last read ended cleanly at `next` (every record it polled was returned),
/// so what it has prefetched is exactly what comes next: a read that continues from `next` —
/// a tail, a reader paging by cursor — goes on polling it without a new assignment, broker
/// round trip or connection. Any other read gets a new consumer: a reused one could still
/// deliver what it fetched for an earlier assignment (another topic's partition of the same
/// number, or offsets past a gap), which must never pass for the read's own records.
struct Parked {
    topic: String,
    next: Vec<(u32, u64)>,
    /// Which partitions the fetch had reported at their end.
    eof: Vec<bool>,
    consumer: BaseConsumer,
}

/// Parked consumers kept at most (the oldest is closed first).
const PARKED: usize = 64;

impl Readers {
    pub fn new(cfg: &KafkaConfig) -> Self {
        let config = consumer_config(cfg, "sluice-reader");
        Self {
            config,
            topic: cfg.topic.clone(),
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// A parked consumer that stopped exactly at `next` of `topic`.
    fn continuing(&self, topic: &str, next: &[(u32, u64)]) -> Option<Parked> {
        let mut idle = self.idle.lock().unwrap();
        let i = idle
            .iter()
            .position(|p| p.topic == topic && p.next == next)?;
        idle.remove(i)
    }

    fn park(&self, parked: Parked) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() >= PARKED {
            idle.pop_front();
        }
        idle.push_back(parked);
    }

    /// A new consumer, for a read that does not continue a parked one.
    fn create(&self) -> Result<BaseConsumer, ReadError> {
        self.config.create().map_err(|e| {
            ReadError::Rejected(Rejection::Internal {
                message: format!("Kafka consumer: {e}"),
            })
        })
    }

    /// Reads `req` (already authorized) from the stream's topic. A long poll waits in steps
    /// of at most a second, each a blocking call, so waiting readers take turns on the
    /// blocking threads instead of holding one each for the whole wait.
    pub async fn read(self: &Arc<Self>, mut req: ReadRequest) -> Result<ReadBatch, ReadError> {
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let step = ReadRequest {
                wait: left.min(Duration::from_secs(1)),
                ..req.clone()
            };
            let batch = self.read_once(step).await?;
            if !batch.records.is_empty() || left <= Duration::from_secs(1) {
                return Ok(batch);
            }
            req.from = ReadFrom::Cursor(batch.next);
            req.partitions = None;
        }
    }

    async fn read_once(self: &Arc<Self>, req: ReadRequest) -> Result<ReadBatch, ReadError> {
        let this = self.clone();
        let cancelled = Arc::new(AtomicBool::new(false));
        // A dropped read (the client went away) stops its blocking poll within POLL.
        struct Cancel(Arc<AtomicBool>);
        impl Drop for Cancel {
            fn drop(&mut self) {
                self.0.store(true, AtomicOrdering::Relaxed);
            }
        }
        let _cancel = Cancel(cancelled.clone());
        tokio::task::spawn_blocking(move || {
            let topic = topic_name(&this.topic, req.stream.as_str());
            let parked = match (&req.from, &req.partitions) {
                (ReadFrom::Cursor(c), None) => this.continuing(&topic, c),
                _ => None,
            };
            let (consumer, start) = match parked {
                Some(p) => {
                    let parts = p.next.iter().map(|(q, o)| (*q, *o, *o)).collect();
                    (p.consumer, Start::Continue(parts, p.eof))
                }
                None => (this.create()?, Start::Fresh),
            };
            let (result, eof, clean) =
                this.read_blocking(&consumer, &topic, &req, &cancelled, start);
            if let (Ok(batch), true) = (&result, clean) {
                this.park(Parked {
                    topic,
                    next: batch.next.clone(),
                    eof,
                    consumer,
                });
            }
            result
        })
        .await
        .map_err(|e| {
            ReadError::Rejected(Rejection::Internal {
                message: format!("read task failed: {e}"),
            })
        })?
    }

    /// Reads on `consumer`: positioned and assigned first unless it continues where it was.
    /// Also answers which partitions it left at their end, and whether it stopped cleanly
    /// (every record it polled returned, so it may be parked to continue).
    fn read_blocking(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
        req: &ReadRequest,
        cancelled: &AtomicBool,
        start: Start,
    ) -> (Result<ReadBatch, ReadError>, Vec<bool>, bool) {
        let (parts, eof) = match start {
            Start::Continue(parts, eof) => (parts, eof),
            Start::Fresh => match self.position(consumer, topic, req) {
                Ok(parts) => {
                    let n = parts.len();
                    (parts, vec![false; n])
                }
                Err(e) => return (Err(e), Vec::new(), false),
            },
        };
        self.poll_records(consumer, topic, req, cancelled, parts, eof)
    }

    /// Where a fresh read starts in each partition (checked against the watermarks), with
    /// the consumer assigned there: (partition, position, high watermark).
    fn position(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
        req: &ReadRequest,
    ) -> Result<Vec<(u32, u64, u64)>, ReadError> {
        let stream = req.stream.as_str();
        let unavailable = |e: String| {
            ReadError::Rejected(Rejection::unavailable(
                Duration::from_secs(1),
                format!("Kafka cannot be read now: {e}"),
            ))
        };
        let md = consumer
            .fetch_metadata(Some(topic), META_TIMEOUT)
            .map_err(|e| unavailable(e.to_string()))?;
        let count = md
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map_or(0, |t| t.partitions().len() as u32);
        if count == 0 {
            return Err(ReadError::NoStream(stream.to_string()));
        }
        let chosen: Vec<u32> = match (&req.partitions, &req.from) {
            (Some(ps), _) => ps.clone(),
            (None, ReadFrom::Cursor(c)) => c.iter().map(|(p, _)| *p).collect(),
            (None, _) => (0..count).collect(),
        };
        if chosen.is_empty() {
            return Err(ReadError::Rejected(Rejection::Malformed {
                message: "the read names no partition".into(),
            }));
        }
        // Each partition's readable range, and where the read starts in it.
        let mut parts = Vec::with_capacity(chosen.len());
        for p in chosen {
            if p >= count {
                return Err(ReadError::Rejected(Rejection::Malformed {
                    message: format!("stream `{stream}` has no partition {p} (it has {count})"),
                }));
            }
            let (low, high) = consumer
                .fetch_watermarks(topic, p as i32, META_TIMEOUT)
                .map_err(|e| unavailable(e.to_string()))?;
            let (low, high) = (low.max(0) as u64, high.max(0) as u64);
            let pos = match &req.from {
                ReadFrom::Start => low,
                ReadFrom::End => high,
                ReadFrom::Offset(o) => *o,
                ReadFrom::Cursor(c) => c.iter().find(|(q, _)| *q == p).map_or(low, |(_, o)| *o),
                ReadFrom::Time(t) => {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(topic, p as i32, Offset::Offset(*t))
                        .map_err(|e| unavailable(e.to_string()))?;
                    let found = consumer
                        .offsets_for_times(tpl, META_TIMEOUT)
                        .map_err(|e| unavailable(e.to_string()))?;
                    match found.elements().first().map(|e| e.offset()) {
                        Some(Offset::Offset(o)) if o >= 0 => o as u64,
                        // No record at or after the time: the end.
                        _ => high,
                    }
                }
            };
            if pos < low {
                return Err(ReadError::Gone {
                    partition: p,
                    earliest: low,
                });
            }
            // Past the high watermark: nothing there (Kafka's watermark is per record; a broker
            // that lists it per batch, like Tansu 0.6, needs one record per batch,
            // `log.kafka.batch_events = 1`, for reads; docs/consume.md).
            if pos > high {
                return Err(ReadError::OutOfRange {
                    partition: p,
                    end: high,
                });
            }
            parts.push((p, pos, high));
        }
        let mut tpl = TopicPartitionList::new();
        for (p, pos, _) in &parts {
            tpl.add_partition_offset(topic, *p as i32, Offset::Offset(*pos as i64))
                .map_err(|e| unavailable(e.to_string()))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(parts)
    }

    /// Polls the records of `parts` from their positions, up to the read's limits.
    fn poll_records(
        &self,
        consumer: &BaseConsumer,
        topic: &str,
        req: &ReadRequest,
        cancelled: &AtomicBool,
        parts: Vec<(u32, u64, u64)>,
        mut eof: Vec<bool>,
    ) -> (Result<ReadBatch, ReadError>, Vec<bool>, bool) {
        let stream = req.stream.as_str();
        let unavailable = |e: String| {
            ReadError::Rejected(Rejection::unavailable(
                Duration::from_secs(1),
                format!("Kafka cannot be read now: {e}"),
            ))
        };
        let mut next: Vec<(u32, u64)> = parts.iter().map(|(p, pos, _)| (*p, *pos)).collect();
        let mut clean = true;
        let limit = req.limit.max(1);
        let start = Instant::now();
        let deadline = start + req.wait;
        // Records known to be there (below a high watermark) are waited for a while even by a
        // read that does not wait for new ones: the fetch takes a round trip.
        let hard_deadline = deadline.max(start + Duration::from_secs(5));
        let mut records = Vec::new();
        let mut bytes = 0usize;
        loop {
            if cancelled.load(AtomicOrdering::Relaxed) {
                clean = false;
                break;
            }
            if records.len() >= limit || bytes >= req.max_bytes {
                break;
            }
            // Every partition read to its end (the fetch said so).
            let at_ends = eof.iter().all(|e| *e);
            let now = Instant::now();
            if (at_ends && (!records.is_empty() || now >= deadline)) || now >= hard_deadline {
                break;
            }
            // Short of the limit, a read goes on until every partition reached its end.
            let Some(m) = consumer.poll(POLL) else {
                continue;
            };
            let m = match m {
                Ok(m) => m,
                Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                    if let Some(i) = parts.iter().position(|(q, _, _)| *q as i32 == p) {
                        eof[i] = true;
                    }
                    continue;
                }
                Err(e) if out_of_range(&e) => {
                    let (p, end) = parts
                        .iter()
                        .map(|(p, _, high)| (*p, *high))
                        .next()
                        .unwrap_or((0, 0));
                    return (Err(ReadError::OutOfRange { partition: p, end }), eof, false);
                }
                Err(e) => return (Err(unavailable(e.to_string())), eof, false),
            };
            if m.topic() != topic {
                clean = false;
                continue;
            }
            let p = m.partition() as u32;
            let offset = m.offset().max(0) as u64;
            let Some(i) = next.iter().position(|(q, _)| *q == p) else {
                clean = false;
                continue;
            };
            eof[i] = false;
            let slot = &mut next[i];
            if offset < slot.1 {
                continue; // a record before the position (a fetch from an earlier assignment)
            }
            let rec = record_of(&m);
            let (json, raw, size) = if req.raw {
                let size = rec.value.len() + rec.key.as_ref().map_or(0, Vec::len);
                (Bytes::new(), Some(Box::new(raw_of(&rec))), size)
            } else {
                match serde_json::to_vec(&render(stream, p, &rec, true)) {
                    Ok(json) => {
                        let size = json.len();
                        (Bytes::from(json), None, size)
                    }
                    Err(e) => return (Err(unavailable(e.to_string())), eof, false),
                }
            };
            if bytes + size > req.max_bytes && !records.is_empty() {
                // Polled and not returned: this consumer cannot continue from `next`.
                clean = false;
                break;
            }
            bytes += size;
            slot.1 = offset + 1;
            records.push(ReadRecord {
                partition: p,
                offset,
                size,
                json,
                raw,
            });
        }
        (Ok(ReadBatch { records, next }), eof, clean)
    }
}

impl Readers {
    /// Every record of `stream`'s topic from the first at or after `from_ms` in each partition
    /// to the partition's end as the fetch reports it now, passed to `f` with its partition
    /// (blocking; the dedup reconciliation at start, docs/exactly-once.md). A topic that does
    /// not exist has no records. Fails past `deadline`.
    pub(crate) fn scan(
        &self,
        stream: &str,
        from_ms: i64,
        deadline: Instant,
        mut f: impl FnMut(u32, sluice_log::Record),
    ) -> Result<(), String> {
        let topic = topics::topic_name(&self.topic, stream);
        let consumer = self
            .config
            .create::<BaseConsumer>()
            .map_err(|e| e.to_string())?;
        let md = consumer
            .fetch_metadata(Some(&topic), META_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let count = md
            .topics()
            .first()
            .filter(|t| t.error().is_none())
            .map_or(0, |t| t.partitions().len() as i32);
        if count == 0 {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for p in 0..count {
            tpl.add_partition_offset(&topic, p, Offset::Offset(from_ms))
                .map_err(|e| e.to_string())?;
        }
        let found = consumer
            .offsets_for_times(tpl, META_TIMEOUT)
            .map_err(|e| e.to_string())?;
        // Partitions with a record at or after the time, from that record on, to their high
        // watermark as of now.
        let mut assign = TopicPartitionList::new();
        let mut open: Vec<(i32, i64)> = Vec::new();
        for e in found.elements() {
            if let Offset::Offset(o) = e.offset()
                && o >= 0
            {
                let (_, high) = consumer
                    .fetch_watermarks(&topic, e.partition(), META_TIMEOUT)
                    .map_err(|e| e.to_string())?;
                assign
                    .add_partition_offset(&topic, e.partition(), Offset::Offset(o))
                    .map_err(|e| e.to_string())?;
                if o < high {
                    open.push((e.partition(), high));
                }
            }
        }
        if assign.count() == 0 {
            return Ok(());
        }
        consumer.assign(&assign).map_err(|e| e.to_string())?;
        // A partition is read once a record at its high watermark or the fetch's end-of-
        // partition was seen; then what is still coming is read for a moment more (a broker
        // that lists the watermark per batch, like Tansu 0.6, may list it short of a batch's
        // last records, which come in the same fetch). What producers send meanwhile is new,
        // and not waited for.
        let mut tail_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now > deadline {
                return Err(format!(
                    "topic `{topic}` was not read to its end in time ({} partitions left)",
                    open.len()
                ));
            }
            if open.is_empty() {
                let until = *tail_until.get_or_insert(now + Duration::from_millis(300));
                if now >= until {
                    break;
                }
            }
            match consumer.poll(POLL) {
                None if open.is_empty() => break,
                None => {}
                Some(Ok(m)) if m.topic() == topic => {
                    let (p, o) = (m.partition(), m.offset());
                    open.retain(|(q, high)| !(*q == p && o + 1 >= *high));
                    f(p as u32, record_of(&m));
                }
                Some(Ok(_)) => {}
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    open.retain(|(q, _)| *q != p)
                }
                Some(Err(e)) => return Err(e.to_string()),
            }
        }
        Ok(())
    }
}

/// How a read's consumer starts: positioned and assigned, or where a parked one was.
enum Start {
    Fresh,
    Continue(Vec<(u32, u64, u64)>, Vec<bool>),
}

/// Whether a consumer error says the position is outside the partition's log.
fn out_of_range(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::OffsetOutOfRange | C::AutoOffsetReset)
    )
}

/// A Kafka message as a record of the embedded log (Sluice's headers back in their fields).
fn record_of(m: &rdkafka::message::BorrowedMessage<'_>) -> sluice_log::Record {
    let mut r = sluice_log::Record {
        offset: m.offset().max(0) as u64,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        producer_timestamp_ms: None,
        key: m.key().map(<[u8]>::to_vec),
        id: None,
        headers: Vec::new(),
        value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        content_type: Vec::new(),
        protocol: Vec::new(),
        principal: Vec::new(),
    };
    let (mut name, mut source) = (Vec::new(), Vec::new());
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            let v = h.value.map(<[u8]>::to_vec).unwrap_or_default();
            match h.key {
                headers::CONTENT_TYPE if r.content_type.is_empty() => r.content_type = v,
                headers::EVENT_ID => r.id = Some(v),
                headers::PRINCIPAL => name = v,
                headers::PRINCIPAL_SOURCE => source = v,
                headers::PROTOCOL => r.protocol = v,
                // A record whose timestamp is not its time of receipt carries the producer's.
                headers::RECEIVED_AT => {
                    if let Some(received) = std::str::from_utf8(&v)
                        .ok()
                        .and_then(|t| t.parse::<i64>().ok())
                        .filter(|&t| t != r.timestamp_ms)
                    {
                        r.producer_timestamp_ms = Some(r.timestamp_ms);
                        r.timestamp_ms = received;
                    }
                }
                k => r.headers.push((k.as_bytes().to_vec(), v)),
            }
        }
    }
    r.principal = if source.is_empty() {
        name
    } else {
        [source, vec![0x1f], name].concat()
    };
    r
}

fn raw_of(r: &sluice_log::Record) -> RawRecord {
    crate::read::raw_of(r)
}
