//! WebSocket ingest on the HTTP listener: `GET /v1/streams/{stream}/ws` (every frame goes to
//! that stream) and `GET /v1/ws` (every frame names its stream). Credentials are checked and
//! the stream authorized before the upgrade, so failures are plain HTTP 401/403. Each event is
//! answered with a JSON ack or nack once it reached its ack point or was refused. The protocol
//! is documented in docs/websocket.md.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::value::RawValue;
use sluice_auth::Credentials;
use sluice_core::{Admission, Event, Ingest, Principal, Protocol, Receipt, Rejection, StreamName};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

use super::{API_KEY_HEADER, Ctx, body, error_body, rejection_response};
use crate::lanes::Lanes;
use crate::server::ConnInfo;

const PROTO: &str = "websocket";

/// The subprotocol Sluice speaks; a client that offers subprotocols must offer this one.
pub const SUBPROTOCOL: &str = "sluice.v1";

/// Settings of WebSocket ingest.
#[derive(Debug, Clone)]
pub struct WsOptions {
    pub max_message_bytes: usize,
    pub max_pending_frames: usize,
    pub idle_timeout: Duration,
    /// Zero: never ping.
    pub ping_interval: Duration,
    pub ack_write_timeout: Duration,
}

/// Whether `path` is a WebSocket endpoint; `Some(None)` for `/v1/ws`.
pub fn route(path: &str) -> Option<Option<&str>> {
    if path == "/v1/ws" {
        return Some(None);
    }
    path.strip_prefix("/v1/streams/")
        .and_then(|rest| rest.strip_suffix("/ws"))
        .map(Some)
}

/// The query parameter `name`, percent-decoded.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v, true))
    })
}

/// `%XX` sequences decoded (invalid ones kept as they are); with `plus_is_space` (query
/// strings) a `+` is a space, otherwise (CloudEvents `ce-` headers) it stays a `+`.
pub(super) fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(if plus_is_space && b[i] == b'+' {
            b' '
        } else {
            b[i]
        });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks the upgrade request's method and WebSocket headers; the `Sec-WebSocket-Key`, or the
/// HTTP error to answer.
#[allow(clippy::result_large_err)] // built once per upgrade request, answered at once
pub(super) fn handshake(
    req: &Request<Incoming>,
) -> Result<String, (Response<Full<Bytes>>, &'static str)> {
    let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if req.method() != http::Method::GET {
        return Err((
            error_body(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use GET with Upgrade: websocket",
            ),
            "method_not_allowed",
        ));
    }
    let is_upgrade = h("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        && h("connection").is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"));
    let Some(key) = h("sec-websocket-key").map(str::to_string) else {
        return Err((
            error_body(
                StatusCode::BAD_REQUEST,
                "malformed",
                "a WebSocket upgrade request (Upgrade: websocket, Sec-WebSocket-Key) is required",
            ),
            "malformed",
        ));
    };
    if !is_upgrade {
        return Err((
            error_body(
                StatusCode::BAD_REQUEST,
                "malformed",
                "a WebSocket upgrade request (Upgrade: websocket, Connection: Upgrade) is required",
            ),
            "malformed",
        ));
    }
    if h("sec-websocket-version") != Some("13") {
        let mut r = error_body(
            StatusCode::UPGRADE_REQUIRED,
            "malformed",
            "WebSocket version 13 is required",
        );
        r.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return Err((r, "malformed"));
    }
    Ok(key)
}

/// The `101 Switching Protocols` answer to `key`, naming `subprotocol` if the client offered
/// any.
pub(super) fn switching(key: &str, subprotocol: Option<&'static str>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = r.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    if let Some(p) = subprotocol {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    r
}

/// What a WebSocket upgrade (ingest or subscribe) or a read may carry as credentials besides
/// headers: browsers cannot set headers on a WebSocket or an EventSource, so a token may come as
/// the `bearer.<token>` subprotocol (WebSocket) or the `access_token` query parameter, and a key
/// as `api_key`. A client that offers subprotocols must offer `sluice.v1`.
pub(super) struct UpgradeCredentials {
    pub(super) offered: Vec<String>,
    token: Option<String>,
    key: Option<String>,
}

