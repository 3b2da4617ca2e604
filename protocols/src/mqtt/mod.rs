//! MQTT ingest: 3.1.1 and 5.0 on one port (the version comes from CONNECT), over TCP, TLS and
//! WebSocket (`/mqtt` on the HTTP listener, subprotocol `mqtt`).
//!
//! Sluice runs its own publish-only session loop on `rmqtt-codec` (DESIGN §4): one task per
//! connection reads packets, maps each PUBLISH topic to a stream and key, appends consecutive
//! publishes of one stream as one batch (polling the appends itself, in order), and answers PUBACK
//! (QoS 1) and PUBREC (QoS 2) only once the events reached the stream's ack point, in the
//! order the publishes arrived. At most Receive Maximum QoS 1/2 publishes are unanswered per
//! connection; past that, and while a publish waits for quota or for the log, the connection
//! is not read. Documented for users in docs/mqtt.md.

pub mod codec;
pub mod reason;
mod session;
pub mod store;

use session::registry::Registry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use sluice_auth::{Authenticator, ListenerPolicy, Swap};
use sluice_config::TopicMap;
use sluice_core::Ingest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::gate::Gate;
use crate::server::{AddressSlots, ConnInfo, PrincipalConnections, accept_tls, accept_within};

const PROTO: &str = "mqtt";

/// The WebSocket subprotocol of MQTT over WebSocket.
pub const WS_SUBPROTOCOL: &str = "mqtt";

/// Settings of MQTT ingest, shared by its listeners.
#[derive(Clone)]
pub struct MqttOptions {
    pub auth: Arc<Swap<Authenticator>>,
    /// What MQTT over WebSocket (`/mqtt` on the HTTP listener) accepts; each TCP or TLS
    /// listener brings its own policy to [`Mqtt::serve`].
    pub websocket_policy: ListenerPolicy,
    /// The HTTP listener's TLS, which MQTT over WebSocket sessions ride on.
    pub websocket_tls: Option<Arc<sluice_auth::tls::TlsReloader>>,
    /// Open connections per principal over every MQTT transport.
    pub per_principal: Arc<PrincipalConnections>,
    pub topics: Arc<TopicMap>,
    pub max_packet_bytes: u32,
    pub receive_maximum: u16,
    pub topic_alias_maximum: u16,
    pub connect_timeout: Duration,
    pub max_keep_alive_secs: u16,
    pub write_timeout: Duration,
    pub max_hold: Duration,
    pub quota_disconnect_after: u32,
    pub max_will_delay_secs: u32,
    pub max_pending_wills: usize,
    /// Bytes of delayed wills waiting at once.
    pub pending_will_bytes: sluice_core::Budget,
    /// Longest a persistent session outlives its connection (0: every session is clean).
    pub max_session_expiry_secs: u32,
    /// Where persistent sessions are kept between connections.
    pub sessions: Arc<dyn store::SessionStore>,
}

impl MqttOptions {
    /// The options of the `[mqtt]` section; the caller brings what is shared with the rest of
    /// the gateway (the authenticator, the HTTP listener's TLS and the WebSocket transport's
    /// policy), and sets `sessions` to its session store (none is kept until it does). Fails on a topic rule that does not compile, naming it.
    pub fn from_config(
        m: &sluice_config::MqttConfig,
        auth: Arc<Swap<Authenticator>>,
        websocket_policy: ListenerPolicy,
        websocket_tls: Option<Arc<sluice_auth::tls::TlsReloader>>,
    ) -> Result<Self, String> {
        let topics =
            TopicMap::compile(&m.topics).map_err(|(i, e)| format!("mqtt.topics[{i}]: {e}"))?;
        Ok(Self {
            auth,
            websocket_policy,
            websocket_tls,
            per_principal: PrincipalConnections::new(m.max_connections_per_principal),
            topics: Arc::new(topics),
            max_packet_bytes: m.max_packet_bytes,
            receive_maximum: m.receive_maximum,
            topic_alias_maximum: m.topic_alias_maximum,
            connect_timeout: Duration::from_millis(m.connect_timeout_ms),
            max_keep_alive_secs: m.max_keep_alive_secs,
            write_timeout: Duration::from_millis(m.write_timeout_ms),
            max_hold: Duration::from_millis(m.max_hold_ms),
            quota_disconnect_after: m.quota_disconnect_after,
            max_will_delay_secs: m.max_will_delay_secs,
            max_pending_wills: m.max_pending_wills,
            pending_will_bytes: sluice_core::Budget::new(m.max_pending_will_bytes),
            max_session_expiry_secs: m.max_session_expiry_secs,
            // The gateway brings its store (files in data_dir, or Redis).
            sessions: Arc::new(store::NoSessions),
        })
    }
}

