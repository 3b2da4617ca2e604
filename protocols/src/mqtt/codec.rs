//! The connection decoder: detects the protocol version from the CONNECT packet, then decodes
//! packets with `rmqtt-codec`'s 3.1.1 or 5.0 codec into one version-neutral [`Inbound`], and
//! encodes the few packets a publish-only server sends.
//!
//! This is the surface `fuzz/` drives with arbitrary bytes: it must answer every input with a
//! packet, "need more bytes", or an error, never a panic, and never buffer past its limit.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use rmqtt_codec::error::DecodeError;
use rmqtt_codec::types::{Publish, QoS};
use rmqtt_codec::{v3, v5};
use tokio_util::codec::{Decoder as _, Encoder as _};

/// The protocol version a connection speaks, chosen from its CONNECT packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1 (protocol level 3) and 3.1.1 (level 4): no reason codes, no properties.
    V3,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V3 => "3.1.1",
            Version::V5 => "5.0",
        }
    }
}

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// Not enough bytes yet.
    NeedMore,
    /// A CONNECT of a version Sluice speaks.
    Version(Version),
    /// A CONNECT with protocol name `MQTT`/`MQIsdp` but a level Sluice does not speak.
    UnsupportedLevel(u8),
    /// Not an MQTT CONNECT at all.
    NotMqtt,
}

/// Looks at the start of a connection's bytes for a CONNECT packet and its protocol level.
pub fn hello(buf: &[u8]) -> Hello {
    let Some(&first) = buf.first() else {
        return Hello::NeedMore;
    };
    if first != 0x10 {
        return Hello::NotMqtt;
    }
    // Remaining length: 1–4 bytes, 7 bits each.
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Hello::NeedMore;
        };
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Hello::NotMqtt;
        }
    }
    let Some(name_len) = buf.get(i..i + 2) else {
        return Hello::NeedMore;
    };
    let name_len = u16::from_be_bytes([name_len[0], name_len[1]]) as usize;
    if name_len != 4 && name_len != 6 {
        return Hello::NotMqtt;
    }
    let Some(name) = buf.get(i + 2..i + 2 + name_len) else {
        return Hello::NeedMore;
    };
    if name != b"MQTT" && name != b"MQIsdp" {
        return Hello::NotMqtt;
    }
    match buf.get(i + 2 + name_len) {
        None => Hello::NeedMore,
        Some(3 | 4) => Hello::Version(Version::V3),
        Some(5) => Hello::Version(Version::V5),
        Some(&level) => Hello::UnsupportedLevel(level),
    }
}

/// The Last Will of a connection.
#[derive(Debug, Clone)]
pub struct Will {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 Will Delay Interval.
    pub delay_secs: u32,
    pub content_type: Option<ByteString>,
    pub utf8_payload: bool,
    pub user_properties: Vec<(ByteString, ByteString)>,
}

/// A CONNECT packet of either version.
#[derive(Debug, Clone)]
pub struct Connect {
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: ByteString,
    pub username: Option<ByteString>,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    /// MQTT 5: the client's Receive Maximum, Maximum Packet Size, Session Expiry Interval and
    /// Authentication Method.
    pub receive_max: Option<NonZeroU16>,
    pub max_packet_size: Option<NonZeroU32>,
    pub session_expiry_secs: u32,
    pub auth_method: Option<ByteString>,
}

/// A packet from a client, in version-neutral terms.
#[derive(Debug)]
pub enum Inbound {
    Connect(Box<Connect>),
    Publish(Box<Publish>),
    PubRel(u16),
    Subscribe {
        packet_id: u16,
        filters: usize,
    },
    Unsubscribe {
        packet_id: u16,
        filters: usize,
    },
    PingReq,
    /// DISCONNECT; MQTT 5 carries a reason code (0x04: publish the will).
    Disconnect {
        reason: u8,
    },
    /// A packet a client must not send to a server that never publishes to it (CONNACK,
    /// PUBACK, PUBREC, PUBCOMP, SUBACK, UNSUBACK, PINGRESP) or an AUTH exchange.
    Unexpected(&'static str),
}

/// The connection's codec: 3.1.1 or 5.0, with the server's Maximum Packet Size inbound.
#[derive(Debug)]
pub enum Codec {
    V3(v3::Codec),
    V5(v5::Codec),
}

/// Why encoding a packet failed (a bug or a client's Maximum Packet Size too small for it).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode the packet: {0}")]
pub struct EncodeFailed(String);

impl Codec {
    /// A codec for `version` that refuses inbound packets whose remaining length exceeds
    /// `max_packet_bytes`.
    pub fn new(version: Version, max_packet_bytes: u32) -> Self {
        match version {
            Version::V3 => Codec::V3(v3::Codec::new(max_packet_bytes)),
            Version::V5 => Codec::V5(v5::Codec::new(max_packet_bytes, 0)),
        }
    }

