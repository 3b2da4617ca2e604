//! The `[mqtt]` section and its topic → stream + key mapping rules.
//!
//! The rules are compiled here, where configuration is validated, so a bad pattern is reported
//! with its key path at startup, and the MQTT adapter matches topics against the compiled form.

use serde::Deserialize;

use crate::{Config, ListenerAuthConfig, Problems, TlsConfig, check_stream_name};

/// MQTT ingest: 3.1.1 and 5.0 over TCP, TLS, and WebSocket (`/mqtt` on the HTTP listener).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Serve MQTT at all (every transport).
    pub enabled: bool,
    /// Plain TCP listener; port 0 picks a free port (printed on stdout).
    pub listen: String,
    /// Serve plain TCP on `listen`. Turn off to accept MQTT over TLS only.
    pub plaintext: bool,
    /// The TLS listener's address, used when `[mqtt.tls]` is present.
    pub tls_listen: String,
    /// TLS (optionally with client certificates) on `tls_listen`.
    pub tls: Option<TlsConfig>,
    /// MQTT over WebSocket at `/mqtt` on the HTTP listener(s) (subprotocol `mqtt`).
    pub websocket: bool,
    /// Open connections per listener; beyond it new ones are closed right after accept.
    pub max_connections: usize,
    /// Open connections per principal over all MQTT listeners (0 = no limit).
    pub max_connections_per_principal: usize,
    /// Open connections per source address, per listener (0 = no limit: fleets behind one NAT
    /// address are common; set it where devices have their own addresses).
    pub max_connections_per_address: usize,
    /// Largest packet a client may send (announced as Maximum Packet Size in MQTT 5).
    pub max_packet_bytes: u32,
    /// QoS 1 and 2 publishes a connection may have unacknowledged (announced as Receive
    /// Maximum in MQTT 5; applied to 3.1.1 clients by not reading past it).
    pub receive_maximum: u16,
    /// Inbound topic aliases per MQTT 5 connection (0 = none).
    pub topic_alias_maximum: u16,
    /// A client must send CONNECT within this time after the connection opens.
    pub connect_timeout_ms: u64,
    /// The longest keep-alive the server accepts; clients asking for more (or for none) get
    /// this one (MQTT 5: as Server Keep Alive). Silence for 1.5× keep-alive closes the
    /// connection.
    pub max_keep_alive_secs: u16,
    /// Acks the client does not read within this time close the connection.
    pub write_timeout_ms: u64,
    /// How long a publish waits for an unavailable log (or an exhausted in-flight budget),
    /// with reading stopped, before MQTT 5 gets PUBACK 0x83 and MQTT 3.1.1 a disconnect.
    pub max_hold_ms: u64,
    /// Consecutive publishes over quota after which the connection is closed (MQTT 5:
    /// DISCONNECT 0x97, or 0x96 when they were QoS 0). 0 = never.
    pub quota_disconnect_after: u32,
    /// Longest Will Delay Interval honoured (MQTT 5); longer ones are shortened to it.
    pub max_will_delay_secs: u32,
    /// Wills waiting for their delay at once; past it a will is published at once.
    pub max_pending_wills: usize,
    /// Bytes of delayed wills waiting at once (each will's key, headers and payload); past it a
    /// will is published at once.
    pub max_pending_will_bytes: u64,
    /// Longest a persistent session outlives its connection: MQTT 5's Session Expiry Interval is
    /// shortened to it (and CONNACK says so); a 3.1.1 session with clean session 0 keeps it.
    /// 0 = no persistent sessions (every session is clean).
    pub max_session_expiry_secs: u32,
    /// Persistent sessions kept at once (connected or waiting for their device); past it the
    /// one expiring soonest is forgotten first.
    pub max_sessions: usize,
    /// Persistent sessions one principal keeps at once; past it that principal's session
    /// expiring soonest is forgotten first.
    pub max_sessions_per_principal: usize,
    /// Which credentials the MQTT listeners accept.
    pub auth: ListenerAuthConfig,
    /// Topic → stream and key rules, first match wins. None: the first topic level is the
    /// stream and the rest the key.
    pub topics: Vec<TopicRuleConfig>,
    /// Behind a load balancer: the PROXY protocol on the MQTT and MQTT-over-TLS listeners
    /// (`forwarded_headers` does not apply; MQTT over WebSocket follows `[http.proxy]`).
    pub proxy: crate::ProxyConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "127.0.0.1:1883".into(),
            plaintext: true,
            tls_listen: "127.0.0.1:8883".into(),
            tls: None,
            websocket: true,
            max_connections: 100_000,
            max_connections_per_principal: 10_000,
            max_connections_per_address: 0,
            max_packet_bytes: 1024 * 1024,
            receive_maximum: 256,
            topic_alias_maximum: 64,
            connect_timeout_ms: 10_000,
            max_keep_alive_secs: 600,
            write_timeout_ms: 10_000,
            max_hold_ms: 30_000,
            quota_disconnect_after: 1000,
            max_will_delay_secs: 3600,
            max_pending_wills: 100_000,
            max_pending_will_bytes: 64 * 1024 * 1024,
            max_session_expiry_secs: 7 * 24 * 3600,
            max_sessions: 100_000,
            max_sessions_per_principal: 100_000,
            auth: ListenerAuthConfig::default(),
            topics: Vec::new(),
            proxy: crate::ProxyConfig::default(),
        }
    }
}

