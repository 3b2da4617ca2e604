//! HTTP ingest: `POST /v1/streams/{stream}/events` over HTTP/1.1 and h2c.
//!
//! The wire format is documented in docs/http.md.

pub mod body;
pub mod cloudevents;
pub mod cors;
pub mod read;
pub mod rest_v3;
pub mod ws;
mod ws_read;

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, TRANSFER_ENCODING,
};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use sluice_auth::Credentials;
use sluice_core::{Ingest, IngestRequest, Principal, Protocol, Receipt, Rejection, StreamName};
use tokio::net::TcpListener;

use crate::gate::{Gate, Refused};
use crate::server::{self, ConnInfo, ServerOptions};
use body::BodyFormat;

/// Settings of the HTTP ingest listener.
#[derive(Clone)]
pub struct HttpOptions {
    pub server: ServerOptions,
    /// A request body must arrive completely within this time.
    pub body_read_timeout: Duration,
    /// Authenticates the producers of the HTTP API and WebSocket ingest on this listener.
    pub gate: Gate,
    /// Requests handled at once (one unit each; resizable); more get 503 with Retry-After.
    pub concurrency: sluice_core::Budget,
    /// WebSocket ingest on this listener, when enabled.
    pub websocket: Option<ws::WsOptions>,
    /// MQTT over WebSocket at `/mqtt`, when enabled, and MQTT's Maximum Packet Size.
    pub mqtt: Option<(Arc<dyn crate::mqtt::WsSessions>, u32)>,
    /// Origins a browser page may open WebSocket ingest or MQTT over WebSocket from
    /// (`websocket.allowed_origins`); empty: any.
    pub allowed_origins: Vec<String>,
    /// Live tails (SSE) open at once, in all and per principal.
    pub max_subscribers: usize,
    pub max_subscribers_per_principal: usize,
    /// A live tail without records sends a heartbeat comment this often.
    pub sse_heartbeat: Duration,
    /// Cross-origin requests from web pages; `None`: CORS off.
    pub cors: Option<Arc<cors::Cors>>,
    /// The cluster id the Kafka REST v3 API answers with (empty: the API is off).
    pub kafka_rest_cluster_id: String,
}

/// Request header carrying an API key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// Request header carrying the key of a raw (non-JSON) event.
pub const KEY_HEADER: &str = "sluice-key";
/// Request header carrying the id of a raw (non-JSON) event.
pub const ID_HEADER: &str = "sluice-id";
/// A raw event's producer timestamp (RFC 3339 or milliseconds since the epoch).
pub const TIMESTAMP_HEADER: &str = "sluice-timestamp";
/// A raw event's partition, chosen by the producer.
pub const PARTITION_HEADER: &str = "sluice-partition";
/// The request's idempotency key (IETF httpapi draft; a quoted sf-string or a bare token): a
/// retry with the same key is answered with the original's positions (docs/exactly-once.md).
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

const PROTO: &str = "http";

/// The OpenAPI document of every HTTP endpoint, served at `GET /openapi.yaml`.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

