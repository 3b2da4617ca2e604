//! `GET /v1/streams/{stream}/events`: records of a stream by offset, time or cursor, as JSON or
//! NDJSON, with a long poll at the end (docs/consume.md).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use sluice_core::{Ingest, ReadBatch, ReadError, ReadFrom, ReadRequest, Rejection, StreamName};

use super::ws::query_param;
use super::{error_body, rejection_response};

/// Records answered when the request names no `limit`.
const DEFAULT_LIMIT: usize = 100;
/// Bytes answered when the request names no `max_bytes`.
const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// The response header holding the cursor to continue from (also in JSON bodies as `next`).
pub const CURSOR_HEADER: &str = "sluice-next-cursor";

/// Renders `next` as a cursor: `partition:offset` pairs joined by commas.
pub fn cursor_string(next: &[(u32, u64)]) -> String {
    next.iter()
        .map(|(p, o)| format!("{p}:{o}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a cursor (`0:15,1:7`).
pub fn parse_cursor(s: &str) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (p, o) = part
            .split_once(':')
            .ok_or_else(|| format!("cursor entry `{part}` is not partition:offset"))?;
        let p: u32 = p
            .parse()
            .map_err(|_| format!("cursor partition `{p}` is not a number"))?;
        let o: u64 = o
            .parse()
            .map_err(|_| format!("cursor offset `{o}` is not a number"))?;
        if out.iter().any(|(q, _)| *q == p) {
            return Err(format!("cursor names partition {p} twice"));
        }
        out.push((p, o));
    }
    if out.is_empty() {
        return Err("the cursor is empty".into());
    }
    if out.len() > 4096 {
        return Err("the cursor names more than 4096 partitions".into());
    }
    Ok(out)
}

fn malformed(message: impl Into<String>) -> Rejection {
    Rejection::Malformed {
        message: message.into(),
    }
}

fn number<T: std::str::FromStr>(q: Option<&str>, name: &str) -> Result<Option<T>, Rejection> {
    match query_param(q, name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            malformed(format!(
                "`{name}` must be a non-negative integer, not `{v}`"
            ))
        }),
    }
}

/// The read a request asks for.
pub(super) fn request_of(stream: StreamName, q: Option<&str>) -> Result<ReadRequest, Rejection> {
    let partitions = match query_param(q, "partition") {
        None => None,
        Some(v) => Some(
            v.split(',')
                .map(|p| {
                    p.trim()
                        .parse::<u32>()
                        .map_err(|_| malformed(format!("`partition` must list numbers, not `{v}`")))
                })
                .collect::<Result<Vec<_>, _>>()
                .and_then(|ps| {
                    let mut seen = std::collections::HashSet::new();
                    if ps.len() > 4096 || !ps.iter().all(|p| seen.insert(*p)) {
                        return Err(malformed(
                            "`partition` lists each partition once, 4096 at most",
                        ));
                    }
                    Ok(ps)
                })?,
        ),
    };
    let from_offset: Option<u64> = number(q, "from_offset")?;
    let from_time = query_param(q, "from_time");
    let cursor = query_param(q, "cursor");
    let from = query_param(q, "from");
    let given = [
        from_offset.is_some(),
        from_time.is_some(),
        cursor.is_some(),
        from.is_some(),
    ];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(malformed(
            "give at most one of `from_offset`, `from_time`, `cursor` and `from`",
        ));
    }
    let from = if let Some(o) = from_offset {
        ReadFrom::Offset(o)
    } else if let Some(t) = from_time {
        ReadFrom::Time(parse_time(&t)?)
    } else if let Some(c) = cursor {
        ReadFrom::Cursor(parse_cursor(&c).map_err(malformed)?)
    } else {
        match from.as_deref() {
            None | Some("start") => ReadFrom::Start,
            Some("end") => ReadFrom::End,
            Some(other) => {
                return Err(malformed(format!(
                    "`from` is `start` or `end`, not `{other}`"
                )));
            }
        }
    };
    let limit = number(q, "limit")?.unwrap_or(DEFAULT_LIMIT);
    let max_bytes = number(q, "max_bytes")?.unwrap_or(DEFAULT_MAX_BYTES);
    let wait_ms: u64 = number(q, "wait_ms")?.unwrap_or(0);
    if limit == 0 || max_bytes == 0 {
        return Err(malformed("`limit` and `max_bytes` must be at least 1"));
    }
    Ok(ReadRequest {
        stream,
        partitions,
        from,
        limit,
        max_bytes,
        wait: Duration::from_millis(wait_ms),
        raw: false,
    })
}

