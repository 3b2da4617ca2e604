//! Quotas against the real binary: the protocol-native signal with an accurate retry hint,
//! per-event answers for partly admitted batches, the admitted rate, fairness between principals
//! on a shared stream, and the delay policy.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::http::Answer;
use sluice_tests::{Sluice, api_key_entry, metric};

async fn post(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    n: usize,
) -> (u16, Option<String>, Value) {
    let events: Vec<Value> = (0..n).map(|i| json!(i)).collect();
    let mut req = c.post(url).json(&events);
    if let Some(k) = key {
        req = req.header("x-api-key", k);
    }
    let a = Answer::of(req).await;
    (a.status.as_u16(), a.retry_after, a.body)
}

fn admitted(body: &Value) -> usize {
    body["results"].as_array().map_or(0, |r| {
        r.iter().filter(|e| e.get("offset").is_some()).count()
    })
}

#[tokio::test]
async fn a_batch_over_quota_is_answered_per_event_and_then_with_429() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        // 1 event/s after a burst of 10: the checks below tolerate a stalled machine for 1 s.
        "[[quotas.rules]]\nscope = \"stream\"\nstreams = \"q.*\"\nevents_per_sec = 1\nburst_events = 10\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    let (st, _, body) = post(&c, &s.events_url("q.one"), None, 15).await;
    assert_eq!(st, 200);
    assert_eq!(admitted(&body), 10, "the burst is admitted: {body}");
    assert_eq!(body["failed"], 5);
    let refused = &body["results"][10]["error"];
    assert_eq!(refused["code"], "over_quota");
    let hint = refused["retry_after_ms"].as_u64().unwrap();
    assert!((900..=1000).contains(&hint), "one event per second: {hint}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("stream quota of 1 events/s")
    );
    // Nothing fits now: the whole request gets 429 with Retry-After in whole seconds.
    let (st, retry, body) = post(&c, &s.events_url("q.one"), None, 1).await;
    assert_eq!(st, 429, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(body["error"]["code"], "over_quota");
    assert!(body["error"]["retry_after_ms"].as_u64().unwrap() <= 1000);
    // Streams the rule does not match are not limited.
    let (st, _, body) = post(&c, &s.events_url("other"), None, 50).await;
    assert_eq!((st, admitted(&body)), (200, 50));
    assert_eq!(
        s.read_log("q.one").unwrap().len(),
        10,
        "refused events are not in the log"
    );
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_events_throttled_total",
            r#"stream="q.one",scope="stream",principal="other""#
        ),
        6.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admitted_rate_over_five_seconds_is_within_ten_percent_of_the_quota() {
    let tmp = tempfile::tempdir().unwrap();
    // A one-second burst: producer stalls shorter than that (a busy CI machine) lose nothing.
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[[quotas.rules]]\nscope = \"stream\"\nevents_per_sec = 200\nburst_events = 200\n",
    )
    .unwrap();
    let url = s.events_url("rate");
    // Empty the bucket first, so the window measures the rate alone.
    let c = reqwest::Client::new();
    let mut drained = 0;
    loop {
        let (st, _, body) = post(&c, &url, None, 50).await;
        drained += admitted(&body);
        if st == 429 || body.get("failed").is_some() {
            break;
        }
    }
    assert!(drained >= 200, "the burst is admitted first ({drained})");
    let start = Instant::now();
    let window = Duration::from_secs(5);
    let producers: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let (mut ok, mut signalled) = (0, 0);
                while start.elapsed() < window {
                    let (st, _, body) = post(&c, &url, None, 10).await;
                    ok += admitted(&body);
                    if st == 429 || body.get("failed").is_some() {
                        signalled += 1;
                    }
                }
                (ok, signalled)
            })
        })
        .collect();
    let (mut ok, mut signalled) = (0, 0);
    for p in producers {
        let (o, sg) = p.await.unwrap();
        ok += o;
        signalled += sg;
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = ok as f64 / secs;
    assert!(
        (180.0..=220.0).contains(&rate),
        "admitted {ok} events in {secs:.2} s = {rate:.1}/s; the quota is 200/s"
    );
    assert!(signalled > 0, "the producers were told to slow down");
    assert_eq!(s.read_log("rate").unwrap().len(), ok + drained);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_principal_does_not_push_a_polite_one_below_its_quota() {
    let tmp = tempfile::tempdir().unwrap();
    let (flood, polite) = ("flood.0123456789abcdef", "polite.0123456789abcdef");
    let config = format!(
        "[quotas]\nmetrics_principals = [\"flooder\"]\n\
         [[quotas.rules]]\nscope = \"principal_stream\"\nevents_per_sec = 100\nburst_events = 10\n{}{}",
        api_key_entry(flood, "flooder", &["*"]),
        api_key_entry(polite, "polite", &["*"])
    );
    let s = Sluice::start(&tmp.path().join("data"), &config).unwrap();
    let url = s.events_url("shared");
    let start = Instant::now();
    let window = Duration::from_secs(3);
    let flooders: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut refused = 0;
                while start.elapsed() < window {
                    let (st, _, _) = post(&c, &url, Some(flood), 20).await;
                    refused += usize::from(st == 429);
                }
                refused
            })
        })
        .collect();
    // The polite producer sends 5 events every 100 ms: 50 events/s, half its quota.
    let c = reqwest::Client::new();
    let (mut sent, mut ok) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Never catch up on late ticks with a burst: the polite producer stays at 50 events/s.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while start.elapsed() < window {
        tick.tick().await;
        let (_, _, body) = post(&c, &url, Some(polite), 5).await;
        sent += 5;
        ok += admitted(&body);
    }
    let mut refused = 0;
    for f in flooders {
        refused += f.await.unwrap();
    }
    assert!(refused > 0, "the flooder was throttled");
    assert_eq!(
        ok, sent,
        "the polite producer kept its whole quota ({ok} of {sent})"
    );
    let m = s.metrics().await;
    assert!(
        metric(
            &m,
            "sluice_events_throttled_total",
            r#"stream="shared",scope="principal_stream",principal="flooder""#
        ) > 0.0
    );
    assert_eq!(
        sluice_tests::metric_or_zero(
            &m,
            "sluice_events_throttled_total",
            r#"stream="shared",scope="principal_stream",principal="other""#
        ),
        0.0
    );
}

