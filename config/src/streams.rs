//! `[streams]` (settings per stream, declared streams, stream names) and `[limits]`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{Config, DedupKeys, MAX_BODY_BYTES_LIMIT, MAX_PARTITIONS, Problems};

/// Process-wide resource limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of events accepted but not yet written (and, for durable streams, fsynced). When it
    /// is exhausted, producers get 503 with Retry-After.
    pub max_in_flight_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_in_flight_bytes: 256 * 1024 * 1024,
        }
    }
}

/// When a producer's request counts as accepted.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// After the events are written and fsynced (embedded log), or acknowledged by every
    /// in-sync replica (Kafka, acks=all; `replicated` is another name for it): they survive a
    /// crash or power loss.
    #[default]
    #[serde(alias = "replicated")]
    Durable,
    /// After the events are parsed and queued for the log: fire-and-forget.
    Received,
    /// With `log.kind = "kafka"`: after the events are fsynced in the gateway's local spool,
    /// from where they are forwarded to Kafka in order (docs/kafka.md "The spool"). They
    /// survive a crash of the gateway and an outage of Kafka.
    Spooled,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Durable => "durable",
            AckMode::Received => "received",
            AckMode::Spooled => "spooled",
        }
    }
}

/// Settings a stream has; `[streams.defaults]` and each `[streams.declare.NAME]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    pub ack: AckMode,
    /// Partitions of a new stream; a stream's count can grow later, never shrink.
    pub partitions: u32,
    /// Largest request body, after decompression.
    pub max_body_bytes: u64,
    /// Largest single event (key + headers + value).
    pub max_event_bytes: u64,
    /// Most events in one request.
    pub max_events_per_request: u64,
    /// Delete sealed segments whose newest event is older than this (0 = keep forever).
    pub retention_ms: u64,
    /// Delete the oldest sealed segments while a partition is larger than this (0 = no limit).
    pub retention_bytes: u64,
    /// Bytes of this stream's events accepted but not yet acked; when used up its producers get
    /// 503 while other streams go on (0 = only the global `limits.max_in_flight_bytes`).
    pub max_in_flight_bytes: u64,
    /// Recognise producer retries and answer them with the original's position instead of
    /// appending them again (docs/exactly-once.md).
    pub dedup: bool,
    /// How long a key is remembered after its event was appended.
    pub dedup_window_ms: u64,
    /// Most keys this stream's window holds; past it the oldest are forgotten first.
    pub dedup_window_events: u64,
    /// Most keys one principal holds in this stream's window, so a producer sending unique
    /// keys forgets its own oldest keys, not everybody's.
    pub dedup_principal_events: u64,
    /// Which keys identify an event: `["id", "idempotency_key"]`.
    pub dedup_keys: DedupKeys,
    /// What an MQTT publish (or will) with the retain flag becomes: `store` (an event with the
    /// header `mqtt-retain: true`) or `drop` (answered with success, not stored).
    pub mqtt_retained: RetainedPolicy,
    /// For `ack = "spooled"`: most bytes this stream's spool may hold on disk (0 = only the
    /// total `log.spool.max_bytes`); past it producers get the backpressure answer.
    pub spool_max_bytes: u64,
    /// For `ack = "spooled"`: once the oldest event not yet forwarded to Kafka is this old,
    /// producers get the backpressure answer (0 = no limit by age).
    pub spool_max_age_ms: u64,
    /// A producer timestamp more than this far ahead of the gateway's clock is out of range
    /// (0 = no limit). Kafka's `log.message.timestamp.after.max.ms` has the same default.
    pub max_timestamp_future_ms: u64,
    /// A producer timestamp more than this far behind the gateway's clock is out of range
    /// (0 = no limit: devices that were offline for weeks send old events).
    pub max_timestamp_past_ms: u64,
    /// What an event whose producer timestamp is out of range gets.
    pub timestamp_out_of_range: TimestampPolicy,
}

/// What becomes of an event whose producer timestamp is out of the stream's range
/// (docs/http.md "Timestamps and partitions").
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimestampPolicy {
    /// Refused per event as malformed, saying which bound it broke.
    #[default]
    Reject,
    /// Stored with the time Sluice received it instead; the producer's time is kept in the
    /// header `sluice-producer-timestamp`.
    ReceiveTime,
}

/// What becomes of a retained MQTT publish (docs/mqtt.md "Retained messages").
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RetainedPolicy {
    /// Stored as an event with the header `mqtt-retain: true`.
    #[default]
    Store,
    /// Answered with success and not stored (counted in `sluice_mqtt_retained_total`).
    Drop,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            ack: AckMode::Durable,
            partitions: 1,
            max_body_bytes: 8 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            max_events_per_request: 10_000,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: 0,
            max_in_flight_bytes: 0,
            dedup: false,
            dedup_window_ms: 5 * 60 * 1000,
            dedup_window_events: 1_000_000,
            dedup_principal_events: 100_000,
            dedup_keys: DedupKeys::default(),
            mqtt_retained: RetainedPolicy::Store,
            spool_max_bytes: 0,
            spool_max_age_ms: 24 * 3600 * 1000,
            max_timestamp_future_ms: 3600 * 1000,
            max_timestamp_past_ms: 0,
            timestamp_out_of_range: TimestampPolicy::Reject,
        }
    }
}

