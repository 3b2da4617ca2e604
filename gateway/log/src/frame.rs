//! The on-disk frame: one producer request's events for one partition, written in one piece.
//!
//! ```text
//! frame   := crc32c:u32 | payload_len:u32 | base_offset:u64 | payload        (little-endian)
//!            crc32c covers payload_len, base_offset and payload
//! payload := version:u8 (1 or 2) | count:u32 | timestamp_ms:i64
//!            | content_type_len:u16 | content_type | protocol_len:u8 | protocol
//!            | principal_len:u16 | principal | record{count}
//! record  := record_len:u32 | key_len:i32 (-1 = none) | key | id_len:i32 (-1 = none) | id
//!            | header_count:u32 | (name_len:u32 | name | value_len:u32 | value){header_count}
//!            | value_len:u32 | value | [producer_timestamp_ms:i64]   (version 2 only)
//! ```
//!
//! The frame's `timestamp_ms` is when the gateway received the events (the time index is built
//! from it). A record may also carry the producer's own time of the event; a frame holding such
//! a record is written as version 2, any other as version 1, so logs of producers that never
//! send timestamps stay readable by earlier releases.
//!
//! The record at index `i` of a frame has offset `base_offset + i`. The producer side builds the
//! payload ([`FrameBuilder`]); the partition writer assigns the base offset and seals the CRC
//! ([`Frame::seal`]), so the CRC also protects the offset.

/// Bytes before the payload: crc, payload length, base offset.
pub const HEADER_LEN: usize = 16;
/// Largest payload a reader accepts; anything larger is treated as corruption.
pub const MAX_PAYLOAD_LEN: usize = 512 * 1024 * 1024;
/// The payload version of frames without producer timestamps.
pub const VERSION: u8 = 1;
/// The payload version of frames with at least one record carrying a producer timestamp.
pub const VERSION_TIMESTAMPS: u8 = 2;

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("incomplete frame: need {need} bytes, have {have}")]
    Incomplete { need: usize, have: usize },
    #[error("frame payload length {0} is out of range")]
    BadLength(usize),
    #[error("frame checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("malformed frame payload: {0}")]
    Malformed(&'static str),
}

/// A request's events, encoded and waiting for an offset.
#[derive(Debug, Clone)]
pub struct Frame {
    bytes: Vec<u8>,
    count: u32,
    timestamp_ms: i64,
}

impl Frame {
    /// Number of records.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Encoded length including the header.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the frame holds no records (never true for a built frame).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Receive time of the records.
    pub fn timestamp_ms(&self) -> i64 {
        self.timestamp_ms
    }

    /// Sets the base offset and the checksum; after this the bytes are ready for the disk.
    pub fn seal(&mut self, base_offset: u64) {
        self.bytes[8..16].copy_from_slice(&base_offset.to_le_bytes());
        let crc = crc32c::crc32c(&self.bytes[4..]);
        self.bytes[0..4].copy_from_slice(&crc.to_le_bytes());
    }

    /// The encoded bytes (sealed or not).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// Builds a [`Frame`] record by record.
#[derive(Debug)]
pub struct FrameBuilder {
    bytes: Vec<u8>,
    count: u32,
    count_at: usize,
    timestamp_ms: i64,
    producer_timestamps: bool,
}

impl FrameBuilder {
    /// Starts a frame whose records share a receive time, content type, protocol and principal.
    /// Over-long metadata strings are cut to their field's maximum length.
    pub fn new(
        timestamp_ms: i64,
        content_type: &[u8],
        protocol: &[u8],
        principal: &[u8],
        capacity: usize,
    ) -> Self {
        let content_type = &content_type[..content_type.len().min(u16::MAX as usize)];
        let protocol = &protocol[..protocol.len().min(u8::MAX as usize)];
        let principal = &principal[..principal.len().min(u16::MAX as usize)];
        let mut bytes = Vec::with_capacity(
            HEADER_LEN + 20 + content_type.len() + protocol.len() + principal.len() + capacity,
        );
        bytes.extend_from_slice(&[0; HEADER_LEN]);
        bytes.push(VERSION);
        let count_at = bytes.len();
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&timestamp_ms.to_le_bytes());
        bytes.extend_from_slice(&(content_type.len() as u16).to_le_bytes());
        bytes.extend_from_slice(content_type);
        bytes.push(protocol.len() as u8);
        bytes.extend_from_slice(protocol);
        bytes.extend_from_slice(&(principal.len() as u16).to_le_bytes());
        bytes.extend_from_slice(principal);
        Self {
            bytes,
            count: 0,
            count_at,
            timestamp_ms,
            producer_timestamps: false,
        }
    }

