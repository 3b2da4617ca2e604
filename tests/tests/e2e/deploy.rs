//! deploy/: the Prometheus alert rules pass `promtool check rules` and their unit tests
//! (`promtool test rules`, Debian's prometheus package, installed by scripts/install-deps.sh),
//! and the Grafana dashboard and the alerts reference only metrics the gateway exports (read
//! from the `/metrics` of a real gateway with the embedded log and of one with the Kafka sink).

use sluice_tests::OutputWithin;
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
        .output_within(sluice_tests::DEADLINE)
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
    // The registry client's metrics exist once a registry is configured (none answers here).
    let embedded = Sluice::start(
        &dir.path().join("a"),
        "[schema_registry]\nurl = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    // The Kafka sink's metrics exist from the start, broker or not; the spool's with a spooled
    // stream; cluster-wide quotas' with Redis as the state store (none answers here either).
    let kafka = Sluice::start(
        &dir.path().join("b"),
        "[log]\nkind = \"kafka\"\n[log.kafka]\nbootstrap_servers = \"127.0.0.1:9\"\n[streams.defaults]\nack = \"spooled\"\n[dedup]\nstore = \"redis\"\n[dedup.redis]\nurl = \"redis://127.0.0.1:9\"\n",
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
        "sluice_spool_events",
        "sluice_schema_registry_fetches",
        "sluice_schema_registry_stale_subjects",
        "sluice_quota_cluster_degraded",
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

/// The TOML block of the ConfigMap (`sluice.toml: |`, indented four spaces).
fn configmap_toml(yaml: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in yaml.lines() {
        if line.trim_start().starts_with("sluice.toml: |") {
            inside = true;
            continue;
        }
        if inside {
            if !line.is_empty() && !line.starts_with("    ") {
                break;
            }
            out.push_str(line.strip_prefix("    ").unwrap_or(""));
            out.push('\n');
        }
    }
    out
}

fn check_config(path: &Path, env: &[(String, String)]) -> String {
    let out = Command::new(sluice_tests::binary())
        .arg("check-config")
        .arg(path)
        .envs(env.iter().cloned())
        .output_within(sluice_tests::DEADLINE)
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} does not pass check-config:\n{text}",
        path.display()
    );
    text
}

/// `number` after `key:` or `key=` on its line.
fn number_after(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let rest = l.trim().strip_prefix(key)?;
            let digits: String = rest
                .trim_start_matches([':', '=', ' '])
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no {key} in the file"))
}

#[test]
fn kubernetes_docker_and_systemd_files_fit_the_gateway() {
    let k8s = deploy().join("kubernetes");
    let read =
        |p: PathBuf| std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let dir = tempfile::tempdir().unwrap();
    // The ConfigMap's configuration, with the Secret's environment overrides, passes
    // check-config, and lists Kafka as the log (several gateways in front of one cluster).
    let toml = configmap_toml(&read(k8s.join("configmap.yaml")));
    assert!(toml.contains("kind = \"kafka\""), "{toml}");
    let cm = dir.path().join("configmap.toml");
    std::fs::write(&cm, &toml).unwrap();
    let env: Vec<(String, String)> = read(k8s.join("secret.yaml"))
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("SLUICE_")
                .map(|r| format!("SLUICE_{r}"))
        })
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect();
    assert!(!env.is_empty(), "the Secret carries SLUICE_ overrides");
    let ok = check_config(&cm, &env);
    assert!(ok.contains("log kafka"), "{ok}");
    // The container image's default configuration passes too.
    check_config(&deploy().join("docker/sluice.toml"), &[]);

    // Every port the Deployment exposes is one the configuration listens on.
    let deployment = read(k8s.join("deployment.yaml"));
    for port in ["8080", "50051", "1883", "9090"] {
        assert!(
            deployment.contains(&format!("containerPort: {port}")),
            "port {port}"
        );
        assert!(
            toml.contains(&format!("0.0.0.0:{port}")),
            "config listens on {port}"
        );
    }
    // Kubernetes waits longer than the drain may take; so does systemd for the default.
    let grace = number_after(&deployment, "terminationGracePeriodSeconds");
    let drain_ms = number_after(&toml, "shutdown_timeout_ms");
    assert!(
        grace * 1000 > drain_ms + 5_000,
        "grace {grace} s vs drain {drain_ms} ms + preStop"
    );
    let unit = read(deploy().join("systemd/sluice.service"));
    assert!(number_after(&unit, "TimeoutStopSec") * 1000 > 10_000);
    assert!(
        unit.contains("ExecStart=/usr/local/bin/sluice serve --config /etc/sluice/sluice.toml")
    );
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ConfigMap",
        "Secret",
    ] {
        let found = std::fs::read_dir(&k8s)
            .unwrap()
            .any(|e| read(e.unwrap().path()).contains(&format!("kind: {kind}")));
        assert!(found, "deploy/kubernetes has a {kind}");
    }
    let dockerfile = read(deploy().join("Dockerfile"));
    assert!(
        dockerfile.contains("USER 10001"),
        "the image runs as a non-root user"
    );
    assert_eq!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")),
        2,
        "multi-stage"
    );
}