#[tokio::test]
async fn a_delay_quota_holds_a_request_until_it_fits_then_rejects_beyond_max_delay() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[quotas]\nmax_delay_ms = 1000\n[[quotas.rules]]\nscope = \"stream\"\nevents_per_sec = 20\nburst_events = 1\npolicy = \"delay\"\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    let t = Instant::now();
    let (st, _, body) = post(&c, &s.events_url("slow"), None, 6).await;
    let held = t.elapsed();
    assert_eq!((st, admitted(&body)), (200, 6), "{body}");
    assert!(
        held >= Duration::from_millis(200),
        "5 events at 20/s need 250 ms; held {held:?}"
    );
    // 40 more events need 2 s, more than max_delay: held up to 1 s, the rest refused.
    let (st, _, body) = post(&c, &s.events_url("slow"), None, 40).await;
    assert_eq!(st, 200);
    let n = admitted(&body);
    assert!((15..=25).contains(&n), "about 1 s worth admitted, got {n}");
    assert_eq!(body["failed"].as_u64().unwrap() as usize, 40 - n);
    let m = s.metrics().await;
    assert!(metric(&m, "sluice_requests_delayed_total", "") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_and_in_flight_limits_shed_load_with_503_and_count_it() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[http]\nmax_concurrent_requests = 2\n[log]\nfault_append_delay_ms = 5000\n\
         [limits]\nmax_in_flight_bytes = 4096\n[streams.defaults]\nmax_body_bytes = 4096\nmax_event_bytes = 4096\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    // One request holds 4000 of the 4096 budget bytes and one of the two request slots.
    let first = hold_budget(&s, "shed").await;
    // 20 tiny events: the 41-byte body fits, but with framing they need 500 bytes: shed.
    let (st, retry, body) = post(&c, &s.events_url("shed"), None, 20).await;
    assert_eq!((st, retry.as_deref()), (503, Some("1")), "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in-flight budget")
    );
    let m = s.metrics().await;
    // The stream may not exist yet when the budget refuses (then the label is `other`).
    let shed = sluice_tests::metric_or_zero(
        &m,
        "sluice_events_shed_total",
        r#"stream="shed",reason="in_flight_budget""#,
    ) + sluice_tests::metric_or_zero(
        &m,
        "sluice_events_shed_total",
        r#"stream="other",reason="in_flight_budget""#,
    );
    assert_eq!(shed, 20.0);
    // Two requests in flight at once: the third is refused without waiting.
    let second = tokio::spawn({
        let (c, url) = (c.clone(), s.events_url("other"));
        async move {
            c.post(url)
                .json(&json!([1]))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    assert!(
        sluice_tests::wait_until(Duration::from_secs(10), || async {
            metric(&s.metrics().await, "sluice_in_flight_bytes", "") > 4000.0
        })
        .await
    );
    let (st, _, body) = post(&c, &s.events_url("other"), None, 1).await;
    assert_eq!(st, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrent requests")
    );
    assert_eq!(first.await.unwrap(), 200);
    assert_eq!(second.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_fills_its_own_budget_does_not_block_other_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[log]\nfault_append_delay_ms = 4000\n\
         [streams.declare.hot]\nmax_in_flight_bytes = 4096\nmax_body_bytes = 4096\nmax_event_bytes = 4096\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    let first = hold_budget(&s, "hot").await;
    let (st, _, body) = post(&c, &s.events_url("hot"), None, 10).await;
    assert_eq!(st, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stream `hot`")
    );
    // Another stream still has the (large) global budget.
    let (st, _, body) = post(&c, &s.events_url("cold"), None, 10).await;
    assert_eq!((st, admitted(&body)), (200, 10));
    assert_eq!(first.await.unwrap(), 200);
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_events_shed_total",
            r#"stream="hot",reason="stream_in_flight_budget""#
        ),
        10.0
    );
}

#[tokio::test]
async fn a_principal_at_its_connection_limit_gets_429_and_the_connection_closes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[http]\nmax_connections_per_principal = 2\n",
    )
    .unwrap();
    // Two keep-alive connections of the anonymous principal, each authenticated by a request.
    let mut open = Vec::new();
    for _ in 0..2 {
        let tcp = tokio::net::TcpStream::connect(s.http).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Full<bytes::Bytes>,
        >(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = http::Request::post("/v1/streams/c/events")
            .header("host", "x")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"[1]")))
            .unwrap();
        assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
        open.push(sender);
    }
    // A third connection is refused and closed.
    let r = reqwest::Client::new()
        .post(s.events_url("c"))
        .json(&json!([1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["connection"], "close");
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum of open connections")
    );
    // Closing one of the two frees its place.
    drop(open.pop());
    assert!(
        sluice_tests::wait_until(Duration::from_secs(10), || async {
            reqwest::Client::new()
                .post(s.events_url("c"))
                .json(&json!([1]))
                .send()
                .await
                .unwrap()
                .status()
                == 200
        })
        .await
    );
}

