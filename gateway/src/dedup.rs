//! The dedup window (docs/exactly-once.md): the keys of recently appended events, so a producer's
//! retry is answered with the original's position instead of being appended a second time.
//!
//! An event's key is its `id`, or its request's idempotency key and its index in the request,
//! scoped by stream and principal (one producer cannot answer for another's ids). A key is
//! *pending* from the moment an event claims it until its append is answered: a retry that
//! arrives meanwhile waits for that answer, and is appended itself if the original failed. Then
//! it is *done*, holding the original's partition and offset, until it expires (the stream's
//! `dedup_window_ms`) or is pushed out: by its principal's share of the stream
//! (`dedup_principal_events`), by the stream's window (`dedup_window_events`) or by the whole
//! window (`dedup.max_entries`), oldest first in each.
//!
//! Keys are 128-bit SipHash digests under keys chosen at random at start, so a producer cannot
//! make two of its keys collide, and every entry costs the same. The window is rebuilt at start
//! from the embedded log, which stores each event's id, its principal and (as the header
//! `sluice-idempotency-key`) its request key, so a restart — even SIGKILL — keeps it.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sluice_config::StreamSettings;
use sluice_core::{Event, IngestRequest, Receipt, Rejection};
use tokio::sync::watch;
use tokio::time::Instant;

pub use sluice_core::IDEMPOTENCY_HEADER;

/// How long a retry waits for its original's answer before it is answered 503 itself.
const WAIT_FOR_ORIGINAL: Duration = Duration::from_secs(30);

/// A key's digest.
type Key = [u64; 2];

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

    fn duplicate(self) -> Receipt {
        Receipt::Duplicate {
            partition: self.partition,
            offset: self.offset,
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

/// The window's metrics (docs/metrics.md).
#[derive(Clone, Default)]
pub struct DedupMetrics {
    pub duplicates: Family<DuplicateLabels, Counter>,
    pub waits: Counter,
    pub evictions: Family<EvictLabels, Counter>,
    pub keys: Gauge,
    pub restored: Counter,
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
            "Keys in the dedup window (pending and done)",
            self.keys.clone(),
        );
        registry.register(
            "dedup_restored",
            "Keys put back into the window from the log at start",
            self.restored.clone(),
        );
    }
}

enum State {
    /// The original is on its way to the log; a retry subscribes (the channel is made by the
    /// first one that waits).
    Pending(Option<watch::Sender<Option<Position>>>),
    Done(Position),
}

struct Slot {
    seq: u64,
    stream: Arc<str>,
    principal: Arc<str>,
    state: State,
}

/// Keys in insertion order, with stale entries (keys removed by another path) skipped lazily
/// and compacted away when they outnumber the live ones.
#[derive(Default)]
struct Fifo(VecDeque<(Key, u64, u64)>);

impl Fifo {
    fn push(&mut self, key: Key, seq: u64, at_ms: u64) {
        self.0.push_back((key, seq, at_ms));
    }

    fn compact(&mut self, live: usize, map: &HashMap<Key, Slot>) {
        if self.0.len() > 2 * live + 64 {
            self.0.retain(|(k, s, _)| is_live(map, k, *s));
        }
    }
}

fn is_live(map: &HashMap<Key, Slot>, key: &Key, seq: u64) -> bool {
    map.get(key).is_some_and(|s| s.seq == seq)
}

#[derive(Default)]
struct StreamWindow {
    fifo: Fifo,
    count: usize,
    principals: HashMap<Arc<str>, PrincipalWindow>,
}

#[derive(Default)]
struct PrincipalWindow {
    fifo: Fifo,
    count: usize,
}

struct Window {
    map: HashMap<Key, Slot>,
    all: Fifo,
    streams: HashMap<Arc<str>, StreamWindow>,
    seq: u64,
}

