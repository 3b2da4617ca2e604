//! Unit tests of loading and validation.
use super::*;
use std::path::PathBuf;

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

#[test]
fn empty_file_is_the_defaults() {
    let c = Config::from_toml_str("", "t", no_env()).unwrap();
    assert_eq!(c, Config::default());
    assert_eq!(c.http.listen, "127.0.0.1:8080");
    assert_eq!(c.admin.listen, "127.0.0.1:9090");
    assert_eq!(c.log.data_dir, PathBuf::from("./data"));
    assert!(c.streams.auto_create);
}

#[test]
fn reports_every_problem_with_its_path() {
    let text = r#"
        [http]
        listen = "nowhere"
        [log]
        segment_bytes = 10
        [streams.defaults]
        partitions = 0
        [streams.declare."bad name"]
        max_event_bytes = 999999999
    "#;
    let Err(ConfigError::Invalid(problems)) = Config::from_toml_str(text, "t", no_env()) else {
        panic!("expected invalid config");
    };
    let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
    assert!(paths.contains(&"http.listen"), "{paths:?}");
    assert!(paths.contains(&"log.segment_bytes"), "{paths:?}");
    assert!(paths.contains(&"streams.defaults.partitions"), "{paths:?}");
    assert!(paths.contains(&"streams.declare.bad name"), "{paths:?}");
    assert!(
        paths.contains(&"streams.declare.bad name.max_event_bytes"),
        "{paths:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.message.contains("only a-z, A-Z, 0-9")),
        "{problems:?}"
    );
}

fn problems(text: &str) -> Vec<Problem> {
    match Config::from_toml_str(text, "t", no_env()) {
        Err(ConfigError::Invalid(p)) => p,
        other => panic!("expected invalid config, got {other:?}"),
    }
}

#[test]
fn kafka_settings_parse_with_their_defaults() {
    let text = r#"
        [log]
        kind = "kafka"
        [log.kafka]
        bootstrap_servers = "k1:9092, k2:9093"
        topic = "sluice.{stream}"
        compression = "lz4"
        [log.kafka.security]
        protocol = "sasl_ssl"
        sasl_mechanism = "SCRAM-SHA-512"
        sasl_username = "gw"
        sasl_password = "s3cret-s3cret"
        [log.kafka.overrides]
        "socket.keepalive.enable" = "true"
    "#;
    let c = Config::from_toml_str(text, "t", no_env()).unwrap();
    assert_eq!(c.log.kind, LogKind::Kafka);
    let k = &c.log.kafka;
    assert_eq!(k.compression, KafkaCompression::Lz4);
    assert_eq!(k.topic, "sluice.{stream}");
    assert_eq!(k.linger_ms, KafkaConfig::default().linger_ms);
    assert_eq!(
        k.security.sasl_mechanism,
        Some(KafkaSaslMechanism::ScramSha512)
    );
    assert!(!format!("{k:?}").contains("s3cret"), "password printed");
    assert_eq!(KafkaConfig::default().compression, KafkaCompression::Zstd);
}

#[test]
fn kafka_conflicts_and_gaps_are_rejected_with_their_paths() {
    let p = problems(
        r#"
        [log]
        kind = "kafka"
        [log.kafka]
        bootstrap_servers = "nohost"
        topic = "events"
        message_timeout_ms = 0
        [log.kafka.security]
        protocol = "sasl_plaintext"
        ssl_ca_file = "/ca.pem"
        [log.kafka.overrides]
        "enable.idempotence" = "false"
        "acks" = "1"
        "linger.ms" = "5"
        "delivery.report.only.error" = "true"
    "#,
    );
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    for want in [
        "log.kafka.bootstrap_servers",
        "log.kafka.topic",
        "log.kafka.message_timeout_ms",
        "log.kafka.security.sasl_mechanism",
        "log.kafka.security",
        "log.kafka.overrides.\"enable.idempotence\"",
        "log.kafka.overrides.\"acks\"",
        "log.kafka.overrides.\"linger.ms\"",
        "log.kafka.overrides.\"delivery.report.only.error\"",
    ] {
        assert!(paths.contains(&want), "{want} missing from {p:#?}");
    }
    let linger = p.iter().find(|p| p.path.contains("linger.ms")).unwrap();
    assert!(linger.message.contains("log.kafka.linger_ms"), "{linger:?}");
}