/// RFC 3339, or milliseconds since the epoch.
fn parse_time(t: &str) -> Result<i64, Rejection> {
    if let Ok(ms) = t.parse::<i64>() {
        return Ok(ms);
    }
    let at = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            malformed(format!(
                "`from_time` is RFC 3339 (2026-01-02T03:04:05Z) or milliseconds since the epoch, not `{t}`: {e}"
            ))
        })?;
    Ok((at.unix_timestamp_nanos() / 1_000_000) as i64)
}

/// Whether the client asked for NDJSON.
fn wants_ndjson(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.split(';').next().unwrap_or("").trim())
        .any(|t| t == "application/x-ndjson" || t == "application/jsonl")
}

/// Answers a read: records, or the error in the protocol's terms.
pub(super) async fn fetch<I: Ingest>(
    req: &Request<Incoming>,
    principal: &sluice_core::Principal,
    stream: StreamName,
    ingest: &I,
) -> (Response<Full<Bytes>>, &'static str) {
    let request = match request_of(stream, req.uri().query()) {
        Ok(r) => r,
        Err(r) => return (rejection_response(&r), r.code()),
    };
    let ndjson = wants_ndjson(req);
    match ingest.read(principal, request).await {
        Ok(batch) => (render(batch, ndjson), "ok"),
        Err(e) => error(e),
    }
}

fn render(batch: ReadBatch, ndjson: bool) -> Response<Full<Bytes>> {
    let cursor = cursor_string(&batch.next);
    let size: usize = batch.records.iter().map(|r| r.json.len() + 1).sum();
    let mut body = BytesMut::with_capacity(size + cursor.len() + 64);
    let content_type = if ndjson {
        for r in &batch.records {
            body.put_slice(&r.json);
            body.put_u8(b'\n');
        }
        "application/x-ndjson"
    } else {
        body.put_slice(b"{\"records\":[");
        for (i, r) in batch.records.iter().enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(&r.json);
        }
        body.put_slice(b"],\"next\":");
        body.put_slice(
            serde_json::Value::String(cursor.clone())
                .to_string()
                .as_bytes(),
        );
        body.put_u8(b'}');
        "application/json"
    };
    let mut resp = Response::new(Full::new(body.freeze()));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&cursor) {
        resp.headers_mut().insert(CURSOR_HEADER, v);
    }
    resp
}

pub(super) fn error(e: ReadError) -> (Response<Full<Bytes>>, &'static str) {
    let json = |status: StatusCode, v: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r
    };
    match e {
        ReadError::Rejected(r) => (rejection_response(&r), r.code()),
        ReadError::Forbidden(stream) => (
            error_body(
                StatusCode::FORBIDDEN,
                "forbidden",
                &format!("not allowed to consume stream `{stream}` (it needs a `consume` grant)"),
            ),
            "forbidden",
        ),
        ReadError::NoStream(stream) => (
            error_body(
                StatusCode::NOT_FOUND,
                "stream_not_found",
                &format!("stream `{stream}` does not exist"),
            ),
            "stream_not_found",
        ),
        ReadError::Gone {
            partition,
            earliest,
        } => (
            json(
                StatusCode::GONE,
                serde_json::json!({"error": {
                    "code": "offset_gone",
                    "message": format!("partition {partition} no longer holds that offset (retention deleted it); its earliest offset is {earliest}"),
                    "partition": partition,
                    "earliest_offset": earliest,
                }}),
            ),
            "offset_gone",
        ),
        ReadError::OutOfRange { partition, end } => (
            json(
                StatusCode::RANGE_NOT_SATISFIABLE,
                serde_json::json!({"error": {
                    "code": "offset_out_of_range",
                    "message": format!("partition {partition} ends at offset {end}: read from at most {end}"),
                    "partition": partition,
                    "end_offset": end,
                }}),
            ),
            "offset_out_of_range",
        ),
        ReadError::Unsupported(message) => (
            error_body(StatusCode::NOT_IMPLEMENTED, "unsupported", &message),
            "unsupported",
        ),
    }
}

/// A live tail's body: frames handed over by its task through a small bounded channel, so a
/// slow subscriber holds at most two chunks (its task waits, and resumes from its cursor).
pub struct SseBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl SseBody {
    /// A body of the chunks a task sends on `rx`, ending when the task drops its sender.
    pub(super) fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        Self { rx }
    }
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// The response body of the HTTP listener: whole, or a live tail.
pub type Body = http_body_util::Either<Full<Bytes>, SseBody>;

/// Records (and bytes) per read of a live tail.
const TAIL_LIMIT: usize = 256;
const TAIL_BYTES: usize = 256 * 1024;

