//! Cluster-wide quotas: a rule with `cluster = true` counts against one GCRA bucket per key in
//! the Redis of the state store, shared by every gateway pointing at it (docs/quotas.md).
//!
//! The bucket is Redis's: one script call takes up to the tokens wanted (a partial grant when
//! fewer fit) on Redis's clock, so N gateways with unsynchronised clocks see one rate. With
//! `quotas.cluster.lease_ms = 0` every check asks Redis for exactly what the request needs.
//! Otherwise a gateway takes a **lease** — what the request needs plus `rate × lease_ms / 1000
//! / N` — and spends the rest locally until it is used up or `lease_ms` passes; an expired
//! lease's unused tokens are given back to the bucket with the gateway's next call for that
//! key. A lease never lets the cluster exceed the rate (every token was granted by Redis); what
//! it costs is admission that lags by up to one lease per gateway.
//!
//! When Redis cannot be reached, each gateway admits its local share: the rule's rate and burst
//! divided by the number of gateways (the last count Redis gave, else
//! `quotas.cluster.gateways`), with `sluice_quota_cluster_degraded` = 1 and one log line, until
//! a call succeeds again.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sluice_config::{ClusterQuotas, QuotaDirection, QuotaScope};
use tokio::time::Instant;

use super::{Keyed, quota};
use crate::dedup::DedupMetrics;
use crate::dedup::redis::RedisStore;

/// How long a gateway counts as sharing the quotas after it last said so (it says so every
/// [`MEMBERS_EVERY`]).
const MEMBER_TTL_MS: u64 = 5_000;
/// How often a gateway says it shares the quotas.
pub const MEMBERS_EVERY: Duration = Duration::from_secs(1);
/// How long a remainder taken without a lease (bytes left over when a request took fewer
/// than it was granted) is kept for the next request.
const REMAINDER_MS: u64 = 1_000;
/// The shortest retry hint given to a request refused while another asks Redis for its key.
const PROBE_HINT: Duration = Duration::from_millis(1);
/// How long one request's call for a throttled key keeps the others from calling.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Metrics of cluster-wide quotas (docs/metrics.md).
#[derive(Clone, Default)]
pub struct ClusterMetrics {
    pub calls: Family<CallLabels, Counter>,
    pub degraded: Gauge,
    pub gateways: Gauge,
    pub local_checks: Counter,
}

impl ClusterMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "quota_cluster_calls",
            "Calls to Redis for cluster-wide quota buckets, by result (ok, error)",
            self.calls.clone(),
        );
        registry.register(
            "quota_cluster_degraded",
            "1 while Redis cannot be reached and cluster-wide quotas are held by each gateway's local share (rate / gateways)",
            self.degraded.clone(),
        );
        registry.register(
            "quota_cluster_gateways",
            "Gateways sharing the cluster-wide quotas, as Redis last counted them (quotas.cluster.gateways until it has)",
            self.gateways.clone(),
        );
        registry.register(
            "quota_cluster_local_checks",
            "Cluster-wide quota checks decided by this gateway's local share because Redis could not be reached",
            self.local_checks.clone(),
        );
    }
}

/// What every cluster-wide bucket of a gateway shares: the Redis, the gateway count, the lease
/// length, and whether Redis answers. Outlives configuration reloads.
pub struct Cluster {
    store: Arc<RedisStore>,
    dedup_metrics: DedupMetrics,
    metrics: ClusterMetrics,
    configured: AtomicUsize,
    /// How many gateways Redis last counted (0: none yet).
    discovered: AtomicUsize,
    lease_ms: std::sync::atomic::AtomicU64,
    degraded: AtomicBool,
}

impl Cluster {
    pub fn new(
        store: Arc<RedisStore>,
        config: &ClusterQuotas,
        dedup_metrics: DedupMetrics,
        metrics: ClusterMetrics,
    ) -> Self {
        metrics.gateways.set(i64::from(config.gateways));
        Self {
            store,
            dedup_metrics,
            metrics,
            configured: AtomicUsize::new(config.gateways.max(1) as usize),
            discovered: AtomicUsize::new(0),
            lease_ms: config.lease_ms.into(),
            degraded: AtomicBool::new(false),
        }
    }

