//! The gateway's Prometheus metrics that more than one layer records. Names and labels are
//! documented in docs/operations.md; label values come from bounded sets (protocols, outcome
//! codes, and stream names, whose number is capped by `streams.max_streams`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-stream, per-protocol counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
    pub protocol: &'static str,
}

/// Labels of request outcome counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub protocol: &'static str,
    /// `ok`, `partial`, or a rejection code.
    pub outcome: &'static str,
}

/// Labels of rejected-event counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub protocol: &'static str,
    pub reason: &'static str,
}

/// Labels of failed authentications.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    pub protocol: &'static str,
    pub method: &'static str,
    pub reason: &'static str,
}

/// Labels of throttled events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThrottleLabels {
    pub stream: String,
    /// `stream`, `principal` or `principal_stream`.
    pub scope: &'static str,
    /// The principal if it is in `quotas.metrics_principals`, otherwise `other`.
    pub principal: String,
}

/// Labels of shed events.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub stream: String,
    /// `in_flight_budget` (the log is not keeping up) or `concurrency` (too many requests).
    pub reason: &'static str,
}

/// Labels of per-protocol gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

/// Labels of the ack latency: protocol and the stream's ack point (`durable`, `received`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AckLabels {
    pub protocol: &'static str,
    pub ack: &'static str,
}