    pub fn version(&self) -> Version {
        match self {
            Codec::V3(_) => Version::V3,
            Codec::V5(_) => Version::V5,
        }
    }

    /// The client's Maximum Packet Size bounds what the server sends (MQTT 5).
    pub fn set_max_outbound(&mut self, size: u32) {
        if let Codec::V5(c) = self {
            c.set_max_outbound_size(size);
        }
    }

    /// The next complete packet in `buf`, if any; consumed bytes are removed from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, DecodeError> {
        match self {
            Codec::V3(c) => Ok(c.decode(buf)?.map(|(p, _)| from_v3(p))),
            Codec::V5(c) => Ok(c.decode(buf)?.map(|(p, _)| from_v5(p))),
        }
    }

    fn put_v3(&mut self, p: v3::Packet, out: &mut BytesMut) -> Result<(), EncodeFailed> {
        match self {
            Codec::V3(c) => c.encode(p, out).map_err(|e| EncodeFailed(e.to_string())),
            Codec::V5(_) => Err(EncodeFailed("3.1.1 packet on a 5.0 connection".into())),
        }
    }

    fn put_v5(&mut self, p: v5::Packet, out: &mut BytesMut) -> Result<(), EncodeFailed> {
        match self {
            Codec::V5(c) => c.encode(p, out).map_err(|e| EncodeFailed(e.to_string())),
            Codec::V3(_) => Err(EncodeFailed("5.0 packet on a 3.1.1 connection".into())),
        }
    }

    /// CONNACK. `code` is the version's own return or reason code.
    pub fn connack(
        &mut self,
        code: u8,
        props: ConnAckProps,
        out: &mut BytesMut,
    ) -> Result<(), EncodeFailed> {
        match self.version() {
            Version::V3 => {
                let return_code = v3::ConnectAckReason::try_from(code)
                    .map_err(|_| EncodeFailed(format!("3.1.1 CONNACK code {code}")))?;
                self.put_v3(
                    v3::Packet::ConnectAck(v3::ConnectAck {
                        return_code,
                        session_present: code == 0 && props.session_present,
                    }),
                    out,
                )
            }
            Version::V5 => {
                let reason_code = v5::ConnectAckReason::try_from(code)
                    .map_err(|_| EncodeFailed(format!("5.0 CONNACK code {code:#x}")))?;
                let ack = if code == 0 {
                    v5::ConnectAck {
                        reason_code,
                        session_present: props.session_present,
                        session_expiry_interval_secs: props.session_expiry_secs,
                        receive_max: props.receive_max,
                        max_qos: QoS::ExactlyOnce,
                        max_packet_size: Some(props.max_packet_size),
                        assigned_client_id: props.assigned_client_id,
                        topic_alias_max: props.topic_alias_max,
                        retain_available: true,
                        wildcard_subscription_available: false,
                        subscription_identifiers_available: false,
                        shared_subscription_available: false,
                        server_keepalive_sec: props.server_keep_alive,
                        reason_string: props.reason,
                        ..Default::default()
                    }
                } else {
                    v5::ConnectAck {
                        reason_code,
                        reason_string: props.reason,
                        ..Default::default()
                    }
                };
                self.put_v5(v5::Packet::ConnectAck(Box::new(ack)), out)
            }
        }
    }

    /// PUBACK (QoS 1) or PUBREC (QoS 2) with an MQTT 5 reason code (ignored in 3.1.1, which
    /// has none: there only success is ever sent).
    pub fn ack(
        &mut self,
        qos2: bool,
        packet_id: NonZeroU16,
        code: u8,
        reason: Option<String>,
        out: &mut BytesMut,
    ) -> Result<(), EncodeFailed> {
        if code == 0 && reason.is_none() {
            // The hot path: success without properties is the same 4 bytes in both versions
            // (MQTT 5 §3.4.2.1 lets the reason code and properties be left out).
            let id = packet_id.get().to_be_bytes();
            out.extend_from_slice(&[if qos2 { 0x50 } else { 0x40 }, 0x02, id[0], id[1]]);
            return Ok(());
        }
        match self.version() {
            Version::V3 => self.put_v3(
                if qos2 {
                    v3::Packet::PublishReceived { packet_id }
                } else {
                    v3::Packet::PublishAck { packet_id }
                },
                out,
            ),
            Version::V5 => {
                let reason_code = v5::PublishAckReason::try_from(code)
                    .map_err(|_| EncodeFailed(format!("PUBACK code {code:#x}")))?;
                let ack = v5::PublishAck {
                    packet_id,
                    reason_code,
                    properties: Vec::new(),
                    reason_string: reason.map(ByteString::from),
                };
                self.put_v5(
                    if qos2 {
                        v5::Packet::PublishReceived(ack)
                    } else {
                        v5::Packet::PublishAck(ack)
                    },
                    out,
                )
            }
        }
    }

