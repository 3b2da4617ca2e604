//! Where admitted events go: the embedded log (`embedded.rs`) or Kafka (`kafka.rs`), beside
//! each other behind one [`Sink`]: admission resolves a stream to a [`Target`] and calls its
//! `append`, without knowing which log it talks to.

pub mod embedded;
pub mod kafka;
pub mod spool;

use std::sync::Arc;

use sluice_config::{AckMode, StreamSettings, StreamsConfig, TimestampPolicy};
use sluice_core::{Event, IngestRequest, Receipt, Rejection, Reservation};
use sluice_log::{Log, StreamLog};

pub use embedded::{log_rejection, stream_options};
use kafka::{KafkaSink, Topic};
use spool::{Spool, SpoolStream};

/// Budget held for a request: the global reservation and the stream's, if it has one. It is
/// released when the events reach their ack point (or, for `ack = "received"`, travels with
/// each queued share until it is written).
pub(crate) struct Held {
    pub(crate) global: Reservation,
    pub(crate) stream: Option<Reservation>,
}

impl Held {
    fn split(&mut self, bytes: usize) -> Held {
        Held {
            global: self.global.split(bytes),
            stream: self.stream.as_mut().map(|r| r.split(bytes)),
        }
    }
}

/// Where one event goes and with which time, as every sink decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Placement {
    pub(crate) partition: u32,
    /// The record's timestamp: the producer's, or `None` for the time of receipt.
    pub(crate) timestamp_ms: Option<i64>,
    /// The producer's timestamp when the stream's policy replaced it (kept as a header).
    pub(crate) replaced_ms: Option<i64>,
}

/// Places `e` in a stream of `n` partitions: the producer's partition if it chose one (refused
/// when the stream has no such partition), else its key's (Kafka's murmur2), else `sticky`; and
/// its producer timestamp checked against the stream's bounds around `now_ms`.
pub(crate) fn place(
    e: &Event,
    n: u32,
    sticky: u32,
    settings: &StreamSettings,
    now_ms: i64,
) -> Result<Placement, Rejection> {
    let partition = match (e.partition, &e.key, n) {
        (Some(p), _, _) if p < n => p,
        (Some(p), _, _) => {
            return Err(Rejection::Malformed {
                message: format!(
                    "partition {p} does not exist: the stream has {n} partition{} (0 to {})",
                    if n == 1 { "" } else { "s" },
                    n.saturating_sub(1)
                ),
            });
        }
        (None, _, 1) => 0,
        (None, Some(k), _) => sluice_log::partition_for_key(k, n),
        (None, None, _) => sticky,
    };
    let Some(ts) = e.timestamp_ms else {
        return Ok(Placement {
            partition,
            timestamp_ms: None,
            replaced_ms: None,
        });
    };
    // Kafka reserves negative timestamps (-1 is "none"), so times before 1970 are refused on
    // every log alike.
    if ts < 0 {
        return Err(Rejection::Malformed {
            message: format!(
                "timestamp {ts} is before 1970-01-01T00:00:00Z, which is not supported"
            ),
        });
    }
    let ahead = ts.saturating_sub(now_ms);
    let behind = now_ms.saturating_sub(ts);
    let broken = if settings.max_timestamp_future_ms > 0
        && ahead > settings.max_timestamp_future_ms as i64
    {
        Some(format!(
            "{} ms ahead of the gateway's clock; the stream takes at most {} ms (max_timestamp_future_ms)",
            ahead, settings.max_timestamp_future_ms
        ))
    } else if settings.max_timestamp_past_ms > 0 && behind > settings.max_timestamp_past_ms as i64 {
        Some(format!(
            "{} ms behind the gateway's clock; the stream takes at most {} ms (max_timestamp_past_ms)",
            behind, settings.max_timestamp_past_ms
        ))
    } else {
        None
    };
    match (broken, settings.timestamp_out_of_range) {
        (None, _) => Ok(Placement {
            partition,
            timestamp_ms: Some(ts),
            replaced_ms: None,
        }),
        (Some(_), TimestampPolicy::ReceiveTime) => Ok(Placement {
            partition,
            timestamp_ms: None,
            replaced_ms: Some(ts),
        }),
        (Some(why), TimestampPolicy::Reject) => Err(Rejection::Malformed {
            message: format!("timestamp {} is {why}", sluice_core::format_timestamp(ts)),
        }),
    }
}