/// One `[[mqtt.topics]]` rule.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicRuleConfig {
    /// Topic levels separated by `/`: literal levels, `{name}` for one level, and a last
    /// `{name+}` for one or more levels.
    pub pattern: String,
    /// The stream; may use the pattern's placeholders, e.g. `{site}-telemetry`.
    pub stream: String,
    /// The event key; may use the pattern's placeholders. Absent: no key.
    pub key: Option<String>,
    /// The event id; may use the pattern's placeholders, e.g. `{device}-{seq}`: the event's
    /// dedup key on streams with dedup (docs/exactly-once.md). Absent: none (an MQTT 5 `id`
    /// user property still gives one, and wins).
    #[serde(default)]
    pub id: Option<String>,
    /// Placeholders bound to the connection's identity, like AWS IoT policy variables:
    /// `bind = { device = "client_id" }` lets a device publish only under its own client id.
    /// Sources: `client_id`, `principal`, `cert_cn`, `cert_san_dns`, `cert_san_uri`,
    /// `claim:<name>` (a JWT claim). A publish whose placeholder differs is refused (MQTT 5
    /// PUBACK 0x87; 3.1.1: the connection is closed).
    #[serde(default)]
    pub bind: std::collections::BTreeMap<String, String>,
}

/// Where a bound placeholder's value must come from (`[[mqtt.topics]] bind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityField {
    /// The MQTT client identifier.
    ClientId,
    /// The principal's name.
    Principal,
    /// A subject common name of the client certificate.
    CertCn,
    /// A DNS name among the client certificate's subject alternative names.
    CertSanDns,
    /// A URI among the client certificate's subject alternative names.
    CertSanUri,
    /// A claim of the JWT the device connected with.
    Claim(String),
}

impl IdentityField {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "client_id" => Self::ClientId,
            "principal" => Self::Principal,
            "cert_cn" => Self::CertCn,
            "cert_san_dns" => Self::CertSanDns,
            "cert_san_uri" => Self::CertSanUri,
            _ => match s.strip_prefix("claim:") {
                Some(c) if !c.is_empty() => Self::Claim(c.to_string()),
                _ => {
                    return Err(format!(
                        "`{s}` is not an identity: use client_id, principal, cert_cn, cert_san_dns, cert_san_uri or claim:<name>"
                    ));
                }
            },
        })
    }

    /// Whether the value comes from the client certificate.
    pub fn is_cert(&self) -> bool {
        matches!(self, Self::CertCn | Self::CertSanDns | Self::CertSanUri)
    }
}

impl std::fmt::Display for IdentityField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClientId => f.write_str("client_id"),
            Self::Principal => f.write_str("principal"),
            Self::CertCn => f.write_str("cert_cn"),
            Self::CertSanDns => f.write_str("cert_san_dns"),
            Self::CertSanUri => f.write_str("cert_san_uri"),
            Self::Claim(c) => write!(f, "claim:{c}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Level {
    Literal(String),
    One(String),
    Rest(String),
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Var(String),
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    levels: Vec<Level>,
    stream: Vec<Part>,
    key: Option<Vec<Part>>,
    id: Option<Vec<Part>>,
    binds: Vec<(String, IdentityField)>,
}

/// Where a topic goes: its stream, and the key and id of its events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    pub stream: String,
    pub key: Option<String>,
    pub id: Option<String>,
    /// What the topic's bound placeholders captured, each to be equal to the connection's
    /// identity field.
    pub binds: Vec<(IdentityField, String)>,
}

