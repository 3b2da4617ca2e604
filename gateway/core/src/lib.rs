//! Sluice's shared vocabulary: the event, stream names, per-event receipts, the one rejection
//! enum every adapter renders natively, the metrics every layer records, and the [`Ingest`]
//! service the protocol adapters call.

pub mod budget;
pub mod metrics;
pub mod principal;
pub mod swap;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

pub use budget::{Budget, Reservation};
pub use principal::{AuthFailure, FailureKind, Permissions, Principal, glob_match};
pub use sluice_config::{AckMode, StreamSettings};
pub use swap::Swap;

/// A validated stream name (Kafka's topic rules: 1–249 of `[a-zA-Z0-9._-]`, not `.` or `..`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(Arc<str>);

impl StreamName {
    /// Checks `name` against the rules; the error says which rule it breaks.
    pub fn parse(name: &str) -> Result<Self, Rejection> {
        sluice_config::check_stream_name(name).map_err(|e| Rejection::Malformed {
            message: format!("invalid stream name: {e}"),
        })?;
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name, shared (no copy).
    pub fn shared(&self) -> Arc<str> {
        self.0.clone()
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Prefixes of the header names Sluice sets itself (`sluice-principal`, `sluice-protocol`,
/// `sluice-event-id`, `mqtt-topic`, `mqtt-will`, …). Producers cannot send headers with these
/// names, so what a record says about who sent it, how, and whether it is a will is always
/// Sluice's own (DESIGN §11). Compared without regard to ASCII case.
pub const RESERVED_HEADER_PREFIXES: [&str; 2] = ["sluice-", "mqtt-"];

/// The refusal of a producer-supplied header `name` that Sluice reserves, if it is one.
pub fn check_header_name(name: &[u8]) -> Result<(), String> {
    for prefix in RESERVED_HEADER_PREFIXES {
        if name.len() >= prefix.len()
            && name[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        {
            return Err(format!(
                "header `{}` is reserved: names starting with `{prefix}` are set by Sluice",
                String::from_utf8_lossy(name)
            ));
        }
    }
    Ok(())
}

/// The header that carries a request's idempotency key (HTTP `Idempotency-Key`, gRPC
/// `idempotency_key`) into the log with each of its events, as `key#index` (the event's index
/// in the request): the event's dedup key when it has no `id` (docs/exactly-once.md), and what
/// the dedup window is rebuilt from at start. Reserved, so only Sluice sets it.
pub const IDEMPOTENCY_HEADER: &str = "sluice-idempotency-key";

/// The header that carries an MQTT QoS 1/2 publish's (client id, packet id) into the log, as
/// `{d|n}{client id}#{packet id}` (`d`: the publish had DUP set, a resend; `n`: a new one, which
/// replaces an earlier publish's use of the packet id). The event's dedup key when it has no
/// `id` and the stream's `dedup_keys` include `mqtt_packet` (docs/exactly-once.md). Reserved.
pub const MQTT_PACKET_HEADER: &str = "sluice-mqtt-packet";

/// The longest idempotency key a request may carry.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// Marks each of `events` with `key` and its index (see [`IDEMPOTENCY_HEADER`]); refuses a key
/// that is empty or longer than [`MAX_IDEMPOTENCY_KEY_BYTES`].
pub fn apply_idempotency_key(key: &[u8], events: &mut [Event]) -> Result<(), Rejection> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Rejection::Malformed {
            message: format!(
                "an idempotency key has 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes; this one has {}",
                key.len()
            ),
        });
    }
    for (i, e) in events.iter_mut().enumerate() {
        let mut v = Vec::with_capacity(key.len() + 6);
        v.extend_from_slice(key);
        v.push(b'#');
        v.extend_from_slice(i.to_string().as_bytes());
        e.headers.push((
            Bytes::from_static(IDEMPOTENCY_HEADER.as_bytes()),
            Bytes::from(v),
        ));
    }
    Ok(())
}

/// The W3C Trace Context header that names an event's trace and its parent span
/// (`00-{trace id}-{span id}-{flags}`): read from HTTP headers, gRPC metadata, MQTT 5 user
/// properties and event headers, and stored with each event when tracing is on.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C Trace Context header with vendors' trace state, passed on unchanged.
pub const TRACESTATE: &str = "tracestate";

/// A request's trace context as the producer sent it (HTTP `traceparent`/`tracestate`
/// headers, gRPC metadata): raw bytes, checked by the gateway only when tracing is on, so
/// adapters pay nothing for it otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders {
    pub parent: Bytes,
    pub state: Option<Bytes>,
}

impl TraceHeaders {
    /// The context in `traceparent` and `tracestate` values, when there is a `traceparent`.
    pub fn from_values(parent: Option<&[u8]>, state: Option<&[u8]>) -> Option<Self> {
        parent.map(|p| Self {
            parent: Bytes::copy_from_slice(p),
            state: state.map(Bytes::copy_from_slice),
        })
    }
}

/// The protocol an event arrived over (recorded with it and used as a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Grpc,
    Mqtt,
    WebSocket,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Grpc => "grpc",
            Protocol::Mqtt => "mqtt",
            Protocol::WebSocket => "websocket",
        }
    }
}

