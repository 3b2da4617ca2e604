//! OAuth2 bearer JWTs: several issuers, each with its algorithms, audiences and leeway; keys from
//! a JWKS file or URL (refreshed on an interval and on an unknown `kid`, the refresh itself rate
//! limited; the last good key set keeps serving when a refresh fails); HS256 only with an
//! explicitly configured secret. Verified tokens are cached until they expire, so each token is
//! verified once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use ring::digest::{SHA256, digest};
use serde_json::Value;
use sluice_config::{IssuerConfig, JwtConfig};
use tokio::net::TcpStream;

use crate::{AuthFailure, FailureKind, Permissions, Principal};

const METHOD: &str = "jwt";
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// A JWKS fetch must finish within this time.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Retry hint when an issuer's keys cannot be loaded.
const KEYS_RETRY_AFTER: Duration = Duration::from_secs(5);

fn fail(reason: &'static str, description: impl Into<String>) -> AuthFailure {
    AuthFailure::new(METHOD, reason, description)
}

enum Source {
    None,
    File(PathBuf),
    Url {
        url: String,
        tls: Arc<rustls::ClientConfig>,
    },
}

#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, DecodingKey>,
    without_kid: Vec<DecodingKey>,
}

impl KeySet {
    fn parse(bytes: &[u8]) -> Result<KeySet, String> {
        let set: JwkSet =
            serde_json::from_slice(bytes).map_err(|e| format!("invalid JWKS: {e}"))?;
        let mut ks = KeySet::default();
        for jwk in &set.keys {
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                tracing::warn!(kid = ?jwk.common.key_id, "skipping a JWK that cannot be used");
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    ks.by_kid.insert(kid.clone(), key);
                }
                None => ks.without_kid.push(key),
            }
        }
        Ok(ks)
    }

    fn get(&self, kid: Option<&str>) -> Option<&DecodingKey> {
        match kid {
            Some(k) => self.by_kid.get(k),
            None if self.by_kid.len() + self.without_kid.len() == 1 => self
                .without_kid
                .first()
                .or_else(|| self.by_kid.values().next()),
            None => None,
        }
    }
}

struct Issuer {
    cfg: IssuerConfig,
    algorithms: Vec<Algorithm>,
    hs: Option<DecodingKey>,
    source: Source,
    keys: RwLock<Option<Arc<KeySet>>>,
    last_refresh: Mutex<Option<Instant>>,
    refreshing: tokio::sync::Mutex<()>,
}

impl Issuer {
    fn new(cfg: &IssuerConfig) -> Result<Self, String> {
        let algorithms = cfg
            .algorithms
            .iter()
            .map(|a| Algorithm::from_str(a).map_err(|_| format!("unknown algorithm `{a}`")))
            .collect::<Result<Vec<_>, _>>()?;
        let source = match (&cfg.jwks_file, &cfg.jwks_url) {
            (Some(f), _) => Source::File(f.clone()),
            (None, Some(u)) => Source::Url {
                url: u.clone(),
                tls: Arc::new(crate::tls::client_config(cfg.jwks_ca_file.as_deref())?),
            },
            (None, None) => Source::None,
        };
        let issuer = Issuer {
            cfg: cfg.clone(),
            algorithms,
            hs: cfg
                .hs256_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.0.as_bytes())),
            source,
            keys: RwLock::new(None),
            last_refresh: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        };
        if let Source::File(path) = &issuer.source {
            // A file must be readable at startup; later read failures keep the last good set.
            let bytes = std::fs::read(path)
                .map_err(|e| format!("reading JWKS file {}: {e}", path.display()))?;
            issuer.install(KeySet::parse(&bytes)?);
        }
        Ok(issuer)
    }

    fn install(&self, ks: KeySet) {
        *self.keys.write().unwrap() = Some(Arc::new(ks));
    }

    /// Loads the key set again; on failure the previous one keeps serving.
    async fn refresh(&self) -> Result<(), String> {
        let _one = self.refreshing.lock().await;
        *self.last_refresh.lock().unwrap() = Some(Instant::now());
        let bytes = match &self.source {
            Source::None => return Ok(()),
            Source::File(p) => tokio::fs::read(p)
                .await
                .map(Bytes::from)
                .map_err(|e| format!("reading {}: {e}", p.display()))?,
            Source::Url { url, tls } => fetch(url, tls).await?,
        };
        self.install(KeySet::parse(&bytes)?);
        Ok(())
    }

    /// The key for `kid`; an unknown `kid` triggers one rate-limited refresh first.
    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, AuthFailure> {
        let lookup = |ks: &Option<Arc<KeySet>>| ks.as_ref().and_then(|k| k.get(kid).cloned());
        if let Some(k) = lookup(&self.keys.read().unwrap()) {
            return Ok(k);
        }
        let min = Duration::from_millis(self.cfg.jwks_min_refresh_interval_ms);
        let due = self
            .last_refresh
            .lock()
            .unwrap()
            .is_none_or(|t| t.elapsed() >= min);
        if due
            && !matches!(self.source, Source::None)
            && let Err(e) = self.refresh().await
        {
            tracing::warn!(issuer = %self.cfg.issuer, error = %e, "JWKS refresh failed; keeping the last good key set");
        }
        let keys = self.keys.read().unwrap().clone();
        match (&keys, lookup(&keys)) {
            (_, Some(k)) => Ok(k),
            (None, None) => Err(AuthFailure {
                kind: FailureKind::Unavailable(KEYS_RETRY_AFTER),
                ..fail(
                    "keys_unavailable",
                    format!(
                        "the signing keys of issuer `{}` cannot be loaded right now",
                        self.cfg.issuer
                    ),
                )
            }),
            (Some(_), None) => Err(fail(
                "unknown_kid",
                match kid {
                    Some(k) => format!("no signing key with kid `{k}`"),
                    None => "the token has no kid and the issuer has several keys".to_string(),
                },
            )),
        }
    }
}

