//! The stores of persistent MQTT sessions (docs/mqtt.md "Persistent sessions"), beside the
//! dedup window in the same state store (DESIGN §10): files in `data_dir/mqtt-sessions/` with
//! the embedded dedup store, Redis with the Redis one (a device reconnecting to another
//! gateway of the fleet finds its session there).
//!
//! A session is small (its expiry and the QoS 2 packet ids awaiting PUBREL) and written at
//! CONNECT and when its connection ends, so one file per session (written whole, then renamed
//! over the old one) costs less than a journal and its compaction. Files are not fsynced: a
//! session survives the gateway's crash (the page cache keeps what was written), not the
//! machine's; what a lost session costs is at most a QoS 2 publish stored twice, never a lost one,
//! and the stream's dedup (key `mqtt_packet`) covers that too.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use sluice_protocols::mqtt::store::{SessionId, SessionStore, StoreFuture, StoredSession};

use crate::dedup::DedupMetrics;
use crate::dedup::redis::RedisStore;

/// A session as stored: who it belongs to (checked on load: the file or key name is a digest),
/// when it expires, and what it keeps.
#[derive(Serialize, Deserialize)]
struct Record {
    principal: String,
    client_id: String,
    expiry_secs: u32,
    expires_at_ms: u64,
    qos2: Vec<u16>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The first 128 bits of SHA-256 over the principal (length-prefixed) and the client id.
fn digest(id: SessionId<'_>) -> u128 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(id.principal.len() as u64).to_le_bytes());
    ctx.update(id.principal.as_bytes());
    ctx.update(id.client_id.as_bytes());
    let d = ctx.finish();
    u128::from_le_bytes(d.as_ref()[..16].try_into().expect("16 bytes"))
}

fn record(id: SessionId<'_>, s: &StoredSession) -> Record {
    Record {
        principal: id.principal.to_string(),
        client_id: id.client_id.to_string(),
        expiry_secs: s.expiry_secs,
        expires_at_ms: now_ms().saturating_add(u64::from(s.expiry_secs) * 1000),
        qos2: s.qos2.clone(),
    }
}

/// The session of `id` in `r`, if `r` is that session's and has not expired.
fn session_of(id: SessionId<'_>, r: Record) -> Option<StoredSession> {
    (r.principal == id.principal && r.client_id == id.client_id && r.expires_at_ms > now_ms())
        .then_some(StoredSession {
            expiry_secs: r.expiry_secs,
            qos2: r.qos2,
        })
}

/// Which sessions exist, by expiry, so the bounds push out the one expiring soonest; with
/// each its principal and what it keeps (a few bytes), so loading one reads no file.
#[derive(Default)]
struct Index {
    by_name: HashMap<u128, (Arc<str>, u64, StoredSession)>,
    order: BTreeSet<(u64, u128)>,
    per_principal: HashMap<Arc<str>, BTreeSet<(u64, u128)>>,
}

impl Index {
    fn insert(&mut self, name: u128, principal: &str, expires_at: u64, session: StoredSession) {
        self.remove(name);
        let p: Arc<str> = match self.per_principal.get_key_value(principal) {
            Some((k, _)) => k.clone(),
            None => principal.into(),
        };
        self.order.insert((expires_at, name));
        self.per_principal
            .entry(p.clone())
            .or_default()
            .insert((expires_at, name));
        self.by_name.insert(name, (p, expires_at, session));
    }

    fn remove(&mut self, name: u128) -> bool {
        let Some((p, at, _)) = self.by_name.remove(&name) else {
            return false;
        };
        self.order.remove(&(at, name));
        if let Some(set) = self.per_principal.get_mut(&p) {
            set.remove(&(at, name));
            if set.is_empty() {
                self.per_principal.remove(&p);
            }
        }
        true
    }

    /// Names to forget so that `principal` holds at most `per_principal` sessions and all at
    /// most `total`, soonest expiring first, never `keep`.
    fn over(
        &mut self,
        principal: &str,
        keep: u128,
        per_principal: usize,
        total: usize,
    ) -> Vec<u128> {
        let mut out = Vec::new();
        loop {
            let mine = self.per_principal.get(principal);
            let victim = if mine.is_some_and(|s| s.len() > per_principal) {
                mine.and_then(|s| s.iter().find(|(_, n)| *n != keep).map(|(_, n)| *n))
            } else if self.by_name.len() > total {
                self.order.iter().find(|(_, n)| *n != keep).map(|(_, n)| *n)
            } else {
                None
            };
            match victim {
                Some(n) => {
                    self.remove(n);
                    out.push(n);
                }
                None => return out,
            }
        }
    }