impl UpgradeCredentials {
    #[allow(clippy::result_large_err)] // built once per upgrade request, answered at once
    pub(super) fn of(
        req: &Request<Incoming>,
    ) -> Result<Self, (Response<Full<Bytes>>, &'static str)> {
        let offered = offered_subprotocols(req);
        if !offered.is_empty() && !offered.iter().any(|p| p == SUBPROTOCOL) {
            return Err((
                error_body(
                    StatusCode::BAD_REQUEST,
                    "malformed",
                    "offer the subprotocol `sluice.v1` (with `bearer.<token>` for credentials)",
                ),
                "malformed",
            ));
        }
        let sub_token = offered
            .iter()
            .find_map(|p| p.strip_prefix("bearer."))
            .map(str::to_string);
        let mut c = Self::of_query(req);
        c.token = sub_token.or(c.token);
        c.offered = offered;
        Ok(c)
    }

    /// The `api_key` and `access_token` query parameters (a read: no subprotocols).
    pub(super) fn of_query(req: &Request<Incoming>) -> Self {
        let query = req.uri().query();
        Self {
            offered: Vec::new(),
            token: query_param(query, "access_token"),
            key: query_param(query, "api_key"),
        }
    }

    /// The request's credentials: headers first, then these.
    pub(super) fn credentials<'a>(
        &'a self,
        req: &'a Request<Incoming>,
        conn: &'a ConnInfo,
    ) -> Credentials<'a> {
        let h = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        Credentials {
            authorization: h(http::header::AUTHORIZATION.as_str()),
            api_key: h(API_KEY_HEADER).or(self.key.as_deref()),
            bearer: self.token.as_deref(),
            client_cert: conn.client_cert.as_deref(),
        }
    }
}

/// The subprotocols a client offers.
pub(super) fn offered_subprotocols(req: &Request<Incoming>) -> Vec<String> {
    req.headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// MQTT over WebSocket (`GET /mqtt`, subprotocol `mqtt`): after the upgrade every binary
/// message carries MQTT bytes and the MQTT session authenticates the CONNECT as on TCP.
/// The refusal of a WebSocket upgrade whose `Origin` is not in `websocket.allowed_origins`
/// (when set; requests without `Origin` come from no browser and go on).
pub(super) fn origin_refused(
    ctx: &Ctx,
    req: &Request<Incoming>,
) -> Option<(Response<Full<Bytes>>, &'static str)> {
    let origin = req.headers().get("origin")?;
    if ctx.allowed_origins.is_empty()
        || ctx
            .allowed_origins
            .iter()
            .any(|o| o.as_bytes() == origin.as_bytes())
    {
        return None;
    }
    let shown = String::from_utf8_lossy(origin.as_bytes());
    Some((
        error_body(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            &format!("origin `{shown}` may not connect (websocket.allowed_origins)"),
        ),
        "forbidden",
    ))
}

pub(super) async fn upgrade_mqtt(
    mut req: Request<Incoming>,
    conn: ConnInfo,
    ctx: Arc<Ctx>,
) -> (Response<Full<Bytes>>, &'static str) {
    let Some(mqtt) = ctx.mqtt.clone() else {
        return (
            error_body(
                StatusCode::NOT_FOUND,
                "no_route",
                "MQTT over WebSocket is disabled",
            ),
            "no_route",
        );
    };
    let key = match handshake(&req) {
        Ok(k) => k,
        Err(r) => return r,
    };
    // A page of another site may not open an MQTT session with the browser's credentials
    // (cookies, client certificate) either.
    if let Some(refused) = origin_refused(&ctx, &req) {
        return refused;
    }
    let offered = offered_subprotocols(&req);
    if !offered.is_empty() && !offered.iter().any(|p| p == crate::mqtt::WS_SUBPROTOCOL) {
        return (
            error_body(
                StatusCode::BAD_REQUEST,
                "malformed",
                "offer the WebSocket subprotocol `mqtt`",
            ),
            "malformed",
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let max = ctx.mqtt_max_packet_bytes;
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let cfg = WebSocketConfig::default()
                    .max_message_size(Some(max + 5))
                    .max_frame_size(Some(max + 5));
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(cfg),
                )
                .await;
                mqtt.serve_ws(ws, conn).await;
            }
            Err(e) => tracing::debug!(error = %e, "MQTT WebSocket upgrade failed"),
        }
    });
    let sub = (!offered.is_empty()).then_some(crate::mqtt::WS_SUBPROTOCOL);
    (switching(&key, sub), "upgraded")
}

