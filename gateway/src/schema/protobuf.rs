//! Protobuf (docs/schemas.md#protobuf): a message type from a `.proto` file (compiled here
//! with `protox`, no `protoc` needed), a descriptor set, or the registry's schema text. JSON
//! events follow the proto3 JSON mapping and are stored as binary; binary events in the
//! registry's wire format (magic byte, schema id, message indexes) are decoded against the
//! message their indexes name. Errors name the field path as a JSON pointer.

use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FileDescriptor, Kind, MessageDescriptor,
    SerializeOptions,
};
use protox::prost::Message as _;
use serde_json::Value;
use sluice_config::{Compatibility, PrivacyAction};

use super::Invalid;

/// The most message indexes a wire-format header may carry (nesting depth).
const MAX_INDEXES: usize = 32;

pub struct Protobuf {
    message: MessageDescriptor,
    /// The message's indexes in its file (Confluent's wire format), `[0]` for the first.
    indexes: Vec<i64>,
}

/// Resolves the registry's schema text as `schema.proto`; Google's well-known types too.
struct InMemory(String);

impl protox::file::FileResolver for InMemory {
    fn open_file(&self, name: &str) -> Result<protox::file::File, protox::Error> {
        if name == "schema.proto" {
            protox::file::File::from_source(name, &self.0)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

fn compile_error(e: protox::Error) -> String {
    format!("not a valid .proto file: {e}")
}

impl Protobuf {
    /// From a `.proto` file (imports resolved next to it) or a binary `FileDescriptorSet`.
    pub fn from_file(path: &str, message: Option<&str>) -> Result<Self, String> {
        let p = std::path::Path::new(path);
        if p.extension().is_some_and(|e| e == "proto") {
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty());
            let dir = dir.unwrap_or(std::path::Path::new("."));
            let name = p.file_name().ok_or("no file name")?;
            let mut c = protox::Compiler::new([dir]).map_err(compile_error)?;
            c.open_file(name).map_err(compile_error)?;
            let pool = c.descriptor_pool();
            let file = pool
                .get_file_by_name(&name.to_string_lossy())
                .ok_or("the compiled file is missing")?;
            Self::pick(&pool, Some(file), message)
        } else {
            let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
            let pool = DescriptorPool::decode(bytes.as_slice())
                .map_err(|e| format!("neither a .proto file nor a descriptor set: {e}"))?;
            // protoc writes a file's imports before it: the last file is the one asked for.
            let last = pool.files().last();
            Self::pick(&pool, last, message)
        }
    }

    /// From the registry's schema text.
    pub fn from_text(text: &str, message: Option<&str>) -> Result<Self, String> {
        let mut resolver = protox::file::ChainFileResolver::new();
        resolver.add(InMemory(text.to_string()));
        resolver.add(protox::file::GoogleFileResolver::new());
        let mut c = protox::Compiler::with_file_resolver(resolver);
        c.open_file("schema.proto").map_err(compile_error)?;
        let pool = c.descriptor_pool();
        let file = pool.get_file_by_name("schema.proto");
        Self::pick(&pool, file, message)
    }

    /// The named message, or the file's first (the registry's default).
    fn pick(
        pool: &DescriptorPool,
        file: Option<FileDescriptor>,
        message: Option<&str>,
    ) -> Result<Self, String> {
        let message = match message {
            Some(name) => pool
                .get_message_by_name(name)
                .ok_or_else(|| format!("no message `{name}`"))?,
            None => file
                .and_then(|f| f.messages().next())
                .ok_or("the file declares no message")?,
        };
        let indexes = indexes_of(&message);
        Ok(Self { message, indexes })
    }

    /// The wire format's message-index bytes of the configured message.
    pub fn index_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.indexes == [0] {
            out.push(0);
        } else {
            super::avro::put_long(&mut out, self.indexes.len() as i64);
            for &i in &self.indexes {
                super::avro::put_long(&mut out, i);
            }
        }
        out
    }

    /// Checks `doc` (proto3 JSON mapping) and returns the message's binary encoding.
    pub fn encode(&self, doc: &Value, prefix: &str) -> Result<Vec<u8>, Invalid> {
        let mut track = serde_path_to_error::Track::new();
        let de = serde_path_to_error::Deserializer::new(doc, &mut track);
        match DynamicMessage::deserialize_with_options(
            self.message.clone(),
            de,
            &DeserializeOptions::new(),
        ) {
            Ok(m) => Ok(m.encode_to_vec()),
            Err(e) => {
                let message = e.to_string();
                let unknown = message
                    .strip_prefix("unrecognized field name '")
                    .and_then(|r| r.strip_suffix('\''));
                let reason = if unknown.is_some() || message.starts_with("unknown field") {
                    "unknown_field"
                } else if message.starts_with("invalid type") {
                    "type"
                } else if message.starts_with("invalid value") {
                    "value"
                } else {
                    "schema"
                };
                let mut path = prefix.to_string();
                for seg in track.path().iter() {
                    path.push('/');
                    match seg {
                        serde_path_to_error::Segment::Seq { index } => {
                            path.push_str(&index.to_string())
                        }
                        serde_path_to_error::Segment::Map { key } => {
                            path.push_str(&key.replace('~', "~0").replace('/', "~1"))
                        }
                        serde_path_to_error::Segment::Enum { variant } => path.push_str(variant),
                        serde_path_to_error::Segment::Unknown => path.push('?'),
                    }
                }
                if let Some(name) = unknown {
                    path.push('/');
                    path.push_str(&name.replace('~', "~0").replace('/', "~1"));
                }
                Err(Invalid {
                    reason: reason.into(),
                    path,
                    message,
                })
            }
        }
    }

    /// Splits a wire-format body (after the magic byte and id) into the message its indexes
    /// name and the message bytes.
    pub fn split(&self, body: &[u8], prefix: &str) -> Result<(MessageDescriptor, usize), Invalid> {
        let bad = |m: &str| Invalid {
            reason: "not_protobuf".into(),
            path: prefix.to_string(),
            message: m.into(),
        };
        let mut pos = 0;
        let long = |pos: &mut usize| {
            super::avro::get_long(body, pos)
                .ok_or_else(|| bad("the message indexes end early, or a varint is too long"))
        };
        let n = long(&mut pos)?;
        let indexes = if n == 0 {
            vec![0]
        } else {
            let n = usize::try_from(n)
                .ok()
                .filter(|&n| n <= MAX_INDEXES)
                .ok_or_else(|| bad("too many message indexes"))?;
            (0..n).map(|_| long(&mut pos)).collect::<Result<_, _>>()?
        };
        let m = by_indexes(&self.message.parent_file(), &indexes).ok_or_else(|| Invalid {
            reason: "unknown_schema".into(),
            path: prefix.to_string(),
            message: format!("message indexes {indexes:?} name no message of the schema"),
        })?;
        Ok((m, pos))
    }

    /// Checks that `bytes` decode as `message`; with `json`, returns it in the JSON mapping
    /// (proto field names, so privacy pointers name fields as the .proto does).
    pub fn check_binary(
        message: &MessageDescriptor,
        bytes: &[u8],
        prefix: &str,
        json: bool,
    ) -> Result<Value, Invalid> {
        let m = DynamicMessage::decode(message.clone(), bytes).map_err(|e| Invalid {
            reason: "not_protobuf".into(),
            path: prefix.to_string(),
            message: format!("not a {}: {e}", message.full_name()),
        })?;
        if !json {
            return Ok(Value::Null);
        }
        m.serialize_with_options(
            serde_json::value::Serializer,
            &SerializeOptions::new().use_proto_field_name(true),
        )
        .map_err(|e| Invalid {
            reason: "not_protobuf".into(),
            path: prefix.to_string(),
            message: e.to_string(),
        })
    }

    /// Encodes `doc` as `message` (binary input that went through privacy rules).
    pub fn encode_as(
        message: &MessageDescriptor,
        doc: &Value,
        prefix: &str,
    ) -> Result<Vec<u8>, Invalid> {
        Protobuf {
            message: message.clone(),
            indexes: Vec::new(),
        }
        .encode(doc, prefix)
    }

    /// Whether a privacy rule's field exists and can take the action (`mask` and `hmac` need a
    /// string field; every proto3 field may be dropped).
    pub fn check_rule(&self, segments: &[String], action: PrivacyAction) -> Result<(), String> {
        let mut kinds = Vec::new();
        walk(&Kind::Message(self.message.clone()), segments, &mut kinds);
        if kinds.is_empty() {
            return Err("names no field of the message".into());
        }
        if matches!(action, PrivacyAction::Mask | PrivacyAction::Hmac)
            && let Some(k) = kinds.iter().find(|k| !matches!(k, Kind::String))
        {
            return Err(format!(
                "needs a string field (its result is a string); this one is {k:?}"
            ));
        }
        Ok(())
    }

    /// Whether `new` may follow `old`: a field number must keep a wire-compatible type and
    /// its cardinality, recursively through message fields (the breaks that make old and new
    /// readers misread each other; adding and removing fields is compatible in proto3).
    pub fn compatible(old: &Protobuf, new: &Protobuf, rule: Compatibility) -> Result<(), String> {
        if rule == Compatibility::None {
            return Ok(());
        }
        let mut seen = Vec::new();
        same_wire(&old.message, &new.message, "", &mut seen)
    }
}

fn walk(kind: &Kind, segs: &[String], out: &mut Vec<Kind>) {
    let Some((seg, rest)) = segs.split_first() else {
        out.push(kind.clone());
        return;
    };
    let Kind::Message(m) = kind else { return };
    for f in m.fields() {
        if seg == "*" || seg == f.name() || seg == f.json_name() {
            if f.is_list() || f.is_map() {
                // `/tags/*` or `/tags/0`: the element; `/tags` itself: the whole field.
                match rest.split_first() {
                    Some((_, rest2)) => {
                        let k = if f.is_map() {
                            let Kind::Message(entry) = f.kind() else {
                                continue;
                            };
                            entry.map_entry_value_field().kind()
                        } else {
                            f.kind()
                        };
                        walk(&k, rest2, out);
                    }
                    None => out.push(Kind::Message(m.clone())),
                }
            } else {
                walk(&f.kind(), rest, out);
            }
        }
    }
}

fn wire_class(k: &Kind) -> &'static str {
    match k {
        Kind::Int32 | Kind::Int64 | Kind::Uint32 | Kind::Uint64 | Kind::Bool | Kind::Enum(_) => {
            "varint"
        }
        Kind::Sint32 | Kind::Sint64 => "zigzag varint",
        Kind::Fixed32 | Kind::Sfixed32 | Kind::Float => "32-bit",
        Kind::Fixed64 | Kind::Sfixed64 | Kind::Double => "64-bit",
        Kind::String | Kind::Bytes => "length-delimited",
        Kind::Message(_) => "message",
    }
}

