//! The Kafka sink under faults the real broker cannot produce on demand, injected with
//! librdkafka's mock cluster (it listens on real loopback ports; the gateway is the real binary):
//! the broker lost mid-load, produce errors (retryable and final), a slow broker, a full
//! producer queue. Every acked event must be in the log; everything else must get an error that
//! says whether to retry; memory stays within the in-flight budget; the gateway recovers
//! without a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sluice_tests::http::Answer;
use sluice_tests::kafka::{assert_acked_in, kafka_config, read_topic};
use sluice_tests::{Sluice, metric, wait_until};

const READ_TIMEOUT: Duration = Duration::from_secs(30);

fn client() -> reqwest::Client {
    sluice_tests::http::client(Duration::from_secs(90))
}

async fn ready(s: &Sluice, want: StatusCode) -> bool {
    s.wait_readyz(want.as_u16(), Duration::from_secs(30)).await
}

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> Answer {
    Answer::of(c.post(url).json(body)).await
}

/// Splits a 200 answer's results into acked positions (with the sent value) and retryable
/// failures; panics on anything else.
fn sort_results(a: &Answer, values: &[String], acked: &mut Vec<((i32, i64), String)>) -> usize {
    let mut retryable = 0;
    for (r, v) in a.body["results"].as_array().unwrap().iter().zip(values) {
        if let Some(o) = r["offset"].as_i64() {
            // A JSON value is stored as its JSON text.
            acked.push((
                (r["partition"].as_i64().unwrap() as i32, o),
                json!(v).to_string(),
            ));
        } else {
            assert_eq!(r["error"]["code"], "unavailable", "{r}");
            assert!(r["error"]["retry_after_ms"].as_u64().is_some(), "{r}");
            retryable += 1;
        }
    }
    retryable
}

#[tokio::test]
async fn broker_lost_under_load_loses_no_acked_event_and_recovers_without_restart() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("load", 2, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let tmp = tempfile::tempdir().unwrap();
    let timeout_ms = 3000;
    let s = Sluice::start(
        &tmp.path().join("data"),
        &kafka_config(
            &bootstrap,
            &format!("message_timeout_ms = {timeout_ms}\nlinger_ms = 1"),
        ),
    )
    .unwrap();
    let c = client();
    assert!(ready(&s, StatusCode::OK).await, "never ready");

    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let refused_count = Arc::new(AtomicUsize::new(0));
    let url = s.events_url("load");
    let producers: Vec<_> = (0..6)
        .map(|p| {
            let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
            let (acked_count, refused_count) = (acked_count.clone(), refused_count.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut slowest = Duration::ZERO;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let values: Vec<String> = (0..10).map(|i| format!("{p}-{n}-{i}")).collect();
                    n += 1;
                    let body: Vec<Value> = values
                        .iter()
                        .map(|v| json!({"key": format!("k{}", n % 5), "value": v}))
                        .collect();
                    let a = post(&c, &url, &json!(body)).await;
                    slowest = slowest.max(a.took);
                    match a.status {
                        StatusCode::OK => {
                            let before = acked.len();
                            let retry = sort_results(&a, &values, &mut acked);
                            acked_count.fetch_add(acked.len() - before, Ordering::Relaxed);
                            refused_count.fetch_add(retry, Ordering::Relaxed);
                        }
                        StatusCode::SERVICE_UNAVAILABLE => {
                            assert!(a.retry_after.is_some(), "503 without Retry-After");
                            assert_eq!(a.body["error"]["code"], "unavailable");
                            refused_count.fetch_add(values.len(), Ordering::Relaxed);
                            // A client that honours Retry-After would wait; keep the test brisk.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => panic!("unexpected {other}: {}", a.body),
                    }
                }
                (acked, slowest)
            })
        })
        .collect();

    let progressed = |at_least: usize| {
        let acked_count = acked_count.clone();
        async move {
            wait_until(Duration::from_secs(60), || async {
                acked_count.load(Ordering::Relaxed) >= at_least
            })
            .await
        }
    };
    assert!(progressed(300).await, "no load acked before the fault");
    cluster.broker_down(1).unwrap();
    assert!(
        ready(&s, StatusCode::SERVICE_UNAVAILABLE).await,
        "/readyz stayed 200 with the broker down"
    );
    assert!(
        wait_until(Duration::from_secs(30), || async {
            refused_count.load(Ordering::Relaxed) > 0
        })
        .await,
        "no producer was refused while the broker was down"
    );
    cluster.broker_up(1).unwrap();
    assert!(
        ready(&s, StatusCode::OK).await,
        "not ready again after the broker returned"
    );
    let after = acked_count.load(Ordering::Relaxed);
    assert!(
        progressed(after + 300).await,
        "no events acked after recovery"
    );
    stop.store(true, Ordering::Relaxed);

    let mut acked = Vec::new();
    for p in producers {
        let (a, slowest) = p.await.unwrap();
        // Nothing waits (much) longer than message_timeout_ms for its answer.
        assert!(
            slowest < Duration::from_millis(timeout_ms + 2000),
            "a request took {slowest:?}"
        );
        acked.extend(a);
    }
    let records = read_topic(&bootstrap, "load", acked.len(), READ_TIMEOUT).unwrap();
    assert_acked_in(&records, &acked);
    assert!(refused_count.load(Ordering::Relaxed) > 0);
}

