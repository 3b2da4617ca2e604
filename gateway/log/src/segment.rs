//! Segment files and their indexes: naming, scanning (which is also recovery), index entries.
//!
//! A partition directory holds, per segment, `{base:020}.log` (frames), `{base:020}.index`
//! (8-byte entries: relative offset u32, file position u32) and `{base:020}.timeindex` (12-byte
//! entries: max timestamp so far i64, relative offset u32), one entry per `index_interval_bytes`
//! of log. Indexes are derived data: the active segment's are rebuilt from its log on every open.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::frame::{FrameView, HEADER_LEN, Header};

pub(crate) const OFFSET_ENTRY: usize = 8;
pub(crate) const TIME_ENTRY: usize = 12;

/// Path of a segment file with the given extension (`log`, `index`, `timeindex`).
pub fn segment_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

/// Base offsets of the `.log` files in `dir`, ascending.
pub fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name.strip_suffix(".log")
            && stem.len() == 20
            && let Ok(base) = stem.parse::<u64>()
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Decides where index entries go; shared by the writer and by rebuilds so both agree.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Indexer {
    interval: u64,
    last_pos: Option<u64>,
    pub(crate) max_ts: i64,
    last_time_ts: i64,
    last_frame_rel: u32,
}

impl Indexer {
    pub(crate) fn new(interval: u64) -> Self {
        Self {
            interval,
            last_pos: None,
            max_ts: i64::MIN,
            last_time_ts: i64::MIN,
            last_frame_rel: 0,
        }
    }

    /// Notes a frame at `pos` whose first record has relative offset `rel`.
    pub(crate) fn observe(
        &mut self,
        pos: u64,
        rel: u32,
        ts: i64,
        offsets: &mut Vec<u8>,
        times: &mut Vec<u8>,
    ) {
        self.max_ts = self.max_ts.max(ts);
        self.last_frame_rel = rel;
        if self.last_pos.is_none_or(|l| pos - l >= self.interval) {
            self.last_pos = Some(pos);
            offsets.extend_from_slice(&rel.to_le_bytes());
            offsets.extend_from_slice(&(pos as u32).to_le_bytes());
            self.push_time(times);
        }
    }

    /// The closing time entry of a sealed segment, so its last entry holds its max timestamp.
    pub(crate) fn seal(&mut self, times: &mut Vec<u8>) {
        if self.last_pos.is_some() {
            self.push_time(times);
        }
    }

    fn push_time(&mut self, times: &mut Vec<u8>) {
        if self.max_ts > self.last_time_ts {
            self.last_time_ts = self.max_ts;
            times.extend_from_slice(&self.max_ts.to_le_bytes());
            times.extend_from_slice(&self.last_frame_rel.to_le_bytes());
        }
    }
}

/// What a scan of one segment found.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Bytes of whole, valid frames from the start.
    pub valid_len: u64,
    /// Length of the file.
    pub file_len: u64,
    /// Offset after the last valid record.
    pub next_offset: u64,
    pub first_ts: Option<i64>,
    pub indexer: Indexer,
    pub offsets: Vec<u8>,
    pub times: Vec<u8>,
    /// Why the scan stopped before the end of the file, if it did.
    pub stopped: Option<String>,
}

/// Reads a segment from the start, checking every frame's checksum, structure and offset, and
/// rebuilds its index entries. Stops at the first frame that is torn, corrupt or out of sequence.
pub(crate) fn scan(path: &Path, base: u64, interval: u64) -> io::Result<Scan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut s = Scan {
        valid_len: 0,
        file_len,
        next_offset: base,
        first_ts: None,
        indexer: Indexer::new(interval),
        offsets: Vec::new(),
        times: Vec::new(),
        stopped: None,
    };
    let mut buf = vec![0u8; HEADER_LEN];
    while s.valid_len < file_len {
        let remaining = file_len - s.valid_len;
        if remaining < HEADER_LEN as u64 {
            s.stopped = Some(format!(
                "{remaining} trailing bytes, shorter than a frame header"
            ));
            break;
        }
        buf.resize(HEADER_LEN, 0);
        r.read_exact(&mut buf)?;
        let h = match Header::parse(&buf) {
            Ok(h) => h,
            Err(e) => {
                s.stopped = Some(e.to_string());
                break;
            }
        };
        if (h.frame_len() as u64) > remaining {
            s.stopped = Some(format!(
                "torn frame: {} bytes announced, {remaining} present",
                h.frame_len()
            ));
            break;
        }
        buf.resize(h.frame_len(), 0);
        r.read_exact(&mut buf[HEADER_LEN..])?;
        let v = match FrameView::decode(&buf) {
            Ok(v) => v,
            Err(e) => {
                s.stopped = Some(e.to_string());
                break;
            }
        };
        if v.base_offset != s.next_offset {
            s.stopped = Some(format!(
                "frame has base offset {} where {} was expected",
                v.base_offset, s.next_offset
            ));
            break;
        }
        s.first_ts.get_or_insert(v.timestamp_ms);
        s.indexer.observe(
            s.valid_len,
            (v.base_offset - base) as u32,
            v.timestamp_ms,
            &mut s.offsets,
            &mut s.times,
        );
        s.next_offset = v.next_offset();
        s.valid_len += h.frame_len() as u64;
    }
    Ok(s)
}

/// Parses offset-index bytes into (relative offset, position) pairs, if they are well formed.
pub(crate) fn parse_offset_index(b: &[u8]) -> Option<Vec<(u32, u32)>> {
    if !b.len().is_multiple_of(OFFSET_ENTRY) {
        return None;
    }
    let v: Vec<(u32, u32)> = b
        .chunks_exact(OFFSET_ENTRY)
        .map(|c| {
            (
                u32::from_le_bytes(c[0..4].try_into().unwrap()),
                u32::from_le_bytes(c[4..8].try_into().unwrap()),
            )
        })
        .collect();
    let monotone = v.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
    monotone.then_some(v)
}

/// Parses time-index bytes into (max timestamp, relative offset) pairs, if well formed.
pub(crate) fn parse_time_index(b: &[u8]) -> Option<Vec<(i64, u32)>> {
    if !b.len().is_multiple_of(TIME_ENTRY) {
        return None;
    }
    let v: Vec<(i64, u32)> = b
        .chunks_exact(TIME_ENTRY)
        .map(|c| {
            (
                i64::from_le_bytes(c[0..8].try_into().unwrap()),
                u32::from_le_bytes(c[8..12].try_into().unwrap()),
            )
        })
        .collect();
    let monotone = v.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
    monotone.then_some(v)
}
