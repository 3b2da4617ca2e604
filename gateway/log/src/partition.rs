//! One partition's writer side: the active segment, group appends with one write and at most one
//! fsync, roll-over, recovery on open and retention. Everything here is blocking file I/O; the
//! async group-commit loop in `log.rs` drives it from a blocking thread.
//!
//! Crash safety, step by step:
//! - append: frames are written at the end of the active segment; an ack waits for `fdatasync`.
//!   A crash leaves at most a torn tail, which `open` truncates.
//! - roll: the old segment and its indexes are fsynced, then the new segment file is created and
//!   the directory fsynced, before anything in the new segment can be acked.
//! - retention: a segment's `.log` is deleted first, then its indexes, then the directory is
//!   fsynced; index files left without a `.log` by a crash are removed on open.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::LogError;
use crate::frame::Frame;
use crate::segment::{self, Indexer, list_segments, segment_path};

/// Settings of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOptions {
    pub segment_bytes: u64,
    /// Roll a segment whose first frame is older than this (0 = never by age).
    pub segment_ms: u64,
    pub index_interval_bytes: u64,
    /// Delete sealed segments whose newest frame is older than this (0 = keep).
    pub retention_ms: u64,
    /// Delete the oldest sealed segments while the partition is larger than this (0 = no limit).
    pub retention_bytes: u64,
    /// Test-only fault injection: the partition's fsyncs fail (EIO) from the Nth on (0 = never).
    pub fault_fsync_fail_after: u64,
}

impl Default for PartitionOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 128 << 20,
            segment_ms: 0,
            index_interval_bytes: 4096,
            retention_ms: 0,
            retention_bytes: 0,
            fault_fsync_fail_after: 0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Sealed {
    base: u64,
    size: u64,
    max_ts: i64,
}

struct Active {
    base: u64,
    log: File,
    index: File,
    timeindex: File,
    size: u64,
    first_ts: Option<i64>,
    indexer: Indexer,
}

/// What `open` found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut from the end of the active segment (a torn or corrupt tail).
    pub truncated_bytes: u64,
    /// Why the tail was cut.
    pub reason: Option<String>,
    /// Sealed segments whose missing or invalid indexes were rebuilt.
    pub rebuilt_indexes: usize,
}

/// The writer of one partition directory. Only one exists per directory (the data directory is
/// locked by the process).
pub struct PartitionWriter {
    dir: PathBuf,
    opts: PartitionOptions,
    sealed: VecDeque<Sealed>,
    active: Active,
    next_offset: u64,
    poisoned: Option<String>,
    /// fsyncs so far (for `fault_fsync_fail_after`).
    fsyncs: u64,
    write_buf: Vec<u8>,
    offsets_buf: Vec<u8>,
    times_buf: Vec<u8>,
}

impl PartitionWriter {
    /// Opens (creating if needed) the partition in `dir`, recovering the active segment.
    pub fn open(dir: &Path, opts: PartitionOptions) -> io::Result<(Self, Recovery)> {
        fs::create_dir_all(dir)?;
        remove_orphan_indexes(dir)?;
        let mut recovery = Recovery::default();
        let bases = list_segments(dir)?;
        let mut sealed = VecDeque::new();
        let active;
        let next_offset;
        match bases.split_last() {
            None => {
                active = create_segment(dir, 0, opts.index_interval_bytes)?;
                next_offset = 0;
            }
            Some((&last, older)) => {
                for &base in older {
                    let (s, rebuilt) = open_sealed(dir, base, opts.index_interval_bytes)?;
                    recovery.rebuilt_indexes += usize::from(rebuilt);
                    sealed.push_back(s);
                }
                let (a, next, truncated, reason) =
                    recover_active(dir, last, opts.index_interval_bytes)?;
                recovery.truncated_bytes = truncated;
                recovery.reason = reason;
                active = a;
                next_offset = next;
            }
        }
        Ok((
            Self {
                dir: dir.to_path_buf(),
                opts,
                sealed,
                active,
                next_offset,
                poisoned: None,
                fsyncs: 0,
                write_buf: Vec::new(),
                offsets_buf: Vec::new(),
                times_buf: Vec::new(),
            },
            recovery,
        ))
    }

