//! The read side of the embedded log (docs/consume.md): records of a stream by offset, time or
//! cursor, only what is durable, with a long poll at the end.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_core::{
    Principal, RawRecord, ReadBatch, ReadError, ReadFrom, ReadRecord, ReadRequest, Rejection,
};
use sluice_log::{Marks, PartitionReader};
use tokio::sync::watch;

use crate::logcmd::render;
use crate::sink::Sink;

/// Most records one read answers.
pub const MAX_LIMIT: usize = 10_000;
/// Most bytes of records one read answers.
pub const MAX_BYTES: usize = 16 * 1024 * 1024;
/// Longest long poll.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Where one partition's read starts.
#[derive(Clone, Copy)]
enum Pos {
    Offset(u64),
    Time(i64),
}

struct Part {
    partition: u32,
    dir: PathBuf,
    marks: watch::Receiver<Marks>,
    pos: Pos,
}

pub(crate) async fn read(
    sink: &Sink,
    caches: &Caches,
    principal: &Principal,
    req: ReadRequest,
) -> Result<ReadBatch, ReadError> {
    let name = req.stream.as_str();
    if !principal.may_consume(name) {
        return Err(ReadError::Forbidden(name.to_string()));
    }
    let log = match sink {
        Sink::Embedded(log) => log,
        Sink::Kafka(kafka, _) => return kafka.read(req).await,
    };
    let Some(stream) = log.stream(name) else {
        return Err(ReadError::NoStream(name.to_string()));
    };
    let count = stream.partition_count();
    let chosen: Vec<u32> = match (&req.partitions, &req.from) {
        (Some(ps), _) => ps.clone(),
        (None, ReadFrom::Cursor(c)) => c.iter().map(|(p, _)| *p).collect(),
        (None, _) => (0..count).collect(),
    };
    let mut parts = Vec::with_capacity(chosen.len());
    for p in chosen {
        let (Some(marks), Some(dir)) = (stream.marks(p), stream.partition_dir(p)) else {
            return Err(Rejection::Malformed {
                message: format!("stream `{name}` has no partition {p} (it has {count})"),
            }
            .into());
        };
        let m = *marks.borrow();
        let pos = match &req.from {
            ReadFrom::Offset(o) => Pos::Offset(*o),
            ReadFrom::Time(t) => Pos::Time(*t),
            ReadFrom::End => Pos::Offset(m.end),
            ReadFrom::Start => Pos::Offset(m.start),
            // A partition the cursor does not name starts at its oldest record.
            ReadFrom::Cursor(c) => {
                Pos::Offset(c.iter().find(|(q, _)| *q == p).map_or(m.start, |(_, o)| *o))
            }
        };
        if let Pos::Offset(o) = pos {
            check(p, o, m)?;
        }
        parts.push(Part {
            partition: p,
            dir: dir.to_path_buf(),
            marks,
            pos,
        });
    }
    if parts.is_empty() {
        return Err(Rejection::Malformed {
            message: "the read names no partition".into(),
        }
        .into());
    }
    let deadline = tokio::time::Instant::now() + req.wait.min(MAX_WAIT);
    let limit = req.limit.clamp(1, MAX_LIMIT);
    let max_bytes = req.max_bytes.clamp(1, MAX_BYTES);
    let mut gone_retries = 0;
    loop {
        // Seen before reading: a record made durable while the read runs wakes the next wait.
        for part in &mut parts {
            part.marks.borrow_and_update();
        }
        let job: Vec<(u32, PathBuf, Pos, Marks)> = parts
            .iter()
            .map(|p| (p.partition, p.dir.clone(), p.pos, *p.marks.borrow()))
            .collect();
        let raw = req.raw;
        let stream_name = name.to_string();
        let cache = caches.of(name, count);
        let read = tokio::task::spawn_blocking(move || {
            read_parts(&stream_name, job, limit, max_bytes, raw, Some(&cache))
        })
        .await
        .map_err(|e| Rejection::Internal {
            message: format!("read task failed: {e}"),
        })?;
        let ReadBatch { records, next } = match read {
            Ok(batch) => batch,
            // Retention deleted the position while the read ran. A reader that asked for the
            // oldest records (or a time, resolved to an offset) is not told "gone": it goes on
            // from the oldest there is now; a reader that named the offset is.
            Err(ReadFail::Gone(partition, earliest))
                if matches!(req.from, ReadFrom::Start | ReadFrom::Time(_)) && gone_retries < 3 =>
            {
                gone_retries += 1;
                if let Some(part) = parts.iter_mut().find(|p| p.partition == partition) {
                    part.pos = Pos::Offset(earliest);
                }
                continue;
            }
            Err(ReadFail::Gone(partition, earliest)) => {
                return Err(ReadError::Gone {
                    partition,
                    earliest,
                });
            }
            Err(ReadFail::Io(e)) => {
                return Err(ReadError::Rejected(Rejection::Internal {
                    message: format!("reading the log: {e}"),
                }));
            }
        };
        for (part, (_, o)) in parts.iter_mut().zip(&next) {
            part.pos = Pos::Offset(*o);
        }
        if !records.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(ReadBatch { records, next });
        }
        // Long poll: until a partition has a new durable record, or the deadline.
        let changed = futures_util::future::select_all(
            parts
                .iter_mut()
                .map(|p| Box::pin(p.marks.changed()))
                .collect::<Vec<_>>(),
        );
        match tokio::time::timeout_at(deadline, changed).await {
            Ok((Ok(()), _, _)) => {}
            // The timeout, or the log closing (shutdown): answer what there is (nothing).
            Ok((Err(_), _, _)) | Err(_) => return Ok(ReadBatch { records, next }),
        }
    }
}