#[test]
fn idempotence_may_be_off_only_when_no_stream_acks_durably() {
    let base = r#"
        [log]
        kind = "kafka"
        [log.kafka.overrides]
        "enable.idempotence" = "false"
        "acks" = "1"
        [streams.defaults]
        ack = "received"
    "#;
    Config::from_toml_str(base, "t", no_env()).unwrap();
    let p = problems(&format!(
        "{base}\n[streams.declare.audit]\nack = \"durable\"\n"
    ));
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p[0].message.contains("durabl"), "{p:#?}");
    // The same overrides are not checked while the embedded log is in use.
    Config::from_toml_str(
        &base.replace("kind = \"kafka\"", "kind = \"embedded\""),
        "t",
        no_env(),
    )
    .unwrap();
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let Err(ConfigError::Invalid(p)) =
        Config::from_toml_str("[http]\nlisten_addr = \"x\"\n", "f.toml", no_env())
    else {
        panic!("expected invalid config");
    };
    assert_eq!(p.len(), 1);
    assert!(p[0].message.contains("listen_addr"), "{:?}", p[0]);
}

#[test]
fn type_errors_in_several_sections_are_all_reported() {
    let text = "[http]\nlisten = 5\n[log]\nsegment_bytes = \"big\"\n[extra]\n";
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str(text, "f.toml", no_env()) else {
        panic!("expected invalid config");
    };
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, vec!["extra", "http", "log"], "{p:?}");
    assert!(p[1].message.contains("string"), "{:?}", p[1]);
}

#[test]
fn syntax_errors_name_the_file_and_line() {
    let Err(ConfigError::Invalid(p)) =
        Config::from_toml_str("[http\nlisten = 1\n", "f.toml", no_env())
    else {
        panic!("expected invalid config");
    };
    assert_eq!(p[0].path, "f.toml");
    assert!(p[0].message.contains("line 1"), "{:?}", p[0]);
}

#[test]
fn environment_overrides_file_values() {
    let env = vec![
        ("SLUICE_HTTP__LISTEN".to_string(), "127.0.0.1:0".to_string()),
        (
            "SLUICE_STREAMS__AUTO_CREATE".to_string(),
            "false".to_string(),
        ),
        (
            "SLUICE_STREAMS__DEFAULTS__PARTITIONS".to_string(),
            "3".to_string(),
        ),
        ("SLUICE_LOG__DATA_DIR".to_string(), "/tmp/x".to_string()),
        ("SLUICE_UNRELATED".to_string(), "ignored".to_string()),
    ];
    let c = Config::from_toml_str("[http]\nlisten = \"127.0.0.1:1\"\n", "t", env).unwrap();
    assert_eq!(c.http.listen, "127.0.0.1:0");
    assert!(!c.streams.auto_create);
    assert_eq!(c.streams.defaults.partitions, 3);
    assert_eq!(c.log.data_dir, PathBuf::from("/tmp/x"));
}

#[test]
fn environment_typos_are_reported() {
    let env = vec![("SLUICE_HTTP__LISTN".to_string(), "x".to_string())];
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str("", "t", env) else {
        panic!("expected invalid config");
    };
    assert!(p[0].message.contains("listn"), "{p:?}");
}

#[test]
fn declared_streams_override_defaults() {
    let text = r#"
        [streams.defaults]
        ack = "durable"
        partitions = 2
        [streams.declare.fast]
        ack = "received"
    "#;
    let c = Config::from_toml_str(text, "t", no_env()).unwrap();
    let fast = c.streams.settings("fast");
    assert_eq!(fast.ack, AckMode::Received);
    assert_eq!(fast.partitions, 2);
    assert_eq!(c.streams.settings("other").ack, AckMode::Durable);
}