    /// Offset the next record will get.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Oldest offset still on disk.
    pub fn start_offset(&self) -> u64 {
        self.sealed.front().map_or(self.active.base, |s| s.base)
    }

    /// Number of segment files, active included.
    pub fn segment_count(&self) -> usize {
        self.sealed.len() + 1
    }

    /// Bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.sealed.iter().map(|s| s.size).sum::<u64>() + self.active.size
    }

    /// Why this partition refuses writes, after an I/O error it cannot safely recover from.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Writes `frames` in order with one write, assigning consecutive offsets, and fsyncs when
    /// `durable`. Returns each frame's base offset. On error nothing of the group is kept.
    pub fn append(
        &mut self,
        frames: &mut [&mut Frame],
        durable: bool,
        now_ms: i64,
    ) -> Result<Vec<u64>, LogError> {
        if let Some(p) = &self.poisoned {
            return Err(LogError::Poisoned(p.clone()));
        }
        let total: u64 = frames.iter().map(|f| f.len() as u64).sum();
        self.maybe_roll(total, now_ms)?;

        let saved_indexer = self.active.indexer;
        self.write_buf.clear();
        self.offsets_buf.clear();
        self.times_buf.clear();
        let mut bases = Vec::with_capacity(frames.len());
        let mut pos = self.active.size;
        let mut next = self.next_offset;
        for f in frames.iter_mut() {
            f.seal(next);
            bases.push(next);
            self.active.indexer.observe(
                pos,
                (next - self.active.base) as u32,
                f.timestamp_ms(),
                &mut self.offsets_buf,
                &mut self.times_buf,
            );
            pos += f.len() as u64;
            next += u64::from(f.count());
        }
        let result = if let [only] = frames {
            self.active
                .log
                .write_all_at(only.as_bytes(), self.active.size)
        } else {
            for f in frames.iter() {
                self.write_buf.extend_from_slice(f.as_bytes());
            }
            self.active
                .log
                .write_all_at(&self.write_buf, self.active.size)
        };
        if let Err(e) = result {
            self.active.indexer = saved_indexer;
            if let Err(e2) = self.active.log.set_len(self.active.size) {
                self.poison(format!("write failed ({e}) and could not be undone ({e2})"));
            }
            return Err(e.into());
        }
        if self.active.first_ts.is_none() {
            self.active.first_ts = frames.first().map(|f| f.timestamp_ms());
        }
        self.active.size = pos;
        self.next_offset = next;
        if let Err(e) = self
            .active
            .index
            .write_all(&self.offsets_buf)
            .and_then(|()| self.active.timeindex.write_all(&self.times_buf))
        {
            self.poison(format!("index write failed: {e}"));
            return Err(e.into());
        }
        if durable {
            self.sync()?;
        }
        Ok(bases)
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> Result<(), LogError> {
        if let Some(p) = &self.poisoned {
            return Err(LogError::Poisoned(p.clone()));
        }
        // After a failed fsync the page cache can no longer be trusted to hold what was written
        // (the kernel may have dropped the dirty pages), so the partition stops taking writes.
        self.fsyncs += 1;
        let injected =
            self.opts.fault_fsync_fail_after > 0 && self.fsyncs >= self.opts.fault_fsync_fail_after;
        let synced = if injected {
            Err(io::Error::from_raw_os_error(5)) // EIO, as a failing disk reports it
        } else {
            self.active.log.sync_data()
        };
        if let Err(e) = synced {
            self.poison(format!("fsync failed: {e}"));
            return Err(e.into());
        }
        Ok(())
    }

    fn poison(&mut self, why: String) {
        tracing::error!(dir = %self.dir.display(), %why, "partition stops accepting writes until restart");
        self.poisoned = Some(why);
    }

    fn maybe_roll(&mut self, incoming: u64, now_ms: i64) -> Result<(), LogError> {
        let a = &self.active;
        if a.size == 0 {
            return Ok(());
        }
        let full = a.size + incoming > self.opts.segment_bytes;
        let old = self.opts.segment_ms > 0
            && a.first_ts
                .is_some_and(|t| now_ms.saturating_sub(t) >= self.opts.segment_ms as i64);
        if full || old {
            self.roll()
                .inspect_err(|e| self.poison(format!("segment roll failed: {e}")))?;
        }
        Ok(())
    }

    /// Seals the active segment and starts a new one at the next offset.
    pub fn roll(&mut self) -> Result<(), LogError> {
        let mut times = Vec::new();
        self.active.indexer.seal(&mut times);
        self.active.timeindex.write_all(&times)?;
        self.active.log.sync_data()?;
        self.active.index.sync_data()?;
        self.active.timeindex.sync_data()?;
        let new = create_segment(&self.dir, self.next_offset, self.opts.index_interval_bytes)?;
        let old = std::mem::replace(&mut self.active, new);
        self.sealed.push_back(Sealed {
            base: old.base,
            size: old.size,
            max_ts: old.indexer.max_ts,
        });
        Ok(())
    }

    /// Deletes sealed segments past the retention limits; returns how many were deleted.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<usize, LogError> {
        let (retention_ms, retention_bytes) = (self.opts.retention_ms, self.opts.retention_bytes);
        self.delete_oldest_while(|w, oldest, _| {
            let expired =
                retention_ms > 0 && oldest.max_ts < now_ms.saturating_sub(retention_ms as i64);
            let oversize = retention_bytes > 0 && w.size_bytes() > retention_bytes;
            expired || oversize
        })
    }

    /// Deletes the sealed segments all of whose records are below `offset` (a spool deletes
    /// what Kafka has acknowledged); returns how many were deleted.
    pub fn delete_below(&mut self, offset: u64) -> Result<usize, LogError> {
        self.delete_oldest_while(|_, _, next_base| next_base <= offset)
    }

    /// Deletes the oldest sealed segment while `f(self, oldest, base of the next segment)`.
    fn delete_oldest_while(
        &mut self,
        f: impl Fn(&Self, Sealed, u64) -> bool,
    ) -> Result<usize, LogError> {
        let mut deleted = 0;
        while let Some(oldest) = self.sealed.front().copied() {
            let next_base = self.sealed.get(1).map_or(self.active.base, |s| s.base);
            if !f(self, oldest, next_base) {
                break;
            }
            fs::remove_file(segment_path(&self.dir, oldest.base, "log"))?;
            for ext in ["index", "timeindex"] {
                remove_if_exists(&segment_path(&self.dir, oldest.base, ext))?;
            }
            self.sealed.pop_front();
            deleted += 1;
        }
        if deleted > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(deleted)
    }
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes index files whose `.log` is gone (a crash in the middle of retention).
fn remove_orphan_indexes(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("index" | "timeindex")) && !path.with_extension("log").exists() {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Fsyncs a directory so that entries created or removed in it survive power loss.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn create_segment(dir: &Path, base: u64, interval: u64) -> io::Result<Active> {
    let log = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(segment_path(dir, base, "log"))?;
    let index = open_append(&segment_path(dir, base, "index"))?;
    index.set_len(0)?;
    let timeindex = open_append(&segment_path(dir, base, "timeindex"))?;
    timeindex.set_len(0)?;
    sync_dir(dir)?;
    Ok(Active {
        base,
        log,
        index,
        timeindex,
        size: 0,
        first_ts: None,
        indexer: Indexer::new(interval),
    })
}

/// Loads a sealed segment's size and max timestamp, rebuilding its indexes if they are missing
/// or malformed. Returns whether it rebuilt them.
fn open_sealed(dir: &Path, base: u64, interval: u64) -> io::Result<(Sealed, bool)> {
    let log_path = segment_path(dir, base, "log");
    let size = fs::metadata(&log_path)?.len();
    let offsets = fs::read(segment_path(dir, base, "index")).ok();
    let times = fs::read(segment_path(dir, base, "timeindex")).ok();
    let valid = |o: &Vec<(u32, u32)>| o.last().is_none_or(|&(_, pos)| u64::from(pos) < size);
    if let (Some(o), Some(t)) = (
        offsets.as_deref().and_then(segment::parse_offset_index),
        times.as_deref().and_then(segment::parse_time_index),
    ) && valid(&o)
        && (size == 0 || (!o.is_empty() && !t.is_empty()))
    {
        let max_ts = t.last().map_or(i64::MIN, |e| e.0);
        return Ok((Sealed { base, size, max_ts }, false));
    }
    let mut s = segment::scan(&log_path, base, interval)?;
    if let Some(why) = &s.stopped {
        // A sealed segment was fsynced before the next one was created; damage here is not a
        // torn write but media corruption. Keep what is readable and say so loudly.
        tracing::error!(segment = %log_path.display(), %why, "sealed segment is damaged; reads stop at the damage");
    }
    s.indexer.seal(&mut s.times);
    write_index(&segment_path(dir, base, "index"), &s.offsets)?;
    write_index(&segment_path(dir, base, "timeindex"), &s.times)?;
    Ok((
        Sealed {
            base,
            size,
            max_ts: s.indexer.max_ts,
        },
        true,
    ))
}

fn write_index(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_data()
}

/// Scans the active segment, cuts a torn or corrupt tail, and rewrites its indexes.
fn recover_active(
    dir: &Path,
    base: u64,
    interval: u64,
) -> io::Result<(Active, u64, u64, Option<String>)> {
    let log_path = segment_path(dir, base, "log");
    let s = segment::scan(&log_path, base, interval)?;
    let log = OpenOptions::new().read(true).write(true).open(&log_path)?;
    let truncated = s.file_len - s.valid_len;
    if truncated > 0 {
        tracing::warn!(
            segment = %log_path.display(),
            kept_bytes = s.valid_len,
            truncated_bytes = truncated,
            reason = s.stopped.as_deref().unwrap_or(""),
            "recovery truncated the log tail"
        );
        log.set_len(s.valid_len)?;
        log.sync_all()?;
    }
    let index = open_append(&segment_path(dir, base, "index"))?;
    index.set_len(0)?;
    (&index).write_all(&s.offsets)?;
    let timeindex = open_append(&segment_path(dir, base, "timeindex"))?;
    timeindex.set_len(0)?;
    (&timeindex).write_all(&s.times)?;
    Ok((
        Active {
            base,
            log,
            index,
            timeindex,
            size: s.valid_len,
            first_ts: s.first_ts,
            indexer: s.indexer,
        },
        s.next_offset,
        truncated,
        s.stopped.filter(|_| truncated > 0),
    ))
}

/// Recovers a partition whose only segment holds `bytes` (in a scratch directory under `dir`),
/// then reads every record back, checking what recovery promises: the segment is cut to a
/// prefix of whole valid frames, the records read are exactly offsets `0..next_offset`, and a
/// second recovery finds nothing left to cut. The number of records, or the broken promise.
/// Used by the fuzz target (`gateway/log/fuzz`, `segment_recovery`) and its corpus replay.
pub fn check_recovery(dir: &Path, bytes: &[u8]) -> Result<u64, String> {
    fn err(what: &'static str) -> impl Fn(io::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(err("creating the directory"))?;
    fs::write(segment_path(dir, 0, "log"), bytes).map_err(err("writing the segment"))?;
    let (writer, recovery) =
        PartitionWriter::open(dir, PartitionOptions::default()).map_err(err("recovery"))?;
    let next = writer.next_offset();
    let kept = fs::metadata(segment_path(dir, 0, "log"))
        .map_err(err("stat"))?
        .len();
    if kept + recovery.truncated_bytes != bytes.len() as u64 {
        return Err(format!(
            "kept {kept} + truncated {} != {} bytes",
            recovery.truncated_bytes,
            bytes.len()
        ));
    }
    if bytes[..kept as usize] != *fs::read(segment_path(dir, 0, "log")).map_err(err("read"))? {
        return Err("recovery changed the bytes it kept".into());
    }
    drop(writer);
    let mut reader =
        crate::reader::PartitionReader::from_offset(dir, 0).map_err(err("opening a reader"))?;
    let mut expected = 0;
    while let Some(r) = reader.next_record().map_err(err("reading"))? {
        if r.offset != expected {
            return Err(format!(
                "read offset {} where {expected} was expected",
                r.offset
            ));
        }
        expected += 1;
    }
    if expected != next {
        return Err(format!("read {expected} records, recovery said {next}"));
    }
    let (_, again) =
        PartitionWriter::open(dir, PartitionOptions::default()).map_err(err("second recovery"))?;
    if again.truncated_bytes != 0 {
        return Err(format!(
            "a second recovery cut {} more bytes",
            again.truncated_bytes
        ));
    }
    let _ = fs::remove_dir_all(dir);
    Ok(next)
}

#[cfg(test)]
mod fuzz_corpus {
    use super::*;
    use crate::frame::FrameBuilder;

    fn corpus() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/segment_recovery")
    }

    fn frame(base: u64, values: &[&[u8]]) -> Vec<u8> {
        let mut b = FrameBuilder::new(1_700_000_000_000, b"application/json", b"http", b"p", 0);
        for v in values {
            b.push(Some(b"k"), None, [(&b"h"[..], &b"v"[..])].into_iter(), v);
        }
        let mut f = b.finish();
        f.seal(base);
        f.as_bytes().to_vec()
    }

    /// Writes the seed corpus of the `segment_recovery` fuzz target (run with `--ignored` after a
    /// change of the frame format).
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let dir = corpus();
        fs::create_dir_all(&dir).unwrap();
        let one = frame(0, &[b"1", b"{\"a\":2}", b""]);
        let two = [one.clone(), frame(3, &[b"x"])].concat();
        let mut flipped = two.clone();
        let at = one.len() + 30;
        flipped[at] ^= 0x40;
        let gap = [one.clone(), frame(10, &[b"y"])].concat();
        let seeds: [(&str, Vec<u8>); 7] = [
            ("ok-one-frame", one.clone()),
            ("ok-two-frames", two.clone()),
            ("bad-torn-tail", two[..two.len() - 7].to_vec()),
            ("bad-bit-flip-in-second-frame", flipped),
            ("bad-offset-gap", gap),
            ("bad-short-header", two[..5].to_vec()),
            (
                "bad-garbage",
                b"not a log segment at all, just bytes".to_vec(),
            ),
        ];
        for (name, bytes) in seeds {
            fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// Replays the seed corpus in CI: every seed recovers to a readable prefix; `ok-*` seeds
    /// keep records and cut nothing, `bad-*` seeds are cut to their valid prefix.
    #[test]
    fn replays() {
        let scratch = std::env::temp_dir().join(format!("sluice-recovery-{}", std::process::id()));
        let mut seen = 0;
        for entry in fs::read_dir(corpus()).expect("the seed corpus exists") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = fs::read(&path).unwrap();
            let n = check_recovery(&scratch, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            if name.starts_with("ok-") {
                assert!(n >= 1, "{name}: no records");
            }
            seen += 1;
        }
        assert!(seen >= 7, "only {seen} seeds");
        let _ = fs::remove_dir_all(&scratch);
    }
}