    /// Takes a reloaded `[quotas.cluster]`.
    pub fn reconfigure(&self, config: &ClusterQuotas) {
        self.configured
            .store(config.gateways.max(1) as usize, Ordering::Relaxed);
        self.lease_ms.store(config.lease_ms, Ordering::Relaxed);
        if self.discovered.load(Ordering::Relaxed) == 0 {
            self.metrics.gateways.set(i64::from(config.gateways));
        }
    }

    /// How many gateways share the quotas.
    pub fn gateways(&self) -> usize {
        match self.discovered.load(Ordering::Relaxed) {
            0 => self.configured.load(Ordering::Relaxed),
            n => n,
        }
    }

    /// The prefix of Sluice's keys in Redis.
    pub fn prefix(&self) -> &str {
        self.store.prefix()
    }

    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// Says this gateway shares the quotas (every [`MEMBERS_EVERY`]), or with `leave` that it
    /// no longer does (at drain), and learns how many do.
    pub async fn announce(&self, leave: bool) {
        if let Ok(n) = self
            .store
            .quota_members(MEMBER_TTL_MS, leave, &self.dedup_metrics)
            .await
            && !leave
        {
            let n = n.max(1);
            self.discovered.store(n, Ordering::Relaxed);
            self.metrics.gateways.set(n as i64);
        }
    }

    fn succeeded(&self) {
        self.metrics
            .calls
            .get_or_create(&CallLabels { result: "ok" })
            .inc();
        if self.degraded.swap(false, Ordering::Relaxed) {
            self.metrics.degraded.set(0);
            tracing::info!("cluster-wide quotas are shared through Redis again");
        }
    }

    fn failed(&self, why: &str) {
        self.metrics
            .calls
            .get_or_create(&CallLabels { result: "error" })
            .inc();
        if !self.degraded.swap(true, Ordering::Relaxed) {
            self.metrics.degraded.set(1);
            tracing::warn!(
                error = %why,
                gateways = self.gateways(),
                "Redis cannot be reached: each gateway holds cluster-wide quotas to its local share (rate / gateways) until it can"
            );
        }
    }
}

/// A lease: tokens granted by Redis and not spent yet.
struct Lease {
    balance: u64,
    expires: Instant,
    /// Until when Redis has no tokens for this key (its last retry hint).
    empty_until: Instant,
    /// Redis refused this key's last request that asked.
    throttled: bool,
    /// A request is asking Redis for this throttled key now (until then at the latest: a
    /// request dropped while it asks leaves no key refused for longer).
    probing: Option<Instant>,
}

/// One cluster-wide bucket of a rule (events or bytes), with this gateway's leases by key and
/// its local share for when Redis cannot be reached.
pub(super) struct Shared<C: Clock> {
    /// `{prefix}q:{direction}:{scope}:{unit}:`; a key's digest completes the Redis key.
    base: String,
    per_sec: u32,
    burst: u32,
    t_us: f64,
    tau_us: f64,
    leases: Mutex<HashMap<String, Lease>>,
    /// The local share's limiter, and the gateway count it was made for.
    local: Mutex<Option<(usize, Arc<Keyed<C>>)>>,
    clock: C,
    max_keys: usize,
    /// When the leases and the local share's table were last swept: a full table is swept at
    /// most once per [`super::SWEEP_EVERY`], not on every new key.
    swept: Mutex<Option<Instant>>,
}

/// What a check of one bucket decided.
pub(super) struct Taken {
    pub admitted: usize,
    pub wait: Duration,
    pub remaining: u64,
}

