//! Producer timestamps and explicit partitions (docs/http.md "Timestamps and partitions") on
//! the real binary: the HTTP envelope and raw headers, gRPC's `timestamp_ms`/`partition`, the
//! WebSocket envelope and MQTT 5's `time`/`partition` user properties all place the event where
//! the producer said, with the producer's time as the record's timestamp (the time of receipt
//! kept as `sluice-received-at`); a partition the stream lacks and a timestamp out of the
//! stream's range are per-event errors that cost the other events nothing; the
//! `receive_time` policy replaces an out-of-range time and keeps the producer's as a header.
//! The same on Kafka (Tansu): the producer's time is the Kafka record's timestamp.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::http::{Answer, ws_answers};
use sluice_tests::kafka::{Tansu, create_topic, kafka_config, read_topic, start_ready};
use sluice_tests::mqtt::v5_pubacks;
use sluice_tests::{Sluice, read_log, wait_until};
use tokio_tungstenite::tungstenite::Message;

/// 2026-01-02T03:04:05.678Z.
const T0: i64 = 1_767_323_045_678;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(30))
}

async fn post(url: &str, body: &Value) -> Answer {
    Answer::of(client().post(url).json(body)).await
}

const CONFIG: &str = r#"
[streams.defaults]
partitions = 4
[streams.declare.fresh]
max_timestamp_past_ms = 86400000
[streams.declare.late]
max_timestamp_past_ms = 86400000
timestamp_out_of_range = "receive_time"
"#;

/// The record whose value is `value` (as `sluice log read` shows it).
fn record<'a>(log: &'a [Value], value: &str) -> &'a Value {
    log.iter()
        .find(|r| r["value"] == value)
        .unwrap_or_else(|| panic!("no record {value} in {log:#?}"))
}

