//! `sluice-loadtest mqtt`: MQTT 3.1.1 publishers over plain TCP with hand-encoded packets (so
//! the generator costs little and any broker — Sluice or Mosquitto — is measured the same
//! way). Closed loop (a window of unacked QoS 1 publishes per connection) or open loop (a
//! target rate; latency counts from each publish's scheduled time). `--idle` opens connections
//! that only keep alive, for the memory-per-connection measurement.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{Tally, latency_json, total_of};

#[derive(Parser, Clone)]
pub struct MqttArgs {
    /// Broker address, e.g. 127.0.0.1:1883.
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: SocketAddr,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Unacked QoS 1 publishes per connection.
    #[arg(long, default_value_t = 64)]
    window: usize,
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// QoS of the publishes (1 or 0; QoS 0 is measured as sent, not acked).
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Topic; `{c}` is replaced by the connection number.
    #[arg(long, default_value = "bench/dev{c}")]
    topic: String,
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password: Option<String>,
    /// Target publishes per second over all connections (open loop); 0 = closed loop.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 10.0)]
    duration_secs: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// Open `connections` idle connections (keep-alive only), print when all are connected,
    /// hold them for `duration_secs`.
    #[arg(long)]
    idle: bool,
    /// A reconnect storm: all `connections` CONNECT at once (at most `storm_concurrency`
    /// handshakes in flight), each publishes one QoS 1 message and waits for its PUBACK;
    /// reports the CONNECT rate and the time until every device was back and acked.
    #[arg(long)]
    storm: bool,
    /// Handshakes in flight at once during a storm.
    #[arg(long, default_value_t = 1000)]
    storm_concurrency: usize,
    /// Persistent sessions: clean session 0 and a stable client id (`{client_prefix}-{c}`), so a
    /// second run resumes the first run's sessions.
    #[arg(long)]
    persistent: bool,
    /// Client ids are `{client_prefix}-{c}` (default: `lt-{pid}`).
    #[arg(long)]
    client_prefix: Option<String>,
    /// Spread connections over this many loopback source addresses (127.0.0.1, 127.0.0.2, …):
    /// one address has ~28,000 ephemeral ports towards one listener.
    #[arg(long, default_value_t = 1)]
    source_addrs: u8,
    /// The first source address's last byte (127.0.0.N), so that generators running side by
    /// side use addresses of their own (ephemeral ports are per source address).
    #[arg(long, default_value_t = 1)]
    source_first: u8,
    #[arg(long)]
    json: bool,
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn connect_packet(
    client_id: &str,
    user: Option<&str>,
    pass: Option<&str>,
    persistent: bool,
) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    let mut flags = if persistent { 0 } else { 0x02 }; // clean session
    if user.is_some() {
        flags |= 0x80;
    }
    if pass.is_some() {
        flags |= 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    for s in [Some(client_id), user, pass].into_iter().flatten() {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let mut p = vec![0x10];
    remaining_length(body.len(), &mut p);
    p.extend(body);
    p
}

fn publish_packet(topic: &str, qos: u8, id: u16, payload: &[u8], out: &mut Vec<u8>) {
    let len = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    out.push(0x30 | (qos << 1));
    remaining_length(len, out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Splits complete packets off `buf`: (first byte, body).
fn next_packet(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    let mut len = 0usize;
    let mut mult = 1usize;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        len += (b & 0x7f) as usize * mult;
        mult *= 128;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
    }
    if buf.len() < i + len {
        return None;
    }
    let first = buf[0];
    let body = buf[i..i + len].to_vec();
    buf.drain(..i + len);
    Some((first, body))
}

/// Connects connection `c` and waits for CONNACK; returns the stream and Session Present.
async fn open_session(a: &MqttArgs, c: usize) -> Result<(TcpStream, bool)> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if a.source_addrs > 1 || a.source_first != 1 {
        // The ports of an earlier run's connections may still be in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        let last = a
            .source_first
            .saturating_add((c % usize::from(a.source_addrs.max(1))) as u8);
        socket.bind(SocketAddr::from(([127, 0, 0, last], 0)))?;
    }
    let mut s = socket
        .connect(a.addr)
        .await
        .with_context(|| format!("connecting to {}", a.addr))?;
    s.set_nodelay(true)?;
    let prefix = a
        .client_prefix
        .clone()
        .unwrap_or_else(|| format!("lt-{}", std::process::id()));
    s.write_all(&connect_packet(
        &format!("{prefix}-{c}"),
        a.username.as_deref(),
        a.password.as_deref(),
        a.persistent,
    ))
    .await?;
    let (first, body) = next_packet_from(&mut s, "CONNACK").await?;
    if first != 0x20 || body.get(1) != Some(&0) {
        bail!("CONNACK refused: {body:?}");
    }
    Ok((s, body.first().is_some_and(|f| f & 1 == 1)))
}

/// Reads `s` until a complete packet arrived (the first one; `what` names it in errors).
async fn next_packet_from(s: &mut TcpStream, what: &str) -> Result<(u8, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before {what}");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = next_packet(&mut buf) {
            return Ok(p);
        }
    }
}

