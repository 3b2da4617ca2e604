//! The Kafka sink against a real Kafka-compatible broker (Tansu, in memory, on a free loopback
//! port): events from HTTP land in their topic and partition with key, headers and value
//! intact and in order per key; receipts name the offsets a consumer sees; many producers at
//! once; topic creation; a broker that is down at startup and comes up later; MQTT QoS 1/2
//! publishes acked once Kafka has them, keyed and ordered per device; broker round-trip times.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::http::Answer;
use sluice_tests::kafka::{
    Tansu, assert_acked_in, by_position, create_topic, kafka_config, read_topic, refused_port,
    start_ready,
};
use sluice_tests::{Sluice, api_key_entry, metric, wait_until};

const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The producer's trace id of the first test's requests.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(60))
}

async fn post_json(
    c: &reqwest::Client,
    url: &str,
    body: &Value,
) -> (StatusCode, Value, Option<String>) {
    let a = Answer::of(c.post(url).json(body)).await;
    (a.status, a.body, a.retry_after)
}

fn positions(v: &Value) -> Vec<(i32, i64)> {
    v["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {v}"))
        .iter()
        .map(|r| {
            (
                r["partition"].as_i64().unwrap_or_else(|| panic!("{r}")) as i32,
                r["offset"].as_i64().unwrap_or_else(|| panic!("{r}")),
            )
        })
        .collect()
}

#[tokio::test]
async fn events_land_in_their_topic_and_partition_with_key_headers_and_value() {
    let tansu = Tansu::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let key = "k1.secret-one-secret-one";
    let toml = format!(
        "{}{}\n[http.auth]\nmethods = [\"api_key\"]\n[streams.declare.orders]\npartitions = 4\n[telemetry.traces]\nenabled = true\n",
        kafka_config(
            &tansu.bootstrap,
            "topic = \"sluice.{stream}\"\ncreate_topics = true\nlinger_ms = 2\n[log.kafka.overrides]\n\"statistics.interval.ms\" = \"200\""
        ),
        api_key_entry(key, "shop", &["orders"]),
    );
    let s = start_ready(&tmp.path().join("data"), &toml).await;
    let c = client();

    // Three requests of ten keys each, so every key has three events in a known order.
    let mut sent: Vec<(String, String, String)> = Vec::new(); // (key, id, value)
    let mut receipts = Vec::new();
    for round in 0..3 {
        let events: Vec<Value> = (0..10)
            .map(|k| {
                let (key, id) = (format!("device-{k}"), format!("e-{round}-{k}"));
                let value = json!({"round": round, "device": k});
                sent.push((key.clone(), id.clone(), value.to_string()));
                json!({"key": key, "id": id, "value": value, "headers": {"site": "north"}})
            })
            .collect();
        let r = c
            .post(s.events_url("orders"))
            .header("x-api-key", key)
            // The producer's trace goes into Kafka under Sluice's span (docs/operations.md).
            .header("traceparent", format!("00-{TRACE}-b7ad6b7169203331-01"))
            .json(&events)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        receipts.extend(positions(&v));
    }
    let records = read_topic(&tansu.bootstrap, "sluice.orders", sent.len(), READ_TIMEOUT).unwrap();
    assert_eq!(records.len(), sent.len(), "{records:#?}");
    let at = by_position(&records);
    let mut span_ids = HashSet::new();
    let mut last_offset: BTreeMap<String, i64> = BTreeMap::new();
    for ((key, id, value), (p, o)) in sent.iter().zip(&receipts) {
        // Kafka's murmur2, as the Java client computes it, picks the partition.
        let want_p = sluice_tests::kafka::partition_of(key.as_bytes(), 4) as i32;
        assert_eq!(*p, want_p, "key {key}");
        let r = at
            .get(&(*p, *o))
            .unwrap_or_else(|| panic!("receipt ({p},{o}) for {id} not in the topic"));
        assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(String::from_utf8_lossy(&r.value), *value);
        assert_eq!(r.header("sluice-event-id").as_deref(), Some(id.as_str()));
        assert_eq!(r.header("sluice-principal").as_deref(), Some("shop"));
        assert_eq!(
            r.header("sluice-principal-source").as_deref(),
            Some("api_key")
        );
        assert_eq!(r.header("sluice-protocol").as_deref(), Some("http"));
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("application/json")
        );
        assert_eq!(r.header("site").as_deref(), Some("north"));
        let tp = r.header("traceparent").unwrap_or_else(|| panic!("{r:?}"));
        assert!(
            tp.starts_with(&format!("00-{TRACE}-"))
                && tp.ends_with("-01")
                && !tp.contains("b7ad6b7169203331"),
            "{tp}"
        );
        span_ids.insert(tp);
        let received: i64 = r.header("sluice-received-at").unwrap().parse().unwrap();
        assert_eq!(
            r.timestamp,
            Some(received),
            "record timestamp is the receive time"
        );
        // In order per key: each event of a key sits after the previous one.
        if let Some(prev) = last_offset.insert(key.clone(), *o) {
            assert!(*o > prev, "key {key}: offset {o} after {prev}");
        }
    }
    // One Sluice span per request, named by each of its records.
    assert_eq!(span_ids.len(), 3, "{span_ids:?}");
    assert!(
        receipts
            .iter()
            .map(|(p, _)| p)
            .collect::<HashSet<_>>()
            .len()
            > 1,
        "ten keys all hashed to one partition: {receipts:?}"
    );
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_events_in_total",
            "stream=\"orders\",protocol=\"http\""
        ),
        30.0
    );
    assert_eq!(metric(&m, "sluice_kafka_reachable", ""), 1.0);
    // librdkafka's statistics give each broker's round-trip time.
    let rtt = wait_until(Duration::from_secs(20), || async {
        s.metrics().await.lines().any(|l| {
            l.starts_with("sluice_kafka_broker_rtt_seconds{")
                && l.contains("quantile=\"avg\"")
                && l.rsplit_once(' ')
                    .and_then(|(_, v)| v.parse::<f64>().ok())
                    .is_some_and(|v| v > 0.0)
        })
    })
    .await;
    assert!(rtt, "no broker round-trip time in {}", s.metrics().await);
}

