//! The Kafka sink's metrics: delivery errors, queue depth, reachability, topics, and broker
//! round-trip times from librdkafka's statistics.

use super::*;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ErrorLabels {
    /// librdkafka's error name, e.g. `MessageTimedOut`.
    pub(super) error: String,
    pub(super) retryable: &'static str,
}

/// The sink's metrics.
#[derive(Clone, Default)]
pub struct KafkaMetrics {
    pub(super) delivery_errors: Family<ErrorLabels, Counter>,
    pub(super) queue_events: Gauge,
    pub(super) reachable: Gauge,
    pub(super) topics: Gauge,
    /// Round-trip time to each broker (librdkafka statistics), by broker; bounded by the
    /// cluster's size.
    broker_rtt: Family<RttLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RttLabels {
    /// `host:port/node-id`.
    broker: String,
    /// `avg` or `p99` over librdkafka's statistics window.
    quantile: &'static str,
}

/// The producer's librdkafka context: turns its statistics into broker round-trip gauges.
pub struct StatsContext {
    pub(super) metrics: KafkaMetrics,
}

impl rdkafka::client::ClientContext for StatsContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for broker in statistics.brokers.values() {
            // Bootstrap entries (node id -1) are not brokers of the cluster.
            let (true, Some(rtt)) = (broker.nodeid >= 0, broker.rtt.as_ref()) else {
                continue;
            };
            if rtt.cnt == 0 {
                continue;
            }
            for (quantile, micros) in [("avg", rtt.avg), ("p99", rtt.p99)] {
                self.metrics
                    .broker_rtt
                    .get_or_create(&RttLabels {
                        broker: broker.name.clone(),
                        quantile,
                    })
                    .set(micros as f64 / 1e6);
            }
        }
    }
}

impl KafkaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kafka_delivery_errors",
            "Events Kafka did not take, by librdkafka error and whether the producer was told to retry",
            self.delivery_errors.clone(),
        );
        registry.register(
            "kafka_producer_queue_events",
            "Events in the producer's queue awaiting delivery (sampled each health check)",
            self.queue_events.clone(),
        );
        registry.register(
            "kafka_reachable",
            "1 while the last probe of the brokers answered, 0 otherwise",
            self.reachable.clone(),
        );
        registry.register(
            "kafka_topics",
            "Topics the gateway knows and produces to",
            self.topics.clone(),
        );
        registry.register(
            "kafka_broker_rtt_seconds",
            "Round-trip time to each broker over librdkafka's statistics window (avg, p99)",
            self.broker_rtt.clone(),
        );
    }
}