    fn expired(&self, now: u64) -> Vec<u128> {
        self.order
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, n)| *n)
            .collect()
    }
}

/// Persistent sessions as files in a directory of `data_dir`.
pub struct FileSessions {
    dir: PathBuf,
    per_principal: usize,
    total: usize,
    index: Mutex<Index>,
    stored: Gauge,
    /// Makes each write's temporary file name unique (two saves of one session may overlap
    /// when its previous connection took longer than the CONNECT deadline to end).
    writes: std::sync::atomic::AtomicU64,
}

impl FileSessions {
    /// Opens (or makes) the directory and indexes the sessions in it, deleting expired and
    /// unreadable ones.
    pub fn open(
        dir: &Path,
        per_principal: usize,
        total: usize,
        stored: Gauge,
    ) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
        let mut index = Index::default();
        let now = now_ms();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| u128::from_str_radix(n, 16).ok());
            let record = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            match (name, record) {
                (Some(n), Some(r)) if r.expires_at_ms > now => index.insert(
                    n,
                    &r.principal,
                    r.expires_at_ms,
                    StoredSession {
                        expiry_secs: r.expiry_secs,
                        qos2: r.qos2,
                    },
                ),
                // Expired, a rename that never happened, or not ours to read.
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let this = Arc::new(Self {
            dir: dir.to_path_buf(),
            per_principal,
            total,
            index: Mutex::new(index),
            stored,
            writes: Default::default(),
        });
        this.stored
            .set(this.index.lock().unwrap().by_name.len() as i64);
        Ok(this)
    }

    fn path(&self, name: u128) -> PathBuf {
        self.dir.join(format!("{name:032x}"))
    }

    fn delete(&self, names: &[u128]) {
        for n in names {
            let _ = std::fs::remove_file(self.path(*n));
        }
    }

    /// Forgets expired sessions (run every minute).
    pub fn sweep(&self) {
        let names = {
            let mut index = self.index.lock().unwrap();
            let names = index.expired(now_ms());
            for n in &names {
                index.remove(*n);
            }
            self.stored.set(index.by_name.len() as i64);
            names
        };
        self.delete(&names);
    }

    /// The session of `id`, from memory (the files are read once, at start).
    fn load_now(&self, id: SessionId<'_>) -> Result<Option<StoredSession>, String> {
        let name = digest(id);
        let now = now_ms();
        let index = self.index.lock().unwrap();
        Ok(index
            .by_name
            .get(&name)
            .filter(|(p, at, _)| &**p == id.principal && *at > now)
            .map(|(_, _, s)| s.clone()))
    }

    fn save_now(&self, id: SessionId<'_>, s: &StoredSession) -> Result<(), String> {
        let name = digest(id);
        let r = record(id, s);
        let bytes = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
        let n = self
            .writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".{name:032x}.{n}.tmp"));
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, self.path(name)))
            .map_err(|e| format!("{}: {e}", self.dir.display()))?;
        let evicted = {
            let mut index = self.index.lock().unwrap();
            index.insert(name, id.principal, r.expires_at_ms, s.clone());
            let out = index.over(id.principal, name, self.per_principal, self.total);
            self.stored.set(index.by_name.len() as i64);
            out
        };
        if !evicted.is_empty() {
            tracing::debug!(
                sessions = evicted.len(),
                "MQTT session store full: forgot the sessions expiring soonest"
            );
        }
        self.delete(&evicted);
        Ok(())
    }

    fn remove_now(&self, id: SessionId<'_>) -> Result<(), String> {
        let name = digest(id);
        let had = {
            let mut index = self.index.lock().unwrap();
            let had = index.remove(name);
            self.stored.set(index.by_name.len() as i64);
            had
        };
        if had {
            match std::fs::remove_file(self.path(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("session file {name:032x}: {e}")),
            }
        }
        Ok(())
    }
}

/// Runs a file operation off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("session store task: {e}"))?
}

/// An owned copy of a session id, for a blocking task.
fn owned(id: SessionId<'_>) -> (String, String) {
    (id.principal.to_string(), id.client_id.to_string())
}

