//! Streams to topics: names from the template, metadata (readiness probe, partition counts),
//! and topic creation.

use super::*;

/// The topic of `stream` under the template `log.kafka.topic`.
pub fn topic_name(template: &str, stream: &str) -> String {
    template.replace("{stream}", stream)
}

/// One stream's topic: its name and partition count (refreshed from metadata).
pub struct Topic {
    pub name: String,
    partitions: AtomicU32,
    next_sticky: AtomicU32,
}

impl Topic {
    pub fn partition_count(&self) -> u32 {
        self.partitions.load(Ordering::Relaxed).max(1)
    }

    /// The partition of a keyless request's events: the next one, round robin per request.
    pub(super) fn sticky_partition(&self) -> u32 {
        self.next_sticky.fetch_add(1, Ordering::Relaxed) % self.partition_count()
    }
}

pub(super) fn metadata_error(e: impl std::fmt::Display) -> Rejection {
    Rejection::unavailable(
        RETRY_AFTER,
        format!("Kafka did not answer a metadata request: {e}"),
    )
}

impl KafkaSink {
    /// Every few moments: ask the brokers for metadata (readiness), sample the producer's
    /// queue, and now and then refresh the partition counts of known topics.
    pub(super) async fn probe(self) {
        let mut stop = self.inner.stop.subscribe();
        let every = Duration::from_millis(self.inner.cfg.health_check_interval_ms);
        let refresh_every = Duration::from_millis(self.inner.cfg.metadata_refresh_ms);
        let mut last_refresh = tokio::time::Instant::now();
        loop {
            let refresh = last_refresh.elapsed() >= refresh_every;
            if refresh {
                last_refresh = tokio::time::Instant::now();
            }
            let result = self.probe_once(refresh).await;
            let up = result.is_ok();
            if let Err(e) = result {
                *self.inner.problem.lock().unwrap() = e;
            }
            let was = self.inner.reachable.swap(up, Ordering::Relaxed);
            if was != up {
                if up {
                    tracing::info!("Kafka is reachable");
                } else {
                    tracing::warn!(problem = %self.inner.problem.lock().unwrap(), "Kafka is not reachable; producers get 503 until it is");
                }
            }
            let m = &self.inner.metrics;
            m.reachable.set(up as i64);
            m.queue_events
                .set(self.inner.producer.in_flight_count() as i64);
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.wait_for(|&s| s) => return,
            }
        }
    }

    /// One metadata round trip: for one known topic (or, with `all`, every known topic),
    /// updating partition counts; for none while no topic is known.
    pub(super) async fn probe_once(&self, all: bool) -> Result<(), String> {
        let names: Vec<String> = {
            let topics = self.inner.topics.read().unwrap();
            let mut it = topics.values().map(|t| t.name.clone());
            if all {
                it.collect()
            } else {
                it.next().into_iter().collect()
            }
        };
        let timeout = Duration::from_millis(self.inner.cfg.metadata_timeout_ms);
        if names.is_empty() {
            return self.metadata(None, timeout).await.map(|_| ());
        }
        for name in names {
            let counts = self.metadata(Some(name.clone()), timeout).await?;
            if let Some(Ok(n)) = counts.get(&name) {
                self.set_partitions(&name, *n);
            }
        }
        Ok(())
    }

    pub(super) fn set_partitions(&self, topic: &str, n: u32) {
        let topics = self.inner.topics.read().unwrap();
        for t in topics.values().filter(|t| t.name == topic) {
            let old = t.partitions.swap(n, Ordering::Relaxed);
            if old != n {
                tracing::info!(topic, from = old, to = n, "topic partition count changed");
            }
        }
    }

    /// Partition counts (or the broker's error) of `topic` (or of every topic) from a metadata
    /// request, run off the async threads since librdkafka blocks.
    pub(super) async fn metadata(
        &self,
        topic: Option<String>,
        timeout: Duration,
    ) -> Result<HashMap<String, Result<u32, RDKafkaErrorCode>>, String> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let md = inner
                .producer
                .client()
                .fetch_metadata(topic.as_deref(), Timeout::After(timeout))
                .map_err(|e| e.to_string())?;
            if md.brokers().is_empty() {
                return Err("the cluster reported no brokers".into());
            }
            Ok(md
                .topics()
                .iter()
                .map(|t| {
                    let r = match t.error() {
                        Some(e) => Err(RDKafkaErrorCode::from(e)),
                        None if t.partitions().is_empty() => {
                            Err(RDKafkaErrorCode::UnknownTopicOrPartition)
                        }
                        None => Ok(t.partitions().len() as u32),
                    };
                    (t.name().to_string(), r)
                })
                .collect())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The topic of `stream`, looked up (and, if allowed, created) on first use. `may_create` is
    /// true when the stream is declared or streams are created on first use.
    pub async fn get_or_create(
        &self,
        stream: &str,
        settings: &StreamSettings,
        may_create: bool,
    ) -> Result<Arc<Topic>, Rejection> {
        self.health()
            .map_err(|why| Rejection::unavailable(RETRY_AFTER, why))?;
        if let Some(t) = self.inner.topics.read().unwrap().get(stream) {
            return Ok(t.clone());
        }
        // One lookup at a time, so a burst of requests for a new stream asks the brokers once.
        let _one = self.inner.create.lock().await;
        if let Some(t) = self.inner.topics.read().unwrap().get(stream) {
            return Ok(t.clone());
        }
        let max = self.inner.max_streams;
        if self.inner.topics.read().unwrap().len() >= max {
            return Err(Rejection::unavailable(
                Duration::from_secs(60),
                format!(
                    "the gateway holds its maximum of {max} streams (streams.max_streams); no new stream can be used"
                ),
            ));
        }
        let name = topic_name(&self.inner.cfg.topic, stream);
        if name.len() > 249 {
            return Err(Rejection::Malformed {
                message: format!(
                    "the topic of stream `{stream}` under log.kafka.topic would be {} characters; Kafka allows 249",
                    name.len()
                ),
            });
        }
        let timeout = Duration::from_millis(self.inner.cfg.metadata_timeout_ms);
        let found = self
            .metadata(Some(name.clone()), timeout)
            .await
            .map_err(metadata_error)?;
        let partitions = match found.get(&name) {
            Some(Ok(n)) => *n,
            Some(Err(RDKafkaErrorCode::UnknownTopicOrPartition)) | None => {
                if !(may_create && self.inner.admin.is_some()) {
                    return Err(Rejection::NotFound {
                        stream: stream.to_string(),
                    });
                }
                self.create_topic(&name, settings).await?
            }
            Some(Err(e)) => {
                return Err(Rejection::unavailable(
                    RETRY_AFTER,
                    format!("Kafka cannot serve topic `{name}` now: {e}"),
                ));
            }
        };
        let topic = Arc::new(Topic {
            name,
            partitions: AtomicU32::new(partitions),
            next_sticky: AtomicU32::new(0),
        });
        let mut topics = self.inner.topics.write().unwrap();
        topics.insert(Arc::from(stream), topic.clone());
        self.inner.metrics.topics.set(topics.len() as i64);
        tracing::info!(stream, topic = %topic.name, partitions, "producing to Kafka topic");
        Ok(topic)
    }

    /// Creates `name` with the stream's partitions, retention and `log.kafka.replication_factor`,
    /// then waits until its partitions show in metadata; returns their count.
    pub(super) async fn create_topic(
        &self,
        name: &str,
        s: &StreamSettings,
    ) -> Result<u32, Rejection> {
        let Some(admin) = &self.inner.admin else {
            return Err(Rejection::Internal {
                message: "topic creation is off".into(),
            });
        };
        let timeout = Duration::from_millis(self.inner.cfg.metadata_timeout_ms);
        let retention_ms = if s.retention_ms == 0 {
            "-1".to_string()
        } else {
            s.retention_ms.to_string()
        };
        let retention_bytes = if s.retention_bytes == 0 {
            "-1".to_string()
        } else {
            s.retention_bytes.to_string()
        };
        let topic = NewTopic::new(
            name,
            s.partitions as i32,
            TopicReplication::Fixed(self.inner.cfg.replication_factor as i32),
        )
        .set("retention.ms", &retention_ms)
        .set("retention.bytes", &retention_bytes);
        let opts = AdminOptions::new()
            .request_timeout(Some(timeout))
            .operation_timeout(Some(timeout));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .map_err(metadata_error)?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Rejection::unavailable(
                        Duration::from_secs(5),
                        format!("Kafka did not create topic `{name}`: {code}"),
                    ));
                }
            }
        }
        tracing::info!(
            topic = name,
            partitions = s.partitions,
            "created Kafka topic"
        );
        // Creation is asynchronous on the brokers: wait until the partitions are visible.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let found = self
                .metadata(Some(name.to_string()), timeout)
                .await
                .map_err(metadata_error)?;
            if let Some(Ok(n)) = found.get(name) {
                return Ok(*n);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Rejection::unavailable(
                    RETRY_AFTER,
                    format!("topic `{name}` was created but its partitions are not visible yet"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
