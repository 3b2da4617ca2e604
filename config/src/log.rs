//! `[log]`: the embedded log's files, or Kafka and the producer properties Sluice sets.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::{AckMode, Config, Problems, Secret};

/// Which log the gateway appends to.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// The embedded durable log under `data_dir`.
    #[default]
    Embedded,
    /// Apache Kafka (or a Kafka-compatible broker), configured in `[log.kafka]`.
    Kafka,
}

/// The log the gateway appends to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub kind: LogKind,
    /// Directory of the embedded log (created if missing; locked against a second process).
    pub data_dir: PathBuf,
    /// A segment rolls over once it holds this many bytes.
    pub segment_bytes: u64,
    /// A segment rolls over once its first append is this old (0 = never by age).
    pub segment_ms: u64,
    /// One offset- and time-index entry per this many bytes of log.
    pub index_interval_bytes: u64,
    /// Upper bound of bytes written by one group commit (one write + one fsync).
    pub max_group_bytes: u64,
    /// For streams with `ack = "received"`: how long written data may wait for an fsync.
    pub flush_interval_ms: u64,
    /// How often retention runs per partition.
    pub retention_check_interval_ms: u64,
    /// Fault injection for tests of backpressure: every group commit waits this long first.
    /// Never set this in production.
    pub fault_append_delay_ms: u64,
    /// Fault injection for tests of disk failure: each partition's fsyncs fail (EIO) from the
    /// Nth on (0 = never). Never set this in production.
    pub fault_fsync_fail_after: u64,
    /// The Kafka sink, used when `kind = "kafka"`.
    pub kafka: KafkaConfig,
    /// The local spool in front of Kafka, for streams with `ack = "spooled"`.
    pub spool: SpoolConfig,
}

/// `[log.spool]`: the durable spool in front of Kafka (docs/kafka.md "The spool"). It lives in
/// `{data_dir}/spool` and is opened when a stream acks `spooled`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Most bytes every spooled stream together may hold on disk; past it producers of
    /// spooled streams get the backpressure answer (503 / UNAVAILABLE / MQTT hold).
    pub max_bytes: u64,
    /// A spool segment rolls over at this size; a segment is deleted once Kafka has every
    /// event in it, so this is also how much forwarded data may linger per partition.
    pub segment_bytes: u64,
    /// Events per second each stream's forwarder sends to Kafka at most (0 = as fast as Kafka
    /// takes them), so a backlog drains without starving live traffic of the cluster.
    pub forward_rate: u64,
    /// Events per partition handed to the Kafka producer and not yet acknowledged.
    pub max_in_flight_events: u64,
    /// How often each partition's forwarding position is written down (and forwarded segments
    /// deleted). After a crash, the forwarder asks Kafka only for what was forwarded since.
    pub checkpoint_interval_ms: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024 * 1024,
            segment_bytes: 16 * 1024 * 1024,
            forward_rate: 0,
            max_in_flight_events: 10_000,
            checkpoint_interval_ms: 1000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            kind: LogKind::Embedded,
            data_dir: PathBuf::from("./data"),
            segment_bytes: 128 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            max_group_bytes: 8 * 1024 * 1024,
            flush_interval_ms: 1000,
            retention_check_interval_ms: 60_000,
            fault_append_delay_ms: 0,
            fault_fsync_fail_after: 0,
            kafka: KafkaConfig::default(),
            spool: SpoolConfig::default(),
        }
    }
}

/// Compression of record batches sent to Kafka.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KafkaCompression {
    None,
    Gzip,
    Lz4,
    Snappy,
    #[default]
    Zstd,
}

impl KafkaCompression {
    /// librdkafka's name of the codec.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCompression::None => "none",
            KafkaCompression::Gzip => "gzip",
            KafkaCompression::Lz4 => "lz4",
            KafkaCompression::Snappy => "snappy",
            KafkaCompression::Zstd => "zstd",
        }
    }
}

