//! Traces (`[telemetry.traces]`) against the real binary and an OTLP/gRPC receiver on
//! 127.0.0.1 (`sluice_tests::otlp`: the collector's own `TraceService`, generated from its
//! `.proto` files): a producer's W3C trace context on every protocol (HTTP header, gRPC
//! metadata, MQTT 5 user property, a WebSocket event's `headers`) is continued by Sluice's
//! spans and stored in the records; unsampled and invalid contexts are propagated without
//! spans; a collector that hangs costs producers nothing and what does not fit is dropped and
//! counted.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::otlp::{Received, Receiver};
use sluice_tests::{Sluice, metric_or_zero, wait_until};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

fn traceparent(trace: &str, parent: &str) -> String {
    format!("00-{trace}-{parent}-01")
}

/// `stream`'s records once there are `n` (20 s at most).
async fn records(s: &Sluice, stream: &str, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(WAIT, || {
        last = s.read_log(stream).unwrap_or_default();
        let done = last.len() >= n;
        async move { done }
    })
    .await;
    assert!(ok, "{stream}: {} records, not {n}", last.len());
    last
}

fn header(r: &Value, name: &str) -> Option<String> {
    r["headers"][name].as_str().map(str::to_string)
}

/// The `sluice.receive` span of `trace` with its three children, once all four arrived.
async fn receive_span(rx: &Receiver, trace: &str) -> (Received, Vec<Received>) {
    let spans = rx
        .wait(WAIT, |all| {
            all.iter().filter(|s| s.trace_id() == trace).count() >= 4
        })
        .await
        .unwrap_or_else(|| panic!("no four spans of trace {trace}: {:#?}", rx.spans()));
    let of: Vec<Received> = spans
        .into_iter()
        .filter(|s| s.trace_id() == trace)
        .collect();
    let receive = of
        .iter()
        .find(|s| s.span.name == "sluice.receive")
        .unwrap_or_else(|| panic!("no receive span: {of:#?}"))
        .clone();
    let mut children: Vec<Received> = of
        .into_iter()
        .filter(|s| s.span.name != "sluice.receive")
        .collect();
    children.sort_by_key(|c| c.span.start_time_unix_nano);
    let names: Vec<&str> = children.iter().map(|c| c.span.name.as_str()).collect();
    assert_eq!(names, ["admission", "append", "ack"], "{children:#?}");
    for c in &children {
        assert_eq!(c.parent_id(), receive.span_id(), "{c:#?}");
        assert!(c.span.start_time_unix_nano >= receive.span.start_time_unix_nano);
        assert!(c.span.end_time_unix_nano <= receive.span.end_time_unix_nano);
    }
    // One after the other: admission ends where append starts, append where ack starts.
    assert_eq!(
        children[0].span.end_time_unix_nano,
        children[1].span.start_time_unix_nano
    );
    assert_eq!(
        children[1].span.end_time_unix_nano,
        children[2].span.start_time_unix_nano
    );
    assert_eq!(
        receive.resource_attr("service.name").as_deref(),
        Some("sluice")
    );
    (receive, children)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_trace_is_continued_on_every_protocol_and_stored_with_its_events() {
    let rx = Receiver::start(false).await;
    let tmp = tempfile::tempdir().unwrap();
    // Ratio 0: only what producers sampled is exported (parent-based sampling), so the
    // contexts Sluice starts itself must reach the records without a span.
    let s = Sluice::start(
        &tmp.path().join("data"),
        &format!(
            "[telemetry.traces]\nenabled = true\notlp_endpoint = \"{}\"\nsampling_ratio = 0.0\n",
            rx.endpoint()
        ),
    )
    .unwrap();
    let c = sluice_tests::http::client(WAIT);
    let (t_http, t_own, t_grpc, t_mqtt, t_ws, t_state) = (
        "0af7651916cd43dd8448eb211c80319c",
        "11111111111111111111111111111111",
        "22222222222222222222222222222222",
        "33333333333333333333333333333333",
        "44444444444444444444444444444444",
        "55555555555555555555555555555555",
    );
    let parent = "b7ad6b7169203331";

    // HTTP: the request's header is the batch's parent; an event in another trace keeps its
    // own context and the span links to it.
    let own = traceparent(t_own, "00f067aa0ba902b7");
    let r = c
        .post(s.events_url("traced-http"))
        .header("content-type", "application/json")
        .header("traceparent", traceparent(t_http, parent))
        .body(format!(
            r#"[{{"value":1}},{{"value":2,"headers":{{"traceparent":"{own}"}}}}]"#
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // tracestate is passed on; one longer than 512 bytes is not (the trace still is).
    for (stream, state) in [
        ("traced-state", "vendor=abc,other=1".to_string()),
        ("traced-long-state", format!("v={}", "x".repeat(600))),
    ] {
        let r = c
            .post(s.events_url(stream))
            .header("content-type", "application/json")
            .header("traceparent", traceparent(t_state, parent))
            .header("tracestate", state)
            .body("{\"value\":1}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // gRPC: the call's metadata.
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut req = tonic::Request::new(pb::PublishRequest {
        stream: "traced-grpc".into(),
        events: vec![pb::Event {
            value: b"g".to_vec().into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    req.metadata_mut()
        .insert("traceparent", traceparent(t_grpc, parent).parse().unwrap());
    IngestClient::new(ch).publish(req).await.unwrap();

    // MQTT 5: a user property.
    {
        use rumqttc::v5::mqttbytes::QoS;
        use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
        let a = s.mqtt.unwrap();
        let mut o = rumqttc::v5::MqttOptions::new("tracer", a.ip().to_string(), a.port());
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
        let props = PublishProperties {
            user_properties: vec![("traceparent".into(), traceparent(t_mqtt, parent))],
            ..Default::default()
        };
        client
            .publish_with_properties("traced-mqtt/dev1", QoS::AtLeastOnce, false, "m", props)
            .await
            .unwrap();
        loop {
            let ev = tokio::time::timeout(WAIT, el.poll())
                .await
                .unwrap()
                .unwrap();
            if let rumqttc::v5::Event::Incoming(Packet::PubAck(_)) = ev {
                break;
            }
        }
    }

    // WebSocket: the event's headers.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/traced-ws/ws", s.http))
            .await
            .unwrap();
    ws.send(Message::text(format!(
        r#"{{"value":1,"headers":{{"traceparent":"{}"}}}}"#,
        traceparent(t_ws, parent)
    )))
    .await
    .unwrap();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(t))) => {
                assert!(t.contains("\"offset\""), "{t}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }

    // No context, and one that is not W3C Trace Context: Sluice starts an unsampled trace.
    // A valid context padded past 128 bytes (a future version's extra fields) is not read.
    let long = format!("{}-{}", traceparent(t_state, parent), "ab".repeat(60));
    for (stream, tp) in [
        ("untraced", None),
        ("invalid", Some("00-zzzz-not-a-context")),
        ("too-long", Some(long.as_str())),
    ] {
        let mut b = c
            .post(s.events_url(stream))
            .header("content-type", "application/json")
            .body("{\"value\":1}");
        if let Some(tp) = tp {
            b = b.header("traceparent", tp);
        }
        assert_eq!(b.send().await.unwrap().status(), 200);
    }

    // Each sampled trace: Sluice's span is the producer's span's child, and the record's
    // traceparent names Sluice's span, so a consumer's span is Sluice's child.
    for (trace, stream, protocol) in [
        (t_http, "traced-http", "http"),
        (t_grpc, "traced-grpc", "grpc"),
        (t_mqtt, "traced-mqtt", "mqtt"),
        (t_ws, "traced-ws", "websocket"),
    ] {
        let (receive, _) = receive_span(&rx, trace).await;
        assert_eq!(receive.parent_id(), parent, "{protocol}: {receive:#?}");
        assert_eq!(
            receive.attr("network.protocol.name").as_deref(),
            Some(protocol)
        );
        assert_eq!(
            receive.attr("messaging.destination.name").as_deref(),
            Some(stream)
        );
        assert_eq!(receive.attr("sluice.outcome").as_deref(), Some("ok"));
        let recs = records(&s, stream, 1).await;
        assert_eq!(
            header(&recs[0], "traceparent"),
            Some(format!("00-{trace}-{}-01", receive.span_id())),
            "{protocol}: {}",
            recs[0]
        );
        if protocol == "http" {
            // The event in its own trace kept its context, linked from the batch's span.
            assert_eq!(header(&recs[1], "traceparent"), Some(own.clone()));
            assert_eq!(receive.span.links.len(), 1, "{receive:#?}");
            assert_eq!(
                sluice_tests::otlp::hex(&receive.span.links[0].trace_id),
                t_own
            );
            assert_eq!(
                receive.attr("messaging.batch.message_count").as_deref(),
                Some("2")
            );
        }
    }
    // tracestate: passed on when it is at most 512 bytes.
    let rec = &records(&s, "traced-state", 1).await[0];
    assert_eq!(
        header(rec, "tracestate").as_deref(),
        Some("vendor=abc,other=1")
    );
    let rec = &records(&s, "traced-long-state", 1).await[0];
    assert_eq!(header(rec, "tracestate"), None, "{rec}");
    assert!(
        header(rec, "traceparent").unwrap().contains(t_state),
        "{rec}"
    );

    // Unsampled contexts Sluice started: in the records, flags 00, trace ids of their own.
    let mut started = Vec::new();
    for stream in ["untraced", "invalid", "too-long"] {
        let rec = &records(&s, stream, 1).await[0];
        let tp = header(rec, "traceparent").unwrap_or_else(|| panic!("{rec}"));
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[3]), ("00", "00"), "{tp}");
        assert_eq!(parts[1].len(), 32);
        assert!(parts[1].bytes().all(|b| b.is_ascii_hexdigit()) && parts[1] != "0".repeat(32));
        started.push(parts[1].to_string());
    }
    assert!(started[0] != started[1] && started[1] != started[2] && started[2] != t_state);
    let m = s.metrics().await;
    assert_eq!(
        metric_or_zero(&m, "sluice_trace_contexts_total", "origin=\"invalid\""),
        2.0,
        "{m}"
    );
    assert!(metric_or_zero(&m, "sluice_trace_contexts_total", "origin=\"producer\"") >= 6.0);

    // A drain exports what is queued: after it, every sampled trace is complete and no span
    // of an unsampled one was sent.
    let mut s = s;
    assert!(s.terminate().unwrap().success());
    let all = rx.spans();
    for t in &started {
        assert!(
            all.iter().all(|sp| &sp.trace_id() != t),
            "unsampled {t} exported"
        );
    }
    // 4 spans per sampled batch: traced-http, 2 × state, grpc, mqtt, ws.
    assert_eq!(all.len(), 6 * 4, "{all:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_costs_producers_nothing_and_overflow_is_counted() {
    let rx = Receiver::start(true).await;
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        &format!(
            "[telemetry.traces]\nenabled = true\notlp_endpoint = \"{}\"\nsampling_ratio = 1.0\n\
             export_timeout_ms = 300\nmax_queued_spans = 8\nmax_export_batch = 4\n",
            rx.endpoint()
        ),
    )
    .unwrap();
    let c = sluice_tests::http::client(WAIT);
    // 40 spans against a queue of 8 and an exporter stuck for 300 ms per batch of 4.
    for i in 0..10 {
        let r = c
            .post(s.events_url("hung"))
            .header("content-type", "application/json")
            .body(format!("{{\"value\":{i}}}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(records(&s, "hung", 10).await.len(), 10);
    let counted = wait_until(WAIT, || async {
        let m = s.metrics().await;
        metric_or_zero(&m, "sluice_trace_spans_total", "result=\"failed\"") >= 4.0
            && metric_or_zero(&m, "sluice_trace_spans_total", "result=\"dropped\"") >= 1.0
    })
    .await;
    let last = s.metrics().await;
    assert!(counted, "{last}");
    assert_eq!(
        metric_or_zero(&last, "sluice_trace_spans_total", "result=\"exported\""),
        0.0
    );
    assert!(rx.spans().is_empty());
}