fn borrowed(o: &(String, String)) -> SessionId<'_> {
    SessionId {
        principal: &o.0,
        client_id: &o.1,
    }
}

/// [`FileSessions`] as a [`SessionStore`] (its file operations run on blocking threads).
pub struct SharedFiles(pub Arc<FileSessions>);

impl SessionStore for SharedFiles {
    fn load<'a>(&'a self, id: SessionId<'a>) -> StoreFuture<'a, Option<StoredSession>> {
        // From memory: no file is read, so no blocking thread is needed.
        Box::pin(std::future::ready(self.0.load_now(id)))
    }

    fn save<'a>(&'a self, id: SessionId<'a>, s: &'a StoredSession) -> StoreFuture<'a, ()> {
        let (this, id, s) = (self.0.clone(), owned(id), s.clone());
        Box::pin(blocking(move || this.save_now(borrowed(&id), &s)))
    }

    fn remove<'a>(&'a self, id: SessionId<'a>) -> StoreFuture<'a, ()> {
        let (this, id) = (self.0.clone(), owned(id));
        Box::pin(blocking(move || this.remove_now(borrowed(&id))))
    }
}

/// Stores a session and keeps the bounds. KEYS: the session's key, its principal's sorted
/// set, the sorted set of all sessions. ARGV: the record, its TTL in ms, its expiry (ms since
/// the epoch), the member (`{principal digest}:{session digest}`), the principal's and the
/// total bound, the key prefix of sessions and of principals' sets. Sorted sets are scored by
/// expiry, so the sessions expiring soonest are pushed out first. Returns how many were.
const SAVE: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local evicted = 0
local function forget(member)
  local sep = string.find(member, ':', 1, true)
  redis.call('DEL', ARGV[7] .. string.sub(member, sep + 1))
  redis.call('ZREM', ARGV[8] .. string.sub(member, 1, sep - 1), member)
  redis.call('ZREM', KEYS[3], member)
  evicted = evicted + 1
end
for _, set in ipairs({{KEYS[2], tonumber(ARGV[5])}, {KEYS[3], tonumber(ARGV[6])}}) do
  local over = redis.call('ZCARD', set[1]) - set[2]
  if over > 0 then
    local old = redis.call('ZRANGE', set[1], 0, over)
    for _, m in ipairs(old) do
      if over > 0 and m ~= ARGV[4] then
        forget(m)
        over = over - 1
      end
    end
  end
end
-- The principal's set lives as long as its longest session (extended, never shortened).
local ttl = redis.call('PTTL', KEYS[2])
if ttl < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return evicted
";

/// Persistent sessions in Redis, beside the dedup window: `{prefix}ms:{digest}` holds a
/// session (expiring with it), `{prefix}msp:{principal digest}` and `{prefix}msa` index them by
/// expiry for the bounds.
pub struct RedisSessions {
    store: Arc<RedisStore>,
    metrics: DedupMetrics,
    prefix: String,
    per_principal: usize,
    total: usize,
}

impl RedisSessions {
    pub fn new(
        store: Arc<RedisStore>,
        metrics: DedupMetrics,
        prefix: &str,
        per_principal: usize,
        total: usize,
    ) -> Self {
        Self {
            store,
            metrics,
            prefix: prefix.to_string(),
            per_principal,
            total,
        }
    }

    fn key(&self, id: SessionId<'_>) -> String {
        format!("{}ms:{:032x}", self.prefix, digest(id))
    }

    fn principal_digest(principal: &str) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, principal.as_bytes());
        crate::dedup::redis::hex(&d.as_ref()[..16])
    }
}

