//! `sluice-loadtest`: an HTTP load generator for Sluice with open-loop (fixed target rate,
//! latency measured from each request's intended send time, so queueing is not hidden) and
//! closed-loop (each connection sends as fast as it gets answers) modes, HDR latency histograms
//! and JSON output. `sink` runs a do-nothing HTTP server as a peer: the ceiling of the HTTP
//! stack and the generator on the same machine.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};

mod attack;
mod mqtt;
mod otlp;
mod read;

#[derive(Parser)]
#[command(name = "sluice-loadtest", about = "Load generator for Sluice")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// POST events to an HTTP ingest URL.
    Http(HttpArgs),
    /// A peer: produce straight to Kafka with rdkafka, with the producer settings of a Sluice
    /// config file's `[log.kafka]`, in batches like HTTP requests, each awaiting its delivery
    /// reports.
    Kafka(KafkaArgs),
    /// gRPC `sluice.v1.Ingest`: unary `Publish` calls or `PublishStream` with many batches in
    /// flight per stream (closed loop).
    Grpc(GrpcArgs),
    /// WebSocket: frames of JSON events on `/v1/streams/{stream}/ws`, each acked per event;
    /// a window of unacked frames per connection (closed loop), or a target rate (open loop).
    Ws(WsArgs),
    /// MQTT 3.1.1 QoS 1 (or 0) publishes over TCP, a window per connection (closed loop) or a
    /// target rate (open loop); `--idle` holds idle connections (memory per connection).
    Mqtt(mqtt::MqttArgs),
    /// Peak memory of a gateway (a fresh process per scenario) under inputs built to make it
    /// allocate far more than they cost to send: unauthenticated gRPC messages of empty events,
    /// bodies of millions of tiny events, events with thousands of empty headers.
    AttackRss(attack::AttackArgs),
    /// The read side: a stream read back by cursor in batches (`GET .../events`).
    ReadFetch(read::FetchArgs),
    /// The read side: SSE subscribers of one stream while producers write at a target rate;
    /// fan-out throughput and ack → receipt latency.
    ReadTail(read::TailArgs),
    /// An OTLP/gRPC trace receiver that accepts every export and counts its spans (for
    /// `bench-traces.sh`); prints `otlp=ADDR`, and the spans received when it ends (SIGTERM).
    OtlpSink {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// A peer: an HTTP server that reads each request body and answers 200 at once.
    Sink {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Print an HS256-signed JWT (for benchmarks against an issuer with `hs256_secret`).
    Token {
        #[arg(long)]
        hs256_secret: String,
        #[arg(long)]
        iss: String,
        #[arg(long, default_value = "sluice")]
        aud: String,
        #[arg(long, default_value = "loadtest")]
        sub: String,
        #[arg(long, default_value = "produce:*")]
        scope: String,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

#[derive(Parser, Clone)]
struct HttpArgs {
    /// e.g. http://127.0.0.1:8080/v1/streams/bench/events
    #[arg(long)]
    url: String,
    /// Concurrent HTTP/1.1 connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Events in each request (a JSON array).
    #[arg(long, default_value_t = 1)]
    events_per_request: usize,
    /// Bytes of each event's value (a JSON string of this length, quotes included).
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Target requests per second over all connections (open loop); 0 = closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    /// Seconds of load before measuring starts.
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Extra request header `name: value` (repeatable), e.g. `authorization: Bearer …`.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// PEM CA bundle to trust for an https:// URL.
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// Open a new connection (and TLS handshake) for every request.
    #[arg(long)]
    new_connection_per_request: bool,
    /// Give every event a unique `id` (`{run}-{connection}-{request}-{index}`), so a stream
    /// with `dedup = true` checks and records each one (docs/exactly-once.md).
    #[arg(long)]
    ids: bool,
    /// Send this file's bytes as every request's body (a JSON array of events), instead of
    /// `--events-per-request` strings of `--payload-bytes`.
    #[arg(long)]
    body_file: Option<std::path::PathBuf>,
}

#[derive(Parser, Clone)]
struct KafkaArgs {
    /// Sluice config file whose `[log.kafka]` settings the producer uses (bootstrap servers,
    /// compression, linger, batch size, idempotence, acks, overrides).
    #[arg(long)]
    config: std::path::PathBuf,
    /// Topic to produce to (must exist).
    #[arg(long)]
    topic: String,
    /// Concurrent producers, each with one batch outstanding (like HTTP connections).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Events per batch (like events per HTTP request); one partition per batch, round robin.
    #[arg(long, default_value_t = 100)]
    events_per_request: usize,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Leave out the headers Sluice adds to each record (content type, principal, protocol,
    /// receive time).
    #[arg(long)]
    no_headers: bool,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Clone)]
struct GrpcArgs {
    /// e.g. http://127.0.0.1:50051
    #[arg(long)]
    url: String,
    #[arg(long)]
    stream: String,
    /// `unary` (Publish) or `stream` (PublishStream).
    #[arg(long, default_value = "stream")]
    mode: String,
    /// HTTP/2 connections (one call at a time per connection in unary mode; one
    /// PublishStream per connection in stream mode).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Unary calls in flight per connection (HTTP/2 streams).
    #[arg(long, default_value_t = 1)]
    calls_per_connection: usize,
    /// Batches in flight per PublishStream.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
    #[arg(long, default_value_t = 100)]
    events_per_request: usize,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Target calls (unary) or batches (stream) per second over all connections (open loop;
    /// latency counted from each call's intended start); 0 = closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Clone)]
struct WsArgs {
    /// e.g. ws://127.0.0.1:8080/v1/streams/bench/ws
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Unacked frames per connection.
    #[arg(long, default_value_t = 32)]
    window: usize,
    #[arg(long, default_value_t = 1)]
    events_per_frame: usize,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Target frames per second over all connections (open loop); 0 = closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    mode: &'static str,
    url: String,
    connections: usize,
    events_per_request: usize,
    payload_bytes: usize,
    target_rate_rps: f64,
    duration_s: f64,
    requests: u64,
    events: u64,
    errors: u64,
    non_2xx: u64,
    /// Non-2xx answers by status code.
    statuses: std::collections::BTreeMap<u16, u64>,
    /// Events the gateway acked (results with an offset), counted from the response bodies.
    admitted_events: u64,
    admitted_events_per_s: f64,
    requests_per_s: f64,
    events_per_s: f64,
    payload_mb_per_s: f64,
    latency_us: Latency,
}

#[derive(Serialize)]
struct Latency {
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

struct Tally {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
    non_2xx: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    admitted: u64,
}

impl Tally {
    fn new() -> Result<Self> {
        Ok(Tally {
            hist: Histogram::new(3)?,
            ok: 0,
            errors: 0,
            non_2xx: 0,
            statuses: Default::default(),
            admitted: 0,
        })
    }
}

/// Waits for every connection's tally and adds them up.
/// Latency percentiles of `h` (µs) for the JSON reports.
fn latency_json(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

async fn total_of(tasks: Vec<tokio::task::JoinHandle<Result<Tally>>>) -> Result<Tally> {
    let mut total = Tally::new()?;
    for t in tasks {
        let t = t.await??;
        total.hist.add(&t.hist)?;
        total.ok += t.ok;
        total.errors += t.errors;
        total.non_2xx += t.non_2xx;
        total.admitted += t.admitted;
        for (k, v) in t.statuses {
            *total.statuses.entry(k).or_default() += v;
        }
    }
    Ok(total)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Cmd::Http(a) => rt.block_on(http(a)),
        Cmd::Kafka(a) => rt.block_on(kafka(a)),
        Cmd::Grpc(a) => rt.block_on(grpc(a)),
        Cmd::Ws(a) => rt.block_on(ws(a)),
        Cmd::Mqtt(a) => rt.block_on(mqtt::run(a)),
        Cmd::ReadFetch(a) => rt.block_on(read::fetch(a)),
        Cmd::ReadTail(a) => rt.block_on(read::tail(a)),
        Cmd::AttackRss(a) => rt.block_on(attack::run(a)),
        Cmd::Sink { listen } => rt.block_on(sink(listen)),
        Cmd::OtlpSink { listen } => rt.block_on(otlp::sink(listen)),
        Cmd::Token {
            hs256_secret,
            iss,
            aud,
            sub,
            scope,
            ttl_secs,
        } => {
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                + ttl_secs;
            let claims =
                serde_json::json!({"iss": iss, "aud": aud, "sub": sub, "scope": scope, "exp": exp});
            let token = jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(hs256_secret.as_bytes()),
            )?;
            println!("{token}");
            Ok(())
        }
    }
}

/// A body of `events` events with unique ids (see `--ids`).
fn body_with_ids(events: usize, payload: usize, prefix: &str, request: u64) -> Bytes {
    let value = format!("\"{}\"", "x".repeat(payload.saturating_sub(2)));
    let mut s = String::with_capacity(events * (value.len() + 40) + 2);
    s.push('[');
    for i in 0..events {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"id\":\"{prefix}-{request}-{i}\",\"value\":{value}}}"
        ));
    }
    s.push(']');
    Bytes::from(s)
}

fn body(events: usize, payload: usize) -> Bytes {
    let value = format!("\"{}\"", "x".repeat(payload.saturating_sub(2)));
    let mut s = String::with_capacity(events * (value.len() + 1) + 2);
    s.push('[');
    for i in 0..events {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&value);
    }
    s.push(']');
    Bytes::from(s)
}

async fn http(a: HttpArgs) -> Result<()> {
    let uri: hyper::Uri = a.url.parse().context("--url")?;
    let host = uri.host().context("--url needs a host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await?
        .next()
        .context("resolving --url")?;
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let payload = match &a.body_file {
        Some(f) => {
            Bytes::from(std::fs::read(f).with_context(|| format!("--body-file {}", f.display()))?)
        }
        None => body(a.events_per_request, a.payload_bytes),
    };
    let tls = match uri.scheme_str() {
        Some("https") => Some(tls_connector(a.tls_ca.as_deref(), &host)?),
        _ => None,
    };
    let mut headers = Vec::new();
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .context("--header must be `name: value`")?;
        headers.push((
            http::HeaderName::from_bytes(k.trim().as_bytes())?,
            http::HeaderValue::from_str(v.trim())?,
        ));
    }
    let conn = Arc::new(ConnSpec {
        addr,
        tls,
        headers,
        fresh: a.new_connection_per_request,
    });
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs_f64(a.warmup_secs);
    let end = measure_from + Duration::from_secs_f64(a.duration_secs);
    let stop = Arc::new(AtomicBool::new(false));
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(a.connections as f64 / a.rate));

    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        let (uri, payload, stop, conn) = (uri.clone(), payload.clone(), stop.clone(), conn.clone());
        let ids = a.ids.then(|| {
            (
                format!("{run:x}-{c}"),
                a.events_per_request,
                a.payload_bytes,
            )
        });
        // Spread the connections' schedules evenly over one interval.
        let offset = interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(c as f64 / a.connections as f64)
        });
        tasks.push(tokio::spawn(async move {
            connection(
                conn,
                uri,
                payload,
                ids,
                start + offset,
                interval,
                measure_from,
                end,
                stop,
            )
            .await
        }));
    }
    let total = total_of(tasks).await?;
    let secs = a.duration_secs;
    let h = &total.hist;
    let report = Report {
        mode: if interval.is_some() { "open" } else { "closed" },
        url: a.url.clone(),
        connections: a.connections,
        events_per_request: a.events_per_request,
        payload_bytes: a.payload_bytes,
        target_rate_rps: a.rate,
        duration_s: secs,
        requests: total.ok,
        events: total.ok * a.events_per_request as u64,
        errors: total.errors,
        non_2xx: total.non_2xx,
        statuses: total.statuses.clone(),
        admitted_events: total.admitted,
        admitted_events_per_s: total.admitted as f64 / secs,
        requests_per_s: total.ok as f64 / secs,
        events_per_s: (total.ok * a.events_per_request as u64) as f64 / secs,
        payload_mb_per_s: (total.ok as f64 * payload.len() as f64) / secs / 1e6,
        latency_us: Latency {
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        },
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} loop, {} conns, {} ev/req, {} B/ev: {:.0} req/s, {:.0} events/s, {:.1} MB/s; latency p50 {} us, p99 {} us, p99.9 {} us, max {} us; {} errors, {} non-2xx",
            report.mode,
            a.connections,
            a.events_per_request,
            a.payload_bytes,
            report.requests_per_s,
            report.events_per_s,
            report.payload_mb_per_s,
            report.latency_us.p50,
            report.latency_us.p99,
            report.latency_us.p999,
            report.latency_us.max,
            report.errors,
            report.non_2xx
        );
    }
    Ok(())
}