/// GETs `url` (http or https) and returns at most [`MAX_JWKS_BYTES`] of its body.
pub async fn fetch(url: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Bytes, String> {
    get_json(url, tls, None, MAX_JWKS_BYTES, FETCH_TIMEOUT).await
}

/// GETs `url` (http or https) with `Accept: application/json` and, when given, an
/// `Authorization` header; returns at most `max_bytes` of a 2xx answer's body, all within
/// `timeout`. A non-2xx answer is an error naming the status and the start of its body.
pub async fn get_json(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    authorization: Option<&str>,
    max_bytes: usize,
    timeout: Duration,
) -> Result<Bytes, String> {
    tokio::time::timeout(timeout, fetch_inner(url, tls, authorization, max_bytes))
        .await
        .map_err(|_| format!("GET {url} timed out"))?
}

async fn fetch_inner(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    authorization: Option<&str>,
    max_bytes: usize,
) -> Result<Bytes, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("invalid URL {url}: {e}"))?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("URL without host")?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connecting to {host}:{port}: {e}"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let req = Get {
        host: &host,
        path: &path,
        authorization,
        max_bytes,
    };
    if https {
        let name = rustls_pki_types::ServerName::try_from(host.clone())
            .map_err(|e| format!("invalid server name {host}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))?;
        get(TokioIo::new(stream), req).await
    } else {
        get(TokioIo::new(tcp), req).await
    }
}

struct Get<'a> {
    host: &'a str,
    path: &'a str,
    authorization: Option<&'a str>,
    max_bytes: usize,
}

async fn get<IO>(io: IO, g: Get<'_>) -> Result<Bytes, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::get(g.path)
        .header(http::header::HOST, g.host)
        .header(http::header::ACCEPT, "application/json");
    if let Some(a) = g.authorization {
        req = req.header(http::header::AUTHORIZATION, a);
    }
    let req = req.body(Empty::new()).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), g.max_bytes)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("reading the answer to GET {}: {e}", g.path));
    if !status.is_success() {
        let detail = body
            .ok()
            .map(|b| String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned())
            .unwrap_or_default();
        return Err(format!("GET {} answered {status} {detail}", g.path)
            .trim_end()
            .to_string());
    }
    body
}

