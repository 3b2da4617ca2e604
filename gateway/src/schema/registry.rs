//! A Confluent-compatible Schema Registry client (docs/schemas.md#schema-registry). Only these
//! endpoints are used:
//!
//! - `GET /subjects/{subject}/versions/{version|latest}` → `{subject, id, version, schema,
//!   schemaType}`: the version a stream checks new events against;
//! - `GET /subjects/{subject}/versions` → `[1, 2, …]`: the subject's versions, so events in the
//!   wire format that name an older version's id are checked against that version.
//!
//! The data path never waits on the registry: a background task refreshes every followed
//! subject every `refresh_ms`; events are checked against what was last fetched. When the
//! registry is unreachable the last good version keeps serving (it is also kept in
//! `{data_dir}/schema-cache`, so a restart during an outage serves it too); a stream whose
//! subject was never fetched refuses its events with a retryable 503 rather than accepting
//! them unchecked.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as Prometheus;
use serde::{Deserialize, Serialize};
use sluice_config::{SchemaFormat, SchemaRegistryConfig};

use super::{Checker, Version};

/// The largest schema document taken from the registry.
const MAX_SCHEMA_BYTES: usize = 1 << 20;
/// Older versions of a subject kept for events in the wire format that name them.
const MAX_VERSIONS: usize = 32;
/// Subjects followed at once (a reload may name new ones; they are config, not client input).
const MAX_SUBJECTS: usize = 4096;

/// What the registry answers for one version.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
struct SubjectVersion {
    #[serde(default)]
    subject: String,
    id: u32,
    version: u32,
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
}

/// A followed subject, its format, and the versions already known of it: (version, id).
type Followed = ((String, Option<u32>), Shape, HashMap<u32, u32>);

/// What a subject's schemas are compiled as: the format, and for Protobuf the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub format: SchemaFormat,
    pub message: Option<String>,
}