/// The compiled `[[mqtt.topics]]` rules.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TopicMap {
    rules: Vec<Rule>,
}

/// Why a topic has no stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicError {
    /// No rule matches the topic.
    Unmapped,
    /// A rule matched but the stream it names is not a valid stream name.
    BadStream(String),
}

impl std::fmt::Display for TopicError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopicError::Unmapped => f.write_str("no [[mqtt.topics]] rule matches the topic"),
            TopicError::BadStream(m) => f.write_str(m),
        }
    }
}

fn parse_template(t: &str, vars: &[&str]) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("`{t}`: `{{` without `}}`"))?
            + open;
        let name = &rest[open + 1..close];
        if !vars.contains(&name) {
            return Err(format!(
                "`{t}` uses `{{{name}}}`, which the pattern does not capture"
            ));
        }
        parts.push(Part::Var(name.to_string()));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("`{t}`: `}}` without `{{`"));
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    Ok(parts)
}

impl TopicMap {
    /// Compiles the rules; errors name the rule's index and what is wrong.
    pub fn compile(rules: &[TopicRuleConfig]) -> Result<Self, (usize, String)> {
        let mut out = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            out.push(Self::compile_one(r).map_err(|m| (i, m))?);
        }
        Ok(Self { rules: out })
    }

    fn compile_one(r: &TopicRuleConfig) -> Result<Rule, String> {
        if r.pattern.is_empty() {
            return Err("pattern is empty".into());
        }
        let raw: Vec<&str> = r.pattern.split('/').collect();
        let mut levels = Vec::with_capacity(raw.len());
        let mut names: Vec<&str> = Vec::new();
        for (i, l) in raw.iter().enumerate() {
            let level = if let Some(inner) = l.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
                let (name, rest) = match inner.strip_suffix('+') {
                    Some(n) => (n, true),
                    None => (inner, false),
                };
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!(
                        "pattern `{}`: `{l}` is not a placeholder like {{device}} or {{path+}}",
                        r.pattern
                    ));
                }
                if names.contains(&name) {
                    return Err(format!(
                        "pattern `{}`: `{{{name}}}` appears twice",
                        r.pattern
                    ));
                }
                names.push(name);
                if rest {
                    if i + 1 != raw.len() {
                        return Err(format!(
                            "pattern `{}`: `{l}` must be the last level",
                            r.pattern
                        ));
                    }
                    Level::Rest(name.to_string())
                } else {
                    Level::One(name.to_string())
                }
            } else if l.contains(['{', '}']) {
                return Err(format!(
                    "pattern `{}`: a placeholder must be a whole level, not `{l}`",
                    r.pattern
                ));
            } else if l.contains(['+', '#']) {
                return Err(format!(
                    "pattern `{}`: use `{{name}}` and `{{name+}}` instead of MQTT wildcards",
                    r.pattern
                ));
            } else {
                Level::Literal(l.to_string())
            };
            levels.push(level);
        }
        let stream = parse_template(&r.stream, &names)?;
        if let [Part::Text(s)] = stream.as_slice() {
            check_stream_name(s).map_err(|e| format!("stream `{s}`: {e}"))?;
        }
        if stream.is_empty() {
            return Err("stream is empty".into());
        }
        let key = r
            .key
            .as_deref()
            .map(|k| parse_template(k, &names))
            .transpose()?;
        let id =
            r.id.as_deref()
                .map(|k| parse_template(k, &names))
                .transpose()?;
        let mut binds = Vec::with_capacity(r.bind.len());
        for (var, field) in &r.bind {
            if !names.contains(&var.as_str()) {
                return Err(format!(
                    "bind `{var}`: the pattern `{}` has no placeholder {{{var}}}",
                    r.pattern
                ));
            }
            binds.push((
                var.clone(),
                IdentityField::parse(field).map_err(|e| format!("bind `{var}`: {e}"))?,
            ));
        }
        Ok(Rule {
            levels,
            stream,
            key,
            id,
            binds,
        })
    }

    /// Whether a rule binds a placeholder to the client certificate (the session then reads
    /// its certificate's names once, at CONNECT).
    pub fn binds_cert(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.binds.iter().any(|(_, f)| f.is_cert()))
    }

    /// Whether no rule is configured (the default mapping applies).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The stream and key of `topic`: the first matching rule's, or with no rules the first
    /// level as the stream and the remaining levels (if any) as the key.
    pub fn map(&self, topic: &str) -> Result<(String, Option<String>), TopicError> {
        self.resolve(topic).map(|m| (m.stream, m.key))
    }

    /// The stream, key and id of `topic` (see [`TopicMap::map`]; only rules give an id).
    pub fn resolve(&self, topic: &str) -> Result<Mapped, TopicError> {
        let levels: Vec<&str> = topic.split('/').collect();
        if self.rules.is_empty() {
            let stream = levels[0];
            check_stream_name(stream).map_err(|e| {
                TopicError::BadStream(format!(
                    "the topic's first level `{stream}` is the stream, and {e}"
                ))
            })?;
            let key = topic.split_once('/').map(|(_, k)| k.to_string());
            return Ok(Mapped {
                stream: stream.to_string(),
                key,
                id: None,
                binds: Vec::new(),
            });
        }
        'rules: for rule in &self.rules {
            let mut vars: Vec<(&str, String)> = Vec::new();
            for (i, l) in rule.levels.iter().enumerate() {
                match l {
                    Level::Literal(t) => {
                        if levels.get(i) != Some(&t.as_str()) {
                            continue 'rules;
                        }
                    }
                    Level::One(n) => match levels.get(i) {
                        Some(v) if !v.is_empty() => vars.push((n, v.to_string())),
                        _ => continue 'rules,
                    },
                    Level::Rest(n) => {
                        if levels.len() <= i {
                            continue 'rules;
                        }
                        vars.push((n, levels[i..].join("/")));
                    }
                }
            }
            if !matches!(rule.levels.last(), Some(Level::Rest(_)))
                && levels.len() != rule.levels.len()
            {
                continue;
            }
            let render = |parts: &[Part]| {
                let mut s = String::new();
                for p in parts {
                    match p {
                        Part::Text(t) => s.push_str(t),
                        Part::Var(v) => {
                            if let Some((_, val)) = vars.iter().find(|(n, _)| n == v) {
                                s.push_str(val);
                            }
                        }
                    }
                }
                s
            };
            let stream = render(&rule.stream);
            check_stream_name(&stream).map_err(|e| {
                TopicError::BadStream(format!("the rule maps the topic to stream `{stream}`: {e}"))
            })?;
            let key = rule.key.as_deref().map(render);
            let id = rule.id.as_deref().map(render);
            let binds = rule
                .binds
                .iter()
                .map(|(var, field)| {
                    let value = vars.iter().find(|(n, _)| n == var).map(|(_, v)| v.clone());
                    (field.clone(), value.unwrap_or_default())
                })
                .collect();
            return Ok(Mapped {
                stream,
                key,
                id,
                binds,
            });
        }
        Err(TopicError::Unmapped)
    }
}