/// One event as a producer sent it. Every part is a slice of the received buffer where possible.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// Chooses the partition; events with the same key keep their order.
    pub key: Option<Bytes>,
    /// The producer's own identifier of the event, stored with it.
    pub id: Option<Bytes>,
    /// Application headers, stored with the event.
    pub headers: Vec<(Bytes, Bytes)>,
    pub value: Bytes,
    /// The producer's own time of the event, milliseconds since the Unix epoch (the record's
    /// timestamp; else the time Sluice received it). Checked against the stream's
    /// `max_timestamp_future_ms` / `max_timestamp_past_ms`.
    pub timestamp_ms: Option<i64>,
    /// The partition the producer chose; wins over the key's partition. Refused per event when
    /// the stream has no such partition.
    pub partition: Option<u32>,
}

/// Parses a producer timestamp: RFC 3339 text (`2026-12-07T09:00:00.250Z`, any offset) or
/// milliseconds since the Unix epoch as decimal digits. The refusal names what was wrong.
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if !t.is_empty()
        && t.bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
    {
        return t
            .parse::<i64>()
            .map_err(|_| format!("timestamp `{t}` is out of range"));
    }
    let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("timestamp `{t}` is neither RFC 3339 (2026-12-07T09:00:00Z) nor milliseconds since the epoch: {e}")
        })?;
    i64::try_from(at.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("timestamp `{t}` is out of range"))
}

/// Formats milliseconds since the epoch as RFC 3339 in UTC (what answers and reads show).
pub fn format_timestamp(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// The most headers one event may carry (HTTP/WebSocket `headers`, gRPC `headers`, MQTT 5 User
/// Properties); more are refused with a clear error before they are all decoded.
pub const MAX_HEADERS_PER_EVENT: usize = 128;

/// What each header of an event costs besides its name and value (its framing in the log and
/// its place in memory), so that events with many empty headers are not free.
pub const HEADER_OVERHEAD: usize = 8;
/// What each event costs besides its [`Event::size`] (record framing in the log), charged to
/// the in-flight budget and to byte quotas.
pub const RECORD_OVERHEAD: usize = 24;

impl Event {
    /// Bytes this event counts against `max_event_bytes`: key, id, value, and each header's
    /// name and value plus [`HEADER_OVERHEAD`].
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Bytes::len)
            + self.id.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len() + HEADER_OVERHEAD)
                .sum::<usize>()
            + self.value.len()
    }

    /// Bytes this event is charged against the in-flight budget and byte quotas: its
    /// [`Event::size`] plus [`RECORD_OVERHEAD`].
    pub fn charge(&self) -> usize {
        self.size() + RECORD_OVERHEAD
    }
}

/// A batch of events for one stream from one principal, admitted to that stream.
#[derive(Debug)]
pub struct IngestRequest {
    /// Who produces to which stream, and the stream's settings: authorized once, by
    /// [`Ingest::admit`], for the whole batch.
    pub admission: Admission,
    pub protocol: Protocol,
    /// Media type of the values, stored with the events (e.g. `application/json`).
    pub content_type: Bytes,
    pub events: Vec<Event>,
    /// Headers Sluice adds to every record of the request, after each event's own (the
    /// schema step's `sluice-schema` when the whole batch passed one version): one list per
    /// batch instead of one allocation per event. Adapters leave it empty.
    pub record_headers: Vec<(Bytes, Bytes)>,
    /// In-flight budget the adapter reserved while receiving the request (empty when it
    /// reserved nothing); admission settles it to the events' exact size and it is released
    /// once they reach their ack point.
    pub reservation: Reservation,
    /// Fired (or dropped, when the request is refused first) once the events are in the log's
    /// queue, i.e. their order in the log is fixed, before they reach their ack point. Lets a
    /// connection pipeline its batches of one stream without reordering them.
    pub queued: Option<tokio::sync::oneshot::Sender<()>>,
    /// The request's trace context (HTTP headers, gRPC metadata); an event's own `traceparent`
    /// header wins over it for that event.
    pub trace: Option<TraceHeaders>,
}

