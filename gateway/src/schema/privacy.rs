//! Privacy rules (docs/schemas.md#privacy): after an event passed its schema, fields named by
//! JSON pointers are dropped, masked or replaced by a keyed hash before it is stored, so
//! personal data can be pseudonymised at the edge. The stored record lists the rules that
//! changed something in the header `sluice-privacy`.

use base64::Engine as _;
use serde_json::Value;
use sluice_config::{PrivacyAction, PrivacyConfig, PrivacyRule};

/// The reserved header listing the rules applied to a stored event:
/// `/user/email=hmac:2026-12,/card=mask`.
pub const PRIVACY_HEADER: &str = "sluice-privacy";

/// One stream's compiled rules.
pub struct Privacy {
    rules: Vec<Rule>,
    key: Option<(String, ring::hmac::Key)>,
}

struct Rule {
    /// The pointer as configured, for the header.
    field: String,
    /// Its unescaped segments; `*` is every element or member.
    segments: Vec<String>,
    action: PrivacyAction,
    keep_last: usize,
}

impl Privacy {
    /// `None` when the stream has no rules.
    pub fn compile(rules: &[PrivacyRule], cfg: &PrivacyConfig) -> Option<Self> {
        if rules.is_empty() {
            return None;
        }
        let key = cfg.hmac_key.as_ref().map(|k| {
            (
                cfg.hmac_key_id.clone(),
                ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.0.as_bytes()),
            )
        });
        let rules = rules
            .iter()
            .map(|r| Rule {
                field: r.field.clone(),
                segments: segments(&r.field),
                action: r.action,
                keep_last: r.keep_last,
            })
            .collect();
        Some(Self { rules, key })
    }

    /// The rules' pointers and actions, for checks against a schema.
    pub fn fields(&self) -> impl Iterator<Item = (&[String], PrivacyAction, &str)> {
        self.rules
            .iter()
            .map(|r| (r.segments.as_slice(), r.action, r.field.as_str()))
    }

    /// Applies every rule to `v`; the header value naming the rules that changed something,
    /// or `None` when none did.
    pub fn apply(&self, v: &mut Value) -> Option<String> {
        let mut applied: Vec<String> = Vec::new();
        for r in &self.rules {
            let mut n = 0;
            visit(v, &r.segments, &mut |parent, last| {
                n += self.act(r, parent, last) as usize;
            });
            if n > 0 {
                applied.push(match (r.action, &self.key) {
                    (PrivacyAction::Hmac, Some((id, _))) => format!("{}=hmac:{id}", r.field),
                    (PrivacyAction::Hmac, None) => format!("{}=hmac", r.field),
                    (PrivacyAction::Drop, _) => format!("{}=drop", r.field),
                    (PrivacyAction::Mask, _) => format!("{}=mask", r.field),
                });
            }
        }
        (!applied.is_empty()).then(|| applied.join(","))
    }

    /// Applies `r` to the member `last` of `parent`; whether it was there.
    fn act(&self, r: &Rule, parent: &mut Value, last: &str) -> bool {
        match r.action {
            PrivacyAction::Drop => match parent {
                Value::Object(m) => m.remove(last).is_some(),
                // Array elements are not dropped (indexes would shift): they become null.
                Value::Array(a) => match last.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                    Some(x) => {
                        *x = Value::Null;
                        true
                    }
                    None => false,
                },
                _ => false,
            },
            PrivacyAction::Mask | PrivacyAction::Hmac => {
                let Some(x) = member(parent, last) else {
                    return false;
                };
                if x.is_null() {
                    return false;
                }
                *x = Value::String(match r.action {
                    PrivacyAction::Mask => mask(x, r.keep_last),
                    _ => self.hmac(x),
                });
                true
            }
        }
    }

    fn hmac(&self, x: &Value) -> String {
        let Some((id, key)) = &self.key else {
            // check-config refuses hmac rules without a key.
            return "hmac-sha256:?".into();
        };
        let text;
        let bytes = match x {
            // A string is hashed as its characters, so the same value hashed elsewhere (a
            // database column) joins.
            Value::String(s) => s.as_bytes(),
            other => {
                text = other.to_string();
                text.as_bytes()
            }
        };
        let tag = ring::hmac::sign(key, bytes);
        format!(
            "hmac-sha256:{id}:{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }
}

fn mask(x: &Value, keep_last: usize) -> String {
    match x {
        Value::String(s) => {
            let n = s.chars().count();
            let keep = keep_last.min(n);
            let mut out: String = std::iter::repeat_n('*', n - keep).collect();
            out.extend(s.chars().skip(n - keep));
            out
        }
        // Numbers, booleans, arrays and objects are masked whole.
        _ => "***".into(),
    }
}

fn member<'a>(parent: &'a mut Value, last: &str) -> Option<&'a mut Value> {
    match parent {
        Value::Object(m) => m.get_mut(last),
        Value::Array(a) => last.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    }
}

