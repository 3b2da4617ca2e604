//! The client libraries against the real binary: clients/js (@sluice/client) under Node.js
//! (`node --test`: HTTP publish, dedup of a retried request, network retries with the same ids,
//! waiting out 429s, the batcher, the offline queue, WebSocket acks and reconnects) and
//! clients/python (sluice_client, `unittest`: the same contract); what they published is read
//! back from the log. The same JS client drives the browser example page (browser.rs).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_tests::{OutputWithin, Sluice, api_key_entry, read_log};

const KEY: &str = "clients.s3cret-key";

fn config() -> String {
    format!(
        r#"
[http.auth]
allow_anonymous = false
[streams.declare.js]
dedup = true
[streams.declare.py]
dedup = true
[[quotas.rules]]
scope = "stream"
streams = "limited"
events_per_sec = 2
burst_events = 2
{}"#,
        api_key_entry(KEY, "apps", &["*"])
    )
}

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn values(log: &[serde_json::Value]) -> Vec<String> {
    log.iter()
        .map(|r| r["value"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn count(values: &[String], v: &str) -> usize {
    values.iter().filter(|x| *x == &format!("{v:?}")).count()
}

#[test]
fn js_client_under_node() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config()).unwrap();
    let out = Command::new("node")
        .args(["--experimental-websocket", "--test", "--test-reporter=spec"])
        .arg("test/")
        .current_dir(root().join("clients/js"))
        .env("SLUICE_HTTP", s.http.to_string())
        .env("SLUICE_KEY", KEY)
        .output_within(Duration::from_secs(120))
        .expect("node (scripts/install-deps.sh --for-tests installs Node.js)");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "node --test failed:\n{report}");
    assert!(
        report.contains("pass 8") && report.contains("fail 0"),
        "every test ran:\n{report}"
    );

    let js = values(&read_log(&s.data_dir, "js", &[]).unwrap());
    // The retried request and the request retried after network failures: stored once each.
    assert_eq!(count(&js, "lost-1"), 1, "{js:?}");
    assert_eq!(count(&js, "lost-2"), 1, "{js:?}");
    assert_eq!(count(&js, "after-network-trouble"), 1, "{js:?}");
    assert_eq!(count(&js, "queued-1"), 1, "{js:?}");
    assert_eq!(count(&js, "ws-after-reconnect"), 1, "{js:?}");
    assert_eq!(js.iter().filter(|v| v.contains("batched")).count(), 250);
    assert_eq!(read_log(&s.data_dir, "limited", &[]).unwrap().len(), 6);
}

#[test]
fn python_client_against_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sluice::start(&tmp.path().join("data"), &config()).unwrap();
    let out = Command::new("python3")
        .args(["-m", "unittest", "discover", "-v", "-s", "tests"])
        .current_dir(root().join("clients/python"))
        .env("SLUICE_HTTP", s.http.to_string())
        .env("SLUICE_KEY", KEY)
        .output_within(Duration::from_secs(120))
        .expect("python3");
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "unittest failed:\n{report}");
    assert!(report.contains("Ran 5 tests"), "{report}");
    let py = read_log(&s.data_dir, "py", &[]).unwrap();
    let vals = values(&py);
    assert_eq!(count(&vals, "lost-1"), 1, "{vals:?}");
    assert_eq!(count(&vals, "after-network-trouble"), 1, "{vals:?}");
    let two = py.iter().find(|r| r["id"] == "py-fixed-2").unwrap();
    assert_eq!(two["timestamp_ms"], 1_767_323_045_678i64);
    assert_eq!(read_log(&s.data_dir, "limited", &[]).unwrap().len(), 6);
}