/// Answers the upgrade request: 101 and a session, or an HTTP error before any upgrade.
pub(super) async fn upgrade<I: Ingest>(
    mut req: Request<Incoming>,
    conn: ConnInfo,
    stream: Option<String>,
    ingest: Arc<I>,
    ctx: Arc<Ctx>,
) -> (Response<Full<Bytes>>, &'static str) {
    let Some(opts) = ctx.websocket.clone() else {
        return (
            error_body(
                StatusCode::NOT_FOUND,
                "no_route",
                "WebSocket ingest is disabled",
            ),
            "no_route",
        );
    };
    let key = match handshake(&req) {
        Ok(k) => k,
        Err(r) => return r,
    };
    if let Some(refused) = origin_refused(&ctx, &req) {
        return refused;
    }
    let upgrade_creds = match UpgradeCredentials::of(&req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let offered = upgrade_creds.offered.clone();
    // `?format=cloudevents`: every text frame is a CloudEvent or an array of them.
    let cloudevents = match query_param(req.uri().query(), "format").as_deref() {
        None | Some("json") => false,
        Some("cloudevents") => true,
        Some(other) => {
            let r = Rejection::Malformed {
                message: format!("format `{other}` is not one of json, cloudevents"),
            };
            return (rejection_response(&r), r.code());
        }
    };
    let stream = match stream.as_deref().map(StreamName::parse).transpose() {
        Ok(s) => s,
        Err(r) => return (rejection_response(&r), r.code()),
    };
    let (principal, auth) = match ctx
        .gate
        .admit_session(
            PROTO,
            ingest.metrics(),
            &conn,
            upgrade_creds.credentials(&req, &conn),
        )
        .await
    {
        Ok(p) => p,
        Err(refused) => {
            let r = refused.rejection();
            return (rejection_response(&r), r.code());
        }
    };
    if let Some(s) = &stream
        && let Err(r) = ingest.admit(&principal, s)
    {
        return (rejection_response(&r), r.code());
    }
    let trace = super::trace_headers(req.headers());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let Ok(sessions) = ctx.ws_sessions.clone().try_read_owned() else {
        let r = Rejection::unavailable(Duration::from_secs(1), "the gateway is shutting down");
        return (rejection_response(&r), r.code());
    };
    let shutdown = ctx.ws_shutdown.clone();
    let gate = ctx.gate.clone();
    let span = tracing::info_span!(
        "conn",
        protocol = PROTO,
        peer = %conn.peer,
        principal = principal.name(),
        stream = stream.as_ref().map_or("", |s| s.as_str())
    );
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let _session = sessions;
            match on_upgrade.await {
                Ok(upgraded) => {
                    let cfg = WebSocketConfig::default()
                        .max_message_size(Some(opts.max_message_bytes))
                        .max_frame_size(Some(opts.max_message_bytes));
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(cfg),
                    )
                    .await;
                    let gauge = ingest.metrics().connections_of(PROTO);
                    gauge.inc();
                    Session {
                        ingest,
                        principal,
                        stream,
                        opts,
                        cloudevents,
                        trace,
                    }
                    .run(ws, shutdown, gate, auth)
                    .await;
                    gauge.dec();
                }
                Err(e) => tracing::debug!(error = %e, "WebSocket upgrade failed"),
            }
            drop(conn);
        },
        span,
    ));
    let sub = (!offered.is_empty()).then_some(SUBPROTOCOL);
    (switching(&key, sub), "upgraded")
}

/// One upgraded socket.
struct Session<I> {
    ingest: Arc<I>,
    principal: Principal,
    /// The stream of `/v1/streams/{stream}/ws`; `None` on `/v1/ws`.
    stream: Option<StreamName>,
    opts: WsOptions,
    /// Text frames are CloudEvents (`?format=cloudevents`).
    cloudevents: bool,
    /// The upgrade request's trace context, for events without their own `traceparent`.
    trace: Option<sluice_core::TraceHeaders>,
}

