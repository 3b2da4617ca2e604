//! HTTP ingest against the real binary: every content type and encoding, every error status,
//! offsets read back through `sluice log read`, concurrency, ack modes, admin endpoints.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::{Sluice, metric, read_log, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(30))
}

async fn post(
    c: &reqwest::Client,
    url: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let r = c
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, v)
}

fn offsets(v: &Value) -> Vec<(u64, u64)> {
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["partition"].as_u64().unwrap(),
                r["offset"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[tokio::test]
async fn every_content_type_and_encoding_lands_in_the_log_as_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let c = client();
    let url = s.events_url("mixed");

    let (st, v) = post(
        &c,
        &url,
        "application/json",
        r#"{"value":{"temp":21.5},"key":"dev-1","id":"e-1","headers":{"site":"north"}}"#,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(offsets(&v), vec![(0, 0)]);

    let (st, v) = post(
        &c,
        &url,
        "application/json; charset=utf-8",
        r#"[1, "two", {"three":3}]"#,
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(offsets(&v), vec![(0, 1), (0, 2), (0, 3)]);

    let (st, v) = post(
        &c,
        &url,
        "application/x-ndjson",
        "{\"value\":4,\"key\":\"k4\"}\n5\n",
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(offsets(&v), vec![(0, 4), (0, 5)]);

    let r = c
        .post(&url)
        .header("content-type", "application/octet-stream")
        .header("sluice-key", "raw-key")
        .header("sluice-id", "raw-id")
        .body(vec![0u8, 159, 146, 150])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(gzip(br#"[{"value":"gz"}]"#))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let z = zstd::encode_all(&b"{\"value\":\"zs\"}\n"[..], 3).unwrap();
    let r = c
        .post(&url)
        .header("content-type", "application/x-ndjson")
        .header("content-encoding", "zstd")
        .body(z)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(offsets(&v), vec![(0, 8)]);

    let recs = s.read_log("mixed").unwrap();
    assert_eq!(recs.len(), 9);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["offset"], json!(i), "{r}");
        assert_eq!(r["stream"], "mixed");
        assert_eq!(r["headers"]["sluice-protocol"], "http");
    }
    assert_eq!(recs[0]["value"], r#"{"temp":21.5}"#);
    assert_eq!(recs[0]["key"], "dev-1");
    assert_eq!(recs[0]["id"], "e-1");
    assert_eq!(recs[0]["headers"]["site"], "north");
    assert_eq!(recs[0]["headers"]["content-type"], "application/json");
    assert_eq!(recs[1]["value"], "1");
    assert_eq!(recs[2]["value"], r#""two""#);
    assert_eq!(recs[3]["value"], r#"{"three":3}"#);
    assert_eq!(recs[4]["key"], "k4");
    assert_eq!(recs[5]["value"], "5");
    assert_eq!(recs[6]["value_encoding"], "base64");
    assert_eq!(recs[6]["value"], "AJ+Slg==");
    assert_eq!(recs[6]["key"], "raw-key");
    assert_eq!(recs[6]["id"], "raw-id");
    assert_eq!(
        recs[6]["headers"]["content-type"],
        "application/octet-stream"
    );
    assert_eq!(recs[7]["value"], r#""gz""#);
    assert_eq!(recs[8]["value"], r#""zs""#);
}

#[tokio::test]
async fn h2c_requests_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = c
        .post(s.events_url("h2"))
        .header("content-type", "application/json")
        .body("[1,2]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(offsets(&v), vec![(0, 0), (0, 1)]);
}

async fn expect_error(r: reqwest::Response, status: StatusCode, code: &str, needle: &str) -> Value {
    assert_eq!(r.status(), status);
    assert_eq!(r.headers().get("content-type").unwrap(), "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    v
}

#[tokio::test]
async fn every_error_status_names_what_was_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        r#"
        [streams]
        auto_create = false
        [streams.declare.small]
        max_body_bytes = 1000
        max_event_bytes = 100
        max_events_per_request = 5
        [streams.declare.open]
        "#,
    )
    .unwrap();
    let c = client();
    let json = "application/json";
    let big = format!("\"{}\"", "x".repeat(2000));
    let big_event = format!("[1, \"{}\"]", "x".repeat(200));
    // (stream, content type, body, status, code, what the message must name)
    let cases: Vec<(&str, &str, &str, StatusCode, &str, &str)> = vec![
        // 400: bad stream name, bad JSON with its position, a badly typed envelope member with
        // the event's index, a bad NDJSON line with its number.
        (
            "bad$name",
            json,
            "1",
            StatusCode::BAD_REQUEST,
            "malformed",
            "invalid stream name",
        ),
        (
            "open",
            json,
            "[1, 2,",
            StatusCode::BAD_REQUEST,
            "malformed",
            "line 1 column",
        ),
        (
            "open",
            json,
            r#"[{"value":1},{"value":2,"headers":[]}]"#,
            StatusCode::BAD_REQUEST,
            "malformed",
            "event 1: `headers` must be an object",
        ),
        (
            "open",
            "application/x-ndjson",
            "1\n{x\n",
            StatusCode::BAD_REQUEST,
            "malformed",
            "line 2",
        ),
        // 404: unknown stream when auto-create is off.
        (
            "nope",
            json,
            "1",
            StatusCode::NOT_FOUND,
            "stream_not_found",
            "`nope`",
        ),
        // 413: body, event and event-count limits.
        (
            "small",
            json,
            &big,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "limit for stream `small` is 1000",
        ),
        (
            "small",
            json,
            &big_event,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "event 1 has 202 bytes",
        ),
        (
            "small",
            json,
            "[1,2,3,4,5,6]",
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            "6 events",
        ),
    ];
    for (stream, ct, body, status, code, needle) in cases {
        let r = c
            .post(s.events_url(stream))
            .header("content-type", ct)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        expect_error(r, status, code, needle).await;
    }
    let r = c
        .post(s.events_url("open"))
        .header("content-type", json)
        .header("content-encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "malformed", "invalid gzip").await;

    // 404: unknown route; 405: wrong method.
    let r = c
        .get(format!("http://{}/v2/x", s.http))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "no_route", "/v2/x").await;
    let r = c.delete(s.events_url("open")).send().await.unwrap();
    assert_eq!(r.headers().get("allow").unwrap(), "GET, POST");
    expect_error(
        r,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "DELETE",
    )
    .await;

    // 413: decompression beyond the body limit.
    let bomb = gzip(&vec![b' '; 100_000]);
    let r = c
        .post(s.events_url("small"))
        .header("content-type", json)
        .header("content-encoding", "gzip")
        .body(bomb)
        .send()
        .await
        .unwrap();
    expect_error(
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        "decompressed",
    )
    .await;
    // A chunked body (no Content-Length) over the limit is cut off while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![b'1'; 600]), Ok(vec![b'1'; 600])];
    let stream = futures_util::stream::iter(chunks);
    let r = c
        .post(s.events_url("small"))
        .header("content-type", json)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    expect_error(
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        "exceeds the limit of 1000",
    )
    .await;

    // 415: unsupported content coding.
    let r = c
        .post(s.events_url("open"))
        .header("content-encoding", "br")
        .body("x")
        .send()
        .await
        .unwrap();
    expect_error(
        r,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        "br",
    )
    .await;

    // 411: HTTP/1.1 POST with neither Content-Length nor chunked encoding; 400 for an empty one.
    let resp = raw_request(
        s.http,
        "POST /v1/streams/open/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 411"), "{resp}");
    assert!(resp.contains("length_required"), "{resp}");
    let resp = raw_request(s.http, "POST /v1/streams/open/events HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("the request body is empty"), "{resp}");

    // Nothing of the above reached the log; the well-formed request still works afterwards.
    let (st, v) = post(&c, &s.events_url("open"), json, "[1]").await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(offsets(&v), vec![(0, 0)]);
    assert_eq!(s.read_log("open").unwrap().len(), 1);
    assert!(s.read_log("small").unwrap().is_empty());

    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_requests_total",
            r#"protocol="http",outcome="too_large""#
        ),
        5.0
    );
    assert_eq!(
        metric(
            &m,
            "sluice_requests_total",
            r#"protocol="http",outcome="malformed""#
        ),
        6.0
    );
    assert_eq!(
        metric(
            &m,
            "sluice_requests_total",
            r#"protocol="http",outcome="ok""#
        ),
        1.0
    );
}

async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tcp.read_to_string(&mut resp).await.unwrap();
    resp
}

#[tokio::test]
async fn a_slow_log_fills_the_in_flight_budget_and_gets_503_with_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        r#"
        [log]
        fault_append_delay_ms = 5000
        [limits]
        max_in_flight_bytes = 4096
        [streams.defaults]
        max_body_bytes = 4096
        max_event_bytes = 4096
        "#,
    )
    .unwrap();
    let c = client();
    // One request that fills the budget and waits on the slow log.
    let big = format!("\"{}\"", "x".repeat(4000));
    let first = tokio::spawn({
        let (c, url) = (c.clone(), s.events_url("slow"));
        async move { post(&c, &url, "application/json", big).await }
    });
    let filled = wait_until(Duration::from_secs(10), || async {
        metric(&s.metrics().await, "sluice_in_flight_bytes", "") > 4000.0
    })
    .await;
    assert!(filled, "the first request never showed up as in flight");
    // 4000 + 24 bytes are charged; 100 more do not fit in 4096.
    let r = c
        .post(s.events_url("slow"))
        .header("content-type", "application/json")
        .body(format!("[\"{}\"]", "y".repeat(98)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");
    let v = expect_error(
        r,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "in-flight budget",
    )
    .await;
    assert_eq!(v["error"]["retry_after_ms"], 1000);
    // The budget is held before a body is read: a request announcing 3000 bytes is refused
    // before it sends any of them.
    let resp = raw_request(
        s.http,
        "POST /v1/streams/slow/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("retry-after: 1"),
        "{resp}"
    );
    // The first request is still acked once the slow write completes, and the budget never
    // exceeded its configured size.
    let (st, v) = first.await.unwrap();
    assert_eq!(st, StatusCode::OK, "{v}");
    let m = s.metrics().await;
    assert_eq!(metric(&m, "sluice_in_flight_bytes", ""), 0.0);
    assert_eq!(metric(&m, "sluice_in_flight_budget_bytes", ""), 4096.0);
    assert_eq!(s.read_log("slow").unwrap().len(), 1);
}

#[tokio::test]
async fn concurrent_producers_get_contiguous_unique_offsets_per_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[streams.declare.fan]\npartitions = 4\n",
    )
    .unwrap();
    let c = client();
    let producers = 16;
    let requests = 25;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let (c, url) = (c.clone(), s.events_url("fan"));
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for r in 0..requests {
                let events: Vec<Value> = (0..4)
                    .map(|e| json!({"value": {"p": p, "r": r, "e": e}, "key": format!("dev-{}", (p + e) % 7)}))
                    .collect();
                let body = serde_json::to_string(&events).unwrap();
                let (st, v) = post(&c, &url, "application/json", body).await;
                assert_eq!(st, StatusCode::OK, "{v}");
                for (e, (part, off)) in offsets(&v).into_iter().enumerate() {
                    acked.push((part, off, json!({"p": p, "r": r, "e": e}).to_string()));
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    assert_eq!(acked.len(), producers * requests * 4);
    let unique: HashSet<(u64, u64)> = acked.iter().map(|a| (a.0, a.1)).collect();
    assert_eq!(
        unique.len(),
        acked.len(),
        "two events got the same position"
    );

    let log = s.read_log("fan").unwrap();
    assert_eq!(log.len(), acked.len());
    let mut by_pos = BTreeMap::new();
    let mut per_partition: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for r in &log {
        let (p, o) = (
            r["partition"].as_u64().unwrap(),
            r["offset"].as_u64().unwrap(),
        );
        by_pos.insert((p, o), r["value"].as_str().unwrap().to_string());
        per_partition.entry(p).or_default().push(o);
        // Same key, same partition (murmur2 like Kafka).
        let key = r["key"].as_str().unwrap();
        let expected = sluice_tests::kafka::partition_of(key.as_bytes(), 4);
        assert_eq!(p, u64::from(expected), "key {key}");
    }
    for (p, offs) in per_partition {
        let want: Vec<u64> = (0..offs.len() as u64).collect();
        assert_eq!(
            offs, want,
            "partition {p} offsets are not contiguous from 0"
        );
    }
    for (p, o, value) in &acked {
        assert_eq!(
            by_pos.get(&(*p, *o)),
            Some(value),
            "acked event at {p}/{o} differs in the log"
        );
    }
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_events_in_total",
            r#"stream="fan",protocol="http""#
        ),
        acked.len() as f64
    );
    assert!(metric(&m, "sluice_log_fsyncs_total", "") >= 1.0);
}

#[tokio::test]
async fn received_ack_mode_answers_202_and_still_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[streams.declare.fire]\nack = \"received\"\n[log]\nflush_interval_ms = 10\n",
    )
    .unwrap();
    let c = client();
    let (st, v) = post(&c, &s.events_url("fire"), "application/json", "[1,2,3]").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(
        v,
        json!({"results": [
            {"partition": 0, "status": "received"},
            {"partition": 0, "status": "received"},
            {"partition": 0, "status": "received"}
        ]})
    );
    let data = s.data_dir.clone();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let data = data.clone();
            async move { read_log(&data, "fire", &[]).unwrap().len() == 3 }
        })
        .await
    );
}