/// How the gateway connects to the brokers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KafkaSecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaSecurityProtocol {
    /// librdkafka's name of the protocol.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSecurityProtocol::Plaintext => "plaintext",
            KafkaSecurityProtocol::Ssl => "ssl",
            KafkaSecurityProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaSecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            KafkaSecurityProtocol::SaslPlaintext | KafkaSecurityProtocol::SaslSsl
        )
    }

    pub fn uses_tls(self) -> bool {
        matches!(
            self,
            KafkaSecurityProtocol::Ssl | KafkaSecurityProtocol::SaslSsl
        )
    }
}

/// SASL mechanisms towards the brokers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub enum KafkaSaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    /// OAuth 2 bearer tokens from an OIDC token endpoint (client credentials grant), fetched
    /// and refreshed by librdkafka: Confluent Cloud, Event Hubs, and other managed clusters.
    #[serde(rename = "OAUTHBEARER")]
    OauthBearer,
}

impl KafkaSaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSaslMechanism::Plain => "PLAIN",
            KafkaSaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            KafkaSaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            KafkaSaslMechanism::OauthBearer => "OAUTHBEARER",
        }
    }
}

/// `[log.kafka.security]`: TLS and SASL towards the brokers.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSecurityConfig {
    pub protocol: KafkaSecurityProtocol,
    pub sasl_mechanism: Option<KafkaSaslMechanism>,
    pub sasl_username: Option<String>,
    pub sasl_password: Option<Secret>,
    /// CA bundle (PEM) to verify the brokers; the system's roots when unset.
    pub ssl_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS towards the brokers, with `ssl_key_file`.
    pub ssl_cert_file: Option<PathBuf>,
    pub ssl_key_file: Option<PathBuf>,
    pub ssl_key_password: Option<Secret>,
    /// Check that the broker's certificate names the host connected to (default true).
    pub ssl_verify_hostname: Option<bool>,
    /// `OAUTHBEARER`: the OIDC token endpoint (client credentials grant).
    pub oauthbearer_token_endpoint_url: Option<String>,
    pub oauthbearer_client_id: Option<String>,
    pub oauthbearer_client_secret: Option<Secret>,
    /// Scope asked for (space-separated), if the identity provider wants one.
    pub oauthbearer_scope: Option<String>,
    /// SASL extensions sent with the token, e.g. Confluent Cloud's `logicalCluster` and
    /// `identityPoolId`.
    pub oauthbearer_extensions: BTreeMap<String, String>,
}

