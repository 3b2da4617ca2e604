//! The dedup step (docs/exactly-once.md): the keys of recently appended events, so a producer's
//! retry is answered with the original's position instead of being appended a second time.
//!
//! An event's key is its `id`, or its request's idempotency key and its index in the request,
//! scoped by stream and principal (one producer cannot answer for another's ids). A key is
//! *pending* from the moment an event claims it until its append is answered: a retry that
//! arrives meanwhile waits for that answer, and is appended itself if the original failed. Then
//! it is *done*, holding the original's partition and offset, until it leaves the window.
//!
//! The window lives in one of two stores behind [`Dedup`] (DESIGN §10): [`memory`], embedded
//! in the gateway and rebuilt from the embedded log at start, or [`redis`], shared by every
//! gateway that points at the same Redis.

pub mod journal;
pub mod memory;
pub mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sluice_config::StreamSettings;
use sluice_core::{Event, IngestRequest, Receipt, Rejection};
use tokio::time::Instant;

pub use sluice_core::IDEMPOTENCY_HEADER;

/// How long a retry waits for its original's answer before it is answered 503 itself.
pub(crate) const WAIT_FOR_ORIGINAL: Duration = Duration::from_secs(30);

/// Where an original event is: its partition and offset (`None` when the stream acks on
/// receipt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: u32,
    pub offset: Option<u64>,
}

impl Position {
    fn of(r: &Receipt) -> Option<Self> {
        r.position()
            .map(|(partition, offset)| Position { partition, offset })
    }

    fn duplicate(self, spooled: bool) -> Receipt {
        Receipt::Duplicate {
            partition: self.partition,
            offset: self.offset,
            spooled: spooled && self.offset.is_none(),
        }
    }
}

/// What identifies one event within its stream and principal: the kind (`i` for ids, `k` for
/// request keys, `m` for MQTT packets) and the key's bytes. `replace`: a new MQTT publish
/// reusing a packet id takes the key over from the earlier publish instead of being its
/// duplicate. Borrowed from the event: the embedded window needs only its digest, Redis copies
/// what it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Material<'a> {
    kind: u8,
    bytes: &'a [u8],
    replace: bool,
}

impl<'a> Material<'a> {
    /// The key of `event`, if the stream's `dedup_keys` give it one: its `id`, or the request
    /// key the adapter marked it with ([`IDEMPOTENCY_HEADER`]).
    fn of(s: &StreamSettings, event: &'a Event) -> Option<Self> {
        if s.dedup_keys.id
            && let Some(id) = event.id.as_ref().filter(|id| !id.is_empty())
        {
            return Some(Material {
                kind: b'i',
                bytes: id,
                replace: false,
            });
        }
        let header = |name: &str| {
            event
                .headers
                .iter()
                .rev()
                .find(|(n, _)| n == name.as_bytes())
                .map(|(_, v)| v)
        };
        if s.dedup_keys.idempotency_key
            && let Some(k) = header(IDEMPOTENCY_HEADER)
        {
            return Some(Material {
                kind: b'k',
                bytes: k,
                replace: false,
            });
        }
        if s.dedup_keys.mqtt_packet
            && let Some(v) = header(sluice_core::MQTT_PACKET_HEADER)
            && let Some((&flag, rest)) = v.split_first()
        {
            return Some(Material {
                kind: b'm',
                bytes: rest,
                replace: flag == b'n',
            });
        }
        None
    }

    /// The key of an event read back from the log.
    pub(crate) fn of_record(
        s: &StreamSettings,
        id: Option<&'a [u8]>,
        request_key: Option<&'a [u8]>,
        mqtt_packet: Option<&'a [u8]>,
    ) -> Option<Self> {
        let m = |kind, bytes: &'a [u8]| Material {
            kind,
            bytes,
            replace: false,
        };
        match (id.filter(|id| !id.is_empty()), request_key, mqtt_packet) {
            (Some(id), _, _) if s.dedup_keys.id => Some(m(b'i', id)),
            (_, Some(k), _) if s.dedup_keys.idempotency_key => Some(m(b'k', k)),
            (_, _, Some([_, rest @ ..])) if s.dedup_keys.mqtt_packet => Some(m(b'm', rest)),
            _ => None,
        }
    }
}

/// Labels of window evictions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EvictLabels {
    /// `expired`, `principal_share`, `stream_window` or `max_entries`.
    pub reason: &'static str,
}

