//! Where persistent MQTT sessions live between connections (docs/mqtt.md "Persistent
//! sessions"): the gateway brings the store — files in `data_dir` by default, Redis when the
//! dedup store is Redis, so a device may reconnect to any gateway of a fleet.

use std::future::Future;
use std::pin::Pin;

/// A boxed future of a store operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// What a persistent session keeps between connections. Sluice only receives publishes, so a
/// session is the QoS 2 exchanges still open: a resent PUBLISH of one of these packet ids is
/// answered with PUBREC and not stored again, and its PUBREL is answered with PUBCOMP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredSession {
    /// How long the session outlives its connection, in seconds.
    pub expiry_secs: u32,
    /// QoS 2 packet identifiers stored and answered with PUBREC whose PUBREL has not arrived.
    pub qos2: Vec<u16>,
}

/// A session's identity in the store: the principal's identity (its source and name, so a JWT
/// subject cannot load the session of an API key of the same name) and the client identifier.
#[derive(Debug, Clone, Copy)]
pub struct SessionId<'a> {
    pub principal: &'a str,
    pub client_id: &'a str,
}

/// A store of persistent sessions. Every operation is bounded in time by the implementation;
/// a failure is an error string for the log (the session goes on without what failed).
pub trait SessionStore: Send + Sync + 'static {
    /// The session stored under `id`, unless there is none or it expired.
    fn load<'a>(&'a self, id: SessionId<'a>) -> StoreFuture<'a, Option<StoredSession>>;
    /// Stores `session` under `id`, expiring `session.expiry_secs` from now. Bounded in total
    /// and per principal: storing may forget the sessions expiring soonest.
    fn save<'a>(&'a self, id: SessionId<'a>, session: &'a StoredSession) -> StoreFuture<'a, ()>;
    /// Forgets the session under `id` (a clean start, or a session that does not outlive its
    /// connection).
    fn remove<'a>(&'a self, id: SessionId<'a>) -> StoreFuture<'a, ()>;
}

/// No persistent sessions: nothing is kept, every session starts clean.
pub struct NoSessions;

impl SessionStore for NoSessions {
    fn load<'a>(&'a self, _: SessionId<'a>) -> StoreFuture<'a, Option<StoredSession>> {
        Box::pin(async { Ok(None) })
    }

    fn save<'a>(&'a self, _: SessionId<'a>, _: &'a StoredSession) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn remove<'a>(&'a self, _: SessionId<'a>) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }
}