/// A JSON pointer's segments, unescaped (`~1` is `/`, `~0` is `~`).
pub fn segments(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// Calls `f(parent, last)` for every place `segments` reaches (`*` fans out).
fn visit(v: &mut Value, segments: &[String], f: &mut dyn FnMut(&mut Value, &str)) {
    match segments {
        [] => {}
        [last] if last == "*" => {
            let keys: Vec<String> = match v {
                Value::Object(m) => m.keys().cloned().collect(),
                Value::Array(a) => (0..a.len()).map(|i| i.to_string()).collect(),
                _ => return,
            };
            for k in keys {
                f(v, &k);
            }
        }
        [last] => f(v, last),
        [seg, rest @ ..] if seg == "*" => match v {
            Value::Object(m) => m.values_mut().for_each(|c| visit(c, rest, f)),
            Value::Array(a) => a.iter_mut().for_each(|c| visit(c, rest, f)),
            _ => {}
        },
        [seg, rest @ ..] => {
            if let Some(c) = member(v, seg) {
                visit(c, rest, f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sluice_config::Secret;

    fn privacy(rules: &[(&str, PrivacyAction, usize)], key: &str) -> Privacy {
        let rules: Vec<PrivacyRule> = rules
            .iter()
            .map(|(f, a, k)| PrivacyRule {
                field: f.to_string(),
                action: *a,
                keep_last: *k,
            })
            .collect();
        Privacy::compile(
            &rules,
            &PrivacyConfig {
                hmac_key_id: "k1".into(),
                hmac_key: Some(Secret(key.into())),
            },
        )
        .unwrap()
    }

    #[test]
    fn drop_mask_and_hash_by_pointer_with_wildcards() {
        let p = privacy(
            &[
                ("/user/email", PrivacyAction::Hmac, 0),
                ("/items/*/card", PrivacyAction::Mask, 4),
                ("/ssn", PrivacyAction::Drop, 0),
                ("/absent", PrivacyAction::Drop, 0),
                ("/a~1b", PrivacyAction::Mask, 0),
            ],
            "0123456789abcdef0123456789abcdef",
        );
        let mut v = json!({"user":{"email":"ann@example.com","name":"Ann"},
            "items":[{"card":"4111111111111111"},{"card":"5500"},{"sku":"x"}],
            "ssn":"123-45-6789","a/b":12});
        let applied = p.apply(&mut v).unwrap();
        assert_eq!(
            applied,
            "/user/email=hmac:k1,/items/*/card=mask,/ssn=drop,/a~1b=mask"
        );
        assert_eq!(v["items"][0]["card"], "************1111");
        assert_eq!(v["items"][1]["card"], "5500");
        assert_eq!(v["a/b"], "***");
        assert!(v.get("ssn").is_none());
        assert_eq!(v["user"]["name"], "Ann");
        let h = v["user"]["email"].as_str().unwrap();
        assert!(
            h.starts_with("hmac-sha256:k1:") && !h.contains("ann"),
            "{h}"
        );
        // Keyed: the same value under the same key hashes the same, under another key not.
        let mut again = json!({"user":{"email":"ann@example.com"}});
        p.apply(&mut again);
        assert_eq!(again["user"]["email"], v["user"]["email"]);
        let other = privacy(
            &[("/user/email", PrivacyAction::Hmac, 0)],
            "fedcba9876543210fedcba9876543210",
        );
        let mut third = json!({"user":{"email":"ann@example.com"}});
        other.apply(&mut third);
        assert_ne!(third["user"]["email"], v["user"]["email"]);
        // Nothing to do: no header.
        let mut none = json!({"other": 1});
        assert_eq!(p.apply(&mut none), None);
        assert_eq!(none, json!({"other": 1}));
    }
}
