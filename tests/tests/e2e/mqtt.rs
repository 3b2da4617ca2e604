//! MQTT ingest against the real binary: rumqttc v4 (3.1.1) and v5 clients for QoS 0/1/2,
//! credentials, topic rules, topic aliases, subscribe refusal, quota reason codes, a publish
//! storm; a raw client (rmqtt-codec) for what client libraries will not send: QoS 2
//! retransmissions, keep-alive expiry, wills with and without delay, oversize and malformed
//! packets, unsupported versions; MQTT over WebSocket; drain with DISCONNECT 0x8B.

use std::num::NonZeroU16;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rmqtt_codec::v5;
use serde_json::Value;
use sluice_tests::mqtt::{Raw, connect3, connect5, publish, session3, session5};
use sluice_tests::{Sluice, api_key_entry, metric, read_log, wait_until};
use tokio_util::codec::{Decoder, Encoder};

const KEY: &str = "dev.s3cret";

fn start(extra: &str) -> (tempfile::TempDir, Sluice) {
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start(&dir.path().join("data"), extra).unwrap();
    assert!(s.mqtt.is_some(), "the MQTT listener is on by default");
    (dir, s)
}

/// A record's header `name` as a string (shared with mqtt_fleet).
pub(crate) fn header(rec: &Value, name: &str) -> Option<String> {
    rec["headers"][name].as_str().map(str::to_string)
}

/// The records of `stream` once there are at least `n` (20 s at most; shared with mqtt_fleet).
pub(crate) async fn log_len(s: &Sluice, stream: &str, n: usize) -> Vec<Value> {
    let mut last = Vec::new();
    let ok = wait_until(Duration::from_secs(20), || {
        let r = read_log(&s.data_dir, stream, &[]).unwrap_or_default();
        let done = r.len() >= n;
        last = r;
        async move { done }
    })
    .await;
    assert!(ok, "stream {stream} has {} of {n} records", last.len());
    last
}

mod v4client {
    pub use rumqttc::{
        AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
        QoS, SubscribeReasonCode,
    };
}