impl Config {
    pub(crate) fn validate_mqtt(&self, p: &mut Problems) {
        let m = &self.mqtt;
        if !m.enabled {
            return;
        }
        if !m.plaintext && m.tls.is_none() && !m.websocket {
            p.add(
                "mqtt.plaintext",
                "is false, and neither [mqtt.tls] nor mqtt.websocket is on: MQTT has no listener (set mqtt.enabled = false instead)",
            );
        }
        for (key, v, lo, hi) in [
            ("max_connections", m.max_connections as u64, 1, 10_000_000),
            (
                "max_packet_bytes",
                u64::from(m.max_packet_bytes),
                64,
                256 * 1024 * 1024,
            ),
            ("receive_maximum", u64::from(m.receive_maximum), 1, 65_535),
            ("connect_timeout_ms", m.connect_timeout_ms, 100, 600_000),
            (
                "max_keep_alive_secs",
                u64::from(m.max_keep_alive_secs),
                1,
                65_535,
            ),
            ("write_timeout_ms", m.write_timeout_ms, 10, 3_600_000),
            ("max_hold_ms", m.max_hold_ms, 0, 3_600_000),
            (
                "max_pending_will_bytes",
                m.max_pending_will_bytes,
                0,
                1 << 40,
            ),
            (
                "max_pending_wills",
                m.max_pending_wills as u64,
                0,
                10_000_000,
            ),
            (
                "max_session_expiry_secs",
                u64::from(m.max_session_expiry_secs),
                0,
                u64::from(u32::MAX),
            ),
            ("max_sessions", m.max_sessions as u64, 0, 100_000_000),
            (
                "max_sessions_per_principal",
                m.max_sessions_per_principal as u64,
                0,
                100_000_000,
            ),
        ] {
            p.in_range(format!("mqtt.{key}"), v, lo, hi);
        }
        if let Err((i, e)) = TopicMap::compile(&m.topics) {
            p.add(format!("mqtt.topics[{i}]"), e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str, stream: &str, key: Option<&str>) -> TopicRuleConfig {
        TopicRuleConfig {
            id: None,
            pattern: pattern.into(),
            stream: stream.into(),
            key: key.map(str::to_string),
            bind: Default::default(),
        }
    }

    #[test]
    fn default_mapping_splits_the_first_level() {
        let m = TopicMap::default();
        assert_eq!(
            m.map("factory1/line3/temp").unwrap(),
            ("factory1".into(), Some("line3/temp".into()))
        );
        assert_eq!(m.map("alone").unwrap(), ("alone".into(), None));
        assert!(matches!(
            m.map("bad stream/x"),
            Err(TopicError::BadStream(_))
        ));
        assert!(matches!(m.map("/x"), Err(TopicError::BadStream(_))));
    }

    #[test]
    fn first_matching_rule_wins_and_fills_placeholders() {
        let m = TopicMap::compile(&[
            rule("devices/{device}/telemetry", "telemetry", Some("{device}")),
            rule("sites/{site}/{rest+}", "{site}-events", Some("{rest}")),
            rule("devices/{device}/{kind}", "other", None),
        ])
        .unwrap();
        assert_eq!(
            m.map("devices/d7/telemetry").unwrap(),
            ("telemetry".into(), Some("d7".into()))
        );
        assert_eq!(
            m.map("sites/berlin/a/b/c").unwrap(),
            ("berlin-events".into(), Some("a/b/c".into()))
        );
        assert_eq!(m.map("devices/d7/status").unwrap(), ("other".into(), None));
        let with_id = TopicMap::compile(&[TopicRuleConfig {
            id: Some("{device}-{seq}".into()),
            ..rule(
                "devices/{device}/readings/{seq}",
                "readings",
                Some("{device}"),
            )
        }])
        .unwrap();
        assert_eq!(
            with_id.resolve("devices/d7/readings/41").unwrap(),
            Mapped {
                stream: "readings".into(),
                key: Some("d7".into()),
                id: Some("d7-41".into()),
                binds: Vec::new(),
            }
        );
        assert_eq!(m.map("devices/d7/telemetry/x"), Err(TopicError::Unmapped));
        assert_eq!(m.map("sites/berlin"), Err(TopicError::Unmapped));
        // An empty level never fills a placeholder.
        assert_eq!(m.map("devices//telemetry"), Err(TopicError::Unmapped));
        assert!(matches!(
            m.map("sites/a b/x"),
            Err(TopicError::BadStream(_))
        ));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (r, want) in [
            (rule("a/{x}", "{y}", None), "does not capture"),
            (rule("a/{x+}/b", "s", None), "last level"),
            (rule("a/+/b", "s", None), "wildcards"),
            (rule("a/{x}{y}", "s", None), "not a placeholder"),
            (rule("a/x{y}", "s", None), "whole level"),
            (rule("a/{x}/{x}", "s", None), "twice"),
            (rule("a", "bad stream", None), "stream `bad stream`"),
            (rule("", "s", None), "empty"),
            (
                TopicRuleConfig {
                    bind: [("device".to_string(), "client_id".to_string())].into(),
                    ..rule("a/{x}", "s", None)
                },
                "no placeholder {device}",
            ),
            (
                TopicRuleConfig {
                    bind: [("x".to_string(), "password".to_string())].into(),
                    ..rule("a/{x}", "s", None)
                },
                "not an identity",
            ),
        ] {
            let e = TopicMap::compile(&[r]).unwrap_err().1;
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn bound_placeholders_report_what_they_captured() {
        let m = TopicMap::compile(&[TopicRuleConfig {
            bind: [
                ("device".to_string(), "client_id".to_string()),
                ("tenant".to_string(), "claim:tenant".to_string()),
            ]
            .into(),
            ..rule(
                "t/{tenant}/d/{device}/{rest+}",
                "telemetry",
                Some("{device}"),
            )
        }])
        .unwrap();
        assert!(!m.binds_cert());
        let got = m.resolve("t/acme/d/pump-7/temp/c").unwrap();
        assert_eq!(
            got.binds,
            [
                (IdentityField::ClientId, "pump-7".to_string()),
                (IdentityField::Claim("tenant".into()), "acme".to_string()),
            ]
        );
    }
}
