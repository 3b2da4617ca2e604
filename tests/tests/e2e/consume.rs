//! The read side (docs/consume.md): `GET /v1/streams/{stream}/events` on the real binary — the
//! `consume` permission apart from `produce`, JSON and NDJSON, cursors that read every record
//! once across partitions, the long poll, time positions, and the errors (past the end,
//! deleted by retention, no such stream or partition).

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::http::{Answer, client};
use sluice_tests::{Sluice, api_key_entry};

const WRITER: &str = "writer.w-secret";
const READER: &str = "reader.r-secret";

fn config(extra: &str) -> String {
    let reader = api_key_entry(READER, "dashboard", &[])
        .replace("streams = []\n", "streams = []\nconsume = [\"orders*\"]\n");
    format!(
        "[http.auth]\nallow_anonymous = false\n[streams.declare.orders]\npartitions = 3\n{extra}{}{reader}",
        api_key_entry(WRITER, "shop", &["*"]),
    )
}

async fn publish(c: &reqwest::Client, s: &Sluice, stream: &str, events: Value) {
    let a = Answer::of(
        c.post(s.events_url(stream))
            .header("x-api-key", WRITER)
            .json(&events),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
}

async fn read(c: &reqwest::Client, s: &Sluice, stream: &str, query: &str, key: &str) -> Answer {
    Answer::of(
        c.get(format!("{}?{query}", s.events_url(stream)))
            .header("x-api-key", key),
    )
    .await
}

fn values(a: &Answer) -> Vec<String> {
    a.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["value"]["n"].to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_reads_every_record_once_by_cursor_and_waits_at_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config("")).unwrap();
    let c = client(Duration::from_secs(20));
    // 30 events with keys over three partitions.
    let events: Vec<Value> = (0..30)
        .map(|n| json!({"key": format!("k{}", n % 7), "value": {"n": n}}))
        .collect();
    publish(&c, &s, "orders", json!(events)).await;

    // Reading is its own permission: the writer (produce only) and no credentials are refused.
    let a = read(&c, &s, "orders", "", WRITER).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");
    assert!(
        a.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("consume")
    );
    let a = Answer::of(c.get(s.events_url("orders"))).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}");
    // Nor does a consume grant for `orders*` reach other streams.
    publish(&c, &s, "payments", json!([{"value": {"n": 1}}])).await;
    let a = read(&c, &s, "payments", "", READER).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{a:?}");

    // Everything, in pages of 7, by cursor: each record exactly once, in offset order per
    // partition, in the shape of `sluice log read`.
    let mut seen = Vec::new();
    let mut query = "limit=7".to_string();
    loop {
        let a = read(&c, &s, "orders", &query, READER).await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        let recs = a.body["records"].as_array().unwrap().clone();
        assert!(recs.len() <= 7);
        if recs.is_empty() {
            break;
        }
        for r in &recs {
            assert_eq!(r["stream"], "orders");
            assert_eq!(r["headers"]["sluice-principal"], "shop");
            assert!(r["timestamp"].is_string() && r["key"].is_string(), "{r}");
            seen.push((
                r["partition"].as_u64().unwrap(),
                r["offset"].as_u64().unwrap(),
                r["value"]["n"].as_u64().unwrap(),
            ));
        }
        query = format!("limit=7&cursor={}", a.body["next"].as_str().unwrap());
    }
    let ns: BTreeSet<u64> = seen.iter().map(|x| x.2).collect();
    assert_eq!(seen.len(), 30, "{seen:?}");
    assert_eq!(ns, (0..30).collect(), "every event once");
    for p in 0..3 {
        let offsets: Vec<u64> = seen.iter().filter(|x| x.0 == p).map(|x| x.1).collect();
        assert_eq!(
            offsets,
            (0..offsets.len() as u64).collect::<Vec<_>>(),
            "partition {p}"
        );
    }
    assert!(
        seen.iter().map(|x| x.0).collect::<BTreeSet<_>>().len() > 1,
        "the keys spread over partitions"
    );

    // At the end, a long poll waits for the next durable record instead of answering empty.
    let end = read(&c, &s, "orders", "from=end&limit=1", READER).await;
    assert_eq!(values(&end), Vec::<String>::new());
    let cursor = end.body["next"].as_str().unwrap().to_string();
    let waiting = {
        let (c, url) = (c.clone(), s.events_url("orders"));
        tokio::spawn(async move {
            Answer::of(
                c.get(format!("{url}?cursor={cursor}&wait_ms=15000"))
                    .header("x-api-key", READER),
            )
            .await
        })
    };
    // A long poll of our own that ends empty: the first one (started before it) is still
    // waiting, not answered empty; whether it reached the gateway before the publish below or
    // after, it must answer with the new record.
    let probe = read(&c, &s, "orders", "from=end&wait_ms=200", READER).await;
    assert_eq!(probe.status, StatusCode::OK);
    assert!(
        !waiting.is_finished(),
        "the long poll answered before any event: {probe:?}"
    );
    publish(&c, &s, "orders", json!([{"value": {"n": 100}}])).await;
    let a = waiting.await.unwrap();
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(values(&a), vec!["100".to_string()]);

    // NDJSON: one record per line, the cursor in a header.
    let r = c
        .get(format!(
            "{}?partition=0,1,2&limit=1000",
            s.events_url("orders")
        ))
        .header("x-api-key", READER)
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let cursor = r.headers()["sluice-next-cursor"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(cursor.split(',').count(), 3, "{cursor}");
    let text = r.text().await.unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 31);

    // Errors name what is wrong.
    let a = read(&c, &s, "orders", "partition=0&from_offset=999", READER).await;
    assert_eq!(a.status, StatusCode::RANGE_NOT_SATISFIABLE, "{a:?}");
    assert_eq!(a.body["error"]["code"], "offset_out_of_range");
    assert!(a.body["error"]["end_offset"].as_u64().unwrap() <= 31);
    let a = read(&c, &s, "orders", "partition=7", READER).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    let a = read(&c, &s, "orders-none", "", READER).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{a:?}");
    let a = read(&c, &s, "orders", "from_offset=1&from=end", READER).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
}

