//! The black-box attack suite (issue 14): each test attacks the real binary over real sockets
//! the way a hostile producer would, and is named after what it attacks. docs/security.md maps
//! every threat to the test that holds it.

use sluice_tests::OutputWithin;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rmqtt_codec::v5;
use sluice_protocols::grpc::pb;
use sluice_protocols::grpc::pb::ingest_client::IngestClient;
use sluice_tests::mqtt::{Client5, Raw, connect5, publish};
use sluice_tests::pki::{self, Ca};
use sluice_tests::{Sluice, api_key_entry, read_log};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const KEY: &str = "dev1.s3cret-s3cret";

/// A TCP connection to `addr` from the loopback source address `from` (e.g. 127.0.0.2), so that
/// a test can be several clients behind several addresses on one machine.
async fn connect_from(from: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::from((from, 0)))?;
    s.connect(addr).await
}

/// Whether the server closes `s` (EOF or reset) within `within`, reading and dropping anything
/// it sends first.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut scratch = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut scratch)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

fn start_with(dir: &std::path::Path, toml: &str, env: &[(&str, &str)]) -> Sluice {
    let config = dir.join("sluice.toml");
    std::fs::write(&config, toml).unwrap();
    Sluice::start_with_env(&dir.join("data"), &config, env).unwrap()
}

fn keyed_connect(client_id: &str) -> v5::Connect {
    let mut c = connect5(client_id, 30);
    c.password = Some(bytes::Bytes::from_static(KEY.as_bytes()));
    c
}

/// The hole of issue 14: with the HTTP listener on the network and no other config, HTTP
/// answered 401 while MQTT over WebSocket on the same port took an anonymous CONNECT (its
/// policy was computed from `mqtt.listen`, a loopback address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_mqtt_over_websocket_on_a_network_http_listener() {
    let dir = tempfile::tempdir().unwrap();
    let toml = api_key_entry(KEY, "device-1", &["*"]);
    let s = start_with(dir.path(), &toml, &[("SLUICE_HTTP__LISTEN", "0.0.0.0:0")]);
    // The HTTP API and WebSocket ingest on that listener refuse anonymous producers.
    let http = reqwest::Client::new();
    let r = http
        .post(s.events_url("x"))
        .header("content-type", "application/json")
        .body(r#"{"value":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let ws_url = format!("ws://{}/v1/streams/x/ws", s.http);
    match tokio_tungstenite::connect_async(ws_url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("anonymous WebSocket upgrade: {:?}", other.map(|_| ())),
    }
    // So does MQTT over WebSocket on the same port: CONNACK 0x87 (Not authorized).
    let url = format!("ws://{}/mqtt", s.http);
    let mut anon = Client5::websocket(&url, TcpStream::connect(s.http).await.unwrap())
        .await
        .unwrap();
    assert_eq!(anon.connect(connect5("intruder", 30)).await, 0x87);
    assert!(
        anon.recv().await.is_none(),
        "the refused connection is closed"
    );
    // A device with credentials gets in over the same transport and publishes.
    let mut dev = Client5::websocket(&url, TcpStream::connect(s.http).await.unwrap())
        .await
        .unwrap();
    assert_eq!(dev.connect(keyed_connect("dev-1")).await, 0);
    assert_eq!(dev.publish1("x/k", 1, b"with-key").await, 0);
    // Anonymity is the listener's own: the MQTT TCP listener is still on loopback (default),
    // where anonymous producers are allowed.
    let mut local = Raw::connect(s.mqtt.unwrap(), true).await;
    local
        .send5(v5::Packet::Connect(Box::new(connect5("local", 30))))
        .await;
    match local.recv5().await {
        Some(v5::Packet::ConnectAck(a)) => assert_eq!(u8::from(a.reason_code), 0),
        other => panic!("{other:?}"),
    }
    let log = read_log(&s.data_dir, "x", &[]).unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["value"], "with-key");
    assert_eq!(log[0]["headers"]["sluice-principal"], "device-1");
    let m = s.metrics().await;
    assert_eq!(
        sluice_tests::metric(
            &m,
            "sluice_auth_failures_total",
            "protocol=\"mqtt\",method=\"none\",reason=\"missing\""
        ),
        1.0,
        "{m}"
    );
}

/// A TLS server certificate for 127.0.0.1/localhost and its CA, written under `dir`.
struct Tls {
    ca: Ca,
    cert: String,
    key: String,
    ca_file: String,
}

fn tls_files(dir: &std::path::Path) -> Tls {
    let ca = Ca::new("attack test CA").unwrap();
    let server = ca
        .issue_valid("sluice", &["localhost", "127.0.0.1"])
        .unwrap();
    let w = |name: &str, c: &str| pki::write(dir, name, c).unwrap().display().to_string();
    Tls {
        cert: w("server.pem", &server.cert_pem),
        key: w("server.key", &server.key_pem),
        ca_file: w("ca.pem", &ca.cert_pem()),
        ca,
    }
}

async fn tls_to(
    addr: SocketAddr,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(tls.clone())
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// The same hole on the MQTT TLS listener: bound to the network while `mqtt.listen` stays on
/// loopback, it used to take anonymous CONNECTs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_mqtt_on_a_network_tls_listener() {
    let dir = tempfile::tempdir().unwrap();
    let t = tls_files(dir.path());
    let toml = format!(
        "[mqtt.tls]\ncert_file = {:?}\nkey_file = {:?}\n{}",
        t.cert,
        t.key,
        api_key_entry(KEY, "device-1", &["*"])
    );
    let s = start_with(
        dir.path(),
        &toml,
        &[("SLUICE_MQTT__TLS_LISTEN", "0.0.0.0:0")],
    );
    let client = pki::tls_client(&t.ca.cert_pem(), None).unwrap();
    let mut anon = Client5::stream(tls_to(s.mqtts.unwrap(), &client).await);
    assert_eq!(anon.connect(connect5("intruder", 30)).await, 0x87);
    let mut dev = Client5::stream(tls_to(s.mqtts.unwrap(), &client).await);
    assert_eq!(dev.connect(keyed_connect("dev-1")).await, 0);
    assert_eq!(dev.publish1("tls/k", 1, b"with-key").await, 0);
    // The loopback TCP listener keeps its own (open) policy.
    let mut local = Raw::connect(s.mqtt.unwrap(), true).await;
    local
        .send5(v5::Packet::Connect(Box::new(connect5("local", 30))))
        .await;
    assert!(
        matches!(local.recv5().await, Some(v5::Packet::ConnectAck(a)) if u8::from(a.reason_code) == 0)
    );
    let log = read_log(&s.data_dir, "tls", &[]).unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["headers"]["sluice-principal"], "device-1");
    let _ = t.ca_file;
}

