//! CloudEvents 1.0 (docs/http.md "CloudEvents") on the real binary: HTTP structured, batch and
//! binary modes, WebSocket `?format=cloudevents`, gRPC with the Kafka binding's `ce_*` headers;
//! stored as the CloudEvents Kafka protocol binding has it (data as the value, `ce_*` headers,
//! one `content-type`), `time` as the record's timestamp, `source` + `id` as the dedup key;
//! invalid events answered one by one, naming the attribute.

use std::time::Duration;

use futures_util::SinkExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::http::{Answer, ws_answers};
use sluice_tests::kafka::{Tansu, create_topic, kafka_config, read_topic, start_ready};
use sluice_tests::{Sluice, metric, read_log};
use tokio_tungstenite::tungstenite::Message;

/// 2026-01-02T03:04:05.678Z.
const T0: i64 = 1_767_323_045_678;

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(30))
}

async fn post(url: &str, content_type: &str, body: &Value) -> Answer {
    Answer::of(
        client()
            .post(url)
            .header("content-type", content_type)
            .body(body.to_string()),
    )
    .await
}

fn ce(id: &str, source: &str, data: Value) -> Value {
    json!({"specversion": "1.0", "id": id, "source": source, "type": "com.example.reading",
           "time": "2026-01-02T03:04:05.678Z", "subject": "t", "severity": 3, "data": data})
}