/// Reading by time: a position after the first batch's receive time finds only later records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_starts_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config("")).unwrap();
    let c = client(Duration::from_secs(20));
    publish(
        &c,
        &s,
        "orders",
        json!([{"value": {"n": 1}}, {"value": {"n": 2}}]),
    )
    .await;
    let first = read(&c, &s, "orders", "", READER).await;
    let t0 = first.body["records"][0]["timestamp_ms"].as_i64().unwrap();
    // The next batch is received at a later millisecond than the first.
    let later = sluice_tests::wait_until(Duration::from_secs(5), || async {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            > t0
    })
    .await;
    assert!(later);
    publish(&c, &s, "orders", json!([{"value": {"n": 3}}])).await;
    let all = read(&c, &s, "orders", "", READER).await;
    let t1 = all.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["value"]["n"] == 3)
        .unwrap()["timestamp_ms"]
        .as_i64()
        .unwrap();
    assert!(t1 > t0);
    let a = read(&c, &s, "orders", &format!("from_time={t1}"), READER).await;
    assert_eq!(values(&a), vec!["3".to_string()], "{a:?}");
    // RFC 3339 too; a time before everything reads everything.
    let a = read(&c, &s, "orders", "from_time=2000-01-01T00:00:00Z", READER).await;
    assert_eq!(a.body["records"].as_array().unwrap().len(), 3, "{a:?}");
}