impl SessionStore for RedisSessions {
    fn load<'a>(&'a self, id: SessionId<'a>) -> StoreFuture<'a, Option<StoredSession>> {
        Box::pin(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("GET").arg(self.key(id));
            let (v,): (Option<Vec<u8>>,) = self
                .store
                .query(&pipe, "session_load", &self.metrics)
                .await?;
            match v {
                None => Ok(None),
                Some(b) => {
                    let r: Record = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
                    Ok(session_of(id, r))
                }
            }
        })
    }

    fn save<'a>(&'a self, id: SessionId<'a>, s: &'a StoredSession) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let r = record(id, s);
            let value = serde_json::to_vec(&r).map_err(|e| e.to_string())?;
            let p = Self::principal_digest(id.principal);
            let member = format!("{p}:{:032x}", digest(id));
            let ttl = (u64::from(s.expiry_secs) * 1000).max(1);
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(SAVE)
                .arg(3)
                .arg(self.key(id))
                .arg(format!("{}msp:{p}", self.prefix))
                .arg(format!("{}msa", self.prefix))
                .arg(value)
                .arg(ttl)
                .arg(r.expires_at_ms)
                .arg(member)
                .arg(self.per_principal)
                .arg(self.total)
                .arg(format!("{}ms:", self.prefix))
                .arg(format!("{}msp:", self.prefix));
            let mut pipe = redis::pipe();
            pipe.add_command(cmd);
            let (_evicted,): (u64,) = self
                .store
                .query(&pipe, "session_save", &self.metrics)
                .await?;
            Ok(())
        })
    }

    fn remove<'a>(&'a self, id: SessionId<'a>) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let p = Self::principal_digest(id.principal);
            let member = format!("{p}:{:032x}", digest(id));
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(self.key(id)).ignore();
            pipe.cmd("ZREM")
                .arg(format!("{}msp:{p}", self.prefix))
                .arg(&member)
                .ignore();
            pipe.cmd("ZREM")
                .arg(format!("{}msa", self.prefix))
                .arg(&member)
                .ignore();
            self.store
                .query::<()>(&pipe, "session_remove", &self.metrics)
                .await
        })
    }
}

/// How often expired sessions are swept from the embedded store.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    fn id<'a>(p: &'a str, c: &'a str) -> SessionId<'a> {
        SessionId {
            principal: p,
            client_id: c,
        }
    }

    fn session(expiry_secs: u32, qos2: &[u16]) -> StoredSession {
        StoredSession {
            expiry_secs,
            qos2: qos2.to_vec(),
        }
    }

    #[test]
    fn saved_sessions_load_back_after_reopening_and_only_for_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileSessions::open(dir.path(), 10, 10, Gauge::default()).unwrap();
        s.save_now(id("key:a", "dev-1"), &session(60, &[3, 7]))
            .unwrap();
        s.save_now(id("key:a", "dev-2"), &session(60, &[])).unwrap();
        drop(s);
        let s = FileSessions::open(dir.path(), 10, 10, Gauge::default()).unwrap();
        assert_eq!(
            s.load_now(id("key:a", "dev-1")).unwrap(),
            Some(session(60, &[3, 7]))
        );
        // Another principal's client of the same id has no session.
        assert_eq!(s.load_now(id("jwt:a", "dev-1")).unwrap(), None);
        s.remove_now(id("key:a", "dev-1")).unwrap();
        assert_eq!(s.load_now(id("key:a", "dev-1")).unwrap(), None);
        assert_eq!(s.stored.get(), 1);
    }

    #[test]
    fn the_bounds_push_out_the_sessions_expiring_soonest() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileSessions::open(dir.path(), 2, 3, Gauge::default()).unwrap();
        s.save_now(id("p", "short"), &session(10, &[])).unwrap();
        s.save_now(id("p", "long"), &session(1000, &[])).unwrap();
        // The principal's third session pushes out its session expiring soonest.
        s.save_now(id("p", "mid"), &session(100, &[])).unwrap();
        assert_eq!(s.load_now(id("p", "short")).unwrap(), None);
        assert!(s.load_now(id("p", "long")).unwrap().is_some());
        assert!(s.load_now(id("p", "mid")).unwrap().is_some());
        // Past the total, the soonest of all goes, whoever's it is.
        s.save_now(id("q", "a"), &session(500, &[])).unwrap();
        s.save_now(id("q", "b"), &session(2000, &[])).unwrap();
        assert_eq!(s.load_now(id("p", "mid")).unwrap(), None);
        assert_eq!(s.stored.get(), 3);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn expired_and_unreadable_files_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileSessions::open(dir.path(), 10, 10, Gauge::default()).unwrap();
        s.save_now(id("p", "gone"), &session(0, &[1])).unwrap();
        assert_eq!(s.load_now(id("p", "gone")).unwrap(), None);
        s.sweep();
        assert_eq!(s.stored.get(), 0);
        std::fs::write(dir.path().join("not-a-session"), b"{").unwrap();
        drop(s);
        let s = FileSessions::open(dir.path(), 10, 10, Gauge::default()).unwrap();
        assert_eq!(s.stored.get(), 0);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
