//! Kafka REST Proxy v3 produce compatibility (docs/http.md "Kafka REST v3"): the cluster and
//! topic listings clients call first, and `POST /v3/clusters/{cluster_id}/topics/{topic}/records`
//! with the v3 request and response shapes — one record per request, or a stream of records in
//! one chunked request answered one result each — with the same authentication, quotas and
//! durability as `/v1`. A topic is a stream; the cluster is this gateway, under the configured
//! id.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sluice_core::{
    Event, Ingest, IngestRequest, Principal, Protocol, Receipt, Rejection, StreamName,
};

use super::{ConnInfo, Ctx, read, status_of};

/// The routes under `/v3/`.
enum Route<'a> {
    Clusters,
    Cluster(&'a str),
    Topics(&'a str),
    Topic(&'a str, &'a str),
    Records(&'a str, &'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v3/clusters")?;
    let parts: Vec<&str> = rest.split('/').skip(1).collect();
    Some(match parts.as_slice() {
        [] | [""] => Route::Clusters,
        [c] => Route::Cluster(c),
        [c, "topics"] => Route::Topics(c),
        [c, "topics", t] => Route::Topic(c, t),
        [c, "topics", t, "records"] => Route::Records(c, t),
        _ => return None,
    })
}

/// Whether a path is the v3 API's.
pub(super) fn matches(path: &str) -> bool {
    path == "/v3/clusters" || path.starts_with("/v3/clusters/")
}

/// A v3 error body: `{"error_code": …, "message": …}` with the HTTP status as its code.
fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let body = json!({"error_code": status.as_u16(), "message": message.into()});
    let mut r = super::json_response(status, body.to_string());
    *r.status_mut() = status;
    r
}

fn rejection(r: &Rejection) -> Response<Full<Bytes>> {
    let mut resp = error(status_of(r), r.to_string());
    if let Some(after) = r.retry_after() {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp
}

/// Serves one `/v3/` request: the answer and its outcome for the request metric.
pub(super) async fn handle<I: Ingest>(
    req: Request<Incoming>,
    conn: &ConnInfo,
    ingest: Arc<I>,
    ctx: &Ctx,
) -> (Response<read::Body>, &'static str) {
    let whole = |r: Response<Full<Bytes>>, outcome| (r.map(read::Body::Left), outcome);
    let Some(cluster_id) = ctx.kafka_rest_cluster_id.clone() else {
        return whole(
            error(
                StatusCode::NOT_FOUND,
                "the Kafka REST v3 API is off (http.kafka_rest_cluster_id is empty)",
            ),
            "no_route",
        );
    };
    let path = req.uri().path().to_string();
    let Some(route) = route(&path) else {
        return whole(
            error(StatusCode::NOT_FOUND, format!("no route for {path}")),
            "no_route",
        );
    };
    let is_post = matches!(route, Route::Records(..));
    let allowed = if is_post { Method::POST } else { Method::GET };
    if req.method() != allowed {
        return whole(
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not allowed on {path}; use {allowed}", req.method()),
            ),
            "method_not_allowed",
        );
    }
    let principal = match super::authenticate(&req, conn, &*ingest, ctx).await {
        Ok(p) => p,
        Err(refused) => {
            let r = refused.rejection();
            return whole(rejection(&r), r.code());
        }
    };
    let id = match &route {
        Route::Clusters => None,
        Route::Cluster(c) | Route::Topics(c) | Route::Topic(c, _) | Route::Records(c, _) => {
            Some(*c)
        }
    };
    if let Some(c) = id
        && c != cluster_id.as_ref()
    {
        return whole(
            error(StatusCode::NOT_FOUND, format!("Cluster {c} not found")),
            "stream_not_found",
        );
    }
    let base = base_url(&req);
    let ok = |v: Value| whole(super::json_response(StatusCode::OK, v.to_string()), "ok");
    match route {
        Route::Clusters => ok(json!({
            "kind": "KafkaClusterList",
            "metadata": {"self": format!("{base}/v3/clusters"), "next": null},
            "data": [cluster(&base, &cluster_id)],
        })),
        Route::Cluster(_) => ok(cluster(&base, &cluster_id)),
        Route::Topics(_) => {
            let data: Vec<Value> = ingest
                .streams(&principal)
                .into_iter()
                .map(|s| topic(&base, &cluster_id, &s.name, s.partitions))
                .collect();
            ok(json!({
                "kind": "KafkaTopicList",
                "metadata": {"self": format!("{base}/v3/clusters/{cluster_id}/topics"), "next": null},
                "data": data,
            }))
        }
        Route::Topic(_, name) => match describe(&*ingest, &principal, name) {
            Ok(partitions) => ok(topic(&base, &cluster_id, name, partitions)),
            Err(r) => whole(rejection(&r), r.code()),
        },
        Route::Records(_, name) => {
            let name = name.to_string();
            produce(req, principal, &name, &cluster_id, ingest, ctx).await
        }
    }
}

/// A topic's partition count, if the principal may produce to it or read it.
fn describe<I: Ingest>(ingest: &I, principal: &Principal, name: &str) -> Result<u32, Rejection> {
    if let Some(s) = ingest
        .streams(principal)
        .into_iter()
        .find(|s| s.name == name)
    {
        return Ok(s.partitions);
    }
    let stream = StreamName::parse(name)?;
    let admission = ingest.admit(principal, &stream)?;
    Ok(admission.settings().partitions)
}

fn base_url(req: &Request<Incoming>) -> String {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("localhost");
    format!("http://{host}")
}

fn cluster(base: &str, id: &str) -> Value {
    let me = format!("{base}/v3/clusters/{id}");
    let related = |p: &str| json!({"related": format!("{me}/{p}")});
    json!({
        "kind": "KafkaCluster",
        "metadata": {"self": me, "resource_name": format!("crn:///kafka={id}")},
        "cluster_id": id,
        "controller": null,
        "acls": related("acls"),
        "brokers": related("brokers"),
        "broker_configs": related("broker-configs"),
        "consumer_groups": related("consumer-groups"),
        "topics": related("topics"),
        "partition_reassignments": related("topics/-/partitions/-/reassignment"),
    })
}

fn topic(base: &str, cluster_id: &str, name: &str, partitions: u32) -> Value {
    let me = format!("{base}/v3/clusters/{cluster_id}/topics/{name}");
    let related = |p: &str| json!({"related": format!("{me}/{p}")});
    json!({
        "kind": "KafkaTopic",
        "metadata": {"self": me, "resource_name": format!("crn:///kafka={cluster_id}/topic={name}")},
        "cluster_id": cluster_id,
        "topic_name": name,
        "is_internal": false,
        "replication_factor": 0,
        "partitions_count": partitions,
        "partitions": related("partitions"),
        "configs": related("configs"),
        "partition_reassignments": related("partitions/-/reassignment"),
    })
}

/// One v3 produce record.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProduceRecord<'a> {
    #[serde(default)]
    partition_id: Option<u32>,
    #[serde(default)]
    headers: Vec<RecordHeader>,
    #[serde(default, borrow)]
    key: Option<Data<'a>>,
    #[serde(default, borrow)]
    value: Option<Data<'a>>,
    #[serde(default)]
    timestamp: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordHeader {
    name: String,
    /// Base64 of the header's bytes (null: empty).
    #[serde(default)]
    value: Option<String>,
}

/// A key or value: its serialization type and data.
#[derive(Deserialize)]
struct Data<'a> {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    /// Schema Registry references: not supported.
    #[serde(default)]
    schema_id: Option<Value>,
    #[serde(default)]
    subject: Option<Value>,
    #[serde(default)]
    schema_version: Option<Value>,
    #[serde(default)]
    subject_name_strategy: Option<Value>,
    #[serde(default)]
    schema: Option<Value>,
}

