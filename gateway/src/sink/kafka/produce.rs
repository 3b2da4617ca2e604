//! Producing: events to records with Sluice's headers, delivery reports to per-event receipts,
//! errors classified once as retryable or final.

use super::*;

impl KafkaSink {
    /// Hands every event to the producer and answers per event: at the durable ack point once
    /// Kafka acknowledged it (acks=all), or, for `received`, once it is queued. `held` is
    /// released when the last of them is delivered (or failed).
    pub(crate) async fn append(
        &self,
        topic: &Topic,
        req: &IngestRequest,
        ack: AckMode,
        held: Held,
        queued: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Vec<Receipt> {
        let n = topic.partition_count();
        let sticky = if n > 1
            && req
                .events
                .iter()
                .any(|e| e.key.is_none() && e.partition.is_none())
        {
            topic.sticky_partition()
        } else {
            0
        };
        let settings = req.admission.settings();
        let ts = now_ms();
        let ts_text = ts.to_string();
        let mut receipts = Vec::with_capacity(req.events.len());
        let mut pending = Vec::with_capacity(req.events.len());
        let mut queue_full = false;
        for e in &req.events {
            let placed = match crate::sink::place(e, n, sticky, settings, ts) {
                Ok(p) => p,
                Err(r) => {
                    receipts.push(Receipt::Failed(r));
                    pending.push(None);
                    continue;
                }
            };
            let partition = placed.partition;
            if queue_full {
                // Once the queue is full, later events of the request stay out too, so a retry
                // of the failed ones keeps their order per key.
                receipts.push(Receipt::Failed(queue_full_rejection()));
                continue;
            }
            let record = FutureRecord {
                topic: &topic.name,
                partition: Some(partition as i32),
                payload: Some(&e.value[..]),
                key: e.key.as_deref(),
                timestamp: Some(placed.timestamp_ms.unwrap_or(ts)),
                headers: Some(record_headers(req, e, &ts_text, placed.replaced_ms)),
            };
            match self.inner.producer.send_result(record) {
                Ok(delivery) => {
                    receipts.push(Receipt::Received { partition });
                    pending.push(Some(delivery));
                    continue;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    queue_full = true;
                    self.count_error(Some(RDKafkaErrorCode::QueueFull), true);
                    receipts.push(Receipt::Failed(queue_full_rejection()));
                }
                Err((e, _)) => {
                    let (rejection, retryable) = classify(&e);
                    self.count_error(code_of(&e), retryable);
                    receipts.push(Receipt::Failed(rejection));
                }
            }
            pending.push(None);
        }
        // Every event is in the producer's queue (or refused): their order is fixed.
        if let Some(q) = queued {
            let _ = q.send(());
        }
        // Nobody waits longer than message_timeout_ms for an answer. librdkafka reports within
        // it, except for requests already on the wire to a broker that vanished: those are
        // answered as retryable (the event may or may not be stored, so a retry is at least
        // once), and the budget stays held until librdkafka settles them.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.inner.cfg.message_timeout_ms);
        match ack {
            // Spooled streams reach Kafka through the spool's forwarder, never here.
            AckMode::Durable | AckMode::Spooled => {
                let (outcomes, unsettled) = self.deliveries(pending, deadline).await;
                for (r, o) in receipts.iter_mut().zip(outcomes) {
                    if let Some(o) = o {
                        *r = o;
                    }
                }
                self.settle(unsettled, held);
            }
            AckMode::Received => {
                // The budget stays held until Kafka has the events, so a slow cluster still
                // pushes back on producers that do not wait for acks.
                let sink = self.clone();
                tokio::spawn(async move {
                    let (_, unsettled) = sink.deliveries(pending, deadline).await;
                    sink.settle(unsettled, held);
                });
            }
        }
        receipts
    }

    /// Releases `held` once every unsettled delivery has its report.
    pub(super) fn settle(&self, unsettled: Vec<DeliveryFuture>, held: Held) {
        if unsettled.is_empty() {
            return drop(held);
        }
        tokio::spawn(async move {
            // Already counted (and answered) as unconfirmed.
            let _ = join_all(unsettled).await;
            drop(held);
        });
    }

    /// Awaits the delivery reports until `deadline`: a receipt per handed-over event (None
    /// where nothing was handed over), and the deliveries still unsettled at the deadline.
    pub(super) async fn deliveries(
        &self,
        mut pending: Vec<Option<DeliveryFuture>>,
        deadline: tokio::time::Instant,
    ) -> (Vec<Option<Receipt>>, Vec<DeliveryFuture>) {
        let results = join_all(pending.iter_mut().map(|d| async move {
            match d {
                None => None,
                Some(d) => Some(tokio::time::timeout_at(deadline, d).await),
            }
        }))
        .await;
        let mut unsettled = Vec::new();
        let receipts = results
            .into_iter()
            .zip(pending)
            .map(|(r, d)| {
                r.map(|r| match r {
                    Ok(Ok(Ok(d))) => Receipt::Appended {
                        partition: d.partition as u32,
                        offset: d.offset as u64,
                    },
                    Ok(Ok(Err((e, _)))) => {
                        let (rejection, retryable) = classify(&e);
                        self.count_error(code_of(&e), retryable);
                        Receipt::Failed(rejection)
                    }
                    Ok(Err(_canceled)) => Receipt::Failed(Rejection::unavailable(
                        RETRY_AFTER,
                        "the Kafka producer shut down before delivering the event",
                    )),
                    Err(_elapsed) => {
                        unsettled.extend(d);
                        self.count_error(None, true);
                        Receipt::Failed(Rejection::unavailable(
                            RETRY_AFTER,
                            "Kafka did not confirm the event within log.kafka.message_timeout_ms; it may or may not be stored",
                        ))
                    }
                })
            })
            .collect();
        (receipts, unsettled)
    }

    pub(super) fn count_error(&self, code: Option<RDKafkaErrorCode>, retryable: bool) {
        self.inner
            .metrics
            .delivery_errors
            .get_or_create(&ErrorLabels {
                error: code.map_or_else(|| "Unconfirmed".to_string(), |c| format!("{c:?}")),
                retryable: if retryable { "true" } else { "false" },
            })
            .inc();
    }
}

pub(super) fn queue_full_rejection() -> Rejection {
    Rejection::unavailable(
        RETRY_AFTER,
        "the Kafka producer's queue is full (the cluster is not keeping up); retry later",
    )
}

pub(super) fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    e.rdkafka_error_code()
}

