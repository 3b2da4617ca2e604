//! The protobuf codec of `sluice.v1`: prost's, with one check before decoding. A request's
//! events are counted on the wire (and each event's headers) before prost builds a single
//! structure, so an 8 MiB message of millions of empty events is refused for the price of one
//! pass over its bytes instead of costing hundreds of megabytes (issue 14).

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Buf;
use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::pb;

/// The most events one request may hold: the largest `max_events_per_request` of any stream,
/// set by the gateway at startup and on reload. (The codec is built by generated code, so the
/// limit cannot be handed to it.) Each stream's own limit applies after decoding as before.
static MAX_EVENTS: AtomicU64 = AtomicU64::new(10_000);

/// Sets the most events any stream takes per request.
pub fn set_max_events(n: u64) {
    MAX_EVENTS.store(n, Ordering::Relaxed);
}

/// Which field of a message holds its events (requests only; answers are not checked).
pub trait EventsField {
    /// The field number of `repeated Event events`, if the message has one.
    const EVENTS: Option<u32> = None;
}

impl EventsField for pb::PublishRequest {
    const EVENTS: Option<u32> = Some(2);
}
impl EventsField for pb::PublishStreamRequest {
    const EVENTS: Option<u32> = Some(3);
}
impl EventsField for pb::PublishResponse {}
impl EventsField for pb::PublishStreamResponse {}
impl EventsField for pb::SubscribeRequest {}
impl EventsField for pb::SubscribeResponse {}

/// `Event.headers`.
const HEADERS_FIELD: u32 = 3;

/// prost's codec with the event and header counts checked first.
#[derive(Debug, Clone)]
pub struct LimitedCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LimitedCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LimitedCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + EventsField + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = LimitedEncoder<T>;
    type Decoder = LimitedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        LimitedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        LimitedDecoder(PhantomData)
    }
}

#[derive(Debug, Clone)]
pub struct LimitedEncoder<T>(PhantomData<T>);

impl<T: Message> Encoder for LimitedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .expect("Message only errors if not enough space");
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

#[derive(Debug, Clone)]
pub struct LimitedDecoder<U>(PhantomData<U>);

impl<U: Message + Default + EventsField> Decoder for LimitedDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if let Some(field) = U::EVENTS {
            // The message is one contiguous buffer in tonic's decoder, so this does not copy.
            let bytes = buf.copy_to_bytes(buf.remaining());
            check_counts(
                &bytes,
                field,
                MAX_EVENTS.load(Ordering::Relaxed),
                sluice_core::MAX_HEADERS_PER_EVENT as u64,
            )
            .map_err(Status::invalid_argument)?;
            return U::decode(bytes)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()));
        }
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// Counts the occurrences of `events_field` in the message `b`, and of the headers field in
/// each of them; the refusal when either passes its limit. Bytes that are not valid protobuf are
/// left for prost to refuse.
pub(crate) fn check_counts(
    b: &[u8],
    events_field: u32,
    max_events: u64,
    max_headers: u64,
) -> Result<(), String> {
    let mut events = 0u64;
    let mut it = Fields(b);
    while let Some(Some((field, body))) = it.next() {
        if field != events_field {
            continue;
        }
        events += 1;
        if events > max_events {
            return Err(format!(
                "the message holds more than {max_events} events, more than any stream takes per request"
            ));
        }
        let mut headers = 0u64;
        let mut inner = Fields(body.unwrap_or_default());
        while let Some(Some((f, _))) = inner.next() {
            if f == HEADERS_FIELD {
                headers += 1;
                if headers > max_headers {
                    return Err(format!(
                        "event {}: more than {max_headers} headers; that is the most an event may have",
                        events - 1
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The top-level fields of a protobuf message: (field number, the bytes of a length-delimited
/// field). `Some(None)` ends the walk at bytes that are not protobuf.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    #[allow(clippy::type_complexity)]
    fn next(&mut self) -> Option<Option<(u32, Option<&'a [u8]>)>> {
        if self.0.is_empty() {
            return None;
        }
        let Some(key) = self.varint() else {
            return Some(None);
        };
        let field = (key >> 3) as u32;
        let body = match key & 7 {
            0 => {
                self.varint()?;
                None
            }
            1 => {
                self.take(8)?;
                None
            }
            5 => {
                self.take(4)?;
                None
            }
            2 => {
                let Some(len) = self.varint() else {
                    return Some(None);
                };
                let Some(body) = usize::try_from(len).ok().and_then(|n| self.take(n)) else {
                    return Some(None);
                };
                Some(body)
            }
            _ => return Some(None),
        };
        Some(Some((field, body)))
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            self.0 = &[];
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(events: usize, headers: usize) -> Vec<u8> {
        pb::PublishRequest {
            stream: "s".repeat(200),
            events: vec![
                pb::Event {
                    value: bytes::Bytes::from_static(b"v"),
                    headers: vec![pb::Header::default(); headers],
                    content_type: "x".repeat(300),
                    ..Default::default()
                };
                events
            ],
            content_type: "application/json; ".repeat(50),
            idempotency_key: String::new(),
        }
        .encode_to_vec()
    }

    #[test]
    fn counts_events_and_headers_on_the_wire() {
        assert_eq!(check_counts(&request(10, 128), 2, 10, 128), Ok(()));
        let e = check_counts(&request(11, 0), 2, 10, 128).unwrap_err();
        assert!(e.contains("more than 10 events"), "{e}");
        let e = check_counts(&request(2, 129), 2, 10, 128).unwrap_err();
        assert!(e.starts_with("event 0: more than 128 headers"), "{e}");
        // Long strings in other fields are not mistaken for events or headers.
        assert_eq!(check_counts(&request(1, 0), 2, 1, 0), Ok(()));
        // Garbage is left for prost to refuse.
        assert_eq!(check_counts(&[0xff, 0xff, 0xff], 2, 1, 1), Ok(()));
        assert_eq!(check_counts(&[0x12, 0x7f, 0x00], 2, 1, 1), Ok(()));
    }

    #[test]
    fn the_codec_refuses_before_decoding() {
        // Four million empty events (8 MB): refused from the wire count.
        let mut b = Vec::with_capacity(8_000_000);
        for _ in 0..4_000_000 {
            b.extend_from_slice(&[0x12, 0x00]);
        }
        let e = check_counts(&b, 2, 10_000, 128).unwrap_err();
        assert!(e.contains("more than 10000 events"), "{e}");
    }
}