/// Helm: `SLUICE_HELM`, else the one scripts/install-deps.sh installs, else `helm` on PATH.
fn helm() -> PathBuf {
    if let Some(h) = std::env::var_os("SLUICE_HELM") {
        return h.into();
    }
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/helm/helm");
    if ours.exists() { ours } else { "helm".into() }
}

/// Runs helm; its output, and whether it succeeded.
fn helm_run(args: &[&str]) -> (bool, String) {
    let out = Command::new(helm())
        .args(args)
        .current_dir(deploy().join("helm"))
        .output_within(sluice_tests::DEADLINE)
        .expect("helm (scripts/install-deps.sh --with-helm installs it into target/tools/helm)");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Every manifest `helm template` renders with `values` and `--set` overrides `sets`.
fn render(values: &str, sets: &[&str]) -> Vec<serde_norway::Value> {
    let mut args = vec!["template", "rel", "sluice", "-f"];
    let path = format!("sluice/{values}");
    args.push(&path);
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, text) = helm_run(&args);
    assert!(ok, "helm {args:?}:\n{text}");
    serde_norway::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("rendered YAML"))
        .filter(|v: &serde_norway::Value| !v.is_null())
        .collect()
}

/// The string at `path` (names, or indexes into sequences).
fn str_of<'a>(v: &'a serde_norway::Value, path: &[&str]) -> &'a str {
    let mut at = v;
    for p in path {
        at = match p.parse::<usize>() {
            Ok(i) => &at[i],
            Err(_) => &at[*p],
        };
    }
    at.as_str()
        .unwrap_or_else(|| panic!("no string at {path:?} in {v:?}"))
}

