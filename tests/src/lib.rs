//! Helpers for end-to-end tests: start the real `sluice` binary on 127.0.0.1:0 with a temporary
//! data directory, wait for it to report its addresses, drive it, kill or drain it, and read the
//! log back through `sluice log read`.

pub mod haproxy;
pub mod http;
pub mod inproc;
pub mod kafka;
pub mod mqtt;
pub mod otlp;
pub mod pki;
pub mod redis;
pub mod registry;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// Path of the gateway binary under test: `sluice-e2e`, which Cargo builds next to the
/// integration tests of this package (`target/<profile>/`, one level above `deps/`).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    dir.join(format!("sluice-e2e{}", std::env::consts::EXE_SUFFIX))
}

/// How long a test waits for the gateway to start or stop before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The gateway's log lines (stderr), read as they come.
pub struct Logs {
    rx: mpsc::Receiver<String>,
    /// Every line read so far, in order.
    pub seen: Vec<String>,
}

impl Logs {
    /// The next line for which `pred` holds, waiting at most `timeout`; every line read on the
    /// way is kept in [`Logs::seen`].
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.rx.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if pred(&line) {
                return Some(line);
            }
        }
    }

    /// A JSON line for which `pred` holds among those read already, or else the next one:
    /// for lines whose order against earlier waits is not fixed.
    pub fn find_json(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let seen = self
            .seen
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| pred(v));
        seen.or_else(|| self.wait_for_json(timeout, pred))
    }

    /// The next line that is JSON (`log_format = "json"`) and for which `pred` holds.
    pub fn wait_for_json(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        self.wait_for(timeout, |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| pred(&v))
        })
        .map(|l| serde_json::from_str(&l).expect("JSON"))
    }
}

/// A running `sluice serve` process.
pub struct Sluice {
    child: Option<Child>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The gRPC listener, unless `grpc.enabled = false`.
    pub grpc: Option<SocketAddr>,
    /// The MQTT listeners (plain TCP, TLS), when enabled.
    pub mqtt: Option<SocketAddr>,
    pub mqtts: Option<SocketAddr>,
    pub data_dir: PathBuf,
    config_path: PathBuf,
    admin_client: reqwest::Client,
}

impl Sluice {
    /// Starts `sluice serve` with `toml` as its config file, and environment overrides that
    /// bind both listeners to port 0 on loopback and keep data in `data_dir`.
    pub fn start(data_dir: &Path, toml: &str) -> Result<Sluice> {
        let config_path = data_dir.with_extension("toml");
        std::fs::write(&config_path, toml)?;
        Self::start_with_config(data_dir, &config_path)
    }

    /// Starts `sluice serve --config config_path`, overriding the listeners (port 0) and the data
    /// directory through `SLUICE_…` environment variables.
    pub fn start_with_config(data_dir: &Path, config_path: &Path) -> Result<Sluice> {
        Self::start_with_env(data_dir, config_path, &[])
    }

    /// [`Sluice::start_with_config`], with more `SLUICE_…` variables that win over the
    /// defaults, e.g. `("SLUICE_HTTP__LISTEN", "0.0.0.0:0")` for a listener that is not on a
    /// loopback address (its reported address is then reached through 127.0.0.1).
    pub fn start_with_env(
        data_dir: &Path,
        config_path: &Path,
        env: &[(&str, &str)],
    ) -> Result<Sluice> {
        Ok(Self::spawn(data_dir, config_path, env, false, None)?.0)
    }

    /// [`Sluice::start`] with the gateway's log (stderr) handed to the test line by line, and
    /// more environment (`RUST_LOG`, say; the default is `warn`).
    pub fn start_with_logs(
        data_dir: &Path,
        toml: &str,
        env: &[(&str, &str)],
    ) -> Result<(Sluice, Logs)> {
        let config_path = data_dir.with_extension("toml");
        std::fs::write(&config_path, toml)?;
        let (s, logs) = Self::spawn(data_dir, &config_path, env, true, None)?;
        Ok((s, logs.expect("logs captured")))
    }

    /// [`Sluice::start`] with no file it writes allowed past `kib` KiB (RLIMIT_FSIZE, with
    /// SIGXFSZ ignored): a write that would pass it fails with EFBIG, as a write to a full disk
    /// fails with ENOSPC, without needing a filesystem of that size.
    pub fn start_with_file_size_limit(data_dir: &Path, toml: &str, kib: u64) -> Result<Sluice> {
        let config_path = data_dir.with_extension("toml");
        std::fs::write(&config_path, toml)?;
        Ok(Self::spawn(data_dir, &config_path, &[], false, Some(kib))?.0)
    }

