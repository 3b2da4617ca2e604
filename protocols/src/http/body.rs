//! Request bodies to events: content decoding (gzip, zstd) and the JSON, NDJSON and raw event
//! formats. Values are slices of the received buffer wherever the input allows.
//!
//! The JSON event rule: an object whose members are all among `value`, `key`, `headers`, `id`,
//! `timestamp` and `partition`, and that has `value`, is an event envelope; any other JSON value
//! (including other objects) is the event's value itself. The stored value is the JSON text of
//! `value`, byte for byte.

use std::borrow::Cow;
use std::fmt;
use std::io::Read;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use sluice_core::{Event, Rejection};

/// The formats a request body can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one event or an array of events.
    Json,
    /// `application/x-ndjson`: one JSON event per line.
    Ndjson,
    /// `application/cloudevents+json`: one CloudEvent in structured mode.
    CloudEvent,
    /// `application/cloudevents-batch+json`: an array of CloudEvents.
    CloudEventBatch,
    /// Anything else: the whole body is one event's value.
    Raw,
}

/// The format for a `Content-Type` header value (parameters such as `charset` are ignored).
pub fn format_of(content_type: Option<&str>) -> BodyFormat {
    let Some(ct) = content_type else {
        return BodyFormat::Raw;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        BodyFormat::Json
    } else if essence.eq_ignore_ascii_case("application/x-ndjson")
        || essence.eq_ignore_ascii_case("application/ndjson")
    {
        BodyFormat::Ndjson
    } else if essence.eq_ignore_ascii_case(super::cloudevents::STRUCTURED) {
        BodyFormat::CloudEvent
    } else if essence.eq_ignore_ascii_case(super::cloudevents::BATCH) {
        BodyFormat::CloudEventBatch
    } else {
        BodyFormat::Raw
    }
}

/// The content codings Sluice decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Zstd,
}

/// Parses a `Content-Encoding` header value; anything but one supported coding is 415.
pub fn coding_of(value: Option<&str>) -> Result<Coding, Rejection> {
    let Some(v) = value.map(str::trim) else {
        return Ok(Coding::Identity);
    };
    if v.is_empty() || v.eq_ignore_ascii_case("identity") {
        Ok(Coding::Identity)
    } else if v.eq_ignore_ascii_case("gzip") || v.eq_ignore_ascii_case("x-gzip") {
        Ok(Coding::Gzip)
    } else if v.eq_ignore_ascii_case("zstd") {
        Ok(Coding::Zstd)
    } else {
        Err(Rejection::UnsupportedMediaType {
            message: format!("Content-Encoding `{v}` is not supported; use gzip, zstd or identity"),
        })
    }
}

/// Decodes `body`, refusing output larger than `limit` bytes (decompression bombs get 413).
pub fn decode(coding: Coding, body: Bytes, limit: u64) -> Result<Bytes, Rejection> {
    let (name, reader): (&str, Box<dyn Read + '_>) = match coding {
        Coding::Identity => return Ok(body),
        Coding::Gzip => (
            "gzip",
            Box::new(flate2::read::MultiGzDecoder::new(&body[..])),
        ),
        Coding::Zstd => (
            "zstd",
            Box::new(
                zstd::stream::read::Decoder::with_buffer(&body[..]).map_err(|e| {
                    Rejection::Malformed {
                        message: format!("invalid zstd body: {e}"),
                    }
                })?,
            ),
        ),
    };
    let mut out = Vec::with_capacity((body.len() * 4).min(limit as usize));
    reader
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| Rejection::Malformed {
            message: format!("invalid {name} body: {e}"),
        })?;
    if out.len() as u64 > limit {
        return Err(Rejection::TooLarge {
            message: format!("the decompressed body exceeds the stream's limit of {limit} bytes"),
        });
    }
    Ok(Bytes::from(out))
}

/// How many events a body may hold, and the stream it is for (named in the refusal).
#[derive(Debug, Clone, Copy)]
pub struct EventLimit<'a> {
    pub max: u64,
    pub stream: &'a str,
}

