//! Behind a load balancer (docs/operations.md "Behind a load balancer") on the real binary:
//! the PROXY protocol (v1 and v2) on the HTTP and MQTT listeners and `X-Forwarded-For` on the
//! HTTP listener give failure limiting and per-address caps the client's address, not the
//! balancer's; headers from untrusted peers, connections without a header and forged
//! forwarding entries are not believed. Driven by raw headers and by a real HAProxy
//! (`send-proxy-v2`, `option forwardfor`) with clients on their own loopback addresses.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use reqwest::StatusCode;
use sluice_tests::haproxy::Haproxy;
use sluice_tests::http::Answer;
use sluice_tests::mqtt::{Raw, connect5, start5};
use sluice_tests::{Sluice, api_key_entry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const KEY: &str = "shop.s3cret";

fn config(proxy: &str) -> String {
    format!(
        r#"
[http]
header_read_timeout_ms = 2000
[http.auth]
allow_anonymous = false
{proxy}
[auth.failures]
max_failures = 3
window_ms = 60000
[mqtt]
max_connections_per_address = 1
[mqtt.proxy]
protocol = true
trusted_proxies = ["127.0.0.1"]
{}"#,
        api_key_entry(KEY, "shop", &["*"])
    )
}

const PROXIED_HTTP: &str = "[http.proxy]\nprotocol = true\ntrusted_proxies = [\"127.0.0.1\"]\n";

/// A TCP connection from loopback address `from` (127.0.0.0/8 is all loopback on Linux).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
    s.connect(to).await.unwrap()
}

/// One HTTP/1.1 POST on `io` with API key `key`: the status, or `None` when the gateway closed
/// the connection without answering.
async fn post_raw(mut io: TcpStream, header: &[u8], key: &str) -> Option<u16> {
    let req = format!(
        "POST /v1/streams/s/events HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\ncontent-type: text/plain\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx"
    );
    let _ = io.write_all(&[header, req.as_bytes()].concat()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), io.read_to_end(&mut out))
        .await
        .expect("the gateway answers or closes within 20 s");
    let text = String::from_utf8_lossy(&out);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
}

fn v1(client: &str) -> Vec<u8> {
    format!("PROXY TCP4 {client} 127.0.0.1 40000 8080\r\n").into_bytes()
}