/// What one MQTT listener (TCP or TLS) brings of its own.
pub struct ListenerSettings {
    /// Connections beyond this are closed right after accept.
    pub connections: sluice_core::Budget,
    /// Connections per source address beyond its limit are closed right after accept.
    pub per_address: Arc<AddressSlots>,
    /// TLS, for the TLS listener.
    pub tls: Option<Arc<sluice_auth::tls::TlsReloader>>,
    /// What this listener accepts (anonymity decided for its own address).
    pub policy: ListenerPolicy,
    /// Behind a load balancer: the PROXY protocol.
    pub proxy: crate::proxy::ProxySettings,
}

/// A transport carrying MQTT bytes: a TCP or TLS stream, or WebSocket binary messages.
pub trait Transport: Send + 'static {
    /// Reads more bytes into `buf`; `Ok(0)` at the end of the stream. Cancel-safe.
    fn read_into<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl Future<Output = std::io::Result<usize>> + Send + 'a;
    /// Writes all of `data` and flushes it.
    fn write_all<'a>(
        &'a mut self,
        data: &'a [u8],
    ) -> impl Future<Output = std::io::Result<()>> + Send + 'a;
    /// Closes the write side (best effort).
    fn close(&mut self) -> impl Future<Output = ()> + Send + '_;
}

/// A byte stream (TCP, TLS) as a [`Transport`].
pub struct Stream<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for Stream<S> {
    async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        self.0.read_buf(buf).await
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all(data).await?;
        self.0.flush().await
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.0.shutdown()).await;
    }
}

/// MQTT over WebSocket: every binary message carries MQTT bytes (packets may span messages).
pub struct Ws<S>(pub WebSocketStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transport for Ws<S> {
    async fn read_into(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        loop {
            match self.0.next().await {
                None | Some(Ok(Message::Close(_))) => return Ok(0),
                Some(Ok(Message::Binary(b))) => {
                    if b.is_empty() {
                        continue;
                    }
                    buf.extend_from_slice(&b);
                    return Ok(b.len());
                }
                Some(Ok(Message::Text(_))) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "MQTT over WebSocket uses binary messages",
                    ));
                }
                Some(Ok(_)) => continue, // ping/pong: answered by the protocol
                Some(Err(e)) => return Err(std::io::Error::other(e)),
            }
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.0
            .send(Message::Binary(bytes::Bytes::copy_from_slice(data)))
            .await
            .map_err(std::io::Error::other)
    }

    async fn close(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.0.close(None)).await;
    }
}

/// A session's identity for takeover and will delay: its principal and client identifier.
type SessionKey = (Arc<str>, bytestring::ByteString);

/// MQTT ingest: serves its listeners and MQTT-over-WebSocket sessions, and drains them.
pub struct Mqtt<I> {
    ingest: Arc<I>,
    opts: MqttOptions,
    registry: Registry,
    next_id: AtomicU64,
    /// Every session holds a read guard; the drain takes the write lock.
    sessions: Arc<tokio::sync::RwLock<()>>,
    stop: watch::Sender<bool>,
    /// Whether MQTT-over-WebSocket sessions are told of reloads yet (one task, started with
    /// the first such session).
    ws_reloads: std::sync::Once,
}

impl<I: Ingest> Mqtt<I> {
    pub fn new(ingest: Arc<I>, opts: MqttOptions) -> Arc<Self> {
        Arc::new(Self {
            ingest,
            opts,
            registry: Registry::default(),
            next_id: AtomicU64::new(1),
            sessions: Arc::new(tokio::sync::RwLock::new(())),
            stop: watch::channel(false).0,
            ws_reloads: std::sync::Once::new(),
        })
    }

