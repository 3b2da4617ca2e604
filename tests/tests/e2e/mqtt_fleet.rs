//! MQTT for device fleets (docs/mqtt.md): retained publishes and wills stored with their flag
//! (or dropped, per stream), persistent sessions that keep QoS 2 exchanges across reconnects,
//! gateway restarts (embedded store) and gateways (Redis store), and the Origin check of MQTT
//! over WebSocket. Real binary, raw MQTT packets (so each flag is the test's own), and
//! Debian's mosquitto_pub.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use rmqtt_codec::v3;
use rmqtt_codec::v5;
use serde_json::Value;
use sluice_tests::mqtt::{Client5, Raw, connect3, connect5, publish, session3, session5};
use sluice_tests::redis::Redis;
use sluice_tests::{Sluice, api_key_entry, metric_or_zero, read_log, wait_until};

use crate::mqtt::{header, log_len};
use tokio::net::TcpStream;

/// A QoS 1 Last Will.
fn will(topic: &str, message: &'static [u8], retain: bool) -> v5::LastWill {
    v5::LastWill {
        qos: rmqtt_codec::types::QoS::AtLeastOnce,
        retain,
        topic: topic.into(),
        message: bytes::Bytes::from_static(message),
        will_delay_interval_sec: None,
        correlation_data: None,
        message_expiry_interval: None,
        content_type: None,
        user_properties: vec![],
        is_utf8_payload: None,
        response_topic: None,
    }
}

fn persistent5(client_id: &str, expiry_secs: u32) -> v5::Connect {
    let mut c = connect5(client_id, 30);
    c.clean_start = false;
    c.session_expiry_interval_secs = expiry_secs;
    c
}

fn rel(id: u16) -> v5::PublishAck2 {
    v5::PublishAck2 {
        packet_id: NonZeroU16::new(id).unwrap(),
        reason_code: v5::PublishAck2Reason::Success,
        properties: Vec::new(),
        reason_string: None,
    }
}