/// The record was placed in `partition` with the producer's time `ts`, and its time of receipt
/// (around the test's run) is kept beside it.
fn assert_placed(r: &Value, partition: u64, ts: i64, started: i64) {
    assert_eq!(r["partition"], partition, "{r}");
    assert_eq!(r["timestamp_ms"], ts, "{r}");
    let received: i64 = r["headers"]["sluice-received-at"]
        .as_str()
        .unwrap_or_else(|| panic!("no sluice-received-at in {r}"))
        .parse()
        .unwrap();
    assert!(
        received >= started - 1000 && received <= now_ms() + 1000,
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_places_events_at_the_producers_partition_and_time() {
    let started = now_ms();
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), CONFIG).unwrap();

    // HTTP JSON: RFC 3339 with an offset and integer milliseconds; the bad partition and the
    // time too far ahead are answered per event, the others stored.
    let future = now_ms() + 2 * 3600 * 1000;
    let a = post(
        &s.events_url("t"),
        &json!([
            {"value": "h0", "timestamp": "2026-01-02T04:04:05.678+01:00", "partition": 2},
            {"value": "h1", "timestamp": T0 + 1, "partition": 3, "key": "k"},
            {"value": "h2", "partition": 9},
            {"value": "h3", "timestamp": future},
            {"value": "h4", "timestamp": "2026-01-02T03:04:05.682Z"},
        ]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let results = a.body["results"].as_array().unwrap();
    assert_eq!(results[0]["partition"], 2, "{a:?}");
    assert_eq!(results[1]["partition"], 3, "{a:?}");
    assert_eq!(results[2]["error"]["code"], "malformed", "{a:?}");
    let m = results[2]["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("partition 9 does not exist") && m.contains("4 partitions"),
        "{m}"
    );
    assert_eq!(results[3]["error"]["code"], "malformed", "{a:?}");
    let m = results[3]["error"]["message"].as_str().unwrap();
    assert!(m.contains("max_timestamp_future_ms"), "{m}");
    assert!(results[4]["offset"].is_u64(), "{a:?}");

    // A timestamp that is not one refuses the request, saying what a timestamp is.
    for bad in [json!("yesterday"), json!(1.5), json!({"s": 1})] {
        let a = post(&s.events_url("t"), &json!({"value": "x", "timestamp": bad})).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
        let m = a.body["error"]["message"].as_str().unwrap();
        assert!(m.contains("RFC 3339"), "{m}");
    }
    let a = post(&s.events_url("t"), &json!({"value": "x", "partition": -1})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    // Before 1970: Kafka reserves negative timestamps, so no log takes them.
    let a = post(&s.events_url("t"), &json!({"value": "x", "timestamp": -5})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("before 1970"),
        "{a:?}"
    );
    // A lone event out of range is a 400 like any request whose every event failed.
    let a = post(&s.events_url("t"), &json!({"value": "x", "partition": 4})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");

    // HTTP raw: the Sluice-Timestamp and Sluice-Partition headers.
    let a = Answer::of(
        client()
            .post(s.events_url("t"))
            .header("content-type", "text/plain")
            .header("sluice-timestamp", (T0 + 10).to_string())
            .header("sluice-partition", "1")
            .body("raw"),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["results"][0]["partition"], 1, "{a:?}");
    let a = Answer::of(
        client()
            .post(s.events_url("t"))
            .header("sluice-timestamp", "noon")
            .body("raw"),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");

    // gRPC: timestamp_ms and partition on the event.
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = IngestClient::new(ch)
        .publish(pb::PublishRequest {
            stream: "t".into(),
            events: vec![
                pb::Event {
                    value: b"g0".to_vec().into(),
                    timestamp_ms: Some(T0 + 20),
                    partition: Some(0),
                    ..Default::default()
                },
                pb::Event {
                    value: b"g1".to_vec().into(),
                    partition: Some(7),
                    ..Default::default()
                },
            ],
            content_type: "text/plain".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    match &r.results[0].result {
        Some(pb::event_result::Result::Position(p)) => assert_eq!(p.partition, 0),
        other => panic!("{other:?}"),
    }
    match &r.results[1].result {
        Some(pb::event_result::Result::Error(e)) => {
            assert_eq!(e.code, "malformed");
            assert!(e.message.contains("partition 7"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }

    // WebSocket: the same envelope as HTTP.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/t/ws", s.http))
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"value": "w0", "timestamp": T0 + 30, "partition": 3}).to_string(),
    ))
    .await
    .unwrap();
    let ack = ws_answers(&mut ws, 1).await.remove(0);
    assert_eq!(ack["partition"], 3, "{ack}");

    // MQTT 5: the user properties `time` and `partition`; a bad `time` is PUBACK 0x99.
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{PubAckReason, PublishProperties};
    let addr = s.mqtt.unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("dev-ts", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    for (payload, time) in [("m0", "2026-01-02T03:04:05.718Z"), ("m1", "soon")] {
        let props = PublishProperties {
            user_properties: vec![
                ("time".into(), time.into()),
                ("partition".into(), "2".into()),
                ("site".into(), "x".into()),
            ],
            ..Default::default()
        };
        c.publish_with_properties("t/dev", QoS::AtLeastOnce, false, payload, props)
            .await
            .unwrap();
    }
    assert_eq!(
        v5_pubacks(&mut el, 2).await,
        [PubAckReason::Success, PubAckReason::PayloadFormatInvalid]
    );

    // Read back: each event where the producer put it, with its time.
    let log = read_log(&s.data_dir, "t", &["--json-values"]).unwrap();
    assert_eq!(log.len(), 7, "{log:#?}");
    assert_placed(record(&log, "h0"), 2, T0, started);
    assert_placed(record(&log, "h1"), 3, T0 + 1, started);
    assert_placed(
        record(&log, "h4"),
        record(&log, "h4")["partition"].as_u64().unwrap(),
        T0 + 4,
        started,
    );
    assert_placed(record(&log, "raw"), 1, T0 + 10, started);
    assert_placed(record(&log, "g0"), 0, T0 + 20, started);
    assert_placed(record(&log, "w0"), 3, T0 + 30, started);
    let m0 = record(&log, "m0");
    assert_placed(m0, 2, T0 + 40, started);
    // Interpreted properties are not stored again as headers; the others are.
    assert_eq!(m0["headers"]["site"], "x", "{m0}");
    assert!(m0["headers"].get("time").is_none(), "{m0}");
    assert!(m0["headers"].get("partition").is_none(), "{m0}");
    assert_eq!(record(&log, "h0")["timestamp"], "2026-01-02T03:04:05.678Z");

    // The read API shows the same.
    let a = Answer::of(client().get(format!("{}?from=start&partition=2", s.events_url("t")))).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let h0 = a.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["value"] == "h0")
        .unwrap_or_else(|| panic!("{a:?}"));
    assert_eq!(h0["timestamp_ms"], T0, "{h0}");
    assert!(h0["headers"]["sluice-received-at"].is_string(), "{h0}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_times_are_refused_or_replaced_by_the_streams_policy() {
    let started = now_ms();
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), CONFIG).unwrap();
    let recent = now_ms() - 60_000;
    let batch = json!([
        {"value": "old", "timestamp": T0 - 40 * 86_400_000},
        {"value": "recent", "timestamp": recent},
    ]);

    // `fresh` refuses the old event and keeps the recent one.
    let a = post(&s.events_url("fresh"), &batch).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let m = a.body["results"][0]["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("max_timestamp_past_ms") && m.contains("behind"),
        "{m}"
    );
    assert!(a.body["results"][1]["offset"].is_u64(), "{a:?}");
    let log = read_log(&s.data_dir, "fresh", &["--json-values"]).unwrap();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["timestamp_ms"], recent);

    // `late` stores both; the old one at its time of receipt, the producer's time kept.
    let a = post(&s.events_url("late"), &batch).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert!(a.body["results"][0]["offset"].is_u64(), "{a:?}");
    let log = read_log(&s.data_dir, "late", &["--json-values"]).unwrap();
    let old = record(&log, "old");
    let ts = old["timestamp_ms"].as_i64().unwrap();
    assert!(ts >= started - 1000 && ts <= now_ms() + 1000, "{old}");
    assert_eq!(
        old["headers"]["sluice-producer-timestamp"],
        (T0 - 40 * 86_400_000).to_string(),
        "{old}"
    );
    assert_eq!(record(&log, "recent")["timestamp_ms"], recent);

    // Producers cannot forge what the policy records.
    let a = post(
        &s.events_url("late"),
        &json!({"value": "f", "headers": {"sluice-producer-timestamp": "1"}}),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("reserved"),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_the_producers_time_is_the_records_timestamp() {
    let tansu = Tansu::start().unwrap();
    create_topic(&tansu.bootstrap, "kt", 3).await.unwrap();
    create_topic(&tansu.bootstrap, "ks", 3).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let s = start_ready(
        &tmp.path().join("data"),
        &format!(
            "{}[streams.declare.ks]\nack = \"spooled\"\n",
            kafka_config(&tansu.bootstrap, "")
        ),
    )
    .await;
    let started = now_ms();
    // A gateway with a spool is ready before it reached the broker; until then the direct
    // stream answers 503 without storing anything.
    let batch = json!([
        {"value": "a", "timestamp": T0, "partition": 2},
        {"value": "b", "key": "k"},
        {"value": "c", "partition": 3},
    ]);
    let answer = std::sync::Mutex::new(None);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let a = post(&s.events_url("kt"), &batch).await;
            let ok = a.status != StatusCode::SERVICE_UNAVAILABLE;
            *answer.lock().unwrap() = Some(a);
            ok
        })
        .await
    );
    let a = answer.into_inner().unwrap().unwrap();
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["results"][0]["partition"], 2, "{a:?}");
    assert_eq!(a.body["results"][2]["error"]["code"], "malformed", "{a:?}");
    let records = read_topic(&tansu.bootstrap, "kt", 2, Duration::from_secs(30)).unwrap();
    assert_eq!(records.len(), 2, "{records:?}");
    let a_rec = records.iter().find(|r| r.value == br#""a""#).unwrap();
    assert_eq!(
        (a_rec.partition, a_rec.timestamp),
        (2, Some(T0)),
        "{a_rec:?}"
    );
    let received: i64 = a_rec.header("sluice-received-at").unwrap().parse().unwrap();
    assert!(received >= started - 1000, "{a_rec:?}");
    let b_rec = records.iter().find(|r| r.value == br#""b""#).unwrap();
    assert_eq!(
        b_rec.timestamp,
        b_rec
            .header("sluice-received-at")
            .map(|t| t.parse().unwrap())
    );

    // Sluice's read side over Kafka gives the producer's time and the time of receipt.
    let a =
        Answer::of(client().get(format!("{}?from=start&partition=2", s.events_url("kt")))).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let r = &a.body["records"][0];
    assert_eq!(r["timestamp_ms"], T0, "{a:?}");
    assert_eq!(
        r["headers"]["sluice-received-at"],
        received.to_string(),
        "{a:?}"
    );

    // Through the spool: placed and timed the same once forwarded.
    let a = post(
        &s.events_url("ks"),
        &json!({"value": "s", "timestamp": T0 + 5, "partition": 1}),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["results"][0]["status"], "spooled", "{a:?}");
    assert_eq!(a.body["results"][0]["partition"], 1, "{a:?}");
    let records = read_topic(&tansu.bootstrap, "ks", 1, Duration::from_secs(30)).unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        (records[0].partition, records[0].timestamp),
        (1, Some(T0 + 5))
    );
}
