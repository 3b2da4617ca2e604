//! One MQTT connection: CONNECT ([`connect`]), then the publish loop ([`serve`]) whose
//! appends run through the [`appender`] and whose answers are settled in order ([`acks`]), then
//! the will ([`registry`], which also holds the sessions by client identifier).

mod acks;
mod appender;
mod connect;
pub(super) mod registry;
mod serve;

use std::collections::{HashSet, VecDeque};
use std::num::NonZeroU16;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::types::{Publish, QoS};
use sluice_auth::{Credentials, FailureKind, Principal};
use sluice_core::{Event, Ingest, Protocol, Receipt, Rejection, StreamName};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::codec::{Codec, ConnAckProps, Connect, Hello, Inbound, Version, Will, hello};
use super::reason as rc;
use super::store::{SessionId, StoredSession};
use super::{Mqtt, PROTO, SessionKey, Transport};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

/// The outcome of one append: a receipt per event, or the batch's rejection.
type Outcome = Result<Vec<Receipt>, Rejection>;
/// An append in flight: its group, the items it holds, and its outcome.
type Append =
    std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Vec<usize>, Outcome)> + Send>>;
use crate::gate::{Gate, Refused, Revoked, SessionAuth};
use crate::server::ConnInfo;

use crate::lanes::Chain;
use appender::Appender;
use connect::{Accepted, accept, read_connect};

/// Publishes of one stream appended as one batch, at most.
const MAX_GROUP: usize = 256;
/// Batches per connection not yet answered; past it the connection is not read.
const MAX_GROUPS: usize = 64;
const CONTENT_TYPE: Bytes = Bytes::from_static(b"application/octet-stream");
/// The header marking a retained publish or will (`mqtt-retain: true`).
const RETAIN_HEADER: Bytes = Bytes::from_static(b"mqtt-retain");
const MAX_CLIENT_ID: usize = 256;
/// The smallest read buffer (idle connections; a busy connection's grows with its reads).
const MIN_READ: usize = 256;
/// How much a connection under backpressure may have buffered and still be read (to notice a
/// closed socket).
const PEEK_BYTES: usize = 4096;

/// Why and how a connection ends.
enum Close {
    /// DISCONNECT from the client; `will` for reason 0x04 (disconnect with will message).
    Client { will: bool },
    /// The connection ended without DISCONNECT.
    Eof,
    /// The server ends it: MQTT 5 gets DISCONNECT `code`.
    Error {
        code: u8,
        label: &'static str,
        message: String,
    },
    /// A new connection with the same client identifier took the session over.
    TakenOver,
    /// The gateway is draining.
    Shutdown,
    /// Acks could not be written in time (or at all).
    WriteFailed,
}

fn error(code: u8, label: &'static str, message: impl Into<String>) -> Close {
    Close::Error {
        code,
        label,
        message: message.into(),
    }
}

/// A publish refused with an MQTT 5 reason code.
#[derive(Debug, Clone)]
struct Refusal {
    code: u8,
    label: &'static str,
    message: String,
}

fn refusal_of(r: &Rejection) -> Refusal {
    let (code, label) = match r {
        Rejection::Unauthenticated { .. } | Rejection::Forbidden { .. } => {
            (rc::NOT_AUTHORIZED, "not_authorized")
        }
        Rejection::Malformed { .. }
        | Rejection::UnsupportedMediaType { .. }
        | Rejection::LengthRequired => (rc::PAYLOAD_FORMAT_INVALID, "malformed"),
        Rejection::TooLarge { .. } => (rc::PAYLOAD_FORMAT_INVALID, "too_large"),
        Rejection::NotFound { .. } => (rc::TOPIC_NAME_INVALID, "topic"),
        Rejection::OverQuota { .. } => (rc::QUOTA_EXCEEDED, "quota"),
        Rejection::Unavailable { .. } => (rc::IMPLEMENTATION_SPECIFIC_ERROR, "unavailable"),
        Rejection::Internal { .. } => (rc::IMPLEMENTATION_SPECIFIC_ERROR, "internal"),
    };
    Refusal {
        code,
        label,
        message: r.to_string(),
    }
}

