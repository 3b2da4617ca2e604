//! Sluice's configuration: the TOML model, its defaults, validation that reports every error with
//! its key path, and `SLUICE_…` environment overrides.
//!
//! Every key is documented in `docs/configuration.md`; every file in `config/examples/` is loaded
//! by a test.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SLUICE_";
/// Separator between key path segments in an environment variable name.
pub const ENV_SEPARATOR: &str = "__";

/// Largest accepted `max_body_bytes`: one request is one log frame, and frames stay far below the
/// 4 GiB an offset index position can address.
pub const MAX_BODY_BYTES_LIMIT: u64 = 256 * 1024 * 1024;
/// Largest number of partitions a stream may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// The whole configuration. Every section has defaults, so an empty file (or none) is valid.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub http: HttpConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    pub streams: StreamsConfig,
    pub telemetry: TelemetryConfig,
}

/// Process-wide lifecycle settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// How long a SIGTERM/SIGINT drain may take before the process exits anyway.
    pub shutdown_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            shutdown_timeout_ms: 10_000,
        }
    }
}

/// The HTTP ingest listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to bind; port 0 picks a free port (the bound address is printed on stdout).
    pub listen: String,
    /// Open connections beyond this are closed right after accept.
    pub max_connections: usize,
    /// A client must send a request's headers within this time (HTTP/1.1).
    pub header_read_timeout_ms: u64,
    /// A client must deliver a whole request body within this time.
    pub body_read_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            max_connections: 10_000,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
        }
    }
}

/// The admin listener: `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9090".into(),
        }
    }
}

/// Which log the gateway appends to.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogKind {
    /// The embedded durable log under `data_dir`.
    #[default]
    Embedded,
}

/// The log the gateway appends to.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub kind: LogKind,
    /// Directory of the embedded log (created if missing; locked against a second process).
    pub data_dir: PathBuf,
    /// A segment rolls over once it holds this many bytes.
    pub segment_bytes: u64,
    /// A segment rolls over once its first append is this old (0 = never by age).
    pub segment_ms: u64,
    /// One offset- and time-index entry per this many bytes of log.
    pub index_interval_bytes: u64,
    /// Upper bound of bytes written by one group commit (one write + one fsync).
    pub max_group_bytes: u64,
    /// For streams with `ack = "received"`: how long written data may wait for an fsync.
    pub flush_interval_ms: u64,
    /// How often retention runs per partition.
    pub retention_check_interval_ms: u64,
    /// Fault injection for tests of backpressure: every group commit waits this long first.
    /// Never set this in production.
    pub fault_append_delay_ms: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            kind: LogKind::Embedded,
            data_dir: PathBuf::from("./data"),
            segment_bytes: 128 * 1024 * 1024,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            max_group_bytes: 8 * 1024 * 1024,
            flush_interval_ms: 1000,
            retention_check_interval_ms: 60_000,
            fault_append_delay_ms: 0,
        }
    }
}

/// Process-wide resource limits.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Bytes of events accepted but not yet written (and, for durable streams, fsynced). When it
    /// is exhausted, producers get 503 with Retry-After.
    pub max_in_flight_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_in_flight_bytes: 256 * 1024 * 1024,
        }
    }
}

/// When a producer's request counts as accepted.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// After the events are written and fsynced: they survive a crash or power loss.
    #[default]
    Durable,
    /// After the events are parsed and queued for the log: fire-and-forget.
    Received,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Durable => "durable",
            AckMode::Received => "received",
        }
    }
}

/// Settings a stream has; `[streams.defaults]` and each `[streams.declare.NAME]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    pub ack: AckMode,
    /// Partitions of a new stream; a stream's count can grow later, never shrink.
    pub partitions: u32,
    /// Largest request body, after decompression.
    pub max_body_bytes: u64,
    /// Largest single event (key + headers + value).
    pub max_event_bytes: u64,
    /// Most events in one request.
    pub max_events_per_request: u64,
    /// Delete sealed segments whose newest event is older than this (0 = keep forever).
    pub retention_ms: u64,
    /// Delete the oldest sealed segments while a partition is larger than this (0 = no limit).
    pub retention_bytes: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            ack: AckMode::Durable,
            partitions: 1,
            max_body_bytes: 8 * 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            max_events_per_request: 10_000,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: 0,
        }
    }
}