/// Labels of duplicates.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DuplicateLabels {
    pub stream: String,
    pub protocol: &'static str,
}

/// Labels of state store failures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreErrorLabels {
    /// `claim`, `wait`, `settle` or `release`.
    pub op: &'static str,
}

/// The window's metrics (docs/metrics.md).
#[derive(Clone, Default)]
pub struct DedupMetrics {
    pub duplicates: Family<DuplicateLabels, Counter>,
    pub waits: Counter,
    pub evictions: Family<EvictLabels, Counter>,
    pub keys: Gauge,
    pub restored: Counter,
    pub store_errors: Family<StoreErrorLabels, Counter>,
    pub store_up: Gauge,
    pub taken_over: Counter,
}

impl DedupMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "dedup_duplicates",
            "Events recognised as retries and answered with the original's position instead of being appended, by stream and protocol",
            self.duplicates.clone(),
        );
        registry.register(
            "dedup_waits",
            "Retries that arrived while their original was still on its way to the log and waited for its answer",
            self.waits.clone(),
        );
        registry.register(
            "dedup_evictions",
            "Keys forgotten before a retry could use them, by reason: expired (dedup_window_ms), principal_share, stream_window, max_entries",
            self.evictions.clone(),
        );
        registry.register(
            "dedup_keys",
            "Keys in the embedded dedup window, as its bounds count them (pending, stored, and released until their turn)",
            self.keys.clone(),
        );
        registry.register(
            "dedup_restored",
            "Keys put back into the embedded window from the log at start",
            self.restored.clone(),
        );
        registry.register(
            "dedup_store_errors",
            "Failed calls to the Redis state store, by operation (claim, wait, settle, release, reconcile, probe, session_*, quota, quota_members)",
            self.store_errors.clone(),
        );
        registry.register(
            "dedup_claims_taken_over",
            "Claims in Redis left by a gateway that restarted since (so their events are not in its log) and taken over by a retry",
            self.taken_over.clone(),
        );
        registry.register(
            "dedup_store_up",
            "1 while the dedup store answers (always 1 for the embedded one), 0 while Redis does not",
            self.store_up.clone(),
        );
    }

    fn store_error(&self, op: &'static str) {
        self.store_errors
            .get_or_create(&StoreErrorLabels { op })
            .inc();
    }
}

/// A claimed key, for the store that holds it.
pub(crate) enum Token {
    Memory(memory::Token),
    // Boxed: the embedded window's tokens (16 bytes) are what a batch moves around most.
    Redis(Box<redis::Token>),
}

/// What a claimed key turned out to be.
pub(crate) enum Claim {
    /// Not seen: this event is the original; the token records its outcome.
    New(Token),
    /// Seen and in the log.
    Done(Position),
    /// Seen, still in flight: wait for its answer.
    Wait(Waiter),
}

/// How to wait for an original in flight.
pub(crate) enum Waiter {
    Memory(tokio::sync::watch::Receiver<Option<Position>>),
    Redis(Box<redis::Held>),
}

/// The store behind the window.
// One per gateway: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Store {
    Memory(memory::Window),
    Redis(Arc<redis::RedisStore>),
}

/// The window, shared by every connection.
pub struct Dedup {
    store: Store,
    metrics: DedupMetrics,
    /// Over Kafka with Redis: the claims written down before their events are produced.
    journal: std::sync::OnceLock<journal::Journal>,
}

/// The claims of a request's new events; an event's claim is released (its retries may append)
/// unless its append is recorded. Released on drop, so every early return releases.
pub struct Tickets {
    dedup: Option<Arc<Dedup>>,
    /// One per event that goes on, in order.
    claims: Vec<Option<Token>>,
}

/// What the dedup step decided for each event of a request, in request order.
enum Answer {
    /// Goes on to the log as the `n`th event of the trimmed request.
    Append(usize),
    /// A retry of an event in the log.
    Duplicate(Position),
    /// The same key as an earlier event of this request: answered like that one.
    Same(usize),
}

/// The dedup step's result for one request: the events that go on hold tickets, the others
/// are answered from the window.
pub struct Plan {
    answers: Vec<Answer>,
    tickets: Tickets,
    /// The stream acks once spooled: a duplicate's answer says so.
    spooled: bool,
}

impl Dedup {
    /// The embedded window, in memory, holding at most `max_entries` keys.
    pub fn embedded(max_entries: u64, metrics: DedupMetrics) -> Self {
        metrics.store_up.set(1);
        Self {
            store: Store::Memory(memory::Window::new(max_entries)),
            metrics,
            journal: Default::default(),
        }
    }