/// Whether the request asks for Server-Sent Events.
pub(super) fn wants_sse(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.split(';').next().unwrap_or("").trim() == "text/event-stream")
}

/// The limits of live tails on one listener.
pub(super) struct Subscribers {
    pub(super) total: Arc<tokio::sync::Semaphore>,
    pub(super) per_principal: Arc<crate::server::Counted<Arc<str>>>,
    /// A comment every this long without records, so proxies and clients see the stream live.
    pub(super) heartbeat: Duration,
}

/// A live tail's places in its listener's limits, held while it lasts.
pub(super) type Slots = (
    tokio::sync::OwnedSemaphorePermit,
    Option<crate::server::Slot<Arc<str>>>,
);

impl Subscribers {
    /// Takes a live tail's places: 503 when the listener has its maximum open, 429 when the
    /// principal has.
    pub(super) fn take(&self, principal: &sluice_core::Principal) -> Result<Slots, Rejection> {
        let Ok(total) = self.total.clone().try_acquire_owned() else {
            return Err(Rejection::unavailable(
                Duration::from_secs(1),
                "the listener has its maximum of live tails open (http.max_subscribers)",
            ));
        };
        let Ok(mine) = self.per_principal.take(principal.identity().clone()) else {
            return Err(Rejection::OverQuota {
                retry_after: Duration::from_secs(1),
                message: format!(
                    "principal `{}` has its maximum of live tails open (http.max_subscribers_per_principal)",
                    principal.name()
                ),
            });
        };
        Ok((total, mine))
    }
}

/// One SSE event: `id` the cursor after it, `data` the record.
fn sse_event(cursor: &str, json: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(json.len() + cursor.len() + 16);
    e.extend_from_slice(b"id: ");
    e.extend_from_slice(cursor.as_bytes());
    e.extend_from_slice(b"\ndata: ");
    e.extend_from_slice(json);
    e.extend_from_slice(b"\n\n");
    e
}