#[test]
fn anonymous_is_allowed_by_default_only_on_loopback() {
    let l = ListenerAuthConfig::default();
    assert!(l.anonymous_allowed("127.0.0.1:8080"));
    assert!(l.anonymous_allowed("[::1]:8080"));
    assert!(!l.anonymous_allowed("0.0.0.0:8080"));
    assert!(!l.anonymous_allowed("10.1.2.3:8080"));
    let explicit = ListenerAuthConfig {
        allow_anonymous: Some(false),
        ..ListenerAuthConfig::default()
    };
    assert!(!explicit.anonymous_allowed("127.0.0.1:8080"));
}

/// The transports' anonymity, by name, for `text`.
fn anonymity(text: &str) -> Vec<(&'static str, bool)> {
    let c = Config::from_toml_str(text, "t", no_env()).unwrap();
    c.producer_transports()
        .into_iter()
        .map(|t| (t.name, t.allow_anonymous))
        .collect()
}

#[test]
fn anonymity_is_decided_per_listener_and_transport() {
    // Defaults: everything on loopback, everything open to local producers.
    assert_eq!(
        anonymity(""),
        [
            ("http", true),
            ("grpc", true),
            ("mqtt", true),
            ("mqtt_ws", true)
        ]
    );
    // The HTTP listener on the network: the HTTP API and MQTT over WebSocket on it both
    // refuse anonymous producers; the MQTT TCP listener, still on loopback, does not.
    assert_eq!(
        anonymity("[http]\nlisten = \"0.0.0.0:8080\"\n"),
        [
            ("http", false),
            ("grpc", true),
            ("mqtt", true),
            ("mqtt_ws", false)
        ]
    );
    // The MQTT TLS listener on the network refuses them; the loopback TCP one does not.
    let tls =
        "[mqtt]\ntls_listen = \"0.0.0.0:8883\"\n[mqtt.tls]\ncert_file = \"c\"\nkey_file = \"k\"\n";
    assert_eq!(
        anonymity(tls),
        [
            ("http", true),
            ("grpc", true),
            ("mqtt", true),
            ("mqtts", false),
            ("mqtt_ws", true)
        ]
    );
    let c = Config::from_toml_str(tls, "t", no_env()).unwrap();
    let mqtts = c.producer_transport("mqtts").unwrap();
    assert_eq!(
        (mqtts.listen.as_str(), mqtts.listen_key),
        ("0.0.0.0:8883", "mqtt.tls_listen")
    );
}

#[test]
fn transports_of_one_listener_that_disagree_on_anonymity_are_refused() {
    for (text, ok) in [
        // MQTT allows anonymous producers where HTTP refuses them (the hole of issue 14).
        (
            "[http]\nlisten = \"0.0.0.0:8080\"\n[mqtt.auth]\nallow_anonymous = true\n",
            false,
        ),
        // MQTT refuses them where HTTP (on loopback) allows them.
        ("[mqtt.auth]\nallow_anonymous = false\n", false),
        // Either side made to agree, or MQTT over WebSocket off: accepted.
        (
            "[http.auth]\nallow_anonymous = false\n[mqtt.auth]\nallow_anonymous = false\n",
            true,
        ),
        (
            "[mqtt]\nwebsocket = false\n[mqtt.auth]\nallow_anonymous = false\n",
            true,
        ),
        ("[http.auth]\nallow_anonymous = false\n", true),
    ] {
        match Config::from_toml_str(text, "t", no_env()) {
            Ok(_) => assert!(ok, "accepted: {text}"),
            Err(ConfigError::Invalid(problems)) => {
                assert!(!ok, "refused: {text}: {problems:?}");
                assert_eq!(problems.len(), 1, "{problems:?}");
                assert_eq!(problems[0].path, "mqtt.auth.allow_anonymous");
                assert!(
                    problems[0].message.contains("would disagree"),
                    "{}",
                    problems[0].message
                );
            }
            Err(e) => panic!("{e}"),
        }
    }
    // With MQTT over WebSocket following the HTTP listener, it is as closed as HTTP.
    assert_eq!(
        anonymity("[http.auth]\nallow_anonymous = false\n"),
        [
            ("http", false),
            ("grpc", true),
            ("mqtt", true),
            ("mqtt_ws", false)
        ]
    );
}