/// Serves HTTP ingest on `listener` until `shutdown`, then drains (see [`server::serve`]).
pub async fn serve<I: Ingest>(
    listener: TcpListener,
    ingest: Arc<I>,
    opts: HttpOptions,
    shutdown: impl Future<Output = ()>,
) {
    let gauge = ingest.metrics().connections_of(PROTO);
    let (ws_stop, ws_shutdown) = tokio::sync::watch::channel(false);
    let ctx = Arc::new(Ctx {
        body_timeout: opts.body_read_timeout,
        gate: opts.gate,
        concurrency: opts.concurrency,
        websocket: opts.websocket,
        mqtt_max_packet_bytes: opts.mqtt.as_ref().map_or(0, |(_, m)| *m as usize),
        mqtt: opts.mqtt.map(|(m, _)| m),
        allowed_origins: opts.allowed_origins,
        ws_sessions: Arc::new(tokio::sync::RwLock::new(())),
        ws_shutdown,
        kafka_rest_cluster_id: (!opts.kafka_rest_cluster_id.is_empty())
            .then(|| Arc::from(opts.kafka_rest_cluster_id.as_str())),
        subscribers: read::Subscribers {
            total: Arc::new(tokio::sync::Semaphore::new(opts.max_subscribers)),
            per_principal: server::Counted::new(opts.max_subscribers_per_principal),
            heartbeat: opts.sse_heartbeat,
        },
    });
    let sessions = ctx.ws_sessions.clone();
    let cors = opts.cors;
    let proxy = opts.server.proxy.clone();
    server::serve(
        listener,
        opts.server,
        gauge,
        move |req, conn: ConnInfo| {
            let (ingest, ctx, cors) = (ingest.clone(), ctx.clone(), cors.clone());
            // Behind a trusted balancer that names the client in forwarding headers, the
            // client's address is the request's peer (logs, failure limiting).
            let conn = match crate::proxy::forwarded_client(&proxy, conn.peer, req.headers()) {
                Some(ip) => ConnInfo {
                    peer: std::net::SocketAddr::new(ip, 0),
                    ..conn
                },
                None => conn,
            };
            async move {
                let Some(cors) = cors else {
                    return route(req, conn, ingest, ctx).await;
                };
                // Preflights are answered before any authentication.
                if let Some(r) = cors.preflight(req.method(), req.headers()) {
                    ingest.metrics().request(PROTO, "preflight");
                    return r.map(read::Body::Left);
                }
                let origin = req.headers().get(http::header::ORIGIN).cloned();
                let mut resp = route(req, conn, ingest, ctx).await;
                if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                    cors.decorate(origin.as_ref(), &mut resp);
                }
                resp
            }
        },
        async move {
            shutdown.await;
            // Upgraded sockets are no longer hyper's: tell them to finish and close.
            ws_stop.send_replace(true);
        },
    )
    .await;
    // Wait for every WebSocket session to answer what it read and close.
    let _ = sessions.write().await;
}

/// Routes one request of the HTTP listener.
async fn route<I: Ingest>(
    req: Request<Incoming>,
    conn: ConnInfo,
    ingest: Arc<I>,
    ctx: Arc<Ctx>,
) -> Response<read::Body> {
    if req.uri().path() == "/mqtt" {
        let (resp, outcome) = ws::upgrade_mqtt(req, conn, ctx).await;
        if outcome != "upgraded" {
            ingest.metrics().request("mqtt", outcome);
        }
        return resp.map(read::Body::Left);
    }
    if let Some(stream) = ws_read::route(req.uri().path()) {
        let stream = stream.to_string();
        let (resp, outcome) = ws_read::upgrade(req, conn, &stream, ingest.clone(), ctx).await;
        if outcome != "upgraded" {
            ingest.metrics().request("http_read", outcome);
        }
        return resp.map(read::Body::Left);
    }
    if let Some(stream) = ws::route(req.uri().path()) {
        let stream = stream.map(str::to_string);
        let (resp, outcome) = ws::upgrade(req, conn, stream, ingest.clone(), ctx).await;
        if outcome != "upgraded" {
            ingest.metrics().request("websocket", outcome);
        }
        return resp.map(read::Body::Left);
    }
    if req.method() == Method::GET
        && read::wants_sse(&req)
        && let Some(stream) = events_route(req.uri().path())
    {
        let stream = stream.to_string();
        let (resp, outcome) = tail(req, conn, &stream, ingest.clone(), &ctx).await;
        ingest.metrics().request("http_read", outcome);
        return resp;
    }
    if rest_v3::matches(req.uri().path()) {
        let (resp, outcome) = rest_v3::handle(req, &conn, ingest.clone(), &ctx).await;
        ingest.metrics().request(PROTO, outcome);
        return resp;
    }
    handle(req, conn, &*ingest, &ctx)
        .await
        .map(read::Body::Left)
}

