//! Quotas: GCRA rate limits (governor) on events/s and bytes/s with bursts, per stream, per
//! principal and per principal per stream. For each scope the first matching rule applies; all
//! three scopes apply to every request.
//!
//! A batch that is partly over quota is answered per event: the longest prefix of the batch that
//! fits every applicable bucket is admitted, the rest is refused with a retry hint computed from
//! the bucket that refused it. governor checks are all-or-nothing per call and consume only on
//! success, so the prefix is found by halving the chunk size; each successful chunk consumes
//! exactly its own events. When a later bucket admits less than an earlier one, the earlier one
//! has already counted the difference: a throttled producer loses that much of its allowance,
//! never more than one batch.
//!
//! A rule with `cluster = true` counts against a bucket in Redis shared by every gateway
//! instead ([`cluster`]).

mod cluster;

use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock, Reference};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use sluice_auth::glob_match;
use sluice_config::{QuotaDirection, QuotaPolicy, QuotaRule, QuotaScope, QuotasConfig};
use sluice_core::RateLimit;

use cluster::Shared;
pub use cluster::{Cluster, ClusterMetrics, MEMBERS_EVERY};

type Keyed<C> = RateLimiter<String, HashMapStateStore<String>, C, StateInformationMiddleware>;

struct Rule<C: Clock> {
    cfg: QuotaRule,
    events: Option<Keyed<C>>,
    bytes: Option<Keyed<C>>,
    /// The rule's buckets in Redis when it is cluster-wide (events, bytes).
    shared: Option<SharedBuckets<C>>,
    /// When idle keys were last swept (ms since the rule was made); sweeps are O(keys), so a
    /// full table of active keys must not make every request pay for one.
    last_sweep_ms: AtomicU64,
}

/// A cluster-wide rule's buckets in Redis.
struct SharedBuckets<C: Clock> {
    events: Option<Shared<C>>,
    bytes: Option<Shared<C>>,
}

/// Idle keys are swept at most this often per rule.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Every configured quota rule with its buckets.
pub struct Quotas<C: Clock = MonotonicClock> {
    rules: Vec<Rule<C>>,
    clock: C,
    start: C::Instant,
    max_keys: usize,
    cluster: Option<Arc<Cluster>>,
}

/// What the quotas decided for a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The first `admitted` events fit; the others do not.
    pub admitted: usize,
    /// When the first refused event could fit.
    pub retry_after: Duration,
    /// The scope of the rule that refused, if any refused.
    pub scope: Option<QuotaScope>,
    /// That rule's policy.
    pub policy: QuotaPolicy,
    /// The rule's limit, for the message.
    pub limit: String,
    /// Each applicable bucket's state after the check (the IETF `RateLimit` fields).
    pub limits: Vec<RateLimit>,
}

fn quota(per_sec: u32, burst: Option<u32>) -> Quota {
    let rate = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
    let burst = burst.and_then(NonZeroU32::new).unwrap_or(rate);
    Quota::per_second(rate).allow_burst(burst)
}

impl Quotas<MonotonicClock> {
    /// The rules of `cfg`; those with `cluster = true` share their buckets through `cluster`
    /// (counted locally when there is none: only with Redis as the state store is there one).
    pub fn new(cfg: &QuotasConfig, cluster: Option<Arc<Cluster>>) -> Self {
        let mut q = Self::with_clock(cfg, MonotonicClock);
        if let Some(c) = cluster {
            c.reconfigure(&cfg.cluster);
            let prefix = c.prefix().to_string();
            for r in &mut q.rules {
                if !r.cfg.cluster {
                    continue;
                }
                let shared = |unit: &str, per_sec: Option<u32>, burst: Option<u32>| {
                    per_sec.map(|p| {
                        Shared::new(
                            &prefix,
                            r.cfg.on,
                            r.cfg.scope,
                            unit,
                            p,
                            burst,
                            MonotonicClock,
                            cfg.max_tracked_keys,
                        )
                    })
                };
                r.shared = Some(SharedBuckets {
                    events: shared("events", r.cfg.events_per_sec, r.cfg.burst_events),
                    bytes: shared("bytes", r.cfg.bytes_per_sec, r.cfg.burst_bytes),
                });
            }
            q.cluster = Some(c);
        }
        q
    }
}