/// `[log.kafka]`: the Kafka sink. One idempotent producer (acks=all) is shared by the process.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers to bootstrap from.
    pub bootstrap_servers: String,
    /// Topic of a stream: `{stream}` replaced by the stream name, e.g. `sluice.{stream}`.
    pub topic: String,
    /// Identifies the gateway's connections in broker logs and quotas.
    pub client_id: String,
    pub compression: KafkaCompression,
    /// How long the producer waits to fill a batch before sending it.
    pub linger_ms: u64,
    /// Largest record batch sent to one partition (librdkafka `batch.size`).
    pub batch_bytes: u64,
    /// Most events in one record batch (librdkafka `batch.num.messages`).
    pub batch_events: u64,
    /// An event not delivered within this long fails with a retryable error (includes retries).
    pub message_timeout_ms: u64,
    /// Bytes the producer may queue; past it new events get 503 (librdkafka
    /// `queue.buffering.max.kbytes`). `limits.max_in_flight_bytes` normally binds first.
    pub queue_max_bytes: u64,
    /// Events the producer may queue (librdkafka `queue.buffering.max.messages`).
    pub queue_max_events: u64,
    /// Create missing topics (declared streams at startup; others on first use when
    /// `streams.auto_create` is on) with the stream's `partitions` and `replication_factor`.
    pub create_topics: bool,
    /// Replication factor of topics Sluice creates.
    pub replication_factor: u32,
    /// Timeout of metadata and topic-creation requests.
    pub metadata_timeout_ms: u64,
    /// How often the brokers are probed for readiness (and a topic's partition count checked).
    pub health_check_interval_ms: u64,
    /// How often the partition counts of known topics are refreshed.
    pub metadata_refresh_ms: u64,
    pub security: KafkaSecurityConfig,
    /// Raw librdkafka producer properties, e.g. `"socket.keepalive.enable" = "true"`. Properties
    /// Sluice sets itself or relies on are refused (see docs/kafka.md).
    pub overrides: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic: "{stream}".into(),
            client_id: "sluice".into(),
            compression: KafkaCompression::Zstd,
            linger_ms: 5,
            batch_bytes: 1_000_000,
            batch_events: 10_000,
            message_timeout_ms: 30_000,
            queue_max_bytes: 1 << 30,
            queue_max_events: 1_000_000,
            create_topics: false,
            replication_factor: 1,
            metadata_timeout_ms: 5_000,
            health_check_interval_ms: 1_000,
            metadata_refresh_ms: 30_000,
            security: KafkaSecurityConfig::default(),
            overrides: BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    /// The librdkafka producer properties of this configuration: what Sluice sets itself
    /// (idempotence, acks=all, batching, security, …), then the raw overrides. The gateway's
    /// producer and the load generator's direct-to-Kafka peer both use exactly these.
    pub fn producer_properties(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut set = |k: &str, v: String| p.push((k.to_string(), v));
        set("bootstrap.servers", self.bootstrap_servers.clone());
        set("client.id", self.client_id.clone());
        set("enable.idempotence", "true".into());
        set("acks", "all".into());
        set("compression.codec", self.compression.as_str().into());
        set("linger.ms", self.linger_ms.to_string());
        set("batch.size", self.batch_bytes.to_string());
        set("batch.num.messages", self.batch_events.to_string());
        set("message.timeout.ms", self.message_timeout_ms.to_string());
        set(
            "queue.buffering.max.kbytes",
            self.queue_max_bytes.div_ceil(1024).to_string(),
        );
        set(
            "queue.buffering.max.messages",
            self.queue_max_events.to_string(),
        );
        // Sluice creates topics itself (log.kafka.create_topics); a metadata request must not.
        set("allow.auto.create.topics", "false".into());
        // Broker round-trip times for `sluice_kafka_broker_rtt_seconds` (an override wins; "0"
        // turns the statistics off).
        set("statistics.interval.ms", "10000".into());
        let s = &self.security;
        set("security.protocol", s.protocol.as_str().into());
        if let Some(m) = s.sasl_mechanism {
            set("sasl.mechanism", m.as_str().into());
        }
        if let Some(u) = &s.sasl_username {
            set("sasl.username", u.clone());
        }
        if let Some(pw) = &s.sasl_password {
            set("sasl.password", pw.0.clone());
        }
        if s.sasl_mechanism == Some(KafkaSaslMechanism::OauthBearer) {
            set("sasl.oauthbearer.method", "oidc".into());
            for (key, value) in [
                (
                    "sasl.oauthbearer.token.endpoint.url",
                    &s.oauthbearer_token_endpoint_url,
                ),
                ("sasl.oauthbearer.client.id", &s.oauthbearer_client_id),
                ("sasl.oauthbearer.scope", &s.oauthbearer_scope),
            ] {
                if let Some(v) = value {
                    set(key, v.clone());
                }
            }
            if let Some(secret) = &s.oauthbearer_client_secret {
                set("sasl.oauthbearer.client.secret", secret.0.clone());
            }
            if !s.oauthbearer_extensions.is_empty() {
                let ext: Vec<String> = s
                    .oauthbearer_extensions
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                set("sasl.oauthbearer.extensions", ext.join(","));
            }
        }
        for (key, path) in [
            ("ssl.ca.location", &s.ssl_ca_file),
            ("ssl.certificate.location", &s.ssl_cert_file),
            ("ssl.key.location", &s.ssl_key_file),
        ] {
            if let Some(path) = path {
                set(key, path.display().to_string());
            }
        }
        if let Some(pw) = &s.ssl_key_password {
            set("ssl.key.password", pw.0.clone());
        }
        if let Some(v) = s.ssl_verify_hostname {
            set(
                "ssl.endpoint.identification.algorithm",
                if v { "https" } else { "none" }.into(),
            );
        }
        for (key, value) in &self.overrides {
            set(key, value.clone());
        }
        p
    }
}