/// A declared stream's settings: each one set here overrides `[streams.defaults]`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StreamOverrides {
    pub ack: Option<AckMode>,
    pub partitions: Option<u32>,
    pub max_body_bytes: Option<u64>,
    pub max_event_bytes: Option<u64>,
    pub max_events_per_request: Option<u64>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
}

impl StreamOverrides {
    /// `defaults` with every setting this declaration names replaced.
    pub fn apply(&self, d: &StreamSettings) -> StreamSettings {
        StreamSettings {
            ack: self.ack.unwrap_or(d.ack),
            partitions: self.partitions.unwrap_or(d.partitions),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_event_bytes: self.max_event_bytes.unwrap_or(d.max_event_bytes),
            max_events_per_request: self
                .max_events_per_request
                .unwrap_or(d.max_events_per_request),
            retention_ms: self.retention_ms.unwrap_or(d.retention_ms),
            retention_bytes: self.retention_bytes.unwrap_or(d.retention_bytes),
        }
    }
}

/// Streams: which exist, how new ones are created, their settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Create a stream on its first append; when false only declared streams accept events
    /// (others get 404).
    pub auto_create: bool,
    /// Most streams the gateway will hold; creation beyond this is refused.
    pub max_streams: usize,
    pub defaults: StreamSettings,
    /// Streams with settings of their own, by name.
    pub declare: BTreeMap<String, StreamOverrides>,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            auto_create: true,
            max_streams: 1000,
            defaults: StreamSettings::default(),
            declare: BTreeMap::new(),
        }
    }
}

impl StreamsConfig {
    /// The settings of `stream`: its declaration over the defaults, or the defaults.
    pub fn settings(&self, stream: &str) -> StreamSettings {
        match self.declare.get(stream) {
            Some(o) => o.apply(&self.defaults),
            None => self.defaults,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Diagnostics output.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// A tracing filter such as `info` or `sluice=debug,hyper=warn`.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            log_level: "info".into(),
        }
    }
}

/// One problem found in a configuration, with the key path it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `streams.declare.telemetry.partitions`, or the file for syntax errors.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// A configuration that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} configuration problem(s):\n{}", .0.len(), render_problems(.0))]
    Invalid(Vec<Problem>),
}

