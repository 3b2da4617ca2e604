//! The publish loop: reads and decodes packets under backpressure, maps publishes to groups of
//! one stream, hands them to the appender, and answers PINGREQ, PUBREL and keep-alive.

use super::connect::push_properties;
use super::*;

/// What the loop does next.
enum Step {
    /// The session's signal ([`registry::signal`]): taken over, draining, or a reload.
    Signal(u8),
    Kicked,
    Stop,
    Appended(u64, Vec<usize>, Outcome),
    Queued,
    Retry,
    Read(std::io::Result<usize>),
    /// The connection's one timer: a held batch's retry, the keep-alive, or the credential's
    /// expiry, whichever is first (one timer in every connection's state, not three).
    Timer,
    KeepAlive,
    Recheck,
    /// The timer fired for nothing due any more.
    Nothing,
}

impl<I: Ingest> Session<I> {
    pub(super) fn v5(&self) -> bool {
        self.codec.version() == Version::V5
    }

    /// Whether the connection's packets are decoded: not while the server owes Receive Maximum
    /// answers, has MAX_GROUPS batches unanswered, or holds a batch for the log. QoS 2 publishes
    /// answered with PUBREC and waiting for the client's PUBREL do not count here: the client
    /// owes that packet, and reading is how it arrives (counting them could leave a full window
    /// waiting for PUBRELs nobody reads).
    pub(super) fn can_read(&self) -> bool {
        !self.closing
            && self.unanswered < usize::from(self.mqtt.opts.receive_maximum)
            && self.pending.len() < MAX_GROUPS
            && self.pending.front().is_none_or(|g| g.held_since.is_none())
    }

    /// While packets are not decoded (backpressure), the socket is still read into a small
    /// buffer: a closed socket then ends the session at once and frees its slots, and a client
    /// that keeps sending is not mistaken for a silent one.
    pub(super) fn can_peek(&self) -> bool {
        !self.closing && self.rbuf.len() < PEEK_BYTES
    }

