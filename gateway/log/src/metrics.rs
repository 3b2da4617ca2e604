//! Metrics of the embedded log.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

/// Group-commit and fsync metrics; cheap to clone (shared counters).
#[derive(Clone)]
pub struct LogMetrics {
    pub fsyncs: Counter,
    pub fsync_seconds: Histogram,
    pub group_events: Histogram,
    pub group_bytes: Histogram,
    pub append_seconds: Histogram,
    pub linger_seconds: Histogram,
    pub truncated_bytes: Counter,
    pub segments_deleted: Counter,
    pub append_errors: Counter,
}

impl Default for LogMetrics {
    fn default() -> Self {
        Self {
            fsyncs: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            group_events: Histogram::new(exponential_buckets(1.0, 2.0, 18)),
            group_bytes: Histogram::new(exponential_buckets(64.0, 4.0, 12)),
            append_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            linger_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            truncated_bytes: Counter::default(),
            segments_deleted: Counter::default(),
            append_errors: Counter::default(),
        }
    }
}

impl LogMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "log_fsyncs",
            "fdatasync calls of the embedded log (one per group commit of durable appends)",
            self.fsyncs.clone(),
        );
        registry.register_with_unit(
            "log_fsync",
            "Time of one fdatasync",
            Unit::Seconds,
            self.fsync_seconds.clone(),
        );
        registry.register(
            "log_group_commit_events",
            "Events written by one group commit (the log's batch size)",
            self.group_events.clone(),
        );
        registry.register_with_unit(
            "log_group_commit",
            "Bytes written by one group commit",
            Unit::Bytes,
            self.group_bytes.clone(),
        );
        registry.register_with_unit(
            "log_append",
            "Time from handing a request's events to the log until they are written (and fsynced when durable)",
            Unit::Seconds,
            self.append_seconds.clone(),
        );
        registry.register_with_unit(
            "log_linger",
            "Time a batch waited in the log's queue before its group commit started (the log's linger: the previous commit's write and fsync)",
            Unit::Seconds,
            self.linger_seconds.clone(),
        );
        registry.register_with_unit(
            "log_recovery_truncated",
            "Bytes cut from torn or corrupt segment tails at startup",
            Unit::Bytes,
            self.truncated_bytes.clone(),
        );
        registry.register(
            "log_segments_deleted",
            "Segments deleted by retention",
            self.segments_deleted.clone(),
        );
        registry.register(
            "log_append_errors",
            "Group commits that failed with an I/O error",
            self.append_errors.clone(),
        );
    }
}