fn v4(s: &Sluice, id: &str) -> v4client::MqttOptions {
    let a = s.mqtt.unwrap();
    let mut o = v4client::MqttOptions::new(id, a.ip().to_string(), a.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o
}

fn v5opts(s: &Sluice, id: &str) -> rumqttc::v5::MqttOptions {
    let a = s.mqtt.unwrap();
    let mut o = rumqttc::v5::MqttOptions::new(id, a.ip().to_string(), a.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Polls a v4 event loop until `n` publishes are answered (PUBACK or PUBCOMP).
async fn v4_acks(el: &mut v4client::EventLoop, n: usize) -> usize {
    let mut acks = 0;
    while acks < n {
        let ev = tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("an event within 20 s")
            .expect("connection stays up");
        if let v4client::Event::Incoming(
            v4client::Packet::PubAck(_) | v4client::Packet::PubComp(_),
        ) = ev
        {
            acks += 1;
        }
    }
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_from_v4_and_v5_clients_land_with_key_and_headers() {
    let (_d, s) = start("");
    // 3.1.1: 20 QoS 1, 10 QoS 2, 5 QoS 0 (QoS 0 last, so its events are queued behind the others).
    let (c, mut el) = v4client::AsyncClient::new(v4(&s, "dev-v4"), 100);
    for i in 0..20 {
        c.publish(
            "factory1/line3/temp",
            v4client::QoS::AtLeastOnce,
            false,
            format!("q1-{i}"),
        )
        .await
        .unwrap();
    }
    for i in 0..10 {
        c.publish(
            "factory1/line3/temp",
            v4client::QoS::ExactlyOnce,
            false,
            format!("q2-{i}"),
        )
        .await
        .unwrap();
    }
    assert_eq!(v4_acks(&mut el, 30).await, 30);
    for i in 0..5 {
        c.publish(
            "factory1/line4",
            v4client::QoS::AtMostOnce,
            false,
            format!("q0-{i}"),
        )
        .await
        .unwrap();
    }
    c.disconnect().await.unwrap();
    while tokio::time::timeout(Duration::from_secs(5), el.poll())
        .await
        .is_ok_and(|r| r.is_ok())
    {}
    let recs = log_len(&s, "factory1", 35).await;
    let values: Vec<&str> = recs.iter().map(|r| r["value"].as_str().unwrap()).collect();
    // Per key, the log keeps publish order.
    let q1: Vec<&str> = values
        .iter()
        .copied()
        .filter(|v| v.starts_with("q1-"))
        .collect();
    assert_eq!(q1, (0..20).map(|i| format!("q1-{i}")).collect::<Vec<_>>());
    let q2: Vec<&str> = values
        .iter()
        .copied()
        .filter(|v| v.starts_with("q2-"))
        .collect();
    assert_eq!(q2.len(), 10, "QoS 2 is appended exactly once each");
    for r in &recs {
        let v = r["value"].as_str().unwrap();
        let key = if v.starts_with("q0-") {
            "line4"
        } else {
            "line3/temp"
        };
        assert_eq!(r["key"], key);
        assert_eq!(header(r, "sluice-protocol").as_deref(), Some("mqtt"));
        assert!(header(r, "mqtt-topic").unwrap().starts_with("factory1/"));
    }

    // 5.0: user properties, content type and payload format indicator become headers.
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PublishProperties};
    let (c5, mut el5) = rumqttc::v5::AsyncClient::new(v5opts(&s, "dev-v5"), 10);
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        user_properties: vec![("site".into(), "berlin".into())],
        ..Default::default()
    };
    c5.publish_with_properties("factory2/m1", Q5::ExactlyOnce, false, r#"{"t":21}"#, props)
        .await
        .unwrap();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(20), el5.poll())
            .await
            .unwrap()
            .unwrap();
        if let rumqttc::v5::Event::Incoming(P5::PubComp(_)) = ev {
            break;
        }
    }
    let r = &log_len(&s, "factory2", 1).await[0];
    assert_eq!(r["key"], "m1");
    assert_eq!(header(r, "site").as_deref(), Some("berlin"));
    assert_eq!(
        header(r, "content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(header(r, "mqtt-payload-format").as_deref(), Some("utf-8"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_rules_map_and_unmapped_or_invalid_publishes_get_0x90_0x99() {
    let (_d, s) = start(
        r#"
[[mqtt.topics]]
pattern = "devices/{device}/telemetry"
stream = "telemetry"
key = "{device}"

[[mqtt.topics]]
pattern = "sites/{site}/{rest+}"
stream = "{site}-events"
key = "{rest}"
"#,
    );
    let (mut raw, ack) = session5(s.mqtt.unwrap(), connect5("rules", 30)).await;
    let props = ack.clone();
    assert_eq!(props.receive_max.get(), 256, "Receive Maximum announced");
    assert_eq!(props.max_packet_size, Some(1024 * 1024));
    assert_eq!(props.topic_alias_max, 64);
    assert!(
        props.retain_available,
        "retained publishes are stored (mqtt_fleet)"
    );
    assert!(!props.wildcard_subscription_available);
    assert!(!props.shared_subscription_available);
    let utf8 = v5::PublishProperties {
        is_utf8_payload: true,
        ..Default::default()
    };
    for (i, (topic, payload, props)) in [
        ("devices/d7/telemetry", &b"21.5"[..], None),
        ("sites/berlin/hall/2", &b"open"[..], None),
        ("unmapped/topic", &b"x"[..], None),
        ("devices/d7/telemetry", &b"\xff\xfe"[..], Some(utf8.clone())),
    ]
    .into_iter()
    .enumerate()
    {
        let mut p = publish(topic, 1, i as u16 + 1, b"", Some(props.unwrap_or_default()));
        p.payload = bytes::Bytes::copy_from_slice(payload);
        raw.send5(v5::Packet::Publish(Box::new(p))).await;
    }
    let mut codes = Vec::new();
    for _ in 0..4 {
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) => {
                codes.push((a.packet_id.get(), u8::from(a.reason_code)))
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // Answers come in publish order, with the reason codes of MQTT 5.
    assert_eq!(codes, vec![(1, 0x00), (2, 0x00), (3, 0x90), (4, 0x99)]);
    let t = &log_len(&s, "telemetry", 1).await[0];
    assert_eq!(t["key"], "d7");
    let e = &log_len(&s, "berlin-events", 1).await[0];
    assert_eq!(e["key"], "hall/2");
    assert_eq!(
        read_log(&s.data_dir, "telemetry", &[]).unwrap().len(),
        1,
        "the bad payload was not appended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_connack_codes_and_per_stream_authorization() {
    let toml = format!(
        "[http.auth]\nallow_anonymous = false\n[mqtt.auth]\nallow_anonymous = false\n{}",
        api_key_entry(KEY, "device-1", &["allowed"])
    );
    let (_d, s) = start(&toml);
    // 3.1.1: wrong password → 4, none → 5; rumqttc reports them as the refusal code.
    for (creds, want) in [
        (
            Some(("dev", "wrong")),
            v4client::ConnectReturnCode::BadUserNamePassword,
        ),
        (None, v4client::ConnectReturnCode::NotAuthorized),
    ] {
        let mut o = v4(&s, "c1");
        if let Some((u, p)) = creds {
            o.set_credentials(u, p);
        }
        let (_c, mut el) = v4client::AsyncClient::new(o, 10);
        match el.poll().await {
            Err(v4client::ConnectionError::ConnectionRefused(code)) => assert_eq!(code, want),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // 5.0: 0x86 and 0x87.
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C5;
    for (creds, want) in [
        (Some(("dev", "wrong")), C5::BadUserNamePassword),
        (None, C5::NotAuthorized),
    ] {
        let mut o = v5opts(&s, "c2");
        if let Some((u, p)) = creds {
            o.set_credentials(u, p);
        }
        let (_c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
        match el.poll().await {
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => assert_eq!(code, want),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // Exactly the two wrong passwords (3.1.1 and 5.0) read as unknown keys (a wrong secret
    // gives no hint that the key id exists), and the two missing ones as missing.
    let m = s.metrics().await;
    assert_eq!(
        metric(
            &m,
            "sluice_auth_failures_total",
            r#"protocol="mqtt",method="api_key",reason="unknown_key""#
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "sluice_auth_failures_total",
            r#"protocol="mqtt",method="none",reason="missing""#
        ),
        2.0,
        "{m}"
    );

    // The key as username "dev" + password "s3cret" and as the whole password both work; a
    // publish to a stream the key may not use gets 0x87 (5.0) or a disconnect (3.1.1).
    let mut c = connect5("ok5", 30);
    c.username = Some("dev".into());
    c.password = Some(bytes::Bytes::from_static(b"s3cret"));
    let (mut raw, _) = session5(s.mqtt.unwrap(), c).await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "allowed/a",
        1,
        1,
        b"yes",
        Some(Default::default()),
    ))))
    .await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "denied/a",
        1,
        2,
        b"no",
        Some(Default::default()),
    ))))
    .await;
    let mut codes = Vec::new();
    for _ in 0..2 {
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) => codes.push(u8::from(a.reason_code)),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(codes, vec![0x00, 0x87]);
    let mut c3 = connect3("ok3", 30);
    c3.password = Some(bytes::Bytes::from_static(KEY.as_bytes()));
    let mut raw3 = session3(s.mqtt.unwrap(), c3).await;
    raw3.send3(rmqtt_codec::v3::Packet::Publish(Box::new(publish(
        "denied/b", 1, 1, b"no", None,
    ))))
    .await;
    assert!(
        raw3.closed().await,
        "3.1.1 has no reason codes: not authorized disconnects"
    );
    assert_eq!(log_len(&s, "allowed", 1).await.len(), 1);
    assert!(
        read_log(&s.data_dir, "denied", &[])
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_retransmission_is_not_appended_twice_and_pubrel_completes() {
    let (_d, s) = start("");
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("q2", 30)).await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "q2s/k",
        2,
        9,
        b"once",
        Some(Default::default()),
    ))))
    .await;
    match raw.recv5().await {
        Some(v5::Packet::PublishReceived(a)) => {
            assert_eq!((a.packet_id.get(), u8::from(a.reason_code)), (9, 0))
        }
        other => panic!("{other:?}"),
    }
    // The client did not see PUBREC (as far as it knows): it sends the PUBLISH again, DUP set.
    let mut again = publish("q2s/k", 2, 9, b"once", Some(Default::default()));
    again.dup = true;
    raw.send5(v5::Packet::Publish(Box::new(again))).await;
    match raw.recv5().await {
        Some(v5::Packet::PublishReceived(a)) => assert_eq!(a.packet_id.get(), 9),
        other => panic!("{other:?}"),
    }
    let id = NonZeroU16::new(9).unwrap();
    let rel = v5::PublishAck2 {
        packet_id: id,
        reason_code: v5::PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    };
    raw.send5(v5::Packet::PublishRelease(rel.clone())).await;
    match raw.recv5().await {
        Some(v5::Packet::PublishComplete(c)) => assert_eq!(
            (c.packet_id.get(), c.reason_code),
            (9, v5::PublishAck2Reason::Success)
        ),
        other => panic!("{other:?}"),
    }
    // A PUBREL for an id not (or no longer) waiting: PUBCOMP 0x92.
    raw.send5(v5::Packet::PublishRelease(rel)).await;
    match raw.recv5().await {
        Some(v5::Packet::PublishComplete(c)) => {
            assert_eq!(c.reason_code, v5::PublishAck2Reason::PacketIdNotFound)
        }
        other => panic!("{other:?}"),
    }
    // Ping still answered; then the log holds the event exactly once.
    raw.send5(v5::Packet::PingRequest).await;
    assert!(matches!(raw.recv5().await, Some(v5::Packet::PingResponse)));
    assert_eq!(read_log(&s.data_dir, "q2s", &[]).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_are_honoured_and_bad_ones_disconnect_0x94() {
    let (_d, s) = start("");
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("alias", 30)).await;
    let alias = |a| v5::PublishProperties {
        topic_alias: NonZeroU16::new(a),
        ..Default::default()
    };
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "aliased/k1",
        1,
        1,
        b"one",
        Some(alias(3)),
    ))))
    .await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "",
        1,
        2,
        b"two",
        Some(alias(3)),
    ))))
    .await;
    for id in [1, 2] {
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) => {
                assert_eq!((a.packet_id.get(), u8::from(a.reason_code)), (id, 0))
            }
            other => panic!("{other:?}"),
        }
    }
    let recs = log_len(&s, "aliased", 2).await;
    assert!(recs.iter().all(|r| r["key"] == "k1"), "{recs:?}");
    // Above Topic Alias Maximum (64): DISCONNECT 0x94.
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "aliased/k1",
        1,
        3,
        b"x",
        Some(alias(65)),
    ))))
    .await;
    match raw.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x94),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_is_refused_and_unsubscribe_answered() {
    let (_d, s) = start("");
    let (c, mut el) = v4client::AsyncClient::new(v4(&s, "sub4"), 10);
    c.subscribe("a/#", v4client::QoS::AtLeastOnce)
        .await
        .unwrap();
    c.unsubscribe("a/#").await.unwrap();
    let (mut suback, mut unsuback) = (None, false);
    while suback.is_none() || !unsuback {
        match tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .unwrap()
            .unwrap()
        {
            v4client::Event::Incoming(v4client::Packet::SubAck(a)) => suback = Some(a.return_codes),
            v4client::Event::Incoming(v4client::Packet::UnsubAck(_)) => unsuback = true,
            _ => {}
        }
    }
    assert_eq!(
        suback.unwrap(),
        vec![v4client::SubscribeReasonCode::Failure]
    );

    let (c5, mut el5) = rumqttc::v5::AsyncClient::new(v5opts(&s, "sub5"), 10);
    c5.subscribe("a/+", rumqttc::v5::mqttbytes::QoS::AtMostOnce)
        .await
        .unwrap();
    loop {
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::SubAck(a)) =
            tokio::time::timeout(Duration::from_secs(20), el5.poll())
                .await
                .unwrap()
                .unwrap()
        {
            assert_eq!(
                a.return_codes,
                vec![rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::NotAuthorized]
            );
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_expiry_publishes_the_will_and_graceful_disconnect_does_not() {
    let (_d, s) = start("");
    let addr = s.mqtt.unwrap();
    // 3.1.1, keep-alive 1 s, silent after CONNACK: closed after ~1.5 s, will appended.
    let mut c = connect3("silent", 1);
    c.last_will = Some(rmqtt_codec::v3::LastWill {
        qos: rmqtt_codec::types::QoS::AtLeastOnce,
        retain: false,
        topic: "status/silent".into(),
        message: bytes::Bytes::from_static(b"offline"),
    });
    let mut raw = session3(addr, c.clone()).await;
    let t0 = std::time::Instant::now();
    assert!(raw.closed().await);
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}, before 1.5 × keep-alive"
    );
    let w = &log_len(&s, "status", 1).await[0];
    assert_eq!(w["value"], "offline");
    assert_eq!(w["key"], "silent");
    assert_eq!(header(w, "mqtt-will").as_deref(), Some("true"));

    // 5.0: keep-alive expiry says DISCONNECT 0x8D first.
    let (mut raw5, _) = session5(addr, connect5("silent5", 1)).await;
    match raw5.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x8D),
        other => panic!("{other:?}"),
    }

    // A graceful DISCONNECT discards the will.
    c.client_id = "polite".into();
    c.keep_alive = 30;
    if let Some(w) = &mut c.last_will {
        w.topic = "status/polite".into();
    }
    let mut raw = session3(addr, c).await;
    raw.send3(rmqtt_codec::v3::Packet::Disconnect).await;
    assert!(raw.closed().await);
    // Counted once the session decided its will's fate; only then is "not in the log" a fact.
    let m = wait_until(Duration::from_secs(10), || async {
        sluice_tests::metric_or_zero(
            &s.metrics().await,
            "sluice_mqtt_wills_total",
            r#"outcome="discarded""#,
        ) >= 1.0
    })
    .await;
    assert!(m);
    let m = s.metrics().await;
    assert_eq!(
        metric(&m, "sluice_mqtt_wills_total", r#"outcome="appended""#),
        1.0,
        "only the silent client's will"
    );
    assert!(metric(&m, "sluice_mqtt_disconnects_total", r#"reason="client""#) >= 1.0);
    let status = read_log(&s.data_dir, "status", &[]).unwrap();
    assert!(status.iter().all(|r| r["key"] != "polite"), "{status:?}");
    let m = s.metrics().await;
    assert!(
        metric(
            &m,
            "sluice_mqtt_disconnects_total",
            r#"reason="keep_alive""#
        ) >= 2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_delay_is_cancelled_by_a_reconnect_and_published_after_it_otherwise() {
    let (_d, s) = start("");
    let addr = s.mqtt.unwrap();
    let with_will = |id: &str, delay: u32| {
        let mut c = connect5(id, 30);
        c.last_will = Some(v5::LastWill {
            qos: rmqtt_codec::types::QoS::AtLeastOnce,
            retain: false,
            topic: format!("offline/{id}").into(),
            message: bytes::Bytes::from_static(b"gone"),
            will_delay_interval_sec: Some(delay),
            correlation_data: None,
            message_expiry_interval: None,
            content_type: Some("text/plain".into()),
            user_properties: vec![("fw".into(), "1.2".into())],
            is_utf8_payload: Some(true),
            response_topic: None,
        });
        c
    };
    // Lost, back within the delay: no will. (The same 1 s delay as the lost client's below,
    // which goes later: by the time that will is in the log, this one would have been too.)
    let (raw, _) = session5(addr, with_will("back", 1)).await;
    drop(raw);
    let (raw, _) = session5(addr, with_will("back", 1)).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            sluice_tests::metric_or_zero(
                &s.metrics().await,
                "sluice_mqtt_wills_total",
                r#"outcome="cancelled""#,
            ) >= 1.0
        })
        .await
    );
    // Lost for good: the will lands after its delay (1 s), with its properties as headers.
    let (lost, _) = session5(addr, with_will("gone", 1)).await;
    let t0 = std::time::Instant::now();
    drop(lost);
    let w = &log_len(&s, "offline", 1).await[0];
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(w["key"], "gone");
    let offline = read_log(&s.data_dir, "offline", &[]).unwrap();
    assert!(offline.iter().all(|r| r["key"] != "back"), "{offline:?}");
    assert_eq!(
        metric(
            &s.metrics().await,
            "sluice_mqtt_wills_total",
            r#"outcome="appended""#
        ),
        1.0
    );
    assert_eq!(header(w, "fw").as_deref(), Some("1.2"));
    assert_eq!(header(w, "content-type").as_deref(), Some("text/plain"));
    drop(raw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_malformed_and_unsupported_packets_are_refused_and_others_unaffected() {
    let (_d, s) = start("[mqtt]\nmax_packet_bytes = 1024\n");
    let addr = s.mqtt.unwrap();
    // A bystander keeps publishing through all of it.
    let (c, mut el) = v4client::AsyncClient::new(v4(&s, "bystander"), 10);
    c.publish("fine/a", v4client::QoS::AtLeastOnce, false, "1")
        .await
        .unwrap();
    assert_eq!(v4_acks(&mut el, 1).await, 1);

    // Oversize PUBLISH: DISCONNECT 0x95 (5.0).
    let (mut raw, _) = session5(addr, connect5("big", 30)).await;
    static BIG: [u8; 2000] = [b'x'; 2000];
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "fine/b",
        1,
        1,
        &BIG,
        Some(Default::default()),
    ))))
    .await;
    match raw.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x95),
        other => panic!("{other:?}"),
    }
    // Garbage instead of CONNECT: closed.
    let mut junk = Raw::connect(addr, false).await;
    junk.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(junk.closed().await);
    // A malformed packet after CONNECT (PUBLISH with a truncated topic length): DISCONNECT 0x81.
    let (mut raw, _) = session5(addr, connect5("mal", 30)).await;
    raw.send_bytes(b"\x32\x03\x00\x09a").await;
    match raw.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(u8::from(d.reason_code), 0x81, "{d:?}")
        }
        other => panic!("{other:?}"),
    }
    // Protocol level 6: CONNACK 0x84; MQTT 5 with an empty client id and no clean start: 0x85.
    let mut v6 = Raw::connect(addr, true).await;
    v6.send_bytes(b"\x10\x11\x00\x04MQTT\x06\x02\x00\x3c\x00\x00\x04dev1")
        .await;
    match v6.recv5().await {
        Some(v5::Packet::ConnectAck(a)) => assert_eq!(u8::from(a.reason_code), 0x84),
        other => panic!("{other:?}"),
    }
    let mut noid = Raw::connect(addr, true).await;
    let mut cn = connect5("", 30);
    cn.clean_start = false;
    noid.send5(v5::Packet::Connect(Box::new(cn))).await;
    match noid.recv5().await {
        Some(v5::Packet::ConnectAck(a)) => assert_eq!(u8::from(a.reason_code), 0x85),
        other => panic!("{other:?}"),
    }
    // An empty client id with a clean start gets one assigned.
    let (_r, ack) = session5(addr, connect5("", 30)).await;
    assert!(
        ack.assigned_client_id
            .is_some_and(|id| id.starts_with("sluice-"))
    );
    // The bystander was never disturbed.
    c.publish("fine/a", v4client::QoS::AtLeastOnce, false, "2")
        .await
        .unwrap();
    assert_eq!(v4_acks(&mut el, 1).await, 1);
    assert_eq!(log_len(&s, "fine", 2).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_with_the_mqtt_subprotocol() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let (_d, s) = start("");
    let mut req = format!("ws://{}/mqtt", s.http)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "mqtt");
    let mut codec = v5::Codec::new(0, 0);
    let mut out = BytesMut::new();
    codec
        .encode(
            v5::Packet::Connect(Box::new(connect5("browser", 30))),
            &mut out,
        )
        .unwrap();
    // Packets may span messages: send CONNECT in two halves.
    let second = out.split_off(5);
    ws.send(Message::Binary(out.freeze())).await.unwrap();
    ws.send(Message::Binary(second.freeze())).await.unwrap();
    let mut out = BytesMut::new();
    codec
        .encode(
            v5::Packet::Publish(Box::new(publish(
                "wsdev/k",
                1,
                1,
                b"over-ws",
                Some(Default::default()),
            ))),
            &mut out,
        )
        .unwrap();
    ws.send(Message::Binary(out.freeze())).await.unwrap();
    let mut inbuf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Binary(b))) => {
                inbuf.extend_from_slice(&b);
                while let Some((p, _)) = codec.decode(&mut inbuf).unwrap() {
                    got.push(p);
                }
            }
            Some(Ok(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(
        matches!(&got[0], v5::Packet::ConnectAck(a) if a.reason_code == v5::ConnectAckReason::Success)
    );
    assert!(
        matches!(&got[1], v5::Packet::PublishAck(a) if a.packet_id.get() == 1 && u8::from(a.reason_code) == 0)
    );
    assert_eq!(log_len(&s, "wsdev", 1).await[0]["value"], "over-ws");
    // A client offering only other subprotocols is refused before the upgrade.
    let mut bad = format!("ws://{}/mqtt", s.http)
        .into_client_request()
        .unwrap();
    bad.headers_mut()
        .insert("sec-websocket-protocol", "sluice.v1".parse().unwrap());
    match tokio_tungstenite::connect_async(bad).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 400),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_storm_from_many_clients_is_all_acked_and_stored() {
    let (_d, s) = start("");
    let clients = 40;
    let per = 100;
    let mut tasks = Vec::new();
    for i in 0..clients {
        let o = v4(&s, &format!("storm-{i}"));
        tasks.push(tokio::spawn(async move {
            let (c, mut el) = v4client::AsyncClient::new(o, 200);
            let pubs = tokio::spawn(async move {
                for j in 0..per {
                    c.publish(
                        format!("storm/dev{i}"),
                        v4client::QoS::AtLeastOnce,
                        false,
                        format!("{i}-{j}"),
                    )
                    .await
                    .unwrap();
                }
                c
            });
            let n = v4_acks(&mut el, per).await;
            let _c = pubs.await.unwrap();
            n
        }));
    }
    let mut acked = 0;
    for t in tasks {
        acked += t.await.unwrap();
    }
    assert_eq!(acked, clients * per);
    let recs = log_len(&s, "storm", clients * per).await;
    assert_eq!(recs.len(), clients * per);
    // Per device, publish order is log order.
    for i in 0..clients {
        let key = format!("dev{i}");
        let vals: Vec<String> = recs
            .iter()
            .filter(|r| r["key"] == key.as_str())
            .map(|r| r["value"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            vals,
            (0..per).map(|j| format!("{i}-{j}")).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_gives_0x97_in_v5_and_holds_the_puback_in_v311() {
    let (_d, s) = start(
        r#"
[[quotas.rules]]
scope = "stream"
streams = "metered"
events_per_sec = 20
burst_events = 5
"#,
    );
    // 5.0: 40 QoS 1 publishes at once; past the burst, PUBACK 0x97 (quota exceeded).
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("q5", 30)).await;
    for i in 1..=40u16 {
        raw.send5(v5::Packet::Publish(Box::new(publish(
            "metered/a",
            1,
            i,
            b"x",
            Some(Default::default()),
        ))))
        .await;
    }
    let mut codes = Vec::new();
    while codes.len() < 40 {
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) => codes.push(u8::from(a.reason_code)),
            other => panic!("{other:?}"),
        }
    }
    assert!(codes.contains(&0x00) && codes.contains(&0x97), "{codes:?}");
    assert!(codes.iter().all(|c| *c == 0 || *c == 0x97));
    let ok5 = codes.iter().filter(|c| **c == 0).count();

    // 3.1.1: no reason codes; every PUBACK is held until the publish fits, so all 30 succeed —
    // at the quota's pace: even with the burst of 5 refilled, 25 events at 20/s take 1.25 s.
    let throttled = || async {
        sluice_tests::metric_sum(
            &s.metrics().await,
            "sluice_events_throttled_total",
            r#"stream="metered""#,
        )
    };
    let throttled_before = throttled().await;
    let t0 = std::time::Instant::now();
    let (c, mut el) = v4client::AsyncClient::new(v4(&s, "q4"), 100);
    for _ in 0..30 {
        c.publish("metered/b", v4client::QoS::AtLeastOnce, false, "y")
            .await
            .unwrap();
    }
    assert_eq!(v4_acks(&mut el, 30).await, 30);
    assert!(
        t0.elapsed() >= Duration::from_millis(1200),
        "acked faster than the quota allows: {:?}",
        t0.elapsed()
    );
    assert!(
        throttled().await > throttled_before,
        "the 3.1.1 publishes never met the quota (held, then retried)"
    );
    let recs = log_len(&s, "metered", ok5 + 30).await;
    assert_eq!(recs.iter().filter(|r| r["value"] == "y").count(), 30);
    let m = s.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("sluice_events_throttled_total") && l.contains("metered")),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_in_flight_publishes_and_sends_disconnect_0x8b() {
    // Every group commit takes 1.5 s, so the publish is still in flight when SIGTERM comes.
    let (_d, mut s) = start("[log]\nfault_append_delay_ms = 1500\n");
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("drain", 30)).await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "drained/k",
        1,
        1,
        b"before",
        Some(Default::default()),
    ))))
    .await;
    assert!(
        s.wait_received("mqtt", 1.0).await,
        "the publish reached admission"
    );
    s.signal("TERM").unwrap();
    // The drain answers it (appended: success), and only then sends DISCONNECT.
    match raw.recv5().await {
        Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), 0),
        other => panic!("{other:?}"),
    }
    match raw.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x8B),
        other => panic!("{other:?}"),
    }
    assert!(s.terminate().unwrap().success());
    assert_eq!(read_log(&s.data_dir, "drained", &[]).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_principal_connection_limit_gives_0x97() {
    let (_d, s) = start("[mqtt]\nmax_connections_per_principal = 2\n");
    let addr = s.mqtt.unwrap();
    let (_a, _) = session5(addr, connect5("p1", 30)).await;
    let (_b, _) = session5(addr, connect5("p2", 30)).await;
    let mut third = Raw::connect(addr, true).await;
    third
        .send5(v5::Packet::Connect(Box::new(connect5("p3", 30))))
        .await;
    match third.recv5().await {
        Some(v5::Packet::ConnectAck(a)) => assert_eq!(u8::from(a.reason_code), 0x97),
        other => panic!("{other:?}"),
    }
    // A second connection with an existing client id takes the session over (0x8E).
    drop((_a, _b, third));
    let freed = wait_until(Duration::from_secs(10), || async {
        sluice_tests::metric_or_zero(
            &s.metrics().await,
            "sluice_mqtt_disconnects_total",
            r#"reason="eof""#,
        ) >= 2.0
    })
    .await;
    assert!(freed, "closed connections release their principal's slots");
    let (mut first, _) = session5(addr, connect5("taken", 30)).await;
    let (_second, _) = session5(addr, connect5("taken", 30)).await;
    match first.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x8E),
        other => panic!("{other:?}"),
    }
}