/// The log behind the gateway.
#[derive(Clone)]
pub enum Sink {
    Embedded(Log),
    /// Kafka, with the spool in front of it when a stream acks `spooled`.
    Kafka(KafkaSink, Option<Spool>),
}

/// One stream in the sink, resolved for an append.
pub(crate) enum Target {
    Embedded(Arc<StreamLog>),
    Kafka(KafkaSink, Arc<Topic>),
    Spool(Spool, Arc<SpoolStream>, StreamSettings),
}

impl Target {
    /// Appends the request's events and answers each at the stream's ack point; `queued`
    /// hears when their order in the log is fixed.
    pub(crate) async fn append(
        &self,
        req: &IngestRequest,
        ack: AckMode,
        held: Held,
        queued: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Vec<Receipt> {
        match self {
            Target::Embedded(stream) => embedded::append(stream, req, ack, held, queued).await,
            Target::Kafka(sink, topic) => sink.append(topic, req, ack, held, queued).await,
            Target::Spool(spool, stream, settings) => {
                spool.append(stream, settings, req, held, queued).await
            }
        }
    }
}

impl Sink {
    /// Whether `stream` exists; `None` when the sink cannot tell without asking (Kafka topics
    /// not used yet), in which case the append finds out.
    pub fn known(&self, stream: &str) -> Option<bool> {
        match self {
            Sink::Embedded(log) => Some(log.stream(stream).is_some()),
            Sink::Kafka(k, _) => k.known(stream),
        }
    }

    /// Whether the sink takes writes; the reason for `/readyz` if not. A gateway with a spool
    /// takes them while Kafka is away (its spooled streams do), so it stays ready.
    pub fn health(&self) -> Result<(), String> {
        match self {
            Sink::Embedded(log) if log.healthy() => Ok(()),
            Sink::Embedded(_) => {
                Err("a log partition stopped taking writes after an I/O error".into())
            }
            Sink::Kafka(_, Some(spool)) if !spool.healthy() => {
                Err("a spool partition stopped taking writes after an I/O error".into())
            }
            Sink::Kafka(_, Some(_)) => Ok(()),
            Sink::Kafka(k, None) => k.health(),
        }
    }

    /// What `/readyz` says beside "ready" when the gateway serves in a degraded way: spooling
    /// while Kafka is away or a backlog drains.
    pub fn degraded(&self) -> Option<String> {
        match self {
            Sink::Kafka(_, Some(spool)) => spool.detail(),
            _ => None,
        }
    }

    /// Finishes what is queued: the embedded writers fsync, the Kafka producer flushes.
    pub async fn close(&self) {
        match self {
            Sink::Embedded(log) => log.close().await,
            Sink::Kafka(k, spool) => {
                if let Some(spool) = spool {
                    spool.close().await;
                }
                k.close().await
            }
        }
    }

    /// The stream `name`, created if the configuration allows it.
    pub(crate) async fn target(
        &self,
        name: &str,
        streams: &StreamsConfig,
    ) -> Result<Target, Rejection> {
        match self {
            Sink::Embedded(log) => log
                .get_or_create(name, stream_options(streams, name))
                .await
                .map(Target::Embedded)
                .map_err(log_rejection),
            Sink::Kafka(k, spool) => {
                let may_create = streams.auto_create || streams.declare.contains_key(name);
                let settings = streams.settings(name);
                if settings.ack == AckMode::Spooled {
                    let Some(spool) = spool else {
                        return Err(Rejection::Internal {
                            message: format!(
                                "stream `{name}` acks \"spooled\" but the spool was not opened at start (no stream acked spooled then): restart the gateway"
                            ),
                        });
                    };
                    return spool
                        .stream(name, &settings, may_create)
                        .await
                        .map(|s| Target::Spool(spool.clone(), s, settings));
                }
                k.get_or_create(name, &settings, may_create)
                    .await
                    .map(|t| Target::Kafka(k.clone(), t))
            }
        }
    }
}
