//! The dedup window in Redis, shared by every gateway that points at it: a retry that lands on
//! another gateway is still recognised.
//!
//! The window of one principal on one stream is a few **generations**, each a Redis hash
//! `{prefix}dd:{stream}:{principal digest}:{n}` whose fields are the event keys (the key's kind
//! byte and its bytes) and whose values are `p:{deadline}:{instance}:{boot}:{n}` while the
//! original is in flight and `d:{partition}:{offset}` once it is stored. A hash `{…}:{digest}`
//! beside them names the current generation and when it began (each generation also holds one
//! empty field, made with it so that it expires from the start). New keys go into the current
//! generation; a lookup asks the newest first. The current generation is closed when it holds
//! half the principal's share (`dedup_principal_events`) or is half the stream's window
//! (`dedup_window_ms`) old, and the one three generations back is dropped whole (`UNLINK`): so
//! a principal keeps at least its share of newest keys and at most one and a half times it,
//! and every key is kept at least the window and at most one and a half times it. Dropping a
//! generation costs Redis nothing per key, where a sorted set per principal cost it a skip-list
//! insert and removal per event (about ten times the Redis CPU per event, measured: BENCHMARKS.md).
//!
//! One script call per request claims all of its keys (looks them up in each generation with
//! one `HMGET` and claims the new ones with one `HSET`), one settles them; scripts go by
//! `EVALSHA` (loaded again when Redis answers `NOSCRIPT`). The stream's and the whole
//! window's size are bounded by Redis's `maxmemory` (with `maxmemory-policy volatile-ttl`, the
//! generations nearest their expiry, i.e. the oldest, go first), not by `dedup_window_events`
//! and `dedup.max_entries`. A principal's keys live in keys sharing one prefix, which the
//! scripts name themselves: a Redis Cluster would need them in one slot (not supported).
//!
//! When Redis does not answer within `dedup.redis.timeout_ms`, requests to streams with dedup are
//! answered 503 (retryable): no event is stored without its key, so nothing acked is ever
//! stored twice, and nothing acked is lost. Connections are re-made at most once a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{RedisWrite, ToRedisArgs, Value};
use sluice_core::{Receipt, Rejection};
use tokio::time::Instant;

use super::{
    Claim, DedupMetrics, EvictLabels, Material, Position, Scope, Token as AnyToken, Waiter,
};

/// How long a claim holds its key if its gateway never settles it (it died): then a retry may
/// claim the key again. Longer than any retry waits ([`super::WAIT_FOR_ORIGINAL`]).
const PENDING_TTL_MS: u64 = 60_000;

/// After a failure, how long requests fail fast before a new connection is tried.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// How long a gateway's heartbeat (`{prefix}gw:{instance}` = its boot) outlives its last
/// refresh (every second, with the probe).
const HEARTBEAT_TTL_MS: u64 = 10_000;

/// Keys per claim script call.
const CHUNK: usize = 1000;

/// How many generations a principal's window keeps (the current one and two closed ones).
const GENERATIONS: u64 = 3;

/// What every script begins with: Redis's clock, and the current generation of a principal's
/// window (closing it first when it is full or old, and dropping the oldest).
const PRELUDE: &str = r"
local GENS = 3
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function spans(window, share)
  return math.max(1, math.ceil(window / (GENS - 1))), math.max(1, math.ceil(share / (GENS - 1)))
end
-- The current generation of the window at `base`: its key, its number, and how many keys its
-- closing forced out for the share. A generation is made with its expiry and an empty field
-- (so it exists, and expires, from the start: claims need not check), and the window's meta
-- with it: while claims come, a generation is closed at least every span, renewing the meta;
-- when they stop, the meta and the generations expire together.
local function current(base, now, window, share)
  local span, cap = spans(window, share)
  local meta = redis.call('HMGET', base, 'n', 's')
  local n = tonumber(meta[1])
  local evicted = 0
  local open = false
  if n == nil then
    n = 0
    open = true
  else
    local full = redis.call('HLEN', base .. ':' .. n) - 1 >= cap
    if full or now - tonumber(meta[2]) >= span then
      n = n + 1
      open = true
      local old = base .. ':' .. (n - GENS)
      if full then
        evicted = math.max(0, redis.call('HLEN', old) - 1)
      end
      redis.call('UNLINK', old)
    end
  end
  local cur = base .. ':' .. n
  if open then
    redis.call('HSET', base, 'n', n, 's', now)
    redis.call('PEXPIRE', base, window + span)
    redis.call('HSET', cur, '', '')
    redis.call('PEXPIRE', cur, window + span)
  end
  return cur, n, evicted
end
local function keep(key, window, share)
  if redis.call('PTTL', key) < 0 then
    local span = spans(window, share)
    redis.call('PEXPIRE', key, window + span)
  end
