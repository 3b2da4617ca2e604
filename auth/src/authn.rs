//! One place where every protocol turns credentials into a principal.

use std::net::IpAddr;
use std::time::Instant;

use sluice_config::{AuthConfig, AuthMethod, ProducerTransport};

use crate::apikey::ApiKeys;
use crate::failures::{FailureLimiter, KnownGood};
use crate::jwt::JwtVerifier;
use crate::mtls::MtlsMapper;
use crate::{AuthFailure, FailureKind, Principal};

/// What a listener accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerPolicy {
    pub methods: Vec<AuthMethod>,
    pub allow_anonymous: bool,
}

impl ListenerPolicy {
    /// The policy of one producer transport (`Config::producer_transports` decides it).
    pub fn of(transport: &ProducerTransport) -> Self {
        Self {
            methods: transport.methods.clone(),
            allow_anonymous: transport.allow_anonymous,
        }
    }

    /// Nothing accepted (a transport that is not served).
    pub fn closed() -> Self {
        Self {
            methods: Vec::new(),
            allow_anonymous: false,
        }
    }

    /// Anonymous allowed, every method accepted (tests, loopback defaults).
    pub fn open() -> Self {
        Self {
            methods: vec![AuthMethod::ApiKey, AuthMethod::Jwt, AuthMethod::Mtls],
            allow_anonymous: true,
        }
    }
}

/// The credentials a producer presented.
#[derive(Debug, Clone, Copy, Default)]
pub struct Credentials<'a> {
    /// The `Authorization` header (or its protocol's equivalent), e.g. `Bearer …`.
    pub authorization: Option<&'a str>,
    /// An API key presented on its own (`X-API-Key`, an MQTT password, `?api_key=`).
    pub api_key: Option<&'a str>,
    /// A bearer token presented on its own (`?access_token=`, a WebSocket subprotocol).
    pub bearer: Option<&'a str>,
    /// The verified client certificate (DER) of the connection, if any.
    pub client_cert: Option<&'a [u8]>,
}

impl Credentials<'_> {
    /// Whether nothing at all was presented.
    pub fn is_empty(&self) -> bool {
        self.authorization.is_none()
            && self.api_key.is_none()
            && self.bearer.is_none()
            && self.client_cert.is_none()
    }
}

/// [`Credentials`] kept by a long-lived session (MQTT, WebSocket, gRPC stream) so that its
/// principal can be checked again after a reload or when the credential expires.
#[derive(Clone, Default)]
pub struct OwnedCredentials {
    authorization: Option<String>,
    api_key: Option<String>,
    bearer: Option<String>,
    client_cert: Option<std::sync::Arc<[u8]>>,
}

impl std::fmt::Debug for OwnedCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OwnedCredentials(<redacted>)")
    }
}

impl OwnedCredentials {
    /// A copy of `c` (the certificate is shared, not copied).
    pub fn of(c: &Credentials<'_>, client_cert: Option<std::sync::Arc<[u8]>>) -> Self {
        Self {
            authorization: c.authorization.map(str::to_string),
            api_key: c.api_key.map(str::to_string),
            bearer: c.bearer.map(str::to_string),
            client_cert,
        }
    }

    /// The credentials, borrowed.
    pub fn as_credentials(&self) -> Credentials<'_> {
        Credentials {
            authorization: self.authorization.as_deref(),
            api_key: self.api_key.as_deref(),
            bearer: self.bearer.as_deref(),
            client_cert: self.client_cert.as_deref(),
        }
    }
}

/// API keys, JWT issuers and mTLS rules, with failure limiting per source address.
pub struct Authenticator {
    api_keys: ApiKeys,
    jwt: JwtVerifier,
    mtls: MtlsMapper,
    failures: FailureLimiter,
    known_good: KnownGood,
}

fn method_not_allowed(method: &'static str) -> AuthFailure {
    AuthFailure::new(
        method,
        "method_not_allowed",
        format!("this listener does not accept {method} credentials"),
    )
}

impl Authenticator {
    /// From configuration; fails if a JWKS file cannot be read or a TLS root cannot load.
    pub fn new(cfg: &AuthConfig) -> Result<Self, String> {
        Ok(Self {
            api_keys: ApiKeys::new(&cfg.api_keys),
            jwt: JwtVerifier::new(&cfg.jwt)?,
            mtls: MtlsMapper::new(&cfg.mtls.rules),
            failures: FailureLimiter::new(&cfg.failures),
            known_good: KnownGood::new(&cfg.failures),
        })
    }

    /// Fetches JWKS URLs and starts key refreshes.
    pub async fn start(&self) {
        self.jwt.start().await;
    }

