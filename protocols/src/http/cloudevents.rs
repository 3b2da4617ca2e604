//! CloudEvents 1.0 over HTTP (docs/http.md "CloudEvents"): structured mode
//! (`application/cloudevents+json`), batch mode (`application/cloudevents-batch+json`) and
//! binary mode (`ce-*` headers, the body is the data).
//!
//! Every CloudEvent becomes one event stored as the CloudEvents Kafka protocol binding has it in
//! binary content mode: the value is the event's `data`, each attribute a header `ce_<name>`,
//! `datacontenttype` the header `content-type`, the `partitionkey` extension the key. The
//! event's id — its dedup key on streams with dedup — is `source` and `id` joined by a space
//! (CloudEvents promises only the pair to be unique), and `time` is its producer timestamp.

use std::borrow::Cow;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::value::RawValue;
use sluice_core::{Event, Rejection};

use super::body::EventLimit;

/// `application/cloudevents+json`: one event in structured mode.
pub const STRUCTURED: &str = "application/cloudevents+json";
/// `application/cloudevents-batch+json`: a JSON array of events in structured mode.
pub const BATCH: &str = "application/cloudevents-batch+json";
/// The HTTP header that marks a binary-mode event.
pub const SPECVERSION_HEADER: &str = "ce-specversion";
/// The only CloudEvents version Sluice takes.
pub const SPECVERSION: &str = "1.0";

/// One attribute as received: its name and its text.
type Attribute<'a> = (Cow<'a, str>, Cow<'a, str>);

/// Parses a structured-mode body: one CloudEvent. An invalid one refuses the request.
pub fn parse_structured(body: &Bytes) -> Result<Event, Rejection> {
    let raw: &RawValue =
        serde_json::from_slice(body).map_err(|e| malformed(format!("invalid JSON: {e}")))?;
    from_json(body, raw).map_err(|m| malformed(format!("CloudEvent: {m}")))
}

/// Parses a batch-mode body: a JSON array of CloudEvents, at most `limit.max` of them. Each
/// element is an event or the reason it is not one (answered for that event alone); JSON that
/// is not an array of objects refuses the request.
pub fn parse_batch(
    body: &Bytes,
    limit: EventLimit<'_>,
) -> Result<Vec<Result<Event, Rejection>>, Rejection> {
    let items = super::body::array_within(body, limit)?
        .ok_or_else(|| malformed("a CloudEvents batch is a JSON array of CloudEvents"))?;
    if items.is_empty() {
        return Err(malformed("the batch holds no CloudEvents"));
    }
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(i, raw)| from_json(body, raw).map_err(|m| malformed(format!("CloudEvent {i}: {m}"))))
        .collect())
}

/// A parsed batch's valid events, and its invalid ones' refusals by index.
#[allow(clippy::type_complexity)]
pub fn split(parsed: Vec<Result<Event, Rejection>>) -> (Vec<Event>, Vec<(usize, Rejection)>) {
    let mut events = Vec::with_capacity(parsed.len());
    let mut invalid = Vec::new();
    for (i, r) in parsed.into_iter().enumerate() {
        match r {
            Ok(e) => events.push(e),
            Err(r) => invalid.push((i, r)),
        }
    }
    (events, invalid)
}

/// Parses a WebSocket text frame of a `format=cloudevents` socket: one CloudEvent or an array
/// of them; for an array, each element's event or refusal.
pub fn parse_frame(
    t: &Bytes,
    limit: EventLimit<'_>,
) -> Result<Vec<Result<Event, Rejection>>, Rejection> {
    if t.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        parse_batch(t, limit)
    } else {
        Ok(vec![Ok(parse_structured(t)?)])
    }
}

/// The header that marks an event sent with CloudEvents attributes as headers, as the
/// CloudEvents Kafka protocol binding names them (gRPC).
pub const KAFKA_SPECVERSION: &str = "ce_specversion";

/// Checks and applies the CloudEvents attributes an event carries as `ce_*` headers (the Kafka
/// binding's binary mode; what gRPC producers send): the required ones must be there, `ce_id`
/// with `ce_source` becomes the event's id, `ce_time` its timestamp and `ce_partitionkey` its
/// key, each unless the event set its own.
pub fn apply_kafka_headers(e: &mut Event) -> Result<(), String> {
    let mut attrs = Vec::new();
    let mut others = Vec::with_capacity(e.headers.len());
    for (k, v) in std::mem::take(&mut e.headers) {
        match k.strip_prefix(b"ce_") {
            Some(name) => attrs.push((
                Cow::Owned(String::from_utf8_lossy(name).into_owned()),
                Cow::Owned(String::from_utf8(v.to_vec()).map_err(|_| {
                    format!("header `{}` is not UTF-8", String::from_utf8_lossy(&k))
                })?),
            )),
            None => others.push((k, v)),
        }
    }
    let ce = build(attrs, None)?;
    others.extend(ce.headers);
    e.headers = others;
    e.id = e.id.take().or(ce.id);
    e.timestamp_ms = e.timestamp_ms.or(ce.timestamp_ms);
    e.key = e.key.take().or(ce.key);
    Ok(())
}

