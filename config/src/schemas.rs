//! `[schemas]`: a schema per stream, checked at admission (docs/schemas.md).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{Config, Problems, Secret};

/// How a stream's events are checked.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// The schema language of `value` and `key`.
    #[serde(default)]
    pub format: SchemaFormat,
    /// The file of the value's schema (relative paths from the working directory, as TLS files);
    /// none when the schema comes from the registry.
    #[serde(default)]
    pub value: Option<String>,
    /// The file of the key's schema, if keys are checked too.
    #[serde(default)]
    pub key: Option<String>,
    /// Older versions of the value's schema, oldest first: each version must be compatible with
    /// the one before it under `compatibility` (checked by `check-config`, at start and reload).
    #[serde(default)]
    pub previous: Vec<String>,
    /// The rule between consecutive versions of a local schema, and between the running
    /// version and a reloaded one.
    #[serde(default)]
    pub compatibility: Compatibility,
    /// Take the value's schema from `[schema_registry]` (subject `{stream}-value` by default).
    #[serde(default)]
    pub registry: bool,
    /// The registry subject of the value's schema (implies `registry`); the default is
    /// TopicNameStrategy's `{stream}-value`. RecordNameStrategy: the record's full name.
    #[serde(default)]
    pub subject: Option<String>,
    /// The registry subject of the key's schema, if keys are checked against the registry.
    #[serde(default)]
    pub key_subject: Option<String>,
    /// A pinned version of the subject; the latest (followed as it changes) when absent.
    #[serde(default)]
    pub version: Option<u32>,
    /// Protobuf: the message type (`acme.Order`); the file's first message when absent.
    #[serde(default)]
    pub message: Option<String>,
    /// Field rules applied to valid events before they are stored.
    #[serde(default)]
    pub privacy: Vec<PrivacyRule>,
    /// What an event that fails gets.
    #[serde(default)]
    pub on_invalid: InvalidPolicy,
    /// Where `dead_letter` sends invalid events (default `{stream}.dlq`).
    #[serde(default)]
    pub dead_letter_stream: Option<String>,
}

impl SchemaConfig {
    /// Whether the value's schema comes from the registry.
    pub fn from_registry(&self) -> bool {
        self.registry || self.subject.is_some()
    }

    /// The registry subject of the value's schema.
    pub fn subject_of(&self, stream: &str) -> String {
        self.subject
            .clone()
            .unwrap_or_else(|| format!("{stream}-value"))
    }

    /// The dead-letter stream of `stream`.
    pub fn dead_letter_of(&self, stream: &str) -> String {
        self.dead_letter_stream
            .clone()
            .unwrap_or_else(|| format!("{stream}.dlq"))
    }
}

/// The schema languages.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SchemaFormat {
    /// JSON Schema, draft 2020-12 or draft 7 (by the document's `$schema`; 2020-12 when absent).
    #[default]
    JsonSchema,
    /// Apache Avro: JSON events are checked and stored as Avro binary; binary events in the
    /// registry's wire format are checked against their schema id.
    Avro,
    /// Protobuf: a message type from a `.proto` file or a descriptor set; JSON events (proto3
    /// JSON mapping) are checked and stored as binary, binary events in the registry's wire
    /// format are checked against their schema id and message indexes.
    Protobuf,
}

/// Compatibility between versions of a schema, as a Schema Registry names them.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Compatibility {
    /// The new version reads what the previous one wrote (consumers upgrade first).
    #[default]
    Backward,
    /// The previous version reads what the new one writes (producers upgrade first).
    Forward,
    /// Both.
    Full,
    /// Anything goes.
    None,
}

/// One field rule of `privacy`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrivacyRule {
    /// A JSON pointer into the value (`/user/email`); `*` stands for every element of an array
    /// or member of an object (`/items/*/card`).
    pub field: String,
    pub action: PrivacyAction,
    /// For `mask`: how many trailing characters stay visible.
    #[serde(default)]
    pub keep_last: usize,
}

/// What a privacy rule does to its field.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyAction {
    /// Removes the field.
    Drop,
    /// Replaces the field's characters by `*` (all but `keep_last`).
    Mask,
    /// Replaces the field by its keyed hash: `hmac-sha256:{key id}:{base64url}`.
    Hmac,
}

/// `[privacy]`: the key of `hmac` rules.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// The key's id, written into each hash so consumers know which key made it (rotate by
    /// changing both and reloading).
    pub hmac_key_id: String,
    /// The key (at least 32 bytes; `SLUICE_PRIVACY__HMAC_KEY` keeps it out of the file).
    pub hmac_key: Option<Secret>,
}

/// `[schema_registry]`: a Confluent-compatible Schema Registry.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SchemaRegistryConfig {
    /// `http://` or `https://` base URL; empty = no registry.
    pub url: String,
    /// Basic auth (Confluent Cloud: the API key and secret).
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// Bearer auth instead.
    pub bearer_token: Option<Secret>,
    /// PEM CA bundle for `https` (the system roots when absent).
    pub ca_file: Option<String>,
    /// How often subjects followed at their latest version are asked again.
    pub refresh_ms: u64,
    /// Each request's deadline.
    pub timeout_ms: u64,
}

impl Default for SchemaRegistryConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            username: None,
            password: None,
            bearer_token: None,
            ca_file: None,
            refresh_ms: 30_000,
            timeout_ms: 5_000,
        }
    }
}

