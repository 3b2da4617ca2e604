//! `[schemas]`: a schema per stream, checked at admission (docs/schemas.md).

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::{Config, Problems};

/// How a stream's events are checked.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    /// The schema language of `value` and `key`.
    #[serde(default)]
    pub format: SchemaFormat,
    /// The file of the value's schema (relative paths from the working directory, as TLS files).
    pub value: String,
    /// The file of the key's schema, if keys are checked too.
    #[serde(default)]
    pub key: Option<String>,
    /// What an event that fails gets.
    #[serde(default)]
    pub on_invalid: InvalidPolicy,
    /// Where `dead_letter` sends invalid events (default `{stream}.dlq`).
    #[serde(default)]
    pub dead_letter_stream: Option<String>,
}

impl SchemaConfig {
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
            for (key, file) in [("value", Some(&s.value)), ("key", s.key.as_ref())] {
                let Some(file) = file else { continue };
                if let Err(e) = std::fs::metadata(file) {
                    p.add(at(key), format!("cannot read `{file}`: {e}"));
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

/// Schemas by stream.
pub type SchemasConfig = BTreeMap<String, SchemaConfig>;