#[test]
fn helm_chart_lints_renders_and_its_gateways_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    for (values, kafka) in [
        ("values.yaml", false),
        ("values-embedded.yaml", false),
        ("values-kafka-fleet.yaml", true),
    ] {
        let (ok, text) = helm_run(&[
            "lint",
            "--strict",
            "sluice",
            "-f",
            &format!("sluice/{values}"),
        ]);
        assert!(ok && text.contains("0 chart(s) failed"), "{values}: {text}");
        let docs = render(values, &[]);
        let of = |kind: &str| {
            docs.iter()
                .filter(|d| d["kind"] == kind)
                .collect::<Vec<_>>()
        };
        let one = |kind: &str| {
            let v = of(kind);
            assert_eq!(v.len(), 1, "{values}: {} {kind}", v.len());
            v[0]
        };
        // The shape of each deployment: a fleet scales, is drained one at a time and is
        // stateless; the embedded log is one gateway with its volume.
        let workload = if kafka {
            for kind in ["HorizontalPodAutoscaler", "PodDisruptionBudget", "Secret"] {
                one(kind);
            }
            assert!(of("StatefulSet").is_empty());
            one("Deployment")
        } else {
            for kind in [
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "Deployment",
            ] {
                assert!(of(kind).is_empty(), "{values}: a {kind} for one gateway");
            }
            let s = one("StatefulSet");
            assert_eq!(s["spec"]["replicas"].as_u64(), Some(1), "{values}");
            assert_eq!(
                str_of(
                    s,
                    &["spec", "volumeClaimTemplates", "0", "metadata", "name"]
                ),
                "data"
            );
            s
        };
        let name = str_of(workload, &["metadata", "name"]);
        let pod = &workload["spec"]["template"];
        let c = &pod["spec"]["containers"][0];
        // Its configuration, with its environment and its Secret, passes check-config.
        let mut env: Vec<(String, String)> = c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|e| {
                Some((
                    e["name"].as_str()?.to_string(),
                    e["value"].as_str()?.to_string(),
                ))
            })
            .collect();
        if let Some(from) = c["envFrom"].as_sequence() {
            let secret = str_of(&from[0], &["secretRef", "name"]);
            let s = of("Secret")
                .into_iter()
                .find(|s| str_of(s, &["metadata", "name"]) == secret);
            let s = s.unwrap_or_else(|| panic!("{values}: envFrom names {secret}, not rendered"));
            for (k, v) in s["stringData"].as_mapping().unwrap() {
                env.push((k.as_str().unwrap().into(), v.as_str().unwrap().into()));
            }
        }
        let cm = one("ConfigMap");
        assert_eq!(
            str_of(pod, &["spec", "volumes", "0", "configMap", "name"]),
            str_of(cm, &["metadata", "name"])
        );
        let toml = dir.path().join(values.replace(".yaml", ".toml"));
        std::fs::write(&toml, str_of(cm, &["data", "sluice.toml"])).unwrap();
        let ok = check_config(&toml, &env);
        assert!(
            ok.contains(if kafka {
                "log kafka at kafka-0.kafka:9092"
            } else {
                "log embedded in /var/lib/sluice"
            }),
            "{values}: {ok}"
        );
        assert!(
            ok.contains("http 0.0.0.0:8080") && ok.contains("admin 0.0.0.0:9090"),
            "{ok}"
        );
        // Every listener is a container port and a Service port.
        let env_of = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        let ports: Vec<u64> = c["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_u64().unwrap())
            .collect();
        for key in ["HTTP", "GRPC", "MQTT", "ADMIN"] {
            let listen = env_of(&format!("SLUICE_{key}__LISTEN"));
            let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
            assert!(
                ports.contains(&port),
                "{values}: {key} listens on {port}, ports {ports:?}"
            );
        }
        // Kubernetes waits for the drain: grace > drain deadline + preStop pause.
        let grace = pod["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        let drain: u64 = env_of("SLUICE_SERVER__SHUTDOWN_TIMEOUT_MS")
            .parse()
            .unwrap();
        let pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap();
        assert!(
            grace * 1000 > drain + pause * 1000,
            "{values}: grace {grace} s, drain {drain} ms, preStop {pause} s"
        );
        assert_eq!(str_of(c, &["readinessProbe", "httpGet", "path"]), "/readyz");
        assert_eq!(str_of(c, &["livenessProbe", "httpGet", "path"]), "/healthz");
        // What selects the pods selects these pods.
        let labels = &pod["metadata"]["labels"];
        let selects = |sel: &serde_norway::Value| {
            sel.as_mapping()
                .unwrap()
                .iter()
                .all(|(k, v)| &labels[k.as_str().unwrap()] == v)
        };
        assert!(selects(&workload["spec"]["selector"]["matchLabels"]));
        for svc in of("Service") {
            assert!(selects(&svc["spec"]["selector"]), "{svc:?}");
        }
        if kafka {
            let hpa = one("HorizontalPodAutoscaler");
            assert_eq!(
                str_of(hpa, &["spec", "scaleTargetRef", "kind"]),
                "Deployment"
            );
            assert_eq!(str_of(hpa, &["spec", "scaleTargetRef", "name"]), name);
            assert!(
                workload["spec"]["replicas"].is_null(),
                "the autoscaler owns the replicas"
            );
            assert!(selects(
                &one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"]
            ));
        }
        // The ServiceMonitor (off by default: it needs the Prometheus Operator's CRD) scrapes
        // the metrics Service's `metrics` port.
        if values == "values.yaml" {
            assert!(of("ServiceMonitor").is_empty());
            continue;
        }
        let sm = one("ServiceMonitor");
        let metrics_svc = of("Service")
            .into_iter()
            .find(|s| {
                sm["spec"]["selector"]["matchLabels"]
                    .as_mapping()
                    .unwrap()
                    .iter()
                    .all(|(k, v)| &s["metadata"]["labels"][k.as_str().unwrap()] == v)
            })
            .unwrap_or_else(|| panic!("{values}: the ServiceMonitor selects no Service"));
        assert_eq!(
            str_of(metrics_svc, &["spec", "ports", "0", "name"]),
            str_of(sm, &["spec", "endpoints", "0", "port"])
        );
        assert_eq!(str_of(sm, &["spec", "endpoints", "0", "path"]), "/metrics");
    }
    // Kafka with a volume per gateway (for ack = "spooled") is a StatefulSet the autoscaler
    // scales.
    let docs = render("values-kafka-fleet.yaml", &["persistence.enabled=true"]);
    let hpa = docs
        .iter()
        .find(|d| d["kind"] == "HorizontalPodAutoscaler")
        .unwrap();
    assert_eq!(
        str_of(hpa, &["spec", "scaleTargetRef", "kind"]),
        "StatefulSet"
    );
    assert!(docs.iter().any(|d| d["kind"] == "StatefulSet"));
    // Values that cannot work fail the render with the reason.
    for (set, why) in [
        ("log.kind=bogus", "log.kind is embedded or kafka"),
        ("log.kind=kafka", "log.kafka.bootstrapServers is required"),
    ] {
        let (ok, text) = helm_run(&["template", "rel", "sluice", "--set", set]);
        assert!(!ok && text.contains(why), "{set}: {text}");
    }
}
