//! Kafka helpers for end-to-end tests: a real Tansu broker on a free loopback port, topic
//! creation, and an rdkafka consumer that reads topics back (the rdkafka crate's bundled
//! librdkafka; Debian's kcat cannot talk to Tansu).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseProducer, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

/// Where the `tansu` binary is: `$SLUICE_TANSU`, else on `PATH`, else in Cargo's bin directory
/// (where `scripts/install-deps.sh` puts it).
pub fn tansu_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_TANSU") {
        return Ok(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("tansu"))
        .find(|p| p.is_file())
        .context(
            "the Kafka tests need the Tansu broker: run scripts/install-deps.sh \
             (cargo install tansu --locked --features dynostore) or set SLUICE_TANSU",
        )
}

/// A free TCP port on loopback (bound, read and released): only for programs that cannot bind
/// port 0 and say what they bound (Tansu, chromedriver); [`Tansu::start`] retries on another
/// port if its port was taken in between.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// Starts a program that cannot bind port 0 on a [`free_port`], and on another if the port
/// was taken between finding it and the program binding it (three tries).
pub fn on_a_free_port<T>(start: impl Fn(u16) -> Result<T>) -> Result<T> {
    let mut last = None;
    for _ in 0..3 {
        match start(free_port()) {
            Ok(t) => return Ok(t),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("tried"))
}

/// A loopback port that refuses connections for as long as the returned socket lives: bound
/// but not listening, so nothing else can take it (a broker that is down, say).
pub fn refused_port() -> (tokio::net::TcpSocket, u16) {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
    let port = s.local_addr().expect("local address").port();
    (s, port)
}

/// A Tansu broker with in-memory storage, killed when dropped.
pub struct Tansu {
    child: Child,
    pub bootstrap: String,
}

impl Tansu {
    /// Starts Tansu on a free loopback port and waits until it answers metadata requests; if
    /// the port was taken between finding it and Tansu binding it, tries another.
    pub fn start() -> Result<Tansu> {
        on_a_free_port(Self::start_on)
    }

    /// Starts Tansu on `port` and waits until it answers metadata requests.
    pub fn start_on(port: u16) -> Result<Tansu> {
        Self::start_advertising(port, &format!("tcp://127.0.0.1:{port}"))
    }

    /// Starts Tansu on `port`, telling clients to connect to `advertised`, and waits until
    /// it answers metadata requests on `port`.
    pub fn start_advertising(port: u16, advertised: &str) -> Result<Tansu> {
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(tansu_binary()?)
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning tansu")?;
        let mut tansu = Tansu {
            child,
            bootstrap: format!("127.0.0.1:{port}"),
        };
        // A Tansu that exits (its port was taken) fails at once rather than after the wait.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = tansu.child.try_wait()? {
                bail!(
                    "tansu exited ({status}) before answering on {}",
                    tansu.bootstrap
                );
            }
            match wait_for_broker(&tansu.bootstrap, Duration::from_secs(2)) {
                Ok(()) => return Ok(tansu),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => {}
            }
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until a broker at `bootstrap` answers a metadata request.
pub fn wait_for_broker(bootstrap: &str, timeout: Duration) -> Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let start = Instant::now();
    loop {
        match producer
            .client()
            .fetch_metadata(None, Duration::from_millis(500))
        {
            Ok(md) if !md.brokers().is_empty() => return Ok(()),
            Ok(_) => {}
            Err(e) if start.elapsed() > timeout => {
                bail!("no broker at {bootstrap} after {timeout:?}: {e}")
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates `topic` with `partitions` partitions (replication factor 1).
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&t],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in results {
        if let Err((name, code)) = r {
            bail!("creating topic {name}: {code}");
        }
    }
    Ok(())
}

/// One record read back from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub timestamp: Option<i64>,
}

impl Record {
    /// The value of header `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads `topic` from the beginning of every partition: at least `at_least` records, and then
/// on to the end of every partition (a topic can hold more than was acked, e.g. events
/// delivered while their producer was cut off): past the watermarks as of that moment and a
/// second without records. Returns what it has when `timeout` passes, for the caller's
/// assertions to explain.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    at_least: usize,
    timeout: Duration,
) -> Result<Vec<Record>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "sluice-tests")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .create()?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("topic metadata")?;
    let partitions = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    if partitions == 0 {
        bail!("topic {topic} has no partitions");
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let mut out: Vec<Record> = Vec::new();
    // Next offset to read per partition, and the end to read to once `at_least` arrived.
    let mut next = vec![0i64; partitions as usize];
    let mut end: Option<Vec<i64>> = None;
    let mut quiet = 0;
    let start = Instant::now();
    while start.elapsed() < timeout {
        if out.len() >= at_least {
            if end.is_none() {
                let mut highs = Vec::new();
                for p in 0..partitions {
                    highs.push(
                        consumer
                            .fetch_watermarks(topic, p, Duration::from_secs(10))?
                            .1,
                    );
                }
                end = Some(highs);
            }
            if let Some(end) = &end
                && next.iter().zip(end).all(|(n, e)| n >= e)
                && quiet >= 5
            {
                break;
            }
        }
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            // Past `at_least`, a second of nothing means the rest has been read: some brokers
            // (Tansu 0.6) report a partition's end per batch, short of its last record, so the
            // watermarks alone can end the read too early.
            quiet += 1;
            if out.len() >= at_least && quiet >= 5 {
                break;
            }
            continue;
        };
        quiet = 0;
        let m = m?;
        next[m.partition() as usize] = m.offset() + 1;
        out.push(Record {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            timestamp: m.timestamp().to_millis(),
        });
    }
    Ok(out)
}