    fn spawn(
        data_dir: &Path,
        config_path: &Path,
        env: &[(&str, &str)],
        capture_logs: bool,
        file_size_limit_kib: Option<u64>,
    ) -> Result<(Sluice, Option<Logs>)> {
        let mut cmd = match file_size_limit_kib {
            None => Command::new(binary()),
            Some(kib) => {
                // bash counts `ulimit -f` in KiB; an ignored signal stays ignored across exec.
                let mut c = Command::new("bash");
                c.arg("-c")
                    .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
                    .arg(binary());
                c
            }
        };
        cmd.arg("serve")
            .arg("--config")
            .arg(config_path)
            .env("SLUICE_HTTP__LISTEN", "127.0.0.1:0")
            .env("SLUICE_ADMIN__LISTEN", "127.0.0.1:0")
            .env("SLUICE_GRPC__LISTEN", "127.0.0.1:0")
            .env("SLUICE_MQTT__LISTEN", "127.0.0.1:0")
            .env("SLUICE_MQTT__TLS_LISTEN", "127.0.0.1:0")
            .env("SLUICE_LOG__DATA_DIR", data_dir)
            .env("RUST_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if capture_logs {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .context("spawning sluice")?;
        let logs = child.stderr.take().map(|stderr| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            Logs {
                rx,
                seen: Vec::new(),
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("sluice listening:") {
                    let _ = tx.send(line);
                }
            }
        });
        let line = match rx.recv_timeout(DEADLINE) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("sluice did not report its addresses within {DEADLINE:?} (exit: {status})");
            }
        };
        let addr = |key: &str| -> Result<SocketAddr> {
            let mut a: SocketAddr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .ok_or_else(|| anyhow!("no {key} in {line:?}"))?
                .parse()
                .context("parsing address")?;
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            Ok(a)
        };
        let s = Sluice {
            http: addr("http=")?,
            admin: addr("admin=")?,
            grpc: addr("grpc=").ok(),
            mqtt: addr("mqtt=").ok(),
            mqtts: addr("mqtts=").ok(),
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            config_path: config_path.to_path_buf(),
            admin_client: reqwest::Client::new(),
        };
        Ok((s, logs))
    }

    /// `http://ADDR` of the gRPC listener (panics when gRPC is disabled).
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc.expect("grpc listener"))
    }

    /// Waits (up to `timeout`) until `/readyz` answers `status` (200 ready, 503 not ready).
    pub async fn wait_readyz(&self, status: u16, timeout: Duration) -> bool {
        let c = reqwest::Client::new();
        let url = self.admin_url("/readyz");
        wait_until(timeout, || async {
            c.get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == status)
        })
        .await
    }

    /// The path of the config file this process was started with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// `http://ADDR/v1/streams/{stream}/events`.
    pub fn events_url(&self, stream: &str) -> String {
        format!("http://{}/v1/streams/{stream}/events", self.http)
    }

    /// `http://ADMIN/{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}/{}", self.admin, path.trim_start_matches('/'))
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        // One client per gateway, so a test polling in a loop reuses its connection instead of
        // opening one per poll (a busy machine can leave more closing than the admin
        // listener's `max_connections` allows).
        self.admin_client
            .get(self.admin_url("metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }

    /// Process id of the gateway.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, and reap.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Sends `signal` (e.g. `HUP`) to the gateway.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()?;
        if !ok.success() {
            bail!("kill -{signal} failed");
        }
        Ok(())
    }

    /// SIGTERM, then wait (up to [`DEADLINE`]) for the exit status.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.signal("TERM")?;
        self.wait_exit()
    }

    /// Waits (up to [`DEADLINE`]) for the process to exit on its own, e.g. after a signal the
    /// test sent earlier, and returns its status.
    pub fn wait_exit(&mut self) -> Result<ExitStatus> {
        let mut c = self.child.take().ok_or_else(|| anyhow!("not running"))?;
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > DEADLINE {
                let _ = c.kill();
                let _ = c.wait();
                bail!("sluice did not exit within {DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (up to [`DEADLINE`]) until exactly `n` events have reached admission over
    /// `protocol` (`sluice_events_received_total`): with a slow log, the moment they are in flight.
    pub async fn wait_received(&self, protocol: &str, n: f64) -> bool {
        let labels = format!("protocol=\"{protocol}\"");
        wait_until(DEADLINE, || async {
            metric_or_zero(
                &self.metrics().await,
                "sluice_events_received_total",
                &labels,
            ) == n
        })
        .await
    }

    /// Every record of `stream`, through `sluice log read`.
    pub fn read_log(&self, stream: &str) -> Result<Vec<Value>> {
        read_log(&self.data_dir, stream, &[])
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Runs `sluice log read --data-dir D --stream S ARGS…` and parses its NDJSON output.
pub fn read_log(data_dir: &Path, stream: &str, args: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new(binary())
        .args(["log", "read", "--data-dir"])
        .arg(data_dir)
        .args(["--stream", stream])
        .args(args)
        .output_within(DEADLINE)?;
    if !out.status.success() {
        bail!(
            "sluice log read failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {l:?}")))
        .collect()
}

/// `Command::output` with a deadline: a child that has not exited by then is killed and the call
/// fails, so a hung tool fails its test instead of hanging the suite.
pub trait OutputWithin {
    fn output_within(&mut self, timeout: Duration) -> std::io::Result<std::process::Output>;
}

impl OutputWithin for Command {
    fn output_within(&mut self, timeout: Duration) -> std::io::Result<std::process::Output> {
        use std::io::Read;
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let drain = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = r.read_to_end(&mut v);
                v
            })
        };
        let out = drain(Box::new(child.stdout.take().expect("piped")));
        let err = drain(Box::new(child.stderr.take().expect("piped")));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("{:?} did not exit within {timeout:?}", self.get_program()),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        Ok(std::process::Output {
            status,
            stdout: out.join().expect("stdout reader"),
            stderr: err.join().expect("stderr reader"),
        })
    }
}

