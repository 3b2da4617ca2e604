//! Schemas (docs/schemas.md) on the real binary: JSON Schema per stream checked at admission,
//! the same on HTTP, gRPC, WebSocket and MQTT 5 — an invalid event refused alone with the JSON
//! pointer and the rule, or stored in the dead-letter stream with its original bytes and why;
//! valid events carry the schema they were checked against; a reload applies a new version and
//! refuses one that does not compile; `check-config` names a bad schema; the metrics count it.

use std::time::Duration;

use futures_util::SinkExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::http::{Answer, ws_answers};
use sluice_tests::mqtt::v5_pubacks;
use sluice_tests::{Sluice, metric, read_log, wait_until};
use tokio_tungstenite::tungstenite::Message;

const ORDER_V1: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["id", "amount"],
  "properties": {
    "id": {"type": "string"},
    "amount": {"type": "number", "minimum": 0},
    "items": {"type": "array", "items": {"type": "object", "required": ["sku"]}}
  }
}"#;

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(30))
}

async fn post(url: &str, body: &Value) -> Answer {
    Answer::of(client().post(url).json(body)).await
}

struct Setup {
    _tmp: tempfile::TempDir,
    s: Sluice,
}

fn start() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("order.json"), ORDER_V1).unwrap();
    std::fs::write(
        dir.join("key.json"),
        r#"{"type": "string", "pattern": "^acct-[0-9]+$"}"#,
    )
    .unwrap();
    let toml = format!(
        r#"
[schemas.orders]
value = "{d}/order.json"

[schemas.payments]
value = "{d}/order.json"
on_invalid = "dead_letter"

[schemas.keyed]
value = "{d}/order.json"
key = "{d}/key.json"
"#,
        d = dir.display()
    );
    let s = Sluice::start(&dir.join("data"), &toml).unwrap();
    Setup { _tmp: tmp, s }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_refused_alone_on_every_protocol() {
    let Setup { s, _tmp: _keep, .. } = start();

    // HTTP: the invalid event in the middle is refused with its pointer and rule.
    let a = post(
        &s.events_url("orders"),
        &json!([
            {"id": "o-1", "amount": 10},
            {"id": "o-2", "amount": -1},
            {"id": "o-3", "amount": 3, "items": [{"sku": "a"}, {"qty": 2}]},
            {"id": "o-4", "amount": 4},
        ]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let r = a.body["results"].as_array().unwrap();
    assert!(r[0]["offset"].is_u64() && r[3]["offset"].is_u64(), "{a:?}");
    let m1 = r[1]["error"]["message"].as_str().unwrap();
    assert!(
        m1.contains("event 1") && m1.contains("/amount") && m1.contains("minimum"),
        "{m1}"
    );
    let m2 = r[2]["error"]["message"].as_str().unwrap();
    assert!(m2.contains("/items/1") && m2.contains("required"), "{m2}");
    assert_eq!(r[1]["error"]["code"], "malformed");
    // Not JSON at all, and a request whose every event fails: 400.
    let a = Answer::of(
        client()
            .post(s.events_url("orders"))
            .header("content-type", "text/plain")
            .body("plain text"),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not_json"),
        "{a:?}"
    );

    // gRPC: a per-event error.
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ev = |v: &str| pb::Event {
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let out = IngestClient::new(ch)
        .publish(pb::PublishRequest {
            stream: "orders".into(),
            events: vec![ev(r#"{"id":"g-1","amount":1}"#), ev(r#"{"id":"g-2"}"#)],
            content_type: "application/json".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        out.results[0].result,
        Some(pb::event_result::Result::Position(_))
    ));
    match &out.results[1].result {
        Some(pb::event_result::Result::Error(e)) => {
            assert_eq!(e.code, "malformed");
            assert!(e.message.contains("required"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }

    // WebSocket: a nack for the invalid event.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/orders/ws", s.http))
            .await
            .unwrap();
    ws.send(Message::text(
        json!([{"id": "w-1", "amount": 1}, {"id": 5, "amount": 1}]).to_string(),
    ))
    .await
    .unwrap();
    let mut acks = ws_answers(&mut ws, 2).await;
    acks.sort_by_key(|a| a["index"].as_u64());
    assert!(acks[0]["offset"].is_u64(), "{acks:?}");
    assert!(
        acks[1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/id"),
        "{acks:?}"
    );

    // MQTT 5: PUBACK 0x99 (payload format invalid) with the reason.
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    let addr = s.mqtt.unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("dev-schema", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    for payload in [
        r#"{"id":"m-1","amount":2}"#,
        r#"{"id":"m-2","amount":"lots"}"#,
    ] {
        c.publish("orders/dev", QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    assert_eq!(
        v5_pubacks(&mut el, 2).await,
        [PubAckReason::Success, PubAckReason::PayloadFormatInvalid]
    );

    // Only the valid events are stored, each saying which schema passed it.
    let log = read_log(&s.data_dir, "orders", &["--json-values"]).unwrap();
    // JSON values as JSON; MQTT payloads (no content type) as their text.
    let ids: Vec<String> = log
        .iter()
        .map(|r| match &r["value"] {
            Value::String(t) => serde_json::from_str::<Value>(t).unwrap()["id"].clone(),
            v => v["id"].clone(),
        })
        .map(|id| id.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["o-1", "o-4", "g-1", "w-1", "m-1"], "{log:#?}");
    for r in &log {
        let schema = r["headers"]["sluice-schema"].as_str();
        assert!(schema.is_some_and(|s| s.starts_with("order.json@")), "{r}");
    }
    let text = s.metrics().await;
    assert_eq!(
        metric(
            &text,
            "sluice_events_invalid_total",
            r#"stream="orders",reason="minimum""#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "sluice_events_invalid_total",
            r#"stream="orders",reason="required""#
        ),
        2.0
    );
    // A producer cannot claim a schema it was not checked against.
    let a = post(
        &s.events_url("orders"),
        &json!({"value": {"id": "x", "amount": 1}, "headers": {"sluice-schema": "forged"}}),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_streams_keep_what_failed_with_why() {
    let Setup { s, _tmp: _keep, .. } = start();
    // Sent as written, so the stored bytes can be compared with it.
    let a = Answer::of(
        client()
            .post(s.events_url("payments"))
            .header("content-type", "application/json")
            .body(
                r#"[{"id": "p-1", "amount": 5},
                    {"value": {"id":"p-2","amount":-5}, "key": "acct-9", "headers": {"source": "till"}}]"#,
            ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let r = &a.body["results"];
    assert!(r[0]["offset"].is_u64(), "{a:?}");
    assert_eq!(r[1]["dead_letter"]["stream"], "payments.dlq", "{a:?}");
    assert_eq!(r[1]["dead_letter"]["offset"], 0, "{a:?}");
    assert!(
        r[1]["reason"].as_str().unwrap().contains("/amount"),
        "{a:?}"
    );
    assert_eq!(
        a.body.get("failed"),
        None,
        "a dead-lettered event is taken: {a:?}"
    );

    let dlq = read_log(&s.data_dir, "payments.dlq", &[]).unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:#?}");
    let d = &dlq[0];
    // The original bytes, key and headers, and why.
    assert_eq!(d["value"], r#"{"id":"p-2","amount":-5}"#);
    assert_eq!(d["key"], "acct-9");
    assert_eq!(d["headers"]["source"], "till");
    assert_eq!(d["headers"]["sluice-dead-letter-source"], "payments");
    assert_eq!(d["headers"]["sluice-dead-letter-rule"], "minimum");
    assert_eq!(d["headers"]["sluice-dead-letter-path"], "/amount");
    assert!(
        d["headers"]["sluice-schema"]
            .as_str()
            .unwrap()
            .starts_with("order.json@")
    );
    assert_eq!(d["headers"]["sluice-protocol"], "http");
    assert_eq!(d["headers"]["sluice-principal"], "anonymous");
    assert_eq!(read_log(&s.data_dir, "payments", &[]).unwrap().len(), 1);
    let text = s.metrics().await;
    assert_eq!(
        metric(
            &text,
            "sluice_dead_letter_events_total",
            r#"stream="payments""#
        ),
        1.0
    );
}

/// Waits until `sluice_config_reloads_total{result}` reaches `n`.
async fn reloads(s: &Sluice, result: &str, n: f64) -> bool {
    wait_until(Duration::from_secs(20), || async {
        sluice_tests::metric_or_zero(
            &s.metrics().await,
            "sluice_config_reloads_total",
            &format!(r#"result="{result}""#),
        ) >= n
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_compatible_version_and_refuses_a_breaking_or_broken_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("order.json"), ORDER_V1).unwrap();
    // SIGHUP only: the file watcher would reload on its own (tested in schema_formats).
    let toml = format!(
        "[server]\nconfig_watch_interval_ms = 0\n\n[schemas.orders]\nvalue = \"{d}/order.json\"\n\n[schemas.loose]\nvalue = \"{d}/loose.json\"\ncompatibility = \"none\"\n",
        d = dir.display()
    );
    std::fs::write(dir.join("loose.json"), ORDER_V1).unwrap();
    let (s, mut logs) =
        Sluice::start_with_logs(&dir.join("data"), &toml, &[("RUST_LOG", "warn")]).unwrap();
    let a = post(&s.events_url("orders"), &json!({"id": "r-1", "amount": -1})).await;
    assert_eq!(
        a.status,
        StatusCode::BAD_REQUEST,
        "version 1 has a minimum: {a:?}"
    );

    // Version 2 drops the minimum: it accepts everything version 1 did (backward
    // compatible, the default rule), so it applies without a restart.
    let v2 = ORDER_V1.replace(r#", "minimum": 0"#, "");
    assert_ne!(v2, ORDER_V1);
    std::fs::write(dir.join("order.json"), &v2).unwrap();
    s.signal("HUP").unwrap();
    assert!(
        reloads(&s, "ok", 1.0).await,
        "the compatible version applies"
    );
    let a = post(&s.events_url("orders"), &json!({"id": "r-2", "amount": -1})).await;
    assert!(a.body["results"][0]["offset"].is_u64(), "version 2: {a:?}");

    // Version 3 requires a currency: events version 2 accepted would be refused, so the
    // reload is refused, naming what breaks, and version 2 stays.
    let v3 = v2.replace(
        r#""required": ["id", "amount"]"#,
        r#""required": ["id", "amount", "currency"]"#,
    );
    std::fs::write(dir.join("order.json"), &v3).unwrap();
    s.signal("HUP").unwrap();
    assert!(
        reloads(&s, "rejected", 1.0).await,
        "the breaking version is refused"
    );
    let line = logs.wait_for(Duration::from_secs(20), |l| l.contains("reload rejected"));
    let line = line.expect("a log line says why");
    assert!(
        line.contains("`currency` is now required") && line.contains("order.json"),
        "{line}"
    );
    let a = post(&s.events_url("orders"), &json!({"id": "r-3", "amount": 1})).await;
    assert!(
        a.body["results"][0]["offset"].is_u64(),
        "still version 2: {a:?}"
    );

    // With `compatibility = "none"` the same change applies.
    std::fs::write(dir.join("order.json"), &v2).unwrap();
    std::fs::write(dir.join("loose.json"), &v3).unwrap();
    s.signal("HUP").unwrap();
    assert!(reloads(&s, "ok", 2.0).await);
    let a = post(&s.events_url("loose"), &json!({"id": "r-4", "amount": 1})).await;
    assert_eq!(
        a.status,
        StatusCode::BAD_REQUEST,
        "loose is at version 3: {a:?}"
    );

    // A schema that does not compile is refused; version 2 stays.
    std::fs::write(dir.join("order.json"), r#"{"type": "no-such-type"}"#).unwrap();
    s.signal("HUP").unwrap();
    assert!(reloads(&s, "rejected", 2.0).await, "the reload was refused");
    let a = post(&s.events_url("orders"), &json!({"id": "r-5", "amount": -1})).await;
    assert!(
        a.body["results"][0]["offset"].is_u64(),
        "still version 2: {a:?}"
    );
    let log = read_log(&s.data_dir, "orders", &[]).unwrap();
    let ids: Vec<String> = log
        .iter()
        .map(|r| {
            serde_json::from_str::<Value>(r["value"].as_str().unwrap()).unwrap()["id"].to_string()
        })
        .collect();
    assert_eq!(ids, [r#""r-2""#, r#""r-3""#, r#""r-5""#]);

    // check-config names the broken schema, and checks `previous` versions in order.
    let check = |config: &std::path::Path| {
        let out = std::process::Command::new(sluice_tests::binary())
            .arg("check-config")
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = check(s.config_path());
    assert!(!ok);
    assert!(
        err.contains("order.json") && err.contains("not a valid JSON Schema"),
        "{err}"
    );
    std::fs::write(dir.join("v1.json"), ORDER_V1).unwrap();
    std::fs::write(dir.join("v2.json"), &v2).unwrap();
    std::fs::write(dir.join("v3.json"), &v3).unwrap();
    let history = dir.join("history.toml");
    let d = dir.display();
    std::fs::write(
        &history,
        format!("[schemas.orders]\nvalue = \"{d}/v2.json\"\nprevious = [\"{d}/v1.json\"]\n"),
    )
    .unwrap();
    let (ok, err) = check(&history);
    assert!(ok, "{err}");
    std::fs::write(&history, format!("[schemas.orders]\nvalue = \"{d}/v3.json\"\nprevious = [\"{d}/v1.json\", \"{d}/v2.json\"]\n")).unwrap();
    let (ok, err) = check(&history);
    assert!(
        !ok && err.contains("v3.json") && err.contains("v2.json") && err.contains("currency"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_checked_when_the_stream_has_a_key_schema() {
    let Setup { s, _tmp: _keep, .. } = start();
    // Keys are JSON when checked: the key `"acct-1"` is the JSON string acct-1.
    let a = post(
        &s.events_url("keyed"),
        &json!([
            {"value": {"id": "k-1", "amount": 1}, "key": "\"acct-1\""},
            {"value": {"id": "k-2", "amount": 1}, "key": "\"someone\""},
            {"value": {"id": "k-3", "amount": 1}},
        ]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let r = &a.body["results"];
    assert!(r[0]["offset"].is_u64(), "{a:?}");
    let m = r[1]["error"]["message"].as_str().unwrap();
    assert!(m.contains("key:") && m.contains("pattern"), "{m}");
    // No key where one is required by a key schema: not JSON.
    assert!(
        r[2]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not_json"),
        "{a:?}"
    );
    assert_eq!(read_log(&s.data_dir, "keyed", &[]).unwrap().len(), 1);
}