impl EventLimit<'_> {
    /// No limit (tests).
    pub const NONE: EventLimit<'static> = EventLimit {
        max: u64::MAX,
        stream: "",
    };

    pub(crate) fn exceeded(&self, at_least: u64) -> Rejection {
        Rejection::TooLarge {
            message: format!(
                "the request holds at least {at_least} events; the limit for stream `{}` is {}",
                self.stream, self.max
            ),
        }
    }
}

/// Parses a JSON body: one event, or an array of events. An array is read element by element
/// and refused as soon as it holds more than `limit.max` events, so a body of millions of tiny
/// events is never materialised.
pub fn parse_json(body: &Bytes, limit: EventLimit<'_>) -> Result<Vec<Event>, Rejection> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let failed = std::cell::RefCell::new(None);
        let visitor = ArrayOfEvents {
            body,
            limit,
            failed: &failed,
        };
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed = de::Deserializer::deserialize_seq(&mut de, visitor).and_then(|events| {
            de.end()?;
            Ok(events)
        });
        match (parsed, failed.into_inner()) {
            (_, Some(refusal)) => Err(refusal),
            (Err(e), None) => Err(json_error(&e)),
            (Ok(events), None) if events.is_empty() => Err(malformed("the array holds no events")),
            (Ok(events), None) => Ok(events),
        }
    } else {
        let raw: &RawValue = serde_json::from_slice(body).map_err(|e| json_error(&e))?;
        Ok(vec![event_from(body, raw).map_err(malformed)?])
    }
}

/// A JSON array read into events one element at a time, within the limit. Refusals that are not
/// JSON syntax errors are kept in `failed` (the serde error only stops the parse).
struct ArrayOfEvents<'a, 'l> {
    body: &'a Bytes,
    limit: EventLimit<'l>,
    failed: &'a std::cell::RefCell<Option<Rejection>>,
}

impl<'de> Visitor<'de> for ArrayOfEvents<'_, '_> {
    type Value = Vec<Event>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of events")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Event>, A::Error> {
        let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(raw) = seq.next_element::<&'de RawValue>()? {
            if events.len() as u64 >= self.limit.max {
                let refusal = self.limit.exceeded(events.len() as u64 + 1);
                *self.failed.borrow_mut() = Some(refusal);
                return Err(de::Error::custom("event limit"));
            }
            match event_from(self.body, raw) {
                Ok(e) => events.push(e),
                Err(m) => {
                    let i = events.len();
                    *self.failed.borrow_mut() = Some(malformed(format!("event {i}: {m}")));
                    return Err(de::Error::custom("bad event"));
                }
            }
        }
        Ok(events)
    }
}

/// The elements of a JSON array, unparsed, refused as soon as there are more than `limit.max`
/// (so a body of millions of tiny elements is never materialised): `Ok(None)` when `body` is
/// not an array.
pub(crate) fn array_within<'b>(
    body: &'b [u8],
    limit: EventLimit<'_>,
) -> Result<Option<Vec<&'b RawValue>>, Rejection> {
    struct Elements<'l> {
        max: u64,
        over: &'l std::cell::Cell<bool>,
    }
    impl<'de> Visitor<'de> for Elements<'_> {
        type Value = Vec<&'de RawValue>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an array")
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                if out.len() as u64 >= self.max {
                    self.over.set(true);
                    return Err(de::Error::custom("too many elements"));
                }
                out.push(raw);
            }
            Ok(out)
        }
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
        return Ok(None);
    }
    let over = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = de::Deserializer::deserialize_seq(
        &mut de,
        Elements {
            max: limit.max,
            over: &over,
        },
    )
    .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(v) => Ok(Some(v)),
        Err(_) if over.get() => Err(limit.exceeded(limit.max + 1)),
        Err(e) => Err(json_error(&e)),
    }
}

/// Parses an NDJSON body: one event per non-empty line, refused as soon as it holds more than
/// `limit.max` events.
pub fn parse_ndjson(body: &Bytes, limit: EventLimit<'_>) -> Result<Vec<Event>, Rejection> {
    let mut events = Vec::new();
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if events.len() as u64 >= limit.max {
            return Err(limit.exceeded(events.len() as u64 + 1));
        }
        let raw: &RawValue = serde_json::from_slice(line)
            .map_err(|e| malformed(format!("line {}: invalid JSON: {e}", i + 1)))?;
        events.push(event_from(body, raw).map_err(|m| malformed(format!("line {}: {m}", i + 1)))?);
    }
    if events.is_empty() {
        return Err(malformed("the body holds no events"));
    }
    Ok(events)
}

