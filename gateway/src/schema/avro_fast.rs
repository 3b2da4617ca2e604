//! The fast path of Avro encoding: JSON text is encoded to Avro binary while serde_json reads
//! it — borrowed strings, no document tree — for records of scalars, enums, strings, unions of
//! those and nested records. Anything else (arrays, maps, bytes, fixed, decimals, the tagged
//! union form, a member the record lacks, a missing field without default, a duplicate member,
//! a value that does not fit) is not decided here: the caller encodes from the parsed
//! document, which also names what failed. So for what it accepts it writes exactly the bytes
//! the document path writes (a unit test and a property test compare them).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use apache_avro::schema::{RecordSchema, Schema};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};

use super::avro::{Avro, is_int, is_long, put_long};

/// Fields of a record the fast path reorders on the stack.
const MAX_FIELDS: usize = 32;

/// Each record's fields' defaults, encoded once at load (by record full name).
pub type Defaults = HashMap<String, Vec<Option<Vec<u8>>>>;

thread_local! {
    /// Members' encodings in the order they arrive, before they are put in field order.
    static SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

impl Avro {
    /// Appends the Avro encoding of the JSON text `json` to `out` and returns true, or returns
    /// false with `out` as it was: not decided here.
    pub fn encode_fast(&self, json: &[u8], out: &mut Vec<u8>) -> bool {
        let start = out.len();
        // UTF-8 checked once for the whole text (the reader then skips it per string).
        let Ok(json) = std::str::from_utf8(json) else {
            return false;
        };
        let mut de = serde_json::Deserializer::from_str(json);
        let ok = matches!(
            (Value {
                avro: self,
                schema: self.schema(),
                out,
                depth: 0,
            })
            .deserialize(&mut de),
            Ok(true)
        ) && de.end().is_ok();
        if !ok {
            out.truncate(start);
        }
        ok
    }
}

struct Value<'a> {
    avro: &'a Avro,
    schema: &'a Schema,
    out: &'a mut Vec<u8>,
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Value<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

/// The first union branch a scalar fits, as the document path picks it.
fn branch<'a>(
    avro: &'a Avro,
    branches: &'a [Schema],
    fits: impl Fn(&Schema) -> bool,
) -> Option<(usize, &'a Schema)> {
    branches
        .iter()
        .enumerate()
        .find(|(_, b)| fits(avro.resolve(b)))
}

/// The schema, and for a union the branch `fits` picks (its index written to `out` first).
fn pick<'a>(
    avro: &'a Avro,
    schema: &'a Schema,
    out: &mut Vec<u8>,
    fits: impl Fn(&Schema) -> bool,
) -> Option<&'a Schema> {
    match avro.resolve(schema) {
        Schema::Union(u) => {
            let (i, b) = branch(avro, u.variants(), fits)?;
            put_long(out, i as i64);
            Some(avro.resolve(b))
        }
        s if fits(s) => Some(s),
        _ => None,
    }
}

impl<'a> Value<'a> {
    fn pick(&mut self, fits: impl Fn(&Schema) -> bool) -> Option<&'a Schema> {
        pick(self.avro, self.schema, self.out, fits)
    }

    fn integer(mut self, n: i128) -> bool {
        let int_ok = i32::try_from(n).is_ok();
        let long_ok = i64::try_from(n).is_ok();
        let fits = |s: &Schema| {
            (is_int(s) && int_ok)
                || (is_long(s) && long_ok)
                || matches!(s, Schema::Float | Schema::Double)
        };
        match self.pick(fits) {
            Some(s) if is_int(s) || is_long(s) => {
                put_long(self.out, n as i64);
                true
            }
            Some(Schema::Float) => {
                self.out.extend_from_slice(&(n as f32).to_le_bytes());
                true
            }
            Some(Schema::Double) => {
                self.out.extend_from_slice(&(n as f64).to_le_bytes());
                true
            }
            _ => false,
        }
    }
}