fn same_wire(
    old: &MessageDescriptor,
    new: &MessageDescriptor,
    at: &str,
    seen: &mut Vec<(String, String)>,
) -> Result<(), String> {
    let pair = (old.full_name().to_string(), new.full_name().to_string());
    if seen.contains(&pair) {
        return Ok(());
    }
    seen.push(pair);
    for of in old.fields() {
        let Some(nf) = new.get_field(of.number()) else {
            continue;
        };
        let here = format!("{at}/{}", nf.name());
        let (ok, nk) = (of.kind(), nf.kind());
        if wire_class(&ok) != wire_class(&nk) {
            return Err(format!(
                "field {here} (number {}) changed from {ok:?} to {nk:?}",
                of.number()
            ));
        }
        if of.is_list() != nf.is_list() || of.is_map() != nf.is_map() {
            return Err(format!(
                "field {here} (number {}) changed between repeated and single",
                of.number()
            ));
        }
        if let (Kind::Message(om), Kind::Message(nm)) = (&ok, &nk) {
            same_wire(om, nm, &here, seen)?;
        }
    }
    Ok(())
}

fn indexes_of(m: &MessageDescriptor) -> Vec<i64> {
    let mut out = Vec::new();
    let mut cur = m.clone();
    loop {
        match cur.parent_message() {
            Some(p) => {
                let i = p
                    .child_messages()
                    .position(|c| c.full_name() == cur.full_name());
                out.push(i.unwrap_or(0) as i64);
                cur = p;
            }
            None => {
                let i = cur
                    .parent_file()
                    .messages()
                    .position(|c| c.full_name() == cur.full_name());
                out.push(i.unwrap_or(0) as i64);
                break;
            }
        }
    }
    out.reverse();
    out
}