    /// The window in Redis (`dedup.redis`). `instance` names this gateway's embedded log (kept
    /// in its data directory), which it reconciles into Redis at start; `None` with Kafka.
    pub fn redis(
        config: &sluice_config::RedisConfig,
        instance: Option<String>,
        metrics: DedupMetrics,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            store: Store::Redis(Arc::new(redis::RedisStore::new(config, instance)?)),
            metrics,
            journal: Default::default(),
        })
    }

    /// After a clean stop (every claim settled): the journal has nothing left to say.
    pub fn clear_journal(&self) {
        if let Some(j) = self.journal.get() {
            j.clear();
        }
    }

    /// Writes this boot's claims to `journal` from now on (a gateway over Kafka with Redis).
    pub fn set_journal(&self, journal: journal::Journal) {
        let _ = self.journal.set(journal);
    }

    /// The Redis store behind the window, if it is Redis (MQTT sessions share it).
    pub fn redis_store(&self) -> Option<Arc<redis::RedisStore>> {
        match &self.store {
            Store::Redis(r) => Some(r.clone()),
            Store::Memory(_) => None,
        }
    }

    /// The dedup step of a request: claims each event's key, waits for originals still in
    /// flight, and leaves in `req.events` only the events that go on to the log.
    pub async fn plan(self: &Arc<Self>, req: &mut IngestRequest) -> Result<Plan, Rejection> {
        let s = *req.admission.settings();
        let stream = req.stream().shared();
        let principal = req.principal().identity().clone();
        let mut events = std::mem::take(&mut req.events);
        let materials: Vec<Option<Material>> = events.iter().map(|e| Material::of(&s, e)).collect();
        // The same key twice in one request: the later ones are answered like the first. The
        // embedded window finds them by the digests it keys its table with (computed once, and
        // keyed, so a request of colliding keys cannot make this quadratic); Redis by the keys.
        let mut same = vec![None; materials.len()];
        let mut unique: Vec<(usize, &Material)> = Vec::with_capacity(materials.len());
        let mut digests: Option<Vec<memory::Key>> = None;
        match &self.store {
            Store::Memory(w) => {
                let key = w.keys(&stream, principal.as_bytes());
                let mut first_of: HashMap<
                    memory::Key,
                    usize,
                    std::hash::BuildHasherDefault<memory::DigestHasher>,
                > = HashMap::with_capacity_and_hasher(materials.len(), Default::default());
                let mut unique_digests = Vec::with_capacity(materials.len());
                for (i, m) in materials.iter().enumerate() {
                    if let Some(m) = m {
                        let d = key(m);
                        match first_of.entry(d) {
                            std::collections::hash_map::Entry::Occupied(e) => {
                                same[i] = Some(*e.get());
                            }
                            std::collections::hash_map::Entry::Vacant(e) => {
                                e.insert(i);
                                unique.push((i, m));
                                unique_digests.push(d);
                            }
                        }
                    }
                }
                digests = Some(unique_digests);
            }
            Store::Redis(_) => {
                let mut first_of: HashMap<&Material, usize> =
                    HashMap::with_capacity(materials.len());
                for (i, m) in materials.iter().enumerate() {
                    if let Some(m) = m {
                        match first_of.get(m) {
                            Some(&j) => same[i] = Some(j),
                            None => {
                                first_of.insert(m, i);
                                unique.push((i, m));
                            }
                        }
                    }
                }
            }
        }
        let scope = Scope {
            stream: &stream,
            principal: &principal,
            settings: &s,
        };
        let keys: Vec<&Material> = unique.iter().map(|(_, m)| *m).collect();
        let claims = self.claim(&scope, &keys, digests).await?;
        let deadline = Instant::now() + WAIT_FOR_ORIGINAL;
        // Claims made so far, released if this returns early (a wait past its deadline, Redis
        // failing on a second claim), so no key is left claimed by nobody.
        let mut held = Tickets {
            dedup: Some(self.clone()),
            claims: Vec::with_capacity(unique.len()),
        };
        // Per event: the index of its claim in `held`, or the original's position.
        let mut outcome: Vec<Option<Result<usize, Position>>> = vec![None; materials.len()];
        // New and stored keys first, without an await between them (the common case stays out
        // of this future's state); then the retries whose originals are in flight, one by one.
        let mut waiting = Vec::new();
        for ((i, m), claim) in unique.iter().zip(claims) {
            match claim {
                Claim::New(t) => {
                    held.claims.push(Some(t));
                    outcome[*i] = Some(Ok(held.claims.len() - 1));
                }
                Claim::Done(p) => outcome[*i] = Some(Err(p)),
                wait @ Claim::Wait(_) => waiting.push((*i, *m, wait)),
            }
        }
        for (i, m, claim) in waiting {
            let mut claim = claim;
            outcome[i] = Some(loop {
                match claim {
                    Claim::New(t) => {
                        held.claims.push(Some(t));
                        break Ok(held.claims.len() - 1);
                    }
                    Claim::Done(p) => break Err(p),
                    Claim::Wait(w) => {
                        self.metrics.waits.inc();
                        match self.wait(w, deadline).await {
                            Ok(Some(next)) => claim = next,
                            // The original failed (its claim was released): claim again.
                            Ok(None) => {
                                claim = self
                                    .claim(&scope, &[m], None)
                                    .await?
                                    .pop()
                                    .expect("one claim per key");
                            }
                            Err(()) => {
                                return Err(Rejection::unavailable(
                                    Duration::from_secs(1),
                                    format!(
                                        "event {i} is a retry of an event still on its way to the log; retry once that one is answered"
                                    ),
                                ));
                            }
                        }
                    }
                }
            });
        }
        if let Some(j) = self.journal.get()
            && s.ack != sluice_config::AckMode::Spooled
        {
            // Written before the events are produced (docs/exactly-once.md).
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let claimed = || {
                outcome
                    .iter()
                    .enumerate()
                    .filter(|(_, o)| matches!(o, Some(Ok(_))))
                    .map(|(i, _)| i)
            };
            let from_ms = claimed()
                .filter_map(|i| events[i].timestamp_ms)
                .fold(now_ms, i64::min)
                .max(now_ms - 2 * journal::KEEP.as_millis() as i64);
            j.record(
                from_ms,
                now_ms,
                &stream,
                principal.as_bytes(),
                claimed().filter_map(|i| materials[i].as_ref().map(|m| (m.kind, m.bytes))),
            );
        }
        let mut tickets = Tickets {
            dedup: Some(self.clone()),
            claims: Vec::with_capacity(events.len()),
        };
        let mut answers = Vec::with_capacity(events.len());
        let mut kept = 0;
        for (i, o) in outcome.iter().enumerate() {
            if let Some(j) = same[i] {
                answers.push(Answer::Same(j));
                continue;
            }
            let claim = match *o {
                Some(Err(p)) => {
                    answers.push(Answer::Duplicate(p));
                    continue;
                }
                Some(Ok(k)) => held.claims[k].take(),
                None => None,
            };
            answers.push(Answer::Append(kept));
            tickets.claims.push(claim);
            kept += 1;
        }
        // The events that go on stay where they are (when all do, as usual, none moves: an
        // event is large enough for moving each one to show in a profile).
        if kept < events.len() {
            let mut goes_on = answers.iter().map(|a| matches!(a, Answer::Append(_)));
            events.retain(|_| goes_on.next() == Some(true));
        }
        req.events = events;
        Ok(Plan {
            answers,
            tickets,
            spooled: s.ack == sluice_config::AckMode::Spooled,
        })
    }

    async fn claim(
        &self,
        scope: &Scope<'_>,
        keys: &[&Material<'_>],
        digests: Option<Vec<memory::Key>>,
    ) -> Result<Vec<Claim>, Rejection> {
        match &self.store {
            Store::Memory(w) => Ok(w.claim(scope, keys, digests, &self.metrics)),
            Store::Redis(r) => r.claim(scope, keys, &self.metrics).await,
        }
    }

    /// Waits for an original in flight: what the key is now (stored, or taken over as ours),
    /// or `None` if the original failed (claim again); `Err` past the deadline.
    async fn wait(&self, w: Waiter, deadline: Instant) -> Result<Option<Claim>, ()> {
        match (w, &self.store) {
            (Waiter::Memory(mut rx), _) => {
                match tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await {
                    Ok(Ok(p)) => Ok(p.map(Claim::Done)),
                    Ok(Err(_)) => Ok(None),
                    Err(_) => Err(()),
                }
            }
            (Waiter::Redis(held), Store::Redis(r)) => r.wait(&held, deadline, &self.metrics).await,
            (Waiter::Redis(_), Store::Memory(_)) => {
                unreachable!("a Redis waiter of the embedded window")
            }
        }
    }

    /// Records the outcome of claimed events (`receipts` in the order of `claims`; missing
    /// receipts are failures): an appended event's key now answers its retries with its
    /// position; a failed one's is released so a retry can append.
    async fn settle(&self, claims: Vec<Option<Token>>, receipts: &[Receipt]) {
        match &self.store {
            Store::Memory(w) => w.settle(claims, receipts),
            Store::Redis(r) => r.settle(claims, receipts, &self.metrics).await,
        }
    }

    /// Releases claims whose events never reached the log, without waiting.
    fn release(self: Arc<Self>, claims: Vec<Option<Token>>) {
        if claims.iter().all(Option::is_none) {
            return;
        }
        match &self.store {
            Store::Memory(w) => w.settle(claims, &[]),
            Store::Redis(_) => {
                let d = self.clone();
                tokio::spawn(async move {
                    if let Store::Redis(r) = &d.store {
                        r.release(claims, &d.metrics).await;
                    }
                });
            }
        }
    }

    /// Puts back the keys of the events read from the embedded log at start (oldest first):
    /// into the embedded window, or into Redis, marking stored the keys a crash left claimed
    /// (then this gateway's heartbeat is published: see [`redis`]).
    pub async fn restore(&self, events: &[Restored]) -> Result<(), String> {
        match &self.store {
            Store::Memory(w) => {
                for e in events {
                    if let Some(m) = Material::of_record(
                        &e.settings,
                        e.id.as_deref(),
                        e.request_key.as_deref(),
                        e.mqtt_packet.as_deref(),
                    ) {
                        w.restore(
                            &e.stream,
                            &e.principal,
                            &m,
                            e.position,
                            e.ts_ms,
                            &e.settings,
                            &self.metrics,
                        );
                    }
                }
                Ok(())
            }
            Store::Redis(r) => r.reconcile(events, &self.metrics).await,
        }
    }

    /// Waits until the settlements running after their answers (Redis) are done.
    pub async fn settled(&self) {
        if let Store::Redis(r) = &self.store {
            r.settled().await;
        }
    }

    /// Whether the store is Redis (probed, and reconciled in the background).
    pub fn is_redis(&self) -> bool {
        matches!(self.store, Store::Redis(_))
    }

    /// Forgets expired keys of every stream (run now and then, so idle streams free theirs).
    pub fn sweep(&self, window_ms: impl Fn(&str) -> u64) {
        if let Store::Memory(w) = &self.store {
            w.sweep(window_ms, &self.metrics);
        }
    }

    /// Keys in the embedded window.
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Memory(w) => w.len(),
            Store::Redis(_) => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks the store whether it answers (Redis: a PING), updating [`Dedup::health`] and
    /// `sluice_dedup_store_up`.
    pub async fn probe(&self) {
        if let Store::Redis(r) = &self.store {
            r.probe(&self.metrics).await;
        }
    }

    /// Whether the store answers; the reason for `/readyz` if not.
    pub fn health(&self) -> Result<(), String> {
        match &self.store {
            Store::Memory(_) => Ok(()),
            Store::Redis(r) => r.health(),
        }
    }

    pub fn metrics(&self) -> &DedupMetrics {
        &self.metrics
    }
}