enum State {
    /// Being appended; the append reports its outcome by the group id.
    Submitted,
    /// Answered: `None` is success.
    Done(Option<Refusal>),
    /// Waiting to be retried (quota in 3.1.1, an unavailable log or budget in both).
    Hold(Rejection),
}

struct Item {
    /// QoS 1/2 packet identifier; `None` for QoS 0.
    packet_id: Option<NonZeroU16>,
    qos2: bool,
    event: Event,
    state: State,
}

/// Consecutive publishes of one stream, answered in order.
struct Group {
    stream: Option<StreamName>,
    items: Vec<Item>,
    /// The first item not answered yet.
    next: usize,
    /// Which connection-wide batch this is (appends report their outcome by it).
    id: u64,
    /// The outcome of that append, once it arrived, with the items it held.
    outcome: Option<(Vec<usize>, Outcome)>,
    retry_at: Option<Instant>,
    held_since: Option<Instant>,
}

/// A will, checked at CONNECT: its stream and event.
struct PreparedWill {
    stream: StreamName,
    event: Event,
    delay_secs: u32,
}

/// Who the connection is, for topic rules that bind placeholders to it (docs/mqtt.md
/// "Device-bound topics"); the principal is the session's own.
pub(super) struct Identity {
    /// The client identifier the device sent (an assigned one never matches a topic level).
    client_id: ByteString,
    /// The client certificate's names, when a rule binds to one.
    /// (Boxed: most connections have none, and their state holds a pointer, not the names.)
    cert: Option<Box<sluice_auth::mtls::CertNames>>,
}

impl Identity {
    /// Whether every bound placeholder of a topic holds this connection's own value.
    fn check(
        &self,
        principal: &Principal,
        binds: &[(sluice_config::IdentityField, String)],
    ) -> Result<(), String> {
        use sluice_config::IdentityField as F;
        for (field, value) in binds {
            let among = |v: Option<&Vec<String>>| v.is_some_and(|v| v.iter().any(|n| n == value));
            let cert = self.cert.as_ref();
            let ok = match field {
                F::ClientId => &*self.client_id == value,
                F::Principal => principal.name() == value,
                F::CertCn => among(cert.map(|c| &c.cn)),
                F::CertSanDns => among(cert.map(|c| &c.san_dns)),
                F::CertSanUri => among(cert.map(|c| &c.san_uri)),
                F::Claim(name) => principal.claim(name) == Some(value.as_str()),
            };
            if !ok {
                return Err(format!(
                    "the topic names `{value}` where the rule requires this connection's {field}"
                ));
            }
        }
        Ok(())
    }
}

struct Session<I> {
    mqtt: Arc<Mqtt<I>>,
    codec: Codec,
    /// Who the connection is: its client id (as sent) and certificate names.
    identity: Identity,
    /// Whether a publish outside the connection's bound topics was logged already (once per
    /// connection; all are counted).
    bind_logged: bool,
    appender: Appender<I>,
    next_group: u64,
    rbuf: BytesMut,
    wbuf: BytesMut,
    pending: VecDeque<Group>,
    /// QoS 1/2 publishes read and not answered.
    unanswered: usize,
    /// QoS 2 packet ids being appended, not answered yet.
    qos2_pending: HashSet<u16>,
    /// QoS 2 packet ids answered with PUBREC, waiting for PUBREL.
    qos2_received: HashSet<u16>,
    aliases: Vec<Option<ByteString>>,
    /// The last topic's mapping (devices mostly publish to one topic).
    /// The last topic published to, with its stream, key and (from a topic rule) id.
    /// (Boxed: an idle connection's state holds a pointer, not the 112 bytes.)
    #[allow(clippy::type_complexity)]
    last_topic: Option<Box<(ByteString, StreamName, Option<Bytes>, Option<Bytes>)>>,
    over_quota: u32,
    over_quota_qos0: bool,
    closing: bool,
    /// How many bytes the next read has room for.
    read_hint: usize,
}