pub(super) fn close(code: CloseCode, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.to_string().into(),
    }))
}

/// What the frame handler sends to the writer.
enum Out {
    Msg(Message),
    /// Close with this frame, then stop.
    Close(Message),
}

impl<I: Ingest> Session<I> {
    async fn run<S>(
        self,
        ws: WebSocketStream<S>,
        mut shutdown: watch::Receiver<bool>,
        gate: crate::gate::Gate,
        mut auth: crate::gate::SessionAuth,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sink, mut source) = ws.split();
        let opts = self.opts.clone();
        // Room for every pending frame's answers is not reserved: a frame of many events may
        // block its task until the writer catches up, which stops the reader in turn.
        let (out_tx, mut out_rx) = mpsc::channel::<Out>(opts.max_pending_frames * 2);
        let write_timeout = opts.ack_write_timeout;
        let writer = tokio::spawn(async move {
            // Messages are fed without a flush each; the socket is flushed when nothing else is
            // waiting, so a burst of acks costs one write, not one per ack.
            let mut unflushed = false;
            loop {
                let out = match out_rx.try_recv() {
                    Ok(out) => out,
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        if unflushed {
                            match tokio::time::timeout(write_timeout, sink.flush()).await {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => break,
                                Err(_) => {
                                    stalled(&mut sink).await;
                                    break;
                                }
                            }
                        }
                        match out_rx.recv().await {
                            Some(out) => out,
                            None => break,
                        }
                    }
                };
                let (msg, last) = match out {
                    Out::Msg(m) => (m, false),
                    Out::Close(m) => (m, true),
                };
                match tokio::time::timeout(write_timeout, sink.feed(msg)).await {
                    Ok(Ok(())) if !last => unflushed = true,
                    Ok(_) => break,
                    Err(_) => {
                        stalled(&mut sink).await;
                        break;
                    }
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        });
        let pending = Arc::new(Semaphore::new(opts.max_pending_frames));
        let seq = AtomicU64::new(0);
        let session = Arc::new(self);
        // Per stream, the completion of the last frame, so a stream's answers keep frame order.
        let mut last_of: HashMap<String, oneshot::Receiver<()>> = HashMap::new();
        let mut lanes = Lanes::new(
            session.ingest.clone(),
            Protocol::WebSocket,
            opts.max_pending_frames,
        )
        .with_trace(session.trace.clone());
        let mut ping = (!opts.ping_interval.is_zero()).then(|| {
            let mut i = tokio::time::interval(opts.ping_interval);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let mut idle = tokio::time::Instant::now() + opts.idle_timeout;
        loop {
            // At most max_pending_frames unanswered frames: past it, stop reading.
            let permit = tokio::select! {
                p = pending.clone().acquire_owned() => p.expect("never closed"),
                _ = stopped(&mut shutdown) => break,
                _ = out_tx.closed() => break, // the writer gave up (stalled reader, or gone)
            };
            let next = tokio::select! {
                m = source.next() => m,
                _ = tokio::time::sleep_until(idle) => {
                    let _ = out_tx.send(Out::Close(close(CloseCode::Away, "idle timeout"))).await;
                    break;
                }
                _ = async { ping.as_mut().unwrap().tick().await }, if ping.is_some() => {
                    drop(permit);
                    if out_tx.send(Out::Msg(Message::Ping(Bytes::new()))).await.is_err() {
                        break;
                    }
                    continue;
                }
                _ = stopped(&mut shutdown) => break,
                _ = out_tx.closed() => break,
                // A reload or the credential's expiry: go on only while the principal stands.
                _ = auth.due() => {
                    drop(permit);
                    if let Err(revoked) = gate.recheck(&mut auth).await {
                        session.ingest.metrics().session_revoked(PROTO);
                        let reason = revoked.to_string();
                        // Close reasons are at most 123 bytes.
                        let mut end = reason.len().min(120);
                        while !reason.is_char_boundary(end) {
                            end -= 1;
                        }
                        let reason = &reason[..end];
                        let _ = out_tx.send(Out::Close(close(CloseCode::Policy, reason))).await;
                        break;
                    }
                    continue;
                }
            };
            idle = tokio::time::Instant::now() + opts.idle_timeout;
            let msg = match next {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    let (code, reason) = match &e {
                        tungstenite::Error::Capacity(_) => (CloseCode::Size, "message too large"),
                        tungstenite::Error::Utf8(_) => {
                            (CloseCode::Invalid, "text frame is not UTF-8")
                        }
                        tungstenite::Error::Protocol(_) => (CloseCode::Protocol, "protocol error"),
                        _ => break,
                    };
                    let _ = out_tx.send(Out::Close(close(code, reason))).await;
                    break;
                }
            };
            let frame = match msg {
                Message::Text(t) => Frame::Text(Bytes::from(t)),
                Message::Binary(b) => Frame::Binary(b),
                Message::Close(_) => break,
                _ => continue, // pings are answered by the protocol; pongs only keep it alive
            };
            let n = seq.fetch_add(1, Ordering::Relaxed);
            let s = session.clone();
            let out = out_tx.clone();
            let parsed = s.parse(frame);
            let stream_key = match &parsed {
                Ok((admission, _, _)) => admission.stream().to_string(),
                Err(_) => String::new(),
            };
            if last_of.len() > 1024 {
                last_of.retain(|_, rx| {
                    matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty))
                });
            }
            let (done_tx, done_rx) = oneshot::channel();
            let previous = last_of.insert(stream_key, done_rx);
            // Frames of one stream are appended in the order they arrived (the lane), and
            // answered in that order (the chain of `previous`).
            let queued = match parsed {
                Ok((admission, content_type, parsed)) => {
                    let ids: Vec<Option<Bytes>> = parsed
                        .iter()
                        .map(|e| e.as_ref().ok().and_then(|e| e.id.clone()))
                        .collect();
                    let (events, invalid) = super::cloudevents::split(parsed);
                    if !invalid.is_empty() {
                        s.ingest
                            .metrics()
                            .rejected(PROTO, "malformed", invalid.len() as u64);
                    }
                    let outcome = if events.is_empty() {
                        None
                    } else {
                        Some(lanes.submit(admission, content_type, events).await)
                    };
                    Ok((outcome, ids, invalid))
                }
                Err(e) => Err(e),
            };
            tokio::spawn(async move {
                let answers = match queued {
                    Ok((None, ids, invalid)) => {
                        Answers::Receipts(super::with_invalid(Vec::new(), invalid), ids)
                    }
                    Ok((Some(outcome), ids, invalid)) => match outcome.await {
                        Ok(Ok(receipts)) => {
                            Answers::Receipts(super::with_invalid(receipts, invalid), ids)
                        }
                        Ok(Err(r)) => Answers::Rejected(r, ids),
                        Err(_) => Answers::Rejected(
                            Rejection::Internal {
                                message: "the frame's lane ended before answering".into(),
                            },
                            ids,
                        ),
                    },
                    Err((r, ids)) => Answers::Rejected(r, ids),
                };
                if let Some(p) = previous {
                    let _ = p.await;
                }
                for m in answers.messages(n) {
                    if out.send(m).await.is_err() {
                        break;
                    }
                }
                let _ = done_tx.send(());
                drop(permit);
            });
        }
        // Draining or closed: let pending frames answer, then close (1001 on shutdown).
        let _ = tokio::time::timeout(
            opts.ack_write_timeout,
            pending.acquire_many(opts.max_pending_frames as u32),
        )
        .await;
        let draining = *shutdown.borrow();
        if draining {
            let _ = out_tx
                .send(Out::Close(close(
                    CloseCode::Away,
                    "the gateway is shutting down",
                )))
                .await;
        }
        drop(out_tx);
        let _ = writer.await;
    }

    /// Admits the principal on a frame's stream (once per frame), so a frame for a stream it
    /// may not use is refused before it is parsed.
    fn admit(&self, stream: &StreamName) -> Result<Admission, Rejection> {
        self.ingest.admit(&self.principal, stream)
    }

    /// A frame's admission, content type and events (each an event or, in a CloudEvents array,
    /// the reason it is not one), or why the frame cannot be taken (with the ids it could
    /// read, for the nack).
    #[allow(clippy::type_complexity)]
    fn parse(
        &self,
        frame: Frame,
    ) -> Result<(Admission, Bytes, Vec<Result<Event, Rejection>>), (Rejection, Vec<Option<Bytes>>)>
    {
        let fail = |r: Rejection| (r, vec![None]);
        let json = Bytes::from_static(b"application/json");
        let events = |t: &Bytes, admission: &Admission| {
            if self.cloudevents {
                super::cloudevents::parse_frame(t, event_limit(admission))
            } else {
                body::parse_json(t, event_limit(admission))
                    .map(|events| events.into_iter().map(Ok).collect())
            }
        };
        match (frame, &self.stream) {
            (Frame::Binary(b), Some(stream)) => Ok((
                self.admit(stream).map_err(fail)?,
                Bytes::from_static(b"application/octet-stream"),
                vec![Ok(Event {
                    value: b,
                    ..Event::default()
                })],
            )),
            (Frame::Binary(_), None) => Err(fail(Rejection::Malformed {
                message: "binary frames need a stream: use /v1/streams/{stream}/ws".into(),
            })),
            (Frame::Text(t), Some(stream)) => {
                let admission = self.admit(stream).map_err(fail)?;
                let events = events(&t, &admission).map_err(fail)?;
                Ok((admission, json, events))
            }
            (Frame::Text(t), None) => {
                let (stream, body) = envelope(&t).map_err(fail)?;
                let admission = self.admit(&stream).map_err(fail)?;
                let events = events(&body, &admission).map_err(fail)?;
                Ok((admission, json, events))
            }
        }
    }
}