impl Window {
    /// Removes `key` and its counts; its waiters (if pending) are told the original failed.
    fn remove(&mut self, key: &Key) -> Option<Slot> {
        let slot = self.map.remove(key)?;
        if let Some(w) = self.streams.get_mut(&slot.stream) {
            w.count -= 1;
            if let Some(p) = w.principals.get_mut(&slot.principal) {
                p.count -= 1;
                if p.count == 0 {
                    w.principals.remove(&slot.principal);
                }
            }
            if w.count == 0 {
                self.streams.remove(&slot.stream);
            }
        }
        Some(slot)
    }

    /// Forgets the oldest live key of a FIFO chosen by `pick`.
    fn evict_oldest(&mut self, pick: impl Fn(&mut Window) -> Option<&mut Fifo>) -> bool {
        loop {
            let Some(fifo) = pick(self) else {
                return false;
            };
            let Some((k, s, _)) = fifo.0.pop_front() else {
                return false;
            };
            if is_live(&self.map, &k, s) {
                self.remove(&k);
                return true;
            }
        }
    }

    /// Forgets the stream's keys older than its window.
    fn expire(&mut self, stream: &str, now_ms: u64, window_ms: u64, m: &DedupMetrics) {
        loop {
            let Some(w) = self.streams.get_mut(stream) else {
                return;
            };
            let Some(&(k, s, at)) = w.fifo.0.front() else {
                return;
            };
            if !is_live(&self.map, &k, s) {
                w.fifo.0.pop_front();
                continue;
            }
            if at.saturating_add(window_ms) > now_ms {
                return;
            }
            w.fifo.0.pop_front();
            // A pending key is its original still in flight: it stays until answered.
            if matches!(self.map.get(&k).map(|s| &s.state), Some(State::Done(_))) {
                self.remove(&k);
                m.evictions
                    .get_or_create(&EvictLabels { reason: "expired" })
                    .inc();
            } else {
                let w = self
                    .streams
                    .get_mut(stream)
                    .expect("the stream holds this key");
                w.fifo.0.push_back((k, s, now_ms));
            }
        }
    }

    /// Adds `key` for (`stream`, `principal`), making room within the three bounds first.
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        key: Key,
        stream: &Arc<str>,
        principal: &Arc<str>,
        state: State,
        at_ms: u64,
        s: &StreamSettings,
        max_entries: usize,
        m: &DedupMetrics,
    ) {
        let evict = |reason| m.evictions.get_or_create(&EvictLabels { reason }).inc();
        let (stream_count, principal_count) = self.streams.get(stream).map_or((0, 0), |w| {
            (w.count, w.principals.get(principal).map_or(0, |p| p.count))
        });
        if principal_count as u64 >= s.dedup_principal_events
            && self.evict_oldest(|w| {
                w.streams
                    .get_mut(stream)?
                    .principals
                    .get_mut(principal)
                    .map(|p| &mut p.fifo)
            })
        {
            evict("principal_share");
        } else if stream_count as u64 >= s.dedup_window_events
            && self.evict_oldest(|w| w.streams.get_mut(stream).map(|w| &mut w.fifo))
        {
            evict("stream_window");
        }
        while self.map.len() >= max_entries && self.evict_oldest(|w| Some(&mut w.all)) {
            evict("max_entries");
        }
        self.seq += 1;
        let seq = self.seq;
        self.map.insert(
            key,
            Slot {
                seq,
                stream: stream.clone(),
                principal: principal.clone(),
                state,
            },
        );
        self.all.push(key, seq, at_ms);
        let live = self.map.len();
        let w = self.streams.entry(stream.clone()).or_default();
        w.count += 1;
        w.fifo.push(key, seq, at_ms);
        let p = w.principals.entry(principal.clone()).or_default();
        p.count += 1;
        p.fifo.push(key, seq, at_ms);
        let (pc, sc) = (p.count, w.count);
        p.fifo.compact(pc, &self.map);
        w.fifo.compact(sc, &self.map);
        self.all.compact(live, &self.map);
    }
}