#[tokio::test]
async fn many_concurrent_producers_get_distinct_offsets_that_a_consumer_sees() {
    let tansu = Tansu::start().unwrap();
    create_topic(&tansu.bootstrap, "busy", 3).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let s = start_ready(
        &tmp.path().join("data"),
        &kafka_config(&tansu.bootstrap, ""),
    )
    .await;
    let c = client();
    const PRODUCERS: usize = 16;
    const REQUESTS: usize = 10;
    const EVENTS: usize = 25;
    let url = s.events_url("busy");
    let tasks: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for r in 0..REQUESTS {
                    let events: Vec<Value> = (0..EVENTS)
                        .map(|e| json!({"key": format!("p{p}"), "value": format!("{p}/{r}/{e}")}))
                        .collect();
                    let (st, v, _) = post_json(&c, &url, &json!(events)).await;
                    assert_eq!(st, StatusCode::OK, "{v}");
                    let pos = positions(&v);
                    assert_eq!(pos.len(), EVENTS);
                    for (e, pos) in pos.into_iter().enumerate() {
                        // A JSON value is stored as its JSON text.
                        out.push((pos, json!(format!("{p}/{r}/{e}")).to_string()));
                    }
                }
                out
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let total = PRODUCERS * REQUESTS * EVENTS;
    assert_eq!(acked.len(), total);
    let distinct: HashSet<_> = acked.iter().map(|(pos, _)| *pos).collect();
    assert_eq!(
        distinct.len(),
        total,
        "two events acked at the same position"
    );
    let records = read_topic(&tansu.bootstrap, "busy", total, READ_TIMEOUT).unwrap();
    assert_eq!(records.len(), total);
    assert_acked_in(&records, &acked);
}

#[tokio::test]
async fn missing_topics_are_404_unless_creation_is_on_and_received_mode_acks_with_202() {
    let tansu = Tansu::start().unwrap();
    create_topic(&tansu.bootstrap, "present", 1).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[streams.declare.present]\nack = \"received\"\n",
        kafka_config(&tansu.bootstrap, "")
    );
    let s = start_ready(&tmp.path().join("data"), &toml).await;
    let c = client();
    let (st, v, _) = post_json(&c, &s.events_url("absent"), &json!({"value": 1})).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "stream_not_found", "{v}");

    let (st, v, _) = post_json(
        &c,
        &s.events_url("present"),
        &json!([{"value": "a"}, {"value": "b"}]),
    )
    .await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    let records = read_topic(&tansu.bootstrap, "present", 2, READ_TIMEOUT).unwrap();
    let values: Vec<_> = records.iter().map(|r| r.value.clone()).collect();
    assert_eq!(values, vec![b"\"a\"".to_vec(), b"\"b\"".to_vec()]);
}

