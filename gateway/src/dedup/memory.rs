//! The embedded dedup window: in memory, bounded by its principal's share of the stream
//! (`dedup_principal_events`), by the stream's window (`dedup_window_events`) and by the whole
//! window (`dedup.max_entries`), oldest first in each, and by time (`dedup_window_ms`).
//!
//! Keys are 128-bit digests: 64 bits of SipHash under a key chosen at random at start (which
//! places the key in the table, so a producer cannot aim its keys at one spot of it) and 64 bits
//! of foldhash seeded per stream and principal from a second random SipHash key (so a producer
//! cannot make two of its keys collide without colliding both), and every entry costs the same:
//! 40 bytes in the table (the
//! digest, a sequence number, the owner's index and the position) plus 32 in each of two FIFOs.
//! The table is where the time goes (a cache miss per lookup once it outgrows the caches), so
//! its slots are kept small: the (stream, principal) owning a key is an index into a table of
//! owners, and the channel a retry waits on exists only while one waits. The window is rebuilt
//! at start from the embedded log, which stores each event's id, its principal and (as
//! headers) its request or packet key, so a restart — even SIGKILL — keeps it.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex};

use sluice_config::StreamSettings;
use sluice_core::Receipt;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Claim, DedupMetrics, EvictLabels, Material, Position, Scope, Token as AnyToken, Waiter,
};

/// A key's digest: keyed SipHash (the table's hash) and seeded foldhash, 64 bits each, so
/// uniformly distributed and out of a producer's control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key([u64; 2]);

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.0[0]);
    }
}

/// The window's table hashes a key by its first 64 bits, which are already a keyed hash:
/// hashing them again would only cost time.
#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Map = HashMap<Key, Slot, BuildHasherDefault<DigestHasher>>;

/// FNV-1a for the tables of stream and principal names: short strings, looked up once per
/// request or per removal; their number is bounded (`streams.max_streams`, authenticated
/// principals), so flooding them with colliding names is not an attack worth SipHash's cost.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

type Names<V> = HashMap<Arc<str>, V, BuildHasherDefault<Fnv>>;

/// A claimed key: its digest and the sequence number of its slot.
pub(crate) struct Token(Key, u64);

/// `partition` of a key whose original is still in flight.
const PENDING: u32 = u32::MAX;
/// `offset` of an event acked on receipt (no offset yet).
const NO_OFFSET: u64 = u64::MAX;

struct Slot {
    seq: u64,
    /// Index into [`Inner::owners`].
    owner: u32,
    /// The original's position; [`PENDING`] while it is in flight.
    partition: u32,
    offset: u64,
}

impl Slot {
    fn position(&self) -> Option<Position> {
        (self.partition != PENDING).then_some(Position {
            partition: self.partition,
            offset: (self.offset != NO_OFFSET).then_some(self.offset),
        })
    }
}

/// Keys in insertion order, with stale entries (keys removed by another path) skipped lazily
/// and compacted away when they outnumber the live ones.
#[derive(Default)]
struct Fifo(VecDeque<(Key, u64, u64)>);

impl Fifo {
    fn push(&mut self, key: Key, seq: u64, at_ms: u64) {
        self.0.push_back((key, seq, at_ms));
    }

    fn compact(&mut self, live: usize, map: &Map) {
        if self.0.len() > 2 * live + 64 {
            self.0.retain(|(k, s, _)| is_live(map, k, *s));
        }
    }
}

fn is_live(map: &Map, key: &Key, seq: u64) -> bool {
    map.get(key).is_some_and(|s| s.seq == seq)
}

/// A stream's keys: their FIFO (for its window and its expiry) and its owners by principal.
#[derive(Default)]
struct StreamWindow {
    fifo: Fifo,
    count: usize,
    principals: Names<u32>,
}

/// One principal's keys on one stream.
struct Owner {
    stream: Arc<str>,
    principal: Arc<str>,
    fifo: Fifo,
    count: usize,
}

/// Evictions counted under the lock and added to the metric once per call (a counter lookup
/// per evicted key cost as much as the eviction).
#[derive(Default)]
struct Evicted {
    expired: u64,
    principal_share: u64,
    stream_window: u64,
    max_entries: u64,
}

impl Evicted {
    fn record(&self, m: &DedupMetrics) {
        for (reason, n) in [
            ("expired", self.expired),
            ("principal_share", self.principal_share),
            ("stream_window", self.stream_window),
            ("max_entries", self.max_entries),
        ] {
            if n > 0 {
                m.evictions.get_or_create(&EvictLabels { reason }).inc_by(n);
            }
        }
    }
}