/// A declared stream's settings: each one set here overrides `[streams.defaults]`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StreamOverrides {
    pub ack: Option<AckMode>,
    pub partitions: Option<u32>,
    pub max_body_bytes: Option<u64>,
    pub max_event_bytes: Option<u64>,
    pub max_events_per_request: Option<u64>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub max_in_flight_bytes: Option<u64>,
    pub dedup: Option<bool>,
    pub dedup_window_ms: Option<u64>,
    pub dedup_window_events: Option<u64>,
    pub dedup_principal_events: Option<u64>,
    pub dedup_keys: Option<DedupKeys>,
    pub mqtt_retained: Option<RetainedPolicy>,
    pub spool_max_bytes: Option<u64>,
    pub spool_max_age_ms: Option<u64>,
    pub max_timestamp_future_ms: Option<u64>,
    pub max_timestamp_past_ms: Option<u64>,
    pub timestamp_out_of_range: Option<TimestampPolicy>,
}

impl StreamOverrides {
    /// `defaults` with every setting this declaration names replaced.
    pub fn apply(&self, d: &StreamSettings) -> StreamSettings {
        StreamSettings {
            ack: self.ack.unwrap_or(d.ack),
            partitions: self.partitions.unwrap_or(d.partitions),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_event_bytes: self.max_event_bytes.unwrap_or(d.max_event_bytes),
            max_events_per_request: self
                .max_events_per_request
                .unwrap_or(d.max_events_per_request),
            retention_ms: self.retention_ms.unwrap_or(d.retention_ms),
            retention_bytes: self.retention_bytes.unwrap_or(d.retention_bytes),
            max_in_flight_bytes: self.max_in_flight_bytes.unwrap_or(d.max_in_flight_bytes),
            dedup: self.dedup.unwrap_or(d.dedup),
            dedup_window_ms: self.dedup_window_ms.unwrap_or(d.dedup_window_ms),
            dedup_window_events: self.dedup_window_events.unwrap_or(d.dedup_window_events),
            dedup_principal_events: self
                .dedup_principal_events
                .unwrap_or(d.dedup_principal_events),
            dedup_keys: self.dedup_keys.unwrap_or(d.dedup_keys),
            mqtt_retained: self.mqtt_retained.unwrap_or(d.mqtt_retained),
            spool_max_bytes: self.spool_max_bytes.unwrap_or(d.spool_max_bytes),
            spool_max_age_ms: self.spool_max_age_ms.unwrap_or(d.spool_max_age_ms),
            max_timestamp_future_ms: self
                .max_timestamp_future_ms
                .unwrap_or(d.max_timestamp_future_ms),
            max_timestamp_past_ms: self
                .max_timestamp_past_ms
                .unwrap_or(d.max_timestamp_past_ms),
            timestamp_out_of_range: self
                .timestamp_out_of_range
                .unwrap_or(d.timestamp_out_of_range),
        }
    }
}

/// Streams: which exist, how new ones are created, their settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Create a stream on its first append; when false only declared streams accept events
    /// (others get 404).
    pub auto_create: bool,
    /// Most streams the gateway will hold; creation beyond this is refused.
    pub max_streams: usize,
    /// Most streams one principal may create by producing to them (counted since the gateway
    /// started), so one producer cannot use up `max_streams` for everyone (0 = no limit).
    pub max_streams_per_principal: usize,
    pub defaults: StreamSettings,
    /// Streams with settings of their own, by name.
    pub declare: BTreeMap<String, StreamOverrides>,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            auto_create: true,
            max_streams: 1000,
            max_streams_per_principal: 250,
            defaults: StreamSettings::default(),
            declare: BTreeMap::new(),
        }
    }
}

impl StreamsConfig {
    /// The largest `max_events_per_request` of any stream (the defaults or a declaration).
    pub fn max_events_per_request(&self) -> u64 {
        self.declare
            .keys()
            .map(|name| self.settings(name).max_events_per_request)
            .fold(self.defaults.max_events_per_request, u64::max)
    }

    /// The settings of `stream`: its declaration over the defaults, or the defaults.
    pub fn settings(&self, stream: &str) -> StreamSettings {
        match self.declare.get(stream) {
            Some(o) => o.apply(&self.defaults),
            None => self.defaults,
        }
    }
}

/// Why a stream name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamNameError {
    #[error("a stream name must not be empty")]
    Empty,
    #[error("a stream name has at most 249 characters; this one has {0}")]
    TooLong(usize),
    #[error("`.` and `..` are not stream names")]
    Dots,
    #[error("a stream name may contain only a-z, A-Z, 0-9, `.`, `_` and `-`; found {0:?}")]
    BadChar(char),
}

/// Checks Kafka's topic rules: 1–249 characters of `[a-zA-Z0-9._-]`, neither `.` nor `..`.
pub fn check_stream_name(name: &str) -> Result<(), StreamNameError> {
    if name.is_empty() {
        return Err(StreamNameError::Empty);
    }
    if name.len() > 249 {
        return Err(StreamNameError::TooLong(name.chars().count()));
    }
    if name == "." || name == ".." {
        return Err(StreamNameError::Dots);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(StreamNameError::BadChar(c));
    }
    Ok(())
}