/// A binary-mode event: the attributes from the `ce-*` headers (percent-decoded), the data the
/// body (its `datacontenttype` is the request's `Content-Type`, stored as the request's).
pub fn from_binary(headers: &http::HeaderMap, body: Bytes) -> Result<Event, Rejection> {
    let mut attrs: Vec<Attribute<'_>> = Vec::new();
    for (name, value) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let text = value
            .to_str()
            .map_err(|_| malformed(format!("header `{name}` is not text")))?;
        attrs.push((
            Cow::Owned(attr.to_string()),
            Cow::Owned(super::ws::percent_decode(text, false)),
        ));
        if attrs.len() > sluice_core::MAX_HEADERS_PER_EVENT {
            return Err(malformed(format!(
                "more than {} ce- headers; that is the most an event may have",
                sluice_core::MAX_HEADERS_PER_EVENT
            )));
        }
    }
    let mut e = build(attrs, None).map_err(|m| malformed(format!("CloudEvent: {m}")))?;
    e.value = body;
    Ok(e)
}

/// The event of one structured-mode CloudEvent object.
fn from_json(body: &Bytes, raw: &RawValue) -> Result<Event, String> {
    let members = super::body::members(raw).map_err(|too_many| {
        if too_many {
            format!(
                "more than {} attributes; that is the most an event may have",
                sluice_core::MAX_HEADERS_PER_EVENT
            )
        } else {
            format!("a CloudEvent is a JSON object, found {}", clip(raw.get()))
        }
    })?;
    let mut attrs = Vec::with_capacity(members.len());
    let mut data: Option<&RawValue> = None;
    let mut data_base64: Option<Cow<'_, str>> = None;
    let mut content_type: Option<Cow<'_, str>> = None;
    for (name, value) in members {
        match name.as_ref() {
            "data" => data = Some(value),
            "data_base64" => data_base64 = Some(text(&name, value)?),
            "datacontenttype" => content_type = Some(text(&name, value)?),
            _ => {
                // null: the attribute is absent (the JSON format allows it).
                if value.get() == "null" {
                    continue;
                }
                let v = attribute_text(&name, value)?;
                attrs.push((name, v));
            }
        }
    }
    let binary = data_base64.is_some();
    let value = match (data, data_base64) {
        (Some(_), Some(_)) => return Err("has both `data` and `data_base64`".into()),
        (None, Some(b64)) => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| format!("`data_base64` is not base64: {e}"))?,
        ),
        (Some(d), None) => {
            // A string is the data itself when the data is not JSON (the JSON format's rule);
            // JSON data is stored as its JSON text, byte for byte.
            let json = content_type.as_deref().is_none_or(is_json);
            match serde_json::from_str::<Cow<'_, str>>(d.get()) {
                Ok(s) if !json => match s {
                    Cow::Borrowed(s) => body.slice_ref(s.as_bytes()),
                    Cow::Owned(s) => Bytes::from(s),
                },
                _ => body.slice_ref(d.get().as_bytes()),
            }
        }
        (None, None) => Bytes::new(),
    };
    let content_type = match content_type {
        Some(c) => Some(c),
        // Binary data without a declared type.
        None if binary => Some(Cow::Borrowed("application/octet-stream")),
        None => None,
    };
    let mut e = build(attrs, content_type)?;
    e.value = value;
    Ok(e)
}

