//! The embedded dedup window: in memory, bounded by its principal's share of the stream
//! (`dedup_principal_events`), by the stream's window (`dedup_window_events`) and by the whole
//! window (`dedup.max_entries`), oldest first in each, and by time (`dedup_window_ms`).
//!
//! Keys are 128-bit digests: 64 bits of SipHash under a key chosen at random at start (which
//! places the key in a table, so a producer cannot aim its keys at one spot of it) and 64 bits
//! of foldhash seeded per stream and principal from a second random SipHash key (so a producer
//! cannot make two of its keys collide without colliding both). Each (stream, principal) owns
//! its keys: a FIFO of entries (digest and the original's position, 32 bytes) numbered
//! consecutively, and two generations of tables from digest to entry number (24-byte slots).
//! The tables are where the time goes (a cache miss per new key once they outgrow the
//! caches), so nothing else touches them: a request's answers are written into its consecutive
//! entries, an eviction only moves a FIFO's front, and the tables' garbage goes a generation
//! at a time ([`Owner`]). Each stream keeps a FIFO of its owners' entries (24 bytes each) for
//! its window and its expiry. The channel a retry waits on exists only while one waits. The
//! window is rebuilt at start from the embedded log, which stores each event's id, its
//! principal and (as headers) its request or packet key, so a restart — even SIGKILL — keeps
//! it.

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

/// An owner's keys: the number of each one's entry, in an open-addressed table with linear
/// probing, placed by the key's first 64 bits (already a keyed hash) and at most 4/5 full
/// (measured as fast as half full, in half the memory).
/// Written here rather than taken from `hashbrown` for one property: a lookup reads the very
/// slot an insert of the same key writes, so a request's lookups (run in one pass, their cache
/// misses overlapping) leave its inserts nothing to wait for. Keys are never removed one by
/// one — a whole generation is cleared at once ([`Owner`]) — so no tombstones are needed.
#[derive(Default)]
struct Table {
    slots: Vec<(Key, u64)>,
    len: usize,
}

/// The entry number of an empty slot.
const EMPTY: u64 = u64::MAX;