// Not an `async fn`: an async block uses what it captures in place, where an async fn's
// arguments take a second slot each in its state (memory per idle connection).
#[allow(clippy::manual_async_fn)]
pub(super) fn run<I: Ingest, T: Transport>(
    mqtt: Arc<Mqtt<I>>,
    mut io: T,
    conn: ConnInfo,
    gate: &Gate,
) -> impl Future<Output = ()> + Send + '_ {
    async move {
        // Three phases, the first and the last boxed: the connection's state while it lives
        // (for hours, mostly idle) is the session and its loop, not the authentication's or
        // the end's futures (memory per idle connection, BENCHMARKS.md). The handshake's
        // outcome is boxed too: held inline, it took its size twice (the awaited value and the
        // binding).
        let Some(mut h) = Box::pin(handshake(&mqtt, &mut io, &conn, gate)).await else {
            return;
        };
        // `h` is used in place, not destructured: its parts would take a second copy of the
        // session's size in this future's state.
        let close =
            h.s.serve(&mut io, &h.signal, h.keep_alive, gate, &mut h.auth)
                .await;
        Box::pin(end(
            End {
                mqtt,
                conn,
                key: h.key,
                conn_id: h.conn_id,
                will: h.will,
                persistence: h.persistence,
            },
            io,
            h.s,
            close,
        ))
        .await;
    }
}

/// A connection whose CONNECT was accepted and answered.
struct Handshake<I> {
    s: Session<I>,
    auth: SessionAuth,
    key: SessionKey,
    signal: Arc<registry::Signal>,
    will: Option<Box<PreparedWill>>,
    keep_alive: Duration,
    persistence: connect::Persistence,
    conn_id: u64,
}

/// Reads the CONNECT (within `connect_timeout_ms`), authenticates it, and answers CONNACK;
/// `None` when the connection ended there (refused, timed out, gone).
async fn handshake<I: Ingest, T: Transport>(
    mqtt: &Arc<Mqtt<I>>,
    io: &mut T,
    conn: &ConnInfo,
    gate: &Gate,
) -> Option<Box<Handshake<I>>> {
    let metrics = mqtt.ingest.metrics().clone();
    let opts = &mqtt.opts;
    let mut rbuf = BytesMut::with_capacity(256);
    let mut wbuf = BytesMut::new();
    let first = tokio::time::timeout(
        opts.connect_timeout,
        Box::pin(read_connect(
            io,
            &mut rbuf,
            &mut wbuf,
            opts.max_packet_bytes,
        )),
    )
    .await;
    let (mut codec, connect) = match first {
        Ok(Ok(c)) => c,
        Ok(Err(label)) => {
            if !wbuf.is_empty() {
                let _ = tokio::time::timeout(opts.write_timeout, io.write_all(&wbuf)).await;
            }
            metrics.mqtt_disconnect(label);
            io.close().await;
            return None;
        }
        Err(_) => {
            metrics.mqtt_disconnect("connect_timeout");
            io.close().await;
            return None;
        }
    };
    // The client id outlives the CONNECT's read buffer (sessions, the registry): its own copy,
    // so it does not keep that buffer alive for the connection's life.
    let mut connect = connect;
    connect.client_id = ByteString::from(&*connect.client_id);
    let conn_id = mqtt.next_conn_id();
    // Boxed, like the CONNECT's read above: the authentication's future is large and lives only
    // until CONNACK, while the connection's own state stays for hours (memory per idle
    // connection, BENCHMARKS.md).
    let accepted = match Box::pin(accept(mqtt, gate, &mut codec, &connect, conn, conn_id)).await {
        Ok(a) => a,
        Err((code, reason)) => {
            let props = ConnAckProps {
                reason: Some(reason.into()),
                ..Default::default()
            };
            if codec.connack(code, props, &mut wbuf).is_ok() {
                let _ = tokio::time::timeout(opts.write_timeout, io.write_all(&wbuf)).await;
            }
            metrics.mqtt_disconnect("refused");
            io.close().await;
            return None;
        }
    };
    let Accepted {
        principal,
        auth,
        key,
        signal,
        will,
        keep_alive,
        props,
        persistence,
        identity,
    } = accepted;
    wbuf.clear();
    if codec.connack(0, props, &mut wbuf).is_err()
        || tokio::time::timeout(opts.write_timeout, io.write_all(&wbuf))
            .await
            .map_or(true, |r| r.is_err())
    {
        mqtt.release(&key, conn_id);
        metrics.mqtt_disconnect("write_timeout");
        // The session stays as it was saved at CONNECT.
        mqtt.ended(&key, conn_id);
        return None;
    }
    wbuf.clear();
    let span = tracing::Span::current();
    span.record("client_id", key.1.as_ref() as &str);
    span.record("principal", principal.name());
    tracing::debug!(version = codec.version().as_str(), "MQTT session started");
    let s = Session {
        mqtt: mqtt.clone(),
        codec,
        identity,
        bind_logged: false,
        appender: Appender::new(mqtt.ingest.clone(), principal),
        next_group: 0,
        rbuf,
        wbuf,
        pending: VecDeque::new(),
        unanswered: 0,
        qos2_pending: HashSet::new(),
        qos2_received: persistence.qos2.iter().copied().collect(),
        aliases: Vec::new(),
        last_topic: None,
        over_quota: 0,
        over_quota_qos0: false,
        closing: false,
        read_hint: MIN_READ,
    };
    Some(Box::new(Handshake {
        s,
        auth,
        key,
        signal,
        will,
        keep_alive,
        persistence,
        conn_id,
    }))
}