/// What every request handler of one listener shares.
struct Ctx {
    body_timeout: Duration,
    gate: Gate,
    concurrency: sluice_core::Budget,
    websocket: Option<ws::WsOptions>,
    mqtt: Option<Arc<dyn crate::mqtt::WsSessions>>,
    mqtt_max_packet_bytes: usize,
    allowed_origins: Vec<String>,
    /// Every WebSocket session holds a read guard; the drain takes the write lock.
    ws_sessions: Arc<tokio::sync::RwLock<()>>,
    ws_shutdown: tokio::sync::watch::Receiver<bool>,
    /// Live tails open, in all and per principal.
    subscribers: read::Subscribers,
    /// The cluster id of the Kafka REST v3 API; `None`: the API is off.
    kafka_rest_cluster_id: Option<Arc<str>>,
}

/// The stream of `/v1/streams/{stream}/events`.
fn events_route(path: &str) -> Option<&str> {
    path.strip_prefix("/v1/streams/")
        .and_then(|rest| rest.strip_suffix("/events"))
}

/// A live tail (Server-Sent Events) of a stream (docs/consume.md).
async fn tail<I: Ingest>(
    req: Request<Incoming>,
    conn: ConnInfo,
    stream: &str,
    ingest: Arc<I>,
    ctx: &Ctx,
) -> (Response<read::Body>, &'static str) {
    let whole = |r: &Rejection| (rejection_response(r).map(read::Body::Left), r.code());
    let stream = match StreamName::parse(stream) {
        Ok(s) => s,
        Err(r) => return whole(&r),
    };
    // A tail lasts: its principal is checked again after reloads and at its expiry, like a
    // WebSocket session's.
    let query = ws::UpgradeCredentials::of_query(&req);
    let (principal, auth) = match ctx
        .gate
        .admit_session(
            PROTO,
            ingest.metrics(),
            &conn,
            query.credentials(&req, &conn),
        )
        .await
    {
        Ok(p) => p,
        Err(refused) => return whole(&refused.rejection()),
    };
    read::subscribe(
        &req,
        (principal, auth, ctx.gate.clone()),
        stream,
        ingest,
        &ctx.subscribers,
        ctx.ws_shutdown.clone(),
    )
    .await
}

async fn handle<I: Ingest>(
    req: Request<Incoming>,
    conn: ConnInfo,
    ingest: &I,
    ctx: &Ctx,
) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if req.method() == Method::GET && (path == "/console" || path == "/console/") {
        ingest.metrics().request(PROTO, "ok");
        return console();
    }
    if req.method() == Method::GET && path == "/openapi.yaml" {
        ingest.metrics().request(PROTO, "ok");
        let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/yaml"));
        return r;
    }
    if req.method() == Method::GET && path == "/v1/streams" {
        let (resp, outcome) = list_streams(req, &conn, ingest, ctx).await;
        ingest.metrics().request("http_read", outcome);
        return resp;
    }
    let Some(stream) = events_route(path) else {
        let message = format!("no route for {} {path}", req.method());
        return error_body(StatusCode::NOT_FOUND, "no_route", &message);
    };
    if req.method() != Method::POST && req.method() != Method::GET {
        let mut r = error_body(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!(
                "{} is not allowed here; POST appends, GET reads",
                req.method()
            ),
        );
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, POST"));
        return r;
    }
    let stream = stream.to_string();
    let metrics = ingest.metrics();
    // Bounded concurrency: past the limit, answer at once instead of queueing without bound.
    let Ok(_slot) = ctx.concurrency.try_reserve(1) else {
        let r = Rejection::unavailable(
            Duration::from_secs(1),
            "the gateway is handling its maximum number of concurrent requests",
        );
        metrics.request(PROTO, r.code());
        return rejection_response(&r);
    };
    let span = tracing::info_span!(
        "request",
        stream = %stream,
        principal = tracing::field::Empty
    );
    if req.method() == Method::GET {
        let (resp, outcome) =
            tracing::Instrument::instrument(consume(req, &conn, &stream, ingest, ctx), span).await;
        metrics.request("http_read", outcome);
        return resp;
    }
    match tracing::Instrument::instrument(publish(req, &conn, &stream, ingest, ctx), span).await {
        Ok((response, outcome)) => {
            metrics.request(PROTO, outcome);
            response
        }
        Err(rejection) => {
            metrics.request(PROTO, rejection.code());
            rejection_response(&rejection)
        }
    }
}

