//! Schemas per stream (docs/schemas.md): compiled from `[schemas]` at start and on every reload
//! (a reload with a schema that does not compile, or that breaks the stream's compatibility
//! rule, is refused, and the running schemas stay), and checked at admission, after
//! authorization and before dedup and quotas, the same for every protocol. An event in flight
//! finishes against the version it was checked with: a batch resolves its stream's versions
//! once ([`StreamSchema::resolve`]) and holds them.
//!
//! Formats: JSON Schema ([`json`]) and Avro ([`avro`]); sources: local files or a Schema
//! Registry ([`registry`]). Valid events then go through the stream's privacy rules
//! ([`privacy`]).

pub mod avro;
mod avro_fast;
pub mod json;
pub mod privacy;
pub mod protobuf;
pub mod registry;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry as Prometheus;
use serde_json::Value;
use sluice_config::{Compatibility, Config, InvalidPolicy, SchemaConfig, SchemaFormat};
use sluice_core::Event;

use avro::Avro;
use json::JsonSchema;
use privacy::{PRIVACY_HEADER, Privacy};
use protobuf::Protobuf;
pub use registry::Registry;

/// The reserved header naming the schema a stored event was checked against: for a local
/// file `<file name>@<first 12 hex digits of its SHA-256>`, for the registry
/// `subject=<subject>;version=<n>;id=<id>`.
pub const SCHEMA_HEADER: &str = "sluice-schema";

/// The content type of stored Avro values.
pub const AVRO_CONTENT_TYPE: &str = "application/vnd.apache.avro+binary";

/// The content type of stored Protobuf values.
pub const PROTOBUF_CONTENT_TYPE: &str = "application/x-protobuf";

/// The wire format's magic byte (Confluent): `0x00`, then the schema id as 4 bytes big-endian.
const MAGIC: u8 = 0;

/// A registry subject a load follows: its format, Protobuf message, and the stream naming it.
type Follow = (SchemaFormat, Option<String>, String);

/// The compiled schemas, by stream.
#[derive(Default)]
pub struct Schemas {
    by_stream: HashMap<String, Arc<StreamSchema>>,
}

/// One compiled version of a schema.
pub struct Version {
    pub checker: Checker,
    /// What stored records say they were checked against ([`SCHEMA_HEADER`]).
    pub label: Bytes,
    /// The registry's schema id (written in the wire format), for registry versions.
    pub wire_id: Option<u32>,
}

/// A compiled schema document.
pub enum Checker {
    Json(JsonSchema),
    Avro(Avro),
    Protobuf(Protobuf),
}

/// Where a stream's versions come from.
enum Source {
    File(Arc<Version>),
    Registry {
        registry: Arc<Registry>,
        subject: String,
        version: Option<u32>,
    },
}

impl Source {
    fn current(&self) -> Result<Arc<Version>, String> {
        match self {
            Source::File(v) => Ok(v.clone()),
            Source::Registry {
                registry,
                subject,
                version,
            } => registry.current(subject, *version),
        }
    }

    /// The version with wire id `id`, if it is one of this source's.
    fn by_id(&self, id: u32) -> Option<Arc<Version>> {
        match self {
            Source::File(_) => None,
            Source::Registry {
                registry,
                subject,
                version,
            } => registry.by_id(subject, *version, id),
        }
    }
}

/// One stream's schema.
pub struct StreamSchema {
    value: Source,
    key: Option<Source>,
    privacy: Option<Privacy>,
    pub policy: InvalidPolicy,
    pub dead_letter: String,
}

/// A stream's versions as one batch sees them.
pub struct Resolved {
    schema: Arc<StreamSchema>,
    value: Arc<Version>,
    key: Option<Arc<Version>>,
}