#[tokio::test]
async fn produce_errors_are_retried_reported_as_retryable_or_final_and_do_not_stick() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("errs", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        &kafka_config(&bootstrap, "message_timeout_ms = 2000\nlinger_ms = 1"),
    )
    .unwrap();
    let c = client();
    assert!(ready(&s, StatusCode::OK).await);
    let url = s.events_url("errs");

    // A few transient errors: the producer retries by itself; the event is stored once.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 3],
    );
    let a = post(&c, &url, &json!({"value": "first"})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    // Errors that outlast message_timeout_ms: a retryable 503, counted as such.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 10_000],
    );
    let a = post(&c, &url, &json!({"value": "timed-out"})).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert!(a.retry_after.is_some());
    assert!(
        a.took < Duration::from_millis(2000 + 5000),
        "took {:?}",
        a.took
    );
    cluster.clear_request_errors(RDKafkaApiKey::Produce);
    let m = s.metrics().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("sluice_kafka_delivery_errors_total{")
                && l.contains("retryable=\"true\"")),
        "{m}"
    );

    // A final error: not retryable, said so, and the next event goes through.
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let a = post(&c, &url, &json!({"value": "refused"})).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.body);
    assert!(
        a.retry_after.is_none(),
        "a final error must not invite a retry"
    );
    let a = post(&c, &url, &json!({"value": "second"})).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    // Refused events are counted by their own code: the timed-out one as unavailable, the
    // oversized one as too_large (not every failure as `unavailable`).
    let m = s.metrics().await;
    for reason in ["unavailable", "too_large"] {
        let series =
            format!("sluice_events_rejected_total{{protocol=\"http\",reason=\"{reason}\"}} ");
        assert!(
            m.lines()
                .any(|l| l.starts_with(&series) && !l.ends_with(" 0")),
            "{reason}: {m}"
        );
    }

    // The log holds what was acked, once each.
    let records = read_topic(&bootstrap, "errs", 3, Duration::from_secs(5)).unwrap();
    let values: Vec<String> = records
        .iter()
        .map(|r| String::from_utf8_lossy(&r.value).into_owned())
        .filter(|v| v != "\"timed-out\"")
        .collect();
    assert_eq!(values, vec!["\"first\"", "\"second\""], "{records:#?}");
}