#[tokio::test]
async fn broker_down_at_startup_means_not_ready_and_503_until_it_comes_up() {
    // The broker's port is held (refusing connections) until the broker starts on it.
    let (down, port) = refused_port();
    let bootstrap = format!("127.0.0.1:{port}");
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        &kafka_config(
            &bootstrap,
            "create_topics = true\nmetadata_timeout_ms = 1000",
        ),
    )
    .unwrap();
    let c = client();
    let r = c.get(s.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.text().await.unwrap().contains("Kafka"));
    let (st, v, retry) = post_json(&c, &s.events_url("later"), &json!({"value": 1})).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(retry.is_some(), "503 without Retry-After");

    // The broker comes up on the configured address: the same process recovers.
    drop(down);
    let tansu = Tansu::start_on(port).unwrap();
    assert!(
        s.wait_readyz(200, Duration::from_secs(30)).await,
        "gateway did not become ready once the broker was up"
    );
    let (st, v, _) = post_json(
        &c,
        &s.events_url("later"),
        &json!({"key": "a", "value": "now"}),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let records = read_topic(&tansu.bootstrap, "later", 1, READ_TIMEOUT).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value, b"\"now\"");
    assert_eq!(
        positions(&v),
        vec![(records[0].partition, records[0].offset)]
    );
}

