//! The read side (docs/consume.md): `read-fetch` measures how fast a stream is read back by
//! cursor in batches; `read-tail` measures Server-Sent Events fan-out — N subscribers of one
//! stream while producers write at a target rate — and the latency from a producer's ack to a
//! subscriber's receipt of the same event.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
pub struct FetchArgs {
    /// The gateway's HTTP listener, e.g. 127.0.0.1:8080.
    #[arg(long)]
    addr: String,
    #[arg(long, default_value = "bench")]
    stream: String,
    /// API key with `consume` on the stream (and, for --prefill, `produce`).
    #[arg(long)]
    key: Option<String>,
    /// Records per read.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Write this many 100-byte events first (batches of 1,000).
    #[arg(long, default_value_t = 0)]
    prefill: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Clone)]
pub struct TailArgs {
    #[arg(long)]
    addr: String,
    #[arg(long, default_value = "bench")]
    stream: String,
    #[arg(long)]
    key: Option<String>,
    /// SSE subscribers of the stream.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Events per second the producers write (open loop).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
    /// Events per producer request.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Producer connections.
    #[arg(long, default_value_t = 16)]
    producers: usize,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    #[arg(long)]
    json: bool,
}

async fn connect(addr: &str) -> Result<SendRequest<Full<Bytes>>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends `req` once the connection is ready for it.
async fn send(
    c: &mut SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>> {
    c.ready().await?;
    Ok(c.send_request(req).await?)
}

fn request(
    method: &str,
    addr: &str,
    path: &str,
    key: Option<&str>,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json");
    if let Some(k) = key {
        r = r.header("x-api-key", k);
    }
    r.body(Full::new(body)).expect("a valid request")
}

/// Events `{"seq":N,"pad":"..."}` of about 100 bytes, numbered from `first`.
fn events(first: u64, n: usize) -> Bytes {
    let mut s = String::with_capacity(n * 110);
    s.push('[');
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&format!(
            "{{\"value\":{{\"seq\":{},\"pad\":\"{}\"}}}}",
            first + i as u64,
            "x".repeat(72)
        ));
    }
    s.push(']');
    Bytes::from(s)
}

pub async fn fetch(a: FetchArgs) -> Result<()> {
    let path = format!("/v1/streams/{}/events", a.stream);
    let mut c = connect(&a.addr).await?;
    let mut written = 0;
    while written < a.prefill {
        let n = (a.prefill - written).min(1000);
        let r = send(
            &mut c,
            request(
                "POST",
                &a.addr,
                &path,
                a.key.as_deref(),
                events(written as u64, n),
            ),
        )
        .await?;
        if !r.status().is_success() {
            bail!("prefill: HTTP {}", r.status());
        }
        r.into_body().collect().await?;
        written += n;
    }
    let start = Instant::now();
    let (mut records, mut bytes, mut reads) = (0u64, 0u64, 0u64);
    let mut cursor = String::new();
    loop {
        let q = if cursor.is_empty() {
            format!("{path}?from=start&limit={}", a.batch)
        } else {
            format!("{path}?cursor={cursor}&limit={}", a.batch)
        };
        let mut req = request("GET", &a.addr, &q, a.key.as_deref(), Bytes::new());
        req.headers_mut()
            .insert("accept", "application/x-ndjson".parse().unwrap());
        let r = send(&mut c, req).await?;
        if !r.status().is_success() {
            bail!("read: HTTP {}", r.status());
        }
        let next = r
            .headers()
            .get("sluice-next-cursor")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = r.into_body().collect().await?.to_bytes();
        reads += 1;
        let n = body.iter().filter(|b| **b == b'\n').count() as u64;
        if n == 0 {
            break;
        }
        records += n;
        bytes += body.len() as u64;
        cursor = next;
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = records as f64 / secs;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"mode": "read-fetch", "records": records, "reads": reads,
                "batch": a.batch, "seconds": secs, "records_per_s": rate,
                "mb_per_s": bytes as f64 / secs / 1e6})
        );
    } else {
        println!(
            "read-fetch: {records} records in {reads} reads of up to {} in {secs:.2} s: {rate:.0} records/s, {:.1} MB/s",
            a.batch,
            bytes as f64 / secs / 1e6
        );
    }
    Ok(())
}