/// What a key or value was: its type and size, for the answer.
#[derive(Clone, Copy)]
struct Shape {
    kind: &'static str,
    size: usize,
}

/// The bytes of a key or value as its type says: BINARY is base64, JSON is JSON text, STRING a
/// string; no type means JSON.
fn bytes_of(what: &str, d: Option<&Data<'_>>) -> Result<Option<(Bytes, Shape)>, String> {
    let Some(d) = d else { return Ok(None) };
    if d.schema_id.is_some()
        || d.subject.is_some()
        || d.schema_version.is_some()
        || d.subject_name_strategy.is_some()
        || d.schema.is_some()
    {
        return Err(format!(
            "{what}: Schema Registry formats are not supported; send BINARY, JSON or STRING"
        ));
    }
    let Some(raw) = d.data else { return Ok(None) };
    let kind = d.kind.as_deref().unwrap_or("JSON").to_ascii_uppercase();
    let (bytes, kind) = match kind.as_str() {
        "JSON" => (Bytes::copy_from_slice(raw.get().as_bytes()), "JSON"),
        "BINARY" => {
            let text: String = serde_json::from_str(raw.get())
                .map_err(|_| format!("{what}: BINARY data must be a base64 string"))?;
            let b = base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map_err(|e| format!("{what}: BINARY data is not base64: {e}"))?;
            (Bytes::from(b), "BINARY")
        }
        "STRING" => {
            let text: String = serde_json::from_str(raw.get())
                .map_err(|_| format!("{what}: STRING data must be a string"))?;
            (Bytes::from(text), "STRING")
        }
        other => {
            return Err(format!(
                "{what}: type {other} is not supported; send BINARY, JSON or STRING"
            ));
        }
    };
    let size = bytes.len();
    Ok(Some((bytes, Shape { kind, size })))
}