/// What an invalid event gets.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum InvalidPolicy {
    /// Refused on its own (`malformed`, naming the JSON pointer and the rule), in every
    /// protocol's own form; the request's other events go on.
    #[default]
    Reject,
    /// Stored in the dead-letter stream with its original bytes and why, and answered as such.
    DeadLetter,
}

impl Config {
    pub(crate) fn validate_schemas(&self, p: &mut Problems) {
        for (stream, s) in &self.schemas {
            let at = |k: &str| format!("schemas.{stream}.{k}");
            if let Err(e) = crate::check_stream_name(stream) {
                p.add(
                    format!("schemas.{stream}"),
                    format!("not a stream name: {e}"),
                );
            }
            let files = [("value", s.value.as_ref()), ("key", s.key.as_ref())]
                .into_iter()
                .chain(s.previous.iter().map(|f| ("previous", Some(f))));
            for (key, file) in files {
                let Some(file) = file else { continue };
                if let Err(e) = std::fs::metadata(file) {
                    p.add(at(key), format!("cannot read `{file}`: {e}"));
                }
            }
            match (s.value.is_some(), s.from_registry()) {
                (true, true) => p.add(
                    at("value"),
                    "a schema comes from a file or from the registry, not both",
                ),
                (false, false) => p.add(
                    at("value"),
                    "required: a schema file, or `registry = true` / `subject`",
                ),
                _ => {}
            }
            if (s.from_registry() || s.key_subject.is_some()) && self.schema_registry.url.is_empty()
            {
                p.add(at("registry"), "needs [schema_registry] url");
            }
            if s.from_registry() && !s.previous.is_empty() {
                p.add(
                    at("previous"),
                    "versions of a registry subject are the registry's; `previous` is for files",
                );
            }
            if s.version.is_some() && !s.from_registry() {
                p.add(
                    at("version"),
                    "pins a registry version; needs `registry = true`",
                );
            }
            if s.message.is_some() && s.format != SchemaFormat::Protobuf {
                p.add(
                    at("message"),
                    "names a Protobuf message; needs format = \"protobuf\"",
                );
            }
            if s.key.is_some() && s.key_subject.is_some() {
                p.add(
                    at("key"),
                    "a key schema comes from a file or `key_subject`, not both",
                );
            }
            for (i, r) in s.privacy.iter().enumerate() {
                if !r.field.starts_with('/') {
                    p.add(
                        format!("schemas.{stream}.privacy[{i}].field"),
                        format!("`{}` is not a JSON pointer (it starts with /)", r.field),
                    );
                }
                if r.action == PrivacyAction::Hmac && self.privacy.hmac_key.is_none() {
                    p.add(
                        format!("schemas.{stream}.privacy[{i}].action"),
                        "hmac needs [privacy] hmac_key",
                    );
                }
            }
            if let Some(d) = &s.dead_letter_stream {
                if let Err(e) = crate::check_stream_name(d) {
                    p.add(at("dead_letter_stream"), format!("not a stream name: {e}"));
                }
                if d == stream {
                    p.add(
                        at("dead_letter_stream"),
                        "is the stream itself; invalid events need a stream of their own",
                    );
                }
            }
            let dead_letter = s.dead_letter_of(stream);
            if s.on_invalid == InvalidPolicy::DeadLetter
                && !self.streams.auto_create
                && !self.streams.declare.contains_key(&dead_letter)
            {
                p.add(
                    at("dead_letter_stream"),
                    format!("`{dead_letter}` is not declared and streams.auto_create is false: declare it"),
                );
            }
            if s.on_invalid == InvalidPolicy::DeadLetter && self.schemas.contains_key(&dead_letter)
            {
                p.add(
                    at("dead_letter_stream"),
                    format!("`{dead_letter}` has a schema of its own; a dead-letter stream takes whatever failed"),
                );
            }
        }
    }
}

impl Config {
    pub(crate) fn validate_privacy(&self, p: &mut Problems) {
        if let Some(k) = &self.privacy.hmac_key {
            if k.0.len() < 32 {
                p.add(
                    "privacy.hmac_key",
                    "at least 32 bytes (a shorter key makes the hashes guessable)",
                );
            }
            if self.privacy.hmac_key_id.is_empty()
                || !self
                    .privacy
                    .hmac_key_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                p.add(
                    "privacy.hmac_key_id",
                    "required with hmac_key: letters, digits, `-`, `_`, `.`",
                );
            }
        }
        let r = &self.schema_registry;
        if !r.url.is_empty() {
            if !(r.url.starts_with("http://") || r.url.starts_with("https://")) {
                p.add("schema_registry.url", "an http:// or https:// URL");
            }
            if r.password.is_some() != r.username.is_some() {
                p.add(
                    "schema_registry.username",
                    "username and password go together",
                );
            }
            if r.bearer_token.is_some() && r.username.is_some() {
                p.add(
                    "schema_registry.bearer_token",
                    "basic or bearer auth, not both",
                );
            }
            if r.refresh_ms < 100 || r.timeout_ms == 0 {
                p.add(
                    "schema_registry.refresh_ms",
                    "refresh_ms ≥ 100 and timeout_ms > 0",
                );
            }
            if let Some(f) = &r.ca_file
                && let Err(e) = std::fs::metadata(f)
            {
                p.add("schema_registry.ca_file", format!("cannot read `{f}`: {e}"));
            }
        }
    }
}

/// Schemas by stream.
pub type SchemasConfig = BTreeMap<String, SchemaConfig>;