    pub(super) async fn serve<T: Transport>(
        &mut self,
        io: &mut T,
        signal: &registry::Signal,
        keep_alive: Duration,
        gate: &Gate,
        // Borrowed, not moved in: a moved argument takes a second slot of its size in the
        // connection's future.
        auth: &mut SessionAuth,
    ) -> Close {
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
                let keep_alive_at = can_read.then_some(deadline);
                let expiry = auth.expiry();
                let wake = [retry_at, keep_alive_at, expiry]
                    .into_iter()
                    .flatten()
                    .min();
                let has_appends = self.appender.in_flight();
                let waiting = self.appender.chain.waiting();
                let step = tokio::select! {
                    biased;
                    bits = std::future::poll_fn(|cx| signal.poll_take(cx)) => Step::Signal(bits),
                (id, idx, out) = appender::next_outcome(&mut self.appender.appends), if has_appends => Step::Appended(id, idx, out),
                    _ = self.appender.chain.wait(), if waiting => Step::Queued,
                    r = io.read_into(&mut self.rbuf), if can_read || can_peek => Step::Read(r),
                    _ = tokio::time::sleep_until(wake.unwrap_or(far)), if wake.is_some() => Step::Timer,
                };
                match step {
                    Step::Signal(bits) => {
                        use registry::signal::{KICKED, RELOAD, STOP};
                        if bits & KICKED != 0 {
                            Step::Kicked
                        } else if bits & STOP != 0 && !self.closing {
                            Step::Stop
                        } else if bits & RELOAD != 0 && auth.reload_pending() {
                            Step::Recheck
                        } else {
                            Step::Nothing
                        }
                    }
                    Step::Timer => {
                        let now = Instant::now();
                        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
                        if due(retry_at) {
                            Step::Retry
                        } else if due(keep_alive_at) {
                            Step::KeepAlive
                        } else if due(expiry) {
                            Step::Recheck
                        } else {
                            Step::Nothing
                        }
                    }
                    step => step,
                }
            };
            let result = match step {
                Step::Kicked => return Close::TakenOver,
                Step::Stop => {
                    // Packets already read are still handled (and answered before the
                    // DISCONNECT); the socket is not read any more.
                    let decoded = self.decode_ready();
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
                Step::Timer | Step::Signal(_) | Step::Nothing => Ok(()),
                Step::Read(Ok(0)) | Step::Read(Err(_)) => return Close::Eof,
                Step::Read(Ok(n)) => {
                    deadline = Instant::now() + keep_alive;
                    if n >= spare {
                        self.read_hint = (self.read_hint * 2).min(64 * 1024);
                    } else if n < self.read_hint / 4 {
                        self.read_hint = (self.read_hint / 2).max(MIN_READ);
                    }
                    self.decode_ready()
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
                // Boxed: a recheck is rare (a reload, an expiry), and its future would otherwise
                // sit in every idle connection's state.
                Step::Recheck => match Box::pin(gate.recheck(auth)).await {
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
                Ok(()) if self.can_read() && !self.rbuf.is_empty() => {
                    self.decode_ready().and_then(|()| self.settle_and_answer())
                }
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
    pub(super) fn decode_ready(&mut self) -> Result<(), Close> {
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
    pub(super) fn submit(&mut self, mut g: Group) {
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
    pub(super) fn prepare(
        &mut self,
        p: Publish,
    ) -> Result<Option<(Item, Option<StreamName>)>, Close> {
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
        let (stream, key, mapped_id) = match self.last_topic.as_deref() {
            Some((t, s, k, id)) if *t == topic => (s.clone(), k.clone(), id.clone()),
            _ => match self.mqtt.opts.topics.resolve(&topic) {
                Ok(m) if !m.binds.is_empty() && self.unbound(&topic, &m.binds) => {
                    return refused(
                        rc::NOT_AUTHORIZED,
                        "not_authorized",
                        format!("topic `{topic}` is not this device's to publish to"),
                    );
                }
                Ok(m) => match StreamName::parse(&m.stream) {
                    Ok(s) => {
                        let k = m.key.map(Bytes::from);
                        let id = m.id.map(Bytes::from);
                        // A copy of the topic: the publish's own bytes are a slice of a read
                        // buffer, which the cache would otherwise keep alive.
                        let cached = ByteString::from(&*topic);
                        self.last_topic =
                            Some(Box::new((cached, s.clone(), k.clone(), id.clone())));
                        (s, k, id)
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
        // A retained publish (a device's "online" state at boot, say) is an event like any
        // other, marked as retained; a stream may drop them instead, answered with success.
        if p.retain && self.drops_retained(&stream) {
            self.mqtt.ingest.metrics().mqtt_retained("dropped");
            return Ok(Some((
                Item {
                    packet_id,
                    qos2,
                    event: Event::default(),
                    state: State::Done(None),
                },
                None,
            )));
        }
        let mut headers = vec![(Bytes::from_static(b"mqtt-topic"), topic.as_bytes().clone())];
        if p.retain {
            self.mqtt.ingest.metrics().mqtt_retained("accepted");
            headers.push((RETAIN_HEADER, Bytes::from_static(b"true")));
        }
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
        // The user property `id` (as in the CloudEvents MQTT binding), else the id the topic
        // rule renders, is the event's id: stored as its id, and its dedup key on streams with
        // dedup (docs/exactly-once.md).
        let id = take_property(&mut headers, b"id").or(mapped_id);
        // The user properties `time` (RFC 3339, as in the CloudEvents MQTT binding, or
        // milliseconds since the epoch) and `partition` are the event's producer timestamp and
        // chosen partition, as the HTTP envelope's `timestamp` and `partition`.
        let placed = take_property(&mut headers, b"time")
            .map(|t| {
                std::str::from_utf8(&t)
                    .map_err(|_| "user property `time` is not UTF-8".to_string())
                    .and_then(sluice_core::parse_timestamp)
                    .map_err(|m| format!("user property `time`: {m}"))
            })
            .transpose()
            .and_then(|ts| {
                let partition = take_property(&mut headers, b"partition")
                    .map(|p| {
                        std::str::from_utf8(&p)
                            .ok()
                            .and_then(|p| p.trim().parse::<u32>().ok())
                            .ok_or_else(|| {
                                "user property `partition` must be a partition number".to_string()
                            })
                    })
                    .transpose()?;
                Ok((ts, partition))
            });
        let (timestamp_ms, partition) = match placed {
            Ok(p) => p,
            Err(m) => {
                self.count_refusal("malformed");
                return refused(rc::PAYLOAD_FORMAT_INVALID, "malformed", m);
            }
        };
        // A QoS 1/2 publish is known by (client id, packet id) on streams with dedup: a resend
        // (DUP) of one already stored is answered without a second copy, also after a reconnect.
        if let Some(pid) = packet_id {
            let mut v = Vec::with_capacity(self.identity.client_id.len() + 7);
            v.push(if p.dup { b'd' } else { b'n' });
            v.extend_from_slice(self.identity.client_id.as_bytes());
            v.push(b'#');
            v.extend_from_slice(pid.get().to_string().as_bytes());
            headers.push((
                Bytes::from_static(sluice_core::MQTT_PACKET_HEADER.as_bytes()),
                Bytes::from(v),
            ));
        }
        if qos2 {
            self.qos2_pending.insert(packet_id.expect("checked").get());
        }
        let item = Item {
            packet_id,
            qos2,
            event: Event {
                key,
                id,
                headers,
                value: p.payload,
                timestamp_ms,
                partition,
            },
            state: State::Submitted,
        };
        Ok(Some((item, Some(stream))))
    }

    /// Whether a topic's bound placeholders are not this connection's own (counted, and logged
    /// once per connection): device A publishing as device B.
    fn unbound(&mut self, topic: &str, binds: &[(sluice_config::IdentityField, String)]) -> bool {
        let Err(why) = self.identity.check(&self.appender.principal, binds) else {
            return false;
        };
        self.count_refusal("identity");
        if !self.bind_logged {
            self.bind_logged = true;
            tracing::warn!(client_id = %self.identity.client_id, principal = self.appender.principal.name(), topic, reason = %why, "MQTT publish outside the device's bound topics refused (further ones on this connection are only counted)");
        }
        true
    }

    /// Whether `stream` drops retained publishes (`mqtt_retained = "drop"`). Asked only for
    /// retained publishes (rare: a device's state at boot), so the admission it takes costs
    /// nothing on the publish path; one the principal may not have is left for the append to
    /// refuse.
    fn drops_retained(&self, stream: &StreamName) -> bool {
        self.mqtt
            .ingest
            .admit(&self.appender.principal, stream)
            .is_ok_and(|a| a.settings().mqtt_retained == sluice_config::RetainedPolicy::Drop)
    }

    pub(super) fn count_refusal(&self, reason: &'static str) {
        self.mqtt.ingest.metrics().rejected(PROTO, reason, 1);
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

/// Removes the first header named `name` (an MQTT 5 user property Sluice interprets), if any.
fn take_property(headers: &mut Vec<(Bytes, Bytes)>, name: &[u8]) -> Option<Bytes> {
    headers
        .iter()
        .position(|(k, _)| &k[..] == name)
        .map(|i| headers.remove(i).1)
}