/// How each connection is made and what each request carries.
struct ConnSpec {
    addr: SocketAddr,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    headers: Vec<(http::HeaderName, http::HeaderValue)>,
    fresh: bool,
}

fn tls_connector(
    ca: Option<&std::path::Path>,
    host: &str,
) -> Result<(
    tokio_rustls::TlsConnector,
    rustls_pki_types::ServerName<'static>,
)> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        for c in rustls_pki_types::CertificateDer::pem_file_iter(ca)? {
            roots.add(c?)?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok((
        tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        rustls_pki_types::ServerName::try_from(host.to_string())?,
    ))
}

#[allow(clippy::too_many_arguments)]
async fn connection(
    spec: Arc<ConnSpec>,
    uri: hyper::Uri,
    payload: Bytes,
    ids: Option<(String, usize, usize)>,
    first: Instant,
    interval: Option<Duration>,
    measure_from: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
) -> Result<Tally> {
    let mut t = Tally {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        ok: 0,
        errors: 0,
        non_2xx: 0,
        statuses: Default::default(),
        admitted: 0,
    };
    let mut sender = None;
    let mut due = first;
    let mut sent: u64 = 0;
    tokio::time::sleep_until(first.into()).await;
    while !stop.load(Ordering::Relaxed) {
        let intended = match interval {
            Some(i) => {
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let d = due;
                due += i;
                d
            }
            None => Instant::now(),
        };
        if intended >= end {
            break;
        }
        if sender.is_none() {
            match connect(&spec).await {
                Ok(s) => sender = Some(s),
                Err(_) => {
                    t.errors += 1;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected above");
        let body = match &ids {
            Some((prefix, events, bytes)) => body_with_ids(*events, *bytes, prefix, sent),
            None => payload.clone(),
        };
        sent += 1;
        let mut req = Request::post(&uri)
            .header("content-type", "application/json")
            .header("host", uri.authority().map_or("localhost", |a| a.as_str()))
            .body(Full::new(body))?;
        for (k, v) in &spec.headers {
            req.headers_mut().insert(k.clone(), v.clone());
        }
        let result = async {
            s.ready().await?;
            let resp = s.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            // Acked events are the results with an offset.
            let admitted = body.windows(9).filter(|w| w == b"\"offset\":").count() as u64;
            anyhow::Ok((status, admitted))
        }
        .await;
        let done = Instant::now();
        let measured = intended >= measure_from;
        match result {
            Ok((status, admitted)) if status.is_success() => {
                if measured {
                    t.ok += 1;
                    t.admitted += admitted;
                    let us = done.duration_since(intended).as_micros() as u64;
                    t.hist.record(us.clamp(1, 60_000_000))?;
                }
            }
            Ok((status, _)) => {
                if measured {
                    t.non_2xx += 1;
                    *t.statuses.entry(status.as_u16()).or_default() += 1;
                }
            }
            Err(_) => {
                t.errors += u64::from(measured);
                sender = None;
            }
        }
        if spec.fresh {
            sender = None;
        }
    }
    Ok(t)
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(spec: &ConnSpec) -> Result<Sender> {
    let tcp = TcpStream::connect(spec.addr).await?;
    tcp.set_nodelay(true)?;
    match &spec.tls {
        None => {
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
        Some((connector, name)) => {
            let tls = connector.connect(name.clone(), tcp).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
    }
}

async fn sink(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("sink listening: http={}", listener.local_addr()?);
    loop {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let n = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(0);
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(format!(
                        "{{\"bytes\":{n}}}"
                    )))))
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Direct rdkafka producer: the ceiling of Kafka ingest on this machine with Sluice's settings.
async fn kafka(a: KafkaArgs) -> Result<()> {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

    let config = sluice_config::Config::load(Some(&a.config), std::env::vars())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The same properties as the gateway's producer, computed where the Kafka config lives.
    let mut props = rdkafka::ClientConfig::new();
    for (key, value) in config.log.kafka.producer_properties() {
        props.set(key, value);
    }
    let producer: FutureProducer = props.create()?;
    let md = producer
        .client()
        .fetch_metadata(Some(&a.topic), Duration::from_secs(10))?;
    let partitions = md
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    if partitions == 0 {
        bail!("topic {} does not exist (or has no partitions)", a.topic);
    }
    let value = Bytes::from(format!(
        "\"{}\"",
        "x".repeat(a.payload_bytes.saturating_sub(2))
    ));
    let start = Instant::now() + Duration::from_millis(200);
    let measure_from = start + Duration::from_secs_f64(a.warmup_secs);
    let end = measure_from + Duration::from_secs_f64(a.duration_secs);
    let next_partition = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let mut tasks = Vec::new();
    for _ in 0..a.connections {
        let (producer, value, a, next_partition) = (
            producer.clone(),
            value.clone(),
            a.clone(),
            next_partition.clone(),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut t = Tally::new()?;
            while Instant::now() < end {
                let sent = Instant::now();
                let p = next_partition.fetch_add(1, Ordering::Relaxed) % partitions;
                let received = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis()
                    .to_string();
                let mut deliveries = Vec::with_capacity(a.events_per_request);
                for _ in 0..a.events_per_request {
                    let headers = (!a.no_headers).then(|| {
                        [
                            ("content-type", &b"application/json"[..]),
                            ("sluice-principal", b"anonymous"),
                            ("sluice-protocol", b"http"),
                            ("sluice-received-at", received.as_bytes()),
                        ]
                        .into_iter()
                        .fold(
                            OwnedHeaders::new_with_capacity(4),
                            |h, (key, v)| {
                                h.insert(Header {
                                    key,
                                    value: Some(v),
                                })
                            },
                        )
                    });
                    let record: FutureRecord<'_, [u8], [u8]> = FutureRecord {
                        topic: &a.topic,
                        partition: Some(p),
                        payload: Some(&value[..]),
                        key: None,
                        timestamp: None,
                        headers,
                    };
                    match producer.send_result(record) {
                        Ok(d) => deliveries.push(d),
                        Err(_) => t.errors += 1,
                    }
                }
                let mut acked = 0;
                for d in deliveries {
                    match d.await {
                        Ok(Ok(_)) => acked += 1,
                        _ => t.errors += 1,
                    }
                }
                if sent >= measure_from && Instant::now() <= end {
                    t.ok += 1;
                    t.admitted += acked;
                    t.hist.record(sent.elapsed().as_micros() as u64)?;
                }
            }
            anyhow::Ok(t)
        }));
    }
    let tally = total_of(tasks).await?;
    let (total, batches, acked, errors) = (&tally.hist, tally.ok, tally.admitted, tally.errors);
    let secs = a.duration_secs;
    let report = serde_json::json!({
        "mode": "kafka-direct",
        "topic": a.topic,
        "connections": a.connections,
        "events_per_request": a.events_per_request,
        "payload_bytes": a.payload_bytes,
        "duration_s": secs,
        "requests": batches,
        "errors": errors,
        "admitted_events": acked,
        "admitted_events_per_s": acked as f64 / secs,
        "latency_us": {
            "p50": total.value_at_quantile(0.5),
            "p99": total.value_at_quantile(0.99),
            "max": total.max(),
        },
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "kafka direct, {} producers, {} ev/batch, {} B/ev: {:.0} events/s acked; batch latency p50 {} us, p99 {} us; {} errors",
            a.connections,
            a.events_per_request,
            a.payload_bytes,
            acked as f64 / secs,
            total.value_at_quantile(0.5),
            total.value_at_quantile(0.99),
            errors
        );
    }
    Ok(())
}

/// gRPC load: unary calls or streams, closed loop; latency per call or per batch.
async fn grpc(a: GrpcArgs) -> Result<()> {
    use sluice_protocols::grpc::pb;
    use sluice_protocols::grpc::pb::ingest_client::IngestClient;

    let value = Bytes::from(format!(
        "\"{}\"",
        "x".repeat(a.payload_bytes.saturating_sub(2))
    ));
    let events: Vec<pb::Event> = (0..a.events_per_request)
        .map(|_| pb::Event {
            value: value.clone(),
            ..Default::default()
        })
        .collect();
    let start = Instant::now() + Duration::from_millis(300);
    let measure_from = start + Duration::from_secs_f64(a.warmup_secs);
    let end = measure_from + Duration::from_secs_f64(a.duration_secs);
    let mut tasks = Vec::new();
    let lanes_total = if a.mode == "unary" {
        a.connections * a.calls_per_connection
    } else {
        a.connections
    };
    // Open loop: each lane (a unary caller, or a stream's feeder) sends on its own schedule.
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(lanes_total as f64 / a.rate));
    let mut lane_no = 0usize;
    for _ in 0..a.connections {
        let channel = tonic::transport::Channel::from_shared(a.url.clone())?
            .connect()
            .await
            .context("connecting")?;
        let client = IngestClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let lanes = if a.mode == "unary" {
            a.calls_per_connection
        } else {
            1
        };
        for _ in 0..lanes {
            let (mut client, a, events) = (client.clone(), a.clone(), events.clone());
            // Spread the lanes' schedules evenly over one interval.
            let first = start
                + interval.map_or(Duration::ZERO, |i| {
                    i.mul_f64(lane_no as f64 / lanes_total as f64)
                });
            lane_no += 1;
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(first.into()).await;
                let mut t = Tally::new()?;
                let mut due = first;
                // The next send's intended time: now (closed loop) or its slot (open loop).
                let mut next = move || match interval {
                    Some(i) => {
                        let d = due;
                        due += i;
                        d
                    }
                    None => Instant::now(),
                };
                if a.mode == "unary" {
                    loop {
                        let sent = next();
                        if sent >= end {
                            break;
                        }
                        if sent > Instant::now() {
                            tokio::time::sleep_until(sent.into()).await;
                        }
                        let r = client
                            .publish(pb::PublishRequest {
                                stream: a.stream.clone(),
                                events: events.clone(),
                                content_type: String::new(),
                                idempotency_key: String::new(),
                            })
                            .await;
                        if sent >= measure_from && Instant::now() <= end {
                            match r {
                                Ok(r) => {
                                    t.ok += 1;
                                    t.admitted += r.into_inner().results.len() as u64;
                                    t.hist.record(sent.elapsed().as_micros() as u64)?;
                                }
                                Err(_) => t.errors += 1,
                            }
                        }
                    }
                    return anyhow::Ok(t);
                }
                // Stream mode: a window of `in_flight` batches; answers come in order.
                let (tx, rx) = tokio::sync::mpsc::channel(a.in_flight);
                let sent_at = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
                let window = Arc::new(tokio::sync::Semaphore::new(a.in_flight));
                let feeder = {
                    let (sent_at, window, a) = (sent_at.clone(), window.clone(), a.clone());
                    tokio::spawn(async move {
                        for seq in 0u64.. {
                            let intended = next();
                            if intended >= end {
                                break;
                            }
                            if intended > Instant::now() {
                                tokio::time::sleep_until(intended.into()).await;
                            }
                            let Ok(p) = window.clone().acquire_owned().await else {
                                break;
                            };
                            p.forget();
                            if Instant::now() >= end {
                                break;
                            }
                            sent_at.lock().unwrap().push_back(intended);
                            let batch = pb::PublishStreamRequest {
                                sequence: seq,
                                stream: a.stream.clone(),
                                events: events.clone(),
                                content_type: String::new(),
                                idempotency_key: String::new(),
                            };
                            if tx.send(batch).await.is_err() {
                                break;
                            }
                        }
                    })
                };
                let mut out = client
                    .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                while let Some(r) = out.message().await? {
                    let sent = sent_at
                        .lock()
                        .unwrap()
                        .pop_front()
                        .context("unexpected answer")?;
                    window.add_permits(1);
                    if sent >= measure_from && Instant::now() <= end {
                        if r.status.is_some() {
                            t.errors += 1;
                        } else {
                            t.ok += 1;
                            t.admitted += r.results.len() as u64;
                            t.hist.record(sent.elapsed().as_micros() as u64)?;
                        }
                    }
                    if Instant::now() >= end && sent_at.lock().unwrap().is_empty() {
                        break;
                    }
                }
                feeder.abort();
                anyhow::Ok(t)
            }));
        }
    }
    let total = total_of(tasks).await?;
    let secs = a.duration_secs;
    let h = &total.hist;
    let report = serde_json::json!({
        "mode": format!("grpc-{}", a.mode),
        "target_rate": a.rate,
        "connections": a.connections,
        "calls_per_connection": a.calls_per_connection,
        "in_flight": a.in_flight,
        "events_per_request": a.events_per_request,
        "payload_bytes": a.payload_bytes,
        "duration_s": secs,
        "requests": total.ok,
        "requests_per_s": total.ok as f64 / secs,
        "errors": total.errors,
        "admitted_events": total.admitted,
        "admitted_events_per_s": total.admitted as f64 / secs,
        "latency_us": latency_json(h),
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "grpc {}, {} conns: {:.0} calls/s, {:.0} events/s acked; latency p50 {} us, p99 {} us; {} errors",
            a.mode,
            a.connections,
            total.ok as f64 / secs,
            total.admitted as f64 / secs,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            total.errors
        );
    }
    Ok(())
}