end
local function hset(key, pairs)
  for c = 1, #pairs, 2000 do
    redis.call('HSET', key, unpack(pairs, c, math.min(c + 1999, #pairs)))
  end
end
";

/// Claims a request's keys. KEYS: the window's base. ARGV: the claim's suffix
/// (`{instance}:{boot}:{n}`), window_ms, share, the claim's TTL, one flag per key (`1`: a new
/// MQTT publish that takes its key over), then the keys. Returns the claim's value, the
/// number of keys the share forced out, the current generation, then per key its value
/// (`false`: claimed now).
const CLAIM: &str = r"
local base = KEYS[1]
local window, share = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local cur, n, evicted = current(base, now, window, share)
local claim = 'p:' .. (now + tonumber(ARGV[4])) .. ':' .. ARGV[1]
local flags = ARGV[5]
local nk = #ARGV - 5
-- Each generation's values of every key, newest first (few keys are found: one HMGET of all of
-- them per generation costs less than building lists of the ones still open).
local found = {}
for g = n, math.max(0, n - GENS + 1), -1 do
  found[#found + 1] = redis.call('HMGET', base .. ':' .. g, unpack(ARGV, 6))
end
local out = {claim, evicted, n}
local pairs = {}
local claimed = {}
for i = 1, nk do
  local v = false
  if string.byte(flags, i) == 49 then
    for g = n - 1, math.max(0, n - GENS + 1), -1 do
      redis.call('HDEL', base .. ':' .. g, ARGV[i + 5])
    end
  else
    for g = 1, #found do
      v = found[g][i]
      if v then break end
    end
    if v and string.byte(v, 1) == 112 and tonumber(string.match(v, '^p:(%d+):')) < now then
      v = false
    end
  end
  if not v and claimed[ARGV[i + 5]] then
    -- The same key twice in one call (two requests claiming together): the second waits for
    -- the first, as for any original in flight.
    v = claim
  end
  out[i + 3] = v
  if not v then
    claimed[ARGV[i + 5]] = true
    pairs[#pairs + 1] = ARGV[i + 5]
    pairs[#pairs + 1] = claim
  end
end
if #pairs > 0 then
  hset(cur, pairs)
end
return out
";

/// Records stored keys. KEYS: a generation. ARGV: key, value pairs. A generation that is gone
/// (dropped for the share, or expired) is not made again: its keys are forgotten anyway.
const SETTLE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
end
return 0
";

/// Releases claims whose events failed (a retry may append), each only if it is still that
/// claim. KEYS: a generation. ARGV: key, claim pairs.
const RELEASE: &str = r"
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
";

/// Takes over a claim left by a gateway that restarted since (its log was reconciled, so the
/// event is not in it). KEYS: the generation. ARGV: the key, the old claim, the new claim's
/// suffix, its TTL. Returns the new claim, or false if the key changed meanwhile.
const TAKE_OVER: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  local claim = 'p:' .. (now_ms() + tonumber(ARGV[4])) .. ':' .. ARGV[3]
  redis.call('HSET', KEYS[1], ARGV[1], claim)
  return claim
end
return false
";

/// Marks stored the keys of events read back from the log at start. KEYS: the window's base.
/// ARGV: window_ms, share, then key, value pairs.
const RECONCILE: &str = r"
local window, share = tonumber(ARGV[1]), tonumber(ARGV[2])
local cur, n = current(KEYS[1], now_ms(), window, share)
-- Stored in the generation that holds the key's claim, if one does: a retry waiting on that
-- claim reads it there (and must find it stored, not take it over).
for i = 3, #ARGV, 2 do
  local at = cur
  for g = n, math.max(0, n - GENS + 1), -1 do
    local gen = KEYS[1] .. ':' .. g
    if redis.call('HEXISTS', gen, ARGV[i]) == 1 then
      at = gen
      break
    end
  end
  redis.call('HSET', at, ARGV[i], ARGV[i + 1])
end
keep(cur, window, share)
return 0
";

/// A cluster-wide quota bucket (GCRA on Redis's clock): KEYS[1] holds the bucket's theoretical
/// arrival time in microseconds since 2026-01-01T00:00:00Z (an epoch near
/// now, so a double resolves nanoseconds). ARGV: the emission interval T (µs per token), the tolerance τ (burst × T, µs),
/// tokens wanted, tokens given back (a lease's unused rest). Grants as many as fit, up to the
/// wanted number (a partial grant), and answers `{granted, TAT - now in µs}`; the caller
/// computes what is left and when the next token fits from T and τ.
const QUOTA_TAKE: &str = r"
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1767225600) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local back = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if back > 0 then tat = tat - back * T end
if tat < now then tat = now end
local fit = math.floor((now + tau - tat) / T + 1e-9)
local granted = math.max(0, math.min(want, fit))
tat = tat + granted * T
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {granted, string.format('%.3f', tat - now)}
";

/// Gateways sharing cluster-wide quotas: KEYS[1] is a sorted set of boots scored by when they
/// last said so (ms, Redis's clock); ARGV: this boot, how long a member counts without saying
/// so again, `1` to leave. Answers how many count now.
const MEMBERS: &str = r"
local now = now_ms()
local ttl = tonumber(ARGV[2])
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
";

/// A script, sent by its SHA-1 (`EVALSHA`).
struct Script {
    code: String,
    sha: String,
}

impl Script {
    fn new(body: &str) -> Self {
        let code = format!("{PRELUDE}{body}");
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, code.as_bytes());
        Self {
            sha: hex(d.as_ref()),
            code,
        }
    }

    fn cmd(&self, keys: &[&str]) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(&self.sha).arg(keys.len()).arg(keys);
        c
    }
}

struct Scripts {
    claim: Script,
    settle: Script,
    release: Script,
    take_over: Script,
    reconcile: Script,
    quota: Script,
    members: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            claim: Script::new(CLAIM),
            settle: Script::new(SETTLE),
            release: Script::new(RELEASE),
            take_over: Script::new(TAKE_OVER),
            reconcile: Script::new(RECONCILE),
            quota: Script::new(QUOTA_TAKE),
            members: Script::new(MEMBERS),
        }
    }

    fn all(&self) -> [&Script; 7] {
        [
            &self.claim,
            &self.settle,
            &self.release,
            &self.take_over,
            &self.reconcile,
            &self.quota,
            &self.members,
        ]
    }
}

