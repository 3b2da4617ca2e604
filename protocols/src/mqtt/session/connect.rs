//! The CONNECT: reading it within its deadline, authenticating through the gate, claiming the
//! session, and checking the will before CONNACK.

use super::*;

/// Reads the first packet: it must be a CONNECT of a version Sluice speaks. Refusals that
/// have a CONNACK leave it in `out`.
pub(super) async fn read_connect<T: Transport>(
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
                // 3.1.1 has a return code for a bad client identifier (2), none for the rest.
                let v3_code = matches!(e, DecodeError::InvalidClientId)
                    .then_some(rc::v3::IDENTIFIER_REJECTED);
                let (code, label) = match e {
                    DecodeError::MaxSizeExceeded { .. } => (rc::PACKET_TOO_LARGE, "too_large"),
                    DecodeError::InvalidClientId => (rc::CLIENT_IDENTIFIER_NOT_VALID, "malformed"),
                    DecodeError::MalformedPacket | DecodeError::InvalidLength => {
                        (rc::MALFORMED_PACKET, "malformed")
                    }
                    _ => (rc::PROTOCOL_ERROR, "protocol"),
                };
                match (version, v3_code) {
                    (Version::V5, _) => {
                        let _ = codec.connack(code, ConnAckProps::default(), out);
                    }
                    (_, Some(code)) => {
                        let _ = codec.connack(code, ConnAckProps::default(), out);
                    }
                    _ => {}
                }
                return Err(label);
            }
        }
    }
}

pub(super) struct Accepted {
    pub(super) principal: Principal,
    pub(super) auth: SessionAuth,
    pub(super) key: SessionKey,
    /// Told when the session is taken over, the gateway drains, or a reload happens.
    pub(super) signal: Arc<registry::Signal>,
    /// (Boxed: most connections have none, and their state holds a pointer.)
    pub(super) will: Option<Box<PreparedWill>>,
    pub(super) keep_alive: Duration,
    pub(super) props: ConnAckProps,
    pub(super) persistence: Persistence,
    pub(super) identity: Identity,
}

/// What becomes of the session when its connection ends, and what it resumed.
pub(super) struct Persistence {
    /// Seconds the session outlives the connection (0: it ends with it).
    pub(super) expiry_secs: u32,
    /// Whether a stored session may exist that this connection must forget or replace.
    pub(super) stored: bool,
    /// QoS 2 packet ids of the resumed session awaiting PUBREL.
    pub(super) qos2: Vec<u16>,
    /// Told when this connection has ended and saved its session.
    /// (A oneshot: a watch channel's state is five times its size, per connection.)
    pub(super) ended: Option<oneshot::Sender<()>>,
}

/// Checks a CONNECT: client identifier, credentials, connection limits and the will. On
/// refusal, the version's CONNACK code and a reason.
pub(super) async fn accept<I: Ingest>(
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
    let mut client_id = c.client_id.clone();
    let assigned = client_id.is_empty().then(|| {
        client_id = ByteString::from(format!("sluice-{:016x}", rand_id(conn_id)));
        client_id.clone()
    });
    // The certificate's names, read once, when a topic rule binds a placeholder to one.
    let identity = Identity {
        client_id: c.client_id.clone(),
        cert: if mqtt.opts.topics.binds_cert() {
            conn.client_cert
                .as_deref()
                .and_then(sluice_auth::mtls::cert_names)
                .map(Box::new)
        } else {
            None
        },
    };
    let will = match &c.will {
        None => None,
        Some(w) => prepare_will(mqtt, &principal, &identity, w)
            .map(|w| w.map(Box::new))
            .map_err(|(v3, v5c, m)| (code(v3, v5c), m))?,
    };
    // Keyed by the principal's identity (source and name), so that a JWT subject cannot take
    // over the session of an API key's principal of the same name.
    let key: SessionKey = (principal.identity().clone(), client_id);
    let signal = mqtt.claim(&key, conn_id);
    let (persistence, session_present, expiry_told) = resume(mqtt, c, v5, &key, conn_id).await;
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
        session_expiry_secs: expiry_told,
        reason: None,
        session_present,
    };
    Ok(Accepted {
        principal,
        auth,
        key,
        signal,
        will,
        // Silence for 1.5× the keep-alive ends the connection (MQTT §3.1.2.10).
        keep_alive: Duration::from_millis(u64::from(ka) * 1500),
        props,
        persistence,
        identity,
    })
}

