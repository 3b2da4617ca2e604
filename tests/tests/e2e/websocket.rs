//! WebSocket ingest against the real binary with tokio-tungstenite clients: JSON and binary
//! frames, arrays, per-event acks and nacks, `/v1/ws` frames that name their stream,
//! credentials (header, query, subprotocol) checked before the upgrade, Origin allow-list, close
//! codes (1009 too large, 1008 stalled reader, 1001 idle, 1013 log unavailable, 1011 internal),
//! many sockets.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sluice_tests::{Sluice, api_key_entry, read_log};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

fn url(s: &Sluice, path: &str) -> String {
    format!("ws://{}{path}", s.http)
}

async fn connect(s: &Sluice, path: &str) -> Ws {
    connect_async(url(s, path)).await.unwrap().0
}

/// The next JSON answer (skipping pings).
async fn answer(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("an answer within 30 s")
            .expect("socket open")
            .expect("a frame");
        match m {
            Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads until the server's close frame; its code.
async fn close_code(ws: &mut Ws) -> CloseCode {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a close within 30 s")
        {
            Some(Ok(Message::Close(Some(f)))) => return f.code,
            Some(Ok(Message::Close(None))) => panic!("close without a code"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket failed before a close frame: {e}"),
            None => panic!("socket ended without a close frame"),
        }
    }
}

/// The HTTP status of a refused upgrade.
async fn refused(req: impl IntoClientRequest + Unpin) -> u16 {
    match connect_async(req).await {
        Err(WsError::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

#[tokio::test]
async fn json_and_binary_frames_are_acked_per_event_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let mut ws = connect(&s, "/v1/streams/web/ws").await;
    ws.send(Message::text(
        r#"{"id":"a","value":{"t":1},"key":"k","headers":{"h":"v"}}"#,
    ))
    .await
    .unwrap();
    assert_eq!(
        answer(&mut ws).await,
        json!({"seq": 0, "index": 0, "id": "a", "partition": 0, "offset": 0})
    );
    ws.send(Message::text(
        r#"[{"id":"b","value":1},{"value":"two"},{"id":"d","value":[3]}]"#,
    ))
    .await
    .unwrap();
    for (i, id) in [json!("b"), Value::Null, json!("d")]
        .into_iter()
        .enumerate()
    {
        let a = answer(&mut ws).await;
        assert_eq!(
            a,
            json!({"seq": 1, "index": i, "id": id, "partition": 0, "offset": i + 1})
        );
    }
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(answer(&mut ws).await["offset"], 4);
    // Malformed JSON: a nack for the frame; the socket goes on.
    ws.send(Message::text("{not json")).await.unwrap();
    let nack = answer(&mut ws).await;
    assert_eq!(nack["seq"], 3);
    assert_eq!(nack["error"]["code"], "malformed", "{nack}");
    ws.send(Message::text(r#""after""#)).await.unwrap();
    assert_eq!(answer(&mut ws).await["offset"], 5);
    ws.close(None).await.unwrap();

    let log = read_log(&s.data_dir, "web", &[]).unwrap();
    assert_eq!(log.len(), 6);
    assert_eq!(log[0]["value"], r#"{"t":1}"#);
    assert_eq!(log[0]["key"], "k");
    assert_eq!(log[0]["headers"]["h"], "v");
    assert_eq!(log[0]["headers"]["sluice-protocol"], "websocket");
    assert_eq!(log[2]["value"], r#""two""#);
    assert_eq!(log[4]["value"], "AAEC/w==");
    assert_eq!(log[4]["value_encoding"], "base64");
}

#[tokio::test]
async fn v1_ws_frames_name_their_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let mut ws = connect(&s, "/v1/ws").await;
    ws.send(Message::text(
        r#"{"stream":"one","events":[{"id":"x","value":1},{"value":2}]}"#,
    ))
    .await
    .unwrap();
    assert_eq!(answer(&mut ws).await["id"], "x");
    assert_eq!(answer(&mut ws).await["offset"], 1);
    ws.send(Message::text(r#"{"stream":"two","events":{"value":3}}"#))
        .await
        .unwrap();
    assert_eq!(answer(&mut ws).await["offset"], 0);
    for (frame, code) in [
        (Message::text(r#"{"events":[1]}"#), "malformed"),
        (
            Message::text(r#"{"stream":"bad name","events":[1]}"#),
            "malformed",
        ),
        (Message::binary(vec![1u8]), "malformed"),
    ] {
        ws.send(frame).await.unwrap();
        let nack = answer(&mut ws).await;
        assert_eq!(nack["error"]["code"], code, "{nack}");
    }
    assert_eq!(read_log(&s.data_dir, "one", &[]).unwrap().len(), 2);
    assert_eq!(read_log(&s.data_dir, "two", &[]).unwrap().len(), 1);
}

#[tokio::test]
async fn credentials_and_origins_are_checked_before_the_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "k1.secret-one-secret-one";
    let toml = format!(
        "[http.auth]\nallow_anonymous = false\n[websocket]\nallowed_origins = [\"https://app.example\"]\n{}",
        api_key_entry(key, "web-app", &["mine"])
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let base = url(&s, "/v1/streams/mine/ws");

    assert_eq!(refused(base.as_str()).await, 401);
    assert_eq!(
        refused(format!("{base}?api_key=k1.wrong-wrong-wrong")).await,
        401
    );
    assert_eq!(
        refused(url(&s, &format!("/v1/streams/other/ws?api_key={key}"))).await,
        403
    );
    let mut req = format!("{base}?api_key={key}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    assert_eq!(refused(req).await, 403);

    // Accepted three ways; the subprotocol answer is only `sluice.v1`, never the token.
    let mut by_query = connect_async(format!("{base}?api_key={key}"))
        .await
        .unwrap()
        .0;
    let mut req = base.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    req.headers_mut()
        .insert("origin", "https://app.example".parse().unwrap());
    let mut by_header = connect_async(req).await.unwrap().0;
    let mut req = base.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        format!("sluice.v1, bearer.{key}").parse().unwrap(),
    );
    let (mut by_protocol, resp) = connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "sluice.v1");
    for ws in [&mut by_query, &mut by_header, &mut by_protocol] {
        ws.send(Message::text("1")).await.unwrap();
        assert!(answer(ws).await["offset"].is_u64());
    }
    let log = read_log(&s.data_dir, "mine", &[]).unwrap();
    assert!(
        log.iter()
            .all(|e| e["headers"]["sluice-principal"] == "web-app")
    );
    // A client that offers subprotocols without `sluice.v1` is refused.
    let mut req = format!("{base}?api_key={key}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", "chat".parse().unwrap());
    assert_eq!(refused(req).await, 400);
    let m = s.metrics().await;
    assert!(
        sluice_tests::metric(
            &m,
            "sluice_auth_failures_total",
            "protocol=\"websocket\",method=\"none\",reason=\"missing\""
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn oversize_messages_close_1009_and_idle_sockets_close_1001() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[websocket]\nmax_message_bytes = 4096\nidle_timeout_ms = 500\nping_interval_ms = 0\n",
    )
    .unwrap();
    let mut ws = connect(&s, "/v1/streams/big/ws").await;
    ws.send(Message::text(format!("\"{}\"", "x".repeat(10_000))))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, CloseCode::Size);

    let mut idle = connect(&s, "/v1/streams/big/ws").await;
    assert_eq!(close_code(&mut idle).await, CloseCode::Away);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_is_closed_1008_instead_of_buffered() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[websocket]\nack_write_timeout_ms = 300\nmax_pending_frames = 64\n",
    )
    .unwrap();
    let ws = connect(&s, "/v1/streams/stall/ws").await;
    let (mut tx, mut rx) = ws.split();
    // Frames of 1,000 events each: far more acks than socket buffers hold, never read.
    let frame = format!("[{}]", vec!["1"; 1000].join(","));
    let sender = tokio::spawn(async move {
        for _ in 0..400 {
            if tx.send(Message::text(frame.clone())).await.is_err() {
                break;
            }
        }
    });
    // Stall long enough for the server's write timeout, then read what was buffered: the
    // socket ends (with a 1008 close frame when it still fit into the full socket buffer),
    // instead of the server holding every ack.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut ended, mut code, mut acks) = (false, None, 0u64);
    loop {
        match tokio::time::timeout(Duration::from_secs(30), rx.next()).await {
            Err(_) => break, // still open after 30 s of reading: not closed
            Ok(Some(Ok(Message::Close(f)))) => {
                (ended, code) = (true, f.map(|f| f.code));
                break;
            }
            Ok(Some(Ok(_))) => acks += 1,
            Ok(Some(Err(_))) | Ok(None) => {
                ended = true;
                break;
            }
        }
    }
    sender.abort();
    assert!(
        ended,
        "the stalled socket was not closed ({acks} acks read)"
    );
    assert!(
        code.is_none() || code == Some(CloseCode::Policy),
        "{code:?}"
    );
    assert!(acks < 400_000, "every ack was buffered: {acks}");
    // The session is gone too, not left holding its acks.
    let gone = sluice_tests::wait_until(Duration::from_secs(10), || async {
        let m = s.metrics().await;
        sluice_tests::metric(&m, "sluice_connections", "protocol=\"websocket\"") == 0.0
    })
    .await;
    assert!(gone, "the stalled session was not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_nack_with_retry_hints_and_an_unavailable_log_closes_1013() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[[quotas.rules]]\nstreams = \"q\"\nscope = \"stream\"\nevents_per_sec = 1\nburst_events = 2\n",
    )
    .unwrap();
    let mut ws = connect(&s, "/v1/streams/q/ws").await;
    ws.send(Message::text("[1,2,3]")).await.unwrap();
    let answers = [
        answer(&mut ws).await,
        answer(&mut ws).await,
        answer(&mut ws).await,
    ];
    assert!(
        answers[0]["offset"].is_u64() && answers[1]["offset"].is_u64(),
        "{answers:?}"
    );
    assert_eq!(answers[2]["error"]["code"], "over_quota", "{answers:?}");
    assert!(answers[2]["retry_after_ms"].as_u64().unwrap() > 0);

    let (_down, port) = sluice_tests::kafka::refused_port();
    let tmp2 = tempfile::tempdir().unwrap();
    let k = Sluice::start(
        &tmp2.path().join("data"),
        &sluice_tests::kafka::kafka_config(&format!("127.0.0.1:{port}"), ""),
    )
    .unwrap();
    let mut ws = connect(&k, "/v1/streams/x/ws").await;
    ws.send(Message::text("1")).await.unwrap();
    let nack = answer(&mut ws).await;
    assert_eq!(nack["error"]["code"], "unavailable", "{nack}");
    assert!(nack["retry_after_ms"].as_u64().is_some());
    assert_eq!(close_code(&mut ws).await, CloseCode::Again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_sockets_get_every_ack() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    const SOCKETS: usize = 40;
    const FRAMES: usize = 25;
    let tasks: Vec<_> = (0..SOCKETS)
        .map(|i| {
            let u = url(&s, "/v1/streams/many/ws");
            tokio::spawn(async move {
                let (mut ws, _) = connect_async(u).await.unwrap();
                for f in 0..FRAMES {
                    ws.send(Message::text(format!(r#"{{"id":"{i}-{f}","value":{f}}}"#)))
                        .await
                        .unwrap();
                }
                let mut offsets = Vec::new();
                for f in 0..FRAMES {
                    let a = answer(&mut ws).await;
                    assert_eq!(a["id"], format!("{i}-{f}"), "answers out of order");
                    offsets.push(a["offset"].as_u64().unwrap());
                }
                // One socket's frames of one stream are appended in the order they were sent.
                assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
                offsets
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all.dedup();
    assert_eq!(all.len(), SOCKETS * FRAMES);
    assert_eq!(
        read_log(&s.data_dir, "many", &[]).unwrap().len(),
        SOCKETS * FRAMES
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_failure_is_nacked_and_closes_1011() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // A final broker error (authorization) is an internal failure for the producer: only an
    // operator can fix it. librdkafka's mock cluster injects it.
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("locked", 1, 1).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        &sluice_tests::kafka::kafka_config(&cluster.bootstrap_servers(), "linger_ms = 1"),
    )
    .unwrap();
    assert!(s.wait_readyz(200, Duration::from_secs(30)).await);
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let mut ws = connect(&s, "/v1/streams/locked/ws").await;
    ws.send(Message::text(r#"{"id":"x","value":1}"#))
        .await
        .unwrap();
    let nack = answer(&mut ws).await;
    assert_eq!(nack["error"]["code"], "internal", "{nack}");
    assert!(nack.get("retry_after_ms").is_none(), "{nack}");
    assert_eq!(close_code(&mut ws).await, CloseCode::Error);
}

#[tokio::test]
async fn v1_ws_authorizes_every_frame_on_its_own_stream() {
    // A key for `mine.*` only: on /v1/ws (which names no stream at the upgrade), each frame is
    // authorized for the stream it names; a forbidden frame is nacked, nothing of it stored, and
    // the socket goes on.
    let tmp = tempfile::tempdir().unwrap();
    let key = "fr.frame-by-frame-secret";
    let toml = format!(
        "[http.auth]\nallow_anonymous = false\n{}",
        api_key_entry(key, "framer", &["mine.*"])
    );
    let s = Sluice::start(&tmp.path().join("data"), &toml).unwrap();
    let mut ws = connect_async(url(&s, &format!("/v1/ws?api_key={key}")))
        .await
        .unwrap()
        .0;
    for (frame, allowed) in [
        (
            r#"{"stream":"mine.a","events":[{"id":"ok-1","value":1}]}"#,
            true,
        ),
        (
            r#"{"stream":"theirs","events":[{"id":"no-1","value":2}]}"#,
            false,
        ),
        (
            r#"{"stream":"mine.b","events":[{"id":"ok-2","value":3}]}"#,
            true,
        ),
        (
            r#"{"stream":"mine","events":[{"id":"no-2","value":4}]}"#,
            false,
        ),
    ] {
        ws.send(Message::text(frame)).await.unwrap();
        let a = answer(&mut ws).await;
        if allowed {
            assert!(a["offset"].is_u64(), "{frame}: {a}");
        } else {
            assert_eq!(a["error"]["code"], "forbidden", "{frame}: {a}");
        }
    }
    assert_eq!(read_log(&s.data_dir, "mine.a", &[]).unwrap().len(), 1);
    assert_eq!(read_log(&s.data_dir, "mine.b", &[]).unwrap().len(), 1);
    for refused in ["theirs", "mine"] {
        assert!(
            read_log(&s.data_dir, refused, &[])
                .unwrap_or_default()
                .is_empty(),
            "{refused}"
        );
    }
}