/// Verifies bearer JWTs against the configured issuers.
pub struct JwtVerifier {
    issuers: Vec<Arc<Issuer>>,
    cache: Mutex<HashMap<[u8; 32], (Principal, i64)>>,
    cache_max: usize,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The JSON of a token's header or claims segment, without verifying anything.
fn peek(token: &str, segment: usize) -> Option<Value> {
    let part = token.split('.').nth(segment)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl JwtVerifier {
    /// Issuers from configuration; JWKS files are read now (an unreadable file is an error).
    pub fn new(cfg: &JwtConfig) -> Result<Self, String> {
        let issuers = cfg
            .issuers
            .iter()
            .map(|i| {
                Issuer::new(i)
                    .map(Arc::new)
                    .map_err(|e| format!("issuer `{}`: {e}", i.issuer))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            issuers,
            cache: Mutex::new(HashMap::new()),
            cache_max: cfg.cache_max_entries,
        })
    }

    /// Fetches every JWKS URL once (failures are logged; such an issuer answers 503 until a
    /// refresh succeeds) and starts the periodic refreshes.
    pub async fn start(&self) {
        for issuer in &self.issuers {
            if matches!(issuer.source, Source::None) {
                continue;
            }
            if matches!(issuer.source, Source::Url { .. })
                && let Err(e) = issuer.refresh().await
            {
                tracing::warn!(issuer = %issuer.cfg.issuer, error = %e, "initial JWKS fetch failed; tokens of this issuer get 503 until a refresh succeeds");
            }
            // The task holds the issuer weakly, so it ends when a configuration reload drops
            // this verifier.
            let weak = Arc::downgrade(issuer);
            let every = Duration::from_millis(issuer.cfg.jwks_refresh_interval_ms);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let Some(issuer) = weak.upgrade() else { break };
                    if let Err(e) = issuer.refresh().await {
                        tracing::warn!(issuer = %issuer.cfg.issuer, error = %e, "JWKS refresh failed; keeping the last good key set");
                    }
                }
            });
        }
    }

    /// The principal of a bearer `token`, or why it is refused.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthFailure> {
        let id: [u8; 32] = digest(&SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("32 bytes");
        let now = unix_now();
        if let Some((p, exp)) = self.cache.lock().unwrap().get(&id)
            && *exp > now
        {
            return Ok(p.clone());
        }
        let (principal, exp) = self.verify_uncached(token).await?;
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= self.cache_max {
            cache.retain(|_, (_, e)| *e > now);
            if cache.len() >= self.cache_max {
                cache.clear();
            }
        }
        cache.insert(id, (principal.clone(), exp));
        Ok(principal)
    }

    async fn verify_uncached(&self, token: &str) -> Result<(Principal, i64), AuthFailure> {
        if token.split('.').count() != 3 {
            return Err(fail("malformed", "a JWT has three dot-separated parts"));
        }
        let header = peek(token, 0)
            .ok_or_else(|| fail("malformed", "the JWT header is not base64url JSON"))?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        if alg.eq_ignore_ascii_case("none") {
            return Err(fail(
                "alg_none",
                "unsigned tokens (alg none) are not accepted",
            ));
        }
        let claims = peek(token, 1)
            .ok_or_else(|| fail("malformed", "the JWT claims are not base64url JSON"))?;
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let Some(issuer) = self.issuers.iter().find(|i| i.cfg.issuer == iss) else {
            return Err(fail(
                "unknown_issuer",
                format!("issuer `{iss}` is not trusted"),
            ));
        };
        let alg = Algorithm::from_str(alg)
            .map_err(|_| fail("malformed", format!("unknown algorithm `{alg}`")))?;
        if !issuer.algorithms.contains(&alg) {
            return Err(fail(
                "alg_not_allowed",
                format!("algorithm {alg:?} is not accepted for issuer `{iss}`"),
            ));
        }
        // HS256 is verified only with the configured shared secret, never with a public key, so
        // a token signed with an issuer's public key as HMAC secret cannot pass.
        let key = if alg == Algorithm::HS256 {
            issuer
                .hs
                .clone()
                .ok_or_else(|| fail("alg_not_allowed", "HS256 is not configured"))?
        } else {
            issuer
                .key(header.get("kid").and_then(Value::as_str))
                .await?
        };
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.set_issuer(&[&issuer.cfg.issuer]);
        v.set_audience(&issuer.cfg.audiences);
        v.leeway = issuer.cfg.leeway_s;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.required_spec_claims = ["exp", "iss", "aud"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => fail("expired", "the token has expired"),
            ErrorKind::ImmatureSignature => {
                fail("not_yet_valid", "the token is not valid yet (nbf)")
            }
            ErrorKind::InvalidIssuer => fail("wrong_issuer", "wrong issuer"),
            ErrorKind::InvalidAudience => {
                fail("wrong_audience", "the token is not for this audience")
            }
            ErrorKind::InvalidSignature => {
                fail("bad_signature", "the token's signature does not verify")
            }
            ErrorKind::MissingRequiredClaim(c) => {
                fail("missing_claim", format!("the token has no `{c}` claim"))
            }
            ErrorKind::InvalidClaimFormat(c) => {
                fail("malformed", format!("the `{c}` claim has the wrong type"))
            }
            ErrorKind::InvalidAlgorithm => fail(
                "alg_not_allowed",
                "the key does not fit the token's algorithm",
            ),
            _ => fail("malformed", format!("invalid token: {e}")),
        })?;
        let claims = data.claims;
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
        let name = claims
            .get(&issuer.cfg.principal_claim)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                fail(
                    "missing_claim",
                    format!("the token has no `{}` claim", issuer.cfg.principal_claim),
                )
            })?;
        let entries: Vec<&str> = match claims.get(&issuer.cfg.permissions_claim) {
            Some(Value::String(s)) => s.split_whitespace().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let prefix = issuer.cfg.permission_prefix.as_str();
        let streams = entries
            .iter()
            .filter_map(|e| e.strip_prefix(prefix))
            .map(str::to_string)
            .collect();
        let consume_prefix = issuer.cfg.consume_prefix.as_str();
        // An empty consume prefix would make every entry a read grant: reading needs a prefix.
        let consume = entries
            .iter()
            .filter(|_| !consume_prefix.is_empty())
            .filter_map(|e| e.strip_prefix(consume_prefix))
            .map(str::to_string)
            .collect();
        let valid_until = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(exp).unwrap_or(0) + issuer.cfg.leeway_s);
        Ok((
            Principal::new(name, Permissions::Streams(streams))
                .consuming(Permissions::Streams(consume))
                .with_source(&format!("jwt:{}", issuer.cfg.issuer))
                .expiring_at(valid_until)
                // String and number claims, for topic rules bound to one (a device id claim).
                .with_claims(claims.as_object().into_iter().flatten().filter_map(
                    |(k, v)| match v {
                        Value::String(s) => Some((k.clone(), s.clone())),
                        Value::Number(n) => Some((k.clone(), n.to_string())),
                        _ => None,
                    },
                )),
            exp,
        ))
    }
}
