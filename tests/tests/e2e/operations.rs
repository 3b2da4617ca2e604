//! Operations against the real binary: the metrics exposition parses and its counters move by
//! exactly the scripted mix of accepted and refused traffic on every protocol (HTTP, gRPC,
//! WebSocket, MQTT); the log level changes at run time through the admin listener.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rmqtt_codec::v5;
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::Sluice;
use sluice_tests::mqtt::{connect5, publish, session5};
use tokio_tungstenite::tungstenite::Message;

/// Every sample of an OpenMetrics text: `name{labels}` → value. Panics on a line that is not a
/// comment or a `series value` pair (the exposition must parse).
fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut eof = false;
    for line in text.lines() {
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(series.starts_with("sluice_"), "unprefixed series {line:?}");
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    assert!(eof, "the exposition ends with # EOF");
    out
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> f64 {
    m.get(series).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_the_scripted_traffic_on_every_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start(&dir.path().join("data"), "").unwrap();
    let before = samples(&s.metrics().await);
    let http = reqwest::Client::new();

    // HTTP: 3 events accepted in one request; one request refused as malformed (bad JSON).
    let r = http
        .post(s.events_url("ops"))
        .header("content-type", "application/json")
        .body(r#"[{"value":1},{"value":2},{"value":3}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .post(s.events_url("ops"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // gRPC: 2 events accepted; one call refused (invalid stream name).
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut g = IngestClient::new(ch);
    let ev = |v: &str| pb::Event {
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    };
    g.publish(pb::PublishRequest {
        stream: "ops".into(),
        events: vec![ev("g1"), ev("g2")],
        content_type: String::new(),
        idempotency_key: String::new(),
    })
    .await
    .unwrap();
    let refused = g
        .publish(pb::PublishRequest {
            stream: "bad stream".into(),
            events: vec![ev("g3")],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::InvalidArgument);

    // WebSocket: 1 event accepted.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/ops/ws", s.http))
            .await
            .unwrap();
    ws.send(Message::text(r#"{"value":"w1"}"#)).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => {
                assert!(t.contains("offset"), "{t}");
                break;
            }
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    }
    ws.close(None).await.unwrap();

    // MQTT: 2 QoS 1 publishes accepted; one refused (payload marked UTF-8, but is not).
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("ops", 30)).await;
    let utf8 = v5::PublishProperties {
        is_utf8_payload: true,
        ..Default::default()
    };
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "ops/a",
        1,
        1,
        b"m1",
        Some(Default::default()),
    ))))
    .await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "ops/a",
        1,
        2,
        b"m2",
        Some(Default::default()),
    ))))
    .await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "ops/a",
        1,
        3,
        b"\xff",
        Some(utf8),
    ))))
    .await;
    for want in [0u8, 0, 0x99] {
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), want),
            other => panic!("{other:?}"),
        }
    }

    let after = samples(&s.metrics().await);
    let delta = |series: &str| get(&after, series) - get(&before, series);
    for (protocol, n) in [
        ("http", 3.0),
        ("grpc", 2.0),
        ("websocket", 1.0),
        ("mqtt", 2.0),
    ] {
        assert_eq!(
            delta(&format!(
                r#"sluice_events_in_total{{stream="ops",protocol="{protocol}"}}"#
            )),
            n,
            "{protocol} events in"
        );
        // Refused before admission (bad JSON, bad stream name, bad UTF-8) is not "received".
        assert_eq!(
            delta(&format!(
                r#"sluice_events_received_total{{protocol="{protocol}"}}"#
            )),
            n,
            "{protocol} events received"
        );
        assert!(
            delta(&format!(
                r#"sluice_connections_opened_total{{protocol="{protocol}"}}"#
            )) >= 1.0,
            "{protocol} connections opened"
        );
    }
    assert_eq!(
        delta(r#"sluice_requests_total{protocol="http",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"sluice_requests_total{protocol="http",outcome="malformed"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"sluice_requests_total{protocol="grpc",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"sluice_requests_total{protocol="grpc",outcome="malformed"}"#),
        1.0
    );
    assert_eq!(
        delta(r#"sluice_events_rejected_total{protocol="mqtt",reason="malformed"}"#),
        1.0
    );
    assert_eq!(get(&after, "sluice_ready"), 1.0);
    let last = get(
        &after,
        r#"sluice_stream_last_event_timestamp_seconds{stream="ops"}"#,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - last).abs() < 60.0, "last event at {last}, now {now}");
    assert!(
        after
            .iter()
            .any(|(k, v)| k.starts_with("sluice_build_info{version=") && *v == 1.0),
        "build info"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_run_time_through_the_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    let (s, mut logs) = Sluice::start_with_logs(
        &dir.path().join("data"),
        "[telemetry]\nlog_format = \"json\"\n",
        &[],
    )
    .unwrap();
    let mqtt = s.mqtt.unwrap();
    let started = |v: &serde_json::Value| v["fields"]["message"] == "MQTT session started";
    // At `warn`, a new MQTT session (logged at debug) leaves no line.
    let (quiet, _) = session5(mqtt, connect5("before-debug", 30)).await;
    drop(quiet);
    let c = reqwest::Client::new();
    let url = s.admin_url("/loglevel");
    // The harness starts the gateway with RUST_LOG=warn.
    assert_eq!(
        c.get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .trim(),
        "warn"
    );
    let r = c
        .put(&url)
        .body("sluice=debug,hyper=warn")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        c.get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .trim(),
        "sluice=debug,hyper=warn"
    );
    // Now the next session is logged, and the one before the change was not (lines come in
    // order, so it would have been read first).
    let (loud, _) = session5(mqtt, connect5("after-debug", 30)).await;
    let line = logs
        .wait_for_json(Duration::from_secs(20), started)
        .unwrap_or_else(|| panic!("no session line at debug in {:#?}", logs.seen));
    assert_eq!(line["span"]["client_id"], "after-debug", "{line}");
    assert!(
        !logs.seen.iter().any(|l| l.contains("before-debug")),
        "a debug line was written at warn: {:#?}",
        logs.seen
    );
    drop(loud);
    // A filter that does not parse is refused and the level stays.
    let r = c.put(&url).body("sluice=loudest").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("not a log filter"));
    assert_eq!(
        c.get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .trim(),
        "sluice=debug,hyper=warn"
    );
    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_connection_and_request_spans_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let key = "logdev.t0p-s3cret";
    let (s, mut logs) = Sluice::start_with_logs(
        &dir.path().join("data"),
        &format!(
            "[telemetry]\nlog_format = \"json\"\n[http.auth]\nallow_anonymous = false\n[mqtt.auth]\nallow_anonymous = false\n{}",
            sluice_tests::api_key_entry(key, "log-device", &["*"])
        ),
        &[("RUST_LOG", "sluice=debug,info")],
    )
    .unwrap();
    let mqtt = s.mqtt.unwrap();
    // A device with the key as its password, and one with a wrong secret.
    let mut c = connect5("pump-9", 30);
    c.password = Some(bytes::Bytes::from_static(key.as_bytes()));
    let (raw, _) = session5(mqtt, c).await;
    let mut bad = connect5("pump-x", 30);
    bad.password = Some(bytes::Bytes::from_static(b"logdev.wrong-s3cret"));
    let mut r = sluice_tests::mqtt::Raw::connect(mqtt, true).await;
    r.send5(v5::Packet::Connect(Box::new(bad))).await;
    match r.recv5().await {
        Some(v5::Packet::ConnectAck(a)) => assert_eq!(u8::from(a.reason_code), 0x86),
        other => panic!("expected CONNACK 0x86 for a wrong secret, got {other:?}"),
    }
    drop(raw);
    let session_line = logs.wait_for_json(Duration::from_secs(20), |v| {
        v["fields"]["message"] == "MQTT session started"
    });
    // The two connections log concurrently: the failure may come first.
    let failure_line = logs.find_json(Duration::from_secs(20), |v| {
        v["fields"]["message"] == "authentication failed" && v["fields"]["protocol"] == "mqtt"
    });
    let lines = &logs.seen;
    for l in lines {
        assert!(
            serde_json::from_str::<serde_json::Value>(l).is_ok(),
            "not JSON: {l:?}"
        );
    }
    let v = session_line.unwrap_or_else(|| panic!("no session line in {lines:#?}"));
    let span = &v["span"];
    assert_eq!(span["protocol"], "mqtt", "{v}");
    assert_eq!(span["client_id"], "pump-9", "{v}");
    assert_eq!(span["principal"], "log-device", "{v}");
    assert!(
        span["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{v}"
    );
    // The failed login is logged with method and reason, never with the secret.
    let f = failure_line.unwrap_or_else(|| panic!("no failure line in {lines:#?}"));
    // A wrong secret reads as an unknown key (no hint which key ids exist).
    assert_eq!(f["fields"]["reason"], "unknown_key", "{f}");
    assert_eq!(f["span"]["protocol"], "mqtt", "{f}");
    let all = lines.join("\n");
    assert!(
        !all.contains("t0p-s3cret") && !all.contains("wrong-s3cret"),
        "a secret reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_drain_deadline_in_flight_events_are_answered_retryable_not_cut_off() {
    // A log slower than the drain deadline: what is in flight cannot reach its ack point.
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sluice::start(
        &dir.path().join("data"),
        "[server]\nshutdown_timeout_ms = 2500\n[log]\nfault_append_delay_ms = 8000\n",
    )
    .unwrap();
    let url = s.events_url("slowdrain");
    let http = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(r#"{"value":"late"}"#)
            .send()
            .await
    });
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("late", 30)).await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "slowdrain/k",
        1,
        1,
        b"late",
        Some(Default::default()),
    ))))
    .await;
    let in_flight = sluice_tests::wait_until(Duration::from_secs(10), || async {
        sluice_tests::metric(&s.metrics().await, "sluice_in_flight_bytes", "") > 0.0
    })
    .await;
    assert!(in_flight);
    let t0 = std::time::Instant::now();
    s.signal("TERM").unwrap();
    // HTTP: 503 with Retry-After before the process exits, not a cut connection.
    let r = http
        .await
        .unwrap()
        .expect("an HTTP answer, not a broken connection");
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(r.text().await.unwrap().contains("may or may not be stored"));
    // MQTT 5: PUBACK 0x83 with the reason, then DISCONNECT 0x8B.
    match raw.recv5().await {
        Some(v5::Packet::PublishAck(a)) => {
            assert_eq!(u8::from(a.reason_code), 0x83);
            assert!(a.reason_string.is_some_and(|r| r.contains("shutting down")));
        }
        other => panic!("{other:?}"),
    }
    match raw.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x8B),
        other => panic!("{other:?}"),
    }
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "answered before the deadline"
    );
    // A drain cut by its deadline exits with status 1 (docs/operations.md).
    let status = s.wait_exit().unwrap();
    assert_eq!(status.code(), Some(1), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_on_every_protocol_loses_no_acked_event() {
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let mut s = Sluice::start(&dir.path().join("data"), "").unwrap();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    // HTTP.
    for id in 0..2 {
        let (url, acked) = (s.events_url("drainall"), acked.clone());
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            for n in 0.. {
                let v = format!("h{id}-{n}");
                let Ok(r) = c
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(format!("{{\"value\":\"{v}\"}}"))
                    .send()
                    .await
                else {
                    return;
                };
                if r.status() != 200 {
                    return;
                }
                acked.lock().unwrap().push(format!("\"{v}\""));
            }
        }));
    }
    // gRPC.
    {
        let (url, acked) = (s.grpc_url(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let ch = tonic::transport::Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut g = IngestClient::new(ch);
            for n in 0.. {
                let v = format!("g-{n}");
                let req = pb::PublishRequest {
                    stream: "drainall".into(),
                    events: vec![pb::Event {
                        value: v.clone().into_bytes().into(),
                        ..Default::default()
                    }],
                    content_type: String::new(),
                    idempotency_key: String::new(),
                };
                match g.publish(req).await {
                    Ok(r)
                        if r.get_ref().results.iter().all(|e| {
                            matches!(e.result, Some(pb::event_result::Result::Position(_)))
                        }) =>
                    {
                        acked.lock().unwrap().push(v)
                    }
                    _ => return,
                }
            }
        }));
    }
    // WebSocket: one frame at a time, acked by offset.
    {
        let (url, acked) = (
            format!("ws://{}/v1/streams/drainall/ws", s.http),
            acked.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            for n in 0.. {
                let v = format!("w-{n}");
                if ws
                    .send(Message::text(format!("{{\"value\":\"{v}\"}}")))
                    .await
                    .is_err()
                {
                    return;
                }
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.contains("\"offset\"") => {
                            acked.lock().unwrap().push(format!("\"{v}\""));
                            break;
                        }
                        Some(Ok(Message::Text(_)))
                        | None
                        | Some(Err(_))
                        | Some(Ok(Message::Close(_))) => return,
                        Some(Ok(_)) => continue,
                    }
                }
            }
        }));
    }
    // MQTT 5: one QoS 1 publish at a time, until DISCONNECT 0x8B. A publish the gateway read is
    // answered before it disconnects; one still unread in the socket is neither answered nor
    // stored (the client resends it after reconnecting).
    let mqtt_task = {
        let (addr, acked) = (s.mqtt.unwrap(), acked.clone());
        tokio::spawn(async move {
            let (mut raw, _) = session5(addr, connect5("drainer", 30)).await;
            for n in 1u16.. {
                let mut p = publish("drainall/m", 1, n, b"", Some(Default::default()));
                let v = format!("m-{n}");
                p.payload = bytes::Bytes::from(v.clone());
                raw.send5(v5::Packet::Publish(Box::new(p))).await;
                match raw.recv5().await {
                    Some(v5::Packet::PublishAck(a)) if u8::from(a.reason_code) == 0 => {
                        acked.lock().unwrap().push(v)
                    }
                    Some(v5::Packet::PublishAck(_)) | None => return None,
                    Some(v5::Packet::Disconnect(d)) => {
                        assert_eq!(u8::from(d.reason_code), 0x8B);
                        return Some(v);
                    }
                    other => panic!("{other:?}"),
                }
            }
            None
        })
    };
    let loaded = sluice_tests::wait_until(Duration::from_secs(30), || {
        let n = acked.lock().unwrap().len();
        async move { n >= 400 }
    })
    .await;
    assert!(loaded, "only {} acks", acked.lock().unwrap().len());
    let status = s.terminate().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .unwrap()
            .unwrap();
    }
    let unanswered = tokio::time::timeout(Duration::from_secs(20), mqtt_task)
        .await
        .unwrap()
        .unwrap();
    let stored: std::collections::HashSet<String> =
        sluice_tests::read_log(&s.data_dir, "drainall", &[])
            .unwrap()
            .iter()
            .map(|r| match &r["value"] {
                serde_json::Value::String(v) => v.clone(),
                other => other.to_string(),
            })
            .collect();
    if let Some(v) = unanswered {
        assert!(!stored.contains(&v), "{v} was stored but never answered");
    }
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<&String> = acked.iter().filter(|v| !stored.contains(*v)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acked events lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    for prefix in ["h0-", "g-", "w-", "m-"] {
        assert!(
            acked
                .iter()
                .any(|v| v.trim_matches('"').starts_with(prefix)),
            "no {prefix} acks"
        );
    }
}