/// Decodes a request body as the HTTP adapter would, with the first byte choosing the content
/// coding (bits 0-1: identity, gzip, zstd) and the format (bit 2: JSON, else NDJSON), within a
/// 1 MiB body and 1,000 events: how many events. For the fuzz target (`protocols/fuzz`,
/// `http_body`) and its corpus replay.
pub fn decode_request(data: &[u8]) -> Result<usize, Rejection> {
    let Some((&selector, body)) = data.split_first() else {
        return Err(malformed("empty"));
    };
    let coding = match selector & 3 {
        1 => Coding::Gzip,
        2 => Coding::Zstd,
        _ => Coding::Identity,
    };
    let body = decode(coding, Bytes::copy_from_slice(body), 1 << 20)?;
    let limit = EventLimit {
        max: 1000,
        stream: "fuzz",
    };
    let events = if selector & 4 == 0 {
        parse_json(&body, limit)?
    } else {
        parse_ndjson(&body, limit)?
    };
    for e in &events {
        assert!(e.headers.len() <= sluice_core::MAX_HEADERS_PER_EVENT);
    }
    Ok(events.len())
}

fn malformed(message: impl Into<String>) -> Rejection {
    Rejection::Malformed {
        message: message.into(),
    }
}

fn json_error(e: &serde_json::Error) -> Rejection {
    malformed(format!("invalid JSON: {e}"))
}

/// The part of `body` that `part` borrows from, without copying.
fn slice_of(body: &Bytes, part: &str) -> Bytes {
    body.slice_ref(part.as_bytes())
}

fn event_from(body: &Bytes, raw: &RawValue) -> Result<Event, String> {
    let text = raw.get();
    if text.starts_with('{')
        && let Ok(probe) = serde_json::from_str::<Probe<'_>>(text)
        && !probe.unknown
        && let Some(value) = probe.value
    {
        return Ok(Event {
            key: probe
                .key
                .map(|k| string_field(body, k, "key"))
                .transpose()?,
            id: probe.id.map(|k| string_field(body, k, "id")).transpose()?,
            headers: match probe.headers {
                Some(h) => headers_field(body, h)?,
                None => Vec::new(),
            },
            value: slice_of(body, value.get()),
            timestamp_ms: probe.timestamp.map(timestamp_field).transpose()?,
            partition: probe.partition.map(partition_field).transpose()?,
        });
    }
    Ok(Event {
        value: slice_of(body, text),
        ..Event::default()
    })
}

/// `timestamp`: RFC 3339 text or milliseconds since the epoch (a JSON integer or its digits).
pub(crate) fn timestamp_field(raw: &RawValue) -> Result<i64, String> {
    let text = raw.get();
    if let Ok(ms) = serde_json::from_str::<i64>(text) {
        return Ok(ms);
    }
    match serde_json::from_str::<Cow<'_, str>>(text) {
        Ok(s) => sluice_core::parse_timestamp(&s),
        Err(_) => Err(format!(
            "`timestamp` must be RFC 3339 text or integer milliseconds since the epoch, found {text}"
        )),
    }
}

/// `partition`: a non-negative integer.
pub(crate) fn partition_field(raw: &RawValue) -> Result<u32, String> {
    serde_json::from_str::<u32>(raw.get()).map_err(|_| {
        format!(
            "`partition` must be an integer from 0 to {}, found {}",
            u32::MAX,
            raw.get()
        )
    })
}

fn string_field(body: &Bytes, raw: &RawValue, name: &str) -> Result<Bytes, String> {
    match serde_json::from_str::<Cow<'_, str>>(raw.get()) {
        Ok(Cow::Borrowed(s)) => Ok(slice_of(body, s)),
        Ok(Cow::Owned(s)) => Ok(Bytes::from(s)),
        Err(_) => Err(format!("`{name}` must be a string, found {}", raw.get())),
    }
}