#[tokio::test]
async fn admin_endpoints_and_read_filters() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[streams.declare.two]\npartitions = 2\n",
    )
    .unwrap();
    let c = client();
    let r = c.get(s.admin_url("healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c.get(s.admin_url("readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let m = c.get(s.admin_url("metrics")).send().await.unwrap();
    assert!(
        m.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let m = m.text().await.unwrap();
    for name in [
        "sluice_build_info",
        "sluice_log_fsync_seconds_bucket",
        "sluice_log_group_commit_events_bucket",
        "sluice_log_append_seconds_bucket",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }

    // Keyless requests go round robin, one partition per request.
    for i in 0..4 {
        let (st, v) = post(
            &c,
            &s.events_url("two"),
            "application/json",
            format!("[{i},{i}]"),
        )
        .await;
        assert_eq!(st, StatusCode::OK);
        let o = offsets(&v);
        assert_eq!(o[0].0, o[1].0, "one request, one partition");
    }
    let all = s.read_log("two").unwrap();
    assert_eq!(all.len(), 8);
    let p1 = read_log(&s.data_dir, "two", &["--partition", "1"]).unwrap();
    assert_eq!(p1.len(), 4);
    assert!(p1.iter().all(|r| r["partition"] == 1));
    let from = read_log(
        &s.data_dir,
        "two",
        &["--partition", "0", "--from-offset", "2"],
    )
    .unwrap();
    assert_eq!(from.len(), 2);
    assert_eq!(from[0]["offset"], 2);
    let limited = read_log(&s.data_dir, "two", &["--limit", "3"]).unwrap();
    assert_eq!(limited.len(), 3);
    let future = read_log(&s.data_dir, "two", &["--from-time", "2999-01-01T00:00:00Z"]).unwrap();
    assert!(future.is_empty());
    let past = read_log(
        &s.data_dir,
        "two",
        &["--from-time", "2000-01-01T00:00:00+01:00"],
    )
    .unwrap();
    assert_eq!(past.len(), 8);
    assert!(read_log(&s.data_dir, "missing", &[]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_the_disk_refuses_is_answered_503_undone_and_the_partition_goes_on() {
    // Files may not grow past 1 MiB (the same failure as a full disk, docs/log.md): a 1.5 MiB
    // event cannot be written; a small one can.
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start_with_file_size_limit(
        &tmp.path().join("data"),
        "[streams.defaults]\nmax_body_bytes = 4194304\nmax_event_bytes = 4194304\n",
        1024,
    )
    .unwrap();
    let c = client();
    let url = s.events_url("full");
    let big = vec![b'x'; 1536 * 1024];
    let r = c
        .post(&url)
        .header("content-type", "application/octet-stream")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(metric(&s.metrics().await, "sluice_log_append_errors_total", "") >= 1.0);
    // The failed write was undone: the partition takes the next event at offset 0, stays ready,
    // and holds nothing of the refused one.
    let (status, v) = post(&c, &url, "application/octet-stream", "small").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(offsets(&v), vec![(0, 0)]);
    assert!(s.wait_readyz(200, Duration::from_secs(5)).await);
    let log = read_log(&s.data_dir, "full", &[]).unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
}

/// Reads whatever the server sends until it closes or `within` passes; the text and whether
/// the connection was closed.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream, within: Duration) -> (String, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_answered_400() {
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[http]\nbody_read_timeout_ms = 500\n",
    )
    .unwrap();
    let mut tcp = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let t0 = std::time::Instant::now();
    tcp.write_all(
        b"POST /v1/streams/slowbody/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n[1",
    )
    .await
    .unwrap();
    let (resp, _) = read_until_closed(&mut tcp, Duration::from_secs(20)).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("did not arrive within 500 ms"), "{resp}");
    assert!(
        t0.elapsed() >= Duration::from_millis(450),
        "{:?}",
        t0.elapsed()
    );
    assert!(
        read_log(&s.data_dir, "slowbody", &[])
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_http_max_connections_are_closed_at_accept() {
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[http]\nmax_connections = 3\nmax_connections_per_address = 0\n",
    )
    .unwrap();
    let request = b"POST /v1/streams/conns/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 3\r\n\r\n[1]";
    // Three keep-alive connections, each answered once and left open.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = tokio::net::TcpStream::connect(s.http).await.unwrap();
        tcp.write_all(request).await.unwrap();
        let (resp, closed) = read_until_closed(&mut tcp, Duration::from_millis(1500)).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(!closed);
        held.push(tcp);
    }
    // The fourth is closed without an answer.
    let mut fourth = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let _ = fourth.write_all(request).await;
    let (resp, closed) = read_until_closed(&mut fourth, Duration::from_secs(20)).await;
    assert!(closed && resp.is_empty(), "{resp:?}");
    // Room again once one closes.
    drop(held.pop());
    let http = s.http;
    let served = wait_until(Duration::from_secs(10), || async move {
        let mut tcp = tokio::net::TcpStream::connect(http).await.unwrap();
        let _ = tcp.write_all(request).await;
        let (resp, _) = read_until_closed(&mut tcp, Duration::from_millis(1500)).await;
        resp.starts_with("HTTP/1.1 200")
    })
    .await;
    assert!(served);
    assert_eq!(read_log(&s.data_dir, "conns", &[]).unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_that_does_not_finish_is_closed_after_its_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = sluice_tests::pki::Ca::new("handshake-ca").unwrap();
    let server = ca
        .issue_valid("localhost", &["localhost", "127.0.0.1"])
        .unwrap();
    let cert = sluice_tests::pki::write(tmp.path(), "server.pem", &server.cert_pem).unwrap();
    let key = sluice_tests::pki::write(tmp.path(), "server.key", &server.key_pem).unwrap();
    // The first request's own deadline is long, so only the handshake's can close it.
    let s = Sluice::start(
        &tmp.path().join("data"),
        &format!(
            "[http]\nheader_read_timeout_ms = 30000\n[http.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nhandshake_timeout_ms = 700\n"
        ),
    )
    .unwrap();
    // A client that opens the connection and never says hello.
    let mut tcp = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let t0 = std::time::Instant::now();
    let (_, closed) = read_until_closed(&mut tcp, Duration::from_secs(20)).await;
    assert!(closed);
    assert!(
        t0.elapsed() >= Duration::from_millis(650),
        "{:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(20));
    // A real client still gets in.
    let tls = sluice_tests::pki::tls_client(&ca.cert_pem(), None).unwrap();
    let a = sluice_tests::pki::tls_post(s.http, &tls, "/v1/streams/tls/events", &[], "[1]")
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_partition_until_restart() {
    // The second fsync of each partition fails with EIO (log.fault_fsync_fail_after, the
    // documented test-only switch: a real EIO needs a failing device).
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = Sluice::start(&data, "[log]\nfault_fsync_fail_after = 2\n").unwrap();
    let c = client();
    let url = s.events_url("fragile");
    let (status, v) = post(&c, &url, "application/json", "[\"first\"]").await;
    assert_eq!(status, 200, "{v}");
    // The failed fsync: 503, retryable, and the event is not acked.
    let r = c.post(&url).json(&json!(["second"])).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    // The partition stays stopped: nothing more is taken, /readyz says why, and the metric too.
    let r = c.post(&url).json(&json!(["third"])).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fsync failed"),
        "{body}"
    );
    let ready = c.get(s.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("I/O error"));
    assert_eq!(metric(&s.metrics().await, "sluice_ready", ""), 0.0);
    // Other streams (other partitions) still take writes.
    let (status, _) = post(&c, &s.events_url("sturdy"), "application/json", "[1]").await;
    assert_eq!(status, 200);
    // After a restart (without the fault) the partition works again, and holds the acked event.
    s.kill().unwrap();
    let s = Sluice::start(&data, "").unwrap();
    let (status, v) = post(
        &c,
        &s.events_url("fragile"),
        "application/json",
        "[\"fourth\"]",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let values: Vec<String> = read_log(&data, "fragile", &[])
        .unwrap()
        .iter()
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        values.first().map(String::as_str),
        Some("\"first\""),
        "{values:?}"
    );
    assert_eq!(
        values.last().map(String::as_str),
        Some("\"fourth\""),
        "{values:?}"
    );
}
