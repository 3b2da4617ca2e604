//! The dedup window in Redis, shared by every gateway that points at it: a retry that lands on
//! another gateway is still recognised.
//!
//! One key per event: `{prefix}dd:{stream}:{digest}`, the digest being the first 128 bits of
//! SHA-256 over the principal and the key (the same on every gateway). Its value is
//! `p:{nonce}` while the original is in flight (`SET … NX PX 60000 GET`: one round trip claims a
//! key or reads who holds it) and `d:{partition}:{offset}` once it is stored (for the stream's
//! `dedup_window_ms`). A request's claims go in one pipeline, its settlements in one script
//! call, which also keeps a sorted set per principal and stream so the principal's share
//! (`dedup_principal_events`) pushes out its oldest keys first. The stream's and the whole
//! window's size are bounded by Redis's `maxmemory` (with `maxmemory-policy volatile-ttl`, the
//! keys nearest their expiry, i.e. the oldest, go first), not by `dedup_window_events` and
//! `dedup.max_entries`, which would cost a second sorted set per event.
//!
//! When Redis does not answer within `dedup.redis.timeout_ms`, requests to streams with dedup are
//! answered 503 (retryable): no event is stored without its key, so nothing acked is ever
//! stored twice, and nothing acked is lost. Connections are re-made at most once a second.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
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

/// Marks the claimed keys stored (`d:…`, for the window), indexes them by time in the
/// principal's sorted set for the stream, and pushes out the principal's oldest keys past its
/// share. KEYS: the principal's set, then the keys. ARGV: window_ms, share, then one value per
/// key. Returns how many keys the share pushed out.
const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
for i = 2, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', window)
  redis.call('ZADD', KEYS[1], now, KEYS[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
local evicted = 0
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[1], over)
  for j = 1, #old, 2 do
    redis.call('DEL', old[j])
    evicted = evicted + 1
  end
end
redis.call('PEXPIRE', KEYS[1], window)
return evicted
";

/// Takes over a claim left by a gateway that restarted since (its log was reconciled, so the
/// event is not in it). KEYS: the key. ARGV: the old claim, the new claim, its TTL.
const TAKE_OVER: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// How long a gateway's heartbeat (`{prefix}gw:{instance}` = its boot) outlives its last
/// refresh (every second, with the probe).
const HEARTBEAT_TTL_MS: u64 = 10_000;

/// Deletes a claim if it is still this gateway's (the original failed: a retry may append).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// A claimed key and the nonce it was claimed with.
pub(crate) struct Token {
    key: String,
    nonce: String,
}

impl Token {
    /// Adds the release of this claim to `pipe` (deleted only if still this claim).
    fn release(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.nonce)
            .ignore();
    }
}