async fn open(a: &MqttArgs, c: usize) -> Result<TcpStream> {
    Ok(open_session(a, c).await?.0)
}

/// A reconnect storm (`--storm`).
async fn storm(a: MqttArgs) -> Result<()> {
    let start = Instant::now();
    let gate = Arc::new(tokio::sync::Semaphore::new(a.storm_concurrency));
    let payload = vec![b'x'; a.payload_bytes];
    let mut tasks = Vec::with_capacity(a.connections);
    for c in 0..a.connections {
        let (a, gate, payload) = (a.clone(), gate.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let began = Instant::now();
            // A refused or reset CONNECT is retried, as a device does, with a short backoff.
            let mut tries = 0u32;
            let (mut s, present) = loop {
                match open_session(&a, c).await {
                    Ok(v) => break v,
                    Err(_) if tries < 50 => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(20 * u64::from(tries.min(10))))
                            .await;
                    }
                    Err(e) => return Err(e),
                }
            };
            let connected = began.elapsed();
            let mut out = Vec::new();
            publish_packet(
                &a.topic.replace("{c}", &c.to_string()),
                1,
                1,
                &payload,
                &mut out,
            );
            s.write_all(&out).await?;
            let (first, _) = next_packet_from(&mut s, "PUBACK").await?;
            if first != 0x40 {
                bail!("expected PUBACK, got packet type {:#x}", first >> 4);
            }
            drop(permit);
            // Held until every device is back (a storm is all of them at once).
            anyhow::Ok((s, connected, start.elapsed(), present, tries))
        }));
    }
    let mut held = Vec::with_capacity(tasks.len());
    let mut connect = hdrhistogram::Histogram::<u64>::new(3)?;
    let (mut last, mut present, mut retries) = (Duration::ZERO, 0usize, 0u64);
    for t in tasks {
        let (s, connected, done, p, tries) = t.await??;
        connect.record(connected.as_micros() as u64)?;
        last = last.max(done);
        present += usize::from(p);
        retries += u64::from(tries);
        held.push(s);
    }
    let report = serde_json::json!({
        "mode": "mqtt-storm",
        "connections": a.connections,
        "persistent": a.persistent,
        "sessions_present": present,
        "connect_retries": retries,
        "all_back_and_acked_s": last.as_secs_f64(),
        "connects_per_s": a.connections as f64 / last.as_secs_f64(),
        "connect_latency_us": latency_json(&connect),
    });
    println!("{report}");
    for mut s in held {
        let _ = s.write_all(&[0xe0, 0]).await; // DISCONNECT
    }
    Ok(())
}