impl<'de> Visitor<'de> for Value<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a value of the schema")
    }
    fn visit_unit<E>(mut self) -> Result<bool, E> {
        Ok(self.pick(|s| matches!(s, Schema::Null)).is_some())
    }
    fn visit_bool<E>(mut self, v: bool) -> Result<bool, E> {
        if self.pick(|s| matches!(s, Schema::Boolean)).is_none() {
            return Ok(false);
        }
        self.out.push(v as u8);
        Ok(true)
    }
    fn visit_i64<E>(self, v: i64) -> Result<bool, E> {
        Ok(self.integer(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<bool, E> {
        Ok(self.integer(v.into()))
    }
    fn visit_f64<E>(mut self, v: f64) -> Result<bool, E> {
        match self.pick(|s| matches!(s, Schema::Float | Schema::Double)) {
            Some(Schema::Float) => self.out.extend_from_slice(&(v as f32).to_le_bytes()),
            Some(_) => self.out.extend_from_slice(&v.to_le_bytes()),
            None => return Ok(false),
        }
        Ok(true)
    }
    fn visit_str<E>(mut self, v: &str) -> Result<bool, E> {
        let fits = |s: &Schema| match s {
            Schema::String | Schema::Uuid => true,
            Schema::Enum(e) => e.symbols.iter().any(|x| x == v),
            _ => false,
        };
        match self.pick(fits) {
            Some(Schema::Enum(e)) => {
                let i = e.symbols.iter().position(|x| x == v).expect("fits");
                put_long(self.out, i as i64);
            }
            Some(_) => {
                put_long(self.out, v.len() as i64);
                self.out.extend_from_slice(v.as_bytes());
            }
            None => return Ok(false),
        }
        Ok(true)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<bool, A::Error> {
        if self.depth > 16 {
            return Ok(false);
        }
        // An object in a union may be the tagged form: not decided here.
        let Schema::Record(r) = self.avro.resolve(self.schema) else {
            return Ok(false);
        };
        record(self.avro, r, map, self.out, self.depth + 1)
    }
}

fn record<'de, A: MapAccess<'de>>(
    avro: &Avro,
    r: &RecordSchema,
    mut map: A,
    out: &mut Vec<u8>,
    depth: usize,
) -> Result<bool, A::Error> {
    let n = r.fields.len();
    if n > MAX_FIELDS {
        return Ok(false);
    }
    // Members that arrive in field order (the common case: producers serialize records in
    // their declared order) are written straight to `out`; from the first one out of order,
    // the rest wait in per-field scratch buffers and are put in order at the end.
    let mut direct = 0;
    let mut bufs: Option<Vec<Vec<u8>>> = None;
    let mut seen = 0u64;
    let mut ok = true;
    while ok {
        let Some(i) = map.next_key_seed(Field(r))? else {
            break;
        };
        let Some(i) = i.filter(|&i| seen & (1 << i) == 0) else {
            // A duplicate member, or one the record lacks.
            ok = false;
            break;
        };
        seen |= 1 << i;
        let schema = &r.fields[i].schema;
        if i == direct {
            direct += 1;
            ok = map.next_value_seed(Value {
                avro,
                schema,
                out,
                depth,
            })?;
            continue;
        }
        let bufs = bufs.get_or_insert_with(|| {
            let mut b = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
            if b.len() < n {
                b.resize_with(n, Vec::new);
            }
            b
        });
        let mut buf = std::mem::take(&mut bufs[i]);
        buf.clear();
        ok = map.next_value_seed(Value {
            avro,
            schema,
            out: &mut buf,
            depth,
        })?;
        bufs[i] = buf;
    }
    let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
    // Looked up only when a field is missing (the key is built from the name).
    let defaults = (ok && seen != all)
        .then(|| avro.defaults().get(&r.name.fullname(None)))
        .flatten();
    if ok {
        for i in direct..n {
            if seen & (1 << i) != 0 {
                out.extend_from_slice(&bufs.as_ref().expect("buffered")[i]);
            } else {
                match defaults.and_then(|d| d[i].as_ref()) {
                    Some(d) => out.extend_from_slice(d),
                    None => {
                        ok = false;
                        break;
                    }
                }
            }
        }
    }
    if let Some(bufs) = bufs {
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            // Nested records took theirs; keep the larger set.
            if s.len() < bufs.len() {
                *s = bufs;
            }
        });
    }
    Ok(ok)
}

/// A member name as its field's index.
struct Field<'a>(&'a RecordSchema);

