//! Schemas beyond JSON Schema (docs/schemas.md) on the real binary: Avro streams take JSON on
//! every protocol and store Avro binary (decoded here by the reference implementation,
//! `apache-avro`, not by Sluice's own code); privacy rules pseudonymise fields before they are
//! stored; a Schema Registry (the stand-in of `sluice_tests::registry`, over TLS with Basic
//! auth) supplies versions, wire-format binary is checked against its id, and an outage is
//! served from the last good version — also after a restart, from the disk cache; local files
//! evolve only under the stream's compatibility rule.

use std::collections::HashMap;
use std::time::Duration;

use apache_avro::types::Value as Avro;
use base64::Engine as _;
use futures_util::SinkExt;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::http::{Answer, ws_answers};
use sluice_tests::mqtt::v5_pubacks;
use sluice_tests::pki::Ca;
use sluice_tests::registry::SchemaRegistry;
use sluice_tests::{Sluice, metric_or_zero, read_log, wait_until};
use tokio_tungstenite::tungstenite::Message;

const READING: &str = r#"{"type": "record", "name": "Reading", "namespace": "acme",
  "fields": [
    {"name": "device", "type": "string"},
    {"name": "temp", "type": "double"},
    {"name": "unit", "type": {"type": "enum", "name": "Unit", "symbols": ["C", "F"]}, "default": "C"},
    {"name": "owner", "type": ["null", "string"], "default": null}
  ]}"#;

const HMAC_KEY: &str = "0123456789abcdef0123456789abcdef";

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(30))
}

async fn post(url: &str, body: &Value) -> Answer {
    Answer::of(client().post(url).json(body)).await
}

/// A stored value's bytes, however `sluice log read` printed them.
fn value_bytes(r: &Value) -> Vec<u8> {
    let v = r["value"].as_str().unwrap();
    if r["value_encoding"] == "base64" {
        base64::engine::general_purpose::STANDARD.decode(v).unwrap()
    } else {
        v.as_bytes().to_vec()
    }
}

/// Decodes plain Avro binary with apache-avro into field name → value.
fn decode(schema: &str, bytes: &[u8]) -> HashMap<String, Avro> {
    let schema = apache_avro::Schema::parse_str(schema).unwrap();
    let mut r = bytes;
    let v = apache_avro::from_avro_datum(&schema, &mut r, None).unwrap();
    assert!(r.is_empty(), "one datum, nothing after it");
    match v {
        Avro::Record(fields) => fields.into_iter().collect(),
        other => panic!("{other:?}"),
    }
}