/// A position that retention deleted is answered 410 with the partition's earliest offset,
/// from which the reader can go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_deleted_by_retention_is_gone_with_the_earliest_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[log]\nsegment_bytes = 4096\nretention_check_interval_ms = 20\n\
                 [streams.declare.orders-short]\nretention_bytes = 8192\n";
    let s = Sluice::start(&tmp.path().join("data"), &config(extra)).unwrap();
    let c = client(Duration::from_secs(20));
    let pad = "x".repeat(400);
    for batch in 0..10 {
        let events: Vec<Value> = (0..10)
            .map(|i| json!({"value": {"n": batch * 10 + i, "pad": pad}}))
            .collect();
        publish(&c, &s, "orders-short", json!(events)).await;
    }
    // Retention runs on its own clock: wait until offset 0 is gone.
    let deleted = sluice_tests::wait_until(Duration::from_secs(10), || async {
        read(&c, &s, "orders-short", "from_offset=0", READER)
            .await
            .status
            == StatusCode::GONE
    })
    .await;
    assert!(deleted, "offset 0 was never deleted");
    // Once deleted it stays deleted.
    let a = read(&c, &s, "orders-short", "from_offset=0", READER).await;
    assert_eq!(a.status, StatusCode::GONE, "{a:?}");
    assert_eq!(a.body["error"]["code"], "offset_gone");
    let mut earliest = a.body["error"]["earliest_offset"].as_u64().unwrap();
    assert!(earliest > 0 && earliest < 100, "{a:?}");
    // From the earliest offset on, the rest reads, as a client does it: retention may have
    // moved on meanwhile (it runs every 20 ms here), and then the new 410 names the new
    // earliest offset, always further on.
    let mut a = read(
        &c,
        &s,
        "orders-short",
        &format!("from_offset={earliest}&limit=1000"),
        READER,
    )
    .await;
    for _ in 0..20 {
        if a.status != StatusCode::GONE {
            break;
        }
        let next = a.body["error"]["earliest_offset"].as_u64().unwrap();
        assert!(next > earliest, "{a:?}");
        earliest = next;
        a = read(
            &c,
            &s,
            "orders-short",
            &format!("from_offset={earliest}&limit=1000"),
            READER,
        )
        .await;
    }
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    let recs = a.body["records"].as_array().unwrap();
    assert_eq!(recs[0]["offset"].as_u64(), Some(earliest));
    assert_eq!(recs.last().unwrap()["value"]["n"], 99);
    let a = read(&c, &s, "orders-short", "limit=1", READER).await;
    assert_eq!(
        a.body["records"][0]["offset"]
            .as_u64()
            .map(|o| o >= earliest),
        Some(true)
    );
}

/// One Server-Sent Events connection, parsed as it arrives.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

/// An SSE event: its id and data, or a comment (`: heartbeat`).
#[derive(Debug)]
enum SseEvent {
    Record { id: String, data: Value },
    Comment(String),
    Other,
}

impl Sse {
    async fn open(c: &reqwest::Client, url: &str, key: &str, last_id: Option<&str>) -> Sse {
        let mut req = c
            .get(url)
            .header("x-api-key", key)
            .header("accept", "text/event-stream");
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{resp:?}");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next event (the client's timeout bounds the wait).
    async fn next(&mut self) -> SseEvent {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut data) = (None, None);
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        return SseEvent::Comment(c.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                return match (id, data) {
                    (Some(id), Some(data)) => SseEvent::Record { id, data },
                    _ => SseEvent::Other,
                };
            }
            let chunk = self
                .resp
                .chunk()
                .await
                .expect("the stream stays open")
                .expect("a chunk");
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The next `n` records (skipping comments and the `retry:` line).
    async fn records(&mut self, n: usize) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while out.len() < n {
            if let SseEvent::Record { id, data } = self.next().await {
                out.push((id, data));
            }
        }
        out
    }
}