impl IngestRequest {
    /// Who sent the events.
    pub fn principal(&self) -> &Principal {
        &self.admission.principal
    }

    /// The stream they go to.
    pub fn stream(&self) -> &StreamName {
        &self.admission.stream
    }
}

/// What happened to one event of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipt {
    /// In the log at this position, at the stream's durable ack point.
    Appended { partition: u32, offset: u64 },
    /// Queued for this partition of a stream with `ack = "received"`; not yet durable.
    Received { partition: u32 },
    /// Fsynced in the gateway's spool (a stream with `ack = "spooled"`): durable, and on its
    /// way to this partition of the Kafka topic, whose offset is not known yet.
    Spooled { partition: u32 },
    /// Not appended: a retry of an event already in the log (or queued, `offset: None`) at this
    /// position, recognised by its dedup key (docs/exactly-once.md).
    /// `spooled`: the original is in the spool of a stream with `ack = "spooled"`.
    Duplicate {
        partition: u32,
        offset: Option<u64>,
        spooled: bool,
    },
    /// Invalid for its stream's schema, and stored in the stream's dead-letter stream instead
    /// (docs/schemas.md): where it went, and why.
    DeadLettered {
        stream: Arc<str>,
        partition: u32,
        offset: Option<u64>,
        reason: Arc<str>,
    },
    /// Not appended; the rejection says why and whether a retry can help.
    Failed(Rejection),
}

/// The receipts of a request's admitted events with its refused events' rejections put back at
/// their places (`refused` by index, ascending), so every event is answered in request order.
pub fn merge_receipts(receipts: Vec<Receipt>, refused: Vec<(usize, Rejection)>) -> Vec<Receipt> {
    merge_at(
        receipts,
        refused
            .into_iter()
            .map(|(i, r)| (i, Receipt::Failed(r)))
            .collect(),
    )
}

/// [`merge_receipts`] with any receipts at the given indexes (ascending).
pub fn merge_at(receipts: Vec<Receipt>, placed: Vec<(usize, Receipt)>) -> Vec<Receipt> {
    if placed.is_empty() {
        return receipts;
    }
    let mut all = Vec::with_capacity(receipts.len() + placed.len());
    let mut receipts = receipts.into_iter();
    let mut placed = placed.into_iter().peekable();
    loop {
        if let Some((_, r)) = placed.next_if(|(i, _)| *i <= all.len()) {
            all.push(r);
        } else if let Some(r) = receipts.next() {
            all.push(r);
        } else if let Some((_, r)) = placed.next() {
            all.push(r);
        } else {
            return all;
        }
    }
}

impl Receipt {
    /// Where the event is, if it is in the log or queued for it.
    pub fn position(&self) -> Option<(u32, Option<u64>)> {
        match *self {
            Receipt::Appended { partition, offset } => Some((partition, Some(offset))),
            Receipt::Received { partition } | Receipt::Spooled { partition } => {
                Some((partition, None))
            }
            Receipt::Duplicate {
                partition, offset, ..
            } => Some((partition, offset)),
            // Not in this stream.
            Receipt::DeadLettered { .. } | Receipt::Failed(_) => None,
        }
    }
}

/// Why a request or an event was not accepted. Classified once here; each adapter renders it in
/// its protocol's own terms (see DESIGN §3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Missing or wrong credentials. `invalid_token` is false when none were presented.
    #[error("{reason}")]
    Unauthenticated { reason: String, invalid_token: bool },
    #[error("not allowed to produce to stream `{stream}`")]
    Forbidden { stream: String },
    #[error("{message}")]
    Malformed { message: String },
    #[error("{message}")]
    TooLarge { message: String },
    #[error("a request body with Content-Length (or chunked encoding) is required")]
    LengthRequired,
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    #[error("stream `{stream}` does not exist and streams are not created on first use")]
    NotFound { stream: String },
    #[error("{message}")]
    OverQuota {
        retry_after: Duration,
        message: String,
    },
    #[error("{message}")]
    Unavailable {
        retry_after: Duration,
        message: String,
    },
    #[error("{message}")]
    Internal { message: String },
}