/// Decides the session's persistence and resumes a stored session (clean start 0): waits for
/// the session's previous connection on this gateway to end (it saves what it leaves), then
/// loads. Returns the persistence, Session Present, and the Session Expiry Interval to tell an
/// MQTT 5 client when it is not the one it asked for.
async fn resume<I: Ingest>(
    mqtt: &Mqtt<I>,
    c: &Connect,
    v5: bool,
    key: &SessionKey,
    conn_id: u64,
) -> (Persistence, bool, Option<u32>) {
    let max = mqtt.opts.max_session_expiry_secs;
    // 3.1.1: clean session 0 keeps the session (for as long as the gateway keeps any).
    let asked = if v5 {
        c.session_expiry_secs
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let expiry_secs = asked.min(max);
    let told = (v5 && expiry_secs != asked).then_some(expiry_secs);
    let mut p = Persistence {
        expiry_secs,
        stored: false,
        qos2: Vec::new(),
        ended: None,
    };
    if max == 0 {
        return (p, false, told);
    }
    let (ended, rx) = oneshot::channel();
    p.ended = Some(ended);
    if let Some(previous) = mqtt.follow(key, conn_id, rx) {
        // Bounded: a connection that has not ended within the CONNECT deadline leaves its
        // session as last saved. (Its sender dropped, or sent: ended either way.)
        let _ = tokio::time::timeout(mqtt.opts.connect_timeout, previous).await;
    }
    let id = SessionId {
        principal: &key.0,
        client_id: &key.1,
    };
    let store = &mqtt.opts.sessions;
    let metrics = mqtt.ingest.metrics();
    let mut present = false;
    if c.clean_start {
        // A clean start discards the stored session (MQTT 5 §3.1.2.4).
        if let Err(e) = store.remove(id).await {
            metrics.mqtt_session("store_error");
            tracing::warn!(client_id = id.client_id, principal = id.principal, error = %e, "MQTT session store: could not forget a session");
        }
    } else {
        p.stored = true;
        match store.load(id).await {
            Ok(Some(s)) => {
                present = true;
                p.qos2 = s.qos2;
                metrics.mqtt_session("resumed");
            }
            Ok(None) => metrics.mqtt_session("new"),
            // The device connects without its session (Session Present 0): at worst a QoS 2
            // publish it resends is stored again, nothing is lost.
            Err(e) => {
                metrics.mqtt_session("store_error");
                tracing::warn!(client_id = id.client_id, principal = id.principal, error = %e, "MQTT session store: could not load a session; it starts clean");
            }
        }
    }
    if expiry_secs > 0 {
        p.stored = true;
    }
    // A new session is saved now, so that a gateway that dies before the connection ends still
    // finds it when the device comes back. A resumed one is in the store already: not writing
    // it again keeps a reconnect storm of resuming devices (after a restart) free of writes;
    // its expiry counts from its last save until this connection ends and saves it again.
    if expiry_secs > 0 && !present {
        let now = StoredSession {
            expiry_secs,
            qos2: p.qos2.clone(),
        };
        if let Err(e) = store.save(id, &now).await {
            metrics.mqtt_session("store_error");
            tracing::warn!(client_id = id.client_id, principal = id.principal, error = %e, "MQTT session store: could not save a session");
        }
    }
    (p, present, told)
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
    identity: &Identity,
    w: &Will,
) -> Result<Option<PreparedWill>, (u8, u8, String)> {
    if w.topic.contains(['+', '#']) || w.topic.is_empty() {
        return Err((
            rc::v3::NOT_AUTHORIZED,
            rc::TOPIC_NAME_INVALID,
            format!("will topic `{}` is not a topic name", w.topic),
        ));
    }
    let mapped = mqtt.opts.topics.resolve(&w.topic).map_err(|e| {
        (
            rc::v3::NOT_AUTHORIZED,
            rc::TOPIC_NAME_INVALID,
            format!("will topic `{}`: {e}", w.topic),
        )
    })?;
    if let Err(m) = identity.check(principal, &mapped.binds) {
        mqtt.ingest.metrics().rejected(PROTO, "identity", 1);
        return Err((
            rc::v3::NOT_AUTHORIZED,
            rc::NOT_AUTHORIZED,
            format!("will topic `{}`: {m}", w.topic),
        ));
    }
    let (stream, key) = (mapped.stream, mapped.key);
    let stream = StreamName::parse(&stream).map_err(|r| {
        (
            rc::v3::NOT_AUTHORIZED,
            rc::TOPIC_NAME_INVALID,
            r.to_string(),
        )
    })?;
    let drop_retained = match mqtt.ingest.admit(principal, &stream) {
        Ok(a) => w.retain && a.settings().mqtt_retained == sluice_config::RetainedPolicy::Drop,
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
    };
    if w.utf8_payload && std::str::from_utf8(&w.payload).is_err() {
        return Err((
            rc::v3::NOT_AUTHORIZED,
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
    if w.retain {
        headers.push((RETAIN_HEADER, Bytes::from_static(b"true")));
    }
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
    if w.retain {
        mqtt.ingest
            .metrics()
            .mqtt_retained(if drop_retained { "dropped" } else { "accepted" });
    }
    if drop_retained {
        // Accepted, and nothing to publish when the connection is lost.
        return Ok(None);
    }
    // The will lives as long as the session (and its delay after it): copied into buffers of its
    // own, so it does not keep the CONNECT's read buffer alive.
    let own = |b: &Bytes| Bytes::copy_from_slice(b);
    Ok(Some(PreparedWill {
        stream,
        event: Event {
            key: key.map(Bytes::from),
            id: None,
            headers: headers.iter().map(|(k, v)| (own(k), own(v))).collect(),
            value: own(&w.payload),
            ..Event::default()
        },
        delay_secs: w.delay_secs.min(mqtt.opts.max_will_delay_secs),
    }))
}

/// Adds an MQTT 5 publish's properties as headers; a user property whose name Sluice reserves
/// (`mqtt-will`, `sluice-principal`, …) is refused with the reason.
pub(super) fn push_properties(
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