/// Why an event is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// The rule that failed (a JSON Schema keyword, an Avro check such as `type` or
    /// `unknown_field`, or `not_json` / `not_avro` / `unknown_schema`): a bounded label.
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
    /// Compiles every stream's schema from `config`; the first problem is the error, naming
    /// the stream and file. Streams from the registry follow their subjects in `registry`
    /// (required when any does). With `running`, a local file that changed must be compatible
    /// with the running version under the stream's rule.
    pub fn load(
        config: &Config,
        registry: Option<&Arc<Registry>>,
        running: Option<&Schemas>,
    ) -> Result<Self, String> {
        let mut by_stream = HashMap::new();
        // Registry subjects are followed only once everything else compiled, so a refused
        // reload leaves the registry client as it was: (subject, version) → (shape, stream).
        let mut follows: HashMap<(String, Option<u32>), Follow> = HashMap::new();
        let mut follow = |subject: &str,
                          version: Option<u32>,
                          format: SchemaFormat,
                          message: Option<&str>,
                          stream: &str|
         -> Result<(), String> {
            let shape = (format, message.map(String::from), stream.to_string());
            match follows.get(&(subject.to_string(), version)) {
                Some((f, m, other)) if (*f, m.as_deref()) != (format, message) => Err(format!(
                    "schemas.{stream}: subject `{subject}` is also used by schemas.{other} with another format or message"
                )),
                Some(_) => Ok(()),
                None => {
                    follows.insert((subject.to_string(), version), shape);
                    Ok(())
                }
            }
        };
        for (stream, s) in &config.schemas {
            let privacy = Privacy::compile(&s.privacy, &config.privacy);
            let value = if s.from_registry() {
                let registry =
                    registry.ok_or_else(|| format!("schemas.{stream}: needs [schema_registry]"))?;
                let subject = s.subject_of(stream);
                follow(&subject, s.version, s.format, s.message.as_deref(), stream)?;
                Source::Registry {
                    registry: registry.clone(),
                    subject,
                    version: s.version,
                }
            } else {
                let file = s.value.as_deref().unwrap_or_default();
                let v = read_version(stream, file, s.format, s.message.as_deref())?;
                check_history(stream, s, &v)?;
                if let Some(running) = running.and_then(|r| r.by_stream.get(stream))
                    && let Source::File(old) = &running.value
                    && old.label != v.label
                {
                    compatible(&old.checker, &v.checker, s.compatibility).map_err(|e| {
                        format!(
                            "schemas.{stream}: `{file}` cannot replace the running version ({}) \
                             under {:?} compatibility: {e}",
                            String::from_utf8_lossy(&old.label),
                            s.compatibility
                        )
                    })?;
                }
                if let Some(p) = &privacy {
                    for (segments, action, field) in p.fields() {
                        let fits = match &v.checker {
                            Checker::Avro(a) => a.check_rule(segments, action),
                            Checker::Protobuf(pb) => pb.check_rule(segments, action),
                            Checker::Json(_) => Ok(()),
                        };
                        fits.map_err(|e| format!("schemas.{stream}: privacy rule `{field}`: {e}"))?;
                    }
                }
                Source::File(Arc::new(v))
            };
            let key = match (&s.key, &s.key_subject) {
                (Some(file), _) => Some(Source::File(Arc::new(read_version(
                    stream, file, s.format, None,
                )?))),
                (None, Some(subject)) => {
                    let registry = registry
                        .ok_or_else(|| format!("schemas.{stream}: needs [schema_registry]"))?;
                    follow(subject, None, s.format, None, stream)?;
                    Some(Source::Registry {
                        registry: registry.clone(),
                        subject: subject.clone(),
                        version: None,
                    })
                }
                (None, None) => None,
            };
            by_stream.insert(
                stream.clone(),
                Arc::new(StreamSchema {
                    value,
                    key,
                    privacy,
                    policy: s.on_invalid,
                    dead_letter: s.dead_letter_of(stream),
                }),
            );
        }
        if let Some(r) = registry {
            r.check_capacity(follows.len())?;
            for ((subject, version), (format, message, _)) in &follows {
                r.follow(subject, *version, *format, message.as_deref());
            }
            r.retain(&follows.keys().cloned().collect());
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

/// A version's label as static bytes: every stored event carries it, and cloning a static
/// `Bytes` touches no shared counter (a shared one is a cache line both cores fight over at a
/// million events a second). Labels are interned, so memory grows with the distinct versions
/// this process has loaded (a few dozen bytes each), not with reloads.
pub(crate) fn label(text: String) -> Bytes {
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().expect("labels lock");
    let s = match seen.iter().find(|s| **s == text) {
        Some(s) => *s,
        None => {
            let s: &'static str = Box::leak(text.into_boxed_str());
            seen.push(s);
            s
        }
    };
    Bytes::from_static(s.as_bytes())
}

fn compatible(old: &Checker, new: &Checker, rule: Compatibility) -> Result<(), String> {
    match (old, new) {
        (Checker::Json(o), Checker::Json(n)) => JsonSchema::compatible(o, n, rule),
        (Checker::Avro(o), Checker::Avro(n)) => Avro::compatible(o, n, rule),
        (Checker::Protobuf(o), Checker::Protobuf(n)) => Protobuf::compatible(o, n, rule),
        _ if rule == Compatibility::None => Ok(()),
        _ => Err("the schema's format changed".into()),
    }
}

/// `previous` versions, oldest first, then `current`: each must be compatible with the one
/// before it.
fn check_history(stream: &str, s: &SchemaConfig, current: &Version) -> Result<(), String> {
    let mut older = Vec::with_capacity(s.previous.len());
    for f in &s.previous {
        older.push((
            f.as_str(),
            read_version(stream, f, s.format, s.message.as_deref())?,
        ));
    }
    let file = s.value.as_deref().unwrap_or_default();
    let mut chain: Vec<(&str, &Version)> = older.iter().map(|(f, v)| (*f, v)).collect();
    chain.push((file, current));
    for pair in chain.windows(2) {
        let ((old_file, old), (new_file, new)) = (pair[0], pair[1]);
        compatible(&old.checker, &new.checker, s.compatibility).map_err(|e| {
            format!(
                "schemas.{stream}: `{new_file}` is not {:?}-compatible with `{old_file}`: {e}",
                s.compatibility
            )
        })?;
    }
    Ok(())
}

fn read_version(
    stream: &str,
    file: &str,
    format: SchemaFormat,
    message: Option<&str>,
) -> Result<Version, String> {
    let text =
        std::fs::read(file).map_err(|e| format!("schemas.{stream}: cannot read `{file}`: {e}"))?;
    let checker = match format {
        SchemaFormat::JsonSchema => Checker::Json(
            JsonSchema::parse(&text).map_err(|e| format!("schemas.{stream}: `{file}` is {e}"))?,
        ),
        SchemaFormat::Avro => {
            let text = std::str::from_utf8(&text)
                .map_err(|_| format!("schemas.{stream}: `{file}` is not UTF-8"))?;
            Checker::Avro(
                Avro::parse(text).map_err(|e| format!("schemas.{stream}: `{file}` is {e}"))?,
            )
        }
        SchemaFormat::Protobuf => Checker::Protobuf(
            Protobuf::from_file(file, message)
                .map_err(|e| format!("schemas.{stream}: `{file}`: {e}"))?,
        ),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, &text);
    let hex: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let name = std::path::Path::new(file)
        .file_name()
        .map_or_else(|| file.to_string(), |n| n.to_string_lossy().into_owned());
    Ok(Version {
        checker,
        label: label(format!("{name}@{hex}")),
        wire_id: None,
    })
}

impl StreamSchema {
    /// The versions a batch is checked against; why not when a registry subject was never
    /// fetched (the batch is refused as retryable: never checked against nothing).
    pub fn resolve(self: &Arc<Self>) -> Result<Resolved, String> {
        Ok(Resolved {
            schema: self.clone(),
            value: self.value.current()?,
            key: self.key.as_ref().map(Source::current).transpose()?,
        })
    }
}

/// One checked part of an event: its bytes to store (when they change) and the label of the
/// version that passed it.
struct Checked {
    bytes: Option<Bytes>,
    label: Bytes,
    privacy: Option<String>,
}

impl Resolved {
    /// The content type of what is stored, when the schema changes it (Avro: binary).
    pub fn content_type(&self) -> Option<&'static str> {
        match self.value.checker {
            Checker::Avro(_) => Some(AVRO_CONTENT_TYPE),
            Checker::Protobuf(_) => Some(PROTOBUF_CONTENT_TYPE),
            Checker::Json(_) => None,
        }
    }

    /// The label of the value's version (for dead-letter headers).
    pub fn label(&self) -> &Bytes {
        &self.value.label
    }

    /// Checks one event: its value (and key, when the stream checks keys). A valid event is
    /// rewritten as it is to be stored — Avro encoded, privacy rules applied — and gets the
    /// [`SCHEMA_HEADER`] (and [`PRIVACY_HEADER`]); an invalid one is left as it came.
    /// `index` is the event's place in `events` given to [`Arena::finish`]. The
    /// [`SCHEMA_HEADER`] value is returned rather than added: when a whole batch passed one
    /// version the caller adds it once for all its records ([`IngestRequest::record_headers`],
    /// no allocation per event), else to each event ([`label_each`]).
    ///
    /// [`IngestRequest::record_headers`]: sluice_core::IngestRequest::record_headers
    pub fn admit(&self, e: &mut Event, index: usize, arena: &mut Arena) -> Result<Bytes, Invalid> {
        let privacy = self.schema.privacy.as_ref();
        let start = arena.buf.len();
        let value = check(
            &self.value,
            &self.schema.value,
            &e.value,
            "",
            privacy,
            Some(&mut arena.buf),
        )?;
        let key = match &self.key {
            Some(k) => {
                let src = self
                    .schema
                    .key
                    .as_ref()
                    .expect("a key source with a key version");
                let key = e.key.as_deref().unwrap_or_default();
                match check(k, src, key, "key:", None, None) {
                    Ok(c) => Some(c),
                    Err(why) => {
                        arena.buf.truncate(start);
                        return Err(why);
                    }
                }
            }
            None => None,
        };
        if let Some(b) = value.bytes {
            e.value = b;
        }
        if arena.buf.len() > start {
            arena.pending.push((index, start..arena.buf.len()));
        }
        if let Some(Checked { bytes: Some(b), .. }) = key {
            e.key = Some(b);
        }
        if let Some(p) = value.privacy {
            e.headers.push((
                Bytes::from_static(PRIVACY_HEADER.as_bytes()),
                Bytes::from(p),
            ));
        }
        Ok(value.label)
    }
}

/// Adds each event's [`SCHEMA_HEADER`] to the event itself (a batch whose events passed
/// different versions: wire-format events name their own).
pub fn label_each(events: &mut [Event], labels: Vec<Bytes>) {
    for (e, label) in events.iter_mut().zip(labels) {
        e.headers
            .push((Bytes::from_static(SCHEMA_HEADER.as_bytes()), label));
    }
}

/// A batch's encoded values (Avro from the fast path) in one buffer: one allocation per batch,
/// each event's value a slice of it.
#[derive(Default)]
pub struct Arena {
    buf: Vec<u8>,
    /// (event index, its bytes in `buf`).
    pending: Vec<(usize, std::ops::Range<usize>)>,
}

impl Arena {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            buf: Vec::with_capacity(n),
            pending: Vec::new(),
        }
    }

    /// Gives each event encoded here its value.
    pub fn finish(self, events: &mut [Event]) {
        if self.pending.is_empty() {
            return;
        }
        let shared = Bytes::from(self.buf);
        for (i, r) in self.pending {
            events[i].value = shared.slice(r);
        }
    }
}