struct Inner {
    map: Map,
    streams: Names<StreamWindow>,
    /// Owners by index; one without keys is freed by the next sweep (not at once, so an index
    /// a request resolved stays valid while it inserts).
    owners: Vec<Owner>,
    free: Vec<u32>,
    /// The channels retries wait on, for keys in flight that have a waiter.
    waiters: HashMap<Key, watch::Sender<Option<Position>>, BuildHasherDefault<DigestHasher>>,
    seq: u64,
}

impl Inner {
    /// The owner index of (`stream`, `principal`), made if new.
    fn owner(&mut self, stream: &Arc<str>, principal: &Arc<str>) -> u32 {
        if let Some(&o) = self
            .streams
            .get(stream)
            .and_then(|w| w.principals.get(principal))
        {
            return o;
        }
        let owner = Owner {
            stream: stream.clone(),
            principal: principal.clone(),
            fifo: Fifo::default(),
            count: 0,
        };
        let o = match self.free.pop() {
            Some(o) => {
                self.owners[o as usize] = owner;
                o
            }
            None => {
                self.owners.push(owner);
                (self.owners.len() - 1) as u32
            }
        };
        self.streams
            .entry(stream.clone())
            .or_default()
            .principals
            .insert(principal.clone(), o);
        o
    }

    /// Removes `key` and its counts; its waiters (if pending) are told the original failed.
    fn remove(&mut self, key: &Key) -> Option<Slot> {
        let slot = self.map.remove(key)?;
        if !self.waiters.is_empty() {
            self.waiters.remove(key);
        }
        let o = &mut self.owners[slot.owner as usize];
        o.count -= 1;
        if let Some(w) = self.streams.get_mut(&o.stream) {
            w.count -= 1;
        }
        Some(slot)
    }

    /// Forgets the oldest live key of a FIFO chosen by `pick`. The key's entry in its other FIFO
    /// is left to be skipped later, unless it is at that FIFO's front too (as when one principal
    /// sends all of a stream's keys): then it goes at once, so no stale entry costs a lookup.
    fn evict_oldest(&mut self, pick: impl Fn(&mut Inner) -> Option<&mut Fifo>) -> bool {
        loop {
            let Some(fifo) = pick(self) else {
                return false;
            };
            let Some((k, s, _)) = fifo.0.pop_front() else {
                return false;
            };
            if let Some(slot) = self.remove_if(&k, s) {
                let o = &mut self.owners[slot.owner as usize];
                if o.fifo.0.front().is_some_and(|e| e.0 == k && e.1 == s) {
                    o.fifo.0.pop_front();
                }
                if let Some(w) = self.streams.get_mut(&o.stream)
                    && w.fifo.0.front().is_some_and(|e| e.0 == k && e.1 == s)
                {
                    w.fifo.0.pop_front();
                }
                return true;
            }
        }
    }

    /// Removes `key` if its slot is still the one numbered `seq`.
    fn remove_if(&mut self, key: &Key, seq: u64) -> Option<Slot> {
        if is_live(&self.map, key, seq) {
            self.remove(key)
        } else {
            None
        }
    }

    /// Forgets the stream's keys older than its window.
    fn expire(&mut self, stream: &str, now_ms: u64, window_ms: u64, evicted: &mut Evicted) {
        loop {
            let Some(w) = self.streams.get_mut(stream) else {
                return;
            };
            let Some(&(k, s, at)) = w.fifo.0.front() else {
                return;
            };
            // Time first: the front is the oldest entry, so if it is young enough nothing here
            // is expired, and no lookup (a cache miss in a large window) is needed.
            if at.saturating_add(window_ms) > now_ms {
                return;
            }
            w.fifo.0.pop_front();
            let Some(slot) = self.map.get(&k).filter(|slot| slot.seq == s) else {
                continue;
            };
            // A pending key is its original still in flight: it stays until answered.
            if slot.partition != PENDING {
                self.remove(&k);
                evicted.expired += 1;
            } else {
                w.fifo.0.push_back((k, s, now_ms));
            }
        }
    }