/// WebSocket load: per connection a sender (window of unacked frames, or a fixed schedule) and a
/// reader matching acks to frames in order; latency from the frame's intended send time.
async fn ws(a: WsArgs) -> Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let value = format!("\"{}\"", "x".repeat(a.payload_bytes.saturating_sub(2)));
    let frame = if a.events_per_frame == 1 {
        value
    } else {
        format!("[{}]", vec![value; a.events_per_frame].join(","))
    };
    let start = Instant::now() + Duration::from_millis(500);
    let measure_from = start + Duration::from_secs_f64(a.warmup_secs);
    let end = measure_from + Duration::from_secs_f64(a.duration_secs);
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(a.connections as f64 / a.rate));
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        let (socket, _) = tokio_tungstenite::connect_async_with_config(a.url.as_str(), None, true)
            .await
            .context("connecting")?;
        let (mut tx, mut rx) = socket.split();
        let (a, frame) = (a.clone(), frame.clone());
        let offset = interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(c as f64 / a.connections as f64)
        });
        tasks.push(tokio::spawn(async move {
            let sent_at = Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
            let window = Arc::new(tokio::sync::Semaphore::new(a.window));
            let sender = {
                let (sent_at, window) = (sent_at.clone(), window.clone());
                tokio::spawn(async move {
                    let mut due = start + offset;
                    loop {
                        if interval.is_some() {
                            tokio::time::sleep_until(due.into()).await;
                        }
                        let Ok(p) = window.acquire().await else { break };
                        p.forget();
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        // Open loop: latency counts from the scheduled time.
                        sent_at.lock().unwrap().push_back(if interval.is_some() {
                            due
                        } else {
                            now
                        });
                        if tx.send(Message::text(frame.clone())).await.is_err() {
                            break;
                        }
                        if let Some(i) = interval {
                            due += i;
                        }
                    }
                    let _ = tx.close().await;
                })
            };
            let mut t = Tally::new()?;
            let mut acks_in_frame = 0;
            while let Some(m) = rx.next().await {
                let Ok(Message::Text(text)) = m else { continue };
                acks_in_frame += 1;
                let ok = !text.contains("\"error\"");
                if !ok {
                    t.errors += 1;
                }
                if acks_in_frame < a.events_per_frame {
                    if ok && Instant::now() >= measure_from && Instant::now() <= end {
                        t.admitted += 1;
                    }
                    continue;
                }
                acks_in_frame = 0;
                let Some(sent) = sent_at.lock().unwrap().pop_front() else {
                    break;
                };
                window.add_permits(1);
                if sent >= measure_from && Instant::now() <= end {
                    t.ok += 1;
                    if ok {
                        t.admitted += 1;
                    }
                    t.hist.record(sent.elapsed().as_micros() as u64)?;
                }
                if Instant::now() >= end && sent_at.lock().unwrap().is_empty() {
                    break;
                }
            }
            sender.abort();
            anyhow::Ok(t)
        }));
    }
    let total = total_of(tasks).await?;
    let secs = a.duration_secs;
    let h = &total.hist;
    let report = serde_json::json!({
        "mode": if interval.is_some() { "ws-open" } else { "ws-closed" },
        "connections": a.connections,
        "window": a.window,
        "events_per_frame": a.events_per_frame,
        "payload_bytes": a.payload_bytes,
        "target_rate_fps": a.rate,
        "duration_s": secs,
        "frames": total.ok,
        "errors": total.errors,
        "admitted_events": total.admitted,
        "admitted_events_per_s": total.admitted as f64 / secs,
        "latency_us": latency_json(h),
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "ws {} conns, window {}: {:.0} events/s acked; frame latency p50 {} us, p99 {} us; {} errors",
            a.connections,
            a.window,
            total.admitted as f64 / secs,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            total.errors
        );
    }
    Ok(())
}
