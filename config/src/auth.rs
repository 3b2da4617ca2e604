//! `[auth]`: API keys, JWT issuers, mTLS rules, failure limits; and the per-listener
//! `auth` tables (which methods a listener accepts, whether it admits anonymous producers).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::{Config, Problems};

/// A credential type a listener can accept.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ApiKey,
    Jwt,
    Mtls,
}

/// Which credentials a listener accepts.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerAuthConfig {
    pub methods: Vec<AuthMethod>,
    /// Producers without credentials are `anonymous` (which may produce to every stream).
    /// Unset: allowed only when the listener is bound to a loopback address.
    pub allow_anonymous: Option<bool>,
}

impl Default for ListenerAuthConfig {
    fn default() -> Self {
        Self {
            methods: vec![AuthMethod::ApiKey, AuthMethod::Jwt, AuthMethod::Mtls],
            allow_anonymous: None,
        }
    }
}

impl ListenerAuthConfig {
    /// Whether anonymous producers are allowed on a listener bound to `listen`.
    pub fn anonymous_allowed(&self, listen: &str) -> bool {
        self.allow_anonymous.unwrap_or_else(|| {
            listen
                .parse::<SocketAddr>()
                .is_ok_and(|a| a.ip().is_loopback())
        })
    }
}

/// A secret string: never printed by `Debug`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Credentials and how they map to principals.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_keys: Vec<ApiKeyConfig>,
    pub jwt: JwtConfig,
    pub mtls: MtlsConfig,
    pub failures: FailureLimitConfig,
}

/// One API key. The secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The key's public id; the key presented by a producer is `{id}.{secret}`.
    pub id: String,
    /// Lower-case hex SHA-256 of the whole key `{id}.{secret}` (`sluice keys new` prints it).
    pub secret_sha256: String,
    /// The principal this key authenticates as.
    pub principal: String,
    /// Glob patterns of the streams it may produce to.
    pub streams: Vec<String>,
    /// Glob patterns of the streams it may read (docs/consume.md); none by default.
    #[serde(default)]
    pub consume: Vec<String>,
    /// After this instant (RFC 3339 with offset, as a TOML date-time or a string) the key is
    /// refused.
    #[serde(default, deserialize_with = "datetime_or_string")]
    pub expires_at: Option<String>,
    #[serde(default)]
    pub disabled: bool,
}

/// OAuth2 bearer JWTs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    pub issuers: Vec<IssuerConfig>,
    /// Verified tokens remembered (until they expire) so each is verified once.
    pub cache_max_entries: usize,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuers: Vec::new(),
            cache_max_entries: 10_000,
        }
    }
}

/// One trusted token issuer.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// The token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// Accepted `alg` values: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA, HS256.
    pub algorithms: Vec<String>,
    /// A JWKS document on disk (re-read on the refresh interval).
    pub jwks_file: Option<PathBuf>,
    /// A JWKS URL (http or https).
    pub jwks_url: Option<String>,
    /// Extra PEM CA bundle for an https JWKS URL (besides the system roots).
    pub jwks_ca_file: Option<PathBuf>,
    /// Shared secret for HS256; HS256 is accepted only when this is set.
    pub hs256_secret: Option<Secret>,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_interval_ms: u64,
    /// An unknown `kid` triggers a refresh at most this often.
    #[serde(default = "default_jwks_min_refresh")]
    pub jwks_min_refresh_interval_ms: u64,
    /// The claim naming the principal.
    #[serde(default = "default_principal_claim")]
    pub principal_claim: String,
    /// The claim holding permissions: a space-separated string (like `scope`) or an array.
    #[serde(default = "default_permissions_claim")]
    pub permissions_claim: String,
    /// Entries of the permissions claim that start with this prefix grant production to the
    /// stream pattern that follows it (`produce:telemetry.*`). Empty: every entry is a pattern.
    #[serde(default = "default_permission_prefix")]
    pub permission_prefix: String,
    /// Entries of the permissions claim that start with this prefix grant reading the stream
    /// pattern that follows it (`consume:telemetry.*`; docs/consume.md).
    #[serde(default = "default_consume_prefix")]
    pub consume_prefix: String,
}

fn default_leeway() -> u64 {
    30
}

fn default_jwks_refresh() -> u64 {
    300_000
}

fn default_jwks_min_refresh() -> u64 {
    10_000
}

fn default_principal_claim() -> String {
    "sub".into()
}

fn default_permissions_claim() -> String {
    "scope".into()
}

fn default_permission_prefix() -> String {
    "produce:".into()
}

fn default_consume_prefix() -> String {
    "consume:".into()
}

/// Client certificates to principals.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MtlsConfig {
    /// Tried in order; the first rule whose pattern matches decides.
    pub rules: Vec<MtlsRule>,
}

/// Which part of a client certificate a rule looks at.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CertField {
    /// A URI subject alternative name, e.g. a SPIFFE id.
    SanUri,
    /// A DNS subject alternative name.
    SanDns,
    /// The subject's common name.
    Cn,
}

/// One mapping rule from a certificate to a principal.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MtlsRule {
    pub field: CertField,
    /// Glob pattern the field's value must match.
    pub pattern: String,
    /// The principal; `{value}` stands for the matched value. Default: the value itself.
    pub principal: Option<String>,
    /// Glob patterns of the streams it may produce to.
    pub streams: Vec<String>,
    /// Glob patterns of the streams it may read (docs/consume.md); none by default.
    #[serde(default)]
    pub consume: Vec<String>,
}