    /// PUBCOMP; `found` false answers a PUBREL for an unknown packet id (MQTT 5: 0x92).
    pub fn pubcomp(
        &mut self,
        packet_id: NonZeroU16,
        found: bool,
        out: &mut BytesMut,
    ) -> Result<(), EncodeFailed> {
        match self.version() {
            Version::V3 => self.put_v3(v3::Packet::PublishComplete { packet_id }, out),
            Version::V5 => self.put_v5(
                v5::Packet::PublishComplete(v5::PublishAck2 {
                    packet_id,
                    reason_code: if found {
                        v5::PublishAck2Reason::Success
                    } else {
                        v5::PublishAck2Reason::PacketIdNotFound
                    },
                    properties: Vec::new(),
                    reason_string: None,
                }),
                out,
            ),
        }
    }

    /// SUBACK refusing every filter (3.1.1: 0x80; 5.0: 0x87 not authorized — Sluice delivers
    /// nothing to clients).
    pub fn suback_refused(
        &mut self,
        packet_id: NonZeroU16,
        filters: usize,
        out: &mut BytesMut,
    ) -> Result<(), EncodeFailed> {
        match self.version() {
            Version::V3 => self.put_v3(
                v3::Packet::SubscribeAck {
                    packet_id,
                    status: vec![v3::SubscribeReturnCode::Failure; filters],
                },
                out,
            ),
            Version::V5 => self.put_v5(
                v5::Packet::SubscribeAck(v5::SubscribeAck {
                    packet_id,
                    properties: Vec::new(),
                    reason_string: Some(
                        "Sluice accepts publishes only; nothing is delivered to clients".into(),
                    ),
                    status: vec![v5::SubscribeAckReason::NotAuthorized; filters],
                }),
                out,
            ),
        }
    }

    /// UNSUBACK (5.0: 0x11 no subscription existed, for every filter).
    pub fn unsuback(
        &mut self,
        packet_id: NonZeroU16,
        filters: usize,
        out: &mut BytesMut,
    ) -> Result<(), EncodeFailed> {
        match self.version() {
            Version::V3 => self.put_v3(v3::Packet::UnsubscribeAck { packet_id }, out),
            Version::V5 => self.put_v5(
                v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
                    packet_id,
                    properties: Vec::new(),
                    reason_string: None,
                    status: vec![v5::UnsubscribeAckReason::NoSubscriptionExisted; filters],
                }),
                out,
            ),
        }
    }

    pub fn pingresp(&mut self, out: &mut BytesMut) -> Result<(), EncodeFailed> {
        match self.version() {
            Version::V3 => self.put_v3(v3::Packet::PingResponse, out),
            Version::V5 => self.put_v5(v5::Packet::PingResponse, out),
        }
    }

    /// MQTT 5 DISCONNECT with a reason code; 3.1.1 servers just close, so nothing is written.
    pub fn disconnect(
        &mut self,
        code: u8,
        reason: &str,
        out: &mut BytesMut,
    ) -> Result<(), EncodeFailed> {
        match self.version() {
            Version::V3 => Ok(()),
            Version::V5 => {
                let reason_code = v5::DisconnectReasonCode::try_from(code)
                    .map_err(|_| EncodeFailed(format!("DISCONNECT code {code:#x}")))?;
                self.put_v5(
                    v5::Packet::Disconnect(v5::Disconnect {
                        reason_code,
                        session_expiry_interval_secs: None,
                        server_reference: None,
                        reason_string: (!reason.is_empty()).then(|| reason.into()),
                        user_properties: Vec::new(),
                    }),
                    out,
                )
            }
        }
    }
}