/// What is known of one followed subject.
#[derive(Default)]
struct Subject {
    shape: Option<Shape>,
    current: Option<Arc<Version>>,
    /// Every fetched version of the subject, by schema id.
    by_id: HashMap<u32, Arc<Version>>,
    /// Version number → schema id of every version fetched (also those that did not compile),
    /// so a refresh asks only for versions it has not seen.
    versions: HashMap<u32, u32>,
    last_error: Option<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// The registry client's metrics.
#[derive(Clone, Default)]
pub struct RegistryMetrics {
    fetches: Family<ResultLabel, Counter>,
    cached: Gauge,
    stale: Gauge,
}

/// The client, shared by every stream whose schema comes from the registry.
pub struct Registry {
    cfg: SchemaRegistryConfig,
    tls: Arc<rustls::ClientConfig>,
    authorization: Option<String>,
    cache_dir: Option<PathBuf>,
    /// Keyed by (subject, pinned version).
    subjects: Mutex<HashMap<(String, Option<u32>), Subject>>,
    metrics: RegistryMetrics,
}

impl Registry {
    pub fn new(cfg: &SchemaRegistryConfig, cache_dir: Option<PathBuf>) -> Result<Self, String> {
        let tls = sluice_auth::tls::client_config(cfg.ca_file.as_deref().map(std::path::Path::new))
            .map_err(|e| format!("schema_registry.ca_file: {e}"))?;
        let authorization = match (&cfg.username, &cfg.password, &cfg.bearer_token) {
            (Some(u), Some(p), _) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{}", p.0))
            )),
            (_, _, Some(t)) => Some(format!("Bearer {}", t.0)),
            _ => None,
        };
        Ok(Self {
            cfg: cfg.clone(),
            tls: Arc::new(tls),
            authorization,
            cache_dir,
            subjects: Mutex::new(HashMap::new()),
            metrics: RegistryMetrics::default(),
        })
    }

    pub fn register_metrics(&self, registry: &mut Prometheus) {
        registry.register(
            "schema_registry_fetches",
            "Requests to the Schema Registry, by result (ok, error)",
            self.metrics.fetches.clone(),
        );
        registry.register(
            "schema_registry_cached_schemas",
            "Schema versions fetched from the registry and kept compiled",
            self.metrics.cached.clone(),
        );
        registry.register(
            "schema_registry_stale_subjects",
            "Followed subjects whose last refresh failed (served from the last good version, or refused when there is none)",
            self.metrics.stale.clone(),
        );
    }

    pub fn refresh_every(&self) -> Duration {
        Duration::from_millis(self.cfg.refresh_ms)
    }

    /// Each request's deadline.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    /// Whether `n` subjects may be followed.
    pub fn check_capacity(&self, n: usize) -> Result<(), String> {
        if n > MAX_SUBJECTS {
            return Err(format!("more than {MAX_SUBJECTS} registry subjects"));
        }
        Ok(())
    }

    /// Starts following `subject` (latest, or a pinned version) as `format`; what the disk
    /// cache holds of it serves until the registry answers. A reload that changes a subject's
    /// shape starts it afresh (the load checked that its streams agree on one).
    pub fn follow(
        &self,
        subject: &str,
        version: Option<u32>,
        format: SchemaFormat,
        message: Option<&str>,
    ) {
        let shape = Shape {
            format,
            message: message.map(String::from),
        };
        let mut subjects = self.subjects.lock().expect("registry lock");
        let s = subjects.entry((subject.to_string(), version)).or_default();
        if s.shape.as_ref().is_some_and(|f| *f != shape) {
            *s = Subject::default();
        }
        s.shape = Some(shape.clone());
        if s.current.is_none()
            && let Some(v) = self.read_cache(subject, version)
            && let Ok(compiled) = compile(&v, &shape)
        {
            s.by_id.insert(v.id, compiled.clone());
            s.versions.insert(v.version, v.id);
            s.current = Some(compiled);
            tracing::info!(
                subject,
                version = v.version,
                id = v.id,
                "schema served from the local cache until the registry answers"
            );
        }
    }

    /// Forgets subjects no stream names any more (after a reload).
    pub fn retain(&self, keep: &HashSet<(String, Option<u32>)>) {
        self.subjects
            .lock()
            .expect("registry lock")
            .retain(|k, _| keep.contains(k));
    }

    /// The version new events of `subject` are checked against; an error saying why there is
    /// none when the subject was never fetched.
    pub fn current(&self, subject: &str, version: Option<u32>) -> Result<Arc<Version>, String> {
        let subjects = self.subjects.lock().expect("registry lock");
        let s = subjects.get(&(subject.to_string(), version));
        match s.and_then(|s| s.current.clone()) {
            Some(v) => Ok(v),
            None => Err(format!(
                "the schema of subject `{subject}` has not been fetched from the registry yet{}",
                s.and_then(|s| s.last_error.as_deref())
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )),
        }
    }

    /// The version of `subject` with schema id `id`, if it is one of the subject's.
    pub fn by_id(&self, subject: &str, version: Option<u32>, id: u32) -> Option<Arc<Version>> {
        let subjects = self.subjects.lock().expect("registry lock");
        subjects
            .get(&(subject.to_string(), version))?
            .by_id
            .get(&id)
            .cloned()
    }

    /// Asks the registry for every followed subject; failures keep the last good version.
    pub async fn refresh(&self) {
        let followed: Vec<Followed> = {
            let subjects = self.subjects.lock().expect("registry lock");
            subjects
                .iter()
                .filter_map(|(k, s)| Some((k.clone(), s.shape.clone()?, s.versions.clone())))
                .collect()
        };
        let mut stale = 0;
        for ((subject, pinned), shape, known) in followed {
            // Only what is new is fetched and compiled, outside the lock.
            let fetched = self
                .fetch_subject(&subject, pinned, &shape, &known)
                .await
                .and_then(|(current, older)| {
                    let compiled = |v: &SubjectVersion| {
                        (!known.values().any(|&id| id == v.id)).then(|| compile(v, &shape))
                    };
                    let cur = match compiled(&current) {
                        Some(Err(e)) => {
                            return Err(format!(
                                "subject `{subject}` version {}: {e}",
                                current.version
                            ));
                        }
                        Some(Ok(c)) => Some(c),
                        None => None,
                    };
                    let older: Vec<(u32, u32, Option<Arc<Version>>)> = older
                        .iter()
                        .map(|o| match compiled(o) {
                            Some(Ok(c)) => (o.version, o.id, Some(c)),
                            Some(Err(e)) => {
                                tracing::warn!(subject, version = o.version, error = %e, "an older schema version does not compile; events naming it are refused");
                                (o.version, o.id, None)
                            }
                            None => (o.version, o.id, None),
                        })
                        .collect();
                    Ok((current, cur, older))
                });
            let mut subjects = self.subjects.lock().expect("registry lock");
            let Some(s) = subjects.get_mut(&(subject.clone(), pinned)) else {
                continue;
            };
            match fetched {
                Ok((raw, cur, older)) => {
                    for (version, id, c) in older {
                        s.versions.insert(version, id);
                        if let Some(c) = c {
                            s.by_id.insert(id, c);
                        }
                    }
                    s.versions.insert(raw.version, raw.id);
                    if let Some(c) = cur {
                        s.by_id.insert(raw.id, c);
                    }
                    let Some(current) = s.by_id.get(&raw.id).cloned() else {
                        // Known as a version that did not compile, and now the latest.
                        stale += 1;
                        s.last_error = Some(format!(
                            "subject `{subject}` version {} does not compile",
                            raw.version
                        ));
                        continue;
                    };
                    if s.by_id.len() > MAX_VERSIONS {
                        let mut ids: Vec<u32> = s.by_id.keys().copied().collect();
                        ids.sort_unstable();
                        for id in &ids[..ids.len() - MAX_VERSIONS] {
                            if *id != raw.id {
                                s.by_id.remove(id);
                            }
                        }
                    }
                    let changed = s.current.as_ref().map(|c| c.wire_id) != Some(current.wire_id);
                    if changed {
                        tracing::info!(subject, id = current.wire_id, label = %String::from_utf8_lossy(&current.label), "schema version now in use");
                        self.write_cache(&subject, pinned, &raw);
                    }
                    s.current = Some(current);
                    s.last_error = None;
                }
                Err(e) => {
                    stale += 1;
                    if s.last_error.as_deref() != Some(&e) {
                        tracing::warn!(subject, error = %e, serving = s.current.is_some(), "schema registry refresh failed; the last good version keeps serving");
                    }
                    s.last_error = Some(e);
                }
            }
        }
        let subjects = self.subjects.lock().expect("registry lock");
        self.metrics
            .cached
            .set(subjects.values().map(|s| s.by_id.len() as i64).sum());
        self.metrics.stale.set(stale);
    }

    async fn get(&self, path: &str) -> Result<Bytes, String> {
        let url = format!("{}{path}", self.cfg.url.trim_end_matches('/'));
        let r = sluice_auth::jwt::get_json(
            &url,
            &self.tls,
            self.authorization.as_deref(),
            MAX_SCHEMA_BYTES,
            Duration::from_millis(self.cfg.timeout_ms),
        )
        .await;
        let result = if r.is_ok() { "ok" } else { "error" };
        self.metrics
            .fetches
            .get_or_create(&ResultLabel { result })
            .inc();
        r
    }

    async fn version(&self, subject: &str, version: &str) -> Result<SubjectVersion, String> {
        let body = self
            .get(&format!(
                "/subjects/{}/versions/{version}",
                encode_segment(subject)
            ))
            .await?;
        let mut v: SubjectVersion = serde_json::from_slice(&body)
            .map_err(|e| format!("the registry's answer for `{subject}` version {version}: {e}"))?;
        v.subject = subject.to_string();
        Ok(v)
    }

    /// The subject's version to serve and the older versions not yet known.
    /// The subject's version to serve and the older versions not yet known (by number), as
    /// the registry answers them.
    async fn fetch_subject(
        &self,
        subject: &str,
        pinned: Option<u32>,
        shape: &Shape,
        known: &HashMap<u32, u32>,
    ) -> Result<(SubjectVersion, Vec<SubjectVersion>), String> {
        let v = self
            .version(
                subject,
                &pinned.map_or_else(|| "latest".to_string(), |n| n.to_string()),
            )
            .await?;
        let mut older = Vec::new();
        if shape.format != SchemaFormat::JsonSchema && pinned.is_none() {
            // Producers still on an older version send its id; those are checked against it.
            let body = self
                .get(&format!("/subjects/{}/versions", encode_segment(subject)))
                .await?;
            let mut versions: Vec<u32> = serde_json::from_slice(&body)
                .map_err(|e| format!("the registry's version list for `{subject}`: {e}"))?;
            versions.sort_unstable();
            let skip = versions.len().saturating_sub(MAX_VERSIONS);
            for n in versions.into_iter().skip(skip) {
                if n == v.version || known.contains_key(&n) {
                    continue;
                }
                older.push(self.version(subject, &n.to_string()).await?);
            }
        }
        Ok((v, older))
    }

    fn cache_file(&self, subject: &str, version: Option<u32>) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let name = format!(
            "{}@{}.json",
            encode_segment(subject),
            version.map_or_else(|| "latest".to_string(), |n| n.to_string())
        );
        Some(dir.join(name))
    }

    fn read_cache(&self, subject: &str, version: Option<u32>) -> Option<SubjectVersion> {
        let f = self.cache_file(subject, version)?;
        let text = std::fs::read(f).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn write_cache(&self, subject: &str, version: Option<u32>, v: &SubjectVersion) {
        let Some(f) = self.cache_file(subject, version) else {
            return;
        };
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(f.parent().expect("in a directory"))?;
            let tmp = f.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec(v).expect("serializable"))?;
            std::fs::rename(&tmp, &f)
        };
        if let Err(e) = write() {
            tracing::warn!(subject, error = %e, "cannot keep the schema in the local cache");
        }
    }
}

