//! gRPC ingest: `sluice.v1.Ingest` (unary `Publish` and bidirectional `PublishStream`), plus
//! `grpc.health.v1.Health` and server reflection, on the shared connection loop (TLS, limits,
//! drain). The wire format is proto/sluice/v1/ingest.proto, documented in docs/grpc.md.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use hyper::body::Incoming;
use sluice_auth::Credentials;
use sluice_core::{
    Event, Ingest, Principal, Protocol, ReadBatch, ReadError, ReadFrom, ReadRequest, Receipt,
    Rejection, StreamName,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::CompressionEncoding;
use tonic::codegen::Service;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::gate::{Gate, Revoked, SessionAuth};
use crate::lanes::{self, Lanes};
use crate::server::{self, ConnInfo, ServerOptions};

/// Messages and services generated from proto/sluice/v1/ingest.proto.
pub mod codec;

pub mod pb {
    tonic::include_proto!("sluice.v1");

    /// The encoded descriptor set of the proto (served by reflection).
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/sluice_v1_descriptor.bin"));
}

use pb::ingest_server::{Ingest as IngestService, IngestServer};

const PROTO: &str = "grpc";

/// Metadata key carrying an API key.
pub const API_KEY_METADATA: &str = "x-api-key";

/// Settings of the gRPC listener.
#[derive(Clone)]
pub struct GrpcOptions {
    pub server: ServerOptions,
    /// Authenticates the producers of this listener.
    pub gate: Gate,
    /// Largest message either way, after decompression.
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    /// Batches of one `PublishStream` call in flight.
    pub max_batches_in_flight: usize,
    /// Whether the gateway is ready (reported by `grpc.health.v1.Health`).
    pub ready: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// Serves gRPC on `listener` until `shutdown`, then drains like every listener.
pub async fn serve<I: Ingest>(
    listener: TcpListener,
    ingest: Arc<I>,
    opts: GrpcOptions,
    shutdown: impl Future<Output = ()>,
) {
    let gauge = ingest.metrics().connections_of(PROTO);
    let limit = opts.max_message_bytes;
    let metrics_of_gate = Arc::new(ingest.metrics().clone());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let service = GrpcIngest {
        ingest,
        gate: opts.gate.clone(),
        max_batches_in_flight: opts.max_batches_in_flight,
        max_message_bytes: limit,
        stop,
    };
    let ingest_svc = IngestServer::new(service)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let (reporter, health_svc) = tonic_health::server::health_reporter();
    // The drain's signal goes to the health reporter as well as to the connection loop.
    let shutdown = futures_util::FutureExt::shared(Box::pin(shutdown));
    let health = report_health(reporter, opts.ready.clone(), shutdown.clone());
    let stopping = shutdown.clone();
    let health = async move {
        tokio::join!(health, async move {
            stopping.await;
            stop_tx.send_replace(true);
        });
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().expect("valid descriptors");
    let reflection_v1alpha = reflection().build_v1alpha().expect("valid descriptors");
    let streams = opts.max_concurrent_streams;
    let (gate, metrics) = (opts.gate.clone(), metrics_of_gate);
    let server = server::serve_with(
        listener,
        opts.server,
        gauge,
        move |req: Request<Incoming>, conn: ConnInfo| {
            let mut ingest_svc = ingest_svc.clone();
            let mut health_svc = health_svc.clone();
            let mut reflection_v1 = reflection_v1.clone();
            let mut reflection_v1alpha = reflection_v1alpha.clone();
            let (gate, metrics) = (gate.clone(), metrics.clone());
            async move {
                let path = req.uri().path().to_string();
                let resp = if path.starts_with("/sluice.v1.Ingest/") {
                    // Authenticate from the call's headers before tonic reads and decodes the
                    // message: an unauthenticated client cannot make the gateway decode
                    // anything.
                    match authenticate_call(&gate, &metrics, &req, &conn).await {
                        Ok((principal, session)) => {
                            let mut req = req.map(tonic::body::Body::new);
                            req.extensions_mut().insert(conn);
                            req.extensions_mut().insert(principal);
                            if let Some(session) = session {
                                req.extensions_mut().insert(session);
                            }
                            ingest_svc.call(req).await
                        }
                        Err(status) => Ok(status.into_http()),
                    }
                } else if path.starts_with("/grpc.health.v1.Health/") {
                    let req = req.map(tonic::body::Body::new);
                    health_svc.call(req).await
                } else if path.starts_with("/grpc.reflection.v1.ServerReflection/") {
                    reflection_v1.call(req.map(tonic::body::Body::new)).await
                } else if path.starts_with("/grpc.reflection.v1alpha.ServerReflection/") {
                    reflection_v1alpha
                        .call(req.map(tonic::body::Body::new))
                        .await
                } else {
                    Ok(Status::unimplemented(format!("no gRPC method {path}")).into_http())
                };
                match resp {
                    Ok(r) => r,
                    Err(never) => match never {},
                }
            }
        },
        shutdown,
        |b| {
            b.http2()
                .max_concurrent_streams(streams)
                // Room for a whole maximum-size message per stream window.
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20);
        },
    );
    tokio::join!(server, health);
}

/// Keeps `grpc.health.v1.Health` in step with the gateway's readiness: the overall service ("")
/// and `sluice.v1.Ingest` are SERVING while ready. When the drain starts, watchers get
/// NOT_SERVING and then the end of their `Watch` stream: a watch (what load balancers and gRPC
/// clients' health checking keep open) must not hold the drain until its deadline.
async fn report_health(
    mut reporter: tonic_health::server::HealthReporter,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    drain: impl Future<Output = ()>,
) {
    let services = ["", pb::ingest_server::SERVICE_NAME];
    let mut last = None;
    tokio::pin!(drain);
    loop {
        let now = ready();
        if last != Some(now) {
            let status = if now {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for s in services {
                reporter.set_service_status(s, status).await;
            }
            last = Some(now);
        }
        if tokio::time::timeout(Duration::from_millis(200), drain.as_mut())
            .await
            .is_ok()
        {
            for s in services {
                reporter
                    .set_service_status(s, tonic_health::ServingStatus::NotServing)
                    .await;
                reporter.clear_service_status(s).await;
            }
            return;
        }
    }
}

/// The `sluice.v1.Ingest` implementation over an [`Ingest`] service.
struct GrpcIngest<I> {
    ingest: Arc<I>,
    /// Checks `PublishStream` and `Subscribe` principals again after reloads and at their
    /// expiry.
    gate: Gate,
    max_batches_in_flight: usize,
    /// Largest message: a `Subscribe` response stays within it.
    max_message_bytes: usize,
    /// Set when the drain starts: `Subscribe` calls end (they would hold the drain).
    stop: tokio::sync::watch::Receiver<bool>,
}

/// The principal of a `sluice.v1.Ingest` call, from its headers and the connection's client
/// certificate, before anything of its body is read; for a `PublishStream` call also what the
/// stream needs to check it again while it lasts.
async fn authenticate_call(
    gate: &Gate,
    metrics: &sluice_core::metrics::Metrics,
    req: &Request<Incoming>,
    conn: &ConnInfo,
) -> Result<(Principal, Option<SessionAuth>), Status> {
    let get = |k: &str| req.headers().get(k).and_then(|v| v.to_str().ok());
    let creds = Credentials {
        authorization: get("authorization"),
        api_key: get(API_KEY_METADATA),
        bearer: None,
        client_cert: conn.client_cert.as_deref(),
    };
    let refused = |r: crate::gate::Refused| status_of(&r.rejection());
    let path = req.uri().path();
    if path.ends_with("/PublishStream") || path.ends_with("/Subscribe") {
        let (p, s) = gate
            .admit_session(PROTO, metrics, conn, creds)
            .await
            .map_err(refused)?;
        return Ok((p, Some(s)));
    }
    let p = gate
        .admit(PROTO, metrics, conn, creds)
        .await
        .map_err(refused)?;
    Ok((p, None))
}

/// The gRPC status of a rejection (DESIGN §3); retryable ones carry google.rpc.RetryInfo.
pub fn status_of(r: &Rejection) -> Status {
    let code = match r {
        Rejection::Unauthenticated { .. } => Code::Unauthenticated,
        Rejection::Forbidden { .. } => Code::PermissionDenied,
        Rejection::Malformed { .. }
        | Rejection::TooLarge { .. }
        | Rejection::LengthRequired
        | Rejection::UnsupportedMediaType { .. } => Code::InvalidArgument,
        Rejection::NotFound { .. } => Code::NotFound,
        Rejection::OverQuota { .. } => Code::ResourceExhausted,
        Rejection::Unavailable { .. } => Code::Unavailable,
        Rejection::Internal { .. } => Code::Internal,
    };
    match r.retry_after() {
        Some(after) => Status::with_error_details(
            code,
            r.to_string(),
            ErrorDetails::with_retry_info(Some(after)),
        ),
        None => Status::new(code, r.to_string()),
    }
}

/// The same status as a `google.rpc.Status` message (for a rejected batch of a stream).
fn rpc_status(r: &Rejection) -> tonic_types::pb::Status {
    let s = status_of(r);
    let details = s.details();
    if details.is_empty() {
        tonic_types::pb::Status {
            code: s.code() as i32,
            message: s.message().to_string(),
            details: Vec::new(),
        }
    } else {
        // Status::with_error_details encodes the whole google.rpc.Status as its details.
        prost::Message::decode(details).unwrap_or_else(|_| tonic_types::pb::Status {
            code: s.code() as i32,
            message: s.message().to_string(),
            details: Vec::new(),
        })
    }
}

fn event_results(receipts: Vec<Receipt>) -> Vec<pb::EventResult> {
    use pb::event_result::Result as R;
    receipts
        .into_iter()
        .map(|r| pb::EventResult {
            result: Some(match r {
                Receipt::Appended { partition, offset } => R::Position(pb::Position {
                    partition,
                    offset: Some(offset),
                    ..Default::default()
                }),
                Receipt::Received { partition } => R::Position(pb::Position {
                    partition,
                    offset: None,
                    ..Default::default()
                }),
                Receipt::Spooled { partition } => R::Position(pb::Position {
                    partition,
                    offset: None,
                    spooled: true,
                    ..Default::default()
                }),
                Receipt::Duplicate {
                    partition,
                    offset,
                    spooled,
                } => R::Position(pb::Position {
                    partition,
                    offset,
                    duplicate: true,
                    spooled,
                    ..Default::default()
                }),
                Receipt::DeadLettered {
                    stream,
                    partition,
                    offset,
                    reason,
                } => R::Position(pb::Position {
                    partition,
                    offset,
                    dead_letter_stream: stream.to_string(),
                    dead_letter_reason: reason.to_string(),
                    ..Default::default()
                }),
                Receipt::Failed(e) => R::Error(pb::EventError {
                    code: e.code().to_string(),
                    message: e.to_string(),
                    retry_after_ms: e.retry_after().map_or(0, |d| d.as_millis() as u64),
                }),
            }),
        })
        .collect()
}

/// The request's deadline (`grpc-timeout`), if it set one.
fn deadline_of(metadata: &tonic::metadata::MetadataMap) -> Option<tokio::time::Instant> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Some(tokio::time::Instant::now() + d)
}

/// A `Subscribe` response from a read's records.
fn subscribe_response(batch: ReadBatch, cursor: String) -> pb::SubscribeResponse {
    let records = batch
        .records
        .into_iter()
        .filter_map(|r| {
            let f = r.raw?;
            Some(pb::Record {
                partition: r.partition,
                offset: r.offset,
                timestamp_ms: f.timestamp_ms,
                key: f.key,
                id: f.id,
                headers: f
                    .headers
                    .into_iter()
                    .map(|(k, v)| pb::Header {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        value: v,
                    })
                    .collect(),
                value: f.value,
                content_type: String::from_utf8_lossy(&f.content_type).into_owned(),
            })
        })
        .collect();
    pb::SubscribeResponse { records, cursor }
}

/// The gRPC status of a failed read.
fn read_status(e: ReadError) -> Status {
    match e {
        ReadError::Rejected(r) => status_of(&r),
        ReadError::Forbidden(stream) => Status::permission_denied(format!(
            "not allowed to consume stream `{stream}` (it needs a `consume` grant)"
        )),
        ReadError::NoStream(stream) => {
            Status::not_found(format!("stream `{stream}` does not exist"))
        }
        ReadError::Gone {
            partition,
            earliest,
        } => Status::out_of_range(format!(
            "partition {partition} no longer holds that offset (retention deleted it); its earliest offset is {earliest}"
        )),
        ReadError::OutOfRange { partition, end } => Status::out_of_range(format!(
            "partition {partition} ends at offset {end}: read from at most {end}"
        )),
        ReadError::Unsupported(m) => Status::unimplemented(m),
    }
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded(
        "the call's deadline passed; events not answered may still be appended, so retry them",
    )
}

/// A batch's content type, `application/octet-stream` when it gave none.
fn content_type_or_default(content_type: String) -> String {
    if content_type.is_empty() {
        "application/octet-stream".to_string()
    } else {
        content_type
    }
}

/// Converts a batch's events; an event whose content type differs from the batch's keeps it as
/// a `content-type` header, and the batch's idempotency key (if not empty) marks each event. A
/// header name Sluice reserves refuses the batch.
fn events_of(
    events: Vec<pb::Event>,
    content_type: &str,
    idempotency_key: &str,
) -> Result<Vec<Event>, Rejection> {
    let mut events = events
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if e.headers.len() > sluice_core::MAX_HEADERS_PER_EVENT {
                return Err(Rejection::Malformed {
                    message: format!(
                        "event {i}: more than {} headers; that is the most an event may have",
                        sluice_core::MAX_HEADERS_PER_EVENT
                    ),
                });
            }
            let mut headers: Vec<(Bytes, Bytes)> = e
                .headers
                .into_iter()
                .map(|h| {
                    sluice_core::check_header_name(h.key.as_bytes())
                        .map(|()| (Bytes::from(h.key), h.value))
                        .map_err(|m| Rejection::Malformed {
                            message: format!("event {i}: {m}"),
                        })
                })
                .collect::<Result<_, _>>()?;
            if !e.content_type.is_empty() && e.content_type != content_type {
                headers.insert(
                    0,
                    (
                        Bytes::from_static(b"content-type"),
                        Bytes::from(e.content_type),
                    ),
                );
            }
            let mut event = Event {
                key: e.key,
                id: (!e.id.is_empty()).then(|| Bytes::from(e.id)),
                headers,
                value: e.value,
                timestamp_ms: e.timestamp_ms,
                partition: e.partition,
            };
            // A CloudEvent in the Kafka binding's binary mode (attributes as `ce_*` headers).
            if event
                .headers
                .iter()
                .any(|(k, _)| &k[..] == crate::http::cloudevents::KAFKA_SPECVERSION.as_bytes())
            {
                crate::http::cloudevents::apply_kafka_headers(&mut event).map_err(|m| {
                    Rejection::Malformed {
                        message: format!("event {i}: CloudEvent: {m}"),
                    }
                })?;
            }
            Ok(event)
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !idempotency_key.is_empty() {
        sluice_core::apply_idempotency_key(idempotency_key.as_bytes(), &mut events)?;
    }
    Ok(events)
}

/// Decodes a `PublishRequest` message as the server would (event and header counts on the wire,
/// prost, then Sluice's events with their reserved-name checks): how many events. For the fuzz
/// target (`protocols/fuzz`, `grpc_message`) and its corpus replay.
pub fn decode_publish(message: &[u8], max_events: u64) -> Result<usize, String> {
    codec::check_counts(
        message,
        2,
        max_events,
        sluice_core::MAX_HEADERS_PER_EVENT as u64,
    )?;
    let req = <pb::PublishRequest as prost::Message>::decode(message).map_err(|e| e.to_string())?;
    let content_type = content_type_or_default(req.content_type);
    let events =
        events_of(req.events, &content_type, &req.idempotency_key).map_err(|r| r.to_string())?;
    Ok(events.len())
}

/// The principal [`authenticate_call`] established for this call.
fn principal_of<T>(req: &tonic::Request<T>) -> Result<Principal, Status> {
    req.extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Status::internal("the call was not authenticated"))
}

/// Admits and appends one batch in its own task, so a cancelled call never cuts an append
/// short (the events' budget stays held until they reach their ack point).
fn spawn_batch<I: Ingest>(
    ingest: Arc<I>,
    principal: Principal,
    stream: String,
    content_type: String,
    events: Vec<pb::Event>,
    idempotency_key: String,
    trace: Option<sluice_core::TraceHeaders>,
) -> JoinHandle<Result<Vec<Receipt>, Rejection>> {
    tokio::spawn(async move {
        let stream = match StreamName::parse(&stream) {
            Ok(s) => s,
            Err(r) => {
                ingest.metrics().request(PROTO, r.code());
                return Err(r);
            }
        };
        let content_type = content_type_or_default(content_type);
        let events = match events_of(events, &content_type, &idempotency_key) {
            Ok(e) => e,
            Err(r) => {
                ingest.metrics().request(PROTO, r.code());
                return Err(r);
            }
        };
        let admitted = ingest.admit(&principal, &stream);
        crate::append_admitted(
            &*ingest,
            admitted,
            Protocol::Grpc,
            Bytes::from(content_type),
            events,
            None,
            trace,
        )
        .await
    })
}

/// The call's W3C trace context (`traceparent`/`tracestate` metadata), when it has one.
fn trace_of(m: &tonic::metadata::MetadataMap) -> Option<sluice_core::TraceHeaders> {
    sluice_core::TraceHeaders::from_values(
        m.get(sluice_core::TRACEPARENT).map(|v| v.as_bytes()),
        m.get(sluice_core::TRACESTATE).map(|v| v.as_bytes()),
    )
}

fn joined(
    r: Result<Result<Vec<Receipt>, Rejection>, tokio::task::JoinError>,
) -> Result<Vec<Receipt>, Rejection> {
    r.unwrap_or_else(|e| {
        Err(Rejection::Internal {
            message: format!("the batch failed: {e}"),
        })
    })
}

#[tonic::async_trait]
impl<I: Ingest> IngestService for GrpcIngest<I> {
    async fn publish(
        &self,
        request: tonic::Request<pb::PublishRequest>,
    ) -> Result<tonic::Response<pb::PublishResponse>, Status> {
        let deadline = deadline_of(request.metadata());
        let trace = trace_of(request.metadata());
        let principal = principal_of(&request)?;
        let req = request.into_inner();
        let span = tracing::info_span!(
            "call",
            method = "Publish",
            principal = principal.name(),
            stream = %req.stream
        );
        tracing::Instrument::instrument(
            async move {
                tracing::debug!(events = req.events.len(), "Publish");
                let task = spawn_batch(
                    self.ingest.clone(),
                    principal,
                    req.stream,
                    req.content_type,
                    req.events,
                    req.idempotency_key,
                    trace,
                );
                let result = match deadline {
                    Some(d) => tokio::time::timeout_at(d, task)
                        .await
                        .map_err(|_| deadline_exceeded())?,
                    None => task.await,
                };
                let receipts = joined(result).map_err(|r| status_of(&r))?;
                // As over HTTP: when every event failed, the call fails with the first failure.
                if let Some(Receipt::Failed(first)) = receipts.first()
                    && receipts.iter().all(|r| matches!(r, Receipt::Failed(_)))
                {
                    return Err(status_of(first));
                }
                Ok(tonic::Response::new(pb::PublishResponse {
                    results: event_results(receipts),
                }))
            },
            span,
        )
        .await
    }

    type PublishStreamStream = ReceiverStream<Result<pb::PublishStreamResponse, Status>>;
    type SubscribeStream = ReceiverStream<Result<pb::SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        request: tonic::Request<pb::SubscribeRequest>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, Status> {
        let principal = principal_of(&request)?;
        let mut auth = request
            .extensions()
            .get::<SessionAuth>()
            .cloned()
            .ok_or_else(|| Status::internal("the call was not authenticated"))?;
        let req = request.into_inner();
        let stream = StreamName::parse(&req.stream).map_err(|r| status_of(&r))?;
        use pb::subscribe_request::From as F;
        let from = match req.from {
            None => ReadFrom::End,
            Some(F::Start(_)) => ReadFrom::Start,
            Some(F::Offset(o)) => ReadFrom::Offset(o),
            Some(F::TimeMs(t)) => ReadFrom::Time(t),
            Some(F::Cursor(c)) => ReadFrom::Cursor(
                crate::http::read::parse_cursor(&c).map_err(Status::invalid_argument)?,
            ),
        };
        let limit = match req.max_records {
            0 => 256,
            n => n as usize,
        };
        let read = ReadRequest {
            stream,
            partitions: (!req.partitions.is_empty()).then_some(req.partitions),
            from,
            limit,
            // Record fields plus their framing stay within the message limit.
            max_bytes: self.max_message_bytes / 2,
            wait: Duration::ZERO,
            raw: true,
        };
        let ingest = self.ingest.clone();
        // What is wrong with the call (permission, stream, position) fails it before it
        // streams anything.
        let first = ingest
            .read(&principal, read.clone())
            .await
            .map_err(read_status)?;
        let (tx, rx) = mpsc::channel(2);
        let (gate, mut stop) = (self.gate.clone(), self.stop.clone());
        let gauge = ingest.metrics().connections_of("grpc_subscribe");
        tokio::spawn(async move {
            gauge.inc();
            let mut batch = Some(first);
            let mut send_empty = true;
            let mut from = read.from.clone();
            loop {
                if let Some(mut b) = batch.take() {
                    let cursor = crate::http::read::cursor_string(&b.next);
                    from = ReadFrom::Cursor(std::mem::take(&mut b.next));
                    let send = send_empty || !b.records.is_empty();
                    if send && tx.send(Ok(subscribe_response(b, cursor))).await.is_err() {
                        break; // the client cancelled
                    }
                    send_empty = false;
                }
                let next = ReadRequest {
                    partitions: None,
                    from: from.clone(),
                    wait: Duration::from_secs(15),
                    ..read.clone()
                };
                tokio::select! {
                    r = crate::http::read::read_paced(&*ingest, &principal, next) => match r {
                        Ok(b) => batch = Some(b),
                        Err(e) => {
                            let _ = tx.send(Err(read_status(e))).await;
                            break;
                        }
                    },
                    _ = tx.closed() => break,
                    () = async { drop(stop.wait_for(|s| *s).await) } => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "the gateway is shutting down; subscribe again with the last cursor",
                            )))
                            .await;
                        break;
                    }
                    // A reload or the credential's expiry: reading goes on only while the
                    // principal stands with its grant.
                    _ = auth.due() => if let Err(revoked) = gate.recheck(&mut auth).await {
                        ingest.metrics().session_revoked(PROTO);
                        let _ = tx.send(Err(Status::unauthenticated(revoked.to_string()))).await;
                        break;
                    },
                }
            }
            gauge.dec();
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn publish_stream(
        &self,
        request: tonic::Request<tonic::Streaming<pb::PublishStreamRequest>>,
    ) -> Result<tonic::Response<Self::PublishStreamStream>, Status> {
        let deadline = deadline_of(request.metadata());
        let trace = trace_of(request.metadata());
        let principal = principal_of(&request)?;
        let mut auth = request
            .extensions()
            .get::<SessionAuth>()
            .cloned()
            .ok_or_else(|| Status::internal("the stream was not authenticated"))?;
        let gate = self.gate.clone();
        let span = tracing::info_span!(
            "call",
            method = "PublishStream",
            principal = principal.name()
        );
        let mut input = request.into_inner();
        // Batches in flight, in the order they arrived: a bounded queue, so past
        // max_batches_in_flight the reader waits and HTTP/2 flow control holds the client.
        let (pending_tx, mut pending_rx) = mpsc::channel::<Pending>(self.max_batches_in_flight);
        let (out_tx, out_rx) = mpsc::channel(self.max_batches_in_flight);
        // Batches of one stream are appended in the order they were sent (merged when several
        // wait), so pipelining keeps the log's order per stream and key.
        let mut lanes = Lanes::new(
            self.ingest.clone(),
            Protocol::Grpc,
            self.max_batches_in_flight,
        )
        .with_trace(trace);
        let ingest = self.ingest.clone();
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
                let deadline_at = deadline.unwrap_or(far);
                loop {
                    let next = tokio::select! {
                        m = input.message() => m,
                        _ = tokio::time::sleep_until(deadline_at) => {
                            let _ = pending_tx.send(Pending::End(deadline_exceeded())).await;
                            return;
                        }
                        // A reload or the credential's expiry: the stream goes on only while
                        // its principal stands (batches already read are still answered).
                        _ = auth.due() => match gate.recheck(&mut auth).await {
                            Ok(()) => continue,
                            Err(revoked) => {
                                ingest.metrics().session_revoked(PROTO);
                                let status = match &revoked {
                                    Revoked::Credentials(_) => Status::unauthenticated(revoked.to_string()),
                                    Revoked::Changed => Status::aborted(revoked.to_string()),
                                };
                                let _ = pending_tx.send(Pending::End(status)).await;
                                return;
                            }
                        },
                    };
                    match next {
                        Ok(Some(batch)) => {
                            let content_type = content_type_or_default(batch.content_type);
                            // Admitted once per batch, before its events are converted.
                            let decoded = StreamName::parse(&batch.stream).and_then(|stream| {
                                let admission = ingest.admit(&principal, &stream)?;
                                Ok((
                                    admission,
                                    events_of(batch.events, &content_type, &batch.idempotency_key)?,
                                ))
                            });
                            let pending = match decoded {
                                Err(r) => {
                                    ingest.metrics().request(PROTO, r.code());
                                    Pending::Done(batch.sequence, Err(r))
                                }
                                Ok((admission, events)) => {
                                    let outcome = lanes
                                        .submit(admission, Bytes::from(content_type), events)
                                        .await;
                                    Pending::Batch(batch.sequence, outcome)
                                }
                            };
                            if pending_tx.send(pending).await.is_err() {
                                return; // the client went away; queued batches are appended anyway
                            }
                        }
                        Ok(None) => return, // the client finished sending
                        Err(status) => {
                            let _ = pending_tx.send(Pending::End(status)).await;
                            return;
                        }
                    }
                }
            },
            span,
        ));
        tokio::spawn(async move {
            while let Some(p) = pending_rx.recv().await {
                let item = match p {
                    Pending::End(status) => Err(status),
                    Pending::Done(sequence, outcome) => Ok(stream_answer(sequence, outcome)),
                    Pending::Batch(sequence, rx) => {
                        let outcome = rx.await.unwrap_or_else(|_| {
                            Err(Rejection::Internal {
                                message: "the batch's lane ended before answering".into(),
                            })
                        });
                        Ok(stream_answer(sequence, outcome))
                    }
                };
                let end = item.is_err();
                if out_tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(out_rx)))
    }
}

