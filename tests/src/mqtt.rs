//! A raw MQTT client for the cases a well-behaved client library will not produce: packets
//! written and read one by one with `rmqtt-codec`, the same codec the server uses (its
//! client-side half), plus hand-made bytes.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rmqtt_codec::types::{Protocol, Publish, QoS};
use rmqtt_codec::{v3, v5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

/// One connection (TCP unless given another byte stream) speaking MQTT 5 (`v5`) or 3.1.1.
pub struct Raw<S = TcpStream> {
    pub stream: S,
    v5: v5::Codec,
    v3: v3::Codec,
    buf: BytesMut,
    is_v5: bool,
}

/// How long a raw client waits for the next packet.
pub const WAIT: Duration = Duration::from_secs(20);

impl Raw {
    pub async fn connect(addr: SocketAddr, is_v5: bool) -> Raw {
        Raw::over(TcpStream::connect(addr).await.expect("connect"), is_v5)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Raw<S> {
    /// A raw client over `stream` (an in-process pipe, say).
    pub fn over(stream: S, is_v5: bool) -> Raw<S> {
        Raw {
            stream,
            v5: v5::Codec::new(0, 0),
            v3: v3::Codec::new(0),
            buf: BytesMut::new(),
            is_v5,
        }
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.expect("write");
    }

    pub async fn send5(&mut self, p: v5::Packet) {
        let mut out = BytesMut::new();
        self.v5.encode(p, &mut out).expect("encode");
        self.send_bytes(&out).await;
    }

    /// [`Raw::send5`] that says whether the write went through instead of panicking (for
    /// clients whose server may go away under them).
    pub async fn try_send5(&mut self, p: v5::Packet) -> bool {
        let mut out = BytesMut::new();
        self.v5.encode(p, &mut out).expect("encode");
        self.stream.write_all(&out).await.is_ok()
    }

    pub async fn send3(&mut self, p: v3::Packet) {
        let mut out = BytesMut::new();
        self.v3.encode(p, &mut out).expect("encode");
        self.send_bytes(&out).await;
    }

    async fn fill(&mut self) -> bool {
        match tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(_)) => true,
            Err(_) => panic!("no packet within {WAIT:?}"),
        }
    }

    /// The next MQTT 5 packet, or `None` once the server closed the connection.
    pub async fn recv5(&mut self) -> Option<v5::Packet> {
        assert!(self.is_v5);
        loop {
            if let Some((p, _)) = self
                .v5
                .decode(&mut self.buf)
                .expect("server packet decodes")
            {
                return Some(p);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next MQTT 3.1.1 packet, or `None` once the server closed the connection.
    pub async fn recv3(&mut self) -> Option<v3::Packet> {
        assert!(!self.is_v5);
        loop {
            if let Some((p, _)) = self
                .v3
                .decode(&mut self.buf)
                .expect("server packet decodes")
            {
                return Some(p);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Whether the server closes the connection (without sending anything else) within the wait.
    pub async fn closed(&mut self) -> bool {
        let mut scratch = [0u8; 256];
        loop {
            match tokio::time::timeout(WAIT, self.stream.read(&mut scratch)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// A 5.0 CONNECT.
pub fn connect5(client_id: &str, keep_alive: u16) -> v5::Connect {
    v5::Connect {
        clean_start: true,
        keep_alive,
        client_id: client_id.into(),
        ..Default::default()
    }
}

/// A 3.1.1 CONNECT.
pub fn connect3(client_id: &str, keep_alive: u16) -> v3::Connect {
    v3::Connect {
        protocol: Protocol(4),
        clean_session: true,
        keep_alive,
        client_id: client_id.into(),
        ..Default::default()
    }
}

/// A PUBLISH (5.0 when `props` is given).
pub fn publish(
    topic: &str,
    qos: u8,
    id: u16,
    payload: &'static [u8],
    props: Option<v5::PublishProperties>,
) -> Publish {
    Publish {
        dup: false,
        retain: false,
        qos: match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        },
        topic: topic.into(),
        packet_id: NonZeroU16::new(id),
        payload: Bytes::from_static(payload),
        properties: props,
    }
}

/// Connects with 5.0 and expects CONNACK success; returns the connection and the CONNACK.
pub async fn session5(addr: SocketAddr, c: v5::Connect) -> (Raw, v5::ConnectAck) {
    start5(Raw::connect(addr, true).await, c).await
}

/// Sends a 5.0 CONNECT over `raw` and expects CONNACK success.
pub async fn start5<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut raw: Raw<S>,
    c: v5::Connect,
) -> (Raw<S>, v5::ConnectAck) {
    raw.send5(v5::Packet::Connect(Box::new(c))).await;
    match raw.recv5().await {
        Some(v5::Packet::ConnectAck(ack)) => {
            assert_eq!(
                ack.reason_code,
                v5::ConnectAckReason::Success,
                "{:?}",
                ack.reason_string
            );
            (raw, *ack)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Connects with 3.1.1 and expects CONNACK accepted.
pub async fn session3(addr: SocketAddr, c: v3::Connect) -> Raw {
    start3(Raw::connect(addr, false).await, c).await
}

/// Sends a 3.1.1 CONNECT over `raw` and expects CONNACK accepted.
pub async fn start3<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut raw: Raw<S>,
    c: v3::Connect,
) -> Raw<S> {
    raw.send3(v3::Packet::Connect(Box::new(c))).await;
    match raw.recv3().await {
        Some(v3::Packet::ConnectAck(ack)) => {
            assert_eq!(ack.return_code, v3::ConnectAckReason::ConnectionAccepted);
            raw
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// An MQTT 5 client over any byte stream (a TLS stream, say), or over WebSocket binary
/// messages (`/mqtt`, subprotocol `mqtt`) on any byte stream.
pub enum Client5<S> {
    Stream {
        io: S,
        codec: v5::Codec,
        buf: BytesMut,
    },
    Ws {
        ws: Box<tokio_tungstenite::WebSocketStream<S>>,
        codec: v5::Codec,
        buf: BytesMut,
    },
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client5<S> {
    /// MQTT 5 straight over `io`.
    pub fn stream(io: S) -> Self {
        Client5::Stream {
            io,
            codec: v5::Codec::new(0, 0),
            buf: BytesMut::new(),
        }
    }

    /// MQTT 5 over a WebSocket to `url` (`ws://…/mqtt` or `wss://…/mqtt`) on `io`; the HTTP
    /// status of a refused upgrade as the error.
    pub async fn websocket(url: &str, io: S) -> Result<Self, u16> {
        Self::websocket_from(url, io, None).await
    }

    /// [`Client5::websocket`] as a browser page of `origin` opens it (`Origin` header).
    pub async fn websocket_from(url: &str, io: S, origin: Option<&str>) -> Result<Self, u16> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = url.into_client_request().expect("request");
        req.headers_mut()
            .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        match tokio_tungstenite::client_async(req, io).await {
            Ok((ws, _)) => Ok(Client5::Ws {
                ws: Box::new(ws),
                codec: v5::Codec::new(0, 0),
                buf: BytesMut::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
            Err(e) => panic!("WebSocket handshake: {e}"),
        }
    }

    pub async fn send(&mut self, p: v5::Packet) {
        use futures_util::SinkExt;
        let mut out = BytesMut::new();
        match self {
            Client5::Stream { io, codec, .. } => {
                codec.encode(p, &mut out).expect("encode");
                io.write_all(&out).await.expect("write");
            }
            Client5::Ws { ws, codec, .. } => {
                codec.encode(p, &mut out).expect("encode");
                ws.send(tokio_tungstenite::tungstenite::Message::Binary(
                    out.freeze(),
                ))
                .await
                .expect("send");
            }
        }
    }

    /// The next packet, or `None` once the server closed the connection.
    pub async fn recv(&mut self) -> Option<v5::Packet> {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let (codec, buf) = match self {
                Client5::Stream { codec, buf, .. } | Client5::Ws { codec, buf, .. } => (codec, buf),
            };
            if let Some((p, _)) = codec.decode(buf).expect("server packet decodes") {
                return Some(p);
            }
            match self {
                Client5::Stream { io, buf, .. } => {
                    match tokio::time::timeout(WAIT, io.read_buf(buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return None,
                        Ok(Ok(_)) => {}
                        Err(_) => panic!("no packet within {WAIT:?}"),
                    }
                }
                Client5::Ws { ws, buf, .. } => match tokio::time::timeout(WAIT, ws.next()).await {
                    Ok(Some(Ok(Message::Binary(b)))) => buf.extend_from_slice(&b),
                    Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => return None,
                    Ok(Some(Ok(_))) => {}
                    Err(_) => panic!("no message within {WAIT:?}"),
                },
            }
        }
    }

    /// Sends `c` and returns the CONNACK's reason code (0 = success).
    pub async fn connect(&mut self, c: v5::Connect) -> u8 {
        self.send(v5::Packet::Connect(Box::new(c))).await;
        match self.recv().await {
            Some(v5::Packet::ConnectAck(ack)) => u8::from(ack.reason_code),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Publishes QoS 1 and returns the PUBACK's reason code.
    pub async fn publish1(&mut self, topic: &str, id: u16, payload: &'static [u8]) -> u8 {
        self.send(v5::Packet::Publish(Box::new(publish(
            topic,
            1,
            id,
            payload,
            Some(Default::default()),
        ))))
        .await;
        match self.recv().await {
            Some(v5::Packet::PublishAck(ack)) => {
                assert_eq!(ack.packet_id.get(), id);
                u8::from(ack.reason_code)
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
}

/// The reason codes of the next `n` PUBACKs a rumqttc MQTT 5 client receives, in order,
/// driving its event loop; panics when one does not come within 20 s.
pub async fn v5_pubacks(
    el: &mut rumqttc::v5::EventLoop,
    n: usize,
) -> Vec<rumqttc::v5::mqttbytes::v5::PubAckReason> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let ev = tokio::time::timeout(Duration::from_secs(20), el.poll())
            .await
            .expect("a PUBACK within 20 s")
            .expect("the connection stays up");
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(p)) = ev {
            out.push(p.reason);
        }
    }
    out
}