/// The `"seq":N` of a record's JSON, if it has one.
fn seq_of(data: &[u8]) -> Option<u64> {
    let at = data.windows(6).position(|w| w == b"\"seq\":")? + 6;
    let digits = data[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&data[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

pub async fn tail(a: TailArgs) -> Result<()> {
    let path = format!("/v1/streams/{}/events", a.stream);
    let total = (a.rate as f64 * a.duration_secs) as usize;
    // When each event was acked to its producer (µs since start; 0: not yet).
    let acked: Arc<Vec<AtomicU64>> =
        Arc::new((0..total + a.batch).map(|_| AtomicU64::new(0)).collect());
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // The stream exists before anyone subscribes (an event without a `seq`, not counted).
    let mut c = connect(&a.addr).await?;
    let r = send(
        &mut c,
        request(
            "POST",
            &a.addr,
            &path,
            a.key.as_deref(),
            Bytes::from_static(b"[{\"value\":{\"warmup\":true}}]"),
        ),
    )
    .await?;
    if !r.status().is_success() {
        bail!("warm-up: HTTP {}", r.status());
    }
    drop(c);
    // Subscribers first, from the end: they see only what this run writes.
    let mut subs = Vec::new();
    for _ in 0..a.subscribers {
        let mut c = connect(&a.addr).await?;
        let mut req = request(
            "GET",
            &a.addr,
            &format!("{path}?from=end"),
            a.key.as_deref(),
            Bytes::new(),
        );
        req.headers_mut()
            .insert("accept", "text/event-stream".parse().unwrap());
        let r = send(&mut c, req).await?;
        if !r.status().is_success() {
            bail!("subscribe: HTTP {}", r.status());
        }
        let (acked, stop) = (acked.clone(), stop.clone());
        subs.push(tokio::spawn(async move {
            let mut body = r.into_body();
            let mut h = Histogram::<u64>::new(3).unwrap();
            let (mut got, mut before_ack) = (0u64, 0u64);
            let mut rest: Vec<u8> = Vec::new();
            let _conn = c;
            while !stop.load(Ordering::Relaxed) {
                let frame = tokio::time::timeout(Duration::from_secs(1), body.frame()).await;
                let Ok(Some(Ok(frame))) = frame else {
                    if frame.is_ok() {
                        break;
                    }
                    continue;
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let now = start.elapsed().as_micros() as u64;
                rest.extend_from_slice(&data);
                let mut from = 0;
                while let Some(nl) = rest[from..].iter().position(|b| *b == b'\n') {
                    let line = &rest[from..from + nl];
                    if let Some(d) = line.strip_prefix(b"data: ")
                        && let Some(seq) = seq_of(d)
                    {
                        got += 1;
                        match acked.get(seq as usize).map(|t| t.load(Ordering::Relaxed)) {
                            Some(t) if t > 0 => {
                                let _ = h.record(now.saturating_sub(t).max(1));
                            }
                            // Here before its producer heard the ack: counted as no
                            // latency (the ack was still on its way).
                            _ => {
                                before_ack += 1;
                                let _ = h.record(1);
                            }
                        }
                    }
                    from += nl + 1;
                }
                rest.drain(..from);
            }
            (got, before_ack, h)
        }));
    }
    // Producers: open loop, `rate` events/s in requests of `batch`.
    let per_producer = a.rate as f64 / a.producers as f64;
    let interval = Duration::from_secs_f64(a.batch as f64 / per_producer);
    let next_seq = Arc::new(AtomicU64::new(0));
    let produce_start = Instant::now();
    let mut producers = Vec::new();
    for _ in 0..a.producers {
        let mut c = connect(&a.addr).await?;
        let (acked, next_seq, addr, key, path) = (
            acked.clone(),
            next_seq.clone(),
            a.addr.clone(),
            a.key.clone(),
            path.clone(),
        );
        let (batch, duration) = (a.batch, Duration::from_secs_f64(a.duration_secs));
        producers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let (mut sent, mut errors) = (0u64, 0u64);
            while produce_start.elapsed() < duration {
                tick.tick().await;
                let first = next_seq.fetch_add(batch as u64, Ordering::Relaxed);
                if first as usize + batch > acked.len() {
                    break;
                }
                let r = send(
                    &mut c,
                    request("POST", &addr, &path, key.as_deref(), events(first, batch)),
                )
                .await;
                let ok = match r {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.into_body().collect().await;
                        true
                    }
                    _ => false,
                };
                if ok {
                    let t = start.elapsed().as_micros() as u64;
                    for s in first..first + batch as u64 {
                        acked[s as usize].store(t, Ordering::Relaxed);
                    }
                    sent += batch as u64;
                } else {
                    errors += 1;
                }
            }
            (sent, errors)
        }));
    }
    let (mut sent, mut errors) = (0, 0);
    for p in producers {
        let (s, e) = p.await?;
        sent += s;
        errors += e;
    }
    let produced_secs = produce_start.elapsed().as_secs_f64();
    // Let the subscribers catch up (up to 10 s), then stop them.
    let drain = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut h = Histogram::<u64>::new(3).unwrap();
    let (mut delivered, mut before, mut complete) = (0u64, 0u64, 0usize);
    for s in subs {
        let (got, b, sh) = s.await?;
        delivered += got;
        before += b;
        complete += usize::from(got >= sent);
        h.add(sh).ok();
    }
    let _ = drain;
    let line = serde_json::json!({
        "mode": "read-tail", "subscribers": a.subscribers, "target_rate": a.rate,
        "produced": sent, "producer_errors": errors,
        "produced_per_s": sent as f64 / produced_secs,
        "delivered": delivered,
        "delivered_per_s": delivered as f64 / (produced_secs + 2.0),
        "subscribers_complete": complete,
        "received_before_ack": before,
        "latency_us": {"p50": h.value_at_quantile(0.5), "p99": h.value_at_quantile(0.99),
                       "p999": h.value_at_quantile(0.999), "max": h.max()},
    });
    if a.json {
        println!("{line}");
    } else {
        println!(
            "read-tail: {} subscribers, produced {sent} ({:.0}/s, {errors} errors), delivered {delivered} ({complete} subscribers got every event), ack→receipt p50 {} µs p99 {} µs p99.9 {} µs ({before} received before their ack)",
            a.subscribers,
            sent as f64 / produced_secs,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
        );
    }
    Ok(())
}