impl<'de> DeserializeSeed<'de> for Field<'_> {
    type Value = Option<usize>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Field<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E>(self, v: &str) -> Result<Option<usize>, E> {
        Ok(self.0.fields.iter().position(|f| f.name == v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Strategy as _;

    const SCHEMA: &str = r#"{"type":"record","name":"Order","namespace":"acme","fields":[
        {"name":"id","type":"string"},
        {"name":"amount","type":"double"},
        {"name":"qty","type":"int","default":1},
        {"name":"big","type":["null","int","long","double"],"default":null},
        {"name":"currency","type":{"type":"enum","name":"Cur","symbols":["EUR","USD"]},"default":"EUR"},
        {"name":"note","type":["null","Cur","string"],"default":null},
        {"name":"ok","type":["boolean","null"],"default":true},
        {"name":"f","type":"float","default":0.5},
        {"name":"next","type":["null","Order"],"default":null},
        {"name":"inner","type":{"type":"record","name":"In","fields":[{"name":"x","type":"long","default":7}]},"default":{}}]}"#;

    /// Fast and document paths on one text: when the fast path decides, the same bytes.
    fn both(a: &Avro, text: &str) -> Option<Vec<u8>> {
        let mut fast = Vec::new();
        let decided = a.encode_fast(text.as_bytes(), &mut fast);
        let doc = serde_json::from_str::<serde_json::Value>(text)
            .ok()
            .and_then(|v| {
                let mut out = Vec::new();
                a.encode(&v, "", &mut out).ok().map(|()| out)
            });
        if decided {
            assert_eq!(Some(&fast), doc.as_ref(), "{text}");
            Some(fast)
        } else {
            assert!(fast.is_empty());
            None
        }
    }

    #[test]
    fn the_fast_path_writes_what_the_document_path_writes() {
        let a = Avro::parse(SCHEMA).unwrap();
        let decided = [
            r#"{"id":"a","amount":1}"#,
            r#"{"amount":2.5,"id":"b","qty":3,"currency":"USD","note":"USD","ok":null,"f":2}"#,
            r#"{"id":"c","amount":1,"big":5,"note":"free text"}"#,
            r#"{"id":"d","amount":1,"big":5000000000}"#,
            r#"{"id":"e","amount":1,"big":1.5}"#,
            r#"{"id":"f","amount":1,"inner":{"x":-3},"next":null}"#,
            r#"{"id":"g\u00e9\n","amount":-0.0}"#,
        ];
        for t in decided {
            assert!(both(&a, t).is_some(), "the fast path decides {t}");
        }
        let undecided = [
            r#"{"id":"a"}"#,
            r#"{"id":"a","amount":1,"extra":1}"#,
            r#"{"id":"a","id":"b","amount":1}"#,
            r#"{"id":"a","amount":"1"}"#,
            r#"{"id":"a","amount":1,"qty":3000000000}"#,
            r#"{"id":"a","amount":1,"currency":"GBP"}"#,
            r#"{"id":"a","amount":1,"next":{"id":"b","amount":2}}"#,
            r#"{"id":"a","amount":1,"note":{"string":"x"}}"#,
            r#"{"id":"a","amount":1} x"#,
            r#"[1]"#,
        ];
        for t in undecided {
            assert!(both(&a, t).is_none(), "not decided by the fast path: {t}");
        }
    }

    proptest::proptest! {
        #[test]
        fn fast_and_document_paths_agree(members in proptest::collection::vec(
            (0usize..11, proptest::prop_oneof![
                proptest::strategy::Just(serde_json::Value::Null),
                proptest::bool::ANY.prop_map(serde_json::Value::from),
                proptest::num::i64::ANY.prop_map(serde_json::Value::from),
                (-1e6f64..1e6).prop_map(serde_json::Value::from),
                "[a-zA-Z]{0,6}".prop_map(serde_json::Value::from),
                proptest::sample::select(vec!["EUR", "USD"]).prop_map(serde_json::Value::from),
                (-10i64..10).prop_map(|x| serde_json::json!({"x": x})),
            ]),
            0..9,
        )) {
            let a = Avro::parse(SCHEMA).unwrap();
            let names = ["id", "amount", "qty", "big", "currency", "note", "ok", "f", "next", "inner", "nope"];
            let text = format!("{{{}}}", members.iter()
                .map(|(k, v)| format!("{:?}:{}", names[*k], v))
                .collect::<Vec<_>>().join(","));
            both(&a, &text);
        }
    }
}