/// What the end of a connection needs besides its session.
struct End<I> {
    mqtt: Arc<Mqtt<I>>,
    conn: ConnInfo,
    key: SessionKey,
    conn_id: u64,
    will: Option<Box<PreparedWill>>,
    persistence: connect::Persistence,
}

/// Ends a connection: DISCONNECT (MQTT 5), what was read appended, the session saved, the
/// socket closed, the will published or discarded.
async fn end<I: Ingest, T: Transport>(e: End<I>, mut io: T, mut s: Session<I>, close: Close) {
    let End {
        mqtt,
        conn,
        key,
        conn_id,
        will,
        persistence,
    } = e;
    let metrics = mqtt.ingest.metrics().clone();
    let opts = &mqtt.opts;
    let principal = s.appender.principal.clone();
    let appender = std::mem::replace(
        &mut s.appender,
        Appender::new(mqtt.ingest.clone(), principal.clone()),
    );

    let version = s.codec.version();
    let (label, publish_will) = match &close {
        Close::Client { will } => (if *will { "client_will" } else { "client" }, *will),
        Close::Eof => ("eof", true),
        // A session whose credentials were revoked does not get to append its will.
        Close::Error { label, .. } => (*label, *label != "revoked"),
        // A new connection of the session is there: a delayed will is not due (MQTT 5 §3.1.3.2.2).
        Close::TakenOver => (
            "taken_over",
            will.as_ref().is_some_and(|w| w.delay_secs == 0),
        ),
        Close::Shutdown => ("shutdown", false),
        Close::WriteFailed => ("write_timeout", true),
    };
    let disconnect = match &close {
        Close::Error { code, message, .. } => Some((*code, message.as_str())),
        Close::TakenOver => Some((
            rc::SESSION_TAKEN_OVER,
            "another connection took the session over",
        )),
        Close::Shutdown => Some((rc::SERVER_SHUTTING_DOWN, "the gateway is shutting down")),
        _ => None,
    };
    if let Some((code, message)) = disconnect
        && version == Version::V5
    {
        s.wbuf.clear();
        if s.codec.disconnect(code, message, &mut s.wbuf).is_ok() {
            let _ = tokio::time::timeout(opts.write_timeout, io.write_all(&s.wbuf)).await;
        }
    }
    if let Close::Error { message, .. } = &close {
        tracing::debug!(peer = %conn.peer, client_id = %s.identity.client_id, reason = label, %message, "MQTT connection closed by the server");
    }
    metrics.mqtt_disconnect(label);
    mqtt.release(&key, conn_id);
    // The session is over: its principal's connection slot is free now, not after the appends
    // still in flight below.
    drop(conn.principal.lock().unwrap().take());
    // What was read is still appended (a QoS 0 publish right before DISCONNECT, in particular),
    // before the will, and while the session still counts for the drain.
    // Boxed (the end of a connection is short; its futures need not sit in every connection's
    // state while it lives).
    let outcomes = Box::pin(appender.finish()).await;
    if persistence.stored {
        Box::pin(s.keep(&key, &persistence, outcomes)).await;
    }
    if let Some(ended) = persistence.ended {
        let _ = ended.send(());
    }
    mqtt.ended(&key, conn_id);
    // Closed once the session is saved: a device that sees its connection close (after its
    // DISCONNECT, say) finds the session saved wherever it reconnects.
    io.close().await;
    match will {
        Some(w) if publish_will => mqtt.will(key, conn_id, principal, *w),
        // The new connection of the session came before the will was due.
        Some(_) if matches!(close, Close::TakenOver) => metrics.mqtt_will("cancelled"),
        // Not due: a DISCONNECT without "with will", the drain, revoked credentials.
        Some(_) => metrics.mqtt_will("discarded"),
        None => {}
    }
    drop(conn);
}