/// The streams `principal` may read.
pub(crate) fn streams(sink: &Sink, principal: &Principal) -> Vec<sluice_core::StreamInfo> {
    match sink {
        Sink::Embedded(log) => log
            .stream_names()
            .into_iter()
            .filter(|n| principal.may_consume(n))
            .filter_map(|name| {
                let s = log.stream(&name)?;
                let records = (0..s.partition_count())
                    .filter_map(|p| s.marks(p).map(|m| m.borrow().end))
                    .sum();
                Some(sluice_core::StreamInfo {
                    name,
                    partitions: s.partition_count(),
                    records: Some(records),
                })
            })
            .collect(),
        Sink::Kafka(k, _) => k
            .streams()
            .into_iter()
            .filter(|(n, _)| principal.may_consume(n))
            .map(|(name, partitions)| sluice_core::StreamInfo {
                name,
                partitions,
                records: None,
            })
            .collect(),
    }
}

/// A position older than retention or past the end is refused, naming the range.
fn check(partition: u32, offset: u64, m: Marks) -> Result<(), ReadError> {
    if offset < m.start {
        return Err(ReadError::Gone {
            partition,
            earliest: m.start,
        });
    }
    if offset > m.end {
        return Err(ReadError::OutOfRange {
            partition,
            end: m.end,
        });
    }
    Ok(())
}

enum ReadFail {
    Gone(u32, u64),
    Io(std::io::Error),
}

impl From<std::io::Error> for ReadFail {
    fn from(e: std::io::Error) -> Self {
        ReadFail::Io(e)
    }
}

/// Rendered records near the end of each partition, shared by every reader there: a hundred
/// live tails of one stream render and read each record once, not a hundred times.
pub(crate) struct Caches {
    streams: Mutex<HashMap<String, Arc<StreamCache>>>,
    /// Bytes held by every cache together, bounded by [`CACHE_BYTES`].
    bytes: Arc<AtomicUsize>,
}

/// Records kept per partition (the newest).
const CACHE_RECORDS: usize = 4096;
/// Bytes kept by all caches together.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

pub(crate) struct StreamCache {
    parts: Vec<PartCache>,
    bytes: Arc<AtomicUsize>,
}

