//! The spool in front of Kafka (docs/kafka.md "The spool") against a real Tansu behind a link
//! the test cuts (a network outage; the broker keeps what it has): producers on every protocol
//! keep getting durable acks while Kafka is unreachable, and afterwards a consumer finds every
//! acked event in the topic exactly once and in order per key; the gateway SIGKILLed while it
//! forwards resumes from what Kafka has; a full spool pushes back; a restart with a backlog and
//! Kafka still away forwards it later; produce errors from librdkafka's mock cluster are
//! retried without loss or duplicates.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::http::Answer;
use sluice_tests::kafka::{LinkedTansu, Record, kafka_config, read_topic};
use sluice_tests::{Sluice, metric_or_zero, wait_until};
use tokio_tungstenite::tungstenite::Message;

const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Acked events in ack order: (key, value).
type Acked = Arc<Mutex<Vec<(String, String)>>>;

fn spool_config(bootstrap: &str, extra: &str) -> String {
    format!(
        "{}\n[log.spool]\ncheckpoint_interval_ms = 100\n{extra}\n[streams.defaults]\nack = \"spooled\"\npartitions = 3\n",
        kafka_config(bootstrap, "create_topics = true\nlinger_ms = 2")
    )
}

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(30))
}

async fn readyz(s: &Sluice) -> (u16, String) {
    match client().get(s.admin_url("/readyz")).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

async fn spool_waiting(s: &Sluice) -> f64 {
    let m = s.metrics().await;
    m.lines()
        .filter(|l| l.starts_with("sluice_spool_events{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the spool has forwarded everything (and something was spooled at all).
async fn drained(s: &Sluice, timeout: Duration) -> bool {
    wait_until(timeout, || async {
        let m = s.metrics().await;
        m.contains("sluice_spool_events{") && spool_waiting(s).await == 0.0
    })
    .await
}

/// Checks the topic against what was acked: every acked value exactly once, in ack order per
/// key; values that were never acked (their answer was lost) at most once.
fn check_exactly_once_in_order(records: &[Record], acked: &[(String, String)]) {
    let mut count: HashMap<&[u8], usize> = HashMap::new();
    for r in records {
        *count.entry(&r.value[..]).or_default() += 1;
    }
    let dup: Vec<_> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(v, n)| (String::from_utf8_lossy(v), *n))
        .collect();
    assert!(
        dup.is_empty(),
        "{} values stored twice, e.g. {:?}",
        dup.len(),
        &dup[..dup.len().min(10)]
    );
    let missing: Vec<_> = acked
        .iter()
        .filter(|(_, v)| !count.contains_key(v.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acked events are not in Kafka, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    // Per key, the topic's order (by partition and offset) is the ack order.
    let mut in_topic: BTreeMap<&[u8], Vec<&[u8]>> = BTreeMap::new();
    let mut sorted: Vec<&Record> = records.iter().collect();
    sorted.sort_by_key(|r| (r.partition, r.offset));
    for r in sorted {
        if let Some(k) = &r.key {
            in_topic.entry(k).or_default().push(&r.value);
        }
    }
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in acked {
        by_key.entry(k).or_default().push(v);
    }
    for (k, want) in by_key {
        let got: Vec<&[u8]> = in_topic
            .get(k.as_bytes())
            .map(|v| {
                v.iter()
                    .copied()
                    .filter(|v| want.iter().any(|w| w.as_bytes() == *v))
                    .collect()
            })
            .unwrap_or_default();
        let want: Vec<&[u8]> = want.iter().map(|w| w.as_bytes()).collect();
        assert!(
            got == want,
            "key {k}: the topic's order differs from the ack order"
        );
    }
}

/// HTTP producer: batches of 10 events over 5 keys, each batch after the last one's answer;
/// panics on any answer but a spooled ack (or, with `tolerate_errors`, a retryable 503 or a
/// lost connection).
fn http_producer(
    url: String,
    name: &'static str,
    acked: Acked,
    stop: Arc<AtomicBool>,
    tolerate_errors: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let c = client();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let events: Vec<(String, String)> = (0..10)
                .map(|i| (format!("{name}-k{}", i % 5), format!("{name}-{n}-{i}")))
                .collect();
            n += 1;
            let body: Vec<Value> = events
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v}))
                .collect();
            let a = match Answer::try_of(c.post(&url).json(&body)).await {
                Ok(a) => a,
                Err(_) if tolerate_errors => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(e) => panic!("{name}: {e}"),
            };
            if a.status == StatusCode::OK {
                let results = a.body["results"].as_array().expect("results");
                for (r, e) in results.iter().zip(&events) {
                    assert_eq!(r["status"], "spooled", "{name}: {r}");
                    // Stored as the JSON value it was sent as.
                    acked
                        .lock()
                        .unwrap()
                        .push((e.0.clone(), json!(e.1).to_string()));
                }
            } else if tolerate_errors && a.status == StatusCode::SERVICE_UNAVAILABLE {
                tokio::time::sleep(Duration::from_millis(20)).await;
            } else {
                panic!("{name}: {} {}", a.status, a.body);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_gets_durable_acks_through_an_outage_and_kafka_gets_each_event_once_in_order()
 {
    use rmqtt_codec::v5;
    use sluice_tests::mqtt::{connect5, publish, session5};
    let kafka = LinkedTansu::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[[mqtt.topics]]\npattern = \"devices/{{device}}/telemetry\"\nstream = \"fleet\"\nkey = \"{{device}}\"\n",
        spool_config(&kafka.bootstrap, "")
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    assert!(s.wait_readyz(200, sluice_tests::DEADLINE).await);
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Acked = Arc::default();
    let count = || acked.lock().unwrap().len();
    let mut tasks = vec![http_producer(
        s.events_url("fleet"),
        "http",
        acked.clone(),
        stop.clone(),
        false,
    )];

    // gRPC: unary batches of 5, one key per batch position.
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    tasks.push(tokio::spawn({
        let (acked, stop) = (acked.clone(), stop.clone());
        async move {
            let mut grpc = IngestClient::new(ch);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let events: Vec<(String, String)> = (0..5)
                    .map(|i| (format!("grpc-k{i}"), format!("grpc-{n}-{i}")))
                    .collect();
                n += 1;
                let r = grpc
                    .publish(pb::PublishRequest {
                        stream: "fleet".into(),
                        events: events
                            .iter()
                            .map(|(k, v)| pb::Event {
                                key: Some(k.as_bytes().to_vec().into()),
                                value: v.as_bytes().to_vec().into(),
                                ..Default::default()
                            })
                            .collect(),
                        content_type: "text/plain".into(),
                        idempotency_key: String::new(),
                    })
                    .await
                    .expect("gRPC publish")
                    .into_inner();
                for (r, e) in r.results.iter().zip(&events) {
                    match &r.result {
                        Some(pb::event_result::Result::Position(p)) => {
                            assert!(p.spooled && p.offset.is_none(), "{p:?}")
                        }
                        other => panic!("gRPC: {other:?}"),
                    }
                    acked.lock().unwrap().push(e.clone());
                }
            }
        }
    }));

    // WebSocket: one event per frame, each acked before the next.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/fleet/ws", s.http))
            .await
            .unwrap();
    tasks.push(tokio::spawn({
        let (acked, stop) = (acked.clone(), stop.clone());
        async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("ws-k{}", n % 3), format!("ws-{n}"));
                n += 1;
                ws.send(Message::text(json!({"key": k, "value": v}).to_string()))
                    .await
                    .unwrap();
                loop {
                    let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
                        .await
                        .expect("a WebSocket ack within 30 s")
                        .expect("open")
                        .expect("a frame");
                    if let Message::Text(t) = m {
                        let a: Value = serde_json::from_str(&t).unwrap();
                        assert_eq!(a["status"], "spooled", "WebSocket: {a}");
                        break;
                    }
                }
                acked.lock().unwrap().push((k, json!(v).to_string()));
            }
        }
    }));

    // MQTT 5: QoS 1 from two devices, each publish acked before the next.
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("spool-dev", 30)).await;
    tasks.push(tokio::spawn({
        let (acked, stop) = (acked.clone(), stop.clone());
        async move {
            let mut i: u16 = 0;
            while !stop.load(Ordering::Relaxed) {
                i = i % 60_000 + 1;
                let device = format!("d{}", i % 2);
                let v = format!("mqtt-{i}-{}", acked.lock().unwrap().len());
                let mut p = publish(
                    &format!("devices/{device}/telemetry"),
                    1,
                    i,
                    b"",
                    Some(Default::default()),
                );
                p.payload = bytes::Bytes::from(v.clone());
                raw.send5(v5::Packet::Publish(Box::new(p))).await;
                match raw.recv5().await {
                    Some(v5::Packet::PublishAck(a)) => {
                        assert_eq!(u8::from(a.reason_code), 0, "MQTT: {a:?}")
                    }
                    other => panic!("MQTT: {other:?}"),
                }
                acked.lock().unwrap().push((device, v));
            }
        }
    }));

    assert!(
        wait_until(Duration::from_secs(60), || async { count() >= 400 }).await,
        "producers made no progress before the outage"
    );
    kafka.link.cut();
    let at_cut = count();
    // Producers keep getting acks while nothing reaches Kafka.
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count() >= at_cut + 1000 && spool_waiting(&s).await >= 500.0
        })
        .await,
        "acks stopped during the outage ({} since the cut, {} waiting)",
        count() - at_cut,
        spool_waiting(&s).await
    );
    let (status, text) = readyz(&s).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("spooling"), "{text}");
    kafka.link.restore();
    let at_restore = count();
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count() >= at_restore + 400
        })
        .await,
        "no progress after Kafka came back"
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        drained(&s, Duration::from_secs(120)).await,
        "the backlog did not drain: {} waiting",
        spool_waiting(&s).await
    );
    let acked = acked.lock().unwrap().clone();
    let records = read_topic(&kafka.bootstrap, "fleet", acked.len(), READ_TIMEOUT).unwrap();
    check_exactly_once_in_order(&records, &acked);
    assert_eq!(records.len(), acked.len(), "every record was acked");
    // Each record says where it came from, and carries Sluice's usual headers.
    let r = records
        .iter()
        .find(|r| r.header("sluice-protocol").as_deref() == Some("mqtt"))
        .expect("an MQTT record");
    assert!(r.header("sluice-spool").is_some_and(|h| h.contains(':')));
    assert!(r.header("mqtt-topic").is_some());
    let (status, text) = readyz(&s).await;
    assert_eq!((status, text.trim()), (200, "ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_forwarding_and_producing_loses_and_duplicates_nothing() {
    let kafka = LinkedTansu::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Forwarding is paced so the kill lands in the middle of the drain.
    let slow = spool_config(&kafka.bootstrap, "forward_rate = 3000");
    let mut s = Sluice::start(&data, &slow).unwrap();
    assert!(s.wait_readyz(200, sluice_tests::DEADLINE).await);
    let acked: Acked = Arc::default();
    let count = || acked.lock().unwrap().len();

    // A backlog built while Kafka is away.
    kafka.link.cut();
    let stop = Arc::new(AtomicBool::new(false));
    let p = http_producer(
        s.events_url("orders"),
        "before",
        acked.clone(),
        stop.clone(),
        false,
    );
    assert!(wait_until(Duration::from_secs(60), || async { count() >= 10_000 }).await);
    stop.store(true, Ordering::Relaxed);
    p.await.unwrap();
    // Kafka back; more load while the backlog drains; the gateway killed mid-way.
    kafka.link.restore();
    let stop = Arc::new(AtomicBool::new(false));
    let p = http_producer(
        s.events_url("orders"),
        "during",
        acked.clone(),
        stop.clone(),
        true,
    );
    assert!(
        wait_until(Duration::from_secs(60), || async {
            let m = s.metrics().await;
            sluice_tests::metric_sum(&m, "sluice_spool_forwarded_events_total", "stream") >= 3000.0
        })
        .await,
        "forwarding did not start"
    );
    s.kill().unwrap();
    stop.store(true, Ordering::Relaxed);
    p.await.unwrap();
    let s = Sluice::start(&data, &spool_config(&kafka.bootstrap, "")).unwrap();
    assert!(
        drained(&s, Duration::from_secs(120)).await,
        "the backlog did not drain after the restart: {} waiting",
        spool_waiting(&s).await
    );
    let acked = acked.lock().unwrap().clone();
    let records = read_topic(&kafka.bootstrap, "orders", acked.len(), READ_TIMEOUT).unwrap();
    check_exactly_once_in_order(&records, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_pushes_back_and_takes_events_again_once_kafka_drains_it() {
    let kafka = LinkedTansu::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[streams.declare.small]\nspool_max_bytes = 600000\n[mqtt]\nmax_hold_ms = 300\n[[mqtt.topics]]\npattern = \"small/{{device}}\"\nstream = \"small\"\nkey = \"{{device}}\"\n",
        spool_config(&kafka.bootstrap, "segment_bytes = 65536")
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    assert!(s.wait_readyz(200, sluice_tests::DEADLINE).await);
    kafka.link.cut();
    let acked: Acked = Arc::default();
    let c = client();
    let url = s.events_url("small");
    let big = "x".repeat(2000);
    let mut refused = None;
    for n in 0..2000 {
        let events: Vec<(String, String)> = (0..10)
            .map(|i| (format!("k{i}"), format!("{n}-{i}-{big}")))
            .collect();
        let body: Vec<Value> = events
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let a = Answer::of(c.post(&url).json(&body)).await;
        match a.status {
            StatusCode::OK => acked
                .lock()
                .unwrap()
                .extend(events.into_iter().map(|(k, v)| (k, json!(v).to_string()))),
            StatusCode::SERVICE_UNAVAILABLE => {
                refused = Some(a);
                break;
            }
            other => panic!("{other}: {}", a.body),
        }
    }
    let a = refused.expect("the spool never pushed back");
    assert!(a.retry_after.is_some(), "no Retry-After");
    assert_eq!(a.body["error"]["code"], "unavailable");
    let message = a.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("spool") && message.contains("full"),
        "{message}"
    );
    let acked_at_bound = acked.lock().unwrap().len();
    assert!(acked_at_bound >= 100, "pushed back after {acked_at_bound}");
    let m = s.metrics().await;
    assert!(
        metric_or_zero(
            &m,
            "sluice_spool_refused_events_total",
            "stream=\"small\",reason=\"stream_bytes\""
        ) >= 10.0,
        "{m}"
    );
    // gRPC producers get UNAVAILABLE for the same reason.
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = IngestClient::new(ch)
        .publish(pb::PublishRequest {
            stream: "small".into(),
            events: vec![pb::Event {
                value: b"more".to_vec().into(),
                ..Default::default()
            }],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await;
    assert_eq!(r.unwrap_err().code(), tonic::Code::Unavailable);
    // WebSocket: the frame's nack with a retry hint; the connection stays open for the retry.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/small/ws", s.http))
            .await
            .unwrap();
    ws.send(Message::text(r#"{"key":"k0","value":"ws"}"#))
        .await
        .unwrap();
    let nack = loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an answer within 30 s");
        match m {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("WebSocket: {other:?}"),
        }
    };
    assert_eq!(nack["error"]["code"], "unavailable", "{nack}");
    assert!(nack["retry_after_ms"].as_u64().is_some(), "{nack}");
    // MQTT 5: a QoS 1 publish is held for mqtt.max_hold_ms, then refused with 0x83.
    {
        use rmqtt_codec::v5;
        use sluice_tests::mqtt::{connect5, publish, session5};
        let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("full-dev", 30)).await;
        let mut p = publish("small/d1", 1, 1, b"", Some(Default::default()));
        p.payload = bytes::Bytes::from_static(b"mqtt");
        raw.send5(v5::Packet::Publish(Box::new(p))).await;
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), 0x83, "{a:?}"),
            other => panic!("MQTT: {other:?}"),
        }
    }
    // Other streams' spools are not full.
    let a = Answer::of(c.post(s.events_url("other")).json(&json!({"value": 1}))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    kafka.link.restore();
    assert!(drained(&s, Duration::from_secs(120)).await, "never drained");
    // Forwarded segments are deleted: the spool shrinks below its bound.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let m = s.metrics().await;
            metric_or_zero(&m, "sluice_spool_bytes", "stream=\"small\"") < 400_000.0
        })
        .await,
        "forwarded segments stayed: {}",
        metric_or_zero(&s.metrics().await, "sluice_spool_bytes", "stream=\"small\"")
    );
    // Room again: the same producer is served.
    let a = Answer::of(c.post(&url).json(&json!({"key": "k0", "value": "after"}))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    acked
        .lock()
        .unwrap()
        .push(("k0".into(), json!("after").to_string()));
    assert!(drained(&s, Duration::from_secs(60)).await);
    let acked = acked.lock().unwrap().clone();
    let records = read_topic(&kafka.bootstrap, "small", acked.len(), READ_TIMEOUT).unwrap();
    check_exactly_once_in_order(&records, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_backlog_and_kafka_still_away_stays_ready_and_forwards_later() {
    let kafka = LinkedTansu::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // A producer queue of 20 events for three forwarders: the backlog drains through a full
    // queue, each forwarder waiting its turn.
    let toml = spool_config(&kafka.bootstrap, "")
        .replace("linger_ms = 2", "linger_ms = 2\nqueue_max_events = 20");
    let mut s = Sluice::start(&data, &toml).unwrap();
    assert!(s.wait_readyz(200, sluice_tests::DEADLINE).await);
    // The topic exists (the first event went through), then Kafka goes away.
    let c = client();
    let a = Answer::of(
        c.post(s.events_url("later"))
            .json(&json!({"key": "a", "value": 0})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let mut acked: Vec<(String, String)> = vec![("a".into(), "0".into())];
    assert!(drained(&s, Duration::from_secs(30)).await);
    kafka.link.cut();
    for n in 1..=300 {
        let key = ["a", "b", "c"][n % 3].to_string();
        let a = Answer::of(
            c.post(s.events_url("later"))
                .json(&json!({"key": key, "value": n})),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        acked.push((key, n.to_string()));
    }
    assert!(s.terminate().unwrap().success());
    // An operator can look at the backlog with `sluice log read` on the spool's directory:
    // every waiting event (and the forwarded first one, if its segment is still there).
    let backlog = sluice_tests::read_log(&data.join("spool"), "later", &[]).unwrap();
    let values: std::collections::HashSet<String> = backlog
        .iter()
        .map(|r| r["value"].as_str().expect("a text value").to_string())
        .collect();
    assert!(
        matches!(backlog.len(), 300 | 301),
        "{} records",
        backlog.len()
    );
    for (_, v) in &acked[1..] {
        assert!(values.contains(v), "{v} is not in the spool");
    }
    let s = Sluice::start(&data, &toml).unwrap();
    assert!(s.wait_readyz(200, sluice_tests::DEADLINE).await);
    let (_, text) = readyz(&s).await;
    assert!(text.contains("spooling: 300 events wait"), "{text}");
    kafka.link.restore();
    assert!(drained(&s, Duration::from_secs(60)).await, "never drained");
    let records = read_topic(&kafka.bootstrap, "later", acked.len(), READ_TIMEOUT).unwrap();
    check_exactly_once_in_order(&records, &acked);
    assert_eq!(records.len(), 301);
    // A full producer queue is waited out, not treated as a failed delivery.
    let m = s.metrics().await;
    assert_eq!(
        metric_or_zero(
            &m,
            "sluice_spool_forward_errors_total",
            "stream=\"later\",error=\"delivery\""
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_errors_and_a_slow_broker_are_absorbed_and_every_event_reaches_kafka_once() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("errs", 2, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &spool_config(&bootstrap, "")).unwrap();
    assert!(s.wait_readyz(200, sluice_tests::DEADLINE).await);
    // Errors a broker answers under trouble, many of them: producers are not told, the
    // forwarder's producer retries. (The topic has 2 partitions; a spool created before the
    // gateway first reached the broker has the configured 3, and then sends keyed events to
    // their key's partition: the per-key order checked below holds either way.)
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 50],
    );
    let acked: Acked = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let p = http_producer(
        s.events_url("errs"),
        "errs",
        acked.clone(),
        stop.clone(),
        false,
    );
    let count = || acked.lock().unwrap().len();
    assert!(wait_until(Duration::from_secs(60), || async { count() >= 2000 }).await);
    // A slow broker: producers are acked at the spool's pace while a backlog builds.
    cluster
        .broker_round_trip_time(-1, Duration::from_millis(500))
        .unwrap();
    let at_slow = count();
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count() >= at_slow + 2000 && spool_waiting(&s).await > 0.0
        })
        .await,
        "producers waited on the slow broker ({} acked since, {} waiting)",
        count() - at_slow,
        spool_waiting(&s).await
    );
    cluster.broker_round_trip_time(-1, Duration::ZERO).unwrap();
    stop.store(true, Ordering::Relaxed);
    p.await.unwrap();
    assert!(drained(&s, Duration::from_secs(120)).await, "never drained");
    let acked = acked.lock().unwrap().clone();
    let records = read_topic(&bootstrap, "errs", acked.len(), READ_TIMEOUT).unwrap();
    check_exactly_once_in_order(&records, &acked);
    assert_eq!(records.len(), acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_spooled_event_is_answered_as_a_spooled_duplicate_and_forwarded_once() {
    let kafka = LinkedTansu::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let toml = spool_config(&kafka.bootstrap, "")
        .replace("[streams.defaults]\n", "[streams.defaults]\ndedup = true\n");
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    assert!(s.wait_readyz(200, sluice_tests::DEADLINE).await);
    kafka.link.cut();
    let c = client();
    let body = json!([{"id": "r-1", "key": "k", "value": "once"}]);
    let first = Answer::of(c.post(s.events_url("retries")).json(&body)).await;
    let again = Answer::of(c.post(s.events_url("retries")).json(&body)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    assert_eq!(first.body["results"][0]["status"], "spooled");
    assert_eq!(
        again.body["results"][0]["status"], "spooled",
        "{}",
        again.body
    );
    assert_eq!(again.body["results"][0]["duplicate"], true);
    assert_eq!(
        again.body["results"][0]["partition"],
        first.body["results"][0]["partition"]
    );
    kafka.link.restore();
    assert!(drained(&s, Duration::from_secs(60)).await);
    let records = read_topic(&kafka.bootstrap, "retries", 1, READ_TIMEOUT).unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].header("sluice-event-id").as_deref(), Some("r-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_age_bound_and_the_whole_spools_bound_push_back_too() {
    let kafka = LinkedTansu::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[streams.declare.fresh]\nspool_max_age_ms = 1000\n",
        spool_config(
            &kafka.bootstrap,
            "segment_bytes = 65536\nmax_bytes = 1048576"
        )
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    assert!(s.wait_readyz(200, sluice_tests::DEADLINE).await);
    kafka.link.cut();
    let c = client();
    let post = |stream: &str, value: Value| {
        Answer::of(
            c.post(s.events_url(stream))
                .json(&json!({"key": "k", "value": value})),
        )
    };
    // Age: once the oldest waiting event of `fresh` is a second old, it is refused.
    assert_eq!(post("fresh", json!(0)).await.status, StatusCode::OK);
    let refused = Mutex::new(None);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let a = post("fresh", json!(1)).await;
            let full = a.status == StatusCode::SERVICE_UNAVAILABLE;
            if full {
                *refused.lock().unwrap() = Some(a);
            }
            full
        })
        .await,
        "the age bound never refused"
    );
    let a = refused.into_inner().unwrap().unwrap();
    let message = a.body["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("old") && message.contains("spool_max_age_ms"),
        "{message}"
    );
    // The whole spool: 1 MiB for every stream together.
    let big = "y".repeat(20_000);
    let mut total_refused = false;
    for n in 0..200 {
        let a = post("bulk", json!(format!("{n}-{big}"))).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            let message = a.body["error"]["message"].as_str().unwrap().to_string();
            assert!(message.contains("log.spool.max_bytes"), "{message}");
            total_refused = true;
            break;
        }
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }
    assert!(
        total_refused,
        "the whole spool's bound never refused: {}",
        s.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("sluice_spool"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let m = s.metrics().await;
    for (stream, reason) in [("fresh", "age"), ("bulk", "total_bytes")] {
        let labels = format!("stream=\"{stream}\",reason=\"{reason}\"");
        assert!(
            metric_or_zero(&m, "sluice_spool_refused_events_total", &labels) >= 1.0,
            "{labels}"
        );
    }
    // Kafka back: both drain and take events again.
    kafka.link.restore();
    assert!(drained(&s, Duration::from_secs(60)).await);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            post("fresh", json!(2)).await.status == StatusCode::OK
                && post("bulk", json!("after")).await.status == StatusCode::OK
        })
        .await,
        "still refused after the spool drained"
    );
}