#[test]
fn a_transport_nobody_could_use_is_named() {
    let text = "[mqtt]\ntls_listen = \"0.0.0.0:8883\"\n[mqtt.tls]\ncert_file = \"c\"\nkey_file = \"k\"\n[mqtt.auth]\nmethods = []\n";
    let Err(ConfigError::Invalid(problems)) = Config::from_toml_str(text, "t", no_env()) else {
        panic!("expected invalid config");
    };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].path, "mqtt.auth.methods");
    assert!(
        problems[0]
            .message
            .contains("mqtt.tls_listen (0.0.0.0:8883)"),
        "{}",
        problems[0].message
    );
}

#[test]
fn auth_settings_are_validated() {
    let text = r#"
        [http.tls]
        cert_file = "c.pem"
        key_file = "k.pem"
        client_auth = "required"
        [[auth.api_keys]]
        id = "a.b"
        secret_sha256 = "XYZ"
        principal = "p"
        streams = ["*"]
        expires_at = "tomorrow"
        [[auth.jwt.issuers]]
        issuer = "i"
        audiences = []
        algorithms = ["HS256", "none"]
    "#;
    let Err(ConfigError::Invalid(p)) = Config::from_toml_str(text, "t", no_env()) else {
        panic!("expected invalid config");
    };
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    for want in [
        "http.tls.client_ca_file",
        "auth.api_keys[0].id",
        "auth.api_keys[0].secret_sha256",
        "auth.api_keys[0].expires_at",
        "auth.jwt.issuers[0].audiences",
        "auth.jwt.issuers[0].algorithms",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    assert!(
        p.iter()
            .any(|p| p.message.contains("HS256 needs hs256_secret")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|p| p.message.contains("`none` is not one of")),
        "{p:?}"
    );
}

#[test]
fn secrets_are_redacted_in_debug_output() {
    let s = Secret("hunter2-hunter2-hunter2-hunter2-x".into());
    assert!(!format!("{s:?}").contains("hunter2"));
}

#[test]
fn stream_names_follow_kafka_rules() {
    assert!(check_stream_name("orders.v1-eu_2").is_ok());
    assert_eq!(check_stream_name(""), Err(StreamNameError::Empty));
    assert_eq!(check_stream_name("."), Err(StreamNameError::Dots));
    assert_eq!(check_stream_name(".."), Err(StreamNameError::Dots));
    assert_eq!(check_stream_name("a/b"), Err(StreamNameError::BadChar('/')));
    assert!(check_stream_name(&"a".repeat(249)).is_ok());
    assert_eq!(
        check_stream_name(&"a".repeat(250)),
        Err(StreamNameError::TooLong(250))
    );
}

#[test]
fn the_secure_example_allows_no_anonymous_producer_anywhere() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/secure.toml");
    let c = Config::load(Some(&path), no_env()).unwrap();
    let transports = c.producer_transports();
    let names: Vec<&str> = transports.iter().map(|t| t.name).collect();
    assert_eq!(names, ["http", "grpc", "mqtts", "mqtt_ws"]);
    for t in &transports {
        assert!(!t.allow_anonymous, "{t:?}");
    }
    // Explicitly so: moved to a loopback address, nothing opens up.
    let env = [
        ("SLUICE_HTTP__LISTEN", "127.0.0.1:0"),
        ("SLUICE_GRPC__LISTEN", "127.0.0.1:0"),
        ("SLUICE_MQTT__TLS_LISTEN", "127.0.0.1:0"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let c = Config::load(Some(&path), env).unwrap();
    assert!(c.producer_transports().iter().all(|t| !t.allow_anonymous));
}

/// Replays the `config_loader` fuzz target's seed corpus (config/fuzz/corpus): `ok-*` seeds
/// are accepted, `bad-*` seeds refused, none panics.
#[test]
fn fuzz_corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config_loader");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("the seed corpus exists") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let accepted = fuzz_check(&text);
        if name.starts_with("ok-") {
            assert!(accepted, "{name} should be accepted");
        } else if name.starts_with("bad-") {
            assert!(!accepted, "{name} should be refused");
        }
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} seeds");
}

