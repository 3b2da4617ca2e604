//! Avro (docs/schemas.md#avro): JSON events are checked against the schema while they are
//! encoded to Avro binary, in one walk that names the field that failed; binary events (in the
//! Schema Registry's wire format) are checked by walking the bytes against their writer schema
//! without building values, within a step budget proportional to their size, so a few bytes
//! that claim a billion empty items cost nothing. `apache-avro` parses schemas and checks
//! compatibility; the encoding and the checks are here because its value model would build
//! every event twice and does not say where a value failed.

use std::collections::HashMap;

use apache_avro::schema::{Name, RecordSchema, Schema};
use apache_avro::schema_compatibility::SchemaCompatibility;
use serde_json::{Map, Number, Value};
use sluice_config::{Compatibility, PrivacyAction};

use super::Invalid;

/// A parsed Avro schema with its named types.
pub struct Avro {
    schema: Schema,
    names: HashMap<Name, Schema>,
    /// Records' field defaults, encoded once (for the fast path).
    defaults: super::avro_fast::Defaults,
}

fn invalid(path: &str, reason: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        reason: reason.into(),
        path: path.to_string(),
        message: message.into(),
    }
}

impl Avro {
    pub fn parse(text: &str) -> Result<Self, String> {
        let schema =
            Schema::parse_str(text).map_err(|e| format!("not a valid Avro schema: {e}"))?;
        let names = {
            let resolved = apache_avro::schema::ResolvedSchema::try_from(&schema)
                .map_err(|e| format!("not a valid Avro schema: {e}"))?;
            resolved
                .get_names()
                .iter()
                .map(|(n, s)| (n.clone(), (*s).clone()))
                .collect::<HashMap<_, _>>()
        };
        let mut a = Self {
            schema,
            names,
            defaults: Default::default(),
        };
        a.supported(&a.schema, &mut Vec::new())?;
        let mut records: Vec<&RecordSchema> = Vec::new();
        for s in a.names.values().chain([&a.schema]) {
            if let Schema::Record(r) = s
                && !records.iter().any(|x| x.name == r.name)
            {
                records.push(r);
            }
        }
        let defaults = records
            .iter()
            .map(|r| {
                let encoded = r
                    .fields
                    .iter()
                    .map(|f| {
                        let d = f.default.as_ref()?;
                        let mut out = Vec::new();
                        a.enc(&f.schema, d, &mut String::new(), &mut out).ok()?;
                        Some(out)
                    })
                    .collect();
                (r.name.fullname(None), encoded)
            })
            .collect();
        a.defaults = defaults;
        Ok(a)
    }

    pub(super) fn schema(&self) -> &Schema {
        &self.schema
    }

    pub(super) fn defaults(&self) -> &super::avro_fast::Defaults {
        &self.defaults
    }

    /// A named type's definition for a reference; anything else as it is.
    pub(super) fn resolve<'a>(&'a self, s: &'a Schema) -> &'a Schema {
        self.deref(s)
    }

