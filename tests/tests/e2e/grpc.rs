//! gRPC ingest against the real binary with a tonic client: unary and streaming publish with
//! per-event results read back from the log, many batches in flight, rejections as gRPC
//! statuses (with RetryInfo), a rejected batch that does not end its stream, compression,
//! health and reflection.

use std::time::Duration;

use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::{Sluice, api_key_entry, read_log};
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_types::StatusExt;

async fn client(s: &Sluice) -> IngestClient<Channel> {
    let ch = Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    IngestClient::new(ch)
}

fn event(value: &str, key: Option<&str>) -> pb::Event {
    pb::Event {
        value: value.as_bytes().to_vec().into(),
        key: key.map(|k| k.as_bytes().to_vec().into()),
        headers: vec![pb::Header {
            key: "site".into(),
            value: b"north".to_vec().into(),
        }],
        id: format!("id-{value}"),
        ..Default::default()
    }
}

fn offsets(results: &[pb::EventResult]) -> Vec<(u32, u64)> {
    results
        .iter()
        .map(|r| match &r.result {
            Some(pb::event_result::Result::Position(p)) => (p.partition, p.offset.unwrap()),
            other => panic!("not a position: {other:?}"),
        })
        .collect()
}

fn with_key<T>(msg: T, key: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("x-api-key", key.parse().unwrap());
    r
}