pub struct RedisStore {
    client: redis::Client,
    /// Multiplexed connections, used round robin; `None` once one failed, until re-made.
    slots: Vec<Mutex<Option<MultiplexedConnection>>>,
    next: AtomicUsize,
    timeout: Duration,
    prefix: String,
    /// Since the last failure: when a connection may be tried again, and why it failed.
    down: Mutex<Option<(Instant, String)>>,
    /// This gateway's claims are `p:{instance}:{boot}:{n}`. The instance is kept in its data
    /// directory, for gateways with an embedded log (which reconcile it into Redis at start);
    /// `-` for those without, whose claims are never taken over.
    instance: String,
    boot: String,
    nonces: AtomicU64,
    /// Set once this gateway's log was reconciled and its heartbeat may be published.
    announced: std::sync::atomic::AtomicBool,
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
            prefix: config.key_prefix.clone(),
            down: Mutex::new(None),
            instance: instance.unwrap_or_else(|| "-".into()),
            boot: format!("{:016x}", u64::from_le_bytes(seed)),
            nonces: AtomicU64::new(0),
            announced: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// A new claim's value.
    fn nonce(&self) -> String {
        format!(
            "p:{}:{}:{:x}",
            self.instance,
            self.boot,
            self.nonces.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn heartbeat_key(&self, instance: &str) -> String {
        format!("{}gw:{instance}", self.prefix)
    }

    /// The Redis key of `m` in `scope`.
    fn key(&self, scope: &Scope<'_>, m: &Material) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(&(scope.principal.len() as u64).to_le_bytes());
        ctx.update(scope.principal.as_bytes());
        ctx.update(&[m.kind]);
        ctx.update(&m.bytes);
        let d = ctx.finish();
        format!(
            "{}dd:{}:{}",
            self.prefix,
            scope.stream,
            hex(&d.as_ref()[..16])
        )
    }

    fn principal_set(&self, scope: &Scope<'_>) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, scope.principal.as_bytes());
        format!(
            "{}ddp:{}:{}",
            self.prefix,
            scope.stream,
            hex(&d.as_ref()[..16])
        )
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

    /// Runs `pipe`, within the timeout.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        op: &'static str,
        metrics: &DedupMetrics,
    ) -> Result<T, String> {
        let result = match self.conn().await {
            Ok((i, mut c)) => {
                match tokio::time::timeout(self.timeout, pipe.query_async::<T>(&mut c)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(self.failed(i, e.to_string())),
                    Err(_) => Err(self.failed(i, format!("no answer within {:?}", self.timeout))),
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

    pub(crate) async fn claim(
        &self,
        scope: &Scope<'_>,
        keys: &[&Material],
        metrics: &DedupMetrics,
    ) -> Result<Vec<Claim>, Rejection> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let nonce = self.nonce();
        let rkeys: Vec<String> = keys.iter().map(|m| self.key(scope, m)).collect();
        let mut pipe = redis::pipe();
        for (k, m) in rkeys.iter().zip(keys) {
            let cmd = pipe.cmd("SET").arg(k).arg(&nonce);
            // A new MQTT publish reusing a packet id takes the key over (no NX).
            if !m.replace {
                cmd.arg("NX");
            }
            cmd.arg("PX").arg(PENDING_TTL_MS).arg("GET");
        }
        let held: Vec<Option<String>> = self
            .query(&pipe, "claim", metrics)
            .await
            .map_err(|why| unavailable(&why))?;
        Ok(rkeys
            .into_iter()
            .zip(held)
            .zip(keys)
            .map(|((key, held), m)| match held.as_deref().map(parse) {
                _ if m.replace => Claim::New(AnyToken::Redis(Token {
                    key,
                    nonce: nonce.clone(),
                })),
                None => Claim::New(AnyToken::Redis(Token {
                    key,
                    nonce: nonce.clone(),
                })),
                Some(Some(p)) => Claim::Done(p),
                Some(None) => Claim::Wait(Waiter::Redis(key)),
            })
            .collect())
    }

    /// Polls a key held by an original in flight (on this gateway or another) until it is
    /// stored (`Done`), released or expired (`None`: claim again), or the deadline passes
    /// (`Err`). A claim left by a gateway that has restarted since (its heartbeat names another
    /// boot) is taken over (`New`): that gateway reconciled its log into Redis before its new
    /// heartbeat, so the claim's event is not in the log.
    pub(crate) async fn wait(
        &self,
        key: &str,
        deadline: Instant,
        metrics: &DedupMetrics,
    ) -> Result<Option<Claim>, ()> {
        let mut pause = Duration::from_millis(2);
        loop {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(key);
            let (held,): (Option<String>,) =
                self.query(&pipe, "wait", metrics).await.map_err(|_| ())?;
            let Some(held) = held else {
                return Ok(None);
            };
            if let Some(p) = parse(&held) {
                return Ok(Some(Claim::Done(p)));
            }
            if let Some((instance, boot)) = owner(&held)
                && instance != "-"
            {
                let mut pipe = redis::pipe();
                pipe.cmd("GET").arg(self.heartbeat_key(instance));
                let (beat,): (Option<String>,) =
                    self.query(&pipe, "wait", metrics).await.map_err(|_| ())?;
                if beat.is_some_and(|b| b != boot) {
                    let nonce = self.nonce();
                    let mut pipe = redis::pipe();
                    pipe.cmd("EVAL")
                        .arg(TAKE_OVER)
                        .arg(1)
                        .arg(key)
                        .arg(&held)
                        .arg(&nonce)
                        .arg(PENDING_TTL_MS);
                    let (taken,): (i64,) =
                        self.query(&pipe, "wait", metrics).await.map_err(|_| ())?;
                    if taken == 1 {
                        metrics.taken_over.inc();
                        return Ok(Some(Claim::New(AnyToken::Redis(Token {
                            key: key.to_string(),
                            nonce,
                        }))));
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
        for chunk in events.chunks(1000) {
            let mut pipe = redis::pipe();
            for e in chunk {
                let Some(m) = Material::of_record(
                    &e.settings,
                    e.id.as_deref(),
                    e.request_key.as_deref(),
                    e.mqtt_packet.as_deref(),
                ) else {
                    continue;
                };
                let principal: Arc<str> = Arc::from(String::from_utf8_lossy(&e.principal).as_ref());
                let scope = Scope {
                    stream: &e.stream,
                    principal: &principal,
                    settings: &e.settings,
                };
                let left = e.settings.dedup_window_ms as i64 - (now_ms - e.ts_ms).max(0);
                if left <= 0 {
                    continue;
                }
                pipe.cmd("SET")
                    .arg(self.key(&scope, &m))
                    .arg(stored_value(e.position))
                    .arg("PX")
                    .arg(left)
                    .ignore();
            }
            self.query::<()>(&pipe, "reconcile", metrics).await?;
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

    pub(crate) async fn settle(
        &self,
        claims: Vec<Option<AnyToken>>,
        receipts: &[Receipt],
        scope: &Scope<'_>,
        metrics: &DedupMetrics,
    ) {
        let s = scope.settings;
        let mut keys = vec![self.principal_set(scope)];
        let mut values = Vec::new();
        let mut failed = Vec::new();
        for (i, claim) in claims.into_iter().enumerate() {
            let Some(AnyToken::Redis(t)) = claim else {
                continue;
            };
            match receipts.get(i).and_then(Position::of) {
                Some(p) => {
                    keys.push(t.key);
                    values.push(stored_value(p));
                }
                None => failed.push(t),
            }
        }
        let mut pipe = redis::pipe();
        let stores = keys.len() > 1;
        if stores {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(SETTLE).arg(keys.len()).arg(&keys);
            cmd.arg(s.dedup_window_ms)
                .arg(s.dedup_principal_events)
                .arg(&values);
            pipe.add_command(cmd);
        }
        for t in &failed {
            t.release(&mut pipe);
        }
        if !stores && failed.is_empty() {
            return;
        }
        match self.query::<redis::Value>(&pipe, "settle", metrics).await {
            Ok(v) => {
                if let Some(share) = evicted(&v) {
                    metrics
                        .evictions
                        .get_or_create(&EvictLabels {
                            reason: "principal_share",
                        })
                        .inc_by(share);
                }
            }
            Err(why) => {
                // The events are stored; their keys stay pending until PENDING_TTL_MS, so a retry
                // meanwhile waits and is then answered 503; after it, a retry is appended.
                tracing::warn!(error = %why, "could not record stored events in the dedup store; their retries may be stored again after 60 s");
            }
        }
    }

    /// Releases claims whose events never reached the log.
    pub(crate) async fn release(&self, claims: Vec<Option<AnyToken>>, metrics: &DedupMetrics) {
        let mut pipe = redis::pipe();
        let mut any = false;
        for claim in claims.into_iter().flatten() {
            if let AnyToken::Redis(t) = claim {
                t.release(&mut pipe);
                any = true;
            }
        }
        if any {
            let _ = self.query::<()>(&pipe, "release", metrics).await;
        }
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

    pub(crate) fn health(&self) -> Result<(), String> {
        match &*self.down.lock().expect("poisoned") {
            None => Ok(()),
            Some((_, why)) => Err(format!("the dedup store (Redis) cannot be reached: {why}")),
        }
    }
}

/// The value of a stored key.
fn stored_value(p: Position) -> String {
    match p.offset {
        Some(o) => format!("d:{}:{o}", p.partition),
        None => format!("d:{}:-", p.partition),
    }
}

/// The gateway instance and boot of a claim (`p:{instance}:{boot}:{n}`).
fn owner(v: &str) -> Option<(&str, &str)> {
    let mut parts = v.strip_prefix("p:")?.split(':');
    Some((parts.next()?, parts.next()?))
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

/// The eviction count the settle script returned (the first reply of the pipeline).
fn evicted(v: &redis::Value) -> Option<u64> {
    let redis::Value::Array(replies) = v else {
        return None;
    };
    match replies.first()? {
        redis::Value::Int(n) => Some(*n as u64),
        _ => None,
    }
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
        assert_eq!(parse("p:00ab"), None);
        assert_eq!(owner("p:inst:boot:1f"), Some(("inst", "boot")));
        assert_eq!(owner("d:1:2"), None);
        assert_eq!(hex(&[0x00, 0x9f, 0xa5]), "009fa5");
        assert_eq!(parse("d:x:1"), None);
    }
}