impl<C: Clock + Clone> Quotas<C> {
    /// With a given clock (tests use governor's fake clock); every rule counted locally.
    pub fn with_clock(cfg: &QuotasConfig, clock: C) -> Self {
        let rules = cfg
            .rules
            .iter()
            .map(|r| Rule {
                shared: None,
                cfg: r.clone(),
                events: r.events_per_sec.map(|e| {
                    Keyed::new(
                        quota(e, r.burst_events),
                        HashMapStateStore::default(),
                        clock.clone(),
                    )
                }),
                bytes: r.bytes_per_sec.map(|b| {
                    Keyed::new(
                        quota(b, r.burst_bytes),
                        HashMapStateStore::default(),
                        clock.clone(),
                    )
                }),
                last_sweep_ms: AtomicU64::new(0),
            })
            .collect();
        Self {
            rules,
            start: clock.now(),
            clock,
            max_keys: cfg.max_tracked_keys,
            cluster: None,
        }
    }

    /// Whether any rule is configured.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule limits reads.
    pub fn limits_reads(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.cfg.on == QuotaDirection::Consume)
    }

    /// For each scope, the first rule matching `stream` and `principal`, with its bucket key.
    /// Rules match the principal's `name`; buckets are keyed by its `identity` (source and name),
    /// so equal names from different authentication methods do not share a bucket.
    fn applicable<'a>(
        &'a self,
        on: QuotaDirection,
        principal: &'a str,
        identity: &'a str,
        stream: &'a str,
    ) -> impl Iterator<Item = (&'a Rule<C>, String)> + 'a {
        [
            QuotaScope::Stream,
            QuotaScope::Principal,
            QuotaScope::PrincipalStream,
        ]
        .into_iter()
        .filter_map(move |scope| {
            let rule = self.rules.iter().find(|r| {
                r.cfg.scope == scope
                    && r.cfg.on == on
                    && glob_match(&r.cfg.streams, stream)
                    && glob_match(&r.cfg.principals, principal)
            })?;
            let key = match scope {
                QuotaScope::Stream => stream.to_string(),
                QuotaScope::Principal => identity.to_string(),
                QuotaScope::PrincipalStream => format!("{identity}\u{0}{stream}"),
            };
            Some((rule, key))
        })
    }

    /// Counts `sizes` (one entry per event, in bytes) against every applicable bucket and says
    /// how many events, from the front, fit.
    pub async fn check(
        &self,
        principal: &str,
        identity: &str,
        stream: &str,
        sizes: &[usize],
    ) -> Verdict {
        self.check_on(QuotaDirection::Produce, principal, identity, stream, sizes)
            .await
    }

    /// [`Quotas::check`] for the rules of one direction (`consume`: reads, one size per record).
    pub async fn check_on(
        &self,
        on: QuotaDirection,
        principal: &str,
        identity: &str,
        stream: &str,
        sizes: &[usize],
    ) -> Verdict {
        let mut v = Verdict {
            admitted: sizes.len(),
            retry_after: Duration::ZERO,
            scope: None,
            policy: QuotaPolicy::Reject,
            limit: String::new(),
            limits: Vec::new(),
        };
        let mut prefix = Vec::with_capacity(sizes.len() + 1);
        prefix.push(0u64);
        for s in sizes {
            prefix.push(prefix.last().copied().unwrap_or(0) + *s as u64);
        }
        for (rule, key) in self.applicable(on, principal, identity, stream) {
            let (shared_events, shared_bytes) = match &rule.shared {
                Some(b) => (b.events.as_ref(), b.bytes.as_ref()),
                None => (None, None),
            };
            for (limiter, shared, unit, per_sec, burst) in [
                (
                    &rule.events,
                    shared_events,
                    "events",
                    rule.cfg.events_per_sec,
                    rule.cfg.burst_events,
                ),
                (
                    &rule.bytes,
                    shared_bytes,
                    "bytes",
                    rule.cfg.bytes_per_sec,
                    rule.cfg.burst_bytes,
                ),
            ] {
                let Some(l) = limiter else { continue };
                let weight = |r: Range<usize>| -> u64 {
                    if unit == "events" {
                        r.len() as u64
                    } else {
                        prefix[r.end] - prefix[r.start]
                    }
                };
                let checked = v.admitted > 0;
                let (k, wait, remaining) = match (shared, &self.cluster) {
                    (Some(shared), Some(cluster)) if checked => {
                        let t = shared.take(cluster, &key, v.admitted, weight).await;
                        (t.admitted, t.wait, t.remaining)
                    }
                    _ => {
                        self.sweep(rule, l);
                        take_prefix(&self.clock, l, &key, v.admitted, weight)
                    }
                };
                if checked {
                    v.limits
                        .push(rate_limit(rule.cfg.scope, unit, per_sec, burst, remaining));
                }
                if k < v.admitted {
                    v.admitted = k;
                    v.retry_after = wait;
                    v.scope = Some(rule.cfg.scope);
                    v.policy = rule.cfg.policy;
                    v.limit = format!("{} {unit}/s", per_sec.unwrap_or(0));
                }
            }
        }
        v
    }

    /// Drops idle keys (buckets full again) when the rule's table has reached
    /// `max_tracked_keys`, at most once per [`SWEEP_EVERY`]: between sweeps the table can grow
    /// by the keys that become active in that time, and keys whose buckets refilled go.
    fn sweep(&self, rule: &Rule<C>, l: &Keyed<C>) {
        if l.len() < self.max_keys {
            return;
        }
        let now_ms = self.clock.now().duration_since(self.start).as_u64() / 1_000_000;
        let last = rule.last_sweep_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= SWEEP_EVERY.as_millis() as u64;
        if due
            && rule
                .last_sweep_ms
                .compare_exchange(last, now_ms.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            l.retain_recent();
        }
    }
}