const STRUCTURED: &str = "application/cloudevents+json";
const BATCH: &str = "application/cloudevents-batch+json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_structured_batch_and_binary_modes_store_the_kafka_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[streams.defaults]\ndedup = true\n",
    )
    .unwrap();

    // Structured mode: one event, stored as the Kafka binding's binary mode.
    let a = post(
        &s.events_url("ce"),
        STRUCTURED,
        &ce("e-1", "/dev/7", json!({"t": 21.5})),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let log = read_log(&s.data_dir, "ce", &["--json-values"]).unwrap();
    assert_eq!(log.len(), 1, "{log:#?}");
    let r = &log[0];
    assert_eq!(r["value"], json!({"t": 21.5}), "{r}");
    assert_eq!(r["id"], "/dev/7 e-1", "{r}");
    assert_eq!(r["timestamp_ms"], T0, "{r}");
    for (k, v) in [
        ("ce_specversion", "1.0"),
        ("ce_id", "e-1"),
        ("ce_source", "/dev/7"),
        ("ce_type", "com.example.reading"),
        ("ce_time", "2026-01-02T03:04:05.678Z"),
        ("ce_subject", "t"),
        ("ce_severity", "3"),
    ] {
        assert_eq!(r["headers"][k], v, "{k} in {r}");
    }

    // The same CloudEvent again is a duplicate (dedup by source and id); the same id from
    // another source is another event.
    let a = post(
        &s.events_url("ce"),
        STRUCTURED,
        &ce("e-1", "/dev/7", json!(1)),
    )
    .await;
    assert_eq!(a.body["results"][0]["duplicate"], true, "{a:?}");
    let a = post(
        &s.events_url("ce"),
        STRUCTURED,
        &ce("e-1", "/dev/8", json!(2)),
    )
    .await;
    assert_eq!(a.body["results"][0]["duplicate"], Value::Null, "{a:?}");

    // An invalid event refuses a structured request, naming the attribute.
    let mut bad = ce("e-2", "/dev/7", json!(1));
    bad.as_object_mut().unwrap().remove("type");
    let a = post(&s.events_url("ce"), STRUCTURED, &bad).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`type` is required"),
        "{a:?}"
    );

    // Batch mode: each event answered; the invalid one alone refused.
    let a = post(
        &s.events_url("batch"),
        BATCH,
        &json!([
            ce("b-1", "/d", json!({"n": 1})),
            {"specversion": "0.3", "id": "b-2", "source": "/d", "type": "t"},
            {"specversion": "1.0", "id": "b-3", "source": "/d", "type": "t",
             "datacontenttype": "text/plain", "data": "plain text"},
            {"specversion": "1.0", "id": "b-4", "source": "/d", "type": "t", "data_base64": "/wA="},
        ]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let results = a.body["results"].as_array().unwrap();
    assert!(results[0]["offset"].is_u64(), "{a:?}");
    assert_eq!(results[1]["error"]["code"], "malformed", "{a:?}");
    let m = results[1]["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("CloudEvent 1") && m.contains("specversion"),
        "{m}"
    );
    assert!(
        results[2]["offset"].is_u64() && results[3]["offset"].is_u64(),
        "{a:?}"
    );
    let log = read_log(&s.data_dir, "batch", &["--json-values"]).unwrap();
    assert_eq!(log.len(), 3, "{log:#?}");
    assert_eq!(log[1]["value"], "plain text", "{}", log[1]);
    assert_eq!(
        log[1]["headers"]["content-type"], "text/plain",
        "{}",
        log[1]
    );
    assert_eq!(log[2]["value"], "/wA=", "{}", log[2]); // base64, as `log read` shows binary
    assert_eq!(log[2]["value_encoding"], "base64", "{}", log[2]);
    let text = s.metrics().await;
    assert!(
        metric(
            &text,
            "sluice_events_rejected_total",
            r#"protocol="http",reason="malformed""#
        ) >= 1.0
    );
    // A batch whose every event is invalid is a 400.
    let a = post(&s.events_url("batch"), BATCH, &json!([{"id": "x"}])).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");

    // Binary mode: attributes in ce- headers (percent-encoded), the body is the data.
    let a = Answer::of(
        client()
            .post(s.events_url("bin"))
            .header("content-type", "text/csv")
            .header("ce-specversion", "1.0")
            .header("ce-id", "c%201")
            .header("ce-source", "/csv")
            .header("ce-type", "rows")
            .header("ce-time", "2026-01-02T03:04:05.678Z")
            .body("a,b\n1,2\n"),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let log = read_log(&s.data_dir, "bin", &[]).unwrap();
    assert_eq!(log[0]["value"], "a,b\n1,2\n");
    assert_eq!(log[0]["headers"]["content-type"], "text/csv");
    assert_eq!(log[0]["headers"]["ce_id"], "c 1");
    assert_eq!(log[0]["id"], "/csv c 1");
    assert_eq!(log[0]["timestamp_ms"], T0);
    let a = Answer::of(
        client()
            .post(s.events_url("bin"))
            .header("ce-specversion", "1.0")
            .header("ce-id", "c2")
            .body("x"),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_grpc_take_cloudevents_too() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();

    // WebSocket with ?format=cloudevents: a frame of two, one invalid, answered per event.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/streams/w/ws?format=cloudevents",
        s.http
    ))
    .await
    .unwrap();
    ws.send(Message::text(
        json!([ce("w-1", "/browser", json!({"click": 1})), {"specversion": "1.0", "id": "w-2"}])
            .to_string(),
    ))
    .await
    .unwrap();
    let mut acks = ws_answers(&mut ws, 2).await;
    acks.sort_by_key(|a| a["index"].as_u64());
    assert!(acks[0]["offset"].is_u64(), "{acks:?}");
    assert_eq!(acks[0]["id"], "/browser w-1", "{acks:?}");
    assert_eq!(acks[1]["error"]["code"], "malformed", "{acks:?}");
    assert!(
        acks[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`source`")
    );
    let log = read_log(&s.data_dir, "w", &["--json-values"]).unwrap();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["value"], json!({"click": 1}));
    assert_eq!(log[0]["timestamp_ms"], T0);
    // An unknown format is refused at the upgrade.
    let err =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/w/ws?format=xml", s.http))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");

    // gRPC: the attributes as ce_* headers (the Kafka binding's names).
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = IngestClient::new(ch);
    let h = |k: &str, v: &str| pb::Header {
        key: k.into(),
        value: v.as_bytes().to_vec().into(),
    };
    let event = |headers| pb::Event {
        value: b"{\"n\":1}".to_vec().into(),
        headers,
        ..Default::default()
    };
    let r = grpc
        .publish(pb::PublishRequest {
            stream: "g".into(),
            events: vec![event(vec![
                h("ce_specversion", "1.0"),
                h("ce_id", "g-1"),
                h("ce_source", "/svc"),
                h("ce_type", "t"),
                h("ce_time", "2026-01-02T03:04:05.678Z"),
            ])],
            content_type: "application/json".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        r.results[0].result,
        Some(pb::event_result::Result::Position(_))
    ));
    let err = grpc
        .publish(pb::PublishRequest {
            stream: "g".into(),
            events: vec![event(vec![h("ce_specversion", "1.0"), h("ce_id", "g-2")])],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("`source`"), "{err:?}");
    let log = read_log(&s.data_dir, "g", &[]).unwrap();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["id"], "/svc g-1");
    assert_eq!(log[0]["timestamp_ms"], T0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_kafka_a_cloudevent_is_a_record_of_the_kafka_binding() {
    let tansu = Tansu::start().unwrap();
    create_topic(&tansu.bootstrap, "kce", 1).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let s = start_ready(
        &tmp.path().join("data"),
        &kafka_config(&tansu.bootstrap, ""),
    )
    .await;
    let mut event = ce("k-1", "/dev/9", json!("hello"));
    event["datacontenttype"] = json!("text/plain");
    event["partitionkey"] = json!("dev-9");
    let a = post(&s.events_url("kce"), STRUCTURED, &event).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let records = read_topic(&tansu.bootstrap, "kce", 1, Duration::from_secs(30)).unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!(r.value, b"hello");
    assert_eq!(r.key.as_deref(), Some(&b"dev-9"[..]));
    assert_eq!(r.timestamp, Some(T0));
    assert_eq!(r.header("ce_id").as_deref(), Some("k-1"));
    assert_eq!(r.header("ce_source").as_deref(), Some("/dev/9"));
    assert_eq!(r.header("ce_specversion").as_deref(), Some("1.0"));
    // One content-type: the event's datacontenttype, as the binding has it.
    let types: Vec<_> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "content-type")
        .collect();
    assert_eq!(types.len(), 1, "{r:?}");
    assert_eq!(r.header("content-type").as_deref(), Some("text/plain"));
}