/// The principal of a read: from its headers, or (for EventSource, which cannot send headers)
/// the `api_key` or `access_token` query parameter, as WebSocket upgrades take them.
async fn authenticate_read<I: Ingest>(
    req: &Request<Incoming>,
    conn: &ConnInfo,
    ingest: &I,
    ctx: &Ctx,
) -> Result<Principal, Refused> {
    let query = ws::UpgradeCredentials::of_query(req);
    ctx.gate
        .admit(PROTO, ingest.metrics(), conn, query.credentials(req, conn))
        .await
}

/// `GET /v1/streams`: the streams the principal may read (docs/consume.md).
async fn list_streams<I: Ingest>(
    req: Request<Incoming>,
    conn: &ConnInfo,
    ingest: &I,
    ctx: &Ctx,
) -> (Response<Full<Bytes>>, &'static str) {
    let principal = match authenticate_read(&req, conn, ingest, ctx).await {
        Ok(p) => p,
        Err(refused) => {
            let r = refused.rejection();
            return (rejection_response(&r), r.code());
        }
    };
    let streams: Vec<serde_json::Value> = ingest
        .streams(&principal)
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name,
                "partitions": s.partitions,
                "records": s.records,
            })
        })
        .collect();
    let body = serde_json::json!({ "streams": streams }).to_string();
    (json_response(StatusCode::OK, body), "ok")
}

/// The console page (docs/consume.md): static, no data of its own; what it shows comes from
/// the read side with the credentials typed into it.
fn console() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(
        include_str!("console/index.html").as_bytes(),
    )));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

/// The request's principal, from its headers and the connection's client certificate.
async fn authenticate<I: Ingest>(
    req: &Request<Incoming>,
    conn: &ConnInfo,
    ingest: &I,
    ctx: &Ctx,
) -> Result<Principal, Refused> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let creds = Credentials {
        authorization: header(http::header::AUTHORIZATION.as_str()),
        api_key: header(API_KEY_HEADER),
        bearer: None,
        client_cert: conn.client_cert.as_deref(),
    };
    ctx.gate.admit(PROTO, ingest.metrics(), conn, creds).await
}

/// `GET /v1/streams/{stream}/events`: the stream's records (docs/consume.md).
async fn consume<I: Ingest>(
    req: Request<Incoming>,
    conn: &ConnInfo,
    stream: &str,
    ingest: &I,
    ctx: &Ctx,
) -> (Response<Full<Bytes>>, &'static str) {
    let stream = match StreamName::parse(stream) {
        Ok(s) => s,
        Err(r) => return (rejection_response(&r), r.code()),
    };
    let principal = match authenticate_read(&req, conn, ingest, ctx).await {
        Ok(p) => p,
        Err(refused) => {
            let r = refused.rejection();
            return (rejection_response(&r), r.code());
        }
    };
    tracing::Span::current().record("principal", principal.name());
    // A long poll does not hold the drain: when the listener shuts down it is answered 503
    // (nothing is lost by dropping a read), and the client resumes from its cursor elsewhere.
    let mut shutdown = ctx.ws_shutdown.clone();
    tokio::select! {
        r = read::fetch(&req, &principal, stream, ingest) => r,
        _ = shutdown.wait_for(|stop| *stop) => {
            let r = Rejection::unavailable(
                Duration::from_secs(1),
                "the gateway is shutting down; read again from the same position",
            );
            (rejection_response(&r), r.code())
        }
    }
}