/// A record's event and the shapes of its key and value.
type Parsed = (Event, Option<Shape>, Option<Shape>);

fn parse_record(raw: &RawValue) -> Result<Parsed, String> {
    let r: ProduceRecord<'_> =
        serde_json::from_str(raw.get()).map_err(|e| format!("invalid produce record: {e}"))?;
    let key = bytes_of("key", r.key.as_ref())?;
    let value = bytes_of("value", r.value.as_ref())?;
    let mut headers = Vec::with_capacity(r.headers.len() + 1);
    if r.headers.len() > sluice_core::MAX_HEADERS_PER_EVENT {
        return Err(format!(
            "more than {} headers; that is the most a record may have",
            sluice_core::MAX_HEADERS_PER_EVENT
        ));
    }
    for h in r.headers {
        if h.name.is_empty() {
            return Err("header names must not be empty".into());
        }
        sluice_core::check_header_name(h.name.as_bytes())?;
        let v = match h.value {
            None => Bytes::new(),
            Some(b64) => Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| format!("header `{}`: the value is not base64: {e}", h.name))?,
            ),
        };
        headers.push((Bytes::from(h.name), v));
    }
    // The value's media type, as the record's own header when it is not the batch's JSON.
    match value.as_ref().map(|(_, s)| s.kind) {
        Some("BINARY") => headers.push((
            Bytes::from_static(b"content-type"),
            Bytes::from_static(b"application/octet-stream"),
        )),
        Some("STRING") => headers.push((
            Bytes::from_static(b"content-type"),
            Bytes::from_static(b"text/plain; charset=utf-8"),
        )),
        _ => {}
    }
    let timestamp_ms = r
        .timestamp
        .as_deref()
        .map(sluice_core::parse_timestamp)
        .transpose()?;
    let (key, key_shape) = key.map_or((None, None), |(b, s)| (Some(b), Some(s)));
    let (value, value_shape) = value.map_or((Bytes::new(), None), |(b, s)| (b, Some(s)));
    Ok((
        Event {
            key,
            id: None,
            headers,
            value,
            timestamp_ms,
            partition: r.partition_id,
        },
        key_shape,
        value_shape,
    ))
}