impl<C: Clock + Clone> Shared<C> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        prefix: &str,
        on: QuotaDirection,
        scope: QuotaScope,
        unit: &str,
        per_sec: u32,
        burst: Option<u32>,
        clock: C,
        max_keys: usize,
    ) -> Self {
        let per_sec = per_sec.max(1);
        let burst = burst.filter(|&b| b > 0).unwrap_or(per_sec);
        let t_us = 1_000_000.0 / f64::from(per_sec);
        let on = match on {
            QuotaDirection::Produce => "produce",
            QuotaDirection::Consume => "consume",
        };
        Self {
            base: format!("{prefix}q:{on}:{}:{unit}:", scope.as_str()),
            per_sec,
            burst,
            t_us,
            tau_us: t_us * f64::from(burst),
            leases: Mutex::new(HashMap::new()),
            local: Mutex::new(None),
            clock,
            max_keys,
            swept: Mutex::new(None),
        }
    }

    /// Whether a full table may be swept now (at most once per [`super::SWEEP_EVERY`]).
    fn sweep_due(&self, now: Instant) -> bool {
        let mut swept = self.swept.lock().expect("poisoned");
        if swept.is_some_and(|t| now.duration_since(t) < super::SWEEP_EVERY) {
            return false;
        }
        *swept = Some(now);
        true
    }

    fn redis_key(&self, key: &str) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        format!(
            "{}{}",
            self.base,
            crate::dedup::redis::hex(&d.as_ref()[..16])
        )
    }

    /// Takes the longest prefix of the `n` events that fits (`weight` of a range of them in
    /// tokens): from this gateway's lease first, then from Redis. After Redis refused a key,
    /// the key's requests are refused here until the retry hint it gave has passed: a
    /// producer over its quota costs Redis one call per hint, not one per request.
    pub(super) async fn take(
        &self,
        cluster: &Cluster,
        key: &str,
        n: usize,
        weight: impl Fn(Range<usize>) -> u64,
    ) -> Taken {
        let need = weight(0..n);
        let now = Instant::now();
        // What the lease holds moves to this request; an expired lease's rest goes back.
        let (have, back) = {
            let mut leases = self.leases.lock().expect("poisoned");
            match leases.get_mut(key) {
                Some(l) if l.expires > now && l.balance >= need => {
                    l.balance -= need;
                    return Taken {
                        admitted: n,
                        wait: Duration::ZERO,
                        remaining: l.balance,
                    };
                }
                Some(l) if l.empty_until > now || l.probing.is_some_and(|t| t > now) => {
                    // Refused by Redis a moment ago, or asked again by another request right
                    // now: what the lease holds is all there is. (An expired lease's rest
                    // stays, to be given back with the next call.)
                    let live = l.expires > now;
                    let admitted = prefix_within(n, if live { l.balance } else { 0 }, &weight);
                    if live {
                        l.balance -= weight(0..admitted);
                    }
                    let wait = if l.empty_until > now {
                        l.empty_until - now
                    } else {
                        let next = weight(admitted..admitted + 1) as f64;
                        Duration::from_micros((next * self.t_us) as u64).max(PROBE_HINT)
                    };
                    return Taken {
                        admitted,
                        wait,
                        remaining: if live { l.balance } else { 0 },
                    };
                }
                Some(l) => {
                    // After a refusal, one request at a time asks Redis again (the others are
                    // refused here meanwhile), so a throttled key's refusals do not all reach
                    // Redis the moment its hint passes.
                    l.probing = l.throttled.then(|| now + PROBE_TIMEOUT);
                    let rest = std::mem::take(&mut l.balance);
                    if l.expires > now {
                        (rest, 0)
                    } else {
                        (0, rest)
                    }
                }
                None => (0, 0),
            }
        };
        let lease_ms = cluster.lease_ms.load(Ordering::Relaxed);
        let chunk = if lease_ms == 0 {
            0
        } else {
            (u64::from(self.per_sec) * lease_ms)
                .div_ceil(1000 * cluster.gateways() as u64)
                .max(1)
        };
        let want = need - have + chunk;
        let (granted, tat_rel) = match cluster
            .store
            .quota_take(
                &self.redis_key(key),
                self.t_us,
                self.tau_us,
                want,
                back,
                &cluster.dedup_metrics,
            )
            .await
        {
            Ok(v) => {
                cluster.succeeded();
                v
            }
            Err(why) => {
                cluster.failed(&why);
                self.keep(key, have, now, lease_ms, None, false);
                return self.take_locally(cluster, key, n, weight);
            }
        };
        let have = have + granted;
        let admitted = prefix_within(n, have, &weight);
        let left = have - weight(0..admitted);
        let remaining = ((self.tau_us - tat_rel) / self.t_us).max(0.0) as u64 + left;
        let wait = if admitted < n {
            let next = weight(admitted..admitted + 1);
            if next > u64::from(self.burst) {
                Duration::MAX
            } else {
                // Until the bucket holds what the next event needs beyond what is left.
                let more = next.saturating_sub(left) as f64;
                let us = tat_rel + more * self.t_us - self.tau_us;
                Duration::from_micros(us.max(1.0) as u64)
            }
        } else {
            Duration::ZERO
        };
        let empty_until = (admitted < n && wait != Duration::MAX).then(|| now + wait);
        self.keep(key, left, now, lease_ms, empty_until, admitted == n);
        Taken {
            admitted,
            wait,
            remaining,
        }
    }

    /// Puts tokens this request holds and did not use back into the key's lease, and notes
    /// until when Redis has no more for it.
    fn keep(
        &self,
        key: &str,
        tokens: u64,
        now: Instant,
        lease_ms: u64,
        empty_until: Option<Instant>,
        admitted_all: bool,
    ) {
        let mut leases = self.leases.lock().expect("poisoned");
        if tokens == 0 && empty_until.is_none() {
            if let Some(l) = leases.get_mut(key) {
                l.probing = None;
                l.throttled &= !admitted_all;
            }
            return;
        }
        if leases.len() >= self.max_keys && !leases.contains_key(key) {
            // Expired leases go (their rest is not given back); a table of live leases keeps
            // its keys and this rest is dropped: the cluster only admits less for it.
            if self.sweep_due(now) {
                leases.retain(|_, l| l.expires > now || l.empty_until > now);
            }
            if leases.len() >= self.max_keys {
                return;
            }
        }
        let l = leases.entry(key.to_string()).or_insert(Lease {
            balance: 0,
            expires: now,
            empty_until: now,
            throttled: false,
            probing: None,
        });
        if tokens > 0 {
            l.balance += tokens;
            let ms = if lease_ms == 0 {
                REMAINDER_MS
            } else {
                lease_ms
            };
            l.expires = now + Duration::from_millis(ms);
        }
        l.probing = None;
        match empty_until {
            Some(t) => {
                l.empty_until = t;
                l.throttled = true;
            }
            None => l.throttled &= !admitted_all,
        }
    }

    /// The local share: the rule's rate and burst divided by the number of gateways.
    fn take_locally(
        &self,
        cluster: &Cluster,
        key: &str,
        n: usize,
        weight: impl Fn(Range<usize>) -> u64,
    ) -> Taken {
        cluster.metrics.local_checks.inc();
        let gateways = cluster.gateways();
        let limiter = {
            let mut local = self.local.lock().expect("poisoned");
            match &*local {
                Some((g, l)) if *g == gateways => l.clone(),
                _ => {
                    let share = |v: u32| (v as usize).div_ceil(gateways).max(1) as u32;
                    let l = Arc::new(Keyed::new(
                        quota(share(self.per_sec), Some(share(self.burst))),
                        governor::state::keyed::HashMapStateStore::default(),
                        self.clock.clone(),
                    ));
                    *local = Some((gateways, l.clone()));
                    l
                }
            }
        };
        if limiter.len() >= self.max_keys && self.sweep_due(Instant::now()) {
            limiter.retain_recent();
        }
        let key = key.to_string();
        let (admitted, wait, remaining) =
            super::take_prefix(&self.clock, &limiter, &key, n, weight);
        Taken {
            admitted,
            wait,
            remaining,
        }
    }
}

/// The longest prefix of `n` events whose weight fits in `have` (weights only grow with the
/// prefix, so a binary search finds it).
fn prefix_within(n: usize, have: u64, weight: &impl Fn(Range<usize>) -> u64) -> usize {
    let (mut lo, mut hi) = (0, n);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if weight(0..mid) <= have {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::prefix_within;

    #[test]
    fn the_prefix_within_a_grant_is_the_longest_that_fits() {
        let sizes = [476u64, 476, 476, 10];
        let weight = |r: std::ops::Range<usize>| sizes[r].iter().sum::<u64>();
        assert_eq!(prefix_within(4, 0, &weight), 0);
        assert_eq!(prefix_within(4, 475, &weight), 0);
        assert_eq!(prefix_within(4, 476, &weight), 1);
        assert_eq!(prefix_within(4, 1000, &weight), 2);
        assert_eq!(prefix_within(4, 1428, &weight), 3);
        assert_eq!(prefix_within(4, 1437, &weight), 3);
        assert_eq!(prefix_within(4, 1438, &weight), 4);
        assert_eq!(prefix_within(4, u64::MAX, &weight), 4);
    }
}