fn ack_histogram() -> Histogram {
    // 100 µs … ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

fn batch_histogram() -> Histogram {
    // 1 … 16,384 events.
    Histogram::new(exponential_buckets(1.0, 2.0, 15))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Metrics shared by the adapters and the admission layer.
#[derive(Clone)]
pub struct Metrics {
    /// Events that reached admission (decoded and authenticated), by protocol; whether they
    /// were then appended or refused is in `events_in` and the refusal counters.
    pub events_received: Family<ProtocolLabels, Counter>,
    /// Bytes of those events.
    pub bytes_received: Family<ProtocolLabels, Counter>,
    /// Events appended (or queued, for `ack = "received"`) by stream and protocol.
    pub events_in: Family<StreamLabels, Counter>,
    /// Bytes of those events (key + id + headers + value).
    pub bytes_in: Family<StreamLabels, Counter>,
    /// Requests by protocol and outcome.
    pub requests: Family<OutcomeLabels, Counter>,
    /// Events not appended, by protocol and reason.
    pub events_rejected: Family<RejectLabels, Counter>,
    /// Bytes held for producers: bodies being received and events not yet at their ack point.
    pub in_flight_bytes: Gauge,
    /// Open client connections by protocol.
    pub connections: Family<ProtocolLabels, Gauge>,
    /// Client connections accepted, by protocol (their rate is the connection rate).
    pub connections_opened: Family<ProtocolLabels, Counter>,
    /// When each stream last had an event appended (Unix seconds), for "no data" alerts.
    /// Bounded by `streams.max_streams`.
    pub stream_last_event: Family<StreamOnlyLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Failed authentications by protocol, method and reason.
    pub auth_failures: Family<AuthLabels, Counter>,
    /// Long-lived sessions ended because their credentials were revoked, expired or changed.
    pub sessions_revoked: Family<ProtocolLabels, Counter>,
    /// Events refused or delayed by quotas.
    pub events_throttled: Family<ThrottleLabels, Counter>,
    /// Requests held by a `delay` quota before they fit.
    pub requests_delayed: Counter,
    /// Events refused because the gateway was overloaded (503), by stream and reason.
    pub events_shed: Family<ShedLabels, Counter>,
    /// MQTT connections ended by the server or the client, by reason (a fixed set).
    pub mqtt_disconnects: Family<ReasonLabels, Counter>,
    /// MQTT Last Wills by outcome: appended, failed, cancelled (a new connection of the
    /// session came back within the will delay), shed (too many delayed wills waiting).
    pub mqtt_wills: Family<OutcomeOnlyLabels, Counter>,
    /// Retained MQTT publishes and wills: accepted (sent to the log with `mqtt-retain: true`) or dropped (the
    /// stream's `mqtt_retained = "drop"`; answered with success).
    pub mqtt_retained: Family<OutcomeOnlyLabels, Counter>,
    /// MQTT CONNECTs asking for a stored session (clean start 0), by outcome: resumed (Session
    /// Present 1), new, store_error (the store failed; the session started clean or was not
    /// saved).
    pub mqtt_sessions: Family<OutcomeOnlyLabels, Counter>,
    /// Persistent MQTT sessions in this gateway's store (the embedded store; Redis counts its
    /// own).
    pub mqtt_sessions_stored: Gauge,
    /// From a batch reaching admission until its events are at their ack point, by protocol
    /// and ack point.
    pub ack_seconds: HistogramFamily<AckLabels>,
    /// Events per admitted batch (an HTTP request, a gRPC/WebSocket batch, an MQTT read), by
    /// protocol.
    pub batch_events: HistogramFamily<ProtocolLabels>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            events_received: Default::default(),
            bytes_received: Default::default(),
            events_in: Default::default(),
            bytes_in: Default::default(),
            requests: Default::default(),
            events_rejected: Default::default(),
            in_flight_bytes: Default::default(),
            connections: Default::default(),
            connections_opened: Default::default(),
            stream_last_event: Default::default(),
            auth_failures: Default::default(),
            sessions_revoked: Default::default(),
            events_throttled: Default::default(),
            requests_delayed: Default::default(),
            events_shed: Default::default(),
            mqtt_disconnects: Default::default(),
            mqtt_wills: Default::default(),
            mqtt_retained: Default::default(),
            mqtt_sessions: Default::default(),
            mqtt_sessions_stored: Default::default(),
            ack_seconds: Family::new_with_constructor(ack_histogram),
            batch_events: Family::new_with_constructor(batch_histogram),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamOnlyLabels {
    pub stream: String,
}

/// The open-connections gauge and accepted-connections counter of one protocol.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    open: Gauge,
    opened: Counter,
}

impl ConnectionMetrics {
    /// A connection opened.
    pub fn inc(&self) {
        self.open.inc();
        self.opened.inc();
    }

    /// A connection closed.
    pub fn dec(&self) {
        self.open.dec();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeOnlyLabels {
    pub outcome: &'static str,
}

impl Metrics {
    /// Registers every metric under `registry` (which adds the `sluice_` prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events_received",
            "Events that reached admission (decoded and authenticated), by protocol",
            self.events_received.clone(),
        );
        registry.register(
            "bytes_received",
            "Bytes of the events that reached admission, by protocol",
            self.bytes_received.clone(),
        );
        registry.register(
            "ack_seconds",
            "From a batch reaching admission until its events are at their ack point, by protocol and ack point (durable, received)",
            self.ack_seconds.clone(),
        );
        registry.register(
            "batch_events",
            "Events per admitted batch, by protocol",
            self.batch_events.clone(),
        );
        registry.register(
            "connections_opened",
            "Client connections accepted, by protocol",
            self.connections_opened.clone(),
        );
        registry.register(
            "stream_last_event_timestamp_seconds",
            "When each stream last had an event appended through this gateway (Unix seconds)",
            self.stream_last_event.clone(),
        );
        registry.register(
            "mqtt_disconnects",
            "MQTT connections ended, by reason (client, client_will, eof, keep_alive, malformed, too_large, protocol, not_authorized, quota, taken_over, shutdown, write_timeout, connect_timeout, refused)",
            self.mqtt_disconnects.clone(),
        );
        registry.register(
            "mqtt_wills",
            "MQTT Last Wills by outcome (appended, failed, cancelled, shed)",
            self.mqtt_wills.clone(),
        );
        registry.register(
            "mqtt_retained",
            "Retained MQTT publishes and wills, by outcome (accepted: sent to the log with `mqtt-retain: true`; dropped: the stream drops them)",
            self.mqtt_retained.clone(),
        );
        registry.register(
            "mqtt_sessions",
            "MQTT CONNECTs with clean start 0 by outcome (resumed, new), and session store failures (store_error)",
            self.mqtt_sessions.clone(),
        );
        registry.register(
            "mqtt_sessions_stored",
            "Persistent MQTT sessions in this gateway's embedded session store",
            self.mqtt_sessions_stored.clone(),
        );
        registry.register(
            "events_in",
            "Events accepted into the log, by stream and protocol",
            self.events_in.clone(),
        );
        registry.register(
            "bytes_in",
            "Bytes of accepted events (key, id, headers, value), by stream and protocol",
            self.bytes_in.clone(),
        );
        registry.register(
            "requests",
            "Requests by protocol and outcome (ok, partial, or the rejection code)",
            self.requests.clone(),
        );
        registry.register(
            "events_rejected",
            "Events not appended, by protocol and reason",
            self.events_rejected.clone(),
        );
        registry.register(
            "in_flight_bytes",
            "Bytes held for producers: request bodies being received and events not yet at their ack point",
            self.in_flight_bytes.clone(),
        );
        registry.register(
            "connections",
            "Open client connections by protocol",
            self.connections.clone(),
        );
        registry.register(
            "events_throttled",
            "Events refused by quotas, by stream, scope and principal (allow-listed, else other)",
            self.events_throttled.clone(),
        );
        registry.register(
            "events_shed",
            "Events refused with 503 because the gateway was overloaded, by stream and reason",
            self.events_shed.clone(),
        );
        registry.register(
            "requests_delayed",
            "Requests held by a delay quota until they fit",
            self.requests_delayed.clone(),
        );
        registry.register(
            "auth_failures",
            "Failed authentications by protocol, method (api_key, jwt, mtls, none, any) and reason",
            self.auth_failures.clone(),
        );
        registry.register(
            "sessions_revoked",
            "Long-lived sessions (MQTT, WebSocket, gRPC streams) ended because their credentials were revoked, expired or grant other permissions now",
            self.sessions_revoked.clone(),
        );
    }

    /// Counts one failed authentication.
    /// The connection metrics of `protocol`.
    pub fn connections_of(&self, protocol: &'static str) -> ConnectionMetrics {
        let labels = ProtocolLabels { protocol };
        ConnectionMetrics {
            open: self.connections.get_or_create(&labels).clone(),
            opened: self.connections_opened.get_or_create(&labels).clone(),
        }
    }

    /// Records that `stream` had events appended now.
    pub fn stream_appended(&self, stream: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.stream_last_event
            .get_or_create(&StreamOnlyLabels {
                stream: stream.to_string(),
            })
            .set(now);
    }

    /// Counts one session ended by revocation.
    pub fn session_revoked(&self, protocol: &'static str) {
        self.sessions_revoked
            .get_or_create(&ProtocolLabels { protocol })
            .inc();
    }

    pub fn auth_failure(&self, protocol: &'static str, method: &'static str, reason: &'static str) {
        self.auth_failures
            .get_or_create(&AuthLabels {
                protocol,
                method,
                reason,
            })
            .inc();
    }

    /// Counts one request's outcome.
    pub fn request(&self, protocol: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&OutcomeLabels { protocol, outcome })
            .inc();
    }

    /// Counts one ended MQTT connection.
    pub fn mqtt_disconnect(&self, reason: &'static str) {
        self.mqtt_disconnects
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts one Last Will's outcome.
    pub fn mqtt_will(&self, outcome: &'static str) {
        self.mqtt_wills
            .get_or_create(&OutcomeOnlyLabels { outcome })
            .inc();
    }

    /// Counts one retained publish or will by what became of it (`accepted`, `dropped`).
    pub fn mqtt_retained(&self, outcome: &'static str) {
        self.mqtt_retained
            .get_or_create(&OutcomeOnlyLabels { outcome })
            .inc();
    }

    /// Counts one persistent-session outcome (`resumed`, `new`, `store_error`).
    pub fn mqtt_session(&self, outcome: &'static str) {
        self.mqtt_sessions
            .get_or_create(&OutcomeOnlyLabels { outcome })
            .inc();
    }

    /// Counts `n` rejected events.
    pub fn rejected(&self, protocol: &'static str, reason: &'static str, n: u64) {
        self.events_rejected
            .get_or_create(&RejectLabels { protocol, reason })
            .inc_by(n);
    }
}