/// Every property Sluice sets for the producer is one an override may not set (or, for the
/// guarantees, may set only to Sluice's own value), so the two lists cannot drift apart.
#[test]
fn managed_kafka_properties_and_refused_overrides_agree() {
    let mut k = KafkaConfig::default();
    k.security.sasl_mechanism = Some(KafkaSaslMechanism::ScramSha512);
    k.security.sasl_username = Some("u".into());
    k.security.sasl_password = Some(Secret("p".into()));
    k.security.ssl_ca_file = Some("ca.pem".into());
    k.security.ssl_cert_file = Some("c.pem".into());
    k.security.ssl_key_file = Some("k.pem".into());
    k.security.ssl_key_password = Some(Secret("kp".into()));
    k.security.ssl_verify_hostname = Some(true);
    let mut props = k.producer_properties();
    // OAUTHBEARER sets its own properties instead of the username and password.
    let mut o = k.clone();
    o.security.sasl_mechanism = Some(KafkaSaslMechanism::OauthBearer);
    o.security.sasl_username = None;
    o.security.sasl_password = None;
    o.security.oauthbearer_token_endpoint_url = Some("https://idp/token".into());
    o.security.oauthbearer_client_id = Some("gw".into());
    o.security.oauthbearer_client_secret = Some(Secret("s".into()));
    o.security.oauthbearer_scope = Some("kafka".into());
    o.security
        .oauthbearer_extensions
        .insert("logicalCluster".into(), "lkc-1".into());
    props.extend(o.producer_properties());
    for (key, value) in &props {
        match key.as_str() {
            // Guarantees: refused only when weakened while a stream acks durably.
            "enable.idempotence" | "acks" => {
                assert!(kafka_override_conflict(key, value, true).is_none(), "{key}");
                let weaker = if key == "acks" { "1" } else { "false" };
                assert!(
                    kafka_override_conflict(key, weaker, true).is_some(),
                    "{key}"
                );
            }
            // Tunable by an override on purpose (documented in docs/kafka.md).
            "statistics.interval.ms" => {
                assert!(kafka_override_conflict(key, "0", true).is_none())
            }
            _ => assert!(
                kafka_override_conflict(key, value, true).is_some(),
                "`{key}` is set by Sluice but an override could replace it"
            ),
        }
    }
    // And every managed property is one Sluice actually sets (or an alias of one).
    let set: std::collections::HashSet<&str> = props.iter().map(|(k, _)| k.as_str()).collect();
    for (key, instead) in KAFKA_MANAGED_PROPERTIES {
        let alias = matches!(
            *key,
            "metadata.broker.list"
                | "compression.type"
                | "queue.buffering.max.ms"
                | "delivery.timeout.ms"
                | "sasl.mechanisms"
                | "partitioner"
        );
        assert!(
            set.contains(key) || alias,
            "{key} ({instead}) is refused but never set"
        );
    }
}

#[test]
fn every_example_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // Schema files are named from the repository root (where the examples say to run);
            // this test runs in config/.
            let text = std::fs::read_to_string(&path)
                .unwrap()
                .replace("\"config/examples/", &format!("\"{}/", dir.display()));
            Config::from_toml_str(&text, &path.display().to_string(), no_env())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2, "expected example configs in {}", dir.display());
}