/// Publishes QoS 2 with `id` (DUP as given) and expects PUBREC success.
async fn publish2(raw: &mut Raw, topic: &str, id: u16, payload: &'static [u8], dup: bool) {
    let mut p = publish(topic, 2, id, payload, Some(Default::default()));
    p.dup = dup;
    raw.send5(v5::Packet::Publish(Box::new(p))).await;
    match raw.recv5().await {
        Some(v5::Packet::PublishReceived(a)) => {
            assert_eq!((a.packet_id.get(), u8::from(a.reason_code)), (id, 0))
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
}

/// Sends PUBREL `id` and returns the PUBCOMP's reason.
async fn release(raw: &mut Raw, id: u16) -> v5::PublishAck2Reason {
    raw.send5(v5::Packet::PublishRelease(rel(id))).await;
    match raw.recv5().await {
        Some(v5::Packet::PublishComplete(c)) => {
            assert_eq!(c.packet_id.get(), id);
            c.reason_code
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

/// Whether the gateway at `addr` answers a persistent CONNECT of `client_id` with Session
/// Present; the connection is dropped at once (the session is left as it was).
async fn session_present(addr: SocketAddr, client_id: &str) -> bool {
    let (raw, ack) = session5(addr, persistent5(client_id, 300)).await;
    drop(raw);
    ack.session_present
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_publishes_and_wills_are_stored_with_their_flag_or_dropped_per_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[streams.declare.quiet]\nmqtt_retained = \"drop\"\n",
    )
    .unwrap();
    let addr = s.mqtt.unwrap();

    // MQTT 5: CONNACK says Retain Available; a retained "online" at boot gets PUBACK 0, and an
    // empty retained payload (the "clear" convention) is stored as an empty event, retained.
    let (mut raw, ack) = session5(addr, connect5("lamp-1", 30)).await;
    assert!(ack.retain_available);
    for (id, payload) in [(1u16, &b"online"[..]), (2, &b""[..])] {
        let mut p = publish("status/lamp-1", 1, id, b"", Some(Default::default()));
        p.payload = bytes::Bytes::copy_from_slice(payload);
        p.retain = true;
        raw.send5(v5::Packet::Publish(Box::new(p))).await;
        match raw.recv5().await {
            Some(v5::Packet::PublishAck(a)) => {
                assert_eq!((a.packet_id.get(), u8::from(a.reason_code)), (id, 0))
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    // Not retained: no flag.
    raw.send5(v5::Packet::Publish(Box::new(publish(
        "status/lamp-1",
        1,
        3,
        b"plain",
        Some(Default::default()),
    ))))
    .await;
    assert!(matches!(raw.recv5().await, Some(v5::Packet::PublishAck(_))));
    let recs = log_len(&s, "status", 3).await;
    assert_eq!(recs[0]["value"], "online");
    assert_eq!(header(&recs[0], "mqtt-retain").as_deref(), Some("true"));
    assert_eq!(recs[1]["value"], "");
    assert_eq!(header(&recs[1], "mqtt-retain").as_deref(), Some("true"));
    assert_eq!(header(&recs[2], "mqtt-retain"), None);

    // A stream that drops retained publishes answers them with success and stores nothing;
    // its other publishes are stored.
    for (id, retain) in [(4u16, true), (5, false)] {
        let mut p = publish("quiet/lamp-1", 2, id, b"x", Some(Default::default()));
        p.retain = retain;
        raw.send5(v5::Packet::Publish(Box::new(p))).await;
        match raw.recv5().await {
            Some(v5::Packet::PublishReceived(a)) => {
                assert_eq!((a.packet_id.get(), u8::from(a.reason_code)), (id, 0))
            }
            other => panic!("expected PUBREC, got {other:?}"),
        }
        assert_eq!(release(&mut raw, id).await, v5::PublishAck2Reason::Success);
    }
    let quiet = log_len(&s, "quiet", 1).await;
    assert_eq!(quiet.len(), 1);
    assert_eq!(header(&quiet[0], "mqtt-retain"), None);

    // MQTT 3.1.1: the retain flag is recorded too.
    let mut raw3 = session3(addr, connect3("lamp-3", 30)).await;
    let mut p = publish("status/lamp-3", 1, 1, b"online", None);
    p.retain = true;
    raw3.send3(v3::Packet::Publish(Box::new(p))).await;
    assert!(matches!(
        raw3.recv3().await,
        Some(v3::Packet::PublishAck { .. })
    ));
    let recs = log_len(&s, "status", 4).await;
    assert_eq!(recs[3]["value"], "online");
    assert_eq!(header(&recs[3], "mqtt-retain").as_deref(), Some("true"));

    // A retained will is accepted at CONNECT and, when the device drops off, stored retained.
    let mut c = connect5("lamp-w", 30);
    c.last_will = Some(will("status/lamp-w", b"offline", true));
    let (raw_w, _) = session5(addr, c).await;
    drop(raw_w);
    let recs = log_len(&s, "status", 5).await;
    assert_eq!(recs[4]["value"], "offline");
    assert_eq!(header(&recs[4], "mqtt-will").as_deref(), Some("true"));
    assert_eq!(header(&recs[4], "mqtt-retain").as_deref(), Some("true"));

    // mosquitto_pub -r over 5.0 (what device firmware does at boot) is stored, flag and all.
    let out = std::process::Command::new("mosquitto_pub")
        .args(["-V", "mqttv5", "-h", "127.0.0.1", "-p"])
        .arg(addr.port().to_string())
        .args(["-q", "1", "-r", "-t", "status/plug-9", "-m", "online"])
        .output()
        .expect("mosquitto_pub (scripts/install-deps.sh installs it)");
    assert!(out.status.success(), "{out:?}");
    let recs = log_len(&s, "status", 6).await;
    assert_eq!(recs[5]["value"], "online");
    assert_eq!(header(&recs[5], "mqtt-retain").as_deref(), Some("true"));
    assert_eq!(
        header(&recs[5], "mqtt-topic").as_deref(),
        Some("status/plug-9")
    );

    // A user property cannot forge the flag.
    let mut p = publish("status/lamp-1", 1, 9, b"x", Some(Default::default()));
    p.properties.as_mut().unwrap().user_properties = vec![("mqtt-retain".into(), "true".into())];
    raw.send5(v5::Packet::Publish(Box::new(p))).await;
    match raw.recv5().await {
        Some(v5::Packet::PublishAck(a)) => assert_eq!(u8::from(a.reason_code), 0x99),
        other => panic!("{other:?}"),
    }

    let m = s.metrics().await;
    assert_eq!(
        metric_or_zero(&m, "sluice_mqtt_retained_total", "outcome=\"accepted\""),
        5.0
    );
    assert_eq!(
        metric_or_zero(&m, "sluice_mqtt_retained_total", "outcome=\"dropped\""),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_qos2_exchanges_across_reconnects_and_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut s = Sluice::start(&data, "").unwrap();
    let addr = s.mqtt.unwrap();

    // First connection: no session yet. A QoS 2 publish is stored and answered with PUBREC,
    // then the connection drops before the device sends PUBREL.
    let (mut raw, ack) = session5(addr, persistent5("meter-1", 300)).await;
    assert!(!ack.session_present);
    publish2(&mut raw, "readings/meter-1", 7, b"r7", false).await;
    drop(raw);

    // The device comes back: Session Present; its resend of 7 (DUP) gets PUBREC without a
    // second copy, and its PUBREL is answered with PUBCOMP success.
    let (mut raw, ack) = session5(addr, persistent5("meter-1", 300)).await;
    assert!(ack.session_present);
    publish2(&mut raw, "readings/meter-1", 7, b"r7", true).await;
    assert_eq!(release(&mut raw, 7).await, v5::PublishAck2Reason::Success);
    // Released: the id is free again, a new publish with it is a new event.
    publish2(&mut raw, "readings/meter-1", 7, b"r7b", false).await;
    // Another exchange left open across a graceful restart (SIGTERM: the session is saved
    // when its connection is drained).
    publish2(&mut raw, "readings/meter-1", 8, b"r8", false).await;
    assert_eq!(release(&mut raw, 7).await, v5::PublishAck2Reason::Success);
    assert!(s.terminate().unwrap().success());
    drop(raw);
    let mut s = Sluice::start(&data, "").unwrap();
    let addr = s.mqtt.unwrap();
    let (mut raw, ack) = session5(addr, persistent5("meter-1", 300)).await;
    assert!(ack.session_present, "the session survives a restart");
    publish2(&mut raw, "readings/meter-1", 8, b"r8", true).await;
    assert_eq!(release(&mut raw, 8).await, v5::PublishAck2Reason::Success);
    let recs = log_len(&s, "readings", 3).await;
    let values: Vec<&str> = recs.iter().map(|r| r["value"].as_str().unwrap()).collect();
    assert_eq!(values, ["r7", "r7b", "r8"], "each publish stored once");
    drop(raw);

    // SIGKILL: the session as saved at CONNECT is found again.
    s.kill().unwrap();
    let mut s = Sluice::start(&data, "").unwrap();
    let addr = s.mqtt.unwrap();
    assert!(session_present(addr, "meter-1").await);

    // 3.1.1 clean session 0 keeps a session too; clean session 1 discards it.
    let mut c3 = connect3("meter-3", 30);
    c3.clean_session = false;
    let connack3 = |c: v3::Connect| async move {
        let mut raw = Raw::connect(addr, false).await;
        raw.send3(v3::Packet::Connect(Box::new(c))).await;
        match raw.recv3().await {
            Some(v3::Packet::ConnectAck(a)) => {
                assert_eq!(a.return_code, v3::ConnectAckReason::ConnectionAccepted);
                a.session_present
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(!connack3(c3.clone()).await);
    assert!(connack3(c3.clone()).await);
    assert!(!connack3(connect3("meter-3", 30)).await);
    assert!(
        !connack3(c3.clone()).await,
        "the clean session discarded it"
    );

    // A session is its principal's: the same client id under another principal has none.
    assert!(session_present(addr, "meter-1").await);
    let key = "fleet.key-of-another-tenant";
    s.terminate().unwrap();
    let config = api_key_entry(key, "tenant-b", &["*"]);
    let s = Sluice::start(&data, &config).unwrap();
    let addr = s.mqtt.unwrap();
    let mut c = persistent5("meter-1", 300);
    c.username = Some("fleet".into());
    c.password = Some(bytes::Bytes::from_static(b"key-of-another-tenant"));
    let (_raw, ack) = session5(addr, c).await;
    assert!(!ack.session_present, "another principal cannot load it");
    let m = s.metrics().await;
    assert!(metric_or_zero(&m, "sluice_mqtt_sessions_stored", "") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_expiry_and_the_bounds_are_honoured() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        &format!(
            "[mqtt]\nmax_session_expiry_secs = 3600\nmax_sessions_per_principal = 2\n{}",
            api_key_entry("fleet.bounds-test-secret", "fleet", &["*"])
        ),
    )
    .unwrap();
    let addr = s.mqtt.unwrap();
    let fleet = |mut c: v5::Connect| {
        c.username = Some("fleet".into());
        c.password = Some(bytes::Bytes::from_static(b"bounds-test-secret"));
        c
    };

    // Session Expiry Interval above the gateway's maximum: CONNACK says what it keeps. (Then
    // a clean start with expiry 0 forgets it.)
    let (raw, ack) = session5(addr, fleet(persistent5("long", u32::MAX))).await;
    assert_eq!(ack.session_expiry_interval_secs, Some(3600));
    drop(raw);
    let (raw, ack) = session5(addr, fleet(connect5("long", 30))).await;
    assert!(!ack.session_present);
    drop(raw);
    // A session of 1 s is gone once it expired; one of 300 s beside it is not.
    let (mut brief, ack) = session5(addr, persistent5("brief", 1)).await;
    assert_eq!(ack.session_expiry_interval_secs, None);
    let (mut kept, _) = session5(addr, persistent5("kept", 300)).await;
    for raw in [&mut brief, &mut kept] {
        raw.send5(v5::Packet::Disconnect(Default::default())).await;
        // Closed by the gateway once it saved the session.
        assert!(raw.closed().await);
    }
    // The passage of the session's second is what is tested here (nothing to wait for).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !session_present(addr, "brief").await,
        "a 1 s session expired"
    );
    assert!(session_present(addr, "kept").await);

    // Two sessions per principal: a third pushes out the one expiring soonest. (Open ones
    // too: each is saved at CONNECT.)
    let dir = tmp.path().join("data").join("mqtt-sessions");
    let clients = |d: &std::path::Path| {
        let mut ids: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| {
                let v: Value =
                    serde_json::from_slice(&std::fs::read(e.unwrap().path()).unwrap()).unwrap();
                v["client_id"].as_str().unwrap().to_string()
            })
            .collect();
        ids.sort();
        ids
    };
    let mut open = Vec::new();
    for (id, expiry) in [("a", 60u32), ("b", 600), ("c", 300)] {
        open.push(session5(addr, fleet(persistent5(id, expiry))).await.0);
    }
    // The anonymous principal's two ("brief" again, from the probe, and "kept") stay.
    assert_eq!(
        clients(&dir),
        ["b", "brief", "c", "kept"],
        "fleet's soonest expiring went"
    );
    let m = s.metrics().await;
    assert_eq!(metric_or_zero(&m, "sluice_mqtt_sessions_stored", ""), 4.0);
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_device_resumes_its_session_on_another_gateway() {
    let redis = Redis::start().unwrap();
    let config = format!(
        "[mqtt]\nmax_sessions_per_principal = 2\n[dedup]\nstore = \"redis\"\n[dedup.redis]\nurl = {:?}\n",
        redis.url()
    );
    let (ta, tb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Sluice::start(&ta.path().join("data"), &config).unwrap();
    let b = Sluice::start(&tb.path().join("data"), &config).unwrap();

    let (mut raw, ack) = session5(a.mqtt.unwrap(), persistent5("tracker-5", 300)).await;
    assert!(!ack.session_present);
    publish2(&mut raw, "pos/tracker-5", 11, b"p11", false).await;
    // The device disconnects; gateway A closes the connection once the session is saved.
    raw.send5(v5::Packet::Disconnect(Default::default())).await;
    assert!(raw.closed().await);
    // The balancer sends it to the other gateway.
    let (mut raw, ack) = session5(b.mqtt.unwrap(), persistent5("tracker-5", 300)).await;
    assert!(
        ack.session_present,
        "gateway B finds the session gateway A saved"
    );
    // The resend of 11 is answered without a second copy; its PUBREL completes.
    publish2(&mut raw, "pos/tracker-5", 11, b"p11", true).await;
    assert_eq!(release(&mut raw, 11).await, v5::PublishAck2Reason::Success);
    assert_eq!(log_len(&a, "pos", 1).await.len(), 1);
    assert!(
        read_log(&b.data_dir, "pos", &[])
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(redis.count_keys("sluice:ms:*").unwrap(), 1);
    // The bound holds in Redis too: two sessions per principal, the soonest expiring go
    // first (the connections stay open: each session was saved at CONNECT).
    let mut open = Vec::new();
    for (id, expiry) in [("t-a", 60u32), ("t-b", 600), ("t-c", 400)] {
        open.push(session5(a.mqtt.unwrap(), persistent5(id, expiry)).await.0);
    }
    assert_eq!(redis.count_keys("sluice:ms:*").unwrap(), 2);
    let (_raw, ack) = session5(b.mqtt.unwrap(), persistent5("t-b", 600)).await;
    assert!(ack.session_present, "the session expiring last is kept");
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_checks_the_origin_like_the_websocket_endpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[websocket]\nallowed_origins = [\"https://dash.example\"]\n",
    )
    .unwrap();
    let url = format!("ws://{}/mqtt", s.http);
    let refused = Client5::websocket_from(
        &url,
        TcpStream::connect(s.http).await.unwrap(),
        Some("https://evil.example"),
    )
    .await;
    assert_eq!(refused.err(), Some(403));
    for origin in [Some("https://dash.example"), None] {
        let mut c =
            Client5::websocket_from(&url, TcpStream::connect(s.http).await.unwrap(), origin)
                .await
                .unwrap_or_else(|code| panic!("{origin:?} refused with {code}"));
        assert_eq!(c.connect(connect5("browser", 30)).await, 0);
        assert_eq!(c.publish1("web/x", 1, b"hi").await, 0);
    }
}

const ISS: &str = "https://idp.fleet.test";
const HS_SECRET: &str = "a-fleet-hs256-secret-long-enough-1234";

/// Publishes QoS 1 and returns the PUBACK's reason code.
async fn puback<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    c: &mut Client5<S>,
    topic: &str,
    id: u16,
) -> u8 {
    c.publish1(topic, id, b"reading").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_bound_topics_let_a_device_publish_only_as_itself() {
    use sluice_tests::pki::{self, Ca};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca = Ca::new("fleet CA").unwrap();
    let server = ca
        .issue_valid("sluice", &["localhost", "127.0.0.1"])
        .unwrap();
    let pump = ca.issue_valid("pump-7", &["pump-7.devices.test"]).unwrap();
    let w = |name: &str, c: &str| pki::write(d, name, c).unwrap().display().to_string();
    let config = format!(
        r#"
[mqtt.auth]
allow_anonymous = false

[http.auth]
allow_anonymous = false

[mqtt.tls]
cert_file = "{cert}"
key_file = "{key}"
client_auth = "optional"
client_ca_file = "{ca}"

[[auth.jwt.issuers]]
issuer = "{ISS}"
audiences = ["sluice"]
algorithms = ["HS256"]
hs256_secret = "{HS_SECRET}"
permissions_claim = "streams"
permission_prefix = ""

[[auth.mtls.rules]]
field = "san_dns"
pattern = "*.devices.test"
streams = ["*"]

[[mqtt.topics]]
pattern = "devices/{{device}}/telemetry"
stream = "telemetry"
key = "{{device}}"
bind = {{ device = "client_id" }}

[[mqtt.topics]]
pattern = "tenants/{{tenant}}/{{rest+}}"
stream = "tenants"
key = "{{tenant}}"
bind = {{ tenant = "claim:tenant" }}

[[mqtt.topics]]
pattern = "certs/{{name}}/{{rest+}}"
stream = "certs"
key = "{{name}}"
bind = {{ name = "cert_cn" }}
{key_entry}"#,
        cert = w("server.pem", &server.cert_pem),
        key = w("server.key", &server.key_pem),
        ca = w("ca.pem", &ca.cert_pem()),
        key_entry = api_key_entry("fleet.one-key-for-all-devices", "fleet", &["*"]),
    );
    let s = Sluice::start(&d.join("data"), &config).unwrap();
    let addr = s.mqtt.unwrap();
    let with_key = |mut c: v5::Connect| {
        c.username = Some("fleet".into());
        c.password = Some(bytes::Bytes::from_static(b"one-key-for-all-devices"));
        c
    };

    // One API key for the whole fleet: device A publishes under its own client id, not B's.
    let mut a = Client5::stream(TcpStream::connect(addr).await.unwrap());
    assert_eq!(a.connect(with_key(connect5("dev-a", 30))).await, 0);
    assert_eq!(puback(&mut a, "devices/dev-a/telemetry", 1).await, 0);
    assert_eq!(puback(&mut a, "devices/dev-b/telemetry", 2).await, 0x87);
    // The connection goes on after a refusal.
    assert_eq!(puback(&mut a, "devices/dev-a/telemetry", 3).await, 0);
    // A will on another device's topic is refused at CONNECT.
    let mut c = with_key(connect5("dev-a2", 30));
    c.last_will = Some(will("devices/dev-b/telemetry", b"gone", false));
    let mut refused = Client5::stream(TcpStream::connect(addr).await.unwrap());
    assert_eq!(refused.connect(c).await, 0x87);
    // MQTT 3.1.1 cannot say no: the connection is closed.
    let mut c3 = connect3("dev-c", 30);
    c3.username = Some("fleet".into());
    c3.password = Some(bytes::Bytes::from_static(b"one-key-for-all-devices"));
    let mut raw3 = session3(addr, c3).await;
    raw3.send3(v3::Packet::Publish(Box::new(publish(
        "devices/dev-a/telemetry",
        1,
        1,
        b"forged",
        None,
    ))))
    .await;
    assert!(raw3.closed().await, "3.1.1: closed without PUBACK");

    // A JWT's claim: tenant acme's device cannot publish into globex.
    let token = pki::hs256(
        HS_SECRET.as_bytes(),
        &serde_json::json!({"iss": ISS, "sub": "sensor-1", "aud": "sluice", "exp": pki::now() + 3600, "streams": ["*"], "tenant": "acme"}),
    );
    let mut j = Client5::stream(TcpStream::connect(addr).await.unwrap());
    let mut c = connect5("sensor-1", 30);
    c.username = Some("jwt".into());
    c.password = Some(bytes::Bytes::from(token));
    assert_eq!(j.connect(c).await, 0);
    assert_eq!(puback(&mut j, "tenants/acme/site-1/temp", 1).await, 0);
    assert_eq!(puback(&mut j, "tenants/globex/site-1/temp", 2).await, 0x87);
    // An API key has no claims: nothing is bound to it.
    assert_eq!(puback(&mut a, "tenants/acme/x", 4).await, 0x87);

    // A client certificate's CN.
    let tls = pki::tls_client(&ca.cert_pem(), Some(&pump)).unwrap();
    let tcp = TcpStream::connect(s.mqtts.unwrap()).await.unwrap();
    let io = tokio_rustls::TlsConnector::from(tls)
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut p = Client5::stream(io);
    assert_eq!(p.connect(connect5("pump-7", 30)).await, 0);
    assert_eq!(puback(&mut p, "certs/pump-7/pressure", 1).await, 0);
    assert_eq!(puback(&mut p, "certs/pump-8/pressure", 2).await, 0x87);

    let keys = |stream: &str| -> Vec<String> {
        read_log(&s.data_dir, stream, &[])
            .unwrap_or_default()
            .iter()
            .map(|r| r["key"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(log_len(&s, "telemetry", 2).await.len(), 2);
    assert_eq!(keys("telemetry"), ["dev-a", "dev-a"]);
    assert_eq!(keys("tenants"), ["acme"]);
    assert_eq!(keys("certs"), ["pump-7"]);
    let m = s.metrics().await;
    assert_eq!(
        metric_or_zero(
            &m,
            "sluice_events_rejected_total",
            "protocol=\"mqtt\",reason=\"identity\""
        ),
        6.0,
        "each refusal counted: B's topic, the will, the 3.1.1 forgery, globex, the key's tenant, pump-8"
    );
}

/// Runs tests/python/mqtt_fleet.py (paho-mqtt) with `args`; its stdout as JSON.
fn paho(args: &[String]) -> Value {
    use sluice_tests::OutputWithin;
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/mqtt_fleet.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output_within(Duration::from_secs(180))
        .expect("python3 with paho-mqtt (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "mqtt_fleet.py {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_devices_publish_retained_state_and_wills_subscribe_and_keep_sessions() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let port = s.mqtt.unwrap().port().to_string();
    let report = tokio::task::spawn_blocking(move || paho(&["fleet".into(), port]))
        .await
        .unwrap();
    assert_eq!(report["connack"], 0, "{report}");
    assert_eq!(report["online_acked"], true, "{report}");
    // SUBACK failure (3.1.1: 0x80), and the device goes on publishing.
    assert_eq!(report["suback"], serde_json::json!([128]), "{report}");
    assert_eq!(report["after_subscribe_acked"], true, "{report}");
    // MQTT 5 session expiry.
    assert_eq!(report["first"], serde_json::json!([0, false]), "{report}");
    assert_eq!(
        report["kept_first"],
        serde_json::json!([0, false]),
        "{report}"
    );
    assert_eq!(
        report["after_expiry"],
        serde_json::json!([0, false]),
        "{report}"
    );
    assert_eq!(
        report["kept_after"],
        serde_json::json!([0, true]),
        "{report}"
    );
    // The retained "online" and the retained will, flagged.
    let status = log_len(&s, "status", 2).await;
    let seen: Vec<(String, Option<String>, Option<String>)> = status
        .iter()
        .map(|r| {
            (
                r["value"].as_str().unwrap().to_string(),
                header(r, "mqtt-retain"),
                header(r, "mqtt-will"),
            )
        })
        .collect();
    let t = || Some("true".to_string());
    assert_eq!(
        seen,
        [("online".into(), t(), None), ("offline".into(), t(), t())]
    );
    assert_eq!(
        log_len(&s, "telemetry", 1).await[0]["value"],
        "after-subscribe"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paho_device_publishing_through_a_gateway_sigkill_has_every_acked_publish_stored_once() {
    // QoS 1 and 2 in flight when the gateway is killed: the device (paho, persistent session)
    // reconnects to the restarted gateway and resends; with dedup on the stream (the
    // exactly-once statement for a crash, docs/mqtt.md) every acked publish is stored once.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = tmp.path().join("sluice.toml");
    std::fs::write(&config, "[streams.defaults]\ndedup = true\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let env = [("SLUICE_MQTT__LISTEN", listen.as_str())];
    let mut s = Sluice::start_with_env(&data, &config, &env).unwrap();
    let n = 1500;
    let device = tokio::task::spawn_blocking(move || {
        paho(&["crash".into(), port.to_string(), n.to_string()])
    });
    let received = wait_until(Duration::from_secs(60), || async {
        let m = s.metrics().await;
        metric_or_zero(&m, "sluice_events_received_total", "protocol=\"mqtt\"") >= 300.0
    })
    .await;
    assert!(received, "the device is publishing");
    s.kill().unwrap();
    let s = Sluice::start_with_env(&data, &config, &env).unwrap();
    let acked = device.await.unwrap();
    let acked: Vec<String> = serde_json::from_value(acked).unwrap();
    assert_eq!(acked.len(), n, "every publish acked in the end");
    let stored = read_log(&s.data_dir, "meters", &[]).unwrap();
    let mut count = std::collections::HashMap::<String, usize>::new();
    for r in &stored {
        *count
            .entry(r["value"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for p in &acked {
        assert_eq!(
            count.get(p),
            Some(&1),
            "{p}: acked, stored {:?} times",
            count.get(p)
        );
    }
    assert_eq!(stored.len(), n, "nothing stored twice");
    let m = s.metrics().await;
    eprintln!(
        "after the crash: {} duplicates answered, sessions resumed {}",
        sluice_tests::metric_sum(&m, "sluice_dedup_duplicates_total", "protocol=\"mqtt\""),
        metric_or_zero(&m, "sluice_mqtt_sessions_total", "outcome=\"resumed\"")
    );
}

/// Debian's mosquitto_pub as the device: a retained Last Will published when the client dies
/// without DISCONNECT (SIGKILL while it holds the connection open with `-l`), and persistent
/// sessions (`-c`, 3.1.1 and 5.0 with a Session Expiry Interval) resumed by its next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_pub_wills_and_persistent_sessions() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let port = s.mqtt.unwrap().port().to_string();
    let pub_args = |version: &str, client: &str| {
        let mut a: Vec<String> = ["-V", version, "-h", "127.0.0.1", "-p", &port, "-q", "1"]
            .map(String::from)
            .to_vec();
        a.extend(["-i", client, "-c"].map(String::from));
        if version == "mqttv5" {
            a.extend(["-x", "300"].map(String::from));
        }
        a
    };

    // A device that stays connected (-l reads lines from stdin), with a retained will.
    let mut device = Command::new("mosquitto_pub")
        .args(pub_args("mqttv5", "lamp-m"))
        .args(["-t", "status/lamp-m", "-l"])
        .args(["--will-topic", "status/lamp-m", "--will-payload", "offline"])
        .args(["--will-qos", "1", "--will-retain"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto_pub (scripts/install-deps.sh installs it)");
    let mut stdin = device.stdin.take().unwrap();
    stdin.write_all(b"online\n").unwrap();
    stdin.flush().unwrap();
    let recs = log_len(&s, "status", 1).await;
    assert_eq!(recs[0]["value"], "online");
    assert_eq!(header(&recs[0], "mqtt-will"), None);
    // The device dies without DISCONNECT: its will is published, retained.
    device.kill().unwrap();
    device.wait().unwrap();
    let recs = log_len(&s, "status", 2).await;
    assert_eq!(recs[1]["value"], "offline");
    assert_eq!(header(&recs[1], "mqtt-will").as_deref(), Some("true"));
    assert_eq!(header(&recs[1], "mqtt-retain").as_deref(), Some("true"));
    assert_eq!(
        header(&recs[1], "mqtt-topic").as_deref(),
        Some("status/lamp-m")
    );

    // Its next run resumes the session it left (5.0, Session Expiry 300 s); a 3.1.1 device
    // with clean session 0 does the same on its second run.
    for (version, client) in [
        ("mqttv5", "lamp-m"),
        ("mqttv311", "lamp-3"),
        ("mqttv311", "lamp-3"),
    ] {
        let out = Command::new("mosquitto_pub")
            .args(pub_args(version, client))
            .args(["-t", &format!("status/{client}"), "-m", "back"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let recs = log_len(&s, "status", 5).await;
    assert!(recs[2..].iter().all(|r| r["value"] == "back"), "{recs:?}");
    let m = s.metrics().await;
    // New: lamp-m's first connection and lamp-3's first; resumed: lamp-m's and lamp-3's next.
    assert_eq!(
        metric_or_zero(&m, "sluice_mqtt_sessions_total", "outcome=\"new\""),
        2.0
    );
    assert_eq!(
        metric_or_zero(&m, "sluice_mqtt_sessions_total", "outcome=\"resumed\""),
        2.0
    );
    assert_eq!(
        metric_or_zero(&m, "sluice_mqtt_wills_total", "outcome=\"appended\""),
        1.0
    );
}
