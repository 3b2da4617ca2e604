//! deploy/: the Prometheus alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`, Debian's prometheus package, installed by scripts/install-deps.sh),
//! and the Grafana dashboard and the alerts reference only metrics the gateway exports (read
//! from the `/metrics` of a real gateway with the embedded log and of one with the Kafka sink).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_tests::Sluice;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .expect("promtool (Debian's prometheus package; scripts/install-deps.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let out = promtool(&["check", "rules", "alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Metric names (`sluice_…`) in a PromQL-bearing text, as families: without the `_total`,
/// `_bucket`, `_sum`, `_count` and `_info` sample suffixes.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("sluice_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            let name = &text[start..end];
            let family = ["_total", "_bucket", "_sum", "_count", "_info"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(family.to_string());
        }
        i = end;
    }
    out
}

/// The metric families a gateway exports (`# TYPE` lines of its OpenMetrics text).
async fn families(s: &Sluice) -> BTreeSet<String> {
    s.metrics()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_reference_only_exported_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = Sluice::start(&dir.path().join("a"), "").unwrap();
    // The Kafka sink's metrics exist from the start, broker or not.
    let kafka = Sluice::start(
        &dir.path().join("b"),
        "[log]\nkind = \"kafka\"\n[log.kafka]\nbootstrap_servers = \"127.0.0.1:9\"\n",
    )
    .unwrap();
    let mut exported = families(&embedded).await;
    exported.extend(families(&kafka).await);
    for must in [
        "sluice_events_in",
        "sluice_ready",
        "sluice_stream_last_event_timestamp_seconds",
        "sluice_connections_opened",
        "sluice_kafka_delivery_errors",
        "sluice_mqtt_disconnects",
    ] {
        assert!(
            exported.contains(must),
            "{must} is not exported: {exported:?}"
        );
    }
    let dashboard = std::fs::read_to_string(deploy().join("grafana/sluice.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<String> = parsed["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 20, "the dashboard has its panels");
    let alerts = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    for (what, text) in [("dashboard", exprs.join("\n")), ("alerts", alerts)] {
        let used = referenced(&text);
        assert!(used.len() >= 10, "{what} uses {used:?}");
        let unknown: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
        assert!(
            unknown.is_empty(),
            "{what} references metrics the gateway does not export: {unknown:?}"
        );
    }
}