/// What an accepting MQTT 5 CONNACK announces.
#[derive(Debug, Clone)]
pub struct ConnAckProps {
    pub receive_max: NonZeroU16,
    pub max_packet_size: u32,
    pub topic_alias_max: u16,
    pub assigned_client_id: Option<ByteString>,
    pub server_keep_alive: Option<u16>,
    pub session_expiry_secs: Option<u32>,
    pub reason: Option<ByteString>,
    /// Session Present: a persistent session of the client was found and resumed.
    pub session_present: bool,
}

impl Default for ConnAckProps {
    fn default() -> Self {
        Self {
            receive_max: NonZeroU16::MIN,
            max_packet_size: 0,
            topic_alias_max: 0,
            assigned_client_id: None,
            server_keep_alive: None,
            session_expiry_secs: None,
            reason: None,
            session_present: false,
        }
    }
}

fn qos_u8(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn from_v3(p: v3::Packet) -> Inbound {
    match p {
        v3::Packet::Connect(c) => Inbound::Connect(Box::new(Connect {
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            client_id: c.client_id,
            username: c.username,
            password: c.password,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos_u8(w.qos),
                retain: w.retain,
                delay_secs: 0,
                content_type: None,
                utf8_payload: false,
                user_properties: Vec::new(),
            }),
            receive_max: None,
            max_packet_size: None,
            session_expiry_secs: 0,
            auth_method: None,
        })),
        v3::Packet::Publish(p) => Inbound::Publish(p),
        v3::Packet::PublishRelease { packet_id } => Inbound::PubRel(packet_id.get()),
        v3::Packet::Subscribe {
            packet_id,
            topic_filters,
        } => Inbound::Subscribe {
            packet_id: packet_id.get(),
            filters: topic_filters.len(),
        },
        v3::Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => Inbound::Unsubscribe {
            packet_id: packet_id.get(),
            filters: topic_filters.len(),
        },
        v3::Packet::PingRequest => Inbound::PingReq,
        v3::Packet::Disconnect => Inbound::Disconnect { reason: 0 },
        v3::Packet::ConnectAck(_) => Inbound::Unexpected("CONNACK"),
        v3::Packet::PublishAck { .. } => Inbound::Unexpected("PUBACK"),
        v3::Packet::PublishReceived { .. } => Inbound::Unexpected("PUBREC"),
        v3::Packet::PublishComplete { .. } => Inbound::Unexpected("PUBCOMP"),
        v3::Packet::SubscribeAck { .. } => Inbound::Unexpected("SUBACK"),
        v3::Packet::UnsubscribeAck { .. } => Inbound::Unexpected("UNSUBACK"),
        v3::Packet::PingResponse => Inbound::Unexpected("PINGRESP"),
    }
}

fn from_v5(p: v5::Packet) -> Inbound {
    match p {
        v5::Packet::Connect(c) => {
            let c = *c;
            Inbound::Connect(Box::new(Connect {
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                client_id: c.client_id,
                username: c.username,
                password: c.password,
                will: c.last_will.map(|w| Will {
                    topic: w.topic,
                    payload: w.message,
                    qos: qos_u8(w.qos),
                    retain: w.retain,
                    delay_secs: w.will_delay_interval_sec.unwrap_or(0),
                    content_type: w.content_type,
                    utf8_payload: w.is_utf8_payload.unwrap_or(false),
                    user_properties: w.user_properties,
                }),
                receive_max: c.receive_max,
                max_packet_size: c.max_packet_size,
                session_expiry_secs: c.session_expiry_interval_secs,
                auth_method: c.auth_method,
            }))
        }
        v5::Packet::Publish(p) => Inbound::Publish(p),
        v5::Packet::PublishRelease(r) => Inbound::PubRel(r.packet_id.get()),
        v5::Packet::Subscribe(s) => Inbound::Subscribe {
            packet_id: s.packet_id.get(),
            filters: s.topic_filters.len(),
        },
        v5::Packet::Unsubscribe(u) => Inbound::Unsubscribe {
            packet_id: u.packet_id.get(),
            filters: u.topic_filters.len(),
        },
        v5::Packet::PingRequest => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: u8::from(d.reason_code),
        },
        v5::Packet::ConnectAck(_) => Inbound::Unexpected("CONNACK"),
        v5::Packet::PublishAck(_) => Inbound::Unexpected("PUBACK"),
        v5::Packet::PublishReceived(_) => Inbound::Unexpected("PUBREC"),
        v5::Packet::PublishComplete(_) => Inbound::Unexpected("PUBCOMP"),
        v5::Packet::SubscribeAck(_) => Inbound::Unexpected("SUBACK"),
        v5::Packet::UnsubscribeAck(_) => Inbound::Unexpected("UNSUBACK"),
        v5::Packet::PingResponse => Inbound::Unexpected("PINGRESP"),
        v5::Packet::Auth(_) => Inbound::Unexpected("AUTH"),
    }
}