fn parse_json(bytes: &[u8], prefix: &str) -> Result<Value, Invalid> {
    serde_json::from_slice(bytes).map_err(|e| Invalid {
        reason: "not_json".into(),
        path: prefix.to_string(),
        message: format!("not JSON: {e}"),
    })
}

fn check(
    v: &Version,
    source: &Source,
    bytes: &[u8],
    prefix: &str,
    privacy: Option<&Privacy>,
    // The batch's buffer for encoded values (what is appended there is this value); none for
    // keys.
    arena: Option<&mut Vec<u8>>,
) -> Result<Checked, Invalid> {
    let is_key = arena.is_none();
    match &v.checker {
        Checker::Json(js) => {
            if privacy.is_none() && js.valid_fast(bytes) {
                return Ok(Checked {
                    bytes: None,
                    label: v.label.clone(),
                    privacy: None,
                });
            }
            let mut doc = parse_json(bytes, prefix)?;
            js.check(&doc, prefix)?;
            let applied = privacy.and_then(|p| p.apply(&mut doc));
            Ok(Checked {
                bytes: applied
                    .is_some()
                    .then(|| Bytes::from(serde_json::to_vec(&doc).expect("JSON serializes"))),
                label: v.label.clone(),
                privacy: applied,
            })
        }
        Checker::Avro(_) | Checker::Protobuf(_) if bytes.len() >= 5 && bytes[0] == MAGIC => {
            // Binary in the wire format: checked against the version its id names.
            let id = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes"));
            let other;
            let writer = if v.wire_id == Some(id) {
                v
            } else {
                other = source.by_id(id).ok_or_else(|| Invalid {
                    reason: "unknown_schema".into(),
                    path: prefix.to_string(),
                    message: match source {
                        Source::File(_) => "binary needs a registry schema id; this stream's \
                                            schema is a local file: send JSON"
                            .into(),
                        Source::Registry { subject, .. } => {
                            format!("schema id {id} is not a version of subject `{subject}`")
                        }
                    },
                })?;
                &other
            };
            let (doc, applied, rewritten) = match &writer.checker {
                Checker::Avro(wa) => {
                    let mut doc = wa.check_binary(&bytes[5..], prefix, privacy.is_some())?;
                    let applied = privacy.and_then(|p| p.apply(&mut doc));
                    let rewritten = match &applied {
                        Some(_) => Some(encode_avro(wa, &doc, writer.wire_id, prefix)?),
                        None => None,
                    };
                    (doc, applied, rewritten)
                }
                Checker::Protobuf(wp) => {
                    let (message, at) = wp.split(&bytes[5..], prefix)?;
                    let body = &bytes[5 + at..];
                    let mut doc =
                        Protobuf::check_binary(&message, body, prefix, privacy.is_some())?;
                    let applied = privacy.and_then(|p| p.apply(&mut doc));
                    let rewritten = match &applied {
                        Some(_) => {
                            let mut out = bytes[..5 + at].to_vec();
                            out.extend(
                                Protobuf::encode_as(&message, &doc, prefix)
                                    .map_err(privacy_error)?,
                            );
                            Some(Bytes::from(out))
                        }
                        None => None,
                    };
                    (doc, applied, rewritten)
                }
                Checker::Json(_) => {
                    return Err(Invalid {
                        reason: "unknown_schema".into(),
                        path: prefix.to_string(),
                        message: format!("schema id {id} is a JSON Schema, not a binary format"),
                    });
                }
            };
            drop(doc);
            Ok(Checked {
                bytes: rewritten,
                label: writer.label.clone(),
                privacy: applied,
            })
        }
        Checker::Avro(a) if privacy.is_none() && arena.is_some() => {
            // Straight from the text into the batch's arena when the fast path decides it
            // (one allocation per batch); from the document (which names what failed)
            // otherwise.
            let arena = arena.expect("checked");
            let start = arena.len();
            if let Some(id) = v.wire_id {
                arena.push(MAGIC);
                arena.extend_from_slice(&id.to_be_bytes());
            }
            if a.encode_fast(bytes, arena) {
                // The value is the arena's new bytes, put in place by `Arena::finish`.
                return Ok(Checked {
                    bytes: None,
                    label: v.label.clone(),
                    privacy: None,
                });
            }
            arena.truncate(start);
            Ok(Checked {
                bytes: Some(encode_avro(
                    a,
                    &parse_json(bytes, prefix)?,
                    v.wire_id,
                    prefix,
                )?),
                label: v.label.clone(),
                privacy: None,
            })
        }
        Checker::Avro(_) | Checker::Protobuf(_) => {
            let mut doc = match (is_key, serde_json::from_slice::<Value>(bytes)) {
                (_, Ok(doc)) => doc,
                // A key that is not JSON is taken as a string (most keys are strings).
                (true, Err(_)) => Value::String(String::from_utf8_lossy(bytes).into_owned()),
                (false, Err(_)) => parse_json(bytes, prefix)?,
            };
            let mut out = encode_binary(&v.checker, &doc, v.wire_id, prefix)?;
            let applied = privacy.and_then(|p| p.apply(&mut doc));
            if applied.is_some() {
                out = encode_binary(&v.checker, &doc, v.wire_id, prefix).map_err(privacy_error)?;
            }
            Ok(Checked {
                bytes: Some(out),
                label: v.label.clone(),
                privacy: applied,
            })
        }
    }
}

