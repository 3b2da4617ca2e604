//! Schemas per stream (docs/schemas.md): compiled from `[schemas]` at start and on every reload
//! (a reload with a schema that does not compile is refused, and the running schemas stay), and
//! checked at admission, after authorization and before dedup and quotas, the same for every
//! protocol. An event in flight finishes against the schema it was checked with: the policy
//! holding the schemas is swapped whole, and a batch holds the one it started with.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::Value;
use sluice_config::{InvalidPolicy, SchemaConfig, SchemasConfig};
use sluice_core::Event;

/// The reserved header naming the schema a stored event was checked against:
/// `<file name>@<first 12 hex digits of the file's SHA-256>`, so a new version is visible.
pub const SCHEMA_HEADER: &str = "sluice-schema";

/// The compiled schemas, by stream.
#[derive(Default)]
pub struct Schemas {
    by_stream: HashMap<String, Arc<StreamSchema>>,
}

/// One stream's schema.
pub struct StreamSchema {
    value: jsonschema::Validator,
    key: Option<jsonschema::Validator>,
    /// What the stored records say they were checked against.
    pub id: Bytes,
    pub policy: InvalidPolicy,
    pub dead_letter: String,
}

/// Why an event is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The rule (JSON Schema keyword) that failed, or `not_json`: a bounded label.
    pub reason: String,
    /// Where: a JSON pointer into the value (`/items/2/price`), prefixed `key:` for the key.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = if self.path.is_empty() {
            "/"
        } else {
            &self.path
        };
        write!(
            f,
            "schema violation at {path} ({}): {}",
            self.reason, self.message
        )
    }
}

impl Schemas {
    /// Compiles every stream's schema; the first that cannot be read or compiled is the error,
    /// naming the stream and file.
    pub fn load(config: &SchemasConfig) -> Result<Self, String> {
        let mut by_stream = HashMap::new();
        for (stream, s) in config {
            by_stream.insert(stream.clone(), Arc::new(compile(stream, s)?));
        }
        Ok(Self { by_stream })
    }

    /// The schema of `stream`, if it has one.
    pub fn of(&self, stream: &str) -> Option<&Arc<StreamSchema>> {
        self.by_stream.get(stream)
    }

    pub fn is_empty(&self) -> bool {
        self.by_stream.is_empty()
    }
}

fn read_schema(stream: &str, file: &str) -> Result<(jsonschema::Validator, Bytes), String> {
    let text =
        std::fs::read(file).map_err(|e| format!("schemas.{stream}: cannot read `{file}`: {e}"))?;
    let doc: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("schemas.{stream}: `{file}` is not JSON: {e}"))?;
    let validator = jsonschema::validator_for(&doc)
        .map_err(|e| format!("schemas.{stream}: `{file}` is not a valid JSON Schema: {e}"))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &text);
    let hex: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = std::path::Path::new(file)
        .file_name()
        .map_or_else(|| file.to_string(), |n| n.to_string_lossy().into_owned());
    Ok((validator, Bytes::from(format!("{name}@{hex}"))))
}

fn compile(stream: &str, s: &SchemaConfig) -> Result<StreamSchema, String> {
    let (value, id) = read_schema(stream, &s.value)?;
    let key = s
        .key
        .as_deref()
        .map(|k| read_schema(stream, k).map(|(v, _)| v))
        .transpose()?;
    Ok(StreamSchema {
        value,
        key,
        id,
        policy: s.on_invalid,
        dead_letter: s.dead_letter_of(stream),
    })
}

impl StreamSchema {
    /// Checks one event: its value (and key, when the stream checks keys) must be JSON that
    /// the schema accepts.
    pub fn check(&self, e: &Event) -> Result<(), Invalid> {
        check_one(&self.value, &e.value, "")?;
        if let Some(k) = &self.key {
            let key = e.key.as_deref().unwrap_or_default();
            check_one(k, key, "key:")?;
        }
        Ok(())
    }
}