/// How many events a frame may hold on its stream.
fn event_limit(admission: &Admission) -> body::EventLimit<'_> {
    body::EventLimit {
        max: admission.settings().max_events_per_request,
        stream: admission.stream().as_str(),
    }
}

/// A `/v1/ws` text frame, `{"stream": "…", "events": event or array}`: its stream and the bytes
/// of its events (a slice of the frame).
fn envelope(t: &Bytes) -> Result<(StreamName, Bytes), Rejection> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        stream: String,
        #[serde(borrow)]
        events: &'a RawValue,
    }
    let env: Envelope = serde_json::from_slice(t).map_err(|e| Rejection::Malformed {
        message: format!(
            "on /v1/ws a frame is {{\"stream\": \"…\", \"events\": event or array}}: {e}"
        ),
    })?;
    let stream = StreamName::parse(&env.stream)?;
    Ok((stream, t.slice_ref(env.events.get().as_bytes())))
}

/// Decodes a `/v1/ws` text frame into events as a session would (at most `max_events`): the
/// stream and how many events. For the fuzz target (`protocols/fuzz`, `ws_frame`) and its
/// corpus replay.
pub fn decode_frame(t: &Bytes, max_events: u64) -> Result<(StreamName, usize), Rejection> {
    let (stream, events) = envelope(t)?;
    let limit = body::EventLimit {
        max: max_events,
        stream: stream.as_str(),
    };
    let n = body::parse_json(&events, limit)?.len();
    Ok((stream, n))
}