/// An event key as a hash field: its kind byte, then its bytes (written straight into the
/// command, without a buffer of its own).
struct Field<'a>(u8, &'a [u8]);

impl ToRedisArgs for Field<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut w = out.writer_for_next_arg();
        let _ = w.write_all(&[self.0]);
        let _ = w.write_all(self.1);
    }
}

impl Material<'_> {
    fn field(&self) -> Field<'_> {
        Field(self.kind, self.bytes)
    }
}

/// A claimed key: the generation it was claimed in, the key, and the claim's value.
pub(crate) struct Token {
    generation: Arc<str>,
    kind: u8,
    bytes: bytes::Bytes,
    claim: Arc<str>,
}

impl Token {
    fn field(&self) -> Field<'_> {
        Field(self.kind, &self.bytes)
    }
}

/// A key held by an original in flight: where it is, and the claim found on it.
pub(crate) struct Held {
    generation: Arc<str>,
    kind: u8,
    bytes: bytes::Bytes,
}

pub struct RedisStore {
    client: redis::Client,
    /// Multiplexed connections, used round robin; `None` once one failed, until re-made.
    slots: Vec<Mutex<Option<MultiplexedConnection>>>,
    next: AtomicUsize,
    timeout: Duration,
    /// `fault_settle_delay_ms` (tests only).
    fault_settle_delay: Duration,
    prefix: String,
    /// Since the last failure: when a connection may be tried again, and why it failed.
    down: Mutex<Option<(Instant, String)>>,
    /// This gateway's claims are `p:{deadline}:{instance}:{boot}:{n}`. The instance is kept in
    /// its data directory, for gateways with an embedded log (which reconcile it into Redis at
    /// start); `-` for those without, whose claims are never taken over.
    instance: String,
    boot: String,
    nonces: AtomicU64,
    /// Set once this gateway's log was reconciled and its heartbeat may be published.
    announced: AtomicBool,
    scripts: Scripts,
    /// The queue of the claim task (started with the first claim).
    claims: std::sync::OnceLock<tokio::sync::mpsc::Sender<ClaimJob>>,
    /// The queue of the settle task, and how many settlements it holds.
    settles: std::sync::OnceLock<tokio::sync::mpsc::Sender<SettleJob>>,
    settling: Settling,
}

fn unavailable(why: &str) -> Rejection {
    Rejection::unavailable(
        Duration::from_secs(1),
        format!("the dedup store (Redis) cannot be reached: {why}; nothing was stored: retry"),
    )
}