fn check_one(v: &jsonschema::Validator, bytes: &[u8], prefix: &str) -> Result<(), Invalid> {
    let instance: Value = serde_json::from_slice(bytes).map_err(|e| Invalid {
        reason: "not_json".into(),
        path: prefix.to_string(),
        message: format!("not JSON: {e}"),
    })?;
    // The common case first: no error is built for a valid event.
    if v.is_valid(&instance) {
        return Ok(());
    }
    match v.validate(&instance) {
        Ok(()) => Ok(()),
        Err(err) => {
            let schema_path = err.schema_path().as_str().to_string();
            // The keyword is the schema path's last segment (`/properties/price/minimum`).
            let reason = schema_path
                .rsplit('/')
                .next()
                .filter(|k| !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric()))
                .unwrap_or("schema")
                .to_string();
            Err(Invalid {
                reason,
                path: format!("{prefix}{}", err.instance_path().as_str()),
                message: err.to_string(),
            })
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InvalidLabels {
    pub stream: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabel {
    pub stream: String,
}

/// The schema step's metrics.
#[derive(Clone, Default)]
pub struct SchemaMetrics {
    pub invalid: Family<InvalidLabels, Counter>,
    pub dead_lettered: Family<StreamLabel, Counter>,
}

impl SchemaMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events_invalid",
            "Events that failed their stream's schema, by stream and the rule that failed (the JSON Schema keyword, or not_json)",
            self.invalid.clone(),
        );
        registry.register(
            "dead_letter_events",
            "Invalid events stored in their stream's dead-letter stream instead, by source stream",
            self.dead_lettered.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(doc: &str) -> StreamSchema {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("orders.json");
        std::fs::write(&f, doc).unwrap();
        compile(
            "orders",
            &SchemaConfig {
                format: Default::default(),
                value: f.to_string_lossy().into_owned(),
                key: None,
                on_invalid: InvalidPolicy::Reject,
                dead_letter_stream: None,
            },
        )
        .unwrap()
    }

    fn ev(v: &str) -> Event {
        Event {
            value: Bytes::copy_from_slice(v.as_bytes()),
            ..Event::default()
        }
    }

    #[test]
    fn invalid_events_name_the_pointer_and_the_rule() {
        let s = schema(
            r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object",
               "required":["id","items"],
               "properties":{"id":{"type":"string"},
                 "items":{"type":"array","items":{"type":"object","properties":{"price":{"type":"number","minimum":0}}}}}}"#,
        );
        assert!(s.check(&ev(r#"{"id":"a","items":[{"price":1}]}"#)).is_ok());
        let e = s
            .check(&ev(r#"{"id":"a","items":[{"price":1},{"price":-2}]}"#))
            .unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.path.as_str()),
            ("minimum", "/items/1/price")
        );
        let e = s.check(&ev(r#"{"items":[]}"#)).unwrap_err();
        assert_eq!(e.reason, "required");
        let e = s.check(&ev("{nope")).unwrap_err();
        assert_eq!(e.reason, "not_json");
        assert!(s.id.starts_with(b"orders.json@"));
    }

    #[test]
    fn draft_7_schemas_work_too_and_bad_schemas_are_refused_by_name() {
        let s = schema(r#"{"$schema":"http://json-schema.org/draft-07/schema#","type":"integer"}"#);
        assert!(s.check(&ev("3")).is_ok());
        assert_eq!(s.check(&ev("\"x\"")).unwrap_err().reason, "type");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.json");
        std::fs::write(&f, r#"{"type": 12}"#).unwrap();
        let mut cfg = SchemasConfig::new();
        cfg.insert(
            "s".into(),
            SchemaConfig {
                format: Default::default(),
                value: f.to_string_lossy().into_owned(),
                key: None,
                on_invalid: InvalidPolicy::Reject,
                dead_letter_stream: None,
            },
        );
        let err = Schemas::load(&cfg).err().unwrap();
        assert!(
            err.contains("schemas.s") && err.contains("not a valid JSON Schema"),
            "{err}"
        );
    }
}
