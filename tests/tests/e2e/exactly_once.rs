//! Exactly-once ingestion (docs/exactly-once.md) against the real binary: retries recognised by
//! event id and by idempotency key over HTTP, gRPC, WebSocket and MQTT are answered with the
//! original's position and never appended again; the window survives SIGKILL (every acked event
//! retried after the crash, none stored twice); streams without dedup append retries as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::http::Answer;
use sluice_tests::kafka::{
    Tansu, create_topic, kafka_config, read_topic, start_ready as kafka_start_ready,
};
use sluice_tests::redis::Redis;
use sluice_tests::{Sluice, metric, metric_or_zero, read_log};
use tokio_tungstenite::tungstenite::Message;

const DEDUP: &str = "[streams.defaults]\ndedup = true\npartitions = 3\n";

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(30))
}

async fn post(url: &str, body: &Value, key: Option<&str>) -> Answer {
    let mut req = client().post(url).json(body);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    Answer::of(req).await
}

/// (partition, offset, duplicate) of each result.
fn positions(v: &Value) -> Vec<(u64, u64, bool)> {
    v["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|r| {
            (
                r["partition"].as_u64().expect("partition"),
                r["offset"].as_u64().expect("offset"),
                r["duplicate"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn values(records: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .map(|r| r["value"].as_str().expect("value").to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn http_retries_by_id_and_by_idempotency_key_get_the_original_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let config = format!("{DEDUP}[streams.declare.plain]\ndedup = false\n");
    let s = Sluice::start(&tmp.path().join("data"), &config).unwrap();
    let url = s.events_url("orders");

    // By id: the retry of a batch is answered with the same positions, marked duplicate; a
    // new id in the retry is appended.
    let batch = json!([
        {"id": "o-1", "key": "a", "value": 1},
        {"id": "o-2", "key": "b", "value": 2},
        {"id": "o-3", "key": "c", "value": 3},
    ]);
    let first = post(&url, &batch, None).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let original = positions(&first.body);
    assert!(original.iter().all(|p| !p.2));
    let retry = post(&url, &batch, None).await;
    assert_eq!(retry.status, StatusCode::OK);
    let expected: Vec<_> = original.iter().map(|&(p, o, _)| (p, o, true)).collect();
    assert_eq!(positions(&retry.body), expected);
    let mixed = post(
        &url,
        &json!([{"id": "o-2", "value": 2}, {"id": "o-4", "value": 4}]),
        None,
    )
    .await;
    let mixed = positions(&mixed.body);
    assert_eq!(mixed[0], (original[1].0, original[1].1, true));
    assert!(!mixed[1].2);

    // By Idempotency-Key (quoted, as the IETF draft writes it, or bare): events without ids.
    let unnamed = json!([{"value": "x"}, {"value": "y"}]);
    let k1 = post(&url, &unnamed, Some("\"req-1\"")).await;
    let k1 = positions(&k1.body);
    let again = post(&url, &unnamed, Some("req-1")).await;
    assert_eq!(
        positions(&again.body),
        k1.iter().map(|&(p, o, _)| (p, o, true)).collect::<Vec<_>>()
    );
    // Another key is another request.
    let k2 = post(&url, &unnamed, Some("req-2")).await;
    assert!(positions(&k2.body).iter().all(|p| !p.2));
    // A key over 255 bytes is refused before anything is stored.
    let long = post(&url, &unnamed, Some(&"k".repeat(256))).await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST, "{:?}", long.body);

    // What is in the log: each event once, the keyed ones with the header that records the key.
    let records = read_log(&s.data_dir, "orders", &[]).unwrap();
    assert_eq!(
        values(&records),
        vec!["\"x\"", "\"x\"", "\"y\"", "\"y\"", "1", "2", "3", "4"]
    );
    let keyed: Vec<&str> = records
        .iter()
        .filter_map(|r| r["headers"]["sluice-idempotency-key"].as_str())
        .collect();
    assert_eq!(keyed.len(), 4, "{records:?}");
    assert!(keyed.contains(&"req-1#0") && keyed.contains(&"req-2#1"));
    // A producer cannot set that header itself.
    let forged = Answer::of(
        client()
            .post(&url)
            .json(&json!([{"value": 1, "headers": {"sluice-idempotency-key": "req-9#0"}}])),
    )
    .await;
    assert_eq!(forged.status, StatusCode::BAD_REQUEST);

    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_dedup_duplicates_total",
            r#"stream="orders",protocol="http""#
        ),
        6.0
    );

    // A stream without dedup appends a retry again, as before.
    let plain = s.events_url("plain");
    let one = json!([{"id": "p-1", "value": 1}]);
    post(&plain, &one, None).await;
    let twice = post(&plain, &one, None).await;
    assert!(!positions(&twice.body)[0].2, "{:?}", twice.body);
    assert_eq!(read_log(&s.data_dir, "plain", &[]).unwrap().len(), 2);
}

#[tokio::test]
async fn grpc_websocket_and_mqtt_retries_are_answered_not_appended() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), DEDUP).unwrap();

    // gRPC: by id, and by the batch's idempotency_key.
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = IngestClient::new(ch);
    let ev = |value: &str, id: &str| pb::Event {
        value: value.as_bytes().to_vec().into(),
        id: id.into(),
        ..Default::default()
    };
    let publish = |events: Vec<pb::Event>, key: &str| pb::PublishRequest {
        stream: "g".into(),
        events,
        content_type: String::new(),
        idempotency_key: key.into(),
    };
    let position = |r: &pb::EventResult| match &r.result {
        Some(pb::event_result::Result::Position(p)) => (p.partition, p.offset, p.duplicate),
        other => panic!("not a position: {other:?}"),
    };
    let mut answers = Vec::new();
    for _ in 0..2 {
        let r = grpc
            .publish(publish(vec![ev("a", "g-1"), ev("b", "")], "batch-7"))
            .await
            .unwrap()
            .into_inner();
        answers.push(r.results.iter().map(position).collect::<Vec<_>>());
    }
    assert!(answers[0].iter().all(|p| !p.2 && p.1.is_some()));
    assert_eq!(
        answers[1],
        answers[0]
            .iter()
            .map(|&(p, o, _)| (p, o, true))
            .collect::<Vec<_>>()
    );
    // PublishStream: a batch retried on the same stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut out = grpc
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for seq in 0..2 {
        tx.send(pb::PublishStreamRequest {
            sequence: seq,
            stream: "g".into(),
            events: vec![ev("c", "")],
            content_type: String::new(),
            idempotency_key: "stream-batch-1".into(),
        })
        .await
        .unwrap();
    }
    let a0 = out.message().await.unwrap().unwrap();
    let a1 = out.message().await.unwrap().unwrap();
    let (p0, p1) = (position(&a0.results[0]), position(&a1.results[0]));
    assert!(!p0.2 && p1.2 && p0.1 == p1.1, "{p0:?} {p1:?}");
    drop(tx);

    // WebSocket: a frame resent with the same id.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/w/ws", s.http))
        .await
        .unwrap();
    let mut acks = Vec::new();
    for _ in 0..2 {
        ws.send(Message::text(r#"{"id":"w-1","value":1}"#))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .expect("an ack within 30 s")
                .expect("socket open")
                .expect("a frame");
            if let Message::Text(t) = m {
                acks.push(serde_json::from_str::<Value>(&t).unwrap());
                break;
            }
        }
    }
    assert_eq!(acks[0]["duplicate"], Value::Null);
    assert_eq!(acks[1]["duplicate"], true);
    assert_eq!(acks[0]["offset"], acks[1]["offset"]);

    // MQTT 5: the user property `id` is the event's id; the resend is PUBACKed with success
    // and not appended.
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
    let a = s.mqtt.unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("dev-eo", a.ip().to_string(), a.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    for _ in 0..2 {
        let props = PublishProperties {
            user_properties: vec![("id".into(), "m-1".into()), ("site".into(), "x".into())],
            ..Default::default()
        };
        c.publish_with_properties("m/k", QoS::AtLeastOnce, false, "reading", props)
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 2 {
        let ev = tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .unwrap()
            .unwrap();
        if let rumqttc::v5::Event::Incoming(Packet::PubAck(p)) = ev {
            assert_eq!(p.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
            acked += 1;
        }
    }

    let g = read_log(&s.data_dir, "g", &[]).unwrap();
    assert_eq!(g.len(), 3, "{g:?}");
    assert_eq!(read_log(&s.data_dir, "w", &[]).unwrap().len(), 1);
    let m = read_log(&s.data_dir, "m", &[]).unwrap();
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["id"], "m-1");
    assert_eq!(m[0]["headers"]["site"], "x");
    let text = s.metrics().await;
    // gRPC: the unary retry's two events and the stream's retried batch; one each for the
    // WebSocket frame and the MQTT publish.
    for (stream, protocol, n) in [
        ("g", "grpc", 3.0),
        ("w", "websocket", 1.0),
        ("m", "mqtt", 1.0),
    ] {
        let labels = format!(r#"stream="{stream}",protocol="{protocol}""#);
        assert_eq!(
            metric(&text, "sluice_dedup_duplicates_total", &labels),
            n,
            "{labels}"
        );
    }
}

/// Each producer sends batches of events with unique ids until the gateway dies; what was
/// acked is recorded by id with its position.
type Acked = Arc<Mutex<HashMap<String, (u64, u64)>>>;

async fn produce_until_killed(
    url: String,
    producer: usize,
    acked: Acked,
    sent: Arc<Mutex<Vec<Value>>>,
) {
    let c = reqwest::Client::new();
    for n in 0.. {
        let batch: Vec<Value> = (0..1 + n % 5)
            .map(|e| json!({"id": format!("p{producer}-n{n}-e{e}"), "key": format!("k{}", (n + e) % 7), "value": n}))
            .collect();
        sent.lock().unwrap().push(Value::from(batch.clone()));
        let Ok(resp) = c.post(&url).json(&batch).send().await else {
            return;
        };
        if resp.status() != StatusCode::OK {
            return;
        }
        let Ok(body) = resp.json::<Value>().await else {
            return;
        };
        let mut a = acked.lock().unwrap();
        for (e, (p, o, _)) in positions(&body).into_iter().enumerate() {
            a.insert(batch[e]["id"].as_str().unwrap().to_string(), (p, o));
        }
    }
}

/// Produces with 4 connections until 10,000 events are acked, SIGKILLs the gateway, restarts it
/// with `config` and retries every batch ever sent: each acked event must be answered as a
/// duplicate at its acked position, and the log must hold every id sent exactly once.
async fn crash_then_retry_everything(config: &str) -> (tempfile::TempDir, Sluice, usize) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let acked: Acked = Arc::default();
    let sent: Arc<Mutex<Vec<Value>>> = Arc::default();
    let mut s = Sluice::start(&data, config).unwrap();
    let url = s.events_url("crash");
    let producers: Vec<_> = (0..4)
        .map(|p| {
            tokio::spawn(produce_until_killed(
                url.clone(),
                p,
                acked.clone(),
                sent.clone(),
            ))
        })
        .collect();
    assert!(
        sluice_tests::wait_until(Duration::from_secs(60), || {
            let n = acked.lock().unwrap().len();
            async move { n >= 10_000 }
        })
        .await,
        "the producers did not get 10,000 acks"
    );
    s.kill().unwrap();
    for p in producers {
        p.await.unwrap();
    }

    // Restart: every batch ever sent is retried, acked or not.
    let s = Sluice::start(&data, config).unwrap();
    let url = s.events_url("crash");
    let batches = sent.lock().unwrap().clone();
    let acked = acked.lock().unwrap().clone();
    let c = client();
    let mut answered_as_duplicate = 0;
    for batch in &batches {
        let a = Answer::of(c.post(&url).json(batch)).await;
        assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
        for (e, (p, o, dup)) in positions(&a.body).into_iter().enumerate() {
            let id = batch[e]["id"].as_str().unwrap();
            if let Some(&(ap, ao)) = acked.get(id) {
                assert!(
                    dup,
                    "{id} was acked at {ap}/{ao} before the crash; its retry was appended at {p}/{o}"
                );
                assert_eq!(
                    (p, o),
                    (ap, ao),
                    "{id}: the retry is answered with another position"
                );
                answered_as_duplicate += 1;
            }
        }
    }
    assert_eq!(answered_as_duplicate, acked.len());
    // The log holds every id sent exactly once: acked ones, and unacked ones either from
    // before the crash (recognised) or from the retry.
    let records = read_log(&data, "crash", &[]).unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *seen
            .entry(r["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let ids: usize = batches.iter().map(|b| b.as_array().unwrap().len()).sum();
    assert_eq!(seen.len(), ids);
    (tmp, s, acked.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_every_acked_event_retried_is_answered_and_none_is_stored_twice() {
    let (_tmp, s, acked) = crash_then_retry_everything(DEDUP).await;
    // The embedded window was rebuilt from the log.
    let m = s.metrics().await;
    assert!(metric_or_zero(&m, "sluice_dedup_restored_total", "") >= acked as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_after_sigkill_every_acked_event_retried_is_answered() {
    let redis = Redis::start().unwrap();
    let (_tmp, s, _) = crash_then_retry_everything(&redis_config(&redis, "")).await;
    let m = s.metrics().await;
    assert_eq!(metric_or_zero(&m, "sluice_dedup_restored_total", ""), 0.0);
    assert_eq!(metric(&m, "sluice_dedup_store_up", ""), 1.0);
    eprintln!(
        "claims taken over after the crash: {}",
        metric_or_zero(&m, "sluice_dedup_claims_taken_over_total", "")
    );
}

fn redis_config(redis: &Redis, extra: &str) -> String {
    format!(
        "{DEDUP}[dedup]\nstore = \"redis\"\n[dedup.redis]\nurl = {:?}\n{extra}",
        redis.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_kafka_share_one_window_in_redis() {
    let tansu = Tansu::start().unwrap();
    let redis = Redis::start().unwrap();
    let config = format!(
        "{}{}",
        kafka_config(&tansu.bootstrap, ""),
        redis_config(&redis, "")
    );
    create_topic(&tansu.bootstrap, "orders", 3).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let a = kafka_start_ready(&tmp.path().join("a"), &config).await;
    let b = kafka_start_ready(&tmp.path().join("b"), &config).await;

    // Sent to A, retried through B (a load balancer's choice): B answers with A's positions.
    let batch = json!([
        {"id": "k-1", "key": "x", "value": 1},
        {"id": "k-2", "key": "y", "value": 2},
        {"id": "k-3", "key": "z", "value": 3},
    ]);
    let first = post(&a.events_url("orders"), &batch, None).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let original = positions(&first.body);
    let retry = post(&b.events_url("orders"), &batch, None).await;
    assert_eq!(
        positions(&retry.body),
        original
            .iter()
            .map(|&(p, o, _)| (p, o, true))
            .collect::<Vec<_>>()
    );
    // And the other way round, by Idempotency-Key.
    let unnamed = json!([{"value": "u"}]);
    let by_key = positions(
        &post(&b.events_url("orders"), &unnamed, Some("kk-1"))
            .await
            .body,
    );
    let again = positions(
        &post(&a.events_url("orders"), &unnamed, Some("kk-1"))
            .await
            .body,
    );
    assert_eq!(again, vec![(by_key[0].0, by_key[0].1, true)]);

    // Kafka holds each event once.
    let records = read_topic(&tansu.bootstrap, "orders", 4, Duration::from_secs(20)).unwrap();
    let mut values: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .collect();
    values.sort();
    assert_eq!(values, vec!["\"u\"", "1", "2", "3"]);
    assert_eq!(redis.window_entries("orders").unwrap(), 4);
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert_eq!(
        metric(
            &mb,
            "sluice_dedup_duplicates_total",
            r#"stream="orders",protocol="http""#
        ),
        3.0
    );
    assert_eq!(
        metric(
            &ma,
            "sluice_dedup_duplicates_total",
            r#"stream="orders",protocol="http""#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_on_another_gateway_waits_for_the_original_and_a_failed_one_is_released() {
    let redis = Redis::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // A's appends take 1.5 s: its original is in flight while the retry reaches B.
    let slow = redis_config(&redis, "[log]\nfault_append_delay_ms = 1500\n");
    let a = Sluice::start(&tmp.path().join("a"), &slow).unwrap();
    let b = Sluice::start(&tmp.path().join("b"), &redis_config(&redis, "")).unwrap();
    let one = json!([{"id": "slow-1", "value": 1}]);
    let url_a = a.events_url("orders");
    let original =
        tokio::spawn(
            async move { post(&url_a, &json!([{"id": "slow-1", "value": 1}]), None).await },
        );
    assert!(
        sluice_tests::wait_until(Duration::from_secs(20), || {
            let n = redis.window_entries("orders").unwrap_or(0);
            async move { n == 1 }
        })
        .await,
        "A never claimed the key"
    );
    let retry = post(&b.events_url("orders"), &one, None).await;
    let original = original.await.unwrap();
    assert_eq!(original.status, StatusCode::OK, "{:?}", original.body);
    let (p, o, _) = positions(&original.body)[0];
    assert_eq!(
        positions(&retry.body),
        vec![(p, o, true)],
        "{:?}",
        retry.body
    );
    assert!(metric(&b.metrics().await, "sluice_dedup_waits_total", "") >= 1.0);
    assert!(
        read_log(&b.data_dir, "orders", &[])
            .unwrap_or_default()
            .is_empty()
    );

    // An original that fails (its fsync fails) releases its key: the retry is appended.
    let failing = redis_config(&redis, "[log]\nfault_fsync_fail_after = 1\n");
    let c = Sluice::start(&tmp.path().join("c"), &failing).unwrap();
    let two = json!([{"id": "fails-1", "value": 2}]);
    let failed = post(&c.events_url("orders"), &two, None).await;
    assert_eq!(
        failed.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        failed.body
    );
    let retried = post(&b.events_url("orders"), &two, None).await;
    assert_eq!(retried.status, StatusCode::OK, "{:?}", retried.body);
    assert!(!positions(&retried.body)[0].2);
    assert_eq!(read_log(&b.data_dir, "orders", &[]).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_refuses_dedup_streams_with_503_until_it_answers() {
    let port = sluice_tests::kafka::free_port();
    let config = format!(
        "{DEDUP}[streams.declare.plain]\ndedup = false\n[dedup]\nstore = \"redis\"\n[dedup.redis]\nurl = \"redis://127.0.0.1:{port}\"\ntimeout_ms = 200\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let (s, mut logs) = Sluice::start_with_logs(&tmp.path().join("data"), &config, &[]).unwrap();
    let one = json!([{"id": "r-1", "value": 1}]);
    let refused = post(&s.events_url("orders"), &one, None).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{:?}",
        refused.body
    );
    assert!(refused.retry_after.is_some());
    assert!(
        refused.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("dedup store"),
        "{:?}",
        refused.body
    );
    // Streams without dedup go on.
    let plain = post(&s.events_url("plain"), &one, None).await;
    assert_eq!(plain.status, StatusCode::OK);
    assert!(
        logs.wait_for(Duration::from_secs(10), |l| l
            .contains("dedup store (Redis) cannot be reached"))
            .is_some()
    );
    let readyz = client().get(s.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), StatusCode::OK);
    assert!(readyz.text().await.unwrap().contains("degraded"));
    let m = s.metrics().await;
    assert_eq!(metric(&m, "sluice_dedup_store_up", ""), 0.0);
    assert!(metric(&m, "sluice_dedup_store_errors_total", r#"op="claim""#) >= 1.0);
    assert!(
        read_log(&s.data_dir, "orders", &[])
            .unwrap_or_default()
            .is_empty()
    );

    // Redis comes up: dedup works again, without a restart.
    let redis = Redis::start_on(port).unwrap();
    let url = s.events_url("orders");
    assert!(
        sluice_tests::wait_until(Duration::from_secs(20), || {
            let url = url.clone();
            let one = one.clone();
            async move { post(&url, &one, None).await.status == StatusCode::OK }
        })
        .await,
        "dedup did not come back with Redis"
    );
    let again = post(&url, &one, None).await;
    assert!(positions(&again.body)[0].2, "{:?}", again.body);
    assert_eq!(redis.window_entries("orders").unwrap(), 1);
    assert!(
        sluice_tests::wait_until(Duration::from_secs(10), || async {
            metric(&s.metrics().await, "sluice_dedup_store_up", "") == 1.0
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_by_a_killed_gateway_is_taken_over_once_it_restarted() {
    let redis = Redis::start().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a");
    // The event's append takes 30 s: the gateway is killed while its claim is in Redis.
    let slow = redis_config(&redis, "[log]\nfault_append_delay_ms = 30000\n");
    let mut a = Sluice::start(&data, &slow).unwrap();
    let url = a.events_url("orders");
    let one = json!([{"id": "lost-1", "value": 1}]);
    let body = one.clone();
    let in_flight = tokio::spawn(async move { client().post(&url).json(&body).send().await });
    assert!(
        sluice_tests::wait_until(Duration::from_secs(20), || {
            let n = redis.window_entries("orders").unwrap_or(0);
            async move { n == 1 }
        })
        .await,
        "the gateway never claimed the key"
    );
    a.kill().unwrap();
    assert!(
        in_flight.await.unwrap().is_err(),
        "the killed gateway answered"
    );

    // Restarted, it reconciles its log (the event is not in it) and publishes a new heartbeat:
    // the retry takes the old claim over and is appended, at once rather than after the
    // claim's 60 s.
    let a = Sluice::start(&data, &redis_config(&redis, "")).unwrap();
    let retry = post(&a.events_url("orders"), &one, None).await;
    assert_eq!(retry.status, StatusCode::OK, "{:?}", retry.body);
    assert!(
        retry.took < Duration::from_secs(20),
        "took {:?}",
        retry.took
    );
    assert!(!positions(&retry.body)[0].2);
    let m = a.metrics().await;
    assert_eq!(metric(&m, "sluice_dedup_claims_taken_over_total", ""), 1.0);
    assert_eq!(read_log(&data, "orders", &[]).unwrap().len(), 1);
    // And it is a duplicate from now on.
    let again = post(&a.events_url("orders"), &one, None).await;
    assert!(positions(&again.body)[0].2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_events_a_killed_gateway_had_stored_are_found_at_its_restart_not_stored_again() {
    let tansu = Tansu::start().unwrap();
    let redis = Redis::start().unwrap();
    create_topic(&tansu.bootstrap, "orders", 3).await.unwrap();
    let kafka = kafka_config(&tansu.bootstrap, "");
    let normal = format!("{kafka}{}", redis_config(&redis, ""));
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a");
    // Kafka takes the events at once; their settlement in Redis waits 30 s. Killed in between,
    // the gateway leaves their keys claimed in Redis with the events in Kafka: the state a
    // SIGKILL right after Kafka's ack leaves, made certain.
    let slow = format!(
        "{kafka}{}",
        redis_config(&redis, "fault_settle_delay_ms = 30000\n")
    );
    let mut a = kafka_start_ready(&data, &slow).await;
    let batch = json!([
        {"id": "doubt-1", "key": "x", "value": 1},
        {"id": "doubt-2", "key": "y", "value": 2},
    ]);
    let first = post(&a.events_url("orders"), &batch, None).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let original = positions(&first.body);
    assert_eq!(
        read_topic(&tansu.bootstrap, "orders", 2, Duration::from_secs(20))
            .unwrap()
            .len(),
        2
    );
    a.kill().unwrap();
    // The claims were written down before the events were produced.
    let journal = data.join("dedup-journal");
    let written: Vec<std::path::PathBuf> = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let text: String = written
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        text.contains(&format!("i{}", hex(b"doubt-1")))
            && text.contains(&format!("i{}", hex(b"doubt-2"))),
        "{text:?}"
    );

    // Another gateway gets the producer's retry meanwhile: the keys are claimed by a gateway
    // that is gone, so it waits.
    let b = kafka_start_ready(&tmp.path().join("b"), &normal).await;
    let url = b.events_url("orders");
    let body = batch.clone();
    let on_b = tokio::spawn(async move { post(&url, &body, None).await });
    // The killed gateway comes back: it finds its journaled keys in Kafka and marks them
    // stored before it says it is back, so neither gateway takes the claims over and appends.
    let a = kafka_start_ready(&data, &normal).await;
    let on_b = on_b.await.unwrap();
    let dup: Vec<(u64, u64, bool)> = original.iter().map(|&(p, o, _)| (p, o, true)).collect();
    assert_eq!(on_b.status, StatusCode::OK, "{:?}", on_b.body);
    assert_eq!(positions(&on_b.body), dup, "{:?}", on_b.body);
    let on_a = post(&a.events_url("orders"), &batch, None).await;
    assert_eq!(positions(&on_a.body), dup, "{:?}", on_a.body);
    for g in [&a, &b] {
        let m = g.metrics().await;
        assert_eq!(
            metric_or_zero(&m, "sluice_dedup_claims_taken_over_total", ""),
            0.0
        );
    }
    // Kafka still holds each event once; the last run's journal was read and deleted.
    let records = read_topic(&tansu.bootstrap, "orders", 2, Duration::from_secs(5)).unwrap();
    assert_eq!(records.len(), 2, "{records:#?}");
    for p in &written {
        assert!(!p.exists(), "{} was not deleted", p.display());
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_redis_a_producer_sending_unique_ids_pushes_out_only_its_own_oldest_keys() {
    let redis = Redis::start().unwrap();
    let config = format!(
        "{}{}",
        redis_config(&redis, ""),
        sluice_tests::api_key_entry("b.s3cret", "b", &["*"])
    )
    .replace(
        "dedup = true\n",
        "dedup = true\ndedup_principal_events = 5\n",
    );
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config).unwrap();
    let url = s.events_url("orders");
    let as_b = |ids: &[&str]| {
        let events: Vec<Value> = ids.iter().map(|id| json!({"id": id, "value": 1})).collect();
        Answer::of(
            client()
                .post(&url)
                .header("x-api-key", "b.s3cret")
                .json(&events),
        )
    };
    assert!(
        positions(&as_b(&["b-1", "b-2"]).await.body)
            .iter()
            .all(|p| !p.2)
    );
    // An anonymous producer floods the stream with ten unique ids, one request each.
    for i in 0..10 {
        post(&url, &json!([{"id": format!("f-{i}"), "value": i}]), None).await;
    }
    // It holds its share and at most half as much again: generations of ceil(5 / 2) = 3 keys,
    // three kept — f-0..f-2 were dropped whole when f-9 opened the fourth, f-3..f-9 stay (7).
    // b's keys are untouched.
    assert_eq!(redis.window_entries("orders").unwrap(), 2 + 7);
    assert!(
        positions(&as_b(&["b-1", "b-2"]).await.body)
            .iter()
            .all(|p| p.2)
    );
    let newest = post(&url, &json!([{"id": "f-9", "value": 9}]), None).await;
    assert!(positions(&newest.body)[0].2);
    let oldest = post(&url, &json!([{"id": "f-0", "value": 0}]), None).await;
    assert!(
        !positions(&oldest.body)[0].2,
        "f-0 should have been pushed out"
    );
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_dedup_evictions_total",
            r#"reason="principal_share""#
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_resends_with_dup_are_recognised_by_client_and_packet_id_across_reconnects() {
    use rmqtt_codec::v3;
    use sluice_tests::mqtt::{connect3, publish, session3};
    let tmp = tempfile::tempdir().unwrap();
    let config = format!("{DEDUP}[streams.declare.plain]\ndedup = false\n");
    let s = Sluice::start(&tmp.path().join("data"), &config).unwrap();
    let addr = s.mqtt.unwrap();
    async fn send(
        raw: &mut sluice_tests::mqtt::Raw,
        topic: &str,
        id: u16,
        dup: bool,
        body: &'static [u8],
    ) {
        let mut p = publish(topic, 1, id, body, None);
        p.dup = dup;
        raw.send3(v3::Packet::Publish(Box::new(p))).await;
        match raw.recv3().await {
            Some(v3::Packet::PublishAck { packet_id }) => assert_eq!(packet_id.get(), id),
            other => panic!("{other:?}"),
        }
    }
    let mut raw = session3(addr, connect3("pump-7", 30)).await;
    send(&mut raw, "m/k", 7, false, b"first").await;
    // The PUBACK was lost (as far as the client knows): it resends with DUP, on this
    // connection and again after reconnecting.
    send(&mut raw, "m/k", 7, true, b"first").await;
    drop(raw);
    let mut raw = session3(addr, connect3("pump-7", 30)).await;
    send(&mut raw, "m/k", 7, true, b"first").await;
    // A new publish reusing packet id 7 (no DUP) is a new event; its resend is recognised.
    send(&mut raw, "m/k", 7, false, b"second").await;
    send(&mut raw, "m/k", 7, true, b"second").await;
    // Another client's packet 7 is its own.
    let mut other = session3(addr, connect3("pump-8", 30)).await;
    send(&mut other, "m/k", 7, true, b"other").await;
    let records = read_log(&s.data_dir, "m", &[]).unwrap();
    let values: Vec<&str> = records
        .iter()
        .map(|r| r["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["first", "second", "other"], "{records:?}");
    assert_eq!(records[0]["headers"]["sluice-mqtt-packet"], "npump-7#7");
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_dedup_duplicates_total",
            r#"stream="m",protocol="mqtt""#
        ),
        3.0
    );
    // A stream without dedup stores no packet key.
    send(&mut other, "plain/k", 9, false, b"p").await;
    let plain = read_log(&s.data_dir, "plain", &[]).unwrap();
    assert_eq!(
        plain[0]["headers"]["sluice-mqtt-packet"],
        Value::Null,
        "{plain:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_from_the_topic_rule_deduplicates_mqtt_3_publishes() {
    use rmqtt_codec::v3;
    use sluice_tests::mqtt::{connect3, publish, session3};
    let tmp = tempfile::tempdir().unwrap();
    let config = format!(
        "{DEDUP}[[mqtt.topics]]\npattern = \"meters/{{meter}}/readings/{{seq}}\"\nstream = \"readings\"\nkey = \"{{meter}}\"\nid = \"{{meter}}-{{seq}}\"\n"
    );
    let s = Sluice::start(&tmp.path().join("data"), &config).unwrap();
    // Two connections (a device that reconnected and resent without DUP, with a new packet
    // id): only the topic says it is the same reading.
    for (client, pid) in [("m1-a", 1), ("m1-b", 2)] {
        let mut raw = session3(s.mqtt.unwrap(), connect3(client, 30)).await;
        raw.send3(v3::Packet::Publish(Box::new(publish(
            "meters/m1/readings/41",
            1,
            pid,
            b"17.5",
            None,
        ))))
        .await;
        match raw.recv3().await {
            Some(v3::Packet::PublishAck { packet_id }) => assert_eq!(packet_id.get(), pid),
            other => panic!("{other:?}"),
        }
    }
    let records = read_log(&s.data_dir, "readings", &[]).unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["id"], "m1-41");
    assert_eq!(records[0]["key"], "m1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_redis_a_request_of_thousands_of_keys_is_claimed_whole_and_the_window_expires() {
    let redis = Redis::start().unwrap();
    // A short window: Redis drops a generation window + window / 2 after it opened.
    let config = redis_config(&redis, "")
        .replace("dedup = true\n", "dedup = true\ndedup_window_ms = 1000\n");
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config).unwrap();
    let url = s.events_url("orders");
    // 9,000 keys in one request: more than Lua can unpack into one call (about 8,000), so
    // the claims go in calls of 1,000.
    let events: Vec<Value> = (0..9000)
        .map(|i| json!({"id": format!("big-{i}"), "value": i}))
        .collect();
    let batch = json!(events);
    let first = post(&url, &batch, None).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let placed = positions(&first.body);
    assert_eq!(placed.len(), 9000);
    assert!(placed.iter().all(|p| !p.2));
    let again = post(&url, &batch, None).await;
    assert_eq!(
        positions(&again.body),
        placed
            .iter()
            .map(|&(p, o, _)| (p, o, true))
            .collect::<Vec<_>>()
    );
    assert_eq!(read_log(&s.data_dir, "orders", &[]).unwrap().len(), 9000);
    // The window passes: Redis expires the generation (nothing stays past 1.5 windows), and a
    // retry now is a new event.
    assert!(
        sluice_tests::wait_until(Duration::from_secs(20), || async {
            redis.window_entries("orders").unwrap_or(usize::MAX) == 0
        })
        .await,
        "the window's generation never expired"
    );
    let late = post(&url, &json!([{"id": "big-7", "value": 7}]), None).await;
    assert_eq!(late.status, StatusCode::OK, "{:?}", late.body);
    assert!(!positions(&late.body)[0].2, "{:?}", late.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_redis_requests_claiming_the_same_key_together_store_it_once() {
    let redis = Redis::start().unwrap();
    // One connection: concurrent requests' claims queue and go to Redis in shared script calls.
    let config = redis_config(&redis, "connections = 1\ntimeout_ms = 5000\n");
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config).unwrap();
    let url = s.events_url("orders");
    for round in 0..5 {
        let same = format!("same-{round}");
        // Redis holds scripts for a second, and a first request's claim holds the gateway's one
        // connection meanwhile: the next requests' claims queue behind it and go to Redis
        // together, several holding the same key in one script call.
        assert_eq!(
            redis
                .command(&["CLIENT", "PAUSE", "1000", "WRITE"])
                .unwrap(),
            "+OK"
        );
        let first = {
            let url = url.clone();
            let body = json!([{"id": format!("first-{round}"), "value": 0}]);
            tokio::spawn(async move { post(&url, &body, None).await })
        };
        assert!(
            sluice_tests::wait_until(Duration::from_secs(10), || async {
                redis
                    .info_field("clients", "blocked_clients")
                    .is_ok_and(|n| n != "0")
            })
            .await,
            "the first claim never reached Redis"
        );
        let sends = (0..32).map(|i| {
            let url = url.clone();
            let body =
                json!([{"id": same, "value": 0}, {"id": format!("own-{round}-{i}"), "value": i}]);
            tokio::spawn(async move { post(&url, &body, None).await })
        });
        let answers = futures_util::future::join_all(sends).await;
        assert_eq!(first.await.unwrap().status, StatusCode::OK);
        let mut firsts = Vec::new();
        for a in answers {
            let a = a.unwrap();
            assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
            let p = positions(&a.body);
            assert!(!p[1].2, "a unique id answered as a duplicate: {:?}", a.body);
            firsts.push(p[0]);
        }
        // Exactly one request stored the shared id; the others were answered with its place.
        let stored: Vec<_> = firsts.iter().filter(|p| !p.2).collect();
        assert_eq!(stored.len(), 1, "{firsts:?}");
        assert!(
            firsts
                .iter()
                .all(|p| (p.0, p.1) == (stored[0].0, stored[0].1)),
            "{firsts:?}"
        );
    }
    assert_eq!(
        read_log(&s.data_dir, "orders", &[]).unwrap().len(),
        5 * (1 + 1 + 32)
    );
}