/// The first line a child writes to `stdout`, waiting at most `timeout`.
pub fn first_line_within(stdout: std::process::ChildStdout, timeout: Duration) -> Option<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if BufReader::new(stdout).read_line(&mut line).is_ok() {
            let _ = tx.send(line);
        }
    });
    rx.recv_timeout(timeout).ok()
}

/// SHA-256 of `text`, lower-case hex, computed by coreutils' `sha256sum` (the command the docs
/// give users): independent of the gateway's own hashing.
pub fn sha256sum(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum (coreutils)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// A `[[auth.api_keys]]` config entry accepting `key` (`{id}.{secret}`) as `principal`.
pub fn api_key_entry(key: &str, principal: &str, streams: &[&str]) -> String {
    let id = key.split_once('.').map_or(key, |(id, _)| id);
    let hash = sluice_auth::apikey::hash_hex(key);
    let streams: Vec<String> = streams.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "\n[[auth.api_keys]]\nid = {id:?}\nsecret_sha256 = {hash:?}\nprincipal = {principal:?}\nstreams = [{}]\n",
        streams.join(", ")
    )
}

/// The value of the Prometheus sample `name{labels}` (labels as written, e.g.
/// `stream="s",protocol="http"`). Panics when the series is absent, so a renamed metric or a
/// misspelled label fails the test instead of reading as 0; use [`metric_or_zero`] where a
/// series legitimately does not exist yet.
pub fn metric(text: &str, name: &str, labels: &str) -> f64 {
    find_metric(text, name, labels)
        .unwrap_or_else(|| panic!("no series {name}{{{labels}}} in the exposition:\n{text}"))
}

/// [`metric`], or 0 when the series does not exist (a counter nothing has touched yet, e.g.
/// while waiting for it to appear). The metric family itself must be in the exposition.
pub fn metric_or_zero(text: &str, name: &str, labels: &str) -> f64 {
    let family = name.trim_end_matches("_total");
    assert!(
        text.lines()
            .any(|l| l.starts_with("# TYPE ") && l[7..].starts_with(family)),
        "no metric family {family} in the exposition:\n{text}"
    );
    find_metric(text, name, labels).unwrap_or(0.0)
}

/// The sum of every sample of `name` whose labels contain `label` (e.g. `protocol="http"`);
/// 0 when there is none (the family itself must exist, as in [`metric_or_zero`]).
pub fn metric_sum(text: &str, name: &str, label: &str) -> f64 {
    let family = name.trim_end_matches("_total");
    assert!(
        text.lines()
            .any(|l| l.starts_with("# TYPE ") && l[7..].starts_with(family)),
        "no metric family {family} in the exposition:\n{text}"
    );
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?.strip_prefix('{')?;
            labels.contains(label).then(|| value.parse::<f64>().ok())?
        })
        .fold(0.0, |a, b| a + b)
}

fn find_metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    let want = if labels.is_empty() {
        name.to_string()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        (series == want).then(|| value.parse().ok())?
    })
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A child process that is killed (and reaped) when this guard drops, also when a test panics,
/// so a failing test never leaves a gateway running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}