impl RedisStore {
    pub(crate) fn new(
        config: &sluice_config::RedisConfig,
        instance: Option<String>,
    ) -> anyhow::Result<Self> {
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| anyhow::anyhow!("dedup.redis.url: {e}"))?;
        let mut seed = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| anyhow::anyhow!("no randomness for the dedup store's nonces"))?;
        Ok(Self {
            client,
            slots: (0..config.connections).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            timeout: Duration::from_millis(config.timeout_ms),
            fault_settle_delay: Duration::from_millis(config.fault_settle_delay_ms),
            prefix: config.key_prefix.clone(),
            down: Mutex::new(None),
            instance: instance.unwrap_or_else(|| "-".into()),
            boot: format!("{:016x}", u64::from_le_bytes(seed)),
            nonces: AtomicU64::new(0),
            announced: AtomicBool::new(false),
            scripts: Scripts::new(),
            claims: std::sync::OnceLock::new(),
            settles: std::sync::OnceLock::new(),
            settling: Settling::default(),
        })
    }

    /// A new claim's suffix (the script puts the deadline, on Redis's clock, before it).
    fn nonce(&self) -> String {
        format!(
            "{}:{}:{:x}",
            self.instance,
            self.boot,
            self.nonces.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn heartbeat_key(&self, instance: &str) -> String {
        format!("{}gw:{instance}", self.prefix)
    }

    /// The base of the window of `principal` on `stream` (its generations are `{base}:{n}`).
    fn base(&self, stream: &str, principal: &[u8]) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, principal);
        format!("{}dd:{stream}:{}", self.prefix, hex(&d.as_ref()[..16]))
    }

    /// A connection, made if its slot has none (failing fast for a second after a failure).
    async fn conn(&self) -> Result<(usize, MultiplexedConnection), String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        if let Some(c) = self.slots[i].lock().expect("slot poisoned").clone() {
            return Ok((i, c));
        }
        if let Some((until, why)) = self.down.lock().expect("poisoned").clone()
            && Instant::now() < until
        {
            return Err(why);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let made = tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await;
        match made {
            Ok(Ok(c)) => {
                *self.slots[i].lock().expect("slot poisoned") = Some(c.clone());
                Ok((i, c))
            }
            Ok(Err(e)) => Err(self.failed(i, e.to_string())),
            Err(_) => Err(self.failed(i, format!("no connection within {:?}", self.timeout))),
        }
    }

    /// Forgets the slot's connection and fails fast for a while; logs the first failure.
    fn failed(&self, i: usize, why: String) -> String {
        *self.slots[i].lock().expect("slot poisoned") = None;
        let mut down = self.down.lock().expect("poisoned");
        if down.is_none() {
            tracing::warn!(error = %why, "the dedup store (Redis) cannot be reached; streams with dedup answer 503 until it can");
        }
        *down = Some((Instant::now() + RECONNECT_AFTER, why.clone()));
        why
    }

    fn succeeded(&self, metrics: &DedupMetrics) {
        let mut down = self.down.lock().expect("poisoned");
        if down.take().is_some() {
            tracing::info!("the dedup store (Redis) answers again");
        }
        metrics.store_up.set(1);
    }

    /// Runs `pipe`, within the timeout; when Redis does not know a script (a restarted or
    /// another Redis), loads the scripts and runs it once more.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        op: &'static str,
        metrics: &DedupMetrics,
    ) -> Result<T, String> {
        let result = match self.conn().await {
            Ok((i, mut c)) => {
                let mut loaded = false;
                loop {
                    match tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut c)).await {
                        Ok(Ok(v)) => break Ok(v),
                        Ok(Err(e))
                            if !loaded
                                && e.kind()
                                    == redis::ErrorKind::Server(
                                        redis::ServerErrorKind::NoScript,
                                    ) =>
                        {
                            loaded = true;
                            let mut load = redis::pipe();
                            for s in self.scripts.all() {
                                load.cmd("SCRIPT").arg("LOAD").arg(&s.code).ignore();
                            }
                            if let Err(e) =
                                tokio::time::timeout(self.timeout, load.query_async::<()>(&mut c))
                                    .await
                                    .map_err(|_| format!("no answer within {:?}", self.timeout))
                                    .and_then(|r| r.map_err(|e| e.to_string()))
                            {
                                break Err(self.failed(i, e));
                            }
                        }
                        Ok(Err(e)) => break Err(self.failed(i, e.to_string())),
                        Err(_) => {
                            break Err(
                                self.failed(i, format!("no answer within {:?}", self.timeout))
                            );
                        }
                    }
                }
            }
            Err(why) => Err(why),
        };
        match &result {
            Ok(_) => self.succeeded(metrics),
            Err(_) => {
                metrics.store_error(op);
                metrics.store_up.set(0);
            }
        }
        result
    }

    /// Claims a request's keys. Requests claiming at the same time share script calls: the
    /// claims go through one task that takes whatever has queued while earlier calls were in
    /// flight (as a log's group commit does), one script call per stream and principal, so a
    /// script's fixed cost in Redis is paid once per group rather than once per request.
    pub(crate) async fn claim(
        self: &Arc<Self>,
        scope: &Scope<'_>,
        keys: &[&Material<'_>],
        metrics: &DedupMetrics,
    ) -> Result<Vec<Claim>, Rejection> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let s = scope.settings;
        let base: Arc<str> = Arc::from(self.base(scope.stream, scope.principal.as_bytes()));
        // The keys' bytes, copied once into one buffer that the job and the tokens share.
        let mut buf = bytes::BytesMut::with_capacity(keys.iter().map(|m| m.bytes.len()).sum());
        for m in keys {
            buf.extend_from_slice(m.bytes);
        }
        let buf = buf.freeze();
        let mut at = 0;
        let owned: Vec<bytes::Bytes> = keys
            .iter()
            .map(|m| {
                at += m.bytes.len();
                buf.slice(at - m.bytes.len()..at)
            })
            .collect();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = ClaimJob {
            base: base.clone(),
            window_ms: s.dedup_window_ms,
            share: s.dedup_principal_events,
            keys: keys
                .iter()
                .zip(&owned)
                .map(|(m, b)| (m.kind, b.clone(), m.replace))
                .collect(),
            reply,
        };
        let queue = self.claims_queue(metrics);
        let sent = tokio::time::timeout(self.timeout, queue.send(job)).await;
        if !matches!(sent, Ok(Ok(()))) {
            return Err(unavailable("the claims queue is full"));
        }
        let found = match tokio::time::timeout(self.timeout * 2, answer).await {
            Ok(Ok(Ok(found))) => found,
            Ok(Ok(Err(why))) => return Err(unavailable(&why)),
            _ => return Err(unavailable("no answer to the claims")),
        };
        let mut claims = Vec::with_capacity(keys.len());
        for ((m, f), bytes) in keys.iter().zip(found).zip(owned) {
            claims.push(match f.value {
                None => Claim::New(AnyToken::Redis(Box::new(Token {
                    generation: f.generation,
                    kind: m.kind,
                    bytes,
                    claim: f.claim,
                }))),
                Some(v) => match parse(&String::from_utf8_lossy(&v)) {
                    Some(p) => Claim::Done(p),
                    // Pending: wait where the lookup found it (the newest generation holding
                    // the key).
                    None => Claim::Wait(Waiter::Redis(Box::new(
                        self.locate(&base, m, &v, metrics).await?,
                    ))),
                },
            });
        }
        Ok(claims)
    }

    /// The queue of the task that makes the claims, started with the first claim.
    fn claims_queue(
        self: &Arc<Self>,
        metrics: &DedupMetrics,
    ) -> &tokio::sync::mpsc::Sender<ClaimJob> {
        self.claims.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(CLAIM_QUEUE);
            tokio::spawn(group_loop(
                Arc::downgrade(self),
                rx,
                metrics.clone(),
                |store, jobs, metrics| async move { store.claim_group(jobs, &metrics).await },
            ));
            tx
        })
    }

    /// Which generation holds the pending claim `v` of `m` (rare: a retry of an original in
    /// flight), newest first.
    async fn locate(
        &self,
        base: &str,
        m: &Material<'_>,
        v: &[u8],
        metrics: &DedupMetrics,
    ) -> Result<Held, Rejection> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGET").arg(base).arg("n");
        let (n,): (Option<u64>,) = self
            .query(&pipe, "wait", metrics)
            .await
            .map_err(|why| unavailable(&why))?;
        let n = n.unwrap_or(0);
        let mut pipe = redis::pipe();
        let gens: Vec<u64> = (n.saturating_sub(GENERATIONS - 1)..=n).rev().collect();
        for g in &gens {
            pipe.cmd("HGET").arg(format!("{base}:{g}")).arg(m.field());
        }
        let found: Vec<Option<Vec<u8>>> = self
            .query(&pipe, "wait", metrics)
            .await
            .map_err(|why| unavailable(&why))?;
        let g = gens
            .iter()
            .zip(found)
            .find(|(_, f)| f.as_deref() == Some(v))
            .map_or(n, |(g, _)| *g);
        Ok(Held {
            generation: Arc::from(format!("{base}:{g}")),
            kind: m.kind,
            bytes: bytes::Bytes::copy_from_slice(m.bytes),
        })
    }

    /// Polls a key held by an original in flight (on this gateway or another) until it is
    /// stored (`Done`), released or expired (`None`: claim again), or the deadline passes
    /// (`Err`). A claim left by a gateway that has restarted since (its heartbeat names another
    /// boot) is taken over (`New`): that gateway reconciled its log into Redis before its new
    /// heartbeat, so the claim's event is not in the log.
    pub(crate) async fn wait(
        &self,
        held: &Held,
        deadline: Instant,
        metrics: &DedupMetrics,
    ) -> Result<Option<Claim>, ()> {
        let field = Field(held.kind, &held.bytes);
        let mut pause = Duration::from_millis(2);
        loop {
            let mut pipe = redis::pipe();
            pipe.cmd("HGET").arg(&*held.generation).arg(&field);
            pipe.cmd("TIME");
            let (value, (secs, micros)): (Option<String>, (u64, u64)) =
                self.query(&pipe, "wait", metrics).await.map_err(|_| ())?;
            let Some(value) = value else {
                return Ok(None);
            };
            if let Some(p) = parse(&value) {
                return Ok(Some(Claim::Done(p)));
            }
            let Some(pending) = owner(&value) else {
                return Ok(None);
            };
            if pending.deadline_ms < secs * 1000 + micros / 1000 {
                return Ok(None);
            }
            if pending.instance != "-" {
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(self.heartbeat_key(pending.instance));
                let (beat,): (Option<String>,) =
                    self.query(&pipe, "wait", metrics).await.map_err(|_| ())?;
                if beat.is_some_and(|b| b != pending.boot) {
                    let mut cmd = self.scripts.take_over.cmd(&[&held.generation]);
                    cmd.arg(&field)
                        .arg(&value)
                        .arg(self.nonce())
                        .arg(PENDING_TTL_MS);
                    let mut pipe = redis::pipe();
                    pipe.add_command(cmd);
                    let (taken,): (Option<String>,) =
                        self.query(&pipe, "wait", metrics).await.map_err(|_| ())?;
                    if let Some(claim) = taken {
                        metrics.taken_over.inc();
                        return Ok(Some(Claim::New(AnyToken::Redis(Box::new(Token {
                            generation: held.generation.clone(),
                            kind: held.kind,
                            bytes: held.bytes.clone(),
                            claim: Arc::from(claim),
                        })))));
                    }
                    continue;
                }
            }
            if Instant::now() + pause > deadline {
                return Err(());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Marks stored the keys of events read back from this gateway's embedded log at start
    /// (events stored before a crash whose keys were still claimed), then publishes this boot's
    /// heartbeat, from which other gateways learn that its older claims are not in its log.
    pub(crate) async fn reconcile(
        &self,
        events: &[super::Restored],
        metrics: &DedupMetrics,
    ) -> Result<(), String> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Per window: its settings and the (key, value) pairs, oldest first.
        type Pairs<'a> = (u64, u64, Vec<(Material<'a>, String)>);
        let mut windows: HashMap<String, Pairs<'_>> = HashMap::new();
        for e in events {
            let Some(m) = Material::of_record(
                &e.settings,
                e.id.as_deref(),
                e.request_key.as_deref(),
                e.mqtt_packet.as_deref(),
            ) else {
                continue;
            };
            if e.settings.dedup_window_ms as i64 - (now_ms - e.ts_ms).max(0) <= 0 {
                continue;
            }
            let w = windows
                .entry(self.base(&e.stream, &e.principal))
                .or_insert_with(|| {
                    (
                        e.settings.dedup_window_ms,
                        e.settings.dedup_principal_events,
                        Vec::new(),
                    )
                });
            w.2.push((m, stored_value(e.position)));
        }
        for (base, (window, share, pairs)) in &windows {
            for chunk in pairs.chunks(1000) {
                let mut cmd = self.scripts.reconcile.cmd(&[base]);
                cmd.arg(window).arg(share);
                for (m, v) in chunk {
                    cmd.arg(m.field()).arg(v);
                }
                let mut pipe = redis::pipe();
                pipe.add_command(cmd).ignore();
                self.query::<()>(&pipe, "reconcile", metrics).await?;
            }
        }
        self.announced.store(true, Ordering::SeqCst);
        self.heartbeat(metrics).await;
        Ok(())
    }

    /// Refreshes this boot's heartbeat, once the log is reconciled.
    async fn heartbeat(&self, metrics: &DedupMetrics) {
        if self.instance == "-" || !self.announced.load(Ordering::SeqCst) {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.heartbeat_key(&self.instance))
            .arg(&self.boot)
            .arg("PX")
            .arg(HEARTBEAT_TTL_MS)
            .ignore();
        let _ = self.query::<()>(&pipe, "probe", metrics).await;
    }

    /// Records the outcome of a request's claims: failed ones are released at once; stored
    /// ones are queued for the settle task, which merges what queued meanwhile into one `HSET`
    /// per generation. The producer's answer does not wait for it: a retry that comes first
    /// finds the key claimed and waits, as for any original in flight. [`RedisStore::settled`]
    /// waits until the queue is empty (a drain does).
    pub(crate) async fn settle(
        self: &Arc<Self>,
        claims: Vec<Option<AnyToken>>,
        receipts: &[Receipt],
        metrics: &DedupMetrics,
    ) {
        // Per generation (nearly always one): the stored keys.
        let mut jobs: Vec<SettleJob> = Vec::new();
        let mut failed = Vec::new();
        for (i, claim) in claims.into_iter().enumerate() {
            let Some(AnyToken::Redis(t)) = claim else {
                continue;
            };
            match receipts.get(i).and_then(Position::of) {
                Some(p) => {
                    let j = match jobs.iter().position(|j| j.generation == t.generation) {
                        Some(j) => j,
                        None => {
                            jobs.push(SettleJob {
                                generation: t.generation.clone(),
                                pairs: Vec::new(),
                            });
                            jobs.len() - 1
                        }
                    };
                    jobs[j].pairs.push((t.kind, t.bytes, stored_value(p)));
                }
                None => failed.push(Some(AnyToken::Redis(t))),
            }
        }
        if !failed.is_empty() {
            self.release(failed, metrics).await;
        }
        for job in jobs {
            self.settling.n.fetch_add(1, Ordering::SeqCst);
            let queue = self.settles_queue(metrics);
            if queue.send(job).await.is_err() {
                self.settled_one();
            }
        }
    }

    fn settles_queue(
        self: &Arc<Self>,
        metrics: &DedupMetrics,
    ) -> &tokio::sync::mpsc::Sender<SettleJob> {
        self.settles.get_or_init(|| {
            let (tx, rx) = tokio::sync::mpsc::channel(CLAIM_QUEUE);
            tokio::spawn(group_loop(
                Arc::downgrade(self),
                rx,
                metrics.clone(),
                |store, jobs, metrics| async move { store.settle_group(jobs, &metrics).await },
            ));
            tx
        })
    }

    fn settled_one(&self) {
        if self.settling.n.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.settling.idle.notify_waiters();
        }
    }

    /// Waits until every queued settlement was sent to Redis (or failed).
    pub(crate) async fn settled(&self) {
        loop {
            let idle = self.settling.idle.notified();
            if self.settling.n.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Records one group of settlements: one script call per generation and [`CHUNK`] keys.
    async fn settle_group(&self, jobs: Vec<SettleJob>, metrics: &DedupMetrics) {
        if !self.fault_settle_delay.is_zero() {
            tokio::time::sleep(self.fault_settle_delay).await;
        }
        let mut calls: Calls = Vec::new();
        for job in &jobs {
            for (kind, bytes, value) in &job.pairs {
                cmd_for(&mut calls, &job.generation, || {
                    self.scripts.settle.cmd(&[&job.generation])
                })
                .arg(Field(*kind, bytes))
                .arg(value);
            }
        }
        let mut pipe = redis::pipe();
        for (_, _, c) in calls {
            pipe.add_command(c).ignore();
        }
        if let Err(why) = self.query::<()>(&pipe, "settle", metrics).await {
            // The events are stored; their keys stay pending until PENDING_TTL_MS, so a retry
            // meanwhile waits and is then answered 503; after it, a retry is appended.
            tracing::warn!(error = %why, "could not record stored events in the dedup store; their retries may be stored again after 60 s");
        }
        for _ in &jobs {
            self.settled_one();
        }
    }

    /// Releases claims whose events never reached the log.
    pub(crate) async fn release(&self, claims: Vec<Option<AnyToken>>, metrics: &DedupMetrics) {
        let mut failed: Calls = Vec::new();
        for claim in claims.into_iter().flatten() {
            if let AnyToken::Redis(t) = claim {
                let c = cmd_for(&mut failed, &t.generation, || {
                    self.scripts.release.cmd(&[&t.generation])
                });
                c.arg(t.field()).arg(&*t.claim);
            }
        }
        if failed.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        for (_, _, c) in failed {
            pipe.add_command(c).ignore();
        }
        let _ = self.query::<()>(&pipe, "release", metrics).await;
    }

    /// Asks Redis whether it answers (the probe behind `/readyz` and `sluice_dedup_store_up`).
    pub(crate) async fn probe(&self, metrics: &DedupMetrics) {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        if self
            .query::<(String,)>(&pipe, "probe", metrics)
            .await
            .is_ok()
        {
            self.heartbeat(metrics).await;
        }
    }

    /// The prefix of every key Sluice writes in this Redis.
    /// This boot's id (its claims carry it).
    pub(crate) fn boot(&self) -> &str {
        &self.boot
    }

    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Takes up to `want` tokens from the cluster-wide quota bucket `key` (emission interval
    /// `t_us`, tolerance `tau_us`), first giving `back` unused ones back. Answers the tokens
    /// granted and the bucket's theoretical arrival time relative to now (µs).
    pub(crate) async fn quota_take(
        &self,
        key: &str,
        t_us: f64,
        tau_us: f64,
        want: u64,
        back: u64,
        metrics: &DedupMetrics,
    ) -> Result<(u64, f64), String> {
        let mut pipe = redis::pipe();
        pipe.add_command(
            self.scripts
                .quota
                .cmd(&[key])
                .arg(t_us)
                .arg(tau_us)
                .arg(want)
                .arg(back)
                .to_owned(),
        );
        let ((granted, tat),): ((u64, String),) = self.query(&pipe, "quota", metrics).await?;
        Ok((granted, tat.parse().unwrap_or(0.0)))
    }

    /// Says this gateway shares cluster-wide quotas (or, with `leave`, no longer does) and
    /// answers how many gateways do.
    pub(crate) async fn quota_members(
        &self,
        ttl_ms: u64,
        leave: bool,
        metrics: &DedupMetrics,
    ) -> Result<usize, String> {
        let key = format!("{}qm", self.prefix);
        let member = format!("{}:{}", self.instance, self.boot);
        let mut pipe = redis::pipe();
        pipe.add_command(
            self.scripts
                .members
                .cmd(&[&key])
                .arg(member)
                .arg(ttl_ms)
                .arg(if leave { "1" } else { "0" })
                .to_owned(),
        );
        let (n,): (usize,) = self.query(&pipe, "quota_members", metrics).await?;
        Ok(n)
    }

    pub(crate) fn health(&self) -> Result<(), String> {
        match &*self.down.lock().expect("poisoned") {
            None => Ok(()),
            Some((_, why)) => Err(format!("the dedup store (Redis) cannot be reached: {why}")),
        }
    }
}

/// Claims in one queue, at most this many waiting (then a claim waits to be queued, within
/// the Redis timeout).
const CLAIM_QUEUE: usize = 4096;
/// At most this many queued requests share one round trip.
const CLAIM_GROUP: usize = 256;

/// One request's keys to claim, and where its answer goes.
struct ClaimJob {
    base: Arc<str>,
    window_ms: u64,
    share: u64,
    keys: Vec<(u8, bytes::Bytes, bool)>,
    reply: tokio::sync::oneshot::Sender<Result<Vec<Found>, String>>,
}

/// What the claim script answered for one key: the call's claim value, the generation it
/// claimed in, and the key's value if it was already held (`None`: claimed now).
struct Found {
    claim: Arc<str>,
    generation: Arc<str>,
    value: Option<Vec<u8>>,
}

/// The claim and the settle tasks: each takes the first queued job, then whatever else has
/// queued meanwhile (up to [`CLAIM_GROUP`]), and runs them as one group — one pipeline — on a
/// task of its own, so that up to `dedup.redis.connections` groups are in flight at once. Ends
/// when the store is dropped.
async fn group_loop<J, F, Fut>(
    store: std::sync::Weak<RedisStore>,
    mut rx: tokio::sync::mpsc::Receiver<J>,
    metrics: DedupMetrics,
    run: F,
) where
    J: Send + 'static,
    F: Fn(Arc<RedisStore>, Vec<J>, DedupMetrics) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(connections) = store.upgrade().map(|s| s.slots.len()) else {
        return;
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(connections));
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut jobs = vec![first];
        while jobs.len() < CLAIM_GROUP {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else {
            return;
        };
        let group = run(store, jobs, metrics.clone());
        tokio::spawn(async move {
            group.await;
            drop(permit);
        });
    }
}

impl RedisStore {
    /// Runs one group of claims and answers each request.
    async fn claim_group(&self, jobs: Vec<ClaimJob>, metrics: &DedupMetrics) {
        // Per stream and principal (in order of first appearance): its keys, each with the
        // request and the index it answers.
        let mut groups: Vec<(usize, Vec<(usize, usize)>)> = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            let g = match groups
                .iter()
                .position(|(first, _)| jobs[*first].base == job.base)
            {
                Some(g) => g,
                None => {
                    groups.push((j, Vec::new()));
                    groups.len() - 1
                }
            };
            groups[g].1.extend((0..job.keys.len()).map(|k| (j, k)));
        }
        let mut pipe = redis::pipe();
        let mut calls: Vec<Call<'_>> = Vec::new();
        for (first, keys) in &groups {
            let head = &jobs[*first];
            for chunk in keys.chunks(CHUNK) {
                let flags: Vec<u8> = chunk
                    .iter()
                    .map(|&(j, k)| if jobs[j].keys[k].2 { b'1' } else { b'0' })
                    .collect();
                let mut cmd = self.scripts.claim.cmd(&[&head.base]);
                cmd.arg(self.nonce())
                    .arg(head.window_ms)
                    .arg(head.share)
                    .arg(PENDING_TTL_MS)
                    .arg(flags);
                for &(j, k) in chunk {
                    let (kind, bytes, _) = &jobs[j].keys[k];
                    cmd.arg(Field(*kind, bytes));
                }
                pipe.add_command(cmd);
                calls.push((&head.base, chunk));
            }
        }
        let answered: Result<Vec<Vec<Found>>, String> = async {
            let replies: Vec<Vec<Value>> = self.query(&pipe, "claim", metrics).await?;
            if replies.len() != calls.len() {
                return Err("an unexpected answer to the claim script".to_string());
            }
            let mut found: Vec<Vec<Option<Found>>> = jobs
                .iter()
                .map(|j| (0..j.keys.len()).map(|_| None).collect())
                .collect();
            for (reply, (base, chunk)) in replies.into_iter().zip(&calls) {
                let bad = || "an unexpected answer to the claim script".to_string();
                let mut reply = reply.into_iter();
                let claim: Arc<str> = match reply.next() {
                    Some(Value::BulkString(b)) => Arc::from(String::from_utf8_lossy(&b).as_ref()),
                    _ => return Err(bad()),
                };
                let evicted = match reply.next() {
                    Some(Value::Int(n)) => n.max(0) as u64,
                    _ => return Err(bad()),
                };
                let generation: Arc<str> = match reply.next() {
                    Some(Value::Int(n)) => Arc::from(format!("{base}:{n}")),
                    _ => return Err(bad()),
                };
                if evicted > 0 {
                    metrics
                        .evictions
                        .get_or_create(&EvictLabels {
                            reason: "principal_share",
                        })
                        .inc_by(evicted);
                }
                for &(j, k) in chunk.iter() {
                    let value = match reply.next() {
                        Some(Value::Nil) => None,
                        Some(Value::BulkString(b)) => Some(b),
                        _ => return Err(bad()),
                    };
                    found[j][k] = Some(Found {
                        claim: claim.clone(),
                        generation: generation.clone(),
                        value,
                    });
                }
            }
            found
                .into_iter()
                .map(|keys| {
                    keys.into_iter()
                        .collect::<Option<Vec<Found>>>()
                        .ok_or_else(bad_len)
                })
                .collect()
        }
        .await;
        match answered {
            Ok(found) => {
                let mut orphans = Vec::new();
                for (job, found) in jobs.into_iter().zip(found) {
                    // A request that stopped waiting (its deadline passed) leaves the keys it
                    // claimed to nobody: release them, so its retry need not wait for the
                    // claims' expiry.
                    if let Err(Ok(found)) = job.reply.send(Ok(found)) {
                        orphans.extend(job.keys.into_iter().zip(found).filter_map(
                            |((kind, bytes, _), f)| {
                                f.value.is_none().then(|| {
                                    Some(AnyToken::Redis(Box::new(Token {
                                        generation: f.generation,
                                        kind,
                                        bytes,
                                        claim: f.claim,
                                    })))
                                })
                            },
                        ));
                    }
                }
                if !orphans.is_empty() {
                    self.release(orphans, metrics).await;
                }
            }
            Err(why) => {
                for job in jobs {
                    let _ = job.reply.send(Err(why.clone()));
                }
            }
        }
    }
}