    /// The principal behind `creds` on a listener with `policy`, from source address `peer`.
    /// Failed attempts count against `peer`; past the limit it gets a throttling failure.
    pub async fn authenticate(
        &self,
        policy: &ListenerPolicy,
        peer: IpAddr,
        creds: Credentials<'_>,
    ) -> Result<Principal, AuthFailure> {
        let now = Instant::now();
        if let Some(wait) = self.failures.blocked(peer, now)
            && !self.known_good.knows(&digest_of(&creds), now)
        {
            // Only credentials that authenticated recently get through a throttled address;
            // anything else is refused without being checked, so guessing gains nothing.
            return Err(AuthFailure {
                kind: FailureKind::Throttled(wait),
                ..AuthFailure::new(
                    "any",
                    "too_many_failures",
                    "too many failed authentication attempts from this address",
                )
            });
        }
        let result = self.check(policy, creds).await;
        match &result {
            Err(f) if matches!(f.kind, FailureKind::Unauthenticated | FailureKind::Missing) => {
                self.failures.record(peer, now);
            }
            Ok(_) if !creds.is_empty() => self.known_good.record(digest_of(&creds), now),
            _ => {}
        }
        result
    }

    /// The principal behind `creds` now, for a session that authenticated before: no failure
    /// limiting (the session is not guessing), the configuration of this authenticator.
    pub async fn recheck(
        &self,
        policy: &ListenerPolicy,
        creds: Credentials<'_>,
    ) -> Result<Principal, AuthFailure> {
        self.check(policy, creds).await
    }

    async fn check(
        &self,
        policy: &ListenerPolicy,
        creds: Credentials<'_>,
    ) -> Result<Principal, AuthFailure> {
        let allows = |m| policy.methods.contains(&m);
        // Explicit credentials win over the connection's certificate.
        let token = match (creds.api_key, creds.authorization, creds.bearer) {
            (Some(key), _, _) => {
                return if allows(AuthMethod::ApiKey) {
                    self.api_keys.verify(key)
                } else {
                    Err(method_not_allowed("api_key"))
                };
            }
            // `Basic base64(id:secret)`, as Kafka REST clients send an API key: the key
            // `id.secret`.
            (None, Some(h), _) if basic_of(h).is_some() => {
                let key = basic_of(h)
                    .expect("checked")
                    .map_err(|m| AuthFailure::new("api_key", "malformed", m))?;
                return if allows(AuthMethod::ApiKey) {
                    self.api_keys.verify(&key)
                } else {
                    Err(method_not_allowed("api_key"))
                };
            }
            (None, Some(h), _) => Some(bearer_of(h)?),
            (None, None, t) => t,
        };
        if let Some(token) = token {
            // A JWT has three dot-separated parts; an API key (`id.secret`) has two.
            return if token.matches('.').count() == 2 {
                if allows(AuthMethod::Jwt) {
                    self.jwt.verify(token).await
                } else {
                    Err(method_not_allowed("jwt"))
                }
            } else if allows(AuthMethod::ApiKey) {
                self.api_keys.verify(token)
            } else {
                Err(method_not_allowed("api_key"))
            };
        }
        if let Some(cert) = creds.client_cert
            && allows(AuthMethod::Mtls)
        {
            return self.mtls.map(cert);
        }
        if policy.allow_anonymous {
            return Ok(Principal::anonymous());
        }
        Err(AuthFailure {
            kind: FailureKind::Missing,
            ..AuthFailure::new(
                "none",
                "missing",
                "credentials are required: an API key, a bearer token or a client certificate",
            )
        })
    }
}

/// SHA-256 over every credential presented (each tagged and length-prefixed).
fn digest_of(c: &Credentials<'_>) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for (tag, part) in [
        (b'a', c.authorization.map(str::as_bytes)),
        (b'k', c.api_key.map(str::as_bytes)),
        (b'b', c.bearer.map(str::as_bytes)),
        (b'c', c.client_cert),
    ] {
        if let Some(p) = part {
            ctx.update(&[tag]);
            ctx.update(&(p.len() as u64).to_le_bytes());
            ctx.update(p);
        }
    }
    ctx.finish().as_ref().try_into().expect("32 bytes")
}

/// The API key of an `Authorization: Basic` header (`id:secret` → `id.secret`); `None` for
/// other schemes.
fn basic_of(header: &str) -> Option<Result<String, &'static str>> {
    use base64::Engine as _;
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let bad = "the Authorization header must be `Basic base64(<key id>:<secret>)`";
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|t| {
                let (id, secret) = t.split_once(':')?;
                (!id.is_empty() && !secret.is_empty()).then(|| format!("{id}.{secret}"))
            })
            .ok_or(bad),
    )
}

fn bearer_of(header: &str) -> Result<&str, AuthFailure> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header, ""));
    let token = rest.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthFailure::new(
            "none",
            "malformed",
            "the Authorization header must be `Bearer <token>` or `Basic base64(<key id>:<secret>)`",
        ));
    }
    Ok(token)
}
