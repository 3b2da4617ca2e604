//! The claims of a gateway over Kafka, written down before their events are produced
//! (docs/exactly-once.md, "A gateway killed with events in flight").
//!
//! Over the embedded log, a gateway that restarts after a SIGKILL reads its log back and marks
//! stored the keys of events that made it there before it publishes its new boot (after which
//! other gateways take its old claims over and append their retries). Over Kafka there is no
//! log of its own to read: an event in flight at the kill may or may not be in Kafka. This
//! journal says which keys were in flight: one line per claimed batch (time, stream,
//! principal, keys), appended with one `write` before the batch is produced. A SIGKILL loses
//! nothing written (the page cache survives the process). At the next start the gateway reads
//! the journal, scans each journaled stream's topic from the oldest entry's time for records
//! with those keys, marks the ones it finds stored at their offsets, and only then publishes
//! its new boot. Keys it does not find were not stored, and are taken over as before.
//!
//! Bounded: a segment is closed every [`SEGMENT`], and segments older than [`KEEP`] (the claim
//! lifetime and a segment) are deleted: a claim older than that has expired anyway.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How long a segment is written to.
const SEGMENT: Duration = Duration::from_secs(10);
/// How long a segment is kept: the longest a claim lives (`PENDING_TTL_MS`) plus a segment.
pub(crate) const KEEP: Duration = Duration::from_secs(70);

/// One key claimed by an earlier boot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub stream: String,
    pub principal: Vec<u8>,
    pub kind: u8,
    pub bytes: Vec<u8>,
}

/// What earlier boots left: their keys, and the earliest time their records can carry.
#[derive(Debug, Default, Clone)]
pub struct Earlier {
    pub keys: HashSet<Entry>,
    /// Per stream, the earliest record timestamp of its journaled keys (ms since the epoch).
    pub from_ms: std::collections::HashMap<String, i64>,
    files: Vec<PathBuf>,
}

