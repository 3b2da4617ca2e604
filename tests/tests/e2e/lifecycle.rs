//! Process lifecycle: zero-config start, graceful drain on SIGTERM, the drain deadline, the data
//! directory lock, and `check-config`.

use sluice_tests::OutputWithin;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::{Sluice, binary, read_log, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    // Every group commit takes 1.5 s: the requests are surely in flight when SIGTERM comes, and
    // the drain must answer each of them (not cut its connection) before the process exits.
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Sluice::start(
        &tmp.path().join("data"),
        "[log]\nfault_append_delay_ms = 1500\n",
    )
    .unwrap();
    let url = s.events_url("drain");
    let requests: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let r = reqwest::Client::new()
                    .post(&url)
                    .json(&json!([format!("d{i}")]))
                    .send()
                    .await
                    .expect("an answer, not a cut connection");
                let status = r.status();
                let body: Value = r.json().await.expect("a JSON answer");
                (i, status, body)
            })
        })
        .collect();
    assert!(
        s.wait_received("http", 8.0).await,
        "all eight requests reached admission"
    );
    let t0 = Instant::now();
    let status = s.terminate().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "the process waited for the slow appends ({:?})",
        t0.elapsed()
    );
    let log = read_log(&s.data_dir, "drain", &[]).unwrap();
    for r in requests {
        let (i, status, body) = r.await.unwrap();
        assert_eq!(status, 200, "{body}");
        let o = body["results"][0]["offset"].as_u64().unwrap();
        assert_eq!(
            log[o as usize]["value"],
            format!("\"d{i}\""),
            "acked event at {o}"
        );
    }
    assert_eq!(log.len(), 8);
}

#[tokio::test]
async fn the_drain_deadline_bounds_shutdown_and_never_acks_late() {
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Sluice::start(
        &tmp.path().join("data"),
        "[server]\nshutdown_timeout_ms = 300\n[log]\nfault_append_delay_ms = 20000\n",
    )
    .unwrap();
    let url = s.events_url("late");
    let pending = tokio::spawn(async move {
        reqwest::Client::new()
            .post(&url)
            .json(&json!([1]))
            .send()
            .await
    });
    let in_flight = wait_until(Duration::from_secs(10), || async {
        sluice_tests::metric(&s.metrics().await, "sluice_in_flight_bytes", "") > 0.0
    })
    .await;
    assert!(in_flight);
    let started = std::time::Instant::now();
    let status = s.terminate().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drain took {:?}",
        started.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(1),
        "a drain cut short by its deadline exits 1"
    );
    // Not acked: answered with a retryable 503 just before the deadline, not cut off.
    let r = pending
        .await
        .unwrap()
        .expect("an answer before the process exits");
    assert_eq!(r.status(), 503, "the unfinished request must not be acked");
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn zero_config_start_uses_defaults_and_the_data_dir_is_locked() {
    let tmp = tempfile::tempdir().unwrap();
    // No --config at all: data under ./data of the working directory.
    let mut child = sluice_tests::KillOnDrop(
        Command::new(binary())
            .arg("serve")
            .current_dir(tmp.path())
            .env("SLUICE_HTTP__LISTEN", "127.0.0.1:0")
            .env("SLUICE_ADMIN__LISTEN", "127.0.0.1:0")
            // No fixed ports: gRPC and MQTT would otherwise take their defaults (50051, 1883).
            .env("SLUICE_GRPC__LISTEN", "127.0.0.1:0")
            .env("SLUICE_MQTT__LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let line =
        sluice_tests::first_line_within(child.stdout.take().unwrap(), sluice_tests::DEADLINE)
            .expect("a listening line within the deadline");
    assert!(
        line.starts_with("sluice listening: http=127.0.0.1:"),
        "{line}"
    );
    let http = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap();
    let r = reqwest::Client::new()
        .post(format!("http://{http}/v1/streams/first/events"))
        .json(&json!({"value": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(tmp.path().join("data/streams/first/0").is_dir());

    // A second gateway on the same data directory refuses to start, and says why.
    let out = Command::new(binary())
        .arg("serve")
        .current_dir(tmp.path())
        .env("SLUICE_HTTP__LISTEN", "127.0.0.1:0")
        .env("SLUICE_ADMIN__LISTEN", "127.0.0.1:0")
        // No fixed ports: gRPC and MQTT would otherwise take their defaults (50051, 1883).
        .env("SLUICE_GRPC__LISTEN", "127.0.0.1:0")
        .env("SLUICE_MQTT__LISTEN", "127.0.0.1:0")
        .output_within(sluice_tests::DEADLINE)
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn check_config_accepts_examples_and_reports_every_problem() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&examples).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        n += 1;
        // From the repository root, as the examples' relative schema paths say.
        let out = Command::new(binary())
            .arg("check-config")
            .arg(&path)
            .current_dir(examples.join("../.."))
            .output_within(sluice_tests::DEADLINE)
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));
    }
    assert!(n >= 8, "every example, schemas.toml included: {n}");
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[http]\nlisten = \"nope\"\n[streams.defaults]\npartitions = 0\nmax_event_bytes = 0\n",
    )
    .unwrap();
    let out = Command::new(binary())
        .arg("check-config")
        .arg(&bad)
        .output_within(sluice_tests::DEADLINE)
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 configuration problem(s)"), "{err}");
    for path in [
        "http.listen",
        "streams.defaults.partitions",
        "streams.defaults.max_event_bytes",
    ] {
        assert!(err.contains(path), "{path} not reported in {err}");
    }
    // Environment overrides are validated too.
    let out = Command::new(binary())
        .arg("check-config")
        .arg(examples.join("minimal.toml"))
        .env("SLUICE_STREAMS__DEFAULTS__ACK", "sometimes")
        .output_within(sluice_tests::DEADLINE)
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sometimes"));
}