/// An event read back from the embedded log at start, with what identifies it.
pub struct Restored {
    pub stream: Arc<str>,
    pub settings: StreamSettings,
    pub principal: Vec<u8>,
    pub id: Option<Vec<u8>>,
    pub request_key: Option<Vec<u8>>,
    pub mqtt_packet: Option<Vec<u8>>,
    pub position: Position,
    pub ts_ms: i64,
}

impl Restored {
    /// A record read back from partition `partition` of `stream` (the embedded log at start,
    /// or Kafka for the journal), if it carries a dedup key at all: an `id`, a request's
    /// idempotency key or an MQTT packet.
    pub fn of_record(
        stream: &Arc<str>,
        settings: StreamSettings,
        partition: u32,
        r: sluice_log::Record,
    ) -> Option<Restored> {
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == name.as_bytes())
                .map(|(_, v)| v.clone())
        };
        let request_key = header(IDEMPOTENCY_HEADER);
        let mqtt_packet = header(sluice_core::MQTT_PACKET_HEADER);
        if r.id.as_ref().is_none_or(Vec::is_empty) && request_key.is_none() && mqtt_packet.is_none()
        {
            return None;
        }
        Some(Restored {
            stream: stream.clone(),
            settings,
            principal: r.principal,
            id: r.id,
            request_key,
            mqtt_packet,
            position: Position {
                partition,
                offset: Some(r.offset),
            },
            ts_ms: r.timestamp_ms,
        })
    }
}

