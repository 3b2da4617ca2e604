//! A fleet of gateways sharing one Redis: cluster-wide quotas (`cluster = true`) hold one rate
//! across three gateways under uneven load, with leases and without, and each gateway falls
//! back to its share of the rate while Redis is away.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::http::Answer;
use sluice_tests::redis::Redis;
use sluice_tests::{Sluice, metric, wait_until};

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
/// Counts what was admitted by requests sent and answered inside the window, per gateway.
async fn uneven_load(urls: &[String], window: Duration) -> (Vec<usize>, f64) {
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
                let mut admitted = 0;
                loop {
                    tick.tick().await;
                    let sent = Instant::now();
                    if sent >= end {
                        return (g, admitted);
                    }
                    let (_, ok) = post(&c, &url, n).await;
                    if sent >= start && Instant::now() < end {
                        measuring.store(true, Ordering::Relaxed);
                        admitted += ok;
                    }
                }
            })
        })
        .collect();
    let mut by_gateway = vec![0; urls.len()];
    for p in producers {
        let (g, n) = p.await.unwrap();
        by_gateway[g] += n;
    }
    assert!(measuring.load(Ordering::Relaxed));
    (by_gateway, window.as_secs_f64())
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
    let (by_gateway, secs) = uneven_load(&urls, Duration::from_secs(4)).await;
    assert_holds(&format!("lease_ms = {lease_ms}"), &by_gateway, secs, RATE);
    // Per-gateway shares of the rate would have held the busy gateway to a third of it.
    assert!(
        by_gateway[0] as f64 / secs > RATE / 3.0 * 1.2,
        "the busy gateway took more than its third: {by_gateway:?}"
    );
    // Nothing refused was stored; everything admitted was (each gateway's own log).
    let (mut stored, mut acked) = (0, 0);
    for g in &gateways {
        stored += g.read_log("c.one").unwrap().len();
        let m = g.metrics().await;
        acked += metric(&m, "sluice_quota_cluster_calls_total", r#"result="ok""#) as usize;
    }
    assert!(stored >= by_gateway.iter().sum(), "{stored} stored");
    assert!(acked > 0);
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
    assert!(
        wait_until(Duration::from_secs(10), || async {
            post(&c, &url, 1).await;
            metric(
                &gateways[0].metrics().await,
                "sluice_quota_cluster_degraded",
                "",
            ) == 1.0
        })
        .await,
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
        wait_until(Duration::from_secs(10), || async {
            post(&c, &url, 1).await;
            metric(
                &gateways[0].metrics().await,
                "sluice_quota_cluster_degraded",
                "",
            ) == 0.0
        })
        .await,
        "the gateway shares the quota through Redis again"
    );
}