/// A configuration in which two transports of one listener would disagree about anonymous
/// producers is refused at startup (and by `check-config`), naming the key and the fix.
#[test]
fn transports_of_one_listener_that_disagree_on_anonymity() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[http]\nlisten = \"0.0.0.0:0\"\n[mqtt.auth]\nallow_anonymous = true\n",
    )
    .unwrap();
    let check = std::process::Command::new(sluice_tests::binary())
        .arg("check-config")
        .arg(&config)
        .output_within(sluice_tests::DEADLINE)
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert!(!check.status.success(), "{stderr}");
    assert!(stderr.contains("mqtt.auth.allow_anonymous"), "{stderr}");
    assert!(stderr.contains("would disagree"), "{stderr}");
    let serve = std::process::Command::new(sluice_tests::binary())
        .args(["serve", "--config"])
        .arg(&config)
        .env("SLUICE_ADMIN__LISTEN", "127.0.0.1:0")
        .env("SLUICE_GRPC__LISTEN", "127.0.0.1:0")
        .env("SLUICE_MQTT__LISTEN", "127.0.0.1:0")
        .env("SLUICE_LOG__DATA_DIR", dir.path().join("data"))
        .stdin(std::process::Stdio::null())
        .output_within(sluice_tests::DEADLINE)
        .unwrap();
    assert!(!serve.status.success());
    assert!(
        String::from_utf8_lossy(&serve.stderr).contains("mqtt.auth.allow_anonymous"),
        "{}",
        String::from_utf8_lossy(&serve.stderr)
    );
}

