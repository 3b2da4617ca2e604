//! The Kafka sink: one idempotent (acks=all) rdkafka producer shared by the process. Streams map
//! to topics through `log.kafka.topic`; keys pick partitions with Kafka's murmur2 (as the Java
//! client does); delivery reports resolve per-event receipts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use sluice_config::{AckMode, KafkaConfig, StreamSettings};
use sluice_core::{Event, IngestRequest, Receipt, Rejection};
use tokio::sync::watch;

use super::Held;

mod metrics;
mod produce;
mod read;
mod topics;

use metrics::ErrorLabels;
pub use metrics::{KafkaMetrics, StatsContext};
pub(crate) use produce::now_ms;
pub(crate) use read::consumer_config;
pub use topics::{Topic, topic_name};

/// Header names Sluice adds to every record (documented in docs/kafka.md).
pub mod headers {
    /// Media type of the value, as the producer declared it.
    pub const CONTENT_TYPE: &str = "content-type";
    /// The producer's own event id, when it gave one.
    pub const EVENT_ID: &str = "sluice-event-id";
    /// The authenticated principal that produced the event.
    pub const PRINCIPAL: &str = "sluice-principal";
    /// How the principal authenticated: `api_key`, `jwt:<issuer>`, `mtls` or `anonymous`.
    pub const PRINCIPAL_SOURCE: &str = "sluice-principal-source";
    /// `http`, `grpc`, `mqtt` or `websocket`.
    pub const PROTOCOL: &str = "sluice-protocol";
    /// When the gateway received the event: milliseconds since the Unix epoch, in decimal.
    pub const RECEIVED_AT: &str = "sluice-received-at";
    /// A producer timestamp the stream's `timestamp_out_of_range = "receive_time"` replaced:
    /// milliseconds since the Unix epoch, in decimal.
    pub const PRODUCER_TIMESTAMP: &str = "sluice-producer-timestamp";
}

/// How long a producer is told to wait when Kafka cannot take events.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The librdkafka settings of Sluice's producer: Sluice's own first, then the overrides (which
/// configuration validation has checked for conflicts). Shared with loadtest's direct producer
/// so both measure the same settings.
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (key, value) in k.producer_properties() {
        c.set(key, value);
    }
    c
}

/// The Kafka sink. Cheap to clone.
#[derive(Clone)]
pub struct KafkaSink {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: KafkaConfig,
    producer: FutureProducer<StatsContext>,
    admin: Option<AdminClient<DefaultClientContext>>,
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    create: tokio::sync::Mutex<()>,
    max_streams: usize,
    reachable: AtomicBool,
    /// Why the brokers are not reachable (or the producer failed fatally), for `/readyz`.
    problem: Mutex<String>,
    metrics: KafkaMetrics,
    stop: watch::Sender<bool>,
    /// Consumers for the read side.
    readers: Arc<read::Readers>,
}

/// Why the sink cannot take events now.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    #[error("librdkafka refused the producer settings: {0}")]
    Config(#[source] KafkaError),
}