#[test]
fn two_listeners_on_one_address_are_refused_whichever_they_are() {
    // Every pair of listeners goes through the one check, MQTT's included; a disabled
    // listener's address does not count, and port 0 (a free port for each) never collides.
    let cases = [
        (
            "[admin]\nlisten = \"127.0.0.1:8080\"\n",
            "admin.listen",
            "http.listen",
        ),
        (
            "[grpc]\nlisten = \"127.0.0.1:9090\"\n",
            "grpc.listen",
            "admin.listen",
        ),
        (
            "[mqtt]\nlisten = \"127.0.0.1:8080\"\n",
            "mqtt.listen",
            "http.listen",
        ),
        (
            "[grpc]\nlisten = \"127.0.0.1:1883\"\n",
            "mqtt.listen",
            "grpc.listen",
        ),
        (
            "[mqtt]\ntls_listen = \"127.0.0.1:1883\"\n[mqtt.tls]\ncert_file = \"c\"\nkey_file = \"k\"\n",
            "mqtt.tls_listen",
            "mqtt.listen",
        ),
    ];
    for (text, path, other) in cases {
        let p = problems(text);
        let hit: Vec<_> = p.iter().filter(|p| p.path == path).collect();
        assert_eq!(hit.len(), 1, "{text}: {p:?}");
        assert!(
            hit[0].message.contains(&format!("is also {other}")),
            "{text}: {p:?}"
        );
    }
    for text in [
        "[grpc]\nenabled = false\nlisten = \"127.0.0.1:8080\"\n",
        "[mqtt]\nenabled = false\nlisten = \"127.0.0.1:8080\"\n",
        "[mqtt]\nplaintext = false\nwebsocket = true\nlisten = \"127.0.0.1:8080\"\n",
        "[http]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[grpc]\nlisten = \"127.0.0.1:0\"\n",
    ] {
        if let Err(e) = Config::from_toml_str(text, "t", no_env()) {
            panic!("{text}: {e}");
        }
    }
}

#[test]
fn dedup_settings_parse_override_and_are_validated() {
    let c = Config::from_toml_str(
        "[streams.defaults]\ndedup = true\ndedup_window_ms = 1000\n[streams.declare.a]\ndedup_keys = [\"id\"]\n[streams.declare.b]\ndedup = false\n[dedup]\nmax_entries = 5\n",
        "t",
        no_env(),
    )
    .unwrap();
    let a = c.streams.settings("a");
    assert!(a.dedup && a.dedup_keys.id && !a.dedup_keys.idempotency_key);
    assert!(!a.dedup_keys.mqtt_packet);
    assert!(c.streams.settings("other").dedup_keys.mqtt_packet);
    assert_eq!(a.dedup_window_ms, 1000);
    assert!(!c.streams.settings("b").dedup);
    assert!(c.streams.settings("other").dedup_keys.idempotency_key);
    assert_eq!(c.dedup.max_entries, 5);

    let paths: Vec<String> = problems(
        "[streams.defaults]\ndedup = true\ndedup_window_ms = 0\ndedup_window_events = 10\ndedup_principal_events = 11\ndedup_keys = []\n[dedup]\nmax_entries = 0\n",
    )
    .into_iter()
    .map(|p| p.path)
    .collect();
    assert_eq!(
        paths,
        [
            "streams.defaults.dedup_window_ms",
            "streams.defaults.dedup_principal_events",
            "streams.defaults.dedup_keys",
            "dedup.max_entries",
        ]
    );
    let unknown = problems("[streams.defaults]\ndedup_keys = [\"mqtt\"]\n");
    assert!(
        unknown[0].message.contains("unknown dedup key `mqtt`"),
        "{unknown:?}"
    );
}