fn privacy_error(e: Invalid) -> Invalid {
    Invalid {
        reason: "privacy".into(),
        message: format!(
            "the privacy rules leave a value the schema refuses: {}",
            e.message
        ),
        ..e
    }
}

/// JSON as the stream's binary format, with the wire-format header when the version has an id.
fn encode_binary(
    checker: &Checker,
    doc: &Value,
    wire_id: Option<u32>,
    prefix: &str,
) -> Result<Bytes, Invalid> {
    match checker {
        Checker::Avro(a) => encode_avro(a, doc, wire_id, prefix),
        Checker::Protobuf(p) => {
            let body = p.encode(doc, prefix)?;
            let mut out = Vec::with_capacity(body.len() + 8);
            if let Some(id) = wire_id {
                out.push(MAGIC);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend(p.index_bytes());
            }
            out.extend(body);
            Ok(Bytes::from(out))
        }
        Checker::Json(_) => Ok(Bytes::from(
            serde_json::to_vec(doc).expect("JSON serializes"),
        )),
    }
}

fn encode_avro(
    a: &Avro,
    doc: &Value,
    wire_id: Option<u32>,
    prefix: &str,
) -> Result<Bytes, Invalid> {
    let mut out = Vec::with_capacity(64);
    if let Some(id) = wire_id {
        out.push(MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
    }
    a.encode(doc, prefix, &mut out)?;
    Ok(Bytes::from(out))
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
    pub fn register(&self, registry: &mut Prometheus) {
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
    use sluice_config::{PrivacyAction, PrivacyConfig, PrivacyRule, Secret};

    fn config(
        stream: &str,
        format: SchemaFormat,
        files: &[(&str, &str)],
        extra: impl FnOnce(&mut SchemaConfig),
    ) -> (Config, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (name, doc) in files {
            let f = dir.path().join(name);
            std::fs::write(&f, doc).unwrap();
            paths.push(f.to_string_lossy().into_owned());
        }
        let current = paths.pop().unwrap();
        let mut s = SchemaConfig {
            format,
            value: Some(current),
            key: None,
            previous: paths,
            compatibility: Compatibility::Backward,
            registry: false,
            subject: None,
            key_subject: None,
            version: None,
            message: None,
            privacy: Vec::new(),
            on_invalid: InvalidPolicy::Reject,
            dead_letter_stream: None,
        };
        extra(&mut s);
        let mut c = Config::default();
        c.schemas.insert(stream.into(), s);
        c.privacy = PrivacyConfig {
            hmac_key_id: "k1".into(),
            hmac_key: Some(Secret("0123456789abcdef0123456789abcdef".into())),
        };
        (c, dir)
    }

    fn resolved(c: &Config, stream: &str) -> Resolved {
        let s = Schemas::load(c, None, None).unwrap();
        s.of(stream).unwrap().resolve().unwrap()
    }

    impl Resolved {
        fn admit1(&self, e: &mut Event) -> Result<(), Invalid> {
            let mut arena = Arena::default();
            let label = self.admit(e, 0, &mut arena)?;
            arena.finish(std::slice::from_mut(e));
            label_each(std::slice::from_mut(e), vec![label]);
            Ok(())
        }
    }

    fn ev(v: &str) -> Event {
        Event {
            value: Bytes::copy_from_slice(v.as_bytes()),
            ..Event::default()
        }
    }

    #[test]
    fn invalid_events_name_the_pointer_and_the_rule() {
        let (c, _d) = config(
            "orders",
            SchemaFormat::JsonSchema,
            &[(
                "orders.json",
                r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object",
               "required":["id","items"],
               "properties":{"id":{"type":"string"},
                 "items":{"type":"array","items":{"type":"object","properties":{"price":{"type":"number","minimum":0}}}}}}"#,
            )],
            |_| {},
        );
        let s = resolved(&c, "orders");
        let mut ok = ev(r#"{"id":"a","items":[{"price":1}]}"#);
        assert!(s.admit1(&mut ok).is_ok());
        assert!(ok.headers[0].1.starts_with(b"orders.json@"));
        let e = s
            .admit1(&mut ev(r#"{"id":"a","items":[{"price":1},{"price":-2}]}"#))
            .unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.path.as_str()),
            ("minimum", "/items/1/price")
        );
        assert_eq!(
            s.admit1(&mut ev(r#"{"items":[]}"#)).unwrap_err().reason,
            "required"
        );
        assert_eq!(s.admit1(&mut ev("{nope")).unwrap_err().reason, "not_json");
    }

    #[test]
    fn draft_7_schemas_work_too_and_bad_schemas_are_refused_by_name() {
        let (c, _d) = config(
            "s",
            SchemaFormat::JsonSchema,
            &[(
                "s.json",
                r#"{"$schema":"http://json-schema.org/draft-07/schema#","type":"integer"}"#,
            )],
            |_| {},
        );
        let s = resolved(&c, "s");
        assert!(s.admit1(&mut ev("3")).is_ok());
        assert_eq!(s.admit1(&mut ev("\"x\"")).unwrap_err().reason, "type");
        let (c, _d) = config(
            "s",
            SchemaFormat::JsonSchema,
            &[("bad.json", r#"{"type": 12}"#)],
            |_| {},
        );
        let err = Schemas::load(&c, None, None).err().unwrap();
        assert!(
            err.contains("schemas.s") && err.contains("not a valid JSON Schema"),
            "{err}"
        );
    }

    #[test]
    fn avro_json_is_stored_as_binary_with_privacy_applied() {
        let (mut c, _d) = config(
            "users",
            SchemaFormat::Avro,
            &[(
                "u.avsc",
                r#"{"type":"record","name":"User","fields":[{"name":"id","type":"string"},
               {"name":"email","type":"string"},{"name":"phone","type":["null","string"],"default":null}]}"#,
            )],
            |s| {
                s.privacy = vec![
                    PrivacyRule {
                        field: "/email".into(),
                        action: PrivacyAction::Hmac,
                        keep_last: 0,
                    },
                    PrivacyRule {
                        field: "/phone".into(),
                        action: PrivacyAction::Drop,
                        keep_last: 0,
                    },
                ];
            },
        );
        let s = resolved(&c, "users");
        let mut e = ev(r#"{"id":"u1","email":"ann@example.com","phone":"555"}"#);
        s.admit1(&mut e).unwrap();
        let Checker::Avro(a) = &s.value.checker else {
            panic!()
        };
        let back = a.check_binary(&e.value, "", true).unwrap();
        assert_eq!(back["id"], "u1");
        assert!(
            back["email"]
                .as_str()
                .unwrap()
                .starts_with("hmac-sha256:k1:")
        );
        assert_eq!(back["phone"], Value::Null);
        let h: Vec<_> = e
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        assert!(
            h.contains(&("sluice-privacy".into(), "/email=hmac:k1,/phone=drop".into())),
            "{h:?}"
        );
        // Binary on a local-file stream has no id to check against.
        let mut bin = ev("\0\0\0\0\x01\x02u1");
        assert_eq!(s.admit1(&mut bin).unwrap_err().reason, "unknown_schema");
        // A rule the schema cannot take is refused at load.
        c.schemas.get_mut("users").unwrap().privacy = vec![PrivacyRule {
            field: "/id".into(),
            action: PrivacyAction::Drop,
            keep_last: 0,
        }];
        let err = Schemas::load(&c, None, None).err().unwrap();
        assert!(
            err.contains("privacy rule `/id`") && err.contains("default"),
            "{err}"
        );
    }

    #[test]
    fn versions_must_follow_the_compatibility_rule() {
        let v1 = r#"{"type":"record","name":"U","fields":[{"name":"id","type":"string"}]}"#;
        let v2 = r#"{"type":"record","name":"U","fields":[{"name":"id","type":"string"},{"name":"n","type":"int"}]}"#;
        let (c, _d) = config(
            "u",
            SchemaFormat::Avro,
            &[("v1.avsc", v1), ("v2.avsc", v2)],
            |_| {},
        );
        let err = Schemas::load(&c, None, None).err().unwrap();
        assert!(
            err.contains("`")
                && err.contains("v2.avsc")
                && err.contains("v1.avsc")
                && err.contains("Backward"),
            "{err}"
        );
        let (c, _d) = config(
            "u",
            SchemaFormat::Avro,
            &[("v1.avsc", v1), ("v2.avsc", v2)],
            |s| s.compatibility = Compatibility::Forward,
        );
        assert!(Schemas::load(&c, None, None).is_ok());
        // Against the running version at reload.
        let (c1, _d1) = config("u", SchemaFormat::Avro, &[("v1.avsc", v1)], |_| {});
        let running = Schemas::load(&c1, None, None).unwrap();
        let (c2, _d2) = config("u", SchemaFormat::Avro, &[("v2.avsc", v2)], |_| {});
        let err = Schemas::load(&c2, None, Some(&running)).err().unwrap();
        assert!(
            err.contains("cannot replace the running version (v1.avsc@"),
            "{err}"
        );
    }
}