fn render_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Loads `path` (or the defaults when `None`), applies `SLUICE_…` overrides from `env`, and
    /// validates the result.
    pub fn load<I>(path: Option<&Path>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let text = match path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                path: p.to_path_buf(),
                source,
            })?,
            None => String::new(),
        };
        let origin = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<defaults>".into());
        Self::from_toml_str(&text, &origin, env)
    }

    /// Parses `text` (named `origin` in errors), applies overrides from `env`, validates.
    pub fn from_toml_str<I>(text: &str, origin: &str, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Invalid(vec![Problem {
                path: origin.to_string(),
                message: e.to_string().trim_end().to_string(),
            }])
        })?;
        let mut problems = Vec::new();
        apply_env(&mut table, env, &mut problems);
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        let (config, mut problems) = deserialize_sections(table, origin);
        if problems.is_empty() {
            problems = config.validate();
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Every semantic problem of this configuration (empty when it is usable).
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut add = |path: &str, message: String| {
            p.push(Problem {
                path: path.to_string(),
                message,
            })
        };
        for (path, addr) in [
            ("http.listen", &self.http.listen),
            ("admin.listen", &self.admin.listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                add(
                    path,
                    format!("`{addr}` is not an address like 127.0.0.1:8080 or [::1]:8080"),
                );
            }
        }
        if self.http.listen == self.admin.listen && !self.http.listen.ends_with(":0") {
            add("admin.listen", "must differ from http.listen".to_string());
        }
        if self.http.max_connections == 0 {
            add("http.max_connections", "must be at least 1".into());
        }
        for (path, v) in [
            (
                "http.header_read_timeout_ms",
                self.http.header_read_timeout_ms,
            ),
            ("http.body_read_timeout_ms", self.http.body_read_timeout_ms),
            (
                "server.shutdown_timeout_ms",
                self.server.shutdown_timeout_ms,
            ),
            ("log.flush_interval_ms", self.log.flush_interval_ms),
            (
                "log.retention_check_interval_ms",
                self.log.retention_check_interval_ms,
            ),
        ] {
            if v == 0 {
                add(path, "must be at least 1".into());
            }
        }
        if self.log.data_dir.as_os_str().is_empty() {
            add("log.data_dir", "must not be empty".into());
        }
        if !(4096..=(1 << 31)).contains(&self.log.segment_bytes) {
            add(
                "log.segment_bytes",
                format!(
                    "{} is outside the allowed 4096..=2147483648",
                    self.log.segment_bytes
                ),
            );
        }
        if !(64..=(1 << 24)).contains(&self.log.index_interval_bytes) {
            add(
                "log.index_interval_bytes",
                format!(
                    "{} is outside the allowed 64..=16777216",
                    self.log.index_interval_bytes
                ),
            );
        }
        if !(64 * 1024..=(1 << 30)).contains(&self.log.max_group_bytes) {
            add(
                "log.max_group_bytes",
                format!(
                    "{} is outside the allowed 65536..=1073741824",
                    self.log.max_group_bytes
                ),
            );
        }
        if self.streams.max_streams == 0 {
            add("streams.max_streams", "must be at least 1".into());
        }
        if self.streams.declare.len() > self.streams.max_streams {
            add(
                "streams.declare",
                format!(
                    "{} streams are declared but streams.max_streams is {}",
                    self.streams.declare.len(),
                    self.streams.max_streams
                ),
            );
        }
        let mut largest_body = 0;
        let mut check_stream = |prefix: &str, s: &StreamSettings, p: &mut Vec<Problem>| {
            let mut add = |key: &str, message: String| {
                p.push(Problem {
                    path: format!("{prefix}.{key}"),
                    message,
                })
            };
            if !(1..=MAX_PARTITIONS).contains(&s.partitions) {
                add(
                    "partitions",
                    format!(
                        "{} is outside the allowed 1..={MAX_PARTITIONS}",
                        s.partitions
                    ),
                );
            }
            if !(1..=MAX_BODY_BYTES_LIMIT).contains(&s.max_body_bytes) {
                add(
                    "max_body_bytes",
                    format!(
                        "{} is outside the allowed 1..={MAX_BODY_BYTES_LIMIT}",
                        s.max_body_bytes
                    ),
                );
            }
            if s.max_event_bytes == 0 || s.max_event_bytes > s.max_body_bytes {
                add(
                    "max_event_bytes",
                    format!(
                        "{} must be at least 1 and at most max_body_bytes ({})",
                        s.max_event_bytes, s.max_body_bytes
                    ),
                );
            }
            if !(1..=1_000_000).contains(&s.max_events_per_request) {
                add(
                    "max_events_per_request",
                    format!(
                        "{} is outside the allowed 1..=1000000",
                        s.max_events_per_request
                    ),
                );
            }
            largest_body = largest_body.max(s.max_body_bytes);
        };
        check_stream("streams.defaults", &self.streams.defaults, &mut p);
        for (name, o) in &self.streams.declare {
            let prefix = format!("streams.declare.{name}");
            if let Err(e) = check_stream_name(name) {
                p.push(Problem {
                    path: prefix.clone(),
                    message: e.to_string(),
                });
            }
            check_stream(&prefix, &o.apply(&self.streams.defaults), &mut p);
        }
        if self.limits.max_in_flight_bytes < largest_body {
            p.push(Problem {
                path: "limits.max_in_flight_bytes".into(),
                message: format!(
                    "{} is smaller than the largest max_body_bytes ({largest_body}); such a request could never be admitted",
                    self.limits.max_in_flight_bytes
                ),
            });
        }
        p
    }
}