/// What a claimed event turned out to be.
enum Claim {
    /// Not seen: this event is the original; the ticket records its outcome.
    New(u64),
    /// Seen and in the log.
    Done(Position),
    /// Seen, still in flight: wait for its answer.
    Wait(watch::Receiver<Option<Position>>),
}

/// The window, shared by every connection.
pub struct Dedup {
    inner: Mutex<Window>,
    hashers: (RandomState, RandomState),
    epoch: Instant,
    epoch_wall_ms: u64,
    max_entries: usize,
    metrics: DedupMetrics,
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
}

/// The claims of a request's new events; an event's claim is released (its retries may append)
/// unless its append is recorded. Released on drop, so every early return releases.
pub struct Tickets {
    dedup: Option<Arc<Dedup>>,
    /// One per event that goes on, in order: its key and sequence, if it has a key.
    claims: Vec<Option<(Key, u64)>>,
}

impl Dedup {
    pub fn new(max_entries: u64, metrics: DedupMetrics) -> Self {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            inner: Mutex::new(Window {
                map: HashMap::new(),
                all: Fifo::default(),
                streams: HashMap::new(),
                seq: 0,
            }),
            hashers: (RandomState::new(), RandomState::new()),
            epoch: Instant::now(),
            epoch_wall_ms: wall,
            max_entries: max_entries as usize,
            metrics,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The digest of a key: stream, principal identity, kind (`i` for ids, `k` for request
    /// keys) and the key's bytes, each length-prefixed so no two tuples share an encoding.
    fn key(&self, stream: &str, principal: &[u8], kind: u8, material: &[u8]) -> Key {
        let digest = |state: &RandomState| {
            let mut h = state.build_hasher();
            h.write_usize(stream.len());
            h.write(stream.as_bytes());
            h.write_usize(principal.len());
            h.write(principal);
            h.write_u8(kind);
            h.write_usize(material.len());
            h.write(material);
            h.finish()
        };
        [digest(&self.hashers.0), digest(&self.hashers.1)]
    }

    /// The key of `event`, if the stream's `dedup_keys` give it one: its `id`, or the request
    /// key the adapter marked it with ([`IDEMPOTENCY_HEADER`]).
    fn key_of(
        &self,
        stream: &str,
        principal: &[u8],
        s: &StreamSettings,
        event: &Event,
    ) -> Option<Key> {
        if s.dedup_keys.id
            && let Some(id) = event.id.as_ref().filter(|id| !id.is_empty())
        {
            return Some(self.key(stream, principal, b'i', id));
        }
        if s.dedup_keys.idempotency_key
            && let Some((_, k)) = event
                .headers
                .iter()
                .rev()
                .find(|(name, _)| name == IDEMPOTENCY_HEADER.as_bytes())
        {
            return Some(self.key(stream, principal, b'k', k));
        }
        None
    }

    /// The dedup step of a request: claims each event's key, waits for originals still in
    /// flight, and leaves in `req.events` only the events that go on to the log.
    pub async fn plan(self: &Arc<Self>, req: &mut IngestRequest) -> Result<Plan, Rejection> {
        let s = *req.admission.settings();
        let stream = req.stream().shared();
        let principal = req.principal().identity().clone();
        let mut events = std::mem::take(&mut req.events);
        let keys: Vec<Option<Key>> = events
            .iter()
            .map(|e| self.key_of(&stream, principal.as_bytes(), &s, e))
            .collect();
        let mut answers = Vec::with_capacity(events.len());
        let mut tickets = Tickets {
            dedup: Some(self.clone()),
            claims: Vec::with_capacity(events.len()),
        };
        let mut first_of: HashMap<Key, usize> = HashMap::new();
        let deadline = Instant::now() + WAIT_FOR_ORIGINAL;
        for (i, key) in keys.iter().enumerate() {
            let Some(key) = *key else {
                answers.push(Answer::Append(tickets.claims.len()));
                tickets.claims.push(None);
                continue;
            };
            if let Some(&j) = first_of.get(&key) {
                answers.push(Answer::Same(j));
                continue;
            }
            first_of.insert(key, i);
            let answer = loop {
                match self.claim(key, &stream, &principal, &s) {
                    Claim::New(seq) => {
                        let a = Answer::Append(tickets.claims.len());
                        tickets.claims.push(Some((key, seq)));
                        break a;
                    }
                    Claim::Done(p) => break Answer::Duplicate(p),
                    Claim::Wait(mut rx) => {
                        self.metrics.waits.inc();
                        let waited =
                            tokio::time::timeout_at(deadline, rx.wait_for(Option::is_some)).await;
                        match waited {
                            Ok(Ok(p)) => break Answer::Duplicate(p.expect("waited for Some")),
                            // The original failed (its claim was released): claim again.
                            Ok(Err(_)) => continue,
                            Err(_) => {
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
            };
            answers.push(answer);
        }
        let mut kept = Vec::with_capacity(tickets.claims.len());
        for (e, a) in events.drain(..).zip(&answers) {
            if matches!(a, Answer::Append(_)) {
                kept.push(e);
            }
        }
        req.events = kept;
        Ok(Plan { answers, tickets })
    }

    fn claim(
        &self,
        key: Key,
        stream: &Arc<str>,
        principal: &Arc<str>,
        s: &StreamSettings,
    ) -> Claim {
        let now = self.now_ms();
        let mut w = self.inner.lock().expect("dedup window poisoned");
        w.expire(stream, now, s.dedup_window_ms, &self.metrics);
        if let Some(slot) = w.map.get_mut(&key) {
            return match &mut slot.state {
                State::Done(p) => Claim::Done(*p),
                State::Pending(tx) => {
                    let tx = tx.get_or_insert_with(|| watch::channel(None).0);
                    Claim::Wait(tx.subscribe())
                }
            };
        }
        w.insert(
            key,
            stream,
            principal,
            State::Pending(None),
            now,
            s,
            self.max_entries,
            &self.metrics,
        );
        self.metrics.keys.set(w.map.len() as i64);
        Claim::New(w.seq)
    }

    /// Records the outcome of claimed events: an appended event's key now answers its
    /// retries with its position; a failed one's is released so a retry can append.
    fn settle(&self, claims: &mut Vec<Option<(Key, u64)>>, receipts: &[Receipt]) {
        let mut w = self.inner.lock().expect("dedup window poisoned");
        for (i, claim) in claims.drain(..).enumerate() {
            let Some((key, seq)) = claim else {
                continue;
            };
            if !is_live(&w.map, &key, seq) {
                continue; // pushed out of the window meanwhile
            }
            match receipts.get(i).and_then(Position::of) {
                Some(p) => {
                    let slot = w.map.get_mut(&key).expect("live");
                    if let State::Pending(Some(tx)) =
                        std::mem::replace(&mut slot.state, State::Done(p))
                    {
                        tx.send_replace(Some(p));
                    }
                }
                None => {
                    w.remove(&key);
                }
            }
        }
        self.metrics.keys.set(w.map.len() as i64);
    }

    /// Puts back the key of an event read from the log at start, appended at wall-clock
    /// `ts_ms`: `id` is its id, `request_key` its `sluice-idempotency-key` header.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &self,
        stream: &Arc<str>,
        principal: &[u8],
        id: Option<&[u8]>,
        request_key: Option<&[u8]>,
        position: Position,
        ts_ms: i64,
        s: &StreamSettings,
    ) {
        let key = match (id.filter(|id| !id.is_empty()), request_key) {
            (Some(id), _) if s.dedup_keys.id => self.key(stream, principal, b'i', id),
            (_, Some(k)) if s.dedup_keys.idempotency_key => self.key(stream, principal, b'k', k),
            _ => return,
        };
        // Its age now, on the window's clock (entries older than the window are not restored).
        let age = self.epoch_wall_ms.saturating_sub(ts_ms.max(0) as u64);
        if age >= s.dedup_window_ms {
            return;
        }
        let at = self.now_ms().saturating_sub(age);
        let principal: Arc<str> = Arc::from(String::from_utf8_lossy(principal).as_ref());
        let mut w = self.inner.lock().expect("dedup window poisoned");
        w.remove(&key);
        w.insert(
            key,
            stream,
            &principal,
            State::Done(position),
            at,
            s,
            self.max_entries,
            &self.metrics,
        );
        self.metrics.restored.inc();
        self.metrics.keys.set(w.map.len() as i64);
    }

    /// Forgets expired keys of every stream (run now and then, so idle streams free theirs).
    pub fn sweep(&self, window_ms: impl Fn(&str) -> u64) {
        let now = self.now_ms();
        let mut w = self.inner.lock().expect("dedup window poisoned");
        let names: Vec<Arc<str>> = w.streams.keys().cloned().collect();
        for name in names {
            w.expire(&name, now, window_ms(&name), &self.metrics);
        }
        self.metrics.keys.set(w.map.len() as i64);
    }

    /// Keys in the window.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("dedup window poisoned").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn metrics(&self) -> &DedupMetrics {
        &self.metrics
    }
}

impl Tickets {
    /// Releases the claims past the first `n` events (their events were refused before the
    /// log, e.g. by a quota).
    pub fn truncate(&mut self, n: usize) {
        if n < self.claims.len() {
            let mut tail = self.claims.split_off(n);
            if let Some(d) = &self.dedup {
                d.settle(&mut tail, &[]);
            }
        }
    }

    /// Whether any event that goes on has a key (else nothing needs recording).
    pub fn any(&self) -> bool {
        self.claims.iter().any(Option::is_some)
    }

    /// Records the appended events' positions (receipts in the order of the events that went
    /// on); failed ones are released.
    pub fn settle(mut self, receipts: &[Receipt]) {
        if let Some(d) = self.dedup.take() {
            d.settle(&mut self.claims, receipts);
        }
    }
}

impl Drop for Tickets {
    fn drop(&mut self) {
        if let Some(d) = self.dedup.take() {
            d.settle(&mut self.claims, &[]);
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
                Answer::Duplicate(p) => p.duplicate(),
                Answer::Same(j) => match Position::of(&out[*j]) {
                    Some(p) => p.duplicate(),
                    None => out[*j].clone(),
                },
            };
            out.push(r);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sluice_core::{Admission, Permissions, Principal, Protocol, StreamName};

    fn settings() -> StreamSettings {
        StreamSettings {
            dedup: true,
            ..StreamSettings::default()
        }
    }

    fn dedup(max_entries: u64) -> Arc<Dedup> {
        Arc::new(Dedup::new(max_entries, DedupMetrics::default()))
    }

    fn request(principal: &str, s: StreamSettings, ids: &[&str]) -> IngestRequest {
        IngestRequest {
            admission: Admission::granted(
                Principal::new(principal, Permissions::All),
                StreamName::parse("orders").unwrap(),
                s,
            ),
            protocol: Protocol::Http,
            content_type: Bytes::new(),
            events: ids
                .iter()
                .map(|id| Event {
                    id: (!id.is_empty()).then(|| Bytes::from(id.to_string())),
                    value: Bytes::from_static(b"v"),
                    ..Event::default()
                })
                .collect(),
            reservation: sluice_core::Budget::new(1 << 20).empty(),
            queued: None,
        }
    }

    fn appended(first: u64, n: usize) -> Vec<Receipt> {
        (0..n as u64)
            .map(|i| Receipt::Appended {
                partition: 0,
                offset: first + i,
            })
            .collect()
    }

    /// Runs a request through the dedup step and "appends" what goes on at `first`.
    async fn send(
        d: &Arc<Dedup>,
        principal: &str,
        s: StreamSettings,
        ids: &[&str],
        first: u64,
    ) -> Vec<Receipt> {
        let mut req = request(principal, s, ids);
        let mut plan = d.plan(&mut req).await.unwrap();
        let receipts = appended(first, req.events.len());
        plan.take_tickets().settle(&receipts);
        plan.receipts(receipts)
    }

    fn dup(offset: u64) -> Receipt {
        Receipt::Duplicate {
            partition: 0,
            offset: Some(offset),
        }
    }

    #[tokio::test]
    async fn a_retry_is_answered_with_the_original_position_only_for_its_own_principal() {
        let d = dedup(1000);
        let first = send(&d, "a", settings(), &["1", "2"], 10).await;
        assert_eq!(first, appended(10, 2));
        let again = send(&d, "a", settings(), &["2", "3", "1", ""], 20).await;
        assert_eq!(
            again,
            vec![
                dup(11),
                Receipt::Appended {
                    partition: 0,
                    offset: 20
                },
                dup(10),
                Receipt::Appended {
                    partition: 0,
                    offset: 21
                }
            ]
        );
        // Another principal's id "1" is its own.
        assert_eq!(send(&d, "b", settings(), &["1"], 30).await, appended(30, 1));
        // The same id twice in one request: the second is answered like the first.
        assert_eq!(
            send(&d, "a", settings(), &["x", "x"], 40).await,
            vec![
                Receipt::Appended {
                    partition: 0,
                    offset: 40
                },
                dup(40)
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_original_is_released_and_its_retry_appended() {
        let d = dedup(1000);
        let mut req = request("a", settings(), &["1", "2"]);
        let mut plan = d.plan(&mut req).await.unwrap();
        let failed = Receipt::Failed(Rejection::unavailable(Duration::from_secs(1), "down"));
        plan.take_tickets().settle(&[
            failed.clone(),
            Receipt::Appended {
                partition: 0,
                offset: 5,
            },
        ]);
        assert_eq!(
            plan.receipts(vec![
                failed.clone(),
                Receipt::Appended {
                    partition: 0,
                    offset: 5
                }
            ])[0],
            failed
        );
        assert_eq!(
            send(&d, "a", settings(), &["1", "2"], 6).await,
            vec![
                Receipt::Appended {
                    partition: 0,
                    offset: 6
                },
                dup(5)
            ]
        );
        // Tickets dropped without an answer (a refusal before the log) release too.
        let mut req = request("a", settings(), &["9"]);
        drop(d.plan(&mut req).await.unwrap());
        assert_eq!(send(&d, "a", settings(), &["9"], 7).await, appended(7, 1));
    }

    #[tokio::test]
    async fn a_retry_of_an_event_in_flight_waits_for_its_answer() {
        let d = dedup(1000);
        let mut original = request("a", settings(), &["1"]);
        let mut plan = d.plan(&mut original).await.unwrap();
        let tickets = plan.take_tickets();
        let d2 = d.clone();
        let retry = tokio::spawn(async move { send(&d2, "a", settings(), &["1"], 99).await });
        // The retry waits (it is counted) until the original is answered.
        let deadline = Instant::now() + Duration::from_secs(10);
        while d.metrics().waits.get() == 0 {
            assert!(Instant::now() < deadline, "the retry never waited");
            tokio::task::yield_now().await;
        }
        assert!(!retry.is_finished());
        tickets.settle(&appended(3, 1));
        assert_eq!(retry.await.unwrap(), vec![dup(3)]);

        // If the original fails, the waiting retry is appended itself.
        let mut original = request("a", settings(), &["2"]);
        let mut plan = d.plan(&mut original).await.unwrap();
        let tickets = plan.take_tickets();
        let d2 = d.clone();
        let retry = tokio::spawn(async move { send(&d2, "a", settings(), &["2"], 50).await });
        while d.metrics().waits.get() < 2 {
            assert!(Instant::now() < deadline, "the retry never waited");
            tokio::task::yield_now().await;
        }
        drop(tickets);
        assert_eq!(retry.await.unwrap(), appended(50, 1));
    }

    #[tokio::test]
    async fn a_producer_sending_unique_ids_forgets_only_its_own_oldest() {
        let s = StreamSettings {
            dedup_principal_events: 10,
            dedup_window_events: 15,
            ..settings()
        };
        let d = dedup(1000);
        send(&d, "good", s, &["g1", "g2"], 0).await;
        for i in 0..100 {
            send(&d, "flood", s, &[&format!("f{i}")], 100 + i).await;
        }
        // The flood holds its share; the good producer's keys are still there.
        assert_eq!(d.len(), 12);
        assert_eq!(
            send(&d, "good", s, &["g1", "g2"], 500).await,
            vec![dup(0), dup(1)]
        );
        assert_eq!(send(&d, "flood", s, &["f99"], 500).await, vec![dup(199)]);
        assert_eq!(send(&d, "flood", s, &["f0"], 501).await, appended(501, 1));
        let share = d
            .metrics()
            .evictions
            .get_or_create(&EvictLabels {
                reason: "principal_share",
            })
            .get();
        assert!(share >= 90, "{share}");
        // The stream's window: more principals than it holds push out its oldest keys.
        for p in 0..10 {
            send(&d, &format!("p{p}"), s, &["x"], 600 + p).await;
        }
        assert_eq!(d.len(), 15);
        // The whole window: max_entries across streams.
        let small = dedup(5);
        for i in 0..20 {
            send(&small, &format!("p{i}"), s, &["x"], i).await;
        }
        assert_eq!(small.len(), 5);
        assert_eq!(send(&small, "p19", s, &["x"], 99).await, vec![dup(19)]);
        assert_eq!(send(&small, "p0", s, &["x"], 99).await, appended(99, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_expire_after_the_window() {
        let s = StreamSettings {
            dedup_window_ms: 60_000,
            ..settings()
        };
        let d = dedup(1000);
        send(&d, "a", s, &["1"], 0).await;
        tokio::time::advance(Duration::from_secs(30)).await;
        send(&d, "a", s, &["2"], 1).await;
        assert_eq!(send(&d, "a", s, &["1"], 9).await, vec![dup(0)]);
        tokio::time::advance(Duration::from_secs(31)).await;
        // "1" is older than the window, "2" is not.
        assert_eq!(
            send(&d, "a", s, &["1", "2"], 10).await,
            vec![
                Receipt::Appended {
                    partition: 0,
                    offset: 10
                },
                dup(1)
            ]
        );
        tokio::time::advance(Duration::from_secs(61)).await;
        d.sweep(|_| 60_000);
        assert_eq!(d.len(), 0);
    }

    #[tokio::test]
    async fn restored_keys_answer_retries_by_id_and_by_request_key() {
        let s = settings();
        let d = dedup(1000);
        let stream: Arc<str> = Arc::from("orders");
        let now = d.epoch_wall_ms as i64;
        let principal = Principal::new("a", Permissions::All);
        let at = |offset| Position {
            partition: 0,
            offset: Some(offset),
        };
        d.restore(
            &stream,
            principal.identity().as_bytes(),
            Some(b"1"),
            None,
            at(7),
            now - 1000,
            &s,
        );
        d.restore(
            &stream,
            principal.identity().as_bytes(),
            None,
            Some(b"batch-1#0"),
            at(8),
            now - 1000,
            &s,
        );
        // Older than the window: not restored.
        d.restore(
            &stream,
            principal.identity().as_bytes(),
            Some(b"old"),
            None,
            at(1),
            now - s.dedup_window_ms as i64 - 1,
            &s,
        );
        assert_eq!(
            send(&d, "a", s, &["1", "old"], 20).await,
            vec![
                dup(7),
                Receipt::Appended {
                    partition: 0,
                    offset: 20
                }
            ]
        );
        let mut req = request("a", s, &[""]);
        sluice_core::apply_idempotency_key(b"batch-1", &mut req.events).unwrap();
        let plan = d.plan(&mut req).await.unwrap();
        assert_eq!(plan.receipts(Vec::new()), vec![dup(8)]);
    }
}