/// The answer to one batch of a stream: its results, or its rejection as a status.
fn stream_answer(sequence: u64, outcome: lanes::Outcome) -> pb::PublishStreamResponse {
    match outcome {
        Ok(receipts) => pb::PublishStreamResponse {
            sequence,
            results: event_results(receipts),
            status: None,
        },
        Err(r) => pb::PublishStreamResponse {
            sequence,
            results: Vec::new(),
            status: Some(rpc_status(&r)),
        },
    }
}

/// What the responder of a stream waits for next.
enum Pending {
    /// A batch queued on its stream's lane.
    Batch(u64, tokio::sync::oneshot::Receiver<lanes::Outcome>),
    /// A batch answered without an append (e.g. an invalid stream name).
    Done(u64, lanes::Outcome),
    End(Status),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_headers_become_deadlines() {
        let at = |v: &str| {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert("grpc-timeout", v.parse().unwrap());
            deadline_of(&md).map(|d| d - tokio::time::Instant::now())
        };
        let near = |d: Option<Duration>, want: Duration| {
            let d = d.expect("a deadline");
            d <= want && want - d < Duration::from_millis(50)
        };
        assert!(near(at("200m"), Duration::from_millis(200)));
        assert!(near(at("3S"), Duration::from_secs(3)));
        assert!(near(at("1M"), Duration::from_secs(60)));
        assert!(near(at("5000u"), Duration::from_millis(5)));
        assert_eq!(at("12x"), None);
        assert_eq!(at("m"), None);
        assert!(deadline_of(&tonic::metadata::MetadataMap::new()).is_none());
    }