impl Table {
    /// Where `key` is, or the empty slot where it would go.
    fn find(&self, key: &Key) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = key.0[0] as usize & mask;
        loop {
            let (k, seq) = &self.slots[i];
            if *seq == EMPTY || k == key {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Reads the home slot of each key, so the lookups that follow find them in the cache: a
    /// loop this short keeps many cache misses in flight at once, where the lookups (longer,
    /// branchy) would wait for them one or two at a time.
    fn touch(&self, keys: &[Key]) -> u64 {
        if self.len == 0 {
            return 0;
        }
        let mask = self.slots.len() - 1;
        keys.iter()
            .fold(0, |acc, k| acc ^ self.slots[k.0[0] as usize & mask].1)
    }

    fn get(&self, key: &Key) -> Option<u64> {
        if self.len == 0 {
            return None;
        }
        let (_, seq) = self.slots[self.find(key)];
        (seq != EMPTY).then_some(seq)
    }

    fn insert(&mut self, key: Key, seq: u64) {
        if 5 * (self.len + 1) > 4 * self.slots.len() {
            // From 4 slots: a device holding a key or two costs 96 bytes of table, not more.
            self.resize((2 * self.slots.len()).max(4));
        }
        let i = self.find(&key);
        if self.slots[i].1 == EMPTY {
            self.len += 1;
        }
        self.slots[i] = (key, seq);
    }

    /// Rehashes into `capacity` slots (a power of two).
    fn resize(&mut self, capacity: usize) {
        let old = std::mem::replace(&mut self.slots, vec![(Key([0, 0]), EMPTY); capacity]);
        self.len = 0;
        for (k, seq) in old {
            if seq != EMPTY {
                let i = self.find(&k);
                self.slots[i] = (k, seq);
                self.len += 1;
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the table, keeping its slots (one sequential write) unless there are more than
    /// `keep` of them: then they are freed (an owner whose window shrank does not keep them).
    fn clear(&mut self, keep: usize) {
        if self.slots.len() > keep {
            self.slots = Vec::new();
        } else {
            self.slots.fill((Key([0, 0]), EMPTY));
        }
        self.len = 0;
    }
}

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

/// A claimed key: its owner and its number there.
pub(crate) struct Token {
    owner: u32,
    seq: u64,
}

/// `partition` of a key whose original is still in flight.
const PENDING: u32 = u32::MAX;
/// `partition` of a key released (its original failed): it answers nothing.
const RELEASED: u32 = u32::MAX - 1;
/// `offset` of an event acked on receipt (no offset yet).
const NO_OFFSET: u64 = u64::MAX;

/// A key in its owner's FIFO, with what its retries are answered.
struct Held {
    key: Key,
    /// The original's partition; [`PENDING`] while it is in flight, [`RELEASED`] once failed.
    partition: u32,
    offset: u64,
}

impl Held {
    fn position(&self) -> Option<Position> {
        (self.partition < RELEASED).then_some(Position {
            partition: self.partition,
            offset: (self.offset != NO_OFFSET).then_some(self.offset),
        })
    }
}

/// An entry of a stream's FIFO: a key's owner, its number there, and when it was put.
#[derive(Clone, Copy)]
struct Entry {
    seq: u64,
    at_ms: u64,
    owner: u32,
}

/// A stream's keys: their FIFO (for its window and its expiry) and its owners by principal.
/// Entries its owners evicted stay behind until they reach the front (or a compaction).
#[derive(Default)]
struct StreamWindow {
    fifo: VecDeque<Entry>,
    count: usize,
    principals: Names<u32>,
}

impl StreamWindow {
    /// The oldest entry not evicted yet (those evicted through their owner are dropped here):
    /// its owner's oldest entry too.
    fn front(&mut self, owners: &[Owner]) -> Option<Entry> {
        while let Some(e) = self.fifo.front().copied() {
            if e.seq >= owners[e.owner as usize].floor {
                debug_assert_eq!(owners[e.owner as usize].floor, e.seq);
                return Some(e);
            }
            self.fifo.pop_front();
        }
        None
    }
}

/// One principal's keys on one stream, oldest first, numbered consecutively from `floor`:
/// the entry numbered `n` is `fifo[n - floor]`. Each counts against the bounds until it is
/// evicted from the front (a released key too, until its turn). Appends are answered here —
/// a request's keys are consecutive, so settling them is one sequential write, not a lookup
/// per key — and an eviction only moves the front, without touching the tables (that lookup
/// was a cache miss per new key once the window outgrew the caches).
///
/// The tables map keys to entry numbers in two generations: `current` holds the keys put
/// since `gen_start`, `previous` older ones. Slots numbered below `floor` are garbage that
/// lookups skip; once `floor` passes `gen_start`, all of `previous` is garbage and it is
/// cleared at once (no lookup per evicted key, no sweep), and `current` becomes `previous`
/// when it holds at least as many keys as the FIFO. So each table holds at most about the
/// owner's share of keys. A freed owner's index keeps its `floor`, so a token of its earlier
/// owner never finds an entry.
struct Owner {
    stream: Arc<str>,
    principal: Arc<str>,
    fifo: VecDeque<Held>,
    floor: u64,
    current: Table,
    previous: Table,
    gen_start: u64,
}

impl Owner {
    /// The live entry of `key`, if it is in this owner's window.
    fn get(&self, key: &Key) -> Option<&Held> {
        // The newest slot of a key is in `current` if it is anywhere there.
        let seq = self.current.get(key).or_else(|| self.previous.get(key))?;
        self.held(seq).filter(|h| h.key == *key)
    }

    /// Adds a key's entry; returns its number.
    fn push(&mut self, held: Held) -> u64 {
        let seq = self.next();
        self.current.insert(held.key, seq);
        self.fifo.push_back(held);
        seq
    }

    /// Clears `previous` once it holds only garbage, and starts a new generation when
    /// `current` is at least as large as the window it serves.
    fn rotate(&mut self) {
        if self.floor >= self.gen_start && !self.previous.is_empty() {
            // Its slots serve the next generation, unless the owner's window shrank (so an
            // owner that once held many keys does not keep their memory).
            self.previous.clear(4 * self.fifo.len() + 64);
        }
        if self.previous.is_empty() && self.current.len() >= self.fifo.len().max(16) {
            std::mem::swap(&mut self.current, &mut self.previous);
            self.gen_start = self.next();
        }
    }

    fn held(&self, seq: u64) -> Option<&Held> {
        self.fifo
            .get(usize::try_from(seq.checked_sub(self.floor)?).ok()?)
    }

    fn held_mut(&mut self, seq: u64) -> Option<&mut Held> {
        self.fifo
            .get_mut(usize::try_from(seq.checked_sub(self.floor)?).ok()?)
    }

    fn next(&self) -> u64 {
        self.floor + self.fifo.len() as u64
    }
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

type Waiters = HashMap<Key, watch::Sender<Option<Position>>, BuildHasherDefault<DigestHasher>>;

struct Inner {
    streams: Names<StreamWindow>,
    /// Owners by index; one without keys is freed by the next sweep (not at once, so an index
    /// a request resolved stays valid while it inserts).
    owners: Vec<Owner>,
    free: Vec<u32>,
    /// The channels retries wait on, for keys in flight that have a waiter.
    waiters: Waiters,
    /// Entries in the owners' FIFOs: what the bounds count.
    live: usize,
}

/// Evicts owner `o`'s oldest entry (of stream window `w`) without touching its tables.
fn evict_front(
    owners: &mut [Owner],
    o: u32,
    w: &mut StreamWindow,
    waiters: &mut Waiters,
    live: &mut usize,
) -> bool {
    let owner = &mut owners[o as usize];
    let Some(held) = owner.fifo.pop_front() else {
        return false;
    };
    let seq = owner.floor;
    owner.floor += 1;
    *live -= 1;
    w.count -= 1;
    if w.fifo.front().is_some_and(|e| e.owner == o && e.seq == seq) {
        w.fifo.pop_front();
    }
    // Its waiters (if it is pending) are told the original failed, as when it is released.
    if held.partition == PENDING && !waiters.is_empty() {
        waiters.remove(&held.key);
    }
    true
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
        let o = match self.free.pop() {
            Some(o) => {
                let owner = &mut self.owners[o as usize];
                owner.stream = stream.clone();
                owner.principal = principal.clone();
                owner.gen_start = owner.floor;
                o
            }
            None => {
                self.owners.push(Owner {
                    stream: stream.clone(),
                    principal: principal.clone(),
                    fifo: VecDeque::new(),
                    floor: 0,
                    current: Table::default(),
                    previous: Table::default(),
                    gen_start: 0,
                });
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

    /// Releases the entry of `token`: its retries are appended from now on (its place in the
    /// FIFOs is kept until its turn); its waiters are told the original failed.
    fn release(&mut self, token: &Token) {
        if let Some(held) = self.owners[token.owner as usize].held_mut(token.seq) {
            held.partition = RELEASED;
            if !self.waiters.is_empty() {
                self.waiters.remove(&held.key);
            }
        }
    }

    /// The window of `stream`, with what evicting from it needs.
    fn evicting(
        &mut self,
        stream: &str,
    ) -> Option<(&mut StreamWindow, &mut [Owner], &mut Waiters, &mut usize)> {
        let Inner {
            streams,
            owners,
            waiters,
            live,
            ..
        } = self;
        Some((streams.get_mut(stream)?, owners, waiters, live))
    }

    /// Evicts the oldest live entry of `stream`.
    fn evict_stream_oldest(&mut self, stream: &str) -> bool {
        let Some((w, owners, waiters, live)) = self.evicting(stream) else {
            return false;
        };
        w.front(owners)
            .is_some_and(|e| evict_front(owners, e.owner, w, waiters, live))
    }

    /// Forgets the stream's keys older than its window. A key still pending (its original in
    /// flight) stops the expiry until it is answered, so it keeps answering its retries.
    fn expire(&mut self, stream: &str, now_ms: u64, window_ms: u64, evicted: &mut Evicted) {
        let Some((w, owners, waiters, live)) = self.evicting(stream) else {
            return;
        };
        while let Some(e) = w.front(owners) {
            // The front is the oldest entry: if it is young enough nothing here is expired.
            if e.at_ms.saturating_add(window_ms) > now_ms
                || owners[e.owner as usize]
                    .held(e.seq)
                    .is_some_and(|h| h.partition == PENDING)
            {
                return;
            }
            evict_front(owners, e.owner, w, waiters, live);
            evicted.expired += 1;
        }
    }

    /// Forgets the oldest keys so that `n` new keys of `owner` (of `stream`) fit within the
    /// three bounds. Evictions only move FIFO fronts: no table is read.
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
        let over = (self.owners[owner as usize].fifo.len() + n).saturating_sub(share);
        if over > 0 {
            let (w, owners, waiters, live) = self
                .evicting(stream)
                .expect("an owner's stream has a window");
            for _ in 0..over {
                if !evict_front(owners, owner, w, waiters, live) {
                    break;
                }
                evicted.principal_share += 1;
            }
        }
        let window = usize::try_from(s.dedup_window_events).unwrap_or(usize::MAX);
        let stream_count = self.streams.get(stream).map_or(0, |w| w.count);
        for _ in 0..(stream_count + n).saturating_sub(window) {
            if !self.evict_stream_oldest(stream) {
                break;
            }
            evicted.stream_window += 1;
        }
        // The whole window: this stream's oldest key goes first; a stream holding none takes
        // the place of the oldest key of the stream holding the most.
        while self.live + n > max_entries {
            let made_room = self.evict_stream_oldest(stream) || {
                let largest = self
                    .streams
                    .iter()
                    .max_by_key(|(_, w)| w.count)
                    .map(|(name, _)| name.clone());
                largest.is_some_and(|name| self.evict_stream_oldest(&name))
            };
            if !made_room {
                break;
            }
            evicted.max_entries += 1;
        }
    }

    /// Adds `key` for `owner` (of `stream`); room was made first. Its number.
    fn put(
        &mut self,
        key: Key,
        owner: u32,
        stream: &str,
        position: Option<Position>,
        at_ms: u64,
    ) -> u64 {
        let (partition, offset) = match position {
            Some(p) => (p.partition, p.offset.unwrap_or(NO_OFFSET)),
            None => (PENDING, NO_OFFSET),
        };
        let Inner {
            owners,
            streams,
            live,
            ..
        } = self;
        let seq = owners[owner as usize].push(Held {
            key,
            partition,
            offset,
        });
        *live += 1;
        let w = streams
            .get_mut(stream)
            .expect("an owner's stream has a window");
        w.count += 1;
        w.fifo.push_back(Entry { seq, at_ms, owner });
        // Entries evicted through their owner pile up behind a front another owner holds.
        if w.fifo.len() > 2 * w.count + 64 {
            w.fifo.retain(|e| e.seq >= owners[e.owner as usize].floor);
        }
        seq
    }

    /// Frees owners and streams without keys.
    fn free_empty(&mut self) {
        for (i, o) in self.owners.iter_mut().enumerate() {
            if o.fifo.is_empty() && !o.stream.is_empty() {
                if let Some(w) = self.streams.get_mut(&o.stream) {
                    w.principals.remove(&o.principal);
                }
                o.stream = Arc::from("");
                o.fifo = VecDeque::new();
                o.current = Table::default();
                o.previous = Table::default();
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
                streams: Names::default(),
                owners: Vec::new(),
                free: Vec::new(),
                waiters: HashMap::default(),
                live: 0,
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
        // Four passes: the home slots of every key are read in both tables, then every lookup,
        // then the evictions that make room for the new keys, then the inserts — so the cache
        // misses overlap instead of queueing one by one.
        let o = &w.owners[owner as usize];
        std::hint::black_box(o.current.touch(&digests) ^ o.previous.touch(&digests));
        let mut claims: Vec<Option<Claim>> = Vec::with_capacity(keys.len());
        let mut fresh = 0;
        for (key, m) in digests.iter().zip(keys) {
            let found = w.owners[owner as usize]
                .get(key)
                .filter(|h| h.partition != RELEASED)
                .map(Held::position);
            claims.push(match found {
                // A new MQTT publish reusing a packet id takes the key over from the earlier
                // publish, once that one is stored.
                Some(Some(_)) if m.replace => {
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
                    Claim::New(AnyToken::Memory(Token { owner, seq }))
                })
            })
            .collect();
        w.owners[owner as usize].rotate();
        metrics.keys.set(w.live as i64);
        drop(guard);
        evicted.record(metrics);
        claims
    }

    /// Records the outcome of claimed events: an appended event's key now answers its
    /// retries with its position; a failed one's (or one without a receipt) is released.
    /// A request's keys are consecutive entries of one owner: no table lookups.
    pub(crate) fn settle(&self, claims: Vec<Option<AnyToken>>, receipts: &[Receipt]) {
        let mut guard = self.inner.lock().expect("dedup window poisoned");
        let w = &mut *guard;
        for (i, claim) in claims.into_iter().enumerate() {
            let Some(AnyToken::Memory(token)) = claim else {
                continue;
            };
            match receipts.get(i).and_then(Position::of) {
                Some(p) => {
                    // None: pushed out of the window meanwhile.
                    let Some(held) = w.owners[token.owner as usize].held_mut(token.seq) else {
                        continue;
                    };
                    held.partition = p.partition;
                    held.offset = p.offset.unwrap_or(NO_OFFSET);
                    if !w.waiters.is_empty()
                        && let Some(tx) = w.waiters.remove(&held.key)
                    {
                        tx.send_replace(Some(p));
                    }
                }
                None => w.release(&token),
            }
        }
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
        let owner = w.owner(stream, &principal);
        w.make_room(owner, stream, 1, s, self.max_entries, &mut evicted);
        // A later event with the same key takes the slot over.
        w.put(key, owner, stream, Some(position), at);
        w.owners[owner as usize].rotate();
        metrics.restored.inc();
        metrics.keys.set(w.live as i64);
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
        for o in &mut w.owners {
            o.rotate();
        }
        metrics.keys.set(w.live as i64);
        drop(w);
        evicted.record(metrics);
    }

    /// Keys in the window (what its bounds count).
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().expect("dedup window poisoned").live
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

    /// Until `n` retries have waited for their originals (a real-time deadline: these tests
    /// may run on a paused clock).
    async fn waited(d: &Dedup, n: u64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while d.metrics().waits.get() < n {
            assert!(std::time::Instant::now() < deadline, "no retry waited");
            tokio::task::yield_now().await;
        }
    }

    /// The embedded window behind `d`.
    fn window(d: &Dedup) -> &Window {
        match &d.store {
            super::super::Store::Memory(w) => w,
            super::super::Store::Redis(_) => unreachable!("an embedded window"),
        }
    }

    #[tokio::test]
    async fn evicted_keys_leave_the_tables_by_generation_and_answer_nothing() {
        let share = 1_000;
        let s = StreamSettings {
            dedup_principal_events: share,
            ..settings()
        };
        let d = dedup(1_000_000);
        let ids: Vec<String> = (0..20_000).map(|i| format!("k{i}")).collect();
        let mut largest = 0;
        for (n, batch) in ids.chunks(100).enumerate() {
            let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
            let first = 100 * n as u64;
            assert_eq!(send(&d, "p", s, &batch, first).await, appended(first, 100));
            let inner = window(&d).inner.lock().unwrap();
            let o = &inner.owners[0];
            largest = largest.max(o.current.len() + o.previous.len());
        }
        // The window holds the newest share; the tables never held more than two generations
        // of it (evictions do not touch them: whole generations are cleared).
        assert_eq!(d.len(), share as usize);
        assert!(largest <= 2 * share as usize + 100, "{largest}");
        assert!(
            largest > share as usize,
            "{largest}: no garbage was ever kept"
        );
        // Evicted keys are garbage in the tables until their generation goes: never answered.
        assert_eq!(
            send(&d, "p", s, &["k0", "k18999"], 50_000).await,
            appended(50_000, 2)
        );
        assert_eq!(
            send(&d, "p", s, &["k19999"], 60_000).await,
            vec![dup(19_999)]
        );
        assert_eq!(
            d.metrics()
                .evictions
                .get_or_create(&EvictLabels {
                    reason: "principal_share"
                })
                .get(),
            20_002 - share
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_in_flight_outlives_its_window_until_it_is_answered() {
        let s = StreamSettings {
            dedup_window_ms: 1_000,
            ..settings()
        };
        let d = dedup(1000);
        let mut original = request("a", s, &["1"]);
        let mut plan = d.plan(&mut original).await.unwrap();
        let tickets = plan.take_tickets();
        tokio::time::advance(Duration::from_secs(5)).await;
        // Another request expires the stream's old keys: "1" is still in flight, so it stays,
        // and so does the key behind it.
        send(&d, "a", s, &["2"], 7).await;
        let d2 = d.clone();
        let retry = tokio::spawn(async move { send(&d2, "a", s, &["1"], 99).await });
        waited(&d, 1).await;
        tickets.settle(&appended(3, 1)).await;
        assert_eq!(retry.await.unwrap(), vec![dup(3)]);
        assert_eq!(d.len(), 2);
        // Once answered, it expires like any other key.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(send(&d, "a", s, &["1", "2"], 20).await, appended(20, 2));
        assert_eq!(d.len(), 2);
    }

    #[tokio::test]
    async fn a_token_of_a_freed_owner_does_not_answer_for_the_next_owner_of_its_index() {
        let s = settings();
        let d = dedup(1);
        // "a" claims "x"; "b" pushes it out of the (one key) window before it is answered.
        let mut original = request("a", s, &["x"]);
        let mut plan = d.plan(&mut original).await.unwrap();
        let stale = plan.take_tickets();
        assert_eq!(send(&d, "b", s, &["y"], 1).await, appended(1, 1));
        // The sweep frees "a"'s owner; "c" takes its index and claims "z".
        window(&d).sweep(|_| s.dedup_window_ms, d.metrics());
        let mut next = request("c", s, &["z"]);
        let mut plan = d.plan(&mut next).await.unwrap();
        let tickets = plan.take_tickets();
        {
            let inner = window(&d).inner.lock().unwrap();
            assert_eq!(inner.streams["orders"].principals["c"], 0, "index reused");
        }
        // The stale token's answer lands nowhere: "z" is still in flight.
        stale.settle(&appended(500, 1)).await;
        let d2 = d.clone();
        let retry = tokio::spawn(async move { send(&d2, "c", s, &["z"], 99).await });
        waited(&d, 1).await;
        tickets.settle(&appended(2, 1)).await;
        assert_eq!(retry.await.unwrap(), vec![dup(2)]);
    }
    #[test]
    fn the_table_finds_every_key_it_holds_and_none_it_does_not() {
        let mut t = Table::default();
        assert_eq!(t.get(&Key([1, 1])), None);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut keys = Vec::new();
        for i in 0..10_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Every 50th key lands on the last slot of any table, so probes wrap around.
            let k = Key([if i % 50 == 0 { u64::MAX } else { x }, i]);
            t.insert(k, i);
            keys.push(k);
            assert!(5 * t.len() <= 4 * t.slots.len() && t.slots.len().is_power_of_two());
        }
        assert_eq!(t.len(), 10_000);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(t.get(k), Some(i as u64));
            assert_eq!(t.get(&Key([k.0[0], k.0[1] + 1_000_000])), None);
        }
        // The same key again takes its slot over.
        t.insert(keys[7], 70_000);
        assert_eq!((t.get(&keys[7]), t.len()), (Some(70_000), 10_000));
        // Cleared: its slots kept if few enough, else freed.
        let slots = t.slots.len();
        t.clear(slots);
        assert_eq!((t.len(), t.slots.len(), t.get(&keys[1])), (0, slots, None));
        t.insert(keys[1], 1);
        assert_eq!(t.get(&keys[1]), Some(1));
        t.clear(16);
        assert!(t.is_empty() && t.slots.is_empty());
        assert_eq!(t.get(&keys[1]), None);
    }
    #[tokio::test]
    async fn a_producer_holding_one_key_costs_a_table_of_four_slots() {
        let d = dedup(1_000_000);
        for p in 0..1_000 {
            send(&d, &format!("device-{p}"), settings(), &["1"], p).await;
        }
        let inner = window(&d).inner.lock().unwrap();
        assert_eq!(inner.owners.len(), 1_000);
        for o in &inner.owners {
            assert_eq!((o.current.slots.len(), o.previous.slots.len()), (4, 0));
        }
    }
}
