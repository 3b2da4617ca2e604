//! Sluice's embedded durable log: per stream and partition a directory of CRC32C-framed segment
//! files with offset and time indexes, group commit (one write and one fsync cover every append
//! waiting on it), recovery that truncates a torn tail, and retention by age and size.
//!
//! Layout under the data directory:
//! ```text
//! LOCK                                  held (flock) by the one process writing here
//! streams/{stream}/stream.meta          "partitions=N"; written before any event is acked
//! streams/{stream}/{partition}/{base:020}.log|.index|.timeindex
//! ```

pub mod frame;
mod log;
pub mod metrics;
pub mod partition;
pub mod reader;
mod segment;

use std::path::PathBuf;
use std::sync::Arc;

pub use frame::{Frame, FrameBuilder, FrameView, RecordView};
pub use log::{Guard, Log, LogOptions, Marks, StreamLog, StreamOptions};
pub use metrics::LogMetrics;
pub use partition::{PartitionOptions, PartitionWriter, Recovery, check_recovery};
pub use reader::{PartitionReader, Record, partition_dirs};

/// Why the log could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("log I/O error: {0}")]
    Io(Arc<std::io::Error>),
    #[error("partition stopped accepting writes after an unrecoverable error: {0}")]
    Poisoned(String),
    #[error("the log is shutting down")]
    Closed,
    #[error("data directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("the log holds its maximum of {0} streams")]
    TooManyStreams(usize),
    #[error("{0}")]
    Corrupt(String),
}

impl From<std::io::Error> for LogError {
    fn from(e: std::io::Error) -> Self {
        LogError::Io(Arc::new(e))
    }
}

/// Kafka's murmur2 hash (the Java client's `Utils.murmur2`), so keys map to the same partitions
/// here as in Kafka.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    let len = data.len();
    let mut h: u32 = SEED ^ len as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner picks for `key` among `partitions`.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    ((murmur2(key) & 0x7fff_ffff) as u32) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Vectors from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
    }
}