/// Decodes a whole byte string the way a connection would (version from its CONNECT, then
/// packets until the bytes run out or one fails) and returns how many packets it decoded.
/// Used by the fuzz target and the corpus replay test.
pub fn decode_all(bytes: &[u8], max_packet_bytes: u32) -> Result<usize, String> {
    let version = match hello(bytes) {
        Hello::Version(v) => v,
        other => return Err(format!("{other:?}")),
    };
    let mut codec = Codec::new(version, max_packet_bytes);
    let mut buf = BytesMut::from(bytes);
    let mut n = 0;
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(_)) => n += 1,
            Ok(None) => return Ok(n),
            Err(e) => return Err(e.to_string()),
        }
        if buf.len() > bytes.len() {
            return Err("the decoder grew the input".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V311: &[u8] = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04dev1";
    const V5: &[u8] = b"\x10\x11\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x04dev1";

    #[test]
    fn hello_reads_the_version_from_connect() {
        assert_eq!(hello(V311), Hello::Version(Version::V3));
        assert_eq!(hello(V5), Hello::Version(Version::V5));
        assert_eq!(hello(&V311[..5]), Hello::NeedMore);
        assert_eq!(hello(b""), Hello::NeedMore);
        assert_eq!(hello(b"GET / HTTP/1.1\r\n"), Hello::NotMqtt);
        assert_eq!(
            hello(b"\x10\x10\x00\x04MQTT\x07\x02\x00\x3c\x00\x04dev1"),
            Hello::UnsupportedLevel(7)
        );
        assert_eq!(hello(b"\x10\xff\xff\xff\xff\x7f"), Hello::NotMqtt);
    }

    #[test]
    fn decodes_connect_of_both_versions() {
        for (bytes, v) in [(V311, Version::V3), (V5, Version::V5)] {
            let mut c = Codec::new(v, 1024);
            let mut b = BytesMut::from(bytes);
            match c.decode(&mut b).unwrap() {
                Some(Inbound::Connect(c)) => {
                    assert_eq!(&c.client_id[..], "dev1");
                    assert_eq!(c.keep_alive, 60);
                    assert!(c.clean_start);
                }
                other => panic!("{other:?}"),
            }
            assert!(b.is_empty());
        }
    }

    #[test]
    fn refuses_packets_over_the_limit_before_buffering_them() {
        let mut c = Codec::new(Version::V3, 64);
        // PUBLISH with a remaining length of 1000.
        let mut b = BytesMut::from(&b"\x30\xe8\x07"[..]);
        assert!(matches!(
            c.decode(&mut b),
            Err(DecodeError::MaxSizeExceeded { .. })
        ));
    }

    #[test]
    fn acks_encode_per_version() {
        let id = NonZeroU16::new(7).unwrap();
        let mut out = BytesMut::new();
        Codec::new(Version::V3, 0)
            .ack(false, id, 0x97, None, &mut out)
            .unwrap();
        assert_eq!(&out[..], b"\x40\x02\x00\x07");
        out.clear();
        Codec::new(Version::V5, 0)
            .ack(false, id, 0x97, None, &mut out)
            .unwrap();
        // Reason code and an empty property length.
        assert_eq!(&out[..], b"\x40\x04\x00\x07\x97\x00");
        out.clear();
        Codec::new(Version::V5, 0)
            .ack(true, id, 0x00, None, &mut out)
            .unwrap();
        assert_eq!(&out[..], b"\x50\x02\x00\x07");
    }

    /// Replays the fuzz target's seed corpus (protocols/fuzz/corpus/mqtt_decoder): `ok-*`
    /// inputs decode at least one packet without error, `bad-*` inputs are refused, and none
    /// panics.
    #[test]
    fn fuzz_corpus_replays() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/mqtt_decoder");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("the seed corpus exists") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).unwrap();
            let result = decode_all(&bytes, 64 * 1024);
            if name.starts_with("ok-") {
                assert!(matches!(result, Ok(n) if n >= 1), "{name}: {result:?}");
            } else if name.starts_with("bad-") {
                assert!(result.is_err(), "{name} should be refused: {result:?}");
            }
            seen += 1;
        }
        assert!(seen >= 10, "only {seen} seeds in {}", dir.display());
    }
}
