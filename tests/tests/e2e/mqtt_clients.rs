//! MQTT with Debian's `mosquitto_pub` (an independent client, installed by
//! scripts/install-deps.sh) for 3.1.1 and 5.0 over TCP and TLS, and the authentication matrix
//! over MQTT: API key (whole, or id as username), JWT in the password, client certificate on
//! the TLS listener (optional and required), each with its principal stored with the events.

use sluice_tests::OutputWithin;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_tests::mqtt::{Raw, connect5};
use sluice_tests::pki::{self, Ca};
use sluice_tests::{Sluice, api_key_entry, read_log, wait_until};

const KEY: &str = "dev.s3cret";
const ISS: &str = "https://idp.test/hs";
const HS_SECRET: &str = "an-hs256-secret-that-is-long-enough-1234";

struct World {
    _dir: tempfile::TempDir,
    s: Sluice,
    ca_file: String,
    device_cert: String,
    device_key: String,
}

/// A gateway with MQTT over TCP and TLS (client certificates `mode`), an API key, an HS256
/// JWT issuer and an mTLS rule.
fn world(mode: &str) -> World {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("mqtt test CA").unwrap();
    let server = ca
        .issue_valid("sluice", &["localhost", "127.0.0.1"])
        .unwrap();
    let device = ca.issue_valid("pump-7", &["pump-7.devices.test"]).unwrap();
    let w = |name: &str, c: &str| pki::write(d, name, c).unwrap().display().to_string();
    let config = format!(
        r#"
# MQTT over WebSocket shares the HTTP listener: both refuse anonymous producers.
[http.auth]
allow_anonymous = false

[mqtt.auth]
allow_anonymous = false

[mqtt.tls]
cert_file = "{cert}"
key_file = "{key}"
client_auth = "{mode}"
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
{key_entry}"#,
        cert = w("server.pem", &server.cert_pem),
        key = w("server.key", &server.key_pem),
        ca = w("ca.pem", &ca.cert_pem()),
        key_entry = api_key_entry(KEY, "device-key", &["*"]),
    );
    let s = Sluice::start(&d.join("data"), &config).unwrap();
    assert!(s.mqtts.is_some(), "[mqtt.tls] opens the TLS listener");
    World {
        ca_file: w("ca.pem", &ca.cert_pem()),
        device_cert: w("device.pem", &device.cert_pem),
        device_key: w("device.key", &device.key_pem),
        s,
        _dir: dir,
    }
}