async fn publish<I: Ingest>(
    req: Request<Incoming>,
    conn: &ConnInfo,
    stream: &str,
    ingest: &I,
    ctx: &Ctx,
) -> Result<(Response<Full<Bytes>>, &'static str), Rejection> {
    let stream = StreamName::parse(stream)?;
    let principal = match authenticate(&req, conn, ingest, ctx).await {
        Ok(p) => p,
        Err(Refused::Auth(f)) => return Err(Rejection::from(f)),
        Err(refused @ Refused::Connections(_)) => {
            let r = refused.rejection();
            // The connection could not be counted against its principal, so it is closed.
            let mut resp = rejection_response(&r);
            resp.headers_mut()
                .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            return Ok((resp, r.code()));
        }
    };
    tracing::Span::current().record("principal", principal.name());
    let admission = ingest.admit(&principal, &stream)?;
    // Whatever the answer, it carries the quotas' state when the stream has quotas.
    let rate_limits = admission.rate_limits().clone();
    let (mut response, outcome) = match publish_admitted(req, admission, ingest, ctx).await {
        Ok(answer) => answer,
        Err(r) => (rejection_response(&r), r.code()),
    };
    add_rate_limit_fields(response.headers_mut(), &rate_limits.get());
    Ok((response, outcome))
}