/// config/examples/secure.toml, run for real (its files replaced by test certificates): no
/// transport takes an anonymous producer, and a device certificate still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secure_example_admits_no_anonymous_producer() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = tls_files(d);
    let device =
        t.ca.issue_valid(
            "sensor-1",
            &["uri:spiffe://example.org/ns/prod/sa/sensor-1"],
        )
        .unwrap();
    let crl = pki::write(d, "clients.crl.pem", &t.ca.crl(&[]).unwrap()).unwrap();
    let jwks = pki::JwksServer::start(&t.ca, &[&pki::SigningKey::es256("k1").unwrap()])
        .await
        .unwrap();
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples/secure.toml"),
    )
    .unwrap()
    .replace("/etc/sluice/tls/server.pem", &t.cert)
    .replace("/etc/sluice/tls/server.key", &t.key)
    .replace("/etc/sluice/tls/clients-ca.pem", &t.ca_file)
    .replace(
        "/etc/sluice/tls/clients.crl.pem",
        &crl.display().to_string(),
    )
    .replace(
        "jwks_url = \"https://login.example.com/.well-known/jwks.json\"",
        &format!(
            "jwks_url = {:?}\njwks_ca_file = {:?}",
            jwks.url(),
            t.ca_file
        ),
    );
    assert!(!example.contains("/etc/sluice/tls"), "{example}");
    // Every listener moves to 127.0.0.1:0 (the harness does that): the example's explicit
    // `allow_anonymous = false` must keep them closed on loopback too.
    let s = start_with(d, &example, &[]);
    let anon_tls = pki::tls_client(&t.ca.cert_pem(), None).unwrap();
    let device_tls = pki::tls_client(&t.ca.cert_pem(), Some(&device)).unwrap();
    // HTTPS: 401 anonymous, 200 with the device certificate.
    let a = pki::tls_post(
        s.http,
        &anon_tls,
        "/v1/streams/telemetry.a/events",
        &[],
        "1",
    )
    .await
    .unwrap();
    assert_eq!(a.status, 401, "{a:?}");
    let a = pki::tls_post(
        s.http,
        &device_tls,
        "/v1/streams/telemetry.a/events",
        &[],
        "1",
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{a:?}");
    // WebSocket ingest over TLS: 401 before the upgrade.
    let ws = tokio_tungstenite::client_async(
        format!(
            "wss://localhost:{}/v1/streams/telemetry.a/ws",
            s.http.port()
        ),
        tls_to(s.http, &anon_tls).await,
    )
    .await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 401),
        other => panic!("anonymous wss upgrade: {:?}", other.map(|_| ())),
    }
    // MQTT over WebSocket on the HTTPS listener, and MQTT over TLS: CONNACK 0x87.
    let url = format!("wss://localhost:{}/mqtt", s.http.port());
    let mut c = Client5::websocket(&url, tls_to(s.http, &anon_tls).await)
        .await
        .unwrap();
    assert_eq!(c.connect(connect5("intruder-ws", 30)).await, 0x87);
    let mut c = Client5::stream(tls_to(s.mqtts.unwrap(), &anon_tls).await);
    assert_eq!(c.connect(connect5("intruder-tls", 30)).await, 0x87);
    let mut c = Client5::stream(tls_to(s.mqtts.unwrap(), &device_tls).await);
    assert_eq!(c.connect(connect5("sensor-1", 30)).await, 0);
    assert_eq!(c.publish1("telemetry.a/k", 1, b"from-device").await, 0);
    assert!(
        s.mqtt.is_none(),
        "the example serves no plain MQTT listener"
    );
    // gRPC over TLS: UNAUTHENTICATED.
    let ch = tonic::transport::Channel::from_shared(format!("https://{}", s.grpc.unwrap()))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(t.ca.cert_pem()))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = IngestClient::new(ch)
        .publish(pb::PublishRequest {
            stream: "telemetry.a".into(),
            events: vec![pb::Event {
                value: b"1".to_vec().into(),
                ..Default::default()
            }],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let log = read_log(&s.data_dir, "telemetry.a", &[]).unwrap();
    assert_eq!(log.len(), 2, "{log:?}");
    for r in &log {
        assert_ne!(r["headers"]["sluice-principal"], "anonymous", "{r}");
    }
}

/// Header names Sluice sets are reserved: a producer cannot forge its principal, protocol or
/// will flag on any protocol, in any letter case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_attribution_headers_on_every_protocol() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), "", &[]);
    let http = reqwest::Client::new();
    // HTTP: 400 naming the header; nothing stored.
    for name in ["sluice-principal", "Sluice-Protocol", "MQTT-will"] {
        let r = http
            .post(s.events_url("forge"))
            .header("content-type", "application/json")
            .body(format!(
                r#"[{{"value":1}},{{"value":2,"headers":{{"{name}":"admin"}}}}]"#
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{name}");
        let body: serde_json::Value = r.json().await.unwrap();
        let msg = body.to_string();
        assert!(msg.contains(name) && msg.contains("reserved"), "{msg}");
        assert!(msg.contains("event 1"), "{msg}");
    }
    // An ordinary header still passes.
    let r = http
        .post(s.events_url("forge"))
        .header("content-type", "application/json")
        .body(r#"{"value":3,"headers":{"site":"north"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // WebSocket: a nack for the frame, the connection goes on.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/forge/ws", s.http))
            .await
            .unwrap();
    ws.send(Message::text(
        r#"{"value":4,"id":"f1","headers":{"sluice-principal":"root"}}"#,
    ))
    .await
    .unwrap();
    let answer = loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(t))) => break t.to_string(),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    let nack: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(nack["error"]["code"], "malformed", "{answer}");
    assert!(
        nack["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`sluice-principal` is reserved"),
        "{answer}"
    );
    // gRPC: INVALID_ARGUMENT.
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let err = IngestClient::new(ch)
        .publish(pb::PublishRequest {
            stream: "forge".into(),
            events: vec![pb::Event {
                value: b"5".to_vec().into(),
                headers: vec![pb::Header {
                    key: "sluice-protocol".into(),
                    value: b"http".to_vec().into(),
                }],
                ..Default::default()
            }],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("reserved"), "{err:?}");
    // MQTT 5: a user property `mqtt-will` on a publish gets PUBACK 0x99; on a will, CONNACK 0x99.
    let mut c = Raw::connect(s.mqtt.unwrap(), true).await;
    c.send5(v5::Packet::Connect(Box::new(connect5("forger", 30))))
        .await;
    assert!(matches!(c.recv5().await, Some(v5::Packet::ConnectAck(_))));
    let props = v5::PublishProperties {
        user_properties: vec![("mqtt-will".into(), "true".into())],
        ..Default::default()
    };
    c.send5(v5::Packet::Publish(Box::new(publish(
        "forge/dev",
        1,
        1,
        b"6",
        Some(props),
    ))))
    .await;
    match c.recv5().await {
        Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), 0x99),
        other => panic!("{other:?}"),
    }
    let mut will_conn = connect5("forger-2", 30);
    will_conn.last_will = Some(v5::LastWill {
        qos: rmqtt_codec::types::QoS::AtLeastOnce,
        retain: false,
        topic: "forge/dev".into(),
        message: bytes::Bytes::from_static(b"7"),
        will_delay_interval_sec: None,
        correlation_data: None,
        message_expiry_interval: None,
        content_type: None,
        user_properties: vec![("Sluice-Principal".into(), "root".into())],
        is_utf8_payload: None,
        response_topic: None,
    });
    let mut w = Raw::connect(s.mqtt.unwrap(), true).await;
    w.send5(v5::Packet::Connect(Box::new(will_conn))).await;
    match w.recv5().await {
        Some(v5::Packet::ConnectAck(a)) => assert_eq!(u8::from(a.reason_code), 0x99),
        other => panic!("{other:?}"),
    }
    let log = read_log(&s.data_dir, "forge", &[]).unwrap();
    assert_eq!(log.len(), 1, "only the honest event is stored: {log:?}");
    assert_eq!(log[0]["value"], "3");
    assert_eq!(log[0]["headers"]["sluice-principal"], "anonymous");
    assert_eq!(log[0]["headers"]["sluice-protocol"], "http");
}

/// Silent sockets: on the HTTP listener one that never sends, one that sends part of the
/// HTTP/2 preface, and one that sent a request and then idles are all closed after their
/// deadlines; 64 silent sockets from one address cannot take the admin listener's slots, so
/// `/healthz` keeps answering a client from another address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_connections_and_the_admin_listener() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(
        dir.path(),
        "[http]\nheader_read_timeout_ms = 800\nidle_timeout_ms = 1200\n\
         [admin]\nheader_read_timeout_ms = 4000\n",
        &[],
    );
    let limit = Duration::from_secs(10);
    // Never sends a byte.
    let mut silent = TcpStream::connect(s.http).await.unwrap();
    // Half an HTTP/2 preface.
    let mut preface = TcpStream::connect(s.http).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // Part of an HTTP/1.1 request head, then nothing.
    let mut head = TcpStream::connect(s.http).await.unwrap();
    head.write_all(b"POST /v1/streams/x/events HTTP/1.1\r\nHost: a\r\n")
        .await
        .unwrap();
    // One complete request, then idle on a kept-alive connection.
    let mut idle = TcpStream::connect(s.http).await.unwrap();
    idle.write_all(
        b"POST /v1/streams/x/events HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 1\r\n\r\n1",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(limit, idle.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let started = Instant::now();
    for (name, sock) in [
        ("silent", &mut silent),
        ("half preface", &mut preface),
        ("half head", &mut head),
        ("idle after a request", &mut idle),
    ] {
        assert!(
            closed_within(sock, limit).await,
            "{name}: still open after {limit:?}"
        );
    }
    // None of them was closed before its deadline had a chance to pass.
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "{:?}",
        started.elapsed()
    );

    // The admin listener: 64 silent sockets from 127.0.0.2 (its 64 slots, but more than the 16
    // one address may hold), checked at once, well within the 4 s admin header deadline.
    let mut socks = Vec::new();
    for _ in 0..64 {
        socks.push(connect_from([127, 0, 0, 2], s.admin).await.unwrap());
    }
    let checks = socks.into_iter().map(|mut c| async move {
        let closed = closed_within(&mut c, Duration::from_millis(1500)).await;
        (closed, c)
    });
    let (refused, hogs): (Vec<_>, Vec<_>) = futures_util::future::join_all(checks)
        .await
        .into_iter()
        .partition(|(closed, _)| *closed);
    assert_eq!(
        hogs.len(),
        16,
        "one address holds at most admin.max_connections_per_address"
    );
    assert_eq!(refused.len(), 48);
    let health = reqwest::get(s.admin_url("healthz")).await.unwrap();
    assert_eq!(
        health.status(),
        200,
        "the admin listener answers another address"
    );
    // And the hogs do not stay: each is closed after the admin header deadline.
    for (_, mut h) in hogs {
        assert!(closed_within(&mut h, limit).await);
    }
}

