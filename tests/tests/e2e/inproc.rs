//! The middle layer: the MQTT session and the gRPC/WebSocket lanes run in-process against a fake
//! `Ingest` the test drives step by step (sluice_tests::inproc), with tokio's clock paused, so
//! "not yet" is checked deterministically: with the clock paused, a timeout passes as soon as
//! everything else is idle, so a `within(…)` that returns nothing means nothing would have come.

use std::time::Duration;

use bytes::Bytes;
use rmqtt_codec::{v3, v5};
use sluice_core::{Ingest, Principal, Protocol, Receipt, Rejection, StreamName};
use sluice_protocols::lanes::Lanes;
use sluice_tests::inproc::{FakeIngest, MqttHarness};
use sluice_tests::mqtt::{Raw, connect3, connect5, publish, start3, start5};
use tokio::io::DuplexStream;

const QUIET: Duration = Duration::from_secs(5);

async fn nothing5(raw: &mut Raw<DuplexStream>) {
    if let Ok(p) = tokio::time::timeout(QUIET, raw.recv5()).await {
        panic!("expected nothing yet, got {p:?}");
    }
}

async fn puback5(raw: &mut Raw<DuplexStream>) -> (u16, u8) {
    match raw.recv5().await {
        Some(v5::Packet::PublishAck(a)) => (a.packet_id.get(), u8::from(a.reason_code)),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn mqtt_appends_start_in_arrival_order_and_acks_follow_it() {
    let (fake, mut calls) = FakeIngest::new();
    let h = MqttHarness::new(fake, |_| {});
    let (raw, _session) = h.client(true);
    let (mut raw, _) = start5(raw, connect5("order", 30)).await;
    for (topic, id, value) in [("a/k", 1, b"one" as &'static [u8]), ("b/k", 2, b"two")] {
        raw.send5(v5::Packet::Publish(Box::new(publish(
            topic,
            1,
            id,
            value,
            Some(Default::default()),
        ))))
        .await;
    }
    let mut first = calls.next().await;
    assert_eq!(
        (first.stream.as_str(), first.values()),
        ("a", vec!["one".into()])
    );
    assert_eq!(
        (first.protocol, first.principal.as_str()),
        ("mqtt", "anonymous")
    );
    // The second append does not start before the first is in the log's queue…
    assert!(
        calls.within(QUIET).await.is_none(),
        "b started before a was queued"
    );
    first.queue();
    let second = calls.next().await;
    assert_eq!(
        (second.stream.as_str(), second.values()),
        ("b", vec!["two".into()])
    );
    // …and its ack, although it comes first, waits for the first publish's.
    second.append(0);
    nothing5(&mut raw).await;
    first.append(0);
    assert_eq!(puback5(&mut raw).await, (1, 0));
    assert_eq!(puback5(&mut raw).await, (2, 0));
}

#[tokio::test(start_paused = true)]
async fn mqtt_3_1_1_holds_the_puback_over_quota_and_retries_until_it_fits() {
    let (fake, mut calls) = FakeIngest::new();
    let h = MqttHarness::new(fake, |_| {});
    let (raw, _session) = h.client(false);
    let mut raw = start3(raw, connect3("held", 30)).await;
    raw.send3(v3::Packet::Publish(Box::new(publish(
        "s/k", 1, 7, b"late", None,
    ))))
    .await;
    let over = || Rejection::OverQuota {
        retry_after: Duration::from_millis(300),
        message: "over the stream quota".into(),
    };
    calls.next().await.refuse(over());
    // 3.1.1 cannot say "over quota": no PUBACK, no disconnect; the publish is tried again
    // after the hint, and again, until it fits.
    let started = tokio::time::Instant::now();
    let retry = calls.next().await;
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(retry.values(), vec!["late".to_string()]);
    retry.refuse(over());
    if let Ok(p) = tokio::time::timeout(Duration::from_millis(200), raw.recv3()).await {
        panic!("the PUBACK must be held while over quota, got {p:?}");
    }
    calls.next().await.append(41);
    match raw.recv3().await {
        Some(v3::Packet::PublishAck { packet_id }) => assert_eq!(packet_id.get(), 7),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn mqtt_stops_decoding_when_its_receive_window_is_full() {
    let (fake, mut calls) = FakeIngest::new();
    let h = MqttHarness::new(fake, |m| m.receive_maximum = 2);
    let (raw, _session) = h.client(false);
    let mut raw = start3(raw, connect3("window", 30)).await;
    for id in 1..=3u16 {
        raw.send3(v3::Packet::Publish(Box::new(publish(
            "w/k", 1, id, b"x", None,
        ))))
        .await;
    }
    // Two publishes are unanswered: the third is not decoded (nor appended) until one is.
    let mut held = Vec::new();
    let mut seen = 0;
    while seen < 2 {
        let mut c = calls.next().await;
        seen += c.events.len();
        c.queue();
        held.push(c);
    }
    assert_eq!(seen, 2);
    assert!(calls.within(QUIET).await.is_none(), "read past the window");
    held.remove(0).append(0);
    let third = calls.next().await;
    assert_eq!(third.events.len(), 1);
    third.append(5);
    for c in held {
        c.append(1);
    }
    let mut acked = Vec::new();
    while acked.len() < 3 {
        match raw.recv3().await {
            Some(v3::Packet::PublishAck { packet_id }) => acked.push(packet_id.get()),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(acked, vec![1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn mqtt_a_second_connection_takes_the_session_over() {
    let (fake, mut calls) = FakeIngest::new();
    let h = MqttHarness::new(fake, |_| {});
    let (raw, old_session) = h.client(true);
    let (mut old, _) = start5(raw, connect5("device-7", 30)).await;
    let (raw, _new_session) = h.client(true);
    let (mut new, _) = start5(raw, connect5("device-7", 30)).await;
    match old.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x8E),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert!(old.recv5().await.is_none(), "the old connection is closed");
    tokio::time::timeout(Duration::from_secs(5), old_session)
        .await
        .expect("the old session ends")
        .unwrap();
    new.send5(v5::Packet::Publish(Box::new(publish(
        "t/k",
        1,
        1,
        b"v",
        Some(Default::default()),
    ))))
    .await;
    calls.next().await.append(0);
    assert_eq!(puback5(&mut new).await, (1, 0));
}

#[tokio::test(start_paused = true)]
async fn mqtt_drain_answers_what_is_in_flight_then_disconnects() {
    let (fake, mut calls) = FakeIngest::new();
    let h = MqttHarness::new(fake, |_| {});
    let (raw, session) = h.client(true);
    let (mut raw, _) = start5(raw, connect5("drained", 30)).await;
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "d/k",
        1,
        3,
        b"in-flight",
        Some(Default::default()),
    ))))
    .await;
    let call = calls.next().await;
    let mqtt = h.mqtt.clone();
    let mut drain = tokio::spawn(async move { mqtt.drain().await });
    // The drain waits for the publish in flight…
    assert!(
        tokio::time::timeout(QUIET, &mut drain).await.is_err(),
        "the drain ended before the publish in flight was answered"
    );
    call.append(9);
    // …which is answered before the DISCONNECT 0x8B.
    assert_eq!(puback5(&mut raw).await, (3, 0));
    match raw.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x8B),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    drain.await.unwrap();
    session.await.unwrap();
    // A connection that still reaches the session code afterwards is refused: CONNACK 0x88.
    let (mut raw, late) = h.client(true);
    raw.send5(v5::Packet::Connect(Box::new(connect5("late", 30))))
        .await;
    match raw.recv5().await {
        Some(v5::Packet::ConnectAck(a)) => assert_eq!(u8::from(a.reason_code), 0x88),
        other => panic!("expected CONNACK 0x88, got {other:?}"),
    }
    late.await.unwrap();
    assert!(raw.recv5().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn lanes_merge_waiting_batches_keep_their_order_and_split_the_answers() {
    let (fake, mut calls) = FakeIngest::new();
    let principal = Principal::anonymous();
    let stream = StreamName::parse("s").unwrap();
    let mut lanes = Lanes::new(fake.clone(), Protocol::WebSocket, 8);
    let ev = |v: &'static str| sluice_core::Event {
        value: Bytes::from_static(v.as_bytes()),
        ..Default::default()
    };
    let json = Bytes::from_static(b"application/json");
    // Yields the batch's outcome receiver, awaited at the end.
    #[allow(clippy::async_yields_async)]
    let submit = async |lanes: &mut Lanes<FakeIngest>, batch: Vec<&'static str>| {
        let admission = fake.admit(&principal, &stream).unwrap();
        let events = batch.into_iter().map(ev).collect();
        lanes.submit(admission, json.clone(), events).await
    };
    let mut outcomes = vec![submit(&mut lanes, vec!["a1"]).await];
    let mut first = calls.next().await;
    assert_eq!(first.values(), vec!["a1"]);
    assert_eq!(first.protocol, "websocket");
    // Two batches wait behind the first: they go as one append, once the first is queued, in
    // their order.
    outcomes.push(submit(&mut lanes, vec!["b1", "b2"]).await);
    outcomes.push(submit(&mut lanes, vec!["c1"]).await);
    assert!(calls.within(QUIET).await.is_none());
    first.queue();
    let merged = calls.next().await;
    assert_eq!(merged.values(), vec!["b1", "b2", "c1"]);
    merged.answer(Ok(vec![
        Receipt::Appended {
            partition: 0,
            offset: 1,
        },
        Receipt::Failed(Rejection::TooLarge {
            message: "b2".into(),
        }),
        Receipt::Appended {
            partition: 0,
            offset: 2,
        },
    ]));
    first.append(0);
    let mut answers = Vec::new();
    for o in outcomes {
        answers.push(o.await.unwrap().unwrap());
    }
    assert_eq!(
        answers[0],
        vec![Receipt::Appended {
            partition: 0,
            offset: 0
        }]
    );
    assert_eq!(answers[1].len(), 2);
    assert!(matches!(
        answers[1][1],
        Receipt::Failed(Rejection::TooLarge { .. })
    ));
    assert_eq!(
        answers[2],
        vec![Receipt::Appended {
            partition: 0,
            offset: 2
        }]
    );
}