/// The live tail: records as they become durable, each event's id the cursor after it, so an
/// EventSource that reconnects with Last-Event-ID misses nothing and repeats nothing;
/// heartbeats while quiet; bounded per principal; refused without a consume grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_tail_resumes_with_last_event_id_and_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[http]\nmax_subscribers_per_principal = 2\nsse_heartbeat_ms = 100\n";
    let s = Sluice::start(&tmp.path().join("data"), &config(extra)).unwrap();
    let c = client(Duration::from_secs(20));
    let url = s.events_url("orders");
    publish(&c, &s, "orders", json!([{"value": {"n": -1}}])).await;

    // By default a tail starts at the end: the record already there is not sent.
    let mut tail = Sse::open(&c, &url, READER, None).await;
    let events: Vec<Value> = (0..6)
        .map(|n| json!({"key": format!("k{n}"), "value": {"n": n}}))
        .collect();
    publish(&c, &s, "orders", json!(events)).await;
    let got = tail.records(6).await;
    let ns: BTreeSet<i64> = got
        .iter()
        .map(|(_, d)| d["value"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, (0..6).collect(), "{got:?}");
    // Quiet: heartbeat comments keep the stream alive.
    loop {
        match tail.next().await {
            SseEvent::Comment(c) if c == "heartbeat" => break,
            SseEvent::Record { data, .. } => panic!("unexpected record {data}"),
            _ => {}
        }
    }
    // Drop after the fourth record; resume from its id: exactly the rest, then new ones.
    let resume_at = got[3].0.clone();
    drop(tail);
    publish(
        &c,
        &s,
        "orders",
        json!([{"value": {"n": 6}}, {"value": {"n": 7}}]),
    )
    .await;
    let mut tail = Sse::open(&c, &url, READER, Some(&resume_at)).await;
    let rest = tail.records(4).await;
    let mut ns: Vec<i64> = rest
        .iter()
        .map(|(_, d)| d["value"]["n"].as_i64().unwrap())
        .collect();
    ns.sort();
    let mut want: Vec<i64> = got[4..]
        .iter()
        .map(|(_, d)| d["value"]["n"].as_i64().unwrap())
        .chain([6, 7])
        .collect();
    want.sort();
    assert_eq!(ns, want, "resumed from {resume_at}: {rest:?}");

    // Two tails per principal (configured): a third is refused with 429, another reader's is
    // not affected; a producer without a consume grant gets 403 before any stream starts.
    let _second = Sse::open(&c, &url, READER, None).await;
    let third = c
        .get(&url)
        .header("x-api-key", READER)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    let writer = c
        .get(&url)
        .header("x-api-key", WRITER)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(writer.status(), StatusCode::FORBIDDEN);
    let m = s.metrics().await;
    assert_eq!(
        sluice_tests::metric(&m, "sluice_connections", "protocol=\"sse\""),
        2.0
    );
    // A closed tail frees its place.
    drop(tail);
    let freed = sluice_tests::wait_until(Duration::from_secs(10), || async {
        c.get(&url)
            .header("x-api-key", READER)
            .header("accept", "text/event-stream")
            .send()
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    assert!(freed, "the closed tail's place was not freed");
}

/// A JWT grants reading with `consume:` scope entries, apart from `produce:`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_consume_scope_grants_reading() {
    const SECRET: &str = "an-hs256-secret-that-is-long-enough-1234";
    let issuer = format!(
        "[[auth.jwt.issuers]]\nissuer = \"https://idp.test/hs\"\naudiences = [\"sluice\"]\nalgorithms = [\"HS256\"]\nhs256_secret = \"{SECRET}\"\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config(&issuer)).unwrap();
    let c = client(Duration::from_secs(20));
    publish(&c, &s, "orders", json!([{"value": {"n": 1}}])).await;
    let token = |scope: &str| {
        sluice_tests::pki::hs256(
            SECRET.as_bytes(),
            &json!({"iss": "https://idp.test/hs", "sub": "board", "aud": "sluice",
                    "exp": sluice_tests::pki::now() + 600, "scope": scope}),
        )
    };
    let get = |scope: &str| Answer::of(c.get(s.events_url("orders")).bearer_auth(token(scope)));
    let a = get("consume:orders").await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["records"][0]["value"]["n"], 1);
    assert_eq!(a.body["records"][0]["value_encoding"], "json");
    // Producing is not reading, and a consume grant for another stream is not this one.
    for scope in ["produce:orders", "consume:payments", "orders"] {
        let a = get(scope).await;
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{scope}: {a:?}");
    }
}

/// gRPC `Subscribe`: the records from a position as fields, then new ones as they become
/// durable; the cursor of each response resumes exactly there; errors fail the call before
/// it streams; reflection lists the method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_subscribe_streams_records_and_resumes_from_a_cursor() {
    use sluice_protocols::grpc::pb;
    use sluice_protocols::grpc::pb::ingest_client::IngestClient;
    use tonic::Code;
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config("")).unwrap();
    let c = client(Duration::from_secs(20));
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = IngestClient::new(ch.clone());
    let call = |key: &str, from: Option<pb::subscribe_request::From>, stream: &str| {
        let mut r = tonic::Request::new(pb::SubscribeRequest {
            stream: stream.into(),
            partitions: vec![],
            from,
            max_records: 4,
        });
        r.metadata_mut().insert("x-api-key", key.parse().unwrap());
        r
    };
    use pb::subscribe_request::From as F;
    let events: Vec<Value> = (0..10)
        .map(|n| json!({"key": format!("k{n}"), "value": {"n": n}}))
        .collect();
    publish(&c, &s, "orders", json!(events)).await;

    let mut sub = grpc
        .subscribe(call(READER, Some(F::Start(true)), "orders"))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut cursor = String::new();
    while got.len() < 10 {
        let r = tokio::time::timeout(Duration::from_secs(10), sub.message())
            .await
            .expect("records arrive")
            .unwrap()
            .unwrap();
        assert!(r.records.len() <= 4);
        for rec in &r.records {
            let v: Value = serde_json::from_slice(&rec.value).unwrap();
            assert!(
                rec.headers
                    .iter()
                    .any(|h| h.key == "sluice-principal" && &h.value[..] == b"shop")
            );
            assert_eq!(rec.content_type, "application/json");
            got.push(v["n"].as_i64().unwrap());
        }
        cursor = r.cursor;
    }
    got.sort();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    // New records reach the open call.
    publish(&c, &s, "orders", json!([{"value": {"n": 10}}])).await;
    let r = tokio::time::timeout(Duration::from_secs(10), sub.message())
        .await
        .expect("the new record arrives")
        .unwrap()
        .unwrap();
    assert_eq!(r.records.len(), 1);
    drop(sub);
    // A new call from the last cursor before it: exactly that record, nothing older.
    let mut sub = grpc
        .subscribe(call(READER, Some(F::Cursor(cursor)), "orders"))
        .await
        .unwrap()
        .into_inner();
    let r = sub.message().await.unwrap().unwrap();
    let ns: Vec<i64> = r
        .records
        .iter()
        .map(|rec| {
            serde_json::from_slice::<Value>(&rec.value).unwrap()["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, vec![10]);

    // Errors fail the call before it streams.
    let e = grpc
        .subscribe(call(WRITER, None, "orders"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = grpc
        .subscribe(call(READER, None, "orders-none"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = grpc
        .subscribe(call(READER, Some(F::Offset(500)), "orders"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");

    // Reflection describes the method.
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "sluice.v1.Ingest".into(),
        )),
    };
    let mut out = ServerReflectionClient::new(ch)
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = out.message().await.unwrap().unwrap();
    let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
        panic!("{resp:?}");
    };
    let all: Vec<u8> = files.file_descriptor_proto.concat();
    let has = |needle: &[u8]| all.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"Subscribe") && has(b"SubscribeRequest") && has(b"SubscribeResponse"));
}

/// WebSocket subscribe with credit: never more records than granted, more after a grant, the
/// cursor of each message resumes exactly there, errors before the upgrade are HTTP statuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_subscribe_sends_no_more_than_its_credit() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::connect_async;
    use tokio_tungstenite::tungstenite::Message;
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config("")).unwrap();
    let c = client(Duration::from_secs(20));
    let events: Vec<Value> = (0..20)
        .map(|n| json!({"key": format!("k{n}"), "value": {"n": n}}))
        .collect();
    publish(&c, &s, "orders", json!(events)).await;
    let url = |q: &str| {
        format!(
            "ws://{}/v1/streams/orders/subscribe?api_key={READER}&{q}",
            s.http
        )
    };
    type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;
    async fn message(ws: &mut Ws) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .expect("a message within 10 s")
                .expect("socket open")
                .expect("a frame");
            match m {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let n_of = |m: &Value| -> Vec<i64> {
        m["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"]["n"].as_i64().unwrap())
            .collect()
    };

    // 7 records granted: exactly 7 arrive, then nothing until more credit.
    let (mut ws, _) = connect_async(url("from=start&credit=7")).await.unwrap();
    let mut got = Vec::new();
    let mut cursor = String::new();
    while got.len() < 7 {
        let m = message(&mut ws).await;
        got.extend(n_of(&m));
        cursor = m["cursor"].as_str().unwrap().to_string();
    }
    assert_eq!(got.len(), 7, "{got:?}");
    let quiet = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
    assert!(quiet.is_err(), "a record beyond the credit: {quiet:?}");
    // A grant of 100 brings the other 13, and new records as they come.
    ws.send(Message::text(r#"{"credit": 100}"#)).await.unwrap();
    while got.len() < 20 {
        got.extend(n_of(&message(&mut ws).await));
    }
    publish(&c, &s, "orders", json!([{"value": {"n": 20}}])).await;
    assert_eq!(n_of(&message(&mut ws).await), vec![20]);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, (0..20).collect::<Vec<_>>());
    // Anything but a credit grant closes the socket with a policy error.
    ws.send(Message::text("hello")).await.unwrap();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(f))) => break f,
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(u16::from(closed.unwrap().code), 1008);

    // Resuming from the cursor after the first 7: the other 14, nothing repeated.
    let (mut ws, _) = connect_async(url(&format!("cursor={cursor}&credit=1000")))
        .await
        .unwrap();
    let mut rest = Vec::new();
    while rest.len() < 14 {
        rest.extend(n_of(&message(&mut ws).await));
    }
    let mut all: Vec<i64> = got[..7].iter().chain(&rest).copied().collect();
    all.sort();
    assert_eq!(all, (0..21).collect::<Vec<_>>());

    // Refusals are HTTP answers to the upgrade.
    for (q, status) in [
        (format!("api_key={WRITER}"), 403),
        ("".to_string(), 401),
        (format!("api_key={READER}&from_offset=999&partition=0"), 416),
    ] {
        let err = connect_async(format!("ws://{}/v1/streams/orders/subscribe?{q}", s.http))
            .await
            .unwrap_err();
        match err {
            tokio_tungstenite::tungstenite::Error::Http(r) => {
                assert_eq!(r.status().as_u16(), status, "{q}")
            }
            other => panic!("{q}: {other:?}"),
        }
    }
}