    /// Adds `key` for `owner` (of `stream`), making room within the three bounds first.
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &mut self,
        key: Key,
        owner: u32,
        stream: &str,
        position: Option<Position>,
        at_ms: u64,
        s: &StreamSettings,
        max_entries: usize,
        evicted: &mut Evicted,
    ) -> u64 {
        self.make_room(owner, stream, 1, s, max_entries, evicted);
        self.put(key, owner, stream, position, at_ms)
    }

    /// Forgets the oldest keys so that `n` new keys of `owner` (of `stream`) fit within the
    /// three bounds. A request's evictions run together, before its inserts: each is a lookup
    /// of a key last touched long ago (a cache miss), and in one loop the misses overlap.
    fn make_room(
        &mut self,
        owner: u32,
        stream: &str,
        n: usize,
        s: &StreamSettings,
        max_entries: usize,
        evicted: &mut Evicted,
    ) {
        let share = usize::try_from(s.dedup_principal_events).unwrap_or(usize::MAX);
        let over = (self.owners[owner as usize].count + n).saturating_sub(share);
        for _ in 0..over {
            if !self.evict_oldest(|w| Some(&mut w.owners[owner as usize].fifo)) {
                break;
            }
            evicted.principal_share += 1;
        }
        let window = usize::try_from(s.dedup_window_events).unwrap_or(usize::MAX);
        let stream_count = self.streams.get(stream).map_or(0, |w| w.count);
        for _ in 0..(stream_count + n).saturating_sub(window) {
            if !self.evict_oldest(|w| w.streams.get_mut(stream).map(|w| &mut w.fifo)) {
                break;
            }
            evicted.stream_window += 1;
        }
        // The whole window: this stream's oldest key goes first; a stream holding none takes
        // the place of the oldest key of the stream holding the most.
        while self.map.len() + n > max_entries {
            let made_room = self.evict_oldest(|w| w.streams.get_mut(stream).map(|w| &mut w.fifo))
                || {
                    let largest = self
                        .streams
                        .iter()
                        .max_by_key(|(_, w)| w.count)
                        .map(|(name, _)| name.clone());
                    largest.is_some_and(|name| {
                        self.evict_oldest(|w| w.streams.get_mut(&name).map(|w| &mut w.fifo))
                    })
                };
            if !made_room {
                break;
            }
            evicted.max_entries += 1;
        }
    }

    /// Adds `key` for `owner` (of `stream`); room was made first.
    fn put(
        &mut self,
        key: Key,
        owner: u32,
        stream: &str,
        position: Option<Position>,
        at_ms: u64,
    ) -> u64 {
        self.seq += 1;
        let seq = self.seq;
        let (partition, offset) = match position {
            Some(p) => (p.partition, p.offset.unwrap_or(NO_OFFSET)),
            None => (PENDING, NO_OFFSET),
        };
        let Inner {
            map,
            owners,
            streams,
            ..
        } = self;
        map.insert(
            key,
            Slot {
                seq,
                owner,
                partition,
                offset,
            },
        );
        let o = &mut owners[owner as usize];
        o.count += 1;
        o.fifo.push(key, seq, at_ms);
        o.fifo.compact(o.count, map);
        let w = streams
            .get_mut(stream)
            .expect("an owner's stream has a window");
        w.count += 1;
        w.fifo.push(key, seq, at_ms);
        w.fifo.compact(w.count, map);
        seq
    }

    /// Frees owners and streams without keys.
    fn free_empty(&mut self) {
        for (i, o) in self.owners.iter_mut().enumerate() {
            if o.count == 0 && !o.stream.is_empty() {
                if let Some(w) = self.streams.get_mut(&o.stream) {
                    w.principals.remove(&o.principal);
                }
                o.stream = Arc::from("");
                o.fifo = Fifo::default();
                self.free.push(i as u32);
            }
        }
        self.streams
            .retain(|_, w| w.count > 0 || !w.principals.is_empty());
    }
}

/// The embedded window, shared by every connection.
pub(crate) struct Window {
    inner: Mutex<Inner>,
    hashers: (RandomState, RandomState),
    epoch: Instant,
    epoch_wall_ms: u64,
    max_entries: usize,
}