/// Records by (partition, offset).
pub fn by_position(records: &[Record]) -> HashMap<(i32, i64), &Record> {
    records
        .iter()
        .map(|r| ((r.partition, r.offset), r))
        .collect()
}

/// Config of a gateway producing to `bootstrap`, followed by `extra` TOML.
pub fn kafka_config(bootstrap: &str, extra_kafka: &str) -> String {
    format!(
        "[log]\nkind = \"kafka\"\n[log.kafka]\nbootstrap_servers = {bootstrap:?}\nhealth_check_interval_ms = 200\n{extra_kafka}\n"
    )
}

/// Starts a gateway with `toml` and waits until `/readyz` says it can reach the brokers.
pub async fn start_ready(data_dir: &std::path::Path, toml: &str) -> crate::Sluice {
    let s = crate::Sluice::start(data_dir, toml).expect("starting sluice");
    assert!(
        s.wait_readyz(200, crate::DEADLINE).await,
        "the gateway never became ready against the broker"
    );
    s
}

/// Panics unless every acked `(partition, offset)` holds its value among `records`.
pub fn assert_acked_in(records: &[Record], acked: &[((i32, i64), String)]) {
    let at = by_position(records);
    for (pos, value) in acked {
        let r = at
            .get(pos)
            .unwrap_or_else(|| panic!("acked {pos:?} ({value}) is not in the log"));
        assert_eq!(String::from_utf8_lossy(&r.value), *value, "at {pos:?}");
    }
}

/// Kafka's default partitioner for a keyed record: `toPositive(murmur2(key)) % n`, written here
/// from Kafka's `Utils.murmur2`, independently of the gateway's own, and checked against the
/// vectors of Kafka's `UtilsTest`.
pub fn partition_of(key: &[u8], n: u32) -> u32 {
    (murmur2(key) as u32 & 0x7fff_ffff) % n
}

/// Kafka's `Utils.murmur2` (seed 0x9747b28c), as a signed 32-bit value like Java's.
pub fn murmur2(data: &[u8]) -> i32 {
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let chunks = data.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]).wrapping_mul(m);
        k ^= k >> 24;
        h = h.wrapping_mul(m) ^ k.wrapping_mul(m);
    }
    match rest.len() {
        3 => h ^= u32::from(rest[2]) << 16 | u32::from(rest[1]) << 8 | u32::from(rest[0]),
        2 => h ^= u32::from(rest[1]) << 8 | u32::from(rest[0]),
        1 => h ^= u32::from(rest[0]),
        _ => {}
    }
    if !rest.is_empty() {
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

/// A TCP link between clients and a broker that a test can cut and restore: "Kafka is
/// unreachable" as a network outage, while the broker behind it keeps what it has (Tansu
/// 0.6 stores in memory, S3 or Postgres, so stopping it would also forget every topic).
/// Runs on its own runtime, so blocking calls in a test do not stall it.
pub struct Link {
    pub addr: std::net::SocketAddr,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Link {
    /// A link listening on a free loopback port, forwarding to `target` once [`Link::to`]
    /// is called (the broker may only be started after it knows the link's address).
    pub fn listen() -> Result<(Link, std::sync::Arc<std::sync::Mutex<Option<String>>>)> {
        use std::sync::atomic::Ordering;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let listener = {
            let _in = runtime.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let target = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let (up2, cut2, target2) = (up.clone(), cut.clone(), target.clone());
        runtime.spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let to = target2.lock().unwrap().clone();
                let (true, Some(to)) = (up2.load(Ordering::SeqCst), to) else {
                    drop(client); // down: refused at once
                    continue;
                };
                let mut cuts = cut2.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&to).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Ok((
            Link {
                addr,
                up,
                cut,
                runtime: Some(runtime),
            },
            target,
        ))
    }

    /// Cuts every connection through the link and refuses new ones until [`Link::restore`].
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Tansu behind a [`Link`]: clients bootstrap through the link and Tansu advertises the link's
/// address, so every connection (the gateway's and the test's consumer's) can be cut.
pub struct LinkedTansu {
    pub link: Link,
    pub tansu: Tansu,
    /// The link's address: what clients use.
    pub bootstrap: String,
}

impl LinkedTansu {
    pub fn start() -> Result<LinkedTansu> {
        let (link, target) = Link::listen()?;
        let advertised = format!("tcp://{}", link.addr);
        let tansu = on_a_free_port(|port| {
            *target.lock().unwrap() = Some(format!("127.0.0.1:{port}"));
            Tansu::start_advertising(port, &advertised)
        })?;
        wait_for_broker(&link.addr.to_string(), Duration::from_secs(30))?;
        Ok(LinkedTansu {
            bootstrap: link.addr.to_string(),
            link,
            tansu,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn murmur2_matches_kafkas_own_vectors() {
        // org.apache.kafka.common.utils.UtilsTest#testMurmur2
        for (input, want) in [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            ("abc", 479470107),
        ] {
            assert_eq!(super::murmur2(input.as_bytes()), want, "{input}");
        }
    }
}