/// Producers that open more connections than their address may have are closed at accept, on
/// the HTTP and gRPC listeners; another address is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(
        dir.path(),
        "[http]\nmax_connections = 50\nmax_connections_per_address = 5\n\
         [grpc]\nmax_connections_per_address = 5\n",
        &[],
    );
    for addr in [s.http, s.grpc.unwrap()] {
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(connect_from([127, 0, 0, 3], addr).await.unwrap());
        }
        let mut sixth = connect_from([127, 0, 0, 3], addr).await.unwrap();
        assert!(
            closed_within(&mut sixth, Duration::from_secs(10)).await,
            "{addr}: the sixth connection from one address is closed"
        );
        // Those within the limit are still open, and another address gets in.
        let mut first = held.remove(0);
        assert!(!closed_within(&mut first, Duration::from_millis(200)).await);
        let mut other = connect_from([127, 0, 0, 4], addr).await.unwrap();
        assert!(!closed_within(&mut other, Duration::from_millis(200)).await);
    }
    let r = reqwest::Client::new()
        .post(s.events_url("x"))
        .header("content-type", "application/json")
        .body("1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `PUT /loglevel` changes what the gateway logs: with `admin.token` it needs the token (401
/// otherwise); on an admin listener reachable from the network without a token it is off (403).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_actions_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), "[admin]\ntoken = \"adm-0123456789\"\n", &[]);
    let c = reqwest::Client::new();
    let put = |auth: Option<&'static str>| {
        let mut r = c.put(s.admin_url("loglevel")).body("debug");
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    let r = put(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"sluice-admin\""
    );
    assert_eq!(put(Some("Bearer wrong")).await.unwrap().status(), 401);
    assert_eq!(
        put(Some("Bearer adm-0123456789x")).await.unwrap().status(),
        401
    );
    let get = c.get(s.admin_url("loglevel")).send().await.unwrap();
    assert_eq!(get.status(), 200, "reading the level needs no token");
    assert_ne!(
        get.text().await.unwrap().trim(),
        "debug",
        "refused PUTs changed nothing"
    );
    let ok = put(Some("Bearer adm-0123456789")).await.unwrap();
    assert_eq!(ok.status(), 200);
    let get = c.get(s.admin_url("loglevel")).send().await.unwrap();
    assert_eq!(get.text().await.unwrap().trim(), "debug");
    drop(s);

    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), "", &[("SLUICE_ADMIN__LISTEN", "0.0.0.0:0")]);
    let r = c
        .put(s.admin_url("loglevel"))
        .body("debug")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("admin.token"));
    assert_eq!(
        reqwest::get(s.admin_url("healthz")).await.unwrap().status(),
        200
    );
}

/// Peak resident memory of a process, in MiB (VmHWM).
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    kib / 1024
}

