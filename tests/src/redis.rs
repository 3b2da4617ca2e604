//! A real Redis (Debian's `redis-server`, installed by `scripts/install-deps.sh --with-redis`)
//! on a free loopback port, without persistence, killed when dropped; and a client for it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::kafka::on_a_free_port;

/// A Redis server.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    /// Starts Redis on a free loopback port (another, if that one was taken in between) and
    /// waits until it answers PING.
    pub fn start() -> Result<Redis> {
        on_a_free_port(Self::start_on)
    }

    /// Starts Redis on `port` and waits until it answers PING.
    pub fn start_on(port: u16) -> Result<Redis> {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning redis-server (scripts/install-deps.sh --with-redis installs it)")?;
        let mut redis = Redis { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = redis.child.try_wait()? {
                bail!("redis-server exited ({status}) before answering on port {port}");
            }
            if redis.command(&["PING"]).is_ok_and(|r| r == "+PONG") {
                return Ok(redis);
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING on port {port} within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends one command and returns the first line of the answer (`+OK`, `:3`, `$5`, …), or
    /// for a bulk string its contents.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end().to_string();
        if line.starts_with('$') && line != "$-1" {
            let mut body = String::new();
            r.read_line(&mut body)?;
            return Ok(body.trim_end().to_string());
        }
        Ok(line)
    }

    /// A field of `INFO section` (e.g. `blocked_clients` of `clients`).
    pub fn info_field(&self, section: &str, field: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("*2\r\n$4\r\nINFO\r\n${}\r\n{section}\r\n", section.len()).as_bytes())?;
        let mut r = BufReader::new(s);
        let mut head = String::new();
        r.read_line(&mut head)?;
        let len: usize = head
            .trim_end()
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("an INFO answer, not {head:?}"))?;
        let mut body = vec![0u8; len + 2];
        std::io::Read::read_exact(&mut r, &mut body)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")).map(str::to_string))
            .with_context(|| format!("no {field} in INFO {section}"))
    }

    /// Dedup window entries of `stream` (every principal): the fields of the window's
    /// generations, `{prefix}dd:{stream}:{principal}:{n}`, pending or stored.
    pub fn window_entries(&self, stream: &str) -> Result<usize> {
        // Each generation also holds one empty field, made with it.
        const SUM: &str = "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do n = n + redis.call('HLEN', k) - 1 end return n";
        let pattern = format!("sluice:dd:{stream}:*:*");
        let line = self.command(&["EVAL", SUM, "0", &pattern])?;
        line.strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("an EVAL answer, not {line:?}"))
    }

    /// Keys matching `pattern` (KEYS; fine for the few a test writes).
    pub fn count_keys(&self, pattern: &str) -> Result<usize> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("*2\r\n$4\r\nKEYS\r\n${}\r\n{pattern}\r\n", pattern.len()).as_bytes())?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        line.trim_end()
            .strip_prefix('*')
            .and_then(|n| n.parse().ok())
            .context("a KEYS answer")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