/// The stored keys of one request in one generation, to be recorded.
struct SettleJob {
    generation: Arc<str>,
    pairs: Vec<(u8, bytes::Bytes, String)>,
}

/// Settlements queued and not yet sent.
#[derive(Default)]
struct Settling {
    n: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One script call of a group: its window's base and the (request, key) pairs it claims.
type Call<'a> = (&'a Arc<str>, &'a [(usize, usize)]);

fn bad_len() -> String {
    "an unexpected answer to the claim script".to_string()
}

/// A script call per generation, each with at most [`CHUNK`] keys.
type Calls = Vec<(Arc<str>, usize, redis::Cmd)>;

/// The call for one more key of `generation` in `list`, made by `make` if it has none with
/// room.
fn cmd_for<'a>(
    list: &'a mut Calls,
    generation: &Arc<str>,
    make: impl FnOnce() -> redis::Cmd,
) -> &'a mut redis::Cmd {
    let i = match list
        .iter()
        .rposition(|(g, n, _)| g == generation && *n < CHUNK)
    {
        Some(i) => i,
        None => {
            list.push((generation.clone(), 0, make()));
            list.len() - 1
        }
    };
    list[i].1 += 1;
    &mut list[i].2
}

/// The value of a stored key.
fn stored_value(p: Position) -> String {
    match p.offset {
        Some(o) => format!("d:{}:{o}", p.partition),
        None => format!("d:{}:-", p.partition),
    }
}

