//! The spool's metrics (docs/metrics.md "Spool"). Labels are stream names, bounded by
//! `streams.max_streams`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StreamLabel {
    pub(crate) stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub(crate) stream: String,
    /// `recover` (the forwarder could not find out what Kafka has), `delivery` (Kafka refused
    /// or the producer failed), `partitions` (the topic's partition count differs).
    pub(crate) error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RefusedLabels {
    pub(crate) stream: String,
    /// `stream_bytes`, `total_bytes` or `age`.
    pub(crate) reason: &'static str,
}

/// The spool's metrics.
#[derive(Clone, Default)]
pub struct SpoolMetrics {
    pub(crate) bytes: Family<StreamLabel, Gauge>,
    pub(crate) events: Family<StreamLabel, Gauge>,
    pub(crate) oldest_age: Family<StreamLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub(crate) forwarded: Family<StreamLabel, Counter>,
    pub(crate) errors: Family<ErrorLabels, Counter>,
    pub(crate) refused: Family<RefusedLabels, Counter>,
    pub(crate) total_bytes: Gauge,
    pub(crate) max_bytes: Gauge,
    pub(crate) producer_restarts: Counter,
}

impl SpoolMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "spool_bytes",
            "Bytes of a spooled stream's spool on disk (events not yet forwarded to Kafka, plus at most one segment per partition already forwarded)",
            self.bytes.clone(),
        );
        r.register(
            "spool_events",
            "Events of a spooled stream acked to producers and not yet acknowledged by Kafka",
            self.events.clone(),
        );
        r.register(
            "spool_oldest_event_age_seconds",
            "Age of a spooled stream's oldest event not yet acknowledged by Kafka (0 when none waits)",
            self.oldest_age.clone(),
        );
        r.register(
            "spool_forwarded_events",
            "Events forwarded from the spool and acknowledged by Kafka",
            self.forwarded.clone(),
        );
        r.register(
            "spool_forward_errors",
            "Forwarding failures by stream and kind: recover, delivery, partitions",
            self.errors.clone(),
        );
        r.register(
            "spool_refused_events",
            "Events refused because the spool was at a bound: stream_bytes, total_bytes or age",
            self.refused.clone(),
        );
        r.register(
            "spool_total_bytes",
            "Bytes of every spooled stream's spool on disk",
            self.total_bytes.clone(),
        );
        r.register(
            "spool_max_bytes",
            "The configured bound of the whole spool (log.spool.max_bytes)",
            self.max_bytes.clone(),
        );
        r.register(
            "spool_producer_restarts",
            "Times the forwarders' Kafka producer was replaced after a fatal error",
            self.producer_restarts.clone(),
        );
    }
}
