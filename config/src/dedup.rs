//! `[dedup]`: the window of keys that makes retries exactly-once (docs/exactly-once.md). Which
//! streams deduplicate, by which keys and over which window, is set per stream
//! (`streams.*.dedup*`); this section bounds the window as a whole.

use serde::Deserialize;

use crate::{Config, Problems};

/// Where the dedup window lives and how large it may grow.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// `embedded` (in the gateway, rebuilt from the embedded log at start) or `redis` (shared
    /// by every gateway pointing at the same Redis).
    pub store: DedupStore,
    /// Most keys the embedded window holds across every stream; past it the oldest key of any
    /// stream is forgotten first (about 110 bytes of memory each). With Redis, its
    /// `maxmemory` (with `maxmemory-policy volatile-ttl`) bounds the window instead.
    pub max_entries: u64,
    pub redis: RedisConfig,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            store: DedupStore::Embedded,
            max_entries: 1_000_000,
            redis: RedisConfig::default(),
        }
    }
}

/// Which store holds the dedup window.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DedupStore {
    #[default]
    Embedded,
    Redis,
}

/// `[dedup.redis]`: the Redis that holds the dedup window of several gateways.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Connections to Redis; each carries many requests at once (pipelined).
    pub connections: usize,
    /// Deadline of connecting and of each command; past it the request is answered 503.
    pub timeout_ms: u64,
    /// Prefix of every key Sluice writes, so several deployments can share one Redis.
    pub key_prefix: String,
    /// Fault injection for tests of crashes between an append and its settlement: each
    /// settlement of stored keys waits this long first. Never set this in production.
    pub fault_settle_delay_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            connections: 4,
            timeout_ms: 500,
            key_prefix: "sluice:".into(),
            fault_settle_delay_ms: 0,
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        let url = match self.url.split_once('@') {
            Some((_, host)) => format!("redis://***@{host}"),
            None => self.url.clone(),
        };
        f.debug_struct("RedisConfig")
            .field("url", &url)
            .field("connections", &self.connections)
            .field("timeout_ms", &self.timeout_ms)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// Which of a request's keys identify its events for deduplication (`streams.*.dedup_keys`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupKeys {
    /// The event's own `id` (HTTP, WebSocket, gRPC; MQTT 5's `id` user property).
    pub id: bool,
    /// A request's key: HTTP `Idempotency-Key`, gRPC `idempotency_key`; each event of the
    /// request is known by the key and its index.
    pub idempotency_key: bool,
    /// MQTT QoS 1/2: the (client id, packet id) of a publish, so a resend with DUP set (after a
    /// lost PUBACK, or across a reconnect) is recognised.
    pub mqtt_packet: bool,
}

impl Default for DedupKeys {
    fn default() -> Self {
        Self {
            id: true,
            idempotency_key: true,
            mqtt_packet: true,
        }
    }
}

impl<'de> Deserialize<'de> for DedupKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut keys = DedupKeys {
            id: false,
            idempotency_key: false,
            mqtt_packet: false,
        };
        for n in names {
            match n.as_str() {
                "id" => keys.id = true,
                "idempotency_key" => keys.idempotency_key = true,
                "mqtt_packet" => keys.mqtt_packet = true,
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "unknown dedup key `{other}`; expected `id`, `idempotency_key` or `mqtt_packet`"
                    )));
                }
            }
        }
        Ok(keys)
    }
}

impl Config {
    pub(crate) fn validate_dedup(&self, p: &mut Problems) {
        p.in_range("dedup.max_entries", self.dedup.max_entries, 1, 100_000_000);
        let r = &self.dedup.redis;
        if self.dedup.store == DedupStore::Redis {
            if !(r.url.starts_with("redis://") || r.url.starts_with("redis+unix://")) {
                p.add(
                    "dedup.redis.url",
                    "must start with redis:// (or redis+unix://)",
                );
            }
            p.in_range("dedup.redis.connections", r.connections as u64, 1, 64);
            p.in_range("dedup.redis.timeout_ms", r.timeout_ms, 1, 60_000);
        }
    }
}
