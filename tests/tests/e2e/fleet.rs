//! A fleet of gateways sharing one Redis: cluster-wide quotas (`cluster = true`) hold one rate
//! across three gateways under uneven load, with leases and without, and each gateway falls
//! back to its share of the rate while Redis is away. And three gateways over Kafka behind
//! HAProxy, driven on all four protocols, through a SIGKILL and a rolling restart.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::v5;
use serde_json::{Value, json};
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::haproxy::Haproxy;
use sluice_tests::http::Answer;
use sluice_tests::kafka::{Tansu, create_topic, free_port, kafka_config, read_topic};
use sluice_tests::mqtt::Raw;
use sluice_tests::redis::Redis;
use sluice_tests::{Sluice, metric, wait_until};
use tokio_tungstenite::tungstenite::Message;

/// The cluster-wide rate of the tests' rule, and its burst.
const RATE: f64 = 300.0;

fn config(redis_port: u16, lease_ms: u64) -> String {
    format!(
        "[dedup]\nstore = \"redis\"\n[dedup.redis]\nurl = \"redis://127.0.0.1:{redis_port}\"\ntimeout_ms = 200\n\
         [quotas.cluster]\ngateways = 1\nlease_ms = {lease_ms}\n\
         [[quotas.rules]]\nscope = \"stream\"\nstreams = \"c.*\"\nevents_per_sec = {RATE}\nburst_events = {RATE}\ncluster = true\n\
         [[quotas.rules]]\nscope = \"stream\"\nstreams = \"b.*\"\nbytes_per_sec = 100\nburst_bytes = 1000\ncluster = true\n"
    )
}

async fn post(c: &reqwest::Client, url: &str, n: usize) -> (u16, usize) {
    let events: Vec<Value> = (0..n).map(|i| json!(i)).collect();
    let a = Answer::of(c.post(url).json(&events)).await;
    let admitted = a.body["results"].as_array().map_or(0, |r| {
        r.iter().filter(|e| e.get("offset").is_some()).count()
    });
    if a.status != 200 {
        assert_eq!(a.status, 429, "only the quota may refuse: {}", a.body);
    }
    (a.status.as_u16(), admitted)
}

/// Three gateways on one Redis, once each says Redis counts three of them.
async fn fleet(tmp: &std::path::Path, redis: &Redis, lease_ms: u64) -> Vec<Sluice> {
    let gateways: Vec<Sluice> = (0..3)
        .map(|i| Sluice::start(&tmp.join(format!("g{i}")), &config(redis.port, lease_ms)).unwrap())
        .collect();
    for g in &gateways {
        assert!(
            wait_until(Duration::from_secs(10), || async {
                sluice_tests::metric_or_zero(
                    &g.metrics().await,
                    "sluice_quota_cluster_gateways",
                    "",
                ) == 3.0
            })
            .await,
            "each gateway learns from Redis that three share the quotas"
        );
    }
    gateways
}

/// Uneven producers for `window`: three on the first gateway sending 5 events every 10 ms,
/// one on the second sending 5 every 50 ms, one on the third sending 2 every 100 ms (1,620
/// events/s offered; alone, the second and third offer less than a third of the rate each).
/// Counts what was admitted by requests sent and answered inside the window, per gateway; and
/// everything admitted, window or not.
async fn uneven_load(urls: &[String], window: Duration) -> (Vec<usize>, f64, usize) {
    let plan: [(usize, usize, u64); 5] =
        [(0, 5, 10), (0, 5, 10), (0, 5, 10), (1, 5, 50), (2, 2, 100)];
    let measuring = Arc::new(AtomicBool::new(false));
    let start = Instant::now() + Duration::from_millis(1500); // one burst's worth goes first
    let end = start + window;
    let producers: Vec<_> = plan
        .into_iter()
        .map(|(g, n, every)| {
            let url = urls[g].clone();
            let measuring = measuring.clone();
            tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut tick = tokio::time::interval(Duration::from_millis(every));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let (mut admitted, mut all) = (0, 0);
                loop {
                    tick.tick().await;
                    let sent = Instant::now();
                    if sent >= end {
                        return (g, admitted, all);
                    }
                    let (_, ok) = post(&c, &url, n).await;
                    all += ok;
                    if sent >= start && Instant::now() < end {
                        measuring.store(true, Ordering::Relaxed);
                        admitted += ok;
                    }
                }
            })
        })
        .collect();
    let (mut by_gateway, mut all) = (vec![0; urls.len()], 0);
    for p in producers {
        let (g, n, a) = p.await.unwrap();
        by_gateway[g] += n;
        all += a;
    }
    assert!(measuring.load(Ordering::Relaxed));
    (by_gateway, window.as_secs_f64(), all)
}