#[tokio::test]
async fn unary_publish_appends_every_event_and_answers_per_event() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let mut c = client(&s).await;
    let resp = c
        .publish(pb::PublishRequest {
            stream: "orders".into(),
            events: vec![
                event("a", Some("k1")),
                event("b", None),
                event("c", Some("k1")),
            ],
            content_type: "text/plain".into(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(offsets(&resp.results), vec![(0, 0), (0, 1), (0, 2)]);
    let log = read_log(&s.data_dir, "orders", &[]).unwrap();
    assert_eq!(log.len(), 3);
    assert_eq!(log[0]["value"], "a");
    assert_eq!(log[0]["key"], "k1");
    assert_eq!(log[0]["id"], "id-a");
    assert_eq!(log[1]["value"], "b");
    let text = log[2].to_string();
    assert!(
        text.contains("north") && text.contains("grpc") && text.contains("text/plain"),
        "{text}"
    );

    // Compressed both ways.
    let mut z = client(&s)
        .await
        .send_compressed(CompressionEncoding::Zstd)
        .accept_compressed(CompressionEncoding::Gzip);
    let resp = z
        .publish(pb::PublishRequest {
            stream: "orders".into(),
            events: vec![event(&"z".repeat(10_000), None)],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(offsets(&resp.results), vec![(0, 3)]);
    let log = read_log(&s.data_dir, "orders", &[]).unwrap();
    assert_eq!(log[3]["value"].as_str().unwrap().len(), 10_000);
}

#[tokio::test]
async fn publish_stream_answers_every_batch_in_order_with_many_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let mut c = client(&s).await;
    const BATCHES: u64 = 300;
    const EVENTS: usize = 20;
    let batches = (0..BATCHES).map(|seq| pb::PublishStreamRequest {
        sequence: 1000 + seq,
        stream: "stream".into(),
        events: (0..EVENTS)
            .map(|i| event(&format!("{seq}-{i}"), None))
            .collect(),
        content_type: String::new(),
        idempotency_key: String::new(),
    });
    let mut out = c
        .publish_stream(tokio_stream::iter(batches))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(r) = out.message().await.unwrap() {
        assert!(r.status.is_none(), "{r:?}");
        assert_eq!(r.results.len(), EVENTS);
        seen.push((r.sequence, offsets(&r.results)));
    }
    let seqs: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1000..1000 + BATCHES).collect::<Vec<_>>(),
        "answers out of order"
    );
    // Pipelined batches of one stream are appended in the order they were sent.
    let flat: Vec<u64> = seen
        .iter()
        .flat_map(|(_, o)| o.iter().map(|(_, o)| *o))
        .collect();
    assert!(
        flat.windows(2).all(|w| w[0] < w[1]),
        "log order differs from send order"
    );
    // Every event at its own offset, and the log holds what each answer says.
    let log = read_log(&s.data_dir, "stream", &[]).unwrap();
    assert_eq!(log.len(), BATCHES as usize * EVENTS);
    for (seq, offs) in &seen {
        for (i, (_, o)) in offs.iter().enumerate() {
            assert_eq!(log[*o as usize]["value"], format!("{}-{i}", seq - 1000));
        }
    }
}

#[tokio::test]
async fn rejections_are_grpc_statuses_and_a_rejected_batch_does_not_end_its_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "k1.secret-one-secret-one";
    let toml = format!(
        "[grpc.auth]\nallow_anonymous = false\n[streams]\nauto_create = false\n[streams.declare.mine]\n[streams.declare.other]\n[streams.declare.limited]\n{}\n[[quotas.rules]]\nstreams = \"limited\"\nscope = \"stream\"\nevents_per_sec = 1\nburst_events = 2\n",
        api_key_entry(key, "svc", &["mine", "limited", "nowhere"])
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let mut c = client(&s).await;
    let req = |stream: &str| pb::PublishRequest {
        stream: stream.into(),
        events: vec![event("x", None)],
        content_type: String::new(),
        idempotency_key: String::new(),
    };

    let e = c.publish(req("mine")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c
        .publish(with_key(req("mine"), "k1.wrong-secret-wrong"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c.publish(with_key(req("other"), key)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let e = c
        .publish(with_key(req("bad name!"), key))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c.publish(with_key(req("nowhere"), key)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    c.publish(with_key(req("mine"), key)).await.unwrap();

    // Over quota: RESOURCE_EXHAUSTED with google.rpc.RetryInfo.
    let burst = pb::PublishRequest {
        stream: "limited".into(),
        events: vec![event("1", None), event("2", None)],
        content_type: String::new(),
        idempotency_key: String::new(),
    };
    c.publish(with_key(burst.clone(), key)).await.unwrap();
    let e = c.publish(with_key(burst, key)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let retry = e
        .get_details_retry_info()
        .expect("RetryInfo in the details");
    assert!(
        retry.retry_delay.is_some_and(|d| d > Duration::ZERO),
        "{retry:?}"
    );

    // On a stream, a forbidden batch is answered with its status; the next batch goes on.
    let batches = vec![
        pb::PublishStreamRequest {
            sequence: 1,
            stream: "other".into(),
            events: vec![event("no", None)],
            content_type: String::new(),
            idempotency_key: String::new(),
        },
        pb::PublishStreamRequest {
            sequence: 2,
            stream: "mine".into(),
            events: vec![event("yes", None)],
            content_type: String::new(),
            idempotency_key: String::new(),
        },
    ];
    let mut out = c
        .publish_stream(with_key(tokio_stream::iter(batches), key))
        .await
        .unwrap()
        .into_inner();
    let first = out.message().await.unwrap().unwrap();
    assert_eq!(first.sequence, 1);
    let status = first.status.expect("batch status");
    assert_eq!(status.code, Code::PermissionDenied as i32, "{status:?}");
    let second = out.message().await.unwrap().unwrap();
    assert_eq!(second.sequence, 2);
    assert!(second.status.is_none());
    assert_eq!(offsets(&second.results).len(), 1);
    assert!(out.message().await.unwrap().is_none());

    // A stream without credentials fails as a whole.
    let e = c
        .publish_stream(tokio_stream::iter(Vec::<pb::PublishStreamRequest>::new()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_connection_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[grpc]\nmax_message_bytes = 65536\n",
    )
    .unwrap();
    let mut c = client(&s).await;
    let e = c
        .publish(pb::PublishRequest {
            stream: "big".into(),
            events: vec![event(&"x".repeat(100_000), None)],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Code::ResourceExhausted | Code::OutOfRange),
        "{e:?}"
    );
    let ok = c
        .publish(pb::PublishRequest {
            stream: "big".into(),
            events: vec![event("small", None)],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(offsets(&ok.results), vec![(0, 0)]);
}

#[tokio::test]
async fn health_follows_readiness_and_reflection_lists_the_service() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let ch = Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch.clone());
    let serving = sluice_tests::wait_until(Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "sluice.v1.Ingest".into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
        }
    })
    .await;
    assert!(serving, "health never reported SERVING");
    let overall = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overall.status, ServingStatus::Serving as i32);

    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut out = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = out.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"sluice.v1.Ingest".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_and_quotas_are_grpc_signals_with_retry_info() {
    let tmp = tempfile::tempdir().unwrap();
    let toml = "[limits]\nmax_in_flight_bytes = 65536\n[streams.defaults]\nmax_body_bytes = 32768\nmax_event_bytes = 32768\n[log]\nfault_append_delay_ms = 1500\n[[quotas.rules]]\nstreams = \"q\"\nscope = \"stream\"\nevents_per_sec = 1\nburst_events = 2\n";
    let s = Sluice::start(&tmp.path().join("data"), toml).unwrap();
    let c = client(&s).await;

    // A slow log: the in-flight budget fills and further batches get UNAVAILABLE + RetryInfo.
    let calls: Vec<_> = (0..6)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.publish(pb::PublishRequest {
                    stream: "slow".into(),
                    events: vec![event(&format!("{i}{}", "x".repeat(10_000)), None)],
                    content_type: String::new(),
                    idempotency_key: String::new(),
                })
                .await
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(e.get_details_retry_info().is_some(), "no RetryInfo: {e:?}");
                shed += 1;
            }
        }
    }
    assert!(ok > 0 && shed > 0, "ok {ok}, shed {shed}");
    let m = s.metrics().await;
    assert!(
        sluice_tests::metric(
            &m,
            "sluice_requests_total",
            "protocol=\"grpc\",outcome=\"unavailable\""
        ) >= shed as f64,
        "{m}"
    );

    // A batch over its quota: the prefix that fits is appended, the rest answered per event.
    let mut c2 = c.clone();
    let r = c2
        .publish(pb::PublishRequest {
            stream: "q".into(),
            events: (0..5).map(|i| event(&i.to_string(), None)).collect(),
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let codes: Vec<String> = r
        .results
        .iter()
        .map(|r| match &r.result {
            Some(pb::event_result::Result::Position(_)) => "ok".to_string(),
            Some(pb::event_result::Result::Error(e)) => {
                assert!(e.retry_after_ms > 0, "{e:?}");
                e.code.clone()
            }
            None => panic!("empty result"),
        })
        .collect();
    assert_eq!(
        codes,
        ["ok", "ok", "over_quota", "over_quota", "over_quota"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_cancellation_never_cut_an_append_short() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[log]\nfault_append_delay_ms = 1000\n",
    )
    .unwrap();
    let mut c = client(&s).await;
    let mut req = Request::new(pb::PublishRequest {
        stream: "late".into(),
        events: vec![event("slow", None)],
        content_type: String::new(),
        idempotency_key: String::new(),
    });
    req.set_timeout(Duration::from_millis(200));
    let e = c.publish(req).await.unwrap_err();
    // Whichever side's timer fires first: the server's DEADLINE_EXCEEDED or tonic's own.
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    // Not acked, but not cut short either: the append completes.
    let appended = sluice_tests::wait_until(Duration::from_secs(20), || async {
        read_log(&s.data_dir, "late", &[]).is_ok_and(|l| l.len() == 1)
    })
    .await;
    assert!(appended, "the append of a timed-out call was lost");

    // A stream cancelled after some answers: everything answered is in the log.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut out = c
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for seq in 0..6u64 {
        tx.send(pb::PublishStreamRequest {
            sequence: seq,
            stream: "cancel".into(),
            events: vec![event(&format!("c{seq}"), None)],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    }
    let mut acked = Vec::new();
    for _ in 0..2 {
        let r = out.message().await.unwrap().unwrap();
        acked.extend(offsets(&r.results));
    }
    drop(out);
    drop(tx);
    let log = read_log(&s.data_dir, "cancel", &[]).unwrap();
    for (_, o) in &acked {
        assert!(log.len() > *o as usize, "acked offset {o} missing");
    }
}

#[tokio::test]
async fn health_is_not_serving_while_the_log_is_unavailable() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let (_down, port) = sluice_tests::kafka::refused_port();
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        &sluice_tests::kafka::kafka_config(&format!("127.0.0.1:{port}"), ""),
    )
    .unwrap();
    let ch = Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch);
    let not_serving = sluice_tests::wait_until(Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::NotServing as i32)
        }
    })
    .await;
    assert!(
        not_serving,
        "health did not report NOT_SERVING without a broker"
    );
    let e = IngestClient::new(
        Channel::from_shared(s.grpc_url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .publish(pb::PublishRequest {
        stream: "x".into(),
        events: vec![event("1", None)],
        content_type: String::new(),
        idempotency_key: String::new(),
    })
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.get_details_retry_info().is_some());
    // The refusal did not change what health says: still NOT_SERVING, still answering.
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health answers while the log is down")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_keep_send_order_within_a_call_while_calls_complete_out_of_order() {
    let tmp = tempfile::tempdir().unwrap();
    // Batches to `slow` beyond its burst are held by a delay quota (about a second);
    // batches to `fast` are not.
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[quotas]\nmax_delay_ms = 5000\n[[quotas.rules]]\nstreams = \"slow\"\nscope = \"stream\"\nevents_per_sec = 1\nburst_events = 1\npolicy = \"delay\"\n",
    )
    .unwrap();
    let c = client(&s).await;
    let batch = |sequence, stream: &str| pb::PublishStreamRequest {
        sequence,
        stream: stream.into(),
        events: vec![event(&format!("{stream}-{sequence}"), None)],
        content_type: String::new(),
        idempotency_key: String::new(),
    };
    // Call A: the burst, then a held batch, then a fast one sent after it.
    let (a_tx, a_rx) = tokio::sync::mpsc::channel(8);
    let mut a = c
        .clone()
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(a_rx))
        .await
        .unwrap()
        .into_inner();
    a_tx.send(batch(1, "slow")).await.unwrap();
    assert_eq!(a.message().await.unwrap().unwrap().sequence, 1);
    // Three events at 1/s: held for about three seconds.
    let mut held = batch(2, "slow");
    held.events = (0..3).map(|i| event(&format!("held-{i}"), None)).collect();
    a_tx.send(held).await.unwrap();
    a_tx.send(batch(3, "fast")).await.unwrap();

    // Call B, meanwhile: its batch completes while A's second batch is still held.
    let mut b = c
        .clone()
        .publish_stream(tokio_stream::iter(vec![batch(7, "fast")]))
        .await
        .unwrap()
        .into_inner();
    let b_answer = b.message().await.unwrap().unwrap();
    let b_done = std::time::Instant::now();
    assert_eq!(b_answer.sequence, 7);
    assert!(b_answer.status.is_none());
    // A's batch 3 is appended while its batch 2 is still held: completion is out of order.
    let appended = sluice_tests::wait_until(Duration::from_secs(2), || async {
        read_log(&s.data_dir, "fast", &[]).is_ok_and(|l| l.iter().any(|e| e["value"] == "fast-3"))
    })
    .await;
    assert!(
        appended,
        "batch 3 was not appended before batch 2 was released"
    );
    assert_eq!(read_log(&s.data_dir, "slow", &[]).unwrap().len(), 1);

    // A's answers still come in send order: 2 (held), then 3 (done long before).
    let second = a.message().await.unwrap().unwrap();
    let a2_done = std::time::Instant::now();
    let third = a.message().await.unwrap().unwrap();
    assert_eq!((second.sequence, third.sequence), (2, 3));
    assert!(
        second.status.is_none() && third.status.is_none(),
        "{second:?} {third:?}"
    );
    assert!(
        b_done < a2_done,
        "call B did not complete before call A's held batch"
    );
    // The fast batch sent after the held one was appended first: completion was out of order.
    let fast = read_log(&s.data_dir, "fast", &[]).unwrap();
    assert_eq!(fast.len(), 2);
    drop(a_tx);
    assert!(a.message().await.unwrap().is_none());
}

#[tokio::test]
async fn a_principal_at_its_connection_limit_gets_resource_exhausted() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "k1.secret-one-secret-one";
    let toml = format!(
        "[grpc]\nmax_connections_per_principal = 1\n{}",
        api_key_entry(key, "svc", &["*"])
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let req = || {
        with_key(
            pb::PublishRequest {
                stream: "conns".into(),
                events: vec![event("1", None)],
                content_type: String::new(),
                idempotency_key: String::new(),
            },
            key,
        )
    };
    let mut first = client(&s).await;
    first.publish(req()).await.unwrap();
    // A second connection of the same principal is refused while the first is open...
    let mut second = client(&s).await;
    let e = second.publish(req()).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.get_details_retry_info().is_some());
    // ...and the first one goes on.
    first.publish(req()).await.unwrap();
}