#[test]
fn a_kafka_linger_past_the_drain_deadline_is_refused_when_streams_ack_on_receipt() {
    let base =
        "[log]\nkind = \"kafka\"\n[log.kafka]\nbootstrap_servers = \"k:9092\"\nlinger_ms = 10000\n";
    let p = problems(&format!("{base}[streams.defaults]\nack = \"received\"\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].path, "log.kafka.linger_ms");
    assert!(
        p[0].message.contains("server.shutdown_timeout_ms (10000)"),
        "{p:?}"
    );
    // Durable streams ack after delivery: the linger only delays them.
    assert!(Config::from_toml_str(base, "t", no_env()).is_ok());
}

#[test]
fn cors_origins_are_checked() {
    let ok = Config::from_toml_str(
        "[http.cors]\nallowed_origins = [\"https://app.example.com\", \"https://*.example.com:8443\", \"http://127.0.0.1:3000\"]\nallow_credentials = true\n",
        "t",
        no_env(),
    );
    assert!(ok.is_ok(), "{ok:?}");
    let bad = problems(
        "[http.cors]\nallowed_origins = [\"*\", \"app.example.com\", \"https://app.example.com/\", \"https://a.*.example.com\"]\nallow_credentials = true\nallowed_methods = [\"post\"]\n",
    );
    let paths: Vec<&str> = bad.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths
            .iter()
            .filter(|p| **p == "http.cors.allowed_origins")
            .count(),
        3,
        "{bad:?}"
    );
    assert!(paths.contains(&"http.cors.allow_credentials"), "{bad:?}");
    assert!(paths.contains(&"http.cors.allowed_methods"), "{bad:?}");
}

#[test]
fn spooled_acks_need_kafka_and_a_spool_bound_of_at_least_two_segments_per_partition() {
    let p = problems(
        r#"
        [streams.defaults]
        ack = "spooled"
    "#,
    );
    assert!(
        p.iter()
            .any(|p| p.path == "streams.defaults.ack" && p.message.contains("log.kind")),
        "{p:?}"
    );
    let p = problems(
        r#"
        [log]
        kind = "kafka"
        [log.kafka]
        bootstrap_servers = "k:9092"
        [log.spool]
        segment_bytes = 1048576
        [streams.declare.orders]
        ack = "spooled"
        partitions = 4
        spool_max_bytes = 4194304
    "#,
    );
    assert!(
        p.iter()
            .any(|p| p.path == "streams.declare.orders.spool_max_bytes"
                && p.message.contains("8388608")),
        "{p:?}"
    );
    let c = Config::from_toml_str(
        r#"
        [log]
        kind = "kafka"
        [log.kafka]
        bootstrap_servers = "k:9092"
        [log.spool]
        max_bytes = 1073741824
        forward_rate = 5000
        [streams.defaults]
        ack = "spooled"
        spool_max_age_ms = 600000
        [streams.declare.audit]
        ack = "replicated"
    "#,
        "t",
        no_env(),
    )
    .unwrap();
    assert!(c.any_spooled_stream() && c.any_durable_stream());
    assert_eq!(c.log.spool.forward_rate, 5000);
    assert_eq!(c.streams.settings("x").spool_max_age_ms, 600_000);
    assert_eq!(c.streams.settings("audit").ack, AckMode::Durable);
}

#[test]
fn proxy_settings_parse_and_are_checked() {
    let c = Config::from_toml_str(
        r#"
        [http.proxy]
        protocol = true
        trusted_proxies = ["10.0.0.0/8", "::1", "192.168.1.7"]
        forwarded_headers = true
        "#,
        "t",
        no_env(),
    )
    .unwrap();
    let p = &c.http.proxy;
    assert!(p.protocol && p.forwarded_headers);
    assert!(p.trusts("10.200.3.4".parse().unwrap()));
    assert!(p.trusts("::ffff:10.0.0.1".parse().unwrap()));
    assert!(p.trusts("::1".parse().unwrap()));
    assert!(p.trusts("192.168.1.7".parse().unwrap()));
    assert!(!p.trusts("192.168.1.8".parse().unwrap()));
    assert!(!p.trusts("11.0.0.1".parse().unwrap()));
    assert!(
        "0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("8.8.8.8".parse().unwrap())
    );

    let err = Config::from_toml_str(
        "[http.proxy]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
        "t",
        no_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("prefix length must be 0 to 32"), "{err}");
    let err = Config::from_toml_str("[http.proxy]\nforwarded_headers = true\n", "t", no_env())
        .unwrap_err()
        .to_string();
    assert!(err.contains("trusts no hop"), "{err}");
    let err = Config::from_toml_str(
        "[grpc.proxy]\nforwarded_headers = true\ntrusted_proxies = [\"10.0.0.1\"]\n",
        "t",
        no_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("forwarding headers are HTTP's"), "{err}");
}

#[test]
fn a_cluster_wide_quota_needs_redis_as_the_state_store() {
    let rule = "[[quotas.rules]]\nscope = \"stream\"\nevents_per_sec = 10\ncluster = true\n";
    let p = problems(rule);
    assert!(
        p.iter()
            .any(|p| p.path == "quotas.rules[0].cluster" && p.message.contains("dedup.store")),
        "{p:?}"
    );
    Config::from_toml_str(
        &format!("{rule}[dedup]\nstore = \"redis\"\n"),
        "t",
        no_env(),
    )
    .expect("with Redis it is valid");
    let p = problems("[quotas.cluster]\ngateways = 0\nlease_ms = 60000\n");
    let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["quotas.cluster.gateways", "quotas.cluster.lease_ms"]
    );
}