/// Why a stream name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamNameError {
    #[error("a stream name must not be empty")]
    Empty,
    #[error("a stream name has at most 249 characters; this one has {0}")]
    TooLong(usize),
    #[error("`.` and `..` are not stream names")]
    Dots,
    #[error("a stream name may contain only a-z, A-Z, 0-9, `.`, `_` and `-`; found {0:?}")]
    BadChar(char),
}

/// Checks Kafka's topic rules: 1–249 characters of `[a-zA-Z0-9._-]`, neither `.` nor `..`.
pub fn check_stream_name(name: &str) -> Result<(), StreamNameError> {
    if name.is_empty() {
        return Err(StreamNameError::Empty);
    }
    if name.len() > 249 {
        return Err(StreamNameError::TooLong(name.chars().count()));
    }
    if name == "." || name == ".." {
        return Err(StreamNameError::Dots);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(StreamNameError::BadChar(c));
    }
    Ok(())
}

/// Deserializes each top-level section on its own, so that a mistake in one section does not
/// hide the mistakes in the others (serde stops at the first error it meets).
fn deserialize_sections(table: toml::Table, origin: &str) -> (Config, Vec<Problem>) {
    fn section<T: for<'de> Deserialize<'de> + Default>(
        table: &toml::Table,
        key: &str,
        origin: &str,
        problems: &mut Vec<Problem>,
    ) -> T {
        let Some(v) = table.get(key) else {
            return T::default();
        };
        T::deserialize(v.clone()).unwrap_or_else(|e| {
            problems.push(Problem {
                path: key.to_string(),
                message: format!("{} (in {origin})", e.message().trim_end()),
            });
            T::default()
        })
    }
    const SECTIONS: [&str; 7] = [
        "server",
        "http",
        "admin",
        "log",
        "limits",
        "streams",
        "telemetry",
    ];
    let mut problems = Vec::new();
    for key in table.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            problems.push(Problem {
                path: key.clone(),
                message: format!(
                    "unknown section (in {origin}); expected one of {}",
                    SECTIONS.join(", ")
                ),
            });
        }
    }
    let p = &mut problems;
    let config = Config {
        server: section(&table, "server", origin, p),
        http: section(&table, "http", origin, p),
        admin: section(&table, "admin", origin, p),
        log: section(&table, "log", origin, p),
        limits: section(&table, "limits", origin, p),
        streams: section(&table, "streams", origin, p),
        telemetry: section(&table, "telemetry", origin, p),
    };
    (config, problems)
}

/// Applies `SLUICE_SECTION__KEY=value` variables onto `table`. Key path segments are lowercased;
/// a value that parses as a TOML value (number, boolean, array, quoted string) is taken as such,
/// anything else as a plain string. Variables without `__` are not configuration keys.
fn apply_env<I>(table: &mut toml::Table, env: I, problems: &mut Vec<Problem>)
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains(ENV_SEPARATOR))
        .collect();
    vars.sort();
    for (name, raw) in vars {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split(ENV_SEPARATOR)
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if path.iter().any(|s| s.is_empty()) {
            problems.push(Problem {
                path: name.clone(),
                message: "empty key segment in environment variable name".into(),
            });
            continue;
        }
        let value = parse_env_value(&raw);
        if let Err(message) = set_path(table, &path, value) {
            problems.push(Problem {
                path: name.clone(),
                message,
            });
        }
    }
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<(), String> {
    match path {
        [] => Ok(()),
        [last] => {
            table.insert(last.clone(), value);
            Ok(())
        }
        [seg, rest @ ..] => match table
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        {
            toml::Value::Table(t) => set_path(t, rest, value),
            _ => Err(format!("`{seg}` is not a section")),
        },
    }
}

fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn every_example_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(Some(&path), no_env())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "expected example configs in {}", dir.display());
    }
}