/// A JSON object's members in order, values unparsed, at most
/// [`sluice_core::MAX_HEADERS_PER_EVENT`] of them: `Err(true)` past that many, `Err(false)` when
/// `raw` is not an object.
pub(crate) fn members(raw: &RawValue) -> Result<Vec<(Cow<'_, str>, &RawValue)>, bool> {
    let too_many = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de::Deserializer::deserialize_map(
        &mut de,
        OrderedMap {
            too_many: &too_many,
        },
    )
    .map_err(|_| too_many.get())
}

fn headers_field(body: &Bytes, raw: &RawValue) -> Result<Vec<(Bytes, Bytes)>, String> {
    let map = members(raw).map_err(|too_many| {
        if too_many {
            format!(
                "more than {} headers; that is the most an event may have",
                sluice_core::MAX_HEADERS_PER_EVENT
            )
        } else {
            format!(
                "`headers` must be an object of string values, found {}",
                raw.get()
            )
        }
    })?;
    map.into_iter()
        .map(|(k, v)| {
            if k.is_empty() {
                return Err("header names must not be empty".to_string());
            }
            sluice_core::check_header_name(k.as_bytes())?;
            let k = match k {
                Cow::Borrowed(s) => slice_of(body, s),
                Cow::Owned(s) => Bytes::from(s),
            };
            let name = String::from_utf8_lossy(&k).into_owned();
            let v = string_field(body, v, &format!("headers.{name}"))?;
            Ok((k, v))
        })
        .collect()
}

/// The members of a would-be envelope, left unparsed.
struct Probe<'a> {
    value: Option<&'a RawValue>,
    key: Option<&'a RawValue>,
    id: Option<&'a RawValue>,
    headers: Option<&'a RawValue>,
    timestamp: Option<&'a RawValue>,
    partition: Option<&'a RawValue>,
    unknown: bool,
}

impl<'de> Deserialize<'de> for Probe<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Probe<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Probe<'de>, A::Error> {
                let mut p = Probe {
                    value: None,
                    key: None,
                    id: None,
                    headers: None,
                    timestamp: None,
                    partition: None,
                    unknown: false,
                };
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    let slot = match k.as_ref() {
                        "value" => &mut p.value,
                        "key" => &mut p.key,
                        "id" => &mut p.id,
                        "headers" => &mut p.headers,
                        "timestamp" => &mut p.timestamp,
                        "partition" => &mut p.partition,
                        _ => {
                            p.unknown = true;
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    if slot.is_some() {
                        return Err(de::Error::custom(format!("duplicate member `{k}`")));
                    }
                    *slot = Some(map.next_value()?);
                }
                Ok(p)
            }
        }
        d.deserialize_map(V)
    }
}

/// An object's members in order, values unparsed.
/// A JSON object's members in order, left unparsed; refused past
/// [`sluice_core::MAX_HEADERS_PER_EVENT`] members (setting `too_many`) without reading the rest.
struct OrderedMap<'c> {
    too_many: &'c std::cell::Cell<bool>,
}