#[tokio::test]
async fn a_slow_broker_turns_into_backpressure_within_the_budget_and_a_full_queue_into_503() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("slow", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let tmp = tempfile::tempdir().unwrap();
    let budget = 64 * 1024;
    let toml = format!(
        "{}\n[limits]\nmax_in_flight_bytes = {budget}\n[streams.defaults]\nmax_body_bytes = 32768\nmax_event_bytes = 4096\n",
        kafka_config(&bootstrap, "linger_ms = 1\nqueue_max_events = 100")
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let c = client();
    assert!(ready(&s, StatusCode::OK).await);
    cluster
        .broker_round_trip_time(1, Duration::from_millis(1500))
        .unwrap();
    let url = s.events_url("slow");

    // More than the queue holds in one request: the rest is refused, retryably, in order.
    let values: Vec<String> = (0..150).map(|i| format!("q{i}")).collect();
    let body: Vec<Value> = values.iter().map(|v| json!({"value": v})).collect();
    let a = post(&c, &url, &json!(body)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let mut acked = Vec::new();
    let refused = sort_results(&a, &values, &mut acked);
    assert_eq!((acked.len(), refused), (100, 50), "{}", a.body);
    assert!(
        a.body["results"][100]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("queue is full")
    );

    // Many producers against the slow broker: the in-flight budget bounds what is held, the
    // rest are told to retry.
    let tasks: Vec<_> = (0..24)
        .map(|p| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let values: Vec<String> = (0..10)
                    .map(|i| format!("{p}-{i}-{}", "x".repeat(900)))
                    .collect();
                let body: Vec<Value> = values.iter().map(|v| json!({"value": v})).collect();
                (post(&c, &url, &json!(body)).await, values)
            })
        })
        .collect();
    let mut peak = 0.0f64;
    let sampler = async {
        loop {
            let m = s.metrics().await;
            peak = peak.max(metric(&m, "sluice_in_flight_bytes", ""));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let answers = tokio::select! {
        a = futures_util::future::join_all(tasks) => a,
        _ = sampler => unreachable!(),
    };
    let (mut ok, mut busy) = (0, 0);
    for a in answers {
        let (a, values) = a.unwrap();
        match a.status {
            StatusCode::OK => {
                ok += 1;
                sort_results(&a, &values, &mut acked);
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                busy += 1;
                assert!(a.retry_after.is_some());
            }
            other => panic!("unexpected {other}: {}", a.body),
        }
    }
    assert!(ok > 0 && busy > 0, "ok {ok}, busy {busy}");
    assert!(peak > 0.0, "in-flight bytes never sampled above 0");
    assert!(
        peak <= budget as f64,
        "in-flight bytes {peak} above the budget {budget}"
    );

    cluster.broker_round_trip_time(1, Duration::ZERO).unwrap();
    let records = read_topic(&bootstrap, "slow", acked.len(), READ_TIMEOUT).unwrap();
    assert_acked_in(&records, &acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_acks_wait_for_the_broker() {
    use rmqtt_codec::v5;
    use sluice_tests::mqtt::{connect5, publish, session5};
    // Every broker round trip takes 1.5 s: a PUBACK that comes sooner did not wait for Kafka.
    let rtt = Duration::from_millis(1500);
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("slowmq", 1, 1).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let tmp = tempfile::tempdir().unwrap();
    let toml = kafka_config(&bootstrap, "linger_ms = 1");
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    assert!(ready(&s, StatusCode::OK).await);
    cluster.broker_round_trip_time(1, rtt).unwrap();
    let (mut raw, _) = session5(s.mqtt.unwrap(), connect5("slow-dev", 30)).await;
    for (id, qos) in [(1u16, 1u8), (2, 2)] {
        let t0 = std::time::Instant::now();
        let mut p = publish("slowmq/k", qos, id, b"", Some(Default::default()));
        p.payload = bytes::Bytes::from(format!("m{id}"));
        raw.send5(v5::Packet::Publish(Box::new(p))).await;
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) | Some(v5::Packet::PublishReceived(a)) => {
                assert_eq!(
                    (a.packet_id.get(), u8::from(a.reason_code)),
                    (id, 0),
                    "{a:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        let took = t0.elapsed();
        assert!(
            took >= rtt - Duration::from_millis(100),
            "QoS {qos} answered after {took:?}, before the broker could have acknowledged"
        );
    }
    let records = read_topic(&bootstrap, "slowmq", 2, READ_TIMEOUT).unwrap();
    let values: Vec<_> = records.iter().map(|r| r.value.clone()).collect();
    assert_eq!(values, vec![b"m1".to_vec(), b"m2".to_vec()]);
}