    /// Accepts MQTT connections on `listener` until `shutdown`, with that listener's
    /// limits, TLS and policy ([`ListenerSettings`]).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        settings: ListenerSettings,
        shutdown: impl Future<Output = ()>,
    ) {
        let ListenerSettings {
            connections,
            per_address,
            tls,
            policy,
            proxy,
        } = settings;
        // With the PROXY protocol, connections are counted against the client's address once
        // the header named it, not against the balancer's at accept.
        let no_limit = AddressSlots::new(0);
        let header_timeout = self.opts.connect_timeout;
        let gate = Arc::new(self.gate(policy, tls.clone()));
        self.forward_reloads(&gate);
        tokio::pin!(shutdown);
        let metrics = self.ingest.metrics().clone();
        while let Some((mut stream, peer, mut permit)) = accept_within(
            &listener,
            &connections,
            if proxy.protocol {
                &no_limit
            } else {
                &per_address
            },
            shutdown.as_mut(),
            |_| metrics.mqtt_disconnect("refused"),
        )
        .await
        {
            let (this, tls, gate) = (self.clone(), tls.clone(), gate.clone());
            if proxy.protocol {
                // Its own task: the header is read before the session starts, and its state is
                // gone once it is read.
                let (proxy, per_address, metrics) =
                    (proxy.clone(), per_address.clone(), metrics.clone());
                tokio::spawn(async move {
                    let Some(peer) = Box::pin(crate::server::proxied(
                        &mut stream,
                        peer,
                        &proxy,
                        header_timeout,
                        &per_address,
                        &mut permit,
                    ))
                    .await
                    else {
                        metrics.mqtt_disconnect("refused");
                        return;
                    };
                    match tls {
                        None => {
                            this.session(Stream(stream), conn_info(peer, None), &gate)
                                .await
                        }
                        Some(tls) => {
                            if let Some((s, cert)) = Box::pin(accept_tls(&tls, stream, peer)).await
                            {
                                this.session(Stream(s), conn_info(peer, cert), &gate).await;
                            }
                        }
                    }
                    drop(permit);
                });
                continue;
            }
            // One task per connection; a plain TCP connection's task does not carry the TLS
            // handshake's state (memory per idle connection).
            match tls {
                None => {
                    let task = async move {
                        this.session(Stream(stream), conn_info(peer, None), &gate)
                            .await;
                        drop(permit);
                    };
                    tokio::spawn(task);
                }
                Some(tls) => {
                    tokio::spawn(async move {
                        // Boxed: the handshake's state is large and over once it is done.
                        if let Some((s, cert)) = Box::pin(accept_tls(&tls, stream, peer)).await {
                            this.session(Stream(s), conn_info(peer, cert), &gate).await;
                        }
                        drop(permit);
                    });
                }
            }
        }
    }

    /// The authentication step of one MQTT transport.
    fn gate(
        &self,
        policy: ListenerPolicy,
        tls: Option<Arc<sluice_auth::tls::TlsReloader>>,
    ) -> Gate {
        Gate {
            auth: self.opts.auth.clone(),
            policy,
            per_principal: self.opts.per_principal.clone(),
            tls,
        }
    }

    /// Runs one MQTT session over `io` to its end, authenticated by `gate`.
    pub fn session<'g, T: Transport>(
        self: Arc<Self>,
        io: T,
        conn: ConnInfo,
        gate: &'g Gate,
    ) -> impl Future<Output = ()> + Send + 'g {
        // Not an `async fn`: the session's state (with `io`, a TLS stream in particular) is
        // boxed here, before the returned future exists, so a spawned connection task holds a
        // pointer, not a copy of every transport's state (memory per idle connection).
        let guard = self.sessions.clone().try_read_owned().ok();
        let run = guard.as_ref().map(|_| {
            // A debug span: at the default `info` level a span per connection cost ~430 bytes
            // of every idle connection's memory (BENCHMARKS.md); the events logged at `info`
            // and above during a session name its client id and principal themselves.
            let span = tracing::debug_span!(
                "conn",
                protocol = PROTO,
                peer = %conn.peer,
                client_id = tracing::field::Empty,
                principal = tracing::field::Empty
            );
            tracing::Instrument::instrument(
                Box::pin(session::run(self.clone(), io, conn, gate)),
                span,
            )
        });
        async move {
            let Some(run) = run else {
                return; // draining
            };
            let gauge = self.ingest.metrics().connections_of(PROTO);
            gauge.inc();
            run.await;
            gauge.dec();
            drop(guard);
        }
    }

    /// Tells every session to answer what it read, send MQTT 5 clients DISCONNECT 0x8B and
    /// close; returns once all have ended.
    pub async fn drain(&self) {
        self.stop.send_replace(true);
        self.raise_all(session::registry::signal::STOP);
        let _ = self.sessions.write().await;
    }

    fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

fn conn_info(peer: SocketAddr, client_cert: Option<Arc<[u8]>>) -> ConnInfo {
    // The session's task holds the connection's admission itself.
    ConnInfo {
        admitted: None,
        peer,
        client_cert,
        principal: Default::default(),
    }
}

/// Serves MQTT over an upgraded WebSocket (`/mqtt` on the HTTP listener).
pub trait WsSessions: Send + Sync + 'static {
    fn serve_ws(
        &self,
        ws: WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
        conn: ConnInfo,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;
}

impl<I: Ingest> WsSessions for Arc<Mqtt<I>> {
    fn serve_ws(
        &self,
        ws: WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
        conn: ConnInfo,
    ) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        let this = self.clone();
        Box::pin(async move {
            // MQTT over WebSocket has its own policy (decided for the HTTP listener's address,
            // DESIGN §11) and counts against MQTT's per-principal limit, not HTTP's: the
            // session starts with no principal slot of the HTTP connection it came from.
            let gate = this.gate(
                this.opts.websocket_policy.clone(),
                this.opts.websocket_tls.clone(),
            );
            this.ws_reloads.call_once(|| this.forward_reloads(&gate));
            let conn = ConnInfo {
                principal: Default::default(),
                ..conn
            };
            this.session(Ws(ws), conn, &gate).await
        })
    }
}