/// The longest prefix of `n` events that `l` admits for `key`; consumes exactly that prefix.
/// Also: how long until the first refused event could fit, and what is left of the burst
/// after the last admitted chunk (0 when none was).
fn take_prefix<C: Clock>(
    clock: &C,
    l: &Keyed<C>,
    key: &String,
    n: usize,
    weight: impl Fn(Range<usize>) -> u64,
) -> (usize, Duration, u64) {
    let (mut admitted, mut step, mut wait) = (0, n, Duration::ZERO);
    let mut remaining = 0;
    while step > 0 && admitted < n {
        let take = step.min(n - admitted);
        let amount = weight(admitted..admitted + take);
        let Some(amount) = NonZeroU32::new(amount.min(u64::from(u32::MAX)) as u32) else {
            admitted += take;
            continue;
        };
        match l.check_key_n(key, amount) {
            Ok(Ok(snapshot)) => {
                admitted += take;
                remaining = u64::from(snapshot.remaining_burst_capacity());
            }
            Ok(Err(not_until)) => {
                wait = not_until.wait_time_from(clock.now());
                step = take / 2;
            }
            Err(_insufficient) => {
                // More than the whole burst: this chunk can never pass at once. A single
                // event that large can never pass at all.
                wait = Duration::MAX;
                step = take / 2;
            }
        }
    }
    (admitted, wait, remaining)
}

/// A bucket's state in the terms of the IETF `RateLimit` fields: the burst is the quota, the
/// window the time the rate takes to refill it, and the reset the time until it is full again.
fn rate_limit(
    scope: QuotaScope,
    unit: &str,
    per_sec: Option<u32>,
    burst: Option<u32>,
    remaining: u64,
) -> RateLimit {
    let rate = u64::from(per_sec.unwrap_or(1).max(1));
    let quota = u64::from(burst.filter(|&b| b > 0).unwrap_or(rate as u32));
    let scope = match scope {
        QuotaScope::Stream => "stream",
        QuotaScope::Principal => "principal",
        QuotaScope::PrincipalStream => "principal-stream",
    };
    RateLimit {
        name: format!("{scope}-{unit}"),
        quota,
        window_secs: quota.div_ceil(rate).max(1),
        remaining: remaining.min(quota),
        reset_secs: (quota - remaining.min(quota)).div_ceil(rate),
    }
}