/// The client does not read its acks: tell it why (if the socket still takes a frame) and stop,
/// rather than buffer.
async fn stalled<S>(sink: &mut S)
where
    S: futures_util::Sink<Message> + Unpin,
{
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        sink.send(close(CloseCode::Policy, "acks were not read in time")),
    )
    .await;
}

/// Completes once the gateway starts draining.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|&s| s).await;
}

enum Frame {
    Text(Bytes),
    Binary(Bytes),
}

/// The answers to one frame.
enum Answers {
    Receipts(Vec<Receipt>, Vec<Option<Bytes>>),
    /// The whole frame was refused: one nack per event (or one for an unparsable frame).
    Rejected(Rejection, Vec<Option<Bytes>>),
}

impl Answers {
    fn messages(self, seq: u64) -> Vec<Out> {
        use std::fmt::Write as _;
        let id_json = |id: &Option<Bytes>| match id {
            Some(b) => {
                serde_json::Value::String(String::from_utf8_lossy(b).into_owned()).to_string()
            }
            None => "null".to_string(),
        };
        let nack = |r: &Rejection, i: usize, id: &Option<Bytes>| {
            let mut v = serde_json::json!({
                "seq": seq, "index": i, "id": serde_json::from_str::<serde_json::Value>(&id_json(id)).unwrap_or_default(),
                "error": {"code": r.code(), "message": r.to_string()},
            });
            if let Some(after) = r.retry_after() {
                v["retry_after_ms"] = serde_json::json!(after.as_millis() as u64);
            }
            v.to_string()
        };
        let text = |s: String| Out::Msg(Message::Text(s.into()));
        match self {
            Answers::Receipts(receipts, ids) => {
                let internal = receipts
                    .iter()
                    .any(|r| matches!(r, Receipt::Failed(Rejection::Internal { .. })));
                let mut out: Vec<Out> = receipts
                .iter()
                .zip(ids.iter())
                .enumerate()
                .map(|(i, (r, id))| {
                    // Acks are the hot path: written directly, not through a JSON tree.
                    let mut s = String::with_capacity(80);
                    match r {
                        Receipt::Appended { partition, offset } => {
                            let _ = write!(
                                s,
                                r#"{{"seq":{seq},"index":{i},"id":{},"partition":{partition},"offset":{offset}}}"#,
                                id_json(id)
                            );
                        }
                        Receipt::Received { partition } => {
                            let _ = write!(
                                s,
                                r#"{{"seq":{seq},"index":{i},"id":{},"partition":{partition},"status":"received"}}"#,
                                id_json(id)
                            );
                        }
                        Receipt::Spooled { partition } => {
                            let _ = write!(
                                s,
                                r#"{{"seq":{seq},"index":{i},"id":{},"partition":{partition},"status":"spooled"}}"#,
                                id_json(id)
                            );
                        }
                        Receipt::Duplicate {
                            partition,
                            offset,
                            spooled,
                        } => {
                            let _ = write!(
                                s,
                                r#"{{"seq":{seq},"index":{i},"id":{},"partition":{partition},{},"duplicate":true}}"#,
                                id_json(id),
                                match (offset, spooled) {
                                    (Some(o), _) => format!(r#""offset":{o}"#),
                                    (None, true) => r#""status":"spooled""#.to_string(),
                                    (None, false) => r#""status":"received""#.to_string(),
                                }
                            );
                        }
                        Receipt::DeadLettered {
                            stream,
                            partition,
                            offset,
                            reason,
                        } => {
                            s = serde_json::json!({
                                "seq": seq, "index": i,
                                "id": serde_json::from_str::<serde_json::Value>(&id_json(id)).unwrap_or_default(),
                                "dead_letter": {"stream": &**stream, "partition": partition, "offset": offset},
                                "reason": &**reason,
                            })
                            .to_string();
                        }
                        Receipt::Failed(r) => s = nack(r, i, id),
                    }
                    text(s)
                })
                .collect();
                // An internal failure (the log refused in a way no retry fixes): the nacks, then
                // 1011, so the client does not go on sending into it.
                if internal {
                    out.push(Out::Close(close(CloseCode::Error, "internal error")));
                }
                out
            }
            Answers::Rejected(r, ids) => {
                let mut out: Vec<Out> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| text(nack(&r, i, id)))
                    .collect();
                // The log cannot take events now (budget full, log failing, Kafka away): after
                // the nacks, 1013 asks the client to reconnect later, perhaps elsewhere.
                if matches!(r, Rejection::Unavailable { .. }) {
                    out.push(Out::Close(close(
                        CloseCode::Again,
                        "the log is unavailable; reconnect later",
                    )));
                }
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_query_parameters() {
        assert_eq!(route("/v1/ws"), Some(None));
        assert_eq!(route("/v1/streams/a.b/ws"), Some(Some("a.b")));
        assert_eq!(route("/v1/streams/a/events"), None);
        assert_eq!(
            query_param(Some("x=1&access_token=a%2Eb.c&api_key=k"), "access_token").as_deref(),
            Some("a.b.c")
        );
        assert_eq!(query_param(Some("x=1"), "api_key"), None);
        assert_eq!(percent_decode("100%", true), "100%");
        assert_eq!(percent_decode("a+b%20c", true), "a b c");
        assert_eq!(percent_decode("a+b%20c", false), "a+b c");
    }
}