/// A read quota (`on = "consume"`) paces readers with the producers' signal (429 and
/// Retry-After) and leaves producing alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_quota_answers_what_fits_then_429() {
    let tmp = tempfile::tempdir().unwrap();
    let rule = "[[quotas.rules]]\nscope = \"principal_stream\"\non = \"consume\"\nevents_per_sec = 1\nburst_events = 5\n";
    let s = Sluice::start(&tmp.path().join("data"), &config(rule)).unwrap();
    let c = client(Duration::from_secs(20));
    let events: Vec<Value> = (0..20).map(|n| json!({"value": {"n": n}})).collect();
    // 20 events in one request: the consume rule does not limit producing.
    publish(&c, &s, "orders", json!(events)).await;
    let a = read(&c, &s, "orders", "limit=100", READER).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["records"].as_array().unwrap().len(), 5, "the burst");
    let cursor = a.body["next"].as_str().unwrap().to_string();
    let a = read(&c, &s, "orders", &format!("cursor={cursor}"), READER).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{a:?}");
    assert!(a.retry_after.is_some(), "{a:?}");
    // The cursor did not move past what was refused: the records come later, in order.
    let later = sluice_tests::wait_until(Duration::from_secs(10), || async {
        let a = read(
            &c,
            &s,
            "orders",
            &format!("cursor={cursor}&limit=1"),
            READER,
        )
        .await;
        a.status == StatusCode::OK && a.body["records"][0]["value"]["n"] == 5
    })
    .await;
    assert!(later, "the sixth record never came");
}