    #[test]
    fn rejections_map_to_the_design_table_with_retry_info_when_retryable() {
        let cases = [
            (
                Rejection::Unauthenticated {
                    reason: "x".into(),
                    invalid_token: true,
                },
                Code::Unauthenticated,
            ),
            (
                Rejection::Forbidden { stream: "s".into() },
                Code::PermissionDenied,
            ),
            (
                Rejection::Malformed {
                    message: "m".into(),
                },
                Code::InvalidArgument,
            ),
            (
                Rejection::TooLarge {
                    message: "m".into(),
                },
                Code::InvalidArgument,
            ),
            (Rejection::NotFound { stream: "s".into() }, Code::NotFound),
            (
                Rejection::OverQuota {
                    retry_after: Duration::from_millis(250),
                    message: "q".into(),
                },
                Code::ResourceExhausted,
            ),
            (
                Rejection::unavailable(Duration::from_secs(2), "u"),
                Code::Unavailable,
            ),
            (
                Rejection::Internal {
                    message: "i".into(),
                },
                Code::Internal,
            ),
        ];
        for (r, code) in cases {
            let s = status_of(&r);
            assert_eq!(s.code(), code, "{r:?}");
            let retry = s.get_details_retry_info().and_then(|i| i.retry_delay);
            assert_eq!(retry, r.retry_after(), "{r:?}");
            let rpc = rpc_status(&r);
            assert_eq!(rpc.code, code as i32);
            assert_eq!(rpc.details.is_empty(), r.retry_after().is_none(), "{r:?}");
        }
    }
}
