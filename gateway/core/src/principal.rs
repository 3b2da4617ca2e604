//! Who is producing and what it may do: the principal, its permissions, and why credentials
//! were not accepted. Pure vocabulary: authentication itself (API keys, JWTs, certificates)
//! lives in `sluice-auth`, which depends on this crate.

use std::sync::Arc;
use std::time::Duration;

/// Why credentials were not accepted. `method` and `reason` are short stable labels (metrics,
/// logs); `description` is for the producer and never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub method: &'static str,
    pub reason: &'static str,
    pub description: String,
    pub kind: FailureKind,
}

/// How a failure is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// 401: no credentials were presented where they are required.
    Missing,
    /// 401: the credentials are wrong (unknown, expired, malformed, not accepted here).
    Unauthenticated,
    /// 429: too many failures from this address; retry after the given time.
    Throttled(Duration),
    /// 503: the credentials cannot be checked now (e.g. no signing keys yet); retry later.
    Unavailable(Duration),
}

impl AuthFailure {
    pub fn new(method: &'static str, reason: &'static str, description: impl Into<String>) -> Self {
        Self {
            method,
            reason,
            description: description.into(),
            kind: FailureKind::Unauthenticated,
        }
    }
}

/// Who is producing, as established by authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    name: Arc<str>,
    /// Where the identity comes from: `api_key`, `jwt:<issuer>`, `mtls` or `anonymous`.
    source: Arc<str>,
    /// Source and name together: what sessions, connection limits, quota buckets and creation
    /// counts are keyed by, so that equal names from different methods stay apart.
    identity: Arc<str>,
    // Shared, so that handing a cached principal to every request is two reference counts.
    permissions: Arc<Permissions>,
    /// Streams it may read (docs/consume.md): separate from producing.
    consume: Arc<Permissions>,
    /// When the credential stops being valid (a JWT's `exp` plus leeway, an API key's
    /// `expires_at`); long-lived sessions are checked again then.
    expires_at: Option<std::time::SystemTime>,
    /// A JWT's string claims (at most [`MAX_CLAIMS`], each at most [`MAX_CLAIM_BYTES`]), for
    /// topic rules that bind a placeholder to one (docs/mqtt.md "Device-bound topics").
    claims: Option<Claims>,
}

/// A credential's claims, by name.
type Claims = Arc<[(Arc<str>, Arc<str>)]>;

/// Most claims a principal keeps.
pub const MAX_CLAIMS: usize = 32;
/// Longest claim value a principal keeps.
pub const MAX_CLAIM_BYTES: usize = 256;

impl Principal {
    /// The principal of producers that presented no credentials where that is allowed.
    pub fn anonymous() -> Self {
        Self {
            name: Arc::from("anonymous"),
            source: Arc::from("anonymous"),
            identity: Arc::from("anonymous\u{1f}anonymous"),
            permissions: Arc::new(Permissions::All),
            // Anonymous producers exist only where a listener admits them (loopback by default,
            // or `allow_anonymous = true`): there they may read what they may write.
            consume: Arc::new(Permissions::All),
            expires_at: None,
            claims: None,
        }
    }

    /// A named principal with the given permissions.
    pub fn new(name: impl Into<Arc<str>>, permissions: Permissions) -> Self {
        let name: Arc<str> = name.into();
        Self {
            identity: name.clone(),
            name,
            source: Arc::from(""),
            permissions: Arc::new(permissions),
            consume: Arc::new(Permissions::Streams(Vec::new())),
            expires_at: None,
            claims: None,
        }
    }

    /// The same principal, allowed to read the streams `consume` allows.
    pub fn consuming(mut self, consume: Permissions) -> Self {
        self.consume = Arc::new(consume);
        self
    }

    /// The same principal, established by `source` (`api_key`, `jwt:<issuer>`, `mtls`).
    pub fn with_source(mut self, source: &str) -> Self {
        self.source = Arc::from(source);
        self.identity = Arc::from(format!("{source}\u{1f}{}", self.name));
        self
    }

    /// Where this identity comes from (`api_key`, `jwt:<issuer>`, `mtls`, `anonymous`).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Source and name together (`source` U+001F `name`): the key of everything counted or kept
    /// per principal, so an API key's principal, a JWT subject and a certificate's name that
    /// happen to be equal are three identities, not one.
    pub fn identity(&self) -> &Arc<str> {
        &self.identity
    }

