//! JSON Schema (draft 2020-12 and draft 7): checking and the compatibility rules between
//! versions.

use serde_json::Value;
use sluice_config::Compatibility;

use super::Invalid;

pub struct JsonSchema {
    validator: jsonschema::Validator,
    /// The document, for compatibility checks against the next version.
    doc: Value,
    /// A validator over the raw bytes for flat object schemas (see [`fast`]), when the schema
    /// is one.
    fast: Option<fast::Flat>,
}

impl JsonSchema {
    pub fn parse(text: &[u8]) -> Result<Self, String> {
        let doc: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        let validator =
            jsonschema::validator_for(&doc).map_err(|e| format!("not a valid JSON Schema: {e}"))?;
        let fast = fast::Flat::compile(&doc);
        Ok(Self {
            validator,
            doc,
            fast,
        })
    }

    /// True when `bytes` is certainly valid, decided without building a document (flat
    /// object schemas only). False means "not decided here": the caller checks the parsed
    /// document, which also names what failed.
    pub fn valid_fast(&self, bytes: &[u8]) -> bool {
        self.fast.as_ref().is_some_and(|f| f.valid(bytes))
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

/// The fast path: most event schemas are one object of scalar members (`type`, `required`,
/// `properties` of strings, numbers, integers, booleans and nulls with `enum`, bounds and
/// lengths, `additionalProperties: false`). Such a schema is checked while serde_json reads the
/// raw bytes — borrowed strings, no tree, no allocation — and only an event it does not accept
/// is parsed into a document for `jsonschema`, which decides and names the failure. It is
/// conservative: whatever it is unsure of (a float for an integer, an integer past 2^53 against a
/// bound, a nested value) goes to `jsonschema`; it never accepts what `jsonschema` refuses.
mod fast {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde_json::Value;
    use std::fmt;

    const STRING: u8 = 1;
    const NUMBER: u8 = 2;
    const INTEGER: u8 = 4;
    const BOOLEAN: u8 = 8;
    const NULL: u8 = 16;

    #[derive(Debug, Default)]
    struct Scalar {
        types: u8,
        strings: Option<Vec<String>>,
        minimum: Option<f64>,
        maximum: Option<f64>,
        exclusive_minimum: Option<f64>,
        exclusive_maximum: Option<f64>,
        min_length: Option<usize>,
        max_length: Option<usize>,
    }

    #[derive(Debug)]
    pub struct Flat {
        props: Vec<(String, Scalar)>,
        required: u64,
        closed: bool,
    }

    const ANNOTATIONS: [&str; 6] = [
        "title",
        "description",
        "$comment",
        "examples",
        "default",
        "deprecated",
    ];

    impl Flat {
        /// `None` unless the whole schema is in the fast path's subset.
        pub fn compile(doc: &Value) -> Option<Self> {
            let root = doc.as_object()?;
            match root.get("$schema").map(|s| s.as_str()) {
                None => {}
                Some(Some(
                    "https://json-schema.org/draft/2020-12/schema"
                    | "http://json-schema.org/draft-07/schema#"
                    | "http://json-schema.org/draft-07/schema",
                )) => {}
                Some(_) => return None,
            }
            let mut props = Vec::new();
            let mut closed = false;
            let mut required = Vec::new();
            for (k, v) in root {
                match k.as_str() {
                    "$schema" | "$id" => {}
                    k if ANNOTATIONS.contains(&k) => {}
                    "type" if v == "object" => {}
                    "additionalProperties" => closed = !v.as_bool()?,
                    "required" => {
                        for r in v.as_array()? {
                            required.push(r.as_str()?.to_string());
                        }
                    }
                    "properties" => {
                        for (name, p) in v.as_object()? {
                            props.push((name.clone(), scalar(p)?));
                        }
                    }
                    _ => return None,
                }
            }
            if root.get("type") != Some(&Value::from("object")) || props.len() > 64 {
                return None;
            }
            let mut mask = 0u64;
            for r in &required {
                // A required member the schema does not describe: anything goes for its value,
                // but it must be there; keep it simple and let jsonschema decide.
                let i = props.iter().position(|(n, _)| n == r)?;
                mask |= 1 << i;
            }
            Some(Self {
                props,
                required: mask,
                closed,
            })
        }

        pub fn valid(&self, bytes: &[u8]) -> bool {
            // UTF-8 checked once for the whole text (the reader then skips it per string).
            let Ok(text) = std::str::from_utf8(bytes) else {
                return false;
            };
            let mut de = serde_json::Deserializer::from_str(text);
            matches!(Root(self).deserialize(&mut de), Ok(true)) && de.end().is_ok()
        }
    }

    fn scalar(p: &Value) -> Option<Scalar> {
        let mut s = Scalar::default();
        let num = |v: &Value| v.as_f64();
        let len = |v: &Value| v.as_u64().map(|n| n as usize);
        for (k, v) in p.as_object()? {
            match k.as_str() {
                "type" => {
                    let names: Vec<&str> = match v {
                        Value::String(t) => vec![t.as_str()],
                        Value::Array(a) => a.iter().map(|t| t.as_str()).collect::<Option<_>>()?,
                        _ => return None,
                    };
                    for t in names {
                        s.types |= match t {
                            "string" => STRING,
                            "number" => NUMBER,
                            "integer" => INTEGER,
                            "boolean" => BOOLEAN,
                            "null" => NULL,
                            _ => return None,
                        };
                    }
                }
                "enum" => {
                    let mut out = Vec::new();
                    for x in v.as_array()? {
                        out.push(x.as_str()?.to_string());
                    }
                    s.strings = Some(out);
                }
                "minimum" => s.minimum = Some(num(v)?),
                "maximum" => s.maximum = Some(num(v)?),
                "exclusiveMinimum" => s.exclusive_minimum = Some(num(v)?),
                "exclusiveMaximum" => s.exclusive_maximum = Some(num(v)?),
                "minLength" => s.min_length = Some(len(v)?),
                "maxLength" => s.max_length = Some(len(v)?),
                k if ANNOTATIONS.contains(&k) => {}
                _ => return None,
            }
        }
        if s.types == 0 {
            return None;
        }
        // An enum of strings only admits strings.
        if s.strings.is_some() && s.types & STRING == 0 {
            return None;
        }
        Some(s)
    }

    struct Root<'a>(&'a Flat);

    impl<'de> DeserializeSeed<'de> for Root<'_> {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Root<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut seen = 0u64;
            while let Some(i) = map.next_key_seed(Key(self.0))? {
                match i {
                    Some(i) => {
                        if !map.next_value_seed(Member(&self.0.props[i].1))? {
                            return Ok(false);
                        }
                        seen |= 1 << i;
                    }
                    None if self.0.closed => return Ok(false),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(seen & self.0.required == self.0.required)
        }
    }

    /// A member's name as the index of its property, if it has one.
    struct Key<'a>(&'a Flat);

    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for Key<'_> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a member name")
        }
        fn visit_str<E>(self, v: &str) -> Result<Option<usize>, E> {
            Ok(self.0.props.iter().position(|(n, _)| n == v))
        }
    }

    /// Whether a member's value fits its property.
    struct Member<'a>(&'a Scalar);

    impl<'de> DeserializeSeed<'de> for Member<'_> {
        type Value = bool;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl Member<'_> {
        fn number(&self, x: f64, integer: bool) -> bool {
            let s = self.0;
            let typed = s.types & NUMBER != 0 || (integer && s.types & INTEGER != 0);
            let bounded = s.minimum.is_some()
                || s.maximum.is_some()
                || s.exclusive_minimum.is_some()
                || s.exclusive_maximum.is_some();
            // Past 2^53 an f64 comparison may round: jsonschema decides.
            if bounded && x.abs() > 9_007_199_254_740_992.0 {
                return false;
            }
            typed
                && s.minimum.is_none_or(|m| x >= m)
                && s.maximum.is_none_or(|m| x <= m)
                && s.exclusive_minimum.is_none_or(|m| x > m)
                && s.exclusive_maximum.is_none_or(|m| x < m)
        }
    }

    impl<'de> Visitor<'de> for Member<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a scalar")
        }
        fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
            Ok(self.0.types & BOOLEAN != 0)
        }
        fn visit_unit<E>(self) -> Result<bool, E> {
            Ok(self.0.types & NULL != 0)
        }
        fn visit_i64<E>(self, v: i64) -> Result<bool, E> {
            Ok(self.number(v as f64, true))
        }
        fn visit_u64<E>(self, v: u64) -> Result<bool, E> {
            Ok(self.number(v as f64, true))
        }
        fn visit_f64<E>(self, v: f64) -> Result<bool, E> {
            // 1.0 may be an integer to jsonschema; not decided here.
            Ok(self.number(v, false))
        }
        fn visit_str<E>(self, v: &str) -> Result<bool, E> {
            let s = self.0;
            if s.types & STRING == 0 {
                return Ok(false);
            }
            if let Some(e) = &s.strings
                && !e.iter().any(|x| x == v)
            {
                return Ok(false);
            }
            if s.min_length.is_some() || s.max_length.is_some() {
                let n = v.chars().count();
                if s.min_length.is_some_and(|m| n < m) || s.max_length.is_some_and(|m| n > m) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;

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

    #[test]
    fn the_fast_path_never_accepts_what_jsonschema_refuses() {
        let schemas = [
            r#"{"$schema":"https://json-schema.org/draft/2020-12/schema","type":"object","required":["id","amount","currency"],
               "properties":{"id":{"type":"string","minLength":2,"maxLength":8},"amount":{"type":"number","minimum":0,"exclusiveMaximum":100},
                 "currency":{"type":"string","enum":["EUR","USD"]},"n":{"type":"integer"},"ok":{"type":["boolean","null"]}}}"#,
            r#"{"type":"object","additionalProperties":false,"properties":{"a":{"type":"integer","maximum":3}}}"#,
        ];
        let events = [
            r#"{"id":"ab","amount":1,"currency":"EUR"}"#,
            r#"{"id":"a","amount":1,"currency":"EUR"}"#,
            r#"{"id":"abcdefghi","amount":1,"currency":"EUR"}"#,
            r#"{"id":"ab","amount":-1,"currency":"EUR"}"#,
            r#"{"id":"ab","amount":100,"currency":"EUR"}"#,
            r#"{"id":"ab","amount":99.5,"currency":"EUR","n":2,"ok":null}"#,
            r#"{"id":"ab","amount":1,"currency":"GBP"}"#,
            r#"{"id":"ab","amount":1}"#,
            r#"{"id":"ab","amount":1,"currency":"EUR","n":1.5}"#,
            r#"{"id":"ab","amount":1,"currency":"EUR","n":2.0}"#,
            r#"{"id":"ab","amount":1,"currency":"EUR","ok":"yes"}"#,
            r#"{"id":"ab","amount":1,"currency":"EUR","extra":{"deep":[1,2]}}"#,
            r#"{"id":"a\u0062","amount":1,"currency":"EU\u0052"}"#,
            r#"{"id":"ab","id":"x","amount":1,"currency":"EUR"}"#,
            r#"{"a":3}"#,
            r#"{"a":4}"#,
            r#"{"a":1,"b":2}"#,
            r#"{"a":1} trailing"#,
            r#"[1]"#,
            r#"{"a":18446744073709551615}"#,
            "{}",
            "{",
        ];
        let mut fast_accepted = 0;
        for text in schemas {
            let s = JsonSchema::parse(text.as_bytes()).unwrap();
            assert!(s.fast.is_some(), "{text}");
            for e in events {
                let full = serde_json::from_slice::<Value>(e.as_bytes())
                    .is_ok_and(|v| s.validator.is_valid(&v));
                let fast = s.valid_fast(e.as_bytes());
                assert!(
                    !fast || full,
                    "fast accepted what jsonschema refuses: {e} against {text}"
                );
                fast_accepted += fast as usize;
            }
        }
        assert!(fast_accepted >= 5, "the fast path decides the common case");
        // Outside the subset: no fast path.
        for text in [
            r#"{"type":"object","properties":{"a":{"type":"object"}}}"#,
            r#"{"type":"object","properties":{"a":{"type":"string","pattern":"x"}}}"#,
            r#"{"type":"object","properties":{"a":{"type":"string","format":"email"}}}"#,
            r#"{"type":"array"}"#,
        ] {
            assert!(
                JsonSchema::parse(text.as_bytes()).unwrap().fast.is_none(),
                "{text}"
            );
        }
    }

    proptest::proptest! {
        /// Random flat objects over the schema's members (and one more), with values of every
        /// scalar kind: whatever the fast path accepts, jsonschema accepts.
        #[test]
        fn fast_implies_full(members in proptest::collection::vec(
            (0usize..6, proptest::prop_oneof![
                proptest::strategy::Just(Value::Null),
                proptest::bool::ANY.prop_map(Value::from),
                (-5i64..200).prop_map(Value::from),
                (-5.0f64..200.0).prop_map(Value::from),
                "[a-zA-Z]{0,10}".prop_map(Value::from),
                proptest::sample::select(vec!["EUR", "USD", "GBP"]).prop_map(Value::from),
            ]),
            0..8,
        )) {
            let s = JsonSchema::parse(br#"{"type":"object","required":["id","amount"],
                "properties":{"id":{"type":"string","minLength":2,"maxLength":8},
                  "amount":{"type":"number","minimum":0,"exclusiveMaximum":100},
                  "currency":{"type":"string","enum":["EUR","USD"]},"n":{"type":"integer","maximum":50},
                  "ok":{"type":["boolean","null"]}}}"#).unwrap();
            let names = ["id", "amount", "currency", "n", "ok", "other"];
            let text = format!("{{{}}}", members.iter()
                .map(|(k, v)| format!("{:?}:{}", names[*k], v))
                .collect::<Vec<_>>().join(","));
            let full = serde_json::from_str::<Value>(&text).is_ok_and(|v| s.validator.is_valid(&v));
            proptest::prop_assert!(!s.valid_fast(text.as_bytes()) || full, "{}", text);
        }
    }
}
