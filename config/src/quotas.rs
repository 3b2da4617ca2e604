//! `[quotas]`: rate rules per stream and principal.

use serde::Deserialize;

use crate::{Config, Problems};

/// What a quota does with a request over it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum QuotaPolicy {
    /// Answer at once with a retry hint computed from the bucket.
    #[default]
    Reject,
    /// Hold the request until it fits, up to `quotas.max_delay_ms`, then reject.
    Delay,
}

/// What a quota rule limits: producing to streams (the default) or reading them.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum QuotaDirection {
    #[default]
    Produce,
    /// Reads (docs/consume.md): `bytes_per_sec` counts the records as sent, `events_per_sec`
    /// the records.
    Consume,
}

/// Which bucket a quota rule counts against.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum QuotaScope {
    /// One bucket per stream, shared by every principal.
    Stream,
    /// One bucket per principal, across streams.
    Principal,
    /// One bucket per principal and stream.
    PrincipalStream,
}

impl QuotaScope {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaScope::Stream => "stream",
            QuotaScope::Principal => "principal",
            QuotaScope::PrincipalStream => "principal_stream",
        }
    }
}

/// Rate limits (GCRA) on events and bytes.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QuotasConfig {
    /// Longest time a `delay` rule holds a request before rejecting it.
    pub max_delay_ms: u64,
    /// Buckets per rule past which idle ones (full again) are dropped, at most once a second.
    pub max_tracked_keys: usize,
    /// Principals named in throttling metrics; every other principal is counted as `other`.
    pub metrics_principals: Vec<String>,
    /// For each scope, the first rule matching the request's stream and principal applies; the
    /// three scopes all apply.
    pub rules: Vec<QuotaRule>,
    /// How rules with `cluster = true` are shared by the gateways (docs/quotas.md).
    pub cluster: ClusterQuotas,
}

/// `[quotas.cluster]`: rules with `cluster = true` count against one bucket per key in the
/// Redis of the state store (`[dedup.redis]`), shared by every gateway pointing at it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterQuotas {
    /// How many gateways share the quotas until Redis says how many do (each gateway says so
    /// every second): while Redis cannot be reached, each gateway admits `rate / gateways`.
    pub gateways: u32,
    /// `0`: every check takes exactly what the request needs from Redis (one round trip per
    /// request and rule). Otherwise a gateway takes a lease of `rate × lease_ms / 1000 /
    /// gateways` tokens at once and spends it locally for up to `lease_ms`, giving back what
    /// it did not use with its next call.
    pub lease_ms: u64,
}

impl Default for ClusterQuotas {
    fn default() -> Self {
        Self {
            gateways: 1,
            lease_ms: 100,
        }
    }
}

impl Default for QuotasConfig {
    fn default() -> Self {
        Self {
            max_delay_ms: 1000,
            max_tracked_keys: 100_000,
            metrics_principals: Vec::new(),
            rules: Vec::new(),
            cluster: ClusterQuotas::default(),
        }
    }
}

fn star() -> String {
    "*".into()
}

/// One quota rule.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    pub scope: QuotaScope,
    /// Producing (default) or reading.
    #[serde(default)]
    pub on: QuotaDirection,
    /// Glob pattern of the streams this rule applies to.
    #[serde(default = "star")]
    pub streams: String,
    /// Glob pattern of the principals this rule applies to.
    #[serde(default = "star")]
    pub principals: String,
    pub events_per_sec: Option<u32>,
    pub bytes_per_sec: Option<u32>,
    /// Events that may arrive at once (default: one second's worth).
    pub burst_events: Option<u32>,
    /// Bytes that may arrive at once (default: one second's worth).
    pub burst_bytes: Option<u32>,
    #[serde(default)]
    pub policy: QuotaPolicy,
    /// Shared by every gateway on the same Redis (`[quotas.cluster]`); needs
    /// `dedup.store = "redis"`.
    #[serde(default)]
    pub cluster: bool,
}

impl Config {
    pub(crate) fn validate_quotas(&self, p: &mut Problems) {
        for (i, r) in self.quotas.rules.iter().enumerate() {
            let at = |key: &str| format!("quotas.rules[{i}].{key}");
            if r.events_per_sec.is_none() && r.bytes_per_sec.is_none() {
                p.add(
                    at("events_per_sec"),
                    "a rule needs events_per_sec, bytes_per_sec or both",
                );
            }
            for (key, v) in [
                ("events_per_sec", r.events_per_sec),
                ("bytes_per_sec", r.bytes_per_sec),
                ("burst_events", r.burst_events),
                ("burst_bytes", r.burst_bytes),
            ] {
                if v == Some(0) {
                    p.add(at(key), "must be at least 1");
                }
            }
            if r.burst_events.is_some() && r.events_per_sec.is_none() {
                p.add(at("burst_events"), "needs events_per_sec");
            }
            if r.burst_bytes.is_some() && r.bytes_per_sec.is_none() {
                p.add(at("burst_bytes"), "needs bytes_per_sec");
            }
            if r.cluster && self.dedup.store != crate::DedupStore::Redis {
                p.add(
                    at("cluster"),
                    "a cluster-wide quota lives in the state store the gateways share: set dedup.store = \"redis\"",
                );
            }
        }
        p.in_range(
            "quotas.cluster.gateways",
            u64::from(self.quotas.cluster.gateways),
            1,
            10_000,
        );
        p.in_range(
            "quotas.cluster.lease_ms",
            self.quotas.cluster.lease_ms,
            0,
            10_000,
        );
        if self.quotas.max_tracked_keys == 0 {
            p.add("quotas.max_tracked_keys", "must be at least 1");
        }
    }
}
