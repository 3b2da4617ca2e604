//! API keys: `{id}.{secret}` presented by producers, stored as SHA-256 hashes only, compared in
//! constant time.

use std::collections::HashMap;

use base64::Engine as _;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use sluice_config::ApiKeyConfig;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::{AuthFailure, Permissions, Principal};

struct Entry {
    hash: [u8; 32],
    principal: Principal,
    expires_at: Option<OffsetDateTime>,
    disabled: bool,
}

/// The configured keys, by id.
pub struct ApiKeys {
    by_id: HashMap<String, Entry>,
}

/// SHA-256 of `key`, lower-case hex.
pub fn hash_hex(key: &str) -> String {
    hex(digest(&SHA256, key.as_bytes()).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// A fresh key for `id`: `{id}.{43 characters of base64url randomness}` (256 bits).
pub fn generate(id: &str) -> Result<String, ring::error::Unspecified> {
    let mut secret = [0u8; 32];
    SystemRandom::new().fill(&mut secret)?;
    Ok(format!(
        "{id}.{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
    ))
}

/// A random key id: 12 hex characters.
pub fn generate_id() -> Result<String, ring::error::Unspecified> {
    let mut b = [0u8; 6];
    SystemRandom::new().fill(&mut b)?;
    Ok(hex(&b))
}

impl ApiKeys {
    /// Keys from configuration (already validated).
    pub fn new(keys: &[ApiKeyConfig]) -> Self {
        let by_id = keys
            .iter()
            .filter_map(|k| {
                let hash = unhex(&k.secret_sha256)?;
                let expires_at = k.expires_at.as_ref().and_then(|t| {
                    OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
                });
                Some((
                    k.id.clone(),
                    Entry {
                        hash,
                        principal: Principal::new(
                            k.principal.as_str(),
                            Permissions::Streams(k.streams.clone()),
                        )
                        .consuming(Permissions::Streams(k.consume.clone()))
                        .with_source("api_key"),
                        expires_at,
                        disabled: k.disabled,
                    },
                ))
            })
            .collect();
        Self { by_id }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The principal of `key`, or why it is refused. The work done is the same whether or not
    /// the id exists, and the hash comparison is constant time.
    pub fn verify(&self, key: &str) -> Result<Principal, AuthFailure> {
        let presented: [u8; 32] = digest(&SHA256, key.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let id = key.split_once('.').map_or("", |(id, _)| id);
        let entry = self.by_id.get(id);
        let stored = entry.map_or([0u8; 32], |e| e.hash);
        let matches: bool = presented.ct_eq(&stored).into();
        let Some(e) = entry.filter(|_| matches) else {
            return Err(AuthFailure::new(
                "api_key",
                "unknown_key",
                "unknown API key",
            ));
        };
        if e.disabled {
            return Err(AuthFailure::new(
                "api_key",
                "disabled_key",
                format!("API key `{id}` is disabled"),
            ));
        }
        if e.expires_at.is_some_and(|t| t <= OffsetDateTime::now_utc()) {
            return Err(AuthFailure::new(
                "api_key",
                "expired_key",
                format!("API key `{id}` has expired"),
            ));
        }
        Ok(match e.expires_at {
            Some(t) => e.principal.clone().expiring_at(t.into()),
            None => e.principal.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(id: &str, key: &str, disabled: bool, expires: Option<&str>) -> ApiKeyConfig {
        ApiKeyConfig {
            id: id.into(),
            secret_sha256: hash_hex(key),
            principal: format!("p-{id}"),
            streams: vec!["t.*".into()],
            consume: vec!["audit.*".into()],
            expires_at: expires.map(str::to_string),
            disabled,
        }
    }

    #[test]
    fn keys_verify_by_hash() {
        let good = generate("a").unwrap();
        assert!(good.starts_with("a.") && good.len() == 2 + 43);
        let keys = ApiKeys::new(&[
            cfg("a", &good, false, None),
            cfg("d", "d.x", true, None),
            cfg("e", "e.x", false, Some("2000-01-01T00:00:00Z")),
            cfg("f", "f.x", false, Some("2999-01-01T00:00:00Z")),
        ]);
        let p = keys.verify(&good).unwrap();
        assert_eq!(p.name(), "p-a");
        assert!(p.may_produce_to("t.x") && !p.may_produce_to("u"));
        // Reading is granted apart from producing.
        assert!(p.may_consume("audit.x") && !p.may_consume("t.x"));
        assert_eq!(keys.verify("a.wrong").unwrap_err().reason, "unknown_key");
        assert_eq!(keys.verify("zzz").unwrap_err().reason, "unknown_key");
        assert_eq!(keys.verify("d.x").unwrap_err().reason, "disabled_key");
        assert_eq!(keys.verify("e.x").unwrap_err().reason, "expired_key");
        assert!(keys.verify("f.x").is_ok());
    }
}