#[test]
fn oauthbearer_needs_its_endpoint_and_client_credentials_and_nothing_else() {
    let base = "[log]\nkind = \"kafka\"\n[log.kafka]\nbootstrap_servers = \"k:9092\"\n[log.kafka.security]\nprotocol = \"sasl_ssl\"\n";
    let c = Config::from_toml_str(
        &format!(
            "{base}sasl_mechanism = \"OAUTHBEARER\"\noauthbearer_token_endpoint_url = \"https://idp/token\"\noauthbearer_client_id = \"gw\"\noauthbearer_client_secret = \"s\"\noauthbearer_extensions = {{ logicalCluster = \"lkc-1\" }}\n"
        ),
        "t",
        no_env(),
    )
    .expect("a complete OAUTHBEARER setting");
    assert_eq!(
        c.log.kafka.security.sasl_mechanism,
        Some(KafkaSaslMechanism::OauthBearer)
    );
    assert!(
        !format!("{:?}", c.log.kafka.security).contains("\"s\""),
        "the client secret is redacted"
    );
    let messages =
        |text: &str| -> Vec<String> { problems(text).into_iter().map(|p| p.message).collect() };
    let m = messages(&format!("{base}sasl_mechanism = \"OAUTHBEARER\"\n"));
    assert!(
        m.iter()
            .any(|m| m.contains("oauthbearer_token_endpoint_url")),
        "{m:?}"
    );
    let m = messages(&format!(
        "{base}sasl_mechanism = \"OAUTHBEARER\"\noauthbearer_token_endpoint_url = \"ftp://x\"\noauthbearer_client_id = \"gw\"\noauthbearer_client_secret = \"s\"\nsasl_username = \"u\"\nsasl_password = \"p\"\n"
    ));
    assert!(m.iter().any(|m| m.contains("http(s)://")), "{m:?}");
    assert!(m.iter().any(|m| m.contains("not sasl_username")), "{m:?}");
    let m = messages(&format!(
        "{base}sasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"\nsasl_password = \"p\"\noauthbearer_client_id = \"gw\"\n"
    ));
    assert!(
        m.iter()
            .any(|m| m.contains("need sasl_mechanism = \"OAUTHBEARER\"")),
        "{m:?}"
    );
}

#[test]
fn traces_parse_with_their_defaults_and_refuse_what_cannot_work() {
    let c = Config::from_toml_str("", "t", no_env()).unwrap();
    assert!(!c.telemetry.traces.enabled, "off unless asked for");
    let c = Config::from_toml_str(
        "[telemetry.traces]\nenabled = true\notlp_endpoint = \"https://collector:4317\"\n",
        "t",
        no_env(),
    )
    .unwrap();
    let t = &c.telemetry.traces;
    assert_eq!(t.sampling_ratio, 0.01);
    assert!(t.parent_based);
    assert_eq!(t.service_name, "sluice");
    assert_eq!((t.max_queued_spans, t.max_export_batch), (8192, 512));

    let paths: Vec<String> = problems(
        "[telemetry.traces]\nenabled = true\nsampling_ratio = 1.5\notlp_endpoint = \"collector:4317\"\n\
         service_name = \" \"\nexport_timeout_ms = 0\nmax_queued_spans = 10\nmax_export_batch = 11\n",
    )
    .into_iter()
    .map(|p| p.path)
    .collect();
    for k in [
        "sampling_ratio",
        "otlp_endpoint",
        "service_name",
        "export_timeout_ms",
        "max_export_batch",
    ] {
        assert!(
            paths.contains(&format!("telemetry.traces.{k}")),
            "{k} not refused: {paths:?}"
        );
    }
    assert_eq!(paths.len(), 5, "{paths:?}");
    let unknown = problems("[telemetry.traces]\nendpoint = \"http://c:4317\"\n");
    assert_eq!(unknown.len(), 1, "{unknown:?}");
}