/// Limits on failed authentications per source address.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FailureLimitConfig {
    /// Failures allowed per address within a window; beyond it the address gets 429.
    pub max_failures: u32,
    pub window_ms: u64,
    /// Most addresses tracked at once (older windows are dropped first); also the most
    /// remembered credentials.
    pub max_tracked_addresses: usize,
    /// Credentials that authenticated within this time still get in from a throttled address,
    /// so producers behind one NAT are not locked out by a guesser there (0 = never).
    pub remember_ok_ms: u64,
}

impl Default for FailureLimitConfig {
    fn default() -> Self {
        Self {
            max_failures: 20,
            window_ms: 60_000,
            max_tracked_addresses: 100_000,
            remember_ok_ms: 3_600_000,
        }
    }
}

/// JWT algorithms Sluice verifies.
pub const JWT_ALGORITHMS: [&str; 10] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA", "HS256",
];

impl Config {
    pub(crate) fn validate_auth(&self, p: &mut Problems) {
        let mut ids = std::collections::HashSet::new();
        for (i, k) in self.auth.api_keys.iter().enumerate() {
            let at = |key: &str| format!("auth.api_keys[{i}].{key}");
            if k.id.is_empty()
                || !k
                    .id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                p.add(
                    at("id"),
                    format!("`{}` must be 1+ characters of a-z A-Z 0-9 - _", k.id),
                );
            }
            if !ids.insert(k.id.as_str()) {
                p.add(at("id"), format!("`{}` is used by another key", k.id));
            }
            if k.secret_sha256.len() != 64
                || !k
                    .secret_sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
            {
                p.add(
                    at("secret_sha256"),
                    "must be 64 lower-case hex digits (`sluice keys new` prints it)",
                );
            }
            if k.principal.is_empty() {
                p.add(at("principal"), "must not be empty");
            }
            if let Some(t) = &k.expires_at
                && !t
                    .parse::<toml::value::Datetime>()
                    .is_ok_and(|t| t.date.is_some() && t.time.is_some() && t.offset.is_some())
            {
                p.add(
                    at("expires_at"),
                    "must be a date-time with an offset, e.g. 2027-01-01T00:00:00Z",
                );
            }
        }
        let mut issuers = std::collections::HashSet::new();
        for (i, iss) in self.auth.jwt.issuers.iter().enumerate() {
            let at = |key: &str| format!("auth.jwt.issuers[{i}].{key}");
            if iss.issuer.is_empty() {
                p.add(at("issuer"), "must not be empty");
            }
            if !issuers.insert(iss.issuer.as_str()) {
                p.add(
                    at("issuer"),
                    format!("`{}` is configured twice", iss.issuer),
                );
            }
            if iss.audiences.is_empty() {
                p.add(at("audiences"), "must name at least one audience");
            }
            if iss.algorithms.is_empty() {
                p.add(at("algorithms"), "must name at least one algorithm");
            }
            for a in &iss.algorithms {
                if !JWT_ALGORITHMS.contains(&a.as_str()) {
                    p.add(
                        at("algorithms"),
                        format!("`{a}` is not one of {}", JWT_ALGORITHMS.join(", ")),
                    );
                }
            }
            let hs = iss.algorithms.iter().any(|a| a == "HS256");
            match (&iss.hs256_secret, hs) {
                (Some(_), false) => {
                    p.add(at("hs256_secret"), "is set but HS256 is not in algorithms")
                }
                (None, true) => p.add(
                    at("algorithms"),
                    "HS256 needs hs256_secret (it is never verified with a public key)",
                ),
                (Some(sec), true) if sec.0.len() < 32 => {
                    p.add(at("hs256_secret"), "must be at least 32 bytes")
                }
                _ => {}
            }
            let asymmetric = iss.algorithms.iter().any(|a| a != "HS256");
            match (&iss.jwks_file, &iss.jwks_url) {
                (Some(_), Some(_)) => {
                    p.add(at("jwks_url"), "set either jwks_file or jwks_url, not both")
                }
                (None, None) if asymmetric => p.add(
                    at("jwks_url"),
                    "public-key algorithms need jwks_file or jwks_url",
                ),
                _ => {}
            }
            if let Some(u) = &iss.jwks_url
                && !(u.starts_with("http://") || u.starts_with("https://"))
            {
                p.add(
                    at("jwks_url"),
                    format!("`{u}` must be an http:// or https:// URL"),
                );
            }
            if iss.jwks_refresh_interval_ms < 1000 {
                p.add(at("jwks_refresh_interval_ms"), "must be at least 1000");
            }
            if iss.principal_claim.is_empty() {
                p.add(at("principal_claim"), "must not be empty");
            }
        }
        for (i, r) in self.auth.mtls.rules.iter().enumerate() {
            if r.pattern.is_empty() {
                p.add(format!("auth.mtls.rules[{i}].pattern"), "must not be empty");
            }
        }
        let f = &self.auth.failures;
        if f.max_failures == 0 || f.window_ms == 0 || f.max_tracked_addresses == 0 {
            p.add(
                "auth.failures",
                "max_failures, window_ms and max_tracked_addresses must be at least 1",
            );
        }
    }
}

/// Accepts a TOML date-time or a string holding one; keeps its RFC 3339 text.
fn datetime_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Datetime(toml::value::Datetime),
        Text(String),
    }
    Ok(Option::<Either>::deserialize(d)?.map(|e| match e {
        Either::Datetime(t) => t.to_string(),
        Either::Text(s) => s,
    }))
}