#[tokio::test]
async fn retention_runs_in_the_background_and_reads_start_at_the_oldest_kept_offset() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[log]\nsegment_bytes = 4096\nretention_check_interval_ms = 20\n[streams.defaults]\nretention_bytes = 16384\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    let event = "x".repeat(500);
    for _ in 0..100 {
        let r = c
            .post(s.events_url("short"))
            .json(&json!([event]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let partition = s.data_dir.join("streams/short/0");
    let size = || -> u64 {
        std::fs::read_dir(&partition)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            let n = size();
            async move { n <= 16384 }
        })
        .await,
        "retention never brought the partition under 16 KiB ({} bytes)",
        size()
    );
    let log = read_log(&s.data_dir, "short", &[]).unwrap();
    let first = log[0]["offset"].as_u64().unwrap();
    assert!(first > 0, "old segments were deleted");
    assert_eq!(log.last().unwrap()["offset"], 99);
    assert_eq!(log.len() as u64, 100 - first);
    let m = s.metrics().await;
    assert!(sluice_tests::metric(&m, "sluice_log_segments_deleted_total", "") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_step_by_step_on_every_listener() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    // Every group commit takes 2 s: a request is in flight through the drain.
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Sluice::start(
        &tmp.path().join("data"),
        "[log]\nfault_append_delay_ms = 2000\n",
    )
    .unwrap();
    // Before the signal: a gRPC health watch (what a load balancer keeps open), an idle
    // WebSocket, and an HTTP request waiting for the log.
    let ch = tonic::transport::Channel::from_shared(s.grpc_url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = HealthClient::new(ch)
        .watch(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let next_status = async |w: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>| {
        tokio::time::timeout(Duration::from_secs(20), w.next())
            .await
            .expect("a health update within the wait")
            .map(|r| r.expect("a health message").status)
    };
    // The first update may predate the gateway's first readiness check (under load the watch
    // can be opened before it); it is Serving within the wait.
    let mut first = next_status(&mut watch).await;
    while first == Some(ServingStatus::NotServing as i32) {
        first = next_status(&mut watch).await;
    }
    assert_eq!(first, Some(ServingStatus::Serving as i32));
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/streams/w/ws", s.http))
        .await
        .unwrap();
    let url = s.events_url("drained");
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&json!(["kept"]))
            .send()
            .await
            .expect("an answer, not a cut connection")
    });
    assert!(s.wait_received("http", 1.0).await);

    s.signal("INT").unwrap();
    // 1. Not ready: /readyz 503 and gRPC health NOT_SERVING.
    assert!(s.wait_readyz(503, Duration::from_secs(10)).await);
    assert_eq!(
        next_status(&mut watch).await,
        Some(ServingStatus::NotServing as i32)
    );
    // 2. The listeners take no new connections.
    let http = s.http;
    assert!(
        wait_until(Duration::from_secs(10), || async move {
            tokio::net::TcpStream::connect(http).await.is_err()
        })
        .await,
        "the HTTP listener still accepts during the drain"
    );
    // 3. What was received is appended and answered; WebSockets close with 1001.
    let r = in_flight.await.unwrap();
    assert_eq!(r.status(), 200);
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .expect("a close within the wait")
        {
            Some(Ok(Message::Close(f))) => break f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close, Some(1001));
    // 4. Exit 0, with the answered event in the log.
    let status = s.wait_exit().unwrap();
    assert!(status.success(), "{status}");
    let log = read_log(&s.data_dir, "drained", &[]).unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0]["value"], "\"kept\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_tail_prints_what_is_there_then_follows_new_appends() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), "").unwrap();
    let c = reqwest::Client::new();
    let post = |v: &str| c.post(s.events_url("tailed")).json(&json!([v])).send();
    assert_eq!(post("before").await.unwrap().status(), 200);
    let mut tail = sluice_tests::KillOnDrop(
        Command::new(binary())
            .args(["log", "tail", "--data-dir"])
            .arg(&s.data_dir)
            .args(["--stream", "tailed"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let next = || -> Value {
        let l = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a record within the wait");
        serde_json::from_str(&l).unwrap()
    };
    assert_eq!(next()["value"], "\"before\"");
    // Appended after the tail started: printed as they come, in order, and it keeps running.
    for v in ["after-1", "after-2"] {
        assert_eq!(post(v).await.unwrap().status(), 200);
    }
    let (a, b) = (next(), next());
    assert_eq!(
        (a["value"].clone(), a["offset"].clone()),
        (json!("\"after-1\""), json!(1))
    );
    assert_eq!(
        (b["value"].clone(), b["offset"].clone()),
        (json!("\"after-2\""), json!(2))
    );
    assert!(tail.try_wait().unwrap().is_none(), "tail exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_holds_at_most_max_streams_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(
        &tmp.path().join("data"),
        "[streams]\nmax_streams = 3\nmax_streams_per_principal = 0\n",
    )
    .unwrap();
    let c = reqwest::Client::new();
    for name in ["s1", "s2", "s3"] {
        let r = c
            .post(s.events_url(name))
            .json(&json!([1]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
    }
    // The fourth stream is not created: 503 (the operator's limit, not the producer's fault);
    // the existing ones go on.
    let r = c
        .post(s.events_url("s4"))
        .json(&json!([1]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_streams"),
        "{body}"
    );
    let r = c
        .post(s.events_url("s1"))
        .json(&json!([2]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!s.data_dir.join("streams/s4").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_gets_goaway_and_its_request_in_flight_is_answered() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    // Every group commit takes 1.5 s: the first request is in flight when the drain starts.
    let tmp = tempfile::tempdir().unwrap();
    let mut s = Sluice::start(
        &tmp.path().join("data"),
        "[log]\nfault_append_delay_ms = 1500\n",
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let request = |v: &str| {
        http::Request::post(format!("http://{}/v1/streams/h2/events", s.http))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!("[\"{v}\"]"))))
            .unwrap()
    };
    let mut first_sender = sender.clone();
    let first = request("in-flight");
    let in_flight = tokio::spawn(async move { first_sender.send_request(first).await });
    assert!(s.wait_received("http", 1.0).await);
    s.signal("TERM").unwrap();
    assert!(s.wait_readyz(503, Duration::from_secs(10)).await);
    // GOAWAY: soon the connection takes no new request (the client sees it refused). A request
    // that raced the GOAWAY may still be served; then it is answered and stored like any other.
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let attempt = std::sync::atomic::AtomicUsize::new(0);
    let refused = wait_until(Duration::from_secs(10), || {
        let mut later = sender.clone();
        let v = format!(
            "late-{}",
            attempt.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        );
        let req = request(&v);
        let served = served.clone();
        async move {
            if later.ready().await.is_err() {
                return true;
            }
            match later.send_request(req).await {
                Err(_) => true,
                Ok(r) => {
                    assert_eq!(
                        r.status(),
                        200,
                        "a request on the connection was refused with a status, not GOAWAY"
                    );
                    served.lock().unwrap().push(format!("\"{v}\""));
                    false
                }
            }
        }
    })
    .await;
    assert!(
        refused,
        "the HTTP/2 connection still takes new requests during the drain"
    );
    // ...while the request in flight on it is answered.
    let resp = in_flight.await.unwrap().expect("answered, not cut off");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("\"offset\":0"),
        "{body:?}"
    );
    assert!(s.wait_exit().unwrap().success());
    let _ = conn.await;
    let log = read_log(&s.data_dir, "h2", &[]).unwrap();
    let values: Vec<String> = log
        .iter()
        .map(|r| r["value"].as_str().unwrap().to_string())
        .collect();
    let mut want = vec!["\"in-flight\"".to_string()];
    want.extend(served.lock().unwrap().iter().cloned());
    assert_eq!(values, want);
}