/// Inputs built to make the gateway allocate far more than they cost to send: an
/// unauthenticated 8 MB gRPC message of four million empty events, the same message from an
/// authenticated producer, an HTTP body of four million one-byte events, and an event with
/// thousands of empty headers. Each is refused with a clear error before it is materialised, so
/// the gateway's peak memory stays far below what decoding them would take (over 1 GiB for four
/// at once before the fix; `sluice-loadtest attack-rss` measures it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_that_decode_into_millions_of_structures() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(
        dir.path(),
        &format!(
            "[http.auth]\nallow_anonymous = false\n[grpc.auth]\nallow_anonymous = false\n{}",
            api_key_entry(KEY, "device-1", &["*"])
        ),
        &[],
    );
    let empty_events = || pb::PublishRequest {
        stream: "big".into(),
        events: vec![pb::Event::default(); 4_000_000],
        content_type: String::new(),
        idempotency_key: String::new(),
    };
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = IngestClient::new(ch).max_encoding_message_size(16 << 20);
    let err = c.publish(empty_events()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let mut req = tonic::Request::new(empty_events());
    req.metadata_mut().insert("x-api-key", KEY.parse().unwrap());
    let err = c.publish(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("more than 10000 events"), "{err:?}");

    let http = reqwest::Client::new();
    let mut body = String::with_capacity(8_000_002);
    body.push('[');
    body.push_str(&"1,".repeat(3_999_999));
    body.push_str("1]");
    let r = http
        .post(s.events_url("big"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let text = r.text().await.unwrap();
    assert!(text.contains("at least 10001 events"), "{text}");

    let headers: Vec<String> = (0..100_000).map(|i| format!("\"h{i}\":\"\"")).collect();
    let r = http
        .post(s.events_url("big"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(format!(
            r#"{{"value":1,"headers":{{{}}}}}"#,
            headers.join(",")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.contains("more than 128 headers"), "{text}");

    // Decoding any one of them would have cost several hundred MiB.
    let peak = peak_rss_mib(s.pid());
    assert!(peak < 200, "peak RSS {peak} MiB");
    // And the gateway still takes ordinary events.
    let r = http
        .post(s.events_url("big"))
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(r#"[{"value":1,"headers":{"a":""}}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

fn rel5(id: u16) -> v5::Packet {
    v5::Packet::PublishRelease(v5::PublishAck2 {
        packet_id: std::num::NonZeroU16::new(id).unwrap(),
        reason_code: v5::PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    })
}

/// A Receive Maximum window full of QoS 2 publishes awaiting PUBREL used to stop the session
/// reading, so the PUBRELs (and PINGREQ, DISCONNECT, the socket's close) were never read: a
/// deadlock that held the connection and its principal's slot forever. Over 3.1.1 and 5.0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_window_full_of_qos2_awaiting_release() {
    use rmqtt_codec::v3;
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(
        dir.path(),
        &format!(
            "[mqtt]\nreceive_maximum = 3\nmax_connections_per_principal = 1\n{}",
            api_key_entry(KEY, "device-1", &["*"])
        ),
        &[],
    );
    let mqtt = s.mqtt.unwrap();
    // MQTT 5: three QoS 2 publishes fill the window; PINGREQ and the PUBRELs are still read.
    let mut c = Raw::connect(mqtt, true).await;
    c.send5(v5::Packet::Connect(Box::new(keyed_connect("q2-v5"))))
        .await;
    assert!(
        matches!(c.recv5().await, Some(v5::Packet::ConnectAck(a)) if u8::from(a.reason_code) == 0)
    );
    for id in 1..=3u16 {
        c.send5(v5::Packet::Publish(Box::new(publish(
            "q2/a",
            2,
            id,
            b"x",
            Some(Default::default()),
        ))))
        .await;
        assert!(
            matches!(c.recv5().await, Some(v5::Packet::PublishReceived(a)) if a.packet_id.get() == id)
        );
    }
    c.send5(v5::Packet::PingRequest).await;
    assert!(matches!(c.recv5().await, Some(v5::Packet::PingResponse)));
    for id in 1..=3u16 {
        c.send5(rel5(id)).await;
        assert!(
            matches!(c.recv5().await, Some(v5::Packet::PublishComplete(a)) if a.packet_id.get() == id)
        );
    }
    // A client that sends past Receive Maximum (3 awaiting PUBREL + 1) is told so: 0x93.
    for id in 4..=6u16 {
        c.send5(v5::Packet::Publish(Box::new(publish(
            "q2/a",
            2,
            id,
            b"y",
            Some(Default::default()),
        ))))
        .await;
        assert!(matches!(
            c.recv5().await,
            Some(v5::Packet::PublishReceived(_))
        ));
    }
    c.send5(v5::Packet::Publish(Box::new(publish(
        "q2/a",
        1,
        7,
        b"z",
        Some(Default::default()),
    ))))
    .await;
    match c.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x93),
        other => panic!("{other:?}"),
    }
    assert!(c.closed().await);

    // 3.1.1: the window full of QoS 2 awaiting PUBREL; then the client closes its socket. The
    // session ends at once and frees the principal's only connection slot.
    let mut c3 = Raw::connect(mqtt, false).await;
    let mut conn3 = sluice_tests::mqtt::connect3("q2-v3", 30);
    conn3.password = Some(bytes::Bytes::from_static(KEY.as_bytes()));
    conn3.username = Some("x".into());
    c3.send3(v3::Packet::Connect(Box::new(conn3))).await;
    assert!(matches!(c3.recv3().await, Some(v3::Packet::ConnectAck(_))));
    for id in 1..=3u16 {
        c3.send3(v3::Packet::Publish(Box::new(publish(
            "q2/b", 2, id, b"w", None,
        ))))
        .await;
        assert!(
            matches!(c3.recv3().await, Some(v3::Packet::PublishReceived { packet_id }) if packet_id.get() == id)
        );
    }
    c3.send3(v3::Packet::PingRequest).await;
    assert!(matches!(c3.recv3().await, Some(v3::Packet::PingResponse)));
    drop(c3);
    // The principal may hold one connection: a new one (another client id) gets in once the
    // closed one has ended.
    let ok = sluice_tests::wait_until(Duration::from_secs(10), || async {
        let mut n = Raw::connect(mqtt, true).await;
        n.send5(v5::Packet::Connect(Box::new(keyed_connect("q2-next"))))
            .await;
        matches!(n.recv5().await, Some(v5::Packet::ConnectAck(a)) if u8::from(a.reason_code) == 0)
    })
    .await;
    assert!(ok, "the closed session still holds its principal's slot");
    let log = read_log(&s.data_dir, "q2", &[]).unwrap();
    assert_eq!(
        log.len(),
        9,
        "every publish answered with PUBREC is stored once: {log:?}"
    );
}

/// Delayed wills are bounded in bytes as well as in count: a device fleet (or an attacker) that
/// leaves with large delayed wills cannot park unbounded memory in the gateway. Past
/// `mqtt.max_pending_will_bytes` a will is published at once ("shed") instead of waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_wills_past_their_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), "[mqtt]\nmax_pending_will_bytes = 300\n", &[]);
    let mqtt = s.mqtt.unwrap();
    let with_will = |id: &str| {
        let mut c = connect5(id, 30);
        c.last_will = Some(v5::LastWill {
            qos: rmqtt_codec::types::QoS::AtLeastOnce,
            retain: false,
            topic: format!("wills/{id}").into(),
            message: bytes::Bytes::from(vec![b'w'; 200]),
            will_delay_interval_sec: Some(3600),
            correlation_data: None,
            message_expiry_interval: None,
            content_type: None,
            user_properties: Vec::new(),
            is_utf8_payload: None,
            response_topic: None,
        });
        c
    };
    let mqtt_connections = || async {
        sluice_tests::metric(
            &s.metrics().await,
            "sluice_connections",
            "protocol=\"mqtt\"",
        )
    };
    // The first (about 255 bytes) fits the 300-byte budget and waits for its hour.
    let (a, _) = sluice_tests::mqtt::session5(mqtt, with_will("dev-a")).await;
    drop(a);
    assert!(
        sluice_tests::wait_until(Duration::from_secs(10), || async {
            mqtt_connections().await == 0.0
        })
        .await
    );
    // The second does not fit: published at once.
    let (b, _) = sluice_tests::mqtt::session5(mqtt, with_will("dev-b")).await;
    drop(b);
    let published = sluice_tests::wait_until(Duration::from_secs(10), || async {
        read_log(&s.data_dir, "wills", &[]).is_ok_and(|l| !l.is_empty())
    })
    .await;
    assert!(
        published,
        "the will past the byte budget was not published at once"
    );
    let log = read_log(&s.data_dir, "wills", &[]).unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["key"], "dev-b");
    assert_eq!(log[0]["headers"]["mqtt-will"], "true");
    let m = s.metrics().await;
    assert_eq!(
        sluice_tests::metric(&m, "sluice_mqtt_wills_total", "outcome=\"shed\""),
        1.0,
        "{m}"
    );
}

const KEY_B: &str = "dev2.s3cret-s3cret";
const HS: &str = "an-hs256-secret-that-is-long-enough-1234";

fn revocation_config(with_a: bool, b_streams: &[&str]) -> String {
    let a = if with_a {
        api_key_entry(KEY, "device-a", &["*"])
    } else {
        String::new()
    };
    format!(
        "[[auth.jwt.issuers]]\nissuer = \"https://idp.test\"\naudiences = [\"sluice\"]\nalgorithms = [\"HS256\"]\n\
         hs256_secret = \"{HS}\"\nleeway_s = 0\npermissions_claim = \"streams\"\npermission_prefix = \"\"\n{a}{}",
        api_key_entry(KEY_B, "device-b", b_streams)
    )
}

/// A key removed by a reload, a permission narrowed by a reload, and a JWT that expires end the
/// open sessions they authenticated, within about a second, with each protocol's own reason:
/// MQTT 5 DISCONNECT 0x87 (revoked or expired) or 0x98 (permissions changed), WebSocket close
/// 1008, a gRPC stream's UNAUTHENTICATED. Sessions of other credentials go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_outliving_their_credentials() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), &revocation_config(true, &["*"]), &[]);
    let mqtt = s.mqtt.unwrap();
    let connect_with = |id: &str, secret: &'static str| {
        let mut c = connect5(id, 60);
        c.password = Some(bytes::Bytes::from_static(secret.as_bytes()));
        c
    };
    // Key A: an MQTT session (with a will), a WebSocket and a gRPC stream.
    let mut with_will = connect_with("a-1", KEY);
    with_will.last_will = Some(v5::LastWill {
        qos: rmqtt_codec::types::QoS::AtLeastOnce,
        retain: false,
        topic: "revoked-wills/a-1".into(),
        message: bytes::Bytes::from_static(b"gone"),
        will_delay_interval_sec: None,
        correlation_data: None,
        message_expiry_interval: None,
        content_type: None,
        user_properties: Vec::new(),
        is_utf8_payload: None,
        response_topic: None,
    });
    let (mut m_a, _) = sluice_tests::mqtt::session5(mqtt, with_will).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("ws://{}/v1/streams/rev/ws", s.http),
    )
    .unwrap();
    req.headers_mut().insert("x-api-key", KEY.parse().unwrap());
    let (mut ws_a, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (batches, rx) = tokio::sync::mpsc::channel::<pb::PublishStreamRequest>(4);
    let mut call = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    call.metadata_mut()
        .insert("x-api-key", KEY.parse().unwrap());
    batches
        .send(pb::PublishStreamRequest {
            sequence: 1,
            stream: "rev".into(),
            events: vec![pb::Event {
                value: b"before".to_vec().into(),
                ..Default::default()
            }],
            content_type: String::new(),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    let mut answers = IngestClient::new(ch)
        .publish_stream(call)
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.sequence, 1);
    assert!(first.status.is_none(), "{first:?}");
    // Key B (every stream for now) and a JWT that expires in two seconds.
    let (mut m_b, _) = sluice_tests::mqtt::session5(mqtt, connect_with("b-1", KEY_B)).await;
    let exp = pki::now() + 2;
    let token = pki::hs256(
        HS.as_bytes(),
        &serde_json::json!({"iss": "https://idp.test", "aud": "sluice", "sub": "device-j", "exp": exp, "streams": ["*"]}),
    );
    let mut jc = connect5("j-1", 60);
    jc.password = Some(bytes::Bytes::from(token));
    let (mut m_j, _) = sluice_tests::mqtt::session5(mqtt, jc).await;

    // The JWT expires: its session ends with 0x87 soon after `exp` (and not before).
    let expired_at = Instant::now();
    match m_j.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(u8::from(d.reason_code), 0x87, "{d:?}");
            assert!(d.reason_string.unwrap().contains("expired"));
        }
        other => panic!("{other:?}"),
    }
    assert!(pki::now() >= exp, "ended before the token expired");
    assert!(expired_at.elapsed() < Duration::from_secs(6));

    // Reload: key A removed, key B narrowed to one stream.
    std::fs::write(s.config_path(), revocation_config(false, &["only-this"])).unwrap();
    s.signal("HUP").unwrap();
    match m_a.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(u8::from(d.reason_code), 0x87, "{d:?}");
            assert!(d.reason_string.unwrap().contains("unknown API key"));
        }
        other => panic!("{other:?}"),
    }
    match m_b.recv5().await {
        Some(v5::Packet::Disconnect(d)) => assert_eq!(u8::from(d.reason_code), 0x98, "{d:?}"),
        other => panic!("{other:?}"),
    }
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(20), ws_a.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Close(c))) => break c.expect("a close frame"),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    let end = tokio::time::timeout(Duration::from_secs(20), answers.message())
        .await
        .unwrap();
    match end {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}"),
        other => panic!("the stream went on: {other:?}"),
    }
    let m = s.metrics().await;
    for (protocol, n) in [("mqtt", 3.0), ("websocket", 1.0), ("grpc", 1.0)] {
        assert_eq!(
            sluice_tests::metric(
                &m,
                "sluice_sessions_revoked_total",
                &format!("protocol=\"{protocol}\"")
            ),
            n,
            "{protocol}: {m}"
        );
    }
    // Key B reconnects under its new grant: its one stream only.
    let (mut again, _) = sluice_tests::mqtt::session5(mqtt, connect_with("b-2", KEY_B)).await;
    again
        .send5(v5::Packet::Publish(Box::new(publish(
            "elsewhere/k",
            1,
            1,
            b"x",
            Some(Default::default()),
        ))))
        .await;
    match again.recv5().await {
        Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), 0x87),
        other => panic!("{other:?}"),
    }
    // A session ended by revocation does not get to append its will (the revoked principal
    // would be its author).
    assert!(
        !s.data_dir.join("streams/revoked-wills").exists(),
        "the revoked session's will was appended"
    );
}

