//! One MQTT connection: CONNECT, then the publish loop, then the will.

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
use super::{Mqtt, PROTO, SessionKey, Transport};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

/// The outcome of one append: a receipt per event, or the batch's rejection.
type Outcome = Result<Vec<Receipt>, Rejection>;
/// An append in flight: its group, the items it holds, and its outcome.
type Append =
    std::pin::Pin<Box<dyn std::future::Future<Output = (u64, Vec<usize>, Outcome)> + Send>>;
use crate::gate::{Gate, Refused, Revoked, SessionAuth};
use crate::lanes::Chain;
use crate::server::ConnInfo;

/// Publishes of one stream appended as one batch, at most.
const MAX_GROUP: usize = 256;
/// Batches per connection not yet answered; past it the connection is not read.
const MAX_GROUPS: usize = 64;
const CONTENT_TYPE: Bytes = Bytes::from_static(b"application/octet-stream");
const MAX_CLIENT_ID: usize = 256;
/// The smallest read buffer (idle connections).
const MIN_READ: usize = 512;
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

struct Session<I> {
    mqtt: Arc<Mqtt<I>>,
    codec: Codec,
    principal: Principal,
    client_id: ByteString,
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
    last_topic: Option<(ByteString, StreamName, Option<Bytes>)>,
    over_quota: u32,
    over_quota_qos0: bool,
    closing: bool,
    /// How many bytes the next read has room for.
    read_hint: usize,
}

pub(super) async fn run<I: Ingest, T: Transport>(
    mqtt: Arc<Mqtt<I>>,
    mut io: T,
    conn: ConnInfo,
    gate: &Gate,
) {
    let metrics = mqtt.ingest.metrics().clone();
    let opts = mqtt.opts.clone();
    let mut rbuf = BytesMut::with_capacity(256);
    let mut wbuf = BytesMut::new();
    let first = tokio::time::timeout(
        opts.connect_timeout,
        read_connect(&mut io, &mut rbuf, &mut wbuf, opts.max_packet_bytes),
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
            return;
        }
        Err(_) => {
            metrics.mqtt_disconnect("connect_timeout");
            io.close().await;
            return;
        }
    };
    let conn_id = mqtt.next_conn_id();
    let accepted = match accept(&mqtt, gate, &mut codec, &connect, &conn, conn_id).await {
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
            return;
        }
    };
    let Accepted {
        principal,
        auth,
        key,
        kicked,
        will,
        keep_alive,
        props,
    } = accepted;
    wbuf.clear();
    if codec.connack(0, props, &mut wbuf).is_err()
        || tokio::time::timeout(opts.write_timeout, io.write_all(&wbuf))
            .await
            .map_or(true, |r| r.is_err())
    {
        mqtt.release(&key, conn_id);
        metrics.mqtt_disconnect("write_timeout");
        return;
    }
    wbuf.clear();
    let span = tracing::Span::current();
    span.record("client_id", key.1.as_ref() as &str);
    span.record("principal", principal.name());
    tracing::debug!(version = codec.version().as_str(), "MQTT session started");
    let mut s = Session {
        mqtt: mqtt.clone(),
        codec,
        principal: principal.clone(),
        client_id: connect.client_id.clone(),
        appender: Appender {
            ingest: mqtt.ingest.clone(),
            principal,
            appends: FuturesUnordered::new(),
            to_start: VecDeque::new(),
            chain: Chain::default(),
        },
        next_group: 0,
        rbuf,
        wbuf,
        pending: VecDeque::new(),
        unanswered: 0,
        qos2_pending: HashSet::new(),
        qos2_received: HashSet::new(),
        aliases: Vec::new(),
        last_topic: None,
        over_quota: 0,
        over_quota_qos0: false,
        closing: false,
        read_hint: MIN_READ,
    };
    let close = s.serve(&mut io, kicked, keep_alive, gate, auth).await;
    let appender = std::mem::replace(
        &mut s.appender,
        Appender {
            ingest: mqtt.ingest.clone(),
            principal: s.principal.clone(),
            appends: FuturesUnordered::new(),
            to_start: VecDeque::new(),
            chain: Chain::default(),
        },
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
        tracing::debug!(peer = %conn.peer, client_id = %s.client_id, reason = label, %message, "MQTT connection closed by the server");
    }
    metrics.mqtt_disconnect(label);
    mqtt.release(&key, conn_id);
    // The socket is gone: its principal's connection slot is free now, not after the appends
    // still in flight below.
    drop(conn.principal.lock().unwrap().take());
    io.close().await;
    // What was read is still appended (a QoS 0 publish right before DISCONNECT, in particular),
    // before the will, and while the session still counts for the drain.
    appender.finish().await;
    match will {
        Some(w) if publish_will => mqtt.will(key, conn_id, s.principal.clone(), w),
        // The new connection of the session came before the will was due.
        Some(_) if matches!(close, Close::TakenOver) => metrics.mqtt_will("cancelled"),
        _ => {}
    }
    drop(conn);
}