fn by_indexes(file: &FileDescriptor, indexes: &[i64]) -> Option<MessageDescriptor> {
    let (first, rest) = indexes.split_first()?;
    let mut m = file.messages().nth(usize::try_from(*first).ok()?)?;
    for &i in rest {
        let next = m.child_messages().nth(usize::try_from(i).ok()?)?;
        m = next;
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ORDER: &str = r#"syntax = "proto3";
package acme;
message Order {
  string id = 1;
  int64 amount = 2;
  repeated Item items = 3;
  string email = 4;
  message Item { string sku = 1; int32 qty = 2; }
}
message Other { string x = 1; }
"#;

    #[test]
    fn json_is_checked_and_encoded_and_paths_are_pointers() {
        let p = Protobuf::from_text(ORDER, None).unwrap();
        assert_eq!(p.message.full_name(), "acme.Order");
        assert_eq!(p.index_bytes(), [0]);
        let bin = p
            .encode(
                &json!({"id":"o-1","amount":"12","items":[{"sku":"a","qty":2}]}),
                "",
            )
            .unwrap();
        let back = Protobuf::check_binary(&p.message, &bin, "", true).unwrap();
        assert_eq!(back["id"], "o-1");
        assert_eq!(back["items"][0]["qty"], 2);
        let e = p
            .encode(&json!({"id":"o-1","items":[{"sku":"a","qty":"many"}]}), "")
            .unwrap_err();
        assert_eq!(e.path, "/items/0/qty", "{e:?}");
        let e = p
            .encode(&json!({"id":"o-1","items":[{"nope":1}]}), "")
            .unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.path.as_str()),
            ("unknown_field", "/items/0/nope"),
            "{e:?}"
        );
        let e = p.encode(&json!({"id":5}), "").unwrap_err();
        assert_eq!(
            (e.reason.as_str(), e.path.as_str()),
            ("type", "/id"),
            "{e:?}"
        );
        assert_eq!(
            Protobuf::check_binary(&p.message, &[0x0a, 0x05, b'a'], "", false)
                .unwrap_err()
                .reason,
            "not_protobuf"
        );
    }

    #[test]
    fn nested_messages_have_their_wire_indexes() {
        let item = Protobuf::from_text(ORDER, Some("acme.Order.Item")).unwrap();
        assert_eq!(item.indexes, [0, 0]);
        let other = Protobuf::from_text(ORDER, Some("acme.Other")).unwrap();
        assert_eq!(other.indexes, [1]);
        let mut body = other.index_bytes();
        assert_eq!(body, [2, 2]);
        body.extend([0x0a, 0x01, b'z']);
        let (m, at) = other.split(&body, "").unwrap();
        assert_eq!(m.full_name(), "acme.Other");
        assert_eq!(at, 2);
        let (m, _) = other.split(&[0], "").unwrap();
        assert_eq!(m.full_name(), "acme.Order");
        assert_eq!(
            other.split(&[2, 20], "").unwrap_err().reason,
            "unknown_schema"
        );
    }

    #[test]
    fn compatibility_and_privacy_rules() {
        let v1 = Protobuf::from_text(ORDER, None).unwrap();
        let renamed = Protobuf::from_text(
            &ORDER.replace("string email = 4;", "string mail = 4; bool vip = 5;"),
            None,
        )
        .unwrap();
        assert!(Protobuf::compatible(&v1, &renamed, Compatibility::Full).is_ok());
        let retyped = Protobuf::from_text(
            &ORDER.replace("int64 amount = 2;", "string amount = 2;"),
            None,
        )
        .unwrap();
        let e = Protobuf::compatible(&v1, &retyped, Compatibility::Backward).unwrap_err();
        assert!(e.contains("/amount") && e.contains("number 2"), "{e}");
        let seg = super::super::privacy::segments;
        assert!(v1.check_rule(&seg("/email"), PrivacyAction::Hmac).is_ok());
        assert!(
            v1.check_rule(&seg("/items/*/sku"), PrivacyAction::Mask)
                .is_ok()
        );
        assert!(v1.check_rule(&seg("/amount"), PrivacyAction::Mask).is_err());
        assert!(v1.check_rule(&seg("/nope"), PrivacyAction::Drop).is_err());
    }
}