impl<I: Ingest> Session<I> {
    /// Saves what the session leaves for its next connection (or forgets it, when it does not
    /// outlive this one): the QoS 2 packet ids stored and not released, including those stored
    /// after the connection ended (`outcomes`, from the appender's finish) whose PUBREC the
    /// client never got — its resend is then answered without a second copy.
    async fn keep(
        &mut self,
        key: &SessionKey,
        p: &connect::Persistence,
        outcomes: Vec<(u64, Vec<usize>, Outcome)>,
    ) {
        let mut qos2 = std::mem::take(&mut self.qos2_received);
        let arrived = self
            .pending
            .iter_mut()
            .filter_map(|g| g.outcome.take().map(|(idx, out)| (g.id, idx, out)));
        let settled: Vec<_> = arrived.chain(outcomes).collect();
        for g in &self.pending {
            // Settled and not answered yet: stored.
            for item in &g.items[g.next..] {
                if let (true, Some(id), State::Done(None)) =
                    (item.qos2, item.packet_id, &item.state)
                {
                    qos2.insert(id.get());
                }
            }
        }
        for (gid, idx, out) in settled {
            let Some(g) = self.pending.iter().find(|g| g.id == gid) else {
                continue;
            };
            let Ok(receipts) = out else { continue };
            for (i, r) in idx.into_iter().zip(receipts) {
                let item = &g.items[i];
                if item.qos2
                    && !matches!(r, Receipt::Failed(_))
                    && let Some(id) = item.packet_id
                {
                    qos2.insert(id.get());
                }
            }
        }
        let id = SessionId {
            principal: &key.0,
            client_id: &key.1,
        };
        let metrics = self.mqtt.ingest.metrics();
        let result = if p.expiry_secs > 0 {
            let mut ids: Vec<u16> = qos2.into_iter().collect();
            ids.sort_unstable();
            let stored = StoredSession {
                expiry_secs: p.expiry_secs,
                qos2: ids,
            };
            self.mqtt.opts.sessions.save(id, &stored).await
        } else {
            self.mqtt.opts.sessions.remove(id).await
        };
        if let Err(e) = result {
            metrics.mqtt_session("store_error");
            tracing::warn!(client_id = id.client_id, principal = id.principal, error = %e, "MQTT session store: could not keep the session");
        }
    }
}