/// A pending claim (`p:{deadline}:{instance}:{boot}:{n}`).
#[derive(Debug, PartialEq, Eq)]
struct Pending<'a> {
    deadline_ms: u64,
    instance: &'a str,
    boot: &'a str,
}

fn owner(v: &str) -> Option<Pending<'_>> {
    let mut parts = v.strip_prefix("p:")?.split(':');
    Some(Pending {
        deadline_ms: parts.next()?.parse().ok()?,
        instance: parts.next()?,
        boot: parts.next()?,
    })
}

/// A stored key's position (`d:{partition}:{offset or -}`); `None` for a pending one.
fn parse(v: &str) -> Option<Position> {
    let rest = v.strip_prefix("d:")?;
    let (p, o) = rest.split_once(':')?;
    Some(Position {
        partition: p.parse().ok()?,
        offset: if o == "-" {
            None
        } else {
            Some(o.parse().ok()?)
        },
    })
}

pub(crate) fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_and_pending_values_parse() {
        assert_eq!(
            parse("d:3:17"),
            Some(Position {
                partition: 3,
                offset: Some(17)
            })
        );
        assert_eq!(
            parse("d:0:-"),
            Some(Position {
                partition: 0,
                offset: None
            })
        );
        assert_eq!(parse("p:123:inst:boot:1f"), None);
        assert_eq!(
            owner("p:123:inst:boot:1f"),
            Some(Pending {
                deadline_ms: 123,
                instance: "inst",
                boot: "boot"
            })
        );
        assert_eq!(owner("d:1:2"), None);
        assert_eq!(owner("p:x:inst:boot:1"), None);
        assert_eq!(hex(&[0x00, 0x9f, 0xa5]), "009fa5");
        assert_eq!(parse("d:x:1"), None);
    }

    #[test]
    fn a_field_is_the_kind_then_the_key() {
        let c = redis::cmd("HGET").arg("h").arg(Field(b'i', b"abc")).clone();
        let args: Vec<Vec<u8>> = c
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(
            args,
            vec![b"HGET".to_vec(), b"h".to_vec(), b"iabc".to_vec()]
        );
    }
}