fn string(v: &Avro) -> String {
    match v {
        Avro::String(s) => s.clone(),
        Avro::Union(_, b) => string(b),
        other => panic!("not a string: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_streams_take_json_on_every_protocol_and_store_binary_with_privacy_applied() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("reading.avsc"), READING).unwrap();
    let toml = format!(
        r#"
[privacy]
hmac_key_id = "k1"
hmac_key = "{HMAC_KEY}"

[schemas.readings]
format = "avro"
value = "{d}/reading.avsc"
privacy = [{{ field = "/owner", action = "hmac" }}]

[schemas.audits]
format = "avro"
value = "{d}/reading.avsc"
on_invalid = "dead_letter"
"#,
        d = d.display()
    );
    let s = Sluice::start(&d.join("data"), &toml).unwrap();

    // HTTP: the invalid event in the middle is refused with its field path and rule.
    let a = post(
        &s.events_url("readings"),
        &json!([
            {"device": "h-1", "temp": 21.5, "owner": "ann@example.com"},
            {"device": "h-2", "temp": "hot"},
            {"device": "h-3", "temp": 70, "unit": "F"},
            {"device": "h-4", "temp": 1, "unit": "K"},
        ]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let r = a.body["results"].as_array().unwrap();
    assert!(r[0]["offset"].is_u64() && r[2]["offset"].is_u64(), "{a:?}");
    let m = r[1]["error"]["message"].as_str().unwrap();
    assert!(m.contains("/temp") && m.contains("(type)"), "{m}");
    let m = r[3]["error"]["message"].as_str().unwrap();
    assert!(m.contains("/unit") && m.contains("(enum)"), "{m}");

    // gRPC, WebSocket and MQTT 5 (and HTTP again): a valid event and one with a field the
    // record does not have, named in each protocol's answer.
    let why = every_protocol(
        &s,
        "readings",
        json!({"device": "p-1", "temp": 3, "owner": "bob"}),
        json!({"device": "p-2", "temp": 1, "humidity": 3}),
    )
    .await;
    for w in &why[..3] {
        assert!(
            w.contains("/humidity") && w.contains("unknown_field"),
            "{why:?}"
        );
    }
    assert_eq!(why[3], "PayloadFormatInvalid");

    // Binary on a stream whose schema is a local file: there is no id to check it against.
    let a = Answer::of(
        client()
            .post(s.events_url("readings"))
            .header("content-type", "application/octet-stream")
            .body(vec![0u8, 0, 0, 0, 7, 6, b'a', b'b', b'c']),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown_schema"),
        "{a:?}"
    );

    // Stored: Avro binary the reference implementation decodes, the owner pseudonymised.
    let log = read_log(&s.data_dir, "readings", &[]).unwrap();
    let decoded: Vec<HashMap<String, Avro>> = log
        .iter()
        .map(|r| decode(READING, &value_bytes(r)))
        .collect();
    let devices: Vec<String> = decoded.iter().map(|f| string(&f["device"])).collect();
    assert_eq!(
        devices,
        ["h-1", "h-3", "p-1", "p-1", "p-1", "p-1"],
        "{log:#?}"
    );
    assert_eq!(decoded[1]["unit"], Avro::Enum(1, "F".into()));
    assert_eq!(decoded[1]["temp"], Avro::Double(70.0));
    let owner = string(&decoded[0]["owner"]);
    assert!(
        owner.starts_with("hmac-sha256:k1:") && !owner.contains("ann"),
        "{owner}"
    );
    // The hash is HMAC-SHA256 of the value under the configured key: a consumer holding the
    // key can join on it.
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HMAC_KEY.as_bytes());
    let want = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(ring::hmac::sign(&key, b"ann@example.com").as_ref());
    assert_eq!(owner, format!("hmac-sha256:k1:{want}"));
    assert_eq!(decoded[1]["owner"], Avro::Union(0, Box::new(Avro::Null)));
    assert_eq!(log[0]["headers"]["sluice-privacy"], "/owner=hmac:k1");
    assert!(
        log[1]["headers"].get("sluice-privacy").is_none(),
        "no owner, no rule applied"
    );
    for r in &log {
        assert!(
            r["headers"]["sluice-schema"]
                .as_str()
                .is_some_and(|s| s.starts_with("reading.avsc@")),
            "{r}"
        );
    }

    // Dead-letter: the original JSON, and why.
    let a = post(
        &s.events_url("audits"),
        &json!([{"device": "a-1", "temp": 1}, {"device": "a-2", "temp": "x"}]),
    )
    .await;
    assert_eq!(
        a.body["results"][1]["dead_letter"]["stream"], "audits.dlq",
        "{a:?}"
    );
    let dlq = read_log(&s.data_dir, "audits.dlq", &[]).unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0]["value"], r#"{"device":"a-2","temp":"x"}"#);
    assert_eq!(dlq[0]["headers"]["sluice-dead-letter-path"], "/temp");
    assert_eq!(dlq[0]["headers"]["sluice-dead-letter-rule"], "type");
    let text = s.metrics().await;
    assert_eq!(
        metric_or_zero(
            &text,
            "sluice_events_invalid_total",
            r#"stream="readings",reason="unknown_schema""#
        ),
        1.0
    );
}

/// The wire format: magic byte 0, the schema id big-endian, the Avro datum.
fn wire(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(datum);
    v
}

fn avro_datum(schema: &str, fields: Vec<(&str, Avro)>) -> Vec<u8> {
    let schema = apache_avro::Schema::parse_str(schema).unwrap();
    let record = Avro::Record(
        fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    );
    apache_avro::to_avro_datum(&schema, record).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_versions_are_followed_checked_by_id_and_served_through_an_outage() {
    let ca = Ca::new("registry-ca").unwrap();
    let reg = SchemaRegistry::start(&ca, "sr-user", "sr-pass")
        .await
        .unwrap();
    let v1 = r#"{"type":"record","name":"Click","fields":[{"name":"page","type":"string"}]}"#;
    let v2 = r#"{"type":"record","name":"Click","fields":[{"name":"page","type":"string"},{"name":"ms","type":"long","default":0}]}"#;
    let v3 = r#"{"type":"record","name":"Click","fields":[{"name":"page","type":"string"},{"name":"ms","type":"long","default":0},{"name":"ref","type":["null","string"],"default":null}]}"#;
    let other = reg.register("orders-value", r#""string""#, None);
    let id1 = reg.register("clicks-value", v1, None);
    let id2 = reg.register("clicks-value", v2, None);

    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca_file = sluice_tests::pki::write(d, "ca.pem", &ca.cert_pem()).unwrap();
    let toml = |password: &str| {
        format!(
            r#"
[schema_registry]
url = "{url}"
username = "sr-user"
password = "{password}"
ca_file = "{ca}"
refresh_ms = 200
timeout_ms = 2000

[schemas.clicks]
format = "avro"
registry = true

[schemas.pinned]
format = "avro"
subject = "clicks-value"
version = 1
"#,
            url = reg.url(),
            ca = ca_file.display()
        )
    };
    let data = d.join("data");
    let mut s = Sluice::start(&data, &toml("sr-pass")).unwrap();

    // JSON is checked against the latest version and stored in the wire format with its id.
    let a = post(&s.events_url("clicks"), &json!({"page": "/a", "ms": 5})).await;
    assert!(a.body["results"][0]["offset"].is_u64(), "{a:?}");
    // Binary in the wire format naming version 1's id: checked against version 1.
    let b1 = wire(
        id1,
        &avro_datum(v1, vec![("page", Avro::String("/b".into()))]),
    );
    let raw = |body: Vec<u8>| {
        Answer::of(
            client()
                .post(s.events_url("clicks"))
                .header("content-type", "application/octet-stream")
                .body(body),
        )
    };
    let a = raw(b1.clone()).await;
    assert!(a.body["results"][0]["offset"].is_u64(), "{a:?}");
    // An id of another subject, a corrupt datum: refused, naming why.
    let a = raw(wire(
        other,
        &avro_datum(v1, vec![("page", Avro::String("/c".into()))]),
    ))
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown_schema"),
        "{a:?}"
    );
    let a = raw(wire(id2, &[0x08, b'/'])).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not_avro"),
        "{a:?}"
    );
    // The pinned stream checks against version 1: `ms` is unknown there.
    let a = post(&s.events_url("pinned"), &json!({"page": "/p", "ms": 5})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"].as_str().unwrap().contains("/ms"),
        "{a:?}"
    );

    let log = read_log(&data, "clicks", &[]).unwrap();
    assert_eq!(log.len(), 2);
    let first = value_bytes(&log[0]);
    assert_eq!(first[0], 0);
    assert_eq!(u32::from_be_bytes(first[1..5].try_into().unwrap()), id2);
    let f = decode(v2, &first[5..]);
    assert_eq!(
        (string(&f["page"]), &f["ms"]),
        ("/a".into(), &Avro::Long(5))
    );
    assert_eq!(
        log[0]["headers"]["sluice-schema"],
        format!("subject=clicks-value;version=2;id={id2}")
    );
    assert_eq!(
        value_bytes(&log[1]),
        b1,
        "wire-format binary is stored as sent"
    );
    assert_eq!(
        log[1]["headers"]["sluice-schema"],
        format!("subject=clicks-value;version=1;id={id1}")
    );

    // A new version is followed without a restart.
    let id3 = reg.register("clicks-value", v3, None);
    let followed = wait_until(Duration::from_secs(20), || async {
        post(
            &s.events_url("clicks"),
            &json!({"page": "/v3", "ref": {"string": "x"}}),
        )
        .await
        .body["results"][0]["offset"]
            .is_u64()
    })
    .await;
    assert!(followed, "version 3 applies");
    // Refreshes ask for the latest version and the version list, not again for every version
    // they already know: version 2 was fetched once, as the latest.
    let list = "/subjects/clicks-value/versions";
    let start = reg.hits_of(list);
    let refreshed = wait_until(Duration::from_secs(20), || async {
        reg.hits_of(list) >= start + 10
    })
    .await;
    assert!(refreshed, "ten more refreshes");
    assert_eq!(
        reg.hits_of("/subjects/clicks-value/versions/2"),
        0,
        "known versions are not fetched again"
    );

    // The registry goes away: the last good version keeps serving, and the outage shows.
    reg.down();
    let stale = wait_until(Duration::from_secs(20), || async {
        metric_or_zero(
            &s.metrics().await,
            "sluice_schema_registry_stale_subjects",
            "",
        ) >= 1.0
    })
    .await;
    assert!(stale, "the failed refresh is visible");
    let a = post(
        &s.events_url("clicks"),
        &json!({"page": "/down", "ref": null}),
    )
    .await;
    assert!(
        a.body["results"][0]["offset"].is_u64(),
        "served from the last good version: {a:?}"
    );
    let a = post(
        &s.events_url("clicks"),
        &json!({"page": "/down", "nope": 1}),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::BAD_REQUEST,
        "still checked while the registry is down: {a:?}"
    );

    // A restart while it is down serves from the disk cache.
    s.kill().unwrap();
    let mut s = Sluice::start(&data, &toml("sr-pass")).unwrap();
    let a = post(&s.events_url("clicks"), &json!({"page": "/restarted"})).await;
    assert!(a.body["results"][0]["offset"].is_u64(), "{a:?}");
    let last = read_log(&data, "clicks", &[]).unwrap().pop().unwrap();
    assert_eq!(
        last["headers"]["sluice-schema"],
        format!("subject=clicks-value;version=3;id={id3}")
    );

    // Without a cache and without the registry, events are refused as retryable, never
    // accepted unchecked.
    s.kill().unwrap();
    let fresh = d.join("fresh");
    let s2 = Sluice::start(&fresh, &toml("sr-pass")).unwrap();
    let a = post(&s2.events_url("clicks"), &json!({"page": "/x"})).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("clicks-value"),
        "{a:?}"
    );
    // The registry comes back: served again.
    reg.up().await.unwrap();
    let back = wait_until(Duration::from_secs(20), || async {
        post(&s2.events_url("clicks"), &json!({"page": "/back"}))
            .await
            .body["results"][0]["offset"]
            .is_u64()
    })
    .await;
    assert!(back, "served once the registry answers");
    drop(s2);

    // Wrong credentials: the registry answers 401, the subject is never fetched, nothing is
    // accepted unchecked.
    let bad = d.join("bad");
    let s3 = Sluice::start(&bad, &toml("wrong")).unwrap();
    let a = post(&s3.events_url("clicks"), &json!({"page": "/x"})).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{a:?}");
    assert!(
        a.body["error"]["message"].as_str().unwrap().contains("401"),
        "{a:?}"
    );
    assert!(reg.hits() > 0);
    let text = s3.metrics().await;
    assert!(
        metric_or_zero(
            &text,
            "sluice_schema_registry_fetches_total",
            r#"result="error""#
        ) >= 1.0
    );
    drop(s3);
    // Bearer auth instead of Basic.
    let bearer = d.join("bearer");
    let s4 = Sluice::start(
        &bearer,
        &toml("x").replace(
            "username = \"sr-user\"\npassword = \"x\"",
            "bearer_token = \"sr-pass\"",
        ),
    )
    .unwrap();
    let a = post(&s4.events_url("clicks"), &json!({"page": "/bearer"})).await;
    assert!(a.body["results"][0]["offset"].is_u64(), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_privacy_rules_drop_mask_and_hash_before_storing() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(
        d.join("user.json"),
        r#"{"type":"object","required":["id","email"],"properties":{"id":{"type":"string"},"email":{"type":"string","format":"email"}}}"#,
    )
    .unwrap();
    let toml = format!(
        r#"
[privacy]
hmac_key_id = "2026-12"
hmac_key = "{HMAC_KEY}"

[schemas.signups]
value = "{d}/user.json"
privacy = [
  {{ field = "/email", action = "hmac" }},
  {{ field = "/cards/*/number", action = "mask", keep_last = 4 }},
  {{ field = "/ssn", action = "drop" }},
]
"#,
        d = d.display()
    );
    let s = Sluice::start(&d.join("data"), &toml).unwrap();
    let a = post(
        &s.events_url("signups"),
        &json!([
            {"id": "u-1", "email": "ann@example.com", "ssn": "123-45-6789",
             "cards": [{"number": "4111111111111111"}, {"number": "5500000000000004"}]},
            {"id": "u-2", "email": 7},
        ]),
    )
    .await;
    assert!(a.body["results"][0]["offset"].is_u64(), "{a:?}");
    // Validation comes first: the invalid event is refused for what it sent.
    assert!(
        a.body["results"][1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/email"),
        "{a:?}"
    );
    let log = read_log(&s.data_dir, "signups", &["--json-values"]).unwrap();
    assert_eq!(log.len(), 1);
    let v = &log[0]["value"];
    assert_eq!(v["id"], "u-1");
    assert!(v.get("ssn").is_none(), "{v}");
    assert_eq!(v["cards"][0]["number"], "************1111");
    assert_eq!(v["cards"][1]["number"], "************0004");
    let e = v["email"].as_str().unwrap();
    assert!(
        e.starts_with("hmac-sha256:2026-12:") && !e.contains("ann"),
        "{e}"
    );
    assert_eq!(
        log[0]["headers"]["sluice-privacy"],
        "/email=hmac:2026-12,/cards/*/number=mask,/ssn=drop"
    );
    // The header is Sluice's: a producer cannot claim rules were applied.
    let a = post(
        &s.events_url("signups"),
        &json!({"value": {"id": "u-3", "email": "x@y.z"}, "headers": {"sluice-privacy": "/email=hmac"}}),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    // A change to the schema file alone is picked up like a change to the config file (the
    // watcher, every 2 s by default): version 2 no longer requires an email.
    std::fs::write(
        d.join("user.json"),
        r#"{"type":"object","required":["id"],"properties":{"id":{"type":"string"},"email":{"type":"string"}}}"#,
    )
    .unwrap();
    let v2 = wait_until(Duration::from_secs(30), || async {
        post(&s.events_url("signups"), &json!({"id": "u-4"}))
            .await
            .body["results"][0]["offset"]
            .is_u64()
    })
    .await;
    assert!(v2, "the new schema file applies without a signal");
    // Rotating the key: a new id and key in the config; new hashes name the new id.
    std::fs::write(
        s.config_path(),
        toml.replace("2026-12", "2027-01")
            .replace(HMAC_KEY, "fedcba9876543210fedcba9876543210"),
    )
    .unwrap();
    let rotated = wait_until(Duration::from_secs(30), || async {
        post(
            &s.events_url("signups"),
            &json!({"id": "u-5", "email": "ann@example.com"}),
        )
        .await;
        let log = read_log(&s.data_dir, "signups", &["--json-values"]).unwrap();
        log.last().unwrap()["value"]["email"]
            .as_str()
            .is_some_and(|e| e.starts_with("hmac-sha256:2027-01:"))
    })
    .await;
    assert!(rotated, "hashes name the new key");
    let log = read_log(&s.data_dir, "signups", &["--json-values"]).unwrap();
    let last = log.last().unwrap()["value"]["email"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(
        last.rsplit(':').next(),
        e.rsplit(':').next(),
        "another key, another hash"
    );

    // check-config refuses an hmac rule without a key, and a short key.
    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        toml.replace(
            &format!("hmac_key = \"{HMAC_KEY}\""),
            "hmac_key = \"short\"",
        ),
    )
    .unwrap();
    let out = std::process::Command::new(sluice_tests::binary())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("privacy.hmac_key"),
        "{out:?}"
    );
}

const PROTO: &str = r#"syntax = "proto3";
package acme;
message Order {
  string id = 1;
  int64 amount = 2;
  repeated Line lines = 3;
  string email = 4;
  message Line { string sku = 1; int32 qty = 2; }
}
message Ping { string from = 1; }
"#;

/// Decodes a Protobuf message with prost-reflect (the descriptor compiled here by protox).
fn decode_proto(message: &str, bytes: &[u8]) -> Value {
    let mut resolver = protox::file::ChainFileResolver::new();
    struct One;
    impl protox::file::FileResolver for One {
        fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
            protox::file::File::from_source(name, PROTO)
        }
    }
    resolver.add(One);
    let mut c = protox::Compiler::with_file_resolver(resolver);
    c.open_file("t.proto").unwrap();
    let desc = c.descriptor_pool().get_message_by_name(message).unwrap();
    let m = prost_reflect::DynamicMessage::decode(desc, bytes).unwrap();
    serde_json::to_value(&m).unwrap()
}

/// One valid and one invalid event on each of HTTP, gRPC, WebSocket and MQTT 5: the invalid
/// one's answers (HTTP message, gRPC message, WebSocket message, MQTT reason code).
async fn every_protocol(s: &Sluice, stream: &str, valid: Value, invalid: Value) -> Vec<String> {
    let mut why = Vec::new();
    let a = post(&s.events_url(stream), &json!([valid, invalid])).await;
    assert!(a.body["results"][0]["offset"].is_u64(), "{a:?}");
    why.push(
        a.body["results"][1]["error"]["message"]
            .as_str()
            .unwrap()
            .to_string(),
    );

    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let ev = |v: &Value| pb::Event {
        value: v.to_string().into_bytes().into(),
        ..Default::default()
    };
    let out = IngestClient::new(ch)
        .publish(pb::PublishRequest {
            stream: stream.into(),
            events: vec![ev(&valid), ev(&invalid)],
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
        Some(pb::event_result::Result::Error(e)) => why.push(e.message.clone()),
        other => panic!("{other:?}"),
    }

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/{stream}/ws", s.http))
            .await
            .unwrap();
    ws.send(Message::text(json!([valid, invalid]).to_string()))
        .await
        .unwrap();
    let mut acks = ws_answers(&mut ws, 2).await;
    acks.sort_by_key(|a| a["index"].as_u64());
    assert!(acks[0]["offset"].is_u64(), "{acks:?}");
    why.push(acks[1]["error"]["message"].as_str().unwrap().to_string());

    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    let addr = s.mqtt.unwrap();
    let mut o =
        rumqttc::v5::MqttOptions::new(format!("dev-{stream}"), addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    for payload in [valid.to_string(), invalid.to_string()] {
        c.publish(format!("{stream}/dev"), QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    let acks = v5_pubacks(&mut el, 2).await;
    assert_eq!(acks[0], PubAckReason::Success);
    why.push(format!("{:?}", acks[1]));
    why
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_streams_take_json_on_every_protocol_and_wire_format_from_the_registry() {
    let ca = Ca::new("registry-ca").unwrap();
    let reg = SchemaRegistry::start(&ca, "u", "p").await.unwrap();
    let id = reg.register("pings-value", PROTO, Some("PROTOBUF"));
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("order.proto"), PROTO).unwrap();
    let ca_file = sluice_tests::pki::write(d, "ca.pem", &ca.cert_pem()).unwrap();
    let toml = format!(
        r#"
[privacy]
hmac_key_id = "k1"
hmac_key = "{HMAC_KEY}"

[schema_registry]
url = "{url}"
username = "u"
password = "p"
ca_file = "{ca}"

[schemas.orders]
format = "protobuf"
value = "{d}/order.proto"
message = "acme.Order"
privacy = [{{ field = "/email", action = "mask", keep_last = 4 }}]

[schemas.pings]
format = "protobuf"
registry = true
message = "acme.Ping"
"#,
        url = reg.url(),
        ca = ca_file.display(),
        d = d.display()
    );
    let s = Sluice::start(&d.join("data"), &toml).unwrap();

    // A local .proto: JSON (the proto3 mapping) on every protocol; the invalid event names
    // its field.
    let why = every_protocol(
        &s,
        "orders",
        json!({"id": "o-1", "amount": "12", "lines": [{"sku": "a", "qty": 2}], "email": "ann@example.com"}),
        json!({"id": "o-2", "lines": [{"sku": "b", "qty": "two"}]}),
    )
    .await;
    for w in &why[..3] {
        assert!(w.contains("/lines/0/qty"), "{why:?}");
    }
    assert_eq!(why[3], "PayloadFormatInvalid");
    let log = read_log(&s.data_dir, "orders", &[]).unwrap();
    assert_eq!(log.len(), 4);
    for r in &log {
        let m = decode_proto("acme.Order", &value_bytes(r));
        assert_eq!(m["id"], "o-1");
        assert_eq!(m["amount"], "12");
        assert_eq!(m["lines"][0]["qty"], 2);
        assert_eq!(m["email"], "***********.com", "masked before it was stored");
        assert_eq!(r["headers"]["sluice-privacy"], "/email=mask");
        assert!(
            r["headers"]["sluice-schema"]
                .as_str()
                .unwrap()
                .starts_with("order.proto@")
        );
    }

    // From the registry: JSON stored in the wire format with the id and the message index
    // of acme.Ping (the file's second message: indexes [1], written as 02 02).
    let a = post(&s.events_url("pings"), &json!({"from": "x"})).await;
    assert!(a.body["results"][0]["offset"].is_u64(), "{a:?}");
    let mut wire_order = vec![0u8];
    wire_order.extend_from_slice(&id.to_be_bytes());
    wire_order.push(0); // indexes [0]: acme.Order
    wire_order.extend_from_slice(&[0x0a, 0x02, b'o', b'9']); // id = "o9"
    let raw = |body: Vec<u8>| {
        Answer::of(
            client()
                .post(s.events_url("pings"))
                .header("content-type", "application/octet-stream")
                .body(body),
        )
    };
    let a = raw(wire_order.clone()).await;
    assert!(
        a.body["results"][0]["offset"].is_u64(),
        "a message of the subject's file: {a:?}"
    );
    let mut bad = wire_order.clone();
    bad.truncate(bad.len() - 1); // the string ends early
    let a = raw(bad).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not_protobuf"),
        "{a:?}"
    );
    let mut unknown_index = wire_order[..5].to_vec();
    unknown_index.extend_from_slice(&[2, 18, 0x0a, 0x00]); // indexes [9]
    let a = raw(unknown_index).await;
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown_schema"),
        "{a:?}"
    );

    let log = read_log(&s.data_dir, "pings", &[]).unwrap();
    assert_eq!(log.len(), 2);
    let first = value_bytes(&log[0]);
    assert_eq!(first[0], 0);
    assert_eq!(u32::from_be_bytes(first[1..5].try_into().unwrap()), id);
    assert_eq!(&first[5..7], &[2, 2], "message indexes [1]");
    assert_eq!(decode_proto("acme.Ping", &first[7..])["from"], "x");
    assert_eq!(value_bytes(&log[1]), wire_order, "binary is stored as sent");
    assert_eq!(
        log[0]["headers"]["sluice-schema"],
        format!("subject=pings-value;version=1;id={id}")
    );
}