    /// Appends one record. Each part must be shorter than 4 GiB (the gateway's event size limit
    /// keeps them far below).
    pub fn push<'a, H>(&mut self, key: Option<&[u8]>, id: Option<&[u8]>, headers: H, value: &[u8])
    where
        H: ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
    {
        self.push_at(key, id, headers, value, None);
    }

    /// Appends one record with, when given, the producer's own timestamp of the event.
    pub fn push_at<'a, H>(
        &mut self,
        key: Option<&[u8]>,
        id: Option<&[u8]>,
        headers: H,
        value: &[u8],
        producer_timestamp_ms: Option<i64>,
    ) where
        H: ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
    {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&0u32.to_le_bytes());
        put_opt(&mut self.bytes, key);
        put_opt(&mut self.bytes, id);
        self.bytes
            .extend_from_slice(&(headers.len() as u32).to_le_bytes());
        for (name, v) in headers {
            put(&mut self.bytes, name);
            put(&mut self.bytes, v);
        }
        put(&mut self.bytes, value);
        if let Some(ts) = producer_timestamp_ms {
            self.bytes.extend_from_slice(&ts.to_le_bytes());
            self.producer_timestamps = true;
        }
        let record_len = (self.bytes.len() - start - 4) as u32;
        self.bytes[start..start + 4].copy_from_slice(&record_len.to_le_bytes());
        self.count += 1;
    }

    /// Records pushed so far.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Finishes the frame (still without offset and checksum).
    pub fn finish(mut self) -> Frame {
        let payload_len = (self.bytes.len() - HEADER_LEN) as u32;
        self.bytes[4..8].copy_from_slice(&payload_len.to_le_bytes());
        self.bytes[self.count_at..self.count_at + 4].copy_from_slice(&self.count.to_le_bytes());
        if self.producer_timestamps {
            self.bytes[HEADER_LEN] = VERSION_TIMESTAMPS;
        }
        Frame {
            bytes: self.bytes,
            count: self.count,
            timestamp_ms: self.timestamp_ms,
        }
    }
}

fn put(buf: &mut Vec<u8>, part: &[u8]) {
    buf.extend_from_slice(&(part.len() as u32).to_le_bytes());
    buf.extend_from_slice(part);
}

fn put_opt(buf: &mut Vec<u8>, part: Option<&[u8]>) {
    match part {
        Some(p) => {
            buf.extend_from_slice(&(p.len() as i32).to_le_bytes());
            buf.extend_from_slice(p);
        }
        None => buf.extend_from_slice(&(-1i32).to_le_bytes()),
    }
}

/// The fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub crc: u32,
    pub payload_len: usize,
    pub base_offset: u64,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes; rejects impossible payload lengths.
    pub fn parse(b: &[u8]) -> Result<Header, FrameError> {
        if b.len() < HEADER_LEN {
            return Err(FrameError::Incomplete {
                need: HEADER_LEN,
                have: b.len(),
            });
        }
        let payload_len = u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize;
        // version + count + timestamp + three length fields is the smallest payload.
        if !(1 + 4 + 8 + 2 + 1 + 2..=MAX_PAYLOAD_LEN).contains(&payload_len) {
            return Err(FrameError::BadLength(payload_len));
        }
        Ok(Header {
            crc: u32::from_le_bytes(b[0..4].try_into().unwrap()),
            payload_len,
            base_offset: u64::from_le_bytes(b[8..16].try_into().unwrap()),
        })
    }

    /// Length of the whole frame.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len
    }
}