impl Window {
    pub(crate) fn new(max_entries: u64) -> Self {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self {
            inner: Mutex::new(Inner {
                map: Map::default(),
                streams: Names::default(),
                owners: Vec::new(),
                free: Vec::new(),
                waiters: HashMap::default(),
                seq: 0,
            }),
            hashers: (RandomState::new(), RandomState::new()),
            epoch: Instant::now(),
            epoch_wall_ms: wall,
            max_entries: max_entries as usize,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The digests of keys of one stream and principal: stream, principal identity, kind and
    /// the key's bytes, each length-prefixed so no two tuples share an encoding; the hashers'
    /// state after the stream and the principal is computed once.
    pub(crate) fn keys(
        &self,
        stream: &str,
        principal: &[u8],
    ) -> impl Fn(&Material<'_>) -> Key + use<> {
        let prefix = |state: &RandomState| {
            let mut h = state.build_hasher();
            h.write_usize(stream.len());
            h.write(stream.as_bytes());
            h.write_usize(principal.len());
            h.write(principal);
            h
        };
        // The first half, which places a key in the table, is keyed SipHash over the stream,
        // the principal and the key (so no producer can aim keys at one spot of the table). The
        // second half only has to tell keys apart: foldhash, seeded per stream and principal by
        // the second SipHash key — a third of SipHash's instructions per key, measured.
        let a = prefix(&self.hashers.0);
        let seed = prefix(&self.hashers.1).finish();
        let b = foldhash::fast::FixedState::with_seed(seed);
        move |m: &Material<'_>| {
            let mut h = a.clone();
            h.write_u8(m.kind);
            h.write_usize(m.bytes.len());
            h.write(m.bytes);
            let mut f = b.build_hasher();
            f.write_u8(m.kind);
            f.write(m.bytes);
            Key([h.finish(), f.finish()])
        }
    }

    /// Claims the keys of one request, under one lock.
    /// `digests`: the keys' digests, if the caller computed them ([`Window::keys`]).
    pub(crate) fn claim(
        &self,
        scope: &Scope<'_>,
        keys: &[&Material<'_>],
        digests: Option<Vec<Key>>,
        metrics: &DedupMetrics,
    ) -> Vec<Claim> {
        let digests = digests.unwrap_or_else(|| {
            let key = self.keys(scope.stream, scope.principal.as_bytes());
            keys.iter().map(|m| key(m)).collect()
        });
        let s = scope.settings;
        let now = self.now_ms();
        let mut guard = self.inner.lock().expect("dedup window poisoned");
        let w = &mut *guard;
        let mut evicted = Evicted::default();
        w.expire(scope.stream, now, s.dedup_window_ms, &mut evicted);
        let owner = w.owner(scope.stream, scope.principal);
        // Three passes: every lookup, then the evictions that make room for the new keys, then
        // the inserts — so the cache misses of each pass overlap instead of queueing one by one.
        let mut claims: Vec<Option<Claim>> = Vec::with_capacity(keys.len());
        let mut fresh = 0;
        for (key, m) in digests.iter().zip(keys) {
            let found = w.map.get(key).map(Slot::position);
            claims.push(match found {
                // A new MQTT publish reusing a packet id takes the key over from the earlier
                // publish, once that one is stored.
                Some(Some(_)) if m.replace => {
                    w.remove(key);
                    fresh += 1;
                    None
                }
                Some(Some(p)) => Some(Claim::Done(p)),
                Some(None) => {
                    let tx = w
                        .waiters
                        .entry(*key)
                        .or_insert_with(|| watch::channel(None).0);
                    Some(Claim::Wait(Waiter::Memory(tx.subscribe())))
                }
                None => {
                    fresh += 1;
                    None
                }
            });
        }
        if fresh > 0 {
            w.make_room(
                owner,
                scope.stream,
                fresh,
                s,
                self.max_entries,
                &mut evicted,
            );
        }
        let claims: Vec<Claim> = claims
            .into_iter()
            .zip(digests)
            .map(|(claim, key)| {
                claim.unwrap_or_else(|| {
                    let seq = w.put(key, owner, scope.stream, None, now);
                    Claim::New(AnyToken::Memory(Token(key, seq)))
                })
            })
            .collect();
        metrics.keys.set(w.map.len() as i64);
        drop(guard);
        evicted.record(metrics);
        claims
    }

    /// Records the outcome of claimed events: an appended event's key now answers its
    /// retries with its position; a failed one's (or one without a receipt) is released.
    pub(crate) fn settle(
        &self,
        claims: Vec<Option<AnyToken>>,
        receipts: &[Receipt],
        metrics: &DedupMetrics,
    ) {
        let mut w = self.inner.lock().expect("dedup window poisoned");
        for (i, claim) in claims.into_iter().enumerate() {
            let Some(AnyToken::Memory(Token(key, seq))) = claim else {
                continue;
            };
            let Some(slot) = w.map.get_mut(&key).filter(|slot| slot.seq == seq) else {
                continue; // pushed out of the window meanwhile
            };
            match receipts.get(i).and_then(Position::of) {
                Some(p) => {
                    slot.partition = p.partition;
                    slot.offset = p.offset.unwrap_or(NO_OFFSET);
                    if !w.waiters.is_empty()
                        && let Some(tx) = w.waiters.remove(&key)
                    {
                        tx.send_replace(Some(p));
                    }
                }
                None => {
                    w.remove(&key);
                }
            }
        }
        metrics.keys.set(w.map.len() as i64);
    }

    /// Puts back the key of an event read from the log at start, appended at wall-clock
    /// `ts_ms` (keys older than the window are not restored).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn restore(
        &self,
        stream: &Arc<str>,
        principal: &[u8],
        m: &Material<'_>,
        position: Position,
        ts_ms: i64,
        s: &StreamSettings,
        metrics: &DedupMetrics,
    ) {
        let key = self.keys(stream, principal)(m);
        // Its age now, on the window's clock.
        let age = self.epoch_wall_ms.saturating_sub(ts_ms.max(0) as u64);
        if age >= s.dedup_window_ms {
            return;
        }
        let at = self.now_ms().saturating_sub(age);
        let principal: Arc<str> = Arc::from(String::from_utf8_lossy(principal).as_ref());
        let mut guard = self.inner.lock().expect("dedup window poisoned");
        let w = &mut *guard;
        let mut evicted = Evicted::default();
        w.remove(&key);
        let owner = w.owner(stream, &principal);
        w.insert(
            key,
            owner,
            stream,
            Some(position),
            at,
            s,
            self.max_entries,
            &mut evicted,
        );
        metrics.restored.inc();
        metrics.keys.set(w.map.len() as i64);
        drop(guard);
        evicted.record(metrics);
    }

    /// Forgets expired keys of every stream, and frees owners and streams left without keys.
    pub(crate) fn sweep(&self, window_ms: impl Fn(&str) -> u64, metrics: &DedupMetrics) {
        let now = self.now_ms();
        let mut w = self.inner.lock().expect("dedup window poisoned");
        let names: Vec<Arc<str>> = w.streams.keys().cloned().collect();
        let mut evicted = Evicted::default();
        for name in names {
            w.expire(&name, now, window_ms(&name), &mut evicted);
        }
        w.free_empty();
        metrics.keys.set(w.map.len() as i64);
        drop(w);
        evicted.record(metrics);
    }

    /// Keys in the window.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().expect("dedup window poisoned").map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::super::Dedup;
    use super::*;
    use bytes::Bytes;
    use sluice_core::{Admission, Permissions, Principal, Protocol, StreamName};
    use sluice_core::{Event, IngestRequest, Rejection};
    use std::time::Duration;

    fn settings() -> StreamSettings {
        StreamSettings {
            dedup: true,
            ..StreamSettings::default()
        }
    }

    fn dedup(max_entries: u64) -> Arc<Dedup> {
        Arc::new(Dedup::embedded(max_entries, DedupMetrics::default()))
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
            record_headers: Vec::new(),
            trace: None,
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
        plan.take_tickets().settle(&receipts).await;
        plan.receipts(receipts)
    }

    fn dup(offset: u64) -> Receipt {
        Receipt::Duplicate {
            partition: 0,
            offset: Some(offset),
            spooled: false,
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
        plan.take_tickets()
            .settle(&[
                failed.clone(),
                Receipt::Appended {
                    partition: 0,
                    offset: 5,
                },
            ])
            .await;
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
        tickets.settle(&appended(3, 1)).await;
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

    #[tokio::test(start_paused = true)]
    async fn a_retry_that_gives_up_waiting_releases_the_keys_it_claimed() {
        let d = dedup(1000);
        let mut original = request("a", settings(), &["1"]);
        let mut plan = d.plan(&mut original).await.unwrap();
        let _in_flight = plan.take_tickets();
        // "2" is claimed, then the wait for "1" passes its deadline (the paused clock jumps).
        let mut retry = request("a", settings(), &["2", "1"]);
        let refused = d.plan(&mut retry).await.err().expect("the wait gives up");
        assert_eq!(refused.code(), "unavailable");
        // "2" was released: the next request with it appends instead of waiting for nobody.
        assert_eq!(send(&d, "a", settings(), &["2"], 9).await, appended(9, 1));
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let principal = Principal::new("a", Permissions::All);
        let at = |offset| Position {
            partition: 0,
            offset: Some(offset),
        };
        let restored =
            |id: Option<&[u8]>, key: Option<&[u8]>, offset, ts_ms| super::super::Restored {
                stream: stream.clone(),
                settings: s,
                principal: principal.identity().as_bytes().to_vec(),
                id: id.map(<[u8]>::to_vec),
                request_key: key.map(<[u8]>::to_vec),
                mqtt_packet: None,
                position: at(offset),
                ts_ms,
            };
        d.restore(&[
            restored(Some(b"1"), None, 7, now - 1000),
            restored(None, Some(b"batch-1#0"), 8, now - 1000),
            // Older than the window: not restored.
            restored(Some(b"old"), None, 1, now - s.dedup_window_ms as i64 - 1),
        ])
        .await
        .unwrap();
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