    /// The same principal, valid until `at`.
    pub fn expiring_at(mut self, at: std::time::SystemTime) -> Self {
        self.expires_at = Some(at);
        self
    }

    /// The same principal, with its credential's claims (bounded: past [`MAX_CLAIMS`] claims,
    /// and values over [`MAX_CLAIM_BYTES`], are not kept).
    pub fn with_claims(mut self, claims: impl IntoIterator<Item = (String, String)>) -> Self {
        let kept: Vec<(Arc<str>, Arc<str>)> = claims
            .into_iter()
            .filter(|(_, v)| v.len() <= MAX_CLAIM_BYTES)
            .take(MAX_CLAIMS)
            .map(|(k, v)| (Arc::from(k), Arc::from(v)))
            .collect();
        self.claims = (!kept.is_empty()).then(|| kept.into());
        self
    }

    /// The value of the credential's claim `name` (JWT principals), if it was kept.
    pub fn claim(&self, name: &str) -> Option<&str> {
        self.claims
            .as_ref()?
            .iter()
            .find(|(k, _)| &**k == name)
            .map(|(_, v)| &**v)
    }

    /// When the credential behind this principal stops being valid, if it does.
    pub fn expires_at(&self) -> Option<std::time::SystemTime> {
        self.expires_at
    }

    /// Whether `other` is the same identity with the same permissions (expiry aside).
    pub fn same_grant(&self, other: &Principal) -> bool {
        self.identity == other.identity
            && self.permissions == other.permissions
            && self.consume == other.consume
    }

    /// The principal's name, as recorded with its events.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether this principal may append to `stream`.
    pub fn may_produce_to(&self, stream: &str) -> bool {
        self.permissions.allows(stream)
    }

    /// Whether this principal may read `stream` (docs/consume.md).
    pub fn may_consume(&self, stream: &str) -> bool {
        self.consume.allows(stream)
    }
}

/// Streams a principal may produce to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permissions {
    /// Every stream.
    All,
    /// Streams matching any of these glob patterns (`*` any run of characters, `?` one).
    Streams(Vec<String>),
}

impl Permissions {
    /// Whether `stream` is allowed.
    pub fn allows(&self, stream: &str) -> bool {
        match self {
            Permissions::All => true,
            Permissions::Streams(patterns) => patterns.iter().any(|p| glob_match(p, stream)),
        }
    }
}

/// Matches `text` against `pattern`, where `*` stands for any run of characters and `?` for one.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("telemetry.*", "telemetry.eu"));
        assert!(!glob_match("telemetry.*", "telemetry"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a?c*", "abcdef"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*.v1", "orders.v1"));
        assert!(!glob_match("*.v1", "orders.v2"));
    }

    #[test]
    fn permissions() {
        let p = Principal::new("svc", Permissions::Streams(vec!["orders*".into()]));
        assert!(p.may_produce_to("orders"));
        assert!(!p.may_produce_to("payments"));
        assert!(Principal::anonymous().may_produce_to("anything"));
        // Reading is a permission of its own.
        assert!(!p.may_consume("orders"));
        let p = p.consuming(Permissions::Streams(vec!["orders.audit".into()]));
        assert!(p.may_consume("orders.audit") && !p.may_consume("orders"));
        assert!(p.may_produce_to("orders"));
        assert!(Principal::anonymous().may_consume("anything"));
    }

    #[test]
    fn claims_are_kept_bounded() {
        let long = "x".repeat(MAX_CLAIM_BYTES + 1);
        let p = Principal::new("d", Permissions::All).with_claims(
            [
                ("tenant".to_string(), "acme".to_string()),
                ("big".into(), long),
            ]
            .into_iter()
            .chain((0..100).map(|i| (format!("c{i:03}"), i.to_string()))),
        );
        assert_eq!(p.claim("tenant"), Some("acme"));
        assert_eq!(p.claim("big"), None, "too long to keep");
        assert_eq!(p.claim("c030"), Some("30"));
        assert_eq!(p.claim("c031"), None, "past MAX_CLAIMS");
        assert_eq!(Principal::anonymous().claim("tenant"), None);
    }
}