/// With Kafka as the log (Tansu): the same read side — fetch by cursor in the embedded log's
/// shape, a long poll, a time position, gRPC Subscribe — through an assigned consumer with no
/// group state, so a cursor from one gateway continues on another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_work_the_same_with_kafka_as_the_log_and_cursors_move_between_gateways() {
    use sluice_tests::kafka::{Tansu, kafka_config, start_ready};
    let tansu = Tansu::start().unwrap();
    let kafka = kafka_config(
        &tansu.bootstrap,
        // One record per batch: Tansu 0.6 lists offsets and serves fetches by batch (its
        // latest offset is the last batch's base + 1, and a fetch from inside a batch finds
        // nothing), where Kafka does both by record. With a batch per record the two agree.
        "topic = \"sluice.{stream}\"\ncreate_topics = true\nlinger_ms = 2\nbatch_events = 1\n",
    );
    let toml = format!("{kafka}{}", config(""));
    let tmp = tempfile::tempdir().unwrap();
    let a = start_ready(&tmp.path().join("a"), &toml).await;
    let b = start_ready(&tmp.path().join("b"), &toml).await;
    let c = client(Duration::from_secs(60));
    let events: Vec<Value> = (0..12)
        .map(|n| json!({"key": format!("k{n}"), "value": {"n": n}}))
        .collect();
    publish(&c, &a, "orders", json!(events)).await;

    // Half through gateway A, the rest through B from A's cursor.
    let first = read(&c, &a, "orders", "limit=6", READER).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    let recs = first.body["records"].as_array().unwrap();
    assert!(!recs.is_empty() && recs.len() <= 6, "{first:?}");
    assert_eq!(recs[0]["headers"]["sluice-principal"], "shop");
    assert_eq!(recs[0]["value_encoding"], "json");
    assert!(recs[0]["value"]["n"].is_i64(), "{first:?}");
    let cursor = first.body["next"].as_str().unwrap().to_string();
    let mut seen: Vec<i64> = recs
        .iter()
        .map(|r| r["value"]["n"].as_i64().unwrap())
        .collect();
    let mut query = format!("cursor={cursor}&limit=100");
    loop {
        let r = read(&c, &b, "orders", &query, READER).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        let recs = r.body["records"].as_array().unwrap();
        if recs.is_empty() {
            break;
        }
        seen.extend(recs.iter().map(|r| r["value"]["n"].as_i64().unwrap()));
        query = format!("cursor={}&limit=100", r.body["next"].as_str().unwrap());
    }
    seen.sort();
    assert_eq!(seen, (0..12).collect::<Vec<_>>(), "every record once");

    // A long poll at the end (the cursor after everything read) returns the next record when
    // it is in Kafka. (Not `from=end`: Tansu reports the high watermark per batch, not per
    // record, so its end is not the end; docs/consume.md.)
    let cursor = query
        .strip_prefix("cursor=")
        .and_then(|q| q.split('&').next())
        .unwrap()
        .to_string();
    let waiting = {
        let (c, url) = (c.clone(), b.events_url("orders"));
        tokio::spawn(async move {
            Answer::of(
                c.get(format!("{url}?cursor={cursor}&wait_ms=20000"))
                    .header("x-api-key", READER),
            )
            .await
        })
    };
    publish(&c, &a, "orders", json!([{"value": {"n": 12}}])).await;
    let got = waiting.await.unwrap();
    assert_eq!(got.status, StatusCode::OK, "{got:?}");
    assert_eq!(values(&got), vec!["12".to_string()]);

    // Permissions and errors as with the embedded log.
    let r = read(&c, &a, "orders", "", WRITER).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{r:?}");
    let r = read(&c, &a, "orders", "partition=0&from_offset=100000", READER).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{r:?}");
    assert_eq!(r.body["error"]["code"], "offset_out_of_range");
    let r = read(&c, &a, "orders-none", "", READER).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{r:?}");

    // gRPC Subscribe from the start reads the same records.
    use sluice_protocols::grpc::pb;
    let ch = tonic::transport::Channel::from_shared(a.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::SubscribeRequest {
        stream: "orders".into(),
        partitions: vec![],
        from: Some(pb::subscribe_request::From::Start(true)),
        max_records: 100,
    });
    req.metadata_mut()
        .insert("x-api-key", READER.parse().unwrap());
    let mut sub = pb::ingest_client::IngestClient::new(ch)
        .subscribe(req)
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while n < 13 {
        let r = tokio::time::timeout(Duration::from_secs(30), sub.message())
            .await
            .expect("records within 30 s")
            .unwrap()
            .unwrap();
        n += r.records.len();
    }
    assert_eq!(n, 13);
}