/// The event of a CloudEvent's context attributes (all but the data), checked: `specversion`
/// 1.0, `id`, `source` and `type` present and non-empty, `time` a timestamp, extension names of
/// lower-case letters and digits.
fn build(attrs: Vec<Attribute<'_>>, content_type: Option<Cow<'_, str>>) -> Result<Event, String> {
    let mut e = Event::default();
    let (mut specversion, mut id, mut source, mut kind) = (None, None, None, None);
    for (name, value) in &attrs {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(format!(
                "attribute name `{name}` is not lower-case letters and digits"
            ));
        }
        match name.as_ref() {
            "specversion" => specversion = Some(value.as_ref()),
            "id" => id = Some(value.as_ref()),
            "source" => source = Some(value.as_ref()),
            "type" => kind = Some(value.as_ref()),
            "time" => {
                e.timestamp_ms = Some(
                    time::OffsetDateTime::parse(
                        value,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                    .map_err(|err| format!("`time` `{value}` is not RFC 3339: {err}"))?,
                )
            }
            "partitionkey" => e.key = Some(Bytes::copy_from_slice(value.as_bytes())),
            _ => {}
        }
        if e.headers.iter().any(|(k, _)| k[3..] == *name.as_bytes()) {
            return Err(format!("attribute `{name}` appears twice"));
        }
        e.headers.push((
            Bytes::from(format!("ce_{name}")),
            Bytes::copy_from_slice(value.as_bytes()),
        ));
    }
    match specversion {
        Some(SPECVERSION) => {}
        Some(v) => {
            return Err(format!(
                "`specversion` is `{v}`; Sluice takes {SPECVERSION}"
            ));
        }
        None => return Err("`specversion` is required".into()),
    }
    let id = required("id", id)?;
    let source = required("source", source)?;
    required("type", kind)?;
    if source.chars().any(char::is_whitespace) {
        return Err(format!(
            "`source` `{source}` is not a URI-reference (it has a space)"
        ));
    }
    e.id = Some(Bytes::from(format!("{source} {id}")));
    if let Some(ct) = content_type {
        e.headers.push((
            Bytes::from_static(b"content-type"),
            Bytes::from(ct.into_owned()),
        ));
    }
    Ok(e)
}

fn required<'a>(name: &str, v: Option<&'a str>) -> Result<&'a str, String> {
    match v {
        Some(v) if !v.is_empty() => Ok(v),
        Some(_) => Err(format!("`{name}` must not be empty")),
        None => Err(format!("`{name}` is required")),
    }
}

/// A string member's text.
fn text<'a>(name: &str, v: &'a RawValue) -> Result<Cow<'a, str>, String> {
    serde_json::from_str::<Cow<'a, str>>(v.get())
        .map_err(|_| format!("`{name}` must be a string, found {}", clip(v.get())))
}

/// An attribute's text: strings as they are, numbers and booleans as their JSON text (the
/// CloudEvents types Integer and Boolean); objects and arrays are not attributes.
fn attribute_text<'a>(name: &str, v: &'a RawValue) -> Result<Cow<'a, str>, String> {
    let t = v.get();
    match t.as_bytes().first() {
        Some(b'"') => text(name, v),
        Some(b'{' | b'[') => Err(format!(
            "attribute `{name}` must be a string, number or boolean, found {}",
            clip(t)
        )),
        _ => Ok(Cow::Borrowed(t)),
    }
}

