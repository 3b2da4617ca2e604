//! Configuration reload without restart: quotas, API keys and stream settings change on SIGHUP
//! and on a file change while a connection stays open; an invalid file is rejected and the
//! running configuration stays.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sluice_tests::{Sluice, api_key_entry, metric, wait_until};

const KEY_A: &str = "a.0123456789abcdef";
const KEY_B: &str = "b.0123456789abcdef";

fn config(rate: u32, key: &str, watch_ms: u64) -> String {
    let id = key.split('.').next().unwrap();
    format!(
        "[server]\nconfig_watch_interval_ms = {watch_ms}\n\
         [[quotas.rules]]\nscope = \"stream\"\nevents_per_sec = {rate}\nburst_events = {rate}\n{}",
        api_key_entry(key, &format!("svc-{id}"), &["*"])
    )
}

/// One HTTP/1.1 connection that stays open across requests.
struct Conn(hyper::client::conn::http1::SendRequest<Full<Bytes>>);

impl Conn {
    async fn open(s: &Sluice) -> Conn {
        let tcp = tokio::net::TcpStream::connect(s.http).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Conn(sender)
    }

    /// POSTs `n` events; returns (status, events admitted).
    async fn post(&mut self, n: usize, key: Option<&str>) -> (u16, usize) {
        let body = serde_json::to_string(&(0..n).collect::<Vec<_>>()).unwrap();
        let mut req = http::Request::post("/v1/streams/r/events")
            .header("host", "x")
            .header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("x-api-key", k);
        }
        self.0.ready().await.expect("the connection is still open");
        let resp = self
            .0
            .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .expect("the connection is still open");
        let status = resp.status().as_u16();
        let body: Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        let ok = body["results"].as_array().map_or(0, |r| {
            r.iter().filter(|e| e.get("offset").is_some()).count()
        });
        (status, ok)
    }
}

async fn reloads(s: &Sluice, result: &str) -> f64 {
    // Absent until the first reload with that result.
    sluice_tests::metric_or_zero(
        &s.metrics().await,
        "sluice_config_reloads_total",
        &format!("result=\"{result}\""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_quotas_and_keys_without_dropping_connections_and_rejects_bad_files() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config(5, KEY_A, 0)).unwrap();
    let mut conn = Conn::open(&s).await;
    assert_eq!(
        conn.post(10, Some(KEY_A)).await,
        (200, 5),
        "5 events/s, burst 5"
    );
    assert_eq!(
        conn.post(1, Some(KEY_B)).await.0,
        401,
        "key B is not configured yet"
    );

    // New quota and keys, applied on SIGHUP.
    let bigger_budget = format!(
        "{}\n[limits]\nmax_in_flight_bytes = 300000000\n[http]\nmax_concurrent_requests = 100\n",
        config(1000, KEY_B, 0)
    );
    std::fs::write(s.config_path(), bigger_budget).unwrap();
    s.signal("HUP").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            reloads(&s, "ok").await >= 1.0
        })
        .await
    );
    assert_eq!(
        conn.post(50, Some(KEY_B)).await,
        (200, 50),
        "the new quota, same connection"
    );
    assert_eq!(conn.post(1, Some(KEY_A)).await.0, 401, "key A was removed");
    assert_eq!(
        metric(&s.metrics().await, "sluice_in_flight_budget_bytes", ""),
        300_000_000.0,
        "limits reload too"
    );

    // An invalid file is rejected; the running configuration stays.
    std::fs::write(s.config_path(), "[quotas]\nmax_delay_ms = \"soon\"\n").unwrap();
    s.signal("HUP").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            reloads(&s, "rejected").await >= 1.0
        })
        .await
    );
    assert_eq!(
        conn.post(50, Some(KEY_B)).await,
        (200, 50),
        "still the previous configuration"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_the_config_file_is_enough_when_it_is_watched() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config(2, KEY_B, 100)).unwrap();
    let mut conn = Conn::open(&s).await;
    assert_eq!(conn.post(10, Some(KEY_B)).await, (200, 2));
    std::fs::write(s.config_path(), config(30, KEY_A, 100)).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            reloads(&s, "ok").await >= 1.0
        })
        .await,
        "the file change was never picked up"
    );
    assert_eq!(
        conn.post(40, Some(KEY_A)).await,
        (200, 30),
        "the watched file's quota and key"
    );
}