/// librdkafka properties Sluice sets from `[log.kafka]` itself, with the key to use instead.
pub const KAFKA_MANAGED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "log.kafka.bootstrap_servers"),
    ("metadata.broker.list", "log.kafka.bootstrap_servers"),
    ("client.id", "log.kafka.client_id"),
    ("compression.codec", "log.kafka.compression"),
    ("compression.type", "log.kafka.compression"),
    ("linger.ms", "log.kafka.linger_ms"),
    ("queue.buffering.max.ms", "log.kafka.linger_ms"),
    ("batch.size", "log.kafka.batch_bytes"),
    ("batch.num.messages", "log.kafka.batch_events"),
    ("message.timeout.ms", "log.kafka.message_timeout_ms"),
    ("delivery.timeout.ms", "log.kafka.message_timeout_ms"),
    ("queue.buffering.max.kbytes", "log.kafka.queue_max_bytes"),
    ("queue.buffering.max.messages", "log.kafka.queue_max_events"),
    ("security.protocol", "log.kafka.security.protocol"),
    ("sasl.mechanism", "log.kafka.security.sasl_mechanism"),
    ("sasl.mechanisms", "log.kafka.security.sasl_mechanism"),
    ("sasl.username", "log.kafka.security.sasl_username"),
    ("sasl.password", "log.kafka.security.sasl_password"),
    (
        "sasl.oauthbearer.method",
        "log.kafka.security.sasl_mechanism",
    ),
    (
        "sasl.oauthbearer.token.endpoint.url",
        "log.kafka.security.oauthbearer_token_endpoint_url",
    ),
    (
        "sasl.oauthbearer.client.id",
        "log.kafka.security.oauthbearer_client_id",
    ),
    (
        "sasl.oauthbearer.client.secret",
        "log.kafka.security.oauthbearer_client_secret",
    ),
    (
        "sasl.oauthbearer.scope",
        "log.kafka.security.oauthbearer_scope",
    ),
    (
        "sasl.oauthbearer.extensions",
        "log.kafka.security.oauthbearer_extensions",
    ),
    ("ssl.ca.location", "log.kafka.security.ssl_ca_file"),
    (
        "ssl.certificate.location",
        "log.kafka.security.ssl_cert_file",
    ),
    ("ssl.key.location", "log.kafka.security.ssl_key_file"),
    ("ssl.key.password", "log.kafka.security.ssl_key_password"),
    (
        "ssl.endpoint.identification.algorithm",
        "log.kafka.security.ssl_verify_hostname",
    ),
    (
        "allow.auto.create.topics",
        "log.kafka.create_topics (Sluice creates topics itself)",
    ),
    (
        "partitioner",
        "event keys (Sluice picks partitions with Kafka's murmur2 itself)",
    ),
];

/// Why a raw librdkafka override cannot be used with `streams`, if it cannot.
pub fn kafka_override_conflict(key: &str, value: &str, durable: bool) -> Option<String> {
    if let Some((_, instead)) = KAFKA_MANAGED_PROPERTIES.iter().find(|(k, _)| *k == key) {
        return Some(format!("`{key}` is set by Sluice; use {instead}"));
    }
    let v = value.trim().to_ascii_lowercase();
    match key {
        "enable.idempotence" if v != "true" && durable => Some(
            "idempotence cannot be turned off while a stream acks durably: retries could write \
             an acked event twice or out of order (set every stream's ack = \"received\" first)"
                .into(),
        ),
        "acks" | "request.required.acks" if v != "all" && v != "-1" && durable => Some(format!(
            "acks = {value} while a stream acks durably would ack events one broker failure can \
             lose; durable acks need acks = all"
        )),
        "delivery.report.only.error" if v == "true" => Some(
            "Sluice needs every delivery report to answer producers with partitions and offsets"
                .into(),
        ),
        "transactional.id" => Some("Sluice's producer is idempotent, not transactional".into()),
        _ => None,
    }
}

