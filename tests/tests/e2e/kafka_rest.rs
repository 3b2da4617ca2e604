//! Kafka REST Proxy v3 produce compatibility (docs/http.md "Kafka REST v3") on the real binary:
//! the cluster and topic listings, one record per request with the v3 request and response
//! shapes (key/value types JSON, BINARY, STRING; base64 headers; partition; timestamp), the
//! streaming mode (records in one chunked request, each answered as it is taken, before the
//! request ends), v3 error bodies, Basic authentication with an API key, and the same limits
//! as `/v1`.

use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::{Sluice, api_key_entry, read_log};

const KEY: &str = "shop.s3cret";

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(30))
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

async fn json_of(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

fn config() -> String {
    format!(
        "[http.auth]\nallow_anonymous = false\n[streams.declare.orders]\npartitions = 3\nmax_events_per_request = 2\n{}{}",
        api_key_entry(KEY, "shop", &["orders"]),
        api_key_entry("other.x", "other", &["misc"]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confluent_v3_produce_requests_work_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config()).unwrap();
    let base = format!("http://{}", s.http);
    let c = client();
    // Basic authentication with the key's id and secret, as Confluent clients send it.
    let get = |path: &str| {
        c.get(format!("{base}{path}"))
            .basic_auth("shop", Some("s3cret"))
            .send()
    };

    // The listing clients call first.
    let (status, v) = json_of(get("/v3/clusters").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["kind"], "KafkaClusterList");
    assert_eq!(v["data"][0]["cluster_id"], "sluice");
    let (status, v) = json_of(get("/v3/clusters/sluice").await.unwrap()).await;
    assert_eq!(
        (status, &v["cluster_id"]),
        (StatusCode::OK, &json!("sluice"))
    );
    let (status, v) = json_of(get("/v3/clusters/sluice/topics/orders").await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["partitions_count"], 3, "{v}");
    let (status, v) = json_of(get("/v3/clusters/other/topics").await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(v["error_code"], 404, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("Cluster other not found")
    );

    // One record: the v3 request and answer shapes.
    let url = format!("{base}/v3/clusters/sluice/topics/orders/records");
    let post = |body: Value| {
        c.post(&url)
            .basic_auth("shop", Some("s3cret"))
            .json(&body)
            .send()
    };
    let (status, v) = json_of(
        post(json!({
            "partition_id": 2,
            "headers": [{"name": "trace", "value": b64(b"abc")}, {"name": "empty", "value": null}],
            "key": {"type": "STRING", "data": "customer-42"},
            "value": {"type": "JSON", "data": {"order": 17}},
            "timestamp": "2026-01-02T03:04:05.678Z"
        }))
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["error_code"], 200, "{v}");
    assert_eq!(v["cluster_id"], "sluice");
    assert_eq!(v["topic_name"], "orders");
    assert_eq!(v["partition_id"], 2);
    assert!(v["offset"].is_u64(), "{v}");
    assert_eq!(v["timestamp"], "2026-01-02T03:04:05.678Z");
    assert_eq!(v["key"], json!({"type": "STRING", "size": 11}));
    assert_eq!(v["value"], json!({"type": "JSON", "size": 12}));
    let (status, v) = json_of(
        post(json!({"value": {"type": "BINARY", "data": b64(&[0xff, 0, 1])}}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["value"], json!({"type": "BINARY", "size": 3}));
    assert_eq!(v["key"], Value::Null);

    let log = read_log(&s.data_dir, "orders", &["--json-values"]).unwrap();
    assert_eq!(log.len(), 2, "{log:#?}");
    let first = log.iter().find(|r| r["key"] == "customer-42").unwrap();
    assert_eq!(first["partition"], 2);
    assert_eq!(first["value"], json!({"order": 17}));
    assert_eq!(first["headers"]["trace"], "abc");
    assert_eq!(first["headers"]["empty"], "");
    assert_eq!(first["timestamp_ms"], 1_767_323_045_678i64);
    assert_eq!(first["headers"]["sluice-protocol"], "http");
    let bin = log.iter().find(|r| r["key"].is_null()).unwrap();
    assert_eq!(bin["value_encoding"], "base64");
    assert_eq!(bin["headers"]["content-type"], "application/octet-stream");

    // Errors are v3 error bodies with the HTTP status as their code.
    for (body, status, want) in [
        (
            json!({"value": {"type": "AVRO", "data": {}}}),
            400,
            "not supported",
        ),
        (
            json!({"value": {"type": "JSON", "data": 1, "schema_id": 3}}),
            400,
            "Schema Registry",
        ),
        (
            json!({"value": {"data": 1}, "partition_id": 7}),
            400,
            "partition 7 does not exist",
        ),
        (
            json!({"value": {"data": 1}, "surprise": 1}),
            400,
            "unknown field",
        ),
        (
            json!({"headers": [{"name": "sluice-principal", "value": "YQ=="}]}),
            400,
            "reserved",
        ),
    ] {
        let (got, v) = json_of(post(body.clone()).await.unwrap()).await;
        assert_eq!(got.as_u16(), status, "{body} → {v}");
        assert_eq!(v["error_code"], status, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(want),
            "{body} → {v}"
        );
    }
    // The same authentication and authorization as /v1.
    let r = c
        .post(&url)
        .json(&json!({"value": {"data": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = c
        .post(&url)
        .basic_auth("shop", Some("wrong"))
        .json(&json!({"value": {"data": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, v) = json_of(
        c.post(&url)
            .basic_auth("other", Some("x"))
            .json(&json!({"value": {"data": 1}}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, &v["error_code"]),
        (StatusCode::FORBIDDEN, &json!(403))
    );
    // Nothing refused was stored.
    assert_eq!(read_log(&s.data_dir, "orders", &[]).unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streaming_mode_answers_each_record_as_it_is_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config()).unwrap();
    let url = format!("http://{}/v3/clusters/sluice/topics/orders/records", s.http);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let record = |n: u32| {
        json!({"key": {"type": "STRING", "data": format!("k{n}")}, "value": {"data": {"n": n}}})
            .to_string()
    };
    tx.send(Ok(record(0).into_bytes())).await.unwrap();
    let mut resp = client()
        .post(&url)
        .header("authorization", format!("Basic {}", b64(b"shop:s3cret")))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut lines: Vec<Value> = Vec::new();
    let mut pending = String::new();
    // Reads answers until `n` arrived.
    async fn until(
        resp: &mut reqwest::Response,
        pending: &mut String,
        lines: &mut Vec<Value>,
        n: usize,
    ) {
        while lines.len() < n {
            let chunk = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
                .await
                .expect("an answer within 20 s")
                .unwrap()
                .expect("the answer goes on");
            pending.push_str(std::str::from_utf8(&chunk).unwrap());
            while let Some(at) = pending.find('\n') {
                let line: String = pending.drain(..=at).collect();
                lines.push(serde_json::from_str(line.trim()).unwrap());
            }
        }
    }
    // The first record is answered while the request is still open.
    until(&mut resp, &mut pending, &mut lines, 1).await;
    assert_eq!(lines[0]["error_code"], 200, "{lines:?}");
    // Three more in one chunk (a batch larger than max_events_per_request = 2 is split), one
    // of them invalid, then one split across two chunks.
    let chunk = format!(
        "{}\n{}{}",
        record(1),
        json!({"value": {"type": "AVRO", "data": 1}}),
        record(2)
    );
    tx.send(Ok(chunk.into_bytes())).await.unwrap();
    let r3 = record(3);
    let (a, b) = r3.split_at(10);
    tx.send(Ok(a.as_bytes().to_vec())).await.unwrap();
    until(&mut resp, &mut pending, &mut lines, 4).await;
    tx.send(Ok(b.as_bytes().to_vec())).await.unwrap();
    drop(tx);
    until(&mut resp, &mut pending, &mut lines, 5).await;
    let codes: Vec<_> = lines
        .iter()
        .map(|l| l["error_code"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [200, 200, 400, 200, 200], "{lines:?}");
    assert!(
        resp.chunk().await.unwrap().is_none(),
        "the answer ends with the request"
    );
    let log = read_log(&s.data_dir, "orders", &["--json-values"]).unwrap();
    let mut ns: Vec<i64> = log
        .iter()
        .map(|r| r["value"]["n"].as_i64().unwrap())
        .collect();
    ns.sort();
    assert_eq!(ns, [0, 1, 2, 3]);

    // A stream that breaks off inside a record says so.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tx.send(Ok(b"{\"value\": {\"data\": ".to_vec()))
        .await
        .unwrap();
    drop(tx);
    let resp = client()
        .post(&url)
        .basic_auth("shop", Some("s3cret"))
        .body(reqwest::Body::wrap_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("ended inside a record"), "{text}");
}