/// Classifies a Kafka failure of one event once: the rejection the producer gets, and whether a
/// retry can help. Everything not known to be final is retryable.
pub(super) fn classify(e: &KafkaError) -> (Rejection, bool) {
    use RDKafkaErrorCode as C;
    match code_of(e) {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => (
            Rejection::TooLarge {
                message: format!("Kafka refused the event as too large: {e}"),
            },
            false,
        ),
        Some(C::InvalidMessage | C::InvalidRecord | C::InvalidTimestamp) => (
            Rejection::Malformed {
                message: format!("Kafka refused the event: {e}"),
            },
            false,
        ),
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::InvalidTopic
            | C::PolicyViolation
            | C::UnsupportedForMessageFormat
            | C::Fatal,
        ) => (
            Rejection::Internal {
                message: format!("Kafka refused the event; an operator must act: {e}"),
            },
            false,
        ),
        _ => (
            Rejection::unavailable(
                RETRY_AFTER,
                format!("Kafka did not take the event; retry: {e}"),
            ),
            true,
        ),
    }
}

/// The record's headers: Sluice's own (documented names), then the event's.
pub(super) fn record_headers(
    req: &IngestRequest,
    e: &Event,
    received_at: &str,
    replaced_ms: Option<i64>,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(
        5 + e.headers.len() + req.record_headers.len() + e.id.is_some() as usize,
    );
    let add = |h: OwnedHeaders, key: &str, value: &[u8]| {
        h.insert(Header {
            key,
            value: Some(value),
        })
    };
    // An event's own content type (gRPC, MQTT 5, a CloudEvent's datacontenttype) is its only
    // `content-type` header, as the CloudEvents Kafka binding has it.
    let own_type = e
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case(headers::CONTENT_TYPE.as_bytes()));
    if !req.content_type.is_empty() && !own_type {
        h = add(h, headers::CONTENT_TYPE, &req.content_type);
    }
    if let Some(id) = &e.id {
        h = add(h, headers::EVENT_ID, id);
    }
    h = add(h, headers::PRINCIPAL, req.principal().name().as_bytes());
    if !req.principal().source().is_empty() {
        h = add(
            h,
            headers::PRINCIPAL_SOURCE,
            req.principal().source().as_bytes(),
        );
    }
    h = add(h, headers::PROTOCOL, req.protocol.as_str().as_bytes());
    h = add(h, headers::RECEIVED_AT, received_at.as_bytes());
    if let Some(original) = replaced_ms {
        h = add(
            h,
            headers::PRODUCER_TIMESTAMP,
            original.to_string().as_bytes(),
        );
    }
    for (k, v) in e.headers.iter().chain(&req.record_headers) {
        h = add(h, &String::from_utf8_lossy(k), v);
    }
    h
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