/// Reads the first packet: it must be a CONNECT of a version Sluice speaks. Refusals that
/// have a CONNACK leave it in `out`.
async fn read_connect<T: Transport>(
    io: &mut T,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    max_packet_bytes: u32,
) -> Result<(Codec, Box<Connect>), &'static str> {
    let limit = max_packet_bytes as usize + 5;
    let version = loop {
        match hello(buf) {
            Hello::Version(v) => break v,
            Hello::NotMqtt => return Err("malformed"),
            Hello::UnsupportedLevel(level) => {
                // A level above 5 reads a 5.0 CONNACK (0x84); older ones the 3.1.1 one (0x01).
                let (v, code) = if level > 5 {
                    (Version::V5, rc::UNSUPPORTED_PROTOCOL_VERSION)
                } else {
                    (Version::V3, rc::v3::UNACCEPTABLE_PROTOCOL_VERSION)
                };
                let _ = Codec::new(v, 0).connack(code, ConnAckProps::default(), out);
                return Err("refused");
            }
            Hello::NeedMore => {
                buf.reserve(256);
                if io.read_into(buf).await.map_err(|_| "eof")? == 0 {
                    return Err("eof");
                }
            }
        }
    };
    let mut codec = Codec::new(version, max_packet_bytes);
    loop {
        match codec.decode(buf) {
            Ok(Some(Inbound::Connect(c))) => return Ok((codec, c)),
            Ok(Some(_)) => return Err("protocol"),
            Ok(None) => {
                if buf.len() > limit {
                    return Err("too_large");
                }
                buf.reserve(1024);
                if io.read_into(buf).await.map_err(|_| "eof")? == 0 {
                    return Err("eof");
                }
            }
            Err(e) => {
                let (code, label) = match e {
                    DecodeError::MaxSizeExceeded { .. } => (rc::PACKET_TOO_LARGE, "too_large"),
                    DecodeError::InvalidClientId => (rc::CLIENT_IDENTIFIER_NOT_VALID, "malformed"),
                    DecodeError::MalformedPacket | DecodeError::InvalidLength => {
                        (rc::MALFORMED_PACKET, "malformed")
                    }
                    _ => (rc::PROTOCOL_ERROR, "protocol"),
                };
                if version == Version::V5 {
                    let _ = codec.connack(code, ConnAckProps::default(), out);
                }
                return Err(label);
            }
        }
    }
}

struct Accepted {
    principal: Principal,
    auth: SessionAuth,
    key: SessionKey,
    kicked: oneshot::Receiver<()>,
    will: Option<PreparedWill>,
    keep_alive: Duration,
    props: ConnAckProps,
}