/// `GET /v1/streams/{stream}/events` with `Accept: text/event-stream`: a live tail from the
/// request's position (default: the end; `Last-Event-ID` resumes), each record an event whose
/// id is the cursor after it, a heartbeat comment every 15 s without records.
pub(super) async fn subscribe<I: Ingest>(
    req: &Request<Incoming>,
    (principal, mut auth, gate): (
        sluice_core::Principal,
        crate::gate::SessionAuth,
        crate::gate::Gate,
    ),
    stream: StreamName,
    ingest: Arc<I>,
    subscribers: &Subscribers,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> (Response<Body>, &'static str) {
    let whole = |(r, o): (Response<Full<Bytes>>, &'static str)| (r.map(Body::Left), o);
    let mut request = match request_of(stream, req.uri().query()) {
        Ok(r) => r,
        Err(r) => return whole((rejection_response(&r), r.code())),
    };
    let positioned = ["from_offset", "from_time", "cursor", "from"]
        .iter()
        .any(|k| query_param(req.uri().query(), k).is_some());
    // EventSource reconnects with the last event's id: the cursor after it.
    let last_id = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    if let Some(id) = last_id {
        match parse_cursor(id) {
            Ok(c) => request.from = ReadFrom::Cursor(c),
            Err(e) => {
                let r = malformed(format!("Last-Event-ID: {e}"));
                return whole((rejection_response(&r), r.code()));
            }
        }
    } else if !positioned {
        // A live tail starts at the end unless told otherwise.
        request.from = ReadFrom::End;
    }
    let (total, mine) = match subscribers.take(&principal) {
        Ok(slots) => slots,
        Err(r) => return whole((rejection_response(&r), r.code())),
    };
    // The first read answers what is wrong (permission, stream, position) as a status, before
    // the stream starts.
    let first = ReadRequest {
        wait: Duration::ZERO,
        limit: TAIL_LIMIT,
        max_bytes: TAIL_BYTES,
        ..request.clone()
    };
    let first = match ingest.read(&principal, first).await {
        Ok(b) => b,
        Err(e) => return whole(error(e)),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let gauge = ingest.metrics().connections_of("sse");
    let heartbeat = subscribers.heartbeat.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let _held = (total, mine);
        gauge.inc();
        let mut batch = first;
        // The reconnection delay EventSource waits after a drop.
        let mut out = b"retry: 2000\n\n".to_vec();
        loop {
            // The cursor after each record, a valid place to resume: every partition where it
            // stood before the batch (its first record's offset, or where the batch left it
            // when it read none), moved past each record in turn.
            // Taken, so that a loop without a new read (a re-check) sends nothing twice.
            let mut at = batch.before();
            let records = std::mem::take(&mut batch.records);
            for r in &records {
                match at.iter_mut().find(|(p, _)| *p == r.partition) {
                    Some(e) => e.1 = r.offset + 1,
                    None => at.push((r.partition, r.offset + 1)),
                }
                out.extend_from_slice(&sse_event(&cursor_string(&at), &r.json));
            }
            if out.is_empty() {
                out.extend_from_slice(b": heartbeat\n\n");
            }
            if tx
                .send(Bytes::from(std::mem::take(&mut out)))
                .await
                .is_err()
            {
                break; // the subscriber is gone
            }
            let next = ReadRequest {
                partitions: None,
                from: ReadFrom::Cursor(batch.next.clone()),
                wait: heartbeat,
                limit: TAIL_LIMIT,
                max_bytes: TAIL_BYTES,
                ..request.clone()
            };
            tokio::select! {
                r = read_paced(&*ingest, &principal, next) => match r {
                    Ok(b) => batch = b,
                    Err(e) => {
                        // Said as an event, then the stream ends (retention overtook a slow
                        // subscriber, a revoked grant, ...).
                        let (resp, _) = error(e);
                        let body = http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let mut e = b"event: error\ndata: ".to_vec();
                        e.extend_from_slice(&body);
                        e.extend_from_slice(b"\n\n");
                        let _ = tx.send(Bytes::from(e)).await;
                        break;
                    }
                },
                _ = tx.closed() => break,
                () = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
                // A reload or the credential's expiry: the tail goes on only while its
                // principal stands with its grant.
                _ = auth.due() => if let Err(revoked) = gate.recheck(&mut auth).await {
                    ingest.metrics().session_revoked("http");
                    let e = serde_json::json!({"error": {"code": "revoked", "message": revoked.to_string()}});
                    let _ = tx.send(Bytes::from(format!("event: error\ndata: {e}\n\n"))).await;
                    break;
                },
            }
        }
        gauge.dec();
    });
    let mut resp = Response::new(Body::Right(SseBody { rx }));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    // Reverse proxies (nginx) pass the events on at once.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    (resp, "ok")
}

/// A live tail's read: over its read quota it waits for the quota (up to the read's own wait)
/// instead of failing, so a tail is paced to its quota the way producers are; past the wait it
/// answers no records at the same position.
pub(crate) async fn read_paced<I: Ingest>(
    ingest: &I,
    principal: &sluice_core::Principal,
    req: ReadRequest,
) -> Result<ReadBatch, ReadError> {
    let deadline = tokio::time::Instant::now() + req.wait;
    loop {
        // Over the quota, a tail (reading by cursor) waits; anything else is answered as is.
        let r = ingest.read(principal, req.clone()).await;
        let (
            Err(ReadError::Rejected(Rejection::OverQuota { retry_after, .. })),
            ReadFrom::Cursor(pos),
        ) = (&r, &req.from)
        else {
            return r;
        };
        let at = tokio::time::Instant::now() + *retry_after;
        if at > deadline {
            tokio::time::sleep_until(deadline).await;
            return Ok(ReadBatch {
                records: Vec::new(),
                next: pos.clone(),
            });
        }
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let c = parse_cursor("0:15,3:7").unwrap();
        assert_eq!(c, vec![(0, 15), (3, 7)]);
        assert_eq!(cursor_string(&c), "0:15,3:7");
        for bad in ["", "0", "x:1", "0:y", "0:1,0:2", "0:-1"] {
            assert!(parse_cursor(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_request_names_one_position() {
        let s = || StreamName::parse("s").unwrap();
        let r = request_of(s(), Some("from_offset=5&limit=10&wait_ms=200")).unwrap();
        assert_eq!(r.from, ReadFrom::Offset(5));
        assert_eq!((r.limit, r.wait), (10, Duration::from_millis(200)));
        assert_eq!(request_of(s(), None).unwrap().from, ReadFrom::Start);
        assert_eq!(
            request_of(s(), Some("from=end")).unwrap().from,
            ReadFrom::End
        );
        assert_eq!(
            request_of(s(), Some("from_time=1970-01-01T00:00:01Z"))
                .unwrap()
                .from,
            ReadFrom::Time(1000)
        );
        assert_eq!(
            request_of(s(), Some("partition=0,2")).unwrap().partitions,
            Some(vec![0, 2])
        );
        for bad in [
            "from_offset=1&from=end",
            "from_offset=-1",
            "limit=0",
            "from=middle",
            "from_time=yesterday",
            "partition=a",
            "partition=1,1",
        ] {
            assert!(request_of(s(), Some(bad)).is_err(), "{bad}");
        }
    }
}