#[tokio::test]
async fn refusals_for_streams_that_do_not_exist_cannot_mint_metric_series() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[[quotas.rules]]\nscope = \"principal\"\nevents_per_sec = 1\nburst_events = 5\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    assert_eq!(post(&c, &s.events_url("real"), None, 5).await.0, 200);
    for i in 0..20 {
        let (st, _, _) = post(&c, &s.events_url(&format!("made-up-{i}")), None, 1).await;
        assert_eq!(st, 429);
    }
    let m = s.metrics().await;
    assert!(!m.contains("made-up-"), "no series per made-up stream");
    assert!(
        metric(
            &m,
            "sluice_events_throttled_total",
            r#"stream="other",scope="principal",principal="other""#
        ) >= 20.0
    );
}

/// Sends one 3970-byte event to `stream` (on a gateway whose log is slowed down) and waits until
/// it holds its place in the in-flight budget; the handle yields its final status.
async fn hold_budget(s: &Sluice, stream: &str) -> tokio::task::JoinHandle<u16> {
    let url = s.events_url(stream);
    let first = tokio::spawn(async move {
        let big = json!(["x".repeat(3970)]);
        let r = reqwest::Client::new()
            .post(url)
            .json(&big)
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    });
    assert!(
        sluice_tests::wait_until(Duration::from_secs(10), || async {
            metric(&s.metrics().await, "sluice_in_flight_bytes", "") > 3900.0
        })
        .await,
        "the first request never showed up as in flight"
    );
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_byte_quota_counts_what_each_event_costs_over_http_and_mqtt() {
    // 2000 bytes/s with a 2000-byte burst; each event below costs 476 bytes (a 452-byte value,
    // 2 bytes of JSON quotes, plus 24 of framing — docs/quotas.md): four fit in the burst.
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[[quotas.rules]]\nscope = \"stream\"\nstreams = \"b.*\"\nbytes_per_sec = 2000\nburst_bytes = 2000\n",
    )
    .unwrap();
    let value = "v".repeat(450);
    let events: Vec<Value> = (0..6).map(|_| json!(value)).collect();
    let a = Answer::of(
        reqwest::Client::new()
            .post(s.events_url("b.http"))
            .json(&events),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(admitted(&a.body), 4, "{}", a.body);
    let refused = &a.body["results"][4]["error"];
    assert_eq!(refused["code"], "over_quota", "{}", a.body);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("2000 bytes/s"),
        "{refused}"
    );
    // An event larger than the whole burst can never be admitted: 413, not a retry hint.
    let huge = json!([{"value": "x".repeat(2100)}]);
    let a = Answer::of(
        reqwest::Client::new()
            .post(s.events_url("b.huge"))
            .json(&huge),
    )
    .await;
    assert_eq!(a.status, 413, "{}", a.body);
    // MQTT 5: the same rule, per publish (0x97 once the burst is used). A publish to `b.mqtt/k`
    // costs its payload, its key `k`, the `mqtt-topic` header Sluice stores with it (10 + 8 + 8)
    // and the framing: 420 + 1 + 26 + 24 = 471 bytes, so four fit.
    let (mut raw, _) =
        sluice_tests::mqtt::session5(s.mqtt.unwrap(), sluice_tests::mqtt::connect5("bytes", 30))
            .await;
    let mut codes = Vec::new();
    for id in 1..=6u16 {
        let mut p = sluice_tests::mqtt::publish("b.mqtt/k", 1, id, b"", Some(Default::default()));
        p.payload = bytes::Bytes::from(vec![b'm'; 420]);
        raw.send5(rmqtt_codec::v5::Packet::Publish(Box::new(p)))
            .await;
    }
    while codes.len() < 6 {
        match raw.recv5().await {
            Some(rmqtt_codec::v5::Packet::PublishAck(a)) => codes.push(u8::from(a.reason_code)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(codes.iter().filter(|c| **c == 0).count(), 4, "{codes:?}");
    assert!(codes[4..].iter().all(|c| *c == 0x97), "{codes:?}");
    assert_eq!(s.read_log("b.http").unwrap().len(), 4);
    assert_eq!(s.read_log("b.mqtt").unwrap().len(), 4);
}

#[tokio::test]
async fn answers_carry_the_ietf_ratelimit_fields_for_streams_with_quotas() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        // 1 event/s after a burst of 10, and 1 MB/s of bytes (burst 2 MB): two buckets apply.
        "[[quotas.rules]]\nscope = \"stream\"\nstreams = \"rl.*\"\nevents_per_sec = 1\nburst_events = 10\nbytes_per_sec = 1000000\nburst_bytes = 2000000\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    let fields = |r: &reqwest::Response| {
        let get = |n: &str| r.headers().get(n).map(|v| v.to_str().unwrap().to_string());
        (get("ratelimit-policy"), get("ratelimit"))
    };
    let r = c
        .post(s.events_url("rl.a"))
        .json(&json!([1, 2, 3]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (policy, state) = fields(&r);
    assert_eq!(
        policy.as_deref(),
        Some(r#""stream-events";q=10;w=10, "stream-bytes";q=2000000;w=2"#)
    );
    // 3 of 10 events used: 7 left, full again in 3 s; bytes barely touched.
    let state = state.expect("a RateLimit field");
    assert!(
        state.starts_with(r#""stream-events";r=7;t=3, "stream-bytes";r="#),
        "{state}"
    );
    // Past the burst: 429, nothing left, and the fields still there beside Retry-After.
    let r = c
        .post(s.events_url("rl.a"))
        .json(&json!((0..20).collect::<Vec<_>>()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a partly admitted batch");
    let r = c
        .post(s.events_url("rl.a"))
        .json(&json!([1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    let (policy, state) = fields(&r);
    assert!(policy.is_some());
    assert!(
        state
            .as_deref()
            .is_some_and(|s| s.starts_with(r#""stream-events";r=0;t="#)),
        "{state:?}"
    );
    // A stream without quotas: no fields.
    let r = c
        .post(s.events_url("free"))
        .json(&json!([1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(fields(&r), (None, None));
}