impl journal::Earlier {
    /// `r`, read back from partition `partition` of `stream`, as a restored key, if it is one
    /// of the keys earlier boots journaled.
    pub fn matching(
        &self,
        stream: &Arc<str>,
        settings: &StreamSettings,
        partition: u32,
        r: sluice_log::Record,
    ) -> Option<Restored> {
        let restored = Restored::of_record(stream, *settings, partition, r)?;
        let m = Material::of_record(
            settings,
            restored.id.as_deref(),
            restored.request_key.as_deref(),
            restored.mqtt_packet.as_deref(),
        )?;
        let entry = journal::Entry {
            stream: stream.to_string(),
            principal: restored.principal.clone(),
            kind: m.kind,
            bytes: m.bytes.to_vec(),
        };
        self.keys.contains(&entry).then_some(restored)
    }
}

/// Whose keys a request claims: its stream, its principal, the stream's settings.
pub(crate) struct Scope<'a> {
    pub(crate) stream: &'a Arc<str>,
    pub(crate) principal: &'a Arc<str>,
    pub(crate) settings: &'a StreamSettings,
}

impl Tickets {
    /// Releases the claims past the first `n` events (their events were refused before the
    /// log, e.g. by a quota).
    pub fn truncate(&mut self, n: usize) {
        if n < self.claims.len() {
            let tail = self.claims.split_off(n);
            if let Some(d) = &self.dedup {
                d.clone().release(tail);
            }
        }
    }