impl KafkaSink {
    /// Creates the producer (it connects in the background; an unreachable cluster does not stop
    /// the gateway from starting) and starts the health probe.
    pub fn new(
        cfg: &KafkaConfig,
        max_streams: usize,
        metrics: KafkaMetrics,
    ) -> Result<Self, KafkaSinkError> {
        let config = client_config(cfg);
        let producer: FutureProducer<StatsContext> = config
            .create_with_context(StatsContext {
                metrics: metrics.clone(),
            })
            .map_err(KafkaSinkError::Config)?;
        let admin = if cfg.create_topics {
            Some(config.create().map_err(KafkaSinkError::Config)?)
        } else {
            None
        };
        let (stop, _) = watch::channel(false);
        let sink = KafkaSink {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                producer,
                admin,
                topics: RwLock::default(),
                create: tokio::sync::Mutex::new(()),
                max_streams,
                reachable: AtomicBool::new(false),
                problem: Mutex::new("no broker has answered yet".into()),
                metrics,
                stop,
                readers: Arc::new(read::Readers::new(cfg)),
            }),
        };
        tokio::spawn(sink.clone().probe());
        Ok(sink)
    }

    /// The `[log.kafka]` settings.
    pub(crate) fn config(&self) -> &KafkaConfig {
        &self.inner.cfg
    }

    /// The streams this gateway has produced to or looked up since start, with their
    /// partition counts.
    pub fn streams(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .inner
            .topics
            .read()
            .unwrap()
            .iter()
            .map(|(k, t)| (k.to_string(), t.partition_count()))
            .collect();
        v.sort();
        v
    }

    /// Reads a stream's topic (docs/consume.md); the caller checked the permission.
    pub async fn read(
        &self,
        req: sluice_core::ReadRequest,
    ) -> Result<sluice_core::ReadBatch, sluice_core::ReadError> {
        self.inner.readers.read(req).await
    }

    /// Every record of `stream` from `from_ms` to its end now, blocking (see
    /// [`read::Readers::scan`]).
    pub(crate) fn scan(
        &self,
        stream: &str,
        from_ms: i64,
        deadline: std::time::Instant,
        f: impl FnMut(u32, sluice_log::Record),
    ) -> Result<(), String> {
        self.inner.readers.scan(stream, from_ms, deadline, f)
    }

    /// Whether the brokers answer and the producer can take events; the reason if not.
    pub fn health(&self) -> Result<(), String> {
        if let Some((code, why)) = self.inner.producer.client().fatal_error() {
            return Err(format!(
                "the Kafka producer failed fatally ({code:?}: {why}); restart the gateway"
            ));
        }
        if self.inner.reachable.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err(format!(
                "no Kafka broker is reachable: {}",
                self.inner.problem.lock().unwrap()
            ))
        }
    }

    /// Whether `stream`'s topic is known to exist (`None`: not known yet either way).
    pub fn known(&self, stream: &str) -> Option<bool> {
        self.inner
            .topics
            .read()
            .unwrap()
            .contains_key(stream)
            .then_some(true)
    }

    /// Delivers what is queued (up to `message_timeout_ms`) and stops the probe.
    pub async fn close(&self) {
        self.inner.stop.send_replace(true);
        let inner = self.inner.clone();
        let timeout = Duration::from_millis(inner.cfg.message_timeout_ms);
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = inner.producer.flush(Timeout::After(timeout)) {
                tracing::warn!(error = %e, "Kafka producer did not deliver everything before shutdown");
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::produce::*;
    use super::*;
    use sluice_config::{KafkaSaslMechanism, KafkaSecurityProtocol, Secret};

    #[test]
    fn client_config_carries_sluices_guarantees_and_the_overrides() {
        let mut k = KafkaConfig {
            bootstrap_servers: "k1:9092,k2:9092".into(),
            linger_ms: 7,
            ..KafkaConfig::default()
        };
        k.overrides
            .insert("socket.keepalive.enable".into(), "true".into());
        let c = client_config(&k);
        for (key, want) in [
            ("bootstrap.servers", "k1:9092,k2:9092"),
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("compression.codec", "zstd"),
            ("linger.ms", "7"),
            ("allow.auto.create.topics", "false"),
            ("queue.buffering.max.kbytes", "1048576"),
            ("socket.keepalive.enable", "true"),
        ] {
            assert_eq!(c.get(key), Some(want), "{key}");
        }
    }

    #[test]
    fn every_compression_tls_and_sasl_setting_is_built_into_librdkafka() {
        // librdkafka refuses settings it was built without (e.g. zstd, or TLS without OpenSSL)
        // when the producer is created, so creating one proves the build supports them.
        for compression in ["none", "gzip", "lz4", "snappy", "zstd"] {
            let mut k = KafkaConfig {
                bootstrap_servers: "127.0.0.1:1".into(),
                compression: serde_json::from_value(serde_json::json!(compression)).unwrap(),
                ..KafkaConfig::default()
            };
            k.security.protocol = KafkaSecurityProtocol::SaslSsl;
            k.security.sasl_mechanism = Some(KafkaSaslMechanism::ScramSha512);
            k.security.sasl_username = Some("u".into());
            k.security.sasl_password = Some(Secret("p".into()));
            k.security.ssl_verify_hostname = Some(true);
            let p: Result<FutureProducer, _> = client_config(&k).create();
            assert!(p.is_ok(), "{compression}: {:?}", p.err());
        }
        let mut k = KafkaConfig::default();
        k.overrides.insert("no.such.property".into(), "1".into());
        let err = KafkaSink::new(&k, 10, KafkaMetrics::default())
            .err()
            .expect("unknown property accepted");
        assert!(err.to_string().contains("no.such.property"), "{err}");
    }

    #[test]
    fn oauthbearer_fetches_its_token_from_the_oidc_endpoint_with_client_credentials() {
        use std::io::{BufRead, BufReader, Read, Write};
        // A token endpoint on 127.0.0.1: takes one request, answers with a token, and hands
        // the request to the test.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/oauth2/token", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" || line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            // librdkafka reads the token's expiry and principal from its JWT claims.
            let b64 = |v: serde_json::Value| {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
            };
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 3600;
            let jwt = format!(
                "{}.{}.c2ln",
                b64(serde_json::json!({"alg": "RS256", "typ": "JWT"})),
                b64(serde_json::json!({"sub": "sluice", "exp": exp, "iat": exp - 3600}))
            );
            let answer = serde_json::json!({"access_token": jwt, "token_type": "bearer", "expires_in": 3600}).to_string();
            let mut conn = conn;
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            );
            tx.send((head, String::from_utf8(body).unwrap())).unwrap();
        });
        let mut k = KafkaConfig {
            bootstrap_servers: "127.0.0.1:1".into(),
            ..KafkaConfig::default()
        };
        k.security.protocol = KafkaSecurityProtocol::SaslPlaintext;
        k.security.sasl_mechanism = Some(KafkaSaslMechanism::OauthBearer);
        k.security.oauthbearer_token_endpoint_url = Some(url);
        k.security.oauthbearer_client_id = Some("sluice-gw".into());
        k.security.oauthbearer_client_secret = Some(Secret("s3cret".into()));
        k.security.oauthbearer_scope = Some("kafka.write".into());
        k.security
            .oauthbearer_extensions
            .insert("logicalCluster".into(), "lkc-1".into());
        let c = client_config(&k);
        assert_eq!(c.get("sasl.oauthbearer.method"), Some("oidc"));
        assert_eq!(
            c.get("sasl.oauthbearer.extensions"),
            Some("logicalCluster=lkc-1")
        );
        let p: FutureProducer = c.create().expect("librdkafka is built with OIDC support");
        let (head, body) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the producer asks the token endpoint for a token");
        drop(p);
        assert!(head.starts_with("POST /oauth2/token "), "{head}");
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode("sluice-gw:s3cret");
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "authorization: basic {}",
                basic.to_ascii_lowercase()
            )),
            "client credentials in HTTP Basic: {head}"
        );
        assert!(body.contains("grant_type=client_credentials"), "{body}");
        assert!(body.contains("scope=kafka.write"), "{body}");
    }

    #[test]
    fn topics_follow_the_template() {
        assert_eq!(topic_name("{stream}", "orders"), "orders");
        assert_eq!(topic_name("sluice.{stream}", "orders"), "sluice.orders");
    }

    #[test]
    fn errors_are_classified_once_as_retryable_or_final() {
        use RDKafkaErrorCode as C;
        let e = |c| KafkaError::MessageProduction(c);
        for c in [
            C::MessageTimedOut,
            C::QueueFull,
            C::NotEnoughReplicas,
            C::LeaderNotAvailable,
            C::AllBrokersDown,
        ] {
            let (r, retryable) = classify(&e(c));
            assert!(retryable, "{c:?}");
            assert!(r.retry_after().is_some(), "{c:?}");
        }
        for (c, code) in [
            (C::MessageSizeTooLarge, "too_large"),
            (C::InvalidRecord, "malformed"),
            (C::TopicAuthorizationFailed, "internal"),
        ] {
            let (r, retryable) = classify(&e(c));
            assert!(!retryable, "{c:?}");
            assert_eq!(r.code(), code);
            assert!(r.retry_after().is_none(), "{c:?}");
        }
    }
}