/// Checks a CONNECT: client identifier, credentials, connection limits and the will. On
/// refusal, the version's CONNACK code and a reason.
async fn accept<I: Ingest>(
    mqtt: &Arc<Mqtt<I>>,
    gate: &Gate,
    codec: &mut Codec,
    c: &Connect,
    conn: &ConnInfo,
    conn_id: u64,
) -> Result<Accepted, (u8, String)> {
    let v5 = codec.version() == Version::V5;
    let code = |v3: u8, v5code: u8| if v5 { v5code } else { v3 };
    let opts = &mqtt.opts;
    if *mqtt.stop.borrow() {
        return Err((
            code(rc::v3::SERVER_UNAVAILABLE, rc::SERVER_UNAVAILABLE),
            "the gateway is shutting down".into(),
        ));
    }
    if c.auth_method.is_some() {
        return Err((rc::BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported; use username/password or a client certificate".into()));
    }
    let id_ok = c.client_id.len() <= MAX_CLIENT_ID && !c.client_id.chars().any(char::is_control);
    if !id_ok || (c.client_id.is_empty() && !c.clean_start) {
        return Err((
            code(rc::v3::IDENTIFIER_REJECTED, rc::CLIENT_IDENTIFIER_NOT_VALID),
            "the client identifier must be 1-256 characters without control characters (empty only with a clean session)".into(),
        ));
    }
    // Credentials: the password holds an API key (`id.secret`) or a JWT; a password without a
    // dot is the secret of the key whose id is the username.
    let password = match c.password.as_deref().map(std::str::from_utf8) {
        Some(Err(_)) => {
            return Err((
                code(
                    rc::v3::BAD_USER_NAME_OR_PASSWORD,
                    rc::BAD_USER_NAME_OR_PASSWORD,
                ),
                "the password is not UTF-8".into(),
            ));
        }
        Some(Ok(p)) => Some(p),
        None => None,
    };
    let joined;
    let token = match (c.username.as_deref(), password) {
        (Some(u), Some(p)) if !p.contains('.') && !u.is_empty() => {
            joined = format!("{u}.{p}");
            Some(joined.as_str())
        }
        (_, p) => p,
    };
    let creds = Credentials {
        authorization: None,
        api_key: None,
        bearer: token,
        client_cert: conn.client_cert.as_deref(),
    };
    let (principal, auth) = match gate
        .admit_session(PROTO, mqtt.ingest.metrics(), conn, creds)
        .await
    {
        Ok(p) => p,
        Err(Refused::Auth(f)) => {
            let c = match f.kind {
                FailureKind::Missing => code(rc::v3::NOT_AUTHORIZED, rc::NOT_AUTHORIZED),
                FailureKind::Unauthenticated => code(
                    rc::v3::BAD_USER_NAME_OR_PASSWORD,
                    rc::BAD_USER_NAME_OR_PASSWORD,
                ),
                FailureKind::Throttled(_) => {
                    code(rc::v3::SERVER_UNAVAILABLE, rc::CONNECTION_RATE_EXCEEDED)
                }
                FailureKind::Unavailable(_) => {
                    code(rc::v3::SERVER_UNAVAILABLE, rc::SERVER_UNAVAILABLE)
                }
            };
            return Err((c, f.description));
        }
        Err(Refused::Connections(p)) => {
            return Err((
                code(rc::v3::SERVER_UNAVAILABLE, rc::QUOTA_EXCEEDED),
                format!(
                    "principal `{}` has its maximum of open MQTT connections",
                    p.name()
                ),
            ));
        }
    };
    let will = match &c.will {
        None => None,
        Some(w) => {
            Some(prepare_will(mqtt, &principal, w, v5).map_err(|(v3, v5c, m)| (code(v3, v5c), m))?)
        }
    };
    let mut client_id = c.client_id.clone();
    let assigned = client_id.is_empty().then(|| {
        client_id = ByteString::from(format!("sluice-{:016x}", rand_id(conn_id)));
        client_id.clone()
    });
    // Keyed by the principal's identity (source and name), so that a JWT subject cannot take
    // over the session of an API key's principal of the same name.
    let key: SessionKey = (principal.identity().clone(), client_id);
    let kicked = mqtt.claim(&key, conn_id);
    let max_ka = opts.max_keep_alive_secs;
    let ka = if c.keep_alive == 0 || c.keep_alive > max_ka {
        max_ka
    } else {
        c.keep_alive
    };
    if let Some(m) = c.max_packet_size {
        codec.set_max_outbound(m.get());
    }
    let props = ConnAckProps {
        receive_max: NonZeroU16::new(opts.receive_maximum).unwrap_or(NonZeroU16::MIN),
        max_packet_size: opts.max_packet_bytes,
        topic_alias_max: opts.topic_alias_maximum,
        assigned_client_id: if v5 { assigned } else { None },
        server_keep_alive: (ka != c.keep_alive).then_some(ka),
        session_expiry_secs: (c.session_expiry_secs > 0).then_some(0),
        reason: None,
    };
    Ok(Accepted {
        principal,
        auth,
        key,
        kicked,
        will,
        // Silence for 1.5× the keep-alive ends the connection (MQTT §3.1.2.10).
        keep_alive: Duration::from_millis(u64::from(ka) * 1500),
        props,
    })
}

/// A process-unique pseudo-random identifier (assigned client ids).
fn rand_id(conn_id: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(conn_id);
    h.finish()
}

fn prepare_will<I: Ingest>(
    mqtt: &Mqtt<I>,
    principal: &Principal,
    w: &Will,
    v5: bool,
) -> Result<PreparedWill, (u8, u8, String)> {
    if v5 && w.retain {
        return Err((
            5,
            rc::RETAIN_NOT_SUPPORTED,
            "retained messages are not supported (Retain Available = 0)".into(),
        ));
    }
    if w.topic.contains(['+', '#']) || w.topic.is_empty() {
        return Err((
            5,
            rc::TOPIC_NAME_INVALID,
            format!("will topic `{}` is not a topic name", w.topic),
        ));
    }
    let (stream, key) = mqtt.opts.topics.map(&w.topic).map_err(|e| {
        (
            rc::v3::NOT_AUTHORIZED,
            rc::TOPIC_NAME_INVALID,
            format!("will topic `{}`: {e}", w.topic),
        )
    })?;
    let stream = StreamName::parse(&stream).map_err(|r| {
        (
            rc::v3::NOT_AUTHORIZED,
            rc::TOPIC_NAME_INVALID,
            r.to_string(),
        )
    })?;
    match mqtt.ingest.admit(principal, &stream) {
        Ok(_) => {}
        Err(r @ (Rejection::Forbidden { .. } | Rejection::Unauthenticated { .. })) => {
            return Err((
                rc::v3::NOT_AUTHORIZED,
                rc::NOT_AUTHORIZED,
                format!("will: {r}"),
            ));
        }
        Err(r @ Rejection::NotFound { .. }) => {
            return Err((
                rc::v3::NOT_AUTHORIZED,
                rc::TOPIC_NAME_INVALID,
                format!("will: {r}"),
            ));
        }
        Err(r) => {
            return Err((
                rc::v3::SERVER_UNAVAILABLE,
                rc::SERVER_UNAVAILABLE,
                format!("will: {r}"),
            ));
        }
    }
    if w.utf8_payload && std::str::from_utf8(&w.payload).is_err() {
        return Err((
            5,
            rc::PAYLOAD_FORMAT_INVALID,
            "the will payload is marked UTF-8 but is not".into(),
        ));
    }
    let mut headers = vec![
        (
            Bytes::from_static(b"mqtt-topic"),
            w.topic.as_bytes().clone(),
        ),
        (
            Bytes::from_static(b"mqtt-will"),
            Bytes::from_static(b"true"),
        ),
    ];
    push_properties(
        &mut headers,
        w.content_type.as_ref(),
        w.utf8_payload,
        &w.user_properties,
    )
    .map_err(|m| {
        (
            rc::v3::NOT_AUTHORIZED,
            rc::PAYLOAD_FORMAT_INVALID,
            format!("will: {m}"),
        )
    })?;
    // The will lives as long as the session (and its delay after it): copied into buffers of its
    // own, so it does not keep the CONNECT's read buffer alive.
    let own = |b: &Bytes| Bytes::copy_from_slice(b);
    Ok(PreparedWill {
        stream,
        event: Event {
            key: key.map(Bytes::from),
            id: None,
            headers: headers.iter().map(|(k, v)| (own(k), own(v))).collect(),
            value: own(&w.payload),
        },
        delay_secs: w.delay_secs.min(mqtt.opts.max_will_delay_secs),
    })
}

/// Adds an MQTT 5 publish's properties as headers; a user property whose name Sluice reserves
/// (`mqtt-will`, `sluice-principal`, …) is refused with the reason.
fn push_properties(
    headers: &mut Vec<(Bytes, Bytes)>,
    content_type: Option<&ByteString>,
    utf8: bool,
    user: &[(ByteString, ByteString)],
) -> Result<(), String> {
    if let Some(ct) = content_type {
        headers.push((Bytes::from_static(b"content-type"), ct.as_bytes().clone()));
    }
    if utf8 {
        headers.push((
            Bytes::from_static(b"mqtt-payload-format"),
            Bytes::from_static(b"utf-8"),
        ));
    }
    if user.len() > sluice_core::MAX_HEADERS_PER_EVENT {
        return Err(format!(
            "more than {} user properties; that is the most an event may have",
            sluice_core::MAX_HEADERS_PER_EVENT
        ));
    }
    for (k, v) in user {
        sluice_core::check_header_name(k.as_bytes()).map_err(|m| format!("user property: {m}"))?;
        headers.push((k.as_bytes().clone(), v.as_bytes().clone()));
    }
    Ok(())
}

/// A connection's appends, polled by the connection's own task (no task per append).
struct Appender<I> {
    ingest: Arc<I>,
    principal: Principal,
    /// Appends in flight.
    appends: FuturesUnordered<Append>,
    /// Appends not started yet: the one before has not reached the log's queue.
    to_start: VecDeque<(u64, StreamName, Vec<Event>, Vec<usize>)>,
    /// Starts each append once the one before is in the log's queue (its order fixed).
    chain: Chain,
}

impl<I: Ingest> Appender<I> {
    /// Starts the next queued append once the one before is in the log's queue, so a
    /// connection's publishes of one stream are appended in the order they arrived while their
    /// writes still share group commits.
    fn start(&mut self) {
        if !self.chain.ready() {
            return;
        }
        let Some((id, stream, events, idx)) = self.to_start.pop_front() else {
            return;
        };
        let queued_tx = self.chain.next();
        let (ingest, principal) = (self.ingest.clone(), self.principal.clone());
        let span = tracing::debug_span!("batch", stream = %stream, events = events.len());
        self.appends.push(Box::pin(tracing::Instrument::instrument(
            async move {
                let out = crate::append_batch(
                    &*ingest,
                    &principal,
                    Protocol::Mqtt,
                    &stream,
                    CONTENT_TYPE,
                    events,
                    Some(queued_tx),
                )
                .await;
                (id, idx, out)
            },
            span,
        )));
    }

    /// Runs what is queued and in flight to its end after the connection closed: publishes
    /// read before a DISCONNECT (QoS 0 ones in particular) are still appended, in order.
    /// Bounded: at most `MAX_GROUPS` batches of `MAX_GROUP` publishes were read.
    async fn finish(mut self) {
        loop {
            self.start();
            if self.appends.is_empty() && self.to_start.is_empty() {
                return;
            }
            let waiting = self.chain.waiting();
            tokio::select! {
                _ = self.appends.next(), if !self.appends.is_empty() => {}
                _ = self.chain.wait(), if waiting => {}
            }
        }
    }
}

/// What the loop does next.
enum Step {
    Kicked,
    Stop,
    Appended(u64, Vec<usize>, Outcome),
    Queued,
    Retry,
    Read(std::io::Result<usize>),
    KeepAlive,
    Recheck,
}

impl<I: Ingest> Session<I> {
    fn v5(&self) -> bool {
        self.codec.version() == Version::V5
    }

    /// Whether the connection's packets are decoded: not while the server owes Receive Maximum
    /// answers, has MAX_GROUPS batches unanswered, or holds a batch for the log. QoS 2 publishes
    /// answered with PUBREC and waiting for the client's PUBREL do not count here: the client
    /// owes that packet, and reading is how it arrives (counting them could leave a full window
    /// waiting for PUBRELs nobody reads).
    fn can_read(&self) -> bool {
        !self.closing
            && self.unanswered < usize::from(self.mqtt.opts.receive_maximum)
            && self.pending.len() < MAX_GROUPS
            && self.pending.front().is_none_or(|g| g.held_since.is_none())
    }

    /// While packets are not decoded (backpressure), the socket is still read into a small
    /// buffer: a closed socket then ends the session at once and frees its slots, and a client
    /// that keeps sending is not mistaken for a silent one.
    fn can_peek(&self) -> bool {
        !self.closing && self.rbuf.len() < PEEK_BYTES
    }

    async fn serve<T: Transport>(
        &mut self,
        io: &mut T,
        mut kicked: oneshot::Receiver<()>,
        keep_alive: Duration,
        gate: &Gate,
        mut auth: SessionAuth,
    ) -> Close {
        let mut stop = self.mqtt.stop.subscribe();
        let mut deadline = Instant::now() + keep_alive;
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        loop {
            if self.closing && self.pending.is_empty() {
                return Close::Shutdown;
            }
            let can_read = self.can_read();
            let can_peek = !can_read && self.can_peek();
            if !can_read {
                // Not decoding is the server's doing: the client's silence does not count.
                deadline = Instant::now() + keep_alive;
            }
            if can_peek && self.rbuf.capacity() - self.rbuf.len() < MIN_READ {
                self.rbuf.reserve(MIN_READ);
            }
            // The read buffer follows the traffic: an idle connection holds a small one (memory
            // per idle connection), a busy one grows it (fewer reads per packet).
            if can_read && self.rbuf.capacity() - self.rbuf.len() < self.read_hint / 2 {
                self.rbuf.reserve(self.read_hint);
            }
            let spare = self.rbuf.capacity() - self.rbuf.len();
            let step = {
                let retry_at = self.pending.front().and_then(|g| g.retry_at);
                let has_appends = !self.appender.appends.is_empty();
                let waiting = self.appender.chain.waiting();
                tokio::select! {
                    biased;
                    _ = &mut kicked => Step::Kicked,
                    _ = stop.changed(), if !self.closing => Step::Stop,
                    Some((id, idx, out)) = self.appender.appends.next(), if has_appends => Step::Appended(id, idx, out),
                    _ = self.appender.chain.wait(), if waiting => Step::Queued,
                    _ = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => Step::Retry,
                    r = io.read_into(&mut self.rbuf), if can_read || can_peek => Step::Read(r),
                    _ = tokio::time::sleep_until(deadline), if can_read => Step::KeepAlive,
                    _ = auth.due() => Step::Recheck,
                }
            };
            let result = match step {
                Step::Kicked => return Close::TakenOver,
                Step::Stop => {
                    // Packets already read are still handled (and answered before the
                    // DISCONNECT); the socket is not read any more.
                    let decoded = self.decode_ready().await;
                    self.closing = true;
                    // Held publishes are not retried any more: answer them now.
                    if let Some(g) = self.pending.front_mut() {
                        g.retry_at = None;
                        for i in &mut g.items {
                            if let State::Hold(r) = &i.state {
                                i.state = State::Done(Some(Refusal {
                                    code: rc::IMPLEMENTATION_SPECIFIC_ERROR,
                                    label: "shutdown",
                                    message: format!("the gateway is shutting down: {r}"),
                                }));
                            }
                        }
                    }
                    decoded.and_then(|()| self.answer_head())
                }
                Step::Appended(id, idx, out) => {
                    if let Some(g) = self.pending.iter_mut().find(|g| g.id == id) {
                        g.outcome = Some((idx, out));
                    }
                    Ok(())
                }
                Step::Queued => {
                    self.appender.start();
                    Ok(())
                }
                Step::Retry => {
                    self.retry();
                    Ok(())
                }
                Step::Read(Ok(0)) | Step::Read(Err(_)) => return Close::Eof,
                Step::Read(Ok(n)) => {
                    deadline = Instant::now() + keep_alive;
                    if n >= spare {
                        self.read_hint = (self.read_hint * 2).min(64 * 1024);
                    } else if n < self.read_hint / 4 {
                        self.read_hint = (self.read_hint / 2).max(MIN_READ);
                    }
                    self.decode_ready().await
                }
                Step::KeepAlive => {
                    return error(
                        rc::KEEP_ALIVE_TIMEOUT,
                        "keep_alive",
                        "no packet within 1.5 times the keep-alive",
                    );
                }
                // A reload or the credential's expiry: the session goes on only while its
                // principal stands as it authenticated (publishes already read are answered
                // before the DISCONNECT, like a drain's).
                Step::Recheck => match gate.recheck(&mut auth).await {
                    Ok(()) => Ok(()),
                    Err(revoked) => {
                        let code = match revoked {
                            Revoked::Credentials(_) => rc::NOT_AUTHORIZED,
                            Revoked::Changed => rc::ADMINISTRATIVE_ACTION,
                        };
                        self.mqtt.ingest.metrics().session_revoked(PROTO);
                        return error(code, "revoked", revoked.to_string());
                    }
                },
            };
            // Answer what is settled; acks may have made room: decode what is already buffered
            // (groups refused before appending, e.g. for their topic, are answered at once).
            let result = match result.and_then(|()| self.settle_and_answer()) {
                Ok(()) if self.can_read() && !self.rbuf.is_empty() => self
                    .decode_ready()
                    .await
                    .and_then(|()| self.settle_and_answer()),
                r => r,
            };
            if !self.wbuf.is_empty() {
                let written =
                    tokio::time::timeout(self.mqtt.opts.write_timeout, io.write_all(&self.wbuf))
                        .await;
                self.wbuf.clear();
                if !matches!(written, Ok(Ok(()))) {
                    return Close::WriteFailed;
                }
                if self.wbuf.capacity() > 64 * 1024 {
                    self.wbuf = BytesMut::new();
                }
            }
            if let Err(close) = result {
                return close;
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > 2 * self.read_hint {
                self.rbuf = BytesMut::new();
            }
        }
    }

    /// Handles every complete packet in the read buffer while the connection may read.
    async fn decode_ready(&mut self) -> Result<(), Close> {
        let mut batch: Option<Group> = None;
        let result = loop {
            if !self.can_read() {
                break Ok(());
            }
            let packet = match self.codec.decode(&mut self.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => break Ok(()),
                Err(e) => break Err(decode_error(e)),
            };
            match packet {
                Inbound::Publish(p) => match self.prepare(*p) {
                    Ok(Some((item, stream))) => {
                        let joins = matches!(&batch, Some(b) if stream.is_some() && b.stream == stream && b.items.len() < MAX_GROUP);
                        if !joins {
                            if let Some(b) = batch.take() {
                                self.submit(b);
                            }
                            batch = Some(Group {
                                stream,
                                items: Vec::new(),
                                next: 0,
                                id: 0,
                                outcome: None,
                                retry_at: None,
                                held_since: None,
                            });
                        }
                        if item.packet_id.is_some() {
                            self.unanswered += 1;
                        }
                        batch.as_mut().expect("set above").items.push(item);
                    }
                    Ok(None) => {}
                    Err(close) => break Err(close),
                },
                Inbound::PubRel(id) => {
                    let found = self.qos2_received.remove(&id);
                    if let Some(id) = NonZeroU16::new(id) {
                        let _ = self.codec.pubcomp(id, found, &mut self.wbuf);
                    }
                }
                Inbound::Subscribe { packet_id, filters } => {
                    if let Some(id) = NonZeroU16::new(packet_id) {
                        let _ = self.codec.suback_refused(id, filters, &mut self.wbuf);
                    }
                }
                Inbound::Unsubscribe { packet_id, filters } => {
                    if let Some(id) = NonZeroU16::new(packet_id) {
                        let _ = self.codec.unsuback(id, filters, &mut self.wbuf);
                    }
                }
                Inbound::PingReq => {
                    let _ = self.codec.pingresp(&mut self.wbuf);
                }
                Inbound::Disconnect { reason } => {
                    break Err(Close::Client {
                        will: reason == rc::DISCONNECT_WITH_WILL,
                    });
                }
                Inbound::Connect(_) => {
                    break Err(error(rc::PROTOCOL_ERROR, "protocol", "a second CONNECT"));
                }
                Inbound::Unexpected(name) => {
                    break Err(error(
                        rc::PROTOCOL_ERROR,
                        "protocol",
                        format!("{name} is not expected from a client of a publish-only server"),
                    ));
                }
            }
        };
        if let Some(b) = batch {
            self.submit(b);
        }
        result
    }

    /// Queues a group's publishes for appending (a group refused before, e.g. for its topic,
    /// only waits for its turn to be answered).
    fn submit(&mut self, mut g: Group) {
        g.id = self.next_group;
        self.next_group += 1;
        if let Some(stream) = g.stream.clone() {
            let idx: Vec<usize> = (0..g.items.len()).collect();
            let events = g.items.iter().map(|i| i.event.clone()).collect();
            self.appender
                .to_start
                .push_back((g.id, stream, events, idx));
            self.appender.start();
        }
        self.pending.push_back(g);
    }

    /// Checks a PUBLISH and turns it into an item: to append (`Submitted`, with its stream in
    /// `last_topic`), refused (`Done`), or nothing (a QoS 2 retransmission).
    fn prepare(&mut self, p: Publish) -> Result<Option<(Item, Option<StreamName>)>, Close> {
        let v5 = self.v5();
        let (qos, qos2) = match p.qos {
            QoS::AtMostOnce => (0u8, false),
            QoS::AtLeastOnce => (1, false),
            QoS::ExactlyOnce => (2, true),
        };
        let packet_id = p.packet_id;
        if qos > 0 && packet_id.is_none() {
            return Err(error(
                rc::PROTOCOL_ERROR,
                "protocol",
                "QoS 1/2 PUBLISH without a packet identifier",
            ));
        }
        // An MQTT 5 client counts a QoS 2 publish against Receive Maximum until PUBCOMP; one
        // that sends more is told so (a 3.1.1 client has no such limit: its QoS 2 ids awaiting
        // PUBREL are bounded by the 65,535 packet identifiers).
        let receive_maximum = usize::from(self.mqtt.opts.receive_maximum);
        if v5
            && qos > 0
            && self.unanswered + self.qos2_received.len() >= receive_maximum
            && !packet_id.is_some_and(|id| {
                self.qos2_received.contains(&id.get()) || self.qos2_pending.contains(&id.get())
            })
        {
            return Err(error(
                rc::RECEIVE_MAXIMUM_EXCEEDED,
                "protocol",
                format!(
                    "more than Receive Maximum ({receive_maximum}) QoS 1/2 publishes unacknowledged"
                ),
            ));
        }
        if v5 && p.retain {
            return Err(error(
                rc::RETAIN_NOT_SUPPORTED,
                "protocol",
                "retained messages are not supported (Retain Available = 0)",
            ));
        }
        if qos2 {
            let id = packet_id.expect("checked").get();
            if self.qos2_received.contains(&id) {
                // Already appended and answered: answer again, append nothing.
                let _ = self
                    .codec
                    .ack(true, packet_id.expect("checked"), 0, None, &mut self.wbuf);
                return Ok(None);
            }
            if self.qos2_pending.contains(&id) {
                return Ok(None); // its answer is on the way
            }
        }
        let props = p.properties.as_ref();
        let mut topic = p.topic.clone();
        if let Some(alias) = props.and_then(|pr| pr.topic_alias) {
            let a = usize::from(alias.get());
            if a > usize::from(self.mqtt.opts.topic_alias_maximum) {
                return Err(error(
                    rc::TOPIC_ALIAS_INVALID,
                    "protocol",
                    format!("topic alias {a} is above Topic Alias Maximum"),
                ));
            }
            if self.aliases.len() < a {
                self.aliases.resize(a, None);
            }
            if topic.is_empty() {
                match &self.aliases[a - 1] {
                    Some(t) => topic = t.clone(),
                    None => {
                        return Err(error(
                            rc::PROTOCOL_ERROR,
                            "protocol",
                            format!("topic alias {a} was never set"),
                        ));
                    }
                }
            } else {
                self.aliases[a - 1] = Some(topic.clone());
            }
        } else if topic.is_empty() {
            return Err(error(
                rc::PROTOCOL_ERROR,
                "protocol",
                "PUBLISH without a topic name or alias",
            ));
        }
        let utf8 = props.is_some_and(|pr| pr.is_utf8_payload);
        let refused = |code, label, message: String| {
            Ok(Some((
                Item {
                    packet_id,
                    qos2,
                    event: Event::default(),
                    state: State::Done(Some(Refusal {
                        code,
                        label,
                        message,
                    })),
                },
                None,
            )))
        };
        if topic.contains(['+', '#']) {
            self.count_refusal("topic");
            return refused(
                rc::TOPIC_NAME_INVALID,
                "topic",
                format!("`{topic}` has wildcards; a PUBLISH needs a topic name"),
            );
        }
        let (stream, key) = match &self.last_topic {
            Some((t, s, k)) if *t == topic => (s.clone(), k.clone()),
            _ => match self.mqtt.opts.topics.map(&topic) {
                Ok((s, k)) => match StreamName::parse(&s) {
                    Ok(s) => {
                        let k = k.map(Bytes::from);
                        self.last_topic = Some((topic.clone(), s.clone(), k.clone()));
                        (s, k)
                    }
                    Err(r) => {
                        self.count_refusal("topic");
                        return refused(rc::TOPIC_NAME_INVALID, "topic", r.to_string());
                    }
                },
                Err(e) => {
                    self.count_refusal("topic");
                    return refused(
                        rc::TOPIC_NAME_INVALID,
                        "topic",
                        format!("topic `{topic}`: {e}"),
                    );
                }
            },
        };
        if utf8 && std::str::from_utf8(&p.payload).is_err() {
            self.count_refusal("malformed");
            return refused(
                rc::PAYLOAD_FORMAT_INVALID,
                "malformed",
                "the payload is marked UTF-8 (Payload Format Indicator) but is not".into(),
            );
        }
        let mut headers = vec![(Bytes::from_static(b"mqtt-topic"), topic.as_bytes().clone())];
        if let Some(pr) = props
            && let Err(m) = push_properties(
                &mut headers,
                pr.content_type.as_ref(),
                utf8,
                &pr.user_properties,
            )
        {
            self.count_refusal("malformed");
            return refused(rc::PAYLOAD_FORMAT_INVALID, "malformed", m);
        }
        if qos2 {
            self.qos2_pending.insert(packet_id.expect("checked").get());
        }
        let item = Item {
            packet_id,
            qos2,
            event: Event {
                key,
                id: None,
                headers,
                value: p.payload,
            },
            state: State::Submitted,
        };
        Ok(Some((item, Some(stream))))
    }

    fn count_refusal(&self, reason: &'static str) {
        self.mqtt.ingest.metrics().rejected(PROTO, reason, 1);
    }

    /// Settles the outcomes that arrived for the head and writes the answers that are due.
    fn settle_and_answer(&mut self) -> Result<(), Close> {
        loop {
            self.settle();
            let before = self.pending.len();
            self.answer_head()?;
            // A popped head may have uncovered a group whose outcome is already there.
            if self.pending.len() == before
                || self.pending.front().is_none_or(|g| g.outcome.is_none())
            {
                return Ok(());
            }
        }
    }

    /// Records the head group's outcome, if it arrived, in its items.
    fn settle(&mut self) {
        let v5 = self.v5();
        let closing = self.closing;
        let max_hold = self.mqtt.opts.max_hold;
        let Some(g) = self.pending.front_mut() else {
            return;
        };
        let Some((idx, outcome)) = g.outcome.take() else {
            return;
        };
        let lost = || Rejection::Internal {
            message: "the append ended without an answer".into(),
        };
        let per_item: Vec<Result<(), Rejection>> = match outcome {
            // One receipt per event; should one be missing, its publish fails instead of
            // waiting forever at the head.
            Ok(receipts) => {
                let mut receipts = receipts.into_iter();
                (0..idx.len())
                    .map(|_| match receipts.next() {
                        Some(Receipt::Appended { .. } | Receipt::Received { .. }) => Ok(()),
                        Some(Receipt::Failed(r)) => Err(r),
                        None => Err(lost()),
                    })
                    .collect()
            }
            Err(r) => vec![Err(r); idx.len()],
        };
        let now = Instant::now();
        let mut retry_after: Option<Duration> = None;
        for (i, r) in idx.into_iter().zip(per_item) {
            let item = &mut g.items[i];
            item.state = match r {
                Ok(()) => State::Done(None),
                Err(r) => {
                    // Draining: nothing is held any more, everything is answered.
                    let holdable = item.packet_id.is_some()
                        && !closing
                        && match &r {
                            Rejection::Unavailable { .. } => g
                                .held_since
                                .is_none_or(|s| now.duration_since(s) < max_hold),
                            // 3.1.1 has no way to say "over quota": hold the ack until it fits.
                            Rejection::OverQuota { .. } => !v5,
                            _ => false,
                        };
                    if holdable {
                        let wait = r.retry_after().unwrap_or(Duration::from_millis(100));
                        retry_after = Some(retry_after.map_or(wait, |w| w.min(wait)));
                        State::Hold(r)
                    } else {
                        State::Done(Some(refusal_of(&r)))
                    }
                }
            };
        }
        match retry_after {
            Some(wait) => {
                g.held_since.get_or_insert(now);
                let wait = wait.clamp(Duration::from_millis(10), Duration::from_secs(1));
                g.retry_at = Some(now + wait);
            }
            None => {
                g.held_since = None;
                g.retry_at = None;
            }
        }
    }

    /// Appends the head group's held publishes again.
    fn retry(&mut self) {
        let Some(g) = self.pending.front_mut() else {
            return;
        };
        g.retry_at = None;
        let Some(stream) = g.stream.clone() else {
            return;
        };
        let mut idx = Vec::new();
        let mut events = Vec::new();
        for (i, item) in g.items.iter_mut().enumerate() {
            if matches!(item.state, State::Hold(_)) {
                idx.push(i);
                events.push(item.event.clone());
                item.state = State::Submitted;
            }
        }
        if idx.is_empty() {
            return;
        }
        // The head goes first: nothing after it can be answered before it anyway.
        self.appender
            .to_start
            .push_front((g.id, stream, events, idx));
        self.appender.start();
    }

    /// Writes the answers of settled publishes, in the order they arrived, from the head.
    fn answer_head(&mut self) -> Result<(), Close> {
        let v5 = self.v5();
        let limit = self.mqtt.opts.quota_disconnect_after;
        while let Some(g) = self.pending.front_mut() {
            while g.next < g.items.len() {
                let item = &mut g.items[g.next];
                let refusal = match &mut item.state {
                    State::Done(r) => r.take(),
                    _ => break,
                };
                g.next += 1;
                match &refusal {
                    Some(r) if r.code == rc::QUOTA_EXCEEDED => {
                        self.over_quota += 1;
                        self.over_quota_qos0 = item.packet_id.is_none();
                    }
                    None => self.over_quota = 0,
                    _ => {}
                }
                let Some(id) = item.packet_id else {
                    // QoS 0 has no answer; 3.1.1 still ends the connection on what it cannot
                    // signal otherwise (not authorized, unmapped topic, …), except quota.
                    if let Some(r) = refusal
                        && !v5
                        && r.code != rc::QUOTA_EXCEEDED
                    {
                        return Err(error(0, r.label, r.message));
                    }
                    continue;
                };
                self.unanswered -= 1;
                if item.qos2 {
                    self.qos2_pending.remove(&id.get());
                }
                match refusal {
                    None => {
                        if item.qos2 {
                            self.qos2_received.insert(id.get());
                        }
                        let _ = self.codec.ack(item.qos2, id, 0, None, &mut self.wbuf);
                    }
                    Some(r) if v5 => {
                        let mut message = r.message;
                        message.truncate(message.floor_char_boundary(256));
                        let _ =
                            self.codec
                                .ack(item.qos2, id, r.code, Some(message), &mut self.wbuf);
                    }
                    // 3.1.1 has no reason codes: the connection ends; the client resends.
                    Some(r) => return Err(error(0, r.label, r.message)),
                }
                item.event = Event::default();
            }
            if limit > 0 && self.over_quota >= limit {
                let (code, what) = if self.over_quota_qos0 {
                    (rc::MESSAGE_RATE_TOO_HIGH, "message rate too high")
                } else {
                    (rc::QUOTA_EXCEEDED, "quota exceeded")
                };
                return Err(error(
                    code,
                    "quota",
                    format!("{what}: {} publishes in a row over quota", self.over_quota),
                ));
            }
            if g.next < g.items.len() {
                break;
            }
            self.pending.pop_front();
        }
        Ok(())
    }
}

fn decode_error(e: DecodeError) -> Close {
    match e {
        DecodeError::MaxSizeExceeded { size, max } => error(
            rc::PACKET_TOO_LARGE,
            "too_large",
            format!("packet of {size} bytes is above Maximum Packet Size {max}"),
        ),
        DecodeError::MalformedPacket | DecodeError::InvalidLength | DecodeError::Utf8Error => {
            error(rc::MALFORMED_PACKET, "malformed", e.to_string())
        }
        DecodeError::InvalidTopicName => error(rc::TOPIC_NAME_INVALID, "malformed", e.to_string()),
        _ => error(rc::PROTOCOL_ERROR, "protocol", e.to_string()),
    }
}

impl<I: Ingest> Mqtt<I> {
    /// Registers a session under `key`, taking over (and telling) the session that had it,
    /// and cancels a will still waiting for its delay under that key.
    fn claim(&self, key: &SessionKey, conn_id: u64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        // Lock order: sessions, then wills (as in `will`), so a will is either waiting here
        // (and cancelled) or sees this session and is not scheduled.
        let mut sessions = self.registry.sessions.lock().unwrap();
        if let Some((_, old)) = sessions.insert(key.clone(), (conn_id, tx)) {
            let _ = old.send(());
        }
        if let Some((_, pending)) = self.registry.wills.lock().unwrap().remove(key) {
            pending.abort();
            self.ingest.metrics().mqtt_will("cancelled");
        }
        rx
    }

    pub(super) fn release(&self, key: &SessionKey, conn_id: u64) {
        let mut sessions = self.registry.sessions.lock().unwrap();
        if sessions.get(key).is_some_and(|(id, _)| *id == conn_id) {
            sessions.remove(key);
        }
    }

    /// Publishes a will now, or after its delay unless a new connection of the session
    /// comes first.
    fn will(
        self: &Arc<Self>,
        key: SessionKey,
        conn_id: u64,
        principal: Principal,
        w: PreparedWill,
    ) {
        let this = self.clone();
        if w.delay_secs == 0 {
            tokio::spawn(async move { this.append_will(principal, w).await });
            return;
        }
        let sessions = self.registry.sessions.lock().unwrap();
        if sessions.contains_key(&key) {
            // A new connection of the session is already there (this one was released first).
            self.ingest.metrics().mqtt_will("cancelled");
            return;
        }
        let mut wills = self.registry.wills.lock().unwrap();
        let held = self.opts.pending_will_bytes.try_reserve(w.event.size());
        if wills.len() >= self.opts.max_pending_wills || held.is_err() {
            drop(wills);
            drop(sessions);
            self.ingest.metrics().mqtt_will("shed");
            tokio::spawn(async move { this.append_will(principal, w).await });
            return;
        }
        let key2 = key.clone();
        let task = tokio::spawn(async move {
            // Its bytes count against max_pending_will_bytes until it is appended (or cancelled).
            let _held = held;
            tokio::time::sleep(Duration::from_secs(u64::from(w.delay_secs))).await;
            {
                let mut wills = this.registry.wills.lock().unwrap();
                if wills.get(&key2).is_some_and(|(id, _)| *id == conn_id) {
                    wills.remove(&key2);
                }
            }
            this.append_will(principal, w).await;
        });
        wills.insert(key, (conn_id, task.abort_handle()));
    }

    async fn append_will(&self, principal: Principal, w: PreparedWill) {
        let deadline = Instant::now() + self.opts.max_hold;
        loop {
            let r = crate::append_batch(
                &*self.ingest,
                &principal,
                Protocol::Mqtt,
                &w.stream,
                CONTENT_TYPE,
                vec![w.event.clone()],
                None,
            )
            .await;
            let failure = match r {
                Ok(receipts) => receipts.into_iter().find_map(|r| match r {
                    Receipt::Failed(r) => Some(r),
                    _ => None,
                }),
                Err(r) => Some(r),
            };
            match failure {
                None => {
                    self.ingest.metrics().mqtt_will("appended");
                    return;
                }
                Some(r) if r.retry_after().is_some() && Instant::now() < deadline => {
                    let wait = r.retry_after().unwrap_or_default();
                    tokio::time::sleep(
                        wait.clamp(Duration::from_millis(10), Duration::from_secs(1)),
                    )
                    .await;
                }
                Some(r) => {
                    tracing::warn!(stream = %w.stream, principal = principal.name(), error = %r, "MQTT will not appended");
                    self.ingest.metrics().mqtt_will("failed");
                    return;
                }
            }
        }
    }
}