impl Rejection {
    /// A stable machine-readable code, used in error bodies and as the `reason` metrics label.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::Unauthenticated { .. } => "unauthenticated",
            Rejection::Forbidden { .. } => "forbidden",
            Rejection::Malformed { .. } => "malformed",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::LengthRequired => "length_required",
            Rejection::UnsupportedMediaType { .. } => "unsupported_media_type",
            Rejection::NotFound { .. } => "stream_not_found",
            Rejection::OverQuota { .. } => "over_quota",
            Rejection::Unavailable { .. } => "unavailable",
            Rejection::Internal { .. } => "internal",
        }
    }

    /// When a retry may succeed, how long to wait first.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Rejection::OverQuota { retry_after, .. }
            | Rejection::Unavailable { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The log cannot take the work now; `retry_after` says when to try again.
    pub fn unavailable(retry_after: Duration, message: impl Into<String>) -> Self {
        Rejection::Unavailable {
            retry_after,
            message: message.into(),
        }
    }
}

impl From<AuthFailure> for Rejection {
    fn from(f: AuthFailure) -> Self {
        match f.kind {
            FailureKind::Missing | FailureKind::Unauthenticated => Rejection::Unauthenticated {
                invalid_token: f.kind == FailureKind::Unauthenticated,
                reason: f.description,
            },
            FailureKind::Throttled(retry_after) => Rejection::OverQuota {
                retry_after,
                message: f.description,
            },
            FailureKind::Unavailable(retry_after) => Rejection::Unavailable {
                retry_after,
                message: f.description,
            },
        }
    }
}

/// A principal admitted to a stream: made by [`Ingest::admit`] once it has checked that the
/// principal may produce to the stream and that the stream can exist, and carried by every
/// [`IngestRequest`], so a batch is authorized once. Holds the stream's settings as they were
/// at that moment, for the adapter to enforce while it reads the events.
#[derive(Debug, Clone)]
pub struct Admission {
    principal: Principal,
    stream: StreamName,
    settings: StreamSettings,
    rate_limits: RateLimits,
}

/// One quota bucket's state after a request, as the IETF `RateLimit-Policy` / `RateLimit`
/// fields state it (docs/quotas.md): `quota` units per `window_secs`, `remaining` now, full
/// again in `reset_secs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// `stream-events`, `principal-bytes`, `principal-stream-events`, ...
    pub name: String,
    pub quota: u64,
    pub window_secs: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

/// Where the gateway leaves the quotas' state of a request for its adapter to answer with;
/// clones share it. Empty (nothing allocated, nothing kept) unless quotas are configured.
#[derive(Debug, Clone, Default)]
pub struct RateLimits(Option<Arc<std::sync::Mutex<Vec<RateLimit>>>>);

impl RateLimits {
    /// A cell that keeps what is set (the default one drops it).
    pub fn kept() -> Self {
        Self(Some(Arc::default()))
    }

    pub fn set(&self, limits: Vec<RateLimit>) {
        if let Some(cell) = &self.0 {
            *cell.lock().unwrap_or_else(|e| e.into_inner()) = limits;
        }
    }

    pub fn get(&self) -> Vec<RateLimit> {
        self.0.as_ref().map_or_else(Vec::new, |cell| {
            cell.lock().unwrap_or_else(|e| e.into_inner()).clone()
        })
    }
}

impl Admission {
    /// For implementations of [`Ingest::admit`], after their checks passed.
    pub fn granted(principal: Principal, stream: StreamName, settings: StreamSettings) -> Self {
        Self {
            principal,
            stream,
            settings,
            rate_limits: RateLimits::default(),
        }
    }

    /// The quotas' state of this request, once the gateway checked them.
    pub fn rate_limits(&self) -> &RateLimits {
        &self.rate_limits
    }

    /// The same admission, keeping the quotas' state for the adapter (streams with quotas).
    pub fn with_rate_limits(mut self) -> Self {
        self.rate_limits = RateLimits::kept();
        self
    }

    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    pub fn stream(&self) -> &StreamName {
        &self.stream
    }

    /// The stream's limits and ack point.
    pub fn settings(&self) -> &StreamSettings {
        &self.settings
    }
}

/// Where a read starts in each partition it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    /// Each partition's oldest record still held.
    Start,
    /// This offset in every partition read.
    Offset(u64),
    /// The first record received at or after this time (ms since the epoch).
    Time(i64),
    /// A cursor from an earlier read: an offset per partition.
    Cursor(Vec<(u32, u64)>),
    /// The end: only what arrives from now on.
    End,
}

/// A read of a stream's records (docs/consume.md).
#[derive(Debug, Clone)]
pub struct ReadRequest {
    pub stream: StreamName,
    /// The partitions to read; `None`: all (with a cursor: the cursor's).
    pub partitions: Option<Vec<u32>>,
    pub from: ReadFrom,
    /// Most records answered.
    pub limit: usize,
    /// Most bytes of rendered records answered (at least one record is, whatever its size).
    pub max_bytes: usize,
    /// How long to wait for a record when there is none yet (long poll).
    pub wait: Duration,
    /// Records as their fields ([`ReadRecord::raw`], for gRPC) instead of JSON.
    pub raw: bool,
}