/// A guesser behind the address a fleet shares (a NAT): after `max_failures` wrong keys the
/// address is throttled, so guessing stops paying off, but producers whose credentials
/// authenticated recently from anywhere keep getting in. A credential not seen before waits
/// for the window like the guesser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guesser_behind_a_shared_address() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(
        dir.path(),
        &format!(
            "[http.auth]\nallow_anonymous = false\n[auth.failures]\nmax_failures = 3\nwindow_ms = 60000\n{}{}",
            api_key_entry(KEY, "device-a", &["*"]),
            api_key_entry(KEY_B, "device-b", &["*"])
        ),
        &[],
    );
    let http = reqwest::Client::new();
    let post = |key: &'static str| {
        http.post(s.events_url("nat"))
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body("1")
            .send()
    };
    assert_eq!(
        post(KEY).await.unwrap().status(),
        200,
        "device A before the attack"
    );
    let mut statuses = Vec::new();
    for guess in [
        "dev1.guess-1",
        "dev1.guess-2",
        "dev1.guess-3",
        "dev1.guess-4",
        KEY_B,
    ] {
        statuses.push(post(guess).await.unwrap().status().as_u16());
    }
    // Three wrong guesses, then the address is throttled: the fourth guess is not even checked,
    // and neither is key B, which has not authenticated before.
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    let r = post(KEY).await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "device A behind the same address still gets in"
    );
    let m = s.metrics().await;
    assert_eq!(
        sluice_tests::metric(
            &m,
            "sluice_auth_failures_total",
            "protocol=\"http\",method=\"any\",reason=\"too_many_failures\""
        ),
        2.0,
        "{m}"
    );
    assert_eq!(read_log(&s.data_dir, "nat", &[]).unwrap().len(), 2);
}