/// The answer to one record.
fn result_json(
    cluster_id: &str,
    topic: &str,
    shapes: (Option<Shape>, Option<Shape>),
    timestamp_ms: i64,
    receipt: &Receipt,
) -> (StatusCode, Value) {
    let shape = |s: Option<Shape>| s.map(|s| json!({"type": s.kind, "size": s.size}));
    match receipt {
        Receipt::Failed(r) => (
            status_of(r),
            json!({"error_code": status_of(r).as_u16(), "message": r.to_string()}),
        ),
        Receipt::DeadLettered {
            stream,
            partition,
            offset,
            reason,
        } => (
            StatusCode::OK,
            json!({
                "error_code": 200,
                "cluster_id": cluster_id,
                "topic_name": &**stream,
                "partition_id": partition,
                "offset": offset.map_or(-1, |o| o as i64),
                "timestamp": sluice_core::format_timestamp(timestamp_ms),
                "key": shape(shapes.0),
                "value": shape(shapes.1),
                "dead_letter_reason": &**reason,
            }),
        ),
        r => {
            let (partition, offset) = r.position().expect("not failed");
            let mut v = json!({
                "error_code": 200,
                "cluster_id": cluster_id,
                "topic_name": topic,
                "partition_id": partition,
                // -1 (Kafka's "unknown") where the ack comes before the offset is known:
                // streams with ack = "received" or "spooled".
                "offset": offset.map_or(-1, |o| o as i64),
                "timestamp": sluice_core::format_timestamp(timestamp_ms),
                "key": shape(shapes.0),
                "value": shape(shapes.1),
            });
            if matches!(r, Receipt::Duplicate { .. }) {
                v["duplicate"] = json!(true);
            }
            (StatusCode::OK, v)
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Takes a batch of records (each its JSON, or why it could not be read) into the stream:
/// the HTTP status and JSON result of each, in order.
async fn take<I: Ingest>(
    ingest: &I,
    principal: &Principal,
    stream: &StreamName,
    records: Vec<&RawValue>,
    cluster_id: &str,
    topic: &str,
    trace: Option<sluice_core::TraceHeaders>,
) -> Vec<(StatusCode, Value)> {
    let mut events = Vec::with_capacity(records.len());
    let mut shapes = Vec::with_capacity(records.len());
    let mut invalid = Vec::new();
    for (i, raw) in records.iter().enumerate() {
        match parse_record(raw) {
            Ok((e, k, v)) => {
                shapes.push((k, v, e.timestamp_ms));
                events.push(e);
            }
            Err(m) => invalid.push((i, Rejection::Malformed { message: m })),
        }
    }
    if !invalid.is_empty() {
        ingest
            .metrics()
            .rejected(Protocol::Http.as_str(), "malformed", invalid.len() as u64);
    }
    let receipts = if events.is_empty() {
        Vec::new()
    } else {
        // Admitted per batch: a long stream of records follows permission changes.
        let n = events.len();
        let bytes: usize = events.iter().map(Event::charge).sum();
        let outcome = async {
            let admission = ingest.admit(principal, stream)?;
            let reservation = ingest.budget().try_reserve(bytes)?;
            ingest
                .ingest(IngestRequest {
                    admission,
                    protocol: Protocol::Http,
                    content_type: Bytes::from_static(b"application/json"),
                    record_headers: Vec::new(),
                    events,
                    reservation,
                    queued: None,
                    trace,
                })
                .await
        }
        .await;
        match outcome {
            Ok(receipts) => receipts,
            Err(r) => vec![Receipt::Failed(r); n],
        }
    };
    let now = now_ms();
    let receipts = super::with_invalid(receipts, invalid);
    let mut shapes = shapes.into_iter();
    receipts
        .iter()
        .map(|r| {
            let (k, v, ts) = match r {
                Receipt::Failed(_) => (None, None, None),
                _ => shapes.next().unwrap_or((None, None, None)),
            };
            result_json(cluster_id, topic, (k, v), ts.unwrap_or(now), r)
        })
        .collect()
}

/// `POST …/topics/{topic}/records`: a request with a `Content-Length` holds one record and is
/// answered with its result (the HTTP status its `error_code`); a chunked request is a stream
/// of records, taken as they arrive and answered one result each, in order, on a response that
/// streams too (HTTP 200; each result has its own `error_code`), as Confluent REST Proxy's
/// streaming mode.
async fn produce<I: Ingest>(
    req: Request<Incoming>,
    principal: Principal,
    topic: &str,
    cluster_id: &Arc<str>,
    ingest: Arc<I>,
    ctx: &Ctx,
) -> (Response<read::Body>, &'static str) {
    let whole = |r: Response<Full<Bytes>>, outcome| (r.map(read::Body::Left), outcome);
    let stream = match StreamName::parse(topic) {
        Ok(s) => s,
        Err(r) => return whole(rejection(&r), r.code()),
    };
    let settings = match ingest.admit(&principal, &stream) {
        Ok(a) => *a.settings(),
        Err(r) => return whole(rejection(&r), r.code()),
    };
    // Bounded concurrency, as /v1: a stream of records holds its place until it ends.
    let Ok(slot) = ctx.concurrency.try_reserve(1) else {
        let r = Rejection::unavailable(
            Duration::from_secs(1),
            "the gateway is handling its maximum number of concurrent requests",
        );
        return whole(rejection(&r), r.code());
    };
    // A record's JSON: its event at most, base64 and JSON framing included.
    let max_record = settings.max_event_bytes as usize * 4 / 3 + 64 * 1024;
    let streaming = !req.headers().contains_key(http::header::CONTENT_LENGTH);
    let trace = super::trace_headers(req.headers());
    let body = req.into_body();
    if !streaming {
        let collected = tokio::time::timeout(
            ctx.body_timeout,
            http_body_util::Limited::new(body, max_record).collect(),
        )
        .await;
        let bytes = match collected {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => {
                let r = Rejection::TooLarge {
                    message: format!("the record could not be read within {max_record} bytes: {e}"),
                };
                return whole(rejection(&r), r.code());
            }
            Err(_) => {
                let r = Rejection::Malformed {
                    message: "the request body did not arrive in time".into(),
                };
                return whole(rejection(&r), r.code());
            }
        };
        let raw: &RawValue = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                let r = Rejection::Malformed {
                    message: format!("invalid JSON: {e}"),
                };
                return whole(rejection(&r), r.code());
            }
        };
        let mut results = take(
            &*ingest,
            &principal,
            &stream,
            vec![raw],
            cluster_id,
            topic,
            trace,
        )
        .await;
        let (status, v) = results.pop().expect("one record");
        let outcome = if status == StatusCode::OK {
            "ok"
        } else {
            "rejected"
        };
        return whole(super::json_response(status, v.to_string()), outcome);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let (cluster_id, topic) = (cluster_id.clone(), topic.to_string());
    let idle = ctx.body_timeout;
    let max_events = (settings.max_events_per_request as usize).max(1);
    tokio::spawn(async move {
        let _slot = slot;
        let ingest = &*ingest;
        let say = |v: Value| Bytes::from(v.to_string() + "\n");
        // A client that stops reading its answers is not waited for longer than it may stay
        // quiet while sending: the stream ends (and its slot is freed).
        let send = |b: Bytes| {
            let tx = tx.clone();
            async move { matches!(tokio::time::timeout(idle, tx.send(b)).await, Ok(Ok(()))) }
        };
        let mut body = body;
        let mut buf = BytesMut::new();
        loop {
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Ok(Some(Ok(f))) => f,
                Ok(None) => break,
                Ok(Some(Err(_))) | Err(_) => {
                    let _ = send(say(json!({"error_code": 400, "message": "the record stream broke off or went quiet"})))
                        .await;
                    return;
                }
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            let frozen = buf.split().freeze();
            let mut used = 0;
            let mut fatal = None;
            {
                let mut records = Vec::new();
                let mut it = serde_json::Deserializer::from_slice(&frozen).into_iter::<&RawValue>();
                loop {
                    match it.next() {
                        Some(Ok(raw)) => {
                            records.push(raw);
                            used = it.byte_offset();
                        }
                        Some(Err(e)) if e.is_eof() => break,
                        Some(Err(e)) => {
                            fatal = Some(e.to_string());
                            break;
                        }
                        None => break,
                    }
                }
                for chunk in records.chunks(max_events) {
                    let results = take(
                        ingest,
                        &principal,
                        &stream,
                        chunk.to_vec(),
                        &cluster_id,
                        &topic,
                        trace.clone(),
                    )
                    .await;
                    let mut out = String::new();
                    for (_, v) in results {
                        out.push_str(&v.to_string());
                        out.push('\n');
                    }
                    if !send(Bytes::from(out)).await {
                        return;
                    }
                }
            }
            if let Some(e) = fatal {
                let _ = send(say(json!({"error_code": 400, "message": format!("invalid JSON in the record stream: {e}")})))
                    .await;
                return;
            }
            let rest = &frozen[used..];
            if rest.len() > max_record {
                let _ = send(say(json!({"error_code": 413, "message": format!("a record passes {max_record} bytes")})))
                    .await;
                return;
            }
            buf.extend_from_slice(rest);
        }
        if !buf.iter().all(u8::is_ascii_whitespace) {
            let _ = send(say(
                json!({"error_code": 400, "message": "the record stream ended inside a record"}),
            ))
            .await;
        }
    });
    let mut resp = Response::new(read::Body::Right(read::SseBody::new(rx)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    (resp, "ok")
}
