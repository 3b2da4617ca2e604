//! The read side of the embedded log (docs/consume.md): records of a stream by offset, time or
//! cursor, only what is durable, with a long poll at the end.

use std::path::PathBuf;
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
    principal: &Principal,
    req: ReadRequest,
) -> Result<ReadBatch, ReadError> {
    let name = req.stream.as_str();
    if !principal.may_consume(name) {
        return Err(ReadError::Forbidden(name.to_string()));
    }
    let log = match sink {
        Sink::Embedded(log) => log,
        Sink::Kafka(kafka) => return kafka.read(req).await,
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
        let ReadBatch { records, next } = tokio::task::spawn_blocking(move || {
            read_parts(&stream_name, job, limit, max_bytes, raw)
        })
        .await
        .map_err(|e| Rejection::Internal {
            message: format!("read task failed: {e}"),
        })?
        .map_err(|e| match e {
            ReadFail::Gone(partition, earliest) => ReadError::Gone {
                partition,
                earliest,
            },
            ReadFail::Io(e) => ReadError::Rejected(Rejection::Internal {
                message: format!("reading the log: {e}"),
            }),
        })?;
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
        Sink::Kafka(k) => k
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

/// Reads the partitions in rounds (a share of `limit` each per round, so one busy partition
/// does not starve the others) up to each one's durable end.
fn read_parts(
    stream: &str,
    parts: Vec<(u32, PathBuf, Pos, Marks)>,
    limit: usize,
    max_bytes: usize,
    raw: bool,
) -> Result<ReadBatch, ReadFail> {
    let mut records = Vec::new();
    let mut bytes = 0usize;
    let mut readers = Vec::with_capacity(parts.len());
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
    for (p, dir, pos, m) in &parts {
        let reader = match pos {
            Pos::Offset(o) if *o >= m.end => None,
            Pos::Offset(o) => Some(PartitionReader::from_offset(dir, *o)?),
            Pos::Time(_) => unreachable!("resolved above"),
        };
        readers.push(reader);
        // Where the partition continues if nothing is read from it: its position.
        let Pos::Offset(o) = pos else {
            unreachable!("resolved above")
        };
        next.push((*p, *o));
    }
    let share = (limit / parts.len().max(1)).max(1);
    loop {
        let mut progressed = false;
        for (i, (p, _, pos, m)) in parts.iter().enumerate() {
            let Some(reader) = readers[i].as_mut() else {
                continue;
            };
            let mut taken = 0;
            while taken < share && records.len() < limit && bytes < max_bytes {
                let Some(rec) = reader.next_record()? else {
                    readers[i] = None;
                    break;
                };
                if rec.offset >= m.end {
                    // Written, not durable yet.
                    readers[i] = None;
                    break;
                }
                // Offsets are contiguous: a first record past the position means retention
                // deleted the position after it was checked.
                if let Pos::Offset(o) = pos
                    && next[i].1 == *o
                    && rec.offset > *o
                {
                    return Err(ReadFail::Gone(*p, rec.offset));
                }
                let (json, fields, size) = if raw {
                    let size = rec.value.len()
                        + rec.key.as_ref().map_or(0, Vec::len)
                        + rec
                            .headers
                            .iter()
                            .map(|(k, v)| k.len() + v.len())
                            .sum::<usize>();
                    (Bytes::new(), Some(Box::new(raw_of(&rec))), size)
                } else {
                    let json = serde_json::to_vec(&render(stream, *p, &rec, true))
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    let size = json.len();
                    (Bytes::from(json), None, size)
                };
                if bytes + size > max_bytes && !records.is_empty() {
                    return Ok(ReadBatch { records, next });
                }
                bytes += size;
                records.push(ReadRecord {
                    partition: *p,
                    offset: rec.offset,
                    size,
                    json,
                    raw: fields,
                });
                next[i].1 = rec.offset + 1;
                taken += 1;
                progressed = true;
            }
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
    match r.principal.iter().position(|&b| b == 0x1f) {
        Some(at) => {
            headers.push((
                Bytes::from_static(b"sluice-principal"),
                Bytes::copy_from_slice(&r.principal[at + 1..]),
            ));
            headers.push((
                Bytes::from_static(b"sluice-principal-source"),
                Bytes::copy_from_slice(&r.principal[..at]),
            ));
        }
        None => headers.push((
            Bytes::from_static(b"sluice-principal"),
            Bytes::copy_from_slice(&r.principal),
        )),
    }
    RawRecord {
        timestamp_ms: r.timestamp_ms,
        key: r.key.as_deref().map(Bytes::copy_from_slice),
        id: r.id.as_deref().map(Bytes::copy_from_slice),
        headers,
        value: Bytes::copy_from_slice(&r.value),
        content_type: Bytes::copy_from_slice(&r.content_type),
    }
}