/// The IETF `RateLimit-Policy` and `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers):
/// one item per quota bucket that applied, e.g. `"stream-events";q=1000;w=1` and
/// `"stream-events";r=998;t=1`.
fn add_rate_limit_fields(headers: &mut http::HeaderMap, limits: &[sluice_core::RateLimit]) {
    if limits.is_empty() {
        return;
    }
    let join = |f: &dyn Fn(&sluice_core::RateLimit) -> String| {
        limits.iter().map(f).collect::<Vec<_>>().join(", ")
    };
    let policy = join(&|l| format!("\"{}\";q={};w={}", l.name, l.quota, l.window_secs));
    let state = join(&|l| format!("\"{}\";r={};t={}", l.name, l.remaining, l.reset_secs));
    for (name, value) in [("ratelimit-policy", policy), ("ratelimit", state)] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// The rest of [`publish`], once the stream admitted the principal.
async fn publish_admitted<I: Ingest>(
    req: Request<Incoming>,
    admission: sluice_core::Admission,
    ingest: &I,
    ctx: &Ctx,
) -> Result<(Response<Full<Bytes>>, &'static str), Rejection> {
    let body_timeout = ctx.body_timeout;
    let stream = admission.stream().clone();
    let limits = *admission.settings();

    let (parts, body) = req.into_parts();
    let header = |name| {
        parts
            .headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let coding = body::coding_of(header(CONTENT_ENCODING))?;
    let content_type = header(CONTENT_TYPE);
    let format = body::format_of(content_type);
    let declared_len = match header(CONTENT_LENGTH) {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| Rejection::Malformed {
            message: format!("invalid Content-Length `{v}`"),
        })?),
        None => None,
    };
    let chunked = parts.headers.contains_key(TRANSFER_ENCODING);
    if declared_len.is_none() && !chunked && parts.version < Version::HTTP_2 {
        return Err(Rejection::LengthRequired);
    }
    let max_body = limits.max_body_bytes;
    if let Some(n) = declared_len
        && n > max_body
    {
        return Err(too_large_body(n, max_body, &stream));
    }
    // Hold in-flight budget for the body before reading it, so concurrent uploads cannot hold
    // more memory than limits.max_in_flight_bytes: its declared length, or the stream's limit
    // when the length is unknown; compressed bodies also hold room for their decoded size.
    let raw_bound = declared_len.unwrap_or(max_body);
    let reserve = match coding {
        body::Coding::Identity => raw_bound,
        _ => raw_bound + max_body,
    };
    let mut reservation = ingest.budget().try_reserve(reserve as usize)?;
    let collected = tokio::time::timeout(
        body_timeout,
        Limited::new(body, max_body as usize).collect(),
    )
    .await
    .map_err(|_| Rejection::Malformed {
        message: format!(
            "the request body did not arrive within {} ms",
            body_timeout.as_millis()
        ),
    })?;
    let raw = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(Rejection::TooLarge {
                message: format!(
                    "the request body exceeds the limit of {max_body} bytes for stream `{stream}`"
                ),
            });
        }
        Err(e) => {
            return Err(Rejection::Malformed {
                message: format!("could not read the request body: {e}"),
            });
        }
    };
    // Decompressing and parsing a large body takes long enough to stall the async workers (and
    // with them every other connection), so it runs on the blocking pool.
    let body = off_the_runtime(
        raw.len() > INLINE_BODY_BYTES || coding != body::Coding::Identity,
        move || body::decode(coding, raw, max_body),
    )
    .await?;
    reservation.resize(body.len())?;
    if body.is_empty() {
        return Err(Rejection::Malformed {
            message: "the request body is empty".into(),
        });
    }
    let max_events = limits.max_events_per_request;
    let json = |body: Bytes,
                parse: fn(
        &Bytes,
        body::EventLimit<'_>,
    ) -> Result<Vec<sluice_core::Event>, Rejection>| {
        let name = stream.clone();
        off_the_runtime(body.len() > INLINE_BODY_BYTES, move || {
            let limit = body::EventLimit {
                max: max_events,
                stream: name.as_str(),
            };
            parse(&body, limit)
        })
    };
    // Events a CloudEvents batch holds that are not valid CloudEvents, by index: answered
    // alone, while the others go on.
    let mut invalid: Vec<(usize, Rejection)> = Vec::new();
    let (mut events, stored_type) = match format {
        BodyFormat::CloudEvent => (
            vec![cloudevents::parse_structured(&body)?],
            Bytes::from_static(b"application/json"),
        ),
        BodyFormat::CloudEventBatch => {
            let name = stream.clone();
            let parsed = off_the_runtime(body.len() > INLINE_BODY_BYTES, move || {
                let limit = body::EventLimit {
                    max: max_events,
                    stream: name.as_str(),
                };
                cloudevents::parse_batch(&body, limit)
            })
            .await?;
            let events;
            (events, invalid) = cloudevents::split(parsed);
            if !invalid.is_empty() {
                ingest.metrics().rejected(
                    Protocol::Http.as_str(),
                    "malformed",
                    invalid.len() as u64,
                );
            }
            if events.is_empty() {
                return Err(invalid.swap_remove(0).1);
            }
            (events, Bytes::from_static(b"application/json"))
        }
        BodyFormat::Raw if parts.headers.contains_key(cloudevents::SPECVERSION_HEADER) => (
            vec![cloudevents::from_binary(&parts.headers, body)?],
            Bytes::copy_from_slice(
                content_type
                    .unwrap_or("application/octet-stream")
                    .as_bytes(),
            ),
        ),
        BodyFormat::Json => (
            json(body, body::parse_json).await?,
            Bytes::from_static(b"application/json"),
        ),
        BodyFormat::Ndjson => (
            json(body, body::parse_ndjson).await?,
            Bytes::from_static(b"application/json"),
        ),
        BodyFormat::Raw => {
            let event = sluice_core::Event {
                key: header_bytes(&parts.headers, KEY_HEADER),
                id: header_bytes(&parts.headers, ID_HEADER),
                headers: Vec::new(),
                value: body,
                timestamp_ms: raw_timestamp(&parts.headers)?,
                partition: raw_partition(&parts.headers)?,
            };
            let ct = content_type.unwrap_or("application/octet-stream");
            (vec![event], Bytes::copy_from_slice(ct.as_bytes()))
        }
    };
    if let Some(k) = parts.headers.get(IDEMPOTENCY_KEY_HEADER) {
        sluice_core::apply_idempotency_key(unquote(k.as_bytes()), &mut events)?;
    }
    let receipts = ingest
        .ingest(IngestRequest {
            admission,
            protocol: Protocol::Http,
            content_type: stored_type,
            record_headers: Vec::new(),
            events,
            reservation,
            queued: None,
            trace: trace_headers(&parts.headers),
        })
        .await?;
    Ok(receipts_response(&with_invalid(receipts, invalid)))
}

