//! Where admitted events go: the embedded log or Kafka. Admission talks to this one type.

use std::sync::Arc;

use sluice_config::StreamsConfig;
use sluice_core::Rejection;
use sluice_log::{Log, StreamLog};

use crate::admission::{log_rejection, stream_options};
use crate::kafka::{KafkaSink, Topic};

/// The log behind the gateway.
#[derive(Clone)]
pub enum Sink {
    Embedded(Log),
    Kafka(KafkaSink),
}

/// One stream in the sink, resolved for an append.
pub(crate) enum Target {
    Embedded(Arc<StreamLog>),
    Kafka(KafkaSink, Arc<Topic>),
}

impl Sink {
    /// Whether `stream` exists; `None` when the sink cannot tell without asking (Kafka topics
    /// not used yet), in which case the append finds out.
    pub fn known(&self, stream: &str) -> Option<bool> {
        match self {
            Sink::Embedded(log) => Some(log.stream(stream).is_some()),
            Sink::Kafka(k) => k.known(stream),
        }
    }

    /// Whether the sink takes writes; the reason for `/readyz` if not.
    pub fn health(&self) -> Result<(), String> {
        match self {
            Sink::Embedded(log) if log.healthy() => Ok(()),
            Sink::Embedded(_) => {
                Err("a log partition stopped taking writes after an I/O error".into())
            }
            Sink::Kafka(k) => k.health(),
        }
    }

    /// Finishes what is queued: the embedded writers fsync, the Kafka producer flushes.
    pub async fn close(&self) {
        match self {
            Sink::Embedded(log) => log.close().await,
            Sink::Kafka(k) => k.close().await,
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
            Sink::Kafka(k) => {
                let may_create = streams.auto_create || streams.declare.contains_key(name);
                k.get_or_create(name, &streams.settings(name), may_create)
                    .await
                    .map(|t| Target::Kafka(k.clone(), t))
            }
        }
    }
}