impl Config {
    pub(crate) fn validate_log(&self, p: &mut Problems) {
        p.at_least_one("log.flush_interval_ms", self.log.flush_interval_ms);
        p.at_least_one(
            "log.retention_check_interval_ms",
            self.log.retention_check_interval_ms,
        );
        if self.log.data_dir.as_os_str().is_empty() {
            p.add("log.data_dir", "must not be empty");
        }
        p.in_range("log.segment_bytes", self.log.segment_bytes, 4096, 1 << 31);
        p.in_range(
            "log.index_interval_bytes",
            self.log.index_interval_bytes,
            64,
            1 << 24,
        );
        p.in_range(
            "log.max_group_bytes",
            self.log.max_group_bytes,
            64 * 1024,
            1 << 30,
        );
        if self.log.kind == LogKind::Kafka {
            self.validate_kafka(p);
        }
        if self.any_spooled_stream() {
            let s = &self.log.spool;
            p.in_range("log.spool.max_bytes", s.max_bytes, 1 << 20, u64::MAX);
            p.in_range("log.spool.segment_bytes", s.segment_bytes, 4096, 1 << 31);
            p.in_range(
                "log.spool.max_in_flight_events",
                s.max_in_flight_events,
                1,
                1_000_000,
            );
            p.in_range(
                "log.spool.checkpoint_interval_ms",
                s.checkpoint_interval_ms,
                10,
                3_600_000,
            );
        }
    }