#[derive(Default)]
struct PartCache {
    /// Consecutive offsets, oldest first.
    recs: Mutex<VecDeque<(u64, Bytes)>>,
    /// Held by the one reader rendering new records near the end; the others wait, then find
    /// them here.
    fill: Mutex<()>,
}

impl Caches {
    pub(crate) fn new() -> Self {
        Self {
            streams: Mutex::default(),
            bytes: Arc::default(),
        }
    }

    fn of(&self, stream: &str, partitions: u32) -> Arc<StreamCache> {
        let mut map = self.streams.lock().unwrap();
        if let Some(c) = map.get(stream)
            && c.parts.len() == partitions as usize
        {
            return c.clone();
        }
        let c = Arc::new(StreamCache {
            parts: (0..partitions).map(|_| PartCache::default()).collect(),
            bytes: self.bytes.clone(),
        });
        if let Some(old) = map.insert(stream.to_string(), c.clone()) {
            let held: usize = old
                .parts
                .iter()
                .flat_map(|p| {
                    p.recs
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(_, b)| b.len())
                        .collect::<Vec<_>>()
                })
                .sum();
            self.bytes.fetch_sub(held, Ordering::Relaxed);
        }
        c
    }
}

impl StreamCache {
    /// The cached records of partition `p` from offset `from` on (consecutive; none when
    /// `from` is not cached), below `end`.
    fn take(&self, p: u32, from: u64, end: u64) -> VecDeque<(u64, Bytes)> {
        let recs = self.parts[p as usize].recs.lock().unwrap();
        let Some(&(first, _)) = recs.front() else {
            return VecDeque::new();
        };
        if from < first {
            return VecDeque::new();
        }
        recs.iter()
            .skip((from - first) as usize)
            .take_while(|(o, _)| *o < end)
            .cloned()
            .collect()
    }

    /// Keeps a rendered record (after the newest kept one; a gap starts over).
    fn insert(&self, p: u32, offset: u64, json: &Bytes) {
        let mut recs = self.parts[p as usize].recs.lock().unwrap();
        match recs.back() {
            Some(&(last, _)) if offset <= last => return,
            Some(&(last, _)) if offset != last + 1 => {
                let held: usize = recs.iter().map(|(_, b)| b.len()).sum();
                self.bytes.fetch_sub(held, Ordering::Relaxed);
                recs.clear();
            }
            _ => {}
        }
        while recs.len() >= CACHE_RECORDS
            || (!recs.is_empty() && self.bytes.load(Ordering::Relaxed) + json.len() > CACHE_BYTES)
        {
            if let Some((_, b)) = recs.pop_front() {
                self.bytes.fetch_sub(b.len(), Ordering::Relaxed);
            }
        }
        if self.bytes.load(Ordering::Relaxed) + json.len() > CACHE_BYTES {
            return; // other streams hold the budget
        }
        self.bytes.fetch_add(json.len(), Ordering::Relaxed);
        recs.push_back((offset, json.clone()));
    }
}

/// Where one partition's next records come from: shared rendered records, then its files.
struct Source<'c> {
    cached: VecDeque<(u64, Bytes)>,
    reader: Option<PartitionReader>,
    /// Held while this read renders the records near the end that others will share.
    _fill: Option<std::sync::MutexGuard<'c, ()>>,
}

enum Next {
    Json(u64, Bytes),
    Record(Box<sluice_log::Record>),
}