fn v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1, 0x9c, 0x40, 0x1f, 0x90]);
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_protocol_names_the_client_to_failure_limits() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, mut logs) = Sluice::start_with_logs(
        &tmp.path().join("data"),
        &config(PROXIED_HTTP),
        &[("RUST_LOG", "info")],
    )
    .unwrap();

    // Three bad keys from 198.51.100.1 through the balancer: 401 each, then that client is
    // throttled (429), even with the right key …
    for _ in 0..3 {
        let io = TcpStream::connect(s.http).await.unwrap();
        assert_eq!(
            post_raw(io, &v1("198.51.100.1"), "shop.wrong").await,
            Some(401)
        );
    }
    let io = TcpStream::connect(s.http).await.unwrap();
    assert_eq!(post_raw(io, &v2([198, 51, 100, 1]), KEY).await, Some(429));
    // … while another client behind the same balancer is not.
    let io = TcpStream::connect(s.http).await.unwrap();
    assert_eq!(post_raw(io, &v2([198, 51, 100, 2]), KEY).await, Some(200));
    let io = TcpStream::connect(s.http).await.unwrap();
    assert_eq!(post_raw(io, &v1("198.51.100.3"), KEY).await, Some(200));
    // A health check's LOCAL header is the balancer itself.
    let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    local.extend_from_slice(&[0x20, 0x00, 0, 0]);
    let io = TcpStream::connect(s.http).await.unwrap();
    assert_eq!(post_raw(io, &local, KEY).await, Some(200));

    // Without a header, or from a peer that is not a trusted proxy, nothing is answered.
    let io = TcpStream::connect(s.http).await.unwrap();
    assert_eq!(post_raw(io, b"", KEY).await, None);
    let io = connect_from("127.0.0.9", s.http).await;
    assert_eq!(post_raw(io, &v1("198.51.100.4"), KEY).await, None);
    let io = TcpStream::connect(s.http).await.unwrap();
    assert_eq!(post_raw(io, b"PROXY TCP4 nonsense\r\n", KEY).await, None);
    // A peer that connects and says nothing is closed at the header deadline, not held.
    let mut quiet = TcpStream::connect(s.http).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(30), quiet.read(&mut buf))
        .await
        .expect("closed within the header read timeout");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        logs.wait_for(Duration::from_secs(10), |l| l
            .contains("authentication failed")
            && l.contains("198.51.100.1"))
            .is_some(),
        "the failures are logged with the client's address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_clients_are_told_apart_on_http_and_mqtt() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config(PROXIED_HTTP)).unwrap();
    // A second gateway behind HAProxy in HTTP mode, told the client by X-Forwarded-For.
    let forwarded = Sluice::start(
        &tmp.path().join("data2"),
        &config("[http.proxy]\nforwarded_headers = true\ntrusted_proxies = [\"127.0.0.1\"]\n"),
    )
    .unwrap();
    let lb = Haproxy::start(
        tmp.path(),
        &[
            &format!("mode tcp\nserver g {} send-proxy-v2", s.http),
            &format!("mode tcp\nserver m {} send-proxy-v2", s.mqtt.unwrap()),
            &format!(
                "mode http\noption forwardfor\n  server f {}",
                forwarded.http
            ),
        ],
    )
    .unwrap();
    let at = |i: usize| SocketAddr::from(([127, 0, 0, 1], lb.ports[i]));
    let client = |from: &str| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .local_address(from.parse::<IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let post = |c: reqwest::Client, port: u16, key: &'static str| async move {
        Answer::of(
            c.post(format!("http://127.0.0.1:{port}/v1/streams/s/events"))
                .header("x-api-key", key)
                .body("x"),
        )
        .await
        .status
    };

    // HTTP through HAProxy's TCP mode with PROXY v2, and through its HTTP mode with
    // X-Forwarded-For: 127.0.0.2's bad keys throttle 127.0.0.2 alone.
    for port in [lb.ports[0], lb.ports[2]] {
        for _ in 0..3 {
            assert_eq!(
                post(client("127.0.0.2"), port, "shop.wrong").await,
                StatusCode::UNAUTHORIZED
            );
        }
        assert_eq!(
            post(client("127.0.0.2"), port, KEY).await,
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(post(client("127.0.0.3"), port, KEY).await, StatusCode::OK);
    }
    // A throttled client cannot pass for another by sending its own X-Forwarded-For: HAProxy
    // appends the address it saw, and the gateway takes the nearest untrusted hop. (A wrong
    // key: a throttled address gets 429 without the key being checked, another would get 401;
    // the right key would pass anyway, having just authenticated from 127.0.0.3.)
    let forged = Answer::of(
        client("127.0.0.2")
            .post(format!(
                "http://127.0.0.1:{}/v1/streams/s/events",
                lb.ports[2]
            ))
            .header("x-api-key", "shop.wrong")
            .header("x-forwarded-for", "198.51.100.77")
            .body("x"),
    )
    .await;
    assert_eq!(forged.status, StatusCode::TOO_MANY_REQUESTS, "{forged:?}");

    // MQTT through HAProxy with PROXY v2 and one connection per address: a second device on
    // 127.0.0.4 is refused, one on 127.0.0.5 is not (all would share HAProxy's address
    // without the header).
    let (_first, _) = start5(
        Raw::over(connect_from("127.0.0.4", at(1)).await, true),
        connect5("dev-4a", 30),
    )
    .await;
    let mut second = Raw::over(connect_from("127.0.0.4", at(1)).await, true);
    second
        .send5(rmqtt_codec::v5::Packet::Connect(Box::new(connect5(
            "dev-4b", 30,
        ))))
        .await;
    assert!(
        second.closed().await,
        "a second connection from 127.0.0.4 is closed"
    );
    let (_other, _) = start5(
        Raw::over(connect_from("127.0.0.5", at(1)).await, true),
        connect5("dev-5", 30),
    )
    .await;
}