/// The request's W3C trace context headers, when it has a `traceparent`.
pub(crate) fn trace_headers(h: &http::HeaderMap) -> Option<sluice_core::TraceHeaders> {
    sluice_core::TraceHeaders::from_values(
        h.get(sluice_core::TRACEPARENT).map(|v| v.as_bytes()),
        h.get(sluice_core::TRACESTATE).map(|v| v.as_bytes()),
    )
}

/// The answers of a request's valid events with its invalid events' refusals put back at their
/// places (their indexes, ascending), so every event is answered in request order.
pub(crate) fn with_invalid(
    receipts: Vec<Receipt>,
    invalid: Vec<(usize, Rejection)>,
) -> Vec<Receipt> {
    sluice_core::merge_receipts(receipts, invalid)
}

/// A raw event's `Sluice-Timestamp` (RFC 3339 or milliseconds since the epoch).
fn raw_timestamp(headers: &http::HeaderMap) -> Result<Option<i64>, Rejection> {
    let Some(v) = headers.get(TIMESTAMP_HEADER) else {
        return Ok(None);
    };
    let text = v.to_str().map_err(|_| Rejection::Malformed {
        message: format!("`{TIMESTAMP_HEADER}` must be text"),
    })?;
    sluice_core::parse_timestamp(text)
        .map(Some)
        .map_err(|m| Rejection::Malformed {
            message: format!("`{TIMESTAMP_HEADER}`: {m}"),
        })
}

/// A raw event's `Sluice-Partition`.
fn raw_partition(headers: &http::HeaderMap) -> Result<Option<u32>, Rejection> {
    let Some(v) = headers.get(PARTITION_HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .map(Some)
        .ok_or_else(|| Rejection::Malformed {
            message: format!("`{PARTITION_HEADER}` must be a partition number"),
        })
}

/// Bodies up to this size are decoded and parsed on the async worker; larger ones (and every
/// compressed one) on the blocking pool.
const INLINE_BODY_BYTES: usize = 64 * 1024;

/// Runs `work` on the blocking pool when `heavy`, inline otherwise.
async fn off_the_runtime<T: Send + 'static>(
    heavy: bool,
    work: impl FnOnce() -> Result<T, Rejection> + Send + 'static,
) -> Result<T, Rejection> {
    if !heavy {
        return work();
    }
    tokio::task::spawn_blocking(work).await.unwrap_or_else(|e| {
        Err(Rejection::Internal {
            message: format!("decoding the body failed: {e}"),
        })
    })
}

/// An sf-string's contents (`"abc"` → `abc`), or the value as it is.
fn unquote(v: &[u8]) -> &[u8] {
    match v {
        [b'"', inner @ .., b'"'] => inner,
        _ => v,
    }
}

fn header_bytes(headers: &http::HeaderMap, name: &str) -> Option<Bytes> {
    headers
        .get(name)
        .map(|v| Bytes::copy_from_slice(v.as_bytes()))
}

fn too_large_body(n: u64, max: u64, stream: &StreamName) -> Rejection {
    Rejection::TooLarge {
        message: format!(
            "the request body has {n} bytes; the limit for stream `{stream}` is {max}"
        ),
    }
}