/// Upgraded connections (WebSocket ingest, MQTT over WebSocket) keep counting against their
/// listener's limits while the session lasts, not only until hyper hands the socket over: one
/// address cannot open WebSockets without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_past_the_per_address_limit() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(dir.path(), "[http]\nmax_connections_per_address = 3\n", &[]);
    let mut sessions = Vec::new();
    for path in ["/v1/streams/w/ws", "/v1/ws", "/mqtt"] {
        let tcp = connect_from([127, 0, 0, 5], s.http).await.unwrap();
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{}{path}", s.http),
            )
            .unwrap();
        if path == "/mqtt" {
            req.headers_mut()
                .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        }
        let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.unwrap();
        assert_eq!(resp.status(), 101, "{path}");
        sessions.push(ws);
    }
    // The three upgraded sessions still hold the address's three places.
    let mut fourth = connect_from([127, 0, 0, 5], s.http).await.unwrap();
    assert!(
        closed_within(&mut fourth, Duration::from_secs(10)).await,
        "a fourth connection from the address got in while three WebSockets are open"
    );
    // Once one session ends, its place is free again.
    let mut first = sessions.remove(0);
    first.close(None).await.unwrap();
    drop(first);
    let got_in = sluice_tests::wait_until(Duration::from_secs(10), || async {
        let mut c = connect_from([127, 0, 0, 5], s.http).await.unwrap();
        !closed_within(&mut c, Duration::from_millis(200)).await
    })
    .await;
    assert!(got_in, "the place of a closed WebSocket was not freed");
}

/// One principal cannot use up the gateway's shared stream namespace (`streams.max_streams`)
/// by producing to made-up stream names: past `streams.max_streams_per_principal` its new
/// streams are refused (429, MQTT 5 PUBACK 0x97) while other principals still create theirs and
/// existing streams stay open to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_filling_the_stream_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(
        dir.path(),
        &format!(
            "[streams]\nmax_streams_per_principal = 2\n{}{}",
            api_key_entry(KEY, "device-a", &["*"]),
            api_key_entry(KEY_B, "device-b", &["*"])
        ),
        &[],
    );
    let http = reqwest::Client::new();
    let post = |key: &'static str, stream: &str| {
        http.post(s.events_url(stream))
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body("1")
            .send()
    };
    assert_eq!(post(KEY, "a-1").await.unwrap().status(), 200);
    assert_eq!(post(KEY, "a-2").await.unwrap().status(), 200);
    let r = post(KEY, "a-3").await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let text = r.text().await.unwrap();
    assert!(text.contains("max_streams_per_principal"), "{text}");
    // Over MQTT too.
    let mut c = Raw::connect(s.mqtt.unwrap(), true).await;
    c.send5(v5::Packet::Connect(Box::new(keyed_connect("a-dev"))))
        .await;
    assert!(matches!(c.recv5().await, Some(v5::Packet::ConnectAck(_))));
    c.send5(v5::Packet::Publish(Box::new(publish(
        "a-4/k",
        1,
        1,
        b"x",
        Some(Default::default()),
    ))))
    .await;
    match c.recv5().await {
        Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), 0x97),
        other => panic!("{other:?}"),
    }
    // Another principal still creates its own, and existing streams take device A's events.
    assert_eq!(post(KEY_B, "a-3").await.unwrap().status(), 200);
    assert_eq!(post(KEY, "a-3").await.unwrap().status(), 200);
    assert_eq!(post(KEY, "a-1").await.unwrap().status(), 200);
    // The refused streams were never created; the others were.
    let streams = s.data_dir.join("streams");
    for (name, exists) in [("a-1", true), ("a-2", true), ("a-3", true), ("a-4", false)] {
        assert_eq!(streams.join(name).is_dir(), exists, "{name}");
    }
}