/// Whether a media type is JSON: `application/json`, `text/json`, or a `+json` type.
fn is_json(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// At most 80 characters of `s`, for error messages.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

fn malformed(message: impl Into<String>) -> Rejection {
    Rejection::Malformed {
        message: message.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn header<'a>(e: &'a Event, name: &str) -> Option<&'a [u8]> {
        e.headers
            .iter()
            .find(|(k, _)| &k[..] == name.as_bytes())
            .map(|(_, v)| &v[..])
    }

    #[test]
    fn structured_events_become_the_kafka_bindings_records() {
        let body = b(
            r#"{"specversion":"1.0","id":"e-1","source":"/dev/7","type":"reading",
            "time":"2026-01-02T03:04:05.678Z","subject":"t","partitionkey":"dev-7",
            "severity":3,"urgent":true,"datacontenttype":"application/json","data":{"t":21.5}}"#,
        );
        let e = parse_structured(&body).unwrap();
        assert_eq!(&e.value[..], br#"{"t":21.5}"#);
        assert_eq!(e.id.as_deref(), Some(&b"/dev/7 e-1"[..]));
        assert_eq!(e.key.as_deref(), Some(&b"dev-7"[..]));
        assert_eq!(e.timestamp_ms, Some(1_767_323_045_678));
        assert_eq!(header(&e, "ce_type"), Some(&b"reading"[..]));
        assert_eq!(header(&e, "ce_severity"), Some(&b"3"[..]));
        assert_eq!(header(&e, "ce_urgent"), Some(&b"true"[..]));
        assert_eq!(
            header(&e, "ce_time"),
            Some(&b"2026-01-02T03:04:05.678Z"[..])
        );
        assert_eq!(header(&e, "content-type"), Some(&b"application/json"[..]));
        assert_eq!(header(&e, "ce_datacontenttype"), None);
    }

    #[test]
    fn data_is_text_binary_or_json_as_its_type_says() {
        let text = parse_structured(&b(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"text/plain","data":"a \"b\""}"#,
        ))
        .unwrap();
        assert_eq!(&text.value[..], br#"a "b""#);
        let bin = parse_structured(&b(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"AAEC"}"#,
        ))
        .unwrap();
        assert_eq!(&bin.value[..], [0, 1, 2]);
        assert_eq!(
            header(&bin, "content-type"),
            Some(&b"application/octet-stream"[..])
        );
        let json_string = parse_structured(&b(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":"x"}"#,
        ))
        .unwrap();
        assert_eq!(&json_string.value[..], br#""x""#);
        let none = parse_structured(&b(
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t"}"#,
        ))
        .unwrap();
        assert!(none.value.is_empty());
    }

    #[test]
    fn invalid_events_say_what_is_wrong() {
        for (body, want) in [
            (
                r#"{"id":"1","source":"s","type":"t"}"#,
                "`specversion` is required",
            ),
            (
                r#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#,
                "Sluice takes 1.0",
            ),
            (
                r#"{"specversion":"1.0","source":"s","type":"t"}"#,
                "`id` is required",
            ),
            (
                r#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#,
                "`id` must not be empty",
            ),
            (
                r#"{"specversion":"1.0","id":"1","type":"t"}"#,
                "`source` is required",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s"}"#,
                "`type` is required",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"a b","type":"t"}"#,
                "URI-reference",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"noon"}"#,
                "not RFC 3339",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","Bad":"x"}"#,
                "lower-case",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","x":{"a":1}}"#,
                "string, number or boolean",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data_base64":"AA=="}"#,
                "both",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"!"}"#,
                "not base64",
            ),
            (r#"[1]"#, "JSON object"),
        ] {
            let err = parse_structured(&b(body)).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn a_batch_answers_each_event() {
        let body = b(
            r#"[{"specversion":"1.0","id":"1","source":"s","type":"t","data":1},
                          {"specversion":"1.0","source":"s","type":"t"},
                          {"specversion":"1.0","id":"3","source":"s","type":"t","data":3}]"#,
        );
        let got = parse_batch(&body, EventLimit::NONE).unwrap();
        assert!(got[0].is_ok() && got[2].is_ok());
        let err = got[1].as_ref().unwrap_err().to_string();
        assert!(
            err.contains("CloudEvent 1") && err.contains("`id`"),
            "{err}"
        );
        let limit = EventLimit {
            max: 2,
            stream: "s",
        };
        assert!(matches!(
            parse_batch(&body, limit),
            Err(Rejection::TooLarge { .. })
        ));
        assert!(parse_batch(&b("{}"), EventLimit::NONE).is_err());
        assert!(parse_batch(&b("[]"), EventLimit::NONE).is_err());
    }

    #[test]
    fn binary_mode_reads_percent_encoded_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("ce-specversion", "1.0".parse().unwrap());
        h.insert("ce-id", "e%201".parse().unwrap());
        h.insert("ce-source", "/dev/7".parse().unwrap());
        h.insert("ce-type", "reading".parse().unwrap());
        h.insert("ce-comment", "caf%C3%A9 %25".parse().unwrap());
        h.insert("x-other", "ignored".parse().unwrap());
        let e = from_binary(&h, b("21.5")).unwrap();
        assert_eq!(&e.value[..], b"21.5");
        assert_eq!(e.id.as_deref(), Some(&b"/dev/7 e 1"[..]));
        assert_eq!(header(&e, "ce_comment"), Some("café %".as_bytes()));
        h.remove("ce-type");
        assert!(from_binary(&h, b("x")).is_err());
    }

    #[test]
    fn kafka_binding_headers_are_checked_and_applied() {
        let h = |k: &str, v: &str| (b(k), b(v));
        let mut e = Event {
            headers: vec![
                h("site", "x"),
                h("ce_specversion", "1.0"),
                h("ce_id", "7"),
                h("ce_source", "/d"),
                h("ce_type", "t"),
                h("ce_time", "2026-01-02T03:04:05.678Z"),
            ],
            ..Event::default()
        };
        apply_kafka_headers(&mut e).unwrap();
        assert_eq!(e.id.as_deref(), Some(&b"/d 7"[..]));
        assert_eq!(e.timestamp_ms, Some(1_767_323_045_678));
        assert_eq!(e.headers.len(), 6);
        assert_eq!(header(&e, "site"), Some(&b"x"[..]));
        let mut bad = Event {
            headers: vec![h("ce_specversion", "1.0"), h("ce_id", "7")],
            ..Event::default()
        };
        assert!(
            apply_kafka_headers(&mut bad)
                .unwrap_err()
                .contains("`source`")
        );
    }
}