/// What a read found: each record as a JSON object (the shape of `sluice log read`), and where
/// the next read continues, per partition.
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    pub records: Vec<ReadRecord>,
    pub next: Vec<(u32, u64)>,
}

impl ReadBatch {
    /// Where each partition stood before this batch: a cursor from which a new read returns
    /// these records again (a partition's first record here, or where the batch left it when it
    /// read none of it).
    pub fn before(&self) -> Vec<(u32, u64)> {
        let mut at = self.next.clone();
        for r in self.records.iter().rev() {
            if let Some(e) = at.iter_mut().find(|(p, _)| *p == r.partition) {
                e.1 = r.offset;
            }
        }
        at
    }

    /// Keeps the first `n` records, and `next` where they end.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.records.len() {
            return;
        }
        let mut at = self.before();
        self.records.truncate(n);
        for r in &self.records {
            if let Some(e) = at.iter_mut().find(|(p, _)| *p == r.partition) {
                e.1 = r.offset + 1;
            }
        }
        self.next = at;
    }
}

/// One record read: where it is, and the record as a JSON object (or, for a raw read, as its
/// fields).
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: u32,
    pub offset: u64,
    /// Its size as sent (the JSON's, or the raw fields'), for read quotas.
    pub size: usize,
    pub json: Bytes,
    pub raw: Option<Box<RawRecord>>,
}

/// A record's fields as stored.
#[derive(Debug, Clone, Default)]
pub struct RawRecord {
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub id: Option<Bytes>,
    /// The event's headers, then Sluice's own (`sluice-protocol`, `sluice-principal`, …).
    pub headers: Vec<(Bytes, Bytes)>,
    pub value: Bytes,
    pub content_type: Bytes,
}

/// A stream a principal may read, for listings (the console page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    pub name: String,
    pub partitions: u32,
    /// Records ever written (the sum of the partitions' end offsets), when the log knows it
    /// cheaply (the embedded log); a rate is its change over time.
    pub records: Option<u64>,
}

/// Why a read was not answered with records.
#[derive(Debug, Clone)]
pub enum ReadError {
    /// Malformed, unavailable, ...
    Rejected(Rejection),
    /// The principal has no `consume` grant for the stream.
    Forbidden(String),
    /// The stream does not exist (nothing was ever written to it).
    NoStream(String),
    /// The position is older than retention: the partition's oldest offset now.
    Gone { partition: u32, earliest: u64 },
    /// The position is past the partition's end.
    OutOfRange { partition: u32, end: u64 },
    /// This log cannot be read through the gateway (yet).
    Unsupported(String),
}

impl From<Rejection> for ReadError {
    fn from(r: Rejection) -> Self {
        ReadError::Rejected(r)
    }
}

/// The service every protocol adapter calls. The gateway implements it: authorize, validate,
/// quota, in-flight budget, append, receipts.
pub trait Ingest: Send + Sync + 'static {
    /// Checks that `principal` may produce to `stream` and that the stream can exist, before any
    /// of the request body is read; the admission carries the stream's limits for the adapter to
    /// enforce while reading, and goes into the [`IngestRequest`] (authorization is not repeated
    /// there).
    fn admit(&self, principal: &Principal, stream: &StreamName) -> Result<Admission, Rejection>;

    /// Appends the request's events and answers with one receipt per event, in request order,
    /// once they reached the stream's ack point. A whole-request rejection is an `Err`.
    fn ingest(
        &self,
        request: IngestRequest,
    ) -> impl Future<Output = Result<Vec<Receipt>, Rejection>> + Send;

    /// Shared metrics.
    fn metrics(&self) -> &metrics::Metrics;

    /// The in-flight budget adapters reserve from before they read a request's events.
    fn budget(&self) -> &Budget;

    /// The streams `principal` may read (its `consume` grant), by name.
    fn streams(&self, principal: &Principal) -> Vec<StreamInfo> {
        let _ = principal;
        Vec::new()
    }

    /// Reads records of a stream for `principal` (who needs its `consume` permission).
    fn read(
        &self,
        principal: &Principal,
        request: ReadRequest,
    ) -> impl Future<Output = Result<ReadBatch, ReadError>> + Send {
        let _ = (principal, request);
        async {
            Err(ReadError::Unsupported(
                "this gateway serves no reads".into(),
            ))
        }
    }
}