/// Pipelined raw 5.0 publishers (QoS 1 and 2 alternating, 32 in flight each) until told to
/// stop; every payload whose PUBACK or PUBREC arrived is pushed to `acked`.
async fn acked_publisher(
    addr: std::net::SocketAddr,
    id: usize,
    acked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (raw, _) = session5(addr, connect5(&format!("crash-{id}"), 30)).await;
    let (mut rd, wr) = raw.stream.into_split();
    let wr = std::sync::Arc::new(tokio::sync::Mutex::new(wr));
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    let inflight: std::sync::Arc<std::sync::Mutex<HashMap<u16, String>>> = Default::default();
    let reader = {
        let (wr, window, inflight, acked) =
            (wr.clone(), window.clone(), inflight.clone(), acked.clone());
        tokio::spawn(async move {
            let mut codec = v5::Codec::new(0, 0);
            let mut buf = BytesMut::new();
            loop {
                while let Ok(Some((p, _))) = codec.decode(&mut buf) {
                    let (id, rel) = match p {
                        v5::Packet::PublishAck(a) => (a.packet_id, false),
                        v5::Packet::PublishReceived(a) => (a.packet_id, true),
                        v5::Packet::PublishComplete(_) => continue,
                        _ => return,
                    };
                    if let Some(payload) = inflight.lock().unwrap().remove(&id.get()) {
                        acked.lock().unwrap().push(payload);
                    }
                    if rel {
                        let mut out = BytesMut::new();
                        codec
                            .encode(
                                v5::Packet::PublishRelease(v5::PublishAck2 {
                                    packet_id: id,
                                    reason_code: v5::PublishAck2Reason::Success,
                                    properties: Vec::new(),
                                    reason_string: None,
                                }),
                                &mut out,
                            )
                            .unwrap();
                        if wr.lock().await.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                    window.add_permits(1);
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        // The gateway is gone: the writer stops waiting for room.
                        window.close();
                        return;
                    }
                    Ok(_) => {}
                }
            }
        })
    };
    let mut codec = v5::Codec::new(0, 0);
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let Ok(permit) = window.acquire().await else {
            break;
        };
        permit.forget();
        let pid = (n % 60_000 + 1) as u16;
        let payload = format!("c{id}-{n}");
        let mut p = publish(
            "crashy/k",
            if n.is_multiple_of(2) { 1 } else { 2 },
            pid,
            b"",
            Some(Default::default()),
        );
        p.payload = bytes::Bytes::from(payload.clone());
        inflight.lock().unwrap().insert(pid, payload);
        let mut out = BytesMut::new();
        codec
            .encode(v5::Packet::Publish(Box::new(p)), &mut out)
            .unwrap();
        if wr.lock().await.write_all(&out).await.is_err() {
            break;
        }
        n += 1;
    }
    let _ = reader.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_and_qos2_acked_before_sigkill_are_in_the_log_after_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = Sluice::start(&data, "").unwrap();
    let addr = s.mqtt.unwrap();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|i| tokio::spawn(acked_publisher(addr, i, acked.clone(), stop.clone())))
        .collect();
    let enough = wait_until(Duration::from_secs(60), || {
        let n = acked.lock().unwrap().len();
        async move { n >= 20_000 }
    })
    .await;
    assert!(
        enough,
        "publishers got {} acks",
        acked.lock().unwrap().len()
    );
    // Under load: kill -9, while publishes are in flight.
    s.kill().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    let acked: Vec<String> = acked.lock().unwrap().clone();
    let s = Sluice::start(&data, "").unwrap();
    let stored: std::collections::HashSet<String> = read_log(&s.data_dir, "crashy", &[])
        .unwrap()
        .iter()
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect();
    let lost: Vec<&String> = acked.iter().filter(|p| !stored.contains(*p)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acked publishes lost, e.g. {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_in_flight_budget_holds_publishes_instead_of_refusing_them() {
    // A 4 KiB budget and a slow log: only a few 1000-byte events fit at a time.
    let (_d, s) = start(
        "[limits]\nmax_in_flight_bytes = 4096\n[log]\nfault_append_delay_ms = 200\n\
         [streams.defaults]\nmax_body_bytes = 4096\nmax_event_bytes = 4096\n",
    );
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("budget", 30)).await;
    for i in 1..=20u16 {
        let mut p = publish(
            &format!("budget/k{}", i % 4),
            1,
            i,
            b"",
            Some(Default::default()),
        );
        p.payload = bytes::Bytes::from(vec![b'x'; 1000]);
        raw.send5(v5::Packet::Publish(Box::new(p))).await;
    }
    let mut answers = Vec::new();
    while answers.len() < 20 {
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) => {
                answers.push((a.packet_id.get(), u8::from(a.reason_code)))
            }
            other => panic!("{other:?}"),
        }
    }
    // Every publish was held until it fit, then stored: success, in publish order.
    assert_eq!(answers, (1..=20u16).map(|i| (i, 0u8)).collect::<Vec<_>>());
    assert_eq!(read_log(&s.data_dir, "budget", &[]).unwrap().len(), 20);
    let m = s.metrics().await;
    assert!(
        metric(
            &m,
            "sluice_requests_total",
            r#"protocol="mqtt",outcome="unavailable""#
        ) >= 1.0,
        "the budget did refuse batches (then retried): {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_listener_limit_are_closed_at_once() {
    let (_d, s) = start("[mqtt]\nmax_connections = 2\n");
    let addr = s.mqtt.unwrap();
    let (_a, _) = session5(addr, connect5("l1", 30)).await;
    let (_b, _) = session5(addr, connect5("l2", 30)).await;
    let mut third = Raw::connect(addr, true).await;
    third
        .send5(v5::Packet::Connect(Box::new(connect5("l3", 30))))
        .await;
    assert!(third.closed().await, "closed without a CONNACK");
    let m = s.metrics().await;
    assert!(
        metric(&m, "sluice_mqtt_disconnects_total", r#"reason="refused""#) >= 1.0,
        "{m}"
    );
    // Room again once one of them leaves.
    drop(_a);
    let ok = wait_until(Duration::from_secs(10), || async {
        let mut r = Raw::connect(addr, true).await;
        r.send5(v5::Packet::Connect(Box::new(connect5("l4", 30)))).await;
        matches!(r.recv5().await, Some(v5::Packet::ConnectAck(a)) if a.reason_code == v5::ConnectAckReason::Success)
    })
    .await;
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_and_server_keep_alive_are_enforced() {
    let (_d, s) = start("[mqtt]\nconnect_timeout_ms = 600\nmax_keep_alive_secs = 2\n");
    let addr = s.mqtt.unwrap();
    // No CONNECT: closed after connect_timeout_ms, not before.
    let mut silent = Raw::connect(addr, true).await;
    let t0 = std::time::Instant::now();
    assert!(silent.closed().await);
    assert!(
        t0.elapsed() >= Duration::from_millis(550),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(
        metric(
            &s.metrics().await,
            "sluice_mqtt_disconnects_total",
            r#"reason="connect_timeout""#
        ),
        1.0
    );
    // A keep-alive above the maximum (and 0, "none") becomes the maximum, announced as Server
    // Keep Alive, and is enforced: silence for 1.5 × 2 s ends the session with 0x8D.
    for asked in [60u16, 0] {
        let (mut raw, ack) = session5(addr, connect5(&format!("ka-{asked}"), asked)).await;
        assert_eq!(ack.server_keepalive_sec, Some(2), "asked {asked}");
        let t0 = std::time::Instant::now();
        match raw.recv5().await {
            Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x8D),
            other => panic!("{other:?}"),
        }
        assert!(
            t0.elapsed() >= Duration::from_millis(2900),
            "{:?}",
            t0.elapsed()
        );
    }
    // A keep-alive within the maximum is the client's own: not announced.
    let (_raw, ack) = session5(addr, connect5("ka-1", 1)).await;
    assert_eq!(ack.server_keepalive_sec, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_quota_in_a_row_end_the_session_after_quota_disconnect_after() {
    let (_d, s) = start(
        "[mqtt]\nquota_disconnect_after = 3\n[[quotas.rules]]\nstreams = \"q\"\nscope = \"stream\"\nevents_per_sec = 1\nburst_events = 1\n",
    );
    let addr = s.mqtt.unwrap();
    for (qos, id, code) in [(1u8, "q1", 0x97u8), (0, "q0", 0x96)] {
        let (mut raw, _) = session5(addr, connect5(id, 30)).await;
        for pid in 1..=4u16 {
            let id = if qos == 0 { 0 } else { pid };
            raw.send5(v5::Packet::Publish(Box::new(publish(
                "q/k",
                qos,
                id,
                b"x",
                Some(Default::default()),
            ))))
            .await;
        }
        // QoS 1: each refusal is a PUBACK 0x97 first; QoS 0 has no answer. Then DISCONNECT.
        let disconnect = loop {
            match raw.recv5().await {
                Some(v5::Packet::PublishAck(a)) => {
                    assert!([0x00, 0x97].contains(&u8::from(a.reason_code)), "{a:?}")
                }
                Some(v5::Packet::Disconnect(d)) => break u8::from(d.reason_code),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(disconnect, code, "QoS {qos}");
        assert!(raw.recv5().await.is_none(), "closed after the DISCONNECT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_held_past_max_hold_ms_is_answered_0x83() {
    // The budget holds one 3000-byte event and the log takes 5 s per write: while one device's
    // event is being written, another's cannot get budget. It is held, then refused at 800 ms.
    let (_d, s) = start(
        "[mqtt]\nmax_hold_ms = 800\n[limits]\nmax_in_flight_bytes = 4096\n[log]\nfault_append_delay_ms = 5000\n\
         [streams.defaults]\nmax_body_bytes = 4096\nmax_event_bytes = 4096\n",
    );
    let addr = s.mqtt.unwrap();
    let big = |topic: &str| {
        let mut p = publish(topic, 1, 1, b"", Some(Default::default()));
        p.payload = bytes::Bytes::from(vec![b'x'; 3000]);
        v5::Packet::Publish(Box::new(p))
    };
    let (mut first, _) = session5(addr, connect5("first", 30)).await;
    first.send5(big("a/k")).await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            metric(&s.metrics().await, "sluice_in_flight_bytes", "") > 3000.0
        })
        .await
    );
    let (mut held, _) = session5(addr, connect5("held", 30)).await;
    let t0 = std::time::Instant::now();
    held.send5(big("b/k")).await;
    match held.recv5().await {
        Some(v5::Packet::PublishAck(a)) => {
            assert_eq!(u8::from(a.reason_code), 0x83, "{a:?}");
            assert!(
                a.reason_string.as_deref().is_some_and(|r| !r.is_empty()),
                "{a:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
    // Refused while the first write still held the budget, i.e. by the hold limit, not because
    // the budget came back.
    assert!(metric(&s.metrics().await, "sluice_in_flight_bytes", "") > 3000.0);
    match first.recv5().await {
        Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), 0),
        other => panic!("{other:?}"),
    }
    assert_eq!(read_log(&s.data_dir, "a", &[]).unwrap().len(), 1);
    assert!(
        read_log(&s.data_dir, "b", &[])
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_acks_is_closed_after_write_timeout() {
    use tokio::io::AsyncWriteExt;
    let (_d, s) = start("[mqtt]\nwrite_timeout_ms = 500\n");
    let addr = s.mqtt.unwrap();
    // A tiny receive buffer, and a client that never reads after CONNACK: the acks pile up
    // until the server's writes block.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let raw = Raw::over(tcp, false);
    let mut raw = sluice_tests::mqtt::start3(raw, connect3("deaf", 30)).await;
    let mut frame = bytes::BytesMut::new();
    {
        use tokio_util::codec::Encoder;
        let mut codec = rmqtt_codec::v3::Codec::new(0);
        for id in 1..=2000u16 {
            codec
                .encode(
                    rmqtt_codec::v3::Packet::Publish(Box::new(publish(
                        "deaf/k", 1, id, b"x", None,
                    ))),
                    &mut frame,
                )
                .unwrap();
        }
    }
    let metrics_say_closed = || async {
        sluice_tests::metric_or_zero(
            &s.metrics().await,
            "sluice_mqtt_disconnects_total",
            r#"reason="write_timeout""#,
        ) >= 1.0
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut sent = 0usize;
    while !metrics_say_closed().await {
        assert!(
            std::time::Instant::now() < deadline,
            "still open after {sent} publishes"
        );
        // Packet ids repeat; each round is 2000 more QoS 1 publishes, 8000 bytes of PUBACKs.
        if tokio::time::timeout(Duration::from_secs(2), raw.stream.write_all(&frame))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            sent += 2000;
        }
    }
    assert!(sent > 0);
    // The server closed it: what was buffered drains, then the end of the stream.
    assert!(raw.closed().await);
}

/// The CONNACK return code (3.1.1) or reason code (5.0) of one CONNECT.
async fn connack_of(addr: std::net::SocketAddr, connect: ConnectAny) -> u8 {
    match connect {
        ConnectAny::V5(c) => {
            let mut raw = Raw::connect(addr, true).await;
            raw.send5(v5::Packet::Connect(c)).await;
            match raw.recv5().await {
                Some(v5::Packet::ConnectAck(a)) => u8::from(a.reason_code),
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }
        ConnectAny::V3(c) => {
            let mut raw = Raw::connect(addr, false).await;
            raw.send3(rmqtt_codec::v3::Packet::Connect(c)).await;
            match raw.recv3().await {
                Some(rmqtt_codec::v3::Packet::ConnectAck(a)) => a.return_code as u8,
                other => panic!("expected CONNACK, got {other:?}"),
            }
        }
    }
}

enum ConnectAny {
    V5(Box<v5::Connect>),
    V3(Box<rmqtt_codec::v3::Connect>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_reason_codes_not_covered_elsewhere() {
    // docs/mqtt.md "Reason codes": the rows without a test of their own elsewhere.
    let key = "rc.reason-code-secret";
    let (_d, s) = start(&format!(
        "[mqtt.auth]\nallow_anonymous = false\n[http.auth]\nallow_anonymous = false\n\
         [auth.failures]\nmax_failures = 2\nwindow_ms = 600000\n{}",
        api_key_entry(key, "rc", &["*"])
    ));
    let addr = s.mqtt.unwrap();
    let with_key = |mut c: v5::Connect| {
        c.username = Some("rc".into());
        c.password = Some(bytes::Bytes::from_static(key.as_bytes()));
        c
    };
    // CONNACK 0x8C: enhanced authentication is not offered.
    let mut c = with_key(connect5("enhanced", 30));
    c.auth_method = Some("SCRAM-SHA-256".into());
    assert_eq!(connack_of(addr, ConnectAny::V5(Box::new(c))).await, 0x8C);
    // DISCONNECT 0x82: a second CONNECT on a connection.
    let (mut raw, _) = session5(addr, with_key(connect5("twice", 30))).await;
    raw.send5(v5::Packet::Connect(Box::new(with_key(connect5(
        "twice", 30,
    )))))
    .await;
    match raw.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x82),
        other => panic!("{other:?}"),
    }
    // 3.1.1: wrong credentials 4, none 5; then, past max_failures from this address, 3 (5.0:
    // 0x9F) — even for the right key, until the window passes.
    let mut wrong = connect3("guess", 30);
    wrong.username = Some("rc".into());
    wrong.password = Some(bytes::Bytes::from_static(b"rc.wrong-wrong-wrong"));
    assert_eq!(
        connack_of(addr, ConnectAny::V3(Box::new(wrong.clone()))).await,
        4
    );
    assert_eq!(
        connack_of(addr, ConnectAny::V3(Box::new(connect3("none", 30)))).await,
        5
    );
    assert_eq!(connack_of(addr, ConnectAny::V3(Box::new(wrong))).await, 3);
    assert_eq!(
        connack_of(addr, ConnectAny::V5(Box::new(connect5("guess5", 30)))).await,
        0x9F
    );
    assert_eq!(read_log(&s.data_dir, "r", &[]).unwrap_or_default().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_connack_codes_for_level_and_client_id() {
    let (_d, s) = start("");
    let addr = s.mqtt.unwrap();
    // Protocol level 2 (below 3.1): 1. An empty client id without clean session: 2.
    // (Hand-made bytes: the client codec always writes level 4.)
    let mut raw = Raw::connect(addr, false).await;
    raw.send_bytes(b"\x10\x0f\x00\x04MQTT\x02\x02\x00\x1e\x00\x03old")
        .await;
    match raw.recv3().await {
        Some(rmqtt_codec::v3::Packet::ConnectAck(a)) => assert_eq!(a.return_code as u8, 1),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let mut unnamed = connect3("", 30);
    unnamed.clean_session = false;
    assert_eq!(connack_of(addr, ConnectAny::V3(Box::new(unnamed))).await, 2);
}
