//! Reading a partition from its files, independently of (and concurrently with) the writer.
//! A reader stops at the first frame that is not complete and valid, which in the active segment
//! is simply data still being written; [`PartitionReader::next_record`] returns `None` there and can be
//! called again later to follow new appends.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::frame::{FrameView, HEADER_LEN, Header};
use crate::segment::{list_segments, parse_offset_index, parse_time_index, segment_path};

/// One record, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    /// When the gateway received the record (its frame's time; what the time index holds).
    pub timestamp_ms: i64,
    /// The producer's own time of the event, when it gave one.
    pub producer_timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub id: Option<Vec<u8>>,
    pub headers: Vec<(Vec<u8>, Vec<u8>)>,
    pub value: Vec<u8>,
    pub content_type: Vec<u8>,
    pub protocol: Vec<u8>,
    pub principal: Vec<u8>,
}

impl Record {
    /// The event's time: the producer's when it gave one, else when the gateway received it.
    pub fn event_time_ms(&self) -> i64 {
        self.producer_timestamp_ms.unwrap_or(self.timestamp_ms)
    }

    /// The producing principal's name and, when recorded, how it authenticated: the record
    /// holds its identity, `source U+001F name` (records written before sources were recorded
    /// hold the name alone).
    pub fn principal_parts(&self) -> (&[u8], Option<&[u8]>) {
        match self.principal.iter().position(|&b| b == 0x1f) {
            Some(at) => (&self.principal[at + 1..], Some(&self.principal[..at])),
            None => (&self.principal, None),
        }
    }
}

/// A cursor over one partition directory.
pub struct PartitionReader {
    dir: PathBuf,
    seg_base: u64,
    file: Option<File>,
    pos: u64,
    /// Records below this offset are skipped.
    skip_below: u64,
    /// Until a frame at or after this time is seen, earlier frames are skipped.
    time_floor: Option<i64>,
    pending: VecDeque<Record>,
    buf: Vec<u8>,
}

impl PartitionReader {
    /// A reader positioned at the first record with offset `from` or later (the oldest record
    /// on disk if `from` is older).
    pub fn from_offset(dir: &Path, from: u64) -> io::Result<Self> {
        let bases = list_segments(dir)?;
        let base = bases
            .iter()
            .rev()
            .find(|&&b| b <= from)
            .or(bases.first())
            .copied()
            .unwrap_or(0);
        let mut r = Self::at_segment(dir, base);
        r.skip_below = from;
        r.pos = index_position(dir, base, from.saturating_sub(base));
        Ok(r)
    }

    /// A reader positioned at the first frame whose receive time is `ts_ms` or later.
    pub fn from_time(dir: &Path, ts_ms: i64) -> io::Result<Self> {
        let bases = list_segments(dir)?;
        let mut start = None;
        for (i, &base) in bases.iter().enumerate() {
            let last = i + 1 == bases.len();
            let entries = std::fs::read(segment_path(dir, base, "timeindex"))
                .ok()
                .and_then(|b| parse_time_index(&b))
                .unwrap_or_default();
            if !last && entries.last().is_some_and(|e| e.0 < ts_ms) {
                continue; // every frame of this sealed segment is older
            }
            let k = entries.iter().position(|e| e.0 >= ts_ms);
            let rel = match k {
                Some(0) => 0,
                Some(k) => entries[k - 1].1,
                None => entries.last().map_or(0, |e| e.1),
            };
            start = Some(base + u64::from(rel));
            break;
        }
        let mut r = Self::from_offset(dir, start.unwrap_or(0))?;
        r.time_floor = Some(ts_ms);
        Ok(r)
    }

    fn at_segment(dir: &Path, base: u64) -> Self {
        Self {
            dir: dir.to_path_buf(),
            seg_base: base,
            file: None,
            pos: 0,
            skip_below: 0,
            time_floor: None,
            pending: VecDeque::new(),
            buf: Vec::new(),
        }
    }

    /// The next record, or `None` when no complete record follows yet.
    pub fn next_record(&mut self) -> io::Result<Option<Record>> {
        loop {
            if let Some(r) = self.pending.pop_front() {
                return Ok(Some(r));
            }
            if self.read_frame()? {
                continue;
            }
            // End of readable data in this segment. If a newer segment exists, this one is
            // sealed: read it once more (it may have been completed meanwhile), then move on.
            let newer = list_segments(&self.dir)?
                .into_iter()
                .find(|&b| b > self.seg_base);
            let Some(next) = newer else { return Ok(None) };
            if self.read_frame()? {
                continue;
            }
            self.seg_base = next;
            self.file = None;
            self.pos = 0;
        }
    }

    /// Puts `r` (the record [`PartitionReader::next_record`] just returned) back in front, for
    /// a caller that read one past where it may go (e.g. past what is durable yet).
    pub fn put_back(&mut self, r: Record) {
        self.pending.push_front(r);
    }

    /// Reads the frame at the cursor into `pending`; false if there is none (yet).
    fn read_frame(&mut self) -> io::Result<bool> {
        if self.file.is_none() {
            match File::open(segment_path(&self.dir, self.seg_base, "log")) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        let file = self.file.as_ref().expect("opened above");
        self.buf.resize(HEADER_LEN, 0);
        if !read_exact_at(file, &mut self.buf, self.pos)? {
            return Ok(false);
        }
        let Ok(h) = Header::parse(&self.buf) else {
            return Ok(false);
        };
        self.buf.resize(h.frame_len(), 0);
        if !read_exact_at(
            file,
            &mut self.buf[HEADER_LEN..],
            self.pos + HEADER_LEN as u64,
        )? {
            return Ok(false);
        }
        let Ok(v) = FrameView::decode(&self.buf) else {
            return Ok(false);
        };
        self.pos += h.frame_len() as u64;
        if let Some(floor) = self.time_floor {
            if v.timestamp_ms < floor {
                return Ok(true);
            }
            self.time_floor = None;
        }
        for (i, rec) in v.records().enumerate() {
            let offset = v.base_offset + i as u64;
            if offset < self.skip_below {
                continue;
            }
            let rec = rec.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            self.pending.push_back(Record {
                offset,
                timestamp_ms: v.timestamp_ms,
                producer_timestamp_ms: rec.producer_timestamp_ms,
                key: rec.key.map(<[u8]>::to_vec),
                id: rec.id.map(<[u8]>::to_vec),
                headers: rec
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .collect(),
                value: rec.value.to_vec(),
                content_type: v.content_type.to_vec(),
                protocol: v.protocol.to_vec(),
                principal: v.principal.to_vec(),
            });
        }
        Ok(true)
    }
}

/// `read_exact_at` that answers false at end of file instead of failing.
fn read_exact_at(f: &File, buf: &mut [u8], pos: u64) -> io::Result<bool> {
    match f.read_exact_at(buf, pos) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// File position of the last indexed frame at or before relative offset `rel`.
fn index_position(dir: &Path, base: u64, rel: u64) -> u64 {
    let Some(entries) = std::fs::read(segment_path(dir, base, "index"))
        .ok()
        .and_then(|b| parse_offset_index(&b))
    else {
        return 0;
    };
    let i = entries.partition_point(|e| u64::from(e.0) <= rel);
    if i == 0 {
        0
    } else {
        u64::from(entries[i - 1].1)
    }
}

/// Partition directories of `stream` under `data_dir`, by partition number.
pub fn partition_dirs(data_dir: &Path, stream: &str) -> io::Result<Vec<(u32, PathBuf)>> {
    let dir = data_dir.join("streams").join(stream);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        if let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
            && entry.file_type()?.is_dir()
        {
            out.push((p, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}
