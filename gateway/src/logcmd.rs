//! `sluice log read|tail`: the embedded log as NDJSON, one record per line:
//! `{"stream","partition","offset","timestamp","timestamp_ms","key","id","headers","value","value_encoding"}`.
//! Text that is valid UTF-8 is printed as a string, anything else as base64, and with
//! `--json-values` a JSON event's value as JSON (the shape of the network read side,
//! docs/consume.md); the `…_encoding` fields say which.

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::Args;
use serde_json::{Map, Value, json};
use sluice_log::{PartitionReader, Record, partition_dirs};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// How often `tail` looks for new records when it has printed everything.
const TAIL_POLL: Duration = Duration::from_millis(200);

/// Which records `log read` and `log tail` print.
#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// The embedded log's data directory.
    #[arg(long, default_value = "./data")]
    pub data_dir: PathBuf,
    /// The stream to read.
    #[arg(long)]
    pub stream: String,
    /// Only this partition (default: every partition, one after another).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Start at this offset in each partition.
    #[arg(long, conflicts_with = "from_time")]
    pub from_offset: Option<u64>,
    /// Start at the first record received at or after this time (RFC 3339).
    #[arg(long)]
    pub from_time: Option<String>,
    /// Print at most this many records.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Print a JSON event's value as JSON (`"value_encoding":"json"`) instead of a string, as
    /// `GET /v1/streams/{stream}/events` does.
    #[arg(long)]
    pub json_values: bool,
}

pub fn run(args: &ReadArgs, follow: bool) -> ExitCode {
    match read(args, follow) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice log: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read(args: &ReadArgs, follow: bool) -> io::Result<()> {
    let from_time = match &args.from_time {
        Some(t) => Some(
            OffsetDateTime::parse(t, &Rfc3339)
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "--from-time {t:?} is not RFC 3339 (e.g. 2026-01-02T03:04:05Z): {e}"
                        ),
                    )
                })?
                .unix_timestamp_nanos()
                / 1_000_000,
        ),
        None => None,
    };
    let dirs = partition_dirs(&args.data_dir, &args.stream).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "stream `{}` not found in {}: {e}",
                args.stream,
                args.data_dir.display()
            ),
        )
    })?;
    let mut readers = Vec::new();
    for (p, dir) in dirs {
        if args.partition.is_some_and(|want| want != p) {
            continue;
        }
        let r = match from_time {
            Some(t) => PartitionReader::from_time(&dir, t as i64)?,
            None => PartitionReader::from_offset(&dir, args.from_offset.unwrap_or(0))?,
        };
        readers.push((p, r));
    }
    if let Some(want) = args.partition
        && readers.is_empty()
    {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("stream `{}` has no partition {want}", args.stream),
        ));
    }
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let mut printed = 0u64;
    let limit = args.limit.unwrap_or(u64::MAX);
    loop {
        let mut progressed = false;
        for (p, r) in &mut readers {
            while printed < limit {
                let Some(rec) = r.next_record()? else { break };
                serde_json::to_writer(&mut out, &render(&args.stream, *p, &rec, args.json_values))?;
                out.write_all(b"\n")?;
                printed += 1;
                progressed = true;
            }
        }
        if !follow || printed >= limit {
            break;
        }
        if !progressed {
            out.flush()?;
            std::thread::sleep(TAIL_POLL);
        }
    }
    out.flush()
}

fn text_or_base64(map: &mut Map<String, Value>, field: &str, bytes: Option<&[u8]>) {
    let v = match bytes {
        None => Value::Null,
        Some(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => {
                map.insert(format!("{field}_encoding"), json!("base64"));
                Value::String(base64::engine::general_purpose::STANDARD.encode(b))
            }
        },
    };
    map.insert(field.to_string(), v);
}

/// One record as a JSON object; with `json_values`, a JSON event's value is JSON in it (the
/// network read side; `sluice log read --json-values`), otherwise a string as stored.
pub fn render(stream: &str, partition: u32, r: &Record, json_values: bool) -> Value {
    let mut m = Map::new();
    m.insert("stream".into(), json!(stream));
    m.insert("partition".into(), json!(partition));
    m.insert("offset".into(), json!(r.offset));
    // The event's time: the producer's when it gave one (the time of receipt is then the
    // header `sluice-received-at`, as records in Kafka have it), else the time of receipt.
    let at = r.event_time_ms();
    let ts = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok());
    m.insert("timestamp".into(), json!(ts));
    m.insert("timestamp_ms".into(), json!(at));
    text_or_base64(&mut m, "key", r.key.as_deref());
    text_or_base64(&mut m, "id", r.id.as_deref());
    let mut headers = Map::new();
    let lossy = |b: &[u8]| Value::String(String::from_utf8_lossy(b).into_owned());
    // An event's own `content-type` header (gRPC, MQTT 5) wins over the batch's.
    headers.insert("content-type".into(), lossy(&r.content_type));
    for (k, v) in &r.headers {
        headers.insert(String::from_utf8_lossy(k).into_owned(), lossy(v));
    }
    // Sluice's own facts last, so that no stored header (older records were not checked
    // against the reserved names) can stand in for them.
    headers.insert("sluice-protocol".into(), lossy(&r.protocol));
    let (name, source) = r.principal_parts();
    headers.insert("sluice-principal".into(), lossy(name));
    if let Some(source) = source {
        headers.insert("sluice-principal-source".into(), lossy(source));
    }
    if r.producer_timestamp_ms.is_some() {
        headers.insert(
            "sluice-received-at".into(),
            json!(r.timestamp_ms.to_string()),
        );
    }
    m.insert("headers".into(), Value::Object(headers));
    // JSON events (their content type says so, and they parse) are JSON in the output; other
    // text is a string, anything else base64.
    let content_type = r
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k.eq_ignore_ascii_case(b"content-type"))
        .map_or(&r.content_type[..], |(_, v)| &v[..]);
    let as_json = (json_values && is_json_type(content_type))
        .then(|| serde_json::from_slice::<Value>(&r.value).ok())
        .flatten();
    let (value, encoding) = match as_json {
        Some(v) => (v, "json"),
        None if std::str::from_utf8(&r.value).is_ok() => (lossy(&r.value), "utf8"),
        None => (
            json!(base64::engine::general_purpose::STANDARD.encode(&r.value)),
            "base64",
        ),
    };
    m.insert("value".into(), value);
    m.insert("value_encoding".into(), json!(encoding));
    Value::Object(m)
}

/// `application/json`, or a `+json` type (`application/cloudevents+json`), parameters aside.
fn is_json_type(ct: &[u8]) -> bool {
    let ct = std::str::from_utf8(ct).unwrap_or("");
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}
