//! JSON Schema (draft 2020-12 and draft 7): checking and the compatibility rules between
//! versions.

use serde_json::Value;
use sluice_config::Compatibility;

use super::Invalid;

pub struct JsonSchema {
    validator: jsonschema::Validator,
    /// The document, for compatibility checks against the next version.
    doc: Value,
}

impl JsonSchema {
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let doc: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let validator =
            jsonschema::validator_for(&doc).map_err(|e| format!("not a valid JSON Schema: {e}"))?;
        Ok(Self { validator, doc })
    }

    /// Checks a parsed value.
    pub fn check(&self, instance: &Value, prefix: &str) -> Result<(), Invalid> {
        // The common case first: no error is built for a valid event.
        if self.validator.is_valid(instance) {
            return Ok(());
        }
        match self.validator.validate(instance) {
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

    /// Whether `new` may follow `old` under `rule`. JSON Schema has no resolution rules of its
    /// own; these are the structural checks docs/schemas.md lists (types, required members,
    /// closed objects, enums, numeric and length bounds, recursively through `properties` and
    /// `items`), the first break named by its pointer into the schema.
    pub fn compatible(old: &Self, new: &Self, rule: Compatibility) -> Result<(), String> {
        let backward = || {
            reads(&old.doc, &new.doc, "").map_err(|e| {
                format!("the new version refuses events the previous one accepted: {e}")
            })
        };
        let forward = || {
            reads(&new.doc, &old.doc, "").map_err(|e| {
                format!("the previous version refuses events the new one accepts: {e}")
            })
        };
        match rule {
            Compatibility::None => Ok(()),
            Compatibility::Backward => backward(),
            Compatibility::Forward => forward(),
            Compatibility::Full => backward().and_then(|()| forward()),
        }
    }
}

fn types(s: &Value) -> Option<Vec<String>> {
    match s.get("type")? {
        Value::String(t) => Some(vec![t.clone()]),
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|t| t.as_str().map(String::from))
                .collect(),
        ),
        _ => None,
    }
}

/// Whether everything `writer` accepts, `reader` accepts too (as far as the checked keywords
/// tell).
fn reads(writer: &Value, reader: &Value, at: &str) -> Result<(), String> {
    let here = if at.is_empty() { "/" } else { at };
    if let (Some(w), Some(r)) = (types(writer), types(reader)) {
        for t in &w {
            let ok = r.contains(t) || (t == "integer" && r.iter().any(|x| x == "number"));
            if !ok {
                return Err(format!("{here}: type `{t}` is no longer accepted"));
            }
        }
    } else if types(writer).is_none()
        && let Some(r) = types(reader)
    {
        return Err(format!(
            "{here}: any type was accepted, now only {}",
            r.join(", ")
        ));
    }
    let required = |s: &Value| -> Vec<String> {
        s.get("required")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let writer_required = required(writer);
    for r in required(reader) {
        if !writer_required.contains(&r) {
            return Err(format!("{here}: `{r}` is now required"));
        }
    }
    let props = |s: &Value| {
        s.get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let (wp, rp) = (props(writer), props(reader));
    let closed = |s: &Value| s.get("additionalProperties") == Some(&Value::Bool(false));
    if closed(reader) {
        if !closed(writer) {
            return Err(format!(
                "{here}: members not listed in `properties` are no longer accepted"
            ));
        }
        if let Some(k) = wp.keys().find(|k| !rp.contains_key(*k)) {
            return Err(format!("{here}: member `{k}` is no longer accepted"));
        }
    }
    for (k, w) in &wp {
        if let Some(r) = rp.get(k) {
            reads(w, r, &format!("{at}/properties/{k}"))?;
        }
    }
    if let (Some(w), Some(r)) = (writer.get("items"), reader.get("items")) {
        reads(w, r, &format!("{at}/items"))?;
    }
    if let Some(r) = reader.get("enum").and_then(Value::as_array) {
        match writer.get("enum").and_then(Value::as_array) {
            Some(w) => {
                if let Some(x) = w.iter().find(|x| !r.contains(x)) {
                    return Err(format!("{here}: enum value {x} is no longer accepted"));
                }
            }
            None => return Err(format!("{here}: an `enum` now restricts the values")),
        }
    }
    for (key, lower) in [
        ("minimum", true),
        ("exclusiveMinimum", true),
        ("minLength", true),
        ("minItems", true),
        ("maximum", false),
        ("exclusiveMaximum", false),
        ("maxLength", false),
        ("maxItems", false),
    ] {
        if let Some(r) = reader.get(key).and_then(Value::as_f64) {
            let tighter = match writer.get(key).and_then(Value::as_f64) {
                Some(w) => (lower && r > w) || (!lower && r < w),
                None => true,
            };
            if tighter {
                return Err(format!("{here}: `{key}` is now {r}, stricter than before"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> JsonSchema {
        JsonSchema::parse(t.as_bytes()).unwrap()
    }

    #[test]
    fn compatibility_names_the_first_break() {
        let v1 = s(
            r#"{"type":"object","required":["id"],"properties":{"id":{"type":"string"},"n":{"type":"integer","minimum":0}}}"#,
        );
        let optional_added = s(
            r#"{"type":"object","required":["id"],"properties":{"id":{"type":"string"},"n":{"type":"number","minimum":0},"note":{"type":"string"}}}"#,
        );
        let required_added = s(
            r#"{"type":"object","required":["id","note"],"properties":{"id":{"type":"string"},"note":{"type":"string"}}}"#,
        );
        let narrowed = s(
            r#"{"type":"object","required":["id"],"properties":{"id":{"type":"string"},"n":{"type":"integer","minimum":1}}}"#,
        );
        assert!(JsonSchema::compatible(&v1, &optional_added, Compatibility::Backward).is_ok());
        let e = JsonSchema::compatible(&v1, &required_added, Compatibility::Backward).unwrap_err();
        assert!(e.contains("`note` is now required"), "{e}");
        assert!(JsonSchema::compatible(&v1, &required_added, Compatibility::Forward).is_ok());
        let e = JsonSchema::compatible(&v1, &narrowed, Compatibility::Full).unwrap_err();
        assert!(e.contains("/properties/n") && e.contains("minimum"), "{e}");
        // number → integer narrows: forward breaks (the old reads the new), backward does not.
        let e = JsonSchema::compatible(&optional_added, &v1, Compatibility::Backward).unwrap_err();
        assert!(e.contains("type `number`"), "{e}");
        assert!(JsonSchema::compatible(&v1, &narrowed, Compatibility::None).is_ok());
    }
}