/// Rounds a wait up to whole milliseconds (at least 1 ms), capped at an hour.
pub fn hint(wait: Duration) -> Duration {
    let ms = wait.as_nanos().div_ceil(1_000_000).clamp(1, 3_600_000);
    Duration::from_millis(ms as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use governor::clock::FakeRelativeClock;

    impl<C: Clock + Clone> Quotas<C> {
        /// [`Quotas::check`] of local rules, which never wait.
        fn check_now(
            &self,
            principal: &str,
            identity: &str,
            stream: &str,
            sizes: &[usize],
        ) -> Verdict {
            self.check(principal, identity, stream, sizes)
                .now_or_never()
                .expect("local rules do not wait")
        }
    }

    fn rules(text: &str) -> QuotasConfig {
        sluice_config::Config::from_toml_str(text, "t", Vec::new())
            .unwrap()
            .quotas
    }

    #[test]
    fn gcra_admits_the_burst_then_the_rate_and_says_when() {
        let clock = FakeRelativeClock::default();
        let q = Quotas::with_clock(
            &rules("[[quotas.rules]]\nscope = \"stream\"\nevents_per_sec = 10\nburst_events = 5\n"),
            clock.clone(),
        );
        let v = q.check_now("p", "p", "s", &[1; 8]);
        assert_eq!(v.admitted, 5, "the burst");
        assert_eq!(v.scope, Some(QuotaScope::Stream));
        // The burst used up: 5 per 1 s window, none left, full again in 1 s.
        assert_eq!(
            v.limits,
            vec![RateLimit {
                name: "stream-events".into(),
                quota: 5,
                window_secs: 1,
                remaining: 0,
                reset_secs: 1,
            }]
        );
        assert_eq!(
            v.retry_after,
            Duration::from_millis(100),
            "one event per 100 ms"
        );
        assert_eq!(q.check_now("p", "p", "s", &[1]).admitted, 0);
        clock.advance(Duration::from_millis(300));
        assert_eq!(
            q.check_now("p", "p", "s", &[1; 8]).admitted,
            3,
            "300 ms = 3 events"
        );
        // Over one simulated second at the rate, exactly the rate is admitted.
        let mut admitted = 0;
        for _ in 0..100 {
            clock.advance(Duration::from_millis(10));
            admitted += q.check_now("p", "p", "s", &[1]).admitted;
        }
        assert_eq!(admitted, 10);
    }

    #[test]
    fn bytes_and_every_scope_apply_and_the_first_matching_rule_wins() {
        let clock = FakeRelativeClock::default();
        let q = Quotas::with_clock(
            &rules(
                r#"
                [[quotas.rules]]
                scope = "principal_stream"
                principals = "vip"
                events_per_sec = 1000
                [[quotas.rules]]
                scope = "principal_stream"
                events_per_sec = 2
                [[quotas.rules]]
                scope = "stream"
                streams = "big.*"
                bytes_per_sec = 100
                "#,
            ),
            clock.clone(),
        );
        // Each principal has its own bucket on a shared stream.
        assert_eq!(q.check_now("a", "a", "s", &[1; 5]).admitted, 2);
        assert_eq!(q.check_now("b", "b", "s", &[1; 5]).admitted, 2);
        assert_eq!(
            q.check_now("vip", "vip", "s", &[1; 5]).admitted,
            5,
            "first matching rule"
        );
        // Bytes: 100 bytes/s on big.* streams cuts the batch by size.
        let v = q.check_now("vip", "vip", "big.x", &[40, 40, 40]);
        assert_eq!(v.admitted, 2);
        assert_eq!(v.limit, "100 bytes/s");
        // An event larger than the whole burst can never pass.
        let v = q.check_now("vip", "vip", "big.y", &[101]);
        assert_eq!((v.admitted, v.retry_after), (0, Duration::MAX));
    }

    #[test]
    fn idle_keys_are_dropped_when_the_table_is_full() {
        let clock = FakeRelativeClock::default();
        let mut cfg = rules("[[quotas.rules]]\nscope = \"principal\"\nevents_per_sec = 10\n");
        cfg.max_tracked_keys = 10;
        let q = Quotas::with_clock(&cfg, clock.clone());
        for i in 0..10 {
            q.check_now(&format!("p{i}"), &format!("p{i}"), "s", &[1]);
        }
        clock.advance(Duration::from_secs(5)); // every bucket is full again: idle
        q.check_now("new", "new", "s", &[1]);
        let l = q.rules[0].events.as_ref().unwrap();
        assert!(l.len() <= 2, "idle keys were dropped: {}", l.len());
        // A full table is swept at most once a second: an idle key survives until then.
        let swept_at = l.len();
        clock.advance(Duration::from_millis(500)); // "new" has refilled: idle
        for i in 0..20 {
            q.check_now(&format!("busy{i}"), &format!("busy{i}"), "s", &[1; 10]); // empties each bucket: active
        }
        assert_eq!(
            l.len(),
            swept_at + 20,
            "no sweep within the second, idle key kept"
        );
        clock.advance(Duration::from_millis(600));
        q.check_now("late", "late", "s", &[1]);
        assert_eq!(
            l.len(),
            swept_at + 20,
            "the sweep dropped the idle key, kept the 20 active ones and added one"
        );
    }
}
