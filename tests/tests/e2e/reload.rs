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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_stream_settings_jwt_issuers_and_mtls_rules() {
    use sluice_tests::pki::{self, Ca};
    const SECRET: &str = "a-reloaded-hs256-secret-that-is-long-enough";
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new("reload-ca").unwrap();
    let server = ca
        .issue_valid("localhost", &["localhost", "127.0.0.1"])
        .unwrap();
    let device = ca.issue_valid("dev-1", &[]).unwrap();
    let cert = pki::write(tmp.path(), "server.pem", &server.cert_pem).unwrap();
    let key = pki::write(tmp.path(), "server.key", &server.key_pem).unwrap();
    let ca_file = pki::write(tmp.path(), "ca.pem", &ca.cert_pem()).unwrap();
    let config = |max_event_bytes: u32, issuer: &str, mtls: bool| {
        let mut c = format!(
            "[http.auth]\nallow_anonymous = false\n\
             [http.tls]\ncert_file = {cert:?}\nkey_file = {key:?}\nclient_auth = \"optional\"\nclient_ca_file = {ca_file:?}\n\
             [streams.declare.s]\nmax_event_bytes = {max_event_bytes}\n\
             [[auth.jwt.issuers]]\nissuer = \"{issuer}\"\naudiences = [\"sluice\"]\nalgorithms = [\"HS256\"]\nhs256_secret = \"{SECRET}\"\npermissions_claim = \"streams\"\npermission_prefix = \"\"\n"
        );
        if mtls {
            c.push_str(
                "[[auth.mtls.rules]]\nfield = \"cn\"\npattern = \"dev-*\"\nstreams = [\"*\"]\n",
            );
        }
        c
    };
    let token = |iss: &str| {
        pki::hs256(
            SECRET.as_bytes(),
            &serde_json::json!({
                "iss": iss, "sub": "svc", "aud": "sluice", "streams": ["*"],
                "iat": pki::now(), "exp": pki::now() + 3600,
            }),
        )
    };
    let s = Sluice::start(
        &tmp.path().join("data"),
        &config(200, "https://iss-1", false),
    )
    .unwrap();
    let anonymous_tls = pki::tls_client(&ca.cert_pem(), None).unwrap();
    let device_tls = pki::tls_client(&ca.cert_pem(), Some(&device)).unwrap();
    let post =
        |tls: &std::sync::Arc<rustls::ClientConfig>, bearer: Option<String>, value_len: usize| {
            let tls = tls.clone();
            let addr = s.http;
            async move {
                let auth = bearer.map(|t| format!("Bearer {t}"));
                let headers: Vec<(&str, &str)> = auth
                    .as_deref()
                    .map(|a| vec![("authorization", a)])
                    .unwrap_or_default();
                let body = serde_json::json!([{ "value": "x".repeat(value_len) }]).to_string();
                pki::tls_post(addr, &tls, "/v1/streams/s/events", &headers, &body)
                    .await
                    .unwrap()
                    .status
            }
        };
    let (iss1, iss2) = (token("https://iss-1"), token("https://iss-2"));
    assert_eq!(post(&anonymous_tls, Some(iss1.clone()), 10).await, 200);
    assert_eq!(post(&anonymous_tls, Some(iss2.clone()), 10).await, 401);
    assert_eq!(
        post(&device_tls, None, 10).await,
        401,
        "no rule maps the device yet"
    );
    assert_eq!(post(&anonymous_tls, Some(iss1.clone()), 500).await, 413);

    // Larger events on s, the other issuer, and a rule for devices.
    std::fs::write(s.config_path(), config(1000, "https://iss-2", true)).unwrap();
    s.signal("HUP").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            reloads(&s, "ok").await >= 1.0
        })
        .await
    );
    assert_eq!(
        post(&anonymous_tls, Some(iss2), 500).await,
        200,
        "new limit, new issuer"
    );
    assert_eq!(
        post(&anonymous_tls, Some(iss1), 10).await,
        401,
        "the old issuer is gone"
    );
    assert_eq!(
        post(&device_tls, None, 10).await,
        200,
        "the device is mapped now"
    );
    let log = s.read_log("s").unwrap();
    assert_eq!(log.len(), 3);
    assert_eq!(log[2]["headers"]["sluice-principal"], "dev-1", "{}", log[2]);
}