pub async fn run(a: MqttArgs) -> Result<()> {
    if a.idle {
        return idle(a).await;
    }
    if a.storm {
        return storm(a).await;
    }
    let payload = vec![b'x'; a.payload_bytes];
    let start = Instant::now() + Duration::from_millis(500);
    let measure_from = start + Duration::from_secs_f64(a.warmup_secs);
    let end = measure_from + Duration::from_secs_f64(a.duration_secs);
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(a.connections as f64 / a.rate));
    let mut tasks = Vec::new();
    for c in 0..a.connections {
        let stream = open(&a, c).await?;
        let (mut rd, mut wr) = stream.into_split();
        let (a, payload) = (a.clone(), payload.clone());
        let topic = a.topic.replace("{c}", &c.to_string());
        let offset = interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(c as f64 / a.connections as f64)
        });
        tasks.push(tokio::spawn(async move {
            let sent_at = Arc::new(Mutex::new(VecDeque::new()));
            let window = Arc::new(tokio::sync::Semaphore::new(a.window));
            let qos = a.qos;
            let sender = {
                let (sent_at, window) = (sent_at.clone(), window.clone());
                tokio::spawn(async move {
                    let mut due = start + offset;
                    let mut id: u16 = 0;
                    let mut out = Vec::with_capacity(64 * 1024);
                    let mut sent0 = 0u64;
                    loop {
                        if let Some(i) = interval {
                            tokio::time::sleep_until(due.into()).await;
                            due += i;
                        }
                        if qos > 0 {
                            let Ok(p) = window.acquire().await else { break };
                            p.forget();
                        }
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        id = id % 65_535 + 1;
                        if qos > 0 {
                            sent_at.lock().unwrap().push_back(if interval.is_some() {
                                due
                            } else {
                                now
                            });
                        } else if now >= measure_from {
                            sent0 += 1;
                        }
                        out.clear();
                        publish_packet(&topic, qos, id, &payload, &mut out);
                        if wr.write_all(&out).await.is_err() {
                            break;
                        }
                        if qos == 0 && interval.is_none() && id.is_multiple_of(64) {
                            tokio::task::yield_now().await;
                        }
                    }
                    let _ = wr.write_all(&[0xe0, 0]).await; // DISCONNECT
                    sent0
                })
            };
            let mut t = Tally::new()?;
            if qos == 0 {
                t.admitted = sender.await.unwrap_or(0);
                t.ok = t.admitted;
                return anyhow::Ok(t);
            }
            let mut buf = Vec::with_capacity(4096);
            let mut chunk = vec![0u8; 16 * 1024];
            'read: loop {
                let n = match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some((first, body)) = next_packet(&mut buf) {
                    if first != 0x40 {
                        continue;
                    }
                    let ok = body.get(2).is_none_or(|code| *code == 0);
                    if !ok {
                        t.errors += 1;
                    }
                    let Some(sent) = sent_at.lock().unwrap().pop_front() else {
                        break 'read;
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
                        break 'read;
                    }
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
        "mode": if interval.is_some() { "mqtt-open" } else { "mqtt-closed" },
        "addr": a.addr.to_string(),
        "connections": a.connections,
        "window": a.window,
        "qos": a.qos,
        "payload_bytes": a.payload_bytes,
        "target_rate": a.rate,
        "duration_s": secs,
        "acked": total.ok,
        "errors": total.errors,
        "msgs_per_s": total.admitted as f64 / secs,
        "latency_us": latency_json(h),
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "mqtt {} conns, window {}, QoS {}: {:.0} msgs/s; latency p50 {} us, p99 {} us; {} errors",
            a.connections,
            a.window,
            a.qos,
            total.admitted as f64 / secs,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            total.errors
        );
    }
    Ok(())
}

/// Holds `connections` idle connections (PINGREQ every 30 s).
async fn idle(a: MqttArgs) -> Result<()> {
    let mut conns = Vec::with_capacity(a.connections);
    for c in 0..a.connections {
        conns.push(open(&a, c).await?);
    }
    println!("idle connections open: {}", conns.len());
    let end = Instant::now() + Duration::from_secs_f64(a.duration_secs);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(30).min(end - Instant::now())).await;
        for s in &mut conns {
            let _ = s.write_all(&[0xc0, 0]).await;
        }
    }
    Ok(())
}
