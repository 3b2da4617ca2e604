//! `[dedup]`: the window of keys that makes retries exactly-once (docs/exactly-once.md). Which
//! streams deduplicate, by which keys and over which window, is set per stream
//! (`streams.*.dedup*`); this section bounds the window as a whole.

use serde::Deserialize;

use crate::{Config, Problems};

/// Process-wide bounds of the dedup window.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// Most keys the window holds across every stream; past it the oldest key of any stream
    /// is forgotten first (about 200 bytes of memory each).
    pub max_entries: u64,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            max_entries: 1_000_000,
        }
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
}

impl Default for DedupKeys {
    fn default() -> Self {
        Self {
            id: true,
            idempotency_key: true,
        }
    }
}

impl<'de> Deserialize<'de> for DedupKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        let mut keys = DedupKeys {
            id: false,
            idempotency_key: false,
        };
        for n in names {
            match n.as_str() {
                "id" => keys.id = true,
                "idempotency_key" => keys.idempotency_key = true,
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "unknown dedup key `{other}`; expected `id` or `idempotency_key`"
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
    }
}