/// Runs mosquitto_pub; (success, stderr+stdout).
fn mosquitto_pub(args: &[&str]) -> (bool, String) {
    let out = Command::new("mosquitto_pub")
        .args(args)
        .output_within(sluice_tests::DEADLINE)
        .expect("mosquitto_pub (Debian's mosquitto-clients; scripts/install-deps.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn principals(data_dir: &Path, stream: &str) -> Vec<String> {
    read_log(data_dir, stream, &[])
        .unwrap_or_default()
        .iter()
        .map(|r: &Value| {
            r["headers"]["sluice-principal"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn mosquitto_pub_311_and_5_over_tcp_and_tls() {
    let w = world("optional");
    let tcp = w.s.mqtt.unwrap().port().to_string();
    let tls = w.s.mqtts.unwrap().port().to_string();
    let mut expected = 0;
    for version in ["mqttv311", "mqttv5"] {
        for qos in ["1", "2"] {
            // The whole key as the password, over TCP.
            let (ok, out) = mosquitto_pub(&[
                "-V",
                version,
                "-h",
                "127.0.0.1",
                "-p",
                &tcp,
                "-q",
                qos,
                "-d",
                "-u",
                "any",
                "-P",
                KEY,
                "-t",
                "mosq/tcp",
                "-m",
                &format!("{version}-q{qos}"),
            ]);
            assert!(ok, "{out}");
            assert!(
                out.contains(if qos == "1" {
                    "received PUBACK"
                } else {
                    "received PUBCOMP"
                }),
                "{out}"
            );
            // Key id as the username and the secret as the password, over TLS (server
            // certificate checked against the CA, no client certificate: optional).
            let (ok, out) = mosquitto_pub(&[
                "-V",
                version,
                "-h",
                "127.0.0.1",
                "-p",
                &tls,
                "--cafile",
                &w.ca_file,
                "-q",
                qos,
                "-u",
                "dev",
                "-P",
                "s3cret",
                "-t",
                "mosq/tls",
                "-m",
                &format!("{version}-q{qos}"),
            ]);
            assert!(ok, "{out}");
            expected += 1;
        }
    }
    assert_eq!(principals(&w.s.data_dir, "mosq").len(), expected * 2);
    assert!(
        principals(&w.s.data_dir, "mosq")
            .iter()
            .all(|p| p == "device-key")
    );
    // Bad credentials: refused, with the version's words for it.
    let (ok, out) = mosquitto_pub(&[
        "-V",
        "mqttv311",
        "-h",
        "127.0.0.1",
        "-p",
        &tcp,
        "-u",
        "any",
        "-P",
        "dev.wrong",
        "-t",
        "mosq/x",
        "-m",
        "x",
    ]);
    assert!(
        !ok && out.to_lowercase().contains("bad user name or password"),
        "{out}"
    );
    let (ok, out) = mosquitto_pub(&[
        "-V",
        "mqttv5",
        "-h",
        "127.0.0.1",
        "-p",
        &tcp,
        "-t",
        "mosq/x",
        "-m",
        "x",
    ]);
    assert!(
        !ok && out.to_lowercase().contains("not authorized"),
        "{out}"
    );
}

#[test]
fn client_certificate_jwt_and_key_are_principals_over_mqtt() {
    let w = world("optional");
    let tls = w.s.mqtts.unwrap().port().to_string();
    // mTLS: no password, the certificate is the credential.
    let (ok, out) = mosquitto_pub(&[
        "-V",
        "mqttv5",
        "-h",
        "127.0.0.1",
        "-p",
        &tls,
        "--cafile",
        &w.ca_file,
        "--cert",
        &w.device_cert,
        "--key",
        &w.device_key,
        "-q",
        "1",
        "-t",
        "m.cert/pump",
        "-m",
        "by-cert",
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        principals(&w.s.data_dir, "m.cert"),
        vec!["pump-7.devices.test".to_string()]
    );
    // A JWT as the password (any username), scoped to streams `j.*`.
    let token = pki::hs256(
        HS_SECRET.as_bytes(),
        &json!({"iss": ISS, "sub": "jwt-device", "aud": "sluice", "exp": pki::now() + 3600, "streams": ["j.*"]}),
    );
    let tcp = w.s.mqtt.unwrap().port().to_string();
    let (ok, out) = mosquitto_pub(&[
        "-V",
        "mqttv311",
        "-h",
        "127.0.0.1",
        "-p",
        &tcp,
        "-u",
        "jwt",
        "-P",
        &token,
        "-q",
        "1",
        "-t",
        "j.x/k",
        "-m",
        "by-jwt",
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        principals(&w.s.data_dir, "j.x"),
        vec!["jwt-device".to_string()]
    );
    // Outside its streams: 5.0 gets PUBACK 0x87 (mosquitto_pub reports the failed publish).
    let (_ok, out) = mosquitto_pub(&[
        "-V",
        "mqttv5",
        "-h",
        "127.0.0.1",
        "-p",
        &tcp,
        "-P",
        &token,
        "-q",
        "1",
        "-d",
        "-t",
        "other/k",
        "-m",
        "no",
    ]);
    assert!(
        out.contains("PUBACK")
            && (out.contains("135") || out.to_lowercase().contains("not authorized")),
        "{out}"
    );
    assert!(
        read_log(&w.s.data_dir, "other", &[])
            .unwrap_or_default()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_refuse_tls_without_one() {
    let w = world("required");
    let tls = w.s.mqtts.unwrap().port().to_string();
    let t = tls.clone();
    let ca = w.ca_file.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        mosquitto_pub(&[
            "-h",
            "127.0.0.1",
            "-p",
            &t,
            "--cafile",
            &ca,
            "-P",
            KEY,
            "-t",
            "req/x",
            "-m",
            "x",
        ])
    })
    .await
    .unwrap();
    assert!(!ok, "a TLS client without a certificate is refused: {out}");
    let (cert, key, ca) = (
        w.device_cert.clone(),
        w.device_key.clone(),
        w.ca_file.clone(),
    );
    let (ok, out) = tokio::task::spawn_blocking(move || {
        mosquitto_pub(&[
            "-h",
            "127.0.0.1",
            "-p",
            &tls,
            "--cafile",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "-q",
            "1",
            "-t",
            "req/x",
            "-m",
            "x",
        ])
    })
    .await
    .unwrap();
    assert!(ok, "{out}");
    // The plain TCP listener still asks for credentials: none → CONNACK 0x87.
    let mut raw = Raw::connect(w.s.mqtt.unwrap(), true).await;
    raw.send5(rmqtt_codec::v5::Packet::Connect(Box::new(connect5(
        "nocreds", 30,
    ))))
    .await;
    match raw.recv5().await {
        Some(rmqtt_codec::v5::Packet::ConnectAck(a)) => assert_eq!(u8::from(a.reason_code), 0x87),
        other => panic!("{other:?}"),
    }
    let failures = wait_until(Duration::from_secs(10), || async {
        sluice_tests::metric_or_zero(
            &w.s.metrics().await,
            "sluice_auth_failures_total",
            r#"protocol="mqtt",method="none",reason="missing""#,
        ) >= 1.0
    })
    .await;
    assert!(failures);
}