fn assert_holds(what: &str, by_gateway: &[usize], secs: f64, rate: f64) {
    let total: usize = by_gateway.iter().sum();
    let admitted = total as f64 / secs;
    eprintln!("{what}: {admitted:.1}/s of {rate}/s ({by_gateway:?} by gateway in {secs:.2} s)");
    assert!(
        (0.9 * rate..=1.1 * rate).contains(&admitted),
        "{what}: admitted {total} events in {secs:.2} s = {admitted:.1}/s ({by_gateway:?} by gateway); the quota is {rate}/s"
    );
}

async fn rate_is_held_across_three_gateways(
    lease_ms: u64,
) -> (tempfile::TempDir, Redis, Vec<Sluice>) {
    let tmp = tempfile::tempdir().unwrap();
    let redis = Redis::start().unwrap();
    let gateways = fleet(tmp.path(), &redis, lease_ms).await;
    // A byte quota is shared too, per event: 1,000 bytes of burst, each event below costs 476
    // (a 450-byte value, its quotes and 24 bytes of framing: docs/quotas.md), so the first
    // gateway admits two of three and the second none, told when 476 bytes will have come.
    let c = reqwest::Client::new();
    let events = json!(["v".repeat(450), "v".repeat(450), "v".repeat(450)]);
    let a = Answer::of(c.post(gateways[0].events_url("b.one")).json(&events)).await;
    let results = a.body["results"].as_array().unwrap();
    assert!(results[1].get("offset").is_some(), "{}", a.body);
    assert_eq!(results[2]["error"]["code"], "over_quota", "{}", a.body);
    let a = Answer::of(
        c.post(gateways[1].events_url("b.one"))
            .json(&json!(["v".repeat(450)])),
    )
    .await;
    assert_eq!(
        a.status, 429,
        "the second gateway sees the same bucket: {}",
        a.body
    );
    let hint = a.body["error"]["retry_after_ms"].as_u64().unwrap();
    assert!(
        (3000..=5000).contains(&hint),
        "about 4.3-4.8 s at 100 bytes/s: {hint}"
    );
    let urls: Vec<String> = gateways.iter().map(|g| g.events_url("c.one")).collect();
    let (by_gateway, secs, all) = uneven_load(&urls, Duration::from_secs(4)).await;
    assert_holds(&format!("lease_ms = {lease_ms}"), &by_gateway, secs, RATE);
    // Per-gateway shares of the rate would have held the busy gateway to a third of it.
    assert!(
        by_gateway[0] as f64 / secs > RATE / 3.0 * 1.2,
        "the busy gateway took more than its third: {by_gateway:?}"
    );
    // Nothing refused was stored; everything admitted was (each gateway's own log).
    let (mut stored, mut calls) = (0, 0);
    for g in &gateways {
        stored += g.read_log("c.one").unwrap().len();
        let m = g.metrics().await;
        calls += metric(&m, "sluice_quota_cluster_calls_total", r#"result="ok""#) as usize;
    }
    assert_eq!(
        stored, all,
        "every admitted event is stored, no refused one"
    );
    assert!(calls > 0, "the buckets were asked in Redis");
    (tmp, redis, gateways)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_quota_without_leases_holds_the_rate_across_three_gateways() {
    rate_is_held_across_three_gateways(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_quota_with_leases_holds_the_rate_and_falls_back_to_a_share_without_redis() {
    let (_tmp, redis, gateways) = rate_is_held_across_three_gateways(100).await;
    let port = redis.port;
    drop(redis);
    // Without Redis, each gateway holds the rule to its share: 300/s over the three that Redis
    // last counted, 100/s, with a burst of 100.
    let url = gateways[0].events_url("c.two");
    let c = reqwest::Client::new();
    // Requests go on while the gauge is polled (it changes with the next call for a bucket).
    let degraded_becomes = |want: f64| {
        let (c, url, g) = (&c, &url, &gateways[0]);
        wait_until(Duration::from_secs(10), move || async move {
            post(c, url, 1).await;
            metric(&g.metrics().await, "sluice_quota_cluster_degraded", "") == want
        })
    };
    assert!(
        degraded_becomes(1.0).await,
        "the gateway says it holds cluster quotas locally"
    );
    // Empty the local share's burst, then measure its rate on the busy gateway alone.
    loop {
        let (st, _) = post(&c, &url, 20).await;
        if st == 429 {
            break;
        }
    }
    let start = Instant::now();
    let mut admitted = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while start.elapsed() < Duration::from_secs(3) {
        tick.tick().await;
        admitted += post(&c, &url, 5).await.1;
    }
    assert_holds(
        "local share",
        &[admitted],
        start.elapsed().as_secs_f64(),
        RATE / 3.0,
    );
    let m = gateways[0].metrics().await;
    assert!(metric(&m, "sluice_quota_cluster_local_checks_total", "") > 0.0);
    assert!(metric(&m, "sluice_quota_cluster_calls_total", r#"result="error""#) > 0.0);
    // Redis back: the buckets are shared again.
    let _redis = Redis::start_on(port).unwrap();
    assert!(
        degraded_becomes(0.0).await,
        "the gateway shares the quota through Redis again"
    );
}

// ---------------------------------------------------------------------------------------------
// Three gateways over Kafka behind HAProxy: a SIGKILL under load and a rolling restart.

/// What the producers saw.
#[derive(Default)]
struct Ledger {
    /// Ids acked, by protocol.
    acked: Mutex<HashMap<&'static str, Vec<String>>>,
    /// Ids with an attempt whose answer never came (the connection went away): the gateway may
    /// or may not have stored it.
    uncertain: Mutex<HashSet<String>>,
    /// Answers that were not retryable, or events never acked (must stay empty).
    refused: Mutex<Vec<String>>,
    /// MQTT: reconnects, and reconnects that found no session.
    reconnects: std::sync::atomic::AtomicUsize,
    sessions_lost: std::sync::atomic::AtomicUsize,
}

impl Ledger {
    fn acked(&self, protocol: &'static str) -> usize {
        self.acked.lock().unwrap().get(protocol).map_or(0, Vec::len)
    }

    fn ack(&self, protocol: &'static str, id: String) {
        self.acked
            .lock()
            .unwrap()
            .entry(protocol)
            .or_default()
            .push(id);
    }
}

/// How one attempt at an event ended.
enum Outcome {
    Acked,
    /// Refused with a retryable answer: send again (after the hint).
    Retry(Duration),
    /// No answer (the connection went away): send again, and the event may be stored twice.
    Lost,
    /// Not retryable.
    Fatal(String),
}

const PROTOCOLS: [&str; 4] = ["http", "grpc", "ws", "mqtt"];

fn stream_of(protocol: &str) -> String {
    format!("fleet-{protocol}")
}

struct Ports {
    http: u16,
    grpc: u16,
    mqtt: u16,
}

/// Starts gateway `i` on ports nobody else holds: fresh ones until it binds them (another test
/// may take a port between [`free_port`] finding it and the gateway binding it); the HAProxy
/// configuration is written from the ports that worked.
fn start_gateway_on_free_ports(
    tmp: &std::path::Path,
    i: usize,
    config: &str,
    taken: &mut HashSet<u16>,
) -> (Ports, Sluice) {
    let mut fresh = || loop {
        let p = free_port();
        if taken.insert(p) {
            break p;
        }
    };
    let mut last = None;
    for _ in 0..3 {
        let ports = Ports {
            http: fresh(),
            grpc: fresh(),
            mqtt: fresh(),
        };
        match try_start_gateway(tmp, i, &ports, config) {
            Ok(s) => return (ports, s),
            Err(e) => last = Some(e),
        }
    }
    panic!("gateway {i} did not start on free ports: {last:?}");
}

fn start_gateway(tmp: &std::path::Path, i: usize, ports: &Ports, config: &str) -> Sluice {
    try_start_gateway(tmp, i, ports, config).unwrap()
}

fn try_start_gateway(
    tmp: &std::path::Path,
    i: usize,
    ports: &Ports,
    config: &str,
) -> anyhow::Result<Sluice> {
    let data = tmp.join(format!("g{i}"));
    let config_path = data.with_extension("toml");
    std::fs::write(&config_path, config).unwrap();
    let (h, g, m) = (
        format!("127.0.0.1:{}", ports.http),
        format!("127.0.0.1:{}", ports.grpc),
        format!("127.0.0.1:{}", ports.mqtt),
    );
    Sluice::start_with_env(
        &data,
        &config_path,
        &[
            ("SLUICE_HTTP__LISTEN", &h),
            ("SLUICE_GRPC__LISTEN", &g),
            ("SLUICE_MQTT__LISTEN", &m),
        ],
    )
}

/// Sends events `{protocol}-{n}`, one at a time, each until it is acked, through the balancer
/// at `addr`; stops after the event in hand once `stop` is set.
async fn produce(
    protocol: &'static str,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    ledger: Arc<Ledger>,
) {
    let mut conn = Conn::None;
    let mut n = 0u32;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("{protocol}-{n}");
        let started = Instant::now();
        let mut dup = false;
        loop {
            if started.elapsed() > Duration::from_secs(120) {
                ledger
                    .refused
                    .lock()
                    .unwrap()
                    .push(format!("{id}: not acked within 120 s"));
                return;
            }
            match attempt(protocol, addr, &mut conn, &id, n, dup).await {
                Outcome::Acked => {
                    ledger.ack(protocol, id);
                    break;
                }
                Outcome::Retry(hint) => {
                    tokio::time::sleep(
                        hint.clamp(Duration::from_millis(5), Duration::from_secs(1)),
                    )
                    .await;
                }
                Outcome::Lost => {
                    ledger.uncertain.lock().unwrap().insert(id.clone());
                    if let Conn::Mqtt(_) = conn {
                        ledger.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    conn = Conn::None;
                    dup = true;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Outcome::Fatal(why) => {
                    ledger.refused.lock().unwrap().push(format!("{id}: {why}"));
                    return;
                }
            }
            if let Conn::MqttSessionLost = conn {
                ledger.sessions_lost.fetch_add(1, Ordering::Relaxed);
                conn = Conn::None;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

enum Conn {
    None,
    Http(reqwest::Client),
    Grpc(IngestClient<tonic::transport::Channel>),
    Ws(
        Box<
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
        >,
    ),
    Mqtt(Box<Raw>),
    /// A reconnect found no session (counted, then connect again).
    MqttSessionLost,
}

async fn attempt(
    protocol: &str,
    addr: SocketAddr,
    conn: &mut Conn,
    id: &str,
    n: u32,
    dup: bool,
) -> Outcome {
    let deadline = Duration::from_secs(15);
    match protocol {
        "http" => {
            if !matches!(conn, Conn::Http(_)) {
                *conn = Conn::Http(reqwest::Client::new());
            }
            let Conn::Http(c) = conn else { unreachable!() };
            let url = format!("http://{addr}/v1/streams/{}/events", stream_of("http"));
            let sent = c
                .post(url)
                .json(&json!([{"id": id, "value": id}]))
                .timeout(deadline)
                .send()
                .await;
            let Ok(resp) = sent else { return Outcome::Lost };
            let status = resp.status().as_u16();
            let Ok(body) = resp.json::<Value>().await else {
                return if status >= 500 {
                    Outcome::Lost
                } else {
                    Outcome::Fatal(format!("{status} without a JSON body"))
                };
            };
            match status {
                200 => match body["results"][0].get("offset") {
                    Some(_) => Outcome::Acked,
                    None => retry_or_fatal(&body["results"][0]["error"]),
                },
                429 | 503 => retry_or_fatal(&body["error"]),
                _ => Outcome::Fatal(format!("{status}: {body}")),
            }
        }
        "grpc" => {
            if !matches!(conn, Conn::Grpc(_)) {
                let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(deadline)
                    .connect_lazy();
                *conn = Conn::Grpc(IngestClient::new(channel));
            }
            let Conn::Grpc(c) = conn else { unreachable!() };
            let req = pb::PublishRequest {
                stream: stream_of("grpc"),
                events: vec![pb::Event {
                    value: id.as_bytes().to_vec().into(),
                    id: id.to_string(),
                    ..Default::default()
                }],
                content_type: String::new(),
                idempotency_key: String::new(),
            };
            match c.publish(req).await {
                Ok(r) => match r
                    .into_inner()
                    .results
                    .first()
                    .and_then(|r| r.result.clone())
                {
                    Some(pb::event_result::Result::Position(_)) => Outcome::Acked,
                    Some(pb::event_result::Result::Error(e))
                        if e.code == "unavailable" || e.code == "over_quota" =>
                    {
                        Outcome::Retry(Duration::from_millis(e.retry_after_ms.max(1)))
                    }
                    other => Outcome::Fatal(format!("{other:?}")),
                },
                Err(s) => match s.code() {
                    tonic::Code::ResourceExhausted => Outcome::Retry(Duration::from_millis(100)),
                    tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Aborted => Outcome::Lost,
                    _ => Outcome::Fatal(format!("{s:?}")),
                },
            }
        }
        "ws" => {
            if !matches!(conn, Conn::Ws(_)) {
                let url = format!("ws://{addr}/v1/streams/{}/ws", stream_of("ws"));
                match tokio::time::timeout(deadline, tokio_tungstenite::connect_async(url)).await {
                    Ok(Ok((ws, _))) => *conn = Conn::Ws(Box::new(ws)),
                    // The balancer had no gateway to upgrade with (502/503), or none answered.
                    _ => return Outcome::Retry(Duration::from_millis(50)),
                }
            }
            let Conn::Ws(ws) = conn else { unreachable!() };
            let frame = json!({"id": id, "value": id}).to_string();
            if ws.send(Message::Text(frame.into())).await.is_err() {
                return Outcome::Lost;
            }
            loop {
                match tokio::time::timeout(deadline, ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let a: Value = serde_json::from_str(&t).unwrap();
                        if a.get("offset").is_some() {
                            return Outcome::Acked;
                        }
                        return match retry_or_fatal(&a["error"]) {
                            Outcome::Fatal(why) => Outcome::Fatal(why),
                            _ => Outcome::Retry(Duration::from_millis(
                                a["retry_after_ms"].as_u64().unwrap_or(100),
                            )),
                        };
                    }
                    Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                    // Closed (1001 going away, 1013 try again later), cut, or silent.
                    _ => return Outcome::Lost,
                }
            }
        }
        _ => {
            if !matches!(conn, Conn::Mqtt(_)) {
                let Ok(Ok(tcp)) =
                    tokio::time::timeout(deadline, tokio::net::TcpStream::connect(addr)).await
                else {
                    return Outcome::Retry(Duration::from_millis(50));
                };
                let mut raw = Raw::over(tcp, true);
                let mut c = sluice_tests::mqtt::connect5("fleet-device", 30);
                c.clean_start = false;
                c.session_expiry_interval_secs = 600;
                if !raw.try_send5(v5::Packet::Connect(Box::new(c))).await {
                    return Outcome::Retry(Duration::from_millis(50));
                }
                match tokio::time::timeout(deadline, raw.recv5()).await {
                    Ok(Some(v5::Packet::ConnectAck(ack)))
                        if ack.reason_code == v5::ConnectAckReason::Success =>
                    {
                        // The first connection makes the session; every later one must find it.
                        if n > 1 && !ack.session_present {
                            *conn = Conn::MqttSessionLost;
                            return Outcome::Retry(Duration::ZERO);
                        }
                        *conn = Conn::Mqtt(Box::new(raw));
                    }
                    Ok(Some(v5::Packet::ConnectAck(ack)))
                        if u8::from(ack.reason_code) == 0x88
                            || u8::from(ack.reason_code) == 0x89 =>
                    {
                        return Outcome::Retry(Duration::from_millis(100));
                    }
                    Ok(Some(other)) => {
                        return Outcome::Fatal(format!("CONNECT answered {other:?}"));
                    }
                    _ => return Outcome::Retry(Duration::from_millis(50)),
                }
            }
            let Conn::Mqtt(raw) = conn else {
                unreachable!()
            };
            // Packet ids go round 1..=65535; this test sends far fewer, so each names one event.
            let pkid = std::num::NonZeroU16::new((n % 65535 + 1) as u16).unwrap();
            let publish = Publish {
                dup,
                retain: false,
                qos: QoS::AtLeastOnce,
                topic: format!("{}/dev", stream_of("mqtt")).into(),
                packet_id: Some(pkid),
                payload: bytes::Bytes::from(id.to_string()),
                properties: Some(Default::default()),
            };
            if !raw.try_send5(v5::Packet::Publish(Box::new(publish))).await {
                return Outcome::Lost;
            }
            loop {
                match tokio::time::timeout(deadline, raw.recv5()).await {
                    Ok(Some(v5::Packet::PublishAck(a))) if a.packet_id == pkid => {
                        return match u8::from(a.reason_code) {
                            0 | 0x10 => Outcome::Acked,
                            0x97 | 0x89 | 0x88 => Outcome::Retry(Duration::from_millis(100)),
                            other => Outcome::Fatal(format!("PUBACK reason {other:#x}")),
                        };
                    }
                    Ok(Some(v5::Packet::Disconnect(_)) | None) | Err(_) => return Outcome::Lost,
                    Ok(Some(_)) => continue,
                }
            }
        }
    }
}

/// A per-event or request error: retryable ones (with a hint) are sent again.
fn retry_or_fatal(error: &Value) -> Outcome {
    match error["code"].as_str() {
        Some("unavailable" | "over_quota") => Outcome::Retry(Duration::from_millis(
            error["retry_after_ms"].as_u64().unwrap_or(100),
        )),
        _ => Outcome::Fatal(error.to_string()),
    }
}

/// Waits until every protocol has `more` acks beyond `from`.
async fn progress(ledger: &Ledger, more: usize, what: &str) {
    let from: Vec<usize> = PROTOCOLS.iter().map(|p| ledger.acked(p)).collect();
    let ok = wait_until(Duration::from_secs(90), || async {
        PROTOCOLS
            .iter()
            .zip(&from)
            .all(|(p, f)| ledger.acked(p) >= f + more)
    })
    .await;
    let now: Vec<usize> = PROTOCOLS.iter().map(|p| ledger.acked(p)).collect();
    assert!(
        ok,
        "{what}: every protocol goes on being acked ({from:?} -> {now:?}); refused: {:?}",
        ledger.refused.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_behind_haproxy_lose_nothing_through_a_sigkill_and_a_rolling_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let tansu = Tansu::start().unwrap();
    let redis = Redis::start().unwrap();
    for p in PROTOCOLS {
        create_topic(&tansu.bootstrap, &stream_of(p), 3)
            .await
            .unwrap();
    }
    let config = format!(
        "{}[streams.defaults]\ndedup = true\n\
         [dedup]\nstore = \"redis\"\n[dedup.redis]\nurl = \"redis://127.0.0.1:{}\"\n\
         [grpc.proxy]\nprotocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [mqtt.proxy]\nprotocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [http.proxy]\nforwarded_headers = true\ntrusted_proxies = [\"127.0.0.1\"]\n\
         [server]\nshutdown_timeout_ms = 10000\n",
        kafka_config(&tansu.bootstrap, ""),
        redis.port
    );
    let mut taken = HashSet::new();
    let (ports, mut gateways): (Vec<Ports>, Vec<Sluice>) = (0..3)
        .map(|i| start_gateway_on_free_ports(tmp.path(), i, &config, &mut taken))
        .unzip();
    for g in &gateways {
        assert!(g.wait_readyz(200, sluice_tests::DEADLINE).await);
    }
    let servers = |port: fn(&Ports) -> u16, extra: &str| {
        ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "  server g{i} 127.0.0.1:{} check inter 100 fall 2 rise 2{extra}\n",
                    port(p)
                )
            })
            .collect::<String>()
    };
    let http = format!(
        "mode http\n  balance roundrobin\n  option forwardfor\n  option redispatch\n  retries 2\n{}",
        servers(|p| p.http, "")
    );
    let grpc = format!(
        "mode tcp\n  balance roundrobin\n{}",
        servers(|p| p.grpc, " send-proxy-v2")
    );
    let mqtt = format!(
        "mode tcp\n  balance roundrobin\n{}",
        servers(|p| p.mqtt, " send-proxy-v2")
    );
    let haproxy = Haproxy::start(tmp.path(), &[&http, &grpc, &mqtt]).unwrap();
    let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], haproxy.ports[i]));

    let stop = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Ledger::default());
    let producers: Vec<_> = PROTOCOLS
        .iter()
        .map(|&p| {
            let addr = match p {
                "http" | "ws" => at(0),
                "grpc" => at(1),
                _ => at(2),
            };
            tokio::spawn(produce(p, addr, stop.clone(), ledger.clone()))
        })
        .collect();
    progress(&ledger, 20, "start").await;

    // One gateway killed under load: the others go on (a producer whose event was in flight on
    // it waits: its retries find the event claimed by the dead gateway); it comes back on its
    // addresses, and its claims are taken over.
    gateways[1].kill().unwrap();
    let total = |l: &Ledger| PROTOCOLS.iter().map(|p| l.acked(p)).sum::<usize>();
    let before = total(&ledger);
    assert!(
        wait_until(Duration::from_secs(60), || async {
            total(&ledger) >= before + 40
        })
        .await,
        "the other gateways serve"
    );
    gateways[1] = start_gateway(tmp.path(), 1, &ports[1], &config);
    assert!(gateways[1].wait_readyz(200, sluice_tests::DEADLINE).await);
    progress(&ledger, 10, "the killed gateway back").await;

    // A rolling restart: each drains on SIGTERM and comes back.
    for i in 0..3 {
        let status = tokio::task::block_in_place(|| gateways[i].terminate()).unwrap();
        assert!(status.success(), "gateway {i} drained in time: {status}");
        progress(&ledger, 10, &format!("gateway {i} stopped")).await;
        gateways[i] = start_gateway(tmp.path(), i, &ports[i], &config);
        assert!(gateways[i].wait_readyz(200, sluice_tests::DEADLINE).await);
        progress(&ledger, 10, &format!("gateway {i} back")).await;
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.await.unwrap();
    }
    let refused = ledger.refused.lock().unwrap().clone();
    assert!(
        refused.is_empty(),
        "answers that were not retryable: {refused:?}"
    );

    // Every acked event is in Kafka exactly once, even those whose first answer was lost to
    // the SIGKILL: the killed gateway's journal finds in Kafka what it had stored before it
    // says it is back (docs/exactly-once.md).
    let uncertain = ledger.uncertain.lock().unwrap().clone();
    let acked = ledger.acked.lock().unwrap().clone();
    let mut twice_in_all = Vec::new();
    for p in PROTOCOLS {
        let ids = &acked[p];
        let records = read_topic(
            &tansu.bootstrap,
            &stream_of(p),
            ids.len(),
            Duration::from_secs(60),
        )
        .unwrap();
        let mut count: HashMap<String, usize> = HashMap::new();
        for r in &records {
            let v = String::from_utf8_lossy(&r.value)
                .trim_matches('"')
                .to_string();
            *count.entry(v).or_default() += 1;
        }
        let missing: Vec<&String> = ids.iter().filter(|id| !count.contains_key(*id)).collect();
        assert!(
            missing.is_empty(),
            "{p}: acked and not in Kafka: {missing:?}"
        );
        let twice: Vec<(&String, &usize)> = count.iter().filter(|(_, n)| **n > 1).collect();
        let lost: Vec<_> = twice
            .iter()
            .filter(|(id, _)| uncertain.contains(*id))
            .collect();
        assert!(
            twice.is_empty(),
            "{p}: stored twice: {twice:?} (of them, with an answer lost: {lost:?})"
        );
        eprintln!(
            "{p}: {} acked, {} records, {} events with a lost answer, {} of them stored twice",
            ids.len(),
            records.len(),
            uncertain
                .iter()
                .filter(|u| u.starts_with(&format!("{p}-")))
                .count(),
            twice.len()
        );
        twice_in_all.extend(twice.into_iter().map(|(id, _)| id.clone()));
    }
    // MQTT: the device reconnected through the balancer and always found its session.
    let reconnects = ledger.reconnects.load(Ordering::Relaxed);
    assert!(reconnects >= 1, "the device was moved at least once");
    assert_eq!(
        ledger.sessions_lost.load(Ordering::Relaxed),
        0,
        "a reconnect found no session"
    );
    eprintln!(
        "mqtt: {reconnects} reconnects, every one resumed its session; stored twice: {twice_in_all:?}"
    );
}