    /// Refuses what the encoder does not take, at load rather than per event.
    fn supported<'a>(&'a self, s: &'a Schema, seen: &mut Vec<&'a Name>) -> Result<(), String> {
        match s {
            Schema::BigDecimal => Err("the big-decimal logical type is not supported".into()),
            Schema::Array(a) => self.supported(&a.items, seen),
            Schema::Map(m) => self.supported(&m.types, seen),
            Schema::Union(u) => u
                .variants()
                .iter()
                .try_for_each(|v| self.supported(v, seen)),
            Schema::Record(r) => {
                if seen.contains(&&r.name) {
                    return Ok(());
                }
                seen.push(&r.name);
                r.fields
                    .iter()
                    .try_for_each(|f| self.supported(&f.schema, seen))
            }
            Schema::Decimal(d) if d.precision > 38 => {
                Err("decimals of more than 38 digits are not supported".into())
            }
            Schema::Ref { name } => match self.names.get(name) {
                Some(_) => Ok(()),
                None => Err(format!("unknown type `{}`", name.fullname(None))),
            },
            _ => Ok(()),
        }
    }

    /// Checks `v` against the schema and appends its Avro binary encoding to `out`.
    pub fn encode(&self, v: &Value, prefix: &str, out: &mut Vec<u8>) -> Result<(), Invalid> {
        let mut path = prefix.to_string();
        self.enc(&self.schema, v, &mut path, out)
    }

    fn deref<'a>(&'a self, s: &'a Schema) -> &'a Schema {
        match s {
            Schema::Ref { name } => self.names.get(name).unwrap_or(s),
            _ => s,
        }
    }

    fn enc(
        &self,
        s: &Schema,
        v: &Value,
        path: &mut String,
        out: &mut Vec<u8>,
    ) -> Result<(), Invalid> {
        let want =
            |what: &str| invalid(path, "type", format!("expected {what}, found {}", kind(v)));
        match self.deref(s) {
            Schema::Null => v.is_null().then_some(()).ok_or_else(|| want("null")),
            Schema::Boolean => {
                let b = v.as_bool().ok_or_else(|| want("a boolean"))?;
                out.push(b as u8);
                Ok(())
            }
            Schema::Int | Schema::Date | Schema::TimeMillis => {
                let n = v.as_i64().ok_or_else(|| want("an integer"))?;
                let n = i32::try_from(n)
                    .map_err(|_| invalid(path, "range", format!("{n} does not fit an Avro int")))?;
                put_long(out, n.into());
                Ok(())
            }
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => {
                let n = v.as_i64().ok_or_else(|| want("an integer (long)"))?;
                put_long(out, n);
                Ok(())
            }
            Schema::Float => {
                let f = v.as_f64().ok_or_else(|| want("a number"))?;
                out.extend_from_slice(&(f as f32).to_le_bytes());
                Ok(())
            }
            Schema::Double => {
                let f = v.as_f64().ok_or_else(|| want("a number"))?;
                out.extend_from_slice(&f.to_le_bytes());
                Ok(())
            }
            Schema::String | Schema::Uuid => {
                let t = v.as_str().ok_or_else(|| want("a string"))?;
                put_long(out, t.len() as i64);
                out.extend_from_slice(t.as_bytes());
                Ok(())
            }
            Schema::Bytes => {
                let b = latin1(v, path)?;
                put_long(out, b.len() as i64);
                out.extend_from_slice(&b);
                Ok(())
            }
            Schema::Fixed(f) => {
                let b = latin1(v, path)?;
                if b.len() != f.size {
                    return Err(invalid(
                        path,
                        "size",
                        format!(
                            "fixed `{}` has {} bytes, not {}",
                            f.name.name,
                            f.size,
                            b.len()
                        ),
                    ));
                }
                out.extend_from_slice(&b);
                Ok(())
            }
            Schema::Duration => {
                let b = latin1(v, path)?;
                if b.len() != 12 {
                    return Err(invalid(path, "size", "a duration has 12 bytes"));
                }
                out.extend_from_slice(&b);
                Ok(())
            }
            Schema::Decimal(d) => {
                let unscaled =
                    decimal(v, d.scale, d.precision).map_err(|m| invalid(path, "decimal", m))?;
                let bytes = twos_complement(unscaled);
                match self.deref(&d.inner) {
                    Schema::Fixed(f) => {
                        if bytes.len() > f.size {
                            return Err(invalid(
                                path,
                                "range",
                                "the decimal does not fit its fixed size",
                            ));
                        }
                        let pad = if unscaled < 0 { 0xff } else { 0 };
                        out.extend(std::iter::repeat_n(pad, f.size - bytes.len()));
                        out.extend_from_slice(&bytes);
                    }
                    _ => {
                        put_long(out, bytes.len() as i64);
                        out.extend_from_slice(&bytes);
                    }
                }
                Ok(())
            }
            Schema::Enum(e) => {
                let t = v.as_str().ok_or_else(|| want("a symbol (string)"))?;
                match e.symbols.iter().position(|s| s == t) {
                    Some(i) => {
                        put_long(out, i as i64);
                        Ok(())
                    }
                    None => Err(invalid(
                        path,
                        "enum",
                        format!("`{t}` is not one of {}", e.symbols.join(", ")),
                    )),
                }
            }
            Schema::Array(a) => {
                let items = v.as_array().ok_or_else(|| want("an array"))?;
                if !items.is_empty() {
                    put_long(out, items.len() as i64);
                    for (i, item) in items.iter().enumerate() {
                        let len = path.len();
                        path.push('/');
                        path.push_str(&i.to_string());
                        self.enc(&a.items, item, path, out)?;
                        path.truncate(len);
                    }
                }
                out.push(0);
                Ok(())
            }
            Schema::Map(m) => {
                let members = v.as_object().ok_or_else(|| want("an object (map)"))?;
                if !members.is_empty() {
                    put_long(out, members.len() as i64);
                    for (k, item) in members {
                        put_long(out, k.len() as i64);
                        out.extend_from_slice(k.as_bytes());
                        let len = path.len();
                        push_segment(path, k);
                        self.enc(&m.types, item, path, out)?;
                        path.truncate(len);
                    }
                }
                out.push(0);
                Ok(())
            }
            Schema::Record(r) => self.enc_record(r, v, path, out),
            Schema::Union(u) => {
                let branches = u.variants();
                // The Avro JSON encoding's tagged form, {"string": "x"}, names the branch.
                if let Some(m) = v.as_object().filter(|m| m.len() == 1) {
                    let (tag, inner) = m.iter().next().expect("one member");
                    if let Some(i) = branches.iter().position(|b| self.branch_name(b) == *tag) {
                        put_long(out, i as i64);
                        return self.enc(&branches[i], inner, path, out);
                    }
                }
                // Otherwise the first branch the value fits.
                let start = out.len();
                let mut deepest: Option<Invalid> = None;
                for (i, b) in branches.iter().enumerate() {
                    put_long(out, i as i64);
                    match self.enc(b, v, path, out) {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            out.truncate(start);
                            // A branch that got further into the value (a record whose field
                            // failed) says more than "fits no branch".
                            if e.path.len() > path.len()
                                && deepest.as_ref().is_none_or(|d| e.path.len() > d.path.len())
                            {
                                deepest = Some(e);
                            }
                        }
                    }
                }
                if let Some(e) = deepest {
                    return Err(e);
                }
                let names: Vec<String> = branches.iter().map(|b| self.branch_name(b)).collect();
                Err(invalid(
                    path,
                    "union",
                    format!(
                        "{} fits none of the union's types: {}",
                        kind(v),
                        names.join(", ")
                    ),
                ))
            }
            Schema::BigDecimal | Schema::Ref { .. } => {
                Err(invalid(path, "schema", "unsupported type"))
            }
        }
    }

    fn enc_record(
        &self,
        r: &RecordSchema,
        v: &Value,
        path: &mut String,
        out: &mut Vec<u8>,
    ) -> Result<(), Invalid> {
        let Some(obj) = v.as_object() else {
            return Err(invalid(
                path,
                "type",
                format!(
                    "expected an object (record `{}`), found {}",
                    r.name.name,
                    kind(v)
                ),
            ));
        };
        // Strict: a member the record does not have is a mistake (a typo, a newer producer),
        // not something to drop silently.
        if let Some(k) = obj.keys().find(|k| !r.lookup.contains_key(*k)) {
            let len = path.len();
            push_segment(path, k);
            let e = invalid(
                path,
                "unknown_field",
                format!("record `{}` has no field `{k}`", r.name.name),
            );
            path.truncate(len);
            return Err(e);
        }
        for f in &r.fields {
            let len = path.len();
            push_segment(path, &f.name);
            let value = match (obj.get(&f.name), &f.default) {
                (Some(v), _) => v,
                (None, Some(d)) => d,
                (None, None) => {
                    let e = invalid(
                        path,
                        "required",
                        format!("`{}` is required (it has no default)", f.name),
                    );
                    path.truncate(len);
                    return Err(e);
                }
            };
            self.enc(&f.schema, value, path, out)?;
            path.truncate(len);
        }
        Ok(())
    }

    /// A union branch's name in the Avro JSON encoding.
    fn branch_name(&self, s: &Schema) -> String {
        match s {
            Schema::Null => "null".into(),
            Schema::Boolean => "boolean".into(),
            Schema::Int | Schema::Date | Schema::TimeMillis => "int".into(),
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => "long".into(),
            Schema::Float => "float".into(),
            Schema::Double => "double".into(),
            Schema::String | Schema::Uuid => "string".into(),
            Schema::Bytes | Schema::BigDecimal => "bytes".into(),
            Schema::Array(_) => "array".into(),
            Schema::Map(_) => "map".into(),
            Schema::Union(_) => "union".into(),
            Schema::Record(r) => r.name.fullname(None),
            Schema::Enum(e) => e.name.fullname(None),
            Schema::Fixed(f) => f.name.fullname(None),
            Schema::Duration => "fixed".into(),
            Schema::Decimal(d) => self.branch_name(&d.inner),
            Schema::Ref { name } => name.fullname(None),
        }
    }

    /// Checks that `bytes` is exactly one datum of this schema; with `json`, also returns it
    /// in the JSON form [`Avro::encode`] takes (unions as the bare value).
    pub fn check_binary(&self, bytes: &[u8], prefix: &str, json: bool) -> Result<Value, Invalid> {
        let mut r = Reader {
            b: bytes,
            pos: 0,
            // Every field, item and branch costs a step: a datum of n bytes may take 64n (at
            // least 64 Ki), so the walk is linear in the input whatever its counts claim.
            steps: (bytes.len() * 64).max(64 * 1024),
            json,
        };
        let v = self.read(&self.schema, &mut r, &mut prefix.to_string())?;
        if r.pos != bytes.len() {
            return Err(invalid(
                prefix,
                "not_avro",
                format!("{} bytes left after the datum", bytes.len() - r.pos),
            ));
        }
        Ok(v)
    }

    fn read(&self, s: &Schema, r: &mut Reader<'_>, path: &mut String) -> Result<Value, Invalid> {
        r.step(path)?;
        let json = r.json;
        let bad = |path: &str, m: &str| invalid(path, "not_avro", m.to_string());
        Ok(match self.deref(s) {
            Schema::Null => Value::Null,
            Schema::Boolean => match r.take(1).map_err(|m| bad(path, m))?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err(bad(path, "a boolean is 0 or 1")),
            },
            Schema::Int | Schema::Date | Schema::TimeMillis => {
                let n = r.long().map_err(|m| bad(path, m))?;
                if i32::try_from(n).is_err() {
                    return Err(bad(path, "an int out of range"));
                }
                if json { Value::from(n) } else { Value::Null }
            }
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => {
                let n = r.long().map_err(|m| bad(path, m))?;
                if json { Value::from(n) } else { Value::Null }
            }
            Schema::Float => {
                let b = r.take(4).map_err(|m| bad(path, m))?;
                let f = f32::from_le_bytes(b.try_into().expect("4 bytes"));
                if json {
                    Number::from_f64(f.into()).map_or(Value::Null, Value::Number)
                } else {
                    Value::Null
                }
            }
            Schema::Double => {
                let b = r.take(8).map_err(|m| bad(path, m))?;
                let f = f64::from_le_bytes(b.try_into().expect("8 bytes"));
                if json {
                    Number::from_f64(f).map_or(Value::Null, Value::Number)
                } else {
                    Value::Null
                }
            }
            Schema::String | Schema::Uuid => {
                let b = r.sized().map_err(|m| bad(path, m))?;
                let t =
                    std::str::from_utf8(b).map_err(|_| bad(path, "a string that is not UTF-8"))?;
                if json {
                    Value::String(t.to_string())
                } else {
                    Value::Null
                }
            }
            Schema::Bytes => {
                let b = r.sized().map_err(|m| bad(path, m))?;
                if json {
                    Value::String(b.iter().map(|&c| c as char).collect())
                } else {
                    Value::Null
                }
            }
            Schema::Fixed(f) => {
                let b = r.take(f.size).map_err(|m| bad(path, m))?;
                if json {
                    Value::String(b.iter().map(|&c| c as char).collect())
                } else {
                    Value::Null
                }
            }
            Schema::Duration => {
                let b = r.take(12).map_err(|m| bad(path, m))?;
                if json {
                    Value::String(b.iter().map(|&c| c as char).collect())
                } else {
                    Value::Null
                }
            }
            Schema::Decimal(d) => {
                let b = match self.deref(&d.inner) {
                    Schema::Fixed(f) => r.take(f.size),
                    _ => r.sized(),
                }
                .map_err(|m| bad(path, m))?;
                if b.len() > 16 {
                    return Err(bad(path, "a decimal of more than 16 bytes"));
                }
                if json {
                    let mut n: i128 = if b.first().is_some_and(|&x| x & 0x80 != 0) {
                        -1
                    } else {
                        0
                    };
                    for &x in b {
                        n = (n << 8) | i128::from(x);
                    }
                    Value::String(decimal_text(n, d.scale))
                } else {
                    Value::Null
                }
            }
            Schema::Enum(e) => {
                let i = r.long().map_err(|m| bad(path, m))?;
                let sym = usize::try_from(i).ok().and_then(|i| e.symbols.get(i));
                match sym {
                    Some(s) if json => Value::String(s.clone()),
                    Some(_) => Value::Null,
                    None => return Err(bad(path, "an enum index out of range")),
                }
            }
            Schema::Array(a) => {
                let mut items = Vec::new();
                let mut i = 0usize;
                loop {
                    let n = r.block().map_err(|m| bad(path, m))?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        let len = path.len();
                        path.push('/');
                        path.push_str(&i.to_string());
                        let v = self.read(&a.items, r, path)?;
                        path.truncate(len);
                        if json {
                            items.push(v);
                        }
                        i += 1;
                    }
                }
                if json {
                    Value::Array(items)
                } else {
                    Value::Null
                }
            }
            Schema::Map(m) => {
                let mut members = Map::new();
                loop {
                    let n = r.block().map_err(|m| bad(path, m))?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        let k = r.sized().map_err(|m| bad(path, m))?;
                        let k = std::str::from_utf8(k)
                            .map_err(|_| bad(path, "a map key that is not UTF-8"))?;
                        let len = path.len();
                        push_segment(path, k);
                        let v = self.read(&m.types, r, path)?;
                        path.truncate(len);
                        if json {
                            members.insert(k.to_string(), v);
                        }
                    }
                }
                if json {
                    Value::Object(members)
                } else {
                    Value::Null
                }
            }
            Schema::Record(rec) => {
                let mut members = Map::new();
                for f in &rec.fields {
                    let len = path.len();
                    push_segment(path, &f.name);
                    let v = self.read(&f.schema, r, path)?;
                    path.truncate(len);
                    if json {
                        members.insert(f.name.clone(), v);
                    }
                }
                if json {
                    Value::Object(members)
                } else {
                    Value::Null
                }
            }
            Schema::Union(u) => {
                let i = r.long().map_err(|m| bad(path, m))?;
                let b = usize::try_from(i)
                    .ok()
                    .and_then(|i| u.variants().get(i))
                    .ok_or_else(|| bad(path, "a union index out of range"))?;
                self.read(b, r, path)?
            }
            Schema::BigDecimal | Schema::Ref { .. } => {
                return Err(invalid(path, "schema", "unsupported type"));
            }
        })
    }

    /// Whether a privacy rule's field can take its action under this schema: `mask` and
    /// `hmac` need a string field (their result is a string), `drop` a record field with a
    /// default (the encoder writes the default instead).
    pub fn check_rule(&self, segments: &[String], action: PrivacyAction) -> Result<(), String> {
        let mut targets: Vec<(&Schema, Option<bool>)> = Vec::new();
        self.walk(&self.schema, segments, None, &mut targets);
        if targets.is_empty() {
            return Err("names no field of the schema".into());
        }
        for (s, has_default) in targets {
            match action {
                PrivacyAction::Drop if has_default != Some(true) => {
                    return Err(
                        "drop needs a record field with a default (the default is stored instead)"
                            .into(),
                    );
                }
                PrivacyAction::Mask | PrivacyAction::Hmac if !self.takes_string(s) => {
                    return Err(format!(
                        "{} needs a string field (its result is a string); this one is {}",
                        if action == PrivacyAction::Mask {
                            "mask"
                        } else {
                            "hmac"
                        },
                        self.branch_name(s)
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn takes_string(&self, s: &Schema) -> bool {
        match self.deref(s) {
            Schema::String | Schema::Uuid => true,
            Schema::Union(u) => u.variants().iter().any(|b| self.takes_string(b)),
            _ => false,
        }
    }

    /// The schemas a pointer reaches, with whether each is a record field with a default.
    fn walk<'a>(
        &'a self,
        s: &'a Schema,
        segs: &[String],
        field_default: Option<bool>,
        out: &mut Vec<(&'a Schema, Option<bool>)>,
    ) {
        let Some((seg, rest)) = segs.split_first() else {
            out.push((s, field_default));
            return;
        };
        match self.deref(s) {
            Schema::Record(r) => {
                for f in &r.fields {
                    if seg == "*" || *seg == f.name {
                        self.walk(&f.schema, rest, Some(f.default.is_some()), out);
                    }
                }
            }
            Schema::Array(a) if seg == "*" || seg.parse::<usize>().is_ok() => {
                self.walk(&a.items, rest, None, out)
            }
            Schema::Map(m) => self.walk(&m.types, rest, None, out),
            Schema::Union(u) => {
                for b in u.variants() {
                    self.walk(b, segs, field_default, out);
                }
            }
            _ => {}
        }
    }

    /// Whether `new` may follow `old` under `rule` (Avro's schema resolution rules).
    pub fn compatible(old: &Avro, new: &Avro, rule: Compatibility) -> Result<(), String> {
        let backward = || {
            SchemaCompatibility::can_read(&old.schema, &new.schema).map_err(|e| {
                format!("the new version cannot read events written with the previous one: {e}")
            })
        };
        let forward = || {
            SchemaCompatibility::can_read(&new.schema, &old.schema).map_err(|e| {
                format!("the previous version cannot read events written with the new one: {e}")
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

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    steps: usize,
    json: bool,
}

impl<'a> Reader<'a> {
    fn step(&mut self, path: &str) -> Result<(), Invalid> {
        if self.steps == 0 {
            return Err(invalid(
                path,
                "not_avro",
                "more items than a datum of this size can hold",
            ));
        }
        self.steps -= 1;
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("the datum ends early")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn long(&mut self) -> Result<i64, &'static str> {
        get_long(self.b, &mut self.pos)
            .ok_or("the datum ends early, or a varint is longer than 10 bytes")
    }

    fn sized(&mut self) -> Result<&'a [u8], &'static str> {
        let n = self.long()?;
        let n = usize::try_from(n).map_err(|_| "a negative length")?;
        self.take(n)
    }

    /// An array or map block's item count (a negative count is followed by the block's size).
    fn block(&mut self) -> Result<u64, &'static str> {
        let n = self.long()?;
        if n < 0 {
            self.long()?;
        }
        Ok(n.unsigned_abs())
    }
}

/// `int` and the logical types written as one (the matches above list them too, to stay
/// exhaustive).
pub(super) fn is_int(s: &Schema) -> bool {
    matches!(s, Schema::Int | Schema::Date | Schema::TimeMillis)
}

/// `long` and the logical types written as one.
pub(super) fn is_long(s: &Schema) -> bool {
    matches!(
        s,
        Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos
    )
}

/// Reads a zigzag varint (Avro's `long`, also Confluent's message indexes) at `*pos`; `None`
/// when the bytes end first or it runs past 10 bytes.
pub(super) fn get_long(b: &[u8], pos: &mut usize) -> Option<i64> {
    let mut z: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        z |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some((z >> 1) as i64 ^ -((z & 1) as i64));
        }
    }
    None
}

pub fn put_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn push_segment(path: &mut String, seg: &str) {
    path.push('/');
    for c in seg.chars() {
        match c {
            '~' => path.push_str("~0"),
            '/' => path.push_str("~1"),
            c => path.push(c),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Bytes in the Avro JSON encoding: a string of code points 0–255.
fn latin1(v: &Value, path: &str) -> Result<Vec<u8>, Invalid> {
    let t = v.as_str().ok_or_else(|| {
        invalid(
            path,
            "type",
            format!("expected bytes (a string), found {}", kind(v)),
        )
    })?;
    t.chars()
        .map(|c| u8::try_from(u32::from(c)))
        .collect::<Result<Vec<u8>, _>>()
        .map_err(|_| invalid(path, "type", "bytes are a string of code points 0–255"))
}

/// A decimal's unscaled value from a JSON number or string (`"12.34"`).
fn decimal(v: &Value, scale: usize, precision: usize) -> Result<i128, String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err("a decimal is a number or a string like \"12.34\"".into()),
    };
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(format!("`{text}` is not a decimal number"));
    }
    if frac.len() > scale {
        return Err(format!("`{text}` has more than {scale} decimal places"));
    }
    let all = format!("{int}{frac:0<scale$}");
    let all = all.trim_start_matches('0');
    if all.len() > precision {
        return Err(format!("`{text}` has more than {precision} digits"));
    }
    let n: i128 = if all.is_empty() {
        0
    } else {
        all.parse().map_err(|_| format!("`{text}` is too large"))?
    };
    Ok(if neg { -n } else { n })
}

fn decimal_text(n: i128, scale: usize) -> String {
    let digits = n.unsigned_abs().to_string();
    let digits = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = digits.split_at(digits.len() - scale);
    let sign = if n < 0 { "-" } else { "" };
    if scale == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    }
}

/// The shortest big-endian two's complement of `n`.
fn twos_complement(n: i128) -> Vec<u8> {
    let b = n.to_be_bytes();
    let mut i = 0;
    while i < 15 && ((b[i] == 0 && b[i + 1] & 0x80 == 0) || (b[i] == 0xff && b[i + 1] & 0x80 != 0))
    {
        i += 1;
    }
    b[i..].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value as AvroValue;
    use serde_json::json;

    const ORDER: &str = r#"{"type":"record","name":"Order","namespace":"acme","fields":[
        {"name":"id","type":"string"},
        {"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
        {"name":"qty","type":"int"},
        {"name":"status","type":{"type":"enum","name":"Status","symbols":["NEW","PAID"]},"default":"NEW"},
        {"name":"note","type":["null","string"],"default":null},
        {"name":"tags","type":{"type":"array","items":"string"},"default":[]},
        {"name":"attrs","type":{"type":"map","values":"long"},"default":{}},
        {"name":"next","type":["null","Order"],"default":null}]}"#;

    #[test]
    fn json_is_encoded_as_apache_avro_decodes_it() {
        let a = Avro::parse(ORDER).unwrap();
        let v = json!({"id":"o-1","amount":"12.34","qty":3,"status":"PAID","note":{"string":"hi"},
            "tags":["a","b"],"attrs":{"x":-5},"next":{"id":"o-0","amount":-1,"qty":1}});
        let mut out = Vec::new();
        a.encode(&v, "", &mut out).unwrap();
        let back = apache_avro::from_avro_datum(&a.schema, &mut &out[..], None).unwrap();
        let AvroValue::Record(fields) = back else {
            panic!("{back:?}")
        };
        let f: HashMap<_, _> = fields.into_iter().collect();
        assert_eq!(f["id"], AvroValue::String("o-1".into()));
        assert_eq!(f["qty"], AvroValue::Int(3));
        assert_eq!(f["status"], AvroValue::Enum(1, "PAID".into()));
        assert_eq!(
            f["note"],
            AvroValue::Union(1, Box::new(AvroValue::String("hi".into())))
        );
        let AvroValue::Decimal(d) = &f["amount"] else {
            panic!()
        };
        assert_eq!(
            Vec::<u8>::try_from(d.clone()).unwrap(),
            twos_complement(1234)
        );
        // Our own walk over the same bytes agrees, and gives back JSON the encoder takes.
        let j = a.check_binary(&out, "", true).unwrap();
        assert_eq!(j["amount"], "12.34");
        assert_eq!(j["next"]["amount"], "-1.00");
        assert_eq!(j["next"]["status"], "NEW");
        let mut again = Vec::new();
        a.encode(&j, "", &mut again).unwrap();
        assert_eq!(again, out);
    }

    #[test]
    fn invalid_json_names_the_field_and_the_rule() {
        let a = Avro::parse(ORDER).unwrap();
        let err = |v: Value| {
            let e = a.encode(&v, "", &mut Vec::new()).unwrap_err();
            (e.reason, e.path)
        };
        assert_eq!(
            err(json!({"amount":"1","qty":1})),
            ("required".into(), "/id".into())
        );
        assert_eq!(
            err(json!({"id":1,"amount":"1","qty":1})),
            ("type".into(), "/id".into())
        );
        assert_eq!(
            err(json!({"id":"x","amount":"1","qty":1e12})),
            ("type".into(), "/qty".into())
        );
        assert_eq!(
            err(json!({"id":"x","amount":"1","qty":4_000_000_000i64})),
            ("range".into(), "/qty".into())
        );
        assert_eq!(
            err(json!({"id":"x","amount":"1.234","qty":1})),
            ("decimal".into(), "/amount".into())
        );
        assert_eq!(
            err(json!({"id":"x","amount":"1","qty":1,"status":"LOST"})),
            ("enum".into(), "/status".into())
        );
        assert_eq!(
            err(json!({"id":"x","amount":"1","qty":1,"tags":["a",2]})),
            ("type".into(), "/tags/1".into())
        );
        assert_eq!(
            err(json!({"id":"x","amount":"1","qty":1,"extra":1})),
            ("unknown_field".into(), "/extra".into())
        );
        assert_eq!(
            err(json!({"id":"x","amount":"1","qty":1,"note":5})),
            ("union".into(), "/note".into())
        );
        assert_eq!(
            err(json!({"id":"x","amount":"1","qty":1,"next":{"id":"y","amount":"1"}})),
            ("required".into(), "/next/qty".into())
        );
    }

    #[test]
    fn binary_that_is_not_one_datum_is_refused_and_bombs_are_cheap() {
        let a = Avro::parse(ORDER).unwrap();
        let mut ok = Vec::new();
        a.encode(&json!({"id":"x","amount":"1","qty":1}), "", &mut ok)
            .unwrap();
        assert!(a.check_binary(&ok, "", false).is_ok());
        assert_eq!(
            a.check_binary(&ok[..ok.len() - 1], "", false)
                .unwrap_err()
                .reason,
            "not_avro"
        );
        let mut long = ok.clone();
        long.push(0);
        assert_eq!(
            a.check_binary(&long, "", false).unwrap_err().reason,
            "not_avro"
        );
        // An array of a billion nulls in a few bytes: refused within the step budget.
        let nulls = Avro::parse(r#"{"type":"array","items":"null"}"#).unwrap();
        let mut bomb = Vec::new();
        put_long(&mut bomb, 1_000_000_000);
        bomb.push(0);
        let e = nulls.check_binary(&bomb, "", false).unwrap_err();
        assert!(e.message.contains("more items"), "{e:?}");
    }

    #[test]
    fn compatibility_names_what_breaks() {
        let v1 =
            Avro::parse(r#"{"type":"record","name":"U","fields":[{"name":"id","type":"string"}]}"#)
                .unwrap();
        let added_default = Avro::parse(r#"{"type":"record","name":"U","fields":[{"name":"id","type":"string"},{"name":"n","type":"int","default":0}]}"#).unwrap();
        let added_required = Avro::parse(r#"{"type":"record","name":"U","fields":[{"name":"id","type":"string"},{"name":"n","type":"int"}]}"#).unwrap();
        assert!(Avro::compatible(&v1, &added_default, Compatibility::Full).is_ok());
        let e = Avro::compatible(&v1, &added_required, Compatibility::Backward).unwrap_err();
        assert!(e.contains("cannot read") && e.contains('n'), "{e}");
        assert!(Avro::compatible(&v1, &added_required, Compatibility::Forward).is_ok());
        assert!(Avro::compatible(&v1, &added_required, Compatibility::None).is_ok());
    }

    #[test]
    fn privacy_rules_are_checked_against_the_schema() {
        let a = Avro::parse(ORDER).unwrap();
        let seg = |p: &str| super::super::privacy::segments(p);
        assert!(a.check_rule(&seg("/note"), PrivacyAction::Hmac).is_ok());
        assert!(a.check_rule(&seg("/note"), PrivacyAction::Drop).is_ok());
        assert!(a.check_rule(&seg("/tags/*"), PrivacyAction::Mask).is_ok());
        assert!(a.check_rule(&seg("/next/id"), PrivacyAction::Mask).is_ok());
        assert!(
            a.check_rule(&seg("/qty"), PrivacyAction::Mask)
                .unwrap_err()
                .contains("string")
        );
        assert!(
            a.check_rule(&seg("/id"), PrivacyAction::Drop)
                .unwrap_err()
                .contains("default")
        );
        assert!(
            a.check_rule(&seg("/nope"), PrivacyAction::Drop)
                .unwrap_err()
                .contains("no field")
        );
    }

    proptest::proptest! {
        /// Differential, against the reference decoder: whatever bytes our walk accepts as one
        /// datum, apache-avro decodes as exactly one datum too (mutations of valid encodings
        /// and random bytes, so both the near-misses and the noise are tried).
        #[test]
        fn what_the_binary_check_accepts_apache_avro_decodes(
            seed in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 0..4),
            from_valid in proptest::bool::ANY,
        ) {
            let a = Avro::parse(ORDER).unwrap();
            let mut bytes = if from_valid {
                let mut out = Vec::new();
                a.encode(&json!({"id":"o-1","amount":"-3.5","qty":7,"status":"PAID","note":"n",
                    "tags":["x","y"],"attrs":{"k":1},"next":{"id":"o-0","amount":"1","qty":1}}), "", &mut out).unwrap();
                out
            } else {
                seed
            };
            for (at, b) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] ^= b;
                }
            }
            if a.check_binary(&bytes, "", false).is_ok() {
                let mut r = bytes.as_slice();
                let decoded = apache_avro::from_avro_datum(&a.schema, &mut r, None);
                proptest::prop_assert!(decoded.is_ok(), "{:?}: {:?}", bytes, decoded);
                proptest::prop_assert!(r.is_empty(), "{:?}: bytes left", bytes);
            }
        }
    }
}