impl Earlier {
    /// Deletes the earlier boots' segments, once their keys are reconciled.
    pub fn forget(self) {
        for f in self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

pub struct Journal {
    dir: PathBuf,
    boot: String,
    state: Mutex<State>,
}

struct State {
    file: Option<(File, std::time::Instant)>,
    seq: u64,
    /// Segments of this boot, oldest first, with when each was closed.
    closed: std::collections::VecDeque<(PathBuf, std::time::Instant)>,
    /// A failed write is logged once, not per batch.
    failing: bool,
}

/// Appends `b` to `out` in lowercase hex (a table, not `format!`: this runs per key).
fn hex_into(out: &mut Vec<u8>, b: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(b.len() * 2);
    for x in b {
        out.push(DIGITS[(x >> 4) as usize]);
        out.push(DIGITS[(x & 15) as usize]);
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Journal {
    /// The journal in `data_dir/dedup-journal` for this boot, and what earlier boots left
    /// there (entries older than [`KEEP`] are skipped).
    pub fn open(data_dir: &Path, boot: &str, now_ms: i64) -> std::io::Result<(Self, Earlier)> {
        let dir = data_dir.join("dedup-journal");
        std::fs::create_dir_all(&dir)?;
        let mut earlier = Earlier::default();
        let oldest = now_ms - KEEP.as_millis() as i64;
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            let text = std::fs::read(&path)?;
            // Whole lines only: a batch's line is one `write`, so a cut one (a machine crash,
            // not a killed process) was not followed by its produce.
            let whole = text
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(&text[..0], |i| &text[..i]);
            for line in whole.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(line) = std::str::from_utf8(line) else {
                    continue;
                };
                let mut parts = line.split('\t');
                let (Some(ts), Some(stream), Some(principal)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                let (Ok(ts), Some(principal)) = (ts.parse::<i64>(), unhex(principal)) else {
                    continue;
                };
                let Some(claimed) = parts.next().and_then(|c| c.parse::<i64>().ok()) else {
                    continue;
                };
                if claimed < oldest {
                    continue;
                }
                for k in parts {
                    let Some((&kind, rest)) = k.as_bytes().split_first() else {
                        continue;
                    };
                    let Some(bytes) = std::str::from_utf8(rest).ok().and_then(unhex) else {
                        continue;
                    };
                    earlier.keys.insert(Entry {
                        stream: stream.to_string(),
                        principal: principal.clone(),
                        kind,
                        bytes,
                    });
                    let from = earlier.from_ms.entry(stream.to_string()).or_insert(ts);
                    *from = (*from).min(ts);
                }
            }
            earlier.files.push(path);
        }
        Ok((
            Self {
                dir,
                boot: boot.to_string(),
                state: Mutex::new(State {
                    file: None,
                    seq: 0,
                    closed: Default::default(),
                    failing: false,
                }),
            },
            earlier,
        ))
    }

    /// Writes down the keys a batch of `stream` from `principal` claimed, before it is
    /// produced. `from_ms`: the earliest timestamp its records can carry (the oldest producer
    /// timestamp, else now); `now_ms`: the claim's time.
    pub fn record<'a>(
        &self,
        from_ms: i64,
        now_ms: i64,
        stream: &str,
        principal: &[u8],
        keys: impl Iterator<Item = (u8, &'a [u8])>,
    ) {
        let mut line = Vec::with_capacity(128);
        line.extend_from_slice(format!("{from_ms}\t{stream}\t").as_bytes());
        hex_into(&mut line, principal);
        line.extend_from_slice(format!("\t{now_ms}").as_bytes());
        let mut any = false;
        for (kind, bytes) in keys {
            line.push(b'\t');
            line.push(kind);
            hex_into(&mut line, bytes);
            any = true;
        }
        if !any {
            return;
        }
        line.push(b'\n');
        let mut st = self.state.lock().unwrap();
        let result = self.write(&mut st, &line);
        match result {
            Ok(()) => st.failing = false,
            Err(e) if !st.failing => {
                st.failing = true;
                tracing::warn!(error = %e, dir = %self.dir.display(), "could not write the dedup journal; an event in flight at a crash may then be stored twice");
            }
            Err(_) => {}
        }
    }

    fn write(&self, st: &mut State, line: &[u8]) -> std::io::Result<()> {
        let now = std::time::Instant::now();
        if st.file.as_ref().is_none_or(|(_, at)| now - *at >= SEGMENT) {
            if st.file.take().is_some() {
                let old = self.path(st.seq);
                st.closed.push_back((old, now));
                st.seq += 1;
            }
            while let Some((p, at)) = st.closed.front() {
                if now - *at < KEEP {
                    break;
                }
                let _ = std::fs::remove_file(p);
                st.closed.pop_front();
            }
            st.file = Some((File::create(self.path(st.seq))?, now));
        }
        let (f, _) = st.file.as_mut().expect("opened above");
        f.write_all(line)
    }

    /// Deletes this boot's segments: every claim it made is settled (a clean stop), so the
    /// next start has nothing to look up.
    pub fn clear(&self) {
        let mut st = self.state.lock().unwrap();
        st.file = None;
        for (p, _) in st.closed.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(self.path(st.seq));
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{}-{seq}.log", self.boot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_boot_writes_the_next_one_reads_and_old_or_cut_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_000_000_000;
        let (j, earlier) = Journal::open(dir.path(), "boot1", now).unwrap();
        assert!(earlier.keys.is_empty());
        j.record(
            now - 5,
            now,
            "orders",
            b"api_key\x1fshop",
            [(b'i', &b"e-1\t\n"[..]), (b'k', &b"req#0"[..])].into_iter(),
        );
        j.record(now - 9, now, "logs", b"p", [(b'i', &b"x"[..])].into_iter());
        j.record(now, now, "empty", b"p", std::iter::empty());
        // An entry from longer ago than a claim lives, and a line cut by a kill.
        j.record(
            now - 100_000,
            now - KEEP.as_millis() as i64 - 1,
            "old",
            b"p",
            [(b'i', &b"o"[..])].into_iter(),
        );
        let cut = dir.path().join("dedup-journal/boot1-99.log");
        std::fs::write(&cut, format!("{now}\torders\t70\t{now}\ti36")).unwrap();
        let (_, earlier) = Journal::open(dir.path(), "boot2", now).unwrap();
        let mut keys: Vec<_> = earlier.keys.iter().cloned().collect();
        keys.sort_by(|a, b| a.bytes.cmp(&b.bytes));
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(earlier.keys.contains(&Entry {
            stream: "orders".into(),
            principal: b"api_key\x1fshop".to_vec(),
            kind: b'i',
            bytes: b"e-1\t\n".to_vec(),
        }));
        assert_eq!(earlier.from_ms["orders"], now - 5);
        assert_eq!(earlier.from_ms["logs"], now - 9);
        assert!(!earlier.from_ms.contains_key("old"));
        earlier.forget();
        let (_, again) = Journal::open(dir.path(), "boot3", now).unwrap();
        assert!(again.keys.is_empty(), "forgotten once reconciled");
    }
}