impl Config {
    /// Whether any stream (the defaults or a declared one) acks durably (or through the
    /// spool, whose forwarder needs the same producer guarantees).
    pub fn any_durable_stream(&self) -> bool {
        self.any_stream_acking(|a| a != AckMode::Received)
    }

    /// Whether any stream (the defaults or a declared one) acks once spooled.
    pub fn any_spooled_stream(&self) -> bool {
        self.any_stream_acking(|a| a == AckMode::Spooled)
    }

    fn any_stream_acking(&self, f: impl Fn(AckMode) -> bool) -> bool {
        f(self.streams.defaults.ack)
            || self
                .streams
                .declare
                .values()
                .any(|o| f(o.apply(&self.streams.defaults).ack))
    }

    pub(crate) fn validate_streams(&self, p: &mut Problems) {
        if self.streams.max_streams == 0 {
            p.add("streams.max_streams", "must be at least 1");
        }
        if self.streams.declare.len() > self.streams.max_streams {
            p.add(
                "streams.declare",
                format!(
                    "{} streams are declared but streams.max_streams is {}",
                    self.streams.declare.len(),
                    self.streams.max_streams
                ),
            );
        }
        let mut largest_body = 0;
        let mut check_stream = |prefix: &str, s: &StreamSettings, p: &mut Problems| {
            let mut add = |key: &str, message: String| p.add(format!("{prefix}.{key}"), message);
            if !(1..=MAX_PARTITIONS).contains(&s.partitions) {
                add(
                    "partitions",
                    format!(
                        "{} is outside the allowed 1..={MAX_PARTITIONS}",
                        s.partitions
                    ),
                );
            }
            if !(1..=MAX_BODY_BYTES_LIMIT).contains(&s.max_body_bytes) {
                add(
                    "max_body_bytes",
                    format!(
                        "{} is outside the allowed 1..={MAX_BODY_BYTES_LIMIT}",
                        s.max_body_bytes
                    ),
                );
            }
            if s.max_event_bytes == 0 || s.max_event_bytes > s.max_body_bytes {
                add(
                    "max_event_bytes",
                    format!(
                        "{} must be at least 1 and at most max_body_bytes ({})",
                        s.max_event_bytes, s.max_body_bytes
                    ),
                );
            }
            if !(1..=1_000_000).contains(&s.max_events_per_request) {
                add(
                    "max_events_per_request",
                    format!(
                        "{} is outside the allowed 1..=1000000",
                        s.max_events_per_request
                    ),
                );
            }
            if s.dedup {
                let mut q = Problems::default();
                q.in_range(
                    "dedup_window_ms",
                    s.dedup_window_ms,
                    1,
                    7 * 24 * 3600 * 1000,
                );
                q.in_range("dedup_window_events", s.dedup_window_events, 1, 100_000_000);
                q.in_range(
                    "dedup_principal_events",
                    s.dedup_principal_events,
                    1,
                    s.dedup_window_events.max(1),
                );
                if !s.dedup_keys.id && !s.dedup_keys.idempotency_key && !s.dedup_keys.mqtt_packet {
                    q.add("dedup_keys", "dedup is on but no key is chosen");
                }
                for problem in q.0 {
                    add(&problem.path, problem.message);
                }
            }
            // A spool holds whole segments: each partition's newest one stays until it rolls,
            // forwarded or not, so a bound below two per partition could never be met.
            let least = 2 * self.log.spool.segment_bytes * u64::from(s.partitions);
            if s.ack == AckMode::Spooled && s.spool_max_bytes > 0 && s.spool_max_bytes < least {
                add(
                    "spool_max_bytes",
                    format!(
                        "{} is below two spool segments per partition ({least} = 2 × log.spool.segment_bytes × partitions): the spool keeps whole segments, so the bound could be reached with nothing waiting",
                        s.spool_max_bytes
                    ),
                );
            }
            if s.ack == AckMode::Spooled && self.log.kind != crate::LogKind::Kafka {
                add(
                    "ack",
                    "\"spooled\" puts a local spool in front of Kafka and needs log.kind = \"kafka\"; the embedded log acks durably by itself (ack = \"durable\")".into(),
                );
            }
            largest_body = largest_body.max(s.max_body_bytes);
        };
        check_stream("streams.defaults", &self.streams.defaults, p);
        for (name, o) in &self.streams.declare {
            let prefix = format!("streams.declare.{name}");
            if let Err(e) = check_stream_name(name) {
                p.add(prefix.clone(), e.to_string());
            }
            check_stream(&prefix, &o.apply(&self.streams.defaults), p);
        }
        if self.limits.max_in_flight_bytes < largest_body {
            p.add(
                "limits.max_in_flight_bytes",
                format!(
                    "{} is smaller than the largest max_body_bytes ({largest_body}); such a request could never be admitted",
                    self.limits.max_in_flight_bytes
                ),
            );
        }
    }
}
