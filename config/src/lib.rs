//! Sluice's configuration: the TOML model, its defaults, validation that reports every error with
//! its key path, and `SLUICE_…` environment overrides.
//!
//! Every key is documented in `docs/configuration.md`; every file in `config/examples/` is loaded
//! by a test.

use std::path::Path;

use serde::Deserialize;

mod auth;
mod dedup;
mod listeners;
mod log;
mod mqtt;
mod problems;
mod quotas;
mod schemas;
mod server;
mod streams;
mod tls;

pub use auth::*;
pub use dedup::{DedupConfig, DedupKeys, DedupStore, RedisConfig};
pub use listeners::{Cidr, ProducerTransport, ProxyConfig};
pub use log::*;
pub use mqtt::{IdentityField, Mapped, MqttConfig, TopicError, TopicMap, TopicRuleConfig};
pub(crate) use problems::Problems;
pub use problems::{ConfigError, Problem};
pub use quotas::*;
pub use schemas::{
    Compatibility, InvalidPolicy, PrivacyAction, PrivacyConfig, PrivacyRule, SchemaConfig,
    SchemaFormat, SchemaRegistryConfig, SchemasConfig,
};
pub use server::*;
pub use streams::*;
pub use tls::*;

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
    pub grpc: GrpcConfig,
    pub websocket: WebSocketConfig,
    pub mqtt: MqttConfig,
    pub admin: AdminConfig,
    pub log: LogConfig,
    pub limits: LimitsConfig,
    pub streams: StreamsConfig,
    pub telemetry: TelemetryConfig,
    pub auth: AuthConfig,
    pub quotas: QuotasConfig,
    pub dedup: DedupConfig,
    /// Schemas by stream (docs/schemas.md).
    pub schemas: SchemasConfig,
    /// The Schema Registry schemas may come from.
    pub schema_registry: SchemaRegistryConfig,
    /// The key of `hmac` privacy rules.
    pub privacy: PrivacyConfig,
}

/// Loads `text` the way the gateway would (no environment): whether it was accepted. An
/// accepted configuration must validate again to no problems and list its producer
/// transports; either failing panics. For the fuzz target (`config/fuzz`, `config_loader`) and
/// its corpus replay.
pub fn fuzz_check(text: &str) -> bool {
    match Config::from_toml_str(text, "fuzz", Vec::<(String, String)>::new()) {
        Ok(c) => {
            let problems = c.validate();
            assert!(problems.is_empty(), "accepted, then invalid: {problems:?}");
            let _ = c.producer_transports();
            true
        }
        Err(_) => false,
    }
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
}

impl Config {
    /// Every semantic problem of this configuration (empty when it is usable), section by
    /// section into one collector.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        self.validate_listeners(&mut p);
        self.validate_servers(&mut p);
        self.validate_tls(&mut p);
        self.validate_mqtt(&mut p);
        self.validate_log(&mut p);
        self.validate_streams(&mut p);
        self.validate_auth(&mut p);
        self.validate_quotas(&mut p);
        self.validate_dedup(&mut p);
        self.validate_schemas(&mut p);
        self.validate_privacy(&mut p);
        p.0
    }
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
    const SECTIONS: [&str; 16] = [
        "server",
        "http",
        "grpc",
        "websocket",
        "mqtt",
        "admin",
        "log",
        "limits",
        "streams",
        "telemetry",
        "auth",
        "quotas",
        "dedup",
        "schemas",
        "schema_registry",
        "privacy",
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
        grpc: section(&table, "grpc", origin, p),
        websocket: section(&table, "websocket", origin, p),
        mqtt: section(&table, "mqtt", origin, p),
        admin: section(&table, "admin", origin, p),
        log: section(&table, "log", origin, p),
        limits: section(&table, "limits", origin, p),
        streams: section(&table, "streams", origin, p),
        telemetry: section(&table, "telemetry", origin, p),
        auth: section(&table, "auth", origin, p),
        quotas: section(&table, "quotas", origin, p),
        dedup: section(&table, "dedup", origin, p),
        schemas: section(&table, "schemas", origin, p),
        schema_registry: section(&table, "schema_registry", origin, p),
        privacy: section(&table, "privacy", origin, p),
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
mod tests;