    /// Whether any event that goes on has a key (else nothing needs recording).
    pub fn any(&self) -> bool {
        self.claims.iter().any(Option::is_some)
    }

    /// Records the appended events' positions (receipts in the order of the events that went
    /// on); failed ones are released. In the embedded window this finishes before the producer
    /// is answered. In Redis the stored keys are queued (see [`redis::RedisStore::settle`]), so a
    /// request waits for one Redis round trip (its claims), not two: a retry that arrives before
    /// the settlement finds the key still claimed and waits for it, as for any original in
    /// flight; a gateway that dies in between leaves the claim for the restart's reconciliation
    /// (or its expiry), as a crash during the append always could. A drain waits for the queue.
    pub async fn settle(mut self, receipts: &[Receipt]) {
        if let Some(d) = self.dedup.take() {
            let claims = std::mem::take(&mut self.claims);
            d.settle(claims, receipts).await;
        }
    }
}

impl Drop for Tickets {
    fn drop(&mut self) {
        if let Some(d) = self.dedup.take() {
            d.release(std::mem::take(&mut self.claims));
        }
    }
}

impl Plan {
    /// Whether every event was answered from the window (nothing goes on to the log).
    pub fn all_answered(&self) -> bool {
        !self.answers.iter().any(|a| matches!(a, Answer::Append(_)))
    }

    /// How many events were answered as duplicates.
    pub fn duplicates(&self) -> usize {
        self.answers
            .iter()
            .filter(|a| !matches!(a, Answer::Append(_)))
            .count()
    }

    /// The tickets of the events that go on (taken out to be settled where the append runs).
    pub fn take_tickets(&mut self) -> Tickets {
        std::mem::replace(
            &mut self.tickets,
            Tickets {
                dedup: None,
                claims: Vec::new(),
            },
        )
    }

    /// The receipts of the whole request, in its order, from the receipts of the events that
    /// went on (`appended`, in their order).
    pub fn receipts(&self, appended: Vec<Receipt>) -> Vec<Receipt> {
        let mut out: Vec<Receipt> = Vec::with_capacity(self.answers.len());
        for a in &self.answers {
            let r = match a {
                Answer::Append(n) => appended.get(*n).cloned().unwrap_or_else(|| {
                    Receipt::Failed(Rejection::Internal {
                        message: "no receipt for an appended event".into(),
                    })
                }),
                Answer::Duplicate(p) => p.duplicate(self.spooled),
                Answer::Same(j) => match Position::of(&out[*j]) {
                    Some(p) => p.duplicate(self.spooled),
                    None => out[*j].clone(),
                },
            };
            out.push(r);
        }
        out
    }
}
