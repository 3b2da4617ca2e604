//! `sluice-loadtest attack-rss`: the peak memory (VmHWM) a gateway reaches under inputs built to
//! make it allocate far more than they cost to send. Each scenario runs against a fresh gateway
//! process (the binary given with `--sluice`), so old and new builds can be compared on the same
//! machine in the same run.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use sluice_protocols::grpc::pb;
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
pub struct AttackArgs {
    /// The gateway binary to attack (e.g. target/release/sluice, or an older build).
    #[arg(long)]
    sluice: std::path::PathBuf,
    /// Concurrent copies of each attack.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Print one JSON object per scenario.
    #[arg(long)]
    json: bool,
}

const KEY: &str = "attacker.s3cret-s3cret-s3cret";
/// Just under the default `grpc.max_message_bytes` and `max_body_bytes` (8 MiB).
const BODY: usize = 8 * 1024 * 1024 - 1024;

/// The scenarios: name, and what it sends.
const SCENARIOS: [&str; 5] = [
    "grpc_unauthenticated_empty_events",
    "grpc_authenticated_empty_events",
    "http_json_array_of_tiny_events",
    "http_ndjson_of_tiny_events",
    "http_events_with_many_empty_headers",
];

struct Gateway {
    child: std::process::Child,
    http: SocketAddr,
    grpc: SocketAddr,
    _dir: std::path::PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

fn start(sluice: &std::path::Path) -> Result<Gateway> {
    let dir = std::env::temp_dir().join(format!("sluice-attack-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let hash = sluice_auth::apikey::hash_hex(KEY);
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[http.auth]\nallow_anonymous = false\n[grpc.auth]\nallow_anonymous = false\n\
             [mqtt]\nenabled = false\n\
             [[auth.api_keys]]\nid = \"attacker\"\nsecret_sha256 = {hash:?}\nprincipal = \"attacker\"\nstreams = [\"*\"]\n"
        ),
    )?;
    let mut child = Command::new(sluice)
        .args(["serve", "--config"])
        .arg(&config)
        .env("SLUICE_HTTP__LISTEN", "127.0.0.1:0")
        .env("SLUICE_ADMIN__LISTEN", "127.0.0.1:0")
        .env("SLUICE_GRPC__LISTEN", "127.0.0.1:0")
        .env("SLUICE_LOG__DATA_DIR", dir.join("data"))
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", sluice.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let mut line = String::new();
    for l in BufReader::new(stdout).lines() {
        let l = l?;
        if l.starts_with("sluice listening:") {
            line = l;
            break;
        }
    }
    let addr = |k: &str| -> Result<SocketAddr> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .ok_or_else(|| anyhow!("no {k} in {line:?}"))?
            .parse()
            .context("address")
    };
    Ok(Gateway {
        http: addr("http=")?,
        grpc: addr("grpc=")?,
        child,
        _dir: dir,
    })
}

/// VmHWM (peak resident set) and VmRSS of `pid`, in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .ok_or_else(|| anyhow!("no {name}"))?
            .parse()
            .context(name.to_string())
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

/// One HTTP/1.1 POST; the status.
async fn post(addr: SocketAddr, content_type: &str, auth: bool, body: Bytes) -> Result<u16> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::post("/v1/streams/attack/events")
        .header("host", "sluice")
        .header("content-type", content_type);
    if auth {
        req = req.header("x-api-key", KEY);
    }
    let resp = sender.send_request(req.body(Full::new(body))?).await?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// A `PublishRequest` of `n` empty events, encoded by hand (2 bytes per event).
fn empty_events_message(bytes: usize) -> pb::PublishRequest {
    pb::PublishRequest {
        stream: "attack".into(),
        events: vec![pb::Event::default(); bytes / 2 - 8],
        content_type: String::new(),
        idempotency_key: String::new(),
    }
}

async fn run_one(name: &str, g: &Gateway, concurrency: usize) -> Result<Vec<String>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (http, grpc) = (g.http, g.grpc);
        let name = name.to_string();
        tasks.spawn(async move {
            match name.as_str() {
                "grpc_unauthenticated_empty_events" | "grpc_authenticated_empty_events" => {
                    let ch = tonic::transport::Channel::from_shared(format!("http://{grpc}"))?
                        .connect()
                        .await?;
                    let mut c = pb::ingest_client::IngestClient::new(ch)
                        .max_encoding_message_size(16 << 20);
                    let mut req = tonic::Request::new(empty_events_message(BODY));
                    if name == "grpc_authenticated_empty_events" {
                        req.metadata_mut().insert("x-api-key", KEY.parse()?);
                    }
                    let r = c.publish(req).await;
                    Ok::<_, anyhow::Error>(match r {
                        Ok(_) => "OK".to_string(),
                        Err(s) => format!("{:?}", s.code()),
                    })
                }
                "http_json_array_of_tiny_events" => {
                    let mut b = Vec::with_capacity(BODY);
                    b.push(b'[');
                    while b.len() < BODY - 2 {
                        b.extend_from_slice(b"1,");
                    }
                    b.extend_from_slice(b"1]");
                    Ok(post(http, "application/json", true, b.into())
                        .await?
                        .to_string())
                }
                "http_ndjson_of_tiny_events" => {
                    let b = "1\n".repeat(BODY / 2);
                    Ok(post(http, "application/x-ndjson", true, b.into())
                        .await?
                        .to_string())
                }
                "http_events_with_many_empty_headers" => {
                    // One event whose headers are thousands of one-letter names with empty values.
                    let mut b = String::with_capacity(BODY);
                    b.push_str(r#"{"value":1,"headers":{"#);
                    let mut i = 0u64;
                    while b.len() < BODY - 32 {
                        if i > 0 {
                            b.push(',');
                        }
                        b.push_str(&format!("\"h{i:x}\":\"\""));
                        i += 1;
                    }
                    b.push_str("}}");
                    Ok(post(http, "application/json", true, b.into())
                        .await?
                        .to_string())
                }
                other => bail!("unknown scenario {other}"),
            }
        });
    }
    let mut outcomes = Vec::new();
    while let Some(r) = tasks.join_next().await {
        outcomes.push(r?.unwrap_or_else(|e| format!("error: {e}")));
    }
    Ok(outcomes)
}

pub async fn run(a: AttackArgs) -> Result<()> {
    for name in SCENARIOS {
        let g = start(&a.sluice)?;
        let pid = g.child.id();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (_, idle_rss) = memory_kib(pid)?;
        let outcomes = run_one(name, &g, a.concurrency).await?;
        let (peak, after) = memory_kib(pid)?;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "scenario": name,
                    "concurrency": a.concurrency,
                    "answers": outcomes,
                    "idle_rss_kib": idle_rss,
                    "peak_rss_kib": peak,
                    "rss_after_kib": after,
                })
            );
        } else {
            println!(
                "{name:40} x{}: answers {:?}; RSS idle {} MiB, peak {} MiB, after {} MiB",
                a.concurrency,
                outcomes,
                idle_rss / 1024,
                peak / 1024,
                after / 1024
            );
        }
    }
    Ok(())
}