impl<'de> Visitor<'de> for OrderedMap<'_> {
    type Value = Vec<(Cow<'de, str>, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::new();
        while let Some(k) = map.next_key::<Cow<'de, str>>()? {
            if v.len() == sluice_core::MAX_HEADERS_PER_EVENT {
                self.too_many.set(true);
                return Err(de::Error::custom("too many headers"));
            }
            v.push((k, map.next_value()?));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn envelope_and_bare_values() {
        let body = b(
            r#"[{"value":{"t":1},"key":"k1","id":"e1","headers":{"h":"v"}},
                         {"t":2}, 3, "s", {"value":1,"other":2}]"#,
        );
        let ev = parse_json(&body, EventLimit::NONE).unwrap();
        assert_eq!(ev.len(), 5);
        assert_eq!(&ev[0].value[..], br#"{"t":1}"#);
        assert_eq!(ev[0].key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(ev[0].id.as_deref(), Some(&b"e1"[..]));
        assert_eq!(ev[0].headers, vec![(b("h"), b("v"))]);
        assert_eq!(&ev[1].value[..], br#"{"t":2}"#);
        assert_eq!(&ev[2].value[..], b"3");
        assert_eq!(&ev[3].value[..], br#""s""#);
        assert_eq!(&ev[4].value[..], br#"{"value":1,"other":2}"#);
        assert!(ev[4].key.is_none());
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let ev = parse_json(&b(r#"{"value":null,"key":"a\"b\u00e9"}"#), EventLimit::NONE).unwrap();
        assert_eq!(ev[0].key.as_deref(), Some("a\"bé".as_bytes()));
    }

    #[test]
    fn errors_name_the_event_and_field() {
        let e =
            parse_json(&b(r#"[{"value":1},{"value":1,"key":5}]"#), EventLimit::NONE).unwrap_err();
        assert_eq!(e.to_string(), "event 1: `key` must be a string, found 5");
        let e = parse_json(&b(r#"[{"value":1,"headers":{"a":1}}]"#), EventLimit::NONE).unwrap_err();
        assert!(
            e.to_string()
                .contains("event 0: `headers.a` must be a string"),
            "{e}"
        );
        let e = parse_json(&b("[1, 2,"), EventLimit::NONE).unwrap_err();
        assert!(e.to_string().starts_with("invalid JSON:"), "{e}");
        assert!(e.to_string().contains("line 1 column"), "{e}");
        assert!(parse_json(&b("[]"), EventLimit::NONE).is_err());
    }

    #[test]
    fn event_counts_stop_the_parse_at_the_limit() {
        let limit = EventLimit {
            max: 3,
            stream: "s",
        };
        assert_eq!(parse_json(&b("[1,2,3]"), limit).unwrap().len(), 3);
        // Refused at the fourth element, before the rest (here: invalid JSON) is even read.
        let e = parse_json(&b("[1,2,3,4,not json"), limit).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the request holds at least 4 events; the limit for stream `s` is 3"
        );
        assert!(matches!(e, Rejection::TooLarge { .. }));
        let e = parse_ndjson(&b("1\n2\n3\n4\n{oops"), limit).unwrap_err();
        assert!(matches!(e, Rejection::TooLarge { .. }), "{e}");
        // A body of a million one-byte events against a limit of 3 is refused without building
        // them: the parse stops after four elements.
        let huge = format!("[{}1]", "1,".repeat(1_000_000));
        let e = parse_json(&Bytes::from(huge), limit).unwrap_err();
        assert!(e.to_string().contains("at least 4 events"), "{e}");
        // Trailing bytes after the array are still malformed.
        let e = parse_json(&b("[1] x"), limit).unwrap_err();
        assert!(e.to_string().starts_with("invalid JSON:"), "{e}");
    }

    #[test]
    fn ndjson_lines() {
        let ev =
            parse_ndjson(&b("{\"value\":1,\"key\":\"a\"}\r\n\n2\n"), EventLimit::NONE).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(&ev[1].value[..], b"2");
        let e = parse_ndjson(&b("1\n{oops\n"), EventLimit::NONE).unwrap_err();
        assert!(e.to_string().starts_with("line 2: invalid JSON"), "{e}");
    }

    #[test]
    fn formats_and_codings() {
        assert_eq!(
            format_of(Some("application/json; charset=utf-8")),
            BodyFormat::Json
        );
        assert_eq!(format_of(Some("Application/X-NDJSON")), BodyFormat::Ndjson);
        assert_eq!(format_of(Some("text/plain")), BodyFormat::Raw);
        assert_eq!(format_of(None), BodyFormat::Raw);
        assert_eq!(coding_of(Some("gzip")).unwrap(), Coding::Gzip);
        assert!(matches!(
            coding_of(Some("br")),
            Err(Rejection::UnsupportedMediaType { .. })
        ));
    }

    #[test]
    fn decompression_is_bounded() {
        let raw = vec![b'a'; 10_000];
        let z = Bytes::from(zstd::encode_all(&raw[..], 3).unwrap());
        assert_eq!(
            decode(Coding::Zstd, z.clone(), 10_000).unwrap().len(),
            10_000
        );
        assert!(matches!(
            decode(Coding::Zstd, z, 9_999),
            Err(Rejection::TooLarge { .. })
        ));
        assert!(matches!(
            decode(Coding::Gzip, b("not gzip"), 100),
            Err(Rejection::Malformed { .. })
        ));
    }
}