/// A checked, decoded view of one frame.
#[derive(Debug, Clone)]
pub struct FrameView<'a> {
    pub base_offset: u64,
    pub count: u32,
    pub timestamp_ms: i64,
    pub content_type: &'a [u8],
    pub protocol: &'a [u8],
    pub principal: &'a [u8],
    version: u8,
    records: &'a [u8],
}

/// One record of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub key: Option<&'a [u8]>,
    pub id: Option<&'a [u8]>,
    pub headers: Vec<(&'a [u8], &'a [u8])>,
    pub value: &'a [u8],
    /// The producer's own time of the event, when it gave one.
    pub producer_timestamp_ms: Option<i64>,
}

impl<'a> FrameView<'a> {
    /// Checks the checksum and the structure of the frame at the start of `b` (which may hold
    /// more bytes after it) and decodes its metadata.
    pub fn decode(b: &'a [u8]) -> Result<FrameView<'a>, FrameError> {
        let h = Header::parse(b)?;
        if b.len() < h.frame_len() {
            return Err(FrameError::Incomplete {
                need: h.frame_len(),
                have: b.len(),
            });
        }
        let body = &b[4..h.frame_len()];
        let computed = crc32c::crc32c(body);
        if computed != h.crc {
            return Err(FrameError::Checksum {
                stored: h.crc,
                computed,
            });
        }
        let mut r = Reader(&b[HEADER_LEN..h.frame_len()]);
        let version = r.u8()?;
        if version != VERSION && version != VERSION_TIMESTAMPS {
            return Err(FrameError::Version(version));
        }
        let count = r.u32()?;
        let timestamp_ms = r.u64()? as i64;
        let n = r.u16()? as usize;
        let content_type = r.take(n)?;
        let n = r.u8()? as usize;
        let protocol = r.take(n)?;
        let n = r.u16()? as usize;
        let principal = r.take(n)?;
        let view = FrameView {
            base_offset: h.base_offset,
            count,
            timestamp_ms,
            content_type,
            protocol,
            principal,
            version,
            records: r.0,
        };
        if count == 0 {
            return Err(FrameError::Malformed("frame without records"));
        }
        // Walk every record once so that a decoded frame can be iterated without errors.
        let mut seen = 0u32;
        for rec in view.records() {
            rec?;
            seen += 1;
        }
        if seen != count {
            return Err(FrameError::Malformed("record count does not match records"));
        }
        Ok(view)
    }

    /// Offset after the last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }

    /// The records, in offset order.
    pub fn records(&self) -> impl Iterator<Item = Result<RecordView<'a>, FrameError>> + 'a {
        let mut rest = Reader(self.records);
        let timestamps = self.version == VERSION_TIMESTAMPS;
        std::iter::from_fn(move || {
            if rest.0.is_empty() {
                return None;
            }
            Some(next_record(&mut rest, timestamps))
        })
    }
}

fn next_record<'a>(rest: &mut Reader<'a>, timestamps: bool) -> Result<RecordView<'a>, FrameError> {
    let len = rest.u32()? as usize;
    let mut r = Reader(rest.take(len)?);
    let key = r.opt()?;
    let id = r.opt()?;
    let n = r.u32()? as usize;
    if n > r.0.len() / 8 {
        return Err(FrameError::Malformed("header count exceeds record"));
    }
    let mut headers = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.part()?;
        let value = r.part()?;
        headers.push((name, value));
    }
    let value = r.part()?;
    let producer_timestamp_ms = match r.0.len() {
        0 => None,
        8 if timestamps => Some(r.u64()? as i64),
        _ => return Err(FrameError::Malformed("trailing bytes in record")),
    };
    Ok(RecordView {
        key,
        id,
        headers,
        value,
        producer_timestamp_ms,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Malformed("field runs past the end"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn part(&mut self) -> Result<&'a [u8], FrameError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn opt(&mut self) -> Result<Option<&'a [u8]>, FrameError> {
        let n = self.u32()? as i32;
        match n {
            -1 => Ok(None),
            n if n < 0 => Err(FrameError::Malformed("negative length")),
            n => Ok(Some(self.take(n as usize)?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Rec = (
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Vec<(Vec<u8>, Vec<u8>)>,
        Vec<u8>,
        Option<i64>,
    );

    fn build(ts: i64, recs: &[Rec]) -> Frame {
        let mut b = FrameBuilder::new(ts, b"application/json", b"http", b"anonymous", 0);
        for (k, id, h, v, t) in recs {
            b.push_at(
                k.as_deref(),
                id.as_deref(),
                h.iter().map(|(a, b)| (a.as_slice(), b.as_slice())),
                v,
                *t,
            );
        }
        b.finish()
    }

    fn rec() -> impl Strategy<Value = Rec> {
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
            proptest::collection::vec(
                (
                    proptest::collection::vec(any::<u8>(), 0..10),
                    proptest::collection::vec(any::<u8>(), 0..10),
                ),
                0..4,
            ),
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::option::of(any::<i64>()),
        )
    }

    #[test]
    fn frames_without_producer_timestamps_stay_version_1() {
        let plain = (None, None, vec![], b"v".to_vec(), None);
        let mut f = build(1, std::slice::from_ref(&plain));
        f.seal(0);
        assert_eq!(f.as_bytes()[HEADER_LEN], VERSION);
        let mut f = build(1, &[plain, (None, None, vec![], b"w".to_vec(), Some(-5))]);
        f.seal(0);
        assert_eq!(f.as_bytes()[HEADER_LEN], VERSION_TIMESTAMPS);
        let v = FrameView::decode(f.as_bytes()).unwrap();
        let ts: Vec<_> = v
            .records()
            .map(|r| r.unwrap().producer_timestamp_ms)
            .collect();
        assert_eq!(ts, [None, Some(-5)]);
        // A version 1 frame cannot carry them: the same bytes marked version 1 are malformed.
        let mut bytes = f.as_bytes().to_vec();
        bytes[HEADER_LEN] = VERSION;
        let crc = crc32c::crc32c(&bytes[4..]);
        bytes[..4].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            FrameView::decode(&bytes),
            Err(FrameError::Malformed(_))
        ));
    }

    proptest! {
        #[test]
        fn frames_round_trip(ts in any::<i64>(), base in 0u64..u64::MAX / 2,
                             recs in proptest::collection::vec(rec(), 1..20)) {
            let mut f = build(ts, &recs);
            f.seal(base);
            let v = FrameView::decode(f.as_bytes()).unwrap();
            prop_assert_eq!(v.base_offset, base);
            prop_assert_eq!(v.count as usize, recs.len());
            prop_assert_eq!(v.timestamp_ms, ts);
            prop_assert_eq!(v.protocol, b"http");
            let got: Vec<RecordView> = v.records().map(Result::unwrap).collect();
            for (g, (k, id, h, val, t)) in got.iter().zip(&recs) {
                prop_assert_eq!(g.producer_timestamp_ms, *t);
                prop_assert_eq!(g.key, k.as_deref());
                prop_assert_eq!(g.id, id.as_deref());
                prop_assert_eq!(g.value, val.as_slice());
                let hs: Vec<(&[u8], &[u8])> = h.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
                prop_assert_eq!(&g.headers, &hs);
            }
        }

        #[test]
        fn any_single_byte_flip_is_detected(recs in proptest::collection::vec(rec(), 1..5),
                                            pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let mut f = build(7, &recs);
            f.seal(42);
            let mut bytes = f.as_bytes().to_vec();
            let i = pos.index(bytes.len());
            bytes[i] ^= flip;
            prop_assert!(FrameView::decode(&bytes).is_err());
        }

        #[test]
        fn every_strict_prefix_is_incomplete_or_invalid(recs in proptest::collection::vec(rec(), 1..5),
                                                        cut in any::<prop::sample::Index>()) {
            let mut f = build(7, &recs);
            f.seal(1);
            let bytes = f.as_bytes();
            let n = cut.index(bytes.len());
            prop_assert!(FrameView::decode(&bytes[..n]).is_err());
        }
    }
}