/// An attacker's tails: thirty SSE subscribers that never read what they are sent. Each holds
/// at most one read in the gateway (its socket fills, its tail waits), so the gateway's memory
/// stays bounded while far more is written than they would buffer, and a subscriber that does
/// read still gets every event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_hold_the_gateway_to_bounded_memory() {
    use tokio::io::AsyncWriteExt;
    let tmp = tempfile::tempdir().unwrap();
    let extra = "[http]\nmax_subscribers_per_principal = 100\n";
    let s = Sluice::start(&tmp.path().join("data"), &config(extra)).unwrap();
    let c = client(Duration::from_secs(60));
    let rss_kib = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    publish(&c, &s, "orders", json!([{"value": {"n": -1}}])).await;
    let mut stuck = Vec::new();
    for _ in 0..30 {
        let mut sock = tokio::net::TcpStream::connect(s.http).await.unwrap();
        let req = format!(
            "GET /v1/streams/orders/events?from=start HTTP/1.1\r\nhost: x\r\nx-api-key: {READER}\r\naccept: text/event-stream\r\n\r\n"
        );
        sock.write_all(req.as_bytes()).await.unwrap();
        stuck.push(sock); // never read
    }
    // The reading subscriber's stream lasts as long as the test: a client without the 60 s
    // total-request timeout of `c`.
    let long = client(Duration::from_secs(600));
    let mut reader = Sse::open(&long, &s.events_url("orders"), READER, None).await;
    let before = rss_kib(s.pid());
    // 100 requests of 100 events of ~1 KiB: 10 MB written, 300 MB if every stuck tail buffered it.
    let pad = "p".repeat(1000);
    for batch in 0..100 {
        let events: Vec<Value> = (0..100)
            .map(|i| json!({"value": {"n": batch * 100 + i, "pad": pad}}))
            .collect();
        publish(&c, &s, "orders", json!(events)).await;
    }
    let got = reader.records(10_000).await;
    assert_eq!(got.len(), 10_000, "the reading subscriber got every event");
    let grown_mib = rss_kib(s.pid()).saturating_sub(before) / 1024;
    // The shared cache of rendered records is bounded by 64 MiB; each stuck tail by one read.
    assert!(
        grown_mib < 128,
        "the gateway grew by {grown_mib} MiB with 30 tails not reading"
    );
    drop(stuck);
}

/// Read-your-writes: a record is readable once its producer has the ack (the partition's
/// readable end moves before the ack is sent), never after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acked_event_is_readable_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config("")).unwrap();
    let c = client(Duration::from_secs(20));
    for n in 0..100 {
        let a = Answer::of(
            c.post(s.events_url("orders"))
                .header("x-api-key", WRITER)
                .json(&json!([{"key": format!("k{n}"), "value": {"n": n}}])),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        let (p, o) = (
            a.body["results"][0]["partition"].as_u64().unwrap(),
            a.body["results"][0]["offset"].as_u64().unwrap(),
        );
        let r = read(
            &c,
            &s,
            "orders",
            &format!("partition={p}&from_offset={o}"),
            READER,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(
            r.body["records"][0]["value"]["n"], n,
            "acked {p}:{o}, read {r:?}"
        );
    }
}