#[tokio::test]
async fn every_event_acked_before_sigkill_is_in_kafka() {
    let tansu = Tansu::start().unwrap();
    create_topic(&tansu.bootstrap, "crash", 2).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut s = start_ready(
        &tmp.path().join("data"),
        &kafka_config(&tansu.bootstrap, ""),
    )
    .await;
    let c = client();
    let url = s.events_url("crash");
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let producers: Vec<_> = (0..4)
        .map(|p| {
            let (c, url, acked) = (c.clone(), url.clone(), acked.clone());
            tokio::spawn(async move {
                for n in 0.. {
                    let values: Vec<String> = (0..20).map(|i| format!("{p}-{n}-{i}")).collect();
                    let body: Vec<Value> = values
                        .iter()
                        .map(|v| json!({"key": v, "value": v}))
                        .collect();
                    // After the kill, requests fail at the transport: those were never acked.
                    let Ok(r) = c.post(&url).json(&body).send().await else {
                        return;
                    };
                    let Ok(v) = r.json::<Value>().await else {
                        return;
                    };
                    let mut acked = acked.lock().unwrap();
                    for (pos, value) in positions(&v).into_iter().zip(values) {
                        acked.push((pos, json!(value).to_string()));
                    }
                }
            })
        })
        .collect();
    let enough = sluice_tests::wait_until(Duration::from_secs(60), || async {
        acked.lock().unwrap().len() >= 2000
    })
    .await;
    assert!(enough, "load did not get going");
    s.kill().unwrap();
    for p in producers {
        p.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let records = read_topic(&tansu.bootstrap, "crash", acked.len(), READ_TIMEOUT).unwrap();
    assert_acked_in(&records, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publishes_are_acked_once_kafka_has_them() {
    use rmqtt_codec::v5;
    use sluice_tests::mqtt::{connect5, publish, session5};
    let tansu = Tansu::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}\n[[mqtt.topics]]\npattern = \"devices/{{device}}/telemetry\"\nstream = \"telemetry\"\nkey = \"{{device}}\"\n[streams.declare.telemetry]\npartitions = 2\n",
        kafka_config(&tansu.bootstrap, "create_topics = true\nlinger_ms = 2")
    );
    let s = start_ready(&tmp.path().join("data"), &toml).await;
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("kafka-dev", 30)).await;
    // QoS 1 and QoS 2 from two devices; every answer comes after Kafka acknowledged the event.
    let mut sent = Vec::new();
    for i in 1..=20u16 {
        let device = if i % 2 == 0 { "d1" } else { "d2" };
        let mut p = publish(
            &format!("devices/{device}/telemetry"),
            1 + (i % 2) as u8,
            i,
            b"",
            Some(Default::default()),
        );
        let v = format!("{device}-{i}");
        p.payload = bytes::Bytes::from(v.clone());
        raw.send5(v5::Packet::Publish(Box::new(p))).await;
        sent.push((device, v));
    }
    let mut answered = 0;
    while answered < 20 {
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) | Some(v5::Packet::PublishReceived(a)) => {
                assert_eq!(u8::from(a.reason_code), 0, "{a:?}");
                answered += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let records = read_topic(&tansu.bootstrap, "telemetry", 20, READ_TIMEOUT).unwrap();
    assert_eq!(records.len(), 20);
    // Keyed by device, in publish order per device, with the MQTT topic as a header.
    for device in ["d1", "d2"] {
        let got: Vec<String> = records
            .iter()
            .filter(|r| r.key.as_deref() == Some(device.as_bytes()))
            .map(|r| String::from_utf8(r.value.clone()).unwrap())
            .collect();
        let want: Vec<String> = sent
            .iter()
            .filter(|(d, _)| *d == device)
            .map(|(_, v)| v.clone())
            .collect();
        assert_eq!(got, want, "order of {device}");
    }
    assert!(records.iter().all(|r| {
        r.headers
            .iter()
            .any(|(k, v)| k == "mqtt-topic" && v.starts_with(b"devices/"))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_what_the_producer_still_holds() {
    // A 5 s linger keeps events in the producer's queue; `ack = "received"` answers 202 at once.
    // SIGTERM must flush them to the broker before the process exits (without the flush they
    // would be purged with the producer). librdkafka's flush usually sends at once, but was
    // seen to wait the linger out (1 close in 3 under load), so the exit is bounded by the
    // drain deadline (10 s; a linger at or past it is refused by check-config), not tighter.
    let tansu = Tansu::start().unwrap();
    create_topic(&tansu.bootstrap, "lingering", 1)
        .await
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let toml = format!(
        "{}[streams.defaults]\nack = \"received\"\n",
        kafka_config(&tansu.bootstrap, "linger_ms = 5000")
    );
    let mut s = start_ready(&tmp.path().join("data"), &toml).await;
    let values: Vec<String> = (0..10).map(|i| format!("l{i}")).collect();
    let (status, body, _) = post_json(&client(), &s.events_url("lingering"), &json!(values)).await;
    assert_eq!(status, 202, "{body}");
    let status = s.terminate().unwrap();
    assert!(
        status.success(),
        "the drain did not finish in time: {status}"
    );
    let records = read_topic(&tansu.bootstrap, "lingering", 10, READ_TIMEOUT).unwrap();
    let got: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8(r.value.clone()).unwrap())
        .collect();
    let want: Vec<String> = values.iter().map(|v| format!("\"{v}\"")).collect();
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_partitions_are_used_after_the_next_metadata_refresh() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let tansu = Tansu::start().unwrap();
    create_topic(&tansu.bootstrap, "growing", 2).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let s = start_ready(
        &tmp.path().join("data"),
        &kafka_config(&tansu.bootstrap, "metadata_refresh_ms = 300"),
    )
    .await;
    let c = client();
    // A key whose partition differs between 2 and 4 partitions.
    let key = (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| {
            let (two, four) = (
                sluice_tests::kafka::partition_of(k.as_bytes(), 2),
                sluice_tests::kafka::partition_of(k.as_bytes(), 4),
            );
            two != four
        })
        .unwrap();
    let send = || {
        let (c, url, key) = (c.clone(), s.events_url("growing"), key.clone());
        async move {
            let (status, body, _) = post_json(&c, &url, &json!([{"key": key, "value": 1}])).await;
            assert_eq!(status, 200, "{body}");
            body["results"][0]["partition"].as_u64().unwrap() as u32
        }
    };
    assert_eq!(
        send().await,
        sluice_tests::kafka::partition_of(key.as_bytes(), 2)
    );
    // The topic gets four partitions. Tansu does not implement CreatePartitions, so the topic
    // is made again with four: to the gateway, whose metadata refresh is under test, the
    // partition count grows from two to four.
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &tansu.bootstrap)
        .create()
        .unwrap();
    let r = admin
        .delete_topics(&["growing"], &AdminOptions::new())
        .await
        .unwrap();
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    create_topic(&tansu.bootstrap, "growing", 4).await.unwrap();
    let want = sluice_tests::kafka::partition_of(key.as_bytes(), 4);
    let moved = wait_until(Duration::from_secs(20), || {
        let f = send();
        async move { f.await == want }
    })
    .await;
    assert!(moved, "the key never moved to partition {want} of 4");
}