/// A subject in a URL path segment (subjects may hold `/`, `.` and other characters).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn compile(v: &SubjectVersion, shape: &Shape) -> Result<Arc<Version>, String> {
    let format = shape.format;
    let ty = v.schema_type.as_deref().unwrap_or("AVRO");
    let checker = match (format, ty) {
        (SchemaFormat::Avro, "AVRO") => Checker::Avro(super::avro::Avro::parse(&v.schema)?),
        (SchemaFormat::Protobuf, "PROTOBUF") => Checker::Protobuf(
            super::protobuf::Protobuf::from_text(&v.schema, shape.message.as_deref())?,
        ),
        (SchemaFormat::JsonSchema, "JSON") => {
            Checker::Json(super::json::JsonSchema::parse(v.schema.as_bytes())?)
        }
        (_, ty) => {
            return Err(format!(
                "the registry's schema is {ty}, the stream expects {format:?}"
            ));
        }
    };
    Ok(Arc::new(Version {
        checker,
        label: super::label(format!(
            "subject={};version={};id={}",
            v.subject, v.version, v.id
        )),
        wire_id: Some(v.id),
    }))
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_are_escaped_in_paths() {
        assert_eq!(
            super::encode_segment("acme.Order-value"),
            "acme.Order-value"
        );
        assert_eq!(super::encode_segment("a/b c"), "a%2Fb%20c");
    }
}