/// A JWT whose subject (or a certificate whose name) equals an API key's principal is a
/// different identity: it cannot take over that principal's MQTT sessions, use up its
/// connection limit or quota, or be mistaken for it in the stored record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_principal_names_from_different_methods() {
    let dir = tempfile::tempdir().unwrap();
    let s = start_with(
        dir.path(),
        &format!(
            "[mqtt]\nmax_connections_per_principal = 1\n\
             [[quotas.rules]]\nscope = \"principal\"\nevents_per_sec = 1\nburst_events = 2\n\
             [[auth.jwt.issuers]]\nissuer = \"https://idp.test\"\naudiences = [\"sluice\"]\nalgorithms = [\"HS256\"]\n\
             hs256_secret = \"{HS}\"\npermissions_claim = \"streams\"\npermission_prefix = \"\"\n{}",
            api_key_entry(KEY, "device-1", &["*"])
        ),
        &[],
    );
    let mqtt = s.mqtt.unwrap();
    let token = pki::hs256(
        HS.as_bytes(),
        &serde_json::json!({"iss": "https://idp.test", "aud": "sluice", "sub": "device-1", "exp": pki::now() + 600, "streams": ["*"]}),
    );
    // The API key's session, client id "c1".
    let (mut by_key, _) = sluice_tests::mqtt::session5(mqtt, keyed_connect("c1")).await;
    // The JWT's "device-1" connects with the same client id: a session of its own, no takeover,
    // and not counted against the key's one-connection limit.
    let mut jc = connect5("c1", 30);
    jc.password = Some(bytes::Bytes::from(token.clone()));
    let (mut by_jwt, _) = sluice_tests::mqtt::session5(mqtt, jc).await;
    let sessions: [(&mut Raw, &'static [u8]); 2] =
        [(&mut by_key, b"from-key"), (&mut by_jwt, b"from-jwt")];
    for (c, payload) in sessions {
        c.send5(v5::Packet::Publish(Box::new(publish(
            "names/x",
            1,
            1,
            payload,
            Some(Default::default()),
        ))))
        .await;
        match c.recv5().await {
            Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), 0, "{a:?}"),
            other => panic!("the session was taken over or refused: {other:?}"),
        }
    }
    // Each identity has its own quota bucket (burst 2): the key's second event uses up its own,
    // the JWT's still has room.
    let http = reqwest::Client::new();
    let post = |auth: (&'static str, String)| {
        http.post(s.events_url("names"))
            .header(auth.0, auth.1)
            .header("content-type", "application/json")
            .body("1")
            .send()
    };
    assert_eq!(post(("x-api-key", KEY.into())).await.unwrap().status(), 200);
    assert_eq!(post(("x-api-key", KEY.into())).await.unwrap().status(), 429);
    let bearer = format!("Bearer {token}");
    assert_eq!(post(("authorization", bearer)).await.unwrap().status(), 200);
    // The stored records say which device-1 sent them.
    let log = read_log(&s.data_dir, "names", &[]).unwrap();
    let mut sources: Vec<(String, String, String)> = log
        .iter()
        .map(|r| {
            (
                r["value"].as_str().unwrap().to_string(),
                r["headers"]["sluice-principal"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                r["headers"]["sluice-principal-source"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    sources.sort();
    assert_eq!(
        sources,
        [
            ("1".into(), "device-1".into(), "api_key".into()),
            ("1".into(), "device-1".into(), "jwt:https://idp.test".into()),
            (
                "from-jwt".into(),
                "device-1".into(),
                "jwt:https://idp.test".into()
            ),
            ("from-key".into(), "device-1".into(), "api_key".into()),
        ]
    );
}

/// A client certificate revoked by a CRL loaded after its session began ends that session (MQTT
/// 5 DISCONNECT 0x87) once the listener reloads its TLS files; a session with another
/// certificate goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_while_its_session_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = tls_files(d);
    let revoked =
        t.ca.issue_serial("pump-1", &["pump-1.devices.test"], 4242)
            .unwrap();
    let kept =
        t.ca.issue_serial("pump-2", &["pump-2.devices.test"], 4343)
            .unwrap();
    let crl = pki::write(d, "clients.crl.pem", &t.ca.crl(&[]).unwrap()).unwrap();
    let toml = format!(
        "[mqtt.tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_auth = \"optional\"\nclient_ca_file = {:?}\n\
         crl_files = [{:?}]\nreload_interval_ms = 100\n\
         [[auth.mtls.rules]]\nfield = \"san_dns\"\npattern = \"*.devices.test\"\nstreams = [\"*\"]\n",
        t.cert,
        t.key,
        t.ca_file,
        crl.display().to_string()
    );
    let s = start_with(d, &toml, &[]);
    let mqtts = s.mqtts.unwrap();
    let mut sessions = Vec::new();
    for (cert, id) in [(&revoked, "pump-1"), (&kept, "pump-2")] {
        let client = pki::tls_client(&t.ca.cert_pem(), Some(cert)).unwrap();
        let mut c = Client5::stream(tls_to(mqtts, &client).await);
        assert_eq!(c.connect(connect5(id, 30)).await, 0);
        sessions.push(c);
    }
    // The CA revokes pump-1's certificate; the gateway picks the CRL up on its own.
    std::fs::write(&crl, t.ca.crl(&[4242]).unwrap()).unwrap();
    let mut gone = sessions.remove(0);
    match gone.recv().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(u8::from(d.reason_code), 0x87, "{d:?}");
            assert!(d.reason_string.unwrap().contains("revoked"));
        }
        other => panic!("{other:?}"),
    }
    let mut still = sessions.remove(0);
    assert_eq!(still.publish1("pumps/2", 1, b"still-here").await, 0);
    // And the revoked certificate cannot come back.
    let client = pki::tls_client(&t.ca.cert_pem(), Some(&revoked)).unwrap();
    let tcp = TcpStream::connect(mqtts).await.unwrap();
    let again = tokio_rustls::TlsConnector::from(client)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await;
    let refused = match again {
        Err(_) => true,
        Ok(stream) => {
            let mut c = Client5::stream(stream);
            c.send(v5::Packet::Connect(Box::new(connect5("pump-1b", 30))))
                .await;
            c.recv().await.is_none()
        }
    };
    assert!(refused, "a revoked certificate completed a new session");
}
