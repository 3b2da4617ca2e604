//! WebSocket subscribe (docs/consume.md): `GET /v1/streams/{stream}/subscribe` upgrades to a
//! live tail with credit-based flow control. The client grants records with `{"credit": N}`
//! (the `credit` query parameter is the first grant, 100 by default); the server sends
//! `{"records": [...], "cursor": "0:15,1:7"}` messages, never more records than granted, so a
//! slow page holds the gateway to nothing: its cursor waits in the log, not in a buffer.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sluice_core::{Ingest, ReadFrom, ReadRequest, Rejection, StreamName};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::read::{cursor_string, error, request_of};
use super::ws::{
    SUBPROTOCOL, UpgradeCredentials, close, handshake, origin_refused, query_param, switching,
};
use super::{Ctx, rejection_response};
use crate::server::ConnInfo;

const PROTO: &str = "websocket";
/// Records per message at most.
const BATCH: usize = 256;
/// Credit a subscriber may hold at most (grants beyond it are capped).
const MAX_CREDIT: u64 = 1_000_000;
/// The first grant when the request names none.
const DEFAULT_CREDIT: u64 = 100;
/// How long one read waits at the end before the session looks at its socket again.
const POLL: Duration = Duration::from_secs(15);

/// `/v1/streams/{stream}/subscribe`'s stream.
pub(super) fn route(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/streams/")
        .and_then(|rest| rest.strip_suffix("/subscribe"))
}

/// Answers the upgrade: 101 and a subscription, or an HTTP error (credentials, permission,
/// stream, position, limits) before any upgrade.
pub(super) async fn upgrade<I: Ingest>(
    mut req: Request<Incoming>,
    conn: ConnInfo,
    stream: &str,
    ingest: Arc<I>,
    ctx: Arc<Ctx>,
) -> (Response<Full<Bytes>>, &'static str) {
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
    let query = req.uri().query();
    let stream = match StreamName::parse(stream) {
        Ok(s) => s,
        Err(r) => return (rejection_response(&r), r.code()),
    };
    let mut request = match request_of(stream, query) {
        Ok(r) => r,
        Err(r) => return (rejection_response(&r), r.code()),
    };
    let positioned = ["from_offset", "from_time", "cursor", "from"]
        .iter()
        .any(|k| query_param(query, k).is_some());
    if !positioned {
        request.from = ReadFrom::End;
    }
    let credit = match query_param(query, "credit").map(|c| c.parse::<u64>()) {
        None => DEFAULT_CREDIT,
        Some(Ok(c)) => c.min(MAX_CREDIT),
        Some(Err(_)) => {
            let r = Rejection::Malformed {
                message: "`credit` must be a non-negative integer".into(),
            };
            return (rejection_response(&r), r.code());
        }
    };
    let (principal, mut auth) = match ctx
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
    let (total, mine) = match ctx.subscribers.take(&principal) {
        Ok(slots) => slots,
        Err(r) => return (rejection_response(&r), r.code()),
    };
    // What is wrong (permission, stream, position) is answered before the upgrade: a read of
    // one record, whose position is kept, not its record.
    let probe = ReadRequest {
        limit: 1,
        wait: Duration::ZERO,
        ..request.clone()
    };
    let mut pos = match ingest.read(&principal, probe).await {
        Ok(b) => b.before(),
        Err(e) => return error(e),
    };
    // Held while the subscription lasts: the drain waits for its close frame.
    let Ok(session) = ctx.ws_sessions.clone().try_read_owned() else {
        let r = Rejection::unavailable(Duration::from_secs(1), "the gateway is shutting down");
        return (rejection_response(&r), r.code());
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let mut shutdown = ctx.ws_shutdown.clone();
    let gate = ctx.gate.clone();
    tokio::spawn(async move {
        let _held = (total, mine, conn, session);
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let cfg = WebSocketConfig::default()
            .max_message_size(Some(4096))
            .max_frame_size(Some(4096));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(cfg)).await;
        let (mut sink, mut source) = ws.split();
        let gauge = ingest.metrics().connections_of("websocket_subscribe");
        gauge.inc();
        let mut credit = credit;
        let end = loop {
            let want = credit.min(BATCH as u64) as usize;
            let read = ReadRequest {
                partitions: None,
                from: ReadFrom::Cursor(pos.clone()),
                limit: want.max(1),
                wait: POLL,
                ..request.clone()
            };
            tokio::select! {
                biased;
                msg = source.next() => match msg {
                    Some(Ok(Message::Text(t))) => match grant(t.as_str()) {
                        Some(n) => credit = credit.saturating_add(n).min(MAX_CREDIT),
                        None => break close(
                            CloseCode::Policy,
                            "send {\"credit\": N} to be sent N more records",
                        ),
                    },
                    Some(Ok(Message::Binary(_))) => break close(
                        CloseCode::Unsupported,
                        "send {\"credit\": N} as a text message",
                    ),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return gauge.dec(),
                    Some(Ok(_)) => {} // pings are answered by the socket
                },
                () = async { drop(shutdown.wait_for(|s| *s).await) } => {
                    break close(CloseCode::Away, "the gateway is shutting down; subscribe again from your cursor");
                }
                _ = auth.due() => if let Err(revoked) = gate.recheck(&mut auth).await {
                    ingest.metrics().session_revoked(PROTO);
                    break close(CloseCode::Policy, &revoked.to_string());
                },
                r = super::read::read_paced(&*ingest, &principal, read), if want > 0 => match r {
                    Ok(b) if b.records.is_empty() => {
                        pos = b.next;
                        // Nothing for a while: a ping, so a peer that vanished is noticed.
                        if sink.send(Message::Ping(Default::default())).await.is_err() {
                            return gauge.dec();
                        }
                    }
                    Ok(b) => {
                        credit -= b.records.len() as u64;
                        let mut out = BytesMut::new();
                        out.put_slice(b"{\"records\":[");
                        for (i, r) in b.records.iter().enumerate() {
                            if i > 0 {
                                out.put_u8(b',');
                            }
                            out.put_slice(&r.json);
                        }
                        out.put_slice(b"],\"cursor\":");
                        out.put_slice(serde_json::Value::String(cursor_string(&b.next)).to_string().as_bytes());
                        out.put_u8(b'}');
                        pos = b.next;
                        let text = String::from_utf8(out.to_vec()).unwrap_or_default();
                        if sink.send(Message::text(text)).await.is_err() {
                            return gauge.dec();
                        }
                    }
                    Err(e) => {
                        // Said, then closed (retention overtook the subscriber, ...).
                        let (resp, _) = error(e);
                        let body = http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let text = String::from_utf8_lossy(&body).into_owned();
                        let _ = sink.send(Message::text(text)).await;
                        break close(CloseCode::Policy, "read failed; see the error message");
                    }
                },
            }
        };
        let _ = sink.send(end).await;
        let _ = sink.close().await;
        gauge.dec();
    });
    let sub = (!offered.is_empty()).then_some(SUBPROTOCOL);
    (switching(&key, sub), "upgraded")
}

/// The records a `{"credit": N}` message grants.
fn grant(text: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    v.get("credit")?.as_u64()
}