/// 200 with one result per event (202 when every event was only queued); when every event
/// failed, the first failure's status.
fn receipts_response(receipts: &[Receipt]) -> (Response<Full<Bytes>>, &'static str) {
    let failed = receipts
        .iter()
        .filter(|r| matches!(r, Receipt::Failed(_)))
        .count();
    if failed == receipts.len()
        && let Some(Receipt::Failed(first)) = receipts.first()
    {
        return (rejection_response(first), first.code());
    }
    let all_received = receipts.iter().all(|r| {
        matches!(
            r,
            Receipt::Received { .. }
                | Receipt::Duplicate {
                    offset: None,
                    spooled: false,
                    ..
                }
        )
    });
    let mut out = String::with_capacity(16 + receipts.len() * 32);
    out.push_str("{\"results\":[");
    for (i, r) in receipts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match r {
            Receipt::Appended { partition, offset } => {
                let _ = write!(out, "{{\"partition\":{partition},\"offset\":{offset}}}");
            }
            Receipt::Received { partition } => {
                let _ = write!(out, "{{\"partition\":{partition},\"status\":\"received\"}}");
            }
            Receipt::Spooled { partition } => {
                let _ = write!(out, "{{\"partition\":{partition},\"status\":\"spooled\"}}");
            }
            Receipt::Duplicate {
                partition,
                offset: Some(offset),
                ..
            } => {
                let _ = write!(
                    out,
                    "{{\"partition\":{partition},\"offset\":{offset},\"duplicate\":true}}"
                );
            }
            Receipt::Duplicate {
                partition,
                offset: None,
                spooled,
            } => {
                let status = if *spooled { "spooled" } else { "received" };
                let _ = write!(
                    out,
                    "{{\"partition\":{partition},\"status\":\"{status}\",\"duplicate\":true}}"
                );
            }
            Receipt::DeadLettered {
                stream,
                partition,
                offset,
                reason,
            } => {
                out.push_str(
                    &serde_json::json!({
                        "dead_letter": {"stream": &**stream, "partition": partition, "offset": offset},
                        "reason": &**reason,
                    })
                    .to_string(),
                );
            }
            Receipt::Failed(e) => {
                out.push_str(&error_json(e));
            }
        }
    }
    out.push(']');
    if failed > 0 {
        let _ = write!(out, ",\"failed\":{failed}");
    }
    out.push('}');
    let status = if all_received {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let outcome = if failed > 0 { "partial" } else { "ok" };
    (json_response(status, out), outcome)
}

/// The HTTP status of a rejection (DESIGN §3).
pub fn status_of(r: &Rejection) -> StatusCode {
    match r {
        Rejection::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
        Rejection::Forbidden { .. } => StatusCode::FORBIDDEN,
        Rejection::Malformed { .. } => StatusCode::BAD_REQUEST,
        Rejection::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::LengthRequired => StatusCode::LENGTH_REQUIRED,
        Rejection::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Rejection::NotFound { .. } => StatusCode::NOT_FOUND,
        Rejection::OverQuota { .. } => StatusCode::TOO_MANY_REQUESTS,
        Rejection::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Rejection::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error_json(r: &Rejection) -> String {
    let mut v = serde_json::json!({ "error": { "code": r.code(), "message": r.to_string() } });
    if let Some(after) = r.retry_after() {
        v["error"]["retry_after_ms"] = serde_json::json!(after.as_millis() as u64);
    }
    v.to_string()
}

/// The whole-request error response of a rejection.
pub fn rejection_response(r: &Rejection) -> Response<Full<Bytes>> {
    let mut resp = json_response(status_of(r), error_json(r));
    if let Some(after) = r.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if let Rejection::Unauthenticated {
        reason,
        invalid_token,
    } = r
    {
        // RFC 6750 §3: no error code when no credentials were presented.
        let challenge = if *invalid_token {
            let description: String = reason
                .chars()
                .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
                .collect();
            format!(
                "Bearer realm=\"sluice\", error=\"invalid_token\", error_description=\"{description}\""
            )
        } else {
            "Bearer realm=\"sluice\"".to_string()
        };
        if let Ok(v) = HeaderValue::from_str(&challenge) {
            resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
        }
    }
    resp
}

pub(crate) fn error_body(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let v = serde_json::json!({ "error": { "code": code, "message": message } });
    json_response(status, v.to_string())
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