    fn validate_kafka(&self, p: &mut Problems) {
        let k = &self.log.kafka;
        let mut add = |key: &str, message: String| p.add(format!("log.kafka.{key}"), message);
        let servers: Vec<&str> = k.bootstrap_servers.split(',').map(str::trim).collect();
        if k.bootstrap_servers.trim().is_empty() {
            add("bootstrap_servers", "must name at least one broker".into());
        } else {
            for s in servers {
                let port = s.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
                if !matches!(port, Some((h, Ok(_))) if !h.is_empty()) {
                    add(
                        "bootstrap_servers",
                        format!("`{s}` is not a broker address like kafka-1:9092"),
                    );
                }
            }
        }
        match k.topic.matches("{stream}").count() {
            1 => {
                let rest = k.topic.replace("{stream}", "");
                if let Some(c) = rest
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
                {
                    add(
                        "topic",
                        format!(
                            "`{c}` cannot be part of a Kafka topic name (allowed: a-z A-Z 0-9 . _ -)"
                        ),
                    );
                } else if rest.len() > 200 {
                    add(
                        "topic",
                        "the template leaves too little of Kafka's 249 characters for stream names"
                            .into(),
                    );
                }
            }
            n => add(
                "topic",
                format!(
                    "must contain `{{stream}}` exactly once (found {n} times), e.g. `sluice.{{stream}}`"
                ),
            ),
        }
        if k.client_id.trim().is_empty() {
            add("client_id", "must not be empty".into());
        }
        // Events acked on receipt wait in the producer for up to the linger; librdkafka's flush
        // at shutdown usually sends them at once, but was seen to wait the linger out (1 close
        // in 3 on a loaded machine), so a linger past the drain deadline could lose them.
        let acks_on_receipt = self.streams.defaults.ack == AckMode::Received
            || self
                .streams
                .declare
                .values()
                .any(|o| o.apply(&self.streams.defaults).ack == AckMode::Received);
        if acks_on_receipt && k.linger_ms >= self.server.shutdown_timeout_ms {
            add(
                "linger_ms",
                format!(
                    "{} is not below server.shutdown_timeout_ms ({}): events acked on receipt (ack = \"received\") could still be lingering in the producer when the drain deadline ends the process",
                    k.linger_ms, self.server.shutdown_timeout_ms
                ),
            );
        }
        for (key, v, lo, hi) in [
            ("linger_ms", k.linger_ms, 0, 900_000),
            ("batch_bytes", k.batch_bytes, 1, i32::MAX as u64),
            ("batch_events", k.batch_events, 1, 1_000_000),
            (
                "message_timeout_ms",
                k.message_timeout_ms,
                1,
                i32::MAX as u64,
            ),
            (
                "queue_max_bytes",
                k.queue_max_bytes,
                1024,
                (i32::MAX as u64) * 1024,
            ),
            ("queue_max_events", k.queue_max_events, 1, i32::MAX as u64),
            ("replication_factor", k.replication_factor as u64, 1, 32_767),
            ("metadata_timeout_ms", k.metadata_timeout_ms, 1, 3_600_000),
            (
                "health_check_interval_ms",
                k.health_check_interval_ms,
                10,
                3_600_000,
            ),
            ("metadata_refresh_ms", k.metadata_refresh_ms, 10, 86_400_000),
        ] {
            if !(lo..=hi).contains(&v) {
                add(key, format!("{v} is outside the allowed {lo}..={hi}"));
            }
        }
        let sec = &k.security;
        if sec.protocol.uses_sasl() {
            if sec.sasl_mechanism.is_none() {
                add(
                    "security.sasl_mechanism",
                    format!(
                        "protocol {} needs one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER",
                        sec.protocol.as_str()
                    ),
                );
            }
            if sec.sasl_mechanism == Some(KafkaSaslMechanism::OauthBearer) {
                if sec.oauthbearer_token_endpoint_url.is_none()
                    || sec.oauthbearer_client_id.is_none()
                    || sec.oauthbearer_client_secret.is_none()
                {
                    add(
                        "security",
                        "OAUTHBEARER needs oauthbearer_token_endpoint_url, oauthbearer_client_id and oauthbearer_client_secret".into(),
                    );
                }
                if let Some(url) = &sec.oauthbearer_token_endpoint_url
                    && !(url.starts_with("https://") || url.starts_with("http://"))
                {
                    add(
                        "security.oauthbearer_token_endpoint_url",
                        "must be an http(s):// URL".into(),
                    );
                }
                if sec.sasl_username.is_some() || sec.sasl_password.is_some() {
                    add(
                        "security",
                        "OAUTHBEARER takes oauthbearer_* settings, not sasl_username and sasl_password".into(),
                    );
                }
            } else if sec.sasl_username.is_none() || sec.sasl_password.is_none() {
                add(
                    "security",
                    format!(
                        "protocol {} needs sasl_username and sasl_password",
                        sec.protocol.as_str()
                    ),
                );
            }
        } else if sec.sasl_mechanism.is_some()
            || sec.sasl_username.is_some()
            || sec.sasl_password.is_some()
        {
            add(
                "security",
                format!(
                    "SASL settings need protocol = \"sasl_plaintext\" or \"sasl_ssl\" (it is {})",
                    sec.protocol.as_str()
                ),
            );
        }
        let oauth = sec.oauthbearer_token_endpoint_url.is_some()
            || sec.oauthbearer_client_id.is_some()
            || sec.oauthbearer_client_secret.is_some()
            || sec.oauthbearer_scope.is_some()
            || !sec.oauthbearer_extensions.is_empty();
        if oauth && sec.sasl_mechanism != Some(KafkaSaslMechanism::OauthBearer) {
            add(
                "security",
                "oauthbearer_* settings need sasl_mechanism = \"OAUTHBEARER\"".into(),
            );
        }
        let tls_files = sec.ssl_ca_file.is_some()
            || sec.ssl_cert_file.is_some()
            || sec.ssl_key_file.is_some()
            || sec.ssl_key_password.is_some()
            || sec.ssl_verify_hostname.is_some();
        if tls_files && !sec.protocol.uses_tls() {
            add(
                "security",
                format!(
                    "ssl_* settings need protocol = \"ssl\" or \"sasl_ssl\" (it is {})",
                    sec.protocol.as_str()
                ),
            );
        }
        if sec.ssl_cert_file.is_some() != sec.ssl_key_file.is_some() {
            add(
                "security",
                "ssl_cert_file and ssl_key_file go together".into(),
            );
        }
        let durable = self.any_durable_stream();
        for (key, value) in &k.overrides {
            if let Some(why) = kafka_override_conflict(key, value, durable) {
                p.add(format!("log.kafka.overrides.\"{key}\""), why);
            }
        }
    }
}