impl<'c> Source<'c> {
    /// The next record of the partition at `at` (below `end`), from the cache when it is
    /// there; `None` at the end.
    fn next(
        &mut self,
        cache: Option<(&'c StreamCache, u32)>,
        dir: &Path,
        at: u64,
        end: u64,
    ) -> std::io::Result<Option<Next>> {
        loop {
            if let Some((o, b)) = self.cached.pop_front() {
                return Ok(Some(Next::Json(o, b)));
            }
            if at >= end {
                return Ok(None);
            }
            if self.reader.is_none() {
                // Near the end, one reader renders and the others take what it rendered.
                if let Some((c, p)) = cache
                    && at + CACHE_RECORDS as u64 >= end
                    && self._fill.is_none()
                {
                    self._fill = Some(c.parts[p as usize].fill.lock().unwrap());
                    self.cached = c.take(p, at, end);
                    if !self.cached.is_empty() {
                        continue;
                    }
                }
                self.reader = Some(PartitionReader::from_offset(dir, at)?);
            }
            let reader = self.reader.as_mut().expect("opened above");
            return Ok(reader.next_record()?.map(|r| Next::Record(Box::new(r))));
        }
    }
}

/// Reads the partitions in rounds (a share of `limit` each per round, so one busy partition
/// does not starve the others) up to each one's durable end; JSON reads near the end share
/// rendered records through `cache`.
fn read_parts(
    stream: &str,
    parts: Vec<(u32, PathBuf, Pos, Marks)>,
    limit: usize,
    max_bytes: usize,
    raw: bool,
    cache: Option<&StreamCache>,
) -> Result<ReadBatch, ReadFail> {
    let mut records = Vec::new();
    let mut bytes = 0usize;
    let mut next = Vec::with_capacity(parts.len());
    // A time becomes the offset of the first record at or after it (or the durable end when
    // there is none yet), so that a partition the limit leaves unread still continues there.
    let mut parts = parts;
    for (_, dir, pos, m) in &mut parts {
        if let Pos::Time(t) = *pos {
            let first = PartitionReader::from_time(dir, t)?.next_record()?;
            *pos = Pos::Offset(first.map_or(m.end, |r| r.offset.min(m.end)));
        }
    }
    let mut sources = Vec::with_capacity(parts.len());
    for (p, _, pos, m) in &parts {
        let Pos::Offset(o) = pos else {
            unreachable!("resolved above")
        };
        let cached = match cache {
            Some(c) if !raw && *o < m.end => c.take(*p, *o, m.end),
            _ => VecDeque::new(),
        };
        sources.push(Source {
            cached,
            reader: None,
            _fill: None,
        });
        // Where the partition continues if nothing is read from it: its position.
        next.push((*p, *o));
    }
    let mut done = vec![false; parts.len()];
    let share = (limit / parts.len().max(1)).max(1);
    loop {
        let mut progressed = false;
        for (i, (p, dir, pos, m)) in parts.iter().enumerate() {
            if done[i] {
                continue;
            }
            let cache_here = cache.filter(|_| !raw).map(|c| (c, *p));
            let mut taken = 0;
            while taken < share && records.len() < limit && bytes < max_bytes {
                let Some(item) = sources[i].next(cache_here, dir, next[i].1, m.end)? else {
                    done[i] = true;
                    break;
                };
                let (offset, json, fields, size) = match item {
                    Next::Json(o, b) => {
                        let size = b.len();
                        (o, b, None, size)
                    }
                    Next::Record(rec) => {
                        if rec.offset >= m.end {
                            // Written, not durable yet.
                            done[i] = true;
                            break;
                        }
                        if raw {
                            let size = rec.value.len()
                                + rec.key.as_ref().map_or(0, Vec::len)
                                + rec
                                    .headers
                                    .iter()
                                    .map(|(k, v)| k.len() + v.len())
                                    .sum::<usize>();
                            (rec.offset, Bytes::new(), Some(Box::new(raw_of(&rec))), size)
                        } else {
                            let json = Bytes::from(
                                serde_json::to_vec(&render(stream, *p, &rec, true))
                                    .map_err(|e| std::io::Error::other(e.to_string()))?,
                            );
                            if let Some((c, _)) = cache_here
                                && rec.offset + CACHE_RECORDS as u64 >= m.end
                            {
                                c.insert(*p, rec.offset, &json);
                            }
                            let size = json.len();
                            (rec.offset, json, None, size)
                        }
                    }
                };
                // Offsets are contiguous: a first record past the position means retention
                // deleted the position after it was checked.
                if let Pos::Offset(o) = pos
                    && next[i].1 == *o
                    && offset > *o
                {
                    return Err(ReadFail::Gone(*p, offset));
                }
                if bytes + size > max_bytes && !records.is_empty() {
                    return Ok(ReadBatch { records, next });
                }
                bytes += size;
                records.push(ReadRecord {
                    partition: *p,
                    offset,
                    size,
                    json,
                    raw: fields,
                });
                next[i].1 = offset + 1;
                taken += 1;
                progressed = true;
            }
            // One fill lock at a time: released at the end of the partition's turn, so two
            // reads taking partitions' locks in different orders cannot wait on each other
            // (the lock only spares work; records rendered without it are the same).
            sources[i]._fill = None;
            if records.len() >= limit || bytes >= max_bytes {
                return Ok(ReadBatch { records, next });
            }
        }
        if !progressed {
            return Ok(ReadBatch { records, next });
        }
    }
}

/// A record's fields, with Sluice's own facts as headers after the event's (as the JSON shape
/// has them).
pub(crate) fn raw_of(r: &sluice_log::Record) -> RawRecord {
    let mut headers: Vec<(Bytes, Bytes)> = r
        .headers
        .iter()
        .map(|(k, v)| (Bytes::copy_from_slice(k), Bytes::copy_from_slice(v)))
        .collect();
    headers.push((
        Bytes::from_static(b"sluice-protocol"),
        Bytes::copy_from_slice(&r.protocol),
    ));
    let (name, source) = r.principal_parts();
    headers.push((
        Bytes::from_static(b"sluice-principal"),
        Bytes::copy_from_slice(name),
    ));
    if let Some(source) = source {
        headers.push((
            Bytes::from_static(b"sluice-principal-source"),
            Bytes::copy_from_slice(source),
        ));
    }
    if r.producer_timestamp_ms.is_some() {
        headers.push((
            Bytes::from_static(b"sluice-received-at"),
            Bytes::from(r.timestamp_ms.to_string()),
        ));
    }
    RawRecord {
        timestamp_ms: r.event_time_ms(),
        key: r.key.as_deref().map(Bytes::copy_from_slice),
        id: r.id.as_deref().map(Bytes::copy_from_slice),
        headers,
        value: Bytes::copy_from_slice(&r.value),
        content_type: Bytes::copy_from_slice(&r.content_type),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_consecutive_records_and_stays_bounded() {
        let caches = Caches::new();
        let c = caches.of("s", 2);
        let b = |n: usize| Bytes::from(vec![b'x'; n]);
        for o in 10..20 {
            c.insert(0, o, &b(10));
        }
        // From a cached offset: the rest, below the end; before the first or elsewhere: none.
        let got: Vec<u64> = c.take(0, 15, 18).iter().map(|(o, _)| *o).collect();
        assert_eq!(got, vec![15, 16, 17]);
        assert!(c.take(0, 9, 20).is_empty());
        assert!(c.take(1, 10, 20).is_empty());
        // Re-inserting is a no-op; a gap starts the partition's cache over.
        c.insert(0, 12, &b(10));
        assert_eq!(caches.bytes.load(Ordering::Relaxed), 100);
        c.insert(0, 30, &b(10));
        assert!(c.take(0, 19, 40).is_empty());
        assert_eq!(c.take(0, 30, 40).len(), 1);
        assert_eq!(caches.bytes.load(Ordering::Relaxed), 10);
        // At most CACHE_RECORDS per partition, oldest out first.
        for o in 31..31 + CACHE_RECORDS as u64 {
            c.insert(0, o, &b(1));
        }
        assert_eq!(c.parts[0].recs.lock().unwrap().len(), CACHE_RECORDS);
        assert!(c.take(0, 30, u64::MAX).is_empty(), "the oldest went first");
        // The bytes of all caches stay within CACHE_BYTES.
        let big = b(CACHE_BYTES / 3);
        for o in 0..10 {
            c.insert(1, o, &big);
        }
        assert!(caches.bytes.load(Ordering::Relaxed) <= CACHE_BYTES);
    }
}
